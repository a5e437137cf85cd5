use crate::trace::Hex;

/// Emits more records than the buffer holds; the host-side test counts the
/// lines on serial and checks every sequence number arrived, in order.
pub fn burst_is_flushed_without_loss() {
    for n in 0..10_000u64 {
        crate::trace!("test.burst", n = n, addr = Hex(n * 4096));
    }
    crate::trace::flush();
}
