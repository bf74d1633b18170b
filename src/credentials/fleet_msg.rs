//! The messages between a gateway's credentials service and the cloud's (the fleet
//! inventory), over the cloud broker both use (docs/credentials.md, "Fleet"):
//!
//! | topic | direction | payload |
//! |---|---|---|
//! | `outpost/{gateway}/credentials/up` | gateway → cloud, QoS 1, through the durable uplink queue | [`Up`] |
//! | `outpost/{gateway}/credentials/down` | cloud → that gateway, QoS 1 | [`Down`] |
//!
//! The vehicle check-in ([`VehicleReport`], seed 000) is signed by the gateway's key (its
//! uplink client key, ECDSA P-256 with SHA-256, ASN.1 signature) with its certificate
//! attached, because the cloud side hears it through the broker, not over the gateway's
//! own TLS session. A leaf: ring, x509-parser and serde only.

use super::model::{check_text, Credential, Invalid, Job, Operation};
use serde::{Deserialize, Serialize};

/// Largest message either side accepts.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Most records (or jobs) one `Up::Records` carries.
pub const MAX_RECORDS: usize = 64;
/// Most ECUs one vehicle report lists, and serials per ECU.
pub const MAX_ECUS: usize = 256;
pub const MAX_SERIALS: usize = 16;
/// A vehicle report older (or newer) than this is refused (replay).
pub const MAX_REPORT_AGE: i64 = 24 * 3600;

pub const LOCAL_UP: &str = "$outpost/credentials/up";

pub fn up_topic(gateway: &str) -> String {
    format!("outpost/{gateway}/credentials/up")
}
pub fn down_topic(gateway: &str) -> String {
    format!("outpost/{gateway}/credentials/down")
}
pub const UP_FILTER: &str = "outpost/+/credentials/up";

/// Gateway → cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Up {
    /// Records and jobs that changed (the gateway's are authoritative for its devices).
    Records {
        records: Vec<Credential>,
        #[serde(default)]
        jobs: Vec<Job>,
    },
    /// The signed vehicle check-in.
    Vehicle(SignedReport),
}

/// Cloud → gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Down {
    /// Run an operation on a credential the gateway's device holds (by the gateway's id of
    /// it).
    Operate {
        credential: String,
        operation: Operation,
        by: String,
        #[serde(default)]
        reason: String,
    },
    /// Seed 000: the ECU holds a certificate not recorded for this vehicle and ECU: delete
    /// it in the ECU (by serial, whatever the gateway calls the record).
    DeleteEcuCertificate {
        ecu: String,
        serial: String,
        reason: String,
    },
}

/// What the vehicle's gateway reports at check-in: its vehicle, the ECUs present and the
/// serials each holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VehicleReport {
    pub v: u32,
    pub gateway: String,
    pub vehicle: String,
    /// Unix seconds when it was made.
    pub at: i64,
    pub ecus: Vec<Ecu>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ecu {
    pub ecu: String,
    pub serials: Vec<String>,
}

/// The report as signed: its exact JSON text, the signature over those bytes, and the
/// signer's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedReport {
    /// The JSON of a [`VehicleReport`].
    pub report: String,
    /// Hex of the ECDSA P-256 SHA-256 signature (ASN.1 DER) over `report`'s bytes.
    pub signature: String,
    pub cert_pem: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("the signature does not verify with the attached certificate")]
    Signature,
    #[error("the certificate is not one the cloud trusts for gateways: {0}")]
    Untrusted(String),
    #[error("signed by {signer}, but the report is for gateway {gateway}")]
    WrongGateway { signer: String, gateway: String },
    #[error("the report is {0} s away from now")]
    Stale(i64),
    #[error("signing: {0}")]
    Sign(String),
}

