//! The credentials owner task: the only writer of the inventory.
//!
//! ```text
//! CA thread ──CaEvent (issued, revoked)──────────────┐
//! devices ─▶ front door ─▶ core ─▶ intake (core client: ├─▶ owner ─▶ inventory (put, durable)
//!   devices/+/credentials/report, …/job) ─Command──────┤        │ then
//! admin page / CLI ─▶ CredentialsHandle ─Command───────┘        ├─▶ commands to the holder only:
//!                                                               │   devices/{holder}/commands/outpost/credentials
//!                                                               └─▶ replies
//! ```
//!
//! The owner takes the commands that wait (at most [`BATCH`]), applies them to the records
//! they touch, writes every changed credential and job in one durable write, and only then
//! sends the commands to holders and the replies: nothing is said that a crash could take
//! back. A job is made per holder of the credential (its holder and any device seen with
//! it); its command is published on that holder's own command topic and nowhere else. A
//! holder that is away gets its queued jobs when it next checks in (its report); a delivered
//! command it does not answer is sent again with doubling delays, until the job's deadline.

use super::config::CredentialsConfig;
use super::fleet_msg::{self, Down, Up};
use super::inventory::{InventoryError, InventoryStore};
use super::model::{
    Credential, Invalid, Job, JobState, Kind, OpState, Operation, Page, Query, Validity,
};
use super::msg::{self, Held, JobUpdate, Report, ToDevice};
use super::seal;
use crate::broker::BrokerLink;
use crate::ca::{CaEvent, CaHandle, ForeignRevocation};
use crate::store::CertRecord;
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The owner's client id on the routing core.
pub const CLIENT_ID: &str = "outpost~credentials";
/// The owner's publishing client on the routing core.
pub const OUT_CLIENT_ID: &str = "outpost~credentials-out";
/// Most commands applied in one write.
pub const BATCH: usize = 256;
/// Most redeliveries one tick sends.
pub const RETRIES_PER_TICK: usize = 256;
/// Most open jobs one holder may have (a flood of operations is refused beyond it).
pub const MAX_OPEN_JOBS_PER_DEVICE: usize = 64;
/// Shortest time between two resyncs of the inventory after the uplink queue dropped
/// messages.
pub const RESYNC_MIN_INTERVAL: Duration = Duration::from_secs(60);
/// A check-in resends a delivered, unanswered command only when it went out at least this
/// long before the report came in: a holder that connects and reports at once would
/// otherwise get every command twice (the tick delivers to it as soon as it is online, then
/// its report resends; in a storm the report may wait seconds in the intake). A holder that
/// did miss it gets it from the retry (`retry_min` later, 5 s by default).
pub const RESEND_QUIET: Duration = Duration::from_secs(5);
/// How long the owner remembers when a command went out (longer than a report waits in a
/// storm's backlog; at most one entry per open job).
const SENT_AT_KEEP: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("no credential {0}")]
    NotFound(String),
    #[error("{0}")]
    NotAllowed(String),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("CA: {0}")]
    Ca(String),
    #[error("the credentials service has stopped")]
    Stopped,
    #[error("{field}: {reason}")]
    Config { field: &'static str, reason: String },
}

/// One credential with its jobs, newest first.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Detail {
    pub credential: Credential,
    pub validity: Validity,
    pub jobs: Vec<Job>,
}

/// Counters, read by tests and the metrics page.
#[derive(Debug, Default)]
pub struct CredentialStats {
    pub reports: std::sync::atomic::AtomicU64,
    pub reports_refused: std::sync::atomic::AtomicU64,
    pub updates_refused: std::sync::atomic::AtomicU64,
    pub commands_sent: std::sync::atomic::AtomicU64,
    pub jobs_made: std::sync::atomic::AtomicU64,
    pub jobs_ended: std::sync::atomic::AtomicU64,
    pub binding_violations: std::sync::atomic::AtomicU64,
    pub writes: std::sync::atomic::AtomicU64,
}

impl CredentialStats {
    /// Prometheus text (`outpost_credentials_*_total`).
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        for (name, help, v) in [
            ("reports", "Check-in reports from holders.", &self.reports),
            (
                "reports_refused",
                "Check-in reports refused (malformed, too large).",
                &self.reports_refused,
            ),
            (
                "updates_refused",
                "Job updates refused (malformed, unknown job, not the job's holder).",
                &self.updates_refused,
            ),
            (
                "commands_sent",
                "Commands sent to holders.",
                &self.commands_sent,
            ),
            (
                "jobs_made",
                "Jobs made (one per holder of a credential).",
                &self.jobs_made,
            ),
            (
                "jobs_ended",
                "Jobs ended (succeeded, failed, timed out).",
                &self.jobs_ended,
            ),
            (
                "binding_violations",
                "ECU certificates reported in a vehicle they are not recorded for.",
                &self.binding_violations,
            ),
            ("writes", "Durable inventory writes.", &self.writes),
        ] {
            let _ = writeln!(
                out,
                "# HELP outpost_credentials_{name}_total {help}\n# TYPE outpost_credentials_{name}_total counter\n\
                 outpost_credentials_{name}_total {}",
                v.load(Relaxed)
            );
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, CredentialsError>>;

/// What the owner is asked to do. Closed: nothing else reaches the inventory.
enum Command {
    Query {
        q: Query,
        reply: Reply<Page>,
    },
    Show {
        id: String,
        reply: Reply<Option<Detail>>,
    },
    Operate {
        id: String,
        op: Operation,
        by: String,
        reason: String,
        reply: Reply<Vec<Job>>,
    },
    Cancel {
        job: String,
        by: String,
        reply: Reply<Job>,
    },
    /// A holder's check-in, and when the intake took it.
    Report {
        device: String,
        report: Report,
        at: std::time::Instant,
    },
    /// A holder's progress on one of its jobs.
    Update {
        device: String,
        update: JobUpdate,
    },
    Ca(CaEvent),
    /// The CA's events were missed: reconcile every certificate record.
    Reconcile(Vec<CertRecord>),
    /// Record the vehicle and ECU a credential was issued for (seed 000).
    Bind {
        id: String,
        vehicle: String,
        ecu: String,
        by: String,
        reply: Reply<Credential>,
    },
    /// Gateway: a message of the fleet inventory, acknowledged once applied.
    Down {
        msg: Result<Down, Invalid>,
        delivery: crate::uplink::Delivery,
    },
    /// Cloud: a gateway's message, acknowledged once applied.
    CloudUp {
        gateway: String,
        delivery: crate::uplink::Delivery,
    },
    /// Issued (or failed) certificate for a renew job's CSR.
    RenewIssued {
        job: String,
        result: Result<crate::ca::Issued, String>,
    },
    Tick,
}

/// The clonable handle to the owner.
#[derive(Clone)]
pub struct CredentialsHandle {
    tx: mpsc::Sender<Command>,
    expiring: i64,
    pub stats: Arc<CredentialStats>,
}

impl CredentialsHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, CredentialsError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| CredentialsError::Stopped)?;
        rx.await.map_err(|_| CredentialsError::Stopped)?
    }
    /// One page of the inventory.
    pub async fn query(&self, q: &Query) -> Result<Page, CredentialsError> {
        q.validate()?;
        let q = q.clone();
        self.ask(|reply| Command::Query { q, reply }).await
    }
    /// One credential and its jobs (`None`: no such id).
    pub async fn show(&self, id: &str) -> Result<Option<Detail>, CredentialsError> {
        super::model::check_text("id", id)?;
        let id = id.to_string();
        self.ask(|reply| Command::Show { id, reply }).await
    }
    /// Run `op` on credential `id`: one job per holder, returned as made (queued).
    pub async fn operate(
        &self,
        id: &str,
        op: Operation,
        by: &str,
        reason: &str,
    ) -> Result<Vec<Job>, CredentialsError> {
        super::model::check_text("id", id)?;
        super::model::check_text("reason", reason)?;
        let (id, by, reason) = (id.to_string(), by.to_string(), reason.to_string());
        self.ask(|reply| Command::Operate {
            id,
            op,
            by,
            reason,
            reply,
        })
        .await
    }
    /// Cancel a job that has not ended.
    pub async fn cancel(&self, job: &str, by: &str) -> Result<Job, CredentialsError> {
        super::model::check_text("job", job)?;
        let (job, by) = (job.to_string(), by.to_string());
        self.ask(|reply| Command::Cancel { job, by, reply }).await
    }
    /// Record that credential `id` was issued for `ecu` in `vehicle`.
    pub async fn bind(
        &self,
        id: &str,
        vehicle: &str,
        ecu: &str,
        by: &str,
    ) -> Result<Credential, CredentialsError> {
        super::model::check_text("id", id)?;
        for (f, v) in [("vehicle", vehicle), ("ecu", ecu)] {
            crate::acl::validate_identity(v).map_err(|e| Invalid {
                field: f.into(),
                reason: e.to_string(),
            })?;
        }
        let (id, vehicle, ecu, by) = (id.into(), vehicle.into(), ecu.into(), by.into());
        self.ask(|reply| Command::Bind {
            id,
            vehicle,
            ecu,
            by,
            reply,
        })
        .await
    }
    /// The expiring window, seconds.
    pub fn expiring_secs(&self) -> i64 {
        self.expiring
    }
}

/// What the service needs from the rest of the gateway.
pub struct Deps {
    pub ca: CaHandle,
    /// The routing core: the intake's subscriptions and the commands to holders (none in
    /// the cloud role, whose holders are behind their gateways).
    pub core: Option<BrokerLink>,
    /// Persistent sessions get their QoS 1 messages from their durable queue: commands are
    /// queued there too.
    pub durable: Option<crate::sessions::SessionsHandle>,
    /// Whether a device has a live session now.
    pub live: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    /// The common name of our CA (what holders report as the issuer of its certificates).
    pub issuer: String,
    /// The vehicle this gateway is in (seed 000), if it is in one.
    pub vehicle: Option<String>,
    /// Gateway with an uplink: the fleet inventory is kept in step through it.
    pub up: Option<UpSide>,
    /// Cloud role: the gateways' messages, over its own cloud broker session.
    pub fleet: Option<FleetSide>,
}

