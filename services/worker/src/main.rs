//! bulkhead-worker: the agent on a worker host. It enrolls with a join token,
//! registers with the dispatcher, holds a claim stream and runs tasks, never
//! holding tenant secrets.
//!
//! The claim loop arrives with the dispatcher issue; today the worker enrolls
//! against identity, which answers UNIMPLEMENTED until the identity issue lands,
//! and it says so and exits non-zero.

use std::path::PathBuf;

use anyhow::{Context, bail};
use bulkhead_mesh::tls::{ExpectServer, TrustBundle};
use bulkhead_proto::identity::v1::{
    EnrollWorkerRequest, identity_service_client::IdentityServiceClient,
};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "bulkhead-worker", version, about = "Bulkhead worker agent")]
struct Flags {
    /// The dispatcher, host:port.
    #[arg(long)]
    dispatcher: String,
    /// The identity service, host:port.
    #[arg(long)]
    identity: String,
    /// A join token made by `bulkhead identity join-token create`.
    #[arg(long, env = "BULKHEAD_JOIN_TOKEN", hide_env_values = true)]
    join_token: String,
    /// Labels, k=v,... (a task is offered only to workers whose labels are a
    /// superset of its own).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// The trust domain's CA certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// The worker's name.
    #[arg(long, default_value = "worker")]
    name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    bulkhead_mesh::tls::install_crypto_provider();
    let flags = Flags::parse();
    for l in &flags.labels {
        if !l.contains('=') {
            bail!("invalid --labels entry {l:?}: expected k=v");
        }
    }
    let bundle = TrustBundle::from_pem_file(&flags.ca).context("failed to load --ca")?;
    // Enrollment authenticates by join token over TLS that authenticates the server only.
    let identity_id = bundle
        .trust_domain()
        .join(["service", "identity"])
        .context("trust domain")?;
    let ch = bulkhead_mesh::client::channel(
        &flags.identity,
        None,
        &bundle,
        ExpectServer::Exact(identity_id),
    )?;
    let resp = IdentityServiceClient::new(ch)
        .enroll_worker(EnrollWorkerRequest {
            join_token: flags.join_token.clone(),
            worker_name: flags.name.clone(),
            ..Default::default()
        })
        .await;
    match resp {
        Ok(_) => bail!("enrolled, but the claim loop is not available in this build"),
        Err(status) => bail!(
            "enrollment failed: {}: {} (dispatcher {})",
            status.code(),
            status.message(),
            flags.dispatcher
        ),
    }
}
