//! `bench-memsnap`: a live snapshot of all RAM under a write-heavy
//! workload, against stop-and-copy of the same range, a plain copy of its
//! pages, one page copy, a 128 MiB range's pause and the workload's rate
//! before; then a verified snapshot, and with `to_disk=NAME` the same to a
//! disk ([`super::memsnap_disk`]).
//!
//! The workload's rates before, during and after the snapshot are taken on
//! the same CPUs: with the copier's CPU reserved (the default with several
//! CPUs), a stand-in thread reserves it while the "before" and "after"
//! rates are measured. The rate on every CPU and on the boot CPU alone are
//! reported beside them, so the reservation's cost and the workload's own
//! scaling show.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use snapshot::interface::cmdline::CmdLine;

use super::baseline::{self, CopyTime};
use super::memsnap_disk::{snapshot_to_disk, DiskFigures};
use super::{complete_snapshot, fraction, per_second, percentile, print_json, MS};
use crate::arch::qemu::ExitCode;
use crate::clock::now_ns;
use crate::memsnap::splits::{Splits, STEP_NAMES};
use crate::memsnap::{self, CopierCpu, Options, Report};
use crate::workload::Workload;
use crate::{log, thread};

/// Workload threads in the benchmarks.
const THREADS: usize = 3;

/// The JSON keys of each fault step's p50 and p99, in
/// [`memsnap::splits::Step`] order.
const STEP_KEYS: [[&str; 2]; 6] = [
    ["fault_entry_ns_p50", "fault_entry_ns_p99"],
    ["fault_claim_ns_p50", "fault_claim_ns_p99"],
    ["fault_copy_ns_p50", "fault_copy_ns_p99"],
    ["fault_finish_ns_p50", "fault_finish_ns_p99"],
    ["fault_total_ns_p50", "fault_total_ns_p99"],
    ["copier_copy_ns_p50", "copier_copy_ns_p99"],
];

/// The spacing of the paced copy baseline, ns: about the time between two
/// write faults of the benchmark's workload during a snapshot.
const FAULT_GAP_NS: u64 = 25_000;

/// Measurement windows per rate, and their length.
const RATE_WINDOWS: usize = 5;
const RATE_WINDOW_NS: u64 = 100 * MS;

/// The workload's rate: the median of [`RATE_WINDOWS`] windows, after
/// [`settle`]. The median keeps one window the host stole from (the
/// emulator's threads share its cores) from moving the figure.
fn steady_rate(workload: &Workload) -> u64 {
    settle();
    let mut rates = [0; RATE_WINDOWS];
    for rate in &mut rates {
        let (ops, t) = (workload.ops(), now_ns());
        thread::sleep_ns(RATE_WINDOW_NS);
        *rate = per_second(workload.ops() - ops, now_ns() - t);
    }
    crate::trace!(
        "bench.rate",
        min = rates.iter().min().copied().unwrap_or(0),
        max = rates.iter().max().copied().unwrap_or(0)
    );
    rates.sort_unstable();
    rates[RATE_WINDOWS / 2]
}

/// Lets the workload settle where it now runs, flushing every CPU's TLB
/// every 10 ms meanwhile. The emulator resizes a CPU's TLB only when it is
/// flushed, to fit what was used since the last flush: without flushes a
/// CPU keeps the size its last quiet or busy phase left, and a rate
/// measured then depends on that history. Flushing only here, never while
/// measuring, sizes the TLB to the workload the same way before every
/// rate.
fn settle() {
    for _ in 0..20 {
        crate::arch::ipi::flush_local();
        crate::arch::ipi::Shootdown::new().flush_everywhere();
        thread::sleep_ns(10 * MS);
    }
}

