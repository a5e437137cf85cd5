//! `--trace-json FILE`: the host tool writes the run's trace as Chrome
//! trace-event JSON. Checked here with a validator written apart from the
//! writer (the format's rules, not the writer's code), and against what
//! the kernel reported by other records of the same run.

use serde_json::Value as Json;

use kernel_tests::host_tool;

/// Checks `text` against the trace-event format's rules: a `traceEvents`
/// array of objects with a known `ph`, a name, integer `pid` and `tid`,
/// numeric `ts` (but for metadata) and `dur` (for spans), times that never
/// go back on a track, every `B` closed by an `E` on its track, and
/// counters whose arguments are all numbers. Returns the events.
fn validate(text: &str) -> Result<Vec<Json>, String> {
    let doc: Json = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let events = doc["traceEvents"]
        .as_array()
        .ok_or("no traceEvents array")?
        .clone();
    let mut last_ts = std::collections::HashMap::new();
    let mut open: std::collections::HashMap<(u64, u64), Vec<String>> = Default::default();
    for (i, e) in events.iter().enumerate() {
        let at = |what: &str| format!("event {i} {what}: {e}");
        let ph = e["ph"].as_str().ok_or_else(|| at("has no ph"))?;
        let name = e["name"].as_str().ok_or_else(|| at("has no name"))?;
        let track = match (e["pid"].as_u64(), e["tid"].as_u64()) {
            (Some(pid), Some(tid)) => (pid, tid),
            _ => return Err(at("has no integer pid and tid")),
        };
        if ph == "M" {
            continue;
        }
        let ts = e["ts"].as_f64().ok_or_else(|| at("has no numeric ts"))?;
        if ts < 0.0 || last_ts.insert(track, ts).is_some_and(|last| ts < last) {
            return Err(at("goes back in time on its track"));
        }
        match ph {
            "X" if e["dur"].as_f64().is_some_and(|d| d >= 0.0) => {}
            "X" => return Err(at("is a span without a duration")),
            "B" => open.entry(track).or_default().push(name.to_string()),
            "E" => {
                open.get_mut(&track)
                    .and_then(Vec::pop)
                    .ok_or_else(|| at("ends no open span"))?;
            }
            "C" => {
                let args = e["args"].as_object().ok_or_else(|| at("has no args"))?;
                if args.is_empty() || !args.values().all(Json::is_number) {
                    return Err(at("is a counter with a value that is not a number"));
                }
            }
            "i" | "I" => {}
            _ => return Err(at("has an unknown ph")),
        }
    }
    match open.iter().find(|(_, names)| !names.is_empty()) {
        Some((track, names)) => Err(format!("spans {names:?} on {track:?} never end")),
        None => Ok(events),
    }
}

#[test]
fn the_validator_refuses_what_viewers_would_misread() {
    let ok = r#"{"traceEvents":[{"name":"a","ph":"B","pid":1,"tid":1,"ts":1},
        {"name":"a","ph":"E","pid":1,"tid":1,"ts":2},
        {"name":"c","ph":"C","pid":1,"tid":2,"ts":0,"args":{"n":3}}]}"#;
    assert_eq!(validate(ok).map(|e| e.len()), Ok(3));
    for (bad, why) in [
        (
            r#"{"traceEvents":[{"name":"a","ph":"B","pid":1,"tid":1,"ts":1}]}"#,
            "never end",
        ),
        (
            r#"{"traceEvents":[{"name":"a","ph":"E","pid":1,"tid":1,"ts":1}]}"#,
            "ends no",
        ),
        (
            r#"{"traceEvents":[{"name":"a","ph":"i","pid":1,"tid":1,"ts":2},
                {"name":"a","ph":"i","pid":1,"tid":1,"ts":1}]}"#,
            "back in time",
        ),
        (
            r#"{"traceEvents":[{"name":"c","ph":"C","pid":1,"tid":1,"ts":1,"args":{"n":"3"}}]}"#,
            "not a number",
        ),
        (
            r#"{"traceEvents":[{"name":"x","ph":"X","pid":1,"tid":1,"ts":1}]}"#,
            "duration",
        ),
        (r#"{"events":[]}"#, "no traceEvents"),
        ("{", "not JSON"),
    ] {
        let err = validate(bad).unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
    }
}

