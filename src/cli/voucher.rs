//! `outpost voucher`: make devices, extend, show, import and delegate vouchers; owner and
//! installer keys.

use super::{read_text, write_out, ConfigArgs};
use anyhow::{bail, Context};
use clap::Subcommand;
use outpost::admin::{self, Reply, Request};
use outpost::config::Config;
use outpost::fdo::owner;
use outpost::fdo::owner::KeyKind;
use outpost::fdo_wire::crypto::{self, Curve, SigningKey};
use outpost::fdo_wire::manufacturer::{self, DeviceOptions, Manufacturer};
use outpost::fdo_wire::types::RvProtocol;
use outpost::fdo_wire::{qr, DeviceCredential, OwnershipVoucher, PublicKey};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum VoucherCmd {
    /// Make a device (FDO DI done offline): writes OUT/device.cred (0600) and
    /// OUT/voucher.pem, owned by the manufacturer key in --mfg-dir.
    InitDevice {
        /// Directory for device.cred and voucher.pem (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// OVDeviceInfo: what the device is (model, serial).
        #[arg(long, default_value = "outpost-device")]
        device_info: String,
        /// Rendezvous server host name; repeat for more (default: outpost.local).
        #[arg(long = "rv-dns", value_name = "HOST")]
        rv_dns: Vec<String>,
        /// Rendezvous server IP address; repeat for more.
        #[arg(long = "rv-ip", value_name = "IP")]
        rv_ip: Vec<IpAddr>,
        /// Rendezvous server port the device dials for TO1 (RVDevPort).
        #[arg(long, default_value_t = outpost::fdo::DEFAULT_RV_PORT)]
        rv_port: u16,
        /// Rendezvous server port an owner dials for TO0 from this voucher (RVOwnerPort;
        /// default: --rv-port).
        #[arg(long, value_name = "PORT")]
        rv_owner_port: Option<u16>,
        /// http or https.
        #[arg(long, default_value = "http")]
        rv_protocol: RvProtocol,
        /// Seconds the device waits between rendezvous attempts (RVDelaysec).
        #[arg(long, value_name = "SECS")]
        rv_delay: Option<u32>,
        /// Manufacturer keys and device CA (created on first use).
        #[arg(long, default_value = manufacturer::DEFAULT_DIR)]
        mfg_dir: PathBuf,
        /// p256 or p384: the device key and the manufacturer key.
        #[arg(long, default_value = "p256")]
        curve: Curve,
    },
    /// Transfer a voucher to its next owner: sign a new entry with the current owner's key.
    Extend {
        /// The voucher (PEM or CBOR).
        #[arg(long)]
        voucher: PathBuf,
        /// The current owner's private key (PEM; for a new voucher the manufacturer key).
        #[arg(long)]
        key: PathBuf,
        /// The next owner's certificate (or public key), PEM.
        #[arg(long)]
        to: PathBuf,
        /// Where to write the extended voucher (PEM).
        #[arg(long)]
        out: PathBuf,
    },
    /// Decode and verify a voucher, human readable. With --config or --data-dir, also say
    /// what the key it names is to that gateway (current or retired owner key, installer
    /// key, not ours).
    Show {
        /// The voucher (PEM, CBOR, or a PNG image of its QR code).
        file: PathBuf,
        /// The device credential: also check the header HMAC.
        #[arg(long)]
        cred: Option<PathBuf>,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Print a voucher as a QR code (PNG) for the device's label: its CBOR in byte mode,
    /// the smallest symbol that holds it (at most 2953 bytes: version 40-L).
    Qr {
        /// The voucher (PEM or CBOR).
        #[arg(long)]
        voucher: PathBuf,
        /// Where to write the PNG.
        #[arg(long)]
        out: PathBuf,
        /// Pixels per module (1-32).
        #[arg(long, default_value_t = qr::DEFAULT_SCALE)]
        scale: u32,
    },
    /// Print this gateway's owner certificate (PEM), creating the owner key if needed.
    OwnerCert {
        /// p256 or p384 (a voucher's keys all have its manufacturer key's type).
        #[arg(long, default_value = "p256")]
        curve: Curve,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Cloud: hand a voucher this owner holds to a gateway ahead of time, so that the gateway
    /// can onboard the device while offline. Extends it to the gateway's owner certificate and
    /// sends it down with the registry sync.
    Delegate {
        /// The voucher (PEM or CBOR), extended to this owner.
        file: PathBuf,
        /// The gateway's id (its uplink client id).
        #[arg(long)]
        gateway: String,
        /// The gateway's owner certificate (`outpost voucher owner-cert` on the gateway).
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Import a voucher (PEM, CBOR, or a PNG image of its QR code) extended to one of this
    /// gateway's owner keys, or to an installer key it holds (then the gateway extends it
    /// to its own owner key first).
    Import {
        /// The voucher: PEM, CBOR, or a PNG image of its QR code.
        file: PathBuf,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// The operator's installer key, shared by all of its gateways: install one (--import)
    /// or make a new one (--create --out, to copy to the other gateways). The previous
    /// installer key of the same curve is retired and still accepted.
    InstallerKey {
        /// The operator's installer private key (PEM), to install on this gateway.
        #[arg(
            long,
            value_name = "KEY.pem",
            conflicts_with = "create",
            required_unless_present = "create"
        )]
        import: Option<PathBuf>,
        /// Make a new installer key, install it here and write it to --out.
        #[arg(long, requires = "out")]
        create: bool,
        /// Where to write the new private key (0600) for the operator's other gateways.
        #[arg(long, value_name = "KEY.pem")]
        out: Option<PathBuf>,
        /// p256 or p384 (with --create).
        #[arg(long, default_value = "p256")]
        curve: Curve,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Print this gateway's installer certificate (PEM), for sellers to extend vouchers to.
    InstallerCert {
        /// p256 or p384: which installer key's certificate.
        #[arg(long, default_value = "p256")]
        curve: Curve,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Make a new owner key: the current one is retired (kept: vouchers naming it still
    /// onboard) and `owner-cert` prints the new one. A running gateway picks it up.
    RotateOwnerKey {
        /// p256 or p384: which owner key to rotate.
        #[arg(long, default_value = "p256")]
        curve: Curve,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Make a new installer key (the current one is retired and still accepted); --out
    /// writes it for the operator's other gateways (`installer-key --import`).
    RotateInstallerKey {
        /// p256 or p384: which installer key to rotate.
        #[arg(long, default_value = "p256")]
        curve: Curve,
        /// Also write the new key (PKCS#8 PEM, 0600) here, for the other gateways.
        #[arg(long, value_name = "KEY.pem")]
        out: Option<PathBuf>,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

/// A voucher file: PEM, CBOR, or a PNG image of its QR code. Read only up to the largest
/// accepted size.
pub fn read_voucher(p: &Path) -> anyhow::Result<OwnershipVoucher> {
    use std::io::Read;
    let limit = qr::MAX_PNG_FILE.max(2 * outpost::fdo_wire::voucher::MAX_VOUCHER) as u64;
    let mut bytes = Vec::new();
    std::fs::File::open(p)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", p.display()))?;
    if bytes.len() as u64 > limit {
        bail!("{}: larger than {limit} bytes: not a voucher", p.display());
    }
    qr::voucher_from_file_bytes(&bytes).with_context(|| format!("voucher {}", p.display()))
}

pub fn write_key_out(path: &Path, key: &SigningKey) -> anyhow::Result<()> {
    outpost::ca::write_file(path, key.to_pem().as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

pub async fn voucher_command(cmd: VoucherCmd, config: Config) -> anyhow::Result<()> {
    match cmd {
        VoucherCmd::InitDevice {
            out,
            device_info,
            mut rv_dns,
            rv_ip,
            rv_port,
            rv_owner_port,
            rv_protocol,
            rv_delay,
            mfg_dir,
            curve,
        } => {
            if rv_dns.is_empty() && rv_ip.is_empty() {
                rv_dns.push(outpost::fdo::DEFAULT_RV_DNS.to_string());
            }
            let rv_info = outpost::fdo_wire::manufacturer::RvServers {
                dns: rv_dns,
                ips: rv_ip,
                dev_port: rv_port,
                owner_port: rv_owner_port,
                protocol: rv_protocol,
                delay_secs: rv_delay,
            }
            .rv_info();
            let mfg = Manufacturer::open_or_create(&mfg_dir, curve)
                .with_context(|| format!("manufacturer directory {}", mfg_dir.display()))?;
            let (cred, voucher) = mfg.init_device(&DeviceOptions {
                device_info,
                rv_info,
                curve,
            })?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let cred_path = out.join(outpost::fdo_wire::credential::FILE_NAME);
            cred.write(&cred_path)
                .with_context(|| format!("writing {}", cred_path.display()))?;
            write_out(&out, "voucher.pem", &voucher.to_pem(), 0o644)?;
            println!(
                "device {} ({curve}) -> {} and {}",
                cred.guid,
                cred_path.display(),
                out.join("voucher.pem").display()
            );
            println!(
                "the voucher is owned by the manufacturer; transfer it with:\n  outpost voucher extend --voucher {} --key {} --to OWNER.crt --out VOUCHER.pem",
                out.join("voucher.pem").display(),
                mfg.key_path().display()
            );
        }
        VoucherCmd::Extend {
            voucher,
            key,
            to,
            out,
        } => {
            let v = read_voucher(&voucher)?;
            let key = SigningKey::from_pem(&read_text(&key)?)
                .with_context(|| format!("owner key {}", key.display()))?;
            let (next_key, cert) = crypto::public_key_from_pem(&read_text(&to)?)
                .with_context(|| format!("next owner {}", to.display()))?;
            let next = PublicKey::encoded_like(&v.header().mfg_pub_key, &next_key, cert.as_deref());
            let extended = v.extend(&key, &next).context("extending the voucher")?;
            outpost::ca::write_file(&out, extended.to_pem().as_bytes(), 0o644)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "voucher {}: entry {} transfers it to sha256:{} -> {}",
                extended.guid(),
                extended.entries().len() - 1,
                next.fingerprint()?,
                out.display()
            );
        }
        VoucherCmd::Qr {
            voucher,
            out,
            scale,
        } => {
            let v = read_voucher(&voucher)?;
            let (png, info) = qr::voucher_png(&v, scale)
                .with_context(|| format!("voucher {} as a QR code", voucher.display()))?;
            outpost::ca::write_file(&out, &png, 0o644)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "voucher {} ({} bytes of CBOR) -> QR version {}-{} ({} modules) -> {}",
                v.guid(),
                info.bytes,
                info.version,
                info.ec,
                info.modules,
                out.display()
            );
        }
        VoucherCmd::InstallerKey {
            import, out, curve, ..
        } => {
            let dir = &config.gateway.data_dir;
            outpost::prepare_data_dir(dir)?;
            let key = match &import {
                Some(p) => SigningKey::from_pem(&read_text(p)?)
                    .with_context(|| format!("installer key {}", p.display()))?,
                None => SigningKey::generate(curve)?,
            };
            if let Some(out) = &out {
                write_key_out(out, &key)?;
            }
            let (k, retired) = owner::install(dir, KeyKind::Installer, key, &config.gateway_id())?;
            println!(
                "installer key {} ({}) {}{}",
                k.key_id,
                k.key.curve(),
                if import.is_some() {
                    "installed".to_string()
                } else {
                    format!(
                        "created and installed; copy {} to the operator's other gateways (`outpost voucher installer-key --import`)",
                        out.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default()
                    )
                },
                retired
                    .map(|r| format!("; retired installer key {r} (still accepted)"))
                    .unwrap_or_default()
            );
        }
        VoucherCmd::InstallerCert { curve, .. } => {
            let dir = &config.gateway.data_dir;
            match owner::current(dir, KeyKind::Installer, curve)? {
                Some(k) => print!("{}", k.cert_pem),
                None => bail!(
                    "no {curve} installer key in {}: install the operator's with `outpost voucher installer-key --import KEY.pem` (or make one with --create)",
                    dir.display()
                ),
            }
        }
        VoucherCmd::RotateOwnerKey { curve, .. } => {
            let dir = &config.gateway.data_dir;
            outpost::prepare_data_dir(dir)?;
            let (k, retired) = owner::rotate(dir, KeyKind::Owner, curve, &config.gateway_id())?;
            println!(
                "new owner key {} ({curve}){}; vouchers extended to the old key still onboard",
                k.key_id,
                retired
                    .map(|r| format!(", retired {r}"))
                    .unwrap_or_default()
            );
        }
        VoucherCmd::RotateInstallerKey { curve, out, .. } => {
            let dir = &config.gateway.data_dir;
            outpost::prepare_data_dir(dir)?;
            let key = SigningKey::generate(curve)?;
            if let Some(out) = &out {
                write_key_out(out, &key)?;
            }
            let (k, retired) = owner::install(dir, KeyKind::Installer, key, &config.gateway_id())?;
            println!(
                "new installer key {} ({curve}){}{}",
                k.key_id,
                retired
                    .map(|r| format!(", retired {r} (still accepted)"))
                    .unwrap_or_default(),
                out.map(|o| format!("; copy {} to the operator's other gateways", o.display()))
                    .unwrap_or_default()
            );
        }
        VoucherCmd::Show { file, cred, cfg } => {
            let v = read_voucher(&file)?;
            let cred = match cred {
                Some(p) => Some(
                    DeviceCredential::read(&p)
                        .with_context(|| format!("device credential {}", p.display()))?,
                ),
                None => None,
            };
            // Only a gateway named on the command line is asked about the key.
            let gateway = (cfg.config.is_some() || cfg.data_dir.is_some())
                .then_some(config.gateway.data_dir.as_path());
            let (text, result) = outpost::fdo::report::voucher_report(&v, cred.as_ref(), gateway);
            print!("{text}");
            result.with_context(|| format!("voucher {} does not verify", file.display()))?;
        }
        VoucherCmd::OwnerCert { curve, .. } => {
            let dir = &config.gateway.data_dir;
            outpost::prepare_data_dir(dir)?;
            let k = owner::current_or_create(dir, curve, &config.gateway_id())?;
            print!("{}", k.cert_pem);
        }
        VoucherCmd::Delegate {
            file, gateway, to, ..
        } => {
            let v = read_voucher(&file)?;
            let data_dir = config.gateway.data_dir.clone();
            let to_pem = read_text(&to)?;
            let req = Request::Delegate {
                gateway: gateway.clone(),
                voucher_pem: v.to_pem(),
                to_pem: to_pem.clone(),
            };
            let guid = match admin::call(&data_dir, &req).await? {
                Some(Reply::Delegated { guid, .. }) => guid,
                Some(other) => bail!("unexpected answer: {other:?}"),
                None => {
                    outpost::prepare_data_dir(&data_dir)?;
                    let store = outpost::store::Store::open(&data_dir.join("store"))?;
                    outpost::sync::delegate(
                        &store,
                        &data_dir,
                        &gateway,
                        v.to_pem().as_bytes(),
                        &to_pem,
                    )
                    .context("delegating the voucher")?
                    .hex()
                }
            };
            println!(
                "voucher {guid} delegated to gateway {gateway}; it is sent with the next sync"
            );
        }
        VoucherCmd::Import { file, .. } => {
            let v = read_voucher(&file)?;
            let data_dir = config.gateway.data_dir.clone();
            let req = Request::ImportVoucher {
                voucher_pem: v.to_pem(),
            };
            let reply = match admin::call(&data_dir, &req).await? {
                Some(r) => r,
                None => {
                    // No gateway running: verify and store directly.
                    outpost::prepare_data_dir(&data_dir)?;
                    let store = outpost::store::Store::open(&data_dir.join("store"))?;
                    owner::import_voucher(&store, &data_dir, v.to_pem().as_bytes())
                        .context("importing the voucher")?
                        .into()
                }
            };
            match reply {
                Reply::VoucherImported {
                    guid,
                    device_info,
                    entries,
                    owner_key_id,
                    replaced,
                    installer_key_id,
                } => println!(
                    "imported voucher {guid} ({device_info}, {entries} {}) owned by key {owner_key_id}{}{}",
                    if entries == 1 { "entry" } else { "entries" },
                    installer_key_id
                        .map(|i| format!(" (extended from installer key {i})"))
                        .unwrap_or_default(),
                    if replaced { ", replacing the stored one" } else { "" }
                ),
                other => bail!("unexpected answer: {other:?}"),
            }
        }
    }
    Ok(())
}
