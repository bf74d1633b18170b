//! FIDO Device Onboard 1.1: the data model and the offline tools.
//!
//! This is the foundation the protocol (TO0, TO1, TO2 over HTTP) is built on:
//!
//! - [`cbor`]: bounded CBOR decoding, deterministic encoding, raw item spans;
//! - [`types`]: the wire types shared by every message (`Guid`, `Hash`, `PublicKey`,
//!   `RendezvousInfo`, `SigInfo`, the error message 255);
//! - [`cose`]: COSE_Sign1 with ES256/ES384;
//! - [`crypto`]: keys (ring), PKCS#8 and SPKI, hashes, HMAC, randomness;
//! - [`voucher`]: the ownership voucher: create, extend, verify, PEM armour;
//! - [`credential`]: the device credential file (the result of DI, done offline);
//! - [`manufacturer`]: the manufacturer's keys and `init-device`;
//! - [`owner`]: the owner and installer keys of a gateway or cloud, rotation, voucher import;
//! - [`qr`]: vouchers in QR codes (PNG images): decode for import, encode for printing;
//! - [`report`]: the human-readable `outpost voucher show`.
//!
//! The protocol (TO0, TO1, TO2, HTTP binding) on top of it:
//!
//! - [`msg`]: every message of TO0 (20–23), TO1 (30–33) and TO2 (60–71), EAT tokens;
//! - [`kex`]: ECDH256/ECDH384 key exchange and the SP 800-108 KDF;
//! - [`encrypt`]: the COSE_Encrypt0 (A128GCM/A256GCM) tunnel after TO2.ProveDevice;
//! - [`session`]: bounded, expiring, single-use protocol sessions;
//! - [`rendezvous`]: the rendezvous server (TO0 registrations, TO1 answers);
//! - [`owner_service`]: the owner side of TO2 with devmod and the `outpost:mqtt` module;
//! - [`registry`]: the owner backend on the store (vouchers, owner keys, device registry);
//! - [`http`]: the HTTP server for `POST /fdo/101/msg/{n}` (axum on hyper, bounded);
//! - [`service`]: the `[fdo]` config and the running services of a gateway or cloud
//!   (listener, rendezvous and owner on the store, the TO0 registrar);
//! - [`client`]: the device (TO1 + TO2) and the owner's TO0 over a bounded HTTP client.
//!
//! The authority for every wire decision is the CDDL of the FDO 1.1 specification
//! (PS 2022-04-19); `docs/onboarding.md` lists the decisions and file formats.
//! Decoding never panics and never allocates more than a small multiple of its input, whose
//! size is bounded before anything is parsed.

pub mod cbor;
pub mod client;
pub mod cose;
pub mod credential;
pub mod crypto;
pub mod encrypt;
pub mod http;
pub mod kex;
pub mod manufacturer;
pub mod msg;
pub mod owner;
pub mod owner_service;
pub mod qr;
pub mod registry;
pub mod rendezvous;
pub mod report;
pub mod service;
pub mod session;
pub mod stats;
pub mod to1_proxy;
pub mod types;
pub mod voucher;

pub use credential::DeviceCredential;
pub use types::{Guid, Hash, HashAlg, PublicKey, RendezvousInfo, RvDirective};
pub use voucher::{OwnershipVoucher, VerifiedChain};

use std::path::PathBuf;

/// The protocol version of FDO 1.1 (`protver`), carried in vouchers and credentials.
pub const PROTOCOL_VERSION: u64 = 101;

/// FDO error codes (the `EMErrorCode` of error message 255).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    InvalidJwtToken = 1,
    InvalidOwnershipVoucher = 2,
    InvalidOwnerSignBody = 3,
    InvalidIpAddress = 4,
    InvalidGuid = 5,
    ResourceNotFound = 6,
    MessageBodyError = 100,
    InvalidMessageError = 101,
    CredReuseError = 102,
    InternalServerError = 500,
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        self as u16
    }
}

