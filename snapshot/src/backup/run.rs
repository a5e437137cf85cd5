//! Runs of consecutive keys mapping to consecutive values: the unit of the
//! medium's tables 2 and 3, and what a new qcow2 image is laid out from.
//!
//! A plain value type, shared by [`super::qcow2`] and [`super::tape`] so that
//! neither needs the other for it.

/// A run of `len` consecutive entries mapping `from + i` to `to + i`: the
/// unit of tables 2 and 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First key (a virtual cluster in table 2, a copy cluster in table 3).
    pub from: u64,
    /// First value (a copy cluster in table 2, a medium block of 512 bytes
    /// in table 3).
    pub to: u64,
    /// Entries in the run (at least one).
    pub len: u64,
}
