//! bulkhead-sandbox-runner: sandboxes on one worker host, credential injection and scrub.

use anyhow::Context;
use bulkhead_mesh::config::CommonFlags;
use bulkhead_mesh::server::MeshServer;
use bulkhead_sandbox_runner::{config::Config, service};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-sandbox-runner",
    version,
    about = "Bulkhead sandbox-runner: sandboxes on one worker host, credential injection and scrub"
)]
struct Flags {
    #[command(flatten)]
    common: CommonFlags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let Some(config) =
        bulkhead_mesh::service::load_config("sandbox-runner", &Config::default(), &flags.common)?
    else {
        return Ok(());
    };
    let _telemetry = bulkhead_mesh::telemetry::init("sandbox-runner", &config.mesh.telemetry)?;
    let (identity, bundle) = config
        .mesh
        .tls
        .load()
        .context("failed to load the tls files")?;
    let stop = CancellationToken::new();
    // Identity's revocation list, enforced at every handshake and request.
    let revoked =
        bulkhead_mesh::service::follow_revocations(&config.mesh, &identity, &bundle, stop.clone())?;
    let bound = MeshServer::new("sandbox-runner", identity, bundle)
        .revocations(revoked)
        .add_service(service::server(service::SandboxRunnerApi), service::POLICY)
        .bind(config.mesh.listen)
        .await?;
    let served = bulkhead_mesh::service::serve(bound, flags.common.addr_file).await;
    stop.cancel();
    served?;
    Ok(())
}
