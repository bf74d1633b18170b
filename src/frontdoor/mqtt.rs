//! Just enough MQTT 3.1.1 to guard the broker: framing, CONNECT (parsed and rewritten),
//! PUBLISH topics, SUBSCRIBE filters, and the few acknowledgements the front door sends
//! itself. Everything else passes through as the client's own bytes.
//!
//! Parsing never panics on any input and never reads past the frame it was given.

use bytes::{BufMut, Bytes, BytesMut};

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
pub const UNSUBACK: u8 = 11;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

/// CONNACK return codes (MQTT 3.1.1 table 3.1).
pub const CONNACK_BAD_PROTOCOL: u8 = 1;
pub const CONNACK_ID_REJECTED: u8 = 2;
pub const CONNACK_SERVER_UNAVAILABLE: u8 = 3;
pub const CONNACK_NOT_AUTHORIZED: u8 = 5;

pub const SUBACK_FAILURE: u8 = 0x80;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    #[error("remaining length is malformed")]
    BadLength,
    #[error("packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("packet type {0} is not valid here")]
    UnexpectedType(u8),
    #[error("reserved flags wrong for packet type {0}")]
    BadFlags(u8),
    #[error("packet truncated")]
    Truncated,
    #[error("string is not valid MQTT UTF-8")]
    BadString,
    #[error("protocol {name:?} level {level} is not supported")]
    Protocol { name: String, level: u8 },
    #[error("CONNECT flags are malformed")]
    BadConnectFlags,
    #[error("QoS 3 is not a QoS")]
    BadQos,
    #[error("SUBSCRIBE or UNSUBSCRIBE carries no filter")]
    EmptySubscribe,
    #[error("packet identifier 0 is not allowed")]
    ZeroPacketId,
}

/// Where the next frame in `buf` ends. `Ok(None)`: need more bytes.
/// Returns `(packet_type, flags, header_len, total_len)`.
pub fn frame(buf: &[u8], max_packet: usize) -> Result<Option<(u8, u8, usize, usize)>, MqttError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len: usize = 0;
    let mut shift = 0;
    let mut i = 1;
    loop {
        if i > 4 {
            return Err(MqttError::BadLength);
        }
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let total = i + len;
    if total > max_packet {
        return Err(MqttError::TooLarge(total));
    }
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((buf[0] >> 4, buf[0] & 0x0f, i, total)))
}

