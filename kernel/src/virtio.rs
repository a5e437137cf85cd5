//! virtio-blk disks: the kernel's half of the driver.
//!
//! `snapshot::devices::virtio` holds the engine (negotiation, virtqueues, request
//! splitting, errors); this module supplies the hardware under it:
//! - the modern PCI transport: the common, notification and device
//!   configuration windows of the device's BARs, mapped uncached;
//! - MSI-X: table entry 0 sends the request queue's completions to a
//!   vector whose handler wakes the waiting thread; with `blk=poll` on the
//!   command line (or without MSI-X) threads poll the used ring instead,
//!   yielding the CPU between bursts of checks;
//! - DMA through [`crate::memory::dma::KernelHal`].
//!
//! Disks are found at boot by walking PCI and named by the serial the host
//! gave them (`-device virtio-blk-pci,serial=...`). A disk runs one batch at
//! a time (other callers sleep on its lock), with many requests in flight
//! within the batch. Each disk sums where its batches' time went, traced
//! once at the end of the run as `blk.disk`; only batches of at least 1 MiB
//! get a record of their own (`blk.batch`): on the serial console a record
//! per small batch would cost more than the I/O.
//!
//! Must never panic on a device's behalf: a device that fails to come up is
//! logged and skipped, and errors reach callers as [`BlockError`] values.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use snapshot::devices::block::{BlockDevice, BlockError, DiskInfo, ErrorKind, Op};
use snapshot::devices::pci::{self, Address, Bar, ConfigSpace};
use snapshot::devices::virtio::blk::{BlkDriver, Config, Stats};
use snapshot::devices::virtio::pci::{self as vpci, Window};
use snapshot::devices::virtio::stages::{Moments, Stages};
use snapshot::devices::virtio::{Transport, Wait, Width};
use snapshot::interface::cmdline::CmdLine;
use spin::Once;

use crate::arch::pci::PortConfig;
use crate::clock::now_ns;
use crate::memory::dma::KernelHal;
use crate::memory::mmio::Mmio;
use crate::sleep_mutex::SleepMutex;
use crate::trace::Word;

/// Largest queue the driver asks for: QEMU's largest (the host tool gives
/// every disk `queue-size=1024`). A 1 MiB request from scattered pages
/// takes 258 descriptors; with 256 entries such requests went out one at
/// a time.
const QUEUE_SIZE: u16 = 1024;
/// Largest single request: 1 MiB.
const MAX_REQUEST: usize = 1 << 20;

/// The modern virtio PCI transport over mapped BAR windows.
#[derive(Debug)]
pub struct PciTransport {
    common: Mmio,
    notify: Mmio,
    device: Mmio,
    multiplier: u32,
    /// Time spent in notification writes (under TCG the device starts
    /// processing the queue inside the write).
    notify_ns: Arc<AtomicU64>,
    /// When the last notification write began and ended (for [`Stages`]).
    kick: Arc<[AtomicU64; 2]>,
}

impl Transport for PciTransport {
    fn read_common(&self, offset: usize, width: Width) -> u32 {
        read(&self.common, offset, width)
    }

    fn write_common(&self, offset: usize, width: Width, value: u32) {
        match width {
            Width::U8 => self.common.write8(offset, value as u8),
            Width::U16 => self.common.write16(offset, value as u16),
            Width::U32 => self.common.write32(offset, value),
        }
    }

    fn read_device(&self, offset: usize, width: Width) -> u32 {
        read(&self.device, offset, width)
    }

    fn notify(&self, offset: u32, queue: u16) {
        let start = now_ns();
        self.notify.write16(offset as usize, queue);
        let end = now_ns();
        self.notify_ns.fetch_add(end - start, Ordering::Relaxed);
        self.kick[0].store(start, Ordering::Relaxed);
        self.kick[1].store(end, Ordering::Relaxed);
    }

    fn notify_multiplier(&self) -> u32 {
        self.multiplier
    }

    fn notify_in_range(&self, offset: u32) -> bool {
        self.notify.len() >= 2 && offset as usize <= self.notify.len() - 2
    }
}

fn read(mmio: &Mmio, offset: usize, width: Width) -> u32 {
    match width {
        Width::U8 => u32::from(mmio.read8(offset)),
        Width::U16 => u32::from(mmio.read16(offset)),
        Width::U32 => mmio.read32(offset),
    }
}

