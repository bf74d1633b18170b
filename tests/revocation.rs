//! Revocation: a live session whose certificate is revoked is cut within a second and cannot
//! come back, by device id or by serial; other devices are untouched; a revocation recorded
//! while the gateway was stopped is enforced when it starts again.

mod common;

use common::security_helpers as sec;
use common::{require_mosquitto, tls_args, Creds, Gateway};
use sec::{mosquitto_pub, plain_args, strs, text, Proc, LIMIT};
use std::time::{Duration, Instant};

const REVOKED: &str = "outpost_forced_disconnects_total{reason=\"revoked\"}";
const FAILURES: &str = "outpost_tls_handshake_failures_total";
const CUT_WITHIN: Duration = Duration::from_secs(1);

fn publish(args: Vec<String>, topic: &str, payload: &str) -> std::process::Output {
    let mut a = args;
    a.extend(strs(&["-t", topic, "-m", payload, "-q", "1"]));
    mosquitto_pub(&a)
}

/// The device can no longer connect: its TLS handshake is refused as revoked.
fn assert_tls_refused_as_revoked(gw: &Gateway, creds: &Creds) {
    let before = gw.metric(FAILURES);
    let out = publish(
        tls_args(gw.mqtts(), creds),
        &format!("devices/{}/x", creds.id),
        "comeback",
    );
    assert!(
        !out.status.success(),
        "revoked device reconnected: {}",
        text(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("received CONNACK"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("alert certificate revoked"),
        "{}",
        text(&out)
    );
    sec::wait_metric(gw, FAILURES, |v| v > before);
}

#[test]
fn revoked_session_is_cut_within_one_second() {
    require_mosquitto();
    let gw = Gateway::start();
    let victim = gw.issue("victim");
    let bystander = gw.issue("bystander");
    let mut victim_sub = Proc::subscriber(tls_args(gw.mqtts(), &victim), "devices/victim/#", 1);
    let mut bystander_sub =
        Proc::subscriber(tls_args(gw.mqtts(), &bystander), "devices/bystander/#", 1);

    // Both sessions are live.
    for (dev, sub) in [
        ("victim", &mut victim_sub),
        ("bystander", &mut bystander_sub),
    ] {
        let out = publish(
            plain_args(gw.plain()),
            &format!("devices/{dev}/cmd"),
            &format!("hello-{dev}"),
        );
        assert!(out.status.success(), "{}", text(&out));
        sub.wait_message(&format!("hello-{dev}"));
    }

    gw.revoke_id("victim");
    let returned = Instant::now();
    let status = victim_sub
        .wait_exit(LIMIT)
        .expect("revoked subscriber still connected");
    let took = returned.elapsed();
    assert!(
        took < CUT_WITHIN,
        "session cut {took:?} after the revoke command returned"
    );
    assert!(
        !status.success(),
        "subscriber should report the lost connection: {}",
        victim_sub.output()
    );
    assert_eq!(sec::wait_metric(&gw, REVOKED, |v| v >= 1), 1);

    assert_tls_refused_as_revoked(&gw, &victim);

    // The other device never noticed.
    assert!(
        bystander_sub.is_running(),
        "bystander lost its session: {}",
        bystander_sub.output()
    );
    let out = publish(
        plain_args(gw.plain()),
        "devices/bystander/cmd",
        "still-there",
    );
    assert!(out.status.success(), "{}", text(&out));
    bystander_sub.wait_message("still-there");
    assert!(bystander_sub.is_running(), "{}", bystander_sub.output());
    assert_eq!(gw.metric(REVOKED), 1, "only the revoked session was cut");
}

/// Drive a rumqttc event loop until it reports a connection error; `None` after `limit`.
async fn until_disconnected(
    el: &mut rumqttc::EventLoop,
    limit: Duration,
) -> Option<rumqttc::ConnectionError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Err(_) => return None,
            Ok(Err(e)) => return Some(e),
            Ok(Ok(_)) => {}
        }
    }
}

