//! The virtio-blk driver against the fake device: bring-up, batches with
//! many requests in flight and out-of-order completion, splitting under
//! device limits, barriers, errors and broken devices. Data is checked
//! against a plain array, not against the driver's bookkeeping.

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use proptest::prelude::*;

use super::blk::{BlkDriver, Config};
use super::device::InitError;
use super::fake::{Fake, Misbehave, Setup};
use super::status;
use crate::devices::block::{fill_pattern, BlockError, ErrorKind, Op, SECTOR_SIZE};

fn config() -> Config {
    Config {
        name: "virtio@00:04.0".into(),
        queue_size: 256,
        vector: Some(1),
        queues: 1,
        interrupts: true,
        max_request_bytes: 64 << 10,
    }
}

fn up(setup: Setup) -> (Fake, BlkDriver<Fake, Fake>) {
    let fake = Fake::new(setup);
    let mut driver = BlkDriver::new(fake.clone(), fake.clone(), &config()).expect("bring-up");
    let name = driver.identify(&fake).expect("GET_ID");
    driver.set_name(name);
    (fake, driver)
}

#[test]
fn completions_interrupt_only_while_the_driver_waits() {
    for interrupts in [true, false] {
        let fake = Fake::new(Setup {
            sectors: 1024,
            ..Setup::default()
        });
        let config = Config {
            interrupts,
            ..config()
        };
        let mut driver = BlkDriver::new(fake.clone(), fake.clone(), &config).expect("bring-up");
        assert!(!fake.interrupts().0, "none asked for before any wait");
        let mut bufs = vec![[0u8; 4096]; 32];
        let mut ops: Vec<Op<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| Op::Read {
                sector: i as u64 * 24,
                buf,
            })
            .collect();
        driver.transfer(&mut ops, 8, &fake).unwrap();
        let (armed_now, armed, unarmed) = fake.interrupts();
        assert!(!armed_now, "interrupts asked for after the batch");
        if interrupts {
            assert!(armed > 0 && unarmed == 0, "{armed} armed, {unarmed} not");
        } else {
            assert!(armed == 0 && unarmed > 0, "polling asked for interrupts");
        }
    }
}

#[test]
fn bring_up_reads_configuration_and_serial() {
    let (fake, driver) = up(Setup {
        sectors: 4096,
        seg_max: 32,
        size_max: 65536,
        serial: "data0".into(),
        ..Setup::default()
    });
    let info = driver.info();
    assert_eq!(info.name, "data0");
    assert_eq!(info.sectors, 4096);
    assert_eq!(info.block_size, 4096);
    assert!(info.flush && !info.read_only);
    assert_eq!(info.max_depth, 64, "queue size from the device's maximum");
    assert_eq!(driver.limits().max_segments, 32);
    assert_eq!(fake.status() & status::DRIVER_OK, status::DRIVER_OK);
}

#[test]
fn a_device_without_version_1_is_refused_and_marked_failed() {
    let fake = Fake::new(Setup {
        version_1: false,
        ..Setup::default()
    });
    let err = BlkDriver::new(fake.clone(), fake.clone(), &config()).unwrap_err();
    assert_eq!(err, InitError::MissingFeatures(super::feature::VERSION_1));
    assert_eq!(fake.status() & status::FAILED, status::FAILED);
}

#[test]
fn a_notification_address_outside_the_area_is_refused() {
    let fake = Fake::new(Setup {
        misbehave: Misbehave::BadNotifyOffset,
        ..Setup::default()
    });
    let err = BlkDriver::new(fake.clone(), fake.clone(), &config()).unwrap_err();
    assert_eq!(err, InitError::BadNotifyOffset(0x4000));
    assert_eq!(fake.status() & status::FAILED, status::FAILED);
}

#[test]
fn depth_bounds_the_requests_in_flight() {
    for (depth, expect) in [(1, 1), (8, 8), (32, 32)] {
        // 4 KiB buffers take up to 4 descriptors: 256 entries hold 64.
        let (fake, mut driver) = up(Setup {
            sectors: 1024,
            queue_max: 256,
            ..Setup::default()
        });
        let mut bufs = vec![[0u8; 4096]; 64];
        let mut ops: Vec<Op<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, buf)| Op::Read {
                sector: (i as u64 * 13) % 1000,
                buf,
            })
            .collect();
        driver.transfer(&mut ops, depth, &fake).unwrap();
        let (max_pending, requests, _, _) = fake.counters();
        assert_eq!(max_pending, expect, "depth {depth}");
        assert!(requests >= 64);
        assert_eq!(driver.take_stats().max_in_flight as usize, expect);
    }
}

