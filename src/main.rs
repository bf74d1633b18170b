//! The `outpost` binary: parse the command line, load and validate config, start tracing,
//! hand over to the library.
#![forbid(unsafe_code)]

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use outpost::admin::{self, Reply, Request};
use outpost::config::Config;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// rumqttd's router logs an ERROR for every ordinary disconnect ("no-connection id N is
/// already gone"); the front door logs connection ends itself, so that target is silenced.
const DEFAULT_LOG_FILTER: &str = "info,rumqttd=warn,rumqttd::router::routing=off,mdns_sd=warn";

/// Exit code for configuration errors (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "outpost",
    version,
    about = "Edge gateway: secure MQTT front door, local CA, offline-first"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// TOML config file (default: the embedded defaults).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// State directory (overrides gateway.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Run(ConfigArgs),
    /// Print the default configuration as TOML.
    PrintDefaultConfig,
    /// Operate the gateway's certificate authority (works whether or not the gateway runs).
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Issue a device certificate; writes ID.crt (ID.key without --csr) and ca.crt to --out.
    IssueDevice {
        #[arg(long)]
        id: String,
        #[arg(long)]
        out: PathBuf,
        /// PEM CSR: the device keeps its key.
        #[arg(long)]
        csr: Option<PathBuf>,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Revoke by serial (hex) or every certificate of a device id.
    Revoke {
        #[arg(long, conflicts_with = "id", required_unless_present = "id")]
        serial: Option<String>,
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// List issued certificates.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

fn load_config(a: &ConfigArgs) -> Result<Config, outpost::config::ConfigError> {
    let mut cfg = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(d) = &a.data_dir {
        cfg.gateway.data_dir = d.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg_args = match &cli.cmd {
        Cmd::PrintDefaultConfig => {
            print!("{}", Config::default_toml());
            return ExitCode::SUCCESS;
        }
        Cmd::Run(a) => a.clone(),
        Cmd::Ca {
            cmd:
                CaCmd::IssueDevice { cfg, .. } | CaCmd::Revoke { cfg, .. } | CaCmd::List { cfg, .. },
        } => cfg.clone(),
    };
    let config = match load_config(&cfg_args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Run(_) => run(config).await,
            Cmd::Ca { cmd } => ca_command(cmd, config).await,
            Cmd::PrintDefaultConfig => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        }
        s.cancel();
    });
    outpost::run(config, shutdown)
        .await
        .context("gateway failed")
}

fn write_out(dir: &Path, name: &str, text: &str, mode: u32) -> anyhow::Result<()> {
    outpost::ca::write_file(&dir.join(name), text.as_bytes(), mode)
        .with_context(|| format!("writing {name}"))
}

async fn ca_command(cmd: CaCmd, config: Config) -> anyhow::Result<()> {
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
                    "{:<34} {:<24} {:<10} {:<20} {}",
                    "SERIAL", "DEVICE", "STATUS", "NOT AFTER", "KEY"
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

fn offline(config: &Config, req: Request) -> anyhow::Result<Reply> {
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
    })
}
