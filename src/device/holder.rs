//! The device agent's side of credential management (docs/credentials.md): what it reports
//! at check-in, and how it carries out renew, invalidate, delete and rotate.
//!
//! State in the agent's directory, beside the MQTT credentials:
//! * `keys.json` (0600): the symmetric keys it holds, `{"keys":[{"id","server","secret"}]}`
//!   (secret in hex);
//! * `jobs.json`: the final answer of the last [`MAX_DONE`] jobs, so a command delivered
//!   twice (a lost answer, a restart) gets the same answer and is not done twice;
//! * `mqtt.key.pending` (0600) + `renew.json`: the new key of a renewal between its CSR and
//!   its certificate. The key never leaves the device.

use super::{DeviceError, MQTT_CA, MQTT_CERT, MQTT_KEY, MQTT_STATE};
use crate::credentials::model::{JobState, Kind};
use crate::credentials::msg::{Held, JobUpdate, Report, ToDevice, VERSION};
use crate::credentials::seal::{Opener, Sealed};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const KEYS: &str = "keys.json";
pub const JOBS: &str = "jobs.json";
const PENDING_KEY: &str = "mqtt.key.pending";
const RENEW: &str = "renew.json";
/// Answers kept for repeated commands.
pub const MAX_DONE: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Key {
    pub id: String,
    pub server: String,
    /// Hex.
    pub secret: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Keys {
    keys: Vec<Key>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Done {
    /// Oldest first.
    done: Vec<JobUpdate>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Renewal {
    job: String,
    csr: String,
}

/// What the agent must do after a command.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Updates to publish on the job topic.
    pub updates: Vec<JobUpdate>,
    /// A new MQTT certificate is installed: reconnect with it.
    pub reconnect: bool,
    /// The MQTT credential is gone: publish the updates, then stop.
    pub stop: bool,
}

pub struct Holder {
    dir: PathBuf,
    client_id: String,
    openers: HashMap<String, Opener>,
}

fn err(p: &Path) -> impl FnOnce(String) -> DeviceError + '_ {
    move |reason| DeviceError::State {
        path: p.to_path_buf(),
        reason,
    }
}

fn update(job: &str, state: JobState) -> JobUpdate {
    JobUpdate {
        v: VERSION,
        job: job.to_string(),
        state,
        reason: None,
        csr: None,
        epk: None,
        new_id: None,
    }
}

fn failed(job: &str, why: &str) -> JobUpdate {
    JobUpdate {
        reason: Some(why.to_string()),
        ..update(job, JobState::Failed)
    }
}

impl Holder {
    pub fn new(dir: &Path, client_id: &str) -> Holder {
        Holder {
            dir: dir.to_path_buf(),
            client_id: client_id.to_string(),
            openers: HashMap::new(),
        }
    }

    fn read_json<T: for<'de> Deserialize<'de> + Default>(
        &self,
        name: &str,
    ) -> Result<T, DeviceError> {
        let p = self.dir.join(name);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| err(&p)(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(e) => Err(err(&p)(e.to_string())),
        }
    }

    fn write(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), DeviceError> {
        let p = self.dir.join(name);
        crate::ca::write_file(&p, bytes, mode).map_err(|e| err(&p)(e.to_string()))
    }

    fn write_json<T: Serialize>(&self, name: &str, v: &T, mode: u32) -> Result<(), DeviceError> {
        let b =
            serde_json::to_vec_pretty(v).map_err(|e| err(&self.dir.join(name))(e.to_string()))?;
        self.write(name, &b, mode)
    }

    pub fn keys(&self) -> Result<Vec<Key>, DeviceError> {
        Ok(self.read_json::<Keys>(KEYS)?.keys)
    }

    /// The serial (hex), issuer CN, fingerprint and dates of the MQTT certificate.
    fn mqtt_cert(&self) -> Result<Option<Held>, DeviceError> {
        let p = self.dir.join(MQTT_CERT);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(&p)(e.to_string())),
        };
        let der = pem::parse(&text).map_err(|e| err(&p)(e.to_string()))?;
        let (_, x) = x509_parser::parse_x509_certificate(der.contents())
            .map_err(|e| err(&p)(e.to_string()))?;
        let issuer = x
            .issuer()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .map(str::to_string);
        Ok(Some(Held {
            kind: Kind::Certificate,
            id: crate::ca::serial_hex(x.raw_serial()),
            server: "gateway".into(),
            issuer,
            fingerprint: Some(crate::ca::fingerprint(der.contents())),
            not_before: Some(x.validity().not_before.timestamp()),
            not_after: Some(x.validity().not_after.timestamp()),
        }))
    }

    /// The check-in report: the MQTT certificate and every key.
    pub fn report(&self) -> Result<Report, DeviceError> {
        let mut credentials = Vec::new();
        if let Some(c) = self.mqtt_cert()? {
            credentials.push(c);
        }
        for k in self.keys()? {
            credentials.push(Held {
                kind: Kind::SymmetricKey,
                id: k.id,
                server: k.server,
                issuer: None,
                fingerprint: None,
                not_before: None,
                not_after: None,
            });
        }
        credentials.truncate(crate::credentials::msg::MAX_REPORTED);
        Ok(Report {
            v: VERSION,
            credentials,
        })
    }

    fn done(&self, job: &str) -> Result<Option<JobUpdate>, DeviceError> {
        Ok(self
            .read_json::<Done>(JOBS)?
            .done
            .into_iter()
            .find(|u| u.job == job))
    }

    fn remember(&self, u: &JobUpdate) -> Result<(), DeviceError> {
        let mut d = self.read_json::<Done>(JOBS)?;
        d.done.retain(|x| x.job != u.job);
        d.done.push(u.clone());
        while d.done.len() > MAX_DONE {
            d.done.remove(0);
        }
        self.write_json(JOBS, &d, 0o600)
    }

    /// Carry out one command (idempotent per job).
    pub fn handle(&mut self, cmd: ToDevice) -> Result<Outcome, DeviceError> {
        let job = cmd.job().to_string();
        if let Some(u) = self.done(&job)? {
            // Seen and finished: the same answer again.
            return Ok(Outcome {
                updates: vec![u],
                ..Outcome::default()
            });
        }
        let mut out = Outcome::default();
        match cmd {
            ToDevice::Renew { serial, .. } => {
                let mine = self.mqtt_cert()?.map(|h| h.id);
                if mine.as_deref()
                    != Some(crate::credentials::service::normal_serial(&serial).as_str())
                {
                    let u = failed(&job, "this device does not hold that certificate");
                    self.remember(&u)?;
                    out.updates.push(u);
                    return Ok(out);
                }
                // The same CSR for a repeated command; a new key only for a new job.
                let r: Option<Renewal> = match std::fs::read(self.dir.join(RENEW)) {
                    Ok(b) => serde_json::from_slice(&b).ok(),
                    Err(_) => None,
                };
                let csr = match r {
                    Some(r) if r.job == job && self.dir.join(PENDING_KEY).exists() => r.csr,
                    _ => {
                        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                            .map_err(|e| DeviceError::Tls(e.to_string()))?;
                        let mut params = rcgen::CertificateParams::default();
                        let mut dn = rcgen::DistinguishedName::new();
                        dn.push(rcgen::DnType::CommonName, self.client_id.as_str());
                        params.distinguished_name = dn;
                        let csr = params
                            .serialize_request(&key)
                            .and_then(|c| c.pem())
                            .map_err(|e| DeviceError::Tls(e.to_string()))?;
                        self.write(PENDING_KEY, key.serialize_pem().as_bytes(), 0o600)?;
                        self.write_json(
                            RENEW,
                            &Renewal {
                                job: job.clone(),
                                csr: csr.clone(),
                            },
                            0o600,
                        )?;
                        csr
                    }
                };
                out.updates.push(JobUpdate {
                    csr: Some(csr),
                    ..update(&job, JobState::InProgress)
                });
            }
            ToDevice::Issued {
                serial,
                cert_pem,
                ca_pem,
                ..
            } => {
                let r: Option<Renewal> = match std::fs::read(self.dir.join(RENEW)) {
                    Ok(b) => serde_json::from_slice(&b).ok(),
                    Err(_) => None,
                };
                let key_pem = std::fs::read_to_string(self.dir.join(PENDING_KEY)).ok();
                let (Some(r), Some(key_pem)) = (r, key_pem) else {
                    let u = failed(&job, "no renewal in progress for this job");
                    out.updates.push(u);
                    return Ok(out);
                };
                if r.job != job {
                    out.updates
                        .push(failed(&job, "no renewal in progress for this job"));
                    return Ok(out);
                }
                // The certificate must be for our new key.
                let key = rcgen::KeyPair::from_pem(&key_pem)
                    .map_err(|e| DeviceError::Tls(e.to_string()))?;
                let der = pem::parse(&cert_pem).map_err(|e| DeviceError::Tls(e.to_string()))?;
                let (_, x) = x509_parser::parse_x509_certificate(der.contents())
                    .map_err(|e| DeviceError::Tls(e.to_string()))?;
                if x.public_key().raw
                    != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
                {
                    let u = failed(&job, "the certificate is not for the key this device made");
                    self.remember(&u)?;
                    out.updates.push(u);
                    return Ok(out);
                }
                // Install: CA, certificate, then the key (renamed into place).
                self.write(MQTT_CA, ca_pem.as_bytes(), 0o644)?;
                self.write(MQTT_CERT, cert_pem.as_bytes(), 0o644)?;
                let (from, to) = (self.dir.join(PENDING_KEY), self.dir.join(MQTT_KEY));
                std::fs::rename(&from, &to).map_err(|e| err(&to)(e.to_string()))?;
                let _ = std::fs::remove_file(self.dir.join(RENEW));
                let u = JobUpdate {
                    new_id: Some(serial),
                    ..update(&job, JobState::Succeeded)
                };
                self.remember(&u)?;
                out.updates.push(u);
                out.reconnect = true;
            }
            ToDevice::Invalidate { kind, id, .. } | ToDevice::Delete { kind, id, .. } => {
                let u = self.delete(&job, kind, &id, &mut out)?;
                self.remember(&u)?;
                out.updates.push(u);
            }
            ToDevice::Rotate { id, .. } => {
                if !self.keys()?.iter().any(|k| k.id == id) {
                    let u = failed(&job, "this device does not hold that key");
                    self.remember(&u)?;
                    out.updates.push(u);
                    return Ok(out);
                }
                let o = Opener::new().map_err(|e| DeviceError::Tls(e.to_string()))?;
                let epk = o.public_hex.clone();
                self.openers.insert(job.clone(), o);
                out.updates.push(JobUpdate {
                    epk: Some(epk),
                    ..update(&job, JobState::InProgress)
                });
            }
            ToDevice::Key {
                replaces,
                new_id,
                server,
                epk,
                nonce,
                sealed,
                ..
            } => {
                let Some(o) = self.openers.remove(&job) else {
                    // A restart lost the private half: the gateway's retry starts over.
                    out.updates
                        .push(failed(&job, "no rotation in progress for this job"));
                    return Ok(out);
                };
                let u = match o.open(&job, &new_id, &Sealed { epk, nonce, sealed }) {
                    Ok(secret) => {
                        let mut k = self.read_json::<Keys>(KEYS)?;
                        k.keys.retain(|x| x.id != replaces);
                        k.keys.push(Key {
                            id: new_id.clone(),
                            server,
                            secret: hex::encode(secret),
                        });
                        self.write_json(KEYS, &k, 0o600)?;
                        JobUpdate {
                            new_id: Some(new_id),
                            ..update(&job, JobState::Succeeded)
                        }
                    }
                    Err(e) => failed(&job, &e.to_string()),
                };
                self.remember(&u)?;
                out.updates.push(u);
            }
            ToDevice::Cancel { job } => {
                self.openers.remove(&job);
                let r: Option<Renewal> = std::fs::read(self.dir.join(RENEW))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                if r.is_some_and(|r| r.job == job) {
                    let _ = std::fs::remove_file(self.dir.join(PENDING_KEY));
                    let _ = std::fs::remove_file(self.dir.join(RENEW));
                }
            }
        }
        Ok(out)
    }

    fn delete(
        &mut self,
        job: &str,
        kind: Kind,
        id: &str,
        out: &mut Outcome,
    ) -> Result<JobUpdate, DeviceError> {
        match kind {
            Kind::Certificate | Kind::ForeignCertificate => {
                let mine = self.mqtt_cert()?.map(|h| h.id);
                if mine.as_deref() != Some(crate::credentials::service::normal_serial(id).as_str())
                {
                    return Ok(failed(job, "this device does not hold that certificate"));
                }
                for f in [MQTT_KEY, MQTT_CERT, MQTT_STATE, PENDING_KEY, RENEW] {
                    let p = self.dir.join(f);
                    match std::fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(err(&p)(e.to_string())),
                    }
                }
                out.stop = true;
                Ok(update(job, JobState::Succeeded))
            }
            _ => {
                let mut k = self.read_json::<Keys>(KEYS)?;
                let before = k.keys.len();
                k.keys.retain(|x| x.id != id);
                if k.keys.len() == before {
                    return Ok(failed(job, "this device does not hold that key"));
                }
                self.write_json(KEYS, &k, 0o600)?;
                Ok(update(job, JobState::Succeeded))
            }
        }
    }
}
