//! Kernel threads: spawn, yield, sleep, block/wake, join, affinity.
//! Preemptive, on every CPU, round robin over one shared ready queue with a
//! time slice of a few timer ticks.
//!
//! The policy is [`snapshot::policy::sched::RunQueue`]; this module supplies
//! contexts (saved [`TrapFrame`] addresses), stacks, and the entry points
//! the trap path calls: [`on_timer`] (preemption) and [`on_yield`] (a thread
//! giving up the CPU through `int 0x21`). Both run with interrupts off and
//! never allocate or block.
//!
//! Three rules make the one queue safe on several CPUs:
//! - a thread's stack is in use from the moment a CPU picks it until that
//!   CPU's trap path has left it ([`ON_CPU`]); another CPU resumes it, or
//!   frees it, only after;
//! - a block is refused if any wake-up happened since the blocking thread
//!   read the wake-up count ([`WAKES`]), so a wake-up from another CPU
//!   between the test of a condition and the block is never lost;
//! - a joiner waits for the scheduler's own `Exited` state, set by the exit
//!   switch, not for a flag the exiting thread sets before it.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapshot::policy::sched::{RunQueue, State, Why, BOOT_SLOT, IDLE_SLOT, MAX_CPUS, MAX_THREADS};

use crate::arch::percpu;
use crate::arch::trap::{raise_yield, yield_kind, TrapFrame};

mod cpus;
use crate::memory::stacks::{KernelStack, StackError};
use crate::sync::{IrqMutex, IrqOff};
pub use cpus::{cpus, current_cpu, hold_others, set_affinity, take_own_cpu, OthersHeld};

/// Default stack size for new threads.
pub const DEFAULT_STACK: u64 = 64 * 1024;

struct ThreadInfo {
    name: String,
    /// Owned here so the stack is unmapped when the slot is released.
    _stack: Option<KernelStack>,
    entry: Option<Box<dyn FnOnce() + Send>>,
    detached: bool,
    /// Whether a write fault may block this thread (see [`block_faulting`]).
    fault_waits: bool,
}

struct Scheduler {
    queue: RunQueue<u64>,
    threads: [Option<ThreadInfo>; MAX_THREADS],
    quantum_ticks: u64,
    ticks_in_slice: [u64; MAX_CPUS],
    /// A device interrupt on that CPU woke a thread that should run at once.
    wake_preempt: [bool; MAX_CPUS],
    /// Live [`OthersHeld`] guards.
    holds: usize,
}

static SCHED: IrqMutex<Option<Scheduler>> = IrqMutex::new(None);
static TICKS: AtomicU64 = AtomicU64::new(0);
/// Per thread slot: a CPU runs on the thread's stack (from the switch that
/// picks the thread until the trap path has left the stack again).
static ON_CPU: [AtomicBool; MAX_THREADS] = [const { AtomicBool::new(false) }; MAX_THREADS];
/// Wake-up calls so far; see the module doc.
static WAKES: AtomicU64 = AtomicU64::new(0);
/// One byte per slot whose address is the key joiners of that slot wait on.
static EXIT_KEYS: [u8; MAX_THREADS] = [0; MAX_THREADS];

fn exit_key(slot: usize) -> usize {
    (&raw const EXIT_KEYS[slot]) as usize
}

fn with<R>(f: impl FnOnce(&mut Scheduler) -> R) -> R {
    f(SCHED
        .lock()
        .as_mut()
        .expect("scheduler used before thread::init"))
}

/// Makes the running code the `main` thread and creates the idle thread.
/// Preemption starts when the timer does.
pub fn init(quantum_ticks: u64) {
    let mut idle_stack = KernelStack::new(16 * 1024).expect("no memory for the idle stack");
    let idle_ctx =
        idle_stack.push_initial_frame(TrapFrame::new_thread(idle_entry, 0, idle_stack.top()));
    let mut threads = [const { None }; MAX_THREADS];
    threads[BOOT_SLOT] = Some(ThreadInfo {
        name: String::from("main"),
        _stack: None,
        entry: None,
        detached: false,
        fault_waits: true,
    });
    threads[IDLE_SLOT] = Some(ThreadInfo {
        name: String::from("idle"),
        _stack: Some(idle_stack),
        entry: None,
        detached: true,
        fault_waits: false,
    });
    ON_CPU[BOOT_SLOT].store(true, Ordering::Release);
    *SCHED.lock() = Some(Scheduler {
        queue: RunQueue::new(idle_ctx),
        threads,
        quantum_ticks: quantum_ticks.max(1),
        ticks_in_slice: [0; MAX_CPUS],
        wake_preempt: [false; MAX_CPUS],
        holds: 0,
    });
}

