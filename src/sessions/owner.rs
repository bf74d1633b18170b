//! The sessions owner thread: the only code that touches the `sessions`, `session-queue` and
//! `retained` tables, and the in-memory index of them.
//!
//! It takes every command waiting, applies their writes, makes them durable with one
//! `Store::flush` (group commit), and only then answers: the replies to writers, the
//! fetches (so nothing is delivered before it is on disk) and the notices to attached
//! connections that messages are waiting.

use super::record::{
    parse_queue_key, queue_key, queue_prefix, Queued, RetainedRecord, SessionRecord,
};
use super::topic::{filter_matches, Matcher};
use super::{
    now_ms, Attached, Command, Delivery, DurableTx, SessionStats, SessionsConfig, SessionsError,
    ToConn, WhenFull,
};
use crate::store::{Store, Table};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// How often sessions are checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Commands applied before one group commit at most.
const MAX_BATCH: usize = 4096;
/// Bytes of a queue record before its topic and payload (see `record.rs`).
const QUEUED_HEADER: usize = 13;

struct Sess {
    rec: SessionRecord,
    count: usize,
    bytes: u64,
    next_seq: u64,
    online: Option<(u64, UnboundedSender<ToConn>)>,
    /// A `More` was sent and no fetch came since.
    more_sent: bool,
    /// The highest sequence number handed out in this process (for the DUP flag).
    sent_through: u64,
}

impl Sess {
    /// A session with nothing queued (yet: `load` counts its queue).
    fn new(rec: SessionRecord) -> Sess {
        Sess {
            rec,
            count: 0,
            bytes: 0,
            next_seq: 1,
            online: None,
            more_sent: false,
            sent_through: 0,
        }
    }
}

pub(super) struct Owner {
    store: Store,
    sessions_t: Table,
    queue_t: Table,
    retained_t: Table,
    cfg: SessionsConfig,
    matcher: Arc<RwLock<Matcher>>,
    stats: Arc<SessionStats>,
    sessions: HashMap<String, Sess>,
    /// Retained topics and their QoS (payloads stay in the table).
    retained: BTreeMap<String, u8>,
    next_epoch: u64,
    total_count: i64,
    total_bytes: i64,
}

type ConnectReply = tokio::sync::oneshot::Sender<Result<Option<Attached>, SessionsError>>;

/// What one turn owes once its writes are durable.
#[derive(Default)]
struct Turn {
    wrote: bool,
    replies: Vec<DurableTx>,
    connects: Vec<(ConnectReply, Option<Attached>)>,
    fetches: Vec<(String, u64, u64, usize)>,
    released: Vec<(String, u64, u64)>,
    notify: HashSet<String>,
}

impl Owner {
    pub(super) fn load(
        store: Store,
        cfg: SessionsConfig,
        matcher: Arc<RwLock<Matcher>>,
        stats: Arc<SessionStats>,
    ) -> Result<Owner, SessionsError> {
        let started = Instant::now();
        let sessions_t = store.table("sessions")?;
        let queue_t = store.table("session-queue")?;
        let retained_t = store.table("retained")?;
        let mut sessions = HashMap::new();
        let now = now_ms();
        for (k, v) in sessions_t.entries()? {
            let id = String::from_utf8_lossy(&k).into_owned();
            match SessionRecord::decode(&v) {
                Ok(mut rec) => {
                    // Everyone was away while the gateway was down: expiry counts from now
                    // for a session that was connected when it stopped.
                    rec.disconnected_ms.get_or_insert(now);
                    sessions.insert(id, Sess::new(rec));
                }
                Err(e) => {
                    return Err(SessionsError::Store(format!(
                        "session record {id:?} is damaged: {e}"
                    )))
                }
            }
        }
        let mut orphans = Vec::new();
        let (mut total_count, mut total_bytes) = (0i64, 0i64);
        for (k, v) in queue_t.entries()? {
            let (id, seq) = parse_queue_key(&k).map_err(SessionsError::Store)?;
            match sessions.get_mut(&id) {
                Some(s) => {
                    let size = v.len().saturating_sub(QUEUED_HEADER) as u64;
                    s.count += 1;
                    s.bytes += size;
                    s.next_seq = s.next_seq.max(seq + 1);
                    total_count += 1;
                    total_bytes += size as i64;
                }
                None => orphans.push(k),
            }
        }
        if !orphans.is_empty() {
            // Left by a crash between deleting a session and its queue: void anyway.
            queue_t.apply(&[], &orphans)?;
        }
        {
            let mut m = matcher.write().unwrap_or_else(|e| e.into_inner());
            for (id, s) in &sessions {
                for (f, q) in &s.rec.subs {
                    m.insert(f, id, *q);
                }
            }
        }
        let mut retained = BTreeMap::new();
        for (k, v) in retained_t.entries()? {
            let topic = String::from_utf8_lossy(&k).into_owned();
            retained.insert(topic, v.get(1).copied().unwrap_or(0));
        }
        let owner = Owner {
            store,
            sessions_t,
            queue_t,
            retained_t,
            cfg,
            matcher,
            stats,
            sessions,
            retained,
            next_epoch: 0,
            total_count,
            total_bytes,
        };
        owner.gauges();
        tracing::info!(
            sessions = owner.sessions.len(),
            queued = total_count,
            retained = owner.retained.len(),
            ms = started.elapsed().as_millis() as u64,
            "persistent sessions and retained messages loaded"
        );
        Ok(owner)
    }

