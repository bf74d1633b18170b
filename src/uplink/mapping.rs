//! Topic mapping between the local broker and the cloud broker.
//!
//! Up: a local topic matching a rule's filter goes to `remote_prefix + local topic`.
//! Down: a cloud topic matching a rule's filter loses `strip_prefix` and is delivered
//! locally if the result matches the rule's `local` filter (so a cloud message can never be
//! injected on an arbitrary local topic). `{gateway}` in any field is the gateway id.

use crate::acl::{AclError, Pattern};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpRule {
    /// Local topic filter, e.g. `devices/+/telemetry/#`.
    pub local: String,
    /// Prepended to the local topic on the cloud side, e.g. `outpost/{gateway}/`.
    pub remote_prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DownRule {
    /// Cloud filter the uplink subscribes to, e.g. `outpost/{gateway}/devices/+/commands/#`.
    pub remote: String,
    /// Removed from the cloud topic to make the local topic.
    pub strip_prefix: String,
    /// The local topic must match this filter, e.g. `devices/+/commands/#`.
    pub local: String,
}

pub fn default_up() -> Vec<UpRule> {
    vec![UpRule {
        local: "devices/+/telemetry/#".into(),
        remote_prefix: "outpost/{gateway}/".into(),
    }]
}

pub fn default_down() -> Vec<DownRule> {
    vec![DownRule {
        remote: "outpost/{gateway}/devices/+/commands/#".into(),
        strip_prefix: "outpost/{gateway}/".into(),
        local: "devices/+/commands/#".into(),
    }]
}

#[derive(Debug, Clone)]
pub struct Mapping {
    gateway: String,
    can_down: [String; 2],
    credentials_down: String,
    up: Vec<(Pattern, String)>,
    down: Vec<(String, Pattern, String, Pattern)>,
}

impl Mapping {
    pub fn new(gateway: &str, up: &[UpRule], down: &[DownRule]) -> Result<Mapping, AclError> {
        let g = |s: &str| s.replace("{gateway}", gateway);
        Ok(Mapping {
            gateway: gateway.to_string(),
            can_down: [
                format!("outpost/{gateway}/can/rules"),
                format!("outpost/{gateway}/can/down"),
            ],
            credentials_down: crate::credentials::fleet_msg::down_topic(gateway),
            up: up
                .iter()
                .map(|r| Ok((Pattern::parse(&g(&r.local))?, g(&r.remote_prefix))))
                .collect::<Result<_, AclError>>()?,
            down: down
                .iter()
                .map(|r| {
                    Ok((
                        g(&r.remote),
                        Pattern::parse(&g(&r.remote))?,
                        g(&r.strip_prefix),
                        Pattern::parse(&g(&r.local))?,
                    ))
                })
                .collect::<Result<_, AclError>>()?,
        })
    }

    /// The cloud topic for a local topic, if it goes up at all.
    pub fn up(&self, local: &str) -> Option<String> {
        self.up
            .iter()
            .find(|(p, _)| p.covers("", local))
            .map(|(_, prefix)| format!("{prefix}{local}"))
    }

    /// The cloud topic of a queued message: a mapped local topic, or one of the gateway's
    /// own `$outpost/...` topics (the registry sync), which go to `outpost/{gateway}/...`.
    /// No client can publish a `$` topic, so only the gateway queues those.
    pub fn up_queued(&self, local: &str) -> Option<String> {
        self.up(local).or_else(|| {
            local
                .strip_prefix("$outpost/")
                .map(|rest| format!("outpost/{}/{rest}", self.gateway))
        })
    }

    /// The cloud topic of the sync messages for this gateway.
    pub fn sync_down(&self) -> String {
        crate::sync::down_topic(&self.gateway)
    }

    /// The cloud topics of the fleet server's messages for this gateway's CAN capability
    /// (docs/can-fleet.md): the retained rule set, and the alerts and instructions.
    pub fn can_down(&self) -> &[String; 2] {
        &self.can_down
    }

    /// The cloud topic of the fleet inventory's messages for this gateway's credentials
    /// service (docs/credentials.md).
    pub fn credentials_down(&self) -> &str {
        &self.credentials_down
    }

    /// The cloud filters to subscribe to.
    pub fn down_filters(&self) -> impl Iterator<Item = &str> {
        self.down.iter().map(|(f, _, _, _)| f.as_str())
    }

    /// The local topic for a cloud topic, if it may come down.
    pub fn down(&self, remote: &str) -> Option<String> {
        self.down.iter().find_map(|(_, filter, strip, local)| {
            if !filter.covers("", remote) {
                return None;
            }
            let l = remote.strip_prefix(strip.as_str())?;
            (crate::acl::validate_topic_name(l).is_ok() && local.covers("", l))
                .then(|| l.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> Mapping {
        Mapping::new("gw1", &default_up(), &default_down()).unwrap()
    }

    #[test]
    fn telemetry_goes_up_under_the_gateway_prefix() {
        assert_eq!(
            m().up("devices/d1/telemetry/temp").as_deref(),
            Some("outpost/gw1/devices/d1/telemetry/temp")
        );
        assert_eq!(m().up("devices/d1/status"), None);
        assert_eq!(m().up("other/x"), None);
    }

    #[test]
    fn commands_come_down_only_onto_device_command_topics() {
        assert_eq!(
            m().down("outpost/gw1/devices/d1/commands/reboot")
                .as_deref(),
            Some("devices/d1/commands/reboot")
        );
        assert_eq!(m().down("outpost/gw2/devices/d1/commands/reboot"), None);
        assert_eq!(m().down("outpost/gw1/devices/d1/telemetry/x"), None);
        assert_eq!(
            m().down_filters().collect::<Vec<_>>(),
            vec!["outpost/gw1/devices/+/commands/#"]
        );
    }
}
