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
//!   to them are still ours after a rotation (`outpost voucher rotate-owner-key`).
//! - `installer.key` / `installer.crt` (`installer-p384.*` for P-384) and retired
//!   `installer-<key id>.*`: the operator's *installer key* (seed 004's "unified key"), one
//!   key shared by every gateway of an operator, so that a seller can extend a voucher to the
//!   operator without knowing which gateway will install the device. A voucher extended to
//!   an installer key this gateway holds is extended on import to the gateway's own current
//!   owner key (of the voucher's curve) and stored like any other.

use crate::fdo_wire::crypto::{self, CertSpec, Curve, SigningKey};
use crate::fdo_wire::types::PublicKey;
use crate::fdo_wire::voucher::OwnershipVoucher;
use crate::fdo_wire::{file_err, FdoError, Guid};
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

/// Which family of keys: the gateway's own owner keys, or the operator's installer keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Owner,
    Installer,
}

impl KeyKind {
    /// The file name prefix (`owner`, `installer`).
    pub fn prefix(self) -> &'static str {
        match self {
            KeyKind::Owner => "owner",
            KeyKind::Installer => "installer",
        }
    }

    fn label(self) -> &'static str {
        match self {
            KeyKind::Owner => "owner",
            KeyKind::Installer => "installer",
        }
    }
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

fn current_name(kind: KeyKind, curve: Curve) -> String {
    match curve {
        Curve::P256 => kind.prefix().to_string(),
        Curve::P384 => format!("{}-p384", kind.prefix()),
    }
}

fn current_paths(data_dir: &Path, kind: KeyKind, curve: Curve) -> (PathBuf, PathBuf) {
    let name = current_name(kind, curve);
    (
        data_dir.join(format!("{name}.key")),
        data_dir.join(format!("{name}.crt")),
    )
}

/// Whether `file` (a file name in the data directory) is a key or certificate of `kind`:
/// `<prefix>.<ext>` or `<prefix>-<suffix>.<ext>`.
fn is_kind_file(file: &str, kind: KeyKind, ext: &str) -> bool {
    file.strip_suffix(ext)
        .and_then(|stem| stem.strip_prefix(kind.prefix()))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
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
    current_or_create_kind(data_dir, KeyKind::Owner, curve, subject)
}

/// The current key of `kind` and `curve`, if there is one.
pub fn current(data_dir: &Path, kind: KeyKind, curve: Curve) -> Result<Option<OwnerKey>, FdoError> {
    let (key_path, cert_path) = current_paths(data_dir, kind, curve);
    if key_path.exists() && cert_path.exists() {
        return load(&key_path, &cert_path).map(Some);
    }
    Ok(None)
}

fn cert_subject(kind: KeyKind, subject: &str) -> String {
    match kind {
        KeyKind::Owner => format!("Outpost owner {subject}"),
        KeyKind::Installer => format!("Outpost installer {subject}"),
    }
}

/// Write `key` as the current key of `kind` (its curve) with a new self-signed certificate.
fn write_current(
    data_dir: &Path,
    kind: KeyKind,
    key: &SigningKey,
    subject: &str,
) -> Result<OwnerKey, FdoError> {
    let (key_path, cert_path) = current_paths(data_dir, kind, key.curve());
    let (pem, _) = crypto::make_cert(
        key,
        &CertSpec {
            common_name: &cert_subject(kind, subject),
            organization: "Outpost",
            is_ca: false,
            validity_days: OWNER_CERT_DAYS,
        },
        None,
    )?;
    // The key first: a key without its certificate is not listed, so a reader never sees
    // a certificate whose key is missing.
    crate::fdo_wire::write_file(&key_path, key.to_pem().as_bytes(), 0o600)?;
    crate::fdo_wire::write_file(&cert_path, pem.as_bytes(), 0o644)?;
    tracing::info!(path = %cert_path.display(), curve = %key.curve(), "created {kind} key");
    load(&key_path, &cert_path)
}

/// An exclusive lock on the key files of `data_dir` (`keys.lock`), held by every change
/// (creation, rotation, installation) so that two processes (the gateway and the CLI) never
/// interleave them. Readers take no lock: they see each file whole (atomic writes and
/// renames) and retry on a miss.
struct KeysLock(std::fs::File);

