//! Guest RAM: allocation of the anonymous mappings and their registration
//! with KVM as memory slots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
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

/// Allocates anonymous guest RAM for the given `(start, size)` ranges.
///
/// Transparent huge pages (`MADV_HUGEPAGE`) were tried and dropped: on
/// the development hosts they made VMM start to first `KVM_RUN` vary from
/// 13 to 140 ms (synchronous compaction) instead of a steady 15-35 ms.
pub fn allocate(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemory, MemoryError> {
    GuestMemoryMmap::from_ranges(ranges).map_err(MemoryError::Allocate)
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
    use vm_memory::Bytes;

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

    #[test]
    fn touched_guest_memory_is_not_overhead() {
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
}
