//! `bench-blk`: the virtio-blk driver's throughput, and the sequential
//! writes the snapshot to disk and the backup are measured against.

use alloc::vec::Vec;

use snapshot::devices::virtio::stages::Stages;
use snapshot::interface::cmdline::CmdLine;

use super::{per_second, print_json};
use crate::arch::qemu::ExitCode;
use crate::clock::now_ns;
use crate::log;

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
    // Seven fields, more than a buffered record holds; once per phase,
    // after its timing.
    let u = snapshot::interface::trace::Value::U64;
    crate::trace::emit_now(
        "bench.blk",
        &[
            ("phase", snapshot::interface::trace::Value::Word(name)),
            ("ns", u(ns)),
            ("ops", u(ops)),
            ("requests", u(counters.requests)),
            ("wait_ns", u(counters.wait_ns)),
            ("driver_pct", u(phase.driver_pct())),
            ("notify_pct", u(phase.notify_pct())),
        ],
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
pub(super) const REQUEST: usize = 1 << 20;
/// Bytes in flight in the sequential phases (16 requests).
pub(super) const WINDOW: usize = 16 * REQUEST;

/// Writes (or reads) bytes `[from, total)` of `disk` in [`REQUEST`]-sized
/// requests, 16 in flight, through `buf` ([`WINDOW`] bytes); returns
/// `(ops, bytes)`. `bench-blk`'s sequential phases, and the baseline the
/// snapshot to disk is measured against.
pub(super) fn sequential(
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

/// The sequential baseline of a copy on the same host disk, in ns: writes
/// of bytes `[0, span)` of `disk` onto fresh space (a sparse host file
/// allocates as it goes), the same writes again onto the space they
/// allocated, then reads of what they wrote. Each write pass ends with a
/// flush and is timed with it, so it measures the host disk, not the
/// host's page cache (unflushed, the same writes measured 98 to 2 261
/// MiB/s from run to run).
pub(super) fn flushed_baseline(
    disk: &dyn snapshot::devices::block::BlockDevice,
    buf: &mut [u8],
    span: u64,
) -> Result<SeqBaseline, snapshot::devices::block::BlockError> {
    let mut write = || {
        let t = now_ns();
        sequential(disk, buf, (0, span), true)?;
        disk.flush()?;
        Ok(now_ns() - t)
    };
    let fresh_write_ns = write()?;
    let write_ns = write()?;
    let t = now_ns();
    sequential(disk, buf, (0, span), false)?;
    Ok(SeqBaseline {
        span,
        fresh_write_ns,
        write_ns,
        read_ns: now_ns() - t,
    })
}

/// What [`flushed_baseline`] measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct SeqBaseline {
    /// Bytes each pass moved.
    pub span: u64,
    /// The first write pass, onto fresh space, with its flush.
    pub fresh_write_ns: u64,
    /// The second, onto allocated space, with its flush.
    pub write_ns: u64,
    /// The read pass.
    pub read_ns: u64,
}

impl SeqBaseline {
    /// MiB/s of a pass that took `ns`.
    pub fn mib_s(&self, ns: u64) -> u64 {
        per_second(self.span, ns) >> 20
    }
}

/// `count` 4 KiB reads at random 4 KiB-aligned places of `disk`, in
/// batches of `depth * 8` run `depth` deep (one read per batch at depth 1,
/// each one's time pushed to `single_ns`); returns `(ops, bytes)`.
fn random_reads(
    disk: &dyn snapshot::devices::block::BlockDevice,
    rng: &mut snapshot::support::rng::Rng,
    depth: usize,
    count: usize,
    single_ns: &mut Vec<u64>,
) -> Result<(u64, u64), snapshot::devices::block::BlockError> {
    use snapshot::devices::block::Op;
    let sectors = disk.info().sectors;
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
}

/// Where a depth-1 read's time went, per read: the mean and median, the
/// driver's stages, and the rest (the benchmark's own loop).
fn qd1_stages(qd1: &Phase, stages: &Stages, p50_ns: u64) -> [(&'static str, u64); 10] {
    let per_request = |ns: u64| stages.per_batch(ns);
    let mean_ns = qd1.ns / qd1.ops.max(1);
    [
        ("qd1_request_ns", mean_ns),
        ("qd1_p50_ns", p50_ns),
        ("qd1_submit_ns", per_request(stages.submit_ns)),
        ("qd1_kick_ns", per_request(stages.kick_ns)),
        ("qd1_device_ns", per_request(stages.device_ns)),
        ("qd1_wakeup_ns", per_request(stages.wakeup_ns)),
        ("qd1_complete_ns", per_request(stages.complete_ns)),
        (
            "qd1_outside_ns",
            mean_ns.saturating_sub(per_request(stages.total_ns())),
        ),
        ("qd1_batches", stages.batches),
        ("qd1_interrupted", stages.interrupted),
    ]
}

/// `bench-blk`: sequential write and read of the whole disk `bench` in
/// 1 MiB requests 16 deep, then 4 KiB random reads at depth 1 and 32.
/// The host adds its own read throughput of the image as the baseline.
pub fn blk(_cmd: &CmdLine<'_>) -> ExitCode {
    use snapshot::devices::block::BlockDevice;
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
        let mut random =
            |depth, count| random_reads(&*disk, &mut rng, depth, count, &mut single_ns);
        let stages_before = disk.stages();
        let qd1 = measure(&disk, "rand_read_qd1", || random(1, 3000))?;
        let stages = disk.stages().since(&stages_before);
        let qd32 = measure(&disk, "rand_read_qd32", || random(32, 20_000))?;
        single_ns.sort_unstable();
        let qd1 = (qd1, stages, super::percentile(&single_ns, 50));
        Ok::<_, snapshot::devices::block::BlockError>((write, flush_ns, read, qd1, qd32))
    })();
    let (write, flush_ns, read, (qd1, stages, qd1_p50_ns), qd32) = match result {
        Ok(r) => r,
        Err(e) => {
            log!("bench-blk: {e}");
            return ExitCode::Failure;
        }
    };
    let fields: [(&str, u64); 15] = [
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
    ];
    let mut fields = Vec::from(fields);
    fields.extend(qd1_stages(&qd1, &stages, qd1_p50_ns));
    print_json(&fields);
    ExitCode::Success
}