/// Runs `f` with the CPU the copier reserves (if it does) reserved by a
/// stand-in, so the workload runs where it will during the snapshot. The
/// stand-in idles, or with `Stand::Copying` copies pages like the copier
/// (see [`baseline::copy_like_the_copier`]).
fn off_the_copier_cpu<T>(stand: Stand, f: impl FnOnce() -> T) -> T {
    if !copier_reserves() {
        return f();
    }
    // 0 starting, 1 on its CPU, 2 to end.
    let state = Arc::new(AtomicU64::new(0));
    let stand_in = {
        let state = state.clone();
        thread::spawn("cpu-stand-in", move || {
            let placed = thread::take_own_cpu(true).is_some();
            state.store(1, Ordering::Release);
            let go_on = || placed && state.load(Ordering::Acquire) != 2;
            match stand {
                Stand::Idle => {
                    while go_on() {
                        thread::sleep_ns(10 * MS);
                    }
                }
                // Unplaced, it could move between CPUs: its tick pause
                // must start and end on one CPU it owns.
                Stand::Copying if placed => baseline::copy_like_the_copier(go_on),
                Stand::Copying => {}
            }
        })
    };
    while state.load(Ordering::Acquire) == 0 {
        thread::yield_now();
    }
    let result = f();
    state.store(2, Ordering::Release);
    stand_in.join();
    result
}

/// What the stand-in of [`off_the_copier_cpu`] does on the copier's CPU.
#[derive(Debug, Clone, Copy)]
enum Stand {
    Idle,
    Copying,
}

/// Whether the snapshot's copier will have a CPU to itself.
fn copier_reserves() -> bool {
    thread::cpus() > 1 && Options::default().copier_cpu == CopierCpu::Own
}

/// Everything the benchmark measured.
struct Figures {
    mem_bytes: u64,
    ram_pages: u64,
    share: u64,
    warm_copy: CopyTime,
    cold_copy: CopyTime,
    busy_copy: CopyTime,
    busy_cold_copy: CopyTime,
    stop_pages: u64,
    stop_copy_ns: u64,
    small: Report,
    cpus: usize,
    workload_cpus: usize,
    ops_before: u64,
    ops_beside_copier: u64,
    ops_all_cpus: u64,
    ops_1cpu: u64,
    timed: Report,
    latencies: Vec<u64>,
    splits: Splits,
    ops_during: u64,
    ops_after: u64,
    verified: Option<Report>,
    to_disk: Option<DiskFigures>,
}

/// The benchmark; see the module docs.
pub fn memsnap(cmd: &CmdLine<'_>) -> ExitCode {
    if let Err(e) = cmd.switch("verify", true) {
        log!("{e}");
        return ExitCode::Failure;
    }
    match run(cmd) {
        Ok(figures) => {
            figures.log();
            print_json(&figures.fields());
            figures.verdict(verifies(cmd))
        }
        Err(e) => {
            log!("{e}");
            ExitCode::Failure
        }
    }
}

/// `verify=on|off` (on by default; checked when the benchmark starts).
fn verifies(cmd: &CmdLine<'_>) -> bool {
    cmd.switch("verify", true).unwrap_or(true)
}

/// The workload's rates before the snapshot: on every CPU; on the CPUs
/// the copier leaves it, beside an idle and beside a copying neighbour;
/// and on the boot CPU alone. Each rate first settles the emulator's TLB
/// to the workload (see `settle`), the state the live snapshot then meets.
fn rates_before(workload: &Workload) -> [u64; 4] {
    let all_cpus = steady_rate(workload);
    let before = off_the_copier_cpu(Stand::Idle, || steady_rate(workload));
    // The copier's CPU busy copying, as during the snapshot: what the
    // neighbour's load alone costs the workload on this host.
    let beside_copier = off_the_copier_cpu(Stand::Copying, || steady_rate(workload));
    // The others held idle: how the workload itself scales with CPUs.
    let one_cpu = {
        let _held = thread::hold_others();
        steady_rate(workload)
    };
    [all_cpus, before, beside_copier, one_cpu]
}

