//! One client connection: CONNECT checks, then a two-way MQTT proxy to the routing core that
//! enforces the ACL on every PUBLISH and SUBSCRIBE, and cuts the session when its
//! certificate is revoked or expires.
//!
//! One task per connection runs both directions: it never waits on one socket while the
//! other has something to say (writes are polled alongside reads, each direction is bounded
//! by its own buffer), and an idle connection holds no read or write buffer of its own.

use super::mqtt::{self, MqttError};
use super::{dial_core, serial_of, Shared};
use crate::acl::DeniedPublish;
use crate::acl::{validate_identity, Rules};
use bytes::{Buf, BytesMut};
use std::collections::{HashMap, HashSet};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

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
    /// The core closed the session after the client had sent it nothing for its keep-alive
    /// interval (the core allows 1.5 times that, [MQTT-3.1.2-24]).
    KeepAliveExpired,
    Shutdown,
    Revoked,
    Expired,
    Malformed(MqttError),
    Io(std::io::Error),
    DeniedPublish(String),
    UplinkRefused(String),
    /// The sessions store could not make a retained message, a subscription or a queued
    /// copy durable: closed unacknowledged, like `UplinkRefused`.
    SessionsRefused(String),
    TakenOver,
}

/// Buffers are sized to need and given back when empty: a read lands on the stack (up to
/// `READ_MAX` at a time) and only what is left of a partial frame is kept on the heap until
/// the rest arrives; what waits to be written is kept until it is written. An idle
/// connection (a PINGREQ now and then) so holds no buffer of its own between packets.
const READ_MAX: usize = 16 * 1024;
/// `READ_MIN` is what the CONNECT read reserves.
const READ_MIN: usize = 1024;
/// Stop reading the routing core while this much waits for a slow client...
const CLIENT_OUT_PAUSE_CORE: usize = READ_MAX;
/// ... and stop reading the client while this much waits for it to read (the core's frames
/// and the front door's own answers: acks of denied publishes, SUBACKs), so a client that
/// sends without reading cannot make its answers pile up.
const CLIENT_OUT_PAUSE_CLIENT: usize = 64 * 1024;
/// How long a new connection waits for the previous session of its identity to end.
const TAKE_OVER_LIMIT: Duration = Duration::from_secs(5);
/// The packet id of the SUBSCRIBE that gives a resumed session's filters back to the core.
const RESUBSCRIBE_PID: u16 = 1;
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
        End::ClientClosed => tracing::debug!(?end, "connection closed"),
        End::KeepAliveExpired => {
            tracing::info!("keep-alive expired (nothing from the client in 1.5 × its keep-alive): connection closed")
        }
        End::CoreClosed => {
            // The core ended a session the client had not ended (no DISCONNECT): never
            // expected (the core is only reached through here, and one session per
            // identity is enforced before it), so worth a warning, within a gateway-wide budget.
            shared.metrics.inc(|m| &m.core_closed);
            let allowed = shared
                .core_closed_warn
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allow();
            if allowed {
                tracing::warn!(
                    "routing core ended the session unasked (end=CoreClosed): connection closed"
                );
            } else {
                shared.metrics.inc(|m| &m.log_suppressed);
            }
        }
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
        End::SessionsRefused(e) => {
            tracing::warn!(error = %e, "sessions store refused a write: connection closed unacknowledged")
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

async fn session<S>(
    mut stream: S,
    peer: &Peer,
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &shared.cfg.limits;
    let mut buf = BytesMut::new();

    let connect = tokio::select! {
        _ = cancel.cancelled() => return End::Shutdown,
        r = tokio::time::timeout(limits.connect_timeout, read_connect(&mut stream, &mut buf, limits.max_packet_size)) => match r {
            Err(_) => {
                shared.metrics.inc(|m| &m.connect_timeouts);
                tracing::info!("no CONNECT in time: closed");
                return End::ClientClosed;
            }
            Ok(Err(End::Malformed(MqttError::Protocol { name, level }))) => {
                refuse(&mut stream, mqtt::CONNACK_BAD_PROTOCOL).await;
                return End::Malformed(MqttError::Protocol { name, level });
            }
            Ok(Err(e)) => return e,
            Ok(Ok(c)) => c,
        },
    };

    // [MQTT-3.1.3-8]: a zero-byte client id asks the server to assign one, and a session
    // under an id the client never learns could never be resumed: refused with CleanSession 0.
    if connect.client_id.is_empty() && !connect.clean_session {
        shared.metrics.inc(|m| &m.connections_refused_identity);
        tracing::info!("empty client id with CleanSession 0: refused (MQTT-3.1.3-8)");
        refuse(&mut stream, mqtt::CONNACK_ID_REJECTED).await;
        return End::ClientClosed;
    }

    // Identity: from the certificate for devices, from the client id for local clients; and
    // the client id the routing core sees. Local clients live in their own namespace
    // (`local~X`; `~` is not an identity character), so `-i alice` on the plain listener can
    // never reach, take over or inherit the session state of the device `alice`.
    #[allow(clippy::type_complexity)]
    let (identity, core_id, rules, serial, not_after): (
        String,
        String,
        &Rules,
        Option<String>,
        Option<i64>,
    ) = match peer {
        Peer::Device(cert) => {
            if !connect.client_id.is_empty() && connect.client_id != cert.id {
                shared.metrics.inc(|m| &m.connections_refused_identity);
                // Debug formatting: the id may hold control characters.
                tracing::warn!(client_id = ?connect.client_id, "client id does not match certificate identity: refused");
                refuse(&mut stream, mqtt::CONNACK_ID_REJECTED).await;
                return End::ClientClosed;
            }
            (
                cert.id.clone(),
                cert.id.clone(),
                &shared.device_rules,
                Some(cert.serial.clone()),
                Some(cert.not_after),
            )
        }
        Peer::Local if connect.client_id.is_empty() => {
            // CleanSession 1: an id of our own, in a part of the local namespace no
            // client id maps to.
            let tag = format!("{:016x}", rand::random::<u64>());
            let core_id = super::assigned_core_id(&tag);
            (
                format!("assigned-{tag}"),
                core_id,
                &shared.local_rules,
                None,
                None,
            )
        }
        Peer::Local => {
            let id = connect.client_id.clone();
            if let Err(e) = super::validate_local_id(&id) {
                shared.metrics.inc(|m| &m.connections_refused_identity);
                // Debug formatting: the id may hold control characters.
                tracing::warn!(client_id = ?id, error = %e, "client id refused");
                refuse(&mut stream, mqtt::CONNACK_ID_REJECTED).await;
                return End::ClientClosed;
            }
            let core_id = super::local_core_id(&id);
            (id, core_id, &shared.local_rules, None, None)
        }
    };
    if matches!(peer, Peer::Local) {
        // Devices carry their id in the `device` span already.
        tracing::Span::current().record("id", identity.as_str());
    }

    let mut connect = connect;
    if let Some(w) = &mut connect.will {
        if !rules.may_publish(&identity, &w.topic) {
            shared.metrics.inc(|m| &m.acl_denied_publish);
            tracing::warn!(device = %identity, topic = %w.topic, "will topic denied by ACL: refused");
            refuse(&mut stream, mqtt::CONNACK_NOT_AUTHORIZED).await;
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
                refuse(&mut stream, mqtt::CONNACK_ID_REJECTED).await;
                return End::ClientClosed;
            }
        },
    };
    let clean = connect.clean_session;
    // The persistent session, kept by the sessions capability (the core only ever gets clean
    // sessions); a clean CONNECT discards one the id had ([MQTT-3.1.2-6]).
    let attached = match &shared.durable {
        Some(d) => match d.connect(&core_id, clean).await {
            Ok(a) => a,
            Err(e) => {
                if matches!(e, crate::sessions::SessionsError::TooManySessions(_)) {
                    tracing::warn!(client = %identity, error = %e, "persistent session refused: CONNACK 3");
                } else {
                    tracing::error!(client = %identity, error = %e, "sessions store failed: CONNACK 3");
                }
                refuse(&mut stream, mqtt::CONNACK_SERVER_UNAVAILABLE).await;
                drop(lease);
                shared.sessions.release(&core_id);
                return End::ClientClosed;
            }
        },
        None => None,
    };
    let epoch = attached.as_ref().map(|a| a.epoch);
    let will = connect.will.clone();
    let graceful = std::sync::atomic::AtomicBool::new(false);
    shared.bounds.session_start(&core_id, clean);
    let end = connected_session(
        &mut stream,
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
        attached,
        &graceful,
    )
    .await;
    if let Some(d) = &shared.durable {
        if let Some(e) = epoch {
            d.detach(&core_id, e);
        }
        // No DISCONNECT: the core publishes the will now. Its persistent subscribers get
        // their copy from their queues (the core's QoS 1/2 copies to them are dropped), and
        // a retained will is kept like any retained message.
        if let (Some(w), false) = (&will, graceful.load(std::sync::atomic::Ordering::Relaxed)) {
            drop(d.publish_internal(
                &w.topic,
                &core_id,
                w.qos,
                w.retain,
                bytes::Bytes::copy_from_slice(&w.payload),
            ));
        }
    }
    shared.bounds.session_end(&core_id, clean);
    drop(lease);
    shared.sessions.release(&core_id);
    end
}

