//! Topic access control: which topics an identity may publish to and subscribe to.
//!
//! Patterns are MQTT topic filters that may contain the placeholder `{id}` as a whole level.
//! A PUBLISH topic is allowed when it matches one of the identity's publish patterns. A
//! SUBSCRIBE filter is allowed only when *every* topic it could match is covered by one
//! pattern (so `devices/+/x` is refused to a device allowed only `devices/{id}/#`).

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("empty")]
    Empty,
    #[error("longer than 65535 bytes")]
    TooLong,
    #[error("contains a NUL character")]
    Nul,
    #[error("'#' must be the last level and stand alone")]
    BadMultiWildcard,
    #[error("'+' must stand alone in its level")]
    BadSingleWildcard,
    #[error("'{{id}}' must stand alone in its level")]
    BadPlaceholder,
    #[error("identity must be 1..=128 characters of [A-Za-z0-9._:-]")]
    BadIdentity,
}

/// Device identities become topic levels, so they must not contain wildcards, separators or
/// anything that could widen an ACL pattern.
pub fn validate_identity(id: &str) -> Result<(), AclError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AclError::BadIdentity)
    }
}

/// A validated topic name (no wildcards) as used by PUBLISH.
pub fn validate_topic_name(topic: &str) -> Result<(), AclError> {
    if topic.is_empty() {
        return Err(AclError::Empty);
    }
    if topic.len() > 65535 {
        return Err(AclError::TooLong);
    }
    if topic.contains('\0') {
        return Err(AclError::Nul);
    }
    if topic.contains(['+', '#']) {
        return Err(AclError::BadSingleWildcard);
    }
    Ok(())
}

/// A validated topic filter as used by SUBSCRIBE.
pub fn validate_filter(filter: &str) -> Result<(), AclError> {
    if filter.is_empty() {
        return Err(AclError::Empty);
    }
    if filter.len() > 65535 {
        return Err(AclError::TooLong);
    }
    if filter.contains('\0') {
        return Err(AclError::Nul);
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err(AclError::BadMultiWildcard);
        }
        if l.contains('+') && *l != "+" {
            return Err(AclError::BadSingleWildcard);
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Id,
    Plus,
    Hash,
}

/// One ACL pattern, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    levels: Vec<Level>,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, AclError> {
        validate_filter(&text.replace("{id}", "x"))?;
        let mut levels = Vec::new();
        for l in text.split('/') {
            levels.push(match l {
                "#" => Level::Hash,
                "+" => Level::Plus,
                "{id}" => Level::Id,
                other if other.contains("{id}") => return Err(AclError::BadPlaceholder),
                other => Level::Literal(other.to_string()),
            });
        }
        Ok(Pattern { levels })
    }

    /// Does the pattern, with `{id}` bound to `id`, cover every topic `filter` can match?
    /// A plain topic name is a filter that matches itself, so this also checks PUBLISH.
    pub fn covers(&self, id: &str, filter: &str) -> bool {
        let f: Vec<&str> = filter.split('/').collect();
        // MQTT 4.7.2: wildcards at the first level do not match topics starting with '$'.
        if let (Some(first_p), Some(first_f)) = (self.levels.first(), f.first()) {
            if first_f.starts_with('$') && matches!(first_p, Level::Plus | Level::Hash) {
                return false;
            }
        }
        let mut i = 0;
        for p in &self.levels {
            match p {
                Level::Hash => return true,
                _ if i >= f.len() => return false,
                Level::Plus => {
                    if f[i] == "#" {
                        return false;
                    }
                }
                Level::Id => {
                    // A wildcard level never equals an identity (identities cannot hold
                    // wildcards, but local client ids are checked here too). Nor does a
                    // first level starting with `$`: a local client named `$SYS` does not
                    // get `$SYS/#` from `{id}/#` (as with wildcards, MQTT 4.7.2).
                    if f[i] != id || f[i] == "+" || f[i] == "#" || (i == 0 && id.starts_with('$')) {
                        return false;
                    }
                }
                Level::Literal(s) => {
                    if f[i] != s {
                        return false;
                    }
                }
            }
            i += 1;
        }
        i == f.len()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<&str> = self
            .levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Id => "{id}",
                Level::Plus => "+",
                Level::Hash => "#",
            })
            .collect();
        f.write_str(&parts.join("/"))
    }
}

/// The publish and subscribe rules for one class of client.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    publish: Vec<Pattern>,
    subscribe: Vec<Pattern>,
}

