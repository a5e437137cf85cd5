//! The fake device's memory as the driver's HAL sees it: DMA regions in
//! fake physical memory, and bounce buffers (like swiotlb) placed at a
//! random offset in a page and split at page boundaries, removed from the
//! map as soon as they are unmapped so a late device access is caught.
//! Never reaches real memory.

use alloc::vec::Vec;

use super::super::{Direction, DmaError, DmaRegion, Hal, Segment};
use super::Fake;

/// A region of fake memory.
#[derive(Debug)]
pub struct FakeRegion {
    fake: Fake,
    addr: u64,
    len: usize,
}

impl FakeRegion {
    fn with<R>(&self, offset: usize, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        assert!(offset + len <= self.len, "region access out of bounds");
        f(self.fake.state().mem(self.addr + offset as u64, len))
    }
}

impl DmaRegion for FakeRegion {
    fn phys(&self) -> u64 {
        self.addr
    }
    fn len(&self) -> usize {
        self.len
    }
    fn read_u8(&self, offset: usize) -> u8 {
        self.with(offset, 1, |b| b[0])
    }
    fn read_u16(&self, offset: usize) -> u16 {
        self.with(offset, 2, |b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn read_u32(&self, offset: usize) -> u32 {
        self.with(offset, 4, |b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn write_u8(&self, offset: usize, value: u8) {
        self.with(offset, 1, |b| b[0] = value)
    }
    fn write_u16(&self, offset: usize, value: u16) {
        self.with(offset, 2, |b| b.copy_from_slice(&value.to_le_bytes()))
    }
    fn write_u32(&self, offset: usize, value: u32) {
        self.with(offset, 4, |b| b.copy_from_slice(&value.to_le_bytes()))
    }
    fn write_u64(&self, offset: usize, value: u64) {
        self.with(offset, 8, |b| b.copy_from_slice(&value.to_le_bytes()))
    }
}

/// A bounce buffer lent to the device.
#[derive(Debug)]
pub struct Bounce {
    addr: u64,
    len: usize,
    dir: Direction,
}

impl Hal for Fake {
    type Region = FakeRegion;
    type Mapping = Bounce;

    fn alloc(&self, bytes: usize) -> Result<FakeRegion, DmaError> {
        let addr = self.state().alloc(bytes, 0);
        Ok(FakeRegion {
            fake: self.clone(),
            addr,
            len: bytes,
        })
    }

    fn map(&self, buf: &[u8], dir: Direction, out: &mut Vec<Segment>) -> Result<Bounce, DmaError> {
        let mut s = self.state();
        let page = s.setup.page;
        let offset = 8 * s.rng.below(page / 8);
        let addr = s.alloc(buf.len(), offset);
        if dir == Direction::ToDevice {
            s.mem(addr, buf.len()).copy_from_slice(buf);
        }
        let (mut at, end) = (addr, addr + buf.len() as u64);
        while at < end {
            let next = ((at / page + 1) * page).min(end);
            out.push(Segment {
                addr: at,
                len: (next - at) as u32,
            });
            at = next;
        }
        Ok(Bounce {
            addr,
            len: buf.len(),
            dir,
        })
    }

    fn unmap(&self, mapping: Bounce, buf: Option<&mut [u8]>) {
        let mut s = self.state();
        if let (Direction::FromDevice, Some(buf)) = (mapping.dir, buf) {
            buf.copy_from_slice(s.mem(mapping.addr, mapping.len));
        }
        s.memory.remove(&mapping.addr).expect("unmapped twice");
    }
}
