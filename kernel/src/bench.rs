//! Benchmarks run inside the kernel. Each measures its baselines in the same
//! boot (absolute times drift on shared machines), prints a human summary,
//! and ends with one `BENCH-JSON {...}` line that the host tool writes to
//! the file given with `--json`.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use snapshot::interface::cmdline::CmdLine;

use crate::arch::qemu::ExitCode;
use crate::clock::now_ns;
use crate::memsnap::{self, Options};
use crate::workload::Workload;
use crate::{log, thread};

const MS: u64 = 1_000_000;

/// Workload threads in the benchmarks.
const THREADS: usize = 3;

fn per_second(count: u64, ns: u64) -> u64 {
    (u128::from(count) * 1_000_000_000 / u128::from(ns.max(1))) as u64
}

/// Takes a snapshot to completion and releases it; `None` (logged) if it
/// could not start.
fn complete_snapshot(label: &str, opts: &Options) -> Option<memsnap::Report> {
    if let Err(e) = memsnap::start(opts) {
        log!("{label} snapshot: {e}");
        return None;
    }
    let report = memsnap::wait();
    let _ = memsnap::release();
    report
}

/// The workload's rate over half a second, after a tenth to settle.
fn steady_rate(workload: &Workload) -> u64 {
    thread::sleep_ns(100 * MS);
    let (ops, t) = (workload.ops(), now_ns());
    thread::sleep_ns(500 * MS);
    per_second(workload.ops() - ops, now_ns() - t)
}

