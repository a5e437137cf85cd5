//! Sizing a snapshot's reservation: how much memory the engine sets aside
//! before the pause (shadow page tables, the copy map, storage or staging,
//! its buffers), from the RAM the range may hold, the eager set's size and
//! the free frames; and whether it fits.
//!
//! The range is what the reservation leaves of RAM, so every frame reserved
//! is a frame the snapshot does not cover: the shadow's page tables are sized
//! to the 2 MiB regions and GiBs that hold RAM (not to the physical map's
//! span), and staging to the range.
//!
//! Plain arithmetic in frames: it never allocates what it sizes or looks at
//! hardware (the kernel passes the figures in and allocates what the plan
//! says).

use core::ops::Range;

/// Frames a shadow page table (PT) maps: a 2 MiB region.
pub const FRAMES_PER_REGION: u64 = 512;
/// Frames a shadow page directory (PD) maps: a GiB.
pub const FRAMES_PER_GIB: u64 = 512 * 512;
/// Bytes in a frame.
pub const PAGE_BYTES: u64 = 4096;
/// Write-fault latencies recorded at most ([`Demand::latencies`]).
pub const LATENCY_CAPACITY: u64 = 1 << 17;
/// Progress samples recorded at most, and words in each.
pub const SAMPLE_CAPACITY: u64 = 8192;
/// Words in one progress sample: time, then pages by cause.
pub const SAMPLE_WORDS: u64 = 4;
/// The pause's own stack.
pub const PAUSE_STACK_BYTES: u64 = 64 * 1024;
/// Staging pages a copier that cannot wait may still use when the rest is
/// full: faults with interrupts off, the writer's own faults, frames the
/// allocator hands out.
pub const STAGING_RESERVE: u64 = 256;
/// Fewest staging pages by default (4 MiB), for small guests.
pub const STAGING_FLOOR: u64 = 1024;
/// Most staging pages by default (128 MiB).
pub const STAGING_CEILING: u64 = 32768;
/// Frames left free for the kernel to go on working during a snapshot.
pub const KEEP_FREE: u64 = 1024;

/// Where the snapshot's pages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// One RAM frame per range frame.
    Ram,
    /// A disk, through a RAM staging area of this many pages (default:
    /// [`staging_pages`]).
    Disk {
        /// Pages asked for, if any.
        staging: Option<u64>,
    },
}

/// What a snapshot asks for.
#[derive(Debug, Clone)]
pub struct Demand<'a> {
    /// The RAM the range may hold, in frames: sorted, disjoint.
    pub ram: &'a [Range<u64>],
    /// Frames in the eager set (about: page tables, stacks, kernel image).
    pub eager: u64,
    /// Frames free now.
    pub free: u64,
    /// Where the pages go.
    pub store: Store,
    /// A reference hash and a copy count per page.
    pub verify: bool,
    /// A record of every fault's latency.
    pub latencies: bool,
    /// The copy map outside the range (default: inside, copied eagerly).
    pub map_outside: bool,
}

/// The reservation, in frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plan {
    /// RAM frames the range starts from, before the reservation.
    pub universe: u64,
    /// One past the highest frame the range can hold.
    pub index_frames: u64,
    /// Shadow PDs: one per GiB holding RAM.
    pub shadow_pds: u64,
    /// Shadow PTs: one per 2 MiB region holding RAM.
    pub shadow_pts: u64,
    /// The copy map.
    pub map_pages: u64,
    /// The reference hashes (verify only).
    pub reference_pages: u64,
    /// The copy counts (verify only).
    pub copies_pages: u64,
    /// The fault latencies (if asked).
    pub latency_pages: u64,
    /// The progress samples.
    pub sample_pages: u64,
    /// The pause's stack.
    pub stack_pages: u64,
    /// The staging area (disk only).
    pub staging_pages: u64,
    /// RAM storage, about (RAM only: the kernel sizes it exactly once the
    /// other buffers are placed, see the module docs).
    pub storage_pages: u64,
}

impl Plan {
    /// Frames reserved besides storage and the copy map.
    pub fn buffers(&self) -> u64 {
        self.shadow_pds
            + self.shadow_pts
            + self.reference_pages
            + self.copies_pages
            + self.latency_pages
            + self.sample_pages
            + self.stack_pages
            + self.staging_pages
    }

    /// Every frame the reservation takes.
    pub fn needed(&self) -> u64 {
        self.buffers() + self.map_pages + self.storage_pages
    }

    /// Frames the range holds, at least (taking every reserved frame for a
    /// RAM frame; the copy map, when inside, stays in the range).
    pub fn range_pages(&self, map_outside: bool) -> u64 {
        let map_out = if map_outside { self.map_pages } else { 0 };
        self.universe
            .saturating_sub(self.buffers() + map_out + self.storage_pages)
    }
}

