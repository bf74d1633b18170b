//! Robustness of the front door against clients that stall, misbehave or send garbage.
//!
//! Every test runs the real binary (see `common`) and talks to it over real sockets.
//! The fuzz test is seeded: set `OUTPOST_FUZZ_SEED` to replay a failing run.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Sockets that occupy the TLS listener without ever completing a handshake: a third never
/// send a byte, a third send half a ClientHello, a third send a whole ClientHello and then
/// never answer the server.
async fn stall_tls(addr: SocketAddr, hello: &[u8], n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(addr).await.expect("stalled connect");
        match i % 3 {
            0 => {}
            1 => s.write_all(&hello[..hello.len() / 2]).await.unwrap(),
            _ => s.write_all(hello).await.unwrap(),
        }
        out.push(s);
    }
    out
}

fn assert_no_panics(gw: &Gateway) {
    let log = gw.log();
    assert!(!log.contains("panicked"), "the gateway panicked:\n{log}");
}

#[test]
fn stalled_tls_handshakes_do_not_delay_a_device() {
    require_mosquitto();
    let gw = Gateway::start();
    let dev = gw.issue("dev-good");
    let rt = runtime();
    rt.block_on(async {
        let hello = client_hello(device_tls_config(&dev));
        let stalled = stall_tls(gw.mqtts(), &hello, 50).await;
        // Let the gateway accept every stalled socket before the device arrives.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let connack = device_roundtrip(gw.mqtts(), gw.plain(), &dev, "while-stalled").await;
        assert!(
            connack < Duration::from_secs(1),
            "device waited {connack:?} for CONNACK behind 50 stalled handshakes"
        );

        // A stock client too: mosquitto_pub with the device certificate, QoS 1.
        let mut sub = plain_session(gw.plain(), "watch-mosq").await;
        mqtt_subscribe(&mut sub, "devices/dev-good/mosq", 0).await;
        let started = Instant::now();
        let out = std::process::Command::new("timeout")
            .arg("10")
            .arg("mosquitto_pub")
            .args(tls_args(gw.mqtts(), &dev))
            .args([
                "-i",
                "dev-good",
                "-q",
                "1",
                "-t",
                "devices/dev-good/mosq",
                "-m",
                "hello",
            ])
            .output()
            .expect("run mosquitto_pub");
        assert!(
            out.status.success(),
            "mosquitto_pub failed after {:?}: {}",
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr)
        );
        let got = expect_publish(&mut sub, "devices/dev-good/mosq", Duration::from_secs(5)).await;
        assert_eq!(got, b"hello");

        // The stalled sockets are still open: nobody gave up on them yet (timeout is 10 s).
        assert_eq!(gw.metric("outpost_tls_handshake_timeouts_total"), 0);
        drop(stalled);
    });
    assert_no_panics(&gw);
}

#[test]
fn handshake_and_connect_timeouts_close_idle_sockets() {
    let gw =
        Gateway::start_with("[limits]\ntls_handshake_timeout = \"2s\"\nconnect_timeout = \"2s\"\n");
    let dev = gw.issue("dev-idle");
    let rt = runtime();
    rt.block_on(async {
        let hello = client_hello(device_tls_config(&dev));
        let stalled = stall_tls(gw.mqtts(), &hello, 50).await;
        let mut waits = tokio::task::JoinSet::new();
        for (i, mut s) in stalled.into_iter().enumerate() {
            waits.spawn(async move { (i, wait_closed(&mut s, Duration::from_secs(10)).await) });
        }
        // The device is not delayed while the stalled sockets wait for their timeout.
        let connack = device_roundtrip(gw.mqtts(), gw.plain(), &dev, "before-timeout").await;
        assert!(connack < Duration::from_secs(1), "CONNACK took {connack:?}");

        while let Some(r) = waits.join_next().await {
            let (i, closed) = r.unwrap();
            let after =
                closed.unwrap_or_else(|| panic!("stalled socket {i} still open after 10 s"));
            assert!(
                after >= Duration::from_millis(1800) && after <= Duration::from_secs(6),
                "stalled socket {i} closed after {after:?}; tls_handshake_timeout is 2 s"
            );
        }
        let n = wait_metric(
            &gw,
            "outpost_tls_handshake_timeouts_total",
            Duration::from_secs(3),
            |v| v >= 50,
        );
        assert_eq!(n, 50, "every stalled handshake is counted once");

        // Handshake done, valid certificate, but no CONNECT: closed after connect_timeout.
        let before = gw.metric("outpost_connect_timeouts_total");
        assert_eq!(before, 0);
        let mut tls = tls_connect(gw.mqtts(), device_tls_config(&dev))
            .await
            .expect("TLS handshake");
        let after = wait_closed(&mut tls, Duration::from_secs(10))
            .await
            .expect("TLS client without CONNECT left open");
        assert!(
            after >= Duration::from_millis(1800) && after <= Duration::from_secs(6),
            "TLS session without CONNECT closed after {after:?}; connect_timeout is 2 s"
        );
        let n = wait_metric(
            &gw,
            "outpost_connect_timeouts_total",
            Duration::from_secs(3),
            |v| v >= 1,
        );
        assert_eq!(n, 1);
        // That was a completed handshake, not another handshake timeout.
        assert_eq!(gw.metric("outpost_tls_handshake_timeouts_total"), 50);

        // Same on the plain listener.
        let mut plain = TcpStream::connect(gw.plain()).await.unwrap();
        let after = wait_closed(&mut plain, Duration::from_secs(10))
            .await
            .expect("plain client without CONNECT left open");
        assert!(
            after >= Duration::from_millis(1800),
            "plain socket closed after {after:?}"
        );
        let n = wait_metric(
            &gw,
            "outpost_connect_timeouts_total",
            Duration::from_secs(3),
            |v| v >= 2,
        );
        assert_eq!(n, 2);

        device_roundtrip(gw.mqtts(), gw.plain(), &dev, "after-timeouts").await;
    });
    assert_no_panics(&gw);
}

