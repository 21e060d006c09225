//! Where sandboxes run: a Docker container ([`docker`]) or a child process
//! ([`process`], weaker isolation, for hosts without Docker).
//!
//! A backend launches the init shim with the agent's argv and nothing else;
//! the shim waits on stdin. Only then does the runner record the injection in
//! audit and [`Instance::deliver`] the credential frame and the payload, so a
//! sandbox whose injection cannot be recorded never sees a credential.

pub mod docker;
pub mod process;

use std::path::PathBuf;

use bytes::Bytes;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::model::{BackendKind, Limits, Network};

/// What a sandbox's process wrote, or that it ended.
#[derive(Debug)]
pub enum Event {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The process is gone and its output is complete.
    Ended(ProcessEnd),
}

/// How a sandbox's process ended, as the backend saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessEnd {
    pub code: i32,
    pub signal: i32,
    pub oom_killed: bool,
    /// For operators; never holds output.
    pub message: String,
}

/// Everything a backend needs to launch one sandbox; no credential.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub sandbox_id: String,
    pub tenant: String,
    pub run_id: String,
    /// Docker: the image. Process: the program.
    pub image: String,
    /// The agent's argv. Docker: empty runs the image's entrypoint and cmd.
    /// Process: `image` is executed with this argv (argv[0] becomes the
    /// program's path); empty runs it without arguments.
    pub command: Vec<String>,
    pub limits: Limits,
    pub network: Network,
    /// The init shim on the host.
    pub shim: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The engine cannot be reached or failed; retrying may work.
    #[error("{0}")]
    Unavailable(String),
    /// The image (or program) is not on this host.
    #[error("{0} is not present on this host")]
    Missing(String),
    /// The launch request cannot work on this host (a network that does not exist).
    #[error("{0}")]
    Refused(String),
}

/// What destroying a sandbox did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Destroyed {
    /// The container (or process group) is gone.
    pub sandbox: bool,
    /// Its tmpfs and any per-sandbox host files are gone.
    pub files: bool,
}

/// A way to run sandboxes.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> BackendKind;

    /// Whether the backend can launch now (the Docker engine answers).
    async fn available(&self) -> bool;

    /// Starts the shim for `spec`, waiting on its stdin. Output and the end
    /// arrive on `events`. On error nothing is left behind.
    async fn launch(
        &self,
        spec: &LaunchSpec,
        events: mpsc::Sender<Event>,
    ) -> Result<Box<dyn Instance>, BackendError>;
}

/// One launched sandbox.
#[async_trait::async_trait]
pub trait Instance: Send + Sync + std::fmt::Debug {
    /// The Docker container id; empty for a process.
    fn container_id(&self) -> String;

    /// Writes `input` (the credential frame, then the payload) to the shim's
    /// stdin and closes it. `input` is zeroized when dropped.
    async fn deliver(&self, input: Zeroizing<Vec<u8>>) -> Result<(), BackendError>;

    /// Kills every process of the sandbox now (SIGKILL).
    async fn kill(&self) -> Result<(), BackendError>;

    /// Kills and removes the sandbox and its files; never to be reused.
    async fn destroy(&self) -> Result<Destroyed, BackendError>;
}
