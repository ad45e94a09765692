//! A KVM self-test: runs a few instructions of 64-bit code in a fresh VM and
//! checks the exact sequence of exits they cause.
//!
//! The guest computes a 64-bit sum (only correct in long mode: in 32-bit
//! mode the REX.W prefixes decode as `dec eax`), writes it byte by byte to
//! port 0x3f8, reports EFER and CR0 on port 0x3fa, stores the sum to an
//! unbacked address (an MMIO exit) and halts. Any other exit, data or order
//! is a failure. It exercises the same vCPU setup code as the kernel boot
//! path ([`crate::arch::x86_64`]), so it is both a host capability probe and
//! a regression test for that code.

use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::BOOT_STACK_POINTER;
use crate::arch::x86_64::regs::{
    EFER_LMA, EFER_LME, EntryMode, EntryPoint, RegsError, X86_CR0_PE, X86_CR0_PG, setup_fpu,
    setup_regs, setup_sregs,
};
use crate::memory::{self, MemoryError};

/// Guest-physical address the test code is loaded at.
pub const CODE_ADDRESS: u64 = 0x1000;
/// Size of the test guest's RAM.
pub const MEMORY_SIZE: usize = 2 << 20;
/// Port the sum is written to, one byte at a time.
pub const DATA_PORT: u16 = 0x3f8;
/// Port EFER and CR0 are reported on, 4 bytes each.
pub const STATUS_PORT: u16 = 0x3fa;
/// Unbacked guest-physical address the sum is stored to (an MMIO exit).
pub const MMIO_ADDRESS: u64 = 0x1000_0000;
/// The value the guest computes: 0x1122334455667788 + 0x0101010101010101.
pub const EXPECTED_SUM: u64 = 0x1223_3445_5667_7889;
/// Upper bound on exits before the test gives up (the guest makes 12).
const MAX_EXITS: usize = 64;

/// The test program, assembled with GNU as (`.code64`, Intel syntax).
pub const GUEST_CODE: &[u8] = &[
    0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22,
    0x11, // movabs rax, 0x1122334455667788
    0x48, 0xbb, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01,
    0x01, // movabs rbx, 0x0101010101010101
    0x48, 0x01, 0xd8, // add rax, rbx
    0x48, 0x89, 0xc6, // mov rsi, rax
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb9, 0x08, 0x00, 0x00, 0x00, // mov ecx, 8
    0xee, // 1: out dx, al
    0x48, 0xc1, 0xe8, 0x08, // shr rax, 8
    0xff, 0xc9, // dec ecx
    0x75, 0xf7, // jnz 1b
    0xb9, 0x80, 0x00, 0x00, 0xc0, // mov ecx, 0xc0000080 (EFER)
    0x0f, 0x32, // rdmsr
    0x66, 0xba, 0xfa, 0x03, // mov dx, 0x3fa
    0xef, // out dx, eax
    0x0f, 0x20, 0xc0, // mov rax, cr0
    0xef, // out dx, eax
    0xbf, 0x00, 0x00, 0x00, 0x10, // mov edi, 0x10000000
    0x48, 0x89, 0x37, // mov [rdi], rsi
    0xf4, // hlt
];

/// One exit the vCPU made, as recorded by the test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObservedExit {
    /// A port write.
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// An MMIO write.
    MmioWrite {
        /// The guest-physical address.
        address: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// The guest executed HLT.
    Hlt,
    /// Anything else, described.
    Other(String),
}

/// Timings and observations of a successful run.
#[derive(Debug, Clone)]
pub struct SmokeReport {
    /// Time to open /dev/kvm, create the VM and register its memory.
    pub vm_create: Duration,
    /// Time to create the vCPU and set CPUID, registers and page tables.
    pub vcpu_setup: Duration,
    /// Time from the first `KVM_RUN` to the HLT exit.
    pub run: Duration,
    /// Every exit, in order.
    pub exits: Vec<ObservedExit>,
    /// The 64-bit sum the guest produced.
    pub sum: u64,
    /// The guest's EFER (low 32 bits).
    pub efer: u32,
    /// The guest's CR0 (low 32 bits).
    pub cr0: u32,
}

