//! The fleet state and every decision of the fleet server, pure: no I/O, no clock (`now_ms`
//! is passed in), so that every transition is a unit test.
//!
//! State: the vehicles (by gateway id: vehicle, network configuration, ECU types, senders,
//! the rule set they hold), the fleet baseline per (network configuration, id) from the
//! summaries (per vehicle: frames, suspect and anomalous counts, gap minimum, payload AND/OR),
//! the fleet incidents per (network configuration, id) — which vehicles reported it, when in
//! frame time, and whom it alerted at which severity — and a rule set per configuration.
//!
//! Every collection is bounded (constants below, `FleetConfig::max_vehicles`): a peer can
//! make the server forget, never grow without end. What must survive a restart (vehicles,
//! rule sets, incidents with their dedupe) is marked dirty for the service to store; the
//! baseline is rebuilt by the next round of summaries.

use super::msg::{
    format_id, DownMsg, Fingerprint, KeyUpdate, Report, Rule, RulesStatus, Summary, VehicleMsg,
    MAX_ECUS, MAX_SENDERS,
};
use super::{Action, FleetConfig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Rules in one configuration's set (the gateway refuses more).
pub const MAX_RULES: usize = 256;
/// Configurations with a rule set.
pub const MAX_RULE_SETS: usize = 4096;
/// Fleet incidents kept (the least recently updated is forgotten beyond).
pub const MAX_INCIDENTS: usize = 1024;
/// Vehicles remembered in one incident.
pub const MAX_INCIDENT_VEHICLES: usize = 1024;
/// (target, severity) marks over all incidents.
pub const MAX_SENT_MARKS: usize = 1_000_000;
/// (configuration, id) pairs in the baseline, and vehicles kept per pair.
pub const MAX_BASELINE_IDS: usize = 16_384;
pub const MAX_BASELINE_VEHICLES: usize = 32;
/// Baseline statistics older than this are dropped by [`Fleet::tick`].
pub const BASELINE_MAX_AGE_MS: u64 = 3_600_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vehicle {
    pub gateway: String,
    pub vehicle: String,
    pub network_config: String,
    /// ECU name → ECU type.
    pub ecus: BTreeMap<String, String>,
    /// id → ECU name.
    pub senders: BTreeMap<u32, String>,
    /// The rule set the vehicle holds (from `vehicle` and `rules-status`).
    pub rules_id: Option<String>,
    /// The last `rules-status`, as text.
    pub rules_status: Option<String>,
    pub seen_ms: u64,
}

/// One configuration's detection rules (the whole set goes to each of its vehicles).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleSet {
    pub network_config: String,
    /// Version: `rules_id` is `{network_config}-{version}`.
    pub version: u64,
    /// The number of the next rule's name (`fleet-{n}`); never reused.
    pub next_rule: u64,
    pub rules: Vec<Rule>,
}

impl RuleSet {
    pub fn rules_id(&self) -> String {
        format!("{}-{}", self.network_config, self.version)
    }

    /// The document of `outpost/{gw}/can/rules`.
    pub fn message(&self) -> Vec<u8> {
        let id = self.rules_id();
        serde_json::to_vec(&super::msg::RulesMsg {
            kind: "rules",
            rules_id: &id,
            network_config: &self.network_config,
            rules: &self.rules,
        })
        .unwrap_or_default()
    }
}

/// The same anomaly (one id of one configuration) on the fleet, within `window` in frame
/// time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub network_config: String,
    pub id: Option<u32>,
    /// Which fleet incident of this key (a gap over `window` starts the next).
    pub seq: u64,
    pub first_ts: f64,
    pub last_ts: f64,
    pub updated_ms: u64,
    /// Reporting gateway → its latest frame time.
    pub vehicles: BTreeMap<String, f64>,
    /// The most vehicles seen at once.
    pub peak: u32,
    /// Dedupe: target gateway → the highest severity rank it was alerted at.
    pub sent: BTreeMap<String, u8>,
    /// Dedupe: `{gateway}/{action}` instructions sent.
    pub instructed: BTreeSet<String>,
}

/// One vehicle's latest summary statistics of one id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdStat {
    pub n: u64,
    pub anomalous: u64,
    pub suspect: u64,
    pub gap_min_us: Option<f64>,
    pub dur_ms: u64,
    pub fingerprint: Option<Fingerprint>,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Watch = 1,
    Warning = 2,
    Critical = 3,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Watch => "watch",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    SameNetworkConfig,
    SameEcuType,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::SameNetworkConfig => "same-network-config",
            Why::SameEcuType => "same-ecu-type",
        }
    }
}

/// A rule derived from a report.
enum Derived {
    Signature { mask: Vec<u8>, value: Vec<u8> },
    Rate { window_ms: u32, max_frames: u32 },
}

/// Something to publish.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// The configuration's whole rule set, retained on `outpost/{gateway}/can/rules`.
    Rules { gateway: String, set: RuleSet },
    /// On `outpost/{gateway}/can/down`.
    Down { gateway: String, msg: DownMsg },
}

impl Out {
    pub fn gateway(&self) -> &str {
        match self {
            Out::Rules { gateway, .. } | Out::Down { gateway, .. } => gateway,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Normal across the fleet: nothing sent.
    Downgraded(String),
    /// Seen on fewer than `escalate_vehicles` vehicles.
    Anomalous,
    /// Seen on `escalate_vehicles` or more.
    Escalated,
}

/// What became of one report.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    pub verdict: Verdict,
    /// Distinct vehicles of the configuration with the same anomaly within the window.
    pub vehicles: u32,
    pub severity: Severity,
    /// The report's level as the fleet sees it: 0 when downgraded, 1 when escalated.
    pub fleet_level: f64,
    /// Why no rule, or which rule was derived.
    pub rule: String,
    pub outs: Vec<Out>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    pub reports: u64,
    pub escalated: u64,
    pub downgraded: u64,
    pub alerts: u64,
    pub instructions: u64,
    pub rule_sets: u64,
    pub rules_refused: u64,
    pub key_updates: u64,
    pub evicted: u64,
}

/// What changed since the last [`Fleet::take_dirty`], by key (absent now = removed).
#[derive(Debug, Default, PartialEq)]
pub struct Dirty {
    pub vehicles: BTreeSet<String>,
    pub rule_sets: BTreeSet<String>,
    pub incidents: BTreeSet<String>,
    /// (network configuration, id, gateway) of the baseline.
    pub baseline: BTreeSet<(String, u32, String)>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.vehicles.is_empty()
            && self.rule_sets.is_empty()
            && self.incidents.is_empty()
            && self.baseline.is_empty()
    }
}

pub struct Fleet {
    cfg: FleetConfig,
    vehicles: HashMap<String, Vehicle>,
    rule_sets: BTreeMap<String, RuleSet>,
    incidents: HashMap<String, Incident>,
    sent_marks: usize,
    baseline: HashMap<(String, u32), BTreeMap<String, IdStat>>,
    dirty: Dirty,
    pub counters: Counters,
}

/// The key of an incident (and of its store record).
pub fn incident_key(network_config: &str, id: Option<u32>) -> String {
    match id {
        Some(id) => format!("{network_config}/{}", format_id(id)),
        None => format!("{network_config}/unknown"),
    }
}

