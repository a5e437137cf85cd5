//! The kernel command line: whitespace-separated `key=value` words.
//!
//! The host tool passes it through QEMU's `-append`; it selects the scenario
//! and its parameters so one kernel image serves every run. A bare word
//! (`verbose`) is a flag. Parsing never allocates and never panics on any
//! input; values are checked when they are asked for, with errors that name
//! the key.

use core::fmt;

use crate::interface::units::parse_size;

/// A borrowed, parsed view of a command line.
#[derive(Debug, Clone, Copy)]
pub struct CmdLine<'a> {
    raw: &'a str,
}

/// A parameter that is present but malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError<'a> {
    /// The key whose value was bad.
    pub key: &'a str,
    /// The value as given.
    pub value: &'a str,
    /// What was expected.
    pub expected: &'static str,
}

impl fmt::Display for ParamError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad command-line parameter {}={:?}: expected {}",
            self.key, self.value, self.expected
        )
    }
}

impl<'a> CmdLine<'a> {
    /// Wraps a command line; nothing is validated until a key is read.
    pub fn new(raw: &'a str) -> Self {
        CmdLine { raw }
    }

    /// The text as given.
    pub fn as_str(&self) -> &'a str {
        self.raw
    }

    /// Every word as `(key, value)`; a bare flag has the value `""`.
    pub fn pairs(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.raw
            .split_ascii_whitespace()
            .map(|word| word.split_once('=').unwrap_or((word, "")))
    }

    /// The value of the last occurrence of `key`, so a later word overrides
    /// an earlier one.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
    }

    /// Whether `key` is present as a flag or with a true value (`1`, `on`, `yes`, `true`).
    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("" | "1" | "on" | "yes" | "true"))
    }

    /// An on/off switch: `on`, `1`, `yes`, `true` (or the bare word) or
    /// `off`, `0`, `no`, `false`; `default` when absent.
    pub fn switch(&self, key: &'a str, default: bool) -> Result<bool, ParamError<'a>> {
        let value = self.parse(key, "on or off", |v| match v {
            "" | "on" | "1" | "yes" | "true" => Some(true),
            "off" | "0" | "no" | "false" => Some(false),
            _ => None,
        })?;
        Ok(value.unwrap_or(default))
    }

    /// An unsigned integer, decimal or `0x` hexadecimal.
    pub fn u64(&self, key: &'a str) -> Result<Option<u64>, ParamError<'a>> {
        self.parse(key, "an unsigned integer (decimal or 0x hex)", parse_u64)
    }

    /// A byte size such as `64M` (see [`crate::interface::units::parse_size`]).
    pub fn size(&self, key: &'a str) -> Result<Option<u64>, ParamError<'a>> {
        self.parse(key, "a size such as 4096, 64K, 128M or 2G", |v| {
            parse_size(v).ok()
        })
    }

    fn parse<T>(
        &self,
        key: &'a str,
        expected: &'static str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, ParamError<'a>> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => parse(value).map(Some).ok_or(ParamError {
                key,
                value,
                expected,
            }),
        }
    }
}

/// Parses decimal or `0x`-prefixed hexadecimal.
pub fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn switches_are_on_or_off_and_nothing_else() {
        let cmd = CmdLine::new("a=on b=off c=0 d verify=bogus");
        assert_eq!(cmd.switch("a", false), Ok(true));
        assert_eq!(cmd.switch("b", true), Ok(false));
        assert_eq!(cmd.switch("c", true), Ok(false));
        assert_eq!(cmd.switch("d", false), Ok(true));
        assert_eq!(cmd.switch("absent", true), Ok(true));
        let e = cmd.switch("verify", true).unwrap_err();
        assert_eq!(
            alloc::format!("{e}"),
            "bad command-line parameter verify=\"bogus\": expected on or off"
        );
    }

    #[test]
    fn reads_keys_flags_and_numbers() {
        let cmd = CmdLine::new("scenario=demo  seed=0x2a mem=64M verbose quantum=4");
        assert_eq!(cmd.get("scenario"), Some("demo"));
        assert_eq!(cmd.u64("seed"), Ok(Some(42)));
        assert_eq!(cmd.size("mem"), Ok(Some(64 << 20)));
        assert_eq!(cmd.u64("quantum"), Ok(Some(4)));
        assert!(cmd.flag("verbose"));
        assert!(!cmd.flag("quiet"));
        assert_eq!(cmd.get("missing"), None);
    }

    #[test]
    fn later_words_override_earlier_ones() {
        assert_eq!(CmdLine::new("a=1 a=2").get("a"), Some("2"));
    }

    #[test]
    fn bad_values_name_the_key() {
        let cmd = CmdLine::new("seed=banana");
        let err = cmd.u64("seed").unwrap_err();
        assert_eq!(err.key, "seed");
        assert_eq!(err.value, "banana");
    }

    proptest! {
        #[test]
        fn never_panics(line in ".{0,200}", key in "[a-z]{1,6}") {
            let cmd = CmdLine::new(&line);
            let _ = cmd.get(&key);
            let _ = cmd.u64(&key);
            let _ = cmd.size(&key);
            let _ = cmd.flag(&key);
            prop_assert!(cmd.pairs().count() <= line.len());
        }
    }
}
