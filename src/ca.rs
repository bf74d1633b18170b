//! The local certificate authority.
//!
//! Owns the CA key (a 0600 file in the data dir), issues device certificates (from a CSR, so
//! the device key never leaves the device, or with a generated key for hand provisioning),
//! revokes them and keeps the CRL current. Every issued certificate is recorded in the store.
//!
//! [`Ca`] is the synchronous core (also used by the CLI when no gateway runs);
//! [`CaHandle`] talks to the owner thread that holds it inside a running gateway.

use crate::acl::validate_identity;
use crate::store::{CertRecord, Store, StoreError};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};

pub const CA_KEY: &str = "ca.key";
pub const CA_CERT: &str = "ca.crt";
pub const SERVER_KEY: &str = "server.key";
pub const SERVER_CERT: &str = "server.crt";
pub const CRL_FILE: &str = "crl.pem";

/// Renew the server certificate when less than this is left (or a third of its validity,
/// when that is shorter).
const SERVER_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Accept clocks this far behind ours.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("file {path}: {cause}")]
    File {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid CSR: {0}")]
    Csr(String),
    #[error("invalid device id {0:?}: 1..=128 characters of [A-Za-z0-9._:-]")]
    BadId(String),
    #[error("no certificate with serial {0}")]
    UnknownSerial(String),
    #[error("no certificate issued to device {0}")]
    UnknownDevice(String),
    #[error("{path} is not a usable CA certificate: {reason}")]
    BadCaFile { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the CA task has stopped")]
    Stopped,
}

/// Store table of revocations of certificates issued by other CAs.
pub const FOREIGN_REVOCATIONS: &str = "foreign-revocations";

/// A revoked certificate of another CA (e.g. the cloud's), learned through the sync.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ForeignRevocation {
    /// Lower-case hex, no leading zeros beyond what the issuer used.
    pub serial: String,
    pub device_id: String,
    /// Who issued it (`cloud <id>`, `gateway <id>`).
    pub issuer: String,
    pub reason: String,
    /// Unix seconds.
    pub revoked_at: i64,
}

/// What a revocation-aware verifier needs: the current CRL and the revoked serials.
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    pub crl_der: Vec<u8>,
    pub revoked: HashSet<String>,
}

/// A freshly issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub serial: String,
    pub cert_pem: String,
    /// Present when the CA generated the key (no CSR given).
    pub key_pem: Option<String>,
    pub ca_pem: String,
}

pub struct Ca {
    dir: PathBuf,
    gateway_id: String,
    cfg: CaConfig,
    key: KeyPair,
    cert_der: Vec<u8>,
    cert_pem: String,
    store: Store,
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::File {
        path: path.to_path_buf(),
        cause: source,
    }
}

/// Write a file atomically (temp + fsync + rename) with the given mode.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(file_err(&tmp))?;
    f.write_all(bytes).map_err(file_err(&tmp))?;
    f.sync_all().map_err(file_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(file_err(path))?;
    Ok(())
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Lower-case hex of a serial with leading zero bytes removed (DER may add one).
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex::encode(&raw[start..])
}

/// SHA-256 fingerprint of a DER certificate, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn pem_to_der(pem_text: &str, path: &Path) -> Result<Vec<u8>, CaError> {
    let mut rd = pem_text.as_bytes();
    let first = rustls_pemfile::certs(&mut rd).next();
    match first {
        Some(Ok(der)) => Ok(der.to_vec()),
        _ => Err(CaError::BadCaFile {
            path: path.to_path_buf(),
            reason: "no PEM certificate".into(),
        }),
    }
}

