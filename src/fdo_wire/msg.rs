//! The FDO 1.1 protocol messages of TO0 (20–23), TO1 (30–33) and TO2 (60–71), with their
//! exact CBOR (the CDDL of the specification, PS 2022-04-19).
//!
//! Every decoder takes the message body as received, bounds its size first, and returns
//! [`FdoError`] on anything unexpected; none panics (property tests below). Parts that are
//! hashed or forwarded (the HelloDevice body, the to0d bstr, to1d, voucher entries) are kept
//! as the exact bytes received.
//!
//! COSE labels used (the same in go-fdo and the FIDO conformance tools):
//! CUPHNonce 256 and CUPHOwnerPubKey 257 (unprotected header of TO2.ProveOVHdr), EUPHNonce
//! -259 (unprotected header of TO2.ProveDevice); EAT claims EAT-NONCE 10, EAT-UEID 256
//! (`0x01 || GUID`) and EAT-FDO -257.

use super::cbor::{self, Value};
use super::cose::{self, Sign1, Tagging};
use super::crypto::{self, SigningKey, VerifyingKey};
use super::types::{Guid, HMac, Hash, PublicKey, RendezvousInfo, SigInfo};
use super::voucher::{OvEntry, OvHeader, OwnershipVoucher};
use super::FdoError;
use coset::{HeaderBuilder, Label};
use std::net::IpAddr;

/// Largest message body accepted (TO0.OwnerSign carries a whole voucher).
pub const MAX_MESSAGE: usize = 300 * 1024;
/// Most service info key/value pairs in one message.
pub const MAX_SERVICE_INFO: usize = 256;

/// Message type numbers.
pub mod msg_type {
    pub const TO0_HELLO: u8 = 20;
    pub const TO0_HELLO_ACK: u8 = 21;
    pub const TO0_OWNER_SIGN: u8 = 22;
    pub const TO0_ACCEPT_OWNER: u8 = 23;
    pub const TO1_HELLO_RV: u8 = 30;
    pub const TO1_HELLO_RV_ACK: u8 = 31;
    pub const TO1_PROVE_TO_RV: u8 = 32;
    pub const TO1_RV_REDIRECT: u8 = 33;
    pub const TO2_HELLO_DEVICE: u8 = 60;
    pub const TO2_PROVE_OV_HDR: u8 = 61;
    pub const TO2_GET_OV_NEXT_ENTRY: u8 = 62;
    pub const TO2_OV_NEXT_ENTRY: u8 = 63;
    pub const TO2_PROVE_DEVICE: u8 = 64;
    pub const TO2_SETUP_DEVICE: u8 = 65;
    pub const TO2_DEVICE_SERVICE_INFO_READY: u8 = 66;
    pub const TO2_OWNER_SERVICE_INFO_READY: u8 = 67;
    pub const TO2_DEVICE_SERVICE_INFO: u8 = 68;
    pub const TO2_OWNER_SERVICE_INFO: u8 = 69;
    pub const TO2_DONE: u8 = 70;
    pub const TO2_DONE2: u8 = 71;
    pub const ERROR: u8 = 255;
}

/// COSE header labels and EAT claims of FDO.
pub mod label {
    pub const CUPH_NONCE: i64 = 256;
    pub const CUPH_OWNER_PUBKEY: i64 = 257;
    pub const EUPH_NONCE: i64 = -259;
    pub const EAT_NONCE: i64 = 10;
    pub const EAT_UEID: i64 = 256;
    /// EAT-UEID's number in an early EAT draft, which some FDO 1.1 devices still send (fdo-rs
    /// 0.5). Accepted, counted, never sent.
    pub const EAT_UEID_LEGACY: i64 = 11;
    pub const EAT_FDO: i64 = -257;
    /// First byte of an EAT-UEID: RAND.
    pub const UEID_RAND: u8 = 0x01;
}

fn decode_msg(bytes: &[u8], what: &'static str) -> Result<Value, FdoError> {
    cbor::decode(bytes, MAX_MESSAGE, what)
}

fn decode_n<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[Value; N], FdoError> {
    cbor::array_n(decode_msg(bytes, what)?, what)
}

fn small<T: TryFrom<u64>>(v: Value, what: &'static str) -> Result<T, FdoError> {
    let n = cbor::uint(v, what)?;
    T::try_from(n).map_err(|_| FdoError::malformed(what, format!("{n} out of range")))
}

fn opt_uint(v: Value, what: &'static str) -> Result<Option<u64>, FdoError> {
    match v {
        Value::Null => Ok(None),
        other => cbor::uint(other, what).map(Some),
    }
}

fn opt_value(n: Option<u64>) -> Value {
    n.map(cbor::uint_value).unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------------------------
// Nonce

/// `Nonce = bstr .size 16`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; 16]);

impl std::fmt::Debug for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nonce({})", hex::encode(self.0))
    }
}

impl Nonce {
    pub fn random() -> Result<Nonce, FdoError> {
        let b = crypto::random_bytes(16)?;
        let mut n = [0u8; 16];
        n.copy_from_slice(&b);
        Ok(Nonce(n))
    }

    pub fn to_value(&self) -> Value {
        Value::Bytes(self.0.to_vec())
    }

