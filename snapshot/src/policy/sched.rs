//! The scheduling policy of the kernel's preemptive thread scheduler, without
//! the hardware: which thread runs next, and why each thread is waiting.
//!
//! The kernel keeps one [`RunQueue`] behind an interrupt-safe lock and calls
//! [`RunQueue::switch`] from its timer and yield interrupts, handing in the
//! saved context of the interrupted thread and getting back the context to
//! resume. Contexts are opaque (`C`); here they are just values.
//!
//! Round robin over a FIFO ready queue: a thread that is ready runs within as
//! many switches as there are ready threads. Slot 0 is the boot thread, slot 1
//! the idle thread, which runs only when nothing else is ready. This module
//! must never allocate: it runs inside interrupt handlers.

/// Most threads alive at once, idle and boot thread included.
pub const MAX_THREADS: usize = 64;

/// Slot of the thread that was running at boot.
pub const BOOT_SLOT: usize = 0;
/// Slot of the idle thread.
pub const IDLE_SLOT: usize = 1;

/// What a thread slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Unused slot.
    Free,
    /// In the ready queue.
    Ready,
    /// On the CPU.
    Running,
    /// Waiting for the clock to reach `until`.
    Sleeping {
        /// Wake-up time, in the caller's clock units.
        until: u64,
    },
    /// Waiting for [`RunQueue::wake`] with this key.
    Blocked {
        /// What the thread waits for (an address, by convention).
        key: usize,
    },
    /// Finished; the slot is kept until [`RunQueue::reap`].
    Exited,
}

/// Why the running thread gives up the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Its time slice ended; it stays ready.
    Preempt,
    /// It asked to let others run; it stays ready.
    Yield,
    /// It sleeps until the given time.
    Sleep(u64),
    /// It waits for a wake-up with the given key.
    Block(usize),
    /// It has finished.
    Exit,
}

/// A refused [`RunQueue::reap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotExited(pub usize, pub State);

/// Thread states, saved contexts and the ready queue.
#[derive(Debug)]
pub struct RunQueue<C> {
    state: [State; MAX_THREADS],
    ctx: [C; MAX_THREADS],
    ready: [u8; MAX_THREADS],
    ready_head: usize,
    ready_len: usize,
    current: usize,
    switches: u64,
}

impl<C: Copy + Default> RunQueue<C> {
    /// A queue whose boot thread (slot 0) is running and whose idle thread
    /// (slot 1) will resume from `idle`.
    pub fn new(idle: C) -> Self {
        let mut queue = RunQueue {
            state: [State::Free; MAX_THREADS],
            ctx: [C::default(); MAX_THREADS],
            ready: [0; MAX_THREADS],
            ready_head: 0,
            ready_len: 0,
            current: BOOT_SLOT,
            switches: 0,
        };
        queue.state[BOOT_SLOT] = State::Running;
        queue.state[IDLE_SLOT] = State::Ready; // never queued: runs when the queue is empty
        queue.ctx[IDLE_SLOT] = idle;
        queue
    }

    /// The slot on the CPU.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The state of `slot`.
    pub fn state(&self, slot: usize) -> State {
        self.state[slot]
    }

    /// Context switches so far.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// Whether a thread other than the running one is waiting in the queue.
    pub fn has_ready(&self) -> bool {
        self.ready_len > 0
    }

    /// Puts a new thread in a free slot and queues it; `None` when full.
    pub fn spawn(&mut self, ctx: C) -> Option<usize> {
        let slot = self.state.iter().position(|s| *s == State::Free)?;
        self.ctx[slot] = ctx;
        self.make_ready(slot);
        Some(slot)
    }

    /// Frees the slot of an exited thread so it can be reused.
    pub fn reap(&mut self, slot: usize) -> Result<(), NotExited> {
        match self.state[slot] {
            State::Exited => {
                self.state[slot] = State::Free;
                Ok(())
            }
            other => Err(NotExited(slot, other)),
        }
    }

    /// Makes every thread blocked on `key` ready; returns how many woke.
    pub fn wake(&mut self, key: usize) -> usize {
        self.wake_where(|s| s == State::Blocked { key })
    }

