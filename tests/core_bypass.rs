//! The routing core (rumqttd on a hidden loopback port) cannot be used without going through
//! the front door: a CONNECT without the per-start secret is refused and whatever follows it
//! on that connection is never routed; the secret opens it.

mod common;

use common::security_helpers as sec;
use outpost::broker::BrokerLink;
use sec::wire;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const CONNACK_ACCEPTED: [u8; 4] = [0x20, 2, 0, 0];

/// One routing core for the whole file, started exactly as `outpost run` starts it.
fn core() -> &'static BrokerLink {
    static CORE: OnceLock<BrokerLink> = OnceLock::new();
    CORE.get_or_init(|| {
        outpost::broker::start(&Default::default(), core_limits()).expect("start routing core")
    })
}

fn dial(link: &BrokerLink) -> TcpStream {
    let s = TcpStream::connect(link.addr).expect("connect to the core port");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Send `bytes`, then read until the core closes the connection; panic if it stays open.
fn bytes_until_closed(link: &BrokerLink, bytes: &[u8]) -> Vec<u8> {
    let mut s = dial(link);
    s.write_all(bytes).expect("send");
    let deadline = Instant::now() + sec::LIMIT;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return got, // reset
        }
        assert!(
            Instant::now() < deadline,
            "the core kept the connection open; received {got:?}"
        );
    }
}

fn assert_refused(link: &BrokerLink, connect: &wire::Connect<'_>, what: &str) {
    let got = bytes_until_closed(link, &connect.encode());
    assert!(
        !got.starts_with(&CONNACK_ACCEPTED),
        "{what}: the core accepted the connection"
    );
}

/// A session authenticated with the secret (what the front door does for every client).
fn authorised(link: &BrokerLink, client_id: &str) -> TcpStream {
    let mut s = dial(link);
    let mut c = wire::Connect::new(client_id);
    c.username = Some(client_id);
    c.password = Some(link.secret.as_bytes());
    s.write_all(&c.encode()).unwrap();
    let mut ack = [0u8; 4];
    read_exact_within(&mut s, &mut ack);
    assert_eq!(ack, CONNACK_ACCEPTED, "the secret must open the core");
    s
}

fn read_exact_within(s: &mut TcpStream, buf: &mut [u8]) {
    let deadline = Instant::now() + sec::LIMIT;
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) => panic!("closed after {n} bytes"),
            Ok(k) => n += k,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read: {e}"),
        }
        assert!(Instant::now() < deadline, "read timed out after {n} bytes");
    }
}

#[test]
fn core_listens_on_loopback_with_a_long_random_secret() {
    let link = core();
    assert!(link.addr.ip().is_loopback(), "{}", link.addr);
    assert!(link.secret.len() >= 32, "secret too short");
    let other = outpost::broker::start(&Default::default(), core_limits()).unwrap();
    assert_ne!(other.secret, link.secret, "each start has its own secret");
    assert_ne!(other.addr, link.addr);
}

#[test]
fn connect_without_credentials_is_refused() {
    assert_refused(
        core(),
        &wire::Connect::new("intruder"),
        "no username, no password",
    );
    // Empty client id too (the core would otherwise assign one).
    assert_refused(
        core(),
        &wire::Connect::new(""),
        "empty client id, no credentials",
    );
}

#[test]
fn connect_with_a_wrong_password_is_refused() {
    let link = core();
    let secret = link.secret.as_bytes();
    let mut flipped = secret.to_vec();
    flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
    let mut longer = secret.to_vec();
    longer.push(b'0');
    let wrong: [(&str, Option<&[u8]>); 6] = [
        ("username only", None),
        ("empty password", Some(b"")),
        ("guess", Some(b"password")),
        ("one character off", Some(&flipped)),
        ("prefix of the secret", Some(&secret[..secret.len() - 1])),
        ("secret plus a byte", Some(&longer)),
    ];
    for (what, password) in wrong {
        let mut c = wire::Connect::new("intruder");
        c.username = Some("intruder");
        c.password = password;
        assert_refused(link, &c, what);
    }
}

#[test]
fn connect_with_the_secret_is_accepted_and_routes() {
    let link = core();
    let mut sub = authorised(link, "bypass-sub");
    sub.write_all(&wire::subscribe(1, &[("bypass/#", 0)]))
        .unwrap();
    let mut suback = [0u8; 5];
    read_exact_within(&mut sub, &mut suback);
    assert_eq!(suback, [0x90, 3, 0, 1, 0]);

    // An intruder pipelines a PUBLISH behind its unauthenticated CONNECT: never routed.
    let mut attack = wire::Connect::new("intruder").encode();
    attack.extend(wire::publish("bypass/x", b"smuggled", 0, 0));
    let got = bytes_until_closed(link, &attack);
    assert!(!got.starts_with(&CONNACK_ACCEPTED));

    // The legitimate path delivers; the first thing the subscriber sees is the sentinel.
    let mut publisher = authorised(link, "bypass-pub");
    let sentinel = wire::publish("bypass/x", b"sentinel", 0, 0);
    publisher.write_all(&sentinel).unwrap();
    let mut first = vec![0u8; sentinel.len()];
    read_exact_within(&mut sub, &mut first);
    assert_eq!(
        first, sentinel,
        "the subscriber received something else first"
    );
}

/// The routing core sized by the default `[limits]`, as `outpost run` starts it.
fn core_limits() -> outpost::broker::CoreLimits {
    let l = outpost::config::LimitsConfig::default();
    outpost::broker::CoreLimits {
        max_packet_size: l.max_packet_size,
        max_inflight: l.max_inflight,
        max_connections: l.max_connections,
    }
}
