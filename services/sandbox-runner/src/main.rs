//! bulkhead-sandbox-runner: sandboxes on one worker host, credential injection and scrub.

#![deny(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, bail};
use bulkhead_mesh::audit::AuditClient;
use bulkhead_mesh::client::channel;
use bulkhead_mesh::config::CommonFlags;
use bulkhead_mesh::revocation::RevocationList;
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::tls::ExpectServer;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sealed::v1::sealed_vault_service_client::SealedVaultServiceClient;
use bulkhead_sandbox_runner::runner::{Parts, Peers, Runner};
use bulkhead_sandbox_runner::{config::Config, revocation, service, shim};
use clap::Parser;
use tokio_util::sync::CancellationToken;

// The one module with unsafe code: a global allocator that zeroes what it
// frees, so that no freed buffer of this process keeps a credential.
#[allow(unsafe_code)]
mod zeroizing_alloc;

#[global_allocator]
static ALLOC: zeroizing_alloc::ZeroizingAlloc = zeroizing_alloc::ZeroizingAlloc;

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

/// This runner instance's id, kept in its data directory: the label by which
/// it finds the containers an earlier life of it left behind.
fn instance_id(config: &Config) -> anyhow::Result<String> {
    let path = config.mesh.data_dir.join("runner-instance");
    if let Ok(id) = std::fs::read_to_string(&path) {
        return Ok(id.trim().to_owned());
    }
    std::fs::create_dir_all(&config.mesh.data_dir)
        .with_context(|| format!("failed to create {}", config.mesh.data_dir.display()))?;
    let id = hex::encode(rand::random::<[u8; 12]>());
    std::fs::write(&path, &id).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(id)
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
    let peers = &config.mesh.peers;
    let (Some(audit_addr), Some(identity_addr), Some(sealed_addr), Some(dispatcher_addr)) = (
        &peers.audit,
        &peers.identity,
        &peers.sealed_vault,
        &peers.dispatcher,
    ) else {
        bail!(
            "peers.audit, peers.identity, peers.sealed_vault and peers.dispatcher are required: credentials come from sealed-vault, checked against identity, what runs is what the dispatcher assigned, and every injection is audited"
        );
    };
    let dial = |addr: &str, name: &str| {
        channel(
            addr,
            Some(&identity),
            &bundle,
            ExpectServer::Service(name.into()),
        )
    };
    let peers = Peers {
        sealed: SealedVaultServiceClient::new(dial(sealed_addr, "sealed-vault")?),
        identity: IdentityServiceClient::new(dial(identity_addr, "identity")?),
        dispatcher: DispatcherServiceClient::new(dial(dispatcher_addr, "dispatcher")?),
        audit: AuditClient::new(dial(audit_addr, "audit")?),
    };
    let shim = shim::install(&config.shim_dir()).context("failed to install the init shim")?;
    let instance = instance_id(&config)?;
    let revocations = Arc::new(RevocationList::new());
    let synced = Arc::new(AtomicBool::new(false));
    let runner = Runner::new(Parts {
        trust_domain: bundle.trust_domain().clone(),
        self_id: identity.spiffe_id().to_string(),
        peers,
        revocations: revocations.clone(),
        synced: synced.clone(),
        shim,
        instance,
        config: config.clone(),
    });
    // Resolve goes over a connection of its own, made and dropped per start,
    // so that no pooled connection keeps a response in its buffers.
    runner.dial_sealed_per_start({
        let (addr, identity, bundle) = (sealed_addr.clone(), identity.clone(), bundle.clone());
        move || {
            channel(
                &addr,
                Some(&identity),
                &bundle,
                ExpectServer::Service("sealed-vault".into()),
            )
        }
    });
    // In the background: a slow engine must not hold up serving.
    tokio::spawn({
        let runner = runner.clone();
        async move { runner.remove_orphans().await }
    });
    let stop = CancellationToken::new();
    tokio::spawn(revocation::follow(
        revocations.clone(),
        synced.clone(),
        dial(identity_addr, "identity")?,
        runner.clone(),
        stop.clone(),
    ));
    // Starts fail closed until identity's revocation list is in hand: report
    // NOT_SERVING until then.
    let ready = synced.clone();
    let server = MeshServer::new("sandbox-runner", identity, bundle);
    let draining = server.draining();
    let bound = server
        .ready_when(async move {
            while !ready.load(std::sync::atomic::Ordering::Acquire) {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .revocations(revocations)
        .add_service(
            service::server(service::SandboxRunnerApi::new(runner.clone(), draining)),
            service::POLICY,
        )
        .bind(config.mesh.listen)
        .await?;
    let served = bulkhead_mesh::service::serve(bound, flags.common.addr_file).await;
    // No sandbox outlives its runner: each is killed, removed and scrubbed.
    runner.shutdown().await;
    stop.cancel();
    served?;
    Ok(())
}
