//! The scheduling policy of the kernel's preemptive thread scheduler, without
//! the hardware: which thread runs next on which CPU, and why each thread
//! is waiting.
//!
//! The kernel keeps one [`RunQueue`] behind an interrupt-safe lock, shared
//! by every CPU, and calls [`RunQueue::switch`] from each CPU's timer and
//! yield interrupts, handing in the CPU's number and the saved context of
//! the interrupted thread and getting back the context to resume. Contexts
//! are opaque (`C`); here they are just values.
//!
//! Round robin over one FIFO ready queue: a thread that is ready runs within
//! as many switches as there are ready threads ahead of it that may run on
//! the same CPU. Slot 0 is the boot thread, slot 1 the boot CPU's idle
//! thread; each further CPU gets an idle slot of its own
//! ([`RunQueue::add_cpu`]). An idle thread runs only when nothing else that
//! may run on its CPU is ready, and is never queued. A thread's affinity is
//! a mask of CPUs; a CPU can be *reserved* for the threads pinned to it
//! alone, and *held* (runs nothing but its idle thread). This module must
//! never allocate: it runs inside interrupt handlers.

/// Most threads alive at once, idle and boot thread included.
pub const MAX_THREADS: usize = 64;
/// Most CPUs the scheduler drives (CPU numbers are `0..MAX_CPUS`).
pub const MAX_CPUS: usize = 16;
/// The affinity of a thread that may run anywhere.
pub const ANY_CPU: u64 = u64::MAX;

/// Slot of the thread that was running at boot.
pub const BOOT_SLOT: usize = 0;
/// Slot of the boot CPU's idle thread.
pub const IDLE_SLOT: usize = 1;

/// What a thread slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Unused slot.
    Free,
    /// In the ready queue (or an idle thread that is not running).
    Ready,
    /// On a CPU.
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

/// Thread states, saved contexts, affinities and the ready queue.
#[derive(Debug)]
pub struct RunQueue<C> {
    state: [State; MAX_THREADS],
    ctx: [C; MAX_THREADS],
    affinity: [u64; MAX_THREADS],
    /// The CPU a thread reserved for itself alone, if any.
    reserves: [Option<u8>; MAX_THREADS],
    idle: [bool; MAX_THREADS],
    ready: [u8; MAX_THREADS],
    ready_head: usize,
    ready_len: usize,
    current: [usize; MAX_CPUS],
    idle_of: [usize; MAX_CPUS],
    cpus: usize,
    held: u64,
    switches: u64,
}

impl<C: Copy + Default> RunQueue<C> {
    /// A queue for one CPU (CPU 0), whose boot thread (slot 0) is running
    /// and whose idle thread (slot 1) will resume from `idle`.
    pub fn new(idle: C) -> Self {
        let mut queue = RunQueue {
            state: [State::Free; MAX_THREADS],
            ctx: [C::default(); MAX_THREADS],
            affinity: [ANY_CPU; MAX_THREADS],
            reserves: [None; MAX_THREADS],
            idle: [false; MAX_THREADS],
            ready: [0; MAX_THREADS],
            ready_head: 0,
            ready_len: 0,
            current: [BOOT_SLOT; MAX_CPUS],
            idle_of: [IDLE_SLOT; MAX_CPUS],
            cpus: 1,
            held: 0,
            switches: 0,
        };
        queue.state[BOOT_SLOT] = State::Running;
        queue.state[IDLE_SLOT] = State::Ready; // never queued: runs when the queue is empty
        queue.ctx[IDLE_SLOT] = idle;
        queue.idle[IDLE_SLOT] = true;
        queue
    }

    /// Adds the next CPU, running its idle thread in a new slot (its context
    /// is saved at its first switch). Returns the CPU's number and the
    /// idle thread's slot; `None` if there is no CPU number or slot left.
    pub fn add_cpu(&mut self) -> Option<(usize, usize)> {
        if self.cpus >= MAX_CPUS {
            return None;
        }
        let slot = self.state.iter().position(|s| *s == State::Free)?;
        let cpu = self.cpus;
        self.cpus += 1;
        self.state[slot] = State::Running;
        self.idle[slot] = true;
        self.affinity[slot] = 1 << cpu;
        self.idle_of[cpu] = slot;
        self.current[cpu] = slot;
        Some((cpu, slot))
    }

    /// CPUs added so far (the boot CPU included).
    pub fn cpus(&self) -> usize {
        self.cpus
    }

    /// The slot on `cpu`.
    pub fn current(&self, cpu: usize) -> usize {
        self.current[cpu]
    }

