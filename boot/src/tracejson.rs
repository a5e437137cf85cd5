//! The serial trace as Chrome trace-event JSON (`{"traceEvents":[...]}`),
//! the format Perfetto's UI and `chrome://tracing` open, for `--trace-json`.
//!
//! One process, "kernel", with a track per activity: the snapshot's pause
//! and the copier's bursts as complete spans (`ph` "X"), one track per disk
//! with its batches as spans, the pages copied by cause as a counter
//! (`ph` "C"), and every other record as an instant (`ph` "i") on the
//! "events" track, its fields as arguments. `ts` and `dur` are microseconds
//! since boot; events are sorted by `ts`, so each track's times only grow.
//!
//! It must never invent timing: every span comes from a record's own
//! timestamp and a duration the kernel measured (`memsnap.start`'s
//! `pause_ns`, `memsnap.burst`'s `ns`, `blk.batch_time`'s `total_ns`), and
//! every counter from `memsnap.progress`'s time since the instant.

use std::collections::HashMap;

use serde_json::{json, Map, Value as Json};
use snapshot::interface::trace::{Record, Value};

/// The one process id.
const PID: u64 = 1;
/// Track ids.
const EVENTS: u64 = 1;
const PAUSE: u64 = 2;
const COPIER: u64 = 3;
/// The first disk's track; the next disk gets the next id.
const FIRST_DISK: u64 = 10;
/// The counter's name.
pub const PAGES_COPIED: &str = "memsnap pages copied";

/// Microseconds, as trace-event `ts` and `dur` want them.
fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// A record's fields as event arguments: numbers stay numbers, hex and
/// words become strings.
fn args(record: &Record<'_>) -> Map<String, Json> {
    record
        .fields()
        .map(|(key, value)| {
            let value = match value {
                Value::U64(v) => json!(v),
                Value::I64(v) => json!(v),
                Value::Hex(v) => json!(format!("{v:#x}")),
                Value::Word(w) | Value::Text(w) => json!(w),
            };
            (key.to_string(), value)
        })
        .collect()
}

/// A complete span on `tid` that ended at `end_ns` after `dur_ns`.
fn span(name: &str, tid: u64, end_ns: u64, dur_ns: u64, args: Map<String, Json>) -> Json {
    json!({
        "name": name, "ph": "X", "pid": PID, "tid": tid,
        "ts": us(end_ns.saturating_sub(dur_ns)), "dur": us(dur_ns), "args": args,
    })
}