/// The gateway's side of the fleet inventory.
pub struct UpSide {
    /// Records, jobs and the vehicle check-in go up through the durable uplink queue.
    pub queue: crate::uplink::queue::QueueHandle,
    pub gateway: String,
    /// The uplink's key and certificate (PEM): they sign the vehicle check-in.
    pub key_pem: Option<String>,
    pub cert_pem: Option<String>,
    /// `outpost/{gateway}/credentials/down`, from the uplink session.
    pub down: mpsc::Receiver<crate::uplink::Delivery>,
    /// The uplink's state: after the queue dropped messages (`when_full = "drop-oldest"`),
    /// the inventory goes up again once the link is back.
    pub link: tokio::sync::watch::Receiver<crate::uplink::detect::LinkState>,
}

/// The cloud's side of the fleet inventory.
pub struct FleetSide {
    up: crate::uplink::UplinkConfig,
    client_id: String,
    /// Trusted issuers of the gateways' certificates (vehicle check-ins).
    roots: Option<Arc<rustls::RootCertStore>>,
    /// Gateway → vehicle and vehicle → gateway, bound at the first verified check-in.
    vehicles: crate::store::Table,
}

impl FleetSide {
    pub fn new(
        up: &crate::uplink::UplinkConfig,
        cloud: &super::CloudConfig,
        client_id: String,
        store: &crate::store::Store,
    ) -> Result<FleetSide, CredentialsError> {
        let roots = if cloud.gateway_ca.as_os_str().is_empty() {
            None
        } else {
            let bad = |r: String| CredentialsError::Config {
                field: "cloud.gateway_ca",
                reason: format!("{}: {r}", cloud.gateway_ca.display()),
            };
            let pem = std::fs::read(&cloud.gateway_ca).map_err(|e| bad(e.to_string()))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots
                    .add(c.map_err(|e| bad(e.to_string()))?)
                    .map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("no certificate in it".into()));
            }
            Some(Arc::new(roots))
        };
        Ok(FleetSide {
            up: up.clone(),
            client_id,
            roots,
            vehicles: store
                .table("credential-vehicles")
                .map_err(|e| CredentialsError::Inventory(e.into()))?,
        })
    }
}

/// The common name of a CA certificate (DER): what holders report as its issuer.
pub fn issuer_name(ca_der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(ca_der)
        .ok()
        .and_then(|(_, x)| {
            x.subject()
                .iter_common_name()
                .next()
                .and_then(|c| c.as_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn job_id() -> String {
    let mut b = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b);
    hex::encode(b)
}

/// Normalise a serial as a holder may write it (`0x`, colons, upper case, leading zeros).
pub fn normal_serial(s: &str) -> String {
    let t: String = s
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    match hex::decode(if t.len() % 2 == 1 {
        format!("0{t}")
    } else {
        t.clone()
    }) {
        Ok(b) if !b.is_empty() => crate::ca::serial_hex(&b),
        _ => t,
    }
}

/// Start the owner, the intake and the CA follower. Returns at once.
pub fn start<S: InventoryStore>(
    cfg: CredentialsConfig,
    inventory: Arc<S>,
    deps: Deps,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> CredentialsHandle {
    let (tx, rx) = mpsc::channel(1024);
    let stats = Arc::new(CredentialStats::default());
    let handle = CredentialsHandle {
        tx: tx.clone(),
        expiring: secs(cfg.expiring),
        stats: stats.clone(),
    };
    let client = deps.core.as_ref().map(|core| {
        let mut o = MqttOptions::new(CLIENT_ID, core.addr.ip().to_string(), core.addr.port());
        o.set_credentials(CLIENT_ID, core.secret.to_string());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, eventloop) = AsyncClient::new(o, 1024);
        tracker.spawn(intake(
            client,
            eventloop,
            tx.clone(),
            stats.clone(),
            shutdown.clone(),
        ));
        // The owner publishes through a client of its own whose event loop never waits on
        // anything: the intake may wait for room in the owner's channel, and if the owner's
        // publishes went through the intake's client the two would wait on each other.
        crate::broker::local_client(core, OUT_CLIENT_ID, shutdown.clone())
    });
    tracker.spawn(follow_ca(deps.ca.clone(), tx.clone(), shutdown.clone()));
    let mut deps = deps;
    if let Some(up) = deps.up.as_mut() {
        let (_, empty) = mpsc::channel(1);
        let down = std::mem::replace(&mut up.down, empty);
        tracker.spawn(down_intake(down, tx.clone(), shutdown.clone()));
    }
    let down_out = deps.fleet.as_ref().map(|f| {
        let (out_tx, out_rx) = mpsc::channel(4096);
        tracker.spawn(cloud_link(
            f.up.clone(),
            f.client_id.clone(),
            tx.clone(),
            out_rx,
            shutdown.clone(),
        ));
        out_tx
    });
    let owner = Owner {
        cfg,
        inv: inventory,
        deps,
        client,
        tx,
        stats,
        open: OpenJobs::default(),
        revoke_at: HashMap::new(),
        openers: HashMap::new(),
        last_policy: 0,
        resynced_at_drops: 0,
        last_resync: None,
        sent_at: HashMap::new(),
        present: BTreeMap::new(),
        down_out,
        warn: crate::frontdoor::bounds::WarnLimiter::gateway_wide(
            &crate::frontdoor::bounds::FrontDoorConfig::default(),
        ),
    };
    tracker.spawn(owner.run(rx, shutdown));
    handle
}

/// The core client: subscribe to the holders' topics and hand what comes to the owner.
async fn intake(
    client: AsyncClient,
    mut el: rumqttc::EventLoop,
    tx: mpsc::Sender<Command>,
    stats: Arc<CredentialStats>,
    shutdown: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut warn = crate::frontdoor::bounds::WarnLimiter::gateway_wide(
        &crate::frontdoor::bounds::FrontDoorConfig::default(),
    );
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = el.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                for f in [msg::REPORT_FILTER, msg::JOB_FILTER] {
                    if let Err(e) = client.try_subscribe(f, QoS::AtLeastOnce) {
                        tracing::error!(filter = f, error = %e, "credentials: cannot subscribe");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // devices/{id}/credentials/{report|job}: the ACL lets a device publish only
                // below its own id, so the id in the topic is the publisher.
                let parts: Vec<&str> = p.topic.split('/').collect();
                let [_, device, _, what] = parts.as_slice() else {
                    continue;
                };
                let device = device.to_string();
                let cmd = match *what {
                    "report" => match Report::decode(&p.payload) {
                        Ok(report) => Command::Report {
                            device,
                            report,
                            at: std::time::Instant::now(),
                        },
                        Err(e) => {
                            stats.reports_refused.fetch_add(1, Relaxed);
                            if warn.allow() {
                                tracing::warn!(%device, error = %e, "credentials report refused");
                            }
                            continue;
                        }
                    },
                    "job" => match JobUpdate::decode(&p.payload) {
                        Ok(update) => Command::Update { device, update },
                        Err(e) => {
                            stats.updates_refused.fetch_add(1, Relaxed);
                            if warn.allow() {
                                tracing::warn!(%device, error = %e, "job update refused");
                            }
                            continue;
                        }
                    },
                    _ => continue,
                };
                if tx.send(cmd).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "credentials: core link lost; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
}

/// Forward the CA's events; when some were missed, reconcile from the store.
async fn follow_ca(ca: CaHandle, tx: mpsc::Sender<Command>, shutdown: CancellationToken) {
    let mut rx = ca.events();
    // At start, everything the CA holds (issued before the inventory existed, or while the
    // gateway crashed between the CA's write and ours).
    match ca.list().await {
        Ok(all) => {
            if tx.send(Command::Reconcile(all)).await.is_err() {
                return;
            }
        }
        Err(e) => tracing::error!(error = %e, "credentials: cannot list the CA's certificates"),
    }
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = rx.recv() => ev,
        };
        let cmd = match ev {
            Ok(ev) => Command::Ca(ev),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "credentials: behind the CA; reconciling");
                match ca.list().await {
                    Ok(all) => Command::Reconcile(all),
                    Err(_) => continue,
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if tx.send(cmd).await.is_err() {
            return;
        }
    }
}

fn up_message(payload: Vec<u8>) -> crate::uplink::queue::Message {
    crate::uplink::queue::Message {
        device: String::new(),
        topic: fleet_msg::LOCAL_UP.to_string(),
        payload: Bytes::from(payload),
        qos: 1,
        enqueued_ms: crate::uplink::queue::now_ms(),
    }
}

/// Gateway: the fleet inventory's messages from the uplink, to the owner.
async fn down_intake(
    mut rx: mpsc::Receiver<crate::uplink::Delivery>,
    tx: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) {
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = rx.recv() => match d { Some(d) => d, None => return },
        };
        let msg = Down::decode(&d.publish.payload);
        if tx.send(Command::Down { msg, delivery: d }).await.is_err() {
            return;
        }
    }
}

/// Cloud: the session to the cloud broker: hears `outpost/+/credentials/up`, sends the
/// owner's messages to `outpost/{gateway}/credentials/down` (QoS 1; what was not
/// acknowledged goes again after a reconnect).
async fn cloud_link(
    up: crate::uplink::UplinkConfig,
    client_id: String,
    tx: mpsc::Sender<Command>,
    mut out: mpsc::Receiver<(String, Down)>,
    shutdown: CancellationToken,
) {
    let tls = match crate::uplink::link::client_tls(&up) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "credentials: cannot load the cloud broker TLS files; the fleet inventory hears no gateway");
            return;
        }
    };
    let mut resend: VecDeque<(String, Vec<u8>)> = VecDeque::new();
    let mut attempt = 0u32;
    loop {
        let (client, mut events, pump) = crate::uplink::link::cloud_session(
            &up,
            &client_id,
            tls.clone(),
            fleet_msg::MAX_MESSAGE + 4096,
        );
        let mut connected = false;
        let mut unmapped: VecDeque<(String, Vec<u8>)> = VecDeque::new();
        let mut inflight: HashMap<u16, (String, Vec<u8>)> = HashMap::new();
        let stop = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break true,
                m = out.recv(), if connected => {
                    let Some((gw, m)) = m else { break true };
                    let body = m.encode();
                    if client.publish(fleet_msg::down_topic(&gw), QoS::AtLeastOnce, false, body.clone()).await.is_err() {
                        resend.push_back((gw, body));
                        break false;
                    }
                    unmapped.push_back((gw, body));
                }
                ev = events.recv() => match ev {
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        connected = true;
                        attempt = 0;
                        tracing::info!(host = %up.host, port = up.port, client_id = %client_id, "credentials: connected to the cloud broker");
                        let _ = client.try_subscribe(fleet_msg::UP_FILTER, QoS::AtLeastOnce);
                        while let Some((gw, body)) = resend.pop_front() {
                            if client.publish(fleet_msg::down_topic(&gw), QoS::AtLeastOnce, false, body.clone()).await.is_err() {
                                break;
                            }
                            unmapped.push_back((gw, body));
                        }
                    }
                    Some(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid)))) => {
                        if pkid != 0 {
                            if let Some(m) = unmapped.pop_front() {
                                inflight.insert(pkid, m);
                            }
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                        inflight.remove(&a.pkid);
                    }
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let gateway = p
                            .topic
                            .strip_prefix("outpost/")
                            .and_then(|r| r.strip_suffix("/credentials/up"))
                            .filter(|g| crate::acl::validate_identity(g).is_ok())
                            .map(str::to_string);
                        let Some(gateway) = gateway else {
                            let _ = client.ack(&p).await;
                            continue;
                        };
                        let delivery = crate::uplink::Delivery { publish: p, client: client.clone() };
                        if tx.send(Command::CloudUp { gateway, delivery }).await.is_err() {
                            break true;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        if connected {
                            tracing::warn!(error = %e, "credentials: cloud broker session lost");
                        }
                        break false;
                    }
                    None => break false,
                },
            }
        };
        pump.abort();
        for (_, m) in inflight.drain() {
            resend.push_back(m);
        }
        resend.extend(unmapped.drain(..));
        while resend.len() > 10_000 {
            resend.pop_front();
        }
        if stop {
            return;
        }
        attempt = attempt.saturating_add(1);
        let cap = up
            .backoff_min
            .saturating_mul(1u32 << attempt.min(16))
            .min(up.backoff_max);
        let ms = rand::Rng::gen_range(&mut rand::thread_rng(), 0..=cap.as_millis().max(1) as u64);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
        }
    }
}

