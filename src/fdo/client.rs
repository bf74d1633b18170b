//! The client side of FDO over HTTP: the device (TO1 then TO2) and the owner's TO0.
//!
//! The HTTP client is a minimal HTTP/1.1 client over tokio TCP (one request per
//! connection, `Connection: close`): bounded header and body sizes, Content-Length or
//! chunked bodies, a time limit on every exchange. Only plain HTTP rendezvous and owner
//! addresses are used (RVProtocol http, TransportProtocol HTTP); others are skipped.
//!
//! The device checks everything the specification asks of it: the owner's signature on
//! TO2.ProveOVHdr with CUPHOwnerPubKey, the nonces, the hash of its HelloDevice, the
//! voucher header HMAC under its secret, the manufacturer key against DCPubKeyHash, the whole
//! entry chain (hashes, signatures, header info) ending in the owner key, the to1d signature
//! by that key, and Owner2Key's signature on SetupDevice. A failed check is reported to the
//! owner with message 255 before the device gives up.

use super::owner_service::MQTT_MODULE;
use crate::fdo_wire::cbor::{self, Value};
use crate::fdo_wire::credential::DeviceCredential;
use crate::fdo_wire::crypto::{self, Curve, SigningKey};
use crate::fdo_wire::encrypt::SessionCipher;
use crate::fdo_wire::kex::{CipherSuite, KexParty, KexSuite};
use crate::fdo_wire::msg::{
    self, msg_type, DeviceServiceInfo, DeviceServiceInfoReady, Eat, HelloDevice, Nonce,
    OwnerServiceInfo, ProveOvHdr, ServiceInfo, SetupDevicePayload, SignedMsg, To0OwnerSign, To0d,
    To1HelloRv, To1HelloRvAck, To1dPayload, To2Addr,
};
use crate::fdo_wire::types::{rv_var, ErrorMessage, Guid, HMac, PublicKey, RvProtocol, SigInfo};
use crate::fdo_wire::voucher::{OvEntry, OvHeader, OwnershipVoucher};
use crate::fdo_wire::{ErrorCode, FdoError};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_HEADER: usize = 16 * 1024;
const MAX_BODY: usize = crate::fdo_wire::encrypt::MAX_ENCRYPTED + 1024;
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_SI_ROUNDS: usize = 64;

/// Why a client exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{endpoint}: {cause}")]
    Io { endpoint: String, cause: String },
    #[error("{endpoint}: no answer within {EXCHANGE_TIMEOUT:?}")]
    Timeout { endpoint: String },
    #[error("{endpoint}: bad HTTP response: {reason}")]
    Http { endpoint: String, reason: String },
    #[error("message {msg} refused by the server with FDO error {code}: {message}")]
    Peer { msg: u8, code: u16, message: String },
    #[error("answer to message {sent}: expected message {want}, got {got:?}")]
    Unexpected { sent: u8, want: u8, got: Option<u8> },
    #[error("answer to message {sent}: {source}")]
    Message { sent: u8, source: FdoError },
    #[error("{what}: {reason}")]
    Verify {
        what: &'static str,
        reason: String,
        code: ErrorCode,
    },
    #[error("no usable rendezvous address (plain HTTP) in the device's rendezvous info")]
    NoRendezvous,
    #[error("no usable owner address (plain HTTP) in to1d")]
    NoOwnerAddress,
    #[error("service info exchange did not end after {MAX_SI_ROUNDS} rounds")]
    TooManyRounds,
    #[error("{0}")]
    Local(FdoError),
}

impl ClientError {
    fn verify(what: &'static str, reason: impl Into<String>) -> ClientError {
        ClientError::Verify {
            what,
            reason: reason.into(),
            code: ErrorCode::InvalidMessageError,
        }
    }

    /// The code reported to the peer when the device gives up because of this error.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ClientError::Verify { code, .. } => *code,
            ClientError::Message { source, .. } => source.error_code(),
            _ => ErrorCode::InternalServerError,
        }
    }
}

/// A plain-HTTP FDO server address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)
    }
}

impl From<std::net::SocketAddr> for Endpoint {
    fn from(a: std::net::SocketAddr) -> Endpoint {
        Endpoint {
            host: match a.ip() {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                ip => ip.to_string(),
            },
            port: a.port(),
        }
    }
}

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub msg_type: Option<u8>,
    pub token: Option<String>,
    pub body: Vec<u8>,
}

