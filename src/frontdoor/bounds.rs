//! What one client can make the gateway hold: subscription filters, retained messages and
//! log lines.
//!
//! The routing core (rumqttd 0.20) never frees a filter once it has been given one (about
//! 6 KB each, plus its log), keeps every retained message until it is cleared, and keeps the
//! messages of a persistent session's filters while the subscriber is away (in each filter's
//! log, at most `broker.segment_size * broker.segment_count` bytes). So the front door counts,
//! per identity as the core knows it (a device's identity, a local client's `local~X`):
//!
//! * the filters of this connection and of the identity's session (`max_filters_per_*`);
//!   a clean session starts empty, a persistent one keeps what the core keeps;
//! * the distinct filters the identity gave the core first (`max_new_filters_per_device`),
//!   and all distinct filters of the core (`max_core_filters`), which never go down;
//! * retained messages by owner (the identity that last set the topic) and their bytes.
//!
//! Excess filters are answered with SUBACK failure codes; an excess retained PUBLISH is
//! delivered, but with its retain flag cleared, so the core does not store it.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// `[frontdoor]`: bounds per connection and per identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FrontDoorConfig {
    /// Distinct filters one connection may hold subscribed.
    pub max_filters_per_connection: usize,
    /// Distinct filters one identity's session may hold in the core (a persistent session
    /// keeps them across connections).
    pub max_filters_per_device: usize,
    /// Distinct filters one identity may be the first to give the core since start. The
    /// core never frees a filter, so this does not go down on UNSUBSCRIBE or disconnect.
    pub max_new_filters_per_device: usize,
    /// Distinct filters the core may hold in all.
    pub max_core_filters: usize,
    /// Longest filter (bytes) the core is given.
    pub max_filter_length: usize,
    /// Retained messages one identity may own (it set them last).
    pub max_retained_per_device: usize,
    /// Bytes (topic + payload) of all retained messages.
    pub max_retained_bytes: usize,
    /// Warnings one connection may log per `warn_interval`; the rest are counted
    /// (`outpost_log_suppressed_total`) and summarised in one line.
    pub warn_burst: u32,
    #[serde(with = "crate::duration")]
    pub warn_interval: Duration,
}

impl Default for FrontDoorConfig {
    fn default() -> Self {
        FrontDoorConfig {
            max_filters_per_connection: 100,
            max_filters_per_device: 100,
            max_new_filters_per_device: 1000,
            max_core_filters: 50_000,
            max_filter_length: 1024,
            max_retained_per_device: 100,
            max_retained_bytes: 64 * 1024 * 1024,
            warn_burst: 10,
            warn_interval: Duration::from_secs(60),
        }
    }
}

impl FrontDoorConfig {
    /// Errors name the dotted field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (field, v) in [
            (
                "frontdoor.max_filters_per_connection",
                self.max_filters_per_connection,
            ),
            (
                "frontdoor.max_filters_per_device",
                self.max_filters_per_device,
            ),
            (
                "frontdoor.max_new_filters_per_device",
                self.max_new_filters_per_device,
            ),
            ("frontdoor.max_core_filters", self.max_core_filters),
            ("frontdoor.max_retained_bytes", self.max_retained_bytes),
        ] {
            if v == 0 {
                return Err((field, "must be at least 1".into()));
            }
        }
        if !(1..=65535).contains(&self.max_filter_length) {
            return Err(("frontdoor.max_filter_length", "must be 1..=65535".into()));
        }
        if self.warn_interval.is_zero() {
            return Err(("frontdoor.warn_interval", "must be > 0".into()));
        }
        Ok(())
    }
}

/// Why a filter was refused (the `reason` label of `outpost_subscribe_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterRefusal {
    Length,
    Connection,
    Device,
    DeviceNew,
    Core,
}

impl FilterRefusal {
    pub const ALL: [FilterRefusal; 5] = [
        FilterRefusal::Length,
        FilterRefusal::Connection,
        FilterRefusal::Device,
        FilterRefusal::DeviceNew,
        FilterRefusal::Core,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FilterRefusal::Length => "filter_length",
            FilterRefusal::Connection => "connection",
            FilterRefusal::Device => "device",
            FilterRefusal::DeviceNew => "device_new",
            FilterRefusal::Core => "core",
        }
    }
}

/// Why a retained message was not stored (`outpost_retain_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainRefusal {
    Device,
    Total,
}

impl RetainRefusal {
    pub fn label(self) -> &'static str {
        match self {
            RetainRefusal::Device => "device",
            RetainRefusal::Total => "bytes",
        }
    }
}

#[derive(Default)]
struct Identity {
    /// Filters of the session in the core.
    session: HashSet<String>,
    /// Filters this identity gave the core first.
    introduced: usize,
    /// Retained messages it owns.
    retained: usize,
}

impl Identity {
    fn is_empty(&self) -> bool {
        self.session.is_empty() && self.introduced == 0 && self.retained == 0
    }
}

struct Retained {
    owner: String,
    bytes: usize,
}

#[derive(Default)]
struct State {
    /// Every filter the core has been given (it frees none).
    known: HashSet<String>,
    ids: HashMap<String, Identity>,
    retained: HashMap<String, Retained>,
    retained_bytes: usize,
}

