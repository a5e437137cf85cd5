//! The live snapshot's memory primitives, the only place its unsafe
//! memory access lives besides the shadow map's table edits
//! (`memsnap::shadow`): the engine's private window onto physical memory,
//! the page-copy routine, memory the engine owns (single frames, contiguous
//! buffers, the pause's stack, the disk store's staging pages), raw
//! page-table entries, and the page-table walk that finds the eager set.
//!
//! The engine writes only through [`ENGINE_OFFSET`], a second mapping of
//! all memory that the snapshot never protects, so it never faults on
//! itself. Everything here that writes memory writes frames the engine owns
//! (its storage, its tables, its buffers) or page-table entries.
//!
//! Must never hold snapshot policy (which frames, when, by whom): that is
//! `memsnap`'s, which uses these primitives through safe APIs.

use alloc::vec::Vec;
use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, AtomicU8};

use snapshot::memsnap::staging::{Claimant, Staging};
use x86_64::structures::paging::{
    Mapper, Page, PageSize, PageTableFlags, PhysFrame, Size1GiB, Size2MiB,
};
use x86_64::{PhysAddr, VirtAddr};

use super::frames::{self, KernelFrames};
use super::{paging, PAGE_SIZE, PHYS_OFFSET};

/// The engine's window: all physical memory, writable, never protected.
pub const ENGINE_OFFSET: u64 = 0xffff_8800_0000_0000;
/// The physical-address bits of a page-table entry.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Page-table entry bits.
pub const PRESENT: u64 = 1;
/// Writes allowed.
pub const WRITABLE: u64 = 1 << 1;
/// Set by the CPU on access.
pub const ACCESSED: u64 = 1 << 5;
/// Set by the CPU on a write.
pub const DIRTY: u64 = 1 << 6;
/// A large page (in a PD or PDPT entry).
pub const HUGE: u64 = 1 << 7;

/// The engine-window address of physical `phys`.
pub fn engine_virt(phys: u64) -> u64 {
    ENGINE_OFFSET + phys
}

/// Maps all of the physical map at [`ENGINE_OFFSET`], writable, in 1 GiB
/// pages where the CPU has them and 2 MiB pages otherwise. Called at boot.
pub fn init_engine_window() {
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
    let end = paging::physmap_end();
    let gib = crate::arch::cpu::has_1gib_pages();
    let step = if gib { Size1GiB::SIZE } else { Size2MiB::SIZE };
    for phys in (0..end).step_by(step as usize) {
        let result = if gib {
            map_window_page::<Size1GiB>(phys, flags)
        } else {
            map_window_page::<Size2MiB>(phys, flags)
        };
        if let Err(e) = result {
            panic!("cannot map the engine window at {phys:#x}: {e}");
        }
    }
}

/// Maps the engine-window page of size `S` that covers physical `phys`.
fn map_window_page<S: PageSize + core::fmt::Debug>(
    phys: u64,
    flags: PageTableFlags,
) -> Result<(), alloc::string::String>
where
    for<'a> x86_64::structures::paging::OffsetPageTable<'a>: Mapper<S>,
{
    let page = Page::<S>::containing_address(VirtAddr::new(engine_virt(phys)));
    let frame = PhysFrame::<S>::containing_address(PhysAddr::new(phys));
    // SAFETY: 1. the engine window is used by nothing else, so the page is
    // unmapped; 2. it maps physical memory at a fixed offset, like the
    // physical map, with the same (write-back) caching.
    paging::with_mapper(|m| unsafe { m.map_to(page, frame, flags, &mut KernelFrames) })
        .map(|flush| flush.flush())
        .map_err(|e| alloc::format!("{e:?}"))
}

