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

/// Counts `ticks` PIT ticks (at most 65535: one window of the 16-bit
/// counter, about 55 ms) on channel 2 and returns the TSC cycles it took.
pub fn measure_tsc(ticks: u16) -> u64 {
    let port = inb(GATE_PORT) & !(GATE | SPEAKER);
    outb(GATE_PORT, port); // gate low: the counter holds
    outb(COMMAND, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
    outb(CHANNEL2, ticks as u8);
    outb(CHANNEL2, (ticks >> 8) as u8);
    outb(GATE_PORT, port | GATE); // gate high: count down from here
    let start = rdtsc();
    while inb(GATE_PORT) & OUT2 == 0 {
        core::hint::spin_loop();
    }
    let end = rdtsc();
    outb(GATE_PORT, port);
    end - start
}
