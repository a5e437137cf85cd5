//! virtio 1.x, the hardware-independent half: the device-status handshake
//! and feature negotiation, split virtqueues, and the virtio-blk request
//! engine, all written against three small traits the kernel implements
//! with real hardware and the host tests with a fake device:
//!
//! - [`Transport`]: the device's registers (the modern PCI transport's
//!   common configuration, notification and device configuration);
//! - [`Hal`]: DMA memory, allocated ([`DmaRegion`]) or lent by a caller
//!   for one request (mapping its buffers to device-visible segments);
//! - [`Wait`]: how to wait for the device (interrupt or polling).
//!
//! The layering follows well-kept drivers (rcore-os/virtio-drivers): a
//! transport under a device, a HAL for DMA, queue logic tested on the host.
//!
//! This module must never trust the device: every index and length it
//! reports is checked, and a device that breaks the protocol is reported as
//! broken, never believed.

pub mod blk;
pub mod device;
#[cfg(test)]
pub mod fake;
pub mod pci;
pub mod queue;
pub mod stages;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_queues;

use alloc::vec::Vec;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u8 = 128;
}

/// Feature bits common to all devices.
pub mod feature {
    /// The device is virtio 1.x (not legacy).
    pub const VERSION_1: u64 = 1 << 32;
}

/// Offsets in the common configuration structure (virtio 1.x, 4.1.4.3).
pub mod common {
    /// Selects which 32 bits `DEVICE_FEATURE` shows.
    pub const DEVICE_FEATURE_SELECT: usize = 0x00;
    /// 32 bits of the device's features.
    pub const DEVICE_FEATURE: usize = 0x04;
    /// Selects which 32 bits `DRIVER_FEATURE` sets.
    pub const DRIVER_FEATURE_SELECT: usize = 0x08;
    /// 32 bits of the accepted features.
    pub const DRIVER_FEATURE: usize = 0x0c;
    /// MSI-X vector for configuration changes (16 bits).
    pub const CONFIG_MSIX_VECTOR: usize = 0x10;
    /// Number of queues (16 bits).
    pub const NUM_QUEUES: usize = 0x12;
    /// Device status (8 bits).
    pub const DEVICE_STATUS: usize = 0x14;
    /// Changes whenever the device configuration changes (8 bits).
    pub const CONFIG_GENERATION: usize = 0x15;
    /// Selects the queue the following fields refer to (16 bits).
    pub const QUEUE_SELECT: usize = 0x16;
    /// Queue size: the device's maximum, then the driver's choice (16 bits).
    pub const QUEUE_SIZE: usize = 0x18;
    /// MSI-X vector of the queue (16 bits).
    pub const QUEUE_MSIX_VECTOR: usize = 0x1a;
    /// Queue enable (16 bits).
    pub const QUEUE_ENABLE: usize = 0x1c;
    /// Where the queue's notifications go, in multiplier units (16 bits).
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
    /// Descriptor table address (64 bits).
    pub const QUEUE_DESC: usize = 0x20;
    /// Available ring address (64 bits).
    pub const QUEUE_DRIVER: usize = 0x28;
    /// Used ring address (64 bits).
    pub const QUEUE_DEVICE: usize = 0x30;
    /// "No MSI-X vector".
    pub const NO_VECTOR: u16 = 0xffff;
}

/// Register access widths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// 8 bits.
    U8,
    /// 16 bits.
    U16,
    /// 32 bits.
    U32,
}

/// A device's registers.
pub trait Transport {
    /// Reads the common configuration field at `offset`.
    fn read_common(&self, offset: usize, width: Width) -> u32;
    /// Writes the common configuration field at `offset`.
    fn write_common(&self, offset: usize, width: Width, value: u32);
    /// Reads the device-specific configuration at `offset`.
    fn read_device(&self, offset: usize, width: Width) -> u32;
    /// Notifies the device of new buffers in `queue`; `offset` is the
    /// queue's notification offset in bytes (`queue_notify_off` times the
    /// multiplier, see [`Transport::notify_multiplier`]).
    fn notify(&self, offset: u32, queue: u16);
    /// The notification offset multiplier.
    fn notify_multiplier(&self) -> u32;
    /// Whether a queue's notification offset lies inside the notification
    /// area (the device chooses it; a bad one is refused at setup).
    fn notify_in_range(&self, offset: u32) -> bool;
}

