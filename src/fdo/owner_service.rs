//! The owner side of TO2: the device proves it is the device of a voucher we own, we prove
//! we own it, a key exchange sets up an encrypted tunnel, the device gets new credentials
//! (GUID, rendezvous info, owner key) and its service info.
//!
//! ```text
//! 60 HelloDevice        → 61 ProveOVHdr (signed by the owner key; xAKeyExchange; hash of 60)
//! 62 GetOVNextEntry(i)  → 63 OVNextEntry(i)
//! 64 ProveDevice (EAT)  → 65 SetupDevice            (encrypted from here on)
//! 66 DeviceSIReady      → 67 OwnerSIReady
//! 68 DeviceServiceInfo  → 69 OwnerServiceInfo       (until the owner says IsDone)
//! 70 Done               → 71 Done2
//! ```
//!
//! Service info: the device must send `devmod` (at least `devmod:active`). When it lists the
//! module `outpost:mqtt` in `devmod:modules`, the owner asks for a CSR, has it signed by its
//! [`CredentialIssuer`] (the gateway CA) and sends the certificate, the CA and the broker
//! endpoints (primary first, then the alternatives). A device without the module completes
//! TO2 all the same. The device is registered (via [`OwnerBackend::onboarded`]) only at
//! TO2.Done, after every check passed.
//!
//! Liberal acceptance: signatures are checked with the curve of the key (a P-256 device that
//! declares ES384 works); `maxDeviceMessageSize` and `maxOwnerServiceInfoSz` values below
//! 256 bytes (devices send 17) mean "default" (1300).

use super::session::{new_token, ProtocolFailure, Reply, SessionLimits, SessionStats, Sessions};
use crate::fdo_wire::cbor::{self, Value};
use crate::fdo_wire::crypto::{self, Curve, SigningKey};
use crate::fdo_wire::encrypt::SessionCipher;
use crate::fdo_wire::kex::{CipherSuite, KexParty, KexSuite};
use crate::fdo_wire::msg::{
    self, msg_type, DeviceServiceInfo, DeviceServiceInfoReady, Eat, HelloDevice, OwnerServiceInfo,
    ProveOvHdr, ProveOvHdrPayload, ServiceInfo, SetupDevicePayload, SignedMsg,
};
use crate::fdo_wire::types::{Guid, HMac, HashAlg, PublicKey, RendezvousInfo};
use crate::fdo_wire::voucher::{OvHeader, OwnershipVoucher};
use crate::fdo_wire::{ErrorCode, FdoError};
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

/// The owner service info module that hands out operational MQTT credentials.
pub const MQTT_MODULE: &str = "outpost:mqtt";
/// Default service info MTU (the specification's 1300 bytes).
pub const DEFAULT_MTU: usize = 1300;
const MIN_MTU: usize = 256;
const MAX_DEVMOD_PAIRS: usize = 128;

/// Why a TO2 message was refused.
#[derive(Debug, thiserror::Error)]
pub enum To2Error {
    #[error("message {msg}: {source}")]
    Message { msg: u8, source: FdoError },
    #[error("message {0}: no open session for this token (expired, unknown or already used)")]
    NoSession(u8),
    #[error("message {got} out of order (expected {expected})")]
    OutOfOrder { got: u8, expected: &'static str },
    #[error("message {0} is not handled by the owner")]
    UnexpectedMessage(u8),
    #[error("TO2.HelloDevice: no voucher for device {0}")]
    UnknownDevice(Guid),
    #[error("TO2.HelloDevice: voucher of device {guid} refused: {source}")]
    Voucher { guid: Guid, source: FdoError },
    #[error("TO2.HelloDevice: unsupported {0}")]
    Unsupported(String),
    #[error("TO2.GetOVNextEntry: entry {0} does not exist")]
    NoSuchEntry(u8),
    #[error(
        "TO2.ProveDevice: signature does not verify with the device attestation key of the voucher"
    )]
    DeviceSignature,
    #[error("TO2.ProveDevice: EAT nonce does not match NonceTO2ProveDv")]
    NonceMismatch,
    #[error("TO2.ProveDevice: EAT is for device {found}, the session is for {expected}")]
    GuidMismatch { expected: Guid, found: Guid },
    #[error("TO2.ProveDevice: {0}")]
    ProveDevice(String),
    #[error("TO2.Done: nonce does not match NonceTO2ProveDv")]
    DoneNonceMismatch,
    #[error("TO2.DeviceServiceInfo: {0}")]
    ServiceInfo(String),
    #[error("device reported error {code}: {message}")]
    DeviceError { code: u16, message: String },
    #[error("{0}")]
    Busy(#[from] super::session::SessionsFull),
    #[error("owner backend: {0}")]
    Backend(String),
    #[error("{0}")]
    Internal(FdoError),
}