/// Why a snapshot cannot be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanError {
    /// No RAM to snapshot.
    EmptyRange,
    /// The reservation and [`KEEP_FREE`] do not fit in the free frames.
    NoMemory {
        /// Frames needed, [`KEEP_FREE`] included.
        needed: u64,
        /// Frames free.
        free: u64,
    },
}

/// Sizes the reservation for `d`, or says why it cannot be made.
///
/// RAM storage takes one frame per range frame, and the range is what the
/// reservation leaves: storage is half of the RAM that remains once the
/// other buffers are placed. A disk store needs only its staging area.
pub fn plan(d: &Demand<'_>) -> Result<Plan, PlanError> {
    let universe: u64 = d.ram.iter().map(|r| r.end.saturating_sub(r.start)).sum();
    if universe == 0 {
        return Err(PlanError::EmptyRange);
    }
    let pages = |bytes: u64| bytes.div_ceil(PAGE_BYTES);
    let mut plan = Plan {
        universe,
        index_frames: d.ram.iter().map(|r| r.end).max().unwrap_or(0),
        shadow_pds: units_holding(d.ram, FRAMES_PER_GIB),
        shadow_pts: units_holding(d.ram, FRAMES_PER_REGION),
        map_pages: pages(super::words_for(universe) as u64 * 8),
        sample_pages: pages(SAMPLE_CAPACITY * SAMPLE_WORDS * 8),
        stack_pages: pages(PAUSE_STACK_BYTES),
        ..Plan::default()
    };
    if d.verify {
        plan.reference_pages = pages(universe * 8);
        plan.copies_pages = pages(universe);
    }
    if d.latencies {
        plan.latency_pages = pages(LATENCY_CAPACITY * 8);
    }
    match d.store {
        Store::Disk { staging } => {
            plan.staging_pages = staging_pages(universe, d.eager, d.free, staging);
        }
        Store::Ram => {
            let map_out = if d.map_outside { plan.map_pages } else { 0 };
            plan.storage_pages = universe
                .saturating_sub(plan.buffers() + map_out)
                .div_ceil(2);
        }
    }
    let needed = plan.needed() + KEEP_FREE;
    if d.free < needed {
        return Err(PlanError::NoMemory {
            needed,
            free: d.free,
        });
    }
    Ok(plan)
}

/// Units of `size` frames (2 MiB regions, GiBs) that hold a frame of `ram`
/// (sorted, disjoint ranges).
pub fn units_holding(ram: &[Range<u64>], size: u64) -> u64 {
    let mut count = 0;
    let mut last: Option<u64> = None;
    for r in ram.iter().filter(|r| r.start < r.end) {
        let (first, end) = (r.start / size, (r.end - 1) / size + 1);
        let first = match last {
            Some(l) if l >= first => l + 1,
            _ => first,
        };
        if first < end {
            count += end - first;
            last = Some(end - 1);
        }
    }
    count
}

