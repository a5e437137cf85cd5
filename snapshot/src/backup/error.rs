//! Why a backup or restore stopped: one error type for the whole
//! subsystem, so the parts that produce errors (tables, medium, copy)
//! need not import the engine that runs them.

use alloc::string::String;
use core::fmt;

use super::qcow2::Qcow2Error;
use super::tape::MediumError;
use crate::devices::block::BlockError;

/// Why a backup or restore stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The source image cannot be read.
    Source(Qcow2Error),
    /// The source reads part of its data from a backing file, which the
    /// backup cannot see.
    Backing(String),
    /// A disk failed.
    Io(BlockError),
    /// A disk is too small: which, and how many bytes the job needs.
    TooSmall {
        /// The disk's name.
        disk: String,
        /// Bytes needed.
        need: u64,
        /// Bytes it has.
        have: u64,
    },
    /// The medium cannot be restored.
    Medium(MediumError),
    /// Not enough memory for the tables or a single transfer buffer.
    NoMemory(u64),
    /// The job needs more memory than the guest has free: refused
    /// before it starts.
    TooLittleMemory {
        /// What would run: `backup` or `restore`.
        job: &'static str,
        /// Bytes it needs at least.
        need: u64,
        /// Bytes free.
        have: u64,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Source(e) => write!(f, "source: {e}"),
            Error::Backing(name) => write!(
                f,
                "source: has a backing file ({name}); its unallocated clusters \
                 read from there, which this backup cannot see (flatten it first: \
                 qemu-img convert -O qcow2 SRC FLAT)"
            ),
            Error::Io(e) => write!(f, "{e}"),
            Error::TooSmall { disk, need, have } => write!(
                f,
                "disk \"{disk}\" too small: needs {need} bytes, has {have}"
            ),
            Error::Medium(e) => write!(f, "{e}"),
            Error::NoMemory(bytes) => write!(f, "out of memory for a {bytes}-byte buffer"),
            Error::TooLittleMemory { job, need, have } => {
                write!(
                    f,
                    "the {job} needs {need} bytes of kernel memory ({} MiB), the guest has \
                     {have} ({} MiB) free; ",
                    need.div_ceil(1 << 20),
                    have >> 20
                )?;
                match super::engine::mem_for_heap(need + super::engine::KERNEL_HEAP_USE) {
                    Some(mem) => write!(f, "give it more memory (--mem {}M)", mem >> 20),
                    None => write!(
                        f,
                        "more than any --mem gives the kernel (its heap is 64 MiB at most)"
                    ),
                }
            }
        }
    }
}

impl Error {
    /// Whether the job refused its input (an image or medium it cannot
    /// take, a disk too small) rather than failed while running (a disk
    /// error, no memory).
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            Error::Io(_) | Error::NoMemory(_) | Error::Source(Qcow2Error::Io(_))
        )
    }
}

impl From<BlockError> for Error {
    fn from(e: BlockError) -> Self {
        Error::Io(e)
    }
}

impl From<Qcow2Error> for Error {
    fn from(e: Qcow2Error) -> Self {
        Error::Source(e)
    }
}

impl From<MediumError> for Error {
    fn from(e: MediumError) -> Self {
        Error::Medium(e)
    }
}
