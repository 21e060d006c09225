//! bulkhead-dispatcher: tenant-scoped fleet dispatch over streaming claims.

use anyhow::Context;
use bulkhead_dispatcher::{config::Config, service};
use bulkhead_mesh::config::CommonFlags;
use bulkhead_mesh::server::MeshServer;
use clap::Parser;

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
    let bound = MeshServer::new("dispatcher", identity, bundle)
        .add_service(service::server(service::DispatcherApi), service::POLICY)
        .bind(config.mesh.listen)
        .await?;
    bulkhead_mesh::service::serve(bound, flags.common.addr_file).await?;
    Ok(())
}
