//! Host side of `mirror`: checks the pair before booting (the same file
//! twice, a secondary smaller than the primary, a primary the host may not
//! write), creates the controller disk beside the secondary on first use
//! (`S.img.mirror`, kept: it is the pair's durable state, and a later run
//! resumes from it, if [`crate::pair_record`] vouches that the files are
//! the pair it holds) and the tape at the stream's length, written beside its
//! path and put in place only when the backup completed (a failed run
//! leaves the path as it was). A pair whose smallest transfers a
//! guest of `--mem` could not hold is refused with the figure and the
//! `--mem` that would do.

use std::path::{Path, PathBuf};

use snapshot::backup::guest_heap_bytes;
use snapshot::backup::volume::VolumeStream;
use snapshot::interface::trace::Record;
use snapshot::mirror::{Budget, Geometry, Options};

use crate::filedisk::{check_writable, same_file};
use crate::pair_record;
use crate::qemu::Disk;

/// A mirror run about to start.
#[derive(Debug)]
pub struct MirrorJob {
    /// Primary, secondary, controller disk, tape.
    pub disks: Vec<Disk>,
    /// The tape file the user named.
    pub tape: PathBuf,
    /// Where the guest writes it until it is complete.
    pub staged: crate::staged::Staged,
    /// The stream's length.
    pub medium_bytes: u64,
    /// The controller disk.
    pub control: PathBuf,
    /// The two volumes, as named.
    pub volumes: [PathBuf; 2],
}

fn len(path: &Path, what: &str) -> Result<u64, String> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// Refuses a qcow2 image as a volume: the mirror takes raw volumes, and
/// would otherwise pair the image file's own bytes (or refuse it for a
/// length that is not whole sectors, which says nothing of why), or
/// overwrite a qcow2 secondary's tables with the primary's blocks.
fn refuse_qcow2(path: &Path, what: &str) -> Result<(), String> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    if read.is_ok() && u32::from_be_bytes(magic) == snapshot::backup::qcow2::MAGIC {
        return Err(format!(
            "{what} {}: a qcow2 image; the mirror's volumes are raw \
             (qemu-img convert -O raw gives one)",
            path.display()
        ));
    }
    Ok(())
}

/// The controller disk kept beside `secondary`.
pub fn control_path(secondary: &Path) -> PathBuf {
    let mut name = secondary.as_os_str().to_owned();
    name.push(".mirror");
    PathBuf::from(name)
}

/// Heap the kernel keeps for the mirror's two disks beyond the two that
/// [`snapshot::backup::KERNEL_HEAP_USE`] was measured with (their queues
/// and request lists): without it the host advised a `--mem` 1 MiB short.
const MORE_DISKS_HEAP: u64 = 512 << 10;

/// Bytes of kernel heap a guest of `mem` bytes has for a mirror run.
fn mirror_memory(mem: u64) -> u64 {
    crate::backup::job_memory(mem).saturating_sub(MORE_DISKS_HEAP)
}

/// Refuses a pair of `geo` whose smallest transfers ([`Budget::least`])
/// a guest of `mem` bytes could not hold, naming the `--mem` that would.
pub fn enough_memory(geo: &Geometry, mem: u64) -> Result<(), String> {
    let have = mirror_memory(mem);
    let need = Budget::least().peak_bytes(geo);
    if need <= have {
        return Ok(());
    }
    // The heap is a sixteenth of the guest's memory, at most 64 MiB.
    let mib = (1..=1 << 20).find(|&mib| mirror_memory(mib << 20) >= need);
    let advice = match mib {
        Some(mib) if mirror_memory(mib << 20) > mirror_memory(mem) => {
            format!("run it with --mem {mib}M or more")
        }
        _ => "no --mem gives the kernel that much heap".to_string(),
    };
    Err(format!(
        "the mirror of a {}-byte volume needs {need} bytes ({} MiB) of kernel heap at least; \
         a guest of --mem {}M gives it {have} ({} MiB): {advice}",
        geo.volume_bytes,
        need.div_ceil(1 << 20),
        mem >> 20,
        have >> 20
    ))
}

