//! Device registers mapped uncached in their own window, read and written
//! only through volatile accesses.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use volatile::VolatilePtr;
use x86_64::structures::paging::PageTableFlags;

use super::paging::{map_page, MapError};
use super::PAGE_SIZE;

/// Start of the MMIO window.
pub const MMIO_BASE: u64 = 0xffff_a000_0000_0000;
const MMIO_WINDOW: u64 = 1 << 39;

static NEXT: AtomicU64 = AtomicU64::new(MMIO_BASE);

/// A mapped register block.
#[derive(Debug)]
pub struct Mmio {
    base: u64,
    len: usize,
}

impl Mmio {
    /// Maps `len` bytes of device memory at physical `phys`, uncached.
    pub fn map(phys: u64, len: usize) -> Result<Mmio, MapError> {
        let offset = phys % PAGE_SIZE;
        let pages = (offset + len as u64).div_ceil(PAGE_SIZE);
        let virt = NEXT.fetch_add(pages * PAGE_SIZE, Ordering::Relaxed);
        assert!(
            virt + pages * PAGE_SIZE <= MMIO_BASE + MMIO_WINDOW,
            "MMIO window exhausted"
        );
        let flags = PageTableFlags::PRESENT
            | PageTableFlags::WRITABLE
            | PageTableFlags::NO_CACHE
            | PageTableFlags::WRITE_THROUGH
            | PageTableFlags::NO_EXECUTE;
        for page in 0..pages {
            map_page(
                virt + page * PAGE_SIZE,
                phys - offset + page * PAGE_SIZE,
                flags,
            )?;
        }
        Ok(Mmio {
            base: virt + offset,
            len,
        })
    }

    /// Length of the block in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    fn register<T>(&self, offset: usize) -> VolatilePtr<'_, T> {
        assert!(
            offset.is_multiple_of(align_of::<T>()) && offset + size_of::<T>() <= self.len,
            "register offset {offset:#x} outside the {}-byte block",
            self.len
        );
        let ptr =
            NonNull::new((self.base + offset as u64) as *mut T).expect("MMIO base is not null");
        // SAFETY: 1. the register lies inside this block (checked above),
        // which stays mapped for the life of `self`; 2. it is aligned for T;
        // 3. device registers are only ever accessed through volatile
        // operations, never as Rust references.
        unsafe { VolatilePtr::new(ptr) }
    }

    /// Reads the 8-bit register at `offset`.
    pub fn read8(&self, offset: usize) -> u8 {
        self.register::<u8>(offset).read()
    }

    /// Reads the 16-bit register at `offset`.
    pub fn read16(&self, offset: usize) -> u16 {
        self.register::<u16>(offset).read()
    }

    /// Writes the 8-bit register at `offset`.
    pub fn write8(&self, offset: usize, value: u8) {
        self.register::<u8>(offset).write(value)
    }

    /// Writes the 16-bit register at `offset`.
    pub fn write16(&self, offset: usize, value: u16) {
        self.register::<u16>(offset).write(value)
    }

    /// Reads the 32-bit register at `offset`.
    pub fn read32(&self, offset: usize) -> u32 {
        self.register::<u32>(offset).read()
    }

    /// Writes the 32-bit register at `offset`.
    pub fn write32(&self, offset: usize, value: u32) {
        self.register::<u32>(offset).write(value)
    }
}