impl Ca {
    /// Open the CA in `dir`, creating the key and certificate on first use.
    pub fn open_or_create(
        dir: &Path,
        gateway_id: &str,
        cfg: &CaConfig,
        store: Store,
    ) -> Result<Ca, CaError> {
        std::fs::create_dir_all(dir).map_err(file_err(dir))?;
        let key_path = dir.join(CA_KEY);
        let cert_path = dir.join(CA_CERT);
        let (key, cert_pem) = if key_path.exists() && cert_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path).map_err(file_err(&key_path))?;
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(file_err(&cert_path))?;
            (KeyPair::from_pem(&key_pem)?, cert_pem)
        } else {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, format!("Outpost CA {gateway_id}"));
            dn.push(DnType::OrganizationName, "Outpost");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.serial_number = Some(random_serial());
            params.not_before = now() - BACKDATE;
            params.not_after = now() + cfg.ca_validity;
            let cert = params.self_signed(&key)?;
            write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
            tracing::info!(path = %cert_path.display(), "created gateway CA");
            (key, cert.pem())
        };
        let cert_der = pem_to_der(&cert_pem, &cert_path)?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            gateway_id: gateway_id.to_string(),
            cfg: cfg.clone(),
            key,
            cert_der,
            cert_pem,
            store,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn ca_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Ok(Issuer::from_ca_cert_der(
            &self.cert_der.clone().into(),
            &self.key,
        )?)
    }

    fn unique_serial(&self) -> Result<SerialNumber, CaError> {
        loop {
            let s = random_serial();
            if self.store.cert(&serial_hex(s.as_ref()))?.is_none() {
                return Ok(s);
            }
        }
    }

    /// Issue a device certificate for `id`. With a CSR the device keeps its key; without one,
    /// a P-256 key is generated and returned (for provisioning by hand).
    pub fn issue_device(&self, id: &str, csr_pem: Option<&str>) -> Result<Issued, CaError> {
        validate_identity(id).map_err(|_| CaError::BadId(id.to_string()))?;
        let serial = self.unique_serial()?;
        let serial_text = serial_hex(serial.as_ref());
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id);
        dn.push(DnType::OrganizationName, "Outpost device");
        params.distinguished_name = dn;
        let uri = format!("urn:outpost:device:{id}");
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let not_before = now() - BACKDATE;
        let not_after = now() + self.cfg.device_validity;
        params.not_before = not_before;
        params.not_after = not_after;
        let issuer = self.issuer()?;
        let (cert, key_pem, source) = match csr_pem {
            Some(csr) => {
                // The CSR's own extensions (SAN, usages, CA flag) are discarded: only its
                // public key is used, with our parameters.
                let parsed = CertificateSigningRequestParams::from_pem(csr)
                    .map_err(|e| CaError::Csr(e.to_string()))?;
                let req = CertificateSigningRequestParams {
                    params,
                    public_key: parsed.public_key,
                };
                (req.signed_by(&issuer)?, None, "csr")
            }
            None => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                let cert = params.signed_by(&key, &issuer)?;
                (cert, Some(key.serialize_pem()), "generated")
            }
        };
        let rec = CertRecord {
            serial: serial_text.clone(),
            device_id: id.to_string(),
            not_before: not_before.unix_timestamp(),
            not_after: not_after.unix_timestamp(),
            issued_at: now().unix_timestamp(),
            revoked_at: None,
            key_source: source.to_string(),
            cert_pem: cert.pem(),
        };
        self.store.put_cert(&rec)?;
        tracing::info!(device = id, serial = %serial_text, key_source = source, "issued device certificate");
        Ok(Issued {
            serial: serial_text,
            cert_pem: rec.cert_pem,
            key_pem,
            ca_pem: self.cert_pem.clone(),
        })
    }

    /// Revoke one certificate by serial. Revoking twice is not an error.
    pub fn revoke_serial(&self, serial: &str) -> Result<CertRecord, CaError> {
        let serial = serial.trim().trim_start_matches("0x").to_ascii_lowercase();
        let serial =
            serial_hex(&hex::decode(&serial).map_err(|_| CaError::UnknownSerial(serial.clone()))?);
        let mut rec = self
            .store
            .cert(&serial)?
            .ok_or_else(|| CaError::UnknownSerial(serial.clone()))?;
        if rec.revoked_at.is_none() {
            rec.revoked_at = Some(now().unix_timestamp());
            self.store.put_cert(&rec)?;
            tracing::warn!(device = %rec.device_id, serial = %rec.serial, "revoked certificate");
        }
        Ok(rec)
    }

    /// Revoke every certificate issued to a device.
    pub fn revoke_device(&self, id: &str) -> Result<Vec<CertRecord>, CaError> {
        let recs = self.store.certs_for_device(id)?;
        if recs.is_empty() {
            return Err(CaError::UnknownDevice(id.to_string()));
        }
        recs.iter().map(|r| self.revoke_serial(&r.serial)).collect()
    }

    pub fn list(&self) -> Result<Vec<CertRecord>, CaError> {
        Ok(self.store.certs()?)
    }

    /// Record the revocation of a certificate another CA issued (one this gateway trusts for
    /// client certificates, e.g. the cloud's): the front door refuses its serial from now on.
    /// Idempotent. Flushed before it returns.
    pub fn revoke_foreign(&self, r: &ForeignRevocation) -> Result<bool, CaError> {
        let serial = r
            .serial
            .trim()
            .trim_start_matches("0x")
            .to_ascii_lowercase();
        let serial =
            serial_hex(&hex::decode(&serial).map_err(|_| CaError::UnknownSerial(serial.clone()))?);
        let t = self.store.table(FOREIGN_REVOCATIONS)?;
        if t.contains(serial.as_bytes())? {
            return Ok(false);
        }
        let rec = ForeignRevocation {
            serial: serial.clone(),
            ..r.clone()
        };
        let json = serde_json::to_vec(&rec).map_err(|e| StoreError::Db(e.to_string()))?;
        t.put(serial.as_bytes(), &json)?;
        tracing::warn!(device = %rec.device_id, serial = %serial, issuer = %rec.issuer, reason = %rec.reason, "revoked certificate of another CA");
        Ok(true)
    }

    /// Revocations of other CAs' certificates, by serial.
    pub fn foreign_revocations(&self) -> Result<Vec<ForeignRevocation>, CaError> {
        let t = self.store.table(FOREIGN_REVOCATIONS)?;
        let mut out = Vec::new();
        for (k, v) in t.entries()? {
            match serde_json::from_slice(&v) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(serial = %String::from_utf8_lossy(&k), error = %e, "unreadable foreign revocation")
                }
            }
        }
        Ok(out)
    }

    /// Sign a fresh CRL from the store, write `crl.pem`, and return the revocation state.
    pub fn refresh_crl(&self) -> Result<Revocations, CaError> {
        let revoked_recs: Vec<CertRecord> = self
            .store
            .certs()?
            .into_iter()
            .filter(|r| r.revoked_at.is_some())
            .collect();
        let mut revoked_certs = Vec::with_capacity(revoked_recs.len());
        let mut revoked = HashSet::new();
        for r in &revoked_recs {
            let bytes = hex::decode(&r.serial).map_err(|_| StoreError::Corrupt {
                key: format!("certs/{}", r.serial),
                reason: "serial is not hex".into(),
            })?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: OffsetDateTime::from_unix_timestamp(r.revoked_at.unwrap_or(0))
                    .unwrap_or_else(|_| now()),
                reason_code: None,
                invalidity_date: None,
            });
            revoked.insert(r.serial.clone());
        }
        // Not in our CRL (they are not ours to sign for), but refused all the same.
        for f in self.foreign_revocations()? {
            revoked.insert(f.serial);
        }
        let number = self.store.next_crl_number()?;
        let params = CertificateRevocationListParams {
            this_update: now() - BACKDATE,
            next_update: now() + self.cfg.crl_validity,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer()?)?;
        write_file(&self.dir.join(CRL_FILE), crl.pem()?.as_bytes(), 0o644)?;
        Ok(Revocations {
            crl_der: crl.der().to_vec(),
            revoked,
        })
    }

    /// The gateway's TLS server certificate chain and key, created or renewed as needed.
    pub fn server_identity(&self, extra_names: &[String]) -> Result<(String, String), CaError> {
        let cert_path = self.dir.join(SERVER_CERT);
        let key_path = self.dir.join(SERVER_KEY);
        let mut names: Vec<String> = vec![
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
            "outpost.local".into(),
            format!("{}.local", self.gateway_id),
        ];
        if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
            let h = h.trim();
            if !h.is_empty() && h.is_ascii() {
                names.push(h.to_string());
                names.push(format!("{h}.local"));
            }
        }
        names.extend(extra_names.iter().cloned());
        names.sort();
        names.dedup();
        if let (Ok(cert), Ok(key)) = (
            std::fs::read_to_string(&cert_path),
            std::fs::read_to_string(&key_path),
        ) {
            let renew_before = SERVER_RENEW_BEFORE.min(self.cfg.server_validity / 3);
            if server_cert_still_good(&cert, &names, &self.cert_der, renew_before) {
                return Ok((cert, key));
            }
            tracing::info!("server certificate expiring, changed or foreign: issuing a new one");
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.gateway_id.as_str());
        dn.push(DnType::OrganizationName, "Outpost gateway");
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(self.unique_serial()?);
        params.use_authority_key_identifier_extension = true;
        params.not_before = now() - BACKDATE;
        params.not_after = now() + self.cfg.server_validity;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive INTEGER
    if b[0] == 0 {
        b[0] = 1; // keep all 16 bytes significant
    }
    SerialNumber::from_slice(&b)
}

