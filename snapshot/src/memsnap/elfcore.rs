//! ELF64 core files (`ET_CORE`, x86_64) for memory snapshots: the layout
//! and the bytes before the memory, and a parser for checking files.
//!
//! A file is laid out for a writer that streams memory sequentially:
//!
//! ```text
//! [ELF header][program headers: PT_NOTE, PT_LOAD...][notes][pad to 4 KiB]
//! [memory of load 0][memory of load 1]...
//! ```
//!
//! Each [`Load`] is one `PT_LOAD`: memory at a virtual address (where the
//! kernel maps it, so a debugger resolves symbols) backed by physical
//! memory at `paddr`. Two loads may share file bytes ([`Load::alias_of`]),
//! for memory mapped at two addresses (the kernel image is both
//! identity-mapped and in the physical map).
//!
//! Notes: `CORE`/`NT_PRSTATUS` with the CPU's registers (what gdb reads as
//! the thread's state), and `SNAPKERN`/[`NT_SNAPSHOT_META`] with the
//! snapshot's metadata as `key=value` lines.
//!
//! Completeness: a writer puts [`INCOMPLETE_MAGIC`] at offset 0 first and
//! the real header last, after the memory is durable, so an interrupted
//! file never looks like an ELF file (see [`classify`]).
//!
//! This module must never read or write memory or devices; it only
//! describes files.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Bytes per page; memory starts page-aligned in the file.
pub const PAGE: u64 = 4096;
/// What an unfinished file starts with instead of the ELF magic.
pub const INCOMPLETE_MAGIC: [u8; 16] = *b"SNAPKERN-PARTIAL";
/// `n_type` of the metadata note (name `SNAPKERN`).
pub const NT_SNAPSHOT_META: u32 = 0x534e_4150;
/// `n_type` of the register note (name `CORE`).
pub const NT_PRSTATUS: u32 = 1;

const EHDR_SIZE: u64 = 64;
const PHDR_SIZE: u64 = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const ET_CORE: u16 = 4;
const EM_X86_64: u16 = 62;
const PRSTATUS_SIZE: usize = 336;
const PRSTATUS_REGS: usize = 112;

/// One `PT_LOAD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Virtual address where the kernel maps the memory.
    pub vaddr: u64,
    /// Physical address of its first byte.
    pub paddr: u64,
    /// Bytes (a multiple of [`PAGE`]).
    pub len: u64,
    /// Shares the file bytes of this earlier load (same physical memory),
    /// at the offset of `paddr` within it.
    pub alias_of: Option<usize>,
}

/// General registers in the order of the x86_64 `user_regs_struct` (what
/// `NT_PRSTATUS` carries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Registers(pub [u64; 27]);

impl Registers {
    /// Index of `rbp`.
    pub const RBP: usize = 4;
    /// Index of `rip`.
    pub const RIP: usize = 16;
    /// Index of `cs`.
    pub const CS: usize = 17;
    /// Index of `rflags`.
    pub const RFLAGS: usize = 18;
    /// Index of `rsp`.
    pub const RSP: usize = 19;
    /// Index of `ss`.
    pub const SS: usize = 20;
}

/// Where everything goes in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the first memory byte (the header region's length).
    pub data_start: u64,
    /// File offset of each load's memory.
    pub offsets: Vec<u64>,
    /// The whole file's length.
    pub total: u64,
}

/// Why loads cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutError {
    /// A load's length or address is not page-aligned.
    Unaligned(usize),
    /// An alias that does not point at an earlier load covering it.
    BadAlias(usize),
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::Unaligned(i) => write!(f, "load {i} is not page-aligned"),
            LayoutError::BadAlias(i) => {
                write!(f, "load {i} aliases memory no earlier load holds")
            }
        }
    }
}

fn note_len(name: &str, desc_len: usize) -> usize {
    12 + (name.len() + 1).next_multiple_of(4) + desc_len.next_multiple_of(4)
}

