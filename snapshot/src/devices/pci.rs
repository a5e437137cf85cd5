//! PCI configuration space, read through a small trait: enumeration across
//! bridges, the capability list, BARs, and MSI-X.
//!
//! The kernel implements [`ConfigSpace`] with the legacy `0xCF8`/`0xCFC`
//! ports; host tests use a fake. Everything read from a device is treated
//! as untrusted: capability lists are walked with a bound (a looping list
//! ends the walk), and bridges are visited once per bus.
//!
//! This module must never map or touch device memory itself; it only
//! decodes where things are.

use alloc::vec::Vec;
use core::fmt;

/// A function's bus, device and function numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Address {
    /// Bus (0..=255).
    pub bus: u8,
    /// Device (0..32).
    pub device: u8,
    /// Function (0..8).
    pub function: u8,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Access to configuration space, 32 bits at a time at 4-byte-aligned
/// offsets (0..256).
pub trait ConfigSpace {
    /// Reads the dword at `offset`.
    fn read32(&self, at: Address, offset: u8) -> u32;
    /// Writes the dword at `offset`.
    fn write32(&self, at: Address, offset: u8, value: u32);

    /// Reads the 16 bits at `offset` (2-byte aligned).
    fn read16(&self, at: Address, offset: u8) -> u16 {
        (self.read32(at, offset & !3) >> ((offset & 2) * 8)) as u16
    }

    /// Reads the byte at `offset`.
    fn read8(&self, at: Address, offset: u8) -> u8 {
        (self.read32(at, offset & !3) >> ((offset & 3) * 8)) as u8
    }
}

/// Standard header offsets.
pub mod reg {
    /// Vendor ID (16) and device ID (16).
    pub const ID: u8 = 0x00;
    /// Command (16) and status (16).
    pub const COMMAND: u8 = 0x04;
    /// Revision, prog-if, subclass, class.
    pub const CLASS: u8 = 0x08;
    /// Header type (bits 0-6) and multi-function (bit 7), at byte 0x0e.
    pub const HEADER_TYPE: u8 = 0x0e;
    /// BAR 0; BAR n is at `BAR0 + 4n`.
    pub const BAR0: u8 = 0x10;
    /// Bridges: primary, secondary, subordinate bus numbers.
    pub const BRIDGE_BUSES: u8 = 0x18;
    /// First capability pointer.
    pub const CAPABILITIES: u8 = 0x34;
    /// Status bit: the capability list exists.
    pub const STATUS_CAPABILITIES: u16 = 1 << 4;
    /// Command bits.
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    /// Command bit: the device may master the bus (DMA).
    pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
    /// Command bit: legacy INTx disabled.
    pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
}

/// Capability IDs.
pub mod cap {
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
    /// Vendor-specific (virtio uses these).
    pub const VENDOR: u8 = 0x09;
}

/// One function found by [`enumerate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Function {
    /// Where it is.
    pub address: Address,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class, subclass, prog-if.
    pub class: (u8, u8, u8),
}

const MAX_FUNCTIONS: usize = 256 * 32 * 8;

/// Every function reachable from bus 0, following PCI-to-PCI bridges; each
/// bus is scanned at most once, whatever the bridges claim.
pub fn enumerate(cfg: &impl ConfigSpace) -> Vec<Function> {
    let mut found = Vec::new();
    let mut scanned = [false; 256];
    let mut pending = Vec::from([0u8]);
    while let Some(bus) = pending.pop() {
        if core::mem::replace(&mut scanned[bus as usize], true) {
            continue;
        }
        for device in 0..32 {
            let first = Address {
                bus,
                device,
                function: 0,
            };
            if cfg.read16(first, reg::ID) == 0xffff {
                continue;
            }
            let functions = if cfg.read8(first, reg::HEADER_TYPE) & 0x80 != 0 {
                8
            } else {
                1
            };
            for function in 0..functions {
                let at = Address {
                    bus,
                    device,
                    function,
                };
                let id = cfg.read32(at, reg::ID);
                if id & 0xffff == 0xffff {
                    continue;
                }
                let class = cfg.read32(at, reg::CLASS);
                found.push(Function {
                    address: at,
                    vendor: id as u16,
                    device: (id >> 16) as u16,
                    class: ((class >> 24) as u8, (class >> 16) as u8, (class >> 8) as u8),
                });
                if cfg.read8(at, reg::HEADER_TYPE) & 0x7f == 1 {
                    let secondary = (cfg.read32(at, reg::BRIDGE_BUSES) >> 8) as u8;
                    if secondary != 0 {
                        pending.push(secondary);
                    }
                }
                if found.len() >= MAX_FUNCTIONS {
                    return found;
                }
            }
        }
    }
    found.sort_by_key(|f| f.address);
    found
}

