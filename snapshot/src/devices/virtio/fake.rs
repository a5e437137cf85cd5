//! A fake virtio-blk device for host tests: the modern transport's
//! registers, a device that reads chains from fake physical memory like a
//! real one, and a bounce-buffer HAL (like swiotlb).
//!
//! The device is strict: any chain a real device would reject, or any
//! access to memory that is not mapped, panics the test. It completes
//! requests in a seeded random order, a random number at a time, so the
//! driver sees out-of-order completion and partial batches. Memory is a map
//! of allocations; unmapped buffers are removed at once, so a late device
//! access to a released buffer is caught.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use std::sync::Mutex;

use super::blk::{feature as blkf, request, status as blks};
use super::{common, feature, status, Transport};
use super::{Wait, Width};
use crate::devices::block::SECTOR_SIZE;
use crate::support::rng::Rng;

mod hal;
pub use hal::{Bounce, FakeRegion};

/// How the device should misbehave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehave {
    /// Behave.
    No,
    /// Report a completion for a descriptor that is not a chain head.
    BogusCompletion,
    /// Complete without writing the status byte.
    NoStatus,
    /// Put the queue's notification address far outside the area.
    BadNotifyOffset,
}

/// What the fake offers and how it behaves.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Capacity in sectors.
    pub sectors: u64,
    /// `size_max` (0: feature not offered).
    pub size_max: u32,
    /// `seg_max` (0: feature not offered).
    pub seg_max: u32,
    /// Largest queue.
    pub queue_max: u16,
    /// Offer FLUSH.
    pub flush: bool,
    /// Offer RO.
    pub read_only: bool,
    /// Offer VERSION_1.
    pub version_1: bool,
    /// The ID string.
    pub serial: String,
    /// Bounce buffers are cut into segments at multiples of this (fake
    /// pages), starting at a random offset, to exercise scatter-gather.
    pub page: u64,
    /// Seed for completion order and buffer placement.
    pub seed: u64,
    /// Misbehaviour.
    pub misbehave: Misbehave,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            sectors: 2048,
            size_max: 0,
            seg_max: 0,
            queue_max: 64,
            flush: true,
            read_only: false,
            version_1: true,
            serial: "fake0".into(),
            page: 4096,
            seed: 1,
            misbehave: Misbehave::No,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct QueueRegs {
    size: u16,
    vector: u16,
    enable: u16,
    desc: u64,
    driver: u64,
    device: u64,
}

#[derive(Debug)]
struct State {
    setup: Setup,
    memory: BTreeMap<u64, Vec<u8>>,
    next_addr: u64,
    features: u64,
    device_select: u32,
    driver_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queue: QueueRegs,
    disk: Vec<u8>,
    pending: Vec<u16>,
    last_avail: u16,
    used_idx: u16,
    rng: Rng,
    failing: Vec<u64>,
    /// Largest number of requests the device held at once.
    pub max_pending: usize,
    /// Requests executed.
    pub requests: usize,
    /// Largest data segment count seen in one request.
    pub max_segments_seen: usize,
    /// Requests that reached the device alongside a flush (a flush must
    /// be alone: everything before it done, nothing after it started).
    pub flush_overlaps: usize,
    /// Driver waits that began with interrupts asked for, and without.
    pub waits_armed: usize,
    /// See [`Self::waits_armed`].
    pub waits_unarmed: usize,
}

/// The fake device; clone handles share it.
#[derive(Debug, Clone)]
pub struct Fake(Arc<Mutex<State>>);

