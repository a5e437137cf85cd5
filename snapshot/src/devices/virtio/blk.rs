//! The virtio-blk request engine (virtio 1.x, 5.2): negotiation and
//! configuration, then batches of reads, writes and flushes with many
//! requests in flight, each split into pieces the device accepts.
//!
//! A request is a descriptor chain: a 16-byte header the device reads, the
//! data segments, and a status byte the device writes. Headers and status
//! bytes live in one DMA region, one 32-byte slot per possible chain head,
//! so a request's slot is its head descriptor's index. A caller's buffer
//! is lent to the device through [`Hal::map`] for as long as any of its
//! pieces is in flight, and split:
//! - into segments no longer than the device's `size_max`;
//! - at most `seg_max` segments (and the queue's size less two) per request;
//! - at most [`Config::max_request_bytes`] per request;
//! - always whole sectors per request: when a limit falls inside a sector,
//!   the piece is cut back to the last whole sector and the rest of that
//!   segment starts the next piece.
//!
//! Ops of a batch that go the same way and continue each other on disk
//! are gathered into one request while the limits allow (scatter-gather
//! across buffers), so many small buffers cost few requests.
//!
//! Errors never panic. A device error fails the batch with the piece's
//! first sector; a device that breaks the protocol is reset (which stops
//! its DMA) and refused from then on.
//!
//! A device may offer several request queues (`VIRTIO_BLK_F_MQ`):
//! [`BlkDriver::new_queues`] gives one [`BlkDriver`] per queue, and callers
//! holding different queues have requests in flight at once, so a small
//! request or a flush never waits for another caller's batch. What callers
//! may rely on across queues:
//! - within one batch, order is as before: nothing overtakes a flush, and
//!   a flush goes out only once the batch's earlier requests completed;
//! - a flush covers every write whose completion was seen before the flush
//!   was submitted, on whichever queue (the device flushes the disk, not
//!   a queue: virtio 1.1, 5.2.6.2); a write still in flight on another
//!   queue may or may not be covered;
//! - batches on different queues have no order between them: two callers
//!   writing the same sectors at once, or one reading what another is
//!   writing, may see any mix of old and new data there (callers that
//!   care order such batches themselves, as they did across batches);
//! - a fault found on any queue resets the device and fails the batches of
//!   every queue (they see the shared state even while waiting).
//!
//! This file brings the device up and holds the request plumbing;
//! `batch` runs a batch, `pieces` cuts buffers into requests.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use spin::Once;

mod batch;
mod pieces;

pub use pieces::{append_merged, next_piece};

use super::device::{self, InitError};
use super::queue::{Layout, Part, SplitQueue};
use super::{Direction, DmaRegion, Hal, Segment, Transport, Wait, Width};
use crate::devices::block::{BlockError, DiskInfo, ErrorKind, SECTOR_SIZE};

/// virtio-blk feature bits (5.2.3).
pub mod feature {
    /// `size_max` is valid: the largest segment.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` is valid: the most segments per request.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid: the optimal block size.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// The device has a write cache and takes flush requests.
    pub const FLUSH: u64 = 1 << 9;
    /// The device has more than one request queue (`num_queues`).
    pub const MQ: u64 = 1 << 12;
}

/// Device configuration offsets (5.2.4).
pub mod config {
    /// Capacity in 512-byte sectors (64 bits).
    pub const CAPACITY: usize = 0;
    /// Largest segment in bytes (32 bits).
    pub const SIZE_MAX: usize = 8;
    /// Most segments per request (32 bits).
    pub const SEG_MAX: usize = 12;
    /// Optimal block size (32 bits).
    pub const BLK_SIZE: usize = 20;
    /// Number of request queues (16 bits), valid with `MQ`.
    pub const NUM_QUEUES: usize = 34;
}

/// Request types (5.2.6).
pub mod request {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the write cache.
    pub const FLUSH: u32 = 4;
    /// Read the device's ID string (its serial).
    pub const GET_ID: u32 = 8;
}

/// Status values the device writes.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error.
    pub const IOERR: u8 = 1;
    /// Unsupported request.
    pub const UNSUPP: u8 = 2;
}

/// Bytes per request slot: the 16-byte header, then the status byte.
pub const SLOT_SIZE: usize = 32;
/// Offset of the status byte in a slot.
pub const STATUS_OFFSET: usize = 16;
/// Length of the ID string GET_ID returns.
pub const ID_BYTES: usize = 20;
/// Status sentinel: the device has not written the status yet.
const NO_STATUS: u8 = 0xff;