    /// Whether `cpu` runs its idle thread.
    pub fn is_idle(&self, cpu: usize) -> bool {
        self.idle[self.current[cpu]]
    }

    /// Whether `slot` is an idle thread.
    pub fn is_idle_slot(&self, slot: usize) -> bool {
        self.idle[slot]
    }

    /// The CPU `slot` runs on, if it is running.
    pub fn cpu_of(&self, slot: usize) -> Option<usize> {
        (0..self.cpus).find(|&cpu| self.current[cpu] == slot && self.state[slot] == State::Running)
    }

    /// The state of `slot`.
    pub fn state(&self, slot: usize) -> State {
        self.state[slot]
    }

    /// Context switches so far.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// Whether a thread other than the running ones waits in the queue that
    /// may run on `cpu`.
    pub fn has_ready(&self, cpu: usize) -> bool {
        self.find_ready(cpu).is_some()
    }

    /// Lets `slot` run only on the CPUs of `mask` (bit `n` = CPU `n`);
    /// with `reserve`, the one CPU of `mask` runs no other thread while
    /// `slot` lives. A mask naming no CPU, or a reservation of a mask that
    /// is not one CPU, is refused (`false`).
    pub fn set_affinity(&mut self, slot: usize, mask: u64, reserve: bool) -> bool {
        let cpus_mask = if self.cpus >= 64 {
            u64::MAX
        } else {
            (1 << self.cpus) - 1
        };
        let reserved = self
            .reserves
            .iter()
            .enumerate()
            .filter(|&(owner, r)| r.is_some() && owner != slot)
            .count();
        // A reservation must leave a CPU for everyone else.
        let room = reserved + 1 < self.cpus;
        if mask & cpus_mask == 0
            || (reserve && (mask.count_ones() != 1 || !room))
            || self.idle[slot]
            || self.state[slot] == State::Free
        {
            return false;
        }
        self.affinity[slot] = mask;
        self.reserves[slot] = reserve.then(|| mask.trailing_zeros() as u8);
        true
    }

    /// Holds the CPUs of `mask` (they run only their idle threads from
    /// their next switch on) and releases the others. The boot CPU is never
    /// held. A thread whose affinity names only held CPUs runs on the others.
    pub fn hold(&mut self, mask: u64) {
        self.held = mask & !1;
    }