fn popcount(b: &[u8]) -> u32 {
    b.iter().map(|x| x.count_ones()).sum()
}

/// The signature of a fingerprint: the bits where AND == OR, and their values.
pub fn signature(fp: &Fingerprint) -> (Vec<u8>, Vec<u8>) {
    let mask: Vec<u8> = fp.and.iter().zip(&fp.or).map(|(a, o)| !(a ^ o)).collect();
    let value = fp.and.iter().zip(&mask).map(|(a, m)| a & m).collect();
    (mask, value)
}

/// Whether normal frames (fingerprint `normal`) are unlikely to match (`mask`, `value`):
/// either a bit constant in normal traffic disagrees with the signature (no normal frame
/// can match), or the signature pins at least `min_bits` bits that vary in normal traffic
/// (a normal frame matches by chance at most about once in 2^min_bits). A payload that
/// looks random in normal traffic (a MAC, a SecOC id) has no constant bits, yet an
/// attacker's fixed payload on it is a fine signature: the envelope of AND and OR alone
/// cannot tell.
pub fn distinguishes(normal: &Fingerprint, mask: &[u8], value: &[u8], min_bits: u32) -> bool {
    if normal.and.len() != mask.len() {
        return true;
    }
    let (nmask, nvalue) = signature(normal);
    let contradicts = mask
        .iter()
        .zip(value)
        .zip(nmask.iter().zip(&nvalue))
        .any(|((m, v), (nm, nv))| (m & nm) & (v ^ nv) != 0);
    let varying: u32 = mask
        .iter()
        .zip(&nmask)
        .map(|(m, nm)| (m & !nm).count_ones())
        .sum();
    contradicts || varying >= min_bits
}

/// Whether every frame of `fp` lies within the normal fingerprint (its AND has every bit
/// normal frames always set, its OR no bit they never set).
pub fn within(fp: &Fingerprint, normal: &Fingerprint) -> bool {
    fp.and.len() == normal.and.len()
        && normal.and.iter().zip(&fp.and).all(|(n, a)| n & !a == 0)
        && fp.or.iter().zip(&normal.or).all(|(o, n)| o & !n == 0)
}

impl Fleet {
    pub fn new(cfg: FleetConfig) -> Fleet {
        Fleet {
            cfg,
            vehicles: HashMap::new(),
            rule_sets: BTreeMap::new(),
            incidents: HashMap::new(),
            sent_marks: 0,
            baseline: HashMap::new(),
            dirty: Dirty::default(),
            counters: Counters::default(),
        }
    }

    // ---- persistence ---------------------------------------------------------------------

    pub fn restore_vehicle(&mut self, v: Vehicle) {
        if self.vehicles.len() < self.cfg.max_vehicles {
            self.vehicles.insert(v.gateway.clone(), v);
        }
    }

    pub fn restore_rule_set(&mut self, s: RuleSet) {
        if self.rule_sets.len() < MAX_RULE_SETS && s.rules.len() <= MAX_RULES {
            self.rule_sets.insert(s.network_config.clone(), s);
        }
    }

    pub fn restore_incident(&mut self, i: Incident) {
        if self.incidents.len() < MAX_INCIDENTS {
            self.sent_marks += i.sent.len() + i.instructed.len();
            self.incidents
                .insert(incident_key(&i.network_config, i.id), i);
        }
    }

    /// A stored baseline statistic (dropped when the baseline is full).
    pub fn restore_stat(&mut self, network_config: &str, id: u32, gateway: &str, stat: IdStat) {
        let key = (network_config.to_string(), id);
        if !self.baseline.contains_key(&key) && self.baseline.len() >= MAX_BASELINE_IDS {
            return;
        }
        let per = self.baseline.entry(key).or_default();
        if per.len() < MAX_BASELINE_VEHICLES {
            per.insert(gateway.to_string(), stat);
        }
    }

    pub fn stat(&self, network_config: &str, id: u32, gateway: &str) -> Option<&IdStat> {
        self.baseline
            .get(&(network_config.to_string(), id))?
            .get(gateway)
    }

    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    pub fn vehicle(&self, gateway: &str) -> Option<&Vehicle> {
        self.vehicles.get(gateway)
    }

    pub fn vehicles(&self) -> impl Iterator<Item = &Vehicle> {
        self.vehicles.values()
    }

    pub fn rule_set(&self, network_config: &str) -> Option<&RuleSet> {
        self.rule_sets.get(network_config)
    }

    pub fn incident(&self, key: &str) -> Option<&Incident> {
        self.incidents.get(key)
    }

    // ---- vehicles ------------------------------------------------------------------------

    /// Insert or update the vehicle of `gateway`; returns it.
    fn touch(&mut self, gateway: &str, vehicle: &str, network_config: &str, now_ms: u64) {
        if !self.vehicles.contains_key(gateway) && self.vehicles.len() >= self.cfg.max_vehicles {
            if let Some(old) = self
                .vehicles
                .values()
                .min_by_key(|v| v.seen_ms)
                .map(|v| v.gateway.clone())
            {
                self.vehicles.remove(&old);
                self.dirty.vehicles.insert(old);
                self.counters.evicted += 1;
            }
        }
        let v = self
            .vehicles
            .entry(gateway.to_string())
            .or_insert_with(|| Vehicle {
                gateway: gateway.to_string(),
                vehicle: vehicle.to_string(),
                network_config: network_config.to_string(),
                ecus: BTreeMap::new(),
                senders: BTreeMap::new(),
                rules_id: None,
                rules_status: None,
                seen_ms: now_ms,
            });
        if v.vehicle != vehicle || v.network_config != network_config {
            v.vehicle = vehicle.to_string();
            v.network_config = network_config.to_string();
        }
        v.seen_ms = v.seen_ms.max(now_ms);
        self.dirty.vehicles.insert(gateway.to_string());
    }

    /// `outpost/{gw}/can/vehicle`: who the vehicle is. A vehicle whose configuration has a
    /// rule set it does not hold gets it.
    pub fn on_vehicle(&mut self, gateway: &str, m: VehicleMsg, now_ms: u64) -> Vec<Out> {
        self.touch(gateway, &m.vehicle, &m.network_config, now_ms);
        if let Some(v) = self.vehicles.get_mut(gateway) {
            v.ecus = m.ecus;
            v.senders = m.senders;
            v.rules_id = m.rules_id;
        }
        match self.rule_sets.get(&m.network_config) {
            Some(set)
                if self
                    .vehicles
                    .get(gateway)
                    .and_then(|v| v.rules_id.as_deref())
                    != Some(set.rules_id().as_str()) =>
            {
                vec![Out::Rules {
                    gateway: gateway.to_string(),
                    set: set.clone(),
                }]
            }
            _ => Vec::new(),
        }
    }

    /// `outpost/{gw}/can/rules-status`.
    pub fn on_rules_status(&mut self, gateway: &str, s: RulesStatus) {
        if !s.applied {
            self.counters.rules_refused += 1;
        }
        if let Some(v) = self.vehicles.get_mut(gateway) {
            if s.applied {
                v.rules_id = Some(s.rules_id.clone());
                v.rules_status = Some(format!(
                    "applied {} ({} rules)",
                    s.rules_id,
                    s.rules.unwrap_or(0)
                ));
            } else {
                v.rules_status = Some(format!(
                    "refused {}: {}",
                    s.rules_id,
                    s.error.as_deref().unwrap_or("no reason given")
                ));
            }
            self.dirty.vehicles.insert(gateway.to_string());
        }
    }

