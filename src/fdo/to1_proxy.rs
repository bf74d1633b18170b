//! The determination unit: who answers a device's TO1, decided by the uplink state.
//!
//! Devices are made with the gateway as their rendezvous address. For each new TO1 session
//! (TO1.HelloRV, 30) the gateway decides:
//!
//! - uplink **Online** and `fdo.cloud_rendezvous` set: the request is forwarded to the
//!   cloud rendezvous server and its answer relayed unchanged (HTTP status, Message-Type,
//!   Authorization token, body); the device then runs TO2 with the cloud owner;
//! - otherwise (Offline, uplink disabled, no cloud rendezvous configured): the local
//!   rendezvous server answers, pointing the device at the gateway's own owner.
//!
//! Sessions are sticky: TO1 is two round trips, and the token of the first answer belongs
//! to whoever gave it. A session whose HelloRVAck came from the cloud continues at the cloud
//! (its token is kept in a bounded, expiring table), every other TO1.ProveToRV (32) goes to
//! the local server, whatever the state has become in between.
//!
//! Fallbacks, for a *new* session only (message 30):
//! - forwarding fails at the transport level (connection refused, timeout, no FDO answer):
//!   the link died before detection noticed; answered locally, counted as
//!   `forward_failed` (and `local`);
//! - the cloud answers error 255 with code 6 (ResourceNotFound: it has no registration for
//!   this GUID) while the local rendezvous has one (a voucher imported into or delegated to
//!   the gateway): answered locally, counted as `cloud_unknown` (and `local`). Without a
//!   local registration the cloud's error is relayed unchanged; every other cloud error is
//!   relayed unchanged.
//!
//! A ProveToRV of a cloud session whose forwarding fails is answered with error 255
//! (InternalServerError): the session is the cloud's, so it cannot be finished here; the
//! device starts over after its RVDelay and that new session is decided afresh.
//!
//! TO0 (20, 22) is never forwarded (it is handled by the local rendezvous only), nor is TO2.

use super::client::{self, Endpoint, HttpReply};
use super::rendezvous::{Rendezvous, RvError};
use super::session::{Reply, SessionLimits, SessionStats, Sessions};
use crate::fdo_wire::msg::{msg_type, To1HelloRv};
use crate::fdo_wire::types::ErrorMessage;
use crate::fdo_wire::{ErrorCode, Guid};
use crate::uplink::detect::LinkState;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Longest session token accepted from the cloud (go-fdo and Outpost use well under 100).
const MAX_TOKEN: usize = 512;

/// Counters of the determination unit (rendered by the gateway's metrics endpoint).
#[derive(Debug, Default)]
pub struct To1Stats {
    /// New TO1 sessions whose HelloRV was answered by the cloud (relayed).
    pub forwarded: AtomicU64,
    /// New TO1 sessions answered by the local rendezvous server (any reason).
    pub local: AtomicU64,
    /// Forwards that failed at the transport level (either message).
    pub forward_failed: AtomicU64,
    /// HelloRV the cloud did not know (error 6) answered locally instead.
    pub cloud_unknown: AtomicU64,
}

