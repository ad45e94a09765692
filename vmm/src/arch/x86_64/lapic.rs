//! Local APIC setup: LINT0 as ExtINT (the legacy PIC's output) and LINT1 as
//! NMI, the wiring of a PC that Linux assumes when it reads an MP table.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// Offset of the LVT LINT0 register in the APIC page.
pub const APIC_LVT_LINT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the APIC page.
pub const APIC_LVT_LINT1: usize = 0x360;
/// Delivery mode NMI (bits 10:8 = 100b).
pub const APIC_MODE_NMI: u32 = 0x4;
/// Delivery mode ExtINT (bits 10:8 = 111b).
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors of LAPIC setup.
#[derive(Debug, thiserror::Error)]
pub enum LapicError {
    /// `KVM_GET_LAPIC` failed.
    #[error("KVM_GET_LAPIC failed: {0}")]
    Get(kvm_ioctls::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("KVM_SET_LAPIC failed: {0}")]
    Set(kvm_ioctls::Error),
}

/// Reads the 32-bit APIC register at `offset`.
pub fn read_register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([
        bytes[0] as u8,
        bytes[1] as u8,
        bytes[2] as u8,
        bytes[3] as u8,
    ])
}

/// Writes the 32-bit APIC register at `offset`.
pub fn write_register(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (slot, byte) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *slot = byte as _;
    }
}

/// Replaces the delivery mode (bits 10:8) of an LVT entry.
pub fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !0x700) | (mode << 8)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in `lapic`.
pub fn configure_lint(lapic: &mut kvm_lapic_state) {
    let lint0 = read_register(lapic, APIC_LVT_LINT0);
    write_register(
        lapic,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = read_register(lapic, APIC_LVT_LINT1);
    write_register(
        lapic,
        APIC_LVT_LINT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
}

/// Applies [`configure_lint`] to the in-kernel LAPIC of `vcpu`.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), LapicError> {
    let mut lapic = vcpu.get_lapic().map_err(LapicError::Get)?;
    configure_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(LapicError::Set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_modes_are_set_and_other_bits_kept() {
        let mut lapic = kvm_lapic_state::default();
        // Masked (bit 16), vector 0x20, fixed mode.
        write_register(&mut lapic, APIC_LVT_LINT0, 0x1_0020);
        write_register(&mut lapic, APIC_LVT_LINT1, 0x1_0000 | (0x2 << 8));
        configure_lint(&mut lapic);
        assert_eq!(read_register(&lapic, APIC_LVT_LINT0), 0x1_0720);
        assert_eq!(read_register(&lapic, APIC_LVT_LINT1), 0x1_0400);
    }

    #[test]
    fn register_round_trip_covers_high_bytes() {
        let mut lapic = kvm_lapic_state::default();
        write_register(&mut lapic, 0x20, 0xfe00_00ff);
        assert_eq!(read_register(&lapic, 0x20), 0xfe00_00ff);
    }
}