    /// The held CPUs.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Puts a new thread in a free slot and queues it; `None` when full.
    pub fn spawn(&mut self, ctx: C) -> Option<usize> {
        let slot = self.state.iter().position(|s| *s == State::Free)?;
        self.ctx[slot] = ctx;
        self.affinity[slot] = ANY_CPU;
        self.reserves[slot] = None;
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

    /// How many threads are blocked on `key` now.
    pub fn blocked_on(&self, key: usize) -> usize {
        self.state
            .iter()
            .filter(|&&s| s == State::Blocked { key })
            .count()
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

    /// Saves the context of the thread running on `cpu`, records why it
    /// stops, and returns the context of the thread to run next there
    /// (possibly the same one).
    pub fn switch(&mut self, cpu: usize, saved: C, why: Why, now: u64) -> C {
        let prev = self.current[cpu];
        self.ctx[prev] = saved;
        // Sleepers whose time came queue ahead of a thread that yields now.
        self.wake_sleepers(now);
        match why {
            // An idle thread never waits and is never queued.
            _ if self.idle[prev] => self.state[prev] = State::Ready,
            Why::Preempt | Why::Yield => self.make_ready(prev),
            Why::Sleep(until) if until <= now => self.make_ready(prev),
            Why::Sleep(until) => self.state[prev] = State::Sleeping { until },
            Why::Block(key) => self.state[prev] = State::Blocked { key },
            Why::Exit => {
                self.state[prev] = State::Exited;
                self.reserves[prev] = None;
            }
        }
        let next = self.pop_ready(cpu).unwrap_or(self.idle_of[cpu]);
        self.state[next] = State::Running;
        self.current[cpu] = next;
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

    /// Whether `slot` may run on `cpu` now: held CPUs run nothing; a
    /// reserved CPU runs only the thread that reserved it; a thread whose
    /// CPUs are all held or reserved by others runs anywhere else (a
    /// reservation never starves a thread pinned to that CPU).
    fn may_run(&self, slot: usize, cpu: usize) -> bool {
        let bit = 1u64 << cpu;
        let closed = self.held | self.reserved_by_others(slot);
        if closed & bit != 0 {
            return false;
        }
        let usable = self.affinity[slot] & !closed;
        usable & bit != 0 || usable == 0
    }

    /// The CPUs reserved by live threads other than `slot`.
    fn reserved_by_others(&self, slot: usize) -> u64 {
        self.reserves
            .iter()
            .enumerate()
            .filter(|&(owner, _)| owner != slot && self.state[owner] != State::Free)
            .filter_map(|(_, r)| r.map(|cpu| 1u64 << cpu))
            .fold(0, |mask, bit| mask | bit)
    }

    fn find_ready(&self, cpu: usize) -> Option<usize> {
        (0..self.ready_len).find(|&i| {
            let slot = self.ready[(self.ready_head + i) % MAX_THREADS] as usize;
            self.may_run(slot, cpu)
        })
    }

    fn pop_ready(&mut self, cpu: usize) -> Option<usize> {
        let found = self.find_ready(cpu)?;
        let at = |i: usize| (self.ready_head + i) % MAX_THREADS;
        let slot = self.ready[at(found)] as usize;
        // Close the gap: shift the entries ahead of it one place back.
        for i in (0..found).rev() {
            self.ready[at(i + 1)] = self.ready[at(i)];
        }
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
        assert_eq!(q.switch(0, 0, Why::Block(7), 0), 1);
        assert_eq!(q.current(0), a);
        assert_eq!(
            q.switch(0, 1, Why::Sleep(50), 10),
            100,
            "idle when all wait"
        );
        assert_eq!(
            q.switch(0, 100, Why::Preempt, 20),
            100,
            "idle keeps the CPU"
        );
        assert_eq!((q.blocked_on(7), q.blocked_on(8)), (1, 0));
        assert_eq!(q.wake(7), 1);
        assert_eq!(q.blocked_on(7), 0);
        assert_eq!(
            q.switch(0, 100, Why::Preempt, 30),
            0,
            "woken boot thread runs"
        );
        assert_eq!(
            q.switch(0, 0, Why::Yield, 60),
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
        assert_eq!(q.switch(0, 0, Why::Yield, 0), 1);
        assert_eq!(q.switch(0, 1, Why::Block(9), 0), 2, "a waits for a device");
        assert_eq!(q.current(0), b);
        assert_eq!(q.wake_first(9), 1);
        assert_eq!(
            q.switch(0, 2, Why::Preempt, 1),
            1,
            "a runs ahead of c and boot"
        );
        assert_eq!(q.current(0), a);
        assert_eq!(
            q.switch(0, 1, Why::Preempt, 2),
            3,
            "then the queue in order"
        );
        assert_eq!(q.current(0), c);
        assert_eq!(q.wake_first(9), 0, "nothing blocked");
    }

    #[test]
    fn exited_threads_wait_for_reaping() {
        let mut q: RunQueue<u32> = RunQueue::new(100);
        let a = q.spawn(1).unwrap();
        q.switch(0, 0, Why::Yield, 0);
        assert_eq!(q.reap(a), Err(NotExited(a, State::Running)));
        q.switch(0, 1, Why::Exit, 0);
        assert_eq!(q.state(a), State::Exited);
        assert_eq!(q.reap(a), Ok(()));
        assert_eq!(q.spawn(2), Some(a), "slot reused");
    }

    #[test]
    fn each_cpu_runs_its_own_thread_and_idles_alone() {
        let mut q: RunQueue<u32> = RunQueue::new(100);
        assert_eq!(q.add_cpu(), Some((1, 2)), "CPU 1 idles in slot 2");
        assert!(q.is_idle(1));
        let a = q.spawn(3).unwrap();
        assert_eq!(q.switch(1, 200, Why::Preempt, 0), 3, "CPU 1 takes a");
        assert_eq!(q.cpu_of(a), Some(1));
        assert_eq!(q.switch(0, 0, Why::Block(5), 0), 100, "CPU 0 idles");
        assert_eq!(q.state(IDLE_SLOT), State::Running);
        assert_eq!(q.switch(1, 3, Why::Yield, 0), 3, "a keeps CPU 1");
        assert_eq!(q.wake(5), 1);
        assert_eq!(q.switch(0, 100, Why::Preempt, 0), 0, "boot back on CPU 0");
        assert_eq!(q.switch(1, 3, Why::Sleep(9), 0), 200, "CPU 1 idles");
    }

    #[test]
    fn affinity_reservation_and_holding() {
        let mut q: RunQueue<u32> = RunQueue::new(100);
        q.add_cpu().unwrap();
        let a = q.spawn(3).unwrap();
        let b = q.spawn(4).unwrap();
        assert!(!q.set_affinity(a, 1 << 5, false), "no CPU 5");
        assert!(!q.set_affinity(a, 0b11, true), "a reservation is one CPU");
        assert!(q.set_affinity(a, 1 << 1, true));
        assert_eq!(q.switch(0, 0, Why::Yield, 0), 4, "CPU 0 skips a for b");
        assert_eq!(q.cpu_of(b), Some(0));
        assert_eq!(q.switch(1, 200, Why::Yield, 0), 3, "a runs on CPU 1");
        assert_eq!(q.switch(1, 3, Why::Block(1), 0), 200, "CPU 1 is a's alone");
        assert!(!q.has_ready(1), "the boot thread may not use a's CPU");
        assert!(q.set_affinity(b, 1 << 1, false), "b pinned to a's CPU");
        assert_eq!(q.switch(0, 4, Why::Yield, 0), 0);
        assert_eq!(q.switch(0, 0, Why::Yield, 0), 4, "b runs beside it");
        assert!(q.set_affinity(b, ANY_CPU, false));
        assert_eq!(q.switch(0, 4, Why::Yield, 0), 0);
        q.hold(0b10);
        q.wake(1);
        assert_eq!(q.switch(1, 200, Why::Preempt, 0), 200, "held CPU idles");
        assert_eq!(q.switch(0, 0, Why::Yield, 0), 4, "b first, in order");
        assert_eq!(q.switch(0, 4, Why::Yield, 0), 3, "a runs where it can");
        q.hold(0);
        assert_eq!(q.switch(0, 3, Why::Exit, 0), 0);
        assert_eq!(q.reap(a), Ok(()));
        assert_eq!(q.switch(1, 200, Why::Preempt, 0), 4, "reservation gone");
        assert_eq!(q.cpus(), 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Spawn,
        Switch(u8),
        Wake(u8),
        Advance(u8),
        Reap(u8),
        AddCpu,
        Pin(u8, u8),
        Hold(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => Just(Op::Spawn),
            6 => any::<u8>().prop_map(Op::Switch),
            2 => any::<u8>().prop_map(Op::Wake),
            2 => any::<u8>().prop_map(Op::Advance),
            1 => any::<u8>().prop_map(Op::Reap),
            1 => Just(Op::AddCpu),
            1 => (any::<u8>(), any::<u8>()).prop_map(|(s, c)| Op::Pin(s, c)),
            1 => any::<u8>().prop_map(Op::Hold),
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
                    Op::AddCpu => { q.add_cpu(); }
                    Op::Pin(s, c) => {
                        let slot = usize::from(s) % MAX_THREADS;
                        q.set_affinity(slot, 1 << (c % 4), c & 0x80 != 0);
                    }
                    Op::Hold(m) => q.hold(u64::from(m)),
                    Op::Switch(r) => {
                        let cpu = usize::from(r / 5) % q.cpus();
                        let cur = q.current(cpu);
                        let why = match r % 5 {
                            0 => Why::Preempt,
                            1 => Why::Yield,
                            2 => Why::Sleep(now + u64::from(r % 7)),
                            3 => Why::Block(usize::from(r % 3)),
                            _ if cur > IDLE_SLOT => Why::Exit,
                            _ => Why::Yield,
                        };
                        let ahead = q.ready_len;
                        let next = q.switch(cpu, cur, why, now);
                        prop_assert_eq!(next, q.current(cpu), "context belongs to the chosen slot");
                        // The bound holds for one CPU; affinities bend it on more.
                        for (slot, waited) in waited.iter_mut().enumerate() {
                            if q.state(slot) == State::Ready && !q.is_idle_slot(slot) && q.cpus() == 1 {
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
                let mut on_cpus: Vec<usize> = (0..q.cpus()).map(|c| q.current(c)).collect();
                on_cpus.sort_unstable();
                prop_assert_eq!(running, on_cpus, "each CPU runs one thread, each running thread one CPU");
                let queued: Vec<usize> = (0..q.ready_len)
                    .map(|i| q.ready[(q.ready_head + i) % MAX_THREADS] as usize)
                    .collect();
                let mut sorted = queued.clone();
                sorted.sort_unstable();
                sorted.dedup();
                prop_assert_eq!(sorted.len(), queued.len(), "a slot queued twice");
                for slot in 0..MAX_THREADS {
                    let should = q.state(slot) == State::Ready && !q.is_idle_slot(slot);
                    prop_assert_eq!(queued.contains(&slot), should, "slot {}", slot);
                }
            }
        }
    }
}
