//! Fuzzes the job spec parsers (YAML and JSON) with arbitrary documents;
//! see `protocol::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| protocol::fuzzing::job_spec(data));
