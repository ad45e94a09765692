//! Register and page-table state of a vCPU at its first instruction.
//!
//! Two entry conventions are supported:
//!
//! * [`EntryMode::Long64`]: 64-bit long mode with paging on, the first
//!   [`IDENTITY_MAPPED_BYTES`] identity-mapped with 2 MiB pages. This is the
//!   state the Linux 64-bit boot protocol requires (`RSI` = zero page) and
//!   the one the hand-written test guests run in.
//! * [`EntryMode::Pvh32`]: 32-bit protected mode with paging off and flat
//!   segments, `EBX` = address of `hvm_start_info` (the Xen PVH boot ABI
//!   that Linux implements with `CONFIG_PVH`).
//!
//! In both, the GDT written to guest memory and the hidden segment state
//! given to KVM describe the same segments.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::gdt::{
    CODE_INDEX, CODE32_FLAGS, CODE64_FLAGS, DATA_FLAGS, DATA_INDEX, TSS_INDEX, TSS32_FLAGS,
    TSS64_FLAGS, gdt_entry, kvm_segment_from_gdt,
};
use super::layout::{
    BOOT_GDT_ENTRIES, BOOT_GDT_START, BOOT_IDT_START, IDENTITY_MAPPED_BYTES, PDE_START,
    PDPTE_START, PML4_START,
};

/// CR0.PE: protected mode.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// Page-table entry flags: present + writable.
const PTE_PRESENT_WRITABLE: u64 = 0x3;
/// Page-directory entry flag: 2 MiB page.
const PDE_PAGE_SIZE: u64 = 0x80;
/// RFLAGS bit 1 is reserved and must be set.
const RFLAGS_RESERVED: u64 = 0x2;

/// The CPU mode a vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode with identity-mapped paging.
    Long64,
    /// 32-bit protected mode, paging off (PVH entry).
    Pvh32,
}

/// Errors of register and page-table setup.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT, IDT or page tables into guest memory failed.
    #[error("cannot write {what} to guest memory: {source}")]
    GuestMemory {
        /// Which boot structure was being written.
        what: &'static str,
        /// The memory error.
        source: vm_memory::GuestMemoryError,
    },
    /// `KVM_GET_SREGS` failed.
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(kvm_ioctls::Error),
    /// `KVM_SET_SREGS` failed.
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(kvm_ioctls::Error),
    /// `KVM_SET_REGS` failed.
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(kvm_ioctls::Error),
    /// `KVM_SET_FPU` failed.
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(kvm_ioctls::Error),
}

/// Where the vCPU starts and what it finds in its registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint {
    /// Guest-physical address of the first instruction.
    pub address: GuestAddress,
    /// CPU mode at entry.
    pub mode: EntryMode,
    /// Stack pointer at entry (0 when the entry code sets its own).
    pub stack_pointer: u64,
    /// Address of the boot information block: the Linux zero page (in RSI)
    /// for [`EntryMode::Long64`], `hvm_start_info` (in RBX) for PVH.
    pub boot_info: GuestAddress,
}

/// Sets the x87/SSE control state Linux expects (FCW = 0x37f, MXCSR = 0x1f80).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

