//! Step 4 of the backup, one window at a time: the next data clusters of
//! table 1, in copy-area order, read from the source into a buffer as the
//! guest sees them. Plain clusters are read as they are (contiguous host
//! clusters in one request, a window's requests in flight together);
//! a compressed cluster is read and decoded into its one cluster
//! ([`super::decode`]); a cluster with extended L2 entries has the
//! subclusters that are not data cleared to zeros. The copy area, and so
//! the medium, holds the data uncompressed.
//!
//! Memory is bounded by design: the caller's window, one walk of table 1
//! (a window of L1, one L2 table), and for compressed clusters one input
//! buffer of two clusters and one decoder ([`copy_memory`]).
//!
//! This module must never write to the source.

use alloc::vec::Vec;

use super::decode::Decoder;
use super::error::Error;
use super::io::{changed, depth, zeroed};
use super::qcow2::{Compressed, Header};
use super::run::Run;
use super::source::{Piece, Walk};
use crate::devices::block::{BlockDevice, Op};

/// Bytes of memory [`Copier`] needs besides its window and walk: the
/// decoder of the image's compressed clusters (and its input), whether or
/// not the image has any, since that is only known once it is walked.
pub fn copy_memory(header: &Header) -> u64 {
    Decoder::memory(header.cluster_bits, header.compression)
}

/// Fills windows with the source's data clusters, in order.
pub struct Copier<'a> {
    source: &'a dyn BlockDevice,
    walk: Walk<'a, dyn BlockDevice + 'a>,
    header: Header,
    file_len: u64,
    /// What the last window left of a run.
    rest: Option<Run>,
    /// Allocated at the first compressed cluster: the input buffer and
    /// the decoder.
    decoder: Option<(Vec<u8>, Decoder)>,
}

impl core::fmt::Debug for Copier<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Copier")
            .field("rest", &self.rest)
            .finish_non_exhaustive()
    }
}

impl<'a> Copier<'a> {
    /// A copier walking table 1 of `header`'s image (`file_len` bytes) on
    /// `source` from the start.
    pub fn new(source: &'a dyn BlockDevice, header: &Header, file_len: u64) -> Result<Self, Error> {
        Ok(Copier {
            source,
            walk: Walk::new(source, header, file_len).map_err(Error::Source)?,
            header: header.clone(),
            file_len,
            rest: None,
            decoder: None,
        })
    }

    /// The next pieces covering `n` clusters, each with its first cluster
    /// in the window; a run longer than what is left is cut, its rest kept
    /// for the next window.
    fn pieces(&mut self, n: u64) -> Result<Vec<(Piece, u64)>, Error> {
        let mut pieces = Vec::new();
        let mut filled = 0;
        while filled < n {
            let p = match self.rest.take() {
                Some(r) => Piece::Run(r),
                None => self
                    .walk
                    .next_piece()
                    .map_err(Error::Source)?
                    .ok_or_else(changed)?,
            };
            let Piece::Run(r) = p else {
                pieces.push((p, filled));
                filled += 1;
                continue;
            };
            let take = r.len.min(n - filled);
            if take < r.len {
                self.rest = Some(Run {
                    from: r.from + take,
                    to: r.to + take,
                    len: r.len - take,
                });
            }
            pieces.push((Piece::Run(Run { len: take, ..r }), filled));
            filled += take;
        }
        Ok(pieces)
    }

    /// Fills `window`, pieces of whole clusters taken in order (an
    /// extent's data each, laid out as on the medium), with the next data
    /// clusters. A run that crosses from one piece to the next is read
    /// into both with one batch: the device gathers requests that continue
    /// each other on disk.
    pub fn fill(&mut self, window: &mut [&mut [u8]]) -> Result<(), Error> {
        let cs = self.header.cluster_size();
        let bits = self.header.cluster_bits;
        let clusters = window.iter().map(|w| w.len() as u64 / cs).sum();
        let pieces = self.pieces(clusters)?;
        // Plain reads first, all in flight together.
        let mut ops = Vec::with_capacity(pieces.len() + window.len());
        let mut parts = window.iter_mut().map(|w| &mut **w);
        let mut left: &mut [u8] = &mut [];
        for (p, _) in &pieces {
            let (mut host, mut k) = match *p {
                Piece::Run(r) => (r.to << bits, r.len),
                Piece::Subclusters { host, .. } => (host, 1),
                Piece::Compressed { .. } => (0, 1),
            };
            while k > 0 {
                if left.is_empty() {
                    left = parts.next().ok_or_else(changed)?;
                }
                let take = k.min(left.len() as u64 / cs);
                let (piece, tail) = core::mem::take(&mut left).split_at_mut((take * cs) as usize);
                left = tail;
                k -= take;
                if host == 0 {
                    continue;
                }
                // A last cluster that the file ends inside reads as zeros
                // past the end.
                let len = (take * cs).min(self.file_len - host) as usize;
                piece[len..].fill(0);
                ops.push(Op::Read {
                    sector: host / 512,
                    buf: &mut piece[..len],
                });
                host += take * cs;
            }
        }
        self.source.transfer(&mut ops, depth(self.source))?;
        drop(ops);
        for (p, slot) in pieces {
            let cluster = cluster_mut(window, slot, cs).ok_or_else(changed)?;
            match p {
                Piece::Run(_) => {}
                Piece::Subclusters { data, .. } => clear_holes(cluster, data),
                Piece::Compressed { vc, data } => self.decompress(vc, data, cluster)?,
            }
        }
        Ok(())
    }

    /// Reads compressed cluster `vc` and decodes it into `out`.
    fn decompress(&mut self, vc: u64, data: Compressed, out: &mut [u8]) -> Result<(), Error> {
        let h = &self.header;
        if self.decoder.is_none() {
            let input = zeroed(Compressed::max_bytes(h.cluster_bits))?;
            self.decoder = Some((input, Decoder::new(h.compression, h.cluster_bits)));
        }
        let (input, decoder) = self.decoder.as_mut().expect("set above");
        let (sector, count) = data.sectors();
        let buf = &mut input[..(count * 512) as usize];
        self.source.read(sector, buf)?;
        let skip = (data.offset % 512) as usize;
        let at = vc << h.cluster_bits;
        decoder
            .decode(&buf[skip..skip + data.bytes as usize], out, at)
            .map_err(Error::Source)
    }
}

/// Cluster `slot` of `window` (pieces of whole clusters of `cs` bytes).
fn cluster_mut<'w>(window: &'w mut [&mut [u8]], mut slot: u64, cs: u64) -> Option<&'w mut [u8]> {
    for piece in window.iter_mut() {
        let n = piece.len() as u64 / cs;
        if slot < n {
            return Some(&mut piece[(slot * cs) as usize..((slot + 1) * cs) as usize]);
        }
        slot -= n;
    }
    None
}

/// Clears the subclusters of `cluster` whose bit in `data` is clear:
/// they read as zeros whatever the host cluster holds there.
fn clear_holes(cluster: &mut [u8], data: u32) {
    let sub = cluster.len() / 32;
    for (i, part) in cluster.chunks_mut(sub).enumerate() {
        if data & (1 << i) == 0 {
            part.fill(0);
        }
    }
}
