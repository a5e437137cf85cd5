//! A batch of reads, writes and flushes with many requests in flight:
//! each op's buffer lent to the device, cut into requests the device
//! accepts (ops that continue each other gathered into one), the queue
//! kept full up to the batch's depth, completions reaped in bunches, and
//! every buffer given back whatever happens.
//!
//! Must never leave a buffer lent after the batch returns, and never let
//! a request overtake a flush.

use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

use super::pieces::{append_merged, next_piece};
use super::{request, status, BlkDriver, Gather, Limits, OpState, Slot};
use crate::devices::block::{check, BlockError, ErrorKind, Op, SECTOR_SIZE};
use crate::devices::virtio::{Direction, Hal, Segment, Transport, Wait};

impl<T: Transport, H: Hal> BlkDriver<T, H> {
    /// Runs a batch; see [`crate::devices::block::BlockDevice::transfer`].
    pub fn transfer(
        &mut self,
        ops: &mut [Op<'_>],
        depth: usize,
        wait: &impl Wait,
    ) -> Result<(), BlockError> {
        if let Some(why) = self.broken() {
            return Err(self.error(None, ErrorKind::Broken(why)));
        }
        for op in ops.iter() {
            check(&self.info, op)?;
        }
        let depth = depth.clamp(1, usize::from(self.queue.size())) as u16;
        let mut states: Vec<OpState<H::Mapping>> = Vec::with_capacity(ops.len());
        for op in ops.iter() {
            states.push(OpState {
                mapping: None,
                segments: Vec::new(),
                cursor: (0, 0),
                next_sector: op.extent().map_or(0, |(s, _)| s),
                in_flight: 0,
                all_sent: false,
            });
        }
        let mut next = 0;
        let mut barrier = false;
        let mut failure: Option<BlockError> = None;
        let mut piece = Vec::new();
        'batch: loop {
            let mut sent = false;
            while failure.is_none()
                && !barrier
                && next < ops.len()
                && self.queue.in_flight() < depth
            {
                match self.submit_next(ops, &mut states, next, &mut piece) {
                    Ok(Submitted::Sent { finished }) => {
                        sent = true;
                        next += finished;
                    }
                    Ok(Submitted::Nothing) => next += 1,
                    Ok(Submitted::Barrier) => {
                        sent = true;
                        barrier = true;
                        next += 1;
                    }
                    Ok(Submitted::Blocked) => break,
                    Err(e) => failure = Some(e),
                }
            }
            if sent {
                self.notify();
            }
            if self.queue.in_flight() == 0 {
                barrier = false;
                if next == ops.len() || failure.is_some() {
                    break;
                }
                continue;
            }
            // Reap everything the device has returned before submitting
            // again, so refills (and notifications) go out in bunches.
            let mut reaped = 0;
            loop {
                match self.reap() {
                    Ok(Some((head, status))) => {
                        reaped += 1;
                        let slot = self.slots[usize::from(head)];
                        let kind = match status {
                            status::OK => {
                                self.stats.bytes += u64::from(slot.bytes);
                                None
                            }
                            status::IOERR => Some(ErrorKind::Io),
                            status::UNSUPP => Some(ErrorKind::Unsupported),
                            _ => {
                                let e = self.break_down("request completed without a status");
                                failure.get_or_insert(e);
                                break 'batch;
                            }
                        };
                        if let Some(kind) = kind {
                            failure.get_or_insert(self.error(slot.sector, kind));
                        }
                        for i in slot.first_op..=slot.last_op {
                            let state = &mut states[i];
                            state.in_flight -= 1;
                            if state.all_sent && state.in_flight == 0 {
                                self.release(&mut ops[i], state);
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failure.get_or_insert(e);
                        break 'batch;
                    }
                }
            }
            if reaped == 0 {
                self.stats.waits += 1;
                self.wait_used(wait);
                // Another queue may have given up on the device (and reset
                // it): nothing in flight here will complete.
                if let Some(why) = self.broken() {
                    failure.get_or_insert(self.error(None, ErrorKind::Broken(why)));
                    break 'batch;
                }
            }
        }
        // Whatever is still mapped (a batch cut short) is released; after
        // a reset the device no longer touches it.
        for (op, state) in ops.iter_mut().zip(states.iter_mut()) {
            self.release(op, state);
        }
        failure.map_or(Ok(()), Err)
    }

    /// Waits until the device returns a chain. The device interrupts only
    /// during such waits: a completion that lands while the driver is busy
    /// submitting or reaping is found by the next reap, and an interrupt
    /// for it would only cost the CPU (under QEMU, a vCPU exit each).
    pub(super) fn wait_used(&self, wait: &impl Wait) {
        if self.interrupts {
            self.queue.set_interrupts(true);
            // The device may have returned a chain before it could see the
            // flag: the check inside `wait` must come after the flag is out.
            fence(Ordering::SeqCst);
        }
        wait.wait(&mut || self.queue.has_used() || self.broken.is_completed());
        if self.interrupts {
            self.queue.set_interrupts(false);
        }
    }

    fn release(&self, op: &mut Op<'_>, state: &mut OpState<H::Mapping>) {
        if let Some(mapping) = state.mapping.take() {
            match op {
                Op::Read { buf, .. } => self.hal.unmap(mapping, Some(buf)),
                _ => self.hal.unmap(mapping, None),
            }
        }
    }

    /// Maps `op`'s buffer for the device if it is not yet.
    fn map_op(&self, op: &Op<'_>, state: &mut OpState<H::Mapping>) -> Result<(), BlockError> {
        if state.mapping.is_some() {
            return Ok(());
        }
        let (buf, dir) = match op {
            Op::Read { buf, .. } => (&**buf, Direction::FromDevice),
            Op::Write { buf, .. } => (*buf, Direction::ToDevice),
            Op::Flush => return Ok(()),
        };
        let mapping = self
            .hal
            .map(buf, dir, &mut state.segments)
            .map_err(|_| self.error(Some(state.next_sector), ErrorKind::NoMemory))?;
        state.mapping = Some(mapping);
        Ok(())
    }

    /// Sends the next request of the batch, starting at op `index`: a
    /// flush, or the next piece of a read or write. When an op's buffer
    /// runs out with room left in the request, the next op joins it if it
    /// goes the same way and starts at the sector where this one ends: one
    /// request then gathers segments from several buffers.
    fn submit_next(
        &mut self,
        ops: &[Op<'_>],
        states: &mut [OpState<H::Mapping>],
        index: usize,
        piece: &mut Vec<Segment>,
    ) -> Result<Submitted, BlockError> {
        let (kind, writes) = match &ops[index] {
            Op::Flush if !self.info.flush => return Ok(Submitted::Nothing),
            Op::Flush => {
                if self.queue.in_flight() > 0 {
                    return Ok(Submitted::Blocked);
                }
                let Some(head) = self.add((request::FLUSH, 0), &[], false) else {
                    return Ok(Submitted::Blocked);
                };
                self.slots[usize::from(head)] = Slot {
                    first_op: index,
                    last_op: index,
                    sector: None,
                    bytes: 0,
                };
                states[index].in_flight += 1;
                states[index].all_sent = true;
                return Ok(Submitted::Barrier);
            }
            Op::Read { buf: [], .. } | Op::Write { buf: [], .. } => return Ok(Submitted::Nothing),
            Op::Read { .. } => (request::IN, true),
            Op::Write { .. } => (request::OUT, false),
        };
        // Scratch lists kept across requests, put back whatever happens.
        let mut gather = core::mem::take(&mut self.gather);
        let sent = self.send_data(ops, states, index, (kind, writes), piece, &mut gather);
        self.gather = gather;
        sent
    }

    /// The read or write half of [`Self::submit_next`]: gathers the next
    /// request from op `index` on (and the ops that continue it) and sends it.
    fn send_data(
        &mut self,
        ops: &[Op<'_>],
        states: &mut [OpState<H::Mapping>],
        index: usize,
        (kind, writes): (u32, bool),
        piece: &mut Vec<Segment>,
        gather: &mut Gather,
    ) -> Result<Submitted, BlockError> {
        let Gather { plan, part } = gather;
        let sector = states[index].next_sector;
        piece.clear();
        let mut total = 0usize;
        // Requests end on multiples of the largest request on the disk, so
        // a long run is cut at the same places wherever it starts: a host
        // that must read back a partly written block (QEMU writing past
        // its page cache) does so at the run's two ends, not per request.
        let lead = (sector * SECTOR_SIZE as u64 % self.limits.max_bytes as u64) as usize;
        let max_bytes = self.limits.max_bytes - lead;
        // (op, its cursor after this request, its bytes in it)
        plan.clear();
        let mut j = index;
        loop {
            self.map_op(&ops[j], &mut states[j])?;
            let room = Limits {
                max_segment: self.limits.max_segment,
                max_segments: self.limits.max_segments - piece.len(),
                max_bytes: max_bytes - total,
            };
            let state = &states[j];
            let Some((bytes, after)) = next_piece(&state.segments, state.cursor, &room, part)
            else {
                if j == index {
                    return Err(self.error(Some(sector), ErrorKind::TooFragmented));
                }
                break;
            };
            append_merged(piece, part, self.limits.max_segment);
            total += bytes;
            plan.push((j, after, bytes));
            let end = state.next_sector + (bytes / SECTOR_SIZE) as u64;
            let joins = after.0 == state.segments.len()
                && piece.len() < self.limits.max_segments
                && total < max_bytes
                && ops.get(j + 1).is_some_and(|next| {
                    let same_way = matches!(
                        (next, writes),
                        (Op::Read { .. }, true) | (Op::Write { .. }, false)
                    );
                    same_way && next.extent().is_some_and(|(s, len)| s == end && len > 0)
                });
            if !joins {
                break;
            }
            j += 1;
        }
        if self.queue.free_descriptors() < piece.len() + 2 {
            return Ok(Submitted::Blocked);
        }
        let Some(head) = self.add((kind, sector), piece, writes) else {
            return Ok(Submitted::Blocked);
        };
        let last_op = plan.last().map_or(index, |p| p.0);
        self.slots[usize::from(head)] = Slot {
            first_op: index,
            last_op,
            sector: Some(sector),
            bytes: total as u32,
        };
        let mut finished = 0;
        for &(j, after, bytes) in plan.iter() {
            let state = &mut states[j];
            state.cursor = after;
            state.next_sector += (bytes / SECTOR_SIZE) as u64;
            state.in_flight += 1;
            if after.0 == state.segments.len() {
                state.all_sent = true;
                finished += 1;
            }
        }
        Ok(Submitted::Sent { finished })
    }
}

enum Submitted {
    /// A request went out; `finished` ops (from the first) are now sent
    /// in full.
    Sent { finished: usize },
    /// A flush went out: nothing more until it completes.
    Barrier,
    /// The op needed no request.
    Nothing,
    /// No room in the queue (or a flush waits for earlier requests).
    Blocked,
}