/// Checks the pair (against a guest of `mem` bytes, too) and prepares the
/// controller disk and the tape.
pub fn plan(primary: &Path, secondary: &Path, tape: &Path, mem: u64) -> Result<MirrorJob, String> {
    if same_file(primary, secondary) {
        return Err(format!(
            "--primary and --secondary are the same file ({}); a mirror needs two",
            primary.display()
        ));
    }
    let control = control_path(secondary);
    if same_file(primary, &control) {
        return Err(format!(
            "--primary {} is the secondary's controller disk",
            primary.display()
        ));
    }
    let record = pair_record::record_path(&control);
    for (other, what) in [
        (primary, "the --primary image"),
        (secondary, "the --secondary image"),
        (control.as_path(), "the pair's controller disk"),
        (record.as_path(), "the pair's record"),
    ] {
        if same_file(tape, other) || tape == other {
            return Err(format!("--tape names {what}; it would be overwritten"));
        }
    }
    for (path, what) in [(primary, "--primary"), (secondary, "--secondary")] {
        check_writable(path)
            .map_err(|e| format!("{what} {}: {e}; the mirror writes it", path.display()))?;
        refuse_qcow2(path, what)?;
    }
    let (p, s) = (len(primary, "--primary")?, len(secondary, "--secondary")?);
    if p == 0 {
        return Err(format!(
            "--primary {} is empty: there is nothing to mirror",
            primary.display()
        ));
    }
    if p % 512 != 0 {
        return Err(format!(
            "--primary {}: {p} bytes, not a whole number of 512-byte sectors",
            primary.display()
        ));
    }
    if s < p {
        return Err(format!(
            "the secondary ({s} bytes) is smaller than the primary ({p} bytes)"
        ));
    }
    let geo = Geometry {
        block_bytes: Options::default().block_bytes,
        volume_bytes: p,
    };
    enough_memory(&geo, mem)?;
    let staged = crate::staged::Staged::new(tape)?;
    if control.exists() {
        pair_record::check(&control, primary, secondary)?;
    } else {
        crate::bench::make_blank_image(&control, geo.control_bytes())
            .map_err(|e| format!("{}: {e}", control.display()))?;
    }
    pair_record::begin(&control, primary, secondary)?;
    let medium_bytes = VolumeStream::medium_bytes(p, geo.block_bits());
    crate::bench::make_blank_image(&staged.partial, medium_bytes)
        .map_err(|e| format!("{}: {e}", tape.display()))?;
    Ok(MirrorJob {
        disks: vec![
            Disk {
                direct: true,
                ..Disk::new(primary, "primary")
            },
            Disk {
                direct: true,
                ..Disk::new(secondary, "secondary")
            },
            Disk::new(&control, "control"),
            Disk::new(&staged.partial, "tape"),
        ],
        tape: tape.to_path_buf(),
        staged,
        medium_bytes,
        control,
        volumes: [primary.to_path_buf(), secondary.to_path_buf()],
    })
}

