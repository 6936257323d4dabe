//! `snapvol_test_support::fuzzing::nbd_handshake`: see that function for the input and what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| snapvol_test_support::fuzzing::nbd_handshake(data));
