//! Cryptography for FDO, all on ring: ECDSA P-256/P-384 keys (PKCS#8), fixed-size `r || s`
//! signatures as COSE wants them, SubjectPublicKeyInfo conversion, SHA-2, HMAC and
//! randomness.
//!
//! Private keys are kept as PKCS#8 DER (PEM label `PRIVATE KEY`); SEC1 `EC PRIVATE KEY`
//! files made by other tools are accepted too.

use super::types::{Hash, HashAlg, PublicKey};
use super::FdoError;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use std::fmt;
use std::str::FromStr;
use x509_parser::prelude::FromDer;

const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

/// DER of a SubjectPublicKeyInfo up to the uncompressed point (RFC 5480).
const SPKI_PREFIX_P256: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const SPKI_PREFIX_P384: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];

/// The elliptic curves FDO 1.1 devices and owners use here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Curve {
    P256,
    P384,
}

impl Curve {
    /// FDO `pkType`: SECP256R1 = 10, SECP384R1 = 11.
    pub fn pk_type(self) -> u8 {
        match self {
            Curve::P256 => 10,
            Curve::P384 => 11,
        }
    }

    pub fn from_pk_type(t: u64) -> Option<Curve> {
        match t {
            10 => Some(Curve::P256),
            11 => Some(Curve::P384),
            _ => None,
        }
    }

    /// COSE algorithm: ES256 = -7, ES384 = -35 (also the FDO `sgType`).
    pub fn cose_alg(self) -> i64 {
        match self {
            Curve::P256 => -7,
            Curve::P384 => -35,
        }
    }

    /// The hash of matching strength (SHA-256 for P-256, SHA-384 for P-384).
    pub fn hash_alg(self) -> HashAlg {
        match self {
            Curve::P256 => HashAlg::Sha256,
            Curve::P384 => HashAlg::Sha384,
        }
    }

    /// The HMAC of matching strength.
    pub fn hmac_alg(self) -> HashAlg {
        match self {
            Curve::P256 => HashAlg::HmacSha256,
            Curve::P384 => HashAlg::HmacSha384,
        }
    }

    /// Length of a fixed-size `r || s` signature.
    pub fn signature_len(self) -> usize {
        match self {
            Curve::P256 => 64,
            Curve::P384 => 96,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }

    pub fn rcgen_alg(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Curve::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Curve::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }

    fn signing(self) -> &'static signature::EcdsaSigningAlgorithm {
        match self {
            Curve::P256 => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            Curve::P384 => &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        }
    }

    fn spki_prefix(self) -> &'static [u8] {
        match self {
            Curve::P256 => SPKI_PREFIX_P256,
            Curve::P384 => SPKI_PREFIX_P384,
        }
    }

    fn oid(self) -> &'static [u8] {
        match self {
            Curve::P256 => OID_P256,
            Curve::P384 => OID_P384,
        }
    }

    /// Length of an uncompressed point (0x04 || x || y).
    pub fn point_len(self) -> usize {
        match self {
            Curve::P256 => 65,
            Curve::P384 => 97,
        }
    }
}

impl fmt::Display for Curve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Curve {
    type Err = String;
    fn from_str(s: &str) -> Result<Curve, String> {
        match s.to_ascii_lowercase().as_str() {
            "p256" | "p-256" | "secp256r1" | "prime256v1" => Ok(Curve::P256),
            "p384" | "p-384" | "secp384r1" => Ok(Curve::P384),
            _ => Err(format!("unknown curve {s:?} (p256 or p384)")),
        }
    }
}

fn rng() -> SystemRandom {
    SystemRandom::new()
}

/// `n` random bytes from the operating system.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, FdoError> {
    let mut b = vec![0u8; n];
    rng()
        .fill(&mut b)
        .map_err(|_| FdoError::Crypto("no randomness available".into()))?;
    Ok(b)
}