#[allow(clippy::too_many_arguments)]
async fn connected_session<S>(
    client: &mut S,
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
    attached: Option<crate::sessions::Attached>,
    graceful: &std::sync::atomic::AtomicBool,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &shared.cfg.limits;
    let mut core = match dial_core(&shared.broker).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "routing core unreachable");
            return End::Io(e);
        }
    };
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
        // A persistent session lives in the sessions capability, not in the core.
        clean_session: connect.clean_session || attached.is_some(),
        ..connect
    };
    let mut hello = BytesMut::from(&mqtt::encode_connect(&rewritten)[..]);
    // A resumed session's subscriptions go back into the core before anything the client
    // sends (so its SUBACK is the core's first, and swallowed).
    let resubscribe = attached
        .as_ref()
        .filter(|a| !a.subs.is_empty())
        .map(|a| a.subs.clone());
    if let Some(subs) = &resubscribe {
        hello.extend_from_slice(&mqtt::encode_subscribe(&mqtt::Subscribe {
            pid: RESUBSCRIBE_PID,
            filters: subs.clone(),
        }));
    }
    if let Err(e) = core.write_all(&hello).await {
        return End::Io(e);
    }
    drop(hello);
    let keep_alive = Duration::from_secs(rewritten.keep_alive.into());
    drop(rewritten);
    tracing::info!(client = %identity, core_id = %core_id, "session started");
    // When the client last sent something: the core ends a session that is quiet for 1.5 ×
    // its keep-alive, an expected end, not an unexpected `CoreClosed`.
    let mut last_from_client = tokio::time::Instant::now();

    let mut up = Upstream {
        identity: &identity,
        core_id: &core_id,
        filters: HashSet::new(),
        warn: super::bounds::WarnLimiter::new(&shared.cfg.frontdoor),
        rules,
        policy: shared.cfg.acl.on_denied_publish,
        max_packet: limits.max_packet_size,
        dropped_qos2: HashSet::new(),
        shared,
        to_client: BytesMut::new(),
        pending: HashMap::new(),
        awaiting: 0,
        disconnected: false,
        core_extra: BytesMut::new(),
        swallow_suback: resubscribe.as_ref().map(|_| RESUBSCRIBE_PID),
        connack_present: attached.as_ref().map(|a| a.present),
        core_qos2: HashSet::new(),
        persist: None,
        graceful,
    };
    let mut events = None;
    if let (Some(a), Some(d)) = (attached, &shared.durable) {
        if let Some(subs) = &resubscribe {
            // The bounds count a resumed session's filters again under its identity (after
            // a restart they start from nothing); they are not this connection's own.
            let _ = shared.bounds.admit_filters(
                &shared.cfg.frontdoor,
                &core_id,
                &mut HashSet::new(),
                subs.iter().map(|(f, _)| f.as_str()),
            );
        }
        events = Some(a.events);
        up.persist = Some(Persist {
            handle: d.clone(),
            epoch: a.epoch,
            inflight: HashMap::new(),
            after: 0,
            fetching: false,
            more: true,
            asked: 0,
            window: usize::from(shared.cfg.sessions_inflight.max(1)),
        });
    }
    // Client -> core bytes not yet written. The client is read only while this is empty, so
    // it holds at most one read's worth.
    let mut to_core = BytesMut::new();
    // Core -> client bytes the core sent that do not make a whole frame yet.
    let mut core_buf = BytesMut::new();
    // Packets the client sent right behind CONNECT (it need not wait for CONNACK) may have
    // arrived in the same read: handle them now, not only after the next read.
    // Batches waiting for their uplink flush before they may go to the core (in order).
    let mut held = HeldQueue::default();
    if !buf.is_empty() {
        match up.process(buf).await {
            Ok(batch) => {
                if let Some(out) = held.push(batch) {
                    to_core.extend_from_slice(&out);
                }
            }
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
    // Bytes handed to the client stream that may still sit in its (TLS) buffer: flush them.
    let mut client_dirty = false;
    // The core closed its side: forward what is left, then close.
    let mut core_open = true;
    // Shutdown: read nothing more from the client, let the core's answers to what it already
    // sent reach it, then close (TLS close_notify), within the grace: (grace ends, quiet
    // until). Quiet = no QoS 1/2 publish of the client awaiting its PUBACK/PUBREC and the core
    // silent for `DRAIN_QUIET`.
    let mut drain: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(30 * 365 * 24 * 3600);

    loop {
        // An idle connection keeps no buffer: give back what the last burst used.
        release_if_empty(buf);
        release_if_empty(&mut to_core);
        release_if_empty(&mut core_buf);
        release_if_empty(&mut up.to_client);
        if kicked.is_cancelled() {
            shared.metrics.inc(|m| &m.sessions_taken_over);
            return End::TakenOver;
        }
        up.maybe_fetch();
        if drain.is_none() && cancel.is_cancelled() {
            let now = tokio::time::Instant::now();
            drain = Some((now + shared.cfg.shutdown_grace, now + DRAIN_QUIET));
        }
        if !core_open && up.to_client.is_empty() && !client_dirty {
            let _ = client.shutdown().await;
            // The core closes a session when its client sends DISCONNECT, and when it has
            // been quiet for too long.
            return if up.disconnected {
                End::ClientClosed
            } else if last_from_client.elapsed() >= keep_alive {
                End::KeepAliveExpired
            } else {
                End::CoreClosed
            };
        }
        let (grace, quiet) = drain.unwrap_or((far, far));
        let quiet_now =
            drain.is_some() && up.awaiting == 0 && up.to_client.is_empty() && !client_dirty;
        let read_client = drain.is_none()
            && core_open
            && to_core.is_empty()
            && !held.is_full()
            && up.to_client.len() < CLIENT_OUT_PAUSE_CLIENT;
        let read_core = core_open && up.to_client.len() < CLIENT_OUT_PAUSE_CORE;
        // Not biased: neither direction may starve the other.
        tokio::select! {
            _ = kicked.cancelled() => {}
            _ = cancel.cancelled(), if drain.is_none() => {}
            _ = tokio::time::sleep_until(grace), if drain.is_some() => return End::Shutdown,
            _ = tokio::time::sleep_until(quiet), if quiet_now => {
                let _ = tokio::time::timeout_at(grace, async {
                    let _ = client.flush().await;
                    let _ = client.shutdown().await;
                })
                .await;
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
            io = client_io(client, &up.to_client, &mut client_dirty, buf, read_client) => match io {
                ClientIo::Wrote(n) => up.to_client.advance(n),
                ClientIo::Flushed => {}
                ClientIo::Read(0) => {
                    // What the client sent before it closed still goes to the core once
                    // durable; then the core sees the close.
                    let rest = async {
                        core.write_all(&to_core).await.map_err(End::Io)?;
                        flush_held(&mut held, &mut core).await
                    };
                    if let Err(end) = rest.await {
                        return end;
                    }
                    let _ = core.shutdown().await;
                    return End::ClientClosed;
                }
                ClientIo::Read(n) => {
                    last_from_client = tokio::time::Instant::now();
                    shared.metrics.add(|m| &m.bytes_in, n as u64);
                    match up.process(buf).await {
                        Ok(batch) => {
                            if let Some(out) = held.push(batch) {
                                to_core.extend_from_slice(&out);
                            }
                        }
                        Err(end) => return end,
                    }
                    up.take_core_extra(&mut to_core);
                    // Most writes to the core complete at once: no extra turn of the loop.
                    if let Err(e) = try_write_core(&core, &mut to_core) {
                        return End::Io(e);
                    }
                }
                ClientIo::Err(e) => return End::Io(e),
            },
            ev = next_event(&mut events) => match ev {
                Some(ev) => up.on_event(ev),
                // The owner let go of this session (it stopped): nothing more to deliver.
                None => events = None,
            },
            r = held.head_ready(), if to_core.is_empty() => {
                match r.and_then(|()| held.take_ready()) {
                    Ok(out) => to_core.extend_from_slice(&out),
                    Err(end) => return end,
                }
                if let Err(e) = try_write_core(&core, &mut to_core) {
                    return End::Io(e);
                }
            }
            w = core.writable(), if !to_core.is_empty() => {
                if let Err(e) = w.and_then(|()| try_write_core(&core, &mut to_core)) {
                    return End::Io(e);
                }
            }
            r = core.readable(), if read_core => {
                match r.and_then(|()| try_read_core(&core, &mut core_buf)) {
                    Ok(Some(0)) => core_open = false,
                    Ok(Some(_)) => {
                        if let Some((_, q)) = &mut drain {
                            *q = tokio::time::Instant::now() + DRAIN_QUIET;
                        }
                        if let Err(end) = up.forward_core_frames(&mut core_buf) {
                            return end;
                        }
                        up.take_core_extra(&mut to_core);
                        if let Err(e) = try_write_core(&core, &mut to_core) {
                            return End::Io(e);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return End::Io(e),
                }
            }
        }
    }
}

/// What one turn of the client side did.
enum ClientIo {
    /// Bytes of `to_client` written.
    Wrote(usize),
    /// Everything written has left the stream's buffer.
    Flushed,
    /// Bytes read into the buffer (0: the client closed).
    Read(usize),
    Err(std::io::Error),
}

/// Write to and flush the client stream, and read from it (when `read`), in one future, so
/// that neither waits for the other. A read lands on the stack and only its bytes are
/// appended to `buf`: nothing is allocated for a read that has not arrived.
fn client_io<'a, S: AsyncRead + AsyncWrite + Unpin>(
    client: &'a mut S,
    out: &'a [u8],
    dirty: &'a mut bool,
    buf: &'a mut BytesMut,
    read: bool,
) -> impl std::future::Future<Output = ClientIo> + 'a {
    std::future::poll_fn(move |cx| {
        if !out.is_empty() {
            match Pin::new(&mut *client).poll_write(cx, out) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(ClientIo::Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    *dirty = true;
                    return Poll::Ready(ClientIo::Wrote(n));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(ClientIo::Err(e)),
                Poll::Pending => {}
            }
        } else if *dirty {
            match Pin::new(&mut *client).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    *dirty = false;
                    return Poll::Ready(ClientIo::Flushed);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(ClientIo::Err(e)),
                Poll::Pending => {}
            }
        }
        if read {
            let mut tmp = [MaybeUninit::<u8>::uninit(); READ_MAX];
            let mut rb = ReadBuf::uninit(&mut tmp);
            match Pin::new(&mut *client).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    buf.extend_from_slice(rb.filled());
                    return Poll::Ready(ClientIo::Read(rb.filled().len()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(ClientIo::Err(e)),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
}

/// Write what the core will take now; the rest waits for the next `writable`.
fn try_write_core(core: &TcpStream, out: &mut BytesMut) -> std::io::Result<()> {
    while !out.is_empty() {
        match core.try_write(out) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => out.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read what the core has sent (on the stack, then appended to `buf`). `None`: nothing yet
/// (a spurious wake-up); `Some(0)`: the core closed.
fn try_read_core(core: &TcpStream, buf: &mut BytesMut) -> std::io::Result<Option<usize>> {
    let mut tmp = [0u8; READ_MAX];
    match core.try_read(&mut tmp) {
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            Ok(Some(n))
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

fn release_if_empty(b: &mut BytesMut) {
    if b.is_empty() && b.capacity() > 0 {
        *b = BytesMut::new();
    }
}

/// Forward every held batch to the core as its flush completes.
async fn flush_held<W: AsyncWrite + Unpin>(held: &mut HeldQueue, core: &mut W) -> Result<(), End> {
    while !held.0.is_empty() {
        held.head_ready().await?;
        let out = held.take_ready()?;
        if !out.is_empty() {
            core.write_all(&out).await.map_err(End::Io)?;
        }
    }
    Ok(())
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
    /// Bytes for the client not yet written: the core's frames and the front door's own
    /// answers (acks for dropped publishes, SUBACKs), in the order they were produced.
    to_client: BytesMut,
    /// A SUBSCRIBE went to the core with some filters removed: merge its SUBACK.
    /// `None` = take the core's code, `Some(c)` = our code for a refused filter.
    pending: HashMap<u16, Vec<Option<u8>>>,
    /// QoS 1/2 publishes forwarded to the core and not yet acknowledged (for the drain).
    awaiting: usize,
    /// The client sent DISCONNECT: the core closing the session next is its answer.
    disconnected: bool,
    /// Frames the front door sends the core itself (acks of the core's deliveries it took
    /// over), moved to the core's write buffer at a frame boundary.
    core_extra: BytesMut,
    /// The SUBACK of the resubscribe (a resumed session): the core's, not the client's.
    swallow_suback: Option<u16>,
    /// A resumed or new persistent session: the CONNACK's session-present flag is ours.
    connack_present: Option<bool>,
    /// QoS 2 deliveries of the core taken over (their PUBREL is answered here).
    core_qos2: HashSet<u16>,
    /// The persistent session this connection delivers, if any.
    persist: Option<Persist>,
    /// Set on the client's DISCONNECT (no will is published then).
    graceful: &'a std::sync::atomic::AtomicBool,
}

/// Delivery of a persistent session's queue: fetched from the sessions owner in order, at
/// most `window` in flight, each removed only when the client acknowledged it.
struct Persist {
    handle: crate::sessions::SessionsHandle,
    epoch: u64,
    /// Packet id -> sequence number of what the client has not acknowledged.
    inflight: HashMap<u16, u64>,
    /// The highest sequence number fetched.
    after: u64,
    fetching: bool,
    /// The owner may have more than we fetched.
    more: bool,
    asked: usize,
    window: usize,
}

async fn next_event(
    events: &mut Option<tokio::sync::mpsc::UnboundedReceiver<crate::sessions::ToConn>>,
) -> Option<crate::sessions::ToConn> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Upstream<'_> {
    fn take_core_extra(&mut self, to_core: &mut BytesMut) {
        if !self.core_extra.is_empty() {
            to_core.extend_from_slice(&self.core_extra);
            self.core_extra.clear();
        }
    }

    /// Ask the sessions owner for more of the queue when the window and the client allow.
    fn maybe_fetch(&mut self) {
        let Some(p) = self.persist.as_mut() else {
            return;
        };
        // Nothing goes to the client before its CONNACK ([MQTT-3.2.0-1] is the server's
        // first packet): the core's arrives after the session is attached.
        if p.fetching || !p.more || p.inflight.len() >= p.window || self.connack_present.is_some() {
            return;
        }
        if self.to_client.len() >= CLIENT_OUT_PAUSE_CORE {
            return;
        }
        let n = p.window - p.inflight.len();
        p.handle.fetch(self.core_id, p.epoch, p.after, n);
        p.fetching = true;
        p.more = false;
        p.asked = n;
    }

    fn on_event(&mut self, ev: crate::sessions::ToConn) {
        use crate::sessions::{packet_id, ToConn};
        let Some(p) = self.persist.as_mut() else {
            return;
        };
        match ev {
            ToConn::More => p.more = true,
            ToConn::Released(seq) => {
                let pid = packet_id(seq);
                if p.inflight.contains_key(&pid) {
                    self.to_client
                        .extend_from_slice(&mqtt::ack(mqtt::PUBREL, pid));
                }
            }
            ToConn::Batch(list) => {
                p.fetching = false;
                if list.len() >= p.asked {
                    p.more = true;
                }
                for d in list {
                    p.after = p.after.max(d.seq);
                    let pid = packet_id(d.seq);
                    if d.msg.released {
                        // Its PUBREC came before a restart: only the PUBREL is left.
                        self.to_client
                            .extend_from_slice(&mqtt::ack(mqtt::PUBREL, pid));
                        p.inflight.insert(pid, d.seq);
                        continue;
                    }
                    self.to_client.extend_from_slice(&mqtt::encode_publish(
                        &d.msg.topic,
                        d.msg.qos,
                        d.msg.retained,
                        d.dup,
                        pid,
                        &d.msg.payload,
                    ));
                    self.shared.metrics.inc(|m| &m.messages_out);
                    if d.msg.qos == 0 {
                        p.handle.acked(self.core_id, d.seq);
                    } else {
                        p.inflight.insert(pid, d.seq);
                    }
                }
            }
        }
    }

    /// The client's PUBACK, PUBREC or PUBCOMP of a delivery from its persistent session.
    fn on_client_ack(&mut self, ptype: u8, pid: u16) {
        let Some(p) = self.persist.as_mut() else {
            return;
        };
        match ptype {
            mqtt::PUBREC => {
                if let Some(&seq) = p.inflight.get(&pid) {
                    p.handle.release(self.core_id, p.epoch, seq);
                }
            }
            _ => {
                if let Some(seq) = p.inflight.remove(&pid) {
                    p.handle.acked(self.core_id, seq);
                }
            }
        }
    }

    /// Whether the next per-packet warning may be logged (else it is counted).
    fn warn_allowed(&mut self) -> bool {
        let ok = self.warn.allow();
        if !ok {
            self.shared.metrics.inc(|m| &m.log_suppressed);
        }
        ok
    }

    /// A packet the front door answers itself.
    fn local(&mut self, packet: &[u8]) {
        self.to_client.extend_from_slice(packet);
    }

    /// Take every complete frame out of `buf`; return the bytes to forward to the core.
    async fn process(&mut self, buf: &mut BytesMut) -> Result<Held, End> {
        let mut out = BytesMut::new();
        // Uplink messages of this batch: made durable together before any is forwarded, so
        // the broker's PUBACK to the device means "on disk".
        let mut durable = Vec::new();
        // The same for what the sessions capability must keep: retained messages, copies
        // queued for persistent sessions, their subscriptions.
        let mut kept: Vec<DurableRx> = Vec::new();
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
                        if let Some(d) = &self.shared.durable {
                            // The core clears a topic's retained message on any empty payload.
                            let keep_retained = payload_len == 0 || (retain && !unretain);
                            let targets = d.targets(&topic, qos);
                            if keep_retained || !targets.is_empty() {
                                let kept_payload = bytes::Bytes::copy_from_slice(payload);
                                if keep_retained {
                                    kept.push(DurableRx::Sessions(d.retain(
                                        &topic,
                                        self.core_id,
                                        qos,
                                        kept_payload.clone(),
                                    )));
                                }
                                if !targets.is_empty() {
                                    kept.push(DurableRx::Sessions(d.publish(
                                        targets,
                                        &topic,
                                        kept_payload,
                                    )));
                                }
                            }
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
                            self.awaiting += 1;
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
                            (1, Some(p)) => self.local(&mqtt::ack(mqtt::PUBACK, p)),
                            (2, Some(p)) => {
                                self.dropped_qos2.insert(p);
                                self.local(&mqtt::ack(mqtt::PUBREC, p))
                            }
                            _ => {}
                        }
                    }
                }
                mqtt::ClientPacket::Pubrel(pid) => {
                    if self.dropped_qos2.remove(&pid) {
                        self.local(&mqtt::ack(mqtt::PUBCOMP, pid));
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
                    if let (Some(d), Some(_), false) =
                        (&self.shared.durable, &self.persist, allowed.is_empty())
                    {
                        kept.push(DurableRx::Sessions(
                            d.subscribe(self.core_id, allowed.clone()),
                        ));
                    }
                    if allowed.is_empty() {
                        let codes: Vec<u8> = template
                            .iter()
                            .map(|c| c.unwrap_or(mqtt::SUBACK_FAILURE))
                            .collect();
                        self.local(&mqtt::suback(sub.pid, &codes));
                    } else if allowed.len() == sub.filters.len() {
                        out.extend_from_slice(&buf[..total]);
                    } else {
                        self.pending.insert(sub.pid, template);
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
                    if let (Some(d), Some(_)) = (&self.shared.durable, &self.persist) {
                        kept.push(DurableRx::Sessions(d.unsubscribe(self.core_id, filters)));
                    }
                    out.extend_from_slice(&buf[..total]);
                }
                // A persistent session's deliveries are the front door's, not the core's.
                mqtt::ClientPacket::Ack(ptype, pid) if self.persist.is_some() => {
                    self.on_client_ack(ptype, pid)
                }
                mqtt::ClientPacket::Ack(..) | mqtt::ClientPacket::Pingreq => {
                    out.extend_from_slice(&buf[..total])
                }
                mqtt::ClientPacket::Disconnect => {
                    self.disconnected = true;
                    self.graceful
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    out.extend_from_slice(&buf[..total]);
                }
            }
            buf.advance(total);
        }
        if let (Some(up), false) = (&self.shared.uplink, durable.is_empty()) {
            // Submitted, not awaited: the connection goes on reading while the group commit
            // runs, so the next batches join the same or an overlapping flush.
            match up.queue.submit(durable).await {
                Ok(rx) => kept.push(DurableRx::Uplink(rx)),
                Err(e) => return Err(End::UplinkRefused(e.to_string())),
            }
        }
        Ok(Held { durable: kept, out })
    }
}

/// Bytes for the core held back until the uplink messages among them (or in an earlier
/// batch) are durable: the core's PUBACK to the device must mean "on disk". Batches leave in
/// the order they were read, so nothing overtakes a publish that waits for its flush.
struct Held {
    /// The answers this batch waits for: the uplink queue's and the sessions store's.
    durable: Vec<DurableRx>,
    out: BytesMut,
}

/// One store's answer that a batch's writes are durable.
enum DurableRx {
    Uplink(tokio::sync::oneshot::Receiver<Result<(), crate::uplink::queue::QueueError>>),
    Sessions(crate::sessions::Durable),
}

/// The verdict of one answer (`Err(())`: the store's owner is gone). MQTT 3.1.1 has no
/// negative PUBACK: a refusal closes the connection without acknowledging, so the device
/// keeps the messages and sends them again later.
fn settle<E: std::fmt::Display>(
    r: Result<Result<(), E>, ()>,
    refused: fn(String) -> End,
    owner: &str,
) -> Result<(), End> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(refused(e.to_string())),
        Err(()) => Err(refused(format!("{owner} stopped"))),
    }
}

impl DurableRx {
    /// `None` while not answered yet.
    fn try_done(&mut self) -> Option<Result<(), End>> {
        use tokio::sync::oneshot::error::TryRecvError;
        fn answered<T>(r: Result<T, TryRecvError>) -> Option<Result<T, ()>> {
            match r {
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Closed) => Some(Err(())),
                Ok(v) => Some(Ok(v)),
            }
        }
        match self {
            DurableRx::Uplink(rx) => {
                answered(rx.try_recv()).map(|r| settle(r, End::UplinkRefused, "uplink queue"))
            }
            DurableRx::Sessions(rx) => {
                answered(rx.try_recv()).map(|r| settle(r, End::SessionsRefused, "sessions owner"))
            }
        }
    }

    async fn done(&mut self) -> Result<(), End> {
        match self {
            DurableRx::Uplink(rx) => {
                settle(rx.await.map_err(|_| ()), End::UplinkRefused, "uplink queue")
            }
            DurableRx::Sessions(rx) => settle(
                rx.await.map_err(|_| ()),
                End::SessionsRefused,
                "sessions owner",
            ),
        }
    }
}

/// Batches read from the client, waiting for their flush (at most [`MAX_HELD`]).
#[derive(Default)]
struct HeldQueue(std::collections::VecDeque<Held>);

/// Batches a connection may have waiting for the group commit before it stops reading from
/// the client (each is one read of at most `READ_MAX` bytes).
const MAX_HELD: usize = 64;

impl HeldQueue {
    fn is_full(&self) -> bool {
        self.0.len() >= MAX_HELD
    }

    /// Queue `held` behind the earlier batches; returns the bytes that may go to the core now.
    fn push(&mut self, held: Held) -> Option<BytesMut> {
        if self.0.is_empty() && held.durable.is_empty() {
            return (!held.out.is_empty()).then_some(held.out);
        }
        self.0.push_back(held);
        None
    }

    /// Wait until the oldest batch is durable (pending forever when none waits). Cancel-safe.
    async fn head_ready(&mut self) -> Result<(), End> {
        let Some(head) = self.0.front_mut() else {
            return std::future::pending().await;
        };
        // Cancel-safe: an answered receiver is removed before the next await.
        while let Some(rx) = head.durable.last_mut() {
            rx.done().await?;
            head.durable.pop();
        }
        Ok(())
    }

    /// The bytes of every batch at the front whose flush is done (in order).
    fn take_ready(&mut self) -> Result<BytesMut, End> {
        let mut out = BytesMut::new();
        'batches: while let Some(head) = self.0.front_mut() {
            while let Some(rx) = head.durable.last_mut() {
                match rx.try_done() {
                    Some(Ok(())) => {
                        head.durable.pop();
                    }
                    Some(Err(end)) => return Err(end),
                    None => break 'batches,
                }
            }
            if let Some(h) = self.0.pop_front() {
                out.unsplit(h.out);
            }
        }
        Ok(out)
    }
}

impl Upstream<'_> {
    /// Core → client: take every complete frame out of `buf` into `to_client`, merging
    /// partial SUBACKs. A SUBACK template is always in `pending` before the SUBSCRIBE it
    /// applies to went to the core.
    fn forward_core_frames(&mut self, buf: &mut BytesMut) -> Result<(), End> {
        let metrics = &self.shared.metrics;
        let start = self.to_client.len();
        // The core is trusted; its frames are bounded by its own packet limit.
        loop {
            let (ptype, hdr, total) = match mqtt::frame(buf, usize::MAX) {
                Ok(Some((t, _, h, n))) => (t, h, n),
                Ok(None) => break,
                Err(e) => return Err(End::Malformed(e)),
            };
            let out = &mut self.to_client;
            match ptype {
                mqtt::CONNACK if self.connack_present.is_some() => {
                    let present = self.connack_present.take().unwrap_or(false);
                    let code = buf.get(hdr + 1).copied().unwrap_or(0);
                    out.extend_from_slice(&mqtt::connack(present && code == 0, code));
                }
                // A persistent session gets its QoS 1/2 messages and its retained ones from
                // its durable queue: the core's copies are acknowledged here and dropped.
                mqtt::PUBLISH if self.persist.is_some() && (buf[0] & 0b0111) != 0 => {
                    let flags = buf[0] & 0x0f;
                    match mqtt::parse_publish(flags, &buf[hdr..total]) {
                        Ok((_, 1, Some(pid))) => self
                            .core_extra
                            .extend_from_slice(&mqtt::ack(mqtt::PUBACK, pid)),
                        Ok((_, 2, Some(pid))) => {
                            self.core_qos2.insert(pid);
                            self.core_extra
                                .extend_from_slice(&mqtt::ack(mqtt::PUBREC, pid));
                        }
                        Ok(_) => {}
                        Err(e) => return Err(End::Malformed(e)),
                    }
                }
                mqtt::PUBREL if !self.core_qos2.is_empty() => {
                    let pid = mqtt::parse_pid(&buf[hdr..total]).unwrap_or(0);
                    if self.core_qos2.remove(&pid) {
                        self.core_extra
                            .extend_from_slice(&mqtt::ack(mqtt::PUBCOMP, pid));
                    } else {
                        out.extend_from_slice(&buf[..total]);
                    }
                }
                mqtt::SUBACK
                    if self.swallow_suback.is_some()
                        && mqtt::parse_pid(&buf[hdr..total]).ok() == self.swallow_suback =>
                {
                    self.swallow_suback = None;
                }
                mqtt::PUBLISH => {
                    metrics.inc(|m| &m.messages_out);
                    out.extend_from_slice(&buf[..total]);
                }
                // Acknowledgements of the client's own QoS 1/2 publishes.
                mqtt::PUBACK | mqtt::PUBREC => {
                    self.awaiting = self.awaiting.saturating_sub(1);
                    out.extend_from_slice(&buf[..total]);
                }
                mqtt::SUBACK if !self.pending.is_empty() => {
                    let body = &buf[hdr..total];
                    let pid = mqtt::parse_pid(body).unwrap_or(0);
                    match self.pending.remove(&pid) {
                        Some(template) => {
                            let mut core_codes = body.get(2..).unwrap_or(&[]).iter().copied();
                            let codes: Vec<u8> = template
                                .into_iter()
                                .map(|c| {
                                    c.unwrap_or_else(|| {
                                        core_codes.next().unwrap_or(mqtt::SUBACK_FAILURE)
                                    })
                                })
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
        let n = self.to_client.len() - start;
        if n > 0 {
            metrics.add(|m| &m.bytes_out, n as u64);
        }
        Ok(())
    }
}
