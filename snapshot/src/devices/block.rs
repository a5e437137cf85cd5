//! The block-device interface every disk path uses, and an in-memory disk.
//!
//! A disk is an array of 512-byte sectors. Work is submitted as a batch of
//! [`Op`]s with a queue depth: a device keeps up to that many requests in
//! flight and may complete them in any order, except that a
//! [`Op::Flush`] is a barrier (everything before it completes first, and it
//! completes before anything after it starts). Every op of a batch is
//! checked before any reaches the device, so a request past the end, a
//! write to a read-only disk or a buffer that is not whole sectors is
//! refused with nothing done.
//!
//! Errors are values naming the disk and sector; nothing here panics on a
//! device's behalf. [`MemDisk`] is the reference implementation that host
//! tests (and the kernel's own tests) compare real devices against.
//!
//! This module must never assume a particular device: the virtio-blk
//! driver ([`crate::devices::virtio::blk`]) is one implementation among others.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Bytes in a sector, the unit of addressing.
pub const SECTOR_SIZE: usize = 512;

/// What a disk is and can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The name the host gave the disk (virtio-blk: its serial).
    pub name: String,
    /// Capacity in sectors.
    pub sectors: u64,
    /// The device's preferred I/O granularity in bytes (a multiple of 512).
    pub block_size: u32,
    /// Writes are refused.
    pub read_only: bool,
    /// The device has a volatile write cache that [`Op::Flush`] empties;
    /// without one, a flush has nothing to do and succeeds at once.
    pub flush: bool,
    /// Most requests the device takes at once.
    pub max_depth: usize,
}

impl DiskInfo {
    /// Capacity in bytes.
    pub fn bytes(&self) -> u64 {
        self.sectors * SECTOR_SIZE as u64
    }
}

/// One operation of a batch.
#[derive(Debug)]
pub enum Op<'a> {
    /// Read `buf.len()` bytes (whole sectors) starting at `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Destination; its length is a multiple of [`SECTOR_SIZE`].
        buf: &'a mut [u8],
    },
    /// Write `buf` (whole sectors) starting at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// Source; its length is a multiple of [`SECTOR_SIZE`].
        buf: &'a [u8],
    },
    /// Make every completed write durable; a barrier within the batch.
    Flush,
}

impl Op<'_> {
    /// The first sector and sector count, for reads and writes.
    pub fn extent(&self) -> Option<(u64, usize)> {
        match self {
            Op::Read { sector, buf } => Some((*sector, buf.len())),
            Op::Write { sector, buf } => Some((*sector, buf.len())),
            Op::Flush => None,
        }
    }
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The device reported an I/O error.
    Io,
    /// The device does not support the request.
    Unsupported,
    /// A write to a read-only disk (refused before reaching the device).
    ReadOnly,
    /// The request ends past the disk's last sector (refused before
    /// reaching the device).
    OutOfRange {
        /// The disk's capacity in sectors.
        capacity: u64,
    },
    /// A buffer that is not a whole number of sectors.
    Misaligned {
        /// Its length in bytes.
        len: usize,
    },
    /// No disk has this name.
    NotFound {
        /// The names of the disks that do exist, comma-separated.
        present: String,
    },
    /// The device broke the protocol (a completion for a request it was
    /// not given, a missing status); it was reset and is out of service.
    Broken(&'static str),
    /// The buffer is in more pieces than the device can take in one
    /// request for a single sector.
    TooFragmented,
    /// The buffer could not be lent to the device (no memory for the
    /// mapping, or part of it is not mapped).
    NoMemory,
    /// A disk image format on top of the device (qcow2) found its metadata
    /// unusable or a feature it does not handle: what, in words.
    Image(String),
}

/// An error from a block device: which disk, where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockError {
    /// The disk's name.
    pub disk: String,
    /// The first sector of the failed request, if it had one.
    pub sector: Option<u64>,
    /// What went wrong.
    pub kind: ErrorKind,
}