/// Staging pages for a range of `universe` frames whose eager set is about
/// `eager` frames, with `free` frames free, `asked` pages if the caller
/// says: all of the eager set must fit, since the pause copies it with the
/// writer stopped, with the reserve and some room to spare.
///
/// By default a sixteenth of the range and at most an eighth of the free
/// frames, within [`STAGING_FLOOR`] and [`STAGING_CEILING`]. Early in
/// a snapshot the workload's faults alone can outrun the disk, whose
/// requests are then single scattered pages; at 2 GiB a 32 MiB area left
/// faults parked for the writer (27..84 of about 47 600 per run) where
/// 128 MiB, peaking at 43..74 MiB, left none.
pub fn staging_pages(universe: u64, eager: u64, free: u64, asked: Option<u64>) -> u64 {
    let base = asked.unwrap_or_else(|| {
        (universe / 16)
            .min(free / 8)
            .clamp(STAGING_FLOOR, STAGING_CEILING)
    });
    base.max(eager + eager / 4 + STAGING_RESERVE + 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    const MIB: u64 = 256; // frames

    /// The RAM QEMU's PVH boot reports for a guest of `mib` MiB (below
    /// 3 GiB): the low 640 KiB less the first page, then 1 MiB up to the
    /// top less a few pages the firmware keeps.
    fn qemu_ram(mib: u64) -> Vec<Range<u64>> {
        vec![1..159, 256..mib * MIB - 2]
    }

    fn demand(ram: &[Range<u64>], free: u64, store: Store) -> Demand<'_> {
        Demand {
            ram,
            eager: 340,
            free,
            store,
            verify: false,
            latencies: true,
            map_outside: false,
        }
    }

    /// Free frames after boot: RAM less the kernel image, heap, stacks.
    fn free_after_boot(ram: &[Range<u64>]) -> u64 {
        ram.iter().map(|r| r.end - r.start).sum::<u64>() - 6 * MIB
    }

    #[test]
    fn shadow_tables_follow_the_ram_not_the_physical_map() {
        let ram = qemu_ram(256);
        assert_eq!(units_holding(&ram, FRAMES_PER_REGION), 128);
        assert_eq!(units_holding(&ram, FRAMES_PER_GIB), 1);
        // Two ranges in one region count it once; a hole skips regions.
        let split = [0..10, 20..30, 4 * 512..5 * 512 + 1];
        assert_eq!(units_holding(&split, FRAMES_PER_REGION), 3);
        // RAM above 4 GiB after the PCI hole: 3 GiB + 1 GiB in two GiBs.
        let high = [
            0..3 * FRAMES_PER_GIB,
            4 * FRAMES_PER_GIB..5 * FRAMES_PER_GIB,
        ];
        assert_eq!(units_holding(&high, FRAMES_PER_GIB), 4);
        assert_eq!(units_holding(&high, FRAMES_PER_REGION), 4 * 512);
    }

    #[test]
    fn a_256_mib_guest_to_disk_covers_at_least_92_percent() {
        let ram = qemu_ram(256);
        let free = free_after_boot(&ram);
        let plan = plan(&demand(&ram, free, Store::Disk { staging: None })).unwrap();
        let range = plan.range_pages(false);
        assert!(
            range * 100 >= plan.universe * 92,
            "{range} of {} frames: {plan:?}",
            plan.universe
        );
        assert_eq!(plan.shadow_pts, 128);
        assert_eq!(plan.staging_pages, plan.universe / 16);
    }

    #[test]
    fn staging_has_a_floor_for_small_guests_and_fits_the_eager_set() {
        assert_eq!(staging_pages(32 * MIB, 100, 30 * MIB, None), STAGING_FLOOR);
        assert_eq!(staging_pages(256 * MIB, 100, 48 * MIB, None), 48 * MIB / 8);
        assert_eq!(
            staging_pages(8192 * MIB, 300, 8000 * MIB, None),
            STAGING_CEILING
        );
        assert_eq!(staging_pages(64 * MIB, 2000, 60 * MIB, None), 3268);
        assert_eq!(staging_pages(64 * MIB, 100, 60 * MIB, Some(64)), 893);
    }

    #[test]
    fn a_guest_too_small_is_refused_with_the_figures() {
        let ram = [1..159, 256..2048];
        let free = 1500;
        match plan(&demand(&ram, free, Store::Ram)) {
            Err(PlanError::NoMemory { needed, free: f }) => {
                assert_eq!(f, free);
                assert!(needed > free);
            }
            other => panic!("a 7 MiB guest was not refused: {other:?}"),
        }
        assert_eq!(
            plan(&demand(&[], 1 << 20, Store::Ram)),
            Err(PlanError::EmptyRange)
        );
    }

    #[test]
    fn ram_storage_holds_the_range() {
        let ram = qemu_ram(128);
        let free = free_after_boot(&ram);
        let p = plan(&demand(&ram, free, Store::Ram)).unwrap();
        assert!(p.storage_pages >= p.range_pages(false));
    }

    proptest! {
        /// Whatever the RAM and options, a plan never takes more than the
        /// free frames less what the kernel keeps, RAM storage holds the
        /// range it leaves, and the shadow has a PT for each region of RAM.
        #[test]
        fn plans_fit_in_free_memory(
            cuts in proptest::collection::btree_set(1u64..600_000, 0..12),
            free_share in 1u64..=100,
            disk in any::<bool>(),
            staging in proptest::option::of(1u64..40_000),
            verify in any::<bool>(),
            latencies in any::<bool>(),
            map_outside in any::<bool>(),
        ) {
            let cuts: Vec<u64> = cuts.into_iter().collect();
            let ram: Vec<Range<u64>> = cuts.chunks(2).filter(|c| c.len() == 2).map(|c| c[0]..c[1]).collect();
            let universe: u64 = ram.iter().map(|r| r.end - r.start).sum();
            let d = Demand {
                ram: &ram,
                eager: 300,
                free: universe * free_share / 100,
                store: if disk { Store::Disk { staging } } else { Store::Ram },
                verify,
                latencies,
                map_outside,
            };
            match plan(&d) {
                Ok(p) => {
                    prop_assert!(p.needed() + KEEP_FREE <= d.free);
                    if !disk {
                        prop_assert!(p.storage_pages >= p.range_pages(map_outside));
                    }
                    let regions: std::collections::BTreeSet<u64> = ram
                        .iter()
                        .flat_map(|r| r.start / FRAMES_PER_REGION..=(r.end - 1) / FRAMES_PER_REGION)
                        .collect();
                    prop_assert_eq!(p.shadow_pts, regions.len() as u64);
                    prop_assert!(p.index_frames >= ram.last().map_or(0, |r| r.end));
                }
                Err(PlanError::NoMemory { needed, free }) => {
                    prop_assert!(needed > free);
                    prop_assert_eq!(free, d.free);
                }
                Err(PlanError::EmptyRange) => prop_assert_eq!(universe, 0),
            }
        }
    }
}
