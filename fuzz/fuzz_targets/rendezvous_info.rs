//! RendezvousInfo decoding and every typed accessor never panic; decoding is stable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::fdo_wire::RendezvousInfo;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = RendezvousInfo::decode(data) {
        for d in &info.0 {
            let _ = d.dns();
            let _ = d.ip();
            let _ = d.dev_port();
            let _ = d.owner_port();
            let _ = d.protocol();
            let _ = d.delay_secs();
            let _ = d.device_endpoint();
            let _ = d.to_string();
        }
        let again = RendezvousInfo::decode(&info.encode()).expect("re-encoded info decodes");
        assert_eq!(again, info);
    }
});
