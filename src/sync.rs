//! Registry sync between gateways and the cloud (seed 004, S13 and S51), over the cloud MQTT
//! broker both already use.
//!
//! * **Up** (gateway → cloud). Every registration the gateway itself made (a device it
//!   onboarded, usually while offline) is put on the uplink's durable queue as one QoS 1
//!   message on `outpost/{gateway}/sync/up`. The queue keeps order, survives crashes and
//!   drains as soon as the link is back. A cursor (`sync.up.registry` in the store) records
//!   how far the registry has been queued; it is advanced only after the queue has flushed,
//!   so a crash in between queues an entry twice, never zero times.
//! * **Down** (cloud → gateway). The cloud publishes, QoS 1, on `outpost/{gateway}/sync/down`:
//!   the registrations it made (and those of other gateways), the revocations of its CA, and
//!   vouchers delegated to that gateway. The gateway's uplink session is persistent, so the
//!   broker keeps what is published while the gateway is away. A message is acknowledged
//!   only after it has been applied and flushed.
//! * **Apply** is idempotent (the registry is indexed by GUID, revocations by serial) and
//!   the same on both sides: a registration of a voucher GUID that is already registered
//!   under another new GUID is a conflict, resolved by [`crate::registry::conflict_loser`]
//!   (earliest onboarding wins); each side revokes the loser's certificate (with its own CA
//!   if it issued it, otherwise as a foreign revocation the front door enforces), so both
//!   converge whatever the order in which they learn things.

use crate::ca::{CaHandle, ForeignRevocation};
use crate::registry::{conflict_loser, Appended, Registry, RegistryEntry};
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Notify;

/// Topic suffixes under `outpost/{gateway}/`.
pub const UP: &str = "sync/up";
pub const DOWN: &str = "sync/down";
/// The local topic the gateway queues sync messages on (`$`: no client can publish it).
pub const LOCAL_UP: &str = "$outpost/sync/up";

pub fn up_topic(gateway: &str) -> String {
    format!("outpost/{gateway}/{UP}")
}

pub fn down_topic(gateway: &str) -> String {
    format!("outpost/{gateway}/{DOWN}")
}

/// The `[sync]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// Sync the device registry with the cloud. Gateway: over the uplink (needs
    /// `uplink.enabled` and the FDO owner). Cloud role: over its own connection to the
    /// cloud broker, configured in its `[uplink]` section.
    pub enabled: bool,
    /// Cloud role: gateways to send the registry to before they have been heard from.
    pub gateways: Vec<String>,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            enabled: true,
            gateways: Vec::new(),
        }
    }
}

impl SyncConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for g in &self.gateways {
            crate::acl::validate_identity(g)
                .map_err(|e| ("sync.gateways", format!("{g:?}: {e}")))?;
        }
        Ok(())
    }
}

/// One sync message (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SyncMsg {
    /// A device onboarded somewhere.
    Registration { entry: RegistryEntry },
    /// A certificate was revoked by its issuer.
    Revocation { rev: ForeignRevocation },
    /// A voucher extended to the receiving gateway's owner key (delegation).
    Voucher { voucher_pem: String },
}