/// Features the driver takes when offered.
pub const WANTED: u64 =
    feature::SIZE_MAX | feature::SEG_MAX | feature::RO | feature::BLK_SIZE | feature::FLUSH;

/// How to bring a device up.
#[derive(Debug, Clone)]
pub struct Config {
    /// A name to report until the device's own ID is read.
    pub name: String,
    /// Largest queue to use (the device may offer less).
    pub queue_size: u16,
    /// MSI-X vector (table entry) for the first request queue, if
    /// interrupts are delivered by MSI-X; queue `i` takes entry
    /// `vector + i`.
    pub vector: Option<u16>,
    /// Most request queues to use (the device may offer fewer; at least
    /// one is used). More than one needs the device configuration's
    /// `num_queues` field readable (36 bytes).
    pub queues: u16,
    /// Whether the device should interrupt on completions (otherwise the
    /// driver polls).
    pub interrupts: bool,
    /// Largest request in bytes (a multiple of 512).
    pub max_request_bytes: usize,
}

/// How requests are cut, from the device's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest segment in bytes.
    pub max_segment: u32,
    /// Most data segments per request.
    pub max_segments: usize,
    /// Most bytes per request (a multiple of 512).
    pub max_bytes: usize,
}

/// Counters since the driver started (or since [`BlkDriver::take_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests (pieces) sent to the device.
    pub requests: u64,
    /// Data bytes moved.
    pub bytes: u64,
    /// Notifications written to the device.
    pub notifies: u64,
    /// Times the driver waited with nothing to reap.
    pub waits: u64,
    /// Most requests in flight at once.
    pub max_in_flight: u16,
}

/// What a request in flight carries: a run of ops (merged when they are
/// contiguous), its first sector (none for a flush) and its data bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    first_op: usize,
    last_op: usize,
    sector: Option<u64>,
    bytes: u32,
}

/// One op's progress through a batch.
struct OpState<M> {
    mapping: Option<M>,
    segments: Vec<Segment>,
    /// Next segment and offset in it.
    cursor: (usize, u32),
    next_sector: u64,
    in_flight: u32,
    all_sent: bool,
}

/// One request queue of a virtio-blk device, driver side. A device with
/// several queues has one of these per queue, each sharing the device's
/// transport and its broken state: each runs its own batches, and callers
/// that hold different queues have requests in flight at once.
pub struct BlkDriver<T, H: Hal> {
    transport: T,
    hal: H,
    /// This queue's index on the device.
    index: u16,
    queue: SplitQueue<H::Region>,
    slots_region: H::Region,
    slots: Vec<Slot>,
    notify_offset: u32,
    features: u64,
    info: DiskInfo,
    limits: Limits,
    /// Why the device was given up on, shared by all its queues: set once
    /// by the queue that found the fault (which resets the device), then
    /// seen by every queue's batches and waits.
    broken: Arc<Once<&'static str>>,
    stats: Stats,
    /// Whether completions interrupt while the driver waits for them (see
    /// [`Self::wait_used`]).
    interrupts: bool,
    /// Scratch lists reused by every request (chain parts; one request's
    /// share of each op), so submitting does not allocate.
    parts: Vec<Part>,
    gather: Gather,
}

/// Scratch for gathering one request: its share of each op, as (op, the
/// op's cursor after the request, bytes), and one op's segments.
#[derive(Debug, Default)]
struct Gather {
    plan: Vec<(usize, (usize, u32), usize)>,
    part: Vec<Segment>,
}

impl<T, H: Hal> core::fmt::Debug for BlkDriver<T, H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BlkDriver")
            .field("info", &self.info)
            .field("limits", &self.limits)
            .field("queue", &self.index)
            .field("broken", &self.broken.get())
            .finish_non_exhaustive()
    }
}

impl<T: Transport + Clone, H: Hal + Clone> BlkDriver<T, H> {
    /// Negotiates, reads the configuration, sets up the request queue and
    /// tells the device the driver is ready. On failure the device is
    /// marked FAILED. Only queue 0 is set up, whatever `config.queues`.
    pub fn new(transport: T, hal: H, config: &Config) -> Result<Self, InitError> {
        let one = Config {
            queues: 1,
            ..config.clone()
        };
        let mut queues = Self::new_queues(transport, hal, &one)?;
        Ok(queues.remove(0))
    }