    /// Like [`Self::wake`], but the woken threads go to the front of the
    /// queue, to run next: for threads a device's completion wakes, which
    /// run briefly and wait again. Behind CPU-bound threads they would wait
    /// a whole round of time slices per request.
    pub fn wake_first(&mut self, key: usize) -> usize {
        let mut woken = 0;
        for slot in 0..MAX_THREADS {
            if self.state[slot] == (State::Blocked { key }) {
                self.state[slot] = State::Ready;
                self.ready_head = (self.ready_head + MAX_THREADS - 1) % MAX_THREADS;
                self.ready[self.ready_head] = slot as u8;
                self.ready_len += 1;
                woken += 1;
            }
        }
        woken
    }

    /// Makes every thread whose sleep ended by `now` ready; returns how many.
    pub fn wake_sleepers(&mut self, now: u64) -> usize {
        self.wake_where(|s| matches!(s, State::Sleeping { until } if until <= now))
    }

    /// Saves the running thread's context, records why it stops, and returns
    /// the context of the thread to run next (possibly the same one).
    pub fn switch(&mut self, saved: C, why: Why, now: u64) -> C {
        let prev = self.current;
        self.ctx[prev] = saved;
        // Sleepers whose time came queue ahead of a thread that yields now.
        self.wake_sleepers(now);
        match why {
            // The idle thread never waits and is never queued.
            _ if prev == IDLE_SLOT => self.state[prev] = State::Ready,
            Why::Preempt | Why::Yield => self.make_ready(prev),
            Why::Sleep(until) if until <= now => self.make_ready(prev),
            Why::Sleep(until) => self.state[prev] = State::Sleeping { until },
            Why::Block(key) => self.state[prev] = State::Blocked { key },
            Why::Exit => self.state[prev] = State::Exited,
        }
        let next = self.pop_ready().unwrap_or(IDLE_SLOT);
        self.state[next] = State::Running;
        self.current = next;
        if next != prev {
            self.switches += 1;
        }
        self.ctx[next]
    }

    fn wake_where(&mut self, wakes: impl Fn(State) -> bool) -> usize {
        let mut woken = 0;
        for slot in 0..MAX_THREADS {
            if wakes(self.state[slot]) {
                self.make_ready(slot);
                woken += 1;
            }
        }
        woken
    }

    fn make_ready(&mut self, slot: usize) {
        self.state[slot] = State::Ready;
        let tail = (self.ready_head + self.ready_len) % MAX_THREADS;
        self.ready[tail] = slot as u8;
        self.ready_len += 1;
    }

