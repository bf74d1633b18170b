//! Protocol sessions shared by the rendezvous server and the owner: bounded, expiring, and
//! taken out while a message is processed, so a replayed or concurrent message for the same
//! session finds nothing and fails.

use super::{ErrorCode, FdoError};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a protocol handler answers: the message type, the body and the session token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub msg_type: u8,
    pub body: Vec<u8>,
    pub token: String,
}

/// A failure that ends a protocol session with error message 255.
pub trait ProtocolFailure: std::error::Error {
    fn error_code(&self) -> ErrorCode;
}

/// A new random session token (128 bits, hex).
pub fn new_token() -> Result<String, FdoError> {
    Ok(hex::encode(super::crypto::random_bytes(16)?))
}

/// The session table.
pub struct Sessions<T> {
    inner: Mutex<HashMap<String, (Instant, T)>>,
    ttl: Duration,
    max: usize,
}

/// The table is full of live sessions.
#[derive(Debug, thiserror::Error)]
#[error("too many open sessions ({0})")]
pub struct SessionsFull(pub usize);

impl<T> Sessions<T> {
    pub fn new(ttl: Duration, max: usize) -> Sessions<T> {
        Sessions {
            inner: Mutex::new(HashMap::new()),
            ttl,
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, T)>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store `v` under `token` (a new session or one put back), expiring after the TTL.
    pub fn put(&self, token: &str, v: T) -> Result<(), SessionsFull> {
        let now = Instant::now();
        let mut m = self.lock();
        if m.len() >= self.max && !m.contains_key(token) {
            m.retain(|_, (exp, _)| *exp > now);
            if m.len() >= self.max {
                return Err(SessionsFull(self.max));
            }
        }
        m.insert(token.to_string(), (now + self.ttl, v));
        Ok(())
    }

    /// Remove and return the live session of `token`.
    pub fn take(&self, token: &str) -> Option<T> {
        let now = Instant::now();
        let mut m = self.lock();
        match m.remove(token) {
            Some((exp, v)) if exp > now => Some(v),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    let v = value?.trim();
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .unwrap_or(v)
        .trim();
    (!t.is_empty() && t.len() <= 256).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_are_bounded() {
        let s: Sessions<u32> = Sessions::new(Duration::from_millis(30), 2);
        s.put("a", 1).unwrap();
        s.put("b", 2).unwrap();
        assert!(s.put("c", 3).is_err());
        assert_eq!(s.take("a"), Some(1));
        assert_eq!(s.take("a"), None, "taken once");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(s.take("b"), None, "expired");
        s.put("c", 3).unwrap();
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("")), None);
    }
}
