//! Host side of `clone` and `clone-split`: makes a clone file, resolves a
//! clone's backing chain the way QEMU does (a relative name is relative to
//! the directory of the image that names it), attaches the chain
//! read-only in order (`back1`, `back2` ...) and, after the kernel's
//! split, checks the image and cuts the room it was given to grow into.
//!
//! The chain is checked here with the same library the kernel uses, so a
//! missing backing file (named with the path tried), a loop, a short
//! backing image or an unsupported feature is refused before QEMU starts,
//! with nothing written. The host never writes a backing file.

use std::fs::OpenOptions;
use std::path::{Component, Path, PathBuf};

use snapshot::backup::source::read_header;
use snapshot::interface::trace::Record;
use snapshot::qcow2::chain::{self, Format, Layer};
use snapshot::qcow2::check::check;
use snapshot::qcow2::create::clone_image;
use snapshot::qcow2::flat::FlatView;
use snapshot::qcow2::workload;
use snapshot::qcow2::{Qcow2Disk, Qcow2Error};

use crate::filedisk::{check_writable, FileDisk};
use crate::qemu::Disk;

/// The name of the `n`th backing layer's disk (1 is the clone's base).
pub fn layer_disk(n: usize) -> String {
    format!("back{n}")
}

/// The full path of `path` (which must exist).
fn canonical(path: &Path) -> Result<PathBuf, String> {
    path.canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Where the backing name `name` found in `parent` points, as QEMU
/// resolves it.
pub fn resolve_name(parent: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        parent.parent().unwrap_or(Path::new("/")).join(p)
    }
}

/// The backing chain of the qcow2 image at `image`, top-down, checked as
/// the kernel will check it. A relative backing name is resolved as QEMU
/// does, next to the image's path as it was named (through any symbolic
/// link, not the link's target); each layer is then known by its full
/// path, so that a loop is seen whatever the names.
pub fn chain_of(image: &Path) -> Result<Vec<PathBuf>, String> {
    let top_path = canonical(image)?;
    let top = FileDisk::open(&top_path, false).map_err(|e| format!("{}: {e}", image.display()))?;
    let named = std::path::absolute(image).map_err(|e| format!("{}: {e}", image.display()))?;
    // Each layer's full path and the path it was named by.
    let mut names = vec![(top_path.display().to_string(), named)];
    let mut layers = Vec::new();
    let mut resolve = |name: &str, parent: &str| -> snapshot::qcow2::Result<Layer> {
        let parent_named = names
            .iter()
            .rfind(|(id, _)| id == parent)
            .map_or_else(|| PathBuf::from(parent), |(_, p)| p.clone());
        if let Some(protocol) = protocol_of(name) {
            return Err(Qcow2Error::Unsupported(format!(
                "backing file \"{name}\" of {parent}: QEMU reads \"{protocol}:\" as a \
                 protocol and opens no such file; name it \"./{name}\" \
                 (qemu-img rebase -u -b ./{name}) if it is one"
            )));
        }
        let path = resolve_name(&parent_named, name);
        let dev = FileDisk::open(&path, false).map_err(|e| {
            Qcow2Error::Invalid(format!(
                "backing file \"{name}\" of {parent}: {}: {e}",
                path.display()
            ))
        })?;
        let id = path
            .canonicalize()
            .unwrap_or_else(|_| path.clone())
            .display()
            .to_string();
        layers.push(PathBuf::from(&id));
        names.push((id.clone(), path));
        Ok(Layer {
            dev: Box::new(dev),
            id,
        })
    };
    chain::open(top, &top_path.display().to_string(), &mut resolve).map_err(|e| e.to_string())?;
    Ok(layers)
}

/// The protocol QEMU sees in a backing name, if any: what comes before a
/// colon that precedes the first slash (`nbd:...`, or `my:base.qcow2`).
fn protocol_of(name: &str) -> Option<&str> {
    let first = name.split('/').next()?;
    first.split_once(':').map(|(protocol, _)| protocol)
}

/// A clone's chain seen as one qcow2 file, on the host.
pub type FlatSource = FlatView<Qcow2Disk<FileDisk>>;