/// Per-vector completion interrupts, and the wait keys they wake.
static INTERRUPTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
/// Per vector: when its handler last ran (for [`Stages`]).
static INTERRUPTED_AT: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

fn wake_key(vector: u8) -> usize {
    &INTERRUPTS[usize::from(vector)] as *const AtomicU64 as usize
}

fn on_interrupt(vector: u8) {
    INTERRUPTED_AT[usize::from(vector)].store(now_ns(), Ordering::Relaxed);
    INTERRUPTS[usize::from(vector)].fetch_add(1, Ordering::Relaxed);
    crate::thread::wake_all_now(wake_key(vector));
}

/// How a thread waits for its disk.
#[derive(Debug, Clone, Copy)]
enum Waiter {
    /// Sleep until the disk's MSI-X vector fires.
    Interrupt(u8),
    /// Spin on the used ring.
    Poll,
}

/// A [`Waiter`] that also times its waiting.
#[derive(Debug)]
struct TimedWait {
    how: Waiter,
    waited_ns: AtomicU64,
    /// When the last wait ended: the completion was seen (for [`Stages`]).
    seen_at: AtomicU64,
}

impl TimedWait {
    fn new(how: Waiter) -> Self {
        TimedWait {
            how,
            waited_ns: AtomicU64::new(0),
            seen_at: AtomicU64::new(0),
        }
    }
}

impl Wait for TimedWait {
    fn wait(&self, done: &mut dyn FnMut() -> bool) {
        let start = now_ns();
        match self.how {
            Waiter::Interrupt(vector) => crate::thread::block_until(wake_key(vector), done),
            Waiter::Poll => {
                // Spin briefly, then let other threads run between checks
                // (a poller that kept the CPU would starve the others).
                let mut spins = 0u32;
                while !done() {
                    spins += 1;
                    if spins.is_multiple_of(64) {
                        crate::thread::yield_now();
                    } else {
                        core::hint::spin_loop();
                    }
                }
            }
        }
        let end = now_ns();
        self.waited_ns.fetch_add(end - start, Ordering::Relaxed);
        self.seen_at.store(end, Ordering::Relaxed);
    }
}

/// Where a disk's time went, summed over its batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Batches run.
    pub batches: u64,
    /// Requests sent to the device.
    pub requests: u64,
    /// Data bytes moved.
    pub bytes: u64,
    /// Time inside batches.
    pub busy_ns: u64,
    /// Of which waiting for the device (the rest is the driver's own work).
    pub wait_ns: u64,
    /// Of the driver's own work, time in notification writes.
    pub notify_ns: u64,
}

/// A disk's sums since boot, added to after every batch and traced once
/// at the end of the run ([`trace_totals`]).
#[derive(Debug, Default)]
struct Totals {
    batches: AtomicU64,
    requests: AtomicU64,
    bytes: AtomicU64,
    busy_ns: AtomicU64,
    wait_ns: AtomicU64,
    notifies: AtomicU64,
    waits: AtomicU64,
    failed: AtomicU64,
    max_in_flight: AtomicU64,
    /// Batches by kind (holding a flush; else writing; else reading):
    /// how many, their bytes, and the ns each held the disk.
    kinds: [[AtomicU64; 3]; 3],
    /// ns callers slept waiting for the disk's lock.
    lock_wait_ns: AtomicU64,
}

