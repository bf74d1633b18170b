//! At start, before any listener accepts: every retained message the sessions capability
//! kept on disk is published back into the routing core (rumqttd keeps nothing on disk),
//! and counted again in the retained bounds under the identity that set it.

use super::bounds::{Bounds, FrontDoorConfig};
use super::mqtt;
use crate::broker::BrokerLink;
use crate::sessions::SessionsHandle;
use bytes::{Buf, BytesMut};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The restore client's id in the core (the gateway's own namespace).
const CLIENT_ID: &str = "outpost~restore";
/// QoS 1 publishes in flight at once (below the core's `max_inflight`).
const WINDOW: usize = 32;
const LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("reading the retained messages: {0}")]
    Sessions(#[from] crate::sessions::SessionsError),
    #[error("routing core: {0}")]
    Io(#[from] std::io::Error),
    #[error("routing core refused the restore client (CONNACK {0})")]
    Refused(u8),
    #[error("routing core sent a malformed frame: {0}")]
    Malformed(#[from] mqtt::MqttError),
    #[error("restoring {left} retained messages took longer than {LIMIT:?}")]
    Timeout { left: usize },
}

/// What the restore did.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    pub retained: usize,
    pub elapsed: Duration,
}

pub async fn retained_into_core(
    link: &BrokerLink,
    sessions: &SessionsHandle,
    bounds: &Bounds,
    cfg: &FrontDoorConfig,
) -> Result<Restored, RestoreError> {
    let started = Instant::now();
    let all = sessions.retained().await?;
    if all.is_empty() {
        return Ok(Restored {
            retained: 0,
            elapsed: started.elapsed(),
        });
    }
    for (topic, rec) in &all {
        // Counted again under their owner; one over a bound lowered since is still restored
        // (it was accepted under the old one) and goes once it is replaced or cleared.
        let _ = bounds.admit_retained(cfg, &rec.owner, topic, topic.len() + rec.payload.len());
    }
    let n = all.len();
    match tokio::time::timeout(LIMIT, publish_all(link, all)).await {
        Ok(r) => r?,
        Err(_) => return Err(RestoreError::Timeout { left: n }),
    }
    sessions
        .stats
        .restored_retained
        .store(n as u64, std::sync::atomic::Ordering::Relaxed);
    let elapsed = started.elapsed();
    sessions.stats.restore_ms.store(
        elapsed.as_millis() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(Restored {
        retained: n,
        elapsed,
    })
}

async fn publish_all(
    link: &BrokerLink,
    all: Vec<(String, crate::sessions::record::RetainedRecord)>,
) -> Result<(), RestoreError> {
    let mut core = super::dial_core(link).await?;
    let connect = mqtt::Connect {
        client_id: CLIENT_ID.into(),
        clean_session: true,
        keep_alive: 60,
        username: Some(CLIENT_ID.into()),
        password: Some(link.secret.as_bytes().to_vec()),
        will: None,
    };
    core.write_all(&mqtt::encode_connect(&connect)).await?;
    let mut buf = BytesMut::new();
    let mut connacked = false;
    let mut outstanding = 0usize;
    let mut next = all.into_iter().enumerate().peekable();
    loop {
        // Fill the window, then read what the core answered.
        if connacked {
            let mut out = BytesMut::new();
            while outstanding < WINDOW {
                let Some((i, (topic, rec))) = next.next() else {
                    break;
                };
                let pid = (i % 65_535) as u16 + 1;
                out.extend_from_slice(&mqtt::encode_publish(
                    &topic,
                    1,
                    true,
                    false,
                    pid,
                    &rec.payload,
                ));
                outstanding += 1;
            }
            if !out.is_empty() {
                core.write_all(&out).await?;
            }
            if outstanding == 0 && next.peek().is_none() {
                let _ = core.write_all(&[mqtt::DISCONNECT << 4, 0]).await;
                let _ = core.shutdown().await;
                return Ok(());
            }
        }
        if core.read_buf(&mut buf).await? == 0 {
            return Err(RestoreError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        while let Some((ptype, _, hdr, total)) = mqtt::frame(&buf, usize::MAX)? {
            match ptype {
                mqtt::CONNACK => {
                    let code = buf.get(hdr + 1).copied().unwrap_or(0xff);
                    if code != 0 {
                        return Err(RestoreError::Refused(code));
                    }
                    connacked = true;
                }
                mqtt::PUBACK => outstanding = outstanding.saturating_sub(1),
                _ => {}
            }
            buf.advance(total);
        }
    }
}
