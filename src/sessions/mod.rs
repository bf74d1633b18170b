//! Sessions you can trust (issue 11): retained messages and persistent sessions
//! (`clean_session = false`) kept on disk, so that they survive restarts and power cuts.
//!
//! rumqttd keeps nothing on disk, so this capability owns that state and the routing core
//! only ever holds clean sessions:
//!
//! * **Retained messages**: every retained PUBLISH the core will store (and every empty one,
//!   which clears the topic) is written to the `retained` table, durable before the PUBLISH
//!   is forwarded to the core (so before its PUBACK). At start, before any listener accepts,
//!   `frontdoor::restore` publishes them all back into the core.
//! * **Persistent sessions**: the front door connects every client to the core with a clean
//!   session. For a persistent one it keeps the session here: its subscriptions (durable
//!   before the SUBACK), and a queue of the QoS 1/2 messages it must receive, each durable
//!   before the publisher's PUBACK (or the cloud's, for cloud-to-device commands). The
//!   front door delivers that queue itself, in order, and drops the core's own QoS 1/2
//!   copies; a message leaves the queue only when the client acknowledged it (PUBACK, or
//!   PUBCOMP after a PUBREL that is recorded first, for exactly-once across a crash).
//!
//! One owner thread (`owner.rs`) holds the tables and the in-memory index behind
//! [`SessionsHandle`] and a closed [`Command`] set; its writes are group-committed with one
//! [`crate::store::Store::flush`] per batch. Who must receive a publish is answered without
//! the owner, from a shared snapshot of every persistent session's filters ([`topic::Matcher`]).

mod owner;
pub mod record;
pub mod topic;

use crate::store::Store;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub use record::Queued;

/// `[sessions]`: persistent sessions and their limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Persistent sessions kept at most; a CONNECT with CleanSession 0 that would open one
    /// more is refused (CONNACK 3, server unavailable).
    pub max_sessions: usize,
    /// QoS 1/2 messages one session may have queued (in flight included).
    pub max_queued_messages: usize,
    /// Bytes (topic + payload) one session may have queued.
    pub max_queued_bytes: u64,
    /// A queued message older than this is dropped instead of delivered.
    #[serde(with = "crate::duration")]
    pub max_message_age: Duration,
    /// A persistent session whose client has been away this long is deleted (0s: never).
    #[serde(with = "crate::duration")]
    pub session_expiry: Duration,
    /// What a full session queue does with one more message.
    pub when_full: WhenFull,
    /// Messages delivered to one client and not yet acknowledged, at most.
    pub max_inflight: u16,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            max_sessions: 10_000,
            max_queued_messages: 1000,
            max_queued_bytes: 16 * 1024 * 1024,
            max_message_age: Duration::from_secs(7 * 24 * 3600),
            session_expiry: Duration::from_secs(30 * 24 * 3600),
            when_full: WhenFull::DropNew,
            max_inflight: 20,
        }
    }
}

impl SessionsConfig {
    /// Errors name the dotted field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_sessions == 0 {
            return Err(("sessions.max_sessions", "must be at least 1".into()));
        }
        if self.max_queued_messages == 0 {
            return Err(("sessions.max_queued_messages", "must be at least 1".into()));
        }
        if self.max_queued_bytes == 0 {
            return Err(("sessions.max_queued_bytes", "must be at least 1".into()));
        }
        if self.max_message_age.is_zero() {
            return Err(("sessions.max_message_age", "must be > 0".into()));
        }
        if !(1..=1000).contains(&self.max_inflight) {
            return Err(("sessions.max_inflight", "must be 1..=1000".into()));
        }
        Ok(())
    }
}

/// The policy of a full session queue (Mosquitto's is `drop-new`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// The new message is not queued for that session (the others still get it).
    DropNew,
    /// The oldest queued messages make room for it.
    DropOldest,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionsError {
    #[error("sessions store: {0}")]
    Store(String),
    #[error("the sessions owner has stopped")]
    Stopped,
    #[error("persistent sessions are at the limit ({0}, sessions.max_sessions)")]
    TooManySessions(usize),
}