fn push_note(out: &mut Vec<u8>, name: &str, kind: u32, desc: &[u8]) {
    out.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(desc);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Lays out `loads` with notes of `notes_len` bytes.
fn layout_with(loads: &[Load], notes_len: u64) -> Result<Layout, LayoutError> {
    let headers = EHDR_SIZE + PHDR_SIZE * (1 + loads.len() as u64);
    let data_start = (headers + notes_len).next_multiple_of(PAGE);
    let mut offsets = Vec::with_capacity(loads.len());
    let mut next = data_start;
    for (i, load) in loads.iter().enumerate() {
        if !load.len.is_multiple_of(PAGE) || !load.paddr.is_multiple_of(PAGE) {
            return Err(LayoutError::Unaligned(i));
        }
        match load.alias_of {
            None => {
                offsets.push(next);
                next += load.len;
            }
            Some(j) => {
                let base = loads
                    .get(j)
                    .filter(|_| j < i)
                    .ok_or(LayoutError::BadAlias(i))?;
                let inside = load.paddr >= base.paddr
                    && load.paddr + load.len <= base.paddr + base.len
                    && base.alias_of.is_none();
                if !inside {
                    return Err(LayoutError::BadAlias(i));
                }
                offsets.push(offsets[j] + (load.paddr - base.paddr));
            }
        }
    }
    Ok(Layout {
        data_start,
        offsets,
        total: next,
    })
}

/// The notes: registers, then metadata.
fn notes(regs: &Registers, meta: &str) -> Vec<u8> {
    let mut prstatus = [0u8; PRSTATUS_SIZE];
    // pr_pid = 1, so gdb shows one thread.
    prstatus[32..36].copy_from_slice(&1u32.to_le_bytes());
    for (i, r) in regs.0.iter().enumerate() {
        let at = PRSTATUS_REGS + 8 * i;
        prstatus[at..at + 8].copy_from_slice(&r.to_le_bytes());
    }
    let mut out =
        Vec::with_capacity(note_len("CORE", PRSTATUS_SIZE) + note_len("SNAPKERN", meta.len()));
    push_note(&mut out, "CORE", NT_PRSTATUS, &prstatus);
    push_note(&mut out, "SNAPKERN", NT_SNAPSHOT_META, meta.as_bytes());
    out
}

/// Lays out a core file and returns its header region (everything before
/// the memory, `layout.data_start` bytes) and the layout.
pub fn header(
    loads: &[Load],
    regs: &Registers,
    meta: &str,
) -> Result<(Vec<u8>, Layout), LayoutError> {
    let notes = notes(regs, meta);
    let layout = layout_with(loads, notes.len() as u64)?;
    let phnum = 1 + loads.len();
    let mut out = Vec::with_capacity(layout.data_start as usize);
    // e_ident: magic, 64-bit, little-endian, version 1, System V ABI.
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&ET_CORE.to_le_bytes());
    out.extend_from_slice(&EM_X86_64.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes()); // e_version
    out.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    out.extend_from_slice(&EHDR_SIZE.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    out.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    out.extend_from_slice(&(phnum as u16).to_le_bytes());
    out.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    let notes_at = EHDR_SIZE + PHDR_SIZE * phnum as u64;
    let mut phdr =
        |kind: u32, flags: u32, offset: u64, vaddr: u64, paddr: u64, len: u64, align: u64| {
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
            for v in [offset, vaddr, paddr, len, len, align] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
    phdr(PT_NOTE, 0, notes_at, 0, 0, notes.len() as u64, 4);
    for (load, &offset) in loads.iter().zip(&layout.offsets) {
        // Readable and writable (PF_R | PF_W).
        phdr(PT_LOAD, 6, offset, load.vaddr, load.paddr, load.len, PAGE);
    }
    out.extend_from_slice(&notes);
    out.resize(layout.data_start as usize, 0);
    Ok((out, layout))
}

/// The loads of a memory snapshot whose range is `runs` (`(first frame,
/// frames)` in slot order, as [`crate::memsnap::RangeIndex::runs`] gives
/// them): one load per run at `map_base + paddr`, where the kernel's
/// physical map shows it, then an alias at the identity address for each
/// part of `identity` (the identity-mapped kernel image, physical bytes)
/// that a run holds. Laid out by [`header`], slot `s` is at file offset
/// `data_start + s * PAGE`.
pub fn snapshot_loads(
    runs: &[(u64, u64)],
    map_base: u64,
    identity: core::ops::Range<u64>,
) -> Vec<Load> {
    let mut loads: Vec<Load> = runs
        .iter()
        .map(|&(first, frames)| Load {
            vaddr: map_base + first * PAGE,
            paddr: first * PAGE,
            len: frames * PAGE,
            alias_of: None,
        })
        .collect();
    let start = identity.start / PAGE * PAGE;
    let end = identity.end.next_multiple_of(PAGE);
    for i in 0..loads.len() {
        let base = loads[i];
        let from = base.paddr.max(start);
        let to = (base.paddr + base.len).min(end);
        if from < to {
            loads.push(Load {
                vaddr: from,
                paddr: from,
                len: to - from,
                alias_of: Some(i),
            });
        }
    }
    loads
}

/// What a file's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A finished core file.
    Complete,
    /// A snapshot that never finished.
    Incomplete,
    /// Neither.
    Unknown,
}

/// Classifies a file by its first 16 bytes.
pub fn classify(start: &[u8]) -> Kind {
    if start.len() >= 16 && start[..16] == INCOMPLETE_MAGIC {
        Kind::Incomplete
    } else if start.len() >= 18 && start[..4] == [0x7f, b'E', b'L', b'F'] && start[16] == 4 {
        Kind::Complete
    } else {
        Kind::Unknown
    }
}

/// A parsed core file's header region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Core {
    /// Each `PT_LOAD`: (vaddr, paddr, file offset, length).
    pub loads: Vec<(u64, u64, u64, u64)>,
    /// Registers from `NT_PRSTATUS`.
    pub registers: Option<Registers>,
    /// The metadata note's text.
    pub meta: Option<String>,
}

