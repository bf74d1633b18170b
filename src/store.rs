//! The durable store: the only module that knows sled exists.
//!
//! Trees: `meta` (schema version, CRL number), `certs` and `certs_by_id` (issued
//! certificates), `vouchers` (FDO ownership vouchers by device GUID) and `log/<name>`.
//!
//! Every mutating call flushes before it returns, so anything the gateway acknowledges is on
//! disk. A schema version is written on first open and checked on every open.
//!
//! "On disk" means on stable storage, power cuts included: sled's own `flush` ends in
//! `sync_file_range`, which neither flushes the device's write cache nor the file's
//! metadata, and its blob files are not synced at all. [`Store::flush`] therefore adds the
//! missing `fdatasync`s (see [`Durable`]), group-committed so that concurrent callers share
//! one.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

/// Version of the on-disk layout. Bump on any change of layout and add a step to
/// [`migrate`]; a store of an older version is migrated on open, a newer one is refused.
///
/// * 1: certificates, vouchers, logs and tables (issues 1–10).
/// * 2: the sessions capability's tables (`table/sessions`, `table/session-queue`,
///   `table/retained`, issue 11); version 1 stores get them empty.
pub const SCHEMA_VERSION: u32 = 2;

const META: &str = "meta";
const CERTS: &str = "certs";
const CERTS_BY_ID: &str = "certs_by_id";
const VOUCHERS: &str = "vouchers";
const KEY_SCHEMA: &[u8] = b"schema_version";
const KEY_CRL_NUMBER: &[u8] = b"crl_number";
/// Bytes of sled's page cache (its default is 1 GiB).
const CACHE_CAPACITY: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store is locked by another process (is the gateway running?): {0}")]
    Locked(String),
    #[error("store I/O: {0}")]
    Db(String),
    #[error("store schema version {found} is not supported (this build reads {expected})")]
    Schema { found: u32, expected: u32 },
    #[error("corrupt record under {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("cannot restrict {path} to owner-only access: {cause}")]
    Permissions {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("store sync of {path}: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store flush failed: {0}")]
    Flush(String),
}

/// A store failure under an FDO operation (the wire format of `fdo_wire` knows no store, so
/// the conversion that lets its callers use `?` on the store lives here).
impl From<StoreError> for crate::fdo_wire::FdoError {
    fn from(e: StoreError) -> Self {
        crate::fdo_wire::FdoError::Store(crate::fdo_wire::StoreFailure::new(e))
    }
}

/// The environment knob that turns the `fdatasync`s of [`Store::flush`] off (sled's own
/// flush still runs). For benchmarks only: it gives up durability against power loss.
pub const UNSAFE_SKIP_FDATASYNC: &str = "OUTPOST_UNSAFE_SKIP_FDATASYNC";

/// Upper bound of the blob files whose synced size is remembered (more than that is
/// forgotten, which only means they are synced again).
const MAX_TRACKED_BLOBS: usize = 1 << 20;

/// Durability against power loss for a sled directory, with group commit.
///
/// One flush is: (1) `fdatasync` of every blob file (`blobs/*`, values sled keeps outside
/// its log) that is new or has grown since it was last synced, and an `fsync` of the blobs
/// directory when files were added; (2) sled's flush (its log buffers written out with
/// `sync_file_range`); (3) `fdatasync` of sled's `db` file through one long-lived handle.
///
/// Group commit with overlapping flushes: a write made before `flush` is called is covered
/// by every flush that *starts* after the call. A caller starts a flush of its own at once
/// unless [`MAX_OVERLAPPING`] are already running; then it joins the one queued to start
/// next, which every caller arriving meanwhile shares and whose first waiter runs it when a
/// running one ends. Overlapping flushes let the device work on one cache flush while the
/// next is already issued: a write waits for about one flush, not one and a half.
struct Durable {
    dir: PathBuf,
    /// `None` with [`UNSAFE_SKIP_FDATASYNC`].
    db_file: Option<File>,
    state: Mutex<FlushState>,
    finished: Condvar,
    /// Blob files by name and the size they were last synced at (see `sync_blobs`).
    blobs: Mutex<HashMap<OsString, u64>>,
}

/// Flushes allowed to run at the same time.
const MAX_OVERLAPPING: usize = 4;

