//! One client connection: CONNECT checks, then a two-way MQTT proxy to the routing core that
//! enforces the ACL on every PUBLISH and SUBSCRIBE, and cuts the session when its
//! certificate is revoked or expires.

use super::mqtt::{self, MqttError};
use super::{dial_core, serial_of, Shared};
use crate::acl::DeniedPublish;
use crate::acl::{validate_identity, Rules};
use bytes::{Buf, Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Identity taken from a verified client certificate.
#[derive(Debug, Clone)]
pub struct CertIdentity {
    pub id: String,
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl CertIdentity {
    pub fn from_der(der: &[u8]) -> Result<CertIdentity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or("no common name")?;
        validate_identity(cn).map_err(|e| format!("common name {cn:?}: {e}"))?;
        Ok(CertIdentity {
            id: cn.to_string(),
            serial: serial_of(cert.raw_serial()),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

pub enum Peer {
    /// Came through TLS with a verified certificate.
    Device(CertIdentity),
    /// Came through the plain loopback listener.
    Local,
}

/// Why a connection ended (for logs).
#[derive(Debug)]
enum End {
    ClientClosed,
    CoreClosed,
    Shutdown,
    Revoked,
    Expired,
    Malformed(MqttError),
    Io(std::io::Error),
    DeniedPublish(String),
    UplinkRefused(String),
    TakenOver,
}

/// Messages from the client-side pump to the writer of the client socket.
enum Local {
    /// Bytes the front door answers itself (acks for dropped publishes, SUBACKs).
    Send(Bytes),
    /// A SUBSCRIBE went to the core with some filters removed: merge its SUBACK.
    /// `None` = take the core's code, `Some(c)` = our code for a refused filter.
    ExpectSuback(u16, Vec<Option<u8>>),
    /// Shutdown: keep forwarding what the core still sends until every QoS 1/2 publish the
    /// client already sent has its PUBACK/PUBREC and the core has been quiet for
    /// `DRAIN_QUIET`, then close cleanly.
    Drain,
}

/// Read buffers are sized to need: a read reserves `chunk` bytes, which starts at
/// `READ_MIN`, doubles (up to `READ_MAX`) while reads fill what was reserved, and falls back
/// to `READ_MIN` after a small read; an empty buffer that grew past twice the chunk is given
/// back. An idle connection (a PINGREQ now and then) so holds about `READ_MIN` per direction
/// instead of `READ_MAX`, and a burst still reads up to `READ_MAX` at a time.
const READ_MIN: usize = 1024;
const READ_MAX: usize = 16 * 1024;
/// How long a new connection waits for the previous session of its identity to end.
const TAKE_OVER_LIMIT: Duration = Duration::from_secs(5);
const DRAIN_QUIET: Duration = Duration::from_millis(50);

pub async fn serve<S>(stream: S, peer: Peer, shared: Arc<Shared>, cancel: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    shared
        .metrics
        .connections_open
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let end = session(stream, &peer, &shared, &cancel).await;
    shared
        .metrics
        .connections_open
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    match end {
        End::ClientClosed | End::CoreClosed => tracing::debug!(?end, "connection closed"),
        End::Shutdown => tracing::debug!("connection closed for shutdown"),
        End::TakenOver => {
            tracing::info!("session taken over by a new connection of the same identity")
        }
        End::Revoked => tracing::warn!("certificate revoked: session disconnected"),
        End::Expired => tracing::warn!("certificate expired: session disconnected"),
        End::Malformed(e) => {
            shared.metrics.inc(|m| &m.malformed_packets);
            tracing::warn!(error = %e, "malformed packet: connection closed");
        }
        End::Io(e) => tracing::debug!(error = %e, "connection I/O error"),
        End::DeniedPublish(t) => {
            tracing::warn!(topic = %t, "publish denied: connection closed (policy)")
        }
        End::UplinkRefused(e) => {
            tracing::warn!(error = %e, "uplink queue refused messages: connection closed unacknowledged")
        }
    }
}

async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<mqtt::Connect, End> {
    loop {
        if let Some((c, total)) = mqtt::next_connect(buf, max).map_err(End::Malformed)? {
            buf.advance(total);
            return Ok(c);
        }
        buf.reserve(READ_MIN);
        match rd.read_buf(buf).await {
            Ok(0) => return Err(End::ClientClosed),
            Ok(_) => {}
            Err(e) => return Err(End::Io(e)),
        }
    }
}

async fn session<S>(stream: S, peer: &Peer, shared: &Arc<Shared>, cancel: &CancellationToken) -> End
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &shared.cfg.limits;
    let (mut crd, mut cwr) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(READ_MIN);

    let connect = tokio::select! {
        _ = cancel.cancelled() => return End::Shutdown,
        r = tokio::time::timeout(limits.connect_timeout, read_connect(&mut crd, &mut buf, limits.max_packet_size)) => match r {
            Err(_) => {
                shared.metrics.inc(|m| &m.connect_timeouts);
                tracing::info!("no CONNECT in time: closed");
                return End::ClientClosed;
            }
            Ok(Err(End::Malformed(MqttError::Protocol { name, level }))) => {
                refuse(&mut cwr, mqtt::CONNACK_BAD_PROTOCOL).await;
                return End::Malformed(MqttError::Protocol { name, level });
            }
            Ok(Err(e)) => return e,
            Ok(Ok(c)) => c,
        },
    };

    // Identity: from the certificate for devices, from the client id for local clients.
    let (identity, rules, serial, not_after): (String, &Rules, Option<String>, Option<i64>) =
        match peer {
            Peer::Device(cert) => {
                if !connect.client_id.is_empty() && connect.client_id != cert.id {
                    shared.metrics.inc(|m| &m.connections_refused_identity);
                    tracing::warn!(client_id = %connect.client_id, "client id does not match certificate identity: refused");
                    refuse(&mut cwr, mqtt::CONNACK_ID_REJECTED).await;
                    return End::ClientClosed;
                }
                (
                    cert.id.clone(),
                    &shared.device_rules,
                    Some(cert.serial.clone()),
                    Some(cert.not_after),
                )
            }
            Peer::Local => {
                let id = if connect.client_id.is_empty() {
                    format!("local-{:016x}", rand::random::<u64>())
                } else {
                    connect.client_id.clone()
                };
                if validate_identity(&id).is_err() {
                    shared.metrics.inc(|m| &m.connections_refused_identity);
                    tracing::warn!(client_id = %id, "client id is not a valid identity: refused");
                    refuse(&mut cwr, mqtt::CONNACK_ID_REJECTED).await;
                    return End::ClientClosed;
                }
                (id, &shared.local_rules, None, None)
            }
        };
    if matches!(peer, Peer::Local) {
        // Devices carry their id in the `device` span already.
        tracing::Span::current().record("id", identity.as_str());
    }
    // The client id the routing core sees. Local clients live in their own namespace
    // (`local~X`; `~` is not an identity character), so `-i alice` on the plain listener can
    // never reach, take over or inherit the session state of the device `alice`.
    let core_id = match peer {
        Peer::Device(_) => identity.clone(),
        Peer::Local => super::local_core_id(&identity),
    };

    let mut connect = connect;
    if let Some(w) = &mut connect.will {
        if !rules.may_publish(&identity, &w.topic) {
            shared.metrics.inc(|m| &m.acl_denied_publish);
            tracing::warn!(device = %identity, topic = %w.topic, "will topic denied by ACL: refused");
            refuse(&mut cwr, mqtt::CONNACK_NOT_AUTHORIZED).await;
            return End::ClientClosed;
        }
        // A retained will is a retained message the core may store: counted like one now.
        if w.retain && !w.payload.is_empty() {
            let bytes = w.topic.len() + w.payload.len();
            if let Err(r) =
                shared
                    .bounds
                    .admit_retained(&shared.cfg.frontdoor, &core_id, &w.topic, bytes)
            {
                count_retain_refused(shared, r);
                tracing::warn!(topic = %w.topic, reason = r.label(), "retained will over the bound: will kept, retain flag cleared");
                w.retain = false;
            }
        }
    }
    if let Some(s) = &serial {
        if shared.revocations.borrow().revoked.contains(s) {
            shared.metrics.inc(|m| &m.revoked_disconnects);
            return End::Revoked;
        }
    }

    // One session per identity: end the previous one (and let the core forget it) first.
    let lease = tokio::select! {
        _ = cancel.cancelled() => return End::Shutdown,
        l = shared.sessions.take_over(&core_id, TAKE_OVER_LIMIT) => match l {
            Some(l) => l,
            None => {
                tracing::warn!(client = %identity, "previous session did not end in time: refused");
                refuse(&mut cwr, mqtt::CONNACK_ID_REJECTED).await;
                return End::ClientClosed;
            }
        },
    };
    let clean = connect.clean_session;
    shared.bounds.session_start(&core_id, clean);
    let end = connected_session(
        &mut crd,
        cwr,
        &mut buf,
        peer,
        shared,
        cancel,
        connect,
        identity.clone(),
        core_id.clone(),
        rules,
        serial,
        not_after,
        &lease.kicked,
    )
    .await;
    shared.bounds.session_end(&core_id, clean);
    drop(lease);
    shared.sessions.release(&core_id);
    end
}

#[allow(clippy::too_many_arguments)]
async fn connected_session<R, W>(
    mut crd: &mut R,
    cwr: W,
    buf: &mut BytesMut,
    _peer: &Peer,
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
    connect: mqtt::Connect,
    identity: String,
    core_id: String,
    rules: &Rules,
    serial: Option<String>,
    not_after: Option<i64>,
    kicked: &CancellationToken,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let limits = &shared.cfg.limits;
    let mut chunk = READ_MIN;
    let core = match dial_core(&shared.broker).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "routing core unreachable");
            return End::Io(e);
        }
    };
    let (brd, mut bwr) = core.into_split();
    let rewritten = mqtt::Connect {
        client_id: core_id.clone(),
        // rumqttd refuses keep-alive 0 ("never"); the longest interval is the closest.
        keep_alive: if connect.keep_alive == 0 {
            u16::MAX
        } else {
            connect.keep_alive
        },
        username: Some(core_id.clone()),
        password: Some(shared.broker.secret.as_bytes().to_vec()),
        ..connect
    };
    if let Err(e) = bwr.write_all(&mqtt::encode_connect(&rewritten)).await {
        return End::Io(e);
    }
    tracing::info!(client = %identity, core_id = %core_id, "session started");

    let (ltx, lrx) = mpsc::channel::<Local>(64);
    let metrics = shared.metrics.clone();
    // The core -> client direction runs as its own task: if both directions shared one task,
    // a client that stops reading (or a burst of locally answered packets) could leave each
    // side waiting for the other forever.
    // QoS 1/2 publishes forwarded to the core and not yet acknowledged (for the drain).
    let awaiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut downstream = AbortOnDrop(tokio::spawn(
        pump_to_client(brd, cwr, lrx, metrics, awaiting.clone())
            .instrument(tracing::Span::current()),
    ));

    let mut upstream_state = Upstream {
        identity: &identity,
        core_id: &core_id,
        filters: HashSet::new(),
        warn: super::bounds::WarnLimiter::new(&shared.cfg.frontdoor),
        rules,
        policy: shared.cfg.acl.on_denied_publish,
        max_packet: limits.max_packet_size,
        dropped_qos2: HashSet::new(),
        shared,
        ltx,
        awaiting,
    };
    // Packets the client sent right behind CONNECT (it need not wait for CONNACK) may have
    // arrived in the same read: handle them now, not only after the next read.
    if !buf.is_empty() {
        match upstream_state.process(buf).await {
            Ok(out) if !out.is_empty() => {
                if let Err(e) = bwr.write_all(&out).await {
                    return End::Io(e);
                }
            }
            Ok(_) => {}
            Err(end) => return end,
        }
    }
    let mut revocations = shared.revocations.clone();
    let expiry = not_after
        .map(|t| {
            let left = t - time::OffsetDateTime::now_utc().unix_timestamp();
            Duration::from_secs(left.max(0) as u64)
        })
        .unwrap_or(Duration::from_secs(100 * 365 * 24 * 3600));
    let expiry = tokio::time::sleep(expiry);
    tokio::pin!(expiry);

    loop {
        tokio::select! {
            biased;
            _ = kicked.cancelled() => {
                shared.metrics.inc(|m| &m.sessions_taken_over);
                return End::TakenOver;
            }
            _ = cancel.cancelled() => {
                // Drain: read nothing more from the client, let the core's answers to what
                // it already sent reach it, then close (TLS close_notify), within the grace.
                if upstream_state.ltx.send(Local::Drain).await.is_ok() {
                    let _ = tokio::time::timeout(shared.cfg.shutdown_grace, &mut downstream.0).await;
                }
                return End::Shutdown;
            }
            changed = revocations.changed(), if serial.is_some() => {
                if changed.is_ok() {
                    if let Some(s) = &serial {
                        if revocations.borrow_and_update().revoked.contains(s) {
                            shared.metrics.inc(|m| &m.revoked_disconnects);
                            return End::Revoked;
                        }
                    }
                }
            }
            _ = &mut expiry => {
                shared.metrics.inc(|m| &m.expired_disconnects);
                return End::Expired;
            }
            end = &mut downstream.0 => return end.unwrap_or(End::CoreClosed),
            r = read_more(&mut crd, buf, &mut chunk) => {
                match r {
                    Ok(0) => { let _ = bwr.shutdown().await; return End::ClientClosed; }
                    Ok(n) => shared.metrics.add(|m| &m.bytes_in, n as u64),
                    Err(e) => return End::Io(e),
                }
                let out = match upstream_state.process(buf).await {
                    Ok(out) => out,
                    Err(end) => return end,
                };
                if !out.is_empty() {
                    if let Err(e) = bwr.write_all(&out).await {
                        return End::Io(e);
                    }
                }
            }
        }
    }
}

fn count_retain_refused(shared: &Shared, r: super::bounds::RetainRefusal) {
    match r {
        super::bounds::RetainRefusal::Device => shared.metrics.inc(|m| &m.retain_refused_device),
        super::bounds::RetainRefusal::Total => shared.metrics.inc(|m| &m.retain_refused_bytes),
    }
}

/// Answer CONNECT with a refusal and close the stream cleanly (TLS close_notify included).
async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, code: u8) {
    let _ = w.write_all(&mqtt::connack(false, code)).await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

/// Read more into `buf`, sized by `chunk` (see `READ_MIN`). Cancel-safe: nothing is read
/// if the future is dropped before it completes.
async fn read_more<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    chunk: &mut usize,
) -> std::io::Result<usize> {
    if buf.is_empty() && buf.capacity() > *chunk * 2 {
        *buf = BytesMut::new();
    }
    buf.reserve(*chunk);
    let room = buf.capacity() - buf.len();
    let n = rd.read_buf(buf).await?;
    *chunk = if n >= room {
        (*chunk * 2).min(READ_MAX)
    } else if n < READ_MIN {
        READ_MIN
    } else {
        *chunk
    };
    Ok(n)
}