impl ProtocolFailure for To2Error {
    fn error_code(&self) -> ErrorCode {
        use To2Error::*;
        match self {
            Message { source, .. } => source.error_code(),
            NoSession(_) => ErrorCode::InvalidJwtToken,
            OutOfOrder { .. }
            | UnexpectedMessage(_)
            | NonceMismatch
            | DoneNonceMismatch
            | DeviceSignature
            | ProveDevice(_)
            | DeviceError { .. } => ErrorCode::InvalidMessageError,
            UnknownDevice(_) => ErrorCode::ResourceNotFound,
            Voucher {
                source: FdoError::GuidMismatch { .. },
                ..
            }
            | GuidMismatch { .. } => ErrorCode::InvalidGuid,
            Voucher { .. } => ErrorCode::InvalidOwnershipVoucher,
            Unsupported(_) | NoSuchEntry(_) | ServiceInfo(_) => ErrorCode::MessageBodyError,
            Busy(_) | Backend(_) | Internal(_) => ErrorCode::InternalServerError,
        }
    }
}

/// What the owner records when a device completes TO2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnboardRecord {
    /// The GUID the device had (the voucher's).
    pub old_guid: Guid,
    /// The GUID given in TO2.SetupDevice (its identity from now on).
    pub guid: Guid,
    pub device_info: String,
    /// SHA-256 hex of the device certificate (leaf of OVDevCertChain), if any.
    pub device_cert_hash: Option<String>,
    /// Serial of the operational certificate issued through `outpost:mqtt`, if any.
    pub cert_serial: Option<String>,
    /// Unix seconds.
    pub onboarded_at: i64,
    /// The device's address as seen by the HTTP server.
    pub peer: Option<String>,
    /// Key id of the owner key that onboarded it.
    pub owner_key_id: String,
    /// `devmod` values as text (`devmod:os` = "linux", ...).
    pub devmod: Vec<(String, String)>,
}

/// The vouchers and keys of this owner, and where onboarded devices are recorded.
pub trait OwnerBackend: Send + Sync {
    fn voucher(&self, guid: &Guid) -> Result<Option<OwnershipVoucher>, String>;
    /// Our private key for `key`, if it is one of ours.
    fn owner_key(&self, key: &PublicKey) -> Option<Arc<SigningKey>>;
    /// The device completed TO2. `new_voucher` is the voucher for its new credentials
    /// (when it sent a ReplacementHMac).
    fn onboarded(
        &self,
        rec: &OnboardRecord,
        new_voucher: Option<&OwnershipVoucher>,
    ) -> Result<(), String>;
}

/// A CSR to sign for a device.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The identity: the new GUID in hex.
    pub device_id: String,
    pub device_info: String,
    pub csr_pem: String,
}

/// The signed operational certificate.
#[derive(Debug, Clone)]
pub struct IssuedCredential {
    pub serial: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Signs device CSRs (the gateway plugs in its `CaHandle`).
pub trait CredentialIssuer: Send + Sync {
    fn issue(&self, req: IssueRequest) -> BoxFuture<'_, Result<IssuedCredential, String>>;
}

impl CredentialIssuer for crate::ca::CaHandle {
    fn issue(&self, req: IssueRequest) -> BoxFuture<'_, Result<IssuedCredential, String>> {
        Box::pin(async move {
            let i = self
                .issue_device(&req.device_id, Some(req.csr_pem))
                .await
                .map_err(|e| e.to_string())?;
            Ok(IssuedCredential {
                serial: i.serial,
                cert_pem: i.cert_pem,
                ca_pem: i.ca_pem,
            })
        })
    }
}