    /// Like [`Self::new`], but sets up as many request queues as the
    /// device offers (`VIRTIO_BLK_F_MQ`, 5.2.3), at most `config.queues`:
    /// one driver per queue, index `i` for queue `i`, all sharing the
    /// device. All queues are live before the device is told the driver is
    /// ready (3.1.1).
    pub fn new_queues(transport: T, hal: H, config: &Config) -> Result<Vec<Self>, InitError> {
        let wanted = if config.queues > 1 {
            WANTED | feature::MQ
        } else {
            WANTED
        };
        let features = device::negotiate(&transport, wanted, super::feature::VERSION_1)?;
        Self::bring_up(&transport, &hal, config, features).inspect_err(|_| device::fail(&transport))
    }

    fn bring_up(
        transport: &T,
        hal: &H,
        config: &Config,
        features: u64,
    ) -> Result<Vec<Self>, InitError> {
        let has = |bit| features & bit != 0;
        let sectors = device::read_device_u64(transport, config::CAPACITY);
        let read = |offset, width, present| {
            if present {
                transport.read_device(offset, width)
            } else {
                0
            }
        };
        let size_max = read(config::SIZE_MAX, Width::U32, has(feature::SIZE_MAX));
        let seg_max = read(config::SEG_MAX, Width::U32, has(feature::SEG_MAX));
        let blk_size = read(config::BLK_SIZE, Width::U32, has(feature::BLK_SIZE));
        let offered = read(config::NUM_QUEUES, Width::U16, has(feature::MQ)) as u16;
        let count = offered.clamp(1, config.queues.max(1));
        // Every queue gets the size of the smallest, so limits and depth
        // hold whichever queue a batch runs on.
        let size = (0..count)
            .map(|q| device::queue_size(transport, q, config.queue_size))
            .min()
            .unwrap_or(0);
        if size < 4 {
            return Err(InitError::NoQueue(0));
        }
        let max_bytes = config.max_request_bytes.max(SECTOR_SIZE) / SECTOR_SIZE * SECTOR_SIZE;
        let limits = Limits {
            max_segment: if size_max == 0 { u32::MAX } else { size_max },
            max_segments: match seg_max {
                0 => usize::from(size) - 2,
                n => (n as usize).min(usize::from(size) - 2),
            },
            max_bytes,
        };
        let block_size = if blk_size >= SECTOR_SIZE as u32 && blk_size.is_power_of_two() {
            blk_size
        } else {
            SECTOR_SIZE as u32
        };
        let info = DiskInfo {
            name: config.name.clone(),
            sectors,
            block_size,
            read_only: has(feature::RO),
            flush: has(feature::FLUSH),
            max_depth: usize::from(size),
        };
        let broken = Arc::new(Once::new());
        let mut queues = Vec::with_capacity(usize::from(count));
        for index in 0..count {
            let layout = Layout::new(size);
            let rings = hal.alloc(layout.bytes).map_err(|_| InitError::NoMemory)?;
            let slots_region = hal
                .alloc(usize::from(size) * SLOT_SIZE)
                .map_err(|_| InitError::NoMemory)?;
            let vector = config.vector.map(|v| v + index);
            let setup = device::setup_queue(transport, index, size, &rings, &layout, vector)?;
            let queue = SplitQueue::new(rings, size);
            // Interrupts stay off except while the driver waits (wait_used).
            queue.set_interrupts(false);
            queues.push(BlkDriver {
                transport: transport.clone(),
                hal: hal.clone(),
                index,
                queue,
                slots_region,
                slots: alloc::vec![Slot::default(); usize::from(size)],
                notify_offset: setup.notify_offset,
                features,
                info: info.clone(),
                limits,
                broken: broken.clone(),
                stats: Stats::default(),
                interrupts: config.interrupts,
                parts: Vec::new(),
                gather: Gather::default(),
            });
        }
        device::go_live(transport);
        Ok(queues)
    }
}

impl<T: Transport, H: Hal> BlkDriver<T, H> {
    /// What the disk is.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    /// Renames the disk (to the serial read by [`BlkDriver::identify`]).
    pub fn set_name(&mut self, name: String) {
        self.info.name = name;
    }

