//! The live-snapshot soak, without the hardware: what one run of
//! `soak-memsnap` does, drawn from its seed ([`draw`]), how the seeds of
//! consecutive runs follow from the first ([`run_seed`]), and what a run
//! reports ([`RunResult`], one `soak.run` record the host reads back).
//!
//! A run is reproduced from its seed alone: run `i` of `--seed S` draws the
//! same configuration as run 0 of `--seed run_seed(S, i)`. Timing is not
//! reproduced (the machine's interleavings are not), only the
//! configuration.
//!
//! Must never depend on anything but the seed (no clock, no state): the
//! kernel and the host both call it and must agree.

use core::fmt;

use crate::interface::trace::{Record, Value};
use crate::support::rng::Rng;

/// The step between the seeds of consecutive runs (the golden ratio, as
/// in SplitMix64), so run `i`'s seed is one multiplication away.
const STEP: u64 = 0x9e37_79b9_7f4a_7c15;

/// The seed of run `index` of a soak started at `seed`.
pub fn run_seed(seed: u64, index: u64) -> u64 {
    seed.wrapping_add(index.wrapping_mul(STEP))
}

/// Where the snapshot goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// A separate part of RAM.
    Ram,
    /// A virtio-blk disk, as an ELF core file, through a staging area of
    /// this many pages (`None`: the engine's default size).
    Disk {
        /// Staging pages.
        staging: Option<u64>,
    },
}

/// How a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The snapshot completes and is verified page by page, then released.
    Complete,
    /// As `Complete`, then a region written during and after the snapshot
    /// is rolled back and compared with what it held at the instant (RAM
    /// store only).
    Restore,
    /// Aborted this many microseconds after the instant (it may have
    /// completed by then: the abort then drops it).
    Abort {
        /// Microseconds after the instant.
        after_us: u64,
    },
}

/// Workload patterns, each on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Patterns {
    /// Random word writes over each thread's region.
    pub random: bool,
    /// Sequential sweeps, a page at a time.
    pub sequential: bool,
    /// Heap blocks allocated, written and freed.
    pub heap: bool,
    /// Deep recursion, dirtying the thread's stack.
    pub recursion: bool,
    /// A thread reading a disk into its memory (the device writes behind
    /// the MMU's back: the DMA path).
    pub dma: bool,
}

impl Patterns {
    /// Every pattern the workload threads run themselves (all but DMA).
    pub const ALL_WRITES: Patterns = Patterns {
        random: true,
        sequential: true,
        heap: true,
        recursion: true,
        dma: false,
    };
}

/// One run's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunConfig {
    /// The run's own seed (also the workload's).
    pub seed: u64,
    /// Workload threads writing memory (besides the DMA reader).
    pub threads: u64,
    /// Each thread's region, bytes.
    pub bytes_each: u64,
    /// What the workload does.
    pub patterns: Patterns,
    /// How long the workload runs before the snapshot starts, µs.
    pub warmup_us: u64,
    /// The background copier's share of the CPU, percent.
    pub copier_share_pct: u64,
    /// The copier shares a CPU with the workload (and sleeps between
    /// bursts) instead of owning one (where there are several).
    pub copier_shared: bool,
    /// Copy map outside the snapshotted memory (else inside, eager).
    pub map_outside: bool,
    /// Where the copy goes.
    pub store: Store,
    /// How it ends.
    pub end: End,
}

/// Copier shares drawn from: all high enough that a run takes seconds,
/// not minutes, at the soak's RAM size under TCG.
const SHARES: [u64; 5] = [20, 35, 50, 75, 100];
/// Region sizes per workload thread.
const REGION_BYTES: [u64; 3] = [256 << 10, 1 << 20, 2 << 20];
/// Staging sizes for a disk store (the engine raises a size below what
/// the eager set needs).
const STAGING: [Option<u64>; 3] = [None, Some(64), Some(256)];
/// The latest abort, µs after the instant.
const ABORT_MAX_US: u64 = 400_000;

