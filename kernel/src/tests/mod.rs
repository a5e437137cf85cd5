//! The in-kernel tests, run one per boot by the host runner (see
//! [`crate::ktest`]). Each checks behaviour against something independent of
//! the code under test: its own record of handed-out frames, patterns written
//! and read back through another mapping, the PIT, a device's interrupts.

mod blk;
mod clock;
mod deliberate;
mod exceptions;
mod interrupts;
mod memory;
mod memsnap;
mod memsnap_disk;
mod memsnap_smp;
mod sched;
mod smp;
mod trace;

use crate::ktest::Test;

/// Waits until `done()` holds, panicking with `what` after 10 s of guest
/// time. For "it makes progress" checks: a busy host may hold a CPU back for
/// far longer than a fixed short wait, while a real stall never ends.
pub(crate) fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    const GIVE_UP_NS: u64 = 10_000_000_000;
    let t0 = crate::clock::now_ns();
    while !done() {
        assert!(
            crate::clock::now_ns() - t0 < GIVE_UP_NS,
            "{what} (waited 10 s)"
        );
        crate::thread::sleep_ns(1_000_000);
    }
}

macro_rules! tests {
    ($($module:ident :: $name:ident $([$($disk:literal),*])?),* $(,)?) => {
        &[$(Test {
            name: concat!(stringify!($module), "::", stringify!($name)),
            run: $module::$name,
            deliberately_fails: false,
            disks: &[$($($disk),*)?],
        }),*]
    };
}

/// Every test that must pass.
const PASSING: &[Test] = tests![
    memory::frame_allocator_never_hands_out_a_frame_twice,
    memory::heap_survives_allocation_stress,
    memory::physical_map_covers_all_ram,
    exceptions::page_fault_reports_address_and_cause,
    exceptions::live_tables_say_which_pages_take_a_write,
    sched::spinning_thread_does_not_starve_another,
    sched::workload_and_background_interleave,
    sched::sleep_block_wake_and_join,
    sched::threads_are_reaped_and_slots_reused,
    smp::every_cpu_reports_in,
    smp::sleep_block_and_join_across_cpus,
    smp::lock_hammered_from_all_cpus,
    smp::permission_removal_reaches_every_cpu,
    smp::snapshot_with_writers_on_every_cpu,
    smp::copier_cpu_runs_nothing_else_while_it_copies,
    memsnap_smp::same_pages_written_on_every_cpu_across_the_pause,
    memsnap_smp::write_waits_for_the_copier_on_another_cpu,
    memsnap_smp::abort_under_writers_on_every_cpu_leaves_every_page_writable,
    memsnap_smp::restore_sees_writes_from_every_cpu,
    memsnap_smp::fault_handled_after_the_abort_is_retried,
    memsnap_smp::abort_checks_the_copy_a_fault_was_making,
    memsnap_smp::copier_shares_the_boot_cpu_while_the_others_are_held,
    clock::tsc_agrees_with_pit,
    clock::timer_ticks_at_its_rate,
    clock::paused_tick_stops_this_cpus_timer,
    interrupts::ioapic_routes_the_rtc_interrupt,
    trace::burst_is_flushed_without_loss,
    memsnap::live_snapshot_matches_reference_across_seeds,
    memsnap::abort_midway_and_start_again,
    memsnap::restore_rolls_back_only_dirtied_pages,
    memsnap::start_without_storage_fails_cleanly,
    memsnap::copy_map_outside_the_range,
    memsnap::dma_targets_are_copied_at_the_instant,
    memsnap::engine_never_faults_in_the_pause,
    blk::disks_are_found_by_serial["data0:64", "data1:16", "data2:8", "ro0:8:ro"],
    blk::device_errors_name_disk_and_sector["data0:16", "bad0:16:fail=800"],
    blk::patterns_round_trip_at_depths_and_sizes["data0:32"],
    blk::refusals_flush_and_read_only_contents["data0:16", "ro0:8:ro"],
    blk::two_disks_at_once["data0:32", "data1:32"],
    blk::a_small_write_and_flush_pass_a_long_batch["data0:32"],
    blk::writes_land_where_the_host_expects["data0:16"],
    blk::single_requests_are_timed_in_stages["data0:16"],
    blk::snapshot_stays_consistent_while_disk_reads_land["data0:32"],
    memsnap_disk::snapshot_to_disk_matches_reference["snap:272"],
    memsnap_disk::too_small_disk_is_refused_before_anything_starts["small:64"],
    memsnap_disk::io_error_midway_aborts_cleanly["bad:272:fail=204800"],
];

/// Tests that must fail: run only on request, to show a failure is caught.
const FAILING: &[Test] = &[
    Test {
        name: "deliberate::panics",
        run: deliberate::panics,
        deliberately_fails: true,
        disks: &[],
    },
    Test {
        name: "deliberate::hangs",
        run: deliberate::hangs,
        deliberately_fails: true,
        disks: &[],
    },
    Test {
        name: "deliberate::panics_on_another_cpu",
        run: deliberate::panics_on_another_cpu,
        deliberately_fails: true,
        disks: &[],
    },
    Test {
        name: "deliberate::page_faults",
        run: deliberate::page_faults,
        deliberately_fails: true,
        disks: &[],
    },
];

/// All tests, for `scenario=test`.
pub fn all() -> &'static [Test] {
    static ALL: spin::Once<alloc::vec::Vec<Test>> = spin::Once::new();
    ALL.call_once(|| {
        PASSING
            .iter()
            .chain(FAILING)
            .map(|t| Test {
                name: t.name,
                run: t.run,
                deliberately_fails: t.deliberately_fails,
                disks: t.disks,
            })
            .collect()
    })
}
