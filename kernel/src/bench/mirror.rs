//! `bench-mirror`: the quick-split mirror measured. A pair with a set
//! amount of differential data at the split, a seeded write workload
//! writing during the copy; an untimed round first (so that the host's
//! sparse files are allocated where the rounds write), then three rounds
//! on the same data: the backup during the copy `via=secondary`, the
//! same `via=memory`, and the slow way (wait for the copy, then back
//! up). Beside them, in the same boot: sequential writes of the
//! secondary and reads of what they wrote (the copy's baseline), the workload before the split, and the split's
//! acknowledgement on two more pairs of different sizes, taking turns.
//! The pair's size is the disks' (the host's `--volume`); the
//! differential is a quarter of it.
//! Kernel words: `batch=` blocks per copier step (default the mirror's);
//! `pipeline=off` makes the copier read and write its batches in turn
//! (to compare; by default a reader thread reads the next batch while the
//! current one is written).
//!
//! This module only measures: it drives the mirror through its public
//! operations and never changes how they work.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use snapshot::devices::block::BlockDevice;
use snapshot::interface::cmdline::CmdLine;
use snapshot::mirror::{Budget, Disks, Error, Mirror, Options, Via};
use snapshot::support::rng::Rng;

use super::blk::flushed_baseline;
use super::{per_second, percentile, print_json, seconds};
use crate::arch::qemu::ExitCode;
use crate::clock::now_ns;
use crate::mirror::{
    backup, copier, mismatched, progress, pump_all, reference, workload, Point, BATCH,
};
use crate::{log, thread, virtio};

/// Every `SPREAD`th block carries differential data at the split.
const SPREAD: u64 = 4;
/// Workload writes timed before the split.
const BEFORE_OPS: u64 = 1000;
/// Splits timed on each acknowledgement pair (the median is reported).
const ACK_SPLITS: usize = 9;

/// `bench-mirror`: see the module docs.
pub fn mirror(cmd: &CmdLine<'_>) -> ExitCode {
    let batch = cmd
        .get("batch")
        .and_then(|v| v.parse().ok())
        .unwrap_or(BATCH);
    crate::mirror::PIPELINED.store(cmd.get("pipeline") != Some("off"), Ordering::Relaxed);
    match run(batch) {
        Ok(fields) => {
            print_json(&fields);
            ExitCode::Success
        }
        Err(e) => {
            log!("bench-mirror: {e}");
            ExitCode::Failure
        }
    }
}

fn disk(name: &str) -> Result<Arc<virtio::VirtioBlk>, Error> {
    virtio::disk(name).map_err(Error::Io)
}

fn disks(prefix: &str) -> Result<Disks, Error> {
    let name = |what: &str| alloc::format!("{prefix}{what}");
    Ok(Disks {
        primary: disk(&name("primary"))?,
        secondary: disk(&name("secondary"))?,
        control: disk(&name("control"))?,
    })
}

/// The median time of a split on each of the pairs named by `prefixes`
/// (new pairs, every block pending), the controller disk flushed before
/// each: the acknowledgement must not grow with the volume. The pairs
/// take turns, split by split, so that a shared machine's changing load
/// falls on each alike. Returns `(median ns, volume bytes)` per pair.
fn split_ack_ns<const N: usize>(prefixes: [&str; N]) -> Result<[(u64, u64); N], Error> {
    let mut pairs = Vec::new();
    for prefix in prefixes {
        let (m, _) = Mirror::open(disks(prefix)?, Options::default(), thread::yield_now)?;
        pairs.push((m, Vec::new()));
    }
    for _ in 0..ACK_SPLITS {
        for (m, times) in &mut pairs {
            // The resync's bitmap sectors go out lazily (unflushed); the
            // split's one flush would otherwise pay for writing them back.
            m.disks().control.flush().map_err(Error::Io)?;
            let t = now_ns();
            m.split()?;
            times.push(now_ns() - t);
            m.resync()?;
        }
    }
    let mut out = [(0, 0); N];
    for ((m, times), slot) in pairs.iter_mut().zip(&mut out) {
        times.sort_unstable();
        *slot = (percentile(times, 50), m.geometry().volume_bytes);
    }
    Ok(out)
}

/// Sequential writes of the secondary (zeros, which it holds already)
/// over `span` bytes, each pass flushed, then reads of what they wrote:
/// MiB/s of each. The figure is the second write pass, so that, like the
/// copy it is the baseline of, it finds the host's sparse file allocated
/// (a first write there pays for the allocation, and a read of a hole
/// reads nothing).
fn baseline(s: &dyn BlockDevice, span: u64) -> Result<(u64, u64), Error> {
    let mut buf = alloc::vec![0u8; (BATCH << 16) as usize];
    let b = flushed_baseline(s, &mut buf, span).map_err(Error::Io)?;
    Ok((b.mib_s(b.write_ns), b.mib_s(b.read_ns)))
}

