//! The admin page and its JSON API (issue 13, seed 001's display unit): a login for the
//! security admins, the inventory table (sort, search, filters, server-side paging), a
//! credential's detail with its history and jobs, and the operations with a confirmation
//! step; the same data as JSON under `/api/`.
//!
//! * `config.rs`: `[web]`. `admins.rs`: the admins file (argon2id). `session.rs`: sessions,
//!   CSRF tokens, the login throttle. `params.rs`: query parameters to a `Query`.
//!   `html.rs`: the escaping writer; `pages.rs`: the pages. `memory.rs`: an in-memory
//!   [`Operator`] (tests, demos).
//! * One middleware (`guard`) stands before every route: no answer without a session
//!   but the login page and the static assets; every request other than GET/HEAD carries
//!   the session's CSRF token and, when the browser says so, comes from this origin.
//!
//! Wiring: `web::bind(&cfg.web)?` then `web::serve(listener, WebState::new(...), token)`.

pub mod admins;
pub mod config;
pub mod html;
pub mod memory;
pub mod pages;
pub mod params;
pub mod session;

pub use admins::{set_password, Admins, AdminsError};
pub use config::WebConfig;

use crate::credentials::model::{Job, Operation, Page, Query};
use crate::credentials::service::{CredentialsError, CredentialsHandle, Detail};
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// Largest request body.
pub const MAX_BODY: usize = 16 * 1024;
/// Most connections served at once (further ones wait in the backlog).
pub const MAX_CONNECTIONS: usize = 64;
/// Time for one request's headers; and for its whole answer (a failed login's delay
/// included).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Password checks running at once (argon2 costs ~19 MiB and tens of ms each).
pub const MAX_VERIFY: usize = 2;

/// What the page needs from the credentials service: [`CredentialsHandle`]'s API, as a
/// trait so that the page can be served (and tested) over another implementation.
pub type OpFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, CredentialsError>> + Send + 'a>>;

pub trait Operator: Send + Sync + 'static {
    fn query<'a>(&'a self, q: &'a Query) -> OpFuture<'a, Page>;
    fn show<'a>(&'a self, id: &'a str) -> OpFuture<'a, Option<Detail>>;
    fn operate<'a>(
        &'a self,
        id: &'a str,
        op: Operation,
        by: &'a str,
        reason: &'a str,
    ) -> OpFuture<'a, Vec<Job>>;
    fn cancel<'a>(&'a self, job: &'a str, by: &'a str) -> OpFuture<'a, Job>;
    fn expiring_secs(&self) -> i64;
}

impl Operator for CredentialsHandle {
    fn query<'a>(&'a self, q: &'a Query) -> OpFuture<'a, Page> {
        Box::pin(CredentialsHandle::query(self, q))
    }
    fn show<'a>(&'a self, id: &'a str) -> OpFuture<'a, Option<Detail>> {
        Box::pin(CredentialsHandle::show(self, id))
    }
    fn operate<'a>(
        &'a self,
        id: &'a str,
        op: Operation,
        by: &'a str,
        reason: &'a str,
    ) -> OpFuture<'a, Vec<Job>> {
        Box::pin(CredentialsHandle::operate(self, id, op, by, reason))
    }
    fn cancel<'a>(&'a self, job: &'a str, by: &'a str) -> OpFuture<'a, Job> {
        Box::pin(CredentialsHandle::cancel(self, job, by))
    }
    fn expiring_secs(&self) -> i64 {
        CredentialsHandle::expiring_secs(self)
    }
}

