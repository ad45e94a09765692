//! Model-specific registers a Linux guest expects in a defined state at entry.
//!
//! KVM resets most MSRs to zero already; these are the ones a VMM sets
//! explicitly (as Firecracker and Cloud Hypervisor do) so that syscall entry
//! points, the TSC and the default memory type are well defined.

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;

/// `IA32_TSC`: the time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_SYSENTER_CS`.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `IA32_MISC_ENABLE`.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MISC_ENABLE` bit 0: fast-string operations enabled.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_MTRR_DEF_TYPE`: default memory type and MTRR enable.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled (bit 11) with write-back (6) as the default memory type.
pub const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;
/// `IA32_EFER`.
pub const MSR_EFER: u32 = 0xc000_0080;
/// `STAR`: legacy-mode syscall target.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `LSTAR`: long-mode syscall target.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `CSTAR`: compat-mode syscall target.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `SFMASK`: syscall RFLAGS mask.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `KERNEL_GS_BASE`: value swapped into GS base by `swapgs`.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Errors of MSR setup.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The MSR list could not be built.
    #[error("cannot build the MSR list: {0:?}")]
    Build(vmm_sys_util::fam::Error),
    /// `KVM_SET_MSRS` failed.
    #[error("KVM_SET_MSRS failed: {0}")]
    Set(kvm_ioctls::Error),
    /// KVM accepted only part of the list; `index` is the first refused MSR.
    #[error("KVM refused MSR {index:#x} (set {set} of {total})")]
    Partial {
        /// The first MSR KVM did not accept.
        index: u32,
        /// How many MSRs were set.
        set: usize,
        /// How many MSRs were requested.
        total: usize,
    },
}

/// The MSR values every vCPU gets before its first run.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ]
}

/// Writes [`boot_msr_entries`] into `vcpu`, failing if KVM refuses any of them.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Build)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if set != entries.len() {
        return Err(MsrError::Partial {
            index: entries[set].index,
            set,
            total: entries.len(),
        });
    }
    Ok(())
}