/// The `p`th percentile of sorted values (0 when there are none).
pub fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// `bench-memsnap`: a live snapshot of all RAM under a write-heavy workload,
/// against stop-and-copy of the same range and a plain copy of its pages.
pub fn memsnap(cmd: &CmdLine<'_>) -> ExitCode {
    let share = match cmd.u64("copier_share") {
        Ok(v) => v.unwrap_or(30),
        Err(e) => {
            log!("{e}");
            return ExitCode::Failure;
        }
    };
    let mem_bytes: u64 = crate::boot_info::usable_ram()
        .map(|r| r.end - r.start)
        .sum();
    let (free, _) = crate::memory::frames::stats();
    let per_thread = (free * 4096 / 32).clamp(1 << 20, 96 << 20);
    log!(
        "bench-memsnap: {} MiB RAM, workload {THREADS} x {} MiB, copier share {share}%",
        mem_bytes >> 20,
        per_thread >> 20
    );

    // Warm-up (code paths translated once by the emulator); not measured.
    let warm = Options {
        range_limit: Some(32 << 20),
        ..Options::default()
    };
    if complete_snapshot("warm-up", &warm).is_none() {
        return ExitCode::Failure;
    }

    let warm_copy = memsnap::page_copy_ns(2000);
    let cold_copy = memsnap::page_copy_cold_ns(2000);
    let (page_copy_ns, page_copy_cold_ns) = (warm_copy.p50, cold_copy.p50);
    let Some(workload) = Workload::start(THREADS, per_thread, 42) else {
        log!("no memory for the workload");
        return ExitCode::Failure;
    };
    thread::sleep_ns(100 * MS);

    // Twice: the first run also pays the emulator's first touch of the
    // storage frames, which the live snapshot (reusing them) does not.
    let mut stop = Err(memsnap::StartError::EmptyRange);
    for _ in 0..2 {
        stop = memsnap::stop_and_copy(&Options::default());
    }
    let (stop_pages, stop_copy_ns) = match stop {
        Ok(r) => r,
        Err(e) => {
            log!("stop-and-copy baseline: {e}");
            return ExitCode::Failure;
        }
    };
    let memcpy_bytes_per_s = per_second(stop_pages * 4096, stop_copy_ns);

    let small = Options {
        range_limit: Some(128 << 20),
        copier_share_pct: share,
        ..Options::default()
    };
    let Some(small_report) = complete_snapshot("small-range", &small) else {
        return ExitCode::Failure;
    };

    // Measured here, in the state the live snapshot will meet: the emulator
    // has settled after the baselines (its TLB is sized at full flushes).
    let ops_before = steady_rate(&workload);

    // The timed snapshot runs without verification, whose stop-the-world
    // hashing of every page would warm the emulator's TLB just before the
    // pause's flush and so inflate the pause it is meant to check.
    let opts = Options {
        latencies: true,
        copier_share_pct: share,
        ..Options::default()
    };
    let started = match memsnap::start(&opts) {
        Ok(r) => r,
        Err(e) => {
            log!("live snapshot: {e}");
            return ExitCode::Failure;
        }
    };
    let ops_start = workload.ops();
    let report = memsnap::wait().unwrap_or(started);
    let ops_during = per_second(workload.ops() - ops_start, report.total_ns);
    let latencies = memsnap::latencies();
    memsnap::emit_timeline();
    let _ = memsnap::release();
    let ops_after = steady_rate(&workload);

    // The verified snapshot, same workload, same boot: its result is
    // compared page by page with a stop-the-world reference.
    let verify = cmd.get("verify").is_none_or(|v| v != "off");
    let verified = if verify {
        let opts = Options {
            verify: true,
            copier_share_pct: share,
            ..Options::default()
        };
        let Some(verified) = complete_snapshot("verified", &opts) else {
            return ExitCode::Failure;
        };
        Some(verified)
    } else {
        None
    };
    let to_disk = match cmd.get("to_disk") {
        Some(name) => match snapshot_to_disk(name, share, &workload, verify, mem_bytes) {
            Ok(figures) => Some(figures),
            Err(e) => {
                log!("snapshot to disk {name:?}: {e}");
                return ExitCode::Failure;
            }
        },
        None => None,
    };
    workload.stop();

    let s = report.stats;
    let copy_bytes_per_s = per_second(s.background * 4096, report.copier_busy_ns);
    let (p50, p99) = (percentile(&latencies, 50), percentile(&latencies, 99));
    log!("timed: {}", memsnap::describe(&report));
    if let Some(v) = &verified {
        log!("verified: {}", memsnap::describe(v));
    }
    log!(
        "pause {} us (a {}-page range: {} us) vs stop-and-copy {} us ({}x)",
        report.pause_ns / 1000,
        small_report.pages,
        small_report.pause_ns / 1000,
        stop_copy_ns / 1000,
        stop_copy_ns / report.pause_ns.max(1)
    );
    log!(
        "background copy {} MiB/s vs plain copy {} MiB/s; fault p50 {} ns, p99 {} ns ({} faults; one page copy p50 {} ns p99 {} ns, cold p50 {} ns p99 {} ns)",
        copy_bytes_per_s >> 20,
        memcpy_bytes_per_s >> 20,
        p50,
        p99,
        latencies.len(),
        page_copy_ns,
        warm_copy.p99,
        page_copy_cold_ns,
        cold_copy.p99
    );
    log!("workload {ops_before} ops/s before, {ops_during} during, {ops_after} after");
    log!(
        "fault latency ns: p10 {} p50 {} p90 {} p95 {} p99 {} p99.9 {} max {}",
        percentile(&latencies, 10),
        p50,
        percentile(&latencies, 90),
        percentile(&latencies, 95),
        p99,
        latencies
            .get(latencies.len() * 999 / 1000)
            .copied()
            .unwrap_or(0),
        latencies.last().copied().unwrap_or(0)
    );

    let mismatched = verified
        .as_ref()
        .and_then(|v| v.mismatched)
        .unwrap_or(u64::MAX);
    let not_copied_once = verified
        .as_ref()
        .and_then(|v| v.not_copied_once)
        .unwrap_or(u64::MAX);
    let fields = [
        ("mem_bytes", mem_bytes),
        ("pages", report.pages),
        ("eager_pages", s.eager),
        ("fault_pages", s.fault),
        ("background_pages", s.background),
        ("rewrite_faults", s.rewrites),
        ("pause_ns", report.pause_ns),
        ("stop_copy_pause_ns", stop_copy_ns),
        ("stop_copy_pages", stop_pages),
        ("small_range_pages", small_report.pages),
        ("small_range_pause_ns", small_report.pause_ns),
        ("protect_ns", report.protect_ns),
        ("small_range_protect_ns", small_report.protect_ns),
        (
            "verified_pause_ns",
            verified.as_ref().map_or(0, |v| v.pause_ns),
        ),
        (
            "verified_reference_ns",
            verified.as_ref().map_or(0, |v| v.reference_ns),
        ),
        ("total_ns", report.total_ns),
        ("fault_ns_p50", p50),
        ("fault_ns_p99", p99),
        ("faults_timed", latencies.len() as u64),
        ("page_copy_ns", page_copy_ns),
        ("page_copy_cold_ns", page_copy_cold_ns),
        ("page_copy_ns_p99", warm_copy.p99),
        ("page_copy_cold_ns_p99", cold_copy.p99),
        ("copy_bytes_per_s", copy_bytes_per_s),
        ("memcpy_bytes_per_s", memcpy_bytes_per_s),
        ("workload_ops_per_s_before", ops_before),
        ("workload_ops_per_s_during", ops_during),
        ("workload_ops_per_s_after", ops_after),
        ("copier_share_pct", share),
        ("mismatched_pages", mismatched),
        ("not_copied_once", not_copied_once),
    ];
    let mut fields = fields.to_vec();
    if let Some(d) = &to_disk {
        d.log(p99);
        fields.extend(d.fields());
    }
    let disk_ok = to_disk.as_ref().is_none_or(|d| {
        d.verified
            .as_ref()
            .is_none_or(|v| v.mismatched == Some(0) && v.not_copied_once == Some(0))
    });
    print_json(&fields);
    if !verify || (mismatched == 0 && not_copied_once == 0 && disk_ok) {
        ExitCode::Success
    } else {
        log!("verification failed: {mismatched} mismatched pages");
        ExitCode::Failure
    }
}