    pub fn from_value(v: Value, what: &'static str) -> Result<Nonce, FdoError> {
        let b = cbor::bytes(v, what)?;
        let len = b.len();
        <[u8; 16]>::try_from(b)
            .map(Nonce)
            .map_err(|_| FdoError::malformed(what, format!("nonce of {len} bytes (expected 16)")))
    }
}

// ---------------------------------------------------------------------------------------------
// COSE helpers

fn header_value(h: &coset::Header, label: i64) -> Option<&Value> {
    h.rest
        .iter()
        .find(|(l, _)| *l == Label::Int(label))
        .map(|(_, v)| v)
}

/// A COSE_Sign1 as received: its exact bytes and the decoded structure.
#[derive(Debug, Clone)]
pub struct SignedMsg {
    pub raw: Vec<u8>,
    pub sign1: Sign1,
}

impl SignedMsg {
    /// Decode a COSE_Sign1 (tag 18 accepted but not required: liberal).
    pub fn decode(bytes: &[u8], what: &'static str) -> Result<SignedMsg, FdoError> {
        let sign1 = cose::decode(bytes, MAX_MESSAGE, Tagging::Optional, what)?;
        if sign1.payload.is_none() {
            return Err(FdoError::malformed(what, "detached payload"));
        }
        Ok(SignedMsg {
            raw: bytes.to_vec(),
            sign1,
        })
    }

    /// Sign `payload` with `key` (tag 18, algorithm of the key's curve).
    pub fn sign(
        key: &SigningKey,
        payload: Vec<u8>,
        unprotected: coset::Header,
    ) -> Result<SignedMsg, FdoError> {
        let sign1 = cose::sign(key, payload, unprotected)?;
        let raw = cose::encode(&sign1, true)?;
        Ok(SignedMsg { raw, sign1 })
    }

    pub fn payload(&self) -> &[u8] {
        self.sign1.payload.as_deref().unwrap_or(&[])
    }

    pub fn unprotected(&self, label: i64) -> Option<&Value> {
        header_value(&self.sign1.unprotected, label)
    }

    pub fn verify(&self, key: &VerifyingKey, what: &'static str) -> Result<(), FdoError> {
        cose::verify(&self.sign1, key, what)
    }
}

// ---------------------------------------------------------------------------------------------
// EAT (TO1.ProveToRV, TO2.ProveDevice)

/// An Entity Attestation Token: COSE_Sign1 over a claims map, signed by the device.
#[derive(Debug, Clone)]
pub struct Eat {
    pub signed: SignedMsg,
    pub nonce: Nonce,
    pub guid: Guid,
    /// EAT-FDO claim (TO2.ProveDevice: `[xBKeyExchange]`).
    pub fdo: Option<Value>,
    /// EUPHNonce from the unprotected header (TO2.ProveDevice: NonceTO2SetupDv).
    pub unprotected_nonce: Option<Nonce>,
    /// The UEID came under the early draft's claim key 11, not the specification's 256.
    pub ueid_legacy_key: bool,
}

impl Eat {
    pub fn sign(
        key: &SigningKey,
        guid: &Guid,
        nonce: &Nonce,
        fdo: Option<Value>,
        unprotected_nonce: Option<&Nonce>,
    ) -> Result<Eat, FdoError> {
        Self::sign_with_ueid_key(key, guid, nonce, fdo, unprotected_nonce, label::EAT_UEID)
    }

    /// [`Eat::sign`] with the UEID under `ueid_key`: 256 (the specification's) or 11, to act
    /// as an early-draft device in interoperability tests.
    pub fn sign_with_ueid_key(
        key: &SigningKey,
        guid: &Guid,
        nonce: &Nonce,
        fdo: Option<Value>,
        unprotected_nonce: Option<&Nonce>,
        ueid_key: i64,
    ) -> Result<Eat, FdoError> {
        let mut ueid = vec![label::UEID_RAND];
        ueid.extend_from_slice(&guid.0);
        let mut claims = vec![
            (cbor::int_value(label::EAT_NONCE), nonce.to_value()),
            (cbor::int_value(ueid_key), Value::Bytes(ueid)),
        ];
        if let Some(f) = &fdo {
            claims.push((cbor::int_value(label::EAT_FDO), f.clone()));
        }
        let mut h = HeaderBuilder::new();
        if let Some(n) = unprotected_nonce {
            h = h.value(label::EUPH_NONCE, n.to_value());
        }
        let signed = SignedMsg::sign(key, cbor::encode(&Value::Map(claims)), h.build())?;
        Ok(Eat {
            signed,
            nonce: *nonce,
            guid: *guid,
            fdo,
            unprotected_nonce: unprotected_nonce.copied(),
            ueid_legacy_key: ueid_key == label::EAT_UEID_LEGACY,
        })
    }

