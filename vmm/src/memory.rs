//! Guest RAM: allocation of the anonymous mappings and their registration
//! with KVM as memory slots.
//!
//! Huge-page alignment. KVM maps guest memory with 2 MiB pages in its
//! second-level page tables only when a slot's host address and guest
//! address are congruent modulo 2 MiB (and the host backs the memory with
//! transparent huge pages). A plain `mmap` of guest RAM lands wherever the
//! kernel finds room, usually not 2 MiB-aligned, and then every 4 KiB of
//! guest memory costs its own fault on first touch: in the nested test
//! harness that was ~42 us per page and 0.5 s of a 2.5 s boot. vm-memory
//! does the mapping (and owns it, unmapping on drop) but takes no address,
//! so the placement is steered: a `PROT_NONE` reservation one huge page
//! larger than the region is made, everything in it up to the aligned end
//! of the region is released again, and the upper rest stays reserved as a
//! guard while vm-memory maps. The kernel places new mappings top-down in
//! the highest gap that fits, which is exactly the released hole, ending
//! at the guard, so the region starts at the aligned address. The guard is
//! released afterwards. Should another thread's mapping take the hole
//! first, the result is checked and the allocation retried; a region that
//! stays unaligned still works, only slower.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::FromRangesError;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

/// The guest memory type used throughout the VMM.
pub type GuestMemory = GuestMemoryMmap;

/// Errors of guest memory setup.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Mapping the guest RAM failed.
    #[error("cannot allocate guest memory: {0}")]
    Allocate(vm_memory::mmap::FromRangesError),
    /// The host address of a region could not be obtained.
    #[error("cannot get the host address of guest region at {0:#x}")]
    HostAddress(u64),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot}: {source}")]
    SetMemorySlot {
        /// The KVM memory slot.
        slot: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
}

/// Size of a huge page, the alignment KVM needs to map guest RAM with them.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Stack size of the VMM's own threads (vCPUs, devices). Kept below
/// [`HUGE_PAGE_SIZE`]: with transparent huge pages on, a default 2 MiB
/// stack that happens to be 2 MiB-aligned (as one placed just below the
/// aligned guest RAM is) is backed by a whole huge page on first touch,
/// 2 MiB of RSS for a few KiB of stack. The threads keep their buffers on
/// the heap and need far less than this.
pub const THREAD_STACK_SIZE: usize = 1 << 20;

/// How often an allocation that came out unaligned is retried.
const PLACEMENT_ATTEMPTS: usize = 3;

/// Allocates anonymous guest RAM for the given `(start, size)` ranges,
/// each placed so that its host address is congruent to its guest address
/// modulo [`HUGE_PAGE_SIZE`] (see the module comment).
///
/// `MADV_HUGEPAGE` is deliberately not requested (the host's THP policy
/// applies): on the development hosts it made VMM start to first
/// `KVM_RUN` vary from 13 to 140 ms (synchronous compaction) instead of a
/// steady 15-35 ms.
pub fn allocate(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemory, MemoryError> {
    let regions = ranges
        .iter()
        .map(|&(start, size)| allocate_region(start, size))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| MemoryError::Allocate(FromRangesError::from(e)))
}

/// Maps one region of guest RAM, huge-page aligned when the host allows.
fn allocate_region(start: GuestAddress, size: usize) -> Result<GuestRegionMmap, MemoryError> {
    let wanted = start.0 as usize % HUGE_PAGE_SIZE;
    let mut attempt = 1;
    loop {
        let guard = PlacementGuard::reserve(start, size);
        let region =
            GuestRegionMmap::from_range(start, size, None).map_err(MemoryError::Allocate)?;
        drop(guard);
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| MemoryError::HostAddress(start.0))? as usize;
        if host % HUGE_PAGE_SIZE == wanted {
            return Ok(region);
        }
        if attempt == PLACEMENT_ATTEMPTS {
            log::warn!(
                "guest RAM at {:#x} is not 2 MiB-aligned on the host ({host:#x}): \
                 KVM will map it with 4 KiB pages only",
                start.0
            );
            return Ok(region);
        }
        attempt += 1;
    }
}

