//! The runner tells the truth: failures, hangs and crashes of the kernel are
//! failures on the host, named and explained; the demo and the trace stream
//! work end to end.

use std::time::Duration;

use boot::qemu::Verdict;
use boot::report;
use kernel_tests::{boot, host_tool, run_kernel_test};

const MEM: u64 = 128 << 20;
const TIMEOUT: Duration = kernel_tests::HANG;

#[test]
fn a_panicking_kernel_test_fails_and_is_named() {
    let err = run_kernel_test("deliberate::panics", TIMEOUT).expect_err("a panicking test passed");
    assert!(
        err.starts_with("KTEST-FAIL deliberate::panics: panicked"),
        "{err}"
    );
    assert!(
        err.contains("deliberate failure"),
        "panic message missing: {err}"
    );
}

#[test]
fn a_panic_on_another_cpu_names_that_cpu_and_stops_the_machine() {
    let err =
        kernel_tests::run_kernel_test_on_cpus("deliberate::panics_on_another_cpu", &[], 2, TIMEOUT)
            .expect_err("a test panicking on CPU 1 passed");
    // The test says where it ran (its own reading) and the panic report
    // says where it panicked: both must be CPU 1.
    assert!(
        err.starts_with(
            "KTEST-FAIL deliberate::panics_on_another_cpu: panicked on CPU 1: \
             deliberate failure on CPU 1"
        ),
        "{err}"
    );
    assert!(err.contains("!!! PANIC on CPU 1"), "{err}");
}

