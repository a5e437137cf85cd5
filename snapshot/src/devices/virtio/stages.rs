//! Where the time of a batch of one request goes, from timestamps the
//! kernel takes along its path: the driver's own work up to the
//! notification, the notification write (a VM exit under a hypervisor),
//! the device, the wake-up after its interrupt, and the driver's work
//! after the completion. The benchmark reports these per request at
//! depth 1, where they add up to the request's latency.
//!
//! Pure arithmetic: this module never reads a clock. Timestamps that come
//! out of order (an interrupt left over from an earlier batch, clocks of
//! two CPUs that disagree slightly) are clamped, never trusted, so the
//! stages always add up to the batch's time.

/// The moments of one batch of one request, in nanoseconds on one clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moments {
    /// The caller asked for the batch.
    pub start: u64,
    /// The notification write began and ended.
    pub kick: (u64, u64),
    /// The completion interrupt's handler ran (the last one, if any).
    pub interrupt: Option<u64>,
    /// The driver saw the completion after waiting for it; `None` if it
    /// found it without waiting.
    pub seen: Option<u64>,
    /// The batch returned.
    pub end: u64,
}

/// Where the time of one-request batches went, summed over such batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stages {
    /// Batches of one request.
    pub batches: u64,
    /// Of which the completion was signalled by an interrupt.
    pub interrupted: u64,
    /// From the call to the notification write: locking, checks, lending
    /// the buffer, filling the queue.
    pub submit_ns: u64,
    /// The notification write.
    pub kick_ns: u64,
    /// From the end of the notification to the first sign of the
    /// completion: the interrupt handler, or the check that saw it when no
    /// interrupt came first.
    pub device_ns: u64,
    /// From the interrupt handler to the waiting thread seeing the
    /// completion (the switch back to it included).
    pub wakeup_ns: u64,
    /// From seeing the completion to returning: reaping, giving the
    /// buffer back, accounting.
    pub complete_ns: u64,
}

impl Stages {
    /// The stages of one batch.
    pub fn of(m: &Moments) -> Stages {
        let end = m.end.max(m.start);
        let kick_start = m.kick.0.clamp(m.start, end);
        let kick_end = m.kick.1.clamp(kick_start, end);
        let seen = m.seen.map_or(kick_end, |t| t.clamp(kick_end, end));
        // An interrupt counts only if it came between the notification
        // and the sighting: an earlier one belonged to another batch.
        let interrupt = m.interrupt.filter(|t| (kick_end..=seen).contains(t));
        let signal = interrupt.unwrap_or(seen);
        Stages {
            batches: 1,
            interrupted: u64::from(interrupt.is_some()),
            submit_ns: kick_start - m.start,
            kick_ns: kick_end - kick_start,
            device_ns: signal - kick_end,
            wakeup_ns: seen - signal,
            complete_ns: end - seen,
        }
    }

    /// All five stages: the batches' whole time.
    pub fn total_ns(&self) -> u64 {
        self.submit_ns + self.kick_ns + self.device_ns + self.wakeup_ns + self.complete_ns
    }

    /// Adds `other`'s batches.
    pub fn add(&mut self, other: &Stages) {
        self.batches += other.batches;
        self.interrupted += other.interrupted;
        self.submit_ns += other.submit_ns;
        self.kick_ns += other.kick_ns;
        self.device_ns += other.device_ns;
        self.wakeup_ns += other.wakeup_ns;
        self.complete_ns += other.complete_ns;
    }

    /// The sums since `before` (an earlier reading of the same sums).
    pub fn since(&self, before: &Stages) -> Stages {
        Stages {
            batches: self.batches - before.batches,
            interrupted: self.interrupted - before.interrupted,
            submit_ns: self.submit_ns - before.submit_ns,
            kick_ns: self.kick_ns - before.kick_ns,
            device_ns: self.device_ns - before.device_ns,
            wakeup_ns: self.wakeup_ns - before.wakeup_ns,
            complete_ns: self.complete_ns - before.complete_ns,
        }
    }

    /// `ns` per batch (0 without batches).
    pub fn per_batch(&self, ns: u64) -> u64 {
        ns / self.batches.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::rng::Rng;

    fn moments(
        start: u64,
        kick: (u64, u64),
        interrupt: Option<u64>,
        seen: Option<u64>,
        end: u64,
    ) -> Moments {
        Moments {
            start,
            kick,
            interrupt,
            seen,
            end,
        }
    }

    #[test]
    fn an_interrupted_wait_splits_at_each_moment() {
        let s = Stages::of(&moments(100, (104, 112), Some(132), Some(135), 138));
        assert_eq!(
            (
                s.submit_ns,
                s.kick_ns,
                s.device_ns,
                s.wakeup_ns,
                s.complete_ns
            ),
            (4, 8, 20, 3, 3)
        );
        assert_eq!((s.total_ns(), s.interrupted), (38, 1));
    }

    #[test]
    fn an_interrupt_from_before_the_notification_is_not_this_batch() {
        let s = Stages::of(&moments(100, (104, 112), Some(90), Some(135), 138));
        assert_eq!(
            (s.device_ns, s.wakeup_ns),
            (23, 0),
            "polled: all device time"
        );
    }

    #[test]
    fn a_completion_found_without_waiting_leaves_no_device_time() {
        let s = Stages::of(&moments(100, (104, 112), None, None, 120));
        assert_eq!((s.device_ns, s.wakeup_ns, s.complete_ns), (0, 0, 8));
    }

    #[test]
    fn stages_add_up_to_the_batch_whatever_order_the_moments_come_in() {
        let mut rng = Rng::new(7);
        let mut sum = Stages::default();
        let mut whole = 0;
        for _ in 0..10_000 {
            let mut t = || 1000 + rng.below(100);
            let m = moments(t(), (t(), t()), Some(t()), Some(t()), t());
            let s = Stages::of(&m);
            whole += m.end.max(m.start) - m.start;
            assert_eq!(s.total_ns(), m.end.max(m.start) - m.start, "{m:?}");
            let before = sum;
            sum.add(&s);
            assert_eq!(sum.since(&before), s);
        }
        assert_eq!((sum.batches, sum.total_ns()), (10_000, whole));
        assert_eq!(sum.per_batch(sum.total_ns()), whole / 10_000);
    }
}
