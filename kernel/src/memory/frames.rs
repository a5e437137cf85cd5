//! The kernel's frame allocator: [`snapshot::policy::frames::FrameBitmap`] over the
//! firmware memory map, behind an interrupt-safe lock.

use core::ops::Range;

use snapshot::policy::frames::{FrameBitmap, FrameError, FRAME_SIZE};
use x86_64::structures::paging::{FrameAllocator, PhysFrame, Size4KiB};
use x86_64::PhysAddr;

use super::phys_to_virt;
use crate::sync::IrqMutex;

static FRAMES: IrqMutex<Option<FrameBitmap<'static>>> = IrqMutex::new(None);

/// Low memory (BIOS data, the PVH start info, option ROMs) is never handed out.
const LOW_MEMORY_END: u64 = 1 << 20;

/// Builds the allocator over the usable RAM ranges `ram`: the bitmap is
/// carved from the first of them above the kernel image, inside the boot
/// physical map (below 4 GiB).
pub fn init(ram: impl Iterator<Item = Range<u64>> + Clone, kernel: Range<u64>) {
    let ram_end = ram
        .clone()
        .map(|r| r.end)
        .max()
        .expect("no usable RAM in the memory map");
    let words = FrameBitmap::words_for(ram_end);
    let bytes = (words * 8) as u64;
    let bitmap_at = ram
        .clone()
        .filter_map(|r| {
            let start = r
                .start
                .max(kernel.end)
                .max(LOW_MEMORY_END)
                .next_multiple_of(FRAME_SIZE);
            (start + bytes <= r.end && start + bytes <= 1 << 32).then_some(start)
        })
        .next()
        .expect("no room for the frame bitmap below 4 GiB");
    // SAFETY: 1. [bitmap_at, +bytes) is usable RAM inside the boot physical
    // map (first 4 GiB) and 8-byte aligned; 2. it is reserved in the bitmap
    // below, so no other owner is ever handed this memory; 3. the slice
    // lives for the rest of the kernel's life, as 'static says.
    let storage =
        unsafe { core::slice::from_raw_parts_mut(phys_to_virt(bitmap_at) as *mut u64, words) };
    let mut bitmap = FrameBitmap::new(storage);
    for region in ram {
        bitmap.add_free_range(region.start, region.end);
    }
    bitmap.reserve_range(0, LOW_MEMORY_END);
    bitmap.reserve_range(kernel.start, kernel.end);
    bitmap.reserve_range(bitmap_at, bitmap_at + bytes);
    *FRAMES.lock() = Some(bitmap);
}

fn with<R>(f: impl FnOnce(&mut FrameBitmap<'static>) -> R) -> R {
    f(FRAMES
        .lock()
        .as_mut()
        .expect("frame allocator used before memory::init"))
}

/// One free 4 KiB frame, contents undefined.
pub fn alloc() -> Option<PhysFrame> {
    let addr = with(|b| b.alloc())?;
    super::hooks::before_reuse(addr);
    Some(PhysFrame::containing_address(PhysAddr::new(addr)))
}

/// One free frame, zero-filled.
pub fn alloc_zeroed() -> Option<PhysFrame> {
    let frame = alloc()?;
    zero_frame(frame);
    Some(frame)
}

/// Fills a frame with zeros through the physical map.
fn zero_frame(frame: PhysFrame) {
    let ptr = phys_to_virt(frame.start_address().as_u64()) as *mut u8;
    // SAFETY: 1. the frame was just allocated, so the caller owns it; 2. it
    // is RAM inside the physical map, writable and 4 KiB long.
    unsafe { core::ptr::write_bytes(ptr, 0, FRAME_SIZE as usize) };
}

/// Returns a frame; refuses double and foreign frees.
pub fn free(frame: PhysFrame) -> Result<(), FrameError> {
    with(|b| b.free(frame.start_address().as_u64()))
}

/// `count` contiguous frames aligned to `align` frames; the first address.
pub fn alloc_contiguous(count: u64, align: u64) -> Option<u64> {
    let start = with(|b| b.alloc_contiguous(count, align))?;
    for frame in 0..count {
        super::hooks::before_reuse(start + frame * FRAME_SIZE);
    }
    Some(start)
}

/// Counts for reports: `(free, managed)` frames.
pub fn stats() -> (u64, u64) {
    with(|b| (b.free_frames(), b.managed_frames()))
}

/// The allocator as the `x86_64` crate's page-table code wants it.
#[derive(Debug)]
pub struct KernelFrames;

// SAFETY: every frame returned comes from the bitmap, which hands out each
// frame at most once until it is freed, and only frames of usable RAM.
unsafe impl FrameAllocator<Size4KiB> for KernelFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        alloc_zeroed()
    }
}

/// A frame owned by one Rust value: readable and writable through the
/// physical map, freed on drop. The safe way to use raw frames.
#[derive(Debug)]
pub struct OwnedFrame(PhysFrame);

impl OwnedFrame {
    /// Allocates a frame (contents undefined until written).
    pub fn alloc() -> Option<Self> {
        alloc().map(OwnedFrame)
    }

    /// Its physical address.
    pub fn phys(&self) -> u64 {
        self.0.start_address().as_u64()
    }

    /// Its contents, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8; FRAME_SIZE as usize] {
        // SAFETY: 1. the frame is RAM inside the physical map, 4 KiB long
        // and page-aligned; 2. this value owns it (allocated for it alone),
        // and the exclusive borrow of `self` makes this the only reference
        // to the frame's memory.
        unsafe { &mut *(phys_to_virt(self.phys()) as *mut [u8; FRAME_SIZE as usize]) }
    }
}

impl Drop for OwnedFrame {
    fn drop(&mut self) {
        if let Err(e) = free(self.0) {
            crate::log!("owned frame: {e}");
        }
    }
}

/// Physically contiguous frames owned by one Rust value, used through the
/// physical map (so a live snapshot protects them), freed on drop.
#[derive(Debug)]
pub struct OwnedRun {
    phys: u64,
    frames: u64,
}

impl OwnedRun {
    /// `frames` contiguous frames (contents undefined), or `None`.
    pub fn alloc(frames: u64) -> Option<Self> {
        let phys = alloc_contiguous(frames, 1)?;
        Some(OwnedRun { phys, frames })
    }

    /// The physical-map address of the first byte.
    pub fn virt(&self) -> u64 {
        phys_to_virt(self.phys)
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.frames * FRAME_SIZE
    }

    /// The memory as words.
    pub fn words(&self) -> &[u64] {
        // SAFETY: 1. the run is RAM inside the physical map, owned by this
        // value alone; 2. the shared borrow of `self` rules out `words_mut`.
        unsafe {
            core::slice::from_raw_parts(self.virt() as *const u64, (self.len_bytes() / 8) as usize)
        }
    }

    /// The memory as bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `words_mut`.
        unsafe {
            core::slice::from_raw_parts_mut(self.virt() as *mut u8, self.len_bytes() as usize)
        }
    }

    /// The memory as words, writable.
    pub fn words_mut(&mut self) -> &mut [u64] {
        // SAFETY: as for `words`, and the exclusive borrow of `self` makes
        // this the only reference to the run's memory.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.virt() as *mut u64,
                (self.len_bytes() / 8) as usize,
            )
        }
    }
}

impl Drop for OwnedRun {
    fn drop(&mut self) {
        for frame in 0..self.frames {
            let f = PhysFrame::containing_address(PhysAddr::new(self.phys + frame * FRAME_SIZE));
            if let Err(e) = free(f) {
                crate::log!("owned run: {e}");
            }
        }
    }
}
