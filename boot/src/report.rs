//! Turning the serial log's trace records into summaries.

use std::collections::BTreeMap;

use snapshot::trace::{parse_line, Record};

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

#[cfg(test)]
mod tests {
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
}