/// Why a file is not a core file of this kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub &'static str);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a snapshot core file: {}", self.0)
    }
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ParseError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(ParseError("truncated"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, ParseError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(ParseError("truncated"))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, ParseError> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
        .ok_or(ParseError("truncated"))
}

/// Parses the header region (at least up to the end of the notes); every
/// offset is bounds-checked.
pub fn parse(bytes: &[u8]) -> Result<Core, ParseError> {
    match classify(bytes) {
        Kind::Complete => {}
        Kind::Incomplete => return Err(ParseError("the snapshot never finished")),
        Kind::Unknown => return Err(ParseError("no ELF core header")),
    }
    if bytes[4] != 2 || bytes[5] != 1 || u16_at(bytes, 18)? != EM_X86_64 {
        return Err(ParseError("not 64-bit little-endian x86_64"));
    }
    let phoff = u64_at(bytes, 32)? as usize;
    let phnum = usize::from(u16_at(bytes, 56)?);
    if usize::from(u16_at(bytes, 54)?) != PHDR_SIZE as usize {
        return Err(ParseError("unexpected program header size"));
    }
    let mut core = Core {
        loads: Vec::new(),
        registers: None,
        meta: None,
    };
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * PHDR_SIZE as usize)
            .ok_or(ParseError("program headers out of range"))?;
        let kind = u32_at(bytes, at)?;
        let offset = u64_at(bytes, at + 8)?;
        let vaddr = u64_at(bytes, at + 16)?;
        let paddr = u64_at(bytes, at + 24)?;
        let len = u64_at(bytes, at + 32)?;
        match kind {
            PT_LOAD => core.loads.push((vaddr, paddr, offset, len)),
            PT_NOTE => parse_notes(bytes, offset as usize, len as usize, &mut core)?,
            _ => {}
        }
    }
    Ok(core)
}

