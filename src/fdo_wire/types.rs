//! The FDO 1.1 wire types shared by vouchers, credentials and every protocol message, with
//! encode/decode to the exact CBOR of the specification's CDDL.
//!
//! Decoders check structure (item counts, types, lengths, limits) and keep what they do not
//! interpret (unknown rendezvous variables, unsupported key types) so that a voucher made by
//! another tool can be shown, hashed and forwarded unchanged; using such a part (verifying
//! with an RSA key, say) is what fails, with [`FdoError::Unsupported`].

use super::cbor::{self, Value};
use super::crypto::{self, Curve, VerifyingKey};
use super::FdoError;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

// ---------------------------------------------------------------------------------------------
// Guid

/// `Guid = bstr .size 16`: the device's identity in every FDO message.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// A random (version-agnostic) 128-bit GUID.
    pub fn random() -> Result<Guid, FdoError> {
        let b = crypto::random_bytes(16)?;
        let mut g = [0u8; 16];
        g.copy_from_slice(&b);
        Ok(Guid(g))
    }

    pub fn to_value(&self) -> Value {
        Value::Bytes(self.0.to_vec())
    }

    pub fn from_value(v: Value, what: &'static str) -> Result<Guid, FdoError> {
        let b = cbor::bytes(v, what)?;
        let len = b.len();
        <[u8; 16]>::try_from(b)
            .map(Guid)
            .map_err(|_| FdoError::malformed(what, format!("GUID of {len} bytes (expected 16)")))
    }

    /// Lower-case hex, 32 characters (also the store key).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({})", self.hex())
    }
}

impl FromStr for Guid {
    type Err = String;
    /// 32 hex digits, with or without UUID dashes.
    fn from_str(s: &str) -> Result<Guid, String> {
        let clean: String = s.chars().filter(|c| *c != '-').collect();
        let b = hex::decode(&clean).map_err(|e| format!("GUID {s:?}: {e}"))?;
        <[u8; 16]>::try_from(b)
            .map(Guid)
            .map_err(|_| format!("GUID {s:?}: expected 16 bytes"))
    }
}

// ---------------------------------------------------------------------------------------------
// Hash and HMac

/// FDO `hashtype` (COSE algorithm numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// SHA-256 = -16
    Sha256,
    /// SHA-384 = -43
    Sha384,
    /// HMAC-SHA256 = 5
    HmacSha256,
    /// HMAC-SHA384 = 6
    HmacSha384,
}

impl HashAlg {
    pub fn code(self) -> i64 {
        match self {
            HashAlg::Sha256 => -16,
            HashAlg::Sha384 => -43,
            HashAlg::HmacSha256 => 5,
            HashAlg::HmacSha384 => 6,
        }
    }

    pub fn from_code(code: i64) -> Option<HashAlg> {
        match code {
            -16 => Some(HashAlg::Sha256),
            -43 => Some(HashAlg::Sha384),
            5 => Some(HashAlg::HmacSha256),
            6 => Some(HashAlg::HmacSha384),
            _ => None,
        }
    }

    pub fn output_len(self) -> usize {
        match self {
            HashAlg::Sha256 | HashAlg::HmacSha256 => 32,
            HashAlg::Sha384 | HashAlg::HmacSha384 => 48,
        }
    }

    pub fn is_hmac(self) -> bool {
        matches!(self, HashAlg::HmacSha256 | HashAlg::HmacSha384)
    }
}

impl fmt::Display for HashAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HashAlg::Sha256 => "SHA-256",
            HashAlg::Sha384 => "SHA-384",
            HashAlg::HmacSha256 => "HMAC-SHA256",
            HashAlg::HmacSha384 => "HMAC-SHA384",
        })
    }
}

/// `Hash = [hashtype, bstr]`; `HMac` has the same shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hash {
    pub alg: HashAlg,
    pub value: Vec<u8>,
}

/// `HMac = Hash`.
pub type HMac = Hash;

impl Hash {
    pub fn to_value(&self) -> Value {
        Value::Array(vec![
            cbor::int_value(self.alg.code()),
            Value::Bytes(self.value.clone()),
        ])
    }

    pub fn from_value(v: Value, what: &'static str) -> Result<Hash, FdoError> {
        let [t, h] = cbor::array_n(v, what)?;
        let code = cbor::int(t, what)?;
        let alg = HashAlg::from_code(code).ok_or_else(|| FdoError::Unsupported {
            what: "hash type",
            detail: format!(
                "{code} in {what} (SHA-256 -16, SHA-384 -43, HMAC-SHA256 5, HMAC-SHA384 6)"
            ),
        })?;
        let value = cbor::bytes(h, what)?;
        if value.len() != alg.output_len() {
            return Err(FdoError::malformed(
                what,
                format!("{alg} value of {} bytes", value.len()),
            ));
        }
        Ok(Hash { alg, value })
    }

    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&self.to_value())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.alg, hex::encode(&self.value))
    }
}