#[test]
fn connection_limit_refuses_and_recovers() {
    let gw = Gateway::start_with("[limits]\nmax_connections = 5\n");
    let dev = gw.issue("dev-lim");
    let rt = runtime();
    rt.block_on(async {
        // Four local sessions and one device session: the limit spans both listeners.
        let mut held = Vec::new();
        for i in 0..4 {
            held.push(plain_session(gw.plain(), &format!("lim-{i}")).await);
        }
        let mut device = tls_connect(gw.mqtts(), device_tls_config(&dev))
            .await
            .expect("5th connection (TLS)");
        assert_eq!(
            mqtt_connect(&mut device, "dev-lim", Duration::from_secs(5)).await,
            0
        );
        assert_eq!(gw.metric("outpost_connections_open"), 5);
        assert_eq!(
            gw.metric("outpost_connections_refused_total{reason=\"limit\"}"),
            0
        );

        // The 6th (plain) is closed without an answer.
        let mut sixth = TcpStream::connect(gw.plain()).await.unwrap();
        let _ = sixth.write_all(&wire::connect("lim-6", 30)).await;
        match tokio::time::timeout(Duration::from_secs(5), read_packet(&mut sixth)).await {
            Ok(Ok(None)) | Ok(Err(_)) => {}
            Ok(Ok(Some(p))) => panic!("6th connection got an answer: {p:?}"),
            Err(_) => panic!("6th connection neither answered nor closed in 5 s"),
        }
        assert_eq!(
            gw.metric("outpost_connections_refused_total{reason=\"limit\"}"),
            1
        );

        // So is a 7th on the TLS listener (before any handshake).
        let seventh = tls_connect(gw.mqtts(), device_tls_config(&dev)).await;
        if let Ok(mut s) = seventh {
            assert!(
                wait_closed(&mut s, Duration::from_secs(5)).await.is_some(),
                "7th connection left open"
            );
        }
        assert_eq!(
            gw.metric("outpost_connections_refused_total{reason=\"limit\"}"),
            2
        );

        // The five admitted sessions are unharmed.
        device.write_all(&wire::PINGREQ).await.unwrap();
        let p = expect_packet(&mut device, Duration::from_secs(5), "PINGRESP").await;
        assert_eq!(p.kind(), 13);

        // Close one; a new connection is admitted again.
        let mut gone = held.pop().unwrap();
        gone.write_all(&wire::DISCONNECT).await.unwrap();
        drop(gone);
        let open = wait_metric(
            &gw,
            "outpost_connections_open",
            Duration::from_secs(5),
            |v| v == 4,
        );
        assert_eq!(open, 4);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut again = loop {
            // The permit is released just after the gauge moves: retry briefly.
            let mut s = TcpStream::connect(gw.plain()).await.unwrap();
            s.write_all(&wire::connect("lim-again", 30)).await.unwrap();
            match tokio::time::timeout(Duration::from_secs(5), read_packet(&mut s)).await {
                Ok(Ok(Some(p))) if p.kind() == 2 && p.body == [0, 0] => break s,
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "no connection admitted after one closed: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        mqtt_subscribe(&mut again, "lim/again", 0).await;
        held[0]
            .write_all(&wire::publish("lim/again", b"x", 0, 0))
            .await
            .unwrap();
        assert_eq!(
            expect_publish(&mut again, "lim/again", Duration::from_secs(5)).await,
            b"x"
        );
        assert_eq!(gw.metric("outpost_connections_open"), 5);
    });
    assert_no_panics(&gw);
}

#[test]
fn oversized_packet_closes_only_its_connection() {
    let gw = Gateway::start_with("[limits]\nmax_packet_size = 1024\n");
    let rt = runtime();
    rt.block_on(async {
        let mut watcher = plain_session(gw.plain(), "big-watch").await;
        mqtt_subscribe(&mut watcher, "big/#", 0).await;

        // A PUBLISH of 2000 bytes: over the 1024-byte limit.
        let mut big = plain_session(gw.plain(), "big-sender").await;
        let _ = big
            .write_all(&wire::publish("big/x", &[7u8; 2000], 0, 0))
            .await;
        assert!(
            wait_closed(&mut big, Duration::from_secs(5))
                .await
                .is_some(),
            "oversized sender left open"
        );

        // A header announcing 1 MiB is refused before the body arrives.
        let mut liar = plain_session(gw.plain(), "big-liar").await;
        let mut header = vec![0x30];
        header.extend(wire::remaining_length(1 << 20));
        liar.write_all(&header).await.unwrap();
        assert!(
            wait_closed(&mut liar, Duration::from_secs(5))
                .await
                .is_some(),
            "oversized header left open"
        );
        assert_eq!(gw.metric("outpost_malformed_packets_total"), 2);

        // Nothing reached subscribers; the watcher is still connected and a packet just under
        // the limit goes through.
        let mut ok = plain_session(gw.plain(), "big-ok").await;
        ok.write_all(&wire::publish("big/ok", &[1u8; 900], 0, 0))
            .await
            .unwrap();
        let next = expect_packet(&mut watcher, Duration::from_secs(5), "in-limit PUBLISH").await;
        let topic_len = 2 + b"big/ok".len();
        assert_eq!(next.kind(), 3, "{next:?}");
        assert_eq!(
            &next.body[..topic_len],
            &wire::string(b"big/ok")[..],
            "only the in-limit message may arrive"
        );
        assert_eq!(next.body.len(), topic_len + 900);
        watcher
            .write_all(&wire::publish("big/self", b"still here", 0, 0))
            .await
            .unwrap();
        assert_eq!(
            expect_publish(&mut watcher, "big/self", Duration::from_secs(5)).await,
            b"still here"
        );
    });
    assert_no_panics(&gw);
}

/// Clients may send packets right behind CONNECT without waiting for CONNACK (MQTT 3.1.1
/// section 3.1.4); they often arrive in the same read as the CONNECT.
#[test]
fn packets_pipelined_behind_connect_are_served() {
    let gw = Gateway::start();
    let dev = gw.issue("dev-pipe");
    let rt = runtime();
    rt.block_on(async {
        let mut plain = TcpStream::connect(gw.plain()).await.unwrap();
        let burst = [
            wire::connect("pipe-local", 30),
            wire::subscribe(9, "devices/dev-pipe/#", 0),
            wire::PINGREQ.to_vec(),
        ]
        .concat();
        plain.write_all(&burst).await.unwrap();
        let connack = expect_packet(&mut plain, Duration::from_secs(5), "CONNACK").await;
        assert_eq!(
            (connack.kind(), connack.body.as_slice()),
            (2, &[0u8, 0][..])
        );
        let suback = expect_packet(
            &mut plain,
            Duration::from_secs(5),
            "SUBACK of the pipelined SUBSCRIBE",
        )
        .await;
        assert_eq!(
            (suback.kind(), suback.body.as_slice()),
            (9, &[0u8, 9, 0][..])
        );
        let pong = expect_packet(
            &mut plain,
            Duration::from_secs(5),
            "PINGRESP of the pipelined PINGREQ",
        )
        .await;
        assert_eq!(pong.kind(), 13);

        let mut tls = tls_connect(gw.mqtts(), device_tls_config(&dev))
            .await
            .expect("TLS");
        let burst = [
            wire::connect("dev-pipe", 30),
            wire::publish("devices/dev-pipe/t", b"piped", 1, 3),
        ]
        .concat();
        tls.write_all(&burst).await.unwrap();
        let connack = expect_packet(&mut tls, Duration::from_secs(5), "device CONNACK").await;
        assert_eq!(
            (connack.kind(), connack.body.as_slice()),
            (2, &[0u8, 0][..])
        );
        let puback = expect_packet(
            &mut tls,
            Duration::from_secs(5),
            "PUBACK of the pipelined PUBLISH",
        )
        .await;
        assert_eq!((puback.kind(), puback.body.as_slice()), (4, &[0u8, 3][..]));
        // The local subscriber (subscribed before the device published) got the message.
        assert_eq!(
            expect_publish(&mut plain, "devices/dev-pipe/t", Duration::from_secs(5)).await,
            b"piped".to_vec()
        );
    });
    assert_no_panics(&gw);
}

// ---------------------------------------------------------------------------------------------
// Fuzz

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// Plain MQTT listener.
    Plain,
    /// TLS listener, raw bytes instead of a handshake.
    TlsRaw,
    /// TLS listener, after a successful handshake with a valid device certificate.
    TlsMqtt,
    /// Metrics HTTP port.
    Metrics,
}

struct Case {
    target: Target,
    label: String,
    bytes: Vec<u8>,
    /// Write in this many pieces (1 = one write).
    pieces: usize,
}

struct Gen {
    rng: StdRng,
}

const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0xfe, 0x30, 0x10];

