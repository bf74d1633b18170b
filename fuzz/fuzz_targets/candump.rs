//! The candump log reader (issue 12) never panics on any input, holds at most one bounded
//! line, and every frame it reads formats back to a line it reads as the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::can::candump::{format_line, parse_line, Reader};

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    for l in r.by_ref() {
        let Ok(l) = l else { break };
        let line = format_line(&l.iface, &l.frame);
        let again = parse_line(&line).expect("a formatted frame parses");
        assert_eq!(again, l);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_line(s);
    }
});