global_asm!(
    r#"
    .section .text
    .global copy_page_sse
/* copy_page_sse(dst, src): 4 KiB, both 16-byte aligned, 128 bytes a round
   through xmm0-xmm7. The kernel is built without SSE, so no Rust code holds
   values in these registers; callers keep interrupts off so no other copy
   on the same CPU can run in between and find them changed (each CPU has
   its own registers). */
copy_page_sse:
    movl $32, %ecx
1:  movdqa 0(%rsi), %xmm0
    movdqa 16(%rsi), %xmm1
    movdqa 32(%rsi), %xmm2
    movdqa 48(%rsi), %xmm3
    movdqa 64(%rsi), %xmm4
    movdqa 80(%rsi), %xmm5
    movdqa 96(%rsi), %xmm6
    movdqa 112(%rsi), %xmm7
    movdqa %xmm0, 0(%rdi)
    movdqa %xmm1, 16(%rdi)
    movdqa %xmm2, 32(%rdi)
    movdqa %xmm3, 48(%rdi)
    movdqa %xmm4, 64(%rdi)
    movdqa %xmm5, 80(%rdi)
    movdqa %xmm6, 96(%rdi)
    movdqa %xmm7, 112(%rdi)
    addq $128, %rsi
    addq $128, %rdi
    decl %ecx
    jnz 1b
    ret
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    fn copy_page_sse(dst: u64, src: u64);
}

/// Copies physical frame `src` over physical frame `dst` through the
/// engine window.
///
/// # Safety
///
/// 1. `dst` is a frame the caller owns (engine storage, or a range frame
///    being restored while nothing else uses it);
/// 2. interrupts are off (the copy uses xmm registers no context switch saves).
pub unsafe fn copy_frame(dst: u64, src: u64) {
    debug_assert!(!x86_64::instructions::interrupts::are_enabled());
    // SAFETY: both are whole, 4 KiB-aligned frames of RAM inside the engine
    // window; the caller owns `dst` and keeps interrupts off (contract).
    unsafe { copy_page_sse(engine_virt(dst), engine_virt(src)) };
}

/// Hashes physical frame `phys` (see [`snapshot::memsnap::page_hash`]).
pub fn hash_frame(phys: u64) -> u64 {
    let mut words = [0u64; 512];
    super::read_phys(phys, bytemuck_words(&mut words));
    snapshot::memsnap::page_hash(&words)
}

fn bytemuck_words(words: &mut [u64; 512]) -> &mut [u8] {
    // SAFETY: u64 has no padding and every byte pattern is a valid u8; the
    // slice covers exactly the array's 4096 bytes and borrows it mutably.
    unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), 4096) }
}

/// Single frames the engine owns (storage slots, shadow tables), freed on
/// drop.
#[derive(Debug, Default)]
pub struct FrameSet {
    frames: Vec<u32>,
}

impl FrameSet {
    /// Allocates `count` frames, or none at all.
    pub fn alloc(count: u64) -> Option<Self> {
        let mut set = FrameSet {
            frames: Vec::with_capacity(count as usize),
        };
        for _ in 0..count {
            let frame = frames::alloc()?;
            set.frames
                .push((frame.start_address().as_u64() / PAGE_SIZE) as u32);
        }
        Some(set)
    }

    /// Adds one frame; returns its number, or `None` if memory is out.
    pub fn grow(&mut self) -> Option<u64> {
        let frame = frames::alloc()?.start_address().as_u64() / PAGE_SIZE;
        self.frames.push(frame as u32);
        Some(frame)
    }

    /// Frame numbers.
    pub fn frames(&self) -> impl Iterator<Item = u64> + '_ {
        self.frames.iter().map(|&f| u64::from(f))
    }

    /// The `i`th frame number.
    pub fn get(&self, i: u64) -> u64 {
        u64::from(self.frames[i as usize])
    }

    /// How many.
    pub fn len(&self) -> u64 {
        self.frames.len() as u64
    }

    /// Copies physical frame `frame` into this set's `i`th frame.
    ///
    /// Panics unless interrupts are off: the copy uses xmm registers that
    /// no context switch saves (each CPU has its own). No one else writes
    /// the destination meanwhile, on any CPU: the snapshot's copy paths
    /// write slot `i` only while holding its copy-once claim, which one
    /// caller at a time holds; the source stays write-protected until that
    /// claim is finished (every CPU flushed its TLB to the protection when
    /// the pause released it).
    pub fn copy_in(&self, i: u64, frame: u64) {
        assert!(!x86_64::instructions::interrupts::are_enabled());
        // SAFETY: 1. the destination is a frame this set owns (`get`
        // panics outside it); 2. interrupts are off (asserted).
        unsafe { copy_frame(self.get(i) * PAGE_SIZE, frame * PAGE_SIZE) };
    }
}

impl Drop for FrameSet {
    fn drop(&mut self) {
        for &f in &self.frames {
            let frame = PhysFrame::containing_address(PhysAddr::new(u64::from(f) * PAGE_SIZE));
            if let Err(e) = frames::free(frame) {
                crate::log!("snapshot frames: {e}");
            }
        }
    }
}

