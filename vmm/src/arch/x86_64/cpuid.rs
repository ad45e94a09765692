//! Per-vCPU CPUID: KVM's supported list with a coherent topology.
//!
//! The guest is described as one socket with N cores of one thread each;
//! vCPU i has APIC id i (KVM's default for vCPU id i). Every leaf that
//! reports an APIC id or a core count is rewritten to agree with that:
//!
//! * leaf 0x1: initial APIC id, logical processor count, HTT, hypervisor bit,
//!   TSC-deadline (when KVM emulates it);
//! * leaf 0x4 (Intel): cores per package and threads sharing each cache;
//! * leaves 0xb and 0x1f: extended topology (SMT level, core level);
//! * leaves 0x80000001, 0x80000008 and 0x8000001e (AMD): CmpLegacy, core
//!   count and APIC id size, extended APIC id and core id.
//!
//! A guest that sees inconsistent values here may bring up fewer CPUs or
//! mis-size its per-CPU structures, so this is tested leaf by leaf.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

/// Errors of CPUID construction.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The modified entry list could not be turned into a `CpuId` again.
    #[error("cannot build the CPUID list: {0:?}")]
    Build(vmm_sys_util::fam::Error),
}

/// CPU vendors whose topology leaves differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// "GenuineIntel".
    Intel,
    /// "AuthenticAMD" (or Hygon, which follows AMD's leaves).
    Amd,
    /// Anything else: only the common leaves are adjusted.
    Other,
}

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EXT_ECX_CMP_LEGACY: u32 = 1 << 1;
const EXT_ECX_TOPOEXT: u32 = 1 << 22;

/// Topology level types of leaves 0xb/0x1f (ECX[15:8]).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Reads the vendor from leaf 0.
pub fn vendor_of(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == LEAF_VENDOR) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    id[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Number of bits needed to hold ids `0..count` (0 for a count of 1).
pub fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// Builds the CPUID of vCPU `index` out of `count`, from KVM's supported
/// list. `tsc_deadline` says whether KVM emulates the TSC-deadline timer.
pub fn vcpu_cpuid(
    supported: &CpuId,
    index: u8,
    count: u8,
    tsc_deadline: bool,
) -> Result<CpuId, CpuidError> {
    let entries = vcpu_cpuid_entries(supported.as_slice(), index, count, tsc_deadline);
    CpuId::from_entries(&entries).map_err(CpuidError::Build)
}

/// [`vcpu_cpuid`] on a plain entry list.
pub fn vcpu_cpuid_entries(
    supported: &[kvm_cpuid_entry2],
    index: u8,
    count: u8,
    tsc_deadline: bool,
) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    let vendor = vendor_of(supported);
    let max_basic = supported
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .map_or(0, |e| e.eax);

    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| !matches!(e.function, LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY))
        .copied()
        .collect();

    for entry in &mut entries {
        match entry.function {
            LEAF_FEATURES => {
                // EBX: [31:24] APIC id, [23:16] addressable logical ids,
                // [15:8] CLFLUSH line size in 8-byte units.
                let logical = count.next_power_of_two().min(255);
                entry.ebx = (apic_id << 24) | (logical << 16) | (8 << 8) | (entry.ebx & 0xff);
                entry.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
                let cache_level = (entry.eax >> 5) & 0x7;
                // [25:14] threads sharing this cache - 1; [31:26] cores - 1.
                let sharing = if cache_level >= 3 {
                    count.next_power_of_two() - 1
                } else {
                    0
                };
                let cores = count.next_power_of_two().min(64) - 1;
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | (cores << 26);
            }
            LEAF_EXT_FEATURES if vendor == Vendor::Amd => {
                if count > 1 {
                    entry.ecx |= EXT_ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !EXT_ECX_CMP_LEGACY;
                }
            }
            LEAF_ADDR_SIZES if vendor == Vendor::Amd => {
                // ECX: [7:0] cores - 1, [15:12] APIC id bits for cores.
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1);
            }
            LEAF_AMD_EXT_APIC_ID => {
                // EAX: extended APIC id; EBX: [15:8] threads per core - 1,
                // [7:0] core id; ECX: node 0, one node per package.
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }

    if max_basic >= LEAF_EXT_TOPOLOGY {
        entries.extend(extended_topology(LEAF_EXT_TOPOLOGY, apic_id, count));
    }
    if max_basic >= LEAF_V2_EXT_TOPOLOGY {
        entries.extend(extended_topology(LEAF_V2_EXT_TOPOLOGY, apic_id, count));
    }
    if vendor == Vendor::Amd
        && !entries
            .iter()
            .any(|e| e.function == LEAF_EXT_FEATURES && e.ecx & EXT_ECX_TOPOEXT != 0)
    {
        entries.retain(|e| e.function != LEAF_AMD_EXT_APIC_ID);
    }
    entries
}

