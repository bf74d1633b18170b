//! The fleet server's session: one persistent MQTT session (mTLS, `[uplink]` settings) to
//! the cloud broker, subscribed QoS 1 to every gateway's `can/{vehicle,report,summary,
//! key-update,rules-status}`; the [`Fleet`] state in the store; an outbox of what to publish.
//!
//! Order for every incoming message: parse, apply to the state, write what changed and what
//! it makes us publish (the outbox) in one batch, flush, and only then acknowledge it. The
//! outbox is published in order, at least once: an entry leaves it when the broker
//! acknowledged it, and what is left is published again after a reconnect or a restart.

use super::assess::{incident_key, Fleet, IdStat, Incident, Out, RuleSet, Vehicle, Verdict};
use super::msg::{self, Incoming, Kind};
use super::{FleetConfig, FleetError};
use crate::store::{Store, Table};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

const VEHICLES: &str = "fleet-vehicles";
const RULE_SETS: &str = "fleet-rules";
const INCIDENTS: &str = "fleet-incidents";
const OUTBOX: &str = "fleet-outbox";
const BASELINE: &str = "fleet-baseline";

/// A baseline record: one vehicle's statistics of one id.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredStat {
    network_config: String,
    id: u32,
    gateway: String,
    stat: IdStat,
}

fn stat_key(config: &str, id: u32, gw: &str) -> Vec<u8> {
    format!("{config}\0{id:08x}\0{gw}").into_bytes()
}
/// Outbox entries kept at most; beyond, the oldest are dropped (counted).
pub const MAX_OUTBOX: usize = 100_000;
/// The largest MQTT packet accepted from the broker. Larger than [`msg::MAX_MESSAGE`] so that
/// an oversized message is read, counted and acknowledged rather than breaking the session
/// (a packet over this one does: bound it at the broker, e.g. Mosquitto's
/// `message_size_limit`).
const MAX_PACKET: usize = 16 * 1024 * 1024;
/// Outbox entries in flight at once.
const WINDOW: usize = 64;

struct Tables {
    store: Store,
    vehicles: Table,
    rule_sets: Table,
    incidents: Table,
    outbox: Table,
    baseline: Table,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn encode_out(topic: &str, retain: bool, payload: &[u8]) -> Vec<u8> {
    let t = topic.as_bytes();
    let mut v = Vec::with_capacity(3 + t.len() + payload.len());
    v.push(u8::from(retain));
    v.extend_from_slice(&(t.len().min(u16::MAX as usize) as u16).to_be_bytes());
    v.extend_from_slice(&t[..t.len().min(u16::MAX as usize)]);
    v.extend_from_slice(payload);
    v
}

fn decode_out(v: &[u8]) -> Option<(String, bool, Vec<u8>)> {
    let (&r, rest) = v.split_first()?;
    let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_string();
    Some((topic, r == 1, rest.get(2 + len..)?.to_vec()))
}

impl Tables {
    fn open(store: &Store) -> Result<Tables, FleetError> {
        Ok(Tables {
            store: store.clone(),
            vehicles: store.table(VEHICLES)?,
            rule_sets: store.table(RULE_SETS)?,
            incidents: store.table(INCIDENTS)?,
            outbox: store.table(OUTBOX)?,
            baseline: store.table(BASELINE)?,
        })
    }

    /// The state as stored (a damaged record is logged and skipped).
    fn load(&self, fleet: &mut Fleet) -> Result<(), FleetError> {
        fn each<T: serde::de::DeserializeOwned>(
            t: &Table,
            name: &str,
            mut f: impl FnMut(T),
        ) -> Result<(), FleetError> {
            for (k, v) in t.entries()? {
                match serde_json::from_slice::<T>(&v) {
                    Ok(x) => f(x),
                    Err(e) => tracing::warn!(
                        table = name,
                        key = %String::from_utf8_lossy(&k),
                        error = %e,
                        "fleet: skipping a damaged stored record"
                    ),
                }
            }
            Ok(())
        }
        each::<Vehicle>(&self.vehicles, VEHICLES, |v| fleet.restore_vehicle(v))?;
        each::<RuleSet>(&self.rule_sets, RULE_SETS, |s| fleet.restore_rule_set(s))?;
        each::<Incident>(&self.incidents, INCIDENTS, |i| fleet.restore_incident(i))?;
        each::<StoredStat>(&self.baseline, BASELINE, |s| {
            fleet.restore_stat(&s.network_config, s.id, &s.gateway, s.stat)
        })?;
        Ok(())
    }