impl Rules {
    pub fn new(publish: &[String], subscribe: &[String]) -> Result<Rules, AclError> {
        Ok(Rules {
            publish: publish
                .iter()
                .map(|p| Pattern::parse(p))
                .collect::<Result<_, _>>()?,
            subscribe: subscribe
                .iter()
                .map(|p| Pattern::parse(p))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn may_publish(&self, id: &str, topic: &str) -> bool {
        validate_topic_name(topic).is_ok() && self.publish.iter().any(|p| p.covers(id, topic))
    }

    pub fn may_subscribe(&self, id: &str, filter: &str) -> bool {
        validate_filter(filter).is_ok() && self.subscribe.iter().any(|p| p.covers(id, filter))
    }
}

// --- configuration section

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DeniedPublish {
    /// Acknowledge according to QoS and discard (MQTT 3.1.1 section 3.3.5).
    Drop,
    /// Close the network connection.
    Disconnect,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// Topic patterns every device may publish to; `{id}` is the device identity.
    pub device_publish: Vec<String>,
    /// Topic patterns every device may subscribe to.
    pub device_subscribe: Vec<String>,
    /// Patterns for clients on the plain (loopback) listener; `{id}` is their client id.
    pub local_publish: Vec<String>,
    pub local_subscribe: Vec<String>,
    /// What happens to a PUBLISH the ACL denies.
    pub on_denied_publish: DeniedPublish,
}

impl Default for AclConfig {
    fn default() -> Self {
        AclConfig {
            device_publish: vec!["devices/{id}/#".into()],
            device_subscribe: vec!["devices/{id}/#".into(), "outpost/uplink/state".into()],
            local_publish: vec!["#".into()],
            local_subscribe: vec!["#".into()],
            on_denied_publish: DeniedPublish::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device_rules() -> Rules {
        Rules::new(
            &["devices/{id}/#".into()],
            &["devices/{id}/#".into(), "broadcast/+".into()],
        )
        .unwrap()
    }

    #[test]
    fn device_publishes_only_below_its_own_id() {
        let r = device_rules();
        assert!(r.may_publish("a", "devices/a/telemetry"));
        assert!(r.may_publish("a", "devices/a"));
        assert!(!r.may_publish("a", "devices/b/telemetry"));
        assert!(!r.may_publish("a", "devices/ab/telemetry"));
        assert!(!r.may_publish("a", "other"));
        assert!(!r.may_publish("a", "devices/a/+"));
    }

    #[test]
    fn subscription_must_be_inside_a_pattern() {
        let r = device_rules();
        assert!(r.may_subscribe("a", "devices/a/#"));
        assert!(r.may_subscribe("a", "devices/a/+/cmd"));
        assert!(r.may_subscribe("a", "broadcast/x"));
        assert!(r.may_subscribe("a", "broadcast/+"));
        assert!(!r.may_subscribe("a", "broadcast/#"));
        assert!(!r.may_subscribe("a", "devices/+/cmd"));
        assert!(!r.may_subscribe("a", "devices/#"));
        assert!(!r.may_subscribe("a", "#"));
        assert!(!r.may_subscribe("a", "+/a/x"));
        assert!(!r.may_subscribe("a", "devices/a/#/x"));
    }

    #[test]
    fn hash_pattern_does_not_reach_dollar_topics() {
        let r = Rules::new(&["#".into()], &["#".into()]).unwrap();
        assert!(r.may_publish("x", "a/b"));
        assert!(!r.may_publish("x", "$SYS/x"));
        assert!(!r.may_subscribe("x", "$outpost/#"));
    }

    #[test]
    fn identities_cannot_carry_wildcards() {
        assert!(validate_identity("dev-01.a:b_c").is_ok());
        for bad in ["", "a/b", "a+", "#", "a b", "é"] {
            assert!(validate_identity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn local_client_ids_cannot_widen_an_id_pattern() {
        let r = Rules::new(
            &["{id}/#".into(), "local/{id}/#".into()],
            &["local/{id}/#".into()],
        )
        .unwrap();
        assert!(r.may_publish("my client", "local/my client/x"));
        assert!(r.may_publish("my client", "my client/x"));
        assert!(!r.may_publish("$SYS", "$SYS/x"));
        assert!(r.may_publish("$SYS", "local/$SYS/x"));
        // An id holding `/` or wildcards never equals one level.
        assert!(!r.may_publish("a/b", "local/a/b/x"));
        assert!(!r.may_subscribe("+", "local/+/x"));
        assert!(!r.may_subscribe("#", "local/#"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(Pattern::parse("a/#/b").is_err());
        assert!(Pattern::parse("a/x{id}").is_err());
        assert!(Pattern::parse("a+/b").is_err());
        assert_eq!(Pattern::parse("a/{id}/#").unwrap().to_string(), "a/{id}/#");
    }
}