/// Check the fixed-header flags of a packet a *client* may send.
pub fn check_client_flags(ptype: u8, flags: u8) -> Result<(), MqttError> {
    let ok = match ptype {
        PUBLISH => (flags >> 1) & 0b11 != 3,
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => flags == 0b0010,
        CONNECT | PUBACK | PUBREC | PUBCOMP | PINGREQ | DISCONNECT => flags == 0,
        other => return Err(MqttError::UnexpectedType(other)),
    };
    if ok {
        Ok(())
    } else {
        Err(MqttError::BadFlags(ptype))
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, MqttError> {
        let (&v, rest) = self.b.split_first().ok_or(MqttError::Truncated)?;
        self.b = rest;
        Ok(v)
    }
    fn u16(&mut self) -> Result<u16, MqttError> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn bytes(&mut self) -> Result<&'a [u8], MqttError> {
        let n = self.u16()? as usize;
        if self.b.len() < n {
            return Err(MqttError::Truncated);
        }
        let (v, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(v)
    }
    fn string(&mut self) -> Result<String, MqttError> {
        let raw = self.bytes()?;
        let s = std::str::from_utf8(raw).map_err(|_| MqttError::BadString)?;
        if s.contains('\0') {
            return Err(MqttError::BadString);
        }
        Ok(s.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub clean_session: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

/// Parse the body (after the fixed header) of a CONNECT packet.
pub fn parse_connect(body: &[u8]) -> Result<Connect, MqttError> {
    let mut r = Reader { b: body };
    let name = r.string()?;
    let level = r.u8()?;
    if name != "MQTT" || level != 4 {
        return Err(MqttError::Protocol { name, level });
    }
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(MqttError::BadConnectFlags);
    }
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if will_qos == 3
        || (!will_flag && (will_qos != 0 || will_retain))
        || (has_password && !has_username)
    {
        return Err(MqttError::BadConnectFlags);
    }
    let keep_alive = r.u16()?;
    let client_id = r.string()?;
    let will = if will_flag {
        let topic = r.string()?;
        let payload = r.bytes()?.to_vec();
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.bytes()?.to_vec())
    } else {
        None
    };
    if !r.b.is_empty() {
        return Err(MqttError::BadConnectFlags);
    }
    Ok(Connect {
        clean_session: flags & 0x02 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

fn put_remaining_length(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

fn with_header(first: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(first);
    put_remaining_length(&mut out, body.len());
    out.put_slice(body);
    out.freeze()
}

pub fn encode_connect(c: &Connect) -> Bytes {
    let mut body = BytesMut::new();
    put_bytes(&mut body, b"MQTT");
    body.put_u8(4);
    let mut flags = 0u8;
    if c.clean_session {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos << 3);
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    body.put_u8(flags);
    body.put_u16(c.keep_alive);
    put_bytes(&mut body, c.client_id.as_bytes());
    if let Some(w) = &c.will {
        put_bytes(&mut body, w.topic.as_bytes());
        put_bytes(&mut body, &w.payload);
    }
    if let Some(u) = &c.username {
        put_bytes(&mut body, u.as_bytes());
    }
    if let Some(p) = &c.password {
        put_bytes(&mut body, p);
    }
    with_header(CONNECT << 4, &body)
}

pub fn connack(session_present: bool, code: u8) -> Bytes {
    Bytes::from(vec![CONNACK << 4, 2, session_present as u8, code])
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK with its packet id. PUBREL carries the
/// fixed-header flags 0b0010 ([MQTT-3.6.1-1]); the others 0.
pub fn ack(ptype: u8, pid: u16) -> Bytes {
    let [a, b] = pid.to_be_bytes();
    let flags = if ptype == PUBREL { 0b0010 } else { 0 };
    Bytes::from(vec![ptype << 4 | flags, 2, a, b])
}

/// A PUBLISH frame ([MQTT-3.3]): `pid` is required for QoS 1 and 2 and ignored for 0.
pub fn encode_publish(
    topic: &str,
    qos: u8,
    retain: bool,
    dup: bool,
    pid: u16,
    payload: &[u8],
) -> Bytes {
    let mut body = BytesMut::with_capacity(topic.len() + payload.len() + 4);
    put_bytes(&mut body, topic.as_bytes());
    if qos > 0 {
        body.put_u16(pid);
    }
    body.put_slice(payload);
    let first = (PUBLISH << 4) | ((dup && qos > 0) as u8) << 3 | (qos.min(2) << 1) | retain as u8;
    with_header(first, &body)
}

/// Topic, QoS and packet id of a PUBLISH (body after the fixed header).
pub fn parse_publish(flags: u8, body: &[u8]) -> Result<(String, u8, Option<u16>), MqttError> {
    let qos = (flags >> 1) & 0b11;
    if qos == 3 {
        return Err(MqttError::BadQos);
    }
    let mut r = Reader { b: body };
    let topic = r.string()?;
    let pid = if qos > 0 {
        let p = r.u16()?;
        if p == 0 {
            return Err(MqttError::ZeroPacketId);
        }
        Some(p)
    } else {
        None
    };
    Ok((topic, qos, pid))
}

/// Packet id of PUBACK/PUBREC/PUBREL/PUBCOMP/UNSUBACK/SUBACK bodies.
pub fn parse_pid(body: &[u8]) -> Result<u16, MqttError> {
    Reader { b: body }.u16()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pid: u16,
    pub filters: Vec<(String, u8)>,
}

pub fn parse_subscribe(body: &[u8]) -> Result<Subscribe, MqttError> {
    let mut r = Reader { b: body };
    let pid = r.u16()?;
    if pid == 0 {
        return Err(MqttError::ZeroPacketId);
    }
    let mut filters = Vec::new();
    while !r.b.is_empty() {
        let f = r.string()?;
        let opts = r.u8()?;
        if opts & 0xfc != 0 || opts & 0b11 == 3 {
            return Err(MqttError::BadQos);
        }
        filters.push((f, opts));
    }
    if filters.is_empty() {
        return Err(MqttError::EmptySubscribe);
    }
    Ok(Subscribe { pid, filters })
}

/// Packet id and filters of an UNSUBSCRIBE body.
pub fn parse_unsubscribe(body: &[u8]) -> Result<(u16, Vec<String>), MqttError> {
    let mut r = Reader { b: body };
    let pid = r.u16()?;
    if pid == 0 {
        return Err(MqttError::ZeroPacketId);
    }
    let mut filters = Vec::new();
    while !r.b.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(MqttError::EmptySubscribe);
    }
    Ok((pid, filters))
}

pub fn encode_subscribe(s: &Subscribe) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u16(s.pid);
    for (f, q) in &s.filters {
        put_bytes(&mut body, f.as_bytes());
        body.put_u8(*q);
    }
    with_header((SUBSCRIBE << 4) | 0b0010, &body)
}

pub fn suback(pid: u16, codes: &[u8]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u16(pid);
    body.put_slice(codes);
    with_header(SUBACK << 4, &body)
}

/// The first packet of a connection: `Ok(None)` until `buf` holds a whole frame; then the
/// CONNECT and the frame's length, or why it is refused (any other packet type included).
pub fn next_connect(buf: &[u8], max_packet: usize) -> Result<Option<(Connect, usize)>, MqttError> {
    let Some((ptype, flags, hdr, total)) = frame(buf, max_packet)? else {
        return Ok(None);
    };
    if ptype != CONNECT || flags != 0 {
        return Err(MqttError::UnexpectedType(ptype));
    }
    Ok(Some((parse_connect(&buf[hdr..total])?, total)))
}

/// A client packet after CONNECT, framed, flag-checked and parsed as the front door acts on
/// it. Offsets are from the start of the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientPacket {
    Publish {
        topic: String,
        qos: u8,
        pid: Option<u16>,
        retain: bool,
        /// Where the application payload starts (it ends with the frame).
        payload_at: usize,
    },
    Pubrel(u16),
    Subscribe(Subscribe),
    Unsubscribe(u16, Vec<String>),
    /// PUBACK, PUBREC or PUBCOMP (the type) with its packet id.
    Ack(u8, u16),
    Pingreq,
    Disconnect,
}

/// The next packet a connected client sent: `Ok(None)` until `buf` holds a whole frame;
/// then the packet and the frame's length. Every error closes the connection.
pub fn next_client_packet(
    buf: &[u8],
    max_packet: usize,
) -> Result<Option<(ClientPacket, usize)>, MqttError> {
    let Some((ptype, flags, hdr, total)) = frame(buf, max_packet)? else {
        return Ok(None);
    };
    check_client_flags(ptype, flags)?;
    let body = &buf[hdr..total];
    let packet = match ptype {
        PUBLISH => {
            let (topic, qos, pid) = parse_publish(flags, body)?;
            let payload_at = hdr + 2 + topic.len() + if pid.is_some() { 2 } else { 0 };
            ClientPacket::Publish {
                topic,
                qos,
                pid,
                retain: flags & 1 == 1,
                payload_at,
            }
        }
        PUBREL => ClientPacket::Pubrel(parse_pid(body)?),
        SUBSCRIBE => ClientPacket::Subscribe(parse_subscribe(body)?),
        UNSUBSCRIBE => {
            let (pid, filters) = parse_unsubscribe(body)?;
            ClientPacket::Unsubscribe(pid, filters)
        }
        PUBACK | PUBREC | PUBCOMP => ClientPacket::Ack(ptype, parse_pid(body)?),
        PINGREQ | DISCONNECT if total != 2 => return Err(MqttError::BadLength),
        PINGREQ => ClientPacket::Pingreq,
        DISCONNECT => ClientPacket::Disconnect,
        other => return Err(MqttError::UnexpectedType(other)),
    };
    Ok(Some((packet, total)))
}

#[cfg(test)]
mod publish_encoding {
    use super::*;

    /// MQTT 3.1.1 section 3.3, figure 3.10's example: topic `a/b`, packet id 10, QoS 1.
    #[test]
    fn publish_known_answer() {
        let b = encode_publish("a/b", 1, false, false, 10, b"hi");
        assert_eq!(
            &b[..],
            &[0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i']
        );
        // PUBREL's reserved flags are 0b0010 ([MQTT-3.6.1-1]); PUBACK's are 0.
        assert_eq!(&ack(PUBREL, 0x0102)[..], &[0x62, 2, 1, 2]);
        assert_eq!(&ack(PUBACK, 0x0102)[..], &[0x40, 2, 1, 2]);
        let b = encode_publish("a/b", 2, true, true, 10, b"");
        assert_eq!(b[0], 0x3d);
        let b = encode_publish("a/b", 0, true, true, 10, b"x");
        assert_eq!(&b[..], &[0x31, 6, 0, 3, b'a', b'/', b'b', b'x']);
        // What the front door's own decoder reads back.
        let b = encode_publish("t", 2, false, false, 7, b"p");
        match next_client_packet(&b, 1024) {
            Ok(Some((
                ClientPacket::Publish {
                    topic,
                    qos,
                    pid,
                    retain,
                    payload_at,
                },
                n,
            ))) => {
                assert_eq!(
                    (topic.as_str(), qos, pid, retain, n),
                    ("t", 2, Some(7), false, b.len())
                );
                assert_eq!(&b[payload_at..], b"p");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;
    use proptest::prelude::*;

    fn sample_connect() -> Connect {
        Connect {
            clean_session: true,
            keep_alive: 30,
            client_id: "dev-1".into(),
            will: Some(Will {
                topic: "devices/dev-1/status".into(),
                payload: b"gone".to_vec(),
                qos: 1,
                retain: true,
            }),
            username: Some("u".into()),
            password: Some(b"p".to_vec()),
        }
    }

    #[test]
    fn connect_round_trips() {
        let c = sample_connect();
        let wire = encode_connect(&c);
        let (t, f, h, total) = frame(&wire, 1 << 20).unwrap().unwrap();
        assert_eq!((t, f, total), (CONNECT, 0, wire.len()));
        assert_eq!(parse_connect(&wire[h..]).unwrap(), c);
    }

    #[test]
    fn mqtt_31_is_refused() {
        let mut body = BytesMut::new();
        put_bytes(&mut body, b"MQIsdp");
        body.put_u8(3);
        body.put_u8(2);
        body.put_u16(10);
        put_bytes(&mut body, b"x");
        assert!(matches!(
            parse_connect(&body),
            Err(MqttError::Protocol { .. })
        ));
    }

    #[test]
    fn frame_limits_and_partial_input() {
        assert_eq!(frame(&[0x30], 100), Ok(None));
        assert_eq!(frame(&[0x30, 0x80], 100), Ok(None));
        assert_eq!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 1 << 30),
            Err(MqttError::BadLength)
        );
        assert_eq!(
            frame(&[0x30, 0xff, 0x7f], 100),
            Err(MqttError::TooLarge(16386))
        );
        assert_eq!(frame(&[0xc0, 0x00], 100), Ok(Some((PINGREQ, 0, 2, 2))));
    }

    #[test]
    fn subscribe_round_trips_and_suback_encodes() {
        let s = Subscribe {
            pid: 7,
            filters: vec![("a/#".into(), 1), ("b".into(), 2)],
        };
        let wire = encode_subscribe(&s);
        let (t, f, h, _) = frame(&wire, 1 << 20).unwrap().unwrap();
        check_client_flags(t, f).unwrap();
        assert_eq!(parse_subscribe(&wire[h..]).unwrap(), s);
        assert_eq!(&suback(7, &[1, 0x80])[..], &[0x90, 4, 0, 7, 1, 0x80]);
    }

    #[test]
    fn publish_header_parses() {
        let mut body = BytesMut::new();
        put_bytes(&mut body, b"devices/a/t");
        body.put_u16(9);
        body.put_slice(b"payload");
        assert_eq!(
            parse_publish(0b0010, &body).unwrap(),
            ("devices/a/t".into(), 1, Some(9))
        );
        assert_eq!(parse_publish(0b0110, &body), Err(MqttError::BadQos));
        let mut zero = BytesMut::new();
        put_bytes(&mut zero, b"t");
        zero.put_u16(0);
        assert_eq!(parse_publish(0b0010, &zero), Err(MqttError::ZeroPacketId));
    }

    /// CONNECT, a QoS 1 PUBLISH (retained), SUBSCRIBE, PINGREQ, DISCONNECT in one stream.
    fn session_stream() -> Vec<u8> {
        let mut s = encode_connect(&sample_connect()).to_vec();
        let mut body = BytesMut::new();
        put_bytes(&mut body, b"devices/dev-1/t");
        body.put_u16(5);
        body.put_slice(b"21.5");
        s.extend_from_slice(&with_header((PUBLISH << 4) | 0b0011, &body));
        s.extend_from_slice(&encode_subscribe(&Subscribe {
            pid: 6,
            filters: vec![("devices/dev-1/#".into(), 1)],
        }));
        s.extend_from_slice(&[PINGREQ << 4, 0, DISCONNECT << 4, 0]);
        s
    }

    /// Drive a stream as conn.rs does: read chunks into one buffer, take whole frames.
    fn drive(stream: &[u8], chunk: usize) -> (Connect, Vec<ClientPacket>) {
        let mut buf = BytesMut::new();
        let (mut connect, mut packets) = (None, Vec::new());
        for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            if connect.is_none() {
                match next_connect(&buf, 1024).unwrap() {
                    Some((c, total)) => {
                        buf.advance(total);
                        connect = Some(c);
                    }
                    None => continue,
                }
            }
            while let Some((p, total)) = next_client_packet(&buf, 1024).unwrap() {
                packets.push(p);
                buf.advance(total);
            }
        }
        assert!(buf.is_empty());
        (connect.unwrap(), packets)
    }

    #[test]
    fn a_stream_parses_the_same_in_any_chunks() {
        let stream = session_stream();
        let (c, packets) = drive(&stream, stream.len());
        assert_eq!(c, sample_connect());
        let publish_at = encode_connect(&c).len();
        let ClientPacket::Publish {
            payload_at,
            retain: true,
            qos: 1,
            pid: Some(5),
            ..
        } = &packets[0]
        else {
            panic!("{:?}", packets[0]);
        };
        assert_eq!(&stream[publish_at + payload_at..][..4], b"21.5");
        assert!(matches!(packets[1], ClientPacket::Subscribe(_)));
        assert_eq!(
            packets[2..],
            [ClientPacket::Pingreq, ClientPacket::Disconnect]
        );
        for chunk in [1, 2, 3, 7, 64] {
            assert_eq!(
                drive(&stream, chunk),
                (c.clone(), packets.clone()),
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn client_packets_are_refused_as_the_connection_refuses_them() {
        let connect = encode_connect(&sample_connect());
        assert_eq!(
            next_client_packet(&connect, 1024),
            Err(MqttError::UnexpectedType(CONNECT))
        );
        assert_eq!(
            next_connect(&[PINGREQ << 4, 0], 1024),
            Err(MqttError::UnexpectedType(PINGREQ))
        );
        assert_eq!(
            next_client_packet(&[PINGREQ << 4, 1, 0], 1024),
            Err(MqttError::BadLength)
        );
        assert_eq!(
            next_client_packet(&[SUBSCRIBE << 4, 3, 0, 1, 0], 1024),
            Err(MqttError::BadFlags(SUBSCRIBE))
        );
        assert_eq!(
            next_client_packet(&[CONNACK << 4, 2, 0, 0], 1024),
            Err(MqttError::UnexpectedType(CONNACK))
        );
        assert_eq!(next_client_packet(&[PUBLISH << 4, 10], 1024), Ok(None));
        assert_eq!(
            next_client_packet(&[PUBLISH << 4, 0xff, 0x7f], 1024),
            Err(MqttError::TooLarge(16386))
        );
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300), flags in 0u8..16) {
            let _ = frame(&data, 1 << 16);
            let _ = parse_connect(&data);
            let _ = parse_publish(flags, &data);
            let _ = parse_subscribe(&data);
            let _ = parse_unsubscribe(&data);
            let _ = parse_pid(&data);
        }

        #[test]
        fn remaining_length_round_trips(len in 0usize..(1 << 22)) {
            let mut out = BytesMut::new();
            out.put_u8(0x30);
            put_remaining_length(&mut out, len);
            let hdr = out.len();
            out.resize(hdr + len, 0);
            prop_assert_eq!(frame(&out, 1 << 23).unwrap(), Some((PUBLISH, 0, hdr, hdr + len)));
        }

        #[test]
        fn connect_encode_parse_round_trip(id in "[a-z0-9]{0,20}", ka in any::<u16>(), clean in any::<bool>(), user in proptest::option::of("[a-z]{1,8}")) {
            let c = Connect { clean_session: clean, keep_alive: ka, client_id: id, will: None, password: user.as_ref().map(|_| b"pw".to_vec()), username: user };
            let wire = encode_connect(&c);
            let (_, _, h, _) = frame(&wire, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(parse_connect(&wire[h..]).unwrap(), c);
        }
    }
}
