//! Flow-control behaviour of the front door's proxy.
mod common;

use common::Gateway;
use outpost::frontdoor::mqtt;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn publish_qos1(topic: &str, pid: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pid.to_be_bytes());
    body.extend_from_slice(b"x");
    let mut p = vec![0x32, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

/// A burst of refused QoS 1 publishes, far more than the internal queue holds, is answered
/// in full: the front door's own acknowledgements never wait on the client-bound pump.
#[test]
fn burst_of_denied_publishes_is_fully_acknowledged() {
    let gw = Gateway::start();
    let mut s = plain_connect(&gw, "burst");
    const N: u16 = 500;
    let mut burst = Vec::new();
    for pid in 1..=N {
        // `$`-topics are outside the local clients' `#` pattern: refused, acknowledged.
        burst.extend_from_slice(&publish_qos1("$denied/x", pid));
    }
    s.write_all(&burst).unwrap();
    let mut acks = vec![0u8; 4 * N as usize];
    s.read_exact(&mut acks).expect("all PUBACKs arrive");
    for (i, a) in acks.chunks(4).enumerate() {
        assert_eq!(a[0], 0x40);
        assert_eq!(u16::from_be_bytes([a[2], a[3]]), i as u16 + 1);
    }
    assert_eq!(
        gw.metric("outpost_acl_denied_total{op=\"publish\"}"),
        N as i64
    );
}

#[path = "cloud/mod.rs"]
mod cloud;

/// SIGTERM drains: a device that just published gets its PUBACK and then a clean TLS close
/// (close_notify), not a cut connection.
#[test]
fn sigterm_drains_sessions_and_closes_tls_cleanly() {
    let mut gw = Gateway::start();
    let dev = gw.issue("drain-1");
    let tls = cloud::tls_client_config(&dev.ca, &dev.cert, &dev.key);
    let tcp = TcpStream::connect(gw.mqtts()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(gw.mqtts().ip().into());
    let conn = rustls::ClientConnection::new(tls, name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    mqtt_connect(&mut s, "drain-1");
    s.write_all(&publish_qos1("devices/drain-1/x", 7)).unwrap();
    s.flush().unwrap();
    gw.signal("TERM");
    let mut rest = Vec::new();
    let r = s.read_to_end(&mut rest);
    assert!(
        r.is_ok(),
        "connection was cut without TLS close_notify: {r:?}"
    );
    assert_eq!(
        rest,
        vec![0x40, 2, 0, 7],
        "PUBACK for the last publish, then a clean close"
    );
    assert!(gw.wait(Duration::from_secs(10)).expect("exits").success());
}

/// CONNECT as `id` and expect CONNACK 0.
fn mqtt_connect(s: &mut (impl Read + Write), id: &str) {
    let connect = mqtt::encode_connect(&mqtt::Connect {
        clean_session: true,
        keep_alive: 30,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
    });
    s.write_all(&connect).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK for {id}");
}

fn plain_connect(gw: &Gateway, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(gw.plain()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    mqtt_connect(&mut s, id);
    s
}

fn subscribe_ok(s: &mut TcpStream, filter: &str) {
    let mut body = vec![0, 1];
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(1);
    let mut p = vec![0x82, body.len() as u8];
    p.extend_from_slice(&body);
    s.write_all(&p).unwrap();
    let mut ack = [0u8; 5];
    s.read_exact(&mut ack)
        .expect("SUBACK (the session must survive)");
    assert_eq!(ack, [0x90, 3, 0, 1, 1]);
}

/// A client that reconnects right after its old connection died (or while it still lives)
/// gets a working session: the old one is ended first, so the core's clean-up of the old
/// connection can never tear down the new one.
#[test]
fn reconnect_with_the_same_identity_takes_over_cleanly() {
    let gw = Gateway::start();
    for round in 0..30 {
        let mut a = plain_connect(&gw, "twin");
        if round % 2 == 0 {
            drop(a); // abrupt: no DISCONNECT
            let mut b = plain_connect(&gw, "twin");
            subscribe_ok(&mut b, "devices/twin/x");
        } else {
            subscribe_ok(&mut a, "devices/twin/y");
            let mut b = plain_connect(&gw, "twin");
            subscribe_ok(&mut b, "devices/twin/x");
            let mut rest = Vec::new();
            let _ = a.read_to_end(&mut rest);
            assert!(rest.is_empty(), "the old session is closed, not answered");
        }
    }
    assert!(gw.metric("outpost_forced_disconnects_total{reason=\"taken_over\"}") >= 15);
}
