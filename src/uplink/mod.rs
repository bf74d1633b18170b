//! The uplink: one MQTT session to the cloud broker, internet-loss detection, and the durable
//! store-and-forward queue between the devices and the cloud.
//!
//! Devices notice nothing but a state change they can read on `outpost/uplink/state`
//! (retained). The front door appends every PUBLISH on an uplink topic to the queue and
//! waits for the group commit before the device gets its acknowledgement; the session task
//! drains the queue in order, deleting a message only once the cloud broker acknowledged it.

pub mod detect;
pub(crate) mod link;
pub mod mapping;
pub mod queue;

use crate::broker::BrokerLink;
use crate::store::Store;
pub use detect::LinkState;
use mapping::{DownRule, Mapping, UpRule};
use queue::{QueueHandle, WhenFull};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Local topic where the uplink state is published (retained).
/// (Not a `$` topic: the routing core refuses subscriptions to `$` filters.)
pub const STATE_TOPIC: &str = "outpost/uplink/state";

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("uplink TLS file {path}: {reason}")]
    TlsFile { path: PathBuf, reason: String },
    #[error("uplink TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("uplink topic mapping: {0}")]
    Mapping(#[from] crate::acl::AclError),
    #[error(transparent)]
    Queue(#[from] queue::QueueError),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DetectionConfig {
    /// How often the link is checked.
    #[serde(with = "crate::duration")]
    pub interval: Duration,
    /// While connected: a heartbeat unanswered for this long is a failed probe.
    #[serde(with = "crate::duration")]
    pub heartbeat_timeout: Duration,
    /// While disconnected: time allowed for a TCP connect + TLS handshake probe (a failed one
    /// is a failed verdict; a good one only retries the session at once, never Online).
    #[serde(with = "crate::duration")]
    pub probe_timeout: Duration,
    /// Consecutive failed probes that take the link Offline.
    pub failures_to_offline: u32,
    /// Consecutive good verdicts that bring it back Online: an accepted CONNACK is the first,
    /// MQTT round trips on that session the next ones.
    pub successes_to_online: u32,
}

impl Default for DetectionConfig {
    fn default() -> Self {
        DetectionConfig {
            interval: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(2),
            probe_timeout: Duration::from_millis(1500),
            failures_to_offline: 1,
            successes_to_online: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UplinkConfig {
    /// Off by default: a gateway works fully without a cloud.
    pub enabled: bool,
    /// Cloud broker host name (must match its certificate) and port.
    pub host: String,
    pub port: u16,
    /// MQTT client id at the cloud; empty means the gateway id.
    pub client_id: String,
    /// PEM CA that signed the cloud broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate and key of this gateway at the cloud.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// MQTT keep-alive of the cloud session.
    #[serde(with = "crate::duration")]
    pub keep_alive: Duration,
    /// Time allowed for TCP + TLS + CONNACK when (re)connecting.
    #[serde(with = "crate::duration")]
    pub connect_timeout: Duration,
    /// Reconnect backoff: exponential from `backoff_min` to `backoff_max`, full jitter.
    #[serde(with = "crate::duration")]
    pub backoff_min: Duration,
    #[serde(with = "crate::duration")]
    pub backoff_max: Duration,
    /// QoS 1 messages in flight to the cloud.
    pub inflight: u16,
    /// Bytes the durable queue may hold.
    pub queue_max_bytes: u64,
    /// What happens when the queue is full.
    pub when_full: WhenFull,
    /// Messages older than this when they could be sent are dropped and counted ("0s": never).
    #[serde(with = "crate::duration")]
    pub message_ttl: Duration,
    /// Cloud topic for liveness heartbeats (QoS 1, sent only when the link is idle).
    pub heartbeat_topic: String,
    pub detection: DetectionConfig,
    pub up: Vec<UpRule>,
    pub down: Vec<DownRule>,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            enabled: false,
            host: String::new(),
            port: 8883,
            client_id: String::new(),
            ca_file: PathBuf::new(),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            keep_alive: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            inflight: 100,
            queue_max_bytes: 256 * 1024 * 1024,
            when_full: WhenFull::Refuse,
            message_ttl: Duration::ZERO,
            heartbeat_topic: "outpost/{gateway}/heartbeat".into(),
            detection: DetectionConfig::default(),
            up: mapping::default_up(),
            down: mapping::default_down(),
        }
    }
}

impl UplinkConfig {
    /// Checks types cannot express; errors name the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled {
            return Ok(());
        }
        if self.host.is_empty() {
            return Err((
                "uplink.host",
                "must be set when uplink.enabled = true".into(),
            ));
        }
        for (f, p) in [
            ("uplink.ca_file", &self.ca_file),
            ("uplink.cert_file", &self.cert_file),
            ("uplink.key_file", &self.key_file),
        ] {
            if p.as_os_str().is_empty() {
                return Err((f, "must be set when uplink.enabled = true".into()));
            }
        }
        if self.keep_alive < Duration::from_secs(1) {
            return Err(("uplink.keep_alive", "must be at least 1s".into()));
        }
        if self.backoff_min.is_zero() || self.backoff_max < self.backoff_min {
            return Err((
                "uplink.backoff_min",
                "must be > 0 and <= uplink.backoff_max".into(),
            ));
        }
        if self.inflight == 0 {
            return Err(("uplink.inflight", "must be at least 1".into()));
        }
        if self.queue_max_bytes < 64 * 1024 {
            return Err(("uplink.queue_max_bytes", "must be at least 64 KiB".into()));
        }
        let d = &self.detection;
        if d.interval < Duration::from_millis(50)
            || d.heartbeat_timeout.is_zero()
            || d.probe_timeout.is_zero()
        {
            return Err((
                "uplink.detection.interval",
                "interval >= 50ms and timeouts > 0 required".into(),
            ));
        }
        if let Err(e) = Mapping::new("g", &self.up, &self.down) {
            return Err(("uplink.up/uplink.down", e.to_string()));
        }
        Ok(())
    }
}

