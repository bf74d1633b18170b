//! The owner backend of a gateway or cloud on its store: vouchers imported with
//! `outpost voucher import` (the `vouchers` tree), the owner keys of the data directory, and
//! the device registry (the append-only log `fdo-registry`, one JSON record per onboarding).
//!
//! When a device completes TO2 the replacement voucher (its new GUID, extended to nobody:
//! the owner key is its OVPubKey) is stored too, so the device can be onboarded again.
//! Every write is flushed before TO2.Done2 is sent.

use super::owner::{self, OwnerKey};
use super::owner_service::{OnboardRecord, OwnerBackend};
use crate::fdo_wire::crypto::SigningKey;
use crate::fdo_wire::types::{Guid, PublicKey};
use crate::fdo_wire::voucher::OwnershipVoucher;
use crate::fdo_wire::FdoError;
use crate::store::{Log, Store, VoucherRecord};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Name of the registry log in the store.
pub const REGISTRY_LOG: &str = "fdo-registry";

/// One registry entry (JSON in the store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntry {
    pub guid: String,
    pub old_guid: String,
    pub device_info: String,
    pub device_cert_hash: Option<String>,
    pub cert_serial: Option<String>,
    pub onboarded_at: i64,
    pub peer: Option<String>,
    pub owner_key_id: String,
    /// Where: the role that onboarded it (`gateway <id>` or `cloud`).
    pub registered_by: String,
    pub devmod: Vec<(String, String)>,
}

/// Name of the store table indexing the registry by GUID.
pub const REGISTRY_INDEX: &str = "fdo-registry-index";
/// Name of the store table indexing the registry by voucher GUID (`old_guid/guid` → seq).
pub const REGISTRY_BY_VOUCHER: &str = "fdo-registry-by-voucher";

fn voucher_key(e: &RegistryEntry) -> Vec<u8> {
    format!("{}/{}", e.old_guid, e.guid).into_bytes()
}

/// What [`Registry::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Recorded with this sequence number.
    New(u64),
    /// An entry for this GUID was recorded before: nothing written.
    Duplicate,
}

