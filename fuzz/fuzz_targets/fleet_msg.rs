//! The fleet server's message parser (issue 12, `docs/can-fleet.md`) never panics on any
//! input, and whatever it accepts goes through the fleet state without a panic and comes out
//! as well-formed JSON. The first byte picks the message kind, the rest is the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::fleet::assess::{Fleet, Out};
use outpost::fleet::msg::{parse, topic_kind, Incoming, Kind};
use outpost::fleet::FleetConfig;

fuzz_target!(|data: &[u8]| {
    let Some((&k, payload)) = data.split_first() else {
        return;
    };
    if let Ok(s) = std::str::from_utf8(payload) {
        let _ = topic_kind(s);
    }
    let kind = Kind::ALL[usize::from(k) % Kind::ALL.len()];
    let Ok(m) = parse(kind, payload) else {
        return;
    };
    let mut f = Fleet::new(FleetConfig::default());
    let now = 1_796_346_000_000;
    // A second vehicle of the same configuration, so that reports have a target.
    let cfg = match &m {
        Incoming::Vehicle(v) => v.network_config.clone(),
        Incoming::Report(r) => r.network_config.clone(),
        Incoming::Summary(s) => s.network_config.clone(),
        _ => "cfg".into(),
    };
    let _ = f.on_vehicle(
        "peer",
        outpost::fleet::msg::VehicleMsg {
            vehicle: "peer".into(),
            network_config: cfg,
            ecus: Default::default(),
            senders: Default::default(),
            rules_id: None,
        },
        now,
    );
    let outs = match m {
        Incoming::Vehicle(v) => f.on_vehicle("gw", v, now),
        Incoming::Summary(s) => {
            f.on_summary("gw", s, now);
            Vec::new()
        }
        Incoming::Report(r) => f.on_report("gw", r.clone(), now).outs,
        Incoming::KeyUpdate(k) => f.on_key_update("gw", k, now),
        Incoming::RulesStatus(s) => {
            f.on_rules_status("gw", s);
            Vec::new()
        }
    };
    for o in outs {
        let bytes = match o {
            Out::Rules { set, .. } => {
                assert!(set.rules.len() <= 256);
                set.message()
            }
            Out::Down { msg, .. } => serde_json::to_vec(&msg).expect("serializes"),
        };
        let _: serde_json::Value = serde_json::from_slice(&bytes).expect("well-formed JSON");
    }
    f.tick(now + 86_400_000);
});
