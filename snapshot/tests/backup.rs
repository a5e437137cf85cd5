//! Backup and restore on in-memory disks: real images come back as QEMU
//! reads them, broken media are refused by name, and the tables never
//! lose or duplicate data.

mod common;

use common::{backup_disks, backup_to_tape, guest_view, image, read_guest, restore_tape, READABLE};
use proptest::prelude::*;
use snapshot::backup::newimage::NewImage;
use snapshot::backup::run::{collect, CopyRuns, SliceRuns};
use snapshot::backup::table::{Encoder, V2Table1};
use snapshot::backup::tape::{self, Header, Layout, MediumError, Run, BLOCK, HEADER_BYTES};
use snapshot::backup::{self, Error, Format, Plan};
use snapshot::devices::block::{BlockDevice, ErrorKind, MemDisk};

#[test]
fn corpus_images_come_back_as_qemu_reads_them() {
    for name in READABLE {
        let source = image(&format!("{name}.qcow2"));
        let stream = backup_to_tape(&source).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = guest_view(name);
        let raw = restore_tape(&stream, Format::Raw).unwrap();
        assert!(
            raw == want,
            "{name}: raw restore differs from qemu-img's view"
        );
        let qcow2 = restore_tape(&stream, Format::Qcow2).unwrap();
        assert!(read_guest(&qcow2) == want, "{name}: qcow2 restore differs");
        // The restored image is itself a valid source, and backs up to
        // the same data.
        let again = backup_to_tape(&qcow2).unwrap();
        assert!(
            restore_tape(&again, Format::Raw).unwrap() == want,
            "{name}: second generation"
        );
    }
}

/// Media written by the version 1 to 3 writers (kept in the corpus;
/// version 3 is the last with 512-byte blocks) restore to what QEMU reads
/// from their sources, in both formats.
#[test]
fn older_media_still_restore() {
    for name in ["scattered", "tiny"] {
        for version in 1..=3 {
            let stream = image(&format!("{name}.v{version}.tape"));
            assert_eq!(stream[8], version, "{name}: not a version {version} medium");
            let want = guest_view(name);
            let raw = restore_tape(&stream, Format::Raw).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                raw == want,
                "{name}: raw restore differs from qemu-img's view"
            );
            let qcow2 = restore_tape(&stream, Format::Qcow2).unwrap();
            assert!(read_guest(&qcow2) == want, "{name}: qcow2 restore differs");
        }
    }
}

#[test]
fn the_medium_holds_the_data_and_little_else() {
    let source = image("default64k.qcow2");
    let disk = MemDisk::from_bytes("s", &source);
    let plan = Plan::new(&disk).unwrap();
    // 64 KiB at 1M and one cluster at 40M; the zero write is not data.
    assert_eq!(plan.layout.data_clusters, 2);
    let walk = plan.image.walk(&disk).unwrap();
    let table2 = collect(&mut CopyRuns::new(walk)).unwrap();
    assert_eq!(
        table2,
        [
            Run {
                from: 16,
                to: 0,
                len: 1
            },
            Run {
                from: 640,
                to: 1,
                len: 1
            }
        ]
    );
    let stream = backup_to_tape(&source).unwrap();
    assert_eq!(stream.len() as u64, plan.layout.stream_bytes());
    let data = 2 * 65536;
    assert!(plan.layout.table1_bytes < 16, "{:?}", plan.layout);
    assert_eq!(
        stream.len() as u64,
        HEADER_BYTES + BLOCK + BLOCK + data + 512,
        "header, table 1 (in a block), one extent, trailer"
    );
}

#[test]
fn an_empty_image_backs_up_to_header_tables_and_trailer() {
    let stream = backup_to_tape(&image("empty.qcow2")).unwrap();
    let front = backup::Front::read(&MemDisk::from_bytes("t", &stream)).unwrap();
    assert_eq!(front.header.layout.data_clusters, 0);
    assert_eq!(front.header.layout.extents(), 0);
    let raw = restore_tape(&stream, Format::Raw).unwrap();
    assert!(raw.len() == 16 << 20 && raw.iter().all(|&b| b == 0));
}

fn restore_error(stream: &[u8]) -> Error {
    restore_tape(stream, Format::Raw).expect_err("a broken medium was restored")
}