#[test]
fn flush_is_a_barrier() {
    let (fake, mut driver) = up(Setup::default());
    let data = vec![1u8; 8192];
    let mut ops = vec![
        Op::Write {
            sector: 0,
            buf: &data,
        },
        Op::Write {
            sector: 32,
            buf: &data,
        },
        Op::Flush,
        Op::Write {
            sector: 64,
            buf: &data,
        },
        Op::Write {
            sector: 96,
            buf: &data,
        },
    ];
    driver.transfer(&mut ops, 16, &fake).unwrap();
    let (max_pending, _, _, overlaps) = fake.counters();
    assert_eq!(overlaps, 0, "nothing reached the device beside the flush");
    assert_eq!(max_pending, 2);
}

#[test]
fn contiguous_ops_gather_into_one_request() {
    let (fake, mut driver) = up(Setup::default());
    let before = fake.counters().1;
    // Eight one-sector buffers for sectors 100..108, then a gap, then one
    // more: two requests, the first with eight segments from eight buffers.
    let bufs: Vec<[u8; 512]> = (0..9u8).map(|i| [i; 512]).collect();
    let mut ops: Vec<Op<'_>> = bufs
        .iter()
        .enumerate()
        .map(|(i, buf)| Op::Write {
            sector: 100 + i as u64 + (i as u64 / 8) * 10,
            buf,
        })
        .collect();
    driver.transfer(&mut ops, 8, &fake).unwrap();
    let (_, requests, max_segments, _) = fake.counters();
    assert_eq!(requests - before, 2);
    assert!(max_segments >= 8, "{max_segments} segments");
    let disk = fake.disk();
    for (i, buf) in bufs.iter().enumerate() {
        let at = (100 + i + (i / 8) * 10) * SECTOR_SIZE;
        assert!(disk[at..at + 512] == buf[..], "sector of buffer {i}");
    }
    // A read into eight buffers gathers the same way, and sees the data.
    let mut back = [[0u8; 512]; 8];
    let mut ops: Vec<Op<'_>> = back
        .iter_mut()
        .enumerate()
        .map(|(i, buf)| Op::Read {
            sector: 100 + i as u64,
            buf,
        })
        .collect();
    driver.transfer(&mut ops, 1, &fake).unwrap();
    assert_eq!(fake.counters().1 - before, 3);
    assert!(back.iter().zip(&bufs).all(|(a, b)| a == b));
}

#[test]
fn flush_without_a_write_cache_sends_nothing() {
    let (fake, mut driver) = up(Setup {
        flush: false,
        ..Setup::default()
    });
    let before = fake.counters().1;
    driver.transfer(&mut [Op::Flush], 1, &fake).unwrap();
    assert_eq!(fake.counters().1, before);
}

#[test]
fn refusals_happen_before_the_device_sees_anything() {
    // The fake panics if a bad request reaches it.
    let (fake, mut driver) = up(Setup {
        sectors: 100,
        read_only: true,
        serial: "ro".into(),
        ..Setup::default()
    });
    let data = [0u8; 1024];
    let err = driver
        .transfer(
            &mut [Op::Write {
                sector: 0,
                buf: &data,
            }],
            1,
            &fake,
        )
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::ReadOnly);
    assert_eq!(
        err.to_string(),
        "disk \"ro\": write refused: the disk is read-only at sector 0"
    );
    let mut buf = [0u8; 1024];
    let mut ops = [Op::Read {
        sector: 0,
        buf: &mut buf,
    }];
    driver.transfer(&mut ops, 1, &fake).unwrap();
    let mut buf = [0u8; 1024];
    let err = driver.read(99, &mut buf, 1, &fake).unwrap_err();
    assert_eq!(err.kind, ErrorKind::OutOfRange { capacity: 100 });
    let err = driver.read(0, &mut buf[..100], 1, &fake).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Misaligned { len: 100 });
}

#[test]
fn an_io_error_names_the_piece_and_the_driver_carries_on() {
    let (fake, mut driver) = up(Setup {
        serial: "scratch".into(),
        ..Setup::default()
    });
    fake.fail_sector(300);
    // 64 KiB requests: the failing piece starts at sector 256.
    let mut buf = vec![0u8; 512 << 10];
    let err = driver.read(0, &mut buf, 4, &fake).unwrap_err();
    assert_eq!(err.to_string(), "disk \"scratch\": I/O error at sector 256");
    assert_eq!(fake.live_allocations(), 2, "the buffer was released");
    driver.read(400, &mut buf[..4096], 1, &fake).unwrap();
}

