//! Counters and gauges, rendered as Prometheus text on a loopback HTTP port.
//!
//! Plain atomics: every capability increments what it owns; nobody locks anything to count.

use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Default, Debug)]
pub struct Metrics {
    pub connections_open: AtomicI64,
    pub connections_total: AtomicU64,
    pub connections_refused_limit: AtomicU64,
    pub connections_refused_identity: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub tls_handshake_timeouts: AtomicU64,
    pub connect_timeouts: AtomicU64,
    pub malformed_packets: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub acl_denied_publish: AtomicU64,
    pub acl_denied_subscribe: AtomicU64,
    pub revoked_disconnects: AtomicU64,
    pub expired_disconnects: AtomicU64,
    pub sessions_taken_over: AtomicU64,
    /// Sessions the routing core ended without the client's DISCONNECT (`end=CoreClosed`).
    pub core_closed: AtomicU64,
    /// SUBSCRIBE filters refused by a bound, by `FilterRefusal::ALL` order.
    pub subscribe_refused: [AtomicU64; 5],
    pub retain_refused_device: AtomicU64,
    pub retain_refused_bytes: AtomicU64,
    /// Distinct filters the routing core holds (it frees none).
    pub core_filters: AtomicI64,
    pub retained_bytes: AtomicI64,
    pub log_suppressed: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn inc(&self, pick: impl Fn(&Metrics) -> &AtomicU64) {
        inc(pick(self));
    }

    pub fn add(&self, pick: impl Fn(&Metrics) -> &AtomicU64, n: u64) {
        pick(self).fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, labels: &str, v: i64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{labels} {v}"
            );
        };
        metric(
            "outpost_connections_open",
            "gauge",
            "Open client connections.",
            "",
            self.connections_open.load(Ordering::Relaxed),
        );
        metric(
            "outpost_connections_total",
            "counter",
            "Client connections accepted.",
            "",
            g(&self.connections_total) as i64,
        );
        metric(
            "outpost_connections_refused_total",
            "counter",
            "Connections refused before MQTT, by reason.",
            "{reason=\"limit\"}",
            g(&self.connections_refused_limit) as i64,
        );
        metric(
            "outpost_connections_refused_identity_total",
            "counter",
            "CONNECTs refused with return code 2: client id not the certificate's, not a valid local id, or empty with CleanSession 0.",
            "",
            g(&self.connections_refused_identity) as i64,
        );
        metric(
            "outpost_tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed (no, unknown, expired or revoked certificate; garbage).",
            "",
            g(&self.tls_handshake_failures) as i64,
        );
        metric(
            "outpost_tls_handshake_timeouts_total",
            "counter",
            "TLS handshakes that timed out.",
            "",
            g(&self.tls_handshake_timeouts) as i64,
        );
        metric(
            "outpost_connect_timeouts_total",
            "counter",
            "Connections closed waiting for CONNECT.",
            "",
            g(&self.connect_timeouts) as i64,
        );
        metric(
            "outpost_malformed_packets_total",
            "counter",
            "Connections closed for a malformed packet.",
            "",
            g(&self.malformed_packets) as i64,
        );
        metric(
            "outpost_messages_in_total",
            "counter",
            "PUBLISH packets received from clients.",
            "",
            g(&self.messages_in) as i64,
        );
        metric(
            "outpost_messages_out_total",
            "counter",
            "PUBLISH packets delivered to clients.",
            "",
            g(&self.messages_out) as i64,
        );
        metric(
            "outpost_bytes_in_total",
            "counter",
            "MQTT bytes received from clients.",
            "",
            g(&self.bytes_in) as i64,
        );
        metric(
            "outpost_bytes_out_total",
            "counter",
            "MQTT bytes sent to clients.",
            "",
            g(&self.bytes_out) as i64,
        );
        metric(
            "outpost_acl_denied_total",
            "counter",
            "Operations refused by the topic ACL.",
            "{op=\"publish\"}",
            g(&self.acl_denied_publish) as i64,
        );
        let _ = writeln!(
            out,
            "outpost_acl_denied_total{{op=\"subscribe\"}} {}",
            g(&self.acl_denied_subscribe)
        );
        let _ = writeln!(
            out,
            "# HELP outpost_forced_disconnects_total Live sessions cut by the gateway.\n# TYPE outpost_forced_disconnects_total counter\noutpost_forced_disconnects_total{{reason=\"revoked\"}} {}\noutpost_forced_disconnects_total{{reason=\"expired\"}} {}\noutpost_forced_disconnects_total{{reason=\"taken_over\"}} {}\noutpost_forced_disconnects_total{{reason=\"core\"}} {}",
            g(&self.revoked_disconnects),
            g(&self.expired_disconnects),
            g(&self.sessions_taken_over),
            g(&self.core_closed)
        );
        let _ = writeln!(
            out,
            "# HELP outpost_subscribe_refused_total SUBSCRIBE filters refused by a bound (SUBACK failure), by reason.\n# TYPE outpost_subscribe_refused_total counter"
        );
        for (r, c) in crate::frontdoor::bounds::FilterRefusal::ALL
            .iter()
            .zip(&self.subscribe_refused)
        {
            let _ = writeln!(
                out,
                "outpost_subscribe_refused_total{{reason=\"{}\"}} {}",
                r.label(),
                g(c)
            );
        }
        let _ = writeln!(
            out,
            "# HELP outpost_retain_refused_total Retained PUBLISHes delivered without being stored (a bound), by reason.\n# TYPE outpost_retain_refused_total counter\noutpost_retain_refused_total{{reason=\"device\"}} {}\noutpost_retain_refused_total{{reason=\"bytes\"}} {}",
            g(&self.retain_refused_device),
            g(&self.retain_refused_bytes)
        );
        let _ = writeln!(
            out,
            "# HELP outpost_core_filters Distinct subscription filters the routing core holds.\n# TYPE outpost_core_filters gauge\noutpost_core_filters {}",
            self.core_filters.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP outpost_retained_bytes Bytes of retained messages clients set in the routing core.\n# TYPE outpost_retained_bytes gauge\noutpost_retained_bytes {}",
            self.retained_bytes.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP outpost_log_suppressed_total Warnings not logged (per-connection rate limit).\n# TYPE outpost_log_suppressed_total counter\noutpost_log_suppressed_total {}",
            g(&self.log_suppressed)
        );
        out
    }
}

/// Serve `/metrics` and `/healthz` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::{routing::get, Router};
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = render();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        text,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

// --- configuration section

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// Prometheus text at `http://{listen}/metrics`. Loopback unless you mean otherwise.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9883)),
        }
    }
}