    /// Write what changed and the new outbox entries, then flush.
    fn commit(
        &self,
        fleet: &mut Fleet,
        outs: &[Out],
        next_seq: &mut u64,
    ) -> Result<(), FleetError> {
        let d = fleet.take_dirty();
        let mut puts = Vec::new();
        let mut removes = Vec::new();
        for g in &d.vehicles {
            match fleet.vehicle(g) {
                Some(v) => puts.push((
                    g.as_bytes().to_vec(),
                    serde_json::to_vec(v).unwrap_or_default(),
                )),
                None => removes.push(g.as_bytes().to_vec()),
            }
        }
        self.vehicles.apply(&puts, &removes)?;
        let (mut puts, mut removes) = (Vec::new(), Vec::new());
        for c in &d.rule_sets {
            match fleet.rule_set(c) {
                Some(s) => puts.push((
                    c.as_bytes().to_vec(),
                    serde_json::to_vec(s).unwrap_or_default(),
                )),
                None => removes.push(c.as_bytes().to_vec()),
            }
        }
        self.rule_sets.apply(&puts, &removes)?;
        let (mut puts, mut removes) = (Vec::new(), Vec::new());
        for k in &d.incidents {
            match fleet.incident(k) {
                Some(i) => puts.push((
                    k.as_bytes().to_vec(),
                    serde_json::to_vec(i).unwrap_or_default(),
                )),
                None => removes.push(k.as_bytes().to_vec()),
            }
        }
        self.incidents.apply(&puts, &removes)?;
        let (mut puts, mut removes) = (Vec::new(), Vec::new());
        for (c, id, g) in &d.baseline {
            let key = stat_key(c, *id, g);
            match fleet.stat(c, *id, g) {
                Some(st) => puts.push((
                    key,
                    serde_json::to_vec(&StoredStat {
                        network_config: c.clone(),
                        id: *id,
                        gateway: g.clone(),
                        stat: st.clone(),
                    })
                    .unwrap_or_default(),
                )),
                None => removes.push(key),
            }
        }
        self.baseline.apply(&puts, &removes)?;
        let mut puts = Vec::new();
        for o in outs {
            let (topic, retain, payload) = match o {
                Out::Rules { gateway, set } => (msg::rules_topic(gateway), true, set.message()),
                Out::Down { gateway, msg: m } => (
                    msg::down_topic(gateway),
                    false,
                    serde_json::to_vec(m).unwrap_or_default(),
                ),
            };
            puts.push((
                next_seq.to_be_bytes().to_vec(),
                encode_out(&topic, retain, &payload),
            ));
            *next_seq += 1;
        }
        self.outbox.apply(&puts, &[])?;
        let over = self.outbox.len().saturating_sub(MAX_OUTBOX);
        if over > 0 {
            let old: Vec<Vec<u8>> = self
                .outbox
                .scan_prefix_from(b"", &[], over)?
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            tracing::warn!(
                dropped = old.len(),
                "fleet: outbox full, dropping the oldest messages"
            );
            self.outbox.remove(&old)?;
        }
        self.store.flush()?;
        Ok(())
    }
}

/// Log malformed input at most once per 10 s, with how many were not logged.
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn warn(&mut self, topic: &str, error: &str) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            topic,
            error,
            suppressed = self.suppressed,
            "fleet: dropping a malformed message"
        );
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// Apply one message; returns what to publish.
fn handle(fleet: &mut Fleet, gw: &str, m: Incoming, now: u64) -> Vec<Out> {
    match m {
        Incoming::Vehicle(v) => {
            tracing::info!(gateway = gw, vehicle = %v.vehicle, network_config = %v.network_config, ecus = v.ecus.len(), "fleet: vehicle");
            fleet.on_vehicle(gw, v, now)
        }
        Incoming::Summary(s) => {
            fleet.on_summary(gw, s, now);
            Vec::new()
        }
        Incoming::RulesStatus(s) => {
            if s.applied {
                tracing::info!(gateway = gw, rules_id = %s.rules_id, "fleet: rule set applied");
            } else {
                tracing::warn!(gateway = gw, rules_id = %s.rules_id, error = s.error.as_deref().unwrap_or(""), "fleet: rule set refused by the gateway");
            }
            fleet.on_rules_status(gw, s);
            Vec::new()
        }
        Incoming::KeyUpdate(k) => {
            tracing::warn!(gateway = gw, id = %msg::format_id(k.id), "fleet: SecOC id attacked: key update for its configuration");
            fleet.on_key_update(gw, k, now)
        }
        Incoming::Report(r) => {
            let (incident, id) = (r.incident.clone(), r.id);
            let key = incident_key(&r.network_config, r.id);
            let a = fleet.on_report(gw, r, now);
            match &a.verdict {
                Verdict::Downgraded(why) => tracing::info!(
                    gateway = gw, incident = %incident, fleet_incident = %key,
                    vehicles = a.vehicles, reason = %why,
                    downgraded_total = fleet.counters.downgraded,
                    "fleet: report downgraded, normal across the fleet: no alerts"
                ),
                v => tracing::info!(
                    gateway = gw, incident = %incident, fleet_incident = %key,
                    id = id.map(msg::format_id).unwrap_or_default(),
                    escalated = matches!(v, Verdict::Escalated),
                    vehicles = a.vehicles, severity = a.severity.as_str(),
                    fleet_level = a.fleet_level, rule = %a.rule, sent = a.outs.len(),
                    "fleet: report assessed"
                ),
            }
            a.outs
        }
    }
}

