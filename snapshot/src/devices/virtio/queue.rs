//! The driver's side of a split virtqueue (virtio 1.x, 2.7): a descriptor
//! table, the available ring the driver fills and the used ring the device
//! fills, in one [`DmaRegion`].
//!
//! Memory ordering: descriptors and the ring slot are written before the
//! available index is published (release); the used index is read before
//! the used element (acquire); and a full fence separates publishing from
//! reading the device's "don't notify me" flag, so a notification is never
//! skipped for a request the device has not seen.
//!
//! The free list and chain links are kept in driver memory, never read
//! back from the shared table, so a misbehaving device can at worst report
//! a completion that is refused ([`QueueError`]), not corrupt the driver.

use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

use super::{DmaRegion, Segment};

const DESC_SIZE: usize = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Available-ring flag: the driver does not want interrupts.
const AVAIL_NO_INTERRUPT: u16 = 1;
/// Used-ring flag: the device does not want notifications.
const USED_NO_NOTIFY: u16 = 1;

/// Where the three parts of a queue of a given size sit in its region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Descriptor table offset (16-byte aligned).
    pub desc: usize,
    /// Available ring offset (2-byte aligned).
    pub avail: usize,
    /// Used ring offset (4-byte aligned).
    pub used: usize,
    /// Total bytes.
    pub bytes: usize,
}

impl Layout {
    /// The layout for `size` entries.
    pub fn new(size: u16) -> Self {
        let n = usize::from(size);
        let avail = DESC_SIZE * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        Layout {
            desc: 0,
            avail,
            used,
            bytes: used + 6 + 8 * n,
        }
    }
}

/// One buffer of a chain: where, and whether the device writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// The memory.
    pub segment: Segment,
    /// The device writes it (otherwise it reads it).
    pub device_writes: bool,
}

/// A device that broke the queue protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueError(pub &'static str);

/// A split virtqueue, driver side.
#[derive(Debug)]
pub struct SplitQueue<R> {
    region: R,
    layout: Layout,
    size: u16,
    /// Free descriptor indices (a stack; the top is the next head).
    free: Vec<u16>,
    /// Per descriptor: the next in its chain (driver's own copy).
    next: Vec<u16>,
    /// Per head: descriptors in its chain, 0 if not in flight.
    chain_len: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    in_flight: u16,
}

impl<R: DmaRegion> SplitQueue<R> {
    /// A queue of `size` (a power of two) entries in `region`, which must
    /// be zeroed and at least [`Layout::new`]`(size).bytes` long.
    pub fn new(region: R, size: u16) -> Self {
        assert!(size.is_power_of_two(), "queue size {size}");
        let layout = Layout::new(size);
        assert!(region.len() >= layout.bytes, "queue region too small");
        SplitQueue {
            region,
            layout,
            size,
            free: (0..size).rev().collect(),
            next: alloc::vec![0; usize::from(size)],
            chain_len: alloc::vec![0; usize::from(size)],
            avail_idx: 0,
            last_used: 0,
            in_flight: 0,
        }
    }

    /// The region holding the rings.
    pub fn region(&self) -> &R {
        &self.region
    }

    /// Where the rings are in the region.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Entries in the queue.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors not in use.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains the device has not returned yet.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// The head index the next [`SplitQueue::add`] will use, if any
    /// descriptor is free. Per-request side tables can be indexed by it.
    pub fn next_head(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Asks the device not to interrupt (polling), or to interrupt again.
    pub fn set_interrupts(&self, enabled: bool) {
        let flags = if enabled { 0 } else { AVAIL_NO_INTERRUPT };
        self.region.write_u16(self.layout.avail, flags);
    }

    /// Adds a chain and makes it available; returns its head, or `None` if
    /// there are not enough free descriptors (nothing is changed then).
    pub fn add(&mut self, parts: &[Part]) -> Option<u16> {
        if parts.is_empty() || parts.len() > self.free.len() {
            return None;
        }
        // The chain takes the top of the free stack, top first; no
        // allocation on this path.
        let top = self.free.len() - 1;
        let index_of = |i: usize| self.free[top - i];
        let head = index_of(0);
        for (i, part) in parts.iter().enumerate() {
            let index = index_of(i);
            let next = (i + 1 < parts.len()).then(|| index_of(i + 1));
            let mut flags = if next.is_some() { F_NEXT } else { 0 };
            if part.device_writes {
                flags |= F_WRITE;
            }
            let at = self.layout.desc + DESC_SIZE * usize::from(index);
            self.region.write_u64(at, part.segment.addr);
            self.region.write_u32(at + 8, part.segment.len);
            self.region.write_u16(at + 12, flags);
            self.region.write_u16(at + 14, next.unwrap_or(0));
            self.next[usize::from(index)] = next.unwrap_or(0);
        }
        self.free.truncate(self.free.len() - parts.len());
        self.chain_len[usize::from(head)] = parts.len() as u16;
        let slot = usize::from(self.avail_idx % self.size);
        self.region
            .write_u16(self.layout.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The descriptors and the slot are visible before the index.
        fence(Ordering::Release);
        self.region.write_u16(self.layout.avail + 2, self.avail_idx);
        self.in_flight += 1;
        Some(head)
    }

    /// Whether the device wants to be notified of new chains.
    pub fn needs_notify(&self) -> bool {
        // Publishing the index must not pass this read.
        fence(Ordering::SeqCst);
        self.region.read_u16(self.layout.used) & USED_NO_NOTIFY == 0
    }

    fn used_idx(&self) -> u16 {
        self.region.read_u16(self.layout.used + 2)
    }

    /// Whether the device has returned chains not yet popped.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Takes the next returned chain: its head and the bytes the device
    /// says it wrote. Its descriptors are free again.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
        let used_idx = self.used_idx();
        if used_idx == self.last_used {
            return Ok(None);
        }
        if used_idx.wrapping_sub(self.last_used) > self.in_flight {
            return Err(QueueError("used index ahead of the requests in flight"));
        }
        // The element is read after the index that published it.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        let at = self.layout.used + 4 + 8 * slot;
        let id = self.region.read_u32(at);
        let len = self.region.read_u32(at + 4);
        let Some(head) = u16::try_from(id).ok().filter(|&h| h < self.size) else {
            return Err(QueueError("completion for a descriptor outside the queue"));
        };
        let count = self.chain_len[usize::from(head)];
        if count == 0 {
            return Err(QueueError("completion for a request not in flight"));
        }
        self.chain_len[usize::from(head)] = 0;
        let mut index = head;
        for _ in 0..count {
            self.free.push(index);
            index = self.next[usize::from(index)];
        }
        self.last_used = self.last_used.wrapping_add(1);
        self.in_flight -= 1;
        Ok(Some((head, len)))
    }
}
