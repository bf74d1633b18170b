//! The durable uplink queue: "PUBACK means on disk".
//!
//! One owner thread holds the queue. Appends from every connection are collected and made
//! durable together (group commit: one flush for everything that arrived meanwhile) before
//! any of their callers is answered. The forwarder reads in sequence order and acknowledges
//! what the cloud has acknowledged.
//!
//! ## Layout
//!
//! Every message has a sequence number. The messages of one group commit are stored as one
//! *chunk* (one store record, keyed by its first sequence number; at most [`CHUNK_MAX`]
//! messages or [`CHUNK_MAX_BYTES`]), so that appending, reading and deleting cost one store
//! operation per chunk rather than per message. A record written by an older version (one
//! message per record) reads as a chunk of one.
//!
//! Acknowledgements do not touch the chunks: the owner keeps `acked_through`, the sequence
//! number up to which everything is gone (acknowledged, expired or dropped), and the few
//! messages gone above it (acknowledged out of order, at most an in-flight window). It
//! records `acked_through` in the store and deletes a chunk once all of it is at or below
//! it. A gap in the sequence numbers (a chunk that is not there) counts as gone.
//!
//! ## What a crash can repeat
//!
//! Removals are not flushed on their own account for every batch: a removal lost in a crash
//! only means a message is sent again (at-least-once). They become durable with the next
//! flush of any kind (an append's group commit, an awaited sent mark, sled's own background
//! flush every 500 ms), and the owner flushes as soon as `removals_per_flush` of them (the
//! forwarder passes its in-flight window) are not yet durable. So after a crash the cloud may
//! see again at most: the in-flight window, the acknowledgements the forwarder had not yet
//! handed over (under half a window), and the un-flushed removals (under one window plus the
//! last batch of commands): about three windows in the worst case.
//!
//! The sent mark ([`QueueHandle::request_sent_mark`]) is the forwarder's reservation: nothing
//! beyond the durable mark is ever sent, so after a crash every message up to it counts as a
//! possible duplicate. The forwarder requests it ahead of use; such a request rides on the
//! next flush made for another reason (in a drain, the removals' flush a window later), and
//! only a request the forwarder is waiting on (`urgent`) is flushed at once. Either way the
//! owner publishes it on [`QueueHandle::sent_durable`] once it is on disk.

use crate::store::{Log, Record, Store, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

const RECORD_V1: u8 = 1;
/// First byte of a chunk (a record of the old layout starts with `RECORD_V1`).
const CHUNK_V1: u8 = 2;
/// Most commands handled per group commit.
const MAX_BATCH: usize = 4096;
/// Most messages in one chunk.
pub const CHUNK_MAX: usize = 4096;
/// A chunk is closed once it holds this many bytes.
pub const CHUNK_MAX_BYTES: usize = 1 << 20;

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

/// A message read back from the queue: its sequence number, the chunk it is in (shared with
/// the store's cache) and where in the chunk its bytes are, or why it cannot be read. Decode
/// it with [`MessageRef::decode`]`(&chunk[range])`.
pub type QueuedRecord = (u64, Result<(Record, Range<usize>), String>);

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
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut v);
        v
    }

    pub fn encoded_len(&self) -> usize {
        14 + self.device.len() + self.topic.len() + self.payload.len()
    }

    fn encode_into(&self, v: &mut Vec<u8>) {
        v.push(RECORD_V1);
        v.extend_from_slice(&self.enqueued_ms.to_be_bytes());
        v.push(self.qos);
        v.extend_from_slice(&(self.device.len() as u16).to_be_bytes());
        v.extend_from_slice(self.device.as_bytes());
        v.extend_from_slice(&(self.topic.len() as u16).to_be_bytes());
        v.extend_from_slice(self.topic.as_bytes());
        v.extend_from_slice(&self.payload);
    }

    pub fn decode(b: &[u8]) -> Result<Message, String> {
        let m = MessageRef::decode(b)?;
        Ok(Message {
            device: m.device.to_string(),
            topic: m.topic.to_string(),
            payload: Bytes::copy_from_slice(m.payload),
            qos: m.qos,
            enqueued_ms: m.enqueued_ms,
        })
    }
}

/// A queued message decoded in place (the forwarder's view: no copies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef<'a> {
    pub device: &'a str,
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    pub enqueued_ms: u64,
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if b.len() < n {
        return Err("truncated".into());
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Ok(h)
}