impl KeysLock {
    fn take(data_dir: &Path) -> Result<KeysLock, FdoError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join("keys.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(file_err(&path))?;
        f.lock().map_err(file_err(&path))?;
        Ok(KeysLock(f))
    }
}

impl Drop for KeysLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// The current key of `kind` and `curve`, created on first use.
pub fn current_or_create_kind(
    data_dir: &Path,
    kind: KeyKind,
    curve: Curve,
    subject: &str,
) -> Result<OwnerKey, FdoError> {
    if let Some(k) = current(data_dir, kind, curve)? {
        return Ok(k);
    }
    crate::fdo_wire::private_dir(data_dir)?;
    let _lock = KeysLock::take(data_dir)?;
    if let Some(k) = current(data_dir, kind, curve)? {
        return Ok(k);
    }
    let key = SigningKey::generate(curve)?;
    write_current(data_dir, kind, &key, subject)
}

/// Make `key` the current key of `kind` for its curve: a different current key is retired
/// first (it stays usable). Returns the key and the id of the retired one. Installing the
/// key that is already current changes nothing.
pub fn install(
    data_dir: &Path,
    kind: KeyKind,
    key: SigningKey,
    subject: &str,
) -> Result<(OwnerKey, Option<String>), FdoError> {
    crate::fdo_wire::private_dir(data_dir)?;
    let _lock = KeysLock::take(data_dir)?;
    if let Some(cur) = current(data_dir, kind, key.curve())? {
        if cur.key.public_point() == key.public_point() {
            return Ok((cur, None));
        }
    }
    let retired = retire_locked(data_dir, kind, key.curve())?;
    let k = write_current(data_dir, kind, &key, subject)?;
    Ok((k, retired))
}

/// Rotate the key of `kind` and `curve`: retire the current one (kept, still valid) and
/// create a new current one. Returns the new key and the id of the retired one.
pub fn rotate(
    data_dir: &Path,
    kind: KeyKind,
    curve: Curve,
    subject: &str,
) -> Result<(OwnerKey, Option<String>), FdoError> {
    install(data_dir, kind, SigningKey::generate(curve)?, subject)
}

/// Retire the current owner key of `curve`: it is renamed `owner-<key id>.*` and stays an
/// owner key; the next [`current_or_create`] makes a new current key.
pub fn retire_current(data_dir: &Path, curve: Curve) -> Result<Option<String>, FdoError> {
    retire_current_kind(data_dir, KeyKind::Owner, curve)
}

/// Retire the current key of `kind` and `curve` (renamed `<prefix>-<key id>.*`).
pub fn retire_current_kind(
    data_dir: &Path,
    kind: KeyKind,
    curve: Curve,
) -> Result<Option<String>, FdoError> {
    if !data_dir.exists() {
        return Ok(None);
    }
    let _lock = KeysLock::take(data_dir)?;
    retire_locked(data_dir, kind, curve)
}

fn retire_locked(data_dir: &Path, kind: KeyKind, curve: Curve) -> Result<Option<String>, FdoError> {
    let (key_path, cert_path) = current_paths(data_dir, kind, curve);
    if !key_path.exists() {
        return Ok(None);
    }
    let k = load(&key_path, &cert_path)?;
    let prefix = kind.prefix();
    let new_key = data_dir.join(format!("{prefix}-{}.key", k.key_id));
    let new_cert = data_dir.join(format!("{prefix}-{}.crt", k.key_id));
    // The key moves first: for a moment it is listed under neither name, never under both
    // with a certificate missing (a reader retries on a miss).
    std::fs::rename(&key_path, &new_key).map_err(file_err(&key_path))?;
    std::fs::rename(&cert_path, &new_cert).map_err(file_err(&cert_path))?;
    tracing::info!(key_id = %k.key_id, "retired {kind} key");
    Ok(Some(k.key_id))
}

/// Every owner key in `data_dir`: the current ones and the retired ones.
pub fn all(data_dir: &Path) -> Result<Vec<OwnerKey>, FdoError> {
    all_kind(data_dir, KeyKind::Owner)
}

