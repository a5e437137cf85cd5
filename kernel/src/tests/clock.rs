use crate::arch::pit::{self, PIT_HZ};
use crate::clock;

/// The TSC clock, calibrated on 10 ms PIT windows, measures independent
/// 40 ms PIT windows within 2 % (median of five).
pub fn tsc_agrees_with_pit() {
    const TICKS: u16 = 50_000; // ~41.9 ms, inside the 16-bit counter
    let expected_ns = u64::from(TICKS) * 1_000_000_000 / PIT_HZ;
    let mut measured = [0u64; 5];
    for m in &mut measured {
        *m = clock::cycles_to_ns(pit::measure_tsc(TICKS));
    }
    measured.sort_unstable();
    let median = measured[2];
    let error_ppm = median.abs_diff(expected_ns) * 1_000_000 / expected_ns;
    crate::log!(
        "PIT window {expected_ns} ns, TSC says {median} ns ({error_ppm} ppm off), tsc {} Hz",
        clock::tsc_hz()
    );
    assert!(
        error_ppm < 20_000,
        "TSC and PIT disagree by {error_ppm} ppm: {measured:?}"
    );
}

/// The local APIC timer, calibrated against the TSC, ticks at its rate.
pub fn timer_ticks_at_its_rate() {
    let (t0, n0) = (clock::now_ns(), crate::thread::ticks());
    crate::thread::sleep_ns(200_000_000);
    let (t1, n1) = (clock::now_ns(), crate::thread::ticks());
    let hz = (n1 - n0) * 1_000_000_000 / (t1 - t0);
    crate::log!(
        "timer: {} ticks in {} us = {hz} Hz",
        n1 - n0,
        (t1 - t0) / 1000
    );
    let want = crate::arch::apic::tick_hz();
    assert!(
        (want * 8 / 10..=want * 12 / 10).contains(&hz),
        "timer runs at {hz} Hz, not {want}"
    );
}
