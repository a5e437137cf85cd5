//! Kernel thread stacks: 4 KiB pages at the top of a 2 MiB slot, the rest of
//! the slot unmapped, so running off the bottom hits a guard and the page
//! fault handler reports a stack overflow instead of corrupting memory.
//!
//! Also [`move_below_rsp`]: a context trapped on an interrupt stack gets its
//! saved frame copied onto its own stack, so the scheduler can switch away
//! from it (a thread waiting out a write fault).

use core::sync::atomic::{AtomicU64, Ordering};

use snapshot::policy::fault::StackRegion;
use x86_64::structures::paging::PageTableFlags;

use super::paging::{map_page, unmap_page, MapError};
use super::{frames, PAGE_SIZE};
use crate::arch::trap::TrapFrame;

/// Start of the stack region.
pub const STACKS_BASE: u64 = 0xffff_9000_0000_0000;
/// Virtual bytes per stack slot; the largest stack is this minus one page.
pub const SLOT_SIZE: u64 = 2 << 20;
/// Stack slots (as many as the scheduler has thread slots).
pub const SLOTS: u64 = 64;

static USED: AtomicU64 = AtomicU64::new(0);

/// The region, as the fault classifier sees it.
pub fn region() -> StackRegion {
    StackRegion {
        base: STACKS_BASE,
        slot_size: SLOT_SIZE,
        slots: SLOTS,
    }
}

/// A mapped stack; unmapped and its frames freed on drop.
#[derive(Debug)]
pub struct KernelStack {
    slot: u64,
    pages: u64,
}

/// Why a stack could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackError {
    /// Asked for more than a slot holds.
    TooLarge(u64),
    /// All slots are in use.
    NoSlot,
    /// Out of memory.
    Map(MapError),
}

impl KernelStack {
    /// A stack of `size` bytes (rounded up to pages).
    pub fn new(size: u64) -> Result<Self, StackError> {
        let pages = size.div_ceil(PAGE_SIZE).max(1);
        if pages >= SLOT_SIZE / PAGE_SIZE {
            return Err(StackError::TooLarge(size));
        }
        let slot = loop {
            let used = USED.load(Ordering::Acquire);
            let slot = u64::from(used.trailing_ones());
            if slot >= SLOTS {
                return Err(StackError::NoSlot);
            }
            if USED
                .compare_exchange(used, used | 1 << slot, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break slot;
            }
        };
        // From here on, Drop releases whatever was mapped.
        let mut stack = KernelStack { slot, pages: 0 };
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
        for _ in 0..pages {
            let frame = frames::alloc_zeroed().ok_or(StackError::Map(MapError::OutOfFrames))?;
            let virt = stack.top() - (stack.pages + 1) * PAGE_SIZE;
            if let Err(e) = map_page(virt, frame.start_address().as_u64(), flags) {
                let _ = frames::free(frame);
                return Err(StackError::Map(e));
            }
            stack.pages += 1;
        }
        Ok(stack)
    }

    /// One past the highest byte of the stack.
    pub fn top(&self) -> u64 {
        STACKS_BASE + (self.slot + 1) * SLOT_SIZE
    }

    /// The lowest mapped byte.
    pub fn bottom(&self) -> u64 {
        self.top() - self.pages * PAGE_SIZE
    }

    /// Writes `frame` at the top of the stack, where the trap path will pop
    /// it when the thread first runs; returns its address (the thread's
    /// saved context).
    pub fn push_initial_frame(&mut self, frame: TrapFrame) -> u64 {
        let at = self.top() - 16 - size_of::<TrapFrame>() as u64;
        assert!(at >= self.bottom(), "stack too small for its first frame");
        // SAFETY: 1. [at, at + size_of::<TrapFrame>()) lies inside this
        // stack's mapped pages (checked above), owned by `self`; 2. `at` is
        // 8-byte aligned; 3. no thread runs on this stack yet.
        unsafe { (at as *mut TrapFrame).write(frame) };
        at
    }
}

/// Pages unmapped per TLB shootdown when a stack is freed.
const UNMAP_BATCH: usize = 32;

impl Drop for KernelStack {
    fn drop(&mut self) {
        // Unmap a batch, shoot it down on every CPU, only then free its
        // frames: another CPU's stale entry must not reach a reused frame.
        let mut page = 0;
        while page < self.pages {
            let mut batch = [None; UNMAP_BATCH];
            let mut shootdown = None;
            for slot in batch.iter_mut() {
                if page == self.pages {
                    break;
                }
                let virt = self.top() - (page + 1) * PAGE_SIZE;
                page += 1;
                match unmap_page(virt) {
                    Ok((frame, flush)) => {
                        *slot = Some(frame);
                        shootdown = Some(flush);
                    }
                    Err(e) => {
                        crate::log!("stack slot {}: cannot unmap {virt:#x}: {e:?}", self.slot)
                    }
                }
            }
            if let Some(flush) = shootdown {
                flush.flush_everywhere();
            }
            for frame in batch.into_iter().flatten() {
                if let Err(e) = frames::free(frame) {
                    crate::log!("stack slot {}: {e}", self.slot);
                }
            }
        }
        USED.fetch_and(!(1 << self.slot), Ordering::AcqRel);
    }
}

/// Copies `frame`, taken on an interrupt stack (the trap path), onto the interrupted
/// context's own stack just below its saved RSP, so the context can be
/// switched away from and resumed later through the copy (the interrupt
/// stack is reused by the next trap). Returns the copy's address, or `None`
/// if the page below RSP is not mapped RAM.
///
/// The copy is placed inside one page, 16-byte aligned, 128 bytes below
/// RSP; resuming it restores RSP, so the space is given back.
pub fn move_below_rsp(frame: &TrapFrame) -> Option<u64> {
    let size = size_of::<TrapFrame>() as u64;
    let mut at = (frame.rsp.checked_sub(128 + size)?) & !15;
    if at / PAGE_SIZE != (at + size - 1) / PAGE_SIZE {
        at = ((at + size - 1) / PAGE_SIZE * PAGE_SIZE - size) & !15;
    }
    let phys = super::dma::translate(at)?;
    let through = super::snapmem::engine_virt(phys);
    // SAFETY: 1. `at` is below the interrupted RSP, in memory the
    // interrupted code does not use (this target has no red zone), and on a
    // mapped page (translated above), so the write clobbers nothing live;
    // 2. the write goes through the engine window, which maps all RAM
    // writable and is never protected, to the same physical bytes the
    // trap path will read back through `at`; 3. the copy lies inside one
    // page and is aligned for `TrapFrame`.
    unsafe { (through as *mut TrapFrame).write(*frame) };
    Some(at)
}
