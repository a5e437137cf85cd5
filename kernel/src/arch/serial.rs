//! The COM1 16550 UART: the console for logs and the trace stream.
//!
//! Output only. Every writer goes through one interrupt-safe lock so lines
//! from threads and interrupt handlers never interleave mid-line; the fatal
//! paths (panic, CPU exception) use [`emergency_writer`], which ignores the
//! lock because the system is about to stop.

use core::fmt;

use super::cpu::{inb, outb};
use crate::sync::IrqMutex;

const COM1: u16 = 0x3f8;
const LINE_STATUS: u16 = COM1 + 5;
const THR_EMPTY: u8 = 1 << 5;

/// The UART; holding it means owning the transmit register.
#[derive(Debug)]
pub struct Uart(());

impl Uart {
    fn send(&mut self, byte: u8) {
        while inb(LINE_STATUS) & THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        outb(COM1, byte);
    }
}

impl fmt::Write for Uart {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            if byte == b'\n' {
                self.send(b'\r');
            }
            self.send(byte);
        }
        Ok(())
    }
}

static UART: IrqMutex<Uart> = IrqMutex::new(Uart(()));

/// Programs 115200 baud, 8N1, FIFOs on, UART interrupts off.
pub fn init() {
    outb(COM1 + 1, 0x00); // no UART interrupts
    outb(COM1 + 3, 0x80); // DLAB: set the divisor
    outb(COM1, 0x01); // divisor 1: 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8 bits, no parity, one stop bit
    outb(COM1 + 2, 0xc7); // FIFOs on and cleared, 14-byte threshold
    outb(COM1 + 4, 0x03); // DTR | RTS
}

/// Writes formatted text under the console lock.
pub fn write_fmt(args: fmt::Arguments<'_>) {
    // A console write cannot fail; there is nowhere to report it if it did.
    let _ = fmt::Write::write_fmt(&mut *UART.lock(), args);
}

/// Runs `f` with the console held, so several writes form one block.
pub fn with_console<R>(f: impl FnOnce(&mut Uart) -> R) -> R {
    f(&mut UART.lock())
}

/// A writer that bypasses the lock, for panic and exception reports: the
/// lock may be held by the code that just failed.
pub fn emergency_writer() -> Uart {
    Uart(())
}
