//! The trace line format, shared by the kernel (which writes it) and the host
//! tool (which parses it), so the two cannot drift apart.
//!
//! One record per line:
//!
//! ```text
//! TRACE <timestamp_ns> <event> [<key>=<value> ...]
//! ```
//!
//! - `TRACE` is the literal tag; lines without it are ordinary log output.
//! - `<timestamp_ns>`: decimal nanoseconds since boot (the kernel's TSC clock).
//! - `<event>`: a dotted name of `[a-z0-9_.]`, e.g. `sched.switch`.
//! - `<key>`: `[a-z0-9_]+`; `<value>`: a decimal integer (optionally negative),
//!   `0x`-prefixed hexadecimal, a word without spaces, `=` or `"`, or a text
//!   in double quotes: any characters but `"` and control characters, spaces
//!   included (a reason, a message).
//!
//! Example: `TRACE 1523311 demo.tick thread=worker n=3 frame=0x1f000`, or
//! `TRACE 90 job.refused job=restore reason="bad checksum: extent 4"`.
//! Parsing never panics; a line that starts with `TRACE ` but does not follow
//! the format is an error, not silently skipped.

use core::fmt::{self, Write};

/// The tag that starts every trace line.
pub const TAG: &str = "TRACE";

/// One field value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// Unsigned, printed in decimal.
    U64(u64),
    /// Signed, printed in decimal.
    I64(i64),
    /// Unsigned, printed as `0x…` (addresses, masks).
    Hex(u64),
    /// A word: no whitespace, no `=`, no `"`.
    Word(&'a str),
    /// Free text, written in double quotes: a `"` in it is written as `'`,
    /// a control character as a space.
    Text(&'a str),
}

impl<'a> Value<'a> {
    /// The value as an unsigned integer, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) | Value::Hex(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Word(_) | Value::Text(_) => None,
        }
    }

    /// The value as text, if it is a word or a text.
    pub fn as_str(&self) -> Option<&'a str> {
        match *self {
            Value::Word(w) | Value::Text(w) => Some(w),
            _ => None,
        }
    }
}

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::Hex(v) => write!(f, "{v:#x}"),
            Value::Word(w) | Value::Text(w) => f.write_str(w),
        }
    }
}

/// Writes one record, newline included. Names and words that would break the
/// format are written with the offending characters replaced by `_`.
pub fn write_record<W: Write + ?Sized>(
    out: &mut W,
    ts_ns: u64,
    event: &str,
    fields: &[(&str, Value<'_>)],
) -> fmt::Result {
    write!(out, "{TAG} {ts_ns} ")?;
    write_clean(out, event, is_event_char)?;
    for (key, value) in fields {
        out.write_char(' ')?;
        write_clean(out, key, is_key_char)?;
        out.write_char('=')?;
        match value {
            Value::Word("") => out.write_char('_')?,
            Value::Word(w) => write_clean(out, w, is_word_char)?,
            Value::Text(t) => write_text(out, t)?,
            other => write!(out, "{other}")?,
        }
    }
    out.write_char('\n')
}

fn write_clean<W: Write + ?Sized>(out: &mut W, text: &str, ok: fn(char) -> bool) -> fmt::Result {
    if text.is_empty() {
        return out.write_char('_');
    }
    for c in text.chars() {
        out.write_char(if ok(c) { c } else { '_' })?;
    }
    Ok(())
}

fn write_text<W: Write + ?Sized>(out: &mut W, text: &str) -> fmt::Result {
    out.write_char('"')?;
    for c in text.chars() {
        out.write_char(match c {
            '"' => '\'',
            c if c.is_control() => ' ',
            c => c,
        })?;
    }
    out.write_char('"')
}

fn is_event_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.'
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
}

/// Most fields one record of the kernel's trace buffer holds.
pub const MAX_FIELDS: usize = 6;

/// A record's fields in a fixed-size array, for a trace buffer that must
/// not allocate. Built from an array of at most [`MAX_FIELDS`] fields: a
/// longer one does not compile, so no field is ever dropped silently.
///
/// ```compile_fail
/// use snapshot::interface::trace::{Fields, Value};
/// let v = Value::U64(1);
/// let seven = [("a", v), ("b", v), ("c", v), ("d", v), ("e", v), ("f", v), ("g", v)];
/// let _ = Fields::new(&seven);
/// ```
///
/// The same with six fields compiles:
///
/// ```
/// use snapshot::interface::trace::{Fields, Value};
/// let v = Value::U64(1);
/// let six = [("a", v), ("b", v), ("c", v), ("d", v), ("e", v), ("f", v)];
/// assert_eq!(Fields::new(&six).as_slice(), &six[..]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields<'a> {
    count: u8,
    fields: [(&'a str, Value<'a>); MAX_FIELDS],
}

