//! Verification, for tests, the demo and the benchmark (not part of the
//! method): an independent reference taken in the pause, a hash of every
//! range page at the instant, and a count of copies per page; at the end
//! every copy is compared with its reference.
//!
//! The reference is taken stop-the-world: each eager page as it is copied
//! (the moment it is snapshotted), every other page after the eager phase,
//! just before protection goes on. Its time is reported apart from the
//! pause. Must never change what the engine copies or when.

use alloc::sync::Arc;

use super::reference::CopyCounts;
use super::session::{Session, SESSION};
use super::store::disk::Shared;
use crate::clock::now_ns;
use crate::memory::snapmem;
use crate::memory::PAGE_SIZE;

/// In the pause: hashes range frame `frame` as its reference, if verifying;
/// returns the time it took.
pub(super) fn reference_frame(s: &Session, frame: u64) -> u64 {
    match (&s.verify, s.snap.index().slot(frame)) {
        (Some(v), Some(slot)) => {
            let t = now_ns();
            v.record(slot, snapmem::hash_frame(frame * PAGE_SIZE));
            now_ns() - t
        }
        _ => 0,
    }
}

/// In the pause: records the store's fresh copy of `slot` as its own
/// reference (for DMA targets, which a device may write at any moment);
/// returns the time it took.
pub(super) fn reference_copy(s: &Session, slot: u64) -> u64 {
    match &s.verify {
        Some(v) => {
            let t = now_ns();
            v.record(slot, s.store.fresh_hash(slot));
            now_ns() - t
        }
        None => 0,
    }
}

/// In the pause, after the eager set: hashes every page not copied yet.
pub(super) fn reference_rest(s: &Session) {
    if let Some(v) = &s.verify {
        for (slot, frame) in s.snap.index().iter().enumerate() {
            if !s.snap.is_copied(slot as u64) {
                v.record(slot as u64, snapmem::hash_frame(frame * PAGE_SIZE));
            }
        }
    }
}

/// The range's copy counts page by page, or `None` without verification.
pub(super) fn copy_counts() -> Option<CopyCounts> {
    SESSION
        .with(|s| {
            s.verify
                .as_ref()
                .map(|v| v.copy_counts(s.snap.index().len()))
        })
        .flatten()
}

/// Before an abort drops the session (no copy runs any more): compares
/// the copies made so far that are in memory with the reference.
pub(super) fn check_partial() -> Option<Partial> {
    let len = SESSION.with(|s| s.verify.is_some().then(|| s.snap.index().len()))??;
    let mut partial = Partial {
        copies: copy_counts()?,
        ..Partial::default()
    };
    for slot in 0..len {
        let found = SESSION.with(|s| {
            let v = s.verify.as_ref()?;
            let hash = s.snap.is_copied(slot).then(|| s.store.slot_hash(slot))??;
            Some(hash == v.expected(slot))
        });
        if let Some(Some(equal)) = found {
            partial.checked += 1;
            partial.mismatched += u64::from(!equal);
        }
    }
    Some(partial)
}

/// What an aborted snapshot's check found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Partial {
    /// Copies in memory compared with the reference.
    pub checked: u64,
    /// Of those, copies that differ.
    pub mismatched: u64,
    /// The copy counts page by page at the abort.
    pub copies: CopyCounts,
}

/// Compares every slot's copy with the reference taken at the instant
/// (read back from the disk for a disk store); returns the mismatches, or
/// `None` without verification.
pub(super) fn count_mismatches(disk: Option<&Arc<Shared>>) -> Option<u64> {
    let len = SESSION.with(|s| s.verify.is_some().then(|| s.snap.index().len()))??;
    let mut mismatched = 0;
    let mut check = |slot: u64, hash: u64| {
        let expected = SESSION
            .with(|s| s.verify.as_ref().map_or(hash, |v| v.expected(slot)))
            .unwrap_or(hash);
        if hash != expected {
            if mismatched < 8 {
                let frame = SESSION
                    .with(|s| s.snap.index().frame(slot))
                    .flatten()
                    .unwrap_or(0);
                crate::log!("mismatch: frame {:#x} (slot {slot})", frame * PAGE_SIZE);
            }
            mismatched += 1;
        }
    };
    match disk {
        Some(d) => {
            const CHUNK: u64 = 256;
            let mut hashes = alloc::vec![0u64; CHUNK as usize];
            let mut first = 0;
            while first < len {
                let n = CHUNK.min(len - first) as usize;
                if let Err(e) = d.read_hashes(first, &mut hashes[..n]) {
                    crate::log!("memsnap: cannot read the copy back: {e}");
                    return Some(len - first + mismatched);
                }
                for (i, &hash) in hashes[..n].iter().enumerate() {
                    check(first + i as u64, hash);
                }
                first += n as u64;
            }
        }
        None => {
            for slot in 0..len {
                let hash = SESSION
                    .with(|s| s.store.slot_hash(slot))
                    .flatten()
                    .unwrap_or(0);
                check(slot, hash);
            }
        }
    }
    Some(mismatched)
}
