//! The controller's own work: the split, the pump that keeps a paired
//! secondary in step, the background copier of a split, and the resync
//! back to the paired state. Each call does a bounded amount (a batch of
//! blocks) and returns, so the caller paces it.

use alloc::vec::Vec;

use super::bitmap::Area;
use super::controller::{Inner, Mirror};
use super::copier::note_clears;
use super::layout::Phase;
use super::{Error, Refusal};
use crate::copyonce::{Cause, Token};

/// What a split acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitAck {
    /// Blocks the secondary must still receive for the instant.
    pub pending: u64,
}

impl Mirror {
    /// Splits the pair: fixes the instant and acknowledges. `at_instant`
    /// runs with every write drained and none admitted, just before the
    /// instant is recorded (a verify mode takes its reference there).
    /// The work does not depend on the volume's size: one superblock.
    pub fn split_with(&self, at_instant: &mut dyn FnMut()) -> Result<SplitAck, Error> {
        {
            let mut g = self.inner.lock();
            if g.sb.phase == Phase::Split {
                return Err(Refusal::SplitPending.into());
            }
            if let Some(why) = &g.sb.broken {
                return Err(Refusal::Suspended(why.clone()).into());
            }
            if g.gate {
                return Err(Refusal::Busy("a split or resync").into());
            }
            g.gate = true;
        }
        self.wait_idle();
        at_instant();
        let r = self.write_super(|sb| {
            sb.phase = Phase::Split;
            sb.splits += 1;
        });
        let mut g = self.inner.lock();
        g.gate = false;
        r?;
        g.pending = g.areas[g.sb.d].count();
        // The copier starts halfway: a backup streams from block 0, and
        // a copier walking the same way would hold the very blocks the
        // backup reaches next, so that the two would take turns.
        g.cursor = g.areas[g.sb.d].blocks() / 2;
        Ok(SplitAck { pending: g.pending })
    }

    /// [`Self::split_with`] with nothing to do at the instant.
    pub fn split(&self) -> Result<SplitAck, Error> {
        self.split_with(&mut || {})
    }

    /// With the gate closed: waits until no write, pump batch or copier
    /// batch is in flight.
    fn wait_idle(&self) {
        loop {
            {
                let g = self.inner.lock();
                if g.writes == 0 && !g.pump_busy && g.copiers == 0 {
                    return;
                }
            }
            (self.relax)();
        }
    }

    /// Paired: copies up to `max` marked blocks to the secondary and
    /// clears their bits (on disk lazily, once a flush of the secondary
    /// has made their copies durable: every
    /// [`CLEAR_BYTES`](super::copier::CLEAR_BYTES) copied, when
    /// nothing is left marked, or at any other flush, as the copier's).
    /// Returns how many it copied (0 when nothing is marked, or not
    /// paired, or suspended).
    pub fn pump(&self, max: u64) -> Result<u64, Error> {
        let batch = {
            let mut g = self.inner.lock();
            if g.sb.phase != Phase::Paired || g.gate || g.sb.broken.is_some() || g.pump_busy {
                return Ok(0);
            }
            let batch = pick_marked(&mut g, max);
            g.pinned = batch.clone();
            g.pump_busy = !batch.is_empty();
            batch
        };
        if batch.is_empty() {
            self.clear_due(true)?;
            return Ok(0);
        }
        let r = self
            .read_blocks(&batch, Vec::new())
            .and_then(|buf| self.put_secondary(&batch, &buf, false));
        if r.is_ok() {
            // Listed before they leave `pinned`: their disk bits stay set
            // until a flush makes the copies durable.
            self.copied_unflushed(&batch);
        }
        {
            let mut g = self.inner.lock();
            let d = g.sb.d;
            if r.is_err() {
                for &b in &batch {
                    g.areas[d].set(b);
                }
            } else {
                note_clears(&mut g, &batch);
            }
            g.pinned.clear();
            g.pump_busy = false;
        }
        match r {
            Ok(()) => {
                self.pumped
                    .fetch_add(batch.len() as u64, core::sync::atomic::Ordering::Relaxed);
                self.clear_due(false)?;
                Ok(batch.len() as u64)
            }
            Err(e) => Err(self.copy_failed(e)),
        }
    }

