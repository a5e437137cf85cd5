use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use crate::memory::frames::{self, OwnedFrame};
use crate::memory::{self as mem, heap, read_phys_u64, PAGE_SIZE};

/// Takes every free frame, checks none repeats and none lies outside RAM or
/// inside memory already in use, writes a tag into each through the physical
/// map and reads all tags back (two handed-out frames backed by the same
/// memory would overwrite each other's tag), then returns them all.
pub fn frame_allocator_never_hands_out_a_frame_twice() {
    let (free_before, managed) = frames::stats();
    assert!(
        free_before > 1000 && free_before <= managed,
        "free {free_before} of {managed}"
    );
    let ram: Vec<_> = crate::boot_info::usable_ram().collect();
    let kernel = mem::kernel_image();
    let mut taken: Vec<OwnedFrame> = Vec::with_capacity(free_before as usize);
    let mut seen = BTreeSet::new();
    while let Some(mut frame) = OwnedFrame::alloc() {
        let phys = frame.phys();
        assert!(seen.insert(phys), "frame {phys:#x} handed out twice");
        assert!(
            ram.iter()
                .any(|r| r.start <= phys && phys + PAGE_SIZE <= r.end),
            "{phys:#x} is not RAM"
        );
        assert!(phys >= 1 << 20, "{phys:#x} is in low memory");
        assert!(
            phys + PAGE_SIZE <= kernel.start || phys >= kernel.end,
            "{phys:#x} is in the kernel image"
        );
        let bytes = frame.bytes_mut();
        bytes[..8].copy_from_slice(&phys.to_le_bytes());
        bytes[4088..].copy_from_slice(&(!phys).to_le_bytes());
        taken.push(frame);
    }
    assert_eq!(
        taken.len() as u64,
        free_before,
        "allocator lost or invented frames"
    );
    assert_eq!(frames::stats().0, 0);
    for frame in &taken {
        let phys = frame.phys();
        assert_eq!(
            read_phys_u64(phys),
            phys,
            "tag of {phys:#x} overwritten: aliased frames"
        );
        assert_eq!(read_phys_u64(phys + 4088), !phys);
    }
    let one = taken.pop().expect("at least one frame");
    let phys = one.phys();
    drop(one);
    let frame =
        x86_64::structures::paging::PhysFrame::containing_address(x86_64::PhysAddr::new(phys));
    assert!(
        frames::free(frame).is_err(),
        "double free of {phys:#x} accepted"
    );
    drop(taken);
    assert_eq!(frames::stats().0, free_before, "frames not all returned");
}

/// Random allocations of mixed sizes and alignments, each filled with its own
/// pattern, freed in random order; every pattern must survive until its free,
/// every large block must start on a page (transfers from it stay on
/// QEMU's io_uring path), and the heap must end as it started.
pub fn heap_survives_allocation_stress() {
    let (used_before, size) = heap::stats();
    let mut rng = snapshot::support::rng::Rng::new(0x5eed_1234);
    let mut live: Vec<(Vec<u8>, u8)> = Vec::new();
    // Large blocks up to 1/64 of the heap; at most ~1/4 of it live on average.
    let large = (size / 64) as u64;
    for round in 0..30_000u32 {
        if live.len() < 300 && rng.below(3) != 0 {
            let len = match rng.below(10) {
                0 => rng.below(large) as usize + 1,
                1..=3 => rng.below(8192) as usize + 1,
                _ => rng.below(128) as usize + 1,
            };
            let tag = round as u8;
            let mut block: Vec<u8> = Vec::with_capacity(len);
            assert!(
                len < heap::PAGE_ALIGNED_FROM
                    || block.as_ptr().addr().is_multiple_of(PAGE_SIZE as usize),
                "a {len}-byte block at {:p} does not start on a page",
                block.as_ptr()
            );
            block.resize(len, tag);
            live.push((block, tag));
        } else if !live.is_empty() {
            let (block, tag) = live.swap_remove(rng.below(live.len() as u64) as usize);
            assert!(
                block.iter().all(|&b| b == tag),
                "heap block corrupted (tag {tag})"
            );
        }
    }
    for (block, tag) in live.drain(..) {
        assert!(
            block.iter().all(|&b| b == tag),
            "heap block corrupted (tag {tag})"
        );
    }
    drop(live);
    let (used_after, _) = heap::stats();
    assert_eq!(
        used_after, used_before,
        "heap leaked across the stress ({size} bytes total)"
    );
}

/// Every RAM region is readable through the physical map, first and last
/// word, above 4 GiB too.
pub fn physical_map_covers_all_ram() {
    let mut total = 0;
    for region in crate::boot_info::usable_ram() {
        let _ = read_phys_u64(region.start);
        let _ = read_phys_u64((region.end - 8) & !7);
        total += region.end - region.start;
    }
    assert!(total >= 16 << 20, "only {total} bytes of RAM");
    assert!(
        crate::memory::paging::physmap_end()
            >= crate::boot_info::usable_ram()
                .map(|r| r.end)
                .max()
                .unwrap_or(0)
    );
}