impl SyncMsg {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<SyncMsg, SyncError> {
        if bytes.len() > MAX_MESSAGE {
            return Err(SyncError::Message(format!(
                "{} bytes (limit {MAX_MESSAGE})",
                bytes.len()
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| SyncError::Message(e.to_string()))
    }
}

/// How an issuer announces the revocation of a certificate it issued.
fn issuer_revocation(r: &crate::store::CertRecord, me: &str) -> ForeignRevocation {
    ForeignRevocation {
        serial: r.serial.clone(),
        device_id: r.device_id.clone(),
        issuer: me.to_string(),
        reason: "revoked by its issuer".into(),
        revoked_at: r.revoked_at.unwrap_or(0),
    }
}

/// Largest sync message accepted.
pub const MAX_MESSAGE: usize = 512 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("unreadable sync message: {0}")]
    Message(String),
    #[error("registry: {0}")]
    Registry(#[from] crate::fdo_wire::FdoError),
    #[error("CA: {0}")]
    Ca(#[from] crate::ca::CaError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Join(String),
}

/// What applying a message did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    pub new: bool,
    /// Certificates revoked because of it (serials).
    pub revoked: Vec<String>,
}

/// Applies sync messages to this side's registry, CA and vouchers.
#[derive(Clone)]
pub struct Applier {
    /// This side, as it appears in `registered_by` (`gateway <id>`, `cloud <id>`).
    pub me: String,
    pub registry: Arc<Registry>,
    pub ca: CaHandle,
    pub store: Store,
    pub data_dir: PathBuf,
    pub vouchers_changed: Option<Arc<Notify>>,
}

impl Applier {
    pub async fn apply(&self, msg: SyncMsg) -> Result<Applied, SyncError> {
        match msg {
            SyncMsg::Registration { entry } => self.registration(entry).await,
            SyncMsg::Revocation { rev } => {
                let revoked = self.revoke(&rev).await?;
                Ok(Applied {
                    new: revoked,
                    revoked: if revoked { vec![rev.serial] } else { vec![] },
                })
            }
            SyncMsg::Voucher { voucher_pem } => {
                let (store, dir) = (self.store.clone(), self.data_dir.clone());
                let r = tokio::task::spawn_blocking(move || {
                    crate::fdo::owner::import_voucher(&store, &dir, voucher_pem.as_bytes())
                })
                .await
                .map_err(|e| SyncError::Join(e.to_string()))?;
                match r {
                    Ok(i) => {
                        tracing::info!(guid = %i.guid, "sync: delegated voucher imported");
                        if let Some(n) = &self.vouchers_changed {
                            n.notify_one();
                        }
                        Ok(Applied {
                            new: !i.replaced,
                            revoked: vec![],
                        })
                    }
                    Err(e) => {
                        // Not ours (or broken): nothing to retry, so it is dropped, loudly.
                        tracing::warn!(error = %e, "sync: delegated voucher refused");
                        Ok(Applied::default())
                    }
                }
            }
        }
    }

    async fn registration(&self, entry: RegistryEntry) -> Result<Applied, SyncError> {
        let reg = self.registry.clone();
        let e = entry.clone();
        let (appended, others) = tokio::task::spawn_blocking(move || {
            let others: Vec<RegistryEntry> = reg
                .same_voucher(&e.old_guid)?
                .into_iter()
                .filter(|o| o.guid != e.guid)
                .collect();
            let a = reg.append(&e)?;
            Ok::<_, crate::fdo_wire::FdoError>((a, others))
        })
        .await
        .map_err(|e| SyncError::Join(e.to_string()))??;
        let mut out = Applied {
            new: matches!(appended, Appended::New(_)),
            revoked: vec![],
        };
        if out.new {
            tracing::info!(guid = %entry.guid, by = %entry.registered_by, "sync: registration recorded");
        }
        for other in &others {
            let loser = conflict_loser(other, &entry);
            let winner = if std::ptr::eq(loser, other) {
                &entry
            } else {
                other
            };
            tracing::warn!(
                voucher = %entry.old_guid,
                winner = %winner.guid, winner_by = %winner.registered_by,
                loser = %loser.guid, loser_by = %loser.registered_by,
                "sync: device registered twice; the earlier registration wins"
            );
            if let Some(serial) = &loser.cert_serial {
                let rev = ForeignRevocation {
                    serial: serial.clone(),
                    device_id: loser.guid.clone(),
                    issuer: loser.registered_by.clone(),
                    reason: format!("superseded by {} ({})", winner.guid, winner.registered_by),
                    revoked_at: time::OffsetDateTime::now_utc().unix_timestamp(),
                };
                if self.revoke(&rev).await? {
                    out.revoked.push(serial.clone());
                }
            }
        }
        Ok(out)
    }