    /// Finishes the tokens under `cause` if their copy is durable, or
    /// gives them back.
    pub(super) fn settle(&self, tokens: Vec<Token>, ok: bool, cause: Cause) {
        for t in tokens {
            if ok {
                self.engine.finish(t, cause);
            } else {
                self.engine.abandon(t);
            }
        }
    }

    /// Whether every block of the instant is on the secondary.
    pub fn copy_complete(&self) -> bool {
        let g = self.inner.lock();
        g.sb.phase == Phase::Split && self.engine.completed() >= g.pending
    }

    /// Back to paired: the blocks written since the split, and those of
    /// the instant not copied yet, become the differential bitmap, which
    /// the pump then copies. A suspended pair is resumed. Returns the
    /// blocks to copy.
    pub fn resync(&self) -> Result<u64, Error> {
        {
            let mut g = self.inner.lock();
            if g.gate || g.backup_busy {
                return Err(Refusal::Busy("a split, resync or backup").into());
            }
            if g.sb.phase == Phase::Paired {
                drop(g);
                self.write_super(|sb| sb.broken = None)?;
                let g = self.inner.lock();
                return Ok(g.areas[g.sb.d].count());
            }
            g.gate = true;
        }
        self.wait_idle();
        let r = self.resync_gated();
        self.inner.lock().gate = false;
        r
    }

    /// The resync's steps, with the gate closed and nothing in flight.
    fn resync_gated(&self) -> Result<u64, Error> {
        // Copied blocks leave the bitmaps below: their copies first become
        // durable. A failing secondary is a suspended pair, whose resync
        // takes every block of the instant.
        if let Err(e) = self.make_durable() {
            let _ = self.copy_failed(e);
        }
        let (f, w) = {
            let mut g = self.inner.lock();
            let (f, w) = (g.sb.d, 1 - g.sb.d);
            let broken = g.sb.broken.is_some();
            let mut b = g.areas[f].next_set(0);
            while let Some(x) = b {
                if broken || !self.engine.is_copied(x) {
                    g.areas[w].set(x);
                }
                b = g.areas[f].next_set(x + 1);
            }
            (f, w)
        };
        self.write_area(w)?;
        self.write_super(|sb| {
            sb.phase = Phase::Paired;
            sb.d = w;
            sb.broken = None;
        })?;
        {
            let mut g = self.inner.lock();
            g.areas[f].zero();
            g.cursor = 0;
            g.clears.clear();
            g.unclear = 0;
            g.unflushed.clear();
            g.pending = 0;
        }
        self.engine.reset();
        self.write_area(f)?;
        let g = self.inner.lock();
        Ok(g.areas[w].count())
    }
}

/// Takes up to `max` marked blocks no write has in flight, from the
/// cursor on (wrapping once), clearing their bits in memory.
fn pick_marked(g: &mut Inner, max: u64) -> Vec<u64> {
    let d = g.sb.d;
    let Inner {
        areas,
        inflight,
        cursor,
        ..
    } = g;
    let mut batch = Vec::new();
    *cursor = scan(&areas[d], *cursor, |b| {
        if !inflight.contains(&b) {
            batch.push(b);
        }
        (batch.len() as u64) < max
    });
    for &b in &batch {
        areas[d].clear(b);
    }
    batch
}

/// Visits the set bits of `area` from `start` on, wrapping once, while
/// `visit` says to go on; returns where a next scan should start.
pub(super) fn scan(area: &Area, start: u64, mut visit: impl FnMut(u64) -> bool) -> u64 {
    let mut at = start;
    let mut wrapped = false;
    loop {
        let next = area.next_set(at).filter(|&b| !wrapped || b < start);
        let Some(b) = next else {
            if wrapped || start == 0 {
                return at;
            }
            wrapped = true;
            at = 0;
            continue;
        };
        at = b + 1;
        if !visit(b) {
            return at;
        }
    }
}
