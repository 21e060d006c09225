//! `bulkhead demo`, the README's main job, run as a user runs it: the real
//! binary on a fresh directory. It must exit 0 with every guarantee held
//! (the refused cross-tenant claim, each sandbox calling the vendor API with
//! its own key, zero leaks, a verified audit log), stop
//! every process it started, and leave a mesh directory whose audit log
//! `bulkhead audit verify` accepts — offline from the export it wrote, and
//! over the wire once `bulkhead dev up` serves the same data again.
//! With the Docker engine (skipped loudly without it, an error under
//! `BULKHEAD_REQUIRE_EXTERNAL=1`) the sandbox walkthrough runs Docker
//! sandboxes and leaves no container and no network behind; the process
//! backend is run on its own too.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use bulkhead_testkit::docker::{docker, docker_or_skip};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn bulkhead() -> anyhow::Result<std::path::PathBuf> {
    Ok(bulkhead_cluster::find_executable("bulkhead", None)?)
}

fn text(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// PIDs of live processes whose command line names `dir`.
fn processes_naming(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false);
        if !zombie && cmd.windows(needle.len()).any(|w| w == needle) {
            out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}

/// `bulkhead dev up --dir DIR` in the background, stopped by its PID on drop.
struct DevUp(std::process::Child);

impl Drop for DevUp {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Docker side of the sandbox walkthrough, as the story told it: the
/// backend, both tenants' answers from the stub container, the engine's view
/// of both sandboxes scanned, zero leaks; and afterwards no sandbox
/// container of the runner, no stub container and no network.
fn docker_walkthrough_held(story: &str) -> anyhow::Result<()> {
    for line in [
        "sandbox backend: docker (--backend auto and the Docker engine ",
        "mercy-clinic  vendor API says: {\"account\":\"acct_mercy-clinic\",\"tenant\":\"mercy-clinic\",\"ok\":true}",
        "ledgerly      vendor API says: {\"account\":\"acct_ledgerly\",\"tenant\":\"ledgerly\",\"ok\":true}",
        "✓ the engine's view of both sandboxes was read while they ran",
        "scanned docker inspect of mercy-clinic's sandbox",
        "scanned daemon's files of ledgerly's sandbox",
        "✓ after release no sandbox container is left",
        "✓ zero leaks: the keys reached their sandboxes and nothing else",
        "✓ the walkthrough's container and network are gone",
    ] {
        ensure!(story.contains(line), "the story lacks {line:?}\n{story}");
    }
    let network = story
        .lines()
        .find_map(|l| l.trim().strip_prefix("docker network "))
        .and_then(|rest| rest.split_whitespace().next())
        .context("the story names no Docker network")?;
    ensure!(network.starts_with("bulkhead-demo-"), "{network}");
    let instance = story
        .lines()
        .find_map(|l| {
            l.split_once("bulkhead.runner.instance=")
                .map(|(_, i)| i.trim())
        })
        .context("the story names no runner instance")?;
    ensure!(!instance.is_empty(), "an empty runner instance");
    ensure!(
        docker(&["network", "inspect", network]).is_err(),
        "the network {network} is left"
    );
    let demo_label = format!("label=bulkhead.demo={network}");
    let networks = docker(&["network", "ls", "-q", "--filter", &demo_label])?;
    ensure!(networks.trim().is_empty(), "networks left: {networks}");
    for filter in [
        demo_label,
        format!("label=bulkhead.runner.instance={instance}"),
        format!("name={network}"),
    ] {
        let left = docker(&["ps", "-a", "-q", "--filter", &filter])?;
        ensure!(left.trim().is_empty(), "containers left ({filter}): {left}");
    }
    Ok(())
}

#[test]
fn the_demo_keeps_every_guarantee_and_leaves_a_verifiable_audit_log() -> anyhow::Result<()> {
    // Without the engine the walkthrough runs on the process backend, and
    // only its Docker assertions are skipped.
    let mut with_docker = docker_or_skip()?;
    if with_docker && !nix::unistd::geteuid().is_root() {
        // The demo's leak scan reads a container's processes and the
        // daemon's files: without root it takes the process backend.
        eprintln!("SKIP: the demo's Docker walkthrough needs root; checking the process backend");
        with_docker = false;
    }
    let exe = bulkhead()?;
    let tmp = tempfile::Builder::new()
        .prefix("bulkhead-demo-test-")
        .tempdir()?;
    let dir = tmp.path().join("mesh");
    let out = Command::new(&exe)
        .arg("demo")
        .arg("--dir")
        .arg(&dir)
        .env_remove("BULKHEAD_DIR")
        .stdin(Stdio::null())
        .output()
        .context("failed to run bulkhead demo")?;
    let story = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "the demo failed\n{}", text(&out));

    // The refused cross-tenant claim, the leak test and the verified log.
    for line in [
        "ClaimTask(tenant=ledgerly",
        "✓ the cross-tenant claim is refused with PERMISSION_DENIED",
        "✓ the refusal is in the audit log (fleet.cross_tenant_refused)",
        "✓ the refused claim took nothing",
        "✓ the scanner finds a planted canary (positive control)",
        "✓ zero leaks of the sealed credentials",
        "canaries × ",
        "✓ the audit service verifies its log",
        "✓ a full export verifies offline with the public key alone",
        "✓ mercy-clinic's sandbox called the vendor API with mercy-clinic's own key",
        "✓ ledgerly's sandbox called the vendor API with ledgerly's own key",
        "✓ positive control: each key was in exactly one sandbox, its own tenant's",
        "✓ zero leaks: the keys reached their sandboxes and nothing else",
        "tree head: ",
        "guarantee checks held",
    ] {
        ensure!(story.contains(line), "the story lacks {line:?}\n{story}");
    }
    ensure!(
        story.contains("PERMISSION_DENIED: the task belongs to another tenant"),
        "the refusal is not printed\n{story}"
    );
    ensure!(!story.contains('✗'), "a guarantee failed\n{story}");
    ensure!(
        story.contains("0 found"),
        "the leak scan found a canary\n{story}"
    );
    if with_docker {
        docker_walkthrough_held(&story)?;
    } else {
        ensure!(
            story.contains("sandbox backend: process (--backend auto"),
            "{story}"
        );
    }

    // Every process it started has stopped.
    let left = processes_naming(&dir);
    ensure!(left.is_empty(), "the demo left processes behind: {left:?}");

    // What it left: the PKI, data, logs, endpoints.json and its export.
    for p in [
        "pki/ca.pem",
        "endpoints.json",
        "logs/audit.log",
        "data/audit",
    ] {
        ensure!(dir.join(p).exists(), "the demo left no {p}");
    }
    let offline = Command::new(&exe)
        .args(["audit", "verify", "--complete", "--file"])
        .arg(dir.join("audit-export.jsonl"))
        .arg("--dir")
        .arg(&dir)
        .output()?;
    ensure!(
        offline.status.success(),
        "the export does not verify offline\n{}",
        text(&offline)
    );

    // Right after the demo, with its mesh stopped, `audit export|verify --dir`
    // read the audit store it left.
    let stopped = Command::new(&exe)
        .args(["audit", "verify", "--dir"])
        .arg(&dir)
        .output()?;
    let said = text(&stopped);
    ensure!(
        stopped.status.success()
            && said.contains("store verify: ok")
            && said.contains("export verify: ok"),
        "audit verify --dir on the stopped mesh failed\n{said}"
    );
    let exported = dir.join("audit-again.jsonl");
    let export = Command::new(&exe)
        .args(["audit", "export", "--dir"])
        .arg(&dir)
        .arg("--out")
        .arg(&exported)
        .output()?;
    ensure!(
        export.status.success(),
        "audit export --dir on the stopped mesh failed\n{}",
        text(&export)
    );
    let again = Command::new(&exe)
        .args(["audit", "verify", "--complete", "--file"])
        .arg(&exported)
        .arg("--dir")
        .arg(&dir)
        .output()?;
    ensure!(
        again.status.success(),
        "the stopped mesh's export does not verify\n{}",
        text(&again)
    );

    // The same mesh again, on the demo's data: the log verifies over the wire.
    let mut child = Command::new(&exe)
        .args(["dev", "up", "--dir"])
        .arg(&dir)
        .env_remove("BULKHEAD_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("failed to start bulkhead dev up")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let dev = DevUp(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let ready = line.starts_with("ready");
            let _ = tx.send(line);
            if ready {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("ready") => break,
            Ok(line) => seen.push(line),
            Err(e) => anyhow::bail!("dev up never became ready ({e}): {seen:?}"),
        }
    }
    let verify = Command::new(&exe)
        .args(["audit", "verify", "--dir"])
        .arg(&dir)
        .output()?;
    ensure!(
        verify.status.success(),
        "audit verify --dir failed on the demo's log\n{}",
        text(&verify)
    );
    let said = String::from_utf8_lossy(&verify.stdout);
    ensure!(
        said.contains("server verify: ok") && said.contains("export verify: ok"),
        "{said}"
    );
    drop(dev);
    let left = processes_naming(&dir);
    ensure!(left.is_empty(), "dev up left processes behind: {left:?}");
    Ok(())
}

/// Without `--dir` the demo works in a temp dir and removes it, with every
/// process it started stopped.
#[test]
fn without_a_dir_the_demo_leaves_nothing_behind() -> anyhow::Result<()> {
    let out = Command::new(bulkhead()?)
        .args(["demo", "--scenario", "governance"])
        .env_remove("BULKHEAD_DIR")
        .stdin(Stdio::null())
        .output()
        .context("failed to run bulkhead demo")?;
    let story = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "the demo failed\n{}", text(&out));
    ensure!(
        story.contains("✓ the submitter may not decide")
            && story.contains("✓ approved by an operator other than the submitter"),
        "{story}"
    );
    let dir = story
        .lines()
        .find_map(|l| l.trim().strip_prefix("directory (removed at the end): "))
        .context("the demo did not say where it ran")?;
    let dir = Path::new(dir);
    ensure!(!dir.exists(), "{} is still there", dir.display());
    let left = processes_naming(dir);
    ensure!(left.is_empty(), "the demo left processes behind: {left:?}");
    Ok(())
}