/// Physically contiguous memory the engine owns, seen through the engine
/// window (so the fault path can write it without faulting). Zeroed.
#[derive(Debug)]
pub struct Buffer {
    phys: u64,
    frames: u64,
}

impl Buffer {
    /// At least `bytes` bytes, zeroed, or `None` if no such run is free.
    pub fn alloc(bytes: u64) -> Option<Self> {
        let buffer = Self::alloc_uninit(bytes)?;
        // SAFETY: the run was just allocated for this buffer alone and lies
        // inside the engine window.
        unsafe {
            core::ptr::write_bytes(engine_virt(buffer.phys) as *mut u8, 0, buffer.len_bytes())
        };
        Some(buffer)
    }

    /// Like [`Self::alloc`], contents left as they were (for storage, which
    /// is written before it is read).
    pub fn alloc_uninit(bytes: u64) -> Option<Self> {
        let frames = bytes.div_ceil(PAGE_SIZE).max(1);
        let phys = frames::alloc_contiguous(frames, 1)?;
        Some(Buffer { phys, frames })
    }

    /// Its frames.
    pub fn frames(&self) -> core::ops::Range<u64> {
        self.phys / PAGE_SIZE..self.phys / PAGE_SIZE + self.frames
    }

    /// Its first frame's physical address.
    pub fn phys(&self) -> u64 {
        self.phys
    }

    /// Its length in pages.
    pub fn pages(&self) -> u64 {
        self.frames
    }

    /// Copies physical frame `frame` into this buffer's page `page`.
    ///
    /// Panics unless interrupts are off (see [`FrameSet::copy_in`]) or if
    /// `page` is outside the buffer.
    pub fn copy_in(&self, page: u64, frame: u64) {
        assert!(page < self.frames && !x86_64::instructions::interrupts::are_enabled());
        // SAFETY: 1. the destination is a page of this buffer (checked);
        // 2. interrupts are off (checked).
        unsafe { copy_frame(self.phys + page * PAGE_SIZE, frame * PAGE_SIZE) };
    }

    fn len_bytes(&self) -> usize {
        (self.frames * PAGE_SIZE) as usize
    }

    /// The buffer as atomic words.
    pub fn atomics(&self) -> &[AtomicU64] {
        // SAFETY: 1. the memory is owned by this buffer and mapped in the
        // engine window for its whole life; 2. atomics may be shared, and
        // every access to this memory goes through this view or `bytes`.
        unsafe {
            core::slice::from_raw_parts(
                engine_virt(self.phys) as *const AtomicU64,
                self.len_bytes() / 8,
            )
        }
    }

    /// The buffer as atomic bytes.
    pub fn bytes(&self) -> &[AtomicU8] {
        // SAFETY: as for `atomics`.
        unsafe {
            core::slice::from_raw_parts(engine_virt(self.phys) as *const AtomicU8, self.len_bytes())
        }
    }
}

/// A stack outside the snapshot range, for the pause (see
/// [`crate::arch::cpu::on_stack`]): an engine buffer seen through the
/// engine window.
#[derive(Debug)]
pub struct EngineStack(Buffer);

impl EngineStack {
    /// A stack of `bytes`.
    pub fn alloc(bytes: u64) -> Option<Self> {
        Buffer::alloc(bytes).map(EngineStack)
    }

    /// Its frames (to exclude from the range).
    pub fn frames(&self) -> core::ops::Range<u64> {
        self.0.frames()
    }

    /// Runs `f` on this stack with interrupts off.
    pub fn run(&mut self, f: impl FnMut()) {
        let top = engine_virt(self.0.phys) + self.0.len_bytes() as u64;
        // SAFETY: the stack is this value's own memory, exclusively borrowed
        // for the call, 4 KiB-aligned at the top, and mapped writable in the
        // engine window, where nothing else writes.
        unsafe { crate::arch::cpu::on_stack(top, f) };
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        for frame in self.frames() {
            let frame = PhysFrame::containing_address(PhysAddr::new(frame * PAGE_SIZE));
            if let Err(e) = frames::free(frame) {
                crate::log!("snapshot buffer: {e}");
            }
        }
    }
}

impl AsRef<[AtomicU64]> for Buffer {
    fn as_ref(&self) -> &[AtomicU64] {
        self.atomics()
    }
}

