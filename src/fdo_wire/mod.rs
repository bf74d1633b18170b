//! FIDO Device Onboard 1.1: the wire format and the offline tools, a leaf of the crate.
//!
//! Everything here encodes, decodes, signs, verifies and writes bytes and files; nothing
//! here knows a service, the store, the CA, the config or the metrics. The services built on
//! it (rendezvous, owner, TO0 registrar, HTTP, device client) are in [`crate::fdo`], the
//! device registry in [`crate::registry`].
//!
//! The data model:
//!
//! - [`cbor`]: bounded CBOR decoding, deterministic encoding, raw item spans;
//! - [`types`]: the wire types shared by every message (`Guid`, `Hash`, `PublicKey`,
//!   `RendezvousInfo`, `SigInfo`, the error message 255);
//! - [`cose`]: COSE_Sign1 with ES256/ES384;
//! - [`crypto`]: keys (ring), PKCS#8 and SPKI, hashes, HMAC, randomness;
//! - [`voucher`]: the ownership voucher: create, extend, verify, PEM armour;
//! - [`credential`]: the device credential file (the result of DI, done offline);
//! - [`manufacturer`]: the manufacturer's keys and `init-device`;
//! - [`qr`]: vouchers in QR codes (PNG images): decode for import, encode for printing.
//!
//! The protocol's wire format:
//!
//! - [`msg`]: every message of TO0 (20–23), TO1 (30–33) and TO2 (60–71), EAT tokens;
//! - [`kex`]: ECDH256/ECDH384 key exchange and the SP 800-108 KDF;
//! - [`encrypt`]: the COSE_Encrypt0 (A128GCM/A256GCM) tunnel after TO2.ProveDevice.
//!
//! The authority for every wire decision is the CDDL of the FDO 1.1 specification
//! (PS 2022-04-19); `docs/onboarding.md` lists the decisions and file formats.
//! Decoding never panics and never allocates more than a small multiple of its input, whose
//! size is bounded before anything is parsed.
//!
//! No `crate::` path in this directory leaves it (checked by `tests/layering.rs`).

pub mod cbor;
pub mod cose;
pub mod credential;
pub mod crypto;
pub mod encrypt;
pub mod kex;
pub mod manufacturer;
pub mod msg;
pub mod qr;
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
    /// A failure of the store under an FDO operation (`From<StoreError>` is in `store.rs`:
    /// the wire format knows no store).
    #[error(transparent)]
    Store(StoreFailure),
}

/// The store's error inside an [`FdoError`]: displayed, debugged and chained as itself.
pub struct StoreFailure(Box<dyn std::error::Error + Send + Sync + 'static>);

impl StoreFailure {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> StoreFailure {
        StoreFailure(Box::new(e))
    }
}

impl std::fmt::Debug for StoreFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl std::fmt::Display for StoreFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for StoreFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
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

/// Write a file atomically with `mode`: a temporary file beside it, written, synced, then
/// renamed over it (the same steps as [`crate::ca::write_file`], which this leaf cannot use).
pub(crate) fn write_file(path: &std::path::Path, bytes: &[u8], mode: u32) -> Result<(), FdoError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(file_err(&tmp))?;
    f.write_all(bytes).map_err(file_err(&tmp))?;
    f.sync_all().map_err(file_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(file_err(path))?;
    Ok(())
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
