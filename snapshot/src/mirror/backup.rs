//! The second server's backup of a split secondary to a tape: the volume
//! as it was at the split instant, streamed in block order through one
//! extent buffer, while the copy to the secondary may still run. A block
//! of the instant the copier has not reached is copied on demand, one of
//! two ways ([`Via`]); either way the secondary receives it, and the
//! copy-once engine sees to it that no block is copied twice.
//!
//! This module must never write the primary, or put anything on the
//! tape but blocks as they were at the instant.

use alloc::vec::Vec;

use super::controller::{CopyError, Mirror};
use super::layout::Phase;
use super::{Error, Refusal};
use crate::backup::tape::BLOCK;
use crate::backup::volume::VolumeStream;
use crate::backup::Overlap;
use crate::copyonce::{Cause, Claim, State, Token};
use crate::devices::block::{BlockDevice, Op};

/// Where a backup reads a block the copier has not reached yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Copy it from primary to secondary first, then read it from the
    /// secondary like every other block.
    Secondary,
    /// Read it from the primary into the controller's buffer (the other
    /// blocks of the extent from the secondary), stream it from there and
    /// write it to the secondary too.
    Memory,
}

impl Via {
    /// Parses `secondary` or `memory`.
    pub fn parse(text: &str) -> Option<Via> {
        match text {
            "secondary" => Some(Via::Secondary),
            "memory" => Some(Via::Memory),
            _ => None,
        }
    }

    /// Its name, as [`Via::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            Via::Secondary => "secondary",
            Via::Memory => "memory",
        }
    }
}

/// What a finished backup did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSummary {
    /// Bytes of volume streamed.
    pub volume_bytes: u64,
    /// Bytes of medium written.
    pub medium_bytes: u64,
    /// Blocks the backup copied itself because the copier had not reached
    /// them.
    pub on_demand: u64,
}

/// A backup of the split instant in progress: call [`BackupJob::step`]
/// until it returns `None`, then [`BackupJob::finish`]; or
/// [`BackupJob::run`] for all of it, reading the next extent while the
/// last one goes to the tape.
pub struct BackupJob<'m, 't> {
    reader: Reader<'m>,
    stream: VolumeStream<'t>,
    buf: Vec<u8>,
    on_demand: u64,
}

impl core::fmt::Debug for BackupJob<'_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BackupJob")
            .field("stream", &self.stream)
            .field("via", &self.reader.via)
            .field("on_demand", &self.on_demand)
            .finish()
    }
}

fn medium(e: impl core::fmt::Display) -> Error {
    Error::Medium(alloc::format!("{e}"))
}

impl<'m, 't> BackupJob<'m, 't> {
    /// Starts a backup of `mirror`'s split instant to `tape`: refused
    /// before any split, on a broken split, or while another backup or a
    /// resync runs; writes the medium's header.
    pub fn start(mirror: &'m Mirror, tape: &'t dyn BlockDevice, via: Via) -> Result<Self, Error> {
        {
            let mut g = mirror.inner.lock();
            if g.sb.phase != Phase::Split {
                return Err(Refusal::NoSplit.into());
            }
            if let Some(why) = &g.sb.broken {
                return Err(Refusal::Suspended(why.clone()).into());
            }
            if g.backup_busy || g.gate {
                return Err(Refusal::Busy("another backup or a resync").into());
            }
            g.backup_busy = true;
        }
        let geo = mirror.geometry();
        let started = VolumeStream::start(tape, geo.volume_bytes, geo.block_bits())
            .and_then(|s| Ok((s.buffer()?, s)));
        match started {
            Ok((buf, stream)) => Ok(BackupJob {
                reader: Reader { mirror, via },
                stream,
                buf,
                on_demand: 0,
            }),
            Err(e) => {
                mirror.inner.lock().backup_busy = false;
                Err(medium(e))
            }
        }
    }

