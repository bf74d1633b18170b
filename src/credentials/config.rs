//! `[credentials]` (the inventory and its operations) and `[cloud]` (the fleet inventory's
//! database).

use serde::{Deserialize, Serialize};
use std::time::Duration;

const DAY: u64 = 86_400;

/// The `[credentials]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CredentialsConfig {
    /// Keep the inventory and carry out operations on the holders.
    pub enabled: bool,
    /// A credential is "expiring" this long before it ends.
    #[serde(with = "crate::duration")]
    pub expiring: Duration,
    /// Renew our CA's certificates automatically once this fraction of their validity has
    /// passed (0 turns automatic renewal off).
    pub renew_at: f64,
    /// How often the renewal policy and the job timeouts are checked.
    #[serde(with = "crate::duration")]
    pub sweep_every: Duration,
    /// A job that has not ended this long after it was made is timed out.
    #[serde(with = "crate::duration")]
    pub job_timeout: Duration,
    /// A delivered command the holder did not answer is sent again after this, doubling
    /// each time up to `retry_max`.
    #[serde(with = "crate::duration")]
    pub retry_min: Duration,
    #[serde(with = "crate::duration")]
    pub retry_max: Duration,
    /// Invalidation of a certificate whose holder is online: how long the holder is given
    /// to delete it before the revocation cuts its session.
    #[serde(with = "crate::duration")]
    pub invalidate_grace: Duration,
    /// The vehicle this gateway is in (its VIN or fleet id; seed 000). When set, every
    /// certificate an ECU (a device of this gateway) reports must be recorded for this
    /// vehicle and that ECU, or it is revoked and the ECU told to delete it. Empty: not in
    /// a vehicle.
    pub vehicle: String,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        CredentialsConfig {
            enabled: true,
            expiring: Duration::from_secs(30 * DAY),
            renew_at: 2.0 / 3.0,
            sweep_every: Duration::from_secs(60),
            job_timeout: Duration::from_secs(7 * DAY),
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(600),
            invalidate_grace: Duration::from_secs(5),
            vehicle: String::new(),
        }
    }
}

impl CredentialsConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..1.0).contains(&self.renew_at) {
            return Err((
                "credentials.renew_at",
                "must be at least 0 and below 1".into(),
            ));
        }
        if self.sweep_every < Duration::from_millis(100) {
            return Err(("credentials.sweep_every", "must be at least 100ms".into()));
        }
        if self.retry_min.is_zero() || self.retry_max < self.retry_min {
            return Err((
                "credentials.retry_max",
                "retry_min must be above 0 and retry_max at least retry_min".into(),
            ));
        }
        if !self.vehicle.is_empty() {
            crate::acl::validate_identity(&self.vehicle)
                .map_err(|e| ("credentials.vehicle", e.to_string()))?;
        }
        if self.job_timeout < self.retry_min {
            return Err((
                "credentials.job_timeout",
                "must be at least retry_min".into(),
            ));
        }
        Ok(())
    }
}

/// The `[cloud]` section (the cloud role).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// The fleet inventory's PostgreSQL database
    /// (`postgresql://user@127.0.0.1:5432/outpost`); empty keeps it in the embedded store.
    pub database_url: String,
    /// PEM CA(s) of the gateways' uplink certificates: a vehicle check-in must be signed
    /// by a certificate of one of them whose common name is the reporting gateway. Empty:
    /// vehicle check-ins are refused (and logged).
    pub gateway_ca: std::path::PathBuf,
}

impl CloudConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let u = &self.database_url;
        if !(u.is_empty() || u.starts_with("postgresql://") || u.starts_with("postgres://")) {
            return Err((
                "cloud.database_url",
                "must be a postgresql:// URL or empty".into(),
            ));
        }
        Ok(())
    }
}