#[test]
fn the_host_tool_ends_a_failed_test_with_its_reason() {
    let run = host_tool(&["test", "deliberate::panics", "--quiet"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let last = run.last_line();
    assert!(
        last.starts_with("test deliberate::panics failed: panicked"),
        "{}",
        run.stderr
    );
    assert!(last.contains("deliberate failure"), "{last}");
    let run = host_tool(&["nonsense"]);
    assert_eq!(run.code, Some(2), "bad usage");
    assert!(
        run.stderr.starts_with("error: unknown scenario nonsense"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_hung_kernel_test_is_killed_and_fails() {
    let err = run_kernel_test("deliberate::hangs", Duration::from_secs(3))
        .expect_err("a hung test passed");
    assert!(err.contains("timed out after 3.0 s"), "{err}");
}

#[test]
fn an_unknown_kernel_test_fails() {
    let err = run_kernel_test("no::such_test", TIMEOUT).expect_err("an unknown test passed");
    assert!(err.contains("no such kernel test"), "{err}");
}

fn crash(kind: &str) -> String {
    let outcome = boot(&format!("scenario=crash kind={kind}"), MEM, TIMEOUT);
    assert_eq!(
        outcome.verdict,
        Verdict::Failed,
        "crash {kind}:\n{}",
        outcome.tail(20)
    );
    outcome.serial
}

#[test]
fn an_unexpected_page_fault_prints_vector_error_code_rip_and_cr2() {
    let log = crash("pf");
    assert!(
        log.contains("CPU EXCEPTION #PF page fault on CPU 0: vector=14 error_code=0x0"),
        "{log}"
    );
    assert!(
        log.contains("cr2=0x00000000deadb000 (read access, page not present)"),
        "{log}"
    );
    assert!(log.contains("rip=0x"), "{log}");
}

#[test]
fn every_exception_kind_is_reported_and_fails_the_run() {
    for (kind, expected) in [
        ("ud", "#UD invalid opcode on CPU 0: vector=6"),
        ("de", "#DE divide error on CPU 0: vector=0"),
        ("gp", "#GP general protection fault on CPU 0: vector=13"),
        ("bp", "#BP breakpoint on CPU 0: vector=3"),
    ] {
        let log = crash(kind);
        assert!(log.contains(expected), "crash {kind}: {log}");
    }
}

#[test]
fn a_kernel_stack_overflow_hits_the_guard_and_is_reported() {
    let log = crash("overflow");
    assert!(log.contains("#PF page fault"), "{log}");
    assert!(log.contains("kernel stack overflow in stack slot"), "{log}");
    assert!(log.contains("thread: deep"), "{log}");
}

/// An output the run could not put in place is refused before the kernel
/// boots, not after the snapshot it would have held.
#[test]
fn a_core_file_in_a_missing_directory_is_refused_up_front() {
    let dir = kernel_tests::image_dir("memsnap-nodir");
    let out = dir.join("no-such-dir/snap.core");
    let run = host_tool(&["memsnap", "--out", out.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("no such directory"), "{}", run.stderr);
    assert!(!run.stderr.contains("booting"), "{}", run.stderr);
    assert!(!out.parent().unwrap().exists());
}

/// A snapshot cut short by the deadline exits 3 (timeout), as the README
/// says, not 1: the missing core file is the timeout's doing. The core
/// file is not made.
#[test]
fn a_snapshot_cut_short_by_the_deadline_exits_as_a_timeout() {
    let dir = kernel_tests::image_dir("memsnap-deadline");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("snap.core");
    let _ = std::fs::remove_file(&out);
    let run = host_tool(&[
        "memsnap",
        "--out",
        out.to_str().unwrap(),
        "--timeout",
        "0.5",
    ]);
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert!(!out.exists());
}

#[test]
fn a_bad_command_line_value_is_refused_by_name() {
    for (cmdline, message) in [
        ("scenario=demo quantum_ms=banana", "quantum_ms=\"banana\""),
        ("scenario=nonsense", "unknown scenario \"nonsense\""),
        (
            "scenario=demo memsnap_cpus=xyz",
            "memsnap_cpus=xyz: expected all or boot",
        ),
        ("scenario=bench-memsnap verify=maybe", "verify=\"maybe\""),
    ] {
        let outcome = boot(cmdline, MEM, TIMEOUT);
        assert_eq!(outcome.verdict, Verdict::Failed, "{cmdline}");
        assert!(
            outcome.serial.contains(message),
            "{cmdline}: {}",
            outcome.serial
        );
    }
}

#[test]
fn the_demo_shows_the_memory_map_and_traces_and_exits_cleanly() {
    let outcome = boot("scenario=demo", 256 << 20, TIMEOUT);
    assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(30));
    assert!(outcome.serial.contains("memory map"), "{}", outcome.serial);
    let records = report::records(&outcome.serial).expect("well-formed trace");
    let memory = records
        .iter()
        .find(|r| r.event == "demo.memory")
        .expect("demo.memory record");
    let usable = memory.u64("usable").expect("usable field");
    // --mem 256M: nearly all of it is usable RAM, and no more than that.
    assert!((240 << 20..=256 << 20).contains(&usable), "usable {usable}");
    let steps: Vec<_> = records.iter().filter(|r| r.event == "demo.step").collect();
    assert_eq!(steps.len(), 16, "two threads x 8 steps");
    // Interleaved: the two threads' steps alternate rather than run in blocks.
    let changes = steps
        .windows(2)
        .filter(|w| w[0].get("thread") != w[1].get("thread"))
        .count();
    assert!(
        changes >= 4,
        "threads did not interleave: {changes} changes"
    );
    assert!(
        steps.windows(2).all(|w| w[0].ts_ns <= w[1].ts_ns),
        "timestamps go backwards"
    );
}

#[test]
fn a_trace_burst_larger_than_the_buffer_arrives_complete_and_in_order() {
    let outcome =
        run_kernel_test("trace::burst_is_flushed_without_loss", TIMEOUT).expect("burst test");
    let records = report::records(&outcome.serial).expect("well-formed trace");
    let burst: Vec<u64> = records
        .iter()
        .filter(|r| r.event == "test.burst")
        .map(|r| r.u64("n").expect("n field"))
        .collect();
    assert_eq!(
        burst,
        (0..10_000).collect::<Vec<u64>>(),
        "records lost or reordered"
    );
    assert!(
        !records.iter().any(|r| r.event == "trace.dropped"),
        "records were dropped"
    );
}