impl Fake {
    /// A device set up as `setup` says, with zeroed contents.
    pub fn new(setup: Setup) -> Self {
        let mut features = 0;
        let mut offer = |on: bool, bit| {
            if on {
                features |= bit
            }
        };
        offer(setup.version_1, feature::VERSION_1);
        offer(setup.size_max != 0, blkf::SIZE_MAX);
        offer(setup.seg_max != 0, blkf::SEG_MAX);
        offer(setup.flush, blkf::FLUSH);
        offer(setup.read_only, blkf::RO);
        offer(true, blkf::BLK_SIZE);
        let disk = vec![0; setup.sectors as usize * SECTOR_SIZE];
        let rng = Rng::new(setup.seed);
        Fake(Arc::new(Mutex::new(State {
            setup,
            memory: BTreeMap::new(),
            next_addr: 0x10_0000,
            features,
            device_select: 0,
            driver_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queue: QueueRegs::default(),
            disk,
            pending: Vec::new(),
            last_avail: 0,
            used_idx: 0,
            rng,
            failing: Vec::new(),
            max_pending: 0,
            waits_armed: 0,
            waits_unarmed: 0,
            requests: 0,
            max_segments_seen: 0,
            flush_overlaps: 0,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    /// The disk's bytes.
    pub fn disk(&self) -> Vec<u8> {
        self.state().disk.clone()
    }

    /// Makes requests touching `sector` fail with IOERR.
    pub fn fail_sector(&self, sector: u64) {
        self.state().failing.push(sector);
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.state().status
    }

    /// (most requests held at once, requests executed, most data segments
    /// in one request, requests that overlapped a flush).
    pub fn counters(&self) -> (usize, usize, usize, usize) {
        let s = self.state();
        (
            s.max_pending,
            s.requests,
            s.max_segments_seen,
            s.flush_overlaps,
        )
    }

    /// Whether the driver asks for completion interrupts now (its
    /// available ring's flags), and its waits that began with them asked
    /// for and without.
    pub fn interrupts(&self) -> (bool, usize, usize) {
        let mut s = self.state();
        (s.interrupts_armed(), s.waits_armed, s.waits_unarmed)
    }

    /// Bytes of fake memory still allocated (rings, slots, live mappings).
    pub fn live_allocations(&self) -> usize {
        self.state().memory.len()
    }
}

impl State {
    fn alloc(&mut self, bytes: usize, offset: u64) -> u64 {
        let base = self.next_addr.next_multiple_of(0x1000) + offset;
        self.next_addr = base + bytes as u64 + 0x1000;
        self.memory.insert(base, vec![0; bytes]);
        base
    }

    fn mem(&mut self, addr: u64, len: usize) -> &mut [u8] {
        let (&base, block) = self
            .memory
            .range_mut(..=addr)
            .next_back()
            .unwrap_or_else(|| panic!("device access to unmapped {addr:#x}"));
        let at = (addr - base) as usize;
        assert!(
            at + len <= block.len(),
            "device access {addr:#x}+{len} outside its mapping"
        );
        &mut block[at..at + len]
    }

    fn read16(&mut self, addr: u64) -> u16 {
        u16::from_le_bytes(self.mem(addr, 2).try_into().unwrap())
    }

    fn write16(&mut self, addr: u64, v: u16) {
        self.mem(addr, 2).copy_from_slice(&v.to_le_bytes());
    }

    /// Takes newly available chains.
    fn fetch(&mut self) {
        assert!(self.queue.enable == 1, "notified before the queue is live");
        assert!(
            self.status & status::DRIVER_OK != 0,
            "notified before DRIVER_OK"
        );
        let idx = self.read16(self.queue.driver + 2);
        while self.last_avail != idx {
            let slot = u64::from(self.last_avail % self.queue.size);
            let head = self.read16(self.queue.driver + 4 + 2 * slot);
            self.pending.push(head);
            let heads = self.pending.clone();
            let flushes = heads.iter().filter(|&&h| self.is_flush(h)).count();
            if flushes > 0 && self.pending.len() > 1 {
                self.flush_overlaps += 1;
            }
            self.last_avail = self.last_avail.wrapping_add(1);
        }
        self.max_pending = self.max_pending.max(self.pending.len());
    }

    fn is_flush(&mut self, head: u16) -> bool {
        let at = self.queue.desc + 16 * u64::from(head % self.queue.size);
        let header = u64::from_le_bytes(self.mem(at, 8).try_into().unwrap());
        let kind = u32::from_le_bytes(self.mem(header, 4).try_into().unwrap());
        kind == request::FLUSH
    }

    /// Executes a random number of pending requests in random order.
    fn interrupts_armed(&mut self) -> bool {
        self.read16(self.queue.driver) & 1 == 0
    }

    fn complete_some(&mut self) {
        assert!(
            !self.pending.is_empty(),
            "the driver waits with nothing in flight: it would hang"
        );
        let count = 1 + self.rng.below(self.pending.len() as u64) as usize;
        for _ in 0..count {
            let pick = self.rng.below(self.pending.len() as u64) as usize;
            let head = self.pending.swap_remove(pick);
            self.execute(head);
        }
    }

    fn execute(&mut self, head: u16) {
        // Walk the chain, bounded by the queue size.
        let mut chain = Vec::new();
        let mut index = head;
        loop {
            assert!(index < self.queue.size, "descriptor {index} out of range");
            assert!(chain.len() < usize::from(self.queue.size), "looping chain");
            let at = self.queue.desc + 16 * u64::from(index);
            let raw = self.mem(at, 16).to_vec();
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(raw[12..14].try_into().unwrap());
            let next = u16::from_le_bytes(raw[14..16].try_into().unwrap());
            chain.push((addr, len, flags & 2 != 0));
            if flags & 1 == 0 {
                break;
            }
            index = next;
        }
        assert!(chain.len() >= 2, "a request needs a header and a status");
        let (hdr_addr, hdr_len, hdr_w) = chain[0];
        assert!(hdr_len == 16 && !hdr_w, "bad header descriptor");
        let (st_addr, st_len, st_w) = *chain.last().unwrap();
        assert!(st_len == 1 && st_w, "bad status descriptor");
        let header = self.mem(hdr_addr, 16).to_vec();
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let data = &chain[1..chain.len() - 1];
        self.max_segments_seen = self.max_segments_seen.max(data.len());
        let s = self.setup.clone();
        if s.seg_max != 0 {
            assert!(
                data.len() <= s.seg_max as usize,
                "more than seg_max segments"
            );
        }
        if s.size_max != 0 {
            assert!(
                data.iter().all(|d| d.1 <= s.size_max),
                "segment over size_max"
            );
        }
        let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
        let mut written = 1u32;
        let mut status = blks::OK;
        match kind {
            request::IN | request::OUT => {
                let device_writes = kind == request::IN;
                assert!(
                    data.iter().all(|d| d.2 == device_writes),
                    "data direction wrong"
                );
                assert!(total.is_multiple_of(SECTOR_SIZE as u64) && total > 0);
                let end = sector + total / SECTOR_SIZE as u64;
                assert!(end <= s.sectors, "request past the end reached the device");
                assert!(
                    !(kind == request::OUT && s.read_only),
                    "write to a read-only device reached it"
                );
                if self.failing.iter().any(|f| (sector..end).contains(f)) {
                    status = blks::IOERR;
                } else {
                    let mut at = sector as usize * SECTOR_SIZE;
                    for &(addr, len, _) in data {
                        let len = len as usize;
                        if device_writes {
                            let bytes = self.disk[at..at + len].to_vec();
                            self.mem(addr, len).copy_from_slice(&bytes);
                            written += len as u32;
                        } else {
                            let bytes = self.mem(addr, len).to_vec();
                            self.disk[at..at + len].copy_from_slice(&bytes);
                        }
                        at += len;
                    }
                }
            }
            request::FLUSH => {
                assert!(data.is_empty(), "flush with data");
                if !s.flush {
                    status = blks::UNSUPP;
                }
            }
            request::GET_ID => {
                assert!(total == 20 && data.iter().all(|d| d.2), "bad GET_ID buffer");
                let mut id = [0u8; 20];
                let n = s.serial.len().min(20);
                id[..n].copy_from_slice(&s.serial.as_bytes()[..n]);
                let mut from = 0;
                for &(addr, len, _) in data {
                    let len = len as usize;
                    self.mem(addr, len).copy_from_slice(&id[from..from + len]);
                    from += len;
                }
                written += 20;
            }
            _ => status = blks::UNSUPP,
        }
        if s.misbehave != Misbehave::NoStatus {
            self.mem(st_addr, 1)[0] = status;
        }
        let id = if s.misbehave == Misbehave::BogusCompletion {
            u32::from(head) + 1
        } else {
            u32::from(head)
        };
        let slot = u64::from(self.used_idx % self.queue.size);
        let elem = self.queue.device + 4 + 8 * slot;
        self.mem(elem, 4).copy_from_slice(&id.to_le_bytes());
        self.mem(elem + 4, 4)
            .copy_from_slice(&written.to_le_bytes());
        self.used_idx = self.used_idx.wrapping_add(1);
        let used = self.used_idx;
        self.write16(self.queue.device + 2, used);
        self.requests += 1;
    }
}

impl Transport for Fake {
    fn read_common(&self, offset: usize, width: Width) -> u32 {
        let s = self.state();
        let v = match offset {
            common::DEVICE_FEATURE => (s.features >> (32 * s.device_select)) as u32,
            common::NUM_QUEUES => 1,
            common::DEVICE_STATUS => u32::from(s.status),
            common::CONFIG_GENERATION => 0,
            common::QUEUE_SIZE if s.queue_select == 0 => u32::from(if s.queue.size == 0 {
                s.setup.queue_max
            } else {
                s.queue.size
            }),
            common::QUEUE_MSIX_VECTOR => u32::from(s.queue.vector),
            common::QUEUE_ENABLE => u32::from(s.queue.enable),
            common::QUEUE_NOTIFY_OFF if s.setup.misbehave == Misbehave::BadNotifyOffset => 0x4000,
            common::QUEUE_NOTIFY_OFF => 3,
            _ => 0,
        };
        let _ = width;
        v
    }

    fn write_common(&self, offset: usize, _width: Width, value: u32) {
        let mut s = self.state();
        match offset {
            common::DEVICE_FEATURE_SELECT => s.device_select = value.min(1),
            common::DRIVER_FEATURE_SELECT => s.driver_select = value.min(1),
            common::DRIVER_FEATURE => {
                let shift = 32 * s.driver_select;
                s.driver_features =
                    (s.driver_features & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
            }
            common::DEVICE_STATUS => {
                let value = value as u8;
                if value == 0 {
                    // Reset: the device forgets the queue and stops DMA.
                    s.status = 0;
                    s.queue = QueueRegs::default();
                    s.pending.clear();
                    s.last_avail = 0;
                    s.used_idx = 0;
                    return;
                }
                let mut value = value;
                if value & status::FEATURES_OK != 0 && s.status & status::FEATURES_OK == 0 {
                    let offered = s.features;
                    if s.driver_features & !offered != 0
                        || s.driver_features & feature::VERSION_1 == 0
                    {
                        value &= !status::FEATURES_OK;
                    }
                }
                s.status = value;
            }
            common::QUEUE_SELECT => s.queue_select = value as u16,
            common::QUEUE_SIZE => {
                assert!(value as u16 <= s.setup.queue_max && value > 0);
                s.queue.size = value as u16;
            }
            common::QUEUE_MSIX_VECTOR => s.queue.vector = value as u16,
            common::QUEUE_ENABLE => s.queue.enable = value as u16,
            common::QUEUE_DESC => s.queue.desc = (s.queue.desc & !0xffff_ffff) | u64::from(value),
            o if o == common::QUEUE_DESC + 4 => {
                s.queue.desc = (s.queue.desc & 0xffff_ffff) | u64::from(value) << 32
            }
            common::QUEUE_DRIVER => {
                s.queue.driver = (s.queue.driver & !0xffff_ffff) | u64::from(value)
            }
            o if o == common::QUEUE_DRIVER + 4 => {
                s.queue.driver = (s.queue.driver & 0xffff_ffff) | u64::from(value) << 32
            }
            common::QUEUE_DEVICE => {
                s.queue.device = (s.queue.device & !0xffff_ffff) | u64::from(value)
            }
            o if o == common::QUEUE_DEVICE + 4 => {
                s.queue.device = (s.queue.device & 0xffff_ffff) | u64::from(value) << 32
            }
            _ => {}
        }
    }

    fn read_device(&self, offset: usize, _width: Width) -> u32 {
        let s = self.state();
        match offset {
            0 => s.setup.sectors as u32,
            4 => (s.setup.sectors >> 32) as u32,
            8 => s.setup.size_max,
            12 => s.setup.seg_max,
            20 => 4096,
            _ => 0,
        }
    }

    fn notify(&self, offset: u32, queue: u16) {
        assert_eq!(
            (offset, queue),
            (3 * 4, 0),
            "notification to the wrong place"
        );
        self.state().fetch();
    }

    fn notify_multiplier(&self) -> u32 {
        4
    }

    fn notify_in_range(&self, offset: u32) -> bool {
        offset == 12
    }
}

impl Wait for Fake {
    fn wait(&self, done: &mut dyn FnMut() -> bool) {
        {
            let mut s = self.state();
            if s.interrupts_armed() {
                s.waits_armed += 1;
            } else {
                s.waits_unarmed += 1;
            }
        }
        while !done() {
            self.state().complete_some();
        }
    }
}