impl From<crate::store::StoreError> for SessionsError {
    fn from(e: crate::store::StoreError) -> Self {
        SessionsError::Store(e.to_string())
    }
}

/// Resolves once the writes of one request are durable (or failed).
pub type Durable = oneshot::Receiver<Result<(), SessionsError>>;
type DurableTx = oneshot::Sender<Result<(), SessionsError>>;

/// One queued message handed to the connection that delivers it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub seq: u64,
    pub msg: Queued,
    /// Handed out before (in this process): send with the DUP flag.
    pub dup: bool,
}

/// What the owner tells the connection of an attached session.
#[derive(Debug)]
pub enum ToConn {
    /// New messages are queued: fetch.
    More,
    /// The answer to a fetch, in queue order (may be empty).
    Batch(Vec<Delivery>),
    /// The PUBREC of this QoS 2 message is recorded: its PUBREL may go.
    Released(u64),
}

/// A persistent session attached to its connection.
#[derive(Debug)]
pub struct Attached {
    /// The session existed before this CONNECT (CONNACK session-present).
    pub present: bool,
    /// Its subscriptions, for the core (which only ever holds clean sessions).
    pub subs: Vec<(String, u8)>,
    pub events: mpsc::UnboundedReceiver<ToConn>,
    /// Identifies this attachment, so that a late detach of an older one is ignored.
    pub epoch: u64,
}

enum Command {
    /// CONNECT: attach (`clean = false`) or discard (`clean = true`) the session.
    Connect {
        session: String,
        clean: bool,
        reply: oneshot::Sender<Result<Option<Attached>, SessionsError>>,
    },
    Detach {
        session: String,
        epoch: u64,
    },
    Subscribe {
        session: String,
        filters: Vec<(String, u8)>,
        reply: DurableTx,
    },
    Unsubscribe {
        session: String,
        filters: Vec<String>,
        reply: DurableTx,
    },
    /// Queue a copy of one publish for each target session, at the given QoS.
    Publish {
        targets: Vec<(String, u8)>,
        topic: String,
        payload: Bytes,
        reply: DurableTx,
    },
    /// Set (non-empty payload) or clear (empty) the retained message of a topic.
    Retain {
        topic: String,
        owner: String,
        qos: u8,
        payload: Bytes,
        reply: DurableTx,
    },
    Fetch {
        session: String,
        epoch: u64,
        after: u64,
        max: usize,
    },
    Acked {
        session: String,
        seq: u64,
    },
    Release {
        session: String,
        epoch: u64,
        seq: u64,
    },
    /// Every retained message (for the restore at start).
    Retained {
        reply: oneshot::Sender<Result<Vec<(String, record::RetainedRecord)>, SessionsError>>,
    },
}

/// Counters and gauges of this capability (`outpost_session*`, `outpost_retained*`).
#[derive(Debug, Default)]
pub struct SessionStats {
    pub sessions: AtomicI64,
    pub queued: AtomicI64,
    pub queued_bytes: AtomicI64,
    pub retained: AtomicI64,
    pub dropped_full: AtomicU64,
    pub dropped_expired: AtomicU64,
    pub sessions_expired: AtomicU64,
    pub sessions_refused: AtomicU64,
    pub delivered: AtomicU64,
    pub restored_retained: AtomicU64,
    pub restore_ms: AtomicU64,
}

