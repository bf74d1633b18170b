//! The device credential: what a device keeps after Device Initialization (DI), here made
//! offline by `outpost voucher init-device` and read by the device agent.
//!
//! File format (`device.cred`, mode 0600): one CBOR array, the specification's
//! `DeviceCredential` followed by the device attestation key:
//!
//! ```cddl
//! OutpostDeviceCredential = [
//!     DCActive:     bool,      ;; true: the device onboards (TO1/TO2) when it starts
//!     DCProtVer:    101,
//!     DCHmacSecret: bstr,      ;; 32 bytes (HMAC-SHA256) or 48 (HMAC-SHA384)
//!     DCDeviceInfo: tstr,
//!     DCGuid:       bstr .size 16,
//!     DCRVInfo:     RendezvousInfo,
//!     DCPubKeyHash: Hash,      ;; hash of the encoded manufacturer PublicKey (OVPubKey)
//!     DCDeviceKey:  bstr       ;; PKCS#8 DER of the ECDSA P-256 or P-384 attestation key
//! ]
//! ```
//!
//! The first seven items are the CDDL of the specification (section 3.4.1); the eighth is
//! where a device without a secure element keeps its private key. DCGuid, DCRVInfo and
//! DCPubKeyHash change at the end of TO2 (TO2.SetupDevice).

use super::cbor::{self, Value};
use super::crypto::{self, SigningKey};
use super::types::{Guid, Hash, PublicKey, RendezvousInfo};
use super::{file_err, FdoError, PROTOCOL_VERSION};
use std::fmt;
use std::path::Path;

/// Largest credential file accepted.
pub const MAX_CREDENTIAL: usize = 64 * 1024;
/// Conventional file name.
pub const FILE_NAME: &str = "device.cred";

pub struct DeviceCredential {
    pub active: bool,
    pub prot_ver: u64,
    pub hmac_secret: Vec<u8>,
    pub device_info: String,
    pub guid: Guid,
    pub rv_info: RendezvousInfo,
    pub pub_key_hash: Hash,
    pub device_key: SigningKey,
}

impl fmt::Debug for DeviceCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCredential")
            .field("active", &self.active)
            .field("prot_ver", &self.prot_ver)
            .field(
                "hmac_secret",
                &format_args!("<{} bytes>", self.hmac_secret.len()),
            )
            .field("device_info", &self.device_info)
            .field("guid", &self.guid)
            .field("rv_info", &self.rv_info)
            .field("pub_key_hash", &self.pub_key_hash)
            .field("device_key", &self.device_key)
            .finish()
    }
}

