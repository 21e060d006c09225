//! The process backend, for hosts without Docker: the sandbox is a child
//! process group started from the init shim with a fresh, cleared
//! environment and a fresh directory (its working directory, `HOME` and
//! `TMPDIR`), killed as a group.
//!
//! Weaker isolation, by design and documented: the child shares the runner's
//! user, filesystem view, network and pid namespace; memory, CPU and pids
//! limits are not enforced (the wall-clock timeout is); a child that leaves
//! its process group escapes the kill. The credentials still reach only the
//! agent's environment, through the shim's stdin, never argv or a file.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::ChildStdin;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use super::{Backend, BackendError, Destroyed, Event, Instance, LaunchSpec, ProcessEnd};
use crate::model::BackendKind;

/// How long output may keep flowing after the process has exited.
const DRAIN: Duration = Duration::from_secs(2);

/// Runs sandboxes as child processes.
#[derive(Debug)]
pub struct ProcessBackend {
    /// Where each sandbox gets its directory.
    root: PathBuf,
    /// The `PATH` its processes see.
    path_env: String,
}

impl ProcessBackend {
    pub fn new(root: PathBuf, path_env: String) -> Self {
        Self { root, path_env }
    }
}

fn pump(
    mut r: impl AsyncRead + Unpin + Send + 'static,
    events: mpsc::Sender<Event>,
    stderr: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let data = bytes::Bytes::copy_from_slice(&buf[..n]);
                    let ev = if stderr {
                        Event::Stderr(data)
                    } else {
                        Event::Stdout(data)
                    };
                    if events.send(ev).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

#[async_trait::async_trait]
impl Backend for ProcessBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Process
    }

    async fn available(&self) -> bool {
        true
    }

    async fn launch(
        &self,
        spec: &LaunchSpec,
        events: mpsc::Sender<Event>,
    ) -> Result<Box<dyn Instance>, BackendError> {
        let program = Path::new(&spec.image);
        if !program.is_absolute() {
            return Err(BackendError::Refused(
                "the process backend runs programs by absolute path".into(),
            ));
        }
        if !program.is_file() {
            return Err(BackendError::Missing(format!("program {}", spec.image)));
        }
        let dir = self.root.join(&spec.sandbox_id);
        std::fs::create_dir_all(&dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| BackendError::Unavailable(format!("sandbox directory: {e}")))?;
        // The agent's argv is the request's, but its argv[0] is the program
        // path: the shim execs its first argument under that name.
        let spawned = tokio::process::Command::new(&spec.shim)
            .arg(&spec.image)
            .args(spec.command.iter().skip(1))
            .env_clear()
            .env("PATH", &self.path_env)
            .env("HOME", &dir)
            .env("TMPDIR", &dir)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(BackendError::Unavailable(format!(
                    "cannot start the shim: {e}"
                )));
            }
        };
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| BackendError::Unavailable("the shim exited at once".into()))?;
        let stdin = child.stdin.take();
        let out = child.stdout.take().map(|o| pump(o, events.clone(), false));
        let err = child.stderr.take().map(|e| pump(e, events.clone(), true));
        let exited = Arc::new(AtomicBool::new(false));
        let done = exited.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // Whatever the agent left in its group goes with it.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            done.store(true, Ordering::Release);
            for h in [out, err].into_iter().flatten() {
                let _ = tokio::time::timeout(DRAIN, h).await;
            }
            let end = match status {
                Ok(s) => ProcessEnd {
                    code: s.code().unwrap_or(-1),
                    signal: s.signal().unwrap_or(0),
                    oom_killed: false,
                    message: String::new(),
                },
                Err(e) => ProcessEnd {
                    code: -1,
                    signal: 0,
                    oom_killed: false,
                    message: format!("lost the process: {e}"),
                },
            };
            let _ = events.send(Event::Ended(end)).await;
        });
        Ok(Box::new(ProcessInstance {
            pid,
            dir,
            stdin: tokio::sync::Mutex::new(stdin),
            exited,
        }))
    }
}

#[derive(Debug)]
struct ProcessInstance {
    /// The shim's pid, which is the process group's id.
    pid: i32,
    dir: PathBuf,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    exited: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Instance for ProcessInstance {
    fn container_id(&self) -> String {
        String::new()
    }

    async fn deliver(&self, input: Zeroizing<Vec<u8>>) -> Result<(), BackendError> {
        let Some(mut stdin) = self.stdin.lock().await.take() else {
            return Err(BackendError::Unavailable("stdin already closed".into()));
        };
        let written = async {
            stdin.write_all(&input).await?;
            stdin.flush().await?;
            stdin.shutdown().await
        };
        tokio::time::timeout(Duration::from_secs(30), written)
            .await
            .map_err(|_| BackendError::Unavailable("writing to the sandbox timed out".into()))?
            .map_err(|e| BackendError::Unavailable(format!("writing to the sandbox: {e}")))?;
        drop(stdin);
        drop(input);
        Ok(())
    }

    async fn kill(&self) -> Result<(), BackendError> {
        // Once reaped, the group id may belong to someone else: leave it.
        if !self.exited.load(Ordering::Acquire) {
            match killpg(Pid::from_raw(self.pid), Signal::SIGKILL) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(BackendError::Unavailable(format!("kill: {e}"))),
            }
        }
        Ok(())
    }

    async fn destroy(&self) -> Result<Destroyed, BackendError> {
        drop(self.stdin.lock().await.take());
        self.kill().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.exited.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let files = match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove a sandbox directory");
                false
            }
        };
        Ok(Destroyed {
            sandbox: self.exited.load(Ordering::Acquire),
            files,
        })
    }
}
