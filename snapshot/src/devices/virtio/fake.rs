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
    /// Request queues offered (more than one offers MQ).
    pub queues: u16,
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
            queues: 1,
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

/// One request queue: its registers and the device's progress on it.
#[derive(Debug, Default, Clone)]
struct FakeQueue {
    regs: QueueRegs,
    pending: Vec<u16>,
    last_avail: u16,
    used_idx: u16,
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
    queues: Vec<FakeQueue>,
    disk: Vec<u8>,
    rng: Rng,
    failing: Vec<u64>,
    /// Largest number of requests the device held at once.
    pub max_pending: usize,
    /// Requests executed.
    pub requests: usize,
    /// Largest data segment count seen in one request.
    pub max_segments_seen: usize,
    /// Requests that reached the device alongside a flush on the same
    /// queue (a flush must be alone there: everything before it done,
    /// nothing after it started).
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
        offer(setup.queues > 1, blkf::MQ);
        let queues = vec![FakeQueue::default(); usize::from(setup.queues.max(1))];
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
            queues,
            disk,
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
        (s.interrupts_armed(0), s.waits_armed, s.waits_unarmed)
    }

    /// Requests the device holds on queue `q`, not yet completed.
    pub fn pending(&self, q: u16) -> usize {
        self.state().queues[usize::from(q)].pending.len()
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

    /// Takes queue `q`'s newly available chains.
    fn fetch(&mut self, q: usize) {
        let regs = self.queues[q].regs;
        assert!(regs.enable == 1, "notified before the queue is live");
        assert!(
            self.status & status::DRIVER_OK != 0,
            "notified before DRIVER_OK"
        );
        let idx = self.read16(regs.driver + 2);
        while self.queues[q].last_avail != idx {
            let slot = u64::from(self.queues[q].last_avail % regs.size);
            let head = self.read16(regs.driver + 4 + 2 * slot);
            self.queues[q].pending.push(head);
            let heads = self.queues[q].pending.clone();
            let flushes = heads.iter().filter(|&&h| self.is_flush(q, h)).count();
            if flushes > 0 && heads.len() > 1 {
                self.flush_overlaps += 1;
            }
            self.queues[q].last_avail = self.queues[q].last_avail.wrapping_add(1);
        }
        let pending = self.queues.iter().map(|q| q.pending.len()).sum();
        self.max_pending = self.max_pending.max(pending);
    }

    fn is_flush(&mut self, q: usize, head: u16) -> bool {
        let regs = self.queues[q].regs;
        let at = regs.desc + 16 * u64::from(head % regs.size);
        let header = u64::from_le_bytes(self.mem(at, 8).try_into().unwrap());
        let kind = u32::from_le_bytes(self.mem(header, 4).try_into().unwrap());
        kind == request::FLUSH
    }

    /// Whether queue `q`'s driver asks for completion interrupts.
    fn interrupts_armed(&mut self, q: usize) -> bool {
        let driver = self.queues[q].regs.driver;
        driver != 0 && self.read16(driver) & 1 == 0
    }

    /// Executes a random number of one queue's pending requests in random
    /// order; false if no queue has any (with several queues, another
    /// thread's wait may have taken them).
    fn complete_some(&mut self) -> bool {
        let busy: Vec<usize> = (0..self.queues.len())
            .filter(|&q| !self.queues[q].pending.is_empty())
            .collect();
        if busy.is_empty() {
            assert!(
                self.queues.len() > 1,
                "the driver waits with nothing in flight: it would hang"
            );
            return false;
        }
        let q = busy[self.rng.below(busy.len() as u64) as usize];
        let count = 1 + self.rng.below(self.queues[q].pending.len() as u64) as usize;
        for _ in 0..count {
            let pick = self.rng.below(self.queues[q].pending.len() as u64) as usize;
            let head = self.queues[q].pending.swap_remove(pick);
            self.execute(q, head);
        }
        true
    }

    fn execute(&mut self, q: usize, head: u16) {
        let regs = self.queues[q].regs;
        // Walk the chain, bounded by the queue size.
        let mut chain = Vec::new();
        let mut index = head;
        loop {
            assert!(index < regs.size, "descriptor {index} out of range");
            assert!(chain.len() < usize::from(regs.size), "looping chain");
            let at = regs.desc + 16 * u64::from(index);
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
        let slot = u64::from(self.queues[q].used_idx % regs.size);
        let elem = regs.device + 4 + 8 * slot;
        self.mem(elem, 4).copy_from_slice(&id.to_le_bytes());
        self.mem(elem + 4, 4)
            .copy_from_slice(&written.to_le_bytes());
        let used = self.queues[q].used_idx.wrapping_add(1);
        self.queues[q].used_idx = used;
        self.write16(regs.device + 2, used);
        self.requests += 1;
    }
}

impl Transport for Fake {
    fn read_common(&self, offset: usize, width: Width) -> u32 {
        let s = self.state();
        let select = s.queue_select;
        let Some(queue) = s.queues.get(usize::from(select)).map(|q| q.regs) else {
            // A queue that does not exist reads as size 0, like QEMU's.
            return match offset {
                common::DEVICE_FEATURE => (s.features >> (32 * s.device_select)) as u32,
                common::NUM_QUEUES => s.queues.len() as u32,
                common::DEVICE_STATUS => u32::from(s.status),
                _ => 0,
            };
        };
        let v = match offset {
            common::DEVICE_FEATURE => (s.features >> (32 * s.device_select)) as u32,
            common::NUM_QUEUES => s.queues.len() as u32,
            common::DEVICE_STATUS => u32::from(s.status),
            common::CONFIG_GENERATION => 0,
            common::QUEUE_SIZE => u32::from(if queue.size == 0 {
                s.setup.queue_max
            } else {
                queue.size
            }),
            common::QUEUE_MSIX_VECTOR => u32::from(queue.vector),
            common::QUEUE_ENABLE => u32::from(queue.enable),
            common::QUEUE_NOTIFY_OFF if s.setup.misbehave == Misbehave::BadNotifyOffset => 0x4000,
            common::QUEUE_NOTIFY_OFF => 3 + u32::from(select),
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
                    // Reset: the device forgets its queues and stops DMA.
                    s.status = 0;
                    for q in s.queues.iter_mut() {
                        *q = FakeQueue::default();
                    }
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
            _ => {
                let (max, select) = (s.setup.queue_max, usize::from(s.queue_select));
                let q = &mut s
                    .queues
                    .get_mut(select)
                    .expect("selected queue exists")
                    .regs;
                queue_write(q, max, offset, value);
            }
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
            // num_queues is the low half of the dword at 32.
            34 => u32::from(s.setup.queues),
            _ => 0,
        }
    }

    fn notify(&self, offset: u32, queue: u16) {
        assert_eq!(
            offset,
            (3 + u32::from(queue)) * 4,
            "notification to the wrong place"
        );
        let mut s = self.state();
        assert!(
            usize::from(queue) < s.queues.len(),
            "notified a queue that does not exist"
        );
        s.fetch(usize::from(queue));
    }

    fn notify_multiplier(&self) -> u32 {
        4
    }

    fn notify_in_range(&self, offset: u32) -> bool {
        let queues = u32::from(self.state().setup.queues.max(1));
        offset.is_multiple_of(4) && (12..12 + 4 * queues).contains(&offset)
    }
}

impl Wait for Fake {
    fn wait(&self, done: &mut dyn FnMut() -> bool) {
        {
            let mut s = self.state();
            if (0..s.queues.len()).any(|q| s.interrupts_armed(q)) {
                s.waits_armed += 1;
            } else {
                s.waits_unarmed += 1;
            }
        }
        while !done() {
            if !self.state().complete_some() {
                std::thread::yield_now();
            }
        }
    }
}

/// A write to queue register `offset` of the selected queue.
fn queue_write(q: &mut QueueRegs, max: u16, offset: usize, value: u32) {
    let low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
    let high = |old: u64| (old & 0xffff_ffff) | u64::from(value) << 32;
    match offset {
        common::QUEUE_SIZE => {
            assert!(value as u16 <= max && value > 0);
            q.size = value as u16;
        }
        common::QUEUE_MSIX_VECTOR => q.vector = value as u16,
        common::QUEUE_ENABLE => q.enable = value as u16,
        common::QUEUE_DESC => q.desc = low(q.desc),
        o if o == common::QUEUE_DESC + 4 => q.desc = high(q.desc),
        common::QUEUE_DRIVER => q.driver = low(q.driver),
        o if o == common::QUEUE_DRIVER + 4 => q.driver = high(q.driver),
        common::QUEUE_DEVICE => q.device = low(q.device),
        o if o == common::QUEUE_DEVICE + 4 => q.device = high(q.device),
        _ => {}
    }
}
