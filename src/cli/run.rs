//! `outpost run` (the gateway) and `outpost cloud` (the fleet side).

use anyhow::Context;
use outpost::config::Config;

pub async fn run(config: Config, cloud: bool) -> anyhow::Result<()> {
    let shutdown = super::on_signal()?;
    if cloud {
        outpost::run_cloud(config, shutdown)
            .await
            .context("cloud failed")
    } else {
        outpost::run(config, shutdown)
            .await
            .context("gateway failed")
    }
}