// ---------------------------------------------------------------------------------------------
// PublicKey

/// FDO `pkType` values.
pub mod pk_type {
    pub const RSA2048RESTR: u8 = 1;
    pub const RSAPKCS: u8 = 5;
    pub const RSAPSS: u8 = 6;
    pub const SECP256R1: u8 = 10;
    pub const SECP384R1: u8 = 11;
}

/// FDO `pkEnc` values.
pub mod pk_enc {
    /// Crypto-specific (Intel EPID); not supported.
    pub const CRYPTO: u8 = 0;
    /// X.509 SubjectPublicKeyInfo DER in a bstr.
    pub const X509: u8 = 1;
    /// COSE x5chain: an array of DER certificates, the key's certificate first.
    pub const X5CHAIN: u8 = 2;
    /// COSE_Key map.
    pub const COSEKEY: u8 = 3;
}

const MAX_X5CHAIN: usize = 8;

/// `PublicKey = [pkType, pkEnc, pkBody]`. The body is kept as received so that the key
/// re-encodes to the same bytes; [`PublicKey::spki`] normalizes any supported encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct PublicKey {
    pub pk_type: u8,
    pub enc: u8,
    pub body: Value,
}

impl PublicKey {
    /// X509 encoding (what Outpost sends).
    pub fn from_spki(curve: Curve, spki: Vec<u8>) -> PublicKey {
        PublicKey {
            pk_type: curve.pk_type(),
            enc: pk_enc::X509,
            body: Value::Bytes(spki),
        }
    }

    /// X5CHAIN encoding: the key's certificate first.
    pub fn from_x5chain(curve: Curve, certs: Vec<Vec<u8>>) -> PublicKey {
        PublicKey {
            pk_type: curve.pk_type(),
            enc: pk_enc::X5CHAIN,
            body: Value::Array(certs.into_iter().map(Value::Bytes).collect()),
        }
    }

    /// COSEKEY encoding: `{1: 2 (EC2), -1: crv, -2: x, -3: y}`.
    pub fn from_cose_key(key: &VerifyingKey) -> PublicKey {
        let curve = key.curve();
        let n = (curve.point_len() - 1) / 2;
        let p = key.point();
        let crv = match curve {
            Curve::P256 => 1,
            Curve::P384 => 2,
        };
        PublicKey {
            pk_type: curve.pk_type(),
            enc: pk_enc::COSEKEY,
            body: Value::Map(vec![
                (cbor::int_value(1), cbor::int_value(2)),
                (cbor::int_value(-1), cbor::int_value(crv)),
                (cbor::int_value(-2), Value::Bytes(p[1..1 + n].to_vec())),
                (cbor::int_value(-3), Value::Bytes(p[1 + n..].to_vec())),
            ]),
        }
    }

    /// The same key in the encoding of `template` (the voucher rule: every key copies the
    /// manufacturer key's encoding). X5CHAIN needs the key's certificate.
    pub fn encoded_like(
        template: &PublicKey,
        key: &VerifyingKey,
        cert_der: Option<&[u8]>,
    ) -> PublicKey {
        match (template.enc, cert_der) {
            (pk_enc::COSEKEY, _) => PublicKey::from_cose_key(key),
            (pk_enc::X5CHAIN, Some(cert)) => {
                PublicKey::from_x5chain(key.curve(), vec![cert.to_vec()])
            }
            _ => PublicKey::from_spki(key.curve(), key.spki()),
        }
    }

