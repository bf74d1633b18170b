//! Grades every frame against a [`Profile`]: a level in [0, 1] and the reasons behind it.
//! Cheap detectors, each giving a level for what it saw; the frame's level combines them as
//! independent evidence, `1 - Π(1 - lᵢ)` (rounded to 3 decimals). A frame is anomalous at
//! level ≥ 0.5 (`can.alert_level`); every reason reaches it alone except the byte-level
//! hints used without a DBC (`range`, `jump`, partial `constant-bits`: drive-dependent
//! values make them noisy; all three together do) and any timing reason during a flood
//! (see below).
//!
//! | reason | what | level |
//! |---|---|---|
//! | `unknown-id` | an identifier the profile never saw | 1.0 |
//! | `kind` / `length` | a frame kind or data length (DLC) the id never had | 1.0 |
//! | `early` | less than half a period since the id's reference frame: an extra frame | 0.7 |
//! | `off-schedule` | a gap that is not a whole number of periods within the learned tolerance (jitter, bus delays, clock drift): a frame off the sender's schedule | 0.6 |
//! | `phase` | the id's frames keep to its period but their average phase has moved from the sender's long-run schedule (a slowly corrected lattice) by more than ever learned: another sender of the id | 0.6 |
//! | `rate` | more frames of the id in its window than ever learned (plus a margin), charged to frames off the schedule (all frames of an aperiodic id) | 0.9 |
//! | `constant-bits` | a bit that never changed has changed (with a DBC: bits of no varying signal; without one, 0.25 when the byte's other bits vary) | 0.9 |
//! | `counter` | a rolling counter did not advance by exactly one step per elapsed period | 0.7 |
//! | `checksum` | the learned checksum family (CRC-8 J1850/AUTOSAR, sums, XOR, nibble) does not hold | 0.9 |
//! | `signal-range` | a DBC signal outside the DBC's range, or well outside its learned range | 0.8 |
//! | `signal-jump` | a DBC signal changed more per period than it ever did | 0.6 |
//! | `consistency` | a DBC signal disagrees with a related signal of another (or the same) id, by the learned linear relation (wheel speeds vs vehicle speed…) | 0.6 |
//! | `range` / `jump` | without a DBC: a byte outside its learned range / changed more than it ever did | 0.3 / 0.2 |
//!
//! **References.** Timing, counters and steps are judged against the id's last *accepted*
//! frame (graded below [`ACCEPT_BELOW`]), so injected frames do not make the genuine ones
//! after them look early or out of step. When a frame fails against it, it is judged again
//! against the reference before (so a single accepted forgery does not cascade onto the
//! genuine frames after it). After a silence of [`reset_us`] an id starts afresh.
//!
//! **Masquerade.** The genuine ECU silenced and an attacker sending the id at its period with
//! valid counters and checksums: the attacker's schedule has its own phase, so its frames are
//! `off-schedule` against the last genuine frame; with a DBC, a manipulated value also breaks
//! its learned relations (`consistency`), judged against partners' *accepted* frames no
//! older than two of their periods (so the partners of a masqueraded id are not blamed).
//!
//! **Floods.** While an unknown id or another id's `rate` was seen in the last
//! [`FLOOD_HOLD_US`], timing of the other ids is judged at 0.4 of its level and counters may
//! skip (a flood delays everybody's frames on the bus; it is caught by its own frames).
//!
//! State is per id (two reference payloads and the times of its frames in the window,
//! bounded by the learned window count), in a table indexed by the `can_id` (a dense array
//! for the 2048 standard ids): grading allocates nothing on the normal path (a verdict with
//! reasons allocates its reason list).

use super::frame::{Frame, Kind, CAN_EFF_FLAG};
use super::payload::Field;
use super::profile::{
    key_u32, lattice, parse_key, ChecksumRule, CounterRule, PhaseTracker, Profile,
};
use std::collections::{HashMap, VecDeque};

/// A frame graded below this becomes its id's reference for timing, steps and counters.
pub const ACCEPT_BELOW: f64 = 0.5;
/// How long a flood (unknown ids, another id's rate) softens the timing of the others.
pub const FLOOD_HOLD_US: u64 = 50_000;
/// Clock drift allowed per period elapsed (parts per million), on top of the learned tolerance.
pub const DRIFT_PPM: u64 = 500;

