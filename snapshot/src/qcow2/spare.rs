//! The clone split's batch buffers, kept for reuse: a fresh buffer is
//! zeroed first, which the emulator pays for byte by byte, and the split
//! reads a whole batch into every buffer anyway.
//!
//! Must never keep more buffers than the batches in flight at once
//! ([`KEPT`]), so the split's memory stays what it was without reuse.

use alloc::vec::Vec;

use super::Qcow2Error;
use crate::backup::qcow2::buffer;

/// Buffers kept: one batch being read, one being committed.
const KEPT: usize = 2;

/// Buffers given back by finished batches.
#[derive(Debug, Default)]
pub(super) struct Spare(spin::Mutex<Vec<Vec<u8>>>);

impl Spare {
    /// A buffer of `len` bytes whose contents the caller overwrites: a
    /// kept one if it is large enough (zeroed only where it grows), else a
    /// new zeroed one.
    pub(super) fn take(&self, len: u64) -> Result<Vec<u8>, Qcow2Error> {
        match self.0.lock().pop() {
            Some(mut data) if data.capacity() as u64 >= len => {
                data.resize(len as usize, 0);
                Ok(data)
            }
            _ => buffer(len, "split batch"),
        }
    }

    /// Keeps `data` for a later batch, if fewer than [`KEPT`] are kept.
    pub(super) fn give_back(&self, data: Vec<u8>) {
        let mut kept = self.0.lock();
        if kept.len() < KEPT && data.capacity() > 0 {
            kept.push(data);
        }
    }
}
