//! Protocol sessions shared by the rendezvous server, the TO1 proxy and the owner: bounded,
//! expiring, fair under a flood of new sessions (see [`Sessions`]), and taken out while a
//! message is processed, so a replayed or concurrent message for the same session finds
//! nothing and fails.

use crate::fdo_wire::{ErrorCode, FdoError};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a protocol handler answers: the message type, the body and the session token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub msg_type: u8,
    pub body: Vec<u8>,
    pub token: String,
}

/// A failure that ends a protocol session with error message 255.
pub trait ProtocolFailure: std::error::Error {
    fn error_code(&self) -> ErrorCode;
}

/// A new random session token (128 bits, hex).
pub fn new_token() -> Result<String, FdoError> {
    Ok(hex::encode(crate::fdo_wire::crypto::random_bytes(16)?))
}

/// Limits of one session table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLimits {
    /// Idle time after which a session that has proven something is dropped (renewed by
    /// every message).
    pub ttl: Duration,
    /// Lifetime of a session before its first proof (TO0 and TO1 sessions, TO2 before
    /// ProveDevice), counted from its first message and not renewed: anyone can open one.
    pub unproven_ttl: Duration,
    /// Sessions in the table.
    pub max: usize,
    /// Unproven sessions one peer (IPv4 address, IPv6 /64) may hold; its next new session
    /// evicts its own oldest unproven one.
    pub max_per_peer: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            ttl: Duration::from_secs(120),
            unproven_ttl: Duration::from_secs(10),
            max: 10_000,
            max_per_peer: 64,
        }
    }
}

/// Counters of one session table.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// New sessions refused: the table was full of proven sessions.
    pub refused: AtomicU64,
    /// Unproven sessions evicted to make room for a new one (the peer's own oldest when it
    /// is at its limit, else the table's oldest).
    pub evicted: AtomicU64,
}

impl SessionStats {
    /// Prometheus lines for the session tables, labelled by table.
    pub fn render(tables: &[(&str, Arc<SessionStats>)], out: &mut String) {
        use std::fmt::Write as _;
        for (name, help, pick) in [
            (
                "outpost_fdo_sessions_refused_total",
                "New FDO sessions refused: the table was full of sessions that had proven something.",
                (|s: &SessionStats| s.refused.load(Ordering::Relaxed)) as fn(&SessionStats) -> u64,
            ),
            (
                "outpost_fdo_sessions_evicted_total",
                "Unproven FDO sessions evicted for a new one (peer at its limit, or table full).",
                |s: &SessionStats| s.evicted.load(Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (table, s) in tables {
                let _ = writeln!(out, "{name}{{table=\"{table}\"}} {}", pick(s));
            }
        }
    }
}

/// Who opened a session: an IPv4 address or an IPv6 /64 (one host's usual allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerKey(u128);

impl PeerKey {
    pub fn of(ip: IpAddr) -> PeerKey {
        match ip {
            IpAddr::V4(a) => PeerKey(u32::from(a) as u128),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => PeerKey(u32::from(v4) as u128),
                None => PeerKey((u128::from(a) & !((1u128 << 64) - 1)) | 1),
            },
        }
    }
}

struct Entry<T> {
    expires: Instant,
    meta: Meta,
    value: T,
}

/// What the table knows about a session besides its value.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    peer: Option<PeerKey>,
    /// Position in the unproven order (None: proven).
    unproven: Option<u64>,
    /// Deadline of an unproven session (fixed when it was opened).
    deadline: Instant,
}

/// A session taken out of the table while one of its messages is processed.
pub struct Held<T> {
    pub value: T,
    meta: Meta,
}

struct Table<T> {
    map: HashMap<String, Entry<T>>,
    /// Unproven sessions in the order they were opened (= the order of their deadlines).
    order: BTreeMap<u64, String>,
    /// Unproven sessions of each peer, by order.
    by_peer: HashMap<PeerKey, BTreeSet<u64>>,
    next: u64,
}

impl<T> Table<T> {
    fn unlink(&mut self, meta: &Meta) {
        if let Some(n) = meta.unproven {
            self.order.remove(&n);
            if let Some(p) = meta.peer {
                if let Some(set) = self.by_peer.get_mut(&p) {
                    set.remove(&n);
                    if set.is_empty() {
                        self.by_peer.remove(&p);
                    }
                }
            }
        }
    }

