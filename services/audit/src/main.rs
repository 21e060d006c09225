//! bulkhead-audit: the tamper-evident audit log.

use anyhow::Context;
use bulkhead_audit::{config::Config, service};
use bulkhead_mesh::config::CommonFlags;
use bulkhead_mesh::server::MeshServer;
use clap::Parser;

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
    let bound = MeshServer::new("audit", identity, bundle)
        .add_service(service::server(service::AuditApi), service::POLICY)
        .bind(config.mesh.listen)
        .await?;
    bulkhead_mesh::service::serve(bound, flags.common.addr_file).await?;
    Ok(())
}
