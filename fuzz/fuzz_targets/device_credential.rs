//! Device credential decoding never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::fdo_wire::DeviceCredential;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = DeviceCredential::decode(data) {
        let _ = DeviceCredential::decode(&c.encode()).expect("re-encoded credential decodes");
    }
});
