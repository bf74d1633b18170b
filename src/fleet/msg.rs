//! The fleet messages of `docs/can-fleet.md`: what the gateways send up (parsed leniently
//! about extra fields, strictly about bounds) and what the fleet server sends down.
//!
//! Every parsed message is bounded: [`MAX_MESSAGE`] bytes in, names of at most
//! [`MAX_NAME`] characters, at most [`MAX_ECUS`] ECUs, [`MAX_SENDERS`] senders,
//! [`MAX_SUMMARY_IDS`] ids per summary, payloads of at most 64 bytes. Anything else is a
//! [`MsgError`], never a panic.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The largest message parsed (bytes of JSON).
pub const MAX_MESSAGE: usize = 512 * 1024;
pub const MAX_NAME: usize = 128;
pub const MAX_ECUS: usize = 64;
pub const MAX_SENDERS: usize = 2048;
pub const MAX_SUMMARY_IDS: usize = 4096;
pub const MAX_REASONS: usize = 32;
/// CAN FD payloads are at most 64 bytes.
pub const MAX_PAYLOAD: usize = 64;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MsgError {
    #[error("message of {0} bytes is over the limit of {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("not the expected JSON: {0}")]
    Json(String),
    #[error("field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

fn field(field: &'static str, reason: impl Into<String>) -> MsgError {
    MsgError::Field {
        field,
        reason: reason.into(),
    }
}

/// Which of the gateway's messages a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Vehicle,
    Report,
    Summary,
    KeyUpdate,
    RulesStatus,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Vehicle,
        Kind::Report,
        Kind::Summary,
        Kind::KeyUpdate,
        Kind::RulesStatus,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Kind::Vehicle => "vehicle",
            Kind::Report => "report",
            Kind::Summary => "summary",
            Kind::KeyUpdate => "key-update",
            Kind::RulesStatus => "rules-status",
        }
    }

    /// The subscription filter for every gateway.
    pub fn filter(self) -> String {
        format!("outpost/+/can/{}", self.suffix())
    }
}

/// `outpost/{gw}/can/{kind}` → (gw, kind).
pub fn topic_kind(topic: &str) -> Option<(&str, Kind)> {
    let rest = topic.strip_prefix("outpost/")?;
    let (gw, suffix) = rest.split_once("/can/")?;
    if !name_ok(gw) || gw.contains('/') {
        return None;
    }
    let kind = Kind::ALL.into_iter().find(|k| k.suffix() == suffix)?;
    Some((gw, kind))
}

pub fn rules_topic(gw: &str) -> String {
    format!("outpost/{gw}/can/rules")
}

pub fn down_topic(gw: &str) -> String {
    format!("outpost/{gw}/can/down")
}

/// A name (vehicle, configuration, gateway, ECU, ECU type): 1..=128 characters, no control
/// characters, no MQTT wildcards.
pub fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.chars().count() <= MAX_NAME
        && !s.chars().any(|c| c.is_control() || c == '+' || c == '#')
}

fn name(f: &'static str, s: &str) -> Result<String, MsgError> {
    if name_ok(s) {
        Ok(s.to_string())
    } else {
        Err(field(
            f,
            "1 to 128 characters, no control characters or + #",
        ))
    }
}

/// `"0x1a0"` → 0x1a0. Standard ids are at most 0x7ff; extended ones have bit 31 set and
/// 29 bits of id.
pub fn parse_id(s: &str) -> Result<u32, String> {
    let hex = s
        .strip_prefix("0x")
        .ok_or_else(|| "a CAN id is hex with 0x".to_string())?;
    if hex.is_empty() || hex.len() > 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("a CAN id is 1 to 8 hex digits after 0x".into());
    }
    let v = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
    let ok = if v & 0x8000_0000 != 0 {
        v & 0x6000_0000 == 0
    } else {
        v <= 0x7ff
    };
    if ok {
        Ok(v)
    } else {
        Err("not a standard (≤ 0x7ff) or extended (bit 31 + 29 bits) id".into())
    }
}

pub fn format_id(id: u32) -> String {
    format!("0x{id:x}")
}

fn id_field(f: &'static str, s: &str) -> Result<u32, MsgError> {
    parse_id(s).map_err(|e| field(f, e))
}