impl<'a> Fields<'a> {
    /// All of `fields`, in order.
    pub fn new<const N: usize>(fields: &[(&'a str, Value<'a>); N]) -> Self {
        const {
            assert!(
                N <= MAX_FIELDS,
                "a trace record holds at most MAX_FIELDS fields"
            )
        };
        let mut all = [("", Value::U64(0)); MAX_FIELDS];
        all[..N].copy_from_slice(fields);
        Fields {
            count: N as u8,
            fields: all,
        }
    }

    /// The fields, in the order given.
    pub fn as_slice(&self) -> &[(&'a str, Value<'a>)] {
        &self.fields[..usize::from(self.count)]
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_graphic() && c != '=' && c != '"'
}

/// A parsed trace line borrowing from the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Nanoseconds since boot.
    pub ts_ns: u64,
    /// The event name.
    pub event: &'a str,
    fields: &'a str,
}

impl<'a> Record<'a> {
    /// The fields in order.
    pub fn fields(&self) -> impl Iterator<Item = (&'a str, Value<'a>)> + 'a {
        let mut rest = self.fields;
        // Checked by `parse_line`: every field parses.
        core::iter::from_fn(move || next_field(&mut rest).and_then(Result::ok))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<Value<'a>> {
        self.fields().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The value of `key` as an unsigned integer.
    pub fn u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// The value of `key` as text, if it is a word or a text.
    pub fn str(&self, key: &str) -> Option<&'a str> {
        self.get(key)?.as_str()
    }
}

/// Splits the first field off `rest`: `None` at the end, an error for a
/// field that is not `key=value`.
fn next_field<'a>(rest: &mut &'a str) -> Option<Result<(&'a str, Value<'a>), ParseError>> {
    let text = rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
    if text.is_empty() {
        *rest = text;
        return None;
    }
    let Some((key, after)) = text.split_once('=') else {
        *rest = "";
        return Some(Err(ParseError::BadField));
    };
    let bad_key = key.is_empty() || !key.chars().all(is_key_char);
    let (value, tail) = match after.strip_prefix('"') {
        Some(quoted) => match quoted.split_once('"') {
            Some((t, tail)) => (Some(Value::Text(t)), tail),
            None => (None, ""),
        },
        None => {
            let end = after
                .find(|c: char| c.is_ascii_whitespace())
                .unwrap_or(after.len());
            let word = &after[..end];
            let ok = !word.is_empty() && !word.contains(['=', '"']);
            (ok.then(|| parse_value(word)), &after[end..])
        }
    };
    let ends_well = tail.is_empty() || tail.starts_with(|c: char| c.is_ascii_whitespace());
    *rest = tail;
    match value {
        Some(value) if !bad_key && ends_well => Some(Ok((key, value))),
        _ => {
            *rest = "";
            Some(Err(ParseError::BadField))
        }
    }
}

/// Why a `TRACE` line was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// No timestamp, or not a decimal integer.
    BadTimestamp,
    /// No event name, or characters outside `[a-z0-9_.]`.
    BadEvent,
    /// A field without `=`, or with a bad key.
    BadField,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::BadTimestamp => "trace record without a decimal timestamp",
            ParseError::BadEvent => "trace record without a valid event name",
            ParseError::BadField => "trace record with a field that is not key=value",
        })
    }
}

/// Parses one line. `Ok(None)` means the line is not a trace record at all.
pub fn parse_line(line: &str) -> Result<Option<Record<'_>>, ParseError> {
    let line = line.trim_end_matches(['\r', '\n']);
    let Some(rest) = line.strip_prefix(TAG).and_then(|r| r.strip_prefix(' ')) else {
        return Ok(None);
    };
    let mut parts = rest.splitn(3, ' ');
    let ts_ns = parts
        .next()
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
        .ok_or(ParseError::BadTimestamp)?;
    let event = parts
        .next()
        .filter(|e| !e.is_empty() && e.chars().all(is_event_char))
        .ok_or(ParseError::BadEvent)?;
    let fields = parts.next().unwrap_or("");
    let mut rest = fields;
    while let Some(field) = next_field(&mut rest) {
        field?;
    }
    Ok(Some(Record {
        ts_ns,
        event,
        fields,
    }))
}