/// The merged view of the chain under the qcow2 image `source`, as one
/// self-contained qcow2 file for the compact backup, and the backing
/// disks to attach read-only (`back1` ...); `None` without a backing file.
pub fn flat_source(source: &Path) -> Result<Option<(FlatSource, Vec<Disk>)>, String> {
    let dev = FileDisk::open(source, false).map_err(|e| format!("{}: {e}", source.display()))?;
    let Ok(h) = read_header(&dev) else {
        return Ok(None);
    };
    if h.backing_file.is_none() {
        return Ok(None);
    }
    let paths = chain_of(source)?;
    let mut next = paths.iter();
    let mut resolve = |_: &str, _: &str| -> snapshot::qcow2::Result<Layer> {
        let path = next.next().expect("the chain was resolved just before");
        let dev = FileDisk::open(path, false).map_err(|e| Qcow2Error::Invalid(e.to_string()))?;
        Ok(Layer {
            dev: Box::new(dev),
            id: path.display().to_string(),
        })
    };
    let merged =
        chain::open(dev, &source.display().to_string(), &mut resolve).map_err(|e| e.to_string())?;
    let view = FlatView::new(merged, h.cluster_bits).map_err(|e| e.to_string())?;
    let disks = paths
        .iter()
        .enumerate()
        .map(|(i, p)| Disk {
            read_only: true,
            ..Disk::new(p, &layer_disk(i + 1))
        })
        .collect();
    Ok(Some((view, disks)))
}

/// `to` relative to the directory `from` (both absolute).
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let (a, b): (Vec<Component<'_>>, Vec<Component<'_>>) =
        (from.components().collect(), to.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c);
    }
    out
}

/// A clone made.
#[derive(Debug, Clone)]
pub struct CloneJob {
    /// The clone file.
    pub out: PathBuf,
    /// The backing name its header holds.
    pub backing_name: String,
    /// The disks the kernel gets: the clone, then its chain.
    pub disks: Vec<Disk>,
}

/// Makes an empty qcow2 clone at `out` (which must not exist) of the
/// qcow2 or raw image `base`, naming it relative to the clone. `format`
/// is the base's, as the user said it; without it the base's first bytes
/// decide (a raw disk whose guest wrote a qcow2 header there would be
/// taken for qcow2, and the files its header names read: the tool says
/// what it found, and `--format raw` says otherwise).
pub fn make_clone(base: &Path, out: &Path, format: Option<Format>) -> Result<CloneJob, String> {
    if out.symlink_metadata().is_ok() {
        // A dangling symbolic link too: writing through it would put the
        // clone where its relative backing name does not point.
        return Err(format!("{} exists; clone makes a new file", out.display()));
    }
    let base_path = named_path(base)?;
    let dev = FileDisk::open(&base_path, false).map_err(|e| format!("{}: {e}", base.display()))?;
    let format = match format {
        Some(f) => f,
        None => {
            let probed = Format::probe(&dev).map_err(|e| e.to_string())?;
            eprintln!(
                "clone: {} reads as {} by its first bytes (--format raw|qcow2 to say which it is)",
                base.display(),
                probed.name()
            );
            probed
        }
    };
    let (size, bits) = match format {
        Format::Qcow2 => {
            chain_of(&base_path)?;
            let h = read_header(&dev).map_err(|e| format!("{}: {e}", base.display()))?;
            // At least QEMU's 64 KiB: the split's tables and allocation
            // map grow with the clusters a disk holds, and a clone of 4 KiB
            // clusters over a 1 TiB base would not fit the kernel's heap.
            (h.virtual_size, h.cluster_bits.max(16))
        }
        Format::Raw if dev.len() % 512 != 0 => {
            return Err(format!(
                "{}: a raw base of {} bytes is not a whole number of 512-byte sectors",
                base.display(),
                dev.len()
            ))
        }
        Format::Raw => (dev.len(), 16),
    };
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = backing_name(&relative(&canonical(dir)?, &base_path));
    let fmt = format.name();
    let bytes = clone_image(size, bits, Some((&name, fmt))).map_err(|e| e.to_string())?;
    std::fs::write(out, bytes).map_err(|e| format!("{}: {e}", out.display()))?;
    let disks = attach(out).inspect_err(|_| {
        let _ = std::fs::remove_file(out);
    })?;
    Ok(CloneJob {
        out: out.to_path_buf(),
        backing_name: name,
        disks,
    })
}

/// The full path of the file `path` names, its directory resolved but not
/// the file's own name: a symbolic link stays the link, since QEMU resolves
/// the relative backing names of the image a link points at beside the
/// link, not beside its target.
fn named_path(path: &Path) -> Result<PathBuf, String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    Ok(canonical(dir)?.join(file))
}

/// The backing name to write for the relative path `path`: as it is,
/// unless QEMU would take what comes before a colon for a protocol
/// (`my:base.qcow2`), which `./` prevents.
fn backing_name(path: &Path) -> String {
    let name = path.display().to_string();
    if protocol_of(&name).is_some() {
        format!("./{name}")
    } else {
        name
    }
}

