//! The FDO HTTP binding (server side), on axum: `POST /fdo/101/msg/{n}` with a CBOR body.
//!
//! Replies carry `Content-Type: application/cbor`, `Message-Type: <n>` and
//! `Authorization: Bearer <token>` (the session; the client sends it back). A failure is
//! answered with message 255 `[code, prevMsgId, string, #6.1(timestamp), null]`, HTTP status
//! 500 (as go-fdo does), and logged once with its cause. The same server carries the
//! rendezvous (TO0, TO1) and the owner (TO2), either or both.

use super::owner_service::OwnerService;
use super::rendezvous::Rendezvous;
use super::session::{bearer, ProtocolFailure, Reply};
use super::to1_proxy::{To1Answer, To1Proxy};
use crate::fdo_wire::types::ErrorMessage;
use crate::fdo_wire::ErrorCode;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// Largest request body.
pub const MAX_BODY: usize = crate::fdo_wire::encrypt::MAX_ENCRYPTED + 1024;

/// The services behind one HTTP listener.
#[derive(Clone, Default)]
pub struct FdoServer {
    pub rendezvous: Option<Arc<Rendezvous>>,
    pub owner: Option<Arc<OwnerService>>,
    /// The determination unit: decides who answers TO1 (the local rendezvous or the cloud's).
    /// Without it the local rendezvous answers every TO1.
    pub to1: Option<Arc<To1Proxy>>,
}

/// The router: `POST /fdo/101/msg/:n`.
pub fn router(server: FdoServer) -> Router {
    Router::new()
        .route("/fdo/101/msg/:n", post(handle))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Arc::new(server))
}

/// Limits of the HTTP listener.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Open connections; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Time allowed for one request: headers, body and answer. Also the longest wait for
    /// the headers of the next request on a kept-alive connection.
    pub request_timeout: Duration,
    /// A connection is closed (gracefully) after this long, whatever it does.
    pub max_connection_age: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 1024,
            request_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(120),
        }
    }
}

/// Serve on `listener` with the default [`HttpLimits`] until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: FdoServer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        t.cancel();
    });
    serve_with(listener, server, HttpLimits::default(), token).await;
    Ok(())
}

/// Serve on `listener` until `shutdown` is cancelled, then let open requests finish (5 s
/// at most). A slow or stalled client holds one connection slot for at most
/// `request_timeout` per request; past `max_connections`, new connections wait.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    server: FdoServer,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let router = router(server);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let conns = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "FDO listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (router, limits, shutdown) = (router.clone(), limits.clone(), shutdown.clone());
        conns.spawn(async move {
            let _permit = permit;
            serve_connection(stream, peer, router, limits, shutdown).await;
        });
    }
    conns.close();
    if tokio::time::timeout(Duration::from_secs(5), conns.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = conns.len(),
            "FDO listener: connections still open after 5 s"
        );
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let timeout = limits.request_timeout;
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        // A declared length over the limit is refused before any of the body is read.
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        async move {
            if let Some(len) = declared.filter(|l| *l > MAX_BODY as u64) {
                tracing::warn!(%peer, len, "FDO request body too large");
                let mut r = error_response(
                    0,
                    ErrorCode::MessageBodyError,
                    format!("body of {len} bytes exceeds the limit of {MAX_BODY}"),
                );
                *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(r);
            }
            match tokio::time::timeout(timeout, router.call(req)).await {
                Ok(Ok(resp)) => Ok::<Response, Infallible>(resp),
                Ok(Err(never)) => match never {},
                Err(_) => {
                    tracing::warn!(%peer, ?timeout, "FDO request timed out");
                    Ok(error_response(
                        0,
                        ErrorCode::MessageBodyError,
                        format!("request not completed within {timeout:?}"),
                    ))
                }
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let age = tokio::time::sleep(limits.max_connection_age);
    tokio::pin!(age);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(timeout, conn.as_mut()).await.unwrap_or(Ok(()))
        }
        _ = &mut age => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(timeout, conn.as_mut()).await.unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "FDO connection ended with an error");
    }
}

