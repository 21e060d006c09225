//! Sandbox and scoped credentials (companion example 39): two tenants'
//! agents run in sandboxes of the host's sandbox-runner; each calls a
//! third-party API stub with its own key, which the runner resolved at
//! sealed-vault and delivered into that sandbox only. Then the
//! credential-leak smoke test: the keys in no worker, the dispatcher, a
//! log, the audit log or a file — and, as the positive control, each key in
//! its own sandbox's environment and not in the other's.

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
}

impl Chosen {
    /// Removes what the sandbox scenario made outside the mesh directory
    /// (nothing: the stub lives in the demo process, sandboxes are released
    /// by the runner).
    pub fn cleanup(&self) {}
}

fn docker_answers() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why Docker sandboxes cannot take part yet: the worker asks the runner
/// for network mode NONE for every sandbox, so none can reach the API stub.
const DOCKER_BLOCKED: &str = "the worker starts every sandbox with network mode NONE \
     (it has no way yet to name a Docker network for an agent), so a Docker sandbox \
     could not reach the third-party API stub";

/// The process backend, saying why; Docker is refused until the worker can
/// attach a sandbox to a network.
pub fn choose_backend(asked: Backend) -> anyhow::Result<Chosen> {
    Ok(match asked {
        Backend::Docker => anyhow::bail!("--backend docker: {DOCKER_BLOCKED}"),
        Backend::Process => Chosen {
            backend: Backend::Process,
            why: "asked for with --backend process".into(),
        },
        Backend::Auto if docker_answers() => Chosen {
            backend: Backend::Process,
            why: format!("the Docker engine answers, but {DOCKER_BLOCKED}"),
        },
        Backend::Auto => Chosen {
            backend: Backend::Process,
            why: "the Docker engine does not answer".into(),
        },
    })
}

/// The sandbox-runner's settings for the demo: the local mesh's defaults
/// (its process backend runs the usual shells and interpreters).
pub fn runner_config(_chosen: &Chosen) -> toml::Table {
    toml::Table::new()
}

/// Whether this build's worker can hand runs to a sandbox-runner.
fn worker_has_sandbox_mode() -> bool {
    bulkhead_cluster::find_binary("worker", None)
        .ok()
        .and_then(|exe| Command::new(exe).arg("--help").output().ok())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains("--sandbox-runner"))
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
    let api = ApiStub::start(issued).await?;
    story.say(format!("the vendor API stub listens on {}", api.addr));

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
    stage
        .approved_agent(&AgentSpec {
            name: AGENT,
            version: "1.0.0",
            image: python,
            command: vec![python.into(), "-c".into(), agent_script(&api.addr)],
            requested_keys: vec![KEY.into()],
            description: "calls the vendor API with the tenant's key",
        })
        .await?;

    story.step("One sandboxed worker per tenant (--sandbox-runner: runs go to sandboxes)");
    let runner = stage.addr("sandbox-runner")?;
    for t in tenants {
        let name = format!("{t}-sbx");
        let w = stage
            .start_worker(WorkerSpec {
                sandbox: Some(&runner),
                sandbox_backend: Some("process"),
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
    let calls = api.calls();
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
    let ok = fleet::scan_with_control(story, &canaries, &targets)?;
    story.check(
        "zero leaks: the keys reached their sandboxes and nothing else",
        ok,
        "see the findings above",
    );
    drop(api);
    stage.stop_workers().await;
    Ok(())
}
