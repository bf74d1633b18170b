//! The front door's configuration sections: `[listeners]`, `[limits]`, `[tls]` (and
//! `[frontdoor]`, in `bounds.rs`), plus what `lib.rs` hands the front door from the document.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenersConfig {
    /// Device listener: MQTT over TLS with a client certificate required.
    pub mqtts: SocketAddr,
    /// Plain MQTT listener for processes on the gateway itself.
    pub plain: SocketAddr,
    /// Whether the plain listener is bound at all.
    pub plain_enabled: bool,
    /// Allow the plain listener on a non-loopback address (default false: refused at start).
    pub allow_plain_on_network: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open connections across all listeners; further connections are closed at accept.
    pub max_connections: usize,
    /// Largest MQTT packet accepted from a client (bytes, whole packet).
    pub max_packet_size: usize,
    /// Time allowed for the TLS handshake.
    #[serde(with = "crate::duration")]
    pub tls_handshake_timeout: Duration,
    /// Time allowed between the end of the handshake and a complete CONNECT packet.
    #[serde(with = "crate::duration")]
    pub connect_timeout: Duration,
    /// QoS 1/2 messages in flight per connection inside the broker.
    pub max_inflight: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Additional CA certificates (PEM files) whose device certificates are accepted,
    /// e.g. the cloud's device CA.
    pub extra_client_cas: Vec<PathBuf>,
}

impl ListenersConfig {
    /// The plain listener's address, if it is enabled.
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain_enabled.then_some(self.plain)
    }
}

impl Default for ListenersConfig {
    fn default() -> Self {
        ListenersConfig {
            mqtts: SocketAddr::from(([0, 0, 0, 0], 8883)),
            plain: SocketAddr::from(([127, 0, 0, 1], 1883)),
            plain_enabled: true,
            allow_plain_on_network: false,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            max_packet_size: 256 * 1024,
            tls_handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_inflight: 100,
        }
    }
}

/// What the front door runs with: its sections of the document, and the drain grace of
/// `[shutdown]` (assembled by `lib.rs`; the front door never sees the root `Config`).
#[derive(Debug, Clone)]
pub struct FrontDoorSettings {
    pub limits: LimitsConfig,
    pub frontdoor: super::bounds::FrontDoorConfig,
    pub acl: crate::acl::AclConfig,
    pub shutdown_grace: Duration,
    /// `sessions.max_inflight`: deliveries of a persistent session not yet acknowledged.
    pub sessions_inflight: u16,
}
