use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{ioapic, rtc, trap};

static RTC_IRQS: AtomicU64 = AtomicU64::new(0);

fn on_rtc(_vector: u8) {
    RTC_IRQS.fetch_add(1, Ordering::Relaxed);
    rtc::acknowledge();
}

/// A real device interrupt (the RTC's periodic IRQ 8) travels through the
/// IOAPIC, routed from the MADT, to a vector allocated at run time, at the
/// rate the device was set to; once masked, it stops.
pub fn ioapic_routes_the_rtc_interrupt() {
    let vector = trap::alloc_vector(on_rtc).expect("no free vector");
    let route = crate::acpi::madt().isa_route(8);
    ioapic::route(route.gsi, vector, route.trigger, route.polarity).expect("route IRQ 8");
    rtc::start_periodic(6); // 1024 Hz
    crate::thread::sleep_ns(100_000_000);
    rtc::stop_periodic();
    ioapic::mask(route.gsi).expect("mask");
    let count = RTC_IRQS.load(Ordering::Relaxed);
    crate::log!(
        "RTC: {count} interrupts in 100 ms on vector {vector:#x} (GSI {})",
        route.gsi
    );
    assert!(
        (20..=250).contains(&count),
        "{count} RTC interrupts in 100 ms at 1024 Hz"
    );
    crate::thread::sleep_ns(20_000_000);
    assert_eq!(
        RTC_IRQS.load(Ordering::Relaxed),
        count,
        "interrupts after masking"
    );
    trap::clear_vector(vector);
}
