//! PCI configuration space through configuration mechanism #1: the address
//! goes to port `0xCF8`, the data comes and goes through `0xCFC`. The two
//! accesses form one transaction, so they run under a lock.
//!
//! Decoding (enumeration, capabilities, BARs) is `snapshot::devices::pci`'s job;
//! this module only moves dwords.

use snapshot::devices::pci::{Address, ConfigSpace};

use super::cpu::{inl, outl};
use crate::sync::IrqMutex;

const ADDRESS_PORT: u16 = 0xcf8;
const DATA_PORT: u16 = 0xcfc;

static PORTS: IrqMutex<()> = IrqMutex::new(());

/// Configuration space of every function, through the legacy ports.
#[derive(Debug, Clone, Copy, Default)]
pub struct PortConfig;

fn address(at: Address, offset: u8) -> u32 {
    1 << 31
        | u32::from(at.bus) << 16
        | u32::from(at.device & 0x1f) << 11
        | u32::from(at.function & 7) << 8
        | u32::from(offset & 0xfc)
}

impl ConfigSpace for PortConfig {
    fn read32(&self, at: Address, offset: u8) -> u32 {
        let _ports = PORTS.lock();
        outl(ADDRESS_PORT, address(at, offset));
        inl(DATA_PORT)
    }

    fn write32(&self, at: Address, offset: u8, value: u32) {
        let _ports = PORTS.lock();
        outl(ADDRESS_PORT, address(at, offset));
        outl(DATA_PORT, value);
    }
}
