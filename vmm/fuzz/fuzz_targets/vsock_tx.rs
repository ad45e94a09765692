//! Fuzzes the virtio-vsock TX path: packets parsed from arbitrary
//! descriptor chains and handed to the host-side muxer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::fuzz_vsock_tx(data);
});