    pub fn to_value(&self) -> Value {
        Value::Array(vec![
            cbor::uint_value(self.pk_type as u64),
            cbor::uint_value(self.enc as u64),
            self.body.clone(),
        ])
    }

    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&self.to_value())
    }

    pub fn from_value(v: Value, what: &'static str) -> Result<PublicKey, FdoError> {
        let [t, e, body] = cbor::array_n(v, what)?;
        let small = |n: u64| {
            u8::try_from(n)
                .map_err(|_| FdoError::malformed(what, format!("value {n} out of range")))
        };
        let pk_type = small(cbor::uint(t, what)?)?;
        let enc = small(cbor::uint(e, what)?)?;
        match (enc, &body) {
            (pk_enc::X509, Value::Bytes(_)) | (pk_enc::COSEKEY, Value::Map(_)) => {}
            (pk_enc::X5CHAIN, Value::Array(certs)) => {
                if certs.is_empty() || certs.len() > MAX_X5CHAIN {
                    return Err(FdoError::malformed(
                        what,
                        format!("X5CHAIN of {} certificates", certs.len()),
                    ));
                }
                if !certs.iter().all(|c| matches!(c, Value::Bytes(_))) {
                    return Err(FdoError::malformed(what, "X5CHAIN item is not a bstr"));
                }
            }
            (pk_enc::X509 | pk_enc::X5CHAIN | pk_enc::COSEKEY, other) => {
                return Err(FdoError::malformed(
                    what,
                    format!("pkEnc {enc} with a body of type {}", cbor::kind(other)),
                ))
            }
            _ => {} // other encodings are kept and refused on use
        }
        Ok(PublicKey { pk_type, enc, body })
    }

    /// The key as a DER SubjectPublicKeyInfo, whatever its encoding.
    pub fn spki(&self) -> Result<Vec<u8>, FdoError> {
        match (self.enc, &self.body) {
            (pk_enc::X509, Value::Bytes(b)) => Ok(b.clone()),
            (pk_enc::X5CHAIN, Value::Array(certs)) => match certs.first() {
                Some(Value::Bytes(der)) => {
                    let (_, cert) = x509_parser::parse_x509_certificate(der)
                        .map_err(|e| FdoError::Key(format!("X5CHAIN leaf certificate: {e}")))?;
                    Ok(cert.public_key().raw.to_vec())
                }
                _ => Err(FdoError::Key("empty X5CHAIN".into())),
            },
            (pk_enc::COSEKEY, Value::Map(m)) => cose_key_spki(m),
            _ => Err(FdoError::Unsupported {
                what: "public key encoding",
                detail: format!("pkEnc {} (X509 1, X5CHAIN 2, COSEKEY 3)", self.enc),
            }),
        }
    }

    /// The key for signature checks; only ECDSA P-256 and P-384 (`pkType` 10, 11).
    pub fn verifying_key(&self) -> Result<VerifyingKey, FdoError> {
        if Curve::from_pk_type(self.pk_type as u64).is_none() {
            return Err(FdoError::Unsupported {
                what: "public key type",
                detail: format!(
                    "pkType {} (only SECP256R1 10 and SECP384R1 11)",
                    self.pk_type
                ),
            });
        }
        VerifyingKey::from_spki(&self.spki()?)
    }

    /// The curve of the key itself (which decides how its signatures are checked).
    pub fn curve(&self) -> Result<Curve, FdoError> {
        Ok(self.verifying_key()?.curve())
    }

    /// The SubjectPublicKeyInfo in its canonical DER form for EC keys (rebuilt from the
    /// curve and point), as found for other keys.
    fn normalized_spki(&self) -> Result<Vec<u8>, FdoError> {
        match self.verifying_key() {
            Ok(vk) => Ok(vk.spki()),
            Err(_) => self.spki(),
        }
    }

    /// SHA-256 of the SubjectPublicKeyInfo, lower-case hex: the same for every encoding.
    pub fn fingerprint(&self) -> Result<String, FdoError> {
        Ok(crypto::sha256_hex(&self.normalized_spki()?))
    }

    /// The first 16 hex digits of the fingerprint (file names, logs).
    pub fn key_id(&self) -> Result<String, FdoError> {
        let mut f = self.fingerprint()?;
        f.truncate(16);
        Ok(f)
    }

    /// Whether both name the same key (compared as SubjectPublicKeyInfo).
    pub fn same_key(&self, other: &PublicKey) -> bool {
        match (self.normalized_spki(), other.normalized_spki()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }

    /// A one-line description: curve, encoding and fingerprint.
    pub fn describe(&self) -> String {
        let enc = match self.enc {
            pk_enc::X509 => "X509",
            pk_enc::X5CHAIN => "X5CHAIN",
            pk_enc::COSEKEY => "COSEKEY",
            pk_enc::CRYPTO => "Crypto",
            _ => "unknown encoding",
        };
        match (self.curve(), self.fingerprint()) {
            (Ok(c), Ok(f)) => format!("{c} {enc} sha256:{f}"),
            (Err(e), _) | (_, Err(e)) => format!("pkType {} {enc} ({e})", self.pk_type),
        }
    }
}

