//! Issue 12 on the host: `outpost run` with `[can]` reading candump logs through the same
//! pipeline as a bus (no kernel CAN here; `tests/can_vm.rs` does the real interface), a real
//! Mosquitto cloud behind the tests' proxy, stock `mosquitto_sub` as the vehicle's HMI.
mod cloud;
mod common;

use cloud::{tls_client_config, Cloud, CloudPki, CloudSubscriber, Fault, Proxy};
use common::can::{learn, merged, normal_log};
use common::Gateway;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// 0x1a0 spoofed every 1 ms for 300 ms from `t0_us`, with its constant byte broken.
fn spoofing(t0_us: u64) -> Vec<String> {
    (0..300u64)
        .map(|k| {
            let t = t0_us + k * 1_000;
            format!(
                "({}.{:06}) can0 1A0#00{:02X}FF0000000000",
                t / 1_000_000,
                t % 1_000_000,
                k % 16
            )
        })
        .collect()
}

/// The retained message on `topic` of the gateway's local broker (stock mosquitto_sub).
fn retained(gw: &Gateway, topic: &str) -> serde_json::Value {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &gw.plain().port().to_string()])
        .args(["-i", "hmi", "-t", topic, "-C", "1", "-W", "5"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("no retained JSON on {topic} ({e}): {text:?}"))
}

fn can_section(profile: &Path, log: &Path, extra: &str) -> String {
    format!(
        r#"
[can]
enabled = true
profile = "{}"
summary_every = "1s"
incident_quiet = "300ms"
{extra}
[can.vehicle]
id = "VIN-A"
network_config = "cfg-a"
senders = {{ "0x1a0" = "ABS" }}
ecu_types = {{ ABS = "abs-9.3" }}

[[can.safety]]
ids = ["0x1a0"]
action = "slow-down"
topic = "vehicle/control/speed"

[[can.interfaces]]
name = "can0"
log = "{}"
realtime = false
"#,
        profile.display(),
        log.display()
    )
}

#[test]
fn an_attack_during_an_outage_alerts_the_hmi_at_once_and_reaches_the_cloud_after_a_sigkill() {
    common::require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    learn(&p("profile.json"));
    let t0 = 2_000_000_000;
    let normal = normal_log("can0", t0, 20);
    std::fs::write(p("attack.log"), merged(&normal, &spoofing(t0 + 10_000_000))).unwrap();

    let mut pki = CloudPki::new(&p("cloud"));
    let (gw_cert, gw_key) = pki.issue("gw-test", false);
    pki.issue("cloud-app", false);
    let cloud = Cloud::start(&pki);
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], cloud.port)));
    proxy.set(Fault::Blackhole);
    let cfg = format!(
        "[uplink]\nenabled = true\nhost = \"127.0.0.1\"\nport = {}\nca_file = \"{}\"\n\
         cert_file = \"{}\"\nkey_file = \"{}\"\n{}",
        proxy.addr.port(),
        pki.ca.display(),
        gw_cert.display(),
        gw_key.display(),
        can_section(&p("profile.json"), &p("attack.log"), "")
    );
    let tls = tls_client_config(
        &pki.ca,
        &pki.dir.join("cloud-app.crt"),
        &pki.dir.join("cloud-app.key"),
    );
    let sub = CloudSubscriber::start(cloud.port, tls, "cloud-app", "outpost/gw-test/can/#");
    let mut gw = Gateway::start_with(&cfg);

    // Offline: the HMI has the alert at once, the instruction went to the vehicle function,
    // and the reports wait in the durable queue.
    common::wait_metric(&gw, "outpost_can_reports", Duration::from_secs(20), |n| {
        n >= 2
    });
    let alert = retained(&gw, "vehicle/can/alert");
    assert_eq!(alert["id"], "0x1a0", "{alert}");
    assert_eq!(alert["vehicle"], "VIN-A");
    assert_eq!(
        (&alert["sender"], &alert["ecu_type"]),
        (&"ABS".into(), &"abs-9.3".into())
    );
    assert!(alert["frames"].as_u64().unwrap() >= 290, "{alert}");
    assert!(alert["reasons"]
        .as_array()
        .unwrap()
        .contains(&"constant-bits".into()));
    assert_eq!(alert["actions"], serde_json::json!(["slow-down"]));
    assert_eq!(gw.metric("outpost_can_safety_actions"), 1);
    assert_eq!(gw.metric("outpost_uplink_online"), 0);
    common::wait_metric(&gw, "outpost_can_summaries", Duration::from_secs(5), |n| {
        n >= 1
    });
    common::wait_metric(
        &gw,
        "outpost_uplink_queue_depth",
        Duration::from_secs(5),
        |n| n >= 3,
    );
    assert_eq!(sub.count(), 0, "nothing reaches the cloud while offline");

    // SIGKILL with the reports queued; the next start replays a normal log only.
    gw.signal("KILL");
    assert!(gw.wait(Duration::from_secs(5)).is_some());
    std::fs::write(p("attack.log"), normal_log("can0", t0 + 60_000_000, 5)).unwrap();
    gw.spawn();
    proxy.set(Fault::Pass);
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let got = sub.received.lock().unwrap().clone();
        let open = got.iter().find_map(|(t, body)| {
            let v: serde_json::Value = serde_json::from_str(body).ok()?;
            (t == "outpost/gw-test/can/report" && v["state"] == "open").then_some(v)
        });
        let summaries = got
            .iter()
            .filter(|(t, _)| t == "outpost/gw-test/can/summary")
            .count();
        if let (Some(r), true) = (open, summaries > 0) {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the cloud got {got:?}\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(report["id"], "0x1a0");
    assert_eq!(report["network_config"], "cfg-a");
    assert_eq!(report["before"].as_array().unwrap().len(), 8, "{report}");
    assert_eq!(report["after"].as_array().unwrap().len(), 8, "{report}");
    let first_attack = format!(
        "({}.{:06}) can0 1A0#0000FF0000000000",
        t0 / 1_000_000 + 10,
        0
    );
    assert_eq!(report["frame"], first_attack.as_str(), "{report}");
    // And the summary of the first run, made before the kill, describes the bus per id.
    let got = sub.received.lock().unwrap().clone();
    let summary: serde_json::Value = got
        .iter()
        .filter(|(t, _)| t == "outpost/gw-test/can/summary")
        .filter_map(|(_, b)| serde_json::from_str::<serde_json::Value>(b).ok())
        .find(|s| s["ids"]["0x1a0"]["anomalous"].as_u64().unwrap_or(0) > 0)
        .unwrap_or_else(|| panic!("no summary with the attack: {got:?}"));
    assert_eq!(summary["vehicle"], "VIN-A");
    assert!(
        summary["ids"]["0x2b0"]["n"].as_u64().unwrap() > 0,
        "{summary}"
    );
    drop(cloud);
}

