//! Real backing servers for tests: PostgreSQL, Redis, OpenBao and the moto server.
//!
//! Each server runs from its own temp dir on a random loopback port, writes its stdout and
//! stderr to a log file in that dir, and is stopped when its handle drops — by the PID this
//! module started, never anything else. A missing program skips the test loudly, unless
//! `BULKHEAD_REQUIRE_EXTERNAL=1` (set in CI), where it is an error:
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use bulkhead_testkit::external::Postgres;
//! let Some(pg) = Postgres::start().await? else { return Ok(()) };
//! let url = pg.create_database("claims").await?;
//! # Ok(()) }
//! ```

mod moto;
mod openbao;
mod postgres;
mod redis;

pub use moto::Moto;
pub use openbao::OpenBao;
pub use postgres::Postgres;
pub use redis::{Redis, RespReply, resp_command};

use std::collections::BTreeSet;
use std::fmt;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The environment variable that turns a missing server from a skip into a failure.
pub const REQUIRE_EXTERNAL_ENV: &str = "BULKHEAD_REQUIRE_EXTERNAL";

/// How long a server may take to answer its readiness probe. Python servers on a busy 2-core
/// machine take a few seconds; anything near this is a hang, not a slow start.
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);
/// One readiness probe may not block the loop longer than this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How long a server gets to exit after its stop signal before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
const LOG_TAIL_LINES: usize = 40;

/// Whether a missing backing server must fail the test instead of skipping it
/// (`BULKHEAD_REQUIRE_EXTERNAL=1`, set in CI).
pub fn require_external() -> bool {
    std::env::var(REQUIRE_EXTERNAL_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// A program a backing server needs is not installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// What was looked for, e.g. `redis-server`.
    pub program: String,
    /// How to get it, e.g. `install Debian redis-server`.
    pub install_hint: String,
}

impl Missing {
    pub fn new(program: impl Into<String>, install_hint: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            install_hint: install_hint.into(),
        }
    }

    /// Applies the policy of [`require_external`]: see [`Missing::skip_with`].
    pub fn skip<T>(self) -> anyhow::Result<Option<T>> {
        self.skip_with(require_external())
    }

    /// Returns `Ok(None)` after printing a `SKIP:` line naming the test, or an error when
    /// `require` is set.
    pub fn skip_with<T>(self, require: bool) -> anyhow::Result<Option<T>> {
        let test = current_test_name();
        if require {
            return Err(anyhow!(
                "{test}: {self}, and {REQUIRE_EXTERNAL_ENV}=1 requires every backing server"
            ));
        }
        // Written to the stderr handle rather than with eprintln!, which the test harness
        // captures and hides for passing tests: a skip must be seen.
        let _ = writeln!(std::io::stderr(), "SKIP: {test}: {self} — skipping");
        Ok(None)
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} not found ({})", self.program, self.install_hint)
    }
}

impl std::error::Error for Missing {}

/// Finds `program` on `PATH`.
pub fn find_program(program: &str, install_hint: &str) -> Result<PathBuf, Missing> {
    which::which(program).map_err(|_| Missing::new(program, install_hint))
}

/// Finds `program` on `PATH`, or applies the missing-server policy: `Ok(None)` after a
/// `SKIP:` line, or an error under `BULKHEAD_REQUIRE_EXTERNAL=1`.
pub fn program_or_skip(program: &str, install_hint: &str) -> anyhow::Result<Option<PathBuf>> {
    match find_program(program, install_hint) {
        Ok(path) => Ok(Some(path)),
        Err(missing) => missing.skip(),
    }
}

/// The running test's name: the test harness names each test's thread after it.
fn current_test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_owned()
}

/// Ports this process has already handed out. Two servers started at once could otherwise be
/// given the same just-released port, and the loser's probe might reach the winner.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port that was free a moment ago and that this process has not handed out
/// before. Another process may still take it before the server binds it; the start
/// functions retry once on another port when that happens.
pub fn free_port() -> anyhow::Result<u16> {
    free_port_where(|_| true)
}

