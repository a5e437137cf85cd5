//! The controller against a simple model, over interleavings of workload
//! writes, splits, pump and copier steps, backups in both modes,
//! resyncs, and crashes at every step (the volatile caches of the
//! secondary and the controller disk partly lost, the controller's memory
//! wholly). The model is the primary's sector versions and, while split,
//! their copy at the instant.

use std::sync::Arc;
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use super::disk::{sector, versions, CrashDisk};
use crate::backup::{restore, Format};
use crate::devices::block::{BlockDevice, MemDisk, SECTOR_SIZE};
use crate::mirror::{
    BackupJob, CopyBatch, Disks, Error, Mirror, Opened, Options, Phase, Refusal, Via,
};
use crate::support::rng::Rng;

#[derive(Debug, Clone)]
pub enum Step {
    Write(u16, u8),
    Split,
    Pump(u8),
    Copy(u8),
    /// The copier's first half (a batch read and held), or its second
    /// (the held batch written).
    CopyHalf(u8),
    Backup(bool),
    Resync,
    Crash(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (any::<u16>(), 1u8..5).prop_map(|(a, n)| Step::Write(a, n)),
        1 => Just(Step::Split),
        2 => (1u8..6).prop_map(Step::Pump),
        2 => (1u8..6).prop_map(Step::Copy),
        2 => (1u8..6).prop_map(Step::CopyHalf),
        3 => any::<bool>().prop_map(Step::Backup),
        1 => Just(Step::Resync),
        1 => any::<u64>().prop_map(Step::Crash),
    ]
}

/// The world: three disks that outlive the controller, and the model.
struct World {
    primary: Arc<MemDisk>,
    secondary: Arc<CrashDisk>,
    control: Arc<CrashDisk>,
    block_bytes: u64,
    sectors: u64,
    model: Vec<u64>,
    instant: Option<(Vec<u64>, u64)>,
    version: u64,
}

impl World {
    fn disks(&self) -> Disks {
        Disks {
            primary: self.primary.clone(),
            secondary: self.secondary.clone(),
            control: self.control.clone(),
        }
    }

    fn open(&self) -> (Mirror, Opened) {
        let opts = Options {
            block_bytes: self.block_bytes,
            assume_clean: false,
        };
        Mirror::open(self.disks(), opts, std::thread::yield_now).expect("opens")
    }

    /// The secondary never holds a sector written after its instant.
    fn check_secondary(&self) -> Result<(), TestCaseError> {
        if let Some((_, split_version)) = &self.instant {
            let got = versions(&self.secondary.contents()[..self.sectors as usize * 512]);
            for (n, v) in got.iter().enumerate() {
                prop_assert!(
                    v < split_version,
                    "secondary sector {} holds version {} >= split {}",
                    n,
                    v,
                    split_version
                );
            }
        }
        Ok(())
    }

    fn write(&mut self, m: &Mirror, at: u16, n: u8) -> Result<(), TestCaseError> {
        let first = u64::from(at) % self.sectors;
        let n = u64::from(n).min(self.sectors - first);
        let mut buf = vec![0u8; n as usize * SECTOR_SIZE];
        for i in 0..n {
            self.version += 1;
            let s = first + i;
            buf[i as usize * 512..][..512].copy_from_slice(&sector(self.version, s));
            self.model[s as usize] = self.version;
        }
        prop_assert_eq!(m.write(first, &buf), Ok(()));
        Ok(())
    }

    /// A whole backup restored and compared with the instant.
    fn compare_tape(&self, tape: &MemDisk) -> Result<(), TestCaseError> {
        let out = MemDisk::new("out", self.sectors);
        restore(tape, &out, Format::Raw, &mut |_, _, _| {}).expect("the tape restores");
        let (instant, _) = self.instant.as_ref().expect("split");
        prop_assert_eq!(
            &versions(&out.contents()),
            instant,
            "backup is not the instant"
        );
        Ok(())
    }
}

/// A backup in progress: its tape and how far it got.
struct Running {
    tape: Box<MemDisk>,
    via: Via,
    extents_done: u64,
}

use std::boxed::Box;

fn tape_for(w: &World) -> Box<MemDisk> {
    let bits = w.block_bytes.trailing_zeros();
    let bytes = crate::backup::volume::VolumeStream::medium_bytes(w.sectors * 512, bits);
    Box::new(MemDisk::new("tape", bytes / 512))
}

/// Runs one backup step: starts it, or streams one more extent (the job
/// is rebuilt each step from the tape's progress, so a crash simply drops
/// it); compares a finished tape.
fn backup_step(
    w: &World,
    m: &Mirror,
    run: &mut Option<Running>,
    memory: bool,
) -> Result<(), TestCaseError> {
    let split = m.status().phase == Phase::Split;
    let Some(r) = run else {
        if !split {
            prop_assert_eq!(
                BackupJob::start(m, &*tape_for(w), Via::Secondary).err(),
                Some(Error::Refused(Refusal::NoSplit))
            );
            return Ok(());
        }
        let via = if memory { Via::Memory } else { Via::Secondary };
        *run = Some(Running {
            tape: tape_for(w),
            via,
            extents_done: 0,
        });
        return Ok(());
    };
    // Replay: a job streams in order, so restarting and skipping what is
    // done would rewrite the same bytes; run it whole up to one extent
    // further than before instead.
    let mut job = BackupJob::start(m, &*r.tape, r.via).expect("starts while split");
    let mut k = 0;
    while k <= r.extents_done {
        if job.step().expect("backup step").is_none() {
            job.finish().expect("trailer");
            w.compare_tape(&r.tape)?;
            *run = None;
            return Ok(());
        }
        k += 1;
    }
    r.extents_done += 1;
    Ok(())
}

