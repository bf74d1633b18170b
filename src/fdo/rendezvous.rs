//! The rendezvous server: TO0 (an owner registers "GUID → where to find me", proving with
//! the voucher that it owns the device) and TO1 (the device proves its identity with its
//! attestation key and learns where its owner is).
//!
//! TO0: Hello (20) → HelloAck (21, NonceTO0Sign) → OwnerSign (22) → AcceptOwner (23).
//! The server checks that to0d carries its nonce, that the voucher chain verifies, that to1d
//! is signed by the voucher's final owner key and that to1dTo0dHash is the hash of the to0d
//! bytes. The registration lasts `min(WaitSeconds, max_wait)`.
//!
//! TO1: HelloRV (30) → HelloRVAck (31, NonceTO1Proof) → ProveToRV (32, EAT signed by the
//! device key of the registered voucher) → RVRedirect (33, to1d as the owner sent it).

use super::session::{new_token, ProtocolFailure, Reply, SessionLimits, SessionStats, Sessions};
use crate::fdo_wire::crypto;
use crate::fdo_wire::msg::{self, msg_type, Eat, Nonce, To0OwnerSign, To1HelloRv, To1HelloRvAck};
use crate::fdo_wire::types::{Guid, PublicKey};
use crate::fdo_wire::voucher::VerifiedChain;
use crate::fdo_wire::{ErrorCode, FdoError};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a TO0 or TO1 message was refused.
#[derive(Debug, thiserror::Error)]
pub enum RvError {
    #[error("message {msg}: {source}")]
    Message { msg: u8, source: FdoError },
    #[error("message {0}: no open session for this token (expired, unknown or already used)")]
    NoSession(u8),
    #[error("message {0} is not handled by the rendezvous server")]
    UnexpectedMessage(u8),
    #[error("TO0.OwnerSign: to0d carries nonce {found:?}, the session issued {expected:?}")]
    To0NonceMismatch { expected: Nonce, found: Nonce },
    #[error("TO0.OwnerSign: voucher refused: {0}")]
    Voucher(FdoError),
    #[error("TO0.OwnerSign: to1d is not signed by the voucher's owner key")]
    To1dSignature,
    #[error("TO0.OwnerSign: to1dTo0dHash does not match the to0d bytes")]
    To1dHash,
    #[error("TO0.OwnerSign: to1d payload: {0}")]
    To1dPayload(FdoError),
    #[error("TO0.OwnerSign: owner {0} is not accepted by this rendezvous server")]
    OwnerRefused(String),
    #[error("TO1: device {0} is not registered")]
    NotRegistered(Guid),
    #[error("TO1.ProveToRV: nonce does not match NonceTO1Proof")]
    To1NonceMismatch,
    #[error("TO1.ProveToRV: EAT is for device {found}, the session is for {expected}")]
    To1GuidMismatch { expected: Guid, found: Guid },
    #[error("TO1.ProveToRV: signature does not verify with the device key of the voucher")]
    DeviceSignature,
    #[error("{0}")]
    Busy(#[from] super::session::SessionsFull),
    #[error("registration store: {0}")]
    Store(String),
    #[error("{0}")]
    Internal(FdoError),
}

impl ProtocolFailure for RvError {
    fn error_code(&self) -> ErrorCode {
        use RvError::*;
        match self {
            Message { source, .. } => source.error_code(),
            NoSession(_) => ErrorCode::InvalidJwtToken,
            UnexpectedMessage(_) | To1NonceMismatch | DeviceSignature => {
                ErrorCode::InvalidMessageError
            }
            To0NonceMismatch { .. } | To1dSignature | To1dHash | To1dPayload(_) => {
                ErrorCode::InvalidOwnerSignBody
            }
            Voucher(FdoError::GuidMismatch { .. }) => ErrorCode::InvalidGuid,
            Voucher(_) | OwnerRefused(_) => ErrorCode::InvalidOwnershipVoucher,
            NotRegistered(_) => ErrorCode::ResourceNotFound,
            To1GuidMismatch { .. } => ErrorCode::InvalidGuid,
            Busy(_) | Store(_) | Internal(_) => ErrorCode::InternalServerError,
        }
    }
}

/// One device's registration.
#[derive(Debug, Clone)]
pub struct Registration {
    pub guid: Guid,
    /// to1d exactly as the owner signed it (the body of TO1.RVRedirect).
    pub to1d: Vec<u8>,
    /// The device attestation key (leaf of the voucher's device certificate chain).
    pub device_key: PublicKey,
    /// The owner key that registered (the voucher's final owner).
    pub owner_key: PublicKey,
    /// Unix seconds.
    pub expires_at: i64,
}

/// Where registrations live (memory here; a store-backed one plugs in the same way).
pub trait RvStore: Send + Sync {
    fn put(&self, reg: Registration) -> Result<(), String>;
    fn get(&self, guid: &Guid) -> Result<Option<Registration>, String>;
}

/// Registrations in memory, bounded.
pub struct MemoryRvStore {
    map: Mutex<HashMap<Guid, Registration>>,
    max: usize,
}

impl MemoryRvStore {
    pub fn new(max: usize) -> MemoryRvStore {
        MemoryRvStore {
            map: Mutex::new(HashMap::new()),
            max,
        }
    }
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl RvStore for MemoryRvStore {
    fn put(&self, reg: Registration) -> Result<(), String> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= self.max && !m.contains_key(&reg.guid) {
            let now = now_unix();
            m.retain(|_, r| r.expires_at > now);
            if m.len() >= self.max {
                return Err(format!("{} registrations (the limit)", self.max));
            }
        }
        m.insert(reg.guid, reg);
        Ok(())
    }