fn free_port_where(also: impl Fn(u16) -> bool) -> anyhow::Result<u16> {
    for _ in 0..64 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .context("failed to bind a loopback port")?
            .port();
        let mut handed_out = HANDED_OUT
            .lock()
            .map_err(|_| anyhow!("port registry poisoned"))?;
        if !handed_out.contains(&port) && also(port) {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    Err(anyhow!("no free loopback port found"))
}

/// Whether `port` on loopback can be bound right now.
fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Whether process `pid` holds the socket listening on TCP `port`, read from `/proc`: tells our
/// server from another process that answers on the same port.
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // Columns: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
    let inodes: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit(':').next()?;
            let listening = *fields.get(3)? == "0A";
            (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| fields.get(9).copied())
                .flatten()
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| {
            inodes
                .iter()
                .any(|inode| target.as_os_str() == format!("socket:[{inode}]").as_str())
        })
}

/// A temp dir for one server, removed when dropped.
fn server_dir(server: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("bulkhead-{server}-"))
        .tempdir()
        .with_context(|| format!("failed to create a temp dir for {server}"))
}

/// The last `lines` lines of a log file, for error messages.
fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(log {} unreadable: {e})", path.display()),
    }
}

/// `message`, followed by the tail of the server's log.
fn with_log_tail(message: impl fmt::Display, log: &Path) -> anyhow::Error {
    anyhow!(
        "{message}\n--- last {LOG_TAIL_LINES} lines of {} ---\n{}\n--- end of log ---",
        log.display(),
        log_tail(log, LOG_TAIL_LINES)
    )
}

/// A server process this module spawned. Dropping it stops the process and reaps it.
#[derive(Debug)]
struct Process {
    server: &'static str,
    child: Child,
    stop_signal: Signal,
    reaped: bool,
}

impl Process {
    fn spawn(
        server: &'static str,
        mut command: Command,
        log: &Path,
        stop_signal: Signal,
    ) -> anyhow::Result<Self> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("failed to open log {}", log.display()))?;
        let err = out.try_clone().context("failed to clone the log handle")?;
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = command
            .spawn()
            .with_context(|| format!("failed to spawn {server}: {command:?}"))?;
        tracing::debug!(server, pid = child.id(), log = %log.display(), "spawned backing server");
        Ok(Self {
            server,
            child,
            stop_signal,
            reaped: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has exited (and is now reaped).
    fn try_exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.reaped {
            return Ok(None);
        }
        let status = self
            .child
            .try_wait()
            .with_context(|| format!("failed to poll {}", self.server))?;
        self.reaped = status.is_some();
        Ok(status)
    }

    /// Sends the stop signal unless the process is already reaped. Until we reap it, the PID
    /// stays ours (an exited child is a zombie that holds its PID), so this signal cannot reach
    /// another process.
    fn send_stop_signal(&mut self) -> anyhow::Result<bool> {
        if self.try_exited()?.is_some() || self.reaped {
            return Ok(false);
        }
        let pid = Pid::from_raw(i32::try_from(self.pid()).context("pid out of range")?);
        kill(pid, self.stop_signal)
            .with_context(|| format!("failed to signal {} (pid {pid})", self.server))?;
        Ok(true)
    }

    fn kill_and_reap(&mut self) -> anyhow::Result<()> {
        if self.reaped {
            return Ok(());
        }
        // Child::kill does nothing once the child is reaped, so it is as safe as the above.
        self.child
            .kill()
            .with_context(|| format!("failed to kill {}", self.server))?;
        self.child
            .wait()
            .with_context(|| format!("failed to reap {}", self.server))?;
        self.reaped = true;
        Ok(())
    }

    /// Stops the process: its stop signal, a grace period, then SIGKILL.
    async fn stop(&mut self) -> anyhow::Result<()> {
        if self.send_stop_signal()? {
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if self.try_exited()?.is_some() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tracing::warn!(
                server = self.server,
                "backing server ignored its stop signal, killing it"
            );
        }
        self.kill_and_reap()
    }

    /// [`Process::stop`] for `Drop`, which cannot await.
    fn stop_blocking(&mut self) -> anyhow::Result<()> {
        if self.send_stop_signal()? {
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if self.try_exited()?.is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            tracing::warn!(
                server = self.server,
                "backing server ignored its stop signal, killing it"
            );
        }
        self.kill_and_reap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(error) = self.stop_blocking() {
            tracing::warn!(server = self.server, error = %error, "failed to stop backing server");
        }
    }
}

/// What one readiness probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Nothing answers yet, or it is still starting.
    NotReady,
    /// Our server answers.
    Ready,
    /// Something else answers on the port: another process took it first.
    Foreign,
}