fn cose_key_spki(map: &[(Value, Value)]) -> Result<Vec<u8>, FdoError> {
    let get = |label: i64| {
        map.iter()
            .find(|(k, _)| matches!(k, Value::Integer(i) if i128::from(*i) == label as i128))
            .map(|(_, v)| v)
    };
    let int_of = |v: Option<&Value>| match v {
        Some(Value::Integer(i)) => Some(i128::from(*i)),
        _ => None,
    };
    if int_of(get(1)) != Some(2) {
        return Err(FdoError::Unsupported {
            what: "COSE key",
            detail: "only kty EC2 (2)".into(),
        });
    }
    let curve = match int_of(get(-1)) {
        Some(1) => Curve::P256,
        Some(2) => Curve::P384,
        other => {
            return Err(FdoError::Unsupported {
                what: "COSE key",
                detail: format!("crv {other:?} (P-256 1, P-384 2)"),
            })
        }
    };
    let (Some(Value::Bytes(x)), Some(Value::Bytes(y))) = (get(-2), get(-3)) else {
        return Err(FdoError::Key(
            "COSE key without x and y coordinates (compressed points are not supported)".into(),
        ));
    };
    let mut point = vec![0x04];
    point.extend_from_slice(x);
    point.extend_from_slice(y);
    Ok(VerifyingKey::from_point(curve, &point)?.spki())
}

// ---------------------------------------------------------------------------------------------
// RendezvousInfo

/// `RVVariable` values.
pub mod rv_var {
    pub const DEV_ONLY: u64 = 0;
    pub const OWNER_ONLY: u64 = 1;
    pub const IP_ADDRESS: u64 = 2;
    pub const DEV_PORT: u64 = 3;
    pub const OWNER_PORT: u64 = 4;
    pub const DNS: u64 = 5;
    pub const SV_CERT_HASH: u64 = 6;
    pub const CL_CERT_HASH: u64 = 7;
    pub const USER_INPUT: u64 = 8;
    pub const WIFI_SSID: u64 = 9;
    pub const WIFI_PW: u64 = 10;
    pub const MEDIUM: u64 = 11;
    pub const PROTOCOL: u64 = 12;
    pub const DELAYSEC: u64 = 13;
    pub const BYPASS: u64 = 14;
    pub const EXT_RV: u64 = 15;

    pub fn name(v: u64) -> &'static str {
        match v {
            DEV_ONLY => "dev-only",
            OWNER_ONLY => "owner-only",
            IP_ADDRESS => "ip",
            DEV_PORT => "dev-port",
            OWNER_PORT => "owner-port",
            DNS => "dns",
            SV_CERT_HASH => "sv-cert-hash",
            CL_CERT_HASH => "cl-cert-hash",
            USER_INPUT => "user-input",
            WIFI_SSID => "wifi-ssid",
            WIFI_PW => "wifi-pw",
            MEDIUM => "medium",
            PROTOCOL => "protocol",
            DELAYSEC => "delay",
            BYPASS => "bypass",
            EXT_RV => "ext-rv",
            _ => "unknown",
        }
    }
}

/// `RVProtocolValue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RvProtocol {
    Rest = 0,
    Http = 1,
    Https = 2,
    Tcp = 3,
    Tls = 4,
    CoapTcp = 5,
    CoapUdp = 6,
}

impl RvProtocol {
    pub fn from_code(c: u64) -> Option<RvProtocol> {
        Some(match c {
            0 => RvProtocol::Rest,
            1 => RvProtocol::Http,
            2 => RvProtocol::Https,
            3 => RvProtocol::Tcp,
            4 => RvProtocol::Tls,
            5 => RvProtocol::CoapTcp,
            6 => RvProtocol::CoapUdp,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            RvProtocol::Rest => "rest",
            RvProtocol::Http => "http",
            RvProtocol::Https => "https",
            RvProtocol::Tcp => "tcp",
            RvProtocol::Tls => "tls",
            RvProtocol::CoapTcp => "coap+tcp",
            RvProtocol::CoapUdp => "coap",
        }
    }
}

impl FromStr for RvProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<RvProtocol, String> {
        match s.to_ascii_lowercase().as_str() {
            "http" => Ok(RvProtocol::Http),
            "https" => Ok(RvProtocol::Https),
            _ => Err(format!(
                "unsupported rendezvous protocol {s:?} (http or https)"
            )),
        }
    }
}

/// `RendezvousInstr = [RVVariable, RVValue]`, where `RVValue = bstr .cbor any`; flags such
/// as RVDevOnly and RVBypass come without a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RvInstruction {
    pub var: u64,
    /// The CBOR encoding of the value (the contents of the RVValue bstr).
    pub value: Option<Vec<u8>>,
}