/// The device registry: an append-only log of [`RegistryEntry`] (store log `fdo-registry`)
/// with an index by GUID, so that recording the same onboarding twice (a resend after a
/// crash, a sync message delivered again) is a no-op. Every append is flushed before it
/// returns, and announced on [`Registry::changed`].
pub struct Registry {
    store: Store,
    log: Log,
    index: crate::store::Table,
    by_voucher: crate::store::Table,
    next_seq: Mutex<u64>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Registry {
    pub fn open(store: &Store) -> Result<Registry, FdoError> {
        let log = store.log(REGISTRY_LOG)?;
        let index = store.table(REGISTRY_INDEX)?;
        let by_voucher = store.table(REGISTRY_BY_VOUCHER)?;
        let next = log.last_seq()?.map(|s| s + 1).unwrap_or(0);
        // The indexes may lag the log after a crash between the writes: catch up.
        let n = log.usage()?.0;
        if index.len() as u64 != n || by_voucher.len() as u64 != n {
            for (seq, e) in read_log_seq(&log)? {
                if !index.contains(e.guid.as_bytes())? {
                    index.put(e.guid.as_bytes(), &seq.to_be_bytes())?;
                }
                if !by_voucher.contains(&voucher_key(&e))? {
                    by_voucher.put(&voucher_key(&e), &seq.to_be_bytes())?;
                }
            }
        }
        let (changed, _) = tokio::sync::watch::channel(next);
        Ok(Registry {
            store: store.clone(),
            log,
            index,
            by_voucher,
            next_seq: Mutex::new(next),
            changed,
        })
    }

    /// Record an onboarding unless its GUID is already recorded.
    pub fn append(&self, entry: &RegistryEntry) -> Result<Appended, FdoError> {
        let json = serde_json::to_vec(entry)
            .map_err(|e| FdoError::Crypto(format!("registry entry: {e}")))?;
        let mut seq = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        if self.index.contains(entry.guid.as_bytes())? {
            return Ok(Appended::Duplicate);
        }
        let n = *seq;
        self.log.append(n, &[json])?;
        self.store.flush()?;
        self.index.put(entry.guid.as_bytes(), &n.to_be_bytes())?;
        self.by_voucher.put(&voucher_key(entry), &n.to_be_bytes())?;
        *seq += 1;
        drop(seq);
        self.changed.send_replace(n + 1);
        Ok(Appended::New(n))
    }

    /// Entries with sequence numbers `>= from`, oldest first, at most `limit`.
    pub fn read_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, RegistryEntry)>, FdoError> {
        let mut out = Vec::new();
        for (seq, v) in self.log.read_from(from, limit)? {
            match serde_json::from_slice(&v) {
                Ok(e) => out.push((seq, e)),
                Err(e) => tracing::warn!(seq, error = %e, "skipping unreadable registry entry"),
            }
        }
        Ok(out)
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Result<Vec<RegistryEntry>, FdoError> {
        read_log(&self.log)
    }

    /// Every registration of the voucher GUID `old_guid` (more than one: a conflict).
    pub fn same_voucher(&self, old_guid: &str) -> Result<Vec<RegistryEntry>, FdoError> {
        let mut out = Vec::new();
        for (_, v) in self
            .by_voucher
            .scan_prefix(format!("{old_guid}/").as_bytes())?
        {
            let Ok(seq) = <[u8; 8]>::try_from(v.as_slice()).map(u64::from_be_bytes) else {
                continue;
            };
            out.extend(
                self.read_from(seq, 1)?
                    .into_iter()
                    .filter(|(s, _)| *s == seq)
                    .map(|(_, e)| e),
            );
        }
        Ok(out)
    }

    pub fn contains(&self, guid: &str) -> Result<bool, FdoError> {
        Ok(self.index.contains(guid.as_bytes())?)
    }

    /// The next sequence number, updated after every append.
    pub fn changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The deterministic rule for a device registered twice (the same voucher GUID onboarded on
/// both sides of a partition, or twice anywhere): the earlier onboarding wins; on equal
/// times the smaller `registered_by`, then the smaller new GUID. Every side that sees both
/// entries reaches the same answer whatever the order they arrived in. Returns the loser.
pub fn conflict_loser<'a>(a: &'a RegistryEntry, b: &'a RegistryEntry) -> &'a RegistryEntry {
    let key = |e: &'a RegistryEntry| (e.onboarded_at, e.registered_by.as_str(), e.guid.as_str());
    if key(a) <= key(b) {
        b
    } else {
        a
    }
}

/// Entries that lost to another registration of the same voucher GUID (see
/// [`conflict_loser`]): their GUIDs.
pub fn superseded(entries: &[RegistryEntry]) -> std::collections::HashSet<String> {
    let mut best: std::collections::HashMap<&str, &RegistryEntry> = Default::default();
    let mut out = std::collections::HashSet::new();
    for e in entries {
        match best.get(e.old_guid.as_str()) {
            None => {
                best.insert(&e.old_guid, e);
            }
            Some(b) => {
                let loser = conflict_loser(b, e);
                out.insert(loser.guid.clone());
                if std::ptr::eq(loser, *b) {
                    best.insert(&e.old_guid, e);
                }
            }
        }
    }
    out
}

type Keys = Vec<(Arc<SigningKey>, String)>;

/// [`OwnerBackend`] on the store and the owner keys of a data directory.
pub struct StoreOwnerBackend {
    store: Store,
    data_dir: std::path::PathBuf,
    /// The owner keys, re-read from `data_dir` when a lookup misses (a key created or
    /// rotated while the gateway runs). Never held across an await.
    keys: Mutex<Keys>,
    registry: Arc<Registry>,
    registered_by: String,
}

impl StoreOwnerBackend {
    /// Owner keys are read from `data_dir` now, and again when a lookup misses.
    pub fn open(store: Store, data_dir: &Path, registered_by: &str) -> Result<Self, FdoError> {
        let registry = Arc::new(Registry::open(&store)?);
        Self::with_registry(store, data_dir, registered_by, registry)
    }

    /// The same, recording into a registry shared with others (the sync).
    pub fn with_registry(
        store: Store,
        data_dir: &Path,
        registered_by: &str,
        registry: Arc<Registry>,
    ) -> Result<Self, FdoError> {
        let keys = read_keys(data_dir)?;
        Ok(StoreOwnerBackend {
            store,
            data_dir: data_dir.to_path_buf(),
            keys: Mutex::new(keys),
            registry,
            registered_by: registered_by.to_string(),
        })
    }

    /// The registry, oldest first.
    pub fn registry(&self) -> Result<Vec<RegistryEntry>, FdoError> {
        self.registry.entries()
    }

    pub fn shared_registry(&self) -> &Arc<Registry> {
        &self.registry
    }
}

fn read_keys(data_dir: &Path) -> Result<Keys, FdoError> {
    Ok(owner::all(data_dir)?
        .into_iter()
        .map(|OwnerKey { key, key_id, .. }| (Arc::new(key), key_id))
        .collect())
}

fn find_key(keys: &Keys, key: &PublicKey) -> Option<Arc<SigningKey>> {
    keys.iter()
        .find(|(k, _)| k.public_key().same_key(key))
        .map(|(k, _)| k.clone())
}

/// The registry of `store`, oldest first.
pub fn read(store: &Store) -> Result<Vec<RegistryEntry>, FdoError> {
    read_log(&store.log(REGISTRY_LOG)?)
}

fn read_log(log: &Log) -> Result<Vec<RegistryEntry>, FdoError> {
    Ok(read_log_seq(log)?.into_iter().map(|(_, e)| e).collect())
}

fn read_log_seq(log: &Log) -> Result<Vec<(u64, RegistryEntry)>, FdoError> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let batch = log.read_from(from, 256)?;
        let Some((last, _)) = batch.last() else {
            return Ok(out);
        };
        from = last + 1;
        for (seq, v) in batch {
            match serde_json::from_slice(&v) {
                Ok(e) => out.push((seq, e)),
                Err(e) => tracing::warn!(error = %e, "skipping unreadable registry entry"),
            }
        }
    }
}

impl OwnerBackend for StoreOwnerBackend {
    fn voucher(&self, guid: &Guid) -> Result<Option<OwnershipVoucher>, String> {
        match self.store.voucher(&guid.0).map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(rec) => OwnershipVoucher::decode(&rec.voucher)
                .map(Some)
                .map_err(|e| format!("stored voucher of {guid}: {e}")),
        }
    }