/// A capability: its ID and where its structure starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// Capability ID.
    pub id: u8,
    /// Offset of its first byte in configuration space.
    pub offset: u8,
}

/// The capability list, in order. A pointer into the standard header, a
/// misaligned pointer or a list longer than configuration space can hold
/// ends the walk.
pub fn capabilities(cfg: &impl ConfigSpace, at: Address) -> Vec<Capability> {
    let mut caps = Vec::new();
    let status = (cfg.read32(at, reg::COMMAND) >> 16) as u16;
    if status & reg::STATUS_CAPABILITIES == 0 {
        return caps;
    }
    let mut offset = cfg.read8(at, reg::CAPABILITIES) & !3;
    // At most (256 - 64) / 4 capabilities fit.
    while offset >= 0x40 && caps.len() < 48 {
        let head = cfg.read16(at, offset);
        caps.push(Capability {
            id: head as u8,
            offset,
        });
        offset = ((head >> 8) as u8) & !3;
    }
    caps
}

/// A decoded base address register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bar {
    /// Memory space at `base`.
    Memory {
        /// Physical base address.
        base: u64,
        /// A 64-bit BAR (it also uses the next register).
        wide: bool,
    },
    /// I/O space at `port`.
    Io {
        /// First port.
        port: u32,
    },
    /// Not implemented, or the upper half of a 64-bit BAR.
    Absent,
}

/// Decodes BAR `index` (0..6).
pub fn bar(cfg: &impl ConfigSpace, at: Address, index: u8) -> Bar {
    if index >= 6 {
        return Bar::Absent;
    }
    let low = cfg.read32(at, reg::BAR0 + 4 * index);
    if low & 1 == 1 {
        return Bar::Io { port: low & !3 };
    }
    let wide = (low >> 1) & 3 == 2;
    let mut base = u64::from(low & !0xf);
    if wide {
        if index == 5 {
            return Bar::Absent;
        }
        base |= u64::from(cfg.read32(at, reg::BAR0 + 4 * (index + 1))) << 32;
    }
    if base == 0 {
        Bar::Absent
    } else {
        Bar::Memory { base, wide }
    }
}

/// Sets command bits (memory space, bus master, INTx disable, ...).
pub fn enable(cfg: &impl ConfigSpace, at: Address, bits: u16) {
    let value = cfg.read32(at, reg::COMMAND);
    // The upper half is the status register, whose bits clear on a written
    // one: write zeros there.
    cfg.write32(at, reg::COMMAND, (value & 0xffff) | u32::from(bits));
}

/// Where a function's MSI-X table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msix {
    /// The capability's offset.
    pub cap: u8,
    /// Table entries.
    pub entries: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Byte offset of the table in that BAR.
    pub table_offset: u32,
}

/// Bytes in one MSI-X table entry.
pub const MSIX_ENTRY_SIZE: usize = 16;

/// Reads the MSI-X capability, if the function has one.
pub fn msix(cfg: &impl ConfigSpace, at: Address) -> Option<Msix> {
    let cap = capabilities(cfg, at)
        .into_iter()
        .find(|c| c.id == cap::MSIX)?;
    let control = cfg.read16(at, cap.offset + 2);
    let table = cfg.read32(at, cap.offset + 4);
    Some(Msix {
        cap: cap.offset,
        entries: (control & 0x7ff) + 1,
        table_bar: (table & 7) as u8,
        table_offset: table & !7,
    })
}

/// Turns MSI-X on (and the function mask off), which also turns INTx off.
pub fn enable_msix(cfg: &impl ConfigSpace, at: Address, msix: &Msix) {
    let value = cfg.read32(at, msix.cap);
    let enabled = (value | (1 << 31)) & !(1 << 30);
    cfg.write32(at, msix.cap, enabled);
}