/// Run the fleet server until `shutdown`.
pub async fn run(
    cfg: FleetConfig,
    up: crate::uplink::UplinkConfig,
    client_id: String,
    store: Store,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use rumqttc::{Event, Outgoing, Packet, QoS, SubscribeFilter};
    let tls = match crate::uplink::link::client_tls(&up) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "fleet: cannot load the cloud broker TLS files; the fleet server is off");
            return;
        }
    };
    let tables = match Tables::open(&store) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "fleet: store; the fleet server is off");
            return;
        }
    };
    let mut fleet = Fleet::new(cfg);
    if let Err(e) = tables.load(&mut fleet) {
        tracing::error!(error = %e, "fleet: cannot load the stored state; the fleet server is off");
        return;
    }
    let mut next_seq = match tables.outbox.last_with_prefix(b"") {
        Ok(Some((k, _))) => {
            <[u8; 8]>::try_from(k.as_slice())
                .map(u64::from_be_bytes)
                .unwrap_or(0)
                + 1
        }
        _ => 1,
    };
    tracing::info!(
        vehicles = fleet.vehicles().count(),
        outbox = tables.outbox.len(),
        "fleet: state loaded"
    );
    let mut malformed = 0u64;
    let mut bad_log = RateLimitedLog {
        last: None,
        suppressed: 0,
    };
    let mut logged = fleet.counters.clone();
    let mut attempt = 0u32;
    loop {
        let (client, mut events, pump) =
            crate::uplink::link::cloud_session(&up, &client_id, tls.clone(), MAX_PACKET);
        let mut connected = false;
        // The next outbox sequence number to publish; outbox entries published, waiting for
        // their packet id, and in flight.
        let mut cursor = 0u64;
        let mut unmapped: VecDeque<u64> = VecDeque::new();
        let mut inflight: HashMap<u16, u64> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        let ended = loop {
            if connected && unmapped.len() + inflight.len() < WINDOW {
                match tables
                    .outbox
                    .scan_prefix_from(b"", &cursor.to_be_bytes(), WINDOW)
                {
                    Ok(batch) => {
                        for (k, v) in batch {
                            let Ok(seq) = <[u8; 8]>::try_from(k.as_slice()).map(u64::from_be_bytes)
                            else {
                                continue;
                            };
                            cursor = seq + 1;
                            match decode_out(&v) {
                                Some((topic, retain, payload)) => {
                                    if client
                                        .publish(topic, QoS::AtLeastOnce, retain, payload)
                                        .await
                                        .is_err()
                                    {
                                        break;
                                    }
                                    unmapped.push_back(seq);
                                }
                                None => {
                                    let _ = tables.outbox.remove(&[k]);
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "fleet: outbox"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break true,
                _ = tick.tick() => {
                    fleet.tick(now_ms());
                    if let Err(e) = tables.commit(&mut fleet, &[], &mut next_seq) {
                        tracing::warn!(error = %e, "fleet: store");
                    }
                    if fleet.counters != logged {
                        let c = &fleet.counters;
                        tracing::info!(reports = c.reports, escalated = c.escalated, downgraded = c.downgraded,
                            alerts = c.alerts, instructions = c.instructions, rule_sets = c.rule_sets,
                            rules_refused = c.rules_refused, key_updates = c.key_updates, evicted = c.evicted,
                            malformed, "fleet: counters");
                        logged = fleet.counters.clone();
                    }
                }
                ev = events.recv() => match ev {
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        connected = true;
                        attempt = 0;
                        tracing::info!(host = %up.host, port = up.port, client_id = %client_id, "fleet: connected to the cloud broker");
                        let filters = Kind::ALL.iter().map(|k| SubscribeFilter::new(k.filter(), QoS::AtLeastOnce));
                        let _ = client.try_subscribe_many(filters);
                        cursor = 0;
                    }
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let outs = match msg::topic_kind(&p.topic) {
                            None => {
                                malformed += 1;
                                bad_log.warn(&p.topic, "not a fleet topic");
                                Vec::new()
                            }
                            Some((gw, kind)) => match msg::parse(kind, &p.payload) {
                                Ok(m) => handle(&mut fleet, gw, m, now_ms()),
                                Err(e) => {
                                    malformed += 1;
                                    bad_log.warn(&p.topic, &e.to_string());
                                    Vec::new()
                                }
                            },
                        };
                        if let Err(e) = tables.commit(&mut fleet, &outs, &mut next_seq) {
                            // Not acknowledged: the broker delivers it again on the next session.
                            tracing::error!(error = %e, topic = %p.topic, "fleet: cannot store; reconnecting");
                            break false;
                        }
                        let _ = client.ack(&p).await;
                    }
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        if let Some(seq) = unmapped.pop_front() {
                            inflight.insert(pkid, seq);
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        if let Some(seq) = inflight.remove(&ack.pkid) {
                            if let Err(e) = tables.outbox.remove(&[seq.to_be_bytes().to_vec()]) {
                                tracing::warn!(error = %e, "fleet: outbox");
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        if connected {
                            tracing::warn!(error = %e, "fleet: cloud broker connection lost");
                        } else {
                            tracing::debug!(error = %e, "fleet: cannot connect to the cloud broker");
                        }
                        break false;
                    }
                    None => break false,
                },
            }
        };
        pump.abort();
        if ended {
            let _ = client.try_disconnect();
            let _ = tables.store.flush();
            return;
        }
        let cap = up
            .backoff_min
            .saturating_mul(1u32 << attempt.min(16))
            .min(up.backoff_max);
        attempt = attempt.saturating_add(1);
        let wait = {
            use rand::Rng;
            cap.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_records_round_trip_and_damage_is_none() {
        let v = encode_out("outpost/gw-a/can/rules", true, b"{}");
        assert_eq!(
            decode_out(&v),
            Some(("outpost/gw-a/can/rules".into(), true, b"{}".to_vec()))
        );
        assert_eq!(decode_out(&[]), None);
        assert_eq!(decode_out(&[0, 0xff, 0xff, b'a']), None);
    }
}
