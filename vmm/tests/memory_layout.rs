//! Guest RAM placement and the memory-overhead measurement. Both depend on
//! what the whole process maps meanwhile, so they run as one test in a
//! binary of their own: the unit tests of other modules, running in parallel
//! threads, would map memory between the reservation and the mapping (and
//! add to the RSS being measured).

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm::memory::{HUGE_PAGE_SIZE, allocate, overhead_rss_kib};

#[test]
fn guest_ram_is_huge_page_aligned_and_touching_it_is_not_overhead() {
    // The VMM's layouts start regions on 2 MiB boundaries (0 and 4 GiB). A
    // region starting off such a boundary is not reliably aligned yet (the
    // allocator then warns and goes on with 4 KiB pages): not tested here.
    let ranges = [
        (GuestAddress(0), 64 << 20),
        (GuestAddress(1 << 32), 6 << 20),
    ];
    let mem = allocate(&ranges).unwrap();
    for (region, (start, size)) in mem.iter().zip(ranges) {
        assert_eq!(region.start_addr(), start);
        assert_eq!(region.len(), size as u64);
        let host = region.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
        assert_eq!(
            host % HUGE_PAGE_SIZE,
            start.0 as usize % HUGE_PAGE_SIZE,
            "region at {:#x} mapped at {host:#x}",
            start.0
        );
    }
    // The memory is usable at both ends of each region.
    for (start, size) in ranges {
        mem.write_obj(0xabu8, start).unwrap();
        mem.write_obj(0xcdu8, start.unchecked_add(size as u64 - 1))
            .unwrap();
    }
    drop(mem);

    let mem = allocate(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let before = overhead_rss_kib(&mem).unwrap();
    mem.write_slice(&vec![1u8; 32 << 20], GuestAddress(0))
        .unwrap();
    let after = overhead_rss_kib(&mem).unwrap();
    // 32 MiB were touched in guest RAM; the overhead must not grow by it.
    assert!(
        after < before + 8 * 1024,
        "before {before} KiB, after {after} KiB"
    );
}