/// What `bench-memsnap to_disk=NAME` adds: a timed live snapshot of the
/// same range to a disk, under the same workload, against the same disk's
/// sequential-write throughput measured just before.
struct DiskFigures {
    seq_write_mib_s: u64,
    /// One page copy's p50 and p99 while the same disk takes sequential
    /// writes: what the host's I/O costs the guest CPU.
    copy_under_io: memsnap::CopyTime,
    report: memsnap::Report,
    latencies: Vec<u64>,
    ops_during: u64,
    /// Completion interrupts the disk raised from the instant to the end
    /// of the copy.
    interrupts: u64,
    verified: Option<memsnap::Report>,
}

impl DiskFigures {
    fn disk(&self) -> memsnap::DiskReport {
        self.report.disk.clone().unwrap_or_default()
    }

    /// Core bytes from the instant until the file is durable.
    fn end_to_end_mib_s(&self) -> u64 {
        let d = self.disk();
        per_second(d.core_bytes, self.report.total_ns + d.complete_ns) >> 20
    }

    fn log(&self, ram_p99: u64) {
        let d = self.disk();
        log!("to disk: {}", memsnap::describe(&self.report));
        if let Some(v) = &self.verified {
            log!("to disk, verified: {}", memsnap::describe(v));
        }
        log!(
            "disk writes {} MiB/s while busy vs sequential 1 MiB writes {} MiB/s on the same disk; {} MiB/s from the instant to a durable file",
            d.writer.mib_per_s(),
            self.seq_write_mib_s,
            self.end_to_end_mib_s()
        );
        log!(
            "to disk: fault p50 {} ns, p99 {} ns (in RAM p99 {} ns); {} faults and {} copier rounds waited for the writer; staging {} pages, peak {} in use; {} disk interrupts",
            percentile(&self.latencies, 50),
            percentile(&self.latencies, 99),
            ram_p99,
            self.report.fault_waits,
            self.report.copier_waits,
            d.staging_pages,
            d.writer.peak_in_use,
            self.interrupts
        );
        log!(
            "one page copy while the disk takes sequential writes: p50 {} ns, p99 {} ns",
            self.copy_under_io.p50,
            self.copy_under_io.p99
        );
    }

