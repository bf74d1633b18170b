//! The CAN capability of `outpost run`: one owner task grades every frame of every bus,
//! keeps the incidents and the per-id windows, and answers by level — online or offline.
//!
//! * Every frame gets a level from the bus's [`Detector`]. At or above `can.alert_level`
//!   it is anomalous: it opens an *incident* for its id (all unknown ids of a bus share one,
//!   so a fuzzing attack is one incident, not thousands), or extends the open one.
//! * An incident's first report goes out within 100 ms: to the cloud through the durable
//!   uplink queue (`$outpost/can/report`, which the uplink sends to
//!   `outpost/{gateway}/can/report`), so an attack during an outage reaches the cloud once
//!   the link is back, and on the retained alert topic for the vehicle's HMI. It carries the
//!   first frame, the `can.neighbours` frames before and after it, the reasons and the level.
//!   While the incident lasts an update goes out at most once a second; after
//!   `can.incident_quiet` without an anomalous frame a closing report does.
//! * An incident on a safety-relevant id that reaches its rule's level publishes a stop or
//!   slow-down instruction for the vehicle function; one on a SecOC-protected id requests a
//!   key update (locally and to the cloud). Once per incident each.
//! * Levels above 0 and below the alert level are counted in the summary: every
//!   `can.summary_every`, a per-id summary of each bus (counts, gap statistics, anomalous
//!   and suspect counts, the highest level, payload bit fingerprints) goes to the cloud
//!   (`$outpost/can/summary`) and the buses' states to the retained status topic.
//!
//! Everything the owner holds is bounded: incidents by the profile's ids plus one per bus,
//! windows by [`MAX_WINDOW_IDS`], neighbours by `can.neighbours`, the cloud outbox by
//! [`OUTBOX`] messages (beyond it reports are dropped and counted, never blocking the bus).

use super::candump::format_line;
use super::config::{parse_id, CanConfig, SafetyAction};
use super::detect::Detector;
use super::frame::{Frame, CAN_ERR_BUSOFF, CAN_ERR_RESTARTED, CAN_RTR_FLAG};
use super::profile::{Profile, PROFILE_VERSION};
use super::rules::Rules;
use super::source::{self, Input};
use crate::sessions::SessionsHandle;
use crate::store::{Store, Table};
use crate::uplink::queue::{now_ms, Message, QueueHandle};
use crate::uplink::Delivery;
use bytes::Bytes;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Queue topic of incident reports (the cloud sees `outpost/{gateway}/can/report`).
pub const REPORT_TOPIC: &str = "$outpost/can/report";
/// Queue topic of the periodic summaries.
pub const SUMMARY_TOPIC: &str = "$outpost/can/summary";
/// Queue topic of key-update requests.
pub const KEY_UPDATE_TOPIC: &str = "$outpost/can/key-update";
/// Queue topic of the vehicle's declaration (sent at every start).
pub const VEHICLE_TOPIC: &str = "$outpost/can/vehicle";
/// Queue topic of what became of a rule set from the fleet server.
pub const RULES_STATUS_TOPIC: &str = "$outpost/can/rules-status";
/// Store table of the capability, and the key of the applied rule set in it.
pub const TABLE: &str = "can";
const RULES_KEY: &[u8] = b"rules";
/// Ids per bus and window summarised one by one; more are counted together.
pub const MAX_WINDOW_IDS: usize = 2048;
/// Unknown ids named in one incident, at most.
pub const MAX_INCIDENT_IDS: usize = 16;
/// Cloud messages waiting for the queue, at most.
pub const OUTBOX: usize = 1024;
/// Client id of the capability's publisher in the routing core.
pub const CLIENT_ID: &str = "outpost~can";
/// A first report waits this long for the frames after the anomalous one, at most.
const OPEN_WAIT: Duration = Duration::from_millis(100);
/// Updates of a running incident, at most this often.
const UPDATE_EVERY: Duration = Duration::from_secs(1);
/// Repeated warnings of one bus (error frames, skipped lines), at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CanError {
    #[error("CAN profile {path}: {reason}")]
    Profile { path: PathBuf, reason: String },
    #[error("CAN store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Read and check a profile written by `outpost can learn`.
pub fn load_profile(path: &Path) -> Result<Profile, CanError> {
    let err = |reason: String| CanError::Profile {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let p: Profile = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    if p.version != PROFILE_VERSION {
        return Err(err(format!(
            "version {} (this build reads {PROFILE_VERSION}): learn it again",
            p.version
        )));
    }
    Ok(p)
}

/// Counters of the capability (Prometheus `outpost_can_*`).
#[derive(Debug, Default)]
pub struct CanStats {
    pub frames: AtomicU64,
    pub anomalous: AtomicU64,
    pub suspect: AtomicU64,
    pub error_frames: AtomicU64,
    pub bus_off: AtomicU64,
    pub restarts: AtomicU64,
    pub interface_down: AtomicU64,
    pub skipped_lines: AtomicU64,
    pub incidents: AtomicU64,
    pub reports: AtomicU64,
    pub reports_dropped: AtomicU64,
    pub cloud_refused: AtomicU64,
    pub summaries: AtomicU64,
    pub safety_actions: AtomicU64,
    pub key_updates: AtomicU64,
    pub rules_applied: AtomicU64,
    pub rules_refused: AtomicU64,
    pub fleet_alerts: AtomicU64,
    pub fleet_instructions: AtomicU64,
    pub fleet_refused: AtomicU64,
}

impl CanStats {
    pub fn render(&self, out: &mut String) {
        let l = |v: &AtomicU64| v.load(Ordering::Relaxed);
        for (name, help, v) in [
            ("frames", "CAN frames graded.", &self.frames),
            (
                "anomalous",
                "Frames at or above can.alert_level.",
                &self.anomalous,
            ),
            (
                "suspect",
                "Frames above 0 and below can.alert_level.",
                &self.suspect,
            ),
            (
                "error_frames",
                "Error frames from the controllers.",
                &self.error_frames,
            ),
            ("bus_off", "Bus-off error frames.", &self.bus_off),
            (
                "restarts",
                "Controller restarts after bus-off.",
                &self.restarts,
            ),
            (
                "interface_down",
                "Times a bus became unusable.",
                &self.interface_down,
            ),
            (
                "skipped_lines",
                "Replayed log lines that were not frames.",
                &self.skipped_lines,
            ),
            ("incidents", "Incidents opened.", &self.incidents),
            (
                "reports",
                "Incident reports sent (cloud and alert topic).",
                &self.reports,
            ),
            (
                "reports_dropped",
                "Cloud messages dropped: the outbox was full.",
                &self.reports_dropped,
            ),
            (
                "cloud_refused",
                "Cloud messages the uplink queue refused.",
                &self.cloud_refused,
            ),
            ("summaries", "Bus summaries made.", &self.summaries),
            (
                "safety_actions",
                "Stop / slow-down instructions published.",
                &self.safety_actions,
            ),
            (
                "key_updates",
                "Key-update requests made.",
                &self.key_updates,
            ),
            (
                "rules_applied",
                "Rule sets from the fleet server applied.",
                &self.rules_applied,
            ),
            (
                "rules_refused",
                "Rule sets from the fleet server refused.",
                &self.rules_refused,
            ),
            (
                "fleet_alerts",
                "Alerts from the fleet server.",
                &self.fleet_alerts,
            ),
            (
                "fleet_instructions",
                "Instructions from the fleet server.",
                &self.fleet_instructions,
            ),
            (
                "fleet_refused",
                "Fleet messages that were not understood.",
                &self.fleet_refused,
            ),
        ] {
            let kind = "counter";
            let _ = writeln!(
                out,
                "# HELP outpost_can_{name} {help}\n# TYPE outpost_can_{name} {kind}\n\
                 outpost_can_{name} {}",
                l(v)
            );
        }
    }
}

/// Where the capability's answers go: the local broker (alerts, instructions) and the
/// cloud (reports, summaries).
pub trait Sink: Send + 'static {
    fn local(&mut self, topic: &str, qos: u8, retain: bool, payload: Bytes);
    fn cloud(&mut self, topic: &str, payload: Bytes);
}

