//! The Bulkhead worker agent, as a library so that tests and benchmarks can
//! run workers in-process.
//!
//! A worker enrolls with a join token (or reuses the SVID in its state dir, or
//! is handed one), registers with the dispatcher, holds its claim stream and
//! runs the tasks it is assigned, each under its own run identity whose key
//! never leaves the worker. It never holds tenant secrets.
//!
//! - [`config`]: flags and [`WorkerConfig`].
//! - [`enroll`]: the worker's own SVID: enrollment, the state dir, renewal.
//! - `claim`: the claim stream's state machine.
//! - [`run`]: the [`Runner`] trait and the bare [`BareRunner`].
//! - [`sandbox`]: the [`SandboxRunner`], which hands runs to the host's
//!   sandbox-runner (`--sandbox-runner`, or [`WorkerConfig::sandbox`]).
//! - [`backoff`]: jittered exponential backoff.
//!
//! ```no_run
//! # async fn demo(config: bulkhead_worker::WorkerConfig, identity: bulkhead_mesh::tls::Identity) -> Result<(), bulkhead_worker::WorkerError> {
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! // Enroll (or reuse the state dir), then serve until `shutdown` or a drain:
//! bulkhead_worker::run(config.clone(), shutdown.clone()).await?;
//! // Or skip enrollment with an SVID issued some other way:
//! bulkhead_worker::Worker::new(config).run_with_identity(identity, shutdown).await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

use std::sync::Arc;

use bulkhead_mesh::spiffe::Principal;
use bulkhead_mesh::tls::Identity;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub mod backoff;
mod claim;
pub mod config;
pub mod enroll;
mod failure;
pub mod keys;
pub mod run;
pub mod sandbox;

pub use config::{ConfigError, JoinToken, Labels, SandboxConfig, WorkerConfig};
pub use enroll::EnrollError;
pub use run::{Backend, BareRunner, Outcome, RunResult, RunSpec, Runner};
pub use sandbox::SandboxRunner;

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    #[error("label {key}={value} disagrees with the worker's identity {id}")]
    ReservedLabel {
        key: String,
        value: String,
        id: String,
    },
    /// The dispatcher (or identity) refuses the worker for good.
    #[error("{what}: {detail}")]
    Refused { what: &'static str, detail: String },
}

/// A worker: its configuration and the runner its tasks run on.
#[derive(Debug, Clone)]
pub struct Worker {
    config: WorkerConfig,
    runner: Arc<dyn Runner>,
}

impl Worker {
    /// A worker running tasks in the host's sandbox-runner when
    /// `config.sandbox` is set ([`SandboxRunner`]; `config.identity` is then
    /// required), else bare ([`BareRunner`] in `config.work_dir`).
    pub fn new(config: WorkerConfig) -> Self {
        let runner: Arc<dyn Runner> = match (&config.sandbox, &config.identity) {
            (Some(sandbox), Some(identity)) => Arc::new(SandboxRunner::new(
                sandbox,
                identity.clone(),
                config.bundle.clone(),
            )),
            // Without identity `validate` refuses the config before any run.
            _ => Arc::new(BareRunner::new(config.work_dir.clone())),
        };
        Self { config, runner }
    }

    /// Runs tasks on `runner` instead.
    pub fn with_runner(mut self, runner: Arc<dyn Runner>) -> Self {
        self.runner = runner;
        self
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Enrolls (or reuses the SVID in the state dir), then serves until
    /// `shutdown` is cancelled or the dispatcher drains the worker (`Ok`), or
    /// until its identity is refused for good (`Err`).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        self.config.validate()?;
        let identity = match enroll::obtain(&self.config, &shutdown).await {
            Ok(id) => id,
            Err(EnrollError::Stopped) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        self.run_with_identity(identity, shutdown).await
    }

    /// Serves with `identity` (a worker SVID), skipping enrollment. It is
    /// renewed through `config.identity` when that is set.
    pub async fn run_with_identity(
        self,
        identity: Identity,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        let Worker { config, runner } = self;
        config.validate()?;
        enroll::check_worker(&identity, &config.bundle)?;
        check_reserved_labels(&config, &identity)?;
        tracing::info!(
            id = %identity.spiffe_id(),
            dispatcher = %config.dispatcher,
            max_concurrent_runs = config.max_concurrent_runs,
            labels = config.labels.len(),
            sandbox_runner = config.sandbox.as_ref().map_or("none (bare runs)", |s| s.runner.as_str()),
            backends = ?runner.backends(),
            "worker starting"
        );
        let config = Arc::new(config);
        let (identity_tx, identity_rx) = watch::channel(identity);
        let (fatal_tx, fatal_rx) = mpsc::channel(1);
        let stop_renewal = CancellationToken::new();
        let renewal = {
            let config = config.clone();
            let stop = stop_renewal.clone();
            tokio::spawn(async move {
                if let Err(e) = enroll::renew_forever(&config, identity_tx, stop).await {
                    let _ = fatal_tx.send(WorkerError::Enroll(e)).await;
                }
            })
        };
        let result = claim::ClaimLoop::new(config, runner, identity_rx, fatal_rx)
            .run(shutdown)
            .await;
        stop_renewal.cancel();
        let _ = renewal.await;
        result
    }
}

/// Enrolls (or reuses the state dir) and serves; see [`Worker::run`].
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    Worker::new(config).run(shutdown).await
}

/// Serves with an SVID issued some other way; see [`Worker::run_with_identity`].
pub async fn run_with_identity(
    config: WorkerConfig,
    identity: Identity,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    Worker::new(config)
        .run_with_identity(identity, shutdown)
        .await
}

/// The reserved labels `tenant` and `pool` must name the worker's own tenant
/// or pool (the dispatcher refuses the registration otherwise).
fn check_reserved_labels(config: &WorkerConfig, identity: &Identity) -> Result<(), WorkerError> {
    let id = identity.spiffe_id();
    let (tenant, pool) = match id.principal() {
        Principal::TenantWorker { tenant, .. } => (Some(tenant), None),
        Principal::PoolWorker { pool, .. } => (None, Some(pool)),
        _ => (None, None),
    };
    for (key, own) in [("tenant", tenant), ("pool", pool)] {
        if let Some(value) = config.labels.get(key)
            && Some(value) != own
        {
            return Err(WorkerError::ReservedLabel {
                key: key.into(),
                value: value.into(),
                id: id.to_string(),
            });
        }
    }
    Ok(())
}
