//! Mutation fuzzing of the qcow2 reader, seeded with the corpus of real
//! images in `tests/corpus/` (supported and refused ones alike).
//!
//! Each case takes a corpus image, overwrites a few bytes or words (header
//! fields, table entries, anywhere) with random or boundary values, and
//! reads it. The reader must return, never panic; what it accepts must
//! back up and restore to exactly what it reads.
//!
//! `PROPTEST_CASES=100000 cargo test -p snapshot --test fuzz_qcow2 --release`
//! runs a longer campaign; a failure prints the mutation that caused it.

mod common;

use common::{backup_to_tape, clusters, image, read_guest, restore_tape};
use proptest::prelude::*;
use snapshot::backup::qcow2::Cluster;
use snapshot::backup::source;
use snapshot::backup::Format;
use snapshot::devices::block::MemDisk;

const CORPUS: &[&str] = &[
    "empty.qcow2",
    "scattered.qcow2",
    "default64k.qcow2",
    "tiny.qcow2",
    "wide.qcow2",
    "snapshots.qcow2",
    "backed.qcow2",
    "compressed.qcow2",
    "ext-l2.qcow2",
    "zstd.qcow2",
    "extdata.qcow2",
];

/// One change to an image.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte of the header cluster.
    HeaderByte(usize, u8),
    /// Set a big-endian word anywhere (aligned to 8) to a boundary value.
    Word(usize, u64),
    /// XOR any byte.
    Byte(usize, u8),
    /// Cut the file.
    Truncate(usize),
}

fn boundary() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(1 << 63),
        Just(0x8000_0000_0000_0200),
        Just(0x4000_0000_0000_0000),
        Just(0x00ff_ffff_ffff_fe00),
        (0u64..64).prop_map(|s| 1u64 << s),
        (0u64..1 << 20).prop_map(|c| c << 9),
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (0usize..512, 1u8..).prop_map(|(a, v)| Mutation::HeaderByte(a, v)),
        3 => (any::<usize>(), boundary()).prop_map(|(a, v)| Mutation::Word(a, v)),
        2 => (any::<usize>(), 1u8..).prop_map(|(a, v)| Mutation::Byte(a, v)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    if len == 0 {
        return;
    }
    match *m {
        Mutation::HeaderByte(at, v) => bytes[at % len] ^= v,
        Mutation::Word(at, v) => {
            let at = (at % len) & !7;
            if at + 8 <= len {
                bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
            }
        }
        Mutation::Byte(at, v) => bytes[at % len] ^= v,
        Mutation::Truncate(at) => bytes.truncate(at % len),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_images_never_panic_the_reader(
        which in 0..CORPUS.len(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let mut bytes = image(CORPUS[which]);
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let Ok(img) = source::open(&MemDisk::from_bytes("fuzz", &bytes), &mut |_| {}) else {
            return Ok(());
        };
        // Accepted: the backup holds what the reader reads, and nothing
        // the image does not. Large virtual sizes are read but not
        // restored into memory here.
        if img.header.backing_file.is_some() {
            return Ok(());
        }
        // A compressed cluster's stream is only decoded by the backup,
        // which may refuse it then, by name.
        let stream = match backup_to_tape(&bytes) {
            Ok(s) => s,
            Err(e) if format!("{e}").contains("the compressed cluster at virtual offset") => {
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
        };
        if img.header.virtual_size <= 64 << 20 {
            let mut raw = restore_tape(&stream, Format::Raw).map_err(|e| TestCaseError::fail(format!("{e}")))?;
            // Compressed clusters are compared against QEMU elsewhere.
            let cs = img.header.cluster_size() as usize;
            for (vc, c) in clusters(&bytes) {
                if let Cluster::Compressed(_) = c {
                    let (at, end) = (vc as usize * cs, raw.len());
                    raw[at..(at + cs).min(end)].fill(0);
                }
            }
            prop_assert!(raw == read_guest(&bytes));
        }
    }
}
