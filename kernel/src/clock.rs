//! Time: the TSC, calibrated at boot against the PIT, in nanoseconds.
//!
//! Calibration runs several PIT windows of 10 ms (11932 ticks, well under the
//! counter's 16-bit limit) and keeps the median, so one window disturbed by
//! the host does not skew the clock. `now_ns` is a multiply and a shift.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::cpu::rdtsc;
use crate::arch::pit::{self, PIT_HZ};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC cycle, as a 32.32 fixed-point number.
static NS_PER_CYCLE: AtomicU64 = AtomicU64::new(0);

/// PIT ticks in one calibration window (10 ms).
pub const WINDOW_TICKS: u16 = 11_932;
const WINDOWS: usize = 5;

/// Measures the TSC against the PIT; returns its frequency in Hz.
pub fn calibrate() -> u64 {
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
    let mut samples = [0u64; WINDOWS];
    for sample in &mut samples {
        *sample = pit::measure_tsc(WINDOW_TICKS);
    }
    samples.sort_unstable();
    let hz = samples[WINDOWS / 2] * PIT_HZ / u64::from(WINDOW_TICKS);
    TSC_HZ.store(hz, Ordering::Relaxed);
    NS_PER_CYCLE.store(
        (1_000_000_000u128 << 32).div_euclid(u128::from(hz)) as u64,
        Ordering::Relaxed,
    );
    hz
}

/// The calibrated TSC frequency (0 before [`calibrate`]).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Converts TSC cycles to nanoseconds.
pub fn cycles_to_ns(cycles: u64) -> u64 {
    ((u128::from(cycles) * u128::from(NS_PER_CYCLE.load(Ordering::Relaxed))) >> 32) as u64
}

/// Nanoseconds since boot.
pub fn now_ns() -> u64 {
    cycles_to_ns(rdtsc().wrapping_sub(TSC_AT_BOOT.load(Ordering::Relaxed)))
}

/// Busy-waits for `ns` nanoseconds (only before the scheduler runs, or in
/// tests that mean to burn CPU).
pub fn spin_for(ns: u64) {
    let end = now_ns() + ns;
    while now_ns() < end {
        core::hint::spin_loop();
    }
}
