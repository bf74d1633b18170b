//! COSE_Sign1 decoding never panics; what decodes re-encodes and verifies without panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::fdo_wire::cose::{self, Tagging};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = cose::decode(data, 64 * 1024, Tagging::Optional, "fuzz") {
        let _ = cose::declared_alg(&s);
        if let Ok(bytes) = cose::encode(&s, true) {
            let _ = cose::decode(&bytes, 64 * 1024, Tagging::Required, "fuzz");
        }
    }
});
