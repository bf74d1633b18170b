//! Configuration: one TOML document, typed, with defaults that work out of the box.
//!
//! `Config::default()` is the embedded default that `outpost run` uses with no file;
//! `outpost print-default-config` prints it. Every section denies unknown fields so that a
//! typo is an error naming the field, not a silently ignored setting.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

// Each section's type lives with the module that uses it; this file only assembles the
// document (and validates across sections). Re-exported so `outpost::config::X` names them.
pub use crate::acl::{AclConfig, DeniedPublish};
pub use crate::broker::BrokerConfig;
pub use crate::ca::CaConfig;
pub use crate::frontdoor::config::{LimitsConfig, ListenersConfig, TlsConfig};
pub use crate::mdns::MdnsConfig;
pub use crate::metrics::MetricsConfig;
pub use crate::web::WebConfig;

/// Errors from loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub listeners: ListenersConfig,
    pub limits: LimitsConfig,
    pub frontdoor: crate::frontdoor::bounds::FrontDoorConfig,
    pub broker: BrokerConfig,
    pub acl: AclConfig,
    pub ca: CaConfig,
    pub tls: TlsConfig,
    pub metrics: MetricsConfig,
    pub mdns: MdnsConfig,
    pub shutdown: ShutdownConfig,
    pub uplink: crate::uplink::UplinkConfig,
    pub fdo: crate::fdo::service::FdoConfig,
    pub sync: crate::sync::SyncConfig,
    pub sessions: crate::sessions::SessionsConfig,
    pub can: crate::can::config::CanConfig,
    pub fleet: crate::fleet::FleetConfig,
    pub credentials: crate::credentials::CredentialsConfig,
    pub cloud: crate::credentials::CloudConfig,
    pub web: WebConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Gateway identity: used as the CA and server certificate name, in mDNS TXT and logs.
    /// Empty means "derive from the host name".
    pub id: String,
    /// State directory (CA, store, admin socket). Overridden by `--data-dir`.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long connections may take to drain after SIGTERM before they are cut.
    #[serde(with = "crate::duration")]
    pub grace: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            id: String::new(),
            data_dir: PathBuf::from("outpost-data"),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(5),
        }
    }
}