const MAX_RV_DIRECTIVES: usize = 32;
const MAX_RV_INSTRUCTIONS: usize = 32;
const MAX_RV_VALUE: usize = 1024;

/// `RendezvousDirective = [+ RendezvousInstr]`: one way to reach a rendezvous server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RvDirective(pub Vec<RvInstruction>);

impl RvDirective {
    fn with(mut self, var: u64, value: Option<Value>) -> Self {
        self.0.retain(|i| i.var != var);
        self.0.push(RvInstruction {
            var,
            value: value.map(|v| cbor::encode(&v)),
        });
        self
    }

    pub fn with_dns(self, host: &str) -> Self {
        self.with(rv_var::DNS, Some(Value::Text(host.to_string())))
    }

    pub fn with_ip(self, ip: IpAddr) -> Self {
        let b = match ip {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        self.with(rv_var::IP_ADDRESS, Some(Value::Bytes(b)))
    }

    pub fn with_dev_port(self, port: u16) -> Self {
        self.with(rv_var::DEV_PORT, Some(cbor::uint_value(port as u64)))
    }

    pub fn with_owner_port(self, port: u16) -> Self {
        self.with(rv_var::OWNER_PORT, Some(cbor::uint_value(port as u64)))
    }

    pub fn with_protocol(self, p: RvProtocol) -> Self {
        self.with(rv_var::PROTOCOL, Some(cbor::uint_value(p as u64)))
    }

    pub fn with_delay_secs(self, secs: u32) -> Self {
        self.with(rv_var::DELAYSEC, Some(cbor::uint_value(secs as u64)))
    }

    /// A flag without a value (RVDevOnly, RVOwnerOnly, RVBypass).
    pub fn with_flag(self, var: u64) -> Self {
        self.with(var, None)
    }

    /// Whether the directive carries `var`.
    pub fn has(&self, var: u64) -> bool {
        self.0.iter().any(|i| i.var == var)
    }

    fn value(&self, var: u64) -> Result<Option<Value>, FdoError> {
        match self.0.iter().find(|i| i.var == var) {
            Some(RvInstruction {
                value: Some(bytes), ..
            }) => Ok(Some(cbor::decode(bytes, MAX_RV_VALUE, "RVValue")?)),
            _ => Ok(None),
        }
    }

    pub fn dns(&self) -> Result<Option<String>, FdoError> {
        self.value(rv_var::DNS)?
            .map(|v| cbor::text(v, "RVDns"))
            .transpose()
    }

    pub fn ip(&self) -> Result<Option<IpAddr>, FdoError> {
        match self.value(rv_var::IP_ADDRESS)? {
            None => Ok(None),
            Some(v) => {
                let b = cbor::bytes(v, "RVIPAddress")?;
                if let Ok(a) = <[u8; 4]>::try_from(b.as_slice()) {
                    Ok(Some(IpAddr::from(a)))
                } else if let Ok(a) = <[u8; 16]>::try_from(b.as_slice()) {
                    Ok(Some(IpAddr::from(a)))
                } else {
                    Err(FdoError::malformed(
                        "RVIPAddress",
                        format!("{} bytes (expected 4 or 16)", b.len()),
                    ))
                }
            }
        }
    }

    fn port(&self, var: u64, what: &'static str) -> Result<Option<u16>, FdoError> {
        self.value(var)?
            .map(|v| {
                let n = cbor::uint(v, what)?;
                u16::try_from(n).map_err(|_| FdoError::malformed(what, format!("port {n}")))
            })
            .transpose()
    }

    pub fn dev_port(&self) -> Result<Option<u16>, FdoError> {
        self.port(rv_var::DEV_PORT, "RVDevPort")
    }

    pub fn owner_port(&self) -> Result<Option<u16>, FdoError> {
        self.port(rv_var::OWNER_PORT, "RVOwnerPort")
    }

    pub fn protocol(&self) -> Result<Option<RvProtocol>, FdoError> {
        self.value(rv_var::PROTOCOL)?
            .map(|v| {
                let c = cbor::uint(v, "RVProtocol")?;
                RvProtocol::from_code(c)
                    .ok_or_else(|| FdoError::malformed("RVProtocol", format!("value {c}")))
            })
            .transpose()
    }

    pub fn delay_secs(&self) -> Result<Option<u32>, FdoError> {
        self.value(rv_var::DELAYSEC)?
            .map(|v| {
                let n = cbor::uint(v, "RVDelaysec")?;
                u32::try_from(n).map_err(|_| FdoError::malformed("RVDelaysec", format!("{n}")))
            })
            .transpose()
    }

    /// The device's view: protocol (default https), host (DNS before IP) and port (default
    /// 443 for https, 80 for http), unless the directive is for the owner only.
    pub fn device_endpoint(&self) -> Result<Option<(RvProtocol, String, u16)>, FdoError> {
        if self.has(rv_var::OWNER_ONLY) {
            return Ok(None);
        }
        let proto = self.protocol()?.unwrap_or(RvProtocol::Https);
        let host = match (self.dns()?, self.ip()?) {
            (Some(d), _) => d,
            (None, Some(IpAddr::V6(a))) => format!("[{a}]"),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => return Ok(None),
        };
        let port = self.dev_port()?.unwrap_or(match proto {
            RvProtocol::Http => 80,
            _ => 443,
        });
        Ok(Some((proto, host, port)))
    }

    fn to_value(&self) -> Value {
        Value::Array(
            self.0
                .iter()
                .map(|i| {
                    let mut a = vec![cbor::uint_value(i.var)];
                    if let Some(v) = &i.value {
                        a.push(Value::Bytes(v.clone()));
                    }
                    Value::Array(a)
                })
                .collect(),
        )
    }
}

impl fmt::Display for RvDirective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for i in &self.0 {
            let name = rv_var::name(i.var);
            let shown = match i.var {
                rv_var::DNS => self.dns().ok().flatten(),
                rv_var::IP_ADDRESS => self.ip().ok().flatten().map(|a| a.to_string()),
                rv_var::DEV_PORT => self.dev_port().ok().flatten().map(|p| p.to_string()),
                rv_var::OWNER_PORT => self.owner_port().ok().flatten().map(|p| p.to_string()),
                rv_var::PROTOCOL => self.protocol().ok().flatten().map(|p| p.name().into()),
                rv_var::DELAYSEC => self.delay_secs().ok().flatten().map(|d| format!("{d}s")),
                _ => None,
            };
            match (shown, &i.value) {
                (Some(s), _) => parts.push(format!("{name}={s}")),
                (None, None) => parts.push(name.to_string()),
                (None, Some(v)) if i.var > rv_var::EXT_RV => {
                    parts.push(format!("var{}=h'{}'", i.var, hex::encode(v)))
                }
                (None, Some(v)) => parts.push(format!("{name}=h'{}'", hex::encode(v))),
            }
        }
        f.write_str(&parts.join(" "))
    }
}