    pub fn decode(bytes: &[u8], what: &'static str) -> Result<Eat, FdoError> {
        let signed = SignedMsg::decode(bytes, what)?;
        let claims = match cbor::decode(signed.payload(), MAX_MESSAGE, what)? {
            Value::Map(m) => m,
            other => {
                return Err(FdoError::malformed(
                    what,
                    format!("EAT claims: expected a map, found {}", cbor::kind(&other)),
                ))
            }
        };
        let claim = |l: i64| {
            claims
                .iter()
                .find(|(k, _)| matches!(k, Value::Integer(i) if i128::from(*i) == l as i128))
                .map(|(_, v)| v.clone())
        };
        let nonce = Nonce::from_value(
            claim(label::EAT_NONCE)
                .ok_or_else(|| FdoError::malformed(what, "no EAT-NONCE claim"))?,
            what,
        )?;
        // The specification's key (256) first; the early draft's 11 only when 256 is absent.
        let (ueid, ueid_legacy_key) = match claim(label::EAT_UEID) {
            Some(v) => (v, false),
            None => (
                claim(label::EAT_UEID_LEGACY)
                    .ok_or_else(|| FdoError::malformed(what, "no EAT-UEID claim"))?,
                true,
            ),
        };
        let ueid = cbor::bytes(ueid, what)?;
        if ueid.len() != 17 || ueid[0] != label::UEID_RAND {
            return Err(FdoError::malformed(what, "EAT-UEID is not 0x01 || GUID"));
        }
        let mut g = [0u8; 16];
        g.copy_from_slice(&ueid[1..]);
        let unprotected_nonce = match signed.unprotected(label::EUPH_NONCE) {
            Some(v) => Some(Nonce::from_value(v.clone(), what)?),
            None => None,
        };
        Ok(Eat {
            nonce,
            guid: Guid(g),
            fdo: claim(label::EAT_FDO),
            unprotected_nonce,
            ueid_legacy_key,
            signed,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// TO0

/// TO0.Hello (20) = `[]`.
pub fn to0_hello() -> Vec<u8> {
    cbor::encode(&Value::Array(vec![]))
}

/// Check TO0.Hello (any array is accepted).
pub fn decode_to0_hello(bytes: &[u8]) -> Result<(), FdoError> {
    cbor::array(decode_msg(bytes, "TO0.Hello")?, "TO0.Hello").map(|_| ())
}

/// TO0.HelloAck (21) = `[NonceTO0Sign]`.
pub fn to0_hello_ack(nonce: &Nonce) -> Vec<u8> {
    cbor::encode(&Value::Array(vec![nonce.to_value()]))
}

pub fn decode_to0_hello_ack(bytes: &[u8]) -> Result<Nonce, FdoError> {
    let [n] = decode_n(bytes, "TO0.HelloAck")?;
    Nonce::from_value(n, "TO0.HelloAck")
}

/// `RVTO2AddrEntry = [RVIP / null, RVDNS / null, RVPort, RVProtocol]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct To2Addr {
    pub ip: Option<IpAddr>,
    pub dns: Option<String>,
    pub port: u16,
    /// TransportProtocol: 1 TCP, 2 TLS, 3 HTTP, 4 CoAP, 5 HTTPS, 6 CoAPS.
    pub protocol: u8,
}

/// `TransportProtocol` values of RVTO2AddrEntry.
pub mod transport {
    pub const TCP: u8 = 1;
    pub const TLS: u8 = 2;
    pub const HTTP: u8 = 3;
    pub const COAP: u8 = 4;
    pub const HTTPS: u8 = 5;
    pub const COAPS: u8 = 6;
}

const MAX_TO2_ADDRS: usize = 16;

impl To2Addr {
    pub fn to_value(&self) -> Value {
        Value::Array(vec![
            match self.ip {
                Some(IpAddr::V4(a)) => Value::Bytes(a.octets().to_vec()),
                Some(IpAddr::V6(a)) => Value::Bytes(a.octets().to_vec()),
                None => Value::Null,
            },
            match &self.dns {
                Some(d) => Value::Text(d.clone()),
                None => Value::Null,
            },
            cbor::uint_value(self.port as u64),
            cbor::uint_value(self.protocol as u64),
        ])
    }

    pub fn from_value(v: Value) -> Result<To2Addr, FdoError> {
        const W: &str = "RVTO2AddrEntry";
        let [ip, dns, port, proto] = cbor::array_n(v, W)?;
        let ip = match ip {
            Value::Null => None,
            v => {
                let b = cbor::bytes(v, W)?;
                if let Ok(a) = <[u8; 4]>::try_from(b.as_slice()) {
                    Some(IpAddr::from(a))
                } else if let Ok(a) = <[u8; 16]>::try_from(b.as_slice()) {
                    Some(IpAddr::from(a))
                } else {
                    return Err(FdoError::malformed(W, format!("IP of {} bytes", b.len())));
                }
            }
        };
        let dns = match dns {
            Value::Null => None,
            v => Some(cbor::text(v, W)?),
        };
        if ip.is_none() && dns.is_none() {
            return Err(FdoError::malformed(W, "neither IP nor DNS"));
        }
        Ok(To2Addr {
            ip,
            dns,
            port: small(port, W)?,
            protocol: small(proto, W)?,
        })
    }

    /// `host:port` for an HTTP client (DNS before IP).
    pub fn host(&self) -> String {
        match (&self.dns, self.ip) {
            (Some(d), _) => d.clone(),
            (None, Some(IpAddr::V6(a))) => format!("[{a}]"),
            (None, Some(a)) => a.to_string(),
            (None, None) => String::new(),
        }
    }
}

/// `to1dBlobPayload = [to1dRV: [+ RVTO2AddrEntry], to1dTo0dHash: Hash]`.
#[derive(Debug, Clone, PartialEq)]
pub struct To1dPayload {
    pub addrs: Vec<To2Addr>,
    pub to0d_hash: Hash,
}

impl To1dPayload {
    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&Value::Array(vec![
            Value::Array(self.addrs.iter().map(To2Addr::to_value).collect()),
            self.to0d_hash.to_value(),
        ]))
    }

    pub fn decode(bytes: &[u8]) -> Result<To1dPayload, FdoError> {
        const W: &str = "to1dBlobPayload";
        let [addrs, hash] = decode_n(bytes, W)?;
        let addrs = cbor::array(addrs, W)?;
        if addrs.is_empty() || addrs.len() > MAX_TO2_ADDRS {
            return Err(FdoError::malformed(W, format!("{} addresses", addrs.len())));
        }
        Ok(To1dPayload {
            addrs: addrs
                .into_iter()
                .map(To2Addr::from_value)
                .collect::<Result<_, _>>()?,
            to0d_hash: Hash::from_value(hash, "to1dTo0dHash")?,
        })
    }
}

/// `to0d = [OwnershipVoucher, WaitSeconds, NonceTO0Sign]`.
#[derive(Debug, Clone)]
pub struct To0d {
    pub voucher: OwnershipVoucher,
    pub wait_secs: u32,
    pub nonce: Nonce,
}

impl To0d {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        cbor::write_head(4, 3, &mut out);
        out.extend_from_slice(&self.voucher.encode());
        cbor::encode_into(&cbor::uint_value(self.wait_secs as u64), &mut out);
        cbor::encode_into(&self.nonce.to_value(), &mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<To0d, FdoError> {
        const W: &str = "to0d";
        if bytes.len() > MAX_MESSAGE {
            return Err(FdoError::TooLarge {
                what: W,
                len: bytes.len(),
                max: MAX_MESSAGE,
            });
        }
        let items = cbor::array_items(bytes, W)?;
        let [ov, wait, nonce] = <[&[u8]; 3]>::try_from(items.as_slice())
            .map_err(|_| FdoError::malformed(W, format!("{} items (expected 3)", items.len())))?;
        Ok(To0d {
            voucher: OwnershipVoucher::decode(ov)?,
            wait_secs: small(cbor::decode(wait, 16, W)?, "WaitSeconds")?,
            nonce: Nonce::from_value(cbor::decode(nonce, 64, W)?, "NonceTO0Sign")?,
        })
    }
}

/// TO0.OwnerSign (22) = `[to0d: bstr .cbor to0d, to1d: COSE_Sign1 to1dBlobPayload]`.
#[derive(Debug, Clone)]
pub struct To0OwnerSign {
    /// The exact to0d bytes (what to1dTo0dHash covers).
    pub to0d_bytes: Vec<u8>,
    pub to0d: To0d,
    pub to1d: SignedMsg,
}

impl To0OwnerSign {
    pub fn encode(to0d_bytes: &[u8], to1d: &SignedMsg) -> Vec<u8> {
        let mut out = Vec::new();
        cbor::write_head(4, 2, &mut out);
        cbor::encode_into(&Value::Bytes(to0d_bytes.to_vec()), &mut out);
        out.extend_from_slice(&to1d.raw);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<To0OwnerSign, FdoError> {
        const W: &str = "TO0.OwnerSign";
        if bytes.len() > MAX_MESSAGE {
            return Err(FdoError::TooLarge {
                what: W,
                len: bytes.len(),
                max: MAX_MESSAGE,
            });
        }
        let items = cbor::array_items(bytes, W)?;
        let [to0d, to1d] = <[&[u8]; 2]>::try_from(items.as_slice())
            .map_err(|_| FdoError::malformed(W, format!("{} items (expected 2)", items.len())))?;
        let to0d_bytes = cbor::bytes(cbor::decode(to0d, MAX_MESSAGE, W)?, "to0d")?;
        Ok(To0OwnerSign {
            to0d: To0d::decode(&to0d_bytes)?,
            to0d_bytes,
            to1d: SignedMsg::decode(to1d, "to1d")?,
        })
    }
}

/// TO0.AcceptOwner (23) = `[WaitSeconds]`.
pub fn to0_accept_owner(wait_secs: u32) -> Vec<u8> {
    cbor::encode(&Value::Array(vec![cbor::uint_value(wait_secs as u64)]))
}

pub fn decode_to0_accept_owner(bytes: &[u8]) -> Result<u32, FdoError> {
    let [w] = decode_n(bytes, "TO0.AcceptOwner")?;
    small(w, "WaitSeconds")
}

// ---------------------------------------------------------------------------------------------
// TO1

/// TO1.HelloRV (30) = `[Guid, eASigInfo]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct To1HelloRv {
    pub guid: Guid,
    pub sig_info: SigInfo,
}

impl To1HelloRv {
    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&Value::Array(vec![
            self.guid.to_value(),
            self.sig_info.to_value(),
        ]))
    }