fn file_names(data_dir: &Path, kind: KeyKind, ext: &str) -> Result<Vec<String>, FdoError> {
    let entries = match std::fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file_err(data_dir)(e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_kind_file(n, kind, ext))
        .collect();
    names.sort();
    Ok(names)
}

/// Every key of `kind` in `data_dir`, current and retired.
pub fn all_kind(data_dir: &Path, kind: KeyKind) -> Result<Vec<OwnerKey>, FdoError> {
    let mut out = Vec::new();
    for n in file_names(data_dir, kind, ".key")? {
        let key_path = data_dir.join(&n);
        let cert_path = key_path.with_extension("crt");
        if !cert_path.exists() {
            continue;
        }
        match load(&key_path, &cert_path) {
            Ok(k) => out.push(k),
            // Renamed by a rotation since the listing: it is listed under its new name by
            // the next read.
            Err(FdoError::File { cause, .. }) if cause.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The owner key of `data_dir` that `key` names, if any.
pub fn find(data_dir: &Path, key: &PublicKey) -> Result<Option<OwnerKey>, FdoError> {
    find_kind(data_dir, KeyKind::Owner, key)
}

/// The key of `kind` in `data_dir` that `key` names, if any.
pub fn find_kind(
    data_dir: &Path,
    kind: KeyKind,
    key: &PublicKey,
) -> Result<Option<OwnerKey>, FdoError> {
    Ok(all_kind(data_dir, kind)?
        .into_iter()
        .find(|k| k.public_key().same_key(key)))
}

/// What a key named by a voucher is to this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRole {
    Current(KeyKind),
    Retired(KeyKind),
    NotOurs,
}

impl std::fmt::Display for KeyRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyRole::Current(k) => write!(f, "this gateway's current {k} key"),
            KeyRole::Retired(k) => write!(f, "a retired {k} key of this gateway"),
            KeyRole::NotOurs => f.write_str("not ours"),
        }
    }
}

/// What `key` is to the gateway of `data_dir`, from the certificates only (no private key
/// is read, so this works for any user who can list the directory).
pub fn classify(data_dir: &Path, key: &PublicKey) -> Result<KeyRole, FdoError> {
    let Ok(point) = key.verifying_key() else {
        return Ok(KeyRole::NotOurs);
    };
    for kind in [KeyKind::Owner, KeyKind::Installer] {
        for n in file_names(data_dir, kind, ".crt")? {
            let path = data_dir.join(&n);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(der) = crypto::cert_der_from_pem(&text) else {
                continue;
            };
            if crypto::cert_public_key(&der).is_ok_and(|k| k.point() == point.point()) {
                let current = [Curve::P256, Curve::P384]
                    .iter()
                    .any(|c| format!("{}.crt", current_name(kind, *c)) == n);
                return Ok(if current {
                    KeyRole::Current(kind)
                } else {
                    KeyRole::Retired(kind)
                });
            }
        }
    }
    Ok(KeyRole::NotOurs)
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
    /// The voucher named this installer key: it was extended to `owner_key_id` on import.
    pub installer_key_id: Option<String>,
}

/// The subject of this gateway's certificates: the one in its P-256 owner certificate
/// (`Outpost owner <subject>`), else `gateway`.
fn gateway_subject(data_dir: &Path) -> String {
    let (_, cert_path) = current_paths(data_dir, KeyKind::Owner, Curve::P256);
    std::fs::read_to_string(cert_path)
        .ok()
        .and_then(|t| crypto::cert_der_from_pem(&t).ok())
        .and_then(|der| {
            let (_, c) = x509_parser::parse_x509_certificate(&der).ok()?;
            let cn = c
                .subject()
                .iter_common_name()
                .next()?
                .as_str()
                .ok()?
                .to_string();
            cn.strip_prefix("Outpost owner ").map(str::to_string)
        })
        .unwrap_or_else(|| "gateway".into())
}

