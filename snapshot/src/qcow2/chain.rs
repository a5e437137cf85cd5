//! Opening an image with its whole backing chain.
//!
//! The headers name each backing file; a [`Resolve`] turns a name into a
//! device and an identity (the host: a path resolved as QEMU does,
//! relative to the directory of the image naming it; the kernel: the disks
//! the host attached in chain order). Each layer's format comes from the
//! backing format extension, or from its magic when the header gives none.
//! The chain is checked top to bottom before anything is opened for
//! writing, and refused, naming the culprit, when a backing file is
//! missing, the chain loops, or a layer uses a feature this module does
//! not handle. A backing image smaller than the image over it reads as
//! zeros past its end, as QEMU reads it.
//!
//! Every backing layer is read-only; this module must never open one for
//! writing.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::{Qcow2Disk, Result};
use crate::backup::qcow2::{be32, invalid, Qcow2Error, MAGIC};
use crate::backup::source::read_header;
use crate::devices::block::{read_bytes, BlockDevice};

/// Most layers below the top image.
pub const MAX_DEPTH: usize = 16;

/// One backing layer as the resolver found it.
pub struct Layer {
    /// The device holding it (read-only).
    pub dev: Box<dyn BlockDevice>,
    /// What identifies it across names (a canonical path), for loops.
    pub id: String,
}

/// Turns the backing name `name` found in the header of the image
/// identified by `parent` into its layer; a missing file is an error that
/// names the path tried.
pub type Resolve<'a> = &'a mut dyn FnMut(&str, &str) -> Result<Layer>;

/// Formats a layer may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// qcow2 version 3.
    Qcow2,
    /// Raw bytes.
    Raw,
}

impl Format {
    /// The format named `name` (as in a backing format extension).
    pub fn named(name: &str, whose: &str) -> Result<Format> {
        match name {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            other => Err(Qcow2Error::Unsupported(format!(
                "backing format \"{other}\" of {whose} (qcow2 and raw are read)"
            ))),
        }
    }

    /// The name [`Format::named`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// The format of `dev` by its magic.
    pub fn probe(dev: &dyn BlockDevice) -> Result<Format> {
        if dev.info().bytes() < 512 {
            return Ok(Format::Raw);
        }
        let mut sector = [0u8; 512];
        read_bytes(dev, 0, &mut sector)?;
        Ok(if be32(&sector, 0) == MAGIC {
            Format::Qcow2
        } else {
            Format::Raw
        })
    }
}

/// A layer found, not yet opened.
struct Found {
    dev: Box<dyn BlockDevice>,
    format: Format,
}

/// The layers below `top` (identified by `top_id`), top-down, checked.
fn walk(top: &dyn BlockDevice, top_id: &str, resolve: Resolve<'_>) -> Result<Vec<Found>> {
    let mut seen: Vec<String> = Vec::from([String::from(top_id)]);
    let mut found: Vec<Found> = Vec::new();
    let mut header = read_header(top)?;
    loop {
        let Some(name) = header.backing_file.clone() else {
            return Ok(found);
        };
        let parent = seen.last().expect("the top is there").clone();
        if found.len() == MAX_DEPTH {
            return Err(Qcow2Error::Unsupported(format!(
                "a backing chain deeper than {MAX_DEPTH} layers (at {parent})"
            )));
        }
        let layer = resolve(&name, &parent)?;
        if seen.contains(&layer.id) {
            return Err(invalid(format!(
                "the backing chain loops: {parent} names \"{name}\", which is {} again",
                layer.id
            )));
        }
        let format = match &header.backing_format {
            Some(f) => Format::named(f, &layer.id)?,
            None => Format::probe(&*layer.dev)?,
        };
        let next = match format {
            Format::Qcow2 => Some(read_header(&*layer.dev).map_err(|e| in_layer(e, &layer.id))?),
            Format::Raw => None,
        };
        seen.push(layer.id);
        found.push(Found {
            dev: layer.dev,
            format,
        });
        match next {
            Some(h) => header = h,
            None => return Ok(found),
        }
    }
}

/// Names the layer an error comes from.
fn in_layer(e: Qcow2Error, id: &str) -> Qcow2Error {
    match e {
        Qcow2Error::Unsupported(w) => Qcow2Error::Unsupported(format!("{w} (in {id})")),
        Qcow2Error::Invalid(w) => Qcow2Error::Invalid(format!("{w} (in {id})")),
        Qcow2Error::TooLarge(w) => Qcow2Error::TooLarge(format!("{w} (in {id})")),
        Qcow2Error::NotQcow2 => Qcow2Error::Invalid(format!(
            "{id} is not a qcow2 image (bad magic), though the image above it names it qcow2"
        )),
        other => other,
    }
}

/// Opens `top` (writable if its device is) over its backing chain, every
/// layer found through `resolve` and opened read-only.
pub fn open<D: BlockDevice>(top: D, top_id: &str, resolve: Resolve<'_>) -> Result<Qcow2Disk<D>> {
    let found = walk(&top, top_id, resolve)?;
    let mut below: Option<Box<dyn BlockDevice>> = None;
    for layer in found.into_iter().rev() {
        if !layer.dev.info().read_only {
            return Err(invalid(format!(
                "backing device {} is writable; backing layers are attached read-only",
                layer.dev.info().name
            )));
        }
        below = Some(match layer.format {
            Format::Raw => layer.dev,
            Format::Qcow2 => {
                let name = layer.dev.info().name.clone();
                let disk = Qcow2Disk::open(layer.dev, below).map_err(|e| in_layer(e, &name))?;
                Box::new(disk)
            }
        });
    }
    Qcow2Disk::open(top, below).map_err(|e| in_layer(e, top_id))
}

impl core::fmt::Debug for Layer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Layer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
