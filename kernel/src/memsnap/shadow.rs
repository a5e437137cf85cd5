//! The shadow physical map: how the snapshot write-protects its range
//! without a pause that grows with RAM.
//!
//! Before the pause, while the workload still runs, [`ShadowPhysmap::build`]
//! makes a copy of the physical map's lower levels in 4 KiB pages, with
//! every range frame read-only. The pause swaps the physical map's PDPT
//! entries (one per GiB) to point at the shadow and flushes the TLB:
//! constant work. A fault then flips one PTE. The shadow stays live after
//! completion so the CPU's dirty bits tell restore which pages were written
//! since the instant.
//!
//! The one file of `memsnap` allowed `unsafe`: it edits live page tables
//! and rolls range frames back, through the primitives of
//! [`crate::memory::snapmem`]. It must never decide which frames are in the
//! range (the [`RangeIndex`] says) nor write anything but page-table
//! entries it owns, the physical map's PDPT entries, and, on restore,
//! frames the caller has quiesced.

use alloc::vec::Vec;

use snapshot::memsnap::reserve::{FRAMES_PER_GIB, FRAMES_PER_REGION};
use snapshot::memsnap::RangeIndex;
use x86_64::VirtAddr;

use crate::memory::snapmem::{
    copy_frame, physmap_pdpt, read_entry, set_entry_bits, write_entry, Buffer, FrameSet, ACCESSED,
    ADDR_MASK, DIRTY, HUGE, PRESENT, WRITABLE,
};
use crate::memory::{paging, PAGE_SIZE, PHYS_OFFSET};

/// The shadow of the physical map's lower levels (see the module docs).
#[derive(Debug)]
pub struct ShadowPhysmap {
    /// The shadow PDs, one per GiB holding range frames; owned so they are
    /// freed with the shadow.
    _pds: FrameSet,
    /// The shadow PTs, one per 2 MiB region holding range frames, in
    /// region order, contiguous.
    pts: Buffer,
    /// For each 2 MiB region up to the last range frame's, its PT's page in
    /// `pts`, or [`NO_PT`]: one read on the fault path finds a PTE.
    region_pt: Vec<u32>,
    /// (GiB index, shadow PD, original PDPT entry) for each shadowed GiB.
    gibs: Vec<(u64, u64, u64)>,
}

/// A region without a shadow PT (no range frame in it).
const NO_PT: u32 = u32::MAX;

