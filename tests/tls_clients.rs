//! Real MQTT clients against the TLS device listener: stock mosquitto_pub/mosquitto_sub with
//! certificates from `outpost ca issue-device`, and rumqttc with rustls. Clients without a
//! valid certificate (none, another CA, expired, revoked) and clients claiming another
//! identity are refused.

mod common;

use common::security_helpers as sec;
use common::{require_mosquitto, tls_args, Creds, Gateway};
use sec::{mosquitto_pub, plain_args, strs, text, Proc, LIMIT};
use std::time::Duration;

const FAILURES: &str = "outpost_tls_handshake_failures_total";

/// Devices may also use `fleet/#`, so that two devices can talk to each other.
const FLEET_ACL: &str = r#"[acl]
device_publish = ["devices/{id}/#", "fleet/#"]
device_subscribe = ["devices/{id}/#", "fleet/#"]
"#;

fn pub_args(base: Vec<String>, topic: &str, payload: &str, qos: u8) -> Vec<String> {
    let mut a = base;
    a.extend(strs(&["-t", topic, "-m", payload, "-q", &qos.to_string()]));
    a
}

#[test]
fn mosquitto_devices_exchange_qos0_qos1_and_qos2_messages_over_tls() {
    require_mosquitto();
    let gw = Gateway::start_with(FLEET_ACL);
    let publisher = gw.issue("pub-dev");
    // One subscribing device per QoS level, each subscribed at that level.
    let mut subs: Vec<Proc> = (0..=2u8)
        .map(|q| {
            let dev = gw.issue(&format!("sub-dev-{q}"));
            Proc::subscriber(tls_args(gw.mqtts(), &dev), &format!("fleet/qos{q}"), q)
        })
        .collect();

    for q in 0..=2u8 {
        let payload = format!("reading-{q}-{}", rand::random::<u32>());
        let out = mosquitto_pub(&pub_args(
            tls_args(gw.mqtts(), &publisher),
            &format!("fleet/qos{q}"),
            &payload,
            q,
        ));
        assert!(
            out.status.success(),
            "QoS {q} publish failed: {}",
            text(&out)
        );
        let log = String::from_utf8_lossy(&out.stdout);
        assert!(log.contains("received CONNACK (0)"), "{log}");
        match q {
            1 => assert!(
                log.contains("received PUBACK"),
                "QoS 1 flow not completed: {log}"
            ),
            2 => {
                assert!(
                    log.contains("received PUBREC"),
                    "QoS 2 flow not completed: {log}"
                );
                assert!(
                    log.contains("received PUBCOMP"),
                    "QoS 2 flow not completed: {log}"
                );
            }
            _ => {}
        }
        let (topic, qos) = subs[q as usize].wait_message(&payload);
        assert_eq!(topic, format!("fleet/qos{q}"));
        assert_eq!(qos, q, "delivered QoS");
    }
    // Every subscriber got exactly its own message.
    for (q, s) in subs.iter_mut().enumerate() {
        s.output();
        assert_eq!(s.payloads().len(), 1, "subscriber {q}: {:?}", s.seen);
    }
    assert_eq!(gw.metric(FAILURES), 0, "no handshake failed");
}

#[test]
fn mosquitto_devices_and_local_processes_exchange_messages_both_ways() {
    require_mosquitto();
    let gw = Gateway::start();
    let sensor = gw.issue("sensor-1");
    let actuator = gw.issue("actuator-1");
    // Device → local process.
    let mut local = Proc::subscriber(plain_args(gw.plain()), "devices/sensor-1/#", 2);
    // Local process → device.
    let mut device_sub =
        Proc::subscriber(tls_args(gw.mqtts(), &actuator), "devices/actuator-1/cmd", 2);
    for q in 0..=2u8 {
        let up = format!("up-{q}");
        let out = mosquitto_pub(&pub_args(
            tls_args(gw.mqtts(), &sensor),
            "devices/sensor-1/telemetry",
            &up,
            q,
        ));
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(local.wait_message(&up).0, "devices/sensor-1/telemetry");

        let down = format!("down-{q}");
        let out = mosquitto_pub(&pub_args(
            plain_args(gw.plain()),
            "devices/actuator-1/cmd",
            &down,
            q,
        ));
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(device_sub.wait_message(&down).0, "devices/actuator-1/cmd");
    }
    assert!(
        device_sub.is_running(),
        "device subscriber died: {}",
        device_sub.output()
    );
}

/// Try to publish with `creds` (or with no certificate at all) and check that the TLS
/// handshake is refused, the failure is counted, and nothing reaches a subscriber. A valid
/// device publishes first, to prove the subscriber would have seen a leak.
fn assert_refused(gw: &Gateway, creds: Option<&Creds>, case: &str, alert: &str) {
    let good = gw.issue(&format!("good-{case}"));
    // Everything devices may publish is below devices/ (the gateway's own retained
    // outpost/uplink/state would otherwise reach a `#` watcher too).
    let mut watcher = Proc::subscriber(plain_args(gw.plain()), "devices/#", 1);
    let out = mosquitto_pub(&pub_args(
        tls_args(gw.mqtts(), &good),
        &format!("devices/good-{case}/x"),
        "control",
        1,
    ));
    assert!(
        out.status.success(),
        "control device refused: {}",
        text(&out)
    );
    watcher.wait_message("control");

    let before = gw.metric(FAILURES);
    let args = match creds {
        Some(c) => tls_args(gw.mqtts(), c),
        // Server verification only: the client presents no certificate.
        None => {
            let mut a = tls_args(gw.mqtts(), &good);
            a.truncate(6);
            a
        }
    };
    let id = creds
        .map(|c| c.id.clone())
        .unwrap_or_else(|| "anonymous".into());
    let out = mosquitto_pub(&pub_args(
        args,
        &format!("devices/{id}/x"),
        &format!("leak-{case}"),
        1,
    ));
    assert!(
        !out.status.success(),
        "{case}: publish was accepted: {}",
        text(&out)
    );
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        !log.contains("received CONNACK"),
        "{case}: got to MQTT: {log}"
    );
    // The TLS alert the gateway sent says why (mosquitto prints OpenSSL errors with -d).
    assert!(
        text(&out).contains(alert),
        "{case}: expected alert {alert:?} in: {}",
        text(&out)
    );
    sec::wait_metric(gw, FAILURES, |v| v > before);

    // A sentinel published after the attempt arrives; the refused payload never did.
    let out = mosquitto_pub(&pub_args(
        plain_args(gw.plain()),
        "devices/sentinel/x",
        "sentinel",
        1,
    ));
    assert!(out.status.success(), "{}", text(&out));
    watcher.wait_message("sentinel");
    assert_eq!(watcher.payloads(), vec!["control", "sentinel"], "{case}");
}