impl Gen {
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.rng.gen_range(0..=max);
        (0..n).map(|_| self.rng.gen()).collect()
    }

    fn mutate(&mut self, data: &mut Vec<u8>) {
        for _ in 0..self.rng.gen_range(1..=4) {
            let len = data.len();
            match self.rng.gen_range(0..7) {
                0 if len > 0 => {
                    let i = self.rng.gen_range(0..len);
                    data[i] ^= 1 << self.rng.gen_range(0..8);
                }
                1 if len > 0 => {
                    let i = self.rng.gen_range(0..len);
                    data[i] = self.rng.gen();
                }
                2 if len > 0 => {
                    let i = self.rng.gen_range(0..len);
                    data[i] = INTERESTING[self.rng.gen_range(0..INTERESTING.len())];
                }
                3 => {
                    let i = self.rng.gen_range(0..=len);
                    let extra = self.bytes(8);
                    data.splice(i..i, extra);
                }
                4 if len > 0 => {
                    let a = self.rng.gen_range(0..len);
                    let b = self.rng.gen_range(a..=len.min(a + 16));
                    data.drain(a..b);
                }
                5 if len > 0 => data.truncate(self.rng.gen_range(0..len)),
                _ if len > 0 => {
                    let a = self.rng.gen_range(0..len);
                    let b = self.rng.gen_range(a..=len);
                    let copy = data[a..b].to_vec();
                    data.extend(copy);
                }
                _ => data.push(self.rng.gen()),
            }
        }
    }

    fn topic(&mut self, id: &str) -> String {
        let topics = [
            format!("devices/{id}/t"),
            format!("devices/{id}/a/b/c"),
            "t".to_string(),
            "a/b".to_string(),
            "$SYS/x".to_string(),
            "$outpost/uplink/state".to_string(),
            format!("devices/{id}"),
        ];
        topics[self.rng.gen_range(0..topics.len())].clone()
    }

    fn pid(&mut self) -> u16 {
        if self.rng.gen_bool(0.2) {
            self.rng.gen()
        } else {
            self.rng.gen_range(1..20)
        }
    }

    /// A well-formed packet a client may send after CONNECT.
    fn valid_packet(&mut self, id: &str) -> Vec<u8> {
        match self.rng.gen_range(0..10) {
            0..=3 => {
                let qos = self.rng.gen_range(0..3);
                let t = self.topic(id);
                let p = self.bytes(64);
                let pid = self.pid();
                wire::publish(&t, &p, qos, pid)
            }
            4 => {
                let t = self.topic(id);
                let f = match self.rng.gen_range(0..3) {
                    0 => t,
                    1 => format!("devices/{id}/#"),
                    _ => "#".to_string(),
                };
                let pid = self.pid();
                wire::subscribe(pid, &f, self.rng.gen_range(0..3))
            }
            5 => {
                let t = self.topic(id);
                wire::unsubscribe(self.pid(), &t)
            }
            6 => {
                let kind = [4u8, 5, 6, 7][self.rng.gen_range(0..4)];
                let pid = self.pid();
                wire::ack(kind, pid)
            }
            7 | 8 => wire::PINGREQ.to_vec(),
            _ => wire::DISCONNECT.to_vec(),
        }
    }

    /// A packet broken in one of the ways the front door must refuse.
    fn broken_packet(&mut self, id: &str) -> (&'static str, Vec<u8>) {
        let t = format!("devices/{id}/t");
        match self.rng.gen_range(0..26) {
            0 => (
                "length-5-bytes",
                vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01, 0, 0],
            ),
            1 => {
                let mut p = vec![0x30, 0xff, 0xff, 0xff, 0x7f];
                p.extend(self.bytes(32));
                ("huge-remaining-length", p)
            }
            2 => {
                let mut p = wire::publish(&t, b"payload", 0, 0);
                p[1] = p[1].saturating_sub(self.rng.gen_range(1..8));
                ("length-too-short", p)
            }
            3 => {
                let mut p = wire::publish(&t, b"payload", 1, 5);
                p[1] += self.rng.gen_range(1..8);
                ("length-too-long", p)
            }
            4 => (
                "publish-qos3",
                wire::packet(0x36, &[wire::string(t.as_bytes()), vec![0, 1]].concat()),
            ),
            5 => (
                "publish-pid0",
                wire::publish(&t, b"x", self.rng.gen_range(1..3), 0),
            ),
            6 => {
                let bad: &[&[u8]] = &[
                    &[0xc3, 0x28],
                    &[0xff],
                    &[0xc0, 0xaf],
                    &[0xed, 0xa0, 0x80],
                    &[0xf8, 0x88, 0x80, 0x80, 0x80],
                ];
                let b = bad[self.rng.gen_range(0..bad.len())];
                let mut topic = format!("devices/{id}/").into_bytes();
                topic.extend_from_slice(b);
                (
                    "publish-invalid-utf8",
                    wire::packet(0x30, &wire::string(&topic)),
                )
            }
            7 => (
                "publish-nul-topic",
                wire::publish(&format!("devices/{id}/a\0b"), b"x", 0, 0),
            ),
            8 => (
                "publish-wildcard-topic",
                wire::publish(&format!("devices/{id}/#"), b"x", 1, 3),
            ),
            9 => ("publish-empty-topic", wire::publish("", b"x", 0, 0)),
            10 => (
                "publish-topic-past-end",
                wire::packet(0x30, &[0xff, 0xff, b'a', b'b']),
            ),
            11 => ("second-connect", wire::connect(id, 30)),
            12 => ("reserved-type-0", vec![0x00, 0x00]),
            13 => ("reserved-type-15", vec![0xf0, 0x02, 0, 1]),
            14 => {
                let server: &[&[u8]] = &[
                    &[0x20, 2, 0, 0],
                    &[0x90, 3, 0, 1, 0],
                    &[0xb0, 2, 0, 1],
                    &[0xd0, 0],
                ];
                (
                    "server-only-type",
                    server[self.rng.gen_range(0..server.len())].to_vec(),
                )
            }
            15 => ("subscribe-empty", wire::packet(0x82, &[0, 1])),
            16 => {
                let mut p = wire::subscribe(3, &t, 0);
                let last = p.len() - 1;
                p[last] = [3u8, 4, 0x80, 0xff][self.rng.gen_range(0..4)];
                ("subscribe-bad-options", p)
            }
            17 => ("subscribe-pid0", wire::subscribe(0, &t, 1)),
            18 => {
                let p = wire::subscribe(4, &t, 1);
                (
                    "subscribe-bad-flags",
                    [vec![0x80], p[1..].to_vec()].concat(),
                )
            }
            19 => {
                let filters = ["a/#/b", "a+/b", "", "#/x", "devices/+/#"];
                let f = filters[self.rng.gen_range(0..filters.len())];
                ("subscribe-bad-filter", wire::subscribe(5, f, 0))
            }
            20 => ("pingreq-with-body", vec![0xc0, 1, 0]),
            21 => ("pingreq-bad-flags", vec![0xc1, 0]),
            22 => ("disconnect-with-body", vec![0xe0, 2, 0, 0]),
            23 => {
                let kind = [4u8, 5, 7][self.rng.gen_range(0..3)];
                ("ack-truncated", vec![kind << 4, 1, 0])
            }
            24 => ("pubrel-bad-flags", vec![0x60, 2, 0, 1]),
            _ => {
                let mut p = wire::unsubscribe(6, &t);
                self.mutate(&mut p);
                ("unsubscribe-garbled", p)
            }
        }
    }

    /// A CONNECT, valid or broken in a CONNECT-specific way.
    fn connect(&mut self, id: &str) -> (&'static str, Vec<u8>) {
        let body_with = |name: &[u8], level: u8, flags: u8, ka: u16, rest: &[u8]| {
            let mut b = wire::string(name);
            b.push(level);
            b.push(flags);
            b.extend(ka.to_be_bytes());
            b.extend_from_slice(rest);
            wire::packet(0x10, &b)
        };
        let cid = wire::string(id.as_bytes());
        match self.rng.gen_range(0..18) {
            0..=4 => ("connect", wire::connect(id, self.rng.gen_range(0..120))),
            5 => ("connect-mqtt31", body_with(b"MQIsdp", 3, 2, 30, &cid)),
            6 => (
                "connect-mqtt5",
                body_with(b"MQTT", 5, 2, 30, &[cid.clone(), vec![0]].concat()),
            ),
            7 => ("connect-bad-name", body_with(b"MQTX", 4, 2, 30, &cid)),
            8 => ("connect-reserved-flag", body_with(b"MQTT", 4, 3, 30, &cid)),
            9 => {
                let will = [cid.clone(), wire::string(b"w"), wire::string(b"x")].concat();
                (
                    "connect-will-qos3",
                    body_with(b"MQTT", 4, 0x02 | 0x04 | 0x18, 30, &will),
                )
            }
            10 => (
                "connect-will-retain-no-will",
                body_with(b"MQTT", 4, 0x22, 30, &cid),
            ),
            11 => {
                let rest = [cid.clone(), wire::string(b"pw")].concat();
                (
                    "connect-password-no-user",
                    body_with(b"MQTT", 4, 0x42, 30, &rest),
                )
            }
            12 => {
                let ids: &[&[u8]] = &[b"a/b", b"#", b"+", &[0xc3, 0x28], b"a\0b", b"with space"];
                let bad = ids[self.rng.gen_range(0..ids.len())];
                (
                    "connect-bad-client-id",
                    body_with(b"MQTT", 4, 2, 30, &wire::string(bad)),
                )
            }
            13 => (
                "connect-trailing-bytes",
                body_with(b"MQTT", 4, 2, 30, &[cid.clone(), vec![1, 2, 3]].concat()),
            ),
            14 => (
                "connect-id-past-end",
                body_with(b"MQTT", 4, 2, 30, &[0x7f, 0xff, b'a']),
            ),
            15 => {
                let will = [
                    cid.clone(),
                    wire::string(b"not/my/topic"),
                    wire::string(b"bye"),
                ]
                .concat();
                (
                    "connect-will-topic-denied",
                    body_with(b"MQTT", 4, 0x06, 30, &will),
                )
            }
            16 => (
                "connect-flags-nonzero",
                [vec![0x12], wire::connect(id, 30)[1..].to_vec()].concat(),
            ),
            _ => {
                let rest = [cid.clone(), wire::string(b"user"), wire::string(b"pass")].concat();
                ("connect-user-pass", body_with(b"MQTT", 4, 0xc2, 0, &rest))
            }
        }
    }

    /// Bytes for an MQTT listener (plain, or inside an established TLS session).
    fn mqtt_case(&mut self, id: &str) -> (String, Vec<u8>) {
        match self.rng.gen_range(0..100) {
            0..=11 => ("random".into(), self.bytes(600)),
            12..=19 => {
                let mut b = self.bytes(300);
                b.insert(0, (self.rng.gen_range(1..15u8)) << 4);
                ("random-typed".into(), b)
            }
            20..=34 => {
                let (label, b) = self.connect(id);
                (label.into(), b)
            }
            35..=49 => {
                let (_, mut b) = self.connect(id);
                let label = if self.rng.gen_bool(0.4) {
                    let n = self.rng.gen_range(0..b.len());
                    b.truncate(n);
                    "connect-truncated"
                } else {
                    self.mutate(&mut b);
                    "connect-mutated"
                };
                (label.into(), b)
            }
            _ => {
                let mut b = wire::connect(id, 30);
                let mut labels = vec![];
                for _ in 0..self.rng.gen_range(1..=6) {
                    match self.rng.gen_range(0..20) {
                        0..=11 => b.extend(self.valid_packet(id)),
                        12..=16 => {
                            let (l, p) = self.broken_packet(id);
                            labels.push(l.to_string());
                            b.extend(p);
                        }
                        _ => {
                            let mut p = self.valid_packet(id);
                            self.mutate(&mut p);
                            labels.push("mutated".into());
                            b.extend(p);
                        }
                    }
                }
                if self.rng.gen_bool(0.15) {
                    let n = self.rng.gen_range(0..b.len());
                    b.truncate(n);
                    labels.push("truncated".into());
                }
                (format!("session[{}]", labels.join(",")), b)
            }
        }
    }

    fn tls_raw_case(&mut self, hello: &[u8]) -> (String, Vec<u8>) {
        match self.rng.gen_range(0..8) {
            0 | 1 => ("random".into(), self.bytes(600)),
            2 => {
                let n = self.rng.gen_range(0..hello.len());
                ("client-hello-truncated".into(), hello[..n].to_vec())
            }
            3 | 4 => {
                let mut h = hello.to_vec();
                self.mutate(&mut h);
                ("client-hello-mutated".into(), h)
            }
            5 => {
                let mut h = vec![0x16, 0x03, 0x01, 0xff, 0xff];
                h.extend(self.bytes(100));
                ("record-huge-length".into(), h)
            }
            6 => ("plain-mqtt-on-tls".into(), wire::connect("x", 30)),
            _ => {
                let mut h = hello.to_vec();
                h.extend(self.bytes(200));
                ("client-hello-then-garbage".into(), h)
            }
        }
    }

    fn http_case(&mut self) -> (String, Vec<u8>) {
        let good = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        match self.rng.gen_range(0..10) {
            0 | 1 => ("random".into(), self.bytes(600)),
            2 | 3 => {
                let mut g = good.clone();
                self.mutate(&mut g);
                ("request-mutated".into(), g)
            }
            4 => {
                let n = self.rng.gen_range(0..good.len());
                ("request-truncated".into(), good[..n].to_vec())
            }
            5 => {
                let mut g = b"GET /".to_vec();
                g.extend(std::iter::repeat_n(b'A', self.rng.gen_range(1000..70_000)));
                g.extend(b" HTTP/1.1\r\n\r\n");
                ("request-long-path".into(), g)
            }
            6 => {
                let mut g = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
                g.extend(std::iter::repeat_n(b'B', self.rng.gen_range(1000..70_000)));
                g.extend(b"\r\n\r\n");
                ("request-huge-header".into(), g)
            }
            7 => (
                "request-bad-chunked".into(),
                b"POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\nffffffffffffffffff\r\n".to_vec(),
            ),
            8 => (
                "request-bad-content-length".into(),
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\nContent-Length: 99999999999999999999\r\n\r\n".to_vec(),
            ),
            _ => {
                let mut g = b"GET /\xff\xfe\x00 HTTP/9.9\r\n".to_vec();
                g.extend(self.bytes(50));
                ("request-binary".into(), g)
            }
        }
    }

    fn pieces(&mut self) -> usize {
        if self.rng.gen_bool(0.3) {
            self.rng.gen_range(2..=4)
        } else {
            1
        }
    }
}