/// What [`serve`] serves.
pub struct WebState {
    pub credentials: Arc<dyn Operator>,
    pub admins: Arc<Admins>,
    pub config: WebConfig,
    /// HTTPS (see [`tls_config`]); `None`: plain HTTP. Required when `config.tls` is set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl WebState {
    /// Plain HTTP; set `tls` for HTTPS.
    pub fn new(credentials: impl Operator, admins: Admins, config: WebConfig) -> WebState {
        WebState {
            credentials: Arc::new(credentials),
            admins: Arc::new(admins),
            config,
            tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("web: {0}")]
    Tls(String),
    #[error("web.tls is set but the page was given no certificate")]
    NoCertificate,
}

/// Accepts any client certificate whose key the client proves it holds (the handshake
/// signature is checked), without a chain: the certificate itself is then looked up by its
/// SHA-256 among the admins' pinned ones. A client without a certificate is accepted too
/// (it logs in with a password).
#[derive(Debug)]
struct PinnedClientCerts {
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for PinnedClientCerts {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The SHA-256 (hex) of the client certificate a TLS connection presented.
#[derive(Clone, Debug)]
pub struct ClientCertificate(pub String);

/// A TLS server configuration (ring, TLS 1.2/1.3, HTTP/1.1) from a PEM certificate chain
/// and private key: the gateway's own server certificate. Clients may present a
/// certificate: one pinned in the admins file logs its admin in without a password.
pub fn tls_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, WebError> {
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| WebError::Tls(format!("certificate: {e}")))?;
    if chain.is_empty() {
        return Err(WebError::Tls("no certificate in the PEM".into()));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| WebError::Tls(format!("key: {e}")))?
        .ok_or_else(|| WebError::Tls("no private key in the PEM".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedClientCerts {
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| WebError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| WebError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Log a warning at most once per 10 s, with how many were left out.
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// Whether to log now, and how many were suppressed before.
    fn allow(&mut self) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

struct Shared {
    /// Served over TLS: the cookie is `Secure`.
    secure: bool,
    ops: Arc<dyn Operator>,
    admins: Arc<Admins>,
    config: WebConfig,
    sessions: Mutex<session::Sessions>,
    throttle: Mutex<session::Throttle>,
    verify_slots: Semaphore,
    login_log: Mutex<RateLimitedLog>,
    refused_log: Mutex<RateLimitedLog>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The logged-in admin of a request (put there by the guard).
#[derive(Clone)]
pub struct Authed {
    pub user: String,
    pub csrf: String,
}

/// Bind the `[web]` listener (with the crate's listen backlog): `None` when the page is
/// off.
pub async fn bind(cfg: &WebConfig) -> std::io::Result<Option<tokio::net::TcpListener>> {
    if !cfg.enabled {
        return Ok(None);
    }
    crate::listen(cfg.listen).map(Some)
}

/// The router, every route behind the guard.
pub fn router(state: WebState) -> Router {
    let c = &state.config;
    let policy = session::LoginPolicy {
        max_failures: c.max_failures,
        window: c.failure_window,
        lockout: c.lockout,
        delay: c.failure_delay,
    };
    let shared = Arc::new(Shared {
        secure: state.tls.is_some(),
        sessions: Mutex::new(session::Sessions::new(
            c.session_idle,
            c.session_max,
            c.max_sessions,
        )),
        throttle: Mutex::new(session::Throttle::new(policy)),
        verify_slots: Semaphore::new(MAX_VERIFY),
        login_log: Mutex::new(RateLimitedLog {
            last: None,
            suppressed: 0,
        }),
        refused_log: Mutex::new(RateLimitedLog {
            last: None,
            suppressed: 0,
        }),
        ops: state.credentials,
        admins: state.admins,
        config: state.config,
    });
    Router::new()
        .route("/", get(|| async { see_other("/credentials") }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/app.css", get(css))
        .route("/assets/app.js", get(js))
        .route("/credentials", get(inventory))
        .route("/credentials/:id", get(detail))
        .route("/credentials/:id/jobs", get(jobs_fragment))
        .route("/credentials/:id/confirm/:op", get(confirm))
        .route("/credentials/:id/op/:op", post(operate_form))
        .route("/jobs/:id/cancel", post(cancel_form))
        .route("/api/session", get(api_session))
        .route("/api/credentials", get(api_query))
        .route("/api/credentials/:id", get(api_show))
        .route("/api/credentials/:id/:op", post(api_operate))
        .route("/api/jobs/:id/cancel", post(api_cancel))
        .fallback(|| async { error_page(StatusCode::NOT_FOUND, "No such page.") })
        .layer(axum::middleware::from_fn_with_state(shared.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

/// Serve the admin page on `listener` until `shutdown` is cancelled, then let open
/// requests finish (5 s at most). Refuses to serve plain HTTP when `web.tls` is set.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: WebState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if state.config.tls && state.tls.is_none() {
        return Err(std::io::Error::other(WebError::NoCertificate));
    }
    let tls = state.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    if tls.is_none() && state.config.lan {
        tracing::warn!(
            "admin page: plain HTTP on the network (web.lan): passwords and session cookies \
             cross it in clear; set web.tls = true or put a TLS proxy in front"
        );
    }
    // A fresh gateway has no admin yet: that is not a fault (the page answers nobody).
    if state.admins.count() == 0 {
        tracing::info!(
            file = %state.admins.path().display(),
            "admin page: no admin yet (add one with `outpost credentials admin add`)"
        );
    }
    let router = router(state);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
                    tracing::warn!(error = %e, "admin page: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (router, shutdown, tls) = (router.clone(), shutdown.clone(), tls.clone());
        conns.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(stream, peer, router, shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            let client = s
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| {
                                    ClientCertificate(hex::encode(
                                        <sha2::Sha256 as sha2::Digest>::digest(c.as_ref()),
                                    ))
                                });
                            let router = match client {
                                Some(c) => router.layer(axum::Extension(c)),
                                None => router,
                            };
                            serve_connection(s, peer, router, shutdown).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "admin page: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "admin page: TLS handshake timed out"),
                    }
                }
            }
        });
    }
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), conns.wait()).await;
    Ok(())
}

async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, router.call(req.map(Body::new))).await {
                Ok(Ok(resp)) => Ok::<Response, Infallible>(resp),
                Ok(Err(never)) => match never {},
                Err(_) => Ok(StatusCode::SERVICE_UNAVAILABLE.into_response()),
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let age = tokio::time::sleep(Duration::from_secs(300));
    tokio::pin!(age);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
        }
        _ = &mut age => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, conn.as_mut()).await;
        }
    }
}

