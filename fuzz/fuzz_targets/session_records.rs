//! The sessions capability's on-disk records (issue 11) never panic when decoded, whatever a
//! damaged store holds, and what decodes re-encodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::sessions::record::{parse_queue_key, Queued, RetainedRecord, SessionRecord};

fuzz_target!(|data: &[u8]| {
    if let Ok(q) = Queued::decode(data) {
        assert_eq!(Queued::decode(&q.encode()).as_ref(), Ok(&q));
    }
    if let Ok(r) = RetainedRecord::decode(data) {
        assert_eq!(RetainedRecord::decode(&r.encode()).as_ref(), Ok(&r));
    }
    if let Ok(s) = SessionRecord::decode(data) {
        assert_eq!(SessionRecord::decode(&s.encode()).as_ref(), Ok(&s));
    }
    let _ = parse_queue_key(data);
});
