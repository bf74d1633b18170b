//! systemd integration: READY=1 once listeners are bound, watchdog pings, STOPPING=1.
//! Each call is a no-op when not started by systemd (no NOTIFY_SOCKET).

use sd_notify::NotifyState;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub fn ready() {
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

/// Ping the watchdog at half its interval, from the runtime that serves clients: a wedged
/// runtime stops the pings and systemd restarts the service.
pub async fn watchdog(shutdown: CancellationToken) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    tracing::info!(?every, "systemd watchdog enabled");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(every) => { let _ = sd_notify::notify(false, &[NotifyState::Watchdog]); }
        }
    }
}
