//! What normal traffic looks like, learned from an attack-free capture (`outpost can learn`):
//! per identifier, its frame kind and lengths, its timing (the period, how far a gap strays
//! from a whole number of periods, how many frames it sends in a window), and its payload
//! (bits that never change, byte ranges, the largest step between consecutive frames,
//! counters, checksums). With a DBC ([`Learner::with_dbc`]) also the message's name and
//! transmitter ECU, its signals with their learned raw ranges and steps, counters and
//! checksums at the DBC's positions, and *relations*: pairs of signals (in the same or
//! another id) that carry the same quantity, learned as a linear fit with its largest
//! residual (wheel speeds and vehicle speed, two copies of a steering angle...).
//! A leaf: frames in, a serialisable profile out.

use super::dbc::{Dbc, Mux, Role};
use super::frame::{Frame, Kind};
use super::payload::{Algo, Field, ALGOS};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Version of the profile document (2: tolerances, counters and checksums as fields,
/// signals and relations).
pub const PROFILE_VERSION: u32 = 2;
/// Frames an identifier needs in the capture to get timing and payload statistics; with
/// fewer it is known (its kind and lengths) but graded on those alone.
pub const MIN_FRAMES: u64 = 20;
/// A relation is kept when the two signals correlate at least this well (|r|) on the
/// capture.
pub const MIN_CORRELATION: f64 = 0.995;

/// The profile of one capture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub version: u32,
    /// Frames learned from (error frames are not profiled).
    pub frames: u64,
    /// Microseconds from the first frame to the last.
    pub duration_us: u64,
    /// Messages in the DBC the profile was learned with (0: none).
    #[serde(default)]
    pub dbc_messages: u32,
    /// By Linux `can_id` in hex with its flags (`0x1a0`, `0x80001234` extended).
    pub ids: BTreeMap<String, IdProfile>,
}

/// The sender's long-run schedule of a periodic id: a lattice of `period` through `anchor`,
/// pulled slowly (1/16 of each deviation) towards the frames, and the running average
/// (1/8) of the frames' deviations from it. A sender that keeps its clock stays near 0; a
/// frame stream of another phase (an attacker who took over the id at its period, a
/// masquerade) moves the average by its offset within a few frames.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTracker {
    anchor: Option<u64>,
    avg: f64,
    seen: u32,
}

impl PhaseTracker {
    /// Frames before the average means anything.
    pub const WARMUP: usize = 32;

    fn dev(&self, t: u64, period: u64) -> Option<(u64, f64)> {
        let a = self.anchor?;
        if period == 0 || t < a {
            return None;
        }
        let n = ((t - a) + period / 2) / period;
        let predicted = a + n * period;
        Some((predicted, t as f64 - predicted as f64))
    }

    /// The average deviation if a frame at `t` joined it, and the frame's own deviation
    /// (µs); (0, 0) before the warm-up.
    pub fn deviation(&self, t: u64, period: u64) -> (f64, f64) {
        match self.dev(t, period) {
            Some((_, d)) if self.seen as usize >= Self::WARMUP => {
                (self.avg + (d - self.avg) / 8.0, d)
            }
            _ => (0.0, 0.0),
        }
    }

    /// A frame at `t` joins the average; with `pull`, the lattice moves 1/16 of the way to
    /// it too (not for a frame judged to be another sender's, so the schedule stays the
    /// genuine sender's).
    pub fn update(&mut self, t: u64, period: u64, pull: bool) {
        match self.dev(t, period) {
            Some((predicted, d)) => {
                self.avg += (d - self.avg) / 8.0;
                // Faster while warming up: the first frame may have been a delayed one.
                let gain = if (self.seen as usize) < Self::WARMUP {
                    4.0
                } else {
                    16.0
                };
                let moved = predicted as f64 + if pull { d / gain } else { 0.0 };
                self.anchor = Some(moved.max(0.0) as u64);
                self.seen = self.seen.saturating_add(1);
            }
            None => {
                *self = PhaseTracker {
                    anchor: Some(t),
                    avg: 0.0,
                    seen: 0,
                }
            }
        }
    }