    pub fn decode(bytes: &[u8]) -> Result<To1HelloRv, FdoError> {
        let [g, s] = decode_n(bytes, "TO1.HelloRV")?;
        Ok(To1HelloRv {
            guid: Guid::from_value(g, "TO1.HelloRV")?,
            sig_info: SigInfo::from_value(s)?,
        })
    }
}

/// TO1.HelloRVAck (31) = `[NonceTO1Proof, eBSigInfo]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct To1HelloRvAck {
    pub nonce: Nonce,
    pub sig_info: SigInfo,
}

impl To1HelloRvAck {
    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&Value::Array(vec![
            self.nonce.to_value(),
            self.sig_info.to_value(),
        ]))
    }

    pub fn decode(bytes: &[u8]) -> Result<To1HelloRvAck, FdoError> {
        let [n, s] = decode_n(bytes, "TO1.HelloRVAck")?;
        Ok(To1HelloRvAck {
            nonce: Nonce::from_value(n, "NonceTO1Proof")?,
            sig_info: SigInfo::from_value(s)?,
        })
    }
}

// TO1.ProveToRV (32) is an [`Eat`]; TO1.RVRedirect (33) is the to1d COSE_Sign1 as stored.

// ---------------------------------------------------------------------------------------------
// TO2

/// Key exchange suite names of TO2.HelloDevice.
pub const KEX_ECDH256: &str = "ECDH256";
pub const KEX_ECDH384: &str = "ECDH384";

