//! Grades every frame against a [`Profile`]: a level in [0, 1] and the reasons behind it.
//! Cheap detectors, each giving a level for what it saw; the frame's level combines them as
//! independent evidence, `1 - Π(1 - lᵢ)`:
//!
//! | reason | what | level |
//! |---|---|---|
//! | `unknown-id` | an identifier the profile never saw | 1.0 |
//! | `kind` / `length` | a frame kind or data length the id never had | 1.0 |
//! | `early` | the gap since the id's previous frame is under half its shortest learned gap | 0.6 |
//! | `rate` | more frames of the id in its window than ever learned (plus a margin) | 0.9 |
//! | `constant-bits` | a bit that never changed has changed | 0.9 |
//! | `range` | a byte outside its learned range | 0.7 |
//! | `jump` | a byte changed more than it ever did between two frames | 0.6 |
//! | `counter` | a counter did not step as learned (and did not merely repeat) | 0.7 |
//!
//! Timing, steps and counters are judged against the id's last *accepted* frame (graded
//! below [`ACCEPT_BELOW`]), so injected frames do not make the genuine ones after them look
//! early or out of step; the window counts every frame, but `rate` is only charged to frames
//! off the schedule (early ones), so the genuine frames amid a flood keep level 0. After a
//! silence of more than four of its longest gaps an id starts afresh (no stale comparison),
//! and a counter may skip up to [`COUNTER_SLACK`] steps (frames that were not accepted).
//!
//! State is per id (its last accepted frame and the times of its frames in the window),
//! bounded by the profile's ids and their learned window counts; an unknown id keeps none.

use super::frame::{Frame, Kind};
use super::profile::{key, IdProfile, Profile};
use std::collections::{HashMap, VecDeque};

/// A frame graded below this becomes its id's reference for timing, steps and counters.
pub const ACCEPT_BELOW: f64 = 0.5;
/// Counter steps a frame may be ahead of the last accepted one.
pub const COUNTER_SLACK: u16 = 4;

/// The verdict on one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub level: f64,
    pub reasons: Vec<&'static str>,
}

struct State {
    last_ts: Option<u64>,
    last: Vec<u8>,
    window: VecDeque<u64>,
}

pub struct Detector {
    ids: HashMap<String, (IdProfile, State)>,
}

