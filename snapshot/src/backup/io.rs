//! Batched I/O for the backup's stages: transfer buffers sized to the job
//! and halved when memory is short, reads and writes with the device's
//! pieces in flight together, the checks every stage makes of a disk.
//!
//! Shared by the copy, stream and restore stages so that none of them
//! imports another. Must never allocate beyond [`WINDOW`] bytes a buffer.

use alloc::vec::Vec;

use super::error::Error;
use super::qcow2::Qcow2Error;
use crate::devices::block::{BlockDevice, BlockError, Op};

/// Bytes moved per batch of requests, at most (less when memory is short).
/// 16 MiB windows measured no faster under QEMU than 4 MiB ones.
pub const WINDOW: u64 = 4 << 20;
/// Requests in flight per batch.
const DEPTH: usize = 32;

/// Refuses `disk` unless it holds at least `bytes`.
pub(super) fn need(disk: &dyn BlockDevice, bytes: u64) -> Result<(), Error> {
    let have = disk.info().bytes();
    if have < bytes {
        return Err(Error::TooSmall {
            disk: disk.info().name.clone(),
            need: bytes,
            have,
        });
    }
    Ok(())
}

/// Requests in flight on `d`: what it takes, at most [`DEPTH`].
pub(super) fn depth(d: &dyn BlockDevice) -> usize {
    d.info().max_depth.clamp(1, DEPTH)
}

/// A zeroed buffer of `len` bytes, or [`Error::NoMemory`].
pub(super) fn zeroed(len: u64) -> Result<Vec<u8>, Error> {
    crate::support::try_filled(len, 0).ok_or(Error::NoMemory(len))
}

/// A transfer buffer for up to [`WINDOW`] bytes in whole `unit`s, and no
/// more than `wanted` units: as many as fit, halving when memory is short;
/// `(buffer, units)`.
pub(super) fn window(unit: u64, wanted: u64) -> Result<(Vec<u8>, u64), Error> {
    let ([buf], units) = windows([unit], wanted)?;
    Ok((buf, units))
}

/// [`window`] for buffers of as many units of each size in `units` (the
/// first, the largest, sets the count).
pub(super) fn windows<const N: usize>(
    units: [u64; N],
    wanted: u64,
) -> Result<([Vec<u8>; N], u64), Error> {
    let mut count = (WINDOW / units[0]).clamp(1, wanted.max(1));
    loop {
        let mut bufs = Vec::with_capacity(N);
        for unit in units {
            match zeroed(count * unit) {
                Ok(buf) => bufs.push(buf),
                Err(e) if count == 1 => return Err(e),
                Err(_) => break,
            }
        }
        if let Ok(bufs) = bufs.try_into() {
            return Ok((bufs, count));
        }
        count /= 2;
    }
}

/// The pipeline's ring ([`super::pipe`]): up to [`super::pipe::RING`]
/// buffers of up to [`WINDOW`] bytes in whole `unit`s, no more than
/// `wanted` units each, and at least two: fewer buffers when memory is
/// short, then smaller ones; `(buffers, units each)`. `spare` bytes stay
/// free for what the job allocates after the ring (the walk's tables,
/// request lists): the ring grows into memory beyond them, never into
/// them, so a job the memory check let start cannot run out mid-way.
pub(super) fn ring(unit: u64, wanted: u64, spare: u64) -> Result<(Vec<Vec<u8>>, u64), Error> {
    let hold = held(spare)?;
    let (first, count) = windows([unit, unit], wanted)?;
    let mut bufs = Vec::from(first);
    while bufs.len() < super::pipe::RING && (bufs.len() as u64) * count < wanted {
        match zeroed(count * unit) {
            Ok(buf) => bufs.push(buf),
            Err(_) => break,
        }
    }
    drop(hold);
    Ok((bufs, count))
}

/// `bytes` of memory taken and left untouched (not zeroed), so that
/// allocations made meanwhile cannot use them; or [`Error::NoMemory`].
fn held(bytes: u64) -> Result<Vec<u8>, Error> {
    let mut hold = Vec::new();
    usize::try_from(bytes)
        .ok()
        .and_then(|n| hold.try_reserve_exact(n).ok())
        .ok_or(Error::NoMemory(bytes))?;
    Ok(hold)
}

/// Writes `buf` at `sector` with the device's pieces of it in flight
/// together (a plain `write` sends them one at a time).
pub(super) fn write_deep(d: &dyn BlockDevice, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
    d.transfer(&mut [Op::Write { sector, buf }], depth(d))
}

/// Reads into `buf` from `sector`, the pieces in flight together.
pub(super) fn read_deep(
    d: &dyn BlockDevice,
    sector: u64,
    buf: &mut [u8],
) -> Result<(), BlockError> {
    d.transfer(&mut [Op::Read { sector, buf }], depth(d))
}

/// The walk found other tables than the plan did: the image changed.
pub(super) fn changed() -> Error {
    Error::Source(Qcow2Error::Invalid(
        "the image changed while it was read".into(),
    ))
}
