//! The fleet server (`outpost cloud` with `[fleet]`, issue 12, seed 003): the cloud side of
//! `docs/can-fleet.md`. It hears every vehicle's CAN gateway through the cloud broker
//! (`vehicle`, `report`, `summary`, `key-update`, `rules-status`), keeps a fleet baseline per
//! network configuration, assesses every reported incident with it (escalated when many
//! vehicles of one configuration show it at once, downgraded when it is normal across the
//! fleet), and answers: alerts to the vehicles of the same configuration and to those with
//! an ECU of the same type as the sender, a detection rule set for the configuration
//! (retained), and the configured stop / slow-down / key-update instructions.
//!
//! - `msg.rs`: the messages (parsing of what comes up, bounded; what goes down).
//! - `assess.rs`: the fleet state and every decision, pure (no I/O, no clock).
//! - `service.rs`: the MQTT session to the cloud broker and the store.

pub mod assess;
pub mod msg;
pub mod service;

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Errors of the fleet server.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("fleet: message on {topic}: {reason}")]
    Message { topic: String, reason: String },
    #[error("fleet: store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("fleet: stored record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("fleet: cloud broker TLS: {0}")]
    Tls(String),
}

/// What a configured instruction tells the vehicle function.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Stop,
    SlowDown,
    KeyUpdate,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Stop => "stop",
            Action::SlowDown => "slow-down",
            Action::KeyUpdate => "key-update",
        }
    }
}

/// One `[[fleet.instructions]]` entry: for these ids of this network configuration, the
/// vehicles of the configuration get `action` when one of them reports an incident on it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InstructionConfig {
    pub network_config: String,
    /// CAN ids, as in the messages (`"0x1a0"`).
    pub ids: Vec<String>,
    pub action: Action,
    /// Vehicles that must show the anomaly (within `fleet.window`) before it is sent.
    pub min_vehicles: u32,
}

impl Default for InstructionConfig {
    fn default() -> Self {
        InstructionConfig {
            network_config: String::new(),
            ids: Vec::new(),
            action: Action::SlowDown,
            min_vehicles: 1,
        }
    }
}

/// The `[fleet]` section (cloud role).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// Run the fleet server in `outpost cloud`, over the `[uplink]` connection settings.
    pub enabled: bool,
    /// An anomaly on this many distinct vehicles of one configuration within `window` is
    /// escalated.
    pub escalate_vehicles: u32,
    /// Reports on the same id of one configuration this close in frame time are the same
    /// anomaly.
    #[serde(with = "crate::duration")]
    pub window: Duration,
    /// Severity by the number of vehicles with the same anomaly: `watch` below
    /// `warning_vehicles`, `warning` below `critical_vehicles`, else `critical`.
    pub warning_vehicles: u32,
    pub critical_vehicles: u32,
    /// Downgrade (no alerts, no rule) when more than this fraction of the configuration's
    /// vehicles that send the id show the same suspect/anomalous pattern in their summaries
    /// without an incident, or when the report's payload and rate are within the fleet's
    /// normal ones; either needs at least `downgrade_min_vehicles` vehicles in the baseline.
    pub downgrade_fraction: f64,
    pub downgrade_min_vehicles: u32,
    /// A payload signature rule needs at least this many constant bits.
    pub signature_min_bits: u32,
    /// Rate-limit rules: their window, and the margin above the fleet's normal maximum
    /// frames per window (0.5 = 50 % more).
    #[serde(with = "crate::duration")]
    pub rate_window: Duration,
    pub rate_margin: f64,
    /// The level a derived rule gives a matching frame, in (0, 1].
    pub rule_level: f64,
    /// Vehicles kept at most (the least recently heard is forgotten beyond).
    pub max_vehicles: usize,
    pub instructions: Vec<InstructionConfig>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            enabled: false,
            escalate_vehicles: 2,
            window: Duration::from_secs(60),
            warning_vehicles: 2,
            critical_vehicles: 5,
            downgrade_fraction: 0.5,
            downgrade_min_vehicles: 3,
            signature_min_bits: 16,
            rate_window: Duration::from_millis(100),
            rate_margin: 0.5,
            rule_level: 0.9,
            max_vehicles: 10_000,
            instructions: Vec::new(),
        }
    }
}

