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
    let mut s = TcpStream::connect(gw.plain()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let connect = mqtt::encode_connect(&mqtt::Connect {
        clean_session: true,
        keep_alive: 30,
        client_id: "burst".into(),
        will: None,
        username: None,
        password: None,
    });
    s.write_all(&connect).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
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
