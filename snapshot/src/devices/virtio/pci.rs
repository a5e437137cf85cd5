//! Finding a virtio device's register blocks through its PCI capabilities
//! (virtio 1.x, 4.1.4): common configuration, notifications, ISR status
//! and device-specific configuration, each a window into one BAR.
//!
//! Only the modern transport is supported (devices that work with QEMU's
//! `disable-legacy=on`); a device without the modern capabilities is
//! refused with the missing one named.

use core::fmt;

use crate::devices::pci::{cap, Address, Capability, ConfigSpace};

/// The virtio PCI vendor.
pub const VENDOR: u16 = 0x1af4;
/// Modern device IDs are `0x1040 + device type`.
pub const MODERN_BASE: u16 = 0x1040;
/// Device type of a block device.
pub const TYPE_BLOCK: u16 = 2;
/// The transitional (legacy-capable) block device ID.
pub const TRANSITIONAL_BLOCK: u16 = 0x1001;

/// Whether a function is a virtio block device.
pub fn is_block(vendor: u16, device: u16) -> bool {
    vendor == VENDOR && (device == MODERN_BASE + TYPE_BLOCK || device == TRANSITIONAL_BLOCK)
}

const COMMON: u8 = 1;
const NOTIFY: u8 = 2;
const ISR: u8 = 3;
const DEVICE: u8 = 4;

/// A register block: `length` bytes at `offset` in BAR `bar`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The BAR (0..6).
    pub bar: u8,
    /// Byte offset in the BAR.
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
}

/// The register blocks of a modern virtio PCI device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Common configuration.
    pub common: Window,
    /// Notification area.
    pub notify: Window,
    /// Bytes between queues' notification addresses, per `queue_notify_off`.
    pub notify_multiplier: u32,
    /// ISR status (INTx only).
    pub isr: Window,
    /// Device-specific configuration.
    pub device: Window,
}

/// A capability that must be there and is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingCapability(pub &'static str);

impl fmt::Display for MissingCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no virtio {} capability (a legacy-only device?)", self.0)
    }
}

/// Reads the virtio capabilities among `caps`. The first of each kind
/// counts (the spec lets devices offer alternatives in order of preference).
pub fn layout(
    cfg: &impl ConfigSpace,
    at: Address,
    caps: &[Capability],
) -> Result<Layout, MissingCapability> {
    let mut found: [Option<Window>; 5] = [None; 5];
    let mut multiplier = None;
    for c in caps.iter().filter(|c| c.id == cap::VENDOR) {
        let head = cfg.read32(at, c.offset);
        let (len, kind) = ((head >> 16) as u8, (head >> 24) as u8);
        if len < 16 || !(COMMON..=DEVICE).contains(&kind) || c.offset > 0xff - 16 {
            continue;
        }
        let window = Window {
            bar: cfg.read8(at, c.offset + 4),
            offset: cfg.read32(at, c.offset + 8),
            length: cfg.read32(at, c.offset + 12),
        };
        if window.bar > 5 || found[kind as usize].is_some() {
            continue;
        }
        if kind == NOTIFY {
            if len < 20 || c.offset > 0xff - 20 {
                continue;
            }
            multiplier = Some(cfg.read32(at, c.offset + 16));
        }
        found[kind as usize] = Some(window);
    }
    // A window too small for what it must hold counts as missing.
    let min_len = |kind: u8| match kind {
        COMMON => 0x38,
        NOTIFY => 2,
        _ => 1,
    };
    let need = |kind: u8, name| {
        found[kind as usize]
            .filter(|w| w.length >= min_len(kind))
            .ok_or(MissingCapability(name))
    };
    Ok(Layout {
        common: need(COMMON, "common configuration")?,
        notify: need(NOTIFY, "notification")?,
        notify_multiplier: multiplier.unwrap_or(0),
        isr: need(ISR, "ISR status")?,
        device: need(DEVICE, "device configuration")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::capabilities;
    use alloc::string::ToString;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    struct Cfg(RefCell<BTreeMap<u8, u32>>);

    impl ConfigSpace for Cfg {
        fn read32(&self, _: Address, offset: u8) -> u32 {
            self.0.borrow().get(&offset).copied().unwrap_or(0)
        }
        fn write32(&self, _: Address, offset: u8, value: u32) {
            self.0.borrow_mut().insert(offset, value);
        }
    }

    const AT: Address = Address {
        bus: 0,
        device: 3,
        function: 0,
    };

    fn device_with(kinds: &[u8]) -> Cfg {
        let cfg = Cfg(RefCell::new(BTreeMap::new()));
        cfg.write32(AT, 0x04, 1 << 20);
        cfg.write32(AT, 0x34, 0x40);
        for (i, &kind) in kinds.iter().enumerate() {
            let at = 0x40 + 0x14 * i as u8;
            let next = if i + 1 < kinds.len() { at + 0x14 } else { 0 };
            cfg.write32(
                AT,
                at,
                u32::from(kind) << 24 | 0x14 << 16 | u32::from(next) << 8 | 0x09,
            );
            cfg.write32(AT, at + 4, 4);
            cfg.write32(AT, at + 8, u32::from(kind) * 0x1000);
            cfg.write32(AT, at + 12, 0x1000);
            cfg.write32(AT, at + 16, 4);
        }
        cfg
    }

    #[test]
    fn modern_capabilities_are_found() {
        let cfg = device_with(&[COMMON, ISR, DEVICE, NOTIFY]);
        let layout = layout(&cfg, AT, &capabilities(&cfg, AT)).expect("layout");
        assert_eq!(
            layout.common,
            Window {
                bar: 4,
                offset: 0x1000,
                length: 0x1000
            }
        );
        assert_eq!(layout.notify.offset, 0x2000);
        assert_eq!(layout.notify_multiplier, 4);
        assert_eq!(layout.device.offset, 0x4000);
    }

    #[test]
    fn a_legacy_device_is_refused_naming_what_is_missing() {
        let cfg = device_with(&[COMMON, ISR, DEVICE]);
        let err = layout(&cfg, AT, &capabilities(&cfg, AT)).unwrap_err();
        assert_eq!(err, MissingCapability("notification"));
        assert!(err.to_string().contains("legacy"));
    }

    #[test]
    fn block_ids() {
        assert!(is_block(0x1af4, 0x1042));
        assert!(is_block(0x1af4, 0x1001));
        assert!(!is_block(0x1af4, 0x1041));
        assert!(!is_block(0x8086, 0x1042));
    }
}
