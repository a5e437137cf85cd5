//! The second server's backup of a split secondary to a tape: the volume
//! as it was at the split instant, streamed in block order through one
//! window buffer (a few extents), while the copy to the secondary may still
//! run. A block
//! of the instant the copier has not reached is copied on demand, one of
//! two ways ([`Via`]); either way the secondary receives it, and the
//! copy-once engine sees to it that no block is copied twice.
//!
//! This module must never write the primary, or put anything on the
//! tape but blocks as they were at the instant.

use alloc::vec::Vec;

use super::budget::try_vec;
use super::controller::{CopyError, Mirror};
use super::copier::MAX_UNFLUSHED;
use super::layout::Phase;
use super::{Budget, Error, Refusal, MAX_BATCH};
use crate::backup::volume::VolumeStream;
use crate::copyonce::{Cause, Claim, State, Token};
use crate::devices::block::{BlockDevice, Op};

/// `via=memory` flushes the secondary once this many bytes of copies
/// (its own and the copier's) wait for a flush, or
/// [`MAX_UNFLUSHED`] blocks, not once a window; until
/// then a workload write to one of them flushes first (see
/// [`Mirror::copied_unflushed`]).
const UNFLUSHED_BYTES: u64 = 4 << 20;

/// Where a backup reads a block the copier has not reached yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Copy it from primary to secondary first, then read it from the
    /// secondary like every other block.
    Secondary,
    /// Read it from the primary into the controller's buffer (the other
    /// blocks of the window from the secondary), stream it from there and
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
/// until it returns `None`, then [`BackupJob::finish`].
pub struct BackupJob<'m, 't> {
    mirror: &'m Mirror,
    stream: VolumeStream<'t>,
    buf: Vec<u8>,
    via: Via,
    /// Blocks per on-demand copy (`via=secondary`).
    batch: u64,
    on_demand: u64,
}

impl core::fmt::Debug for BackupJob<'_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BackupJob")
            .field("stream", &self.stream)
            .field("via", &self.via)
            .field("on_demand", &self.on_demand)
            .finish()
    }
}

impl<'m, 't> BackupJob<'m, 't> {
    /// Starts a backup of `mirror`'s split instant to `tape`: refused
    /// before any split, on a broken split, or while another backup or a
    /// resync runs; writes the medium's header. Full windows and batches
    /// of [`MAX_BATCH`]: [`Self::start_sized`] with no limit.
    pub fn start(mirror: &'m Mirror, tape: &'t dyn BlockDevice, via: Via) -> Result<Self, Error> {
        let budget = Budget {
            batch: MAX_BATCH,
            window_extents: u64::MAX,
        };
        Self::start_sized(mirror, tape, via, budget)
    }

