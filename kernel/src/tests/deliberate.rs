//! Tests that fail on purpose, so the runner's verdicts can be seen to be
//! true: a panic (on the boot CPU, and on the last CPU), a hang, an
//! unexpected page fault.

pub fn panics() {
    let answer = core::hint::black_box(41);
    assert_eq!(
        answer, 42,
        "deliberate failure: the runner must report this test as failed"
    );
}

pub fn hangs() {
    loop {
        crate::thread::sleep_ns(1_000_000_000);
    }
}

pub fn page_faults() {
    crate::arch::cpu::crash(crate::arch::cpu::Crash::PageFault(0xdead_b000));
}

/// Panics on the highest-numbered CPU (the boot CPU if there is one): the
/// report must name that CPU.
pub fn panics_on_another_cpu() {
    let last = (0..crate::arch::percpu::MAX_CPUS)
        .rev()
        .find(|&c| crate::arch::percpu::is_online(c))
        .unwrap_or(0);
    let handle = crate::thread::spawn("doomed", move || {
        assert!(crate::thread::set_affinity(1 << last, false));
        let cpu = crate::thread::current_cpu();
        panic!("deliberate failure on CPU {cpu}: the runner must report it");
    });
    handle.join();
}
