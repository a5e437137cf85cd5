//! One item prepared ahead on a second thread: while the caller commits
//! one batch (writes it to one disk), a long-lived reader thread prepares
//! the next (reads it from another), so that the two disks work at once.
//! At most one item waits ready, so memory stays at two batches: the one
//! being committed and the one being prepared. Used by the clone split
//! and by the mirror's copier.
//!
//! This module must never prepare an item nobody asked for, nor drop one
//! it prepared: an item the caller did not take is handed back by
//! [`ReadAhead::leftover`] once the reader has stopped.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::thread;

/// The hand-over between the reader thread ([`ReadAhead::serve`]) and
/// the caller ([`ReadAhead::next`]).
pub struct ReadAhead<T> {
    wanted: AtomicBool,
    filled: AtomicBool,
    stop: AtomicBool,
    ready: spin::Mutex<Option<T>>,
}

impl<T> Default for ReadAhead<T> {
    fn default() -> Self {
        ReadAhead {
            wanted: AtomicBool::new(false),
            filled: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            ready: spin::Mutex::new(None),
        }
    }
}

impl<T> ReadAhead<T> {
    fn key(&self) -> usize {
        self as *const Self as usize
    }

    /// The reader thread: prepares an item each time one is wanted, until
    /// [`Self::stop`].
    pub fn serve(&self, mut prepare: impl FnMut() -> T) {
        loop {
            thread::block_until(self.key(), || {
                self.wanted.load(Ordering::Acquire) || self.stop.load(Ordering::Acquire)
            });
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            self.wanted.store(false, Ordering::Release);
            let item = prepare();
            *self.ready.lock() = Some(item);
            self.filled.store(true, Ordering::Release);
            thread::wake_all(self.key());
        }
    }

    fn ask(&self) {
        self.wanted.store(true, Ordering::Release);
        thread::wake_all(self.key());
    }

    /// The next item; if `more` says another may follow it, asks for
    /// that one at once, so that it is prepared while this one is
    /// committed. `asked` says whether one is coming (false at first).
    pub fn next(&self, asked: &mut bool, more: impl FnOnce(&T) -> bool) -> Option<T> {
        if !*asked {
            self.ask();
        }
        thread::block_until(self.key(), || self.filled.load(Ordering::Acquire));
        let item = self.ready.lock().take();
        self.filled.store(false, Ordering::Release);
        *asked = item.as_ref().is_some_and(more);
        if *asked {
            self.ask();
        }
        item
    }

    /// Asks for one item without waiting for it: take it with
    /// [`Self::try_take`] (a background job whose result is checked later).
    pub fn start(&self) {
        self.ask();
    }

    /// The item asked for by [`Self::start`] if it is ready, without
    /// waiting; `None` while it is being prepared.
    pub fn try_take(&self) -> Option<T> {
        if !self.filled.load(Ordering::Acquire) {
            return None;
        }
        let item = self.ready.lock().take();
        self.filled.store(false, Ordering::Release);
        item
    }

    /// Stops the reader: it returns from [`Self::serve`] once the item it
    /// may be preparing is ready.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        thread::wake_all(self.key());
    }

    /// After the reader has returned: the item it prepared that nobody
    /// took, if any.
    pub fn leftover(&self) -> Option<T> {
        self.ready.lock().take()
    }
}

impl<T, E> ReadAhead<Result<Option<T>, E>> {
    /// [`Self::next`] for a reader of batches that ends with `Ok(None)`
    /// (or an error): asks for the next batch while the last one was one.
    pub fn next_batch(&self, asked: &mut bool) -> Result<Option<T>, E> {
        self.next(asked, |b| matches!(b, Ok(Some(_))))
            .unwrap_or(Ok(None))
    }
}
