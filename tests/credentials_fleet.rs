//! Issue 13 acceptance 3, fleet side: the cloud's fleet inventory (`outpost cloud`) and a
//! vehicle gateway over a real Mosquitto cloud broker with TLS. An ECU certificate the
//! cloud issued for vehicle A turns up in vehicle B: B decides offline, the cloud confirms
//! from B's signed check-in (revokes, records why, sends B the deletion), and forged
//! check-ins change nothing.

mod cloud;
mod common;

use cloud::{Cloud as Broker, CloudPki};
use common::roles::{uplink_section, Cloud};
use common::security_helpers::wait_until;
use common::{Creds, Gateway, BIN};
use outpost::credentials::fleet_msg::{self, Ecu, Up, VehicleReport};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

fn show(cloud: &Cloud, id: &str) -> serde_json::Value {
    serde_json::from_str(&cloud.cli(&["credentials", "show", id])).unwrap()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Publish `up` as `as_gw`'s client on `topic_gw`'s up topic.
fn publish_up(broker: &Broker, pki: &mut CloudPki, as_gw: &str, topic_gw: &str, up: &Up) {
    let (c, k) = pki.issue(as_gw, false);
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args(["--cafile", pki.ca.to_str().unwrap()])
        .args(["--cert", c.to_str().unwrap(), "--key", k.to_str().unwrap()])
        .args(["-i", &format!("{as_gw}-forger"), "-q", "1"])
        .args(["-t", &fleet_msg::up_topic(topic_gw)])
        .args(["-m", &String::from_utf8(up.encode()).unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn embedded_an_ecu_of_vehicle_a_in_vehicle_b_loses_its_certificate_and_forged_check_ins_change_nothing(
) {
    ecu_in_the_wrong_vehicle(String::new());
}

/// The same with the fleet inventory in PostgreSQL (`[cloud] database_url`).
#[test]
fn postgres_an_ecu_of_vehicle_a_in_vehicle_b_loses_its_certificate_and_forged_check_ins_change_nothing(
) {
    let pg = common::pg::shared();
    ecu_in_the_wrong_vehicle(pg.url(&pg.fresh_db()));
}

fn ecu_in_the_wrong_vehicle(database_url: String) {
    common::require_mosquitto();
    let work = tempfile::tempdir().unwrap();
    let mut pki = CloudPki::new(&work.path().join("pki"));
    let broker = Broker::start(&pki);
    let (cl_cert, cl_key) = pki.issue("cloud-test", false);
    let mut cloud = Cloud::prepare(&format!(
        "mqtt_servers = [\"mqtts://127.0.0.1:8883\"]\n\n{}\n[sync]\nenabled = false\n\n[cloud]\ngateway_ca = \"{}\"\ndatabase_url = \"{database_url}\"\n",
        uplink_section(broker.port, &pki.ca, &cl_cert, &cl_key),
        pki.ca.display()
    ));
    cloud.start();
    let store = if database_url.is_empty() {
        "embedded"
    } else {
        "postgresql"
    };
    assert!(
        cloud
            .log()
            .contains(&format!("fleet credential inventory open store={store}"))
            || common::strip_ansi(&cloud.log()).contains(&format!(
                "fleet credential inventory open store=\"{store}\""
            )),
        "{}",
        cloud.log()
    );
    wait_until(LIMIT, "cloud credentials link", || {
        cloud
            .log()
            .contains("credentials: connected to the cloud broker")
    });
    // The cloud issues the ECU's certificate for ECU ecu-7 in vehicle VIN-A.
    let ecu_dir = work.path().join("ecu-7");
    let out = cloud.cli(&[
        "ca",
        "issue-device",
        "--id",
        "ecu-7",
        "--out",
        ecu_dir.to_str().unwrap(),
    ]);
    let serial = out.split_whitespace().nth(3).unwrap().to_string();
    let id = format!("cert:{serial}");
    wait_until(LIMIT, "cloud inventory has it", || {
        Command::new(BIN)
            .args(["credentials", "show", &id, "--config"])
            .arg(&cloud.config_path)
            .output()
            .unwrap()
            .status
            .success()
    });
    cloud.cli(&[
        "credentials",
        "bind",
        &id,
        "--vehicle",
        "VIN-A",
        "--ecu",
        "ecu-7",
    ]);
    assert_eq!(show(&cloud, &id)["credential"]["vehicle"], "VIN-A");

    // Vehicle B's gateway, trusting the fleet (cloud) CA for client certificates.
    let (gw_cert, gw_key) = pki.issue("gw-test", false);
    let gw = Gateway::start_with(&format!(
        "{}\n[sync]\nenabled = false\n\n[credentials]\nvehicle = \"VIN-B\"\ninvalidate_grace = \"1s\"\n\n[tls]\nextra_client_cas = [\"{}\"]\n",
        uplink_section(broker.port, &pki.ca, &gw_cert, &gw_key),
        cloud.ca_cert().display()
    ));
    wait_until(LIMIT, "gateway online", || {
        gw.metric("outpost_uplink_online") == 1
    });

    // Forged check-ins first: none may bind, revoke or flag anything.
    let report = |gw_id: &str, vehicle: &str| VehicleReport {
        v: 1,
        gateway: gw_id.into(),
        vehicle: vehicle.into(),
        at: now(),
        ecus: vec![Ecu {
            ecu: "ecu-7".into(),
            serials: vec![serial.clone()],
        }],
    };
    let key = std::fs::read_to_string(&gw_key).unwrap();
    let cert = std::fs::read_to_string(&gw_cert).unwrap();
    let (evil_cert, evil_key) = pki.issue("gw-evil", false);
    let evil_key = std::fs::read_to_string(evil_key).unwrap();
    let evil_cert = std::fs::read_to_string(evil_cert).unwrap();
    // (1) gw-evil signs as itself but on gw-test's topic, for gw-test.
    let s = fleet_msg::sign(&report("gw-test", "VIN-B"), &evil_key, &evil_cert).unwrap();
    publish_up(&broker, &mut pki, "gw-evil", "gw-test", &Up::Vehicle(s));
    // (2) gw-test's certificate, another key.
    let mut s = fleet_msg::sign(&report("gw-test", "VIN-B"), &evil_key, &cert).unwrap();
    publish_up(
        &broker,
        &mut pki,
        "gw-evil",
        "gw-test",
        &Up::Vehicle(s.clone()),
    );
    // (3) a valid signature, the report changed after signing.
    let good = fleet_msg::sign(&report("gw-test", "VIN-B"), &key, &cert).unwrap();
    s = good.clone();
    s.report = s.report.replace("VIN-B", "VIN-C");
    publish_up(&broker, &mut pki, "gw-evil", "gw-test", &Up::Vehicle(s));
    wait_until(LIMIT, "three refusals logged", || {
        cloud.log().matches("vehicle check-in refused").count() >= 3
    });
    let d = show(&cloud, &id);
    assert!(d["credential"]["revoked_at"].is_null(), "{d:#}");
    assert!(
        d["credential"]["audit"].as_array().unwrap().is_empty(),
        "{d:#}"
    );

    // The ECU turns up in vehicle B.
    let ecu = Creds {
        id: "ecu-7".into(),
        cert: ecu_dir.join("ecu-7.crt"),
        key: ecu_dir.join("ecu-7.key"),
        ca: gw.data_dir.join("ca.crt"),
        serial: serial.clone(),
    };
    let dir = common::agent_state(work.path(), &gw, &ecu);
    let mut ag = common::spawn_agent(&dir);
    // B, offline or not, decides itself: the ECU deletes it.
    ag.wait_for(LIMIT, "deleted on B's command", |l| {
        l.contains("credential-deleted")
    });
    // The cloud confirms from B's signed check-in: revoked with the reason, B told.
    wait_until(LIMIT, "the cloud revoked it", || {
        show(&cloud, &id)["credential"]["revoked_at"].is_i64()
    });
    let d = show(&cloud, &id);
    assert!(d["credential"]["audit"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "unknown-binding"));
    let why = d["credential"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["detail"].as_str())
        .find(|t| t.contains("reported in vehicle VIN-B"))
        .unwrap_or_else(|| panic!("no reason in the history: {d:#}"))
        .to_string();
    assert!(why.contains("VIN-A") && why.contains("gw-test"), "{why}");
    assert_eq!(d["credential"]["op_state"], "invalidated");
    wait_until(LIMIT, "B got the deletion for ecu-7", || {
        gw.log()
            .contains("the fleet inventory: delete this ECU's certificate")
    });
    let log = common::strip_ansi(&gw.log());
    let line = log
        .lines()
        .find(|l| l.contains("the fleet inventory: delete this ECU's certificate"))
        .unwrap();
    assert!(
        line.contains("ecu=ecu-7") && line.contains(&serial),
        "{line}"
    );
    // B's own records reached the fleet inventory (the gateway is named).
    let page: serde_json::Value =
        serde_json::from_str(&cloud.cli(&["credentials", "list", "--holder", "ecu-7", "--json"]))
            .unwrap();
    assert!(page["total"].as_u64().unwrap() >= 1);
    // Now gw-test is bound to VIN-B: a genuine signature claiming vehicle VIN-A is refused.
    let before = cloud.log().matches("vehicle check-in refused").count();
    let s = fleet_msg::sign(&report("gw-test", "VIN-A"), &key, &cert).unwrap();
    publish_up(&broker, &mut pki, "gw-test", "gw-test", &Up::Vehicle(s));
    wait_until(LIMIT, "another vehicle's id refused", || {
        cloud.log().matches("vehicle check-in refused").count() > before
    });
    assert!(cloud
        .log()
        .contains("gateway gw-test is vehicle VIN-B, not VIN-A"));
}
