//! Kernel threads: spawn, yield, sleep, block/wake, join. Preemptive, on one
//! CPU, round robin with a time slice of a few timer ticks.
//!
//! The policy is [`snapshot::policy::sched::RunQueue`]; this module supplies
//! contexts (saved [`TrapFrame`] addresses), stacks, and the two entry
//! points the trap path calls: [`on_timer`] (preemption) and [`on_yield`]
//! (a thread giving up the CPU through `int 0x21`). Both run with
//! interrupts off and never allocate or block.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapshot::policy::sched::{RunQueue, Why, BOOT_SLOT, IDLE_SLOT, MAX_THREADS};

use crate::arch::trap::{raise_yield, yield_kind, TrapFrame};
use crate::memory::stacks::{KernelStack, StackError};
use crate::sync::{IrqMutex, IrqOff};

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
    ticks_in_slice: u64,
    /// A device interrupt woke a thread that should run at once.
    wake_preempt: bool,
}

static SCHED: IrqMutex<Option<Scheduler>> = IrqMutex::new(None);
static TICKS: AtomicU64 = AtomicU64::new(0);

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
    *SCHED.lock() = Some(Scheduler {
        queue: RunQueue::new(idle_ctx),
        threads,
        quantum_ticks: quantum_ticks.max(1),
        ticks_in_slice: 0,
        wake_preempt: false,
    });
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
    // The entry's wrapper left interrupts off, so nothing runs between its
    // wake-up of the joiner and this exit.
    raise_yield(yield_kind::EXIT, 0);
    unreachable!("an exited thread was resumed");
}

/// Timer ticks since the timer started.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// The timer interrupt: wake sleepers, end the slice if it is used up.
pub fn on_timer(frame: &mut TrapFrame) -> *mut TrapFrame {
    TICKS.fetch_add(1, Ordering::Relaxed);
    let mut guard = SCHED.lock();
    let Some(s) = guard.as_mut() else {
        return frame;
    };
    let now = crate::clock::now_ns();
    s.queue.wake_sleepers(now);
    s.ticks_in_slice += 1;
    let slice_over = s.ticks_in_slice >= s.quantum_ticks;
    preempt_if(s, frame, slice_over, now)
}

/// After a device interrupt: if the handler woke a thread with
/// [`wake_all_now`] (or the CPU was idle and it woke any), run it now
/// rather than after the running thread's time slice.
pub fn after_device_interrupt(frame: &mut TrapFrame) -> *mut TrapFrame {
    let mut guard = SCHED.lock();
    let Some(s) = guard.as_mut() else {
        return frame;
    };
    let urgent = core::mem::take(&mut s.wake_preempt);
    preempt_if(s, frame, urgent, crate::clock::now_ns())
}