impl BlockError {
    /// An error on `disk` at `sector`.
    pub fn new(disk: &str, sector: Option<u64>, kind: ErrorKind) -> Self {
        BlockError {
            disk: disk.into(),
            sector,
            kind,
        }
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let disk = &self.disk;
        match &self.kind {
            ErrorKind::NotFound { present } if present.is_empty() => {
                return write!(f, "no disk named \"{disk}\" (no disks attached)")
            }
            ErrorKind::NotFound { present } => {
                return write!(f, "no disk named \"{disk}\" (disks: {present})")
            }
            _ => {}
        }
        write!(f, "disk \"{disk}\": ")?;
        match &self.kind {
            ErrorKind::Io => f.write_str("I/O error")?,
            ErrorKind::Unsupported => f.write_str("request not supported by the device")?,
            ErrorKind::ReadOnly => f.write_str("write refused: the disk is read-only")?,
            ErrorKind::OutOfRange { capacity } => {
                write!(f, "request past the end of the disk ({capacity} sectors)")?
            }
            ErrorKind::Misaligned { len } => write!(
                f,
                "buffer of {len} bytes is not a whole number of {SECTOR_SIZE}-byte sectors"
            )?,
            ErrorKind::Broken(why) => write!(f, "device broke the protocol ({why}); disabled")?,
            ErrorKind::TooFragmented => {
                f.write_str("buffer too fragmented for the device's segment limits")?
            }
            ErrorKind::NoMemory => {
                f.write_str("buffer cannot be lent to the device (no memory, or not mapped)")?
            }
            ErrorKind::Image(what) => f.write_str(what)?,
            ErrorKind::NotFound { .. } => unreachable!("handled above"),
        }
        if let Some(sector) = self.sector {
            write!(f, " at sector {sector}")?;
        }
        Ok(())
    }
}

/// Checks `op` against the disk before it goes anywhere near a device.
pub fn check(info: &DiskInfo, op: &Op<'_>) -> Result<(), BlockError> {
    let Some((sector, len)) = op.extent() else {
        return Ok(());
    };
    let fail = |kind| Err(BlockError::new(&info.name, Some(sector), kind));
    if !len.is_multiple_of(SECTOR_SIZE) {
        return fail(ErrorKind::Misaligned { len });
    }
    let end = sector.checked_add((len / SECTOR_SIZE) as u64);
    if end.is_none_or(|end| end > info.sectors) {
        return fail(ErrorKind::OutOfRange {
            capacity: info.sectors,
        });
    }
    if info.read_only && matches!(op, Op::Write { .. }) {
        return fail(ErrorKind::ReadOnly);
    }
    Ok(())
}

/// A disk: see the module docs for the batch semantics.
pub trait BlockDevice: Send + Sync {
    /// What the disk is.
    fn info(&self) -> &DiskInfo;

    /// Runs `ops` with up to `depth` requests in flight (at least one, at
    /// most what the device takes). Every op is checked first. On an error
    /// no new request starts, those in flight finish, and the first error
    /// is returned; ops that had not completed have undefined contents.
    fn transfer(&self, ops: &mut [Op<'_>], depth: usize) -> Result<(), BlockError>;

    /// Reads whole sectors at `sector`.
    fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.transfer(&mut [Op::Read { sector, buf }], 1)
    }

    /// Writes whole sectors at `sector`.
    fn write(&self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.transfer(&mut [Op::Write { sector, buf }], 1)
    }

    /// Makes completed writes durable.
    fn flush(&self) -> Result<(), BlockError> {
        self.transfer(&mut [Op::Flush], 1)
    }

    /// What the disk holds from `sector` on, and for how many sectors (at
    /// least one) the answer holds: QEMU's block status. A plain disk
    /// only knows it holds data; an image format knows its holes.
    fn status(&self, sector: u64) -> Result<(Status, u64), BlockError> {
        Ok((
            Status::Data,
            self.info().sectors.saturating_sub(sector).max(1),
        ))
    }
}

/// What a range of a disk holds, as [`BlockDevice::status`] tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Data (which may happen to be zeros).
    Data,
    /// Reads as zeros without holding data (a hole with nothing under it,
    /// a zero cluster).
    Zero,
}

