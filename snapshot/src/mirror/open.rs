//! Opening a pair: the refusals, a new pair on a blank controller disk,
//! or the state a controller disk holds picked up again after a stop.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::AtomicU64;

use super::bitmap::Area;
use super::controller::{Disks, Inner, Mirror, Opened, Options};
use super::layout::{self, Geometry, Phase, Super, SUPER_BYTES};
use super::{Error, Refusal};
use crate::copyonce::{Counters, Engine};
use crate::devices::block::Op;

/// The checks before anything is read or written.
fn refuse(disks: &Disks, block_bytes: u64) -> Result<(), Refusal> {
    let [p, s, c] = [&disks.primary, &disks.secondary, &disks.control].map(|d| d.info());
    if Arc::ptr_eq(&disks.primary, &disks.secondary) || p.name == s.name {
        return Err(Refusal::SameDisk(p.name.clone()));
    }
    if c.name == p.name || c.name == s.name {
        return Err(Refusal::SameDisk(c.name.clone()));
    }
    for d in [p, s, c] {
        if d.read_only {
            return Err(Refusal::ReadOnly(d.name.clone()));
        }
    }
    if s.bytes() < p.bytes() {
        return Err(Refusal::SecondaryTooSmall {
            primary: p.bytes(),
            secondary: s.bytes(),
        });
    }
    if !layout::valid_block(block_bytes) {
        return Err(Refusal::BlockSize(block_bytes));
    }
    Ok(())
}

impl Mirror {
    /// Opens the pair on `disks`: resumes what the controller disk holds,
    /// or creates a pair on a blank one (all zero) with `opts`. `relax` is
    /// called while waiting for another request.
    pub fn open(disks: Disks, opts: Options, relax: fn()) -> Result<(Mirror, Opened), Error> {
        refuse(&disks, opts.block_bytes)?;
        let mut slots = alloc::vec![0u8; 2 * SUPER_BYTES];
        if disks.control.info().bytes() < 2 * SUPER_BYTES as u64 {
            let geo = Geometry {
                block_bytes: opts.block_bytes,
                volume_bytes: disks.primary.info().bytes(),
            };
            return Err(Refusal::ControlTooSmall {
                need: geo.control_bytes(),
                have: disks.control.info().bytes(),
            }
            .into());
        }
        disks.control.read(0, &mut slots).map_err(Error::Io)?;
        let found = newest(&slots)?;
        let sb = match &found {
            Some(sb) => {
                identity(&disks, sb)?;
                sb.clone()
            }
            None => new_super(&disks, opts.block_bytes),
        };
        let geo = sb.geometry;
        let have = disks.control.info().bytes();
        if have < geo.control_bytes() {
            return Err(Refusal::ControlTooSmall {
                need: geo.control_bytes(),
                have,
            }
            .into());
        }
        let words: Arc<[AtomicU64]> = (0..crate::copyonce::words_for(geo.blocks()))
            .map(|_| AtomicU64::new(0))
            .collect();
        let engine = Engine::new(words, geo.blocks(), Arc::new(Counters::new()));
        let area = || Area::new(geo.blocks(), geo.area_sectors());
        let mirror = Mirror {
            disks,
            geo,
            inner: spin::Mutex::new(Inner {
                sb,
                areas: [area(), area()],
                gate: false,
                writes: 0,
                inflight: Vec::new(),
                pinned: Vec::new(),
                pump_busy: false,
                backup_busy: false,
                backup_copies: false,
                copiers: 0,
                clears: Vec::new(),
                unclear: 0,
                unflushed: Default::default(),
                spare: Vec::new(),
                super_busy: false,
                pending: 0,
                cursor: 0,
            }),
            engine,
            relax,
            pumped: AtomicU64::new(0),
        };
        let opened = match found {
            Some(_) => mirror.resume()?,
            None => mirror.create(opts.assume_clean)?,
        };
        Ok((mirror, opened))
    }

