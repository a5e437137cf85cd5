//! The `soak-memsnap` scenario: many live snapshots in one boot, each
//! configured from its seed ([`snapshot::memsnap::soak::draw`]) and each
//! verified against evidence the engine does not keep itself: a
//! stop-the-world hash of every page at the instant, copies counted page
//! by page on the store's side, the frame allocator's free count before
//! and after, and a restored region compared with the pattern it held.
//!
//! Each run opens with a `soak.begin` record and closes with one
//! `soak.run` record; the host tool's watchdog reboots the machine when a
//! run hangs. A run that finds anything wrong ends the boot with failure
//! (nothing after it could be trusted); the host reboots at the next run.
//!
//! It must never judge a run by the engine's own claims alone (its
//! counters are cross-checked, not trusted) and never leave a snapshot,
//! a workload thread or memory behind between runs.

use alloc::string::{String, ToString};
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, Ordering};

use snapshot::devices::block::BlockDevice;
use snapshot::interface::cmdline::CmdLine;
use snapshot::interface::trace::Value;
use snapshot::memsnap::soak::{self, End, RunConfig, RunResult, Store};
use snapshot::memsnap::Phase;
use snapshot::support::rng::Rng;

use crate::arch::qemu::ExitCode;
use crate::clock::now_ns;
use crate::memory::frames::{self, OwnedFrame, OwnedRun};
use crate::memsnap::{self, Options, Report};
use crate::thread::{self, JoinHandle};
use crate::trace::{emit_now, job_failed};
use crate::workload::Workload;

/// A failure injected on purpose into the soak's first run (index 0), to
/// show the soak catches it: `soak_inject=leak|mismatch|hang` (a mismatch
/// run always completes, so that every page is checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inject {
    Off,
    /// Keep one frame: a leaked frame.
    Leak,
    /// A device writes a page the snapshot was not told about: a mismatch.
    Mismatch,
    /// Never finish: the host's watchdog must reboot.
    Hang,
}

/// Runs the soak the command line describes: `seed=` (of run `first=`),
/// `runs=`, `disk=` (the disk store's disk), `dma=` (the disk the DMA
/// reader reads).
pub fn scenario(cmd: &CmdLine<'_>) -> ExitCode {
    let number = |key, default| cmd.u64(key).map(|v| v.unwrap_or(default));
    let (seed, first, runs) = match (number("seed", 1), number("first", 0), number("runs", 1)) {
        (Ok(s), Ok(f), Ok(r)) => (s, f, r),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => return job_failed("soak", true, &e),
    };
    let inject = match cmd.get("soak_inject").unwrap_or("off") {
        "off" => Inject::Off,
        "leak" => Inject::Leak,
        "mismatch" => Inject::Mismatch,
        "hang" => Inject::Hang,
        other => return job_failed("soak", true, &alloc::format!("soak_inject={other}")),
    };
    let disks = Disks {
        store: String::from(cmd.get("disk").unwrap_or("snap")),
        dma: String::from(cmd.get("dma").unwrap_or("dma")),
    };
    prime();
    for k in 0..runs {
        let index = first + k;
        let inject = if index == 0 { inject } else { Inject::Off };
        let mut config = soak::draw(soak::run_seed(seed, k));
        if inject == Inject::Mismatch {
            // Only a completed snapshot has every page checked.
            config.end = End::Complete;
        }
        emit_now(
            soak::BEGIN,
            &[
                ("run", Value::U64(index)),
                ("seed", Value::Hex(config.seed)),
            ],
        );
        crate::log!("soak run {index}: {config}");
        let result = one_run(index, &config, &disks, inject);
        let (result, error) = match result {
            Ok(r) => (r, None),
            Err((r, e)) => (r, Some(e)),
        };
        emit_now(soak::RUN, &result.fields());
        if let Some(why) = error.or_else(|| (!result.ok()).then(|| result.to_string())) {
            return job_failed("soak", false, &why);
        }
    }
    ExitCode::Success
}

/// The disks a soak uses, by serial.
struct Disks {
    store: String,
    dma: String,
}

