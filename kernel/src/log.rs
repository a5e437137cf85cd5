//! Human-readable log lines on the console: `[seconds.micros] message`.

/// Prints a log line with the time since boot.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::write(format_args!($($arg)*))
    };
}

/// Prints a line without a timestamp (reports, tables).
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::arch::serial::write_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[doc(hidden)]
pub fn write(args: core::fmt::Arguments<'_>) {
    let ns = crate::clock::now_ns();
    crate::arch::serial::write_fmt(format_args!(
        "[{:5}.{:06}] {}\n",
        ns / 1_000_000_000,
        ns / 1_000 % 1_000_000,
        args
    ));
}