/// Runs the host tool with `--trace-json` and returns the validated events.
fn run_with_trace_json(name: &str, args: &[&str]) -> Vec<Json> {
    let dir = boot::workspace_root().join("target/trace-json-test");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.json"));
    let _ = std::fs::remove_file(&path);
    let mut words = args.to_vec();
    words.extend(["--quiet", "--trace-json", path.to_str().unwrap()]);
    let run = host_tool(&words);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let text = std::fs::read_to_string(&path).expect("the trace file");
    validate(&text).unwrap_or_else(|e| panic!("{e}"))
}

fn named<'a>(events: &'a [Json], name: &str) -> Vec<&'a Json> {
    events.iter().filter(|e| e["name"] == name).collect()
}

fn num(e: &Json, key: &str) -> u64 {
    e["args"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {e}"))
}

/// The demo's snapshot shows as a pause span, copier bursts after it, and
/// the pages-copied counter, whose last value is what the demo's own
/// `demo.snapshot` record reports and whose background pages are the
/// bursts' pages added up.
#[test]
fn the_demo_trace_has_the_pause_the_bursts_and_the_pages_copied() {
    let events = run_with_trace_json("demo", &["demo"]);
    let pause = named(&events, "snapshot pause");
    assert_eq!(pause.len(), 1, "one snapshot, one pause");
    let pause_end = pause[0]["ts"].as_f64().unwrap() + pause[0]["dur"].as_f64().unwrap();
    assert!(pause[0]["dur"].as_f64().unwrap() > 0.0, "{}", pause[0]);

    let counters = named(&events, boot::tracejson::PAGES_COPIED);
    assert!(counters.len() >= 2, "{counters:?}");
    assert!(counters.iter().all(|c| c["ph"] == "C"));
    assert!(counters[0]["ts"].as_f64().unwrap() >= pause_end);
    let total = |c: &Json| num(c, "eager") + num(c, "fault") + num(c, "background");
    assert!(counters.windows(2).all(|w| total(w[0]) <= total(w[1])));
    let last = counters.last().unwrap();
    let report = named(&events, "demo.snapshot");
    for cause in ["eager", "fault", "background"] {
        assert_eq!(num(last, cause), num(report[0], cause), "{cause}");
    }
    assert_eq!(total(last), num(report[0], "pages"), "every page copied");

    let bursts = named(&events, "copier burst");
    assert!(!bursts.is_empty());
    assert!(bursts
        .iter()
        .all(|b| b["ts"].as_f64().unwrap() >= pause_end));
    let burst_pages: u64 = bursts.iter().map(|b| num(b, "pages")).sum();
    assert_eq!(burst_pages, num(last, "background"));
}

/// A snapshot to disk shows its disk's batches as spans, carrying the
/// bytes each moved: together at least the core file the kernel wrote.
#[test]
fn a_snapshot_to_disk_shows_the_disk_batches() {
    let dir = boot::workspace_root().join("target/trace-json-test");
    std::fs::create_dir_all(&dir).unwrap();
    let core = dir.join("memsnap.core");
    let events = run_with_trace_json("memsnap", &["memsnap", "--out", core.to_str().unwrap()]);
    let batches = named(&events, "disk batch");
    assert!(!batches.is_empty());
    let track = batches[0]["tid"].clone();
    assert!(batches.iter().all(|b| b["ph"] == "X" && b["tid"] == track));
    let names = named(&events, "thread_name");
    assert!(names
        .iter()
        .any(|n| n["tid"] == track && n["args"]["name"] == "disk snap"));
    let bytes: u64 = batches.iter().map(|b| num(b, "bytes")).sum();
    let written = num(named(&events, "memsnap.core")[0], "written");
    assert!(
        bytes >= written,
        "{bytes} bytes in batches, {written} written"
    );
    let _ = std::fs::remove_file(&core);
}