/// TO2.HelloDevice (60) = `[maxDeviceMessageSize, Guid, NonceTO2ProveOV, kexSuiteName,
/// cipherSuiteName, eASigInfo]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloDevice {
    /// As sent; 0 means the default. Not trusted for anything (devices send 17).
    pub max_device_message_size: u64,
    pub guid: Guid,
    pub nonce: Nonce,
    pub kex_suite: String,
    pub cipher_suite: i64,
    pub sig_info: SigInfo,
}

impl HelloDevice {
    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&Value::Array(vec![
            cbor::uint_value(self.max_device_message_size),
            self.guid.to_value(),
            self.nonce.to_value(),
            Value::Text(self.kex_suite.clone()),
            cbor::int_value(self.cipher_suite),
            self.sig_info.to_value(),
        ]))
    }

    pub fn decode(bytes: &[u8]) -> Result<HelloDevice, FdoError> {
        const W: &str = "TO2.HelloDevice";
        let [max, guid, nonce, kex, cipher, sig] = decode_n(bytes, W)?;
        let kex_suite = cbor::text(kex, "kexSuiteName")?;
        if kex_suite.len() > 64 {
            return Err(FdoError::malformed(W, "kexSuiteName too long"));
        }
        Ok(HelloDevice {
            // Liberal: a negative or absurd size is treated as "default".
            max_device_message_size: cbor::uint(max, W).unwrap_or(0),
            guid: Guid::from_value(guid, W)?,
            nonce: Nonce::from_value(nonce, "NonceTO2ProveOV")?,
            kex_suite,
            cipher_suite: cbor::int(cipher, "cipherSuiteName")?,
            sig_info: SigInfo::from_value(sig)?,
        })
    }
}

/// `TO2ProveOVHdrPayload = [bstr .cbor OVHeader, NumOVEntries, HMac, NonceTO2ProveOV,
/// eBSigInfo, xAKeyExchange, helloDeviceHash, maxOwnerMessageSize]`.
#[derive(Debug, Clone)]
pub struct ProveOvHdrPayload {
    pub header_bytes: Vec<u8>,
    pub header: OvHeader,
    pub num_entries: u8,
    pub hmac: HMac,
    pub nonce: Nonce,
    pub sig_info: SigInfo,
    pub xa: Vec<u8>,
    pub hello_device_hash: Hash,
    pub max_owner_message_size: u64,
}

impl ProveOvHdrPayload {
    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&Value::Array(vec![
            Value::Bytes(self.header_bytes.clone()),
            cbor::uint_value(self.num_entries as u64),
            self.hmac.to_value(),
            self.nonce.to_value(),
            self.sig_info.to_value(),
            Value::Bytes(self.xa.clone()),
            self.hello_device_hash.to_value(),
            cbor::uint_value(self.max_owner_message_size),
        ]))
    }

    pub fn decode(bytes: &[u8]) -> Result<ProveOvHdrPayload, FdoError> {
        const W: &str = "TO2ProveOVHdrPayload";
        let [hdr, num, hmac, nonce, sig, xa, hash, max] = decode_n(bytes, W)?;
        let header_bytes = cbor::bytes(hdr, W)?;
        Ok(ProveOvHdrPayload {
            header: OvHeader::decode(&header_bytes)?,
            header_bytes,
            num_entries: small(num, "NumOVEntries")?,
            hmac: Hash::from_value(hmac, "OVHeaderHMac")?,
            nonce: Nonce::from_value(nonce, "NonceTO2ProveOV")?,
            sig_info: SigInfo::from_value(sig)?,
            xa: cbor::bytes(xa, "xAKeyExchange")?,
            hello_device_hash: Hash::from_value(hash, "helloDeviceHash")?,
            max_owner_message_size: cbor::uint(max, W).unwrap_or(0),
        })
    }
}

/// TO2.ProveOVHdr (61): COSE_Sign1 by the owner key over [`ProveOvHdrPayload`], with
/// CUPHNonce (NonceTO2ProveDv) and CUPHOwnerPubKey in the unprotected header.
#[derive(Debug, Clone)]
pub struct ProveOvHdr {
    pub signed: SignedMsg,
    pub payload: ProveOvHdrPayload,
    pub nonce_prove_dv: Nonce,
    pub owner_key: PublicKey,
}