#[derive(Default)]
struct FlushState {
    /// Flushes started so far.
    started: u64,
    /// Flushes finished so far (successfully or not).
    finished: u64,
    /// Flushes that failed so far.
    failed: u64,
    /// Flushes running now.
    running: usize,
    /// The flush queued to start next, with its waiters.
    queued: Option<Arc<FlushSlot>>,
}

/// The outcome of one queued flush, shared by the callers that joined it.
#[derive(Default)]
struct FlushSlot {
    outcome: std::sync::OnceLock<Result<(), String>>,
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Flush("flush state poisoned".into())
}

fn sync_path(path: &Path, data_only: bool) -> Result<(), StoreError> {
    let err = |source| StoreError::Sync {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(err)?;
    if data_only {
        f.sync_data().map_err(err)
    } else {
        f.sync_all().map_err(err)
    }
}

impl Durable {
    /// Sync what sled created at open (conf, db, the blobs directory, the store directory
    /// and its parent) and keep a handle on `db` for every later flush.
    fn open(dir: &Path) -> Result<Durable, StoreError> {
        let skip = std::env::var_os(UNSAFE_SKIP_FDATASYNC).is_some_and(|v| v == "1");
        let db_path = dir.join("db");
        let db_file = if skip {
            tracing::warn!(
                store = %dir.display(),
                "{UNSAFE_SKIP_FDATASYNC}=1: acknowledged writes are NOT durable against power loss"
            );
            None
        } else {
            for (p, data_only) in [
                (dir.join("conf"), false),
                (db_path.clone(), false),
                (dir.join("blobs"), false),
                (dir.to_path_buf(), false),
            ] {
                if p.exists() {
                    sync_path(&p, data_only)?;
                }
            }
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_path(parent, false)?;
            }
            Some(File::open(&db_path).map_err(|source| StoreError::Sync {
                path: db_path.clone(),
                source,
            })?)
        };
        Ok(Durable {
            dir: dir.to_path_buf(),
            db_file,
            state: Mutex::new(FlushState::default()),
            finished: Condvar::new(),
            blobs: Mutex::new(HashMap::new()),
        })
    }

    /// Make every write made before this call durable (group commit).
    fn flush(&self, db: &sled::Db) -> Result<(), StoreError> {
        let mut st = self.state.lock().map_err(poisoned)?;
        if st.running < MAX_OVERLAPPING {
            st.running += 1;
            st.started += 1;
            drop(st);
            return self.run(db, None);
        }
        let slot = st.queued.get_or_insert_with(Default::default).clone();
        loop {
            if let Some(outcome) = slot.outcome.get() {
                return outcome.clone().map_err(StoreError::Flush);
            }
            let ours_to_start = st.queued.as_ref().is_some_and(|q| Arc::ptr_eq(q, &slot));
            if ours_to_start && st.running < MAX_OVERLAPPING {
                st.queued = None;
                st.running += 1;
                st.started += 1;
                drop(st);
                return self.run(db, Some(slot));
            }
            st = self.finished.wait(st).map_err(poisoned)?;
        }
    }

    /// Run one flush; answer the callers of `slot` and wake every waiter.
    fn run(&self, db: &sled::Db, slot: Option<Arc<FlushSlot>>) -> Result<(), StoreError> {
        let result = self.flush_once(db);
        if let Err(e) = &result {
            tracing::error!(error = %e, "store flush failed");
        }
        if let Some(slot) = &slot {
            let _ = slot
                .outcome
                .set(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
        {
            let mut st = self.state.lock().map_err(poisoned)?;
            st.running -= 1;
            st.finished += 1;
            st.failed += u64::from(result.is_err());
        }
        self.finished.notify_all();
        result
    }

    fn flush_once(&self, db: &sled::Db) -> Result<(), StoreError> {
        let Some(db_file) = &self.db_file else {
            db.flush()?;
            return Ok(());
        };
        self.sync_blobs()?;
        db.flush()?;
        db_file.sync_data().map_err(|source| StoreError::Sync {
            path: self.dir.join("db"),
            source,
        })
    }

    /// `fdatasync` every blob file that is new or grew since its last sync; `fsync` the
    /// directory when files were added. Files that disappeared are forgotten.
    fn sync_blobs(&self) -> Result<(), StoreError> {
        let dir = self.dir.join("blobs");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StoreError::Sync { path: dir, source }),
        };
        let mut known = self
            .blobs
            .lock()
            .map_err(|_| StoreError::Flush("blob state poisoned".into()))?;
        let mut seen = HashMap::with_capacity(known.len());
        let mut added = false;
        for entry in entries {
            let entry = entry.map_err(|source| StoreError::Sync {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let path = entry.path();
            let f = match File::open(&path) {
                Ok(f) => f,
                // Removed by sled meanwhile (superseded): nothing to make durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(StoreError::Sync { path, source }),
            };
            let len = f
                .metadata()
                .map_err(|source| StoreError::Sync {
                    path: path.clone(),
                    source,
                })?
                .len();
            let old = known.get(&name).copied();
            if old != Some(len) {
                f.sync_data()
                    .map_err(|source| StoreError::Sync { path, source })?;
                added |= old.is_none();
            }
            if seen.len() < MAX_TRACKED_BLOBS {
                seen.insert(name, len);
            }
        }
        *known = seen;
        if added {
            sync_path(&dir, false)?;
        }
        Ok(())
    }
}

/// Set `path` to `mode` and check that it took (a file we do not own cannot be changed).
pub fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    let got = std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777;
    if got != mode {
        return Err(std::io::Error::other(format!(
            "mode is {got:o} after setting {mode:o}"
        )));
    }
    Ok(())
}

/// The store directory 0700 and everything in it 0700 (directories) or 0600 (files), however
/// it was created (umask 000, an older version, a restored backup). Files sled creates later
/// are inside the 0700 directory.
fn restrict_tree(dir: &Path) -> Result<(), StoreError> {
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| StoreError::Permissions { path, cause }
    };
    restrict(dir, 0o700).map_err(fail(dir))?;
    for entry in std::fs::read_dir(dir).map_err(fail(dir))? {
        let entry = entry.map_err(fail(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(fail(&path))?;
        if kind.is_dir() {
            restrict_tree(&path)?;
        } else if kind.is_file() {
            restrict(&path, 0o600).map_err(fail(&path))?;
        }
    }
    Ok(())
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                StoreError::Locked(io.to_string())
            }
            sled::Error::Io(io) if io.to_string().contains("lock") => {
                StoreError::Locked(io.to_string())
            }
            other => StoreError::Db(other.to_string()),
        }
    }
}