impl<'a> MessageRef<'a> {
    pub fn decode(b: &'a [u8]) -> Result<MessageRef<'a>, String> {
        let mut b = b;
        let version = take(&mut b, 1)?[0];
        if version != RECORD_V1 {
            return Err(format!("unknown record version {version}"));
        }
        let ts = u64::from_be_bytes(take(&mut b, 8)?.try_into().map_err(|_| "ts")?);
        let qos = take(&mut b, 1)?[0];
        let dl = u16::from_be_bytes(take(&mut b, 2)?.try_into().map_err(|_| "dl")?) as usize;
        let device = std::str::from_utf8(take(&mut b, dl)?).map_err(|e| e.to_string())?;
        let tl = u16::from_be_bytes(take(&mut b, 2)?.try_into().map_err(|_| "tl")?) as usize;
        let topic = std::str::from_utf8(take(&mut b, tl)?).map_err(|e| e.to_string())?;
        Ok(MessageRef {
            device,
            topic,
            payload: b,
            qos,
            enqueued_ms: ts,
        })
    }
}

/// The messages of a chunk: how many it says it holds, and where each one's bytes are (as
/// far as they can be read: a damaged chunk yields fewer ranges than its count).
fn chunk_entries(chunk: &[u8]) -> (u64, Vec<Range<usize>>) {
    if chunk.first() != Some(&CHUNK_V1) {
        // One message per record (older layout), or a damaged chunk header.
        return (1, std::iter::once(0..chunk.len()).collect());
    }
    let mut at = 1;
    let Some(count) = chunk
        .get(1..5)
        .and_then(|c| <[u8; 4]>::try_from(c).ok())
        .map(u32::from_be_bytes)
    else {
        return (1, Vec::new());
    };
    at += 4;
    // Every entry takes at least its 4-byte length: a damaged count cannot make this
    // allocate more than the chunk could hold.
    let room = (chunk.len() - at) / 4;
    let mut out = Vec::with_capacity(usize::try_from(count).map_or(room, |c| c.min(room)));
    for _ in 0..count {
        let Some(len) = chunk
            .get(at..at + 4)
            .and_then(|c| <[u8; 4]>::try_from(c).ok())
            .and_then(|l| usize::try_from(u32::from_be_bytes(l)).ok())
        else {
            break;
        };
        at += 4;
        // Checked: on 32-bit targets `at + len` overflows for a damaged length near
        // u32::MAX, and the wrapped sum would pass the bounds check.
        let Some(end) = at.checked_add(len).filter(|&end| end <= chunk.len()) else {
            break;
        };
        out.push(at..end);
        at = end;
    }
    (u64::from(count.max(1)), out)
}

/// What a reader keeps between reads (see [`QueueHandle::read_cached`]).
#[derive(Default)]
pub struct ReadCache {
    /// The last chunk read.
    chunk: Option<Chunk>,
}

/// Threads that run the owner's group commits (at most `store`'s overlapping flushes).
const FLUSHERS: usize = 4;
/// Their stack: they only call `Store::flush`.
const FLUSHER_STACK: usize = 256 * 1024;

/// Where durable progress is published.
struct Published {
    /// Highest sequence number on disk.
    durable: watch::Sender<u64>,
    /// Highest sent mark on disk.
    sent: watch::Sender<u64>,
}

/// One batch's group commit, handed from the owner to a flusher.
struct FlushJob {
    /// Answered once the flush is done (failed appends fail, the rest take its outcome).
    replies: Vec<Reply>,
    /// A sent mark to publish once flushed.
    mark: Option<u64>,
    /// The highest sequence number this batch wrote, if it wrote.
    durable: Option<u64>,
}

impl FlushJob {
    fn run(self, store: &Store, published: &Published, stats: &QueueStats) {
        let FlushJob {
            mut replies,
            mark,
            durable,
        } = self;
        match store.flush() {
            Ok(()) => {
                // Flushes may end out of order: one that ends covers every write made before
                // it started, so publishing the highest seen is exact.
                if let Some(mark) = mark {
                    published.sent.send_if_modified(|m| {
                        let newer = mark > *m;
                        *m = (*m).max(mark);
                        newer
                    });
                }
                if let Some(seq) = durable {
                    stats.group_commits.fetch_add(1, Ordering::Relaxed);
                    published.durable.send_if_modified(|d| {
                        let newer = seq > *d;
                        *d = (*d).max(seq);
                        newer
                    });
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "uplink queue flush failed");
                let reason = e.to_string();
                for (_, r) in replies.iter_mut() {
                    if r.is_ok() {
                        *r = Err(QueueError::Store(StoreError::Db(reason.clone())));
                    }
                }
            }
        }
        for (reply, r) in replies {
            let _ = reply.send(r);
        }
    }
}

/// A flusher thread: run handed-over group commits until the owner is gone.
fn flusher(
    store: &Store,
    jobs: &Mutex<std::sync::mpsc::Receiver<FlushJob>>,
    published: &Published,
    stats: &QueueStats,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job.run(store, published, stats),
            Err(_) => return,
        }
    }
}

/// An append's answer, held until the group commit.
type Reply = (
    oneshot::Sender<Result<(), QueueError>>,
    Result<(), QueueError>,
);

/// A stored chunk, parsed: its first sequence number, bytes, message count and where each
/// readable message is.
struct Chunk {
    key: u64,
    bytes: Record,
    count: u64,
    entries: Vec<Range<usize>>,
}

impl Chunk {
    fn parse(key: u64, bytes: Record) -> Chunk {
        let (count, entries) = chunk_entries(&bytes);
        Chunk {
            key,
            bytes,
            count,
            entries,
        }
    }

    /// The sequence number after its last message.
    fn end(&self) -> u64 {
        self.key + self.count
    }

    /// Message `seq` (which must be in this chunk) as the reader hands it out.
    fn record(&self, seq: u64) -> Result<(Record, Range<usize>), String> {
        // try_from, not `as`: on 32-bit targets a far-off `seq` must not wrap onto an entry.
        let index = usize::try_from(seq.wrapping_sub(self.key)).unwrap_or(usize::MAX);
        match self.entries.get(index) {
            Some(r) => Ok((self.bytes.clone(), r.clone())),
            None => Err("damaged chunk".to_string()),
        }
    }
}

/// The chunk that holds `seq`, or else the first one after it.
fn chunk_at_or_after(log: &Log, seq: u64) -> Result<Option<Chunk>, StoreError> {
    if let Some((key, bytes)) = log.record_at_or_before(seq)? {
        let c = Chunk::parse(key, bytes);
        if seq < c.end() {
            return Ok(Some(c));
        }
    }
    Ok(log
        .read_records(seq, 1)?
        .into_iter()
        .next()
        .map(|(key, bytes)| Chunk::parse(key, bytes)))
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
    /// Every message up to this sequence number is gone.
    pub acked_through: AtomicU64,
    /// Chunks written.
    pub chunks: AtomicU64,
}