/// Subleaves 0 (SMT), 1 (core) and 2 (end marker) of leaf 0xb or 0x1f.
fn extended_topology(function: u32, apic_id: u32, count: u32) -> [kvm_cpuid_entry2; 3] {
    let subleaf = |index: u32, shift: u32, processors: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: processors,
        ecx: (level_type << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    [
        subleaf(0, 0, 1, LEVEL_TYPE_SMT),
        subleaf(1, id_bits(count), count, LEVEL_TYPE_CORE),
        subleaf(2, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vendor_leaf(id: &[u8; 12], max_basic: u32) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes([id[i], id[i + 1], id[i + 2], id[i + 3]]);
        kvm_cpuid_entry2 {
            function: 0,
            eax: max_basic,
            ebx: word(0),
            edx: word(4),
            ecx: word(8),
            ..Default::default()
        }
    }

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(32), 5);
    }

    #[test]
    fn intel_topology_for_third_of_three_vcpus() {
        let mut l4_l3 = leaf(4, 3);
        l4_l3.eax = (3 << 5) | 0x3; // level-3 unified cache
        let mut l4_l1 = leaf(4, 0);
        l4_l1.eax = (1 << 5) | 0x1;
        let supported = [
            vendor_leaf(b"GenuineIntel", 0x1f),
            leaf(1, 0),
            l4_l1,
            l4_l3,
            leaf(0xb, 0),
            leaf(0xb, 1),
        ];
        let out = vcpu_cpuid_entries(&supported, 2, 3, true);

        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "addressable ids");
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);

        assert_eq!(find(&out, 4, 0).eax >> 26, 3);
        assert_eq!((find(&out, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&out, 4, 3).eax >> 14) & 0xfff, 3);

        for function in [0xb, 0x1f] {
            let smt = find(&out, function, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
            let core = find(&out, function, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
            assert_eq!(find(&out, function, 2).ecx, 2);
            assert_eq!(out.iter().filter(|e| e.function == function).count(), 3);
        }
    }

    #[test]
    fn amd_topology_for_second_of_two_vcpus() {
        let mut ext = leaf(0x8000_0001, 0);
        ext.ecx = EXT_ECX_TOPOEXT;
        let supported = [
            vendor_leaf(b"AuthenticAMD", 0xd),
            leaf(1, 0),
            ext,
            leaf(0x8000_0008, 0),
            leaf(0x8000_001e, 0),
        ];
        let out = vcpu_cpuid_entries(&supported, 1, 2, false);
        assert_eq!(find(&out, 1, 0).ebx >> 24, 1);
        assert_eq!(find(&out, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(find(&out, 0x8000_0001, 0).ecx & EXT_ECX_CMP_LEGACY, 0);
        assert_eq!(find(&out, 0x8000_0008, 0).ecx, (1 << 12) | 1);
        let e = find(&out, 0x8000_001e, 0);
        assert_eq!((e.eax, e.ebx, e.ecx), (1, 1, 0));
        assert_eq!(find(&out, 0xb, 0).edx, 1);
        assert!(!out.iter().any(|e| e.function == 0x1f));
    }

    #[test]
    fn amd_without_topoext_drops_leaf_8000001e() {
        let supported = [
            vendor_leaf(b"AuthenticAMD", 0xd),
            leaf(0x8000_0001, 0),
            leaf(0x8000_001e, 0),
        ];
        let out = vcpu_cpuid_entries(&supported, 0, 1, false);
        assert!(!out.iter().any(|e| e.function == 0x8000_001e));
        assert_eq!(find(&out, 0x8000_0001, 0).ecx & EXT_ECX_CMP_LEGACY, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut l1 = leaf(1, 0);
        l1.edx = EDX_HTT;
        let out = vcpu_cpuid_entries(&[vendor_leaf(b"GenuineIntel", 1), l1], 0, 1, false);
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 1);
    }
}