/// One bus as the owner and its clients see it.
#[derive(Debug, Clone, PartialEq)]
pub struct BusStatus {
    pub name: String,
    pub up: bool,
    pub reason: String,
    pub open_incidents: usize,
}

/// The closed set of requests to the owner.
pub enum Command {
    /// Grade by these rules from now on (they are on disk already).
    ApplyRules {
        rules: Box<Rules>,
        reply: oneshot::Sender<()>,
    },
    /// A rule set that failed its checks: tell the fleet server why.
    RulesRefused {
        rules_id: String,
        error: String,
        reply: oneshot::Sender<()>,
    },
    /// An alert or an instruction from the fleet server.
    Fleet {
        msg: Value,
        reply: oneshot::Sender<()>,
    },
}

/// What the rest of the gateway holds of the capability.
/// The capability's state is the owner's; the buses' states go out on the retained status
/// topic and the counters on `/metrics`.
#[derive(Clone)]
pub struct CanHandle {
    pub stats: Arc<CanStats>,
}

/// The settings the owner acts on, resolved from [`CanConfig`].
struct Settings {
    alert_level: f64,
    neighbours: usize,
    quiet: Duration,
    summary_every: Duration,
    gateway: String,
    vehicle: String,
    network_config: String,
    senders: HashMap<u32, String>,
    ecu_types: HashMap<String, String>,
    alert_topic: String,
    status_topic: String,
    fleet_alert_topic: String,
    safety: HashMap<u32, Vec<(SafetyAction, f64, String)>>,
    secoc: HashMap<u32, f64>,
    secoc_topic: String,
}

impl Settings {
    fn new(cfg: &CanConfig, gateway: &str) -> Settings {
        let ids = |list: &[String]| -> Vec<u32> {
            list.iter().filter_map(|s| parse_id(s).ok()).collect()
        };
        let mut safety: HashMap<u32, Vec<_>> = HashMap::new();
        for r in &cfg.safety {
            for id in ids(&r.ids) {
                safety
                    .entry(id)
                    .or_default()
                    .push((r.action, r.level, r.topic.clone()));
            }
        }
        Settings {
            alert_level: cfg.alert_level,
            neighbours: cfg.neighbours,
            quiet: cfg.incident_quiet,
            summary_every: cfg.summary_every,
            gateway: gateway.to_string(),
            vehicle: if cfg.vehicle.id.is_empty() {
                gateway.to_string()
            } else {
                cfg.vehicle.id.clone()
            },
            network_config: cfg.vehicle.network_config.clone(),
            senders: cfg
                .vehicle
                .senders
                .iter()
                .filter_map(|(k, v)| parse_id(k).ok().map(|id| (id, v.clone())))
                .collect(),
            ecu_types: cfg.vehicle.ecu_types.clone().into_iter().collect(),
            alert_topic: cfg.alert_topic.clone(),
            status_topic: cfg.status_topic.clone(),
            fleet_alert_topic: cfg.fleet_alert_topic.clone(),
            safety,
            secoc: ids(&cfg.secoc.ids)
                .into_iter()
                .map(|id| (id, cfg.secoc.level))
                .collect(),
            secoc_topic: cfg.secoc.topic.clone(),
        }
    }
}

fn id_text(key: u32) -> String {
    format!("{key:#x}")
}

fn seconds(ts_us: u64) -> f64 {
    ts_us as f64 / 1e6
}

/// Frames per second of `frames` over `span_us` (0 for a single frame).
fn rate_hz(frames: u64, span_us: u64) -> f64 {
    if frames < 2 || span_us == 0 {
        return 0.0;
    }
    ((frames - 1) as f64 * 1e6 / span_us as f64 * 10.0).round() / 10.0
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Per id and window: what the summary says of it.
struct IdWindow {
    n: u64,
    anomalous: u64,
    suspect: u64,
    max_level: f64,
    last_ts: Option<u64>,
    gap_min: u64,
    gap_max: u64,
    gap_sum: u64,
    gaps: u64,
    and: Vec<u8>,
    or: Vec<u8>,
}

impl IdWindow {
    fn new(d: &[u8]) -> IdWindow {
        IdWindow {
            n: 0,
            anomalous: 0,
            suspect: 0,
            max_level: 0.0,
            last_ts: None,
            gap_min: u64::MAX,
            gap_max: 0,
            gap_sum: 0,
            gaps: 0,
            and: d.to_vec(),
            or: d.to_vec(),
        }
    }

    fn add(&mut self, f: &Frame, level: f64, alert: f64) {
        self.n += 1;
        if level >= alert {
            self.anomalous += 1;
        } else if level > 0.0 {
            self.suspect += 1;
        }
        self.max_level = self.max_level.max(level);
        if let Some(prev) = self.last_ts {
            let g = f.ts_us.saturating_sub(prev);
            self.gap_min = self.gap_min.min(g);
            self.gap_max = self.gap_max.max(g);
            self.gap_sum = self.gap_sum.saturating_add(g);
            self.gaps += 1;
        }
        self.last_ts = Some(f.ts_us);
        let d = f.data();
        for (i, &b) in d.iter().enumerate().take(self.and.len()) {
            self.and[i] &= b;
            self.or[i] |= b;
        }
    }

    fn json(&self) -> Value {
        let gap = (self.gaps > 0).then(|| {
            json!({
                "min": self.gap_min,
                "mean": self.gap_sum / self.gaps,
                "max": self.gap_max,
            })
        });
        json!({
            "n": self.n,
            "anomalous": self.anomalous,
            "suspect": self.suspect,
            "max_level": self.max_level,
            "gap_us": gap,
            "and": hex(&self.and),
            "or": hex(&self.or),
        })
    }
}

struct Incident {
    seq: String,
    /// The id, or `None` for the bus's unknown ids together.
    key: Option<u32>,
    ids: Vec<u32>,
    first: Frame,
    first_level: f64,
    last_ts: u64,
    frames: u64,
    max_level: f64,
    reasons: Vec<&'static str>,
    /// Fleet rules that fired.
    rules: Vec<String>,
    /// Bitwise AND / OR of the anomalous frames' data (their common bits: the signature).
    and: Vec<u8>,
    or: Vec<u8>,
    before: Vec<String>,
    after: Vec<String>,
    opened_at: Instant,
    last_anomaly: Instant,
    sent_open: bool,
    last_report: Instant,
    reported_frames: u64,
    actions: Vec<&'static str>,
}

struct Bus {
    name: String,
    detector: Detector,
    up: bool,
    reason: String,
    ring: VecDeque<Frame>,
    windows: HashMap<u32, IdWindow>,
    other: u64,
    frames: u64,
    errors: u64,
    incidents: HashMap<Option<u32>, Incident>,
    warned: Option<Instant>,
    /// Log lines the source skipped so far.
    skipped: u64,
}

impl Bus {
    fn warn_due(&mut self, now: Instant) -> bool {
        let due = self
            .warned
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY);
        if due {
            self.warned = Some(now);
        }
        due
    }
}

