//! `outpost device`: the device agent.

use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// The device credential file (from `outpost voucher init-device`); replaced after
    /// onboarding.
    #[arg(long, default_value = outpost::fdo_wire::credential::FILE_NAME)]
    cred: PathBuf,
    /// Where the operational MQTT credentials are kept.
    #[arg(long, default_value = "outpost-device")]
    state_dir: PathBuf,
    /// Heartbeat interval (e.g. 30s; 0s: none).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    interval: std::time::Duration,
    /// MQTT keep-alive.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    keep_alive: std::time::Duration,
    /// Give up onboarding after this many attempts (default: never).
    #[arg(long)]
    attempts: Option<u32>,
    /// Onboard, save the credentials, and exit.
    #[arg(long)]
    onboard_only: bool,
}

pub async fn device(a: DeviceArgs) -> anyhow::Result<()> {
    let shutdown = super::on_signal()?;
    let opts = outpost::device::AgentOptions {
        cred: a.cred,
        state_dir: a.state_dir,
        interval: a.interval,
        keep_alive: a.keep_alive,
        attempts: a.attempts,
        onboard_only: a.onboard_only,
        ..Default::default()
    };
    outpost::device::run(opts, shutdown)
        .await
        .context("device agent failed")
}
