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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Ca, CaConfig};
    use crate::credentials::seal;
    use crate::store::Store;
    use x509_parser::prelude::FromDer;

    const DEVICE: &str = "dev-1";

    /// A device directory with an MQTT certificate from a real CA and two keys.
    struct Rig {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        ca: Ca,
        first: crate::ca::Issued,
    }

    fn rig() -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store")).unwrap();
        let ca = Ca::open_or_create(&tmp.path().join("ca"), "gw-1", &CaConfig::default(), store)
            .unwrap();
        let first = ca.issue_device(DEVICE, None).unwrap();
        let dir = tmp.path().join("device");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(MQTT_CERT), &first.cert_pem).unwrap();
        std::fs::write(dir.join(MQTT_KEY), first.key_pem.as_ref().unwrap()).unwrap();
        std::fs::write(dir.join(MQTT_CA), ca.ca_pem()).unwrap();
        std::fs::write(dir.join(MQTT_STATE), b"{}").unwrap();
        let keys = Keys {
            keys: vec![
                Key {
                    id: "secoc-0x123".into(),
                    server: "ecu-bus".into(),
                    secret: "00".repeat(16),
                },
                Key {
                    id: "ota-psk".into(),
                    server: "ota".into(),
                    secret: "11".repeat(32),
                },
            ],
        };
        std::fs::write(dir.join(KEYS), serde_json::to_vec(&keys).unwrap()).unwrap();
        Rig {
            _tmp: tmp,
            dir,
            ca,
            first,
        }
    }

    fn holder(r: &Rig) -> Holder {
        Holder::new(&r.dir, DEVICE)
    }

    fn one(out: &Outcome) -> &JobUpdate {
        assert_eq!(out.updates.len(), 1, "one update: {:?}", out.updates);
        &out.updates[0]
    }

    fn read(r: &Rig, name: &str) -> Option<Vec<u8>> {
        std::fs::read(r.dir.join(name)).ok()
    }

    fn renew(job: &str, serial: &str) -> ToDevice {
        ToDevice::Renew {
            job: job.into(),
            serial: serial.into(),
            server: "gateway".into(),
        }
    }

    fn issued(job: &str, replaces: &str, i: &crate::ca::Issued) -> ToDevice {
        ToDevice::Issued {
            job: job.into(),
            replaces: replaces.into(),
            serial: i.serial.clone(),
            cert_pem: i.cert_pem.clone(),
            ca_pem: i.ca_pem.clone(),
        }
    }

    /// The SubjectPublicKeyInfo (DER) a CSR asks for.
    fn csr_spki(csr: &str) -> Vec<u8> {
        let der = pem::parse(csr).unwrap();
        let (_, req) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der.contents())
                .unwrap();
        req.certification_request_info.subject_pki.raw.to_vec()
    }

    fn key_spki(key_pem: &str) -> Vec<u8> {
        let k = rcgen::KeyPair::from_pem(key_pem).unwrap();
        rcgen::PublicKeyData::subject_public_key_info(&k)
    }

    /// Renew for `job`: the CSR the holder answers with.
    fn csr_for(h: &mut Holder, job: &str, serial: &str) -> String {
        let out = h.handle(renew(job, serial)).unwrap();
        let u = one(&out);
        assert_eq!(u.state, JobState::InProgress, "{u:?}");
        u.csr.clone().expect("a CSR")
    }

    #[test]
    fn the_report_lists_the_certificate_and_the_keys() {
        let r = rig();
        let rep = holder(&r).report().unwrap();
        assert_eq!(rep.v, VERSION);
        assert_eq!(rep.credentials.len(), 3, "{rep:?}");
        let c = &rep.credentials[0];
        let der = pem::parse(&r.first.cert_pem).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(der.contents()).unwrap();
        assert_eq!(c.kind, Kind::Certificate);
        assert_eq!(c.id, crate::ca::serial_hex(x.raw_serial()));
        assert_eq!(c.id, r.first.serial);
        assert_eq!(
            c.fingerprint.as_deref(),
            Some(crate::ca::fingerprint(der.contents()).as_str())
        );
        assert_eq!(c.server, "gateway");
        assert_eq!(c.issuer.as_deref(), Some("Outpost CA gw-1"));
        assert_eq!(c.not_after, Some(x.validity().not_after.timestamp()));
        let keys: Vec<(Kind, &str, &str)> = rep.credentials[1..]
            .iter()
            .map(|h| (h.kind, h.id.as_str(), h.server.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                (Kind::SymmetricKey, "secoc-0x123", "ecu-bus"),
                (Kind::SymmetricKey, "ota-psk", "ota")
            ]
        );
        // What it reports is what the gateway accepts.
        let back = Report::decode(&rep.encode()).unwrap();
        assert_eq!(back, rep);
    }

    #[test]
    fn renew_answers_a_csr_for_the_pending_key_and_the_same_one_again() {
        let r = rig();
        let mut h = holder(&r);
        let key_before = read(&r, MQTT_KEY);
        let csr = csr_for(&mut h, "j-renew", &r.first.serial);
        let pending = std::fs::read_to_string(r.dir.join(PENDING_KEY)).expect("pending key");
        assert_eq!(csr_spki(&csr), key_spki(&pending));
        assert_ne!(
            csr_spki(&csr),
            key_spki(r.first.key_pem.as_ref().unwrap()),
            "a new key"
        );
        // The key in use is untouched until the certificate comes.
        assert_eq!(read(&r, MQTT_KEY), key_before);
        // Delivered again (a retry): the same CSR, the same pending key.
        let again = csr_for(&mut h, "j-renew", &r.first.serial);
        assert_eq!(again, csr);
        assert_eq!(
            std::fs::read_to_string(r.dir.join(PENDING_KEY)).unwrap(),
            pending
        );
        // Also after a restart (a new Holder on the same directory).
        assert_eq!(csr_for(&mut holder(&r), "j-renew", &r.first.serial), csr);
        // A renew for a certificate it does not hold fails.
        let out = h.handle(renew("j-other", "0badc0de")).unwrap();
        assert_eq!(one(&out).state, JobState::Failed);
    }

    #[test]
    fn a_certificate_for_another_key_is_refused_and_installs_nothing() {
        let r = rig();
        let mut h = holder(&r);
        let _csr = csr_for(&mut h, "j-renew", &r.first.serial);
        let (cert, key) = (read(&r, MQTT_CERT), read(&r, MQTT_KEY));
        // A certificate the CA signed for someone else's key.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other_csr = rcgen::CertificateParams::default()
            .serialize_request(&other)
            .unwrap()
            .pem()
            .unwrap();
        let wrong = r.ca.issue_device(DEVICE, Some(&other_csr)).unwrap();
        let out = h
            .handle(issued("j-renew", &r.first.serial, &wrong))
            .unwrap();
        let u = one(&out);
        assert_eq!(u.state, JobState::Failed, "{u:?}");
        assert!(u.new_id.is_none());
        assert!(!out.reconnect && !out.stop);
        assert_eq!(read(&r, MQTT_CERT), cert, "certificate unchanged");
        assert_eq!(read(&r, MQTT_KEY), key, "key unchanged");
        assert_eq!(
            holder(&r).report().unwrap().credentials[0].id,
            r.first.serial
        );
    }

    #[test]
    fn the_certificate_for_the_csr_is_installed_once() {
        let r = rig();
        let mut h = holder(&r);
        let csr = csr_for(&mut h, "j-renew", &r.first.serial);
        let pending = std::fs::read_to_string(r.dir.join(PENDING_KEY)).unwrap();
        let new = r.ca.issue_device(DEVICE, Some(&csr)).unwrap();
        assert_ne!(new.serial, r.first.serial);
        let cmd = issued("j-renew", &r.first.serial, &new);
        let out = h.handle(cmd.clone()).unwrap();
        let u = one(&out).clone();
        assert_eq!(u.state, JobState::Succeeded, "{u:?}");
        assert_eq!(u.new_id.as_deref(), Some(new.serial.as_str()));
        assert!(out.reconnect, "reconnect with the new certificate");
        assert!(!out.stop);
        assert_eq!(
            std::fs::read_to_string(r.dir.join(MQTT_CERT)).unwrap(),
            new.cert_pem
        );
        assert_eq!(
            std::fs::read_to_string(r.dir.join(MQTT_KEY)).unwrap(),
            pending
        );
        assert_eq!(
            std::fs::read_to_string(r.dir.join(MQTT_CA)).unwrap(),
            new.ca_pem
        );
        assert!(!r.dir.join(PENDING_KEY).exists());
        assert!(!r.dir.join(RENEW).exists());
        assert_eq!(holder(&r).report().unwrap().credentials[0].id, new.serial);
        // The same command again (a lost answer, a restart): the same answer from jobs.json,
        // nothing done twice.
        let installed = (read(&r, MQTT_CERT), read(&r, MQTT_KEY));
        for h in [&mut h, &mut holder(&r)] {
            let again = h.handle(cmd.clone()).unwrap();
            assert_eq!(again.updates, vec![u.clone()]);
            assert!(!again.reconnect && !again.stop);
            assert_eq!((read(&r, MQTT_CERT), read(&r, MQTT_KEY)), installed);
        }
        let done: Done = serde_json::from_slice(&read(&r, JOBS).unwrap()).unwrap();
        assert!(done.done.contains(&u));
    }

    #[test]
    fn deleting_the_mqtt_certificate_removes_it_and_stops() {
        let r = rig();
        let mut h = holder(&r);
        let out = h
            .handle(ToDevice::Delete {
                job: "j-del".into(),
                kind: Kind::Certificate,
                id: r.first.serial.clone(),
                server: "gateway".into(),
            })
            .unwrap();
        assert_eq!(one(&out).state, JobState::Succeeded);
        assert!(out.stop);
        for f in [MQTT_CERT, MQTT_KEY, MQTT_STATE] {
            assert!(!r.dir.join(f).exists(), "{f} removed");
        }
        let rep = holder(&r).report().unwrap();
        assert!(rep.credentials.iter().all(|c| c.kind != Kind::Certificate));
    }

    #[test]
    fn deleting_an_unknown_key_fails_and_changes_nothing() {
        let r = rig();
        let mut h = holder(&r);
        let keys = read(&r, KEYS);
        let out = h
            .handle(ToDevice::Delete {
                job: "j-del".into(),
                kind: Kind::SymmetricKey,
                id: "no-such-key".into(),
                server: "ecu-bus".into(),
            })
            .unwrap();
        assert_eq!(one(&out).state, JobState::Failed);
        assert!(!out.stop);
        assert_eq!(read(&r, KEYS), keys);
        // A known key goes.
        let out = h
            .handle(ToDevice::Delete {
                job: "j-del2".into(),
                kind: Kind::SymmetricKey,
                id: "ota-psk".into(),
                server: "ota".into(),
            })
            .unwrap();
        assert_eq!(one(&out).state, JobState::Succeeded);
        let ids: Vec<String> = h.keys().unwrap().into_iter().map(|k| k.id).collect();
        assert_eq!(ids, ["secoc-0x123"]);
        assert!(r.dir.join(MQTT_CERT).exists());
    }

    #[test]
    fn rotate_then_the_sealed_key_replaces_the_old_one() {
        let r = rig();
        let mut h = holder(&r);
        let out = h
            .handle(ToDevice::Rotate {
                job: "j-rot".into(),
                id: "secoc-0x123".into(),
                server: "ecu-bus".into(),
            })
            .unwrap();
        let u = one(&out);
        assert_eq!(u.state, JobState::InProgress);
        let epk = u.epk.clone().expect("an ephemeral public key");
        let secret: Vec<u8> = (0u8..32).collect();
        let new_id = "secoc-0x123-r1";
        let s = seal::seal("j-rot", new_id, &epk, &secret).unwrap();
        let out = h
            .handle(ToDevice::Key {
                job: "j-rot".into(),
                replaces: "secoc-0x123".into(),
                new_id: new_id.into(),
                server: "ecu-bus".into(),
                epk: s.epk,
                nonce: s.nonce,
                sealed: s.sealed,
            })
            .unwrap();
        let u = one(&out);
        assert_eq!(u.state, JobState::Succeeded, "{u:?}");
        assert_eq!(u.new_id.as_deref(), Some(new_id));
        let keys = h.keys().unwrap();
        assert!(keys.iter().all(|k| k.id != "secoc-0x123"), "old key gone");
        let k = keys.iter().find(|k| k.id == new_id).expect("new key");
        assert_eq!(k.server, "ecu-bus");
        assert_eq!(k.secret, hex::encode(secret.as_slice()));
        assert!(keys.iter().any(|k| k.id == "ota-psk"), "others kept");
    }

    #[test]
    fn a_key_for_an_unknown_job_fails() {
        let r = rig();
        let mut h = holder(&r);
        let keys = read(&r, KEYS);
        // Sealed to a key the holder never made for this job.
        let o = Opener::new().unwrap();
        let s = seal::seal("j-none", "k2", &o.public_hex, &[7u8; 32]).unwrap();
        let out = h
            .handle(ToDevice::Key {
                job: "j-none".into(),
                replaces: "secoc-0x123".into(),
                new_id: "k2".into(),
                server: "ecu-bus".into(),
                epk: s.epk,
                nonce: s.nonce,
                sealed: s.sealed,
            })
            .unwrap();
        assert_eq!(one(&out).state, JobState::Failed);
        assert_eq!(read(&r, KEYS), keys);
    }
}
