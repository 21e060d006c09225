//! `bulkhead dev up`: the five services on free loopback ports, embedded
//! defaults, data and logs under one directory, until interrupted.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bulkhead_cluster::{Endpoints, LocalMesh, MeshSpec};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Starts the mesh and runs until Ctrl-C / SIGTERM, then stops it.
    Up {
        /// Directory for the PKI (made if missing), configs, data, logs and
        /// endpoints.json.
        #[arg(long, env = "BULKHEAD_DIR", value_name = "DIR")]
        dir: PathBuf,
        /// Trust domain of a PKI made here.
        #[arg(long, default_value = "bulkhead.local")]
        trust_domain: String,
    },
}

pub async fn run(cmd: DevCommand) -> anyhow::Result<()> {
    match cmd {
        DevCommand::Up { dir, trust_domain } => up(dir, trust_domain).await,
    }
}

async fn up(dir: PathBuf, trust_domain: String) -> anyhow::Result<()> {
    let mut spec = MeshSpec::new(&dir);
    spec.trust_domain = trust_domain;
    spec.audit_view = true;
    println!("starting the mesh in {}", dir.display());
    let mesh = LocalMesh::start(&spec)
        .await
        .context("failed to start the mesh")?;
    for (name, addr) in &mesh.endpoints.services {
        println!("  {name:<15} {addr}");
    }
    if let (Some(url), Some(token)) = (&mesh.endpoints.audit_view, &mesh.endpoints.audit_view_token)
    {
        println!("audit view: {url}?token=<the token in {}>", token.display());
    }
    println!("endpoints: {}", Endpoints::path(&dir).display());
    println!("logs:      {}", dir.join("logs").display());
    println!("ready; Ctrl-C stops the mesh");
    bulkhead_mesh::shutdown::signal().await;
    println!("stopping");
    mesh.stop().await;
    Ok(())
}

pub async fn health(dir: &Path) -> anyhow::Result<()> {
    let endpoints = Endpoints::load(dir)?;
    let (id, bundle) = endpoints.operator()?;
    let mut bad = 0;
    for (name, addr) in &endpoints.services {
        match bulkhead_cluster::health(addr, &id, &bundle).await {
            Ok(true) => println!("{name:<15} {addr:<22} SERVING"),
            Ok(false) => {
                bad += 1;
                println!("{name:<15} {addr:<22} NOT_SERVING");
            }
            Err(e) => {
                bad += 1;
                println!("{name:<15} {addr:<22} unreachable: {e}");
            }
        }
    }
    if bad > 0 {
        bail!("{bad} service(s) unhealthy");
    }
    Ok(())
}
