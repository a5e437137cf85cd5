//! Just enough ACPI to route interrupts: the RSDP, the RSDT/XSDT, and the
//! MADT's IOAPIC and interrupt-source-override entries. Tables are copied out
//! of physical memory and parsed with bounds checks; a malformed table is an
//! error, never an out-of-bounds read. What [`init`] found is kept for the
//! kernel's life ([`madt`]).

use alloc::vec;
use alloc::vec::Vec;

use spin::Once;

use crate::memory::read_phys;

/// An IOAPIC from the MADT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoApicInfo {
    /// Physical address of its registers.
    pub address: u32,
    /// The first GSI it handles.
    pub gsi_base: u32,
}

/// Interrupt line polarity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polarity {
    /// Active high (ISA default).
    ActiveHigh,
    /// Active low (PCI default).
    ActiveLow,
}

/// Interrupt trigger mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Edge-triggered (ISA default).
    Edge,
    /// Level-triggered (PCI default).
    Level,
}

/// Where an ISA IRQ really arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsaRoute {
    /// The GSI.
    pub gsi: u32,
    /// Its polarity.
    pub polarity: Polarity,
    /// Its trigger mode.
    pub trigger: Trigger,
}

/// What the MADT says.
#[derive(Debug, Clone, Default)]
pub struct Madt {
    /// The IOAPICs.
    pub ioapics: Vec<IoApicInfo>,
    /// Local APIC ids of the CPUs the firmware lists as enabled, boot CPU
    /// included, in table order (entry type 0, ACPI 6.5, 5.2.12.2).
    pub cpus: Vec<u32>,
    overrides: Vec<(u8, IsaRoute)>,
}

impl Madt {
    /// The route of ISA `irq`, honouring interrupt source overrides.
    pub fn isa_route(&self, irq: u8) -> IsaRoute {
        self.overrides
            .iter()
            .find(|(source, _)| *source == irq)
            .map(|(_, route)| *route)
            .unwrap_or(IsaRoute {
                gsi: u32::from(irq),
                polarity: Polarity::ActiveHigh,
                trigger: Trigger::Edge,
            })
    }
}

/// Why the MADT could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiError {
    /// No RSDP in the boot info or the BIOS area.
    NoRsdp,
    /// A table failed its checksum or length checks.
    BadTable(&'static str),
    /// There is no MADT.
    NoMadt,
}

fn copy(phys: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    read_phys(phys, &mut buf);
    buf
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
}

/// Copies a whole SDT (header says its length) and checks it.
fn read_table(phys: u64, name: &'static str) -> Result<Vec<u8>, AcpiError> {
    let header = copy(phys, 36);
    let len = u32_at(&header, 4).ok_or(AcpiError::BadTable(name))? as usize;
    if !(36..=1 << 20).contains(&len) {
        return Err(AcpiError::BadTable(name));
    }
    let table = copy(phys, len);
    if !checksum_ok(&table) {
        return Err(AcpiError::BadTable(name));
    }
    Ok(table)
}

fn find_rsdp(hint: Option<u64>) -> Result<u64, AcpiError> {
    if let Some(rsdp) = hint {
        return Ok(rsdp);
    }
    let bios = copy(0xe0000, 0x20000);
    (0..bios.len() - 20)
        .step_by(16)
        .find(|&at| &bios[at..at + 8] == b"RSD PTR " && checksum_ok(&bios[at..at + 20]))
        .map(|at| 0xe0000 + at as u64)
        .ok_or(AcpiError::NoRsdp)
}

static MADT: Once<Madt> = Once::new();

/// Reads the MADT once and keeps it; without one (logged), interrupt
/// routing falls back to an empty table.
pub fn init(rsdp_hint: Option<u64>) -> &'static Madt {
    MADT.call_once(|| {
        read_madt(rsdp_hint).unwrap_or_else(|e| {
            crate::log!("no interrupt routing information: {e:?}");
            Madt::default()
        })
    })
}

/// The interrupt routing information [`init`] kept.
pub fn madt() -> &'static Madt {
    MADT.get().expect("MADT read at boot")
}

/// Finds and parses the MADT.
fn read_madt(rsdp_hint: Option<u64>) -> Result<Madt, AcpiError> {
    let rsdp = copy(find_rsdp(rsdp_hint)?, 36);
    if &rsdp[..8] != b"RSD PTR " || !checksum_ok(&rsdp[..20]) {
        return Err(AcpiError::BadTable("RSDP"));
    }
    let (root, entry_size) = match (rsdp[15], u64_at(&rsdp, 24)) {
        (2.., Some(xsdt)) if xsdt != 0 => (read_table(xsdt, "XSDT")?, 8),
        _ => (
            read_table(u64::from(u32_at(&rsdp, 16).unwrap_or(0)), "RSDT")?,
            4,
        ),
    };
    let madt = (36..root.len())
        .step_by(entry_size)
        .filter_map(|at| match entry_size {
            8 => u64_at(&root, at),
            _ => u32_at(&root, at).map(u64::from),
        })
        .find(|&table| copy(table, 4) == b"APIC")
        .ok_or(AcpiError::NoMadt)?;
    parse_madt(&read_table(madt, "MADT")?)
}

fn parse_madt(table: &[u8]) -> Result<Madt, AcpiError> {
    let mut madt = Madt::default();
    let mut at = 44; // header (36) + local APIC address + flags
    while at + 2 <= table.len() {
        let (kind, len) = (table[at], table[at + 1] as usize);
        let entry = table.get(at..at + len).filter(|_| len >= 2);
        let entry = entry.ok_or(AcpiError::BadTable("MADT entry"))?;
        match kind {
            0 if len >= 8 => {
                let flags = u32_at(entry, 4).ok_or(AcpiError::BadTable("MADT local APIC"))?;
                if flags & 1 != 0 {
                    madt.cpus.push(u32::from(entry[3]));
                }
            }
            1 if len >= 12 => madt.ioapics.push(IoApicInfo {
                address: u32_at(entry, 4).ok_or(AcpiError::BadTable("MADT IOAPIC"))?,
                gsi_base: u32_at(entry, 8).ok_or(AcpiError::BadTable("MADT IOAPIC"))?,
            }),
            2 if len >= 10 => {
                let flags = u16::from_le_bytes([entry[8], entry[9]]);
                let route = IsaRoute {
                    gsi: u32_at(entry, 4).ok_or(AcpiError::BadTable("MADT override"))?,
                    polarity: if flags & 0b11 == 0b11 {
                        Polarity::ActiveLow
                    } else {
                        Polarity::ActiveHigh
                    },
                    trigger: if (flags >> 2) & 0b11 == 0b11 {
                        Trigger::Level
                    } else {
                        Trigger::Edge
                    },
                };
                madt.overrides.push((entry[3], route));
            }
            _ => {}
        }
        at += len;
    }
    Ok(madt)
}
