//! The durable uplink queue: "PUBACK means on disk".
//!
//! One owner thread holds the queue. Appends from every connection are collected and made
//! durable together (group commit: one flush for everything that arrived meanwhile) before
//! any of their callers is answered. The forwarder reads in sequence order and acknowledges
//! what the cloud has acknowledged.
//!
//! Removals are not flushed on their own account for every batch: a removal lost in a crash
//! only means a message is sent again (at-least-once). They become durable with the next
//! flush of any kind (an append's group commit, a sent mark, sled's own background flush
//! every 500 ms), and the owner flushes as soon as `removals_per_flush` of them (the
//! forwarder passes its in-flight window) are not yet durable. So after a crash the cloud may
//! see again at most: the in-flight window, the acknowledgements the forwarder had not yet
//! handed over (under half a window), and the un-flushed removals (under one window plus the
//! last batch of commands): about three windows in the worst case.
//!
//! The sent mark ([`QueueHandle::request_sent_mark`]) is the forwarder's reservation: nothing
//! beyond the durable mark is ever sent, so after a crash every message up to it counts as a
//! possible duplicate. The forwarder requests it ahead of use and does not wait for it unless
//! it has caught up with it; the owner flushes whenever a mark is pending and then publishes
//! it on [`QueueHandle::sent_durable`].

use crate::store::{Log, Store, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

const RECORD_V1: u8 = 1;
/// Most commands handled per group commit.
const MAX_BATCH: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Refuse new messages (the device's PUBLISH is not acknowledged: it keeps it).
    Refuse,
    /// Make room by deleting the oldest queued messages (counted as dropped).
    DropOldest,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("uplink queue is full ({used} of {quota} bytes)")]
    Full { used: u64, quota: u64 },
    #[error("message of {0} bytes is larger than the whole queue quota")]
    TooLarge(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the uplink queue has stopped")]
    Stopped,
    #[error("corrupt queue record {seq}: {reason}")]
    Corrupt { seq: u64, reason: String },
}

/// A record read back from the queue: (sequence, the message or why it is unreadable, bytes).
pub type QueuedRecord = (u64, Result<Message, String>, usize);

/// One device message on its way to the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub device: String,
    /// The local topic it was published on.
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    /// Milliseconds since the Unix epoch.
    pub enqueued_ms: u64,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut v =
            Vec::with_capacity(16 + self.device.len() + self.topic.len() + self.payload.len());
        v.push(RECORD_V1);
        v.extend_from_slice(&self.enqueued_ms.to_be_bytes());
        v.push(self.qos);
        v.extend_from_slice(&(self.device.len() as u16).to_be_bytes());
        v.extend_from_slice(self.device.as_bytes());
        v.extend_from_slice(&(self.topic.len() as u16).to_be_bytes());
        v.extend_from_slice(self.topic.as_bytes());
        v.extend_from_slice(&self.payload);
        v
    }

    pub fn decode(b: &[u8]) -> Result<Message, String> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
            if b.len() < n {
                return Err("truncated".into());
            }
            let (h, t) = b.split_at(n);
            *b = t;
            Ok(h)
        }
        let mut b = b;
        let version = take(&mut b, 1)?[0];
        if version != RECORD_V1 {
            return Err(format!("unknown record version {version}"));
        }
        let ts = u64::from_be_bytes(take(&mut b, 8)?.try_into().map_err(|_| "ts")?);
        let qos = take(&mut b, 1)?[0];
        let dl = u16::from_be_bytes(take(&mut b, 2)?.try_into().map_err(|_| "dl")?) as usize;
        let device = String::from_utf8(take(&mut b, dl)?.to_vec()).map_err(|e| e.to_string())?;
        let tl = u16::from_be_bytes(take(&mut b, 2)?.try_into().map_err(|_| "tl")?) as usize;
        let topic = String::from_utf8(take(&mut b, tl)?.to_vec()).map_err(|e| e.to_string())?;
        Ok(Message {
            device,
            topic,
            payload: Bytes::copy_from_slice(b),
            qos,
            enqueued_ms: ts,
        })
    }
}

