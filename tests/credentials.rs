//! Issue 13: the credential inventory and its operations on the real gateway, with the real
//! device agent (`outpost device`) as the holder and stock `mosquitto_sub` clients as the
//! devices that must hear nothing.

mod common;

use common::security_helpers::{strs, wait_until, Proc, MSG_FORMAT};
use common::{tls_args, Creds, Gateway};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(20);

fn gateway(extra: &str) -> Gateway {
    common::require_mosquitto();
    Gateway::start_with(&format!(
        "[credentials]\nretry_min = \"1s\"\nretry_max = \"2s\"\ninvalidate_grace = \"1s\"\nsweep_every = \"1s\"\n{extra}"
    ))
}

fn agent_dir(gw: &Gateway, c: &Creds) -> PathBuf {
    common::agent_state(gw.dir.path(), gw, c)
}

/// The agent, once connected.
fn agent(dir: &Path) -> Proc {
    let mut p = common::spawn_agent(dir);
    p.wait_for(LIMIT, "agent connected", |l| {
        l.contains(r#""event":"connected""#)
    });
    p
}

fn cli_json(gw: &Gateway, args: &[&str]) -> serde_json::Value {
    let out = gw.cli(args);
    assert!(
        out.status.success(),
        "outpost {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "outpost {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn show(gw: &Gateway, id: &str) -> serde_json::Value {
    cli_json(gw, &["credentials", "show", id])
}

fn op(gw: &Gateway, what: &str, id: &str) -> String {
    let out = gw.cli(&["credentials", what, id, "--reason", "test"]);
    assert!(
        out.status.success(),
        "credentials {what} {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn job_states(d: &serde_json::Value) -> Vec<String> {
    d["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap().to_string())
        .collect()
}

fn wait_job(gw: &Gateway, id: &str, state: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + LIMIT;
    while std::time::Instant::now() < deadline {
        last = show(gw, id);
        if job_states(&last).first().map(String::as_str) == Some(state) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("job of {id} never {state}: {last:#}\n{}", gw.log());
}

/// A device that only listens, on everything its ACL lets it have.
fn listener(gw: &Gateway, c: &Creds) -> Proc {
    Proc::subscriber(tls_args(gw.mqtts(), c), &format!("devices/{}/#", c.id), 1)
}

fn local_sniffer(gw: &Gateway) -> Proc {
    let mut args = common::security_helpers::plain_args(gw.plain());
    args.extend(strs(&["-i", "sniffer"]));
    Proc::subscriber(args, "devices/+/commands/outpost/credentials", 1)
}

#[test]
fn every_issued_certificate_is_in_the_inventory_and_the_check_in_keeps_it_true() {
    let gw = gateway("");
    let a = gw.issue("inv-a");
    let page = cli_json(&gw, &["credentials", "list", "--json"]);
    let rows = page["rows"].as_array().unwrap();
    let row = rows
        .iter()
        .find(|r| r["serial"] == a.serial.as_str())
        .unwrap_or_else(|| panic!("{} not listed: {page:#}", a.serial));
    assert_eq!(row["holder"], "inv-a");
    assert_eq!(row["op_state"], "issued");
    assert_eq!(row["kind"], "certificate");
    assert!(row["not_after"].as_i64().unwrap() > row["not_before"].as_i64().unwrap());
    // The check-in: the agent reports its certificate and a key.
    let dir = agent_dir(&gw, &a);
    std::fs::write(
        dir.join("keys.json"),
        r#"{"keys":[{"id":"k1","server":"ota","secret":"00112233445566778899aabbccddeeff"}]}"#,
    )
    .unwrap();
    let _ag = agent(&dir);
    wait_until(LIMIT, "last_seen set", || {
        show(&gw, &format!("cert:{}", a.serial))["credential"]["last_seen"].is_i64()
    });
    let k = show(&gw, "key:inv-a:k1");
    assert_eq!(k["credential"]["kind"], "symmetric-key");
    assert_eq!(k["credential"]["server"], "ota");
    assert_eq!(k["credential"]["op_state"], "reported");
    // The secret never reaches the gateway.
    assert!(!k.to_string().contains("00112233445566778899"));
}

#[test]
fn a_command_reaches_its_holder_only_and_renewal_keeps_the_key_on_the_device() {
    let gw = gateway("");
    let a = gw.issue("hold-a");
    let b = gw.issue("hold-b");
    let c = gw.issue("hold-c");
    let mut sniff = local_sniffer(&gw);
    let mut lb = listener(&gw, &b);
    let mut lc = listener(&gw, &c);
    let dir = agent_dir(&gw, &a);
    let mut ag = agent(&dir);
    let old_key = std::fs::read(dir.join("mqtt.key")).unwrap();
    let id = format!("cert:{}", a.serial);
    wait_until(LIMIT, "a checked in", || {
        show(&gw, &id)["credential"]["last_seen"].is_i64()
    });
    op(&gw, "renew", &id);
    let d = wait_job(&gw, &id, "succeeded");
    assert_eq!(d["credential"]["op_state"], "renewed");
    let new_id = d["credential"]["replaced_by"].as_str().unwrap().to_string();
    let n = show(&gw, &new_id);
    assert_eq!(n["credential"]["holder"], "hold-a");
    assert_eq!(n["credential"]["op_state"], "issued");
    assert_eq!(n["credential"]["replaces"], id.as_str());
    // The old certificate is revoked; the device runs on the new one, with a new key it
    // made itself (the CSR carried only the public half).
    assert!(d["credential"]["revoked_at"].is_i64());
    ag.wait_for(LIMIT, "reconnect with the new certificate", |l| {
        l.contains(r#""event":"renewed""#)
    });
    ag.wait_for(LIMIT, "connected again", |l| {
        l.contains(r#""event":"connected""#)
    });
    assert_ne!(std::fs::read(dir.join("mqtt.key")).unwrap(), old_key);
    let new_pem = std::fs::read_to_string(dir.join("mqtt.crt")).unwrap();
    assert_eq!(
        n["credential"]["pem"].as_str().unwrap().trim(),
        new_pem.trim()
    );
    // On the wire: every command went to devices/hold-a/... and nowhere else; the two other
    // devices received nothing at all.
    sniff.wait_for(LIMIT, "a command", |l| l.starts_with("MSG|"));
    let cmds: Vec<String> = sniff
        .seen
        .iter()
        .filter(|l| l.starts_with("MSG|"))
        .cloned()
        .collect();
    assert!(!cmds.is_empty());
    for l in &cmds {
        assert!(
            l.starts_with("MSG|devices/hold-a/commands/outpost/credentials|"),
            "a command to another device: {l}"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        lb.try_wait_for(Duration::from_millis(100), |l| l.starts_with("MSG|"))
            .is_none(),
        "hold-b received: {:?}",
        lb.seen
    );
    assert!(
        lc.try_wait_for(Duration::from_millis(100), |l| l.starts_with("MSG|"))
            .is_none(),
        "hold-c received: {:?}",
        lc.seen
    );
    let _ = MSG_FORMAT;
}

#[test]
fn an_offline_holder_gets_its_command_at_check_in_after_a_gateway_kill() {
    let mut gw = gateway("");
    let a = gw.issue("away-a");
    let id = format!("cert:{}", a.serial);
    let out = op(&gw, "renew", &id);
    assert!(out.contains("queued"), "{out}");
    // Acknowledged means durable: SIGKILL right after the answer.
    gw.signal("KILL");
    gw.wait(Duration::from_secs(10));
    gw.spawn();
    let d = show(&gw, &id);
    assert_eq!(job_states(&d), vec!["queued"]);
    assert_eq!(d["credential"]["op_state"], "renewal-pending");
    let dir = agent_dir(&gw, &a);
    let mut ag = agent(&dir);
    let d = wait_job(&gw, &id, "succeeded");
    assert_eq!(d["jobs"].as_array().unwrap().len(), 1, "{d:#}");
    ag.wait_for(LIMIT, "renewed", |l| l.contains(r#""event":"renewed""#));
}

#[test]
fn invalidation_cuts_a_live_session_that_ignores_the_command() {
    let gw = gateway("");
    let e = gw.issue("deaf-e");
    // mosquitto_sub does not obey: the grace ends and the revocation cuts it.
    let mut s = listener(&gw, &e);
    let id = format!("cert:{}", e.serial);
    op(&gw, "invalidate", &id);
    s.wait_for(LIMIT, "the command on its own topic", |l| {
        l.starts_with("MSG|devices/deaf-e/commands/outpost/credentials|")
    });
    assert!(
        s.wait_exit(LIMIT).is_some(),
        "session not cut: {:?}",
        s.seen
    );
    let d = show(&gw, &id);
    assert!(d["credential"]["revoked_at"].is_i64(), "{d:#}");
    assert_eq!(d["validity"], "revoked");
    // It cannot come back.
    let again = Command::new("mosquitto_sub")
        .args(tls_args(gw.mqtts(), &e))
        .args(["-t", "devices/deaf-e/#", "-C", "1", "-W", "3"])
        .output()
        .unwrap();
    assert!(!again.status.success());
}

#[test]
fn an_obedient_holder_deletes_its_credential_and_is_revoked() {
    let gw = gateway("");
    let a = gw.issue("obey-a");
    let dir = agent_dir(&gw, &a);
    let mut ag = agent(&dir);
    let id = format!("cert:{}", a.serial);
    wait_until(LIMIT, "checked in", || {
        show(&gw, &id)["credential"]["last_seen"].is_i64()
    });
    op(&gw, "invalidate", &id);
    let d = wait_job(&gw, &id, "succeeded");
    assert_eq!(d["credential"]["op_state"], "invalidated");
    assert!(d["credential"]["revoked_at"].is_i64());
    ag.wait_for(LIMIT, "deleted", |l| l.contains("credential-deleted"));
    assert!(!dir.join("mqtt.key").exists() && !dir.join("mqtt.crt").exists());
}

#[test]
fn a_symmetric_key_is_rotated_sealed_to_its_holder() {
    let gw = gateway("");
    let a = gw.issue("rot-a");
    let dir = agent_dir(&gw, &a);
    let old = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    std::fs::write(
        dir.join("keys.json"),
        format!(r#"{{"keys":[{{"id":"secoc-1","server":"ecu-bus","secret":"{old}"}}]}}"#),
    )
    .unwrap();
    let _ag = agent(&dir);
    wait_until(LIMIT, "key reported", || {
        gw.cli(&["credentials", "show", "key:rot-a:secoc-1"])
            .status
            .success()
    });
    op(&gw, "rotate", "key:rot-a:secoc-1");
    let d = wait_job(&gw, "key:rot-a:secoc-1", "succeeded");
    assert_eq!(d["credential"]["op_state"], "rotated");
    let new_id = d["credential"]["replaced_by"].as_str().unwrap().to_string();
    let keys: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("keys.json")).unwrap()).unwrap();
    let k = &keys["keys"][0];
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    assert_eq!(format!("key:rot-a:{}", k["id"].as_str().unwrap()), new_id);
    let secret = k["secret"].as_str().unwrap();
    assert_eq!(secret.len(), 64);
    assert_ne!(secret, old);
    // The gateway never had it in the clear in its inventory or its log.
    assert!(!show(&gw, &new_id).to_string().contains(secret));
    assert!(!gw.log().contains(secret));
}

#[test]
fn forged_reports_and_updates_change_nothing() {
    let gw = gateway("");
    let a = gw.issue("forge-a");
    let b = gw.issue("forge-b");
    let id = format!("cert:{}", a.serial);
    op(&gw, "renew", &id);
    let job = show(&gw, &id)["jobs"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let publish = |c: &Creds, topic: &str, body: &str| {
        let out = Command::new("mosquitto_pub")
            .args(tls_args(gw.mqtts(), c))
            .args(["-t", topic, "-m", body, "-q", "1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // b claims a's job succeeded, on its own topic (the ACL keeps it off a's).
    publish(
        &b,
        "devices/forge-b/credentials/job",
        &format!(r#"{{"v":1,"job":"{job}","state":"succeeded"}}"#),
    );
    // Malformed messages.
    publish(&b, "devices/forge-b/credentials/job", "{not json");
    publish(
        &b,
        "devices/forge-b/credentials/report",
        r#"{"v":9,"credentials":[]}"#,
    );
    wait_until(LIMIT, "refusals counted", || {
        gw.metric("outpost_credentials_updates_refused_total") >= 2
            && gw.metric("outpost_credentials_reports_refused_total") >= 1
    });
    let d = show(&gw, &id);
    assert_eq!(job_states(&d), vec!["queued"], "{d:#}");
    // b reports a's certificate as its own: the audit flags it, a stays the holder.
    publish(
        &b,
        "devices/forge-b/credentials/report",
        &format!(
            r#"{{"v":1,"credentials":[{{"kind":"certificate","id":"{}","server":"gateway"}}]}}"#,
            a.serial
        ),
    );
    wait_until(LIMIT, "shared flagged", || {
        show(&gw, &id)["credential"]["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "shared")
    });
    let d = show(&gw, &id);
    assert_eq!(d["credential"]["holder"], "forge-a");
    assert_eq!(d["credential"]["seen_by"][0], "forge-b");
    // The audit filter finds it.
    let page = cli_json(&gw, &["credentials", "list", "--audit", "--json"]);
    assert!(page["rows"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == id.as_str()));
    assert!(gw.log().contains("not the job's holder"));
}

#[test]
fn an_ecu_certificate_from_another_vehicle_is_deleted_and_revoked_offline() {
    // Vehicle B's gateway trusts the fleet CA (as every gateway of a fleet does); an ECU
    // whose certificate the fleet CA issued for vehicle A turns up in B.
    let fleet = common::security_helpers::fleet_ca("Fleet CA");
    let gw = Gateway::start_with(&format!(
        "[credentials]\nvehicle = \"VIN-B\"\ninvalidate_grace = \"1s\"\n\n[tls]\nextra_client_cas = [\"{}\"]\n",
        fleet.ca_path.display()
    ));
    let ecu = fleet.issue(&gw, "ecu-7");
    let dir = agent_dir(&gw, &ecu);
    let mut ag = agent(&dir);
    let serial = ecu.serial.clone();
    wait_until(LIMIT, "binding violation", || {
        gw.metric("outpost_credentials_binding_violations_total") >= 1
    });
    let id = format!("foreign:Fleet CA:{serial}");
    let d = wait_job(&gw, &id, "succeeded");
    assert_eq!(d["credential"]["holder"], "ecu-7");
    assert!(d["credential"]["audit"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "unknown-binding"));
    let why = d["jobs"][0]["reason"].as_str().unwrap();
    assert!(why.contains("VIN-B") && why.contains("ecu-7"), "{why}");
    assert_eq!(d["jobs"][0]["op"], "delete");
    assert!(d["credential"]["revoked_at"].is_i64());
    ag.wait_for(LIMIT, "deleted", |l| l.contains("credential-deleted"));
    // And the front door refuses it from now on.
    let again = Command::new("mosquitto_sub")
        .args(tls_args(gw.mqtts(), &ecu))
        .args(["-t", "devices/ecu-7/#", "-C", "1", "-W", "3"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    // An ECU certificate this gateway issued in this vehicle is fine.
    let own = gw.issue("ecu-8");
    let d = show(&gw, &format!("cert:{}", own.serial));
    assert_eq!(d["credential"]["vehicle"], "VIN-B");
    assert_eq!(d["credential"]["ecu"], "ecu-8");
    let dir8 = agent_dir(&gw, &own);
    let _a8 = agent(&dir8);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(gw.metric("outpost_credentials_binding_violations_total"), 1);
}

#[test]
fn the_policy_renews_a_certificate_past_its_renewal_point() {
    let gw = Gateway::start_with(
        "[ca]\ndevice_validity = \"1h\"\n\n[credentials]\nrenew_at = 0.001\nsweep_every = \"1s\"\nretry_min = \"1s\"\nretry_max = \"2s\"\n",
    );
    let a = gw.issue("pol-a");
    let dir = agent_dir(&gw, &a);
    let mut ag = agent(&dir);
    let id = format!("cert:{}", a.serial);
    let d = wait_job(&gw, &id, "succeeded");
    assert_eq!(d["jobs"][0]["by"], "policy");
    assert!(d["jobs"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("of its validity passed"));
    assert_eq!(d["credential"]["op_state"], "renewed");
    ag.wait_for(LIMIT, "renewed", |l| l.contains(r#""event":"renewed""#));
}

#[test]
fn a_job_whose_holder_never_comes_times_out_and_the_credential_says_so() {
    let gw = gateway("job_timeout = \"2s\"\n");
    let a = gw.issue("gone-a");
    let id = format!("cert:{}", a.serial);
    op(&gw, "renew", &id);
    let d = wait_job(&gw, &id, "timed-out");
    assert_eq!(d["credential"]["op_state"], "failed");
    let last = d["credential"]["history"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(
        last["detail"].as_str().unwrap().contains("timed-out"),
        "{last}"
    );
    // Not revoked: a renewal that did not happen leaves the certificate as it was.
    assert!(d["credential"]["revoked_at"].is_null());
    // And a new operation may start.
    op(&gw, "renew", &id);
}

/// A holder that connects and reports at once must not get each command twice: the command
/// went out when it came online, so its report resends only what went out more than
/// `RESEND_QUIET` (5 s) ago. One raw TLS session is the device (a report from a second
/// connection would take its session over); the retry is far away (60 s), so every command
/// on the wire is the delivery or a check-in's resend.
#[tokio::test]
async fn a_check_in_right_after_a_command_does_not_resend_it_but_a_later_one_does() {
    use common::wire;
    use tokio::io::AsyncWriteExt;
    let gw = Gateway::start_with("[credentials]\nretry_min = \"60s\"\nretry_max = \"60s\"\n");
    let c = gw.issue("quiet-c");
    let mut s = common::tls_connect(gw.mqtts(), common::device_tls_config(&c))
        .await
        .expect("TLS");
    assert_eq!(common::mqtt_connect(&mut s, "quiet-c", LIMIT).await, 0);
    common::mqtt_subscribe(&mut s, "devices/quiet-c/commands/outpost/credentials", 1).await;
    let topic = b"devices/quiet-c/commands/outpost/credentials";
    // Commands on the wire within `limit` (each acknowledged), stopping at the first if asked.
    async fn commands(
        s: &mut common::TlsStream,
        topic: &[u8],
        limit: Duration,
        first: bool,
    ) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        let mut n = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Ok(p) = tokio::time::timeout(left, common::read_packet(s)).await else {
                return n;
            };
            let p = p.expect("read").expect("the gateway closed the session");
            if p.kind() != 3 {
                continue;
            }
            let len = u16::from_be_bytes([p.body[0], p.body[1]]) as usize;
            if (p.first >> 1) & 3 == 1 {
                let pid = u16::from_be_bytes([p.body[2 + len], p.body[3 + len]]);
                s.write_all(&wire::ack(4, pid)).await.expect("PUBACK");
            }
            if &p.body[2..2 + len] == topic {
                n += 1;
                if first {
                    return n;
                }
            }
        }
    }
    let id = format!("cert:{}", c.serial);
    op(&gw, "renew", &id);
    assert_eq!(commands(&mut s, topic, LIMIT, true).await, 1, "the command");
    let sent = std::time::Instant::now();
    let report = format!(
        r#"{{"v":1,"credentials":[{{"kind":"certificate","id":"{}","server":"gateway"}}]}}"#,
        c.serial
    );
    let check_in = async |s: &mut common::TlsStream| {
        let before = gw.metric("outpost_credentials_reports_total");
        s.write_all(&wire::publish(
            "devices/quiet-c/credentials/report",
            report.as_bytes(),
            0,
            0,
        ))
        .await
        .expect("report");
        let deadline = std::time::Instant::now() + LIMIT;
        while gw.metric("outpost_credentials_reports_total") <= before {
            assert!(std::time::Instant::now() < deadline, "report never taken");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    check_in(&mut s).await;
    assert!(
        sent.elapsed() < Duration::from_millis(4000),
        "the check-in came too late for this test: {:?}",
        sent.elapsed()
    );
    assert_eq!(
        commands(&mut s, topic, Duration::from_millis(500), false).await,
        0,
        "the check-in resent a command that had just gone out"
    );
    // Later, the holder may have missed it: its check-in resends.
    tokio::time::sleep(Duration::from_millis(5200).saturating_sub(sent.elapsed())).await;
    check_in(&mut s).await;
    assert_eq!(commands(&mut s, topic, LIMIT, true).await, 1, "the resend");
    assert_eq!(job_states(&show(&gw, &id)), vec!["delivered"]);
}