/// Adds the next CPU to the scheduler, its idle thread running on `stack`
/// (the code that starts the CPU runs on it and becomes that thread).
/// Returns the CPU's number, or `None` when the scheduler has no room.
pub fn add_cpu(stack: KernelStack) -> Option<usize> {
    with(|s| {
        let (cpu, slot) = s.queue.add_cpu()?;
        s.threads[slot] = Some(ThreadInfo {
            name: alloc::format!("idle{cpu}"),
            _stack: Some(stack),
            entry: None,
            detached: true,
            fault_waits: false,
        });
        ON_CPU[slot].store(true, Ordering::Release);
        Some(cpu)
    })
}

/// Switches `cpu` from the thread whose context `frame` is to the one the
/// policy picks; returns the frame to resume.
fn switch(s: &mut Scheduler, cpu: usize, frame: u64, why: Why, now: u64) -> *mut TrapFrame {
    let prev = s.queue.current(cpu);
    let next_ctx = s.queue.switch(cpu, frame, why, now);
    let next = s.queue.current(cpu);
    if next != prev {
        // The CPU that last ran `next` may still be leaving its stack.
        while ON_CPU[next].swap(true, Ordering::AcqRel) {
            core::hint::spin_loop();
        }
        percpu::release_after_switch(&ON_CPU[prev]);
    }
    next_ctx as *mut TrapFrame
}

extern "C" fn idle_entry(_: u64) -> ! {
    loop {
        crate::arch::cpu::enable_interrupts_and_halt();
    }
}

extern "C" fn thread_entry(slot: u64) -> ! {
    let entry = with(|s| {
        s.threads[slot as usize]
            .as_mut()
            .and_then(|t| t.entry.take())
    });
    entry.expect("thread started without an entry")();
    // The exit switch wakes the joiner (see `on_yield`).
    raise_yield(yield_kind::EXIT, 0, 0);
    unreachable!("an exited thread was resumed");
}

/// The boot CPU's timer ticks since its timer started.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// The timer interrupt: wake sleepers, end the slice if it is used up.
pub fn on_timer(frame: &mut TrapFrame) -> *mut TrapFrame {
    let cpu = percpu::index();
    if cpu == 0 {
        TICKS.fetch_add(1, Ordering::Relaxed);
    }
    let mut guard = SCHED.lock();
    let Some(s) = guard.as_mut() else {
        return frame;
    };
    let now = crate::clock::now_ns();
    if s.queue.wake_sleepers(now) > 0 {
        kick_idle_cpus(s, cpu);
    }
    s.ticks_in_slice[cpu] += 1;
    let slice_over = s.ticks_in_slice[cpu] >= s.quantum_ticks;
    preempt_if(s, cpu, frame, slice_over, now)
}

/// Sends the reschedule interrupt to every other online CPU that idles
/// while a thread waits that it may run.
fn kick_idle_cpus(s: &Scheduler, me: usize) {
    for cpu in 0..s.queue.cpus() {
        if cpu != me && percpu::is_online(cpu) && s.queue.is_idle(cpu) && s.queue.has_ready(cpu) {
            crate::arch::apic::send_ipi(percpu::apic_id(cpu), crate::arch::vectors::RESCHED_VECTOR);
        }
    }
}

/// After a device interrupt: if the handler woke a thread with
/// [`wake_all_now`] (or the CPU was idle and it woke any), run it now
/// rather than after the running thread's time slice.
pub fn after_device_interrupt(frame: &mut TrapFrame) -> *mut TrapFrame {
    let cpu = percpu::index();
    let mut guard = SCHED.lock();
    let Some(s) = guard.as_mut() else {
        return frame;
    };
    let urgent = core::mem::take(&mut s.wake_preempt[cpu]);
    preempt_if(s, cpu, frame, urgent, crate::clock::now_ns())
}

