//! Steps 4 and 5 as a pipeline of three jobs over a ring of buffers: the
//! copy fills windows of the copy area from the source, each laid out as
//! its extents go on the medium; the seal fills in each window's extent
//! headers and checksums; the stream writes every sealed window to the
//! medium in one batch. None waits for another window by window: the copy
//! runs up to the ring's length ahead, so the medium's disk is kept busy
//! and handed everything that is ready at once (more requests in flight).
//! The seal has a job of its own because checksums are CPU work as long
//! as the source's reads (0.38 s against 0.5 to 0.7 s for the 64 GiB
//! image's 1 GiB under the emulator): in the copy's job they added up.
//!
//! Memory is bounded by design: at most [`RING`] windows of at most
//! [`WINDOW`](super::io::WINDOW) bytes, at least two of one extent each.
//!
//! This module must never write anywhere but at the end of what the
//! stream has written, and never let the stream read a buffer the copy
//! is filling (the counters hand each buffer over; the locks only make
//! that checked).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::copy::Copier;
use super::error::Error;
use super::io::depth;
use super::tape::{checksum, Digest, ExtentHeader, Layout};
use crate::devices::block::{BlockDevice, Op};

/// Windows in the ring, at most (two at least).
pub const RING: usize = 4;

/// Runs two jobs and returns when both are done: at the same time where
/// the platform can (the kernel runs `a` on a second thread), else one
/// after the other ([`InTurn`]). `b` runs on the caller's thread, and may
/// itself run two jobs through the same `Overlap`.
pub trait Overlap: Sync {
    /// Runs `a` and `b`.
    fn both(&self, a: &mut (dyn FnMut() + Send), b: &mut dyn FnMut());

    /// Inside [`Overlap::both`]: blocks until `ready()` holds, where the
    /// other job runs meanwhile, and returns whether it holds; one job
    /// after the other, returns at once (the job then gives way).
    /// Whoever makes `ready` true calls [`Overlap::wake`] with `key`.
    fn wait(&self, key: usize, ready: &dyn Fn() -> bool) -> bool {
        let _ = key;
        ready()
    }

    /// Wakes the job waiting on `key`, if any.
    fn wake(&self, key: usize) {
        let _ = key;
    }
}

/// Runs the two jobs one after the other.
#[derive(Debug, Clone, Copy, Default)]
pub struct InTurn;

impl Overlap for InTurn {
    fn both(&self, a: &mut (dyn FnMut() + Send), b: &mut dyn FnMut()) {
        a();
        b();
    }
}

/// The ring: its buffers and how far each job has got, in windows
/// (`streamed <= sealed <= filled`).
struct Ring {
    bufs: Vec<spin::Mutex<Vec<u8>>>,
    /// Extents per window.
    per: u64,
    windows: u64,
    filled: AtomicU64,
    sealed: AtomicU64,
    streamed: AtomicU64,
    /// A side failed: the other stops too.
    stop: AtomicBool,
}

impl Ring {
    fn key(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn buf(&self, w: u64) -> spin::MutexGuard<'_, Vec<u8>> {
        self.bufs[(w % self.bufs.len() as u64) as usize].lock()
    }

    /// Waits (or gives way) until `ready` or a stop; whether to go on.
    fn wait(&self, overlap: &dyn Overlap, ready: &dyn Fn() -> bool) -> bool {
        let go = || ready() || self.stopped();
        (go() || overlap.wait(self.key(), &go)) && !self.stopped()
    }

    fn fail(&self, overlap: &dyn Overlap, slot: &mut Option<Error>, e: Error) {
        slot.get_or_insert(e);
        self.stop.store(true, Ordering::Release);
        overlap.wake(self.key());
    }
}

/// The copy area's bytes up to the end of window `w` (of `per` extents).
fn bytes_through(layout: &Layout, w: u64, per: u64) -> u64 {
    let last = ((w + 1) * per).min(layout.extents()) - 1;
    let (first, clusters, _) = layout.extent(last);
    (first + clusters) * layout.cluster_size()
}