impl ProveOvHdr {
    pub fn sign(
        key: &SigningKey,
        payload: ProveOvHdrPayload,
        nonce_prove_dv: &Nonce,
        owner_key: &PublicKey,
    ) -> Result<ProveOvHdr, FdoError> {
        let h = HeaderBuilder::new()
            .value(label::CUPH_NONCE, nonce_prove_dv.to_value())
            .value(label::CUPH_OWNER_PUBKEY, owner_key.to_value())
            .build();
        let signed = SignedMsg::sign(key, payload.encode(), h)?;
        Ok(ProveOvHdr {
            signed,
            payload,
            nonce_prove_dv: *nonce_prove_dv,
            owner_key: owner_key.clone(),
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<ProveOvHdr, FdoError> {
        const W: &str = "TO2.ProveOVHdr";
        let signed = SignedMsg::decode(bytes, W)?;
        let payload = ProveOvHdrPayload::decode(signed.payload())?;
        let nonce = signed
            .unprotected(label::CUPH_NONCE)
            .ok_or_else(|| FdoError::malformed(W, "no CUPHNonce"))?
            .clone();
        let key = signed
            .unprotected(label::CUPH_OWNER_PUBKEY)
            .ok_or_else(|| FdoError::malformed(W, "no CUPHOwnerPubKey"))?
            .clone();
        Ok(ProveOvHdr {
            nonce_prove_dv: Nonce::from_value(nonce, "CUPHNonce")?,
            owner_key: PublicKey::from_value(key, "CUPHOwnerPubKey")?,
            payload,
            signed,
        })
    }
}

/// TO2.GetOVNextEntry (62) = `[OVEntryNum]`.
pub fn get_ov_next_entry(n: u8) -> Vec<u8> {
    cbor::encode(&Value::Array(vec![cbor::uint_value(n as u64)]))
}

pub fn decode_get_ov_next_entry(bytes: &[u8]) -> Result<u8, FdoError> {
    let [n] = decode_n(bytes, "TO2.GetOVNextEntry")?;
    small(n, "OVEntryNum")
}

/// TO2.OVNextEntry (63) = `[OVEntryNum, OVEntry]`.
pub fn ov_next_entry(n: u8, entry: &OvEntry) -> Vec<u8> {
    let mut out = Vec::new();
    cbor::write_head(4, 2, &mut out);
    cbor::encode_into(&cbor::uint_value(n as u64), &mut out);
    out.extend_from_slice(entry.raw());
    out
}

pub fn decode_ov_next_entry(bytes: &[u8]) -> Result<(u8, OvEntry), FdoError> {
    const W: &str = "TO2.OVNextEntry";
    if bytes.len() > MAX_MESSAGE {
        return Err(FdoError::TooLarge {
            what: W,
            len: bytes.len(),
            max: MAX_MESSAGE,
        });
    }
    let items = cbor::array_items(bytes, W)?;
    let [n, e] = <[&[u8]; 2]>::try_from(items.as_slice())
        .map_err(|_| FdoError::malformed(W, format!("{} items (expected 2)", items.len())))?;
    Ok((
        small(cbor::decode(n, 16, W)?, "OVEntryNum")?,
        OvEntry::decode(e)?,
    ))
}

/// `TO2SetupDevicePayload = [RendezvousInfo, Guid, NonceTO2SetupDv, Owner2Key]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SetupDevicePayload {
    pub rv_info: RendezvousInfo,
    pub guid: Guid,
    pub nonce: Nonce,
    pub owner2_key: PublicKey,
}

impl SetupDevicePayload {
    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&Value::Array(vec![
            self.rv_info.to_value(),
            self.guid.to_value(),
            self.nonce.to_value(),
            self.owner2_key.to_value(),
        ]))
    }

    pub fn decode(bytes: &[u8]) -> Result<SetupDevicePayload, FdoError> {
        const W: &str = "TO2SetupDevicePayload";
        let [rv, guid, nonce, key] = decode_n(bytes, W)?;
        Ok(SetupDevicePayload {
            rv_info: RendezvousInfo::from_value(rv)?,
            guid: Guid::from_value(guid, W)?,
            nonce: Nonce::from_value(nonce, "NonceTO2SetupDv")?,
            owner2_key: PublicKey::from_value(key, "Owner2Key")?,
        })
    }
}

/// TO2.DeviceServiceInfoReady (66) = `[ReplacementHMac / null, maxOwnerServiceInfoSz / null]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceServiceInfoReady {
    pub replacement_hmac: Option<HMac>,
    pub max_owner_service_info_size: Option<u64>,
}

impl DeviceServiceInfoReady {
    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&Value::Array(vec![
            match &self.replacement_hmac {
                Some(h) => h.to_value(),
                None => Value::Null,
            },
            opt_value(self.max_owner_service_info_size),
        ]))
    }

    pub fn decode(bytes: &[u8]) -> Result<DeviceServiceInfoReady, FdoError> {
        const W: &str = "TO2.DeviceServiceInfoReady";
        let [h, max] = decode_n(bytes, W)?;
        Ok(DeviceServiceInfoReady {
            replacement_hmac: match h {
                Value::Null => None,
                v => Some(Hash::from_value(v, "ReplacementHMac")?),
            },
            // Liberal: a size of the wrong type is "default".
            max_owner_service_info_size: opt_uint(max, W).unwrap_or(None),
        })
    }
}

