//! virtio-blk disks: the kernel's half of the driver.
//!
//! `snapshot::devices::virtio` holds the engine (negotiation, virtqueues, request
//! splitting, errors); this module supplies the hardware under it:
//! - the modern PCI transport: the common, notification and device
//!   configuration windows of the device's BARs, mapped uncached;
//! - MSI-X: table entry `i` sends request queue `i`'s completions to a
//!   vector of its own (the queues' vectors spread over the CPUs), whose
//!   handler wakes the thread waiting on that queue; with `blk=poll` on the
//!   command line (or without MSI-X) threads poll the used ring instead,
//!   yielding the CPU between bursts of checks;
//! - DMA through [`crate::memory::dma::KernelHal`].
//!
//! Disks are found at boot by walking PCI and named by the serial the host
//! gave them (`-device virtio-blk-pci,serial=...`). A disk has up to
//! [`MAX_QUEUES`] request queues (the host tool asks QEMU for that many),
//! each behind its own lock: a batch takes a free queue, and sleeps on one
//! only when all are busy, so a small write or a flush does not wait for
//! another caller's long batch. Within a batch many requests are in
//! flight; what a flush covers across queues is in
//! `snapshot::devices::virtio::blk`. Each disk sums where its batches'
//! time went, traced once at the end of the run as `blk.disk`
//! ([`totals`]); only batches of at least 1 MiB get a record of their own
//! (`blk.batch`): on the serial console a record per small batch would
//! cost more than the I/O.
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
use snapshot::devices::virtio::blk::{BlkDriver, Config};
use snapshot::devices::virtio::pci::{self as vpci, Window};
use snapshot::devices::virtio::stages::{Moments, Stages};
use snapshot::devices::virtio::{Transport, Wait, Width};
use snapshot::interface::cmdline::CmdLine;
use spin::Once;

use crate::arch::pci::PortConfig;
use crate::clock::now_ns;
use crate::memory::dma::KernelHal;
use crate::memory::mmio::Mmio;
use crate::sleep_mutex::{SleepGuard, SleepMutex};
use crate::trace::Word;

mod totals;

use totals::{kind_of, Totals, TRACED_BATCH_BYTES};
pub use totals::{trace_totals, Counters};

/// Largest queue the driver asks for: QEMU's largest (the host tool gives
/// every disk `queue-size=1024`). A 1 MiB request from scattered pages
/// takes 258 descriptors; with 256 entries such requests went out one at
/// a time.
const QUEUE_SIZE: u16 = 1024;
/// Largest single request: 1 MiB.
const MAX_REQUEST: usize = 1 << 20;
/// Most request queues per disk: enough for the callers that share a disk
/// at once (a workload, a copier, a flusher) each to have one. The host
/// tool gives every disk `num-queues=4`.
pub const MAX_QUEUES: u16 = 4;
/// Bytes of device configuration the driver reads to use several queues
/// (`num_queues` ends at byte 36).
const MQ_CONFIG_BYTES: u32 = 36;

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
    /// Per queue: when its last notification write began and ended (for
    /// [`Stages`]).
    kick: Kicks,
}

/// Per queue, when its last notification write began and ended.
type Kicks = Arc<[[AtomicU64; 2]; MAX_QUEUES as usize]>;

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
        let kick = &self.kick[usize::from(queue) % MAX_QUEUES as usize];
        kick[0].store(start, Ordering::Relaxed);
        kick[1].store(end, Ordering::Relaxed);
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

/// One request queue's driver, shared by a disk's queues' transport.
type Driver = BlkDriver<Arc<PciTransport>, KernelHal>;

/// One request queue of a disk: its driver behind its own lock, and how
/// a thread waits for its completions.
struct DiskQueue {
    driver: SleepMutex<Driver>,
    how: Waiter,
    /// The CPU its completion interrupts go to: callers on that CPU try
    /// it first.
    cpu: usize,
}