/// The shared accounting; every operation is short and takes the lock once.
#[derive(Default)]
pub struct Bounds {
    state: std::sync::Mutex<State>,
}

impl Bounds {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session of `id` reaches the core: a clean one starts without subscriptions.
    pub fn session_start(&self, id: &str, clean: bool) {
        if clean {
            self.session_end(id, true);
        }
    }

    /// A session of `id` ended: the core drops a clean session's subscriptions.
    pub fn session_end(&self, id: &str, clean: bool) {
        let mut st = self.lock();
        if let Some(i) = st.ids.get_mut(id) {
            if clean {
                i.session.clear();
            }
            if i.is_empty() {
                st.ids.remove(id);
            }
        }
    }

    /// Decide every filter of one SUBSCRIBE (after the ACL), in order; admitted filters are
    /// added to `conn` (this connection's filters) and to the identity's session.
    pub fn admit_filters<'f>(
        &self,
        cfg: &FrontDoorConfig,
        id: &str,
        conn: &mut HashSet<String>,
        filters: impl IntoIterator<Item = &'f str>,
    ) -> Vec<Result<(), FilterRefusal>> {
        let mut st = self.lock();
        let State { known, ids, .. } = &mut *st;
        let who = ids.entry(id.to_string()).or_default();
        let verdicts = filters
            .into_iter()
            .map(|f| {
                if f.len() > cfg.max_filter_length {
                    return Err(FilterRefusal::Length);
                }
                if !conn.contains(f) && conn.len() >= cfg.max_filters_per_connection {
                    return Err(FilterRefusal::Connection);
                }
                if !who.session.contains(f) && who.session.len() >= cfg.max_filters_per_device {
                    return Err(FilterRefusal::Device);
                }
                if !known.contains(f) {
                    if who.introduced >= cfg.max_new_filters_per_device {
                        return Err(FilterRefusal::DeviceNew);
                    }
                    if known.len() >= cfg.max_core_filters {
                        return Err(FilterRefusal::Core);
                    }
                    known.insert(f.to_string());
                    who.introduced += 1;
                }
                conn.insert(f.to_string());
                who.session.insert(f.to_string());
                Ok(())
            })
            .collect();
        if who.is_empty() {
            ids.remove(id);
        }
        verdicts
    }

    /// UNSUBSCRIBE: the filters leave the connection and the session (not the core).
    pub fn unsubscribe(&self, id: &str, conn: &mut HashSet<String>, filters: &[String]) {
        let mut st = self.lock();
        for f in filters {
            conn.remove(f);
        }
        if let Some(i) = st.ids.get_mut(id) {
            for f in filters {
                i.session.remove(f);
            }
            if i.is_empty() {
                st.ids.remove(id);
            }
        }
    }

    /// A retained PUBLISH (non-empty payload) of `id` on `topic`: may the core store it?
    pub fn admit_retained(
        &self,
        cfg: &FrontDoorConfig,
        id: &str,
        topic: &str,
        bytes: usize,
    ) -> Result<(), RetainRefusal> {
        let mut st = self.lock();
        let (old_owner, old_bytes) = match st.retained.get(topic) {
            Some(r) => (Some(r.owner.as_str() == id), r.bytes),
            None => (None, 0),
        };
        let owned = st.ids.get(id).map_or(0, |i| i.retained);
        if old_owner != Some(true) && owned >= cfg.max_retained_per_device {
            return Err(RetainRefusal::Device);
        }
        if st.retained_bytes - old_bytes + bytes > cfg.max_retained_bytes {
            return Err(RetainRefusal::Total);
        }
        if old_owner.is_some() {
            self.forget_retained(&mut st, topic);
        }
        st.retained_bytes += bytes;
        st.retained.insert(
            topic.to_string(),
            Retained {
                owner: id.to_string(),
                bytes,
            },
        );
        st.ids.entry(id.to_string()).or_default().retained += 1;
        Ok(())
    }

    /// A PUBLISH with an empty payload: the core clears the topic's retained message.
    pub fn retained_cleared(&self, topic: &str) {
        let mut st = self.lock();
        self.forget_retained(&mut st, topic);
    }

    fn forget_retained(&self, st: &mut State, topic: &str) {
        if let Some(old) = st.retained.remove(topic) {
            st.retained_bytes -= old.bytes;
            if let Some(i) = st.ids.get_mut(&old.owner) {
                i.retained = i.retained.saturating_sub(1);
                if i.is_empty() {
                    st.ids.remove(&old.owner);
                }
            }
        }
    }

    /// Distinct filters the core holds.
    pub fn core_filters(&self) -> usize {
        self.lock().known.len()
    }

    /// Bytes of retained messages the core holds (as far as clients set them).
    pub fn retained_bytes(&self) -> usize {
        self.lock().retained_bytes
    }
}

/// Per-connection warning budget: `burst` lines per `interval`, the rest counted and
/// summarised in one line when the interval ends or the connection does.
pub struct WarnLimiter {
    /// Budget of the whole gateway (one kind of warning), not of one connection.
    gateway_wide: bool,
    burst: u32,
    interval: Duration,
    window: Instant,
    used: u32,
    suppressed: u64,
}