/// How to run one backing server.
#[derive(Debug)]
struct ServerSpec<'a> {
    server: &'static str,
    log: &'a Path,
    stop_signal: Signal,
}

#[derive(Debug)]
enum LaunchError {
    /// The server exited before it was ready: most often, its port was taken.
    Exited(ExitStatus),
    /// Another process answers on the port.
    PortTaken,
    Timeout,
    Other(anyhow::Error),
}

impl LaunchError {
    fn retryable(&self) -> bool {
        matches!(self, Self::Exited(_) | Self::PortTaken)
    }

    fn into_error(self, spec: &ServerSpec<'_>, port: u16) -> anyhow::Error {
        let what = match self {
            Self::Exited(status) => format!("exited with {status}"),
            Self::PortTaken => "another process answers on its port".to_owned(),
            Self::Timeout => format!("did not answer within {STARTUP_DEADLINE:?}"),
            Self::Other(error) => format!("{error:#}"),
        };
        with_log_tail(
            format!(
                "{} failed to start on 127.0.0.1:{port}: {what}",
                spec.server
            ),
            spec.log,
        )
    }
}

/// Starts a server on a fresh port, retrying once on another port if the first one was taken.
async fn launch<C, P, F>(
    spec: &ServerSpec<'_>,
    mut pick_port: impl FnMut() -> anyhow::Result<u16>,
    mut command: C,
    mut probe: P,
) -> anyhow::Result<(Process, u16)>
where
    C: FnMut(u16) -> Command,
    P: FnMut(u16, u32) -> F,
    F: Future<Output = Probe>,
{
    let mut attempt = 1;
    loop {
        let port = pick_port()?;
        match launch_on(spec, command(port), |pid| probe(port, pid)).await {
            Ok(process) => return Ok((process, port)),
            Err(error) if attempt == 1 && error.retryable() => {
                tracing::warn!(
                    server = spec.server,
                    port,
                    ?error,
                    "backing server lost its port, retrying on another"
                );
                attempt += 1;
            }
            Err(error) => return Err(error.into_error(spec, port)),
        }
    }
}

/// Spawns `command` and waits until `probe` finds it ready. On failure the process is stopped
/// before the error is returned, so the log it left is complete.
async fn launch_on<P, F>(
    spec: &ServerSpec<'_>,
    command: Command,
    mut probe: P,
) -> Result<Process, LaunchError>
where
    P: FnMut(u32) -> F,
    F: Future<Output = Probe>,
{
    let mut process = Process::spawn(spec.server, command, spec.log, spec.stop_signal)
        .map_err(LaunchError::Other)?;
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        if let Some(status) = process.try_exited().map_err(LaunchError::Other)? {
            return Err(LaunchError::Exited(status));
        }
        match tokio::time::timeout(PROBE_TIMEOUT, probe(process.pid())).await {
            Ok(Probe::Ready) => {
                tracing::info!(
                    server = spec.server,
                    pid = process.pid(),
                    "backing server ready"
                );
                return Ok(process);
            }
            Ok(Probe::Foreign) => return Err(LaunchError::PortTaken),
            Ok(Probe::NotReady) | Err(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::Timeout);
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// An HTTP client for probes and tests: never through a proxy, whatever the environment says.
pub fn loopback_http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .context("failed to build an http client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fails_when_required() {
        // The skip path prints a SKIP line; tests/backing.rs checks it in a child process.
        let missing = Missing::new("bulkhead-no-such-program", "install nothing");
        let error = missing
            .skip_with::<()>(true)
            .expect_err("required server must fail");
        let message = error.to_string();
        assert!(message.contains("bulkhead-no-such-program not found (install nothing)"));
        assert!(message.contains(REQUIRE_EXTERNAL_ENV));
    }

    #[test]
    fn free_ports_are_not_handed_out_twice() {
        let ports: BTreeSet<u16> = (0..20).map(|_| free_port().expect("a free port")).collect();
        assert_eq!(ports.len(), 20);
    }

    #[test]
    fn listens_on_finds_our_own_listener() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        assert!(listens_on(std::process::id(), port));
        drop(listener);
        assert!(!listens_on(std::process::id(), port));
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("x.log");
        let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).expect("write log");
        let tail = log_tail(&log, 3);
        assert_eq!(tail, "line 98\nline 99\nline 100");
    }
}