/// An ECDSA private key (P-256 or P-384) with its PKCS#8 encoding.
pub struct SigningKey {
    curve: Curve,
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("curve", &self.curve)
            .field("public", &hex::encode(self.public_point()))
            .finish()
    }
}

impl SigningKey {
    pub fn generate(curve: Curve) -> Result<SigningKey, FdoError> {
        let doc = EcdsaKeyPair::generate_pkcs8(curve.signing(), &rng())
            .map_err(|_| FdoError::Crypto("key generation failed".into()))?;
        Self::from_pkcs8_for(curve, doc.as_ref())
    }

    fn from_pkcs8_for(curve: Curve, der: &[u8]) -> Result<SigningKey, FdoError> {
        let pair = EcdsaKeyPair::from_pkcs8(curve.signing(), der, &rng())
            .map_err(|e| FdoError::Key(format!("not a {curve} PKCS#8 key: {e}")))?;
        Ok(SigningKey {
            curve,
            pair,
            pkcs8: der.to_vec(),
        })
    }

    /// A PKCS#8 DER private key of either curve.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<SigningKey, FdoError> {
        Self::from_pkcs8_for(Curve::P256, der)
            .or_else(|_| Self::from_pkcs8_for(Curve::P384, der))
            .map_err(|_| FdoError::Key("not a PKCS#8 ECDSA P-256 or P-384 private key".into()))
    }

    /// A SEC1 `ECPrivateKey` (RFC 5915) of either curve, as other tools write them.
    pub fn from_sec1_der(der: &[u8]) -> Result<SigningKey, FdoError> {
        for curve in [Curve::P256, Curve::P384] {
            if let Ok(k) = Self::from_pkcs8_for(curve, &sec1_to_pkcs8(curve, der)) {
                return Ok(k);
            }
        }
        Err(FdoError::Key(
            "not a SEC1 ECDSA P-256 or P-384 private key (with its public key)".into(),
        ))
    }

    /// The first `PRIVATE KEY` or `EC PRIVATE KEY` block of a PEM text.
    pub fn from_pem(text: &str) -> Result<SigningKey, FdoError> {
        let blocks = pem::parse_many(text).map_err(|e| FdoError::Pem(e.to_string()))?;
        for b in &blocks {
            match b.tag() {
                "PRIVATE KEY" => return Self::from_pkcs8_der(b.contents()),
                "EC PRIVATE KEY" => return Self::from_sec1_der(b.contents()),
                _ => {}
            }
        }
        Err(FdoError::Pem(
            "no PRIVATE KEY or EC PRIVATE KEY block".into(),
        ))
    }

    /// PEM `PRIVATE KEY` (PKCS#8).
    pub fn to_pem(&self) -> String {
        pem_encode("PRIVATE KEY", &self.pkcs8)
    }

    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn curve(&self) -> Curve {
        self.curve
    }

    /// The uncompressed public point.
    pub fn public_point(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// DER SubjectPublicKeyInfo of the public key.
    pub fn spki(&self) -> Vec<u8> {
        spki_from_point(self.curve, self.public_point())
    }

    /// The public key as FDO `PublicKey` (X509 encoding).
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_spki(self.curve, self.spki())
    }

    /// Fixed-size `r || s` ECDSA signature over `msg` (SHA-256 for P-256, SHA-384 for P-384).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, FdoError> {
        self.pair
            .sign(&rng(), msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| FdoError::Crypto("signing failed".into()))
    }

    /// The same key for rcgen (certificates).
    pub fn rcgen_key(&self) -> Result<rcgen::KeyPair, FdoError> {
        Ok(rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls::pki_types::PrivatePkcs8KeyDer::from(self.pkcs8.clone()),
            self.curve.rcgen_alg(),
        )?)
    }
}

/// PEM text with Unix line endings.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn der_len(n: usize, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(n as u8);
    } else if n <= 0xff {
        out.push(0x81);
        out.push(n as u8);
    } else {
        out.push(0x82);
        out.extend_from_slice(&(n.min(0xffff) as u16).to_be_bytes());
    }
}

