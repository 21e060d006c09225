//! bulkhead-audit: the tamper-evident audit log.

use std::time::Duration;

use anyhow::Context;
use bulkhead_audit::checkpoint::Signer;
use bulkhead_audit::log::{Log, LogConfig};
use bulkhead_audit::{config::Config, service, store};
use bulkhead_mesh::config::CommonFlags;
use bulkhead_mesh::server::MeshServer;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-audit",
    version,
    about = "Bulkhead audit: the tamper-evident audit log"
)]
struct Flags {
    #[command(flatten)]
    common: CommonFlags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let Some(config) =
        bulkhead_mesh::service::load_config("audit", &Config::default(), &flags.common)?
    else {
        return Ok(());
    };
    let _telemetry = bulkhead_mesh::telemetry::init("audit", &config.mesh.telemetry)?;
    let (identity, bundle) = config
        .mesh
        .tls
        .load()
        .context("failed to load the tls files")?;
    let store = store::open(&config.store_url())
        .await
        .context("failed to open the audit store")?;
    let signer = Signer::load_or_create(&config.signing_key_path())
        .context("failed to load the signing key")?;
    let stop = CancellationToken::new();
    let log = Log::open(
        store,
        signer,
        LogConfig {
            checkpoint_interval: Duration::from_millis(config.checkpoint_interval_ms.max(100)),
        },
        stop.clone(),
    )
    .await
    .context("failed to open the audit log")?;
    let server = MeshServer::new("audit", identity, bundle);
    let api = service::AuditApi::new(log.clone(), server.draining());
    let bound = server
        .add_service(service::server(api), service::POLICY)
        .bind(config.mesh.listen)
        .await?;
    let served = bulkhead_mesh::service::serve(bound, flags.common.addr_file).await;
    // Stop the writer, then sign a head over everything it committed.
    stop.cancel();
    if let Err(e) = log.checkpoint().await {
        tracing::warn!(error = %e, "failed to publish the final signed tree head");
    }
    served?;
    Ok(())
}
