//! The controller disk: where the mirror's durable state lives, and its
//! encoding. The primary and the secondary hold nothing but the volume,
//! so the secondary is the primary's image byte for byte once in sync.
//!
//! ```text
//! sector 0     superblock slot 0   4096 bytes
//! sector 8     superblock slot 1   4096 bytes
//! sector 16    bitmap area 0       one bit per block, area_sectors sectors
//! ...          bitmap area 1       the same size
//! ```
//!
//! A superblock is written to the slot its sequence number picks
//! (`seq % 2`), so a torn write leaves the other slot, one step older,
//! intact; the reader takes the valid slot with the higher sequence. The
//! superblock says which area is which:
//!
//! - paired: area `d` is the differential bitmap (a set bit: the
//!   secondary may lag the primary on that block); the other area is all
//!   zero on disk, ready for the next split.
//! - split: area `d` is the differential bitmap as it was at the split
//!   (the blocks the secondary still has to receive for the instant; bits
//!   of blocks already copied are cleared lazily); the other area marks
//!   the blocks written on the primary since the split.
//!
//! Bit `b` of an area is bit `b % 8` of byte `b / 8`. This module only
//! encodes and decodes; it must never touch a device.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::backup::tape::checksum;
use crate::devices::block::SECTOR_SIZE;

/// The first eight bytes of a superblock.
pub const MAGIC: [u8; 8] = *b"SNAPMIRR";
/// The superblock format this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of one superblock slot.
pub const SUPER_BYTES: usize = 4096;
/// Sectors before the first bitmap area (the two slots).
pub const AREAS_AT: u64 = 16;
/// Blocks one bitmap sector covers.
pub const BLOCKS_PER_SECTOR: u64 = SECTOR_SIZE as u64 * 8;
/// Longest disk name a superblock records.
const NAME_BYTES: usize = 32;
/// Longest suspension reason a superblock records.
const REASON_BYTES: usize = 256;

/// The mirror's sizes, fixed when the pair is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per block, a power of two from 512 B to 2 MiB.
    pub block_bytes: u64,
    /// Bytes of the volume (the primary's size).
    pub volume_bytes: u64,
}

impl Geometry {
    /// log2 of the block size.
    pub fn block_bits(&self) -> u32 {
        self.block_bytes.trailing_zeros()
    }
    /// Blocks in the volume (the last may end past the volume).
    pub fn blocks(&self) -> u64 {
        self.volume_bytes.div_ceil(self.block_bytes)
    }
    /// Sectors of one bitmap area.
    pub fn area_sectors(&self) -> u64 {
        self.blocks().div_ceil(BLOCKS_PER_SECTOR).max(1)
    }
    /// First sector of area `k` (0 or 1).
    pub fn area_at(&self, k: usize) -> u64 {
        AREAS_AT + k as u64 * self.area_sectors()
    }
    /// Bytes the controller disk needs.
    pub fn control_bytes(&self) -> u64 {
        (AREAS_AT + 2 * self.area_sectors()) * SECTOR_SIZE as u64
    }
    /// The volume's first sector of `block` and its sectors (the last
    /// block stops at the volume's end).
    pub fn extent(&self, block: u64) -> (u64, usize) {
        let at = block * self.block_bytes;
        let len = self.block_bytes.min(self.volume_bytes - at);
        (at / SECTOR_SIZE as u64, len as usize)
    }
}

/// Where the pair is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Writes go to both volumes; the secondary catches up in the
    /// background.
    Paired,
    /// Split: the secondary represents the primary at the split instant.
    Split,
}

/// One superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Super {
    /// Bumped by every write; picks the slot.
    pub seq: u64,
    /// The sizes.
    pub geometry: Geometry,
    /// The secondary's size when the pair was created.
    pub secondary_bytes: u64,
    /// The phase.
    pub phase: Phase,
    /// The differential area (paired) or the frozen one (split): 0 or 1.
    pub d: usize,
    /// Splits so far.
    pub splits: u64,
    /// The pair is suspended (paired) or the split can no longer yield
    /// its instant (split), for this reason; `None` if healthy.
    pub broken: Option<String>,
    /// The primary's and the secondary's names.
    pub names: [String; 2],
}

fn put_text(b: &mut [u8], text: &str) {
    let n = text.len().min(b.len());
    b[..n].copy_from_slice(&text.as_bytes()[..n]);
}

fn get_text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into()
}