/// After the kernel ran: the tape holds a whole stream and is put in place,
/// or its staging file is removed.
pub fn finish(job: &MirrorJob, records: &[Record<'_>], passed: bool) -> Result<u64, String> {
    // QEMU has exited: the files are as the pair leaves them.
    let [p, s] = &job.volumes;
    if let Err(e) = pair_record::end(&job.control, p, s) {
        eprintln!("warning: {e} (the next run trusts the controller disk alone)");
    }
    let done = records.iter().rfind(|r| r.event == "mirror.done");
    let result = match (passed, done.and_then(|r| r.u64("medium_bytes"))) {
        (true, Some(n)) if n == job.medium_bytes => Ok(n),
        (true, Some(n)) => Err(format!(
            "the kernel wrote a {n}-byte stream, the host expected {}",
            job.medium_bytes
        )),
        _ => Err(format!(
            "the mirror run did not complete; {} is as it was (the pair's state stays in {})",
            job.tape.display(),
            job.control.display()
        )),
    };
    job.staged.finish(result)
}

/// `bench-mirror`'s pair by default, scaled to run in minutes under TCG
/// (`--volume` sets it; the scale is 4 GiB).
pub const BENCH_VOLUME: u64 = 256 << 20;
/// The two pairs whose split acknowledgement is timed.
pub const BENCH_ACK_VOLUMES: [(&str, u64); 2] = [("small-", 1 << 30), ("big-", 64 << 30)];
/// `--volume`'s bounds and step: a quarter of the pair (the differential
/// and the copy's baseline span) must be whole 4 MiB windows.
const BENCH_VOLUME_MIN: u64 = 64 << 20;
const BENCH_VOLUME_MAX: u64 = 64 << 30;
const BENCH_VOLUME_STEP: u64 = 16 << 20;
/// The bench's kernel heap apart from what grows with the pair: the
/// copier's batch and the baseline's window (4 MiB each), the backup's
/// windows, the acknowledgement pairs' bitmaps (64 GiB: 256 KiB), with
/// room to spare (`heap_peak_bytes` in the JSON shows the real figure).
const BENCH_HEAP_FIXED: u64 = 16 << 20;

/// Kernel heap `bench-mirror` needs for a pair of `volume` bytes: the
/// fixed part plus what grows with the volume, the verify reference (8
/// bytes a block) and the pair's bitmaps (two bits a block, rounded up).
pub fn bench_heap_bytes(volume: u64) -> u64 {
    let blocks = volume.div_ceil(Options::default().block_bytes);
    BENCH_HEAP_FIXED + blocks * 8 + blocks.div_ceil(4)
}

/// Checks `--volume`: within bounds, whole steps.
pub fn check_bench_volume(volume: u64) -> Result<(), String> {
    if !(BENCH_VOLUME_MIN..=BENCH_VOLUME_MAX).contains(&volume)
        || !volume.is_multiple_of(BENCH_VOLUME_STEP)
    {
        return Err(format!(
            "want {} MiB to {} GiB in steps of {} MiB",
            BENCH_VOLUME_MIN >> 20,
            BENCH_VOLUME_MAX >> 30,
            BENCH_VOLUME_STEP >> 20
        ));
    }
    Ok(())
}

/// The guest RAM `bench-mirror` runs a `volume`-byte pair with: `mem` if
/// its heap holds [`bench_heap_bytes`], else, when `mem` was not asked
/// for (`given` false), the least RAM whose heap does; else a refusal
/// with the figures.
pub fn bench_mem_bytes(volume: u64, mem: u64, given: bool) -> Result<u64, String> {
    let need = bench_heap_bytes(volume);
    if guest_heap_bytes(mem) >= need {
        return Ok(mem);
    }
    // The heap is a sixteenth of the RAM up to 64 MiB, reached at 1 GiB.
    let raised = (mem..=1 << 30)
        .step_by(64 << 20)
        .find(|&m| guest_heap_bytes(m) >= need);
    match raised {
        Some(m) if !given => Ok(m),
        _ => Err(format!(
            "a {} MiB pair needs {} MiB of kernel heap; --mem {} MiB gives {} MiB{}",
            volume >> 20,
            need >> 20,
            mem >> 20,
            guest_heap_bytes(mem) >> 20,
            raised.map_or(String::new(), |m| format!(" (--mem {}M would do)", m >> 20))
        )),
    }
}

/// The QEMU deadline for a `volume`-byte pair when none was asked for:
/// the default's 600 s, plus a minute per 256 MiB above the default
/// pair (one default boot takes about 45 s on a loaded machine).
pub fn bench_timeout_secs(volume: u64) -> u64 {
    600 + 60 * volume.saturating_sub(BENCH_VOLUME).div_ceil(BENCH_VOLUME)
}

/// Makes `bench-mirror`'s blank sparse images in `dir` for a pair of
/// `volume` bytes (the volumes start equal: all zeros) and returns its
/// disks.
pub fn prepare_bench(dir: &Path, volume: u64) -> Result<Vec<Disk>, String> {
    let mut disks = Vec::new();
    let pairs = [("", volume)].into_iter().chain(BENCH_ACK_VOLUMES);
    for (prefix, bytes) in pairs {
        let geo = Geometry {
            block_bytes: Options::default().block_bytes,
            volume_bytes: bytes,
        };
        for (what, size) in [
            ("primary", bytes),
            ("secondary", bytes),
            ("control", geo.control_bytes()),
        ] {
            let name = format!("{prefix}{what}");
            let path = dir.join(format!("{name}.img"));
            crate::bench::make_blank_image(&path, size)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            // The volumes past the host's page cache, as the
            // controller's disks are; see docs/design/mirror.md.
            disks.push(Disk {
                direct: what != "control",
                ..Disk::new(path, &name)
            });
        }
    }
    let geo_bits = Geometry {
        block_bytes: Options::default().block_bytes,
        volume_bytes: volume,
    }
    .block_bits();
    let tape = dir.join("tape.img");
    crate::bench::make_blank_image(&tape, VolumeStream::medium_bytes(volume, geo_bits))
        .map_err(|e| format!("{}: {e}", tape.display()))?;
    disks.push(Disk::new(tape, "tape"));
    Ok(disks)
}

/// A progress line for a `mirror.progress` record, if it is one.
pub fn progress_line(record: &Record<'_>) -> Option<String> {
    if record.event != "mirror.progress" {
        return None;
    }
    let stage = format!("{}", record.get("stage")?);
    let (done, total) = (record.u64("done")?, record.u64("total")?);
    let pct = (done * 100).checked_div(total).unwrap_or(100);
    let what = match stage.as_str() {
        "pair" => "bringing the secondary in sync (blocks)",
        "copy" => "copying the split instant to the secondary (blocks)",
        _ => "backing up the split instant (MiB)",
    };
    let (d, t) = if stage != "backup" {
        (done, total)
    } else {
        (done >> 20, total >> 20)
    };
    Some(format!("{what}: {pct:>3}% ({d} of {t})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = crate::scratch_dir(&format!("mirror-plan-{name}"));
        for f in ["p.img", "s.img"] {
            std::fs::write(dir.join(f), vec![0u8; 1 << 20]).unwrap();
        }
        dir
    }

    /// The refusal leaves nothing behind: no controller disk, no tape.
    fn refused(dir: &Path, primary: &Path, secondary: &Path) -> String {
        let e = plan(primary, secondary, &dir.join("t.tape"), 512 << 20).unwrap_err();
        assert!(!control_path(secondary).exists(), "{e}");
        assert!(!dir.join("t.tape").exists(), "{e}");
        e
    }

    #[test]
    fn a_hard_link_to_the_primary_is_the_same_file() {
        let dir = scratch("hard");
        std::fs::hard_link(dir.join("p.img"), dir.join("twin.img")).unwrap();
        let e = refused(&dir, &dir.join("p.img"), &dir.join("twin.img"));
        assert!(e.contains("same file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_read_only_primary_is_refused_even_for_root() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("ro");
        let p = dir.join("p.img");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = refused(&dir, &p, &dir.join("s.img"));
        assert!(e.contains("--primary") && e.contains("read-only"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_qcow2_primary_is_refused_as_one() {
        let dir = scratch("qimg");
        let p = dir.join("p.img");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg("1M")
            .status();
        if !status.is_ok_and(|s| s.success()) {
            // Without qemu-img, the header qemu-img would write begins so.
            let mut bytes = vec![0u8; 1 << 20];
            bytes[..4].copy_from_slice(&snapshot::backup::qcow2::MAGIC.to_be_bytes());
            std::fs::write(&p, bytes).unwrap();
        }
        let e = refused(&dir, &p, &dir.join("s.img"));
        assert!(
            e.contains("--primary") && e.contains("a qcow2 image"),
            "{e}"
        );
        // As a secondary it would have its tables overwritten.
        let q = dir.join("q.img");
        std::fs::rename(&p, &q).unwrap();
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let e = refused(&dir, &p, &q);
        assert!(
            e.contains("--secondary") && e.contains("a qcow2 image"),
            "{e}"
        );
        // A raw primary of the same length pairs.
        assert!(plan(&p, &dir.join("s.img"), &dir.join("t.tape"), 512 << 20).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The tape may not be the pair's state, nor lie in a directory that
    /// is not there (which the run would otherwise create, or fail in
    /// only at its end); nor may the primary be the controller disk.
    #[test]
    fn a_tape_on_the_controller_disk_or_nowhere_is_refused() {
        let dir = scratch("tape-control");
        let (p, s) = (dir.join("p.img"), dir.join("s.img"));
        let control = control_path(&s);
        let e = plan(&p, &s, &control, 512 << 20).unwrap_err();
        assert!(e.contains("controller disk"), "{e}");
        assert!(!control.exists(), "{e}");
        let e = plan(&p, &s, &dir.join("nodir/t.tape"), 512 << 20).unwrap_err();
        assert!(e.contains("no such directory"), "{e}");
        assert!(!dir.join("nodir").exists() && !control.exists(), "{e}");
        plan(&p, &s, &dir.join("t.tape"), 512 << 20).unwrap();
        assert!(control.exists());
        let e = plan(&p, &s, &control, 512 << 20).unwrap_err();
        assert!(e.contains("controller disk"), "{e}");
        let e = plan(&control, &s, &dir.join("t.tape"), 512 << 20).unwrap_err();
        assert!(e.contains("controller disk"), "{e}");
        let record = pair_record::record_path(&control);
        let before = std::fs::read(&record).unwrap();
        let e = plan(&p, &s, &record, 512 << 20).unwrap_err();
        assert!(e.contains("the pair's record"), "{e}");
        assert_eq!(std::fs::read(&record).unwrap(), before);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A controller disk given another primary (a new file at the same
    /// path) or a primary changed since its last run is refused, with
    /// what to do; the recorded files, untouched, pair again.
    #[test]
    fn a_controller_disk_refuses_files_it_does_not_pair() {
        let dir = scratch("other-pair");
        let (p, s, t) = (dir.join("p.img"), dir.join("s.img"), dir.join("t.tape"));
        let job = plan(&p, &s, &t, 512 << 20).unwrap();
        let [jp, js] = &job.volumes;
        pair_record::end(&job.control, jp, js).unwrap();
        plan(&p, &s, &t, 512 << 20).unwrap();
        pair_record::end(&job.control, jp, js).unwrap();
        std::fs::rename(&p, dir.join("p.old")).unwrap();
        std::fs::write(&p, vec![1u8; 1 << 20]).unwrap();
        let e = plan(&p, &s, &t, 512 << 20).unwrap_err();
        assert!(e.contains("another file") && e.contains("delete"), "{e}");
        std::fs::remove_file(job.control).unwrap();
        let job = plan(&p, &s, &t, 512 << 20).unwrap();
        pair_record::end(&job.control, &p, &s).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, vec![2u8; 1 << 20]).unwrap();
        let e = plan(&p, &s, &t, 512 << 20).unwrap_err();
        assert!(e.contains("changed since"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_is_named_as_one() {
        let dir = scratch("dir");
        std::fs::create_dir(dir.join("d")).unwrap();
        let e = refused(&dir, &dir.join("p.img"), &dir.join("d"));
        assert!(e.contains("--secondary") && e.contains("directory"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A pair whose smallest transfers the guest's heap cannot hold is
    /// refused before booting, with the figure and a `--mem` that does
    /// hold them; nothing is left behind.
    #[test]
    fn a_pair_too_big_for_the_memory_is_refused_with_the_mem_that_would_do() {
        let dir = scratch("mem");
        let (p, s) = (dir.join("big-p.img"), dir.join("big-s.img"));
        for f in [&p, &s] {
            crate::bench::make_blank_image(f, 64 << 30).unwrap();
        }
        let tape = dir.join("t.tape");
        let e = plan(&p, &s, &tape, 64 << 20).unwrap_err();
        assert!(!control_path(&s).exists() && !tape.exists(), "{e}");
        assert!(e.contains("kernel heap") && e.contains("--mem 64M"), "{e}");
        let mib: u64 = e
            .split("run it with --mem ")
            .nth(1)
            .and_then(|rest| rest.split('M').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no --mem advice: {e}"));
        let geo = Geometry {
            block_bytes: Options::default().block_bytes,
            volume_bytes: 64 << 30,
        };
        assert!(enough_memory(&geo, (mib - 1) << 20).is_err());
        assert!(enough_memory(&geo, mib << 20).is_ok());
        // Small pairs fit the kernel tests' default memory.
        let small = Geometry {
            volume_bytes: 64 << 20,
            ..geo
        };
        assert!(enough_memory(&small, 128 << 20).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