#[test]
fn broken_media_are_refused_saying_what_is_wrong() {
    // 3.5 MiB of data in 4 KiB clusters: four extents.
    let (source, _) = made_image(12, 2000, |vc| vc % 2 == 0 || vc > 1500);
    let stream = backup_to_tape(&source).unwrap();
    let layout = backup::Front::read(&MemDisk::from_bytes("t", &stream))
        .unwrap()
        .header
        .layout;
    let flip = |at: u64| {
        let mut s = stream.clone();
        s[at as usize] ^= 0x40;
        s
    };
    let checksum = |what: &str| Error::Medium(MediumError::BadChecksum(what.into()));
    assert_eq!(restore_error(&flip(200)), checksum("header"));
    assert!(
        restore_error(&flip(200)).is_refusal(),
        "a bad medium is refused"
    );
    assert_eq!(
        restore_error(&flip(layout.table1_offset() + 20)),
        checksum("table 1")
    );
    let (_, _, at) = layout.extent(2);
    assert_eq!(restore_error(&flip(at + 16)), checksum("extent 2 header"));
    let err = restore_error(&flip(at + BLOCK + 100));
    assert!(
        format!("{err}").starts_with("bad checksum: extent 2 (copy clusters"),
        "{err}"
    );
    assert_eq!(
        restore_error(&flip(layout.trailer_offset() + 20)),
        checksum("trailer")
    );

    let mut s = stream.clone();
    s[8] = 5;
    assert_eq!(
        restore_error(&s),
        Error::Medium(MediumError::UnknownVersion(5))
    );
    assert_eq!(
        format!("{}", restore_error(&s)),
        "unknown medium version 5 (this build reads versions 1 to 4)"
    );
    let mut s = stream.clone();
    s[0] = b'X';
    assert_eq!(restore_error(&s), Error::Medium(MediumError::NotAMedium));

    // Truncated anywhere: the trailer is missing.
    for len in [
        0,
        512,
        4096,
        5120,
        stream.len() / 1024 * 512,
        stream.len() - 512,
    ] {
        let err = restore_error(&stream[..len]);
        assert!(
            matches!(err, Error::Medium(MediumError::MissingTrailer(_))),
            "cut at {len}: {err}"
        );
    }
    // Cut inside the last sector: what is left of the trailer is refused.
    let err = restore_error(&stream[..stream.len() - 1]);
    assert_eq!(err, checksum("trailer"));
    // The trailer wiped (a stream that was cut, then padded with zeros).
    let mut s = stream.clone();
    let t = layout.trailer_offset() as usize;
    s[t..].fill(0);
    let err = restore_error(&s);
    assert!(
        matches!(err, Error::Medium(MediumError::MissingTrailer(_))),
        "{err}"
    );
}

/// A short medium is reported with its true length (the caller's, when
/// the device rounds it up to whole sectors) and as short, not as a bad
/// header.
#[test]
fn short_media_are_reported_with_their_true_length() {
    let stream = backup_to_tape(&image("scattered.qcow2")).unwrap();
    for len in [100usize, 4095] {
        let tape = MemDisk::from_bytes("t", &stream[..len]);
        assert_eq!(tape.info().bytes(), len.next_multiple_of(512) as u64);
        let err = backup::Front::read_len(&tape, len as u64).unwrap_err();
        assert_eq!(
            format!("{err}"),
            format!(
                "missing trailer: the medium is {len} bytes, shorter than its 4096-byte header"
            )
        );
    }
    let len = stream.len() - 700;
    let tape = MemDisk::from_bytes("t", &stream[..len]);
    let err = backup::Front::read_len(&tape, len as u64).unwrap_err();
    assert_eq!(
        format!("{err}"),
        format!(
            "missing trailer: the medium ends at byte {len}, the stream at {}",
            stream.len()
        )
    );
}

#[test]
fn too_small_disks_are_refused_before_anything_is_written() {
    let source = image("scattered.qcow2");
    let src = MemDisk::from_bytes("source", &source).read_only();
    let plan = Plan::new(&src).unwrap();
    let tape = MemDisk::new("tape", plan.layout.stream_bytes() / 512 - 1);
    let err = backup::backup(&src, &tape, &mut |_, _, _| {}).unwrap_err();
    assert_eq!(
        format!("{err}"),
        format!(
            "disk \"tape\" too small: needs {} bytes, has {}",
            plan.layout.stream_bytes(),
            plan.layout.stream_bytes() - 512
        )
    );
    assert!(tape.contents().iter().all(|&b| b == 0));
    assert!(
        matches!(err, Error::TooSmall { ref disk, .. } if disk == "tape"),
        "{err}"
    );
    assert!(err.is_refusal());
}