async fn connected(
    gw: &Gateway,
    creds: &Creds,
    filter: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    use rumqttc::{Packet, QoS};
    let (client, mut el) = sec::rumqtt_device(gw.mqtts(), creds, &creds.id);
    let code = sec::rumqtt_until(&mut el, LIMIT, "CONNACK", |p| match p {
        Packet::ConnAck(a) => Some(a.code),
        _ => None,
    })
    .await;
    assert_eq!(code, rumqttc::ConnectReturnCode::Success);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    sec::rumqtt_until(&mut el, LIMIT, "SUBACK", |p| {
        matches!(p, Packet::SubAck(_)).then_some(())
    })
    .await;
    (client, el)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_by_serial_cuts_that_certificate_only() {
    require_mosquitto();
    let gw = Gateway::start();
    // Two certificates for the same device (say, the old one leaked and was replaced).
    let old = sec::issue_into(&gw, "pump-3", "pump-3-old");
    let new = sec::issue_into(&gw, "pump-3", "pump-3-new");
    assert_ne!(old.serial, new.serial);
    let other = gw.issue("pump-4");

    let (_c_old, mut el_old) = connected(&gw, &old, "devices/pump-3/#").await;
    let (_c_other, mut el_other) = connected(&gw, &other, "devices/pump-4/#").await;

    let gw_ref = &gw;
    let serial = old.serial.clone();
    let out = tokio::task::block_in_place(|| gw_ref.cli(&["ca", "revoke", "--serial", &serial]));
    let returned = Instant::now();
    assert!(
        out.status.success(),
        "revoke --serial: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&old.serial),
        "{out:?}"
    );

    let err = until_disconnected(&mut el_old, LIMIT)
        .await
        .expect("session with the revoked certificate still up");
    let took = returned.elapsed();
    assert!(
        took < CUT_WITHIN,
        "rumqttc saw the disconnect {took:?} after the revoke returned ({err:?})"
    );
    assert_eq!(sec::wait_metric(&gw, REVOKED, |v| v >= 1), 1);

    // rumqttc's own reconnect attempt fails, and so does a fresh client with the old certificate.
    let retry = until_disconnected(&mut el_old, LIMIT)
        .await
        .expect("reconnect should fail");
    assert!(
        format!("{retry:?}").to_lowercase().contains("revoked"),
        "{retry:?}"
    );
    tokio::task::block_in_place(|| assert_tls_refused_as_revoked(&gw, &old));

    // The replacement certificate of the same device still works.
    let out = tokio::task::block_in_place(|| {
        publish(
            tls_args(gw.mqtts(), &new),
            "devices/pump-3/x",
            "replacement",
        )
    });
    assert!(
        out.status.success(),
        "new certificate refused: {}",
        text(&out)
    );

    // The other device's session was not touched.
    let out = tokio::task::block_in_place(|| {
        publish(plain_args(gw.plain()), "devices/pump-4/cmd", "still-on")
    });
    assert!(out.status.success(), "{}", text(&out));
    let payload = sec::rumqtt_until(
        &mut el_other,
        LIMIT,
        "PUBLISH to the other device",
        |p| match p {
            rumqttc::Packet::Publish(p) => Some(p.payload.to_vec()),
            _ => None,
        },
    )
    .await;
    assert_eq!(payload, b"still-on");
    assert_eq!(gw.metric(REVOKED), 1);
}

#[test]
fn revocation_while_gateway_is_stopped_is_enforced_after_restart() {
    require_mosquitto();
    let mut gw = Gateway::start();
    let parked = gw.issue("parked");
    let keeper = gw.issue("keeper");
    let out = publish(tls_args(gw.mqtts(), &parked), "devices/parked/x", "before");
    assert!(
        out.status.success(),
        "valid before revocation: {}",
        text(&out)
    );

    gw.signal("TERM");
    let status = gw
        .wait(Duration::from_secs(30))
        .expect("gateway did not stop");
    assert!(status.success(), "gateway exit: {status}");

    // No gateway runs: the CLI records the revocation in the store directly.
    let out = gw.cli(&["ca", "revoke", "--id", "parked"]);
    assert!(
        out.status.success(),
        "offline revoke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("revoked parked serial {}", parked.serial)),
        "{out:?}"
    );

    gw.spawn();
    assert_tls_refused_as_revoked(&gw, &parked);
    let out = publish(tls_args(gw.mqtts(), &keeper), "devices/keeper/x", "after");
    assert!(
        out.status.success(),
        "unrevoked device refused after restart: {}",
        text(&out)
    );
}
