//! The subcommands of `outpost`, a file each; `main.rs` parses the command line and hands
//! off here. Everything below is the binary's edge: errors are `anyhow`, the library's own
//! error types underneath.

pub mod ca;
pub mod can;
pub mod credentials;
pub mod device;
pub mod registry;
pub mod run;
pub mod voucher;

use anyhow::Context;
use clap::Args;
use outpost::config::Config;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

#[derive(Args, Clone, Default)]
pub struct ConfigArgs {
    /// TOML config file (default: the embedded defaults).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// State directory (overrides gateway.data_dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

pub fn load_config(a: &ConfigArgs) -> Result<Config, outpost::config::ConfigError> {
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

/// A token cancelled on SIGTERM or SIGINT.
pub fn on_signal() -> anyhow::Result<CancellationToken> {
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
    Ok(shutdown)
}

pub fn write_out(dir: &Path, name: &str, text: &str, mode: u32) -> anyhow::Result<()> {
    outpost::ca::write_file(&dir.join(name), text.as_bytes(), mode)
        .with_context(|| format!("writing {name}"))
}

pub fn read_text(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}
