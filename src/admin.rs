//! The local admin socket: how `outpost ca ...` and `outpost voucher import` reach a running
//! gateway.
//!
//! A Unix socket `admin.sock` in the data directory, mode 0600 (only the gateway's user),
//! one JSON request per connection, one JSON reply. When no gateway runs, the CLI opens the
//! store itself instead (sled allows one process at a time, so never both).

use crate::ca::{CaError, CaHandle, Issued};
use crate::fdo::owner::Imported;
use crate::registry::RegistryEntry;
use crate::store::{CertRecord, Store};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const SOCKET: &str = "admin.sock";
const MAX_REQUEST: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("gateway answered: {0}")]
    Remote(String),
    #[error("unreadable answer from the gateway: {0}")]
    Protocol(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    IssueDevice {
        id: String,
        csr: Option<String>,
    },
    RevokeSerial {
        serial: String,
    },
    RevokeDevice {
        id: String,
    },
    List,
    /// Verify an ownership voucher (PEM) and store it if it is extended to one of this
    /// gateway's owner keys.
    ImportVoucher {
        voucher_pem: String,
    },
    /// The device registry (every completed onboarding), oldest first.
    Registry,
    /// Extend a voucher to a gateway's owner certificate and send it down with the sync.
    Delegate {
        gateway: String,
        voucher_pem: String,
        to_pem: String,
    },
    /// One page of the credential inventory.
    Credentials {
        query: crate::credentials::model::Query,
    },
    /// One credential with its jobs.
    Credential {
        id: String,
    },
    /// Run an operation on a credential (jobs for its holders).
    Operate {
        id: String,
        operation: crate::credentials::model::Operation,
        by: String,
        #[serde(default)]
        reason: String,
    },
    /// Record the vehicle and ECU a credential was issued for.
    Bind {
        id: String,
        vehicle: String,
        ecu: String,
        by: String,
    },
    /// Cancel a job.
    CancelJob {
        job: String,
        by: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Issued {
        serial: String,
        cert_pem: String,
        key_pem: Option<String>,
        ca_pem: String,
    },
    Records {
        records: Vec<CertRecord>,
    },
    VoucherImported {
        guid: String,
        device_info: String,
        entries: usize,
        owner_key_id: String,
        replaced: bool,
        /// The voucher named this installer key; the gateway extended it to
        /// `owner_key_id`.
        #[serde(default)]
        installer_key_id: Option<String>,
    },
    Registry {
        entries: Vec<RegistryEntry>,
    },
    Delegated {
        guid: String,
        gateway: String,
    },
    Page {
        page: crate::credentials::model::Page,
    },
    Detail {
        detail: Option<Box<crate::credentials::service::Detail>>,
    },
    Jobs {
        jobs: Vec<crate::credentials::model::Job>,
    },
    Error {
        message: String,
    },
}

impl From<Issued> for Reply {
    fn from(i: Issued) -> Self {
        Reply::Issued {
            serial: i.serial,
            cert_pem: i.cert_pem,
            key_pem: i.key_pem,
            ca_pem: i.ca_pem,
        }
    }
}

impl From<Imported> for Reply {
    fn from(i: Imported) -> Self {
        Reply::VoucherImported {
            guid: i.guid.hex(),
            device_info: i.device_info,
            entries: i.entries,
            owner_key_id: i.owner_key_id,
            replaced: i.replaced,
            installer_key_id: i.installer_key_id,
        }
    }
}

/// What the admin socket serves: the CA (through its owner thread), and for voucher import
/// the store (vouchers tree) and the data directory (owner keys).
#[derive(Clone)]
pub struct Services {
    pub ca: CaHandle,
    pub store: Store,
    pub data_dir: PathBuf,
    /// Woken after a voucher import (the FDO registrar registers it at once).
    pub vouchers_changed: Option<Arc<Notify>>,
    /// Woken after a delegation (the cloud's sync sends it at once).
    pub sync_wake: Option<Arc<Notify>>,
    /// The credential inventory (`[credentials] enabled`).
    pub credentials: Option<crate::credentials::service::CredentialsHandle>,
}

fn no_credentials() -> Reply {
    Reply::Error {
        message: "the credential inventory is off (credentials.enabled = false)".into(),
    }
}

fn cred_err(e: crate::credentials::service::CredentialsError) -> Reply {
    Reply::Error {
        message: e.to_string(),
    }
}

fn records(r: Result<Vec<CertRecord>, CaError>) -> Reply {
    match r {
        Ok(records) => Reply::Records { records },
        Err(e) => Reply::Error {
            message: e.to_string(),
        },
    }
}

async fn handle(req: Request, svc: &Services) -> Reply {
    let ca = &svc.ca;
    match req {
        Request::IssueDevice { id, csr } => match ca.issue_device(&id, csr).await {
            Ok(i) => i.into(),
            Err(e) => Reply::Error {
                message: e.to_string(),
            },
        },
        Request::RevokeSerial { serial } => records(ca.revoke_serial(&serial).await),
        Request::RevokeDevice { id } => records(ca.revoke_device(&id).await),
        Request::List => records(ca.list().await),
        Request::ImportVoucher { voucher_pem } => {
            // Verification and the flushed store write are blocking work.
            let (store, dir) = (svc.store.clone(), svc.data_dir.clone());
            let r = tokio::task::spawn_blocking(move || {
                crate::fdo::owner::import_voucher(&store, &dir, voucher_pem.as_bytes())
            })
            .await;
            match r {
                Ok(Ok(i)) => {
                    if let Some(n) = &svc.vouchers_changed {
                        n.notify_one();
                    }
                    i.into()
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "voucher import refused");
                    Reply::Error {
                        message: e.to_string(),
                    }
                }
                Err(e) => Reply::Error {
                    message: format!("voucher import failed: {e}"),
                },
            }
        }
        Request::Delegate {
            gateway,
            voucher_pem,
            to_pem,
        } => {
            let (store, dir, gw) = (svc.store.clone(), svc.data_dir.clone(), gateway.clone());
            let r = tokio::task::spawn_blocking(move || {
                crate::sync::delegate(&store, &dir, &gw, voucher_pem.as_bytes(), &to_pem)
            })
            .await;
            match r {
                Ok(Ok(guid)) => {
                    if let Some(n) = &svc.sync_wake {
                        n.notify_one();
                    }
                    Reply::Delegated {
                        guid: guid.hex(),
                        gateway,
                    }
                }
                Ok(Err(e)) => Reply::Error {
                    message: e.to_string(),
                },
                Err(e) => Reply::Error {
                    message: format!("delegate: {e}"),
                },
            }
        }
        Request::Credentials { query } => match &svc.credentials {
            None => no_credentials(),
            Some(c) => match c.query(&query).await {
                Ok(page) => Reply::Page { page },
                Err(e) => cred_err(e),
            },
        },
        Request::Credential { id } => match &svc.credentials {
            None => no_credentials(),
            Some(c) => match c.show(&id).await {
                Ok(detail) => Reply::Detail {
                    detail: detail.map(Box::new),
                },
                Err(e) => cred_err(e),
            },
        },
        Request::Operate {
            id,
            operation,
            by,
            reason,
        } => match &svc.credentials {
            None => no_credentials(),
            Some(c) => match c.operate(&id, operation, &by, &reason).await {
                Ok(jobs) => Reply::Jobs { jobs },
                Err(e) => cred_err(e),
            },
        },
        Request::Bind {
            id,
            vehicle,
            ecu,
            by,
        } => match &svc.credentials {
            None => no_credentials(),
            Some(c) => match c.bind(&id, &vehicle, &ecu, &by).await {
                Ok(_) => match c.show(&id).await {
                    Ok(detail) => Reply::Detail {
                        detail: detail.map(Box::new),
                    },
                    Err(e) => cred_err(e),
                },
                Err(e) => cred_err(e),
            },
        },
        Request::CancelJob { job, by } => match &svc.credentials {
            None => no_credentials(),
            Some(c) => match c.cancel(&job, &by).await {
                Ok(j) => Reply::Jobs { jobs: vec![j] },
                Err(e) => cred_err(e),
            },
        },
        Request::Registry => {
            let store = svc.store.clone();
            let r = tokio::task::spawn_blocking(move || registry(&store)).await;
            match r {
                Ok(Ok(entries)) => Reply::Registry { entries },
                Ok(Err(e)) => Reply::Error {
                    message: e.to_string(),
                },
                Err(e) => Reply::Error {
                    message: format!("registry: {e}"),
                },
            }
        }
    }
}

