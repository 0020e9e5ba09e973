#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| trustmig_protocol::fuzzing::vm_history(data));