fn find(h: &[u8], pat: &[u8]) -> Option<usize> {
    h.windows(pat.len()).position(|w| w == pat)
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n")?;
        let size_txt = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_txt.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 || out.len() + size > MAX_BODY {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// POST one FDO message and read the answer (whatever its status).
pub async fn post(
    ep: &Endpoint,
    msg: u8,
    token: Option<&str>,
    body: &[u8],
) -> Result<HttpReply, ClientError> {
    let endpoint = ep.to_string();
    match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(ep, msg, token, body)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout { endpoint }),
    }
}

async fn exchange(
    ep: &Endpoint,
    msg: u8,
    token: Option<&str>,
    body: &[u8],
) -> Result<HttpReply, ClientError> {
    let endpoint = ep.to_string();
    let io = |e: std::io::Error| ClientError::Io {
        endpoint: endpoint.clone(),
        cause: e.to_string(),
    };
    let http = |reason: &str| ClientError::Http {
        endpoint: endpoint.clone(),
        reason: reason.to_string(),
    };
    let host = ep.host.trim_start_matches('[').trim_end_matches(']');
    let mut stream = tokio::net::TcpStream::connect((host, ep.port))
        .await
        .map_err(io)?;
    let mut req = format!(
        "POST /fdo/101/msg/{msg} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/cbor\r\nContent-Length: {}\r\nConnection: close\r\n",
        ep.host,
        ep.port,
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out).await.map_err(io)?;
    // Read everything (the server closes), bounded.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEADER + MAX_BODY {
            return Err(http("response too large"));
        }
    }
    let end = find(&buf[..buf.len().min(MAX_HEADER)], b"\r\n\r\n")
        .ok_or_else(|| http("no end of headers"))?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| http("headers are not text"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| http("bad status line"))?;
    let mut msg_type = None;
    let mut token = None;
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "message-type" => msg_type = v.parse::<u8>().ok(),
            "authorization" => token = super::session::bearer(Some(v)).map(str::to_string),
            "content-length" => length = v.parse::<usize>().ok(),
            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
    }
    let rest = &buf[end + 4..];
    let body = if chunked {
        dechunk(rest).ok_or_else(|| http("bad chunked body"))?
    } else {
        match length {
            Some(n) if n <= rest.len() => rest[..n].to_vec(),
            Some(_) => return Err(http("truncated body")),
            None => rest.to_vec(),
        }
    };
    Ok(HttpReply {
        status,
        msg_type,
        token,
        body,
    })
}

/// POST and expect message `want`; an error message 255 becomes [`ClientError::Peer`].
async fn call(
    ep: &Endpoint,
    msg: u8,
    want: u8,
    token: Option<&str>,
    body: &[u8],
) -> Result<HttpReply, ClientError> {
    let r = post(ep, msg, token, body).await?;
    if r.msg_type == Some(msg_type::ERROR) || (r.status >= 400 && r.msg_type != Some(want)) {
        return Err(match ErrorMessage::decode(&r.body) {
            Ok(e) => ClientError::Peer {
                msg,
                code: e.code,
                message: e.message,
            },
            Err(_) => ClientError::Http {
                endpoint: ep.to_string(),
                reason: format!("status {}", r.status),
            },
        });
    }
    // Liberal: a missing Message-Type header is taken to be the expected one.
    if r.msg_type.is_some_and(|t| t != want) {
        return Err(ClientError::Unexpected {
            sent: msg,
            want,
            got: r.msg_type,
        });
    }
    Ok(r)
}

/// Report a failure to the peer (message 255), best effort.
pub async fn report_error(ep: &Endpoint, token: Option<&str>, prev: u8, e: &ClientError) {
    let m = ErrorMessage {
        code: e.error_code().code(),
        prev_msg_id: prev,
        message: e.to_string(),
        timestamp: u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).ok(),
        correlation_id: None,
    };
    if let Err(err) = post(ep, msg_type::ERROR, token, &m.encode()).await {
        tracing::debug!(error = %err, "could not report the error to the peer");
    }
}

// ---------------------------------------------------------------------------------------------
// TO0 (owner)

