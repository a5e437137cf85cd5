//! Benchmarks run inside the kernel. Each measures its baselines in the same
//! boot (absolute times drift on shared machines), prints a human summary,
//! and ends with one `BENCH-JSON {...}` line that the host tool writes to
//! the file given with `--json`.
//!
//! Benchmarks only measure: they must never change how what they measure
//! works (the baselines copy with the snapshot's own primitives).

mod backup;
mod baseline;
mod blk;
mod clone;
mod memsnap;
mod memsnap_disk;
mod mirror;

use alloc::string::String;
use core::fmt::Write;

pub use backup::backup;
pub use blk::blk;
pub use clone::clone_split;
pub use memsnap::memsnap;
pub use mirror::mirror;

const MS: u64 = 1_000_000;

fn per_second(count: u64, ns: u64) -> u64 {
    (u128::from(count) * 1_000_000_000 / u128::from(ns.max(1))) as u64
}

/// The `p`th percentile of sorted values (0 when there are none).
pub fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
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

/// `part / whole` as a decimal fraction with four places, as JSON wants it.
fn fraction(part: u64, whole: u64) -> String {
    let per_10k = u128::from(part) * 10_000 / u128::from(whole.max(1));
    alloc::format!("{}.{:04}", per_10k / 10_000, per_10k % 10_000)
}

/// Seconds from nanoseconds, as JSON wants them.
fn seconds(ns: u64) -> String {
    alloc::format!("{}.{:06}", ns / 1_000_000_000, ns % 1_000_000_000 / 1000)
}

/// Takes a snapshot to completion and releases it.
fn complete_snapshot(
    label: &str,
    opts: &crate::memsnap::Options,
) -> Result<crate::memsnap::Report, alloc::string::String> {
    crate::memsnap::start(opts).map_err(|e| alloc::format!("{label} snapshot: {e}"))?;
    let report = crate::memsnap::wait();
    let _ = crate::memsnap::release();
    report.ok_or_else(|| alloc::format!("{label} snapshot: no report"))
}