/// Errors of the self-test.
#[derive(Debug, thiserror::Error)]
pub enum SmokeError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory setup failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the test code failed.
    #[error("cannot load the test code: {0}")]
    LoadCode(vm_memory::GuestMemoryError),
    /// vCPU register setup failed.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// The vCPU made an exit other than the next expected one.
    #[error("exit #{index}: expected {expected}, got {got:?}")]
    UnexpectedExit {
        /// Position in the exit sequence (0-based).
        index: usize,
        /// What was expected.
        expected: String,
        /// What happened.
        got: ObservedExit,
    },
    /// The guest never halted.
    #[error("no HLT after {0} exits")]
    TooManyExits(usize),
}

/// Runs the self-test and returns its report, or the first deviation.
pub fn run() -> Result<SmokeReport, SmokeError> {
    let started = Instant::now();
    let kvm = Kvm::new().map_err(SmokeError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(|source| SmokeError::Kvm {
        what: "KVM_CREATE_VM",
        source,
    })?;
    let mem = memory::allocate(&[(GuestAddress(0), MEMORY_SIZE)])?;
    memory::register_with_kvm(&vm, &mem)?;
    let vm_create = started.elapsed();

    let started = Instant::now();
    mem.write_slice(GUEST_CODE, GuestAddress(CODE_ADDRESS))
        .map_err(SmokeError::LoadCode)?;
    let vcpu = setup_vcpu(&kvm, &vm, &mem)?;
    let vcpu_setup = started.elapsed();

    let started = Instant::now();
    let exits = run_until_hlt(vcpu)?;
    let run = started.elapsed();

    let (sum, efer, cr0) = check_exits(&exits)?;
    Ok(SmokeReport {
        vm_create,
        vcpu_setup,
        run,
        exits,
        sum,
        efer,
        cr0,
    })
}

fn setup_vcpu(kvm: &Kvm, vm: &VmFd, mem: &memory::GuestMemory) -> Result<VcpuFd, SmokeError> {
    let kvm_err = |what| move |source| SmokeError::Kvm { what, source };
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    // Long mode needs CPUID.LM in the guest's CPUID, or KVM refuses EFER.LME.
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    setup_sregs(mem, &vcpu, EntryMode::Long64)?;
    setup_regs(
        &vcpu,
        &EntryPoint {
            address: GuestAddress(CODE_ADDRESS),
            mode: EntryMode::Long64,
            stack_pointer: BOOT_STACK_POINTER,
            boot_info: GuestAddress(0),
        },
    )?;
    setup_fpu(&vcpu)?;
    Ok(vcpu)
}

fn run_until_hlt(mut vcpu: VcpuFd) -> Result<Vec<ObservedExit>, SmokeError> {
    let mut exits = Vec::new();
    while exits.len() < MAX_EXITS {
        let exit = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => ObservedExit::IoOut {
                port,
                data: data.to_vec(),
            },
            Ok(VcpuExit::MmioWrite(address, data)) => ObservedExit::MmioWrite {
                address,
                data: data.to_vec(),
            },
            Ok(VcpuExit::Hlt) => ObservedExit::Hlt,
            Ok(other) => ObservedExit::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(source) => {
                return Err(SmokeError::Kvm {
                    what: "KVM_RUN",
                    source,
                });
            }
        };
        let done = !matches!(
            exit,
            ObservedExit::IoOut { .. } | ObservedExit::MmioWrite { .. }
        );
        exits.push(exit);
        if done {
            return Ok(exits);
        }
    }
    Err(SmokeError::TooManyExits(exits.len()))
}