/// Switches to a ready thread if the CPU idles or `slice_over`, or to the
/// idle thread if the CPU is held; returns the frame to resume.
fn preempt_if(
    s: &mut Scheduler,
    cpu: usize,
    frame: &mut TrapFrame,
    slice_over: bool,
    now: u64,
) -> *mut TrapFrame {
    let idle = s.queue.is_idle(cpu);
    let held = s.queue.held() & (1 << cpu) != 0;
    if (s.queue.has_ready(cpu) && (slice_over || idle)) || (held && !idle) {
        s.ticks_in_slice[cpu] = 0;
        return switch(s, cpu, frame as *mut TrapFrame as u64, Why::Preempt, now);
    }
    frame
}

/// The yield interrupt: the running thread gives up the CPU.
pub fn on_yield(frame: &mut TrapFrame) -> *mut TrapFrame {
    let why = match frame.rdi {
        yield_kind::SLEEP => Why::Sleep(frame.rsi),
        yield_kind::BLOCK => Why::Block(frame.rsi as usize),
        yield_kind::EXIT => Why::Exit,
        yield_kind::YIELD => Why::Yield,
        other => panic!("unknown yield kind {other}"),
    };
    let cpu = percpu::index();
    let mut guard = SCHED.lock();
    let s = guard.as_mut().expect("yield before thread::init");
    if matches!(why, Why::Block(_)) && WAKES.load(Ordering::Acquire) != frame.rdx {
        // A wake-up came since the caller tested its condition: let it
        // test again instead of sleeping through it.
        return frame;
    }
    let prev = s.queue.current(cpu);
    s.ticks_in_slice[cpu] = 0;
    let next = switch(
        s,
        cpu,
        frame as *mut TrapFrame as u64,
        why,
        crate::clock::now_ns(),
    );
    if why == Why::Exit {
        WAKES.fetch_add(1, Ordering::AcqRel);
        s.queue.wake(exit_key(prev));
        kick_idle_cpus(s, cpu);
    }
    next
}

/// Why [`block_faulting`] did not block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotBlocked {
    /// Another CPU holds the scheduler, or a wake-up came since the
    /// caller's check: check again (and block then, if still needed). With
    /// interrupts on at the fault, the scheduler's holder is another CPU,
    /// which releases it soon; on one CPU neither happens.
    Retry,
    /// The thread cannot wait: the caller must go on without waiting.
    CannotWait,
}

/// Blocks the thread a write fault interrupted until [`wake_all`] with
/// `key`, and returns its slot and the frame to resume instead (another
/// thread's). When the thread runs again it re-executes the faulting write.
///
/// The fault's frame sits on the page-fault handler's own stack, which the
/// next fault reuses, so it is first moved onto the thread's stack
/// ([`crate::memory::stacks::move_below_rsp`]). The caller must not wait
/// ([`NotBlocked::CannotWait`]) if the interrupted code had interrupts off
/// (it may hold a lock, or be an interrupt handler), is the idle thread or
/// a thread that called [`forbid_fault_waits`], or if its stack has no
/// room.
///
/// The caller checks the condition it waits for and calls this with
/// interrupts still off, so no wake-up is lost.
pub fn block_faulting(
    frame: &TrapFrame,
    key: usize,
    seq: u64,
) -> Result<(usize, *mut TrapFrame), NotBlocked> {
    const IF: u64 = 1 << 9;
    if frame.rflags & IF == 0 {
        return Err(NotBlocked::CannotWait);
    }
    let cpu = percpu::index();
    let mut guard = SCHED.try_lock().ok_or(NotBlocked::Retry)?;
    let s = guard.as_mut().ok_or(NotBlocked::CannotWait)?;
    if WAKES.load(Ordering::Acquire) != seq {
        return Err(NotBlocked::Retry);
    }
    let current = s.queue.current(cpu);
    if !s.threads[current].as_ref().is_some_and(|t| t.fault_waits) {
        return Err(NotBlocked::CannotWait);
    }
    let moved = crate::memory::stacks::move_below_rsp(frame).ok_or(NotBlocked::CannotWait)?;
    s.ticks_in_slice[cpu] = 0;
    let next = switch(s, cpu, moved, Why::Block(key), crate::clock::now_ns());
    Ok((current, next))
}