/// After the timed snapshot, same workload, same boot: the verified
/// snapshot (compared page by page with a stop-the-world reference) unless
/// `verify=off`, and with `to_disk=NAME` the snapshot to that disk.
fn checked_snapshots(
    cmd: &CmdLine<'_>,
    share: Option<u64>,
    workload: &Workload,
    mem_bytes: u64,
) -> Result<(Option<Report>, Option<DiskFigures>), String> {
    let verify = verifies(cmd);
    let verified = verify
        .then(|| {
            let opts = Options {
                verify: true,
                copier_share_pct: share,
                ..Options::default()
            };
            complete_snapshot("verified", &opts)
        })
        .transpose()?;
    let to_disk = cmd
        .get("to_disk")
        .map(|name| {
            snapshot_to_disk(name, share, workload, verify, mem_bytes)
                .map_err(|e| alloc::format!("snapshot to disk {name:?}: {e}"))
        })
        .transpose()?;
    Ok((verified, to_disk))
}

fn run(cmd: &CmdLine<'_>) -> Result<Figures, String> {
    // `None`: the snapshot's default (all of a CPU the copier owns).
    let share = cmd.u64("copier_share").map_err(|e| alloc::format!("{e}"))?;
    let ram = || crate::boot_info::usable_ram();
    let mem_bytes: u64 = ram().map(|r| r.end - r.start).sum();
    let ram_pages: u64 = ram()
        .map(|r| (r.end / 4096).saturating_sub(r.start.div_ceil(4096)))
        .sum();
    let (free, _) = crate::memory::frames::stats();
    let per_thread = (free * 4096 / 32).clamp(1 << 20, 96 << 20);
    log!(
        "bench-memsnap: {} MiB RAM, workload {THREADS} x {} MiB, copier share {}",
        mem_bytes >> 20,
        per_thread >> 20,
        share.map_or(String::from("default"), |s| alloc::format!("{s}%"))
    );
    // Warm-up (code paths translated once by the emulator); not measured.
    let warm = Options {
        range_limit: Some(32 << 20),
        ..Options::default()
    };
    complete_snapshot("warm-up", &warm)?;
    let warm_copy = baseline::page_copy_ns(2000);
    let cold_copy = baseline::page_copy_cold_ns(2000);
    let workload = Workload::start(THREADS, per_thread, 42).ok_or("no memory for the workload")?;
    thread::sleep_ns(100 * MS);
    let (stop_pages, stop_copy_ns) = stop_and_copy_runs()?;
    // One copy's time as a fault meets it: on the workload's CPU among the
    // workload's threads, copies spread out like faults, the copier's CPU
    // busy copying (at one CPU, the workload alone).
    let busy_copy = off_the_copier_cpu(Stand::Copying, || {
        baseline::page_copy_paced_ns(2000, FAULT_GAP_NS)
    });
    // The same, each copy moving a random frame of the range into a
    // random slot, as a fault's copy does: the like-for-like copy.
    let busy_cold_copy = off_the_copier_cpu(Stand::Copying, || {
        baseline::page_copy_cold_paced_ns(2000, FAULT_GAP_NS)
    });
    let [ops_all_cpus, ops_before, ops_beside_copier, ops_1cpu] = rates_before(&workload);
    // The 128 MiB range's pause right before the timed one, so both meet
    // the emulator's TLB sized by the same settled workload: its flush, the
    // bulk of the pause's protection step, costs more the larger the TLB.
    let small = Options {
        range_limit: Some(128 << 20),
        copier_share_pct: share,
        ..Options::default()
    };
    let small = complete_snapshot("small-range", &small)?;
    let (timed, latencies, ops_during) = timed_snapshot(share, &workload)?;
    let splits = memsnap::splits::read();
    let ops_after = off_the_copier_cpu(Stand::Idle, || steady_rate(&workload));
    let (verified, to_disk) = checked_snapshots(cmd, share, &workload, mem_bytes)?;
    workload.stop();
    Ok(Figures {
        mem_bytes,
        ram_pages,
        share: timed.copier_share_pct,
        warm_copy,
        cold_copy,
        busy_copy,
        busy_cold_copy,
        stop_pages,
        stop_copy_ns,
        small,
        cpus: thread::cpus(),
        workload_cpus: thread::cpus() - usize::from(copier_reserves()),
        ops_before,
        ops_beside_copier,
        ops_all_cpus,
        ops_1cpu,
        timed,
        latencies,
        splits,
        ops_during,
        ops_after,
        verified,
        to_disk,
    })
}

