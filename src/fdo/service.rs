//! The FDO services of a running gateway (`outpost run`) or cloud (`outpost cloud`): one
//! HTTP listener carrying the rendezvous server (TO0, TO1) and the owner (TO2), both on the
//! store, and the registrar, which keeps this owner's vouchers registered (TO0) at its own
//! rendezvous server and at any others in `fdo.to0_servers`.
//!
//! The registrar registers every stored voucher of a device that has not onboarded yet,
//! pointing devices at `owner_addresses`, renews each registration when half of its time
//! has passed, retries failures with jittered backoff, and is woken at once when a voucher
//! is imported (admin socket).

use super::client::{self, Endpoint};
use super::http::{self, FdoServer, HttpLimits};
use super::owner;
use super::owner_backend::StoreOwnerBackend;
use super::owner_service::{
    BoxFuture, CredentialIssuer, IssueRequest, IssuedCredential, OwnerBackend, OwnerConfig,
    OwnerService,
};
use super::rendezvous::{Rendezvous, RvConfig, StoreRvStore};
use super::session::{SessionLimits, SessionStats};
use super::to1_proxy::{To1Proxy, To1Stats};
use crate::ca::CaHandle;
use crate::fdo_wire::msg::{transport, To2Addr};
use crate::fdo_wire::{crypto::Curve, FdoError, Guid, OwnershipVoucher};
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The `[fdo]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FdoConfig {
    /// Serve FDO over HTTP (the rendezvous server and/or the owner).
    pub enabled: bool,
    /// HTTP listener (`POST /fdo/101/msg/{n}`), on the LAN for a gateway.
    pub listen: SocketAddr,
    /// Answer TO0 (owners register) and TO1 (devices ask where their owner is).
    pub rendezvous: bool,
    /// Answer TO2 for vouchers extended to this owner's keys, and keep them registered.
    pub owner: bool,
    /// Where devices reach this owner (the RVTO2Addr entries registered with TO0):
    /// `host`, `host:port`, `ip` or `[ipv6]:port`; the port defaults to the bound one.
    /// Empty: the listen address if it is a specific IP, else `mdns_host`.
    pub owner_addresses: Vec<String>,
    /// Other rendezvous servers (`host:port`, plain HTTP) this owner registers its
    /// vouchers at, besides its own.
    pub to0_servers: Vec<String>,
    /// Registration time asked for in TO0 (the server may grant less).
    #[serde(with = "crate::duration")]
    pub to0_wait: Duration,
    /// MQTT servers given to onboarded devices (`outpost:mqtt`), primary first:
    /// `mqtts://host:port`. Empty on a gateway: its own device listener at the first owner
    /// address. Required for `outpost cloud`.
    pub mqtt_servers: Vec<String>,
    /// Where devices connect (seed 004's alternative server): `gateway-first` (this gateway's
    /// broker first, the cloud broker as the alternative) or `cloud-first` (the cloud broker
    /// first; this gateway is the fallback, and tells its devices to switch back once the
    /// link has returned and the registry is synced). Ignored when `mqtt_servers` is set.
    pub mode: Mode,
    /// The cloud broker devices may use directly (`mqtts://host:port`); empty: none.
    pub cloud_mqtt_server: String,
    /// In `cloud-first`, the switch-back commands are spread over this long (against a
    /// reconnect storm at the cloud).
    #[serde(with = "crate::duration")]
    pub switch_spread: Duration,
    /// PEM files of further CA certificates sent to devices to verify their MQTT servers
    /// (e.g. a cloud sends the gateway CA when its devices use the gateway's broker).
    pub server_trust: Vec<PathBuf>,
    /// mDNS host name answered for the FDO service (`_fdo._tcp`), so that devices made with
    /// `--rv-dns outpost.local` find this gateway. Empty: not advertised.
    pub mdns_host: String,
    /// Open HTTP connections; further ones wait.
    pub max_connections: usize,
    /// Time allowed for one HTTP request (headers, body, answer).
    #[serde(with = "crate::duration")]
    pub request_timeout: Duration,
    /// Idle time after which an unfinished TO2 session is dropped once the device has
    /// proven its key (ProveDevice).
    #[serde(with = "crate::duration")]
    pub session_ttl: Duration,
    /// Lifetime of a session that has proven nothing yet (every TO0 and TO1 session, TO2
    /// before ProveDevice): anyone can open one, so it is short.
    #[serde(with = "crate::duration")]
    pub unproven_session_ttl: Duration,
    /// Open protocol sessions per table (TO0, TO1, TO2, cloud TO1). When a table is full, a
    /// new session evicts the oldest one that has proven nothing; only a table full of
    /// proven sessions refuses.
    pub max_sessions: usize,
    /// Unproven sessions one peer (IPv4 address, IPv6 /64) may hold per table; its next
    /// one evicts its own oldest.
    pub max_sessions_per_peer: usize,
    /// Registrations the rendezvous server keeps.
    pub max_registrations: usize,
    /// The cloud rendezvous server (`host:port`, plain HTTP; port default 8041). While the
    /// uplink is Online, devices' TO1 is forwarded there and its answer relayed (the
    /// determination unit, `fdo/to1_proxy.rs`); Offline, the local rendezvous answers.
    /// Empty: never forward.
    pub cloud_rendezvous: String,
    /// Time allowed for one forwarded TO1 exchange with the cloud rendezvous; after it, a
    /// new session is answered locally. Less than `request_timeout` (checked when
    /// `cloud_rendezvous` is set).
    #[serde(with = "crate::duration")]
    pub forward_timeout: Duration,
}

