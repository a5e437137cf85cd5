//! The bare-metal x86_64 kernel: boots from QEMU through PVH, brings up the
//! CPU, memory, clock, interrupts and threads, then runs the scenario the
//! command line names and exits QEMU with its verdict.
//!
//! Hardware-independent logic lives in the `snapshot` crate; this crate is
//! the thin layer that implements it on real page tables, interrupts and
//! devices. `unsafe` is confined to `arch`, `memory`, `sync` and `scoped`, the live
//! snapshot's shadow map (`memsnap::shadow`), and the entry symbol below.
//!
//! Layers, each importing only those under it:
//! 1. `arch::percpu` (which CPU am I), `sync` (spinning locks), then the
//!    rest of `arch` (CPU, legacy devices, the trap path), `clock`, `log`,
//!    `trace`;
//! 2. `memory`, with `boot_info` and `acpi` reading firmware tables through
//!    it, and the local and IO APICs, which need its MMIO mappings;
//! 3. `thread` (the scheduler), `scoped` and `sleep_mutex`; then `virtio`, `memsnap`,
//!    `backup`, `exceptions`; then tests, benchmarks, `scenario` and
//!    `cpus` (bringing up the other CPUs, which joins `arch`, `memory` and
//!    `thread`).
//!
//! Where a lower layer must reach an upper one, this file connects them at
//! boot: the trap path calls the handlers given to `arch::trap::init`, and
//! `memory` tells the live snapshot about frame reuse and DMA through
//! `memory::hooks`. No module calls up into this file.
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
mod clone;
mod cpus;
mod exceptions;
mod ktest;
mod log;
mod memsnap;
mod mirror;
mod readahead;
mod scenario;
#[allow(unsafe_code)]
mod scoped;
mod sleep_mutex;
mod soak;
#[allow(unsafe_code)]
mod sync;
mod tests;
mod thread;
mod trace;
mod virtio;
mod workload;

use alloc::string::String;
use core::fmt::Write;

use snapshot::interface::cmdline::CmdLine;

use crate::arch::qemu::{exit, ExitCode};
use crate::boot_info::BootInfo;

/// Default local APIC timer frequency, the scheduler's tick (`timer_hz=`).
const DEFAULT_TIMER_HZ: u64 = 1000;
/// Default time slice in milliseconds (`quantum_ms=`).
const DEFAULT_QUANTUM_MS: u64 = 4;

/// The symbol the boot stub (`arch::boot`) calls once in long mode, on the
/// boot stack, interrupts off, with the physical address of the PVH start
/// info. It lives here, at the top, so that `arch` never calls up into the
/// kernel.
#[allow(unsafe_code)]
// SAFETY: 1. `kernel_main` is the only symbol of that name in the image
// (`no_mangle` makes it global), and only the boot stub calls it, once, with
// the C calling convention this declares.
#[unsafe(no_mangle)]
extern "C" fn kernel_main(start_info: u64) -> ! {
    arch::percpu::init_this(0, 0);
    install_layers();
    arch::serial::init();
    arch::cpu::enable_sse();
    arch::gdt::init();
    arch::trap::init(arch::trap::Handlers {
        exception: exceptions::handle,
        timer: thread::on_timer,
        yielded: thread::on_yield,
        after_device: thread::after_device_interrupt,
    });
    let boot = BootInfo::read(start_info);
    memory::init(boot.ram());
    boot.keep_memory_map();
    let cmdline: String = boot.cmdline_owned();
    let cmd = CmdLine::new(&cmdline);
    let tsc_hz = clock::calibrate();
    log!("kernel up: cmdline {:?}", cmd.as_str());

    trace::init(cmd.get("trace") != Some("off"));
    arch::pic::disable();
    arch::apic::init();
    arch::percpu::init_this(0, arch::apic::id());
    arch::percpu::report_in();
    let madt = acpi::init(boot.rsdp);
    if let Some(first) = madt.ioapics.first() {
        arch::ioapic::init(first);
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
    thread::init((quantum_ms * hz / 1000).max(1));
    let timer_hz = arch::apic::start_timer(hz as u32, || clock::spin_for(10_000_000));
    x86_64::instructions::interrupts::enable();
    let cpu_limit = match cmd.u64("cpus") {
        Ok(limit) => limit.map_or(usize::MAX, |n| n as usize),
        Err(e) => {
            log!("{e}");
            exit(ExitCode::Failure)
        }
    };
    let cpus = cpus::start_others(&madt.cpus, cpu_limit);
    match cmd.get("memsnap_cpus") {
        None | Some("all") => memsnap::run_on_all_cpus(true),
        Some("boot") => memsnap::run_on_all_cpus(false),
        Some(other) => {
            log!("memsnap_cpus={other}: expected all or boot");
            exit(ExitCode::Failure)
        }
    }
    match cmd.get("copier_cpu") {
        None | Some("own") => {}
        Some("shared") => memsnap::CopierCpu::set_boot_default(memsnap::CopierCpu::Shared),
        Some(other) => {
            log!("copier_cpu={other}: expected own or shared");
            exit(ExitCode::Failure)
        }
    }
    if cpus > 1 {
        log!("{cpus} CPUs online");
    }
    trace!(
        "boot.done",
        tsc_hz = tsc_hz,
        apic_timer_hz = timer_hz,
        cpus = cpus as u64
    );
    virtio::init(&cmd);

    let code = scenario::run(&cmd);
    finish(code)
}

/// Lets the lower layers reach the upper ones without naming them: the
/// memory layer tells the live snapshot about frame reuse and DMA. Runs
/// first, before any frame is handed out.
fn install_layers() {
    memory::hooks::install(memory::hooks::Hooks {
        before_reuse: memsnap::before_reuse,
        dma_registered: memsnap::register_dma,
        dma_unregistered: memsnap::unregister_dma,
    });
}

/// Traces the disks' sums, flushes traces and exits QEMU with `code`.
pub fn finish(code: ExitCode) -> ! {
    virtio::trace_totals();
    trace::flush();
    exit(code)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    x86_64::instructions::interrupts::disable();
    if !arch::ipi::stop_all_fatal() {
        arch::cpu::halt_forever(); // another CPU failed first and reports
    }
    let on = arch::percpu::index();
    let mut out = arch::serial::emergency_writer();
    let _ = write!(out, "\n!!! PANIC on CPU {on} in thread ");
    let _ = thread::write_current(&mut out);
    let _ = writeln!(out, ": {info}");
    ktest::report_fatal(
        &mut out,
        format_args!("panicked on CPU {on}: {}", info.message()),
    );
    exit(ExitCode::Failure)
}
