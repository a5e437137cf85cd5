//! Everything that touches the CPU or a legacy device directly.
//!
//! This is one of the few places where `unsafe` is allowed. Each unsafe block
//! sits behind a safe function whose contract makes it sound, and says why in
//! a `// SAFETY:` comment. Code outside `arch` and `memory` cannot use
//! `unsafe` at all (`#![deny(unsafe_code)]` at the crate root).

pub mod apic;
pub mod boot;
pub mod cpu;
pub mod gdt;
pub mod ioapic;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod qemu;
pub mod rtc;
pub mod serial;
pub mod trap;
