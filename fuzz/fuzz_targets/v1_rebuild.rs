#![no_main]

// See ferry::fuzzing::v1_rebuild for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::v1_rebuild(data));