struct Owner<S: Sink> {
    set: Settings,
    buses: Vec<Bus>,
    rules: Rules,
    stats: Arc<CanStats>,
    sink: S,
    window_from_ms: u64,
    window_started: Instant,
}

impl<S: Sink> Owner<S> {
    fn new(set: Settings, buses: Vec<(String, Detector)>, stats: Arc<CanStats>, sink: S) -> Self {
        Owner {
            set,
            rules: Rules::empty(),
            buses: buses
                .into_iter()
                .map(|(name, detector)| Bus {
                    name,
                    detector,
                    up: false,
                    reason: "starting".into(),
                    ring: VecDeque::new(),
                    windows: HashMap::new(),
                    other: 0,
                    frames: 0,
                    errors: 0,
                    incidents: HashMap::new(),
                    warned: None,
                    skipped: 0,
                })
                .collect(),
            stats,
            sink,
            window_from_ms: now_ms(),
            window_started: Instant::now(),
        }
    }

    fn input(&mut self, i: Input, now: Instant) {
        match i {
            Input::Frames { bus, frames } => {
                for f in &frames {
                    self.frame(bus, f, now);
                }
            }
            Input::State { bus, up, reason } => {
                let Some(b) = self.buses.get_mut(bus) else {
                    return;
                };
                if up {
                    tracing::info!(bus = %b.name, %reason, "CAN bus up");
                } else {
                    self.stats.interface_down.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(bus = %b.name, %reason, "CAN bus unusable; retrying");
                }
                b.up = up;
                b.reason = reason;
                self.publish_status();
            }
            Input::Skipped { bus, lines, first } => {
                let Some(b) = self.buses.get_mut(bus) else {
                    return;
                };
                // `lines` is the source's running total.
                let delta = lines.saturating_sub(b.skipped);
                b.skipped = b.skipped.max(lines);
                self.stats.skipped_lines.fetch_add(delta, Ordering::Relaxed);
                if b.warn_due(now) {
                    tracing::warn!(bus = %b.name, lines, first = ?first, "log lines skipped: not frames");
                }
            }
            Input::Ended { bus } => {
                if let Some(b) = self.buses.get_mut(bus) {
                    tracing::info!(bus = %b.name, "replay ended");
                    b.up = false;
                    b.reason = "replay ended".into();
                    self.publish_status();
                }
            }
        }
    }

    fn frame(&mut self, bus: usize, f: &Frame, now: Instant) {
        let neighbours = self.set.neighbours;
        let alert = self.set.alert_level;
        let Some(b) = self.buses.get_mut(bus) else {
            return;
        };
        b.frames += 1;
        if let super::frame::Kind::Error { class } = f.kind {
            b.errors += 1;
            self.stats.error_frames.fetch_add(1, Ordering::Relaxed);
            if class & CAN_ERR_BUSOFF != 0 {
                self.stats.bus_off.fetch_add(1, Ordering::Relaxed);
                tracing::error!(bus = %b.name, "CAN controller bus-off");
            } else if class & CAN_ERR_RESTARTED != 0 {
                self.stats.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::info!(bus = %b.name, "CAN controller restarted");
            } else if b.warn_due(now) {
                tracing::warn!(bus = %b.name, class = format!("{class:#x}"), errors = b.errors, "CAN error frames");
            }
            return;
        }
        self.stats.frames.fetch_add(1, Ordering::Relaxed);
        let mut v = b.detector.grade(f);
        let mut rule = None;
        if let Some((l, name)) = self.rules.grade(f) {
            v.level = ((1.0 - (1.0 - v.level) * (1.0 - l)) * 1000.0).round() / 1000.0;
            v.reasons.push("fleet-rule");
            rule = Some(name.to_string());
        }
        let key = f.can_id() & !CAN_RTR_FLAG;
        let windows = b.windows.len();
        match b.windows.get_mut(&key) {
            Some(w) => w.add(f, v.level, alert),
            None if windows < MAX_WINDOW_IDS => {
                let mut w = IdWindow::new(f.data());
                w.add(f, v.level, alert);
                b.windows.insert(key, w);
            }
            None => b.other += 1,
        }
        // The frames after each fresh incident's first one.
        for inc in b.incidents.values_mut() {
            if !inc.sent_open && inc.after.len() < neighbours {
                inc.after.push(format_line(&b.name, f));
            }
        }
        if v.level >= alert {
            self.stats.anomalous.fetch_add(1, Ordering::Relaxed);
            let group = (!v.reasons.contains(&"unknown-id")).then_some(key);
            match b.incidents.get_mut(&group) {
                Some(inc) => {
                    inc.frames += 1;
                    inc.last_ts = f.ts_us;
                    inc.last_anomaly = now;
                    inc.max_level = inc.max_level.max(v.level);
                    for r in &v.reasons {
                        if !inc.reasons.contains(r) {
                            inc.reasons.push(r);
                        }
                    }
                    if let Some(name) = rule {
                        if !inc.rules.contains(&name) && inc.rules.len() < MAX_INCIDENT_IDS {
                            inc.rules.push(name);
                        }
                    }
                    let d = f.data();
                    inc.and.truncate(d.len());
                    inc.or.truncate(d.len());
                    for (i, &x) in d.iter().enumerate().take(inc.and.len()) {
                        inc.and[i] &= x;
                        inc.or[i] |= x;
                    }
                    if group.is_none()
                        && inc.ids.len() < MAX_INCIDENT_IDS
                        && !inc.ids.contains(&key)
                    {
                        inc.ids.push(key);
                    }
                }
                None => {
                    self.stats.incidents.fetch_add(1, Ordering::Relaxed);
                    let seq = match group {
                        Some(k) => format!("{}-{}-{}", b.name, f.ts_us, id_text(k)),
                        None => format!("{}-{}-unknown", b.name, f.ts_us),
                    };
                    tracing::warn!(bus = %b.name, id = %id_text(key), level = v.level, reasons = ?v.reasons, incident = %seq, "CAN anomaly");
                    b.incidents.insert(
                        group,
                        Incident {
                            seq,
                            key: group,
                            ids: vec![key],
                            first: f.clone(),
                            first_level: v.level,
                            last_ts: f.ts_us,
                            frames: 1,
                            max_level: v.level,
                            reasons: v.reasons.clone(),
                            rules: rule.into_iter().collect(),
                            and: f.data().to_vec(),
                            or: f.data().to_vec(),
                            before: b.ring.iter().map(|p| format_line(&b.name, p)).collect(),
                            after: Vec::new(),
                            opened_at: now,
                            last_anomaly: now,
                            sent_open: false,
                            last_report: now,
                            reported_frames: 0,
                            actions: Vec::new(),
                        },
                    );
                }
            }
        } else if v.level > 0.0 {
            self.stats.suspect.fetch_add(1, Ordering::Relaxed);
        }
        if neighbours > 0 {
            if b.ring.len() == neighbours {
                b.ring.pop_front();
            }
            b.ring.push_back(f.clone());
        }
    }

