//! Internet-loss detection (seed 004's "detection unit").
//!
//! A two-state machine with hysteresis, fed by probe results. Online means an MQTT session the
//! cloud broker accepted: the only good verdicts are an accepted CONNACK and MQTT round trips
//! on that session (a data PUBACK or a heartbeat publish). While the session is down, a fresh
//! TCP connect + TLS handshake to the cloud endpoint ([`tls_probe`]) can only fail a verdict
//! (its success merely lets the session task retry at once: TLS completing says nothing about
//! whether the broker accepts the session). A refused CONNACK is its own verdict
//! ([`Hysteresis::refused`]). Only the verdicts reach this module, so it is pure and tested
//! transition by transition.

use serde::Serialize;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Online,
    Offline,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Online => "online",
            LinkState::Offline => "offline",
        }
    }
}

/// Hysteresis: `failures` consecutive failed probes take the link Offline, `successes`
/// consecutive good ones bring it back.
#[derive(Debug, Clone)]
pub struct Hysteresis {
    state: LinkState,
    fails: u32,
    oks: u32,
    failures_to_offline: u32,
    successes_to_online: u32,
}

impl Hysteresis {
    /// Starts Offline: nothing is proven until a probe succeeds.
    pub fn new(failures_to_offline: u32, successes_to_online: u32) -> Hysteresis {
        Hysteresis {
            state: LinkState::Offline,
            fails: 0,
            oks: 0,
            failures_to_offline: failures_to_offline.max(1),
            successes_to_online: successes_to_online.max(1),
        }
    }

    pub fn state(&self) -> LinkState {
        self.state
    }

    /// Record one probe verdict; returns the new state if it changed.
    pub fn observe(&mut self, ok: bool) -> Option<LinkState> {
        if ok {
            self.fails = 0;
            self.oks = self.oks.saturating_add(1);
            if self.state == LinkState::Offline && self.oks >= self.successes_to_online {
                self.state = LinkState::Online;
                return Some(self.state);
            }
        } else {
            self.oks = 0;
            self.fails = self.fails.saturating_add(1);
            if self.state == LinkState::Online && self.fails >= self.failures_to_offline {
                self.state = LinkState::Offline;
                return Some(self.state);
            }
        }
        None
    }

    /// The cloud broker refused the session (CONNACK with a non-zero return code): that is
    /// not a lossy link but a definite answer, so the link is Offline at once whatever the
    /// failure threshold, and the good verdicts seen so far no longer count.
    pub fn refused(&mut self) -> Option<LinkState> {
        self.oks = 0;
        self.fails = self.fails.saturating_add(1);
        if self.state == LinkState::Online {
            self.state = LinkState::Offline;
            return Some(self.state);
        }
        None
    }
}

/// A TCP connect + TLS handshake to `host:port`, bounded by `timeout`.
pub async fn tls_probe(
    host: &str,
    port: u16,
    tls: std::sync::Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Duration, String> {
    let started = tokio::time::Instant::now();
    let name =
        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(tls);
        let mut s = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        use tokio::io::AsyncWriteExt;
        let _ = s.shutdown().await;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer in {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_to_online_needs_consecutive_successes() {
        let mut h = Hysteresis::new(1, 2);
        assert_eq!(h.state(), LinkState::Offline);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(LinkState::Online));
    }

    #[test]
    fn online_to_offline_after_configured_failures() {
        let mut h = Hysteresis::new(2, 1);
        assert_eq!(h.observe(true), Some(LinkState::Online));
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(LinkState::Offline));
    }

    #[test]
    fn online_stays_online_while_successes_continue() {
        let mut h = Hysteresis::new(1, 1);
        h.observe(true);
        for _ in 0..100 {
            assert_eq!(h.observe(true), None);
        }
        assert_eq!(h.state(), LinkState::Online);
    }

    #[test]
    fn online_to_offline_at_once_on_refused_session() {
        let mut h = Hysteresis::new(3, 1);
        assert_eq!(h.observe(true), Some(LinkState::Online));
        assert_eq!(h.refused(), Some(LinkState::Offline));
    }

    #[test]
    fn offline_stays_offline_while_refused_and_refusal_resets_successes() {
        let mut h = Hysteresis::new(1, 2);
        assert_eq!(h.refused(), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.refused(), None);
        assert_eq!(
            h.observe(true),
            None,
            "the success before the refusal must not count"
        );
        assert_eq!(h.observe(true), Some(LinkState::Online));
    }

    #[test]
    fn zero_thresholds_behave_as_one() {
        let mut h = Hysteresis::new(0, 0);
        assert_eq!(h.observe(true), Some(LinkState::Online));
        assert_eq!(h.observe(false), Some(LinkState::Offline));
    }
}
