//! `outpost ca`: issue, revoke and list certificates (through the admin socket of a running
//! gateway, else on the store directly).

use super::{write_out, ConfigArgs};
use anyhow::{bail, Context};
use clap::Subcommand;
use outpost::admin::{self, Reply, Request};
use outpost::config::Config;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum CaCmd {
    /// Issue a device certificate; writes ID.crt (ID.key without --csr) and ca.crt to --out.
    IssueDevice {
        /// The device id: the certificate's CN and the MQTT client id it must use.
        #[arg(long)]
        id: String,
        /// Directory for ID.crt, ID.key (without --csr) and ca.crt (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// PEM CSR: the device keeps its key.
        #[arg(long)]
        csr: Option<PathBuf>,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Revoke by serial (hex) or every certificate of a device id.
    Revoke {
        /// The serial of one certificate, in hex as `ca list` prints it.
        #[arg(long, conflicts_with = "id", required_unless_present = "id")]
        serial: Option<String>,
        /// A device id: every certificate issued to it.
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// List issued certificates.
    List {
        /// Print the certificates as a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

pub async fn ca_command(cmd: CaCmd, config: Config) -> anyhow::Result<()> {
    let data_dir = config.gateway.data_dir.clone();
    let req = match &cmd {
        CaCmd::IssueDevice { id, csr, .. } => Request::IssueDevice {
            id: id.clone(),
            csr: match csr {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading CSR {}", p.display()))?,
                ),
                None => None,
            },
        },
        CaCmd::Revoke {
            serial: Some(s), ..
        } => Request::RevokeSerial { serial: s.clone() },
        CaCmd::Revoke { id: Some(id), .. } => Request::RevokeDevice { id: id.clone() },
        CaCmd::Revoke { .. } => bail!("give --serial or --id"),
        CaCmd::List { .. } => Request::List,
    };
    // Prefer the running gateway (it applies revocations to live sessions at once).
    let reply = match admin::call(&data_dir, &req).await? {
        Some(r) => r,
        None => offline(&config, req).context("no gateway running; using the store directly")?,
    };
    match (cmd, reply) {
        (
            CaCmd::IssueDevice { id, out, .. },
            Reply::Issued {
                serial,
                cert_pem,
                key_pem,
                ca_pem,
            },
        ) => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            write_out(&out, &format!("{id}.crt"), &cert_pem, 0o644)?;
            if let Some(k) = key_pem {
                write_out(&out, &format!("{id}.key"), &k, 0o600)?;
            }
            write_out(&out, "ca.crt", &ca_pem, 0o644)?;
            println!("issued {id} serial {serial} -> {}", out.display());
        }
        (CaCmd::Revoke { .. }, Reply::Records { records }) => {
            for r in records {
                println!("revoked {} serial {}", r.device_id, r.serial);
            }
        }
        (CaCmd::List { json, .. }, Reply::Records { records }) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&records)?);
            } else {
                println!(
                    "{:<34} {:<24} {:<10} {:<20} KEY",
                    "SERIAL", "DEVICE", "STATUS", "NOT AFTER"
                );
                for r in records {
                    let status = if r.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "valid"
                    };
                    let until = time::OffsetDateTime::from_unix_timestamp(r.not_after)
                        .map(|t| t.date().to_string())
                        .unwrap_or_default();
                    println!(
                        "{:<34} {:<24} {:<10} {:<20} {}",
                        r.serial, r.device_id, status, until, r.key_source
                    );
                }
            }
        }
        (_, other) => bail!("unexpected answer: {other:?}"),
    }
    Ok(())
}

pub fn offline(config: &Config, req: Request) -> anyhow::Result<Reply> {
    let ca = outpost::open_ca(config)?;
    Ok(match req {
        Request::IssueDevice { id, csr } => ca.issue_device(&id, csr.as_deref())?.into(),
        Request::RevokeSerial { serial } => {
            let r = ca.revoke_serial(&serial)?;
            ca.refresh_crl()?;
            Reply::Records { records: vec![r] }
        }
        Request::RevokeDevice { id } => {
            let r = ca.revoke_device(&id)?;
            ca.refresh_crl()?;
            Reply::Records { records: r }
        }
        Request::List => Reply::Records {
            records: ca.list()?,
        },
        _ => {
            bail!("not a CA request")
        }
    })
}