/// Steps 4 and 5 through `bufs` (at least two, each `per` extents with
/// their header blocks): the stream's checksums digest (in `digest`).
/// Progress goes out from the caller's thread as windows reach the medium.
pub(super) fn run(
    (copier, layout, digest): (&mut Copier<'_>, &Layout, &mut Digest),
    tape: &dyn BlockDevice,
    (bufs, per): (Vec<Vec<u8>>, u64),
    overlap: &dyn Overlap,
    progress: super::Progress<'_>,
) -> Result<(), Error> {
    let ring = Ring {
        bufs: bufs.into_iter().map(spin::Mutex::new).collect(),
        per,
        windows: layout.extents().div_ceil(per),
        filled: AtomicU64::new(0),
        sealed: AtomicU64::new(0),
        streamed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    };
    let (mut copy_failed, mut stream_failed) = (None, None);
    while ring.streamed.load(Ordering::Acquire) < ring.windows && !ring.stopped() {
        overlap.both(
            &mut || copy_side(&ring, overlap, (&mut *copier, layout), &mut copy_failed),
            &mut || {
                overlap.both(
                    &mut || seal_side(&ring, overlap, layout, &mut *digest),
                    &mut || {
                        stream_side(
                            &ring,
                            overlap,
                            (tape, layout),
                            &mut stream_failed,
                            &mut *progress,
                        );
                    },
                );
            },
        );
    }
    // The copy's error first: a stream that stopped for it has none.
    copy_failed.or(stream_failed).map_or(Ok(()), Err)
}

/// The copy: fills windows while the ring has room.
fn copy_side(
    ring: &Ring,
    overlap: &dyn Overlap,
    (copier, layout): (&mut Copier<'_>, &Layout),
    failed: &mut Option<Error>,
) {
    let room = ring.bufs.len() as u64;
    loop {
        let w = ring.filled.load(Ordering::Acquire);
        if w == ring.windows {
            return;
        }
        if !ring.wait(overlap, &|| {
            ring.streamed.load(Ordering::Acquire) + room > w
        }) {
            return;
        }
        let mut buf = ring.buf(w);
        let done = fill_window(copier, &mut buf, layout, w * ring.per, ring.per);
        drop(buf);
        if let Err(e) = done {
            return ring.fail(overlap, failed, e);
        }
        ring.filled.store(w + 1, Ordering::Release);
        overlap.wake(ring.key());
    }
}

/// The seal: fills in the headers and checksums of each filled window, in
/// order (the digest takes the checksums in stream order).
fn seal_side(ring: &Ring, overlap: &dyn Overlap, layout: &Layout, digest: &mut Digest) {
    loop {
        let w = ring.sealed.load(Ordering::Acquire);
        if w == ring.windows || !ring.wait(overlap, &|| ring.filled.load(Ordering::Acquire) > w) {
            return;
        }
        seal(&mut ring.buf(w), layout, w * ring.per, ring.per, digest);
        ring.sealed.store(w + 1, Ordering::Release);
        overlap.wake(ring.key());
    }
}

/// The stream: writes every sealed window to the medium in one batch.
fn stream_side(
    ring: &Ring,
    overlap: &dyn Overlap,
    (tape, layout): (&dyn BlockDevice, &Layout),
    failed: &mut Option<Error>,
    progress: super::Progress<'_>,
) {
    loop {
        let from = ring.streamed.load(Ordering::Acquire);
        if from == ring.windows {
            return;
        }
        if !ring.wait(overlap, &|| ring.sealed.load(Ordering::Acquire) > from) {
            return;
        }
        let to = ring.sealed.load(Ordering::Acquire);
        let bufs: Vec<_> = (from..to).map(|w| ring.buf(w)).collect();
        let mut ops = Vec::with_capacity(bufs.len());
        for (w, buf) in (from..).zip(&bufs) {
            let (at, len) = window_span(layout, w * ring.per, ring.per);
            ops.push(Op::Write {
                sector: at / 512,
                buf: &buf[..len as usize],
            });
        }
        let written = tape.transfer(&mut ops, depth(tape));
        drop(ops);
        drop(bufs);
        if let Err(e) = written {
            return ring.fail(overlap, failed, e.into());
        }
        ring.streamed.store(to, Ordering::Release);
        overlap.wake(ring.key());
        let total = layout.data_clusters * layout.cluster_size();
        let filled = ring.filled.load(Ordering::Acquire);
        progress(
            super::Stage::Copy,
            bytes_through(layout, filled - 1, ring.per),
            total,
        );
        progress(
            super::Stage::Stream,
            bytes_through(layout, to - 1, ring.per),
            total,
        );
    }
}

/// Where on the medium the `n` extents from extent `k` (fewer at the
/// end) go, and their bytes with header blocks: `(offset, bytes)`.
pub(super) fn window_span(layout: &Layout, k: u64, n: u64) -> (u64, u64) {
    let last = (k + n).min(layout.extents()) - 1;
    let at = layout.extent(k).2;
    let (_, clusters, end) = layout.extent(last);
    (
        at,
        end + layout.block + clusters * layout.cluster_size() - at,
    )
}

/// The data of the `n` extents from extent `k` (fewer at the end) in
/// `buf`, laid out as on the medium (a header block before each), with
/// each extent's index and first copy cluster.
fn extents_in<'b>(
    layout: &Layout,
    buf: &'b mut [u8],
    k: u64,
    n: u64,
) -> Vec<(u64, u64, &'b mut [u8], &'b mut [u8])> {
    let cs = layout.cluster_size();
    let n = n.min(layout.extents() - k);
    let mut pieces = Vec::with_capacity(n as usize);
    let mut rest = buf;
    for i in k..k + n {
        let (first, len, _) = layout.extent(i);
        let (head, tail) = rest.split_at_mut(layout.block as usize);
        let (data, tail) = tail.split_at_mut((len * cs) as usize);
        rest = tail;
        pieces.push((i, first, head, data));
    }
    pieces
}

/// Step 4 for the `n` extents from extent `k` (fewer at the end): their
/// clusters from the source into `buf`, laid out as on the medium.
fn fill_window(
    copier: &mut Copier<'_>,
    buf: &mut [u8],
    layout: &Layout,
    k: u64,
    n: u64,
) -> Result<(), Error> {
    let mut data: Vec<&mut [u8]> = extents_in(layout, buf, k, n)
        .into_iter()
        .map(|(_, _, _, data)| data)
        .collect();
    copier.fill(&mut data)
}

/// Fills in the header of each of the `n` extents from extent `k` that
/// [`fill_window`] left in `buf`, adding their checksums to `digest` in
/// order (the copy fills windows in order).
pub(super) fn seal(buf: &mut [u8], layout: &Layout, k: u64, n: u64, digest: &mut Digest) {
    let cs = layout.cluster_size();
    for (i, first, head, data) in extents_in(layout, buf, k, n) {
        let sum = checksum(data);
        digest.add(sum);
        ExtentHeader {
            index: i,
            first,
            clusters: data.len() as u64 / cs,
            data_at: layout.extent(i).2 + layout.block,
            data_checksum: sum,
        }
        .encode_into(head);
    }
}
