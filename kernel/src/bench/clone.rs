//! `bench-clone-split`: the online split of a fresh clone of a 4 GiB base
//! holding 1 GiB of scattered data, while a seeded workload reads and
//! writes the clone; baselines in the same boot: sequential writes and
//! reads of a scratch disk on the same host disk (flushed; the split's
//! figure is against writes onto fresh space, as the split's are), and
//! the workload alone before the split. The host adds the base's data
//! bytes and the time `qemu-img rebase -b ''` takes on a copy of the same
//! clone.

use alloc::string::String;

use snapshot::devices::block::BlockDevice;
use snapshot::interface::cmdline::CmdLine;
use snapshot::qcow2::split::WRITE_BACK_BYTES;
use snapshot::qcow2::workload;

use super::blk::{flushed_baseline, WINDOW};
use super::{per_second, percentile, print_json, seconds, MS};
use crate::arch::qemu::ExitCode;
use crate::clone::{open, run_split, Options};
use crate::log;

/// `bench-clone-split`: see the module docs.
pub fn clone_split(cmd: &CmdLine<'_>) -> ExitCode {
    let num = |key, default| cmd.get(key).and_then(|s| s.parse().ok()).unwrap_or(default);
    let share = num("share", crate::clone::SHARE);
    let floor = num("floor", crate::clone::FLOOR);
    let scratch = match crate::virtio::disk("scratch") {
        Ok(d) => d,
        Err(e) => {
            log!("bench-clone-split: {e}");
            return ExitCode::Failure;
        }
    };
    let span = (512u64 << 20).min(scratch.info().bytes());
    let base = match flushed_baseline(&*scratch, &mut alloc::vec![0u8; WINDOW], span) {
        Ok(b) => b,
        Err(e) => {
            log!("bench-clone-split: baseline: {e}");
            return ExitCode::Failure;
        }
    };
    let clone = match open("clone") {
        Ok(c) => alloc::boxed::Box::leak(alloc::boxed::Box::new(c)),
        Err((_, why)) => {
            log!("bench-clone-split: {why}");
            return ExitCode::Failure;
        }
    };
    let opts = Options {
        share,
        floor,
        busy_ops: num("busy", crate::clone::BUSY_OPS),
        workload: Some((workload::SEED, 1_000_000)),
        before_ns: 2_000 * MS,
        batch: num("batch", crate::clone::BATCH),
        write_back_bytes: num("wb_mib", WRITE_BACK_BYTES >> 20) << 20,
        write_chunk: num("chunk_kib", crate::clone::WRITE_CHUNK >> 10) << 10,
        write_depth: num("depth", crate::clone::WRITE_DEPTH as u64) as usize,
        write_back_thread: num("wb_thread", 1) != 0,
    };
    let run = match run_split(clone, &opts, &mut |_| {}) {
        Ok(r) => r,
        Err((_, why)) => {
            log!("bench-clone-split: {why}");
            return ExitCode::Failure;
        }
    };
    let load = run.load.as_ref().expect("the benchmark runs a workload");
    let [mut before, mut during] = [load.latencies[0].clone(), load.latencies[1].clone()];
    before.sort_unstable();
    during.sort_unstable();
    let p = run.progress;
    let mib_s = |bytes: u64, ns: u64| per_second(bytes, ns) >> 20;
    log!(
        "split: {} MiB copied, {} zero clusters, {} filled by the workload, in {} ms ({} MiB/s); scratch disk, flushed: {} MiB/s writing fresh space, {} allocated, {} reading",
        p.copied_bytes >> 20,
        p.zeroed,
        p.by_workload,
        run.split_ns / MS,
        mib_s(p.copied_bytes, run.split_ns),
        base.mib_s(base.fresh_write_ns),
        base.mib_s(base.write_ns),
        base.mib_s(base.read_ns)
    );
    let t = run.times;
    log!(
        "split time: {} ms resting, {} ms waiting for the chain's reads, {} ms committing",
        t.rest_ns / MS,
        t.wait_read_ns / MS,
        t.commit_ns / MS
    );
    let f = |v: u64| alloc::format!("{v}");
    let fields: [(&str, String); 17] = [
        ("bench", "\"clone-split\"".into()),
        ("virtual_bytes", f(clone.geometry().virtual_size)),
        ("copied_bytes", f(p.copied_bytes)),
        ("zero_clusters", f(p.zeroed)),
        ("workload_filled_clusters", f(p.by_workload)),
        ("split_s", seconds(run.split_ns)),
        ("split_mib_s", f(mib_s(p.copied_bytes, run.split_ns))),
        ("seq_write_mib_s", f(base.mib_s(base.fresh_write_ns))),
        ("seq_write_allocated_mib_s", f(base.mib_s(base.write_ns))),
        ("seq_read_mib_s", f(base.mib_s(base.read_ns))),
        (
            "workload_ops_per_s_before",
            f(per_second(before.len() as u64, run.before_ns)),
        ),
        (
            "workload_ops_per_s_during",
            f(per_second(during.len() as u64, run.split_ns)),
        ),
        ("workload_p99_ns_before", f(percentile(&before, 99))),
        ("workload_p99_ns_during", f(percentile(&during, 99))),
        ("share_pct", f(share)),
        ("floor_pct", f(floor)),
        ("workload_ops", f(load.ops)),
    ];
    crate::trace!(
        "clone.split",
        units = p.units,
        copied_bytes = p.copied_bytes,
        split_ns = run.split_ns,
        workload_ops = load.ops
    );
    crate::trace::flush();
    print_json(&fields);
    ExitCode::Success
}
