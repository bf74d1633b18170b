//! The owner backend of a gateway or cloud on its store: vouchers imported with
//! `outpost voucher import` (the `vouchers` tree), the owner keys of the data directory, and
//! the device registry (the append-only log `fdo-registry`, one JSON record per onboarding).
//!
//! When a device completes TO2 the replacement voucher (its new GUID, extended to nobody:
//! the owner key is its OVPubKey) is stored too, so the device can be onboarded again.
//! Every write is flushed before TO2.Done2 is sent.

use super::crypto::SigningKey;
use super::owner::{self, OwnerKey};
use super::owner_service::{OnboardRecord, OwnerBackend};
use super::types::{Guid, PublicKey};
use super::voucher::OwnershipVoucher;
use super::FdoError;
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

/// [`OwnerBackend`] on the store and the owner keys of a data directory.
pub struct StoreOwnerBackend {
    store: Store,
    keys: Vec<(Arc<SigningKey>, String)>,
    registry: Log,
    next_seq: Mutex<u64>,
    registered_by: String,
}

impl StoreOwnerBackend {
    /// Owner keys are read from `data_dir` once (restart to pick up new ones).
    pub fn open(store: Store, data_dir: &Path, registered_by: &str) -> Result<Self, FdoError> {
        let keys = owner::all(data_dir)?
            .into_iter()
            .map(|OwnerKey { key, key_id, .. }| (Arc::new(key), key_id))
            .collect();
        let registry = store.log(REGISTRY_LOG)?;
        let next = registry.last_seq()?.map(|s| s + 1).unwrap_or(0);
        Ok(StoreOwnerBackend {
            store,
            keys,
            registry,
            next_seq: Mutex::new(next),
            registered_by: registered_by.to_string(),
        })
    }

    /// The registry, oldest first.
    pub fn registry(&self) -> Result<Vec<RegistryEntry>, FdoError> {
        read_log(&self.registry)
    }
}

/// The registry of `store`, oldest first.
pub fn read(store: &Store) -> Result<Vec<RegistryEntry>, FdoError> {
    read_log(&store.log(REGISTRY_LOG)?)
}

fn read_log(log: &Log) -> Result<Vec<RegistryEntry>, FdoError> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let batch = log.read_from(from, 256)?;
        let Some((last, _)) = batch.last() else {
            return Ok(out);
        };
        from = last + 1;
        for (_, v) in batch {
            match serde_json::from_slice(&v) {
                Ok(e) => out.push(e),
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
        self.keys
            .iter()
            .find(|(k, _)| k.public_key().same_key(key))
            .map(|(k, _)| k.clone())
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
        let json = serde_json::to_vec(&entry).map_err(|e| e.to_string())?;
        let mut seq = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        self.registry
            .append(*seq, &[json])
            .map_err(|e| e.to_string())?;
        *seq += 1;
        self.store.flush().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdo::crypto::Curve;

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
        b.onboarded(&rec, None).unwrap();
        let reg = b.registry().unwrap();
        assert_eq!(reg.len(), 2);
        assert_eq!(reg[0].guid, Guid([2; 16]).hex());
        assert_eq!(reg[1].registered_by, "gateway gw1");
    }
}
