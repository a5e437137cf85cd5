//! Page-table edits through the `x86_64` crate's `OffsetPageTable`, and one
//! lock-free read of the live tables for the page-fault handler
//! ([`allows_write_now`]).
//!
//! Every change returns or consumes the crate's `#[must_use]` flush token, so
//! a TLB flush cannot be forgotten; a change that removes a mapping or a
//! permission returns an [`ipi::Shootdown`] too, so the other CPUs' flush
//! cannot be forgotten either. The read never takes the mapper's lock (the
//! faulting code may hold it) and never writes an entry.

use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::structures::paging::mapper::{MapToError, UnmapError};
use x86_64::structures::paging::{
    Mapper, OffsetPageTable, Page, PageSize, PageTable, PageTableFlags, PhysFrame, Size2MiB,
    Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

use super::frames::KernelFrames;
use super::{phys_to_virt, PHYS_OFFSET};
use crate::arch::ipi;
use crate::sync::IrqMutex;

static MAPPER: IrqMutex<Option<OffsetPageTable<'static>>> = IrqMutex::new(None);

/// One past the highest physical address the physical map covers.
static PHYSMAP_END: AtomicU64 = AtomicU64::new(1 << 32);

/// Wraps the boot page tables (built by `arch::boot`).
pub fn init() {
    let pml4 = phys_to_virt(crate::arch::cpu::cr3()) as *mut PageTable;
    // SAFETY: 1. CR3 points at the boot PML4, which the physical map (set up
    // by the boot stub at PHYS_OFFSET) covers; 2. this is the only
    // `OffsetPageTable` ever built, and it lives behind MAPPER's lock, so
    // there is one mutable owner of the page tables.
    let mapper = unsafe { OffsetPageTable::new(&mut *pml4, VirtAddr::new(PHYS_OFFSET)) };
    *MAPPER.lock() = Some(mapper);
}

/// Runs `f` with the page tables locked.
pub(super) fn with_mapper<R>(f: impl FnOnce(&mut OffsetPageTable<'static>) -> R) -> R {
    f(MAPPER
        .lock()
        .as_mut()
        .expect("page tables used before memory::init"))
}

/// One past the highest physical address readable through the physical map.
pub fn physmap_end() -> u64 {
    PHYSMAP_END.load(Ordering::Acquire)
}

/// Adds the RAM of `ram` above 4 GiB to the physical map, in 2 MiB pages.
pub fn map_high_ram(ram: impl Iterator<Item = Range<u64>>) {
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
    let mut end = physmap_end();
    for region in ram.filter(|r| r.end > 1 << 32) {
        let first = region.start.max(1 << 32) & !(Size2MiB::SIZE - 1);
        for phys in (first..region.end).step_by(Size2MiB::SIZE as usize) {
            let frame = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(phys));
            let page = Page::<Size2MiB>::containing_address(VirtAddr::new(phys_to_virt(phys)));
            // SAFETY: 1. the page is in the physical map's window, where
            // nothing else is mapped; 2. it maps RAM to its own offset
            // address, which is what the rest of the kernel expects there.
            let mapped =
                with_mapper(|m| unsafe { m.map_to(page, frame, flags, &mut KernelFrames) });
            match mapped {
                Ok(flush) => flush.flush(),
                Err(MapToError::PageAlreadyMapped(_)) => {}
                Err(e) => panic!("cannot extend the physical map at {phys:#x}: {e:?}"),
            }
        }
        end = end.max(region.end.next_multiple_of(Size2MiB::SIZE));
    }
    PHYSMAP_END.store(end, Ordering::Release);
}

/// Why a mapping failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// Out of frames for the page itself or its tables.
    OutOfFrames,
    /// Something is already mapped there.
    AlreadyMapped(u64),
    /// The address lies inside a huge page.
    HugePage(u64),
}

/// Maps one 4 KiB page of a private kernel region (stacks, MMIO, tests).
///
/// The caller's region must be one that only it maps; mapping a frame
/// twice with different caching would be a bug the type system can't see.
pub fn map_page(virt: u64, phys: u64, flags: PageTableFlags) -> Result<(), MapError> {
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virt));
    let frame = PhysFrame::containing_address(PhysAddr::new(phys));
    // SAFETY: 1. the caller owns the virtual page (its own region, checked
    // by the mapper to be unmapped); 2. the frame is owned by the caller
    // (allocated for it, or device memory it was given).
    let result = with_mapper(|m| unsafe { m.map_to(page, frame, flags, &mut KernelFrames) });
    match result {
        Ok(flush) => {
            flush.flush();
            Ok(())
        }
        Err(MapToError::FrameAllocationFailed) => Err(MapError::OutOfFrames),
        Err(MapToError::PageAlreadyMapped(_)) => Err(MapError::AlreadyMapped(virt)),
        Err(MapToError::ParentEntryHugePage) => Err(MapError::HugePage(virt)),
    }
}

/// Unmaps one 4 KiB page and returns the frame it mapped. The frame may be
/// reused only after the shootdown.
pub fn unmap_page(virt: u64) -> Result<(PhysFrame, ipi::Shootdown), UnmapError> {
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virt));
    let (frame, flush) = with_mapper(|m| m.unmap(page))?;
    flush.flush();
    Ok((frame, ipi::Shootdown::new()))
}

/// Changes the flags of one mapped 4 KiB page; other CPUs see fewer
/// permissions only after the shootdown.
pub fn set_flags(virt: u64, flags: PageTableFlags) -> Result<ipi::Shootdown, MapError> {
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virt));
    // SAFETY: the caller owns the page (see `map_page`); changing its
    // permissions cannot break memory safety of other owners, and a write to
    // a read-only page is a reported fault, not undefined behaviour.
    let result = with_mapper(|m| unsafe { m.update_flags(page, flags) });
    match result {
        Ok(flush) => {
            flush.flush();
            Ok(ipi::Shootdown::new())
        }
        Err(_) => Err(MapError::AlreadyMapped(virt)),
    }
}

/// Whether the page tables this CPU runs on let the kernel write `virt`
/// now: every level present and writable, down to a huge page or a PTE.
/// For the page-fault handler, to tell a write fault raised through a TLB
/// entry older than the tables (see
/// [`snapshot::policy::fault::is_stale_write`]) from a real one. Reads the
/// tables without the mapper's lock: an entry changed meanwhile gives
/// either answer, which a retried write settles. A table outside the
/// physical map (never, unless the tables are corrupt) counts as "no".
pub fn allows_write_now(virt: u64) -> bool {
    use super::snapmem::{read_entry, ADDR_MASK, HUGE, PRESENT, WRITABLE};
    let mut table = crate::arch::cpu::cr3() & ADDR_MASK;
    for level in (0..4u32).rev() {
        if table + super::PAGE_SIZE > physmap_end() {
            return false;
        }
        let entry = read_entry(table, (virt >> (12 + 9 * level)) & 511);
        if entry & (PRESENT | WRITABLE) != PRESENT | WRITABLE {
            return false;
        }
        // A PDPT or PD entry may map a 1 GiB or 2 MiB page itself.
        if level == 0 || (level < 3 && entry & HUGE != 0) {
            return true;
        }
        table = entry & ADDR_MASK;
    }
    false
}
