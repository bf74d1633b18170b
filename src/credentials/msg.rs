//! The messages between a holder (a device) and the gateway's credentials service, on the
//! device's own topics (docs/credentials.md is the contract for third-party devices):
//!
//! | topic | direction | payload |
//! |---|---|---|
//! | `devices/{id}/credentials/report` | device → gateway, QoS 1, at every connect (check-in) | [`Report`] |
//! | `devices/{id}/commands/outpost/credentials` | gateway → that device only, QoS 1 | [`ToDevice`] |
//! | `devices/{id}/credentials/job` | device → gateway, QoS 1 | [`JobUpdate`] |
//!
//! JSON, at most [`MAX_MESSAGE`] bytes, unknown fields refused. A leaf: no service, no
//! transport.

use super::model::{check_text, Invalid, JobState, Kind};
use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;
/// Largest message either side accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most credentials one report may list.
pub const MAX_REPORTED: usize = 256;
/// Largest CSR or certificate (PEM) carried.
pub const MAX_PEM: usize = 16 * 1024;

pub fn report_topic(device: &str) -> String {
    format!("devices/{device}/credentials/report")
}
pub fn job_topic(device: &str) -> String {
    format!("devices/{device}/credentials/job")
}
pub fn command_topic(device: &str) -> String {
    format!("devices/{device}/commands/outpost/credentials")
}
/// The filters the service subscribes to on the routing core.
pub const REPORT_FILTER: &str = "devices/+/credentials/report";
pub const JOB_FILTER: &str = "devices/+/credentials/job";

/// What a device reports it holds, at check-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub v: u32,
    pub credentials: Vec<Held>,
}

/// One credential a device holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Held {
    pub kind: Kind,
    /// Serial (hex) of a certificate, or the key's / password's / token's id.
    pub id: String,
    /// The server it is used with (`gateway`, `cloud`, `ota`, a name).
    pub server: String,
    #[serde(default)]
    pub issuer: Option<String>,
    /// SHA-256 of the certificate's DER, hex.
    #[serde(default)]
    pub fingerprint: Option<String>,
    #[serde(default)]
    pub not_before: Option<i64>,
    #[serde(default)]
    pub not_after: Option<i64>,
}

/// A command to the holder of a credential (`op` names it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ToDevice {
    /// Make a new key pair for `server`, keep the key, answer with a CSR
    /// ([`JobUpdate::csr`], state `in-progress`).
    Renew {
        job: String,
        serial: String,
        server: String,
    },
    /// The certificate for the CSR: install it (with the CA) in place of `replaces`, use it
    /// from the next connection, then report `succeeded` with `new_id` = its serial.
    Issued {
        job: String,
        replaces: String,
        serial: String,
        cert_pem: String,
        ca_pem: String,
    },
    /// Delete the credential; it is (being) revoked.
    Invalidate {
        job: String,
        kind: Kind,
        id: String,
        server: String,
    },
    /// Delete the credential.
    Delete {
        job: String,
        kind: Kind,
        id: String,
        server: String,
    },
    /// Rotate a symmetric key: answer with a fresh P-256 public key ([`JobUpdate::epk`],
    /// state `in-progress`); the new key comes sealed to it in [`ToDevice::Key`].
    Rotate {
        job: String,
        id: String,
        server: String,
    },
    /// The new key, sealed to the holder's `epk` (`seal.rs`): replace `replaces` with it,
    /// report `succeeded` with `new_id`.
    Key {
        job: String,
        replaces: String,
        new_id: String,
        server: String,
        /// The gateway's ephemeral P-256 public key (uncompressed point), hex.
        epk: String,
        /// 12 bytes, hex.
        nonce: String,
        /// AES-256-GCM of the key, hex.
        sealed: String,
    },
    /// The job was canceled: stop, and keep what you have.
    Cancel { job: String },
}

impl ToDevice {
    pub fn job(&self) -> &str {
        match self {
            ToDevice::Renew { job, .. }
            | ToDevice::Issued { job, .. }
            | ToDevice::Invalidate { job, .. }
            | ToDevice::Delete { job, .. }
            | ToDevice::Rotate { job, .. }
            | ToDevice::Key { job, .. }
            | ToDevice::Cancel { job } => job,
        }
    }
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    pub fn decode(b: &[u8]) -> Result<ToDevice, Invalid> {
        if b.len() > MAX_MESSAGE {
            return Err(bad("message", format!("larger than {MAX_MESSAGE} bytes")));
        }
        let m: ToDevice = serde_json::from_slice(b).map_err(|e| bad("message", e.to_string()))?;
        check_text("job", m.job())?;
        Ok(m)
    }
}

