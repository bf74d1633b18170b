//! Switching devices back to their primary server (seed 004, S21–S22 and S52–S53).
//!
//! In `cloud-first` mode devices use the cloud broker and fall back to this gateway when the
//! cloud fails them. When the uplink returns (Offline → Online) and the durable queue has
//! drained (the registry sync and the devices' messages are up), the gateway tells every
//! device connected to it to go back: a QoS 1 message on
//! `devices/{id}/commands/outpost/switch` with `{"server": "<primary>", "reason": ...}`,
//! each after a random delay within `fdo.switch_spread`, so that a thousand devices do not
//! reconnect to the cloud in the same second.

use crate::broker::BrokerLink;
use crate::frontdoor::SessionRegistry;
use crate::uplink::{LinkState, UplinkHandle};
use rand::Rng;
use rumqttc::QoS;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The command topic of one device.
pub fn topic(device: &str) -> String {
    format!("devices/{device}/commands/outpost/switch")
}

/// The gateway's own client of the routing core.
const CLIENT_ID: &str = "outpost~switch";

/// Run until shutdown: after every Offline → Online transition, once the queue is empty,
/// tell the connected devices to use `primary`.
pub async fn run(
    primary: String,
    spread: Duration,
    uplink: UplinkHandle,
    sessions: Arc<crate::frontdoor::Shared>,
    core: BrokerLink,
    shutdown: CancellationToken,
) {
    let client = crate::broker::local_client(&core, CLIENT_ID, shutdown.clone());
    let mut state = uplink.state.clone();
    let mut was = *state.borrow_and_update();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = state.changed() => if r.is_err() { return },
        }
        let now = *state.borrow_and_update();
        let recovered = was == LinkState::Offline && now == LinkState::Online;
        was = now;
        if !recovered {
            continue;
        }
        // Wait for the drain: the registry sync and the devices' data go first.
        let depth = &uplink.queue.stats().depth;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while depth.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            if *state.borrow() != LinkState::Online {
                break;
            }
        }
        if *state.borrow() != LinkState::Online {
            continue;
        }
        let devices = live_devices(&sessions.sessions);
        tracing::info!(devices = devices.len(), %primary, ?spread, "link back and queue drained: telling devices to switch to their primary server");
        let body = serde_json::json!({
            "server": primary,
            "reason": "the cloud is reachable again and the registry is synced",
        })
        .to_string();
        for d in devices {
            let (client, body, s) = (client.clone(), body.clone(), shutdown.clone());
            let durable = sessions.durable.clone();
            let delay = if spread.is_zero() {
                Duration::ZERO
            } else {
                spread.mul_f64(rand::thread_rng().gen_range(0.0..1.0))
            };
            tokio::spawn(async move {
                tokio::select! {
                    _ = s.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                // A device with a persistent session gets its QoS 1 messages from its
                // durable queue (the core's copy to it is dropped): queue it there first.
                if let Some(q) = &durable {
                    let payload = bytes::Bytes::from(body.clone());
                    if let Err(e) = q
                        .publish_internal_durable(&topic(&d), CLIENT_ID, 1, false, payload)
                        .await
                    {
                        tracing::warn!(device = %d, error = %e, "switch command not queued for the device's session");
                    }
                }
                if let Err(e) = client
                    .publish(topic(&d), QoS::AtLeastOnce, false, body)
                    .await
                {
                    tracing::warn!(device = %d, error = %e, "switch command not sent");
                }
            });
        }
    }
}

fn live_devices(sessions: &SessionRegistry) -> Vec<String> {
    sessions
        .live()
        .into_iter()
        // Devices only: local clients (`local~X`) and the gateway's own clients
        // (`outpost~...`, which never pass the front door anyway) are not told to switch.
        .filter(|id| !id.contains('~'))
        .collect()
}