/// The wake-up count, to read before testing a condition that a wake-up
/// announces (see [`block_faulting`]).
pub fn wake_seq() -> u64 {
    WAKES.load(Ordering::Acquire)
}

/// The running thread's slot, or `None` if the scheduler is busy (safe to
/// call from a fault handler: it never waits for the lock).
pub fn current_slot() -> Option<usize> {
    let guard = SCHED.try_lock()?;
    guard.as_ref().map(|s| s.queue.current(percpu::index()))
}

/// Makes write faults in the calling thread never wait (they take the
/// snapshot's staging reserve): for the thread that frees staging.
pub fn forbid_fault_waits() {
    with(|s| {
        let current = s.queue.current(percpu::index());
        if let Some(t) = s.threads[current].as_mut() {
            t.fault_waits = false;
        }
    });
}

/// Lets other ready threads run.
pub fn yield_now() {
    raise_yield(yield_kind::YIELD, 0, 0);
}

/// Sleeps for at least `ns` nanoseconds (timer-tick granularity).
pub fn sleep_ns(ns: u64) {
    raise_yield(yield_kind::SLEEP, crate::clock::now_ns() + ns, 0);
}

/// Blocks until `ready()` holds. `ready` is checked with interrupts off, and
/// whoever makes it true must then call [`wake_all`] with the same `key`
/// (from any CPU).
pub fn block_until(key: usize, mut ready: impl FnMut() -> bool) {
    loop {
        let _irq = IrqOff::new();
        let seq = WAKES.load(Ordering::Acquire);
        if ready() {
            return;
        }
        raise_yield(yield_kind::BLOCK, key as u64, seq);
    }
}

/// How many threads are blocked on `key` now (for tests that must know a
/// thread has really gone to sleep, whatever the host's load).
pub fn blocked_on(key: usize) -> usize {
    with(|s| s.queue.blocked_on(key))
}

/// Wakes every thread blocked on `key`; returns how many.
pub fn wake_all(key: usize) -> usize {
    with(|s| {
        WAKES.fetch_add(1, Ordering::AcqRel);
        let woken = s.queue.wake(key);
        if woken > 0 {
            kick_idle_cpus(s, percpu::index());
        }
        woken
    })
}

/// For device interrupt handlers: wakes every thread blocked on `key` and
/// runs them as soon as the handler returns, ahead of the ready queue (an
/// I/O completion should not wait out CPU-bound threads' time slices).
pub fn wake_all_now(key: usize) -> usize {
    with(|s| {
        WAKES.fetch_add(1, Ordering::AcqRel);
        let woken = s.queue.wake_first(key);
        if woken == 0 {
            return 0;
        }
        let here = percpu::index();
        // Run it where the interrupt came in if it may run there, else on
        // the first CPU that may, told by a reschedule interrupt.
        let cpu = (0..s.queue.cpus())
            .map(|i| (here + i) % s.queue.cpus())
            .find(|&c| (c == here || percpu::is_online(c)) && s.queue.has_ready(c));
        if let Some(cpu) = cpu {
            s.wake_preempt[cpu] = true;
            if cpu != here {
                crate::arch::apic::send_ipi(
                    percpu::apic_id(cpu),
                    crate::arch::vectors::RESCHED_VECTOR,
                );
            }
        }
        woken
    })
}

/// Why a thread could not be spawned.
#[derive(Debug)]
pub enum SpawnError {
    /// No stack.
    Stack(StackError),
    /// All thread slots are in use.
    TooManyThreads,
}

impl core::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SpawnError::Stack(e) => write!(f, "cannot make a thread stack: {e:?}"),
            SpawnError::TooManyThreads => write!(f, "all {MAX_THREADS} thread slots are in use"),
        }
    }
}

struct Packet<T> {
    value: IrqMutex<Option<T>>,
    done: AtomicBool,
}

/// A handle to wait for a thread and take its result.
#[must_use = "a dropped handle detaches the thread"]
pub struct JoinHandle<T> {
    slot: usize,
    packet: Arc<Packet<T>>,
    joined: bool,
}