    fn fields(&self) -> Vec<(&'static str, u64)> {
        let (r, d) = (&self.report, self.disk());
        alloc::vec![
            ("seq_write_mib_s", self.seq_write_mib_s),
            ("page_copy_ns_under_io", self.copy_under_io.p50),
            ("page_copy_ns_p99_under_io", self.copy_under_io.p99),
            ("disk_pages", r.pages),
            ("disk_eager_pages", r.stats.eager),
            ("disk_fault_pages", r.stats.fault),
            ("disk_background_pages", r.stats.background),
            ("disk_pause_ns", r.pause_ns),
            ("disk_total_ns", r.total_ns),
            ("disk_complete_ns", d.complete_ns),
            ("disk_core_bytes", d.core_bytes),
            ("disk_written_bytes", d.writer.bytes),
            ("disk_write_busy_ns", d.writer.busy_ns),
            ("disk_write_mib_s", d.writer.mib_per_s()),
            ("disk_end_to_end_mib_s", self.end_to_end_mib_s()),
            ("disk_fault_ns_p50", percentile(&self.latencies, 50)),
            ("disk_fault_ns_p99", percentile(&self.latencies, 99)),
            ("disk_faults_timed", self.latencies.len() as u64),
            ("disk_fault_waits", r.fault_waits),
            ("disk_copier_waits", r.copier_waits),
            ("disk_staging_pages", d.staging_pages),
            ("disk_staging_peak", d.writer.peak_in_use),
            ("disk_interrupts", self.interrupts),
            ("disk_workload_ops_per_s_during", self.ops_during),
            (
                "disk_mismatched_pages",
                self.verified
                    .as_ref()
                    .and_then(|v| v.mismatched)
                    .unwrap_or(u64::MAX),
            ),
        ]
    }
}

fn snapshot_to_disk(
    name: &str,
    share: u64,
    workload: &Workload,
    verify: bool,
    mem_bytes: u64,
) -> Result<DiskFigures, String> {
    let disk = crate::virtio::disk(name).map_err(|e| alloc::format!("{e}"))?;
    // The baseline: as many bytes as RAM, the way bench-blk writes.
    use snapshot::devices::block::BlockDevice;
    let bytes = mem_bytes.min(disk.info().bytes()) / REQUEST as u64 * REQUEST as u64;
    let mut run = crate::memory::frames::OwnedRun::alloc((WINDOW / 4096) as u64)
        .ok_or("no memory for the baseline's buffer")?;
    let buf = run.bytes_mut();
    snapshot::devices::block::fill_pattern(2, 0, buf);
    let t = now_ns();
    sequential(&*disk, buf, (0, bytes), true).map_err(|e| alloc::format!("{e}"))?;
    let seq_write_mib_s = per_second(bytes, now_ns() - t) >> 20;
    // Page copies timed while a thread keeps the disk writing.
    let copy_under_io = {
        let stop = alloc::sync::Arc::new(core::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (disk, stop) = (disk.clone(), stop.clone());
            thread::spawn("bench-io", move || {
                let mut run = run;
                let buf = run.bytes_mut();
                // Fresh data across the whole range, as a snapshot writes.
                let mut at = 0;
                while !stop.load(core::sync::atomic::Ordering::Relaxed) {
                    let end = (at + WINDOW as u64).min(bytes);
                    if sequential(&*disk, buf, (at, end), true).is_err() {
                        break;
                    }
                    buf[..8].copy_from_slice(&at.to_le_bytes());
                    at = if end == bytes { 0 } else { end };
                }
                run
            })
        };
        thread::sleep_ns(20 * MS);
        // Spread over about as long as a snapshot's faults are.
        let t = memsnap::page_copy_spread_ns(4000, 200, 10 * MS);
        stop.store(true, core::sync::atomic::Ordering::Relaxed);
        drop(writer.join());
        t
    };
    let opts = Options {
        latencies: true,
        copier_share_pct: share,
        disk: Some(name.into()),
        ..Options::default()
    };
    let interrupts_before = disk.interrupt_count();
    memsnap::start(&opts).map_err(|e| alloc::format!("{e}"))?;
    let ops_start = workload.ops();
    let report = memsnap::wait().ok_or("no report")?;
    let interrupts = disk.interrupt_count() - interrupts_before;
    let latencies = memsnap::latencies();
    if let Some(e) = &report.error {
        let _ = memsnap::abort();
        return Err(e.clone());
    }
    let ops_during = per_second(workload.ops() - ops_start, report.total_ns);
    let _ = memsnap::release();
    let verified = if verify {
        let opts = Options {
            verify: true,
            ..opts
        };
        Some(complete_snapshot("verified to disk", &opts).ok_or("the verified run failed")?)
    } else {
        None
    };
    Ok(DiskFigures {
        seq_write_mib_s,
        copy_under_io,
        report,
        latencies,
        ops_during,
        interrupts,
        verified,
    })
}

