//! Decoding the data of qcow2 compressed clusters (whose descriptor is
//! [`Compressed`]): raw deflate (compression type 0)
//! with `miniz_oxide`, a zstd frame (type 1) with `ruzstd`.
//!
//! Memory is bounded by design: a compressed cluster decodes into exactly
//! one cluster, in a buffer the caller gives. Input is the descriptor's
//! bytes, at most two clusters ([`Compressed::max_bytes`]). Output beyond
//! one cluster is refused as soon as it appears (a zstd frame decodes
//! block by block, at most 128 KiB past the cluster before it is
//! stopped), and a zstd frame asking for a window wider than a cluster is
//! refused before anything is allocated for it. [`Decoder::memory`] is
//! the whole figure.
//!
//! This module must never touch a device, and must never panic or
//! allocate without bound on what an image holds: a broken or hostile
//! stream gets a [`Qcow2Error`].

use alloc::boxed::Box;
use alloc::format;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use ruzstd::io::Read;

use super::qcow2::{invalid, Compressed, Compression, Qcow2Error};

/// A decoder of one image's compressed clusters, reused from cluster to
/// cluster.
pub struct Decoder {
    kind: Compression,
    cs: usize,
    deflate: Box<DecompressorOxide>,
    zstd: FrameDecoder,
}

impl core::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Decoder")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// A decoder for clusters of `1 << cluster_bits` compressed as `kind`.
    pub fn new(kind: Compression, cluster_bits: u32) -> Decoder {
        let cs = 1u64 << cluster_bits;
        let mut zstd = FrameDecoder::new();
        zstd.set_max_window_size(cs.max(1 << 10));
        Decoder {
            kind,
            cs: cs as usize,
            deflate: Box::default(),
            zstd,
        }
    }

    /// Bytes of memory a decoder of `kind` for clusters of
    /// `1 << cluster_bits` needs at most besides the output cluster, input
    /// included: the input (two clusters), and deflate's state or zstd's
    /// window and buffer (grown by doubling from a cluster plus two
    /// 128 KiB blocks: at most four clusters and 512 KiB) and its tables.
    pub fn memory(cluster_bits: u32, kind: Compression) -> u64 {
        let cs = 1u64 << cluster_bits;
        let state = match kind {
            Compression::Deflate => core::mem::size_of::<DecompressorOxide>() as u64,
            Compression::Zstd => 4 * cs + (1 << 20),
        };
        Compressed::max_bytes(cluster_bits) + state
    }

    /// Decodes `input` (the descriptor's bytes) of the compressed cluster
    /// at virtual offset `at` into `out`, which is one cluster long.
    pub fn decode(&mut self, input: &[u8], out: &mut [u8], at: u64) -> Result<(), Qcow2Error> {
        debug_assert_eq!(out.len(), self.cs);
        let bad = |what: &str| {
            invalid(format!(
                "the compressed cluster at virtual offset {at:#x} {what}"
            ))
        };
        let n = match self.kind {
            Compression::Deflate => self.inflate(input, out).map_err(|w| bad(&w))?,
            Compression::Zstd => self.unzstd(input, out).map_err(|w| bad(&w))?,
        };
        if n != self.cs {
            return Err(bad(&format!(
                "decodes to {n} bytes, not a {}-byte cluster",
                self.cs
            )));
        }
        Ok(())
    }

    /// Raw deflate into `out`; the bytes written.
    fn inflate(&mut self, input: &[u8], out: &mut [u8]) -> Result<usize, alloc::string::String> {
        self.deflate.init();
        let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
        let (status, _, written) = decompress(&mut self.deflate, input, out, 0, flags);
        match status {
            TINFLStatus::Done => Ok(written),
            TINFLStatus::HasMoreOutput => {
                Err(format!("decodes to more than a {}-byte cluster", self.cs))
            }
            TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress => Err(format!(
                "is cut short: its deflate stream runs past its {} bytes",
                input.len()
            )),
            other => Err(format!("is not a valid deflate stream ({other:?})")),
        }
    }

    /// One zstd frame into `out`; the bytes written.
    fn unzstd(&mut self, mut input: &[u8], out: &mut [u8]) -> Result<usize, alloc::string::String> {
        let broken = |e: &dyn core::fmt::Display| format!("is not a valid zstd frame ({e})");
        self.zstd.reset(&mut input).map_err(|e| broken(&e))?;
        // Stops after the block that takes the output past a cluster.
        let finished = self
            .zstd
            .decode_blocks(&mut input, BlockDecodingStrategy::UptoBytes(self.cs + 1))
            .map_err(|e| broken(&e))?;
        let more = || format!("decodes to more than a {}-byte cluster", self.cs);
        if !finished || self.zstd.can_collect() > self.cs {
            return Err(more());
        }
        let n = self.zstd.read(out).map_err(|e| broken(&e))?;
        Ok(n)
    }
}
