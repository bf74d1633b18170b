//! The fleet server (`outpost cloud` with `[fleet]`, issue 12 acceptance 4, cloud side)
//! against a real Mosquitto cloud broker with TLS, and four fake vehicles that publish the
//! gateway messages of `docs/can-fleet.md` with rumqttc: A and B of `cfg-a`, C of `cfg-b`
//! with an ECU of the same type as A's attacked sender, D of `cfg-b` without.

mod cloud;
mod common;

use cloud::{tls_client_config, Cloud as Broker, CloudPki, CloudSubscriber};
use common::roles::{uplink_section, Cloud};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const T0: f64 = 1_796_345_994.073_074;

struct Vehicle {
    gw: String,
    sub: CloudSubscriber,
}

impl Vehicle {
    /// Connects as `gw` and subscribes to everything of its own (`outpost/{gw}/can/#`).
    fn start(pki: &mut CloudPki, port: u16, gw: &str) -> Vehicle {
        let (c, k) = pki.issue(gw, false);
        let tls = tls_client_config(&pki.ca, &c, &k);
        let sub = CloudSubscriber::start(port, tls, gw, &format!("outpost/{gw}/can/#"));
        Vehicle { gw: gw.into(), sub }
    }

    fn send(&self, kind: &str, v: &Value) {
        self.sub
            .publish(&format!("outpost/{}/can/{kind}", self.gw), &v.to_string());
    }

    fn send_raw(&self, kind: &str, text: &str) {
        self.sub
            .publish(&format!("outpost/{}/can/{kind}", self.gw), text);
    }

