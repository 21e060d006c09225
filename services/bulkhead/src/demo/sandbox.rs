//! Sandbox and scoped credentials (companion example 39): two tenants'
//! agents run in sandboxes of the host's sandbox-runner; each calls a
//! third-party API stub with its own key, which the runner resolved at
//! sealed-vault and delivered into that sandbox only. Then the
//! credential-leak smoke test: the keys in no worker, the dispatcher, a
//! log, the audit log or a file — and, as the positive control, each key in
//! its own sandbox's environment and not in the other's.
//!
//! With the Docker engine the sandboxes are containers: the demo makes an
//! internal Docker network, runs the API stub as a container on it, lets the
//! sandbox-runner put the two tenants' sandboxes on it (its network
//! allow-list) and has the workers ask for it (`--sandbox-network`); the
//! leak scan then reads `docker inspect` and the daemon's files of each
//! sandbox while it runs. Without the engine the sandboxes are processes and
//! the stub listens on loopback in the demo itself.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bulkhead_proto::dispatcher::v1 as pb;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::Backend;
use super::docker;
use super::fleet::{self, CLINIC, FINTECH};
use super::leak::{self, Canary};
use super::stage::{self, AgentSpec, OPERATOR, Stage, WorkerSpec, attr};
use super::story::Story;

/// The key both tenants' agents ask for; each tenant's profile holds its own.
const KEY: &str = "VENDOR_API_KEY";
const PROFILE: &str = "vendor";
const AGENT: &str = "vendor-call";
/// In the agent's command line, so that the demo finds its processes.
const MARKER: &str = "bulkhead-demo-vendor-call";

/// The sandbox backend the demo uses, and why.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub backend: Backend,
    pub why: String,
    /// With Docker: the names of what the walkthrough makes there.
    pub docker: Option<DockerNames>,
}

/// The Docker network and stub container of the walkthrough (random names,
/// so that demos side by side do not meet).
#[derive(Debug, Clone)]
pub struct DockerNames {
    pub network: String,
    pub stub: String,
}

impl DockerNames {
    fn new() -> Self {
        use rand::Rng as _;
        let suffix: u32 = rand::rng().random();
        let network = format!("bulkhead-demo-{suffix:08x}");
        Self {
            stub: format!("{network}-vendor"),
            network,
        }
    }
}

impl Chosen {
    /// Removes what the sandbox scenario made outside the mesh directory,
    /// after the mesh has stopped (when the scenario did not finish, a
    /// sandbox of the runner `instance` may be left): its containers, the
    /// stub and the network. Returns what it removed.
    pub fn cleanup(&self, instance: Option<&str>) -> Vec<String> {
        let Some(names) = &self.docker else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        if let Some(instance) = instance {
            for (id, tenant) in docker::sandboxes(instance).unwrap_or_default() {
                if docker::remove_container(&id) {
                    removed.push(format!("sandbox container {} ({tenant})", short(&id)));
                }
            }
        }
        if docker::remove_container(&names.stub) {
            removed.push(format!("container {}", names.stub));
        }
        if docker::remove_network(&names.network) {
            removed.push(format!("network {}", names.network));
        }
        removed
    }
}

/// The first 12 characters of a container id.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn docker_chosen(why: String) -> Chosen {
    Chosen {
        backend: Backend::Docker,
        why,
        docker: Some(DockerNames::new()),
    }
}

fn process_chosen(why: impl Into<String>) -> Chosen {
    Chosen {
        backend: Backend::Process,
        why: why.into(),
        docker: None,
    }
}

