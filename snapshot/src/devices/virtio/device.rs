//! The device-status handshake (virtio 1.x, 3.1.1) over any [`Transport`]:
//! reset, acknowledge, negotiate features, set up queues, go live, and mark
//! the device failed when the driver gives up on it.

use core::fmt;

use super::{common, status, DmaRegion, Transport, Width};

/// Why a device could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitError {
    /// The device did not come out of reset.
    ResetTimeout,
    /// The device lacks features the driver needs (the missing bits).
    MissingFeatures(u64),
    /// The device refused the accepted feature set (FEATURES_OK cleared).
    FeaturesRejected,
    /// The queue does not exist (size 0) or is already live.
    NoQueue(u16),
    /// The device did not take the MSI-X vector.
    VectorRejected(u16),
    /// No DMA memory for the queue.
    NoMemory,
    /// The device put the queue's notification address outside its
    /// notification area.
    BadNotifyOffset(u32),
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::ResetTimeout => f.write_str("device did not finish its reset"),
            InitError::MissingFeatures(bits) => {
                write!(f, "device lacks required features {bits:#x}")
            }
            InitError::FeaturesRejected => f.write_str("device rejected the negotiated features"),
            InitError::NoQueue(q) => write!(f, "queue {q} is not available"),
            InitError::VectorRejected(v) => write!(f, "device refused MSI-X vector {v}"),
            InitError::NoMemory => f.write_str("no DMA memory for the queue"),
            InitError::BadNotifyOffset(o) => {
                write!(
                    f,
                    "queue notification offset {o:#x} is outside the notification area"
                )
            }
        }
    }
}

/// Resets the device and waits (boundedly) until it reads back reset.
pub fn reset(t: &impl Transport) -> Result<(), InitError> {
    t.write_common(common::DEVICE_STATUS, Width::U8, 0);
    for _ in 0..1_000_000 {
        if t.read_common(common::DEVICE_STATUS, Width::U8) == 0 {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(InitError::ResetTimeout)
}

fn add_status(t: &impl Transport, bits: u8) {
    let now = t.read_common(common::DEVICE_STATUS, Width::U8) as u8;
    t.write_common(common::DEVICE_STATUS, Width::U8, u32::from(now | bits));
}

/// The device's status byte.
pub fn device_status(t: &impl Transport) -> u8 {
    t.read_common(common::DEVICE_STATUS, Width::U8) as u8
}

/// The device's 64 feature bits.
pub fn device_features(t: &impl Transport) -> u64 {
    let mut bits = 0;
    for half in 0..2 {
        t.write_common(common::DEVICE_FEATURE_SELECT, Width::U32, half);
        bits |= u64::from(t.read_common(common::DEVICE_FEATURE, Width::U32)) << (32 * half);
    }
    bits
}

/// Resets, acknowledges and negotiates: accepts `wanted` features the
/// device offers, and fails (marking the device FAILED) if any of
/// `required` is missing or the device rejects the set. Returns the
/// accepted features.
pub fn negotiate(t: &impl Transport, wanted: u64, required: u64) -> Result<u64, InitError> {
    reset(t)?;
    add_status(t, status::ACKNOWLEDGE);
    add_status(t, status::DRIVER);
    let offered = device_features(t);
    if offered & required != required {
        fail(t);
        return Err(InitError::MissingFeatures(required & !offered));
    }
    let accepted = offered & (wanted | required);
    for half in 0..2 {
        t.write_common(common::DRIVER_FEATURE_SELECT, Width::U32, half);
        t.write_common(
            common::DRIVER_FEATURE,
            Width::U32,
            (accepted >> (32 * half)) as u32,
        );
    }
    add_status(t, status::FEATURES_OK);
    if device_status(t) & status::FEATURES_OK == 0 {
        fail(t);
        return Err(InitError::FeaturesRejected);
    }
    Ok(accepted)
}

/// Where a live queue's notifications go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSetup {
    /// The size chosen (a power of two).
    pub size: u16,
    /// Notification offset in bytes.
    pub notify_offset: u32,
}

/// The queue's largest size, a power of two no larger than `max` or the
/// device's maximum; 0 if the queue does not exist.
pub fn queue_size(t: &impl Transport, queue: u16, max: u16) -> u16 {
    t.write_common(common::QUEUE_SELECT, Width::U16, u32::from(queue));
    let device_max = t.read_common(common::QUEUE_SIZE, Width::U16) as u16;
    let size = device_max.min(max);
    if size == 0 {
        0
    } else {
        1 << (15 - size.leading_zeros())
    }
}

/// Gives `queue` its rings (laid out by [`super::queue::Layout`] in
/// `region`) and MSI-X vector, and enables it.
pub fn setup_queue(
    t: &impl Transport,
    queue: u16,
    size: u16,
    region: &impl DmaRegion,
    layout: &super::queue::Layout,
    vector: Option<u16>,
) -> Result<QueueSetup, InitError> {
    t.write_common(common::QUEUE_SELECT, Width::U16, u32::from(queue));
    if size == 0 || t.read_common(common::QUEUE_ENABLE, Width::U16) != 0 {
        return Err(InitError::NoQueue(queue));
    }
    t.write_common(common::QUEUE_SIZE, Width::U16, u32::from(size));
    let base = region.phys();
    for (field, offset) in [
        (common::QUEUE_DESC, layout.desc),
        (common::QUEUE_DRIVER, layout.avail),
        (common::QUEUE_DEVICE, layout.used),
    ] {
        let addr = base + offset as u64;
        t.write_common(field, Width::U32, addr as u32);
        t.write_common(field + 4, Width::U32, (addr >> 32) as u32);
    }
    let vector = vector.unwrap_or(common::NO_VECTOR);
    t.write_common(common::QUEUE_MSIX_VECTOR, Width::U16, u32::from(vector));
    if t.read_common(common::QUEUE_MSIX_VECTOR, Width::U16) as u16 != vector {
        return Err(InitError::VectorRejected(vector));
    }
    let notify_off = t.read_common(common::QUEUE_NOTIFY_OFF, Width::U16);
    let notify_offset = notify_off
        .checked_mul(t.notify_multiplier())
        .filter(|&o| t.notify_in_range(o))
        .ok_or(InitError::BadNotifyOffset(notify_off))?;
    t.write_common(common::QUEUE_ENABLE, Width::U16, 1);
    Ok(QueueSetup {
        size,
        notify_offset,
    })
}

/// Tells the device the driver is ready.
pub fn go_live(t: &impl Transport) {
    add_status(t, status::DRIVER_OK);
}

/// Marks the device failed: the driver has given up on it.
pub fn fail(t: &impl Transport) {
    add_status(t, status::FAILED);
}

/// Reads a 64-bit device-configuration field consistently: retried while
/// the configuration generation changes under it.
pub fn read_device_u64(t: &impl Transport, offset: usize) -> u64 {
    loop {
        let before = t.read_common(common::CONFIG_GENERATION, Width::U8);
        let low = t.read_device(offset, Width::U32);
        let high = t.read_device(offset + 4, Width::U32);
        if t.read_common(common::CONFIG_GENERATION, Width::U8) == before {
            return u64::from(high) << 32 | u64::from(low);
        }
    }
}