    fn link(&mut self, token: &str, meta: &Meta) {
        if let Some(n) = meta.unproven {
            self.order.insert(n, token.to_string());
            if let Some(p) = meta.peer {
                self.by_peer.entry(p).or_default().insert(n);
            }
        }
    }

    fn remove(&mut self, token: &str) -> Option<Entry<T>> {
        let e = self.map.remove(token)?;
        self.unlink(&e.meta);
        Some(e)
    }

    /// Drop the unproven sessions past their deadline (oldest first, so this is cheap).
    fn purge_unproven(&mut self, now: Instant) {
        while let Some((_, token)) = self.order.first_key_value() {
            let token = token.clone();
            match self.map.get(&token) {
                Some(e) if e.expires > now => break,
                _ => {
                    self.remove(&token);
                }
            }
        }
    }

    fn evict_by_order(&mut self, n: u64) -> bool {
        match self.order.get(&n).cloned() {
            Some(token) => self.remove(&token).is_some(),
            None => false,
        }
    }
}

/// A session table: bounded, expiring, and fair under a flood of new sessions.
///
/// Opening a session costs nothing but a request, so sessions that have proven nothing yet
/// live `unproven_ttl` at most, one peer holds at most `max_per_peer` of them (its next one
/// evicts its own oldest), and when the table is full a new session evicts the oldest
/// unproven one. Sessions that have proven something ([`Sessions::put_back`] with
/// `proven`) are never evicted for a new one; only a table full of them refuses
/// ("too many open sessions").
pub struct Sessions<T> {
    inner: Mutex<Table<T>>,
    limits: SessionLimits,
    pub stats: Arc<SessionStats>,
}

/// The table is full of live sessions that have proven something.
#[derive(Debug, thiserror::Error)]
#[error("too many open sessions ({0})")]
pub struct SessionsFull(pub usize);

