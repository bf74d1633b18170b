//! The manufacturer's side of FDO, offline: its keys and `init-device` (the result of the
//! specification's Device Initialization without a DI server).
//!
//! A manufacturer directory (`--mfg-dir`, default `./outpost-mfg`, mode 0700) holds, per
//! curve (`p256` or `p384`):
//!
//! - `manufacturer-<curve>.key` / `.crt`: the manufacturer key. It is OVPubKey in every
//!   voucher it makes and signs their entry 0 (`outpost voucher extend --key
//!   manufacturer-<curve>.key --to OWNER.crt`).
//! - `device-ca-<curve>.key` / `.crt`: the CA that signs device attestation certificates
//!   (OVDevCertChain = [device certificate, this CA]).
//!
//! Keys are PKCS#8 PEM, mode 0600, created on first use and reused afterwards.

use super::credential::DeviceCredential;
use super::crypto::{self, CertSpec, Curve, SigningKey};
use super::types::{Guid, PublicKey, RendezvousInfo, RvDirective, RvProtocol};
use super::voucher::{OvHeader, OwnershipVoucher, MAX_DEVICE_INFO};
use super::{file_err, FdoError, PROTOCOL_VERSION};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Default manufacturer directory (relative to the working directory).
pub const DEFAULT_DIR: &str = "outpost-mfg";

const DEVICE_CERT_DAYS: i64 = 20 * 365;
const MFG_CERT_DAYS: i64 = 30 * 365;

/// What a new device gets.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub device_info: String,
    pub rv_info: RendezvousInfo,
    pub curve: Curve,
}

/// The rendezvous servers `init-device` writes into the device's RVInfo: one directive per
/// host name and per address, each with RVDevPort (what the device dials for TO1),
/// RVOwnerPort (what the owner dials for TO0 from the voucher; the device port unless given),
/// RVProtocol and, when given, RVDelaysec.
#[derive(Debug, Clone)]
pub struct RvServers {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub dev_port: u16,
    pub owner_port: Option<u16>,
    pub protocol: RvProtocol,
    pub delay_secs: Option<u32>,
}

impl RvServers {
    pub fn rv_info(&self) -> RendezvousInfo {
        let directive = |d: RvDirective| {
            let d = d
                .with_dev_port(self.dev_port)
                .with_owner_port(self.owner_port.unwrap_or(self.dev_port))
                .with_protocol(self.protocol);
            match self.delay_secs {
                Some(s) => d.with_delay_secs(s),
                None => d,
            }
        };
        RendezvousInfo(
            self.dns
                .iter()
                .map(|h| directive(RvDirective::default().with_dns(h)))
                .chain(
                    self.ips
                        .iter()
                        .map(|ip| directive(RvDirective::default().with_ip(*ip))),
                )
                .collect(),
        )
    }
}

/// A manufacturer key and device CA of one curve.
pub struct Manufacturer {
    curve: Curve,
    key: SigningKey,
    cert_path: PathBuf,
    key_path: PathBuf,
    ca_key: SigningKey,
    ca_der: Vec<u8>,
}

fn curve_tag(curve: Curve) -> &'static str {
    match curve {
        Curve::P256 => "p256",
        Curve::P384 => "p384",
    }
}

/// Load `<name>.key` and `<name>.crt`, or create them with `spec` (self-signed, or signed by
/// `issuer`).
fn load_or_create(
    dir: &Path,
    name: &str,
    curve: Curve,
    spec: &CertSpec<'_>,
) -> Result<(SigningKey, Vec<u8>), FdoError> {
    let key_path = dir.join(format!("{name}.key"));
    let cert_path = dir.join(format!("{name}.crt"));
    if key_path.exists() && cert_path.exists() {
        let key_text = std::fs::read_to_string(&key_path).map_err(file_err(&key_path))?;
        let key = SigningKey::from_pem(&key_text)?;
        let cert_text = std::fs::read_to_string(&cert_path).map_err(file_err(&cert_path))?;
        let der = crypto::cert_der_from_pem(&cert_text)?;
        if key.curve() != curve || crypto::cert_public_key(&der)?.point() != key.public_point() {
            return Err(FdoError::Key(format!(
                "{} and {} do not belong together",
                key_path.display(),
                cert_path.display()
            )));
        }
        return Ok((key, der));
    }
    let key = SigningKey::generate(curve)?;
    let (pem, der) = crypto::make_cert(&key, spec, None)?;
    super::write_file(&key_path, key.to_pem().as_bytes(), 0o600)?;
    super::write_file(&cert_path, pem.as_bytes(), 0o644)?;
    tracing::info!(path = %cert_path.display(), "created {name}");
    Ok((key, der))
}