/// The verdict on one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub level: f64,
    pub reasons: Vec<&'static str>,
}

#[derive(Clone, Copy)]
struct Ref {
    valid: bool,
    ts: u64,
    len: u8,
    data: [u8; 64],
}

const NO_REF: Ref = Ref {
    valid: false,
    ts: 0,
    len: 0,
    data: [0; 64],
};

impl Ref {
    fn data(&self) -> &[u8] {
        &self.data[..usize::from(self.len)]
    }
}

struct Sig {
    field: Field,
    scale: f64,
    offset: f64,
    dbc: Option<(f64, f64)>,
    lo: i64,
    hi: i64,
    step: i64,
}

struct Rel {
    sig: usize,
    other: usize,
    other_sig: usize,
    k: f64,
    c: f64,
    tol: f64,
}

struct Slot {
    kind: u8,
    lengths: [bool; 65],
    stats: bool,
    periodic: bool,
    period: u64,
    tol: u64,
    phase_tol: f64,
    phase: PhaseTracker,
    reset: u64,
    window_us: u64,
    window_limit: usize,
    width: usize,
    cmask: Vec<u8>,
    cval: Vec<u8>,
    bmin: Vec<u8>,
    bmax: Vec<u8>,
    bdelta: Vec<u8>,
    counters: Vec<CounterRule>,
    checksum: Option<ChecksumRule>,
    id: u32,
    sigs: Vec<Sig>,
    rels: Vec<Rel>,
    last: Ref,
    prev: Ref,
    window: VecDeque<u64>,
}

/// After this long without an accepted frame an id starts afresh: four of its longest gaps,
/// at least 2 s.
pub fn reset_us(max_gap_us: u64) -> u64 {
    max_gap_us.saturating_mul(4).max(2_000_000)
}

