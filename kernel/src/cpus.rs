//! Bringing up the other CPUs at boot and what each runs first: the
//! per-CPU set-up (GS base, GDT and TSS with its own interrupt stacks, the
//! shared IDT, local APIC and timer), then its idle thread.
//!
//! Sits at the top with `main.rs`: it joins `arch` (the trampoline, the
//! IPIs), `memory` (stacks) and `thread` (each CPU's idle thread), which
//! must not know each other. It never starts a CPU the firmware did not
//! list, nor two at once.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::boot::IST_STACK_SIZE;
use crate::arch::gdt::IST_STACKS;
use crate::arch::percpu::{self, MAX_CPUS};
use crate::arch::{apic, cpu, gdt, smp, trampoline, trap};
use crate::memory::stacks::KernelStack;
use crate::sync::IrqMutex;

/// Each AP's idle stack: traps taken while idle run on it too.
const IDLE_STACK: u64 = 32 * 1024;

/// The top of each CPU's interrupt-stack block, for its entry.
static IST_TOP: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// The interrupt stacks, kept for the kernel's life.
static IST_BLOCKS: IrqMutex<Vec<KernelStack>> = IrqMutex::new(Vec::new());

/// Starts every enabled CPU of the MADT but this one (at most
/// `limit` CPUs in all); returns how many CPUs are online. A CPU that does
/// not answer is reported and the rest are not tried.
pub fn start_others(madt_cpus: &[u32], limit: usize) -> usize {
    let me = apic::id();
    let others: Vec<u32> = madt_cpus.iter().copied().filter(|&id| id != me).collect();
    let area = trampoline::AREA..trampoline::AREA + trampoline::AREA_PAGES * 4096;
    let area_is_ram =
        crate::boot_info::usable_ram().any(|r| r.start <= area.start && area.end <= r.end);
    if others.is_empty() || limit <= 1 {
        return percpu::online();
    }
    if !area_is_ram {
        crate::log!("smp: the trampoline area {area:#x?} is not RAM; one CPU only");
        return percpu::online();
    }
    smp::prepare();
    for apic_id in others.into_iter().take(limit - 1) {
        if let Err(e) = start_one(apic_id) {
            crate::log!("smp: {e}; stopping bring-up");
            break;
        }
    }
    percpu::online()
}

fn start_one(apic_id: u32) -> Result<(), alloc::string::String> {
    use alloc::format;
    let idle = KernelStack::new(IDLE_STACK).map_err(|e| format!("idle stack: {e:?}"))?;
    let ist = KernelStack::new(IST_STACKS as u64 * IST_STACK_SIZE as u64)
        .map_err(|e| format!("interrupt stacks: {e:?}"))?;
    let stack_top = idle.top();
    let cpu = crate::thread::add_cpu(idle).ok_or("no scheduler room for another CPU")?;
    IST_TOP[cpu].store(ist.top(), Ordering::Release);
    IST_BLOCKS.lock().push(ist);
    smp::start(cpu, apic_id, stack_top, ap_entry, crate::clock::spin_for)
        .map_err(|e| format!("CPU {cpu} (APIC id {apic_id}): {e:?}"))
}

/// An AP's first Rust code, on its idle stack, interrupts off.
extern "C" fn ap_entry(cpu: u64) -> ! {
    let cpu = cpu as usize;
    smp::left_trampoline();
    percpu::init_this(cpu, apic::id());
    cpu::enable_sse();
    let top = IST_TOP[cpu].load(Ordering::Acquire);
    gdt::init_cpu(
        cpu,
        core::array::from_fn(|i| top - (i * IST_STACK_SIZE) as u64),
    );
    trap::load_on_this_cpu();
    apic::init_this_cpu();
    apic::start_timer_this_cpu();
    percpu::report_in();
    crate::trace!("cpu.up", cpu = cpu as u64);
    // This is now CPU `cpu`'s idle thread.
    loop {
        cpu::enable_interrupts_and_halt();
    }
}