    /// Send what is due: first reports, updates, closing reports, the summary. `force`
    /// (at shutdown) sends every pending first report and closes nothing.
    fn tick(&mut self, now: Instant, force: bool) {
        let neighbours = self.set.neighbours;
        for bi in 0..self.buses.len() {
            let keys: Vec<Option<u32>> = self.buses[bi].incidents.keys().copied().collect();
            for k in keys {
                let Some(mut inc) = self.buses[bi].incidents.remove(&k) else {
                    continue;
                };
                let name = self.buses[bi].name.clone();
                if !inc.sent_open
                    && (force
                        || inc.after.len() >= neighbours
                        || now.duration_since(inc.opened_at) >= OPEN_WAIT)
                {
                    self.report(&name, &mut inc, "open", now);
                } else if inc.sent_open
                    && inc.frames > inc.reported_frames
                    && now.duration_since(inc.last_report) >= UPDATE_EVERY
                {
                    self.report(&name, &mut inc, "update", now);
                }
                if inc.sent_open && !force && now.duration_since(inc.last_anomaly) >= self.set.quiet
                {
                    self.report(&name, &mut inc, "closed", now);
                    tracing::info!(bus = %name, incident = %inc.seq, frames = inc.frames, "CAN incident closed");
                    continue;
                }
                self.buses[bi].incidents.insert(k, inc);
            }
        }
        if !force && now.duration_since(self.window_started) >= self.set.summary_every {
            self.summarise(now);
        }
    }

    fn report(&mut self, bus: &str, inc: &mut Incident, state: &'static str, now: Instant) {
        self.actions(inc);
        let sender = inc.key.and_then(|k| self.set.senders.get(&k).cloned());
        let ecu_type = sender
            .as_ref()
            .and_then(|s| self.set.ecu_types.get(s).cloned());
        let mut body = json!({
            "incident": inc.seq,
            "state": state,
            "vehicle": self.set.vehicle,
            "network_config": self.set.network_config,
            "gateway": self.set.gateway,
            "interface": bus,
            "id": inc.key.map(id_text),
            "ids": inc.ids.iter().map(|k| id_text(*k)).collect::<Vec<_>>(),
            "sender": sender,
            "ecu_type": ecu_type,
            "first_ts": seconds(inc.first.ts_us),
            "last_ts": seconds(inc.last_ts),
            "frames": inc.frames,
            "level": inc.first_level,
            "max_level": inc.max_level,
            "reasons": inc.reasons,
            "rules": inc.rules,
            "payload": {"len": inc.and.len(), "and": hex(&inc.and), "or": hex(&inc.or)},
            "rate_hz": rate_hz(inc.frames, inc.last_ts.saturating_sub(inc.first.ts_us)),
            "frame": format_line(bus, &inc.first),
            "actions": inc.actions,
        });
        let alert = body.to_string();
        if state == "open" {
            body["before"] = json!(inc.before);
            body["after"] = json!(inc.after);
        }
        self.sink.cloud(REPORT_TOPIC, Bytes::from(body.to_string()));
        self.sink
            .local(&self.set.alert_topic, 1, true, Bytes::from(alert));
        self.stats.reports.fetch_add(1, Ordering::Relaxed);
        inc.sent_open = true;
        inc.last_report = now;
        inc.reported_frames = inc.frames;
    }

