//! Redis from Debian's `redis-server`, without persistence.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, anyhow, bail};
use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use super::{
    LaunchError, Probe, Process, ServerSpec, find_program, free_port, launch, launch_on, server_dir,
};

/// A Redis server of its own on 127.0.0.1, with no persistence. It can be stopped and
/// restarted on the same port, to test how clients live through losing it. Stopped when
/// dropped.
#[derive(Debug)]
pub struct Redis {
    // Declared before `dir` so the server stops before its dir is removed.
    process: Option<Process>,
    port: u16,
    program: PathBuf,
    dir: TempDir,
}

impl Redis {
    /// Starts a server, or returns `Ok(None)` after a `SKIP:` line when `redis-server` is not
    /// installed (an error under `BULKHEAD_REQUIRE_EXTERNAL=1`).
    pub async fn start() -> anyhow::Result<Option<Self>> {
        let program = match find_program("redis-server", "install Debian redis-server") {
            Ok(program) => program,
            Err(missing) => return missing.skip(),
        };
        let dir = server_dir("redis")?;
        let log = dir.path().join("redis.log");
        let (process, port) = launch(
            &spec(&log),
            free_port,
            |port| redis_command(&program, dir.path(), port),
            probe,
        )
        .await?;
        Ok(Some(Self {
            process: Some(process),
            port,
            program,
            dir,
        }))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Whether the server is running (it is, unless [`Redis::stop`] stopped it).
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Stops the server (SIGTERM, then SIGKILL after a grace period). Its port then refuses
    /// connections until [`Redis::restart`]. Stopping a stopped server does nothing.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut process) = self.process.take() {
            process.stop().await?;
        }
        Ok(())
    }

    /// Starts the server again on the same port (stopping it first if it runs), empty: it
    /// keeps no data across restarts.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        let log = self.log_path();
        let spec = spec(&log);
        let port = self.port;
        let process = launch_on(
            &spec,
            redis_command(&self.program, self.dir.path(), port),
            |pid| probe(port, pid),
        )
        .await
        .map_err(|error: LaunchError| error.into_error(&spec, port))?;
        self.process = Some(process);
        Ok(())
    }

    /// Sends one command over a fresh connection and returns the reply.
    pub async fn command(&self, args: &[&str]) -> anyhow::Result<RespReply> {
        resp_command(self.addr(), args).await
    }

    /// The server's log (stdout and stderr of `redis-server`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }
}

fn spec(log: &Path) -> ServerSpec<'_> {
    ServerSpec {
        server: "redis",
        log,
        stop_signal: Signal::SIGTERM,
    }
}

fn redis_command(program: &Path, dir: &Path, port: u16) -> Command {
    let mut command = Command::new(program);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        // No RDB snapshots and no AOF: nothing survives a stop, and nothing touches the disk.
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--daemonize", "no", "--logfile", ""])
        .current_dir(dir);
    command
}

/// Ready once `PING` answers `+PONG` and `INFO server` reports the PID we started: a server
/// with another PID took our port first.
async fn probe(port: u16, pid: u32) -> Probe {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match resp_command(addr, &["PING"]).await {
        Ok(RespReply::Simple(pong)) if pong == "PONG" => {}
        _ => return Probe::NotReady,
    }
    match resp_command(addr, &["INFO", "server"]).await {
        Ok(RespReply::Bulk(info)) => {
            let ours = format!("process_id:{pid}");
            if String::from_utf8_lossy(&info)
                .lines()
                .any(|line| line.trim_end() == ours)
            {
                Probe::Ready
            } else {
                Probe::Foreign
            }
        }
        _ => Probe::NotReady,
    }
}

/// A RESP2 reply, as far as the tests need one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespReply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:1`
    Integer(i64),
    /// `$3\r\nabc`
    Bulk(Vec<u8>),
    /// `$-1`: no such key.
    Nil,
}

/// Sends one command to a Redis server over a fresh connection and reads the reply (arrays are
/// not supported).
pub async fn resp_command(addr: SocketAddr, args: &[&str]) -> anyhow::Result<RespReply> {
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("failed to connect to redis at {addr}"))?;
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(&request)
        .await
        .context("failed to send a redis command")?;

    let mut line = String::new();
    stream
        .read_line(&mut line)
        .await
        .context("failed to read a redis reply")?;
    let Some(header) = line.strip_suffix("\r\n") else {
        bail!("redis reply ended early: {line:?}");
    };
    let (kind, rest) = header.split_at_checked(1).unwrap_or(("", ""));
    match kind {
        "+" => Ok(RespReply::Simple(rest.to_owned())),
        "-" => Ok(RespReply::Error(rest.to_owned())),
        ":" => Ok(RespReply::Integer(
            rest.parse().context("bad redis integer reply")?,
        )),
        "$" => {
            let len: i64 = rest.parse().context("bad redis bulk length")?;
            let Ok(len) = usize::try_from(len) else {
                return Ok(RespReply::Nil);
            };
            let mut body = vec![0; len + 2];
            stream
                .read_exact(&mut body)
                .await
                .context("failed to read a redis bulk reply")?;
            body.truncate(len);
            Ok(RespReply::Bulk(body))
        }
        _ => Err(anyhow!("unsupported redis reply: {header:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn launch_retries_once_on_a_taken_port() -> anyhow::Result<()> {
        let Some(first) = Redis::start().await? else {
            return Ok(());
        };
        let program = find_program("redis-server", "install Debian redis-server")?;
        let dir = server_dir("redis")?;
        let log = dir.path().join("redis.log");
        let taken = first.port();
        let mut ports = [taken, free_port()?].into_iter();
        let (process, port) = launch(
            &spec(&log),
            || ports.next().context("asked for a third port"),
            |port| redis_command(&program, dir.path(), port),
            probe,
        )
        .await?;
        assert_ne!(port, taken);
        assert_ne!(
            process.pid(),
            first.process.as_ref().map_or(0, Process::pid)
        );
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        assert_eq!(
            resp_command(addr, &["PING"]).await?,
            RespReply::Simple("PONG".into())
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_start_reports_the_log_tail() -> anyhow::Result<()> {
        let Ok(program) = find_program("redis-server", "install Debian redis-server") else {
            return Ok(());
        };
        let dir = server_dir("redis")?;
        let log = dir.path().join("redis.log");
        let error = launch(
            &spec(&log),
            free_port,
            |port| {
                let mut command = redis_command(&program, dir.path(), port);
                command.args(["--no-such-directive", "x"]);
                command
            },
            probe,
        )
        .await
        .expect_err("redis-server must refuse an unknown directive");
        let message = format!("{error:#}");
        assert!(message.contains("redis failed to start"), "{message}");
        assert!(message.contains("exited with"), "{message}");
        assert!(message.contains("last 40 lines of"), "{message}");
        assert!(message.contains("no-such-directive"), "{message}");
        Ok(())
    }
}