impl Config {
    /// Parse a TOML document and validate it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        // serde_path_to_error names the dotted field of a type error (`limits.max_connections`);
        // toml's own message adds line, column and the offending text.
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                if path.is_empty() || path == "." {
                    ConfigError::Parse(inner)
                } else {
                    ConfigError::Parse(format!("field `{path}`: {inner}"))
                }
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            cause: source,
        })?;
        Config::from_toml(&text)
    }

    /// The defaults as a TOML document (what `print-default-config` prints).
    pub fn default_toml() -> String {
        // Serialising our own plain structs cannot fail.
        toml::to_string_pretty(&Config::default()).unwrap_or_default()
    }

    /// Check every value that types alone cannot. Errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.gateway.data_dir.as_os_str().is_empty() {
            return Err(invalid("gateway.data_dir", "must not be empty"));
        }
        if !self.gateway.id.is_empty() {
            crate::acl::validate_identity(&self.gateway.id)
                .map_err(|e| invalid("gateway.id", e.to_string()))?;
        }
        if let Some(plain) = self.listeners.plain_addr() {
            if !plain.ip().is_loopback() && !self.listeners.allow_plain_on_network {
                return Err(invalid(
                    "listeners.plain",
                    format!(
                        "{plain} is not a loopback address; the plain listener has no TLS \
                         (set listeners.allow_plain_on_network = true to insist)"
                    ),
                ));
            }
        }
        let l = &self.limits;
        if l.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if !(128..=256 * 1024 * 1024).contains(&l.max_packet_size) {
            return Err(invalid(
                "limits.max_packet_size",
                "must be between 128 bytes and 256 MiB",
            ));
        }
        if l.tls_handshake_timeout.is_zero() {
            return Err(invalid("limits.tls_handshake_timeout", "must be > 0"));
        }
        if l.connect_timeout.is_zero() || l.connect_timeout > Duration::from_secs(3600) {
            return Err(invalid("limits.connect_timeout", "must be > 0 and <= 1h"));
        }
        if l.max_inflight == 0 || l.max_inflight > u16::MAX as usize {
            return Err(invalid("limits.max_inflight", "must be 1..=65535"));
        }
        for (field, pats) in [
            ("acl.device_publish", &self.acl.device_publish),
            ("acl.device_subscribe", &self.acl.device_subscribe),
            ("acl.local_publish", &self.acl.local_publish),
            ("acl.local_subscribe", &self.acl.local_subscribe),
        ] {
            for p in pats {
                crate::acl::Pattern::parse(p).map_err(|e| invalid(field, format!("{p:?}: {e}")))?;
                if p.starts_with('$') {
                    return Err(invalid(
                        field,
                        format!("{p:?}: `$` topics are reserved (the routing core refuses them)"),
                    ));
                }
            }
        }
        if self.broker.segment_size < l.max_packet_size * 2 {
            return Err(invalid(
                "broker.segment_size",
                "must be at least twice limits.max_packet_size",
            ));
        }
        if !(2..=1024).contains(&self.broker.segment_count) {
            return Err(invalid("broker.segment_count", "must be 2..=1024"));
        }
        let c = &self.ca;
        if c.device_validity < Duration::from_secs(3600) {
            return Err(invalid("ca.device_validity", "must be at least 1h"));
        }
        if c.ca_validity <= c.device_validity || c.ca_validity <= c.server_validity {
            return Err(invalid(
                "ca.ca_validity",
                "must be longer than ca.device_validity and ca.server_validity",
            ));
        }
        if c.server_validity < Duration::from_secs(3600) {
            return Err(invalid("ca.server_validity", "must be at least 1h"));
        }
        if c.crl_validity < Duration::from_secs(3600) {
            return Err(invalid("ca.crl_validity", "must be at least 1h"));
        }
        for n in &c.server_names {
            if n.is_empty() || n.len() > 253 {
                return Err(invalid("ca.server_names", format!("bad name {n:?}")));
            }
        }
        // Checked here, not only when the TLS layer loads them, so that a wrong path is a
        // configuration error refused before anything is created or bound.
        for path in &self.tls.extra_client_cas {
            let pem = std::fs::read(path)
                .map_err(|e| invalid("tls.extra_client_cas", format!("{}: {e}", path.display())))?;
            let certs = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("tls.extra_client_cas", format!("{}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(invalid(
                    "tls.extra_client_cas",
                    format!("{}: no PEM certificate in file", path.display()),
                ));
            }
        }
        if let Err((field, reason)) = self.sessions.validate() {
            return Err(invalid(field, reason));
        }
        if let Err((field, reason)) = self.frontdoor.validate() {
            return Err(ConfigError::Invalid { field, reason });
        }
        if let Err((field, reason)) = self.can.validate() {
            return Err(invalid(field, reason));
        }
        if let Err((field, reason)) = self.uplink.validate() {
            return Err(ConfigError::Invalid { field, reason });
        }
        if let Err((field, reason)) = self.fdo.validate() {
            return Err(ConfigError::Invalid { field, reason });
        }
        if let Err((field, reason)) = self.sync.validate() {
            return Err(ConfigError::Invalid { field, reason });
        }
        if let Err((field, reason)) = self.credentials.validate() {
            return Err(ConfigError::Invalid { field, reason });
        }
        if let Err((field, reason)) = self.cloud.validate() {
            return Err(ConfigError::Invalid { field, reason });
        }
        if let Err((field, reason)) = self.fleet.validate() {
            return Err(invalid(field, reason));
        }
        if self.fleet.enabled && !self.uplink.enabled {
            return Err(invalid(
                "fleet.enabled",
                "the fleet server connects to the cloud broker with the [uplink] settings: \
                 uplink.enabled must be true",
            ));
        }
        if let Err((field, reason)) = self.web.validate() {
            return Err(invalid(field, reason));
        }
        if self.shutdown.grace > Duration::from_secs(600) {
            return Err(invalid("shutdown.grace", "must be at most 10 minutes"));
        }
        Ok(())
    }

    /// The gateway id in force: the configured one, else derived from the host name.
    pub fn gateway_id(&self) -> String {
        if !self.gateway.id.is_empty() {
            return self.gateway.id.clone();
        }
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| crate::acl::validate_identity(h).is_ok())
            .unwrap_or_else(|| "outpost".to_string());
        format!("outpost-{host}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_round_trips_through_toml() {
        let text = Config::default_toml();
        let back = Config::from_toml(&text).expect("default config must parse");
        assert_eq!(back, Config::default());
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Config::from_toml("[limits]\nmax_conections = 5\n").unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }

    #[test]
    fn plain_listener_on_network_is_refused_with_field_name() {
        let err = Config::from_toml("[listeners]\nplain = \"0.0.0.0:1883\"\n").unwrap_err();
        assert!(err.to_string().contains("listeners.plain"), "{err}");
    }

    #[test]
    fn plain_listener_can_be_switched_off() {
        let cfg = Config::from_toml("[listeners]\nplain_enabled = false\n").unwrap();
        assert_eq!(cfg.listeners.plain_addr(), None);
        assert!(Config::default().listeners.plain_addr().is_some());
    }

    #[test]
    fn bad_acl_pattern_is_refused() {
        let err = Config::from_toml("[acl]\ndevice_publish = [\"a/#/b\"]\n").unwrap_err();
        assert!(err.to_string().contains("acl.device_publish"), "{err}");
    }

    #[test]
    fn unreadable_extra_ca_is_a_config_error() {
        let err =
            Config::from_toml("[tls]\nextra_client_cas = [\"/nonexistent/ca.pem\"]\n").unwrap_err();
        assert!(err.to_string().contains("tls.extra_client_cas"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let text = format!(
            "[tls]\nextra_client_cas = [{:?}]\n",
            empty.display().to_string()
        );
        let err = Config::from_toml(&text).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn frontdoor_bounds_errors_name_the_field() {
        let err = Config::from_toml("[frontdoor]\nmax_core_filters = 0\n").unwrap_err();
        assert!(
            err.to_string().contains("frontdoor.max_core_filters"),
            "{err}"
        );
    }

    #[test]
    fn the_admin_page_on_the_network_needs_lan() {
        let err = Config::from_toml("[web]\nlisten = \"0.0.0.0:8090\"\n").unwrap_err();
        assert!(err.to_string().contains("web.listen"), "{err}");
        let cfg = Config::from_toml("[web]\nlisten = \"0.0.0.0:8090\"\nlan = true\n").unwrap();
        assert!(cfg.web.lan);
    }

    #[test]
    fn durations_are_human_readable() {
        let cfg = Config::from_toml("[limits]\nconnect_timeout = \"3s\"\n").unwrap();
        assert_eq!(cfg.limits.connect_timeout, Duration::from_secs(3));
    }
}