/// Settings of the owner service.
#[derive(Debug, Clone, Default)]
pub struct OwnerConfig {
    /// The TO2 session table (a session is unproven until the device's ProveDevice).
    pub sessions: SessionLimits,
    /// Rendezvous info given to devices in SetupDevice (default: the voucher's).
    pub new_rv_info: Option<RendezvousInfo>,
    /// MQTT endpoints sent through `outpost:mqtt`: the primary first, then alternatives
    /// (e.g. `mqtts://gw.local:8883`, `mqtts://cloud.example:8883`).
    pub mqtt_servers: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// After ProveOVHdr: GetOVNextEntry or ProveDevice.
    Entries,
    /// After SetupDevice: DeviceServiceInfoReady.
    Ready,
    /// Service info exchange.
    ServiceInfo,
    /// IsDone sent: Done.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mqtt {
    NotOffered,
    CsrRequested,
    Issued(String),
    Declined,
}

struct To2Session {
    stage: Stage,
    guid: Guid,
    voucher: OwnershipVoucher,
    owner_key: Arc<SigningKey>,
    owner_pub: PublicKey,
    nonce_prove_dv: msg::Nonce,
    nonce_setup_dv: Option<msg::Nonce>,
    kex: Option<KexParty>,
    cipher_suite: CipherSuite,
    cipher: Option<SessionCipher>,
    new_guid: Guid,
    new_rv: RendezvousInfo,
    replacement_hmac: Option<HMac>,
    mtu: usize,
    devmod: Vec<(String, Vec<u8>)>,
    modules: Vec<String>,
    csr: Option<String>,
    mqtt: Mqtt,
    pending: VecDeque<(String, Vec<u8>)>,
    peer: Option<String>,
}

/// The owner's TO2 protocol logic (transport-free).
pub struct OwnerService {
    cfg: OwnerConfig,
    backend: Arc<dyn OwnerBackend>,
    issuer: Option<Arc<dyn CredentialIssuer>>,
    sessions: Sessions<To2Session>,
}

fn value_text(v: &[u8]) -> String {
    match cbor::decode(v, 4096, "devmod") {
        Ok(Value::Text(s)) => s,
        Ok(Value::Bool(b)) => b.to_string(),
        Ok(Value::Integer(i)) => i128::from(i).to_string(),
        Ok(other) => format!("<{}>", cbor::kind(&other)),
        Err(_) => "<malformed>".into(),
    }
}

impl OwnerService {
    pub fn new(
        cfg: OwnerConfig,
        backend: Arc<dyn OwnerBackend>,
        issuer: Option<Arc<dyn CredentialIssuer>>,
    ) -> OwnerService {
        OwnerService {
            sessions: Sessions::new(cfg.sessions.clone()),
            cfg,
            backend,
            issuer,
        }
    }

    /// Whether this service handles `msg` (TO2 requests and device error reports).
    pub fn handles(msg: u8) -> bool {
        matches!(
            msg,
            msg_type::TO2_HELLO_DEVICE
                | msg_type::TO2_GET_OV_NEXT_ENTRY
                | msg_type::TO2_PROVE_DEVICE
                | msg_type::TO2_DEVICE_SERVICE_INFO_READY
                | msg_type::TO2_DEVICE_SERVICE_INFO
                | msg_type::TO2_DONE
        )
    }

    /// Number of open sessions.
    pub fn open_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Counters of the TO2 session table.
    pub fn session_stats(&self) -> Arc<SessionStats> {
        self.sessions.stats.clone()
    }

    /// The device reported an error (message 255): its session ends.
    pub fn device_error(&self, token: Option<&str>, body: &[u8]) -> To2Error {
        if let Some(t) = token {
            let _ = self.sessions.take(t);
        }
        match crate::fdo_wire::types::ErrorMessage::decode(body) {
            Ok(e) => To2Error::DeviceError {
                code: e.code,
                message: e.message,
            },
            Err(e) => To2Error::Message {
                msg: msg_type::ERROR,
                source: e,
            },
        }
    }

