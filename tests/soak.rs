//! The live-snapshot soak from the host: twenty runs, each configured from
//! its seed and verified in the kernel against a stop-the-world reference,
//! copy counts kept page by page and the frame allocator's free count; and
//! failures injected on purpose, to show the soak reports them with the
//! seed that reproduces them and goes on with the next run.

use std::time::Duration;

use boot::soak::{self, Plan, Summary};
use snapshot::interface::scenario::Scenario;
use snapshot::memsnap::soak::run_seed;

fn plan(runs: u64, seed: u64, cpus: usize, cmdline: &[&str]) -> Plan {
    Plan {
        runs,
        seed,
        run_timeout: Duration::from_secs(120),
        cmdline: cmdline.iter().map(|w| w.to_string()).collect(),
        mem_bytes: Scenario::SoakMemsnap.describe().mem_mib << 20,
        cpus,
    }
}

fn soak(name: &str, plan: &Plan) -> Summary {
    let work = kernel_tests::image_dir(name);
    let summary = soak::run(&kernel_tests::kernel(), plan, &work, |_| {}, |_| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("{summary}");
    summary
}

/// Twenty runs (RAM and disk stores, copy map inside and outside, aborts
/// and restores, DMA) on two CPUs, with threads, faults and the copier on
/// both during the snapshot (the default), find no mismatched
/// page, no page copied twice or never, no disagreement between the
/// engine's counts and the pages', no leaked frame, no restore error and
/// no hang.
#[test]
fn twenty_runs_on_two_cpus_find_nothing_wrong() {
    let summary = soak("soak-twenty", &plan(20, 0x50a4, 2, &[]));
    for f in &summary.failures {
        eprintln!("{}", soak::failure_line(f, &plan(20, 0x50a4, 2, &[])));
    }
    assert!(summary.failures.is_empty(), "{summary}");
    assert_eq!((summary.runs, summary.passed, summary.boots), (20, 20, 1));
    assert!(summary.totals.pages > 20 * 4096, "{summary}");
}

/// A frame kept on purpose and a page a device writes behind the
/// snapshot's back are each caught in run 0, which is reported with its
/// own seed; the machine is rebooted and run 1 passes.
#[test]
fn injected_failures_are_reported_with_their_seed_and_the_soak_goes_on() {
    for (inject, leaked, mismatched) in [("leak", 1, 0), ("mismatch", 0, 1)] {
        let word = format!("soak_inject={inject}");
        let summary = soak(&format!("soak-{inject}"), &plan(2, 77, 1, &[&word]));
        assert_eq!(
            (summary.runs, summary.passed, summary.boots),
            (2, 1, 2),
            "{inject}"
        );
        assert_eq!(summary.totals.leaked_frames, leaked, "{inject}");
        assert_eq!(summary.totals.mismatched, mismatched, "{inject}");
        let [failure] = &summary.failures[..] else {
            panic!("{inject}: {:?}", summary.failures)
        };
        assert_eq!((failure.run, failure.seed), (0, run_seed(77, 0)));
        let line = soak::failure_line(failure, &plan(1, 77, 1, &[]));
        assert!(line.contains("--runs 1 --seed 0x4d --mem "), "{line}");
    }
}