/// A holder's progress on a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobUpdate {
    pub v: u32,
    pub job: String,
    /// `in-progress`, `succeeded` or `failed`.
    pub state: JobState,
    #[serde(default)]
    pub reason: Option<String>,
    /// Renew: the CSR (PEM) of the new key.
    #[serde(default)]
    pub csr: Option<String>,
    /// Rotate: the holder's ephemeral P-256 public key, hex.
    #[serde(default)]
    pub epk: Option<String>,
    /// Succeeded renew/rotate: the id of the credential now in use.
    #[serde(default)]
    pub new_id: Option<String>,
}

fn bad(field: &str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl Report {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    /// Parse and check a report: bounded, printable, known version.
    pub fn decode(b: &[u8]) -> Result<Report, Invalid> {
        if b.len() > MAX_MESSAGE {
            return Err(bad("report", format!("larger than {MAX_MESSAGE} bytes")));
        }
        let r: Report = serde_json::from_slice(b).map_err(|e| bad("report", e.to_string()))?;
        if r.v != VERSION {
            return Err(bad("v", format!("version {} is not {VERSION}", r.v)));
        }
        if r.credentials.len() > MAX_REPORTED {
            return Err(bad(
                "credentials",
                format!("more than {MAX_REPORTED} entries"),
            ));
        }
        for (i, h) in r.credentials.iter().enumerate() {
            let f = |n: &str| format!("credentials[{i}].{n}");
            if h.id.is_empty() {
                return Err(bad(&f("id"), "empty"));
            }
            check_text(&f("id"), &h.id)?;
            check_text(&f("server"), &h.server)?;
            if h.server.is_empty() {
                return Err(bad(&f("server"), "empty"));
            }
            for (n, v) in [("issuer", &h.issuer), ("fingerprint", &h.fingerprint)] {
                if let Some(v) = v {
                    check_text(&f(n), v)?;
                }
            }
        }
        Ok(r)
    }
}

impl JobUpdate {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    pub fn decode(b: &[u8]) -> Result<JobUpdate, Invalid> {
        if b.len() > MAX_MESSAGE {
            return Err(bad(
                "job update",
                format!("larger than {MAX_MESSAGE} bytes"),
            ));
        }
        let u: JobUpdate =
            serde_json::from_slice(b).map_err(|e| bad("job update", e.to_string()))?;
        if u.v != VERSION {
            return Err(bad("v", format!("version {} is not {VERSION}", u.v)));
        }
        check_text("job", &u.job)?;
        if !matches!(
            u.state,
            JobState::InProgress | JobState::Succeeded | JobState::Failed
        ) {
            return Err(bad(
                "state",
                "a holder reports in-progress, succeeded or failed",
            ));
        }
        if let Some(r) = &u.reason {
            if r.len() > 1024 {
                return Err(bad("reason", "longer than 1024 bytes"));
            }
        }
        if matches!(&u.csr, Some(c) if c.len() > MAX_PEM) {
            return Err(bad("csr", format!("larger than {MAX_PEM} bytes")));
        }
        for (n, v) in [("epk", &u.epk), ("new_id", &u.new_id)] {
            if let Some(v) = v {
                check_text(n, v)?;
            }
        }
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_examples_parse() {
        // The examples of docs/credentials.md, byte for byte.
        let r = Report::decode(
            br#"{"v":1,"credentials":[{"kind":"certificate","id":"5f3a","server":"gateway","fingerprint":"ab12","not_after":1900000000},{"kind":"symmetric-key","id":"secoc-0x123","server":"ecu-bus"}]}"#,
        )
        .unwrap();
        assert_eq!(r.credentials.len(), 2);
        assert_eq!(r.credentials[1].kind, Kind::SymmetricKey);
        let c =
            ToDevice::decode(br#"{"op":"renew","job":"j1","serial":"5f3a","server":"gateway"}"#)
                .unwrap();
        assert_eq!(c.job(), "j1");
        let u = JobUpdate::decode(
            br#"{"v":1,"job":"j1","state":"in-progress","csr":"-----BEGIN CERTIFICATE REQUEST-----"}"#,
        )
        .unwrap();
        assert_eq!(u.state, JobState::InProgress);
    }

    #[test]
    fn bad_messages_name_what_is_wrong() {
        let e = Report::decode(br#"{"v":2,"credentials":[]}"#).unwrap_err();
        assert_eq!(e.field, "v");
        let e = Report::decode(
            br#"{"v":1,"credentials":[{"kind":"certificate","id":"","server":"g"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "credentials[0].id");
        let e = Report::decode(br#"{"v":1,"credentials":[],"x":1}"#).unwrap_err();
        assert_eq!(e.field, "report");
        let e = JobUpdate::decode(br#"{"v":1,"job":"j","state":"queued"}"#).unwrap_err();
        assert_eq!(e.field, "state");
        let big = vec![b' '; MAX_MESSAGE + 1];
        assert!(Report::decode(&big).is_err());
        assert!(ToDevice::decode(br#"{"op":"format-disk","job":"j"}"#).is_err());
    }
}