fn server_cert_still_good(
    cert_pem: &str,
    names: &[String],
    ca_der: &[u8],
    renew_before: Duration,
) -> bool {
    let Ok(der) = pem_to_der(cert_pem, Path::new(SERVER_CERT)) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    let Ok((_, ca)) = x509_parser::parse_x509_certificate(ca_der) else {
        return false;
    };
    if cert.issuer() != ca.subject() || cert.verify_signature(Some(ca.public_key())).is_err() {
        return false;
    }
    let left = cert.validity().not_after.timestamp() - now().unix_timestamp();
    if left < renew_before.as_secs() as i64 {
        return false;
    }
    let mut have: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => <[u8; 4]>::try_from(*b)
                        .ok()
                        .map(|a| IpAddr::from(a).to_string()),
                    16 => <[u8; 16]>::try_from(*b)
                        .ok()
                        .map(|a| IpAddr::from(a).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        _ => return false,
    };
    have.sort();
    have.dedup();
    have == names
}

// ---------------------------------------------------------------------------------------------
// Owner thread and handle

enum Command {
    Issue {
        id: String,
        csr: Option<String>,
        reply: oneshot::Sender<Result<Issued, CaError>>,
    },
    RevokeSerial {
        serial: String,
        reply: oneshot::Sender<Result<Vec<CertRecord>, CaError>>,
    },
    RevokeDevice {
        id: String,
        reply: oneshot::Sender<Result<Vec<CertRecord>, CaError>>,
    },
    List {
        reply: oneshot::Sender<Result<Vec<CertRecord>, CaError>>,
    },
    ServerIdentity {
        names: Vec<String>,
        reply: oneshot::Sender<Result<(String, String), CaError>>,
    },
    RevokeForeign {
        rev: ForeignRevocation,
        reply: oneshot::Sender<Result<bool, CaError>>,
    },
    /// Whether this CA issued the serial.
    Issued {
        serial: String,
        reply: oneshot::Sender<Result<bool, CaError>>,
    },
    RefreshCrl,
}

