//! `bulkhead profile` and `bulkhead secret`: the real binary against a real
//! mesh. A profile is created with settings and a tool ACL; a canary value goes
//! in through stdin and through a private file (a loose file is refused), and
//! comes out through `secret reveal` alone: no other command's output, no
//! command line, no service log, no audit record and no data file holds it.
//! Revocation, lifting and deletion are checked through the listings.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use bulkhead_testkit::mesh::TestMesh;
use tokio::io::AsyncWriteExt as _;

const DEADLINE: Duration = Duration::from_secs(60);

macro_rules! args {
    ($($a:expr),* $(,)?) => { [$(OsString::from($a)),*] };
}

fn command(args: &[OsString]) -> anyhow::Result<tokio::process::Command> {
    let exe = bulkhead_cluster::find_executable("bulkhead", None)?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(args)
        .env_remove("BULKHEAD_DIR")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

async fn bulkhead(args: &[OsString]) -> anyhow::Result<Output> {
    Ok(tokio::time::timeout(DEADLINE, command(args)?.output()).await??)
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A canary nobody else would write: the test's pid and the time.
fn canary() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("sk-canary-{}-{nanos:x}", std::process::id())
}

/// The canary and its common encodings.
fn forms(canary: &str) -> Vec<String> {
    vec![
        canary.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(canary),
        hex::encode(canary),
    ]
}

/// Runs the CLI against one mesh and keeps every output (but reveal's
/// stdout), to show at the end that none holds the canary.
struct Cli<'a> {
    mesh: &'a TestMesh,
    seen: Vec<(String, Vec<u8>)>,
}

impl<'a> Cli<'a> {
    fn new(mesh: &'a TestMesh) -> Self {
        Self {
            mesh,
            seen: Vec::new(),
        }
    }

    fn dir(&self) -> OsString {
        self.mesh.dir().as_os_str().to_owned()
    }

    fn keep(&mut self, args: &[OsString], out: &Output, stdout_too: bool) {
        let what = format!("bulkhead {args:?}");
        if stdout_too {
            self.seen
                .push((format!("{what} stdout"), out.stdout.clone()));
        }
        self.seen
            .push((format!("{what} stderr"), out.stderr.clone()));
    }

    /// `bulkhead VERB... --dir DIR REST...`, requiring success; its stdout.
    async fn ok(&mut self, args: &[OsString]) -> anyhow::Result<String> {
        let out = bulkhead(args).await?;
        self.keep(args, &out, true);
        anyhow::ensure!(
            out.status.success(),
            "bulkhead {args:?} failed\n{}\n{}",
            text(&out),
            self.mesh.logs()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Requires failure; the stderr.
    async fn fails(&mut self, args: &[OsString]) -> anyhow::Result<String> {
        let out = bulkhead(args).await?;
        self.keep(args, &out, true);
        anyhow::ensure!(
            !out.status.success(),
            "bulkhead {args:?} succeeded\n{}",
            text(&out)
        );
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Runs with `input` piped into stdin. Before writing it, checks that the
    /// process's command line and environment do not hold `canary`.
    async fn piped(
        &mut self,
        args: &[OsString],
        input: &[u8],
        canary: &str,
    ) -> anyhow::Result<Output> {
        let mut child = command(args)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let pid = child.id().context("the child has no pid")?;
        for file in ["cmdline", "environ"] {
            let bytes = std::fs::read(format!("/proc/{pid}/{file}"))
                .with_context(|| format!("failed to read /proc/{pid}/{file}"))?;
            anyhow::ensure!(
                !contains(&bytes, canary.as_bytes()),
                "the canary is in the process's {file}"
            );
        }
        let mut stdin = child.stdin.take().context("no stdin")?;
        stdin.write_all(input).await?;
        drop(stdin);
        let out = tokio::time::timeout(DEADLINE, child.wait_with_output()).await??;
        self.keep(args, &out, true);
        Ok(out)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The value of `  label: value` in an output.
fn field<'a>(out: &'a str, label: &str) -> anyhow::Result<&'a str> {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .map(str::trim)
        .with_context(|| format!("no {label:?} in\n{out}"))
}

/// The row of the secrets table naming `key`.
fn secret_row<'a>(profile: &'a str, key: &str) -> Option<&'a str> {
    profile
        .lines()
        .find(|l| l.split_whitespace().next() == Some(key))
}

/// Every file under `dir`, recursively.
fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_manage_profiles_and_secrets_without_leaking_values() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut cli = Cli::new(&mesh);
    let dir = cli.dir();
    let canary = canary();
    const KEY: &str = "ANTHROPIC_API_KEY";

