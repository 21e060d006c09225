//! bulkhead-dispatcher: tenant-scoped fleet dispatch over streaming claims.

use std::sync::Arc;

use anyhow::{Context, bail};
use bulkhead_dispatcher::engine::{Engine, Parts};
use bulkhead_dispatcher::wake::Wake;
use bulkhead_dispatcher::{config::Config, service, store};
use bulkhead_mesh::audit::AuditClient;
use bulkhead_mesh::config::CommonFlags;
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::tls::ExpectServer;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sealed::v1::sealed_vault_service_client::SealedVaultServiceClient;
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
    let peers = &config.mesh.peers;
    let Some(audit_addr) = &peers.audit else {
        bail!("peers.audit is required: every dispatch event is recorded before it happens");
    };
    let Some(identity_addr) = &peers.identity else {
        bail!("peers.identity is required: it signs every run's identity");
    };
    let audit = AuditClient::new(bulkhead_mesh::client::channel(
        audit_addr,
        Some(&identity),
        &bundle,
        ExpectServer::Service("audit".into()),
    )?);
    let identity_client = IdentityServiceClient::new(bulkhead_mesh::client::channel(
        identity_addr,
        Some(&identity),
        &bundle,
        ExpectServer::Service("identity".into()),
    )?);
    let sealed = match &peers.sealed_vault {
        Some(addr) => Some(SealedVaultServiceClient::new(
            bulkhead_mesh::client::channel(
                addr,
                Some(&identity),
                &bundle,
                ExpectServer::Service("sealed-vault".into()),
            )?,
        )),
        None => {
            tracing::warn!("no sealed-vault peer: tasks that carry a cascade will be refused");
            None
        }
    };
    let store = store::open(&config.store_url())
        .await
        .context("failed to open the dispatcher store")?;
    let wake = if config.redis.is_empty() {
        Wake::none()
    } else {
        Wake::redis(&config.redis).context("invalid redis url")?
    };

    let stop = CancellationToken::new();
    // Identity's revocation list, enforced at every handshake and request.
    let revoked =
        bulkhead_mesh::service::follow_revocations(&config.mesh, &identity, &bundle, stop.clone())?;
    let actor = identity.spiffe_id().to_string();
    let server = MeshServer::new("dispatcher", identity, bundle);
    let denials = Arc::new(service::AuditDenials::new(audit.clone()));
    let engine = Engine::start(
        Parts {
            store: Arc::clone(&store),
            audit,
            actor,
            identity: identity_client,
            fleet: config.fleet.clone(),
            wake,
            draining: server.draining(),
        },
        stop.clone(),
    );
    let bound = server
        .revocations(revoked)
        .denials(denials)
        .add_service(
            service::server(service::DispatcherApi::new(engine, sealed)),
            service::POLICY,
        )
        .bind(config.mesh.listen)
        .await?;
    let served = bulkhead_mesh::service::serve(bound, flags.common.addr_file).await;
    stop.cancel();
    served?;
    Ok(())
}