fn hex_bytes(f: &'static str, s: &str) -> Result<Vec<u8>, MsgError> {
    if s.len() > 2 * MAX_PAYLOAD {
        return Err(field(f, "more than 64 bytes"));
    }
    hex::decode(s).map_err(|e| field(f, e.to_string()))
}

fn finite(f: &'static str, v: f64) -> Result<f64, MsgError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(field(f, "not a finite number"))
    }
}

// ------------------------------------------------------------------------------------------
// Up: the wire shapes (extra fields are ignored: the gateway may say more than we read)

#[derive(Deserialize)]
struct WireVehicle {
    vehicle: String,
    network_config: String,
    #[serde(default)]
    ecus: BTreeMap<String, String>,
    #[serde(default)]
    senders: BTreeMap<String, String>,
    #[serde(default)]
    rules_id: Option<String>,
}

#[derive(Deserialize)]
struct WirePayload {
    len: usize,
    and: String,
    or: String,
}

#[derive(Deserialize)]
struct WireReport {
    incident: String,
    state: String,
    vehicle: String,
    network_config: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    sender: Option<String>,
    #[serde(default)]
    ecu_type: Option<String>,
    #[serde(default)]
    first_ts: f64,
    #[serde(default)]
    last_ts: f64,
    #[serde(default)]
    frames: u64,
    #[serde(default)]
    level: f64,
    #[serde(default)]
    max_level: f64,
    #[serde(default)]
    reasons: Vec<String>,
    #[serde(default)]
    payload: Option<WirePayload>,
    #[serde(default)]
    rate_hz: f64,
}

#[derive(Deserialize)]
struct WireGap {
    min: f64,
    #[serde(default)]
    mean: f64,
}

#[derive(Deserialize)]
struct WireIdSummary {
    n: u64,
    #[serde(default)]
    anomalous: u64,
    #[serde(default)]
    suspect: u64,
    #[serde(default)]
    gap_us: Option<WireGap>,
    #[serde(default)]
    and: Option<String>,
    #[serde(default)]
    or: Option<String>,
}

#[derive(Deserialize)]
struct WireSummary {
    vehicle: String,
    network_config: String,
    from_ms: u64,
    to_ms: u64,
    #[serde(default)]
    ids: BTreeMap<String, WireIdSummary>,
}

#[derive(Deserialize)]
struct WireKeyUpdate {
    id: String,
    #[serde(default)]
    incident: String,
    #[serde(default)]
    vehicle: String,
    #[serde(default)]
    level: f64,
}

#[derive(Deserialize)]
struct WireRulesStatus {
    rules_id: String,
    state: String,
    #[serde(default)]
    rules: Option<u64>,
    #[serde(default)]
    error: Option<String>,
}

// ------------------------------------------------------------------------------------------
// Up: the checked messages

#[derive(Debug, Clone, PartialEq)]
pub struct VehicleMsg {
    pub vehicle: String,
    pub network_config: String,
    /// ECU name → ECU type.
    pub ecus: BTreeMap<String, String>,
    /// id → ECU name.
    pub senders: BTreeMap<u32, String>,
    pub rules_id: Option<String>,
}

