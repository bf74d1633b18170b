//! The DBC parser (issue 12) never panics on any input, and every signal it returns has a
//! field that extracts from any 8-byte payload without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::can::dbc::parse;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse(text) {
        assert!(!d.messages.is_empty());
        for m in &d.messages {
            assert!(m.id <= 0x1fff_ffff);
            for s in &m.signals {
                if let Some(f) = s.field {
                    let _ = f.raw(&[0xa5; 8]);
                    let _ = f.cleared(&[0x5a; 8]);
                }
            }
        }
    }
});