impl To1Stats {
    /// Prometheus lines.
    pub fn render(&self, out: &mut String) {
        let l = |v: &AtomicU64| v.load(Ordering::Relaxed);
        for (name, help, v) in [
            (
                "outpost_fdo_to1_forwarded_total",
                "TO1 sessions forwarded to the cloud rendezvous (uplink Online).",
                l(&self.forwarded),
            ),
            (
                "outpost_fdo_to1_local_total",
                "TO1 sessions answered by the local rendezvous (Offline, no cloud, or fallback).",
                l(&self.local),
            ),
            (
                "outpost_fdo_to1_forward_failed_total",
                "TO1 forwards to the cloud rendezvous that failed at the transport level.",
                l(&self.forward_failed),
            ),
            (
                "outpost_fdo_to1_cloud_unknown_total",
                "TO1 sessions the cloud did not know (error 6) answered from a local registration.",
                l(&self.cloud_unknown),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
    }
}

/// Where TO1 goes.
pub struct To1Proxy {
    /// The cloud rendezvous server; `None`: never forward.
    cloud: Option<Endpoint>,
    /// The uplink state; `None` (uplink disabled): never forward.
    uplink: Option<watch::Receiver<LinkState>>,
    timeout: Duration,
    /// Tokens of sessions started at the cloud.
    cloud_sessions: Sessions<Guid>,
    pub stats: Arc<To1Stats>,
}

/// The answer to one TO1 message.
#[derive(Debug)]
pub enum To1Answer {
    /// The cloud's answer, to be relayed unchanged.
    Relayed(HttpReply),
    /// The local rendezvous server's answer.
    Local(Result<Reply, RvError>),
    /// A cloud session could not be continued.
    Failed(ErrorCode, String),
}

impl To1Proxy {
    pub fn new(
        cloud: Option<Endpoint>,
        uplink: Option<watch::Receiver<LinkState>>,
        timeout: Duration,
        sessions: SessionLimits,
    ) -> To1Proxy {
        To1Proxy {
            cloud,
            uplink,
            timeout,
            cloud_sessions: Sessions::new(sessions),
            stats: Arc::new(To1Stats::default()),
        }
    }

    /// Whether this unit handles `msg` (TO1 only; TO0 and TO2 are never forwarded).
    pub fn handles(msg: u8) -> bool {
        matches!(msg, msg_type::TO1_HELLO_RV | msg_type::TO1_PROVE_TO_RV)
    }

    /// Counters of the table of cloud sessions.
    pub fn session_stats(&self) -> Arc<SessionStats> {
        self.cloud_sessions.stats.clone()
    }

    /// Handle TO1.HelloRV (30) or TO1.ProveToRV (32) from `peer`.
    pub async fn handle(
        &self,
        local: &Rendezvous,
        msg: u8,
        token: Option<&str>,
        body: &[u8],
        peer: Option<IpAddr>,
    ) -> To1Answer {
        if msg == msg_type::TO1_PROVE_TO_RV {
            return self.prove(local, token, body, peer).await;
        }
        // HelloRV: a new session. A message that does not decode is refused locally (the
        // cloud would refuse it too).
        let guid = match To1HelloRv::decode(body) {
            Ok(h) => h.guid,
            Err(_) => return To1Answer::Local(local.handle(msg, token, body, peer)),
        };
        let link = self.uplink.as_ref().map(|rx| *rx.borrow());
        // As logged: `online`, `offline` or `disabled`.
        let state = link.map_or("disabled", LinkState::as_str);
        let cloud = match (&self.cloud, link) {
            (None, _) => {
                return self.local(
                    local,
                    peer,
                    guid,
                    state,
                    "no cloud rendezvous configured",
                    body,
                )
            }
            (Some(_), None) => {
                return self.local(local, peer, guid, state, "uplink disabled", body)
            }
            (Some(_), Some(LinkState::Offline)) => {
                return self.local(local, peer, guid, state, "uplink offline", body)
            }
            (Some(c), Some(LinkState::Online)) => c,
        };
        match self.forward(cloud, msg, None, body).await {
            Ok(r) if r.msg_type == Some(msg_type::TO1_HELLO_RV_ACK) => {
                let Some(t) = r.token.as_deref() else {
                    // Unreachable: `forward` requires a token on HelloRVAck.
                    return To1Answer::Failed(ErrorCode::InternalServerError, "no token".into());
                };
                if let Err(e) = self.cloud_sessions.open(t, peer, guid) {
                    tracing::warn!(%guid, error = %e, "TO1: cannot track the cloud session");
                    return To1Answer::Failed(ErrorCode::InternalServerError, e.to_string());
                }
                self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%guid, uplink = state, target = %cloud, "TO1: forwarded to the cloud rendezvous");
                To1Answer::Relayed(r)
            }
            Ok(r) => {
                // Error 255 from the cloud.
                let e = ErrorMessage::decode(&r.body).ok();
                let code = e.as_ref().map(|e| e.code).unwrap_or(0);
                if code == ErrorCode::ResourceNotFound.code() && self.registered_here(local, &guid)
                {
                    self.stats.cloud_unknown.fetch_add(1, Ordering::Relaxed);
                    return self.local(
                        local,
                        peer,
                        guid,
                        state,
                        "not registered at the cloud rendezvous, registered here",
                        body,
                    );
                }
                self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    %guid,
                    uplink = state,
                    target = %cloud,
                    code,
                    error = e.as_ref().map(|e| e.message.as_str()).unwrap_or("-"),
                    "TO1: forwarded to the cloud rendezvous, which refused it (relayed)"
                );
                To1Answer::Relayed(r)
            }
            Err(e) => {
                self.stats.forward_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%guid, uplink = state, target = %cloud, error = %e, "TO1: forwarding to the cloud rendezvous failed; answering locally");
                let reason = format!("cloud rendezvous unreachable ({e})");
                self.local(local, peer, guid, state, &reason, body)
            }
        }
    }

    fn registered_here(&self, local: &Rendezvous, guid: &Guid) -> bool {
        matches!(local.store().get(guid), Ok(Some(_)))
    }

    fn local(
        &self,
        local: &Rendezvous,
        peer: Option<IpAddr>,
        guid: Guid,
        state: &str,
        reason: &str,
        body: &[u8],
    ) -> To1Answer {
        self.stats.local.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%guid, uplink = state, target = "local", reason, "TO1: answered by the local rendezvous");
        To1Answer::Local(local.handle(msg_type::TO1_HELLO_RV, None, body, peer))
    }

    /// ProveToRV: to whoever started the session.
    async fn prove(
        &self,
        local: &Rendezvous,
        token: Option<&str>,
        body: &[u8],
        peer: Option<IpAddr>,
    ) -> To1Answer {
        let msg = msg_type::TO1_PROVE_TO_RV;
        let guid = token.and_then(|t| self.cloud_sessions.take(t));
        let (Some(guid), Some(cloud)) = (guid, &self.cloud) else {
            return To1Answer::Local(local.handle(msg, token, body, peer));
        };
        match self.forward(cloud, msg, token, body).await {
            Ok(r) => {
                tracing::debug!(%guid, target = %cloud, msg_type = ?r.msg_type, "TO1.ProveToRV relayed from the cloud");
                To1Answer::Relayed(r)
            }
            Err(e) => {
                self.stats.forward_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%guid, target = %cloud, error = %e, "TO1.ProveToRV: forwarding to the cloud rendezvous failed (the session is the cloud's; the device starts over)");
                To1Answer::Failed(
                    ErrorCode::InternalServerError,
                    format!("cloud rendezvous unreachable: {e}"),
                )
            }
        }
    }

    /// POST to the cloud within the forward timeout. Ok: an FDO answer to relay (the
    /// expected message with a usable token, or error 255); Err: why there is none
    /// (connection refused, timeout, or something that is not an FDO answer), a transport
    /// failure.
    async fn forward(
        &self,
        cloud: &Endpoint,
        msg: u8,
        token: Option<&str>,
        body: &[u8],
    ) -> Result<HttpReply, String> {
        let r =
            match tokio::time::timeout(self.timeout, client::post(cloud, msg, token, body)).await {
                Err(_) => return Err(format!("no answer within {:?}", self.timeout)),
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(r)) => r,
            };
        let want = msg + 1;
        match r.msg_type {
            Some(msg_type::ERROR) => Ok(r),
            Some(t) if t == want && r.status == 200 => {
                let token_ok = r
                    .token
                    .as_deref()
                    .is_some_and(|t| !t.is_empty() && t.len() <= MAX_TOKEN);
                if want == msg_type::TO1_HELLO_RV_ACK && !token_ok {
                    return Err("HelloRVAck without a usable session token".into());
                }
                Ok(r)
            }
            other => Err(format!(
                "not an FDO answer to message {msg}: HTTP status {}, Message-Type {other:?}",
                r.status
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdo::http::{self, FdoServer};
    use crate::fdo::rendezvous::{MemoryRvStore, RvConfig};

    fn rv() -> Arc<Rendezvous> {
        Arc::new(Rendezvous::new(
            RvConfig::default(),
            Arc::new(MemoryRvStore::new(10)),
            None,
        ))
    }

    fn hello(g: u8) -> Vec<u8> {
        To1HelloRv {
            guid: Guid([g; 16]),
            sig_info: crate::fdo_wire::types::SigInfo {
                sg_type: -7,
                info: Vec::new(),
            },
        }
        .encode()
    }

    async fn cloud_server() -> (Endpoint, tokio_util::sync::CancellationToken) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = Endpoint::from(l.local_addr().unwrap());
        let stop = tokio_util::sync::CancellationToken::new();
        let server = FdoServer {
            rendezvous: Some(rv()),
            ..Default::default()
        };
        tokio::spawn(http::serve_with(
            l,
            server,
            http::HttpLimits::default(),
            stop.clone(),
        ));
        (ep, stop)
    }

    fn proxy(cloud: Option<Endpoint>, state: LinkState) -> (To1Proxy, watch::Sender<LinkState>) {
        let (tx, rx) = watch::channel(state);
        (
            To1Proxy::new(
                cloud,
                Some(rx),
                Duration::from_secs(2),
                SessionLimits {
                    max: 4,
                    ..Default::default()
                },
            ),
            tx,
        )
    }

    fn code(a: &To1Answer) -> Option<u16> {
        match a {
            To1Answer::Relayed(r) => ErrorMessage::decode(&r.body).ok().map(|e| e.code),
            To1Answer::Local(Err(e)) => {
                use crate::fdo::session::ProtocolFailure;
                Some(e.error_code().code())
            }
            _ => None,
        }
    }

    #[tokio::test]
    async fn offline_is_local_and_online_is_forwarded_with_errors_relayed() {
        let (cloud, _stop) = cloud_server().await;
        let local = rv();
        let (p, tx) = proxy(Some(cloud), LinkState::Offline);
        // Offline: local (not registered here: error 6 from the local server).
        let a = p.handle(&local, 30, None, &hello(1), None).await;
        assert!(matches!(a, To1Answer::Local(Err(_))), "{a:?}");
        assert_eq!(code(&a), Some(6));
        // Online: the cloud's error 6 is relayed (no local registration to fall back to).
        tx.send_replace(LinkState::Online);
        let a = p.handle(&local, 30, None, &hello(1), None).await;
        assert!(matches!(a, To1Answer::Relayed(_)), "{a:?}");
        assert_eq!(code(&a), Some(6));
        // Garbage is refused locally, never forwarded.
        let a = p.handle(&local, 30, None, &[0xff], None).await;
        assert!(matches!(a, To1Answer::Local(Err(_))), "{a:?}");
        let s = &p.stats;
        assert_eq!(s.local.load(Ordering::Relaxed), 1);
        assert_eq!(s.forwarded.load(Ordering::Relaxed), 1);
        assert_eq!(s.forward_failed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn unreachable_cloud_falls_back_for_new_sessions_and_unknown_tokens_stay_local() {
        // A port nobody listens on.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            Endpoint::from(l.local_addr().unwrap())
        };
        let local = rv();
        let (p, _tx) = proxy(Some(dead), LinkState::Online);
        let a = p.handle(&local, 30, None, &hello(2), None).await;
        assert!(matches!(a, To1Answer::Local(_)), "{a:?}");
        assert_eq!(p.stats.forward_failed.load(Ordering::Relaxed), 1);
        assert_eq!(p.stats.local.load(Ordering::Relaxed), 1);
        // A ProveToRV with a token the cloud never gave goes to the local server.
        let a = p.handle(&local, 32, Some("abc"), &[0x80], None).await;
        assert!(
            matches!(a, To1Answer::Local(Err(RvError::NoSession(32)))),
            "{a:?}"
        );
    }

    #[tokio::test]
    async fn a_cloud_session_stays_at_the_cloud_and_fails_if_the_cloud_is_gone() {
        // A fake cloud that answers HelloRVAck with a token, then dies.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = Endpoint::from(l.local_addr().unwrap());
        let srv = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let body = crate::fdo_wire::msg::To1HelloRvAck {
                nonce: crate::fdo_wire::msg::Nonce([7; 16]),
                sig_info: crate::fdo_wire::types::SigInfo {
                    sg_type: -7,
                    info: Vec::new(),
                },
            }
            .encode();
            let head = format!("HTTP/1.1 200 OK\r\nMessage-Type: 31\r\nAuthorization: Bearer cloudtok\r\nContent-Length: {}\r\n\r\n", body.len());
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(&body).await.unwrap();
            // Listener dropped here: the cloud is gone.
        });
        let local = rv();
        let (p, tx) = proxy(Some(ep), LinkState::Online);
        let a = p.handle(&local, 30, None, &hello(3), None).await;
        let To1Answer::Relayed(r) = a else {
            panic!("{a:?}")
        };
        assert_eq!(r.token.as_deref(), Some("cloudtok"));
        srv.await.unwrap();
        // Offline now, but the session is the cloud's: forwarded (and failing), never local.
        tx.send_replace(LinkState::Offline);
        let a = p.handle(&local, 32, Some("cloudtok"), &[0x80], None).await;
        assert!(
            matches!(a, To1Answer::Failed(ErrorCode::InternalServerError, _)),
            "{a:?}"
        );
        assert_eq!(p.stats.forwarded.load(Ordering::Relaxed), 1);
        assert_eq!(p.stats.forward_failed.load(Ordering::Relaxed), 1);
        // The token was used up.
        let a = p.handle(&local, 32, Some("cloudtok"), &[0x80], None).await;
        assert!(
            matches!(a, To1Answer::Local(Err(RvError::NoSession(32)))),
            "{a:?}"
        );
    }

    #[tokio::test]
    async fn no_cloud_or_no_uplink_never_forwards() {
        let local = rv();
        let p = To1Proxy::new(
            None,
            None,
            Duration::from_secs(1),
            SessionLimits {
                max: 4,
                ..Default::default()
            },
        );
        let a = p.handle(&local, 30, None, &hello(4), None).await;
        assert!(matches!(a, To1Answer::Local(_)));
        let (cloud, _stop) = cloud_server().await;
        let p = To1Proxy::new(
            Some(cloud),
            None,
            Duration::from_secs(1),
            SessionLimits {
                max: 4,
                ..Default::default()
            },
        );
        let a = p.handle(&local, 30, None, &hello(4), None).await;
        assert!(matches!(a, To1Answer::Local(_)));
        assert_eq!(p.stats.local.load(Ordering::Relaxed), 1);
        assert_eq!(p.stats.forwarded.load(Ordering::Relaxed), 0);
    }
}
