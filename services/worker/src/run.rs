//! Running one attempt. The claim loop hands a [`RunSpec`] to a [`Runner`] and
//! reports the [`RunResult`] it returns. [`BareRunner`] runs the agent's argv as
//! a child process; [`crate::sandbox::SandboxRunner`] hands it to the host's
//! sandbox-runner.

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_mesh::spiffe::SpiffeId;
use bulkhead_mesh::tls::{Identity, TlsError};
use bytes::Bytes;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

/// The most output a report carries, in bytes of UTF-8.
pub const SUMMARY_LIMIT: usize = 4 * 1024;
/// The PATH a bare run gets, and the only variable in its environment.
pub const BARE_PATH: &str = "/usr/bin:/bin";
/// How long output readers may go on after the run's process group is gone
/// (a grandchild that left the group may still hold the pipes).
const READER_GRACE: Duration = Duration::from_millis(500);

/// The sandbox backends a runner offers, as registered with the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Docker,
    Process,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit code 0.
    Succeeded,
    /// A non-zero exit.
    Failed,
    /// The attempt could not be run (the task may be offered again).
    Error,
    /// Stopped on a cancel.
    Cancelled,
    /// Killed by a hard revocation.
    Revoked,
    /// Killed at its deadline.
    TimedOut,
}

/// What a run reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    pub outcome: Outcome,
    /// The exit code; -1 when the process did not exit by itself (it was never
    /// started, or it was killed).
    pub exit_code: i32,
    /// The tail of the output, at most [`SUMMARY_LIMIT`] bytes of UTF-8.
    pub output_summary: String,
}

impl RunResult {
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Error,
            exit_code: -1,
            output_summary: truncate_tail(message.into()),
        }
    }
}

/// The run's own identity: the X.509-SVID identity signed for the key the
/// worker made for this run. The key is wiped when this is dropped, which is
/// when the run ends.
pub struct RunCredentials {
    pub run_id: String,
    pub spiffe_id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub(crate) key: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for RunCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunCredentials")
            .field("run_id", &self.run_id)
            .field("spiffe_id", &self.spiffe_id)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl RunCredentials {
    /// The run's identity for mTLS (a sandbox-runner mode presents it to get
    /// JWT-SVIDs for the run). The copy inside [`Identity`] is not wiped on
    /// drop: make it only when needed and drop it with the run.
    pub fn identity(&self) -> Result<Identity, TlsError> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.to_vec()));
        Identity::from_der(self.chain.clone(), key, &self.run_id)
    }
}

/// The agent version a run executes.
#[derive(Debug, Clone, Default)]
pub struct AgentSpec {
    pub name: String,
    pub version: String,
    pub image: String,
    /// The argv; empty means the image's entrypoint (which a bare run has not).
    pub command: Vec<String>,
    pub requested_secret_keys: Vec<String>,
    pub tool: String,
}

/// Everything a runner gets for one attempt.
#[derive(Debug)]
pub struct RunSpec {
    pub task_id: String,
    pub attempt: u32,
    pub lease_epoch: u64,
    /// The task's tenant; empty for a pool task.
    pub tenant: String,
    /// The task's pool; empty for a tenant's task.
    pub pool: String,
    pub agent: AgentSpec,
    /// Given to the agent on stdin.
    pub payload: Bytes,
    /// The credential cascade, passed through untouched for a sandbox-runner
    /// (names and references only, never values).
    pub cascade: Option<bulkhead_proto::sealed::v1::Cascade>,
    /// When the run is killed and reported as timed out.
    pub deadline: Instant,
    pub credentials: RunCredentials,
    /// The worker's own SVID as the run starts (it is renewed meanwhile): a
    /// sandbox-runner serves the worker that presents it.
    pub worker_identity: Identity,
}

/// Runs attempts. Implementations must return when `cancel` fires (reporting
/// [`Outcome::Cancelled`]) or at `spec.deadline` ([`Outcome::TimedOut`]).
#[async_trait::async_trait]
pub trait Runner: Send + Sync + fmt::Debug + 'static {
    /// The sandbox backends this runner offers.
    fn backends(&self) -> Vec<Backend>;

    async fn run(&self, spec: RunSpec, cancel: CancellationToken) -> RunResult;
}