/// Reads entry `index` of the page table at physical `table_phys`.
pub fn read_entry(table_phys: u64, index: u64) -> u64 {
    debug_assert!(table_phys + index * 8 < paging::physmap_end());
    let entry = engine_virt(table_phys + index * 8) as *const u64;
    // SAFETY: page tables are RAM inside the engine window (the callers pass
    // frames read from CR3 or from other entries); reading has no effect.
    unsafe { entry.read_volatile() }
}

/// Writes one page-table entry through the engine window.
///
/// # Safety
///
/// `table_phys` is a page table the caller owns (a shadow table) or the
/// physical map's PDPT, and `value` keeps every mapping the kernel relies on
/// (the physical map's frames at their offsets).
pub unsafe fn write_entry(table_phys: u64, index: u64, value: u64) {
    let entry = engine_virt(table_phys + index * 8) as *mut u64;
    // SAFETY: the entry lies in a page table inside the engine window; the
    // caller guarantees the new value maps what the kernel expects.
    unsafe { entry.write_volatile(value) };
}

/// Sets `bits` in one page-table entry through the engine window, in one
/// locked read-modify-write: a CPU may set the entry's accessed or dirty
/// bit at the same moment (on another CPU, through a stale TLB entry), and
/// a plain read-then-write would drop it.
///
/// # Safety
///
/// As for [`write_entry`]: the entry is in a table the caller owns, and
/// the bits added keep every mapping the kernel relies on.
pub unsafe fn set_entry_bits(table_phys: u64, index: u64, bits: u64) {
    let entry = engine_virt(table_phys + index * 8) as *const AtomicU64;
    // SAFETY: 1. the entry lies in a page table inside the engine window,
    // 8-byte aligned, and an `AtomicU64` has the layout of a `u64`; 2. the
    // MMU updates entries with locked operations too, so this atomic never
    // races a plain access; 3. the caller guarantees the new bits are sound.
    unsafe { (*entry).fetch_or(bits, core::sync::atomic::Ordering::AcqRel) };
}

/// The physical map's PDPT (PML4 entry 256).
pub fn physmap_pdpt() -> u64 {
    let pml4 = crate::arch::cpu::cr3();
    read_entry(pml4, (PHYS_OFFSET >> 39) & 511) & ADDR_MASK
}

/// Calls `eager` for every frame the snapshot must copy at the instant
/// because it cannot be write-protected or the machinery writes it: every
/// page-table frame, every frame mapped writable outside the physical map
/// and the engine window (thread stacks, scratch pages), and the kernel
/// image. Work is proportional to the page tables, not to RAM, as long as
/// the physical map uses large pages.
pub fn walk_eager(mut eager: impl FnMut(u64)) {
    let kernel = super::kernel_image();
    for frame in kernel.start / PAGE_SIZE..kernel.end.div_ceil(PAGE_SIZE) {
        eager(frame);
    }
    let pml4 = crate::arch::cpu::cr3();
    eager(pml4 / PAGE_SIZE);
    let skip_leaves = [(PHYS_OFFSET >> 39) & 511, (ENGINE_OFFSET >> 39) & 511, 0];
    for i4 in 0..512 {
        let e4 = read_entry(pml4, i4);
        if e4 & PRESENT == 0 {
            continue;
        }
        let leaves = !skip_leaves.contains(&i4);
        walk_table(e4 & ADDR_MASK, 3, leaves, &mut eager);
    }
}

fn walk_table(table: u64, level: u32, leaves: bool, eager: &mut impl FnMut(u64)) {
    eager(table / PAGE_SIZE);
    for i in 0..512 {
        let entry = read_entry(table, i);
        if entry & PRESENT == 0 {
            continue;
        }
        let target = entry & ADDR_MASK;
        let is_leaf = level == 1 || entry & HUGE != 0;
        if !is_leaf {
            walk_table(target, level - 1, leaves, eager);
        } else if leaves && entry & WRITABLE != 0 {
            let pages = 1u64 << (9 * (level - 1));
            for frame in target / PAGE_SIZE..target / PAGE_SIZE + pages {
                eager(frame);
            }
        }
    }
}