impl Manufacturer {
    /// Open the manufacturer material of `curve` in `dir`, creating it on first use.
    pub fn open_or_create(dir: &Path, curve: Curve) -> Result<Manufacturer, FdoError> {
        super::private_dir(dir)?;
        let tag = curve_tag(curve);
        let mfg_name = format!("manufacturer-{tag}");
        let (key, _) = load_or_create(
            dir,
            &mfg_name,
            curve,
            &CertSpec {
                common_name: &format!("Outpost manufacturer ({curve})"),
                organization: "Outpost manufacturer",
                is_ca: false,
                validity_days: MFG_CERT_DAYS,
            },
        )?;
        let (ca_key, ca_der) = load_or_create(
            dir,
            &format!("device-ca-{tag}"),
            curve,
            &CertSpec {
                common_name: &format!("Outpost device CA ({curve})"),
                organization: "Outpost manufacturer",
                is_ca: true,
                validity_days: MFG_CERT_DAYS,
            },
        )?;
        Ok(Manufacturer {
            curve,
            key,
            key_path: dir.join(format!("{mfg_name}.key")),
            cert_path: dir.join(format!("{mfg_name}.crt")),
            ca_key,
            ca_der,
        })
    }

    pub fn curve(&self) -> Curve {
        self.curve
    }

    /// The manufacturer key (OVPubKey; signs entry 0).
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Make a device: attestation key, HMAC secret, GUID, device certificate (signed by the
    /// device CA), its credential and its voucher (no entries yet: the manufacturer owns it).
    pub fn init_device(
        &self,
        opts: &DeviceOptions,
    ) -> Result<(DeviceCredential, OwnershipVoucher), FdoError> {
        if opts.curve != self.curve {
            return Err(FdoError::KeyTypeMismatch(format!(
                "a {} device needs the {} manufacturer key",
                opts.curve, opts.curve
            )));
        }
        if opts.device_info.len() > MAX_DEVICE_INFO {
            return Err(FdoError::malformed("OVDeviceInfo", "too long"));
        }
        let curve = self.curve;
        let device_key = SigningKey::generate(curve)?;
        let guid = Guid::random()?;
        let hmac_secret = crypto::random_bytes(curve.hmac_alg().output_len())?;
        let (_, device_der) = crypto::make_cert(
            &device_key,
            &CertSpec {
                common_name: &guid.hex(),
                organization: "Outpost FDO device",
                is_ca: false,
                validity_days: DEVICE_CERT_DAYS,
            },
            Some((&self.ca_der, &self.ca_key)),
        )?;
        let chain = vec![device_der, self.ca_der.clone()];
        let parts: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
        let mfg_pub = self.public_key();
        let header = OvHeader {
            prot_ver: PROTOCOL_VERSION,
            guid,
            rv_info: opts.rv_info.clone(),
            device_info: opts.device_info.clone(),
            mfg_pub_key: mfg_pub.clone(),
            cert_chain_hash: Some(crypto::hash(curve.hash_alg(), &parts)?),
        };
        let voucher =
            OwnershipVoucher::manufacture(header, curve.hmac_alg(), &hmac_secret, Some(chain))?;
        let credential = DeviceCredential {
            active: true,
            prot_ver: PROTOCOL_VERSION,
            hmac_secret,
            device_info: opts.device_info.clone(),
            guid,
            rv_info: opts.rv_info.clone(),
            pub_key_hash: DeviceCredential::pub_key_hash_of(&mfg_pub, curve.hash_alg())?,
            device_key,
        };
        Ok((credential, voucher))
    }
}