/// Counters shared with metrics and the forwarder.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub depth: AtomicU64,
    pub bytes: AtomicU64,
    pub appended: AtomicU64,
    pub acked: AtomicU64,
    pub refused: AtomicU64,
    pub dropped: AtomicU64,
    pub expired: AtomicU64,
    pub group_commits: AtomicU64,
    /// Removals applied but not yet flushed (an upper bound: sled also flushes by itself).
    pub unflushed_removals: AtomicU64,
}

enum Command {
    Append {
        msgs: Vec<Message>,
        reply: oneshot::Sender<Result<(), QueueError>>,
    },
    /// The cloud acknowledged these; `expired` ones were skipped for age.
    Remove { seqs: Vec<u64>, expired: bool },
    /// Messages up to this sequence number may be published to the cloud (to count resends
    /// after a crash). Published on the `sent_durable` watch once flushed.
    SentMark(u64),
    /// Flush and stop (shutdown); later commands are refused.
    Stop,
}

const SENT_MARK_KEY: &str = "uplink_sent_mark";

/// Handle to the queue owner: append (durably) and acknowledge; read through `reader()`.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::Sender<Command>,
    store: Store,
    log: Log,
    stats: Arc<QueueStats>,
    /// Highest sequence number made durable so far (0: none).
    durable: watch::Receiver<u64>,
    /// Highest sent mark made durable so far.
    sent_durable: watch::Receiver<u64>,
}

impl QueueHandle {
    /// Open the queue in `store` and start its owner thread. At most `removals_per_flush`
    /// removals are left un-flushed (the forwarder passes its in-flight window).
    pub fn spawn(
        store: Store,
        quota: u64,
        when_full: WhenFull,
        removals_per_flush: u64,
    ) -> Result<(QueueHandle, std::thread::JoinHandle<()>), QueueError> {
        let log = store.log("uplink")?;
        let (depth, bytes) = log.usage()?;
        let last = log.last_seq()?.unwrap_or(0);
        let stats = Arc::new(QueueStats::default());
        stats.depth.store(depth, Ordering::Relaxed);
        stats.bytes.store(bytes, Ordering::Relaxed);
        let (durable_tx, durable_rx) = watch::channel(last);
        let mark = store.meta_u64(SENT_MARK_KEY)?.unwrap_or(0);
        let (sent_tx, sent_rx) = watch::channel(mark);
        let (tx, mut rx) = mpsc::channel::<Command>(1024);
        let handle = QueueHandle {
            tx,
            store: store.clone(),
            log: log.clone(),
            stats: stats.clone(),
            durable: durable_rx,
            sent_durable: sent_rx,
        };
        let join = std::thread::Builder::new()
            .name("outpost-queue".into())
            .spawn(move || {
                let mut owner = Owner {
                    store,
                    log,
                    stats,
                    next: last + 1,
                    quota,
                    when_full,
                    removals_per_flush: removals_per_flush.max(1),
                    unflushed_removals: 0,
                    mark,
                    mark_pending: None,
                    sent_durable: sent_tx,
                };
                let mut batch = Vec::new();
                let mut stop = false;
                while let Some(first) = rx.blocking_recv() {
                    batch.push(first);
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                    stop |= owner.handle(std::mem::take(&mut batch), &durable_tx);
                    if stop {
                        break;
                    }
                }
                if let Err(e) = owner.store.flush() {
                    tracing::error!(error = %e, "queue flush at shutdown failed");
                }
            })
            .map_err(|e| QueueError::Store(StoreError::Db(e.to_string())))?;
        Ok((handle, join))
    }