    pub fn reset(&mut self) {
        *self = PhaseTracker::default();
    }
}

/// A rolling counter: the field goes up by `step` modulo `modulo` from one frame to the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterRule {
    pub field: Field,
    pub step: u32,
    pub modulo: u32,
}

/// A checksum in `field`, of the family `algo`, held by every frame of the capture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChecksumRule {
    pub field: Field,
    pub algo: Algo,
}

/// A DBC signal (a value, not a counter or checksum) and what it did in the capture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalProfile {
    pub name: String,
    pub field: Field,
    pub scale: f64,
    pub offset: f64,
    /// The DBC's physical range (equal when the DBC gives none).
    pub dbc_min: f64,
    pub dbc_max: f64,
    /// Raw range seen, and the largest raw change between consecutive frames.
    pub lo: i64,
    pub hi: i64,
    pub max_step: i64,
}

/// `this.signal ≈ k · other.other_signal + c`, within `tol` (physical units of `signal`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relation {
    pub signal: u16,
    pub other: String,
    pub other_signal: u16,
    pub k: f64,
    pub c: f64,
    pub tol: f64,
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
    /// The largest distance of a gap from a whole number of periods (jitter, bus delays),
    /// with a margin; at `period_us / 2` or more the id is not periodic.
    pub tol_us: u64,
    /// The largest drift of the id's phase seen by [`PhaseTracker`] (its average deviation
    /// from the sender's long-run schedule), with a margin; 0: not tracked.
    #[serde(default)]
    pub phase_tol_us: u64,
    /// Most frames seen in any window of `window_us` (sliding).
    pub window_us: u64,
    pub window_max: u32,
    /// Per byte position: bits equal in every frame (`constant_mask`) and their value. With
    /// a DBC, the bits of signals that varied are left out (their ranges are checked).
    pub constant_mask: Vec<u8>,
    pub constant_value: Vec<u8>,
    pub byte_min: Vec<u8>,
    pub byte_max: Vec<u8>,
    /// Largest absolute change of each byte between consecutive frames.
    pub max_delta: Vec<u8>,
    pub counters: Vec<CounterRule>,
    #[serde(default)]
    pub checksum: Option<ChecksumRule>,
    /// From the DBC: the message name and its transmitter ECU.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub ecu: Option<String>,
    #[serde(default)]
    pub signals: Vec<SignalProfile>,
    #[serde(default)]
    pub relations: Vec<Relation>,
}

/// The profile key of a frame.
pub fn key(f: &Frame) -> String {
    format!("{:#x}", f.can_id() & !super::frame::CAN_RTR_FLAG)
}

/// The numeric key of a frame: its `can_id` without the RTR flag (what [`key`] prints).
pub fn key_u32(f: &Frame) -> u32 {
    f.can_id() & !super::frame::CAN_RTR_FLAG
}

/// The numeric key of a profile key string; `None` if it is not one.
pub fn parse_key(k: &str) -> Option<u32> {
    u32::from_str_radix(k.strip_prefix("0x")?, 16).ok()
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
    dbc: Option<Dbc>,
}

/// Frames of one id kept for learning at most (timing and payload statistics use them).
const MAX_KEPT: usize = 200_000;

