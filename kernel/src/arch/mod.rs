//! Everything that touches the CPU or a legacy device directly.
//!
//! This is one of the few places where `unsafe` is allowed. Each unsafe block
//! sits behind a safe function whose contract makes it sound, and says why in
//! a `// SAFETY:` comment. Code outside `arch`, `memory` and `sync` cannot
//! use `unsafe` at all (`#![deny(unsafe_code)]` at the crate root).
//!
//! Nothing here may call up into the scheduler, the exception handler or
//! the snapshot engine: the trap path reaches them through the handlers the
//! kernel installs at boot ([`trap::Handlers`]). Most files sit below
//! `memory`; the local APIC and IOAPIC drivers, and the IPIs and AP start-up
//! built on the local APIC (`ipi`, `smp`, `trampoline`), sit above it,
//! because they reach registers and low memory through `memory`. `percpu`
//! sits lowest of all: `sync` asks it which CPU it runs on.

pub mod apic;
pub mod boot;
pub mod cpu;
pub mod gdt;
pub mod ioapic;
pub mod ipi;
pub mod pci;
pub mod percpu;
pub mod pic;
pub mod pit;
pub mod qemu;
pub mod rtc;
pub mod serial;
pub mod smp;
pub mod trampoline;
pub mod trap;
pub mod vectors;
