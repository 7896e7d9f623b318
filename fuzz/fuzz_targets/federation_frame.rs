//! Fuzz target `federation_frame`: see fuzz/decoders.rs for what it decodes.
#![no_main]
use libfuzzer_sys::fuzz_target;

include!("../decoders.rs");

fuzz_target!(|data: &[u8]| decode_all("federation_frame", data));