    /// The stop / slow-down instruction and the key-update request an incident has earned
    /// and not yet had.
    fn actions(&mut self, inc: &mut Incident) {
        let Some(key) = inc.key else {
            return;
        };
        let base = |what: &str| {
            json!({
                "action": what,
                "id": id_text(key),
                "incident": inc.seq,
                "vehicle": self.set.vehicle,
                "level": inc.max_level,
                "reasons": inc.reasons,
                "ts": seconds(inc.last_ts),
            })
        };
        let mut out = Vec::new();
        for (action, level, topic) in self.set.safety.get(&key).into_iter().flatten() {
            let what = action.as_str();
            if inc.max_level >= *level && !inc.actions.contains(&what) {
                out.push((what, topic.clone(), base(what), false));
            }
        }
        if let Some(level) = self.set.secoc.get(&key) {
            if inc.max_level >= *level && !inc.actions.contains(&"key-update") {
                let topic = self.set.secoc_topic.clone();
                out.push(("key-update", topic, base("key-update"), true));
            }
        }
        for (what, topic, body, cloud) in out {
            let payload = Bytes::from(body.to_string());
            self.sink.local(&topic, 1, false, payload.clone());
            if cloud {
                self.sink.cloud(KEY_UPDATE_TOPIC, payload);
                self.stats.key_updates.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.safety_actions.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(id = %id_text(key), action = what, incident = %inc.seq, "CAN response");
            inc.actions.push(what);
        }
    }

    fn summarise(&mut self, now: Instant) {
        let to_ms = now_ms();
        for b in &mut self.buses {
            let ids: serde_json::Map<String, Value> = b
                .windows
                .iter()
                .map(|(k, w)| (id_text(*k), w.json()))
                .collect();
            let body = json!({
                "vehicle": self.set.vehicle,
                "network_config": self.set.network_config,
                "gateway": self.set.gateway,
                "interface": b.name,
                "from_ms": self.window_from_ms,
                "to_ms": to_ms,
                "up": b.up,
                "frames": b.frames,
                "error_frames": b.errors,
                "open_incidents": b.incidents.len(),
                "ids": ids,
                "other_ids_frames": b.other,
            });
            self.sink
                .cloud(SUMMARY_TOPIC, Bytes::from(body.to_string()));
            self.stats.summaries.fetch_add(1, Ordering::Relaxed);
            b.windows.clear();
            b.other = 0;
            b.frames = 0;
            b.errors = 0;
        }
        self.window_from_ms = to_ms;
        self.window_started = now;
        self.publish_status();
    }

    /// The vehicle's declaration for the fleet server.
    fn declare(&mut self) {
        let mut senders: Vec<(u32, String)> = self
            .set
            .senders
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        senders.sort();
        let ecus: std::collections::BTreeMap<&String, &String> =
            self.set.ecu_types.iter().collect();
        let senders: serde_json::Map<String, Value> = senders
            .into_iter()
            .map(|(k, v)| (id_text(k), Value::from(v)))
            .collect();
        let rules_id = &self.rules.set.rules_id;
        let body = json!({
            "vehicle": self.set.vehicle,
            "network_config": self.set.network_config,
            "gateway": self.set.gateway,
            "ecus": ecus,
            "senders": senders,
            "rules_id": (!rules_id.is_empty()).then_some(rules_id),
        });
        self.sink
            .cloud(VEHICLE_TOPIC, Bytes::from(body.to_string()));
    }

    fn apply_rules(&mut self, rules: Rules) {
        let n = rules.set.rules.len();
        tracing::info!(rules_id = %rules.set.rules_id, rules = n, "CAN: fleet rules applied");
        let status = json!({"rules_id": rules.set.rules_id, "state": "applied", "rules": n});
        self.rules = rules;
        self.stats.rules_applied.fetch_add(1, Ordering::Relaxed);
        self.sink
            .cloud(RULES_STATUS_TOPIC, Bytes::from(status.to_string()));
    }

    fn refuse_rules(&mut self, rules_id: String, error: String) {
        tracing::warn!(%rules_id, %error, "CAN: fleet rules refused; the rules before stay");
        self.stats.rules_refused.fetch_add(1, Ordering::Relaxed);
        let status = json!({"rules_id": rules_id, "state": "refused", "error": error});
        self.sink
            .cloud(RULES_STATUS_TOPIC, Bytes::from(status.to_string()));
    }

    /// An alert goes on the retained fleet alert topic; an instruction to the vehicle
    /// function that acts on it.
    fn fleet(&mut self, msg: Value) {
        let kind = msg["kind"].as_str().unwrap_or("");
        let action = msg["action"].as_str().unwrap_or("");
        let payload = Bytes::from(msg.to_string());
        match (kind, action) {
            ("alert", _) => {
                self.stats.fleet_alerts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(id = ?msg["id"].as_str(), severity = ?msg["severity"].as_str(), why = ?msg["why"].as_str(), "CAN: fleet alert");
                let topic = self.set.fleet_alert_topic.clone();
                self.sink.local(&topic, 1, true, payload);
            }
            ("instruction", "stop" | "slow-down" | "key-update") => {
                self.stats
                    .fleet_instructions
                    .fetch_add(1, Ordering::Relaxed);
                let id = msg["id"].as_str().and_then(|s| parse_id(s).ok());
                let topic = if action == "key-update" {
                    self.set.secoc_topic.clone()
                } else {
                    id.and_then(|id| self.set.safety.get(&id))
                        .and_then(|rules| rules.first())
                        .map(|(_, _, t)| t.clone())
                        .unwrap_or_else(|| "vehicle/control/safety".to_string())
                };
                tracing::warn!(%action, id = ?msg["id"].as_str(), %topic, "CAN: fleet instruction");
                self.sink.local(&topic, 1, false, payload);
            }
            _ => {
                self.stats.fleet_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%kind, %action, "CAN: fleet message not understood; dropped");
            }
        }
    }

    fn status(&self) -> Vec<BusStatus> {
        self.buses
            .iter()
            .map(|b| BusStatus {
                name: b.name.clone(),
                up: b.up,
                reason: b.reason.clone(),
                open_incidents: b.incidents.len(),
            })
            .collect()
    }

    fn publish_status(&mut self) {
        let s = &self.stats;
        let l = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let body = json!({
            "vehicle": self.set.vehicle,
            "buses": self.status().iter().map(|b| json!({
                "name": b.name, "up": b.up, "reason": b.reason, "open_incidents": b.open_incidents,
            })).collect::<Vec<_>>(),
            "frames": l(&s.frames),
            "anomalous": l(&s.anomalous),
            "incidents": l(&s.incidents),
            "error_frames": l(&s.error_frames),
            "bus_off": l(&s.bus_off),
            "ts_ms": now_ms(),
        });
        let topic = self.set.status_topic.clone();
        self.sink
            .local(&topic, 1, true, Bytes::from(body.to_string()));
    }
}

/// The real [`Sink`]: the routing core through the persistent sessions, and the uplink
/// queue through a bounded outbox.
struct LiveSink {
    client: rumqttc::AsyncClient,
    sessions: SessionsHandle,
    outbox: Option<mpsc::Sender<Message>>,
    stats: Arc<CanStats>,
}

impl Sink for LiveSink {
    fn local(&mut self, topic: &str, qos: u8, retain: bool, payload: Bytes) {
        // Not awaited: the owner never waits on a disk; the next alert replaces this one.
        drop(
            self.sessions
                .publish_internal(topic, CLIENT_ID, qos, retain, payload.clone()),
        );
        let q = if qos == 0 {
            rumqttc::QoS::AtMostOnce
        } else {
            rumqttc::QoS::AtLeastOnce
        };
        if let Err(e) = self.client.try_publish(topic, q, retain, payload.to_vec()) {
            tracing::warn!(%topic, error = %e, "CAN: cannot publish locally");
        }
    }