enum Command {
    Append {
        msgs: Vec<Message>,
        reply: oneshot::Sender<Result<(), QueueError>>,
    },
    /// The cloud acknowledged these (sequence number, size as read); `expired` ones were
    /// skipped for age or because they cannot be sent.
    Remove {
        items: Vec<(u64, usize)>,
        expired: bool,
    },
    /// Messages up to `seq` may be published to the cloud (to count resends after a crash).
    /// Published on the `sent_durable` watch once flushed: at once if `urgent` (the forwarder
    /// waits for it), otherwise with the next flush made for any other reason.
    SentMark { seq: u64, urgent: bool },
    /// Flush and stop (shutdown); later commands are refused.
    Stop,
}

const SENT_MARK_KEY: &str = "uplink_sent_mark";
const ACKED_KEY: &str = "uplink_acked_through";

/// Handle to the queue owner: append (durably) and acknowledge; read through `read_from`.
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
        let stats = Arc::new(QueueStats::default());
        let mark = store.meta_u64(SENT_MARK_KEY)?.unwrap_or(0);
        let mut owner = Owner {
            store: store.clone(),
            log: log.clone(),
            stats: stats.clone(),
            next: 1,
            quota,
            when_full,
            removals_per_flush: removals_per_flush.max(1),
            unflushed_removals: 0,
            mark,
            mark_pending: None,
            mark_urgent: false,
            acked_through: store.meta_u64(ACKED_KEY)?.unwrap_or(0),
            acked_written: 0,
            gone_above: BTreeSet::new(),
            head: None,
            chunk: Vec::new(),
            chunk_first: 0,
            chunk_count: 0,
            chunk_failed: false,
        };
        owner.acked_written = owner.acked_through;
        owner.open()?;
        let (durable_tx, durable_rx) = watch::channel(owner.next - 1);
        let (sent_tx, sent_rx) = watch::channel(mark);
        let published = Arc::new(Published {
            durable: durable_tx,
            sent: sent_tx,
        });
        let (tx, mut rx) = mpsc::channel::<Command>(1024);
        let handle = QueueHandle {
            tx,
            store,
            log,
            stats,
            durable: durable_rx,
            sent_durable: sent_rx,
        };
        let join = std::thread::Builder::new()
            .name("outpost-queue".into())
            .spawn(move || {
                // The flushers: the owner hands each batch's group commit to one of them and
                // goes on with the next batch, so flushes overlap (see `Store::flush`).
                let (jobs, job_rx) = std::sync::mpsc::channel::<FlushJob>();
                let job_rx = Arc::new(Mutex::new(job_rx));
                let mut flushers = Vec::new();
                for i in 0..FLUSHERS {
                    let (store, rx, published, stats) = (
                        owner.store.clone(),
                        job_rx.clone(),
                        published.clone(),
                        owner.stats.clone(),
                    );
                    let spawned = std::thread::Builder::new()
                        .name(format!("outpost-flush-{i}"))
                        .stack_size(FLUSHER_STACK)
                        .spawn(move || flusher(&store, &rx, &published, &stats));
                    match spawned {
                        Ok(j) => flushers.push(j),
                        Err(e) => tracing::error!(error = %e, "cannot start a queue flusher"),
                    }
                }
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
                    let (done, job) = owner.handle(std::mem::take(&mut batch));
                    stop |= done;
                    if let Some(job) = job {
                        // No flusher (none could start): flush here.
                        if flushers.is_empty() {
                            job.run(&owner.store, &published, &owner.stats);
                        } else if let Err(std::sync::mpsc::SendError(job)) = jobs.send(job) {
                            job.run(&owner.store, &published, &owner.stats);
                        }
                    }
                    if stop {
                        break;
                    }
                }
                // Every handed-over flush completes (and is answered) before the last one.
                drop(jobs);
                for j in flushers {
                    let _ = j.join();
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
        self.submit(msgs)
            .await?
            .await
            .map_err(|_| QueueError::Stopped)?
    }

    /// Hand messages to the owner without waiting for the flush: the receiver answers once
    /// they are on disk (or refused). Appends are stored in the order they are submitted.
    pub async fn submit(
        &self,
        msgs: Vec<Message>,
    ) -> Result<oneshot::Receiver<Result<(), QueueError>>, QueueError> {
        let (reply, rx) = oneshot::channel();
        if msgs.is_empty() {
            let _ = reply.send(Ok(()));
            return Ok(rx);
        }
        self.tx
            .send(Command::Append { msgs, reply })
            .await
            .map_err(|_| QueueError::Stopped)?;
        Ok(rx)
    }

    /// Ask for messages up to `seq` to be allowed out: the mark is recorded, then published on
    /// [`Self::sent_durable`] once flushed (`urgent`: flushed at once; otherwise with the next
    /// flush made for any reason). Nothing beyond the durable mark may be sent: after a crash,
    /// the forwarder counts every message up to it as a possible duplicate.
    pub async fn request_sent_mark(&self, seq: u64, urgent: bool) {
        let _ = self.tx.send(Command::SentMark { seq, urgent }).await;
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

    /// The messages are gone: acknowledged by the cloud or (`expired`) skipped. Each item is
    /// (sequence number, size as read); one listed twice or already gone counts once.
    pub async fn remove(&self, items: Vec<(u64, usize)>, expired: bool) {
        if !items.is_empty() {
            let _ = self.tx.send(Command::Remove { items, expired }).await;
        }
    }

    /// Up to `limit` durable messages from `from` on, in order (messages already known to be
    /// gone below `from` are skipped).
    pub fn read_from(&self, from: u64, limit: usize) -> Result<Vec<QueuedRecord>, QueueError> {
        self.read_cached(&mut ReadCache::default(), from, limit)
    }

    /// [`Self::read_from`] for a reader that goes on where it stopped: `cache` keeps the last
    /// chunk read and where its messages are, so that reading a chunk a window at a time does
    /// not look it up and parse it again each time.
    pub fn read_cached(
        &self,
        cache: &mut ReadCache,
        from: u64,
        limit: usize,
    ) -> Result<Vec<QueuedRecord>, QueueError> {
        let durable = *self.durable.borrow();
        let from = from.max(self.stats.acked_through.load(Ordering::Acquire) + 1);
        let mut out = Vec::with_capacity(limit.min(1024));
        if limit == 0 || from > durable {
            return Ok(out);
        }
        // The chunk that holds `from`: the cached one if it does (a chunk does not change
        // while it exists, and once deleted everything in it is gone), else from the store;
        // then the ones after it.
        let mut chunk = match cache.chunk.take() {
            Some(c) if c.key <= from && from < c.end() => Some(c),
            _ => chunk_at_or_after(&self.log, from)?,
        };
        while let Some(c) = chunk.take() {
            let first = from.max(c.key);
            let last = c
                .end()
                .min(durable + 1)
                .min(first + (limit - out.len()) as u64);
            for seq in first..last {
                out.push((seq, c.record(seq)));
            }
            let next = c.end();
            cache.chunk = Some(c);
            if out.len() >= limit || next > durable {
                break;
            }
            chunk = chunk_at_or_after(&self.log, next)?;
        }
        Ok(out)
    }

    /// Where the forwarder starts: the first message that is not known to be gone.
    pub fn first_seq(&self) -> Result<Option<u64>, QueueError> {
        Ok(Some(self.stats.acked_through.load(Ordering::Acquire) + 1))
    }

    /// Age of the oldest queued message.
    pub fn oldest_age_ms(&self) -> u64 {
        if self.stats.depth.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let from = self.stats.acked_through.load(Ordering::Acquire) + 1;
        match self.read_from(from, 1) {
            Ok(v) => v
                .first()
                .and_then(|(_, r)| r.as_ref().ok())
                .and_then(|(c, r)| MessageRef::decode(&c[r.clone()]).ok())
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
    /// The forwarder waits for `mark_pending`: flush now.
    mark_urgent: bool,
    /// Everything up to here is gone.
    acked_through: u64,
    /// `acked_through` as last written to the store.
    acked_written: u64,
    /// Gone above `acked_through` (acknowledged out of order).
    gone_above: BTreeSet<u64>,
    /// The oldest chunk in the store: (first sequence number, messages), if known.
    head: Option<(u64, u64)>,
    /// The chunk being built from this batch's appends.
    chunk: Vec<u8>,
    chunk_first: u64,
    chunk_count: u32,
    /// Writing a chunk failed in this batch: none of its appends is acknowledged.
    chunk_failed: bool,
}

impl Owner {
    /// Start-up: settle what is gone, count what is queued, continue the numbering.
    fn open(&mut self) -> Result<(), QueueError> {
        self.next = match self.log.last_record()? {
            Some((key, chunk)) => key + chunk_entries(&chunk).0,
            None => 1,
        }
        .max(self.acked_through + 1);
        self.advance()?;
        let (mut depth, mut bytes) = (0u64, 0u64);
        let mut from = 0;
        loop {
            let chunks = self.log.read_records(from, 64)?;
            if chunks.is_empty() {
                break;
            }
            for (key, chunk) in chunks {
                let (count, entries) = chunk_entries(&chunk);
                for i in 0..count {
                    if key + i > self.acked_through {
                        depth += 1;
                        bytes += entries.get(i as usize).map_or(0, |r| r.len() as u64);
                    }
                }
                from = key + 1;
            }
        }
        self.stats.depth.store(depth, Ordering::Relaxed);
        self.stats.bytes.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Handle one batch; returns true when told to stop, and the group commit to run (its
    /// replies wait for it).
    fn handle(&mut self, cmds: Vec<Command>) -> (bool, Option<FlushJob>) {
        let chunks_before = self.stats.chunks.load(Ordering::Relaxed);
        let mut stop = false;
        let mut replies = Vec::new();
        let mut removed = false;
        for cmd in cmds {
            match cmd {
                Command::Append { msgs, reply } => {
                    let r = self.append(msgs);
                    replies.push((reply, r));
                }
                Command::Remove { items, expired } => {
                    let n = self.remove(&items, expired);
                    self.unflushed_removals += n;
                    removed |= n > 0;
                }
                Command::Stop => stop = true,
                // The mark only grows; a request at or below it is satisfied by the next flush
                // (re-published in case it is a retry after a failed flush).
                Command::SentMark { seq, urgent } if seq <= self.mark => {
                    self.mark_pending = Some(self.mark);
                    self.mark_urgent |= urgent;
                }
                Command::SentMark { seq, urgent } => {
                    match self.store.set_meta_u64(SENT_MARK_KEY, seq) {
                        Ok(()) => {
                            self.mark = seq;
                            self.mark_pending = Some(seq);
                            self.mark_urgent |= urgent;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot record the sent mark"),
                    }
                }
            }
        }
        let mut wrote = self.stats.chunks.load(Ordering::Relaxed) != chunks_before;
        match self.close_chunk() {
            Ok(w) => wrote |= w,
            Err(e) => tracing::error!(error = %e, "cannot write to the uplink queue"),
        }
        if std::mem::take(&mut self.chunk_failed) {
            // Its messages were taken back; the others of this batch are answered the same.
            self.fail_appends(&mut replies, "writing the uplink queue failed");
        }
        if removed {
            if let Err(e) = self.advance() {
                tracing::error!(error = %e, "cannot record acknowledged messages");
            }
        }
        // Appends and awaited sent marks are flushed now; removals only once enough are
        // pending (a lost removal is a resend, bounded by `removals_per_flush`); other marks
        // ride along with whichever comes first.
        let flush = wrote || self.mark_urgent || self.unflushed_removals >= self.removals_per_flush;
        let job = if flush {
            // Group commit: one flush for every append of this batch (and everything else).
            self.unflushed_removals = 0;
            self.mark_urgent = false;
            Some(FlushJob {
                replies,
                mark: self.mark_pending.take(),
                durable: wrote.then_some(self.next - 1),
            })
        } else {
            for (reply, r) in replies {
                let _ = reply.send(r);
            }
            None
        };
        self.stats
            .unflushed_removals
            .store(self.unflushed_removals, Ordering::Relaxed);
        (stop, job)
    }

    /// Answer every accepted append of this batch with `reason` (its chunk is not durable).
    fn fail_appends(&self, replies: &mut [Reply], reason: &str) {
        for (_, r) in replies.iter_mut() {
            if r.is_ok() {
                *r = Err(QueueError::Store(StoreError::Db(reason.to_string())));
            }
        }
    }

    fn append(&mut self, msgs: Vec<Message>) -> Result<(), QueueError> {
        let incoming: u64 = msgs.iter().map(|m| m.encoded_len() as u64).sum();
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
                WhenFull::DropOldest => {
                    // What this batch appended so far must be in the store to be dropped.
                    self.close_chunk()?;
                    self.drop_oldest(used + incoming - self.quota)?;
                }
            }
        }
        for m in &msgs {
            if self.chunk_count as usize >= CHUNK_MAX || self.chunk.len() >= CHUNK_MAX_BYTES {
                self.close_chunk()?;
            }
            if self.chunk_count == 0 {
                self.chunk.clear();
                self.chunk.push(CHUNK_V1);
                self.chunk.extend_from_slice(&0u32.to_be_bytes());
                self.chunk_first = self.next;
            }
            self.chunk
                .extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
            m.encode_into(&mut self.chunk);
            self.chunk_count += 1;
            self.next += 1;
        }
        let n = msgs.len() as u64;
        self.stats.depth.fetch_add(n, Ordering::Relaxed);
        self.stats.bytes.fetch_add(incoming, Ordering::Relaxed);
        self.stats.appended.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Write the chunk being built, if any; true if one was written.
    fn close_chunk(&mut self) -> Result<bool, QueueError> {
        if self.chunk_count == 0 {
            return Ok(false);
        }
        self.chunk[1..5].copy_from_slice(&self.chunk_count.to_be_bytes());
        let r = self.log.insert(self.chunk_first, &self.chunk);
        if r.is_err() {
            // Not stored: its sequence numbers were never given out durably.
            self.chunk_failed = true;
            let n = u64::from(self.chunk_count);
            self.next = self.chunk_first;
            let bytes = self.chunk_payload_bytes();
            self.stats.depth.fetch_sub(n, Ordering::Relaxed);
            self.stats.bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.stats.appended.fetch_sub(n, Ordering::Relaxed);
        }
        self.chunk_count = 0;
        r?;
        self.stats.chunks.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    fn chunk_payload_bytes(&self) -> u64 {
        chunk_entries(&self.chunk)
            .1
            .iter()
            .map(|r| r.len() as u64)
            .sum()
    }

    /// Mark `seq` gone; false if it already was (or never existed).
    fn mark_gone(&mut self, seq: u64) -> bool {
        if seq <= self.acked_through || seq >= self.next || self.gone_above.contains(&seq) {
            return false;
        }
        if seq == self.acked_through + 1 {
            self.acked_through = seq;
            while self.gone_above.remove(&(self.acked_through + 1)) {
                self.acked_through += 1;
            }
        } else {
            self.gone_above.insert(seq);
        }
        true
    }

    /// Returns how many of `items` were still queued.
    fn remove(&mut self, items: &[(u64, usize)], expired: bool) -> u64 {
        let (mut n, mut bytes) = (0u64, 0u64);
        for &(seq, size) in items {
            if self.mark_gone(seq) {
                n += 1;
                bytes += size as u64;
            }
        }
        self.stats.depth.fetch_sub(n, Ordering::Relaxed);
        self.stats.bytes.fetch_sub(bytes, Ordering::Relaxed);
        if expired {
            self.stats.expired.fetch_add(n, Ordering::Relaxed);
        } else {
            self.stats.acked.fetch_add(n, Ordering::Relaxed);
        }
        n
    }

    /// Record `acked_through` and delete the chunks that are entirely gone. A gap before the
    /// oldest chunk (or an empty store) counts as gone.
    fn advance(&mut self) -> Result<(), QueueError> {
        loop {
            let head = match self.head {
                Some(h) => Some(h),
                None => self
                    .log
                    .read_records(0, 1)?
                    .into_iter()
                    .next()
                    .map(|(k, c)| (k, chunk_entries(&c).0)),
            };
            self.head = head;
            let Some((first, count)) = head else {
                // Nothing stored: everything before `next` (and not in a chunk still being
                // built) is gone.
                let upto = if self.chunk_count > 0 {
                    self.chunk_first
                } else {
                    self.next
                };
                self.settle(upto.saturating_sub(1));
                break;
            };
            if first > self.acked_through + 1 {
                self.settle(first - 1);
            }
            if first + count - 1 <= self.acked_through {
                // Recorded before the chunk goes, so that a crash never leaves a chunk
                // missing with `acked_through` below it.
                self.write_acked()?;
                self.log.remove(&[first])?;
                self.head = None;
                continue;
            }
            break;
        }
        self.write_acked()?;
        self.stats
            .acked_through
            .store(self.acked_through, Ordering::Release);
        Ok(())
    }

    /// Everything up to `upto` is gone (a gap in the sequence numbers).
    fn settle(&mut self, upto: u64) {
        if upto > self.acked_through {
            self.acked_through = upto;
            self.gone_above = self.gone_above.split_off(&(upto + 1));
            while self.gone_above.remove(&(self.acked_through + 1)) {
                self.acked_through += 1;
            }
        }
    }

    fn write_acked(&mut self) -> Result<(), QueueError> {
        if self.acked_written != self.acked_through {
            self.store.set_meta_u64(ACKED_KEY, self.acked_through)?;
            self.acked_written = self.acked_through;
        }
        Ok(())
    }

    fn drop_oldest(&mut self, need: u64) -> Result<(), QueueError> {
        let mut need = need;
        let mut dropped = 0u64;
        let mut chunk = chunk_at_or_after(&self.log, self.acked_through + 1)?;
        'outer: while let Some(c) = chunk.take() {
            for seq in c.key.max(self.acked_through + 1)..c.end() {
                let size = c
                    .entries
                    .get((seq - c.key) as usize)
                    .map_or(0, |r| r.len() as u64);
                if self.mark_gone(seq) {
                    dropped += 1;
                    self.stats.depth.fetch_sub(1, Ordering::Relaxed);
                    self.stats.bytes.fetch_sub(size, Ordering::Relaxed);
                    need = need.saturating_sub(size.max(1));
                    if need == 0 {
                        break 'outer;
                    }
                }
            }
            chunk = chunk_at_or_after(&self.log, c.end())?;
        }
        self.advance()?;
        if dropped > 0 {
            self.unflushed_removals += dropped;
            self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            tracing::warn!(
                dropped,
                "uplink queue full: dropped the oldest messages (policy drop-oldest)"
            );
        }
        Ok(())
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

    fn open_queue(dir: &std::path::Path) -> (QueueHandle, std::thread::JoinHandle<()>) {
        let store = Store::open(dir).unwrap();
        QueueHandle::spawn(store, 1 << 20, WhenFull::Refuse, 100).unwrap()
    }

    /// Appends messages `range` (10-byte payloads) in one command.
    async fn fill(q: &QueueHandle, range: std::ops::Range<usize>) {
        q.append(range.map(|i| msg(i, 10)).collect()).await.unwrap();
    }

    /// Removal items for `seqs`, with the sizes read from the queue.
    fn items(q: &QueueHandle, seqs: &[u64]) -> Vec<(u64, usize)> {
        let all = q.read_from(0, 100_000).unwrap();
        seqs.iter()
            .map(|s| {
                let size = all
                    .iter()
                    .find(|(q, _)| q == s)
                    .map_or(0, |(_, r)| r.as_ref().map_or(0, |(_, r)| r.len()));
                (*s, size)
            })
            .collect()
    }

    fn seqs(q: &QueueHandle, from: u64, limit: usize) -> Vec<u64> {
        q.read_from(from, limit)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    /// Waits until the owner has handled every command sent so far (an append is answered
    /// after everything queued before it; this one is refused: larger than the quota).
    async fn settle(q: &QueueHandle) {
        let refused = q.stats().refused.load(Ordering::Relaxed);
        let _ = q.append(vec![msg(0, 64 << 20)]).await;
        assert_eq!(q.stats().refused.load(Ordering::Relaxed), refused + 1);
    }

    #[test]
    fn record_round_trips_and_garbage_is_an_error() {
        let m = msg(7, 10);
        assert_eq!(m.encode().len(), m.encoded_len());
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        assert!(Message::decode(&[]).is_err());
        assert!(Message::decode(&[9, 0, 0]).is_err());
        assert!(Message::decode(&m.encode()[..12]).is_err());
    }

    #[test]
    fn damaged_chunks_yield_what_can_be_read() {
        let (a, b) = (msg(1, 3).encode(), msg(2, 4).encode());
        let mut c = vec![CHUNK_V1];
        c.extend_from_slice(&3u32.to_be_bytes());
        for r in [&a, &b] {
            c.extend_from_slice(&(r.len() as u32).to_be_bytes());
            c.extend_from_slice(r);
        }
        let (count, entries) = chunk_entries(&c);
        assert_eq!(count, 3, "the header says 3");
        assert_eq!(entries.len(), 2, "two can be read");
        assert_eq!(Message::decode(&c[entries[1].clone()]).unwrap(), msg(2, 4));
        // Truncated in the middle of the second record.
        assert_eq!(chunk_entries(&c[..c.len() - 1]).1.len(), 1);
        // Old layout: one message per record.
        assert_eq!(
            chunk_entries(&a),
            (1, std::iter::once(0..a.len()).collect())
        );
        assert_eq!(chunk_entries(&[CHUNK_V1, 0]), (1, vec![]));
    }

    /// A damaged length near u32::MAX: `at + len` overflows a 32-bit usize (armv7), where
    /// the wrapped sum passed the bounds check and yielded a range ending before it starts.
    /// A damaged count near u32::MAX must not size the entry list either.
    #[test]
    fn damaged_lengths_and_counts_do_not_overflow_on_32_bit() {
        let a = msg(1, 3).encode();
        let mut c = vec![CHUNK_V1];
        c.extend_from_slice(&2u32.to_be_bytes());
        c.extend_from_slice(&(a.len() as u32).to_be_bytes());
        c.extend_from_slice(&a);
        c.extend_from_slice(&u32::MAX.to_be_bytes());
        c.extend_from_slice(b"tail");
        let (count, entries) = chunk_entries(&c);
        assert_eq!(count, 2);
        assert_eq!(entries, vec![9..9 + a.len()]);
        let mut huge = vec![CHUNK_V1];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend_from_slice(&(u32::MAX - 3).to_be_bytes());
        let (count, entries) = chunk_entries(&huge);
        assert_eq!((count, entries.len()), (u64::from(u32::MAX), 0));
        assert!(entries.capacity() <= 1);
        let chunk = Chunk::parse(10, Record::from_bytes(&c));
        assert!(chunk.record(10).is_ok());
        assert!(chunk.record(11).is_err(), "the damaged entry");
        assert!(
            chunk.record(10 + (1 << 32)).is_err(),
            "no wrap onto entry 0"
        );
    }

    #[tokio::test]
    async fn appended_messages_are_durable_and_ordered_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, join) = open_queue(dir.path());
            fill(&q, 0..5).await;
            q.append(vec![msg(5, 10)]).await.unwrap();
            q.remove(items(&q, &[1, 2]), false).await;
            drop(q);
            join.join().unwrap();
        }
        let (q, _join) = open_queue(dir.path());
        assert_eq!(seqs(&q, 0, 100), vec![3, 4, 5, 6]);
        assert_eq!(q.first_seq().unwrap(), Some(3));
        assert_eq!(q.stats().depth.load(Ordering::Relaxed), 4);
        let (_, r) = &q.read_from(5, 1).unwrap()[0];
        let (chunk, range) = r.as_ref().unwrap();
        assert_eq!(Message::decode(&chunk[range.clone()]).unwrap(), msg(4, 10));
        q.append(vec![msg(9, 1)]).await.unwrap();
        assert_eq!(seqs(&q, 7, 10), vec![7], "sequence continues after reopen");
    }

    #[tokio::test]
    async fn a_group_commit_is_one_chunk_deleted_once_all_of_it_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = store.log("uplink").unwrap();
        let (q, _j) = QueueHandle::spawn(store, 1 << 20, WhenFull::Refuse, 100).unwrap();
        fill(&q, 0..10).await;
        fill(&q, 10..20).await;
        assert_eq!(q.stats().chunks.load(Ordering::Relaxed), 2);
        assert_eq!(log.read_records(0, 10).unwrap().len(), 2);
        // Out of order: the first chunk loses all but message 1, and 12 of the second.
        let mut gone: Vec<u64> = (2..=10).collect();
        gone.push(12);
        q.remove(items(&q, &gone), false).await;
        settle(&q).await;
        assert_eq!(q.stats().depth.load(Ordering::Relaxed), 10);
        assert_eq!(q.stats().acked_through.load(Ordering::Relaxed), 0);
        assert_eq!(
            log.read_records(0, 10).unwrap().len(),
            2,
            "1 is still queued"
        );
        assert_eq!(
            seqs(&q, 0, 3),
            vec![1, 2, 3],
            "the reader skips nothing it cannot know"
        );
        // 1 goes: everything up to 10 is gone, the first chunk is deleted.
        q.remove(items(&q, &[1, 1, 11]), false).await;
        settle(&q).await;
        assert_eq!(q.stats().acked_through.load(Ordering::Relaxed), 12);
        assert_eq!(
            q.stats().acked.load(Ordering::Relaxed),
            12,
            "1 counted once"
        );
        assert_eq!(q.stats().depth.load(Ordering::Relaxed), 8);
        assert_eq!(log.read_records(0, 10).unwrap().len(), 1);
        assert_eq!(seqs(&q, 0, 100), (13..=20).collect::<Vec<_>>());
        assert_eq!(q.first_seq().unwrap(), Some(13));
        // A late or repeated acknowledgement changes nothing.
        q.remove(items(&q, &[5, 12, 99]), false).await;
        settle(&q).await;
        assert_eq!(q.stats().depth.load(Ordering::Relaxed), 8);
        q.remove(items(&q, &(13..=20).collect::<Vec<_>>()), true)
            .await;
        settle(&q).await;
        assert_eq!(q.stats().expired.load(Ordering::Relaxed), 8);
        assert_eq!(q.stats().depth.load(Ordering::Relaxed), 0);
        assert_eq!(q.stats().bytes.load(Ordering::Relaxed), 0);
        assert!(log.read_records(0, 10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_cached_reader_reads_what_an_uncached_one_does() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _j) = open_queue(dir.path());
        fill(&q, 0..50).await;
        fill(&q, 50..100).await;
        let mut cache = ReadCache::default();
        let mut got = Vec::new();
        let mut cursor = 1;
        loop {
            let batch = q.read_cached(&mut cache, cursor, 7).unwrap();
            let Some((last, _)) = batch.last() else { break };
            cursor = last + 1;
            for (seq, r) in batch {
                let (chunk, range) = r.unwrap();
                let m = Message::decode(&chunk[range]).unwrap();
                got.push((seq, m.topic));
            }
        }
        let want: Vec<(u64, String)> = (0..100).map(|i| (i as u64 + 1, msg(i, 10).topic)).collect();
        assert_eq!(got, want);
        // The cached chunk is deleted and more is appended: the reader follows the store.
        q.remove(items(&q, &(1..=100).collect::<Vec<_>>()), false)
            .await;
        q.append(vec![msg(100, 10)]).await.unwrap();
        assert!(q
            .read_cached(&mut cache, 1, 7)
            .unwrap()
            .iter()
            .all(|(s, _)| *s == 101));
        assert_eq!(q.read_cached(&mut cache, 101, 7).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn acknowledged_prefix_is_not_read_again_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let size;
        {
            let (q, join) = open_queue(dir.path());
            fill(&q, 0..100).await;
            size = items(&q, &(51..=100).collect::<Vec<_>>())
                .iter()
                .map(|(_, n)| n)
                .sum::<usize>();
            // Half of one chunk: the chunk stays, the prefix is recorded as gone.
            q.remove(items(&q, &(1..=50).collect::<Vec<_>>()), false)
                .await;
            drop(q);
            join.join().unwrap();
        }
        let (q, _j) = open_queue(dir.path());
        assert_eq!(q.first_seq().unwrap(), Some(51));
        assert_eq!(seqs(&q, 0, 1000), (51..=100).collect::<Vec<_>>());
        assert_eq!(q.stats().depth.load(Ordering::Relaxed), 50);
        assert_eq!(q.stats().bytes.load(Ordering::Relaxed), size as u64);
    }

    #[tokio::test]
    async fn records_of_the_old_layout_and_gaps_are_read_and_settled() {
        let dir = tempfile::tempdir().unwrap();
        {
            // One message per record, 1..=3 already removed and a hole at 6.
            let store = Store::open(dir.path()).unwrap();
            let log = store.log("uplink").unwrap();
            for s in [4u64, 5, 7, 8] {
                log.insert(s, &msg(s as usize, 5).encode()).unwrap();
            }
            store.flush().unwrap();
        }
        let (q, _j) = open_queue(dir.path());
        assert_eq!(q.first_seq().unwrap(), Some(4));
        assert_eq!(seqs(&q, 0, 10), vec![4, 5, 7, 8]);
        assert_eq!(q.stats().depth.load(Ordering::Relaxed), 4);
        q.remove(items(&q, &[4, 5]), false).await;
        settle(&q).await;
        assert_eq!(
            q.stats().acked_through.load(Ordering::Relaxed),
            6,
            "the hole counts as gone"
        );
        q.append(vec![msg(9, 5)]).await.unwrap();
        assert_eq!(seqs(&q, 0, 10), vec![7, 8, 9]);
    }

    #[tokio::test]
    async fn full_queue_refuses_under_refuse_policy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let one = msg(0, 100).encoded_len() as u64;
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
        let one = msg(0, 100).encoded_len() as u64;
        let (q, _j) = QueueHandle::spawn(store, one * 3, WhenFull::DropOldest, 100).unwrap();
        q.append((0..3).map(|i| msg(i, 100)).collect())
            .await
            .unwrap();
        q.append(vec![msg(3, 100), msg(4, 100)]).await.unwrap();
        assert_eq!(seqs(&q, 0, 10), vec![3, 4, 5]);
        assert_eq!(q.stats().dropped.load(Ordering::Relaxed), 2);
        // A late acknowledgement of a dropped message does not corrupt the accounting.
        q.remove(vec![(1, one as usize), (3, one as usize)], false)
            .await;
        q.append(vec![msg(5, 100)]).await.unwrap();
        assert_eq!(q.stats().depth.load(Ordering::Relaxed), 3);
        assert_eq!(q.stats().bytes.load(Ordering::Relaxed), 3 * one);
        assert_eq!(seqs(&q, 0, 10), vec![4, 5, 6]);
    }

    #[tokio::test]
    async fn removals_are_flushed_once_per_window_and_never_pile_up() {
        const WINDOW: u64 = 10;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (q, _j) = QueueHandle::spawn(store, 1 << 20, WhenFull::Refuse, WINDOW).unwrap();
        fill(&q, 0..100).await;
        let unflushed = || q.stats().unflushed_removals.load(Ordering::Relaxed);
        let mut seen_pending = false;
        let mut seen_flush = false;
        let mut prev = 0;
        for first in (1..=60u64).step_by(3) {
            q.remove(items(&q, &[first, first + 1, first + 2]), false)
                .await;
            settle(&q).await;
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
        q.remove(items(&q, &[61]), false).await;
        settle(&q).await;
        assert!(unflushed() > 0);
        q.append(vec![msg(100, 10)]).await.unwrap();
        assert_eq!(unflushed(), 0);
    }

    #[tokio::test]
    async fn early_sent_mark_rides_on_the_next_flush_and_urgent_one_is_flushed_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _j) = open_queue(dir.path());
        let mut sent = q.sent_durable();
        sent.borrow_and_update();
        // Not awaited: recorded, but no flush of its own.
        q.request_sent_mark(300, false).await;
        settle(&q).await;
        assert_eq!(*sent.borrow(), 0, "an early mark is not flushed on its own");
        // Any flush (here an append's group commit) makes it durable and publishes it.
        q.append(vec![msg(0, 10)]).await.unwrap();
        assert_eq!(*sent.borrow_and_update(), 300);
        // A mark the forwarder waits for is flushed at once.
        q.request_sent_mark(700, true).await;
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            sent.wait_for(|m| *m >= 700),
        )
        .await
        .expect("urgent mark published")
        .unwrap();
    }

    #[tokio::test]
    async fn sent_mark_is_published_once_durable_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, join) = open_queue(dir.path());
            let mut sent = q.sent_durable();
            assert_eq!(*sent.borrow_and_update(), 0);
            q.request_sent_mark(400, true).await;
            q.request_sent_mark(200, true).await;
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
        let (q, _j) = open_queue(dir.path());
        assert_eq!(q.sent_mark(), 400);
        assert_eq!(*q.sent_durable().borrow(), 400);
    }
}