/// One measured phase of `bench-blk`: elapsed time, and the disk's own
/// account of it (batches, time waiting for the device).
struct Phase {
    ns: u64,
    ops: u64,
    bytes: u64,
    counters: crate::virtio::Counters,
}

impl Phase {
    fn mib_s(&self) -> u64 {
        per_second(self.bytes, self.ns) >> 20
    }

    fn iops(&self) -> u64 {
        per_second(self.ops, self.ns)
    }

    /// Share of the batches' time the driver spent itself (not waiting).
    fn driver_pct(&self) -> u64 {
        let c = &self.counters;
        (c.busy_ns - c.wait_ns.min(c.busy_ns)) * 100 / c.busy_ns.max(1)
    }

    /// Share of the batches' time spent in notification writes, where
    /// QEMU (TCG) processes the queue on the guest CPU's time.
    fn notify_pct(&self) -> u64 {
        let c = &self.counters;
        c.notify_ns * 100 / c.busy_ns.max(1)
    }
}

fn measure(
    disk: &crate::virtio::VirtioBlk,
    name: &'static str,
    run: impl FnOnce() -> Result<(u64, u64), snapshot::devices::block::BlockError>,
) -> Result<Phase, snapshot::devices::block::BlockError> {
    let before = disk.counters();
    let start = now_ns();
    let (ops, bytes) = run()?;
    let ns = now_ns() - start;
    let after = disk.counters();
    let counters = crate::virtio::Counters {
        batches: after.batches - before.batches,
        requests: after.requests - before.requests,
        bytes: after.bytes - before.bytes,
        busy_ns: after.busy_ns - before.busy_ns,
        wait_ns: after.wait_ns - before.wait_ns,
        notify_ns: after.notify_ns - before.notify_ns,
    };
    let phase = Phase {
        ns,
        ops,
        bytes,
        counters,
    };
    crate::trace!(
        "bench.blk",
        phase = crate::trace::Word(name),
        ns = ns,
        ops = ops,
        requests = counters.requests,
        wait_ns = counters.wait_ns,
        driver_pct = phase.driver_pct(),
        notify_pct = phase.notify_pct(),
    );
    log!(
        "{name:>16}: {:>8.3} s, {:>7} ops, {:>6} MiB/s, {:>7} IOPS, {} requests in {} batches; of batch time: driver {}% (in notify writes {}%), waiting {}%",
        ns as f64 / 1e9,
        ops,
        phase.mib_s(),
        phase.iops(),
        counters.requests,
        counters.batches,
        phase.driver_pct(),
        phase.notify_pct(),
        100 - phase.driver_pct()
    );
    Ok(phase)
}