/// A virtio-blk disk.
pub struct VirtioBlk {
    info: DiskInfo,
    totals: Totals,
    notify_ns: Arc<AtomicU64>,
    kick: Kicks,
    stages: spin::Mutex<Stages>,
    name: &'static str,
    address: Address,
    queues: Vec<DiskQueue>,
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
        matches!(self.queues[0].how, Waiter::Interrupt(_))
    }

    /// Request queues in use.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
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
    /// `[batches, bytes, ns holding a queue]`, and the ns callers waited
    /// for a free queue.
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

    /// Completion interrupts taken so far, on all queues.
    pub fn interrupt_count(&self) -> u64 {
        self.queues
            .iter()
            .map(|q| match q.how {
                Waiter::Interrupt(v) => INTERRUPTS[usize::from(v)].load(Ordering::Relaxed),
                Waiter::Poll => 0,
            })
            .sum()
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
            kick: Arc::new([const { [const { AtomicU64::new(0) }; 2] }; MAX_QUEUES as usize]),
        };
        let notify_ns = transport.notify_ns.clone();
        let kick = transport.kick.clone();
        let mut queues = if layout.device.length >= MQ_CONFIG_BYTES {
            MAX_QUEUES
        } else {
            1
        };
        let msix = if poll { None } else { pci::msix(&cfg, at) };
        let vectors = match msix {
            Some(msix) => {
                queues = queues.min(msix.entries);
                enable_msix(&cfg, at, &msix, queues)?
            }
            None => Vec::new(),
        };
        let how = |i: usize| {
            vectors
                .get(i)
                .map_or(Waiter::Poll, |&(v, _)| Waiter::Interrupt(v))
        };
        let cpu = |i: usize| {
            vectors
                .get(i)
                .map_or(i % crate::thread::cpus(), |&(_, c)| c)
        };
        let config = Config {
            name: format!("virtio@{at}"),
            queue_size: QUEUE_SIZE,
            vector: (!vectors.is_empty()).then_some(0),
            // Fewer vectors than asked (none free): fewer queues.
            queues: if vectors.is_empty() {
                queues
            } else {
                vectors.len() as u16
            },
            interrupts: !vectors.is_empty(),
            max_request_bytes: MAX_REQUEST,
        };
        let mut drivers = BlkDriver::new_queues(Arc::new(transport), KernelHal, &config)
            .map_err(|e| format!("{e}"))?;
        let wait = TimedWait::new(how(0));
        // A device without GET_ID keeps its PCI name.
        let name = match drivers[0].identify(&wait) {
            Ok(name) => name,
            Err(e) if e.kind == ErrorKind::Unsupported => String::new(),
            Err(e) => return Err(format!("{e}")),
        };
        let name = if name.is_empty() { config.name } else { name };
        for driver in drivers.iter_mut() {
            driver.set_name(name.clone());
        }
        Ok(VirtioBlk {
            info: drivers[0].info().clone(),
            name: alloc::boxed::Box::leak(name.into_boxed_str()),
            address: at,
            totals: Totals::default(),
            notify_ns,
            kick,
            stages: spin::Mutex::new(Stages::default()),
            queues: drivers
                .into_iter()
                .enumerate()
                .map(|(i, driver)| DiskQueue {
                    driver: SleepMutex::new(driver),
                    how: how(i),
                    cpu: cpu(i),
                })
                .collect(),
        })
    }
}

