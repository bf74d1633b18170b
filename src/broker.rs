//! The routing core: an in-process rumqttd, reachable only through the front door.
//!
//! rumqttd listens on an ephemeral loopback port with an authentication hook that accepts
//! only a random secret generated at start and known to the front door alone. Any other
//! process that finds the port is refused at CONNECT, so the front door (TLS, identity,
//! ACLs, revocation, limits) cannot be bypassed.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot reserve a loopback port for the broker: {0}")]
    Port(std::io::Error),
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
    #[error("the broker did not start listening on {0} within 5 s")]
    NotListening(SocketAddr),
}

/// Where the front door reaches the routing core, and the secret that opens it.
#[derive(Clone)]
pub struct BrokerLink {
    pub addr: SocketAddr,
    pub secret: Arc<str>,
}

/// Headroom for the CONNECT rewrite (user name + secret) over the client's packet limit.
const CONNECT_HEADROOM: usize = 1024;

/// An in-process MQTT client of the routing core (the gateway's own publishers: the uplink,
/// the switch-back advice), authenticated with the per-start secret. Its event loop runs in
/// a task until `shutdown`, reconnecting after 200 ms if the core link drops.
pub fn local_client(
    core: &BrokerLink,
    client_id: &str,
    shutdown: tokio_util::sync::CancellationToken,
) -> rumqttc::AsyncClient {
    // Our own namespace: no device (identity) or local client (`local~X`) can take it over.
    debug_assert!(client_id.starts_with(crate::frontdoor::INTERNAL_PREFIX));
    let mut o = rumqttc::MqttOptions::new(client_id, core.addr.ip().to_string(), core.addr.port());
    o.set_credentials(client_id, core.secret.to_string());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 1024);
    let id = client_id.to_string();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = el.poll() => if let Err(e) = r {
                    tracing::debug!(client = %id, error = %e, "local core link lost; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                },
            }
        }
    });
    client
}

/// What the routing core must admit, from the front door's limits.
#[derive(Debug, Clone, Copy)]
pub struct CoreLimits {
    /// The largest MQTT packet a client may send (the core allows CONNECT headroom on top).
    pub max_packet_size: usize,
    /// QoS 1/2 messages in flight per connection.
    pub max_inflight: usize,
    /// Client connections (the core adds the gateway's own clients).
    pub max_connections: usize,
}

pub fn start(cfg: &BrokerConfig, limits: CoreLimits) -> Result<BrokerLink, BrokerError> {
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    let secret: Arc<str> = Arc::from(hex::encode(raw));

    let addr = {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(BrokerError::Port)?;
        l.local_addr().map_err(BrokerError::Port)?
    };

    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 5000,
        max_payload_size: limits.max_packet_size + CONNECT_HEADROOM,
        max_inflight_count: limits.max_inflight,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let expected = secret.clone();
    connections.set_auth_handler(move |_client: String, _user: String, pass: String| {
        let ok = constant_time_eq(pass.as_bytes(), expected.as_bytes());
        async move { ok }
    });
    let server = rumqttd::ServerSettings {
        name: "core".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let router = rumqttd::RouterConfig {
        max_connections: limits.max_connections + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: cfg.segment_size,
        max_segment_count: cfg.segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let rcfg = rumqttd::Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("core".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("outpost-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(rcfg);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "routing core stopped");
            }
        })
        .map_err(BrokerError::Thread)?;

    let deadline = Instant::now() + Duration::from_secs(5);
    while !probe(addr, &secret) {
        if Instant::now() > deadline {
            return Err(BrokerError::NotListening(addr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::debug!(%addr, "routing core listening (loopback, front door only)");
    Ok(BrokerLink { addr, secret })
}

/// A full MQTT round trip with the secret: CONNECT, expect CONNACK accepted, close.
fn probe(addr: SocketAddr, secret: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let connect = crate::frontdoor::mqtt::encode_connect(&crate::frontdoor::mqtt::Connect {
        clean_session: true,
        keep_alive: 10,
        client_id: "outpost~core-probe".into(),
        will: None,
        username: Some("outpost~core-probe".into()),
        password: Some(secret.as_bytes().to_vec()),
    });
    let mut ack = [0u8; 4];
    // No DISCONNECT: rumqttd logs a client's DISCONNECT racing its own link teardown as
    // ERROR "router-drop"; a closed socket is its quiet "disconnected" (info).
    s.write_all(&connect).is_ok() && s.read_exact(&mut ack).is_ok() && ack == [0x20, 2, 0, 0]
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// --- configuration section

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Bytes per in-memory log segment of each topic in the routing core.
    pub segment_size: usize,
    /// Segments kept per topic; a subscriber further behind than
    /// `segment_size * segment_count` bytes loses the oldest messages.
    pub segment_count: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            segment_size: 2 * 1024 * 1024,
            segment_count: 4,
        }
    }
}
