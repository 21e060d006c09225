//! `bulkhead`: the operator's command.
//!
//! - `bulkhead pki init|issue`: the trust domain's dev CA and X.509-SVIDs.
//! - `bulkhead dev up`: the five services on loopback, with embedded defaults.
//! - `bulkhead health`: gRPC health of every service of a running mesh.
//! - `bulkhead demo`: the multi-tenant walkthrough on a local mesh.
//!
//! Every verb that talks to a mesh finds it through `--dir DIR` (or
//! `BULKHEAD_DIR`): `DIR/endpoints.json` and the operator certificate in it.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use bulkhead_cli::audit;

mod dev;
mod pki;

#[derive(Debug, Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "Bulkhead: a multi-tenant credential boundary for fleets of AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The trust domain's CA and X.509-SVIDs.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// A local mesh for development and demos.
    #[command(subcommand)]
    Dev(dev::DevCommand),
    /// The audit log: query, tail, export, verify.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Identities: join tokens, revocation, the trust bundle.
    #[command(subcommand)]
    Identity(bulkhead_cli::identity::IdentityCommand),
    /// Tenant profiles in sealed-vault: settings and secret metadata.
    #[command(subcommand)]
    Profile(bulkhead_cli::sealed::ProfileCommand),
    /// Secrets in sealed-vault: put (from stdin or a file), reveal, revoke.
    #[command(subcommand)]
    Secret(bulkhead_cli::sealed::SecretCommand),
    /// The agent registry: submit, approve (another operator), reject, list.
    #[command(subcommand)]
    Agent(bulkhead_cli::fleet::AgentCommand),
    /// The task queue: enqueue (payload from a file or stdin), get, list,
    /// cancel, watch.
    #[command(subcommand)]
    Task(bulkhead_cli::fleet::TaskCommand),
    /// Registered workers.
    #[command(subcommand)]
    Worker(bulkhead_cli::fleet::WorkerCommand),
    /// Resets a tenant's workers or a pool.
    #[command(subcommand)]
    Pool(bulkhead_cli::fleet::PoolCommand),
    /// The multi-tenant walkthrough: a local mesh, real workers, three
    /// tenants, the refused cross-tenant claim, the leak scan and the
    /// verified audit trail. Exits non-zero if any guarantee failed.
    Demo(bulkhead_cli::demo::DemoArgs),
    /// Checks gRPC health of every service of a running mesh.
    Health {
        #[arg(long, env = "BULKHEAD_DIR", value_name = "DIR")]
        dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    bulkhead_mesh::tls::install_crypto_provider();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("failed to start the runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Pki(cmd) => pki::run(cmd),
            Command::Dev(cmd) => dev::run(cmd).await,
            Command::Health { dir } => dev::health(&dir).await,
            Command::Demo(args) => {
                if !bulkhead_cli::demo::run(args).await? {
                    // The story above says which guarantee failed.
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::Audit(cmd) => audit::run(cmd).await,
            Command::Identity(cmd) => bulkhead_cli::identity::run(cmd).await,
            Command::Profile(cmd) => bulkhead_cli::sealed::run_profile(cmd).await,
            Command::Secret(cmd) => bulkhead_cli::sealed::run_secret(cmd).await,
            Command::Agent(cmd) => bulkhead_cli::fleet::run_agent(cmd).await,
            Command::Task(cmd) => bulkhead_cli::fleet::run_task(cmd).await,
            Command::Worker(cmd) => bulkhead_cli::fleet::run_worker(cmd).await,
            Command::Pool(cmd) => bulkhead_cli::fleet::run_pool(cmd).await,
        }
    })
}
