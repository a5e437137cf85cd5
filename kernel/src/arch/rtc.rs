//! The CMOS real-time clock's periodic interrupt (ISA IRQ 8): a device whose
//! interrupt travels through the IOAPIC, used to test interrupt routing.

use super::cpu::{inb, outb};

const INDEX: u16 = 0x70;
const DATA: u16 = 0x71;
const NMI_OFF: u8 = 0x80;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const PERIODIC_ENABLE: u8 = 1 << 6;

fn read(reg: u8) -> u8 {
    outb(INDEX, NMI_OFF | reg);
    inb(DATA)
}

fn write(reg: u8, value: u8) {
    outb(INDEX, NMI_OFF | reg);
    outb(DATA, value);
}

/// Starts the periodic interrupt at 32768 >> (rate - 1) Hz (rate 3..=15;
/// 6 is 1024 Hz).
pub fn start_periodic(rate: u8) {
    let rate = rate.clamp(3, 15);
    write(REG_A, (read(REG_A) & 0xf0) | rate);
    write(REG_B, read(REG_B) | PERIODIC_ENABLE);
    acknowledge();
}

/// Stops the periodic interrupt.
pub fn stop_periodic() {
    write(REG_B, read(REG_B) & !PERIODIC_ENABLE);
    acknowledge();
}

/// Acknowledges an interrupt; the RTC raises no more until this is read.
pub fn acknowledge() {
    read(REG_C);
}

/// The CMOS clock's date and time, as `YYYY-MM-DDTHH:MM:SSZ` (QEMU keeps it
/// in UTC), or `None` if it stays mid-update. Read twice until two reads
/// agree, so a tick between the fields cannot tear the result.
pub fn wall_clock() -> Option<alloc::string::String> {
    const UPDATING: u8 = 1 << 7;
    const BINARY: u8 = 1 << 2;
    const HOURS_24: u8 = 1 << 1;
    let fields = || -> Option<[u8; 6]> {
        for _ in 0..10_000 {
            if read(REG_A) & UPDATING == 0 {
                return Some([0x09, 0x08, 0x07, 0x04, 0x02, 0x00].map(read));
            }
        }
        None
    };
    let mut raw = fields()?;
    for _ in 0..4 {
        let again = fields()?;
        if again == raw {
            break;
        }
        raw = again;
    }
    let b = read(REG_B);
    let pm = raw[3] & 0x80 != 0;
    raw[3] &= 0x7f;
    let value = |v: u8| {
        if b & BINARY != 0 {
            v
        } else {
            (v >> 4) * 10 + (v & 0x0f)
        }
    };
    let [year, month, day, mut hour, minute, second] = raw.map(value);
    if b & HOURS_24 == 0 {
        hour = hour % 12 + if pm { 12 } else { 0 };
    }
    Some(alloc::format!(
        "{:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z",
        2000 + u32::from(year)
    ))
}