    /// Handle one request from `peer` (recorded in the registry; its address keys the
    /// per-peer session limits). Any error ends the session.
    pub async fn handle(
        &self,
        msg: u8,
        token: Option<&str>,
        body: &[u8],
        peer: Option<SocketAddr>,
    ) -> Result<Reply, To2Error> {
        if msg == msg_type::TO2_HELLO_DEVICE {
            return self.hello_device(body, peer);
        }
        if !Self::handles(msg) {
            return Err(To2Error::UnexpectedMessage(msg));
        }
        let token = token.ok_or(To2Error::NoSession(msg))?;
        let mut held = self
            .sessions
            .take_held(token)
            .ok_or(To2Error::NoSession(msg))?;
        let (reply_type, body) = self.step(&mut held.value, msg, body).await?;
        let done = reply_type == msg_type::TO2_DONE2;
        if !done {
            // Past ProveDevice the device has proven its key: the session is established.
            let proven = held.value.stage != Stage::Entries;
            self.sessions.put_back(token, held, proven);
        }
        Ok(Reply {
            msg_type: reply_type,
            body,
            token: token.to_string(),
        })
    }

    fn hello_device(&self, body: &[u8], peer: Option<SocketAddr>) -> Result<Reply, To2Error> {
        let m = |source| To2Error::Message {
            msg: msg_type::TO2_HELLO_DEVICE,
            source,
        };
        let hello = HelloDevice::decode(body).map_err(m)?;
        let guid = hello.guid;
        let voucher = self
            .backend
            .voucher(&guid)
            .map_err(To2Error::Backend)?
            .ok_or(To2Error::UnknownDevice(guid))?;
        let chain = voucher
            .verify_for_guid(&guid)
            .map_err(|source| To2Error::Voucher { guid, source })?;
        let owner_key =
            self.backend
                .owner_key(&chain.owner_key)
                .ok_or_else(|| To2Error::Voucher {
                    guid,
                    source: FdoError::NotOurs {
                        fingerprint: chain.owner_key.fingerprint().unwrap_or_default(),
                    },
                })?;
        let kex_suite = KexSuite::from_name(&hello.kex_suite)
            .ok_or_else(|| To2Error::Unsupported(format!("kexSuiteName {:?}", hello.kex_suite)))?;
        let cipher_suite = CipherSuite::from_id(hello.cipher_suite).ok_or_else(|| {
            To2Error::Unsupported(format!("cipherSuiteName {}", hello.cipher_suite))
        })?;
        let declared = hello.sig_info.sg_type;
        if let Ok(Some(dk)) = voucher.device_public_key() {
            if let Ok(c) = dk.curve() {
                if c.cose_alg() != declared {
                    tracing::info!(%guid, declared, key = %c, "device declares a signature type other than its key's; verifying with the key's");
                }
            }
        }
        if hello.max_device_message_size != 0 && hello.max_device_message_size < MIN_MTU as u64 {
            tracing::debug!(%guid, size = hello.max_device_message_size, "ignoring meaningless maxDeviceMessageSize");
        }
        let hash_alg = match owner_key.curve() {
            Curve::P384 => HashAlg::Sha384,
            Curve::P256 => HashAlg::Sha256,
        };
        let hello_hash = crypto::hash(hash_alg, &[body]).map_err(To2Error::Internal)?;
        let kex = KexParty::new(kex_suite).map_err(To2Error::Internal)?;
        let nonce_prove_dv = msg::Nonce::random().map_err(To2Error::Internal)?;
        let num_entries = u8::try_from(voucher.entries().len())
            .map_err(|_| To2Error::Unsupported("more than 255 voucher entries".into()))?;
        let payload = ProveOvHdrPayload {
            header_bytes: voucher.header_bytes().to_vec(),
            header: voucher.header().clone(),
            num_entries,
            hmac: voucher.hmac().clone(),
            nonce: hello.nonce,
            sig_info: hello.sig_info.clone(),
            xa: kex.param().to_vec(),
            hello_device_hash: hello_hash,
            max_owner_message_size: 0,
        };
        let prove = ProveOvHdr::sign(&owner_key, payload, &nonce_prove_dv, &chain.owner_key)
            .map_err(To2Error::Internal)?;
        let new_rv = self
            .cfg
            .new_rv_info
            .clone()
            .unwrap_or_else(|| voucher.header().rv_info.clone());
        let token = new_token().map_err(To2Error::Internal)?;
        self.sessions.open(
            &token,
            peer.map(|a| a.ip()),
            To2Session {
                stage: Stage::Entries,
                guid,
                owner_pub: chain.owner_key.clone(),
                voucher,
                owner_key,
                nonce_prove_dv,
                nonce_setup_dv: None,
                kex: Some(kex),
                cipher_suite,
                cipher: None,
                new_guid: Guid::random().map_err(To2Error::Internal)?,
                new_rv,
                replacement_hmac: None,
                mtu: DEFAULT_MTU,
                devmod: Vec::new(),
                modules: Vec::new(),
                csr: None,
                mqtt: Mqtt::NotOffered,
                pending: VecDeque::new(),
                peer: peer.map(|a| a.to_string()),
            },
        )?;
        tracing::debug!(%guid, "TO2: HelloDevice accepted");
        Ok(Reply {
            msg_type: msg_type::TO2_PROVE_OV_HDR,
            body: prove.signed.raw,
            token,
        })
    }