/// Draws run `seed`'s configuration.
pub fn draw(seed: u64) -> RunConfig {
    // Decorrelate neighbouring seeds (they differ by `STEP`) before use.
    let mut rng = Rng::new(mix(seed));
    let mut pick = |n: u64| rng.below(n);
    let threads = 1 + pick(3);
    let bytes_each = REGION_BYTES[pick(3) as usize];
    let mut patterns = Patterns {
        random: pick(4) != 0,
        sequential: pick(4) != 0,
        heap: pick(4) != 0,
        recursion: pick(4) != 0,
        dma: pick(2) != 0,
    };
    if !(patterns.random || patterns.sequential) {
        // Some thread must write its region, or nothing faults.
        patterns.random = true;
    }
    let warmup_us = pick(20_000);
    let copier_share_pct = SHARES[pick(SHARES.len() as u64) as usize];
    let map_outside = pick(2) != 0;
    let store = if pick(2) == 0 {
        Store::Ram
    } else {
        Store::Disk {
            staging: STAGING[pick(3) as usize],
        }
    };
    let end = match (pick(4), store) {
        (0, _) => End::Abort {
            after_us: pick(ABORT_MAX_US),
        },
        (1, Store::Ram) => End::Restore,
        _ => End::Complete,
    };
    // Drawn last, so that every earlier draw of a seed stays as it was.
    let copier_shared = pick(4) == 0;
    RunConfig {
        seed,
        threads,
        bytes_each,
        patterns,
        warmup_us,
        copier_share_pct,
        copier_shared,
        map_outside,
        store,
        end,
    }
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl fmt::Display for RunConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.patterns;
        write!(
            f,
            "{} x {} KiB [{}{}{}{}{}], warm-up {} us, copier {} %{}, map {}, ",
            self.threads,
            self.bytes_each >> 10,
            if p.random { "random " } else { "" },
            if p.sequential { "sequential " } else { "" },
            if p.heap { "heap " } else { "" },
            if p.recursion { "recursion " } else { "" },
            if p.dma { "dma" } else { "no-dma" },
            self.warmup_us,
            self.copier_share_pct,
            if self.copier_shared {
                " on a shared CPU"
            } else {
                ""
            },
            if self.map_outside {
                "outside"
            } else {
                "inside"
            },
        )?;
        match self.store {
            Store::Ram => f.write_str("RAM store, ")?,
            Store::Disk { staging: None } => f.write_str("disk store, ")?,
            Store::Disk { staging: Some(n) } => write!(f, "disk store ({n} staging pages), ")?,
        }
        match self.end {
            End::Complete => f.write_str("complete"),
            End::Restore => f.write_str("complete, then restore"),
            End::Abort { after_us } => write!(f, "abort after {after_us} us"),
        }
    }
}

/// The record that opens a run (so the host knows which run a hang is).
pub const BEGIN: &str = "soak.begin";
/// The record that closes a run: a [`RunResult`].
pub const RUN: &str = "soak.run";

/// What one run found, every count from evidence independent of the
/// engine's own bookkeeping: page hashes against a stop-the-world
/// reference, per-page copy counts kept by the store's side of the copy,
/// the frame allocator's free count before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunResult {
    /// The run's index in the soak.
    pub run: u64,
    /// Its seed.
    pub seed: u64,
    /// Pages in the range.
    pub pages: u64,
    /// Pages whose copy differs from the reference (of the pages checked:
    /// all after completion, those copied so far before an abort).
    pub mismatched: u64,
    /// Pages copied more than once.
    pub copied_twice: u64,
    /// Pages never copied, in a completed snapshot.
    pub never_copied: u64,
    /// How far the engine's counters, and a disk store's writer, are from
    /// the copies counted page by page (0 when they agree).
    pub count_disagreement: u64,
    /// Frames free before the run minus after it, all released.
    pub leaked_frames: u64,
    /// Words of the restored region that differ from the instant's.
    pub restore_errors: u64,
    /// Wall time of the run, µs.
    pub us: u64,
}

impl RunResult {
    /// Whether the run found nothing wrong.
    pub fn ok(&self) -> bool {
        self.problems() == 0
    }

    /// The sum of every count that should be zero.
    pub fn problems(&self) -> u64 {
        self.mismatched
            + self.copied_twice
            + self.never_copied
            + self.count_disagreement
            + self.leaked_frames
            + self.restore_errors
    }

    /// Adds `other`'s counts and time to these (for totals; `run` and
    /// `seed` stay).
    pub fn add(&mut self, other: &RunResult) {
        self.pages += other.pages;
        self.mismatched += other.mismatched;
        self.copied_twice += other.copied_twice;
        self.never_copied += other.never_copied;
        self.count_disagreement += other.count_disagreement;
        self.leaked_frames += other.leaked_frames;
        self.restore_errors += other.restore_errors;
        self.us += other.us;
    }

    /// The record's fields.
    pub fn fields(&self) -> [(&'static str, Value<'static>); 10] {
        [
            ("run", Value::U64(self.run)),
            ("seed", Value::Hex(self.seed)),
            ("pages", Value::U64(self.pages)),
            ("mismatched", Value::U64(self.mismatched)),
            ("copied_twice", Value::U64(self.copied_twice)),
            ("never_copied", Value::U64(self.never_copied)),
            ("count_disagreement", Value::U64(self.count_disagreement)),
            ("leaked_frames", Value::U64(self.leaked_frames)),
            ("restore_errors", Value::U64(self.restore_errors)),
            ("us", Value::U64(self.us)),
        ]
    }

