//! The cloud session task: rumqttc to the cloud broker, the detection state machine, the
//! queue drain, cloud-to-device delivery and the retained state topic.

use super::detect::{tls_probe, Hysteresis, LinkState};
use super::mapping::Mapping;
use super::queue::{now_ms, MessageRef, QueueHandle};
use super::{UplinkConfig, UplinkError, UplinkStats, STATE_TOPIC};
use crate::broker::BrokerLink;
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration,
    Transport,
};
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The events of a cloud-side service's session (see [`cloud_session`]).
pub type CloudEvents =
    tokio::sync::mpsc::UnboundedReceiver<Result<rumqttc::Event, rumqttc::ConnectionError>>;

/// A cloud-side service's session to the cloud broker (the registry sync, the fleet server):
/// `client_id` over the `[uplink]` host, port and TLS, persistent (clean session off),
/// manually acknowledged, 100 in flight, packets up to `max_packet`. Its event loop is polled
/// by a task of its own into an unbounded channel: the pump must never stop polling, or a
/// caller waiting in `ack`/`publish` for room in the client's request queue (which only
/// polling drains) would wait forever; what piles up is bounded by what the broker delivers
/// within the inflight window. The task ends at the first connection error (after sending
/// it); reconnecting is the caller's.
pub fn cloud_session(
    cfg: &UplinkConfig,
    client_id: &str,
    tls: Arc<rustls::ClientConfig>,
    max_packet: usize,
) -> (AsyncClient, CloudEvents, tokio::task::JoinHandle<()>) {
    let mut mo = MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
    mo.set_clean_session(false);
    mo.set_keep_alive(cfg.keep_alive.max(Duration::from_secs(1)));
    mo.set_manual_acks(true);
    mo.set_inflight(100);
    mo.set_max_packet_size(max_packet, max_packet);
    mo.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (client, mut el) = AsyncClient::new(mo, 512);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_connection_timeout(cfg.connect_timeout.as_secs().max(1));
    el.set_network_options(net);
    let (ev_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        loop {
            let ev = el.poll().await;
            let failed = ev.is_err();
            if ev_tx.send(ev).is_err() || failed {
                return;
            }
        }
    });
    (client, events, pump)
}

/// Build the rustls client config for the cloud (ring provider, client certificate).
pub fn client_tls(cfg: &UplinkConfig) -> Result<Arc<rustls::ClientConfig>, UplinkError> {
    let read = |p: &std::path::PathBuf| {
        std::fs::read(p).map_err(|e| UplinkError::TlsFile {
            path: p.clone(),
            reason: e.to_string(),
        })
    };
    let bad = |p: &std::path::PathBuf, r: &str| UplinkError::TlsFile {
        path: p.clone(),
        reason: r.into(),
    };
    let mut roots = rustls::RootCertStore::empty();
    if cfg.enabled {
        for c in rustls_pemfile::certs(&mut read(&cfg.ca_file)?.as_slice()) {
            roots.add(c.map_err(|e| bad(&cfg.ca_file, &e.to_string()))?)?;
        }
        if roots.is_empty() {
            return Err(bad(&cfg.ca_file, "no PEM certificate"));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    let cfg = if cfg.enabled {
        let chain: Vec<_> = rustls_pemfile::certs(&mut read(&cfg.cert_file)?.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&cfg.cert_file, &e.to_string()))?;
        let key = rustls_pemfile::private_key(&mut read(&cfg.key_file)?.as_slice())
            .map_err(|e| bad(&cfg.key_file, &e.to_string()))?
            .ok_or_else(|| bad(&cfg.key_file, "no private key"))?;
        builder.with_client_auth_cert(chain, key)?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(cfg))
}

/// Exponential backoff with full jitter.
struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let cap = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let ms = cap.as_millis().max(1) as u64;
        Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
    }
    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// One connection attempt's rumqttc client, its event loop running in its own task (so
