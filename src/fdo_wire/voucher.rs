//! The ownership voucher (FDO 1.1, section 3.4.6 of the specification):
//!
//! ```cddl
//! OwnershipVoucher = [
//!     OVProtVer:      protver,             ;; 101
//!     OVHeaderTag:    bstr .cbor OVHeader,
//!     OVHeaderHMac:   HMac,                ;; HMAC[DCHmacSecret, OVHeader]
//!     OVDevCertChain: X5CHAIN / null,
//!     OVEntryArray:   [* OVEntry]
//! ]
//! OVHeader = [OVHProtVer, OVGuid, OVRVInfo, OVDeviceInfo, OVPubKey, OVDevCertChainHash / null]
//! OVEntry = COSE_Sign1 (tag 18) over OVEntryPayload, signed by the previous owner
//! OVEntryPayload = [OVEHashPrevEntry, OVEHashHdrInfo, OVEExtra: null / bstr, OVEPubKey]
//! ```
//!
//! Hash rules (the same in go-fdo and the FIDO conformance tools): entry 0's
//! `OVEHashPrevEntry` is the hash of the OVHeader bytes (the contents of OVHeaderTag)
//! followed by the encoded OVHeaderHMac; entry i > 0's is the hash of the encoded entry i-1
//! (tag 18 included); `OVEHashHdrInfo` is the hash of GUID || DeviceInfo;
//! `OVDevCertChainHash` is the hash of the concatenated DER certificates.
//!
//! A decoded voucher keeps the header bytes and every entry's bytes as received, so what is
//! hashed and re-encoded is exactly what was signed.

use super::cbor::{self, Value};
use super::cose::{self, Tagging};
use super::crypto::{self, Curve, SigningKey};
use super::types::{Guid, HMac, Hash, HashAlg, PublicKey, RendezvousInfo};
use super::{FdoError, PROTOCOL_VERSION};

/// Largest voucher accepted (CBOR bytes).
pub const MAX_VOUCHER: usize = 256 * 1024;
/// Most entries accepted (each is one change of ownership).
pub const MAX_ENTRIES: usize = 64;
/// Most certificates in the device certificate chain.
pub const MAX_CERTS: usize = 8;
/// Longest OVDeviceInfo.
pub const MAX_DEVICE_INFO: usize = 1024;
const MAX_ENTRY: usize = 32 * 1024;
const MAX_EXTRA: usize = 4 * 1024;

/// PEM label of the armoured voucher.
pub const PEM_LABEL: &str = "OWNERSHIP VOUCHER";

/// `OVHeader`.
#[derive(Debug, Clone, PartialEq)]
pub struct OvHeader {
    pub prot_ver: u64,
    pub guid: Guid,
    pub rv_info: RendezvousInfo,
    pub device_info: String,
    /// The manufacturer's public key: it signs entry 0.
    pub mfg_pub_key: PublicKey,
    pub cert_chain_hash: Option<Hash>,
}

impl OvHeader {
    pub fn to_value(&self) -> Value {
        Value::Array(vec![
            cbor::uint_value(self.prot_ver),
            self.guid.to_value(),
            self.rv_info.to_value(),
            Value::Text(self.device_info.clone()),
            self.mfg_pub_key.to_value(),
            match &self.cert_chain_hash {
                Some(h) => h.to_value(),
                None => Value::Null,
            },
        ])
    }

    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&self.to_value())
    }

    pub fn decode(bytes: &[u8]) -> Result<OvHeader, FdoError> {
        const W: &str = "OVHeader";
        let [ver, guid, rv, info, key, chain_hash] =
            cbor::array_n(cbor::decode(bytes, MAX_VOUCHER, W)?, W)?;
        let prot_ver = cbor::uint(ver, W)?;
        if prot_ver != PROTOCOL_VERSION {
            return Err(FdoError::Version {
                what: W,
                found: prot_ver,
            });
        }
        let device_info = cbor::text(info, "OVDeviceInfo")?;
        if device_info.len() > MAX_DEVICE_INFO {
            return Err(FdoError::malformed("OVDeviceInfo", "too long"));
        }
        Ok(OvHeader {
            prot_ver,
            guid: Guid::from_value(guid, "OVGuid")?,
            rv_info: RendezvousInfo::from_value(rv)?,
            device_info,
            mfg_pub_key: PublicKey::from_value(key, "OVPubKey")?,
            cert_chain_hash: match chain_hash {
                Value::Null => None,
                v => Some(Hash::from_value(v, "OVDevCertChainHash")?),
            },
        })
    }

    /// GUID || DeviceInfo, the input of OVEHashHdrInfo.
    pub fn hdr_info(&self) -> Vec<u8> {
        let mut v = self.guid.0.to_vec();
        v.extend_from_slice(self.device_info.as_bytes());
        v
    }
}