/// Stop-and-copy, four times: the first run also pays the emulator's
/// first touch of the storage frames, which the live snapshot (reusing
/// them) does not; of the other three, the median time keeps one run the
/// host stalled from deciding the figure. Returns `(pages, ns)`. It runs
/// where the copier will and as it will (see [`on_the_copier_cpu`]): the
/// plain copy the background copy is judged against.
fn stop_and_copy_runs() -> Result<(u64, u64), String> {
    on_the_copier_cpu(|| {
        let mut runs = Vec::new();
        for _ in 0..4 {
            let run = baseline::stop_and_copy(&Options::default())
                .map_err(|e| alloc::format!("stop-and-copy baseline: {e}"))?;
            runs.push(run);
        }
        let mut timed = runs.split_off(1);
        timed.sort_unstable_by_key(|&(_, ns)| ns);
        Ok(timed[1])
    })
}

/// Runs `f` on the CPU the copier reserves, with that CPU's tick stopped
/// as the copier stops it while copying, and the workload on the other
/// CPUs; at one CPU (or with the copier sharing its CPU), right here.
fn on_the_copier_cpu<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    if !copier_reserves() {
        return f();
    }
    thread::spawn("copier-stand-in", move || {
        let placed = thread::take_own_cpu(true).is_some();
        let _tick = placed.then(crate::arch::apic::pause_tick);
        f()
    })
    .join()
}

/// The timed snapshot, with fault latencies and its timeline; returns its
/// report, the latencies and the workload's rate meanwhile. It runs
/// without verification, whose stop-the-world hashing of every page would
/// warm the emulator's TLB just before the pause's flush and so inflate
/// the pause it is meant to check.
fn timed_snapshot(
    share: Option<u64>,
    workload: &Workload,
) -> Result<(Report, Vec<u64>, u64), String> {
    let opts = Options {
        latencies: true,
        copier_share_pct: share,
        ..Options::default()
    };
    let started = memsnap::start(&opts).map_err(|e| alloc::format!("live snapshot: {e}"))?;
    // Ops and time over the same span: from the copier's start to the end.
    let (ops_start, t) = (workload.ops(), now_ns());
    let report = memsnap::wait().unwrap_or(started);
    let ops_during = per_second(workload.ops() - ops_start, now_ns() - t);
    let latencies = memsnap::latencies();
    memsnap::emit_timeline();
    let _ = memsnap::release();
    Ok((report, latencies, ops_during))
}

impl Figures {
    fn copy_bytes_per_s(&self) -> u64 {
        per_second(
            self.timed.stats.background * 4096,
            self.timed.copier_busy_ns,
        )
    }

    fn memcpy_bytes_per_s(&self) -> u64 {
        per_second(self.stop_pages * 4096, self.stop_copy_ns)
    }

    /// The verified run's figure, or `u64::MAX` without one.
    fn verified(&self, f: impl Fn(&Report) -> Option<u64>) -> u64 {
        self.verified.as_ref().and_then(f).unwrap_or(u64::MAX)
    }