    fn get(&self, guid: &Guid) -> Result<Option<Registration>, String> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Ok(m.get(guid).filter(|r| r.expires_at > now_unix()).cloned())
    }
}

impl Registration {
    /// CBOR `[guid, to1d, deviceKey, ownerKey, expiresAt]` (the store's format).
    pub fn encode(&self) -> Vec<u8> {
        use crate::fdo_wire::cbor::{int_value, Value};
        crate::fdo_wire::cbor::encode(&Value::Array(vec![
            Value::Bytes(self.guid.0.to_vec()),
            Value::Bytes(self.to1d.clone()),
            self.device_key.to_value(),
            self.owner_key.to_value(),
            int_value(self.expires_at),
        ]))
    }

    pub fn decode(bytes: &[u8]) -> Result<Registration, FdoError> {
        use crate::fdo_wire::cbor;
        const W: &str = "stored registration";
        let [g, to1d, dk, ok, exp] = cbor::array_n(cbor::decode(bytes, 1 << 20, W)?, W)?;
        let g = cbor::bytes(g, W)?;
        let guid = Guid(
            <[u8; 16]>::try_from(g.as_slice())
                .map_err(|_| FdoError::malformed(W, "GUID is not 16 bytes"))?,
        );
        Ok(Registration {
            guid,
            to1d: cbor::bytes(to1d, W)?,
            device_key: PublicKey::from_value(dk, W)?,
            owner_key: PublicKey::from_value(ok, W)?,
            expires_at: cbor::int(exp, W)?,
        })
    }
}

/// Registrations in the store (table `rv-registrations`), flushed before TO0.AcceptOwner,
/// bounded: when full, expired entries are purged, then new GUIDs are refused.
pub struct StoreRvStore {
    table: crate::store::Table,
    max: usize,
}

/// Name of the store table of rendezvous registrations.
pub const RV_TABLE: &str = "rv-registrations";

impl StoreRvStore {
    pub fn open(store: &crate::store::Store, max: usize) -> Result<StoreRvStore, FdoError> {
        Ok(StoreRvStore {
            table: store.table(RV_TABLE)?,
            max,
        })
    }