/// Spawns and joins as many threads as a run uses at most, so the page
/// tables their stack slots need exist before the first run counts frames.
fn prime() {
    let threads: alloc::vec::Vec<JoinHandle<()>> =
        (0..8).map(|_| thread::spawn("soak-prime", || {})).collect();
    for t in threads {
        t.join();
    }
}

/// One run; on failure, what was measured and why.
fn one_run(
    index: u64,
    config: &RunConfig,
    disks: &Disks,
    inject: Inject,
) -> Result<RunResult, (RunResult, String)> {
    let started = now_ns();
    let (free_before, _) = frames::stats();
    let mut result = RunResult {
        run: index,
        seed: config.seed,
        ..RunResult::default()
    };
    let outcome = snapshot_under_load(config, disks, inject, &mut result);
    let (free_after, _) = frames::stats();
    result.leaked_frames = free_before.saturating_sub(free_after);
    result.us = (now_ns() - started) / 1000;
    match outcome {
        Ok(()) => Ok(result),
        Err(e) => Err((result, e)),
    }
}

/// Starts the workload, takes the snapshot, ends it as configured, and
/// stops everything again.
fn snapshot_under_load(
    config: &RunConfig,
    disks: &Disks,
    inject: Inject,
    result: &mut RunResult,
) -> Result<(), String> {
    let dma = match config.patterns.dma {
        true => Some(DmaReader::start(&disks.dma, config.seed)?),
        false => None,
    };
    let workload = Workload::start_with(
        config.threads as usize,
        config.bytes_each,
        config.seed,
        config.patterns,
    );
    thread::sleep_ns(config.warmup_us * 1000);
    let outcome = match &workload {
        Some(_) => snapshot_and_end(config, disks, inject, result),
        None => Err("no memory for the workload".into()),
    };
    if let Some(workload) = workload {
        workload.stop();
    }
    if let Some(dma) = dma {
        dma.stop()?;
    }
    outcome
}

/// The snapshot itself, from start to release.
fn snapshot_and_end(
    config: &RunConfig,
    disks: &Disks,
    inject: Inject,
    result: &mut RunResult,
) -> Result<(), String> {
    let (disk, staging_pages) = match config.store {
        Store::Ram => (None, None),
        Store::Disk { staging } => (Some(disks.store.clone()), staging.map(|n| n as usize)),
    };
    let opts = Options {
        copier_share_pct: Some(config.copier_share_pct),
        copier_cpu: if config.copier_shared {
            memsnap::CopierCpu::Shared
        } else {
            memsnap::CopierCpu::boot_default()
        },
        map_outside: config.map_outside,
        verify: true,
        disk,
        staging_pages,
        ..Options::default()
    };
    let mut restore = (config.end == End::Restore).then(Restore::new).flatten();
    // Taken before the start, so the mismatch below is not the copier's.
    let mut unregistered = (inject == Inject::Mismatch).then(far_frame).flatten();
    let started = memsnap::start(&opts).map_err(|e| e.to_string())?;
    result.pages = started.pages;
    if let Some(frame) = unregistered.as_mut() {
        crate::memory::snapmem::device_write(frame, 64, !0);
    }
    if inject == Inject::Leak {
        core::mem::forget(OwnedFrame::alloc());
    }
    if inject == Inject::Hang {
        loop {
            thread::sleep_ns(1_000_000);
        }
    }
    if let End::Abort { after_us } = config.end {
        thread::sleep_ns(after_us * 1000);
        return abort_and_check(result);
    }
    if let Some(r) = restore.as_mut() {
        r.dirty(config.seed);
    }
    let report = memsnap::wait().ok_or("no report")?;
    let checked = check_complete(&report, result);
    if let (Some(r), true) = (restore.as_mut(), checked.is_ok()) {
        r.dirty(!config.seed);
        result.restore_errors = r.roll_back()?;
    }
    memsnap::release().map_err(|e| e.to_string())?;
    checked
}

