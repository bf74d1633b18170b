//! The `[can]` section of `outpost run`: which buses to read, the profile to grade them
//! against, who the vehicle is, and what each level of anomaly sets off. Off by default.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Longest Linux interface name (`IFNAMSIZ` - 1).
pub const MAX_IFNAME: usize = 15;
/// Frames kept before and after an anomalous frame for its report, at most.
pub const MAX_NEIGHBOURS: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CanConfig {
    pub enabled: bool,
    /// Profile from `outpost can learn`, for every interface that names none of its own.
    pub profile: PathBuf,
    /// A frame graded at or above this level is anomalous: it opens or extends an incident,
    /// which is alerted locally and reported to the cloud at once. Levels above 0 and below
    /// it are counted in the periodic summary only.
    pub alert_level: f64,
    pub interfaces: Vec<InterfaceConfig>,
    /// How often a per-id summary of each bus goes up the uplink.
    #[serde(with = "crate::duration")]
    pub summary_every: Duration,
    /// Frames before and after an incident's first frame sent with its report.
    pub neighbours: usize,
    /// An incident closes after this long without an anomalous frame.
    #[serde(with = "crate::duration")]
    pub incident_quiet: Duration,
    pub vehicle: VehicleConfig,
    /// Retained topic with the latest incident, for the vehicle's HMI.
    pub alert_topic: String,
    /// Retained topic with each bus's state and counters (refreshed every summary).
    pub status_topic: String,
    /// Retained topic with the latest alert from the fleet server.
    pub fleet_alert_topic: String,
    /// Stop / slow-down instructions for safety-relevant ids.
    pub safety: Vec<SafetyRule>,
    /// Key-update requests for SecOC-protected ids.
    pub secoc: SecocConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InterfaceConfig {
    /// The kernel interface (`can0`, `vcan0`); for a replayed log, the name its frames get.
    pub name: String,
    /// Open a CAN FD socket (it receives classic frames too). Off: classic frames only.
    pub fd: bool,
    /// Read this candump log (`candump -L`) instead of the kernel interface.
    pub log: PathBuf,
    /// Replay the log at the pace of its timestamps (else as fast as it can be read).
    pub realtime: bool,
    /// Profile of this bus, overriding `can.profile`.
    pub profile: PathBuf,
}

impl Default for InterfaceConfig {
    fn default() -> Self {
        InterfaceConfig {
            name: String::new(),
            fd: true,
            log: PathBuf::new(),
            realtime: true,
            profile: PathBuf::new(),
        }
    }
}

/// Who the vehicle is, for the fleet: the cloud alerts vehicles of the same network
/// configuration, and those with an ECU of the same type as an attacked id's sender.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct VehicleConfig {
    /// Vehicle identity (e.g. the VIN); empty: the gateway id.
    pub id: String,
    /// Identifier of the vehicle's network configuration (model, variant, DBC revision).
    pub network_config: String,
    /// The sending ECU of an id (`"0x1a0" = "ABS"`), where the profile does not know it.
    pub senders: BTreeMap<String, String>,
    /// The type of each ECU (`ABS = "bosch-abs-9.3"`).
    pub ecu_types: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SafetyAction {
    Stop,
    SlowDown,
}

impl SafetyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            SafetyAction::Stop => "stop",
            SafetyAction::SlowDown => "slow-down",
        }
    }
}

/// When an incident on one of `ids` reaches `level`, publish `action` on `topic` (QoS 1,
/// not retained) for the vehicle function that can act on it, once per incident.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SafetyRule {
    pub ids: Vec<String>,
    pub action: SafetyAction,
    #[serde(default = "default_action_level")]
    pub level: f64,
    #[serde(default = "default_safety_topic")]
    pub topic: String,
}

fn default_action_level() -> f64 {
    0.8
}

fn default_safety_topic() -> String {
    "vehicle/control/safety".into()
}

/// When an incident on one of `ids` reaches `level`, request a key update: on `topic`
/// locally (QoS 1) for the key master, and to the cloud.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SecocConfig {
    pub ids: Vec<String>,
    pub level: f64,
    pub topic: String,
}

impl Default for SecocConfig {
    fn default() -> Self {
        SecocConfig {
            ids: Vec::new(),
            level: default_action_level(),
            topic: "vehicle/secoc/key-update".into(),
        }
    }
}

impl Default for CanConfig {
    fn default() -> Self {
        CanConfig {
            enabled: false,
            profile: PathBuf::new(),
            alert_level: 0.5,
            interfaces: Vec::new(),
            summary_every: Duration::from_secs(10),
            neighbours: 8,
            incident_quiet: Duration::from_secs(2),
            vehicle: VehicleConfig::default(),
            alert_topic: "vehicle/can/alert".into(),
            status_topic: "vehicle/can/status".into(),
            fleet_alert_topic: "vehicle/can/fleet-alert".into(),
            safety: Vec::new(),
            secoc: SecocConfig::default(),
        }
    }
}

/// A configured identifier (`0x1a0`, `1a0`; above `0x7ff`, or with bit 31 set, an extended
/// one) as the Linux `can_id` the profile keys by: the extended flag set, no RTR flag.
pub fn parse_id(s: &str) -> Result<u32, String> {
    let hex = s.strip_prefix("0x").unwrap_or(s);
    let v = u32::from_str_radix(hex, 16).map_err(|_| format!("`{s}` is not a hex CAN id"))?;
    let eff = super::frame::CAN_EFF_FLAG;
    let bare = v & !eff;
    if bare > super::frame::CAN_EFF_MASK || v & super::frame::CAN_RTR_FLAG != 0 {
        return Err(format!("`{s}` is not a CAN id"));
    }
    Ok(if v & eff != 0 || bare > super::frame::CAN_SFF_MASK {
        bare | eff
    } else {
        bare
    })
}

