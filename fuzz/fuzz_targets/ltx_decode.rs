#![no_main]

// See ferry::fuzzing::ltx_decode for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::ltx_decode(data));