    /// [`Self::start`] with windows and on-demand copies no larger than
    /// `budget` allows.
    pub fn start_sized(
        mirror: &'m Mirror,
        tape: &'t dyn BlockDevice,
        via: Via,
        budget: Budget,
    ) -> Result<Self, Error> {
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
            g.backup_copies = via == Via::Memory;
        }
        let geo = mirror.geometry();
        let started =
            VolumeStream::start(tape, geo.volume_bytes, geo.block_bits()).and_then(|mut s| {
                s.limit_window(budget.window_extents);
                Ok((s.buffer()?, s))
            });
        match started {
            Ok((buf, stream)) => Ok(BackupJob {
                mirror,
                stream,
                buf,
                via,
                batch: budget.batch.max(1),
                on_demand: 0,
            }),
            Err(e) => {
                let mut g = mirror.inner.lock();
                g.backup_busy = false;
                g.backup_copies = false;
                Err(match e {
                    crate::backup::Error::NoMemory(n) => Error::NoMemory(n),
                    e => Error::Medium(alloc::format!("{e}")),
                })
            }
        }
    }

    /// Streams the next window of extents; returns `(bytes done, bytes in
    /// all)`, or `None` when every extent is on the tape.
    pub fn step(&mut self) -> Result<Option<(u64, u64)>, Error> {
        let Some((first, len)) = self.stream.next_window() else {
            return Ok(None);
        };
        let tokens = self.claim_window(first, len)?;
        let r = match self.via {
            Via::Secondary => self.via_secondary(first, len, tokens),
            Via::Memory => self.via_memory(first, len, tokens),
        };
        r?;
        let done = self
            .stream
            .put(&mut self.buf)
            .map_err(|e| Error::Medium(alloc::format!("{e}")))?;
        Ok(Some((
            done.min(self.mirror.geo.volume_bytes),
            self.mirror.geo.volume_bytes,
        )))
    }

    /// Writes the trailer; the tape then restores to the instant.
    pub fn finish(mut self) -> Result<BackupSummary, Error> {
        let volume_bytes = self.mirror.geo.volume_bytes;
        let on_demand = self.on_demand;
        let medium_bytes = self
            .stream
            .finish()
            .map_err(|e| Error::Medium(alloc::format!("{e}")))?;
        Ok(BackupSummary {
            volume_bytes,
            medium_bytes,
            on_demand,
        })
    }

    /// Claims the blocks of `first..first + len` that belong to the
    /// instant and nobody has copied; waits for those another copier holds.
    fn claim_window(&self, first: u64, len: u64) -> Result<Vec<Token>, Error> {
        let m = self.mirror;
        let no_memory = |e| m.copy_failed(e);
        let mut frozen: Vec<u64> = try_vec(len as usize).map_err(no_memory)?;
        {
            let g = m.inner.lock();
            frozen.extend((first..first + len).filter(|&b| g.areas[g.sb.d].get(b)));
        }
        let mut tokens = try_vec(frozen.len()).map_err(no_memory)?;
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
        Ok(tokens)
    }

    /// Copies the claimed blocks to the secondary, [`Budget::batch`] at a
    /// time through one buffer, then reads the window from the secondary.
    fn via_secondary(&mut self, first: u64, len: u64, tokens: Vec<Token>) -> Result<(), Error> {
        let m = self.mirror;
        if !tokens.is_empty() {
            let blocks: Vec<u64> = tokens.iter().map(Token::unit).collect();
            let mut buf = Vec::new();
            let r = blocks.chunks(self.batch as usize).try_for_each(|chunk| {
                buf = m.read_blocks(chunk, core::mem::take(&mut buf))?;
                m.put_secondary(chunk, &buf, true)
            });
            drop(buf);
            self.settle(tokens, r)?;
        }
        let pieces = window_pieces(&self.stream, m, &mut self.buf, first, len);
        let mut ops: Vec<Op<'_>> = pieces
            .map_err(|e| m.copy_failed(e))?
            .into_iter()
            .map(|(_, op)| op)
            .collect();
        let depth = m.disks.secondary.info().max_depth.clamp(1, 32);
        match m.disks.secondary.transfer(&mut ops, depth) {
            Ok(()) => Ok(()),
            Err(e) => {
                m.suspend(&e)?;
                Err(Error::Suspended(alloc::format!("{e}")))
            }
        }
    }

    /// Reads the claimed blocks from the primary and the rest from the
    /// secondary into the window buffer, then writes the claimed ones to
    /// the secondary.
    fn via_memory(&mut self, first: u64, len: u64, tokens: Vec<Token>) -> Result<(), Error> {
        let m = self.mirror;
        let claimed: Vec<u64> = tokens.iter().map(Token::unit).collect();
        let room = |n: usize| try_vec(n).map_err(|e| m.copy_failed(e));
        let (mut from_p, mut from_s): (Vec<Op<'_>>, Vec<Op<'_>>) =
            (room(claimed.len())?, room(len as usize)?);
        let pieces = window_pieces(&self.stream, m, &mut self.buf, first, len);
        for (b, op) in pieces.map_err(|e| m.copy_failed(e))? {
            if claimed.contains(&b) {
                from_p.push(op);
            } else {
                from_s.push(op);
            }
        }
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
        let (stream, data) = (&self.stream, &self.buf);
        let bs = m.geo.block_bytes as usize;
        let r = read.and_then(|()| {
            m.write_pieces(
                claimed.iter().map(|&b| {
                    let at = stream.offset_in_window(b - first);
                    (b, &data[at..at + bs])
                }),
                false,
            )
        });
        if r.is_ok() {
            m.copied_unflushed(&claimed);
        }
        self.settle(tokens, r)?;
        let unflushed = m.unflushed_blocks();
        if unflushed * m.geo.block_bytes >= UNFLUSHED_BYTES || unflushed >= MAX_UNFLUSHED {
            m.make_durable().map_err(|e| m.copy_failed(e))?;
        }
        Ok(())
    }

    /// Finishes or abandons the window's claims as the copy went; a
    /// secondary failure breaks the split.
    fn settle(&mut self, tokens: Vec<Token>, r: Result<(), CopyError>) -> Result<(), Error> {
        let m = self.mirror;
        let n = tokens.len() as u64;
        m.settle(tokens, r.is_ok(), Cause::Access);
        match r {
            Ok(()) => {
                self.on_demand += n;
                Ok(())
            }
            Err(e) => Err(m.copy_failed(e)),
        }
    }
}

/// A read of each block `first..first + len` into its place in the
/// window buffer `buf`, with the block; the tail of a block the volume
/// ends inside is zeroed.
fn window_pieces<'b>(
    stream: &VolumeStream<'_>,
    m: &Mirror,
    buf: &'b mut [u8],
    first: u64,
    len: u64,
) -> Result<Vec<(u64, Op<'b>)>, CopyError> {
    let bs = m.geo.block_bytes as usize;
    let mut pieces = try_vec(len as usize)?;
    let mut rest = buf;
    let mut at = 0;
    for b in first..first + len {
        let start = stream.offset_in_window(b - first);
        let (_, tail) = core::mem::take(&mut rest).split_at_mut(start - at);
        let (piece, tail) = tail.split_at_mut(bs);
        rest = tail;
        at = start + bs;
        let (sector, n) = m.geo.extent(b);
        piece[n..].fill(0);
        pieces.push((
            b,
            Op::Read {
                sector,
                buf: &mut piece[..n],
            },
        ));
    }
    Ok(pieces)
}

impl Drop for BackupJob<'_, '_> {
    fn drop(&mut self) {
        let mut g = self.mirror.inner.lock();
        g.backup_busy = false;
        g.backup_copies = false;
    }
}
