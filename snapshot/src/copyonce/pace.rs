//! Pacing for a background copier: work in bursts, step aside in between,
//! so it takes a given share of the CPU and yields to a busy workload.
//!
//! The caller supplies every timestamp (nanoseconds on any monotonic
//! clock), so the pacer is plain arithmetic: it never reads a clock, sleeps
//! or blocks.
//!
//! Without foreground reports it behaves like a fixed duty cycle: bursts of
//! `burst_ns`, each followed by a rest of `burst_ns * (100 - share) / share`
//! ([`Pacer::end_burst`]), or of the burst's measured length in place of
//! `burst_ns` ([`Pacer::end_burst_at`]), for a copier whose unit of work
//! may outlast the nominal burst: the share then holds whatever a unit
//! costs.
//! When the caller reports foreground activity ([`Pacer::foreground`]) the
//! current burst ends at the next check and the share halves, down to a
//! floor; each burst without such a report doubles it back up to the share
//! asked for.

/// A background copier's default share when it shares its CPU: the
/// foreground keeps the rest.
pub const SHARED_CPU_SHARE_PCT: u64 = 30;

/// The share a copier takes, in percent: the one asked for (clamped to
/// 1..=100), else all of a CPU it owns (nothing else may run there, so a
/// lower share would only leave it idle), else [`SHARED_CPU_SHARE_PCT`].
pub const fn effective_share(asked_pct: Option<u64>, owns_cpu: bool) -> u64 {
    match asked_pct {
        Some(0) => 1,
        Some(share) if share > 100 => 100,
        Some(share) => share,
        None if owns_cpu => 100,
        None => SHARED_CPU_SHARE_PCT,
    }
}

/// Paces a background copier to a share of the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pacer {
    asked_pct: u64,
    current_pct: u64,
    floor_pct: u64,
    burst_ns: u64,
    burst_start: u64,
    busy: bool,
}

impl Pacer {
    /// A pacer for `share_pct` percent of the CPU (clamped to 1..=100) in
    /// bursts of `burst_ns` (at least 1). Backing off goes down to an
    /// eighth of the share (at least 1 %).
    pub const fn new(share_pct: u64, burst_ns: u64) -> Self {
        let share_pct = if share_pct == 0 {
            1
        } else if share_pct > 100 {
            100
        } else {
            share_pct
        };
        let floor_pct = if share_pct / 8 == 0 { 1 } else { share_pct / 8 };
        Pacer {
            asked_pct: share_pct,
            current_pct: share_pct,
            floor_pct,
            burst_ns: if burst_ns == 0 { 1 } else { burst_ns },
            burst_start: 0,
            busy: false,
        }
    }

    /// The same pacer, backing off no lower than `floor_pct` percent
    /// (clamped to 1..=share).
    pub const fn with_floor(mut self, floor_pct: u64) -> Self {
        self.floor_pct = if floor_pct == 0 {
            1
        } else if floor_pct > self.asked_pct {
            self.asked_pct
        } else {
            floor_pct
        };
        self
    }

    /// The nominal burst, in ns.
    pub fn burst_ns(&self) -> u64 {
        self.burst_ns
    }

    /// The share in effect now, in percent.
    pub fn share_pct(&self) -> u64 {
        self.current_pct
    }

    /// A burst starts at `now_ns`.
    pub fn start_burst(&mut self, now_ns: u64) {
        self.burst_start = now_ns;
        self.busy = false;
    }

    /// Whether to go on working at `now_ns`: the burst has time left and
    /// no foreground activity was reported during it.
    pub fn keep_working(&self, now_ns: u64) -> bool {
        !self.busy && now_ns.saturating_sub(self.burst_start) < self.burst_ns
    }

    /// The workload was active: step aside at the next check and lower
    /// the share until a burst passes without such a report.
    pub fn foreground(&mut self) {
        self.busy = true;
    }

    /// The burst is over: how long to step aside, in ns. Adapts the share
    /// to whether the workload was active during the burst.
    pub fn end_burst(&mut self) -> u64 {
        self.current_pct = if self.busy {
            (self.current_pct / 2).max(self.floor_pct)
        } else {
            (self.current_pct * 2).min(self.asked_pct)
        };
        self.busy = false;
        self.rest_ns()
    }

