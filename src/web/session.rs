//! Sessions (a random 256-bit id in a cookie, a server-side table, bounded, with idle and
//! absolute expiry), their CSRF tokens, and the login throttle (failures counted per user
//! and per source address; an increasing delay, then a lockout).
//!
//! Everything here takes the time as an argument, so the policies are tested without
//! sleeping; nothing here is held across an `.await` (plain functions on `&mut self`).

use std::collections::HashMap;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const COOKIE: &str = "outpost_session";

fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    hex::encode(b)
}

/// One logged-in admin.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    /// The token every state-changing request of this session carries.
    pub csrf: String,
    created: Instant,
    last: Instant,
}

/// Constant-time comparison of a presented CSRF token with the session's.
pub fn csrf_ok(session: &Session, presented: Option<&str>) -> bool {
    match presented {
        Some(p) => bool::from(p.as_bytes().ct_eq(session.csrf.as_bytes())),
        None => false,
    }
}

/// The session table.
pub struct Sessions {
    map: HashMap<String, Session>,
    idle: Duration,
    max_age: Duration,
    capacity: usize,
}

impl Sessions {
    pub fn new(idle: Duration, max_age: Duration, capacity: usize) -> Sessions {
        Sessions {
            map: HashMap::new(),
            idle,
            max_age,
            capacity: capacity.max(1),
        }
    }

    /// A new session for `user`: its id (the cookie's value) and the session.
    pub fn create(&mut self, user: &str, now: Instant) -> (String, Session) {
        self.map
            .retain(|_, s| live(s, now, self.idle, self.max_age));
        while self.map.len() >= self.capacity {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    self.map.remove(&k);
                }
                None => break,
            }
        }
        let id = random_hex();
        let s = Session {
            user: user.into(),
            csrf: random_hex(),
            created: now,
            last: now,
        };
        self.map.insert(id.clone(), s.clone());
        (id, s)
    }

    /// The live session `id`, its idle time restarted; an expired one is removed.
    pub fn touch(&mut self, id: &str, now: Instant) -> Option<Session> {
        // Only ids of our own shape are looked up (bounds the hashing of peer input).
        if id.len() != 64 {
            return None;
        }
        let s = self.map.get_mut(id)?;
        if !live(s, now, self.idle, self.max_age) {
            self.map.remove(id);
            return None;
        }
        s.last = now;
        Some(s.clone())
    }

    pub fn remove(&mut self, id: &str) {
        self.map.remove(id);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

fn live(s: &Session, now: Instant, idle: Duration, max_age: Duration) -> bool {
    now.saturating_duration_since(s.last) < idle
        && now.saturating_duration_since(s.created) < max_age
}

/// The login policy's numbers.
#[derive(Debug, Clone, Copy)]
pub struct LoginPolicy {
    pub max_failures: u32,
    pub window: Duration,
    pub lockout: Duration,
    pub delay: Duration,
}

/// The longest delay a failed login waits.
pub const MAX_DELAY: Duration = Duration::from_secs(8);
/// Most users and addresses tracked; beyond, the entries whose window ended go first,
/// then the oldest.
pub const MAX_TRACKED: usize = 16_384;

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

/// What the throttle says about a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Locked: no password is checked until then.
    Locked {
        remaining: Duration,
    },
}

/// Failed logins per key (`user:<name>`, `ip:<address>`).
pub struct Throttle {
    policy: LoginPolicy,
    map: HashMap<String, Entry>,
}

impl Throttle {
    pub fn new(policy: LoginPolicy) -> Throttle {
        Throttle {
            policy,
            map: HashMap::new(),
        }
    }

    /// Whether any of `keys` is locked at `now`.
    pub fn gate(&self, keys: &[&str], now: Instant) -> Gate {
        let mut remaining = Duration::ZERO;
        for k in keys {
            if let Some(until) = self.map.get(*k).and_then(|e| e.locked_until) {
                remaining = remaining.max(until.saturating_duration_since(now));
            }
        }
        if remaining.is_zero() {
            Gate::Open
        } else {
            Gate::Locked { remaining }
        }
    }