/// Request size of the sequential phases.
const REQUEST: usize = 1 << 20;
/// Bytes in flight in the sequential phases (16 requests).
const WINDOW: usize = 16 * REQUEST;

/// Writes (or reads) bytes `[from, total)` of `disk` in [`REQUEST`]-sized
/// requests, 16 in flight, through `buf` ([`WINDOW`] bytes); returns
/// `(ops, bytes)`. `bench-blk`'s sequential phases, and the baseline the
/// snapshot to disk is measured against.
fn sequential(
    disk: &dyn snapshot::devices::block::BlockDevice,
    buf: &mut [u8],
    (from, total): (u64, u64),
    write: bool,
) -> Result<(u64, u64), snapshot::devices::block::BlockError> {
    use snapshot::devices::block::Op;
    let mut at = from;
    let mut ops = 0;
    while at < total {
        let len = (buf.len() as u64).min(total - at) as usize;
        let sector = at / 512;
        let mut batch: Vec<Op<'_>> = buf[..len]
            .chunks_mut(REQUEST)
            .enumerate()
            .map(|(i, chunk)| {
                let sector = sector + (i * REQUEST / 512) as u64;
                if write {
                    Op::Write { sector, buf: chunk }
                } else {
                    Op::Read { sector, buf: chunk }
                }
            })
            .collect();
        ops += batch.len() as u64;
        disk.transfer(&mut batch, 16)?;
        at += len as u64;
    }
    Ok((ops, total - from))
}

