//! The front door's MQTT 3.1.1 codec driven as a connection drives it (src/frontdoor/conn.rs):
//! bytes arrive in arbitrary chunks into one buffer; the first complete frame must be a
//! CONNECT (`next_connect`), every later one goes through `next_client_packet`, and the
//! frame is consumed. The input is the byte stream a client sends (a capture of
//! `mosquitto_pub` is a valid input), its chunking derived from the input itself.
//!
//! Checked: nothing panics; the packets and the error seen do not depend on how the stream
//! was split; what the front door forwards to the core (the rewritten CONNECT, the frames as
//! sent, a PUBLISH with its retain flag cleared, a SUBSCRIBE cut down to its allowed
//! filters) parses back to the same packets.
#![no_main]

use bytes::{Buf, BytesMut};
use libfuzzer_sys::fuzz_target;
use outpost::frontdoor::mqtt::{self, ClientPacket, Connect, MqttError};

#[derive(Debug, PartialEq)]
enum Event {
    Connect(Connect),
    Packet(ClientPacket, Vec<u8>),
    Refused(MqttError),
}

/// Feed `data` in chunks of the given sizes (cycled; 0 = everything at once).
fn drive(data: &[u8], sizes: &[usize], max_packet: usize) -> (Vec<Event>, usize) {
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    let mut connected = false;
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = match sizes[i % sizes.len()] {
            0 => rest.len(),
            n => n.min(rest.len()),
        };
        i += 1;
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            if !connected {
                match mqtt::next_connect(&buf, max_packet) {
                    Ok(Some((c, total))) => {
                        buf.advance(total);
                        events.push(Event::Connect(c));
                        connected = true;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        events.push(Event::Refused(e));
                        return (events, 0);
                    }
                }
            } else {
                match mqtt::next_client_packet(&buf, max_packet) {
                    Ok(Some((p, total))) => {
                        assert!(total <= buf.len() && total <= max_packet);
                        if let ClientPacket::Publish { payload_at, .. } = &p {
                            assert!(*payload_at <= total, "payload starts inside the frame");
                        }
                        events.push(Event::Packet(p, buf[..total].to_vec()));
                        buf.advance(total);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        events.push(Event::Refused(e));
                        return (events, 0);
                    }
                }
            }
        }
    }
    (events, buf.len())
}

/// What the front door forwards for each event parses back to the same thing.
fn check_forwarded(events: &[Event], max_packet: usize) {
    for e in events {
        match e {
            Event::Connect(c) => {
                // conn.rs rewrites client id, keep-alive, username and password.
                let rewritten = Connect {
                    client_id: "dev-1".into(),
                    keep_alive: c.keep_alive.max(1),
                    username: Some("dev-1".into()),
                    password: Some(b"core-secret".to_vec()),
                    ..c.clone()
                };
                let wire = mqtt::encode_connect(&rewritten);
                let (again, total) = mqtt::next_connect(&wire, usize::MAX)
                    .expect("rewritten CONNECT parses")
                    .expect("rewritten CONNECT is complete");
                assert_eq!(total, wire.len());
                assert_eq!(again, rewritten);
            }
            Event::Packet(p, frame) => {
                let (again, total) = mqtt::next_client_packet(frame, max_packet)
                    .expect("forwarded frame parses")
                    .expect("forwarded frame is complete");
                assert_eq!((&again, total), (p, frame.len()));
                match p {
                    ClientPacket::Publish { retain: true, .. } => {
                        let mut unretained = frame.clone();
                        unretained[0] &= !1;
                        let (q, _) = mqtt::next_client_packet(&unretained, max_packet)
                            .expect("unretained PUBLISH parses")
                            .expect("complete");
                        let ClientPacket::Publish { retain, .. } = q else {
                            panic!("unretained PUBLISH is a {q:?}");
                        };
                        assert!(!retain);
                    }
                    ClientPacket::Subscribe(sub) if sub.filters.len() > 1 => {
                        // Some filters refused: the rest goes on as a new SUBSCRIBE.
                        let allowed = mqtt::Subscribe {
                            pid: sub.pid,
                            filters: sub.filters.iter().step_by(2).cloned().collect(),
                        };
                        let wire = mqtt::encode_subscribe(&allowed);
                        let (q, _) = mqtt::next_client_packet(&wire, max_packet)
                            .expect("cut-down SUBSCRIBE parses")
                            .expect("complete");
                        assert_eq!(q, ClientPacket::Subscribe(allowed));
                    }
                    _ => {}
                }
            }
            Event::Refused(_) => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The default packet limit, or a small one so that the size check is reached too.
    let max_packet = if data.len() % 2 == 0 {
        outpost::config::Config::default().limits.max_packet_size
    } else {
        300
    };
    // Chunk sizes from the input: a few sizes of 1..=64 bytes, picked from its last bytes.
    let sizes: Vec<usize> = data
        .iter()
        .rev()
        .take(4)
        .map(|b| (*b as usize % 64) + 1)
        .collect();
    let whole = drive(data, &[0], max_packet);
    let bytewise = drive(data, &[1], max_packet);
    assert_eq!(whole, bytewise, "byte-by-byte reads change the outcome");
    if !sizes.is_empty() {
        let chunked = drive(data, &sizes, max_packet);
        assert_eq!(
            whole, chunked,
            "chunked reads ({sizes:?}) change the outcome"
        );
    }
    check_forwarded(&whole.0, max_packet);
});
