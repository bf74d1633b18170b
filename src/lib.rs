//! Outpost: an edge gateway whose promise is that nothing stops when the internet does.
//!
//! `run` wires the capabilities together; each lives in its own module and owns its state.
//! See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]

pub mod acl;
pub mod admin;
pub mod authz;
pub mod broker;
pub mod ca;
pub mod can;
pub mod config;
pub mod credentials;
pub mod device;
pub mod duration;
pub mod fdo;
pub mod fdo_wire;
pub mod fleet;
pub mod frontdoor;
pub mod mdns;
pub mod metrics;
pub mod registry;
pub mod sessions;
pub mod store;
pub mod switching;
pub mod sync;
pub mod systemd;
pub mod uplink;
pub mod web;

use crate::ca::{Ca, CaHandle};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// File in the data dir listing the bound addresses of a running gateway.
pub const ENDPOINTS_FILE: &str = "endpoints.json";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("data directory {path}: {cause}")]
    DataDir {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot bind {what} on {addr}: {cause}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error(transparent)]
    FrontDoor(#[from] frontdoor::FrontDoorError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Uplink(#[from] uplink::UplinkError),
    #[error(transparent)]
    Fdo(#[from] fdo::service::ServiceError),
    #[error(transparent)]
    Sessions(#[from] sessions::SessionsError),
    #[error(transparent)]
    Can(#[from] can::service::CanError),
    #[error("credential inventory: {0}")]
    Credentials(#[from] credentials::inventory::InventoryError),
    #[error("credentials: {0}")]
    CredentialsService(#[from] credentials::service::CredentialsError),
    #[error("admin page: {0}")]
    Web(String),
    #[error("restoring retained messages: {0}")]
    Restore(#[from] frontdoor::restore::RestoreError),
}

/// Addresses a running gateway is bound to (also written to `endpoints.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Endpoints {
    pub gateway_id: String,
    pub mqtts: SocketAddr,
    pub plain: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    /// FDO rendezvous + owner (HTTP), if enabled.
    #[serde(default)]
    pub fdo: Option<SocketAddr>,
    /// The admin page (`[web]`), if on.
    #[serde(default)]
    pub web: Option<SocketAddr>,
    pub pid: u32,
}

impl Endpoints {
    pub fn read(data_dir: &Path) -> Option<Endpoints> {
        let text = std::fs::read_to_string(data_dir.join(ENDPOINTS_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Bind the admin page's listener (before anything is announced); `None` when it is off
/// or there is no inventory to show.
async fn bind_web(
    cfg: &web::WebConfig,
    credentials: bool,
) -> Result<Option<TcpListener>, RunError> {
    if cfg.enabled && !credentials {
        tracing::warn!(
            "admin page off: it shows the credential inventory, and credentials.enabled = false"
        );
        return Ok(None);
    }
    web::bind(cfg).await.map_err(|cause| RunError::Bind {
        what: "web",
        addr: cfg.listen,
        cause,
    })
}

/// Serve the admin page over the credentials service.
fn serve_web(
    listener: TcpListener,
    credentials: &credentials::service::CredentialsHandle,
    cfg: &web::WebConfig,
    data_dir: &Path,
    identity: Option<(&str, &str)>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let admins = web::admins::Admins::open(cfg.admins_path(data_dir))
        .map_err(|e| RunError::Web(e.to_string()))?;
    let mut state = web::WebState::new(credentials.clone(), admins, cfg.clone());
    if cfg.tls {
        let (cert, key) =
            identity.ok_or_else(|| RunError::Web("web.tls: no server certificate".into()))?;
        state.tls = Some(web::tls_config(cert, key).map_err(|e| RunError::Web(e.to_string()))?);
    }
    let s = shutdown.clone();
    tracker.spawn(async move {
        if let Err(e) = web::serve(listener, state, s).await {
            tracing::error!(error = %e, "admin page failed");
        }
    });
    Ok(())
}

/// Create the data directory, or tighten an existing one, to 0700 (it holds the CA key):
/// `mode` on create is filtered by the umask and does nothing to a directory that exists.
pub fn prepare_data_dir(dir: &Path) -> Result<(), RunError> {
    let err = |source| RunError::DataDir {
        path: dir.to_path_buf(),
        cause: source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    store::restrict(dir, 0o700).map_err(err)
}

/// Open the store and the CA of a data directory (used by `run` and by the offline CLI).
pub fn open_ca(config: &Config) -> Result<Ca, RunError> {
    let dir = &config.gateway.data_dir;
    prepare_data_dir(dir)?;
    let store = Store::open(&dir.join("store"))?;
    Ok(Ca::open_or_create(
        dir,
        &config.gateway_id(),
        &config.ca,
        store,
    )?)
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    listen(addr).map_err(|cause| RunError::Bind { what, addr, cause })
}

/// Listen backlog of every TCP listener: a thousand devices returning at once must not
/// overflow the kernel's queue (tokio's default is 128; the kernel caps it at somaxconn).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Bind a TCP listener with [`LISTEN_BACKLOG`] (and SO_REUSEADDR, as tokio's `bind` does).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The "listening" line of a bound listener (under the `outpost` target, as the rest of
/// the start-up lines).
fn log_listening(what: &str, addr: SocketAddr) {
    tracing::info!(listener = what, %addr, "listening");
}

fn web_label(cfg: &web::WebConfig) -> &'static str {
    if cfg.tls {
        "admin page (HTTPS)"
    } else {
        "admin page (HTTP)"
    }
}

fn local(l: &TcpListener, what: &'static str, addr: SocketAddr) -> Result<SocketAddr, RunError> {
    l.local_addr()
        .map_err(|cause| RunError::Bind { what, addr, cause })
}

/// Run the gateway until `shutdown` is cancelled, then drain and flush.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let config = Arc::new(config);
    let data_dir = config.gateway.data_dir.clone();
    let gateway_id = config.gateway_id();
    let can_profiles = if config.can.enabled {
        Some(can::service::load_profiles(&config.can)?)
    } else {
        None
    };
    let ca = open_ca(&config)?;
    let store = ca.store().clone();
    let admin_store = store.clone();
    let (server_cert, server_key) = ca.server_identity(&config.ca.server_names)?;
    let material = frontdoor::TlsMaterial::new(
        &server_cert,
        &server_key,
        ca.ca_der(),
        &config.tls.extra_client_cas,
    )?;
    let (ca, ca_thread) = CaHandle::spawn(ca)?;

    // Bind everything before announcing anything.
    let mqtts = bind("mqtts", config.listeners.mqtts).await?;
    let plain = match config.listeners.plain_addr() {
        Some(a) => Some(bind("plain", a).await?),
        None => None,
    };
    let metrics_l = if config.metrics.enabled {
        Some(bind("metrics", config.metrics.listen).await?)
    } else {
        None
    };
    let fdo_l = fdo::service::bind(&config.fdo)
        .await
        .map_err(|cause| RunError::Bind {
            what: "fdo",
            addr: config.fdo.listen,
            cause,
        })?;
    let admin_l = admin::bind(&data_dir)?;
    let web_l = bind_web(&config.web, config.credentials.enabled).await?;
    let core = broker::start(
        &config.broker,
        broker::CoreLimits {
            max_packet_size: config.limits.max_packet_size,
            max_inflight: config.limits.max_inflight,
            max_connections: config.limits.max_connections,
        },
    )?;

    let metrics = Arc::new(Metrics::default());
    let tracker = TaskTracker::new();
    let tls = frontdoor::follow_tls(
        material,
        ca.clone(),
        config.ca.server_names.clone(),
        shutdown.clone(),
    )?;
    let fdo_store = store.clone();
    let sync_on = config.uplink.enabled
        && config.sync.enabled
        && config.fdo.enabled
        && config.fdo.owner
        && fdo_l.is_some();
    let (sync_tx, sync_rx) = tokio::sync::mpsc::channel(256);
    let (durable, sessions_thread) =
        sessions::SessionsHandle::spawn(store.clone(), config.sessions.clone())?;
    let mut shared = frontdoor::Shared::new(
        Arc::new(frontdoor::config::FrontDoorSettings {
            limits: config.limits.clone(),
            frontdoor: config.frontdoor.clone(),
            acl: config.acl.clone(),
            shutdown_grace: config.shutdown.grace,
            sessions_inflight: config.sessions.max_inflight,
        }),
        core.clone(),
        metrics.clone(),
        ca.revocations(),
    )?;
    shared.durable = Some(durable.clone());
    // The core keeps nothing on disk: what was retained goes back in before anyone (the
    // uplink's own state publisher included) can publish or subscribe.
    let restored =
        frontdoor::restore::retained_into_core(&core, &durable, &shared.bounds, &config.frontdoor)
            .await?;
    if restored.retained > 0 {
        tracing::info!(
            retained = restored.retained,
            ms = restored.elapsed.as_millis() as u64,
            "retained messages restored into the routing core"
        );
    }
    let can_core = core.clone();
    let can_store = store.clone();
    let cred_core = core.clone();
    let cred_store = store.clone();
    let (can_tx, can_rx) = if config.can.enabled && config.uplink.enabled {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let (cred_down_tx, cred_down_rx) = if config.credentials.enabled && config.uplink.enabled {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let (uplink, queue_thread) = uplink::start(
        &config.uplink,
        &gateway_id,
        store,
        core,
        &tracker,
        shutdown.clone(),
        sync_on.then_some(sync_tx),
        Some(durable.clone()),
        can_tx,
        cred_down_tx,
    )?;
    shared.uplink = config.uplink.enabled.then(|| uplink.clone());
    let shared = Arc::new(shared);
    let can = match can_profiles {
        Some(profiles) => {
            let ctx = can::service::Context {
                gateway_id: gateway_id.clone(),
                sessions: durable.clone(),
                core: can_core,
                queue: config.uplink.enabled.then(|| uplink.queue.clone()),
                store: can_store,
                down: can_rx,
            };
            Some(can::service::start(
                &config.can,
                profiles,
                ctx,
                &tracker,
                shutdown.clone(),
            )?)
        }
        None => None,
    };
    let credentials = if config.credentials.enabled {
        let inventory = credentials::inventory::Inventory::open("", &cred_store).await?;
        let live_sessions = shared.clone();
        let deps = credentials::service::Deps {
            ca: ca.clone(),
            core: Some(cred_core),
            durable: Some(durable.clone()),
            live: Arc::new(move |d: &str| live_sessions.sessions.is_live(d)),
            issuer: credentials::service::issuer_name(ca.ca_der()),
            vehicle: (!config.credentials.vehicle.is_empty())
                .then(|| config.credentials.vehicle.clone()),
            up: cred_down_rx.map(|down| credentials::service::UpSide {
                queue: uplink.queue.clone(),
                gateway: gateway_id.clone(),
                // The vehicle check-in is signed with the uplink's own key and certificate.
                key_pem: std::fs::read_to_string(&config.uplink.key_file).ok(),
                cert_pem: std::fs::read_to_string(&config.uplink.cert_file).ok(),
                down,
                link: uplink.state.clone(),
            }),
            fleet: None,
        };
        Some(credentials::service::start(
            config.credentials.clone(),
            Arc::new(inventory),
            deps,
            &tracker,
            shutdown.clone(),
        ))
    } else {
        None
    };

    let endpoints = Endpoints {
        gateway_id: gateway_id.clone(),
        mqtts: local(&mqtts, "mqtts", config.listeners.mqtts)?,
        plain: match &plain {
            Some(l) => Some(local(l, "plain", config.listeners.mqtts)?),
            None => None,
        },
        metrics: match &metrics_l {
            Some(l) => Some(local(l, "metrics", config.metrics.listen)?),
            None => None,
        },
        fdo: None,
        web: match &web_l {
            Some(l) => Some(local(l, "web", config.web.listen)?),
            None => None,
        },
        pid: std::process::id(),
    };
    let mut endpoints = endpoints;
    if let (Some(l), Some(c)) = (web_l, &credentials) {
        serve_web(
            l,
            c,
            &config.web,
            &data_dir,
            Some((&server_cert, &server_key)),
            &tracker,
            &shutdown,
        )?;
    }
    let fdo_svc = match fdo_l {
        Some(l) => {
            let role = fdo::service::Role {
                registered_by: format!("gateway {gateway_id}"),
                subject: gateway_id.clone(),
                mqtts_port: Some(endpoints.mqtts.port()),
                uplink: config.uplink.enabled.then(|| uplink.state.clone()),
            };
            let svc = fdo::service::start(
                &config.fdo,
                l,
                &role,
                &fdo_store,
                &data_dir,
                &ca,
                &tracker,
                shutdown.clone(),
            )?;
            endpoints.fdo = Some(svc.addr);
            if let (true, Some(owner)) = (sync_on, &svc.owner) {
                let applier = sync::Applier {
                    me: role.registered_by.clone(),
                    registry: owner.shared_registry().clone(),
                    ca: ca.clone(),
                    store: fdo_store.clone(),
                    data_dir: data_dir.clone(),
                    vouchers_changed: Some(svc.vouchers_changed.clone()),
                };
                sync::start_gateway(
                    applier,
                    uplink.queue.clone(),
                    sync_rx,
                    &tracker,
                    shutdown.clone(),
                );
                tracing::info!("registry sync with the cloud: on");
            }
            Some(svc)
        }
        None => None,
    };
    log_listening("mqtts (devices, TLS + client certificate)", endpoints.mqtts);
    if let Some(a) = endpoints.fdo {
        log_listening("fdo (onboarding: rendezvous + owner, HTTP)", a);
    }
    if let Some(a) = endpoints.plain {
        log_listening("plain MQTT (local processes)", a);
    }
    if let Some(a) = endpoints.metrics {
        log_listening("metrics (Prometheus)", a);
    }
    if let Some(a) = endpoints.web {
        log_listening(web_label(&config.web), a);
    }
    tracing::info!(path = %data_dir.join(admin::SOCKET).display(), "admin socket");

    tracker.spawn(frontdoor::accept_tls(
        mqtts,
        tls,
        shared.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));
    if let Some(l) = plain {
        tracker.spawn(frontdoor::accept_plain(
            l,
            shared.clone(),
            tracker.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(l) = metrics_l {
        let (m, u, s) = (metrics.clone(), uplink.clone(), shutdown.clone());
        let fdo_metrics = fdo_svc.as_ref().map(|f| f.metrics());
        let d = durable.clone();
        let can_stats = can.as_ref().map(|c| c.stats.clone());
        let cred_stats = credentials.as_ref().map(|c| c.stats.clone());
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
            let mut text = m.render();
            u.render_metrics(&mut text);
            d.stats.render(&mut text);
            if let Some(c) = &can_stats {
                c.render(&mut text);
            }
            if let Some(c) = &cred_stats {
                c.render(&mut text);
            }
            if let Some(f) = &fdo_metrics {
                f.render(&mut text);
            }
            text
        });
        tracker.spawn(async move {
            if let Err(e) = metrics::serve(l, render, s).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
    }
    if config.uplink.enabled && config.fdo.mode == fdo::service::Mode::CloudFirst {
        let primary = config
            .fdo
            .mqtt_servers
            .first()
            .cloned()
            .unwrap_or_else(|| config.fdo.cloud_mqtt_server.clone());
        tracker.spawn(switching::run(
            primary,
            config.fdo.switch_spread,
            uplink.clone(),
            shared.clone(),
            shared.broker.clone(),
            shutdown.clone(),
        ));
    }
    tracker.spawn(admin::serve(
        admin_l,
        admin::Services {
            ca: ca.clone(),
            store: admin_store,
            data_dir: data_dir.clone(),
            vouchers_changed: fdo_svc.as_ref().map(|f| f.vouchers_changed.clone()),
            sync_wake: None,
            credentials: credentials.clone(),
        },
        tracker.clone(),
        shutdown.clone(),
    ));
    spawn_crl_refresh(&ca, &config, &tracker, &shutdown);
    let advert = if config.mdns.enabled {
        let instance = if config.mdns.instance.is_empty() {
            gateway_id.clone()
        } else {
            config.mdns.instance.clone()
        };
        match mdns::Advert::start(
            &instance,
            &gateway_id,
            endpoints.mqtts.port(),
            &ca::fingerprint(ca.ca_der()),
        ) {
            Ok(mut a) => {
                if let (Some(addr), false) = (endpoints.fdo, config.fdo.mdns_host.is_empty()) {
                    if let Err(e) = a.add_fdo(&instance, &config.fdo.mdns_host, addr.port()) {
                        tracing::warn!(error = %e, "mDNS: FDO service not advertised");
                    }
                }
                Some(a)
            }
            Err(e) => {
                tracing::warn!(error = %e, "mDNS advertisement not started");
                None
            }
        }
    } else {
        None
    };

    let ep_text = serde_json::to_string_pretty(&endpoints).unwrap_or_default();
    ca::write_file(&data_dir.join(ENDPOINTS_FILE), ep_text.as_bytes(), 0o644)?;
    systemd::ready();
    tracker.spawn(systemd::watchdog(shutdown.clone()));
    tracing::info!(gateway = %gateway_id, "gateway ready");

    shutdown.cancelled().await;
    tracing::info!(grace = ?config.shutdown.grace, "shutting down: no new connections, draining");
    drain(&tracker, config.shutdown.grace).await;
    if let Some(a) = advert {
        let _ = tokio::task::spawn_blocking(move || a.stop()).await;
    }
    let _ = std::fs::remove_file(data_dir.join(admin::SOCKET));
    let _ = std::fs::remove_file(data_dir.join(ENDPOINTS_FILE));
    drop(shared);
    drop(can);
    // Tasks abandoned after the grace period may still hold queue handles: stop it explicitly.
    uplink.queue.stop().await;
    drop(uplink);
    drop(ca);
    // The queue owner flushes and exits once the last handle is gone.
    let joined = tokio::task::spawn_blocking(move || queue_thread.join());
    if tokio::time::timeout(Duration::from_secs(5), joined)
        .await
        .is_err()
    {
        tracing::error!("uplink queue did not finish flushing in 5 s");
    }
    // The sessions owner flushes every batch before answering; it exits (and flushes once
    // more) when the last handle is gone.
    drop(durable);
    let joined = tokio::task::spawn_blocking(move || sessions_thread.join());
    if tokio::time::timeout(Duration::from_secs(5), joined)
        .await
        .is_err()
    {
        tracing::debug!("sessions owner still held by abandoned tasks at exit");
    }
    join_store_owner(ca_thread).await;
    tracing::info!("stopped");
    Ok(())
}

/// Tell systemd we are stopping, then wait up to `grace` for every task to finish.
async fn drain(tracker: &TaskTracker, grace: Duration) {
    systemd::stopping();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            open = tracker.len(),
            "grace period over: remaining tasks abandoned"
        );
    }
}

/// Re-sign the CRL well before it expires.
fn spawn_crl_refresh(
    ca: &CaHandle,
    config: &Config,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let (ca, s) = (ca.clone(), shutdown.clone());
    let every = config.ca.crl_validity / 4;
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = s.cancelled() => break,
                _ = tokio::time::sleep(every) => { let _ = ca.refresh_crl().await; }
            }
        }
    });
}

/// The CA thread owns the store: it flushes and exits once every handle is gone.
async fn join_store_owner(ca_thread: std::thread::JoinHandle<()>) {
    let joined = tokio::task::spawn_blocking(move || ca_thread.join());
    if tokio::time::timeout(Duration::from_secs(5), joined)
        .await
        .is_err()
    {
        tracing::error!("store owner did not finish flushing in 5 s");
    }
}

/// Addresses a running `outpost cloud` is bound to (`endpoints.json` in its data dir).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CloudEndpoints {
    pub cloud_id: String,
    pub fdo: SocketAddr,
    /// The admin page (`[web]`), if on.
    #[serde(default)]
    pub web: Option<SocketAddr>,
    pub pid: u32,
}

impl CloudEndpoints {
    pub fn read(data_dir: &Path) -> Option<CloudEndpoints> {
        let text = std::fs::read_to_string(data_dir.join(ENDPOINTS_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Run the cloud role (`outpost cloud`) until `shutdown` is cancelled: the same CA, store,
/// rendezvous server, owner and device registry as a gateway, without the MQTT side (the
/// cloud's broker is any standard broker). Uses the `[gateway]` (id, data dir), `[ca]`,
/// `[fdo]` and `[shutdown]` sections.
pub async fn run_cloud(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let data_dir = config.gateway.data_dir.clone();
    let id = config.gateway_id();
    if !config.fdo.enabled || !config.fdo.owner {
        return Err(RunError::Fdo(fdo::service::ServiceError::Config(
            "fdo.enabled",
            "the cloud role serves FDO: fdo.enabled and fdo.owner must be true".into(),
        )));
    }
    if config.fdo.mqtt_servers.is_empty() {
        return Err(RunError::Fdo(fdo::service::ServiceError::Config(
            "fdo.mqtt_servers",
            "must name the devices' MQTT servers (the cloud role has no broker)".into(),
        )));
    }
    let ca = open_ca(&config)?;
    let store = ca.store().clone();
    let (ca, ca_thread) = CaHandle::spawn(ca)?;
    let fdo_l = fdo::service::bind(&config.fdo)
        .await
        .map_err(|cause| RunError::Bind {
            what: "fdo",
            addr: config.fdo.listen,
            cause,
        })?
        .ok_or(RunError::Fdo(fdo::service::ServiceError::Config(
            "fdo.enabled",
            "must be true".into(),
        )))?;
    let admin_l = admin::bind(&data_dir)?;
    let web_l = bind_web(&config.web, config.credentials.enabled).await?;
    let tracker = TaskTracker::new();
    let role = fdo::service::Role {
        registered_by: format!("cloud {id}"),
        subject: id.clone(),
        mqtts_port: None,
        uplink: None,
    };
    let svc = fdo::service::start(
        &config.fdo,
        fdo_l,
        &role,
        &store,
        &data_dir,
        &ca,
        &tracker,
        shutdown.clone(),
    )?;
    log_listening("fdo (onboarding: rendezvous + owner, HTTP)", svc.addr);
    let sync_wake = Arc::new(tokio::sync::Notify::new());
    if let (true, true, Some(owner)) = (config.sync.enabled, config.uplink.enabled, &svc.owner) {
        let applier = sync::Applier {
            me: role.registered_by.clone(),
            registry: owner.shared_registry().clone(),
            ca: ca.clone(),
            store: store.clone(),
            data_dir: data_dir.clone(),
            vouchers_changed: Some(svc.vouchers_changed.clone()),
        };
        let client_id = if config.uplink.client_id.is_empty() {
            id.clone()
        } else {
            config.uplink.client_id.clone()
        };
        tracker.spawn(sync::run_cloud(
            config.uplink.clone(),
            client_id,
            config.sync.gateways.clone(),
            applier,
            sync_wake.clone(),
            shutdown.clone(),
        ));
        tracing::info!(broker = %config.uplink.host, "registry sync with the gateways: on");
    }
    if config.fleet.enabled && config.uplink.enabled {
        let base = if config.uplink.client_id.is_empty() {
            id.clone()
        } else {
            config.uplink.client_id.clone()
        };
        tracker.spawn(fleet::service::run(
            config.fleet.clone(),
            config.uplink.clone(),
            format!("{base}-fleet"),
            store.clone(),
            shutdown.clone(),
        ));
        tracing::info!(broker = %config.uplink.host, "fleet server (CAN): on");
    }
    let credentials = if config.credentials.enabled {
        let inventory =
            credentials::inventory::Inventory::open(&config.cloud.database_url, &store).await?;
        tracing::info!(
            store = if config.cloud.database_url.is_empty() {
                "embedded"
            } else {
                "postgresql"
            },
            "fleet credential inventory open"
        );
        let deps = credentials::service::Deps {
            ca: ca.clone(),
            core: None,
            durable: None,
            live: Arc::new(|_: &str| false),
            issuer: credentials::service::issuer_name(ca.ca_der()),
            vehicle: None,
            up: None,
            fleet: if config.uplink.enabled {
                Some(credentials::service::FleetSide::new(
                    &config.uplink,
                    &config.cloud,
                    format!(
                        "{}-credentials",
                        if config.uplink.client_id.is_empty() {
                            &id
                        } else {
                            &config.uplink.client_id
                        }
                    ),
                    &store,
                )?)
            } else {
                None
            },
        };
        Some(credentials::service::start(
            config.credentials.clone(),
            Arc::new(inventory),
            deps,
            &tracker,
            shutdown.clone(),
        ))
    } else {
        None
    };
    tracker.spawn(admin::serve(
        admin_l,
        admin::Services {
            ca: ca.clone(),
            store: store.clone(),
            data_dir: data_dir.clone(),
            vouchers_changed: Some(svc.vouchers_changed.clone()),
            sync_wake: Some(sync_wake),
            credentials: credentials.clone(),
        },
        tracker.clone(),
        shutdown.clone(),
    ));
    spawn_crl_refresh(&ca, &config, &tracker, &shutdown);
    let cloud_web = match (web_l, &credentials) {
        (Some(l), Some(c)) => {
            let identity = if config.web.tls {
                Some(ca.server_identity(&config.ca.server_names).await?)
            } else {
                None
            };
            let addr = l.local_addr().ok();
            if let Some(a) = addr {
                log_listening(web_label(&config.web), a);
            }
            serve_web(
                l,
                c,
                &config.web,
                &data_dir,
                identity.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
                &tracker,
                &shutdown,
            )?;
            addr
        }
        _ => None,
    };
    let ep = CloudEndpoints {
        cloud_id: id.clone(),
        fdo: svc.addr,
        web: cloud_web,
        pid: std::process::id(),
    };
    let ep_text = serde_json::to_string_pretty(&ep).unwrap_or_default();
    ca::write_file(&data_dir.join(ENDPOINTS_FILE), ep_text.as_bytes(), 0o644)?;
    systemd::ready();
    tracker.spawn(systemd::watchdog(shutdown.clone()));
    tracing::info!(cloud = %id, "cloud ready");

    shutdown.cancelled().await;
    drain(&tracker, config.shutdown.grace).await;
    let _ = std::fs::remove_file(data_dir.join(admin::SOCKET));
    let _ = std::fs::remove_file(data_dir.join(ENDPOINTS_FILE));
    drop(svc);
    drop(store);
    drop(ca);
    join_store_owner(ca_thread).await;
    tracing::info!("stopped");
    Ok(())
}
