//! When a job's progress is worth a record: at most every 5 % of each
//! stage, and once at a stage's end. The kernel traces what this lets
//! through; the host tool shows it while the job runs.
//!
//! Each stage keeps its own last per cent, so stages reported in turn (a
//! backup's copy and stream, batch by batch) are throttled too. A record
//! costs the serial console about 100 µs, more while the disks keep
//! QEMU busy; one per batch took a tenth of a 1 GiB backup.
//!
//! Pure bookkeeping: this module must never print or touch a device.

/// Stages a [`Throttle`] keeps apart; a job has at most three. A stage
/// past them is let through every time (chatty, never silent).
const STAGES: usize = 4;

/// The per cent a stage must move by before it is reported again.
pub const STEP_PCT: u64 = 5;

/// Which progress reports are due.
#[derive(Debug, Clone, Default)]
pub struct Throttle {
    /// The last per cent let through, per stage.
    last: [Option<(&'static str, u64)>; STAGES],
}

impl Throttle {
    /// Nothing reported yet.
    pub const fn new() -> Self {
        Throttle {
            last: [None; STAGES],
        }
    }

    /// Whether `done` of `total` in `stage` should be reported; if so, it
    /// counts as reported. A stage's first report, its end and every
    /// [`STEP_PCT`] per cent are due; a report below the last one starts
    /// the stage again (a mirror pairs before its backup and again after).
    pub fn due(&mut self, stage: &'static str, done: u64, total: u64) -> bool {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let slot = self
            .last
            .iter()
            .position(|l| l.is_some_and(|(s, _)| s == stage))
            .or_else(|| self.last.iter().position(Option::is_none));
        let due = match slot.and_then(|i| self.last[i]) {
            Some((_, p)) => pct < p || pct >= p + STEP_PCT || (done == total && p < 100),
            None => true,
        };
        if let (true, Some(i)) = (due, slot) {
            self.last[i] = Some((stage, pct));
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reports let through when `stages` each count to `total` in
    /// steps of `step`, taking turns.
    fn through(stages: &[&'static str], total: u64, step: u64) -> alloc::vec::Vec<(usize, u64)> {
        let mut t = Throttle::new();
        let mut out = alloc::vec::Vec::new();
        let mut done = 0;
        while done < total {
            done = (done + step).min(total);
            for (i, s) in stages.iter().enumerate() {
                if t.due(s, done, total) {
                    out.push((i, done));
                }
            }
        }
        out
    }

    #[test]
    fn one_stage_is_reported_every_five_per_cent_and_at_its_end() {
        let got = through(&["copy"], 1000, 1);
        let want: alloc::vec::Vec<_> = (0..=20).map(|k| (0, (k * 50).max(1))).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn stages_taking_turns_are_each_throttled() {
        // A backup's copy and stream, reported batch by batch: 1,000
        // batches each, 21 records each (the first, every 5 %, the end),
        // not 2,000.
        let got = through(&["copy", "stream"], 1000, 1);
        for stage in 0..2 {
            let n = got.iter().filter(|(s, _)| *s == stage).count();
            assert_eq!(n, 21, "stage {stage}: {got:?}");
        }
        assert!(got.contains(&(1, 1000)), "the end is reported");
    }

    #[test]
    fn the_end_is_reported_even_inside_the_last_step() {
        let mut t = Throttle::new();
        assert!(t.due("copy", 97, 100));
        assert!(t.due("copy", 100, 100), "the end");
        assert!(!t.due("copy", 100, 100), "once");
    }

    #[test]
    fn stages_past_the_slots_are_reported_every_time() {
        let names = ["a", "b", "c", "d", "e"];
        let mut t = Throttle::new();
        for n in names {
            assert!(t.due(n, 1, 100));
        }
        assert!(!t.due("a", 2, 100), "a kept slot throttles");
        assert!(t.due("e", 2, 100), "no slot: always due");
    }

    #[test]
    fn a_stage_run_again_is_reported_again() {
        let mut t = Throttle::new();
        assert!(t.due("pair", 0, 10));
        assert!(t.due("pair", 10, 10));
        assert!(t.due("pair", 0, 10), "the second run's start");
        assert!(!t.due("pair", 0, 10));
        assert!(t.due("pair", 10, 10), "the second run's end");
    }

    #[test]
    fn an_empty_total_counts_as_done() {
        let mut t = Throttle::new();
        assert!(t.due("restore", 0, 0));
        assert!(!t.due("restore", 0, 0));
    }
}