    /// What the cloud sent to this vehicle on `kind` (`rules` or `down`).
    fn got(&self, kind: &str) -> Vec<Value> {
        let topic = format!("outpost/{}/can/{kind}", self.gw);
        self.sub
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, p)| serde_json::from_str(p).expect("the cloud sends JSON"))
            .collect()
    }

    fn alerts(&self) -> Vec<Value> {
        self.got("down")
            .into_iter()
            .filter(|m| m["kind"] == "alert")
            .collect()
    }

    fn wait_alert(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            if let Some(a) = self.alerts().into_iter().find(&f) {
                return a;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{}: no alert {what}; got {:?}",
                self.gw,
                self.got("down")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn instructions(v: &Vehicle) -> usize {
    v.got("down")
        .iter()
        .filter(|m| m["action"] == "slow-down")
        .count()
}

fn vehicle_msg(gw: &str, config: &str, ecus: Value, senders: Value) -> Value {
    json!({"vehicle": format!("VIN-{gw}"), "network_config": config, "gateway": gw,
           "ecus": ecus, "senders": senders, "rules_id": null})
}

fn report(gw: &str, state: &str, id: &str, ts: f64) -> Value {
    json!({"incident": format!("can0-{gw}-{id}"), "state": state,
        "vehicle": format!("VIN-{gw}"), "network_config": "cfg-a", "gateway": gw,
        "interface": "can0", "id": id, "ids": [id], "sender": "ABS", "ecu_type": "abs-9.3",
        "first_ts": ts, "last_ts": ts + 0.5, "frames": 300, "level": 0.96, "max_level": 1.0,
        "reasons": ["early", "constant-bits"], "rules": [],
        "payload": {"len": 8, "and": "0000ff0000000000", "or": "000fff0000000000"},
        "rate_hz": 1000.0, "frame": "(1796345994.073074) can0 1A0#0000FF0000000000",
        "actions": ["slow-down"], "before": ["(1796345994.063074) can0 1A0#A5055A0000000000"],
        "after": []})
}

fn summary(gw: &str, config: &str) -> Value {
    json!({"vehicle": format!("VIN-{gw}"), "network_config": config, "gateway": gw,
        "interface": "can0", "from_ms": 1_796_345_990_000u64, "to_ms": 1_796_346_000_000u64,
        "up": true, "frames": 1450, "error_frames": 0, "open_incidents": 0, "other_ids_frames": 0,
        "ids": {"0x1a0": {"n": 1000, "anomalous": 0, "suspect": 0, "max_level": 0.1,
                          "gap_us": {"min": 9701, "mean": 10000, "max": 10299},
                          "and": "a500500000000000", "or": "a50f7f0000000000"},
                "0x2c0": {"n": 500, "anomalous": 0, "suspect": 0, "max_level": 0.0,
                          "gap_us": {"min": 19500, "mean": 20000, "max": 20500},
                          "and": "0000", "or": "ffff"}}})
}

fn wait_log(cloud: &Cloud, what: &str, n: usize) {
    let t0 = Instant::now();
    while cloud.log().matches(what).count() < n {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "cloud log: {n} × {what:?} not within 20 s:\n{}",
            cloud.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn report_alerts_same_config_and_same_ecu_type_escalates_survives_garbage_and_restart() {
    common::require_mosquitto();
    let t_start = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let mut pki = CloudPki::new(&work.path().join("pki"));
    let (cl_cert, cl_key) = pki.issue("cloud-test", false);
    let broker = Broker::start(&pki);
    let mut cloud = Cloud::prepare(&format!(
        "mqtt_servers = [\"mqtts://127.0.0.1:8883\"]\n\n{}\n[sync]\nenabled = false\n\n[fleet]\nenabled = true\n\n[[fleet.instructions]]\nnetwork_config = \"cfg-a\"\nids = [\"0x1a0\"]\naction = \"slow-down\"\n",
        uplink_section(broker.port, &pki.ca, &cl_cert, &cl_key)
    ));
    cloud.start();
    wait_log(&cloud, "fleet: connected to the cloud broker", 1);

    let a = Vehicle::start(&mut pki, broker.port, "gw-a");
    let b = Vehicle::start(&mut pki, broker.port, "gw-b");
    let c = Vehicle::start(&mut pki, broker.port, "gw-c");
    let d = Vehicle::start(&mut pki, broker.port, "gw-d");
    a.send(
        "vehicle",
        &vehicle_msg(
            "gw-a",
            "cfg-a",
            json!({"ABS": "abs-9.3"}),
            json!({"0x1a0": "ABS"}),
        ),
    );
    b.send(
        "vehicle",
        &vehicle_msg(
            "gw-b",
            "cfg-a",
            json!({"ABS": "abs-9.3"}),
            json!({"0x1a0": "ABS"}),
        ),
    );
    c.send(
        "vehicle",
        &vehicle_msg(
            "gw-c",
            "cfg-b",
            json!({"BRK": "abs-9.3"}),
            json!({"0x120": "BRK"}),
        ),
    );
    d.send(
        "vehicle",
        &vehicle_msg(
            "gw-d",
            "cfg-b",
            json!({"EPS": "eps-2.1"}),
            json!({"0x130": "EPS"}),
        ),
    );
    b.send("summary", &summary("gw-b", "cfg-a"));
    wait_log(&cloud, "fleet: vehicle", 4);

    // A report from A: B (same configuration) and C (same ECU type) are alerted, D is not.
    a.send("report", &report("gw-a", "open", "0x1a0", T0));
    let to_b = b.wait_alert("from A", |m| m["from_vehicle"] == "VIN-gw-a");
    assert_eq!(to_b["why"], "same-network-config");
    assert_eq!(to_b["vehicles"], 1);
    assert_eq!(to_b["severity"], "watch");
    assert_eq!(to_b["id"], "0x1a0");
    assert_eq!(to_b["sender"], "ABS");
    assert_eq!(to_b["network_config"], "cfg-a");
    assert!(to_b["message"].as_str().unwrap().contains("watch"));
    let to_c = c.wait_alert("from A", |m| m["from_vehicle"] == "VIN-gw-a");
    assert_eq!(to_c["why"], "same-ecu-type");
    assert_eq!(to_c["ecu_type"], "abs-9.3");
    assert_eq!(to_c["vehicles"], 1);
    // The reporter gets the rule set on its retained topic.
    let t0 = Instant::now();
    while a.got("rules").is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "A got no rules");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rules = &a.got("rules")[0];
    assert_eq!(rules["kind"], "rules");
    assert_eq!(rules["rules_id"], "cfg-a-1");
    assert_eq!(rules["network_config"], "cfg-a");
    assert_eq!(
        rules["rules"],
        json!([{"name": "fleet-1", "id": "0x1a0", "mask": "fff0ffffffffffff",
                "value": "0000ff0000000000", "level": 0.9}])
    );

    // The configured instruction for 0x1a0 of cfg-a goes to A and B (once each), not C or D.
    for v in [&a, &b] {
        let t0 = Instant::now();
        while !v.got("down").iter().any(|m| m["kind"] == "instruction") {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{}: no instruction",
                v.gw
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let i = v
            .got("down")
            .into_iter()
            .find(|m| m["kind"] == "instruction")
            .unwrap();
        assert_eq!(i["action"], "slow-down");
        assert_eq!(i["id"], "0x1a0");
        assert_eq!(i["incident"], "can0-gw-a-0x1a0");
    }

    // A SecOC id attacked on A: every vehicle of cfg-a gets a key update.
    a.send(
        "key-update",
        &json!({"action": "key-update", "id": "0x2b0", "incident": "can0-gw-a-0x2b0",
                "vehicle": "VIN-gw-a", "level": 1.0, "reasons": ["length"], "ts": T0}),
    );
    for v in [&a, &b] {
        let t0 = Instant::now();
        while !v
            .got("down")
            .iter()
            .any(|m| m["action"] == "key-update" && m["id"] == "0x2b0")
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{}: no key update",
                v.gw
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // B subscribes to its rules topic only now: the retained set is there.
    let (bc, bk) = pki.issue("gw-b-late", false);
    let late = CloudSubscriber::start(
        broker.port,
        tls_client_config(&pki.ca, &bc, &bk),
        "gw-b-late",
        "outpost/gw-b/can/rules",
    );
    let t0 = Instant::now();
    while late.count() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no retained rules for B"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let retained: Value = serde_json::from_str(&late.received.lock().unwrap()[0].1).unwrap();
    assert_eq!(retained, *rules);

    // Garbage from a peer is counted and survived.
    d.send_raw("report", "{not json");
    d.send_raw("summary", "\u{0}\u{1}");
    d.send_raw(
        "vehicle",
        &format!("{{\"vehicle\": \"{}\"}}", "x".repeat(600 * 1024)),
    );
    d.send_raw(
        "report",
        r#"{"incident":"i","state":"open","vehicle":"v","network_config":"cfg-b","id":"0x9999"}"#,
    );
    wait_log(&cloud, "fleet: dropping a malformed message", 1);

    // B reports the same id within the window: escalated, severity and count rise.
    b.send("report", &report("gw-b", "open", "0x1a0", T0 + 2.0));
    let up_c = c.wait_alert("escalated", |m| m["vehicles"] == 2);
    assert_eq!(up_c["severity"], "warning");
    assert_eq!(up_c["from_vehicle"], "VIN-gw-b");
    let to_a = a.wait_alert("escalated", |m| m["vehicles"] == 2);
    assert_eq!(to_a["why"], "same-network-config");
    assert_eq!(to_a["severity"], "warning");

    // D heard nothing at all; C got no rules (another configuration).
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.got("down").is_empty(), "D: {:?}", d.got("down"));
    assert!(d.got("rules").is_empty());
    assert!(c.got("rules").is_empty());
    assert_eq!(
        c.alerts().len(),
        2,
        "one alert per severity: {:?}",
        c.alerts()
    );
    assert!(c.got("down").iter().all(|m| m["kind"] == "alert"));
    assert_eq!(
        (instructions(&a), instructions(&b)),
        (1, 1),
        "once per incident"
    );

    // SIGKILL and restart: the vehicles, the rule set (and its counter) and the dedupe are kept.
    cloud.kill();
    cloud.start();
    wait_log(&cloud, "fleet: connected to the cloud broker", 2);
    // An update of B's incident at the same severity alerts nobody again.
    b.send("report", &report("gw-b", "update", "0x1a0", T0 + 3.0));
    // A new vehicle of cfg-a announcing itself gets the stored set.
    let e = Vehicle::start(&mut pki, broker.port, "gw-e");
    e.send(
        "vehicle",
        &vehicle_msg("gw-e", "cfg-a", json!({}), json!({})),
    );
    // A report on another id: the set grows to cfg-a-2 with both rules.
    a.send("report", &{
        let mut r = report("gw-a", "open", "0x2c0", T0 + 4.0);
        r["payload"] = json!({"len": 2, "and": "0000", "or": "ffff"});
        r
    });
    let t0 = Instant::now();
    while !a.got("rules").iter().any(|r| r["rules_id"] == "cfg-a-2") {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no cfg-a-2 after the restart: {:?}\n{}",
            a.got("rules"),
            cloud.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let set2 = a
        .got("rules")
        .into_iter()
        .find(|r| r["rules_id"] == "cfg-a-2")
        .unwrap();
    let names: Vec<&str> = set2["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fleet-1", "fleet-2"]);
    // 0x2c0's payload has no constant bits: a rate limit from the fleet's normal rate
    // (floor(100 ms / 19.5 ms) + 1 = 6 per 100 ms, × 1.5 → 9, + 1).
    assert_eq!(set2["rules"][1]["window_ms"], 100);
    assert_eq!(set2["rules"][1]["max_frames"], 10);
    let t0 = Instant::now();
    while !e
        .got("rules")
        .iter()
        .any(|r| r["rules_id"].as_str().unwrap_or("").starts_with("cfg-a-"))
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "E got no rules");
        std::thread::sleep(Duration::from_millis(20));
    }
    let to_c2 = c.wait_alert("0x2c0", |m| m["id"] == "0x2c0");
    assert_eq!(to_c2["vehicles"], 1);
    assert_eq!(
        c.alerts().iter().filter(|m| m["id"] == "0x1a0").count(),
        2,
        "no repeated alert after the restart: {:?}",
        c.alerts()
    );
    assert_eq!(
        (instructions(&a), instructions(&b)),
        (1, 1),
        "instruction dedupe kept across the restart"
    );
    println!("fleet scenario took {:?}", t_start.elapsed());
}
