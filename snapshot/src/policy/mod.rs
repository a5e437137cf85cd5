//! Pure decisions behind the kernel's mechanisms: which frame to allocate,
//! which thread runs next, what a page fault means.
//!
//! The kernel's handlers decode the hardware state and ask these functions;
//! nothing here may touch hardware or allocate on the fault path.

pub mod fault;
pub mod frames;
pub mod sched;