    /// The accepted feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// How requests are cut.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// This queue's index on the device.
    pub fn queue_index(&self) -> u16 {
        self.index
    }

    /// Why the device was given up on, if it was (by any of its queues).
    pub fn broken(&self) -> Option<&'static str> {
        self.broken.get().copied()
    }

    /// Counters since the last call.
    pub fn take_stats(&mut self) -> Stats {
        core::mem::take(&mut self.stats)
    }

    fn error(&self, sector: Option<u64>, kind: ErrorKind) -> BlockError {
        BlockError::new(&self.info.name, sector, kind)
    }

    /// Gives up on a device that broke the protocol: reset stops its DMA
    /// (on every queue). The first queue to give up resets; the others'
    /// batches see the shared state and fail too. The state is published
    /// only once the reset is done: a batch that sees it gives its buffers
    /// back at once, which is safe only when the device can no longer
    /// write them.
    fn break_down(&mut self, why: &'static str) -> BlockError {
        let transport = &self.transport;
        let why = *self.broken.call_once(|| {
            let _ = device::reset(transport);
            device::fail(transport);
            why
        });
        self.error(None, ErrorKind::Broken(why))
    }

    fn add(&mut self, header: (u32, u64), data: &[Segment], device_writes: bool) -> Option<u16> {
        let head = self.queue.next_head()?;
        let slot = usize::from(head) * SLOT_SIZE;
        let (kind, sector) = header;
        self.slots_region.write_u32(slot, kind);
        self.slots_region.write_u32(slot + 4, 0);
        self.slots_region.write_u64(slot + 8, sector);
        self.slots_region.write_u8(slot + STATUS_OFFSET, NO_STATUS);
        let base = self.slots_region.phys() + slot as u64;
        // A scratch list kept across requests: no allocation per request.
        let mut parts = core::mem::take(&mut self.parts);
        parts.clear();
        parts.push(Part {
            segment: Segment {
                addr: base,
                len: 16,
            },
            device_writes: false,
        });
        parts.extend(data.iter().map(|&segment| Part {
            segment,
            device_writes,
        }));
        parts.push(Part {
            segment: Segment {
                addr: base + STATUS_OFFSET as u64,
                len: 1,
            },
            device_writes: true,
        });
        let added = self.queue.add(&parts);
        self.parts = parts;
        debug_assert_eq!(added?, head);
        self.stats.requests += 1;
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.queue.in_flight());
        Some(head)
    }

    fn notify(&mut self) {
        if self.queue.needs_notify() {
            self.transport.notify(self.notify_offset, self.index);
            self.stats.notifies += 1;
        }
    }

    /// Takes one completion: its head and status.
    fn reap(&mut self) -> Result<Option<(u16, u8)>, BlockError> {
        match self.queue.pop_used() {
            Ok(Some((head, _len))) => {
                let status = self
                    .slots_region
                    .read_u8(usize::from(head) * SLOT_SIZE + STATUS_OFFSET);
                Ok(Some((head, status)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(self.break_down(e.0)),
        }
    }

    /// Reads the device's ID string (`-device virtio-blk-pci,serial=...`).
    pub fn identify(&mut self, wait: &impl Wait) -> Result<String, BlockError> {
        if let Some(why) = self.broken() {
            return Err(self.error(None, ErrorKind::Broken(why)));
        }
        let mut id = [0u8; ID_BYTES];
        let mut segments = Vec::new();
        let mapping = self
            .hal
            .map(&id, Direction::FromDevice, &mut segments)
            .map_err(|_| self.error(None, ErrorKind::NoMemory))?;
        let head = self.add((request::GET_ID, 0), &segments, true);
        self.notify();
        let mut result = Err(self.error(None, ErrorKind::Broken("GET_ID not queued")));
        if head.is_some() {
            result = loop {
                match self.reap() {
                    Ok(Some((_, status::OK))) => break Ok(()),
                    Ok(Some((_, status::UNSUPP))) => {
                        break Err(self.error(None, ErrorKind::Unsupported))
                    }
                    Ok(Some(_)) => break Err(self.error(None, ErrorKind::Io)),
                    Ok(None) => self.wait_used(wait),
                    Err(e) => break Err(e),
                }
            };
        }
        self.hal.unmap(mapping, Some(&mut id));
        result?;
        let end = id.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
        Ok(id[..end]
            .iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
            .collect())
    }
}
