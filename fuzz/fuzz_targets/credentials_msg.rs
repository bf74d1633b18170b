//! The credential messages between a holder and the gateway (issue 13,
//! `src/credentials/msg.rs`, docs/credentials.md) never panic on any input, and whatever a
//! decoder accepts survives a round trip: encoded again, it decodes to the same message.
//! Every input goes to all three decoders (a report, a command, a job update).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::credentials::msg::{JobUpdate, Report, ToDevice};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Report::decode(data) {
        let b = r.encode();
        let again = Report::decode(&b).expect("a re-encoded report decodes");
        assert_eq!(again, r, "report round trip");
    }
    if let Ok(c) = ToDevice::decode(data) {
        let b = c.encode();
        let again = ToDevice::decode(&b).expect("a re-encoded command decodes");
        assert_eq!(again, c, "command round trip");
        assert_eq!(again.job(), c.job());
    }
    if let Ok(u) = JobUpdate::decode(data) {
        let b = u.encode();
        let again = JobUpdate::decode(&b).expect("a re-encoded job update decodes");
        assert_eq!(again, u, "job update round trip");
    }
});