fn cbor_response(status: StatusCode, msg_type: u8, token: Option<&str>, body: Vec<u8>) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/cbor"),
    );
    h.insert("message-type", HeaderValue::from(msg_type as u16));
    if let Some(t) = token {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}")) {
            h.insert(header::AUTHORIZATION, v);
        }
    }
    r
}

fn error_response(prev: u8, code: ErrorCode, message: String) -> Response {
    let e = ErrorMessage {
        code: code.code(),
        prev_msg_id: prev,
        message,
        timestamp: u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).ok(),
        correlation_id: None,
    };
    cbor_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        crate::fdo_wire::msg::msg_type::ERROR,
        None,
        e.encode(),
    )
}

fn fail<E: ProtocolFailure>(prev: u8, peer: &Option<String>, e: E) -> Response {
    let code = e.error_code();
    tracing::warn!(
        msg = prev,
        code = code.code(),
        peer = peer.as_deref().unwrap_or("-"),
        error = %e,
        "FDO request refused"
    );
    error_response(prev, code, e.to_string())
}

/// An answer of the cloud rendezvous, relayed unchanged: status, Message-Type, token, body.
fn relayed(r: super::client::HttpReply) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, r.body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/cbor"),
    );
    if let Some(t) = r.msg_type {
        h.insert("message-type", HeaderValue::from(t as u16));
    }
    if let Some(v) = r
        .token
        .and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok())
    {
        h.insert(header::AUTHORIZATION, v);
    }
    resp
}

fn ok(r: Reply) -> Response {
    cbor_response(StatusCode::OK, r.msg_type, Some(&r.token), r.body)
}

async fn handle(
    State(server): State<Arc<FdoServer>>,
    Path(n): Path<String>,
    peer: Option<ConnectInfo<SocketAddr>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let peer_addr = peer.map(|ConnectInfo(a)| a);
    let peer_ip = peer_addr.map(|a| a.ip());
    let peer = peer_addr.map(|a| a.to_string());
    let Ok(msg) = n.parse::<u8>() else {
        tracing::warn!(path = %n, "FDO request for an unknown message type");
        return error_response(
            0,
            ErrorCode::InvalidMessageError,
            format!("unknown message type {n:?}"),
        );
    };
    let token = bearer(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    if msg == crate::fdo_wire::msg::msg_type::ERROR {
        if let Some(owner) = &server.owner {
            let e = owner.device_error(token, &body);
            tracing::warn!(peer = peer.as_deref().unwrap_or("-"), error = %e, "FDO peer reported an error; session closed");
        }
        return cbor_response(StatusCode::OK, msg, None, Vec::new());
    }
    if let (true, Some(rv), Some(to1)) = (To1Proxy::handles(msg), &server.rendezvous, &server.to1) {
        return match to1.handle(rv, msg, token, &body, peer_ip).await {
            To1Answer::Relayed(r) => relayed(r),
            To1Answer::Local(Ok(r)) => ok(r),
            To1Answer::Local(Err(e)) => fail(msg, &peer, e),
            To1Answer::Failed(code, message) => error_response(msg, code, message),
        };
    }
    if let (true, Some(rv)) = (Rendezvous::handles(msg), &server.rendezvous) {
        return match rv.handle(msg, token, &body, peer_ip) {
            Ok(r) => ok(r),
            Err(e) => fail(msg, &peer, e),
        };
    }
    if let (true, Some(owner)) = (OwnerService::handles(msg), &server.owner) {
        return match owner.handle(msg, token, &body, peer_addr).await {
            Ok(r) => ok(r),
            Err(e) => fail(msg, &peer, e),
        };
    }
    tracing::warn!(
        msg,
        peer = peer.as_deref().unwrap_or("-"),
        "FDO message not served here"
    );
    error_response(
        msg,
        ErrorCode::InvalidMessageError,
        format!("message {msg} is not served here"),
    )
}