    /// Streams the next extent; returns `(bytes done, bytes in all)`, or
    /// `None` when every extent is on the tape.
    pub fn step(&mut self) -> Result<Option<(u64, u64)>, Error> {
        let Some((first, len)) = self.stream.next_extent() else {
            return Ok(None);
        };
        self.on_demand += self
            .reader
            .fill(first, len, &mut self.buf[BLOCK as usize..])?;
        let done = self.stream.put(&mut self.buf).map_err(medium)?;
        Ok(Some(self.progress(done)))
    }

    /// Streams every extent left and finishes, reading each extent (the
    /// claims, the on-demand copies, the reads) while the one before is
    /// checksummed and written to the tape, through `overlap`: memory, two
    /// extent buffers. Reports `(bytes done, bytes in all)` after each.
    pub fn run(
        mut self,
        overlap: &dyn Overlap,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BackupSummary, Error> {
        let Some((first, len)) = self.stream.next_extent() else {
            return self.finish();
        };
        let reader = self.reader;
        self.on_demand += reader.fill(first, len, &mut self.buf[BLOCK as usize..])?;
        let mut spare = self.stream.buffer().map_err(medium)?;
        let (layout, mut k) = (*self.stream.layout(), first / self.stream.extent_clusters());
        while k < layout.extents() {
            let (ahead, ahead_len, _) = layout.extent(k + 1);
            let (mut read, mut put) = (Ok(0), Ok(0));
            let (buf, stream) = (&mut self.buf, &mut self.stream);
            overlap.both(
                &mut || {
                    if ahead_len > 0 {
                        read = reader.fill(ahead, ahead_len, &mut spare[BLOCK as usize..]);
                    }
                },
                &mut || put = stream.put(buf),
            );
            let done = put.map_err(medium)?;
            self.on_demand += read?;
            progress(self.progress(done).0, self.reader.mirror.geo.volume_bytes);
            core::mem::swap(&mut self.buf, &mut spare);
            k += 1;
        }
        self.finish()
    }

    fn progress(&self, done: u64) -> (u64, u64) {
        let total = self.reader.mirror.geo.volume_bytes;
        (done.min(total), total)
    }

    /// Writes the trailer; the tape then restores to the instant.
    pub fn finish(mut self) -> Result<BackupSummary, Error> {
        let volume_bytes = self.reader.mirror.geo.volume_bytes;
        let on_demand = self.on_demand;
        let medium_bytes = self.stream.finish().map_err(medium)?;
        Ok(BackupSummary {
            volume_bytes,
            medium_bytes,
            on_demand,
        })
    }
}

/// What a backup does for one extent before the tape: claims the blocks
/// of the instant nobody has copied, copies them [`Via`] its mode, and
/// reads the extent as at the instant. Shared by both of a run's threads.
#[derive(Clone, Copy)]
struct Reader<'m> {
    mirror: &'m Mirror,
    via: Via,
}