impl<T> Sessions<T> {
    pub fn new(limits: SessionLimits) -> Sessions<T> {
        Sessions {
            inner: Mutex::new(Table {
                map: HashMap::new(),
                order: BTreeMap::new(),
                by_peer: HashMap::new(),
                next: 0,
            }),
            limits,
            stats: Arc::new(SessionStats::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<T>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open a new (unproven) session of `peer` under `token`.
    pub fn open(&self, token: &str, peer: Option<IpAddr>, v: T) -> Result<(), SessionsFull> {
        let now = Instant::now();
        let peer = peer.map(PeerKey::of);
        let l = &self.limits;
        let mut t = self.lock();
        t.purge_unproven(now);
        if let Some(p) = peer {
            let oldest = t
                .by_peer
                .get(&p)
                .filter(|set| set.len() >= l.max_per_peer.max(1))
                .and_then(|set| set.first().copied());
            if let Some(n) = oldest {
                if t.evict_by_order(n) {
                    self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if t.map.len() >= l.max && !t.map.contains_key(token) {
            let oldest = t.order.first_key_value().map(|(n, _)| *n);
            match oldest {
                Some(n) if t.evict_by_order(n) => {
                    self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    // Only proven sessions: drop the expired ones (rare: this takes a scan).
                    t.map.retain(|_, e| e.expires > now);
                    if t.map.len() >= l.max {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        return Err(SessionsFull(l.max));
                    }
                }
            }
        }
        let n = t.next;
        t.next += 1;
        let deadline = now + l.unproven_ttl.min(l.ttl);
        let meta = Meta {
            peer,
            unproven: Some(n),
            deadline,
        };
        t.remove(token);
        t.link(token, &meta);
        t.map.insert(
            token.to_string(),
            Entry {
                expires: deadline,
                meta,
                value: v,
            },
        );
        Ok(())
    }

    /// Put back a session taken with [`Sessions::take`]. `proven`: the peer has proven
    /// something in it (from then on it lives `ttl` from its last message and is never
    /// evicted); otherwise it keeps its place and deadline among the unproven ones.
    pub fn put_back(&self, token: &str, held: Held<T>, proven: bool) {
        let now = Instant::now();
        let mut meta = held.meta;
        let mut t = self.lock();
        if proven {
            meta.unproven = None;
        }
        let expires = match meta.unproven {
            Some(_) => meta.deadline,
            None => now + self.limits.ttl,
        };
        if expires <= now {
            return;
        }
        t.link(token, &meta);
        t.map.insert(
            token.to_string(),
            Entry {
                expires,
                meta,
                value: held.value,
            },
        );
    }

    /// Remove and return the live session of `token`, with what the table knows of it.
    pub fn take_held(&self, token: &str) -> Option<Held<T>> {
        let now = Instant::now();
        let mut t = self.lock();
        match t.remove(token) {
            Some(e) if e.expires > now => Some(Held {
                value: e.value,
                meta: e.meta,
            }),
            _ => None,
        }
    }

    /// Remove and return the value of the live session of `token`.
    pub fn take(&self, token: &str) -> Option<T> {
        self.take_held(token).map(|h| h.value)
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    let v = value?.trim();
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .unwrap_or(v)
        .trim();
    (!t.is_empty() && t.len() <= 256).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_peer: usize) -> SessionLimits {
        SessionLimits {
            ttl: Duration::from_secs(60),
            unproven_ttl: Duration::from_secs(60),
            max,
            max_per_peer: per_peer,
        }
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn sessions_expire_and_are_taken_once() {
        let s: Sessions<u32> = Sessions::new(SessionLimits {
            ttl: Duration::from_millis(30),
            ..limits(2, 2)
        });
        s.open("a", None, 1).unwrap();
        s.open("b", None, 2).unwrap();
        assert_eq!(s.take("a"), Some(1));
        assert_eq!(s.take("a"), None, "taken once");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(s.take("b"), None, "expired");
        s.open("c", None, 3).unwrap();
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("")), None);
    }

    #[test]
    fn unproven_session_expires_after_unproven_ttl_and_proven_one_lives_ttl() {
        let s: Sessions<u32> = Sessions::new(SessionLimits {
            ttl: Duration::from_secs(60),
            unproven_ttl: Duration::from_millis(30),
            ..limits(10, 10)
        });
        s.open("a", ip("10.0.0.1"), 1).unwrap();
        s.open("b", ip("10.0.0.1"), 2).unwrap();
        // Put back unproven: keeps its deadline, not renewed.
        let a = s.take_held("a").unwrap();
        s.put_back("a", a, false);
        let b = s.take_held("b").unwrap();
        s.put_back("b", b, true);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(s.take("a"), None, "unproven: gone after unproven_ttl");
        assert_eq!(s.take("b"), Some(2), "proven: lives ttl");
    }

    #[test]
    fn peer_at_its_limit_evicts_its_own_oldest_unproven_session_not_others() {
        let s: Sessions<u32> = Sessions::new(limits(100, 3));
        s.open("dev", ip("10.0.0.1"), 0).unwrap();
        for i in 0..50 {
            s.open(&format!("flood{i}"), ip("10.0.0.2"), i).unwrap();
        }
        assert_eq!(s.len(), 4, "the flooder holds 3");
        assert_eq!(s.stats.evicted.load(Ordering::Relaxed), 47);
        assert_eq!(s.take("dev"), Some(0), "another peer's session untouched");
        assert_eq!(s.take("flood49"), Some(49));
        assert_eq!(s.take("flood0"), None);
        // IPv6: one /64 is one peer.
        let s: Sessions<u32> = Sessions::new(limits(100, 1));
        s.open("x", ip("2001:db8::1"), 1).unwrap();
        s.open("y", ip("2001:db8::2"), 2).unwrap();
        assert_eq!(s.take("x"), None);
        s.open("z", ip("2001:db8:0:1::1"), 3).unwrap();
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn full_table_evicts_oldest_unproven_before_proven_then_refuses() {
        let s: Sessions<u32> = Sessions::new(limits(3, 10));
        // The flood and the device from the same address: the device's session survives
        // because it proved something.
        s.open("dev", ip("127.0.0.1"), 0).unwrap();
        let d = s.take_held("dev").unwrap();
        s.put_back("dev", d, true);
        for i in 0..20 {
            s.open(&format!("f{i}"), ip("127.0.0.1"), i).unwrap();
        }
        assert_eq!(s.len(), 3);
        assert_eq!(s.stats.evicted.load(Ordering::Relaxed), 18);
        assert_eq!(s.stats.refused.load(Ordering::Relaxed), 0);
        let d = s
            .take_held("dev")
            .expect("the proven session survives the flood");
        s.put_back("dev", d, true);
        // A table full of proven sessions refuses new ones.
        for t in ["f18", "f19"] {
            let h = s.take_held(t).unwrap();
            s.put_back(t, h, true);
        }
        assert!(s.open("new", ip("10.0.0.9"), 9).is_err());
        assert_eq!(s.stats.refused.load(Ordering::Relaxed), 1);
    }
}
