//! CPU exceptions: the page fault decides through
//! [`snapshot::policy::fault::classify`] (and a write through a stale TLB
//! entry, [`snapshot::policy::fault::is_stale_write`], is retried); every
//! other exception, and every page fault nothing explains, prints a
//! diagnostic on serial naming the CPU, stops the other CPUs and exits QEMU
//! with the failure code. Never a silent hang, never a triple-fault reboot.

use core::fmt::Write;

use snapshot::policy::fault::{classify, is_stale_write, Layout, PageFault, Verdict};

use crate::arch::trap::TrapFrame;
use crate::arch::{cpu, serial};
use crate::memory::paging::allows_write_now;
use crate::memory::{probe, stacks};
use crate::memsnap::WriteFault;

/// Mnemonic and name of each exception vector.
pub fn name(vector: u64) -> (&'static str, &'static str) {
    match vector {
        0 => ("#DE", "divide error"),
        1 => ("#DB", "debug"),
        2 => ("NMI", "non-maskable interrupt"),
        3 => ("#BP", "breakpoint"),
        4 => ("#OF", "overflow"),
        5 => ("#BR", "bound range exceeded"),
        6 => ("#UD", "invalid opcode"),
        7 => ("#NM", "device not available"),
        8 => ("#DF", "double fault"),
        10 => ("#TS", "invalid TSS"),
        11 => ("#NP", "segment not present"),
        12 => ("#SS", "stack-segment fault"),
        13 => ("#GP", "general protection fault"),
        14 => ("#PF", "page fault"),
        16 => ("#MF", "x87 floating-point error"),
        17 => ("#AC", "alignment check"),
        18 => ("#MC", "machine check"),
        19 => ("#XM", "SIMD floating-point error"),
        20 => ("#VE", "virtualization exception"),
        21 => ("#CP", "control protection"),
        _ => ("#??", "reserved exception"),
    }
}

/// Handles exception `frame.vector`; returns only if execution may go on,
/// with the frame to resume: `frame`, or another thread's when a write
/// fault must wait for the snapshot's disk writer.
pub fn handle(frame: &mut TrapFrame) -> *mut TrapFrame {
    if frame.vector == 14 {
        let entry = cpu::rdtsc();
        let fault = PageFault::new(cpu::cr2(), frame.rip, frame.error_code);
        crate::memsnap::hold_if_asked(fault.addr);
        // A write the tables now allow, or one whose walk a snapshot's
        // teardown may have overlapped (its shadow tables freed under it):
        // the sequence is read around the walk, as a seqlock's reader does.
        let writable_now = |addr| {
            let before = crate::memsnap::teardown_seq();
            let allowed = allows_write_now(addr);
            let after = crate::memsnap::teardown_seq();
            allowed || after != before || before % 2 == 1
        };
        let fixups = probe::fixups();
        let layout = Layout {
            fixups: &fixups,
            stacks: stacks::region(),
            snapshot_window: crate::memsnap::window(),
        };
        match classify(&fault, &layout) {
            Verdict::Fixup { resume } => {
                probe::record(&fault);
                frame.rip = resume;
                return frame;
            }
            Verdict::StackOverflow { slot } => fatal(
                frame,
                Some(&fault),
                Some(format_args!("kernel stack overflow in stack slot {slot}")),
            ),
            Verdict::SnapshotWrite { offset } => {
                let since = cpu::rdtsc();
                if let Some(next) = snapshot_write(frame, offset, since, entry) {
                    return next;
                }
                if crate::memsnap::on_write_fault(offset, false, entry) == WriteFault::Handled
                    || is_stale_write(&fault, writable_now)
                {
                    return frame;
                }
                fatal(
                    frame,
                    Some(&fault),
                    Some(format_args!(
                        "write to a read-only page outside the snapshot range"
                    )),
                )
            }
            // Raised before a snapshot's teardown gave the write back.
            Verdict::Fatal if is_stale_write(&fault, writable_now) => return frame,
            Verdict::Fatal => fatal(frame, Some(&fault), None),
        }
    }
    fatal(frame, None, None)
}

/// A write fault in the snapshot window: copies the frame, or parks the
/// thread while staging is full. Returns the frame to resume; `None` when
/// the thread cannot wait, and the caller copies without waiting (from the
/// staging reserve). While another CPU holds the scheduler or wakes
/// someone, it checks again rather than take the reserve: on several CPUs
/// that happens all the time, and the reserve is for faults that truly
/// cannot wait.
fn snapshot_write(
    frame: &mut TrapFrame,
    offset: u64,
    since: u64,
    entry: u64,
) -> Option<*mut TrapFrame> {
    use crate::thread::NotBlocked;
    loop {
        let seq = crate::thread::wake_seq();
        let key = match crate::memsnap::on_write_fault(offset, true, entry) {
            WriteFault::Wait(key) => key,
            WriteFault::Handled => return Some(frame),
            WriteFault::NotOurs => return None,
        };
        match crate::thread::block_faulting(frame, key, seq) {
            Ok((slot, next)) => {
                crate::memsnap::note_fault_wait(slot, since);
                return Some(next);
            }
            Err(NotBlocked::Retry) => core::hint::spin_loop(),
            Err(NotBlocked::CannotWait) => return None,
        }
    }
}

/// Prints the diagnostic and exits QEMU with the failure code.
fn fatal(
    frame: &TrapFrame,
    fault: Option<&PageFault>,
    note: Option<core::fmt::Arguments<'_>>,
) -> ! {
    let (mnemonic, name) = name(frame.vector);
    if !crate::arch::ipi::stop_all_fatal() {
        cpu::halt_forever(); // another CPU failed first and reports
    }
    let mut out = serial::emergency_writer();
    let f = frame;
    let on = crate::arch::percpu::index();
    let _ = writeln!(
        out,
        "\n!!! CPU EXCEPTION {mnemonic} {name} on CPU {on}: vector={} error_code={:#x}",
        f.vector, f.error_code
    );
    let _ = writeln!(
        out,
        "    rip={:#018x} rsp={:#018x} rflags={:#x} cs={:#x}",
        f.rip, f.rsp, f.rflags, f.cs
    );
    if let Some(fault) = fault {
        let _ = writeln!(
            out,
            "    cr2={:#018x} ({} access, {})",
            fault.addr,
            fault.access(),
            fault.kind()
        );
    }
    if let Some(note) = note {
        let _ = writeln!(out, "    {note}");
    }
    let _ = write!(out, "    thread: ");
    let _ = crate::thread::write_current(&mut out);
    let _ = writeln!(out);
    let registers = [
        ("rax", f.rax),
        ("rbx", f.rbx),
        ("rcx", f.rcx),
        ("rdx", f.rdx),
        ("rsi", f.rsi),
        ("rdi", f.rdi),
        ("rbp", f.rbp),
        ("r8", f.r8),
        ("r9", f.r9),
        ("r10", f.r10),
        ("r11", f.r11),
        ("r12", f.r12),
        ("r13", f.r13),
        ("r14", f.r14),
        ("r15", f.r15),
    ];
    for row in registers.chunks(4) {
        let _ = write!(out, "   ");
        for (name, value) in row {
            let _ = write!(out, " {name}={value:#x}");
        }
        let _ = writeln!(out);
    }
    crate::ktest::report_fatal(
        &mut out,
        format_args!("{mnemonic} {name} on CPU {on} at rip={:#x}", f.rip),
    );
    crate::arch::qemu::exit(crate::arch::qemu::ExitCode::Failure)
}