    fn cloud(&mut self, topic: &str, payload: Bytes) {
        let Some(out) = &self.outbox else {
            return;
        };
        let m = Message {
            device: String::new(),
            topic: topic.to_string(),
            payload,
            qos: 1,
            enqueued_ms: now_ms(),
        };
        if out.try_send(m).is_err() {
            self.stats.reports_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Moves cloud messages from the outbox into the durable uplink queue, in order.
async fn outbox(mut rx: mpsc::Receiver<Message>, queue: QueueHandle, stats: Arc<CanStats>) {
    let mut warned: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 64 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        if let Err(e) = queue.append(batch).await {
            stats.cloud_refused.fetch_add(n, Ordering::Relaxed);
            let now = Instant::now();
            if warned.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
                warned = Some(now);
                tracing::warn!(error = %e, "CAN: the uplink queue refused reports");
            }
        }
    }
}

/// What `start` needs of the rest of the gateway.
pub struct Context {
    pub gateway_id: String,
    pub sessions: SessionsHandle,
    pub core: crate::broker::BrokerLink,
    /// The uplink queue, when the uplink is on (else nothing goes to the cloud).
    pub queue: Option<QueueHandle>,
    /// Where the applied fleet rules are kept.
    pub store: Store,
    /// What the fleet server sends (`outpost/{gw}/can/rules` and `.../down`), when the
    /// uplink is on.
    pub down: Option<mpsc::Receiver<Delivery>>,
}

/// Every bus's profile, in the order of `can.interfaces` (each file read once).
pub struct Profiles(Vec<(String, Profile)>);

/// Read every bus's profile. `outpost run` does this before it binds anything: a missing
/// or stale profile is a configuration error, not something to find out later.
pub fn load_profiles(cfg: &CanConfig) -> Result<Profiles, CanError> {
    let mut out = Vec::new();
    let mut loaded: HashMap<PathBuf, Profile> = HashMap::new();
    for i in &cfg.interfaces {
        let path = if i.profile.as_os_str().is_empty() {
            cfg.profile.clone()
        } else {
            i.profile.clone()
        };
        let p = match loaded.get(&path) {
            Some(p) => p.clone(),
            None => {
                let p = load_profile(&path)?;
                loaded.insert(path.clone(), p.clone());
                p
            }
        };
        out.push((i.name.clone(), p));
    }
    Ok(Profiles(out))
}

/// The sending ECU of each id, as the DBC the profile was learned with names it.
fn profile_senders(p: &Profile) -> Vec<(u32, String)> {
    p.ids
        .iter()
        .filter_map(|(key, id)| Some((parse_id(key).ok()?, id.ecu.clone()?)))
        .collect()
}

/// Start the sources and the owner.
pub fn start(
    cfg: &CanConfig,
    profiles: Profiles,
    ctx: Context,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<CanHandle, CanError> {
    let table = ctx.store.table(TABLE)?;
    let kept = match table.get(RULES_KEY)? {
        Some(bytes) => match Rules::parse(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(error = %e, "CAN: the stored fleet rules are unreadable; none applied");
                None
            }
        },
        None => None,
    };
    let buses: Vec<(String, Detector)> = profiles
        .0
        .iter()
        .map(|(name, p)| (name.clone(), Detector::new(p)))
        .collect();
    // The senders a DBC named when the profile was learned, where the configuration names
    // none.
    let mut set = Settings::new(cfg, &ctx.gateway_id);
    for (_, p) in &profiles.0 {
        for (k, ecu) in profile_senders(p) {
            set.senders.entry(k).or_insert(ecu);
        }
    }
    let stats = Arc::new(CanStats::default());
    let client = crate::broker::local_client(&ctx.core, CLIENT_ID, shutdown.clone());
    let outbox_tx = ctx.queue.map(|q| {
        let (tx, rx) = mpsc::channel(OUTBOX);
        tracker.spawn(outbox(rx, q, stats.clone()));
        tx
    });
    let sink = LiveSink {
        client,
        sessions: ctx.sessions,
        outbox: outbox_tx,
        stats: stats.clone(),
    };
    let (in_tx, in_rx) = mpsc::channel(64);
    for (bus, i) in cfg.interfaces.iter().enumerate() {
        if i.log.as_os_str().is_empty() {
            tracker.spawn(source::socket(
                bus,
                i.name.clone(),
                i.fd,
                in_tx.clone(),
                shutdown.clone(),
            ));
        } else {
            let (path, rt, tx, s) = (i.log.clone(), i.realtime, in_tx.clone(), shutdown.clone());
            tracker.spawn_blocking(move || source::replay(bus, path, rt, tx, s));
        }
    }
    drop(in_tx);
    let (tx, cmd_rx) = mpsc::channel(16);
    let mut owner = Owner::new(set, buses, stats.clone(), sink);
    if let Some(r) = kept {
        tracing::info!(rules_id = %r.set.rules_id, rules = r.set.rules.len(), "CAN: fleet rules restored");
        owner.rules = r;
    }
    let current = owner.rules.set.rules_id.clone();
    tracker.spawn(run(owner, in_rx, cmd_rx, shutdown.clone()));
    if let Some(down) = ctx.down {
        tracker.spawn(intake(down, tx, ctx.store, table, current, shutdown));
    }
    tracing::info!(buses = cfg.interfaces.len(), "CAN: grading every frame");
    Ok(CanHandle { stats })
}

/// Takes the fleet server's messages off the uplink: a rule set is checked, written and
/// flushed, then applied, and only then acknowledged (a crash before the flush gets it
/// again); a refused set is reported and acknowledged (it would only be refused again); an
/// alert or instruction is acknowledged once the owner has passed it on.
async fn intake(
    mut down: mpsc::Receiver<Delivery>,
    owner: mpsc::Sender<Command>,
    store: Store,
    table: Table,
    mut current: String,
    shutdown: CancellationToken,
) {
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = down.recv() => match d { Some(d) => d, None => return },
        };
        let (reply, done) = oneshot::channel();
        let cmd = if d.publish.topic.ends_with("/can/rules") {
            match Rules::parse(&d.publish.payload) {
                Ok(r) if r.set.rules_id == current => {
                    // The retained set again (at every reconnect): nothing to do.
                    let _ = d.client.ack(&d.publish).await;
                    continue;
                }
                Ok(r) => {
                    let (t, st) = (table.clone(), store.clone());
                    let bytes = d.publish.payload.clone();
                    let kept = tokio::task::spawn_blocking(move || {
                        t.put(RULES_KEY, &bytes)?;
                        st.flush()
                    })
                    .await;
                    match kept {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "CAN: fleet rules not stored: left unacknowledged for redelivery");
                            continue;
                        }
                        Err(_) => return,
                    }
                    current = r.set.rules_id.clone();
                    Command::ApplyRules {
                        rules: Box::new(r),
                        reply,
                    }
                }
                Err(e) => {
                    let rules_id = serde_json::from_slice::<Value>(&d.publish.payload)
                        .ok()
                        .and_then(|v| v["rules_id"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    Command::RulesRefused {
                        rules_id,
                        error: e.to_string(),
                        reply,
                    }
                }
            }
        } else {
            let msg = if d.publish.payload.len() <= super::rules::MAX_DOCUMENT {
                serde_json::from_slice::<Value>(&d.publish.payload).unwrap_or(Value::Null)
            } else {
                Value::Null
            };
            Command::Fleet { msg, reply }
        };
        if owner.send(cmd).await.is_err() || done.await.is_err() {
            return;
        }
        let _ = d.client.ack(&d.publish).await;
    }
}