    fn owner_key(&self, key: &PublicKey) -> Option<Arc<SigningKey>> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = find_key(&keys, key) {
            return Some(k);
        }
        // A miss: the key may have been created or rotated since (by `outpost voucher
        // rotate-owner-key` or an installer import). Stored vouchers name only keys that
        // were ours at import, so misses are rare and re-reading a few files is cheap.
        match read_keys(&self.data_dir) {
            Ok(fresh) => {
                if fresh.len() != keys.len() {
                    tracing::info!(keys = fresh.len(), "owner keys reloaded");
                }
                *keys = fresh;
            }
            Err(e) => tracing::warn!(error = %e, "cannot reload the owner keys"),
        }
        find_key(&keys, key)
    }

    fn onboarded(
        &self,
        rec: &OnboardRecord,
        new_voucher: Option<&OwnershipVoucher>,
    ) -> Result<(), String> {
        if let Some(v) = new_voucher {
            let vr = VoucherRecord {
                guid: v.guid().hex(),
                device_info: v.header().device_info.clone(),
                owner_key_id: rec.owner_key_id.clone(),
                entries: v.entries().len() as u32,
                imported_at: rec.onboarded_at,
                voucher: v.encode(),
            };
            self.store
                .put_voucher(&v.guid().0, &vr)
                .map_err(|e| e.to_string())?;
        }
        let entry = RegistryEntry {
            guid: rec.guid.hex(),
            old_guid: rec.old_guid.hex(),
            device_info: rec.device_info.clone(),
            device_cert_hash: rec.device_cert_hash.clone(),
            cert_serial: rec.cert_serial.clone(),
            onboarded_at: rec.onboarded_at,
            peer: rec.peer.clone(),
            owner_key_id: rec.owner_key_id.clone(),
            registered_by: self.registered_by.clone(),
            devmod: rec.devmod.clone(),
        };
        self.registry.append(&entry).map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdo_wire::crypto::Curve;

    fn entry(guid: &str, at: i64, by: &str) -> RegistryEntry {
        RegistryEntry {
            guid: guid.into(),
            old_guid: "old".into(),
            device_info: String::new(),
            device_cert_hash: None,
            cert_serial: Some(format!("serial-{guid}")),
            onboarded_at: at,
            peer: None,
            owner_key_id: String::new(),
            registered_by: by.into(),
            devmod: Vec::new(),
        }
    }

    #[test]
    fn conflict_rule_is_deterministic_whatever_the_order() {
        let gw = entry("aa", 100, "gateway gw1");
        let cloud = entry("bb", 200, "cloud c1");
        assert_eq!(conflict_loser(&gw, &cloud).guid, "bb");
        assert_eq!(conflict_loser(&cloud, &gw).guid, "bb");
        // Same second: registered_by decides, then the GUID.
        let c2 = entry("cc", 100, "cloud c1");
        assert_eq!(conflict_loser(&gw, &c2).guid, "aa");
        assert_eq!(conflict_loser(&c2, &gw).guid, "aa");
        let g2 = entry("ab", 100, "gateway gw1");
        assert_eq!(conflict_loser(&gw, &g2).guid, "ab");
        // Three registrations in any order: the same two lose.
        let all = [gw.clone(), cloud.clone(), c2.clone()];
        let want: std::collections::HashSet<String> = ["bb", "aa"].map(String::from).into();
        for perm in [
            [0, 1, 2],
            [2, 1, 0],
            [1, 0, 2],
            [1, 2, 0],
            [0, 2, 1],
            [2, 0, 1],
        ] {
            let v: Vec<RegistryEntry> = perm.iter().map(|&i| all[i].clone()).collect();
            assert_eq!(superseded(&v), want, "{perm:?}");
        }
    }

    #[test]
    fn keys_created_or_rotated_later_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("owner");
        let old = owner::current_or_create(&data, Curve::P256, "test").unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let b = StoreOwnerBackend::open(store, &data, "gateway gw1").unwrap();
        let (new, retired) =
            owner::rotate(&data, owner::KeyKind::Owner, Curve::P256, "test").unwrap();
        assert_eq!(retired.as_deref(), Some(old.key_id.as_str()));
        let p384 = owner::current_or_create(&data, Curve::P384, "test").unwrap();
        for k in [&old, &new, &p384] {
            assert!(b.owner_key(&k.public_key()).is_some(), "{}", k.key_id);
        }
        let stranger = SigningKey::generate(Curve::P256).unwrap();
        assert!(b.owner_key(&stranger.public_key()).is_none());
    }

    #[test]
    fn registry_and_vouchers_persist() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("owner");
        let k = owner::current_or_create(&data, Curve::P256, "test").unwrap();
        let rec = OnboardRecord {
            old_guid: Guid([1; 16]),
            guid: Guid([2; 16]),
            device_info: "d".into(),
            device_cert_hash: None,
            cert_serial: Some("01".into()),
            onboarded_at: 5,
            peer: None,
            owner_key_id: k.key_id.clone(),
            devmod: vec![("devmod:os".into(), "linux".into())],
        };
        {
            let store = Store::open(&dir.path().join("store")).unwrap();
            let b = StoreOwnerBackend::open(store, &data, "gateway gw1").unwrap();
            assert!(b.owner_key(&k.public_key()).is_some());
            assert!(b.voucher(&Guid([1; 16])).unwrap().is_none());
            b.onboarded(&rec, None).unwrap();
        }
        let store = Store::open(&dir.path().join("store")).unwrap();
        let b = StoreOwnerBackend::open(store, &data, "gateway gw1").unwrap();
        // The same onboarding recorded again (a resend): nothing doubled.
        b.onboarded(&rec, None).unwrap();
        let rec2 = OnboardRecord {
            guid: Guid([3; 16]),
            ..rec.clone()
        };
        b.onboarded(&rec2, None).unwrap();
        let reg = b.registry().unwrap();
        assert_eq!(reg.len(), 2);
        assert_eq!(reg[0].guid, Guid([2; 16]).hex());
        assert_eq!(reg[1].registered_by, "gateway gw1");
        assert_eq!(
            b.shared_registry().append(&reg[0]).unwrap(),
            Appended::Duplicate
        );
        // Both registrations of the one voucher are found through the voucher index.
        let same = b
            .shared_registry()
            .same_voucher(&Guid([1; 16]).hex())
            .unwrap();
        assert_eq!(same.len(), 2);
        assert!(b.shared_registry().same_voucher("ff").unwrap().is_empty());
    }
}
