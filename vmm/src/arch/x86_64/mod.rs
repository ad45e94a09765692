//! x86_64 boot support: the guest-physical memory layout, the boot GDT, the
//! identity-mapped page tables, the register state for long mode or for
//! the PVH 32-bit entry, CPUID, MSRs, the local APIC, the MP table and the
//! boot parameters.
//!
//! Everything here writes either guest memory or vCPU state, and is shared
//! by the real kernel boot path and by the tiny hand-written test guests.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