    async fn step(
        &self,
        s: &mut To2Session,
        msg: u8,
        body: &[u8],
    ) -> Result<(u8, Vec<u8>), To2Error> {
        let m = |source| To2Error::Message { msg, source };
        let expect = |stage: Stage, name: &'static str| {
            if s.stage == stage {
                Ok(())
            } else {
                Err(To2Error::OutOfOrder {
                    got: msg,
                    expected: name,
                })
            }
        };
        match msg {
            msg_type::TO2_GET_OV_NEXT_ENTRY => {
                expect(Stage::Entries, "GetOVNextEntry or ProveDevice")?;
                let n = msg::decode_get_ov_next_entry(body).map_err(m)?;
                let e = s
                    .voucher
                    .entries()
                    .get(n as usize)
                    .ok_or(To2Error::NoSuchEntry(n))?;
                Ok((msg_type::TO2_OV_NEXT_ENTRY, msg::ov_next_entry(n, e)))
            }
            msg_type::TO2_PROVE_DEVICE => {
                expect(Stage::Entries, "GetOVNextEntry or ProveDevice")?;
                let plain = self.prove_device(s, body)?;
                let c = s.cipher.as_ref().ok_or(To2Error::NoSession(msg))?;
                s.stage = Stage::Ready;
                Ok((
                    msg_type::TO2_SETUP_DEVICE,
                    c.encrypt(&plain).map_err(To2Error::Internal)?,
                ))
            }
            _ => {
                let c = s.cipher.as_ref().ok_or(To2Error::NoSession(msg))?;
                let plain = c.decrypt(body).map_err(m)?;
                let (t, reply) = self.encrypted_step(s, msg, &plain).await?;
                let c = s.cipher.as_ref().ok_or(To2Error::NoSession(msg))?;
                Ok((t, c.encrypt(&reply).map_err(To2Error::Internal)?))
            }
        }
    }

    fn prove_device(&self, s: &mut To2Session, body: &[u8]) -> Result<Vec<u8>, To2Error> {
        let m = |source| To2Error::Message {
            msg: msg_type::TO2_PROVE_DEVICE,
            source,
        };
        let eat = Eat::decode(body, "TO2.ProveDevice").map_err(m)?;
        let device_key = s
            .voucher
            .device_public_key()
            .map_err(|source| To2Error::Voucher {
                guid: s.guid,
                source,
            })?
            .ok_or_else(|| {
                To2Error::ProveDevice("the voucher has no device certificate chain".into())
            })?
            .verifying_key()
            .map_err(To2Error::Internal)?;
        eat.signed
            .verify(&device_key, "TO2.ProveDevice")
            .map_err(|_| To2Error::DeviceSignature)?;
        if eat.guid != s.guid {
            return Err(To2Error::GuidMismatch {
                expected: s.guid,
                found: eat.guid,
            });
        }
        if eat.nonce != s.nonce_prove_dv {
            return Err(To2Error::NonceMismatch);
        }
        super::stats::eat_accepted(&eat);
        let setup_nonce = eat
            .unprotected_nonce
            .ok_or_else(|| To2Error::ProveDevice("no EUPHNonce (NonceTO2SetupDv)".into()))?;
        let xb = match eat.fdo {
            Some(Value::Array(a)) => match a.into_iter().next() {
                Some(Value::Bytes(b)) => b,
                _ => {
                    return Err(To2Error::ProveDevice(
                        "EAT-FDO is not [xBKeyExchange]".into(),
                    ))
                }
            },
            // Liberal: a bare bstr.
            Some(Value::Bytes(b)) => b,
            _ => return Err(To2Error::ProveDevice("no EAT-FDO claim".into())),
        };
        let kex = s
            .kex
            .take()
            .ok_or_else(|| To2Error::ProveDevice("key exchange already done".into()))?;
        let sek = kex.finish(&xb, true, s.cipher_suite).map_err(m)?;
        s.cipher = Some(SessionCipher::new(s.cipher_suite, &sek).map_err(To2Error::Internal)?);
        s.nonce_setup_dv = Some(setup_nonce);
        let payload = SetupDevicePayload {
            rv_info: s.new_rv.clone(),
            guid: s.new_guid,
            nonce: setup_nonce,
            owner2_key: s.owner_pub.clone(),
        };
        let signed = SignedMsg::sign(&s.owner_key, payload.encode(), Default::default())
            .map_err(To2Error::Internal)?;
        tracing::debug!(guid = %s.guid, "TO2: device proved itself");
        Ok(signed.raw)
    }

    async fn encrypted_step(
        &self,
        s: &mut To2Session,
        msg: u8,
        plain: &[u8],
    ) -> Result<(u8, Vec<u8>), To2Error> {
        let m = |source| To2Error::Message { msg, source };
        match msg {
            msg_type::TO2_DEVICE_SERVICE_INFO_READY => {
                if s.stage != Stage::Ready {
                    return Err(To2Error::OutOfOrder {
                        got: msg,
                        expected: "DeviceServiceInfoReady",
                    });
                }
                let r = DeviceServiceInfoReady::decode(plain).map_err(m)?;
                s.replacement_hmac = r.replacement_hmac;
                s.mtu = match r.max_owner_service_info_size {
                    Some(n) if n >= MIN_MTU as u64 => n.min(msg::MAX_MESSAGE as u64) as usize,
                    _ => DEFAULT_MTU,
                };
                s.stage = Stage::ServiceInfo;
                Ok((
                    msg_type::TO2_OWNER_SERVICE_INFO_READY,
                    msg::owner_service_info_ready(None),
                ))
            }
            msg_type::TO2_DEVICE_SERVICE_INFO => {
                if s.stage != Stage::ServiceInfo {
                    return Err(To2Error::OutOfOrder {
                        got: msg,
                        expected: "DeviceServiceInfo",
                    });
                }
                let d = DeviceServiceInfo::decode(plain).map_err(m)?;
                self.device_service_info(s, d).await
            }
            msg_type::TO2_DONE => {
                if s.stage != Stage::Done {
                    return Err(To2Error::OutOfOrder {
                        got: msg,
                        expected: "Done",
                    });
                }
                let n = msg::decode_nonce_msg(plain, "TO2.Done").map_err(m)?;
                if n != s.nonce_prove_dv {
                    return Err(To2Error::DoneNonceMismatch);
                }
                let setup = s
                    .nonce_setup_dv
                    .ok_or_else(|| To2Error::ProveDevice("no setup nonce".into()))?;
                self.finish(s)?;
                Ok((msg_type::TO2_DONE2, msg::nonce_msg(&setup)))
            }
            other => Err(To2Error::UnexpectedMessage(other)),
        }
    }

    async fn device_service_info(
        &self,
        s: &mut To2Session,
        d: DeviceServiceInfo,
    ) -> Result<(u8, Vec<u8>), To2Error> {
        for (k, v) in d.info.0 {
            if let Some(name) = k.strip_prefix("devmod:") {
                if s.devmod.len() >= MAX_DEVMOD_PAIRS {
                    return Err(To2Error::ServiceInfo("too many devmod values".into()));
                }
                if name == "modules" {
                    if let Ok(Value::Array(items)) = cbor::decode(&v, msg::MAX_MESSAGE, "devmod") {
                        // [start, count, names...]; liberal: every text item is a name.
                        s.modules.extend(items.into_iter().filter_map(|i| match i {
                            Value::Text(t) => Some(t),
                            _ => None,
                        }));
                    }
                }
                s.devmod.push((k, v));
            } else if k == format!("{MQTT_MODULE}:csr") {
                match cbor::decode(&v, msg::MAX_MESSAGE, "csr") {
                    Ok(Value::Text(pem)) => s.csr = Some(pem),
                    Ok(Value::Bytes(der)) => {
                        s.csr = Some(crypto::pem_encode("CERTIFICATE REQUEST", &der))
                    }
                    _ => return Err(To2Error::ServiceInfo(format!("{k} is not a PEM text"))),
                }
            } else {
                tracing::debug!(guid = %s.guid, key = %k, "ignoring device service info");
            }
        }
        if d.more {
            // The device has more to send: acknowledge with nothing.
            return Ok((
                msg_type::TO2_OWNER_SERVICE_INFO,
                OwnerServiceInfo::default().encode(),
            ));
        }
        if !s.devmod.iter().any(|(k, _)| k == "devmod:active") {
            return Err(To2Error::ServiceInfo(
                "the device sent no devmod (devmod:active is required)".into(),
            ));
        }
        match s.mqtt {
            Mqtt::NotOffered
                if self.issuer.is_some() && s.modules.iter().any(|m| m == MQTT_MODULE) =>
            {
                let k = |n: &str| format!("{MQTT_MODULE}:{n}");
                s.pending
                    .push_back((k("active"), cbor::encode(&Value::Bool(true))));
                s.pending.push_back((
                    k("servers"),
                    cbor::encode(&Value::Array(
                        self.cfg
                            .mqtt_servers
                            .iter()
                            .cloned()
                            .map(Value::Text)
                            .collect(),
                    )),
                ));
                s.pending
                    .push_back((k("csr-request"), cbor::encode(&Value::Text("P-256".into()))));
                s.mqtt = Mqtt::CsrRequested;
            }
            Mqtt::CsrRequested if s.pending.is_empty() => match s.csr.take() {
                Some(csr_pem) => {
                    let issuer = self
                        .issuer
                        .as_ref()
                        .ok_or_else(|| To2Error::Backend("no credential issuer".into()))?;
                    let issued = issuer
                        .issue(IssueRequest {
                            device_id: s.new_guid.hex(),
                            device_info: s.voucher.header().device_info.clone(),
                            csr_pem,
                        })
                        .await
                        .map_err(|e| To2Error::ServiceInfo(format!("CSR refused: {e}")))?;
                    let k = |n: &str| format!("{MQTT_MODULE}:{n}");
                    s.pending
                        .push_back((k("client-id"), cbor::encode(&Value::Text(s.new_guid.hex()))));
                    s.pending
                        .push_back((k("cert"), cbor::encode(&Value::Text(issued.cert_pem))));
                    s.pending
                        .push_back((k("ca"), cbor::encode(&Value::Text(issued.ca_pem))));
                    s.mqtt = Mqtt::Issued(issued.serial);
                }
                None => {
                    tracing::info!(guid = %s.guid, "device sent no CSR; continuing without MQTT credentials");
                    s.mqtt = Mqtt::Declined;
                }
            },
            _ => {}
        }
        // Send what fits in the device's MTU (at least one pair).
        let mut out = ServiceInfo::default();
        let mut size = 8;
        while let Some((k, v)) = s.pending.front() {
            let n = ServiceInfo::pair_size(k, v);
            if !out.0.is_empty() && size + n > s.mtu {
                break;
            }
            size += n;
            if let Some(p) = s.pending.pop_front() {
                out.0.push(p);
            }
        }
        let waiting_for_csr = s.mqtt == Mqtt::CsrRequested;
        let done = s.pending.is_empty() && !waiting_for_csr;
        if done {
            s.stage = Stage::Done;
        }
        Ok((
            msg_type::TO2_OWNER_SERVICE_INFO,
            OwnerServiceInfo {
                more: !s.pending.is_empty(),
                done,
                info: out,
            }
            .encode(),
        ))
    }

    fn finish(&self, s: &mut To2Session) -> Result<(), To2Error> {
        let header = s.voucher.header();
        let new_voucher = match &s.replacement_hmac {
            Some(hmac) => {
                let new_header = OvHeader {
                    prot_ver: header.prot_ver,
                    guid: s.new_guid,
                    rv_info: s.new_rv.clone(),
                    device_info: header.device_info.clone(),
                    mfg_pub_key: s.owner_pub.clone(),
                    cert_chain_hash: header.cert_chain_hash.clone(),
                };
                let mut out = Vec::new();
                cbor::write_head(4, 5, &mut out);
                cbor::encode_into(
                    &cbor::uint_value(crate::fdo_wire::PROTOCOL_VERSION),
                    &mut out,
                );
                cbor::encode_into(&Value::Bytes(new_header.encode()), &mut out);
                cbor::encode_into(&hmac.to_value(), &mut out);
                match s.voucher.cert_chain() {
                    Some(c) => cbor::encode_into(
                        &Value::Array(c.iter().cloned().map(Value::Bytes).collect()),
                        &mut out,
                    ),
                    None => out.push(0xf6),
                }
                out.push(0x80);
                Some(OwnershipVoucher::decode(&out).map_err(To2Error::Internal)?)
            }
            None => None,
        };
        let rec = OnboardRecord {
            old_guid: s.guid,
            guid: if new_voucher.is_some() {
                s.new_guid
            } else {
                s.guid
            },
            device_info: header.device_info.clone(),
            device_cert_hash: s
                .voucher
                .cert_chain()
                .and_then(|c| c.first())
                .map(|leaf| crypto::sha256_hex(leaf)),
            cert_serial: match &s.mqtt {
                Mqtt::Issued(serial) => Some(serial.clone()),
                _ => None,
            },
            onboarded_at: time::OffsetDateTime::now_utc().unix_timestamp(),
            peer: s.peer.clone(),
            owner_key_id: s.owner_pub.key_id().unwrap_or_default(),
            devmod: s
                .devmod
                .iter()
                .map(|(k, v)| (k.clone(), value_text(v)))
                .collect(),
        };
        self.backend
            .onboarded(&rec, new_voucher.as_ref())
            .map_err(To2Error::Backend)?;
        tracing::info!(
            old_guid = %rec.old_guid,
            guid = %rec.guid,
            serial = ?rec.cert_serial,
            owner_key = %rec.owner_key_id,
            "TO2: device onboarded"
        );
        Ok(())
    }
}

