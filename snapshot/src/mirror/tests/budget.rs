//! Sizing a run's transfers to the memory it has.

use super::*;
use crate::backup::tape::BLOCK;

const MIB: u64 = 1 << 20;

fn geo(volume_bytes: u64) -> Geometry {
    Geometry {
        block_bytes: 64 << 10,
        volume_bytes,
    }
}

#[test]
fn plenty_of_memory_gives_full_batches_and_windows() {
    let g = geo(64 * MIB);
    let b = Budget::fit(&g, 64 * MIB).unwrap();
    assert_eq!(b.batch, MAX_BATCH);
    // Three extents of 1 MiB and a header each fit in 4 MiB.
    assert_eq!(b.window_extents, 3);
}

#[test]
fn less_memory_shrinks_the_transfers_never_past_what_it_has() {
    let g = geo(64 * MIB);
    let least = Budget::least().peak_bytes(&g);
    let mut last = Budget::fit(&g, 64 * MIB).unwrap();
    let mut have = 16 * MIB;
    while have >= least {
        let b = Budget::fit(&g, have).unwrap();
        assert!(b.peak_bytes(&g) <= have, "{b:?} at {have}");
        assert!(b.batch <= last.batch && b.window_extents <= last.window_extents);
        assert!(b.batch >= 1 && b.window_extents >= 1);
        last = b;
        have -= 64 << 10;
    }
    assert_eq!(last, Budget::least());
    // The least is one extent's window, one block per batch, and the rest.
    assert!(least > BLOCK + MIB + 3 * (64 << 10));
}

/// A batch the heap cannot hold is refused before anything runs, with
/// the figure: not an abort halfway through the run.
#[test]
fn a_run_the_memory_cannot_hold_is_refused_with_the_figure() {
    let g = geo(64 * MIB);
    let least = Budget::least().peak_bytes(&g);
    let e = Budget::fit(&g, least - 1).unwrap_err();
    assert_eq!(
        e,
        Error::Refused(Refusal::TooLittleMemory {
            need: least,
            have: least - 1
        })
    );
    assert!(e.to_string().contains("--mem"), "{e}");
    // A larger volume needs more: its bitmaps and per-block hashes.
    let big = geo(64 << 30);
    assert!(Budget::least().peak_bytes(&big) > least + 8 * MIB);
}