/// that this loop's timers never cancel a connection attempt), and the events it reports.
///
/// Every (re)connection gets a fresh `Link`: requests still queued in an old client die
/// with it, so packet ids always map back to the queue entries exactly, and everything
/// unacknowledged is sent again from the durable queue (the queue, not rumqttc, is the
/// source of truth). The broker session itself persists (`clean_session = false`), which
/// keeps cloud-to-device subscriptions and queued commands across reconnects.
struct Link {
    client: AsyncClient,
    events: tokio::sync::mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Link {
    fn start(opts: MqttOptions, connect_timeout: Duration, cap: usize) -> Link {
        let (client, mut el) = AsyncClient::new(opts, cap);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_connection_timeout(connect_timeout.as_secs().max(1));
        el.set_network_options(net);
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ev_tx, events) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stop_rx => break,
                    ev = el.poll() => {
                        let failed = ev.is_err();
                        if ev_tx.send(ev).await.is_err() || failed {
                            break;
                        }
                    }
                }
            }
        });
        Link {
            client,
            events,
            _stop: stop_tx,
        }
    }
}

/// One verdict for the detector, with the reason published if it changes the state.
enum Verdict {
    /// The cloud broker accepted the session or answered on it.
    Good(&'static str),
    Failed(&'static str),
    /// The broker completed TLS but refused the CONNECT (its return code).
    Refused(ConnectReturnCode),
}

/// The reason published for a refused session, e.g. "... return code 5 (NotAuthorized)".
fn refused_reason(code: ConnectReturnCode) -> String {
    format!(
        "cloud broker refused the session: return code {} ({code:?})",
        code as u8
    )
}

/// What an in-flight cloud publish stands for.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Data { seq: u64, size: usize },
    Heartbeat { sent: Instant },
}

pub struct Session {
    cfg: UplinkConfig,
    gateway_id: String,
    tls: Arc<rustls::ClientConfig>,
    queue: QueueHandle,
    mapping: Arc<Mapping>,
    core: BrokerLink,
    state_tx: watch::Sender<LinkState>,
    stats: Arc<UplinkStats>,
    /// Where sync messages from the cloud go (`outpost/{gateway}/sync/down`), if enabled.
    pub sync_down: Option<tokio::sync::mpsc::Sender<super::Delivery>>,
    /// Where the fleet server's CAN messages go (`outpost/{gateway}/can/rules` and
    /// `.../can/down`), if the CAN capability is on.
    pub can_down: Option<tokio::sync::mpsc::Sender<super::Delivery>>,
    /// The fleet inventory's messages (`outpost/{gateway}/credentials/down`).
    pub credentials_down: Option<tokio::sync::mpsc::Sender<super::Delivery>>,
    /// Retained messages and persistent sessions: the state topic is recorded there, and a
    /// cloud command is queued durably for the persistent sessions it reaches before the
    /// cloud gets its PUBACK.
    pub sessions: Option<crate::sessions::SessionsHandle>,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: UplinkConfig,
        gateway_id: &str,
        tls: Arc<rustls::ClientConfig>,
        queue: QueueHandle,
        mapping: Arc<Mapping>,
        core: BrokerLink,
        state_tx: watch::Sender<LinkState>,
        stats: Arc<UplinkStats>,
    ) -> Session {
        Session {
            cfg,
            gateway_id: gateway_id.to_string(),
            tls,
            queue,
            mapping,
            core,
            state_tx,
            stats,
            sync_down: None,
            can_down: None,
            credentials_down: None,
            sessions: None,
        }
    }

    /// The capability a cloud message on `topic` is for (the registry sync, CAN), if any.
    fn capability_for(
        &self,
        topic: &str,
    ) -> Option<(&tokio::sync::mpsc::Sender<super::Delivery>, &'static str)> {
        if let Some(tx) = &self.can_down {
            if self.mapping.can_down().iter().any(|t| t == topic) {
                return Some((tx, "can"));
            }
        }
        if let Some(tx) = &self.credentials_down {
            if topic == self.mapping.credentials_down() {
                return Some((tx, "credentials"));
            }
        }
        match &self.sync_down {
            Some(tx) if topic == self.mapping.sync_down() => Some((tx, "sync")),
            _ => None,
        }
    }

    fn publish_state(&self, local: &AsyncClient, state: LinkState, reason: &str) {
        let body = serde_json::json!({
            "state": state.as_str(),
            "since_ms": now_ms(),
            "reason": reason,
            "gateway": self.gateway_id,
            "queue_depth": self.queue.stats().depth.load(Ordering::Relaxed),
        });
        let body = body.to_string();
        if let Some(s) = &self.sessions {
            // Not awaited: the state is published again at every transition and start.
            drop(s.publish_internal(
                STATE_TOPIC,
                "outpost~uplink",
                1,
                true,
                bytes::Bytes::from(body.clone()),
            ));
        }
        if let Err(e) = local.try_publish(STATE_TOPIC, QoS::AtLeastOnce, true, body) {
            tracing::warn!(error = %e, "cannot publish uplink state locally");
        }
    }

