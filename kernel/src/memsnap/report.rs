//! What a snapshot reports: its figures ([`Report`]), one line describing
//! them, the fault latencies and the copier's timeline. Read after the
//! fact; must never be on a copy path.

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use snapshot::memsnap::reserve::{LATENCY_CAPACITY, SAMPLE_CAPACITY, SAMPLE_WORDS};
use snapshot::memsnap::Stats;

use super::reference::CopyCounts;
use super::session::{LIVE, SESSION};
use super::store::disk;
use super::verify::Partial;

/// What a snapshot did, for reports and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Frames in the range.
    pub pages: u64,
    /// Copies by cause.
    pub stats: Stats,
    /// The pause: eager copy and protection, interrupts off.
    pub pause_ns: u64,
    /// Time taken by the verification reference inside the same stop.
    pub reference_ns: u64,
    /// The part of the pause spent turning protection on (PDPT swap and
    /// TLB flush); the rest is the eager copy.
    pub protect_ns: u64,
    /// Pages the engine faulted on during the pause (interrupts off, so
    /// nothing else ran): its own writes to protected memory. Always 0.
    pub pause_faults: u64,
    /// From the instant to the last copy.
    pub total_ns: u64,
    /// Time the copier spent copying.
    pub copier_busy_ns: u64,
    /// Of that, the time in the store's page copies (the rest is its
    /// per-page and per-batch overhead), estimated from the timed sample
    /// of them (one in 16).
    pub copier_copy_ns: u64,
    /// The share of its CPU the copier took, percent.
    pub copier_share_pct: u64,
    /// Range pages whose copy differs from the reference (verify only).
    pub mismatched: Option<u64>,
    /// Range pages not copied exactly once (verify only).
    pub not_copied_once: Option<u64>,
    /// The copy counts page by page (verify only).
    pub copies: Option<CopyCounts>,
    /// What the check of an aborted snapshot found (verify only).
    pub partial: Option<Partial>,
    /// The instant, in ns since boot.
    pub instant_ns: u64,
    /// Why the snapshot failed ([`snapshot::memsnap::Phase::Failed`]).
    pub error: Option<String>,
    /// What the disk store did, for snapshots to disk.
    pub disk: Option<DiskReport>,
    /// Times a faulting thread was blocked until the disk writer made room.
    pub fault_waits: u64,
    /// Times the background copier waited for room.
    pub copier_waits: u64,
}

/// A snapshot to disk's figures.
#[derive(Debug, Clone, Default)]
pub struct DiskReport {
    /// The core file's length.
    pub core_bytes: u64,
    /// The writer's figures.
    pub writer: disk::WriterStats,
    /// Completing the file: the last pages, flushes and the header, ns.
    pub complete_ns: u64,
    /// Staging pages.
    pub staging_pages: u64,
}

/// Fault latencies recorded by the last snapshot (ns), sorted.
pub fn latencies() -> Vec<u64> {
    let n = LIVE
        .latency_count
        .load(Ordering::Relaxed)
        .min(LATENCY_CAPACITY) as usize;
    let mut out: Vec<u64> = SESSION
        .with(|s| {
            s.latencies.as_ref().map(|l| {
                l.atomics()[..n]
                    .iter()
                    .map(|a| a.load(Ordering::Relaxed))
                    .collect()
            })
        })
        .flatten()
        .unwrap_or_default();
    out.sort_unstable();
    out
}

/// Emits the copier's progress samples as `memsnap.progress` trace records
/// (time since the instant, cumulative pages by cause): the timeline.
pub fn emit_timeline() {
    let n = LIVE
        .sample_count
        .load(Ordering::Relaxed)
        .min(SAMPLE_CAPACITY);
    let samples: Vec<[u64; 4]> = SESSION
        .with(|s| {
            (0..n)
                .map(|i| {
                    let w = &s.samples.atomics()[(i * SAMPLE_WORDS) as usize..];
                    [0, 1, 2, 3].map(|k| w[k].load(Ordering::Relaxed))
                })
                .collect()
        })
        .unwrap_or_default();
    for [t, eager, fault, background] in samples {
        crate::trace!(
            "memsnap.progress",
            t_us = t / 1000,
            eager = eager,
            fault = fault,
            background = background
        );
    }
    crate::trace::flush();
}

/// One line describing a report, for logs.
pub fn describe(r: &Report) -> String {
    alloc::format!(
        "{} pages: {} eager, {} on fault, {} in background ({} rewrites); pause {} us, total {} ms{}",
        r.pages,
        r.stats.eager,
        r.stats.fault,
        r.stats.background,
        r.stats.rewrites,
        r.pause_ns / 1000,
        r.total_ns / 1_000_000,
        match (r.mismatched, r.not_copied_once) {
            (Some(m), Some(n)) => alloc::format!("; verified: {m} mismatched pages, {n} not copied exactly once"),
            _ => String::new(),
        }
    ) + &match &r.disk {
        Some(d) => alloc::format!(
            "; core file {} MiB, disk writes {} MiB/s while busy, completed in {} ms",
            d.core_bytes >> 20,
            d.writer.mib_per_s(),
            d.complete_ns / 1_000_000
        ),
        None => String::new(),
    }
}
