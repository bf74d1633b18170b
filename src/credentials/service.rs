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
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The owner's client id on the routing core.
pub const CLIENT_ID: &str = "outpost~credentials";
/// Most commands applied in one write.
pub const BATCH: usize = 256;
/// Most open jobs one holder may have (a flood of operations is refused beyond it).
pub const MAX_OPEN_JOBS_PER_DEVICE: usize = 64;

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
    /// A holder's check-in.
    Report {
        device: String,
        report: Report,
    },
    /// A holder's progress on one of its jobs.
    Update {
        device: String,
        update: JobUpdate,
    },
    Ca(CaEvent),
    /// The CA's events were missed: reconcile every certificate record.
    Reconcile(Vec<CertRecord>),
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
            client.clone(),
            eventloop,
            tx.clone(),
            stats.clone(),
            shutdown.clone(),
        ));
        client
    });
    tracker.spawn(follow_ca(deps.ca.clone(), tx.clone(), shutdown.clone()));
    let owner = Owner {
        cfg,
        inv: inventory,
        deps,
        client,
        tx,
        stats,
        open: HashMap::new(),
        revoke_at: HashMap::new(),
        openers: HashMap::new(),
        last_policy: 0,
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
                        Ok(report) => Command::Report { device, report },
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

/// What one batch changed, written at once before anything is said.
#[derive(Default)]
struct Writes {
    creds: HashMap<String, Credential>,
    jobs: HashMap<String, Job>,
    /// (device, command) to publish after the write.
    out: Vec<(String, ToDevice)>,
    replies: Vec<Box<dyn FnOnce(Result<(), String>) + Send + Sync>>,
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

struct Owner<S> {
    cfg: CredentialsConfig,
    inv: Arc<S>,
    deps: Deps,
    client: Option<AsyncClient>,
    tx: mpsc::Sender<Command>,
    stats: Arc<CredentialStats>,
    /// Every job not ended (loaded at start), by id.
    open: HashMap<String, Job>,
    /// Credentials to revoke at a time (an invalidation's grace), by id.
    revoke_at: HashMap<String, i64>,
    /// Rotations in flight: the new key, until the holder confirms (never written down).
    openers: HashMap<String, (String, Vec<u8>)>,
    last_policy: i64,
}

impl<S: InventoryStore> Owner<S> {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        match self.inv.open_jobs(100_000).await {
            Ok(jobs) => {
                for j in jobs {
                    self.open.insert(j.id.clone(), j);
                }
            }
            Err(e) => tracing::error!(error = %e, "credentials: cannot load the open jobs"),
        }
        tracing::info!(open_jobs = self.open.len(), "credentials service up");
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
        let result = if w.creds.is_empty() && w.jobs.is_empty() {
            Ok(())
        } else {
            let jobs: Vec<Job> = w.jobs.values().cloned().collect();
            let creds: Vec<Credential> = w.creds.values().cloned().collect();
            self.stats.writes.fetch_add(1, Relaxed);
            self.inv
                .put_jobs(&jobs, &creds)
                .await
                .map_err(|e| e.to_string())
        };
        match &result {
            Ok(()) => {
                for j in w.jobs.into_values() {
                    if j.state.is_terminal() {
                        self.open.remove(&j.id);
                    } else {
                        self.open.insert(j.id.clone(), j);
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
                    self.open = jobs.into_iter().map(|j| (j.id.clone(), j)).collect();
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
            Command::Report { device, report } => self.report(w, &device, report).await?,
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
            .values()
            .chain(w.jobs.values())
            .any(|j| j.credential == id && !j.state.is_terminal());
        if busy {
            return Err(CredentialsError::NotAllowed(format!(
                "{id} has a job running: wait for it or cancel it"
            )));
        }
        let t = now();
        let mut holders = vec![c.holder.clone()];
        for d in &c.seen_by {
            if !holders.contains(d) {
                holders.push(d.clone());
            }
        }
        let mut jobs = Vec::new();
        for device in holders {
            let open_for = self.open.values().filter(|j| j.device == device).count();
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
            self.open.insert(j.id.clone(), j.clone());
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
                    if !self
                        .open
                        .values()
                        .any(|j| j.credential == id && !j.state.is_terminal())
                    {
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
        // but not answered: the holder may have missed it while reconnecting).
        let mine: Vec<String> = self
            .open
            .values()
            .filter(|j| j.device == device && !j.state.is_terminal())
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
            .values()
            .filter(|o| o.credential == cred && o.op == op)
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
        let open: Vec<Job> = self.open.values().cloned().collect();
        for j in open {
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
            if j.state != JobState::Queued && t >= j.next_attempt_at {
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
            let busy = self.open.values().any(|j| j.credential == c.id);
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
