//! Several request queues on one fake device: bring-up takes what the
//! device offers, a batch on one queue completes (flush included) while
//! another queue's batch is in flight, a fault found on one queue fails
//! the others' batches, and threads driving a queue each leave the disk
//! as a plain array says.

use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use super::blk::{BlkDriver, Config};
use super::fake::{Fake, Misbehave, Setup};
use super::{status, Wait};
use crate::devices::block::{fill_pattern, ErrorKind, Op, SECTOR_SIZE};

fn config(queues: u16) -> Config {
    Config {
        name: "virtio@00:04.0".into(),
        queue_size: 64,
        vector: Some(1),
        queues,
        interrupts: true,
        max_request_bytes: 16 << 10,
    }
}

fn up(setup: Setup, queues: u16) -> (Fake, Vec<BlkDriver<Fake, Fake>>) {
    let fake = Fake::new(setup);
    let drivers = BlkDriver::new_queues(fake.clone(), fake.clone(), &config(queues)).unwrap();
    (fake, drivers)
}

fn pattern(seed: u64, sector: u64, bytes: usize) -> Vec<u8> {
    let mut buf = vec![0u8; bytes];
    fill_pattern(seed, sector, &mut buf);
    buf
}

#[test]
fn bring_up_takes_the_queues_offered_up_to_the_asked() {
    for (offered, asked, expect) in [(4, 2, 2), (4, 8, 4), (1, 4, 1), (3, 1, 1)] {
        let (fake, drivers) = up(
            Setup {
                queues: offered,
                ..Setup::default()
            },
            asked,
        );
        let indexes: Vec<u16> = drivers.iter().map(|d| d.queue_index()).collect();
        assert_eq!(
            indexes,
            (0..expect).collect::<Vec<u16>>(),
            "{offered} offered"
        );
        assert_eq!(fake.status() & status::DRIVER_OK, status::DRIVER_OK);
    }
}

/// A [`Wait`] that, at the first wait of the batch it serves, runs
/// another caller's work: that work then happens while this batch has
/// requests at the device.
struct Meanwhile<'a, F: FnOnce()> {
    fake: &'a Fake,
    work: RefCell<Option<F>>,
}

impl<F: FnOnce()> Wait for Meanwhile<'_, F> {
    fn wait(&self, done: &mut dyn FnMut() -> bool) {
        if let Some(work) = self.work.borrow_mut().take() {
            work();
        }
        self.fake.wait(done);
    }
}

#[test]
fn a_small_write_and_flush_finish_while_another_queue_has_a_batch_out() {
    let (fake, drivers) = up(
        Setup {
            queues: 2,
            sectors: 4096,
            ..Setup::default()
        },
        2,
    );
    let [mut big, mut small]: [BlkDriver<Fake, Fake>; 2] = drivers.try_into().unwrap();
    let long = pattern(1, 0, 1 << 20);
    let short = pattern(2, 3000, 4096);
    let mut seen_out = 0;
    let work = || {
        // The long batch has requests at the device, not yet completed.
        seen_out = fake.pending(0);
        let mut ops = [
            Op::Write {
                sector: 3000,
                buf: &short,
            },
            Op::Flush,
        ];
        small.transfer(&mut ops, 1, &fake).unwrap();
    };
    let wait = Meanwhile {
        fake: &fake,
        work: RefCell::new(Some(work)),
    };
    let mut ops = [Op::Write {
        sector: 0,
        buf: &long,
    }];
    big.transfer(&mut ops, 16, &wait).unwrap();
    assert!(seen_out > 0, "the long batch had nothing out meanwhile");
    let disk = fake.disk();
    assert_eq!(&disk[..1 << 20], &long[..]);
    assert_eq!(
        &disk[3000 * SECTOR_SIZE..3000 * SECTOR_SIZE + 4096],
        &short[..]
    );
    let (_, _, _, flush_overlaps) = fake.counters();
    assert_eq!(flush_overlaps, 0, "a flush shared its own queue");
    assert_eq!(fake.live_allocations(), 4, "only rings and slots remain");
}

#[test]
fn a_fault_found_on_one_queue_fails_the_batches_of_the_others() {
    for misbehave in [Misbehave::BogusCompletion, Misbehave::NoStatus] {
        let (fake, drivers) = up(
            Setup {
                queues: 2,
                misbehave,
                ..Setup::default()
            },
            2,
        );
        let [mut a, mut b]: [BlkDriver<Fake, Fake>; 2] = drivers.try_into().unwrap();
        let mut other = None;
        let work = || {
            let mut buf = vec![0u8; 64 << 10];
            other = Some(b.read_into(100, &mut buf, &fake));
        };
        let wait = Meanwhile {
            fake: &fake,
            work: RefCell::new(Some(work)),
        };
        let mut buf = vec![0u8; 64 << 10];
        let mut ops = [Op::Read {
            sector: 0,
            buf: &mut buf,
        }];
        let mine = a.transfer(&mut ops, 8, &wait).unwrap_err();
        let other = other.expect("ran").unwrap_err();
        for err in [&mine, &other] {
            assert!(
                matches!(err.kind, ErrorKind::Broken(_)),
                "{misbehave:?}: {err}"
            );
        }
        assert_eq!(fake.status() & status::FAILED, status::FAILED);
        assert_eq!(
            fake.live_allocations(),
            4,
            "{misbehave:?}: a buffer stayed lent"
        );
        assert!(b.read_into(0, &mut buf[..4096], &fake).is_err());
    }
}

impl BlkDriver<Fake, Fake> {
    fn read_into(
        &mut self,
        sector: u64,
        buf: &mut [u8],
        fake: &Fake,
    ) -> Result<(), crate::devices::block::BlockError> {
        let mut ops = [Op::Read { sector, buf }];
        self.transfer(&mut ops, 8, fake)
    }
}

#[test]
fn threads_on_their_own_queues_leave_the_disk_a_plain_array_predicts() {
    const THREADS: u16 = 4;
    const SPAN: u64 = 512;
    let (fake, drivers) = up(
        Setup {
            queues: THREADS,
            sectors: SPAN * u64::from(THREADS),
            seed: 7,
            ..Setup::default()
        },
        THREADS,
    );
    let handles: Vec<_> = drivers
        .into_iter()
        .map(|mut driver| {
            let fake = fake.clone();
            std::thread::spawn(move || {
                let q = u64::from(driver.queue_index());
                let base = q * SPAN;
                let mut model = vec![0u8; SPAN as usize * SECTOR_SIZE];
                for round in 0..40u64 {
                    let at = (round * 37 + q * 11) % (SPAN - 16);
                    let data = pattern(round * 10 + q, base + at, 8 * SECTOR_SIZE);
                    let end = (at as usize + 8) * SECTOR_SIZE;
                    model[at as usize * SECTOR_SIZE..end].copy_from_slice(&data);
                    let mut ops = [
                        Op::Write {
                            sector: base + at,
                            buf: &data,
                        },
                        Op::Flush,
                    ];
                    driver.transfer(&mut ops, 4, &fake).unwrap();
                    let mut back = vec![0u8; model.len()];
                    driver.read_into(base, &mut back, &fake).unwrap();
                    assert_eq!(back, model, "queue {q}, round {round}");
                }
                model
            })
        })
        .collect();
    let models: Vec<u8> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert_eq!(fake.disk(), models);
    assert_eq!(fake.live_allocations(), 2 * usize::from(THREADS));
}
