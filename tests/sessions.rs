//! Session semantics on the plain listener (issue 11, "session semantics"): connection churn
//! with persistent sessions loses nothing, an empty client id with CleanSession 0 is
//! refused ([MQTT-3.1.3-8]), and the client ids local tools send are accepted.
mod common;

use common::{expect_packet, read_packet, wire, Gateway};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// CONNECT with the given clean-session flag and raw client id bytes (no will, no login).
fn connect_raw(client_id: &[u8], clean: bool) -> Vec<u8> {
    let mut body = wire::string(b"MQTT");
    body.push(4);
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend(30u16.to_be_bytes());
    body.extend(wire::string(client_id));
    wire::packet(0x10, &body)
}

/// How one churn cycle ended.
enum Cycle {
    Ok,
    /// CONNACK 0, then the connection closed (or failed) before the SUBACK.
    Lost(String),
}

/// connect (CleanSession 0) → CONNACK 0 → SUBSCRIBE → SUBACK → DISCONNECT.
async fn churn_cycle(addr: SocketAddr, id: &str) -> Cycle {
    let limit = Duration::from_secs(10);
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect plain");
    s.set_nodelay(true).unwrap();
    s.write_all(&connect_raw(id.as_bytes(), false))
        .await
        .expect("send CONNECT");
    let ack = expect_packet(&mut s, limit, "CONNACK").await;
    assert_eq!(ack.kind(), 2, "{id}: expected CONNACK, got {ack:?}");
    assert_eq!(ack.body, [0, 0], "{id}: CONNACK {ack:?}");
    // Each its own command topic, as devices do.
    let filter = format!("churn/{id}/cmd");
    if let Err(e) = s.write_all(&wire::subscribe(1, &filter, 1)).await {
        return Cycle::Lost(format!("{id}: SUBSCRIBE not sent: {e}"));
    }
    match tokio::time::timeout(limit, read_packet(&mut s)).await {
        Ok(Ok(Some(p))) if p.kind() == 9 => {
            assert_eq!(p.body, [0, 1, 1], "{id}: SUBACK {p:?}");
        }
        Ok(Ok(Some(p))) => panic!("{id}: expected SUBACK, got {p:?}"),
        Ok(Ok(None)) => return Cycle::Lost(format!("{id}: closed after CONNACK")),
        Ok(Err(e)) => return Cycle::Lost(format!("{id}: {e} after CONNACK")),
        Err(_) => panic!("{id}: no SUBACK within {limit:?}"),
    }
    let _ = s.write_all(&wire::DISCONNECT).await;
    Cycle::Ok
}

