//! The front door: every client connection enters here and nowhere else.
//!
//! It owns the listeners, TLS (rustls with the ring provider, client certificate required,
//! CRL checked), the connection limit and the per-connection timeouts. Each accepted socket
//! gets its own task, so a client that stalls its handshake delays nobody. After the
//! handshake the identity comes from the certificate; [`conn`] then proxies MQTT to the
//! routing core and enforces the ACL packet by packet.

pub mod bounds;
pub mod config;
pub mod conn;
pub mod mqtt;
pub mod restore;

use crate::acl::Rules;
use crate::broker::BrokerLink;
use crate::ca::{serial_hex, Revocations};
use crate::metrics::Metrics;
use config::FrontDoorSettings;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum FrontDoorError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("cannot read trusted CA file {path}: {reason}")]
    ExtraCa { path: PathBuf, reason: String },
    #[error("server key: {0}")]
    Key(String),
    #[error("ACL: {0}")]
    Acl(#[from] crate::acl::AclError),
}

/// Everything the TLS layer needs that does not change with revocations.
pub struct TlsMaterial {
    pub server_cert_pem: String,
    pub ca_der: Vec<u8>,
    pub server_chain: Vec<CertificateDer<'static>>,
    pub server_key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
}

impl TlsMaterial {
    pub fn new(
        server_cert_pem: &str,
        server_key_pem: &str,
        ca_der: &[u8],
        extra_cas: &[PathBuf],
    ) -> Result<TlsMaterial, FrontDoorError> {
        let (server_chain, server_key) = server_parts(server_cert_pem, server_key_pem, ca_der)?;
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(ca_der.to_vec()))?;
        for path in extra_cas {
            let text = std::fs::read(path).map_err(|e| FrontDoorError::ExtraCa {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let mut n = 0;
            for c in rustls_pemfile::certs(&mut text.as_slice()) {
                let c = c.map_err(|e| FrontDoorError::ExtraCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                roots.add(c)?;
                n += 1;
            }
            if n == 0 {
                return Err(FrontDoorError::ExtraCa {
                    path: path.clone(),
                    reason: "no PEM certificate in file".into(),
                });
            }
        }
        Ok(TlsMaterial {
            server_cert_pem: server_cert_pem.to_string(),
            ca_der: ca_der.to_vec(),
            server_chain,
            server_key,
            roots: Arc::new(roots),
        })
    }

    /// The same trust with a new server certificate (after renewal).
    pub fn with_server(
        &self,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<TlsMaterial, FrontDoorError> {
        let (server_chain, server_key) = server_parts(cert_pem, key_pem, &self.ca_der)?;
        Ok(TlsMaterial {
            server_cert_pem: cert_pem.to_string(),
            ca_der: self.ca_der.clone(),
            server_chain,
            server_key,
            roots: self.roots.clone(),
        })
    }

    /// A server config that requires a client certificate chaining to our roots and not on
    /// the CRL. CRLs are fixed per config, so a new one is built on every revocation.
    pub fn server_config(&self, rev: &Revocations) -> Result<Arc<ServerConfig>, FrontDoorError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut crls = Vec::new();
        if !rev.crl_der.is_empty() {
            crls.push(CertificateRevocationListDer::from(rev.crl_der.clone()));
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .with_crls(crls)
                .only_check_end_entity_revocation()
                // Certificates of extra trusted CAs are not covered by our CRL.
                .allow_unknown_revocation_status()
                .build()
                .map_err(|e| FrontDoorError::Verifier(e.to_string()))?;
        let cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.server_chain.clone(), self.server_key.clone_key())?;
        Ok(Arc::new(cfg))
    }
}

/// The server chain (leaf + gateway CA) and key from PEM.
fn server_parts(
    cert_pem: &str,
    key_pem: &str,
    ca_der: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), FrontDoorError> {
    let mut chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| FrontDoorError::Key(e.to_string()))?;
    chain.push(CertificateDer::from(ca_der.to_vec()));
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| FrontDoorError::Key(e.to_string()))?
        .ok_or_else(|| FrontDoorError::Key("no private key in server.key".into()))?;
    Ok((chain, key))
}

/// Prefix of every local (plain listener) client id in the routing core: `local~X`.
pub const LOCAL_PREFIX: &str = "local~";
/// Prefix of the gateway's own clients of the routing core (`outpost~uplink`, ...).
pub const INTERNAL_PREFIX: &str = "outpost~";

/// Longest client id a local client may use, in bytes of UTF-8.
pub const LOCAL_ID_MAX: usize = 256;

