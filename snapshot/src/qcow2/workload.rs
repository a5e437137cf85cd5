//! The seeded workload a clone serves during its split, described once so
//! the kernel runs it and the host recomputes what it wrote.
//!
//! Request `k` of seed `s` depends on `(s, k)` alone: a read or a write of
//! 1 to 16 sectors (whole clusters, parts of clusters, and across cluster
//! boundaries) anywhere on the disk; a write's bytes are the test pattern
//! of a seed derived from `(s, k)`. Applying the first `n` writes in order
//! to the clone's content before the run gives its content after `n`
//! requests. Nothing here touches a device.

use crate::devices::block::fill_pattern;
use crate::support::rng::Rng;

/// The seed the scenario uses unless told otherwise.
pub const SEED: u64 = 0xc10e;

/// Most sectors one request moves.
pub const MAX_SECTORS: u64 = 16;

/// One request of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// A write (else a read).
    pub write: bool,
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub sectors: u64,
}

fn mix(seed: u64, k: u64) -> u64 {
    seed ^ k.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Request `k` of seed `seed` on a disk of `disk_sectors` (at least 1):
/// never longer than the disk.
pub fn request(seed: u64, k: u64, disk_sectors: u64) -> Request {
    let mut rng = Rng::new(mix(seed, k));
    let write = rng.below(2) == 0;
    let sectors = 1 + rng.below(MAX_SECTORS.min(disk_sectors));
    let sector = rng.below(disk_sectors - sectors + 1);
    Request {
        write,
        sector,
        sectors,
    }
}

/// The bytes write `k` of seed `seed` puts at its sectors.
pub fn fill(seed: u64, k: u64, r: &Request, buf: &mut [u8]) {
    fill_pattern(mix(seed, k), r.sector, buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_stay_on_the_disk_and_vary() {
        let mut writes = 0;
        for k in 0..1000 {
            let r = request(SEED, k, 100);
            assert!(r.sectors >= 1 && r.sectors <= MAX_SECTORS);
            assert!(r.sector + r.sectors <= 100);
            writes += u64::from(r.write);
            assert_eq!(r, request(SEED, k, 100), "the same for the same k");
        }
        assert!((400..600).contains(&writes), "{writes} writes of 1000");
    }

    #[test]
    fn requests_fit_a_disk_smaller_than_one_request() {
        for disk in 1..=MAX_SECTORS {
            for k in 0..200 {
                let r = request(SEED, k, disk);
                assert!(r.sectors >= 1, "{disk} sectors: {r:?}");
                assert!(r.sector + r.sectors <= disk, "{disk} sectors: {r:?}");
            }
        }
    }
}
