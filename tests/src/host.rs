//! What kind of KVM the host offers, and therefore where scenarios run.
//!
//! Three cases matter:
//! - no `/dev/kvm` at all: only the nested (QEMU TCG) route works;
//! - a PVM-backed `/dev/kvm` (the `kvm_pvm` module is loaded, or the CPU has
//!   no `vmx`/`svm` flag): every KVM ioctl works, but a normal Linux guest is
//!   executed by instruction emulation and never boots in useful time, so real
//!   guests need the nested route as well;
//! - hardware KVM: scenarios can run directly on the host.

use std::fmt;
use std::path::Path;

/// The virtualization the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKvm {
    /// `/dev/kvm` does not exist.
    Absent,
    /// `/dev/kvm` exists but is not backed by hardware virtualization; the
    /// string says how that was recognised.
    Pvm(String),
    /// `/dev/kvm` backed by VMX or SVM.
    Hardware,
}

impl fmt::Display for HostKvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKvm::Absent => write!(f, "no /dev/kvm"),
            HostKvm::Pvm(why) => write!(f, "PVM-backed /dev/kvm ({why})"),
            HostKvm::Hardware => write!(f, "hardware KVM"),
        }
    }
}

/// Where a scenario runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecMode {
    /// Inside an L1 Linux under QEMU TCG with emulated AMD SVM.
    Nested,
    /// Directly on this host (needs hardware KVM).
    Direct,
}

impl fmt::Display for ExecMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecMode::Nested => write!(f, "nested (L1 under QEMU TCG with emulated SVM)"),
            ExecMode::Direct => write!(f, "direct (host KVM)"),
        }
    }
}

impl HostKvm {
    /// Inspects this machine.
    pub fn detect() -> HostKvm {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        classify(
            Path::new("/dev/kvm").exists(),
            Path::new("/sys/module/kvm_pvm").exists(),
            &cpuinfo,
        )
    }

    /// The execution mode `auto` picks on this host.
    pub fn preferred_mode(&self) -> ExecMode {
        match self {
            HostKvm::Hardware => ExecMode::Direct,
            HostKvm::Absent | HostKvm::Pvm(_) => ExecMode::Nested,
        }
    }
}

/// Classifies a host from the facts `detect` gathers (split out for tests).
pub fn classify(dev_kvm: bool, kvm_pvm_module: bool, cpuinfo: &str) -> HostKvm {
    if !dev_kvm {
        return HostKvm::Absent;
    }
    if kvm_pvm_module {
        return HostKvm::Pvm("kvm_pvm module loaded".into());
    }
    let has_hw_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm");
    if has_hw_flag {
        HostKvm::Hardware
    } else {
        HostKvm::Pvm("CPU has neither vmx nor svm".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_each_host_kind() {
        let hw = "processor : 0\nflags : fpu vme svm sse\n";
        let plain = "processor : 0\nflags : fpu vme hypervisor sse\n";
        assert_eq!(classify(false, false, hw), HostKvm::Absent);
        assert!(matches!(classify(true, true, hw), HostKvm::Pvm(_)));
        assert!(matches!(classify(true, false, plain), HostKvm::Pvm(_)));
        assert_eq!(classify(true, false, hw), HostKvm::Hardware);
        assert_eq!(HostKvm::Hardware.preferred_mode(), ExecMode::Direct);
        assert_eq!(HostKvm::Absent.preferred_mode(), ExecMode::Nested);
    }

    #[test]
    fn a_flag_substring_is_not_a_flag() {
        // "svm_lock" must not count as "svm".
        let cpuinfo = "flags : fpu svm_lock vmxx\n";
        assert!(matches!(classify(true, false, cpuinfo), HostKvm::Pvm(_)));
    }
}