    /// Count a failure against every key: how long to wait before answering it.
    pub fn fail(&mut self, keys: &[&str], now: Instant) -> Duration {
        if self.map.len() + keys.len() > MAX_TRACKED {
            let window = self.policy.window;
            self.map.retain(|_, e| {
                now.saturating_duration_since(e.window_start) < window
                    || e.locked_until.is_some_and(|u| u > now)
            });
            while self.map.len() + keys.len() > MAX_TRACKED {
                let oldest = self
                    .map
                    .iter()
                    .min_by_key(|(_, e)| e.window_start)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => self.map.remove(&k),
                    None => break,
                };
            }
        }
        let mut worst = 0u32;
        for k in keys {
            let e = self.map.entry((*k).to_string()).or_insert(Entry {
                failures: 0,
                window_start: now,
                locked_until: None,
            });
            let lock_over = e.locked_until.is_some_and(|u| u <= now);
            if lock_over || now.saturating_duration_since(e.window_start) >= self.policy.window {
                e.failures = 0;
                e.window_start = now;
                e.locked_until = None;
            }
            e.failures = e.failures.saturating_add(1);
            if e.failures >= self.policy.max_failures {
                e.locked_until = Some(now + self.policy.lockout);
            }
            worst = worst.max(e.failures);
        }
        delay_for(self.policy.delay, worst)
    }

    /// A successful login clears the user's count (not the address's: one admin's success
    /// does not pardon an address guessing other names).
    pub fn succeed(&mut self, user_key: &str) {
        self.map.remove(user_key);
    }

    /// Take back one failure counted in advance (an attempt is counted before its password
    /// is checked, so that parallel guesses cannot all pass the gate; a success is then
    /// forgiven on the address).
    pub fn forgive(&mut self, key: &str) {
        if let Some(e) = self.map.get_mut(key) {
            e.failures = e.failures.saturating_sub(1);
            if e.failures < self.policy.max_failures {
                e.locked_until = None;
            }
        }
    }
}

