//! The on-disk records of the sessions capability (a leaf: bytes in, values out).
//!
//! * `sessions` table: key = the session's core id, value = [`SessionRecord`] (JSON).
//! * `session-queue` table: key = core id, `0x00`, sequence number (u64, big endian), value =
//!   [`Queued`]: `[1][qos][flags][enqueued_ms u64][topic_len u16][topic][payload]`.
//! * `retained` table: key = topic, value = [`RetainedRecord`]:
//!   `[1][qos][stored_ms u64][owner_len u16][owner][payload]`.
//!
//! Core ids never hold a NUL (control characters are refused), so the queue keys of one
//! session are exactly the keys with its prefix.

use serde::{Deserialize, Serialize};

const VERSION: u8 = 1;
/// `Queued::flags`: a QoS 2 message whose PUBREC came; only its PUBREL is left to send.
const RELEASED: u8 = 1;
/// `Queued::flags`: a retained message sent because of a new subscription (delivered with
/// the RETAIN flag, [MQTT-3.3.1-8]).
const RETAINED: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Filter and granted QoS, in the order they were first subscribed.
    pub subs: Vec<(String, u8)>,
    /// Unix ms of the last disconnect (`None` while connected or never connected).
    pub disconnected_ms: Option<u64>,
    pub created_ms: u64,
}

impl SessionRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<SessionRecord, String> {
        serde_json::from_slice(b).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub qos: u8,
    pub released: bool,
    pub retained: bool,
    pub enqueued_ms: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if b.len() < n {
        return Err("truncated".into());
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Ok(h)
}

fn u64_of(b: &mut &[u8]) -> Result<u64, String> {
    let mut a = [0u8; 8];
    a.copy_from_slice(take(b, 8)?);
    Ok(u64::from_be_bytes(a))
}

fn string_of(b: &mut &[u8]) -> Result<String, String> {
    let h = take(b, 2)?;
    let n = u16::from_be_bytes([h[0], h[1]]) as usize;
    String::from_utf8(take(b, n)?.to_vec()).map_err(|_| "string is not UTF-8".into())
}

fn put_string(v: &mut Vec<u8>, s: &str) {
    // Topics and ids are at most 65,535 bytes (MQTT strings); longer never reaches here.
    let n = s.len().min(u16::MAX as usize);
    v.extend_from_slice(&(n as u16).to_be_bytes());
    v.extend_from_slice(&s.as_bytes()[..n]);
}

fn header(b: &mut &[u8]) -> Result<u8, String> {
    let h = take(b, 2)?;
    if h[0] != VERSION {
        return Err(format!(
            "record version {} (this build reads {VERSION})",
            h[0]
        ));
    }
    if h[1] > 2 {
        return Err(format!("QoS {}", h[1]));
    }
    Ok(h[1])
}

impl Queued {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(13 + self.topic.len() + self.payload.len());
        v.push(VERSION);
        v.push(self.qos);
        v.push(if self.released { RELEASED } else { 0 } | if self.retained { RETAINED } else { 0 });
        v.extend_from_slice(&self.enqueued_ms.to_be_bytes());
        put_string(&mut v, &self.topic);
        v.extend_from_slice(&self.payload);
        v
    }

    pub fn decode(mut b: &[u8]) -> Result<Queued, String> {
        let qos = header(&mut b)?;
        let flags = take(&mut b, 1)?[0];
        let enqueued_ms = u64_of(&mut b)?;
        let topic = string_of(&mut b)?;
        Ok(Queued {
            qos,
            released: flags & RELEASED != 0,
            retained: flags & RETAINED != 0,
            enqueued_ms,
            topic,
            payload: b.to_vec(),
        })
    }

    /// Bytes this message counts against a session's byte limit.
    pub fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len()) as u64
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedRecord {
    pub qos: u8,
    pub stored_ms: u64,
    /// The identity (as the core knows it) that set it: what the retained bounds count.
    pub owner: String,
    pub payload: Vec<u8>,
}

impl RetainedRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(12 + self.owner.len() + self.payload.len());
        v.push(VERSION);
        v.push(self.qos);
        v.extend_from_slice(&self.stored_ms.to_be_bytes());
        put_string(&mut v, &self.owner);
        v.extend_from_slice(&self.payload);
        v
    }

    pub fn decode(mut b: &[u8]) -> Result<RetainedRecord, String> {
        let qos = header(&mut b)?;
        let stored_ms = u64_of(&mut b)?;
        let owner = string_of(&mut b)?;
        Ok(RetainedRecord {
            qos,
            stored_ms,
            owner,
            payload: b.to_vec(),
        })
    }
}

/// The queue key prefix of one session.
pub fn queue_prefix(session: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(session.len() + 9);
    k.extend_from_slice(session.as_bytes());
    k.push(0);
    k
}

pub fn queue_key(session: &str, seq: u64) -> Vec<u8> {
    let mut k = queue_prefix(session);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Session and sequence number of a queue key.
pub fn parse_queue_key(k: &[u8]) -> Result<(String, u64), String> {
    let at = k
        .iter()
        .position(|&b| b == 0)
        .ok_or("queue key without separator")?;
    let seq: [u8; 8] = k[at + 1..]
        .try_into()
        .map_err(|_| "queue key without a sequence number")?;
    let session = std::str::from_utf8(&k[..at]).map_err(|_| "queue key is not UTF-8")?;
    Ok((session.to_string(), u64::from_be_bytes(seq)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_round_trips_and_rejects_damage() {
        let q = Queued {
            qos: 2,
            released: true,
            retained: false,
            enqueued_ms: 1_700_000_000_123,
            topic: "devices/pa/commands/x".into(),
            payload: b"\x00on\xff".to_vec(),
        };
        let b = q.encode();
        // Known layout: version, QoS, flags, time, topic length.
        assert_eq!(&b[..3], &[1, 2, 1]);
        assert_eq!(&b[3..11], &1_700_000_000_123u64.to_be_bytes());
        assert_eq!(&b[11..13], &[0, 21]);
        assert_eq!(Queued::decode(&b), Ok(q));
        for n in 0..13 {
            assert!(Queued::decode(&b[..n]).is_err(), "truncated at {n}");
        }
        let mut bad = b.clone();
        bad[0] = 9;
        assert!(Queued::decode(&bad).is_err());
        bad[0] = 1;
        bad[1] = 3;
        assert!(Queued::decode(&bad).is_err());
    }

    #[test]
    fn retained_round_trips() {
        let r = RetainedRecord {
            qos: 1,
            stored_ms: 42,
            owner: "local~pa".into(),
            payload: b"state".to_vec(),
        };
        assert_eq!(RetainedRecord::decode(&r.encode()), Ok(r));
        assert!(RetainedRecord::decode(&[1, 1, 0]).is_err());
    }

    #[test]
    fn queue_keys_sort_by_session_then_sequence() {
        let a = queue_key("a", 2);
        let b = queue_key("a", 256);
        let c = queue_key("ab", 1);
        assert!(a < b && b < c);
        assert!(b.starts_with(&queue_prefix("a")));
        assert!(!c.starts_with(&queue_prefix("a")));
        assert_eq!(parse_queue_key(&b), Ok(("a".into(), 256)));
        assert!(parse_queue_key(b"a").is_err());
        assert!(parse_queue_key(b"a\x00\x01").is_err());
    }
}
