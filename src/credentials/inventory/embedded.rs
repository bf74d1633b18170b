//! The embedded inventory: credentials and jobs in one `store.rs` table (`inventory`), so
//! that a job and the credentials it changes are written in one atomic batch.
//!
//! Keys (every variable part is NUL-free: [`check_keys`] refuses NUL in ids, holders,
//! serials, vehicles, ECUs and devices):
//!
//! * `c\0<id>`: a credential (JSON); `j\0<id>`: a job (JSON); `m\0version`: the layout version.
//! * Secondary indexes, empty values, written in the same batch as their record:
//!   `h\0<holder>\0<id>`, `s\0<serial>\0<id>`, `v\0<vehicle>\0<id>`, `u\0<ecu>\0<id>`,
//!   `e\0<not_after>\0<id>` (our CA's certificates not yet final, for the renewal sweep),
//!   `jd\0<device>\0<id>`, `jc\0<credential>\0<id>` and `jo\0<created_at>\0<id>` (open jobs).
//!   Times in keys are big-endian with the sign bit flipped, so key order is time order.
//!
//! [`EmbeddedInventory::query`] runs on an in-memory copy of the sortable and filterable
//! fields only ([`Row`], about 150 bytes a credential; rebuilt on open, kept in step with
//! every write under the writer lock): a filter pass, then `select_nth_unstable_by` and a
//! sort of the first `offset + limit` matches only; the page's full records are read from
//! the store. sled's I/O is blocking, so every call runs on `spawn_blocking`; no lock is
//! held across an `.await`.

use super::InventoryError;
use crate::credentials::model::{
    validity_of, Credential, Invalid, Job, Kind, OpState, Page, Query, SortKey, COUNT_CAP,
};
use crate::store::{Store, Table};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, RwLock};

/// The table's name in the store.
pub const TABLE: &str = "inventory";
/// Version of the table's layout (`m\0version`).
pub const LAYOUT_VERSION: u64 = 1;

const REC: &[u8] = b"c\0";
const JOB: &[u8] = b"j\0";
const VERSION_KEY: &[u8] = b"m\0version";
const BY_HOLDER: &[u8] = b"h\0";
const BY_SERIAL: &[u8] = b"s\0";
const BY_VEHICLE: &[u8] = b"v\0";
const BY_ECU: &[u8] = b"u\0";
const ENDING: &[u8] = b"e\0";
const JOB_DEVICE: &[u8] = b"jd\0";
const JOB_CRED: &[u8] = b"jc\0";
const JOB_OPEN: &[u8] = b"jo\0";
/// Records read per step when the in-memory index is rebuilt on open.
const REBUILD_CHUNK: usize = 4096;

/// The credentials and jobs in the gateway's own store.
#[derive(Clone)]
pub struct EmbeddedInventory {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    table: Table,
    /// Serialises writers: the read of the old records (for their stale index keys), the
    /// batch and the in-memory update happen as one step. Never held across an `.await`
    /// (only taken on blocking threads) nor across the flush.
    writer: Mutex<()>,
    index: RwLock<QueryIndex>,
    count_cap: AtomicU64,
}

fn poisoned<T>(_: T) -> InventoryError {
    InventoryError::Corrupt {
        key: "inventory index".into(),
        reason: "a writer panicked".into(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, InventoryError> + Send + 'static,
) -> Result<T, InventoryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| InventoryError::Closed)?
}

impl EmbeddedInventory {
    /// Open (and on first use create) the inventory in `store`, rebuilding the in-memory
    /// query index from the records. Blocking: call it from a blocking context (or use
    /// [`EmbeddedInventory::open_async`]).
    pub fn open(store: &Store) -> Result<EmbeddedInventory, InventoryError> {
        let table = store.table(TABLE)?;
        match table.get(VERSION_KEY)? {
            None => table.put(VERSION_KEY, &LAYOUT_VERSION.to_be_bytes())?,
            Some(v) => {
                let found = <[u8; 8]>::try_from(v.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| corrupt(VERSION_KEY, format!("{} bytes", v.len())))?;
                if found != LAYOUT_VERSION {
                    return Err(corrupt(
                        VERSION_KEY,
                        format!("layout version {found}, this build reads {LAYOUT_VERSION}"),
                    ));
                }
            }
        }
        let mut index = QueryIndex::default();
        let mut from = REC.to_vec();
        loop {
            let chunk = table.scan_prefix_from(REC, &from, REBUILD_CHUNK)?;
            let Some((last, _)) = chunk.last() else { break };
            from = last.clone();
            from.push(0);
            for (k, v) in &chunk {
                let c: Credential = decode(k, v)?;
                index.upsert(&c);
            }
            if chunk.len() < REBUILD_CHUNK {
                break;
            }
        }
        Ok(EmbeddedInventory {
            inner: Arc::new(Inner {
                store: store.clone(),
                table,
                writer: Mutex::new(()),
                index: RwLock::new(index),
                count_cap: AtomicU64::new(COUNT_CAP),
            }),
        })
    }