/// AND and OR of an incident's (or a summary's) frames of one id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub and: Vec<u8>,
    pub or: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportState {
    Open,
    Update,
    Closed,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub incident: String,
    pub state: ReportState,
    pub vehicle: String,
    pub network_config: String,
    /// `None`: the unknown-id incident.
    pub id: Option<u32>,
    pub sender: Option<String>,
    pub ecu_type: Option<String>,
    pub first_ts: f64,
    pub last_ts: f64,
    pub frames: u64,
    pub max_level: f64,
    pub reasons: Vec<String>,
    pub payload: Option<Fingerprint>,
    pub rate_hz: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IdSummary {
    pub n: u64,
    pub anomalous: u64,
    pub suspect: u64,
    pub gap_min_us: Option<f64>,
    pub gap_mean_us: Option<f64>,
    pub fingerprint: Option<Fingerprint>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub vehicle: String,
    pub network_config: String,
    pub from_ms: u64,
    pub to_ms: u64,
    pub ids: BTreeMap<u32, IdSummary>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyUpdate {
    pub id: u32,
    pub incident: String,
    pub vehicle: String,
    pub level: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RulesStatus {
    pub rules_id: String,
    pub applied: bool,
    pub rules: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Vehicle(VehicleMsg),
    Report(Report),
    Summary(Summary),
    KeyUpdate(KeyUpdate),
    RulesStatus(RulesStatus),
}

fn json<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, MsgError> {
    if payload.len() > MAX_MESSAGE {
        return Err(MsgError::TooLarge(payload.len()));
    }
    serde_json::from_slice(payload).map_err(|e| MsgError::Json(e.to_string()))
}

fn fingerprint(
    f: &'static str,
    len: Option<usize>,
    and: &str,
    or: &str,
) -> Result<Fingerprint, MsgError> {
    let and = hex_bytes(f, and)?;
    let or = hex_bytes(f, or)?;
    if and.len() != or.len() {
        return Err(field(f, "and and or differ in length"));
    }
    if let Some(len) = len {
        if len != and.len() {
            return Err(field(f, "len is not the length of and/or"));
        }
    }
    // Every bit set in AND is set in OR, for any set of frames.
    if and.iter().zip(&or).any(|(a, o)| a & !o != 0) {
        return Err(field(f, "a bit is set in and but not in or"));
    }
    Ok(Fingerprint { and, or })
}

/// Parse one gateway message of `kind`.
pub fn parse(kind: Kind, payload: &[u8]) -> Result<Incoming, MsgError> {
    match kind {
        Kind::Vehicle => {
            let w: WireVehicle = json(payload)?;
            if w.ecus.len() > MAX_ECUS {
                return Err(field("ecus", format!("more than {MAX_ECUS}")));
            }
            if w.senders.len() > MAX_SENDERS {
                return Err(field("senders", format!("more than {MAX_SENDERS}")));
            }
            let mut ecus = BTreeMap::new();
            for (k, v) in &w.ecus {
                ecus.insert(name("ecus", k)?, name("ecus", v)?);
            }
            let mut senders = BTreeMap::new();
            for (k, v) in &w.senders {
                senders.insert(id_field("senders", k)?, name("senders", v)?);
            }
            Ok(Incoming::Vehicle(VehicleMsg {
                vehicle: name("vehicle", &w.vehicle)?,
                network_config: name("network_config", &w.network_config)?,
                ecus,
                senders,
                rules_id: w.rules_id.map(|r| name("rules_id", &r)).transpose()?,
            }))
        }
        Kind::Report => {
            let w: WireReport = json(payload)?;
            let state = match w.state.as_str() {
                "open" => ReportState::Open,
                "update" => ReportState::Update,
                "closed" => ReportState::Closed,
                _ => return Err(field("state", "open, update or closed")),
            };
            if w.reasons.len() > MAX_REASONS {
                return Err(field("reasons", format!("more than {MAX_REASONS}")));
            }
            let mut reasons = Vec::new();
            for r in &w.reasons {
                reasons.push(name("reasons", r)?);
            }
            let payload = match &w.payload {
                Some(p) => Some(fingerprint("payload", Some(p.len), &p.and, &p.or)?),
                None => None,
            };
            let level = finite("level", w.level)?;
            let max_level = finite("max_level", w.max_level)?.max(level);
            if !(0.0..=1.0).contains(&max_level) || level < 0.0 {
                return Err(field("max_level", "must be in [0, 1]"));
            }
            let rate_hz = finite("rate_hz", w.rate_hz)?;
            if rate_hz < 0.0 {
                return Err(field("rate_hz", "negative"));
            }
            Ok(Incoming::Report(Report {
                incident: name("incident", &w.incident)?,
                state,
                vehicle: name("vehicle", &w.vehicle)?,
                network_config: name("network_config", &w.network_config)?,
                id: w.id.as_deref().map(|s| id_field("id", s)).transpose()?,
                sender: w.sender.as_deref().map(|s| name("sender", s)).transpose()?,
                ecu_type: w
                    .ecu_type
                    .as_deref()
                    .map(|s| name("ecu_type", s))
                    .transpose()?,
                first_ts: finite("first_ts", w.first_ts)?,
                last_ts: finite("last_ts", w.last_ts)?,
                frames: w.frames,
                max_level,
                reasons,
                payload,
                rate_hz,
            }))
        }
        Kind::Summary => {
            let w: WireSummary = json(payload)?;
            if w.ids.len() > MAX_SUMMARY_IDS {
                return Err(field("ids", format!("more than {MAX_SUMMARY_IDS}")));
            }
            if w.to_ms < w.from_ms {
                return Err(field("to_ms", "before from_ms"));
            }
            let mut ids = BTreeMap::new();
            for (k, s) in &w.ids {
                let fp = match (&s.and, &s.or) {
                    (Some(a), Some(o)) => Some(fingerprint("ids.and", None, a, o)?),
                    _ => None,
                };
                let (gap_min_us, gap_mean_us) = match &s.gap_us {
                    Some(g) => (
                        Some(finite("ids.gap_us.min", g.min)?).filter(|v| *v > 0.0),
                        Some(finite("ids.gap_us.mean", g.mean)?).filter(|v| *v > 0.0),
                    ),
                    None => (None, None),
                };
                ids.insert(
                    id_field("ids", k)?,
                    IdSummary {
                        n: s.n,
                        anomalous: s.anomalous.min(s.n),
                        suspect: s.suspect.min(s.n),
                        gap_min_us,
                        gap_mean_us,
                        fingerprint: fp,
                    },
                );
            }
            Ok(Incoming::Summary(Summary {
                vehicle: name("vehicle", &w.vehicle)?,
                network_config: name("network_config", &w.network_config)?,
                from_ms: w.from_ms,
                to_ms: w.to_ms,
                ids,
            }))
        }
        Kind::KeyUpdate => {
            let w: WireKeyUpdate = json(payload)?;
            Ok(Incoming::KeyUpdate(KeyUpdate {
                id: id_field("id", &w.id)?,
                incident: if w.incident.is_empty() {
                    String::new()
                } else {
                    name("incident", &w.incident)?
                },
                vehicle: if w.vehicle.is_empty() {
                    String::new()
                } else {
                    name("vehicle", &w.vehicle)?
                },
                level: finite("level", w.level)?,
            }))
        }
        Kind::RulesStatus => {
            let w: WireRulesStatus = json(payload)?;
            let applied = match w.state.as_str() {
                "applied" => true,
                "refused" => false,
                _ => return Err(field("state", "applied or refused")),
            };
            Ok(Incoming::RulesStatus(RulesStatus {
                rules_id: name("rules_id", &w.rules_id)?,
                applied,
                rules: w.rules,
                error: w.error.map(|e| e.chars().take(512).collect()),
            }))
        }
    }
}

// ------------------------------------------------------------------------------------------
// Down

/// One detection rule (`docs/can-fleet.md`): the gateway's own type, so both ends write and
/// read one definition of the document.
pub use crate::can::rules::Rule;

/// `outpost/{gw}/can/rules` (retained).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RulesMsg<'a> {
    pub kind: &'static str,
    pub rules_id: &'a str,
    pub network_config: &'a str,
    pub rules: &'a [Rule],
}

/// `outpost/{gw}/can/down`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DownMsg {
    Alert {
        incident: String,
        from_vehicle: String,
        network_config: String,
        id: Option<String>,
        sender: Option<String>,
        ecu_type: Option<String>,
        why: String,
        vehicles: u32,
        severity: String,
        message: String,
    },
    Instruction {
        action: String,
        id: String,
        incident: String,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"{"incident": "can0-1796345994073074-0x1a0", "state": "open",
 "vehicle": "VIN-A", "network_config": "cfg-a", "gateway": "gw-a", "interface": "can0",
 "id": "0x1a0", "ids": ["0x1a0"], "sender": "ABS", "ecu_type": "abs-9.3",
 "first_ts": 1796345994.073074, "last_ts": 1796345994.648541, "frames": 300,
 "level": 0.96, "max_level": 1.0, "reasons": ["early", "constant-bits"],
 "rules": [], "payload": {"len": 8, "and": "0000ff0000000000", "or": "000fff0000000000"},
 "rate_hz": 1000.0, "frame": "(1796345994.073074) can0 1A0#0000FF0000000000",
 "actions": ["slow-down"], "before": ["(1) can0 1A0#A5055A0000000000"], "after": []}"#;

    #[test]
    fn documented_report_parses() {
        let Incoming::Report(r) = parse(Kind::Report, REPORT.as_bytes()).unwrap() else {
            panic!("not a report")
        };
        assert_eq!(r.id, Some(0x1a0));
        assert_eq!(r.state, ReportState::Open);
        assert_eq!(r.ecu_type.as_deref(), Some("abs-9.3"));
        let p = r.payload.unwrap();
        assert_eq!(p.and, hex::decode("0000ff0000000000").unwrap());
    }

    #[test]
    fn documented_summary_vehicle_and_status_parse() {
        let s = r#"{"vehicle": "VIN-A", "network_config": "cfg-a", "gateway": "gw-a", "interface": "can0",
 "from_ms": 1796345990000, "to_ms": 1796346000000, "up": true, "frames": 1450,
 "error_frames": 0, "open_incidents": 0, "other_ids_frames": 0,
 "ids": {"0x1a0": {"n": 1000, "anomalous": 0, "suspect": 2, "max_level": 0.3,
                   "gap_us": {"min": 9701, "mean": 10000, "max": 10299},
                   "and": "a500500000000000", "or": "a50f7f0000000000"}}}"#;
        let Incoming::Summary(s) = parse(Kind::Summary, s.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(s.ids[&0x1a0].gap_min_us, Some(9701.0));
        let v = r#"{"vehicle": "VIN-A", "network_config": "cfg-a", "gateway": "gw-a",
 "ecus": {"ABS": "abs-9.3"}, "senders": {"0x1a0": "ABS"}, "rules_id": null}"#;
        let Incoming::Vehicle(v) = parse(Kind::Vehicle, v.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(v.senders[&0x1a0], "ABS");
        let st = r#"{"rules_id": "cfg-a-3", "state": "refused", "error": "rules[1].mask: x"}"#;
        assert!(matches!(
            parse(Kind::RulesStatus, st.as_bytes()).unwrap(),
            Incoming::RulesStatus(RulesStatus { applied: false, .. })
        ));
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bad in [&b"{"[..], b"null", b"[]", b"{\"vehicle\": 5}", b"\xff\xfe"] {
            for k in Kind::ALL {
                assert!(
                    parse(k, bad).is_err(),
                    "{k:?} {:?}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
        for bad in [
            &br#"{"incident":"i","state":"open","vehicle":"v","network_config":"c","id":"1a0"}"#[..],
            br#"{"incident":"i","state":"gone","vehicle":"v","network_config":"c"}"#,
            br#"{"incident":"i","state":"open","vehicle":"v","network_config":"c","payload":{"len":2,"and":"ff","or":"ff"}}"#,
            br#"{"incident":"i","state":"open","vehicle":"v","network_config":"c","payload":{"len":1,"and":"ff","or":"00"}}"#,
            br#"{"incident":"i","state":"open","vehicle":"","network_config":"c"}"#,
            br#"{"incident":"i","state":"open","vehicle":"v","network_config":"c","max_level":7}"#,
        ] {
            assert!(
                parse(Kind::Report, bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = vec![b' '; MAX_MESSAGE + 1];
        assert_eq!(
            parse(Kind::Vehicle, &big),
            Err(MsgError::TooLarge(MAX_MESSAGE + 1))
        );
    }

    #[test]
    fn ids_follow_linux_can_id() {
        assert_eq!(parse_id("0x1a0"), Ok(0x1a0));
        assert_eq!(parse_id("0x98fef100"), Ok(0x98fe_f100));
        assert!(parse_id("0x800").is_err());
        assert!(parse_id("1a0").is_err());
        assert!(parse_id("0x").is_err());
        assert!(parse_id("0xfffffffff").is_err());
        assert_eq!(format_id(0x98fe_f100), "0x98fef100");
    }

    #[test]
    fn topics_name_the_gateway_and_kind() {
        assert_eq!(
            topic_kind("outpost/gw-a/can/report"),
            Some(("gw-a", Kind::Report))
        );
        assert_eq!(
            topic_kind("outpost/gw-a/can/rules-status"),
            Some(("gw-a", Kind::RulesStatus))
        );
        assert_eq!(topic_kind("outpost/gw-a/can/rules"), None);
        assert_eq!(topic_kind("outpost//can/report"), None);
        assert_eq!(topic_kind("other/gw/can/report"), None);
    }
}
