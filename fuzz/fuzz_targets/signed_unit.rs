//! Fuzz target `signed_unit`: see fuzz/decoders.rs for what it decodes.
#![no_main]
use libfuzzer_sys::fuzz_target;

include!("../decoders.rs");

fuzz_target!(|data: &[u8]| decode_all("signed_unit", data));