/// Writes the differential data: every [`SPREAD`]th block, whole.
fn differential(m: &Mirror) -> Result<u64, Error> {
    let geo = m.geometry();
    let mut buf = alloc::vec![0u8; geo.block_bytes as usize];
    let mut bytes = 0;
    for b in (0..geo.blocks()).step_by(SPREAD as usize) {
        let (sector, len) = geo.extent(b);
        snapshot::devices::block::fill_pattern(0xd1ff, sector, &mut buf[..len]);
        m.write(sector, &buf[..len])?;
        bytes += len as u64;
    }
    Ok(bytes)
}

/// What the workload did: latencies (sorted), ops per second, and the
/// blocks it wrote, counted by replaying its seeded positions.
struct Load {
    lat: Vec<u64>,
    ops_per_s: u64,
    blocks: u64,
}

impl Load {
    fn new(m: &Mirror, seed: u64, mut lat: Vec<u64>, ns: u64) -> Load {
        let geo = m.geometry();
        let mut rng = Rng::new(seed);
        let sectors = geo.volume_bytes / 512;
        let mut seen = alloc::collections::BTreeSet::new();
        for _ in 0..lat.len() {
            let at = rng.below(sectors.saturating_sub(8).max(1)) & !7;
            seen.insert(at * 512 / geo.block_bytes);
        }
        let ops_per_s = per_second(lat.len() as u64, ns);
        lat.sort_unstable();
        Load {
            lat,
            ops_per_s,
            blocks: seen.len() as u64,
        }
    }
}