/// Why a local client id is refused (CONNACK 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LocalIdError {
    #[error("longer than {LOCAL_ID_MAX} bytes")]
    TooLong,
    #[error("contains a control character or a line separator")]
    Control,
}

/// Client ids on the plain listener: any UTF-8 string (the parser already refuses invalid
/// UTF-8 and NUL) of 1..=`LOCAL_ID_MAX` bytes without control characters (C0, DEL, C1) or
/// the Unicode line and paragraph separators. Those are refused because ids end up in log
/// lines and on terminals, where they could forge lines or send escape sequences; the
/// length bounds what a session costs. Spaces, `|`, `~`, `/` and any other printable
/// character are fine (`local_core_id` keeps them in the local namespace).
pub fn validate_local_id(id: &str) -> Result<(), LocalIdError> {
    if id.len() > LOCAL_ID_MAX {
        return Err(LocalIdError::TooLong);
    }
    if id
        .chars()
        .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        return Err(LocalIdError::Control);
    }
    Ok(())
}

/// Characters `local_core_id` percent-encodes: `%` itself (so the encoding can be undone,
/// and two ids never meet) and the four the routing core refuses in client ids.
const CORE_ID_ESCAPED: [char; 5] = ['%', '/', '+', '#', '$'];

/// The routing core's client id for the local client `id`: `local~` and the id, with
/// `CORE_ID_ESCAPED` percent-encoded. Device identities cannot contain `~` and the gateway's
/// own clients start with `outpost~`, so the three namespaces (devices, `local~`,
/// `outpost~`) never meet; the encoding is injective, so two local ids never share a
/// session, and it never yields `%` followed by anything but `25`, `2F`, `2B`, `23` or `24`,
/// which leaves `local~%a…` to `assigned_core_id`.
pub fn local_core_id(id: &str) -> String {
    let mut out = String::with_capacity(LOCAL_PREFIX.len() + id.len());
    out.push_str(LOCAL_PREFIX);
    for c in id.chars() {
        if CORE_ID_ESCAPED.contains(&c) {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The routing core's client id for a local client that sent an empty client id with
/// CleanSession 1: `local~%assigned-<tag>`, which no client id can produce
/// (`local_core_id`), so nobody can connect into, or take over, such a session.
pub fn assigned_core_id(tag: &str) -> String {
    format!("{LOCAL_PREFIX}%assigned-{tag}")
}

/// One live session per identity. A new connection for an identity first ends the old
/// session and waits until it is gone before it reaches the routing core: left to itself,
/// the core's clean-up of the old connection can race with, and tear down, the new one.
#[derive(Default)]
pub struct SessionRegistry {
    slots: std::sync::Mutex<HashMap<String, SessionSlot>>,
}

struct SessionSlot {
    lock: Arc<tokio::sync::Mutex<()>>,
    kick: CancellationToken,
}

/// Held for the whole life of a session; `kicked` fires when a newer one takes over.
pub struct SessionLease {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    pub kicked: CancellationToken,
}

impl SessionRegistry {
    /// Take over `identity`: end the current session (if any) and wait up to `limit` until
    /// it has ended. `None` if it did not end in time.
    pub async fn take_over(
        &self,
        identity: &str,
        limit: std::time::Duration,
    ) -> Option<SessionLease> {
        let (lock, old, kicked) = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let slot = slots
                .entry(identity.to_string())
                .or_insert_with(|| SessionSlot {
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                    kick: CancellationToken::new(),
                });
            let old = std::mem::replace(&mut slot.kick, CancellationToken::new());
            (slot.lock.clone(), old, slot.kick.clone())
        };
        old.cancel();
        let guard = tokio::time::timeout(limit, lock.lock_owned()).await.ok()?;
        Some(SessionLease {
            _guard: guard,
            kicked,
        })
    }

    /// Core client ids with a live session now (devices by identity, local clients as
    /// `local~X`).
    pub fn live(&self) -> Vec<String> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .filter(|(_, s)| s.lock.try_lock().is_err())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether `identity` has a live session now.
    pub fn is_live(&self, identity: &str) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .get(identity)
            .is_some_and(|s| s.lock.try_lock().is_err())
    }

    /// Forget identities nobody holds or waits for (called when a session ends).
    pub fn release(&self, identity: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(identity) {
            if Arc::strong_count(&slot.lock) == 1 && slot.lock.try_lock().is_ok() {
                slots.remove(identity);
            }
        }
    }
}

/// What a connection task needs, shared by all of them.
pub struct Shared {
    pub cfg: Arc<FrontDoorSettings>,
    pub broker: BrokerLink,
    pub metrics: Arc<Metrics>,
    pub device_rules: Rules,
    pub local_rules: Rules,
    pub revocations: watch::Receiver<Arc<Revocations>>,
    pub permits: Arc<Semaphore>,
    /// One live session per identity: a new connection takes over from the old one.
    pub sessions: SessionRegistry,
    /// What each identity holds in the core (filters, retained messages), bounded.
    pub bounds: bounds::Bounds,
    /// Set when the uplink is enabled: PUBLISHes on uplink topics are made durable first.
    pub uplink: Option<crate::uplink::UplinkHandle>,
    /// Retained messages and persistent sessions kept on disk (always set by `run`).
    pub durable: Option<crate::sessions::SessionsHandle>,
    /// Gateway-wide budget for the warning about sessions the routing core ended (at most
    /// one per connection, so a per-connection budget would not bound them).
    pub core_closed_warn: std::sync::Mutex<bounds::WarnLimiter>,
}

impl Shared {
    pub fn new(
        cfg: Arc<FrontDoorSettings>,
        broker: BrokerLink,
        metrics: Arc<Metrics>,
        revocations: watch::Receiver<Arc<Revocations>>,
    ) -> Result<Shared, FrontDoorError> {
        Ok(Shared {
            device_rules: Rules::new(&cfg.acl.device_publish, &cfg.acl.device_subscribe)?,
            local_rules: Rules::new(&cfg.acl.local_publish, &cfg.acl.local_subscribe)?,
            permits: Arc::new(Semaphore::new(cfg.limits.max_connections)),
            sessions: SessionRegistry::default(),
            bounds: bounds::Bounds::default(),
            core_closed_warn: std::sync::Mutex::new(bounds::WarnLimiter::gateway_wide(
                &cfg.frontdoor,
            )),
            cfg,
            broker,
            metrics,
            revocations,
            uplink: None,
            durable: None,
        })
    }
}

/// How often the server certificate is checked for renewal while running.
const SERVER_CERT_CHECK: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Keep the TLS config current: rebuilt on every CRL change, and when the CA renews the
/// server certificate (checked every few hours, so a gateway that runs for years never
/// serves an expired certificate).
pub fn follow_tls(
    mut material: TlsMaterial,
    ca: crate::ca::CaHandle,
    server_names: Vec<String>,
    shutdown: CancellationToken,
) -> Result<watch::Receiver<Arc<ServerConfig>>, FrontDoorError> {
    let mut revocations = ca.revocations();
    let first = material.server_config(&revocations.borrow_and_update())?;
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut check = tokio::time::interval(SERVER_CERT_CHECK);
        check.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = revocations.changed() => {
                    if changed.is_err() { break; }
                }
                _ = check.tick() => {
                    match ca.server_identity(&server_names).await {
                        Ok((cert, key)) if cert != material.server_cert_pem => {
                            match material.with_server(&cert, &key) {
                                Ok(m) => {
                                    material = m;
                                    tracing::info!("server certificate renewed");
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "renewed server certificate unusable");
                                    continue;
                                }
                            }
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot check the server certificate");
                            continue;
                        }
                    }
                }
            }
            let rev = revocations.borrow_and_update().clone();
            match material.server_config(&rev) {
                Ok(c) => {
                    tx.send_replace(c);
                }
                Err(e) => tracing::error!(error = %e, "cannot rebuild the TLS config"),
            }
        }
    });
    Ok(rx)
}

