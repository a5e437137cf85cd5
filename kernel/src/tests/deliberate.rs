//! Tests that fail on purpose, so the runner's verdicts can be seen to be
//! true: a panic, a hang, an unexpected page fault.

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
