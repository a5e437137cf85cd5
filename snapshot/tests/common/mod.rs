//! Shared by the qcow2 and backup host tests: the corpus of real images
//! (made by `qemu-img create` and `qemu-io`, see `corpus/README.md`) and
//! QEMU's own reading of them.

#![allow(dead_code)]

use snapshot::backup::{self, source, Format};
use snapshot::devices::block::MemDisk;

/// A corpus image's bytes.
pub fn image(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/corpus/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The images every test may read, with a reference map.
pub const READABLE: &[&str] = &[
    "empty",
    "scattered",
    "default64k",
    "tiny",
    "wide",
    "snapshots",
];

/// One extent of `qemu-img map`: guest start, length, and the host offset
/// when it holds data.
#[derive(Debug, Clone, Copy)]
pub struct MapExtent {
    pub start: u64,
    pub len: u64,
    pub host: Option<u64>,
    /// QEMU maps it as compressed data (no host offset).
    pub compressed: bool,
}

/// QEMU's map of a corpus image.
pub fn qemu_map(name: &str) -> Vec<MapExtent> {
    let path = format!("{}/tests/corpus/{name}.map", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<i64> = l.split(' ').map(|w| w.parse().unwrap()).collect();
            MapExtent {
                start: f[0] as u64,
                len: f[1] as u64,
                host: (f[2] == 1).then_some(f[3] as u64),
                compressed: f[2] == 2,
            }
        })
        .collect()
}

/// The guest's view of a corpus image, built from QEMU's map and the
/// image's bytes: the independent reference a restore must reproduce.
pub fn guest_view(name: &str) -> Vec<u8> {
    let bytes = image(&format!("{name}.qcow2"));
    let map = qemu_map(name);
    let size = map.last().map_or(0, |e| e.start + e.len);
    let mut view = vec![0u8; size as usize];
    for e in map {
        assert!(!e.compressed, "{name}: compressed data has no host offset");
        if let Some(host) = e.host {
            let (s, h, n) = (e.start as usize, host as usize, e.len as usize);
            let have = n.min(bytes.len().saturating_sub(h));
            view[s..s + have].copy_from_slice(&bytes[h..h + have]);
        }
    }
    view
}

/// Disks for a backup of `source`: the source (read-only) and a tape as
/// large as the job could need (a compressed source needs more than its
/// own size).
pub fn backup_disks(source: &[u8]) -> (MemDisk, MemDisk) {
    let sectors = (source.len() as u64).div_ceil(512);
    let src = MemDisk::from_bytes("source", source).read_only();
    let stream = match backup::Plan::new(&src) {
        Ok(p) => p.layout.stream_bytes() / 512,
        Err(_) => 0,
    };
    (src, MemDisk::new("tape", (2 * sectors + 64).max(stream)))
}

/// Runs the two jobs on two threads, as the kernel does.
#[derive(Debug)]
pub struct Threads;

impl backup::Overlap for Threads {
    fn both(&self, a: &mut (dyn FnMut() + Send), b: &mut dyn FnMut()) {
        std::thread::scope(|s| {
            s.spawn(a);
            b();
        });
    }

    fn wait(&self, _key: usize, ready: &dyn Fn() -> bool) -> bool {
        while !ready() {
            std::thread::yield_now();
        }
        true
    }
}

/// Backs `source` up, each window's copy on a second thread while the
/// window before streams; returns the tape's stream (cut to its length).
pub fn backup_to_tape(source: &[u8]) -> Result<Vec<u8>, backup::Error> {
    let (src, tape) = backup_disks(source);
    let summary = backup::backup_overlapped(&src, &tape, &Threads, &mut |_, _, _| {})?;
    assert_eq!(
        src.contents()[..source.len()],
        *source,
        "the source changed"
    );
    let mut stream = tape.contents();
    stream.truncate(summary.medium_bytes as usize);
    Ok(stream)
}

/// Restores a stream; returns the output disk's bytes (cut to what
/// matters).
pub fn restore_tape(stream: &[u8], format: Format) -> Result<Vec<u8>, backup::Error> {
    let tape = MemDisk::from_bytes("tape", stream).read_only();
    let front = backup::Front::read(&tape)?;
    let out = MemDisk::new("out", front.out_bytes(format).div_ceil(512) + 1);
    let summary = backup::restore(&tape, &out, format, &mut |_, _, _| {})?;
    let mut bytes = out.contents();
    bytes.truncate(summary.out_bytes as usize);
    Ok(bytes)
}

/// Every mapped virtual cluster of a qcow2 image and what it holds, read
/// with this crate's reader.
pub fn clusters(qcow2: &[u8]) -> Vec<(u64, snapshot::backup::qcow2::Cluster)> {
    let disk = MemDisk::from_bytes("img", qcow2);
    let img = source::open(&disk, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    let mut walk = img.walk(&disk).unwrap();
    let mut all = Vec::new();
    while let Some(c) = walk.next_cluster().unwrap() {
        all.push(c);
    }
    all
}

/// What a qcow2 image's guest sees, read with this crate's reader;
/// compressed clusters read as zeros here (the corpus tests check their
/// decoding against QEMU).
pub fn read_guest(qcow2: &[u8]) -> Vec<u8> {
    use snapshot::backup::qcow2::Cluster;
    let disk = MemDisk::from_bytes("img", qcow2);
    let img = source::open(&disk, &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    let cs = img.header.cluster_size() as usize;
    let mut view = vec![0u8; img.header.virtual_size as usize];
    for (vc, c) in clusters(qcow2) {
        let (host, data) = match c {
            Cluster::Data(host) => (host as usize, u32::MAX),
            Cluster::Subclusters { host, data } => (host as usize, data),
            _ => continue,
        };
        let at = vc as usize * cs;
        let n = cs.min(view.len() - at);
        let have = n.min(qcow2.len() - host);
        view[at..at + have].copy_from_slice(&qcow2[host..host + have]);
        let sub = cs / 32;
        for i in (0..32).filter(|i| data & (1 << i) == 0) {
            let from = (at + i * sub).min(at + n);
            view[from..(from + sub).min(at + n)].fill(0);
        }
    }
    view
}