/// Accept connections until shutdown: each one is counted against the connection limit
/// and handed to `start` with its permit and its own cancellation token.
async fn accept_loop(
    what: &'static str,
    listener: TcpListener,
    shared: &Shared,
    shutdown: &CancellationToken,
    mut start: impl FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit, CancellationToken),
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { accept_error(e).await; continue; }
            },
        };
        let Some(permit) = admit(shared, peer) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        start(tcp, peer, permit, shutdown.child_token());
    }
    tracing::info!(listener = what, "listener closed");
}

/// Accept TLS device connections until shutdown.
pub async fn accept_tls(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    accept_loop(
        "mqtts",
        listener,
        &shared.clone(),
        &shutdown,
        |tcp, peer, permit, token| {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
            let shared = shared.clone();
            tracker.spawn(
            async move {
                let _permit = permit;
                let hs = tokio::time::timeout(
                    shared.cfg.limits.tls_handshake_timeout,
                    acceptor.accept(tcp),
                );
                let stream = tokio::select! {
                    _ = token.cancelled() => return,
                    r = hs => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            shared.metrics.inc(|m| &m.tls_handshake_failures);
                            tracing::info!(error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            shared.metrics.inc(|m| &m.tls_handshake_timeouts);
                            tracing::info!("TLS handshake timed out");
                            return;
                        }
                    },
                };
                let Some(peer_cert) = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                else {
                    shared.metrics.inc(|m| &m.tls_handshake_failures);
                    return;
                };
                let identity = match conn::CertIdentity::from_der(peer_cert) {
                    Ok(i) => i,
                    Err(reason) => {
                        shared.metrics.inc(|m| &m.connections_refused_identity);
                        tracing::warn!(%reason, "certificate carries no usable device identity");
                        return;
                    }
                };
                let span =
                    tracing::info_span!("device", id = %identity.id, serial = %identity.serial);
                // Boxed: the futures of `serve` and `session` each keep their argument for
                // their whole life, which would be two copies of the TLS session (rustls'
                // `ServerConnection` is large) in every connection's task.
                conn::serve(Box::new(stream), conn::Peer::Device(identity), shared, token)
                    .instrument(span)
                    .await;
            }
            .instrument(tracing::info_span!("conn", %peer, tls = true)),
        );
        },
    )
    .await;
}

