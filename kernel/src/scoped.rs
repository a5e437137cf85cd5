//! Two borrowed jobs at once: one on a new thread, one on the caller's,
//! joined before returning, so the jobs may borrow the caller's data (the
//! backup's copy and stream of consecutive windows).
//!
//! This module must never return while the thread it started still runs:
//! that join is what makes lending it a borrowed closure sound.

use crate::thread;

/// A job lent to the new thread for the length of one [`both`].
struct Lent(*mut (dyn FnMut() + Send + 'static));

// SAFETY: the closure behind the pointer is `Send`, and only the one
// thread it is sent to uses the pointer.
unsafe impl Send for Lent {}

/// Runs `a` on a new thread named `name` (`stack` bytes of stack) and `b`
/// on this one; returns when both are done, `true`. Without a thread to
/// be had, runs neither and returns `false`.
pub fn both(name: &str, stack: u64, a: &mut (dyn FnMut() + Send), b: &mut dyn FnMut()) -> bool {
    let ptr: *mut (dyn FnMut() + Send + '_) = a;
    // SAFETY: only the lifetime changes. The thread that uses the pointer
    // is joined below before `both` returns, on every path (a kernel panic
    // does not unwind), so the closure outlives every use; and `a` is not
    // touched here while that thread may run.
    let job = Lent(unsafe {
        core::mem::transmute::<*mut (dyn FnMut() + Send + '_), *mut (dyn FnMut() + Send + 'static)>(
            ptr,
        )
    });
    let spawned = thread::spawn_with_stack(name, stack, move || {
        let job = job;
        // SAFETY: see above: the closure is alive, and this thread alone
        // uses it until it is joined.
        unsafe { (*job.0)() }
    });
    match spawned {
        Ok(handle) => {
            b();
            handle.join();
            true
        }
        Err(_) => false,
    }
}