impl Learner {
    /// A learner that also learns the signals of `dbc`'s messages.
    pub fn with_dbc(dbc: Dbc) -> Learner {
        Learner {
            dbc: Some(dbc),
            ..Learner::default()
        }
    }

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
        let mut accs = Vec::new();
        for (k, a) in self.ids {
            let msg = self.dbc.as_ref().and_then(|d| {
                let raw = parse_key(&k)?;
                let ext = raw & super::frame::CAN_EFF_FLAG != 0;
                d.message(raw & super::frame::CAN_EFF_MASK, ext)
            });
            let p = profile_of(
                &a,
                msg,
                parse_key(&k).unwrap_or(0) & super::frame::CAN_EFF_MASK,
            );
            accs.push((k.clone(), a));
            ids.insert(k, p);
        }
        learn_relations(&mut ids, &accs);
        Profile {
            version: PROFILE_VERSION,
            frames: self.frames,
            duration_us: self.last.saturating_sub(self.first.unwrap_or(self.last)),
            dbc_messages: self.dbc.as_ref().map_or(0, |d| d.messages.len() as u32),
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

/// How far `gap` is from a whole (non-zero) number of periods, and that number.
pub fn lattice(gap: u64, period: u64) -> (u64, u64) {
    if period == 0 {
        return (0, 0);
    }
    let k = (gap + period / 2) / period;
    let k1 = k.max(1);
    (k, gap.abs_diff(k1 * period))
}

/// A counter rule for `field` if it steps by one amount in at least 99 % of the pairs,
/// with the modulo its maximum suggests (a 4-bit counter may wrap at 15 or at 14).
fn counter_rule(field: Field, full: &[&Vec<u8>]) -> Option<CounterRule> {
    let vals: Vec<u64> = full.iter().filter_map(|d| field.bits(d)).collect();
    if vals.len() < 3 || field.len > 16 {
        return None;
    }
    let max = *vals.iter().max()?;
    let full_mod = 1u64 << field.len;
    let mut best: Option<CounterRule> = None;
    for modulo in [max + 1, full_mod] {
        if modulo < 2 || modulo > full_mod {
            continue;
        }
        let mut steps: HashMap<u64, usize> = HashMap::new();
        for w in vals.windows(2) {
            *steps
                .entry((w[1] + modulo - w[0] % modulo) % modulo)
                .or_default() += 1;
        }
        if let Some((&step, &hits)) = steps.iter().max_by_key(|(_, h)| **h) {
            if step != 0 && hits * 100 >= (vals.len() - 1) * 99 {
                best = Some(CounterRule {
                    field,
                    step: step as u32,
                    modulo: modulo as u32,
                });
                break;
            }
        }
    }
    best
}

/// The checksum family `field` carries in every frame, if one does and the field varies.
fn checksum_rule(field: Field, full: &[&Vec<u8>], id: u32) -> Option<ChecksumRule> {
    let mut distinct = Vec::new();
    for d in full.iter().take(64) {
        if let Some(v) = field.bits(d) {
            if !distinct.contains(&v) {
                distinct.push(v);
            }
        }
    }
    if distinct.len() < 4 {
        return None;
    }
    ALGOS
        .iter()
        .filter(|a| field.len == 8 || **a == Algo::Nibble)
        .find(|a| full.iter().all(|d| a.holds(&field, d, id)))
        .map(|&algo| ChecksumRule { field, algo })
}

fn profile_of(a: &Acc, msg: Option<&super::dbc::Message>, id: u32) -> IdProfile {
    let mut lengths = a.lengths.clone();
    lengths.sort_unstable();
    let n = a.times.len();
    let width = a.payloads.iter().map(Vec::len).max().unwrap_or(0);
    let mut p = IdProfile {
        count: a.count,
        kind: a.kind.to_string(),
        lengths,
        period_us: 0,
        min_gap_us: 0,
        max_gap_us: 0,
        tol_us: 0,
        phase_tol_us: 0,
        window_us: 0,
        window_max: 0,
        constant_mask: vec![0; width],
        constant_value: vec![0; width],
        byte_min: vec![0; width],
        byte_max: vec![255; width],
        max_delta: vec![255; width],
        counters: Vec::new(),
        checksum: None,
        name: msg.map(|m| m.name.clone()),
        ecu: msg.and_then(|m| m.transmitters.first().cloned()),
        signals: Vec::new(),
        relations: Vec::new(),
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
    // The period: the mean of the gaps near the median (a whole number of periods apart,
    // the mean is the sender's clock; the median can sit at one side of its jitter).
    let median = quantile(&gaps, 0.5);
    let near: Vec<u64> = gaps
        .iter()
        .copied()
        .filter(|&g| g * 2 >= median && g * 2 <= median * 3)
        .collect();
    p.period_us = if near.is_empty() {
        median
    } else {
        (near.iter().sum::<u64>() as f64 / near.len() as f64).round() as u64
    };
    p.min_gap_us = quantile(&gaps, 0.001);
    p.max_gap_us = quantile(&gaps, 0.999);
    let dev = gaps
        .iter()
        .map(|&g| lattice(g, p.period_us).1)
        .max()
        .unwrap_or(0);
    p.tol_us = dev + dev / 2 + 100;
    if p.tol_us * 2 < p.period_us {
        let mut ph = PhaseTracker::default();
        let mut worst = 0.0f64;
        for (n, &t) in a.times.iter().enumerate() {
            let (avg, _) = ph.deviation(t, p.period_us);
            if n > PhaseTracker::WARMUP {
                worst = worst.max(avg.abs());
            }
            ph.update(t, p.period_us, true);
        }
        p.phase_tol_us = (worst * 1.5) as u64 + 30;
    }
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
    if let Some(m) = msg {
        for s in &m.signals {
            let Some(field) = s.field else { continue };
            if s.mux != Mux::None || usize::from(field.bytes) > width || width > 8 {
                continue;
            }
            match s.role() {
                Role::Counter => {
                    if let Some(c) = counter_rule(field, &full) {
                        p.counters.push(c);
                    }
                }
                Role::Checksum => {
                    if p.checksum.is_none() {
                        p.checksum = checksum_rule(field, &full, id);
                    }
                }
                Role::Value => {
                    let vals: Vec<i64> = full.iter().filter_map(|d| field.raw(d)).collect();
                    let (Some(&lo), Some(&hi)) = (vals.iter().min(), vals.iter().max()) else {
                        continue;
                    };
                    let max_step = vals
                        .windows(2)
                        .map(|w| w[0].abs_diff(w[1]).min(i64::MAX as u64) as i64)
                        .max()
                        .unwrap_or(0);
                    if hi > lo {
                        // A value that varies: its range is checked, not its bits.
                        let m = field.byte_mask();
                        for ((cm, cv), mb) in p
                            .constant_mask
                            .iter_mut()
                            .zip(p.constant_value.iter_mut())
                            .zip(m)
                        {
                            *cm &= !mb;
                            *cv &= !mb;
                        }
                    }
                    p.signals.push(SignalProfile {
                        name: s.name.clone(),
                        field,
                        scale: s.scale,
                        offset: s.offset,
                        dbc_min: s.min,
                        dbc_max: s.max,
                        lo,
                        hi,
                        max_step,
                    });
                }
            }
        }
    }
    if width <= 8 {
        // Without a DBC (or counters and checksums it does not name): a nibble or byte
        // that steps as a counter, a byte or nibble that holds a known checksum.
        if p.counters.is_empty() {
            for i in 0..width as u8 {
                for (lo_bit, len) in [(0u8, 4u8), (4, 4), (0, 8)] {
                    let m = (((1u16 << len) - 1) << lo_bit) as u8;
                    if p.constant_mask[usize::from(i)] & m == m {
                        continue;
                    }
                    if let Some(c) = counter_rule(Field::bits_of_byte(i, lo_bit, len), &full) {
                        p.counters.push(c);
                        break;
                    }
                }
            }
        }
        if p.checksum.is_none() {
            'scan: for i in (0..width as u8).rev() {
                for (lo_bit, len) in [(0u8, 8u8), (0, 4), (4, 4)] {
                    let f = Field::bits_of_byte(i, lo_bit, len);
                    if p.counters.iter().any(|c| c.field == f) {
                        continue;
                    }
                    if let Some(c) = checksum_rule(f, &full, id) {
                        p.checksum = Some(c);
                        break 'scan;
                    }
                }
            }
        }
    }
    p
}

/// The physical value of signal `s` in `data`.
pub fn signal_value(s: &SignalProfile, data: &[u8]) -> Option<f64> {
    s.field.raw(data).map(|r| r as f64 * s.scale + s.offset)
}

/// Relations between signals: sample every signal that varied on a 20 ms grid (its latest
/// value), keep the pairs that correlate at least [`MIN_CORRELATION`] (two partners per
/// signal at most), fit `a ≈ k·b + c` on the grid, and measure the largest residual as the
/// detector will see it (at each frame of `a`, against `b`'s latest frame).
fn learn_relations(ids: &mut BTreeMap<String, IdProfile>, accs: &[(String, Acc)]) {
    struct Series<'a> {
        key: &'a str,
        sig: u16,
        times: &'a [u64],
        vals: Vec<f64>,
        quantum: f64,
    }
    let mut series: Vec<Series> = Vec::new();
    for (k, a) in accs {
        let Some(p) = ids.get(k) else { continue };
        if p.period_us == 0 || p.tol_us * 2 >= p.period_us {
            continue;
        }
        for (i, s) in p.signals.iter().enumerate() {
            if s.hi.saturating_sub(s.lo) < 8 {
                continue;
            }
            let vals: Vec<f64> = a
                .payloads
                .iter()
                .map(|d| signal_value(s, d).unwrap_or(f64::NAN))
                .collect();
            series.push(Series {
                key: k,
                sig: i as u16,
                times: &a.times,
                vals,
                quantum: s.scale.abs(),
            });
        }
    }
    if series.len() < 2 || series.len() > 2000 {
        return;
    }
    let start = series
        .iter()
        .filter_map(|s| s.times.first())
        .max()
        .copied()
        .unwrap_or(0);
    let end = series
        .iter()
        .filter_map(|s| s.times.last())
        .min()
        .copied()
        .unwrap_or(0);
    if end <= start + 1_000_000 {
        return;
    }
    let grid: Vec<u64> = (start..end).step_by(20_000).collect();
    // Latest value of each series at each grid time, then z-scores.
    let mut z: Vec<Vec<f64>> = Vec::with_capacity(series.len());
    let mut raw: Vec<Vec<f64>> = Vec::with_capacity(series.len());
    for s in &series {
        let mut out = Vec::with_capacity(grid.len());
        let mut j = 0;
        for &t in &grid {
            while j + 1 < s.times.len() && s.times[j + 1] <= t {
                j += 1;
            }
            out.push(s.vals[j]);
        }
        let n = out.len() as f64;
        let mean = out.iter().sum::<f64>() / n;
        let sd = (out.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let zs = if sd > 0.0 && sd.is_finite() {
            out.iter().map(|v| (v - mean) / sd).collect()
        } else {
            vec![f64::NAN; out.len()]
        };
        z.push(zs);
        raw.push(out);
    }
    let n = grid.len() as f64;
    let mut partners: Vec<Vec<(f64, usize)>> = vec![Vec::new(); series.len()];
    for i in 0..series.len() {
        if z[i][0].is_nan() {
            continue;
        }
        for j in i + 1..series.len() {
            if z[j][0].is_nan()
                || (series[i].key == series[j].key && series[i].sig == series[j].sig)
            {
                continue;
            }
            let r = z[i].iter().zip(&z[j]).map(|(a, b)| a * b).sum::<f64>() / n;
            if r.abs() >= MIN_CORRELATION {
                partners[i].push((r.abs(), j));
                partners[j].push((r.abs(), i));
            }
        }
    }
    for (i, ps) in partners.iter_mut().enumerate() {
        ps.sort_by(|a, b| b.0.total_cmp(&a.0));
        for &(_, j) in ps.iter().take(2) {
            // Least squares a = k b + c on the grid.
            let (a, b) = (&raw[i], &raw[j]);
            let mb = b.iter().sum::<f64>() / n;
            let ma = a.iter().sum::<f64>() / n;
            let sbb: f64 = b.iter().map(|x| (x - mb).powi(2)).sum();
            let sab: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
            if sbb <= 0.0 {
                continue;
            }
            let k = sab / sbb;
            let c = ma - k * mb;
            // Residuals at each frame of i against j's latest frame.
            let (si, sj) = (&series[i], &series[j]);
            let mut worst: f64 = 0.0;
            let mut q = 0usize;
            for (t, v) in si.times.iter().zip(&si.vals) {
                while q + 1 < sj.times.len() && sj.times[q + 1] <= *t {
                    q += 1;
                }
                if sj.times.first().is_none_or(|f| f > t) {
                    continue;
                }
                let res = (v - (k * sj.vals[q] + c)).abs();
                if res.is_finite() {
                    worst = worst.max(res);
                }
            }
            let tol = worst * 2.0 + 2.0 * (si.quantum + k.abs() * sj.quantum);
            if let Some(p) = ids.get_mut(si.key) {
                p.relations.push(Relation {
                    signal: si.sig,
                    other: sj.key.to_string(),
                    other_signal: sj.sig,
                    k,
                    c,
                    tol,
                });
            }
        }
    }
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
        assert!((300..=1_500).contains(&id.tol_us), "{}", id.tol_us);
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
            [CounterRule {
                field: Field::bits_of_byte(1, 0, 4),
                step: 1,
                modulo: 16
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

    /// With a DBC: the signals, a counter that wraps at 14, a Toyota-style checksum, the
    /// ECU, and the relation between two ids carrying the same speed.
    #[test]
    fn with_a_dbc_signals_counters_checksums_and_relations() {
        let dbc = crate::can::dbc::parse(
            "BO_ 416 SPEED: 8 ABS\n SG_ SPEED : 7|16@0+ (0.01,0) [0|250] \"kph\" X\n \
             SG_ COUNTER : 19|4@0+ (1,0) [0|14] \"\" X\n SG_ CHECKSUM : 63|8@0+ (1,0) [0|255] \"\" X\n\
             BO_ 512 WHEELS: 4 ABS\n SG_ WHEEL_FL : 0|16@1+ (0.02,0) [0|300] \"kph\" X\n",
        )
        .unwrap();
        let mut l = Learner::with_dbc(dbc);
        for i in 0..3000u64 {
            let t = 1_000_000 + i * 10_000;
            let kph = 60.0 + 30.0 * ((i as f64) / 300.0).sin();
            let raw = (kph / 0.01) as u16;
            let mut d = [0u8; 8];
            d[..2].copy_from_slice(&raw.to_be_bytes());
            d[2] = (i % 15) as u8;
            d[7] = Algo::SumId.compute(&d, 416) as u8;
            l.add(&data(t, 416, &d));
            let w = (kph * 1.01 / 0.02) as u16;
            let wb = w.to_le_bytes();
            l.add(&data(t + 3_000, 512, &[wb[0], wb[1], 0, 0]));
        }
        let p = l.finish();
        let s = &p.ids["0x1a0"];
        assert_eq!(s.name.as_deref(), Some("SPEED"));
        assert_eq!(s.ecu.as_deref(), Some("ABS"));
        assert_eq!(s.counters.len(), 1);
        assert_eq!((s.counters[0].step, s.counters[0].modulo), (1, 15));
        assert_eq!(s.checksum.as_ref().map(|c| c.algo), Some(Algo::SumId));
        assert_eq!(s.signals.len(), 1);
        assert!(
            s.signals[0].lo >= 2900 && s.signals[0].hi <= 9100,
            "{:?}",
            s.signals[0]
        );
        let r = &s.relations[0];
        assert_eq!((r.other.as_str(), r.other_signal), ("0x200", 0));
        assert!((r.k - 1.0 / 1.01).abs() < 0.01, "{r:?}");
        assert!(r.tol < 2.0, "{r:?}");
        assert!(!p.ids["0x200"].relations.is_empty());
        assert_eq!(p.dbc_messages, 2);
    }
}
