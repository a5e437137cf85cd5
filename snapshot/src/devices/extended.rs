//! A read-only disk seen larger than it is, reading as zeros past its end:
//! how QEMU reads a backing file smaller than the image over it (a
//! `qemu-img resize` of an overlay grows the overlay, never its base).
//!
//! Must never write: it stands for a backing layer, which is read-only.

use alloc::boxed::Box;
use alloc::vec::Vec;

use super::block::{BlockDevice, BlockError, DiskInfo, ErrorKind, Op, Status, SECTOR_SIZE};

/// `inner` extended with zeros to `sectors` sectors.
pub struct ZeroExtended {
    inner: Box<dyn BlockDevice>,
    info: DiskInfo,
}

impl ZeroExtended {
    /// `inner` as a read-only disk of `bytes` (whole sectors, rounded up),
    /// or `inner` itself if it is as large already.
    pub fn to(inner: Box<dyn BlockDevice>, bytes: u64) -> Box<dyn BlockDevice> {
        let sectors = bytes.div_ceil(SECTOR_SIZE as u64);
        if inner.info().sectors >= sectors {
            return inner;
        }
        let info = DiskInfo {
            sectors,
            read_only: true,
            ..inner.info().clone()
        };
        Box::new(ZeroExtended { inner, info })
    }

    fn err(&self, sector: Option<u64>, kind: ErrorKind) -> BlockError {
        BlockError::new(&self.info.name, sector, kind)
    }
}

impl core::fmt::Debug for ZeroExtended {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ZeroExtended")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl BlockDevice for ZeroExtended {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&self, ops: &mut [Op<'_>], depth: usize) -> Result<(), BlockError> {
        let end = self.inner.info().sectors;
        let mut inner_ops = Vec::with_capacity(ops.len());
        for op in ops.iter_mut() {
            match op {
                Op::Read { sector, buf } => {
                    let (at, n) = (*sector, buf.len() / SECTOR_SIZE);
                    if at + n as u64 > self.info.sectors {
                        let kind = ErrorKind::OutOfRange {
                            capacity: self.info.sectors,
                        };
                        return Err(self.err(Some(at), kind));
                    }
                    // The part inside the disk is read; the rest is zeros.
                    let inside = end.saturating_sub(at).min(n as u64) as usize * SECTOR_SIZE;
                    let (head, tail) = core::mem::take(buf).split_at_mut(inside);
                    tail.fill(0);
                    if !head.is_empty() {
                        inner_ops.push(Op::Read {
                            sector: at,
                            buf: head,
                        });
                    }
                }
                Op::Write { sector, .. } => {
                    return Err(self.err(Some(*sector), ErrorKind::ReadOnly))
                }
                Op::Flush => inner_ops.push(Op::Flush),
            }
        }
        self.inner.transfer(&mut inner_ops, depth)
    }

    fn status(&self, sector: u64) -> Result<(Status, u64), BlockError> {
        let end = self.inner.info().sectors;
        if sector >= end {
            return Ok((
                Status::Zero,
                self.info.sectors.saturating_sub(sector).max(1),
            ));
        }
        let (status, n) = self.inner.status(sector)?;
        Ok((status, n.min(end - sector)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::block::MemDisk;

    fn base() -> Box<dyn BlockDevice> {
        Box::new(MemDisk::from_bytes("base", &[7u8; 4 * SECTOR_SIZE]).read_only())
    }

    #[test]
    fn reads_past_the_end_are_zeros_and_say_so() {
        let d = ZeroExtended::to(base(), 10 * SECTOR_SIZE as u64);
        assert_eq!(d.info().sectors, 10);
        let mut buf = [1u8; 4 * SECTOR_SIZE];
        d.read(2, &mut buf).unwrap();
        assert!(buf[..2 * SECTOR_SIZE].iter().all(|&b| b == 7));
        assert!(buf[2 * SECTOR_SIZE..].iter().all(|&b| b == 0));
        let mut far = [1u8; SECTOR_SIZE];
        d.read(9, &mut far).unwrap();
        assert!(far.iter().all(|&b| b == 0));
        assert_eq!(d.status(1).unwrap(), (Status::Data, 3));
        assert_eq!(d.status(4).unwrap(), (Status::Zero, 6));
        assert!(d.read(9, &mut buf).is_err(), "past the extended end");
        assert!(
            d.write(0, &[0u8; SECTOR_SIZE]).is_err(),
            "a backing layer is read-only"
        );
    }

    #[test]
    fn a_disk_large_enough_is_left_as_it_is() {
        let d = ZeroExtended::to(base(), 3 * SECTOR_SIZE as u64);
        assert_eq!(d.info().sectors, 4);
    }
}
