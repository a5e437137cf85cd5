//! Test disks: one with a volatile write cache that a crash partly
//! loses, with sectors that can be made to fail and healed again; and
//! the sector contents the model reads back.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::vec;
use std::vec::Vec;

use crate::devices::block::{check, BlockDevice, BlockError, DiskInfo, ErrorKind, Op, SECTOR_SIZE};
use crate::support::rng::Rng;

/// A disk whose completed writes sit in a cache until a flush; a crash
/// keeps a random subset of them.
pub struct CrashDisk {
    info: DiskInfo,
    state: Mutex<State>,
}

struct State {
    durable: Vec<u8>,
    cache: BTreeMap<u64, Vec<u8>>,
    failing: Option<(u64, u64)>,
    writes: u64,
}

impl CrashDisk {
    pub fn new(name: &str, sectors: u64) -> Self {
        CrashDisk {
            info: DiskInfo {
                name: name.into(),
                sectors,
                block_size: 512,
                read_only: false,
                flush: true,
                max_depth: 8,
            },
            state: Mutex::new(State {
                durable: vec![0; sectors as usize * SECTOR_SIZE],
                cache: BTreeMap::new(),
                failing: None,
                writes: 0,
            }),
        }
    }

    pub fn read_only(mut self) -> Self {
        self.info.read_only = true;
        self
    }

    /// Requests touching `[first, end)` fail until [`Self::heal`].
    pub fn fail(&self, first: u64, end: u64) {
        self.state.lock().unwrap().failing = Some((first, end));
    }

    pub fn heal(&self) {
        self.state.lock().unwrap().failing = None;
    }

    /// Loses the cache but for the sectors `keep` picks.
    pub fn crash(&self, rng: &mut Rng) {
        let mut s = self.state.lock().unwrap();
        let cache = core::mem::take(&mut s.cache);
        for (sector, data) in cache {
            if rng.below(2) == 0 {
                let at = sector as usize * SECTOR_SIZE;
                s.durable[at..at + SECTOR_SIZE].copy_from_slice(&data);
            }
        }
    }

    /// The disk as reads see it.
    pub fn contents(&self) -> Vec<u8> {
        let s = self.state.lock().unwrap();
        let mut out = s.durable.clone();
        for (sector, data) in &s.cache {
            let at = *sector as usize * SECTOR_SIZE;
            out[at..at + SECTOR_SIZE].copy_from_slice(data);
        }
        out
    }

    /// Write requests so far.
    pub fn writes(&self) -> u64 {
        self.state.lock().unwrap().writes
    }
}

impl BlockDevice for CrashDisk {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&self, ops: &mut [Op<'_>], _depth: usize) -> Result<(), BlockError> {
        for op in ops.iter() {
            check(&self.info, op)?;
        }
        let mut s = self.state.lock().unwrap();
        for op in ops.iter_mut() {
            if let (Some((first, len)), Some((a, b))) = (op.extent(), s.failing) {
                let end = first + (len / SECTOR_SIZE) as u64;
                if first < b && a < end {
                    let at = first.max(a);
                    return Err(BlockError::new(&self.info.name, Some(at), ErrorKind::Io));
                }
            }
            match op {
                Op::Read { sector, buf } => {
                    for (i, chunk) in buf.chunks_mut(SECTOR_SIZE).enumerate() {
                        let n = *sector + i as u64;
                        match s.cache.get(&n) {
                            Some(d) => chunk.copy_from_slice(d),
                            None => {
                                let at = n as usize * SECTOR_SIZE;
                                chunk.copy_from_slice(&s.durable[at..at + SECTOR_SIZE]);
                            }
                        }
                    }
                }
                Op::Write { sector, buf } => {
                    s.writes += 1;
                    for (i, chunk) in buf.chunks(SECTOR_SIZE).enumerate() {
                        s.cache.insert(*sector + i as u64, chunk.to_vec());
                    }
                }
                Op::Flush => {
                    let cache = core::mem::take(&mut s.cache);
                    for (n, d) in cache {
                        let at = n as usize * SECTOR_SIZE;
                        s.durable[at..at + SECTOR_SIZE].copy_from_slice(&d);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A sector holding version `v` of sector `n`: the version, then a
/// pattern of both (0 is the all-zero sector).
pub fn sector(v: u64, n: u64) -> [u8; SECTOR_SIZE] {
    let mut out = [0u8; SECTOR_SIZE];
    if v != 0 {
        crate::devices::block::fill_pattern(v, n, &mut out);
        out[..8].copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// The version each sector of `bytes` holds; panics on a sector that is
/// no version of itself (torn, misplaced).
pub fn versions(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks(SECTOR_SIZE)
        .enumerate()
        .map(|(n, chunk)| {
            let v = u64::from_le_bytes(chunk[..8].try_into().unwrap());
            assert_eq!(
                chunk,
                &sector(v, n as u64)[..],
                "sector {n} is no version of itself"
            );
            v
        })
        .collect()
}