// --- the guard: sessions, CSRF, origin, security headers

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split(';') {
            if let Some((k, val)) = part.trim().split_once('=') {
                if k == name {
                    return Some(val);
                }
            }
        }
    }
    None
}

/// Whether the browser says the request comes from this page's own origin (or says
/// nothing: a non-browser client, which must still carry the CSRF token).
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return false;
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let rest = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if rest != Some(host) {
            return false;
        }
    }
    true
}

fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

fn refuse(sh: &Shared, path: &str, status: StatusCode, why: &'static str) -> Response {
    if status != StatusCode::UNAUTHORIZED {
        if let Some(suppressed) = lock(&sh.refused_log).allow() {
            tracing::warn!(path, why, suppressed, "admin page: request refused");
        }
    }
    if is_api(path) {
        json_error(status, None, why)
    } else if status == StatusCode::UNAUTHORIZED {
        see_other("/login")
    } else {
        error_page(status, why)
    }
}

/// Before every route: the session, CSRF and origin checks, and the security headers after.
async fn guard(State(sh): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let mut resp = guarded(&sh, &path, req, next).await;
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, "x-frame-options", "DENY");
    set(h, "x-content-type-options", "nosniff");
    // Not `no-referrer`: with it Chromium sends `Origin: null` on the page's own form POSTs.
    set(h, "referrer-policy", "same-origin");
    if path.starts_with("/assets/") {
        set(h, "cache-control", "private, max-age=3600");
    } else {
        set(h, "cache-control", "no-store");
    }
    resp
}

async fn guarded(sh: &Shared, path: &str, req: Request, next: Next) -> Response {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    if !safe && !same_origin(req.headers()) {
        return refuse(
            sh,
            path,
            StatusCode::FORBIDDEN,
            "cross-origin request refused",
        );
    }
    if path == "/login" || path.starts_with("/assets/") {
        return next.run(req).await;
    }
    let sid = cookie_value(req.headers(), session::COOKIE).map(str::to_string);
    let mut found = sid
        .as_deref()
        .and_then(|id| lock(&sh.sessions).touch(id, Instant::now()));
    // An admin removed from the admins file loses the sessions it has, at their next request.
    if let (Some(s), Some(id)) = (&found, sid.as_deref()) {
        let admins = sh.admins.clone();
        let user = s.user.clone();
        let still = tokio::task::spawn_blocking(move || admins.is_admin(&user))
            .await
            .unwrap_or(false);
        if !still {
            tracing::warn!(user = %s.user, "admin page: session of a removed admin ended");
            lock(&sh.sessions).remove(id);
            found = None;
        }
    }
    // No session: a pinned admin client certificate opens one (its cookie goes with the
    // answer).
    let mut new_cookie = None;
    let found = match found {
        Some(s) => Some(s),
        None => match req.extensions().get::<ClientCertificate>().cloned() {
            Some(ClientCertificate(fp)) => {
                let admins = sh.admins.clone();
                let user = tokio::task::spawn_blocking(move || admins.user_for_certificate(&fp))
                    .await
                    .ok()
                    .flatten();
                user.map(|u| {
                    let (id, s) = lock(&sh.sessions).create(&u, Instant::now());
                    tracing::info!(user = %u, "admin page: login with a client certificate");
                    new_cookie = Some(session_cookie(sh, &id));
                    s
                })
            }
            None => None,
        },
    };
    let Some(s) = found else {
        return refuse(sh, path, StatusCode::UNAUTHORIZED, "log in first");
    };
    if let Some(c) = new_cookie {
        let mut resp = authorized(sh, path, s, req, next).await;
        if let Ok(v) = HeaderValue::from_str(&c) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        return resp;
    }
    authorized(sh, path, s, req, next).await
}

