//! The credentials owner task. (Being written: the public API below is fixed.)

use super::inventory::InventoryError;
use super::model::{Credential, Invalid, Job, Operation, Page, Query};

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("no credential {0}")]
    NotFound(String),
    #[error("{0}")]
    NotAllowed(String),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("CA: {0}")]
    Ca(String),
    #[error("the credentials service has stopped")]
    Stopped,
}

/// One credential with its jobs, newest first.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Detail {
    pub credential: Credential,
    pub validity: super::model::Validity,
    pub jobs: Vec<Job>,
}

/// The clonable handle to the owner.
#[derive(Clone)]
pub struct CredentialsHandle {
    _private: (),
}

impl CredentialsHandle {
    /// One page of the inventory.
    pub async fn query(&self, _q: &Query) -> Result<Page, CredentialsError> {
        todo!()
    }
    /// One credential and its jobs (`None`: no such id).
    pub async fn show(&self, _id: &str) -> Result<Option<Detail>, CredentialsError> {
        todo!()
    }
    /// Run `op` on credential `id`: one job per holder, returned as made (queued).
    pub async fn operate(
        &self,
        _id: &str,
        _op: Operation,
        _by: &str,
        _reason: &str,
    ) -> Result<Vec<Job>, CredentialsError> {
        todo!()
    }
    /// Cancel a job that has not ended.
    pub async fn cancel(&self, _job: &str, _by: &str) -> Result<Job, CredentialsError> {
        todo!()
    }
    /// The expiring window, seconds.
    pub fn expiring_secs(&self) -> i64 {
        todo!()
    }
}