    // A profile with a setting and a tool ACL.
    let out = cli
        .ok(&args![
            "profile",
            "create",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "default",
            "--description",
            "acme's defaults",
            "--owner",
            "platform@acme.test",
            "--tag",
            "prod",
            "--agent",
            "coder",
            "--env",
            "DEBUG=1",
            "--tool",
            format!("web-search={KEY}"),
            "--tool",
            "shell=",
        ])
        .await?;
    assert!(out.contains("created profile acme/default"), "{out}");
    assert!(out.contains("DEBUG=1"), "{out}");
    assert!(out.contains(&format!("web-search -> {KEY}")), "{out}");
    assert!(out.contains("shell -> (no keys)"), "{out}");
    assert!(out.contains("secrets: none"), "{out}");

    // Nothing piped in, or only a newline: refused, nothing written.
    let err = cli
        .fails(&args![
            "secret",
            "put",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "--profile",
            "default",
            KEY
        ])
        .await?;
    assert!(err.contains("stdin holds no value"), "{err}");
    let out = cli
        .piped(
            &args![
                "secret",
                "put",
                "--dir",
                &dir,
                "--tenant",
                "acme",
                "--profile",
                "default",
                KEY
            ],
            b"\n",
            &canary,
        )
        .await?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no value"),
        "{}",
        text(&out)
    );

    // The canary through stdin, newline dropped.
    let out = cli
        .piped(
            &args![
                "secret",
                "put",
                "--dir",
                &dir,
                "--tenant",
                "acme",
                "--profile",
                "default",
                KEY
            ],
            format!("{canary}\n").as_bytes(),
            &canary,
        )
        .await?;
    anyhow::ensure!(out.status.success(), "{}\n{}", text(&out), mesh.logs());
    let put = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        put.contains(&format!("wrote secret {KEY} to acme/default")),
        "{put}"
    );
    assert_eq!(field(&put, "key:")?, KEY);
    assert_eq!(field(&put, "version:")?, "1");
    assert_eq!(field(&put, "backend:")?, "builtin");
    let fingerprint = field(&put, "fingerprint:")?.to_owned();
    assert!(
        fingerprint.len() == 64 && fingerprint.bytes().all(|b| b.is_ascii_hexdigit()),
        "{put}"
    );

    // Get shows the key's metadata and the settings, never the value.
    let get = cli
        .ok(&args![
            "profile", "get", "--dir", &dir, "--tenant", "acme", "default"
        ])
        .await?;
    let row = secret_row(&get, KEY).with_context(|| format!("no {KEY} row\n{get}"))?;
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols[1..5],
        ["builtin", "1", &fingerprint, "active"],
        "{get}"
    );
    assert!(get.contains("DEBUG=1"), "{get}");
    assert!(get.contains("platform@acme.test"), "{get}");
    assert!(get.contains("agents:       coder"), "{get}");

    // Listed by tenant and by tag; not under another tag.
    let list = cli
        .ok(&args!["profile", "list", "--dir", &dir, "--tenant", "acme"])
        .await?;
    let line = list
        .lines()
        .find(|l| l.starts_with("acme "))
        .with_context(|| format!("acme missing\n{list}"))?;
    assert!(
        line.contains(" default ") && line.contains("prod"),
        "{list}"
    );
    let list = cli
        .ok(&args!["profile", "list", "--dir", &dir, "--tag", "prod"])
        .await?;
    assert!(list.contains("default"), "{list}");
    let list = cli
        .ok(&args!["profile", "list", "--dir", &dir, "--tag", "staging"])
        .await?;
    assert_eq!(list.trim(), "no profiles");

    // Update changes what it names and keeps the rest; a stale revision is
    // refused without changing anything.
    let revision: u64 = get
        .lines()
        .next()
        .and_then(|l| l.split("(revision ").nth(1))
        .and_then(|r| r.split(',').next())
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("no revision in\n{get}"))?;
    let out = cli
        .ok(&args![
            "profile",
            "update",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "default",
            "--owner",
            "secops@acme.test",
            "--expected-revision",
            revision.to_string(),
        ])
        .await?;
    assert!(out.contains("owner:        secops@acme.test"), "{out}");
    assert!(out.contains("DEBUG=1"), "the env was kept\n{out}");
    assert!(
        out.contains(&format!("web-search -> {KEY}")),
        "the tool ACL was kept\n{out}"
    );
    let err = cli
        .fails(&args![
            "profile",
            "update",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "default",
            "--owner",
            "mallory",
            "--expected-revision",
            revision.to_string(),
        ])
        .await?;
    assert!(err.contains("nothing was changed"), "{err}");

    // Reveal: exactly the canary on stdout, an audit warning on stderr.
    let reveal_args = args![
        "secret",
        "reveal",
        "--dir",
        &dir,
        "--tenant",
        "acme",
        "--profile",
        "default",
        KEY,
        "--reason",
        "debugging a 401 from the provider",
    ];
    let out = bulkhead(&reveal_args).await?;
    anyhow::ensure!(out.status.success(), "{}\n{}", text(&out), mesh.logs());
    cli.keep(&reveal_args, &out, false);
    assert_eq!(
        out.stdout,
        canary.as_bytes(),
        "reveal printed more than the value"
    );
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(warning.contains("recorded in audit"), "{warning}");

    // From a file: refused while others can read it, accepted once private.
    let work = tempfile::tempdir()?;
    let file = work.path().join("key");
    std::fs::write(&file, format!("{canary}\n"))?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    let put_file = args![
        "secret",
        "put",
        "--dir",
        &dir,
        "--tenant",
        "acme",
        "--profile",
        "default",
        KEY,
        "--file",
        &file,
    ];
    let err = cli.fails(&put_file).await?;
    assert!(
        err.contains("mode 644") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
    let out = cli.ok(&put_file).await?;
    assert_eq!(field(&out, "version:")?, "2", "{out}");
    // The same value, so the same fingerprint: the newline was dropped as from stdin.
    assert_eq!(field(&out, "fingerprint:")?, fingerprint, "{out}");

    // A reference goes to the service as such; this mesh allows none.
    let err = cli
        .fails(&args![
            "secret",
            "put",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "--profile",
            "default",
            "DB_PASSWORD",
            "--reference",
            "vault://kv/acme/db#password",
        ])
        .await?;
    assert!(err.contains("PutSecret failed: PermissionDenied"), "{err}");

    // Revoke the key: its id and affected runs; listed; shown on the profile.
    let out = cli
        .ok(&args![
            "secret",
            "revoke",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "--profile",
            "default",
            KEY,
            "--reason",
            "key leaked in a ticket",
        ])
        .await?;
    let revocation_id = field(&out, "revocation id:")?.to_owned();
    assert!(out.contains("affected runs: none"), "{out}");
    assert!(
        out.contains(&format!("key {KEY} of acme/default (soft)")),
        "{out}"
    );
    let list = cli
        .ok(&args![
            "secret",
            "revocations",
            "--dir",
            &dir,
            "--tenant",
            "acme"
        ])
        .await?;
    let line = list
        .lines()
        .find(|l| l.starts_with(&revocation_id))
        .with_context(|| format!("revocation missing\n{list}"))?;
    assert!(line.contains(KEY) && line.contains("active"), "{list}");
    assert!(line.contains("key leaked in a ticket"), "{list}");
    let get = cli
        .ok(&args![
            "profile", "get", "--dir", &dir, "--tenant", "acme", "default"
        ])
        .await?;
    let row = secret_row(&get, KEY).with_context(|| format!("no {KEY} row\n{get}"))?;
    assert!(row.contains("soft-revoked"), "{get}");

    // Lift it: gone from the revocations in force, shown lifted with --all.
    let out = cli
        .ok(&args![
            "secret",
            "lift",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            &revocation_id,
            "--reason",
            "rotated at the provider",
        ])
        .await?;
    assert!(
        out.contains(&format!("lifted revocation {revocation_id}")),
        "{out}"
    );
    assert!(out.contains("rotated at the provider"), "{out}");
    let list = cli
        .ok(&args![
            "secret",
            "revocations",
            "--dir",
            &dir,
            "--tenant",
            "acme"
        ])
        .await?;
    assert_eq!(list.trim(), "no secret revocations in force", "{list}");
    let list = cli
        .ok(&args![
            "secret",
            "revocations",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "--profile",
            "default",
            "--all",
        ])
        .await?;
    let line = list
        .lines()
        .find(|l| l.starts_with(&revocation_id))
        .with_context(|| format!("lifted revocation missing\n{list}"))?;
    assert!(line.contains("lifted"), "{list}");
    let get = cli
        .ok(&args![
            "profile", "get", "--dir", &dir, "--tenant", "acme", "default"
        ])
        .await?;
    let row = secret_row(&get, KEY).with_context(|| format!("no {KEY} row\n{get}"))?;
    assert!(row.contains("active"), "{get}");

    // Delete the secret, then the profile.
    let out = cli
        .ok(&args![
            "secret",
            "delete",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "--profile",
            "default",
            KEY
        ])
        .await?;
    assert!(
        out.contains(&format!("deleted secret {KEY} (version 2)")),
        "{out}"
    );
    let get = cli
        .ok(&args![
            "profile", "get", "--dir", &dir, "--tenant", "acme", "default"
        ])
        .await?;
    assert!(get.contains("secrets: none"), "{get}");
    let out = cli
        .ok(&args![
            "profile", "delete", "--dir", &dir, "--tenant", "acme", "default"
        ])
        .await?;
    assert!(out.contains("deleted profile acme/default"), "{out}");
    let err = cli
        .fails(&args![
            "profile", "get", "--dir", &dir, "--tenant", "acme", "default"
        ])
        .await?;
    assert!(err.contains("GetProfile failed: NotFound"), "{err}");

    // The audit log has the writes and the reveal, with no value.
    let audit = cli
        .ok(&args![
            "audit", "query", "--dir", &dir, "--tenant", "acme", "--limit", "1000"
        ])
        .await?;
    for kind in [
        "sealed.profile.created",
        "sealed.secret.written",
        "sealed.secret.revealed",
        "sealed.secret.revoked",
        "sealed.secret.deleted",
        "sealed.profile.deleted",
    ] {
        assert!(audit.contains(kind), "no {kind} in\n{audit}");
    }

    // The canary is in no output, no service log and no data file.
    let mut found = Vec::new();
    for form in forms(&canary) {
        for (what, bytes) in &cli.seen {
            if contains(bytes, form.as_bytes()) {
                found.push(format!("{form:?} in the {what}"));
            }
        }
    }
    let mut paths = Vec::new();
    files(&mesh.dir().join("logs"), &mut paths)?;
    files(&mesh.dir().join("data"), &mut paths)?;
    anyhow::ensure!(!paths.is_empty(), "no logs or data files to search");
    for path in &paths {
        let bytes = std::fs::read(path)?;
        if contains(&bytes, canary.as_bytes()) {
            found.push(format!("the canary in {}", path.display()));
        }
    }
    assert!(found.is_empty(), "the canary leaked:\n{}", found.join("\n"));
    Ok(())
}

