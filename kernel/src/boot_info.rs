//! What the firmware tells us at boot: the PVH `hvm_start_info` block (Xen
//! public header `arch-x86/hvm/start_info.h`) with the E820 memory map, the
//! kernel command line and the ACPI RSDP address. Copied into kernel memory
//! at once, because the block lives in low memory we do not keep; the memory
//! map is kept for the kernel's life ([`memory_map`], [`usable_ram`]).
//!
//! Reads physical memory through `memory` but never hands `memory` a
//! [`BootInfo`]: the kernel's entry passes it the RAM ranges.

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;

use spin::Once;

use crate::memory::{read_phys, read_phys_u64};

const START_INFO_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const MAX_REGIONS: usize = 128;
const MAX_CMDLINE: usize = 4096;

/// One entry of the firmware memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Physical start.
    pub start: u64,
    /// Physical end (exclusive).
    pub end: u64,
    /// E820 type: 1 is usable RAM, 2 reserved, 3 ACPI reclaimable, …
    pub kind: u32,
}

/// The boot information, copied.
#[derive(Debug)]
pub struct BootInfo {
    regions: [Region; MAX_REGIONS],
    region_count: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// Physical address of the ACPI RSDP, if the loader gave one.
    pub rsdp: Option<u64>,
}

fn read_u32(phys: u64) -> u32 {
    let mut bytes = [0; 4];
    read_phys(phys, &mut bytes);
    u32::from_le_bytes(bytes)
}

impl BootInfo {
    /// Reads the start-info block at physical `start_info`. Runs before the
    /// heap exists, so it fills fixed-size arrays.
    pub fn read(start_info: u64) -> BootInfo {
        let magic = read_u32(start_info);
        assert_eq!(
            magic, START_INFO_MAGIC,
            "not booted through PVH: bad start_info magic {magic:#x}"
        );
        let version = read_u32(start_info + 4);
        let cmdline_paddr = read_phys_u64(start_info + 24);
        let rsdp = read_phys_u64(start_info + 32);
        let mut info = BootInfo {
            regions: [Region {
                start: 0,
                end: 0,
                kind: 0,
            }; MAX_REGIONS],
            region_count: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            rsdp: (rsdp != 0).then_some(rsdp),
        };
        assert!(
            version >= 1,
            "PVH start_info version {version} has no memory map"
        );
        let memmap = read_phys_u64(start_info + 40);
        let entries = (read_u32(start_info + 48) as usize).min(MAX_REGIONS);
        for index in 0..entries {
            let entry = memmap + index as u64 * 24;
            let start = read_phys_u64(entry);
            let size = read_phys_u64(entry + 8);
            info.regions[index] = Region {
                start,
                end: start.saturating_add(size),
                kind: read_u32(entry + 16),
            };
        }
        info.region_count = entries;
        if cmdline_paddr != 0 {
            read_phys(cmdline_paddr, &mut info.cmdline[..MAX_CMDLINE - 1]);
            info.cmdline_len = info.cmdline.iter().position(|&b| b == 0).unwrap_or(0);
        }
        info
    }

    /// Every region of the memory map.
    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.region_count]
    }

    /// The usable RAM ranges.
    pub fn ram(&self) -> impl Iterator<Item = Range<u64>> + Clone + '_ {
        ram_of(self.regions())
    }

    /// The kernel command line (`-append`); invalid UTF-8 becomes empty.
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// The command line as an owned string, for after boot info is gone.
    pub fn cmdline_owned(&self) -> String {
        String::from(self.cmdline())
    }

    /// Keeps a copy of the memory map for [`memory_map`] and [`usable_ram`]
    /// (once the heap exists; the first call wins).
    pub fn keep_memory_map(&self) {
        KEPT.call_once(|| self.regions().to_vec());
    }
}

static KEPT: Once<Vec<Region>> = Once::new();

fn ram_of(regions: &[Region]) -> impl Iterator<Item = Range<u64>> + Clone + '_ {
    regions
        .iter()
        .filter(|r| r.kind == E820_RAM && r.end > r.start)
        .map(|r| r.start..r.end)
}

/// The firmware memory map (empty before [`BootInfo::keep_memory_map`]).
pub fn memory_map() -> &'static [Region] {
    KEPT.get().map_or(&[], Vec::as_slice)
}

/// The usable RAM ranges of the firmware memory map.
pub fn usable_ram() -> impl Iterator<Item = Range<u64>> {
    ram_of(memory_map())
}

/// The name of an E820 type, for the memory-map summary.
pub fn region_kind_name(kind: u32) -> &'static str {
    match kind {
        1 => "usable",
        2 => "reserved",
        3 => "ACPI reclaimable",
        4 => "ACPI NVS",
        5 => "bad",
        _ => "other",
    }
}
