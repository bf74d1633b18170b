//! What normal traffic looks like, learned from an attack-free capture (`outpost can learn`):
//! per identifier, its frame kind and lengths, its timing (the gaps between its frames and how
//! many it sends in a window), and its payload (bits that never change, byte ranges, the
//! largest step between consecutive frames, counters). A leaf: frames in, a serialisable
//! profile out.

use super::frame::{Frame, Kind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Version of the profile document.
pub const PROFILE_VERSION: u32 = 1;
/// Frames an identifier needs in the capture to get timing and payload statistics; with
/// fewer it is known (its kind and lengths) but graded on those alone.
pub const MIN_FRAMES: u64 = 20;

/// The profile of one capture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub version: u32,
    /// Frames learned from (error frames are not profiled).
    pub frames: u64,
    /// Microseconds from the first frame to the last.
    pub duration_us: u64,
    /// By Linux `can_id` in hex with its flags (`0x1a0`, `0x80001234` extended).
    pub ids: BTreeMap<String, IdProfile>,
}

/// A counter in the payload: `(byte & mask) >> shift` goes up by `step` (mod its range)
/// from one frame to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub byte: u8,
    pub mask: u8,
    pub step: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdProfile {
    pub count: u64,
    /// `data`, `fd` or `remote`.
    pub kind: String,
    /// Data lengths seen (remote frames: DLCs).
    pub lengths: Vec<u8>,
    /// Median gap between two frames of this id (0 with fewer than `MIN_FRAMES`).
    pub period_us: u64,
    /// The shortest and longest gaps seen, after dropping the extreme 0.1 % each side.
    pub min_gap_us: u64,
    pub max_gap_us: u64,
    /// Most frames seen in any window of `window_us` (sliding).
    pub window_us: u64,
    pub window_max: u32,
    /// Per byte position: bits equal in every frame (`constant_mask`) and their value.
    pub constant_mask: Vec<u8>,
    pub constant_value: Vec<u8>,
    pub byte_min: Vec<u8>,
    pub byte_max: Vec<u8>,
    /// Largest absolute change of each byte between consecutive frames.
    pub max_delta: Vec<u8>,
    pub counters: Vec<Counter>,
}

/// The profile key of a frame.
pub fn key(f: &Frame) -> String {
    format!("{:#x}", f.can_id() & !super::frame::CAN_RTR_FLAG)
}

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Data { .. } => "data",
        Kind::Fd { .. } => "fd",
        Kind::Remote { .. } => "remote",
        Kind::Error { .. } => "error",
    }
}

/// The window for counting an id's frames: ten periods, within 50 ms .. 1 s.
pub fn window_for(period_us: u64) -> u64 {
    (period_us.saturating_mul(10)).clamp(50_000, 1_000_000)
}

#[derive(Default)]
struct Acc {
    count: u64,
    kind: &'static str,
    lengths: Vec<u8>,
    times: Vec<u64>,
    payloads: Vec<Vec<u8>>,
}

/// Builds a [`Profile`] from frames in time order.
#[derive(Default)]
pub struct Learner {
    ids: HashMap<String, Acc>,
    first: Option<u64>,
    last: u64,
    frames: u64,
}

/// Frames of one id kept for learning at most (timing and payload statistics use them).
const MAX_KEPT: usize = 200_000;

impl Learner {
    pub fn add(&mut self, f: &Frame) {
        if f.is_error() {
            return;
        }
        self.frames += 1;
        self.first.get_or_insert(f.ts_us);
        self.last = self.last.max(f.ts_us);
        let a = self.ids.entry(key(f)).or_default();
        a.count += 1;
        a.kind = kind_name(&f.kind);
        let len = match f.kind {
            Kind::Remote { dlc } => dlc,
            _ => f.data().len() as u8,
        };
        if !a.lengths.contains(&len) {
            a.lengths.push(len);
        }
        if a.times.len() < MAX_KEPT {
            a.times.push(f.ts_us);
            a.payloads.push(f.data().to_vec());
        }
    }

