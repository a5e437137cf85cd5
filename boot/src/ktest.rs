//! The in-kernel test harness's serial lines, parsed into their kinds
//! (the format is the kernel's `ktest` module's):
//!
//! ```text
//! KTEST-LIST <name> <normal|deliberate-failure> [disks=<spec>,...]
//! KTEST-START <name>
//! KTEST-PASS <name> (<micros> us)
//! KTEST-FAIL <name>: <why>
//! ```
//!
//! Every reader of test results goes through [`parse_line`], so none
//! matches on a prefix of its own. Parsing never panics; a line that is
//! none of these is `None`.

use std::fmt;

/// One harness line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    /// A registered test.
    List {
        /// Its name.
        name: &'a str,
        /// It fails on purpose.
        deliberately_fails: bool,
        /// Its disk specs, comma-separated (`serial:MiB[:ro]`), if any.
        disks: Option<&'a str>,
    },
    /// A test started.
    Start(&'a str),
    /// A test passed.
    Pass(&'a str),
    /// A test failed (panic, exception, unknown name).
    Fail {
        /// The test.
        name: &'a str,
        /// Why.
        why: &'a str,
    },
}

/// Parses one serial line.
pub fn parse_line(line: &str) -> Option<Line<'_>> {
    let line = line.trim_end_matches(['\r', '\n']);
    let (tag, rest) = line.split_once(' ')?;
    let mut words = rest.split_ascii_whitespace();
    match tag {
        "KTEST-LIST" => {
            let name = words.next()?;
            let deliberately_fails = match words.next()? {
                "normal" => false,
                "deliberate-failure" => true,
                _ => return None,
            };
            let disks = words.find_map(|w| w.strip_prefix("disks="));
            Some(Line::List {
                name,
                deliberately_fails,
                disks,
            })
        }
        "KTEST-START" => words.next().map(Line::Start),
        "KTEST-PASS" => words.next().map(Line::Pass),
        "KTEST-FAIL" => {
            let (name, why) = rest.split_once(": ").unwrap_or((rest, ""));
            (!name.is_empty() && !name.contains(' ')).then_some(Line::Fail { name, why })
        }
        _ => None,
    }
}

/// The harness lines among the serial lines, in order.
pub fn lines(serial: &str) -> impl Iterator<Item = Line<'_>> {
    serial.lines().filter_map(parse_line)
}

/// `test NAME failed: WHY`, the way the host tool ends a failed test.
impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Line::List { name, .. } => write!(f, "test {name} listed"),
            Line::Start(name) => write!(f, "test {name} started"),
            Line::Pass(name) => write!(f, "test {name} passed"),
            Line::Fail { name, why } => write!(f, "test {name} failed: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_kind() {
        assert_eq!(
            parse_line("KTEST-LIST blk::rw normal disks=d0:4,ro0:2:ro"),
            Some(Line::List {
                name: "blk::rw",
                deliberately_fails: false,
                disks: Some("d0:4,ro0:2:ro")
            })
        );
        assert_eq!(
            parse_line("KTEST-LIST deliberate::panics deliberate-failure"),
            Some(Line::List {
                name: "deliberate::panics",
                deliberately_fails: true,
                disks: None
            })
        );
        assert_eq!(parse_line("KTEST-START a::b"), Some(Line::Start("a::b")));
        assert_eq!(
            parse_line("KTEST-PASS a::b (12 us)\r"),
            Some(Line::Pass("a::b"))
        );
        let fail = parse_line("KTEST-FAIL a::b: panicked: x: y").unwrap();
        assert_eq!(
            fail,
            Line::Fail {
                name: "a::b",
                why: "panicked: x: y"
            }
        );
        assert_eq!(fail.to_string(), "test a::b failed: panicked: x: y");
    }

    #[test]
    fn other_lines_are_none() {
        for line in [
            "",
            "KTEST-PASS",
            "KTEST-PASSED a",
            "KTEST-LIST a weird",
            "KTEST-FAIL a b: c",
            "TRACE 1 a.b",
            "[ 0.1] KTEST-PASS x",
        ] {
            assert_eq!(parse_line(line), None, "{line:?}");
        }
    }
}
