//! What the memory layer tells whoever watches memory from above (the live
//! snapshot): a frame is about to be handed out again, a device was given
//! memory to write, a device gave it back.
//!
//! The watcher installs its [`Hooks`] once at boot, before memory is set up;
//! until then nothing watches and every call here does nothing. This keeps
//! `memory` below the code that watches it: `memory` never names its
//! watcher.
//!
//! Reading the hooks is one atomic load and an indirect call: no lock, no
//! allocation. [`before_reuse`] runs on every frame allocation, so the
//! watcher's hook must stay cheap and must never allocate frames itself.

use core::ops::Range;

use spin::Once;

/// The watcher's callbacks.
#[derive(Debug, Clone, Copy)]
pub struct Hooks {
    /// A frame (physical address) is about to be handed out for reuse; its
    /// old contents are lost once this returns.
    pub before_reuse: fn(phys: u64),
    /// A device may write this physical range until it is unregistered.
    pub dma_registered: fn(range: Range<u64>),
    /// A range given by `dma_registered` is no longer written by a device.
    pub dma_unregistered: fn(range: Range<u64>),
}

static HOOKS: Once<Hooks> = Once::new();

/// Installs the watcher. Call once, before `memory::init`; a second call
/// is a boot bug and panics.
pub fn install(hooks: Hooks) {
    let mut fresh = false;
    HOOKS.call_once(|| {
        fresh = true;
        hooks
    });
    assert!(fresh, "memory hooks installed twice");
}

/// Tells the watcher a frame is about to be reused.
pub(super) fn before_reuse(phys: u64) {
    if let Some(hooks) = HOOKS.get() {
        (hooks.before_reuse)(phys);
    }
}

/// Tells the watcher a device may now write `range`.
pub(super) fn dma_registered(range: Range<u64>) {
    if let Some(hooks) = HOOKS.get() {
        (hooks.dma_registered)(range);
    }
}

/// Tells the watcher a device no longer writes `range`.
pub(super) fn dma_unregistered(range: Range<u64>) {
    if let Some(hooks) = HOOKS.get() {
        (hooks.dma_unregistered)(range);
    }
}