/// What the CA did, for those that keep an inventory of it (`credentials/`). Sent after
/// the store write is durable; a receiver that lags reconciles from the store.
#[derive(Debug, Clone)]
pub enum CaEvent {
    Issued(CertRecord),
    Revoked(CertRecord),
}

/// Cheap, clonable access to the running CA.
#[derive(Clone)]
pub struct CaHandle {
    tx: mpsc::Sender<Command>,
    events: tokio::sync::broadcast::Sender<CaEvent>,
    revocations: watch::Receiver<Arc<Revocations>>,
    ca_pem: Arc<str>,
    ca_der: Arc<[u8]>,
}

impl CaHandle {
    /// Start the owner thread. The CA does blocking file and store I/O, so it lives on its own
    /// OS thread rather than on the async runtime.
    pub fn spawn(ca: Ca) -> Result<(CaHandle, std::thread::JoinHandle<()>), CaError> {
        let initial = ca.refresh_crl()?;
        let (rev_tx, rev_rx) = watch::channel(Arc::new(initial));
        let (tx, mut rx) = mpsc::channel::<Command>(64);
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let ev = events.clone();
        let handle = CaHandle {
            tx,
            events,
            revocations: rev_rx,
            ca_pem: Arc::from(ca.ca_pem()),
            ca_der: Arc::from(ca.ca_der()),
        };
        let join = std::thread::Builder::new()
            .name("outpost-ca".into())
            .spawn(move || {
                let publish = |ca: &Ca| match ca.refresh_crl() {
                    Ok(r) => {
                        rev_tx.send_replace(Arc::new(r));
                    }
                    Err(e) => tracing::error!(error = %e, "cannot refresh CRL"),
                };
                while let Some(cmd) = rx.blocking_recv() {
                    match cmd {
                        Command::Issue { id, csr, reply } => {
                            let r = ca.issue_device(&id, csr.as_deref());
                            if let Ok(i) = &r {
                                if let Ok(Some(rec)) = ca.store().cert(&i.serial) {
                                    let _ = ev.send(CaEvent::Issued(rec));
                                }
                            }
                            let _ = reply.send(r);
                        }
                        Command::RevokeSerial { serial, reply } => {
                            let r = ca.revoke_serial(&serial).map(|r| vec![r]);
                            if let Ok(recs) = &r {
                                publish(&ca);
                                for rec in recs {
                                    let _ = ev.send(CaEvent::Revoked(rec.clone()));
                                }
                            }
                            let _ = reply.send(r);
                        }
                        Command::RevokeDevice { id, reply } => {
                            let r = ca.revoke_device(&id);
                            if let Ok(recs) = &r {
                                publish(&ca);
                                for rec in recs {
                                    let _ = ev.send(CaEvent::Revoked(rec.clone()));
                                }
                            }
                            let _ = reply.send(r);
                        }
                        Command::List { reply } => {
                            let _ = reply.send(ca.list());
                        }
                        Command::ServerIdentity { names, reply } => {
                            let _ = reply.send(ca.server_identity(&names));
                        }
                        Command::RevokeForeign { rev, reply } => {
                            let r = ca.revoke_foreign(&rev);
                            if matches!(r, Ok(true)) {
                                publish(&ca);
                            }
                            let _ = reply.send(r);
                        }
                        Command::Issued { serial, reply } => {
                            let _ = reply.send(
                                ca.store()
                                    .cert(&serial)
                                    .map(|c| c.is_some())
                                    .map_err(CaError::from),
                            );
                        }
                        Command::RefreshCrl => publish(&ca),
                    }
                }
                if let Err(e) = ca.store().flush() {
                    tracing::error!(error = %e, "store flush at CA shutdown failed");
                }
            })
            .map_err(|source| CaError::File {
                path: PathBuf::from("<thread>"),
                cause: source,
            })?;
        Ok((handle, join))
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, CaError>>) -> Command,
    ) -> Result<T, CaError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| CaError::Stopped)?;
        rx.await.map_err(|_| CaError::Stopped)?
    }

    pub async fn issue_device(&self, id: &str, csr: Option<String>) -> Result<Issued, CaError> {
        let id = id.to_string();
        self.ask(|reply| Command::Issue { id, csr, reply }).await
    }

    pub async fn revoke_serial(&self, serial: &str) -> Result<Vec<CertRecord>, CaError> {
        let serial = serial.to_string();
        self.ask(|reply| Command::RevokeSerial { serial, reply })
            .await
    }

    pub async fn revoke_device(&self, id: &str) -> Result<Vec<CertRecord>, CaError> {
        let id = id.to_string();
        self.ask(|reply| Command::RevokeDevice { id, reply }).await
    }

    pub async fn list(&self) -> Result<Vec<CertRecord>, CaError> {
        self.ask(|reply| Command::List { reply }).await
    }

    /// See [`Ca::revoke_foreign`]; `Ok(false)`: already revoked.
    pub async fn revoke_foreign(&self, rev: ForeignRevocation) -> Result<bool, CaError> {
        self.ask(|reply| Command::RevokeForeign { rev, reply })
            .await
    }

    /// Whether this CA issued `serial` (lower-case hex).
    pub async fn issued(&self, serial: &str) -> Result<bool, CaError> {
        let serial = serial.to_string();
        self.ask(|reply| Command::Issued { serial, reply }).await
    }

    /// The current TLS server certificate and key (renewed by the CA when due).
    pub async fn server_identity(&self, names: &[String]) -> Result<(String, String), CaError> {
        let names = names.to_vec();
        self.ask(|reply| Command::ServerIdentity { names, reply })
            .await
    }

    pub async fn refresh_crl(&self) -> Result<(), CaError> {
        self.tx
            .send(Command::RefreshCrl)
            .await
            .map_err(|_| CaError::Stopped)
    }

    /// Every issuance and revocation from now on (see [`CaEvent`]).
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<CaEvent> {
        self.events.subscribe()
    }

    /// Follows every change of the CRL.
    pub fn revocations(&self) -> watch::Receiver<Arc<Revocations>> {
        self.revocations.clone()
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }
}