/// Register `voucher` at the rendezvous server `rv`: devices that ask for it are sent to
/// `addrs`. Returns the seconds the registration lasts.
pub async fn to0_register(
    rv: &Endpoint,
    voucher: &OwnershipVoucher,
    owner_key: &SigningKey,
    addrs: Vec<To2Addr>,
    wait_secs: u32,
) -> Result<u32, ClientError> {
    let r = call(
        rv,
        msg_type::TO0_HELLO,
        msg_type::TO0_HELLO_ACK,
        None,
        &msg::to0_hello(),
    )
    .await?;
    let nonce = msg::decode_to0_hello_ack(&r.body).map_err(|source| ClientError::Message {
        sent: msg_type::TO0_HELLO,
        source,
    })?;
    let to0d = To0d {
        voucher: voucher.clone(),
        wait_secs,
        nonce,
    }
    .encode();
    let payload = To1dPayload {
        addrs,
        to0d_hash: crypto::hash(owner_key.curve().hash_alg(), &[&to0d])
            .map_err(ClientError::Local)?,
    };
    let to1d = SignedMsg::sign(owner_key, payload.encode(), Default::default())
        .map_err(ClientError::Local)?;
    let r = call(
        rv,
        msg_type::TO0_OWNER_SIGN,
        msg_type::TO0_ACCEPT_OWNER,
        r.token.as_deref(),
        &To0OwnerSign::encode(&to0d, &to1d),
    )
    .await?;
    msg::decode_to0_accept_owner(&r.body).map_err(|source| ClientError::Message {
        sent: msg_type::TO0_OWNER_SIGN,
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// Device

/// Deliberate protocol violations, for negative tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehave {
    /// Sign TO2.ProveDevice over a nonce other than NonceTO2ProveDv.
    WrongProveDeviceNonce,
    /// Send TO2.ProveDevice a second time after SetupDevice.
    ReplayProveDevice,
}

/// How the device onboards.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Default: ECDH256 for a P-256 device key, ECDH384 for P-384.
    pub kex: Option<KexSuite>,
    /// Default: A128GCM for P-256, A256GCM for P-384.
    pub cipher: Option<CipherSuite>,
    /// The sgType declared in eASigInfo (default: the key's).
    pub declared_sig_type: Option<i64>,
    /// maxDeviceMessageSize sent in HelloDevice (0 = default).
    pub max_device_message_size: u64,
    /// Whether the device supports `outpost:mqtt` (asks for operational credentials).
    pub mqtt: bool,
    pub os: String,
    pub arch: String,
    pub version: String,
    /// The EAT claim key of the UEID: 256 (the specification's, the default); 11 acts as
    /// a device built on an early EAT draft (fdo-rs 0.5) in interoperability tests.
    pub eat_ueid_key: i64,
    #[doc(hidden)]
    pub misbehave: Option<Misbehave>,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            kex: None,
            cipher: None,
            declared_sig_type: None,
            max_device_message_size: 0,
            mqtt: true,
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            eat_ueid_key: msg::label::EAT_UEID,
            misbehave: None,
        }
    }
}

/// Operational MQTT credentials received through `outpost:mqtt`.
#[derive(Debug, Clone)]
pub struct MqttCredentials {
    pub client_id: String,
    /// PKCS#8 PEM of the key generated on the device (it never left it).
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
    /// The primary server first, then the alternatives.
    pub servers: Vec<String>,
}

/// The result of TO1 + TO2.
#[derive(Debug)]
pub struct Onboarded {
    pub old_guid: Guid,
    /// The credential with the new GUID, rendezvous info and owner key hash (to be saved).
    pub credential: DeviceCredential,
    pub mqtt: Option<MqttCredentials>,
}

/// TO1's result: where the owner is, signed by the owner.
#[derive(Debug, Clone)]
pub struct To1Result {
    pub to1d: SignedMsg,
    pub payload: To1dPayload,
}

fn copy_credential(c: &DeviceCredential) -> Result<DeviceCredential, ClientError> {
    DeviceCredential::decode(&c.encode()).map_err(ClientError::Local)
}

/// The plain-HTTP rendezvous endpoints of the credential, and owner endpoints of directives
/// with RVBypass (the device goes straight to TO2 there).
fn rv_endpoints(cred: &DeviceCredential) -> (Vec<Endpoint>, Vec<Endpoint>) {
    let mut rv = Vec::new();
    let mut bypass = Vec::new();
    for d in &cred.rv_info.0 {
        match d.device_endpoint() {
            Ok(Some((RvProtocol::Http, host, port))) => {
                let ep = Endpoint { host, port };
                if d.has(rv_var::BYPASS) {
                    bypass.push(ep);
                } else {
                    rv.push(ep);
                }
            }
            Ok(Some((p, host, port))) => {
                tracing::debug!(protocol = p.name(), %host, port, "skipping rendezvous directive (only plain HTTP)");
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "skipping malformed rendezvous directive"),
        }
    }
    (rv, bypass)
}