/// An [`OwnerBackend`] in memory: vouchers by GUID, owner keys, and the onboarded devices.
#[derive(Default)]
pub struct MemoryOwnerBackend {
    pub vouchers: std::sync::Mutex<std::collections::HashMap<Guid, OwnershipVoucher>>,
    pub keys: Vec<Arc<SigningKey>>,
    pub onboarded: std::sync::Mutex<Vec<OnboardRecord>>,
}

impl MemoryOwnerBackend {
    pub fn new(keys: Vec<Arc<SigningKey>>) -> MemoryOwnerBackend {
        MemoryOwnerBackend {
            keys,
            ..Default::default()
        }
    }

    pub fn add_voucher(&self, v: OwnershipVoucher) {
        self.vouchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(v.guid(), v);
    }

    pub fn voucher_for(&self, guid: &Guid) -> Option<OwnershipVoucher> {
        self.vouchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(guid)
            .cloned()
    }

    pub fn records(&self) -> Vec<OnboardRecord> {
        self.onboarded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl OwnerBackend for MemoryOwnerBackend {
    fn voucher(&self, guid: &Guid) -> Result<Option<OwnershipVoucher>, String> {
        Ok(self
            .vouchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(guid)
            .cloned())
    }

    fn owner_key(&self, key: &PublicKey) -> Option<Arc<SigningKey>> {
        self.keys
            .iter()
            .find(|k| k.public_key().same_key(key))
            .cloned()
    }

    fn onboarded(
        &self,
        rec: &OnboardRecord,
        new_voucher: Option<&OwnershipVoucher>,
    ) -> Result<(), String> {
        if let Some(v) = new_voucher {
            self.add_voucher(v.clone());
        }
        self.onboarded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(rec.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn service() -> OwnerService {
        let key = Arc::new(SigningKey::generate(Curve::P256).unwrap());
        OwnerService::new(
            OwnerConfig::default(),
            Arc::new(MemoryOwnerBackend::new(vec![key])),
            None,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn handler_never_panics(msg in prop_oneof![Just(60u8), Just(62), Just(64), Just(66), Just(68), Just(70), Just(255), any::<u8>()],
                                bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let s = service();
            rt.block_on(async {
                let _ = s.handle(msg, None, &bytes, None).await;
                let _ = s.handle(msg, Some("x"), &bytes, None).await;
                let _ = s.device_error(Some("x"), &bytes);
            });
        }
    }
}
