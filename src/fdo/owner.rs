//! The owner keys of a gateway (or cloud) and voucher import.
//!
//! Files in the data directory, created on first use:
//!
//! - `owner.key` / `owner.crt`: the current P-256 owner key (PKCS#8 PEM, 0600) and a
//!   self-signed certificate that carries its public key, so that whoever holds a voucher
//!   can extend it to this gateway (`outpost voucher owner-cert`).
//! - `owner-p384.key` / `owner-p384.crt`: the same for vouchers whose keys are P-384 (every
//!   key in a voucher has the manufacturer key's type).
//! - `owner-<key id>.key` / `.crt`: retired keys (key id = the first 16 hex digits of the
//!   SHA-256 of the SubjectPublicKeyInfo). They stay owner keys: vouchers already extended
//!   to them are still ours after a rotation.

use super::crypto::{self, CertSpec, Curve, SigningKey};
use super::types::PublicKey;
use super::voucher::OwnershipVoucher;
use super::{file_err, FdoError, Guid};
use crate::store::{Store, VoucherRecord};
use std::path::{Path, PathBuf};

const OWNER_CERT_DAYS: i64 = 30 * 365;

/// One owner key with its certificate.
pub struct OwnerKey {
    pub key: SigningKey,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub key_path: PathBuf,
    /// [`PublicKey::key_id`] of the key.
    pub key_id: String,
}

impl OwnerKey {
    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }
}

fn current_name(curve: Curve) -> &'static str {
    match curve {
        Curve::P256 => "owner",
        Curve::P384 => "owner-p384",
    }
}

fn load(key_path: &Path, cert_path: &Path) -> Result<OwnerKey, FdoError> {
    let key =
        SigningKey::from_pem(&std::fs::read_to_string(key_path).map_err(file_err(key_path))?)?;
    let cert_pem = std::fs::read_to_string(cert_path).map_err(file_err(cert_path))?;
    let cert_der = crypto::cert_der_from_pem(&cert_pem)?;
    if crypto::cert_public_key(&cert_der)?.point() != key.public_point() {
        return Err(FdoError::Key(format!(
            "{} does not carry the key of {}",
            cert_path.display(),
            key_path.display()
        )));
    }
    let key_id = key.public_key().key_id()?;
    Ok(OwnerKey {
        key,
        cert_pem,
        cert_der,
        key_path: key_path.to_path_buf(),
        key_id,
    })
}

/// The current owner key of `curve` in `data_dir`, created (with its certificate) on first
/// use. `subject` names the gateway in the certificate.
pub fn current_or_create(
    data_dir: &Path,
    curve: Curve,
    subject: &str,
) -> Result<OwnerKey, FdoError> {
    super::private_dir(data_dir)?;
    let name = current_name(curve);
    let key_path = data_dir.join(format!("{name}.key"));
    let cert_path = data_dir.join(format!("{name}.crt"));
    if key_path.exists() && cert_path.exists() {
        return load(&key_path, &cert_path);
    }
    let key = SigningKey::generate(curve)?;
    let (pem, _) = crypto::make_cert(
        &key,
        &CertSpec {
            common_name: &format!("Outpost owner {subject}"),
            organization: "Outpost",
            is_ca: false,
            validity_days: OWNER_CERT_DAYS,
        },
        None,
    )?;
    super::write_file(&key_path, key.to_pem().as_bytes(), 0o600)?;
    super::write_file(&cert_path, pem.as_bytes(), 0o644)?;
    tracing::info!(path = %cert_path.display(), curve = %curve, "created owner key");
    load(&key_path, &cert_path)
}

/// Retire the current key of `curve`: it is renamed `owner-<key id>.*` and stays an owner
/// key; the next [`current_or_create`] makes a new current key.
pub fn retire_current(data_dir: &Path, curve: Curve) -> Result<Option<String>, FdoError> {
    let name = current_name(curve);
    let key_path = data_dir.join(format!("{name}.key"));
    let cert_path = data_dir.join(format!("{name}.crt"));
    if !key_path.exists() {
        return Ok(None);
    }
    let k = load(&key_path, &cert_path)?;
    let new_key = data_dir.join(format!("owner-{}.key", k.key_id));
    let new_cert = data_dir.join(format!("owner-{}.crt", k.key_id));
    std::fs::rename(&cert_path, &new_cert).map_err(file_err(&cert_path))?;
    std::fs::rename(&key_path, &new_key).map_err(file_err(&key_path))?;
    tracing::info!(key_id = %k.key_id, "retired owner key");
    Ok(Some(k.key_id))
}

/// Every owner key in `data_dir`: the current ones and the retired ones.
pub fn all(data_dir: &Path) -> Result<Vec<OwnerKey>, FdoError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(file_err(data_dir)(e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("owner") && n.ends_with(".key"))
        .collect();
    names.sort();
    for n in names {
        let key_path = data_dir.join(&n);
        let cert_path = key_path.with_extension("crt");
        if cert_path.exists() {
            out.push(load(&key_path, &cert_path)?);
        }
    }
    Ok(out)
}

/// The owner key of `data_dir` that `key` names, if any.
pub fn find(data_dir: &Path, key: &PublicKey) -> Result<Option<OwnerKey>, FdoError> {
    Ok(all(data_dir)?
        .into_iter()
        .find(|k| k.public_key().same_key(key)))
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub guid: Guid,
    pub device_info: String,
    pub entries: usize,
    pub owner_key_id: String,
    /// A voucher for this GUID was stored before and has been replaced.
    pub replaced: bool,
}

/// Import a voucher (CBOR or PEM) into `store`: its chain must verify and its final owner
/// must be one of the owner keys of `data_dir`.
pub fn import_voucher(store: &Store, data_dir: &Path, bytes: &[u8]) -> Result<Imported, FdoError> {
    let voucher = OwnershipVoucher::from_file_bytes(bytes)?;
    let chain = voucher.verify_chain()?;
    let ours = find(data_dir, &chain.owner_key)?.ok_or_else(|| FdoError::NotOurs {
        fingerprint: chain
            .owner_key
            .fingerprint()
            .unwrap_or_else(|e| e.to_string()),
    })?;
    let guid = voucher.guid();
    let rec = VoucherRecord {
        guid: guid.hex(),
        device_info: voucher.header().device_info.clone(),
        owner_key_id: ours.key_id.clone(),
        entries: voucher.entries().len() as u32,
        imported_at: time::OffsetDateTime::now_utc().unix_timestamp(),
        voucher: voucher.encode(),
    };
    let replaced = store.put_voucher(&guid.0, &rec)?;
    tracing::info!(guid = %guid, owner_key = %ours.key_id, replaced, "imported ownership voucher");
    Ok(Imported {
        guid,
        device_info: rec.device_info,
        entries: voucher.entries().len(),
        owner_key_id: ours.key_id,
        replaced,
    })
}