/// The `Set-Cookie` value of session `id`.
fn session_cookie(sh: &Shared, id: &str) -> String {
    format!(
        "{}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        session::COOKIE,
        sh.config.session_max.as_secs(),
        if sh.secure { "; Secure" } else { "" }
    )
}

async fn authorized(
    sh: &Shared,
    path: &str,
    s: session::Session,
    req: Request,
    next: Next,
) -> Response {
    let mut req = req;
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    if !safe {
        // The token: the X-CSRF-Token header, else the form field `csrf`.
        let header_token = req
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
            Ok(b) => b,
            Err(_) => {
                return refuse(sh, path, StatusCode::PAYLOAD_TOO_LARGE, "body too large");
            }
        };
        let token = header_token.or_else(|| {
            form_urlencoded::parse(&bytes)
                .find(|(k, _)| k == "csrf")
                .map(|(_, v)| v.into_owned())
        });
        if !session::csrf_ok(&s, token.as_deref()) {
            return refuse(
                sh,
                path,
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token",
            );
        }
        req = Request::from_parts(parts, Body::from(bytes));
    }
    req.extensions_mut().insert(Authed {
        user: s.user.clone(),
        csrf: s.csrf.clone(),
    });
    next.run(req).await
}

// --- answers

fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn html_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn error_page(status: StatusCode, message: &str) -> Response {
    html_response(status, pages::error(status.as_u16(), message))
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn json_error(status: StatusCode, field: Option<&str>, message: &str) -> Response {
    json(
        status,
        &serde_json::json!({ "error": message, "field": field }),
    )
}

/// A service error: its status, the field it names, and the text shown.
fn classify(e: &CredentialsError) -> (StatusCode, Option<String>, String) {
    match e {
        CredentialsError::Invalid(i) => (
            StatusCode::BAD_REQUEST,
            Some(i.field.clone()),
            e.to_string(),
        ),
        CredentialsError::NotFound(_) => (StatusCode::NOT_FOUND, None, e.to_string()),
        CredentialsError::NotAllowed(_) => (StatusCode::CONFLICT, None, e.to_string()),
        CredentialsError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, None, e.to_string()),
        CredentialsError::Inventory(_)
        | CredentialsError::Ca(_)
        | CredentialsError::Config { .. } => {
            tracing::warn!(error = %e, "admin page: the credentials service failed");
            (StatusCode::INTERNAL_SERVER_ERROR, None, e.to_string())
        }
    }
}

fn api_fail(e: &CredentialsError) -> Response {
    let (s, f, m) = classify(e);
    json_error(s, f.as_deref(), &m)
}

fn page_fail(e: &CredentialsError) -> Response {
    let (s, _, m) = classify(e);
    error_page(s, &m)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/app.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/app.js"),
    )
        .into_response()
}

// --- login

async fn login_page() -> Response {
    html_response(StatusCode::OK, pages::login(None))
}

fn form(bytes: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(bytes)
        .take(16)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn field<'a>(f: &'a [(String, String)], name: &str) -> &'a str {
    f.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