impl ShadowPhysmap {
    /// Builds the shadow for `index` in `pds` (one frame per GiB holding
    /// range frames) and `pts` (one page per 2 MiB region holding range
    /// frames); see [`snapshot::memsnap::reserve`]. Nothing is live yet.
    pub fn build(index: &RangeIndex, pds: FrameSet, pts: Buffer) -> Result<Self, &'static str> {
        const TOO_SMALL: &str = "not enough shadow page-table memory";
        let pdpt = physmap_pdpt();
        let frames = index.frames().min(paging::physmap_end() / PAGE_SIZE);
        let holds = |first: u64, len: u64| index.next_from(first).is_some_and(|f| f < first + len);
        let mut region_pt = Vec::new();
        let mut used = 0;
        let mut gibs = Vec::new();
        for gib in 0..frames.div_ceil(FRAMES_PER_GIB) {
            let original = read_entry(pdpt, gib);
            if original & PRESENT == 0
                || original & HUGE != 0
                || !holds(gib * FRAMES_PER_GIB, FRAMES_PER_GIB)
            {
                continue;
            }
            if gibs.len() as u64 >= pds.len() {
                return Err(TOO_SMALL);
            }
            let pd = pds.get(gibs.len() as u64) * PAGE_SIZE;
            for slot in 0..512 {
                let region = gib * 512 + slot;
                let entry = if holds(region * FRAMES_PER_REGION, FRAMES_PER_REGION) {
                    if used >= pts.pages() {
                        return Err(TOO_SMALL);
                    }
                    region_pt.resize(region as usize, NO_PT);
                    region_pt.push(used as u32);
                    let pt = pts.phys() + used * PAGE_SIZE;
                    used += 1;
                    fill_shadow_pt(index, pt, region);
                    pt | PRESENT | WRITABLE
                } else {
                    read_entry(original & ADDR_MASK, slot)
                };
                // SAFETY: `pd` is a frame of `pds`, not yet live.
                unsafe { write_entry(pd, slot, entry) };
            }
            gibs.push((gib, pd, original));
        }
        Ok(ShadowPhysmap {
            _pds: pds,
            pts,
            region_pt,
            gibs,
        })
    }

    /// Points the physical map at the shadow: range frames become
    /// read-only. Constant work: one entry per GiB, then a TLB flush.
    ///
    /// Writes nothing but the PDPT: this runs in the pause, after the
    /// verification reference, and the shadow itself lives in the heap,
    /// which is read-only through the physical map once the swap is done.
    pub fn activate(&self) {
        let pdpt = physmap_pdpt();
        for &(gib, pd, original) in &self.gibs {
            // SAFETY: the shadow PD maps every frame of this GiB at the same
            // address as the original, with equal or fewer permissions.
            unsafe { write_entry(pdpt, gib, pd | (original & !ADDR_MASK & !HUGE)) };
        }
        x86_64::instructions::tlb::flush_all();
    }

    /// Points the physical map back at the original tables. Harmless when
    /// the shadow is not active: each entry gets the value it holds.
    pub fn deactivate(&self) {
        let pdpt = physmap_pdpt();
        for &(gib, _, original) in &self.gibs {
            // SAFETY: restores the entry the boot code or `map_high_ram` made.
            unsafe { write_entry(pdpt, gib, original) };
        }
        x86_64::instructions::tlb::flush_all();
    }

    /// The shadow PT and index of `frame`. Only range frames are ever
    /// asked for, and their regions are always shadowed.
    fn pte(&self, frame: u64) -> Option<(u64, u64)> {
        let pt = *self.region_pt.get((frame / FRAMES_PER_REGION) as usize)?;
        (pt != NO_PT).then(|| {
            (
                self.pts.phys() + u64::from(pt) * PAGE_SIZE,
                frame % FRAMES_PER_REGION,
            )
        })
    }

    /// Lets writes to `frame` through the physical map again.
    ///
    /// No TLB flush: the change only adds write permission. A read-only
    /// entry still cached can at worst cause one spurious write fault, which
    /// the engine counts as a rewrite and answers by calling this again; and
    /// the CPU drops the entry of the faulting address itself when it raises
    /// the fault (Intel SDM vol. 3, 4.10.4.3). Flushing here would cost more
    /// than the copy under emulation.
    pub fn set_writable(&self, frame: u64) {
        if let Some((pt, i)) = self.pte(frame) {
            // Atomic: another CPU may be setting this entry's dirty bit
            // right now (it made the page writable a moment ago and writes
            // it, while this CPU answers a spurious fault through a stale
            // read-only entry); restore relies on that bit.
            // SAFETY: a shadow PTE; adding write permission keeps its frame.
            unsafe { set_entry_bits(pt, i, WRITABLE) };
        }
    }

    /// Whether `frame` was written through the physical map since the
    /// instant; clears the CPU's dirty bit so later writes show again.
    fn take_dirty(&self, frame: u64) -> bool {
        let Some((pt, i)) = self.pte(frame) else {
            return false;
        };
        let entry = read_entry(pt, i);
        if entry & DIRTY == 0 {
            return false;
        }
        // SAFETY: a shadow PTE; clearing the dirty bit keeps its mapping.
        unsafe { write_entry(pt, i, entry & !DIRTY) };
        x86_64::instructions::tlb::flush(VirtAddr::new(PHYS_OFFSET + frame * PAGE_SIZE));
        true
    }

    /// Restore: if range frame `frame` was written since the instant (its
    /// dirty bit, which this clears), copies `saved`, the engine frame
    /// holding its copy, back over it. Returns whether it copied.
    ///
    /// The caller keeps everything else off `frame` meanwhile (restore's
    /// contract); interrupts are off for the copy.
    pub fn roll_back(&self, frame: u64, saved: u64) -> bool {
        if !self.take_dirty(frame) {
            return false;
        }
        let _irq = crate::sync::IrqOff::new();
        // SAFETY: 1. `frame` is a range frame the caller has quiesced, so
        // overwriting it breaks no one's data; `saved` is engine storage;
        // 2. interrupts are off (the guard above).
        unsafe { copy_frame(frame * PAGE_SIZE, saved * PAGE_SIZE) };
        true
    }
}

/// Fills the shadow PT at `pt` for 2 MiB region `region`: every frame
/// mapped as in the physical map, range frames read-only.
fn fill_shadow_pt(index: &RangeIndex, pt: u64, region: u64) {
    for i in 0..FRAMES_PER_REGION {
        let frame = region * FRAMES_PER_REGION + i;
        let write = if index.contains(frame) { 0 } else { WRITABLE };
        // SAFETY: `pt` is a page of the shadow's PT buffer, owned by the
        // caller and not yet referenced by any live table.
        unsafe { write_entry(pt, i, (frame * PAGE_SIZE) | PRESENT | ACCESSED | write) };
    }
}

impl Drop for ShadowPhysmap {
    /// The shadow's tables are freed with it, so the physical map must not
    /// point at them any more.
    fn drop(&mut self) {
        self.deactivate();
    }
}
