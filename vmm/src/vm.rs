//! The KVM virtual machine: /dev/kvm, the VM fd with its in-kernel
//! interrupt controllers (PIC, I/O APIC, LAPICs) and PIT, and guest RAM.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot_params::ram_ranges;
use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::memory::{self, GuestMemory, MemoryError};

/// KVM capabilities the VMM cannot work without.
const REQUIRED_CAPS: [(Cap, &str); 6] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
];

/// Errors of VM creation.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// The host KVM lacks a capability.
    #[error("the host KVM lacks {0}")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory setup failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// A VM with its guest RAM and in-kernel irqchip.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemory,
    supported_cpuid: CpuId,
    tsc_deadline: bool,
}

impl Vm {
    /// Creates a VM with `memory_bytes` of RAM, the in-kernel irqchip and a PIT.
    pub fn new(memory_bytes: u64) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let memory = memory::allocate(&ram_ranges(memory_bytes))?;
        memory::register_with_kvm(&fd, &memory)?;

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        Ok(Self {
            kvm,
            fd,
            memory,
            supported_cpuid,
            tsc_deadline,
        })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The /dev/kvm handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The CPUID entries KVM supports on this host.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Whether KVM emulates the TSC-deadline timer.
    pub fn tsc_deadline(&self) -> bool {
        self.tsc_deadline
    }

    /// Makes writes to `event` raise interrupt `gsi`.
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(|source| VmError::Kvm {
                what: "KVM_IRQFD",
                source,
            })
    }
}