/// The delay after the `n`th failure: `base`, doubled each further failure, at most
/// [`MAX_DELAY`].
pub fn delay_for(base: Duration, n: u32) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (n - 1).min(16);
    base.saturating_mul(factor).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn sessions_expire_when_idle_and_at_their_maximum_age() {
        let t0 = Instant::now();
        let mut s = Sessions::new(30 * MIN, 8 * 60 * MIN, 16);
        let (id, sess) = s.create("alice", t0);
        assert_eq!(id.len(), 64);
        assert_eq!(sess.csrf.len(), 64);
        assert_ne!(id, sess.csrf);
        // Used every 20 minutes: alive until 8 hours after the login, not after.
        let mut t = t0;
        for _ in 0..23 {
            t += 20 * MIN;
            assert!(s.touch(&id, t).is_some(), "at {:?}", t - t0);
        }
        t += 20 * MIN; // 8h00
        assert!(s.touch(&id, t).is_none());
        assert!(s.is_empty());
        // Idle for 30 minutes: gone.
        let (id, _) = s.create("alice", t0);
        assert!(s.touch(&id, t0 + 29 * MIN).is_some());
        assert!(s.touch(&id, t0 + 59 * MIN).is_none());
        assert!(s.touch("nonsense", t0).is_none());
    }

    #[test]
    fn the_session_table_is_bounded_oldest_first() {
        let t0 = Instant::now();
        let mut s = Sessions::new(30 * MIN, 60 * MIN, 3);
        let ids: Vec<String> = (0..4)
            .map(|i| s.create("a", t0 + Duration::from_secs(i)).0)
            .collect();
        assert_eq!(s.len(), 3);
        let t = t0 + Duration::from_secs(10);
        assert!(s.touch(&ids[0], t).is_none());
        for id in &ids[1..] {
            assert!(s.touch(id, t).is_some());
        }
    }

    #[test]
    fn csrf_tokens_compare_exactly() {
        let mut s = Sessions::new(MIN, MIN, 4);
        let (_, sess) = s.create("a", Instant::now());
        assert!(csrf_ok(&sess, Some(&sess.csrf.clone())));
        assert!(!csrf_ok(&sess, None));
        assert!(!csrf_ok(&sess, Some("")));
        assert!(!csrf_ok(&sess, Some(&sess.csrf[..63])));
        let mut other = sess.csrf.clone().into_bytes();
        other[10] ^= 1;
        assert!(!csrf_ok(&sess, Some(std::str::from_utf8(&other).unwrap())));
    }

    #[test]
    fn failures_delay_more_then_lock_for_the_lockout() {
        let p = LoginPolicy {
            max_failures: 5,
            window: 15 * MIN,
            lockout: 15 * MIN,
            delay: Duration::from_millis(250),
        };
        let mut t = Throttle::new(p);
        let t0 = Instant::now();
        let keys = ["user:alice", "ip:10.0.0.1"];
        let mut delays = Vec::new();
        for i in 0..4 {
            assert_eq!(t.gate(&keys, t0), Gate::Open, "failure {i}");
            delays.push(t.fail(&keys, t0 + Duration::from_secs(i)));
        }
        assert_eq!(
            delays,
            [250, 500, 1000, 2000].map(Duration::from_millis).to_vec()
        );
        assert_eq!(t.gate(&keys, t0 + Duration::from_secs(4)), Gate::Open);
        t.fail(&keys, t0 + Duration::from_secs(4));
        // Locked: per user (from any address) and per address (for any user).
        let later = t0 + Duration::from_secs(5);
        assert!(matches!(
            t.gate(&["user:alice", "ip:other"], later),
            Gate::Locked { .. }
        ));
        assert!(matches!(
            t.gate(&["user:bob", "ip:10.0.0.1"], later),
            Gate::Locked { .. }
        ));
        assert_eq!(t.gate(&["user:bob", "ip:other"], later), Gate::Open);
        match t.gate(&keys, later) {
            Gate::Locked { remaining } => assert_eq!(remaining, 15 * MIN - Duration::from_secs(1)),
            g => panic!("{g:?}"),
        }
        // The lockout ends; the count starts again.
        let after = t0 + Duration::from_secs(4) + 15 * MIN;
        assert_eq!(t.gate(&keys, after), Gate::Open);
        assert_eq!(t.fail(&keys, after), Duration::from_millis(250));
    }

    #[test]
    fn failures_outside_the_window_are_forgotten_and_success_clears_the_user() {
        let p = LoginPolicy {
            max_failures: 3,
            window: MIN,
            lockout: MIN,
            delay: Duration::from_millis(100),
        };
        let mut t = Throttle::new(p);
        let t0 = Instant::now();
        t.fail(&["user:a"], t0);
        t.fail(&["user:a"], t0 + Duration::from_secs(1));
        // Window over: the third failure is the first of a new window.
        assert_eq!(
            t.fail(&["user:a"], t0 + 2 * MIN),
            Duration::from_millis(100)
        );
        t.succeed("user:a");
        assert_eq!(
            t.fail(&["user:a"], t0 + 2 * MIN),
            Duration::from_millis(100)
        );
        // Two failures and a forgiven third attempt: not locked.
        t.fail(&["ip:x"], t0);
        t.fail(&["ip:x"], t0);
        t.fail(&["ip:x"], t0);
        assert!(matches!(t.gate(&["ip:x"], t0), Gate::Locked { .. }));
        t.forgive("ip:x");
        assert_eq!(t.gate(&["ip:x"], t0), Gate::Open);
        assert_eq!(delay_for(Duration::from_secs(1), 30), MAX_DELAY);
    }
}