impl SessionStats {
    pub fn render(&self, out: &mut String) {
        let g = |v: &AtomicI64| v.load(Ordering::Relaxed);
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let mut put = |name: &str, kind: &str, help: &str, labels: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name}{labels} {v}");
        };
        put(
            "outpost_sessions_persistent",
            "gauge",
            "Persistent sessions kept on disk.",
            "",
            g(&self.sessions).to_string(),
        );
        put(
            "outpost_session_queued_messages",
            "gauge",
            "QoS 1/2 messages queued for persistent sessions.",
            "",
            g(&self.queued).to_string(),
        );
        put(
            "outpost_session_queued_bytes",
            "gauge",
            "Bytes queued for persistent sessions.",
            "",
            g(&self.queued_bytes).to_string(),
        );
        put(
            "outpost_retained_messages",
            "gauge",
            "Retained messages kept on disk.",
            "",
            g(&self.retained).to_string(),
        );
        let _ = writeln!(out, "# HELP outpost_session_dropped_total Queued messages a persistent session lost, by reason (full: sessions.when_full; expired: sessions.max_message_age).");
        let _ = writeln!(out, "# TYPE outpost_session_dropped_total counter");
        let _ = writeln!(
            out,
            "outpost_session_dropped_total{{reason=\"full\"}} {}",
            c(&self.dropped_full)
        );
        let _ = writeln!(
            out,
            "outpost_session_dropped_total{{reason=\"expired\"}} {}",
            c(&self.dropped_expired)
        );
        let mut put = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {v}");
        };
        put(
            "outpost_sessions_expired_total",
            "Persistent sessions deleted after sessions.session_expiry away.",
            c(&self.sessions_expired),
        );
        put(
            "outpost_sessions_refused_total",
            "CONNECTs refused because persistent sessions were at sessions.max_sessions.",
            c(&self.sessions_refused),
        );
        put(
            "outpost_session_delivered_total",
            "Queued messages handed to their clients.",
            c(&self.delivered),
        );
        put(
            "outpost_retained_restored_total",
            "Retained messages restored into the core at start.",
            c(&self.restored_retained),
        );
    }
}

/// The clonable handle to the sessions owner.
#[derive(Clone)]
pub struct SessionsHandle {
    tx: std::sync::mpsc::Sender<Command>,
    /// Every persistent session's filters (written by the owner only).
    matcher: Arc<RwLock<topic::Matcher>>,
    pub stats: Arc<SessionStats>,
}

fn closed() -> Durable {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(Err(SessionsError::Stopped));
    rx
}

impl SessionsHandle {
    /// Open the tables, load the index and start the owner thread.
    pub fn spawn(
        store: Store,
        cfg: SessionsConfig,
    ) -> Result<(SessionsHandle, std::thread::JoinHandle<()>), SessionsError> {
        let stats = Arc::new(SessionStats::default());
        let matcher = Arc::new(RwLock::new(topic::Matcher::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        let owner = owner::Owner::load(store, cfg, matcher.clone(), stats.clone())?;
        let thread = std::thread::Builder::new()
            .name("outpost-sessions".into())
            .spawn(move || owner.run(rx))
            .map_err(|e| SessionsError::Store(format!("cannot start the sessions thread: {e}")))?;
        Ok((SessionsHandle { tx, matcher, stats }, thread))
    }

    fn send(&self, c: Command) -> bool {
        self.tx.send(c).is_ok()
    }

    /// The persistent sessions that must keep a copy of a QoS `qos` publish on `topic`, with
    /// the QoS of their copy; only copies of QoS 1 or 2 are kept (QoS 0 goes live, by the core).
    pub fn targets(&self, topic: &str, qos: u8) -> Vec<(String, u8)> {
        if qos == 0 {
            return Vec::new();
        }
        let m = self.matcher.read().unwrap_or_else(|e| e.into_inner());
        if m.is_empty() {
            return Vec::new();
        }
        m.matches(topic)
            .into_iter()
            .map(|(s, q)| (s, q.min(qos)))
            .filter(|(_, q)| *q > 0)
            .collect()
    }

    /// Send the command `make` builds around a reply channel; the reply resolves once its
    /// writes are durable (at once with `Stopped` if the owner is gone).
    fn durable(&self, make: impl FnOnce(DurableTx) -> Command) -> Durable {
        let (reply, rx) = oneshot::channel();
        if self.send(make(reply)) {
            rx
        } else {
            closed()
        }
    }

    /// Queue one publish for `targets` (from [`SessionsHandle::targets`]).
    pub fn publish(&self, targets: Vec<(String, u8)>, topic: &str, payload: Bytes) -> Durable {
        self.durable(|reply| Command::Publish {
            targets,
            topic: topic.to_string(),
            payload,
            reply,
        })
    }

    /// Record a retained message (an empty payload clears the topic).
    pub fn retain(&self, topic: &str, owner: &str, qos: u8, payload: Bytes) -> Durable {
        self.durable(|reply| Command::Retain {
            topic: topic.to_string(),
            owner: owner.to_string(),
            qos,
            payload,
            reply,
        })
    }

    /// A publish from inside the gateway (not through the front door) that goes to the core
    /// next: recorded if retained, and queued for the persistent sessions it reaches.
    /// Awaiting the result is the caller's choice.
    pub fn publish_internal(
        &self,
        topic: &str,
        owner: &str,
        qos: u8,
        retain: bool,
        payload: Bytes,
    ) -> Vec<Durable> {
        let mut out = Vec::new();
        if retain || payload.is_empty() {
            out.push(self.retain(topic, owner, qos, payload.clone()));
        }
        let targets = self.targets(topic, qos);
        if !targets.is_empty() {
            out.push(self.publish(targets, topic, payload));
        }
        out
    }

    /// [`SessionsHandle::publish_internal`], waiting until all of it is durable.
    pub async fn publish_internal_durable(
        &self,
        topic: &str,
        owner: &str,
        qos: u8,
        retain: bool,
        payload: Bytes,
    ) -> Result<(), SessionsError> {
        for d in self.publish_internal(topic, owner, qos, retain, payload) {
            d.await.map_err(|_| SessionsError::Stopped)??;
        }
        Ok(())
    }

    /// CONNECT of `session`: with `clean`, forget any session it had (durably) and return
    /// `None`; else attach it, creating it if new.
    pub async fn connect(
        &self,
        session: &str,
        clean: bool,
    ) -> Result<Option<Attached>, SessionsError> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Command::Connect {
            session: session.to_string(),
            clean,
            reply,
        }) {
            return Err(SessionsError::Stopped);
        }
        rx.await.map_err(|_| SessionsError::Stopped)?
    }