    pub fn finish(self) -> Profile {
        let mut ids = BTreeMap::new();
        for (k, a) in self.ids {
            ids.insert(k, profile_of(a));
        }
        Profile {
            version: PROFILE_VERSION,
            frames: self.frames,
            duration_us: self.last.saturating_sub(self.first.unwrap_or(self.last)),
            ids,
        }
    }
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn profile_of(mut a: Acc) -> IdProfile {
    a.lengths.sort_unstable();
    let n = a.times.len();
    let width = a.payloads.iter().map(Vec::len).max().unwrap_or(0);
    let mut p = IdProfile {
        count: a.count,
        kind: a.kind.to_string(),
        lengths: a.lengths,
        period_us: 0,
        min_gap_us: 0,
        max_gap_us: 0,
        window_us: 0,
        window_max: 0,
        constant_mask: vec![0; width],
        constant_value: vec![0; width],
        byte_min: vec![0; width],
        byte_max: vec![255; width],
        max_delta: vec![255; width],
        counters: Vec::new(),
    };
    if (n as u64) < MIN_FRAMES {
        return p;
    }
    let mut gaps: Vec<u64> = a
        .times
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    gaps.sort_unstable();
    p.period_us = quantile(&gaps, 0.5);
    p.min_gap_us = quantile(&gaps, 0.001);
    p.max_gap_us = quantile(&gaps, 0.999);
    p.window_us = window_for(p.period_us);
    let mut ring = VecDeque::new();
    for &t in &a.times {
        ring.push_back(t);
        while ring.front().is_some_and(|&s| t - s >= p.window_us) {
            ring.pop_front();
        }
        p.window_max = p.window_max.max(ring.len() as u32);
    }
    // Payload: only over frames of the full width (shorter ones are rare lengths).
    let full: Vec<&Vec<u8>> = a.payloads.iter().filter(|d| d.len() == width).collect();
    if full.is_empty() {
        return p;
    }
    let (mut and, mut or) = (vec![0xffu8; width], vec![0u8; width]);
    let (mut lo, mut hi) = (vec![255u8; width], vec![0u8; width]);
    for d in &full {
        for i in 0..width {
            and[i] &= d[i];
            or[i] |= d[i];
            lo[i] = lo[i].min(d[i]);
            hi[i] = hi[i].max(d[i]);
        }
    }
    let mut delta = vec![0u8; width];
    for w in full.windows(2) {
        for i in 0..width {
            delta[i] = delta[i].max(w[0][i].abs_diff(w[1][i]));
        }
    }
    for i in 0..width {
        p.constant_mask[i] = !(and[i] ^ or[i]);
        p.constant_value[i] = and[i] & p.constant_mask[i];
    }
    p.byte_min = lo;
    p.byte_max = hi;
    p.max_delta = delta;
    // Counters: a nibble or byte that steps by the same amount in at least 99 % of the
    // consecutive pairs (and is not constant).
    for i in 0..width {
        for (mask, shift) in [(0x0fu8, 0u8), (0xf0, 4), (0xff, 0)] {
            if p.constant_mask[i] & mask == mask {
                continue;
            }
            let modulo = u16::from(mask >> shift) + 1;
            let mut steps: HashMap<u16, usize> = HashMap::new();
            for w in full.windows(2) {
                let (x, y) = (
                    u16::from((w[0][i] & mask) >> shift),
                    u16::from((w[1][i] & mask) >> shift),
                );
                *steps.entry((y + modulo - x) % modulo).or_default() += 1;
            }
            if let Some((&step, &hits)) = steps.iter().max_by_key(|(_, h)| **h) {
                if step != 0 && hits * 100 >= (full.len() - 1) * 99 {
                    p.counters.push(Counter {
                        byte: i as u8,
                        mask,
                        step: step as u8,
                    });
                    break;
                }
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(ts: u64, id: u32, d: &[u8]) -> Frame {
        Frame::new(ts, id, false, Kind::Data { raw_dlc: None }, d).unwrap()
    }

    #[test]
    fn learns_period_lengths_constants_ranges_and_counters() {
        let mut l = Learner::default();
        for i in 0..1000u64 {
            // 10 ms with ±0.3 ms jitter; byte 0 constant 0xA5, byte 1 a 0..=15 counter in the
            // low nibble with a constant high nibble, byte 2 a slow value 40..=60.
            let jitter = i * 7919 % 600;
            let v = 40 + (i / 50 % 21) as u8;
            l.add(&data(
                1_000_000 + i * 10_000 + jitter,
                0x1a0,
                &[0xa5, 0x30 | (i % 16) as u8, v],
            ));
        }
        let p = l.finish();
        let id = &p.ids["0x1a0"];
        assert_eq!(
            (id.count, id.kind.as_str(), id.lengths.as_slice()),
            (1000, "data", &[3u8][..])
        );
        assert!((9_400..=10_600).contains(&id.period_us), "{}", id.period_us);
        assert!(id.min_gap_us >= 9_400 && id.max_gap_us <= 10_600, "{id:?}");
        assert_eq!(id.constant_mask[0], 0xff);
        assert_eq!(id.constant_value[0], 0xa5);
        assert_eq!(id.constant_mask[1], 0xf0);
        // 1,000 frames, one step every 50: 40..=59, never more than 1 at a time.
        assert_eq!(
            (id.byte_min[2], id.byte_max[2], id.max_delta[2]),
            (40, 59, 1)
        );
        assert_eq!(
            id.counters,
            [Counter {
                byte: 1,
                mask: 0x0f,
                step: 1
            }]
        );
        assert_eq!(id.window_us, window_for(id.period_us));
        assert!((10..=11).contains(&id.window_max), "{}", id.window_max);
        // It round-trips as JSON.
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Profile>(&text).unwrap(), p);
    }

    #[test]
    fn a_rare_id_is_known_without_statistics() {
        let mut l = Learner::default();
        for i in 0..5 {
            l.add(&data(i * 1000, 0x7df, &[2, 1, 0]));
        }
        let p = l.finish();
        assert_eq!(p.ids["0x7df"].period_us, 0);
        assert_eq!(p.ids["0x7df"].max_delta, [255, 255, 255]);
    }
}
