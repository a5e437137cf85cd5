//! The reservation, kernel side: allocates what
//! [`snapshot::memsnap::reserve::plan`] sized (storage or staging, shadow
//! tables, the copy map, buffers, the pause's stack) and builds the range:
//! all RAM below the limit except the reservation.
//!
//! Runs before the pause, while the workload runs. Must never change
//! anything a failed start would have to undo beyond freeing what it
//! allocated (the disk is checked for room before anything on it changes).

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ops::Range;

use snapshot::devices::block::BlockDevice;
use snapshot::memsnap::reserve::{self, Plan, PlanError};
use snapshot::memsnap::RangeIndex;

use super::store::disk::{self, DiskError, DiskStore};
use super::store::ram::RamStore;
use super::{Options, StartError};
use crate::memory::snapmem::{self, Buffer, EngineStack, FrameSet, StagingArea};
use crate::memory::{paging, PAGE_SIZE};

/// Everything a snapshot needs, allocated before the pause.
pub(super) struct Reserved {
    /// The range.
    pub index: RangeIndex,
    /// Where its pages go.
    pub storage: Storage,
    /// The engine's other memory.
    pub buffers: Buffers,
}

/// Where the reservation puts the snapshot.
pub(super) enum Storage {
    /// One RAM frame per range frame.
    Ram(RamStore),
    /// A disk, prepared for the core file, and its staging area.
    Disk(DiskStore),
}

/// The reservation's memory besides storage.
pub(super) struct Buffers {
    /// Shadow PDs.
    pub table_frames: FrameSet,
    /// Shadow PTs.
    pub pt_buffer: Buffer,
    /// The copy map's words.
    pub map_words: Buffer,
    /// Reference hashes (verify).
    pub reference: Option<Buffer>,
    /// Copy counts (verify).
    pub copies: Option<Buffer>,
    /// Fault latencies.
    pub latencies: Option<Buffer>,
    /// Progress samples.
    pub samples: Buffer,
    /// The pause's stack.
    pub pause_stack: EngineStack,
}

impl Buffers {
    /// Allocates what `plan` says; `no_memory` is the error if a part is
    /// not free (everything taken so far is freed).
    fn alloc(plan: &Plan, no_memory: impl Fn() -> StartError) -> Result<Self, StartError> {
        let buffer = |pages: u64| Buffer::alloc(pages * PAGE_SIZE).ok_or_else(&no_memory);
        let maybe = |pages: u64| (pages > 0).then(|| buffer(pages)).transpose();
        Ok(Buffers {
            table_frames: FrameSet::alloc(plan.shadow_pds).ok_or_else(&no_memory)?,
            pt_buffer: buffer(plan.shadow_pts)?,
            map_words: buffer(plan.map_pages)?,
            reference: maybe(plan.reference_pages)?,
            copies: maybe(plan.copies_pages)?,
            latencies: maybe(plan.latency_pages)?,
            samples: buffer(plan.sample_pages)?,
            pause_stack: EngineStack::alloc(plan.stack_pages * PAGE_SIZE).ok_or_else(&no_memory)?,
        })
    }

    /// Every frame, the copy map's only if `with_map`.
    fn frames(&self, with_map: bool) -> impl Iterator<Item = u64> + '_ {
        let buffers = [
            Some(&self.samples),
            Some(&self.pt_buffer),
            with_map.then_some(&self.map_words),
            self.reference.as_ref(),
            self.copies.as_ref(),
            self.latencies.as_ref(),
        ];
        buffers
            .into_iter()
            .flatten()
            .flat_map(Buffer::frames)
            .chain(self.pause_stack.frames())
            .chain(self.table_frames.frames())
    }
}

/// RAM below `limit`, as frame ranges.
pub(super) fn ram_frames(limit: u64) -> impl Iterator<Item = Range<u64>> {
    crate::boot_info::usable_ram().filter_map(move |r| {
        let start = r.start.div_ceil(PAGE_SIZE);
        let end = r.end.min(limit) / PAGE_SIZE;
        (start < end).then_some(start..end)
    })
}

