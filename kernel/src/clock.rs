//! Time: the TSC, calibrated at boot against the PIT, in nanoseconds.
//!
//! Calibration runs PIT windows of 10 ms (11932 ticks, well under the
//! counter's 16-bit limit) and keeps the median of the sharp ones: windows
//! whose edges the TSC saw to within 0.1 %. A busy host that deschedules
//! the virtual CPU at an edge makes that window blurred, never the clock
//! wrong. On a host busy enough that one window in sixty comes out sharp
//! it keeps measuring until one does, and only if none of [`MAX_TRIES`]
//! does it settle for the sharpest (whose middle was 31 % off in one such
//! run). `now_ns` is a multiply and a shift.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::cpu::rdtsc;
use crate::arch::pit::{self, PIT_HZ};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC cycle, as a 32.32 fixed-point number.
static NS_PER_CYCLE: AtomicU64 = AtomicU64::new(0);

/// PIT ticks in one calibration window (10 ms).
pub const WINDOW_TICKS: u16 = 11_932;
/// Sharp windows calibration wants.
const WINDOWS: usize = 5;
/// Windows it measures to find them, if it has found one by then.
const TRIES: usize = 60;
/// Windows it measures at most while it has found none (10 s).
const MAX_TRIES: usize = 1000;
/// A window is sharp when its edges blur it by at most 1 / `SHARP`.
pub const SHARP: u64 = 1000;

/// Measures the TSC against the PIT; returns its frequency in Hz.
pub fn calibrate() -> u64 {
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
    let mut sharp = [0u64; WINDOWS];
    let mut found = 0;
    let mut sharpest: Option<pit::Window> = None;
    for tried in 0..MAX_TRIES {
        if tried >= TRIES && found > 0 {
            break;
        }
        let w = pit::measure_tsc(WINDOW_TICKS);
        if w.is_sharp(SHARP) {
            sharp[found] = w.cycles();
            found += 1;
            if found == WINDOWS {
                break;
            }
        } else if sharpest.is_none_or(|s| w.max - w.min < s.max - s.min) {
            sharpest = Some(w);
        }
    }
    let cycles = if found > 0 {
        let sharp = &mut sharp[..found];
        sharp.sort_unstable();
        sharp[found / 2]
    } else {
        sharpest.map_or(0, |w| w.cycles())
    };
    let hz = cycles * PIT_HZ / u64::from(WINDOW_TICKS);
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