/// `--backend process` runs the sandbox walkthrough without Docker: process
/// sandboxes, the stub in the demo on loopback, each tenant's own key.
#[test]
fn the_process_backend_runs_the_sandbox_walkthrough() -> anyhow::Result<()> {
    let out = Command::new(bulkhead()?)
        .args([
            "demo",
            "--scenario",
            "sandbox-credentials",
            "--backend",
            "process",
        ])
        .env_remove("BULKHEAD_DIR")
        .stdin(Stdio::null())
        .output()
        .context("failed to run bulkhead demo")?;
    let story = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "the demo failed\n{}", text(&out));
    if story.contains("SKIPPED:") {
        eprintln!("SKIP: the sandbox walkthrough was skipped:\n{story}");
        return Ok(());
    }
    for line in [
        "sandbox backend: process (asked for with --backend process)",
        "(in the demo)",
        "✓ mercy-clinic's sandbox called the vendor API with mercy-clinic's own key",
        "✓ ledgerly's sandbox called the vendor API with ledgerly's own key",
        "✓ positive control: each key was in exactly one sandbox, its own tenant's",
        "✓ zero leaks: the keys reached their sandboxes and nothing else",
    ] {
        ensure!(story.contains(line), "the story lacks {line:?}\n{story}");
    }
    ensure!(!story.contains('✗'), "a guarantee failed\n{story}");
    ensure!(
        !story.contains("docker network"),
        "the process backend made a network\n{story}"
    );
    Ok(())
}
