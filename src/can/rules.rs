//! Detection rules from the fleet server (`outpost/{gw}/can/rules`, docs/can-fleet.md): the
//! document, its validation, and the grading of frames by them. A leaf: bytes in, a checked
//! rule set out; frames in, a level out.
//!
//! A rule names one id and is either a payload signature (`data & mask == value`) or a rate
//! limit (more than `max_frames` in a sliding `window_ms`). A set is checked whole: one bad
//! rule refuses the set, with the dotted path of the field in the error.

use super::frame::{Frame, CAN_EFF_FLAG, CAN_EFF_MASK, CAN_RTR_FLAG, CAN_SFF_MASK};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

/// Rules in one set, at most.
pub const MAX_RULES: usize = 256;
/// Largest rule document accepted.
pub const MAX_DOCUMENT: usize = 256 * 1024;
/// Longest signature (a CAN FD frame's data).
pub const MAX_SIGNATURE: usize = 64;
/// Longest rate window.
pub const MAX_WINDOW_MS: u64 = 10_000;
/// Most frames a rate window may allow (bounds what a rule makes us keep).
pub const MAX_FRAMES: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    pub kind: String,
    pub rules_id: String,
    #[serde(default)]
    pub network_config: String,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frames: Option<u32>,
    pub level: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    #[error("rule document of {0} bytes (at most {MAX_DOCUMENT})")]
    TooLarge(usize),
    #[error("not a rule document: {0}")]
    Json(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: String, reason: impl Into<String>) -> RuleError {
    RuleError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// An id as rules write it, as the `can_id` frames are keyed by (extended flag, no RTR).
pub fn parse_rule_id(s: &str) -> Option<u32> {
    let v = u32::from_str_radix(s.strip_prefix("0x")?, 16).ok()?;
    if v & CAN_RTR_FLAG != 0 || v & !CAN_EFF_FLAG > CAN_EFF_MASK {
        return None;
    }
    if v & CAN_EFF_FLAG == 0 && v > CAN_SFF_MASK {
        return Some(v | CAN_EFF_FLAG);
    }
    Some(v)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

enum Test {
    Signature {
        mask: Vec<u8>,
        value: Vec<u8>,
    },
    Rate {
        window_us: u64,
        max: u32,
        seen: VecDeque<u64>,
    },
}

struct Compiled {
    name: String,
    level: f64,
    test: Test,
}

/// A checked rule set, ready to grade frames.
pub struct Rules {
    pub set: RuleSet,
    by_id: HashMap<u32, Vec<Compiled>>,
}

impl Rules {
    /// No rules.
    pub fn empty() -> Rules {
        Rules {
            set: RuleSet {
                kind: "rules".into(),
                rules_id: String::new(),
                network_config: String::new(),
                rules: Vec::new(),
            },
            by_id: HashMap::new(),
        }
    }

    /// Parse and check a rule document.
    pub fn parse(bytes: &[u8]) -> Result<Rules, RuleError> {
        if bytes.len() > MAX_DOCUMENT {
            return Err(RuleError::TooLarge(bytes.len()));
        }
        let set: RuleSet =
            serde_json::from_slice(bytes).map_err(|e| RuleError::Json(e.to_string()))?;
        Rules::check(set)
    }

    /// Check a rule set.
    pub fn check(set: RuleSet) -> Result<Rules, RuleError> {
        if set.kind != "rules" {
            return Err(invalid("kind".into(), "must be \"rules\""));
        }
        if set.rules_id.is_empty() || set.rules_id.len() > 64 {
            return Err(invalid("rules_id".into(), "1 to 64 characters"));
        }
        if set.rules.len() > MAX_RULES {
            return Err(invalid("rules".into(), format!("at most {MAX_RULES}")));
        }
        let mut by_id: HashMap<u32, Vec<Compiled>> = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for (i, r) in set.rules.iter().enumerate() {
            let f = |name: &str| format!("rules[{i}].{name}");
            if r.name.is_empty() || r.name.chars().count() > 64 {
                return Err(invalid(f("name"), "1 to 64 characters"));
            }
            if !names.insert(r.name.as_str()) {
                return Err(invalid(f("name"), format!("`{}` twice", r.name)));
            }
            let id = parse_rule_id(&r.id)
                .ok_or_else(|| invalid(f("id"), format!("`{}` is not a 0x-hex CAN id", r.id)))?;
            if !(r.level > 0.0 && r.level <= 1.0) {
                return Err(invalid(f("level"), "must be in (0, 1]"));
            }
            let test = match (&r.mask, &r.value, r.window_ms, r.max_frames) {
                (Some(m), Some(v), None, None) => {
                    let mask = unhex(m).ok_or_else(|| invalid(f("mask"), "not hex"))?;
                    let value = unhex(v).ok_or_else(|| invalid(f("value"), "not hex"))?;
                    if mask.is_empty() || mask.len() > MAX_SIGNATURE {
                        return Err(invalid(f("mask"), format!("1 to {MAX_SIGNATURE} bytes")));
                    }
                    if value.len() != mask.len() {
                        return Err(invalid(f("value"), "must be as long as mask"));
                    }
                    if mask.iter().all(|&b| b == 0) {
                        return Err(invalid(f("mask"), "matches every frame"));
                    }
                    if value.iter().zip(&mask).any(|(v, m)| v & !m != 0) {
                        return Err(invalid(f("value"), "has bits outside the mask"));
                    }
                    Test::Signature { mask, value }
                }
                (None, None, Some(w), Some(n)) => {
                    if w == 0 || w > MAX_WINDOW_MS {
                        return Err(invalid(f("window_ms"), format!("1 to {MAX_WINDOW_MS}")));
                    }
                    if n == 0 || n > MAX_FRAMES {
                        return Err(invalid(f("max_frames"), format!("1 to {MAX_FRAMES}")));
                    }
                    Test::Rate {
                        window_us: w * 1000,
                        max: n,
                        seen: VecDeque::new(),
                    }
                }
                _ => {
                    return Err(invalid(
                        f("mask"),
                        "a rule is either mask + value or window_ms + max_frames",
                    ))
                }
            };
            by_id.entry(id).or_default().push(Compiled {
                name: r.name.clone(),
                level: r.level,
                test,
            });
        }
        Ok(Rules { set, by_id })
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The highest level a rule gives `f`, and that rule's name.
    pub fn grade(&mut self, f: &Frame) -> Option<(f64, &str)> {
        let rules = self.by_id.get_mut(&(f.can_id() & !CAN_RTR_FLAG))?;
        let mut best: Option<(f64, usize)> = None;
        for (i, r) in rules.iter_mut().enumerate() {
            let hit = match &mut r.test {
                Test::Signature { mask, value } => {
                    let d = f.data();
                    d.len() >= mask.len()
                        && d.iter()
                            .zip(mask.iter())
                            .zip(value.iter())
                            .all(|((b, m), v)| b & m == *v)
                }
                Test::Rate {
                    window_us,
                    max,
                    seen,
                } => {
                    seen.push_back(f.ts_us);
                    while seen
                        .front()
                        .is_some_and(|&t| f.ts_us.saturating_sub(t) >= *window_us)
                    {
                        seen.pop_front();
                    }
                    let over = seen.len() as u32 > *max;
                    while seen.len() as u32 > *max + 1 {
                        seen.pop_front();
                    }
                    over
                }
            };
            if hit && best.is_none_or(|(l, _)| r.level > l) {
                best = Some((r.level, i));
            }
        }
        best.map(|(l, i)| (l, rules[i].name.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::can::frame::Kind;

    fn data(ts: u64, id: u32, d: &[u8]) -> Frame {
        Frame::new(ts, id, id > 0x7ff, Kind::Data { raw_dlc: None }, d).unwrap()
    }

    const DOC: &str = r#"{"kind": "rules", "rules_id": "cfg-a-2", "network_config": "cfg-a",
     "rules": [
       {"name": "fleet-1", "id": "0x4d0", "mask": "ffffffff00000000",
        "value": "deadbeef00000000", "level": 0.95},
       {"name": "fleet-2", "id": "0x1a0", "window_ms": 100, "max_frames": 12, "level": 0.9},
       {"name": "fleet-3", "id": "0x98fef100", "mask": "ff", "value": "01", "level": 0.6}]}"#;

    #[test]
    fn the_documented_example_parses_and_grades() {
        let mut r = Rules::parse(DOC.as_bytes()).unwrap();
        assert_eq!(r.set.rules_id, "cfg-a-2");
        let sig = data(0, 0x4d0, &[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]);
        assert_eq!(r.grade(&sig), Some((0.95, "fleet-1")));
        assert_eq!(
            r.grade(&data(0, 0x4d0, &[0xde, 0xad, 0xbe, 0xee, 0, 0, 0, 0])),
            None
        );
        assert_eq!(
            r.grade(&data(0, 0x4d0, &[0xde, 0xad])),
            None,
            "too short to match"
        );
        assert_eq!(r.grade(&data(0, 0x18fe_f100, &[1])), Some((0.6, "fleet-3")));
        // Twelve in 100 ms pass, the thirteenth does not; after the window, fine again.
        for k in 0..12 {
            assert_eq!(r.grade(&data(k * 8_000, 0x1a0, &[0])), None, "frame {k}");
        }
        assert_eq!(r.grade(&data(96_000, 0x1a0, &[0])), Some((0.9, "fleet-2")));
        assert_eq!(r.grade(&data(400_000, 0x1a0, &[0])), None);
        assert_eq!(r.grade(&data(0, 0x2b0, &[0])), None);
    }

    #[test]
    fn a_bad_rule_refuses_the_set_naming_the_field() {
        let bad = |from: &str, to: &str| {
            let doc = DOC.replacen(from, to, 1);
            match Rules::parse(doc.as_bytes()) {
                Err(RuleError::Invalid { field, .. }) => field,
                other => panic!("{to}: {:?}", other.map(|r| r.set)),
            }
        };
        assert_eq!(bad("\"0x4d0\"", "\"4d0\""), "rules[0].id");
        assert_eq!(bad("\"ffffffff00000000\"", "\"fff\""), "rules[0].mask");
        assert_eq!(
            bad("\"ffffffff00000000\"", "\"00000000\""),
            "rules[0].value"
        );
        assert_eq!(
            bad("\"deadbeef00000000\"", "\"deadbeef00000001\""),
            "rules[0].value"
        );
        assert_eq!(bad("0.95", "1.5"), "rules[0].level");
        assert_eq!(
            bad("\"window_ms\": 100", "\"window_ms\": 0"),
            "rules[1].window_ms"
        );
        assert_eq!(bad("\"fleet-2\"", "\"fleet-1\""), "rules[1].name");
        assert_eq!(
            bad(
                "\"max_frames\": 12,",
                "\"max_frames\": 12, \"mask\": \"ff\","
            ),
            "rules[1].mask"
        );
        assert_eq!(bad("\"kind\": \"rules\"", "\"kind\": \"alert\""), "kind");
        assert!(matches!(
            Rules::parse(
                DOC.replacen("\"level\": 0.6", "\"level\": 0.6, \"x\": 1", 1)
                    .as_bytes()
            ),
            Err(RuleError::Json(_))
        ));
        assert!(matches!(
            Rules::parse(b"{\"kind\":"),
            Err(RuleError::Json(_))
        ));
        assert!(matches!(
            Rules::parse(&vec![b' '; MAX_DOCUMENT + 1]),
            Err(RuleError::TooLarge(_))
        ));
        let many: Vec<String> = (0..=MAX_RULES)
            .map(|i| format!(r#"{{"name":"r{i}","id":"0x1","mask":"ff","value":"00","level":1}}"#))
            .collect();
        let doc = format!(
            r#"{{"kind":"rules","rules_id":"x","rules":[{}]}}"#,
            many.join(",")
        );
        assert!(
            matches!(Rules::parse(doc.as_bytes()), Err(RuleError::Invalid { field, .. }) if field == "rules")
        );
    }

    /// Found by the `can_rules` fuzz target in CI: a level written with a hundred leading
    /// zeros parsed to a different f64 than its shortest form parses to, so a set that passed
    /// its checks came back from its own serialisation as another set. serde_json's
    /// `float_roundtrip` parses every decimal to the nearest f64.
    #[test]
    fn a_level_survives_its_own_serialisation_bit_for_bit() {
        let tiny = format!("0.{}1737264693", "0".repeat(114));
        let doc = DOC.replacen("0.95", &tiny, 1);
        let first = Rules::parse(doc.as_bytes()).unwrap();
        let again = serde_json::to_vec(&first.set).unwrap();
        let back = Rules::parse(&again).unwrap();
        assert_eq!(
            back.set.rules[0].level.to_bits(),
            first.set.rules[0].level.to_bits()
        );
        assert_eq!(back.set, first.set);
    }

    #[test]
    fn a_rate_rule_keeps_at_most_its_limit() {
        let mut r = Rules::parse(DOC.as_bytes()).unwrap();
        for k in 0..100_000 {
            r.grade(&data(k, 0x1a0, &[0]));
        }
        let kept = r.by_id[&0x1a0]
            .iter()
            .map(|c| match &c.test {
                Test::Rate { seen, .. } => seen.len(),
                Test::Signature { .. } => 0,
            })
            .sum::<usize>();
        assert!(kept <= 13, "{kept}");
    }
}