/// One certificate the CA issued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertRecord {
    /// Lower-case hex of the serial number bytes.
    pub serial: String,
    pub device_id: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub issued_at: i64,
    /// Unix seconds of revocation, if revoked.
    pub revoked_at: Option<i64>,
    /// `csr` when the device kept its key, `generated` when the CA made the key.
    pub key_source: String,
    pub cert_pem: String,
}

/// An FDO ownership voucher this gateway owns (imported or received), keyed by device GUID.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VoucherRecord {
    /// Lower-case hex of the 16 GUID bytes.
    pub guid: String,
    pub device_info: String,
    /// Key id of the owner key the voucher is extended to.
    pub owner_key_id: String,
    pub entries: u32,
    /// Unix seconds.
    pub imported_at: i64,
    /// The CBOR voucher (hex in the stored JSON).
    #[serde(with = "hex_bytes")]
    pub voucher: Vec<u8>,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

/// An append-only, durable FIFO of opaque records keyed by a monotonic sequence number.
/// Appends are made durable by [`Store::flush`] (the caller batches: group commit).
#[derive(Clone)]
pub struct Log {
    tree: sled::Tree,
}

impl Log {
    /// Append records, numbering them from `first_seq`. Not flushed.
    pub fn append(&self, first_seq: u64, records: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (i, r) in records.iter().enumerate() {
            batch.insert(&(first_seq + i as u64).to_be_bytes(), r.as_slice());
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Up to `limit` records with sequence >= `from`, in order.
    pub fn read_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in self.tree.range(from.to_be_bytes()..).take(limit) {
            let (k, v) = item?;
            out.push((seq_of(&k)?, v.to_vec()));
        }
        Ok(out)
    }

    /// Remove records (not flushed: a lost removal means a message is sent again).
    pub fn remove(&self, seqs: &[u64]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for s in seqs {
            batch.remove(&s.to_be_bytes());
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Insert one record under `seq` (not flushed).
    pub fn insert(&self, seq: u64, record: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(seq.to_be_bytes(), record)?;
        Ok(())
    }

    /// The record with the highest sequence number at or below `seq`.
    pub fn record_at_or_before(&self, seq: u64) -> Result<Option<(u64, Record)>, StoreError> {
        match self.tree.range(..=seq.to_be_bytes()).next_back() {
            Some(item) => {
                let (k, v) = item?;
                Ok(Some((seq_of(&k)?, Record(v))))
            }
            None => Ok(None),
        }
    }

    /// The record with the highest sequence number.
    pub fn last_record(&self) -> Result<Option<(u64, Record)>, StoreError> {
        match self.tree.last()? {
            Some((k, v)) => Ok(Some((seq_of(&k)?, Record(v)))),
            None => Ok(None),
        }
    }

    /// Like [`Self::read_from`], but the records are shared with the store's cache (no copy).
    pub fn read_records(&self, from: u64, limit: usize) -> Result<Vec<(u64, Record)>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in self.tree.range(from.to_be_bytes()..).take(limit) {
            let (k, v) = item?;
            out.push((seq_of(&k)?, Record(v)));
        }
        Ok(out)
    }

    pub fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        match self.tree.first()? {
            Some((k, _)) => Ok(Some(seq_of(&k)?)),
            None => Ok(None),
        }
    }

    pub fn last_seq(&self) -> Result<Option<u64>, StoreError> {
        match self.tree.last()? {
            Some((k, _)) => Ok(Some(seq_of(&k)?)),
            None => Ok(None),
        }
    }

    /// (record count, total value bytes): a full scan, for start-up.
    pub fn usage(&self) -> Result<(u64, u64), StoreError> {
        let (mut n, mut bytes) = (0u64, 0u64);
        for item in self.tree.iter() {
            let (_, v) = item?;
            n += 1;
            bytes += v.len() as u64;
        }
        Ok((n, bytes))
    }
}

/// A record of a [`Log`] as read, shared with the store's cache.
#[derive(Clone)]
pub struct Record(sled::IVec);

#[cfg(test)]
impl Record {
    /// A record that never was in a store (tests of the readers).
    pub(crate) fn from_bytes(b: &[u8]) -> Record {
        Record(sled::IVec::from(b))
    }
}

impl std::ops::Deref for Record {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// A (key, value) pair of a [`Table`].
pub type TableEntry = (Vec<u8>, Vec<u8>);

/// A named key-value table of opaque records (e.g. the rendezvous registrations).
#[derive(Clone)]
pub struct Table {
    store: Store,
    tree: sled::Tree,
}

impl Table {
    /// Insert or replace, durable before returning.
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(key, value)?;
        self.store.flush()
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    /// Remove keys (not flushed: callers use it for entries that are void anyway).
    pub fn remove(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k.as_slice());
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    pub fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(key)?)
    }

