//! Architecture-specific vCPU and guest-memory setup.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
