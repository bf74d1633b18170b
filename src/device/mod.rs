//! `outpost device`: the device agent for Linux devices (and the tests' device).
//!
//! 1. **Onboarding.** Unless the state directory already holds operational credentials,
//!    it runs FDO TO1 + TO2 with the device credential file, retrying with the rendezvous
//!    info's delay (jittered) until it succeeds. Its key pair for MQTT is generated here
//!    and never leaves the device (the owner signs a CSR). Afterwards the credential file is
//!    replaced by the one TO2 gave (new GUID, new owner), and the state directory holds
//!    `mqtt.key` (0600), `mqtt.crt`, `mqtt-ca.crt` and `mqtt.json` (client id, servers).
//! 2. **MQTT.** It stays connected over mTLS to the first server of its list that works,
//!    subscribes to `devices/{id}/commands/#` and publishes a QoS 1 heartbeat on
//!    `devices/{id}/telemetry/heartbeat` every `interval`. When a server fails it moves to
//!    the next one at once; after a whole round of failures it backs off (exponential,
//!    full jitter).
//!
//! 3. **Switching.** A message on `devices/{id}/commands/outpost/switch` with
//!    `{"server": "<one of its servers>"}` (sent by a gateway in `cloud-first` mode once the
//!    cloud is reachable again) makes it leave the current server for that one.
//!
//! Events go to stdout, one JSON object per line (`onboarded`, `connected`,
//! `disconnected`, `switching`, `message`, `published`); logs go to stderr.

pub mod holder;

use crate::credentials::msg as cmsg;
use crate::fdo::client::{self, DeviceOptions, MqttCredentials};
use crate::fdo::service::parse_mqtt_url;
use crate::fdo_wire::{DeviceCredential, FdoError};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const MQTT_KEY: &str = "mqtt.key";
pub const MQTT_CERT: &str = "mqtt.crt";
pub const MQTT_CA: &str = "mqtt-ca.crt";
pub const MQTT_STATE: &str = "mqtt.json";

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device credential: {0}")]
    Credential(FdoError),
    #[error("onboarding: {0}")]
    Onboarding(#[from] client::ClientError),
    #[error("state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the owner gave no MQTT server")]
    NoServers,
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The device credential file (replaced after onboarding).
    pub cred: PathBuf,
    /// Where the operational credentials are kept.
    pub state_dir: PathBuf,
    /// Heartbeat interval (0: none).
    pub interval: Duration,
    pub keep_alive: Duration,
    /// Onboarding attempts before giving up (None: forever).
    pub attempts: Option<u32>,
    /// Onboard only, then exit.
    pub onboard_only: bool,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            cred: PathBuf::from(crate::fdo_wire::credential::FILE_NAME),
            state_dir: PathBuf::from("outpost-device"),
            interval: Duration::from_secs(30),
            keep_alive: Duration::from_secs(15),
            attempts: None,
            onboard_only: false,
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// `mqtt.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MqttState {
    pub client_id: String,
    pub servers: Vec<String>,
}

fn event(v: serde_json::Value) {
    println!("{v}");
}

fn state_err(path: &Path) -> impl FnOnce(String) -> DeviceError + '_ {
    move |reason| DeviceError::State {
        path: path.to_path_buf(),
        reason,
    }
}

/// The operational credentials of `dir`, if it holds a complete set.
pub fn load_state(dir: &Path) -> Result<Option<MqttState>, DeviceError> {
    let p = dir.join(MQTT_STATE);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_err(&p)(e.to_string())),
    };
    let st: MqttState = serde_json::from_str(&text).map_err(|e| state_err(&p)(e.to_string()))?;
    for f in [MQTT_KEY, MQTT_CERT, MQTT_CA] {
        if !dir.join(f).exists() {
            return Ok(None);
        }
    }
    Ok(Some(st))
}

fn save_state(dir: &Path, m: &MqttCredentials) -> Result<MqttState, DeviceError> {
    let w = |name: &str, text: &str, mode: u32| {
        let p = dir.join(name);
        crate::ca::write_file(&p, text.as_bytes(), mode).map_err(|e| state_err(&p)(e.to_string()))
    };
    crate::fdo_wire::private_dir(dir).map_err(|e| state_err(dir)(e.to_string()))?;
    w(MQTT_KEY, &m.key_pem, 0o600)?;
    w(MQTT_CERT, &m.cert_pem, 0o644)?;
    w(MQTT_CA, &m.ca_pem, 0o644)?;
    let st = MqttState {
        client_id: m.client_id.clone(),
        servers: m.servers.clone(),
    };
    // Written last: its presence means the set is complete.
    let json = serde_json::to_string_pretty(&st).unwrap_or_default();
    w(MQTT_STATE, &json, 0o644)?;
    Ok(st)
}

