//! The owner backend of a gateway or cloud on its store: vouchers imported with
//! `outpost voucher import` (the `vouchers` tree), the owner keys of the data directory, and
//! the device registry ([`crate::registry`]) that every onboarding is recorded in.
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
use crate::registry::{Registry, RegistryEntry};
use crate::store::{Store, VoucherRecord};
use std::path::Path;
use std::sync::{Arc, Mutex};

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
    use crate::registry::Appended;

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