/// TO1 against one rendezvous server.
pub async fn to1(
    rv: &Endpoint,
    cred: &DeviceCredential,
    opts: &DeviceOptions,
) -> Result<To1Result, ClientError> {
    let curve = cred.device_key.curve();
    let hello = To1HelloRv {
        guid: cred.guid,
        sig_info: SigInfo {
            sg_type: opts.declared_sig_type.unwrap_or(curve.cose_alg()),
            info: Vec::new(),
        },
    };
    let r = call(
        rv,
        msg_type::TO1_HELLO_RV,
        msg_type::TO1_HELLO_RV_ACK,
        None,
        &hello.encode(),
    )
    .await?;
    let ack = To1HelloRvAck::decode(&r.body).map_err(|source| ClientError::Message {
        sent: msg_type::TO1_HELLO_RV,
        source,
    })?;
    let eat = Eat::sign_with_ueid_key(
        &cred.device_key,
        &cred.guid,
        &ack.nonce,
        None,
        None,
        opts.eat_ueid_key,
    )
    .map_err(ClientError::Local)?;
    let r = call(
        rv,
        msg_type::TO1_PROVE_TO_RV,
        msg_type::TO1_RV_REDIRECT,
        r.token.as_deref(),
        &eat.signed.raw,
    )
    .await?;
    let sent = msg_type::TO1_PROVE_TO_RV;
    let to1d = SignedMsg::decode(&r.body, "TO1.RVRedirect")
        .map_err(|source| ClientError::Message { sent, source })?;
    let payload = To1dPayload::decode(to1d.payload())
        .map_err(|source| ClientError::Message { sent, source })?;
    Ok(To1Result { to1d, payload })
}

fn http_addrs(p: &To1dPayload) -> Vec<Endpoint> {
    p.addrs
        .iter()
        .filter(|a| a.protocol == msg::transport::HTTP)
        .map(|a| Endpoint {
            host: a.host(),
            port: a.port,
        })
        .collect()
}

/// TO1 (each rendezvous server in turn) then TO2 (each owner address in turn).
pub async fn onboard(
    cred: &DeviceCredential,
    opts: &DeviceOptions,
) -> Result<Onboarded, ClientError> {
    let (rvs, bypass) = rv_endpoints(cred);
    let mut last = None;
    for ep in &bypass {
        match to2(ep, cred, None, opts).await {
            Ok(o) => return Ok(o),
            Err(e) => {
                tracing::warn!(owner = %ep, error = %e, "TO2 (bypass) failed");
                last = Some(e);
            }
        }
    }
    if rvs.is_empty() {
        return Err(last.unwrap_or(ClientError::NoRendezvous));
    }
    for rv in &rvs {
        let t = match to1(rv, cred, opts).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(rendezvous = %rv, error = %e, "TO1 failed");
                last = Some(e);
                continue;
            }
        };
        let owners = http_addrs(&t.payload);
        if owners.is_empty() {
            last = Some(ClientError::NoOwnerAddress);
            continue;
        }
        for ep in &owners {
            match to2(ep, cred, Some(&t.to1d), opts).await {
                Ok(o) => return Ok(o),
                Err(e) => {
                    tracing::warn!(owner = %ep, error = %e, "TO2 failed");
                    last = Some(e);
                }
            }
        }
    }
    Err(last.unwrap_or(ClientError::NoRendezvous))
}

/// Default delay between onboarding attempts when the rendezvous info names none (the
/// specification's 120 s), with ±25 % jitter against synchronized retries.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(120);

/// The delay before the next attempt: the first RVDelaysec of the credential's rendezvous
/// info, else [`DEFAULT_RETRY_DELAY`], with ±25 % jitter.
pub fn retry_delay(cred: &DeviceCredential) -> Duration {
    use rand::Rng;
    let base = cred
        .rv_info
        .0
        .iter()
        .find_map(|d| d.delay_secs().ok().flatten())
        .map(|s| Duration::from_secs(s as u64))
        .unwrap_or(DEFAULT_RETRY_DELAY);
    let factor = rand::thread_rng().gen_range(0.75..=1.25);
    base.mul_f64(factor)
}