    /// The human summary.
    fn log(&self) {
        let (r, lat) = (&self.timed, &self.latencies);
        log!("timed: {}", memsnap::describe(r));
        log!(
            "the range covers {} of RAM's {} pages ({})",
            r.pages,
            self.ram_pages,
            fraction(r.pages, self.ram_pages)
        );
        if let Some(v) = &self.verified {
            log!("verified: {}", memsnap::describe(v));
        }
        log!(
            "pause {} us (a {}-page range: {} us) vs stop-and-copy {} us ({}x)",
            r.pause_ns / 1000,
            self.small.pages,
            self.small.pause_ns / 1000,
            self.stop_copy_ns / 1000,
            self.stop_copy_ns / r.pause_ns.max(1)
        );
        log!(
            "background copy {} MiB/s vs plain copy {} MiB/s; fault p50 {} ns, p99 {} ns ({} faults; one page copy p50 {} ns p99 {} ns, cold p50 {} ns p99 {} ns)",
            self.copy_bytes_per_s() >> 20,
            self.memcpy_bytes_per_s() >> 20,
            percentile(lat, 50),
            percentile(lat, 99),
            lat.len(),
            self.warm_copy.p50,
            self.warm_copy.p99,
            self.cold_copy.p50,
            self.cold_copy.p99
        );
        log!(
            "one page copy paced like faults, beside a copying CPU: p50 {} ns p99 {} ns (cold pages: p50 {} ns p99 {} ns)",
            self.busy_copy.p50,
            self.busy_copy.p99,
            self.busy_cold_copy.p50,
            self.busy_cold_copy.p99
        );
        log!(
            "background page: {} ns busy, of which {} ns in the copy itself",
            r.copier_busy_ns / r.stats.background.max(1),
            r.copier_copy_ns / r.stats.background.max(1)
        );
        log!(
            "workload on {} of {} CPUs: {} ops/s before ({} beside a copying CPU, {} on all, {} on one), {} during, {} after",
            self.workload_cpus,
            self.cpus,
            self.ops_before,
            self.ops_beside_copier,
            self.ops_all_cpus,
            self.ops_1cpu,
            self.ops_during,
            self.ops_after
        );
        log!(
            "fault latency ns: p10 {} p50 {} p90 {} p95 {} p99 {} p99.9 {} max {}",
            percentile(lat, 10),
            percentile(lat, 50),
            percentile(lat, 90),
            percentile(lat, 95),
            percentile(lat, 99),
            lat.get(lat.len() * 999 / 1000).copied().unwrap_or(0),
            lat.last().copied().unwrap_or(0)
        );
        self.log_splits();
        if let Some(d) = &self.to_disk {
            d.log(percentile(lat, 99), self.ram_pages);
        }
    }

    /// Where the copying faults' time went, and the slowest faults.
    fn log_splits(&self) {
        let sp = &self.splits;
        for (name, [n, p50, p99, max]) in STEP_NAMES.iter().zip(sp.steps) {
            log!("fault step {name}: {n} timed, p50 {p50} p99 {p99} max {max} ns (500 ns buckets)");
        }
        log!("faults of 20 us or more: {}", sp.slow_count);
        for s in &sp.slow {
            log!(
                "slow fault at {} us, cpu {}: entry {} claim {} copy {} finish {} ns; copier {} pages meanwhile, {} at entry, longest copy {} ns",
                s.at_ns / 1000,
                s.cpu,
                s.steps[0],
                s.steps[1],
                s.steps[2],
                s.steps[3],
                s.copier_pages,
                if s.copier_copying { "copying" } else { "between copies" },
                s.copier_longest_ns
            );
        }
        log!("copier copies of 20 us or more: {}", sp.copier_slow_count);
        for c in &sp.copier_slow {
            log!("slow copier copy at {} us: {} ns", c.at_ns / 1000, c.ns);
        }
    }