    /// The rest after a burst at the share in effect now.
    pub fn rest_ns(&self) -> u64 {
        self.rest_after(self.burst_ns)
    }

    /// Like [`Self::end_burst`], but the rest follows the burst's measured
    /// length (from [`Self::start_burst`] to `now_ns`) rather than the
    /// nominal one: a burst that overran its time still gets the share's
    /// rest.
    pub fn end_burst_at(&mut self, now_ns: u64) -> u64 {
        let worked = now_ns.saturating_sub(self.burst_start);
        self.end_burst();
        self.rest_after(worked)
    }

    fn rest_after(&self, worked_ns: u64) -> u64 {
        let rest = u128::from(worked_ns) * u128::from(100 - self.current_pct)
            / u128::from(self.current_pct);
        u64::try_from(rest).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_copier_on_its_own_cpu_takes_all_of_it_unless_asked() {
        assert_eq!(effective_share(None, true), 100);
        assert_eq!(effective_share(None, false), SHARED_CPU_SHARE_PCT);
        assert_eq!(effective_share(Some(30), true), 30);
        assert_eq!(effective_share(Some(0), false), 1);
        assert_eq!(effective_share(Some(250), false), 100);
        // Full share: no rest between bursts.
        assert_eq!(Pacer::new(effective_share(None, true), MS).end_burst(), 0);
    }

    #[test]
    fn a_quiet_workload_gets_the_fixed_duty_cycle() {
        let mut p = Pacer::new(30, 2 * MS);
        p.start_burst(10 * MS);
        assert!(p.keep_working(10 * MS));
        assert!(p.keep_working(12 * MS - 1));
        assert!(!p.keep_working(12 * MS));
        // 2 ms of work to 30 %: 2 * 70 / 30 ms of rest, as the kernel's
        // copier computes it.
        assert_eq!(p.end_burst(), 2 * MS * 70 / 30);
        assert_eq!(Pacer::new(100, MS).end_burst(), 0);
        assert_eq!(Pacer::new(0, MS).share_pct(), 1);
        assert_eq!(Pacer::new(250, MS).share_pct(), 100);
        // A clock that steps back does not end the burst.
        p.start_burst(10 * MS);
        assert!(p.keep_working(5 * MS));
    }

    #[test]
    fn foreground_activity_ends_the_burst_and_backs_off() {
        let mut p = Pacer::new(100, MS);
        p.start_burst(0);
        p.foreground();
        assert!(!p.keep_working(1), "steps aside at once");
        assert_eq!(p.end_burst(), MS, "half the CPU: rest as long as the burst");
        let mut shares = [0; 6];
        for share in &mut shares {
            p.start_burst(0);
            p.foreground();
            p.end_burst();
            *share = p.share_pct();
        }
        assert_eq!(shares, [25, 12, 12, 12, 12, 12], "floor: an eighth");
        let mut recovered = [0; 4];
        for share in &mut recovered {
            p.start_burst(0);
            assert!(p.keep_working(0), "a new burst is not busy");
            p.end_burst();
            *share = p.share_pct();
        }
        assert_eq!(recovered, [24, 48, 96, 100]);
        let mut low = Pacer::new(30, MS).with_floor(20);
        low.foreground();
        low.end_burst();
        assert_eq!(low.share_pct(), 20);
        assert_eq!(Pacer::new(5, MS).with_floor(0).with_floor(9).floor_pct, 5);
    }

    #[test]
    fn the_rest_follows_the_measured_burst() {
        // A 10 ms burst whose one unit of work took 40 ms: at 50 % the rest
        // is 40 ms, not 10 (which would give the copier 80 %).
        let mut p = Pacer::new(50, 10 * MS);
        p.start_burst(100 * MS);
        assert!(!p.keep_working(140 * MS));
        assert_eq!(p.end_burst_at(140 * MS), 40 * MS);
        // Busy: the share halves and the rest grows with it.
        p.start_burst(0);
        p.foreground();
        assert_eq!(p.end_burst_at(8 * MS), 8 * MS * 75 / 25);
        // Time the clock stepped back counts as no work, no rest.
        p.start_burst(50 * MS);
        assert_eq!(p.end_burst_at(10 * MS), 0);
        assert_eq!(Pacer::new(1, 1).end_burst_at(u64::MAX), u64::MAX);
    }
}