/// The reconnect storm after an outage: many short persistent sessions with fresh client
/// ids, several at a time. The routing core reuses connection slots; a late teardown of a
/// previous occupant of a slot must never end the connection now in it.
#[test]
fn churn_of_persistent_sessions_loses_no_connection() {
    // 5,600 connections, 16 at a time.
    let (workers, per_worker) = (16, 350);
    let gw = Gateway::start();
    let addr = gw.plain();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let lost = Arc::new(AtomicUsize::new(0));
    let examples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (lost, examples) = (lost.clone(), examples.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..per_worker {
                    if let Cycle::Lost(why) = churn_cycle(addr, &format!("churn-{w}-{i}")).await {
                        lost.fetch_add(1, Ordering::Relaxed);
                        let mut ex = examples.lock().unwrap();
                        if ex.len() < 5 {
                            ex.push(why);
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("churn worker");
        }
    });
    let total = workers * per_worker;
    let lost = lost.load(Ordering::Relaxed);
    eprintln!(
        "churn: {lost} of {total} connections lost ({:.2} %) in {:?}",
        100.0 * lost as f64 / total as f64,
        start.elapsed()
    );
    assert_eq!(
        lost,
        0,
        "{lost} of {total} connections closed after CONNACK, e.g. {:?}",
        examples.lock().unwrap()
    );
    // Every connection was an ordinary one: the core never ended one the client had not.
    let log = common::strip_ansi(&gw.log());
    assert!(!log.contains("CoreClosed"), "{log}");
}

/// Send `connect`; returns the CONNACK return code and whether the gateway closed the
/// connection right after it (within 5 s) when it refused.
async fn connack<S>(s: &mut S, connect: &[u8]) -> (u8, bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(connect).await.expect("send CONNECT");
    let p = expect_packet(s, Duration::from_secs(5), "CONNACK").await;
    assert_eq!(p.kind(), 2, "expected CONNACK, got {p:?}");
    assert_eq!(p.body.len(), 2, "CONNACK {p:?}");
    let code = p.body[1];
    let closed = code != 0
        && common::wait_closed(s, Duration::from_secs(5))
            .await
            .is_some();
    (code, closed)
}

async fn plain(addr: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect plain");
    s.set_nodelay(true).unwrap();
    s
}

/// SUBSCRIBE at QoS 1 and expect the SUBACK granting it.
async fn subscribed<S>(s: &mut S, filter: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(&wire::subscribe(7, filter, 1))
        .await
        .expect("send SUBSCRIBE");
    let p = expect_packet(s, Duration::from_secs(5), "SUBACK").await;
    assert_eq!((p.kind(), p.body.as_slice()), (9, &[0, 7, 1][..]), "{p:?}");
}

/// [MQTT-3.1.3-8]: a zero-byte client id with CleanSession 0 is refused with CONNACK 0x02
/// and the connection closed, on both listeners. With CleanSession 1 the gateway assigns an
/// id of its own to each such client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_client_id_is_refused_for_a_persistent_session_and_assigned_otherwise() {
    let gw = Gateway::start();
    let refused = "outpost_connections_refused_identity_total";

    let mut s = plain(gw.plain()).await;
    assert_eq!(connack(&mut s, &connect_raw(b"", false)).await, (2, true));
    assert_eq!(gw.metric(refused), 1);

    // CleanSession 1: accepted, and two such clients are two sessions (neither takes over
    // the other).
    let mut a = plain(gw.plain()).await;
    assert_eq!(connack(&mut a, &connect_raw(b"", true)).await, (0, false));
    let mut b = plain(gw.plain()).await;
    assert_eq!(connack(&mut b, &connect_raw(b"", true)).await, (0, false));
    subscribed(&mut b, "sessions/assigned").await;
    subscribed(&mut a, "sessions/assigned").await;
    assert_eq!(
        gw.metric("outpost_forced_disconnects_total{reason=\"taken_over\"}"),
        0
    );

    // A device is refused the same way, whatever its certificate says.
    let dev = gw.issue("sess-dev");
    let mut d = common::security_helpers::tls_connect(gw.mqtts(), &dev)
        .await
        .expect("TLS handshake");
    assert_eq!(connack(&mut d, &connect_raw(b"", false)).await, (2, true));
    let mut d = common::security_helpers::tls_connect(gw.mqtts(), &dev)
        .await
        .expect("TLS handshake");
    assert_eq!(
        connack(&mut d, &connect_raw(b"sess-dev", false)).await,
        (0, false)
    );
    assert_eq!(gw.metric(refused), 2);
}

/// Client ids with control characters (log and terminal injection) or over 256 bytes are
/// refused with CONNACK 2 and the connection closed; 256 bytes of any printable UTF-8 are
/// accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_and_overlong_client_ids_are_refused() {
    let gw = Gateway::start();
    let long = "x".repeat(257);
    let bad: [&[u8]; 6] = [
        b"bad\x01id",
        b"line\nbreak",
        b"tab\tid",
        b"\x1b[31mred",
        "c1\u{85}".as_bytes(),
        long.as_bytes(),
    ];
    for id in bad {
        let mut s = plain(gw.plain()).await;
        assert_eq!(
            connack(&mut s, &connect_raw(id, true)).await,
            (2, true),
            "{:?}",
            String::from_utf8_lossy(id)
        );
    }
    assert_eq!(
        gw.metric("outpost_connections_refused_identity_total"),
        bad.len() as i64
    );
    let edge = format!("{}é", "x".repeat(254)); // 256 bytes
    let mut s = plain(gw.plain()).await;
    assert_eq!(
        connack(&mut s, &connect_raw(edge.as_bytes(), false)).await,
        (0, false)
    );
    subscribed(&mut s, "sessions/edge").await;
}