/// TO2.OwnerServiceInfoReady (67) = `[maxDeviceServiceInfoSz / null]`.
pub fn owner_service_info_ready(max: Option<u64>) -> Vec<u8> {
    cbor::encode(&Value::Array(vec![opt_value(max)]))
}

pub fn decode_owner_service_info_ready(bytes: &[u8]) -> Result<Option<u64>, FdoError> {
    let [m] = decode_n(bytes, "TO2.OwnerServiceInfoReady")?;
    Ok(opt_uint(m, "maxDeviceServiceInfoSz").unwrap_or(None))
}

/// `ServiceInfo = [* [ServiceInfoKey: tstr "module:message", ServiceInfoVal: bstr .cbor any]]`.
/// Values are kept as their CBOR encoding.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceInfo(pub Vec<(String, Vec<u8>)>);

impl ServiceInfo {
    pub fn push(&mut self, key: &str, value: &Value) {
        self.0.push((key.to_string(), cbor::encode(value)));
    }

    pub fn to_value(&self) -> Value {
        Value::Array(
            self.0
                .iter()
                .map(|(k, v)| Value::Array(vec![Value::Text(k.clone()), Value::Bytes(v.clone())]))
                .collect(),
        )
    }

    /// Encoded size of one pair (for packing into the peer's MTU).
    pub fn pair_size(key: &str, value: &[u8]) -> usize {
        cbor::encode(&Value::Array(vec![
            Value::Text(key.to_string()),
            Value::Bytes(value.to_vec()),
        ]))
        .len()
    }

    pub fn from_value(v: Value) -> Result<ServiceInfo, FdoError> {
        const W: &str = "ServiceInfo";
        let items = cbor::array(v, W)?;
        if items.len() > MAX_SERVICE_INFO {
            return Err(FdoError::malformed(W, format!("{} pairs", items.len())));
        }
        let mut out = Vec::with_capacity(items.len());
        for i in items {
            let [k, v] = cbor::array_n(i, W)?;
            let k = cbor::text(k, "ServiceInfoKey")?;
            let v = match v {
                Value::Bytes(b) => b,
                // Liberal: a value that is not wrapped in a bstr is kept as its encoding.
                other => cbor::encode(&other),
            };
            out.push((k, v));
        }
        Ok(ServiceInfo(out))
    }

    /// The decoded value of the first pair with `key`.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| cbor::decode(v, MAX_MESSAGE, "ServiceInfoVal").ok())
    }
}

/// TO2.DeviceServiceInfo (68) = `[IsMoreServiceInfo, ServiceInfo]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceServiceInfo {
    pub more: bool,
    pub info: ServiceInfo,
}

impl DeviceServiceInfo {
    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&Value::Array(vec![
            Value::Bool(self.more),
            self.info.to_value(),
        ]))
    }

    pub fn decode(bytes: &[u8]) -> Result<DeviceServiceInfo, FdoError> {
        const W: &str = "TO2.DeviceServiceInfo";
        let [m, i] = decode_n(bytes, W)?;
        Ok(DeviceServiceInfo {
            more: cbor::boolean(m, W)?,
            info: ServiceInfo::from_value(i)?,
        })
    }
}

/// TO2.OwnerServiceInfo (69) = `[IsMoreServiceInfo, IsDone, ServiceInfo]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OwnerServiceInfo {
    pub more: bool,
    pub done: bool,
    pub info: ServiceInfo,
}

impl OwnerServiceInfo {
    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&Value::Array(vec![
            Value::Bool(self.more),
            Value::Bool(self.done),
            self.info.to_value(),
        ]))
    }

    pub fn decode(bytes: &[u8]) -> Result<OwnerServiceInfo, FdoError> {
        const W: &str = "TO2.OwnerServiceInfo";
        let [m, d, i] = decode_n(bytes, W)?;
        Ok(OwnerServiceInfo {
            more: cbor::boolean(m, W)?,
            done: cbor::boolean(d, W)?,
            info: ServiceInfo::from_value(i)?,
        })
    }
}

/// TO2.Done (70) = `[NonceTO2ProveDv]`; TO2.Done2 (71) = `[NonceTO2SetupDv]`.
pub fn nonce_msg(n: &Nonce) -> Vec<u8> {
    cbor::encode(&Value::Array(vec![n.to_value()]))
}

