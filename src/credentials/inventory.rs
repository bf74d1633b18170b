//! The inventory's storage: one trait, [`InventoryStore`], with two implementations that the
//! same tests run against (`tests/inventory.rs`): the embedded store
//! ([`embedded::EmbeddedInventory`], on `store.rs`; the gateway's and the single-machine
//! cloud's) and PostgreSQL ([`postgres::PgInventory`], `[cloud] database_url`; a fleet that
//! sorts and searches a million rows, several cloud instances on one database).
//!
//! Every write is durable when its future resolves (the embedded store flushes; PostgreSQL
//! commits). Reads see every write that resolved before them.

use super::model::{Credential, Invalid, Job, Page, Query};
use std::future::Future;

pub mod embedded;
pub mod postgres;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("the inventory is closed")]
    Closed,
}

/// The inventory's storage. Implementations keep credentials by id and jobs by id, with
/// the lookups the service needs indexed (not scanned).
pub trait InventoryStore: Send + Sync + 'static {
    /// Insert or replace credentials (by id), durably, as one write.
    fn put(&self, creds: &[Credential]) -> impl Future<Output = Result<(), InventoryError>> + Send;
    fn get(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Credential>, InventoryError>> + Send;
    /// Every credential whose holder is `device`.
    fn by_holder(
        &self,
        device: &str,
    ) -> impl Future<Output = Result<Vec<Credential>, InventoryError>> + Send;
    /// Every credential with this serial or key id (any kind, any holder).
    fn by_serial(
        &self,
        serial: &str,
    ) -> impl Future<Output = Result<Vec<Credential>, InventoryError>> + Send;
    /// Every credential recorded for this vehicle (seed 000's binding check).
    fn by_vehicle(
        &self,
        vehicle: &str,
    ) -> impl Future<Output = Result<Vec<Credential>, InventoryError>> + Send;
    /// Every credential recorded for this ECU, in any vehicle.
    fn by_ecu(
        &self,
        ecu: &str,
    ) -> impl Future<Output = Result<Vec<Credential>, InventoryError>> + Send;
    /// Credentials of our CA not yet final whose `not_after` is at or before `until`
    /// (the renewal policy's sweep), at most `limit`.
    fn ending_before(
        &self,
        until: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Credential>, InventoryError>> + Send;
    /// One page of a query at `now`, with `expiring` seconds of warning (see
    /// [`Query::matches`] and [`Query::compare`], which both implementations must agree with).
    fn query(
        &self,
        q: &Query,
        now: i64,
        expiring: i64,
    ) -> impl Future<Output = Result<Page, InventoryError>> + Send;
    /// How many credentials there are.
    fn count(&self) -> impl Future<Output = Result<u64, InventoryError>> + Send;

    /// Insert or replace jobs (by id), durably, with the credentials given in the same write
    /// (so a job and the state it puts its credential in never part).
    fn put_jobs(
        &self,
        jobs: &[Job],
        creds: &[Credential],
    ) -> impl Future<Output = Result<(), InventoryError>> + Send;
    fn job(&self, id: &str) -> impl Future<Output = Result<Option<Job>, InventoryError>> + Send;
    /// The jobs of one holder, newest first; only those not ended when `open_only`.
    fn jobs_for_device(
        &self,
        device: &str,
        open_only: bool,
    ) -> impl Future<Output = Result<Vec<Job>, InventoryError>> + Send;
    /// The jobs of one credential, newest first.
    fn jobs_for_credential(
        &self,
        credential: &str,
    ) -> impl Future<Output = Result<Vec<Job>, InventoryError>> + Send;
    /// Every job not ended, oldest first, at most `limit` (timeouts, retries, restart).
    fn open_jobs(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Job>, InventoryError>> + Send;
}

pub use embedded::EmbeddedInventory;
pub use postgres::PgInventory;

/// The inventory a deployment uses: PostgreSQL when `[cloud] database_url` is set, the
/// embedded store otherwise.
#[derive(Clone)]
pub enum Inventory {
    Embedded(EmbeddedInventory),
    Postgres(PgInventory),
}

impl Inventory {
    /// The embedded inventory in `store` when `database_url` is empty, else PostgreSQL at
    /// that URL (its schema made when missing).
    pub async fn open(
        database_url: &str,
        store: &crate::store::Store,
    ) -> Result<Inventory, InventoryError> {
        if database_url.trim().is_empty() {
            Ok(Inventory::Embedded(
                EmbeddedInventory::open_async(store).await?,
            ))
        } else {
            Ok(Inventory::Postgres(PgInventory::open(database_url).await?))
        }
    }

    /// Count at most `cap` query matches instead of [`super::model::COUNT_CAP`] (tests).
    pub fn set_count_cap(&self, cap: u64) {
        match self {
            Inventory::Embedded(i) => i.set_count_cap(cap),
            Inventory::Postgres(i) => i.set_count_cap(cap),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $inv:ident => $call:expr) => {
        match $self {
            Inventory::Embedded($inv) => $call.await,
            Inventory::Postgres($inv) => $call.await,
        }
    };
}

impl InventoryStore for Inventory {
    async fn put(&self, creds: &[Credential]) -> Result<(), InventoryError> {
        delegate!(self, i => i.put(creds))
    }
    async fn get(&self, id: &str) -> Result<Option<Credential>, InventoryError> {
        delegate!(self, i => i.get(id))
    }
    async fn by_holder(&self, device: &str) -> Result<Vec<Credential>, InventoryError> {
        delegate!(self, i => i.by_holder(device))
    }
    async fn by_serial(&self, serial: &str) -> Result<Vec<Credential>, InventoryError> {
        delegate!(self, i => i.by_serial(serial))
    }
    async fn by_vehicle(&self, vehicle: &str) -> Result<Vec<Credential>, InventoryError> {
        delegate!(self, i => i.by_vehicle(vehicle))
    }
    async fn by_ecu(&self, ecu: &str) -> Result<Vec<Credential>, InventoryError> {
        delegate!(self, i => i.by_ecu(ecu))
    }
    async fn ending_before(
        &self,
        until: i64,
        limit: usize,
    ) -> Result<Vec<Credential>, InventoryError> {
        delegate!(self, i => i.ending_before(until, limit))
    }
    async fn query(&self, q: &Query, now: i64, expiring: i64) -> Result<Page, InventoryError> {
        delegate!(self, i => i.query(q, now, expiring))
    }
    async fn count(&self) -> Result<u64, InventoryError> {
        delegate!(self, i => i.count())
    }
    async fn put_jobs(&self, jobs: &[Job], creds: &[Credential]) -> Result<(), InventoryError> {
        delegate!(self, i => i.put_jobs(jobs, creds))
    }
    async fn job(&self, id: &str) -> Result<Option<Job>, InventoryError> {
        delegate!(self, i => i.job(id))
    }
    async fn jobs_for_device(
        &self,
        device: &str,
        open_only: bool,
    ) -> Result<Vec<Job>, InventoryError> {
        delegate!(self, i => i.jobs_for_device(device, open_only))
    }
    async fn jobs_for_credential(&self, credential: &str) -> Result<Vec<Job>, InventoryError> {
        delegate!(self, i => i.jobs_for_credential(credential))
    }
    async fn open_jobs(&self, limit: usize) -> Result<Vec<Job>, InventoryError> {
        delegate!(self, i => i.open_jobs(limit))
    }
}

/// The last of each id, in first-seen order: a batch that names one credential or job twice
/// writes its last version once (both stores).
fn dedup<T>(items: &[T], id: impl Fn(&T) -> &str) -> Vec<&T> {
    let mut at: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(items.len());
    let mut out: Vec<&T> = Vec::with_capacity(items.len());
    for it in items {
        match at.get(id(it)) {
            Some(&i) => out[i] = it,
            None => {
                at.insert(id(it), out.len());
                out.push(it);
            }
        }
    }
    out
}
