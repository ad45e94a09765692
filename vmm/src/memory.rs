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