/// Accept plain connections (loopback by default) until shutdown.
pub async fn accept_plain(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    accept_loop(
        "plain",
        listener,
        &shared.clone(),
        &shutdown,
        |tcp, peer, permit, token| {
            let shared = shared.clone();
            tracker.spawn(
                async move {
                    let _permit = permit;
                    conn::serve(tcp, conn::Peer::Local, shared, token).await;
                }
                .instrument(
                    tracing::info_span!("conn", %peer, tls = false, id = tracing::field::Empty),
                ),
            );
        },
    )
    .await;
}

fn admit(shared: &Shared, peer: SocketAddr) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match shared.permits.clone().try_acquire_owned() {
        Ok(p) => {
            shared.metrics.inc(|m| &m.connections_total);
            Some(p)
        }
        Err(_) => {
            shared.metrics.inc(|m| &m.connections_refused_limit);
            tracing::warn!(%peer, limit = shared.cfg.limits.max_connections, "connection limit reached; closing");
            None
        }
    }
}

async fn accept_error(e: std::io::Error) {
    // EMFILE and friends: back off briefly instead of spinning.
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// Connect to the routing core.
pub async fn dial_core(link: &BrokerLink) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(link.addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

pub(crate) fn serial_of(raw: &[u8]) -> String {
    serial_hex(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ids_are_printable_utf8_of_bounded_length() {
        for ok in [
            "a",
            "my client",
            "mosqpub|1234-host",
            "mosq-AbC123",
            "é ü 中文",
            "a~b",
            "a/b+#$%",
        ] {
            assert_eq!(validate_local_id(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(validate_local_id(&"x".repeat(LOCAL_ID_MAX)), Ok(()));
        assert_eq!(
            validate_local_id(&"x".repeat(LOCAL_ID_MAX + 1)),
            Err(LocalIdError::TooLong)
        );
        for bad in [
            "a\nb",
            "\t",
            "a\u{1b}[31m",
            "\u{7f}",
            "\u{85}",
            "a\u{2028}b",
        ] {
            assert_eq!(
                validate_local_id(bad),
                Err(LocalIdError::Control),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn local_core_ids_stay_in_their_namespace_and_never_meet() {
        assert_eq!(local_core_id("alice"), "local~alice");
        assert_eq!(local_core_id("my client"), "local~my client");
        // The core refuses `/ + # $` in client ids; `%` is escaped so that none collide.
        assert_eq!(local_core_id("a/b+c#d$e%f"), "local~a%2Fb%2Bc%23d%24e%25f");
        assert_ne!(local_core_id("a%2F"), local_core_id("a/"));
        assert_ne!(local_core_id("%assigned-1"), assigned_core_id("1"));
        for id in ["x", "outpost~uplink", "~", "%assigned-0123456789abcdef"] {
            let core = local_core_id(id);
            assert!(core.starts_with(LOCAL_PREFIX) && !core.starts_with(INTERNAL_PREFIX));
            assert!(
                crate::acl::validate_identity(&core).is_err(),
                "a device id: {core}"
            );
            assert!(!core.contains(['/', '+', '#', '$']), "{core}");
            assert!(!core.starts_with("local~%a"), "{core}");
        }
        assert!(assigned_core_id("00ff").starts_with("local~%a"));
    }
}
