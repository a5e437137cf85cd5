//! Trace records on the serial console, in the format of
//! [`snapshot::interface::trace`]: `TRACE <ns> <event> key=value ...`.
//!
//! Cheap enough for hot paths: [`record`] copies a fixed-size record into a
//! preallocated buffer under a short lock (no formatting, no allocation);
//! [`flush`] formats and prints outside the lock. A full buffer is flushed
//! by the thread that fills it; if a flush is already running (an
//! interrupt handler traced during one), the record is counted as dropped
//! and the count is reported, so nothing is lost silently. `trace=off` on
//! the command line turns recording into one relaxed atomic load.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapshot::interface::progress::Throttle;
use snapshot::interface::trace::{write_record, Fields, Value};

use crate::sync::IrqMutex;

const CAPACITY: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Record {
    ts_ns: u64,
    event: &'static str,
    fields: Fields<'static>,
}

static ENABLED: AtomicBool = AtomicBool::new(true);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static BUFFER: IrqMutex<Vec<Record>> = IrqMutex::new(Vec::new());
/// The second buffer; `None` while a flush prints from it.
static SPARE: IrqMutex<Option<Vec<Record>>> = IrqMutex::new(None);

/// Allocates both buffers; `enabled` is the level switch.
pub fn init(enabled: bool) {
    *BUFFER.lock() = Vec::with_capacity(CAPACITY);
    *SPARE.lock() = Some(Vec::with_capacity(CAPACITY));
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether records are being kept.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Records an event now. A record of more than
/// [`snapshot::interface::trace::MAX_FIELDS`] fields does not compile.
pub fn record<const N: usize>(event: &'static str, fields: &[(&'static str, Value<'static>); N]) {
    if !enabled() {
        return;
    }
    let mut record = Record {
        ts_ns: 0,
        event,
        fields: Fields::new(fields),
    };
    for _ in 0..2 {
        {
            let mut buffer = BUFFER.lock();
            if buffer.len() < buffer.capacity() {
                // Stamped under the lock (interrupts off), so the buffer's
                // order is time order even when a thread is preempted
                // between building a record and storing it.
                record.ts_ns = crate::clock::now_ns();
                buffer.push(record);
                return;
            }
        }
        if !flush() {
            break;
        }
    }
    DROPPED.fetch_add(1, Ordering::Relaxed);
}

/// Prints every buffered record. Returns false if another flush was
/// already printing (nothing was done).
pub fn flush() -> bool {
    let Some(mut printing) = SPARE.lock().take() else {
        return false;
    };
    core::mem::swap(&mut printing, &mut *BUFFER.lock());
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    crate::arch::serial::with_console(|console| {
        for r in &printing {
            let _ = write_record(console, r.ts_ns, r.event, r.fields.as_slice());
        }
        if dropped > 0 {
            let fields = [("records", Value::U64(dropped))];
            let _ = write_record(console, crate::clock::now_ns(), "trace.dropped", &fields);
        }
    });
    printing.clear();
    *SPARE.lock() = Some(printing);
    true
}

/// Prints one record now, after everything buffered, with values that
/// may borrow (a reason formatted a moment ago). For the rare records
/// that end a job; the hot paths use [`record`].
pub fn emit_now(event: &str, fields: &[(&str, Value<'_>)]) {
    flush();
    let now = crate::clock::now_ns();
    crate::arch::serial::with_console(|console| {
        let _ = write_record(console, now, event, fields);
    });
}

/// Records an event: `trace!("sched.spawn", slot = 3, name = Word("worker"))`.
/// Values convert through [`Into<Value>`]: integers, `Hex`, `Word`.
#[macro_export]
macro_rules! trace {
    ($event:literal $(, $key:ident = $value:expr)* $(,)?) => {
        if $crate::trace::enabled() {
            $crate::trace::record($event, &[$((stringify!($key), $crate::trace::value($value))),*]);
        }
    };
}

/// A field value for [`trace!`].
pub fn value(v: impl Into<TraceValue>) -> Value<'static> {
    v.into().0
}

/// Conversion target for trace field values.
#[derive(Debug)]
pub struct TraceValue(Value<'static>);

/// An address or mask, printed in hex.
#[derive(Debug, Clone, Copy)]
pub struct Hex(pub u64);

/// A word (no spaces), printed as is.
#[derive(Debug, Clone, Copy)]
pub struct Word(pub &'static str);

macro_rules! unsigned_value {
    ($($t:ty),*) => {$(
        impl From<$t> for TraceValue {
            fn from(v: $t) -> Self { TraceValue(Value::U64(v as u64)) }
        }
    )*};
}
unsigned_value!(u8, u16, u32, u64, usize);

impl From<i64> for TraceValue {
    fn from(v: i64) -> Self {
        TraceValue(Value::I64(v))
    }
}

impl From<Hex> for TraceValue {
    fn from(v: Hex) -> Self {
        TraceValue(Value::Hex(v.0))
    }
}

impl From<Word> for TraceValue {
    fn from(v: Word) -> Self {
        TraceValue(Value::Word(v.0))
    }
}

impl From<bool> for TraceValue {
    fn from(v: bool) -> Self {
        TraceValue(Value::U64(u64::from(v)))
    }
}

/// Ends `job` without its result: logs `<job> refused|failed: <reason>`
/// and emits the matching record for the host. Returns the failure code.
pub fn job_failed(
    job: &str,
    refused: bool,
    reason: &dyn core::fmt::Display,
) -> crate::arch::qemu::ExitCode {
    let reason = alloc::string::ToString::to_string(reason);
    let failure = snapshot::interface::scenario::JobFailure {
        job,
        refused,
        reason: &reason,
    };
    crate::log!("{failure}");
    emit_now(failure.event(), &failure.fields());
    crate::arch::qemu::ExitCode::Failure
}

/// A job's progress through its stages, traced as `EVENT stage= done=
/// total=` when [`Throttle`] says it is due (every 5 % of each stage, and
/// its end), and flushed at once so the host tool can show it while the
/// job runs.
#[derive(Debug)]
pub struct Progress {
    event: &'static str,
    throttle: Throttle,
}

impl Progress {
    /// No report yet; records will be named `event`.
    pub const fn new(event: &'static str) -> Self {
        Progress {
            event,
            throttle: Throttle::new(),
        }
    }

    /// `done` of `total` in `stage`.
    pub fn report(&mut self, stage: &'static str, done: u64, total: u64) {
        if self.throttle.due(stage, done, total) {
            emit_now(
                self.event,
                &[
                    ("stage", Value::Word(stage)),
                    ("done", Value::U64(done)),
                    ("total", Value::U64(total)),
                ],
            );
        }
    }
}