/// An answer that waits for the batch's write (`Err`: the write failed).
type Deferred = Box<dyn FnOnce(Result<(), String>) + Send + Sync>;

/// What one batch changed, written at once before anything is said.
#[derive(Default)]
struct Writes {
    creds: HashMap<String, Credential>,
    jobs: HashMap<String, Job>,
    /// (device, command) to publish after the write.
    out: Vec<(String, ToDevice)>,
    replies: Vec<Deferred>,
    /// Cloud messages to acknowledge once written.
    acks: Vec<crate::uplink::Delivery>,
    /// Cloud: messages for gateways, sent once written.
    downs: Vec<(String, Down)>,
    /// Mirrored jobs (cloud): written, never run here.
    mirrored: Vec<Job>,
    /// Vehicle gateway: an ECU checked in; the vehicle check-in goes up.
    vehicle_dirty: bool,
}

impl Writes {
    fn cred(&mut self, c: Credential) {
        self.creds.insert(c.id.clone(), c);
    }
    fn job(&mut self, j: Job) {
        self.jobs.insert(j.id.clone(), j);
    }
    fn reply<T: Send + Sync + 'static>(
        &mut self,
        reply: Reply<T>,
        value: Result<T, CredentialsError>,
    ) {
        // Errors are answered at once by the caller; a value waits for the write.
        self.replies.push(Box::new(move |r| {
            let _ = reply.send(match r {
                Ok(()) => value,
                Err(e) => Err(CredentialsError::Inventory(InventoryError::Postgres(e))),
            });
        }));
    }
}

/// The jobs not ended, with their holders and credentials indexed (a check-in looks up its
/// device's jobs, not every open job).
#[derive(Default)]
struct OpenJobs {
    jobs: HashMap<String, Job>,
    by_device: HashMap<String, HashSet<String>>,
    by_cred: HashMap<String, HashSet<String>>,
}

impl OpenJobs {
    fn from_jobs(jobs: impl IntoIterator<Item = Job>) -> OpenJobs {
        let mut o = OpenJobs::default();
        for j in jobs {
            o.insert(j);
        }
        o
    }
    fn insert(&mut self, j: Job) {
        self.remove(&j.id);
        self.by_device
            .entry(j.device.clone())
            .or_default()
            .insert(j.id.clone());
        self.by_cred
            .entry(j.credential.clone())
            .or_default()
            .insert(j.id.clone());
        self.jobs.insert(j.id.clone(), j);
    }
    fn remove(&mut self, id: &str) -> Option<Job> {
        let j = self.jobs.remove(id)?;
        for (map, key) in [
            (&mut self.by_device, &j.device),
            (&mut self.by_cred, &j.credential),
        ] {
            if let Some(set) = map.get_mut(key) {
                set.remove(id);
                if set.is_empty() {
                    map.remove(key);
                }
            }
        }
        Some(j)
    }
    fn get(&self, id: &str) -> Option<&Job> {
        self.jobs.get(id)
    }
    fn len(&self) -> usize {
        self.jobs.len()
    }
    fn of_device<'a>(&'a self, device: &str) -> impl Iterator<Item = &'a Job> + 'a {
        self.by_device
            .get(device)
            .into_iter()
            .flatten()
            .filter_map(|id| self.jobs.get(id))
    }
    fn of_credential<'a>(&'a self, cred: &str) -> impl Iterator<Item = &'a Job> + 'a {
        self.by_cred
            .get(cred)
            .into_iter()
            .flatten()
            .filter_map(|id| self.jobs.get(id))
    }
    fn retain(&mut self, keep: impl Fn(&Job) -> bool) {
        let drop: Vec<String> = self
            .jobs
            .values()
            .filter(|j| !keep(j))
            .map(|j| j.id.clone())
            .collect();
        for id in drop {
            self.remove(&id);
        }
    }
}

struct Owner<S> {
    cfg: CredentialsConfig,
    inv: Arc<S>,
    deps: Deps,
    client: Option<AsyncClient>,
    tx: mpsc::Sender<Command>,
    stats: Arc<CredentialStats>,
    /// Every job not ended (loaded at start), by id.
    open: OpenJobs,
    /// Credentials to revoke at a time (an invalidation's grace), by id.
    revoke_at: HashMap<String, i64>,
    /// Rotations in flight: the new key, until the holder confirms (never written down).
    openers: HashMap<String, (String, Vec<u8>)>,
    last_policy: i64,
    /// The uplink queue's dropped count when the inventory last went up whole, and when it
    /// last went up after drops (the start's resync does not count).
    resynced_at_drops: u64,
    last_resync: Option<std::time::Instant>,
    /// When each job's command last went out (within `SENT_AT_KEEP`; pruned each tick,
    /// forgotten on restart).
    sent_at: HashMap<String, std::time::Instant>,
    /// Vehicle gateway: the ECUs that checked in since start and the certificate serials
    /// each reported (the vehicle check-in), at most `fleet_msg::MAX_ECUS`.
    present: BTreeMap<String, Vec<String>>,
    /// Cloud: messages for the gateways, to the cloud link.
    down_out: Option<mpsc::Sender<(String, Down)>>,
    warn: crate::frontdoor::bounds::WarnLimiter,
}