/// `bench-blk`: sequential write and read of the whole disk `bench` in
/// 1 MiB requests 16 deep, then 4 KiB random reads at depth 1 and 32.
/// The host adds its own read throughput of the image as the baseline.
pub fn blk(_cmd: &CmdLine<'_>) -> ExitCode {
    use snapshot::devices::block::{BlockDevice, Op};
    let disk = match crate::virtio::disk("bench") {
        Ok(d) => d,
        Err(e) => {
            log!("{e}");
            return ExitCode::Failure;
        }
    };
    let Some(mut run) = crate::memory::frames::OwnedRun::alloc((WINDOW / 4096) as u64) else {
        log!("no memory for a {} MiB buffer", WINDOW >> 20);
        return ExitCode::Failure;
    };
    let buf = run.bytes_mut();
    snapshot::devices::block::fill_pattern(1, 0, buf);
    let total = disk.info().bytes();
    let sectors = disk.info().sectors;
    let mut seq = |write: bool| sequential(&*disk, buf, (0, total), write);
    let result = (|| {
        let write = measure(&disk, "seq_write", || seq(true))?;
        let flush_start = now_ns();
        disk.flush()?;
        let flush_ns = now_ns() - flush_start;
        let read = measure(&disk, "seq_read", || seq(false))?;
        let mut rng = snapshot::support::rng::Rng::new(42);
        // Each depth-1 read's time, for the median (the mean suffers most
        // from the host's scheduling hiccups).
        let mut single_ns = Vec::with_capacity(3000);
        let mut random = |depth: usize, count: usize| {
            let mut bufs = alloc::vec![[0u8; 4096]; 256];
            let mut done = 0;
            while done < count {
                let mut batch: Vec<Op<'_>> = bufs
                    .iter_mut()
                    .take(depth.max(1) * 8)
                    .map(|b| Op::Read {
                        sector: rng.below(sectors / 8) * 8,
                        buf: b,
                    })
                    .collect();
                if depth == 1 {
                    batch.truncate(1);
                }
                done += batch.len();
                let start = now_ns();
                disk.transfer(&mut batch, depth)?;
                if depth == 1 {
                    single_ns.push(now_ns() - start);
                }
            }
            Ok((done as u64, done as u64 * 4096))
        };
        let stages_before = disk.stages();
        let qd1 = measure(&disk, "rand_read_qd1", || random(1, 3000))?;
        let stages = disk.stages().since(&stages_before);
        let qd32 = measure(&disk, "rand_read_qd32", || random(32, 20_000))?;
        single_ns.sort_unstable();
        let qd1 = (qd1, stages, percentile(&single_ns, 50));
        Ok::<_, snapshot::devices::block::BlockError>((write, flush_ns, read, qd1, qd32))
    })();
    let (write, flush_ns, read, (qd1, stages, qd1_p50_ns), qd32) = match result {
        Ok(r) => r,
        Err(e) => {
            log!("bench-blk: {e}");
            return ExitCode::Failure;
        }
    };
    let per_request = |ns: u64| stages.per_batch(ns);
    let qd1_ns = qd1.ns / qd1.ops.max(1);
    let fields: [(&str, u64); 24] = [
        ("disk_bytes", total),
        ("request_bytes", REQUEST as u64),
        ("interrupts", u64::from(disk.interrupts())),
        ("seq_write_mib_s", write.mib_s()),
        ("flush_us", flush_ns / 1000),
        ("seq_read_mib_s", read.mib_s()),
        ("rand_read_iops_qd1", qd1.iops()),
        ("rand_read_iops_qd32", qd32.iops()),
        ("seq_write_driver_pct", write.driver_pct()),
        ("seq_read_driver_pct", read.driver_pct()),
        ("qd1_driver_pct", qd1.driver_pct()),
        ("qd32_driver_pct", qd32.driver_pct()),
        ("qd32_notify_pct", qd32.notify_pct()),
        ("seq_read_notify_pct", read.notify_pct()),
        ("irqs", disk.interrupt_count()),
        ("qd1_request_ns", qd1_ns),
        ("qd1_p50_ns", qd1_p50_ns),
        ("qd1_submit_ns", per_request(stages.submit_ns)),
        ("qd1_kick_ns", per_request(stages.kick_ns)),
        ("qd1_device_ns", per_request(stages.device_ns)),
        ("qd1_wakeup_ns", per_request(stages.wakeup_ns)),
        ("qd1_complete_ns", per_request(stages.complete_ns)),
        // The rest: the caller's loop and the batch's trace records.
        (
            "qd1_outside_ns",
            qd1_ns.saturating_sub(per_request(stages.total_ns())),
        ),
        ("qd1_batches", stages.batches),
    ];
    print_json(&fields);
    ExitCode::Success
}

/// Prints the benchmark's one `BENCH-JSON {...}` line: a flat object of
/// numbers (and strings already quoted).
fn print_json(fields: &[(&str, impl core::fmt::Display)]) {
    let mut json = String::from("{");
    for (i, (key, value)) in fields.iter().enumerate() {
        let _ = write!(json, "{}\"{key}\":{value}", if i == 0 { "" } else { "," });
    }
    json.push('}');
    crate::println!("BENCH-JSON {json}");
}

/// Seconds from nanoseconds, as JSON wants them.
fn seconds(ns: u64) -> String {
    alloc::format!("{}.{:06}", ns / 1_000_000_000, ns % 1_000_000_000 / 1000)
}

