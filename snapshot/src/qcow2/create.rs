//! A new, empty qcow2 clone naming its base, and rewriting the backing
//! reference of an existing header (the split's last step clears it).
//!
//! The clone's layout is an empty image from [`NewImage`] (header,
//! refcount table, one refcount block, L1 table), with the backing format
//! extension and the backing name added to the header cluster as
//! `qemu-img create -b NAME -F FORMAT` writes them.
//!
//! This module only builds bytes; it must never touch a device.

use alloc::format;
use alloc::vec::Vec;

use crate::backup::newimage::NewImage;
use crate::backup::qcow2::{be32, invalid, Qcow2Error, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// The bytes of an empty qcow2 image of `virtual_size` with clusters of
/// `1 << cluster_bits`, whose backing file is `backing` (name as the
/// header will hold it, relative to the clone's directory, and format).
pub fn clone_image(
    virtual_size: u64,
    cluster_bits: u32,
    backing: Option<(&str, &str)>,
) -> Result<Vec<u8>, Qcow2Error> {
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(invalid(format!("cluster_bits {cluster_bits}")));
    }
    if !virtual_size.is_multiple_of(512) || virtual_size > crate::backup::qcow2::MAX_VIRTUAL_SIZE {
        return Err(invalid(format!(
            "virtual size {virtual_size} (want a multiple of 512, at most {})",
            crate::backup::qcow2::MAX_VIRTUAL_SIZE
        )));
    }
    let layout = NewImage::new(cluster_bits, virtual_size, 0, 0);
    let mut bytes = layout.metadata(&[]);
    let cs = 1usize << cluster_bits;
    set_backing(&mut bytes[..cs], backing)?;
    Ok(bytes)
}

/// Rewrites the header cluster `first` so that it names `backing` (or no
/// backing file): the backing format extension and the name are replaced,
/// every other extension kept in order.
pub fn set_backing(first: &mut [u8], backing: Option<(&str, &str)>) -> Result<(), Qcow2Error> {
    let header_length = be32(first, 100) as usize;
    let mut kept: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut at = header_length;
    loop {
        if at + 8 > first.len() {
            return Err(invalid("header extensions run past the first cluster"));
        }
        let (kind, len) = (be32(first, at), be32(first, at + 4) as usize);
        if kind == 0 {
            break;
        }
        let next = at + 8 + len.next_multiple_of(8);
        if next > first.len() {
            return Err(invalid(format!(
                "header extension {kind:#x} runs past the first cluster"
            )));
        }
        if kind != EXT_BACKING_FORMAT {
            kept.push((kind, first[at + 8..at + 8 + len].to_vec()));
        }
        at = next;
    }
    if let Some((_, format)) = backing {
        kept.insert(0, (EXT_BACKING_FORMAT, format.as_bytes().to_vec()));
    }
    let mut area = Vec::new();
    for (kind, data) in &kept {
        area.extend_from_slice(&kind.to_be_bytes());
        area.extend_from_slice(&(data.len() as u32).to_be_bytes());
        area.extend_from_slice(data);
        area.resize(area.len().next_multiple_of(8), 0);
    }
    area.extend_from_slice(&[0; 8]);
    let name_at = header_length + area.len();
    let name = backing.map_or(&[][..], |(n, _)| n.as_bytes());
    if name.len() > 1023 || name_at + name.len() > first.len() {
        return Err(invalid(format!(
            "backing name of {} bytes does not fit the {}-byte header cluster",
            name.len(),
            first.len()
        )));
    }
    first[header_length..].fill(0);
    first[header_length..name_at].copy_from_slice(&area);
    first[name_at..name_at + name.len()].copy_from_slice(name);
    let (offset, size) = if name.is_empty() {
        (0, 0)
    } else {
        (name_at as u64, name.len() as u32)
    };
    first[8..16].copy_from_slice(&offset.to_be_bytes());
    first[16..20].copy_from_slice(&size.to_be_bytes());
    Ok(())
}
