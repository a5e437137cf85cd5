//! DMA for device drivers: the kernel's [`Hal`] for the virtio engine.
//!
//! - [`DmaMemory`]: zeroed, physically contiguous frames the device may
//!   read and write for their whole life (rings, request headers). They are
//!   registered as DMA targets ([`super::hooks`]), so a live snapshot
//!   copies them at its instant rather than trusting write protection the
//!   device bypasses.
//! - [`KernelHal::map`]: lends a caller's buffer for one request, without
//!   copying: its virtual range is translated page by page into physical
//!   segments (merged where contiguous). A buffer the device writes is
//!   registered as a DMA target until unmapped, which during a live
//!   snapshot copies its frames first.
//!
//! Must never hand the device an address it did not translate from memory
//! the caller lent or this module allocated.

use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::{AtomicUsize, Ordering};

use snapshot::devices::virtio::{Direction, DmaError, DmaRegion, Hal, Segment};
use x86_64::structures::paging::Translate;
use x86_64::VirtAddr;

use super::frames::OwnedRun;
use super::{paging, PAGE_SIZE, PHYS_OFFSET};

/// Device-shared memory: contiguous frames, registered as a DMA target.
#[derive(Debug)]
pub struct DmaMemory {
    run: OwnedRun,
    len: usize,
    phys: u64,
}

impl DmaMemory {
    /// `bytes` of zeroed memory, page-aligned.
    pub fn alloc(bytes: usize) -> Option<Self> {
        let frames = (bytes as u64).div_ceil(PAGE_SIZE).max(1);
        let mut run = OwnedRun::alloc(frames)?;
        run.words_mut().fill(0);
        let phys = run.virt() - PHYS_OFFSET;
        super::hooks::dma_registered(phys..phys + frames * PAGE_SIZE);
        Some(DmaMemory {
            run,
            len: bytes,
            phys,
        })
    }

    fn ptr<T>(&self, offset: usize) -> *mut T {
        assert!(
            offset.is_multiple_of(align_of::<T>()) && offset + size_of::<T>() <= self.len,
            "DMA access at {offset:#x} outside {} bytes",
            self.len
        );
        (self.run.virt() + offset as u64) as *mut T
    }

    fn read<T: Copy>(&self, offset: usize) -> T {
        let ptr = self.ptr::<T>(offset);
        // SAFETY: 1. `ptr` is inside this allocation and aligned (checked by
        // `ptr`); 2. the memory is owned by `self` and mapped through the
        // physical map for its life; 3. the device may write it at any time,
        // so it is only accessed with volatile operations, never through a
        // Rust reference.
        unsafe { ptr.read_volatile() }
    }

    fn write<T: Copy>(&self, offset: usize, value: T) {
        let ptr = self.ptr::<T>(offset);
        // SAFETY: as for `read`.
        unsafe { ptr.write_volatile(value) }
    }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        let frames = self.run.len_bytes();
        super::hooks::dma_unregistered(self.phys..self.phys + frames);
    }
}

impl DmaRegion for DmaMemory {
    fn phys(&self) -> u64 {
        self.phys
    }
    fn len(&self) -> usize {
        self.len
    }
    fn read_u8(&self, offset: usize) -> u8 {
        self.read(offset)
    }
    fn read_u16(&self, offset: usize) -> u16 {
        self.read(offset)
    }
    fn read_u32(&self, offset: usize) -> u32 {
        self.read(offset)
    }
    fn write_u8(&self, offset: usize, value: u8) {
        self.write(offset, value)
    }
    fn write_u16(&self, offset: usize, value: u16) {
        self.write(offset, value)
    }
    fn write_u32(&self, offset: usize, value: u32) {
        self.write(offset, value)
    }
    fn write_u64(&self, offset: usize, value: u64) {
        self.write(offset, value)
    }
}

/// The physical address behind kernel virtual address `virt`, if mapped.
pub fn translate(virt: u64) -> Option<u64> {
    let end = paging::physmap_end();
    if (PHYS_OFFSET..PHYS_OFFSET + end).contains(&virt) {
        return Some(virt - PHYS_OFFSET);
    }
    let addr = VirtAddr::try_new(virt).ok()?;
    paging::with_mapper(|m| m.translate_addr(addr)).map(|p| p.as_u64())
}

/// Appends the physical segments behind `buf` to `out`, merging
/// physically contiguous pages.
fn segments(buf: &[u8], out: &mut Vec<Segment>) -> Result<(), DmaError> {
    let start = buf.as_ptr() as u64;
    let end = start + buf.len() as u64;
    let mut at = start;
    while at < end {
        let page_end = ((at / PAGE_SIZE) + 1) * PAGE_SIZE;
        let chunk = page_end.min(end) - at;
        let phys = translate(at).ok_or(DmaError)?;
        match out.last_mut() {
            Some(last)
                if last.addr + u64::from(last.len) == phys
                    && u64::from(last.len) + chunk <= u64::from(u32::MAX) =>
            {
                last.len += chunk as u32
            }
            _ => out.push(Segment {
                addr: phys,
                len: chunk as u32,
            }),
        }
        at += chunk;
    }
    Ok(())
}

/// How many callers of [`with_lent_buffers_unregistered`] are inside it.
static LENDING_UNREGISTERED: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` with buffers lent to devices left unregistered (device-shared
/// memory from [`DmaMemory`] stays registered). Only for the test that shows
/// the snapshot verification catches a device writing unregistered memory.
/// Registration comes back when `f` returns; a panic inside `f` ends the
/// kernel, so the switch cannot outlive its caller.
pub fn with_lent_buffers_unregistered<R>(f: impl FnOnce() -> R) -> R {
    LENDING_UNREGISTERED.fetch_add(1, Ordering::SeqCst);
    let result = f();
    LENDING_UNREGISTERED.fetch_sub(1, Ordering::SeqCst);
    result
}

/// The kernel's DMA: see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelHal;

/// A lent buffer: the ranges registered as DMA targets, if any.
#[derive(Debug)]
pub struct Lent(Vec<Range<u64>>);

impl Hal for KernelHal {
    type Region = DmaMemory;
    type Mapping = Lent;

    fn alloc(&self, bytes: usize) -> Result<DmaMemory, DmaError> {
        DmaMemory::alloc(bytes).ok_or(DmaError)
    }

    fn map(&self, buf: &[u8], dir: Direction, out: &mut Vec<Segment>) -> Result<Lent, DmaError> {
        let first = out.len();
        segments(buf, out)?;
        let mut registered = Vec::new();
        if dir == Direction::FromDevice && LENDING_UNREGISTERED.load(Ordering::Relaxed) == 0 {
            for s in &out[first..] {
                let range = s.addr..s.addr + u64::from(s.len);
                super::hooks::dma_registered(range.clone());
                registered.push(range);
            }
        }
        Ok(Lent(registered))
    }

    fn unmap(&self, mapping: Lent, _buf: Option<&mut [u8]>) {
        for range in mapping.0 {
            super::hooks::dma_unregistered(range);
        }
    }
}
