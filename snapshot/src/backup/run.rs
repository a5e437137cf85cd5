//! Runs of consecutive keys mapping to consecutive values: the unit in
//! which the backup's tables are walked, stored and laid out.
//!
//! Tables are never held whole in memory: they are read as a stream of
//! runs through [`Runs`], from the source image or from the medium, a
//! window at a time. This module only holds the value types; it must
//! never read a device itself.

use alloc::vec::Vec;

/// A run of `len` consecutive entries mapping `from + i` to `to + i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First key (a virtual cluster in tables 1 and 2, a copy cluster in
    /// table 3).
    pub from: u64,
    /// First value (a host cluster of the source in table 1, a copy
    /// cluster in table 2, a medium block of
    /// [`Layout::block`](super::tape::Layout) bytes in table 3).
    pub to: u64,
    /// Entries in the run (at least one).
    pub len: u64,
}

impl Run {
    /// The key after the run's last.
    pub fn end(&self) -> u64 {
        self.from + self.len
    }

    /// Whether `next` continues this run (keys and values both adjacent).
    pub fn continued_by(&self, next: &Run) -> bool {
        self.end() == next.from && self.to + self.len == next.to
    }
}

/// A stream of runs in ascending key order, read as needed; `E` is why
/// reading can fail.
pub trait Runs<E> {
    /// The next run, or `None` at the end.
    fn next_run(&mut self) -> Result<Option<Run>, E>;
}

impl<E, R: Runs<E> + ?Sized> Runs<E> for alloc::boxed::Box<R> {
    fn next_run(&mut self) -> Result<Option<Run>, E> {
        (**self).next_run()
    }
}

/// Joins runs that continue each other as they come.
#[derive(Debug, Default)]
pub struct Joiner(Option<Run>);

impl Joiner {
    /// Adds `r`; returns the run it completes, if it starts a new one.
    pub fn add(&mut self, r: Run) -> Option<Run> {
        match &mut self.0 {
            Some(p) if p.continued_by(&r) => {
                p.len += r.len;
                None
            }
            p => p.replace(r),
        }
    }

    /// The run still open, at the end.
    pub fn finish(&mut self) -> Option<Run> {
        self.0.take()
    }
}

/// Runs held in memory (small tables, and tests).
#[derive(Debug, Clone)]
pub struct SliceRuns<'a>(pub &'a [Run]);

impl<E> Runs<E> for SliceRuns<'_> {
    fn next_run(&mut self) -> Result<Option<Run>, E> {
        let Some((first, rest)) = self.0.split_first() else {
            return Ok(None);
        };
        self.0 = rest;
        Ok(Some(*first))
    }
}

/// Table 2 from table 1's data runs: the same virtual clusters, numbered
/// 0, 1, 2, ... in the order they come (the dense copy area), with runs
/// joined where only the host offsets of table 1 split them.
#[derive(Debug)]
pub struct CopyRuns<R> {
    inner: R,
    next_copy: u64,
    joiner: Joiner,
}

impl<R> CopyRuns<R> {
    /// Table 2 over `inner` (runs of table 1).
    pub fn new(inner: R) -> Self {
        CopyRuns {
            inner,
            next_copy: 0,
            joiner: Joiner::default(),
        }
    }
}

impl<E, R: Runs<E>> Runs<E> for CopyRuns<R> {
    fn next_run(&mut self) -> Result<Option<Run>, E> {
        loop {
            let Some(r) = self.inner.next_run()? else {
                return Ok(self.joiner.finish());
            };
            let r = Run {
                from: r.from,
                to: self.next_copy,
                len: r.len,
            };
            self.next_copy += r.len;
            if let Some(done) = self.joiner.add(r) {
                return Ok(Some(done));
            }
        }
    }
}

/// Collects every run of `runs` (tests and small tables only: memory
/// grows with the table).
pub fn collect<E>(runs: &mut dyn Runs<E>) -> Result<Vec<Run>, E> {
    let mut all = Vec::new();
    while let Some(r) = runs.next_run()? {
        all.push(r);
    }
    Ok(all)
}
