//! Fuzzes the frame decoder with arbitrary byte streams (both directions,
//! split into chunks chosen by the first byte); see `protocol::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| protocol::fuzzing::frame_decoder(data));
