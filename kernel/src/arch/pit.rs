//! The 8254 programmable interval timer, used only as a reference clock to
//! calibrate the TSC: channel 2, gated through port 0x61, counted down once.

use super::cpu::{inb, outb, rdtsc};

/// The PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;

const CHANNEL2: u16 = 0x42;
const COMMAND: u16 = 0x43;
const GATE_PORT: u16 = 0x61;
const GATE: u8 = 1 << 0;
const SPEAKER: u8 = 1 << 1;
const OUT2: u8 = 1 << 5;

/// TSC cycles one PIT window took, bracketed: the window started and ended
/// somewhere the TSC could not see exactly, so it lasted at least `min` and
/// at most `max` cycles. A host that descheduled the CPU at either edge
/// shows as a wide bracket, which a caller can reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Cycles certainly inside the window.
    pub min: u64,
    /// Cycles that certainly cover it.
    pub max: u64,
}

impl Window {
    /// The middle of the bracket.
    pub fn cycles(&self) -> u64 {
        self.min + (self.max - self.min) / 2
    }

    /// Whether the bracket is within `1 / parts` of the window.
    pub fn is_sharp(&self, parts: u64) -> bool {
        (self.max - self.min) * parts <= self.min
    }
}

/// Counts `ticks` PIT ticks (at most 65535: one window of the 16-bit
/// counter, about 55 ms) on channel 2 and brackets the TSC cycles it took.
pub fn measure_tsc(ticks: u16) -> Window {
    let port = inb(GATE_PORT) & !(GATE | SPEAKER);
    outb(GATE_PORT, port); // gate low: the counter holds
    outb(COMMAND, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
    outb(CHANNEL2, ticks as u8);
    outb(CHANNEL2, (ticks >> 8) as u8);
    let before_start = rdtsc();
    outb(GATE_PORT, port | GATE); // gate high: count down from here
    let after_start = rdtsc();
    // The output went high between the read before the last low one and
    // the end of the first high one.
    let mut before_low_read = after_start;
    loop {
        let before_read = rdtsc();
        if inb(GATE_PORT) & OUT2 != 0 {
            break;
        }
        before_low_read = before_read;
        core::hint::spin_loop();
    }
    let after_high_read = rdtsc();
    outb(GATE_PORT, port);
    Window {
        min: before_low_read.saturating_sub(after_start),
        max: after_high_read - before_start,
    }
}