pub fn decode_nonce_msg(bytes: &[u8], what: &'static str) -> Result<Nonce, FdoError> {
    let [n] = decode_n(bytes, what)?;
    Nonce::from_value(n, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdo_wire::crypto::Curve;
    use crate::fdo_wire::types::HashAlg;
    use proptest::prelude::*;

    fn nonce(b: u8) -> Nonce {
        Nonce([b; 16])
    }

    #[test]
    fn simple_messages_roundtrip_with_exact_bytes() {
        assert_eq!(to0_hello(), [0x80]);
        assert_eq!(
            decode_to0_hello_ack(&to0_hello_ack(&nonce(1))).unwrap(),
            nonce(1)
        );
        assert_eq!(to0_accept_owner(3600), [0x81, 0x19, 0x0e, 0x10]);
        assert_eq!(
            decode_to0_accept_owner(&to0_accept_owner(3600)).unwrap(),
            3600
        );
        let h = To1HelloRv {
            guid: Guid([7; 16]),
            sig_info: SigInfo::for_curve(Curve::P256),
        };
        let enc = h.encode();
        // [h'07..', [-7, h'']]
        assert_eq!(&enc[..2], &[0x82, 0x50]);
        assert_eq!(&enc[18..], &[0x82, 0x26, 0x40]);
        assert_eq!(To1HelloRv::decode(&enc).unwrap(), h);
        let hd = HelloDevice {
            max_device_message_size: 17,
            guid: Guid([1; 16]),
            nonce: nonce(2),
            kex_suite: KEX_ECDH256.into(),
            cipher_suite: 1,
            sig_info: SigInfo {
                sg_type: -35,
                info: vec![],
            },
        };
        assert_eq!(HelloDevice::decode(&hd.encode()).unwrap(), hd);
        assert_eq!(get_ov_next_entry(3), [0x81, 0x03]);
        assert_eq!(decode_get_ov_next_entry(&[0x81, 0x03]).unwrap(), 3);
        let r = DeviceServiceInfoReady {
            replacement_hmac: Some(Hash {
                alg: HashAlg::HmacSha256,
                value: vec![1; 32],
            }),
            max_owner_service_info_size: None,
        };
        assert_eq!(DeviceServiceInfoReady::decode(&r.encode()).unwrap(), r);
        let mut si = ServiceInfo::default();
        si.push("devmod:active", &Value::Bool(true));
        let d = DeviceServiceInfo {
            more: false,
            info: si.clone(),
        };
        assert_eq!(DeviceServiceInfo::decode(&d.encode()).unwrap(), d);
        assert_eq!(d.info.get("devmod:active"), Some(Value::Bool(true)));
        let o = OwnerServiceInfo {
            more: true,
            done: false,
            info: si,
        };
        assert_eq!(OwnerServiceInfo::decode(&o.encode()).unwrap(), o);
        assert_eq!(
            decode_nonce_msg(&nonce_msg(&nonce(9)), "t").unwrap(),
            nonce(9)
        );
        assert_eq!(
            decode_owner_service_info_ready(&owner_service_info_ready(None)).unwrap(),
            None
        );
    }

    #[test]
    fn to1d_and_eat_roundtrip() {
        let p = To1dPayload {
            addrs: vec![To2Addr {
                ip: Some("127.0.0.1".parse().unwrap()),
                dns: None,
                port: 8041,
                protocol: transport::HTTP,
            }],
            to0d_hash: Hash {
                alg: HashAlg::Sha256,
                value: vec![3; 32],
            },
        };
        assert_eq!(To1dPayload::decode(&p.encode()).unwrap(), p);
        let k = SigningKey::generate(Curve::P256).unwrap();
        let eat = Eat::sign(
            &k,
            &Guid([5; 16]),
            &nonce(4),
            Some(Value::Array(vec![Value::Bytes(vec![1, 2])])),
            Some(&nonce(6)),
        )
        .unwrap();
        let back = Eat::decode(&eat.signed.raw, "t").unwrap();
        assert_eq!(back.nonce, nonce(4));
        assert_eq!(back.guid, Guid([5; 16]));
        assert_eq!(back.unprotected_nonce, Some(nonce(6)));
        back.signed
            .verify(&VerifyingKey::from_spki(&k.spki()).unwrap(), "t")
            .unwrap();
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_to0_hello(&bytes);
            let _ = decode_to0_hello_ack(&bytes);
            let _ = To0OwnerSign::decode(&bytes);
            let _ = To0d::decode(&bytes);
            let _ = To1dPayload::decode(&bytes);
            let _ = decode_to0_accept_owner(&bytes);
            let _ = To1HelloRv::decode(&bytes);
            let _ = To1HelloRvAck::decode(&bytes);
            let _ = Eat::decode(&bytes, "t");
            let _ = HelloDevice::decode(&bytes);
            let _ = ProveOvHdr::decode(&bytes);
            let _ = ProveOvHdrPayload::decode(&bytes);
            let _ = decode_get_ov_next_entry(&bytes);
            let _ = decode_ov_next_entry(&bytes);
            let _ = SetupDevicePayload::decode(&bytes);
            let _ = DeviceServiceInfoReady::decode(&bytes);
            let _ = decode_owner_service_info_ready(&bytes);
            let _ = DeviceServiceInfo::decode(&bytes);
            let _ = OwnerServiceInfo::decode(&bytes);
            let _ = decode_nonce_msg(&bytes, "t");
        }

        #[test]
        fn mutated_messages_never_panic(i in 0usize..1000, b in any::<u8>()) {
            let k = SigningKey::generate(Curve::P256).unwrap();
            let eat = Eat::sign(&k, &Guid([5; 16]), &nonce(4), Some(Value::Array(vec![])), Some(&nonce(1))).unwrap();
            let mut bytes = eat.signed.raw.clone();
            let i = i % bytes.len();
            bytes[i] = b;
            let _ = Eat::decode(&bytes, "t");
            let _ = ProveOvHdr::decode(&bytes);
        }
    }
}