/// `bench-backup`: backs up the qcow2 image on disk `src` (scattered data
/// in a large virtual disk) and restores it raw onto `out`; then backs up
/// `full` (the same virtual size, every cluster allocated) the same way.
/// The baselines, in the same boot: that all-data backup, and sequential
/// 1 MiB writes and reads of the `tape` disk.
pub fn backup(_cmd: &CmdLine<'_>) -> ExitCode {
    use snapshot::backup::{backup as run_backup, restore, Format};
    use snapshot::devices::block::BlockDevice;
    let disks = ["src", "full", "scratch", "tape", "out"].map(crate::virtio::disk);
    if let Some(Err(e)) = disks.iter().find(|d| d.is_err()) {
        log!("bench-backup: {e}");
        return ExitCode::Failure;
    }
    let [src, full, scratch, tape, out] = disks.map(|d| d.expect("checked above"));
    let mut quiet = |_, _, _| {};

    // Baseline: raw sequential throughput of the medium's disk.
    let span = (512u64 << 20).min(tape.info().bytes());
    let mut buf = alloc::vec![0u8; WINDOW];
    let t = now_ns();
    let write = sequential(&*tape, &mut buf, (0, span), true);
    let write_ns = now_ns() - t;
    let t = now_ns();
    let read = sequential(&*tape, &mut buf, (0, span), false);
    let read_ns = now_ns() - t;
    drop(buf);
    if let Err(e) = write.and(read) {
        log!("bench-backup: baseline: {e}");
        return ExitCode::Failure;
    }
    let mib_s = |bytes: u64, ns: u64| per_second(bytes, ns) >> 20;

    // Each step timed; the first error ends the benchmark.
    fn timed<T>(
        what: &str,
        step: impl FnOnce() -> Result<T, snapshot::backup::Error>,
    ) -> Option<(T, u64)> {
        let t = now_ns();
        let result = step();
        let ns = now_ns() - t;
        result
            .map(|value| (value, ns))
            .map_err(|e| log!("bench-backup: {what}: {e}"))
            .ok()
    }
    let steps = timed("backup", || {
        run_backup(&*src, &*scratch, &*tape, &mut quiet)
    })
    .and_then(|backup| {
        let restored = timed("restore", || {
            restore(&*tape, &*out, Format::Raw, &mut quiet)
        })?;
        let all = timed("all-data backup", || {
            run_backup(&*full, &*scratch, &*tape, &mut quiet)
        })?;
        Some((backup, restored.1, all))
    });
    let Some(((sparse, backup_ns), restore_ns, (all, all_ns))) = steps else {
        return ExitCode::Failure;
    };
    log!(
        "backup: {} MiB of data in a {} MiB disk: {} ms, {} MiB/s; medium {} bytes for {} bytes of data",
        sparse.data_bytes >> 20,
        sparse.virtual_bytes >> 20,
        backup_ns / MS,
        mib_s(sparse.data_bytes, backup_ns),
        sparse.medium_bytes,
        sparse.data_bytes
    );
    log!(
        "all-data backup: {} MiB in {} ms; restore: {} ms; the medium's disk: {} MiB/s writing, {} MiB/s reading",
        all.data_bytes >> 20,
        all_ns / MS,
        restore_ns / MS,
        mib_s(span, write_ns),
        mib_s(span, read_ns)
    );
    let fields: [(&str, String); 12] = [
        ("bench", "\"backup\"".into()),
        ("virtual_bytes", alloc::format!("{}", sparse.virtual_bytes)),
        ("data_bytes", alloc::format!("{}", sparse.data_bytes)),
        ("medium_bytes", alloc::format!("{}", sparse.medium_bytes)),
        ("backup_s", seconds(backup_ns)),
        ("all_data_backup_s", seconds(all_ns)),
        ("all_data_bytes", alloc::format!("{}", all.data_bytes)),
        ("restore_s", seconds(restore_ns)),
        (
            "backup_mib_s",
            alloc::format!("{}", mib_s(sparse.data_bytes, backup_ns)),
        ),
        (
            "restore_mib_s",
            alloc::format!("{}", mib_s(sparse.data_bytes, restore_ns)),
        ),
        (
            "seq_write_mib_s",
            alloc::format!("{}", mib_s(span, write_ns)),
        ),
        ("seq_read_mib_s", alloc::format!("{}", mib_s(span, read_ns))),
    ];
    print_json(&fields);
    ExitCode::Success
}
