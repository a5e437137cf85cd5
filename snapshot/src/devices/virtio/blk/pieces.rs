//! Cutting a buffer into the pieces the device takes: segments no longer
//! than `size_max`, at most `seg_max` of them and [`Limits::max_bytes`] a
//! request, whole sectors always; back-to-back segments share one
//! descriptor. Pure arithmetic on segment lists: it must never touch the
//! device or the queue.

use alloc::vec::Vec;

use super::Limits;
use crate::devices::block::SECTOR_SIZE;
use crate::devices::virtio::Segment;

/// Appends `part` to a request's `piece`, joining a segment that starts
/// where the previous one ends in memory into one descriptor while it stays
/// within `max_segment` bytes: gathered buffers that sit back to back (a
/// staging area's consecutive pages) then take one descriptor, not one per
/// buffer, and leave the queue room for more requests in flight.
pub fn append_merged(piece: &mut Vec<Segment>, part: &[Segment], max_segment: u32) {
    for seg in part {
        match piece.last_mut() {
            Some(last)
                if last.addr + u64::from(last.len) == seg.addr
                    && u64::from(last.len) + u64::from(seg.len) <= u64::from(max_segment) =>
            {
                last.len += seg.len;
            }
            _ => piece.push(*seg),
        }
    }
}

/// Cuts the next request from `segments` starting at `cursor` (segment
/// index, offset in it) within `limits`, into `out`. Returns its length in
/// bytes (whole sectors) and the cursor after it, or `None` if not even one
/// sector fits the limits.
pub fn next_piece(
    segments: &[Segment],
    cursor: (usize, u32),
    limits: &Limits,
    out: &mut Vec<Segment>,
) -> Option<(usize, (usize, u32))> {
    out.clear();
    let (mut i, mut off) = cursor;
    let mut total = 0usize;
    while i < segments.len() && out.len() < limits.max_segments && total < limits.max_bytes {
        let left = segments[i].len - off;
        let take = left
            .min(limits.max_segment)
            .min((limits.max_bytes - total).min(u32::MAX as usize) as u32);
        out.push(Segment {
            addr: segments[i].addr + u64::from(off),
            len: take,
        });
        total += take as usize;
        off += take;
        if off == segments[i].len {
            i += 1;
            off = 0;
        }
    }
    // Give back a partial sector at the end; it starts the next piece.
    let mut back = (total % SECTOR_SIZE) as u32;
    total -= back as usize;
    while back > 0 {
        let last = out.last_mut()?;
        let give = back.min(last.len);
        last.len -= give;
        back -= give;
        if last.len == 0 {
            out.pop();
        }
        if off == 0 {
            i -= 1;
            off = segments[i].len;
        }
        off -= give;
    }
    (total > 0).then_some((total, (i, off)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_to_back_segments_share_a_descriptor() {
        let mut piece = alloc::vec![seg(0x1000, 0x1000)];
        append_merged(
            &mut piece,
            &[seg(0x2000, 0x1000), seg(0x4000, 0x1000)],
            0x3000,
        );
        assert_eq!(piece, [seg(0x1000, 0x2000), seg(0x4000, 0x1000)]);
        append_merged(
            &mut piece,
            &[seg(0x5000, 0x1000), seg(0x6000, 0x1000)],
            0x3000,
        );
        assert_eq!(
            piece,
            [seg(0x1000, 0x2000), seg(0x4000, 0x3000)],
            "joined up to the segment limit"
        );
        append_merged(&mut piece, &[seg(0x7000, 0x200)], 0x3000);
        assert_eq!(piece.len(), 3, "never past the segment limit");
        let mut empty = alloc::vec![];
        append_merged(&mut empty, &[seg(0x9000, 0x200)], 0x200);
        assert_eq!(empty, [seg(0x9000, 0x200)]);
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr, len }
    }

    fn limits(max_segment: u32, max_segments: usize, max_bytes: usize) -> Limits {
        Limits {
            max_segment,
            max_segments,
            max_bytes,
        }
    }

    fn pieces(segments: &[Segment], l: &Limits) -> Option<Vec<Vec<Segment>>> {
        let mut cursor = (0, 0);
        let mut all = Vec::new();
        let mut out = Vec::new();
        while cursor.0 < segments.len() {
            let (bytes, after) = next_piece(segments, cursor, l, &mut out)?;
            assert_eq!(bytes, out.iter().map(|s| s.len as usize).sum::<usize>());
            assert_eq!(bytes % SECTOR_SIZE, 0);
            assert!(out.len() <= l.max_segments && bytes <= l.max_bytes);
            assert!(out.iter().all(|s| s.len <= l.max_segment && s.len > 0));
            all.push(out.clone());
            cursor = after;
        }
        Some(all)
    }

    #[test]
    fn a_segment_limit_inside_a_sector_cuts_back_to_the_sector() {
        // 300 + 700 + 300 + 748 bytes, two segments per request: the first
        // request is 300 + 212 (one sector); the second would be 488 + 300,
        // so it is cut back to 488 + 24; the third takes the rest.
        let segs = [
            seg(0x1000, 300),
            seg(0x5000, 700),
            seg(0x9000, 300),
            seg(0xd000, 748),
        ];
        let all = pieces(&segs, &limits(u32::MAX, 2, 1 << 20)).unwrap();
        assert_eq!(all[0], [seg(0x1000, 300), seg(0x5000, 212)]);
        assert_eq!(all[1], [seg(0x5000 + 212, 488), seg(0x9000, 24)]);
        assert_eq!(all[2], [seg(0x9000 + 24, 276), seg(0xd000, 748)]);
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn size_and_byte_limits_split_large_buffers() {
        let segs = [seg(0, 10 * 4096)];
        let all = pieces(&segs, &limits(4096, 4, 8192)).unwrap();
        assert_eq!(all.len(), 5);
        assert!(all.iter().all(|p| p.len() == 2));
    }

    #[test]
    fn too_fragmented_for_one_sector_is_none() {
        let segs = [seg(0, 100), seg(200, 100), seg(400, 312)];
        assert!(pieces(&segs, &limits(u32::MAX, 2, 4096)).is_none());
        assert!(pieces(&segs, &limits(u32::MAX, 3, 4096)).is_some());
    }
}