fn le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Super {
    /// The first sector of the slot this superblock goes to.
    pub fn slot_sector(&self) -> u64 {
        (self.seq % 2) * (SUPER_BYTES / SECTOR_SIZE) as u64
    }

    /// Its 4096 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = alloc::vec![0u8; SUPER_BYTES];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let fields = [
            self.seq,
            self.geometry.block_bytes,
            self.geometry.volume_bytes,
            self.secondary_bytes,
            match self.phase {
                Phase::Paired => 1,
                Phase::Split => 2,
            },
            self.d as u64,
            self.splits,
            u64::from(self.broken.is_some()),
        ];
        for (i, v) in fields.iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        put_text(&mut b[80..80 + NAME_BYTES], &self.names[0]);
        put_text(&mut b[112..112 + NAME_BYTES], &self.names[1]);
        put_text(
            &mut b[144..144 + REASON_BYTES],
            self.broken.as_deref().unwrap_or(""),
        );
        let sum = checksum(&b[..SUPER_BYTES - 8]);
        b[SUPER_BYTES - 8..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Reads a slot: `Ok(None)` if it was never written (all zero),
    /// `Err` with what is wrong if it is not a valid superblock.
    pub fn decode(b: &[u8]) -> Result<Option<Super>, String> {
        if crate::support::is_zero(b) {
            return Ok(None);
        }
        if b[..8] != MAGIC {
            return Err("not a mirror controller disk (bad magic)".into());
        }
        if checksum(&b[..SUPER_BYTES - 8]) != le(b, SUPER_BYTES - 8) {
            return Err("bad checksum".into());
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(format!("unknown version {version}"));
        }
        let f = |i: usize| le(b, 16 + 8 * i);
        let geometry = Geometry {
            block_bytes: f(1),
            volume_bytes: f(2),
        };
        if !valid_block(geometry.block_bytes) || f(5) > 1 {
            return Err("fields out of range".into());
        }
        let phase = match f(4) {
            1 => Phase::Paired,
            2 => Phase::Split,
            p => return Err(format!("unknown phase {p}")),
        };
        let reason = get_text(&b[144..144 + REASON_BYTES]);
        Ok(Some(Super {
            seq: f(0),
            geometry,
            secondary_bytes: f(3),
            phase,
            d: f(5) as usize,
            splits: f(6),
            broken: (f(7) != 0).then_some(reason),
            names: [
                get_text(&b[80..80 + NAME_BYTES]),
                get_text(&b[112..112 + NAME_BYTES]),
            ],
        }))
    }
}

/// Whether `bytes` is a block size the mirror takes: a power of two from
/// 512 B to 2 MiB (the medium's cluster sizes).
pub fn valid_block(bytes: u64) -> bool {
    bytes.is_power_of_two() && (512..=2 << 20).contains(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Super {
        Super {
            seq: 7,
            geometry: Geometry {
                block_bytes: 65536,
                volume_bytes: 1 << 30,
            },
            secondary_bytes: 2 << 30,
            phase: Phase::Split,
            d: 1,
            splits: 3,
            broken: Some("disk \"secondary\": I/O error at sector 4096".into()),
            names: ["primary".into(), "secondary".into()],
        }
    }

    #[test]
    fn a_superblock_reads_back_and_a_flipped_bit_is_caught() {
        let s = sample();
        let mut b = s.encode();
        assert_eq!(Super::decode(&b), Ok(Some(s.clone())));
        assert_eq!(s.slot_sector(), 8);
        b[20] ^= 1;
        assert_eq!(Super::decode(&b), Err("bad checksum".into()));
        assert_eq!(Super::decode(&[0; SUPER_BYTES]), Ok(None));
        let mut other = alloc::vec![0u8; SUPER_BYTES];
        other[0] = b'Q';
        assert!(Super::decode(&other).unwrap_err().contains("bad magic"));
    }

    #[test]
    fn geometry_places_the_areas_after_the_slots() {
        let g = Geometry {
            block_bytes: 65536,
            volume_bytes: (64 << 30) + 512,
        };
        assert_eq!(g.blocks(), (1 << 20) + 1);
        assert_eq!(g.area_sectors(), 257);
        assert_eq!(g.area_at(1), 16 + 257);
        assert_eq!(g.control_bytes(), (16 + 514) * 512);
        assert_eq!(g.extent(1 << 20), ((64u64 << 30) / 512, 512));
        assert!(valid_block(512) && valid_block(2 << 20));
        assert!(!valid_block(256) && !valid_block(4 << 20) && !valid_block(3 << 10));
    }
}