impl Default for FdoConfig {
    fn default() -> Self {
        FdoConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], super::DEFAULT_RV_PORT)),
            rendezvous: true,
            owner: true,
            owner_addresses: Vec::new(),
            to0_servers: Vec::new(),
            to0_wait: Duration::from_secs(24 * 3600),
            mqtt_servers: Vec::new(),
            mode: Mode::GatewayFirst,
            cloud_mqtt_server: String::new(),
            switch_spread: Duration::from_secs(10),
            server_trust: Vec::new(),
            mdns_host: super::DEFAULT_RV_DNS.to_string(),
            max_connections: 1024,
            request_timeout: Duration::from_secs(10),
            session_ttl: Duration::from_secs(120),
            unproven_session_ttl: Duration::from_secs(10),
            max_sessions: 10_000,
            max_sessions_per_peer: 64,
            max_registrations: 100_000,
            cloud_rendezvous: String::new(),
            forward_timeout: Duration::from_secs(3),
        }
    }
}

/// Server order given to devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    GatewayFirst,
    CloudFirst,
}

/// A host as written in config: an IP address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Dns(String),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
            Host::Dns(d) => f.write_str(d),
        }
    }
}

fn parse_host(h: &str) -> Result<Host, String> {
    let bare = h.strip_prefix('[').and_then(|x| x.strip_suffix(']'));
    if let Some(v6) = bare {
        return v6
            .parse()
            .map(Host::Ip)
            .map_err(|_| format!("{h:?} is not an IPv6 address"));
    }
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(Host::Dns(h.to_string()))
    } else {
        Err(format!("{h:?} is not a host name or IP address"))
    }
}

/// Parse `host`, `host:port`, `ip`, `[ipv6]` or `[ipv6]:port`.
pub fn parse_host_port(s: &str) -> Result<(Host, Option<u16>), String> {
    let s = s.trim();
    // A bare IPv6 address has colons but no port.
    if let Ok(IpAddr::V6(a)) = s.parse::<IpAddr>() {
        return Ok((Host::Ip(IpAddr::V6(a)), None));
    }
    let (host, port) = match s.rfind(':') {
        Some(i) if !s[i..].contains(']') => {
            let p = s[i + 1..]
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{s:?}: bad port"))?;
            (&s[..i], Some(p))
        }
        _ => (s, None),
    };
    Ok((parse_host(host)?, port))
}