async fn run<S: Sink>(
    mut owner: Owner<S>,
    mut input: mpsc::Receiver<Input>,
    mut cmds: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sources = true;
    owner.publish_status();
    owner.declare();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            i = input.recv(), if sources => match i {
                Some(i) => owner.input(i, Instant::now()),
                None => sources = false,
            },
            Some(c) = cmds.recv() => match c {
                Command::ApplyRules { rules, reply } => {
                    owner.apply_rules(*rules);
                    let _ = reply.send(());
                }
                Command::RulesRefused { rules_id, error, reply } => {
                    owner.refuse_rules(rules_id, error);
                    let _ = reply.send(());
                }
                Command::Fleet { msg, reply } => {
                    owner.fleet(msg);
                    let _ = reply.send(());
                }
            },
            _ = tick.tick() => owner.tick(Instant::now(), false),
        }
    }
    // Flush first: every incident's first report goes out before the outbox closes.
    owner.tick(Instant::now(), true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::can::config::{InterfaceConfig, SafetyRule};
    use crate::can::frame::Kind;
    use crate::can::profile::Learner;

    #[derive(Default)]
    struct Rec {
        local: Vec<(String, bool, Value)>,
        cloud: Vec<(String, Value)>,
    }
    #[derive(Clone, Default)]
    struct Shared(Arc<std::sync::Mutex<Rec>>);
    impl Sink for Shared {
        fn local(&mut self, topic: &str, _qos: u8, retain: bool, payload: Bytes) {
            let v = serde_json::from_slice(&payload).unwrap();
            self.0.lock().unwrap().local.push((topic.into(), retain, v));
        }
        fn cloud(&mut self, topic: &str, payload: Bytes) {
            let v = serde_json::from_slice(&payload).unwrap();
            self.0.lock().unwrap().cloud.push((topic.into(), v));
        }
    }

    fn data(ts: u64, id: u32, d: &[u8]) -> Frame {
        Frame::new(ts, id, false, Kind::Data { raw_dlc: None }, d).unwrap()
    }

    /// Two ids every 10 ms with a counter in byte 1.
    fn normal(i: u64) -> Vec<Frame> {
        let t = 1_000_000 + i * 10_000 + i * 7919 % 400;
        vec![
            data(t, 0x1a0, &[0xa5, (i % 16) as u8, 50]),
            data(t + 3_000, 0x2b0, &[1, 2, 3, 4]),
        ]
    }

    fn owner(cfg: &CanConfig) -> (Owner<Shared>, Shared) {
        let mut l = Learner::default();
        for i in 0..2000 {
            for f in normal(i) {
                l.add(&f);
            }
        }
        let p = l.finish();
        let sink = Shared::default();
        let o = Owner::new(
            Settings::new(cfg, "gw1"),
            vec![("vcan0".into(), Detector::new(&p))],
            Arc::new(CanStats::default()),
            sink.clone(),
        );
        (o, sink)
    }

    fn cfg() -> CanConfig {
        let mut c = CanConfig {
            enabled: true,
            profile: "unused".into(),
            interfaces: vec![InterfaceConfig {
                name: "vcan0".into(),
                ..InterfaceConfig::default()
            }],
            neighbours: 3,
            ..CanConfig::default()
        };
        c.vehicle.id = "VIN1".into();
        c.vehicle.network_config = "cfg-a".into();
        c.vehicle.senders.insert("0x1a0".into(), "ABS".into());
        c.vehicle.ecu_types.insert("ABS".into(), "abs-9".into());
        c.safety.push(SafetyRule {
            ids: vec!["0x1a0".into()],
            action: SafetyAction::SlowDown,
            level: 0.8,
            topic: "vehicle/control/speed".into(),
        });
        c.secoc.ids = vec!["0x2b0".into()];
        c
    }

    fn feed(o: &mut Owner<Shared>, frames: &[Frame], now: Instant) {
        o.input(
            Input::Frames {
                bus: 0,
                frames: frames.to_vec(),
            },
            now,
        );
    }

    #[test]
    fn normal_traffic_opens_no_incident_and_rides_in_the_summary() {
        let c = cfg();
        let (mut o, sink) = owner(&c);
        let t0 = Instant::now();
        for i in 3000..3500 {
            feed(&mut o, &normal(i), t0);
        }
        o.tick(t0 + Duration::from_secs(11), false);
        let rec = sink.0.lock().unwrap();
        assert!(
            rec.cloud.iter().all(|(t, _)| t == SUMMARY_TOPIC),
            "{:?}",
            rec.cloud
        );
        let (_, s) = &rec.cloud[0];
        assert_eq!(s["frames"], 1000);
        assert_eq!(s["ids"]["0x1a0"]["n"], 500);
        assert_eq!(s["ids"]["0x1a0"]["anomalous"], 0);
        assert_eq!(s["ids"]["0x2b0"]["and"], "01020304");
        assert!(s["ids"]["0x1a0"]["gap_us"]["mean"].as_u64().unwrap() > 9_000);
        assert_eq!(o.stats.incidents.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn anomalous_frame_opens_an_incident_reported_with_its_neighbours_then_closed() {
        let c = cfg();
        let (mut o, sink) = owner(&c);
        let t0 = Instant::now();
        for i in 3000..3010 {
            feed(&mut o, &normal(i), t0);
        }
        // A flood of a known id every 1 ms with a wrong constant byte.
        let start = normal(3010)[0].ts_us;
        let flood: Vec<Frame> = (0..50)
            .map(|k| data(start + 500 + k * 1_000, 0x1a0, &[0x00, 0x0f, 50]))
            .collect();
        feed(&mut o, &flood, t0);
        assert_eq!(o.stats.incidents.load(Ordering::Relaxed), 1);
        o.tick(t0 + Duration::from_millis(10), false);
        {
            let rec = sink.0.lock().unwrap();
            let (t, r) = rec.cloud.iter().find(|(t, _)| t == REPORT_TOPIC).unwrap();
            assert_eq!(t, REPORT_TOPIC);
            assert_eq!(r["state"], "open");
            assert_eq!(r["id"], "0x1a0");
            assert_eq!(r["vehicle"], "VIN1");
            assert_eq!(r["network_config"], "cfg-a");
            assert_eq!(
                (r["sender"].as_str(), r["ecu_type"].as_str()),
                (Some("ABS"), Some("abs-9"))
            );
            assert_eq!(r["before"].as_array().unwrap().len(), 3);
            assert_eq!(r["after"].as_array().unwrap().len(), 3);
            assert!(r["max_level"].as_f64().unwrap() >= 0.9);
            assert!(r["reasons"]
                .as_array()
                .unwrap()
                .contains(&json!("constant-bits")));
            assert_eq!(r["actions"], json!(["slow-down"]));
            let alert = rec
                .local
                .iter()
                .find(|(t, ..)| t == "vehicle/can/alert")
                .unwrap();
            assert!(alert.1, "the alert is retained");
            assert!(alert.2.get("before").is_none());
            let action = rec
                .local
                .iter()
                .find(|(t, ..)| t == "vehicle/control/speed")
                .unwrap();
            assert_eq!(
                (action.1, &action.2["action"]),
                (false, &json!("slow-down"))
            );
        }
        // More of it: one update a second at most, then closed after the quiet time.
        feed(&mut o, &flood, t0 + Duration::from_millis(500));
        o.tick(t0 + Duration::from_millis(600), false);
        o.tick(t0 + Duration::from_millis(1200), false);
        o.tick(t0 + Duration::from_millis(1300), false);
        o.tick(t0 + Duration::from_millis(2600), false);
        let rec = sink.0.lock().unwrap();
        let states: Vec<&str> = rec
            .cloud
            .iter()
            .filter(|(t, _)| t == REPORT_TOPIC)
            .map(|(_, r)| r["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["open", "update", "closed"]);
        assert_eq!(o.stats.safety_actions.load(Ordering::Relaxed), 1);
        assert!(o.buses[0].incidents.is_empty());
    }

    #[test]
    fn unknown_ids_share_one_incident_and_a_secoc_id_requests_a_key_update() {
        let c = cfg();
        let (mut o, sink) = owner(&c);
        let t0 = Instant::now();
        for i in 3000..3010 {
            feed(&mut o, &normal(i), t0);
        }
        let t = normal(3010)[0].ts_us;
        let fuzz: Vec<Frame> = (0..500u64)
            .map(|k| data(t + k * 500, (k as u32 * 37) % 0x7ff, &[k as u8; 8]))
            .filter(|f| f.id != 0x1a0 && f.id != 0x2b0)
            .collect();
        feed(&mut o, &fuzz, t0);
        assert_eq!(o.buses[0].incidents.len(), 1);
        let inc = o.buses[0].incidents.get(&None).unwrap();
        assert_eq!(inc.ids.len(), MAX_INCIDENT_IDS);
        // The SecOC id with a wrong length.
        feed(&mut o, &[data(t + 300_000, 0x2b0, &[1, 2, 3, 4, 5])], t0);
        o.tick(t0 + Duration::from_millis(200), false);
        let rec = sink.0.lock().unwrap();
        let keys: Vec<&Value> = rec
            .cloud
            .iter()
            .filter(|(t, _)| t == KEY_UPDATE_TOPIC)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0]["id"], "0x2b0");
        assert!(rec
            .local
            .iter()
            .any(|(t, ..)| t == "vehicle/secoc/key-update"));
        assert_eq!(o.stats.key_updates.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn error_frames_and_bus_off_are_counted_not_graded() {
        let c = cfg();
        let (mut o, _sink) = owner(&c);
        let t0 = Instant::now();
        let e = |class| Frame::new(0, 0, false, Kind::Error { class }, &[0; 8]).unwrap();
        let mut flood = vec![e(0x04); 10_000];
        flood.push(e(CAN_ERR_BUSOFF));
        flood.push(e(CAN_ERR_RESTARTED));
        feed(&mut o, &flood, t0);
        assert_eq!(o.stats.error_frames.load(Ordering::Relaxed), 10_002);
        assert_eq!(o.stats.bus_off.load(Ordering::Relaxed), 1);
        assert_eq!(o.stats.restarts.load(Ordering::Relaxed), 1);
        assert_eq!(o.stats.frames.load(Ordering::Relaxed), 0);
        assert!(o.buses[0].incidents.is_empty());
    }

    #[test]
    fn a_bus_going_down_is_published_on_the_status_topic() {
        let c = cfg();
        let (mut o, sink) = owner(&c);
        let t0 = Instant::now();
        o.input(
            Input::State {
                bus: 0,
                up: false,
                reason: "interface down".into(),
            },
            t0,
        );
        let rec = sink.0.lock().unwrap();
        let (t, retained, s) = rec.local.last().unwrap();
        assert_eq!((t.as_str(), *retained), ("vehicle/can/status", true));
        assert_eq!(s["buses"][0]["up"], false);
        assert_eq!(s["buses"][0]["reason"], "interface down");
        assert_eq!(o.stats.interface_down.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn rules_applied_at_run_time_grade_the_next_frames_and_name_themselves() {
        let c = cfg();
        let (mut o, sink) = owner(&c);
        let t0 = Instant::now();
        // A frame the profile finds normal...
        let normal_frames = normal(3000);
        feed(&mut o, &normal_frames, t0);
        assert_eq!(o.stats.anomalous.load(Ordering::Relaxed), 0);
        // ...is anomalous by a fleet signature on its payload.
        let doc = br#"{"kind":"rules","rules_id":"cfg-a-1","rules":[
            {"name":"fleet-1","id":"0x2b0","mask":"ffffffff","value":"01020304","level":0.9}]}"#;
        o.apply_rules(Rules::parse(doc).unwrap());
        feed(&mut o, &normal(3001), t0);
        assert_eq!(o.stats.anomalous.load(Ordering::Relaxed), 1);
        o.tick(t0 + Duration::from_millis(200), false);
        let rec = sink.0.lock().unwrap();
        let status = rec
            .cloud
            .iter()
            .find(|(t, _)| t == RULES_STATUS_TOPIC)
            .unwrap();
        assert_eq!(status.1["state"], "applied");
        let (_, r) = rec.cloud.iter().find(|(t, _)| t == REPORT_TOPIC).unwrap();
        assert_eq!(r["id"], "0x2b0");
        assert_eq!(r["rules"], json!(["fleet-1"]));
        assert!(r["reasons"]
            .as_array()
            .unwrap()
            .contains(&json!("fleet-rule")));
        assert_eq!(
            r["payload"],
            json!({"len": 4, "and": "01020304", "or": "01020304"})
        );
    }

    #[test]
    fn fleet_alerts_are_retained_for_the_hmi_and_instructions_reach_the_vehicle_function() {
        let c = cfg();
        let (mut o, sink) = owner(&c);
        o.fleet(json!({"kind": "alert", "id": "0x4d0", "severity": "warning", "vehicles": 2}));
        o.fleet(json!({"kind": "instruction", "action": "slow-down", "id": "0x1a0"}));
        o.fleet(json!({"kind": "instruction", "action": "key-update", "id": "0x2b0"}));
        o.fleet(json!({"kind": "instruction", "action": "explode", "id": "0x1a0"}));
        o.fleet(Value::Null);
        o.refuse_rules("cfg-a-9".into(), "rules[0].id: bad".into());
        let rec = sink.0.lock().unwrap();
        let topics: Vec<(&str, bool)> =
            rec.local.iter().map(|(t, r, _)| (t.as_str(), *r)).collect();
        assert_eq!(
            topics,
            [
                ("vehicle/can/fleet-alert", true),
                ("vehicle/control/speed", false),
                ("vehicle/secoc/key-update", false)
            ]
        );
        assert_eq!(o.stats.fleet_refused.load(Ordering::Relaxed), 2);
        assert_eq!(o.stats.rules_refused.load(Ordering::Relaxed), 1);
        let (_, st) = rec
            .cloud
            .iter()
            .find(|(t, _)| t == RULES_STATUS_TOPIC)
            .unwrap();
        assert_eq!(
            (&st["state"], &st["rules_id"]),
            (&json!("refused"), &json!("cfg-a-9"))
        );
    }

    #[test]
    fn the_vehicle_declares_itself() {
        let c = cfg();
        let (mut o, sink) = owner(&c);
        o.declare();
        let rec = sink.0.lock().unwrap();
        let (t, v) = &rec.cloud[0];
        assert_eq!(t, VEHICLE_TOPIC);
        assert_eq!(
            v,
            &json!({"vehicle": "VIN1", "network_config": "cfg-a", "gateway": "gw1",
                    "ecus": {"ABS": "abs-9"}, "senders": {"0x1a0": "ABS"}, "rules_id": null})
        );
    }

    #[test]
    fn the_dbc_names_the_senders_of_a_learned_profile() {
        let dbc = crate::can::dbc::parse(
            "VERSION \"\"\n\nBU_: ABS BCM\n\nBO_ 416 WHEELS: 3 ABS\n SG_ SPEED : 16|8@1+ (1,0) [0|255] \"\" BCM\n",
        )
        .unwrap();
        let mut l = Learner::with_dbc(dbc);
        for i in 0..100 {
            for f in normal(i) {
                l.add(&f);
            }
        }
        let senders = profile_senders(&l.finish());
        assert_eq!(senders, [(0x1a0, "ABS".to_string())]);
    }
}