    /// The JSON fields.
    fn fields(&self) -> Vec<(&'static str, String)> {
        let (r, s, lat) = (&self.timed, self.timed.stats, &self.latencies);
        let verified = self.verified.as_ref();
        let numbers = [
            ("cpus", self.cpus as u64),
            ("workload_cpus", self.workload_cpus as u64),
            ("mem_bytes", self.mem_bytes),
            ("ram_pages", self.ram_pages),
            ("pages", r.pages),
            ("eager_pages", s.eager),
            ("fault_pages", s.fault),
            ("background_pages", s.background),
            ("rewrite_faults", s.rewrites),
            ("pause_ns", r.pause_ns),
            ("stop_copy_pause_ns", self.stop_copy_ns),
            ("stop_copy_pages", self.stop_pages),
            ("small_range_pages", self.small.pages),
            ("small_range_pause_ns", self.small.pause_ns),
            ("protect_ns", r.protect_ns),
            ("small_range_protect_ns", self.small.protect_ns),
            ("verified_pause_ns", verified.map_or(0, |v| v.pause_ns)),
            (
                "verified_reference_ns",
                verified.map_or(0, |v| v.reference_ns),
            ),
            ("total_ns", r.total_ns),
            ("fault_ns_p50", percentile(lat, 50)),
            ("fault_ns_p99", percentile(lat, 99)),
            ("faults_timed", lat.len() as u64),
            ("page_copy_ns", self.warm_copy.p50),
            ("page_copy_cold_ns", self.cold_copy.p50),
            ("page_copy_ns_p99", self.warm_copy.p99),
            ("page_copy_cold_ns_p99", self.cold_copy.p99),
            ("page_copy_busy_ns", self.busy_copy.p50),
            ("page_copy_busy_ns_p99", self.busy_copy.p99),
            ("page_copy_busy_cold_ns", self.busy_cold_copy.p50),
            ("page_copy_busy_cold_ns_p99", self.busy_cold_copy.p99),
            ("copy_bytes_per_s", self.copy_bytes_per_s()),
            ("copier_busy_ns", r.copier_busy_ns),
            ("copier_copy_ns", r.copier_copy_ns),
            (
                "background_ns_per_page",
                r.copier_busy_ns / s.background.max(1),
            ),
            (
                "background_copy_ns_per_page",
                r.copier_copy_ns / s.background.max(1),
            ),
            ("memcpy_bytes_per_s", self.memcpy_bytes_per_s()),
            ("workload_ops_per_s_before", self.ops_before),
            ("workload_ops_per_s_all_cpus", self.ops_all_cpus),
            ("workload_ops_per_s_beside_copier", self.ops_beside_copier),
            ("workload_ops_per_s_1cpu", self.ops_1cpu),
            ("workload_ops_per_s_during", self.ops_during),
            ("workload_ops_per_s_after", self.ops_after),
            ("copier_share_pct", self.share),
            ("mismatched_pages", self.verified(|v| v.mismatched)),
            ("not_copied_once", self.verified(|v| v.not_copied_once)),
        ];
        let mut fields: Vec<(&str, String)> = numbers
            .iter()
            .map(|&(k, v)| (k, alloc::format!("{v}")))
            .collect();
        fields.push(("range_share", fraction(r.pages, self.ram_pages)));
        fields.push(("slow_faults", alloc::format!("{}", self.splits.slow_count)));
        for ([p50, p99], step) in STEP_KEYS.iter().zip(self.splits.steps) {
            fields.push((p50, alloc::format!("{}", step[1])));
            fields.push((p99, alloc::format!("{}", step[2])));
        }
        if let Some(d) = &self.to_disk {
            fields.extend(
                d.fields()
                    .into_iter()
                    .map(|(k, v)| (k, alloc::format!("{v}"))),
            );
            fields.push(("disk_range_share", fraction(d.report.pages, self.ram_pages)));
        }
        fields
    }

    /// Success unless a verified run found a mismatch or a page not copied
    /// exactly once.
    fn verdict(&self, verify: bool) -> ExitCode {
        let mismatched = self.verified(|v| v.mismatched);
        let not_copied_once = self.verified(|v| v.not_copied_once);
        let disk_ok = self.to_disk.as_ref().is_none_or(|d| {
            d.verified
                .as_ref()
                .is_none_or(|v| v.mismatched == Some(0) && v.not_copied_once == Some(0))
        });
        if !verify || (mismatched == 0 && not_copied_once == 0 && disk_ok) {
            ExitCode::Success
        } else {
            log!("verification failed: {mismatched} mismatched pages");
            ExitCode::Failure
        }
    }
}