fn der_tlv(tag: u8, content: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    der_len(content.len(), out);
    out.extend_from_slice(content);
}

/// Wrap a SEC1 ECPrivateKey into PKCS#8 (RFC 5208) for `curve`.
fn sec1_to_pkcs8(curve: Curve, sec1: &[u8]) -> Vec<u8> {
    let mut alg = Vec::new();
    der_tlv(0x06, OID_EC_PUBLIC_KEY, &mut alg);
    der_tlv(0x06, curve.oid(), &mut alg);
    let mut body = vec![0x02, 0x01, 0x00];
    der_tlv(0x30, &alg, &mut body);
    der_tlv(0x04, sec1, &mut body);
    let mut out = Vec::new();
    der_tlv(0x30, &body, &mut out);
    out
}

/// DER SubjectPublicKeyInfo of an uncompressed point.
pub fn spki_from_point(curve: Curve, point: &[u8]) -> Vec<u8> {
    let mut v = curve.spki_prefix().to_vec();
    v.extend_from_slice(point);
    v
}

/// An ECDSA public key that signatures are checked with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    curve: Curve,
    point: Vec<u8>,
}

impl VerifyingKey {
    /// From a DER SubjectPublicKeyInfo of a P-256 or P-384 key.
    pub fn from_spki(der: &[u8]) -> Result<VerifyingKey, FdoError> {
        let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der)
            .map_err(|e| FdoError::Key(format!("SubjectPublicKeyInfo: {e}")))?;
        if !rest.is_empty() {
            return Err(FdoError::Key("SubjectPublicKeyInfo: trailing bytes".into()));
        }
        if spki.algorithm.algorithm.as_bytes() != OID_EC_PUBLIC_KEY {
            return Err(FdoError::Unsupported {
                what: "public key",
                detail: format!("algorithm {} (only ECDSA)", spki.algorithm.algorithm),
            });
        }
        let curve_oid = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| FdoError::Key("EC key without a named curve".into()))?;
        let curve = match curve_oid.as_bytes() {
            b if b == OID_P256 => Curve::P256,
            b if b == OID_P384 => Curve::P384,
            _ => {
                return Err(FdoError::Unsupported {
                    what: "public key",
                    detail: format!("curve {curve_oid} (only P-256 and P-384)"),
                })
            }
        };
        Self::from_point(curve, spki.subject_public_key.data.as_ref())
    }

    /// From an uncompressed point.
    pub fn from_point(curve: Curve, point: &[u8]) -> Result<VerifyingKey, FdoError> {
        if point.len() != curve.point_len() || point.first() != Some(&0x04) {
            return Err(FdoError::Key(format!(
                "not an uncompressed {curve} point ({} bytes)",
                point.len()
            )));
        }
        Ok(VerifyingKey {
            curve,
            point: point.to_vec(),
        })
    }

    pub fn curve(&self) -> Curve {
        self.curve
    }

    pub fn point(&self) -> &[u8] {
        &self.point
    }

    pub fn spki(&self) -> Vec<u8> {
        spki_from_point(self.curve, &self.point)
    }

    /// Check an ECDSA signature made with this key's curve and hash. Fixed-size `r || s` is
    /// the COSE form; an ASN.1 DER signature (which some implementations send) is accepted
    /// too.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let (fixed, asn1): (
            &'static signature::EcdsaVerificationAlgorithm,
            &'static signature::EcdsaVerificationAlgorithm,
        ) = match self.curve {
            Curve::P256 => (
                &signature::ECDSA_P256_SHA256_FIXED,
                &signature::ECDSA_P256_SHA256_ASN1,
            ),
            Curve::P384 => (
                &signature::ECDSA_P384_SHA384_FIXED,
                &signature::ECDSA_P384_SHA384_ASN1,
            ),
        };
        let alg = if sig.len() == self.curve.signature_len() {
            fixed
        } else {
            asn1
        };
        signature::UnparsedPublicKey::new(alg, &self.point)
            .verify(msg, sig)
            .is_ok()
    }
}