#[tokio::test]
async fn no_flag_takes_a_value() -> anyhow::Result<()> {
    let help = bulkhead(&args!["secret", "put", "--help"]).await?;
    assert!(help.status.success(), "{}", text(&help));
    let help = String::from_utf8_lossy(&help.stdout);
    // The options as defined (the lines that start with a flag), not as
    // mentioned in prose.
    let flags: std::collections::BTreeSet<&str> = help
        .lines()
        .map(str::trim_start)
        .map(|l| l.strip_prefix("-h, ").unwrap_or(l))
        .filter(|l| l.starts_with("--"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let allowed = [
        "--dir",
        "--tenant",
        "--profile",
        "--file",
        "--allow-loose-file",
        "--reference",
        "--help",
    ];
    assert_eq!(
        flags,
        allowed.into_iter().collect(),
        "secret put's options changed: none may take a value\n{help}"
    );
    assert!(!help.contains("--value"), "{help}");
    assert!(help.contains("stdin"), "{help}");

    // A value given as an argument is refused before anything is dialed.
    let out = bulkhead(&args![
        "secret",
        "put",
        "--dir",
        "/nonexistent",
        "--tenant",
        "acme",
        "--profile",
        "default",
        "KEY",
        "not-a-real-secret",
    ])
    .await?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unexpected argument"),
        "{}",
        text(&out)
    );

    // Without a mesh, the refusal says where it looked.
    let out = bulkhead(&args!["profile", "list", "--dir", "/nonexistent/mesh",]).await?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no mesh at /nonexistent/mesh"),
        "{}",
        text(&out)
    );
    Ok(())
}