/// Counters of the uplink session.
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub online: AtomicU64,
    pub transitions: AtomicU64,
    pub published: AtomicU64,
    pub resent: AtomicU64,
    pub heartbeats: AtomicU64,
    pub probes_failed: AtomicU64,
    pub commands_down: AtomicU64,
    pub commands_rejected: AtomicU64,
    pub connects: AtomicU64,
    pub refused: AtomicU64,
    pub last_transition_ms: AtomicU64,
}

/// A message from the cloud for one capability (registry sync, CAN rules), acknowledged
/// (by `client`) once that capability has handled it; an unacknowledged one comes again.
pub struct Delivery {
    pub publish: rumqttc::Publish,
    pub client: rumqttc::AsyncClient,
}

/// What the rest of the gateway sees of the uplink.
#[derive(Clone)]
pub struct UplinkHandle {
    pub queue: QueueHandle,
    pub mapping: Arc<Mapping>,
    pub state: watch::Receiver<LinkState>,
    pub stats: Arc<UplinkStats>,
}

impl UplinkHandle {
    /// Prometheus lines for the uplink and its queue.
    pub fn render_metrics(&self, out: &mut String) {
        let q = self.queue.stats();
        let s = &self.stats;
        let l = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let mut m = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        m(
            "outpost_uplink_online",
            "gauge",
            "1 when the cloud link is Online, 0 when Offline.",
            l(&s.online),
        );
        m(
            "outpost_uplink_transitions_total",
            "counter",
            "Online/Offline transitions.",
            l(&s.transitions),
        );
        m(
            "outpost_uplink_connects_total",
            "counter",
            "Successful cloud CONNACKs.",
            l(&s.connects),
        );
        m(
            "outpost_uplink_refused_total",
            "counter",
            "CONNACKs in which the cloud broker refused the session (e.g. bad credentials).",
            l(&s.refused),
        );
        m(
            "outpost_uplink_published_total",
            "counter",
            "Messages published to the cloud (including resends).",
            l(&s.published),
        );
        m(
            "outpost_uplink_resent_total",
            "counter",
            "Messages published again after a reconnect or restart (possible duplicates; after a crash an upper bound that may include up to four windows never sent).",
            l(&s.resent),
        );
        m(
            "outpost_uplink_heartbeats_total",
            "counter",
            "Liveness heartbeats sent.",
            l(&s.heartbeats),
        );
        m(
            "outpost_uplink_probes_failed_total",
            "counter",
            "Failed liveness probes.",
            l(&s.probes_failed),
        );
        m(
            "outpost_uplink_commands_down_total",
            "counter",
            "Cloud messages delivered to local topics.",
            l(&s.commands_down),
        );
        m(
            "outpost_uplink_commands_rejected_total",
            "counter",
            "Cloud messages on no mapped local topic.",
            l(&s.commands_rejected),
        );
        m(
            "outpost_uplink_queue_depth",
            "gauge",
            "Messages waiting for a cloud acknowledgement.",
            l(&q.depth),
        );
        m(
            "outpost_uplink_queue_bytes",
            "gauge",
            "Bytes in the durable queue.",
            l(&q.bytes),
        );
        m(
            "outpost_uplink_queue_oldest_age_seconds",
            "gauge",
            "Age of the oldest queued message.",
            self.queue.oldest_age_ms() / 1000,
        );
        m(
            "outpost_uplink_queue_appended_total",
            "counter",
            "Messages made durable.",
            l(&q.appended),
        );
        m(
            "outpost_uplink_queue_acked_total",
            "counter",
            "Messages acknowledged by the cloud and removed.",
            l(&q.acked),
        );
        m(
            "outpost_uplink_queue_refused_total",
            "counter",
            "Messages refused because the queue was full.",
            l(&q.refused),
        );
        m(
            "outpost_uplink_queue_dropped_total",
            "counter",
            "Messages dropped to make room (drop-oldest).",
            l(&q.dropped),
        );
        m(
            "outpost_uplink_queue_expired_total",
            "counter",
            "Messages dropped for exceeding message_ttl.",
            l(&q.expired),
        );
        m(
            "outpost_uplink_queue_group_commits_total",
            "counter",
            "Flushes of the durable queue.",
            l(&q.group_commits),
        );
    }
}