/// Runs the agent's argv as a child process on the worker host: an empty
/// environment but for `PATH`, a fresh working directory, the payload on
/// stdin, stdout and stderr captured (only their tail is kept), its process
/// group killed at the deadline or on cancel.
#[derive(Debug, Clone, Default)]
pub struct BareRunner {
    /// Parent of the runs' working directories; the system temp dir if unset.
    pub work_dir: Option<PathBuf>,
}

impl BareRunner {
    pub fn new(work_dir: Option<PathBuf>) -> Self {
        Self { work_dir }
    }
}

#[async_trait::async_trait]
impl Runner for BareRunner {
    fn backends(&self) -> Vec<Backend> {
        vec![Backend::Process]
    }

    async fn run(&self, spec: RunSpec, cancel: CancellationToken) -> RunResult {
        let RunSpec {
            agent,
            payload,
            deadline,
            credentials,
            ..
        } = spec;
        let result = run_bare(
            self.work_dir.as_deref(),
            &agent.command,
            payload,
            deadline,
            &cancel,
        )
        .await;
        // The run's key is wiped here, as the run ends.
        drop(credentials);
        result
    }
}

async fn run_bare(
    work_root: Option<&std::path::Path>,
    argv: &[String],
    payload: Bytes,
    deadline: Instant,
    cancel: &CancellationToken,
) -> RunResult {
    let Some((program, args)) = argv.split_first() else {
        return RunResult::error("no command");
    };
    let mut dir = tempfile::Builder::new();
    dir.prefix("bulkhead-run-");
    let dir = match work_root {
        Some(root) => dir.tempdir_in(root),
        None => dir.tempdir(),
    };
    let dir = match dir {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot make the run's working directory");
            return RunResult::error("cannot make the run's working directory");
        }
    };
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", BARE_PATH)
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that killing the run kills what it spawned.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(program = %program, error = %e, "cannot start the command");
            return RunResult::error(format!("cannot start {program}: {e}"));
        }
    };
    let pgid = child.id().and_then(|id| i32::try_from(id).ok());

    let stdin = child.stdin.take().map(|mut stdin| {
        tokio::spawn(async move {
            // A child that does not read its stdin closes the pipe: not an error.
            let _ = stdin.write_all(&payload).await;
            let _ = stdin.shutdown().await;
        })
    });
    let tail = Arc::new(Mutex::new(Tail::new(SUMMARY_LIMIT)));
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    .map(|r| tokio::spawn(read_into(r, tail.clone())))
    .collect();

    enum End {
        Exited(std::io::Result<std::process::ExitStatus>),
        Deadline,
        Cancelled,
    }
    let end = tokio::select! {
        status = child.wait() => End::Exited(status),
        () = tokio::time::sleep_until(deadline) => End::Deadline,
        () = cancel.cancelled() => End::Cancelled,
    };
    // Whatever ended the run, nothing it started outlives it.
    if let Some(pgid) = pgid {
        kill_group(pgid);
    }
    if !matches!(end, End::Exited(_)) {
        let _ = child.kill().await;
    }
    if let Some(stdin) = stdin {
        stdin.abort();
    }
    for r in readers {
        let abort = r.abort_handle();
        if tokio::time::timeout(READER_GRACE, r).await.is_err() {
            abort.abort();
        }
    }
    let output_summary = tail.lock().map(|t| t.to_summary()).unwrap_or_default();
    drop(dir);
    let killed = |outcome| RunResult {
        outcome,
        exit_code: -1,
        output_summary: output_summary.clone(),
    };
    match end {
        End::Deadline => killed(Outcome::TimedOut),
        End::Cancelled => killed(Outcome::Cancelled),
        End::Exited(Err(e)) => {
            tracing::warn!(error = %e, "cannot wait for the command");
            RunResult::error("cannot wait for the command")
        }
        End::Exited(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt;
            let (outcome, exit_code) = match status.code() {
                Some(0) => (Outcome::Succeeded, 0),
                Some(code) => (Outcome::Failed, code),
                // Killed by a signal it did not get from us: the shell's convention.
                None => (Outcome::Failed, 128 + status.signal().unwrap_or(0)),
            };
            RunResult {
                outcome,
                exit_code,
                output_summary,
            }
        }
    }
}