/// `OVEntryPayload`.
#[derive(Debug, Clone, PartialEq)]
pub struct OvEntryPayload {
    pub hash_prev_entry: Hash,
    pub hash_hdr_info: Hash,
    /// OVEExtra: the contents of the bstr (`.cbor OVEExtraInfo`), kept as received.
    pub extra: Option<Vec<u8>>,
    /// The next owner's key.
    pub pub_key: PublicKey,
}

impl OvEntryPayload {
    pub fn to_value(&self) -> Value {
        Value::Array(vec![
            self.hash_prev_entry.to_value(),
            self.hash_hdr_info.to_value(),
            match &self.extra {
                Some(b) => Value::Bytes(b.clone()),
                None => Value::Null,
            },
            self.pub_key.to_value(),
        ])
    }

    pub fn decode(bytes: &[u8]) -> Result<OvEntryPayload, FdoError> {
        const W: &str = "OVEntryPayload";
        let [prev, hdr, extra, key] = cbor::array_n(cbor::decode(bytes, MAX_ENTRY, W)?, W)?;
        Ok(OvEntryPayload {
            hash_prev_entry: Hash::from_value(prev, "OVEHashPrevEntry")?,
            hash_hdr_info: Hash::from_value(hdr, "OVEHashHdrInfo")?,
            extra: match extra {
                Value::Null => None,
                Value::Bytes(b) if b.len() <= MAX_EXTRA => Some(b),
                Value::Bytes(_) => return Err(FdoError::malformed("OVEExtra", "too long")),
                other => {
                    return Err(FdoError::malformed(
                        "OVEExtra",
                        format!("expected null or bstr, found {}", cbor::kind(&other)),
                    ))
                }
            },
            pub_key: PublicKey::from_value(key, "OVEPubKey")?,
        })
    }
}

/// One `OVEntry`: the COSE_Sign1 as received (or made) and its decoded payload.
#[derive(Debug, Clone)]
pub struct OvEntry {
    raw: Vec<u8>,
    sign1: cose::Sign1,
    payload: OvEntryPayload,
}

impl OvEntry {
    pub fn decode(raw: &[u8]) -> Result<OvEntry, FdoError> {
        let sign1 = cose::decode(raw, MAX_ENTRY, Tagging::Required, "OVEntry")?;
        let payload = match &sign1.payload {
            Some(p) => OvEntryPayload::decode(p)?,
            None => return Err(FdoError::malformed("OVEntry", "detached payload")),
        };
        Ok(OvEntry {
            raw: raw.to_vec(),
            sign1,
            payload,
        })
    }

    fn sign(key: &SigningKey, payload: OvEntryPayload) -> Result<OvEntry, FdoError> {
        let bytes = cbor::encode(&payload.to_value());
        let sign1 = cose::sign(key, bytes, Default::default())?;
        let raw = cose::encode(&sign1, true)?;
        Ok(OvEntry {
            raw,
            sign1,
            payload,
        })
    }

    /// The tagged COSE_Sign1 bytes (what the next entry's hash covers).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    pub fn payload(&self) -> &OvEntryPayload {
        &self.payload
    }

    pub fn sign1(&self) -> &cose::Sign1 {
        &self.sign1
    }
}