/// Checks `exits` against the program's expected behaviour and returns the
/// sum, EFER and CR0 values it reported.
pub fn check_exits(exits: &[ObservedExit]) -> Result<(u64, u32, u32), SmokeError> {
    let mut index = 0;
    let mut next = |expected: String| {
        let got = exits
            .get(index)
            .cloned()
            .unwrap_or_else(|| ObservedExit::Other("no further exit".into()));
        let result = (index, expected, got);
        index += 1;
        result
    };
    let fail = |(index, expected, got): (usize, String, ObservedExit)| SmokeError::UnexpectedExit {
        index,
        expected,
        got,
    };

    for byte in EXPECTED_SUM.to_le_bytes() {
        let step = next(format!("out {DATA_PORT:#x}, {byte:#04x}"));
        match &step.2 {
            ObservedExit::IoOut { port, data } if *port == DATA_PORT && data[..] == [byte] => {}
            _ => return Err(fail(step)),
        }
    }

    let mut status = |what: &str, required: u32| {
        let step = next(format!(
            "out {STATUS_PORT:#x}, {what} with {required:#x} set"
        ));
        match &step.2 {
            ObservedExit::IoOut { port, data } if *port == STATUS_PORT && data.len() == 4 => {
                let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                if value & required == required {
                    Ok(value)
                } else {
                    Err(fail(step))
                }
            }
            _ => Err(fail(step)),
        }
    };
    let efer = status("EFER", (EFER_LME | EFER_LMA) as u32)?;
    let cr0 = status("CR0", (X86_CR0_PE | X86_CR0_PG) as u32)?;

    let step = next(format!(
        "8-byte MMIO write of {EXPECTED_SUM:#x} at {MMIO_ADDRESS:#x}"
    ));
    match &step.2 {
        ObservedExit::MmioWrite { address, data }
            if *address == MMIO_ADDRESS && data[..] == EXPECTED_SUM.to_le_bytes() => {}
        _ => return Err(fail(step)),
    }

    let step = next("HLT".into());
    if step.2 != ObservedExit::Hlt {
        return Err(fail(step));
    }
    Ok((EXPECTED_SUM, efer, cr0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good_exits() -> Vec<ObservedExit> {
        let mut exits: Vec<_> = EXPECTED_SUM
            .to_le_bytes()
            .iter()
            .map(|b| ObservedExit::IoOut {
                port: DATA_PORT,
                data: vec![*b],
            })
            .collect();
        exits.push(ObservedExit::IoOut {
            port: STATUS_PORT,
            data: 0x500u32.to_le_bytes().to_vec(),
        });
        exits.push(ObservedExit::IoOut {
            port: STATUS_PORT,
            data: 0x8000_0011u32.to_le_bytes().to_vec(),
        });
        exits.push(ObservedExit::MmioWrite {
            address: MMIO_ADDRESS,
            data: EXPECTED_SUM.to_le_bytes().to_vec(),
        });
        exits.push(ObservedExit::Hlt);
        exits
    }

    #[test]
    fn expected_sequence_passes() {
        assert_eq!(
            check_exits(&good_exits()).unwrap(),
            (EXPECTED_SUM, 0x500, 0x8000_0011)
        );
    }

    #[test]
    fn wrong_data_byte_is_reported_with_its_index() {
        let mut exits = good_exits();
        exits[3] = ObservedExit::IoOut {
            port: DATA_PORT,
            data: vec![0],
        };
        let err = check_exits(&exits).unwrap_err();
        assert!(matches!(err, SmokeError::UnexpectedExit { index: 3, .. }));
    }

    #[test]
    fn compatibility_mode_efer_is_rejected() {
        let mut exits = good_exits();
        exits[8] = ObservedExit::IoOut {
            port: STATUS_PORT,
            data: 0x100u32.to_le_bytes().to_vec(),
        };
        let err = check_exits(&exits).unwrap_err();
        assert!(matches!(err, SmokeError::UnexpectedExit { index: 8, .. }));
    }

    #[test]
    fn missing_hlt_is_rejected() {
        let mut exits = good_exits();
        exits.pop();
        exits.push(ObservedExit::Other("Shutdown".into()));
        let err = check_exits(&exits).unwrap_err();
        assert!(matches!(err, SmokeError::UnexpectedExit { index: 11, .. }));
        exits.pop();
        let err = check_exits(&exits).unwrap_err();
        assert!(matches!(err, SmokeError::UnexpectedExit { index: 11, .. }));
    }
}