/// A fake device for tests: writes `value` into `frame` at `offset` the way
/// DMA does, behind the CPU's page protection (through the engine window).
pub fn device_write(frame: &mut super::frames::OwnedFrame, offset: u64, value: u64) {
    assert!(
        offset.is_multiple_of(8) && offset < PAGE_SIZE,
        "offset outside the frame"
    );
    let at = engine_virt(frame.phys() + offset) as *mut u64;
    // SAFETY: the frame is owned by the caller (exclusively borrowed), RAM
    // inside the engine window, and `offset` keeps the write inside it.
    unsafe { at.write_volatile(value) };
}

/// The RAM staging area of a snapshot to disk: page buffers in engine
/// memory between the copiers and the disk writer, with their states in a
/// [`Staging`] ring. Safe to share: a buffer's bytes are written only by
/// whoever claimed it ([`Self::stage`], interrupts off) and read only
/// through the [`Taken`] token the writer holds until [`Self::release`].
#[derive(Debug)]
pub struct StagingArea {
    pages: Buffer,
    state: Staging<Buffer>,
}

/// A staged buffer the writer has taken: its bytes stay stable until the
/// token is released.
#[derive(Debug)]
pub struct Taken {
    buffer: usize,
    /// The snapshot slot whose page it holds.
    pub slot: u64,
}

impl StagingArea {
    /// `buffers` pages, `reserve` of them kept for copiers that cannot wait.
    pub fn alloc(buffers: usize, reserve: usize) -> Option<Self> {
        let words = Staging::<Buffer>::words_for(buffers) as u64;
        Some(StagingArea {
            pages: Buffer::alloc(buffers as u64 * PAGE_SIZE)?,
            // The states are engine memory too: the fault path writes them.
            state: Staging::new(Buffer::alloc(words * 8)?, buffers, reserve),
        })
    }

    /// Its frames (engine memory, outside the snapshot range).
    pub fn frames(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages.frames().chain(self.state.storage().frames())
    }

    /// Staging pages.
    pub fn len(&self) -> usize {
        self.state.len()
    }

    /// Buffers a copier that may wait can claim now (the reserve excluded).
    pub fn room(&self) -> usize {
        self.state.free().saturating_sub(self.state.reserve())
    }

    /// Buffers staged, being filled or being written.
    pub fn in_use(&self) -> usize {
        self.state.len() - self.state.free()
    }

    /// Copies range frame `frame` into a free buffer for `slot`, from the
    /// reserve if nothing else is left; false if every buffer is in use.
    /// Interrupts must be off.
    pub fn stage(&self, frame: u64, slot: u64) -> bool {
        let Some(buffer) = self
            .state
            .claim(Claimant::MayWait)
            .or_else(|| self.state.claim(Claimant::MustNotWait))
        else {
            return false;
        };
        // The claim made this call the buffer's only user until `publish`.
        self.pages.copy_in(buffer as u64, frame);
        self.state.publish(buffer, slot);
        true
    }

    /// Moves up to `max` staged buffers to the writer, sorted by slot.
    pub fn take(&self, max: usize, out: &mut Vec<Taken>, scratch: &mut Vec<(usize, u64)>) {
        scratch.clear();
        self.state.take(max, scratch);
        out.extend(scratch.iter().map(|&(buffer, slot)| Taken { buffer, slot }));
        out.sort_unstable_by_key(|t| t.slot);
    }

    /// The page a taken buffer holds.
    pub fn page<'a>(&'a self, taken: &'a Taken) -> &'a [u8] {
        let virt = engine_virt(self.pages.phys + taken.buffer as u64 * PAGE_SIZE);
        // SAFETY: 1. the page belongs to this area's buffer and stays mapped
        // in the engine window while `self` lives; 2. `taken` proves the
        // buffer is in the writing state, in which nobody writes it, and it
        // leaves that state only through `release`, which consumes `taken`,
        // so the borrow ends first.
        unsafe { core::slice::from_raw_parts(virt as *const u8, PAGE_SIZE as usize) }
    }

    /// Frees a written buffer.
    pub fn release(&self, taken: Taken) {
        self.state.release(taken.buffer);
    }

    /// The hash of `slot`'s staged copy, if it is staged (for the pause,
    /// when the writer cannot run).
    pub fn staged_hash(&self, slot: u64) -> Option<u64> {
        let buffer = self.state.find(slot)?;
        Some(hash_frame(self.pages.phys + buffer as u64 * PAGE_SIZE))
    }
}
