//! The IOAPIC: routes device interrupt lines (GSIs) to vectors on this CPU.
//!
//! Its address and the ISA interrupt overrides come from the ACPI MADT
//! ([`crate::acpi`]). Every line starts masked; a driver routes the line it
//! owns with [`route`].

use spin::Once;

use crate::acpi::{IoApicInfo, Polarity, Trigger};
use crate::memory::mmio::Mmio;
use crate::sync::IrqMutex;

const IOREGSEL: usize = 0x00;
const IOWIN: usize = 0x10;
const REG_VERSION: u32 = 0x01;
const MASKED: u32 = 1 << 16;

#[derive(Debug)]
struct IoApic {
    regs: Mmio,
    gsi_base: u32,
    lines: u32,
}

impl IoApic {
    fn read(&self, reg: u32) -> u32 {
        self.regs.write32(IOREGSEL, reg);
        self.regs.read32(IOWIN)
    }

    fn write(&self, reg: u32, value: u32) {
        self.regs.write32(IOREGSEL, reg);
        self.regs.write32(IOWIN, value);
    }

    /// The redirection-table index of `gsi`.
    fn line(&self, gsi: u32) -> Result<u32, RouteError> {
        gsi.checked_sub(self.gsi_base)
            .filter(|&l| l < self.lines)
            .ok_or(RouteError::NoSuchLine(gsi))
    }
}

static IOAPIC: Once<IrqMutex<IoApic>> = Once::new();

/// Maps the IOAPIC and masks all of its lines.
pub fn init(info: &IoApicInfo) {
    let regs = Mmio::map(u64::from(info.address), 4096).expect("cannot map the IOAPIC");
    let mut ioapic = IoApic {
        regs,
        gsi_base: info.gsi_base,
        lines: 0,
    };
    ioapic.lines = ((ioapic.read(REG_VERSION) >> 16) & 0xff) + 1;
    for line in 0..ioapic.lines {
        ioapic.write(0x10 + 2 * line, MASKED);
    }
    IOAPIC.call_once(|| IrqMutex::new(ioapic));
}

/// Why a route could not be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// No IOAPIC was found at boot.
    NoIoApic,
    /// The GSI is not one of this IOAPIC's lines.
    NoSuchLine(u32),
}

/// Routes `gsi` to `vector` on this CPU and unmasks it.
pub fn route(gsi: u32, vector: u8, trigger: Trigger, polarity: Polarity) -> Result<(), RouteError> {
    let ioapic = IOAPIC.get().ok_or(RouteError::NoIoApic)?.lock();
    let line = ioapic.line(gsi)?;
    let mut low = u32::from(vector);
    if polarity == Polarity::ActiveLow {
        low |= 1 << 13;
    }
    if trigger == Trigger::Level {
        low |= 1 << 15;
    }
    let high = super::apic::id() << 24;
    ioapic.write(0x10 + 2 * line + 1, high);
    ioapic.write(0x10 + 2 * line, low);
    Ok(())
}

/// Masks `gsi` again.
pub fn mask(gsi: u32) -> Result<(), RouteError> {
    let ioapic = IOAPIC.get().ok_or(RouteError::NoIoApic)?.lock();
    let line = ioapic.line(gsi)?;
    ioapic.write(0x10 + 2 * line, MASKED);
    Ok(())
}