/// Onboard (TO1 + TO2) and save the results. `Ok(None)`: onboarded, but the owner gave no
/// MQTT credentials.
pub async fn onboard(opts: &AgentOptions) -> Result<Option<MqttState>, DeviceError> {
    let cred = DeviceCredential::read(&opts.cred).map_err(DeviceError::Credential)?;
    tracing::info!(guid = %cred.guid, "onboarding");
    let started = Instant::now();
    let done = client::onboard_with_retry(&cred, &DeviceOptions::default(), opts.attempts).await?;
    // The new credential first: from now on the owner knows the device by its new GUID.
    done.credential
        .write(&opts.cred)
        .map_err(DeviceError::Credential)?;
    let st = match &done.mqtt {
        Some(m) => Some(save_state(&opts.state_dir, m)?),
        None => None,
    };
    tracing::info!(old_guid = %done.old_guid, guid = %done.credential.guid, elapsed = ?started.elapsed(), "onboarded");
    event(serde_json::json!({
        "event": "onboarded",
        "old_guid": done.old_guid.hex(),
        "guid": done.credential.guid.hex(),
        "client_id": st.as_ref().map(|s| s.client_id.clone()),
        "servers": st.as_ref().map(|s| s.servers.clone()).unwrap_or_default(),
        "ms": started.elapsed().as_millis() as u64,
    }));
    Ok(st)
}

fn tls_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>, DeviceError> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|e| DeviceError::Tls(format!("{}: {e}", p.display())))
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut read(MQTT_CA)?.as_slice()) {
        let c = c.map_err(|e| DeviceError::Tls(format!("{MQTT_CA}: {e}")))?;
        roots
            .add(c)
            .map_err(|e| DeviceError::Tls(format!("{MQTT_CA}: {e}")))?;
    }
    let chain: Vec<_> = rustls_pemfile::certs(&mut read(MQTT_CERT)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| DeviceError::Tls(format!("{MQTT_CERT}: {e}")))?;
    let key = rustls_pemfile::private_key(&mut read(MQTT_KEY)?.as_slice())
        .map_err(|e| DeviceError::Tls(format!("{MQTT_KEY}: {e}")))?
        .ok_or_else(|| DeviceError::Tls(format!("{MQTT_KEY}: no private key")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| DeviceError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| DeviceError::Tls(e.to_string()))?;
    Ok(Arc::new(cfg))
}

enum Ended {
    Shutdown,
    Failed {
        connected: bool,
        reason: String,
    },
    /// The gateway told the device to use another server of its list.
    Switch {
        server: String,
    },
    /// A renewed certificate is installed: connect again with it.
    Renewed,
    /// The MQTT credential was deleted on the gateway's command.
    Deleted,
}

/// One connection to one server, until it fails or shutdown.
async fn session(
    url: &str,
    st: &MqttState,
    tls: &Arc<rustls::ClientConfig>,
    opts: &AgentOptions,
    seq: &mut u64,
    holder: &mut holder::Holder,
    shutdown: &CancellationToken,
) -> Ended {
    let (host, port) = match parse_mqtt_url(url) {
        Ok(x) => x,
        Err(e) => {
            return Ended::Failed {
                connected: false,
                reason: e,
            }
        }
    };
    let mut mo = MqttOptions::new(st.client_id.clone(), host, port);
    mo.set_keep_alive(opts.keep_alive.max(Duration::from_secs(1)));
    mo.set_clean_session(false);
    mo.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls.clone(),
    )));
    let (client, mut el) = AsyncClient::new(mo, 64);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_connection_timeout(5);
    el.set_network_options(net);
    let id = &st.client_id;
    let mut connected = false;
    let interval = if opts.interval.is_zero() {
        Duration::from_secs(3600 * 24 * 365)
    } else {
        opts.interval
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = client.try_disconnect();
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while el.poll().await.is_ok() {}
                }).await;
                return Ended::Shutdown;
            }
            _ = tick.tick(), if connected && !opts.interval.is_zero() => {
                *seq += 1;
                let body = serde_json::json!({"seq": *seq}).to_string();
                let topic = format!("devices/{id}/telemetry/heartbeat");
                if client.try_publish(topic, QoS::AtLeastOnce, false, body).is_err() {
                    tracing::warn!("heartbeat not queued (client busy)");
                }
            }
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    tracing::info!(server = url, "connected");
                    event(serde_json::json!({"event": "connected", "server": url}));
                    let _ = client.try_subscribe(format!("devices/{id}/commands/#"), QoS::AtLeastOnce);
                    // Check-in: what this device holds (docs/credentials.md).
                    match holder.report() {
                        Ok(r) => {
                            let _ = client.try_publish(cmsg::report_topic(id), QoS::AtLeastOnce, false, r.encode());
                        }
                        Err(e) => tracing::warn!(error = %e, "no credentials report"),
                    }
                    tick.reset_immediately();
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == cmsg::command_topic(id) => {
                    let cmd = match cmsg::ToDevice::decode(&p.payload) {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "unreadable credentials command ignored");
                            continue;
                        }
                    };
                    let op = serde_json::to_value(&cmd).ok().and_then(|v| v["op"].as_str().map(str::to_string));
                    event(serde_json::json!({"event": "credentials", "op": op, "job": cmd.job()}));
                    let out = match holder.handle(cmd) {
                        Ok(o) => o,
                        Err(e) => {
                            tracing::error!(error = %e, "credentials command failed");
                            continue;
                        }
                    };
                    for u in &out.updates {
                        event(serde_json::json!({"event": "job", "job": u.job, "state": u.state.as_str(), "reason": u.reason}));
                        if client.publish(cmsg::job_topic(id), QoS::AtLeastOnce, false, u.encode()).await.is_err() {
                            tracing::warn!("job update not queued");
                        }
                    }
                    if out.reconnect || out.stop {
                        let _ = client.try_disconnect();
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while el.poll().await.is_ok() {}
                        }).await;
                        return if out.stop { Ended::Deleted } else { Ended::Renewed };
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == crate::switching::topic(id) => {
                    let server = serde_json::from_slice::<serde_json::Value>(&p.payload)
                        .ok()
                        .and_then(|v| v["server"].as_str().map(str::to_string));
                    match server {
                        Some(s) if s != url && st.servers.contains(&s) => {
                            let _ = client.ack(&p).await;
                            let _ = client.try_disconnect();
                            return Ended::Switch { server: s };
                        }
                        Some(s) => tracing::info!(server = %s, "switch command ignored (current server, or not one of ours)"),
                        None => tracing::warn!("unreadable switch command ignored"),
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    tracing::info!(topic = %p.topic, bytes = p.payload.len(), "message");
                    event(serde_json::json!({
                        "event": "message",
                        "topic": p.topic,
                        "payload": String::from_utf8_lossy(&p.payload),
                    }));
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    event(serde_json::json!({"event": "published", "pkid": a.pkid, "server": url}));
                }
                Ok(_) => {}
                Err(e) => {
                    return Ended::Failed { connected, reason: e.to_string() };
                }
            }
        }
    }
}