/// Up to 16 hits per frame, on the stack.
struct Hits {
    n: usize,
    h: [(f64, &'static str); 16],
}

impl Hits {
    fn new() -> Hits {
        Hits {
            n: 0,
            h: [(0.0, ""); 16],
        }
    }
    fn push(&mut self, l: f64, r: &'static str) {
        if self.n < self.h.len() {
            self.h[self.n] = (l, r);
            self.n += 1;
        }
    }
    fn level(&self) -> f64 {
        let keep: f64 = self.h[..self.n].iter().map(|(l, _)| 1.0 - l).product();
        ((1.0 - keep) * 1000.0).round() / 1000.0
    }
    fn verdict(&self) -> Verdict {
        Verdict {
            level: self.level(),
            reasons: self.h[..self.n].iter().map(|(_, r)| *r).collect(),
        }
    }
}

fn kind_code(k: &Kind) -> u8 {
    match k {
        Kind::Data { .. } => 0,
        Kind::Fd { .. } => 1,
        Kind::Remote { .. } => 2,
        Kind::Error { .. } => 3,
    }
}

pub struct Detector {
    std: Vec<u32>,
    other: HashMap<u32, u32>,
    slots: Vec<Slot>,
    flood_until: u64,
    flood_src: usize,
}

impl Detector {
    pub fn new(p: &Profile) -> Detector {
        let mut d = Detector {
            std: vec![0; 2048],
            other: HashMap::new(),
            slots: Vec::with_capacity(p.ids.len()),
            flood_until: 0,
            flood_src: usize::MAX,
        };
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (k, v) in &p.ids {
            let Some(can_id) = parse_key(k) else { continue };
            let i = d.slots.len();
            index.insert(k.as_str(), i);
            if can_id & CAN_EFF_FLAG == 0 && can_id < 2048 {
                d.std[can_id as usize] = i as u32 + 1;
            } else {
                d.other.insert(can_id, i as u32 + 1);
            }
            let mut lengths = [false; 65];
            for &l in &v.lengths {
                if usize::from(l) < lengths.len() {
                    lengths[usize::from(l)] = true;
                }
            }
            let width = v.constant_mask.len().min(64);
            let margin = (v.window_max / 5).max(2);
            let sigs = v
                .signals
                .iter()
                .map(|s| {
                    let span = s.hi.saturating_sub(s.lo);
                    let dbc = (s.dbc_max > s.dbc_min
                        && s.lo as f64 * s.scale + s.offset
                            >= s.dbc_min.min(s.dbc_max) - s.scale.abs()
                        && s.hi as f64 * s.scale + s.offset
                            <= s.dbc_max.max(s.dbc_min) + s.scale.abs())
                    .then_some((s.dbc_min.min(s.dbc_max), s.dbc_max.max(s.dbc_min)));
                    let dbc_raw_span = if s.scale != 0.0 {
                        ((s.dbc_max - s.dbc_min) / s.scale).abs() as i64
                    } else {
                        0
                    };
                    let m = (span / 2).max(dbc_raw_span / 10).max(2);
                    Sig {
                        field: s.field,
                        scale: s.scale,
                        offset: s.offset,
                        dbc,
                        lo: if span == 0 {
                            s.lo
                        } else {
                            s.lo.saturating_sub(m)
                        },
                        hi: if span == 0 {
                            s.hi
                        } else {
                            s.hi.saturating_add(m)
                        },
                        step: s.max_step.saturating_mul(2).max(2),
                    }
                })
                .collect();
            d.slots.push(Slot {
                kind: match v.kind.as_str() {
                    "fd" => 1,
                    "remote" => 2,
                    _ => 0,
                },
                lengths,
                stats: v.period_us > 0,
                periodic: v.period_us > 0 && v.tol_us * 2 < v.period_us,
                period: v.period_us,
                tol: v.tol_us,
                phase_tol: v.phase_tol_us as f64,
                phase: PhaseTracker::default(),
                reset: reset_us(v.max_gap_us),
                window_us: v.window_us,
                window_limit: v.window_max.saturating_add(margin) as usize,
                width,
                cmask: v.constant_mask.iter().take(64).copied().collect(),
                cval: v.constant_value.iter().take(64).copied().collect(),
                bmin: v.byte_min.iter().take(64).copied().collect(),
                bmax: v.byte_max.iter().take(64).copied().collect(),
                bdelta: v.max_delta.iter().take(64).copied().collect(),
                counters: v.counters.clone(),
                checksum: v.checksum.clone(),
                id: can_id & super::frame::CAN_EFF_MASK,
                sigs,
                rels: Vec::new(),
                last: NO_REF,
                prev: NO_REF,
                window: VecDeque::with_capacity(
                    (4 * (v.window_max.min(1 << 16) + margin.min(1 << 16))) as usize + 1,
                ),
            });
        }
        for (k, v) in &p.ids {
            let Some(&i) = index.get(k.as_str()) else {
                continue;
            };
            for r in &v.relations {
                let Some(&o) = index.get(r.other.as_str()) else {
                    continue;
                };
                let (si, so) = (usize::from(r.signal), usize::from(r.other_signal));
                if si < d.slots[i].sigs.len() && so < d.slots[o].sigs.len() {
                    d.slots[i].rels.push(Rel {
                        sig: si,
                        other: o,
                        other_sig: so,
                        k: r.k,
                        c: r.c,
                        tol: r.tol,
                    });
                }
            }
        }
        d
    }

    /// Ids the detector knows.
    pub fn ids(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of the detector's tables and state (heap included), for the memory figure.
    pub fn memory_bytes(&self) -> usize {
        let mut n = std::mem::size_of::<Detector>()
            + self.std.capacity() * 4
            + self.other.capacity() * 12
            + self.slots.capacity() * std::mem::size_of::<Slot>();
        for s in &self.slots {
            n += s.cmask.capacity() * 5
                + s.counters.capacity() * std::mem::size_of::<CounterRule>()
                + s.sigs.capacity() * std::mem::size_of::<Sig>()
                + s.rels.capacity() * std::mem::size_of::<Rel>()
                + s.window.capacity() * 8;
        }
        n
    }

    fn lookup(&self, f: &Frame) -> Option<usize> {
        let k = key_u32(f);
        let v = if k < 2048 {
            self.std[k as usize]
        } else {
            self.other.get(&k).copied().unwrap_or(0)
        };
        (v > 0).then(|| v as usize - 1)
    }

    pub fn grade(&mut self, f: &Frame) -> Verdict {
        let mut hits = Hits::new();
        if f.is_error() {
            // Error frames are the controller's, not an ECU's: counted, not graded.
            return hits.verdict();
        }
        let Some(i) = self.lookup(f) else {
            self.flood_until = f.ts_us + FLOOD_HOLD_US;
            self.flood_src = usize::MAX;
            hits.push(1.0, "unknown-id");
            return hits.verdict();
        };
        let s = &mut self.slots[i];
        let len = match f.kind {
            Kind::Remote { dlc } => dlc,
            _ => f.data().len() as u8,
        };
        if kind_code(&f.kind) != s.kind {
            hits.push(1.0, "kind");
        } else if !s.lengths[usize::from(len).min(64)] {
            hits.push(1.0, "length");
        }
        if !s.stats {
            return hits.verdict();
        }
        s.window.push_back(f.ts_us);
        while s
            .window
            .front()
            .is_some_and(|&t| f.ts_us.saturating_sub(t) >= s.window_us)
        {
            s.window.pop_front();
        }
        let over = s.window.len() > s.window_limit;
        while s.window.len() > 4 * s.window_limit {
            s.window.pop_front();
        }
        let flooded = f.ts_us < self.flood_until && self.flood_src != i;
        let base = hits.n;
        let sched = eval(&self.slots, i, f, false, flooded, over, &mut hits);
        let level = hits.level();
        // The long-run schedule follows the frames graded normal, and those whose only
        // fault is their phase (another sender's: they move the average, not the lattice).
        // A forged frame caught by anything else does not touch it.
        let only_phase = hits.h[base..hits.n].iter().all(|(_, r)| *r == "phase");
        {
            let s = &mut self.slots[i];
            if s.periodic && !flooded && base == 0 && (level < ACCEPT_BELOW || only_phase) {
                if s.last.valid && f.ts_us.saturating_sub(s.last.ts) > s.reset {
                    s.phase.reset();
                }
                s.phase.update(f.ts_us, s.period, level < ACCEPT_BELOW);
            }
        }
        // A frame delayed by a flood keeps the schedule's time as the reference.
        let reference = |f: &Frame, sched: Option<u64>| {
            let mut r = as_ref(f);
            if flooded {
                r.ts = sched.unwrap_or(r.ts);
            }
            r
        };
        if level >= ACCEPT_BELOW && base == 0 && self.slots[i].prev.valid {
            let mut again = Hits::new();
            let sched = eval(&self.slots, i, f, true, flooded, over, &mut again);
            if again.level() < ACCEPT_BELOW {
                self.slots[i].last = reference(f, sched);
                return again.verdict();
            }
        }
        if hits.h[..hits.n].iter().any(|(_, r)| *r == "rate") {
            self.flood_until = f.ts_us + FLOOD_HOLD_US;
            self.flood_src = i;
        }
        if level < ACCEPT_BELOW {
            let s = &mut self.slots[i];
            s.prev = s.last;
            s.last = reference(f, sched);
        }
        hits.verdict()
    }
}

fn as_ref(f: &Frame) -> Ref {
    let d = f.data();
    let mut r = Ref {
        valid: true,
        ts: f.ts_us,
        len: d.len() as u8,
        data: [0; 64],
    };
    r.data[..d.len()].copy_from_slice(d);
    r
}

/// The checks of one frame of slot `i` against its last (or, `prev`, its previous) reference.
/// Returns the time on the sender's schedule nearest the frame (under a flood, when frames
/// are delayed, an accepted frame stands for that time, so the schedule is kept).
fn eval(
    slots: &[Slot],
    i: usize,
    f: &Frame,
    prev: bool,
    flooded: bool,
    over: bool,
    hits: &mut Hits,
) -> Option<u64> {
    let s = &slots[i];
    let r = if prev { &s.prev } else { &s.last };
    let t = f.ts_us;
    let fresh = !r.valid || t.saturating_sub(r.ts) > s.reset || t < r.ts;
    let soft = if flooded { 0.4 } else { 1.0 };
    let mut k = 1u64;
    let mut timing = false;
    let mut sched = None;
    if s.periodic && !fresh {
        let gap = t - r.ts;
        let (n, dev) = lattice(gap, s.period);
        k = n.max(1);
        let tol = s
            .tol
            .saturating_add(k.saturating_mul(s.period).saturating_mul(DRIFT_PPM) / 1_000_000);
        sched = Some(r.ts.saturating_add(n.saturating_mul(s.period)));
        if n == 0 {
            hits.push(0.7 * soft, "early");
            timing = true;
        } else if dev > tol {
            hits.push(0.6 * soft, "off-schedule");
            timing = true;
        } else if !flooded && s.phase_tol > 0.0 {
            // The average and the frame itself off the same way: a genuine frame after
            // another sender's (its own deviation near 0) is not charged for their average.
            let (avg, own) = s.phase.deviation(t, s.period);
            if avg.abs() > s.phase_tol && own.abs() * 2.0 > s.phase_tol && avg * own > 0.0 {
                hits.push(0.6, "phase");
            }
        }
    }
    if over && (timing || !s.periodic) {
        hits.push(0.9 * soft, "rate");
    }
    let d = f.data();
    if d.len() != s.width || s.width == 0 {
        return sched;
    }
    // A whole constant byte that changed is strong evidence; some bits of a byte whose other
    // bits vary are, without a DBC, often the high bits of a value the capture did not
    // take everywhere (with a DBC those are left out of the mask).
    let (mut strong, mut weak) = (false, false);
    for (j, &b) in d.iter().enumerate() {
        if b & s.cmask[j] != s.cval[j] {
            if s.cmask[j] == 0xff || !s.sigs.is_empty() {
                strong = true;
            } else {
                weak = true;
            }
        }
    }
    if strong {
        hits.push(0.9, "constant-bits");
    } else if weak {
        hits.push(0.25, "constant-bits");
    }
    let comparable = !fresh && usize::from(r.len) == d.len();
    let slack = if flooded { k + 4 } else { k };
    if s.sigs.is_empty() {
        let mut range = false;
        let mut jump = false;
        for (j, &b) in d.iter().enumerate() {
            range |= b < s.bmin[j] || b > s.bmax[j];
            if comparable {
                jump |=
                    u64::from(r.data[j].abs_diff(b)) > u64::from(s.bdelta[j]).saturating_mul(slack);
            }
        }
        if range {
            hits.push(0.3, "range");
        }
        if jump {
            hits.push(0.2, "jump");
        }
    } else {
        let mut range = false;
        let mut jump = false;
        for g in &s.sigs {
            let Some(raw) = g.field.raw(d) else { continue };
            if raw < g.lo || raw > g.hi {
                range = true;
            } else if let Some((lo, hi)) = g.dbc {
                let v = raw as f64 * g.scale + g.offset;
                range |= v < lo - g.scale.abs() * 0.5 || v > hi + g.scale.abs() * 0.5;
            }
            if comparable {
                if let Some(old) = g.field.raw(r.data()) {
                    jump |= raw.abs_diff(old) > g.step.unsigned_abs().saturating_mul(slack);
                }
            }
        }
        if range {
            hits.push(0.8, "signal-range");
        }
        if jump {
            hits.push(0.6, "signal-jump");
        }
    }
    if comparable {
        let mut bad = false;
        for c in &s.counters {
            let (Some(now), Some(old)) = (c.field.bits(d), c.field.bits(r.data())) else {
                continue;
            };
            let m = u64::from(c.modulo.max(1));
            let ahead = (now % m + m - old % m) % m;
            let step = u64::from(c.step);
            bad |= if flooded {
                !(0..=slack).any(|j| ahead == (j * step) % m)
            } else {
                ahead != (k * step) % m
            };
        }
        if bad {
            hits.push(0.7, "counter");
        }
    }
    if let Some(c) = &s.checksum {
        if !c.algo.holds(&c.field, d, s.id) {
            hits.push(0.9, "checksum");
        }
    }
    let mut inconsistent = false;
    for rel in &s.rels {
        let o = &slots[rel.other];
        // A partner in the same frame is read from it; another id from its last accepted
        // frame, if that is recent.
        let partner = if rel.other == i {
            d
        } else if !o.last.valid
            || t < o.last.ts
            || t - o.last.ts > o.period.saturating_mul(2).saturating_add(o.tol)
        {
            continue;
        } else {
            o.last.data()
        };
        let (Some(g), Some(og)) = (s.sigs.get(rel.sig), o.sigs.get(rel.other_sig)) else {
            continue;
        };
        let (Some(a), Some(b)) = (g.field.raw(d), og.field.raw(partner)) else {
            continue;
        };
        let a = a as f64 * g.scale + g.offset;
        let b = b as f64 * og.scale + og.offset;
        inconsistent |= (a - (rel.k * b + rel.c)).abs() > rel.tol;
    }
    if inconsistent {
        hits.push(0.6, "consistency");
    }
    sched
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
        // A copy of the next genuine frame 4 ms early, counter and all: off the schedule.
        let mut copy = normal(3010);
        copy.ts_us -= 4_000;
        let v = d.grade(&copy);
        assert!(v.level >= 0.5, "{v:?}");
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
        // A flood at 1 ms with valid payloads trips the window count; the genuine frames amid
        // it are judged against the genuine ones before them: level 0.
        let mut all: Vec<(Frame, bool)> = (0..50)
            .map(|k| (data(t + 12_500 + k * 1_000, 0x1a0, &[0xa5, 0x30, 50]), true))
            .collect();
        all.extend((3011..3016).map(|i| (normal(i), false)));
        all.sort_by_key(|(f, _)| f.ts_us);
        let (mut rate, mut caught) = (false, 0);
        for (f, flood) in &all {
            let v = d.grade(f);
            if *flood {
                rate |= v.reasons.contains(&"rate");
                caught += usize::from(v.level >= 0.5);
            } else {
                assert_eq!(v.level, 0.0, "genuine frame at {}: {v:?}", f.ts_us);
            }
        }
        assert!(rate);
        assert!(caught >= 48, "{caught} of 50 flood frames");
        // A counter that skips: two steps in one period.
        let mut f = normal(3017);
        f = data(f.ts_us, 0x1a0, &[0xa5, 0x30 | (3018 % 16) as u8, 50]);
        let v = d.grade(&f);
        assert!(v.reasons.contains(&"counter"), "{v:?}");
    }

    /// A masquerade that keeps the period and the counter, 0.5 ms off the genuine phase
    /// (inside the gap tolerance of 1 ms bus delays): the long-run schedule sees it.
    #[test]
    fn another_sender_at_the_same_period_moves_the_phase() {
        let f = |i: u64, shift: u64| {
            // ±20 µs of jitter, and now and then a 700 µs bus delay.
            let j = i * 7919 % 40 + if i.is_multiple_of(97) { 700 } else { 0 };
            data(
                1_000_000 + i * 10_000 + j + shift,
                0x1a0,
                &[0xa5, 0x30 | (i % 16) as u8, 50],
            )
        };
        let mut l = Learner::default();
        for i in 0..3000 {
            l.add(&f(i, 0));
        }
        let p = l.finish();
        let id = &p.ids["0x1a0"];
        assert!(id.tol_us > 1_000 && id.phase_tol_us < 250, "{id:?}");
        let mut d = Detector::new(&p);
        for i in 3000..3100 {
            assert_eq!(d.grade(&f(i, 0)).level, 0.0);
        }
        let first = (3100..3200)
            .find(|&i| {
                let v = d.grade(&f(i, 500));
                v.level >= 0.5 && v.reasons.contains(&"phase")
            })
            .expect("the phase moved");
        assert!(first < 3110, "caught at frame {first}");
    }

    #[test]
    fn error_frames_are_not_graded() {
        let mut d = detector();
        let e = Frame::new(0, 0, false, Kind::Error { class: 0x40 }, &[0; 8]).unwrap();
        assert_eq!(d.grade(&e).level, 0.0);
    }
}