fn kill_group(pgid: i32) {
    match killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, error = %e, "cannot kill the run's process group"),
    }
}

async fn read_into(mut r: Box<dyn AsyncRead + Send + Unpin>, tail: Arc<Mutex<Tail>>) {
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut t) = tail.lock() {
                    t.push(&buf[..n]);
                }
            }
        }
    }
}

/// The last `cap` bytes of a stream.
#[derive(Debug)]
pub struct Tail {
    cap: usize,
    buf: VecDeque<u8>,
    truncated: bool,
}

impl Tail {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            buf: VecDeque::with_capacity(cap),
            truncated: false,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        let bytes = if bytes.len() > self.cap {
            self.truncated = true;
            self.buf.clear();
            &bytes[bytes.len() - self.cap..]
        } else {
            bytes
        };
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        if overflow > 0 {
            self.truncated = true;
            self.buf.drain(..overflow);
        }
        self.buf.extend(bytes);
    }

    /// The tail as UTF-8 of at most `cap` bytes: a character cut at the front
    /// is dropped, invalid sequences become U+FFFD.
    pub fn to_summary(&self) -> String {
        let (a, b) = self.buf.as_slices();
        let mut bytes = Vec::with_capacity(self.buf.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        let start = if self.truncated {
            bytes
                .iter()
                .take(3)
                .take_while(|&&b| b & 0xC0 == 0x80)
                .count()
        } else {
            0
        };
        let s = String::from_utf8_lossy(&bytes[start..]).into_owned();
        truncate_tail_to(s, self.cap)
    }
}

fn truncate_tail(s: String) -> String {
    truncate_tail_to(s, SUMMARY_LIMIT)
}