    /// [`EmbeddedInventory::open`] on a blocking thread.
    pub async fn open_async(store: &Store) -> Result<EmbeddedInventory, InventoryError> {
        let store = store.clone();
        blocking(move || EmbeddedInventory::open(&store)).await
    }

    /// Count at most `cap` matches in [`Self::query`] instead of [`COUNT_CAP`] (for tests
    /// of the cap on a small data set).
    pub fn set_count_cap(&self, cap: u64) {
        self.inner.count_cap.store(cap, AtomicOrdering::Relaxed);
    }
}

fn corrupt(key: &[u8], reason: impl Into<String>) -> InventoryError {
    InventoryError::Corrupt {
        key: format!(
            "{TABLE}/{}",
            String::from_utf8_lossy(key).replace('\0', "/")
        ),
        reason: reason.into(),
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, InventoryError> {
    serde_json::from_slice(v).map_err(|e| corrupt(key, e.to_string()))
}

fn encode<T: serde::Serialize>(key: &[u8], v: &T) -> Result<Vec<u8>, InventoryError> {
    serde_json::to_vec(v).map_err(|e| corrupt(key, e.to_string()))
}

fn key(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

/// `v` as 8 bytes whose byte order is the numeric order.
fn time_key(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn no_nul(field: &str, v: &str) -> Result<(), Invalid> {
    if v.contains('\0') {
        return Err(Invalid {
            field: field.into(),
            reason: "contains NUL".into(),
        });
    }
    Ok(())
}

/// The parts of a credential that become keys: non-empty id, no NUL anywhere in them.
pub(super) fn check_keys(c: &Credential) -> Result<(), Invalid> {
    if c.id.is_empty() {
        return Err(Invalid {
            field: "id".into(),
            reason: "empty".into(),
        });
    }
    no_nul("id", &c.id)?;
    no_nul("serial", &c.serial)?;
    no_nul("holder", &c.holder)?;
    no_nul("server", &c.server)?;
    if let Some(v) = &c.vehicle {
        no_nul("vehicle", v)?;
    }
    if let Some(v) = &c.ecu {
        no_nul("ecu", v)?;
    }
    Ok(())
}

pub(super) fn check_job_keys(j: &Job) -> Result<(), Invalid> {
    if j.id.is_empty() {
        return Err(Invalid {
            field: "job.id".into(),
            reason: "empty".into(),
        });
    }
    no_nul("job.id", &j.id)?;
    no_nul("job.device", &j.device)?;
    no_nul("job.credential", &j.credential)
}

/// Whether the renewal sweep ([`super::InventoryStore::ending_before`]) looks at it.
pub(super) fn sweeps(kind: Kind, op_state: OpState) -> bool {
    kind == Kind::Certificate && !op_state.is_final()
}

/// The secondary index keys of a credential.
fn cred_index_keys(
    id: &str,
    serial: &str,
    holder: &str,
    vehicle: Option<&str>,
    ecu: Option<&str>,
    ending: Option<i64>,
) -> Vec<Vec<u8>> {
    let id = id.as_bytes();
    let mut out = vec![
        key(BY_HOLDER, &[holder.as_bytes(), id]),
        key(BY_SERIAL, &[serial.as_bytes(), id]),
    ];
    if let Some(v) = vehicle {
        out.push(key(BY_VEHICLE, &[v.as_bytes(), id]));
    }
    if let Some(e) = ecu {
        out.push(key(BY_ECU, &[e.as_bytes(), id]));
    }
    if let Some(na) = ending {
        out.push(key(ENDING, &[&time_key(na), id]));
    }
    out
}

fn cred_keys(c: &Credential) -> Vec<Vec<u8>> {
    cred_index_keys(
        &c.id,
        &c.serial,
        &c.holder,
        c.vehicle.as_deref(),
        c.ecu.as_deref(),
        c.not_after.filter(|_| sweeps(c.kind, c.op_state)),
    )
}

fn job_keys(j: &Job) -> Vec<Vec<u8>> {
    let id = j.id.as_bytes();
    let mut out = vec![
        key(JOB_DEVICE, &[j.device.as_bytes(), id]),
        key(JOB_CRED, &[j.credential.as_bytes(), id]),
    ];
    if !j.state.is_terminal() {
        out.push(key(JOB_OPEN, &[&time_key(j.created_at), id]));
    }
    out
}

impl Inner {
    /// Write credentials and jobs as one batch, update the index, then flush.
    fn write(&self, jobs: &[Job], creds: &[Credential]) -> Result<(), InventoryError> {
        for c in creds {
            check_keys(c)?;
        }
        for j in jobs {
            check_job_keys(j)?;
        }
        let creds = super::dedup(creds, |c| &c.id);
        let jobs = super::dedup(jobs, |j| &j.id);
        let mut puts = Vec::with_capacity(creds.len() * 6 + jobs.len() * 4);
        let mut removes = Vec::new();
        {
            let _w = self.writer.lock().map_err(poisoned)?;
            {
                let index = self.index.read().map_err(poisoned)?;
                for c in &creds {
                    if let Some(old) = index.find(&c.id) {
                        removes.extend(old.index_keys());
                    }
                    let k = key(REC, &[c.id.as_bytes()]);
                    let v = encode(&k, *c)?;
                    puts.push((k, v));
                    puts.extend(cred_keys(c).into_iter().map(|k| (k, Vec::new())));
                }
            }
            for j in &jobs {
                let k = key(JOB, &[j.id.as_bytes()]);
                if let Some(old) = self.table.get(&k)? {
                    let old: Job = decode(&k, &old)?;
                    removes.extend(job_keys(&old));
                }
                let v = encode(&k, *j)?;
                puts.push((k, v));
                puts.extend(job_keys(j).into_iter().map(|k| (k, Vec::new())));
            }
            // Removals first, then puts: a key both stale and current stays.
            self.table.apply(&puts, &removes)?;
            let mut index = self.index.write().map_err(poisoned)?;
            for c in &creds {
                index.upsert(c);
            }
        }
        self.store.flush()?;
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<Credential>, InventoryError> {
        let k = key(REC, &[id.as_bytes()]);
        match self.table.get(&k)? {
            None => Ok(None),
            Some(v) => decode(&k, &v).map(Some),
        }
    }

    /// The records an index prefix names, those for which `keep` holds, by id.
    fn lookup<T: serde::de::DeserializeOwned>(
        &self,
        index: &[u8],
        value: &str,
        rec: &[u8],
        keep: impl Fn(&T) -> bool,
    ) -> Result<Vec<T>, InventoryError> {
        if value.contains('\0') {
            return Ok(Vec::new());
        }
        let prefix = key(index, &[value.as_bytes(), b""]);
        let mut out = Vec::new();
        for (k, _) in self.table.scan_prefix(&prefix)? {
            let rk = key(rec, &[&k[prefix.len()..]]);
            let Some(v) = self.table.get(&rk)? else {
                return Err(corrupt(&k, "indexed record is missing"));
            };
            let r: T = decode(&rk, &v)?;
            if keep(&r) {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn ending_before(&self, until: i64, limit: usize) -> Result<Vec<Credential>, InventoryError> {
        let mut out = Vec::new();
        for (k, _) in self.table.scan_prefix_from(ENDING, ENDING, limit)? {
            let Some(t) = k.get(ENDING.len()..ENDING.len() + 8) else {
                return Err(corrupt(&k, "short key"));
            };
            let mut b = [0u8; 8];
            b.copy_from_slice(t);
            let na = (u64::from_be_bytes(b) ^ (1 << 63)) as i64;
            if na > until {
                break;
            }
            let Some(id) = k.get(ENDING.len() + 9..) else {
                return Err(corrupt(&k, "short key"));
            };
            let id = String::from_utf8_lossy(id).into_owned();
            match self.get(&id)? {
                Some(c) => out.push(c),
                None => return Err(corrupt(&k, "indexed record is missing")),
            }
        }
        Ok(out)
    }

    fn query(&self, q: &Query, now: i64, expiring: i64) -> Result<Page, InventoryError> {
        q.validate()?;
        let needle = q.search.as_ref().map(|s| s.to_lowercase());
        let ids: Vec<String>;
        let (total, exact);
        {
            let index = self.index.read().map_err(poisoned)?;
            let rows = &index.rows;
            // (an order-preserving 64-bit prefix of the sort key, slot): most comparisons
            // end on the prefix without touching the rows; equal prefixes fall back to the
            // full comparison.
            let mut hits: Vec<(u64, u32)> = rows
                .iter()
                .enumerate()
                .filter(|(_, r)| r.matches(q, needle.as_deref(), now, expiring))
                .map(|(i, r)| (r.major(q.sort), i as u32))
                .collect();
            let n = hits.len() as u64;
            let cap = self.count_cap.load(AtomicOrdering::Relaxed);
            exact = n <= cap;
            total = n.min(cap);
            let start = usize::try_from(q.offset)
                .unwrap_or(usize::MAX)
                .min(hits.len());
            let end = start.saturating_add(q.limit as usize).min(hits.len());
            let cmp = |a: &(u64, u32), b: &(u64, u32)| {
                let o = a.0.cmp(&b.0);
                let o = if q.desc { o.reverse() } else { o };
                o.then_with(|| rows[a.1 as usize].compare(&rows[b.1 as usize], q))
            };
            if end < hits.len() && end > 0 {
                hits.select_nth_unstable_by(end - 1, cmp);
                hits.truncate(end);
            }
            hits.sort_unstable_by(cmp);
            ids = hits[start..end.min(hits.len())]
                .iter()
                .map(|(_, s)| rows[*s as usize].id().to_string())
                .collect();
        }
        let mut page = Vec::with_capacity(ids.len());
        for id in ids {
            match self.get(&id)? {
                Some(c) => page.push(c),
                None => return Err(corrupt(id.as_bytes(), "indexed record is missing")),
            }
        }
        Ok(Page {
            rows: page,
            total,
            exact,
        })
    }

    fn jobs_sorted(&self, mut jobs: Vec<Job>) -> Vec<Job> {
        jobs.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        jobs
    }

    fn open_jobs(&self, limit: usize) -> Result<Vec<Job>, InventoryError> {
        let mut out = Vec::new();
        for (k, _) in self.table.scan_prefix_from(JOB_OPEN, JOB_OPEN, limit)? {
            let Some(id) = k.get(JOB_OPEN.len() + 9..) else {
                return Err(corrupt(&k, "short key"));
            };
            let jk = key(JOB, &[id]);
            let Some(v) = self.table.get(&jk)? else {
                return Err(corrupt(&k, "indexed job is missing"));
            };
            out.push(decode(&jk, &v)?);
        }
        Ok(out)
    }
}

impl super::InventoryStore for EmbeddedInventory {
    async fn put(&self, creds: &[Credential]) -> Result<(), InventoryError> {
        let inner = self.inner.clone();
        let creds = creds.to_vec();
        blocking(move || inner.write(&[], &creds)).await
    }

    async fn get(&self, id: &str) -> Result<Option<Credential>, InventoryError> {
        let inner = self.inner.clone();
        let id = id.to_string();
        blocking(move || inner.get(&id)).await
    }

    async fn by_holder(&self, device: &str) -> Result<Vec<Credential>, InventoryError> {
        let inner = self.inner.clone();
        let d = device.to_string();
        blocking(move || inner.lookup(BY_HOLDER, &d, REC, |c: &Credential| c.holder == d)).await
    }

    async fn by_serial(&self, serial: &str) -> Result<Vec<Credential>, InventoryError> {
        let inner = self.inner.clone();
        let s = serial.to_string();
        blocking(move || inner.lookup(BY_SERIAL, &s, REC, |c: &Credential| c.serial == s)).await
    }

    async fn by_vehicle(&self, vehicle: &str) -> Result<Vec<Credential>, InventoryError> {
        let inner = self.inner.clone();
        let v = vehicle.to_string();
        blocking(move || {
            inner.lookup(BY_VEHICLE, &v, REC, |c: &Credential| {
                c.vehicle.as_deref() == Some(v.as_str())
            })
        })
        .await
    }

    async fn by_ecu(&self, ecu: &str) -> Result<Vec<Credential>, InventoryError> {
        let inner = self.inner.clone();
        let e = ecu.to_string();
        blocking(move || {
            inner.lookup(BY_ECU, &e, REC, |c: &Credential| {
                c.ecu.as_deref() == Some(e.as_str())
            })
        })
        .await
    }

    async fn ending_before(
        &self,
        until: i64,
        limit: usize,
    ) -> Result<Vec<Credential>, InventoryError> {
        let inner = self.inner.clone();
        blocking(move || inner.ending_before(until, limit)).await
    }

    async fn query(&self, q: &Query, now: i64, expiring: i64) -> Result<Page, InventoryError> {
        let inner = self.inner.clone();
        let q = q.clone();
        blocking(move || inner.query(&q, now, expiring)).await
    }

    async fn count(&self) -> Result<u64, InventoryError> {
        let inner = self.inner.clone();
        blocking(move || Ok(inner.index.read().map_err(poisoned)?.rows.len() as u64)).await
    }

    async fn put_jobs(&self, jobs: &[Job], creds: &[Credential]) -> Result<(), InventoryError> {
        let inner = self.inner.clone();
        let (jobs, creds) = (jobs.to_vec(), creds.to_vec());
        blocking(move || inner.write(&jobs, &creds)).await
    }

    async fn job(&self, id: &str) -> Result<Option<Job>, InventoryError> {
        let inner = self.inner.clone();
        let k = key(JOB, &[id.as_bytes()]);
        blocking(move || match inner.table.get(&k)? {
            None => Ok(None),
            Some(v) => decode(&k, &v).map(Some),
        })
        .await
    }

    async fn jobs_for_device(
        &self,
        device: &str,
        open_only: bool,
    ) -> Result<Vec<Job>, InventoryError> {
        let inner = self.inner.clone();
        let d = device.to_string();
        blocking(move || {
            let jobs = inner.lookup(JOB_DEVICE, &d, JOB, |j: &Job| {
                j.device == d && !(open_only && j.state.is_terminal())
            })?;
            Ok(inner.jobs_sorted(jobs))
        })
        .await
    }

    async fn jobs_for_credential(&self, credential: &str) -> Result<Vec<Job>, InventoryError> {
        let inner = self.inner.clone();
        let c = credential.to_string();
        blocking(move || {
            let jobs = inner.lookup(JOB_CRED, &c, JOB, |j: &Job| j.credential == c)?;
            Ok(inner.jobs_sorted(jobs))
        })
        .await
    }

    async fn open_jobs(&self, limit: usize) -> Result<Vec<Job>, InventoryError> {
        let inner = self.inner.clone();
        blocking(move || inner.open_jobs(limit)).await
    }
}

// --- The in-memory query index.

const HAS_VEHICLE: u8 = 1;
const HAS_ECU: u8 = 2;
const HAS_NB: u8 = 4;
const HAS_NA: u8 = 8;
const REVOKED: u8 = 16;
const HAS_LS: u8 = 32;
const AUDIT: u8 = 64;

/// The sortable and filterable fields of one credential, compact: the six strings in one
/// allocation, `None`s as flag bits.
struct Row {
    /// id, serial, holder, server, vehicle, ecu, back to back.
    text: Box<str>,
    /// Where id, serial, holder, server and vehicle end in `text` (ecu ends at its end).
    ends: [u32; 5],
    flags: u8,
    kind: Kind,
    op_state: OpState,
    not_before: i64,
    not_after: i64,
    op_date: i64,
    last_seen: i64,
}

impl Row {
    fn new(c: &Credential) -> Row {
        let mut text = String::with_capacity(
            c.id.len()
                + c.serial.len()
                + c.holder.len()
                + c.server.len()
                + c.vehicle.as_ref().map_or(0, |s| s.len())
                + c.ecu.as_ref().map_or(0, |s| s.len()),
        );
        let mut ends = [0u32; 5];
        for (i, s) in [
            c.id.as_str(),
            &c.serial,
            &c.holder,
            &c.server,
            c.vehicle.as_deref().unwrap_or(""),
        ]
        .into_iter()
        .enumerate()
        {
            text.push_str(s);
            ends[i] = text.len() as u32;
        }
        text.push_str(c.ecu.as_deref().unwrap_or(""));
        let flag = |b: bool, f: u8| if b { f } else { 0 };
        Row {
            text: text.into_boxed_str(),
            ends,
            flags: flag(c.vehicle.is_some(), HAS_VEHICLE)
                | flag(c.ecu.is_some(), HAS_ECU)
                | flag(c.not_before.is_some(), HAS_NB)
                | flag(c.not_after.is_some(), HAS_NA)
                | flag(c.revoked_at.is_some(), REVOKED)
                | flag(c.last_seen.is_some(), HAS_LS)
                | flag(!c.audit.is_empty(), AUDIT),
            kind: c.kind,
            op_state: c.op_state,
            not_before: c.not_before.unwrap_or(0),
            not_after: c.not_after.unwrap_or(0),
            op_date: c.op_date,
            last_seen: c.last_seen.unwrap_or(0),
        }
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let end = if i < 5 {
            self.ends[i] as usize
        } else {
            self.text.len()
        };
        self.text.get(start..end).unwrap_or("")
    }
    fn id(&self) -> &str {
        self.part(0)
    }
    fn serial(&self) -> &str {
        self.part(1)
    }
    fn holder(&self) -> &str {
        self.part(2)
    }
    fn server(&self) -> &str {
        self.part(3)
    }
    fn opt<'a>(&self, f: u8, s: &'a str) -> Option<&'a str> {
        (self.flags & f != 0).then_some(s)
    }
    fn vehicle(&self) -> Option<&str> {
        self.opt(HAS_VEHICLE, self.part(4))
    }
    fn ecu(&self) -> Option<&str> {
        self.opt(HAS_ECU, self.part(5))
    }
    fn time(&self, f: u8, v: i64) -> Option<i64> {
        (self.flags & f != 0).then_some(v)
    }
    fn not_before(&self) -> Option<i64> {
        self.time(HAS_NB, self.not_before)
    }
    fn not_after(&self) -> Option<i64> {
        self.time(HAS_NA, self.not_after)
    }
    fn last_seen(&self) -> Option<i64> {
        self.time(HAS_LS, self.last_seen)
    }
    fn revoked(&self) -> bool {
        self.flags & REVOKED != 0
    }

    fn index_keys(&self) -> Vec<Vec<u8>> {
        cred_index_keys(
            self.id(),
            self.serial(),
            self.holder(),
            self.vehicle(),
            self.ecu(),
            self.not_after()
                .filter(|_| sweeps(self.kind, self.op_state)),
        )
    }

    /// [`Query::matches`] on the row (`needle`: the search, lower-cased).
    fn matches(&self, q: &Query, needle: Option<&str>, now: i64, expiring: i64) -> bool {
        if q.kind.is_some_and(|k| k != self.kind) || q.op_state.is_some_and(|s| s != self.op_state)
        {
            return false;
        }
        if let Some(v) = q.validity {
            let revoked = self.revoked().then_some(0);
            if validity_of(self.not_before(), self.not_after(), revoked, now, expiring) != v {
                return false;
            }
        }
        let eq = |want: &Option<String>, have: Option<&str>| match want {
            Some(w) => have == Some(w.as_str()),
            None => true,
        };
        if !eq(&q.server, Some(self.server()))
            || !eq(&q.holder, Some(self.holder()))
            || !eq(&q.vehicle, self.vehicle())
            || !eq(&q.ecu, self.ecu())
        {
            return false;
        }
        if let Some(w) = q.expiring_within {
            let ok = !self.revoked()
                && matches!(self.not_after(), Some(na) if na > now && na <= now.saturating_add(w));
            if !ok {
                return false;
            }
        }
        if q.audit && self.flags & AUDIT == 0 {
            return false;
        }
        if let Some(s) = needle {
            if !self.search_hit(s) {
                return false;
            }
        }
        true
    }

    /// Whether a searched field, lower-cased, contains `needle` (lower-cased already): on
    /// an ASCII row, candidates for the needle's first byte in either case over the whole
    /// `text` (memchr), a match counted only when it lies within one field.
    fn search_hit(&self, needle: &str) -> bool {
        if needle.is_empty() {
            return true;
        }
        if !self.text.is_ascii() {
            return [
                Some(self.id()),
                Some(self.serial()),
                Some(self.holder()),
                self.vehicle(),
                self.ecu(),
                Some(self.server()),
            ]
            .into_iter()
            .flatten()
            .any(|f| f.to_lowercase().contains(needle));
        }
        // The lower case of ASCII is ASCII: a needle with anything else cannot match.
        if !needle.is_ascii() {
            return false;
        }
        let (h, n) = (self.text.as_bytes(), needle.as_bytes());
        if n.len() > h.len() {
            return false;
        }
        let first = n[0];
        let last_start = h.len() - n.len();
        memchr::memchr2_iter(first, first.to_ascii_uppercase(), &h[..=last_start]).any(|i| {
            let rest = h[i + 1..i + n.len()]
                .iter()
                .zip(&n[1..])
                .all(|(a, b)| a.to_ascii_lowercase() == *b);
            // The end of the field the match starts in (absent fields are empty).
            let field_end = self
                .ends
                .iter()
                .map(|&e| e as usize)
                .find(|&e| i < e)
                .unwrap_or(h.len());
            rest && i + n.len() <= field_end
        })
    }

    /// A coarsening of [`Row::compare`]'s ascending order on `k` (before the tie-break by
    /// id): `major(a) < major(b)` implies `a` sorts before `b`.
    fn major(&self, k: SortKey) -> u64 {
        fn prefix(s: &str) -> u64 {
            let mut b = [0u8; 8];
            let n = s.len().min(8);
            b[..n].copy_from_slice(&s.as_bytes()[..n]);
            u64::from_be_bytes(b)
        }
        // None first; monotone non-decreasing in the value.
        fn num(v: Option<i64>) -> u64 {
            v.map_or(0, |v| ((v as u64) ^ (1 << 63)).saturating_add(1))
        }
        fn opt(v: Option<&str>) -> u64 {
            v.map_or(0, |s| prefix(s).saturating_add(1))
        }
        match k {
            SortKey::Id => prefix(self.id()),
            SortKey::Kind => prefix(self.kind.as_str()),
            SortKey::Serial => prefix(self.serial()),
            SortKey::Holder => prefix(self.holder()),
            SortKey::Vehicle => opt(self.vehicle()),
            SortKey::Ecu => opt(self.ecu()),
            SortKey::Server => prefix(self.server()),
            SortKey::NotBefore => num(self.not_before()),
            SortKey::NotAfter => num(self.not_after()),
            SortKey::OpState => prefix(self.op_state.as_str()),
            SortKey::OpDate => num(Some(self.op_date)),
            SortKey::LastSeen => num(self.last_seen()),
        }
    }

    /// [`Query::compare`] on rows.
    fn compare(&self, b: &Row, q: &Query) -> Ordering {
        let a = self;
        let o = match q.sort {
            SortKey::Id => Ordering::Equal,
            SortKey::Kind => a.kind.as_str().cmp(b.kind.as_str()),
            SortKey::Serial => a.serial().cmp(b.serial()),
            SortKey::Holder => a.holder().cmp(b.holder()),
            SortKey::Vehicle => a.vehicle().cmp(&b.vehicle()),
            SortKey::Ecu => a.ecu().cmp(&b.ecu()),
            SortKey::Server => a.server().cmp(b.server()),
            SortKey::NotBefore => a.not_before().cmp(&b.not_before()),
            SortKey::NotAfter => a.not_after().cmp(&b.not_after()),
            SortKey::OpState => a.op_state.as_str().cmp(b.op_state.as_str()),
            SortKey::OpDate => a.op_date.cmp(&b.op_date),
            SortKey::LastSeen => a.last_seen().cmp(&b.last_seen()),
        };
        let o = o.then_with(|| a.id().cmp(b.id()));
        if q.desc {
            o.reverse()
        } else {
            o
        }
    }
}

/// Rows by slot, and the slot of each id (by a 64-bit hash; the rare id whose hash another
/// id already has is kept by name in `overflow`).
#[derive(Default)]
struct QueryIndex {
    rows: Vec<Row>,
    hasher: RandomState,
    by_hash: HashMap<u64, u32>,
    overflow: HashMap<Box<str>, u32>,
}

impl QueryIndex {
    fn slot(&self, id: &str) -> Option<usize> {
        let h = self.hasher.hash_one(id);
        match self.by_hash.get(&h) {
            Some(&s) if self.rows[s as usize].id() == id => Some(s as usize),
            Some(_) => self.overflow.get(id).map(|&s| s as usize),
            None => None,
        }
    }

    fn find(&self, id: &str) -> Option<&Row> {
        self.slot(id).map(|s| &self.rows[s])
    }

    fn upsert(&mut self, c: &Credential) {
        let row = Row::new(c);
        if let Some(s) = self.slot(&c.id) {
            self.rows[s] = row;
            return;
        }
        let s = self.rows.len() as u32;
        self.rows.push(row);
        let h = self.hasher.hash_one(c.id.as_str());
        match self.by_hash.entry(h) {
            std::collections::hash_map::Entry::Occupied(_) => {
                self.overflow.insert(c.id.as_str().into(), s);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_agrees_with_query_matches() {
        let mut c = Credential::new(
            "cert:AB12".into(),
            Kind::Certificate,
            "ab12".into(),
            "Dev-X".into(),
            0,
        );
        c.vehicle = Some("VIN9".into());
        c.server = "cloud".into();
        let mut u = c.clone();
        u.holder = "gw-ÖLberg".into();
        u.ecu = Some("K".into());
        let mut bare = c.clone();
        bare.vehicle = None;
        for rec in [&c, &u, &bare] {
            let row = Row::new(rec);
            for needle in [
                "",
                "ab",
                "AB12",
                "dev-x",
                "x",
                "vin9",
                "cloud",
                "12dev",
                "b12d",
                "2dev",
                "9cl",
                "xv",
                "öl",
                "ÖL",
                "k",
                "\u{212a}",
                "gw-ölberg",
                "nope",
                "cert:ab12ab12",
            ] {
                let q = Query {
                    search: Some(needle.into()),
                    ..Query::default()
                };
                assert_eq!(
                    row.search_hit(&needle.to_lowercase()),
                    q.matches(rec, 0, 0),
                    "{:?} in {}",
                    needle,
                    rec.holder
                );
            }
        }
    }

    #[test]
    fn time_keys_sort_like_the_times() {
        let ts = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for w in ts.windows(2) {
            assert!(time_key(w[0]) < time_key(w[1]));
        }
    }

    #[test]
    fn rows_keep_every_field() {
        let mut c = Credential::new("k:1".into(), Kind::SymmetricKey, "S".into(), "h".into(), 5);
        c.vehicle = Some(String::new());
        c.last_seen = Some(-3);
        let r = Row::new(&c);
        assert_eq!(
            (r.id(), r.serial(), r.holder(), r.server()),
            ("k:1", "S", "h", "gateway")
        );
        assert_eq!((r.vehicle(), r.ecu()), (Some(""), None));
        assert_eq!((r.not_after(), r.last_seen()), (None, Some(-3)));
    }

    #[test]
    fn the_sort_prefix_never_contradicts_compare() {
        let texts = [
            "",
            "a",
            "ab",
            "ab\u{1}",
            "abcdefgh",
            "abcdefghi",
            "abcdefgz",
            "b",
            "Ä",
            "\u{ff}",
        ];
        let times = [
            None,
            Some(i64::MIN),
            Some(-1),
            Some(0),
            Some(i64::MAX - 1),
            Some(i64::MAX),
        ];
        let mut rows = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            for (j, n) in times.iter().enumerate() {
                let mut c = Credential::new(
                    format!("{t}{j}"),
                    Kind::ALL[(i + j) % 5],
                    t.to_string(),
                    t.to_string(),
                    n.unwrap_or(7),
                );
                c.server = t.to_string();
                c.vehicle = (j % 2 == 0).then(|| t.to_string());
                c.ecu = (j % 3 == 0).then(|| t.to_string());
                c.not_before = *n;
                c.not_after = *n;
                c.last_seen = *n;
                c.op_state = OpState::ALL[(i * 7 + j) % 11];
                rows.push(Row::new(&c));
            }
        }
        for sort in SortKey::ALL {
            let q = Query {
                sort,
                ..Query::default()
            };
            for a in &rows {
                for b in &rows {
                    if a.major(sort) < b.major(sort) {
                        assert_eq!(
                            a.compare(b, &q),
                            Ordering::Less,
                            "{sort:?} {} {}",
                            a.id(),
                            b.id()
                        );
                    }
                }
            }
        }
    }
}
