//! The `outpost` binary: parse the command line, load and validate config, start tracing,
//! hand over to the library.
#![forbid(unsafe_code)]

mod cli;

use clap::{Parser, Subcommand};
use cli::ca::CaCmd;
use cli::can::CanCmd;
use cli::credentials::CredCmd;
use cli::device::DeviceArgs;
use cli::voucher::VoucherCmd;
use cli::{load_config, ConfigArgs};
use outpost::config::Config;
use std::process::ExitCode;

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

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Run(ConfigArgs),
    /// Run the cloud side of onboarding: rendezvous server, owner, device registry.
    Cloud(ConfigArgs),
    /// Run the device agent: onboard with FDO (TO1 + TO2), then stay connected over mTLS.
    Device(DeviceArgs),
    /// The device registry: every device onboarded here.
    Registry {
        /// Print the entries as a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Print the default configuration as TOML.
    PrintDefaultConfig,
    /// Operate the gateway's certificate authority (works whether or not the gateway runs).
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// The credential inventory: list, show, and renew / invalidate / delete / rotate
    /// (delivered to the holders only), through the running gateway or cloud.
    Credentials {
        #[command(subcommand)]
        cmd: CredCmd,
    },
    /// In-vehicle CAN on candump logs: learn a profile of normal traffic, grade frames.
    Can {
        #[command(subcommand)]
        cmd: CanCmd,
    },
    /// FIDO Device Onboard ownership vouchers: make devices, extend, show, import.
    Voucher {
        #[command(subcommand)]
        cmd: VoucherCmd,
    },
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
        Cmd::Run(a) | Cmd::Cloud(a) | Cmd::Registry { cfg: a, .. } => a.clone(),
        Cmd::Device(_) => ConfigArgs::default(),
        // Works on log and profile files only.
        Cmd::Can { .. } => ConfigArgs::default(),
        Cmd::Ca {
            cmd:
                CaCmd::IssueDevice { cfg, .. } | CaCmd::Revoke { cfg, .. } | CaCmd::List { cfg, .. },
        } => cfg.clone(),
        Cmd::Credentials { cmd } => cmd.cfg().clone(),
        Cmd::Voucher {
            cmd:
                VoucherCmd::OwnerCert { cfg, .. }
                | VoucherCmd::Import { cfg, .. }
                | VoucherCmd::Delegate { cfg, .. }
                | VoucherCmd::Show { cfg, .. }
                | VoucherCmd::InstallerKey { cfg, .. }
                | VoucherCmd::InstallerCert { cfg, .. }
                | VoucherCmd::RotateOwnerKey { cfg, .. }
                | VoucherCmd::RotateInstallerKey { cfg, .. },
        } => cfg.clone(),
        // The manufacturer's tools need no gateway configuration.
        Cmd::Voucher { .. } => ConfigArgs::default(),
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
            Cmd::Run(_) => cli::run::run(config, false).await,
            Cmd::Cloud(_) => cli::run::run(config, true).await,
            Cmd::Device(a) => cli::device::device(a).await,
            Cmd::Registry { json, .. } => cli::registry::registry(config, json).await,
            Cmd::Ca { cmd } => cli::ca::ca_command(cmd, config).await,
            Cmd::Can { cmd } => cli::can::can_command(cmd),
            Cmd::Credentials { cmd } => cli::credentials::credentials_command(cmd, config).await,
            Cmd::Voucher { cmd } => cli::voucher::voucher_command(cmd, config).await,
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

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Issue 10 part 6: every option, argument and subcommand says what it is in `--help`.
    #[test]
    fn every_argument_and_subcommand_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if a.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                let p = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(format!("{p} (the subcommand)"));
                }
                walk(sub, &p, missing);
            }
        }
        let cmd = Cli::command();
        let mut missing = Vec::new();
        walk(&cmd, "outpost", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        cmd.debug_assert();
    }
}