/// The result of a successful chain check.
#[derive(Debug, Clone)]
pub struct VerifiedChain {
    pub guid: Guid,
    /// The manufacturer key, then the key named by each entry: `keys[i]` signed entry `i`.
    pub keys: Vec<PublicKey>,
    /// The final owner: the key named by the last entry (the manufacturer key when there
    /// are no entries).
    pub owner_key: PublicKey,
}

/// An ownership voucher.
#[derive(Debug, Clone)]
pub struct OwnershipVoucher {
    prot_ver: u64,
    header_bytes: Vec<u8>,
    header: OvHeader,
    hmac: HMac,
    cert_chain: Option<Vec<Vec<u8>>>,
    entries: Vec<OvEntry>,
}

impl OwnershipVoucher {
    /// A voucher without entries, as the manufacturer makes it (DI): the header's HMAC is
    /// computed under the device's HMAC secret.
    pub fn manufacture(
        header: OvHeader,
        hmac_alg: HashAlg,
        hmac_secret: &[u8],
        cert_chain: Option<Vec<Vec<u8>>>,
    ) -> Result<OwnershipVoucher, FdoError> {
        let header_bytes = header.encode();
        let hmac = crypto::hmac(hmac_alg, hmac_secret, &header_bytes)?;
        Ok(OwnershipVoucher {
            prot_ver: PROTOCOL_VERSION,
            header_bytes,
            header,
            hmac,
            cert_chain,
            entries: Vec::new(),
        })
    }