/// Keeps the last `cap` bytes of `s`, cut at a character boundary.
fn truncate_tail_to(s: String, cap: usize) -> String {
    if s.len() <= cap {
        return s;
    }
    let mut start = s.len() - cap;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    async fn bare(a: &[&str], payload: &[u8], timeout: Duration) -> RunResult {
        run_bare(
            None,
            &argv(a),
            Bytes::copy_from_slice(payload),
            Instant::now() + timeout,
            &CancellationToken::new(),
        )
        .await
    }

    const LONG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn the_child_gets_an_empty_environment_but_path() {
        // The worker's own environment has variables (HOME, CARGO_*); the
        // child's has PATH only.
        assert!(std::env::vars().count() > 1);
        let r = bare(&["/usr/bin/env"], b"", LONG).await;
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(r.output_summary, format!("PATH={BARE_PATH}\n"));
        // Programs are found on that PATH.
        let r = bare(&["sh", "-c", "env | sort"], b"", LONG).await;
        let vars: Vec<&str> = r
            .output_summary
            .lines()
            .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
            .collect();
        assert_eq!(vars, [format!("PATH={BARE_PATH}")], "{r:?}");
    }

    #[tokio::test]
    async fn the_payload_is_on_stdin_and_the_dir_is_fresh() {
        let r = bare(&["cat"], b"hello payload", LONG).await;
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert_eq!(r.output_summary, "hello payload");

        let r = bare(&["sh", "-c", "pwd; ls -A | wc -l"], b"", LONG).await;
        let mut lines = r.output_summary.lines();
        let dir = lines.next().expect("pwd");
        assert!(dir.contains("bulkhead-run-"), "{dir}");
        assert_eq!(
            lines.next().map(str::trim),
            Some("0"),
            "the dir starts empty"
        );
        assert!(
            !std::path::Path::new(dir).exists(),
            "the dir is removed after the run"
        );
        let r2 = bare(&["pwd"], b"", LONG).await;
        assert_ne!(r2.output_summary.trim(), dir, "each run gets its own dir");
    }

    #[tokio::test]
    async fn exit_codes_and_spawn_failures() {
        let r = bare(&["true"], b"", LONG).await;
        assert_eq!((r.outcome, r.exit_code), (Outcome::Succeeded, 0));
        let r = bare(&["sh", "-c", "echo oops >&2; exit 3"], b"", LONG).await;
        assert_eq!((r.outcome, r.exit_code), (Outcome::Failed, 3));
        assert_eq!(r.output_summary, "oops\n", "stderr is captured");
        let r = bare(&["sh", "-c", "kill -TERM $$"], b"", LONG).await;
        assert_eq!((r.outcome, r.exit_code), (Outcome::Failed, 128 + 15));
        let r = bare(&["/nonexistent/agent"], b"", LONG).await;
        assert_eq!(r.outcome, Outcome::Error);
        assert!(r.output_summary.contains("cannot start"), "{r:?}");
        let r = bare(&[], b"", LONG).await;
        assert_eq!(r.outcome, Outcome::Error);
        assert_eq!(r.output_summary, "no command");
    }

    #[tokio::test]
    async fn keeps_only_the_last_4_kib() {
        let r = bare(&["seq", "1", "200000"], b"", LONG).await;
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert_eq!(r.output_summary.len(), SUMMARY_LIMIT);
        assert!(r.output_summary.ends_with("199999\n200000\n"));
        // Multi-byte characters cut at the front do not make invalid UTF-8 or
        // replacement characters.
        let r = bare(
            &[
                "sh",
                "-c",
                "i=0; while [ $i -lt 3000 ]; do printf 'é'; i=$((i+1)); done",
            ],
            b"",
            LONG,
        )
        .await;
        assert!(r.output_summary.len() <= SUMMARY_LIMIT);
        assert!(r.output_summary.len() >= SUMMARY_LIMIT - 1);
        assert!(r.output_summary.chars().all(|c| c == 'é'));
    }

    fn alive(pid: i32) -> bool {
        // A zombie (not yet reaped by whoever inherited it) is dead too.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                let state = s.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z') && !state.starts_with('X')
            })
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn kills_the_whole_group_at_the_deadline() {
        let started = Instant::now();
        let r = bare(
            &["sh", "-c", "sleep 30 & echo $!; sleep 30"],
            b"",
            Duration::from_millis(500),
        )
        .await;
        let took = started.elapsed();
        assert_eq!(r.outcome, Outcome::TimedOut, "{r:?}");
        assert_eq!(r.exit_code, -1);
        assert!(took < Duration::from_millis(1500), "killed late: {took:?}");
        let grandchild: i32 = r.output_summary.trim().parse().expect("pid");
        let gone = Instant::now() + Duration::from_secs(2);
        while alive(grandchild) && Instant::now() < gone {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !alive(grandchild),
            "the background sleep was killed with its group"
        );
    }

    #[tokio::test]
    async fn cancel_kills_the_run() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.cancel();
        });
        let started = Instant::now();
        let r = run_bare(
            None,
            &argv(&["sh", "-c", "echo started; sleep 30"]),
            Bytes::new(),
            Instant::now() + LONG,
            &cancel,
        )
        .await;
        assert_eq!(r.outcome, Outcome::Cancelled, "{r:?}");
        assert_eq!(r.output_summary, "started\n");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_child_that_ignores_stdin_still_runs() {
        let big = vec![b'x'; 1024 * 1024];
        let r = bare(&["sh", "-c", "echo ok"], &big, LONG).await;
        assert_eq!(
            (r.outcome, r.output_summary.as_str()),
            (Outcome::Succeeded, "ok\n")
        );
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut t = Tail::new(8);
        t.push(b"abc");
        t.push(b"defgh");
        assert_eq!(t.to_summary(), "abcdefgh");
        t.push(b"ij");
        assert_eq!(t.to_summary(), "cdefghij");
        t.push(b"0123456789");
        assert_eq!(t.to_summary(), "23456789");
        let mut t = Tail::new(4);
        t.push("aé€".as_bytes()); // 1 + 2 + 3 bytes; the last 4 cut into 'é'
        assert_eq!(t.to_summary(), "€");
        assert_eq!(truncate_tail_to("aé€".into(), 4), "€");
        assert_eq!(truncate_tail_to("aé€".into(), 5), "é€");
    }
}