/// Hash the concatenation of `parts` (SHA-256 or SHA-384).
pub fn hash(alg: HashAlg, parts: &[&[u8]]) -> Result<Hash, FdoError> {
    let algorithm = match alg {
        HashAlg::Sha256 => &ring::digest::SHA256,
        HashAlg::Sha384 => &ring::digest::SHA384,
        other => {
            return Err(FdoError::Unsupported {
                what: "hash algorithm",
                detail: format!("{other} where a plain hash is required"),
            })
        }
    };
    let mut ctx = ring::digest::Context::new(algorithm);
    for p in parts {
        ctx.update(p);
    }
    Ok(Hash {
        alg,
        value: ctx.finish().as_ref().to_vec(),
    })
}

fn hmac_key(alg: HashAlg, secret: &[u8]) -> Result<ring::hmac::Key, FdoError> {
    let algorithm = match alg {
        HashAlg::HmacSha256 => ring::hmac::HMAC_SHA256,
        HashAlg::HmacSha384 => ring::hmac::HMAC_SHA384,
        other => {
            return Err(FdoError::Unsupported {
                what: "HMAC algorithm",
                detail: format!("{other} where an HMAC is required"),
            })
        }
    };
    Ok(ring::hmac::Key::new(algorithm, secret))
}

/// HMAC (HMAC-SHA256 or HMAC-SHA384) of `data` under `secret`.
pub fn hmac(alg: HashAlg, secret: &[u8], data: &[u8]) -> Result<Hash, FdoError> {
    let tag = ring::hmac::sign(&hmac_key(alg, secret)?, data);
    Ok(Hash {
        alg,
        value: tag.as_ref().to_vec(),
    })
}

/// Constant-time check of an HMAC.
pub fn hmac_verify(mac: &Hash, secret: &[u8], data: &[u8]) -> Result<bool, FdoError> {
    Ok(ring::hmac::verify(&hmac_key(mac.alg, secret)?, data, &mac.value).is_ok())
}

/// SHA-256 hex of bytes (fingerprints).
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

/// Accept clocks this far behind ours in certificates we make.
const BACKDATE: time::Duration = time::Duration::minutes(5);

/// Parameters of a certificate made with [`make_cert`].
pub struct CertSpec<'a> {
    pub common_name: &'a str,
    pub organization: &'a str,
    pub is_ca: bool,
    pub validity_days: i64,
}

fn cert_params(spec: &CertSpec<'_>) -> Result<rcgen::CertificateParams, FdoError> {
    use rcgen::{BasicConstraints, DnType, IsCa, KeyUsagePurpose};
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(DnType::CommonName, spec.common_name);
    dn.push(DnType::OrganizationName, spec.organization);
    params.distinguished_name = dn;
    if spec.is_ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
    } else {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    }
    let mut serial = random_bytes(16)?;
    serial[0] = (serial[0] & 0x7f) | 0x01;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(spec.validity_days);
    Ok(params)
}

/// A certificate for `key`: self-signed, or signed by `issuer` (certificate DER and key).
/// Returns the PEM and the DER.
pub fn make_cert(
    key: &SigningKey,
    spec: &CertSpec<'_>,
    issuer: Option<(&[u8], &SigningKey)>,
) -> Result<(String, Vec<u8>), FdoError> {
    let params = cert_params(spec)?;
    let subject = key.rcgen_key()?;
    let cert = match issuer {
        None => params.self_signed(&subject)?,
        Some((ca_der, ca_key)) => {
            let ca_key = ca_key.rcgen_key()?;
            let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der.to_vec().into(), &ca_key)?;
            params.signed_by(&subject, &issuer)?
        }
    };
    Ok((cert.pem(), cert.der().to_vec()))
}

