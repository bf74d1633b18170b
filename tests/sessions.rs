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