fn fuzz_cases(seed: u64, hello: &[u8]) -> Vec<Case> {
    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed),
    };
    let plan = [
        (Target::Plain, 2000),
        (Target::TlsRaw, 500),
        (Target::Metrics, 300),
        (Target::TlsMqtt, 250),
    ];
    let mut cases = Vec::new();
    for (target, n) in plan {
        for i in 0..n {
            let (label, bytes) = match target {
                Target::Plain => g.mqtt_case(&format!("fz-{i}")),
                Target::TlsMqtt => {
                    let id = if g.rng.gen_bool(0.8) { "dev-fuzz" } else { "" };
                    g.mqtt_case(id)
                }
                Target::TlsRaw => g.tls_raw_case(hello),
                Target::Metrics => g.http_case(),
            };
            let pieces = g.pieces();
            cases.push(Case {
                target,
                label,
                bytes,
                pieces,
            });
        }
    }
    // Interleave the targets so that every listener is under fire at the same time.
    for i in (1..cases.len()).rev() {
        let j = g.rng.gen_range(0..=i);
        cases.swap(i, j);
    }
    cases
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The gateway closed the connection (after our half-close at the latest).
    Closed,
    /// Still open 10 s after we stopped sending.
    Hung,
    /// Could not even connect / complete the TLS handshake with a valid certificate.
    NoConnection(String),
}

