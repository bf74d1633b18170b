//! The `[web]` section: the admin page and its JSON API.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `[web]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Serve the admin page and its API.
    pub enabled: bool,
    /// Where: loopback unless `lan` is set (the page is plain HTTP).
    pub listen: SocketAddr,
    /// Allow a `listen` address that is not loopback (the LAN). Plain HTTP: passwords and
    /// session cookies cross that network in clear unless a TLS proxy stands in front.
    pub lan: bool,
    /// Serve HTTPS with the gateway's server certificate (the session cookie is then
    /// `Secure`). The gateway hands the certificate to the page; `serve` refuses to start
    /// plain when this is set.
    pub tls: bool,
    /// The admins' password hashes (argon2id); relative paths are in the data directory.
    pub admins_file: PathBuf,
    /// A session ends after this long without a request...
    #[serde(with = "crate::duration")]
    pub session_idle: Duration,
    /// ...and this long after the login whatever it does.
    #[serde(with = "crate::duration")]
    pub session_max: Duration,
    /// Most sessions at once (the oldest is ended beyond).
    pub max_sessions: usize,
    /// Failed logins allowed per user name and per source address within `failure_window`
    /// before the login is locked for `lockout`.
    pub max_failures: u32,
    #[serde(with = "crate::duration")]
    pub failure_window: Duration,
    #[serde(with = "crate::duration")]
    pub lockout: Duration,
    /// A failed login is answered after this delay, doubled for every further failure of
    /// the same user or address within the window (at most 8 s).
    #[serde(with = "crate::duration")]
    pub failure_delay: Duration,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
            lan: false,
            tls: false,
            admins_file: PathBuf::from("admins.toml"),
            session_idle: Duration::from_secs(30 * 60),
            session_max: Duration::from_secs(8 * 3600),
            max_sessions: 1024,
            max_failures: 5,
            failure_window: Duration::from_secs(15 * 60),
            lockout: Duration::from_secs(15 * 60),
            failure_delay: Duration::from_millis(250),
        }
    }
}

impl WebConfig {
    /// The admins file in force for `data_dir`.
    pub fn admins_path(&self, data_dir: &Path) -> PathBuf {
        if self.admins_file.is_absolute() {
            self.admins_file.clone()
        } else {
            data_dir.join(&self.admins_file)
        }
    }

    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.listen.ip().is_loopback() && !self.lan {
            return Err((
                "web.listen",
                format!(
                    "{} is not a loopback address; the admin page is plain HTTP \
                     (set web.lan = true to serve it on the network)",
                    self.listen
                ),
            ));
        }
        if self.admins_file.as_os_str().is_empty() {
            return Err(("web.admins_file", "must not be empty".into()));
        }
        if self.session_idle < Duration::from_secs(60) {
            return Err(("web.session_idle", "must be at least 1m".into()));
        }
        if self.session_max < self.session_idle {
            return Err((
                "web.session_max",
                "must be at least web.session_idle".into(),
            ));
        }
        if !(1..=100_000).contains(&self.max_sessions) {
            return Err(("web.max_sessions", "must be 1..=100000".into()));
        }
        if !(1..=1000).contains(&self.max_failures) {
            return Err(("web.max_failures", "must be 1..=1000".into()));
        }
        if self.failure_window.is_zero() {
            return Err(("web.failure_window", "must be above 0".into()));
        }
        if self.lockout.is_zero() || self.lockout > Duration::from_secs(86_400) {
            return Err(("web.lockout", "must be above 0 and at most 1 day".into()));
        }
        if self.failure_delay > Duration::from_secs(8) {
            return Err(("web.failure_delay", "must be at most 8s".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_address_needs_lan() {
        let mut c = WebConfig {
            listen: "0.0.0.0:8090".parse().unwrap(),
            ..WebConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "web.listen");
        c.lan = true;
        assert!(c.validate().is_ok());
        assert!(WebConfig::default().validate().is_ok());
    }

    #[test]
    fn the_admins_file_is_in_the_data_dir_unless_absolute() {
        let c = WebConfig::default();
        assert_eq!(
            c.admins_path(Path::new("/d")),
            PathBuf::from("/d/admins.toml")
        );
        let c = WebConfig {
            admins_file: "/etc/outpost/admins.toml".into(),
            ..WebConfig::default()
        };
        assert_eq!(
            c.admins_path(Path::new("/d")),
            PathBuf::from("/etc/outpost/admins.toml")
        );
    }
}
