//! What the host tool and the kernel share: the kernel command line, the
//! scenarios it selects, the serial trace format, and byte sizes as people
//! write them (`64M`).
//!
//! Both sides must build these from the same code, so a key or a record
//! added here is understood on both; nothing here may touch a device.

pub mod cmdline;
pub mod progress;
pub mod scenario;
pub mod trace;
pub mod units;