/// The clone writable, its chain read-only in order. The clone is
/// attached past the host's page cache (`cache.direct=on`, where
/// [`crate::qemu::direct_io`] allows), as a storage controller's disk
/// is: a split writes every hole's cluster onto fresh space, and through
/// the page cache it ran at 0.65 to 0.43 of `qemu-img rebase`'s speed
/// (1.54 to 2.34 times its time) against 1.20 to 1.29 direct, three
/// pairs in one sitting (docs/results/clone-split.md).
fn attach(image: &Path) -> Result<Vec<Disk>, String> {
    let mut disks = vec![Disk {
        direct: true,
        ..Disk::new(image, "clone")
    }];
    for (i, path) in chain_of(image)?.into_iter().enumerate() {
        disks.push(Disk {
            read_only: true,
            ..Disk::new(path, &layer_disk(i + 1))
        });
    }
    Ok(disks)
}

/// A split about to run.
#[derive(Debug, Clone)]
pub struct SplitJob {
    /// The clone.
    pub image: PathBuf,
    /// Its chain, top-down.
    pub chain: Vec<PathBuf>,
    /// The disks the kernel gets.
    pub disks: Vec<Disk>,
    /// The file's length before [`plan_split`] grew it, and the length it
    /// grew it to, if it did.
    pub original_len: u64,
    /// See `original_len`.
    pub grown_to: Option<u64>,
}

/// Room a clone of `virtual_size` may need to grow into during a split:
/// every cluster, plus tables.
pub fn split_room(virtual_size: u64) -> u64 {
    virtual_size + virtual_size / 64 + (64 << 20)
}

/// Checks the clone and its chain, and gives the clone file room to grow
/// into (sparse); the kernel's device is the file's length.
pub fn plan_split(image: &Path) -> Result<SplitJob, String> {
    check_writable(image).map_err(|e| format!("{}: {e}; the split writes it", image.display()))?;
    crate::image_lock::check_not_in_use(image, "splitting it")?;
    let chain = chain_of(image)?;
    if chain.is_empty() {
        return Err(format!(
            "{} has no backing file: nothing to split",
            image.display()
        ));
    }
    let mut dev = FileDisk::open(image, false).map_err(|e| format!("{}: {e}", image.display()))?;
    let h = read_header(&dev).map_err(|e| format!("{}: {e}", image.display()))?;
    if h.nb_snapshots > 0 {
        // Their clusters are shared (refcounts above one), and the split
        // writes only clusters it owns alone: refused before anything
        // (the leak count below does not know snapshots either).
        return Err(format!(
            "{} holds {} internal snapshot(s); the split does not keep them: \
             delete them (qemu-img snapshot -d) or split a copy without them \
             (qemu-img convert -O qcow2 -B ...); nothing was changed",
            image.display(),
            h.nb_snapshots
        ));
    }
    let mut report = check(&dev).map_err(|e| e.to_string())?;
    if !report.corruptions.is_empty() {
        return Err(format!(
            "{}: {}",
            image.display(),
            report.corruptions.join("; ")
        ));
    }
    if report.leaks > 0 {
        // What an interrupted split counted and never published: QEMU's
        // own repair frees it before the split resumes.
        eprintln!(
            "clone-split: {} leaked cluster(s) in {} (an interrupted split); qemu-img check -r leaks",
            report.leaks,
            image.display()
        );
        drop(dev);
        crate::bench::run_tool(
            std::process::Command::new("qemu-img")
                .args(["check", "-q", "-r", "leaks"])
                .arg(image),
        )?;
        dev = FileDisk::open(image, false).map_err(|e| format!("{}: {e}", image.display()))?;
        report = check(&dev).map_err(|e| e.to_string())?;
    }
    let original_len = dev.len();
    let want = report.end + split_room(h.virtual_size);
    let grown_to = (dev.len() < want).then_some(want);
    if grown_to.is_some() {
        let f = OpenOptions::new()
            .write(true)
            .open(image)
            .map_err(|e| format!("{}: {e}", image.display()))?;
        f.set_len(want)
            .map_err(|e| format!("{}: {e}", image.display()))?;
    }
    let disks = attach(image)?;
    Ok(SplitJob {
        image: image.to_path_buf(),
        chain,
        disks,
        original_len,
        grown_to,
    })
}

