//! Page faults: decoding the hardware's error code, and deciding what to do.
//!
//! The kernel's fault stub only reads CR2, RIP and the error code into a
//! [`PageFault`]; [`classify`] is a pure function over that and a description
//! of the kernel's address space, so every decision is testable on the host.
//! It must never guess: a fault it does not recognise is [`Verdict::Fatal`],
//! and the kernel prints its diagnostic and stops.

use bitflags::bitflags;

bitflags! {
    /// The page-fault error code pushed by the CPU (Intel SDM vol. 3, 4.7).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct PfCode: u64 {
        /// The page was present (a protection violation), not missing.
        const PRESENT = 1 << 0;
        /// The access was a write.
        const WRITE = 1 << 1;
        /// The access came from user mode.
        const USER = 1 << 2;
        /// A reserved bit was set in a paging entry.
        const RESERVED_BIT = 1 << 3;
        /// The access was an instruction fetch.
        const INSTRUCTION = 1 << 4;
        /// A protection-key violation.
        const PROTECTION_KEY = 1 << 5;
        /// A shadow-stack access.
        const SHADOW_STACK = 1 << 6;
    }
}

/// Everything the hardware says about one page fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting linear address (CR2).
    pub addr: u64,
    /// The faulting instruction.
    pub rip: u64,
    /// The decoded error code.
    pub code: PfCode,
}

impl PageFault {
    /// Decodes a raw error code.
    pub fn new(addr: u64, rip: u64, error_code: u64) -> Self {
        PageFault {
            addr,
            rip,
            code: PfCode::from_bits_retain(error_code),
        }
    }

    /// `read`, `write` or `execute`, for diagnostics.
    pub fn access(&self) -> &'static str {
        if self.code.contains(PfCode::INSTRUCTION) {
            "execute"
        } else if self.code.contains(PfCode::WRITE) {
            "write"
        } else {
            "read"
        }
    }

    /// `protection violation` or `page not present`, for diagnostics.
    pub fn kind(&self) -> &'static str {
        if self.code.contains(PfCode::PRESENT) {
            "protection violation"
        } else {
            "page not present"
        }
    }
}

/// An instruction allowed to fault, and where execution resumes if it does
/// (the kernel's probe functions, like an exception table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixup {
    /// Address of the instruction that may fault.
    pub insn: u64,
    /// Where to continue after the fault.
    pub resume: u64,
}

/// The virtual region holding kernel thread stacks: `slots` slots of
/// `slot_size` bytes from `base`, each with its stack mapped at the top and
/// the rest of the slot left unmapped as a guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackRegion {
    /// First address of slot 0.
    pub base: u64,
    /// Bytes per slot.
    pub slot_size: u64,
    /// Number of slots.
    pub slots: u64,
}

impl StackRegion {
    /// The slot containing `addr`, if any.
    pub fn slot_of(&self, addr: u64) -> Option<usize> {
        let offset = addr.checked_sub(self.base)?;
        let slot = offset / self.slot_size;
        (slot < self.slots).then_some(slot as usize)
    }
}

/// What the kernel's address space looks like to the fault classifier.
#[derive(Debug, Clone, Copy)]
pub struct Layout<'a> {
    /// Probe instructions allowed to fault.
    pub fixups: &'a [Fixup],
    /// Kernel thread stacks and their guards.
    pub stacks: StackRegion,
    /// While a live snapshot write-protects memory: the virtual window
    /// `[start, end)` through which protected frames are written.
    pub snapshot_window: Option<(u64, u64)>,
}

/// What the kernel does about a page fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A probe faulted as allowed: continue at `resume` and report the fault.
    Fixup {
        /// Where execution continues.
        resume: u64,
    },
    /// A write to a page the live snapshot protects: copy it, then let the
    /// write through.
    SnapshotWrite {
        /// Offset of the faulting address in the snapshot window.
        offset: u64,
    },
    /// A thread ran off the bottom of its stack into the guard.
    StackOverflow {
        /// The stack slot (thread slot) that overflowed.
        slot: usize,
    },
    /// Nothing explains it: print the diagnostic and stop.
    Fatal,
}

/// Decides what a fault means. Probes come first (they may touch any
/// address), then writes the snapshot protects (a present page, a write, no
/// reserved bit, no instruction fetch), then stack guards.
pub fn classify(fault: &PageFault, layout: &Layout<'_>) -> Verdict {
    if let Some(fixup) = layout.fixups.iter().find(|f| f.insn == fault.rip) {
        return Verdict::Fixup {
            resume: fixup.resume,
        };
    }
    let snapshot_write = PfCode::PRESENT | PfCode::WRITE;
    let unexpected = PfCode::RESERVED_BIT | PfCode::INSTRUCTION | PfCode::USER;
    if let Some((start, end)) = layout.snapshot_window {
        if fault.code.contains(snapshot_write)
            && !fault.code.intersects(unexpected)
            && (start..end).contains(&fault.addr)
        {
            return Verdict::SnapshotWrite {
                offset: fault.addr - start,
            };
        }
    }
    if !fault.code.contains(PfCode::PRESENT) {
        if let Some(slot) = layout.stacks.slot_of(fault.addr) {
            return Verdict::StackOverflow { slot };
        }
    }
    Verdict::Fatal
}

