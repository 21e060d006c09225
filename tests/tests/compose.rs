//! The compose mesh (`deploy/docker-compose.yml`) end to end: the images are
//! built from this workspace's binaries (`deploy/build-images.sh`, no
//! registry), the project comes up under a random name with its ports on
//! loopback, and the walkthrough runs across the containers, driven by the
//! host's `bulkhead` CLI and, for the refused claim, by the test acting as a
//! worker over gRPC:
//!
//! - every service answers health over mTLS through its published port, and
//!   the two workers (host A: tenant acme, with a sandbox-runner; host B:
//!   tenant globex, bare) have enrolled with their join tokens and registered;
//! - an agent submitted by one operator cannot be approved by the same
//!   operator (PERMISSION_DENIED) and is approved by a second;
//! - a task of each tenant completes on that tenant's host: acme's in a
//!   sandbox on the host's Docker engine (as the sandbox user), globex's in
//!   the host-b container;
//! - a globex worker naming an acme task is refused with PERMISSION_DENIED,
//!   the refusal is in the audit log and the task is untouched.
//!
//! `docker-compose down -v` always runs at the end (a guard), and the
//! runner's sandboxes, if any were left, are removed by its instance label.
//! Without docker or docker-compose the test says SKIP, and fails instead
//! under `BULKHEAD_REQUIRE_EXTERNAL=1`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bulkhead_cluster::Endpoints;
use bulkhead_mesh::tls::{ExpectServer, Identity, TrustBundle};
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_proto::sandbox::v1::SandboxBackend;
use bulkhead_testkit::external::Missing;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use tonic::Code;

const TD: &str = "bulkhead.compose-test";
/// The published ports, in the order of [`PORT_VARS`].
const SERVICES: [&str; 5] = [
    "audit",
    "identity",
    "sealed-vault",
    "dispatcher",
    "sandbox-runner",
];
const PORT_VARS: [&str; 5] = [
    "BULKHEAD_AUDIT_PORT",
    "BULKHEAD_IDENTITY_PORT",
    "BULKHEAD_SEALED_VAULT_PORT",
    "BULKHEAD_DISPATCHER_PORT",
    "BULKHEAD_SANDBOX_RUNNER_PORT",
];
/// How long `up`, the workers' registration and a task each may take.
const WAIT: Duration = Duration::from_secs(60);
const CLI_DEADLINE: Duration = Duration::from_secs(30);
/// The agent: reads its payload and says where and as whom it ran.
const SCRIPT: &str =
    r#"read -r p; echo "got $p on $(/bin/cat /etc/hostname) as uid $(/bin/id -u)""#;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether `program args` runs and succeeds.