    /// Number of entries (walks the table).
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// The entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<TableEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Apply puts and removals as one atomic batch, **not** flushed: the caller makes it
    /// durable with [`Store::flush`] before it acknowledges anything that depends on it
    /// (the sessions owner's group commit).
    pub fn apply(
        &self,
        puts: &[(Vec<u8>, Vec<u8>)],
        removes: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for k in removes {
            batch.remove(k.as_slice());
        }
        for (k, v) in puts {
            batch.insert(k.as_slice(), v.as_slice());
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Up to `limit` entries with keys in `[from, ...)` that start with `prefix`, in order.
    pub fn scan_prefix_from(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<TableEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.range(from..) {
            let (k, v) = item?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// The last entry whose key starts with `prefix`.
    pub fn last_with_prefix(&self, prefix: &[u8]) -> Result<Option<TableEntry>, StoreError> {
        match self.tree.scan_prefix(prefix).next_back() {
            Some(item) => {
                let (k, v) = item?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    /// Every entry, in key order.
    pub fn entries(&self) -> Result<Vec<TableEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

/// Bring a store of schema `from` up to [`SCHEMA_VERSION`], one step at a time. Each step
/// only adds what its version introduced; the caller writes the new version and flushes.
fn migrate(db: &sled::Db, from: u32) -> Result<(), StoreError> {
    let mut v = from;
    while v < SCHEMA_VERSION {
        match v {
            1 => {
                // Version 2 adds the sessions tables. A version 1 store has no such trees;
                // anything found under these names is not ours to interpret: refuse.
                for name in ["table/sessions", "table/session-queue", "table/retained"] {
                    if db
                        .tree_names()
                        .iter()
                        .any(|n| n.as_ref() == name.as_bytes())
                        && !db.open_tree(name)?.is_empty()
                    {
                        return Err(StoreError::Corrupt {
                            key: name.into(),
                            reason: "a schema 1 store already holds this tree".into(),
                        });
                    }
                    db.open_tree(name)?;
                }
            }
            other => {
                return Err(StoreError::Schema {
                    found: other,
                    expected: SCHEMA_VERSION,
                })
            }
        }
        v += 1;
    }
    Ok(())
}

fn seq_of(k: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(k)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            key: format!("log/{}", hex::encode(k)),
            reason: "key is not a sequence number".into(),
        })
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    certs: sled::Tree,
    certs_by_id: sled::Tree,
    vouchers: sled::Tree,
    durable: Arc<Durable>,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|cause| StoreError::Permissions {
                path: dir.to_path_buf(),
                cause,
            })?;
        restrict_tree(dir)?;
        // A process that just closed the store may still hold its file lock for a moment
        // (sled releases it when its background threads finish): retry briefly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                // sled's own background flush (its default, stated because the uplink
                // queue relies on it to bound how long a removal stays un-flushed).
                .flush_every_ms(Some(500))
                // sled's page cache defaults to 1 GiB; the gateway's data (CA, certificates,
                // vouchers, the uplink queue) needs far less, and a gateway is a small box.
                .cache_capacity(CACHE_CAPACITY)
                .open()
            {
                Ok(db) => break db,
                Err(e) => match StoreError::from(e) {
                    StoreError::Locked(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    other => return Err(other),
                },
            }
        };
        // Again: sled has just created its files on a first open.
        restrict_tree(dir)?;
        let meta = db.open_tree(META)?;
        let durable = Arc::new(Durable::open(dir)?);
        match meta.get(KEY_SCHEMA)? {
            None => {
                meta.insert(KEY_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                durable.flush(&db)?;
            }
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        key: "meta/schema_version".into(),
                        reason: format!("{} bytes", v.len()),
                    })?;
                if found == 0 || found > SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
                if found < SCHEMA_VERSION {
                    migrate(&db, found)?;
                    meta.insert(KEY_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                    durable.flush(&db)?;
                    tracing::info!(
                        from = found,
                        to = SCHEMA_VERSION,
                        "store migrated to the current schema"
                    );
                }
            }
        }
        Ok(Store {
            certs: db.open_tree(CERTS)?,
            certs_by_id: db.open_tree(CERTS_BY_ID)?,
            vouchers: db.open_tree(VOUCHERS)?,
            meta,
            db,
            durable,
        })
    }

    /// A named durable log (e.g. the uplink queue).
    pub fn log(&self, name: &str) -> Result<Log, StoreError> {
        Ok(Log {
            tree: self.db.open_tree(format!("log/{name}"))?,
        })
    }

    /// A named key-value table.
    pub fn table(&self, name: &str) -> Result<Table, StoreError> {
        Ok(Table {
            store: self.clone(),
            tree: self.db.open_tree(format!("table/{name}"))?,
        })
    }

    /// Make every write made before this call durable against power loss (group commit:
    /// concurrent callers share one flush; see [`Durable`]).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.durable.flush(&self.db)
    }

    /// Insert or replace a certificate record (flushed before returning).
    pub fn put_cert(&self, rec: &CertRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(rec).map_err(|e| StoreError::Db(e.to_string()))?;
        self.certs.insert(rec.serial.as_bytes(), value)?;
        self.certs_by_id
            .insert(id_key(&rec.device_id, &rec.serial), &[])?;
        self.flush()
    }

    pub fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        match self.certs.get(serial.as_bytes())? {
            None => Ok(None),
            Some(v) => decode(serial, &v).map(Some),
        }
    }

    pub fn certs(&self) -> Result<Vec<CertRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.certs.iter() {
            let (k, v) = item?;
            out.push(decode(&String::from_utf8_lossy(&k), &v)?);
        }
        out.sort_by(|a, b| (a.issued_at, &a.serial).cmp(&(b.issued_at, &b.serial)));
        Ok(out)
    }