#[test]
fn device_errors_stop_the_job_naming_disk_and_sector() {
    let source = image("scattered.qcow2");
    let (src, tape) = backup_disks(&source);
    tape.fail_sector(9);
    let err = backup::backup(&src, &tape, &mut |_, _, _| {}).unwrap_err();
    assert!(
        !err.is_refusal(),
        "a disk error is a failure, not a refusal"
    );
    match err {
        Error::Io(e) => {
            assert_eq!((e.disk.as_str(), e.kind), ("tape", ErrorKind::Io));
        }
        other => panic!("{other}"),
    }
}

#[test]
fn progress_reaches_every_byte_of_each_stage() {
    let source = image("scattered.qcow2");
    let (src, tape) = backup_disks(&source);
    let mut seen = Vec::new();
    let s = backup::backup(&src, &tape, &mut |stage, done, total| {
        seen.push((stage, done, total))
    })
    .unwrap();
    for stage in [backup::Stage::Copy, backup::Stage::Stream] {
        let last = seen.iter().rfind(|p| p.0 == stage).unwrap();
        assert_eq!((last.1, last.2), (s.data_bytes, s.data_bytes), "{stage:?}");
    }
}

/// A qcow2 image of `vclusters` clusters of `1 << cluster_bits` bytes
/// whose clusters `used` says hold data, each filled with its own
/// pattern; and the guest's view of it.
fn made_image(cluster_bits: u32, vclusters: u64, used: impl Fn(u64) -> bool) -> (Vec<u8>, Vec<u8>) {
    let cs = 1u64 << cluster_bits;
    let mut model = vec![0u8; (vclusters * cs) as usize];
    let mut runs: Vec<Run> = Vec::new();
    for vc in (0..vclusters).filter(|&vc| used(vc)) {
        let cluster = &mut model[(vc * cs) as usize..((vc + 1) * cs) as usize];
        snapshot::devices::block::fill_pattern(7, vc, cluster);
        match runs.last_mut() {
            Some(r) if r.from + r.len == vc => r.len += 1,
            _ => runs.push(Run {
                from: vc,
                to: 0,
                len: 1,
            }),
        }
    }
    let img = NewImage::from_runs(cluster_bits, vclusters * cs, &runs);
    let mut file = img.metadata(&runs);
    for r in &runs {
        file.extend_from_slice(&model[(r.from * cs) as usize..((r.from + r.len) * cs) as usize]);
    }
    (file, model)
}

/// Runs of table 1 from random kinds (0, 1: no data; 2, 3: data) and a
/// random order of host clusters.
fn random_table1(kinds: &[u8], order: &[u64]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let data = kinds.iter().enumerate().filter(|(_, &k)| k >= 2);
    for (n, (vc, _)) in data.enumerate() {
        let host = 1 + order[n % order.len()] * 7919 % 100_000 + n as u64 * 100_000;
        let r = Run {
            from: vc as u64,
            to: host,
            len: 1,
        };
        match runs.last_mut() {
            Some(p) if p.continued_by(&r) => p.len += 1,
            _ => runs.push(r),
        }
    }
    runs
}