#[test]
fn client_without_certificate_is_refused() {
    require_mosquitto();
    let gw = Gateway::start();
    assert_refused(&gw, None, "nocert", "alert certificate required");
}

#[test]
fn certificate_from_another_ca_is_refused() {
    require_mosquitto();
    let gw = Gateway::start();
    let foreign = sec::foreign_device(&gw, "intruder");
    assert_refused(&gw, Some(&foreign), "foreign", "alert unknown ca");
}

#[test]
fn expired_certificate_signed_by_the_gateway_ca_is_refused() {
    require_mosquitto();
    let gw = Gateway::start();
    let expired = sec::expired_device(&gw, "old-dev");
    assert_refused(&gw, Some(&expired), "expired", "alert certificate expired");
}

#[test]
fn revoked_certificate_is_refused() {
    require_mosquitto();
    let gw = Gateway::start();
    let dev = gw.issue("stolen-dev");
    let out = mosquitto_pub(&pub_args(
        tls_args(gw.mqtts(), &dev),
        "devices/stolen-dev/x",
        "before",
        1,
    ));
    assert!(
        out.status.success(),
        "valid before revocation: {}",
        text(&out)
    );
    gw.revoke_id("stolen-dev");
    assert_refused(&gw, Some(&dev), "revoked", "alert certificate revoked");
}

#[test]
fn client_id_not_matching_the_certificate_is_rejected() {
    require_mosquitto();
    let gw = Gateway::start();
    let dev = gw.issue("meter-7");
    let _other = gw.issue("meter-8");
    // Everything devices may publish is below devices/ (the gateway's own retained
    // outpost/uplink/state would otherwise reach a `#` watcher too).
    let mut watcher = Proc::subscriber(plain_args(gw.plain()), "devices/#", 1);

    let mut args = tls_args(gw.mqtts(), &dev);
    args.extend(strs(&["-i", "meter-8"]));
    let out = mosquitto_pub(&pub_args(args, "devices/meter-8/x", "impostor", 1));
    assert!(!out.status.success(), "impostor accepted: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("received CONNACK (2)"),
        "{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("identifier rejected"),
        "{}",
        text(&out)
    );
    assert_eq!(gw.metric("outpost_connections_refused_identity_total"), 1);

    // The certificate's own id, given explicitly, is fine.
    let mut args = tls_args(gw.mqtts(), &dev);
    args.extend(strs(&["-i", "meter-7"]));
    let out = mosquitto_pub(&pub_args(args, "devices/meter-7/x", "honest", 1));
    assert!(out.status.success(), "{}", text(&out));
    watcher.wait_message("honest");
    assert_eq!(watcher.payloads(), vec!["honest"]);
    assert_eq!(gw.metric("outpost_connections_refused_identity_total"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_device_publishes_and_subscribes_over_tls() {
    use rumqttc::{Packet, QoS, SubscribeReasonCode};
    require_mosquitto();
    let gw = Gateway::start();
    let dev = gw.issue("rumq-1");
    let (client, mut el) = sec::rumqtt_device(gw.mqtts(), &dev, "rumq-1");
    let code = sec::rumqtt_until(&mut el, LIMIT, "CONNACK", |p| match p {
        Packet::ConnAck(a) => Some(a.code),
        _ => None,
    })
    .await;
    assert_eq!(code, rumqttc::ConnectReturnCode::Success);

    client
        .subscribe("devices/rumq-1/cmd", QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = sec::rumqtt_until(&mut el, LIMIT, "SUBACK", |p| match p {
        Packet::SubAck(s) => Some(s.return_codes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);

    // Device → local subscriber, QoS 1 acknowledged.
    let mut local = Proc::subscriber(plain_args(gw.plain()), "devices/rumq-1/telemetry", 1);
    client
        .publish("devices/rumq-1/telemetry", QoS::AtLeastOnce, false, "21.5C")
        .await
        .unwrap();
    sec::rumqtt_until(&mut el, LIMIT, "PUBACK", |p| {
        matches!(p, Packet::PubAck(_)).then_some(())
    })
    .await;
    local.wait_message("21.5C");

    // Local publisher → device.
    let out = mosquitto_pub(&pub_args(
        plain_args(gw.plain()),
        "devices/rumq-1/cmd",
        "reboot",
        1,
    ));
    assert!(out.status.success(), "{}", text(&out));
    let (topic, payload) = sec::rumqtt_until(&mut el, LIMIT, "PUBLISH", |p| match p {
        Packet::Publish(p) => Some((p.topic.clone(), p.payload.to_vec())),
        _ => None,
    })
    .await;
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("devices/rumq-1/cmd", &b"reboot"[..])
    );
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), el.poll()).await;
}
