//! How big a mirror run's transfers may be, from the memory it has: the
//! pump's and the copier's batches, the backup's window and its on-demand
//! copies. The caller sizes a run with [`Budget::fit`] before it starts (the
//! kernel from its free heap, the host from the guest's `--mem`), and a
//! pair that even the smallest transfers do not fit is refused with the
//! figure, before anything changes.
//!
//! This module must never let a run's peak exceed the memory it was given
//! (each buffer is also allocated fallibly, so a wrong estimate is an
//! [`Error::NoMemory`], not an abort).

use alloc::vec::Vec;

use super::controller::CopyError;
use super::copier::MAX_BATCHES;
use super::layout::Geometry;
use super::{Error, Refusal};
use crate::backup::tape::BLOCK;
use crate::backup::volume::VolumeStream;

/// Blocks a pump or copier batch moves at most, memory allowing.
pub const MAX_BATCH: u64 = 64;

/// Small allocations besides the buffers (block lists, request lists,
/// messages, the workload's buffer).
pub const SLACK: u64 = 256 << 10;

/// Transfer sizes a run of a pair keeps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Blocks per pump or copier batch, and per on-demand copy.
    pub batch: u64,
    /// Extents per backup window.
    pub window_extents: u64,
}

impl Budget {
    /// The largest transfers (up to [`MAX_BATCH`] blocks, and the
    /// backup's full window) whose peak fits in `have` bytes; window and
    /// batch shrink in turn, down to one extent and one block. Refused
    /// with the figure if even those do not fit.
    pub fn fit(geo: &Geometry, have: u64) -> Result<Budget, Error> {
        let mut b = Budget {
            batch: MAX_BATCH,
            window_extents: VolumeStream::max_window_extents(geo.volume_bytes, geo.block_bits()),
        };
        loop {
            if b.peak_bytes(geo) <= have {
                return Ok(b);
            }
            let batch_bytes = 3 * b.batch * geo.block_bytes;
            let window_bytes = b.window_extents * stride(geo);
            if b.batch > 1 && (batch_bytes >= window_bytes || b.window_extents == 1) {
                b.batch /= 2;
            } else if b.window_extents > 1 {
                b.window_extents -= 1;
            } else {
                let need = b.peak_bytes(geo);
                return Err(Refusal::TooLittleMemory { need, have }.into());
            }
        }
    }

    /// The smallest transfers: one block, one extent.
    pub fn least() -> Budget {
        Budget {
            batch: 1,
            window_extents: 1,
        }
    }

    /// Bytes a run of a pair of `geo` takes at most with these transfers:
    /// the controller's bitmaps and copy map, a verify run's per-block
    /// hashes and one block it hashes (twice: bytes and words), the
    /// backup's window, its on-demand copy and [`MAX_BATCHES`] copier
    /// batches at once (a pump batch never runs beside them), and
    /// [`SLACK`].
    pub fn peak_bytes(&self, geo: &Geometry) -> u64 {
        let bs = geo.block_bytes;
        let batches = (1 + u64::from(MAX_BATCHES)) * self.batch * bs;
        super::memory_bytes(geo)
            + geo.blocks() * 8
            + 2 * bs
            + self.window_extents * stride(geo)
            + batches
            + SLACK
    }
}

/// Bytes of one extent of the backup's window: its header and data.
fn stride(geo: &Geometry) -> u64 {
    let clusters = VolumeStream::medium_extent_clusters(geo.block_bits());
    BLOCK + clusters * geo.block_bytes
}

/// An empty vector with room for `n` items, or the refusal to allocate
/// it: the data paths never abort on a full heap.
pub(super) fn try_vec<T>(n: usize) -> Result<Vec<T>, CopyError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| CopyError::NoMemory((n * core::mem::size_of::<T>()) as u64))?;
    Ok(v)
}