/// Docker when asked for or, with `--backend auto`, when the engine
/// answers; else the process backend. Says why.
pub fn choose_backend(asked: Backend) -> anyhow::Result<Chosen> {
    // A worker of an older build cannot put a sandbox on a network, so a
    // Docker sandbox could not reach the API stub.
    let networks = worker_help().contains("--sandbox-network");
    const OLD_WORKER: &str =
        "this build's bulkhead-worker cannot ask for a sandbox network (--sandbox-network)";
    Ok(match asked {
        Backend::Process => process_chosen("asked for with --backend process"),
        Backend::Docker => {
            let Some(version) = docker::engine_version() else {
                anyhow::bail!(
                    "--backend docker: the Docker engine does not answer (docker version)"
                );
            };
            anyhow::ensure!(networks, "--backend docker: {OLD_WORKER}");
            docker_chosen(format!(
                "asked for with --backend docker; Docker engine {version}"
            ))
        }
        Backend::Auto => match docker::engine_version() {
            Some(version) if networks && nix::unistd::geteuid().is_root() => docker_chosen(
                format!("--backend auto and the Docker engine {version} answers"),
            ),
            Some(_) if !networks => process_chosen(format!(
                "--backend auto: the Docker engine answers, but {OLD_WORKER}"
            )),
            // A container's processes run as another user, and the daemon's
            // files are root's: the leak scan could not read them.
            Some(_) => process_chosen(
                "--backend auto: the Docker engine answers, but the leak scan needs root \
                 to read a container's processes and the daemon's files",
            ),
            None => process_chosen(
                "--backend auto and the Docker engine does not answer (docker version)",
            ),
        },
    })
}

/// The sandbox-runner's settings for the demo: the local mesh's defaults
/// (its process backend runs the usual shells and interpreters); with
/// Docker, the two tenants may put sandboxes on the walkthrough's network,
/// and the demo's image is the only one it runs.
pub fn runner_config(chosen: &Chosen) -> toml::Table {
    let mut table = toml::Table::new();
    if let Some(names) = &chosen.docker {
        let tenants = [CLINIC, FINTECH]
            .iter()
            .map(|t| toml::Value::String((*t).to_owned()))
            .collect();
        let mut networks = toml::Table::new();
        networks.insert(names.network.clone(), toml::Value::Array(tenants));
        table.insert("networks".into(), toml::Value::Table(networks));
        table.insert(
            "images".into(),
            toml::Value::Array(vec![toml::Value::String(docker::IMAGE.into())]),
        );
    }
    table
}

/// The worker's `--help`, empty when it cannot be run.
fn worker_help() -> String {
    bulkhead_cluster::find_binary("worker", None)
        .ok()
        .and_then(|exe| Command::new(exe).arg("--help").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether this build's worker can hand runs to a sandbox-runner.
fn worker_has_sandbox_mode() -> bool {
    worker_help().contains("--sandbox-runner")
}

/// A third-party API on loopback that knows only the SHA-256 of each key it
/// issued, and answers whose key it was (401 for any other).
struct ApiStub {
    addr: String,
    calls: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiStub {
    async fn start(issued: HashMap<[u8; 32], String>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        let issued = Arc::new(issued);
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let issued = issued.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf);
                    let key = head.lines().find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("authorization")
                            .then(|| value.trim().strip_prefix("Bearer ").map(str::to_owned))?
                    });
                    let who = key.and_then(|k| {
                        let digest: [u8; 32] = Sha256::digest(k.as_bytes()).into();
                        issued.get(&digest).cloned()
                    });
                    let (status, body) = match &who {
                        Some(tenant) => (
                            "200 OK",
                            format!(
                                "{{\"account\":\"acct_{tenant}\",\"tenant\":\"{tenant}\",\"ok\":true}}"
                            ),
                        ),
                        None => ("401 Unauthorized", "{\"error\":\"unknown key\"}".to_owned()),
                    };
                    if let Ok(mut calls) = log.lock() {
                        calls.push(who.unwrap_or_else(|| "unknown key".into()));
                    }
                    let reply = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                });
            }
        });
        Ok(Self { addr, calls, task })
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Drop for ApiStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The same API as a container on the walkthrough's Docker network, given
/// the same hashes (in its environment: they are not the keys). It logs one
/// line per call, `call: <tenant>` or `call: unknown key`.
const STUB_SCRIPT: &str = "\
import hashlib, http.server, json, os
issued = dict(p.split('=', 1) for p in os.environ['VENDOR_KEY_HASHES'].split(','))
class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        auth = self.headers.get('Authorization', '')
        key = auth[len('Bearer '):] if auth.startswith('Bearer ') else None
        who = issued.get(hashlib.sha256(key.encode()).hexdigest()) if key is not None else None
        if who:
            status, body = 200, {'account': 'acct_' + who, 'tenant': who, 'ok': True}
        else:
            status, body = 401, {'error': 'unknown key'}
        print('call:', who or 'unknown key', flush=True)
        data = json.dumps(body, separators=(',', ':')).encode()
        self.send_response(status)
        self.send_header('content-type', 'application/json')
        self.send_header('content-length', str(len(data)))
        self.send_header('connection', 'close')
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(('0.0.0.0', 8080), Api)
print('listening on :8080', flush=True)
server.serve_forever()
";