struct Upstream<'a> {
    identity: &'a str,
    /// The identity as the core knows it (`local~X` for local clients): what bounds count.
    core_id: &'a str,
    /// Filters subscribed on this connection (at most `frontdoor.max_filters_per_connection`).
    filters: HashSet<String>,
    /// Per-connection budget of warning lines.
    warn: super::bounds::WarnLimiter,
    rules: &'a Rules,
    policy: DeniedPublish,
    max_packet: usize,
    /// QoS 2 publishes we refused and acknowledged with PUBREC: their PUBREL is ours too.
    dropped_qos2: HashSet<u16>,
    shared: &'a Shared,
    ltx: mpsc::Sender<Local>,
    awaiting: Arc<std::sync::atomic::AtomicUsize>,
}

impl Upstream<'_> {
    /// Whether the next per-packet warning may be logged (else it is counted).
    fn warn_allowed(&mut self) -> bool {
        let ok = self.warn.allow();
        if !ok {
            self.shared.metrics.inc(|m| &m.log_suppressed);
        }
        ok
    }

    async fn local(&self, msg: Local) -> Result<(), End> {
        self.ltx.send(msg).await.map_err(|_| End::CoreClosed)
    }

    /// Take every complete frame out of `buf`; return the bytes to forward to the core.
    async fn process(&mut self, buf: &mut BytesMut) -> Result<BytesMut, End> {
        let mut out = BytesMut::new();
        // Uplink messages of this batch: made durable together before any is forwarded, so
        // the broker's PUBACK to the device means "on disk".
        let mut durable = Vec::new();
        // Framing and parsing are `mqtt::next_client_packet` (what fuzz/mqtt_stream drives).
        while let Some((packet, total)) =
            mqtt::next_client_packet(buf, self.max_packet).map_err(End::Malformed)?
        {
            match packet {
                mqtt::ClientPacket::Publish {
                    topic,
                    qos,
                    pid,
                    retain,
                    payload_at,
                } => {
                    if self.rules.may_publish(self.identity, &topic) {
                        self.shared.metrics.inc(|m| &m.messages_in);
                        let payload = buf.get(payload_at..total).unwrap_or(&[]);
                        let payload_len = payload.len();
                        let mut unretain = false;
                        let retain_changed = payload_len == 0 || retain;
                        if payload_len == 0 {
                            // The core clears the topic's retained message on any empty
                            // payload, retained or not.
                            self.shared.bounds.retained_cleared(&topic);
                        } else if retain {
                            if let Err(r) = self.shared.bounds.admit_retained(
                                &self.shared.cfg.frontdoor,
                                self.core_id,
                                &topic,
                                topic.len() + payload_len,
                            ) {
                                count_retain_refused(self.shared, r);
                                if self.warn_allowed() {
                                    tracing::warn!(client = %self.identity, %topic, reason = r.label(), "retained message over the bound: delivered, not retained");
                                }
                                unretain = true;
                            }
                        }
                        // Only a retained or an empty publish changes it: the plain telemetry
                        // path takes no bounds lock.
                        if retain_changed {
                            self.shared.metrics.retained_bytes.store(
                                self.shared.bounds.retained_bytes() as i64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                        }
                        if let Some(up) = &self.shared.uplink {
                            if up.mapping.up(&topic).is_some() {
                                durable.push(crate::uplink::queue::Message {
                                    device: self.identity.to_string(),
                                    payload: bytes::Bytes::copy_from_slice(payload),
                                    topic,
                                    qos,
                                    enqueued_ms: crate::uplink::queue::now_ms(),
                                });
                            }
                        }
                        if qos > 0 {
                            self.awaiting
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        let start = out.len();
                        out.extend_from_slice(&buf[..total]);
                        if unretain {
                            out[start] &= !1;
                        }
                    } else {
                        self.shared.metrics.inc(|m| &m.acl_denied_publish);
                        if self.warn_allowed() {
                            tracing::warn!(device = %self.identity, %topic, qos, "publish denied by ACL");
                        }
                        if self.policy == DeniedPublish::Disconnect {
                            return Err(End::DeniedPublish(topic));
                        }
                        match (qos, pid) {
                            (1, Some(p)) => {
                                self.local(Local::Send(mqtt::ack(mqtt::PUBACK, p))).await?
                            }
                            (2, Some(p)) => {
                                self.dropped_qos2.insert(p);
                                self.local(Local::Send(mqtt::ack(mqtt::PUBREC, p))).await?
                            }
                            _ => {}
                        }
                    }
                }
                mqtt::ClientPacket::Pubrel(pid) => {
                    if self.dropped_qos2.remove(&pid) {
                        self.local(Local::Send(mqtt::ack(mqtt::PUBCOMP, pid)))
                            .await?;
                    } else {
                        out.extend_from_slice(&buf[..total]);
                    }
                }
                mqtt::ClientPacket::Subscribe(sub) => {
                    let mut template = Vec::with_capacity(sub.filters.len());
                    let mut permitted = Vec::with_capacity(sub.filters.len());
                    for (i, (f, _)) in sub.filters.iter().enumerate() {
                        if self.rules.may_subscribe(self.identity, f) {
                            template.push(None);
                            permitted.push(i);
                        } else {
                            self.shared.metrics.inc(|m| &m.acl_denied_subscribe);
                            if self.warn_allowed() {
                                tracing::warn!(device = %self.identity, filter = %f, "subscribe denied by ACL");
                            }
                            template.push(Some(mqtt::SUBACK_FAILURE));
                        }
                    }
                    // Then the bounds: what this connection and identity may make the core hold.
                    let verdicts = self.shared.bounds.admit_filters(
                        &self.shared.cfg.frontdoor,
                        self.core_id,
                        &mut self.filters,
                        permitted.iter().map(|&i| sub.filters[i].0.as_str()),
                    );
                    let mut allowed = Vec::with_capacity(permitted.len());
                    for (i, v) in permitted.into_iter().zip(verdicts) {
                        match v {
                            Ok(()) => allowed.push(sub.filters[i].clone()),
                            Err(r) => {
                                let n = super::bounds::FilterRefusal::ALL
                                    .iter()
                                    .position(|x| *x == r)
                                    .unwrap_or(0);
                                self.shared.metrics.inc(|m| &m.subscribe_refused[n]);
                                if self.warn_allowed() {
                                    tracing::warn!(client = %self.identity, filter = %sub.filters[i].0, reason = r.label(), "subscribe refused: over a bound");
                                }
                                template[i] = Some(mqtt::SUBACK_FAILURE);
                            }
                        }
                    }
                    self.shared.metrics.core_filters.store(
                        self.shared.bounds.core_filters() as i64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    if allowed.is_empty() {
                        let codes: Vec<u8> = template
                            .iter()
                            .map(|c| c.unwrap_or(mqtt::SUBACK_FAILURE))
                            .collect();
                        self.local(Local::Send(mqtt::suback(sub.pid, &codes)))
                            .await?;
                    } else if allowed.len() == sub.filters.len() {
                        out.extend_from_slice(&buf[..total]);
                    } else {
                        self.local(Local::ExpectSuback(sub.pid, template)).await?;
                        out.extend_from_slice(&mqtt::encode_subscribe(&mqtt::Subscribe {
                            pid: sub.pid,
                            filters: allowed,
                        }));
                    }
                }
                mqtt::ClientPacket::Unsubscribe(_, filters) => {
                    self.shared
                        .bounds
                        .unsubscribe(self.core_id, &mut self.filters, &filters);
                    out.extend_from_slice(&buf[..total]);
                }
                mqtt::ClientPacket::Ack(..)
                | mqtt::ClientPacket::Pingreq
                | mqtt::ClientPacket::Disconnect => out.extend_from_slice(&buf[..total]),
            }
            buf.advance(total);
        }
        if let (Some(up), false) = (&self.shared.uplink, durable.is_empty()) {
            if let Err(e) = up.queue.append(durable).await {
                // MQTT 3.1.1 has no negative PUBACK: close without acknowledging, so the
                // device keeps the messages and sends them again later.
                return Err(End::UplinkRefused(e.to_string()));
            }
        }
        Ok(out)
    }
}

/// Core → client: forward frames, merge partial SUBACKs, interleave the front door's own
/// packets. Local packets are taken first so that a SUBACK template always arrives before
/// the SUBACK it applies to.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn pump_to_client<R, W>(
    mut core: R,
    mut client: W,
    mut local: mpsc::Receiver<Local>,
    metrics: Arc<crate::metrics::Metrics>,
    awaiting: Arc<std::sync::atomic::AtomicUsize>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_MIN);
    let mut chunk = READ_MIN;
    let mut pending: HashMap<u16, Vec<Option<u8>>> = HashMap::new();
    let mut local_open = true;
    let mut quiet_until: Option<tokio::time::Instant> = None;
    loop {
        let quiet = quiet_until.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            biased;
            msg = local.recv(), if local_open => match msg {
                Some(Local::Send(b)) => {
                    if let Err(e) = client.write_all(&b).await { return End::Io(e); }
                }
                Some(Local::ExpectSuback(pid, t)) => { pending.insert(pid, t); }
                Some(Local::Drain) => quiet_until = Some(tokio::time::Instant::now() + DRAIN_QUIET),
                None => local_open = false,
            },
            _ = tokio::time::sleep_until(quiet),
                if quiet_until.is_some() && awaiting.load(std::sync::atomic::Ordering::Relaxed) == 0 => {
                let _ = client.flush().await;
                let _ = client.shutdown().await;
                return End::Shutdown;
            }
            r = read_more(&mut core, &mut buf, &mut chunk) => {
                match r {
                    Ok(0) => { let _ = client.shutdown().await; return End::CoreClosed; }
                    Ok(_) => {}
                    Err(e) => return End::Io(e),
                }
                if quiet_until.is_some() {
                    quiet_until = Some(tokio::time::Instant::now() + DRAIN_QUIET);
                }
                let mut out = BytesMut::new();
                // The core is trusted; its frames are bounded by its own packet limit.
                loop {
                    let (ptype, hdr, total) = match mqtt::frame(&buf, usize::MAX) {
                        Ok(Some((t, _, h, n))) => (t, h, n),
                        Ok(None) => break,
                        Err(e) => return End::Malformed(e),
                    };
                    match ptype {
                        mqtt::PUBLISH => {
                            metrics.inc(|m| &m.messages_out);
                            out.extend_from_slice(&buf[..total]);
                        }
                        // Acknowledgements of the client's own QoS 1/2 publishes.
                        mqtt::PUBACK | mqtt::PUBREC => {
                            let _ = awaiting.fetch_update(
                                std::sync::atomic::Ordering::Relaxed,
                                std::sync::atomic::Ordering::Relaxed,
                                |n| n.checked_sub(1),
                            );
                            out.extend_from_slice(&buf[..total]);
                        }
                        mqtt::SUBACK if !pending.is_empty() => {
                            let body = &buf[hdr..total];
                            let pid = mqtt::parse_pid(body).unwrap_or(0);
                            match pending.remove(&pid) {
                                Some(template) => {
                                    let mut core_codes = body.get(2..).unwrap_or(&[]).iter().copied();
                                    let codes: Vec<u8> = template
                                        .into_iter()
                                        .map(|c| c.unwrap_or_else(|| core_codes.next().unwrap_or(mqtt::SUBACK_FAILURE)))
                                        .collect();
                                    out.extend_from_slice(&mqtt::suback(pid, &codes));
                                }
                                None => out.extend_from_slice(&buf[..total]),
                            }
                        }
                        _ => out.extend_from_slice(&buf[..total]),
                    }
                    buf.advance(total);
                }
                if !out.is_empty() {
                    metrics.add(|m| &m.bytes_out, out.len() as u64);
                    if let Err(e) = client.write_all(&out).await { return End::Io(e); }
                }
            }
        }
    }
}