    fn pop_ready(&mut self) -> Option<usize> {
        if self.ready_len == 0 {
            return None;
        }
        let slot = self.ready[self.ready_head] as usize;
        self.ready_head = (self.ready_head + 1) % MAX_THREADS;
        self.ready_len -= 1;
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    #[test]
    fn idle_runs_only_when_nothing_is_ready() {
        let mut q: RunQueue<u32> = RunQueue::new(100);
        let a = q.spawn(1).unwrap();
        assert_eq!(q.switch(0, Why::Block(7), 0), 1);
        assert_eq!(q.current(), a);
        assert_eq!(q.switch(1, Why::Sleep(50), 10), 100, "idle when all wait");
        assert_eq!(q.switch(100, Why::Preempt, 20), 100, "idle keeps the CPU");
        assert_eq!(q.wake(7), 1);
        assert_eq!(q.switch(100, Why::Preempt, 30), 0, "woken boot thread runs");
        assert_eq!(
            q.switch(0, Why::Yield, 60),
            1,
            "sleeper woke at 50 and was queued first"
        );
    }

    #[test]
    fn threads_woken_first_run_before_the_queue() {
        let mut q: RunQueue<u32> = RunQueue::new(100);
        let a = q.spawn(1).unwrap();
        let b = q.spawn(2).unwrap();
        let c = q.spawn(3).unwrap();
        assert_eq!(q.switch(0, Why::Yield, 0), 1);
        assert_eq!(q.switch(1, Why::Block(9), 0), 2, "a waits for a device");
        assert_eq!(q.current(), b);
        assert_eq!(q.wake_first(9), 1);
        assert_eq!(
            q.switch(2, Why::Preempt, 1),
            1,
            "a runs ahead of c and boot"
        );
        assert_eq!(q.current(), a);
        assert_eq!(q.switch(1, Why::Preempt, 2), 3, "then the queue in order");
        assert_eq!(q.current(), c);
        assert_eq!(q.wake_first(9), 0, "nothing blocked");
    }

    #[test]
    fn exited_threads_wait_for_reaping() {
        let mut q: RunQueue<u32> = RunQueue::new(100);
        let a = q.spawn(1).unwrap();
        q.switch(0, Why::Yield, 0);
        assert_eq!(q.reap(a), Err(NotExited(a, State::Running)));
        q.switch(1, Why::Exit, 0);
        assert_eq!(q.state(a), State::Exited);
        assert_eq!(q.reap(a), Ok(()));
        assert_eq!(q.spawn(2), Some(a), "slot reused");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Spawn,
        Switch(u8),
        Wake(u8),
        Advance(u8),
        Reap(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => Just(Op::Spawn),
            6 => any::<u8>().prop_map(Op::Switch),
            2 => any::<u8>().prop_map(Op::Wake),
            2 => any::<u8>().prop_map(Op::Advance),
            1 => any::<u8>().prop_map(Op::Reap),
        ]
    }

    proptest! {
        /// Random interleavings of spawns, switches, wake-ups and reaping keep
        /// the invariants: one thread runs, the queue holds exactly the ready
        /// threads once each, and a ready thread runs within as many switches
        /// as there were threads ahead of it.
        #[test]
        fn invariants_hold_and_nobody_starves(ops in proptest::collection::vec(op(), 1..300)) {
            let mut q: RunQueue<usize> = RunQueue::new(IDLE_SLOT);
            let mut now = 0u64;
            // Switches each ready thread has waited, keyed by slot.
            let mut waited = [0usize; MAX_THREADS];
            for op in ops {
                match op {
                    Op::Spawn => if let Some(slot) = q.spawn(0) { q.ctx[slot] = slot; },
                    Op::Switch(r) => {
                        let cur = q.current();
                        let why = match r % 5 {
                            0 => Why::Preempt,
                            1 => Why::Yield,
                            2 => Why::Sleep(now + u64::from(r % 7)),
                            3 => Why::Block(usize::from(r % 3)),
                            _ if cur > IDLE_SLOT => Why::Exit,
                            _ => Why::Yield,
                        };
                        let ahead = q.ready_len;
                        let next = q.switch(cur, why, now);
                        prop_assert_eq!(next, q.current(), "context belongs to the chosen slot");
                        for (slot, waited) in waited.iter_mut().enumerate() {
                            if q.state(slot) == State::Ready && slot != IDLE_SLOT {
                                *waited += 1;
                                prop_assert!(*waited <= MAX_THREADS, "slot {slot} starves");
                            } else {
                                *waited = 0;
                            }
                        }
                        prop_assert!(ahead <= MAX_THREADS);
                    }
                    Op::Wake(k) => { q.wake(usize::from(k % 3)); }
                    Op::Advance(d) => { now += u64::from(d % 5); q.wake_sleepers(now); }
                    Op::Reap(s) => {
                        let slot = usize::from(s) % MAX_THREADS;
                        let exited = q.state(slot) == State::Exited;
                        prop_assert_eq!(q.reap(slot).is_ok(), exited);
                    }
                }
                let running: Vec<usize> =
                    (0..MAX_THREADS).filter(|&s| q.state(s) == State::Running).collect();
                prop_assert_eq!(running, std::vec![q.current()]);
                let queued: Vec<usize> = (0..q.ready_len)
                    .map(|i| q.ready[(q.ready_head + i) % MAX_THREADS] as usize)
                    .collect();
                let mut sorted = queued.clone();
                sorted.sort_unstable();
                sorted.dedup();
                prop_assert_eq!(sorted.len(), queued.len(), "a slot queued twice");
                for slot in 0..MAX_THREADS {
                    let should = q.state(slot) == State::Ready && slot != IDLE_SLOT;
                    prop_assert_eq!(queued.contains(&slot), should, "slot {}", slot);
                }
            }
        }
    }
}
