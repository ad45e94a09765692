//! Fuzzes the virtio-blk request path: descriptor chains from arbitrary
//! bytes, served by a real `Block` on a scratch file.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::fuzz_block_queue(data);
});