fn parse_value(text: &str) -> Value<'_> {
    if let Some(hex) = text.strip_prefix("0x") {
        if let Ok(v) = u64::from_str_radix(hex, 16) {
            return Value::Hex(v);
        }
    } else if let Ok(v) = text.parse::<u64>() {
        return Value::U64(v);
    } else if let Ok(v) = text.parse::<i64>() {
        return Value::I64(v);
    }
    Value::Word(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::string::String;
    use std::vec::Vec;

    #[test]
    fn writes_the_documented_format() {
        let mut line = String::new();
        let fields = [
            ("page", Value::Hex(0x1f000)),
            ("n", Value::U64(3)),
            ("who", Value::Word("worker-1")),
        ];
        write_record(&mut line, 1523311, "demo.tick", &fields).unwrap();
        assert_eq!(
            line,
            "TRACE 1523311 demo.tick page=0x1f000 n=3 who=worker-1\n"
        );
    }

    #[test]
    fn ordinary_log_lines_are_not_records() {
        assert_eq!(parse_line("booting kernel"), Ok(None));
        assert_eq!(parse_line("TRACEX 1 a"), Ok(None));
    }

    #[test]
    fn malformed_records_are_errors() {
        assert_eq!(parse_line("TRACE x ev"), Err(ParseError::BadTimestamp));
        assert_eq!(parse_line("TRACE 5"), Err(ParseError::BadEvent));
        assert_eq!(parse_line("TRACE 5 Ev"), Err(ParseError::BadEvent));
        assert_eq!(parse_line("TRACE 5 ev novalue"), Err(ParseError::BadField));
        assert_eq!(parse_line("TRACE 5 ev k="), Err(ParseError::BadField));
        assert_eq!(parse_line("TRACE 5 ev k=\"open"), Err(ParseError::BadField));
        assert_eq!(parse_line("TRACE 5 ev k=\"a\"b"), Err(ParseError::BadField));
        assert_eq!(parse_line("TRACE 5 ev k=a\"b"), Err(ParseError::BadField));
        assert_eq!(parse_line("TRACE 5 ev =1"), Err(ParseError::BadField));
    }

    #[test]
    fn texts_keep_spaces_and_lose_quotes_and_control_characters() {
        let mut line = String::new();
        let reason = Value::Text("bad checksum: \"extent\" 0\n(copy clusters 0..16)");
        write_record(
            &mut line,
            9,
            "job.refused",
            &[("reason", reason), ("n", Value::U64(1))],
        )
        .unwrap();
        assert_eq!(
            line,
            "TRACE 9 job.refused reason=\"bad checksum: 'extent' 0 (copy clusters 0..16)\" n=1\n"
        );
        let rec = parse_line(&line).unwrap().unwrap();
        assert_eq!(
            rec.str("reason"),
            Some("bad checksum: 'extent' 0 (copy clusters 0..16)")
        );
        assert_eq!(rec.u64("n"), Some(1));
        assert_eq!(
            parse_line("TRACE 1 e t=\"\"").unwrap().unwrap().str("t"),
            Some("")
        );
    }

    #[test]
    fn unsafe_names_and_words_are_cleaned() {
        let mut line = String::new();
        write_record(&mut line, 1, "Bad Event", &[("k y", Value::Word("a=b c"))]).unwrap();
        let rec = parse_line(&line).unwrap().unwrap();
        assert_eq!(rec.event, "_ad__vent");
        assert_eq!(rec.get("k_y"), Some(Value::Word("a_b_c")));
    }

    fn value() -> impl Strategy<Value = Value<'static>> {
        prop_oneof![
            any::<u64>().prop_map(Value::U64),
            (i64::MIN..0).prop_map(Value::I64),
            any::<u64>().prop_map(Value::Hex),
            prop_oneof![Just("ok"), Just("worker-1"), Just("a.b/c:d")].prop_map(Value::Word),
            // Any text the writer keeps as it is: no `"`, no control character.
            "[^\"\\p{Cc}]{0,40}".prop_map(|t| Value::Text(String::leak(t))),
        ]
    }

    proptest! {
        #[test]
        fn records_round_trip(
            ts in any::<u64>(),
            event in "[a-z][a-z0-9_.]{0,20}",
            fields in proptest::collection::vec(("[a-z_][a-z0-9_]{0,8}", value()), 0..8),
        ) {
            let borrowed: Vec<(&str, Value<'_>)> =
                fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            let mut line = String::new();
            write_record(&mut line, ts, &event, &borrowed).unwrap();
            let rec = parse_line(&line).unwrap().unwrap();
            prop_assert_eq!(rec.ts_ns, ts);
            prop_assert_eq!(rec.event, event.as_str());
            let parsed: Vec<(&str, Value<'_>)> = rec.fields().collect();
            prop_assert_eq!(parsed, borrowed);
        }

        #[test]
        fn parser_never_panics(line in "TRACE .{0,80}") {
            let _ = parse_line(&line);
        }

        #[test]
        fn quoted_fields_never_panic(
            line in "TRACE [0-9]{1,3} [a-z.]{1,5}( [a-z]{0,2}=?[\"a-z= ]{0,8}){0,4}",
        ) {
            if let Ok(Some(rec)) = parse_line(&line) {
                let _ = rec.fields().count();
            }
        }
    }
}
