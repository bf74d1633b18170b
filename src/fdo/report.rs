//! Human-readable description of a voucher with its verification (`outpost voucher show`).

use super::owner;
use crate::fdo_wire::credential::DeviceCredential;
use crate::fdo_wire::voucher::{OwnershipVoucher, VerifiedChain};
use crate::fdo_wire::FdoError;
use std::fmt::Write;

/// Describe `v` and verify it: the chain always, the header HMAC when the device's
/// credential is given. The text says what passed and what failed; the result is the
/// verification's. With a gateway's data directory it also says what the key the voucher
/// names is to that gateway (current or retired owner key, installer key, not ours).
pub fn voucher_report(
    v: &OwnershipVoucher,
    cred: Option<&DeviceCredential>,
    data_dir: Option<&std::path::Path>,
) -> (String, Result<VerifiedChain, FdoError>) {
    let h = v.header();
    let mut t = String::new();
    let _ = writeln!(t, "Ownership voucher (FDO protocol version {})", h.prot_ver);
    let _ = writeln!(t, "  GUID:             {}", h.guid);
    let _ = writeln!(t, "  Device info:      {}", h.device_info);
    for (i, d) in h.rv_info.0.iter().enumerate() {
        let label = if i == 0 { "Rendezvous:" } else { "" };
        let _ = writeln!(t, "  {label:<17} [{d}]");
    }
    if h.rv_info.0.is_empty() {
        let _ = writeln!(t, "  Rendezvous:       (none)");
    }
    let _ = writeln!(t, "  Manufacturer key: {}", h.mfg_pub_key.describe());
    match v.cert_chain() {
        None => {
            let _ = writeln!(t, "  Device chain:     none");
        }
        Some(certs) => {
            let leaf = certs
                .first()
                .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
                .map(|(_, c)| c.subject().to_string())
                .unwrap_or_else(|| "unparsable".into());
            let key = match v.device_public_key() {
                Ok(Some(k)) => k.describe(),
                Ok(None) => "none".into(),
                Err(e) => e.to_string(),
            };
            let _ = writeln!(
                t,
                "  Device chain:     {} certificate(s), leaf {leaf}\n  Device key:       {key}",
                certs.len()
            );
        }
    }
    let _ = writeln!(t, "  Entries:          {}", v.entries().len());
    for (i, e) in v.entries().iter().enumerate() {
        let by = if i == 0 {
            "manufacturer".to_string()
        } else {
            format!("entry {}", i - 1)
        };
        let p = e.payload();
        let _ = writeln!(
            t,
            "    [{i}] signed by {by:<12} -> {} ({}{})",
            p.pub_key.describe(),
            p.hash_prev_entry.alg,
            if p.extra.is_some() {
                ", with OVEExtra"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        t,
        "  Owner:            {}{}",
        v.owner_key().describe(),
        if v.entries().is_empty() {
            " (the manufacturer: not extended yet)"
        } else {
            ""
        }
    );
    let key_id = v
        .owner_key()
        .key_id()
        .unwrap_or_else(|e| format!("unknown ({e})"));
    match data_dir {
        None => {
            let _ = writeln!(t, "  Owner key:        {key_id}");
        }
        Some(dir) => {
            let role = match owner::classify(dir, v.owner_key()) {
                Ok(r) => r.to_string(),
                Err(e) => format!("cannot tell: {e}"),
            };
            let _ = writeln!(t, "  Owner key:        {key_id} ({role})");
        }
    }
    let chain = v.verify_chain();
    match &chain {
        Ok(_) => {
            let _ = writeln!(
                t,
                "  Chain:            verified (device chain hash, hash chain, signatures, header info)"
            );
        }
        Err(e) => {
            let _ = writeln!(t, "  Chain:            FAILED: {e}");
        }
    }
    let result = match (chain, cred) {
        (Err(e), _) => Err(e),
        (Ok(c), None) => {
            let _ = writeln!(
                t,
                "  Header HMAC:      {} (not checked: needs the device credential, --cred)",
                v.hmac().alg
            );
            Ok(c)
        }
        (Ok(c), Some(cred)) => {
            let r = if cred.guid != h.guid {
                Err(FdoError::GuidMismatch {
                    expected: cred.guid,
                    found: h.guid,
                })
            } else {
                v.verify_hmac(&cred.hmac_secret)
                    .and_then(|_| cred.check_manufacturer_key(&h.mfg_pub_key))
            };
            match r {
                Ok(()) => {
                    let _ = writeln!(
                        t,
                        "  Header HMAC:      {} verified with the device credential",
                        v.hmac().alg
                    );
                    Ok(c)
                }
                Err(e) => {
                    let _ = writeln!(t, "  Header HMAC:      FAILED: {e}");
                    Err(e)
                }
            }
        }
    };
    (t, result)
}
