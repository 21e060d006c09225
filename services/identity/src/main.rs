//! bulkhead-identity: the trust domain's CA, worker enrollment, per-run identities and revocation.

use anyhow::Context;
use bulkhead_identity::{config::Config, service};
use bulkhead_mesh::config::CommonFlags;
use bulkhead_mesh::server::MeshServer;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-identity",
    version,
    about = "Bulkhead identity: the trust domain's CA, worker enrollment, per-run identities and revocation"
)]
struct Flags {
    #[command(flatten)]
    common: CommonFlags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let Some(config) =
        bulkhead_mesh::service::load_config("identity", &Config::default(), &flags.common)?
    else {
        return Ok(());
    };
    let _telemetry = bulkhead_mesh::telemetry::init("identity", &config.mesh.telemetry)?;
    let (identity, bundle) = config
        .mesh
        .tls
        .load()
        .context("failed to load the tls files")?;
    let bound = MeshServer::new("identity", identity, bundle)
        .add_service(service::server(service::IdentityApi), service::POLICY)
        .bind(config.mesh.listen)
        .await?;
    bulkhead_mesh::service::serve(bound, flags.common.addr_file).await?;
    Ok(())
}
