//! Block devices and the buses under them: the [`block::BlockDevice`]
//! interface every disk user works against (with an in-memory disk for
//! tests), PCI configuration-space decoding, and the virtio transport with
//! the virtio-blk driver (and a fake device that misbehaves on request).
//!
//! The hardware sits behind the [`virtio::Hal`] and [`virtio::Transport`]
//! traits; nothing here may assume a particular machine.

pub mod block;
pub mod extended;
pub mod pci;
pub mod virtio;