/// The kind of a batch, for [`Totals::kinds`]: 0 reads only, 1 writes
/// (no flush), 2 holds a flush.
fn kind_of(ops: &[Op<'_>]) -> usize {
    if ops.iter().any(|o| matches!(o, Op::Flush)) {
        2
    } else if ops.iter().any(|o| matches!(o, Op::Write { .. })) {
        1
    } else {
        0
    }
}

impl Totals {
    fn add(&self, stats: &Stats, busy_ns: u64, wait_ns: u64, ok: bool) {
        for (total, add) in [
            (&self.batches, 1),
            (&self.requests, stats.requests),
            (&self.bytes, stats.bytes),
            (&self.busy_ns, busy_ns),
            (&self.wait_ns, wait_ns),
            (&self.notifies, stats.notifies),
            (&self.waits, stats.waits),
            (&self.failed, u64::from(!ok)),
        ] {
            total.fetch_add(add, Ordering::Relaxed);
        }
        self.max_in_flight
            .fetch_max(u64::from(stats.max_in_flight), Ordering::Relaxed);
    }
}

/// Batches moving at least this many bytes are traced one by one
/// (`blk.batch`); smaller ones only in the disk's sums.
const TRACED_BATCH_BYTES: u64 = 1 << 20;

/// A virtio-blk disk.
pub struct VirtioBlk {
    info: DiskInfo,
    totals: Totals,
    notify_ns: Arc<AtomicU64>,
    kick: Arc<[AtomicU64; 2]>,
    stages: spin::Mutex<Stages>,
    name: &'static str,
    address: Address,
    how: Waiter,
    driver: SleepMutex<BlkDriver<PciTransport, KernelHal>>,
}

impl core::fmt::Debug for VirtioBlk {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("info", &self.info)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl VirtioBlk {
    /// Whether completions arrive by interrupt (else the driver polls).
    pub fn interrupts(&self) -> bool {
        matches!(self.how, Waiter::Interrupt(_))
    }

    /// Where this disk's time went so far.
    pub fn counters(&self) -> Counters {
        let t = &self.totals;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            batches: load(&t.batches),
            requests: load(&t.requests),
            bytes: load(&t.bytes),
            busy_ns: load(&t.busy_ns),
            wait_ns: load(&t.wait_ns),
            notify_ns: self.notify_ns.load(Ordering::Relaxed),
        }
    }

    /// Batches by kind so far, `[reads, writes, flushes]`, each
    /// `[batches, bytes, ns holding the disk]`, and the ns callers waited
    /// for the disk's lock.
    pub fn kinds(&self) -> ([[u64; 3]; 3], u64) {
        let t = &self.totals;
        let k = t
            .kinds
            .each_ref()
            .map(|k| k.each_ref().map(|c| c.load(Ordering::Relaxed)));
        (k, t.lock_wait_ns.load(Ordering::Relaxed))
    }

    /// Where the time of single-request batches went so far.
    pub fn stages(&self) -> Stages {
        *self.stages.lock()
    }

    /// Completion interrupts taken so far.
    pub fn interrupt_count(&self) -> u64 {
        match self.how {
            Waiter::Interrupt(v) => INTERRUPTS[usize::from(v)].load(Ordering::Relaxed),
            Waiter::Poll => 0,
        }
    }

    fn probe(f: &pci::Function, poll: bool) -> Result<VirtioBlk, String> {
        let cfg = PortConfig;
        let at = f.address;
        let caps = pci::capabilities(&cfg, at);
        let layout = vpci::layout(&cfg, at, &caps).map_err(|e| format!("{e}"))?;
        // The block configuration fields read at bring-up end at byte 24.
        if layout.device.length < 24 {
            return Err(format!(
                "device configuration window of {} bytes is too small",
                layout.device.length
            ));
        }
        pci::enable(
            &cfg,
            at,
            pci::reg::COMMAND_MEMORY | pci::reg::COMMAND_BUS_MASTER,
        );
        let window = |w: Window| -> Result<Mmio, String> {
            match pci::bar(&cfg, at, w.bar) {
                Bar::Memory { base, .. } => {
                    Mmio::map(base + u64::from(w.offset), w.length as usize)
                        .map_err(|e| format!("cannot map BAR {}: {e:?}", w.bar))
                }
                other => Err(format!("BAR {} is not memory: {other:?}", w.bar)),
            }
        };
        let transport = PciTransport {
            common: window(layout.common)?,
            notify: window(layout.notify)?,
            device: window(layout.device)?,
            multiplier: layout.notify_multiplier,
            notify_ns: Arc::new(AtomicU64::new(0)),
            kick: Arc::new([const { AtomicU64::new(0) }; 2]),
        };
        let notify_ns = transport.notify_ns.clone();
        let kick = transport.kick.clone();
        let msix = if poll { None } else { pci::msix(&cfg, at) };
        let how = match msix {
            Some(msix) => Waiter::Interrupt(enable_msix(&cfg, at, &msix)?),
            None => Waiter::Poll,
        };
        let config = Config {
            name: format!("virtio@{at}"),
            queue_size: QUEUE_SIZE,
            vector: matches!(how, Waiter::Interrupt(_)).then_some(0),
            interrupts: matches!(how, Waiter::Interrupt(_)),
            max_request_bytes: MAX_REQUEST,
        };
        let mut driver =
            BlkDriver::new(transport, KernelHal, &config).map_err(|e| format!("{e}"))?;
        let wait = TimedWait::new(how);
        // A device without GET_ID keeps its PCI name.
        let name = match driver.identify(&wait) {
            Ok(name) => name,
            Err(e) if e.kind == ErrorKind::Unsupported => String::new(),
            Err(e) => return Err(format!("{e}")),
        };
        let name = if name.is_empty() { config.name } else { name };
        driver.set_name(name.clone());
        Ok(VirtioBlk {
            info: driver.info().clone(),
            name: alloc::boxed::Box::leak(name.into_boxed_str()),
            address: at,
            how,
            totals: Totals::default(),
            notify_ns,
            kick,
            stages: spin::Mutex::new(Stages::default()),
            driver: SleepMutex::new(driver),
        })
    }
}

/// Disks' completion interrupts go to the CPUs in turn (the waiting
/// thread reaps its completions on whichever CPU it runs).
static NEXT_CPU: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Points MSI-X table entry 0 at a fresh vector on the next CPU's APIC.
fn enable_msix(cfg: &PortConfig, at: Address, msix: &pci::Msix) -> Result<u8, String> {
    let Bar::Memory { base, .. } = pci::bar(cfg, at, msix.table_bar) else {
        return Err(format!("MSI-X table BAR {} is not memory", msix.table_bar));
    };
    let table = Mmio::map(
        base + u64::from(msix.table_offset),
        usize::from(msix.entries) * pci::MSIX_ENTRY_SIZE,
    )
    .map_err(|e| format!("cannot map the MSI-X table: {e:?}"))?;
    let vector = crate::arch::trap::alloc_vector(on_interrupt)
        .ok_or_else(|| String::from("no free interrupt vector"))?;
    let cpu = NEXT_CPU.fetch_add(1, Ordering::Relaxed) % crate::thread::cpus();
    let apic_id = crate::arch::percpu::apic_id(cpu);
    crate::trace!("blk.msix", vector = u64::from(vector), cpu = cpu as u64);
    let (addr, data) = pci::msi_message(apic_id as u8, vector);
    table.write32(0, addr as u32);
    table.write32(4, (addr >> 32) as u32);
    table.write32(8, data);
    table.write32(12, 0); // unmasked
                          // `Mmio` mappings are never torn down, so the table stays mapped.
    pci::enable_msix(cfg, at, msix);
    Ok(vector)
}

impl BlockDevice for VirtioBlk {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&self, ops: &mut [Op<'_>], depth: usize) -> Result<(), BlockError> {
        let start = now_ns();
        let kind = kind_of(ops);
        let mut driver = self.driver.lock();
        let locked = now_ns();
        let wait = TimedWait::new(self.how);
        let result = driver.transfer(ops, depth, &wait);
        let stats = driver.take_stats();
        if stats.requests == 1 && stats.notifies == 1 {
            self.account_single(start, &wait);
        }
        drop(driver);
        let end = now_ns();
        let total_ns = end - start;
        let k = &self.totals.kinds[kind];
        for (c, v) in k.iter().zip([1, stats.bytes, end - locked]) {
            c.fetch_add(v, Ordering::Relaxed);
        }
        self.totals
            .lock_wait_ns
            .fetch_add(locked - start, Ordering::Relaxed);
        let waited = wait.waited_ns.load(Ordering::Relaxed);
        // A record printed on the serial console costs about 100 µs, five
        // times the rest of a 4 KiB read, so only batches large enough for
        // that to vanish in their own time get one (the snapshot writer's
        // and the backup's windows, for trace viewers); the sums of all
        // are traced once, at the end.
        self.totals.add(&stats, total_ns, waited, result.is_ok());
        if stats.bytes >= TRACED_BATCH_BYTES {
            crate::trace!(
                "blk.batch",
                disk = Word(self.name),
                bytes = stats.bytes,
                requests = stats.requests,
                max_inflight = stats.max_in_flight,
                total_ns = total_ns,
                ok = result.is_ok(),
            );
        }
        result
    }
}

impl VirtioBlk {
    /// Adds a batch of one request to [`Stages`]; called with the disk's
    /// lock held, so the notification's timestamps are this batch's.
    fn account_single(&self, start: u64, wait: &TimedWait) {
        let interrupt = match self.how {
            Waiter::Interrupt(v) => Some(INTERRUPTED_AT[usize::from(v)].load(Ordering::Relaxed)),
            Waiter::Poll => None,
        };
        let [kick_start, kick_end] = self.kick.each_ref().map(|t| t.load(Ordering::Relaxed));
        let seen = wait.seen_at.load(Ordering::Relaxed);
        let one = Stages::of(&Moments {
            start,
            kick: (kick_start, kick_end),
            interrupt,
            seen: (seen != 0).then_some(seen),
            end: now_ns(),
        });
        self.stages.lock().add(&one);
    }
}

/// Traces every used disk's sums since boot (`blk.disk`,
/// `blk.disk_time`, which the host tool's block-layer report reads, and
/// `blk.disk_kinds`, `blk.disk_flush`: batches, bytes and time holding
/// the disk by kind, flushes, time waiting for the disk's lock). Called
/// once, as the run ends.
pub fn trace_totals() {
    for disk in disks() {
        let t = &disk.totals;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        if load(&t.batches) == 0 {
            continue;
        }
        crate::trace!(
            "blk.disk",
            disk = Word(disk.name),
            batches = load(&t.batches),
            requests = load(&t.requests),
            bytes = load(&t.bytes),
            max_inflight = load(&t.max_in_flight),
            failed = load(&t.failed),
        );
        crate::trace!(
            "blk.disk_time",
            disk = Word(disk.name),
            busy_ns = load(&t.busy_ns),
            wait_ns = load(&t.wait_ns),
            notifies = load(&t.notifies),
            waits = load(&t.waits),
        );
        let [r, w, f] = &t.kinds;
        crate::trace!(
            "blk.disk_kinds",
            disk = Word(disk.name),
            reads = load(&r[0]),
            read_bytes = load(&r[1]),
            read_ns = load(&r[2]),
            writes = load(&w[0]),
            write_bytes = load(&w[1]),
        );
        crate::trace!(
            "blk.disk_flush",
            disk = Word(disk.name),
            write_ns = load(&w[2]),
            flushes = load(&f[0]),
            flush_ns = load(&f[2]),
            lock_wait_ns = load(&t.lock_wait_ns),
        );
    }
}

static DISKS: Once<Vec<Arc<VirtioBlk>>> = Once::new();

/// Finds and brings up every virtio-blk device; `blk=poll` on the command
/// line makes all of them poll.
pub fn init(cmd: &CmdLine<'_>) {
    let poll = cmd.get("blk") == Some("poll");
    DISKS.call_once(|| {
        let mut disks = Vec::new();
        for f in pci::enumerate(&PortConfig)
            .iter()
            .filter(|f| vpci::is_block(f.vendor, f.device))
        {
            match VirtioBlk::probe(f, poll) {
                Ok(disk) => {
                    let info = disk.info();
                    crate::log!(
                        "disk \"{}\" at {}: {} sectors ({}){}, queue {}, {}",
                        info.name,
                        f.address,
                        info.sectors,
                        snapshot::interface::units::format_size(info.bytes()),
                        if info.read_only { ", read-only" } else { "" },
                        info.max_depth,
                        match disk.how {
                            Waiter::Interrupt(v) => format!("MSI-X vector {v:#x}"),
                            Waiter::Poll => String::from("polled"),
                        }
                    );
                    disks.push(Arc::new(disk));
                }
                Err(e) => crate::log!("virtio-blk at {}: not usable: {e}", f.address),
            }
        }
        disks
    });
}

/// Every disk found at boot.
pub fn disks() -> &'static [Arc<VirtioBlk>] {
    DISKS.get().map_or(&[], Vec::as_slice)
}

/// The disk the host named `name`.
pub fn disk(name: &str) -> Result<Arc<VirtioBlk>, BlockError> {
    disks()
        .iter()
        .find(|d| d.info().name == name)
        .cloned()
        .ok_or_else(|| {
            let present: Vec<&str> = disks().iter().map(|d| d.info().name.as_str()).collect();
            BlockError::new(
                name,
                None,
                ErrorKind::NotFound {
                    present: present.join(", "),
                },
            )
        })
}

/// Reads configuration dword `offset` of a disk's PCI function (tests).
pub fn config_dword(disk: &VirtioBlk, offset: u8) -> u32 {
    PortConfig.read32(disk.address, offset)
}