/// `RendezvousInfo = [+ RendezvousDirective]`: where the device looks for its owner.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RendezvousInfo(pub Vec<RvDirective>);

impl RendezvousInfo {
    pub fn to_value(&self) -> Value {
        Value::Array(self.0.iter().map(RvDirective::to_value).collect())
    }

    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&self.to_value())
    }

    /// Decode; an RVValue that is not a bstr (some implementations omit the wrapping) is
    /// accepted and stored as its encoding.
    pub fn from_value(v: Value) -> Result<RendezvousInfo, FdoError> {
        const W: &str = "RendezvousInfo";
        let dirs = cbor::array(v, W)?;
        if dirs.len() > MAX_RV_DIRECTIVES {
            return Err(FdoError::malformed(
                W,
                format!("{} directives (at most {MAX_RV_DIRECTIVES})", dirs.len()),
            ));
        }
        let mut out = Vec::with_capacity(dirs.len());
        for d in dirs {
            let instrs = cbor::array(d, "RendezvousDirective")?;
            if instrs.is_empty() || instrs.len() > MAX_RV_INSTRUCTIONS {
                return Err(FdoError::malformed(
                    "RendezvousDirective",
                    format!("{} instructions (1 to {MAX_RV_INSTRUCTIONS})", instrs.len()),
                ));
            }
            let mut dir = Vec::with_capacity(instrs.len());
            for i in instrs {
                let mut parts = cbor::array(i, "RendezvousInstr")?.into_iter();
                let (var, value) = match (parts.next(), parts.next(), parts.next()) {
                    (Some(var), value, None) => (var, value),
                    _ => {
                        return Err(FdoError::malformed(
                            "RendezvousInstr",
                            "expected [RVVariable] or [RVVariable, RVValue]",
                        ))
                    }
                };
                let var = cbor::uint(var, "RVVariable")?;
                let value = match value {
                    None => None,
                    Some(Value::Bytes(b)) => Some(b),
                    Some(other) => Some(cbor::encode(&other)),
                };
                if value.as_ref().is_some_and(|v| v.len() > MAX_RV_VALUE) {
                    return Err(FdoError::malformed("RVValue", "too long"));
                }
                dir.push(RvInstruction { var, value });
            }
            out.push(RvDirective(dir));
        }
        Ok(RendezvousInfo(out))
    }

    pub fn decode(bytes: &[u8]) -> Result<RendezvousInfo, FdoError> {
        Self::from_value(cbor::decode(bytes, 64 * 1024, "RendezvousInfo")?)
    }
}

