//! PostgreSQL from Debian's `postgresql` binaries.

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, anyhow, bail};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid, User, chown, geteuid};
use tempfile::TempDir;

use super::{Missing, Probe, Process, ServerSpec, free_port, launch, with_log_tail};

const SUPERUSER: &str = "postgres";
const INSTALL_HINT: &str = "install Debian postgresql";
/// The programs this module runs, all taken from one bin dir so their versions match.
const PROGRAMS: [&str; 4] = ["initdb", "postgres", "psql", "pg_isready"];

/// A PostgreSQL server of its own: a fresh cluster in a temp dir, listening on 127.0.0.1 only,
/// with trust authentication for the `postgres` superuser. Stopped when dropped.
#[derive(Debug)]
pub struct Postgres {
    // Declared before `dir` so the server stops before its data dir is removed.
    process: Process,
    port: u16,
    bin: PathBuf,
    dir: TempDir,
}

/// The unprivileged user that runs initdb and postgres when we are root: initdb refuses root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: Uid,
    gid: Gid,
}

impl Postgres {
    /// Starts a server, or returns `Ok(None)` after a `SKIP:` line when PostgreSQL is not
    /// installed (an error under `BULKHEAD_REQUIRE_EXTERNAL=1`).
    pub async fn start() -> anyhow::Result<Option<Self>> {
        let Some(bin) = find_bin_dir() else {
            return Missing::new("postgres (initdb)", INSTALL_HINT).skip();
        };
        let run_as = if geteuid().is_root() {
            match User::from_name(SUPERUSER).context("failed to look up the postgres user")? {
                Some(user) => Some(RunAs {
                    uid: user.uid,
                    gid: user.gid,
                }),
                None => {
                    return Missing::new(
                        "the unprivileged postgres user (initdb refuses root)",
                        INSTALL_HINT,
                    )
                    .skip();
                }
            }
        } else {
            None
        };

        let dir = make_dirs(run_as)?;
        initdb(&bin, dir.path(), run_as).await?;

        let log = dir.path().join("postgres.log");
        let spec = ServerSpec {
            server: "postgres",
            log: &log,
            // Immediate shutdown: a test cluster has nothing worth a checkpoint, and a smart
            // shutdown would wait for every client to disconnect.
            stop_signal: Signal::SIGQUIT,
        };
        let data = dir.path().join("data");
        let (process, port) = launch(
            &spec,
            free_port,
            |port| postgres_command(&bin, dir.path(), run_as, port),
            |port, _pid| probe(bin.clone(), port, data.clone()),
        )
        .await?;
        Ok(Some(Self {
            process,
            port,
            bin,
            dir,
        }))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of the `postgres` database, as superuser.
    pub fn url(&self) -> String {
        self.database_url(SUPERUSER)
    }

    /// The URL of `database` on this server, as superuser.
    pub fn database_url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates an empty database and returns its URL. Names are lowercase identifiers
    /// (`[a-z_][a-z0-9_]*`, at most 63 bytes) so they need no quoting in SQL or URLs.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        validate_database_name(name)?;
        self.psql(SUPERUSER, &format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("failed to create database {name}"))?;
        Ok(self.database_url(name))
    }

    /// Runs `sql` with `psql` against `database` and returns its unaligned, tuples-only
    /// output without the trailing newline (`SELECT 1` gives `"1"`).
    pub async fn psql(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        psql(&self.bin, self.port, database, sql).await
    }

    /// The server's log (stdout and stderr of `postgres`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The postmaster's PID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// The bin dir of a PostgreSQL install: where `initdb` on `PATH` really lives (Debian keeps
/// the binaries off `PATH` and `/usr/bin/psql` is a wrapper script), else the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Option<PathBuf> {
    let on_path = which::which("initdb")
        .ok()
        .and_then(|initdb| initdb.canonicalize().ok())
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf));
    on_path
        .into_iter()
        .chain(debian_bin_dirs())
        .find(|dir| PROGRAMS.iter().all(|program| dir.join(program).is_file()))
}

fn debian_bin_dirs() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") else {
        return Vec::new();
    };
    let mut versions: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// The temp dir: `data/` (the cluster) and `socket/` (the unix socket), both owned by the