/// Whether a fault that [`classify`] found [`Verdict::Fatal`], or that the
/// snapshot did not claim, is a stale write: a kernel data write to a
/// present page, raised through a TLB entry older than the page tables,
/// which by now let the write through (`writable_now` walks them for the
/// faulting address; asked only for such a write). A snapshot's teardown
/// gives write access back on every CPU while another CPU's fault raised
/// just before it may still be on its way to the classifier. The write is
/// simply retried: the CPU drops the faulting address's TLB entry when it
/// raises the fault (Intel SDM vol. 3, 4.10.4.1), so the retry walks the
/// tables again, and a page that is really read-only faults again and
/// is then found not writable.
pub fn is_stale_write(fault: &PageFault, writable_now: impl FnOnce(u64) -> bool) -> bool {
    let write = PfCode::PRESENT | PfCode::WRITE;
    let other = PfCode::all() - write;
    fault.code.contains(write) && !fault.code.intersects(other) && writable_now(fault.addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STACKS: StackRegion = StackRegion {
        base: 0xffff_9000_0000_0000,
        slot_size: 1 << 20,
        slots: 64,
    };
    const PROBE: Fixup = Fixup {
        insn: 0x20_1000,
        resume: 0x20_1008,
    };
    const WINDOW: (u64, u64) = (0xffff_8000_0000_0000, 0xffff_8000_8000_0000);

    fn layout(snapshot: bool) -> Layout<'static> {
        Layout {
            fixups: &[PROBE],
            stacks: STACKS,
            snapshot_window: snapshot.then_some(WINDOW),
        }
    }

    fn classify(f: &PageFault) -> Verdict {
        super::classify(f, &layout(false))
    }

    #[test]
    fn decodes_error_codes() {
        let f = PageFault::new(0xdead_b000, 0x20_0000, 0b11);
        assert_eq!(f.code, PfCode::PRESENT | PfCode::WRITE);
        assert_eq!((f.access(), f.kind()), ("write", "protection violation"));
        let f = PageFault::new(0, 0, 0b1_0000);
        assert_eq!((f.access(), f.kind()), ("execute", "page not present"));
    }

    #[test]
    fn probes_are_fixed_up_wherever_they_fault() {
        let f = PageFault::new(STACKS.base + 8, PROBE.insn, 0);
        assert_eq!(
            classify(&f),
            Verdict::Fixup {
                resume: PROBE.resume
            }
        );
    }

    #[test]
    fn missing_pages_in_the_stack_region_are_overflows() {
        let f = PageFault::new(STACKS.base + 3 * STACKS.slot_size + 4095, 0x20_0000, 0b10);
        assert_eq!(classify(&f), Verdict::StackOverflow { slot: 3 });
        let beyond = STACKS.base + STACKS.slots * STACKS.slot_size;
        let f = PageFault::new(beyond, 0x20_0000, 0b10);
        assert_eq!(classify(&f), Verdict::Fatal);
    }

    #[test]
    fn anything_else_is_fatal() {
        let f = PageFault::new(0xdead_b000, 0x20_0000, 0);
        assert_eq!(classify(&f), Verdict::Fatal);
        let f = PageFault::new(STACKS.base, 0x20_0000, 0b11);
        assert_eq!(
            classify(&f),
            Verdict::Fatal,
            "present page: not a guard hit"
        );
    }

    #[test]
    fn protected_writes_belong_to_the_snapshot_only_while_one_runs() {
        let write = PageFault::new(WINDOW.0 + 0x5008, 0x20_0000, 0b11);
        assert_eq!(
            super::classify(&write, &layout(true)),
            Verdict::SnapshotWrite { offset: 0x5008 }
        );
        assert_eq!(super::classify(&write, &layout(false)), Verdict::Fatal);
        let read = PageFault::new(WINDOW.0 + 0x5008, 0x20_0000, 0b01);
        assert_eq!(
            super::classify(&read, &layout(true)),
            Verdict::Fatal,
            "reads are never protected"
        );
        let missing = PageFault::new(WINDOW.0 + 0x5008, 0x20_0000, 0b10);
        assert_eq!(super::classify(&missing, &layout(true)), Verdict::Fatal);
        let outside = PageFault::new(WINDOW.1, 0x20_0000, 0b11);
        assert_eq!(super::classify(&outside, &layout(true)), Verdict::Fatal);
        let rsvd = PageFault::new(WINDOW.0, 0x20_0000, 0b1011);
        assert_eq!(super::classify(&rsvd, &layout(true)), Verdict::Fatal);
    }

    #[test]
    fn only_a_plain_kernel_write_to_a_page_now_writable_is_stale() {
        let write = PageFault::new(WINDOW.0 + 0x5008, 0x20_0000, 0b11);
        assert!(is_stale_write(&write, |a| a == WINDOW.0 + 0x5008));
        assert!(!is_stale_write(&write, |_| false), "still read-only");
        for code in [0b01, 0b10, 0b111, 0b1011, 0b1_0011, 0b10_0011, 0b100_0011] {
            let f = PageFault::new(WINDOW.0, 0x20_0000, code);
            let asked = core::cell::Cell::new(false);
            let stale = is_stale_write(&f, |_| {
                asked.set(true);
                true
            });
            assert!(!stale && !asked.get(), "error code {code:#b}");
        }
    }
}
