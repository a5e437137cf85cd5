//! Snapshot storage in RAM: one engine-owned frame per range frame.
//!
//! Must never fault, block or allocate in `save`: the fault path calls it
//! (with interrupts off).

use alloc::boxed::Box;

use crate::memory::snapmem::{hash_frame, Buffer, FrameSet};
use crate::memory::PAGE_SIZE;

/// Storage in RAM: one engine-owned frame per slot, as one contiguous run
/// when memory allows (slot to frame is then arithmetic, which spares the
/// fault path a table lookup) or as single frames.
#[derive(Debug)]
pub struct RamStore {
    slots: Slots,
}

#[derive(Debug)]
enum Slots {
    Run(Buffer),
    Frames(FrameSet),
}

impl RamStore {
    /// Storage for `slots` pages, or `None` if memory is short.
    pub fn alloc(slots: u64) -> Option<Self> {
        Some(RamStore {
            slots: Slots::Frames(FrameSet::alloc(slots)?),
        })
    }

    /// Storage with a slot for every frame of a range that starts at
    /// `universe` frames and loses each storage frame `in_range` says falls
    /// inside it. Tries one contiguous run first; otherwise grows frame by
    /// frame. `None` if memory runs out (everything taken is freed).
    pub fn alloc_for_range(universe: u64, in_range: impl Fn(u64) -> bool) -> Option<Self> {
        let half = universe.div_ceil(2);
        // Zeroed now, while the workload runs: under an emulator the host
        // backs guest RAM on first touch, which the fault path must not pay.
        if let Some(run) = Buffer::alloc(half * PAGE_SIZE) {
            let inside = run.frames().filter(|&f| in_range(f)).count() as u64;
            if half >= universe - inside {
                return Some(RamStore {
                    slots: Slots::Run(run),
                });
            }
        }
        let mut slots = FrameSet::default();
        let mut range = universe;
        while slots.len() < range {
            let frame = slots.grow()?;
            if in_range(frame) {
                range -= 1;
            }
        }
        Some(RamStore {
            slots: Slots::Frames(slots),
        })
    }

    /// Its frames.
    pub fn frames(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        match &self.slots {
            Slots::Run(run) => Box::new(run.frames()),
            Slots::Frames(set) => Box::new(set.frames()),
        }
    }

    /// How many slots.
    pub fn len(&self) -> u64 {
        match &self.slots {
            Slots::Run(run) => run.pages(),
            Slots::Frames(set) => set.len(),
        }
    }

    /// The frame of `slot`.
    pub fn frame(&self, slot: u64) -> u64 {
        match &self.slots {
            Slots::Run(run) => {
                debug_assert!(slot < run.pages());
                run.phys() / PAGE_SIZE + slot
            }
            Slots::Frames(set) => set.get(slot),
        }
    }

    /// Copies range frame `frame` into `slot`. Interrupts must be off.
    pub fn save(&self, frame: u64, slot: u64) {
        match &self.slots {
            Slots::Run(run) => run.copy_in(slot, frame),
            Slots::Frames(set) => set.copy_in(slot, frame),
        }
    }

    /// The hash of `slot`'s copy.
    pub fn hash(&self, slot: u64) -> u64 {
        hash_frame(self.frame(slot) * PAGE_SIZE)
    }
}

impl super::SnapshotStore for RamStore {
    fn save(&self, frame: u64, slot: u64) {
        RamStore::save(self, frame, slot);
    }
    fn saved_frame(&self, slot: u64) -> Option<u64> {
        Some(self.frame(slot))
    }
    fn fresh_hash(&self, slot: u64) -> u64 {
        self.hash(slot)
    }
    fn slot_hash(&self, slot: u64) -> Option<u64> {
        Some(self.hash(slot))
    }
    fn slots(&self) -> u64 {
        self.len()
    }
}