    /// Append messages; returns once they are on disk.
    pub async fn append(&self, msgs: Vec<Message>) -> Result<(), QueueError> {
        if msgs.is_empty() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Append { msgs, reply })
            .await
            .map_err(|_| QueueError::Stopped)?;
        rx.await.map_err(|_| QueueError::Stopped)?
    }

    /// Ask for messages up to `seq` to be allowed out: the mark is recorded and flushed, then
    /// published on [`Self::sent_durable`]. Nothing beyond the durable mark may be sent: after
    /// a crash, the forwarder counts every message up to it as a possible duplicate.
    pub async fn request_sent_mark(&self, seq: u64) {
        let _ = self.tx.send(Command::SentMark(seq)).await;
    }

    /// Follows the highest durable sent mark.
    pub fn sent_durable(&self) -> watch::Receiver<u64> {
        self.sent_durable.clone()
    }

    /// The sent mark as persisted by the previous run.
    pub fn sent_mark(&self) -> u64 {
        self.store
            .meta_u64(SENT_MARK_KEY)
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Ask the owner to flush and stop (at shutdown, once the session has stopped).
    pub async fn stop(&self) {
        let _ = self.tx.send(Command::Stop).await;
    }

    pub async fn remove(&self, seqs: Vec<u64>, expired: bool) {
        if !seqs.is_empty() {
            let _ = self.tx.send(Command::Remove { seqs, expired }).await;
        }
    }

    /// Up to `limit` durable messages from `from` on.
    pub fn read_from(&self, from: u64, limit: usize) -> Result<Vec<QueuedRecord>, QueueError> {
        let durable = *self.durable.borrow();
        Ok(self
            .log
            .read_from(from, limit)?
            .into_iter()
            .filter(|(seq, _)| *seq <= durable)
            .map(|(seq, raw)| {
                let n = raw.len();
                (seq, Message::decode(&raw), n)
            })
            .collect())
    }

    pub fn first_seq(&self) -> Result<Option<u64>, QueueError> {
        Ok(self.log.first_seq()?)
    }

    /// Age of the oldest queued message.
    pub fn oldest_age_ms(&self) -> u64 {
        match self.log.read_from(0, 1) {
            Ok(v) => v
                .first()
                .and_then(|(_, raw)| Message::decode(raw).ok())
                .map(|m| now_ms().saturating_sub(m.enqueued_ms))
                .unwrap_or(0),
            Err(_) => 0,
        }
    }

    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    /// Follows the highest durable sequence number (wakes the forwarder).
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.clone()
    }
}

struct Owner {
    store: Store,
    log: Log,
    stats: Arc<QueueStats>,
    next: u64,
    quota: u64,
    when_full: WhenFull,
    /// Flush once this many removals are not yet durable.
    removals_per_flush: u64,
    unflushed_removals: u64,
    /// The sent mark recorded (maybe not yet flushed).
    mark: u64,
    /// A sent mark recorded but not yet published as durable.
    mark_pending: Option<u64>,
    sent_durable: watch::Sender<u64>,
}