    /// Decode a CBOR voucher.
    pub fn decode(bytes: &[u8]) -> Result<OwnershipVoucher, FdoError> {
        const W: &str = "OwnershipVoucher";
        if bytes.len() > MAX_VOUCHER {
            return Err(FdoError::TooLarge {
                what: W,
                len: bytes.len(),
                max: MAX_VOUCHER,
            });
        }
        let items = cbor::array_items(bytes, W)?;
        let [ver, hdr, mac, chain, entries] =
            <[&[u8]; 5]>::try_from(items.as_slice()).map_err(|_| {
                FdoError::malformed(W, format!("expected 5 items, found {}", items.len()))
            })?;
        let prot_ver = cbor::uint(cbor::decode(ver, 16, "OVProtVer")?, "OVProtVer")?;
        if prot_ver != PROTOCOL_VERSION {
            return Err(FdoError::Version {
                what: W,
                found: prot_ver,
            });
        }
        let header_bytes = cbor::bytes(
            cbor::decode(hdr, MAX_VOUCHER, "OVHeaderTag")?,
            "OVHeaderTag",
        )?;
        let header = OvHeader::decode(&header_bytes)?;
        let hmac = Hash::from_value(cbor::decode(mac, 256, "OVHeaderHMac")?, "OVHeaderHMac")?;
        let cert_chain = match cbor::decode(chain, MAX_VOUCHER, "OVDevCertChain")? {
            Value::Null => None,
            v => {
                let certs = cbor::array(v, "OVDevCertChain")?;
                if certs.is_empty() || certs.len() > MAX_CERTS {
                    return Err(FdoError::malformed(
                        "OVDevCertChain",
                        format!("{} certificates (1 to {MAX_CERTS})", certs.len()),
                    ));
                }
                Some(
                    certs
                        .into_iter()
                        .map(|c| cbor::bytes(c, "OVDevCertChain"))
                        .collect::<Result<Vec<_>, _>>()?,
                )
            }
        };
        let raw_entries = cbor::array_items(entries, "OVEntryArray")?;
        if raw_entries.len() > MAX_ENTRIES {
            return Err(FdoError::malformed(
                "OVEntryArray",
                format!("{} entries (at most {MAX_ENTRIES})", raw_entries.len()),
            ));
        }
        let entries = raw_entries
            .into_iter()
            .map(OvEntry::decode)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OwnershipVoucher {
            prot_ver,
            header_bytes,
            header,
            hmac,
            cert_chain,
            entries,
        })
    }

    /// Assemble a voucher from its parts as TO2 delivers them to a device (ProveOVHdr
    /// carries the header bytes and HMAC, OVNextEntry each entry), to verify it with
    /// [`verify_chain`](Self::verify_chain) and [`verify_hmac`](Self::verify_hmac).
    pub fn from_parts(
        header_bytes: Vec<u8>,
        hmac: HMac,
        cert_chain: Option<Vec<Vec<u8>>>,
        entries: &[Vec<u8>],
    ) -> Result<OwnershipVoucher, FdoError> {
        if entries.len() > MAX_ENTRIES {
            return Err(FdoError::malformed(
                "OVEntryArray",
                format!("{} entries (at most {MAX_ENTRIES})", entries.len()),
            ));
        }
        let header = OvHeader::decode(&header_bytes)?;
        Ok(OwnershipVoucher {
            prot_ver: header.prot_ver,
            header_bytes,
            header,
            hmac,
            cert_chain,
            entries: entries
                .iter()
                .map(|e| OvEntry::decode(e.as_slice()))
                .collect::<Result<Vec<_>, _>>()?,
        })
    }

    /// The CBOR voucher; entries are written as received.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        cbor::write_head(4, 5, &mut out);
        cbor::encode_into(&cbor::uint_value(self.prot_ver), &mut out);
        cbor::encode_into(&Value::Bytes(self.header_bytes.clone()), &mut out);
        cbor::encode_into(&self.hmac.to_value(), &mut out);
        match &self.cert_chain {
            Some(certs) => cbor::encode_into(
                &Value::Array(certs.iter().cloned().map(Value::Bytes).collect()),
                &mut out,
            ),
            None => out.push(0xf6),
        }
        cbor::write_head(4, self.entries.len() as u64, &mut out);
        for e in &self.entries {
            out.extend_from_slice(&e.raw);
        }
        out
    }

    /// PEM armour: `-----BEGIN OWNERSHIP VOUCHER-----` around the base64 of the CBOR.
    pub fn to_pem(&self) -> String {
        crypto::pem_encode(PEM_LABEL, &self.encode())
    }

    /// The first OWNERSHIP VOUCHER block of a PEM text (other blocks, such as the private
    /// key some tools append, are ignored).
    pub fn from_pem(text: &str) -> Result<OwnershipVoucher, FdoError> {
        let blocks = pem::parse_many(text).map_err(|e| FdoError::Pem(e.to_string()))?;
        let block = blocks
            .iter()
            .find(|b| b.tag() == PEM_LABEL)
            .ok_or_else(|| FdoError::Pem(format!("no -----BEGIN {PEM_LABEL}----- block")))?;
        Self::decode(block.contents())
    }

    /// A voucher file: PEM armour or raw CBOR.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<OwnershipVoucher, FdoError> {
        // Base64 and line breaks take about 4/3 of the CBOR: twice the limit is plenty.
        if bytes.len() > 2 * MAX_VOUCHER {
            return Err(FdoError::TooLarge {
                what: "voucher file",
                len: bytes.len(),
                max: 2 * MAX_VOUCHER,
            });
        }
        let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
        match start {
            Some(i) if bytes[i..].starts_with(b"-----BEGIN") => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| FdoError::Pem("not UTF-8 text".into()))?;
                Self::from_pem(text)
            }
            _ => Self::decode(bytes),
        }
    }

    pub fn header(&self) -> &OvHeader {
        &self.header
    }

    /// The OVHeader bytes exactly as in OVHeaderTag (what the HMAC covers).
    pub fn header_bytes(&self) -> &[u8] {
        &self.header_bytes
    }

    pub fn hmac(&self) -> &HMac {
        &self.hmac
    }

    pub fn guid(&self) -> Guid {
        self.header.guid
    }

    pub fn cert_chain(&self) -> Option<&[Vec<u8>]> {
        self.cert_chain.as_deref()
    }

    pub fn entries(&self) -> &[OvEntry] {
        &self.entries
    }

    /// The current owner's key as the voucher states it (not verified).
    pub fn owner_key(&self) -> &PublicKey {
        match self.entries.last() {
            Some(e) => &e.payload.pub_key,
            None => &self.header.mfg_pub_key,
        }
    }

    /// The device's attestation key: the leaf of the device certificate chain.
    pub fn device_public_key(&self) -> Result<Option<PublicKey>, FdoError> {
        let Some(leaf) = self.cert_chain.as_ref().and_then(|c| c.first()) else {
            return Ok(None);
        };
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| FdoError::CertChain(format!("device certificate: {e}")))?;
        let spki = cert.public_key().raw.to_vec();
        let vk = crypto::VerifyingKey::from_spki(&spki)?;
        Ok(Some(PublicKey::from_spki(vk.curve(), spki)))
    }

    /// The input of entry 0's OVEHashPrevEntry: OVHeader bytes || encoded OVHeaderHMac.
    fn header_and_hmac(&self) -> Vec<u8> {
        let mut v = self.header_bytes.clone();
        v.extend_from_slice(&self.hmac.encode());
        v
    }

    /// Check the HMAC of the header under the device's secret (what only the device and its
    /// manufacturer can do).
    pub fn verify_hmac(&self, hmac_secret: &[u8]) -> Result<(), FdoError> {
        if !self.hmac.alg.is_hmac() {
            return Err(FdoError::malformed(
                "OVHeaderHMac",
                format!("{} is not an HMAC", self.hmac.alg),
            ));
        }
        if crypto::hmac_verify(&self.hmac, hmac_secret, &self.header_bytes)? {
            Ok(())
        } else {
            Err(FdoError::HmacMismatch)
        }
    }

    /// Check everything an owner or rendezvous server can check without the device's
    /// secret: the device certificate chain against its hash, and for every entry its
    /// hash chain, its signature by the previous key and its header info hash. Returns the
    /// final owner key.
    pub fn verify_chain(&self) -> Result<VerifiedChain, FdoError> {
        self.verify_cert_chain()?;
        let hdr_info = self.header.hdr_info();
        let mut keys = vec![self.header.mfg_pub_key.clone()];
        for (i, e) in self.entries.iter().enumerate() {
            let p = &e.payload;
            let prev = if i == 0 {
                self.header_and_hmac()
            } else {
                self.entries[i - 1].raw.clone()
            };
            if crypto::hash(p.hash_prev_entry.alg, &[&prev])? != p.hash_prev_entry {
                return Err(if i == 0 {
                    FdoError::HeaderAltered
                } else {
                    FdoError::BrokenChain { entry: i }
                });
            }
            let signer = &keys[i];
            let signer_name = || {
                if i == 0 {
                    "the manufacturer key (OVPubKey)".to_string()
                } else {
                    format!("the key named by entry {}", i - 1)
                }
            };
            let vk = signer.verifying_key().map_err(|e| match e {
                FdoError::Unsupported { .. } => e,
                other => FdoError::malformed("OVEPubKey", format!("{}: {other}", signer_name())),
            })?;
            match cose::verify(&e.sign1, &vk, "OVEntry") {
                Ok(()) => {}
                Err(FdoError::BadSignature { .. }) => {
                    return Err(FdoError::WrongSigner {
                        entry: i,
                        signer: signer_name(),
                    })
                }
                Err(other) => return Err(other),
            }
            if crypto::hash(p.hash_hdr_info.alg, &[&hdr_info])? != p.hash_hdr_info {
                return Err(FdoError::HeaderInfoMismatch { entry: i });
            }
            keys.push(p.pub_key.clone());
        }
        let owner_key = keys
            .last()
            .cloned()
            .unwrap_or_else(|| self.header.mfg_pub_key.clone());
        Ok(VerifiedChain {
            guid: self.header.guid,
            keys,
            owner_key,
        })
    }

    /// [`verify_chain`](Self::verify_chain) for a voucher that must belong to `guid`.
    pub fn verify_for_guid(&self, guid: &Guid) -> Result<VerifiedChain, FdoError> {
        if self.header.guid != *guid {
            return Err(FdoError::GuidMismatch {
                expected: *guid,
                found: self.header.guid,
            });
        }
        self.verify_chain()
    }

    /// The device's full check: the chain, then the HMAC under its secret.
    pub fn verify_with_secret(&self, hmac_secret: &[u8]) -> Result<VerifiedChain, FdoError> {
        let chain = self.verify_chain()?;
        self.verify_hmac(hmac_secret)?;
        Ok(chain)
    }

    fn verify_cert_chain(&self) -> Result<(), FdoError> {
        let (certs, hash) = match (&self.cert_chain, &self.header.cert_chain_hash) {
            (None, None) => return Ok(()),
            (Some(c), Some(h)) => (c, h),
            (Some(_), None) => {
                return Err(FdoError::CertChain(
                    "present but OVDevCertChainHash is null".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(FdoError::CertChain(
                    "null but OVDevCertChainHash is present".into(),
                ))
            }
        };
        let parts: Vec<&[u8]> = certs.iter().map(Vec::as_slice).collect();
        if crypto::hash(hash.alg, &parts)? != *hash {
            return Err(FdoError::CertChainHashMismatch);
        }
        // Each certificate must be signed by the next one (the last is trusted as given:
        // the chain is bound to the header by the hash, and the header by HMAC and entry 0).
        let parsed = certs
            .iter()
            .enumerate()
            .map(|(i, der)| {
                x509_parser::parse_x509_certificate(der)
                    .map(|(_, c)| c)
                    .map_err(|e| FdoError::CertChain(format!("certificate {i}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (i, pair) in parsed.windows(2).enumerate() {
            pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .map_err(|e| {
                    FdoError::CertChain(format!(
                        "certificate {i} is not signed by certificate {}: {e}",
                        i + 1
                    ))
                })?;
        }
        Ok(())
    }

    /// Append an entry that transfers the voucher from its current owner (`current_owner`,
    /// which must hold the key the voucher names last) to `next_owner`.
    ///
    /// The voucher is verified first. The next owner's key must have the manufacturer key's
    /// type (the specification's rule, so a constrained device verifies a single algorithm)
    /// and is encoded like the manufacturer key. The hash is the one entry 0 uses, or for
    /// the first entry SHA-384 when the device and the owner keys are both P-384, SHA-256
    /// otherwise.
    pub fn extend(
        &self,
        current_owner: &SigningKey,
        next_owner: &PublicKey,
    ) -> Result<OwnershipVoucher, FdoError> {
        let chain = self.verify_chain()?;
        let signer = current_owner.public_key();
        if !signer.same_key(&chain.owner_key) {
            return Err(FdoError::NotCurrentOwner {
                expected: chain
                    .owner_key
                    .fingerprint()
                    .unwrap_or_else(|e| e.to_string()),
                found: signer.fingerprint().unwrap_or_else(|e| e.to_string()),
            });
        }
        let mfg_curve = self.header.mfg_pub_key.curve()?;
        let next_curve = next_owner.curve()?;
        if next_curve != mfg_curve || next_owner.pk_type != self.header.mfg_pub_key.pk_type {
            return Err(FdoError::KeyTypeMismatch(format!(
                "every key in a voucher must have the manufacturer key's type ({mfg_curve}); the next owner's key is {next_curve}"
            )));
        }
        if self.entries.len() >= MAX_ENTRIES {
            return Err(FdoError::malformed("OVEntryArray", "voucher is full"));
        }
        let alg = match self.entries.first() {
            Some(e) => e.payload.hash_prev_entry.alg,
            None => {
                let device = self
                    .device_public_key()?
                    .map(|k| k.curve())
                    .transpose()?
                    .unwrap_or(mfg_curve);
                if device == Curve::P384 && current_owner.curve() == Curve::P384 {
                    HashAlg::Sha384
                } else {
                    HashAlg::Sha256
                }
            }
        };
        let prev = match self.entries.last() {
            Some(e) => e.raw.clone(),
            None => self.header_and_hmac(),
        };
        let payload = OvEntryPayload {
            hash_prev_entry: crypto::hash(alg, &[&prev])?,
            hash_hdr_info: crypto::hash(alg, &[&self.header.hdr_info()])?,
            extra: None,
            pub_key: next_owner.clone(),
        };
        let mut next = self.clone();
        next.entries.push(OvEntry::sign(current_owner, payload)?);
        Ok(next)
    }
}

#[cfg(test)]
#[path = "voucher_tests.rs"]
mod tests;