impl FleetConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.escalate_vehicles < 1 {
            return Err(("fleet.escalate_vehicles", "must be at least 1".into()));
        }
        if self.window < Duration::from_secs(1) || self.window > Duration::from_secs(86_400) {
            return Err(("fleet.window", "must be between 1s and 1d".into()));
        }
        if self.warning_vehicles < 2 {
            return Err(("fleet.warning_vehicles", "must be at least 2".into()));
        }
        if self.critical_vehicles <= self.warning_vehicles {
            return Err((
                "fleet.critical_vehicles",
                "must be more than fleet.warning_vehicles".into(),
            ));
        }
        if !(self.downgrade_fraction > 0.0 && self.downgrade_fraction < 1.0) {
            return Err(("fleet.downgrade_fraction", "must be in (0, 1)".into()));
        }
        if self.downgrade_min_vehicles < 1 {
            return Err(("fleet.downgrade_min_vehicles", "must be at least 1".into()));
        }
        if !(1..=512).contains(&self.signature_min_bits) {
            return Err(("fleet.signature_min_bits", "must be in 1..=512".into()));
        }
        let w = self.rate_window.as_millis();
        if !(1..=10_000).contains(&w) || !self.rate_window.subsec_nanos().is_multiple_of(1_000_000)
        {
            return Err((
                "fleet.rate_window",
                "must be whole milliseconds in 1ms..=10s".into(),
            ));
        }
        if !(self.rate_margin >= 0.0 && self.rate_margin <= 100.0) {
            return Err(("fleet.rate_margin", "must be in 0..=100".into()));
        }
        if !(self.rule_level > 0.0 && self.rule_level <= 1.0) {
            return Err(("fleet.rule_level", "must be in (0, 1]".into()));
        }
        if !(1..=1_000_000).contains(&self.max_vehicles) {
            return Err(("fleet.max_vehicles", "must be in 1..=1000000".into()));
        }
        if self.instructions.len() > 1024 {
            return Err(("fleet.instructions", "at most 1024 entries".into()));
        }
        for i in &self.instructions {
            if !msg::name_ok(&i.network_config) {
                return Err((
                    "fleet.instructions.network_config",
                    format!("{:?}: 1 to 128 printable characters", i.network_config),
                ));
            }
            if i.ids.is_empty() {
                return Err(("fleet.instructions.ids", "name at least one id".into()));
            }
            for id in &i.ids {
                msg::parse_id(id)
                    .map_err(|e| ("fleet.instructions.ids", format!("{id:?}: {e}")))?;
            }
            if i.min_vehicles < 1 {
                return Err((
                    "fleet.instructions.min_vehicles",
                    "must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn err(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    /// The assessment and the messages are pure: no I/O, no clock, no runtime.
    #[test]
    fn assess_and_msg_name_no_io() {
        for (file, text) in [
            ("assess.rs", include_str!("assess.rs")),
            ("msg.rs", include_str!("msg.rs")),
        ] {
            let code = text.split("#[cfg(test)]").next().unwrap_or(text);
            for banned in [
                "crate::store",
                "tokio",
                "rumqttc",
                "std::fs",
                "std::net",
                "SystemTime",
                "Instant",
                "tracing",
            ] {
                assert!(!code.contains(banned), "{file} names {banned}");
            }
        }
    }

    #[test]
    fn fleet_config_errors_name_the_dotted_field() {
        assert!(err("[fleet]\nenabled = true\n").contains("fleet.enabled"));
        assert!(err("[fleet]\nwindow = \"0s\"\n").contains("fleet.window"));
        assert!(err("[fleet]\ncritical_vehicles = 2\n").contains("fleet.critical_vehicles"));
        assert!(err("[fleet]\nrule_level = 1.5\n").contains("fleet.rule_level"));
        assert!(err("[fleet]\nrate_window = \"20s\"\n").contains("fleet.rate_window"));
        assert!(err("[fleet]\nescalate = 2\n").contains("escalate"));
        let bad_id = "[[fleet.instructions]]\nnetwork_config = \"cfg-a\"\nids = [\"1a0\"]\naction = \"stop\"\n";
        assert!(err(bad_id).contains("fleet.instructions.ids"));
        let bad_action = "[[fleet.instructions]]\nnetwork_config = \"cfg-a\"\nids = [\"0x1a0\"]\naction = \"brake\"\n";
        assert!(
            err(bad_action).contains("fleet.instructions"),
            "{}",
            err(bad_action)
        );
        let ok = "[[fleet.instructions]]\nnetwork_config = \"cfg-a\"\nids = [\"0x1a0\"]\naction = \"key-update\"\n";
        let c = Config::from_toml(ok).unwrap();
        assert_eq!(c.fleet.instructions[0].action, super::Action::KeyUpdate);
        assert_eq!(c.fleet.instructions[0].min_vehicles, 1);
        assert!(!Config::default().fleet.enabled);
    }
}
