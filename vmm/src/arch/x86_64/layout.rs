//! Fixed guest-physical addresses used while booting.
//!
//! The low 640 KiB hold the boot structures; the kernel itself goes at or
//! above [`HIMEM_START`]. The addresses follow the usual x86 PC conventions
//! that Linux expects (zero page below 0x9_0000, EBDA/MP table below
//! 0xA_0000, legacy hole 0xA_0000..0x10_0000).

/// Guest-physical address of the boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of entries of the boot GDT (null, code, data, TSS).
pub const BOOT_GDT_ENTRIES: usize = 4;
/// Guest-physical address of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;

/// Guest-physical address of the PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// Guest-physical address of the PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Guest-physical address of the Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Top of the stack used by the bootstrap processor at kernel entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Guest-physical address of the level-4 page map (PML4).
pub const PML4_START: u64 = 0x9000;
/// Guest-physical address of the page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Guest-physical address of the page directory (512 x 2 MiB pages = 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Bytes of guest-physical memory identity-mapped by the boot page tables.
pub const IDENTITY_MAPPED_BYTES: u64 = 1 << 30;

/// Guest-physical address of the kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Maximum size of the kernel command line, including the trailing NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;

/// Start of the extended BIOS data area, where the MP table is written.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of the legacy VGA/ROM hole that is not RAM.
pub const LEGACY_HOLE_START: u64 = 0xa_0000;
/// First byte above 1 MiB: where the kernel image is loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap below 4 GiB (LAPIC, IOAPIC, virtio-mmio).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;

/// Address KVM uses for the TSS of real-mode emulation on Intel hosts.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