async fn login(
    State(sh): State<Arc<Shared>>,
    peer: Option<ConnectInfo<SocketAddr>>,
    body: Bytes,
) -> Response {
    let f = form(&body);
    let user = field(&f, "user").trim().to_string();
    let password = field(&f, "password").to_string();
    let ip = peer
        .map(|ConnectInfo(a)| a.ip().to_string())
        .unwrap_or_else(|| "unknown".into());
    // User names are bounded before they become keys of the throttle.
    let shown: String = user.chars().take(admins::MAX_USER).collect();
    let (ukey, ikey) = (format!("user:{shown}"), format!("ip:{ip}"));
    let keys = [ukey.as_str(), ikey.as_str()];
    let now = Instant::now();
    // Counted before the password is checked (parallel guesses all count); forgiven on
    // success.
    let delay = {
        let mut t = lock(&sh.throttle);
        match t.gate(&keys, now) {
            session::Gate::Locked { remaining } => {
                drop(t);
                if let Some(suppressed) = lock(&sh.login_log).allow() {
                    tracing::warn!(user = %shown, %ip, suppressed, "admin page: login refused, locked out");
                }
                let mins = remaining.as_secs().div_ceil(60).max(1);
                return html_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    pages::login(Some(&format!(
                        "Too many failed logins. Try again in {mins} minute{}.",
                        if mins == 1 { "" } else { "s" }
                    ))),
                );
            }
            session::Gate::Open => t.fail(&keys, now),
        }
    };
    let ok = match sh.verify_slots.acquire().await {
        Ok(_permit) => {
            let admins = sh.admins.clone();
            let (u, p) = (user.clone(), password);
            tokio::task::spawn_blocking(move || admins.verify(&u, &p))
                .await
                .unwrap_or(false)
        }
        Err(_) => false,
    };
    if ok {
        {
            let mut t = lock(&sh.throttle);
            t.succeed(&ukey);
            t.forgive(&ikey);
        }
        let (sid, _) = lock(&sh.sessions).create(&user, Instant::now());
        tracing::info!(user = %user, %ip, "admin page: login");
        let mut r = see_other("/credentials");
        if let Ok(v) = HeaderValue::from_str(&session_cookie(&sh, &sid)) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        return r;
    }
    if let Some(suppressed) = lock(&sh.login_log).allow() {
        tracing::warn!(user = %shown, %ip, suppressed, "admin page: failed login");
    }
    tokio::time::sleep(delay).await;
    html_response(
        StatusCode::UNAUTHORIZED,
        pages::login(Some("Wrong user or password.")),
    )
}