impl<T> core::fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("JoinHandle")
            .field("slot", &self.slot)
            .finish()
    }
}

/// Starts `f` on a new thread named `name` with a stack of `stack` bytes.
pub fn spawn_with_stack<T, F>(name: &str, stack: u64, f: F) -> Result<JoinHandle<T>, SpawnError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    reap_detached();
    let mut stack = KernelStack::new(stack).map_err(SpawnError::Stack)?;
    let packet = Arc::new(Packet {
        value: IrqMutex::new(None),
        done: AtomicBool::new(false),
    });
    let theirs = packet.clone();
    let entry: Box<dyn FnOnce() + Send> = Box::new(move || {
        let value = f();
        *theirs.value.lock() = Some(value);
        theirs.done.store(true, Ordering::Release);
    });
    let name = String::from(name);
    let slot = with(|s| {
        let free = s.threads.iter().position(Option::is_none)?;
        let frame = TrapFrame::new_thread(thread_entry, free as u64, stack.top());
        let ctx = stack.push_initial_frame(frame);
        let slot = s.queue.spawn(ctx)?;
        debug_assert_eq!(slot, free, "thread table and run queue disagree");
        s.threads[slot] = Some(ThreadInfo {
            name,
            _stack: Some(stack),
            entry: Some(entry),
            detached: false,
            fault_waits: true,
        });
        Some(slot)
    })
    .ok_or(SpawnError::TooManyThreads)?;
    crate::trace!("thread.spawn", slot = slot);
    Ok(JoinHandle {
        slot,
        packet,
        joined: false,
    })
}

/// Starts `f` on a new thread with the default stack.
pub fn spawn<T, F>(name: &str, f: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    spawn_with_stack(name, DEFAULT_STACK, f).unwrap_or_else(|e| panic!("spawn {name}: {e}"))
}

impl<T> JoinHandle<T> {
    /// Waits for the thread to finish and returns its result.
    pub fn join(mut self) -> T {
        let slot = self.slot;
        block_until(exit_key(slot), || {
            with(|s| s.queue.state(slot) == State::Exited)
        });
        self.joined = true;
        release(self.slot);
        self.packet
            .value
            .lock()
            .take()
            .expect("finished thread left no value")
    }

    /// Whether the thread has finished.
    pub fn is_finished(&self) -> bool {
        self.packet.done.load(Ordering::Acquire)
    }
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        if !self.joined {
            let exited = with(|s| {
                if let Some(t) = s.threads[self.slot].as_mut() {
                    t.detached = true;
                }
                s.queue.state(self.slot) == State::Exited
            });
            if exited {
                release(self.slot);
            }
        }
    }
}

/// Frees an exited thread's slot; its stack is unmapped outside the lock,
/// once no CPU runs on it any more.
fn release(slot: usize) {
    while ON_CPU[slot].load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    let info = with(|s| {
        s.queue
            .reap(slot)
            .expect("releasing a thread that has not exited");
        s.threads[slot].take()
    });
    drop(info);
}

fn reap_detached() {
    while let Some(slot) = with(|s| {
        (0..MAX_THREADS).find(|&i| {
            s.queue.state(i) == State::Exited && s.threads[i].as_ref().is_some_and(|t| t.detached)
        })
    }) {
        release(slot);
    }
}

/// Context switches so far.
pub fn switches() -> u64 {
    with(|s| s.queue.switches())
}

/// Writes the running thread's name and slot, or a placeholder if the
/// scheduler is busy or not started. For fatal paths: it neither waits for a
/// lock nor allocates.
pub fn write_current(out: &mut dyn core::fmt::Write) -> core::fmt::Result {
    let Some(guard) = SCHED.try_lock() else {
        return out.write_str("<scheduler locked>");
    };
    match guard.as_ref() {
        Some(s) => {
            let slot = s.queue.current(percpu::index());
            let name = s.threads[slot]
                .as_ref()
                .map_or("<unnamed>", |t| t.name.as_str());
            write!(out, "{name} (slot {slot})")
        }
        None => out.write_str("<boot, before the scheduler>"),
    }
}
