//! Issue 12, acceptance 4: the fleet. Four gateways (`outpost run` with `[can]` replaying
//! candump logs), the fleet server (`outpost cloud` with `[fleet]`) and a real Mosquitto
//! cloud broker, each gateway's uplink behind its own fault-injecting proxy:
//!
//! * A and B have network configuration `cfg-a`; C and D `cfg-b`. A's and C's body
//!   controller (the sender of 0x4d0) are of type `bcm-7`; D's is a `bcm-8`.
//! * 0x4d0 carries a payload that looks random (a MAC), so no profile constrains it. A sees
//!   it flooded (every 1 ms) with a fixed payload: a local incident. B sees the same payload
//!   sent at the genuine period, in place of the genuine ECU: its own profile finds nothing.
//! * The cloud alerts B (same configuration) and C (same ECU type), never D; it sends the
//!   configuration's rule set, derived from A's report, to A and B. B is offline all along
//!   and gets the rules and the alert when it reconnects.
//! * B is SIGKILLed after applying the rules; started again, it detects the masquerade with
//!   the fleet's rule.
mod cloud;
mod common;

use cloud::{tls_client_config, Cloud as Broker, CloudPki, CloudSubscriber, Fault, Proxy};
use common::can::{learn, masquerade, merged, normal_log};
use common::roles::{uplink_section, Cloud};
use common::Gateway;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const ATTACK: &str = "DEADBEEF00C0FFEE";

fn gateway_config(
    data: &Path,
    id: &str,
    uplink: &str,
    profile: &Path,
    log: &Path,
    config: &str,
    bcm: &str,
) -> String {
    let base = common::base_config(data, "")
        .replace("id = \"gw-test\"", &format!("id = \"{id}\""))
        .replace("[fdo]\n", "[fdo]\nenabled = false\n");
    format!(
        r#"{base}
[sync]
enabled = false

{uplink}

[can]
enabled = true
profile = "{}"
summary_every = "1s"
incident_quiet = "300ms"

[can.vehicle]
id = "VIN-{id}"
network_config = "{config}"
senders = {{ "0x4d0" = "BCM" }}
ecu_types = {{ BCM = "{bcm}" }}

[[can.interfaces]]
name = "can0"
log = "{}"
realtime = false
"#,
        profile.display(),
        log.display()
    )
}

fn all_logs(cloud: &Cloud, gws: &[Gateway]) -> String {
    let mut s = format!("--- cloud\n{}", cloud.log());
    for g in gws {
        s.push_str(&format!("\n--- {}\n{}", g.ep.gateway_id, g.log()));
    }
    s
}

/// The retained message on `topic` of a gateway's local broker, if any (stock mosquitto_sub).
fn retained(gw: &Gateway, topic: &str) -> Option<serde_json::Value> {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &gw.plain().port().to_string()])
        .args(["-i", "hmi", "-t", topic, "-C", "1", "-W", "2"])
        .output()
        .unwrap();
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).ok()
}

