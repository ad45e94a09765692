//! Nested-virtualization test harness.
//!
//! Runs a shell *scenario* where a real Linux guest can run on KVM: inside an
//! L1 Linux booted under QEMU TCG with emulated AMD SVM (which gives the L1 a
//! working `/dev/kvm`) when this host's KVM cannot run guests at speed, or
//! directly on the host when it has hardware KVM. Used by the end-to-end
//! tests (as a library) and by the README commands (as the `harness` CLI).

pub mod direct;
pub mod host;
pub mod initramfs;
pub mod l1;
pub mod ldd;
pub mod nested;
pub mod pump;
pub mod run;
pub mod scenario;

pub use host::{ExecMode, HostKvm};
pub use run::{HarnessError, run};
pub use scenario::{Asset, ModeChoice, Outcome, Scenario, Status};