/// [`onboard`] until it succeeds or `attempts` (if given) are used up, waiting
/// [`retry_delay`] between attempts. Failures are logged.
pub async fn onboard_with_retry(
    cred: &DeviceCredential,
    opts: &DeviceOptions,
    attempts: Option<u32>,
) -> Result<Onboarded, ClientError> {
    let mut n = 0u32;
    loop {
        n += 1;
        match onboard(cred, opts).await {
            Ok(o) => return Ok(o),
            Err(e) if attempts.is_some_and(|max| n >= max) => return Err(e),
            Err(e) => {
                let d = retry_delay(cred);
                tracing::warn!(attempt = n, error = %e, retry_in = ?d, "onboarding failed");
                tokio::time::sleep(d).await;
            }
        }
    }
}

/// Check the entries received in TO2: hash chain from the header, signatures from the
/// manufacturer key on, header info. Returns the final owner key.
fn verify_entries(
    header_bytes: &[u8],
    hmac: &HMac,
    header: &OvHeader,
    entries: &[OvEntry],
) -> Result<PublicKey, ClientError> {
    const W: &str = "ownership voucher entries";
    let v = |reason: String| ClientError::Verify {
        what: W,
        reason,
        code: ErrorCode::InvalidOwnershipVoucher,
    };
    let mut key = header.mfg_pub_key.clone();
    let hdr_info = header.hdr_info();
    let mut first = header_bytes.to_vec();
    first.extend_from_slice(&hmac.encode());
    for (i, e) in entries.iter().enumerate() {
        let p = e.payload();
        let prev: &[u8] = if i == 0 { &first } else { entries[i - 1].raw() };
        let h = crypto::hash(p.hash_prev_entry.alg, &[prev]).map_err(|e| v(e.to_string()))?;
        if h != p.hash_prev_entry {
            return Err(v(if i == 0 {
                "entry 0 does not cover the header and its HMAC".into()
            } else {
                format!("entry {i} does not cover entry {}", i - 1)
            }));
        }
        let vk = key.verifying_key().map_err(|e| v(e.to_string()))?;
        crate::fdo_wire::cose::verify(e.sign1(), &vk, "OVEntry")
            .map_err(|_| v(format!("entry {i} is not signed by the previous owner")))?;
        let hh = crypto::hash(p.hash_hdr_info.alg, &[&hdr_info]).map_err(|e| v(e.to_string()))?;
        if hh != p.hash_hdr_info {
            return Err(v(format!("entry {i}: header info hash mismatch")));
        }
        key = p.pub_key.clone();
    }
    Ok(key)
}

struct To2Ctx<'a> {
    ep: &'a Endpoint,
    token: Option<String>,
    last: u8,
}

impl To2Ctx<'_> {
    async fn call(&mut self, msg: u8, want: u8, body: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.last = msg;
        let r = call(self.ep, msg, want, self.token.as_deref(), body).await?;
        if r.token.is_some() {
            self.token = r.token;
        }
        Ok(r.body)
    }

    async fn fail<T>(&self, e: ClientError) -> Result<T, ClientError> {
        if !matches!(e, ClientError::Peer { .. }) {
            report_error(self.ep, self.token.as_deref(), self.last, &e).await;
        }
        Err(e)
    }
}

/// TO2 against the owner at `ep`. `to1d` (from TO1) is checked against the owner key.
pub async fn to2(
    ep: &Endpoint,
    cred: &DeviceCredential,
    to1d: Option<&SignedMsg>,
    opts: &DeviceOptions,
) -> Result<Onboarded, ClientError> {
    let mut ctx = To2Ctx {
        ep,
        token: None,
        last: msg_type::TO2_HELLO_DEVICE,
    };
    match to2_inner(&mut ctx, cred, to1d, opts).await {
        Ok(o) => Ok(o),
        Err(e) => ctx.fail(e).await,
    }
}

