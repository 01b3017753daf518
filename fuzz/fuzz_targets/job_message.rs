#![no_main]

// See ferry::fuzzing::job_message for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::job_message(data));