/// The DER of the first CERTIFICATE block of a PEM text.
pub fn cert_der_from_pem(text: &str) -> Result<Vec<u8>, FdoError> {
    let blocks = pem::parse_many(text).map_err(|e| FdoError::Pem(e.to_string()))?;
    blocks
        .into_iter()
        .find(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.into_contents())
        .ok_or_else(|| FdoError::Pem("no CERTIFICATE block".into()))
}

/// The public key of the first CERTIFICATE block (returned too) or PUBLIC KEY block of a
/// PEM text.
pub fn public_key_from_pem(text: &str) -> Result<(VerifyingKey, Option<Vec<u8>>), FdoError> {
    let blocks = pem::parse_many(text).map_err(|e| FdoError::Pem(e.to_string()))?;
    for b in blocks {
        match b.tag() {
            "CERTIFICATE" => {
                let der = b.into_contents();
                return Ok((cert_public_key(&der)?, Some(der)));
            }
            "PUBLIC KEY" => return Ok((VerifyingKey::from_spki(b.contents())?, None)),
            _ => {}
        }
    }
    Err(FdoError::Pem("no CERTIFICATE or PUBLIC KEY block".into()))
}

/// The public key of a DER certificate.
pub fn cert_public_key(der: &[u8]) -> Result<VerifyingKey, FdoError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| FdoError::Key(format!("certificate: {e}")))?;
    VerifyingKey::from_spki(cert.public_key().raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_roundtrip_through_pem_and_sign() {
        for curve in [Curve::P256, Curve::P384] {
            let k = SigningKey::generate(curve).unwrap();
            let k2 = SigningKey::from_pem(&k.to_pem()).unwrap();
            assert_eq!(k2.curve(), curve);
            assert_eq!(k.public_point(), k2.public_point());
            let sig = k.sign(b"hello").unwrap();
            assert_eq!(sig.len(), curve.signature_len());
            let vk = VerifyingKey::from_spki(&k.spki()).unwrap();
            assert_eq!(vk.curve(), curve);
            assert!(vk.verify(b"hello", &sig));
            assert!(!vk.verify(b"hellO", &sig));
            // rcgen agrees on the SubjectPublicKeyInfo.
            use rcgen::PublicKeyData;
            assert_eq!(k.rcgen_key().unwrap().subject_public_key_info(), k.spki());
        }
    }

    #[test]
    fn sec1_keys_are_accepted() {
        // Build a SEC1 key from a PKCS#8 one: the OCTET STRING at the end of PKCS#8.
        for curve in [Curve::P256, Curve::P384] {
            let k = SigningKey::generate(curve).unwrap();
            let der = k.pkcs8_der();
            // ring's PKCS#8 v1: SEQ { INT 0, SEQ alg, OCTET STRING sec1 }.
            let (_, p8) = x509_parser::der_parser::der::parse_der(der).unwrap();
            let seq = p8.as_sequence().unwrap();
            let sec1 = seq[2].as_slice().unwrap();
            let text = pem_encode("EC PRIVATE KEY", sec1);
            let k2 = SigningKey::from_pem(&text).unwrap();
            assert_eq!(k2.curve(), curve);
            assert_eq!(k2.public_point(), k.public_point());
        }
    }

    #[test]
    fn hmac_and_hash() {
        let h = hash(HashAlg::Sha256, &[b"ab", b"c"]).unwrap();
        assert_eq!(
            hex::encode(&h.value),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let m = hmac(HashAlg::HmacSha384, b"k", b"data").unwrap();
        assert_eq!(m.value.len(), 48);
        assert!(hmac_verify(&m, b"k", b"data").unwrap());
        assert!(!hmac_verify(&m, b"K", b"data").unwrap());
        assert!(hash(HashAlg::HmacSha256, &[]).is_err());
    }
}