/// A completed snapshot's evidence into `result`.
fn check_complete(report: &Report, result: &mut RunResult) -> Result<(), String> {
    if let Some(e) = &report.error {
        return Err(alloc::format!("the snapshot failed: {e}"));
    }
    if memsnap::phase() != Phase::Complete {
        return Err(alloc::format!("phase {:?} after wait", memsnap::phase()));
    }
    let copies = report.copies.ok_or("no copy counts")?;
    result.mismatched = report.mismatched.ok_or("not verified")?;
    result.copied_twice = copies.twice;
    result.never_copied = copies.never;
    // The engine's counters against the copies counted page by page, and
    // for a disk store what its writer wrote against the same.
    result.count_disagreement = report.stats.copied().abs_diff(copies.total)
        + report
            .disk
            .as_ref()
            .map_or(0, |d| (d.writer.bytes / 4096).abs_diff(copies.total));
    Ok(())
}

/// Aborts, then checks the copies made so far and that nothing is left on.
fn abort_and_check(result: &mut RunResult) -> Result<(), String> {
    memsnap::abort().map_err(|e| e.to_string())?;
    if memsnap::phase() != Phase::Idle || memsnap::window().is_some() {
        return Err("the abort left the snapshot on".into());
    }
    let partial = memsnap::wait()
        .and_then(|r| r.partial)
        .ok_or("no check at the abort")?;
    result.mismatched = partial.mismatched;
    result.copied_twice = partial.copies.twice;
    Ok(())
}

/// For `soak_inject=mismatch`: a frame far above the others a run takes,
/// which the copier (walking up from frame 0) reaches last.
fn far_frame() -> Option<OwnedFrame> {
    let mut below: alloc::vec::Vec<OwnedFrame> =
        (0..2048).map_while(|_| OwnedFrame::alloc()).collect();
    below.pop()
}

/// A region with a known pattern, written during and after the snapshot
/// and then rolled back: it must hold the pattern again, every word.
struct Restore {
    region: OwnedRun,
    dirtied: alloc::collections::BTreeSet<usize>,
}

const RESTORE_PAGES: usize = 64;

fn pattern(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a
}

impl Restore {
    fn new() -> Option<Self> {
        let mut region = OwnedRun::alloc(RESTORE_PAGES as u64)?;
        for (i, w) in region.words_mut().iter_mut().enumerate() {
            *w = pattern(i);
        }
        Some(Restore {
            region,
            dirtied: alloc::collections::BTreeSet::new(),
        })
    }

    /// Writes a few random pages.
    fn dirty(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        for _ in 0..8 {
            let page = rng.below(RESTORE_PAGES as u64) as usize;
            let word = rng.below(512) as usize;
            self.region.words_mut()[page * 512 + word] ^= rng.next_u64() | 1;
            self.dirtied.insert(page);
        }
    }

    /// Rolls back; returns the words that differ from the pattern plus
    /// the pages restored beyond or short of those written.
    fn roll_back(&mut self) -> Result<u64, String> {
        let (virt, len) = (self.region.virt(), self.region.len_bytes());
        let restored = memsnap::restore(virt, len).map_err(|e| alloc::format!("{e:?}"))?;
        let wrong = self
            .region
            .words()
            .iter()
            .enumerate()
            .filter(|(i, w)| **w != pattern(*i))
            .count() as u64;
        Ok(wrong + restored.abs_diff(self.dirtied.len() as u64))
    }
}

/// A thread reading a disk into its own memory, at random offsets and
/// lengths, until stopped: the device writes memory behind the MMU's back.
struct DmaReader {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<u64, String>>,
}

impl DmaReader {
    fn start(name: &str, seed: u64) -> Result<Self, String> {
        let disk = crate::virtio::disk(name).map_err(|e| e.to_string())?;
        let mut buf = OwnedRun::alloc(16).ok_or("no memory for the DMA buffer")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn("soak-dma", move || {
            let mut rng = Rng::new(seed ^ 0xd3a);
            let sectors = disk.info().sectors;
            let mut reads = 0;
            while !flag.load(Ordering::Relaxed) {
                let pages = 1 + rng.below(16) as usize;
                let at = rng.below(sectors.saturating_sub(16 * 8).max(1));
                let bytes = &mut buf.bytes_mut()[..pages * 4096];
                disk.read(at, bytes).map_err(|e| e.to_string())?;
                reads += 1;
            }
            Ok(reads)
        });
        Ok(DmaReader { stop, thread })
    }

    fn stop(self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map(|_| ())
    }
}