    fn transition(&self, local: &AsyncClient, to: LinkState, reason: &str) {
        self.state_tx.send_replace(to);
        self.stats
            .online
            .store((to == LinkState::Online) as u64, Ordering::Relaxed);
        self.stats.transitions.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_transition_ms
            .store(now_ms(), Ordering::Relaxed);
        match to {
            LinkState::Online => tracing::info!(%reason, "uplink state: Offline -> Online"),
            LinkState::Offline => tracing::warn!(%reason, "uplink state: Online -> Offline"),
        }
        self.publish_state(local, to, reason);
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let local = crate::broker::local_client(&self.core, "outpost~uplink", shutdown.clone());
        self.publish_state(&local, LinkState::Offline, "starting");
        if !self.cfg.enabled {
            self.publish_state(&local, LinkState::Offline, "uplink disabled");
            shutdown.cancelled().await;
            return;
        }
        let client_id = if self.cfg.client_id.is_empty() {
            self.gateway_id.clone()
        } else {
            self.cfg.client_id.clone()
        };
        let mut opts = MqttOptions::new(client_id, self.cfg.host.clone(), self.cfg.port);
        opts.set_clean_session(false);
        opts.set_keep_alive(self.cfg.keep_alive);
        opts.set_inflight(self.cfg.inflight);
        opts.set_manual_acks(true);
        opts.set_max_packet_size(16 << 20, 16 << 20);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            self.tls.clone(),
        )));
        let window = self.cfg.inflight as usize;
        let cap = window * 2 + 64;
        let mut link: Option<Link> = Some(Link::start(opts.clone(), self.cfg.connect_timeout, cap));
        let d = self.cfg.detection.clone();
        let heartbeat_topic = self
            .cfg
            .heartbeat_topic
            .replace("{gateway}", &self.gateway_id);
        let mut hyst = Hysteresis::new(d.failures_to_offline, d.successes_to_online);
        let mut backoff = Backoff {
            min: self.cfg.backoff_min,
            max: self.cfg.backoff_max,
            attempt: 0,
        };
        let mut connected = false;
        // When to start the next connection attempt (None: one is under way or connected).
        let mut next_attempt: Option<Instant> = None;
        let mut tick = tokio::time::interval(d.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inflight: HashMap<u16, Slot> = HashMap::new();
        let mut unmapped: VecDeque<Slot> = VecDeque::new();
        let mut cursor = self.queue.first_seq().ok().flatten().unwrap_or(1);
        // Messages up to `previous_run_mark` may have been sent by an earlier run; in this run
        // `max_sent` is exact. Nothing beyond the durable sent mark is ever sent. The mark is
        // requested `reserve` messages ahead, renewed when half of that is used, and waited
        // for (without blocking this loop) only when the drain catches up with it.
        let previous_run_mark = self.queue.sent_mark();
        let mut sent_durable = self.queue.sent_durable();
        let reserve = 4 * window as u64;
        let mut mark_requested = previous_run_mark;
        let mut urgent_requested = previous_run_mark;
        let mut mark_blocked: bool;
        let mut max_sent = 0u64;
        // Data slots in `inflight` and `unmapped`.
        let mut outstanding = 0usize;
        let mut evidence = false;
        // When the cloud broker last answered anything on the session.
        let mut last_evidence = Instant::now();
        // When the broker began to owe an answer: the send time of the first publish that
        // went out while nothing was outstanding. Silence before it is not evidence of
        // anything (nothing was asked), so the heartbeat timeout counts from the later of the
        // two, and every request gets the whole `heartbeat_timeout` for its round trip.
        let mut owed_since = Instant::now();
        let mut heartbeat: Option<Instant> = None;
        let mut probe: Option<tokio::task::JoinHandle<Result<Duration, String>>> = None;
        // The last TCP+TLS probe failed: when one succeeds again the endpoint came back, and
        // the session is retried at once instead of after the backoff.
        let mut unreachable = false;
        // The refusal episode under way (return code, refused attempts), logged once when it
        // starts (or when the code changes) and ended only by an accepted CONNACK.
        let mut refusal: Option<(ConnectReturnCode, u64)> = None;
        // The last attempt was refused: TLS works, so probing proves nothing; only the
        // backoff decides when to ask again.
        let mut last_refused = false;
        let mut durable = self.queue.durable();
        let mut acked: Vec<(u64, usize)> = Vec::new();
        let mut flush_acks = false;
        let mut expired: Vec<(u64, usize)> = Vec::new();
        let mut events: Vec<Result<Event, rumqttc::ConnectionError>> = Vec::with_capacity(256);
        let ttl_ms = self.cfg.message_ttl.as_millis() as u64;
        let mut read_cache = super::queue::ReadCache::default();
        let refill_min = (window / 4).max(1);

        loop {
            // Drain the queue into the window.
            mark_blocked = false;
            if connected {
                debug_assert_eq!(
                    outstanding,
                    inflight
                        .values()
                        .chain(unmapped.iter())
                        .filter(|s| matches!(s, Slot::Data { .. }))
                        .count()
                );
                // Refilled a quarter window at a time, so that each refill is one read of the
                // queue and one write to the cloud for many messages.
                if window - outstanding >= refill_min {
                    match self
                        .queue
                        .read_cached(&mut read_cache, cursor, window - outstanding)
                    {
                        Ok(batch) => {
                            for (seq, rec) in batch {
                                // The record's bytes are its size in the queue's accounting
                                // (unknown, 0, for one that cannot be read at all).
                                let (size, msg) = match &rec {
                                    Ok((chunk, range)) => {
                                        (range.len(), MessageRef::decode(&chunk[range.clone()]))
                                    }
                                    Err(e) => (0, Err(e.clone())),
                                };
                                let msg = match msg {
                                    Ok(m) => m,
                                    Err(e) => {
                                        tracing::error!(seq, error = %e, "corrupt queue record skipped");
                                        expired.push((seq, size));
                                        cursor = seq + 1;
                                        continue;
                                    }
                                };
                                if ttl_ms > 0 && now_ms().saturating_sub(msg.enqueued_ms) > ttl_ms {
                                    expired.push((seq, size));
                                    cursor = seq + 1;
                                    continue;
                                }
                                let Some(remote) = self.mapping.up_queued(msg.topic) else {
                                    tracing::warn!(topic = %msg.topic, "queued message matches no uplink rule any more; dropped");
                                    expired.push((seq, size));
                                    cursor = seq + 1;
                                    continue;
                                };
                                let durable_mark = *sent_durable.borrow_and_update();
                                if seq > durable_mark {
                                    // Caught up with the reservation: ask for it to be flushed
                                    // now, and resume when it is on disk.
                                    if mark_requested < seq {
                                        mark_requested = seq + reserve;
                                    }
                                    if urgent_requested < mark_requested {
                                        urgent_requested = mark_requested;
                                        self.queue.request_sent_mark(mark_requested, true).await;
                                    }
                                    mark_blocked = true;
                                    break;
                                }
                                if seq + reserve / 2 > mark_requested {
                                    // Renewed early: flushed with the removals a window later.
                                    mark_requested = seq + reserve;
                                    self.queue.request_sent_mark(mark_requested, false).await;
                                }
                                let Some(l) = link.as_ref() else { break };
                                if l.client
                                    .try_publish(remote, QoS::AtLeastOnce, false, msg.payload)
                                    .is_err()
                                {
                                    break;
                                }
                                if inflight.is_empty() && unmapped.is_empty() {
                                    owed_since = Instant::now();
                                }
                                unmapped.push_back(Slot::Data { seq, size });
                                outstanding += 1;
                                self.stats.published.fetch_add(1, Ordering::Relaxed);
                                if seq <= max_sent || seq <= previous_run_mark {
                                    self.stats.resent.fetch_add(1, Ordering::Relaxed);
                                }
                                max_sent = max_sent.max(seq);
                                cursor = seq + 1;
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "cannot read the uplink queue"),
                    }
                }
            }
            // Acknowledgements go to the queue owner in batches of half a window (or at the
            // next tick); it flushes them once a window's worth is pending. What a crash can
            // repeat is bounded accordingly (see the queue module's docs: about 3 windows).
            if !acked.is_empty() && (acked.len() >= (window / 2).max(1) || flush_acks) {
                self.queue.remove(std::mem::take(&mut acked), false).await;
            }
            flush_acks = false;
            if !expired.is_empty() {
                self.queue.remove(std::mem::take(&mut expired), true).await;
            }

            let mut verdict: Option<Verdict> = None;
            let wake = next_attempt.unwrap_or_else(Instant::now);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(wake), if next_attempt.is_some() => {
                    next_attempt = None;
                    link = Some(Link::start(opts.clone(), self.cfg.connect_timeout, cap));
                }
                _ = durable.changed() => {}
                Ok(()) = sent_durable.changed(), if mark_blocked => {}
                // Something has been waiting for an answer for heartbeat_timeout and the broker
                // has said nothing since: the link is dead even if TCP has not noticed.
                _ = tokio::time::sleep_until(last_evidence.max(owed_since) + d.heartbeat_timeout),
                    if connected && (heartbeat.is_some() || !inflight.is_empty() || !unmapped.is_empty()) => {
                    // An answer may already be waiting behind a busy runtime: look first.
                    if let Some(l) = link.as_mut() {
                        while events.len() < 256 {
                            match l.events.try_recv() {
                                Ok(ev) => events.push(ev),
                                Err(_) => break,
                            }
                        }
                    }
                    if !events.iter().any(|e| matches!(e, Ok(Event::Incoming(_)))) {
                        heartbeat = None;
                        last_evidence = Instant::now();
                        verdict = Some(Verdict::Failed("no MQTT round trip within heartbeat_timeout"));
                    }
                }
                r = async { probe.as_mut().expect("guarded").await }, if probe.is_some() => {
                    probe = None;
                    match r {
                        Ok(Ok(_)) => {
                            // Not a good verdict: only an accepted session is Online. But an
                            // endpoint that answers again is worth a session attempt now.
                            if unreachable && link.is_none() && next_attempt.is_some() {
                                backoff.reset();
                                next_attempt = Some(Instant::now());
                            }
                            unreachable = false;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "uplink probe failed");
                            unreachable = true;
                            verdict = Some(Verdict::Failed("cloud endpoint does not answer (TCP+TLS probe)"));
                        }
                        Err(_) => {}
                    }
                }
                _ = tick.tick() => {
                    flush_acks = true;
                    if mark_blocked {
                        // In case the flush that makes the mark durable failed: ask again.
                        self.queue.request_sent_mark(mark_requested, true).await;
                    }
                    if let (true, Some(l)) = (connected, link.as_ref()) {
                        if evidence {
                            // Round trips completed since the last tick: the link is alive,
                            // whatever the heartbeat (which may be queued behind data).
                            evidence = false;
                            heartbeat = None;
                            verdict = Some(Verdict::Good("cloud broker acknowledges"));
                        } else if heartbeat.is_none()
                            && last_evidence.elapsed() >= d.interval / 2
                            && l.client.try_publish(heartbeat_topic.as_str(), QoS::AtLeastOnce, false, now_ms().to_string()).is_ok() {
                            let now = Instant::now();
                            heartbeat = Some(now);
                            if inflight.is_empty() && unmapped.is_empty() {
                                owed_since = now;
                            }
                            unmapped.push_back(Slot::Heartbeat { sent: now });
                            self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                        }
                    } else if !connected && probe.is_none() && !last_refused {
                        let (host, port, tls, t) = (self.cfg.host.clone(), self.cfg.port, self.tls.clone(), d.probe_timeout);
                        probe = Some(tokio::spawn(async move { tls_probe(&host, port, tls, t).await }));
                    }
                }
                n = async { link.as_mut().expect("guarded").events.recv_many(&mut events, 256).await }, if link.is_some() => {
                    if n == 0 {
                        // The event loop ended without an error event (should not happen).
                        link = None;
                        connected = false;
                        next_attempt = Some(Instant::now() + backoff.next());
                    }
                }
            }
            // Everything the event loop reported since the last turn, in order.
            for ev in events.drain(..) {
                if link.is_none() {
                    // The connection these came from is gone.
                    break;
                }
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        // rumqttc reports a refusing CONNACK as `ConnectionRefused` (below).
                        if ack.code == ConnectReturnCode::Success {
                            connected = true;
                            last_refused = false;
                            unreachable = false;
                            backoff.reset();
                            self.stats.connects.fetch_add(1, Ordering::Relaxed);
                            if let Some((code, n)) = refusal.take() {
                                tracing::info!(
                                    session_present = ack.session_present,
                                    last_return_code = code as u8,
                                    refused_attempts = n,
                                    "uplink connected: the cloud broker accepts the session again"
                                );
                            } else {
                                tracing::info!(
                                    session_present = ack.session_present,
                                    "uplink connected"
                                );
                            }
                            // A fresh client: everything unacknowledged goes again from the queue,
                            // in order (possible duplicates are counted as resent).
                            inflight.clear();
                            unmapped.clear();
                            outstanding = 0;
                            heartbeat = None;
                            cursor = self.queue.first_seq().ok().flatten().unwrap_or(cursor);
                            // Every time, not only for a new session: the capability may
                            // have been turned on since, and the retained rule set is
                            // delivered again on subscribing (the CAN intake skips a set it
                            // has).
                            if let (true, Some(l)) = (self.can_down.is_some(), link.as_ref()) {
                                for t in self.mapping.can_down() {
                                    if let Err(e) = l.client.try_subscribe(t, QoS::AtLeastOnce) {
                                        tracing::error!(error = %e, "cannot subscribe for the fleet's CAN messages");
                                    }
                                }
                            }
                            if let (true, Some(l)) =
                                (self.credentials_down.is_some(), link.as_ref())
                            {
                                if let Err(e) = l.client.try_subscribe(
                                    self.mapping.credentials_down(),
                                    QoS::AtLeastOnce,
                                ) {
                                    tracing::error!(error = %e, "cannot subscribe for the fleet inventory's messages");
                                }
                            }
                            if !ack.session_present {
                                if let Some(l) = link.as_ref() {
                                    for f in self.mapping.down_filters() {
                                        if let Err(e) = l.client.try_subscribe(f, QoS::AtLeastOnce)
                                        {
                                            tracing::error!(filter = f, error = %e, "cannot subscribe for cloud-to-device messages");
                                        }
                                    }
                                    if self.sync_down.is_some() {
                                        if let Err(e) = l.client.try_subscribe(
                                            self.mapping.sync_down(),
                                            QoS::AtLeastOnce,
                                        ) {
                                            tracing::error!(error = %e, "cannot subscribe for registry sync");
                                        }
                                    }
                                }
                            }
                            // The accepted CONNACK is the first good verdict (the next one is
                            // a round trip on the session).
                            last_evidence = Instant::now();
                            verdict = Some(Verdict::Good("cloud broker accepted the session"));
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if pkid != 0 && !inflight.contains_key(&pkid) {
                            if let Some(slot) = unmapped.pop_front() {
                                inflight.insert(pkid, slot);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        evidence = true;
                        last_evidence = Instant::now();
                        match inflight.remove(&ack.pkid) {
                            Some(Slot::Data { seq, size }) => {
                                outstanding = outstanding.saturating_sub(1);
                                acked.push((seq, size));
                            }
                            Some(Slot::Heartbeat { sent }) if heartbeat == Some(sent) => {
                                heartbeat = None;
                            }
                            Some(Slot::Heartbeat { .. }) | None => {}
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p)))
                        if self.capability_for(&p.topic).is_some() =>
                    {
                        // Acknowledged by the capability once handled (the sync: once
                        // applied; CAN: a rule set once on disk); if its queue is full the
                        // message stays unacknowledged and comes again after a reconnect.
                        if let (Some((tx, what)), Some(l)) =
                            (self.capability_for(&p.topic), link.as_ref())
                        {
                            let d = super::Delivery {
                                publish: p,
                                client: l.client.clone(),
                            };
                            if tx.try_send(d).is_err() {
                                tracing::warn!(
                                    capability = what,
                                    "too many cloud messages waiting; one left for redelivery"
                                );
                            }
                        }
                        evidence = true;
                        last_evidence = Instant::now();
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = p.topic.clone();
                        match self.mapping.down(&topic) {
                            Some(local_topic) => {
                                let qos = if p.qos == QoS::AtMostOnce {
                                    QoS::AtMostOnce
                                } else {
                                    QoS::AtLeastOnce
                                };
                                // Durable in every persistent session it reaches before the
                                // cloud's PUBACK: a crash from here on loses nothing.
                                if let Some(s) = &self.sessions {
                                    let kept = s
                                        .publish_internal_durable(
                                            &local_topic,
                                            "outpost~uplink",
                                            qos as u8,
                                            false,
                                            p.payload.clone(),
                                        )
                                        .await;
                                    if let Err(e) = kept {
                                        tracing::error!(%topic, error = %e, "cloud message not stored for its persistent sessions: left unacknowledged for redelivery");
                                        evidence = true;
                                        last_evidence = Instant::now();
                                        continue;
                                    }
                                }
                                match local
                                    .publish(local_topic.clone(), qos, false, p.payload.to_vec())
                                    .await
                                {
                                    Ok(()) => {
                                        self.stats.commands_down.fetch_add(1, Ordering::Relaxed);
                                        tracing::debug!(%topic, %local_topic, "cloud message delivered locally");
                                    }
                                    Err(e) => {
                                        tracing::error!(error = %e, "cannot deliver cloud message locally")
                                    }
                                }
                            }
                            None => {
                                self.stats.commands_rejected.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(%topic, "cloud message on an unmapped topic ignored");
                            }
                        }
                        if let Some(l) = link.as_ref() {
                            let _ = l.client.try_ack(&p);
                        }
                        evidence = true;
                        last_evidence = Instant::now();
                    }
                    Ok(Event::Incoming(_)) => {
                        evidence = true;
                        last_evidence = Instant::now();
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        match &mut refusal {
                            Some((c, n)) if *c == code => {
                                *n += 1;
                                tracing::debug!(
                                    return_code = code as u8,
                                    ?code,
                                    "cloud broker refused the uplink session again"
                                );
                            }
                            _ => {
                                tracing::warn!(
                                    return_code = code as u8,
                                    ?code,
                                    "cloud broker refused the uplink session (TLS completed; check the gateway's credentials at the cloud); retrying with backoff, logged once"
                                );
                                refusal = Some((code, 1));
                                if hyst.state() == LinkState::Offline {
                                    // No transition, but the state document says why.
                                    self.publish_state(
                                        &local,
                                        LinkState::Offline,
                                        &refused_reason(code),
                                    );
                                }
                            }
                        }
                        connected = false;
                        last_refused = true;
                        heartbeat = None;
                        link = None;
                        next_attempt = Some(Instant::now() + backoff.next());
                        verdict = Some(Verdict::Refused(code));
                    }
                    Err(e) => {
                        last_refused = false;
                        if connected {
                            tracing::warn!(error = %e, "uplink connection lost");
                        } else {
                            tracing::debug!(error = %e, "uplink connect failed");
                        }
                        connected = false;
                        heartbeat = None;
                        link = None;
                        next_attempt = Some(Instant::now() + backoff.next());
                        verdict = Some(Verdict::Failed("uplink connection failed"));
                    }
                }
            }
            if let Some(v) = verdict {
                let (change, reason) = match v {
                    Verdict::Good(r) => (hyst.observe(true), Cow::Borrowed(r)),
                    Verdict::Failed(r) => {
                        self.stats.probes_failed.fetch_add(1, Ordering::Relaxed);
                        (hyst.observe(false), Cow::Borrowed(r))
                    }
                    Verdict::Refused(code) => (hyst.refused(), Cow::Owned(refused_reason(code))),
                };
                match change {
                    Some(LinkState::Offline) => {
                        self.transition(&local, LinkState::Offline, &reason);
                        if connected {
                            // The session is dead even if TCP has not noticed: drop it now
                            // (the queue keeps everything unacknowledged).
                            link = None;
                            connected = false;
                            heartbeat = None;
                            next_attempt = Some(Instant::now() + backoff.next());
                        }
                    }
                    Some(LinkState::Online) => {
                        debug_assert!(connected, "Online only on an accepted session");
                        self.transition(&local, LinkState::Online, &reason);
                    }
                    None => {}
                }
            }
        }
        self.queue.remove(std::mem::take(&mut acked), false).await;
        if let (true, Some(mut l)) = (connected, link.take()) {
            let _ = l.client.try_disconnect();
            // Let the event loop send the DISCONNECT.
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while let Some(Ok(ev)) = l.events.recv().await {
                    if ev == Event::Outgoing(Outgoing::Disconnect) {
                        break;
                    }
                }
            })
            .await;
        }
        tracing::info!("uplink stopped");
    }
}