/// Every failure of the FDO modules. Messages name the structure and the check that failed;
/// [`FdoError::error_code`] maps each to the code a protocol error message carries.
#[derive(Debug, thiserror::Error)]
pub enum FdoError {
    #[error("{what}: {len} bytes exceed the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what}: truncated CBOR")]
    Truncated { what: &'static str },
    #[error("{what}: malformed: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{what}: protocol version {found} is not supported (this build speaks 101)")]
    Version { what: &'static str, found: u64 },
    #[error("unsupported {what}: {detail}")]
    Unsupported { what: &'static str, detail: String },
    #[error(
        "OVHeader or OVHeaderHMac was altered: entry 0's OVEHashPrevEntry does not cover them"
    )]
    HeaderAltered,
    #[error("OVHeaderHMac does not verify under this device's HMAC secret (voucher made for another device credential, or the HMAC was replaced)")]
    HmacMismatch,
    #[error("broken hash chain: entry {entry}'s OVEHashPrevEntry does not cover entry {}", .entry.saturating_sub(1))]
    BrokenChain { entry: usize },
    #[error("entry {entry} is not signed by {signer}")]
    WrongSigner { entry: usize, signer: String },
    #[error("entry {entry}: OVEHashHdrInfo does not match hash(GUID || DeviceInfo) of the header")]
    HeaderInfoMismatch { entry: usize },
    #[error("device certificate chain does not match OVDevCertChainHash")]
    CertChainHashMismatch,
    #[error("device certificate chain: {0}")]
    CertChain(String),
    #[error("voucher is for device {found}, expected {expected}")]
    GuidMismatch { expected: Guid, found: Guid },
    #[error("the signing key ({found}) is not the voucher's current owner key ({expected})")]
    NotCurrentOwner { expected: String, found: String },
    #[error("{0}")]
    KeyTypeMismatch(String),
    #[error("the voucher's manufacturer key is not the one this device credential trusts (DCPubKeyHash)")]
    UnknownManufacturer,
    #[error("the voucher's owner key {fingerprint} is not one of this gateway's owner keys nor an installer key it holds (extend the voucher to `outpost voucher owner-cert`, or install the operator's installer key with `outpost voucher installer-key --import`)")]
    NotOurs { fingerprint: String },
    #[error("{what}: signature does not verify")]
    BadSignature { what: &'static str },
    #[error("key: {0}")]
    Key(String),
    #[error("crypto: {0}")]
    Crypto(String),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("file {path}: {cause}")]
    File {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl FdoError {
    /// The FDO error code a protocol error message (255) reports for this failure.
    pub fn error_code(&self) -> ErrorCode {
        use FdoError::*;
        match self {
            TooLarge { .. } | Truncated { .. } | Malformed { .. } | Version { .. } => {
                ErrorCode::MessageBodyError
            }
            Unsupported { .. } => ErrorCode::MessageBodyError,
            HeaderAltered
            | HmacMismatch
            | BrokenChain { .. }
            | WrongSigner { .. }
            | HeaderInfoMismatch { .. }
            | CertChainHashMismatch
            | CertChain(_)
            | NotCurrentOwner { .. }
            | KeyTypeMismatch(_)
            | UnknownManufacturer
            | NotOurs { .. } => ErrorCode::InvalidOwnershipVoucher,
            GuidMismatch { .. } => ErrorCode::InvalidGuid,
            BadSignature { .. } => ErrorCode::InvalidMessageError,
            Key(_) | Crypto(_) | Pem(_) | Rcgen(_) | File { .. } | Store(_) => {
                ErrorCode::InternalServerError
            }
        }
    }

    pub(crate) fn malformed(what: &'static str, reason: impl Into<String>) -> FdoError {
        FdoError::Malformed {
            what,
            reason: reason.into(),
        }
    }
}

pub(crate) fn file_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> FdoError + '_ {
    move |cause| FdoError::File {
        path: path.to_path_buf(),
        cause,
    }
}

/// Default port of the FDO HTTP endpoints (rendezvous and owner) that `init-device` writes
/// into the rendezvous info when `--rv-port` is not given.
pub const DEFAULT_RV_PORT: u16 = 8041;
/// Default rendezvous host name written by `init-device` (the gateway on the LAN).
pub const DEFAULT_RV_DNS: &str = "outpost.local";

/// Write a file atomically with `mode` (see [`crate::ca::write_file`]).
pub(crate) fn write_file(path: &std::path::Path, bytes: &[u8], mode: u32) -> Result<(), FdoError> {
    crate::ca::write_file(path, bytes, mode).map_err(|e| match e {
        crate::ca::CaError::File { path, cause } => FdoError::File { path, cause },
        other => FdoError::Crypto(other.to_string()),
    })
}

/// Create a directory (and its parents) with mode 0700.
pub(crate) fn private_dir(dir: &std::path::Path) -> Result<(), FdoError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(file_err(dir))
}