proptest! {
    /// Table 2 names every data cluster of table 1 exactly once and
    /// nothing else; copy clusters are 0..n with no gap or repeat; table 3
    /// places each copy cluster exactly once, in medium blocks that do
    /// not overlap and lie between the tables and the trailer.
    #[test]
    fn tables_2_and_3_are_consistent_with_table_1(
        cluster_bits in 9u32..=16,
        kinds in prop::collection::vec(0u8..=3, 1..3000),
        order in prop::collection::vec(0u64..1000, 1..50),
        version in 3u32..=4,
    ) {
        let t1 = random_table1(&kinds, &order);
        let t2: Vec<Run> = collect::<()>(&mut CopyRuns::new(SliceRuns(&t1))).unwrap();
        let data: Vec<u64> = kinds.iter().enumerate()
            .filter(|(_, &k)| k >= 2).map(|(i, _)| i as u64).collect();
        let mut copy_of = vec![None; kinds.len()];
        let mut copies = vec![false; data.len()];
        for r in &t2 {
            prop_assert!(r.len > 0);
            for i in 0..r.len {
                let (vc, c) = ((r.from + i) as usize, (r.to + i) as usize);
                prop_assert!(kinds[vc] >= 2, "table 2 maps non-data cluster {}", vc);
                prop_assert!(copy_of[vc].is_none(), "virtual cluster {} twice", vc);
                prop_assert!(!copies[c], "copy cluster {} twice", c);
                copy_of[vc] = Some(c);
                copies[c] = true;
            }
        }
        prop_assert!(copies.iter().all(|&c| c), "a copy cluster is unused");
        prop_assert_eq!(copy_of.iter().filter(|c| c.is_some()).count(), data.len());
        // Adjacent runs are never mergeable: unused entries split them.
        for w in t2.windows(2) {
            prop_assert!(w[0].from + w[0].len < w[1].from);
        }

        let layout = Layout {
            cluster_bits,
            data_clusters: data.len() as u64,
            table1_bytes: 7,
            table2_runs: 0,
            block: tape::block_of(version, cluster_bits),
        };
        let block = layout.block;
        prop_assert_eq!(layout.data_offset() % block, 0, "data on a block");
        let cs = 1u64 << cluster_bits;
        let mut placed = vec![false; data.len()];
        // Bytes: where the last extent's data ended (the tables before).
        let mut end = layout.data_offset();
        for r in layout.table3() {
            let at = r.to * block;
            prop_assert!(at > end, "extent data overlaps what precedes it");
            prop_assert_eq!(at - end, block, "one header block between");
            for i in 0..r.len {
                let c = (r.from + i) as usize;
                prop_assert!(!placed[c]);
                placed[c] = true;
            }
            end = at + r.len * cs;
        }
        prop_assert!(placed.iter().all(|&p| p));
        prop_assert_eq!(layout.trailer_offset(), end);
        prop_assert_eq!(end % block, 0, "the trailer on a block");
        prop_assert_eq!(layout.stream_bytes(), layout.trailer_offset() + 512);
    }

    /// Table 1 as version 3 encodes it decodes to the same data clusters,
    /// in runs joined where they continue each other in the virtual disk,
    /// and costs what two LEB128 numbers a joined run take: at most four
    /// bytes for a lone cluster after a gap under 2^21 clusters.
    #[test]
    fn table_1_records_decode_to_the_runs_encoded(
        cluster_bits in 9u32..=21,
        kinds in prop::collection::vec(0u8..=3, 1..3000),
        order in prop::collection::vec(0u64..1000, 1..50),
    ) {
        let t1 = random_table1(&kinds, &order);
        let mut enc = Encoder::default();
        let mut bytes = vec![0u8; HEADER_BYTES as usize];
        for r in &t1 {
            enc.push(r, &mut |b| bytes.extend_from_slice(b));
        }
        enc.finish(&mut |b| bytes.extend_from_slice(b));
        // The reference: the data clusters, joined by virtual order alone.
        let mut joined: Vec<Run> = Vec::new();
        for r in &t1 {
            match joined.last_mut() {
                Some(p) if p.end() == r.from => p.len += r.len,
                _ => joined.push(Run { to: 0, ..*r }),
            }
        }
        let leb = |v: u64| (64 - v.leading_zeros()).max(1).div_ceil(7) as u64;
        let mut end = 0;
        let mut want_bytes = 0;
        for r in &joined {
            want_bytes += leb(r.from - end) + leb(r.len - 1);
            end = r.end();
        }
        prop_assert_eq!(enc.bytes, want_bytes);
        prop_assert_eq!(enc.runs, joined.len() as u64);
        let cs = 1u64 << cluster_bits;
        let header = Header {
            version: tape::VERSION,
            layout: Layout::new(cluster_bits, t1.iter().map(|r| r.len).sum(), enc.bytes),
            table1_runs: enc.runs,
            virtual_size: kinds.len() as u64 * cs,
            source_bytes: 200_000_000 * cs,
            source: tape::SourceKind::Qcow2,
            table1_checksum: enc.checksum(),
            table2_checksum: 0,
        };
        bytes.resize(bytes.len().next_multiple_of(512), 0);
        let tape = MemDisk::from_bytes("t", &bytes);
        let back = collect(&mut V2Table1::new(&tape, &header).unwrap()).unwrap();
        prop_assert_eq!(back, joined);
    }

    /// Random disks, written as qcow2 with known contents, come back
    /// byte for byte through backup and both restore formats.
    #[test]
    fn random_disks_round_trip(
        cluster_bits in 9u32..=14,
        written in prop::collection::vec((0u64..400, 1u64..6, any::<u8>()), 0..40),
        vclusters in 1u64..400,
    ) {
        let cs = 1u64 << cluster_bits;
        let virtual_size = vclusters * cs;
        let mut model = vec![0u8; virtual_size as usize];
        let mut used = vec![false; vclusters as usize];
        for &(at, len, byte) in &written {
            for vc in at..(at + len).min(vclusters) {
                used[vc as usize] = true;
                let b = byte.wrapping_add(vc as u8);
                model[(vc * cs) as usize..((vc + 1) * cs) as usize].fill(b);
                model[(vc * cs) as usize] = vc as u8; // tell clusters apart
            }
        }
        let mut runs: Vec<Run> = Vec::new();
        for vc in (0..vclusters).filter(|&vc| used[vc as usize]) {
            match runs.last_mut() {
                Some(r) if r.from + r.len == vc => r.len += 1,
                _ => runs.push(Run { from: vc, to: 0, len: 1 }),
            }
        }
        let img = NewImage::from_runs(cluster_bits, virtual_size, &runs);
        let mut file = img.metadata(&runs);
        for vc in (0..vclusters).filter(|&vc| used[vc as usize]) {
            file.extend_from_slice(&model[(vc * cs) as usize..((vc + 1) * cs) as usize]);
        }
        prop_assert_eq!(file.len() as u64, img.file_bytes());
        let stream = backup_to_tape(&file).unwrap();
        prop_assert!(restore_tape(&stream, Format::Raw).unwrap() == model);
        let back = restore_tape(&stream, Format::Qcow2).unwrap();
        prop_assert!(read_guest(&back) == model);
    }

    /// Any single corrupted byte is refused or, when it only hit padding,
    /// changes nothing: a restore is never silently wrong.
    #[test]
    fn a_corrupted_byte_is_refused_or_harmless(at in any::<prop::sample::Index>(), bit in 0u8..8) {
        static GOOD: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
        let (stream, want) = GOOD.get_or_init(|| {
            let stream = backup_to_tape(&image("scattered.qcow2")).unwrap();
            let want = restore_tape(&stream, Format::Raw).unwrap();
            (stream, want)
        });
        let mut bad = stream.clone();
        let i = at.index(bad.len());
        bad[i] ^= 1 << bit;
        match restore_tape(&bad, Format::Raw) {
            Err(Error::Medium(_)) => {}
            Err(other) => prop_assert!(false, "byte {}: {}", i, other),
            Ok(raw) => prop_assert!(raw == *want, "byte {} changed the restore", i),
        }
    }
}