/// Names a track.
fn thread_name(tid: u64, name: &str) -> Json {
    json!({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": name}})
}

/// The events for `records`, metadata first, then by `ts`.
pub fn events(records: &[Record<'_>]) -> Vec<Json> {
    let mut out = Vec::new();
    let mut tracks = vec![(EVENTS, "events".to_string())];
    let mut disks: HashMap<&str, u64> = HashMap::new();
    // The last `blk.batch` of each disk, whose sizes go with the
    // `blk.batch_time` that follows it.
    let mut batches: HashMap<&str, Map<String, Json>> = HashMap::new();
    // The snapshot instant the following progress samples count from.
    let mut instant_ns = None;
    for r in records {
        match r.event {
            "memsnap.start" => {
                let pause = r.u64("pause_ns").unwrap_or(0) + r.u64("reference_ns").unwrap_or(0);
                let instant = r.u64("instant_ns").unwrap_or(r.ts_ns);
                instant_ns = Some(instant);
                out.push(span("snapshot pause", PAUSE, instant, pause, args(r)));
                add_track(&mut tracks, PAUSE, "snapshot pause");
            }
            "memsnap.burst" => {
                let ns = r.u64("ns").unwrap_or(0);
                out.push(span("copier burst", COPIER, r.ts_ns, ns, args(r)));
                add_track(&mut tracks, COPIER, "snapshot copier");
            }
            "memsnap.progress" => {
                let (Some(instant), Some(t_us)) = (instant_ns, r.u64("t_us")) else {
                    continue;
                };
                let mut values = args(r);
                values.remove("t_us");
                out.push(json!({
                    "name": PAGES_COPIED, "ph": "C", "pid": PID, "tid": EVENTS,
                    "ts": us(instant + t_us * 1000), "args": values,
                }));
            }
            "blk.batch" => {
                let disk = r.str("disk").unwrap_or("?");
                batches.insert(disk, args(r));
            }
            "blk.batch_time" => {
                let disk = r.str("disk").unwrap_or("?");
                let next = FIRST_DISK + disks.len() as u64;
                let tid = *disks.entry(disk).or_insert(next);
                add_track(&mut tracks, tid, &format!("disk {disk}"));
                let mut values = batches.remove(disk).unwrap_or_default();
                values.extend(args(r));
                let total = r.u64("total_ns").unwrap_or(0);
                out.push(span("disk batch", tid, r.ts_ns, total, values));
            }
            _ => out.push(json!({
                "name": r.event, "ph": "i", "s": "t", "pid": PID, "tid": EVENTS,
                "ts": us(r.ts_ns), "args": args(r),
            })),
        }
    }
    let ts = |e: &Json| e["ts"].as_f64().unwrap_or(0.0);
    out.sort_by(|a, b| ts(a).total_cmp(&ts(b)));
    let mut all = vec![json!({
        "name": "process_name", "ph": "M", "pid": PID, "tid": EVENTS, "args": {"name": "kernel"},
    })];
    all.extend(tracks.iter().map(|(tid, name)| thread_name(*tid, name)));
    all.extend(out);
    all
}

fn add_track(tracks: &mut Vec<(u64, String)>, tid: u64, name: &str) {
    if !tracks.iter().any(|(t, _)| *t == tid) {
        tracks.push((tid, name.to_string()));
    }
}

/// The whole document, as a viewer opens it.
pub fn document(records: &[Record<'_>]) -> String {
    let doc = json!({"traceEvents": events(records), "displayTimeUnit": "ns"});
    format!("{doc}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::interface::trace::parse_line;

    const TRACE: &str = "\
TRACE 1000 boot.done tsc_hz=5 apic_timer_hz=6
TRACE 50000 memsnap.start pages=9 eager=2 pause_ns=7000 reference_ns=3000 instant_ns=48000
TRACE 60000 blk.batch disk=snap ops=1 bytes=4096 requests=1 max_inflight=1 wait_ns=10
TRACE 61000 blk.batch_time disk=snap total_ns=5000 notifies=1 waits=0 ok=1
TRACE 70000 memsnap.burst ns=2000 pages=4
TRACE 90000 memsnap.progress t_us=0 eager=2 fault=0 background=0
TRACE 90001 memsnap.progress t_us=20 eager=2 fault=1 background=4
";

    fn events_of(trace: &str) -> Vec<Json> {
        let records: Vec<_> = trace
            .lines()
            .filter_map(|l| parse_line(l).unwrap())
            .collect();
        events(&records)
    }

    fn find<'a>(events: &'a [Json], name: &str) -> Vec<&'a Json> {
        events.iter().filter(|e| e["name"] == name).collect()
    }

    #[test]
    fn spans_end_at_their_record_and_last_what_the_kernel_measured() {
        let events = events_of(TRACE);
        // The stop ended at the instant, 48 us, after 7 + 3 us.
        let pause = find(&events, "snapshot pause");
        assert_eq!(
            (pause[0]["ts"].as_f64(), pause[0]["dur"].as_f64()),
            (Some(38.0), Some(10.0))
        );
        let burst = find(&events, "copier burst");
        assert_eq!(
            (burst[0]["ts"].as_f64(), burst[0]["dur"].as_f64()),
            (Some(68.0), Some(2.0))
        );
        let batch = find(&events, "disk batch");
        assert_eq!(
            (batch[0]["ts"].as_f64(), batch[0]["dur"].as_f64()),
            (Some(56.0), Some(5.0))
        );
        assert_eq!(
            batch[0]["args"]["bytes"], 4096,
            "the batch's sizes go with its time"
        );
        assert_eq!(find(&events, "boot.done")[0]["ph"], "i");
    }

    #[test]
    fn counters_count_from_the_instant_and_tracks_are_named() {
        let events = events_of(TRACE);
        let counters = find(&events, PAGES_COPIED);
        let at: Vec<_> = counters.iter().map(|c| c["ts"].as_f64().unwrap()).collect();
        assert_eq!(at, [48.0, 68.0]);
        assert_eq!(
            counters[1]["args"],
            json!({"eager": 2, "fault": 1, "background": 4})
        );
        let names: Vec<_> = find(&events, "thread_name")
            .iter()
            .map(|e| e["args"]["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            ["events", "snapshot pause", "disk snap", "snapshot copier"]
        );
        let ts: Vec<f64> = events.iter().filter_map(|e| e["ts"].as_f64()).collect();
        assert!(ts.windows(2).all(|w| w[0] <= w[1]), "{ts:?}");
    }

    #[test]
    fn the_document_parses_as_json() {
        let records: Vec<_> = TRACE
            .lines()
            .filter_map(|l| parse_line(l).unwrap())
            .collect();
        let doc: Json = serde_json::from_str(&document(&records)).unwrap();
        assert_eq!(doc["traceEvents"].as_array().unwrap().len(), 11);
    }
}