impl WarnLimiter {
    pub fn new(cfg: &FrontDoorConfig) -> WarnLimiter {
        WarnLimiter {
            gateway_wide: false,
            burst: cfg.warn_burst,
            interval: cfg.warn_interval,
            window: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    /// The same budget for one kind of warning across all connections.
    pub fn gateway_wide(cfg: &FrontDoorConfig) -> WarnLimiter {
        WarnLimiter {
            gateway_wide: true,
            ..WarnLimiter::new(cfg)
        }
    }

    /// Whether to log the next warning; `false` means it was suppressed (count it).
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window) >= self.interval {
            self.summarise();
            self.window = now;
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    fn summarise(&mut self) {
        if self.suppressed > 0 {
            if self.gateway_wide {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "more warnings of this kind suppressed (outpost_log_suppressed_total)"
                );
            } else {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "more warnings of this connection suppressed (outpost_log_suppressed_total)"
                );
            }
            self.suppressed = 0;
        }
    }
}

impl Drop for WarnLimiter {
    fn drop(&mut self) {
        self.summarise();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> FrontDoorConfig {
        FrontDoorConfig {
            max_filters_per_connection: 3,
            max_filters_per_device: 4,
            max_new_filters_per_device: 5,
            max_core_filters: 7,
            max_filter_length: 8,
            max_retained_per_device: 2,
            max_retained_bytes: 100,
            ..FrontDoorConfig::default()
        }
    }

    #[test]
    fn filters_are_capped_per_connection_device_and_core() {
        let (b, c) = (Bounds::default(), cfg());
        let mut conn = HashSet::new();
        let v = b.admit_filters(&c, "a", &mut conn, ["a/1", "a/2", "a/2", "a/3", "a/4"]);
        use FilterRefusal::*;
        assert_eq!(v, vec![Ok(()), Ok(()), Ok(()), Ok(()), Err(Connection)]);
        assert_eq!(
            b.admit_filters(&c, "a", &mut conn, ["0123456789"]),
            vec![Err(Length)]
        );
        // A persistent session keeps its three filters: the next connection may add one.
        b.session_end("a", false);
        let mut conn2 = HashSet::new();
        assert_eq!(
            b.admit_filters(&c, "a", &mut conn2, ["a/4", "a/5"]),
            vec![Ok(()), Err(Device)]
        );
        // Unsubscribing frees session room, but not the core's: a/1..a/4 stay introduced.
        b.unsubscribe("a", &mut conn2, &["a/4".into()]);
        b.session_end("a", true);
        let mut conn3 = HashSet::new();
        assert_eq!(
            b.admit_filters(&c, "a", &mut conn3, ["a/1", "a/5", "a/6"]),
            vec![Ok(()), Ok(()), Err(DeviceNew)]
        );
        // Known filters cost nobody anything new; the core total caps everyone.
        let mut cb = HashSet::new();
        assert_eq!(
            b.admit_filters(&c, "b", &mut cb, ["a/1", "b/1", "b/2", "b/3"]),
            vec![Ok(()), Ok(()), Ok(()), Err(Connection)]
        );
        assert_eq!(b.core_filters(), 7);
        let mut cc = HashSet::new();
        assert_eq!(
            b.admit_filters(&c, "c", &mut cc, ["c/1", "b/1"]),
            vec![Err(Core), Ok(())]
        );
    }

    #[test]
    fn retained_messages_are_capped_by_owner_and_bytes() {
        let (b, c) = (Bounds::default(), cfg());
        assert_eq!(b.admit_retained(&c, "a", "t/1", 10), Ok(()));
        assert_eq!(b.admit_retained(&c, "a", "t/2", 10), Ok(()));
        assert_eq!(
            b.admit_retained(&c, "a", "t/3", 10),
            Err(RetainRefusal::Device)
        );
        // Replacing one's own is fine; clearing frees the slot.
        assert_eq!(b.admit_retained(&c, "a", "t/2", 20), Ok(()));
        b.retained_cleared("t/1");
        assert_eq!(b.admit_retained(&c, "a", "t/3", 10), Ok(()));
        assert_eq!(b.retained_bytes(), 30);
        // Another owner takes t/3 over; the byte total caps everyone.
        assert_eq!(b.admit_retained(&c, "b", "t/3", 60), Ok(()));
        assert_eq!(b.admit_retained(&c, "a", "t/4", 5), Ok(()));
        assert_eq!(
            b.admit_retained(&c, "b", "t/5", 20),
            Err(RetainRefusal::Total)
        );
        assert_eq!(b.retained_bytes(), 85);
    }

    #[test]
    fn warnings_are_limited_per_window() {
        let mut c = cfg();
        c.warn_burst = 2;
        let mut w = WarnLimiter::new(&c);
        assert_eq!((w.allow(), w.allow(), w.allow()), (true, true, false));
        assert_eq!(w.suppressed, 1);
        w.window -= c.warn_interval;
        assert!(w.allow());
        assert_eq!(w.suppressed, 0);
    }
}