impl fmt::Display for RendezvousInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d: Vec<String> = self.0.iter().map(|d| format!("[{d}]")).collect();
        f.write_str(&d.join(" "))
    }
}

// ---------------------------------------------------------------------------------------------
// SigInfo and the error message

/// `SigInfo = [sgType, Info]` (eASigInfo/eBSigInfo of TO1 and TO2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigInfo {
    /// COSE algorithm: ES256 -7, ES384 -35 (RS256 -257, RS384 -258, EPID 90/91 unsupported).
    pub sg_type: i64,
    pub info: Vec<u8>,
}

impl SigInfo {
    pub fn for_curve(curve: Curve) -> SigInfo {
        SigInfo {
            sg_type: curve.cose_alg(),
            info: Vec::new(),
        }
    }

    pub fn to_value(&self) -> Value {
        Value::Array(vec![
            cbor::int_value(self.sg_type),
            Value::Bytes(self.info.clone()),
        ])
    }

    pub fn from_value(v: Value) -> Result<SigInfo, FdoError> {
        let [t, i] = cbor::array_n(v, "SigInfo")?;
        Ok(SigInfo {
            sg_type: cbor::int(t, "SigInfo")?,
            info: cbor::bytes(i, "SigInfo")?,
        })
    }
}

/// Error message 255: `[EMErrorCode, EMPrevMsgID, EMErrorStr, EMErrorTs, EMErrorCID]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMessage {
    pub code: u16,
    pub prev_msg_id: u8,
    pub message: String,
    /// Unix seconds; sent as `#6.1(uint)`, null when unknown.
    pub timestamp: Option<u64>,
    pub correlation_id: Option<u64>,
}