fn parse_notes(bytes: &[u8], start: usize, len: usize, core: &mut Core) -> Result<(), ParseError> {
    let end = start.checked_add(len).filter(|&e| e <= bytes.len());
    let end = end.ok_or(ParseError("notes out of range"))?;
    let mut at = start;
    while at + 12 <= end {
        let namesz = u32_at(bytes, at)? as usize;
        let descsz = u32_at(bytes, at + 4)? as usize;
        let kind = u32_at(bytes, at + 8)?;
        let name_at = at + 12;
        let desc_at = name_at + namesz.next_multiple_of(4);
        let next = desc_at
            .checked_add(descsz.next_multiple_of(4))
            .filter(|&n| n <= end)
            .ok_or(ParseError("note out of range"))?;
        let name = &bytes[name_at..name_at + namesz.saturating_sub(1)];
        let desc = &bytes[desc_at..desc_at + descsz];
        match (name, kind) {
            (b"CORE", NT_PRSTATUS) if desc.len() >= PRSTATUS_REGS + 27 * 8 => {
                let mut regs = Registers::default();
                for (i, r) in regs.0.iter_mut().enumerate() {
                    *r = u64_at(desc, PRSTATUS_REGS + 8 * i)?;
                }
                core.registers = Some(regs);
            }
            (b"SNAPKERN", NT_SNAPSHOT_META) => {
                core.meta = Some(String::from_utf8_lossy(desc).into_owned());
            }
            _ => {}
        }
        at = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn snapshot_loads_put_each_slot_at_its_rank() {
        // Frames 1..6 and 8..12; the image (identity-mapped) spans 4..9.
        let runs = [(1, 5), (8, 4)];
        let loads = snapshot_loads(&runs, 0xffff_8000_0000_0000, 4 * PAGE..9 * PAGE - 100);
        assert_eq!(loads.len(), 4);
        assert_eq!(loads[0].vaddr, 0xffff_8000_0000_0000 + PAGE);
        assert_eq!(
            (loads[2].vaddr, loads[2].len, loads[2].alias_of),
            (4 * PAGE, 2 * PAGE, Some(0))
        );
        assert_eq!(
            (loads[3].vaddr, loads[3].len, loads[3].alias_of),
            (8 * PAGE, PAGE, Some(1))
        );
        let (_, layout) = header(&loads, &Registers::default(), "").unwrap();
        // Slot of frame f: 1..6 -> 0..5, 8..12 -> 5..9.
        let slot_offset = |slot: u64| layout.data_start + slot * PAGE;
        assert_eq!(layout.offsets[0], slot_offset(0));
        assert_eq!(layout.offsets[1], slot_offset(5));
        assert_eq!(layout.offsets[2], slot_offset(3), "frame 4 is slot 3");
        assert_eq!(layout.offsets[3], slot_offset(5), "frame 8 is slot 5");
        assert_eq!(layout.total, slot_offset(9));
        assert!(snapshot_loads(&runs, 0, 100 * PAGE..101 * PAGE).len() == 2);
    }

    fn loads() -> Vec<Load> {
        vec![
            Load {
                vaddr: 0xffff_8000_0000_0000,
                paddr: 0,
                len: 0x10_0000,
                alias_of: None,
            },
            Load {
                vaddr: 0xffff_8000_0020_0000,
                paddr: 0x20_0000,
                len: 0x40_0000,
                alias_of: None,
            },
            // The kernel image, identity-mapped, shares the bytes above.
            Load {
                vaddr: 0x20_0000,
                paddr: 0x20_0000,
                len: 0x8000,
                alias_of: Some(1),
            },
        ]
    }

    #[test]
    fn header_round_trips_through_the_parser() {
        let mut regs = Registers::default();
        regs.0[Registers::RIP] = 0x20_1234;
        regs.0[Registers::RSP] = 0xffff_9000_0000_0ff8;
        let (bytes, layout) = header(&loads(), &regs, "instant_ns=5\npages=1280\n").unwrap();
        assert_eq!(bytes.len() as u64, layout.data_start);
        assert!(layout.data_start.is_multiple_of(PAGE));
        assert_eq!(layout.offsets[1], layout.offsets[0] + 0x10_0000);
        assert_eq!(layout.offsets[2], layout.offsets[1], "alias shares bytes");
        assert_eq!(layout.total, layout.data_start + 0x50_0000);
        let core = parse(&bytes).unwrap();
        assert_eq!(core.loads.len(), 3);
        assert_eq!(
            core.loads[2],
            (0x20_0000, 0x20_0000, layout.offsets[1], 0x8000)
        );
        assert_eq!(core.registers, Some(regs));
        assert_eq!(core.meta.as_deref(), Some("instant_ns=5\npages=1280\n"));
        assert_eq!(classify(&bytes), Kind::Complete);
    }

    #[test]
    fn unfinished_and_foreign_files_are_told_apart() {
        let mut partial = vec![0u8; 4096];
        partial[..16].copy_from_slice(&INCOMPLETE_MAGIC);
        assert_eq!(classify(&partial), Kind::Incomplete);
        assert_eq!(
            parse(&partial).unwrap_err(),
            ParseError("the snapshot never finished")
        );
        assert_eq!(classify(&[0u8; 64]), Kind::Unknown);
    }

    #[test]
    fn bad_layouts_are_refused() {
        let mut l = loads();
        l[0].len = 100;
        assert_eq!(layout_with(&l, 0).unwrap_err(), LayoutError::Unaligned(0));
        let mut l = loads();
        l[2].paddr = 0x70_0000;
        assert_eq!(layout_with(&l, 0).unwrap_err(), LayoutError::BadAlias(2));
    }

    #[test]
    fn truncated_or_garbled_headers_never_panic() {
        let (bytes, _) = header(&loads(), &Registers::default(), "x=1\n").unwrap();
        for cut in [0, 10, 17, 40, 63, 100, 200, 400] {
            let _ = parse(&bytes[..cut]);
        }
        let mut rng = crate::support::rng::Rng::new(3);
        for _ in 0..2000 {
            let mut b = bytes.clone();
            for _ in 0..4 {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = rng.next_u64() as u8;
            }
            let _ = parse(&b);
        }
    }
}