    // ---- baseline ------------------------------------------------------------------------

    /// `outpost/{gw}/can/summary`: the vehicle's per-id statistics join the baseline of its
    /// configuration (replacing its previous ones).
    pub fn on_summary(&mut self, gateway: &str, s: Summary, now_ms: u64) {
        self.touch(gateway, &s.vehicle, &s.network_config, now_ms);
        let dur_ms = s.to_ms.saturating_sub(s.from_ms);
        for (id, st) in s.ids {
            let key = (s.network_config.clone(), id);
            if !self.baseline.contains_key(&key) && self.baseline.len() >= MAX_BASELINE_IDS {
                self.counters.evicted += 1;
                continue;
            }
            let per = self.baseline.entry(key).or_default();
            if !per.contains_key(gateway) && per.len() >= MAX_BASELINE_VEHICLES {
                if let Some(old) = per
                    .iter()
                    .min_by_key(|(_, s)| s.at_ms)
                    .map(|(g, _)| g.clone())
                {
                    per.remove(&old);
                    self.dirty
                        .baseline
                        .insert((s.network_config.clone(), id, old));
                }
            }
            self.dirty
                .baseline
                .insert((s.network_config.clone(), id, gateway.to_string()));
            per.insert(
                gateway.to_string(),
                IdStat {
                    n: st.n,
                    anomalous: st.anomalous,
                    suspect: st.suspect,
                    gap_min_us: st.gap_min_us,
                    dur_ms,
                    fingerprint: st.fingerprint,
                    at_ms: now_ms,
                },
            );
        }
    }

    fn stats(&self, network_config: &str, id: u32) -> Option<&BTreeMap<String, IdStat>> {
        self.baseline.get(&(network_config.to_string(), id))
    }

