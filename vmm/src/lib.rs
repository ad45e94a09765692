//! The Kindling virtual machine monitor: boots a Linux guest on KVM with a
//! small set of virtio-mmio devices. It knows nothing of CI jobs.

pub mod arch;
pub mod memory;
pub mod smoke;