async fn logout(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(sid) = cookie_value(&headers, session::COOKIE) {
        lock(&sh.sessions).remove(sid);
    }
    let mut r = see_other("/login");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("outpost_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    r
}

// --- pages

fn authed(req: &Request) -> Authed {
    // The guard put it there for every route but /login and /assets.
    req.extensions().get::<Authed>().cloned().unwrap_or(Authed {
        user: String::new(),
        csrf: String::new(),
    })
}

async fn inventory(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let a = authed(&req);
    let q = match params::parse(req.uri().query()) {
        Ok(q) => q,
        Err(e) => {
            return html_response(
                StatusCode::BAD_REQUEST,
                pages::inventory(&a, &Query::default(), None, Some(&e.to_string()), 0, 0),
            )
        }
    };
    match sh.ops.query(&q).await {
        Ok(page) => html_response(
            StatusCode::OK,
            pages::inventory(
                &a,
                &q,
                Some(&page),
                None,
                now_unix(),
                sh.ops.expiring_secs(),
            ),
        ),
        Err(e) => page_fail(&e),
    }
}

async fn detail(State(sh): State<Arc<Shared>>, Path(id): Path<String>, req: Request) -> Response {
    let a = authed(&req);
    match sh.ops.show(&id).await {
        Ok(Some(d)) => html_response(StatusCode::OK, pages::detail(&a, &d)),
        Ok(None) => error_page(StatusCode::NOT_FOUND, "No such credential."),
        Err(e) => page_fail(&e),
    }
}

async fn jobs_fragment(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let a = authed(&req);
    match sh.ops.show(&id).await {
        Ok(Some(d)) => html_response(StatusCode::OK, pages::jobs(&a, &d)),
        Ok(None) => error_page(StatusCode::NOT_FOUND, "No such credential."),
        Err(e) => page_fail(&e),
    }
}

async fn confirm(
    State(sh): State<Arc<Shared>>,
    Path((id, op)): Path<(String, String)>,
    req: Request,
) -> Response {
    let a = authed(&req);
    let Some(op) = Operation::parse(&op) else {
        return error_page(StatusCode::NOT_FOUND, "No such operation.");
    };
    match sh.ops.show(&id).await {
        Ok(Some(d)) if d.credential.kind.allows(op) => {
            html_response(StatusCode::OK, pages::confirm(&a, &d, op))
        }
        Ok(Some(d)) => error_page(
            StatusCode::CONFLICT,
            &format!(
                "A {} cannot be {}d.",
                d.credential.kind.as_str(),
                op.as_str()
            ),
        ),
        Ok(None) => error_page(StatusCode::NOT_FOUND, "No such credential."),
        Err(e) => page_fail(&e),
    }
}

/// The reason an admin typed, bounded.
fn reason(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(crate::credentials::model::MAX_TEXT)
        .collect()
}

async fn operate_form(
    State(sh): State<Arc<Shared>>,
    Path((id, op)): Path<(String, String)>,
    req: Request,
) -> Response {
    let a = authed(&req);
    let Some(op) = Operation::parse(&op) else {
        return error_page(StatusCode::NOT_FOUND, "No such operation.");
    };
    let body = axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .unwrap_or_default();
    let f = form(&body);
    let by = format!("admin:{}", a.user);
    match sh
        .ops
        .operate(&id, op, &by, &reason(field(&f, "reason")))
        .await
    {
        Ok(jobs) => {
            tracing::info!(admin = %a.user, credential = %id, op = op.as_str(), jobs = jobs.len(), "admin page: operation");
            see_other(&format!("/credentials/{}", html::url_component(&id)))
        }
        Err(e) => page_fail(&e),
    }
}

async fn cancel_form(
    State(sh): State<Arc<Shared>>,
    Path(job): Path<String>,
    req: Request,
) -> Response {
    let a = authed(&req);
    match sh.ops.cancel(&job, &format!("admin:{}", a.user)).await {
        Ok(j) => see_other(&format!(
            "/credentials/{}",
            html::url_component(&j.credential)
        )),
        Err(e) => page_fail(&e),
    }
}

// --- the JSON API

async fn api_session(req: Request) -> Response {
    let a = authed(&req);
    json(
        StatusCode::OK,
        &serde_json::json!({ "user": a.user, "csrf": a.csrf }),
    )
}

async fn api_query(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let q = match params::parse(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, Some(&e.field), &e.to_string()),
    };
    match sh.ops.query(&q).await {
        Ok(page) => json(StatusCode::OK, &page),
        Err(e) => api_fail(&e),
    }
}

async fn api_show(State(sh): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match sh.ops.show(&id).await {
        Ok(Some(d)) => json(StatusCode::OK, &d),
        Ok(None) => json_error(StatusCode::NOT_FOUND, None, "no such credential"),
        Err(e) => api_fail(&e),
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OperateBody {
    #[serde(default)]
    reason: String,
}

async fn api_operate(
    State(sh): State<Arc<Shared>>,
    Path((id, op)): Path<(String, String)>,
    req: Request,
) -> Response {
    let a = authed(&req);
    let Some(op) = Operation::parse(&op) else {
        return json_error(
            StatusCode::NOT_FOUND,
            Some("op"),
            "no such operation (renew, invalidate, delete, rotate)",
        );
    };
    let body = axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .unwrap_or_default();
    let b: OperateBody = if body.iter().all(u8::is_ascii_whitespace) {
        OperateBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return json_error(StatusCode::BAD_REQUEST, Some("body"), &e.to_string()),
        }
    };
    if let Err(e) = crate::credentials::model::check_text("reason", &b.reason) {
        return json_error(StatusCode::BAD_REQUEST, Some(&e.field), &e.to_string());
    }
    match sh
        .ops
        .operate(&id, op, &format!("admin:{}", a.user), &b.reason)
        .await
    {
        Ok(jobs) => {
            tracing::info!(admin = %a.user, credential = %id, op = op.as_str(), jobs = jobs.len(), "admin API: operation");
            json(StatusCode::OK, &jobs)
        }
        Err(e) => api_fail(&e),
    }
}

async fn api_cancel(
    State(sh): State<Arc<Shared>>,
    Path(job): Path<String>,
    req: Request,
) -> Response {
    let a = authed(&req);
    match sh.ops.cancel(&job, &format!("admin:{}", a.user)).await {
        Ok(j) => json(StatusCode::OK, &j),
        Err(e) => api_fail(&e),
    }
}

#[cfg(test)]
mod tests;