#[test]
fn the_source_device_is_never_written() {
    // The source disk is read-only: any write would fail the backup.
    let source = image("scattered.qcow2");
    let (src, tape) = backup_disks(&source);
    assert!(src.info().read_only);
    backup::backup(&src, &tape, &mut |_, _, _| {}).unwrap();
}

/// An image of about 21 MiB of data: more windows than the pipeline's
/// ring holds, so the copy runs ahead of the stream and waits for it.
fn many_windows() -> (Vec<u8>, Vec<u8>) {
    made_image(16, 512, |vc| vc % 3 != 1)
}

#[test]
fn many_windows_give_the_same_medium_in_turn_and_on_two_threads() {
    let (file, model) = many_windows();
    let (src, tape) = backup_disks(&file);
    let s = backup::backup(&src, &tape, &mut |_, _, _| {}).unwrap();
    let windows = s
        .extents
        .div_ceil(backup::engine::WINDOW / (BLOCK + tape::EXTENT_DATA_BYTES));
    assert!(
        windows > backup::pipe::RING as u64,
        "{windows} windows: the ring is never full"
    );
    let mut in_turn = tape.contents();
    in_turn.truncate(s.medium_bytes as usize);
    let threaded = backup_to_tape(&file).unwrap();
    assert!(in_turn == threaded, "the two media differ");
    let restored = restore_tape(&threaded, Format::Raw).unwrap();
    assert!(restored[..model.len()] == model[..], "the restore differs");
}

#[test]
fn a_tape_error_deep_in_the_stream_stops_both_threads() {
    let (file, _) = many_windows();
    let (src, tape) = backup_disks(&file);
    let plan = Plan::new(&src).unwrap();
    // In the middle of the data, windows after the ring's first fill.
    let (_, _, at) = plan.layout.extent(plan.layout.extents() / 2);
    tape.fail_sector(at / 512 + 1);
    let err =
        backup::backup_overlapped(&src, &tape, &common::Threads, &mut |_, _, _| {}).unwrap_err();
    match err {
        Error::Io(e) => assert_eq!((e.disk.as_str(), e.kind), ("tape", ErrorKind::Io)),
        other => panic!("{other}"),
    }
}