fn level_ok(v: f64) -> bool {
    v > 0.0 && v <= 1.0
}

impl CanConfig {
    /// Checks types cannot express; errors name the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled {
            return Ok(());
        }
        if !level_ok(self.alert_level) {
            return Err(("can.alert_level", "must be in (0, 1]".into()));
        }
        if self.interfaces.is_empty() {
            return Err((
                "can.interfaces",
                "name at least one interface when can.enabled = true".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for i in &self.interfaces {
            if i.name.is_empty()
                || i.name.len() > MAX_IFNAME
                || !i
                    .name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
            {
                return Err((
                    "can.interfaces.name",
                    format!(
                        "`{}`: 1 to {MAX_IFNAME} letters, digits, `-`, `_` or `.`",
                        i.name
                    ),
                ));
            }
            if !seen.insert(&i.name) {
                return Err(("can.interfaces.name", format!("`{}` twice", i.name)));
            }
            if i.profile.as_os_str().is_empty() && self.profile.as_os_str().is_empty() {
                return Err((
                    "can.profile",
                    format!(
                        "interface `{}` has no profile: set can.profile or its own \
                         (outpost can learn writes one)",
                        i.name
                    ),
                ));
            }
        }
        if self.summary_every < Duration::from_secs(1) {
            return Err(("can.summary_every", "must be at least 1s".into()));
        }
        if self.incident_quiet < Duration::from_millis(100) {
            return Err(("can.incident_quiet", "must be at least 100ms".into()));
        }
        if self.neighbours > MAX_NEIGHBOURS {
            return Err(("can.neighbours", format!("at most {MAX_NEIGHBOURS}")));
        }
        if !self.vehicle.id.is_empty() {
            crate::acl::validate_identity(&self.vehicle.id)
                .map_err(|e| ("can.vehicle.id", e.to_string()))?;
        }
        for id in self.vehicle.senders.keys() {
            parse_id(id).map_err(|e| ("can.vehicle.senders", e))?;
        }
        for (field, topic) in [
            ("can.alert_topic", &self.alert_topic),
            ("can.status_topic", &self.status_topic),
            ("can.fleet_alert_topic", &self.fleet_alert_topic),
            ("can.secoc.topic", &self.secoc.topic),
        ] {
            crate::acl::validate_topic_name(topic).map_err(|e| (field, e.to_string()))?;
        }
        for r in &self.safety {
            if r.ids.is_empty() {
                return Err(("can.safety.ids", "must name at least one id".into()));
            }
            for id in &r.ids {
                parse_id(id).map_err(|e| ("can.safety.ids", e))?;
            }
            if !level_ok(r.level) {
                return Err(("can.safety.level", "must be in (0, 1]".into()));
            }
            crate::acl::validate_topic_name(&r.topic)
                .map_err(|e| ("can.safety.topic", e.to_string()))?;
        }
        for id in &self.secoc.ids {
            parse_id(id).map_err(|e| ("can.secoc.ids", e))?;
        }
        if !level_ok(self.secoc.level) {
            return Err(("can.secoc.level", "must be in (0, 1]".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_as_the_profile_keys_them() {
        assert_eq!(parse_id("0x1a0"), Ok(0x1a0));
        assert_eq!(parse_id("7ff"), Ok(0x7ff));
        assert_eq!(parse_id("0x800"), Ok(0x8000_0800));
        assert_eq!(parse_id("0x80000123"), Ok(0x8000_0123));
        assert!(parse_id("0x40000001").is_err());
        assert!(parse_id("0x3fffffff").is_err());
        assert!(parse_id("wheel").is_err());
    }

    fn on() -> CanConfig {
        CanConfig {
            enabled: true,
            profile: "p.json".into(),
            interfaces: vec![InterfaceConfig {
                name: "can0".into(),
                ..InterfaceConfig::default()
            }],
            ..CanConfig::default()
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(CanConfig::default().validate(), Ok(()));
        assert_eq!(on().validate(), Ok(()));
        let field = |c: CanConfig| c.validate().unwrap_err().0;
        assert_eq!(
            field(CanConfig {
                alert_level: 0.0,
                ..on()
            }),
            "can.alert_level"
        );
        assert_eq!(
            field(CanConfig {
                profile: PathBuf::new(),
                ..on()
            }),
            "can.profile"
        );
        let mut c = on();
        c.interfaces[0].name = "can0/../x".into();
        assert_eq!(field(c), "can.interfaces.name");
        let mut c = on();
        c.interfaces.push(c.interfaces[0].clone());
        assert_eq!(field(c), "can.interfaces.name");
        let mut c = on();
        c.safety.push(SafetyRule {
            ids: vec!["0xzz".into()],
            action: SafetyAction::Stop,
            level: 0.9,
            topic: "vehicle/control".into(),
        });
        assert_eq!(field(c), "can.safety.ids");
        let mut c = on();
        c.alert_topic = "a/+/b".into();
        assert_eq!(field(c), "can.alert_topic");
    }
}
