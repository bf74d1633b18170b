//! The device registry of a gateway or cloud: the append-only store log `fdo-registry`, one
//! JSON record per onboarding, with its indexes by GUID and by voucher GUID, and the
//! conflict rule for a device registered twice.
//!
//! The owner service records into it (`fdo::owner_backend`), the registry sync replicates it
//! (`sync.rs`), the admin socket and `outpost registry` read it. It stands on the store and
//! the FDO wire format only, never on the FDO services (checked by `tests/layering.rs`).
//! Every append is flushed before it returns.

use crate::fdo_wire::FdoError;
use crate::store::{Log, Store};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
