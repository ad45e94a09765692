//! Fuzzes the virtio-net TX path: virtio-net headers and frames parsed from
//! arbitrary descriptor chains, checked against the negotiated offloads and
//! handed to a stand-in for the tap.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::fuzz_net_tx(data);
});