/// After the kernel: checks the clone (no corruption, whatever happened)
/// and cuts the file to its last cluster in use. Returns the `clone.split`
/// record's workload requests when the split completed.
pub fn finish_split(job: &SplitJob, records: &[Record<'_>]) -> Result<Option<u64>, String> {
    let dev = FileDisk::open(&job.image, false).map_err(|e| e.to_string())?;
    let report = check(&dev).map_err(|e| e.to_string())?;
    drop(dev);
    if !report.corruptions.is_empty() {
        return Err(format!(
            "{} is corrupt: {}",
            job.image.display(),
            report.corruptions.join("; ")
        ));
    }
    let f = OpenOptions::new()
        .write(true)
        .open(&job.image)
        .map_err(|e| format!("{}: {e}", job.image.display()))?;
    f.set_len(report.end)
        .map_err(|e| format!("{}: {e}", job.image.display()))?;
    Ok(records
        .iter()
        .rfind(|r| r.event == "clone.split")
        .and_then(|r| r.u64("workload_ops")))
}

/// When the kernel never ran (QEMU did not start): gives the clone back
/// the length it had, if nobody else wrote the room [`plan_split`] gave
/// it: its length is still the one the plan set, no process holds QEMU's
/// lock on it now, and the room is all hole (a process that opened the
/// image between the plan's check and QEMU's start may have put clusters
/// there; the room is harmless to the image, cutting it is not).
/// Returns whether the file is as it was.
pub fn undo_plan(job: &SplitJob) -> Result<bool, String> {
    let Some(grown_to) = job.grown_to else {
        return Ok(true);
    };
    let f = OpenOptions::new()
        .write(true)
        .open(&job.image)
        .map_err(|e| format!("{}: {e}", job.image.display()))?;
    let len = f
        .metadata()
        .map_err(|e| format!("{}: {e}", job.image.display()))?
        .len();
    let untouched = len == grown_to
        && matches!(crate::image_lock::held_lock(&job.image), Ok(None))
        && !crate::image_lock::holds_data_from(&f, job.original_len);
    if untouched {
        f.set_len(job.original_len)
            .map_err(|e| format!("{}: {e}", job.image.display()))?;
    }
    Ok(untouched)
}

/// Applies the first `ops` requests of the workload of `seed` to the raw
/// image at `raw` (the clone's content before them): what the clone must
/// read after the run.
pub fn replay_workload(raw: &Path, seed: u64, ops: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)
        .map_err(|e| format!("{}: {e}", raw.display()))?;
    let sectors = f.metadata().map_err(|e| e.to_string())?.len() / 512;
    let mut buf = vec![0u8; (workload::MAX_SECTORS * 512) as usize];
    for k in 0..ops {
        let r = workload::request(seed, k, sectors);
        if r.write {
            let b = &mut buf[..(r.sectors * 512) as usize];
            workload::fill(seed, k, &r, b);
            f.write_all_at(b, r.sector * 512)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_as_qemu_resolves_them() {
        assert_eq!(
            relative(Path::new("/a/b"), Path::new("/a/b/c.img")),
            PathBuf::from("c.img")
        );
        assert_eq!(
            relative(Path::new("/a/b"), Path::new("/a/x/c.img")),
            PathBuf::from("../x/c.img")
        );
        assert_eq!(
            resolve_name(Path::new("/a/b/clone.qcow2"), "../x/c.img"),
            PathBuf::from("/a/b/../x/c.img")
        );
        assert_eq!(
            resolve_name(Path::new("/a/b/clone.qcow2"), "/abs.img"),
            PathBuf::from("/abs.img")
        );
    }

    /// QEMU resolves a relative backing name next to the path it opened,
    /// a symbolic link's, not its target's.
    #[test]
    fn a_backing_name_is_resolved_beside_a_link_as_qemu_does() {
        let dir = crate::scratch_dir("chain-link");
        let (img, s) = (dir.join("img"), dir.join("s"));
        std::fs::create_dir_all(&img).unwrap();
        std::fs::create_dir_all(&s).unwrap();
        for base in [img.join("ch1.img"), s.join("ch1.img")] {
            std::fs::write(&base, vec![5u8; 1 << 20]).unwrap();
        }
        crate::bench::run_tool(
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "ch1.img"])
                .arg(img.join("ch2.qcow2")),
        )
        .unwrap();
        std::os::unix::fs::symlink(img.join("ch2.qcow2"), s.join("link.qcow2")).unwrap();
        let chain = chain_of(&s.join("link.qcow2")).unwrap();
        assert_eq!(chain, [s.join("ch1.img").canonicalize().unwrap()]);
        let chain = chain_of(&img.join("ch2.qcow2")).unwrap();
        assert_eq!(chain, [img.join("ch1.img").canonicalize().unwrap()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_read_only_clone_is_refused_and_left_as_it_was() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("clone-ro-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (base, clone) = (dir.join("base.img"), dir.join("clone.qcow2"));
        std::fs::write(&base, vec![5u8; 1 << 20]).unwrap();
        crate::bench::run_tool(
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&base)
                .arg(&clone),
        )
        .unwrap();
        std::fs::set_permissions(&clone, std::fs::Permissions::from_mode(0o444)).unwrap();
        let before = std::fs::read(&clone).unwrap();
        let e = plan_split(&clone).unwrap_err();
        assert!(e.contains("read-only"), "{e}");
        assert_eq!(std::fs::read(&clone).unwrap(), before, "the clone changed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
