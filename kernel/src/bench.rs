//! Benchmarks run inside the kernel. Each measures its baselines in the same
//! boot (absolute times drift on shared machines), prints a human summary,
//! and ends with one `BENCH-JSON {...}` line that the host tool writes to
//! the file given with `--json`.

use alloc::string::String;
use core::fmt::Write;

use snapshot::cmdline::CmdLine;

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

fn percentile(sorted: &[u64], p: usize) -> u64 {
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
    let mem_bytes: u64 = crate::boot_ram().map(|r| r.end - r.start).sum();
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

    let mut json = String::new();
    let mismatched = verified
        .as_ref()
        .and_then(|v| v.mismatched)
        .unwrap_or(u64::MAX);
    let not_copied_once = verified
        .as_ref()
        .and_then(|v| v.not_copied_once)
        .unwrap_or(u64::MAX);
    let fields: [(&str, u64); 31] = [
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
    json.push('{');
    for (i, (key, value)) in fields.iter().enumerate() {
        let _ = write!(json, "{}\"{key}\":{value}", if i == 0 { "" } else { "," });
    }
    json.push('}');
    crate::println!("BENCH-JSON {json}");
    if !verify || (mismatched == 0 && not_copied_once == 0) {
        ExitCode::Success
    } else {
        log!("verification failed: {mismatched} mismatched pages");
        ExitCode::Failure
    }
}