    /// The statistics of vehicles whose summaries show the id without anomalous frames.
    fn normal_stats<'a>(&'a self, network_config: &str, id: u32) -> Vec<&'a IdStat> {
        self.stats(network_config, id)
            .map(|m| m.values().filter(|s| s.anomalous == 0 && s.n > 0).collect())
            .unwrap_or_default()
    }

    /// The fleet's normal payload fingerprint of an id (AND of the ANDs, OR of the ORs of
    /// the normal summaries of the most common length).
    pub fn normal_fingerprint(&self, network_config: &str, id: u32) -> Option<Fingerprint> {
        let normal = self.normal_stats(network_config, id);
        let mut by_len: BTreeMap<usize, usize> = BTreeMap::new();
        for s in &normal {
            if let Some(f) = &s.fingerprint {
                *by_len.entry(f.and.len()).or_default() += 1;
            }
        }
        let len = by_len.iter().max_by_key(|(_, n)| **n).map(|(l, _)| *l)?;
        let mut out: Option<Fingerprint> = None;
        for f in normal.iter().filter_map(|s| s.fingerprint.as_ref()) {
            if f.and.len() != len {
                continue;
            }
            out = Some(match out {
                None => f.clone(),
                Some(o) => Fingerprint {
                    and: o.and.iter().zip(&f.and).map(|(a, b)| a & b).collect(),
                    or: o.or.iter().zip(&f.or).map(|(a, b)| a | b).collect(),
                },
            });
        }
        out
    }

    /// The most frames of an id in `window_ms` that the normal summaries show (from the
    /// mean rate and from the shortest gap, whichever is more).
    pub fn normal_max_per_window(
        &self,
        network_config: &str,
        id: u32,
        window_ms: u32,
    ) -> Option<f64> {
        let w = f64::from(window_ms);
        self.normal_stats(network_config, id)
            .iter()
            .map(|s| {
                let mean = if s.dur_ms > 0 {
                    s.n as f64 * w / s.dur_ms as f64
                } else {
                    0.0
                };
                let burst = s
                    .gap_min_us
                    .map(|g| (w * 1000.0 / g).floor() + 1.0)
                    .unwrap_or(0.0);
                mean.max(burst)
            })
            .filter(|v| v.is_finite())
            .reduce(f64::max)
    }

    // ---- reports -------------------------------------------------------------------------

    fn severity(&self, vehicles: u32) -> Severity {
        if vehicles >= self.cfg.critical_vehicles {
            Severity::Critical
        } else if vehicles >= self.cfg.warning_vehicles {
            Severity::Warning
        } else {
            Severity::Watch
        }
    }

    /// Why the fleet sees this report as normal, if it does.
    fn downgrade(&self, r: &Report, reporters: &BTreeMap<String, f64>) -> Option<String> {
        let id = r.id?;
        let min = self.cfg.downgrade_min_vehicles as usize;
        let stats = self.stats(&r.network_config, id)?;
        // (a) The same suspect/anomalous pattern on most vehicles that send the id, none of
        // them with an incident on it.
        let quiet = stats
            .iter()
            .filter(|(g, s)| s.anomalous + s.suspect > 0 && !reporters.contains_key(*g))
            .count();
        if stats.len() >= min && quiet as f64 > self.cfg.downgrade_fraction * stats.len() as f64 {
            return Some(format!(
                "{quiet} of {} vehicles of {} show the same pattern on {} in their summaries without an incident",
                stats.len(),
                r.network_config,
                format_id(id)
            ));
        }
        // (b) Payload and rate both within what the fleet sends normally.
        let normal = self.normal_stats(&r.network_config, id);
        if normal.len() < min {
            return None;
        }
        let fp = r.payload.as_ref()?;
        let nfp = self.normal_fingerprint(&r.network_config, id)?;
        let window_ms = 1000;
        let max = self.normal_max_per_window(&r.network_config, id, window_ms)?;
        if within(fp, &nfp) && r.rate_hz <= max * (1.0 + self.cfg.rate_margin) {
            return Some(format!(
                "payload within the fleet's normal fingerprint of {} and {:.0} frames/s within its normal {:.0}/s ({} vehicles)",
                format_id(id),
                r.rate_hz,
                max,
                normal.len()
            ));
        }
        None
    }

    /// Derive a rule from the report, or say why there is none.
    fn derive_rule(&self, r: &Report, id: u32) -> Result<Derived, String> {
        if let Some(fp) = &r.payload {
            let (mask, value) = signature(fp);
            let bits = popcount(&mask);
            let normal = self.normal_fingerprint(&r.network_config, id);
            if bits >= self.cfg.signature_min_bits
                && normal
                    .as_ref()
                    .is_none_or(|n| distinguishes(n, &mask, &value, self.cfg.signature_min_bits))
            {
                return Ok(Derived::Signature { mask, value });
            }
        }
        let window_ms = u32::try_from(self.cfg.rate_window.as_millis()).unwrap_or(100);
        let Some(normal) = self.normal_max_per_window(&r.network_config, id, window_ms) else {
            return Err(
                "no signature and no normal rate of the id in the fleet's summaries".into(),
            );
        };
        let max_frames = (normal * (1.0 + self.cfg.rate_margin)).ceil() + 1.0;
        let max_frames = max_frames.clamp(1.0, f64::from(u32::MAX)) as u32;
        let attack = r.rate_hz * f64::from(window_ms) / 1000.0;
        if attack <= f64::from(max_frames) {
            return Err(format!(
                "no signature, and {:.0} frames/s is within the fleet's normal rate ({max_frames} per {window_ms} ms)",
                r.rate_hz
            ));
        }
        Ok(Derived::Rate {
            window_ms,
            max_frames,
        })
    }

    /// Add a rule for the report's id to its configuration's set (unless the set has one for
    /// the id already); returns what happened.
    fn add_rule(&mut self, r: &Report, id: u32, outs: &mut Vec<Out>) -> String {
        let config = &r.network_config;
        if let Some(set) = self.rule_sets.get(config) {
            if let Some(rule) = set.rules.iter().find(|x| x.id == format_id(id)) {
                return format!(
                    "{} already has {} for {}",
                    set.rules_id(),
                    rule.name,
                    rule.id
                );
            }
        } else if self.rule_sets.len() >= MAX_RULE_SETS {
            return format!("no rule: {MAX_RULE_SETS} configurations have rule sets already");
        }
        let derived = match self.derive_rule(r, id) {
            Ok(x) => x,
            Err(why) => return format!("no rule: {why}"),
        };
        let set = self
            .rule_sets
            .entry(config.clone())
            .or_insert_with(|| RuleSet {
                network_config: config.clone(),
                version: 0,
                next_rule: 1,
                rules: Vec::new(),
            });
        let name = format!("fleet-{}", set.next_rule);
        set.next_rule += 1;
        let mut rule = Rule {
            name,
            id: format_id(id),
            mask: None,
            value: None,
            window_ms: None,
            max_frames: None,
            level: self.cfg.rule_level,
        };
        match derived {
            Derived::Signature { mask, value } => {
                rule.mask = Some(hex::encode(mask));
                rule.value = Some(hex::encode(value));
            }
            Derived::Rate {
                window_ms,
                max_frames,
            } => {
                rule.window_ms = Some(u64::from(window_ms));
                rule.max_frames = Some(max_frames);
            }
        }
        if set.rules.len() >= MAX_RULES {
            set.rules.remove(0);
        }
        let what = format!(
            "{} {} for {}",
            rule.name,
            if rule.mask.is_some() {
                "signature"
            } else {
                "rate limit"
            },
            rule.id
        );
        set.rules.push(rule);
        set.version += 1;
        let set = set.clone();
        self.counters.rule_sets += 1;
        self.dirty.rule_sets.insert(config.clone());
        for v in self
            .vehicles
            .values()
            .filter(|v| &v.network_config == config)
        {
            outs.push(Out::Rules {
                gateway: v.gateway.clone(),
                set: set.clone(),
            });
        }
        format!("{}: {what}", set.rules_id())
    }

    fn evict_incidents(&mut self, keep: &str) {
        while self.incidents.len() > MAX_INCIDENTS || self.sent_marks > MAX_SENT_MARKS {
            let Some(old) = self
                .incidents
                .iter()
                .filter(|(k, _)| k.as_str() != keep)
                .min_by_key(|(_, i)| i.updated_ms)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(i) = self.incidents.remove(&old) {
                self.sent_marks = self
                    .sent_marks
                    .saturating_sub(i.sent.len() + i.instructed.len());
            }
            self.dirty.incidents.insert(old);
            self.counters.evicted += 1;
        }
    }

    /// The incident of (configuration, id) for a report at frame time `ts`, a new one when
    /// the last report was more than `window` before.
    fn incident_for(&mut self, key: &str, r: &Report, ts: f64, now_ms: u64) -> &mut Incident {
        let window = self.cfg.window.as_secs_f64();
        let fresh = |seq| Incident {
            network_config: r.network_config.clone(),
            id: r.id,
            seq,
            first_ts: ts,
            last_ts: ts,
            updated_ms: now_ms,
            vehicles: BTreeMap::new(),
            peak: 0,
            sent: BTreeMap::new(),
            instructed: BTreeSet::new(),
        };
        match self.incidents.get(key) {
            Some(i) if ts > i.last_ts + window => {
                let seq = i.seq + 1;
                let marks = i.sent.len() + i.instructed.len();
                self.sent_marks = self.sent_marks.saturating_sub(marks);
                self.incidents.insert(key.to_string(), fresh(seq));
            }
            Some(_) => {}
            None => {
                self.incidents.insert(key.to_string(), fresh(1));
                self.evict_incidents(key);
            }
        }
        self.dirty.incidents.insert(key.to_string());
        self.incidents.get_mut(key).expect("inserted above")
    }

    /// `outpost/{gw}/can/report`: assess an incident with the fleet and decide what goes to
    /// whom.
    pub fn on_report(&mut self, gateway: &str, r: Report, now_ms: u64) -> Assessment {
        self.counters.reports += 1;
        self.touch(gateway, &r.vehicle, &r.network_config, now_ms);
        // The report names the sender and its type: the vehicle has that ECU.
        let reporter_ecu_type = match (&r.sender, &r.ecu_type) {
            (Some(s), Some(t)) => {
                if let Some(v) = self.vehicles.get_mut(gateway) {
                    if v.ecus.len() < MAX_ECUS || v.ecus.contains_key(s) {
                        v.ecus.insert(s.clone(), t.clone());
                    }
                    if let Some(id) = r.id {
                        if v.senders.len() < MAX_SENDERS || v.senders.contains_key(&id) {
                            v.senders.insert(id, s.clone());
                        }
                    }
                }
                Some(t.clone())
            }
            (Some(s), None) => self
                .vehicles
                .get(gateway)
                .and_then(|v| v.ecus.get(s).cloned()),
            (None, t) => t.clone(),
        };
        let sender = r.sender.clone().or_else(|| {
            let id = r.id?;
            self.vehicles.get(gateway)?.senders.get(&id).cloned()
        });

        let window = self.cfg.window.as_secs_f64();
        let ts = if r.last_ts > 0.0 {
            r.last_ts
        } else {
            now_ms as f64 / 1000.0
        };
        let key = incident_key(&r.network_config, r.id);
        let inc = self.incident_for(&key, &r, ts, now_ms);
        inc.updated_ms = now_ms;
        inc.last_ts = inc.last_ts.max(ts);
        inc.first_ts = inc.first_ts.min(ts);
        if !inc.vehicles.contains_key(gateway) && inc.vehicles.len() >= MAX_INCIDENT_VEHICLES {
            if let Some(old) = inc
                .vehicles
                .iter()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(g, _)| g.clone())
            {
                inc.vehicles.remove(&old);
            }
        }
        let t = inc.vehicles.entry(gateway.to_string()).or_insert(ts);
        *t = t.max(ts);
        let last = inc.last_ts;
        inc.vehicles.retain(|_, t| *t >= last - window);
        let count = inc
            .vehicles
            .values()
            .filter(|t| (**t - ts).abs() <= window)
            .count()
            .max(1) as u32;
        inc.peak = inc.peak.max(count);
        let seq = inc.seq;
        let reporters = inc.vehicles.clone();

        let severity = self.severity(count);
        if let Some(why) = self.downgrade(&r, &reporters) {
            self.counters.downgraded += 1;
            return Assessment {
                verdict: Verdict::Downgraded(why),
                vehicles: count,
                severity,
                fleet_level: 0.0,
                rule: "no rule: downgraded".into(),
                outs: Vec::new(),
            };
        }
        let escalated = count >= self.cfg.escalate_vehicles;
        if escalated {
            self.counters.escalated += 1;
        }
        let mut outs = Vec::new();
        let rule = match r.id {
            Some(id) => self.add_rule(&r, id, &mut outs),
            None => "no rule: the unknown-id incident names no single id".into(),
        };
        let rules_id = self.rule_sets.get(&r.network_config).map(|s| s.rules_id());

        // Whom to alert: every other vehicle of the configuration, and every other vehicle
        // with an ECU of the sender's type. Never anyone else.
        let mut targets: Vec<(String, Why)> = Vec::new();
        for v in self.vehicles.values() {
            if v.gateway == gateway {
                continue;
            }
            if v.network_config == r.network_config {
                targets.push((v.gateway.clone(), Why::SameNetworkConfig));
            } else if let Some(t) = &reporter_ecu_type {
                if v.ecus.values().any(|x| x == t) {
                    targets.push((v.gateway.clone(), Why::SameEcuType));
                }
            }
        }
        targets.sort();
        let id_text = r.id.map(format_id);
        let what = match (&id_text, &sender, &reporter_ecu_type) {
            (Some(id), Some(s), Some(t)) => format!("{id} (sent by {s}, an ECU of type {t})"),
            (Some(id), Some(s), None) => format!("{id} (sent by {s})"),
            (Some(id), None, _) => id.clone(),
            (None, ..) => "unknown ids".into(),
        };
        let plural = if count == 1 { "" } else { "s" };
        let advice = match severity {
            Severity::Watch => "monitor; no action needed yet",
            Severity::Warning => "the same anomaly is spreading: keep the fleet rules applied",
            Severity::Critical => {
                "fleet-wide attack: keep the vehicle's safety responses armed and contact the operator"
            }
        };
        let reasons = if r.reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.reasons.join(", "))
        };
        let mut new_marks = 0usize;
        for (target, why) in targets {
            let inc = self.incidents.get_mut(&key).expect("the report's incident");
            let sent = inc.sent.get(&target).copied().unwrap_or(0);
            if sent >= severity as u8 {
                continue;
            }
            if sent == 0 {
                new_marks += 1;
            }
            inc.sent.insert(target.clone(), severity as u8);
            let message = match why {
                Why::SameNetworkConfig => format!(
                    "{}: anomalous frames on {what}{reasons} on {count} vehicle{plural} of network configuration {} within {}s, last reported by {}{}; {advice}",
                    severity.as_str(),
                    r.network_config,
                    self.cfg.window.as_secs(),
                    r.vehicle,
                    rules_id.as_ref().map(|i| format!("; detection rules {i}")).unwrap_or_default(),
                ),
                Why::SameEcuType => format!(
                    "{}: {what} is attacked on {count} vehicle{plural} of network configuration {}; this vehicle has an ECU of the same type: {advice}",
                    severity.as_str(),
                    r.network_config,
                ),
            };
            self.counters.alerts += 1;
            outs.push(Out::Down {
                gateway: target,
                msg: DownMsg::Alert {
                    incident: r.incident.clone(),
                    from_vehicle: r.vehicle.clone(),
                    network_config: r.network_config.clone(),
                    id: id_text.clone(),
                    sender: sender.clone(),
                    ecu_type: reporter_ecu_type.clone(),
                    why: why.as_str().into(),
                    vehicles: count,
                    severity: severity.as_str().into(),
                    message,
                },
            });
        }

        // The configured instructions for this id of this configuration, to each of its
        // vehicles once per incident.
        if let Some(id) = r.id {
            let id_s = format_id(id);
            let actions: BTreeSet<Action> = self
                .cfg
                .instructions
                .iter()
                .filter(|i| {
                    i.network_config == r.network_config
                        && count >= i.min_vehicles
                        && i.ids.iter().any(|x| super::msg::parse_id(x) == Ok(id))
                })
                .map(|i| i.action)
                .collect();
            let gateways: Vec<String> = self
                .vehicles
                .values()
                .filter(|v| v.network_config == r.network_config)
                .map(|v| v.gateway.clone())
                .collect();
            for action in actions {
                for g in &gateways {
                    let mark = format!("{g}/{}", action.as_str());
                    let inc = self.incidents.get_mut(&key).expect("the report's incident");
                    if !inc.instructed.insert(mark) {
                        continue;
                    }
                    new_marks += 1;
                    self.counters.instructions += 1;
                    outs.push(Out::Down {
                        gateway: g.clone(),
                        msg: DownMsg::Instruction {
                            action: action.as_str().into(),
                            id: id_s.clone(),
                            incident: r.incident.clone(),
                            message: format!(
                                "{}: {id_s} anomalous on {count} vehicle{plural} of network configuration {} (fleet incident {key}#{seq})",
                                action.as_str(),
                                r.network_config
                            ),
                        },
                    });
                }
            }
        }
        self.sent_marks += new_marks;
        self.evict_incidents(&key);
        Assessment {
            verdict: if escalated {
                Verdict::Escalated
            } else {
                Verdict::Anomalous
            },
            vehicles: count,
            severity,
            fleet_level: if escalated { 1.0 } else { r.max_level },
            rule,
            outs,
        }
    }

    /// `outpost/{gw}/can/key-update`: a SecOC id was attacked on one vehicle; every vehicle
    /// of its configuration (which shares the key) gets a key-update instruction, once per
    /// incident of that id.
    pub fn on_key_update(&mut self, gateway: &str, k: KeyUpdate, now_ms: u64) -> Vec<Out> {
        self.counters.key_updates += 1;
        let Some(config) = self.vehicles.get(gateway).map(|v| v.network_config.clone()) else {
            return Vec::new();
        };
        let key = incident_key(&config, Some(k.id));
        let report = Report {
            incident: k.incident.clone(),
            state: super::msg::ReportState::Open,
            vehicle: k.vehicle.clone(),
            network_config: config.clone(),
            id: Some(k.id),
            sender: None,
            ecu_type: None,
            first_ts: 0.0,
            last_ts: 0.0,
            frames: 0,
            max_level: k.level,
            reasons: Vec::new(),
            payload: None,
            rate_hz: 0.0,
        };
        let ts = now_ms as f64 / 1000.0;
        let inc = self.incident_for(&key, &report, ts, now_ms);
        inc.updated_ms = now_ms;
        let mut marks = Vec::new();
        let gateways: Vec<String> = self
            .vehicles
            .values()
            .filter(|v| v.network_config == config)
            .map(|v| v.gateway.clone())
            .collect();
        let inc = self.incidents.get_mut(&key).expect("inserted");
        for g in gateways {
            if inc.instructed.insert(format!("{g}/key-update")) {
                marks.push(g);
            }
        }
        self.sent_marks += marks.len();
        let id_s = format_id(k.id);
        let outs = marks
            .into_iter()
            .map(|g| {
                self.counters.instructions += 1;
                Out::Down {
                    gateway: g,
                    msg: DownMsg::Instruction {
                        action: "key-update".into(),
                        id: id_s.clone(),
                        incident: k.incident.clone(),
                        message: format!(
                            "key-update: the SecOC id {id_s} was attacked on {} ({}): update the key of network configuration {config}",
                            if k.vehicle.is_empty() { gateway } else { &k.vehicle },
                            gateway
                        ),
                    },
                }
            })
            .collect();
        self.evict_incidents(&key);
        outs
    }

    /// Forget incidents whose window is long over and baseline statistics that are stale.
    pub fn tick(&mut self, now_ms: u64) {
        let keep_ms = (self.cfg.window.as_millis() as u64).saturating_add(600_000);
        let old: Vec<String> = self
            .incidents
            .iter()
            .filter(|(_, i)| i.updated_ms.saturating_add(keep_ms) < now_ms)
            .map(|(k, _)| k.clone())
            .collect();
        for k in old {
            if let Some(i) = self.incidents.remove(&k) {
                self.sent_marks = self
                    .sent_marks
                    .saturating_sub(i.sent.len() + i.instructed.len());
            }
            self.dirty.incidents.insert(k);
        }
        let dirty = &mut self.dirty.baseline;
        self.baseline.retain(|(config, id), per| {
            per.retain(|g, s| {
                let keep = s.at_ms.saturating_add(BASELINE_MAX_AGE_MS) >= now_ms;
                if !keep {
                    dirty.insert((config.clone(), *id, g.clone()));
                }
                keep
            });
            !per.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::msg::{IdSummary, ReportState};
    use crate::fleet::InstructionConfig;

    const T0: f64 = 1_796_345_994.0;
    const NOW: u64 = 1_796_346_000_000;

    fn vehicle(gw: &str, config: &str, ecus: &[(&str, &str)]) -> VehicleMsg {
        VehicleMsg {
            vehicle: format!("VIN-{gw}"),
            network_config: config.into(),
            ecus: ecus
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            senders: BTreeMap::new(),
            rules_id: None,
        }
    }

    /// A (cfg-a, ABS abs-9.3), B (cfg-a), C (cfg-b, with an abs-9.3), D (cfg-b, without).
    fn fleet_with(cfg: FleetConfig) -> Fleet {
        let mut f = Fleet::new(cfg);
        f.on_vehicle("gw-a", vehicle("gw-a", "cfg-a", &[("ABS", "abs-9.3")]), NOW);
        f.on_vehicle("gw-b", vehicle("gw-b", "cfg-a", &[("ABS", "abs-9.3")]), NOW);
        f.on_vehicle("gw-c", vehicle("gw-c", "cfg-b", &[("BRK", "abs-9.3")]), NOW);
        f.on_vehicle("gw-d", vehicle("gw-d", "cfg-b", &[("EPS", "eps-2")]), NOW);
        f
    }

    fn fleet() -> Fleet {
        fleet_with(FleetConfig::default())
    }

    fn fp(and: &str, or: &str) -> Fingerprint {
        Fingerprint {
            and: hex::decode(and).unwrap(),
            or: hex::decode(or).unwrap(),
        }
    }

    fn report(gw: &str, ts: f64) -> Report {
        Report {
            incident: format!("can0-{gw}-0x1a0"),
            state: ReportState::Open,
            vehicle: format!("VIN-{gw}"),
            network_config: "cfg-a".into(),
            id: Some(0x1a0),
            sender: Some("ABS".into()),
            ecu_type: Some("abs-9.3".into()),
            first_ts: ts,
            last_ts: ts,
            frames: 300,
            max_level: 1.0,
            reasons: vec!["early".into()],
            payload: Some(fp("0000ff0000000000", "000fff0000000000")),
            rate_hz: 1000.0,
        }
    }

    /// A normal summary of 0x1a0: 100 Hz over 10 s.
    fn summary(config: &str, anomalous: u64, suspect: u64) -> Summary {
        let mut ids = BTreeMap::new();
        ids.insert(
            0x1a0,
            IdSummary {
                n: 1000,
                anomalous,
                suspect,
                gap_min_us: Some(9701.0),
                gap_mean_us: Some(10000.0),
                fingerprint: Some(fp("a500500000000000", "a50f7f0000000000")),
            },
        );
        Summary {
            vehicle: "v".into(),
            network_config: config.into(),
            from_ms: NOW - 10_000,
            to_ms: NOW,
            ids,
        }
    }

    fn alerts(outs: &[Out]) -> Vec<(String, String, u32, String)> {
        let mut v: Vec<_> = outs
            .iter()
            .filter_map(|o| match o {
                Out::Down {
                    gateway,
                    msg:
                        DownMsg::Alert {
                            why,
                            vehicles,
                            severity,
                            ..
                        },
                } => Some((gateway.clone(), why.clone(), *vehicles, severity.clone())),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    fn rules_to(outs: &[Out]) -> Vec<String> {
        let mut v: Vec<_> = outs
            .iter()
            .filter_map(|o| match o {
                Out::Rules { gateway, .. } => Some(gateway.clone()),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn report_on_one_vehicle_alerts_same_config_and_same_ecu_type_never_the_rest() {
        let mut f = fleet();
        let a = f.on_report("gw-a", report("gw-a", T0), NOW);
        assert_eq!(a.verdict, Verdict::Anomalous);
        assert_eq!(a.vehicles, 1);
        assert_eq!(
            alerts(&a.outs),
            vec![
                (
                    "gw-b".into(),
                    "same-network-config".into(),
                    1,
                    "watch".into()
                ),
                ("gw-c".into(), "same-ecu-type".into(), 1, "watch".into()),
            ]
        );
        // The rule set goes to every vehicle of the configuration, the reporter included.
        assert_eq!(rules_to(&a.outs), vec!["gw-a", "gw-b"]);
        assert!(a.outs.iter().all(|o| o.gateway() != "gw-d"));
    }

    #[test]
    fn second_vehicle_within_window_escalates_and_raises_severity() {
        let mut f = fleet();
        f.on_report("gw-a", report("gw-a", T0), NOW);
        let b = f.on_report("gw-b", report("gw-b", T0 + 5.0), NOW + 5000);
        assert_eq!(b.verdict, Verdict::Escalated);
        assert_eq!(b.vehicles, 2);
        assert_eq!(b.fleet_level, 1.0);
        assert_eq!(
            alerts(&b.outs),
            vec![
                (
                    "gw-a".into(),
                    "same-network-config".into(),
                    2,
                    "warning".into()
                ),
                ("gw-c".into(), "same-ecu-type".into(), 2, "warning".into()),
            ]
        );
        // No second rule for the same id: the set is unchanged, not re-sent.
        assert!(rules_to(&b.outs).is_empty(), "{}", b.rule);
        assert_eq!(f.counters.escalated, 1);
    }

    #[test]
    fn update_at_the_same_severity_is_not_alerted_again() {
        let mut f = fleet();
        f.on_report("gw-a", report("gw-a", T0), NOW);
        let mut again = report("gw-a", T0 + 1.0);
        again.state = ReportState::Update;
        let a = f.on_report("gw-a", again, NOW + 1000);
        assert!(alerts(&a.outs).is_empty());
        assert_eq!(f.counters.alerts, 2);
    }

    #[test]
    fn report_after_the_window_starts_a_new_incident_that_alerts_again() {
        let mut f = fleet();
        f.on_report("gw-a", report("gw-a", T0), NOW);
        let b = f.on_report("gw-b", report("gw-b", T0 + 61.0), NOW + 61_000);
        assert_eq!(b.verdict, Verdict::Anomalous);
        assert_eq!(b.vehicles, 1);
        assert_eq!(
            alerts(&b.outs),
            vec![
                (
                    "gw-a".into(),
                    "same-network-config".into(),
                    1,
                    "watch".into()
                ),
                ("gw-c".into(), "same-ecu-type".into(), 1, "watch".into()),
            ]
        );
        assert_eq!(f.incident("cfg-a/0x1a0").unwrap().seq, 2);
    }

    #[test]
    fn five_vehicles_within_the_window_are_critical() {
        let mut f = fleet();
        for i in 0..5 {
            let gw = format!("gw-x{i}");
            f.on_vehicle(&gw, vehicle(&gw, "cfg-a", &[]), NOW);
        }
        let mut last = None;
        for i in 0..5 {
            let gw = format!("gw-x{i}");
            last = Some(f.on_report(&gw, report(&gw, T0 + i as f64), NOW));
        }
        let last = last.unwrap();
        assert_eq!(last.vehicles, 5);
        assert_eq!(last.severity, Severity::Critical);
        assert!(alerts(&last.outs).iter().all(|a| a.3 == "critical"));
    }

    #[test]
    fn fleet_wide_quiet_pattern_is_downgraded_with_no_alerts() {
        let mut f = fleet();
        for g in ["gw-b", "gw-x1", "gw-x2", "gw-x3"] {
            f.on_summary(g, summary("cfg-a", 0, 40), NOW);
        }
        let a = f.on_report("gw-a", report("gw-a", T0), NOW);
        assert!(
            matches!(a.verdict, Verdict::Downgraded(_)),
            "{:?}",
            a.verdict
        );
        assert!(a.outs.is_empty());
        assert_eq!(f.counters.downgraded, 1);
        assert!(f.rule_set("cfg-a").is_none());
    }

    #[test]
    fn normal_payload_at_normal_rate_is_downgraded() {
        let mut f = fleet();
        for g in ["gw-b", "gw-x1", "gw-x2"] {
            f.on_summary(g, summary("cfg-a", 0, 0), NOW);
        }
        let mut r = report("gw-a", T0);
        r.payload = Some(fp("a500500000000000", "a5007f0000000000"));
        r.rate_hz = 100.0;
        let a = f.on_report("gw-a", r, NOW);
        assert!(
            matches!(a.verdict, Verdict::Downgraded(_)),
            "{:?}",
            a.verdict
        );
        assert!(a.outs.is_empty());
    }

    #[test]
    fn attack_payload_on_a_normal_fleet_is_not_downgraded_and_gets_a_signature_rule() {
        let mut f = fleet();
        for g in ["gw-b", "gw-x1", "gw-x2"] {
            f.on_summary(g, summary("cfg-a", 0, 0), NOW);
        }
        let a = f.on_report("gw-a", report("gw-a", T0), NOW);
        assert_eq!(a.verdict, Verdict::Anomalous);
        let set = f.rule_set("cfg-a").unwrap();
        assert_eq!(set.rules_id(), "cfg-a-1");
        let r = &set.rules[0];
        assert_eq!(r.name, "fleet-1");
        assert_eq!(r.id, "0x1a0");
        // mask = !(and ^ or), value = and & mask.
        assert_eq!(r.mask.as_deref(), Some("fff0ffffffffffff"));
        assert_eq!(r.value.as_deref(), Some("0000ff0000000000"));
        assert_eq!(r.level, 0.9);
        // The gateway's own parser takes the document as sent.
        let parsed = crate::can::rules::Rules::parse(&set.message()).unwrap();
        assert_eq!(parsed.set.rules_id, "cfg-a-1");
    }

    #[test]
    fn weak_signature_falls_back_to_a_rate_limit_from_the_normal_rate() {
        let mut f = fleet();
        f.on_summary("gw-b", summary("cfg-a", 0, 0), NOW);
        let mut r = report("gw-a", T0);
        r.payload = Some(fp("0000", "ff0f")); // 4 constant bits
        let a = f.on_report("gw-a", r, NOW);
        let set = f.rule_set("cfg-a").unwrap();
        let rule = &set.rules[0];
        assert_eq!(rule.mask, None);
        assert_eq!(rule.window_ms, Some(100));
        // Normal: floor(100 ms / 9.701 ms) + 1 = 11 per 100 ms; × 1.5 → 17, + 1.
        assert_eq!(rule.max_frames, Some(18), "{}", a.rule);
        let parsed = crate::can::rules::Rules::parse(&set.message()).unwrap();
        assert_eq!(parsed.set.rules, set.rules);
    }

    #[test]
    fn signature_that_normal_frames_could_match_falls_back_to_a_rate_limit() {
        let mut f = fleet();
        f.on_summary("gw-b", summary("cfg-a", 0, 0), NOW);
        let mut r = report("gw-a", T0);
        // Constant bits agree with the normal constant bits (a5 .. 50) and pin only 9 bits
        // that vary in normal traffic: normal frames would match.
        r.payload = Some(fp("a500500000000000", "a500500000000000"));
        f.on_report("gw-a", r, NOW);
        let rule = &f.rule_set("cfg-a").unwrap().rules[0];
        assert_eq!(rule.mask, None);
        assert!(rule.max_frames.is_some());
    }

    #[test]
    fn fixed_payload_on_an_id_that_looks_random_gets_a_signature_rule() {
        let random = Fingerprint {
            and: vec![0; 8],
            or: vec![0xff; 8],
        };
        let (mask, value) = (
            vec![0xff; 8],
            vec![0xde, 0xad, 0xbe, 0xef, 0, 0xc0, 0xff, 0xee],
        );
        assert!(distinguishes(&random, &mask, &value, 16));
        // Only 8 pinned bits of a random payload: too weak.
        let short = [0xff, 0, 0, 0, 0, 0, 0, 0];
        assert!(!distinguishes(
            &random,
            &short,
            &[0xde, 0, 0, 0, 0, 0, 0, 0],
            16
        ));
        // A constant normal bit that the signature contradicts: never a normal frame.
        let normal = Fingerprint {
            and: vec![0xa5, 0, 0, 0, 0, 0, 0, 0],
            or: vec![0xa5, 0xff, 0xff, 0, 0, 0, 0, 0],
        };
        assert!(distinguishes(
            &normal,
            &short,
            &[0xa4, 0, 0, 0, 0, 0, 0, 0],
            16
        ));
    }

    #[test]
    fn no_rule_without_a_baseline_or_when_the_rate_is_normal() {
        let mut f = fleet();
        let mut r = report("gw-a", T0);
        r.payload = None;
        let a = f.on_report("gw-a", r, NOW);
        assert!(a.rule.starts_with("no rule"), "{}", a.rule);
        assert!(f.rule_set("cfg-a").is_none());
        // Alerts go out anyway.
        assert_eq!(alerts(&a.outs).len(), 2);

        let mut f = fleet();
        f.on_summary("gw-b", summary("cfg-a", 0, 0), NOW);
        let mut r = report("gw-a", T0);
        r.payload = None;
        r.rate_hz = 100.0;
        let a = f.on_report("gw-a", r, NOW);
        assert!(
            a.rule.contains("within the fleet's normal rate"),
            "{}",
            a.rule
        );
    }

    #[test]
    fn rule_set_is_capped_at_256_and_drops_the_oldest() {
        let mut f = fleet();
        for id in 0..300u32 {
            let mut r = report("gw-a", T0);
            r.id = Some(id);
            f.on_report("gw-a", r, NOW);
        }
        let set = f.rule_set("cfg-a").unwrap();
        assert_eq!(set.rules.len(), MAX_RULES);
        assert_eq!(set.rules[0].name, "fleet-45");
        assert_eq!(set.version, 300);
        let names: BTreeSet<_> = set.rules.iter().map(|r| &r.name).collect();
        assert_eq!(names.len(), MAX_RULES, "names unique");
    }

    #[test]
    fn vehicle_without_the_current_rule_set_gets_it_when_it_announces_itself() {
        let mut f = fleet();
        f.on_report("gw-a", report("gw-a", T0), NOW);
        let outs = f.on_vehicle("gw-e", vehicle("gw-e", "cfg-a", &[]), NOW);
        assert_eq!(rules_to(&outs), vec!["gw-e"]);
        let mut v = vehicle("gw-e", "cfg-a", &[]);
        v.rules_id = Some("cfg-a-1".into());
        assert!(f.on_vehicle("gw-e", v, NOW).is_empty());
        assert!(f
            .on_vehicle("gw-d", vehicle("gw-d", "cfg-b", &[]), NOW)
            .is_empty());
    }

    #[test]
    fn configured_instruction_goes_to_each_vehicle_of_the_configuration_once() {
        let mut cfg = FleetConfig::default();
        cfg.instructions.push(InstructionConfig {
            network_config: "cfg-a".into(),
            ids: vec!["0x1a0".into()],
            action: Action::SlowDown,
            min_vehicles: 1,
        });
        let mut f = fleet_with(cfg);
        let a = f.on_report("gw-a", report("gw-a", T0), NOW);
        let to: Vec<&str> = a
            .outs
            .iter()
            .filter_map(|o| match o {
                Out::Down {
                    gateway,
                    msg: DownMsg::Instruction { action, .. },
                } if action == "slow-down" => Some(gateway.as_str()),
                _ => None,
            })
            .collect();
        let mut to = to;
        to.sort();
        assert_eq!(to, vec!["gw-a", "gw-b"]);
        let b = f.on_report("gw-b", report("gw-b", T0 + 1.0), NOW);
        assert!(!b.outs.iter().any(|o| matches!(
            o,
            Out::Down {
                msg: DownMsg::Instruction { .. },
                ..
            }
        )));
    }

    #[test]
    fn key_update_instructs_every_vehicle_of_the_configuration_once() {
        let mut f = fleet();
        let k = KeyUpdate {
            id: 0x2b0,
            incident: "i".into(),
            vehicle: "VIN-gw-a".into(),
            level: 1.0,
        };
        let outs = f.on_key_update("gw-a", k.clone(), NOW);
        let mut to: Vec<_> = outs.iter().map(|o| o.gateway().to_string()).collect();
        to.sort();
        assert_eq!(to, vec!["gw-a", "gw-b"]);
        assert!(f.on_key_update("gw-a", k, NOW).is_empty());
        assert!(f
            .on_key_update(
                "gw-unknown",
                KeyUpdate {
                    id: 1,
                    incident: String::new(),
                    vehicle: String::new(),
                    level: 1.0
                },
                NOW
            )
            .is_empty());
    }

    #[test]
    fn vehicles_beyond_the_bound_forget_the_least_recently_heard() {
        let cfg = FleetConfig {
            max_vehicles: 3,
            ..FleetConfig::default()
        };
        let mut f = Fleet::new(cfg);
        for (i, g) in ["g1", "g2", "g3", "g4"].iter().enumerate() {
            f.on_vehicle(g, vehicle(g, "c", &[]), NOW + i as u64);
        }
        assert_eq!(f.vehicles().count(), 3);
        assert!(f.vehicle("g1").is_none());
        let d = f.take_dirty();
        assert!(d.vehicles.contains("g1"), "the removal is persisted");
        assert_eq!(f.counters.evicted, 1);
    }

    #[test]
    fn rules_status_refused_is_counted_and_applied_records_the_set() {
        let mut f = fleet();
        f.on_rules_status(
            "gw-a",
            RulesStatus {
                rules_id: "cfg-a-2".into(),
                applied: false,
                rules: None,
                error: Some("rules[1].mask".into()),
            },
        );
        assert_eq!(f.counters.rules_refused, 1);
        f.on_rules_status(
            "gw-a",
            RulesStatus {
                rules_id: "cfg-a-3".into(),
                applied: true,
                rules: Some(3),
                error: None,
            },
        );
        assert_eq!(
            f.vehicle("gw-a").unwrap().rules_id.as_deref(),
            Some("cfg-a-3")
        );
    }

    #[test]
    fn incidents_are_bounded_and_expire_after_the_window() {
        let mut f = fleet();
        for id in 0..(MAX_INCIDENTS as u32 + 10) {
            let mut r = report("gw-a", T0);
            r.id = Some(id);
            r.payload = None;
            f.on_report("gw-a", r, NOW + u64::from(id));
        }
        assert_eq!(f.incidents.len(), MAX_INCIDENTS);
        f.tick(NOW + 3_600_000);
        assert!(f.incidents.is_empty());
    }

    #[test]
    fn restored_state_keeps_dedupe_and_rule_sets() {
        let mut f = fleet();
        f.on_report("gw-a", report("gw-a", T0), NOW);
        let d = f.take_dirty();
        let mut g = Fleet::new(FleetConfig::default());
        for k in &d.vehicles {
            g.restore_vehicle(f.vehicle(k).unwrap().clone());
        }
        for k in &d.rule_sets {
            g.restore_rule_set(f.rule_set(k).unwrap().clone());
        }
        for k in &d.incidents {
            g.restore_incident(f.incident(k).unwrap().clone());
        }
        let mut again = report("gw-a", T0 + 1.0);
        again.state = ReportState::Closed;
        let a = g.on_report("gw-a", again, NOW + 1000);
        assert!(alerts(&a.outs).is_empty(), "deduped across the restart");
        assert_eq!(g.rule_set("cfg-a").unwrap().rules_id(), "cfg-a-1");
    }

    #[test]
    fn unknown_id_incident_alerts_the_configuration_without_a_rule() {
        let mut f = fleet();
        let mut r = report("gw-a", T0);
        r.id = None;
        r.sender = None;
        r.ecu_type = None;
        let a = f.on_report("gw-a", r, NOW);
        assert_eq!(
            alerts(&a.outs),
            vec![(
                "gw-b".into(),
                "same-network-config".into(),
                1,
                "watch".into()
            )]
        );
        assert!(f.rule_set("cfg-a").is_none());
    }
}