/// A shared or boxed disk is the disk (a layer of a backing chain holds its
/// image this way).
macro_rules! forward_block_device {
    ($($t:ty),*) => {$(
        impl<T: BlockDevice + ?Sized> BlockDevice for $t {
            fn info(&self) -> &DiskInfo {
                (**self).info()
            }
            fn transfer(&self, ops: &mut [Op<'_>], depth: usize) -> Result<(), BlockError> {
                (**self).transfer(ops, depth)
            }
            fn status(&self, sector: u64) -> Result<(Status, u64), BlockError> {
                (**self).status(sector)
            }
        }
    )*};
}
forward_block_device!(alloc::boxed::Box<T>, alloc::sync::Arc<T>, &T);

/// A byte range cut at sector boundaries: a run of whole sectors, or part
/// of one sector (`skip` bytes into it).
enum Span {
    Whole {
        sector: u64,
        at: usize,
        len: usize,
    },
    Part {
        sector: u64,
        skip: usize,
        at: usize,
        len: usize,
    },
}

/// Cuts `len` bytes at byte `offset` into spans; `at` is the position in
/// the caller's buffer.
fn spans(offset: u64, len: usize) -> impl Iterator<Item = Span> {
    let mut done = 0;
    core::iter::from_fn(move || {
        if done == len {
            return None;
        }
        let pos = offset + done as u64;
        let (sector, skip) = (
            pos / SECTOR_SIZE as u64,
            (pos % SECTOR_SIZE as u64) as usize,
        );
        let rest = len - done;
        let span = if skip == 0 && rest >= SECTOR_SIZE {
            let whole = rest - rest % SECTOR_SIZE;
            Span::Whole {
                sector,
                at: done,
                len: whole,
            }
        } else {
            let n = (SECTOR_SIZE - skip).min(rest);
            Span::Part {
                sector,
                skip,
                at: done,
                len: n,
            }
        };
        done += match span {
            Span::Whole { len, .. } | Span::Part { len, .. } => len,
        };
        Some(span)
    })
}

/// Reads `buf.len()` bytes at byte `offset`, any alignment: the partial
/// sectors at either end go through a one-sector bounce buffer.
pub fn read_bytes<D: BlockDevice + ?Sized>(
    disk: &D,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), BlockError> {
    for span in spans(offset, buf.len()) {
        match span {
            Span::Whole { sector, at, len } => disk.read(sector, &mut buf[at..at + len])?,
            Span::Part {
                sector,
                skip,
                at,
                len,
            } => {
                let mut bounce = [0; SECTOR_SIZE];
                disk.read(sector, &mut bounce)?;
                buf[at..at + len].copy_from_slice(&bounce[skip..skip + len]);
            }
        }
    }
    Ok(())
}

/// Writes `data` at byte `offset`, any alignment: partial sectors are read,
/// patched and written back (so they must not be written concurrently).
pub fn write_bytes<D: BlockDevice + ?Sized>(
    disk: &D,
    offset: u64,
    data: &[u8],
) -> Result<(), BlockError> {
    for span in spans(offset, data.len()) {
        match span {
            Span::Whole { sector, at, len } => disk.write(sector, &data[at..at + len])?,
            Span::Part {
                sector,
                skip,
                at,
                len,
            } => {
                let mut bounce = [0; SECTOR_SIZE];
                disk.read(sector, &mut bounce)?;
                bounce[skip..skip + len].copy_from_slice(&data[at..at + len]);
                disk.write(sector, &bounce)?;
            }
        }
    }
    Ok(())
}

/// Fills `out` (whole sectors) with the test pattern of `seed` for the
/// sectors starting at `sector`. Each 8-byte word depends on the seed, the
/// sector and its place in the sector, so a sector written at the wrong
/// offset, or a stale one, never matches. The host checks image files with
/// the same function.
pub fn fill_pattern(seed: u64, sector: u64, out: &mut [u8]) {
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let s = sector + (i * 8 / SECTOR_SIZE) as u64;
        let word = pattern_word(seed, s, (i % (SECTOR_SIZE / 8)) as u64);
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
}

/// Word `index` (0..64) of the pattern of `seed` at `sector`.
pub fn pattern_word(seed: u64, sector: u64, index: u64) -> u64 {
    // splitmix64's finaliser over a mix of the three inputs.
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(sector.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(index.wrapping_mul(0x94d0_49bb_1331_11eb));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seed of the pattern the host fills read-only test disks with.
pub const READ_ONLY_TEST_SEED: u64 = 0x0f0f;

/// Seed of the pattern a kernel test writes for the host to check.
pub const HOST_CHECK_SEED: u64 = 0x5eed;

/// Extents (first sector, sectors) that the host-checked kernel test writes
/// on a disk of `sectors`: odd offsets and lengths, scattered, disjoint.
pub fn host_check_extents(sectors: u64) -> Vec<(u64, u64)> {
    (0..16u64)
        .map(|k| (k * (sectors / 16) + 2 * k + 1, 3 * k + 1 + (k % 3) * 128))
        .filter(|&(start, len)| start + len <= sectors)
        .collect()
}

/// A disk in memory: the reference implementation, with fault injection.
#[derive(Debug)]
pub struct MemDisk {
    info: DiskInfo,
    state: spin::Mutex<MemState>,
}

#[derive(Debug)]
struct MemState {
    data: Vec<u8>,
    /// Sectors whose reads and writes fail with [`ErrorKind::Io`].
    failing: Vec<u64>,
}

impl MemDisk {
    /// A zeroed, writable disk of `sectors` sectors.
    pub fn new(name: &str, sectors: u64) -> Self {
        MemDisk {
            info: DiskInfo {
                name: name.into(),
                sectors,
                block_size: 4096,
                read_only: false,
                flush: true,
                max_depth: 64,
            },
            state: spin::Mutex::new(MemState {
                data: vec![0; sectors as usize * SECTOR_SIZE],
                failing: Vec::new(),
            }),
        }
    }

    /// A writable disk holding `bytes`, padded with zeros to whole
    /// sectors (as QEMU shows a file whose length is not).
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Self {
        let disk = MemDisk::new(name, bytes.len().div_ceil(SECTOR_SIZE) as u64);
        disk.state.lock().data[..bytes.len()].copy_from_slice(bytes);
        disk
    }

    /// The same disk, read-only.
    pub fn read_only(mut self) -> Self {
        self.info.read_only = true;
        self
    }

    /// Makes every request touching `sector` fail with an I/O error.
    pub fn fail_sector(&self, sector: u64) {
        self.state.lock().failing.push(sector);
    }

    /// A copy of the disk's bytes.
    pub fn contents(&self) -> Vec<u8> {
        self.state.lock().data.clone()
    }
}

impl BlockDevice for MemDisk {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&self, ops: &mut [Op<'_>], _depth: usize) -> Result<(), BlockError> {
        for op in ops.iter() {
            check(&self.info, op)?;
        }
        let mut state = self.state.lock();
        for op in ops.iter_mut() {
            if let Some((sector, len)) = op.extent() {
                let end = sector + (len / SECTOR_SIZE) as u64;
                if state.failing.iter().any(|s| (sector..end).contains(s)) {
                    return Err(BlockError::new(
                        &self.info.name,
                        Some(sector),
                        ErrorKind::Io,
                    ));
                }
            }
            match op {
                Op::Read { sector, buf } => {
                    let at = *sector as usize * SECTOR_SIZE;
                    buf.copy_from_slice(&state.data[at..at + buf.len()]);
                }
                Op::Write { sector, buf } => {
                    let at = *sector as usize * SECTOR_SIZE;
                    state.data[at..at + buf.len()].copy_from_slice(buf);
                }
                Op::Flush => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use proptest::prelude::*;

    #[test]
    fn bad_requests_are_refused_before_anything_happens() {
        let disk = MemDisk::new("d", 8);
        let data = [7u8; 512];
        // The first op is fine, the second is past the end: neither runs.
        let mut ops = [
            Op::Write {
                sector: 0,
                buf: &data,
            },
            Op::Write {
                sector: 8,
                buf: &data,
            },
        ];
        let err = disk.transfer(&mut ops, 2).unwrap_err();
        assert_eq!(err.kind, ErrorKind::OutOfRange { capacity: 8 });
        assert_eq!(err.sector, Some(8));
        assert!(disk.contents().iter().all(|&b| b == 0));
        assert_eq!(
            disk.write(u64::MAX, &data).unwrap_err().kind,
            ErrorKind::OutOfRange { capacity: 8 }
        );
        assert_eq!(
            disk.write(0, &data[..100]).unwrap_err().kind,
            ErrorKind::Misaligned { len: 100 }
        );
        let ro = MemDisk::new("ro", 8).read_only();
        let err = ro.write(1, &data).unwrap_err();
        assert_eq!(
            err.to_string(),
            "disk \"ro\": write refused: the disk is read-only at sector 1"
        );
        assert!(ro.read(1, &mut [0; 512]).is_ok());
    }

    #[test]
    fn injected_errors_name_disk_and_sector() {
        let disk = MemDisk::new("scratch", 16);
        disk.fail_sector(5);
        let err = disk.read(4, &mut [0; 1024]).unwrap_err();
        assert_eq!(err.to_string(), "disk \"scratch\": I/O error at sector 4");
        assert!(disk.read(6, &mut [0; 512]).is_ok());
    }

    #[test]
    fn missing_disk_message_lists_the_present_ones() {
        let err = BlockError::new(
            "tape",
            None,
            ErrorKind::NotFound {
                present: "data0, data1".into(),
            },
        );
        assert_eq!(
            err.to_string(),
            "no disk named \"tape\" (disks: data0, data1)"
        );
    }

    #[test]
    fn pattern_differs_by_seed_sector_and_word() {
        let mut a = [0; 1024];
        fill_pattern(1, 10, &mut a);
        let mut b = [0; 512];
        fill_pattern(1, 11, &mut b);
        assert_eq!(&a[512..], &b[..], "sector 11 is the same alone or second");
        assert_ne!(&a[..512], &b[..]);
        let mut c = [0; 512];
        fill_pattern(2, 10, &mut c);
        assert_ne!(&a[..512], &c[..]);
        let words: std::collections::HashSet<_> = a.chunks(8).collect();
        assert_eq!(words.len(), 128, "every word differs");
    }

    proptest! {
        #[test]
        fn byte_access_at_any_alignment_matches_a_flat_array(
            writes in prop::collection::vec((0u64..8000, 1usize..1500, any::<u8>()), 1..20)
        ) {
            let disk = MemDisk::new("d", 20);
            let mut reference = vec![0u8; 20 * SECTOR_SIZE];
            for (offset, len, byte) in writes {
                let len = len.min(reference.len() - offset as usize);
                let data = vec![byte; len];
                write_bytes(&disk, offset, &data).unwrap();
                reference[offset as usize..offset as usize + len].copy_from_slice(&data);
                let mut back = vec![0; len + 3];
                let from = offset.saturating_sub(1);
                let n = back.len().min(reference.len() - from as usize);
                read_bytes(&disk, from, &mut back[..n]).unwrap();
                prop_assert_eq!(&back[..n], &reference[from as usize..from as usize + n]);
            }
            prop_assert_eq!(disk.contents(), reference);
        }
    }
}