async fn send_pieces<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, bytes: &[u8], pieces: usize) {
    let step = bytes.len().div_ceil(pieces.max(1)).max(1);
    for (k, chunk) in bytes.chunks(step).enumerate() {
        if k > 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // The gateway may close as soon as it sees something it refuses: that is fine.
        if w.write_all(chunk).await.is_err() || w.flush().await.is_err() {
            return;
        }
    }
}

async fn run_case(case: Arc<Case>, ep: Endpoints, tls: Arc<rustls::ClientConfig>) -> Outcome {
    const LIMIT: Duration = Duration::from_secs(10);
    let addr = match case.target {
        Target::Plain => ep.plain.unwrap(),
        Target::TlsRaw | Target::TlsMqtt => ep.mqtts,
        Target::Metrics => ep.metrics.unwrap(),
    };
    if case.target == Target::TlsMqtt {
        let mut s = match tokio::time::timeout(LIMIT, tls_connect(addr, tls)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Outcome::NoConnection(format!("TLS handshake: {e}")),
            Err(_) => return Outcome::NoConnection("TLS handshake timed out".into()),
        };
        send_pieces(&mut s, &case.bytes, case.pieces).await;
        let _ = s.shutdown().await;
        return match wait_closed(&mut s, LIMIT).await {
            Some(_) => Outcome::Closed,
            None => Outcome::Hung,
        };
    }
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Outcome::NoConnection(e.to_string()),
    };
    let _ = s.set_nodelay(true);
    send_pieces(&mut s, &case.bytes, case.pieces).await;
    let _ = s.shutdown().await;
    match wait_closed(&mut s, LIMIT).await {
        Some(_) => Outcome::Closed,
        None => Outcome::Hung,
    }
}

