//! Physical and virtual memory: the physical-memory map, the frame
//! allocator, page tables, the kernel heap, MMIO mappings, thread stacks.
//!
//! Virtual layout (x86_64, 4-level paging):
//!
//! | range | what |
//! |---|---|
//! | `0x20_0000 ..` | kernel image, identity-mapped (2 MiB pages) |
//! | [`PHYS_OFFSET`] `..` | all physical RAM (and the first 4 GiB), so any frame can be read and copied |
//! | [`stacks::STACKS_BASE`] `..` | kernel thread stacks, 4 KiB pages, unmapped guards |
//! | [`mmio::MMIO_BASE`] `..` | device registers, uncached |
//!
//! With `arch`, this is where `unsafe` lives: raw pointers into the
//! physical map and page-table edits. Lock order: page tables, then frames;
//! the heap's lock is a leaf. No lock here may be held across a context
//! switch.

pub mod dma;
pub mod frames;
pub mod heap;
pub mod hooks;
pub mod mmio;
pub mod paging;
pub mod probe;
pub mod snapmem;
pub mod stacks;

use core::ops::Range;

/// Where physical address 0 appears in the kernel's address space.
pub const PHYS_OFFSET: u64 = 0xffff_8000_0000_0000;

/// Bytes in a 4 KiB page.
pub const PAGE_SIZE: u64 = 4096;

/// The kernel image's physical (= virtual) range.
pub fn kernel_image() -> Range<u64> {
    unsafe extern "C" {
        static __kernel_start: u8;
        static __kernel_end: u8;
    }
    (&raw const __kernel_start) as u64..(&raw const __kernel_end) as u64
}

/// The virtual address at which physical address `phys` is mapped.
pub fn phys_to_virt(phys: u64) -> u64 {
    PHYS_OFFSET + phys
}

/// Copies physical memory into `buf` through the physical map.
///
/// Panics if the range is beyond the physical map (a caller bug).
pub fn read_phys(phys: u64, buf: &mut [u8]) {
    assert!(
        phys.checked_add(buf.len() as u64)
            .is_some_and(|end| end <= paging::physmap_end()),
        "read_phys({phys:#x}, {}) beyond the physical map",
        buf.len()
    );
    // SAFETY: 1. the range lies inside the physical map (checked above),
    // which is always mapped readable; 2. `buf` is a distinct, writable Rust
    // buffer; 3. firmware tables and RAM tolerate byte reads.
    unsafe {
        core::ptr::copy_nonoverlapping(
            phys_to_virt(phys) as *const u8,
            buf.as_mut_ptr(),
            buf.len(),
        );
    }
}

/// Reads a little-endian `u64` from physical memory.
pub fn read_phys_u64(phys: u64) -> u64 {
    let mut bytes = [0; 8];
    read_phys(phys, &mut bytes);
    u64::from_le_bytes(bytes)
}

/// Brings up memory management over the usable RAM ranges of the firmware
/// memory map: frame allocator, page tables (extending the physical map
/// past 4 GiB), heap.
pub fn init(ram: impl Iterator<Item = Range<u64>> + Clone) {
    paging::init();
    frames::init(ram.clone(), kernel_image());
    paging::map_high_ram(ram);
    heap::init();
    snapmem::init_engine_window();
}