// --- configuration section

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CaConfig {
    /// Validity of device certificates the CA issues.
    #[serde(with = "crate::duration")]
    pub device_validity: Duration,
    /// Validity of the gateway CA certificate created on first start.
    #[serde(with = "crate::duration")]
    pub ca_validity: Duration,
    /// Validity of the gateway's own TLS server certificate.
    #[serde(with = "crate::duration")]
    pub server_validity: Duration,
    /// Extra DNS names or IP addresses for the server certificate (localhost, 127.0.0.1,
    /// ::1, the host name and `outpost.local` are always included).
    pub server_names: Vec<String>,
    /// How long each published CRL is valid (it is re-signed well before).
    #[serde(with = "crate::duration")]
    pub crl_validity: Duration,
}

const DAY: u64 = 24 * 3600;

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            // Field advice: validity at least 3x the longest expected outage.
            device_validity: Duration::from_secs(365 * DAY),
            ca_validity: Duration::from_secs(20 * 365 * DAY),
            server_validity: Duration::from_secs(2 * 365 * DAY),
            server_names: Vec::new(),
            crl_validity: Duration::from_secs(7 * DAY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(dir: &Path) -> Ca {
        let store = Store::open(&dir.join("store")).unwrap();
        Ca::open_or_create(dir, "gw-test", &CaConfig::default(), store).unwrap()
    }

    fn parse(pem: &str) -> Vec<u8> {
        pem_to_der(pem, Path::new("x")).unwrap()
    }

    #[test]
    fn ca_key_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ca(dir.path()).ca_pem().to_string();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ca(dir.path()).ca_pem(), first);
    }

    #[test]
    fn csr_extensions_are_overwritten_and_serials_are_random() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        // A hostile CSR asking to be a CA with a server name.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let a = ca.issue_device("dev-1", Some(&csr)).unwrap();
        let b = ca.issue_device("dev-1", Some(&csr)).unwrap();
        assert_ne!(a.serial, b.serial, "same key must still get a fresh serial");
        assert_eq!(a.serial.len(), 32);
        assert!(a.key_pem.is_none());
        let der = parse(&a.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "dev-1");
        let san = format!(
            "{:?}",
            cert.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(!san.contains("evil"), "{san}");
        assert_eq!(
            cert.public_key().raw,
            x509_parser::parse_x509_certificate(&parse(&b.cert_pem))
                .unwrap()
                .1
                .public_key()
                .raw
        );
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86400;
        assert!((364..=366).contains(&days), "{days}");
    }

    #[test]
    fn revocation_lands_in_crl_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let serial = {
            let ca = ca(dir.path());
            let i = ca.issue_device("dev-2", None).unwrap();
            assert!(i.key_pem.is_some());
            ca.revoke_device("dev-2").unwrap();
            i.serial
        };
        let ca = ca(dir.path());
        let rev = ca.refresh_crl().unwrap();
        assert!(rev.revoked.contains(&serial));
        let (_, crl) = x509_parser::parse_x509_crl(&rev.crl_der).unwrap();
        let listed: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| serial_hex(r.raw_serial()))
            .collect();
        assert_eq!(listed, vec![serial]);
        assert!(matches!(
            ca.revoke_serial("00ff"),
            Err(CaError::UnknownSerial(_))
        ));
    }

    #[test]
    fn bad_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ca(dir.path()).issue_device("a/#", None),
            Err(CaError::BadId(_))
        ));
    }

    #[test]
    fn server_cert_is_renewed_when_less_than_the_threshold_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let short = CaConfig {
            server_validity: Duration::from_secs(3 * 3600),
            ..CaConfig::default()
        };
        let ca = Ca::open_or_create(dir.path(), "gw-test", &short, store).unwrap();
        let (c1, _) = ca.server_identity(&[]).unwrap();
        // 3 h left, threshold a third of 3 h: kept.
        assert_eq!(ca.server_identity(&[]).unwrap().0, c1);
        drop(ca);
        let store = Store::open(&dir.path().join("store")).unwrap();
        let ca = Ca::open_or_create(dir.path(), "gw-test", &CaConfig::default(), store).unwrap();
        // With the default 2-year validity the threshold is 30 days: 3 h left is due.
        assert_ne!(ca.server_identity(&[]).unwrap().0, c1);
    }

    #[test]
    fn server_cert_is_kept_until_it_needs_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path());
        let (c1, _) = ca.server_identity(&[]).unwrap();
        let (c2, _) = ca.server_identity(&[]).unwrap();
        assert_eq!(c1, c2);
        let (c3, _) = ca.server_identity(&["gw.example".into()]).unwrap();
        assert_ne!(c1, c3);
    }
}