impl Reader<'_> {
    /// Fills `data` (an extent's buffer) with blocks `first..first + len`
    /// as at the instant, zeros after the volume's end; returns the blocks
    /// it copied on demand.
    fn fill(self, first: u64, len: u64, data: &mut [u8]) -> Result<u64, Error> {
        let tokens = self.claim_window(first, len);
        let bs = self.mirror.geo.block_bytes as usize;
        // Only what no read covers needs zeros: the tail of a short last
        // block and the blocks past the volume's end.
        data[len as usize * bs..].fill(0);
        let (_, n) = self.mirror.geo.extent(first + len - 1);
        data[(len as usize - 1) * bs + n..len as usize * bs].fill(0);
        match self.via {
            Via::Secondary => self.via_secondary(first, len, tokens, data),
            Via::Memory => self.via_memory(first, len, tokens, data),
        }
    }
    /// Claims the blocks of `first..first + len` that belong to the
    /// instant and nobody has copied; waits for those another copier holds.
    fn claim_window(self, first: u64, len: u64) -> Vec<Token> {
        let m = self.mirror;
        let frozen: Vec<u64> = {
            let g = m.inner.lock();
            (first..first + len)
                .filter(|&b| g.areas[g.sb.d].get(b))
                .collect()
        };
        let mut tokens = Vec::new();
        for b in frozen {
            loop {
                match m.engine.claim(b) {
                    Claim::Won(t) => tokens.push(t),
                    Claim::Copied => {}
                    Claim::Busy => {
                        // Abandoned: claim again; copied: nothing to do.
                        if m.engine.wait(b, m.relax) == State::NotCopied {
                            continue;
                        }
                    }
                }
                break;
            }
        }
        tokens
    }

    /// Read ops for the blocks of `first..` into `data`, one per block.
    fn reads<'d>(
        self,
        first: u64,
        data: &'d mut [u8],
        len: u64,
    ) -> impl Iterator<Item = (u64, Op<'d>)> + 'd {
        let geo = self.mirror.geo;
        data.chunks_mut(geo.block_bytes as usize)
            .zip(first..first + len)
            .map(move |(piece, b)| {
                let (sector, n) = geo.extent(b);
                let buf = &mut piece[..n];
                (b, Op::Read { sector, buf })
            })
    }

    /// Copies the claimed blocks to the secondary, then reads the extent
    /// from the secondary.
    fn via_secondary(
        self,
        first: u64,
        len: u64,
        tokens: Vec<Token>,
        data: &mut [u8],
    ) -> Result<u64, Error> {
        let m = self.mirror;
        let mut on_demand = 0;
        if !tokens.is_empty() {
            let blocks: Vec<u64> = tokens.iter().map(Token::unit).collect();
            let r = m.copy_blocks(&blocks);
            on_demand = self.settle(tokens, r)?;
        }
        let mut ops: Vec<Op<'_>> = self.reads(first, data, len).map(|(_, op)| op).collect();
        let depth = m.disks.secondary.info().max_depth.clamp(1, 32);
        match m.disks.secondary.transfer(&mut ops, depth) {
            Ok(()) => Ok(on_demand),
            Err(e) => {
                m.suspend(&e)?;
                Err(Error::Suspended(alloc::format!("{e}")))
            }
        }
    }

    /// Reads the claimed blocks from the primary and the rest from the
    /// secondary into the extent buffer, then writes the claimed ones to
    /// the secondary.
    fn via_memory(
        self,
        first: u64,
        len: u64,
        tokens: Vec<Token>,
        data: &mut [u8],
    ) -> Result<u64, Error> {
        let m = self.mirror;
        let bs = m.geo.block_bytes as usize;
        let claimed: Vec<u64> = tokens.iter().map(Token::unit).collect();
        let (p, s): (Vec<_>, Vec<_>) = self
            .reads(first, data, len)
            .partition(|(b, _)| claimed.contains(b));
        let mut from_p: Vec<Op<'_>> = p.into_iter().map(|(_, op)| op).collect();
        let mut from_s: Vec<Op<'_>> = s.into_iter().map(|(_, op)| op).collect();
        let depth = |d: &dyn BlockDevice| d.info().max_depth.clamp(1, 32);
        let read = m
            .disks
            .primary
            .transfer(&mut from_p, depth(&*m.disks.primary))
            .map_err(CopyError::Primary)
            .and_then(|()| {
                m.disks
                    .secondary
                    .transfer(&mut from_s, depth(&*m.disks.secondary))
                    .map_err(CopyError::Secondary)
            });
        drop((from_p, from_s));
        let data = &*data;
        let r = read.and_then(|()| {
            m.put_pieces(claimed.iter().map(|&b| {
                let at = ((b - first) as usize) * bs;
                (b, &data[at..at + bs])
            }))
        });
        self.settle(tokens, r)
    }

    /// Finishes or abandons the window's claims as the copy went; a
    /// secondary failure breaks the split. Returns the blocks copied.
    fn settle(self, tokens: Vec<Token>, r: Result<(), CopyError>) -> Result<u64, Error> {
        let m = self.mirror;
        let n = tokens.len() as u64;
        m.settle(tokens, r.is_ok(), Cause::Access);
        match r {
            Ok(()) => Ok(n),
            Err(e) => Err(m.copy_failed(e)),
        }
    }
}

impl Drop for BackupJob<'_, '_> {
    fn drop(&mut self) {
        self.reader.mirror.inner.lock().backup_busy = false;
    }
}
