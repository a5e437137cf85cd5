//! Sizes written the way people write them: `128M`, `2G`, `4096`, `64K`.
//!
//! Shared by the kernel command line and the host tool's `--mem` option, so the
//! two can never disagree about what `2G` means.

use core::fmt;

/// Why a size could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// The text was empty.
    Empty,
    /// The number part was not a decimal integer.
    NotANumber,
    /// The suffix is not one of `K`, `M`, `G`, `T` (optionally followed by `iB` or `B`).
    BadSuffix,
    /// A decimal point: sizes are whole numbers of their unit.
    Fraction,
    /// The value does not fit in 64 bits.
    Overflow,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SizeError::Empty => "empty size",
            SizeError::NotANumber => "size must start with a decimal number",
            SizeError::BadSuffix => "size suffix must be K, M, G or T (binary units)",
            SizeError::Fraction => "size must be a whole number of its unit (1536M, not 1.5G)",
            SizeError::Overflow => "size does not fit in 64 bits",
        })
    }
}

/// Parses a byte size with an optional binary suffix (`K`=1024, `M`, `G`, `T`;
/// `KiB`/`MB` spellings are accepted and mean the same binary units).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if digits_end == 0 {
        return Err(SizeError::NotANumber);
    }
    let number: u64 = text[..digits_end]
        .parse()
        .map_err(|_| SizeError::Overflow)?;
    let suffix = &text[digits_end..];
    if suffix.starts_with('.') {
        return Err(SizeError::Fraction);
    }
    const SUFFIXES: [(&str, u32); 13] = [
        ("", 0),
        ("B", 0),
        ("K", 10),
        ("KB", 10),
        ("KiB", 10),
        ("M", 20),
        ("MB", 20),
        ("MiB", 20),
        ("G", 30),
        ("GB", 30),
        ("GiB", 30),
        ("T", 40),
        ("TiB", 40),
    ];
    let shift = SUFFIXES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(suffix))
        .map(|&(_, shift)| shift)
        .ok_or(SizeError::BadSuffix)?;
    number.checked_mul(1u64 << shift).ok_or(SizeError::Overflow)
}

/// Formats a byte count with the largest binary unit that divides it evenly,
/// the inverse of [`parse_size`] for such values (`2G`, `640K`, `4097`).
pub fn format_size(bytes: u64) -> SizeText {
    const UNITS: [(u32, char); 4] = [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')];
    for (shift, unit) in UNITS {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return SizeText {
                value: bytes >> shift,
                unit: Some(unit),
            };
        }
    }
    SizeText {
        value: bytes,
        unit: None,
    }
}

/// A size ready to print, from [`format_size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeText {
    value: u64,
    unit: Option<char>,
}

impl fmt::Display for SizeText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.unit {
            Some(unit) => write!(f, "{}{}", self.value, unit),
            None => write!(f, "{}", self.value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::string::ToString;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("G"), Err(SizeError::NotANumber));
        assert_eq!(parse_size("12Q"), Err(SizeError::BadSuffix));
        assert_eq!(parse_size("12GiBB"), Err(SizeError::BadSuffix));
        assert_eq!(parse_size("99999999999T"), Err(SizeError::Overflow));
        assert_eq!(parse_size("1.5G"), Err(SizeError::Fraction));
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(bytes in any::<u64>()) {
            prop_assert_eq!(parse_size(&format_size(bytes).to_string()), Ok(bytes));
        }
    }
}
