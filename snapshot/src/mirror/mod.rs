//! The quick-split mirror, without the hardware: the controller of a
//! mirrored pair of block devices, a primary the workload reads and
//! writes and a secondary that mirrors it, which can be split at once and
//! backed up while the copy to the secondary still runs.
//!
//! # The pair
//!
//! While paired, a write to the primary first makes its block's bit in the
//! *differential bitmap* durable (write intent, as Linux md's bitmap: the
//! bit is on the controller disk before the write reaches the primary),
//! then goes to the primary; the secondary catches up asynchronously:
//! [`Mirror::pump`] copies marked blocks from primary to secondary and
//! clears their bits, on disk lazily. Initial pairing marks every block
//! (unless the disks are known equal); a resync marks what changed.
//!
//! # The split
//!
//! [`Mirror::split`] drains the writes in flight, writes one superblock
//! and acknowledges: the frozen differential bitmap `F` names the blocks
//! the secondary must still receive for the instant, and a fresh bitmap
//! `W` (zeroed on disk beforehand) starts marking blocks written since.
//! Nothing in the acknowledgement grows with the volume. Each block of `F`
//! is then copied exactly once, through the [copy-once
//! engine](crate::copyonce) whose units are the blocks, by the first of:
//! a workload write to it (copy before write, [`Mirror::write`]), a backup
//! read ([`BackupJob`]) or the background copier ([`Mirror::copy`]).
//! Blocks outside `F` count as copied without a claim. A unit becomes
//! copied only once the secondary has flushed its copy, so after a crash
//! `F` minus the blocks marked in `W` is exactly what is still to copy.
//!
//! # Durable state and recovery
//!
//! The controller disk ([`layout`]) holds a superblock in two slots and the
//! two bitmap areas; [`Mirror::open`] resumes from it: a paired volume
//! resyncs what its bitmap marks, a pending split goes on copying toward
//! the same instant. The secondary never receives a block newer than the
//! instant it represents.
//!
//! # Errors
//!
//! Refusals ([`Refusal`]) change nothing. An I/O error on the secondary
//! suspends the pair (paired) or breaks the split (its instant can no
//! longer be produced), durably, with a reason naming disk and sector;
//! the primary keeps serving, and the bitmaps keep what a later
//! [`Mirror::resync`] copies. An I/O error on the primary fails the
//! request it hits ([`Error::Io`]) and nothing else.
//!
//! This module must never write the primary except for a workload write,
//! never write the secondary with anything but the primary's blocks, and
//! never hold its lock across I/O.

pub mod bitmap;
mod budget;
mod controller;
mod copier;
mod durable;
pub mod layout;
mod open;
mod work;

mod backup;
#[cfg(test)]
mod tests;

use alloc::string::String;
use core::fmt;

pub use backup::{BackupJob, BackupSummary, Via};
pub use budget::{Budget, MAX_BATCH};
pub use controller::{memory_bytes, Disks, Mirror, Opened, Options, Status};
pub use copier::CopyBatch;
pub use layout::{Geometry, Phase};
pub use work::SplitAck;

use crate::devices::block::BlockError;

/// Why the mirror refused a request; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The same disk given as primary and secondary.
    SameDisk(String),
    /// A disk the mirror must write is read-only: which.
    ReadOnly(String),
    /// The secondary cannot hold the primary.
    SecondaryTooSmall {
        /// The primary's bytes.
        primary: u64,
        /// The secondary's bytes.
        secondary: u64,
    },
    /// The controller disk cannot hold the bitmaps.
    ControlTooSmall {
        /// Bytes needed.
        need: u64,
        /// Bytes it has.
        have: u64,
    },
    /// A block size that is not a power of two from 512 B to 2 MiB.
    BlockSize(u64),
    /// The controller disk holds something else, or is damaged.
    NotControl(String),
    /// The controller disk belongs to another pair.
    OtherPair(String),
    /// A backup asked for before any split.
    NoSplit,
    /// A split asked for while one is pending.
    SplitPending,
    /// Another split, resync or backup is running.
    Busy(&'static str),
    /// The pair is suspended, or the split broken: the reason.
    Suspended(String),
    /// Bad input around the mirror (a missing disk, a bad parameter).
    Input(String),
    /// Even the smallest transfers ([`Budget::least`]) do not fit.
    TooLittleMemory {
        /// Bytes the run needs at least.
        need: u64,
        /// Bytes it has.
        have: u64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::SameDisk(name) => write!(
                f,
                "primary and secondary are the same disk (\"{name}\"); a mirror needs two"
            ),
            Refusal::ReadOnly(name) => {
                write!(f, "disk \"{name}\" is read-only; the mirror writes it")
            }
            Refusal::SecondaryTooSmall { primary, secondary } => write!(
                f,
                "the secondary ({secondary} bytes) is smaller than the primary ({primary} bytes)"
            ),
            Refusal::ControlTooSmall { need, have } => write!(
                f,
                "the controller disk has {have} bytes, the bitmaps need {need}"
            ),
            Refusal::BlockSize(b) => write!(
                f,
                "block size {b}: must be a power of two from 512 bytes to 2 MiB"
            ),
            Refusal::NotControl(why) => write!(f, "controller disk: {why}"),
            Refusal::OtherPair(why) => write!(f, "controller disk belongs to another pair: {why}"),
            Refusal::NoSplit => f.write_str("no split to back up: split the pair first"),
            Refusal::SplitPending => f.write_str(
                "a split is already pending: back it up and resync before splitting again",
            ),
            Refusal::Busy(what) => write!(f, "{what} is running"),
            Refusal::Suspended(why) => write!(f, "the pair is suspended ({why}); resync first"),
            Refusal::Input(why) => f.write_str(why),
            Refusal::TooLittleMemory { need, have } => write!(
                f,
                "the mirror needs {need} bytes of kernel memory ({} MiB), it has {have} \
                 ({} MiB); give the guest more memory (--mem)",
                need.div_ceil(1 << 20),
                have >> 20
            ),
        }
    }
}

/// Why a mirror request did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Refused before anything changed.
    Refused(Refusal),
    /// A disk failed under this request (the primary, or the controller
    /// disk for a write's intent).
    Io(BlockError),
    /// The secondary failed: the pair is suspended or the split broken.
    Suspended(String),
    /// Not enough memory for a buffer of this many bytes.
    NoMemory(u64),
    /// The backup medium could not be written.
    Medium(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Refused(r) => write!(f, "{r}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Suspended(why) => write!(f, "pair suspended: {why}"),
            Error::NoMemory(n) => write!(f, "out of memory for a {n}-byte buffer"),
            Error::Medium(why) => write!(f, "backup medium: {why}"),
        }
    }
}

impl Error {
    /// Whether the request was refused (bad input, wrong state) rather
    /// than failed while running.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::Refused(_))
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        Error::Refused(r)
    }
}
