#![no_main]

// See ferry::fuzzing::head_decode for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::head_decode(data));
