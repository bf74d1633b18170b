//! The plain baseline the detector is compared against (issue 12: "per-id timing plus learned
//! byte ranges"): an unknown id, a data length the id never had, a gap to the id's previous
//! frame (any frame, no notion of accepted ones) under half its shortest learned gap, or a
//! byte outside its learned range makes a frame anomalous (level 1). Nothing else: no
//! counters, checksums, signals, relations or schedule. A leaf, like the detector.

use super::detect::Verdict;
use super::frame::Frame;
use super::profile::{key_u32, parse_key, Profile};
use std::collections::HashMap;

struct Slot {
    min_gap: u64,
    lengths: Vec<u8>,
    lo: Vec<u8>,
    hi: Vec<u8>,
    last: Option<u64>,
}

pub struct Baseline {
    slots: HashMap<u32, Slot>,
}

impl Baseline {
    pub fn new(p: &Profile) -> Baseline {
        let slots = p
            .ids
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    parse_key(k)?,
                    Slot {
                        min_gap: v.min_gap_us,
                        lengths: v.lengths.clone(),
                        lo: v.byte_min.clone(),
                        hi: v.byte_max.clone(),
                        last: None,
                    },
                ))
            })
            .collect();
        Baseline { slots }
    }

    pub fn grade(&mut self, f: &Frame) -> Verdict {
        let none = Verdict {
            level: 0.0,
            reasons: Vec::new(),
        };
        if f.is_error() {
            return none;
        }
        let Some(s) = self.slots.get_mut(&key_u32(f)) else {
            return Verdict {
                level: 1.0,
                reasons: vec!["unknown-id"],
            };
        };
        let d = f.data();
        let mut reasons = Vec::new();
        if !s.lengths.contains(&(d.len() as u8)) {
            reasons.push("length");
        }
        if let Some(prev) = s.last {
            if f.ts_us.saturating_sub(prev) * 2 < s.min_gap {
                reasons.push("early");
            }
        }
        s.last = Some(f.ts_us);
        if d.len() == s.lo.len()
            && d.iter()
                .zip(s.lo.iter().zip(&s.hi))
                .any(|(b, (lo, hi))| b < lo || b > hi)
        {
            reasons.push("range");
        }
        if reasons.is_empty() {
            return none;
        }
        Verdict {
            level: 1.0,
            reasons,
        }
    }
}