/// A shared transport: the queues of one device each hold a handle.
impl<T: Transport + ?Sized> Transport for alloc::sync::Arc<T> {
    fn read_common(&self, offset: usize, width: Width) -> u32 {
        (**self).read_common(offset, width)
    }
    fn write_common(&self, offset: usize, width: Width, value: u32) {
        (**self).write_common(offset, width, value)
    }
    fn read_device(&self, offset: usize, width: Width) -> u32 {
        (**self).read_device(offset, width)
    }
    fn notify(&self, offset: u32, queue: u16) {
        (**self).notify(offset, queue)
    }
    fn notify_multiplier(&self) -> u32 {
        (**self).notify_multiplier()
    }
    fn notify_in_range(&self, offset: u32) -> bool {
        (**self).notify_in_range(offset)
    }
}

/// A piece of memory the device reads or writes, by physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Physical (device-visible) address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Memory shared with the device for the life of a driver (rings, request
/// headers). Offsets are checked by the implementation; accesses are
/// single, untorn loads and stores the device sees in program order.
pub trait DmaRegion {
    /// Device-visible address of byte 0.
    fn phys(&self) -> u64;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads the byte at `offset`.
    fn read_u8(&self, offset: usize) -> u8;
    /// Reads the `u16` at `offset` (2-aligned).
    fn read_u16(&self, offset: usize) -> u16;
    /// Reads the `u32` at `offset` (4-aligned).
    fn read_u32(&self, offset: usize) -> u32;
    /// Writes the byte at `offset`.
    fn write_u8(&self, offset: usize, value: u8);
    /// Writes the `u16` at `offset` (2-aligned).
    fn write_u16(&self, offset: usize, value: u16);
    /// Writes the `u32` at `offset` (4-aligned).
    fn write_u32(&self, offset: usize, value: u32);
    /// Writes the `u64` at `offset` (8-aligned).
    fn write_u64(&self, offset: usize, value: u64);
}

/// Whether the device reads a buffer (a disk write) or writes it (a read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The device reads the buffer.
    ToDevice,
    /// The device writes the buffer.
    FromDevice,
}

/// Why DMA memory could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaError;

/// DMA memory and buffer mapping.
pub trait Hal {
    /// Memory from [`Hal::alloc`].
    type Region: DmaRegion;
    /// A lent buffer, mapped until [`Hal::unmap`].
    type Mapping;

    /// Zeroed, page-aligned memory the device may read and write for as
    /// long as the region lives (the kernel registers it as a DMA target).
    fn alloc(&self, bytes: usize) -> Result<Self::Region, DmaError>;

    /// Makes `buf` reachable by the device in `dir` and appends its
    /// device-visible segments to `out`. For [`Direction::ToDevice`] the
    /// buffer's current contents are what the device will read.
    fn map(
        &self,
        buf: &[u8],
        dir: Direction,
        out: &mut Vec<Segment>,
    ) -> Result<Self::Mapping, DmaError>;

    /// Ends a mapping once the device is done with it. `FromDevice`
    /// mappings pass their buffer, which then holds what the device wrote.
    fn unmap(&self, mapping: Self::Mapping, buf: Option<&mut [u8]>);
}

/// Waiting for the device.
pub trait Wait {
    /// Returns once `done()` holds. `done` is cheap (it reads the used
    /// ring's index); an interrupt-driven implementation blocks between
    /// checks, a polling one spins.
    fn wait(&self, done: &mut dyn FnMut() -> bool);
}