/// Parse an MQTT server URL `mqtts://host:port` (port default 8883).
pub fn parse_mqtt_url(s: &str) -> Result<(String, u16), String> {
    let rest = s
        .strip_prefix("mqtts://")
        .ok_or_else(|| format!("{s:?}: must start with mqtts:// (devices use TLS)"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = parse_host_port(rest).map_err(|e| format!("{s:?}: {e}"))?;
    let host = match host {
        Host::Ip(ip) => ip.to_string(),
        Host::Dns(d) => d,
    };
    Ok((host, port.unwrap_or(8883)))
}

impl FdoConfig {
    /// Checks types cannot express; errors name the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled {
            return Ok(());
        }
        if !self.rendezvous && !self.owner {
            return Err((
                "fdo.enabled",
                "fdo.rendezvous and fdo.owner are both off (set fdo.enabled = false)".into(),
            ));
        }
        for a in &self.owner_addresses {
            parse_host_port(a).map_err(|e| ("fdo.owner_addresses", e))?;
        }
        for a in &self.to0_servers {
            parse_host_port(a).map_err(|e| ("fdo.to0_servers", e))?;
        }
        for u in &self.mqtt_servers {
            parse_mqtt_url(u).map_err(|e| ("fdo.mqtt_servers", e))?;
        }
        if !self.cloud_mqtt_server.is_empty() {
            parse_mqtt_url(&self.cloud_mqtt_server).map_err(|e| ("fdo.cloud_mqtt_server", e))?;
        }
        if self.mode == Mode::CloudFirst
            && self.cloud_mqtt_server.is_empty()
            && self.mqtt_servers.is_empty()
        {
            return Err((
                "fdo.cloud_mqtt_server",
                "must be set for mode = \"cloud-first\"".into(),
            ));
        }
        if self.switch_spread > Duration::from_secs(3600) {
            return Err(("fdo.switch_spread", "must be at most 1h".into()));
        }
        for p in &self.server_trust {
            let pem = std::fs::read(p)
                .map_err(|e| ("fdo.server_trust", format!("{}: {e}", p.display())))?;
            let n = rustls_pemfile::certs(&mut pem.as_slice())
                .filter(|c| c.is_ok())
                .count();
            if n == 0 {
                return Err((
                    "fdo.server_trust",
                    format!("{}: no PEM certificate in file", p.display()),
                ));
            }
        }
        if !self.mdns_host.is_empty() {
            match parse_host(&self.mdns_host) {
                Ok(Host::Dns(d)) if d.ends_with(".local") => {}
                _ => {
                    return Err((
                        "fdo.mdns_host",
                        format!("{:?} must be a name ending in .local", self.mdns_host),
                    ))
                }
            }
        }
        if self.to0_wait < Duration::from_secs(60) {
            return Err(("fdo.to0_wait", "must be at least 60s".into()));
        }
        if self.max_connections == 0 {
            return Err(("fdo.max_connections", "must be at least 1".into()));
        }
        if self.request_timeout.is_zero() || self.request_timeout > Duration::from_secs(300) {
            return Err(("fdo.request_timeout", "must be > 0 and <= 5m".into()));
        }
        if self.session_ttl < Duration::from_secs(5) {
            return Err(("fdo.session_ttl", "must be at least 5s".into()));
        }
        if self.max_sessions == 0 {
            return Err(("fdo.max_sessions", "must be at least 1".into()));
        }
        if self.max_sessions_per_peer == 0 {
            return Err(("fdo.max_sessions_per_peer", "must be at least 1".into()));
        }
        if self.unproven_session_ttl < Duration::from_secs(1)
            || self.unproven_session_ttl > self.session_ttl
        {
            return Err((
                "fdo.unproven_session_ttl",
                "must be at least 1s and at most fdo.session_ttl".into(),
            ));
        }
        if self.max_registrations == 0 {
            return Err(("fdo.max_registrations", "must be at least 1".into()));
        }
        if !self.cloud_rendezvous.is_empty() {
            let (h, p) =
                parse_host_port(&self.cloud_rendezvous).map_err(|e| ("fdo.cloud_rendezvous", e))?;
            if !self.rendezvous {
                return Err((
                    "fdo.cloud_rendezvous",
                    "needs fdo.rendezvous = true (the local answer when the uplink is down)".into(),
                ));
            }
            let port = p.unwrap_or(super::DEFAULT_RV_PORT);
            if h == Host::Ip(self.listen.ip()) && port == self.listen.port() {
                return Err((
                    "fdo.cloud_rendezvous",
                    format!("{} is this gateway's own listener", self.cloud_rendezvous),
                ));
            }
            // The local fallback must still fit in the device's request.
            if self.forward_timeout.is_zero() || self.forward_timeout >= self.request_timeout {
                return Err((
                    "fdo.forward_timeout",
                    "must be > 0 and less than fdo.request_timeout".into(),
                ));
            }
        }
        Ok(())
    }

    /// The limits of each session table.
    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            ttl: self.session_ttl,
            unproven_ttl: self.unproven_session_ttl,
            max: self.max_sessions,
            max_per_peer: self.max_sessions_per_peer,
        }
    }

    /// The owner addresses in force for a listener bound to `bound`.
    pub fn owner_addrs(&self, bound: SocketAddr) -> Vec<(Host, u16)> {
        let mut out: Vec<(Host, u16)> = self
            .owner_addresses
            .iter()
            .filter_map(|a| parse_host_port(a).ok())
            .map(|(h, p)| (h, p.unwrap_or(bound.port())))
            .collect();
        if out.is_empty() {
            if !bound.ip().is_unspecified() {
                out.push((Host::Ip(bound.ip()), bound.port()));
            } else if !self.mdns_host.is_empty() {
                out.push((Host::Dns(self.mdns_host.clone()), bound.port()));
            } else {
                out.push((Host::Ip(IpAddr::from([127, 0, 0, 1])), bound.port()));
            }
        }
        out
    }
}

