//! The Kindling virtual machine monitor: boots a Linux guest on KVM with a
//! small set of virtio-mmio devices. It knows nothing of CI jobs.
//!
//! Layers, bottom up: [`arch`] (CPU and boot-structure setup), [`memory`]
//! and [`vm`] (KVM VM and guest RAM), [`loader`] (kernel image and boot
//! information), [`devices`] (emulated hardware on port-I/O and MMIO
//! buses), [`vcpu`] (vCPU threads), [`machine`] (all of it assembled from a
//! [`config::VmConfig`]), [`lifecycle`] (why and how the VM stops).

pub mod arch;
pub mod cli;
pub mod config;
pub mod devices;
pub mod entry;
pub mod event_loop;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod lifecycle;
pub mod loader;
pub mod log_limit;
pub mod logger;
pub mod machine;
pub mod memory;
pub mod panic_hook;
pub mod rate_limiter;
pub mod seccomp;
pub mod smoke;
#[cfg(any(test, feature = "test-hooks"))]
pub mod test_hooks;
pub mod vcpu;
pub mod vm;