impl<S: InventoryStore> Owner<S> {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        match self.inv.open_jobs(100_000).await {
            Ok(jobs) => {
                for j in jobs {
                    self.open.insert(j);
                }
            }
            Err(e) => tracing::error!(error = %e, "credentials: cannot load the open jobs"),
        }
        // Cloud: mirrored jobs are the gateways' to run.
        self.open.retain(|j| j.gateway.is_none());
        tracing::info!(open_jobs = self.open.len(), "credentials service up");
        if self.deps.up.is_some() {
            self.resync().await;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                c = rx.recv() => match c { Some(c) => c, None => break },
                _ = tick.tick() => Command::Tick,
            };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let mut w = Writes::default();
            for cmd in batch {
                if let Err(e) = self.handle(cmd, &mut w).await {
                    tracing::error!(error = %e, "credentials: command failed");
                }
            }
            self.commit(w).await;
        }
        tracing::info!("credentials service stopped");
    }

    /// Write, then publish and answer.
    async fn commit(&mut self, w: Writes) {
        use std::sync::atomic::Ordering::Relaxed;
        let result = if w.creds.is_empty() && w.jobs.is_empty() && w.mirrored.is_empty() {
            Ok(())
        } else {
            let mut jobs: Vec<Job> = w.jobs.values().cloned().collect();
            jobs.extend(w.mirrored.iter().cloned());
            let creds: Vec<Credential> = w.creds.values().cloned().collect();
            self.stats.writes.fetch_add(1, Relaxed);
            self.inv
                .put_jobs(&jobs, &creds)
                .await
                .map_err(|e| e.to_string())
        };
        match &result {
            Ok(()) => {
                self.send_up(&w).await;
                for d in w.acks {
                    if let Err(e) = d.client.ack(&d.publish).await {
                        tracing::warn!(error = %e, "credentials: cloud message not acknowledged (it comes again)");
                    }
                }
                if let Some(out) = &self.down_out {
                    for m in w.downs {
                        if out.try_send(m).is_err() {
                            tracing::warn!("credentials: too many messages for the gateways waiting; one dropped");
                        }
                    }
                }
                for j in w.jobs.into_values() {
                    if j.state.is_terminal() {
                        self.open.remove(&j.id);
                    } else {
                        self.open.insert(j);
                    }
                }
                for (device, cmd) in w.out {
                    self.publish(&device, &cmd).await;
                }
            }
            Err(e) => {
                // Nothing was said: the open jobs in memory are reloaded so that the next
                // attempt starts from what is on disk.
                tracing::error!(error = %e, "credentials: inventory write failed; nothing sent");
                if let Ok(jobs) = self.inv.open_jobs(100_000).await {
                    self.open = OpenJobs::from_jobs(jobs);
                }
            }
        }
        for r in w.replies {
            r(result.clone());
        }
    }

    /// The command to one holder, on its own topic only.
    async fn publish(&self, device: &str, cmd: &ToDevice) {
        use std::sync::atomic::Ordering::Relaxed;
        let topic = msg::command_topic(device);
        let body = cmd.encode();
        if let Some(q) = &self.deps.durable {
            // A persistent session gets QoS 1 messages from its durable queue only.
            if let Err(e) = q
                .publish_internal_durable(&topic, CLIENT_ID, 1, false, Bytes::from(body.clone()))
                .await
            {
                tracing::warn!(%device, error = %e, "credentials command not queued for the device's session");
            }
        }
        let Some(client) = &self.client else {
            return;
        };
        match client.publish(topic, QoS::AtLeastOnce, false, body).await {
            Ok(()) => {
                self.stats.commands_sent.fetch_add(1, Relaxed);
                tracing::info!(%device, job = cmd.job(), "credentials command sent");
            }
            Err(e) => tracing::warn!(%device, error = %e, "credentials command not sent"),
        }
    }

    /// Gateway: what a batch changed goes up to the fleet inventory, through the durable
    /// uplink queue (in order; a crash between the write and this loses at most that
    /// batch's update until the record changes again or the next start's resync).
    async fn send_up(&self, w: &Writes) {
        let Some(up) = &self.deps.up else {
            return;
        };
        let mut msgs = Vec::new();
        let creds: Vec<Credential> = w.creds.values().cloned().collect();
        let jobs: Vec<Job> = w.jobs.values().cloned().collect();
        let n = creds.len().max(jobs.len());
        let mut i = 0;
        while i < n {
            let end = (i + fleet_msg::MAX_RECORDS).min(n);
            let m = Up::Records {
                records: creds.get(i..end.min(creds.len())).unwrap_or(&[]).to_vec(),
                jobs: jobs.get(i..end.min(jobs.len())).unwrap_or(&[]).to_vec(),
            };
            msgs.push(up_message(m.encode()));
            i = end;
        }
        if w.vehicle_dirty {
            if let Some(m) = self.vehicle_report(up) {
                msgs.push(up_message(m.encode()));
            }
        }
        if msgs.is_empty() {
            return;
        }
        if let Err(e) = up.queue.append(msgs).await {
            tracing::warn!(error = %e, "credentials: the uplink queue refused the inventory's update");
        }
    }

    fn vehicle_report(&self, up: &UpSide) -> Option<Up> {
        let vehicle = self.deps.vehicle.clone()?;
        let (Some(key), Some(cert)) = (&up.key_pem, &up.cert_pem) else {
            tracing::warn!("credentials: no uplink key to sign the vehicle check-in with");
            return None;
        };
        let r = fleet_msg::VehicleReport {
            v: 1,
            gateway: up.gateway.clone(),
            vehicle,
            at: now(),
            ecus: self
                .present
                .iter()
                .map(|(ecu, serials)| fleet_msg::Ecu {
                    ecu: ecu.clone(),
                    serials: serials.clone(),
                })
                .collect(),
        };
        match fleet_msg::sign(&r, key, cert) {
            Ok(s) => Some(Up::Vehicle(s)),
            Err(e) => {
                tracing::warn!(error = %e, "credentials: the vehicle check-in cannot be signed");
                None
            }
        }
    }

    /// Gateway: the uplink queue dropped messages since the last resync (some may have been
    /// ours) and the link is up: the inventory goes up again, at most once per
    /// `RESYNC_MIN_INTERVAL` (a resync that itself pushes old messages out counts once).
    async fn resync_after_drops(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(up) = &self.deps.up else {
            return;
        };
        let dropped = up.queue.stats().dropped.load(Relaxed);
        if dropped == self.resynced_at_drops
            || *up.link.borrow() != crate::uplink::detect::LinkState::Online
            || self
                .last_resync
                .is_some_and(|t| t.elapsed() < RESYNC_MIN_INTERVAL)
        {
            return;
        }
        tracing::info!(
            dropped = dropped - self.resynced_at_drops,
            "credentials: the uplink queue dropped messages; the inventory goes up again"
        );
        self.last_resync = Some(std::time::Instant::now());
        self.resync().await;
    }

    /// Gateway start (and after the uplink queue dropped messages): every record goes up
    /// once (the cloud may have missed updates).
    async fn resync(&mut self) {
        let Some(up) = &self.deps.up else {
            return;
        };
        self.resynced_at_drops = up
            .queue
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut q = Query {
            limit: fleet_msg::MAX_RECORDS as u32,
            sort: super::model::SortKey::Id,
            ..Query::default()
        };
        let mut sent = 0usize;
        loop {
            let page = match self.inv.query(&q, now(), secs(self.cfg.expiring)).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "credentials: resync with the fleet inventory stopped");
                    return;
                }
            };
            if page.rows.is_empty() {
                break;
            }
            sent += page.rows.len();
            let m = Up::Records {
                records: page.rows,
                jobs: Vec::new(),
            };
            if let Err(e) = up.queue.append(vec![up_message(m.encode())]).await {
                tracing::warn!(error = %e, "credentials: resync with the fleet inventory stopped");
                return;
            }
            q.offset += u64::from(q.limit);
        }
        tracing::info!(
            records = sent,
            "credentials: the inventory queued for the fleet inventory"
        );
    }

    /// Gateway: a command of the fleet inventory.
    async fn apply_down(&mut self, w: &mut Writes, m: Down) -> Result<(), CredentialsError> {
        match m {
            Down::Operate {
                credential,
                operation,
                by,
                reason,
            } => {
                let by = format!("cloud:{by}");
                self.operate(w, &credential, operation, &by, &reason)
                    .await?;
            }
            Down::DeleteEcuCertificate {
                ecu,
                serial,
                reason,
            } => {
                let serial = normal_serial(&serial);
                let mut found = false;
                for c in self.inv.by_serial(&serial).await? {
                    let c = w.creds.get(&c.id).cloned().unwrap_or(c);
                    if c.holder != ecu {
                        continue;
                    }
                    found = true;
                    let mut c2 = c.clone();
                    c2.flag("unknown-binding", now(), "cloud", reason.clone());
                    w.cred(c2);
                    let busy = self
                        .open
                        .of_credential(&c.id)
                        .chain(w.jobs.values().filter(|j| j.credential == c.id))
                        .any(|j| !j.state.is_terminal());
                    if !busy && !c.op_state.is_final() {
                        self.operate(w, &c.id, Operation::Delete, "cloud:binding", &reason)
                            .await?;
                    }
                }
                tracing::warn!(%ecu, %serial, %reason, found, "the fleet inventory: delete this ECU's certificate");
            }
        }
        Ok(())
    }

    /// Cloud: a gateway's records, jobs or vehicle check-in.
    async fn apply_up(
        &mut self,
        w: &mut Writes,
        gateway: &str,
        m: Up,
    ) -> Result<(), CredentialsError> {
        match m {
            Up::Records { records, jobs } => {
                for mut r in records {
                    r.gateway = Some(gateway.to_string());
                    // A certificate of our own CA the gateway sees as foreign: it is ours.
                    if r.kind == Kind::ForeignCertificate && r.issuer == self.deps.issuer {
                        let ours = Credential::cert_id(&r.serial);
                        if let Some(mut c) = self.load(w, &ours).await? {
                            c.last_seen = r.last_seen.max(c.last_seen);
                            if c.holder != r.holder
                                && !c.seen_by.contains(&r.holder)
                                && c.seen_by.len() < 16
                            {
                                c.seen_by.push(r.holder.clone());
                                c.flag(
                                    "shared",
                                    now(),
                                    "audit",
                                    format!("also at gateway {gateway} on {}", r.holder),
                                );
                            }
                            for a in &r.audit {
                                if !c.audit.contains(a) {
                                    c.audit.push(a.clone());
                                }
                            }
                            if c.gateway.is_none() {
                                c.gateway = Some(gateway.to_string());
                            }
                            w.cred(c);
                            continue;
                        }
                    }
                    if let Some(old) = self.load(w, &r.id).await? {
                        // Findings the cloud made itself stay.
                        for a in old.audit {
                            if !r.audit.contains(&a) {
                                r.audit.push(a);
                            }
                        }
                    }
                    w.cred(r);
                }
                for mut j in jobs {
                    j.gateway = Some(gateway.to_string());
                    w.mirrored.push(j);
                }
            }
            Up::Vehicle(signed) => self.vehicle_check_in(w, gateway, &signed).await?,
        }
        Ok(())
    }

    /// Seed 000 at the cloud: every (vehicle, ECU) pair the vehicle reports must be the one
    /// its certificate was issued for; the reverse (an ECU recorded for the vehicle and not
    /// reported) is flagged.
    async fn vehicle_check_in(
        &mut self,
        w: &mut Writes,
        gateway: &str,
        signed: &fleet_msg::SignedReport,
    ) -> Result<(), CredentialsError> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(fleet) = &self.deps.fleet else {
            return Ok(());
        };
        let refuse =
            |why: String| CredentialsError::NotAllowed(format!("vehicle check-in refused: {why}"));
        let Some(roots) = &fleet.roots else {
            self.stats.reports_refused.fetch_add(1, Relaxed);
            return Err(refuse("cloud.gateway_ca is not set".into()));
        };
        let r = match fleet_msg::verify(signed, gateway, roots, now()) {
            Ok(r) => r,
            Err(e) => {
                self.stats.reports_refused.fetch_add(1, Relaxed);
                return Err(refuse(e.to_string()));
            }
        };
        // A gateway is one vehicle, and a vehicle one gateway: bound at the first check-in.
        let gkey = format!("gateway/{gateway}");
        let vkey = format!("vehicle/{}", r.vehicle);
        let bound_vehicle = fleet
            .vehicles
            .get(gkey.as_bytes())
            .map_err(|e| CredentialsError::Inventory(e.into()))?;
        let bound_gateway = fleet
            .vehicles
            .get(vkey.as_bytes())
            .map_err(|e| CredentialsError::Inventory(e.into()))?;
        if let Some(v) = &bound_vehicle {
            if v.as_slice() != r.vehicle.as_bytes() {
                self.stats.reports_refused.fetch_add(1, Relaxed);
                return Err(refuse(format!(
                    "gateway {gateway} is vehicle {}, not {}",
                    String::from_utf8_lossy(v),
                    r.vehicle
                )));
            }
        }
        if let Some(g) = &bound_gateway {
            if g.as_slice() != gateway.as_bytes() {
                self.stats.reports_refused.fetch_add(1, Relaxed);
                return Err(refuse(format!(
                    "vehicle {} is gateway {}'s, not {gateway}'s",
                    r.vehicle,
                    String::from_utf8_lossy(g)
                )));
            }
        }
        if bound_vehicle.is_none() || bound_gateway.is_none() {
            fleet
                .vehicles
                .put(gkey.as_bytes(), r.vehicle.as_bytes())
                .map_err(|e| CredentialsError::Inventory(e.into()))?;
            fleet
                .vehicles
                .put(vkey.as_bytes(), gateway.as_bytes())
                .map_err(|e| CredentialsError::Inventory(e.into()))?;
            tracing::info!(%gateway, vehicle = %r.vehicle, "vehicle bound to its gateway");
        }
        let t = now();
        let mut reported_ecus = HashSet::new();
        for e in &r.ecus {
            reported_ecus.insert(e.ecu.clone());
            for serial in &e.serials {
                let serial = normal_serial(serial);
                let id = Credential::cert_id(&serial);
                let Some(mut c) = self.load(w, &id).await? else {
                    continue;
                };
                if c.op_state.is_final() || c.revoked_at.is_some() {
                    continue;
                }
                let (Some(v), Some(ecu)) = (c.vehicle.clone(), c.ecu.clone()) else {
                    continue;
                };
                if v == r.vehicle && ecu == e.ecu {
                    c.last_seen = Some(t);
                    c.audit.retain(|a| a != "ecu-missing");
                    w.cred(c);
                    continue;
                }
                self.stats.binding_violations.fetch_add(1, Relaxed);
                let why = format!(
                    "ECU {} reported in vehicle {} (gateway {gateway}); its certificate was issued for ECU {ecu} in vehicle {v}",
                    e.ecu, r.vehicle
                );
                c.flag("unknown-binding", t, "binding", why.clone());
                w.cred(c);
                self.revoke(w, &id, &why).await?;
                if let Some(mut c) = self.load(w, &id).await? {
                    c.set_state(OpState::Invalidated, t, "binding", why.clone());
                    w.cred(c);
                }
                w.downs.push((
                    gateway.to_string(),
                    Down::DeleteEcuCertificate {
                        ecu: e.ecu.clone(),
                        serial: serial.clone(),
                        reason: why.clone(),
                    },
                ));
                tracing::warn!(%gateway, vehicle = %r.vehicle, ecu = %e.ecu, %serial, "ECU certificate in the wrong vehicle: revoked, deletion sent");
            }
        }
        for mut c in self.inv.by_vehicle(&r.vehicle).await? {
            if let Some(n) = w.creds.get(&c.id) {
                c = n.clone();
            }
            let Some(ecu) = c.ecu.clone() else { continue };
            if c.op_state.is_final() || c.revoked_at.is_some() || reported_ecus.contains(&ecu) {
                continue;
            }
            if c.flag(
                "ecu-missing",
                t,
                "binding",
                format!("not in vehicle {}'s check-in", r.vehicle),
            ) {
                w.cred(c);
            }
        }
        Ok(())
    }

    async fn load(&self, w: &Writes, id: &str) -> Result<Option<Credential>, InventoryError> {
        if let Some(c) = w.creds.get(id) {
            return Ok(Some(c.clone()));
        }
        self.inv.get(id).await
    }

    fn job_of(&self, w: &Writes, id: &str) -> Option<Job> {
        w.jobs.get(id).or_else(|| self.open.get(id)).cloned()
    }

    async fn handle(&mut self, cmd: Command, w: &mut Writes) -> Result<(), CredentialsError> {
        match cmd {
            Command::Query { q, reply } => {
                let inv = self.inv.clone();
                let exp = secs(self.cfg.expiring);
                tokio::spawn(async move {
                    let _ = reply.send(inv.query(&q, now(), exp).await.map_err(Into::into));
                });
            }
            Command::Show { id, reply } => {
                let r = self.show(w, &id).await;
                let _ = reply.send(r);
            }
            Command::Operate {
                id,
                op,
                by,
                reason,
                reply,
            } => match self.operate(w, &id, op, &by, &reason).await {
                Ok(jobs) => w.reply(reply, Ok(jobs)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Cancel { job, by, reply } => match self.cancel(w, &job, &by) {
                Ok(j) => w.reply(reply, Ok(j)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Report { device, report, at } => self.report(w, &device, report, at).await?,
            Command::Update { device, update } => self.update(w, &device, update).await?,
            Command::Ca(CaEvent::Issued(rec)) | Command::Ca(CaEvent::Revoked(rec)) => {
                self.record_cert(w, &rec).await?
            }
            Command::Reconcile(all) => {
                for rec in all {
                    self.record_cert(w, &rec).await?;
                }
            }
            Command::RenewIssued { job, result } => self.renew_issued(w, &job, result).await?,
            Command::Bind {
                id,
                vehicle,
                ecu,
                by,
                reply,
            } => match self.load(w, &id).await {
                Ok(Some(mut c)) => {
                    let t = now();
                    c.vehicle = Some(vehicle.clone());
                    c.ecu = Some(ecu.clone());
                    c.log(
                        t,
                        "bound",
                        &by,
                        format!("issued for ECU {ecu} in vehicle {vehicle}"),
                    );
                    w.cred(c.clone());
                    w.reply(reply, Ok(c));
                }
                Ok(None) => {
                    let _ = reply.send(Err(CredentialsError::NotFound(id)));
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            Command::Down { msg, delivery } => {
                match msg {
                    Ok(m) => {
                        if let Err(e) = self.apply_down(w, m).await {
                            tracing::warn!(error = %e, "credentials: the fleet inventory's command not carried out");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "credentials: a message from the fleet inventory refused")
                    }
                }
                w.acks.push(delivery);
            }
            Command::CloudUp { gateway, delivery } => {
                match Up::decode(&delivery.publish.payload) {
                    Ok(m) => {
                        if let Err(e) = self.apply_up(w, &gateway, m).await {
                            if self.warn.allow() {
                                tracing::warn!(%gateway, error = %e, "credentials: a gateway's message not applied");
                            }
                        }
                    }
                    Err(e) => {
                        if self.warn.allow() {
                            tracing::warn!(%gateway, error = %e, "credentials: a gateway's message refused");
                        }
                    }
                }
                w.acks.push(delivery);
            }
            Command::Tick => self.tick(w).await?,
        }
        Ok(())
    }

    async fn show(&self, w: &Writes, id: &str) -> Result<Option<Detail>, CredentialsError> {
        let Some(c) = self.load(w, id).await? else {
            return Ok(None);
        };
        let mut jobs = self.inv.jobs_for_credential(id).await?;
        for j in jobs.iter_mut() {
            if let Some(o) = self.job_of(w, &j.id) {
                *j = o;
            }
        }
        Ok(Some(Detail {
            validity: c.validity(now(), secs(self.cfg.expiring)),
            credential: c,
            jobs,
        }))
    }

    /// The CA issued or revoked: mirror it (idempotent; the CA's record wins on dates).
    async fn record_cert(&self, w: &mut Writes, rec: &CertRecord) -> Result<(), CredentialsError> {
        let id = Credential::cert_id(&rec.serial);
        let t = now();
        let mut c = match self.load(w, &id).await? {
            Some(c) => c,
            None => {
                let mut c = Credential::new(
                    id.clone(),
                    Kind::Certificate,
                    rec.serial.clone(),
                    rec.device_id.clone(),
                    rec.issued_at,
                );
                c.issuer = self.deps.issuer.clone();
                c.server = "gateway".into();
                c.vehicle = self.deps.vehicle.clone();
                if self.deps.vehicle.is_some() {
                    c.ecu = Some(rec.device_id.clone());
                }
                c.log(
                    rec.issued_at,
                    "issued",
                    "ca",
                    format!("key {}", rec.key_source),
                );
                c
            }
        };
        let before = c.clone();
        c.not_before = Some(rec.not_before);
        c.not_after = Some(rec.not_after);
        c.pem = Some(rec.cert_pem.clone());
        if c.fingerprint.is_none() {
            c.fingerprint = pem::parse(&rec.cert_pem)
                .ok()
                .map(|p| crate::ca::fingerprint(p.contents()));
        }
        if rec.revoked_at.is_some() && c.revoked_at.is_none() {
            c.revoked_at = rec.revoked_at;
            c.log(t, "revoked", "ca", "on the CRL");
            if !c.op_state.is_final()
                && !matches!(
                    c.op_state,
                    OpState::InvalidationPending | OpState::DeletionPending
                )
            {
                c.set_state(OpState::Invalidated, t, "ca", "revoked");
            }
        }
        if c != before {
            w.cred(c);
        }
        Ok(())
    }

    async fn operate(
        &mut self,
        w: &mut Writes,
        id: &str,
        op: Operation,
        by: &str,
        reason: &str,
    ) -> Result<Vec<Job>, CredentialsError> {
        let mut c = self
            .load(w, id)
            .await?
            .ok_or_else(|| CredentialsError::NotFound(id.to_string()))?;
        if !c.kind.allows(op) {
            return Err(CredentialsError::NotAllowed(format!(
                "{} does not apply to a {}",
                op.as_str(),
                c.kind.as_str()
            )));
        }
        if c.op_state.is_final() {
            return Err(CredentialsError::NotAllowed(format!(
                "{id} is {} already",
                c.op_state.as_str()
            )));
        }
        if op == Operation::Renew && c.revoked_at.is_some() {
            return Err(CredentialsError::NotAllowed(format!(
                "{id} is revoked: it cannot be renewed"
            )));
        }
        let busy = self
            .open
            .of_credential(id)
            .chain(w.jobs.values().filter(|j| j.credential == id))
            .any(|j| !j.state.is_terminal());
        if busy {
            return Err(CredentialsError::NotAllowed(format!(
                "{id} has a job running: wait for it or cancel it"
            )));
        }
        let t = now();
        // Cloud: a credential behind a gateway is operated by that gateway, which makes
        // the jobs for its holders (they come back up with its records).
        if let (Some(gw), true) = (c.gateway.clone(), self.down_out.is_some()) {
            c.set_state(
                OpState::pending(op),
                t,
                by,
                format!("{} sent to gateway {gw}", op.as_str()),
            );
            w.downs.push((
                gw.clone(),
                Down::Operate {
                    credential: c.id.clone(),
                    operation: op,
                    by: by.to_string(),
                    reason: reason.to_string(),
                },
            ));
            w.cred(c);
            tracing::info!(credential = id, op = op.as_str(), %by, gateway = %gw, "operation sent to the holder's gateway");
            return Ok(Vec::new());
        }
        let mut holders = vec![c.holder.clone()];
        for d in &c.seen_by {
            if !holders.contains(d) {
                holders.push(d.clone());
            }
        }
        let mut jobs = Vec::new();
        for device in holders {
            let open_for = self.open.of_device(&device).count();
            if open_for >= MAX_OPEN_JOBS_PER_DEVICE {
                return Err(CredentialsError::NotAllowed(format!(
                    "{device} has {open_for} jobs open already"
                )));
            }
            jobs.push(Job {
                id: job_id(),
                credential: id.to_string(),
                op,
                device,
                state: JobState::Queued,
                attempts: 0,
                created_at: t,
                updated_at: t,
                next_attempt_at: t,
                deadline: t.saturating_add(secs(self.cfg.job_timeout)),
                by: by.to_string(),
                reason: reason.to_string(),
                result: None,
                gateway: None,
            });
        }
        c.set_state(
            OpState::pending(op),
            t,
            by,
            format!(
                "{} requested{}",
                op.as_str(),
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            ),
        );
        self.stats
            .jobs_made
            .fetch_add(jobs.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // An invalidation (or the deletion of something we can revoke) takes effect at
        // once if no holder can be told first, else after the grace.
        if matches!(op, Operation::Invalidate | Operation::Delete) && self.revocable(&c) {
            let any_live = jobs.iter().any(|j| (self.deps.live)(&j.device));
            let at = if any_live {
                t + secs(self.cfg.invalidate_grace)
            } else {
                t
            };
            self.revoke_at.insert(c.id.clone(), at);
        }
        w.cred(c);
        for j in &jobs {
            w.job(j.clone());
            self.open.insert(j.clone());
            self.deliver(w, j.id.as_str()).await?;
        }
        if self.revoke_at.get(id).is_some_and(|at| *at <= t) {
            self.revoke(w, id, "invalidated before its holder could be told")
                .await?;
        }
        let out: Vec<Job> = jobs
            .iter()
            .map(|j| self.job_of(w, &j.id).unwrap_or_else(|| j.clone()))
            .collect();
        tracing::info!(credential = id, op = op.as_str(), %by, jobs = out.len(), "operation requested");
        Ok(out)
    }

    fn revocable(&self, c: &Credential) -> bool {
        c.revoked_at.is_none() && matches!(c.kind, Kind::Certificate | Kind::ForeignCertificate)
    }

    /// Revoke a credential now (our CA, or a foreign revocation the front door enforces).
    async fn revoke(
        &mut self,
        w: &mut Writes,
        id: &str,
        why: &str,
    ) -> Result<(), CredentialsError> {
        self.revoke_at.remove(id);
        let Some(mut c) = self.load(w, id).await? else {
            return Ok(());
        };
        if c.revoked_at.is_some() {
            return Ok(());
        }
        let t = now();
        match c.kind {
            Kind::Certificate => {
                self.deps
                    .ca
                    .revoke_serial(&c.serial)
                    .await
                    .map_err(|e| CredentialsError::Ca(e.to_string()))?;
            }
            Kind::ForeignCertificate => {
                self.deps
                    .ca
                    .revoke_foreign(ForeignRevocation {
                        serial: c.serial.clone(),
                        device_id: c.holder.clone(),
                        issuer: c.issuer.clone(),
                        reason: why.to_string(),
                        revoked_at: t,
                    })
                    .await
                    .map_err(|e| CredentialsError::Ca(e.to_string()))?;
            }
            _ => return Ok(()),
        }
        c.revoked_at = Some(t);
        c.log(t, "revoked", "credentials", why);
        tracing::warn!(credential = id, holder = %c.holder, why, "credential revoked");
        w.cred(c);
        Ok(())
    }

    /// Send a job's command if its holder is there; else it waits for the check-in.
    async fn deliver(&mut self, w: &mut Writes, job: &str) -> Result<(), CredentialsError> {
        let Some(mut j) = self.job_of(w, job) else {
            return Ok(());
        };
        if j.state.is_terminal() || !(self.deps.live)(&j.device) {
            return Ok(());
        }
        let Some(c) = self.load(w, &j.credential).await? else {
            return Ok(());
        };
        let issued = match (&j.op, j.result.as_deref()) {
            (Operation::Renew, Some(r)) if r.starts_with("issued ") => {
                self.load(w, &Credential::cert_id(&r["issued ".len()..]))
                    .await?
            }
            _ => None,
        };
        let cmd = match j.op {
            // The certificate was issued and the answer lost: the same one again.
            Operation::Renew if issued.as_ref().is_some_and(|n| n.pem.is_some()) => {
                let n = issued.unwrap_or_else(|| c.clone());
                ToDevice::Issued {
                    job: j.id.clone(),
                    replaces: c.serial.clone(),
                    serial: n.serial.clone(),
                    cert_pem: n.pem.clone().unwrap_or_default(),
                    ca_pem: self.deps.ca.ca_pem().to_string(),
                }
            }
            Operation::Renew => ToDevice::Renew {
                job: j.id.clone(),
                serial: c.serial.clone(),
                server: c.server.clone(),
            },
            Operation::Invalidate => ToDevice::Invalidate {
                job: j.id.clone(),
                kind: c.kind,
                id: c.serial.clone(),
                server: c.server.clone(),
            },
            Operation::Delete => ToDevice::Delete {
                job: j.id.clone(),
                kind: c.kind,
                id: c.serial.clone(),
                server: c.server.clone(),
            },
            Operation::Rotate => ToDevice::Rotate {
                job: j.id.clone(),
                id: c.serial.clone(),
                server: c.server.clone(),
            },
        };
        let t = now();
        j.attempts = j.attempts.saturating_add(1);
        if j.state == JobState::Queued {
            j.state = JobState::Delivered;
        }
        j.updated_at = t;
        j.next_attempt_at = t.saturating_add(self.backoff(j.attempts));
        w.out.push((j.device.clone(), cmd));
        self.sent_at.insert(j.id.clone(), std::time::Instant::now());
        w.job(j);
        Ok(())
    }

    fn backoff(&self, attempts: u32) -> i64 {
        let min = secs(self.cfg.retry_min).max(1);
        let max = secs(self.cfg.retry_max).max(min);
        min.saturating_mul(1i64 << attempts.saturating_sub(1).min(20))
            .min(max)
    }

    fn cancel(&mut self, w: &mut Writes, job: &str, by: &str) -> Result<Job, CredentialsError> {
        let mut j = self
            .job_of(w, job)
            .ok_or_else(|| CredentialsError::NotFound(format!("job {job}")))?;
        if !j.state.may_become(JobState::Canceled) {
            return Err(CredentialsError::NotAllowed(format!(
                "job {job} is {} already",
                j.state.as_str()
            )));
        }
        j.state = JobState::Canceled;
        j.updated_at = now();
        j.result = Some(format!("canceled by {by}"));
        if (self.deps.live)(&j.device) {
            w.out
                .push((j.device.clone(), ToDevice::Cancel { job: j.id.clone() }));
        }
        self.openers.remove(&j.id);
        w.job(j.clone());
        Ok(j)
    }

    /// A holder checked in with what it holds.
    async fn report(
        &mut self,
        w: &mut Writes,
        device: &str,
        r: Report,
        at: std::time::Instant,
    ) -> Result<(), CredentialsError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.reports.fetch_add(1, Relaxed);
        let t = now();
        let mut reported: HashSet<String> = HashSet::new();
        for h in &r.credentials {
            let mut h = h.clone();
            if h.kind == Kind::Certificate
                && h.issuer.as_deref().is_some_and(|i| i != self.deps.issuer)
                && self.load(w, &self.reported_id(device, &h)).await?.is_none()
            {
                // Another CA's certificate (the cloud's, an OTA server's).
                h.kind = Kind::ForeignCertificate;
            }
            let h = &h;
            let id = self.reported_id(device, h);
            reported.insert(id.clone());
            let mut c = match self.load(w, &id).await? {
                Some(c) => c,
                None => {
                    let mut c = Credential::new(
                        id.clone(),
                        h.kind,
                        if h.kind == Kind::Certificate || h.kind == Kind::ForeignCertificate {
                            normal_serial(&h.id)
                        } else {
                            h.id.clone()
                        },
                        device.to_string(),
                        t,
                    );
                    c.op_state = OpState::Reported;
                    c.issuer = h.issuer.clone().unwrap_or_default();
                    c.server = h.server.clone();
                    c.fingerprint = h.fingerprint.clone();
                    c.not_before = h.not_before;
                    c.not_after = h.not_after;
                    c.log(
                        t,
                        "reported",
                        &format!("device:{device}"),
                        "first seen at check-in",
                    );
                    if h.kind == Kind::Certificate {
                        // It claims our CA, but we have no record of it.
                        c.flag(
                            "unknown",
                            t,
                            "audit",
                            "a certificate of our CA we never issued",
                        );
                    }
                    c
                }
            };
            c.last_seen = Some(t);
            if c.holder != device && !c.seen_by.iter().any(|d| d == device) {
                if c.seen_by.len() < 16 {
                    c.seen_by.push(device.to_string());
                }
                c.flag(
                    "shared",
                    t,
                    "audit",
                    format!("also reported by {device}, held by {}", c.holder),
                );
                tracing::warn!(credential = %c.id, holder = %c.holder, also = device, "the same credential on two devices");
            }
            if c.revoked_at.is_some() {
                c.flag(
                    "revoked-in-use",
                    t,
                    "audit",
                    format!("reported by {device}"),
                );
            }
            if let (Some(fp), Some(have)) = (&h.fingerprint, &c.fingerprint) {
                if !fp.eq_ignore_ascii_case(have) {
                    c.flag(
                        "mismatch",
                        t,
                        "audit",
                        format!(
                            "{device} reports another certificate under serial {}",
                            c.serial
                        ),
                    );
                }
            }
            // Seed 000: in a vehicle, an ECU's certificate must be recorded for this
            // vehicle and this ECU.
            if let Some(v) = &self.deps.vehicle {
                if matches!(c.kind, Kind::Certificate | Kind::ForeignCertificate)
                    && c.revoked_at.is_none()
                    && !c.op_state.is_final()
                    && !(c.vehicle.as_deref() == Some(v) && c.ecu.as_deref() == Some(device))
                {
                    self.stats.binding_violations.fetch_add(1, Relaxed);
                    let why = format!(
                        "ECU {device} in vehicle {v} is not recorded with this certificate (issued for {}/{})",
                        c.vehicle.as_deref().unwrap_or("no vehicle"),
                        c.ecu.as_deref().unwrap_or("no ECU")
                    );
                    c.flag("unknown-binding", t, "binding", why.clone());
                    w.cred(c.clone());
                    let id = c.id.clone();
                    if !self.open.of_credential(&id).any(|j| !j.state.is_terminal()) {
                        // The ECU is told first; the revocation follows when it confirms
                        // or after `invalidate_grace` (at once if it is gone).
                        self.operate(w, &id, Operation::Delete, "binding", &why)
                            .await?;
                    }
                    continue;
                }
            }
            w.cred(c);
        }
        if self.deps.vehicle.is_some() {
            let serials: Vec<String> = r
                .credentials
                .iter()
                .filter(|h| matches!(h.kind, Kind::Certificate | Kind::ForeignCertificate))
                .map(|h| normal_serial(&h.id))
                .take(fleet_msg::MAX_SERIALS)
                .collect();
            if self.present.len() < fleet_msg::MAX_ECUS || self.present.contains_key(device) {
                if self.present.get(device) != Some(&serials) {
                    self.present.insert(device.to_string(), serials);
                }
                w.vehicle_dirty = true;
            }
        }
        // What the inventory says this device holds and it did not report.
        for mut c in self.inv.by_holder(device).await? {
            if let Some(n) = w.creds.get(&c.id) {
                c = n.clone();
            }
            if reported.contains(&c.id) || c.op_state.is_final() || c.revoked_at.is_some() {
                continue;
            }
            if c.flag(
                "not-reported",
                t,
                "audit",
                format!("{device} did not report it at check-in"),
            ) {
                w.cred(c);
            }
        }
        // Clear `not-reported` on what was reported again.
        for id in &reported {
            if let Some(c) = w.creds.get_mut(id) {
                c.audit.retain(|a| a != "not-reported");
            }
        }
        // The check-in delivers everything queued for it (and resends what was delivered
        // but not answered: the holder may have missed it while reconnecting), except what
        // went out less than `RESEND_QUIET` before the report came in (or after it: then
        // the holder was online with this connection when it went out).
        let mine: Vec<String> = self
            .open
            .of_device(device)
            .filter(|j| !j.state.is_terminal())
            .filter(|j| {
                self.sent_at.get(&j.id).is_none_or(|sent| {
                    at.checked_duration_since(*sent)
                        .is_some_and(|d| d >= RESEND_QUIET)
                })
            })
            .map(|j| j.id.clone())
            .collect();
        for j in mine {
            self.deliver(w, &j).await?;
        }
        Ok(())
    }

    fn reported_id(&self, device: &str, h: &Held) -> String {
        match h.kind {
            Kind::Certificate => Credential::cert_id(&normal_serial(&h.id)),
            Kind::ForeignCertificate => format!(
                "foreign:{}:{}",
                h.issuer.as_deref().unwrap_or("unknown"),
                normal_serial(&h.id)
            ),
            Kind::SymmetricKey => format!("key:{device}:{}", h.id),
            Kind::Password => format!("password:{device}:{}", h.id),
            Kind::Token => format!("token:{device}:{}", h.id),
        }
    }

    /// A holder's progress. Only the job's own holder may move it.
    async fn update(
        &mut self,
        w: &mut Writes,
        device: &str,
        u: JobUpdate,
    ) -> Result<(), CredentialsError> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(mut j) = self.job_of(w, &u.job) else {
            self.stats.updates_refused.fetch_add(1, Relaxed);
            tracing::warn!(%device, job = %u.job, "update for a job that is not open");
            return Ok(());
        };
        if j.device != device {
            self.stats.updates_refused.fetch_add(1, Relaxed);
            tracing::warn!(%device, job = %u.job, holder = %j.device, "update from a device that is not the job's holder: refused");
            return Ok(());
        }
        if !j.state.may_become(u.state) {
            tracing::info!(%device, job = %j.id, from = j.state.as_str(), to = u.state.as_str(), "job update ignored");
            return Ok(());
        }
        let t = now();
        match (u.state, j.op) {
            (JobState::InProgress, Operation::Renew) => {
                let Some(csr) = u.csr.clone() else {
                    j.state = JobState::InProgress;
                    j.updated_at = t;
                    w.job(j);
                    return Ok(());
                };
                j.state = JobState::InProgress;
                j.updated_at = t;
                j.result = Some("CSR received".into());
                w.job(j.clone());
                // The CA thread signs; the answer comes back as a command so the owner
                // never waits on it with a batch open.
                let (ca, tx, job, dev) = (
                    self.deps.ca.clone(),
                    self.tx.clone(),
                    j.id.clone(),
                    j.device.clone(),
                );
                tokio::spawn(async move {
                    let result = ca
                        .issue_device(&dev, Some(csr))
                        .await
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Command::RenewIssued { job, result }).await;
                });
            }
            (JobState::InProgress, Operation::Rotate) => {
                let Some(epk) = u.epk.clone() else {
                    j.state = JobState::InProgress;
                    j.updated_at = t;
                    w.job(j);
                    return Ok(());
                };
                let Some(c) = self.load(w, &j.credential).await? else {
                    return Ok(());
                };
                let new_id = format!(
                    "{}-r{}",
                    c.serial.split("-r").next().unwrap_or(&c.serial),
                    t
                );
                let secret = seal::random_secret(32)
                    .map_err(|e| CredentialsError::NotAllowed(e.to_string()))?;
                match seal::seal(&j.id, &new_id, &epk, &secret) {
                    Ok(s) => {
                        j.state = JobState::InProgress;
                        j.updated_at = t;
                        j.result = Some(format!("new key {new_id} sealed to the holder"));
                        self.openers.insert(j.id.clone(), (new_id.clone(), secret));
                        w.out.push((
                            j.device.clone(),
                            ToDevice::Key {
                                job: j.id.clone(),
                                replaces: c.serial.clone(),
                                new_id,
                                server: c.server.clone(),
                                epk: s.epk,
                                nonce: s.nonce,
                                sealed: s.sealed,
                            },
                        ));
                        w.job(j);
                    }
                    Err(e) => {
                        self.end(
                            w,
                            j,
                            JobState::Failed,
                            &format!("cannot seal to the holder's key: {e}"),
                        )
                        .await?;
                    }
                }
            }
            (JobState::InProgress, _) => {
                j.state = JobState::InProgress;
                j.updated_at = t;
                w.job(j);
            }
            (JobState::Succeeded, _) => {
                j.result = u.new_id.clone().or(u.reason.clone());
                self.succeeded(w, j, u.new_id.as_deref()).await?;
            }
            (JobState::Failed, _) => {
                let why = u
                    .reason
                    .clone()
                    .unwrap_or_else(|| "the holder failed".into());
                self.end(w, j, JobState::Failed, &why).await?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn renew_issued(
        &mut self,
        w: &mut Writes,
        job: &str,
        result: Result<crate::ca::Issued, String>,
    ) -> Result<(), CredentialsError> {
        let Some(j) = self.job_of(w, job) else {
            return Ok(());
        };
        if j.state.is_terminal() {
            return Ok(());
        }
        let issued = match result {
            Ok(i) => i,
            Err(e) => {
                return self
                    .end(w, j, JobState::Failed, &format!("the CSR was refused: {e}"))
                    .await;
            }
        };
        let Some(old) = self.load(w, &j.credential).await? else {
            return Ok(());
        };
        let t = now();
        let new_id = Credential::cert_id(&issued.serial);
        let mut n = self.load(w, &new_id).await?.unwrap_or_else(|| {
            let mut n = Credential::new(
                new_id.clone(),
                Kind::Certificate,
                issued.serial.clone(),
                j.device.clone(),
                t,
            );
            n.issuer = self.deps.issuer.clone();
            n.log(t, "issued", "ca", "renewal, key kept by the holder");
            n
        });
        n.server = old.server.clone();
        n.vehicle = old.vehicle.clone();
        n.ecu = old.ecu.clone();
        n.replaces = Some(old.id.clone());
        n.pem = Some(issued.cert_pem.clone());
        if let Ok(p) = pem::parse(&issued.cert_pem) {
            n.fingerprint = Some(crate::ca::fingerprint(p.contents()));
            if let Ok((_, x)) = x509_parser::parse_x509_certificate(p.contents()) {
                n.not_before = Some(x.validity().not_before.timestamp());
                n.not_after = Some(x.validity().not_after.timestamp());
            }
        }
        let mut j = j;
        j.result = Some(format!("issued {}", issued.serial));
        j.updated_at = t;
        w.out.push((
            j.device.clone(),
            ToDevice::Issued {
                job: j.id.clone(),
                replaces: old.serial.clone(),
                serial: issued.serial.clone(),
                cert_pem: issued.cert_pem,
                ca_pem: issued.ca_pem,
            },
        ));
        w.job(j);
        w.cred(n);
        Ok(())
    }

    async fn succeeded(
        &mut self,
        w: &mut Writes,
        j: Job,
        new_id: Option<&str>,
    ) -> Result<(), CredentialsError> {
        let t = now();
        let cred = j.credential.clone();
        match j.op {
            Operation::Renew => {
                if let Some(mut old) = self.load(w, &cred).await? {
                    let new = new_id.map(|s| Credential::cert_id(&normal_serial(s)));
                    old.replaced_by = new.clone();
                    w.cred(old);
                    if let Some(mut n) = match &new {
                        Some(n) => self.load(w, n).await?,
                        None => None,
                    } {
                        n.set_state(
                            OpState::Issued,
                            t,
                            &format!("device:{}", j.device),
                            "in use by its holder",
                        );
                        n.last_seen = Some(t);
                        w.cred(n);
                    }
                }
                self.end(w, j, JobState::Succeeded, "renewed").await?;
                // The old key is out of use: nobody may use it again.
                self.revoke(w, &cred, "replaced by its renewal").await?;
            }
            Operation::Rotate => {
                let Some((new_key, _secret)) = self.openers.remove(&j.id) else {
                    return self
                        .end(
                            w,
                            j,
                            JobState::Failed,
                            "no key was sealed for this job (restart?)",
                        )
                        .await;
                };
                if new_id != Some(new_key.as_str()) {
                    return self
                        .end(w, j, JobState::Failed, "the holder confirmed another key")
                        .await;
                }
                if let Some(mut old) = self.load(w, &cred).await? {
                    let nid = format!("key:{}:{new_key}", j.device);
                    let mut n = Credential::new(
                        nid.clone(),
                        Kind::SymmetricKey,
                        new_key.clone(),
                        j.device.clone(),
                        t,
                    );
                    n.server = old.server.clone();
                    n.vehicle = old.vehicle.clone();
                    n.ecu = old.ecu.clone();
                    n.issuer = self.deps.issuer.clone();
                    n.replaces = Some(old.id.clone());
                    n.last_seen = Some(t);
                    n.log(t, "issued", "credentials", "rotation, sealed to the holder");
                    old.replaced_by = Some(nid);
                    w.cred(old);
                    w.cred(n);
                }
                self.end(w, j, JobState::Succeeded, "rotated").await?;
            }
            Operation::Invalidate | Operation::Delete => {
                self.end(w, j, JobState::Succeeded, "deleted by the holder")
                    .await?;
                if self.revoke_at.contains_key(&cred) {
                    self.revoke(w, &cred, "invalidated; the holder deleted it")
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// End a job, and when it was the last of its operation, settle the credential.
    async fn end(
        &mut self,
        w: &mut Writes,
        mut j: Job,
        state: JobState,
        why: &str,
    ) -> Result<(), CredentialsError> {
        let t = now();
        j.state = state;
        j.updated_at = t;
        if j.result.is_none() || state != JobState::Succeeded {
            j.result = Some(why.to_string());
        }
        self.openers.remove(&j.id);
        self.stats
            .jobs_ended
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(job = %j.id, device = %j.device, credential = %j.credential, state = state.as_str(), why, "job ended");
        let cred = j.credential.clone();
        let op = j.op;
        w.job(j);
        let siblings: Vec<Job> = self
            .open
            .of_credential(&cred)
            .filter(|o| o.op == op)
            .map(|o| w.jobs.get(&o.id).cloned().unwrap_or_else(|| o.clone()))
            .collect();
        if siblings.iter().any(|s| !s.state.is_terminal()) {
            return Ok(());
        }
        if let Some(mut c) = self.load(w, &cred).await? {
            if siblings.iter().all(|s| s.state == JobState::Succeeded) {
                c.set_state(
                    OpState::done(op),
                    t,
                    "credentials",
                    format!("{} done", op.as_str()),
                );
            } else {
                let worst = siblings
                    .iter()
                    .find(|s| s.state != JobState::Succeeded)
                    .map(|s| {
                        format!(
                            "{} on {}: {}",
                            s.state.as_str(),
                            s.device,
                            s.result.clone().unwrap_or_default()
                        )
                    })
                    .unwrap_or_default();
                c.set_state(
                    OpState::Failed,
                    t,
                    "credentials",
                    format!("{} {worst}", op.as_str()),
                );
            }
            w.cred(c);
        }
        Ok(())
    }

    /// Retries, timeouts, due revocations and the renewal policy.
    async fn tick(&mut self, w: &mut Writes) -> Result<(), CredentialsError> {
        self.resync_after_drops().await;
        self.sent_at.retain(|_, at| at.elapsed() < SENT_AT_KEEP);
        let t = now();
        let due: Vec<String> = self
            .revoke_at
            .iter()
            .filter(|(_, at)| **at <= t)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.revoke(w, &id, "invalidated (grace over)").await?;
        }
        // Retries wait while the owner has a backlog (the holders' answers may be in it),
        // and at most RETRIES_PER_TICK go per tick.
        let backlog = self.tx.max_capacity() - self.tx.capacity() > BATCH;
        let mut retries = 0usize;
        let due: Vec<Job> = self
            .open
            .jobs
            .values()
            .filter(|j| t >= j.deadline || t >= j.next_attempt_at)
            .cloned()
            .collect();
        for j in due {
            if t < j.deadline && j.state != JobState::Queued {
                if backlog || retries >= RETRIES_PER_TICK {
                    continue;
                }
                retries += 1;
            }
            if j.state.is_terminal() {
                continue;
            }
            if t >= j.deadline {
                self.end(
                    w,
                    j,
                    JobState::TimedOut,
                    "the holder did not finish in time",
                )
                .await?;
                continue;
            }
            // Delivered but unanswered: again, later each time. Queued: as soon as the
            // holder is online (a device that does not check in still gets it).
            if t >= j.next_attempt_at {
                let id = j.id.clone();
                self.deliver(w, &id).await?;
            }
        }
        if self.cfg.renew_at > 0.0 && t - self.last_policy >= secs(self.cfg.sweep_every).max(1) {
            self.last_policy = t;
            self.policy(w, t).await?;
        }
        Ok(())
    }

    /// Renew our CA's certificates once `renew_at` of their validity has passed; restart
    /// revocations whose grace a restart forgot.
    async fn policy(&mut self, w: &mut Writes, t: i64) -> Result<(), CredentialsError> {
        // A validity is at most a few years: anything that ends within the longest one and
        // has passed its renewal point is due.
        let horizon = t.saturating_add(100 * 365 * 86_400);
        let candidates = self.inv.ending_before(horizon, 10_000).await?;
        for c in candidates {
            if c.kind != Kind::Certificate
                || c.op_state != OpState::Issued
                || c.revoked_at.is_some()
            {
                if matches!(
                    c.op_state,
                    OpState::InvalidationPending | OpState::DeletionPending
                ) && c.revoked_at.is_none()
                    && !self.revoke_at.contains_key(&c.id)
                    && self.revocable(&c)
                {
                    self.revoke_at.insert(c.id.clone(), t);
                }
                continue;
            }
            let (Some(nb), Some(na)) = (c.not_before, c.not_after) else {
                continue;
            };
            let due = nb as f64 + (na - nb) as f64 * self.cfg.renew_at;
            if (t as f64) < due || t >= na {
                continue;
            }
            let busy = self.open.of_credential(&c.id).next().is_some();
            if busy {
                continue;
            }
            let pct = (self.cfg.renew_at * 100.0).round();
            if let Err(e) = self
                .operate(
                    w,
                    &c.id,
                    Operation::Renew,
                    "policy",
                    &format!("{pct}% of its validity passed"),
                )
                .await
            {
                tracing::warn!(credential = %c.id, error = %e, "automatic renewal not started");
            }
        }
        Ok(())
    }
}