fn combine(levels: &[(f64, &'static str)]) -> Verdict {
    let mut keep = 1.0;
    let mut reasons = Vec::new();
    for (l, r) in levels {
        keep *= 1.0 - l;
        reasons.push(*r);
    }
    Verdict {
        level: ((1.0 - keep) * 1000.0).round() / 1000.0,
        reasons,
    }
}

impl Detector {
    pub fn new(p: &Profile) -> Detector {
        Detector {
            ids: p
                .ids
                .iter()
                .map(|(k, v)| {
                    let state = State {
                        last_ts: None,
                        last: Vec::new(),
                        window: VecDeque::new(),
                    };
                    (k.clone(), (v.clone(), state))
                })
                .collect(),
        }
    }

    pub fn grade(&mut self, f: &Frame) -> Verdict {
        if f.is_error() {
            // Error frames are the controller's, not an ECU's: counted, not graded.
            return Verdict {
                level: 0.0,
                reasons: Vec::new(),
            };
        }
        let Some((p, st)) = self.ids.get_mut(&key(f)) else {
            return combine(&[(1.0, "unknown-id")]);
        };
        let mut hits: Vec<(f64, &'static str)> = Vec::new();
        let (kind, len) = match f.kind {
            Kind::Data { .. } => ("data", f.data().len() as u8),
            Kind::Fd { .. } => ("fd", f.data().len() as u8),
            Kind::Remote { dlc } => ("remote", dlc),
            Kind::Error { .. } => ("error", 0),
        };
        if kind != p.kind {
            hits.push((1.0, "kind"));
        } else if !p.lengths.contains(&len) {
            hits.push((1.0, "length"));
        }
        if p.period_us > 0 {
            // A long silence (the ECU was off, or everything since was rejected): start afresh.
            if st
                .last_ts
                .is_some_and(|prev| f.ts_us.saturating_sub(prev) > p.max_gap_us.saturating_mul(4))
            {
                st.last_ts = None;
                st.last.clear();
            }
            let mut early = false;
            if let Some(prev) = st.last_ts {
                if f.ts_us.saturating_sub(prev) * 2 < p.min_gap_us {
                    hits.push((0.6, "early"));
                    early = true;
                }
            }
            st.window.push_back(f.ts_us);
            while st
                .window
                .front()
                .is_some_and(|&s| f.ts_us.saturating_sub(s) >= p.window_us)
            {
                st.window.pop_front();
            }
            let margin = (p.window_max / 5).max(2);
            if early && st.window.len() as u32 > p.window_max + margin {
                hits.push((0.9, "rate"));
            }
            // Bounded: a flood keeps at most a few times the learned count.
            while st.window.len() as u32 > 4 * (p.window_max + margin) {
                st.window.pop_front();
            }
            let d = f.data();
            if d.len() == p.constant_mask.len() {
                let mut constant = false;
                let mut range = false;
                let mut jump = false;
                for (i, &b) in d.iter().enumerate() {
                    constant |= b & p.constant_mask[i] != p.constant_value[i];
                    range |= b < p.byte_min[i] || b > p.byte_max[i];
                    if st.last.len() == d.len() {
                        jump |= st.last[i].abs_diff(b) > p.max_delta[i];
                    }
                }
                let mut counter = false;
                if st.last.len() == d.len() {
                    for c in &p.counters {
                        let i = usize::from(c.byte);
                        let shift = c.mask.trailing_zeros();
                        let modulo = u16::from(c.mask >> shift) + 1;
                        let prev = u16::from((st.last[i] & c.mask) >> shift);
                        let now = u16::from((d[i] & c.mask) >> shift);
                        let ahead = (now + modulo - prev) % modulo;
                        let step = u16::from(c.step);
                        counter |= ahead != 0
                            && !(1..=COUNTER_SLACK).any(|k| ahead == (k * step) % modulo);
                    }
                }
                if constant {
                    hits.push((0.9, "constant-bits"));
                }
                if range {
                    hits.push((0.7, "range"));
                }
                if jump {
                    hits.push((0.6, "jump"));
                }
                if counter {
                    hits.push((0.7, "counter"));
                }
            }
            let v = combine(&hits);
            if v.level < ACCEPT_BELOW {
                st.last_ts = Some(f.ts_us);
                st.last.clear();
                st.last.extend_from_slice(d);
            }
            return v;
        }
        combine(&hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::can::profile::Learner;

    fn data(ts: u64, id: u32, d: &[u8]) -> Frame {
        Frame::new(ts, id, false, Kind::Data { raw_dlc: None }, d).unwrap()
    }

    fn normal(i: u64) -> Frame {
        let jitter = i * 7919 % 600;
        data(
            1_000_000 + i * 10_000 + jitter,
            0x1a0,
            &[0xa5, 0x30 | (i % 16) as u8, 50],
        )
    }

    fn detector() -> Detector {
        let mut l = Learner::default();
        for i in 0..2000 {
            l.add(&normal(i));
        }
        Detector::new(&l.finish())
    }

    #[test]
    fn normal_traffic_scores_zero() {
        let mut d = detector();
        for i in 3000..5000 {
            let v = d.grade(&normal(i));
            assert_eq!(v.level, 0.0, "frame {i}: {v:?}");
        }
    }

    #[test]
    fn each_detector_fires_on_its_anomaly() {
        let mut d = detector();
        for i in 3000..3010 {
            d.grade(&normal(i));
        }
        let t = normal(3010).ts_us;
        let v = d.grade(&data(t, 0x000, &[0; 8]));
        assert_eq!((v.level, v.reasons.as_slice()), (1.0, &["unknown-id"][..]));
        let v = d.grade(&data(t, 0x1a0, &[0xa5, 0x3a, 50, 0]));
        assert!(v.reasons.contains(&"length") && v.level == 1.0, "{v:?}");
        // A spoofed frame 1 ms after a genuine one, with a wrong constant and counter.
        assert_eq!(d.grade(&normal(3010)).level, 0.0);
        let v = d.grade(&data(t + 1_000, 0x1a0, &[0xa4, 0x3f, 50]));
        assert!(v.reasons.contains(&"early"), "{v:?}");
        assert!(v.reasons.contains(&"constant-bits"), "{v:?}");
        assert!(v.level > 0.9, "{v:?}");
        // A flood at 1 ms trips the window count; the genuine frames amid it are judged
        // against the genuine ones before them: level 0.
        let mut all: Vec<(Frame, bool)> = (0..50)
            .map(|k| (data(t + 2_000 + k * 1_000, 0x1a0, &[0xa5, 0x30, 50]), true))
            .collect();
        all.extend((3011..3016).map(|i| (normal(i), false)));
        all.sort_by_key(|(f, _)| f.ts_us);
        let mut rate = false;
        for (f, flood) in &all {
            let v = d.grade(f);
            if *flood {
                rate |= v.reasons.contains(&"rate");
            } else {
                assert_eq!(v.level, 0.0, "genuine frame at {}: {v:?}", f.ts_us);
            }
        }
        assert!(rate);
        let v = d.grade(&data(normal(3016).ts_us, 0x1a0, &[0xa5, 0x30, 200]));
        assert!(
            v.reasons.contains(&"range") && v.reasons.contains(&"jump"),
            "{v:?}"
        );
    }

    #[test]
    fn error_frames_are_not_graded() {
        let mut d = detector();
        let e = Frame::new(0, 0, false, Kind::Error { class: 0x40 }, &[0; 8]).unwrap();
        assert_eq!(d.grade(&e).level, 0.0);
    }
}