fn bad(field: &str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl Up {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    pub fn decode(b: &[u8]) -> Result<Up, Invalid> {
        if b.len() > MAX_MESSAGE {
            return Err(bad("message", format!("larger than {MAX_MESSAGE} bytes")));
        }
        let m: Up = serde_json::from_slice(b).map_err(|e| bad("message", e.to_string()))?;
        if let Up::Records { records, jobs } = &m {
            if records.len() > MAX_RECORDS || jobs.len() > MAX_RECORDS {
                return Err(bad("records", format!("more than {MAX_RECORDS}")));
            }
            for (i, r) in records.iter().enumerate() {
                for (f, v) in [("id", &r.id), ("holder", &r.holder), ("serial", &r.serial)] {
                    check_text(&format!("records[{i}].{f}"), v)?;
                }
            }
        }
        Ok(m)
    }
}

impl Down {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    pub fn decode(b: &[u8]) -> Result<Down, Invalid> {
        if b.len() > 64 * 1024 {
            return Err(bad("message", "larger than 64 KiB"));
        }
        let m: Down = serde_json::from_slice(b).map_err(|e| bad("message", e.to_string()))?;
        match &m {
            Down::Operate {
                credential, reason, ..
            } => {
                check_text("credential", credential)?;
                check_text("reason", reason)?;
            }
            Down::DeleteEcuCertificate {
                ecu,
                serial,
                reason,
            } => {
                check_text("ecu", ecu)?;
                check_text("serial", serial)?;
                if reason.len() > 1024 {
                    return Err(bad("reason", "longer than 1024 bytes"));
                }
            }
        }
        Ok(m)
    }
}

impl VehicleReport {
    fn check(&self) -> Result<(), Invalid> {
        if self.v != 1 {
            return Err(bad("v", "must be 1"));
        }
        crate::acl::validate_identity(&self.gateway).map_err(|e| bad("gateway", e.to_string()))?;
        crate::acl::validate_identity(&self.vehicle).map_err(|e| bad("vehicle", e.to_string()))?;
        if self.ecus.len() > MAX_ECUS {
            return Err(bad("ecus", format!("more than {MAX_ECUS}")));
        }
        for (i, e) in self.ecus.iter().enumerate() {
            check_text(&format!("ecus[{i}].ecu"), &e.ecu)?;
            if e.serials.len() > MAX_SERIALS {
                return Err(bad(
                    &format!("ecus[{i}].serials"),
                    format!("more than {MAX_SERIALS}"),
                ));
            }
            for s in &e.serials {
                check_text(&format!("ecus[{i}].serials"), s)?;
            }
        }
        Ok(())
    }
}

/// Sign a report with the gateway's key (PEM, PKCS#8 or SEC1, P-256).
pub fn sign(
    report: &VehicleReport,
    key_pem: &str,
    cert_pem: &str,
) -> Result<SignedReport, ReportError> {
    let text = serde_json::to_string(report).map_err(|e| ReportError::Sign(e.to_string()))?;
    let kp = rcgen::KeyPair::from_pem(key_pem).map_err(|e| ReportError::Sign(e.to_string()))?;
    let rng = ring::rand::SystemRandom::new();
    let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &kp.serialize_der(),
        &rng,
    )
    .map_err(|e| ReportError::Sign(format!("the uplink key is not P-256: {e}")))?;
    let sig = signer
        .sign(&rng, text.as_bytes())
        .map_err(|e| ReportError::Sign(e.to_string()))?;
    Ok(SignedReport {
        report: text,
        signature: hex::encode(sig.as_ref()),
        cert_pem: cert_pem.to_string(),
    })
}