    /// Remove expired registrations; returns how many.
    pub fn purge_expired(&self) -> Result<usize, String> {
        let now = now_unix();
        let mut gone = Vec::new();
        for (k, v) in self.table.entries().map_err(|e| e.to_string())? {
            match Registration::decode(&v) {
                Ok(r) if r.expires_at > now => {}
                _ => gone.push(k),
            }
        }
        self.table.remove(&gone).map_err(|e| e.to_string())?;
        Ok(gone.len())
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

impl RvStore for StoreRvStore {
    fn put(&self, reg: Registration) -> Result<(), String> {
        let known = self
            .table
            .contains(&reg.guid.0)
            .map_err(|e| e.to_string())?;
        if !known && self.table.len() >= self.max {
            self.purge_expired()?;
            if self.table.len() >= self.max {
                return Err(format!("{} registrations (the limit)", self.max));
            }
        }
        self.table
            .put(&reg.guid.0, &reg.encode())
            .map_err(|e| e.to_string())
    }

    fn get(&self, guid: &Guid) -> Result<Option<Registration>, String> {
        let Some(bytes) = self.table.get(&guid.0).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let reg = Registration::decode(&bytes).map_err(|e| e.to_string())?;
        Ok(Some(reg).filter(|r| r.expires_at > now_unix()))
    }
}

/// Which owners may register (default: any owner that proves a valid voucher chain).
pub type OwnerPolicy = Arc<dyn Fn(&VerifiedChain) -> bool + Send + Sync>;

/// Limits of the rendezvous server.
#[derive(Debug, Clone)]
pub struct RvConfig {
    /// Longest registration granted.
    pub max_wait: Duration,
    /// Each of the TO0 and TO1 session tables (a session there never proves anything before
    /// its last message, so it lives `unproven_ttl`).
    pub sessions: SessionLimits,
}

impl Default for RvConfig {
    fn default() -> Self {
        RvConfig {
            max_wait: Duration::from_secs(30 * 24 * 3600),
            sessions: SessionLimits::default(),
        }
    }
}

struct To1Session {
    guid: Guid,
    nonce: Nonce,
}

/// The rendezvous server's protocol logic (transport-free).
pub struct Rendezvous {
    cfg: RvConfig,
    store: Arc<dyn RvStore>,
    policy: Option<OwnerPolicy>,
    to0: Sessions<Nonce>,
    to1: Sessions<To1Session>,
}

impl Rendezvous {
    pub fn new(cfg: RvConfig, store: Arc<dyn RvStore>, policy: Option<OwnerPolicy>) -> Rendezvous {
        Rendezvous {
            to0: Sessions::new(cfg.sessions.clone()),
            to1: Sessions::new(cfg.sessions.clone()),
            cfg,
            store,
            policy,
        }
    }

    pub fn store(&self) -> &Arc<dyn RvStore> {
        &self.store
    }

    /// Counters of the TO0 and TO1 session tables.
    pub fn session_stats(&self) -> [(&'static str, Arc<SessionStats>); 2] {
        [
            ("to0", self.to0.stats.clone()),
            ("to1", self.to1.stats.clone()),
        ]
    }

    /// Whether this server handles `msg` (TO0 and TO1 requests).
    pub fn handles(msg: u8) -> bool {
        matches!(
            msg,
            msg_type::TO0_HELLO
                | msg_type::TO0_OWNER_SIGN
                | msg_type::TO1_HELLO_RV
                | msg_type::TO1_PROVE_TO_RV
        )
    }

    /// Handle one request from `peer` (its address keys the per-peer session limits). Any
    /// error ends the session.
    pub fn handle(
        &self,
        msg: u8,
        token: Option<&str>,
        body: &[u8],
        peer: Option<IpAddr>,
    ) -> Result<Reply, RvError> {
        let m = |source| RvError::Message { msg, source };
        match msg {
            msg_type::TO0_HELLO => {
                msg::decode_to0_hello(body).map_err(m)?;
                let nonce = Nonce::random().map_err(RvError::Internal)?;
                let token = new_token().map_err(RvError::Internal)?;
                self.to0.open(&token, peer, nonce)?;
                Ok(Reply {
                    msg_type: msg_type::TO0_HELLO_ACK,
                    body: msg::to0_hello_ack(&nonce),
                    token,
                })
            }
            msg_type::TO0_OWNER_SIGN => {
                let token = token.ok_or(RvError::NoSession(msg))?;
                let expected = self.to0.take(token).ok_or(RvError::NoSession(msg))?;
                let os = To0OwnerSign::decode(body).map_err(m)?;
                let wait = self.register(&os, &expected)?;
                Ok(Reply {
                    msg_type: msg_type::TO0_ACCEPT_OWNER,
                    body: msg::to0_accept_owner(wait),
                    token: token.to_string(),
                })
            }
            msg_type::TO1_HELLO_RV => {
                let hello = To1HelloRv::decode(body).map_err(m)?;
                if self
                    .store
                    .get(&hello.guid)
                    .map_err(RvError::Store)?
                    .is_none()
                {
                    return Err(RvError::NotRegistered(hello.guid));
                }
                let nonce = Nonce::random().map_err(RvError::Internal)?;
                let token = new_token().map_err(RvError::Internal)?;
                self.to1.open(
                    &token,
                    peer,
                    To1Session {
                        guid: hello.guid,
                        nonce,
                    },
                )?;
                Ok(Reply {
                    msg_type: msg_type::TO1_HELLO_RV_ACK,
                    // eBSigInfo echoes the device's eASigInfo.
                    body: To1HelloRvAck {
                        nonce,
                        sig_info: hello.sig_info,
                    }
                    .encode(),
                    token,
                })
            }
            msg_type::TO1_PROVE_TO_RV => {
                let token = token.ok_or(RvError::NoSession(msg))?;
                let s = self.to1.take(token).ok_or(RvError::NoSession(msg))?;
                let eat = Eat::decode(body, "TO1.ProveToRV").map_err(m)?;
                if eat.guid != s.guid {
                    return Err(RvError::To1GuidMismatch {
                        expected: s.guid,
                        found: eat.guid,
                    });
                }
                let reg = self
                    .store
                    .get(&s.guid)
                    .map_err(RvError::Store)?
                    .ok_or(RvError::NotRegistered(s.guid))?;
                let key = reg.device_key.verifying_key().map_err(RvError::Internal)?;
                eat.signed
                    .verify(&key, "TO1.ProveToRV")
                    .map_err(|_| RvError::DeviceSignature)?;
                if eat.nonce != s.nonce {
                    return Err(RvError::To1NonceMismatch);
                }
                super::stats::eat_accepted(&eat);
                tracing::info!(guid = %s.guid, legacy_ueid_key = eat.ueid_legacy_key, "TO1: device proved itself; redirected to its owner");
                Ok(Reply {
                    msg_type: msg_type::TO1_RV_REDIRECT,
                    body: reg.to1d,
                    token: token.to_string(),
                })
            }
            other => Err(RvError::UnexpectedMessage(other)),
        }
    }

    fn register(&self, os: &To0OwnerSign, expected: &Nonce) -> Result<u32, RvError> {
        let to0d = &os.to0d;
        if to0d.nonce != *expected {
            return Err(RvError::To0NonceMismatch {
                expected: *expected,
                found: to0d.nonce,
            });
        }
        let chain = to0d.voucher.verify_chain().map_err(RvError::Voucher)?;
        let owner_vk = chain.owner_key.verifying_key().map_err(RvError::Voucher)?;
        os.to1d
            .verify(&owner_vk, "to1d")
            .map_err(|_| RvError::To1dSignature)?;
        let payload = msg::To1dPayload::decode(os.to1d.payload()).map_err(RvError::To1dPayload)?;
        let want =
            crypto::hash(payload.to0d_hash.alg, &[&os.to0d_bytes]).map_err(RvError::To1dPayload)?;
        if want != payload.to0d_hash {
            return Err(RvError::To1dHash);
        }
        if let Some(policy) = &self.policy {
            if !policy(&chain) {
                return Err(RvError::OwnerRefused(
                    chain.owner_key.fingerprint().unwrap_or_default(),
                ));
            }
        }
        let device_key = to0d
            .voucher
            .device_public_key()
            .map_err(RvError::Voucher)?
            .ok_or_else(|| {
                RvError::Voucher(FdoError::CertChain(
                    "the voucher has no device certificate chain, so TO1 cannot verify the device"
                        .into(),
                ))
            })?;
        let max = self.cfg.max_wait.as_secs().min(u32::MAX as u64) as u32;
        let wait = match to0d.wait_secs {
            0 => max,
            w => w.min(max),
        };
        let guid = to0d.voucher.guid();
        self.store
            .put(Registration {
                guid,
                to1d: os.to1d.raw.clone(),
                device_key,
                owner_key: chain.owner_key.clone(),
                expires_at: now_unix() + wait as i64,
            })
            .map_err(RvError::Store)?;
        tracing::info!(
            guid = %guid,
            owner_key = %chain.owner_key.key_id().unwrap_or_default(),
            wait_secs = wait,
            addrs = ?payload.addrs,
            "TO0: owner registered"
        );
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rv() -> Rendezvous {
        Rendezvous::new(
            RvConfig {
                sessions: SessionLimits {
                    max: 4,
                    ..Default::default()
                },
                ..Default::default()
            },
            Arc::new(MemoryRvStore::new(10)),
            None,
        )
    }

    #[test]
    fn sessions_are_bounded_and_single_use() {
        let r = rv();
        let mut tokens = Vec::new();
        for _ in 0..4 {
            tokens.push(
                r.handle(msg_type::TO0_HELLO, None, &msg::to0_hello(), None)
                    .unwrap()
                    .token,
            );
        }
        // Full of sessions that proved nothing: a new one evicts the oldest.
        r.handle(msg_type::TO0_HELLO, None, &msg::to0_hello(), None)
            .unwrap();
        let e = r
            .handle(msg_type::TO0_OWNER_SIGN, Some(&tokens[0]), &[0x80], None)
            .unwrap_err();
        assert_eq!(e.error_code(), ErrorCode::InvalidJwtToken, "evicted");
        assert_eq!(
            r.to0
                .stats
                .evicted
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // A bad OwnerSign consumes its session; the token cannot be used again.
        let e = r
            .handle(msg_type::TO0_OWNER_SIGN, Some(&tokens[1]), &[0x80], None)
            .unwrap_err();
        assert_eq!(e.error_code(), ErrorCode::MessageBodyError);
        let e = r
            .handle(msg_type::TO0_OWNER_SIGN, Some(&tokens[1]), &[0x80], None)
            .unwrap_err();
        assert_eq!(e.error_code(), ErrorCode::InvalidJwtToken);
        let e = r
            .handle(msg_type::TO2_HELLO_DEVICE, None, &[0x80], None)
            .unwrap_err();
        assert_eq!(e.error_code(), ErrorCode::InvalidMessageError);
    }

    #[test]
    fn store_registrations_persist_expire_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let key = crypto::SigningKey::generate(crypto::Curve::P256).unwrap();
        let reg = |g: u8, expires_at: i64| Registration {
            guid: Guid([g; 16]),
            to1d: vec![0x80, g],
            device_key: key.public_key(),
            owner_key: key.public_key(),
            expires_at,
        };
        let later = now_unix() + 3600;
        {
            let store = crate::store::Store::open(&dir.path().join("s")).unwrap();
            let rv = StoreRvStore::open(&store, 2).unwrap();
            rv.put(reg(1, later)).unwrap();
            rv.put(reg(2, now_unix() - 1)).unwrap();
            // Full: the expired one is purged to make room.
            rv.put(reg(3, later)).unwrap();
            assert!(rv.get(&Guid([2; 16])).unwrap().is_none());
            // Full of live ones: a new GUID is refused, a known one is replaced.
            assert!(rv.put(reg(4, later)).unwrap_err().contains("limit"));
            rv.put(reg(3, later + 5)).unwrap();
        }
        let store = crate::store::Store::open(&dir.path().join("s")).unwrap();
        let rv = StoreRvStore::open(&store, 2).unwrap();
        let got = rv.get(&Guid([3; 16])).unwrap().unwrap();
        assert_eq!(got.expires_at, later + 5);
        assert_eq!(got.to1d, vec![0x80, 3]);
        assert!(got.device_key.same_key(&key.public_key()));
        assert!(rv.get(&Guid([4; 16])).unwrap().is_none());
    }

    proptest! {
        #[test]
        fn handler_never_panics(msg in prop_oneof![Just(20u8), Just(22), Just(30), Just(32), any::<u8>()],
                                bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let r = rv();
            let t = r.handle(msg_type::TO0_HELLO, None, &msg::to0_hello(), None).unwrap().token;
            let _ = r.handle(msg, Some(&t), &bytes, None);
            let _ = r.handle(msg, None, &bytes, None);
        }
    }
}
