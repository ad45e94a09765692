//! The Kindling virtual machine monitor: boots a Linux guest on KVM with a
//! small set of virtio-mmio devices. It knows nothing of CI jobs.