/// Verify a signed report: the certificate chains to one of `roots` as a client
/// certificate, its common name is the gateway in the topic, the signature holds, the
/// report parses and is recent. Returns the report.
pub fn verify(
    s: &SignedReport,
    gateway: &str,
    roots: &std::sync::Arc<rustls::RootCertStore>,
    now: i64,
) -> Result<VehicleReport, ReportError> {
    use rustls::pki_types::{CertificateDer, UnixTime};
    let der =
        pem::parse(&s.cert_pem).map_err(|e| ReportError::Untrusted(format!("certificate: {e}")))?;
    let cert = CertificateDer::from(der.contents().to_vec());
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
            .build()
            .map_err(|e| ReportError::Untrusted(e.to_string()))?;
    let t = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64));
    verifier
        .verify_client_cert(&cert, &[], t)
        .map_err(|e| ReportError::Untrusted(e.to_string()))?;
    let (_, x) = x509_parser::parse_x509_certificate(der.contents())
        .map_err(|e| ReportError::Untrusted(e.to_string()))?;
    let signer = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_string();
    if signer != gateway {
        return Err(ReportError::WrongGateway {
            signer,
            gateway: gateway.to_string(),
        });
    }
    let sig = hex::decode(&s.signature).map_err(|_| ReportError::Signature)?;
    let spki = x.public_key().subject_public_key.data.to_vec();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, spki)
        .verify(s.report.as_bytes(), &sig)
        .map_err(|_| ReportError::Signature)?;
    if s.report.len() > MAX_MESSAGE {
        return Err(bad("report", "too large").into());
    }
    let r: VehicleReport =
        serde_json::from_str(&s.report).map_err(|e| bad("report", e.to_string()))?;
    r.check()?;
    if r.gateway != gateway {
        return Err(ReportError::WrongGateway {
            signer: gateway.to_string(),
            gateway: r.gateway,
        });
    }
    let age = (now - r.at).abs();
    if age > MAX_REPORT_AGE {
        return Err(ReportError::Stale(now - r.at));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Pki {
        roots: Arc<rustls::RootCertStore>,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    fn pki() -> Pki {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "cloud CA");
        p.distinguished_name = dn;
        let k = rcgen::KeyPair::generate().unwrap();
        let c = p.self_signed(&k).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(c.der().clone()).unwrap();
        Pki {
            roots: Arc::new(roots),
            issuer: rcgen::Issuer::new(p, k),
        }
    }

    fn gateway_cert(pki: &Pki, cn: &str) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let k = rcgen::KeyPair::generate().unwrap();
        let c = p.signed_by(&k, &pki.issuer).unwrap();
        (c.pem(), k.serialize_pem())
    }

    const T: i64 = 1_796_000_000;

    fn report(gw: &str, at: i64) -> VehicleReport {
        VehicleReport {
            v: 1,
            gateway: gw.into(),
            vehicle: "VIN-B".into(),
            at,
            ecus: vec![Ecu {
                ecu: "ecu-7".into(),
                serials: vec!["1a2b".into()],
            }],
        }
    }

    #[test]
    fn a_signed_report_verifies_and_forgeries_do_not() {
        let pki = pki();
        let (cert, key) = gateway_cert(&pki, "gw-b");
        let s = sign(&report("gw-b", T), &key, &cert).unwrap();
        assert_eq!(
            verify(&s, "gw-b", &pki.roots, T).unwrap(),
            report("gw-b", T)
        );
        // A changed byte of the report.
        let mut t = s.clone();
        t.report = t.report.replace("VIN-B", "VIN-A");
        assert_eq!(
            verify(&t, "gw-b", &pki.roots, T),
            Err(ReportError::Signature)
        );
        // Heard on another gateway's topic.
        assert!(matches!(
            verify(&s, "gw-a", &pki.roots, T),
            Err(ReportError::WrongGateway { .. })
        ));
        // Signed for another gateway id than the certificate's.
        let s2 = sign(&report("gw-a", T), &key, &cert).unwrap();
        assert!(matches!(
            verify(&s2, "gw-b", &pki.roots, T),
            Err(ReportError::WrongGateway { .. })
        ));
        // A key and certificate from a CA the cloud does not trust.
        let other = pki_other();
        let (c3, k3) = gateway_cert(&other, "gw-b");
        let s3 = sign(&report("gw-b", T), &k3, &c3).unwrap();
        assert!(matches!(
            verify(&s3, "gw-b", &pki.roots, T),
            Err(ReportError::Untrusted(_))
        ));
        // The right certificate, another key.
        let (_, k4) = gateway_cert(&pki, "gw-b");
        let s4 = sign(&report("gw-b", T), &k4, &cert).unwrap();
        assert_eq!(
            verify(&s4, "gw-b", &pki.roots, T),
            Err(ReportError::Signature)
        );
        // A replay from two days ago.
        let old = sign(&report("gw-b", T), &key, &cert).unwrap();
        assert!(matches!(
            verify(&old, "gw-b", &pki.roots, T + 2 * 86_400),
            Err(ReportError::Stale(_))
        ));
    }

    fn pki_other() -> Pki {
        pki()
    }

    #[test]
    fn messages_are_bounded_and_named() {
        assert!(Up::decode(br#"{"kind":"records","records":[]}"#).is_ok());
        assert!(Up::decode(br#"{"kind":"nonsense"}"#).is_err());
        let d = Down::decode(
            br#"{"kind":"delete-ecu-certificate","ecu":"ecu-7","serial":"1a","reason":"moved"}"#,
        )
        .unwrap();
        assert_eq!(Down::decode(&d.encode()).unwrap(), d);
        let e = Down::decode(
            br#"{"kind":"operate","credential":"a\u0001","operation":"renew","by":"x"}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "credential");
    }
}