fn wait(what: &str, limit: Duration, logs: &dyn Fn() -> String, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < limit,
            "{what} not within {limit:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_attack_on_one_vehicle_alerts_its_configuration_and_ecu_type_and_teaches_the_offline_one() {
    common::require_mosquitto();
    let work = tempfile::tempdir().unwrap();
    let p = |n: &str| work.path().join(n);
    learn(&p("profile.json"));
    let t0 = 2_000_000_000u64;
    let normal = normal_log("can0", t0, 10);
    let flood: Vec<String> = (0..300u64)
        .map(|k| {
            let t = t0 + 5_000_000 + k * 1_000;
            format!("({}.{:06}) can0 4D0#{ATTACK}", t / 1_000_000, t % 1_000_000)
        })
        .collect();
    std::fs::write(p("a.log"), merged(&normal, &flood)).unwrap();
    std::fs::write(
        p("b.log"),
        masquerade(&normal, "4D0", t0 + 5_000_000, ATTACK),
    )
    .unwrap();
    std::fs::write(p("c.log"), &normal).unwrap();

    let mut pki = CloudPki::new(&p("pki"));
    let names = ["gw-a", "gw-b", "gw-c", "gw-d"];
    let creds: Vec<_> = names.iter().map(|n| pki.issue(n, false)).collect();
    let (cl_cert, cl_key) = pki.issue("cloud-test", false);
    let (app_cert, app_key) = pki.issue("cloud-app", false);
    let broker = Broker::start(&pki);
    let proxies: Vec<Proxy> = names
        .iter()
        .map(|_| Proxy::start(SocketAddr::from(([127, 0, 0, 1], broker.port))))
        .collect();

    let mut cloud = Cloud::prepare(&format!(
        "mqtt_servers = [\"mqtts://127.0.0.1:1\"]\n\n{}\n[sync]\nenabled = false\n\n[fleet]\nenabled = true\n",
        uplink_section(broker.port, &pki.ca, &cl_cert, &cl_key)
    ));
    cloud.start();

    // B first connects once (its cloud session exists), then goes offline before anything
    // happens; its first run sees the masquerade with no rules and finds nothing.
    let configs = [
        ("cfg-a", "bcm-7", "a.log"),
        ("cfg-a", "bcm-7", "b.log"),
        ("cfg-b", "bcm-7", "c.log"),
        ("cfg-b", "bcm-8", "c.log"),
    ];
    let mut gws: Vec<Gateway> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (config, bcm, log) = configs[i];
        let log = if i == 0 { p("quiet.log") } else { p(log) };
        if i == 0 {
            // A starts on normal traffic; the attack comes once everyone is connected.
            std::fs::write(&log, normal_log("can0", t0, 2)).unwrap();
        }
        let up = uplink_section(proxies[i].addr.port(), &pki.ca, &creds[i].0, &creds[i].1);
        let profile = p("profile.json");
        gws.push(Gateway::start_custom(|data| {
            gateway_config(data, name, &up, &profile, &log, config, bcm)
        }));
    }
    for g in &gws {
        wait(
            "uplink online",
            Duration::from_secs(20),
            &|| all_logs(&cloud, &gws),
            || g.metric("outpost_uplink_online") == 1,
        );
    }
    proxies[1].set(Fault::Blackhole);
    wait(
        "B offline",
        Duration::from_secs(20),
        &|| all_logs(&cloud, &gws),
        || gws[1].metric("outpost_uplink_online") == 0,
    );
    assert_eq!(
        gws[1].metric("outpost_can_incidents"),
        0,
        "B's profile alone finds nothing"
    );

    // The attack on A: restart it on the attack log.
    gws[0].signal("TERM");
    assert!(gws[0].wait(Duration::from_secs(10)).is_some());
    std::fs::copy(p("a.log"), p("quiet.log")).unwrap();
    gws[0].spawn();
    wait(
        "A's incident",
        Duration::from_secs(20),
        &|| all_logs(&cloud, &gws),
        || gws[0].metric("outpost_can_incidents") >= 1,
    );
    let a_alert = retained(&gws[0], "vehicle/can/alert").expect("A's local alert");
    assert_eq!(a_alert["id"], "0x4d0", "{a_alert}");

    // The cloud alerts C (same ECU type) and teaches A its configuration's rules.
    wait(
        "C's fleet alert",
        Duration::from_secs(30),
        &|| all_logs(&cloud, &gws),
        || gws[2].metric("outpost_can_fleet_alerts") >= 1,
    );
    let c_alert = retained(&gws[2], "vehicle/can/fleet-alert").expect("C's fleet alert");
    assert_eq!(c_alert["why"], "same-ecu-type", "{c_alert}");
    assert_eq!(c_alert["id"], "0x4d0");
    assert_eq!(c_alert["from_vehicle"], "VIN-gw-a");
    wait(
        "A's rules",
        Duration::from_secs(30),
        &|| all_logs(&cloud, &gws),
        || gws[0].metric("outpost_can_rules_applied") >= 1,
    );
    assert_eq!(
        gws[2].metric("outpost_can_rules_applied"),
        0,
        "C is of another configuration"
    );
    // D: neither the configuration nor the ECU type.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        gws[3].metric("outpost_can_fleet_alerts"),
        0,
        "{}",
        all_logs(&cloud, &gws)
    );
    assert_eq!(gws[3].metric("outpost_can_rules_applied"), 0);
    assert!(retained(&gws[3], "vehicle/can/fleet-alert").is_none());

    // B comes back: the alert queued for it and the retained rules arrive.
    proxies[1].set(Fault::Pass);
    wait(
        "B's rules and alert",
        Duration::from_secs(30),
        &|| all_logs(&cloud, &gws),
        || {
            gws[1].metric("outpost_can_rules_applied") >= 1
                && gws[1].metric("outpost_can_fleet_alerts") >= 1
        },
    );
    let b_alert = retained(&gws[1], "vehicle/can/fleet-alert").expect("B's fleet alert");
    assert_eq!(b_alert["why"], "same-network-config", "{b_alert}");

    // A malformed rule set from the cloud is refused with the reason, and the rules before
    // stay; a local client cannot change them at all.
    let applied = gws[1].metric("outpost_can_rules_applied");
    let app = CloudSubscriber::start(
        broker.port,
        tls_client_config(&pki.ca, &app_cert, &app_key),
        "cloud-app",
        "outpost/gw-b/can/rules-status",
    );
    app.publish(
        "outpost/gw-b/can/rules",
        r#"{"kind":"rules","rules_id":"evil-1","rules":[
            {"name":"x","id":"0x4d0","mask":"ff","value":"01","level":7}]}"#,
    );
    wait(
        "the refusal",
        Duration::from_secs(20),
        &|| all_logs(&cloud, &gws),
        || {
            app.received.lock().unwrap().iter().any(|(_, b)| {
                b.contains("\"refused\"") && b.contains("evil-1") && b.contains("rules[0].level")
            })
        },
    );
    assert_eq!(gws[1].metric("outpost_can_rules_refused"), 1);
    let local = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &gws[1].plain().port().to_string()])
        .args([
            "-i",
            "local-tamper",
            "-q",
            "1",
            "-t",
            "outpost/gw-b/can/rules",
        ])
        .args(["-m", r#"{"kind":"rules","rules_id":"local-1","rules":[]}"#])
        .output()
        .unwrap();
    println!("local publish: {:?}", local.status);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(gws[1].metric("outpost_can_rules_applied"), applied);

    // SIGKILL B; started again (same masquerade log) it detects with the fleet's rule.
    gws[1].signal("KILL");
    assert!(gws[1].wait(Duration::from_secs(5)).is_some());
    gws[1].spawn();
    wait(
        "B's incident by the rule",
        Duration::from_secs(20),
        &|| all_logs(&cloud, &gws),
        || gws[1].metric("outpost_can_incidents") >= 1,
    );
    let b_local = retained(&gws[1], "vehicle/can/alert").expect("B's local alert");
    assert_eq!(b_local["id"], "0x4d0", "{b_local}");
    assert!(
        b_local["reasons"]
            .as_array()
            .unwrap()
            .contains(&"fleet-rule".into()),
        "{b_local}"
    );
    assert!(
        !b_local["rules"].as_array().unwrap().is_empty(),
        "{b_local}"
    );
    assert!(
        gws[1].log().contains("fleet rules restored"),
        "{}",
        gws[1].log()
    );
    drop(broker);
}
