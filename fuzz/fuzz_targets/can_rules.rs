//! The fleet rule document (issue 12, docs/can-fleet.md) never panics on any input; a set
//! that passes its checks serialises to a document that passes them again, and grading any
//! frame by it stays within its levels.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::can::frame::{Frame, Kind};
use outpost::can::rules::Rules;

fuzz_target!(|data: &[u8]| {
    let Ok(mut rules) = Rules::parse(data) else {
        return;
    };
    let again = serde_json::to_vec(&rules.set).expect("a checked set serialises");
    let back = Rules::parse(&again).expect("a checked set checks again");
    assert_eq!(back.set, rules.set);
    let ids: Vec<String> = rules.set.rules.iter().map(|r| r.id.clone()).collect();
    for (k, id) in ids.iter().enumerate() {
        let Some(can_id) = outpost::can::rules::parse_rule_id(id) else {
            panic!("a checked rule has an id: {id}");
        };
        let extended = can_id & outpost::can::frame::CAN_EFF_FLAG != 0;
        let bare = can_id & outpost::can::frame::CAN_EFF_MASK;
        let payload: Vec<u8> = data.iter().copied().cycle().skip(k).take(8).collect();
        let f = Frame::new(k as u64 * 100, bare, extended, Kind::Data { raw_dlc: None }, &payload)
            .expect("a valid frame");
        if let Some((level, _)) = rules.grade(&f) {
            assert!(level > 0.0 && level <= 1.0);
        }
    }
});