#[test]
fn a_device_that_breaks_the_protocol_is_reset_and_refused() {
    for misbehave in [Misbehave::BogusCompletion, Misbehave::NoStatus] {
        let fake = Fake::new(Setup {
            misbehave,
            ..Setup::default()
        });
        let mut driver = BlkDriver::new(fake.clone(), fake.clone(), &config()).unwrap();
        let mut buf = [0u8; 4096];
        let err = driver.read(0, &mut buf, 1, &fake).unwrap_err();
        assert!(
            matches!(err.kind, ErrorKind::Broken(_)),
            "{misbehave:?}: {err}"
        );
        assert_eq!(fake.status() & status::FAILED, status::FAILED);
        let again = driver.read(0, &mut buf, 1, &fake).unwrap_err();
        assert!(matches!(again.kind, ErrorKind::Broken(_)));
    }
}

#[test]
fn scatter_gather_respects_seg_max_and_size_max() {
    let (fake, mut driver) = up(Setup {
        sectors: 4096,
        seg_max: 3,
        size_max: 1024,
        page: 700,
        ..Setup::default()
    });
    let mut data = vec![0u8; 300 * SECTOR_SIZE];
    fill_pattern(9, 17, &mut data);
    driver.write(17, &data, &fake);
    let mut back = vec![0u8; data.len()];
    driver.read(17, &mut back, 8, &fake).unwrap();
    assert!(back == data);
    assert_eq!(
        fake.counters().2,
        3,
        "requests used the full segment allowance"
    );
}

impl BlkDriver<Fake, Fake> {
    fn write(&mut self, sector: u64, buf: &[u8], fake: &Fake) {
        self.transfer(&mut [Op::Write { sector, buf }], 8, fake)
            .unwrap();
    }

    fn read(
        &mut self,
        sector: u64,
        buf: &mut [u8],
        depth: usize,
        fake: &Fake,
    ) -> Result<(), BlockError> {
        self.transfer(&mut [Op::Read { sector, buf }], depth, fake)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random batches of writes (to disjoint extents), flushes and reads
    /// at random depths, under random device limits and buffer layouts:
    /// the disk and every read equal a plain array.
    #[test]
    fn batches_match_a_plain_array(
        seed in any::<u64>(),
        seg_max in prop::sample::select(vec![0u32, 2, 3, 8, 254]),
        size_max in prop::sample::select(vec![0u32, 600, 1024, 4096, 65536]),
        page in prop::sample::select(vec![512u64, 700, 4096, 1 << 20]),
        queue_max in prop::sample::select(vec![4u16, 8, 16, 256]),
        batches in prop::collection::vec(
            (1usize..40, prop::collection::vec((0u64..60, 1usize..40, any::<bool>()), 1..12)),
            1..6),
    ) {
        let (fake, mut driver) = up(Setup {
            sectors: 60 * 64,
            seg_max,
            size_max,
            page,
            queue_max,
            seed,
            ..Setup::default()
        });
        let mut reference = vec![0u8; 60 * 64 * SECTOR_SIZE];
        for (n, (depth, ops)) in batches.into_iter().enumerate() {
            // Each op owns a 64-sector extent, so ops of a batch never overlap.
            let mut seen = std::collections::HashSet::new();
            let plan: Vec<_> = ops.into_iter().filter(|(e, _, _)| seen.insert(*e)).collect();
            let mut bufs: Vec<Vec<u8>> = plan
                .iter()
                .map(|&(extent, sectors, write)| {
                    let mut b = vec![0u8; sectors * SECTOR_SIZE];
                    if write {
                        fill_pattern(n as u64 * 1000 + extent, extent * 64, &mut b);
                    }
                    b
                })
                .collect();
            let mut batch: Vec<Op<'_>> = Vec::new();
            for (i, (buf, &(extent, _, write))) in bufs.iter_mut().zip(&plan).enumerate() {
                if write {
                    batch.push(Op::Write { sector: extent * 64, buf });
                } else {
                    batch.push(Op::Read { sector: extent * 64, buf });
                }
                if i % 5 == 4 {
                    batch.push(Op::Flush);
                }
            }
            driver.transfer(&mut batch, depth, &fake).unwrap();
            drop(batch);
            for (buf, &(extent, _, write)) in bufs.iter().zip(&plan) {
                let at = extent as usize * 64 * SECTOR_SIZE;
                let span = &mut reference[at..at + buf.len()];
                if write {
                    span.copy_from_slice(buf);
                } else {
                    prop_assert!(span[..] == buf[..], "read of extent {} differs", extent);
                }
            }
            prop_assert_eq!(fake.counters().3, 0);
        }
        prop_assert!(fake.disk() == reference);
        prop_assert_eq!(fake.live_allocations(), 2, "every mapping was released");
    }
}