/// Disks' completion interrupts go to the CPUs in turn (the waiting
/// thread reaps its completions on whichever CPU it runs).
static NEXT_CPU: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Points MSI-X table entries `0..count` each at a fresh vector on the next
/// CPU's APIC (a disk's queues on CPUs in turn); fewer if the vectors run
/// out (at least one). Returns each entry's vector and CPU.
fn enable_msix(
    cfg: &PortConfig,
    at: Address,
    msix: &pci::Msix,
    count: u16,
) -> Result<Vec<(u8, usize)>, String> {
    let Bar::Memory { base, .. } = pci::bar(cfg, at, msix.table_bar) else {
        return Err(format!("MSI-X table BAR {} is not memory", msix.table_bar));
    };
    let table = Mmio::map(
        base + u64::from(msix.table_offset),
        usize::from(msix.entries) * pci::MSIX_ENTRY_SIZE,
    )
    .map_err(|e| format!("cannot map the MSI-X table: {e:?}"))?;
    let mut vectors = Vec::new();
    for entry in 0..usize::from(count) {
        let Some(vector) = crate::arch::trap::alloc_vector(on_interrupt) else {
            break;
        };
        let cpu = NEXT_CPU.fetch_add(1, Ordering::Relaxed) % crate::thread::cpus();
        let apic_id = crate::arch::percpu::apic_id(cpu);
        crate::trace!("blk.msix", vector = u64::from(vector), cpu = cpu as u64);
        let (addr, data) = pci::msi_message(apic_id as u8, vector);
        let at = entry * pci::MSIX_ENTRY_SIZE;
        table.write32(at, addr as u32);
        table.write32(at + 4, (addr >> 32) as u32);
        table.write32(at + 8, data);
        table.write32(at + 12, 0); // unmasked
        vectors.push((vector, cpu));
    }
    if vectors.is_empty() {
        return Err(String::from("no free interrupt vector"));
    }
    // `Mmio` mappings are never torn down, so the table stays mapped.
    pci::enable_msix(cfg, at, msix);
    Ok(vectors)
}

impl BlockDevice for VirtioBlk {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&self, ops: &mut [Op<'_>], depth: usize) -> Result<(), BlockError> {
        let start = now_ns();
        let kind = kind_of(ops);
        let (queue, mut driver) = self.take_queue();
        let locked = now_ns();
        let wait = TimedWait::new(queue.how);
        let result = driver.transfer(ops, depth, &wait);
        let stats = driver.take_stats();
        if stats.requests == 1 && stats.notifies == 1 {
            self.account_single(start, &wait, queue.how, driver.queue_index());
        }
        drop(driver);
        if driver_broken(&result) {
            // The device was reset: threads sleeping on other queues'
            // vectors get no interrupt and must look again.
            for q in &self.queues {
                if let Waiter::Interrupt(v) = q.how {
                    crate::thread::wake_all(wake_key(v));
                }
            }
        }
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

fn driver_broken(result: &Result<(), BlockError>) -> bool {
    matches!(result, Err(e) if matches!(e.kind, ErrorKind::Broken(_)))
}

impl VirtioBlk {
    /// A free queue: first those whose interrupts come to this CPU (the
    /// woken caller then runs where it was), then the others; when all
    /// are busy, sleeps for the first of this CPU's (in its lock's order).
    fn take_queue(&self) -> (&DiskQueue, SleepGuard<'_, Driver>) {
        let here = crate::thread::current_cpu();
        let mine = self.queues.iter().filter(|q| q.cpu == here);
        let others = self.queues.iter().filter(|q| q.cpu != here);
        for queue in mine.clone().chain(others) {
            if let Some(driver) = queue.driver.try_lock() {
                return (queue, driver);
            }
        }
        let queue = mine
            .clone()
            .next()
            .unwrap_or(&self.queues[here % self.queues.len()]);
        (queue, queue.driver.lock())
    }

    /// Adds a batch of one request to [`Stages`]; called with the queue's
    /// lock held, so the queue's notification timestamps are this batch's.
    fn account_single(&self, start: u64, wait: &TimedWait, how: Waiter, queue: u16) {
        let interrupt = match how {
            Waiter::Interrupt(v) => Some(INTERRUPTED_AT[usize::from(v)].load(Ordering::Relaxed)),
            Waiter::Poll => None,
        };
        let kick = &self.kick[usize::from(queue) % MAX_QUEUES as usize];
        let [kick_start, kick_end] = kick.each_ref().map(|t| t.load(Ordering::Relaxed));
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
                        "disk \"{}\" at {}: {} sectors ({}){}, {} queue(s) of {}, {}",
                        info.name,
                        f.address,
                        info.sectors,
                        snapshot::interface::units::format_size(info.bytes()),
                        if info.read_only { ", read-only" } else { "" },
                        disk.queues.len(),
                        info.max_depth,
                        match disk.queues[0].how {
                            Waiter::Interrupt(v) => format!("MSI-X vectors from {v:#x}"),
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