/// Who runs the services.
#[derive(Debug, Clone)]
pub struct Role {
    /// Recorded in the registry as "by whom": `gateway <id>` or `cloud <id>`.
    pub registered_by: String,
    /// Names this owner in its owner certificate.
    pub subject: String,
    /// The gateway's device listener port (default MQTT server); `None` for the cloud.
    pub mqtts_port: Option<u16>,
    /// The uplink state, when the uplink is enabled: TO1 is forwarded to
    /// `fdo.cloud_rendezvous` only while it is Online. `None`: never forwarded.
    pub uplink: Option<tokio::sync::watch::Receiver<crate::uplink::detect::LinkState>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid config: field `{0}`: {1}")]
    Config(&'static str, String),
    #[error(transparent)]
    Fdo(#[from] FdoError),
}

/// The running services.
pub struct FdoService {
    pub addr: SocketAddr,
    /// Notify after a voucher import: the registrar registers it at once.
    pub vouchers_changed: Arc<Notify>,
    pub owner: Option<Arc<StoreOwnerBackend>>,
    /// Counters of the TO1 determination unit (when the rendezvous server runs).
    pub to1_stats: Option<Arc<To1Stats>>,
    /// Counters of the session tables, by table name.
    pub session_stats: Vec<(&'static str, Arc<SessionStats>)>,
}

impl FdoService {
    /// What the metrics endpoint renders of the FDO services (clonable, for its closure).
    pub fn metrics(&self) -> FdoMetrics {
        FdoMetrics {
            to1: self.to1_stats.clone(),
            sessions: self.session_stats.clone(),
        }
    }
}

/// The FDO services' counters: the TO1 determination unit, the session tables and what
/// peers send beyond the specification (`stats.rs`).
#[derive(Debug, Clone)]
pub struct FdoMetrics {
    to1: Option<Arc<To1Stats>>,
    sessions: Vec<(&'static str, Arc<SessionStats>)>,
}

impl FdoMetrics {
    /// Prometheus lines.
    pub fn render(&self, out: &mut String) {
        if let Some(t) = &self.to1 {
            t.render(out);
        }
        super::stats::render(out);
        if !self.sessions.is_empty() {
            SessionStats::render(&self.sessions, out);
        }
    }
}

/// Appends the configured trust anchors to the CA certificate sent to devices.
struct BundleIssuer {
    ca: CaHandle,
    extra_pem: String,
}

impl CredentialIssuer for BundleIssuer {
    fn issue(&self, req: IssueRequest) -> BoxFuture<'_, Result<IssuedCredential, String>> {
        Box::pin(async move {
            let mut c = self.ca.issue(req).await?;
            if !self.extra_pem.is_empty() {
                if !c.ca_pem.ends_with('\n') {
                    c.ca_pem.push('\n');
                }
                c.ca_pem.push_str(&self.extra_pem);
            }
            Ok(c)
        })
    }
}

/// Bind the listener (before anything is announced).
pub async fn bind(cfg: &FdoConfig) -> std::io::Result<Option<TcpListener>> {
    if !cfg.enabled {
        return Ok(None);
    }
    crate::listen(cfg.listen).map(Some)
}

/// Start the HTTP server and the registrar on a bound listener.
#[allow(clippy::too_many_arguments)]
pub fn start(
    cfg: &FdoConfig,
    listener: TcpListener,
    role: &Role,
    store: &Store,
    data_dir: &Path,
    ca: &CaHandle,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<FdoService, ServiceError> {
    let addr = listener.local_addr().map_err(|e| {
        ServiceError::Fdo(FdoError::File {
            path: PathBuf::from("<fdo listener>"),
            cause: e,
        })
    })?;
    let owner_addrs = cfg.owner_addrs(addr);
    let mut server = FdoServer::default();
    let vouchers_changed = Arc::new(Notify::new());
    let rv = if cfg.rendezvous {
        let rv = Arc::new(Rendezvous::new(
            RvConfig {
                sessions: cfg.session_limits(),
                ..RvConfig::default()
            },
            Arc::new(StoreRvStore::open(store, cfg.max_registrations)?),
            None,
        ));
        server.rendezvous = Some(rv.clone());
        let cloud = parse_host_port(&cfg.cloud_rendezvous)
            .ok()
            .filter(|_| !cfg.cloud_rendezvous.is_empty())
            .map(|(h, p)| Endpoint {
                host: h.to_string(),
                port: p.unwrap_or(super::DEFAULT_RV_PORT),
            });
        match (&cloud, &role.uplink) {
            (Some(c), Some(_)) => {
                tracing::info!(cloud = %c, "TO1: forwarded to the cloud rendezvous while the uplink is Online")
            }
            (Some(c), None) => {
                tracing::warn!(cloud = %c, "fdo.cloud_rendezvous is set but the uplink is disabled: TO1 is always answered locally")
            }
            _ => {}
        }
        server.to1 = Some(Arc::new(To1Proxy::new(
            cloud,
            role.uplink.clone(),
            cfg.forward_timeout,
            cfg.session_limits(),
        )));
        Some(rv)
    } else {
        None
    };
    let mut owner_backend = None;
    if cfg.owner {
        // There is always a current owner key, so vouchers can be extended to it.
        owner::current_or_create(data_dir, Curve::P256, &role.subject)?;
        let backend = Arc::new(StoreOwnerBackend::open(
            store.clone(),
            data_dir,
            &role.registered_by,
        )?);
        let mut mqtt_servers = cfg.mqtt_servers.clone();
        if mqtt_servers.is_empty() {
            match role.mqtts_port {
                Some(port) => {
                    let (host, _) = &owner_addrs[0];
                    mqtt_servers.push(format!("mqtts://{host}:{port}"));
                    if !cfg.cloud_mqtt_server.is_empty() {
                        match cfg.mode {
                            Mode::GatewayFirst => mqtt_servers.push(cfg.cloud_mqtt_server.clone()),
                            Mode::CloudFirst => {
                                mqtt_servers.insert(0, cfg.cloud_mqtt_server.clone())
                            }
                        }
                    }
                }
                None => {
                    return Err(ServiceError::Config(
                        "fdo.mqtt_servers",
                        "must name the devices' MQTT servers (this role has no broker)".into(),
                    ))
                }
            }
        }
        let mut extra_pem = String::new();
        for p in &cfg.server_trust {
            let text = std::fs::read_to_string(p).map_err(crate::fdo_wire::file_err(p))?;
            extra_pem.push_str(&text);
            if !extra_pem.ends_with('\n') {
                extra_pem.push('\n');
            }
        }
        tracing::info!(servers = ?mqtt_servers, "FDO owner: devices get these MQTT servers");
        let service = Arc::new(OwnerService::new(
            OwnerConfig {
                sessions: cfg.session_limits(),
                new_rv_info: None,
                mqtt_servers,
            },
            backend.clone(),
            Some(Arc::new(BundleIssuer {
                ca: ca.clone(),
                extra_pem,
            })),
        ));
        server.owner = Some(service);
        owner_backend = Some(backend);
    }
    let limits = HttpLimits {
        max_connections: cfg.max_connections,
        request_timeout: cfg.request_timeout,
        ..HttpLimits::default()
    };
    let server_stats = server.to1.as_ref().map(|p| p.stats.clone());
    let mut session_stats = Vec::new();
    if let Some(rv) = &server.rendezvous {
        session_stats.extend(rv.session_stats());
    }
    if let Some(p) = &server.to1 {
        session_stats.push(("to1_cloud", p.session_stats()));
    }
    if let Some(o) = &server.owner {
        session_stats.push(("to2", o.session_stats()));
    }
    tracker.spawn(http::serve_with(listener, server, limits, shutdown.clone()));
    if let Some(backend) = &owner_backend {
        let mut targets = Vec::new();
        if rv.is_some() {
            let own = if addr.ip().is_unspecified() {
                SocketAddr::new(IpAddr::from([127, 0, 0, 1]), addr.port())
            } else {
                addr
            };
            targets.push(Endpoint::from(own));
        }
        for s in &cfg.to0_servers {
            if let Ok((h, p)) = parse_host_port(s) {
                targets.push(Endpoint {
                    host: h.to_string(),
                    port: p.unwrap_or(super::DEFAULT_RV_PORT),
                });
            }
        }
        if !targets.is_empty() {
            let addrs = owner_addrs
                .iter()
                .map(|(h, port)| To2Addr {
                    ip: match h {
                        Host::Ip(ip) => Some(*ip),
                        Host::Dns(_) => None,
                    },
                    dns: match h {
                        Host::Dns(d) => Some(d.clone()),
                        Host::Ip(_) => None,
                    },
                    port: *port,
                    protocol: transport::HTTP,
                })
                .collect();
            let reg = Registrar {
                store: store.clone(),
                backend: backend.clone(),
                targets,
                addrs,
                wait: cfg.to0_wait,
                wake: vouchers_changed.clone(),
                state: HashMap::new(),
            };
            tracker.spawn(reg.run(shutdown));
        }
    }
    Ok(FdoService {
        addr,
        vouchers_changed,
        owner: owner_backend,
        to1_stats: server_stats,
        session_stats,
    })
}

/// Per (target, GUID): when to try next, and how many failures in a row.
struct RegState {
    next: Instant,
    failures: u32,
}

struct Registrar {
    store: Store,
    backend: Arc<StoreOwnerBackend>,
    targets: Vec<Endpoint>,
    addrs: Vec<To2Addr>,
    wait: Duration,
    wake: Arc<Notify>,
    state: HashMap<(usize, Guid), RegState>,
}

fn jitter(d: Duration) -> Duration {
    use rand::Rng;
    d.mul_f64(rand::thread_rng().gen_range(0.8..=1.2))
}

impl Registrar {
    async fn run(mut self, shutdown: CancellationToken) {
        // Let the HTTP server start accepting first.
        tokio::task::yield_now().await;
        loop {
            let next = self.round().await;
            let sleep = next
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600))
                .max(Duration::from_millis(50));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Vouchers of devices that have not onboarded yet (a device that completed TO2 has a
    /// registry entry naming its old or its new GUID).
    fn pending(&self) -> Vec<OwnershipVoucher> {
        let done: HashSet<String> = match self.backend.registry() {
            Ok(r) => r.into_iter().flat_map(|e| [e.guid, e.old_guid]).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "registrar: cannot read the registry");
                return Vec::new();
            }
        };
        let recs = match self.store.vouchers() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "registrar: cannot read the vouchers");
                return Vec::new();
            }
        };
        recs.into_iter()
            .filter(|r| !done.contains(&r.guid))
            .filter_map(|r| match OwnershipVoucher::decode(&r.voucher) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(guid = %r.guid, error = %e, "registrar: unreadable voucher");
                    None
                }
            })
            .collect()
    }

    /// Register what is due; returns when the next registration is due.
    async fn round(&mut self) -> Option<Instant> {
        let vouchers = self.pending();
        let live: HashSet<Guid> = vouchers.iter().map(|v| v.guid()).collect();
        self.state.retain(|(_, g), _| live.contains(g));
        let mut next: Option<Instant> = None;
        let wait_secs = self.wait.as_secs().min(u32::MAX as u64) as u32;
        for v in &vouchers {
            let guid = v.guid();
            for t in 0..self.targets.len() {
                let now = Instant::now();
                if let Some(s) = self.state.get(&(t, guid)) {
                    if s.next > now {
                        next = Some(next.map_or(s.next, |n| n.min(s.next)));
                        continue;
                    }
                }
                let at = self.register(t, v, wait_secs).await;
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        next
    }

    async fn register(&mut self, t: usize, v: &OwnershipVoucher, wait_secs: u32) -> Instant {
        let guid = v.guid();
        let target = &self.targets[t];
        let key = v
            .verify_chain()
            .ok()
            .and_then(|c| self.backend.owner_key(&c.owner_key));
        let result = match key {
            Some(key) => client::to0_register(target, v, &key, self.addrs.clone(), wait_secs)
                .await
                .map_err(|e| e.to_string()),
            None => Err("the voucher is not extended to one of our owner keys".into()),
        };
        let st = self.state.entry((t, guid)).or_insert(RegState {
            next: Instant::now(),
            failures: 0,
        });
        match result {
            Ok(granted) => {
                st.failures = 0;
                let half = Duration::from_secs(u64::from(granted.max(2)) / 2);
                st.next = Instant::now() + half;
                tracing::info!(%guid, rendezvous = %target, granted_secs = granted, "TO0: registered");
            }
            Err(e) => {
                st.failures += 1;
                let backoff =
                    Duration::from_secs(1u64 << st.failures.min(8)).min(Duration::from_secs(300));
                st.next = Instant::now() + jitter(backoff);
                tracing::warn!(%guid, rendezvous = %target, error = %e, retry_in = ?backoff, "TO0 failed");
            }
        }
        st.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            parse_host_port("outpost.local").unwrap(),
            (Host::Dns("outpost.local".into()), None)
        );
        assert_eq!(
            parse_host_port("10.0.0.1:8041").unwrap(),
            (Host::Ip("10.0.0.1".parse().unwrap()), Some(8041))
        );
        assert_eq!(
            parse_host_port("[::1]:9").unwrap(),
            (Host::Ip("::1".parse().unwrap()), Some(9))
        );
        assert_eq!(
            parse_host_port("fe80::1").unwrap(),
            (Host::Ip("fe80::1".parse().unwrap()), None)
        );
        assert!(parse_host_port("a b").is_err());
        assert!(parse_host_port("host:0").is_err());
        assert!(parse_host_port("host:x").is_err());
        assert_eq!(
            parse_mqtt_url("mqtts://gw.local:8883").unwrap(),
            ("gw.local".into(), 8883)
        );
        assert_eq!(
            parse_mqtt_url("mqtts://[::1]:1").unwrap(),
            ("::1".into(), 1)
        );
        assert!(parse_mqtt_url("mqtt://x:1").is_err());
    }

    #[test]
    fn owner_addresses_default_from_the_listener() {
        let mut c = FdoConfig::default();
        let any: SocketAddr = "0.0.0.0:8041".parse().unwrap();
        assert_eq!(
            c.owner_addrs(any),
            vec![(Host::Dns("outpost.local".into()), 8041)]
        );
        let lo: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        assert_eq!(
            c.owner_addrs(lo),
            vec![(Host::Ip("127.0.0.1".parse().unwrap()), 5555)]
        );
        c.owner_addresses = vec!["gw.example".into(), "10.1.1.1:80".into()];
        assert_eq!(
            c.owner_addrs(lo),
            vec![
                (Host::Dns("gw.example".into()), 5555),
                (Host::Ip("10.1.1.1".parse().unwrap()), 80)
            ]
        );
    }

    #[test]
    fn validation_names_fields() {
        let mut c = FdoConfig {
            mqtt_servers: vec!["tcp://x".into()],
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "fdo.mqtt_servers");
        c.mqtt_servers.clear();
        c.mdns_host = "outpost.lan".into();
        assert_eq!(c.validate().unwrap_err().0, "fdo.mdns_host");
        c.mdns_host.clear();
        c.owner_addresses = vec!["::::".into()];
        assert_eq!(c.validate().unwrap_err().0, "fdo.owner_addresses");
        c.owner_addresses.clear();
        c.cloud_rendezvous = "cloud example:1".into();
        assert_eq!(c.validate().unwrap_err().0, "fdo.cloud_rendezvous");
        c.cloud_rendezvous = "0.0.0.0:8041".into();
        assert_eq!(c.validate().unwrap_err().0, "fdo.cloud_rendezvous");
        c.cloud_rendezvous = "rv.example.com".into();
        assert!(c.validate().is_ok());
        c.forward_timeout = c.request_timeout;
        assert_eq!(c.validate().unwrap_err().0, "fdo.forward_timeout");
        c.cloud_rendezvous.clear();
        assert!(c.validate().is_ok(), "only checked when forwarding");
        c.cloud_rendezvous = "rv.example.com".into();
        c.forward_timeout = Duration::from_secs(3);
        c.rendezvous = false;
        assert_eq!(c.validate().unwrap_err().0, "fdo.cloud_rendezvous");
        c.cloud_rendezvous.clear();
        c.owner = false;
        assert_eq!(c.validate().unwrap_err().0, "fdo.enabled");
        c.enabled = false;
        assert!(c.validate().is_ok());
    }
}