    pub(super) fn run(mut self, rx: Receiver<Command>) {
        let mut last_sweep = Instant::now();
        let mut turn = Turn::default();
        self.sweep(&mut turn);
        self.finish(turn);
        loop {
            let mut turn = Turn::default();
            match rx.recv_timeout(SWEEP_EVERY) {
                Ok(c) => {
                    self.apply(c, &mut turn);
                    let mut n = 1;
                    while n < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(c) => self.apply(c, &mut turn),
                            Err(_) => break,
                        }
                        n += 1;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = Instant::now();
                self.sweep(&mut turn);
            }
            self.finish(turn);
        }
        if let Err(e) = self.store.flush() {
            tracing::error!(error = %e, "sessions: final flush failed");
        }
    }

    fn gauges(&self) {
        let st = &self.stats;
        st.sessions
            .store(self.sessions.len() as i64, Ordering::Relaxed);
        st.queued.store(self.total_count, Ordering::Relaxed);
        st.queued_bytes.store(self.total_bytes, Ordering::Relaxed);
        st.retained
            .store(self.retained.len() as i64, Ordering::Relaxed);
    }

    fn finish(&mut self, turn: Turn) {
        let result = if turn.wrote {
            self.store.flush().map_err(SessionsError::from)
        } else {
            Ok(())
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "sessions: flush failed; nothing of this batch is acknowledged");
        }
        for r in turn.replies {
            let _ = r.send(result.clone());
        }
        for (r, a) in turn.connects {
            let _ = r.send(result.clone().map(|()| a));
        }
        if result.is_ok() {
            for (id, epoch, seq) in turn.released {
                if let Some((e, tx)) = self.sessions.get(&id).and_then(|s| s.online.as_ref()) {
                    if *e == epoch {
                        let _ = tx.send(ToConn::Released(seq));
                    }
                }
            }
            for (id, epoch, after, max) in turn.fetches {
                if let Err(e) = self.fetch(&id, epoch, after, max) {
                    tracing::error!(session = %id, error = %e, "sessions: cannot read the queue");
                }
            }
            for id in turn.notify {
                if let Some(s) = self.sessions.get_mut(&id) {
                    if let (Some((_, tx)), false, true) = (&s.online, s.more_sent, s.count > 0) {
                        let _ = tx.send(ToConn::More);
                        s.more_sent = true;
                    }
                }
            }
        }
        self.gauges();
    }

    fn apply(&mut self, c: Command, turn: &mut Turn) {
        let r = match c {
            Command::Connect {
                session,
                clean,
                reply,
            } => self.connect(session, clean, reply, turn),
            Command::Detach { session, epoch } => self.detach(&session, epoch),
            Command::Subscribe {
                session,
                filters,
                reply,
            } => {
                turn.replies.push(reply);
                self.subscribe(&session, filters, turn)
            }
            Command::Unsubscribe {
                session,
                filters,
                reply,
            } => {
                turn.replies.push(reply);
                self.unsubscribe(&session, &filters, turn)
            }
            Command::Publish {
                targets,
                topic,
                payload,
                reply,
            } => {
                turn.replies.push(reply);
                let mut r = Ok(());
                for (id, qos) in targets {
                    if self.sessions.contains_key(&id) {
                        r = r.and(self.enqueue(&id, &topic, qos, false, &payload, turn));
                    }
                }
                r
            }
            Command::Retain {
                topic,
                owner,
                qos,
                payload,
                reply,
            } => {
                turn.replies.push(reply);
                self.retain(topic, owner, qos, &payload, turn)
            }
            Command::Fetch {
                session,
                epoch,
                after,
                max,
            } => {
                turn.fetches.push((session, epoch, after, max));
                Ok(())
            }
            Command::Acked { session, seq } => self.remove_queued(&session, seq).map(|_| ()),
            Command::Release {
                session,
                epoch,
                seq,
            } => {
                turn.released.push((session.clone(), epoch, seq));
                self.release(&session, seq, turn)
            }
            Command::Retained { reply } => {
                let _ = reply.send(self.all_retained());
                Ok(())
            }
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "sessions: write failed");
            // Fail this turn's replies: nothing of it is acknowledged.
            for r in std::mem::take(&mut turn.replies) {
                let _ = r.send(Err(e.clone()));
            }
        }
    }

    /// The client's PUBREC of `seq`: recorded, so that after a crash only its PUBREL is
    /// sent again (the go-ahead for the PUBREL follows the flush).
    fn release(&mut self, id: &str, seq: u64, turn: &mut Turn) -> Result<(), SessionsError> {
        let k = queue_key(id, seq);
        let Some(v) = self.queue_t.get(&k)? else {
            return Ok(());
        };
        let mut q = Queued::decode(&v).map_err(SessionsError::Store)?;
        q.released = true;
        turn.wrote = true;
        self.queue_t.apply(&[(k, q.encode())], &[])?;
        Ok(())
    }

    fn all_retained(&self) -> Result<Vec<(String, RetainedRecord)>, SessionsError> {
        let mut out = Vec::with_capacity(self.retained.len());
        for (k, v) in self.retained_t.entries()? {
            let topic = String::from_utf8_lossy(&k).into_owned();
            let rec = RetainedRecord::decode(&v)
                .map_err(|e| SessionsError::Store(format!("retained {topic:?}: {e}")))?;
            out.push((topic, rec));
        }
        Ok(out)
    }

    fn put_record(&self, id: &str, rec: &SessionRecord) -> Result<(), SessionsError> {
        self.sessions_t
            .apply(&[(id.as_bytes().to_vec(), rec.encode())], &[])
            .map_err(Into::into)
    }

    fn connect(
        &mut self,
        id: String,
        clean: bool,
        reply: ConnectReply,
        turn: &mut Turn,
    ) -> Result<(), SessionsError> {
        if clean {
            if self.sessions.contains_key(&id) {
                self.delete_session(&id)?;
                turn.wrote = true;
            }
            turn.connects.push((reply, None));
            return Ok(());
        }
        let present = self.sessions.contains_key(&id);
        if !present {
            if self.sessions.len() >= self.cfg.max_sessions {
                self.stats.sessions_refused.fetch_add(1, Ordering::Relaxed);
                let _ = reply.send(Err(SessionsError::TooManySessions(self.cfg.max_sessions)));
                return Ok(());
            }
            let rec = SessionRecord {
                subs: Vec::new(),
                disconnected_ms: None,
                created_ms: now_ms(),
            };
            self.put_record(&id, &rec)?;
            turn.wrote = true;
            self.sessions.insert(id.clone(), Sess::new(rec));
        }
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let Some(s) = self.sessions.get_mut(&id) else {
            return Ok(());
        };
        s.online = Some((epoch, tx));
        s.more_sent = false;
        s.rec.disconnected_ms = None;
        let attached = Attached {
            present,
            subs: s.rec.subs.clone(),
            events: rx,
            epoch,
        };
        turn.connects.push((reply, Some(attached)));
        turn.notify.insert(id);
        Ok(())
    }

    fn detach(&mut self, id: &str, epoch: u64) -> Result<(), SessionsError> {
        let Some(s) = self.sessions.get_mut(id) else {
            return Ok(());
        };
        if s.online.as_ref().map(|(e, _)| *e) != Some(epoch) {
            return Ok(());
        }
        s.online = None;
        s.rec.disconnected_ms = Some(now_ms());
        let rec = s.rec.clone();
        // Not flushed on its own: only expiry reads it, and it rides the next flush.
        self.put_record(id, &rec)
    }

    fn delete_session(&mut self, id: &str) -> Result<(), SessionsError> {
        let Some(s) = self.sessions.remove(id) else {
            return Ok(());
        };
        {
            let mut m = self.matcher.write().unwrap_or_else(|e| e.into_inner());
            for (f, _) in &s.rec.subs {
                m.remove(f, id);
            }
        }
        let keys: Vec<Vec<u8>> = self
            .queue_t
            .scan_prefix(&queue_prefix(id))?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        // The record first: a crash in between leaves orphans that `load` deletes.
        self.sessions_t.apply(&[], &[id.as_bytes().to_vec()])?;
        self.queue_t.apply(&[], &keys)?;
        self.total_count -= s.count as i64;
        self.total_bytes -= s.bytes as i64;
        Ok(())
    }

    fn subscribe(
        &mut self,
        id: &str,
        filters: Vec<(String, u8)>,
        turn: &mut Turn,
    ) -> Result<(), SessionsError> {
        let Some(s) = self.sessions.get_mut(id) else {
            return Ok(());
        };
        {
            let mut m = self.matcher.write().unwrap_or_else(|e| e.into_inner());
            for (f, q) in &filters {
                match s.rec.subs.iter_mut().find(|(g, _)| g == f) {
                    Some(e) => e.1 = *q,
                    None => s.rec.subs.push((f.clone(), *q)),
                }
                m.insert(f, id, *q);
            }
        }
        let rec = s.rec.clone();
        self.put_record(id, &rec)?;
        turn.wrote = true;
        // Retained messages matching the new filters, queued like any other delivery so
        // that they too survive a restart until acknowledged ([MQTT-3.3.1-6]).
        let mut hits = Vec::new();
        for (f, q) in &filters {
            for (topic, rq) in &self.retained {
                if filter_matches(f, topic) {
                    hits.push((topic.clone(), (*q).min(*rq)));
                }
            }
        }
        for (topic, qos) in hits {
            if let Some(v) = self.retained_t.get(topic.as_bytes())? {
                let rec = RetainedRecord::decode(&v).map_err(SessionsError::Store)?;
                self.enqueue(id, &topic, qos, true, &rec.payload, turn)?;
            }
        }
        Ok(())
    }

    fn unsubscribe(
        &mut self,
        id: &str,
        filters: &[String],
        turn: &mut Turn,
    ) -> Result<(), SessionsError> {
        let Some(s) = self.sessions.get_mut(id) else {
            return Ok(());
        };
        {
            let mut m = self.matcher.write().unwrap_or_else(|e| e.into_inner());
            for f in filters {
                s.rec.subs.retain(|(g, _)| g != f);
                m.remove(f, id);
            }
        }
        let rec = s.rec.clone();
        self.put_record(id, &rec)?;
        turn.wrote = true;
        Ok(())
    }

    fn retain(
        &mut self,
        topic: String,
        owner: String,
        qos: u8,
        payload: &[u8],
        turn: &mut Turn,
    ) -> Result<(), SessionsError> {
        if payload.is_empty() {
            if self.retained.remove(&topic).is_some() {
                self.retained_t.apply(&[], &[topic.into_bytes()])?;
                turn.wrote = true;
            }
            return Ok(());
        }
        let rec = RetainedRecord {
            qos,
            stored_ms: now_ms(),
            owner,
            payload: payload.to_vec(),
        };
        self.retained_t
            .apply(&[(topic.as_bytes().to_vec(), rec.encode())], &[])?;
        self.retained.insert(topic, qos);
        turn.wrote = true;
        Ok(())
    }

    /// Queue one message for `id`, applying the session's limits.
    fn enqueue(
        &mut self,
        id: &str,
        topic: &str,
        qos: u8,
        retained: bool,
        payload: &[u8],
        turn: &mut Turn,
    ) -> Result<(), SessionsError> {
        let size = (topic.len() + payload.len()) as u64;
        let (max_n, max_b) = (self.cfg.max_queued_messages, self.cfg.max_queued_bytes);
        if size > max_b {
            self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        loop {
            let Some(s) = self.sessions.get(id) else {
                return Ok(());
            };
            if s.count < max_n && s.bytes + size <= max_b {
                break;
            }
            match self.cfg.when_full {
                WhenFull::DropNew => {
                    self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                WhenFull::DropOldest => {
                    let prefix = queue_prefix(id);
                    let Some((k, _)) = self.queue_t.scan_prefix_from(&prefix, &prefix, 1)?.pop()
                    else {
                        break;
                    };
                    let (_, seq) = parse_queue_key(&k).map_err(SessionsError::Store)?;
                    self.remove_queued(id, seq)?;
                    self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let Some(s) = self.sessions.get_mut(id) else {
            return Ok(());
        };
        let seq = s.next_seq;
        s.next_seq += 1;
        s.count += 1;
        s.bytes += size;
        self.total_count += 1;
        self.total_bytes += size as i64;
        let q = Queued {
            qos,
            released: false,
            retained,
            enqueued_ms: now_ms(),
            topic: topic.to_string(),
            payload: payload.to_vec(),
        };
        self.queue_t
            .apply(&[(queue_key(id, seq), q.encode())], &[])?;
        turn.wrote = true;
        turn.notify.insert(id.to_string());
        Ok(())
    }

    /// Remove one queued message (acknowledged, expired or dropped); whether it was there.
    /// Not flushed: a crash before the next flush delivers it again (at least once).
    fn remove_queued(&mut self, id: &str, seq: u64) -> Result<bool, SessionsError> {
        let k = queue_key(id, seq);
        let Some(v) = self.queue_t.get(&k)? else {
            return Ok(false);
        };
        self.queue_t.apply(&[], &[k])?;
        let size = v.len().saturating_sub(QUEUED_HEADER) as u64;
        if let Some(s) = self.sessions.get_mut(id) {
            s.count = s.count.saturating_sub(1);
            s.bytes = s.bytes.saturating_sub(size);
        }
        self.total_count -= 1;
        self.total_bytes -= size as i64;
        Ok(true)
    }

    fn fetch(&mut self, id: &str, epoch: u64, after: u64, max: usize) -> Result<(), SessionsError> {
        let Some(s) = self.sessions.get_mut(id) else {
            return Ok(());
        };
        let Some((e, tx)) = s.online.clone() else {
            return Ok(());
        };
        if e != epoch {
            return Ok(());
        }
        s.more_sent = false;
        let prefix = queue_prefix(id);
        let max_age = self.cfg.max_message_age.as_millis() as u64;
        let now = now_ms();
        let mut out = Vec::new();
        let mut from = queue_key(id, after.saturating_add(1));
        let mut expired = Vec::new();
        'read: loop {
            let entries = self.queue_t.scan_prefix_from(&prefix, &from, max.max(1))?;
            let done = entries.len() < max.max(1);
            for (k, v) in entries {
                let (_, seq) = parse_queue_key(&k).map_err(SessionsError::Store)?;
                from = queue_key(id, seq.saturating_add(1));
                let msg = Queued::decode(&v).map_err(SessionsError::Store)?;
                if !msg.released && now.saturating_sub(msg.enqueued_ms) > max_age {
                    expired.push(seq);
                    continue;
                }
                out.push(Delivery {
                    seq,
                    msg,
                    dup: false,
                });
                if out.len() >= max {
                    break 'read;
                }
            }
            if done {
                break;
            }
        }
        for seq in expired {
            if self.remove_queued(id, seq)? {
                self.stats.dropped_expired.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(s) = self.sessions.get_mut(id) {
            for d in &mut out {
                d.dup = d.seq <= s.sent_through;
                s.sent_through = s.sent_through.max(d.seq);
            }
        }
        self.stats
            .delivered
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        let _ = tx.send(ToConn::Batch(out));
        Ok(())
    }

    fn sweep(&mut self, turn: &mut Turn) {
        if self.cfg.session_expiry.is_zero() {
            return;
        }
        let limit = self.cfg.session_expiry.as_millis() as u64;
        let now = now_ms();
        let gone: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.online.is_none()
                    && s.rec
                        .disconnected_ms
                        .is_some_and(|t| now.saturating_sub(t) > limit)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            match self.delete_session(&id) {
                Ok(()) => {
                    turn.wrote = true;
                    self.stats.sessions_expired.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(session = %id, "persistent session expired (sessions.session_expiry)");
                }
                Err(e) => {
                    tracing::error!(session = %id, error = %e, "cannot delete an expired session")
                }
            }
        }
    }
}
