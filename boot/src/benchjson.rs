//! A benchmark's result: the kernel prints one `BENCH-JSON {...}` line, a
//! flat JSON object of numbers (and the odd string); here it is parsed
//! once into fields that the goals read by name, and written back out,
//! with the host's own figures appended, for `--json`.
//!
//! Values keep the text the kernel printed, so what is written is what
//! was measured, digit for digit. Parsing never panics: a malformed line
//! is an error.

use std::fmt;

/// The tag that starts the line.
pub const TAG: &str = "BENCH-JSON ";

/// The fields of one result, in the kernel's order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BenchJson {
    fields: Vec<(String, String)>,
}

impl BenchJson {
    /// The result among the serial lines, if the kernel printed one.
    pub fn from_serial(serial: &str) -> Option<Result<BenchJson, String>> {
        serial
            .lines()
            .find_map(|l| l.strip_prefix(TAG))
            .map(BenchJson::parse)
    }

    /// Parses a flat object: `{"key":value,...}`, each value a number or
    /// a string without escapes.
    pub fn parse(text: &str) -> Result<BenchJson, String> {
        let bad = |why: &str| format!("bad benchmark result ({why}): {text}");
        let body = text
            .trim()
            .strip_prefix('{')
            .and_then(|b| b.strip_suffix('}'))
            .ok_or_else(|| bad("not an object"))?;
        let mut fields = Vec::new();
        let mut rest = body.trim();
        while !rest.is_empty() {
            let (key, after) = rest
                .strip_prefix('"')
                .and_then(|r| r.split_once('"'))
                .ok_or_else(|| bad("a key is not a string"))?;
            let after = after
                .trim_start()
                .strip_prefix(':')
                .ok_or_else(|| bad("no ':' after a key"))?
                .trim_start();
            let end = match after.strip_prefix('"') {
                Some(s) => s
                    .find('"')
                    .map(|i| i + 2)
                    .ok_or_else(|| bad("open string"))?,
                None => after.find(',').unwrap_or(after.len()),
            };
            let value = after[..end].trim();
            if !value.starts_with('"') && value.parse::<f64>().is_err() {
                return Err(bad("a value is neither a number nor a string"));
            }
            fields.push((key.to_string(), value.to_string()));
            rest = after[end..].trim_start();
            if let Some(next) = rest.strip_prefix(',') {
                rest = next.trim_start();
                if rest.is_empty() {
                    return Err(bad("a trailing ','"));
                }
            } else if !rest.is_empty() {
                return Err(bad("no ',' between fields"));
            }
        }
        Ok(BenchJson { fields })
    }

    fn raw(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// An integer field.
    pub fn u64(&self, key: &str) -> Option<u64> {
        self.raw(key)?.parse().ok()
    }

    /// A number field, integer or decimal.
    pub fn f64(&self, key: &str) -> Option<f64> {
        self.raw(key)?.parse().ok()
    }

    /// Appends a number field.
    pub fn push(&mut self, key: &str, value: u64) {
        self.fields.push((key.to_string(), value.to_string()));
    }

    /// Appends `key` with seconds to the microsecond.
    pub fn push_seconds(&mut self, key: &str, seconds: f64) {
        self.fields.push((key.to_string(), format!("{seconds:.6}")));
    }
}

/// The object as JSON, fields in order, without spaces.
impl fmt::Display for BenchJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (key, value)) in self.fields.iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            write!(f, "{comma}\"{key}\":{value}")?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_line_and_reads_fields_by_name() {
        let serial =
            "log\nBENCH-JSON {\"bench\":\"backup\",\"pause_ns\":2000,\"mib_s\":812.5}\nmore\n";
        let json = BenchJson::from_serial(serial).unwrap().unwrap();
        assert_eq!(json.u64("pause_ns"), Some(2000));
        assert_eq!(json.f64("mib_s"), Some(812.5));
        assert_eq!(json.u64("bench"), None);
        assert_eq!(json.u64("missing"), None);
        assert_eq!(BenchJson::from_serial("no result\n"), None);
    }

    #[test]
    fn writes_back_what_it_read_with_appended_fields() {
        let text = "{\"bench\":\"backup\",\"a\":1,\"b\":2.50}";
        let mut json = BenchJson::parse(text).unwrap();
        assert_eq!(json.to_string(), text);
        json.push("host_read_mib_s", 900);
        assert!(json.to_string().ends_with(",\"host_read_mib_s\":900}"));
        let mut empty = BenchJson::parse("{}").unwrap();
        empty.push("a", 1);
        assert_eq!(empty.to_string(), "{\"a\":1}");
    }

    #[test]
    fn malformed_results_are_errors() {
        for text in [
            "",
            "[1]",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1 \"b\":2}",
            "{a:1}",
            "{\"a\":\"open}",
        ] {
            assert!(BenchJson::parse(text).is_err(), "{text:?}");
        }
    }
}