/// The device registry of a store (also used by the CLI when nothing runs).
pub fn registry(store: &Store) -> Result<Vec<RegistryEntry>, crate::fdo_wire::FdoError> {
    crate::registry::read(store)
}

/// Bind the admin socket (replacing a stale one: the store lock proves no other gateway
/// uses this data dir).
pub fn bind(data_dir: &Path) -> Result<UnixListener, AdminError> {
    let path = data_dir.join(SOCKET);
    let io = |source| AdminError::Io {
        path: path.clone(),
        cause: source,
    };
    if path.exists() {
        std::fs::remove_file(&path).map_err(io)?;
    }
    let l = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(l)
}

pub async fn serve(
    listener: UnixListener,
    svc: Services,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { tracing::warn!(error = %e, "admin accept failed"); continue; }
            },
        };
        let (svc, shutdown) = (svc.clone(), shutdown.clone());
        tracker.spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let mut rd = BufReader::new(rd.take(MAX_REQUEST));
            // A client that sends nothing (or does not read its answer) must not hold up
            // shutdown: this task keeps the CA, and so the store, open. A request already
            // read is still carried out and answered.
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = rd.read_line(&mut line) => r,
            };
            let reply = match read {
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Ok(req) => handle(req, &svc).await,
                    Err(e) => Reply::Error {
                        message: format!("bad request: {e}"),
                    },
                },
                Err(e) => Reply::Error {
                    message: format!("read: {e}"),
                },
            };
            let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".into());
            text.push('\n');
            let write = wr.write_all(text.as_bytes());
            tokio::pin!(write);
            tokio::select! {
                biased;
                _ = &mut write => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// Send one request to the running gateway. `Ok(None)`: no gateway listens here.
pub async fn call(data_dir: &Path, req: &Request) -> Result<Option<Reply>, AdminError> {
    let path = data_dir.join(SOCKET);
    let io = |source| AdminError::Io {
        path: path.clone(),
        cause: source,
    };
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io(e)),
    };
    let (rd, mut wr) = stream.into_split();
    let mut text = serde_json::to_string(req).map_err(|e| AdminError::Protocol(e.to_string()))?;
    text.push('\n');
    wr.write_all(text.as_bytes()).await.map_err(io)?;
    let mut line = String::new();
    BufReader::new(rd.take(64 * MAX_REQUEST))
        .read_line(&mut line)
        .await
        .map_err(io)?;
    let reply: Reply =
        serde_json::from_str(&line).map_err(|e| AdminError::Protocol(e.to_string()))?;
    match reply {
        Reply::Error { message } => Err(AdminError::Remote(message)),
        other => Ok(Some(other)),
    }
}
