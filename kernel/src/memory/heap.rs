//! The kernel heap: `linked_list_allocator` over contiguous frames, reached
//! through the physical map, behind an interrupt-safe lock (so an interrupt
//! handler that allocates cannot deadlock against the thread it interrupted).

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{null_mut, NonNull};
use core::sync::atomic::{AtomicUsize, Ordering};

use linked_list_allocator::Heap;

use super::{frames, phys_to_virt, PAGE_SIZE};
use crate::sync::IrqMutex;

/// The global allocator.
pub struct KernelHeap(IrqMutex<Heap>);

impl core::fmt::Debug for KernelHeap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("KernelHeap")
    }
}

#[global_allocator]
static HEAP: KernelHeap = KernelHeap(IrqMutex::new(Heap::empty()));

/// The most heap bytes in use at once since [`reset_peak`].
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: allocation and deallocation are delegated to `linked_list_allocator`
// under a lock, which returns blocks that fit the layout and do not overlap.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let layout = placed(layout);
        let mut heap = self.0.lock();
        let ptr = heap
            .allocate_first_fit(layout)
            .map_or(null_mut(), NonNull::as_ptr);
        PEAK.fetch_max(heap.used(), Ordering::Relaxed);
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(ptr) = NonNull::new(ptr) {
            // SAFETY: the GlobalAlloc contract: `ptr` came from `alloc` on
            // this allocator with the same layout.
            unsafe { self.0.lock().deallocate(ptr, placed(layout)) };
        }
    }
}

/// Blocks of at least this many bytes start on a page.
pub const PAGE_ALIGNED_FROM: usize = 64 << 10;

/// The layout a block is allocated (and so freed) with: a large block
/// (a transfer window, a table, a cluster) starts on a page, whatever
/// alignment its type asks for. The virtio driver hands the device a
/// buffer page by page; a buffer that starts mid-page gives pieces whose
/// addresses and lengths are not multiples of the host's block, and QEMU
/// then sends the request for a file opened `O_DIRECT` through its thread
/// pool and a bounce buffer instead of io_uring (`raw_co_prw`,
/// `QEMU_AIO_MISALIGNED`). With the medium's 4 KiB blocks, the backup's
/// tape went from 730 to 970 MiB/s to 1,100 to 1,520 MiB/s
/// (docs/results/backup.md). The cost is at most a page of padding per
/// large block, which stays free for small blocks. Alloc and dealloc both
/// go through here, so they agree.
fn placed(layout: Layout) -> Layout {
    if layout.size() >= PAGE_ALIGNED_FROM {
        layout.align_to(PAGE_SIZE as usize).unwrap_or(layout)
    } else {
        layout
    }
}

/// Heap size: a sixteenth of RAM, between 4 and 64 MiB (the host sizes
/// backup jobs against the same figure).
fn heap_size(managed_frames: u64) -> u64 {
    snapshot::backup::guest_heap_bytes(managed_frames * PAGE_SIZE)
}

/// Gives the heap its memory.
pub fn init() {
    let (_, managed) = frames::stats();
    let size = heap_size(managed);
    let start =
        frames::alloc_contiguous(size / PAGE_SIZE, 1).expect("no memory for the kernel heap");
    // SAFETY: 1. [start, start + size) was just allocated for the heap alone
    // and is RAM inside the physical map; 2. `init` runs once, before any
    // allocation.
    unsafe {
        HEAP.0
            .lock()
            .init(phys_to_virt(start) as *mut u8, size as usize)
    };
}

/// `(used, total)` heap bytes.
pub fn stats() -> (usize, usize) {
    let heap = HEAP.0.lock();
    (heap.used(), heap.size())
}

/// The most heap bytes in use at once since the last [`reset_peak`] (or
/// boot): a job's high-water mark.
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new high-water mark at what is in use now.
pub fn reset_peak() {
    let used = HEAP.0.lock().used();
    PEAK.store(used, Ordering::Relaxed);
}