/// The port the stub container listens on.
const STUB_PORT: u16 = 8080;

/// Starts the stub container on the network and waits until it listens.
async fn start_stub_container(
    names: &DockerNames,
    issued: &HashMap<[u8; 32], String>,
) -> anyhow::Result<()> {
    let hashes = issued
        .iter()
        .map(|(digest, tenant)| format!("{}={tenant}", hex::encode(digest)))
        .collect::<Vec<_>>()
        .join(",");
    let label = format!("{}={}", docker::DEMO_LABEL, names.network);
    docker::docker(&[
        "network",
        "create",
        "--internal",
        "--label",
        &label,
        &names.network,
    ])?;
    docker::docker(&[
        "run",
        "--detach",
        "--name",
        &names.stub,
        "--network",
        &names.network,
        "--label",
        &label,
        "--read-only",
        "--user",
        "65534:65534",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges:true",
        "--env",
        &format!("VENDOR_KEY_HASHES={hashes}"),
        docker::IMAGE,
        "/usr/bin/python3",
        "-u",
        "-c",
        STUB_SCRIPT,
    ])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let logs = stub_logs(&names.stub);
        if logs.contains("listening on") {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the vendor API stub container never listened: {logs}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the stub container printed (stdout and stderr).
fn stub_logs(name: &str) -> String {
    Command::new("docker")
        .args(["logs", name])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default()
}

/// The vendor API stub: in the demo on loopback, or a container.
enum Api {
    Local(ApiStub),
    Container(DockerNames),
}

impl Api {
    /// Whose key each call carried, in order.
    fn calls(&self) -> Vec<String> {
        match self {
            Api::Local(stub) => stub.calls(),
            Api::Container(names) => stub_logs(&names.stub)
                .lines()
                .filter_map(|l| l.strip_prefix("call: ").map(str::to_owned))
                .collect(),
        }
    }
}

/// The agent: calls the API with the key it finds in its environment,
/// prints the answer, then lingers so that the demo can look at it.
fn agent_script(api: &str) -> String {
    format!(
        "# {MARKER}\n\
         import os, time, urllib.request, urllib.error\n\
         req = urllib.request.Request('http://{api}/v1/whoami', headers={{'Authorization': 'Bearer ' + os.environ.get('{KEY}', '')}})\n\
         try:\n    print('vendor API says:', urllib.request.urlopen(req, timeout=10).read().decode())\n\
         except urllib.error.HTTPError as e:\n    print('vendor API refused:', e.code)\n\
         print('{KEY} is ' + ('set' if os.environ.get('{KEY}') else 'missing'))\n\
         time.sleep(4)\n"
    )
}

/// PIDs of live agent processes of this scenario.
fn agent_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            cmd.windows(MARKER.len())
                .any(|w| w == MARKER.as_bytes())
                .then_some(pid)
        })
        .collect()
}