impl Owner {
    /// Handle one batch; returns true when told to stop.
    fn handle(&mut self, cmds: Vec<Command>, durable: &watch::Sender<u64>) -> bool {
        let mut stop = false;
        let mut replies = Vec::new();
        let mut wrote = false;
        for cmd in cmds {
            match cmd {
                Command::Append { msgs, reply } => {
                    let r = self.append(msgs);
                    wrote |= r.is_ok();
                    replies.push((reply, r));
                }
                Command::Remove { seqs, expired } => {
                    self.remove(&seqs, expired);
                    self.unflushed_removals += seqs.len() as u64;
                }
                Command::Stop => stop = true,
                // The mark only grows; a request at or below it is already satisfied
                // (re-published in case it is a retry after a failed flush).
                Command::SentMark(seq) if seq <= self.mark => {
                    self.mark_pending = Some(self.mark);
                }
                Command::SentMark(seq) => match self.store.set_meta_u64(SENT_MARK_KEY, seq) {
                    Ok(()) => {
                        self.mark = seq;
                        self.mark_pending = Some(seq);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot record the sent mark"),
                },
            }
        }
        // Appends and sent marks are flushed now; removals only once enough are pending (a
        // lost removal is a resend, bounded by `removals_per_flush`).
        let flush = wrote
            || self.mark_pending.is_some()
            || self.unflushed_removals >= self.removals_per_flush;
        if flush {
            // Group commit: one flush for every append of this batch (and everything else).
            if let Err(e) = self.store.flush() {
                tracing::error!(error = %e, "uplink queue flush failed");
                for (reply, _) in replies {
                    let _ = reply.send(Err(QueueError::Store(StoreError::Db(e.to_string()))));
                }
                return stop;
            }
            self.unflushed_removals = 0;
            if let Some(mark) = self.mark_pending.take() {
                self.sent_durable.send_if_modified(|m| {
                    let newer = mark > *m;
                    *m = (*m).max(mark);
                    newer
                });
            }
            if wrote {
                self.stats.group_commits.fetch_add(1, Ordering::Relaxed);
                durable.send_replace(self.next - 1);
            }
        }
        self.stats
            .unflushed_removals
            .store(self.unflushed_removals, Ordering::Relaxed);
        for (reply, r) in replies {
            let _ = reply.send(r);
        }
        stop
    }

    fn append(&mut self, msgs: Vec<Message>) -> Result<(), QueueError> {
        let records: Vec<Vec<u8>> = msgs.iter().map(Message::encode).collect();
        let incoming: u64 = records.iter().map(|r| r.len() as u64).sum();
        if incoming > self.quota {
            self.stats
                .refused
                .fetch_add(msgs.len() as u64, Ordering::Relaxed);
            return Err(QueueError::TooLarge(incoming));
        }
        let used = self.stats.bytes.load(Ordering::Relaxed);
        if used + incoming > self.quota {
            match self.when_full {
                WhenFull::Refuse => {
                    self.stats
                        .refused
                        .fetch_add(msgs.len() as u64, Ordering::Relaxed);
                    return Err(QueueError::Full {
                        used,
                        quota: self.quota,
                    });
                }
                WhenFull::DropOldest => self.drop_oldest(used + incoming - self.quota)?,
            }
        }
        self.log.append(self.next, &records)?;
        self.next += records.len() as u64;
        self.stats
            .depth
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        self.stats.bytes.fetch_add(incoming, Ordering::Relaxed);
        self.stats
            .appended
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn drop_oldest(&mut self, mut need: u64) -> Result<(), QueueError> {
        let mut dropped = 0u64;
        while need > 0 {
            let head = self.log.read_from(0, 256)?;
            if head.is_empty() {
                break;
            }
            let mut seqs = Vec::new();
            for (seq, raw) in head {
                seqs.push(seq);
                need = need.saturating_sub(raw.len() as u64);
                if need == 0 {
                    break;
                }
            }
            dropped += self.remove_counted(&seqs)?;
        }
        if dropped > 0 {
            self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            tracing::warn!(
                dropped,
                "uplink queue full: dropped the oldest messages (policy drop-oldest)"
            );
        }
        Ok(())
    }

    /// Remove and account; returns how many were really present.
    fn remove_counted(&mut self, seqs: &[u64]) -> Result<u64, QueueError> {
        let sizes = self.log.take(seqs)?;
        let n = sizes.len() as u64;
        let bytes: u64 = sizes.iter().sum();
        self.stats.depth.fetch_sub(n, Ordering::Relaxed);
        self.stats.bytes.fetch_sub(bytes, Ordering::Relaxed);
        Ok(n)
    }

    fn remove(&mut self, seqs: &[u64], expired: bool) {
        match self.remove_counted(seqs) {
            Ok(n) if expired => {
                self.stats.expired.fetch_add(n, Ordering::Relaxed);
            }
            Ok(n) => {
                self.stats.acked.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "cannot remove acknowledged messages"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: usize, size: usize) -> Message {
        Message {
            device: "d1".into(),
            topic: format!("devices/d1/telemetry/{i}"),
            payload: Bytes::from(vec![b'x'; size]),
            qos: 1,
            enqueued_ms: 1,
        }
    }

    #[test]
    fn record_round_trips_and_garbage_is_an_error() {
        let m = msg(7, 10);
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        assert!(Message::decode(&[]).is_err());
        assert!(Message::decode(&[9, 0, 0]).is_err());
        assert!(Message::decode(&m.encode()[..12]).is_err());
    }

    #[tokio::test]
    async fn appended_messages_are_durable_and_ordered_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let (q, join) = QueueHandle::spawn(store, 1 << 20, WhenFull::Refuse, 100).unwrap();
            q.append((0..5).map(|i| msg(i, 10)).collect())
                .await
                .unwrap();
            q.append(vec![msg(5, 10)]).await.unwrap();
            q.remove(vec![1, 2], false).await;
            drop(q);
            join.join().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let (q, _join) = QueueHandle::spawn(store, 1 << 20, WhenFull::Refuse, 100).unwrap();
        let got: Vec<u64> = q
            .read_from(0, 100)
            .unwrap()
            .into_iter()
            .map(|(s, _, _)| s)
            .collect();
        assert_eq!(got, vec![3, 4, 5, 6]);
        assert_eq!(q.stats().depth.load(Ordering::Relaxed), 4);
        q.append(vec![msg(9, 1)]).await.unwrap();
        assert_eq!(
            q.read_from(7, 10).unwrap().len(),
            1,
            "sequence continues after reopen"
        );
    }

    #[tokio::test]
    async fn full_queue_refuses_under_refuse_policy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let one = msg(0, 100).encode().len() as u64;
        let (q, _j) = QueueHandle::spawn(store, one * 3, WhenFull::Refuse, 100).unwrap();
        q.append((0..3).map(|i| msg(i, 100)).collect())
            .await
            .unwrap();
        assert!(matches!(
            q.append(vec![msg(3, 100)]).await,
            Err(QueueError::Full { .. })
        ));
        assert_eq!(q.stats().refused.load(Ordering::Relaxed), 1);
        assert_eq!(q.stats().depth.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn full_queue_drops_oldest_under_drop_policy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let one = msg(0, 100).encode().len() as u64;
        let (q, _j) = QueueHandle::spawn(store, one * 3, WhenFull::DropOldest, 100).unwrap();
        q.append((0..3).map(|i| msg(i, 100)).collect())
            .await
            .unwrap();
        q.append(vec![msg(3, 100), msg(4, 100)]).await.unwrap();
        let seqs: Vec<u64> = q
            .read_from(0, 10)
            .unwrap()
            .into_iter()
            .map(|(s, _, _)| s)
            .collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        assert_eq!(q.stats().dropped.load(Ordering::Relaxed), 2);
        // A late acknowledgement of a dropped message does not corrupt the accounting.
        q.remove(vec![1, 3], false).await;
        q.append(vec![msg(5, 1)]).await.unwrap();
        assert_eq!(q.stats().depth.load(Ordering::Relaxed), 3);
    }

    /// Waits until the owner has handled everything sent so far (commands are handled in
    /// order; `acked` counts removals).
    async fn settle(q: &QueueHandle, acked: u64) {
        for _ in 0..500 {
            if q.stats().acked.load(Ordering::Relaxed) >= acked {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        panic!("the owner did not handle the removals");
    }

    #[tokio::test]
    async fn removals_are_flushed_once_per_window_and_never_pile_up() {
        const WINDOW: u64 = 10;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (q, _j) = QueueHandle::spawn(store, 1 << 20, WhenFull::Refuse, WINDOW).unwrap();
        q.append((0..100).map(|i| msg(i, 10)).collect())
            .await
            .unwrap();
        let unflushed = || q.stats().unflushed_removals.load(Ordering::Relaxed);
        let mut seen_pending = false;
        let mut seen_flush = false;
        let mut prev = 0;
        for first in (1..=60u64).step_by(3) {
            q.remove((first..first + 3).collect(), false).await;
            settle(&q, first + 2).await;
            let now = unflushed();
            assert!(
                now < WINDOW,
                "{now} removals left un-flushed (bound {WINDOW})"
            );
            seen_pending |= now > 0;
            seen_flush |= now < prev;
            prev = now;
        }
        assert!(
            seen_pending,
            "removals alone do not force a flush each time"
        );
        assert!(seen_flush, "removals are flushed");
        // An append's group commit makes the pending removals durable too.
        q.remove(vec![61], false).await;
        settle(&q, 61).await;
        assert!(unflushed() > 0);
        q.append(vec![msg(100, 10)]).await.unwrap();
        assert_eq!(unflushed(), 0);
    }

    #[tokio::test]
    async fn sent_mark_is_published_once_durable_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let (q, join) = QueueHandle::spawn(store, 1 << 20, WhenFull::Refuse, 100).unwrap();
            let mut sent = q.sent_durable();
            assert_eq!(*sent.borrow_and_update(), 0);
            q.request_sent_mark(400).await;
            q.request_sent_mark(200).await;
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                sent.wait_for(|m| *m >= 400),
            )
            .await
            .unwrap()
            .unwrap();
            assert_eq!(q.sent_mark(), 400, "the mark never goes back");
            drop(q);
            join.join().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let (q, _j) = QueueHandle::spawn(store, 1 << 20, WhenFull::Refuse, 100).unwrap();
        assert_eq!(q.sent_mark(), 400);
        assert_eq!(*q.sent_durable().borrow(), 400);
    }
}