/// Start the queue owner and the session task.
#[allow(clippy::too_many_arguments)]
pub fn start(
    cfg: &UplinkConfig,
    gateway_id: &str,
    store: Store,
    core: BrokerLink,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
    sync_down: Option<tokio::sync::mpsc::Sender<Delivery>>,
    sessions: Option<crate::sessions::SessionsHandle>,
    can_down: Option<tokio::sync::mpsc::Sender<Delivery>>,
    credentials_down: Option<tokio::sync::mpsc::Sender<Delivery>>,
) -> Result<(UplinkHandle, std::thread::JoinHandle<()>), UplinkError> {
    let mapping = Arc::new(Mapping::new(gateway_id, &cfg.up, &cfg.down)?);
    let (queue, queue_thread) = QueueHandle::spawn(
        store,
        cfg.queue_max_bytes,
        cfg.when_full,
        u64::from(cfg.inflight),
    )?;
    let tls = link::client_tls(cfg)?;
    let (state_tx, state_rx) = watch::channel(LinkState::Offline);
    let stats = Arc::new(UplinkStats::default());
    let handle = UplinkHandle {
        queue: queue.clone(),
        mapping: mapping.clone(),
        state: state_rx,
        stats: stats.clone(),
    };
    let mut session = link::Session::new(
        cfg.clone(),
        gateway_id,
        tls,
        queue,
        mapping,
        core,
        state_tx,
        stats,
    );
    session.sync_down = sync_down;
    session.can_down = can_down;
    session.credentials_down = credentials_down;
    session.sessions = sessions;
    tracker.spawn(session.run(shutdown));
    Ok((handle, queue_thread))
}
