//! bulkhead-audit: the tamper-evident audit log.

use std::time::Duration;

use anyhow::Context;
use bulkhead_audit::checkpoint::Signer;
use bulkhead_audit::log::{Log, LogConfig};
use bulkhead_audit::{config::Config, service, store, web};
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
    // Identity's revocation list, enforced at every handshake and request.
    let revoked =
        bulkhead_mesh::service::follow_revocations(&config.mesh, &identity, &bundle, stop.clone())?;
    let web = match config.web.listen {
        Some(addr) => {
            let tls = web::tls_config(&identity, &bundle, revoked.clone())
                .context("failed to build the audit view's tls config")?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("failed to bind the audit view on {addr}"))?;
            if config
                .web
                .operator_token
                .as_deref()
                .is_none_or(str::is_empty)
            {
                tracing::info!(
                    "audit view has no operator token; only operator client certificates are admitted"
                );
            }
            let web_stop = CancellationToken::new();
            let task = tokio::spawn(web::serve(
                log.clone(),
                listener,
                tls,
                revoked.clone(),
                config.web.operator_token.clone(),
                web_stop.clone().cancelled_owned(),
            ));
            Some((web_stop, task))
        }
        None => None,
    };
    let server = MeshServer::new("audit", identity, bundle).revocations(revoked);
    let api = service::AuditApi::new(log.clone(), server.draining());
    let bound = server
        .add_service(service::server(api), service::POLICY)
        .bind(config.mesh.listen)
        .await?;
    let served = bulkhead_mesh::service::serve(bound, flags.common.addr_file).await;
    // The view stops once the gRPC server has drained, before the writer stops.
    if let Some((web_stop, task)) = web {
        web_stop.cancel();
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "audit view stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "audit view task failed"),
        }
    }
    // Stop the writer, then sign a head over everything it committed.
    stop.cancel();
    if let Err(e) = log.checkpoint().await {
        tracing::warn!(error = %e, "failed to publish the final signed tree head");
    }
    served?;
    Ok(())
}
