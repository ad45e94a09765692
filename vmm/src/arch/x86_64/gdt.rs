//! Global descriptor table entries and their translation into the
//! `kvm_segment` form KVM expects in `kvm_sregs`.
//!
//! A GDT entry packs base, limit and flags into 8 bytes in the layout of the
//! Intel SDM vol. 3A, 3.4.5. KVM does not read the GDT when a segment
//! register is loaded through `KVM_SET_SREGS`, so the same information is
//! written twice: into guest memory (for the guest, which reloads segments
//! from it) and into the hidden part of each segment register.

use kvm_bindings::kvm_segment;

/// Flags of a 64-bit code segment: present, ring 0, executable/readable, L=1.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Flags of a 32-bit flat code segment: present, ring 0, executable/readable, D=1, G=1.
pub const CODE32_FLAGS: u16 = 0xc09b;
/// Flags of a flat data segment: present, ring 0, read/write, D/B=1, G=1.
pub const DATA_FLAGS: u16 = 0xc093;
/// Flags of a 64-bit busy TSS descriptor.
pub const TSS64_FLAGS: u16 = 0x808b;
/// Flags of a 32-bit busy TSS descriptor.
pub const TSS32_FLAGS: u16 = 0x008b;

/// Index of the code segment in the boot GDT (selector 0x08).
pub const CODE_INDEX: u8 = 1;
/// Index of the data segment in the boot GDT (selector 0x10).
pub const DATA_INDEX: u8 = 2;
/// Index of the TSS in the boot GDT (selector 0x18).
pub const TSS_INDEX: u8 = 3;

/// Packs `flags`, `base` and `limit` into one 8-byte GDT entry.
///
/// `flags` holds the access byte in bits 0..8 and the G/DB/L/AVL nibble in
/// bits 12..16, as in the high word of the descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn base_of(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit_of(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    // With the granularity bit set the limit counts 4 KiB pages.
    if granularity_of(entry) == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

fn bit(entry: u64, shift: u32) -> u8 {
    ((entry >> shift) & 1) as u8
}

fn granularity_of(entry: u64) -> u8 {
    bit(entry, 55)
}

/// Builds the segment-register state KVM needs for the GDT entry at `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = bit(entry, 47);
    kvm_segment {
        base: base_of(entry),
        limit: limit_of(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: granularity_of(entry),
        avl: bit(entry, 52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_entry_matches_reference_encoding() {
        // The well-known encoding of a flat 64-bit ring-0 code segment.
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn segment_decodes_every_field() {
        let entry = gdt_entry(CODE64_FLAGS, 0x1234_5678, 0xfffff);
        let seg = kvm_segment_from_gdt(entry, CODE_INDEX);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.selector, 0x08);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.dpl, 0);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.s, 1);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.g, 1);
        assert_eq!(seg.avl, 0);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn byte_granular_limit_is_not_scaled() {
        let seg = kvm_segment_from_gdt(gdt_entry(TSS32_FLAGS, 0, 0x67), TSS_INDEX);
        assert_eq!(seg.limit, 0x67);
        assert_eq!(seg.g, 0);
        assert_eq!(seg.selector, 0x18);
    }

    #[test]
    fn null_entry_is_unusable() {
        let seg = kvm_segment_from_gdt(0, 0);
        assert_eq!(seg.present, 0);
        assert_eq!(seg.unusable, 1);
    }
}
