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