#[test]
fn fuzzed_input_on_every_port_leaves_the_gateway_serving() {
    let seed: u64 = std::env::var("OUTPOST_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_240_611);
    println!("fuzz seed {seed} (replay with OUTPOST_FUZZ_SEED={seed})");
    let mut gw = Gateway::start();
    let fuzz_dev = gw.issue("dev-fuzz");
    let good_dev = gw.issue("dev-after");
    let tls = device_tls_config(&fuzz_dev);
    let cases: Vec<Arc<Case>> = fuzz_cases(seed, &client_hello(tls.clone()))
        .into_iter()
        .map(Arc::new)
        .collect();
    let total = cases.len();
    let rt = runtime();
    let started = Instant::now();
    const BATCH: usize = 100;
    const PARALLEL: usize = 16;
    for (b, batch) in cases.chunks(BATCH).enumerate() {
        let outcomes = rt.block_on(async {
            let sem = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
            let mut set = tokio::task::JoinSet::new();
            for (k, case) in batch.iter().enumerate() {
                let permit = sem.clone().acquire_owned().await.unwrap();
                let (case, ep, tls) = (case.clone(), gw.ep.clone(), tls.clone());
                set.spawn(async move {
                    let _permit = permit;
                    (k, run_case(case, ep, tls).await)
                });
            }
            let mut out = Vec::new();
            while let Some(r) = set.join_next().await {
                out.push(r.expect("case task"));
            }
            out
        });
        let describe = |k: usize| {
            let c = &batch[k];
            let n = c.bytes.len().min(48);
            format!(
                "case {} {:?} {} ({} bytes, {} pieces) starting {}",
                b * BATCH + k,
                c.target,
                c.label,
                c.bytes.len(),
                c.pieces,
                hex::encode(&c.bytes[..n])
            )
        };
        if !gw.is_alive() {
            let list: Vec<String> = (0..batch.len()).map(describe).collect();
            panic!(
                "gateway died during batch {b} (seed {seed}); cases:\n{}\nlog:\n{}",
                list.join("\n"),
                gw.log()
            );
        }
        for (k, o) in outcomes {
            assert_eq!(o, Outcome::Closed, "seed {seed}: {}", describe(k));
        }
    }
    println!("{total} fuzz cases in {:?}", started.elapsed());
    assert!(gw.is_alive(), "gateway exited after fuzzing:\n{}", gw.log());

    // Still serving: metrics answer, a device publishes over TLS and a local client receives.
    let malformed = gw.metric("outpost_malformed_packets_total");
    println!(
        "after fuzzing: malformed {malformed}, messages in {}, TLS handshake failures {}",
        gw.metric("outpost_messages_in_total"),
        gw.metric("outpost_tls_handshake_failures_total")
    );
    assert!(malformed > 0, "malformed packets were not counted");
    assert!(gw.metric("outpost_tls_handshake_failures_total") > 0);
    rt.block_on(async {
        let connack = device_roundtrip(gw.mqtts(), gw.plain(), &good_dev, "after-fuzz").await;
        assert!(
            connack < Duration::from_secs(1),
            "CONNACK after fuzzing took {connack:?}"
        );
        // And a local publisher to a device subscriber over TLS (the other direction).
        let mut dev = tls_connect(gw.mqtts(), device_tls_config(&good_dev))
            .await
            .unwrap();
        assert_eq!(
            mqtt_connect(&mut dev, "dev-after", Duration::from_secs(5)).await,
            0
        );
        mqtt_subscribe(&mut dev, "devices/dev-after/cmd", 1).await;
        let mut local = plain_session(gw.plain(), "after-fuzz-local").await;
        local
            .write_all(&wire::publish("devices/dev-after/cmd", b"go", 1, 1))
            .await
            .unwrap();
        assert_eq!(
            expect_publish(&mut dev, "devices/dev-after/cmd", Duration::from_secs(5)).await,
            b"go"
        );
    });
    let open = wait_metric(
        &gw,
        "outpost_connections_open",
        Duration::from_secs(10),
        |v| v == 0,
    );
    assert_eq!(open, 0, "connections still open after every client closed");
    assert_no_panics(&gw);
}