/// How a key that is not ours is named in errors: key id, fingerprint, and the subject of
/// its certificate when the voucher carries one (X5CHAIN).
pub fn name_key(key: &PublicKey) -> String {
    let mut s = match (key.key_id(), key.fingerprint()) {
        (Ok(id), Ok(f)) => format!("{id} (sha256:{f})"),
        (Err(e), _) | (_, Err(e)) => e.to_string(),
    };
    if let (crate::fdo_wire::types::pk_enc::X5CHAIN, ciborium::Value::Array(certs)) =
        (key.enc, &key.body)
    {
        if let Some(ciborium::Value::Bytes(der)) = certs.first() {
            if let Ok((_, c)) = x509_parser::parse_x509_certificate(der) {
                s.push_str(&format!(", certificate \"{}\"", c.subject()));
            }
        }
    }
    s
}

/// Import a voucher (CBOR or PEM) into `store`: its chain must verify and its final owner
/// must be one of the owner keys of `data_dir`, or one of its installer keys; in that case
/// the voucher is first extended with the installer key to the current owner key of its
/// curve (created if needed), and the extended voucher is stored.
pub fn import_voucher(store: &Store, data_dir: &Path, bytes: &[u8]) -> Result<Imported, FdoError> {
    let voucher = OwnershipVoucher::from_file_bytes(bytes)?;
    let chain = voucher.verify_chain()?;
    let (voucher, ours, installer) = match find(data_dir, &chain.owner_key)? {
        Some(ours) => (voucher, ours, None),
        None => {
            let inst =
                find_kind(data_dir, KeyKind::Installer, &chain.owner_key)?.ok_or_else(|| {
                    FdoError::NotOurs {
                        fingerprint: name_key(&chain.owner_key),
                    }
                })?;
            let owner = current_or_create(data_dir, inst.key.curve(), &gateway_subject(data_dir))?;
            let next = PublicKey::encoded_like(
                &voucher.header().mfg_pub_key,
                &owner.public_key().verifying_key()?,
                Some(&owner.cert_der),
            );
            let extended = voucher.extend(&inst.key, &next)?;
            extended.verify_chain()?;
            tracing::info!(
                guid = %extended.guid(),
                installer_key = %inst.key_id,
                owner_key = %owner.key_id,
                "voucher named our installer key: extended to our owner key"
            );
            (extended, owner, Some(inst.key_id))
        }
    };
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
        installer_key_id: installer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdo_wire::manufacturer::{DeviceOptions, Manufacturer};
    use crate::fdo_wire::types::RvProtocol;

    fn device(dir: &Path, curve: Curve) -> (OwnershipVoucher, SigningKey) {
        let mfg = Manufacturer::open_or_create(&dir.join("mfg"), curve).unwrap();
        let (_, v) = mfg
            .init_device(&DeviceOptions {
                device_info: "owner-test".into(),
                rv_info: Default::default(),
                curve,
            })
            .unwrap();
        let key = SigningKey::from_pem(&std::fs::read_to_string(mfg.key_path()).unwrap()).unwrap();
        (v, key)
    }

    fn extend_to(v: &OwnershipVoucher, by: &SigningKey, to: &OwnerKey) -> OwnershipVoucher {
        let next = PublicKey::encoded_like(
            &v.header().mfg_pub_key,
            &to.public_key().verifying_key().unwrap(),
            Some(&to.cert_der),
        );
        v.extend(by, &next).unwrap()
    }

    #[test]
    fn installer_vouchers_are_extended_to_our_owner_key_on_import() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("gw");
        let store = Store::open(&tmp.path().join("store")).unwrap();
        for curve in [Curve::P256, Curve::P384] {
            let (v, mfg_key) = device(tmp.path(), curve);
            let shared = SigningKey::generate(curve).unwrap();
            // Another gateway of the operator made the certificate the seller used.
            let other = tmp.path().join(format!("other-{curve}"));
            let (seller_sees, _) = install(
                &other,
                KeyKind::Installer,
                SigningKey::from_pem(&shared.to_pem()).unwrap(),
                "gw2",
            )
            .unwrap();
            let to_installer = extend_to(&v, &mfg_key, &seller_sees);
            // Without the installer key: refused, naming the key.
            let e = import_voucher(&store, &data, &to_installer.encode())
                .unwrap_err()
                .to_string();
            assert!(e.contains(&seller_sees.key_id), "{e}");
            assert!(e.contains("installer-key --import"), "{e}");
            let (inst, retired) = install(&data, KeyKind::Installer, shared, "gw1").unwrap();
            assert_eq!(retired, None);
            assert_eq!(inst.key_id, seller_sees.key_id);
            assert_eq!(
                classify(&data, to_installer.owner_key()).unwrap(),
                KeyRole::Current(KeyKind::Installer)
            );
            let i = import_voucher(&store, &data, &to_installer.encode()).unwrap();
            assert_eq!(i.installer_key_id.as_deref(), Some(inst.key_id.as_str()));
            assert_eq!(i.entries, 2);
            let ours = current(&data, KeyKind::Owner, curve).unwrap().unwrap();
            assert_eq!(i.owner_key_id, ours.key_id);
            let stored =
                OwnershipVoucher::decode(&store.voucher(&v.guid().0).unwrap().unwrap().voucher)
                    .unwrap();
            assert!(stored
                .verify_chain()
                .unwrap()
                .owner_key
                .same_key(&ours.public_key()));
            assert_eq!(
                classify(&data, stored.owner_key()).unwrap(),
                KeyRole::Current(KeyKind::Owner)
            );
        }
    }

    #[test]
    fn rotation_keeps_old_keys_and_classifies_them() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("gw");
        let old = current_or_create(&data, Curve::P256, "gw").unwrap();
        let (new, retired) = rotate(&data, KeyKind::Owner, Curve::P256, "gw").unwrap();
        assert_eq!(retired.as_deref(), Some(old.key_id.as_str()));
        assert_ne!(new.key_id, old.key_id);
        assert_eq!(
            current_or_create(&data, Curve::P256, "gw").unwrap().key_id,
            new.key_id
        );
        assert_eq!(
            classify(&data, &old.public_key()).unwrap(),
            KeyRole::Retired(KeyKind::Owner)
        );
        assert_eq!(
            classify(&data, &new.public_key()).unwrap(),
            KeyRole::Current(KeyKind::Owner)
        );
        let stranger = SigningKey::generate(Curve::P256).unwrap();
        assert_eq!(
            classify(&data, &stranger.public_key()).unwrap(),
            KeyRole::NotOurs
        );
        // Installer keys are not owner keys, and the other way round.
        let (inst, _) = rotate(&data, KeyKind::Installer, Curve::P256, "gw").unwrap();
        let (inst2, r) = rotate(&data, KeyKind::Installer, Curve::P256, "gw").unwrap();
        assert_eq!(r.as_deref(), Some(inst.key_id.as_str()));
        assert_eq!(all(&data).unwrap().len(), 2);
        assert_eq!(all_kind(&data, KeyKind::Installer).unwrap().len(), 2);
        assert_eq!(
            classify(&data, &inst.public_key()).unwrap(),
            KeyRole::Retired(KeyKind::Installer)
        );
        assert_eq!(
            classify(&data, &inst2.public_key()).unwrap(),
            KeyRole::Current(KeyKind::Installer)
        );
        // Installing the current key again changes nothing.
        let again =
            SigningKey::from_pem(&std::fs::read_to_string(&inst2.key_path).unwrap()).unwrap();
        let (k, r) = install(&data, KeyKind::Installer, again, "gw").unwrap();
        assert_eq!((k.key_id.as_str(), r), (inst2.key_id.as_str(), None));
        use std::os::unix::fs::PermissionsExt;
        for k in all_kind(&data, KeyKind::Installer).unwrap() {
            let mode = std::fs::metadata(&k.key_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", k.key_path.display());
        }
    }

    /// A voucher built by hand with ciborium values, exactly per the FDO 1.1 CDDL, as another
    /// FDO tool would produce it: PEM-armoured, extended to our owner certificate, imported.
    #[test]
    fn a_voucher_made_by_another_tool_is_accepted() {
        use ciborium::value::Value as V;
        use ring::rand::SystemRandom;
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

        fn ser(v: &V) -> Vec<u8> {
            let mut out = Vec::new();
            ciborium::ser::into_writer(v, &mut out).unwrap();
            out
        }
        fn int(n: i64) -> V {
            V::Integer(n.into())
        }
        fn sha256(data: &[u8]) -> Vec<u8> {
            ring::digest::digest(&ring::digest::SHA256, data)
                .as_ref()
                .to_vec()
        }
        fn spki(pair: &EcdsaKeyPair) -> Vec<u8> {
            let mut v =
                hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
            v.extend_from_slice(pair.public_key().as_ref());
            v
        }
        let rng = SystemRandom::new();
        let new_key = || {
            let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng).unwrap()
        };
        let new_signing = || {
            let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            SigningKey::from_pkcs8_der(doc.as_ref()).unwrap()
        };

        // The other tool's manufacturer key, device key and device CA (made with rcgen).
        let mfg = new_key();
        let device_key = new_signing();
        let ca_key = new_signing();
        let (_, ca_der) = crypto::make_cert(
            &ca_key,
            &crypto::CertSpec {
                common_name: "Other Tool CA",
                organization: "Other",
                is_ca: true,
                validity_days: 3650,
            },
            None,
        )
        .unwrap();
        let (_, dev_der) = crypto::make_cert(
            &device_key,
            &crypto::CertSpec {
                common_name: "device",
                organization: "Other",
                is_ca: false,
                validity_days: 3650,
            },
            Some((&ca_der, &ca_key)),
        )
        .unwrap();
        let guid = [0x42u8; 16];
        let secret = [0x17u8; 32];
        let device_info = "other-tool-device";

        // OVHeader = [OVHProtVer, OVGuid, OVRVInfo, OVDeviceInfo, OVPubKey, OVDevCertChainHash]
        let rv_info = V::Array(vec![V::Array(vec![
            V::Array(vec![
                int(5),
                V::Bytes(ser(&V::Text("rv.other.example".into()))),
            ]),
            V::Array(vec![int(3), V::Bytes(ser(&int(8082)))]),
            V::Array(vec![int(12), V::Bytes(ser(&int(1)))]),
        ])]);
        let mut chain_bytes = dev_der.clone();
        chain_bytes.extend_from_slice(&ca_der);
        let header = V::Array(vec![
            int(101),
            V::Bytes(guid.to_vec()),
            rv_info,
            V::Text(device_info.into()),
            V::Array(vec![int(10), int(1), V::Bytes(spki(&mfg))]),
            V::Array(vec![int(-16), V::Bytes(sha256(&chain_bytes))]),
        ]);
        let header_bytes = ser(&header);
        // OVHeaderHMac = [HMAC-SHA256 (5), HMAC[DCHmacSecret, OVHeader]]
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            &header_bytes,
        );
        let hmac = V::Array(vec![int(5), V::Bytes(tag.as_ref().to_vec())]);

        // Entry 0: manufacturer -> seller. OVEHashPrevEntry = SHA-256(OVHeader || OVHeaderHMac).
        let seller = new_signing();
        let mut prev = header_bytes.clone();
        prev.extend_from_slice(&ser(&hmac));
        let mut hdr_info = guid.to_vec();
        hdr_info.extend_from_slice(device_info.as_bytes());
        let payload = ser(&V::Array(vec![
            V::Array(vec![int(-16), V::Bytes(sha256(&prev))]),
            V::Array(vec![int(-16), V::Bytes(sha256(&hdr_info))]),
            V::Null,
            V::Array(vec![int(10), int(1), V::Bytes(seller.spki())]),
        ]));
        // COSE_Sign1: protected {1: -7 (ES256)}, unprotected {}, Sig_structure with empty AAD.
        let protected = ser(&V::Map(vec![(int(1), int(-7))]));
        let tbs = ser(&V::Array(vec![
            V::Text("Signature1".into()),
            V::Bytes(protected.clone()),
            V::Bytes(vec![]),
            V::Bytes(payload.clone()),
        ]));
        let sig = mfg.sign(&rng, &tbs).unwrap();
        let entry0 = V::Tag(
            18,
            Box::new(V::Array(vec![
                V::Bytes(protected),
                V::Map(vec![]),
                V::Bytes(payload),
                V::Bytes(sig.as_ref().to_vec()),
            ])),
        );
        let entry0_bytes = ser(&entry0);

        // OwnershipVoucher = [OVProtVer, OVHeaderTag, OVHeaderHMac, OVDevCertChain, OVEntryArray]
        let voucher = ser(&V::Array(vec![
            int(101),
            V::Bytes(header_bytes.clone()),
            hmac,
            V::Array(vec![V::Bytes(dev_der), V::Bytes(ca_der)]),
            V::Array(vec![entry0]),
        ]));
        let pem_text = pem::encode(&pem::Pem::new("OWNERSHIP VOUCHER", voucher.clone()));
        assert!(pem_text.starts_with("-----BEGIN OWNERSHIP VOUCHER-----"));

        // We read it, byte for byte.
        let v = OwnershipVoucher::from_file_bytes(pem_text.as_bytes()).unwrap();
        assert_eq!(v.encode(), voucher);
        assert_eq!(v.entries()[0].raw(), entry0_bytes.as_slice());
        v.verify_with_secret(&secret).unwrap();
        let d = &v.header().rv_info.0[0];
        assert_eq!(d.dns().unwrap().as_deref(), Some("rv.other.example"));
        assert_eq!(d.dev_port().unwrap(), Some(8082));
        assert_eq!(d.protocol().unwrap(), Some(RvProtocol::Http));

        // The seller extends it to our owner certificate; we import it.
        let data = tempfile::tempdir().unwrap();
        let ours = current_or_create(data.path(), Curve::P256, "gw-test").unwrap();
        let to = PublicKey::encoded_like(
            &v.header().mfg_pub_key,
            &crypto::cert_public_key(&crypto::cert_der_from_pem(&ours.cert_pem).unwrap()).unwrap(),
            None,
        );
        let extended = v.extend(&seller, &to).unwrap();
        let store = Store::open(&data.path().join("store")).unwrap();
        let imported = import_voucher(&store, data.path(), extended.to_pem().as_bytes()).unwrap();
        assert_eq!(imported.guid, Guid(guid));
        assert_eq!(imported.entries, 2);
        assert_eq!(imported.owner_key_id, ours.key_id);
        assert!(!imported.replaced);
        let rec = store.voucher(&guid).unwrap().unwrap();
        assert_eq!(rec.voucher, extended.encode());
        assert_eq!(rec.device_info, device_info);
        // Not extended to us: refused.
        assert!(matches!(
            import_voucher(&store, data.path(), pem_text.as_bytes()),
            Err(FdoError::NotOurs { .. })
        ));
    }

    #[test]
    fn owner_keys_persist_rotate_and_stay_ours() {
        let data = tempfile::tempdir().unwrap();
        let a = current_or_create(data.path(), Curve::P256, "gw").unwrap();
        let again = current_or_create(data.path(), Curve::P256, "gw").unwrap();
        assert_eq!(a.key_id, again.key_id);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.path().join("owner.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A voucher extended to key A, then A is retired and B becomes current.
        let mfg_dir = tempfile::tempdir().unwrap();
        let (v, mfg_key) = device(mfg_dir.path(), Curve::P256);
        let v = v.extend(&mfg_key, &a.public_key()).unwrap();
        assert_eq!(
            retire_current(data.path(), Curve::P256).unwrap(),
            Some(a.key_id.clone())
        );
        let b = current_or_create(data.path(), Curve::P256, "gw").unwrap();
        assert_ne!(a.key_id, b.key_id);
        let p384 = current_or_create(data.path(), Curve::P384, "gw").unwrap();
        assert_eq!(all(data.path()).unwrap().len(), 3);
        assert!(data.path().join(format!("owner-{}.key", a.key_id)).exists());
        let store = Store::open(&data.path().join("store")).unwrap();
        let imported = import_voucher(&store, data.path(), &v.encode()).unwrap();
        assert_eq!(imported.owner_key_id, a.key_id);
        // Importing again replaces.
        assert!(
            import_voucher(&store, data.path(), &v.encode())
                .unwrap()
                .replaced
        );
        assert!(find(data.path(), &p384.public_key()).unwrap().is_some());
    }
}
