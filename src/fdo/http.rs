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
use super::types::ErrorMessage;
use super::ErrorCode;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;

/// Largest request body.
pub const MAX_BODY: usize = super::encrypt::MAX_ENCRYPTED + 1024;

/// The services behind one HTTP listener.
#[derive(Clone, Default)]
pub struct FdoServer {
    pub rendezvous: Option<Arc<Rendezvous>>,
    pub owner: Option<Arc<OwnerService>>,
}

/// The router: `POST /fdo/101/msg/:n`.
pub fn router(server: FdoServer) -> Router {
    Router::new()
        .route("/fdo/101/msg/:n", post(handle))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Arc::new(server))
}

/// Serve on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: FdoServer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(server).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
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
        super::msg::msg_type::ERROR,
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
    let peer = peer.map(|ConnectInfo(a)| a.to_string());
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
    if msg == super::msg::msg_type::ERROR {
        if let Some(owner) = &server.owner {
            let e = owner.device_error(token, &body);
            tracing::warn!(peer = peer.as_deref().unwrap_or("-"), error = %e, "FDO peer reported an error; session closed");
        }
        return cbor_response(StatusCode::OK, msg, None, Vec::new());
    }
    if let (true, Some(rv)) = (Rendezvous::handles(msg), &server.rendezvous) {
        return match rv.handle(msg, token, &body) {
            Ok(r) => ok(r),
            Err(e) => fail(msg, &peer, e),
        };
    }
    if let (true, Some(owner)) = (OwnerService::handles(msg), &server.owner) {
        return match owner.handle(msg, token, &body, peer.clone()).await {
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
