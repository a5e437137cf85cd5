//! Turning the serial log's trace records into summaries.

use std::collections::BTreeMap;

use snapshot::interface::trace::{parse_line, Record};

/// Every trace record in `serial`, in order. Malformed `TRACE` lines are
/// returned as errors with their line number, never skipped silently.
pub fn records(serial: &str) -> Result<Vec<Record<'_>>, String> {
    let mut out = Vec::new();
    for (number, line) in serial.lines().enumerate() {
        match parse_line(line) {
            Ok(Some(record)) => out.push(record),
            Ok(None) => {}
            Err(e) => return Err(format!("serial line {}: {e}: {line:?}", number + 1)),
        }
    }
    Ok(out)
}

/// Records per event name.
pub fn counts<'a>(records: &[Record<'a>]) -> BTreeMap<&'a str, usize> {
    let mut counts = BTreeMap::new();
    for r in records {
        *counts.entry(r.event).or_insert(0) += 1;
    }
    counts
}

/// A short human summary: events, counts, and the time span covered.
pub fn summary(records: &[Record<'_>]) -> String {
    let mut text = String::new();
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return "no trace records\n".into();
    };
    text.push_str(&format!(
        "{} trace records over {:.3} ms:\n",
        records.len(),
        (last.ts_ns.saturating_sub(first.ts_ns)) as f64 / 1e6
    ));
    for (event, count) in counts(records) {
        text.push_str(&format!("  {event:<24} {count}\n"));
    }
    text
}

/// Per-disk totals from the block layer's `blk.disk` and `blk.disk_time`
/// records (each disk's sums since boot, traced as the run ends; a later
/// record replaces an earlier one): where each disk's time went. `None`
/// without such records.
pub fn blk_report(records: &[Record<'_>]) -> Option<String> {
    #[derive(Default)]
    struct Disk {
        batches: u64,
        requests: u64,
        bytes: u64,
        max_inflight: u64,
        wait_ns: u64,
        total_ns: u64,
        notifies: u64,
        failed: u64,
    }
    let mut disks: BTreeMap<String, Disk> = BTreeMap::new();
    for r in records {
        let Some(name) = r.get("disk").map(|v| v.to_string()) else {
            continue;
        };
        let u = |k| r.u64(k).unwrap_or(0);
        match r.event {
            "blk.disk" => {
                let d = disks.entry(name).or_default();
                d.batches = u("batches");
                d.requests = u("requests");
                d.bytes = u("bytes");
                d.max_inflight = u("max_inflight");
                d.failed = u("failed");
            }
            "blk.disk_time" => {
                let d = disks.entry(name).or_default();
                d.total_ns = u("busy_ns");
                d.wait_ns = u("wait_ns");
                d.notifies = u("notifies");
            }
            _ => {}
        }
    }
    if disks.is_empty() {
        return None;
    }
    let mut text = String::from(
        "block layer (from blk.disk records):\n  disk             batches  requests       MiB  max in flight   busy ms  waiting %  notifies  failed\n",
    );
    for (name, d) in &disks {
        let waiting = if d.total_ns == 0 {
            0.0
        } else {
            100.0 * d.wait_ns.min(d.total_ns) as f64 / d.total_ns as f64
        };
        text.push_str(&format!(
            "  {name:<16} {:>7} {:>9} {:>9.1} {:>14} {:>9.1} {:>10.1} {:>9} {:>7}\n",
            d.batches,
            d.requests,
            d.bytes as f64 / (1u64 << 20) as f64,
            d.max_inflight,
            d.total_ns as f64 / 1e6,
            waiting,
            d.notifies,
            d.failed
        ));
    }
    Some(text)
}

/// `bytes` for people: the largest binary unit it reaches, with one
/// decimal below 10 of it ("0 B", "512 B", "9.8 MiB", "64 TiB").
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let Some(i) = (0..UNITS.len())
        .rev()
        .find(|&i| bytes >> (10 * (i + 1)) > 0)
    else {
        return format!("{bytes} B");
    };
    let value = bytes as f64 / (1u64 << (10 * (i + 1))) as f64;
    if value < 10.0 && !bytes.is_multiple_of(1u64 << (10 * (i + 1))) {
        format!("{value:.1} {}", UNITS[i])
    } else {
        format!("{} {}", value.round(), UNITS[i])
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(64 << 40), "64 TiB");
        assert_eq!(human_bytes(10 << 20 | 1), "10 MiB");
        assert_eq!(human_bytes((9 << 20) + (800 << 10)), "9.8 MiB");
    }
    use super::*;

    #[test]
    fn finds_records_among_log_lines() {
        let log = "[ 0.1] hello\nTRACE 10 a.b x=1\nTRACE 30 a.b x=2\nTRACE 40 c y=0x10\n";
        let recs = records(log).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(counts(&recs).get("a.b"), Some(&2));
        assert!(summary(&recs).contains("3 trace records over 0.000 ms"));
    }

    #[test]
    fn malformed_records_are_reported_with_their_line() {
        let err = records("ok\nTRACE nope\n").unwrap_err();
        assert!(err.starts_with("serial line 2:"), "{err}");
    }

    #[test]
    fn block_records_give_each_disk_its_last_sums() {
        let serial = "\
TRACE 1 blk.disk disk=data0 batches=1 requests=1 bytes=1048576 max_inflight=1 failed=0
TRACE 2 blk.disk_time disk=data0 busy_ns=100 wait_ns=50 notifies=1 waits=1
TRACE 3 blk.disk disk=data0 batches=2 requests=3 bytes=2097152 max_inflight=2 failed=1
TRACE 4 blk.disk_time disk=data0 busy_ns=1000 wait_ns=400 notifies=2 waits=2
TRACE 5 blk.disk disk=tape batches=1 requests=1 bytes=512 max_inflight=1 failed=0
TRACE 6 blk.disk_time disk=tape busy_ns=10 wait_ns=0 notifies=1 waits=0
";
        let records = records(serial).unwrap();
        let report = blk_report(&records).expect("report");
        let data0 = report.lines().find(|l| l.contains("data0")).unwrap();
        let cols: Vec<&str> = data0.split_whitespace().collect();
        assert_eq!(
            cols,
            ["data0", "2", "3", "2.0", "2", "0.0", "40.0", "2", "1"]
        );
        assert!(report.contains("tape"));
        assert!(blk_report(&records[..0]).is_none());
    }
}