fn run(block_shift: u32, sectors: u64, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let block_bytes = 512u64 << block_shift;
    let primary = Arc::new(MemDisk::new("primary", sectors));
    for s in 0..sectors {
        primary.write(s, &sector(1, s)).unwrap();
    }
    let blocks = sectors.div_ceil(block_bytes / 512);
    let control_sectors = 16 + 2 * blocks.div_ceil(4096);
    let mut w = World {
        primary,
        secondary: Arc::new(CrashDisk::new("secondary", sectors + 3)),
        control: Arc::new(CrashDisk::new("control", control_sectors)),
        block_bytes,
        sectors,
        model: vec![1; sectors as usize],
        instant: None,
        version: 1,
    };
    let (mut m, opened) = w.open();
    prop_assert_eq!(opened, Opened::Created { lagging: blocks });
    let mut backup: Option<Running> = None;
    // A copier batch between its read and its write. One thread runs
    // the steps, so the held batch is written before any step that could
    // wait for its blocks; a crash drops it unwritten.
    let mut held: Option<CopyBatch> = None;
    for step in steps {
        let waits = matches!(
            step,
            Step::Write(..) | Step::Split | Step::Backup(_) | Step::Resync
        );
        if let Some(batch) = held.take_if(|_| waits) {
            m.copy_write(batch).expect("copy write");
        }
        match step {
            Step::Write(at, n) => w.write(&m, at, n)?,
            Step::Split => {
                let r = m.split();
                if w.instant.is_some() {
                    prop_assert_eq!(r, Err(Error::Refused(Refusal::SplitPending)));
                } else {
                    prop_assert!(r.is_ok());
                    w.instant = Some((w.model.clone(), w.version + 1));
                }
            }
            Step::Pump(n) => {
                m.pump(u64::from(n)).expect("pump");
            }
            Step::Copy(n) => {
                m.copy(u64::from(n)).expect("copy");
            }
            Step::CopyHalf(n) => match held.take() {
                None => held = m.copy_read(u64::from(n)).expect("copy read"),
                Some(batch) => {
                    m.copy_write(batch).expect("copy write");
                }
            },
            Step::Backup(memory) => backup_step(&w, &m, &mut backup, memory)?,
            Step::Resync => {
                backup = None;
                m.resync().expect("resync");
                w.instant = None;
            }
            Step::Crash(seed) => {
                drop(held.take());
                drop(m);
                backup = None;
                let mut rng = Rng::new(seed);
                w.secondary.crash(&mut rng);
                w.control.crash(&mut rng);
                let (again, opened) = w.open();
                m = again;
                match (&w.instant, opened) {
                    (None, Opened::Paired { .. }) | (Some(_), Opened::Split { .. }) => {}
                    (i, o) => prop_assert!(false, "split {} but reopened {:?}", i.is_some(), o),
                }
            }
        }
        w.check_secondary()?;
    }
    if let Some(batch) = held {
        m.copy_write(batch).expect("copy write");
    }
    finish(&w, &m)
}

/// The end: a pending split backs up to its instant in both modes (the
/// second after the copy is complete), then a resync brings the secondary
/// to the primary, copying only what changed.
fn finish(w: &World, m: &Mirror) -> Result<(), TestCaseError> {
    if w.instant.is_some() {
        for via in [Via::Memory, Via::Secondary] {
            let tape = tape_for(w);
            let mut job = BackupJob::start(m, &*tape, via).expect("backup");
            while job.step().expect("step").is_some() {}
            job.finish().expect("finish");
            w.compare_tape(&tape)?;
        }
        prop_assert!(m.copy_complete());
        prop_assert_eq!(m.copy(8), Ok(0));
    }
    let marked = m.resync().expect("resync");
    let mut pumped = 0;
    loop {
        let n = m.pump(7).expect("pump");
        if n == 0 {
            break;
        }
        pumped += n;
    }
    prop_assert_eq!(
        pumped,
        marked,
        "the pump copies exactly what the resync marked"
    );
    prop_assert_eq!(m.status().marked, 0);
    let sec = w.secondary.contents();
    prop_assert_eq!(versions(&sec[..w.sectors as usize * 512]), w.model.clone());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn backups_are_the_instant_and_the_secondary_never_runs_ahead(
        block_shift in 0u32..3,
        sectors in 1u64..70,
        steps in proptest::collection::vec(step(), 0..120),
    ) {
        run(block_shift, sectors, steps)?;
    }
}
