//! The meaning of L1 and L2 entries: which host cluster an entry names,
//! whether it reads as data, zeros or nothing, compressed descriptors and
//! extended (subcluster) entries, each checked against the file.
//!
//! Decodes integers it is given; must never touch a device.

use alloc::format;

use super::{
    fits, invalid, placed, Qcow2Error, COMPRESSED, COPIED, L1_RESERVED, L2_RESERVED, OFFSET_MASK,
    ZERO_FLAG,
};

/// What one virtual cluster holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Data at this host offset.
    Data(u64),
    /// Reads as zeros (the zero flag; a preallocated zero cluster too).
    Zero,
    /// Compressed data somewhere in the file.
    Compressed(Compressed),
    /// Extended L2 entries: the subclusters whose bit is set in `data`
    /// (bit `i`: bytes `i * C / 32` to `(i + 1) * C / 32`) are data in the
    /// host cluster at `host`; the others read as zeros.
    Subclusters {
        /// The host cluster's offset.
        host: u64,
        /// Which of the 32 subclusters hold data (neither none nor all).
        data: u32,
    },
}

/// Bits 0-55: where a compressed descriptor's offset may have bits.
const OFFSET_MASK_WIDE: u64 = 0x00ff_ffff_ffff_ffff;

/// The host offset an L1 or L2 entry names (0: none; a compressed
/// cluster's entry names none here).
pub fn host_of(entry: u64) -> u64 {
    if entry & COMPRESSED != 0 {
        0
    } else {
        entry & OFFSET_MASK
    }
}

/// Checks L1 entry `i` and returns the offset of its L2 table (0: none).
pub fn l1_entry(i: u64, entry: u64) -> Result<u64, Qcow2Error> {
    if entry & L1_RESERVED != 0 {
        return Err(invalid(format!(
            "L1 entry {i} ({entry:#x}) has reserved bits set"
        )));
    }
    Ok(entry & OFFSET_MASK)
}

/// Checks the L2 entry of virtual cluster `vc` in an image of `file_len`
/// bytes with clusters of `cs` bytes, and says what the cluster holds:
/// `None` is unallocated.
pub fn l2_entry(
    entry: u64,
    vc: u64,
    cs: u64,
    file_len: u64,
) -> Result<Option<Cluster>, Qcow2Error> {
    let at = vc * cs;
    if entry & COMPRESSED != 0 {
        let c = Compressed::decode(entry, cs.trailing_zeros(), file_len, at)?;
        return Ok(Some(Cluster::Compressed(c)));
    }
    let host = data_entry(entry, L2_RESERVED, at, cs, file_len)?;
    Ok(if entry & ZERO_FLAG != 0 {
        Some(Cluster::Zero)
    } else if host != 0 {
        Some(Cluster::Data(host))
    } else {
        None
    })
}

/// Checks an uncompressed L2 entry's reserved bits (`reserved`) and host
/// offset; returns the offset (0: none).
fn data_entry(
    entry: u64,
    reserved: u64,
    at: u64,
    cs: u64,
    file_len: u64,
) -> Result<u64, Qcow2Error> {
    if entry & reserved != 0 {
        return Err(invalid(format!(
            "L2 entry for virtual offset {at:#x} ({entry:#x}) has reserved bits set"
        )));
    }
    let host = entry & OFFSET_MASK;
    // The words of an error only for an error: this runs for every
    // data cluster.
    if host != 0 && !fits(host, 1, cs, file_len) {
        let what = format!("the data cluster of virtual offset {at:#x}");
        placed(&what, host, 1, cs, file_len)?;
    }
    Ok(host)
}

/// [`l2_entry`] for an extended L2 entry: the standard entry `entry`
/// (whose zero flag is reserved) and its subcluster bitmap `bitmap`
/// (bits 0-31: allocated, 32-63: reads as zeros; a compressed cluster's
/// is reserved).
pub fn l2_extended(
    entry: u64,
    bitmap: u64,
    vc: u64,
    cs: u64,
    file_len: u64,
) -> Result<Option<Cluster>, Qcow2Error> {
    let at = vc * cs;
    if entry & COMPRESSED != 0 && bitmap != 0 {
        return Err(invalid(format!(
            "compressed cluster at virtual offset {at:#x} has a subcluster bitmap ({bitmap:#x})"
        )));
    }
    if entry & COMPRESSED != 0 {
        return l2_entry(entry, vc, cs, file_len);
    }
    let host = data_entry(entry, L2_RESERVED | ZERO_FLAG, at, cs, file_len)?;
    let (data, zero) = (bitmap as u32, (bitmap >> 32) as u32);
    if data & zero != 0 {
        return Err(invalid(format!(
            "L2 entry for virtual offset {at:#x}: subclusters {:#x} are both data and zero",
            data & zero
        )));
    }
    if host == 0 && data != 0 {
        return Err(invalid(format!(
            "L2 entry for virtual offset {at:#x}: subclusters {data:#x} are data but the \
             cluster has no host offset"
        )));
    }
    Ok(match data {
        u32::MAX => Some(Cluster::Data(host)),
        0 if zero != 0 || host != 0 => Some(Cluster::Zero),
        0 => None,
        _ => Some(Cluster::Subclusters { host, data }),
    })
}

/// Where a compressed cluster's data lies: `bytes` at byte `offset` of the
/// file, at most two clusters; it decodes into exactly one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compressed {
    /// First byte (not aligned to anything).
    pub offset: u64,
    /// Bytes from there to the end of the last 512-byte sector the
    /// descriptor names; the stream may end before.
    pub bytes: u64,
}

impl Compressed {
    /// The sectors holding the data: `(first sector, sector count)`.
    pub fn sectors(&self) -> (u64, u64) {
        let first = self.offset / 512;
        (first, (self.offset + self.bytes).div_ceil(512) - first)
    }

    /// Most bytes a descriptor names with clusters of `1 << cluster_bits`
    /// (two clusters' worth of sectors): the input bound of a decoder.
    pub fn max_bytes(cluster_bits: u32) -> u64 {
        2 << cluster_bits
    }

    /// Decodes the descriptor of L2 entry `entry` (bit 62 set) with
    /// clusters of `1 << cluster_bits`, in a file of `file_len` bytes; `at`
    /// is the virtual offset, for messages.
    pub(crate) fn decode(
        entry: u64,
        cluster_bits: u32,
        file_len: u64,
        at: u64,
    ) -> Result<Self, Qcow2Error> {
        if entry & COPIED != 0 {
            return Err(invalid(format!(
                "compressed cluster at virtual offset {at:#x} ({entry:#x}) has the COPIED flag set"
            )));
        }
        let shift = 70 - cluster_bits;
        let offset = entry & ((1 << shift) - 1);
        let sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1;
        let c = Compressed {
            offset,
            bytes: sectors * 512 - offset % 512,
        };
        if offset & !OFFSET_MASK_WIDE != 0 || offset >> cluster_bits == 0 {
            return Err(invalid(format!(
                "compressed cluster at virtual offset {at:#x} has its data at {offset:#x}"
            )));
        }
        // The last sector may run past the end of a file whose length is
        // not a whole number of sectors; nothing more.
        if offset + c.bytes > file_len.next_multiple_of(512) {
            return Err(invalid(format!(
                "the compressed data of virtual offset {at:#x} at {offset:#x} (+{:#x}) lies past \
                 the end of the {file_len}-byte ({file_len:#x}) file",
                c.bytes
            )));
        }
        Ok(c)
    }
}