/// What stock tools send works end to end: ids with spaces and `|` (mosquitto's old
/// default `mosqpub|1234-host`), and a persistent session whose id holds a space and a `/`
/// (characters the routing core refuses in client ids) is resumed with what was queued
/// for it.
#[test]
fn client_ids_with_spaces_work_end_to_end_with_mosquitto_clients() {
    use common::security_helpers::{self as sec, plain_args, strs, Proc};
    common::require_mosquitto();
    let gw = Gateway::start();
    let conn = plain_args(gw.plain());
    let with = |extra: &[&str]| {
        let mut a = conn.clone();
        a.extend(strs(extra));
        a
    };

    let mut sub = Proc::subscriber(with(&["-i", "my subscriber"]), "sessions/space", 1);
    let out = sec::mosquitto_pub(&with(&[
        "-i",
        "mosqpub|1234-my host",
        "-t",
        "sessions/space",
        "-q",
        "1",
        "-m",
        "hello",
    ]));
    assert!(out.status.success(), "{}", sec::text(&out));
    sub.wait_message("hello");
    drop(sub);

    let id = "kitchen/sensor 1";
    let out = sec::run_bounded(
        std::process::Command::new("mosquitto_sub").args(with(&[
            "-c",
            "-i",
            id,
            "-q",
            "1",
            "-t",
            "sessions/cmd",
            "-E",
        ])),
        sec::LIMIT,
    );
    assert!(out.status.success(), "{}", sec::text(&out));
    let out = sec::mosquitto_pub(&with(&["-t", "sessions/cmd", "-q", "1", "-m", "queued"]));
    assert!(out.status.success(), "{}", sec::text(&out));
    let out = sec::run_bounded(
        std::process::Command::new("mosquitto_sub").args(with(&[
            "-c",
            "-i",
            id,
            "-q",
            "1",
            "-t",
            "sessions/cmd",
            "-C",
            "1",
            "-W",
            "10",
        ])),
        sec::LIMIT,
    );
    assert!(out.status.success(), "{}", sec::text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "queued");
    let log = common::strip_ansi(&gw.log());
    assert!(
        log.contains("core_id=local~kitchen%2Fsensor 1"),
        "core id in the log: {log}"
    );
}

/// A client that goes quiet is closed by the core after 1.5 × its keep-alive: an expected
/// end (info), not the `CoreClosed` warning meant for sessions the core ends unasked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_expiry_is_not_an_unexpected_core_close() {
    let gw = Gateway::start();
    let mut s = plain(gw.plain()).await;
    s.write_all(&wire::connect("quiet", 1)).await.unwrap();
    let ack = expect_packet(&mut s, Duration::from_secs(5), "CONNACK").await;
    assert_eq!(ack.body, [0, 0]);
    let t = Instant::now();
    assert!(
        common::wait_closed(&mut s, Duration::from_secs(10))
            .await
            .is_some(),
        "not closed after keep-alive 1 s"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    common::security_helpers::wait_until(Duration::from_secs(5), "keep-alive log line", || {
        gw.log().contains("keep-alive expired")
    });
    let log = common::strip_ansi(&gw.log());
    assert!(!log.contains("CoreClosed"), "{log}");
    assert_eq!(
        gw.metric("outpost_forced_disconnects_total{reason=\"core\"}"),
        0
    );
}

/// A session the core does end unasked (here: the client acknowledges a publish it never
/// got, and the core drops it) is a warning with `end=CoreClosed`, counted, and the
/// warnings are limited gateway-wide (`frontdoor.warn_burst`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unexpected_core_close_is_a_rate_limited_warning() {
    let gw = Gateway::start_with("[frontdoor]\nwarn_burst = 2\n");
    for i in 0..4 {
        let mut s = plain(gw.plain()).await;
        assert_eq!(
            connack(
                &mut s,
                &connect_raw(format!("stray-ack-{i}").as_bytes(), true)
            )
            .await,
            (0, false)
        );
        s.write_all(&wire::ack(4, 42)).await.unwrap();
        assert!(
            common::wait_closed(&mut s, Duration::from_secs(5))
                .await
                .is_some(),
            "the core keeps a session that acknowledged an unknown packet id"
        );
    }
    let core = "outpost_forced_disconnects_total{reason=\"core\"}";
    assert_eq!(
        common::wait_metric(&gw, core, Duration::from_secs(5), |v| v == 4),
        4
    );
    let log = common::strip_ansi(&gw.log());
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("end=CoreClosed"))
        .count();
    assert_eq!(warned, 2, "{log}");
    assert_eq!(gw.metric("outpost_log_suppressed_total"), 2);
}