    /// A new pair: every block marked (or none), the spare area zeroed,
    /// then the first superblock.
    fn create(&self, clean: bool) -> Result<Opened, Error> {
        let d = {
            let mut g = self.inner.lock();
            if !clean {
                g.areas[0].set_all();
            }
            g.sb.d
        };
        self.write_area(d)?;
        self.write_area(1 - d)?;
        self.write_super(|_| {})?;
        let lagging = self.inner.lock().areas[d].count();
        Ok(Opened::Created { lagging })
    }

    /// Reads both areas back and picks up where the superblock says.
    fn resume(&self) -> Result<Opened, Error> {
        let sectors = self.geo.area_sectors();
        let mut bytes =
            crate::support::try_filled(sectors * 512, 0u8).ok_or(Error::NoMemory(sectors * 512))?;
        for k in 0..2 {
            self.disks
                .control
                .transfer(
                    &mut [Op::Read {
                        sector: self.geo.area_at(k),
                        buf: &mut bytes,
                    }],
                    8,
                )
                .map_err(Error::Io)?;
            self.inner.lock().areas[k].load(&bytes);
        }
        let mut g = self.inner.lock();
        let d = g.sb.d;
        match g.sb.phase {
            Phase::Paired => {
                g.areas[1 - d].zero();
                drop(g);
                self.write_area(1 - d)?;
                let lagging = self.inner.lock().areas[d].count();
                Ok(Opened::Paired { lagging })
            }
            Phase::Split => {
                // Blocks written since the split were copied (and the copy
                // flushed) before their mark: only the rest is pending.
                for b in 0..self.geo.blocks() {
                    if g.areas[1 - d].get(b) {
                        g.areas[d].clear(b);
                    }
                }
                g.pending = g.areas[d].count();
                Ok(Opened::Split { pending: g.pending })
            }
        }
    }
}

/// The newest valid superblock of the two slots, `None` if both are
/// blank, a refusal if neither is valid.
fn newest(slots: &[u8]) -> Result<Option<Super>, Refusal> {
    let a = Super::decode(&slots[..SUPER_BYTES]);
    let b = Super::decode(&slots[SUPER_BYTES..]);
    match (a, b) {
        (Ok(None), Ok(None)) => Ok(None),
        (Ok(Some(x)), Ok(Some(y))) => Ok(Some(if x.seq >= y.seq { x } else { y })),
        (Ok(Some(x)), _) | (_, Ok(Some(x))) => Ok(Some(x)),
        (Err(e), _) | (_, Err(e)) => Err(Refusal::NotControl(e)),
    }
}

/// The superblock of a new pair on `disks`.
fn new_super(disks: &Disks, block_bytes: u64) -> Super {
    Super {
        seq: 0,
        geometry: Geometry {
            block_bytes,
            volume_bytes: disks.primary.info().bytes(),
        },
        secondary_bytes: disks.secondary.info().bytes(),
        phase: Phase::Paired,
        d: 0,
        splits: 0,
        broken: None,
        names: [
            disks.primary.info().name.clone(),
            disks.secondary.info().name.clone(),
        ],
    }
}

/// Whether the superblock describes this pair.
fn identity(disks: &Disks, sb: &Super) -> Result<(), Refusal> {
    let (p, s) = (disks.primary.info(), disks.secondary.info());
    if sb.geometry.volume_bytes != p.bytes() || sb.secondary_bytes > s.bytes() {
        return Err(Refusal::OtherPair(alloc::format!(
            "it records a {}-byte primary and a {}-byte secondary; the disks have {} and {}",
            sb.geometry.volume_bytes,
            sb.secondary_bytes,
            p.bytes(),
            s.bytes()
        )));
    }
    if sb.names != [p.name.clone(), s.name.clone()] {
        return Err(Refusal::OtherPair(alloc::format!(
            "it records disks \"{}\" and \"{}\", not \"{}\" and \"{}\"",
            sb.names[0],
            sb.names[1],
            p.name,
            s.name
        )));
    }
    Ok(())
}