/// The upper end of a released reservation, kept mapped `PROT_NONE` so
/// that the next mapping of the region's size lands just below it, at an
/// address congruent to the region's guest address modulo 2 MiB.
struct PlacementGuard {
    address: *mut libc::c_void,
    len: usize,
}

impl PlacementGuard {
    /// Reserves and partly releases address space for a region of `size`
    /// bytes at guest address `start`. `None` (no steering, the allocation
    /// still proceeds) if the reservation fails.
    fn reserve(start: GuestAddress, size: usize) -> Option<Self> {
        let len = size.checked_add(HUGE_PAGE_SIZE)?;
        // SAFETY: a fresh anonymous PROT_NONE mapping at an address of the
        // kernel's choice; it aliases nothing and is checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let base_addr = base as usize;
        let wanted = start.0 as usize % HUGE_PAGE_SIZE;
        // First address at or above `base` congruent to the guest address.
        let aligned =
            base_addr + (wanted + HUGE_PAGE_SIZE - base_addr % HUGE_PAGE_SIZE) % HUGE_PAGE_SIZE;
        let released = aligned - base_addr + size;
        // SAFETY: `[base, base + released)` lies inside the reservation just
        // made (`released < len`), which nothing else uses.
        unsafe { libc::munmap(base, released) };
        Some(Self {
            // `released < len`, so the guard is the non-empty rest.
            address: (base_addr + released) as *mut libc::c_void,
            len: len - released,
        })
    }
}

impl Drop for PlacementGuard {
    fn drop(&mut self) {
        // SAFETY: the guard is the still-reserved tail of our own
        // PROT_NONE mapping; nothing was placed there (it was mapped).
        unsafe { libc::munmap(self.address, self.len) };
    }
}

/// Registers every region of `mem` with `vm` as one KVM memory slot each,
/// numbered from 0 in address order.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| MemoryError::HostAddress(region.start_addr().0))?;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live anonymous mapping of exactly
        // `memory_size` bytes owned by `mem`, not aliased by any other slot.
        // KVM reaches it through the process page tables (with MMU
        // notifiers), so if `mem` were dropped while the VM lives, guest
        // accesses would fail with EFAULT instead of touching other host
        // memory; callers keep `mem` alive as long as the vCPUs anyway.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::SetMemorySlot { slot, source })?;
    }
    Ok(())
}

/// Resident memory of this process that is not guest RAM, in KiB: the
/// VMM's own overhead. Reads `/proc/self/smaps` and leaves out the
/// mappings that back `mem`.
pub fn overhead_rss_kib(mem: &GuestMemory) -> std::io::Result<u64> {
    let guest_starts: Vec<u64> = mem
        .iter()
        .filter_map(|r| r.get_host_address(MemoryRegionAddress(0)).ok())
        .map(|p| p as u64)
        .collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    Ok(sum_rss_excluding(&smaps, &guest_starts))
}

/// Sums the `Rss:` lines of an smaps text, skipping mappings starting at
/// one of `excluded` addresses.
fn sum_rss_excluding(smaps: &str, excluded: &[u64]) -> u64 {
    let mut total = 0;
    let mut skip = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, _)) = first.split_once('-')
            && let Ok(start) = u64::from_str_radix(start, 16)
        {
            skip = excluded.contains(&start);
        } else if let Some(rest) = line.strip_prefix("Rss:")
            && !skip
        {
            total += rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_sum_skips_excluded_mappings() {
        let smaps = "00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/x\n\
                     Size:  100 kB\nRss:  40 kB\n\
                     7f0000000000-7f0008000000 rw-p 00000000 00:00 0\n\
                     Size:  131072 kB\nRss:  9000 kB\n\
                     7ffd0000-7ffd2000 rw-p 00000000 00:00 0 [stack]\nRss:  8 kB\n";
        assert_eq!(sum_rss_excluding(smaps, &[]), 9048);
        assert_eq!(sum_rss_excluding(smaps, &[0x7f00_0000_0000]), 48);
    }

    // The huge-page alignment and RSS tests live in tests/memory_layout.rs:
    // they need a process whose other threads do not map memory meanwhile.
}