    pub fn certs_for_device(&self, device_id: &str) -> Result<Vec<CertRecord>, StoreError> {
        let mut prefix = device_id.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.certs_by_id.scan_prefix(&prefix) {
            let (k, _) = item?;
            let serial = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if let Some(rec) = self.cert(&serial)? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Store the voucher of a device (flushed before returning). Returns whether one was
    /// stored for that GUID before (it is replaced).
    pub fn put_voucher(&self, guid: &[u8; 16], rec: &VoucherRecord) -> Result<bool, StoreError> {
        let value = serde_json::to_vec(rec).map_err(|e| StoreError::Db(e.to_string()))?;
        let old = self.vouchers.insert(guid, value)?;
        self.flush()?;
        Ok(old.is_some())
    }

    pub fn voucher(&self, guid: &[u8; 16]) -> Result<Option<VoucherRecord>, StoreError> {
        match self.vouchers.get(guid)? {
            None => Ok(None),
            Some(v) => decode_voucher(guid, &v).map(Some),
        }
    }

    /// Every stored voucher, by GUID.
    pub fn vouchers(&self) -> Result<Vec<VoucherRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.vouchers.iter() {
            let (k, v) = item?;
            out.push(decode_voucher(&k, &v)?);
        }
        Ok(out)
    }

    /// A small integer in the meta tree (not flushed: callers flush when it matters).
    pub fn meta_u64(&self, key: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .meta
            .get(key.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    pub fn set_meta_u64(&self, key: &str, v: u64) -> Result<(), StoreError> {
        self.meta.insert(key.as_bytes(), &v.to_be_bytes())?;
        Ok(())
    }

    /// Next CRL number (monotonic across restarts; flushed before returning).
    pub fn next_crl_number(&self) -> Result<u64, StoreError> {
        let next = self
            .meta
            .update_and_fetch(KEY_CRL_NUMBER, |old| {
                let n = old
                    .and_then(|o| <[u8; 8]>::try_from(o).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                Some((n + 1).to_be_bytes().to_vec())
            })?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(1);
        self.flush()?;
        Ok(next)
    }
}

fn id_key(device_id: &str, serial: &str) -> Vec<u8> {
    let mut k = device_id.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(serial.as_bytes());
    k
}

fn decode_voucher(key: &[u8], v: &[u8]) -> Result<VoucherRecord, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: format!("vouchers/{}", hex::encode(key)),
        reason: e.to_string(),
    })
}

fn decode(key: &str, v: &[u8]) -> Result<CertRecord, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: format!("certs/{key}"),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(serial: &str, id: &str) -> CertRecord {
        CertRecord {
            serial: serial.into(),
            device_id: id.into(),
            not_before: 1,
            not_after: 2,
            issued_at: 3,
            revoked_at: None,
            key_source: "csr".into(),
            cert_pem: "pem".into(),
        }
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put_cert(&rec("aa", "dev1")).unwrap();
            s.put_cert(&rec("bb", "dev2")).unwrap();
            assert_eq!(s.next_crl_number().unwrap(), 1);
            assert_eq!(s.next_crl_number().unwrap(), 2);
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.certs().unwrap().len(), 2);
        assert_eq!(s.certs_for_device("dev1").unwrap(), vec![rec("aa", "dev1")]);
        assert_eq!(s.next_crl_number().unwrap(), 3);
    }

    #[test]
    fn log_appends_reads_in_order_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let log = s.log("q").unwrap();
            log.append(1, &[b"a".to_vec(), b"bb".to_vec(), b"ccc".to_vec()])
                .unwrap();
            s.flush().unwrap();
            log.remove(&[1]).unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let log = s.log("q").unwrap();
        assert_eq!(
            log.read_from(0, 10).unwrap(),
            vec![(2, b"bb".to_vec()), (3, b"ccc".to_vec())]
        );
        assert_eq!(log.read_from(3, 10).unwrap().len(), 1);
        assert_eq!(
            (log.first_seq().unwrap(), log.last_seq().unwrap()),
            (Some(2), Some(3))
        );
        assert_eq!(log.usage().unwrap(), (2, 5));
    }

    #[test]
    fn log_finds_the_record_covering_a_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let log = s.log("q").unwrap();
        assert!(log.record_at_or_before(5).unwrap().is_none());
        assert!(log.last_record().unwrap().is_none());
        log.insert(10, b"ten").unwrap();
        log.insert(20, b"twenty").unwrap();
        let at = |q: u64| {
            log.record_at_or_before(q)
                .unwrap()
                .map(|(k, r)| (k, r.to_vec()))
        };
        assert_eq!(at(9), None);
        assert_eq!(at(10), Some((10, b"ten".to_vec())));
        assert_eq!(at(19), Some((10, b"ten".to_vec())));
        assert_eq!(at(u64::MAX), Some((20, b"twenty".to_vec())));
        let shared = log.read_records(11, 10).unwrap();
        assert_eq!((shared[0].0, &*shared[0].1), (20, &b"twenty"[..]));
        assert_eq!(log.last_record().unwrap().map(|(k, _)| k), Some(20));
        log.remove(&[10]).unwrap();
        assert_eq!(at(19), None);
    }

    #[test]
    fn vouchers_are_kept_by_guid_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |n: u32| VoucherRecord {
            guid: hex::encode([9u8; 16]),
            device_info: "d".into(),
            owner_key_id: "k".into(),
            entries: n,
            imported_at: 1,
            voucher: vec![0x85, n as u8],
        };
        {
            let s = Store::open(dir.path()).unwrap();
            assert!(!s.put_voucher(&[9; 16], &rec(1)).unwrap());
            assert!(s.put_voucher(&[9; 16], &rec(2)).unwrap());
            assert!(s.voucher(&[8; 16]).unwrap().is_none());
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.voucher(&[9; 16]).unwrap(), Some(rec(2)));
        assert_eq!(s.vouchers().unwrap(), vec![rec(2)]);
    }

    #[test]
    fn prefix_scan_does_not_leak_similar_ids() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.put_cert(&rec("01", "dev")).unwrap();
        s.put_cert(&rec("02", "dev1")).unwrap();
        assert_eq!(s.certs_for_device("dev").unwrap().len(), 1);
    }

    #[test]
    fn flush_syncs_new_blobs_and_groups_concurrent_callers() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let log = s.log("q").unwrap();
        // Far above sled's inline threshold: stored as a blob file.
        log.insert(1, &vec![7u8; 1 << 20]).unwrap();
        s.flush().unwrap();
        let tracked = s.durable.blobs.lock().unwrap().len();
        assert!(tracked >= 1, "the blob file was not synced");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let t = s.table("t").unwrap();
                    for j in 0..50u32 {
                        t.put(&[i, j as u8], b"v").unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let st = s.durable.state.lock().unwrap();
        assert_eq!((st.finished, st.failed), (st.started, 0));
        assert_eq!(st.running, 0);
        assert!(st.queued.is_none());
        // 400 flushing writes from 8 threads: waiters shared queued flushes.
        assert!(st.started <= 401, "{} flushes", st.started);
    }

    /// A store written at schema 1 (before the sessions tables) opens, keeps its records and
    /// is stamped with the current version; reopening it changes nothing.
    #[test]
    fn schema_1_store_is_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.table("rendezvous").unwrap().put(b"k", b"v").unwrap();
            s.meta.insert(KEY_SCHEMA, &1u32.to_be_bytes()).unwrap();
            for name in ["table/sessions", "table/session-queue", "table/retained"] {
                s.db.drop_tree(name).unwrap();
            }
            s.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.table("rendezvous").unwrap().get(b"k").unwrap(),
            Some(b"v".to_vec())
        );
        let v = s.meta.get(KEY_SCHEMA).unwrap().unwrap();
        assert_eq!(v.as_ref(), &SCHEMA_VERSION.to_be_bytes());
        assert!(s.table("sessions").unwrap().is_empty());
        drop(s);
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn newer_and_zero_schema_versions_are_refused() {
        for bad in [0u32, SCHEMA_VERSION + 1] {
            let dir = tempfile::tempdir().unwrap();
            {
                let db = sled::open(dir.path()).unwrap();
                db.open_tree(META)
                    .unwrap()
                    .insert(KEY_SCHEMA, &bad.to_be_bytes())
                    .unwrap();
                db.flush().unwrap();
            }
            assert!(matches!(
                Store::open(dir.path()),
                Err(StoreError::Schema { .. })
            ));
        }
    }

    #[test]
    fn wrong_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree(META)
                .unwrap()
                .insert(KEY_SCHEMA, &99u32.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        match Store::open(dir.path()) {
            Err(StoreError::Schema { found: 99, .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a store with a foreign schema"),
        }
    }
}
