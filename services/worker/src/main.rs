//! bulkhead-worker: the agent on a worker host. It enrolls with a join token
//! (or reuses the SVID in its state dir), registers with the dispatcher, holds
//! a claim stream and runs tasks, never holding tenant secrets.

use anyhow::Context;
use bulkhead_worker::config::Flags;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    bulkhead_mesh::tls::install_crypto_provider();
    let flags = Flags::parse();
    let _telemetry = bulkhead_mesh::telemetry::init("worker", &flags.telemetry())?;
    let config = flags.into_config().context("invalid configuration")?;
    let shutdown = bulkhead_mesh::shutdown::on_signal();
    bulkhead_worker::run(config, shutdown)
        .await
        .context("the worker stopped")?;
    Ok(())
}