pub async fn sandbox_credentials(
    stage: &mut Stage,
    story: &mut Story,
    chosen: &Chosen,
) -> anyhow::Result<()> {
    story.chapter(
        "Sandbox and scoped credentials (companion example 39)",
        "Each tenant's agent runs in a sandbox that alone receives that tenant's key, and\n\
         calls a third-party API with it; the worker host never holds the key.",
    );
    if !worker_has_sandbox_mode() {
        story.say(
            "SKIPPED: this build's bulkhead-worker has no sandbox mode (--sandbox-runner), \
             so runs cannot reach a sandbox",
        );
        return Ok(());
    }
    story.say(format!(
        "sandbox backend: {} ({})",
        match chosen.backend {
            Backend::Docker => "docker",
            _ => "process",
        },
        chosen.why
    ));
    let Some(python) = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
    else {
        story.say(
            "SKIPPED: the agent is a python3 script and this host has no python3 \
             (/usr/bin/python3)",
        );
        return Ok(());
    };

    story.step("Each tenant's vendor key is sealed; the vendor API knows only their hashes");
    let tenants = [CLINIC, FINTECH];
    let mut canaries = Vec::new();
    let mut issued = HashMap::new();
    for t in tenants {
        let canary = Canary::new(format!("{t}/{PROFILE} {KEY}"));
        let keys = stage
            .profile(
                t,
                PROFILE,
                "the tenant's vendor account",
                &[(KEY, &canary.value)],
            )
            .await?;
        let k = keys.first().context("no key written")?;
        issued.insert(Sha256::digest(canary.value.as_bytes()).into(), t.to_owned());
        story.say(format!(
            "{:<21} {KEY} v{}  fingerprint {}…",
            format!("{t}/{PROFILE}"),
            k.version,
            k.fingerprint.get(..16).unwrap_or(&k.fingerprint)
        ));
        canaries.push(canary);
    }

    let (api, api_addr, image) = match &chosen.docker {
        None => {
            let stub = ApiStub::start(issued).await?;
            story.say(format!(
                "the vendor API stub listens on {} (in the demo)",
                stub.addr
            ));
            let addr = stub.addr.clone();
            (Api::Local(stub), addr, python.to_owned())
        }
        Some(names) => {
            story.step("The vendor API on a Docker network of its own");
            let exe = std::path::PathBuf::from(python);
            let built = tokio::task::spawn_blocking(move || docker::ensure_image(&exe))
                .await
                .context("the image build panicked")??;
            story.say(format!(
                "image {} {}: this host's python3, its standard library and the \
                 libraries ldd names (no registry)",
                docker::IMAGE,
                if built { "built" } else { "cached" }
            ));
            let started = start_stub_container(names, &issued).await;
            story.say(format!(
                "docker network {} (internal: no route out; removed at the end)",
                names.network
            ));
            started?;
            let addr = format!("{}:{STUB_PORT}", names.stub);
            story.say(format!(
                "the vendor API stub runs in container {} on it, at http://{addr}, \
                 knowing only the SHA-256 of each key",
                names.stub
            ));
            story.say(format!(
                "the sandbox-runner's allow-list: {CLINIC} and {FINTECH} sandboxes may join {}; \
                 image {} only",
                names.network,
                docker::IMAGE
            ));
            (
                Api::Container(names.clone()),
                addr,
                docker::IMAGE.to_owned(),
            )
        }
    };
    let command = match chosen.docker {
        None => python.to_owned(),
        Some(_) => "/usr/bin/python3".to_owned(),
    };
    stage
        .approved_agent(&AgentSpec {
            name: AGENT,
            version: "1.0.0",
            image: &image,
            command: vec![command, "-c".into(), agent_script(&api_addr)],
            requested_keys: vec![KEY.into()],
            description: "calls the vendor API with the tenant's key",
        })
        .await?;

    let backend = match chosen.backend {
        Backend::Docker => "docker",
        _ => "process",
    };
    let networks: Vec<String> = chosen.docker.iter().map(|n| n.network.clone()).collect();
    story.step(format!(
        "One sandboxed worker per tenant (--sandbox-runner --sandbox-backend {backend}{})",
        networks
            .iter()
            .map(|n| format!(" --sandbox-network {n}"))
            .collect::<String>()
    ));
    let runner = stage.addr("sandbox-runner")?;
    for t in tenants {
        let name = format!("{t}-sbx");
        let w = stage
            .start_worker(WorkerSpec {
                sandbox: Some(&runner),
                sandbox_backend: Some(backend),
                sandbox_networks: &networks,
                ..WorkerSpec::tenant(&name, t, "sandbox=yes")
            })
            .await?;
        story.say(format!(
            "{name:<16} {}",
            stage::short_id(&w.spiffe_id, stage.trust_domain())
        ));
    }

    story.step("Each tenant enqueues a task whose cascade names its vendor profile");
    let mut ids = Vec::new();
    for t in tenants {
        let id = stage
            .dispatcher(&format!("tenant/{t}/client/backend"))?
            .enqueue(pb::EnqueueRequest {
                tenant: t.into(),
                agent: AGENT.into(),
                labels: stage::labels(&[("sandbox", "yes")]),
                cascade: Some(stage::cascade(t, PROFILE)),
                payload: b"{}".to_vec().into(),
                ..Default::default()
            })
            .await
            .context("Enqueue")?
            .into_inner()
            .task_id;
        story.say(format!("{t:<13} {id}"));
        ids.push((t, id));
    }

    // While the agents linger: each key is in its own sandbox and nowhere
    // else among the agents (the positive control of the leak test).
    // The agent's process may be seen before its credentials are delivered
    // (the launch hands them over, then execs the agent): look again until
    // both keys are seen or the agents are gone.
    let mut seen_pids: Vec<u32> = Vec::new();
    let mut in_sandboxes: Vec<(String, String)> = Vec::new();
    for _ in 0..80 {
        let pids = agent_pids();
        for pid in &pids {
            if !seen_pids.contains(pid) {
                seen_pids.push(*pid);
            }
            for c in &canaries {
                let needles = leak::Needles::new(std::iter::once(c));
                let r = leak::scan(
                    &needles,
                    &[leak::Target::Environ {
                        name: format!("agent pid {pid}"),
                        pid: *pid,
                    }],
                );
                let entry = (pid.to_string(), c.label.clone());
                if !r.findings.is_empty() && !in_sandboxes.contains(&entry) {
                    in_sandboxes.push(entry);
                }
            }
        }
        if in_sandboxes.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The engine's view of each running sandbox, taken now: it is gone once
    // the run is released.
    let instance = stage.runner_instance();
    let mut engine_texts = Vec::new();
    let mut engine_seen: Vec<(String, usize)> = Vec::new();
    if chosen.docker.is_some() {
        story.step("The Docker engine's view of each sandbox, taken while it runs");
        let instance = instance
            .as_deref()
            .context("the sandbox-runner wrote no instance id")?;
        story.say(format!(
            "the sandbox-runner labels its containers {}={instance}",
            docker::LABEL_INSTANCE
        ));
        for (id, tenant) in docker::sandboxes(instance)? {
            let Ok(inspect) = docker::docker(&["inspect", &id]) else {
                continue;
            };
            let dir = docker::container_dir(&id)?;
            let (files, count) = docker::read_files(&dir);
            story.say(format!(
                "{tenant:<13} sandbox {}: docker inspect ({} bytes), {count} files \
                 ({} bytes) of the daemon's containers/{}/",
                short(&id),
                inspect.len(),
                files.len(),
                short(&id)
            ));
            engine_texts.push(leak::Target::Text {
                name: format!("docker inspect of {tenant}'s sandbox"),
                text: inspect,
            });
            engine_texts.push(leak::Target::Text {
                name: format!("daemon's files of {tenant}'s sandbox"),
                text: files,
            });
            engine_seen.push((tenant, count));
        }
    }
    // Worker memory, scanned while the runs are live.
    let mut live_targets = Vec::new();
    for w in stage.workers() {
        if let Some(pid) = w.pid() {
            live_targets.push(leak::Target::Memory {
                name: format!("worker {} memory (runs live)", w.name),
                pid,
            });
        }
    }
    let live = leak::scan(&leak::Needles::new(&canaries), &live_targets);

    story.step("What each sandbox got back from the vendor API");
    let mut op = stage.dispatcher(OPERATOR)?;
    let mut runs = Vec::new();
    for (t, id) in &ids {
        let task = stage.wait_final(&mut op, t, id).await?;
        let out = task.output_summary.trim_end().to_owned();
        for line in out.lines() {
            story.say(format!("{t:<13} {line}"));
        }
        story.check(
            format!("{t}'s sandbox called the vendor API with {t}'s own key"),
            task.status() == pb::TaskStatus::Succeeded
                && out.contains(&format!("\"tenant\":\"{t}\"")),
            format!("{:?}: {out:?}", task.status()),
        );
        runs.push((*t, task.run_id.clone()));
    }
    if let (Some(_), Some(instance)) = (&chosen.docker, &instance) {
        // Released at the end of each run: the runner removed its container.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut left = docker::sandboxes(instance)?;
        while !left.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            left = docker::sandboxes(instance)?;
        }
        story.check(
            "after release no sandbox container is left",
            left.is_empty(),
            format!("{left:?}"),
        );
    }
    // The engine copies a container's output to its log asynchronously: on a
    // busy host the stub's lines can show a moment after the answers did.
    let mut calls = api.calls();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while calls.len() < tenants.len() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        calls = api.calls();
    }
    story.say(format!("the vendor API saw calls from: {calls:?}"));
    story.check(
        "the vendor API was called once with each tenant's key, never with another",
        calls.len() == 2 && tenants.iter().all(|t| calls.iter().any(|c| c == t)),
        format!("{calls:?}"),
    );
    story.say(format!(
        "agent processes seen: {}; keys found in their environments: {in_sandboxes:?}",
        seen_pids.len()
    ));
    story.check(
        "positive control: each key was in exactly one sandbox, its own tenant's",
        in_sandboxes.len() == 2 && in_sandboxes[0].0 != in_sandboxes[1].0 && {
            let labels: Vec<&str> = in_sandboxes.iter().map(|(_, l)| l.as_str()).collect();
            canaries.iter().all(|c| labels.contains(&c.label.as_str()))
        },
        "the scan did not see each key in its own sandbox",
    );

    story.step("The boundary events of each run, from the audit log");
    for (t, run) in &runs {
        let mut found = Vec::new();
        for kind in [
            "sealed.credential.resolved",
            "sandbox.credential.injected",
            "sandbox.scrubbed",
        ] {
            let e = stage.audit_event(kind, |e| e.run_id == *run).await?;
            if let Some(e) = &e {
                story.say(format!(
                    "{t:<13} #{:<4} {kind:<28} {}",
                    e.sequence,
                    ["keys", "key", "fingerprints", "sandbox_id"]
                        .iter()
                        .map(|k| (k, attr(e, k)))
                        .filter(|(_, v)| !v.is_empty())
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
            found.push(e.is_some());
        }
        story.check(
            format!("{t}: resolved, injected and scrubbed are audited for its run"),
            found.iter().all(|f| *f),
            format!("{found:?}"),
        );
    }

    story.step("The credential-leak smoke test");
    for f in &live.findings {
        story.say(format!("LEAK while running: {} in {}", f.canary, f.target));
    }
    story.check(
        "no key in the workers' memory while their runs were live",
        live.findings.is_empty() && live.bytes() > 0,
        format!(
            "{} findings, {} bytes read",
            live.findings.len(),
            live.bytes()
        ),
    );
    let mut targets = Vec::new();
    for w in stage.workers() {
        if let Some(pid) = w.pid() {
            targets.push(leak::Target::Memory {
                name: format!("worker {} memory", w.name),
                pid,
            });
            targets.push(leak::Target::Environ {
                name: format!("worker {} environ", w.name),
                pid,
            });
        }
    }
    targets.extend(fleet::service_targets(stage, &["dispatcher"]));
    targets.extend(fleet::common_targets(stage).await?);
    if let Some(names) = &chosen.docker {
        let engine_ok = engine_seen.len() == 2
            && tenants
                .iter()
                .all(|t| engine_seen.iter().any(|(s, n)| s == t && *n >= 2));
        story.check(
            "the engine's view of both sandboxes was read while they ran \
             (docker inspect, config.v2.json, hostconfig.json)",
            engine_ok,
            format!("(tenant, daemon files read): {engine_seen:?}"),
        );
        targets.append(&mut engine_texts);
        if let Ok(inspect) = docker::docker(&["inspect", &names.stub]) {
            targets.push(leak::Target::Text {
                name: "docker inspect of the vendor API stub".into(),
                text: inspect,
            });
        }
    }
    let ok = fleet::scan_with_control(story, &canaries, &targets)?;
    story.check(
        "zero leaks: the keys reached their sandboxes and nothing else",
        ok,
        "see the findings above",
    );
    stage.stop_workers().await;
    match api {
        Api::Local(stub) => drop(stub),
        Api::Container(names) => {
            let container = docker::remove_container(&names.stub);
            let network = docker::remove_network(&names.network);
            let gone = !docker::exists("container", &names.stub)
                && !docker::exists("network", &names.network);
            story.say(format!(
                "removed container {} and network {}",
                names.stub, names.network
            ));
            story.check(
                "the walkthrough's container and network are gone",
                container && network && gone,
                format!("container removed: {container}, network removed: {network}"),
            );
        }
    }
    Ok(())
}