/// Sets the general-purpose registers for `entry`.
pub fn setup_regs(vcpu: &VcpuFd, entry: &EntryPoint) -> Result<(), RegsError> {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.address.0,
        rsp: entry.stack_pointer,
        rbp: entry.stack_pointer,
        ..Default::default()
    };
    match entry.mode {
        EntryMode::Long64 => regs.rsi = entry.boot_info.0,
        EntryMode::Pvh32 => regs.rbx = entry.boot_info.0,
    }
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// Writes the boot GDT, IDT and (for long mode) page tables into guest
/// memory, and loads the matching segment and control registers.
pub fn setup_sregs<M: GuestMemory>(
    mem: &M,
    vcpu: &VcpuFd,
    mode: EntryMode,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    configure_segments_and_sregs(mem, &mut sregs, mode)?;
    if mode == EntryMode::Long64 {
        write_identity_page_tables(mem)?;
        enable_long_mode_paging(&mut sregs);
    }
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

/// The boot GDT for `mode`: null, code, data, TSS.
pub fn boot_gdt(mode: EntryMode) -> [u64; BOOT_GDT_ENTRIES] {
    match mode {
        EntryMode::Long64 => [
            0,
            gdt_entry(CODE64_FLAGS, 0, 0xfffff),
            gdt_entry(DATA_FLAGS, 0, 0xfffff),
            gdt_entry(TSS64_FLAGS, 0, 0xfffff),
        ],
        EntryMode::Pvh32 => [
            0,
            gdt_entry(CODE32_FLAGS, 0, 0xfffff),
            gdt_entry(DATA_FLAGS, 0, 0xfffff),
            gdt_entry(TSS32_FLAGS, 0, 0x67),
        ],
    }
}

/// Writes the GDT and an empty IDT to guest memory and fills the segment,
/// descriptor-table and CR0/EFER fields of `sregs` for `mode`.
pub fn configure_segments_and_sregs<M: GuestMemory>(
    mem: &M,
    sregs: &mut kvm_sregs,
    mode: EntryMode,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(mode);
    for (index, entry) in gdt.iter().enumerate() {
        let addr = GuestAddress(BOOT_GDT_START + (index * 8) as u64);
        mem.write_obj(*entry, addr)
            .map_err(|source| RegsError::GuestMemory {
                what: "boot GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| RegsError::GuestMemory {
            what: "boot IDT",
            source,
        })?;

    let code = kvm_segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = kvm_segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = kvm_segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    sregs.cs = code;
    set_data_segments(sregs, data);
    sregs.tr = tss;

    match mode {
        EntryMode::Long64 => {
            sregs.cr0 |= X86_CR0_PE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh32 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

fn set_data_segments(sregs: &mut kvm_sregs, data: kvm_segment) {
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
}

/// Writes PML4 -> PDPT -> PD tables identity-mapping the first
/// [`IDENTITY_MAPPED_BYTES`] with 2 MiB pages.
pub fn write_identity_page_tables<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|source| RegsError::GuestMemory {
                what: "boot page tables",
                source,
            })
    };
    write(PDPTE_START | PTE_PRESENT_WRITABLE, PML4_START)?;
    write(PDE_START | PTE_PRESENT_WRITABLE, PDPTE_START)?;
    const TWO_MIB: u64 = 2 << 20;
    for index in 0..(IDENTITY_MAPPED_BYTES / TWO_MIB) {
        let entry = (index * TWO_MIB) | PDE_PAGE_SIZE | PTE_PRESENT_WRITABLE;
        write(entry, PDE_START + index * 8)?;
    }
    Ok(())
}

fn enable_long_mode_paging(sregs: &mut kvm_sregs) {
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn long_mode_sregs_describe_64bit_code() {
        let mem = memory();
        let mut sregs = kvm_sregs::default();
        configure_segments_and_sregs(&mem, &mut sregs, EntryMode::Long64).unwrap();
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cs.db, 0);
        assert_eq!(sregs.cs.selector, 0x08);
        assert_eq!(sregs.ds.selector, 0x10);
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        assert_eq!(sregs.gdt.limit, 31);
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn pvh_sregs_are_flat_32bit_without_paging() {
        let mem = memory();
        let mut sregs = kvm_sregs {
            cr4: X86_CR4_PAE,
            efer: EFER_LME,
            ..Default::default()
        };
        configure_segments_and_sregs(&mem, &mut sregs, EntryMode::Pvh32).unwrap();
        assert_eq!(sregs.cs.l, 0);
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(sregs.cs.limit, 0xffff_ffff);
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!(sregs.cr4, 0);
        assert_eq!(sregs.efer, 0);
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = memory();
        write_identity_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | 3);
        for index in [0u64, 1, 511] {
            let pde: u64 = mem.read_obj(GuestAddress(PDE_START + index * 8)).unwrap();
            assert_eq!(pde, (index << 21) | 0x83);
        }
    }

    #[test]
    fn page_tables_outside_memory_are_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        assert!(matches!(
            write_identity_page_tables(&mem),
            Err(RegsError::GuestMemory { .. })
        ));
    }
}
