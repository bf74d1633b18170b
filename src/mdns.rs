//! mDNS-SD advertisement of the device listener as `_secure-mqtt._tcp`.
//!
//! TXT carries the gateway id and the SHA-256 fingerprint of the gateway CA, so a device
//! can pin the CA it finds. The record is withdrawn (goodbye packet) on shutdown.

use mdns_sd::{ServiceDaemon, ServiceInfo};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub const SERVICE_TYPE: &str = "_secure-mqtt._tcp.local.";

#[derive(Debug, thiserror::Error)]
#[error("mDNS: {0}")]
pub struct MdnsError(String);

/// FDO service (rendezvous + owner over HTTP); its host name is the one devices are made
/// with (`outpost.local`), so that answering for the service also answers that name.
pub const FDO_SERVICE_TYPE: &str = "_fdo._tcp.local.";

pub struct Advert {
    daemon: ServiceDaemon,
    fullnames: Vec<String>,
}

impl Advert {
    pub fn start(
        instance: &str,
        gateway_id: &str,
        port: u16,
        ca_fingerprint: &str,
    ) -> Result<Advert, MdnsError> {
        let e = |e: mdns_sd::Error| MdnsError(e.to_string());
        let daemon = ServiceDaemon::new().map_err(e)?;
        let props = HashMap::from([
            ("gw".to_string(), gateway_id.to_string()),
            ("ca_sha256".to_string(), ca_fingerprint.to_string()),
            ("proto".to_string(), "mqtt-3.1.1".to_string()),
        ]);
        let host = format!("{gateway_id}.local.");
        let info = ServiceInfo::new(SERVICE_TYPE, instance, &host, "", port, props)
            .map_err(e)?
            .enable_addr_auto();
        let fullname = info.get_fullname().to_string();
        daemon.register(info).map_err(e)?;
        tracing::info!(service = %fullname, port, "advertising over mDNS");
        Ok(Advert {
            daemon,
            fullnames: vec![fullname],
        })
    }

    /// Also advertise the FDO listener on `port` under the host name `host` (e.g.
    /// `outpost.local`), which the responder then resolves to this machine's addresses.
    pub fn add_fdo(&mut self, instance: &str, host: &str, port: u16) -> Result<(), MdnsError> {
        let e = |e: mdns_sd::Error| MdnsError(e.to_string());
        let props = HashMap::from([("path".to_string(), "/fdo/101/msg".to_string())]);
        let host = format!("{}.", host.trim_end_matches('.'));
        let info = ServiceInfo::new(FDO_SERVICE_TYPE, instance, &host, "", port, props)
            .map_err(e)?
            .enable_addr_auto();
        let fullname = info.get_fullname().to_string();
        self.daemon.register(info).map_err(e)?;
        tracing::info!(service = %fullname, %host, port, "advertising FDO over mDNS");
        self.fullnames.push(fullname);
        Ok(())
    }

    /// Withdraw the record and stop the daemon, waiting briefly for the goodbye to go out.
    pub fn stop(self) {
        for name in &self.fullnames {
            if let Ok(rx) = self.daemon.unregister(name) {
                let _ = rx.recv_timeout(std::time::Duration::from_secs(1));
            }
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(1));
        }
        tracing::info!(services = ?self.fullnames, "mDNS advertisement withdrawn");
    }
}

// --- configuration section

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MdnsConfig {
    /// Advertise the device listener as `_secure-mqtt._tcp`.
    pub enabled: bool,
    /// Instance name; empty means the gateway id.
    pub instance: String,
}

impl Default for MdnsConfig {
    fn default() -> Self {
        MdnsConfig {
            enabled: true,
            instance: String::new(),
        }
    }
}
