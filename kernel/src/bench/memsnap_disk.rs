//! What `bench-memsnap to_disk=NAME` adds: a timed live snapshot of the
//! same range to a disk, under the same workload, against the same disk's
//! sequential-write throughput and page copies timed while it writes.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use snapshot::devices::block::BlockDevice;

use super::baseline::{self, CopyTime};
use super::blk::{sequential, REQUEST, WINDOW};
use super::{complete_snapshot, fraction, per_second, percentile, MS};
use crate::clock::now_ns;
use crate::memory::frames::OwnedRun;
use crate::memsnap::{self, Options};
use crate::virtio::VirtioBlk;
use crate::workload::Workload;
use crate::{log, thread};

/// What `bench-memsnap to_disk=NAME` adds: a timed live snapshot of the
/// same range to a disk, under the same workload, against the same disk's
/// sequential-write throughput measured just before.
pub(super) struct DiskFigures {
    seq_write_mib_s: u64,
    /// One page copy's p50 and p99 while the same disk takes sequential
    /// writes: what the host's I/O costs the guest CPU.
    copy_under_io: CopyTime,
    pub(super) report: memsnap::Report,
    latencies: Vec<u64>,
    ops_during: u64,
    /// Completion interrupts the disk raised from the instant to the end
    /// of the copy.
    interrupts: u64,
    pub(super) verified: Option<memsnap::Report>,
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

    pub(super) fn log(&self, ram_p99: u64, ram_pages: u64) {
        let d = self.disk();
        log!("to disk: {}", memsnap::describe(&self.report));
        log!(
            "to disk: the range covers {} of RAM's {ram_pages} pages ({})",
            self.report.pages,
            fraction(self.report.pages, ram_pages)
        );
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

    pub(super) fn fields(&self) -> Vec<(&'static str, u64)> {
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

pub(super) fn snapshot_to_disk(
    name: &str,
    share: Option<u64>,
    workload: &Workload,
    verify: bool,
    mem_bytes: u64,
) -> Result<DiskFigures, String> {
    let disk = crate::virtio::disk(name).map_err(|e| alloc::format!("{e}"))?;
    // The baseline: as many bytes as RAM, the way bench-blk writes.
    let bytes = mem_bytes.min(disk.info().bytes()) / REQUEST as u64 * REQUEST as u64;
    let mut run = crate::memory::frames::OwnedRun::alloc((WINDOW / 4096) as u64)
        .ok_or("no memory for the baseline's buffer")?;
    let buf = run.bytes_mut();
    snapshot::devices::block::fill_pattern(2, 0, buf);
    let t = now_ns();
    sequential(&*disk, buf, (0, bytes), true).map_err(|e| alloc::format!("{e}"))?;
    let seq_write_mib_s = per_second(bytes, now_ns() - t) >> 20;
    let copy_under_io = copy_under_io(&disk, run, bytes);
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
        Some(complete_snapshot("verified to disk", &opts)?)
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

/// Page copies timed while a thread keeps `disk` writing fresh data over
/// its first `bytes` through `run`, spread over about as long as a
/// snapshot's faults are.
fn copy_under_io(disk: &Arc<VirtioBlk>, run: OwnedRun, bytes: u64) -> CopyTime {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (disk, stop) = (disk.clone(), stop.clone());
        thread::spawn("bench-io", move || {
            let mut run = run;
            let buf = run.bytes_mut();
            let mut at = 0;
            while !stop.load(Ordering::Relaxed) {
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
    let t = baseline::page_copy_spread_ns(4000, 200, 10 * MS);
    stop.store(true, Ordering::Relaxed);
    drop(writer.join());
    t
}
