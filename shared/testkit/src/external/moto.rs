//! The moto server (PyPI `moto[server]`), standing in for AWS Secrets Manager.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;
use tempfile::TempDir;

use super::{
    Missing, Probe, Process, ServerSpec, find_program, free_port, launch, listens_on,
    loopback_http_client, server_dir,
};

const INSTALL_HINT: &str = "install PyPI moto[server]";

/// A moto server of its own on 127.0.0.1, in memory. It accepts any AWS credentials and does
/// not check signatures. Stopped when dropped.
#[derive(Debug)]
pub struct Moto {
    // Declared before `dir` so the server stops before its dir is removed.
    process: Process,
    port: u16,
    dir: TempDir,
}

/// How to run the server: its console script, or the module under a Python that has it.
#[derive(Debug)]
enum Launcher {
    Script(PathBuf),
    Module(PathBuf),
}

impl Moto {
    /// Starts a server, or returns `Ok(None)` after a `SKIP:` line when moto is not installed
    /// (an error under `BULKHEAD_REQUIRE_EXTERNAL=1`).
    pub async fn start() -> anyhow::Result<Option<Self>> {
        let Some(launcher) = find_launcher() else {
            return Missing::new("moto_server", INSTALL_HINT).skip();
        };
        let dir = server_dir("moto")?;
        let log = dir.path().join("moto.log");
        let client = loopback_http_client()?;
        let spec = ServerSpec {
            server: "moto",
            log: &log,
            stop_signal: Signal::SIGTERM,
        };
        let (process, port) = launch(
            &spec,
            free_port,
            |port| moto_command(&launcher, dir.path(), port),
            |port, pid| probe(client.clone(), port, pid),
        )
        .await?;
        Ok(Some(Self { process, port, dir }))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, the endpoint URL for every AWS service moto serves.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's log (stdout and stderr of the moto server).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("moto.log")
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

fn find_launcher() -> Option<Launcher> {
    if let Ok(script) = find_program("moto_server", INSTALL_HINT) {
        return Some(Launcher::Script(script));
    }
    let python = find_program("python3", INSTALL_HINT).ok()?;
    let has_moto = Command::new(&python)
        .args(["-c", "import moto.server"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    has_moto.then_some(Launcher::Module(python))
}

fn moto_command(launcher: &Launcher, dir: &Path, port: u16) -> Command {
    let mut command = match launcher {
        Launcher::Script(script) => Command::new(script),
        Launcher::Module(python) => {
            let mut command = Command::new(python);
            command.args(["-m", "moto.server"]);
            command
        }
    };
    command
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        // Python buffers a redirected stdout; the log must be current when a start fails.
        .env("PYTHONUNBUFFERED", "1")
        .current_dir(dir);
    command
}

/// Ready once the moto dashboard API answers and the listening socket is our process's: moto
/// has no identity of its own to ask for, and another server may have taken our port.
async fn probe(client: reqwest::Client, port: u16, pid: u32) -> Probe {
    match client
        .get(format!("http://127.0.0.1:{port}/moto-api/"))
        .send()
        .await
    {
        Ok(response) if response.status().is_success() => {
            if listens_on(pid, port) {
                Probe::Ready
            } else {
                Probe::Foreign
            }
        }
        _ => Probe::NotReady,
    }
}
