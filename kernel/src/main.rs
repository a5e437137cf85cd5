//! The bare-metal x86_64 kernel: boots from QEMU through PVH, brings up the
//! CPU, memory, clock, interrupts and threads, then runs the scenario the
//! command line names and exits QEMU with its verdict.
//!
//! Hardware-independent logic lives in the `snapshot` crate; this crate is
//! the thin layer that implements it on real page tables, interrupts and
//! devices. `unsafe` is confined to `arch` and `memory`.
#![no_std]
#![no_main]
#![deny(unsafe_code)]

extern crate alloc;

#[allow(unsafe_code)]
mod arch;
#[allow(unsafe_code)]
mod memory;

mod acpi;
mod backup;
mod bench;
mod boot_info;
mod clock;
mod exceptions;
mod ktest;
mod log;
mod memsnap;
mod scenario;
#[allow(unsafe_code)]
mod sync;
mod tests;
mod thread;
mod trace;
mod virtio;
mod workload;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::ops::Range;

use snapshot::interface::cmdline::CmdLine;
use spin::Once;

use crate::arch::qemu::{exit, ExitCode};
use crate::boot_info::{BootInfo, Region};

/// Default local APIC timer frequency, the scheduler's tick (`timer_hz=`).
const DEFAULT_TIMER_HZ: u64 = 1000;
/// Default time slice in milliseconds (`quantum_ms=`).
const DEFAULT_QUANTUM_MS: u64 = 4;

static TIMER_HZ: core::sync::atomic::AtomicU64 =
    core::sync::atomic::AtomicU64::new(DEFAULT_TIMER_HZ);

/// The scheduler tick's frequency.
pub fn timer_hz() -> u64 {
    TIMER_HZ.load(core::sync::atomic::Ordering::Relaxed)
}

static REGIONS: Once<Vec<Region>> = Once::new();
static MADT: Once<acpi::Madt> = Once::new();

/// The firmware memory map.
pub fn boot_regions() -> &'static [Region] {
    REGIONS.get().map_or(&[], Vec::as_slice)
}

/// The usable RAM ranges of the firmware memory map.
pub fn boot_ram() -> impl Iterator<Item = Range<u64>> {
    boot_regions()
        .iter()
        .filter(|r| r.kind == 1)
        .map(|r| r.start..r.end)
}

/// The ACPI interrupt routing information.
pub fn madt() -> &'static acpi::Madt {
    MADT.get().expect("MADT read at boot")
}

/// Entered from `arch::boot` on the boot stack, interrupts off, with the
/// physical address of the PVH start info.
fn kernel_main(start_info: u64) -> ! {
    arch::serial::init();
    arch::cpu::enable_sse();
    arch::gdt::init();
    arch::trap::init();
    let boot = BootInfo::read(start_info);
    memory::init(&boot);
    REGIONS.call_once(|| boot.regions_owned());
    let cmdline: String = boot.cmdline_owned();
    let cmd = CmdLine::new(&cmdline);
    let tsc_hz = clock::calibrate();
    log!("kernel up: cmdline {:?}", cmd.as_str());

    trace::init(cmd.get("trace") != Some("off"));
    arch::pic::disable();
    arch::apic::init();
    match acpi::read_madt(boot.rsdp) {
        Ok(madt) => {
            if let Some(first) = madt.ioapics.first() {
                arch::ioapic::init(first);
            }
            MADT.call_once(|| madt);
        }
        Err(e) => {
            log!("no interrupt routing information: {e:?}");
            MADT.call_once(acpi::Madt::default);
        }
    }
    let (quantum_ms, hz) = match (cmd.u64("quantum_ms"), cmd.u64("timer_hz")) {
        (Ok(q), Ok(hz)) => (
            q.unwrap_or(DEFAULT_QUANTUM_MS),
            hz.unwrap_or(DEFAULT_TIMER_HZ).clamp(100, 10_000),
        ),
        (Err(e), _) | (_, Err(e)) => {
            log!("{e}");
            exit(ExitCode::Failure)
        }
    };
    TIMER_HZ.store(hz, core::sync::atomic::Ordering::Relaxed);
    thread::init((quantum_ms * hz / 1000).max(1));
    let timer_hz = arch::apic::start_timer(hz as u32, || clock::spin_for(10_000_000));
    x86_64::instructions::interrupts::enable();
    trace!("boot.done", tsc_hz = tsc_hz, apic_timer_hz = timer_hz);
    virtio::init(&cmd);

    let code = scenario::run(&cmd);
    finish(code)
}

/// Flushes traces and exits QEMU with `code`.
pub fn finish(code: ExitCode) -> ! {
    trace::flush();
    exit(code)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    x86_64::instructions::interrupts::disable();
    let mut out = arch::serial::emergency_writer();
    let _ = write!(out, "\n!!! PANIC in thread ");
    let _ = thread::write_current(&mut out);
    let _ = writeln!(out, ": {info}");
    ktest::report_fatal(&mut out, format_args!("panicked: {}", info.message()));
    exit(ExitCode::Failure)
}
