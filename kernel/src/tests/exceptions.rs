use snapshot::policy::fault::PfCode;

use crate::memory::probe::{self, ScratchPage};

/// A read of an unmapped address faults with that address in CR2 and a
/// "not present, read" error code; a write to a read-only page faults with
/// "present, write" (CR0.WP is on: the live snapshot depends on it); both are
/// caught by the probe fixups and the kernel carries on.
pub fn page_fault_reports_address_and_cause() {
    let unmapped = 0xdead_b000;
    let fault = probe::read_u64(unmapped).expect_err("unmapped read did not fault");
    assert_eq!(fault.addr, unmapped, "CR2");
    assert!(
        !fault.code.contains(PfCode::PRESENT) && !fault.code.contains(PfCode::WRITE),
        "{fault:?}"
    );

    let page = ScratchPage::new().expect("scratch page");
    page.probe_write(8, 0x1234)
        .expect("writable page refused a write");
    assert_eq!(probe::read_u64(page.addr() + 8), Ok(0x1234));
    page.set_writable(false).expect("protect");
    let fault = page
        .probe_write(8, 0x5678)
        .expect_err("read-only page accepted a write");
    assert_eq!(fault.addr, page.addr() + 8, "CR2");
    assert!(
        fault.code.contains(PfCode::PRESENT | PfCode::WRITE),
        "{fault:?}"
    );
    assert_eq!(
        probe::read_u64(page.addr() + 8),
        Ok(0x1234),
        "the refused write landed"
    );
    page.set_writable(true).expect("unprotect");
    page.probe_write(8, 0x5678).expect("write after unprotect");
    assert_eq!(probe::read_u64(page.addr() + 8), Ok(0x5678));
}

/// The page-fault handler's read of the live tables, which decides whether
/// a write fault came through a stale TLB entry: a scratch page is
/// writable, then not once protected, then writable again; the heap
/// (through the physical map's large pages) is writable; an unmapped
/// address is not.
pub fn live_tables_say_which_pages_take_a_write() {
    use crate::memory::paging::allows_write_now;
    let page = ScratchPage::new().expect("scratch page");
    assert!(allows_write_now(page.addr() + 8), "fresh scratch page");
    page.set_writable(false).expect("protect");
    assert!(!allows_write_now(page.addr() + 8), "protected scratch page");
    page.set_writable(true).expect("unprotect");
    assert!(
        allows_write_now(page.addr() + 8),
        "unprotected scratch page"
    );
    let heap = alloc::boxed::Box::new(0u64);
    assert!(allows_write_now(&raw const *heap as u64), "the heap");
    assert!(!allows_write_now(0xdead_b000), "an unmapped address");
}
