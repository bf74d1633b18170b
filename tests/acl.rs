//! The topic ACL as devices meet it over TLS: a device may publish and subscribe below its own
//! `devices/{id}/` only; denials are per filter in SUBACKs, denied publishes are acknowledged
//! and dropped (or cut the connection when configured), forbidden wills are refused at
//! CONNECT, and every denial is counted exactly once.

mod common;

use common::security_helpers as sec;
use common::Gateway;
use sec::{wire, NoPacket, LIMIT, PUBACK, PUBCOMP, PUBREC};

const DENIED_PUB: &str = "outpost_acl_denied_total{op=\"publish\"}";
const DENIED_SUB: &str = "outpost_acl_denied_total{op=\"subscribe\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_cannot_publish_to_other_devices_topics_or_wildcards() {
    let gw = Gateway::start();
    let a = gw.issue("dev-a");
    let _b = gw.issue("dev-b");
    let mut watcher = sec::local(gw.plain(), "watcher").await;
    assert_eq!(watcher.subscribe(1, &[("#", 1)]).await, vec![1]);
    let mut dev = sec::device(gw.mqtts(), &a).await;

    let denied = [
        "devices/dev-b/telemetry",
        "devices/dev-b",
        "devices/+/telemetry",
        "devices/#",
        "#",
        "devices/dev-a-evil/telemetry",
        "elsewhere/dev-a",
    ];
    let mut pid = 1;
    dev.send(&wire::publish("devices/dev-a/telemetry", b"own", 1, pid))
        .await;
    dev.expect_exact(PUBACK, &pid.to_be_bytes(), "PUBACK for own topic")
        .await;
    for topic in denied {
        pid += 1;
        dev.send(&wire::publish(
            topic,
            format!("leak to {topic}").as_bytes(),
            1,
            pid,
        ))
        .await;
        // Policy `drop`: acknowledged like any QoS 1 publish, then discarded.
        dev.expect_exact(
            PUBACK,
            &pid.to_be_bytes(),
            &format!("PUBACK for denied {topic}"),
        )
        .await;
    }
    pid += 1;
    dev.send(&wire::publish("devices/dev-a/done", b"sentinel", 1, pid))
        .await;
    dev.expect_exact(PUBACK, &pid.to_be_bytes(), "PUBACK for sentinel")
        .await;

    let got = watcher.payloads_until(b"sentinel").await;
    assert_eq!(
        got,
        vec![("devices/dev-a/telemetry".to_string(), b"own".to_vec())]
    );
    assert_eq!(gw.metric(DENIED_PUB), denied.len() as i64);
    assert_eq!(gw.metric(DENIED_SUB), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_cannot_subscribe_to_other_devices_topics_or_wildcards() {
    let gw = Gateway::start();
    let a = gw.issue("dev-a");
    let mut dev = sec::device(gw.mqtts(), &a).await;

    let denied = [
        "devices/dev-b/#",
        "devices/dev-b/cmd",
        "devices/+/cmd",
        "devices/#",
        "#",
        "+/dev-a/cmd",
        "devices/dev-a-evil/#",
    ];
    for (i, f) in denied.iter().enumerate() {
        let codes = dev.subscribe(10 + i as u16, &[(f, 1)]).await;
        assert_eq!(codes, vec![0x80], "SUBACK for {f}");
    }
    assert_eq!(dev.subscribe(2, &[("devices/dev-a/#", 1)]).await, vec![1]);

    // Messages for other devices do not arrive; the device's own do.
    let mut publisher = sec::local(gw.plain(), "backend").await;
    for (i, t) in ["devices/dev-b/cmd", "devices/dev-a-evil/cmd", "other/x"]
        .iter()
        .enumerate()
    {
        publisher
            .send(&wire::publish(t, b"not for dev-a", 1, 1 + i as u16))
            .await;
        assert_eq!(publisher.expect("PUBACK").await.kind(), PUBACK);
    }
    publisher
        .send(&wire::publish("devices/dev-a/cmd", b"sentinel", 1, 9))
        .await;
    let got = dev.payloads_until(b"sentinel").await;
    assert!(got.is_empty(), "device A received {got:?}");
    assert_eq!(gw.metric(DENIED_SUB), denied.len() as i64);
    assert_eq!(gw.metric(DENIED_PUB), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_subscribe_gets_granted_and_refused_codes_in_filter_order() {
    use rumqttc::{Packet, QoS, SubscribeFilter, SubscribeReasonCode::*};
    let gw = Gateway::start();
    let a = gw.issue("dev-a");
    let (client, mut el) = sec::rumqtt_device(gw.mqtts(), &a, "dev-a");
    sec::rumqtt_until(&mut el, LIMIT, "CONNACK", |p| {
        matches!(p, Packet::ConnAck(_)).then_some(())
    })
    .await;

    let filters = [
        ("devices/dev-a/x", QoS::AtLeastOnce),
        ("devices/dev-b/x", QoS::AtLeastOnce),
        ("devices/dev-a/y", QoS::ExactlyOnce),
        ("#", QoS::AtMostOnce),
        ("devices/+/x", QoS::AtMostOnce),
        ("devices/dev-a/z", QoS::AtMostOnce),
    ];
    client
        .subscribe_many(
            filters
                .iter()
                .map(|(f, q)| SubscribeFilter::new(f.to_string(), *q)),
        )
        .await
        .unwrap();
    let codes = sec::rumqtt_until(&mut el, LIMIT, "SUBACK", |p| match p {
        Packet::SubAck(s) => Some(s.return_codes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        codes,
        vec![
            Success(QoS::AtLeastOnce),
            Failure,
            Success(QoS::ExactlyOnce),
            Failure,
            Failure,
            Success(QoS::AtMostOnce)
        ]
    );
    assert_eq!(gw.metric(DENIED_SUB), 3);

    // The granted filters work, the refused one does not.
    let mut publisher = sec::local(gw.plain(), "backend").await;
    for (i, t) in [
        "devices/dev-b/x",
        "devices/dev-a/x",
        "devices/dev-a/y",
        "devices/dev-a/z",
    ]
    .iter()
    .enumerate()
    {
        publisher
            .send(&wire::publish(t, t.as_bytes(), 1, 1 + i as u16))
            .await;
        assert_eq!(publisher.expect("PUBACK").await.kind(), PUBACK);
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        let t = sec::rumqtt_until(&mut el, LIMIT, "PUBLISH", |p| match p {
            Packet::Publish(p) => Some(p.topic.clone()),
            _ => None,
        })
        .await;
        got.push(t);
    }
    got.sort();
    assert_eq!(
        got,
        vec!["devices/dev-a/x", "devices/dev-a/y", "devices/dev-a/z"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suback_codes_keep_their_positions_whichever_filter_is_refused() {
    let gw = Gateway::start();
    let a = gw.issue("dev-a");
    let mut dev = sec::device(gw.mqtts(), &a).await;
    // (filters with QoS, expected SUBACK return codes)
    type Case<'a> = (&'a [(&'a str, u8)], &'a [u8]);
    let cases: [Case; 4] = [
        (&[("#", 0), ("devices/dev-a/1", 1)], &[0x80, 1]),
        (
            &[("devices/dev-a/2", 2), ("devices/dev-b/2", 1)],
            &[2, 0x80],
        ),
        (
            &[
                ("devices/dev-b/3", 0),
                ("devices/dev-a/3", 0),
                ("devices/+/3", 2),
                ("devices/dev-a/4", 2),
            ],
            &[0x80, 0, 0x80, 2],
        ),
        (
            &[("devices/dev-b/5", 1), ("devices/dev-c/5", 1)],
            &[0x80, 0x80],
        ),
    ];
    let mut refused = 0;
    for (i, (filters, want)) in cases.iter().enumerate() {
        let codes = dev.subscribe(100 + i as u16, filters).await;
        assert_eq!(codes, want.to_vec(), "SUBACK for {filters:?}");
        refused += want.iter().filter(|c| **c == 0x80).count() as i64;
    }
    assert_eq!(gw.metric(DENIED_SUB), refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_qos1_and_qos2_publishes_are_acknowledged_dropped_and_the_client_keeps_working() {
    let gw = Gateway::start();
    let a = gw.issue("dev-a");
    let mut watcher = sec::local(gw.plain(), "watcher").await;
    assert_eq!(watcher.subscribe(1, &[("#", 2)]).await, vec![2]);
    let mut dev = sec::device(gw.mqtts(), &a).await;

    // QoS 0: no answer, nothing delivered.
    dev.send(&wire::publish("devices/dev-b/x", b"denied-q0", 0, 0))
        .await;
    // QoS 1: PUBACK.
    dev.send(&wire::publish("devices/dev-b/x", b"denied-q1", 1, 10))
        .await;
    dev.expect_exact(PUBACK, &10u16.to_be_bytes(), "PUBACK for denied QoS 1")
        .await;
    // QoS 2: PUBREC, then PUBREL answered with PUBCOMP.
    dev.send(&wire::publish("devices/dev-b/x", b"denied-q2", 2, 11))
        .await;
    dev.expect_exact(PUBREC, &11u16.to_be_bytes(), "PUBREC for denied QoS 2")
        .await;
    dev.send(&wire::ack(6, 11)).await;
    dev.expect_exact(PUBCOMP, &11u16.to_be_bytes(), "PUBCOMP for denied QoS 2")
        .await;

    // The same session goes on working, reusing the packet ids, at every QoS.
    dev.send(&wire::publish("devices/dev-a/x", b"ok-q0", 0, 0))
        .await;
    dev.send(&wire::publish("devices/dev-a/x", b"ok-q1", 1, 10))
        .await;
    dev.expect_exact(PUBACK, &10u16.to_be_bytes(), "PUBACK for allowed QoS 1")
        .await;
    dev.send(&wire::publish("devices/dev-a/x", b"ok-q2", 2, 11))
        .await;
    dev.expect_exact(PUBREC, &11u16.to_be_bytes(), "PUBREC for allowed QoS 2")
        .await;
    dev.send(&wire::ack(6, 11)).await;
    dev.expect_exact(PUBCOMP, &11u16.to_be_bytes(), "PUBCOMP for allowed QoS 2")
        .await;
    assert_eq!(dev.subscribe(5, &[("devices/dev-a/cmd", 1)]).await, vec![1]);

    dev.send(&wire::publish("devices/dev-a/x", b"sentinel", 1, 12))
        .await;
    dev.expect_exact(PUBACK, &12u16.to_be_bytes(), "PUBACK for sentinel")
        .await;

    // Everything the watcher got before the sentinel: the allowed messages only.
    let got = watcher.sorted_payloads_until(b"sentinel").await;
    assert_eq!(
        got,
        vec![b"ok-q0".to_vec(), b"ok-q1".to_vec(), b"ok-q2".to_vec()]
    );
    assert_eq!(gw.metric(DENIED_PUB), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_publish_closes_the_connection_when_policy_is_disconnect() {
    let gw = Gateway::start_with("[acl]\non_denied_publish = \"disconnect\"\n");
    let a = gw.issue("dev-a");
    let mut watcher = sec::local(gw.plain(), "watcher").await;
    assert_eq!(watcher.subscribe(1, &[("#", 1)]).await, vec![1]);
    let mut dev = sec::device(gw.mqtts(), &a).await;

    dev.send(&wire::publish("devices/dev-a/x", b"allowed", 1, 1))
        .await;
    dev.expect_exact(PUBACK, &1u16.to_be_bytes(), "PUBACK for allowed")
        .await;
    dev.send(&wire::publish("devices/dev-b/x", b"denied", 1, 2))
        .await;
    // No PUBACK: the connection is closed.
    match dev.next(LIMIT).await {
        Err(NoPacket::Closed) => {}
        other => panic!("expected the connection to be closed, got {other:?}"),
    }
    assert_eq!(gw.metric(DENIED_PUB), 1);

    // The device is not banned: it reconnects and works.
    let mut again = sec::device(gw.mqtts(), &a).await;
    again
        .send(&wire::publish("devices/dev-a/x", b"sentinel", 1, 1))
        .await;
    again
        .expect_exact(PUBACK, &1u16.to_be_bytes(), "PUBACK after reconnect")
        .await;
    let got = watcher.payloads_until(b"sentinel").await;
    assert_eq!(
        got,
        vec![("devices/dev-a/x".to_string(), b"allowed".to_vec())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_on_a_forbidden_topic_is_refused_at_connect() {
    let gw = Gateway::start();
    let a = gw.issue("dev-a");
    let mut watcher = sec::local(gw.plain(), "watcher").await;
    assert_eq!(watcher.subscribe(1, &[("#", 1)]).await, vec![1]);

    for topic in ["devices/dev-b/status", "devices/+/status", "status"] {
        let mut c = sec::Raw {
            s: sec::tls_connect(gw.mqtts(), &a)
                .await
                .expect("TLS handshake"),
        };
        let mut connect = wire::Connect::new("dev-a");
        connect.will = Some((topic, b"forged will", 1));
        assert_eq!(c.connect(&connect).await, 5, "CONNACK for will on {topic}");
        assert!(
            c.closed_within(LIMIT).await,
            "connection left open after refusal"
        );
    }
    assert_eq!(gw.metric(DENIED_PUB), 3);

    // A will on the device's own topic is accepted and delivered when the device vanishes.
    let mut c = sec::Raw {
        s: sec::tls_connect(gw.mqtts(), &a)
            .await
            .expect("TLS handshake"),
    };
    let mut connect = wire::Connect::new("dev-a");
    connect.will = Some(("devices/dev-a/status", b"offline", 1));
    assert_eq!(c.connect(&connect).await, 0);
    drop(c);
    // The accepted will arrives, and no forged one before it.
    let got = watcher.payloads_until(b"offline").await;
    assert!(got.is_empty(), "forged wills delivered: {got:?}");
    assert_eq!(gw.metric(DENIED_PUB), 3);
}

/// The default ACL lets a device read the uplink state; the routing core (rumqttd 0.20)
/// drops a connection that subscribes to any `$` filter, so the state topic is not a `$`
/// topic, and `$` filters are refused by the front door (0x80) before they reach the core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_may_subscribe_to_uplink_state_without_losing_its_session() {
    let gw = Gateway::start();
    let a = gw.issue("dev-a");
    let mut dev = sec::device(gw.mqtts(), &a).await;
    let codes = dev
        .subscribe(
            1,
            &[
                ("devices/dev-a/cmd", 1),
                ("outpost/uplink/state", 0),
                ("$SYS/#", 0),
            ],
        )
        .await;
    assert_eq!(codes, vec![1, 0, 0x80]);
    let (topic, _, state) = dev
        .next_publish(std::time::Duration::from_secs(5))
        .await
        .expect("the retained uplink state is delivered");
    assert_eq!(topic, "outpost/uplink/state");
    assert!(String::from_utf8_lossy(&state).contains("\"state\":\"offline\""));
    dev.send(&wire::publish("devices/dev-a/x", b"still here", 1, 2))
        .await;
    dev.expect_exact(PUBACK, &2u16.to_be_bytes(), "PUBACK after the subscription")
        .await;
    assert_eq!(gw.metric(DENIED_SUB), 1);
}