async fn to2_inner(
    ctx: &mut To2Ctx<'_>,
    cred: &DeviceCredential,
    to1d: Option<&SignedMsg>,
    opts: &DeviceOptions,
) -> Result<Onboarded, ClientError> {
    let curve = cred.device_key.curve();
    let kex_suite = opts.kex.unwrap_or(match curve {
        Curve::P256 => KexSuite::Ecdh256,
        Curve::P384 => KexSuite::Ecdh384,
    });
    let cipher_suite = opts.cipher.unwrap_or(match curve {
        Curve::P256 => CipherSuite::A128Gcm,
        Curve::P384 => CipherSuite::A256Gcm,
    });
    let nonce_prove_ov = Nonce::random().map_err(ClientError::Local)?;
    let hello = HelloDevice {
        max_device_message_size: opts.max_device_message_size,
        guid: cred.guid,
        nonce: nonce_prove_ov,
        kex_suite: kex_suite.name().into(),
        cipher_suite: cipher_suite.id(),
        sig_info: SigInfo {
            sg_type: opts.declared_sig_type.unwrap_or(curve.cose_alg()),
            info: Vec::new(),
        },
    };
    let hello_bytes = hello.encode();
    let sent = msg_type::TO2_HELLO_DEVICE;
    let body = ctx
        .call(sent, msg_type::TO2_PROVE_OV_HDR, &hello_bytes)
        .await?;
    let m = |sent: u8| move |source| ClientError::Message { sent, source };
    let prove = ProveOvHdr::decode(&body).map_err(m(sent))?;
    let p = &prove.payload;
    // The owner's signature, with the key it names (checked against the chain below).
    let owner_vk = prove.owner_key.verifying_key().map_err(m(sent))?;
    prove
        .signed
        .verify(&owner_vk, "TO2.ProveOVHdr")
        .map_err(|_| {
            ClientError::verify(
                "TO2.ProveOVHdr",
                "signature does not verify with CUPHOwnerPubKey",
            )
        })?;
    if p.nonce != nonce_prove_ov {
        return Err(ClientError::verify(
            "TO2.ProveOVHdr",
            "NonceTO2ProveOV does not match",
        ));
    }
    let hh = crypto::hash(p.hello_device_hash.alg, &[&hello_bytes]).map_err(m(sent))?;
    if hh != p.hello_device_hash {
        return Err(ClientError::verify(
            "TO2.ProveOVHdr",
            "helloDeviceHash does not match our HelloDevice",
        ));
    }
    if p.header.guid != cred.guid {
        return Err(ClientError::Verify {
            what: "TO2.ProveOVHdr",
            reason: format!("voucher header is for device {}", p.header.guid),
            code: ErrorCode::InvalidGuid,
        });
    }
    if !crypto::hmac_verify(&p.hmac, &cred.hmac_secret, &p.header_bytes).unwrap_or(false) {
        return Err(ClientError::Verify {
            what: "TO2.ProveOVHdr",
            reason: "OVHeaderHMac does not verify under this device's secret".into(),
            code: ErrorCode::InvalidOwnershipVoucher,
        });
    }
    cred.check_manufacturer_key(&p.header.mfg_pub_key)
        .map_err(|e| ClientError::Verify {
            what: "TO2.ProveOVHdr",
            reason: e.to_string(),
            code: ErrorCode::InvalidOwnershipVoucher,
        })?;
    // The entries.
    let mut entries = Vec::with_capacity(p.num_entries as usize);
    for i in 0..p.num_entries {
        let body = ctx
            .call(
                msg_type::TO2_GET_OV_NEXT_ENTRY,
                msg_type::TO2_OV_NEXT_ENTRY,
                &msg::get_ov_next_entry(i),
            )
            .await?;
        let (n, e) =
            msg::decode_ov_next_entry(&body).map_err(m(msg_type::TO2_GET_OV_NEXT_ENTRY))?;
        if n != i {
            return Err(ClientError::verify(
                "TO2.OVNextEntry",
                format!("entry {n} where {i} was asked"),
            ));
        }
        entries.push(e);
    }
    let final_key = verify_entries(&p.header_bytes, &p.hmac, &p.header, &entries)?;
    if !final_key.same_key(&prove.owner_key) {
        return Err(ClientError::Verify {
            what: "TO2.ProveOVHdr",
            reason: "CUPHOwnerPubKey is not the voucher's final owner key".into(),
            code: ErrorCode::InvalidOwnershipVoucher,
        });
    }
    if let Some(t) = to1d {
        t.verify(&owner_vk, "to1d").map_err(|_| {
            ClientError::verify("to1d", "the rendezvous answer is not signed by the owner")
        })?;
    }
    // Prove ourselves and finish the key exchange.
    let kex = KexParty::new(kex_suite).map_err(ClientError::Local)?;
    let xb = kex.param().to_vec();
    let sek = kex
        .finish(&p.xa, false, cipher_suite)
        .map_err(m(msg_type::TO2_HELLO_DEVICE))?;
    let cipher = SessionCipher::new(cipher_suite, &sek).map_err(ClientError::Local)?;
    let nonce_setup_dv = Nonce::random().map_err(ClientError::Local)?;
    let eat_nonce = match opts.misbehave {
        Some(Misbehave::WrongProveDeviceNonce) => Nonce::random().map_err(ClientError::Local)?,
        _ => prove.nonce_prove_dv,
    };
    let eat = Eat::sign_with_ueid_key(
        &cred.device_key,
        &cred.guid,
        &eat_nonce,
        Some(Value::Array(vec![Value::Bytes(xb)])),
        Some(&nonce_setup_dv),
        opts.eat_ueid_key,
    )
    .map_err(ClientError::Local)?;
    let body = ctx
        .call(
            msg_type::TO2_PROVE_DEVICE,
            msg_type::TO2_SETUP_DEVICE,
            &eat.signed.raw,
        )
        .await?;
    if opts.misbehave == Some(Misbehave::ReplayProveDevice) {
        ctx.call(
            msg_type::TO2_PROVE_DEVICE,
            msg_type::TO2_SETUP_DEVICE,
            &eat.signed.raw,
        )
        .await?;
    }
    let sent = msg_type::TO2_PROVE_DEVICE;
    let plain = cipher.decrypt(&body).map_err(m(sent))?;
    let setup_msg = SignedMsg::decode(&plain, "TO2.SetupDevice").map_err(m(sent))?;
    let setup = SetupDevicePayload::decode(setup_msg.payload()).map_err(m(sent))?;
    let o2 = setup.owner2_key.verifying_key().map_err(m(sent))?;
    setup_msg
        .verify(&o2, "TO2.SetupDevice")
        .map_err(|_| ClientError::verify("TO2.SetupDevice", "not signed by Owner2Key"))?;
    if setup.nonce != nonce_setup_dv {
        return Err(ClientError::verify(
            "TO2.SetupDevice",
            "NonceTO2SetupDv does not match",
        ));
    }
    // New credentials: the HMAC of the new header under our secret.
    let new_header = OvHeader {
        prot_ver: p.header.prot_ver,
        guid: setup.guid,
        rv_info: setup.rv_info.clone(),
        device_info: p.header.device_info.clone(),
        mfg_pub_key: setup.owner2_key.clone(),
        cert_chain_hash: p.header.cert_chain_hash.clone(),
    };
    let replacement = crypto::hmac(p.hmac.alg, &cred.hmac_secret, &new_header.encode())
        .map_err(ClientError::Local)?;
    let ready = DeviceServiceInfoReady {
        replacement_hmac: Some(replacement),
        max_owner_service_info_size: None,
    };
    let enc = |b: &[u8]| cipher.encrypt(b).map_err(ClientError::Local);
    let body = ctx
        .call(
            msg_type::TO2_DEVICE_SERVICE_INFO_READY,
            msg_type::TO2_OWNER_SERVICE_INFO_READY,
            &enc(&ready.encode())?,
        )
        .await?;
    let sent = msg_type::TO2_DEVICE_SERVICE_INFO_READY;
    let _max_device_si =
        msg::decode_owner_service_info_ready(&cipher.decrypt(&body).map_err(m(sent))?)
            .map_err(m(sent))?;
    // Service info: devmod first.
    let modules: Vec<&str> = if opts.mqtt {
        vec!["devmod", MQTT_MODULE]
    } else {
        vec!["devmod"]
    };
    let mut si = ServiceInfo::default();
    si.push("devmod:active", &Value::Bool(true));
    si.push("devmod:os", &Value::Text(opts.os.clone()));
    si.push("devmod:arch", &Value::Text(opts.arch.clone()));
    si.push("devmod:version", &Value::Text(opts.version.clone()));
    si.push("devmod:device", &Value::Text(p.header.device_info.clone()));
    si.push("devmod:sep", &Value::Text(":".into()));
    si.push("devmod:bin", &Value::Text(opts.arch.clone()));
    si.push("devmod:nummodules", &cbor::uint_value(modules.len() as u64));
    let mut mods = vec![cbor::uint_value(0), cbor::uint_value(modules.len() as u64)];
    mods.extend(modules.iter().map(|m| Value::Text(m.to_string())));
    si.push("devmod:modules", &Value::Array(mods));
    let mut outgoing = DeviceServiceInfo {
        more: false,
        info: si,
    };
    let mut mqtt_key: Option<rcgen::KeyPair> = None;
    let mut mqtt = MqttFields::default();
    let mut rounds = 0;
    loop {
        rounds += 1;
        if rounds > MAX_SI_ROUNDS {
            return Err(ClientError::TooManyRounds);
        }
        let sent = msg_type::TO2_DEVICE_SERVICE_INFO;
        let body = ctx
            .call(
                sent,
                msg_type::TO2_OWNER_SERVICE_INFO,
                &enc(&outgoing.encode())?,
            )
            .await?;
        let owner =
            OwnerServiceInfo::decode(&cipher.decrypt(&body).map_err(m(sent))?).map_err(m(sent))?;
        let mut next = ServiceInfo::default();
        for (k, v) in &owner.info.0 {
            let Some(name) = k
                .strip_prefix(MQTT_MODULE)
                .and_then(|r| r.strip_prefix(':'))
            else {
                tracing::debug!(key = %k, "ignoring owner service info");
                continue;
            };
            let val = cbor::decode(v, msg::MAX_MESSAGE, "ServiceInfoVal").ok();
            if !opts.mqtt {
                continue;
            }
            match (name, val) {
                ("csr-request", _) => {
                    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                        .map_err(|e| ClientError::Local(e.into()))?;
                    let mut params = rcgen::CertificateParams::default();
                    let mut dn = rcgen::DistinguishedName::new();
                    dn.push(rcgen::DnType::CommonName, setup.guid.hex());
                    params.distinguished_name = dn;
                    let csr = params
                        .serialize_request(&key)
                        .and_then(|c| c.pem())
                        .map_err(|e| ClientError::Local(e.into()))?;
                    next.push(&format!("{MQTT_MODULE}:csr"), &Value::Text(csr));
                    mqtt_key = Some(key);
                }
                ("servers", Some(Value::Array(a))) => {
                    mqtt.servers = a
                        .into_iter()
                        .filter_map(|v| match v {
                            Value::Text(t) => Some(t),
                            _ => None,
                        })
                        .collect()
                }
                ("cert", Some(Value::Text(t))) => mqtt.cert = Some(t),
                ("ca", Some(Value::Text(t))) => mqtt.ca = Some(t),
                ("client-id", Some(Value::Text(t))) => mqtt.client_id = Some(t),
                _ => {}
            }
        }
        if owner.done {
            break;
        }
        outgoing = DeviceServiceInfo {
            more: false,
            info: next,
        };
    }
    let body = ctx
        .call(
            msg_type::TO2_DONE,
            msg_type::TO2_DONE2,
            &enc(&msg::nonce_msg(&prove.nonce_prove_dv))?,
        )
        .await?;
    let sent = msg_type::TO2_DONE;
    let n = msg::decode_nonce_msg(&cipher.decrypt(&body).map_err(m(sent))?, "TO2.Done2")
        .map_err(m(sent))?;
    if n != nonce_setup_dv {
        return Err(ClientError::verify(
            "TO2.Done2",
            "NonceTO2SetupDv does not match",
        ));
    }
    let mut credential = copy_credential(cred)?;
    credential.guid = setup.guid;
    credential.rv_info = setup.rv_info;
    credential.pub_key_hash =
        DeviceCredential::pub_key_hash_of(&setup.owner2_key, cred.pub_key_hash.alg)
            .map_err(ClientError::Local)?;
    let mqtt = match (mqtt_key, mqtt.cert, mqtt.ca) {
        (Some(key), Some(cert_pem), Some(ca_pem)) => Some(MqttCredentials {
            client_id: mqtt.client_id.unwrap_or_else(|| setup.guid.hex()),
            key_pem: key.serialize_pem(),
            cert_pem,
            ca_pem,
            servers: mqtt.servers,
        }),
        _ => None,
    };
    tracing::info!(old_guid = %cred.guid, guid = %credential.guid, mqtt = mqtt.is_some(), "onboarded");
    Ok(Onboarded {
        old_guid: cred.guid,
        credential,
        mqtt,
    })
}

#[derive(Default)]
struct MqttFields {
    servers: Vec<String>,
    cert: Option<String>,
    ca: Option<String>,
    client_id: Option<String>,
}