/// The MSI message (address, data) that delivers `vector` to the local
/// APIC `apic_id`: fixed delivery, edge-triggered, physical destination.
pub fn msi_message(apic_id: u8, vector: u8) -> (u64, u32) {
    (0xfee0_0000 | (u64::from(apic_id) << 12), u32::from(vector))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Configuration space as a map of dwords; absent functions read ones.
    #[derive(Default)]
    struct FakeConfig(RefCell<BTreeMap<(Address, u8), u32>>);

    fn addr(bus: u8, device: u8, function: u8) -> Address {
        Address {
            bus,
            device,
            function,
        }
    }

    impl FakeConfig {
        fn set(&self, at: Address, offset: u8, value: u32) {
            self.0.borrow_mut().insert((at, offset), value);
        }
        fn function(&self, at: Address, vendor: u16, device: u16, header: u8) {
            self.set(at, 0, u32::from(device) << 16 | u32::from(vendor));
            self.set(at, 0x0c, u32::from(header) << 16);
        }
    }

    impl ConfigSpace for FakeConfig {
        fn read32(&self, at: Address, offset: u8) -> u32 {
            let map = self.0.borrow();
            if !map.contains_key(&(at, 0)) {
                return !0;
            }
            map.get(&(at, offset)).copied().unwrap_or(0)
        }
        fn write32(&self, at: Address, offset: u8, value: u32) {
            self.set(at, offset, value);
        }
    }

    #[test]
    fn enumeration_follows_bridges_and_multifunction_devices_once() {
        let cfg = FakeConfig::default();
        cfg.function(addr(0, 0, 0), 0x8086, 0x29c0, 0);
        // A multi-function device with functions 0 and 3.
        cfg.function(addr(0, 2, 0), 0x1af4, 0x1042, 0x80);
        cfg.function(addr(0, 2, 3), 0x1af4, 0x1041, 0);
        // A bridge to bus 1, and a second bridge on bus 1 pointing back at 1.
        cfg.function(addr(0, 5, 0), 0x1b36, 0x000c, 1);
        cfg.set(addr(0, 5, 0), reg::BRIDGE_BUSES, 0x0001_0100);
        cfg.function(addr(1, 0, 0), 0x1af4, 0x1042, 0);
        cfg.function(addr(1, 1, 0), 0x1b36, 0x000c, 1);
        cfg.set(addr(1, 1, 0), reg::BRIDGE_BUSES, 0x0001_0101);
        let found: Vec<_> = enumerate(&cfg).iter().map(|f| f.address).collect();
        assert_eq!(
            found,
            [
                addr(0, 0, 0),
                addr(0, 2, 0),
                addr(0, 2, 3),
                addr(0, 5, 0),
                addr(1, 0, 0),
                addr(1, 1, 0)
            ]
        );
    }

    #[test]
    fn capability_walk_stops_on_loops_and_bad_pointers() {
        let cfg = FakeConfig::default();
        let at = addr(0, 3, 0);
        cfg.function(at, 0x1af4, 0x1042, 0);
        cfg.set(at, reg::COMMAND, u32::from(reg::STATUS_CAPABILITIES) << 16);
        cfg.set(at, reg::CAPABILITIES, 0x40);
        cfg.set(at, 0x40, 0x5009); // vendor, next 0x50
        cfg.set(at, 0x50, 0x4011); // MSI-X, next back to 0x40: a loop
        cfg.set(at, 0x54, 0x0000_2001); // table in BAR 1 at 0x2000
        cfg.set(at, 0x50, 0x4011 | 0x0003 << 16); // 4 entries
        let caps = capabilities(&cfg, at);
        assert_eq!(caps.len(), 48, "the loop is cut off");
        assert_eq!(caps[0].id, cap::VENDOR);
        let msix = msix(&cfg, at).expect("msix");
        assert_eq!(
            (msix.entries, msix.table_bar, msix.table_offset),
            (4, 1, 0x2000)
        );
        // A pointer into the standard header ends the list at once.
        cfg.set(at, reg::CAPABILITIES, 0x10);
        assert!(capabilities(&cfg, at).is_empty());
    }

    #[test]
    fn bars_decode_io_32_and_64_bit_memory() {
        let cfg = FakeConfig::default();
        let at = addr(0, 4, 0);
        cfg.function(at, 0x1af4, 0x1042, 0);
        cfg.set(at, reg::BAR0, 0xc001);
        cfg.set(at, reg::BAR0 + 4, 0xfebf_1000);
        cfg.set(at, reg::BAR0 + 16, 0xfe00_000c);
        cfg.set(at, reg::BAR0 + 20, 0x1);
        assert_eq!(bar(&cfg, at, 0), Bar::Io { port: 0xc000 });
        assert_eq!(
            bar(&cfg, at, 1),
            Bar::Memory {
                base: 0xfebf_1000,
                wide: false
            }
        );
        assert_eq!(bar(&cfg, at, 2), Bar::Absent);
        assert_eq!(
            bar(&cfg, at, 4),
            Bar::Memory {
                base: 0x1_fe00_0000,
                wide: true
            }
        );
        assert_eq!(bar(&cfg, at, 6), Bar::Absent);
    }

    #[test]
    fn msi_message_targets_the_apic() {
        assert_eq!(msi_message(0, 0x31), (0xfee0_0000, 0x31));
        assert_eq!(msi_message(3, 0x40), (0xfee0_3000, 0x40));
    }
}