/// Switches to a ready thread if the CPU idles or `slice_over`; returns
/// the frame to resume.
fn preempt_if(
    s: &mut Scheduler,
    frame: &mut TrapFrame,
    slice_over: bool,
    now: u64,
) -> *mut TrapFrame {
    let idle = s.queue.current() == IDLE_SLOT;
    if s.queue.has_ready() && (slice_over || idle) {
        s.ticks_in_slice = 0;
        return s
            .queue
            .switch(frame as *mut TrapFrame as u64, Why::Preempt, now)
            as *mut TrapFrame;
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
    let mut guard = SCHED.lock();
    let s = guard.as_mut().expect("yield before thread::init");
    s.ticks_in_slice = 0;
    s.queue
        .switch(frame as *mut TrapFrame as u64, why, crate::clock::now_ns()) as *mut TrapFrame
}

/// Blocks the thread a write fault interrupted until [`wake_all`] with
/// `key`, and returns its slot and the frame to resume instead (another
/// thread's). When the thread runs again it re-executes the faulting write.
///
/// The fault's frame sits on the page-fault handler's own stack, which the
/// next fault reuses, so it is first moved onto the thread's stack
/// ([`crate::memory::stacks::move_below_rsp`]). Returns `None`, and the caller
/// must not wait, if the interrupted code had interrupts off (it may hold a
/// lock, or be an interrupt handler), is the idle thread or a thread that
/// called [`forbid_fault_waits`], or if its stack has no room.
///
/// The caller checks the condition it waits for and calls this with
/// interrupts still off, so no wake-up is lost.
pub fn block_faulting(frame: &TrapFrame, key: usize) -> Option<(usize, *mut TrapFrame)> {
    const IF: u64 = 1 << 9;
    if frame.rflags & IF == 0 {
        return None;
    }
    let mut guard = SCHED.try_lock()?;
    let s = guard.as_mut()?;
    let current = s.queue.current();
    if !s.threads[current].as_ref().is_some_and(|t| t.fault_waits) {
        return None;
    }
    let moved = crate::memory::stacks::move_below_rsp(frame)?;
    s.ticks_in_slice = 0;
    let next = s
        .queue
        .switch(moved, Why::Block(key), crate::clock::now_ns());
    Some((current, next as *mut TrapFrame))
}

/// The running thread's slot, or `None` if the scheduler is busy (safe to
/// call from a fault handler: it never waits for the lock).
pub fn current_slot() -> Option<usize> {
    SCHED.try_lock()?.as_ref().map(|s| s.queue.current())
}

/// Makes write faults in the calling thread never wait (they take the
/// snapshot's staging reserve): for the thread that frees staging.
pub fn forbid_fault_waits() {
    with(|s| {
        let current = s.queue.current();
        if let Some(t) = s.threads[current].as_mut() {
            t.fault_waits = false;
        }
    });
}

/// Lets other ready threads run.
pub fn yield_now() {
    raise_yield(yield_kind::YIELD, 0);
}

/// Sleeps for at least `ns` nanoseconds (timer-tick granularity).
pub fn sleep_ns(ns: u64) {
    raise_yield(yield_kind::SLEEP, crate::clock::now_ns() + ns);
}

/// Blocks until `ready()` holds. `ready` is checked with interrupts off, and
/// whoever makes it true must then call [`wake_all`] with the same `key`.
pub fn block_until(key: usize, mut ready: impl FnMut() -> bool) {
    loop {
        let _irq = IrqOff::new();
        if ready() {
            return;
        }
        raise_yield(yield_kind::BLOCK, key as u64);
    }
}

/// Wakes every thread blocked on `key`; returns how many.
pub fn wake_all(key: usize) -> usize {
    with(|s| s.queue.wake(key))
}

/// For device interrupt handlers: wakes every thread blocked on `key` and
/// runs them as soon as the handler returns, ahead of the ready queue (an
/// I/O completion should not wait out CPU-bound threads' time slices).
pub fn wake_all_now(key: usize) -> usize {
    with(|s| {
        let woken = s.queue.wake_first(key);
        s.wake_preempt |= woken > 0;
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
        // Stays off until the exit switch (see thread_entry).
        x86_64::instructions::interrupts::disable();
        theirs.done.store(true, Ordering::Release);
        wake_all(Arc::as_ptr(&theirs) as usize);
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
        let key = Arc::as_ptr(&self.packet) as usize;
        block_until(key, || self.packet.done.load(Ordering::Acquire));
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
                s.queue.state(self.slot) == snapshot::policy::sched::State::Exited
            });
            if exited {
                release(self.slot);
            }
        }
    }
}

/// Frees an exited thread's slot; its stack is unmapped outside the lock.
fn release(slot: usize) {
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
            s.queue.state(i) == snapshot::policy::sched::State::Exited
                && s.threads[i].as_ref().is_some_and(|t| t.detached)
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
            let slot = s.queue.current();
            let name = s.threads[slot]
                .as_ref()
                .map_or("<unnamed>", |t| t.name.as_str());
            write!(out, "{name} (slot {slot})")
        }
        None => out.write_str("<boot, before the scheduler>"),
    }
}