/// Each named disk's counts by kind ([`virtio::VirtioBlk::kinds`]) at
/// one moment, to log where a stage's time went on each disk.
struct DiskTimes(Vec<(&'static str, [[u64; 3]; 3], u64)>);

impl DiskTimes {
    const NAMES: [&'static str; 4] = ["primary", "secondary", "control", "tape"];

    fn now() -> DiskTimes {
        DiskTimes(
            Self::NAMES
                .iter()
                .filter_map(|&n| {
                    let (k, lock) = virtio::disk(n).ok()?.kinds();
                    Some((n, k, lock))
                })
                .collect(),
        )
    }

    /// Logs what each disk did since `self`, labelled `what`.
    fn log_since(&self, what: &str) {
        let now = DiskTimes::now();
        for ((name, a, la), (_, b, lb)) in self.0.iter().zip(&now.0) {
            let d = |k: usize, i: usize| b[k][i] - a[k][i];
            log!(
                "bench-mirror: {what} {name}: reads {} {} KiB {} us, writes {} {} KiB {} us, flushes {} {} us, lock wait {} us",
                d(0, 0), d(0, 1) >> 10, d(0, 2) / 1000,
                d(1, 0), d(1, 1) >> 10, d(1, 2) / 1000,
                d(2, 0), d(2, 2) / 1000, (lb - la) / 1000
            );
        }
    }
}

/// One round's figures.
struct Round {
    backup_ns: u64,
    copy_ns: u64,
    copied_bytes: u64,
    on_demand: u64,
    mismatched: u64,
    resync_bytes: u64,
    load: Load,
}

/// Differential data, split (reference hashes at the instant), the
/// workload from the acknowledgement on; then the backup during the copy
/// (`slow` false) or after it (`slow` true, via the secondary); then
/// resync. Times count from the acknowledgement.
fn round(
    m: &Arc<Mirror>,
    tape: &dyn BlockDevice,
    via: Via,
    slow: bool,
    seed: u64,
    batch: u64,
) -> Result<Round, Error> {
    differential(m)?;
    let mut hashes = Ok(Vec::new());
    let ack = m.split_with(&mut || hashes = reference(m))?;
    let hashes = hashes?;
    let stop = Arc::new(AtomicBool::new(false));
    let (m2, stop2) = (m.clone(), stop.clone());
    let t0 = now_ns();
    let disk_times = DiskTimes::now();
    let writer = thread::spawn("bench-mirror-workload", move || {
        workload(&m2, seed, None, &stop2, true)
    });
    let never = AtomicBool::new(false);
    let mut progress = progress();
    let (summary, copy_ns) = if slow {
        copier(m, &never, batch)?;
        let copy_ns = now_ns() - t0;
        disk_times.log_since("slow round, copy");
        (
            backup(m, tape, Via::Secondary, full(), &mut progress)?,
            copy_ns,
        )
    } else {
        let m2 = m.clone();
        let copying = thread::spawn("bench-mirror-copier", move || {
            let never = AtomicBool::new(false);
            copier(&m2, &never, batch).map(|_| now_ns() - t0)
        });
        let summary = backup(m, tape, via, full(), &mut progress);
        let copy_ns = copying.join()?;
        (summary?, copy_ns)
    };
    let backup_ns = now_ns() - t0;
    disk_times.log_since(if slow { "slow round, all" } else { via.name() });
    stop.store(true, Ordering::Relaxed);
    let lat = writer.join()?;
    let load = Load::new(m, seed, lat, now_ns() - t0);
    let mismatched = mismatched(tape, &hashes)?;
    let resync_bytes = m.resync()? * m.geometry().block_bytes;
    pump_all(m, &mut progress, BATCH, Point::Pair)?;
    Ok(Round {
        backup_ns,
        copy_ns,
        copied_bytes: ack.pending * m.geometry().block_bytes,
        on_demand: summary.on_demand,
        mismatched,
        resync_bytes,
        load,
    })
}

fn run(batch: u64) -> Result<Vec<(&'static str, String)>, Error> {
    crate::memory::heap::reset_peak();
    let [(ack_small, small_bytes), (ack_big, big_bytes)] = split_ack_ns(["small-", "big-"])?;
    let d = disks("")?;
    let s = d.secondary.clone();
    let tape = disk("tape")?;
    let span = d.primary.info().bytes() / SPREAD;
    let (seq_write, seq_read) = baseline(&*s, span)?;
    let opts = Options {
        assume_clean: true,
        ..Options::default()
    };
    let (m, _) = Mirror::open(d, opts, thread::yield_now)?;
    let m = Arc::new(m);
    let t = now_ns();
    let never = AtomicBool::new(false);
    let lat = workload(&m, 7, Some(BEFORE_OPS), &never, true)?;
    let before = Load::new(&m, 7, lat, now_ns() - t);
    pump_all(&m, &mut progress(), BATCH, Point::Pair)?;
    // An untimed round first: it allocates what the measured rounds
    // write (the tape, the differential blocks on both volumes, the
    // workload's places) in the host's sparse files, so that every
    // measured round finds the disks in the same state.
    round(&m, &*tape, Via::Memory, false, 11, batch)?;
    let quick = round(&m, &*tape, Via::Secondary, false, 11, batch)?;
    let memory = round(&m, &*tape, Via::Memory, false, 11, batch)?;
    let slow = round(&m, &*tape, Via::Secondary, true, 11, batch)?;
    log!(
        "bench-mirror: backup via secondary {} ms, via memory {} ms, copy then backup {} ms",
        quick.backup_ns / 1_000_000,
        memory.backup_ns / 1_000_000,
        slow.backup_ns / 1_000_000
    );
    let during = &quick.load;
    let n = |v: u64| alloc::format!("{v}");
    Ok(alloc::vec![
        ("bench", "\"mirror\"".into()),
        ("volume_bytes", n(m.geometry().volume_bytes)),
        ("block_bytes", n(m.geometry().block_bytes)),
        ("differential_bytes", n(slow.copied_bytes)),
        ("split_ack_ns", n(ack_small)),
        ("split_ack_volume_bytes", n(small_bytes)),
        ("split_ack_big_ns", n(ack_big)),
        ("split_ack_big_volume_bytes", n(big_bytes)),
        (
            "copy_mib_s",
            n(per_second(slow.copied_bytes, slow.copy_ns) >> 20)
        ),
        (
            "copy_mib_s_during_backup",
            n(per_second(quick.copied_bytes, quick.copy_ns) >> 20)
        ),
        ("seq_read_mib_s", n(seq_read)),
        ("seq_write_mib_s", n(seq_write)),
        (
            "workload_write_p50_ns_before",
            n(percentile(&before.lat, 50))
        ),
        (
            "workload_write_p99_ns_before",
            n(percentile(&before.lat, 99))
        ),
        ("workload_ops_per_s_before", n(before.ops_per_s)),
        (
            "workload_write_p50_ns_during",
            n(percentile(&during.lat, 50))
        ),
        (
            "workload_write_p99_ns_during",
            n(percentile(&during.lat, 99))
        ),
        ("workload_ops_per_s_during", n(during.ops_per_s)),
        ("backup_s_via_secondary", seconds(quick.backup_ns)),
        ("backup_s_via_memory", seconds(memory.backup_ns)),
        ("copy_then_backup_s", seconds(slow.backup_ns)),
        ("on_demand_blocks", n(quick.on_demand)),
        ("on_demand_blocks_via_memory", n(memory.on_demand)),
        ("resync_bytes", n(quick.resync_bytes)),
        (
            "written_since_split_bytes",
            n(quick.load.blocks * m.geometry().block_bytes)
        ),
        (
            "mismatched_blocks",
            n(quick.mismatched + memory.mismatched + slow.mismatched)
        ),
        // The heap's high-water mark over the whole bench: what the host's
        // `--volume` sizing of `--mem` must cover.
        ("heap_peak_bytes", n(crate::memory::heap::peak() as u64)),
    ])
}

/// Full windows and batches: the benchmark runs with the memory it needs.
fn full() -> Budget {
    Budget {
        batch: BATCH,
        window_extents: u64::MAX,
    }
}