#[test]
fn bad_log_lines_error_floods_and_bus_off_are_counted_and_nothing_stops() {
    common::require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    learn(&p("profile.json"));
    let t0 = 2_000_000_000u64;
    let at = |us: u64| {
        format!(
            "({}.{:06}) can0",
            (t0 + us) / 1_000_000,
            (t0 + us) % 1_000_000
        )
    };
    let mut extra = vec![
        format!("{} 1A0#A5", at(1_000_001)).replace("#A5", "#A"), // odd hex digits
        format!("{} 1A0#GG", at(1_000_002)),                      // not hex
        format!("{} 1A0#001122334455667788", at(1_000_003)),      // 9 bytes: no such DLC
        format!("{} 1A0##", at(1_000_004)),                       // FD without flags digit
        format!("{} 1A0#R9", at(1_000_005)),                      // remote DLC 9
        "(garbage".to_string(),
        "(1.0) can0".to_string(), // truncated
        "x".repeat(2000),         // overlong
    ];
    let bad = extra.len() as i64;
    // An error-frame flood, one bus-off, one restart.
    for k in 0..5000 {
        extra.push(format!(
            "{} 20000004#0000080000000000",
            at(2_000_000 + k * 100)
        ));
    }
    extra.push(format!("{} 20000040#0000000000000000", at(2_600_000)));
    extra.push(format!("{} 20000100#0000000000000000", at(2_700_000)));
    extra.extend(spoofing(t0 + 4_000_000));
    std::fs::write(p("bad.log"), merged(&normal_log("can0", t0, 8), &extra)).unwrap();
    let mut gw = Gateway::start_with(&can_section(&p("profile.json"), &p("bad.log"), ""));
    common::wait_metric(&gw, "outpost_can_incidents", Duration::from_secs(20), |n| {
        n >= 1
    });
    common::wait_metric(
        &gw,
        "outpost_can_error_frames",
        Duration::from_secs(20),
        |n| n == 5002,
    );
    assert_eq!(gw.metric("outpost_can_skipped_lines"), bad);
    assert_eq!(gw.metric("outpost_can_bus_off"), 1);
    assert_eq!(gw.metric("outpost_can_restarts"), 1);
    // 8 s of normal traffic (800 + 400 + 160 + 80) and the 300 spoofed frames.
    assert_eq!(gw.metric("outpost_can_frames"), 1740);
    let log = gw.log();
    assert!(log.contains("CAN controller bus-off"), "{log}");
    assert!(log.contains("log lines skipped"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    // The gateway still serves MQTT, and stops cleanly.
    let status = retained(&gw, "vehicle/can/status");
    assert_eq!(status["buses"][0]["reason"], "replay ended", "{status}");
    gw.signal("TERM");
    let st = gw.wait(Duration::from_secs(10)).expect("exits");
    assert!(st.success(), "{st}\n{}", gw.log());
}

#[test]
fn a_missing_profile_or_interface_list_stops_the_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &str| {
        let cfg = dir.path().join("gw.toml");
        std::fs::write(&cfg, common::base_config(&dir.path().join("data"), extra)).unwrap();
        Command::new(common::BIN)
            .args(["run", "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let out = run("[can]\nenabled = true\nprofile = \"p.json\"\n");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("can.interfaces"));
    let out = run("[can]\nenabled = true\nprofile = \"/nonexistent/p.json\"\n[[can.interfaces]]\nname = \"can0\"\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAN profile /nonexistent/p.json"), "{err}");
    assert!(
        !dir.path()
            .join("data")
            .join(outpost::ENDPOINTS_FILE)
            .exists(),
        "nothing was started"
    );
}
