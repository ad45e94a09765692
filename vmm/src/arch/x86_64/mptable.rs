//! Intel MultiProcessor Specification (v1.4) tables, so that a guest without
//! ACPI tables finds every vCPU, the I/O APIC and the interrupt wiring.
//!
//! linux-loader has no MP table support, so the tables are serialised here
//! byte by byte (no `repr(C)` transmutes):
//!
//! ```text
//! EBDA_START: MP floating pointer "_MP_" (16 bytes) -> config table
//!             MP configuration table "PCMP" (44-byte header), then entries:
//!               processor x N   (20 bytes each; APIC id = vCPU index)
//!               bus "ISA"       (8)
//!               I/O APIC        (8; id = N, at 0xfec00000)
//!               I/O interrupt x 24 (8 each; ISA IRQ i -> IOAPIC pin i)
//!               local interrupt x 2 (8 each; ExtINT -> LINT0, NMI -> LINT1)
//! ```
//!
//! Both structures carry a checksum making their bytes sum to zero. Linux
//! scans 0x9fc00..0xa0000 ("top of 640K") for the floating pointer.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{EBDA_START, LEGACY_HOLE_START};

/// Guest-physical address of the local APIC registers.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// Guest-physical address of the I/O APIC registers.
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// Number of I/O APIC pins of KVM's in-kernel I/O APIC.
pub const IOAPIC_PINS: u8 = 24;

const MPC_SPEC_REVISION: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// CPU signature reported in processor entries (family 6).
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags reported in processor entries: FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;

const FLOATING_POINTER_SIZE: usize = 16;
const CONFIG_HEADER_SIZE: usize = 44;

/// Errors of MP table construction.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// There are more vCPUs than APIC ids the table can describe.
    #[error("{0} vCPUs do not fit an MP table (at most 254)")]
    TooManyCpus(u8),
    /// The tables do not fit below the legacy hole.
    #[error("MP tables of {0} bytes do not fit below 0xa0000")]
    TooLarge(usize),
    /// Writing to guest memory failed.
    #[error("cannot write the MP table to guest memory: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
}

/// Sum of `bytes`, modulo 256.
fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// The value making `bytes` plus it sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(byte_sum(bytes))
}

/// Serialises the floating pointer and configuration table for
/// `vcpu_count` vCPUs, to be placed at `base`.
pub fn build(base: u64, vcpu_count: u8) -> Result<Vec<u8>, MptableError> {
    if vcpu_count == 0 || vcpu_count > 254 {
        return Err(MptableError::TooManyCpus(vcpu_count));
    }
    let ioapic_id = vcpu_count;
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;

    for cpu in 0..vcpu_count {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }

    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;

    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    entry_count += 1;

    for irq in 0..IOAPIC_PINS {
        // Type, interrupt type, flags (conforming: 0), bus, bus IRQ, IOAPIC, pin.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            ISA_BUS_ID,
            irq,
            ioapic_id,
            irq,
        ]);
        entry_count += 1;
    }

    // ExtINT to LINT0 of the BSP, NMI to LINT1 of every CPU (0xff).
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        ISA_BUS_ID,
        0,
        0,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        1,
    ]);
    entry_count += 2;

    let table_len = CONFIG_HEADER_SIZE + entries.len();
    let total = FLOATING_POINTER_SIZE + table_len;
    if base + total as u64 > LEGACY_HOLE_START {
        return Err(MptableError::TooLarge(total));
    }
    let table_addr = (base + FLOATING_POINTER_SIZE as u64) as u32;

    let mut header = Vec::with_capacity(CONFIG_HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(MPC_SPEC_REVISION);
    header.push(0); // checksum, patched below
    header.extend_from_slice(b"KINDLING");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0); // reserved
    debug_assert_eq!(header.len(), CONFIG_HEADER_SIZE);

    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_POINTER_SIZE);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(MPC_SPEC_REVISION);
    floating.push(0); // checksum, patched below
    floating.extend_from_slice(&[0; 5]); // feature bytes: config table present
    floating[10] = checksum(&floating);

    let mut out = floating;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP tables for `vcpu_count` vCPUs at [`EBDA_START`].
pub fn write<M: GuestMemory>(mem: &M, vcpu_count: u8) -> Result<(), MptableError> {
    let bytes = build(EBDA_START, vcpu_count)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn checksums_and_pointers_are_consistent() {
        for cpus in [1u8, 2, 32] {
            let bytes = build(EBDA_START, cpus).unwrap();
            let (fp, table) = bytes.split_at(FLOATING_POINTER_SIZE);
            assert_eq!(&fp[0..4], b"_MP_");
            assert_eq!(byte_sum(fp), 0);
            assert_eq!(u32_at(fp, 4) as u64, EBDA_START + 16);
            assert_eq!(&table[0..4], b"PCMP");
            assert_eq!(usize::from(u16_at(table, 4)), table.len());
            assert_eq!(byte_sum(table), 0);
            let entries = u16_at(table, 34);
            assert_eq!(entries, u16::from(cpus) + 1 + 1 + 24 + 2);
            assert_eq!(u32_at(table, 36), APIC_DEFAULT_PHYS_BASE);
        }
    }

    #[test]
    fn processors_have_sequential_apic_ids_and_one_bsp() {
        let bytes = build(EBDA_START, 4).unwrap();
        let entries = &bytes[FLOATING_POINTER_SIZE + CONFIG_HEADER_SIZE..];
        for cpu in 0..4usize {
            let e = &entries[cpu * 20..cpu * 20 + 20];
            assert_eq!(e[0], ENTRY_PROCESSOR);
            assert_eq!(usize::from(e[1]), cpu);
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, cpu == 0);
            assert_eq!(e[3] & CPU_ENABLED, CPU_ENABLED);
        }
        let ioapic = &entries[4 * 20 + 8..4 * 20 + 16];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert_eq!(ioapic[1], 4, "IOAPIC id must not clash with CPU APIC ids");
        assert_eq!(u32_at(ioapic, 4), IO_APIC_DEFAULT_PHYS_BASE);
    }

    #[test]
    fn largest_table_fits_and_bad_counts_fail() {
        assert!(build(EBDA_START, 32).unwrap().len() <= 1024);
        assert!(matches!(
            build(EBDA_START, 0),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(matches!(
            build(EBDA_START, 200),
            Err(MptableError::TooLarge(_))
        ));
    }

    #[test]
    fn write_places_tables_at_ebda() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