    /// The result a `soak.run` record carries, if it is one.
    pub fn from_record(record: &Record<'_>) -> Option<Self> {
        if record.event != RUN {
            return None;
        }
        let get = |key| record.u64(key);
        Some(RunResult {
            run: get("run")?,
            seed: get("seed")?,
            pages: get("pages")?,
            mismatched: get("mismatched")?,
            copied_twice: get("copied_twice")?,
            never_copied: get("never_copied")?,
            count_disagreement: get("count_disagreement")?,
            leaked_frames: get("leaked_frames")?,
            restore_errors: get("restore_errors")?,
            us: get("us")?,
        })
    }
}

impl fmt::Display for RunResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} mismatched pages, {} copied twice, {} never copied, {} copy-count disagreements \
             (engine or disk writer against the pages), {} leaked frames, {} restore errors",
            self.mismatched,
            self.copied_twice,
            self.never_copied,
            self.count_disagreement,
            self.leaked_frames,
            self.restore_errors
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interface::trace::{parse_line, write_record};
    use proptest::prelude::*;
    use std::string::String;

    #[test]
    fn a_run_is_reproduced_from_its_own_seed() {
        for index in [0, 1, 7, 999] {
            let seed = run_seed(42, index);
            assert_eq!(run_seed(seed, 0), seed);
            assert_eq!(draw(run_seed(42, index)), draw(run_seed(seed, 0)));
            assert_eq!(run_seed(run_seed(42, 5), index), run_seed(42, 5 + index));
        }
    }

    #[test]
    fn every_choice_is_drawn_within_a_thousand_runs() {
        let configs: std::vec::Vec<RunConfig> = (0..1000).map(|i| draw(run_seed(1, i))).collect();
        let any = |f: &dyn Fn(&RunConfig) -> bool| configs.iter().any(f);
        assert!(any(&|c| c.store == Store::Ram));
        for staging in STAGING {
            assert!(any(&|c| c.store == Store::Disk { staging }));
        }
        assert!(any(&|c| c.end == End::Complete));
        assert!(any(&|c| c.end == End::Restore));
        assert!(any(&|c| matches!(c.end, End::Abort { .. })));
        assert!(any(&|c| c.map_outside) && any(&|c| !c.map_outside));
        assert!(any(&|c| c.copier_shared) && any(&|c| !c.copier_shared));
        assert!(any(&|c| c.patterns.dma) && any(&|c| !c.patterns.dma));
        assert!(any(&|c| !c.patterns.random) && any(&|c| !c.patterns.sequential));
        assert!(any(&|c| !c.patterns.heap) && any(&|c| !c.patterns.recursion));
        for share in SHARES {
            assert!(any(&|c| c.copier_share_pct == share));
        }
        for threads in 1..=3 {
            assert!(any(&|c| c.threads == threads));
        }
    }

    #[test]
    fn results_round_trip_through_their_record() {
        let result = RunResult {
            run: 3,
            seed: u64::MAX,
            pages: 9000,
            leaked_frames: 2,
            us: 12,
            ..RunResult::default()
        };
        let mut line = String::new();
        write_record(&mut line, 1, RUN, &result.fields()).unwrap();
        let record = parse_line(&line).unwrap().unwrap();
        assert_eq!(RunResult::from_record(&record), Some(result));
        assert!(!result.ok());
        assert!(RunResult::default().ok());
        let mut total = RunResult::default();
        total.add(&result);
        total.add(&result);
        assert_eq!((total.pages, total.leaked_frames, total.us), (18000, 4, 24));
        assert_eq!(total.problems(), 4);
        let other = parse_line("TRACE 1 soak.begin run=3").unwrap().unwrap();
        assert_eq!(RunResult::from_record(&other), None);
    }

    proptest! {
        #[test]
        fn draws_are_pure_and_keep_their_constraints(seed in any::<u64>()) {
            let c = draw(seed);
            prop_assert_eq!(c, draw(seed));
            prop_assert_eq!(c.seed, seed);
            prop_assert!(c.patterns.random || c.patterns.sequential);
            prop_assert!((1..=3).contains(&c.threads));
            prop_assert!(c.end != End::Restore || c.store == Store::Ram);
            if let End::Abort { after_us } = c.end {
                prop_assert!(after_us < ABORT_MAX_US);
            }
        }
    }
}
