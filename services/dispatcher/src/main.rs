//! bulkhead-dispatcher: tenant-scoped fleet dispatch over streaming claims.

use anyhow::Context;
use bulkhead_dispatcher::{config::Config, service};
use bulkhead_mesh::config::CommonFlags;
use bulkhead_mesh::server::MeshServer;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-dispatcher",
    version,
    about = "Bulkhead dispatcher: tenant-scoped fleet dispatch over streaming claims"
)]
struct Flags {
    #[command(flatten)]
    common: CommonFlags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let Some(config) =
        bulkhead_mesh::service::load_config("dispatcher", &Config::default(), &flags.common)?
    else {
        return Ok(());
    };
    let _telemetry = bulkhead_mesh::telemetry::init("dispatcher", &config.mesh.telemetry)?;
    let (identity, bundle) = config
        .mesh
        .tls
        .load()
        .context("failed to load the tls files")?;
    let stop = CancellationToken::new();
    // Identity's revocation list, enforced at every handshake and request.
    let revoked =
        bulkhead_mesh::service::follow_revocations(&config.mesh, &identity, &bundle, stop.clone())?;
    let bound = MeshServer::new("dispatcher", identity, bundle)
        .revocations(revoked)
        .add_service(service::server(service::DispatcherApi), service::POLICY)
        .bind(config.mesh.listen)
        .await?;
    let served = bulkhead_mesh::service::serve(bound, flags.common.addr_file).await;
    stop.cancel();
    served?;
    Ok(())
}