    pub fn detach(&self, session: &str, epoch: u64) {
        self.send(Command::Detach {
            session: session.to_string(),
            epoch,
        });
    }

    pub fn subscribe(&self, session: &str, filters: Vec<(String, u8)>) -> Durable {
        self.durable(|reply| Command::Subscribe {
            session: session.to_string(),
            filters,
            reply,
        })
    }

    pub fn unsubscribe(&self, session: &str, filters: Vec<String>) -> Durable {
        self.durable(|reply| Command::Unsubscribe {
            session: session.to_string(),
            filters,
            reply,
        })
    }

    /// Ask for up to `max` queued messages after `after`; answered as [`ToConn::Batch`].
    pub fn fetch(&self, session: &str, epoch: u64, after: u64, max: usize) {
        self.send(Command::Fetch {
            session: session.to_string(),
            epoch,
            after,
            max,
        });
    }

    /// The client acknowledged `seq` (PUBACK, PUBCOMP, or a QoS 0 message written).
    pub fn acked(&self, session: &str, seq: u64) {
        self.send(Command::Acked {
            session: session.to_string(),
            seq,
        });
    }

    /// The client's PUBREC of `seq`: answered as [`ToConn::Released`] once durable.
    pub fn release(&self, session: &str, epoch: u64, seq: u64) {
        self.send(Command::Release {
            session: session.to_string(),
            epoch,
            seq,
        });
    }

    pub async fn retained(&self) -> Result<Vec<(String, record::RetainedRecord)>, SessionsError> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Command::Retained { reply }) {
            return Err(SessionsError::Stopped);
        }
        rx.await.map_err(|_| SessionsError::Stopped)?
    }
}

/// The packet id a queued message is delivered with: a function of its sequence number, so
/// that a message sent again after a restart carries the same id (what lets a QoS 2 receiver
/// recognise it), and unique among the at most 1,000 in flight.
pub fn packet_id(seq: u64) -> u16 {
    (seq % 65_535) as u16 + 1
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