impl DeviceCredential {
    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(&Value::Array(vec![
            Value::Bool(self.active),
            cbor::uint_value(self.prot_ver),
            Value::Bytes(self.hmac_secret.clone()),
            Value::Text(self.device_info.clone()),
            self.guid.to_value(),
            self.rv_info.to_value(),
            self.pub_key_hash.to_value(),
            Value::Bytes(self.device_key.pkcs8_der().to_vec()),
        ]))
    }

    pub fn decode(bytes: &[u8]) -> Result<DeviceCredential, FdoError> {
        const W: &str = "DeviceCredential";
        let [active, ver, secret, info, guid, rv, hash, key] =
            cbor::array_n(cbor::decode(bytes, MAX_CREDENTIAL, W)?, W)?;
        let prot_ver = cbor::uint(ver, "DCProtVer")?;
        if prot_ver != PROTOCOL_VERSION {
            return Err(FdoError::Version {
                what: W,
                found: prot_ver,
            });
        }
        let hmac_secret = cbor::bytes(secret, "DCHmacSecret")?;
        if !(16..=64).contains(&hmac_secret.len()) {
            return Err(FdoError::malformed(
                "DCHmacSecret",
                format!("{} bytes (16 to 64)", hmac_secret.len()),
            ));
        }
        Ok(DeviceCredential {
            active: cbor::boolean(active, "DCActive")?,
            prot_ver,
            hmac_secret,
            device_info: cbor::text(info, "DCDeviceInfo")?,
            guid: Guid::from_value(guid, "DCGuid")?,
            rv_info: RendezvousInfo::from_value(rv)?,
            pub_key_hash: Hash::from_value(hash, "DCPubKeyHash")?,
            device_key: SigningKey::from_pkcs8_der(&cbor::bytes(key, "DCDeviceKey")?)?,
        })
    }

    /// Write the file with mode 0600 (it holds the HMAC secret and the private key).
    pub fn write(&self, path: &Path) -> Result<(), FdoError> {
        super::write_file(path, &self.encode(), 0o600)
    }

    pub fn read(path: &Path) -> Result<DeviceCredential, FdoError> {
        let bytes = std::fs::read(path).map_err(file_err(path))?;
        Self::decode(&bytes)
    }

    /// DCPubKeyHash for a manufacturer key: the hash of its encoded `PublicKey`.
    pub fn pub_key_hash_of(key: &PublicKey, alg: super::HashAlg) -> Result<Hash, FdoError> {
        crypto::hash(alg, &[&key.encode()])
    }

    /// Whether `key` (a voucher's OVPubKey) is the manufacturer key this device trusts.
    pub fn check_manufacturer_key(&self, key: &PublicKey) -> Result<(), FdoError> {
        if Self::pub_key_hash_of(key, self.pub_key_hash.alg)? == self.pub_key_hash {
            Ok(())
        } else {
            Err(FdoError::UnknownManufacturer)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdo_wire::crypto::Curve;
    use crate::fdo_wire::types::{HashAlg, RvDirective};
    use proptest::prelude::*;

    pub(crate) fn sample() -> DeviceCredential {
        let mfg = SigningKey::generate(Curve::P256).unwrap();
        DeviceCredential {
            active: true,
            prot_ver: 101,
            hmac_secret: vec![7; 32],
            device_info: "sensor".into(),
            guid: Guid([1; 16]),
            rv_info: RendezvousInfo(vec![RvDirective::default()
                .with_dns("rv")
                .with_dev_port(8041)]),
            pub_key_hash: DeviceCredential::pub_key_hash_of(&mfg.public_key(), HashAlg::Sha256)
                .unwrap(),
            device_key: SigningKey::generate(Curve::P384).unwrap(),
        }
    }

    #[test]
    fn roundtrip_and_file_mode() {
        let c = sample();
        let back = DeviceCredential::decode(&c.encode()).unwrap();
        assert_eq!(back.encode(), c.encode());
        // The whole secret (32 bytes of 7) never appears; random key or hash bytes may
        // contain "7, 7" by chance, so look for the full run.
        let secret_run = format!("{:?}", vec![7u8; 32]);
        let secret_run = secret_run.trim_matches(|c| c == '[' || c == ']');
        assert!(
            !format!("{back:?}").contains(secret_run),
            "secret must not be printed"
        );
        assert!(format!("{back:?}").contains("<32 bytes>"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE_NAME);
        c.write(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(DeviceCredential::read(&p).unwrap().guid, c.guid);
        let stranger = SigningKey::generate(Curve::P256).unwrap();
        assert!(matches!(
            c.check_manufacturer_key(&stranger.public_key()),
            Err(FdoError::UnknownManufacturer)
        ));
    }

    #[test]
    fn truncated_and_wrong_version_are_refused() {
        let bytes = sample().encode();
        assert!(matches!(
            DeviceCredential::decode(&bytes[..bytes.len() - 3]),
            Err(FdoError::Truncated { .. })
        ));
        let mut v = cbor::array(cbor::decode(&bytes, MAX_CREDENTIAL, "t").unwrap(), "t").unwrap();
        v[1] = cbor::uint_value(100);
        assert!(matches!(
            DeviceCredential::decode(&cbor::encode(&Value::Array(v))),
            Err(FdoError::Version { found: 100, .. })
        ));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = DeviceCredential::decode(&bytes);
        }

        #[test]
        fn mutated_credentials_never_panic(i in 0usize..2000, b in any::<u8>()) {
            let mut bytes = sample().encode();
            let i = i % bytes.len();
            bytes[i] = b;
            let _ = DeviceCredential::decode(&bytes);
        }
    }
}