fn runs(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A compose project of this test; `down -v` when dropped, whatever happened.
struct Project {
    name: String,
    file: PathBuf,
    env: Vec<(String, OsString)>,
    runner_dir: PathBuf,
    // The PKI and the runner's data; removed after the project is down.
    dir: tempfile::TempDir,
}

impl Project {
    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new("docker-compose");
        cmd.arg("--project-name")
            .arg(&self.name)
            .arg("--file")
            .arg(&self.file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    async fn run(&self, args: &[&str], within: Duration) -> anyhow::Result<Output> {
        let mut cmd = tokio::process::Command::from(self.command(args));
        cmd.kill_on_drop(true);
        tokio::time::timeout(within, cmd.output())
            .await
            .with_context(|| format!("docker-compose {args:?} took over {within:?}"))?
            .context("failed to run docker-compose")
    }

    /// The last lines of every container's log, for failure messages.
    fn logs(&self) -> String {
        self.command(&["logs", "--no-color", "--tail", "30"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("(no logs: {e})"))
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let down = self
            .command(&["down", "--volumes", "--remove-orphans", "--timeout", "5"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        if let Ok(o) = &down
            && !o.status.success()
        {
            eprintln!(
                "docker-compose down failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        // Sandboxes are the runner's containers, not the project's.
        if let Ok(instance) = std::fs::read_to_string(self.runner_dir.join("runner-instance")) {
            let filter = format!("label=bulkhead.runner.instance={}", instance.trim());
            if let Ok(o) = std::process::Command::new("docker")
                .args(["ps", "-aq", "--filter", &filter])
                .output()
            {
                for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = std::process::Command::new("docker")
                        .args(["rm", "-f", "-v", id])
                        .output();
                }
            }
        }
    }
}

/// The host's `bulkhead` CLI against the published ports.
struct Cli {
    exe: PathBuf,
}

impl Cli {
    async fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Output> {
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(args)
            .env_remove("BULKHEAD_DIR")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("failed to run bulkhead")?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().context("no stdin")?;
            pipe.write_all(input).await?;
            drop(pipe);
        }
        Ok(tokio::time::timeout(CLI_DEADLINE, child.wait_with_output()).await??)
    }

    async fn ok(&self, p: &Project, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<String> {
        let out = self.run(args, stdin).await?;
        ensure!(
            out.status.success(),
            "bulkhead {args:?} failed\n{}\n--- containers ---\n{}",
            text(&out),
            p.logs()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn json(
        &self,
        p: &Project,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> anyhow::Result<Value> {
        let out = self.ok(p, args, stdin).await?;
        serde_json::from_str(out.trim()).with_context(|| format!("not one JSON object: {out}"))
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(bulkhead_cluster::free_port()?)
}

/// Builds the images and brings the project up; `None` after a SKIP line.
async fn up() -> anyhow::Result<Option<(Project, PathBuf)>> {
    if !runs("docker", &["version", "--format", "{{.Server.Version}}"]) {
        return Missing::new("docker engine", "install docker.io and start dockerd").skip();
    }
    if !runs("docker-compose", &["version"]) {
        return Missing::new("docker-compose", "install Debian docker-compose").skip();
    }
    let cli = bulkhead_cluster::find_executable("bulkhead", None)?;
    let bin_dir = cli.parent().context("bin dir")?.to_owned();
    let root = workspace();

    let started = Instant::now();
    let build = tokio::process::Command::new(root.join("deploy/build-images.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .kill_on_drop(true)
        .output();
    let build = tokio::time::timeout(Duration::from_secs(240), build)
        .await
        .context("building the images took too long")??;
    ensure!(
        build.status.success(),
        "deploy/build-images.sh failed\n{}",
        text(&build)
    );
    eprintln!("images built in {:?}", started.elapsed());

    let dir = tempfile::Builder::new()
        .prefix("bulkhead-compose-")
        .tempdir()?;
    let pki = dir.path().join("pki");
    let runner_dir = dir.path().join("runner");
    std::fs::create_dir_all(&pki)?;
    std::fs::create_dir_all(&runner_dir)?;
    let mut env: Vec<(String, OsString)> = vec![
        ("BULKHEAD_COMPOSE_DIR".into(), dir.path().into()),
        ("BULKHEAD_RUNNER_DIR".into(), runner_dir.clone().into()),
        ("BULKHEAD_TRUST_DOMAIN".into(), TD.into()),
        (
            "BULKHEAD_UID".into(),
            nix::unistd::getuid().to_string().into(),
        ),
        (
            "BULKHEAD_GID".into(),
            nix::unistd::getgid().to_string().into(),
        ),
    ];
    for var in PORT_VARS {
        env.push((var.into(), free_port()?.to_string().into()));
    }
    let project = Project {
        name: format!("bulkhead-test-{:08x}", rand::random::<u32>()),
        file: root.join("deploy/docker-compose.yml"),
        env,
        runner_dir,
        dir,
    };
    let started = Instant::now();
    let out = project.run(&["up", "--detach"], WAIT * 2).await?;
    ensure!(
        out.status.success(),
        "docker-compose up failed\n{}\n--- containers ---\n{}",
        text(&out),
        project.logs()
    );
    eprintln!("compose up in {:?}", started.elapsed());
    Ok(Some((project, cli)))
}

/// An endpoints.json naming the published loopback ports and `who`'s
/// certificate from the project's PKI.
fn host_dir(project: &Project, into: &Path, who: &str) -> anyhow::Result<()> {
    let pki = project.dir.path().join("pki");
    let mut services = std::collections::BTreeMap::new();
    for (name, var) in SERVICES.iter().zip(PORT_VARS) {
        let port = project
            .env
            .iter()
            .find(|(k, _)| k == var)
            .and_then(|(_, v)| v.to_str())
            .context("port")?;
        services.insert((*name).to_owned(), format!("127.0.0.1:{port}"));
    }
    let endpoints = Endpoints {
        services,
        ca: pki.join("ca.pem"),
        operator_cert: pki.join(format!("{who}.pem")),
        operator_key: pki.join(format!("{who}.key")),
        audit_public_key: None,
        audit_view: None,
        audit_view_token: None,
    };
    std::fs::create_dir_all(into)?;
    std::fs::write(
        Endpoints::path(into),
        serde_json::to_string_pretty(&endpoints)?,
    )?;
    Ok(())
}

/// Polls `worker list` until a connected worker of `tenant` whose id starts
/// with `host`; its id.
async fn wait_worker(
    cli: &Cli,
    p: &Project,
    dir: &str,
    tenant: &str,
    host: &str,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = cli
            .ok(
                p,
                &["worker", "list", "--dir", dir, "--tenant", tenant, "--json"],
                None,
            )
            .await?;
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            let w: Value = serde_json::from_str(line)?;
            let id = w["worker_id"].as_str().unwrap_or_default();
            if id.starts_with(&format!("{host}-")) && w["state"] == "connected" {
                ensure!(w["tenant"] == tenant, "{w}");
                return Ok(id.to_owned());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no connected {tenant} worker on {host}:\n{out}\n--- containers ---\n{}",
                p.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls `task get` until the task is final; its JSON.
async fn wait_final(
    cli: &Cli,
    p: &Project,
    dir: &str,
    tenant: &str,
    id: &str,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let t = cli
            .json(
                p,
                &[
                    "task", "get", "--dir", dir, "--tenant", tenant, id, "--json",
                ],
                None,
            )
            .await?;
        let status = t["status"].as_str().unwrap_or_default();
        if !matches!(status, "queued" | "assigned" | "running") {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!(
                "task {id} of {tenant} still {status}:\n{t}\n--- containers ---\n{}",
                p.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_mesh_runs_the_walkthrough_across_containers() -> anyhow::Result<()> {
    bulkhead_mesh::tls::install_crypto_provider();
    let started = Instant::now();
    let Some((project, exe)) = up().await? else {
        return Ok(());
    };
    let cli = Cli { exe };
    let host = tempfile::tempdir()?;
    let (op, rev) = (host.path().join("operator"), host.path().join("reviewer"));
    host_dir(&project, &op, "operator")?;
    host_dir(&project, &rev, "reviewer")?;
    let (op, rev) = (
        op.to_str().context("path")?.to_owned(),
        rev.to_str().context("path")?.to_owned(),
    );

    // The mesh answers health over mTLS through the published ports.
    let deadline = Instant::now() + WAIT;
    loop {
        let out = cli.run(&["health", "--dir", &op], None).await?;
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            for s in SERVICES {
                ensure!(
                    text.lines()
                        .any(|l| l.starts_with(&format!("{s} ")) && l.ends_with("SERVING")),
                    "{s} not serving:\n{text}"
                );
            }
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the mesh is not healthy\n{}\n{}",
                text(&out),
                project.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The sandbox-runner installed its shim on the host, at the path the
    // Docker daemon resolves its bind mounts from.
    ensure!(
        project.runner_dir.join("shim/bulkhead-init").is_file(),
        "no shim under the runner's host directory"
    );

    // Both workers enrolled with their join tokens, each of its tenant.
    let worker_a = wait_worker(&cli, &project, &op, "acme", "host-a").await?;
    let worker_b = wait_worker(&cli, &project, &op, "globex", "host-b").await?;

    // An agent: submitted by one operator, approved only by another.
    let submitted = cli
        .json(
            &project,
            &[
                "agent",
                "submit",
                "--dir",
                &op,
                "--name",
                "echo",
                "--version",
                "1",
                "--image",
                "bulkhead/agent:dev",
                "--command",
                "/bin/sh",
                "--command",
                "-c",
                "--command",
                SCRIPT,
                "--json",
            ],
            None,
        )
        .await?;
    ensure!(submitted["status"] == "pending", "{submitted}");
    let own = cli
        .run(&["agent", "approve", "--dir", &op, "echo", "1"], None)
        .await?;
    ensure!(
        !own.status.success() && String::from_utf8_lossy(&own.stderr).contains("PERMISSION_DENIED"),
        "the submitter approved its own agent\n{}",
        text(&own)
    );
    let approved = cli
        .json(
            &project,
            &["agent", "approve", "--dir", &rev, "echo", "1", "--json"],
            None,
        )
        .await?;
    ensure!(approved["status"] == "approved", "{approved}");

    // A task of each tenant, for its own host.
    let mut ids = Vec::new();
    for (tenant, label) in [("acme", "host=a"), ("globex", "host=b")] {
        let t = cli
            .json(
                &project,
                &[
                    "task",
                    "enqueue",
                    "--dir",
                    &op,
                    "--tenant",
                    tenant,
                    "--agent",
                    "echo",
                    "--label",
                    label,
                    "--payload",
                    "-",
                    "--json",
                ],
                Some(format!("ticket-{tenant}\n").as_bytes()),
            )
            .await?;
        ids.push(t["task_id"].as_str().context("task_id")?.to_owned());
    }
    let acme = wait_final(&cli, &project, &op, "acme", &ids[0]).await?;
    let globex = wait_final(&cli, &project, &op, "globex", &ids[1]).await?;
    for (t, worker) in [(&acme, &worker_a), (&globex, &worker_b)] {
        ensure!(
            t["status"] == "succeeded" && t["worker_id"] == worker.as_str(),
            "{t}\n--- containers ---\n{}",
            project.logs()
        );
    }
    let out_a = acme["output_summary"].as_str().unwrap_or_default();
    let out_b = globex["output_summary"].as_str().unwrap_or_default();
    // acme's ran in a sandbox of host A's runner, as the sandbox user;
    // globex's ran bare in the host-b container.
    ensure!(
        out_a.contains("got ticket-acme") && out_a.contains("as uid 65534"),
        "{acme}"
    );
    ensure!(
        out_b.contains("got ticket-globex on host-b as uid 0"),
        "{globex}"
    );

    // A globex worker (the test, with a certificate from the project's CA)
    // names an acme task: refused, audited, the task untouched.
    let intruder = host.path().join("intruder");
    cli.ok(
        &project,
        &[
            "pki",
            "issue",
            "--spiffe-id",
            &format!("spiffe://{TD}/tenant/globex/worker/intruder"),
            "--out",
            intruder.to_str().context("path")?,
            "--ca-dir",
            project.dir.path().join("pki").to_str().context("path")?,
            "--name",
            "intruder",
        ],
        None,
    )
    .await?;
    let bait = cli
        .json(
            &project,
            &[
                "task",
                "enqueue",
                "--dir",
                &op,
                "--tenant",
                "acme",
                "--agent",
                "echo",
                "--label",
                "host=nowhere",
                "--payload",
                "-",
                "--json",
            ],
            Some(b"bait\n"),
        )
        .await?;
    let bait = bait["task_id"].as_str().context("task_id")?.to_owned();
    let endpoints = Endpoints::load(Path::new(&op))?;
    let bundle = TrustBundle::from_pem_file(&endpoints.ca)?;
    let id = Identity::from_pem_files(
        &intruder.join("intruder.pem"),
        &intruder.join("intruder.key"),
    )?;
    let ch = bulkhead_mesh::client::connect(
        endpoints.address("dispatcher")?,
        Some(&id),
        &bundle,
        ExpectServer::Service("dispatcher".into()),
    )
    .await?;
    let mut d = DispatcherServiceClient::new(ch);
    d.register_worker(pb::RegisterWorkerRequest {
        labels: [("host".to_owned(), "nowhere".to_owned())].into(),
        max_concurrent_runs: 1,
        sandbox_backends: vec![SandboxBackend::Process as i32],
        version: "compose-test".into(),
    })
    .await
    .context("the intruder registers as a globex worker")?;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ClaimRequest>(4);
    let _stream = d
        .claim(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("open a claim stream")?;
    for tenant in ["globex", "acme"] {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .der()
            .to_vec();
        let r = d
            .claim_task(pb::ClaimTaskRequest {
                tenant: tenant.into(),
                task_id: bait.clone(),
                run_csr_der: csr.into(),
            })
            .await;
        match r {
            Err(s) if s.code() == Code::PermissionDenied => {}
            other => bail!("a globex worker claimed an acme task as {tenant:?}: {other:?}"),
        }
    }
    drop(tx);
    let deadline = Instant::now() + WAIT;
    loop {
        let events = cli
            .ok(
                &project,
                &[
                    "audit",
                    "query",
                    "--dir",
                    &op,
                    "--type",
                    "fleet.cross_tenant_refused",
                    "--json",
                ],
                None,
            )
            .await?;
        if events.contains(&bait) && events.contains("intruder") {
            break;
        }
        if Instant::now() > deadline {
            bail!("no fleet.cross_tenant_refused for {bait}:\n{events}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let still = cli
        .json(
            &project,
            &[
                "task", "get", "--dir", &op, "--tenant", "acme", &bait, "--json",
            ],
            None,
        )
        .await?;
    ensure!(
        still["status"] == "queued" && still["attempt"] == 0 && still["worker_id"] == "",
        "the refused claim changed the task: {still}"
    );

    eprintln!("walkthrough done in {:?}", started.elapsed());
    drop(project);
    eprintln!("down in {:?}", started.elapsed());
    Ok(())
}

#[test]
fn the_compose_file_and_the_dashboard_are_valid() -> anyhow::Result<()> {
    let root = workspace();
    let json = std::fs::read_to_string(root.join("deploy/grafana/bulkhead-dashboard.json"))?;
    let dash: Value = serde_json::from_str(&json).context("the dashboard is not JSON")?;
    let exprs: Vec<&str> = dash["panels"]
        .as_array()
        .context("panels")?
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    for metric in [
        "bulkhead_tasks_total",
        "bulkhead_resolutions_total",
        "bulkhead_sandbox_seconds_sum",
        "bulkhead_sandbox_seconds_bucket",
    ] {
        ensure!(
            exprs.iter().any(|e| e.contains(metric)),
            "no panel queries {metric}"
        );
    }
    ensure!(
        exprs
            .iter()
            .all(|e| e.contains("bulkhead_tenant") && e.contains("$tenant")),
        "every panel rolls up by tenant: {exprs:?}"
    );

    if !runs("docker-compose", &["version"]) {
        Missing::new("docker-compose", "install Debian docker-compose").skip::<()>()?;
        return Ok(());
    }
    for profile in [None, Some("observability")] {
        let mut cmd = std::process::Command::new("docker-compose");
        cmd.arg("--file")
            .arg(root.join("deploy/docker-compose.yml"));
        if let Some(p) = profile {
            cmd.args(["--profile", p]);
        }
        let out = cmd.args(["config", "--services"]).output()?;
        ensure!(
            out.status.success(),
            "docker-compose config\n{}",
            text(&out)
        );
        let services = String::from_utf8_lossy(&out.stdout).into_owned();
        let want: &[&str] = match profile {
            None => &[
                "pki",
                "audit",
                "identity",
                "sealed-vault",
                "dispatcher",
                "sandbox-runner",
                "bootstrap",
                "worker-a",
                "worker-b",
            ],
            Some(_) => &["otel-collector", "prometheus", "grafana"],
        };
        for s in want {
            ensure!(services.lines().any(|l| l == *s), "no {s} in\n{services}");
        }
    }
    Ok(())
}