impl ErrorMessage {
    pub fn to_value(&self) -> Value {
        Value::Array(vec![
            cbor::uint_value(self.code as u64),
            cbor::uint_value(self.prev_msg_id as u64),
            Value::Text(self.message.clone()),
            match self.timestamp {
                Some(t) => Value::Tag(1, Box::new(cbor::uint_value(t))),
                None => Value::Null,
            },
            match self.correlation_id {
                Some(c) => cbor::uint_value(c),
                None => Value::Null,
            },
        ])
    }

    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&self.to_value())
    }

    /// Decode, accepting any timestamp form (null, `#6.0(tstr)`, `#6.1(uint)`, bare uint).
    pub fn decode(bytes: &[u8]) -> Result<ErrorMessage, FdoError> {
        const W: &str = "ErrorMessage";
        let [code, prev, msg, ts, cid] = cbor::array_n(cbor::decode(bytes, 64 * 1024, W)?, W)?;
        let small = |v: Value| -> Result<u64, FdoError> { cbor::uint(v, W) };
        Ok(ErrorMessage {
            code: u16::try_from(small(code)?).map_err(|_| FdoError::malformed(W, "code"))?,
            prev_msg_id: u8::try_from(small(prev)?)
                .map_err(|_| FdoError::malformed(W, "prevMsgId"))?,
            message: cbor::text(msg, W)?,
            timestamp: match ts {
                Value::Tag(1, inner) => cbor::uint(*inner, W).ok(),
                Value::Integer(_) => cbor::uint(ts, W).ok(),
                _ => None,
            },
            correlation_id: match cid {
                Value::Null => None,
                other => cbor::uint(other, W).ok(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rv_value_encoding_matches_the_spec_example() {
        // The spec's example: [3, h'191f92'] = DevicePort 8082.
        let d = RvDirective::default().with_dev_port(8082);
        let enc = RendezvousInfo(vec![d.clone()]).encode();
        assert_eq!(enc, hex::decode("8181820343191f92").unwrap());
        let back = RendezvousInfo::decode(&enc).unwrap();
        assert_eq!(back.0[0].dev_port().unwrap(), Some(8082));
    }

    #[test]
    fn rv_accessors() {
        let d = RvDirective::default()
            .with_dns("rv.example")
            .with_ip("10.1.2.3".parse().unwrap())
            .with_dev_port(8041)
            .with_protocol(RvProtocol::Http)
            .with_delay_secs(120)
            .with_flag(rv_var::BYPASS);
        let info = RendezvousInfo(vec![d]);
        let back = RendezvousInfo::decode(&info.encode()).unwrap();
        assert_eq!(back, info);
        let d = &back.0[0];
        assert_eq!(d.dns().unwrap().as_deref(), Some("rv.example"));
        assert_eq!(d.ip().unwrap(), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(d.protocol().unwrap(), Some(RvProtocol::Http));
        assert_eq!(d.delay_secs().unwrap(), Some(120));
        assert!(d.has(rv_var::BYPASS));
        assert_eq!(
            d.device_endpoint().unwrap(),
            Some((RvProtocol::Http, "rv.example".into(), 8041))
        );
        assert_eq!(
            back.to_string(),
            "[dns=rv.example ip=10.1.2.3 dev-port=8041 protocol=http delay=120s bypass]"
        );
        // IPv6 and defaults.
        let d6 = RvDirective::default().with_ip("::1".parse().unwrap());
        assert_eq!(
            d6.device_endpoint().unwrap(),
            Some((RvProtocol::Https, "[::1]".into(), 443))
        );
    }

    #[test]
    fn unwrapped_rv_values_are_accepted() {
        // [[[5, "h"]]]: the DNS value not wrapped in a bstr.
        let v = Value::Array(vec![Value::Array(vec![Value::Array(vec![
            cbor::uint_value(5),
            Value::Text("h".into()),
        ])])]);
        let info = RendezvousInfo::decode(&cbor::encode(&v)).unwrap();
        assert_eq!(info.0[0].dns().unwrap().as_deref(), Some("h"));
    }

    #[test]
    fn hash_and_guid_checks() {
        let h = Hash {
            alg: HashAlg::Sha256,
            value: vec![0; 32],
        };
        assert_eq!(Hash::from_value(h.to_value(), "h").unwrap(), h);
        let short = Value::Array(vec![cbor::int_value(-16), Value::Bytes(vec![0; 31])]);
        assert!(matches!(
            Hash::from_value(short, "h"),
            Err(FdoError::Malformed { .. })
        ));
        let sha512 = Value::Array(vec![cbor::int_value(-44), Value::Bytes(vec![0; 64])]);
        assert!(matches!(
            Hash::from_value(sha512, "h"),
            Err(FdoError::Unsupported { .. })
        ));
        let g: Guid = "00112233-4455-6677-8899-aabbccddeeff".parse().unwrap();
        assert_eq!(g.to_string(), "00112233445566778899aabbccddeeff");
        assert!(Guid::from_value(Value::Bytes(vec![1; 15]), "g").is_err());
    }

    #[test]
    fn public_key_encodings_agree() {
        use crate::fdo_wire::crypto::SigningKey;
        for curve in [Curve::P256, Curve::P384] {
            let k = SigningKey::generate(curve).unwrap();
            let x509 = k.public_key();
            let vk = x509.verifying_key().unwrap();
            let cose = PublicKey::from_cose_key(&vk);
            let back =
                PublicKey::from_value(cbor::decode(&cose.encode(), 4096, "pk").unwrap(), "pk")
                    .unwrap();
            assert!(back.same_key(&x509));
            assert_eq!(back.fingerprint().unwrap(), x509.fingerprint().unwrap());
            assert_eq!(back.curve().unwrap(), curve);
        }
        let rsa = PublicKey {
            pk_type: pk_type::RSAPKCS,
            enc: pk_enc::X509,
            body: Value::Bytes(vec![1, 2, 3]),
        };
        assert!(matches!(
            rsa.verifying_key(),
            Err(FdoError::Unsupported { .. })
        ));
    }

    #[test]
    fn error_message_roundtrip() {
        let m = ErrorMessage {
            code: 2,
            prev_msg_id: 22,
            message: "invalid ownership voucher".into(),
            timestamp: Some(1_700_000_000),
            correlation_id: None,
        };
        assert_eq!(ErrorMessage::decode(&m.encode()).unwrap(), m);
    }

    proptest! {
        #[test]
        fn rv_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(info) = RendezvousInfo::decode(&bytes) {
                for d in &info.0 {
                    let _ = d.device_endpoint();
                    let _ = d.to_string();
                }
                prop_assert_eq!(RendezvousInfo::decode(&info.encode()).unwrap(), info);
            }
        }

        #[test]
        fn public_key_and_hash_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(v) = cbor::decode(&bytes, 4096, "x") {
                if let Ok(pk) = PublicKey::from_value(v.clone(), "pk") {
                    let _ = pk.describe();
                }
                let _ = Hash::from_value(v.clone(), "h");
                let _ = SigInfo::from_value(v);
            }
            let _ = ErrorMessage::decode(&bytes);
        }
    }
}