/// Sizes the reservation and allocates it, then builds the range. RAM
/// storage is allocated last, to the range the other buffers leave.
pub(super) fn reserve(opts: &Options) -> Result<Reserved, StartError> {
    let limit = opts
        .range_limit
        .unwrap_or(u64::MAX)
        .min(paging::physmap_end());
    let ram: Vec<Range<u64>> = ram_frames(limit).collect();
    let universe: u64 = ram.iter().map(|r| r.end - r.start).sum();
    if universe == 0 {
        return Err(StartError::EmptyRange);
    }
    let target = opts
        .disk
        .as_deref()
        .map(|name| check_disk(name, universe))
        .transpose()?;
    let (free, _) = crate::memory::frames::stats();
    let plan = plan(opts, &ram, free, target.is_some())?;
    let no_memory = || StartError::NoMemory {
        needed: (plan.needed() + reserve::KEEP_FREE) * PAGE_SIZE,
        free: free * PAGE_SIZE,
    };
    let buffers = Buffers::alloc(&plan, no_memory)?;
    let staging = (plan.staging_pages > 0)
        .then(|| {
            StagingArea::alloc(
                plan.staging_pages as usize,
                reserve::STAGING_RESERVE as usize,
            )
            .ok_or_else(no_memory)
        })
        .transpose()?;
    let is_ram = |f: u64| ram.iter().any(|r| r.contains(&f));
    let ram_store = match staging {
        Some(_) => None,
        None => {
            // Every frame of the other buffers that fell inside the range
            // has made it smaller, and so does each storage frame.
            let reserved = buffers
                .frames(opts.map_outside)
                .filter(|&f| is_ram(f))
                .count() as u64;
            let store = RamStore::alloc_for_range(universe - reserved, is_ram);
            Some(store.ok_or_else(no_memory)?)
        }
    };
    let index = build_index(opts, &ram, plan.index_frames, |exclude| {
        let store: Box<dyn Iterator<Item = u64>> = match (&ram_store, &staging) {
            (Some(store), _) => store.frames(),
            (None, Some(area)) => Box::new(area.frames()),
            (None, None) => Box::new(core::iter::empty()),
        };
        store
            .chain(buffers.frames(opts.map_outside))
            .for_each(exclude);
    })?;
    let storage = match (ram_store, staging, target) {
        (Some(store), _, _) => Storage::Ram(store),
        (None, Some(area), Some(target)) => {
            let layout =
                disk::plan(&index.runs()).map_err(|e| StartError::Disk(DiskError::Layout(e)))?;
            Storage::Disk(
                DiskStore::prepare(target, layout, index.len(), area).map_err(StartError::Disk)?,
            )
        }
        _ => unreachable!("a reservation has RAM storage or a disk with staging"),
    };
    Ok(Reserved {
        index,
        storage,
        buffers,
    })
}

/// The disk named `name`, checked for room for `universe` frames less what
/// the reservation will take, before anything is allocated.
fn check_disk(name: &str, universe: u64) -> Result<Arc<dyn BlockDevice>, StartError> {
    let d: Arc<dyn BlockDevice> = crate::virtio::disk(name).map_err(StartError::NoDisk)?;
    let (_, layout) =
        disk::plan(&[(0, universe)]).map_err(|e| StartError::Disk(DiskError::Layout(e)))?;
    let reservation_slack = universe / 4 * PAGE_SIZE;
    disk::check_capacity(&*d, layout.total.saturating_sub(reservation_slack))
        .map_err(StartError::Disk)?;
    Ok(d)
}

/// The plan for `opts` over `ram` with `free` frames free.
fn plan(opts: &Options, ram: &[Range<u64>], free: u64, to_disk: bool) -> Result<Plan, StartError> {
    let (store, eager) = if to_disk {
        let mut eager = 0;
        snapmem::walk_eager(|_| eager += 1);
        let staging = opts.staging_pages.map(|n| n as u64);
        (reserve::Store::Disk { staging }, eager)
    } else {
        (reserve::Store::Ram, 0)
    };
    reserve::plan(&reserve::Demand {
        ram,
        eager,
        free,
        store,
        verify: opts.verify,
        latencies: opts.latencies,
        map_outside: opts.map_outside,
    })
    .map_err(|e| match e {
        PlanError::EmptyRange => StartError::EmptyRange,
        PlanError::NoMemory { needed, free } => StartError::NoMemory {
            needed: needed * PAGE_SIZE,
            free: free * PAGE_SIZE,
        },
    })
}

/// The range over `frames` frames: `ram`, plus (with a range limit) the
/// eager set's RAM frames below `frames`, less what `reserved` hands to
/// its callback. `frames` ends at the last frame of `ram`, so those eager
/// frames are already in `ram`: eager frames past the limit stay out.
fn build_index(
    opts: &Options,
    ram: &[Range<u64>],
    frames: u64,
    reserved: impl FnOnce(&mut dyn FnMut(u64)),
) -> Result<RangeIndex, StartError> {
    let mut index = RangeIndex::new(frames);
    for r in ram {
        index.include(r.start, r.end);
    }
    if opts.range_limit.is_some() {
        snapmem::walk_eager(|f| {
            if f < frames && ram_frames(u64::MAX).any(|r| r.contains(&f)) {
                index.include(f, f + 1);
            }
        });
    }
    reserved(&mut |frame| index.exclude(frame));
    index.seal();
    if index.is_empty() {
        return Err(StartError::EmptyRange);
    }
    Ok(index)
}

/// A range and a RAM store for it, reserved like a snapshot's but never
/// published: the benchmarks' stop-and-copy baseline copies into it.
pub struct RamCopy {
    reserved: Reserved,
}

impl RamCopy {
    /// The range.
    pub fn index(&self) -> &RangeIndex {
        &self.reserved.index
    }

    /// The storage.
    pub fn store(&self) -> &RamStore {
        match &self.reserved.storage {
            Storage::Ram(store) => store,
            Storage::Disk(_) => unreachable!("reserved without a disk"),
        }
    }
}

/// Reserves a range and RAM storage as [`super::start`] would with `opts`
/// (its disk ignored), without starting anything; refused while a snapshot
/// is active or complete.
pub fn reserve_ram_copy(opts: &Options) -> Result<RamCopy, StartError> {
    super::check_idle()?;
    let reserved = reserve(&Options {
        disk: None,
        ..opts.clone()
    })?;
    Ok(RamCopy { reserved })
}
