//! bulkhead-identity: the trust domain's CA, worker enrollment, per-run
//! identities and revocation.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bulkhead_identity::config::Config;
use bulkhead_identity::keys::JwtKeys;
use bulkhead_identity::service::{self, AuditDenials, IdentityApi, Limits, Parts};
use bulkhead_identity::store;
use bulkhead_mesh::audit::AuditClient;
use bulkhead_mesh::config::CommonFlags;
use bulkhead_mesh::pki::Ca;
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::tls::{ClientAuth, ExpectServer};
use clap::Parser;
use tokio_util::sync::CancellationToken;

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
    let ca_cert =
        std::fs::read_to_string(config.ca_cert()).context("failed to read the ca certificate")?;
    let ca_key = std::fs::read_to_string(config.ca_key()).context("failed to read the ca key")?;
    let ca = Ca::load(&ca_cert, &ca_key).context("failed to load the ca")?;
    if ca.trust_domain() != bundle.trust_domain() {
        bail!(
            "the ca's trust domain {} is not the bundle's {}",
            ca.trust_domain(),
            bundle.trust_domain()
        );
    }
    let Some(audit_addr) = &config.mesh.peers.audit else {
        bail!(
            "peers.audit is required: identity records every issuance in audit before it happens"
        );
    };
    let audit = AuditClient::new(bulkhead_mesh::client::channel(
        audit_addr,
        Some(&identity),
        &bundle,
        ExpectServer::Service("audit".into()),
    )?);
    let store = store::open(&config.store_url())
        .await
        .context("failed to open the identity store")?;
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let keys = JwtKeys::load_or_create(
        &config.jwt_keys_path(),
        config.jwt_key_rotation_secs,
        config.jwt_key_overlap_secs.max(config.jwt_max_ttl_secs),
        now_ms,
    )
    .context("failed to load the jwt signing keys")?;

    let stop = CancellationToken::new();
    let server =
        MeshServer::new("identity", identity, bundle.clone()).client_auth(ClientAuth::Optional);
    let api = IdentityApi::start(
        Parts {
            ca,
            authorities: bundle.authorities().to_vec(),
            store,
            keys: Arc::new(keys),
            audit: audit.clone(),
            limits: Limits {
                run_svid_max_ttl: Duration::from_secs(config.run_svid_max_ttl_secs),
                worker_svid_ttl: Duration::from_secs(config.worker_svid_ttl_secs),
                jwt_max_ttl: Duration::from_secs(config.jwt_max_ttl_secs),
            },
            draining: server.draining(),
        },
        stop.clone(),
    )
    .await
    .context("failed to start identity")?;
    let bound = server
        .revocations(api.revocations())
        .denials(Arc::new(AuditDenials::new(audit)))
        .add_service(service::server(api), service::POLICY)
        .bind(config.mesh.listen)
        .await?;
    let served = bulkhead_mesh::service::serve(bound, flags.common.addr_file).await;
    stop.cancel();
    served?;
    Ok(())
}