/// Stay connected to the servers of `st`, in order, until shutdown.
pub async fn stay_connected(
    st: &MqttState,
    opts: &AgentOptions,
    shutdown: &CancellationToken,
) -> Result<(), DeviceError> {
    if st.servers.is_empty() {
        return Err(DeviceError::NoServers);
    }
    let mut tls = tls_config(&opts.state_dir)?;
    let mut holder = holder::Holder::new(&opts.state_dir, &st.client_id);
    let mut seq = 0u64;
    let mut idx = 0usize;
    let mut failed_in_row = 0usize;
    let mut attempt = 0u32;
    loop {
        let url = &st.servers[idx];
        match session(url, st, &tls, opts, &mut seq, &mut holder, shutdown).await {
            Ended::Shutdown => return Ok(()),
            Ended::Renewed => {
                tracing::info!("renewed certificate installed; reconnecting with it");
                event(serde_json::json!({"event": "renewed"}));
                tls = tls_config(&opts.state_dir)?;
            }
            Ended::Deleted => {
                tracing::warn!(
                    "the MQTT credential was deleted on the gateway's command; stopping"
                );
                event(serde_json::json!({"event": "credential-deleted"}));
                return Ok(());
            }
            Ended::Switch { server } => {
                tracing::info!(from = %url, to = %server, "switching server on the gateway's advice");
                event(serde_json::json!({"event": "switching", "from": url, "to": server}));
                idx = st.servers.iter().position(|s| *s == server).unwrap_or(0);
                failed_in_row = 0;
                attempt = 0;
            }
            Ended::Failed { connected, reason } => {
                tracing::warn!(server = %url, error = %reason, "MQTT server failed");
                if connected {
                    event(
                        serde_json::json!({"event": "disconnected", "server": url, "reason": reason}),
                    );
                    failed_in_row = 0;
                    attempt = 0;
                }
                failed_in_row += 1;
                idx = (idx + 1) % st.servers.len();
                if failed_in_row >= st.servers.len() {
                    // A whole round failed: back off before the next.
                    failed_in_row = 0;
                    let cap = opts
                        .backoff_min
                        .saturating_mul(1u32 << attempt.min(16))
                        .min(opts.backoff_max);
                    attempt = attempt.saturating_add(1);
                    let ms = {
                        use rand::Rng;
                        rand::thread_rng().gen_range(0..=cap.as_millis().max(1) as u64)
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                    }
                }
            }
        }
    }
}

/// The whole agent: onboard if needed, then stay connected.
pub async fn run(opts: AgentOptions, shutdown: CancellationToken) -> Result<(), DeviceError> {
    let st = match load_state(&opts.state_dir)? {
        Some(st) => {
            tracing::info!(client_id = %st.client_id, "already onboarded");
            Some(st)
        }
        None => {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = onboard(&opts) => r?,
            }
        }
    };
    let Some(st) = st else {
        tracing::info!("onboarded; the owner gave no MQTT credentials, nothing more to do");
        return Ok(());
    };
    if opts.onboard_only {
        return Ok(());
    }
    stay_connected(&st, &opts, &shutdown).await
}