    /// Revoke with our CA if it issued the serial, else as a foreign revocation.
    async fn revoke(&self, rev: &ForeignRevocation) -> Result<bool, SyncError> {
        let serial = rev.serial.to_ascii_lowercase();
        if self.ca.issued(&serial).await? {
            let recs = self.ca.revoke_serial(&serial).await?;
            Ok(recs.iter().any(|r| r.revoked_at.is_some()))
        } else {
            Ok(self.ca.revoke_foreign(rev.clone()).await?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_ones_are_errors() {
        let m = SyncMsg::Revocation {
            rev: ForeignRevocation {
                serial: "0a".into(),
                device_id: "d".into(),
                issuer: "cloud c".into(),
                reason: "r".into(),
                revoked_at: 1,
            },
        };
        assert_eq!(SyncMsg::decode(&m.encode()).unwrap(), m);
        assert!(SyncMsg::decode(b"{\"kind\":\"nope\"}").is_err());
        assert!(SyncMsg::decode(&vec![b' '; MAX_MESSAGE + 1]).is_err());
        assert_eq!(up_topic("gw1"), "outpost/gw1/sync/up");
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway side

/// A sync message from the cloud, acknowledged (by `client`) once applied.
pub use crate::uplink::Delivery;

const UP_CURSOR: &str = "sync.up.registry";
const SENT_REVOCATIONS: &str = "sync-sent-revocations";

/// The gateway's sync tasks: queue its own registrations and revocations for the cloud, and
/// apply what the cloud sends down.
pub fn start_gateway(
    applier: Applier,
    queue: crate::uplink::queue::QueueHandle,
    down: tokio::sync::mpsc::Receiver<Delivery>,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) {
    tracker.spawn(push_up(applier.clone(), queue, shutdown.clone()));
    tracker.spawn(apply_down(applier, down, shutdown));
}

fn queued(msg: &SyncMsg) -> crate::uplink::queue::Message {
    crate::uplink::queue::Message {
        device: String::new(),
        topic: LOCAL_UP.to_string(),
        payload: bytes::Bytes::from(msg.encode()),
        qos: 1,
        enqueued_ms: crate::uplink::queue::now_ms(),
    }
}

async fn push_up(
    a: Applier,
    queue: crate::uplink::queue::QueueHandle,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut changed = a.registry.changed();
    let mut revocations = a.ca.revocations();
    // The CA's records are scanned only when the revocations changed (and once at start),
    // not on every new registration.
    let mut scan_revocations = true;
    loop {
        match push_round(&a, &queue, scan_revocations).await {
            Ok(true) => continue,
            Ok(false) => scan_revocations = false,
            Err(e) => {
                tracing::warn!(error = %e, "sync: cannot queue for the cloud; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
                continue;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changed.changed() => {}
            _ = revocations.changed() => scan_revocations = true,
            _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => scan_revocations = true,
        }
    }
}

/// Queue what is new; `Ok(true)` if there may be more.
async fn push_round(
    a: &Applier,
    queue: &crate::uplink::queue::QueueHandle,
    scan_revocations: bool,
) -> Result<bool, SyncError> {
    let cursor = a.store.meta_u64(UP_CURSOR)?.unwrap_or(0);
    let reg = a.registry.clone();
    let batch = tokio::task::spawn_blocking(move || reg.read_from(cursor, 256))
        .await
        .map_err(|e| SyncError::Join(e.to_string()))??;
    if let Some((last, _)) = batch.last() {
        let msgs: Vec<_> = batch
            .iter()
            .filter(|(_, e)| e.registered_by == a.me)
            .map(|(_, e)| queued(&SyncMsg::Registration { entry: e.clone() }))
            .collect();
        let n = msgs.len();
        queue
            .append(msgs)
            .await
            .map_err(|e| SyncError::Message(e.to_string()))?;
        a.store.set_meta_u64(UP_CURSOR, last + 1)?;
        a.store.flush()?;
        if n > 0 {
            tracing::info!(registrations = n, "sync: queued for the cloud");
        }
        return Ok(batch.len() == 256);
    }
    if !scan_revocations {
        return Ok(false);
    }
    // Revocations this gateway's CA made (an operator's `ca revoke`, a conflict it lost).
    let sent = a.store.table(SENT_REVOCATIONS)?;
    let mut fresh = Vec::new();
    for r in a.ca.list().await? {
        if r.revoked_at.is_some() && !sent.contains(r.serial.as_bytes())? {
            fresh.push(issuer_revocation(&r, &a.me));
        }
    }
    if !fresh.is_empty() {
        let msgs = fresh
            .iter()
            .map(|rev| queued(&SyncMsg::Revocation { rev: rev.clone() }))
            .collect();
        queue
            .append(msgs)
            .await
            .map_err(|e| SyncError::Message(e.to_string()))?;
        for r in &fresh {
            sent.put(r.serial.as_bytes(), b"")?;
        }
        tracing::info!(revocations = fresh.len(), "sync: queued for the cloud");
    }
    Ok(false)
}

async fn apply_down(
    a: Applier,
    mut down: tokio::sync::mpsc::Receiver<Delivery>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = down.recv() => match d { Some(d) => d, None => return },
        };
        let ack = match SyncMsg::decode(&d.publish.payload) {
            Ok(m) => match a.apply(m).await {
                Ok(_) => true,
                Err(e) => {
                    // Not acknowledged: the broker sends it again after the next reconnect.
                    tracing::error!(error = %e, "sync: cannot apply a message from the cloud");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, topic = %d.publish.topic, "sync: dropping an unreadable message");
                true
            }
        };
        if ack {
            let _ = d.client.ack(&d.publish).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cloud side

const GATEWAYS: &str = "sync-gateways";
/// Vouchers delegated to gateways: key `{gateway}/{guid}`, value the extended voucher (PEM).
const DELEGATIONS: &str = "sync-delegations";

/// Delegate a voucher this owner holds to a gateway (issue 5's "delegated ahead of time"):
/// extend it with our owner key to the gateway's owner certificate `to_pem`, and queue it for
/// that gateway's `sync/down`. Returns the GUID.
pub fn delegate(
    store: &Store,
    data_dir: &std::path::Path,
    gateway: &str,
    voucher: &[u8],
    to_pem: &str,
) -> Result<crate::fdo_wire::Guid, SyncError> {
    use crate::fdo::owner;
    use crate::fdo_wire::{crypto, OwnershipVoucher, PublicKey};
    crate::acl::validate_identity(gateway)
        .map_err(|e| SyncError::Message(format!("gateway {gateway:?}: {e}")))?;
    let v = OwnershipVoucher::from_file_bytes(voucher)?;
    let chain = v.verify_chain()?;
    let ours = owner::find(data_dir, &chain.owner_key)?.ok_or_else(|| {
        SyncError::Message(format!(
            "the voucher's owner key {} is not one of ours: only the current owner can delegate",
            chain.owner_key.fingerprint().unwrap_or_default()
        ))
    })?;
    let (next_key, cert) = crypto::public_key_from_pem(to_pem)?;
    let next = PublicKey::encoded_like(&v.header().mfg_pub_key, &next_key, cert.as_deref());
    let extended = v.extend(&ours.key, &next)?;
    let guid = extended.guid();
    store.table(DELEGATIONS)?.put(
        format!("{gateway}/{}", guid.hex()).as_bytes(),
        extended.to_pem().as_bytes(),
    )?;
    let known = store.table(GATEWAYS)?;
    if !known.contains(gateway.as_bytes())? {
        known.put(gateway.as_bytes(), b"")?;
    }
    tracing::info!(%guid, gateway, "voucher delegated; it goes down with the next sync");
    Ok(guid)
}
const SENT_DOWN: &str = "sync-sent-down";

/// What one in-flight publish to a gateway stands for (PUBACKs come in publish order).
#[derive(Debug, Clone)]
enum Pending {
    Registration { gateway: String, seq: u64 },
    Sent { key: String },
}

/// The cloud's side: one MQTT session (persistent) to the cloud broker, subscribed to every
/// gateway's `sync/up`; pushes the registry and the CA's revocations down to every known
/// gateway (`gateways` plus every gateway heard from).
pub async fn run_cloud(
    cfg: crate::uplink::UplinkConfig,
    client_id: String,
    gateways: Vec<String>,
    a: Applier,
    wake: Arc<Notify>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use rumqttc::{Event, Outgoing, Packet, QoS};
    let tls = match crate::uplink::link::client_tls(&cfg) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "sync: cannot load the cloud broker TLS files; sync is off");
            return;
        }
    };
    let known = match a.store.table(GATEWAYS) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "sync: store");
            return;
        }
    };
    for g in &gateways {
        let _ = known.put(g.as_bytes(), b"");
    }
    let mut attempt = 0u32;
    loop {
        let (client, mut events, pump) =
            crate::uplink::link::cloud_session(&cfg, &client_id, tls.clone(), MAX_MESSAGE + 1024);
        let mut connected = false;
        let mut unmapped: std::collections::VecDeque<Pending> = Default::default();
        let mut inflight: std::collections::HashMap<u16, Pending> = Default::default();
        let mut changed = a.registry.changed();
        let mut revocations = a.ca.revocations();
        let mut dirty = true;
        let ended = loop {
            if connected && dirty && inflight.is_empty() && unmapped.is_empty() {
                dirty = false;
                match push_down(&a, &client, &known, &mut unmapped).await {
                    Ok(more) => dirty = more,
                    Err(e) => tracing::warn!(error = %e, "sync: push to gateways failed"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break true,
                _ = changed.changed() => dirty = true,
                _ = revocations.changed() => dirty = true,
                _ = wake.notified() => dirty = true,
                _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => dirty = true,
                ev = events.recv() => match ev {
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        connected = true;
                        attempt = 0;
                        dirty = true;
                        tracing::info!(host = %cfg.host, port = cfg.port, "sync: connected to the cloud broker");
                        let _ = client.try_subscribe(format!("outpost/+/{UP}"), QoS::AtLeastOnce);
                    }
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let gw = p.topic.strip_prefix("outpost/").and_then(|t| t.strip_suffix(&format!("/{UP}")));
                        if let Some(gw) = gw.filter(|g| !g.is_empty() && !g.contains('/')) {
                            if !known.contains(gw.as_bytes()).unwrap_or(true) {
                                let _ = known.put(gw.as_bytes(), b"");
                                tracing::info!(gateway = gw, "sync: new gateway");
                                dirty = true;
                            }
                        }
                        let ack = match SyncMsg::decode(&p.payload) {
                            Ok(m) => match a.apply(m).await {
                                Ok(r) => { if r.new { dirty = true; } true }
                                Err(e) => { tracing::error!(error = %e, "sync: cannot apply a gateway's message"); false }
                            },
                            Err(e) => { tracing::warn!(error = %e, topic = %p.topic, "sync: dropping an unreadable message"); true }
                        };
                        if ack {
                            let _ = client.ack(&p).await;
                        }
                    }
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        if let Some(p) = unmapped.pop_front() {
                            inflight.insert(pkid, p);
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        if let Some(p) = inflight.remove(&ack.pkid) {
                            let r = match &p {
                                Pending::Registration { gateway, seq } => a
                                    .store
                                    .set_meta_u64(&format!("sync.down.{gateway}"), seq + 1),
                                Pending::Sent { key } => a.store.table(SENT_DOWN).and_then(|t| t.put(key.as_bytes(), b"")),
                            };
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "sync: cannot record a delivery");
                            }
                            if inflight.is_empty() && unmapped.is_empty() {
                                let _ = a.store.flush();
                                dirty = true;
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        if connected {
                            tracing::warn!(error = %e, "sync: cloud broker connection lost");
                        } else {
                            tracing::debug!(error = %e, "sync: cannot connect to the cloud broker");
                        }
                        break false;
                    }
                    None => break false,
                },
            }
        };
        pump.abort();
        if ended {
            let _ = client.try_disconnect();
            return;
        }
        let cap = cfg
            .backoff_min
            .saturating_mul(1u32 << attempt.min(16))
            .min(cfg.backoff_max);
        attempt = attempt.saturating_add(1);
        let wait = {
            use rand::Rng;
            cap.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Publish what each known gateway has not acknowledged yet (a bounded batch). `Ok(true)`:
/// there may be more.
async fn push_down(
    a: &Applier,
    client: &rumqttc::AsyncClient,
    known: &crate::store::Table,
    unmapped: &mut std::collections::VecDeque<Pending>,
) -> Result<bool, SyncError> {
    const BATCH: usize = 256;
    let gateways: Vec<String> = known
        .entries()?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
        .collect();
    let sent = a.store.table(SENT_DOWN)?;
    let revoked: Vec<crate::store::CertRecord> =
        a.ca.list()
            .await?
            .into_iter()
            .filter(|r| r.revoked_at.is_some())
            .collect();
    let delegations: Vec<(String, String)> = a
        .store
        .table(DELEGATIONS)?
        .entries()?
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect();
    let mut more = false;
    let mut budget = BATCH;
    for gw in gateways {
        let topic = down_topic(&gw);
        let them = format!("gateway {gw}");
        let cursor = a.store.meta_u64(&format!("sync.down.{gw}"))?.unwrap_or(0);
        let reg = a.registry.clone();
        let batch = tokio::task::spawn_blocking(move || reg.read_from(cursor, BATCH))
            .await
            .map_err(|e| SyncError::Join(e.to_string()))??;
        let mut published = 0;
        for (seq, e) in &batch {
            if budget == 0 {
                return Ok(true);
            }
            // The gateway's own registrations need not go back.
            if e.registered_by == them {
                continue;
            }
            published += 1;
            let msg = SyncMsg::Registration { entry: e.clone() };
            let pending = Pending::Registration {
                gateway: gw.clone(),
                seq: *seq,
            };
            if !send(client, &topic, &msg, pending, unmapped).await {
                return Ok(true);
            }
            budget -= 1;
        }
        if let Some((last, _)) = batch.last() {
            // Nothing to send in this batch (all the gateway's own): move past it. Otherwise
            // the cursor moves with each PUBACK and the rest is skipped next round.
            if published == 0 {
                a.store.set_meta_u64(&format!("sync.down.{gw}"), last + 1)?;
            }
            if batch.len() == BATCH {
                more = true;
            }
        }
        for (k, pem) in delegations
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{gw}/")))
        {
            let key = format!("{gw}/vou/{}", &k[gw.len() + 1..]);
            if sent.contains(key.as_bytes())? {
                continue;
            }
            if budget == 0 {
                return Ok(true);
            }
            let msg = SyncMsg::Voucher {
                voucher_pem: pem.clone(),
            };
            if !send(client, &topic, &msg, Pending::Sent { key }, unmapped).await {
                return Ok(true);
            }
            budget -= 1;
        }
        for r in &revoked {
            let key = format!("{gw}/rev/{}", r.serial);
            if sent.contains(key.as_bytes())? {
                continue;
            }
            if budget == 0 {
                return Ok(true);
            }
            let msg = SyncMsg::Revocation {
                rev: issuer_revocation(r, &a.me),
            };
            if !send(client, &topic, &msg, Pending::Sent { key }, unmapped).await {
                return Ok(true);
            }
            budget -= 1;
        }
    }
    Ok(more)
}

/// Publish one message to a gateway, remembering what its PUBACK will stand for. `false`: the
/// client is gone (the rest waits for the next connection).
async fn send(
    client: &rumqttc::AsyncClient,
    topic: &str,
    msg: &SyncMsg,
    pending: Pending,
    unmapped: &mut std::collections::VecDeque<Pending>,
) -> bool {
    unmapped.push_back(pending);
    let sent = client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, msg.encode())
        .await
        .is_ok();
    if !sent {
        unmapped.pop_back();
    }
    sent
}