/// server's user; the log stays ours and reaches the server as an inherited file handle.
fn make_dirs(run_as: Option<RunAs>) -> anyhow::Result<TempDir> {
    // As root, TMPDIR may point under /root, which the postgres user cannot traverse.
    let base = if run_as.is_some() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-postgres-")
        .tempdir_in(&base)
        .with_context(|| format!("failed to create a temp dir in {}", base.display()))?;
    std::fs::set_permissions(dir.path(), Permissions::from_mode(0o755))
        .context("failed to open the temp dir to the postgres user")?;
    for sub in ["data", "socket"] {
        let path = dir.path().join(sub);
        std::fs::create_dir(&path)
            .with_context(|| format!("failed to create {}", path.display()))?;
        // initdb insists on 0700 (or 0750) for the data dir.
        std::fs::set_permissions(&path, Permissions::from_mode(0o700))
            .with_context(|| format!("failed to chmod {}", path.display()))?;
        if let Some(RunAs { uid, gid }) = run_as {
            chown(&path, Some(uid), Some(gid))
                .with_context(|| format!("failed to chown {} to postgres", path.display()))?;
        }
    }
    Ok(dir)
}

async fn initdb(bin: &Path, dir: &Path, run_as: Option<RunAs>) -> anyhow::Result<()> {
    let log = dir.join("initdb.log");
    let out = std::fs::File::create(&log)
        .with_context(|| format!("failed to create {}", log.display()))?;
    let err = out.try_clone().context("failed to clone the log handle")?;
    let mut command = tokio::process::Command::new(bin.join("initdb"));
    command
        .arg("--pgdata")
        .arg(dir.join("data"))
        .args(["--username", SUPERUSER, "--auth", "trust"])
        .args(["--encoding", "UTF8", "--no-locale", "--no-sync"])
        // The postgres user may not be able to enter our working directory.
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if let Some(RunAs { uid, gid }) = run_as {
        // Not `runuser`: it stays as a parent of the server, so the PID we hold would not be
        // the postmaster's and our stop signal would be translated. Setting the ids in the
        // child keeps one process, the one we started.
        command.uid(uid.as_raw()).gid(gid.as_raw());
    }
    let status = command
        .status()
        .await
        .with_context(|| format!("failed to run {}", bin.join("initdb").display()))?;
    if !status.success() {
        return Err(with_log_tail(format!("initdb failed with {status}"), &log));
    }
    Ok(())
}

fn postgres_command(bin: &Path, dir: &Path, run_as: Option<RunAs>, port: u16) -> Command {
    let settings = [
        "listen_addresses=127.0.0.1".to_owned(),
        format!("port={port}"),
        format!("unix_socket_directories={}", dir.join("socket").display()),
        // Durability buys a throwaway cluster nothing and costs the tests time.
        "fsync=off".to_owned(),
        "synchronous_commit=off".to_owned(),
        "full_page_writes=off".to_owned(),
        // Dispatcher tests run several replicas, each with its own pool.
        "max_connections=200".to_owned(),
    ];
    let mut command = Command::new(bin.join("postgres"));
    command.arg("-D").arg(dir.join("data"));
    for setting in settings {
        command.arg("-c").arg(setting);
    }
    command.current_dir(dir);
    if let Some(RunAs { uid, gid }) = run_as {
        command.uid(uid.as_raw()).gid(gid.as_raw());
    }
    command
}

/// Ready once it accepts connections and reports our data dir: a server that answers with
/// another data dir took our port first.
async fn probe(bin: PathBuf, port: u16, data: PathBuf) -> Probe {
    let ready = tokio::process::Command::new(bin.join("pg_isready"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
        .args(["-d", SUPERUSER, "-t", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success());
    if !ready {
        return Probe::NotReady;
    }
    match psql(&bin, port, SUPERUSER, "SHOW data_directory").await {
        Ok(found) if Path::new(&found) == data => Probe::Ready,
        Ok(_) => Probe::Foreign,
        Err(_) => Probe::NotReady,
    }
}

async fn psql(bin: &Path, port: u16, database: &str, sql: &str) -> anyhow::Result<String> {
    let output = tokio::process::Command::new(bin.join("psql"))
        // No ~/.psqlrc, quiet, unaligned tuples only, stop at the first error.
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
        .args(["-d", database, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("failed to run {}", bin.join("psql").display()))?;
    if !output.status.success() {
        bail!(
            "psql failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8(output.stdout).context("psql printed invalid utf-8")?;
    Ok(stdout.trim_end_matches('\n').to_owned())
}

fn validate_database_name(name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(anyhow!(
            "database name {name:?} is not a lowercase identifier of at most 63 bytes"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_plain_identifiers() {
        for ok in ["a", "_x", "claims_2", &"a".repeat(63)] {
            assert!(validate_database_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1a", "A", "a-b", "a;drop", "a\"b", &"a".repeat(64)] {
            assert!(validate_database_name(bad).is_err(), "{bad}");
        }
    }
}
