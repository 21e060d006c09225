//! The fleet end to end (DESIGN.md, "One run, end to end", and guarantee 2):
//! the real dispatcher, identity and audit binaries, real `bulkhead-worker`
//! processes enrolled with join tokens, and tests acting as workers
//! themselves with issued worker certificates where the protocol must be
//! driven step by step (stale reports, dropped claim streams, cross-tenant
//! claims).
//!
//! Every test asserts what a user depends on: which worker ran a task (one
//! of its own tenant, with the labels it needs), the refusal code, the record
//! in the audit log, the run identity revoked, the child process gone — and
//! the absence of what must not happen (a task taken by the wrong worker, a
//! task run twice, a refused report that changed anything).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use bulkhead_mesh::client::MeshChannel;
use bulkhead_proto::audit::v1 as audit_pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::claim_request::Body as Up;
use bulkhead_proto::dispatcher::v1::claim_response::Body as Down;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_proto::identity::v1 as idpb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sandbox::v1::SandboxBackend;
use bulkhead_testkit::mesh::TestMesh;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rcgen::{CertificateParams, KeyPair};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

type Dispatcher = DispatcherServiceClient<MeshChannel>;

const TD: &str = "spiffe://bulkhead.test";
const OPERATOR: &str = "admin/operator";
/// The second operator: agents are approved by an operator other than the
/// submitter.
const REVIEWER: &str = "admin/bob";
const IMAGE: &str = "registry.example/agent@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// How long a task may take to reach a state the test waits for.
const WAIT: Duration = Duration::from_secs(30);
/// How often waits poll.
const POLL: Duration = Duration::from_millis(50);
/// The short lease of the tests about lapsed leases (MeshSpec.extra).
const LEASE_MS: i64 = 1500;
const HEARTBEAT_MS: i64 = 400;

// ---------------------------------------------------------------------------
// The fleet: a mesh, its workers and the agents' scratch directory

/// A mesh of the real services, the worker processes a test started, and a
/// scratch directory where agents leave their PIDs.
struct Fleet {
    mesh: TestMesh,
    scratch: tempfile::TempDir,
    workers: Vec<WorkerProc>,
}

impl Fleet {
    async fn start() -> anyhow::Result<Self> {
        Self::start_with_lease(None).await
    }

    /// A mesh whose dispatcher leases last `LEASE_MS` (heartbeats every
    /// `HEARTBEAT_MS`, lapses checked every 100 ms).
    async fn start_short_lease() -> anyhow::Result<Self> {
        Self::start_with_lease(Some((LEASE_MS, HEARTBEAT_MS))).await
    }

    async fn start_with_lease(lease: Option<(i64, i64)>) -> anyhow::Result<Self> {
        let mut fleet = toml::Table::new();
        if let Some((lease_ms, heartbeat_ms)) = lease {
            fleet.insert("lease_ms".into(), toml::Value::Integer(lease_ms));
            fleet.insert("heartbeat_ms".into(), toml::Value::Integer(heartbeat_ms));
            fleet.insert("reaper_ms".into(), toml::Value::Integer(100));
        }
        Self::start_with_fleet(fleet).await
    }

    /// A mesh whose dispatcher's `[fleet]` section has these settings (none
    /// if empty).
    async fn start_with_fleet(fleet: toml::Table) -> anyhow::Result<Self> {
        let mesh = TestMesh::start_with(|spec| {
            if !fleet.is_empty() {
                let mut extra = toml::Table::new();
                extra.insert("fleet".into(), toml::Value::Table(fleet));
                spec.extra.insert("dispatcher".into(), extra);
            }
        })
        .await?;
        let scratch = tempfile::Builder::new()
            .prefix("bulkhead-fleet-")
            .tempdir()?;
        std::fs::create_dir_all(scratch.path().join("agents"))?;
        Ok(Self {
            mesh,
            scratch,
            workers: Vec::new(),
        })
    }

    /// Where agents write their PID files.
    fn agents_dir(&self) -> PathBuf {
        self.scratch.path().join("agents")
    }

    fn dispatcher(&self, who: &str) -> anyhow::Result<Dispatcher> {
        Ok(DispatcherServiceClient::new(
            self.mesh.channel("dispatcher", &self.mesh.identity(who)?)?,
        ))
    }

    fn operator(&self) -> anyhow::Result<Dispatcher> {
        self.dispatcher(OPERATOR)
    }

    fn client(&self, tenant: &str) -> anyhow::Result<Dispatcher> {
        self.dispatcher(&format!("tenant/{tenant}/client/backend"))
    }

    fn identity_operator(&self) -> anyhow::Result<IdentityServiceClient<MeshChannel>> {
        Ok(IdentityServiceClient::new(
            self.mesh
                .channel("identity", &self.mesh.identity(OPERATOR)?)?,
        ))
    }

    fn audit(&self) -> anyhow::Result<AuditLog> {
        Ok(AuditLog {
            client: AuditServiceClient::new(
                self.mesh.channel("audit", &self.mesh.identity(OPERATOR)?)?,
            ),
        })
    }

    /// Every service's log tail and every worker's, for a failure message.
    fn logs(&self) -> String {
        let mut out = self.mesh.logs();
        for w in &self.workers {
            out.push_str(&format!("\n--- worker {} ---\n{}", w.name, w.log_tail(30)));
        }
        out
    }

    /// Submits an agent version as the mesh's operator and has the second
    /// operator approve it.
    async fn approved_agent(&self, name: &str, command: &[&str]) -> anyhow::Result<()> {
        self.operator()?
            .submit_agent(pb::SubmitAgentRequest {
                name: name.into(),
                version: "1.0.0".into(),
                image: IMAGE.into(),
                command: command.iter().map(|s| (*s).to_owned()).collect(),
                description: "fleet test agent".into(),
                ..Default::default()
            })
            .await
            .context("submit agent")?;
        let approved = self
            .dispatcher(REVIEWER)?
            .approve_agent(pb::ApproveAgentRequest {
                name: name.into(),
                version: "1.0.0".into(),
                comment: "reviewed".into(),
            })
            .await
            .context("approve agent")?
            .into_inner()
            .agent
            .context("no agent")?;
        ensure!(
            approved.status() == pb::AgentStatus::Approved,
            "{approved:?}"
        );
        Ok(())
    }

    /// `echo`: the payload back, then `done`.
    async fn echo_agent(&self) -> anyhow::Result<&'static str> {
        self.approved_agent("echo", &["/bin/sh", "-c", "cat; echo done"])
            .await?;
        Ok("echo")
    }

    /// `sleeper`: reads a name from its payload, writes its PID to
    /// `<agents>/<name>.pid`, then sleeps for 30 s.
    async fn sleeper_agent(&self) -> anyhow::Result<&'static str> {
        let script = format!(
            "read name; echo $$ > {}/$name.pid; exec sleep 30",
            self.agents_dir().display()
        );
        self.approved_agent("sleeper", &["/bin/sh", "-c", &script])
            .await?;
        Ok("sleeper")
    }

    /// `first-hangs`: the first attempt of a task (by the name in its payload)
    /// writes its PID and sleeps for 30 s; any later attempt prints
    /// `finished <name>` and exits 0.
    async fn first_hangs_agent(&self) -> anyhow::Result<&'static str> {
        let dir = self.agents_dir().display().to_string();
        let script = format!(
            "read name; if mkdir {dir}/$name.first 2>/dev/null; then \
             echo $$ > {dir}/$name.pid; exec sleep 30; fi; echo finished $name"
        );
        self.approved_agent("first-hangs", &["/bin/sh", "-c", &script])
            .await?;
        Ok("first-hangs")
    }

    /// The PID an agent wrote for the task named `name`, once it is there.
    async fn agent_pid(&self, name: &str) -> anyhow::Result<i32> {
        let path = self.agents_dir().join(format!("{name}.pid"));
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(pid) = text.trim().parse::<i32>()
            {
                return Ok(pid);
            }
            ensure!(
                Instant::now() < deadline,
                "the agent of {name} never started\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// A join token for a tenant (or, with `tenant` empty, a pool).
    async fn join_token(&self, tenant: &str, pool: &str) -> anyhow::Result<String> {
        Ok(self
            .identity_operator()?
            .create_join_token(idpb::CreateJoinTokenRequest {
                tenant: tenant.into(),
                pool: pool.into(),
                ttl: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                max_uses: 1,
                description: "fleet test".into(),
            })
            .await?
            .into_inner()
            .token)
    }

    /// Starts a real `bulkhead-worker` for a tenant (or a pool, with `tenant`
    /// empty) and waits until the dispatcher lists it connected. Returns its
    /// worker id.
    async fn start_worker(
        &mut self,
        tenant: &str,
        pool: &str,
        name: &str,
        labels: &str,
    ) -> anyhow::Result<String> {
        self.spawn_worker(tenant, pool, name, labels).await?;
        self.wait_connected(name).await
    }

    /// Starts a real `bulkhead-worker` without waiting for it.
    async fn spawn_worker(
        &mut self,
        tenant: &str,
        pool: &str,
        name: &str,
        labels: &str,
    ) -> anyhow::Result<()> {
        let token = self.join_token(tenant, pool).await?;
        let exe = bulkhead_cluster::find_binary("worker", None)?;
        let dir = self.scratch.path().join("workers").join(name);
        std::fs::create_dir_all(dir.join("state"))?;
        std::fs::create_dir_all(dir.join("runs"))?;
        let log = dir.join("worker.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = tokio::process::Command::new(exe)
            .arg("--dispatcher")
            .arg(self.mesh.addr("dispatcher")?)
            .arg("--identity")
            .arg(self.mesh.addr("identity")?)
            .arg("--ca")
            .arg(&self.mesh.mesh.endpoints.ca)
            .arg("--name")
            .arg(name)
            .arg("--labels")
            .arg(labels)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--work-dir")
            .arg(dir.join("runs"))
            .arg("--shutdown-grace-secs")
            .arg("1")
            .arg("--log-format")
            .arg("json")
            // A credential: in the environment, not on the command line.
            .env("BULKHEAD_JOIN_TOKEN", token)
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .context("start bulkhead-worker")?;
        self.workers.push(WorkerProc {
            name: name.to_owned(),
            child,
            log,
        });
        Ok(())
    }

    fn worker(&mut self, name: &str) -> anyhow::Result<&mut WorkerProc> {
        self.workers
            .iter_mut()
            .find(|w| w.name == name)
            .with_context(|| format!("no worker {name}"))
    }

    /// Waits until the dispatcher lists the worker named `name` (its id is
    /// `<name>-<suffix>`) as connected.
    async fn wait_connected(&mut self, name: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + WAIT;
        let mut op = self.operator()?;
        loop {
            let workers = list_workers(&mut op, "", "").await?;
            if let Some(w) = workers.iter().find(|w| {
                worker_named(&w.worker_id, name) && w.state() == pb::WorkerState::Connected
            }) {
                return Ok(w.worker_id.clone());
            }
            if let Some(status) = self.worker(name)?.child.try_wait()? {
                anyhow::bail!(
                    "worker {name} exited ({status}) before connecting\n{}",
                    self.logs()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "worker {name} never connected\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls GetTask until `done` holds for the task.
    async fn wait_task(
        &self,
        client: &mut Dispatcher,
        tenant: &str,
        task_id: &str,
        what: &str,
        done: impl Fn(&pb::Task) -> bool,
    ) -> anyhow::Result<pb::Task> {
        let deadline = Instant::now() + WAIT;
        loop {
            let task = get_task(client, tenant, task_id).await?;
            if done(&task) {
                return Ok(task);
            }
            ensure!(
                Instant::now() < deadline,
                "task {task_id} never became {what}; last: {task:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_succeeded(
        &self,
        client: &mut Dispatcher,
        tenant: &str,
        task_id: &str,
    ) -> anyhow::Result<pb::Task> {
        self.wait_task(client, tenant, task_id, "succeeded", |t| {
            is_final(t.status())
        })
        .await
        .and_then(|t| {
            ensure!(
                t.status() == pb::TaskStatus::Succeeded,
                "task {task_id} ended {:?}, not SUCCEEDED: {t:?}\n{}",
                t.status(),
                self.logs()
            );
            Ok(t)
        })
    }
}

impl Drop for Fleet {
    /// Agents left sleeping by a worker that was killed (or by a failed
    /// test) are killed by the PID they wrote, if that PID is still a sleep.
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.agents_dir()) else {
            return;
        };
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "pid")
                && let Ok(text) = std::fs::read_to_string(e.path())
                && let Ok(pid) = text.trim().parse::<i32>()
                && is_sleeping_agent(pid)
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Whether `pid` is alive and is an agent's `sleep` (not a recycled PID).
fn is_sleeping_agent(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.starts_with(b"sleep\0") || c.windows(6).any(|w| w == b"sleep\0"))
        && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Whether the process `pid` is gone (or a zombie nobody reaped yet).
fn process_gone(pid: i32) -> bool {
    matches!(
        kill(Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    ) || is_zombie(pid)
}

/// One `bulkhead-worker` process.
struct WorkerProc {
    name: String,
    child: tokio::process::Child,
    log: PathBuf,
}

impl WorkerProc {
    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGKILL, by its PID, as a crash of the host would.
    fn kill_hard(&mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("the worker has exited already")?;
        kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGKILL)?;
        Ok(())
    }
}

fn is_final(s: pb::TaskStatus) -> bool {
    matches!(
        s,
        pb::TaskStatus::Succeeded | pb::TaskStatus::Failed | pb::TaskStatus::Cancelled
    )
}

fn worker_named(worker_id: &str, name: &str) -> bool {
    worker_id
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|suffix| suffix.bytes().all(|b| b.is_ascii_hexdigit()))
}

// ---------------------------------------------------------------------------
// Requests

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn enqueue_req(
    tenant: &str,
    agent: &str,
    payload: &str,
    task_labels: &[(&str, &str)],
) -> pb::EnqueueRequest {
    pb::EnqueueRequest {
        tenant: tenant.into(),
        agent: agent.into(),
        labels: labels(task_labels),
        payload: payload.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

async fn enqueue(client: &mut Dispatcher, req: pb::EnqueueRequest) -> anyhow::Result<String> {
    let what = format!("enqueue for {:?}/{:?}", req.tenant, req.pool);
    let resp = client.enqueue(req).await.context(what)?.into_inner();
    ensure!(!resp.task_id.is_empty(), "no task id: {resp:?}");
    Ok(resp.task_id)
}

async fn get_task(
    client: &mut Dispatcher,
    tenant: &str,
    task_id: &str,
) -> anyhow::Result<pb::Task> {
    client
        .get_task(pb::GetTaskRequest {
            tenant: tenant.into(),
            task_id: task_id.into(),
        })
        .await
        .with_context(|| format!("get task {task_id}"))?
        .into_inner()
        .task
        .context("GetTask answered without a task")
}

async fn list_workers(
    client: &mut Dispatcher,
    tenant: &str,
    pool: &str,
) -> anyhow::Result<Vec<pb::Worker>> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..100 {
        let page = client
            .list_workers(pb::ListWorkersRequest {
                tenant: tenant.into(),
                pool: pool.into(),
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(page.workers);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
    anyhow::bail!("ListWorkers paged for ever")
}

async fn list_tasks(client: &mut Dispatcher, tenant: &str) -> anyhow::Result<Vec<pb::Task>> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..100 {
        let page = client
            .list_tasks(pb::ListTasksRequest {
                tenant: tenant.into(),
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(page.tasks);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
    anyhow::bail!("ListTasks paged for ever")
}

/// The error of `r`, which must be a refusal with `code`.
fn refused<T: std::fmt::Debug>(
    r: Result<T, Status>,
    code: Code,
    what: &str,
) -> anyhow::Result<Status> {
    match r {
        Ok(v) => anyhow::bail!("{what}: expected {code:?}, but it succeeded: {v:?}"),
        Err(s) => {
            ensure!(s.code() == code, "{what}: expected {code:?}, got {s:?}");
            Ok(s)
        }
    }
}

/// A P-256 key and a CSR for it, as a worker makes for a run.
fn run_csr() -> anyhow::Result<Vec<u8>> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    Ok(CertificateParams::default()
        .serialize_request(&key)?
        .der()
        .to_vec())
}

async fn revocations(
    identity: &mut IdentityServiceClient<MeshChannel>,
    tenant: &str,
) -> anyhow::Result<Vec<idpb::Revocation>> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..100 {
        let page = identity
            .list_revocations(idpb::ListRevocationsRequest {
                tenant: tenant.into(),
                page_size: 1000,
                page_token: token,
            })
            .await?
            .into_inner();
        out.extend(page.revocations);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
    anyhow::bail!("ListRevocations paged for ever")
}

fn revoked_run(r: &idpb::Revocation) -> Option<&str> {
    match &r.target {
        Some(idpb::revocation::Target::RunId(id)) => Some(id),
        _ => None,
    }
}

fn revoked_worker(r: &idpb::Revocation) -> Option<&str> {
    match &r.target {
        Some(idpb::revocation::Target::WorkerId(id)) => Some(id),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// The audit log, read as an operator

struct AuditLog {
    client: AuditServiceClient<MeshChannel>,
}

impl AuditLog {
    /// Every event whose type starts with `prefix`, every tenant.
    async fn events(&mut self, prefix: &str) -> anyhow::Result<Vec<audit_pb::Event>> {
        let mut out = Vec::new();
        let mut after = 0;
        for _ in 0..1000 {
            let page = self
                .client
                .query(audit_pb::QueryRequest {
                    type_prefix: prefix.into(),
                    after_sequence: after,
                    limit: 1000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            out.extend(page.events);
            if page.next_after_sequence == 0 {
                return Ok(out);
            }
            after = page.next_after_sequence;
        }
        anyhow::bail!("the audit log paged for ever")
    }

    /// Events of exactly this type about this task.
    async fn of_task(&mut self, kind: &str, task_id: &str) -> anyhow::Result<Vec<audit_pb::Event>> {
        Ok(self
            .events(kind)
            .await?
            .into_iter()
            .filter(|e| e.r#type == kind && attr(e, "task_id") == task_id)
            .collect())
    }

    /// Waits for an event of type `kind` matching `pred`: refusals at the
    /// authorization layer are recorded in the background, after the reply.
    async fn wait_for(
        &mut self,
        kind: &str,
        pred: impl Fn(&audit_pb::Event) -> bool,
    ) -> anyhow::Result<audit_pb::Event> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self
                .events(kind)
                .await?
                .into_iter()
                .find(|e| e.r#type == kind && pred(e))
            {
                return Ok(e);
            }
            ensure!(
                Instant::now() < deadline,
                "no audit record {kind} as expected"
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

fn attr<'a>(e: &'a audit_pb::Event, key: &str) -> &'a str {
    e.attributes.get(key).map_or("", String::as_str)
}

fn event_ms(e: &audit_pb::Event) -> i64 {
    e.time
        .as_ref()
        .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// A worker driven by the test itself, message by message

/// A worker whose certificate the test issued (spiffe://TD/tenant/<t>/worker/<id>).
struct DirectWorker {
    client: Dispatcher,
}

impl DirectWorker {
    fn new(fleet: &Fleet, tenant: &str, id: &str) -> anyhow::Result<Self> {
        Ok(Self {
            client: fleet.dispatcher(&format!("tenant/{tenant}/worker/{id}"))?,
        })
    }

    async fn register(
        &mut self,
        worker_labels: &[(&str, &str)],
    ) -> Result<pb::RegisterWorkerResponse, Status> {
        self.client
            .register_worker(pb::RegisterWorkerRequest {
                labels: labels(worker_labels),
                max_concurrent_runs: 2,
                sandbox_backends: vec![SandboxBackend::Process as i32],
                version: "fleet-test".into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Opens a claim stream (replacing any previous one).
    async fn open(&mut self) -> anyhow::Result<ClaimStream> {
        let (tx, rx) = mpsc::channel(64);
        let inbound = self
            .client
            .claim(ReceiverStream::new(rx))
            .await
            .context("open a claim stream")?
            .into_inner();
        Ok(ClaimStream {
            tx,
            inbound,
            skipped: Vec::new(),
        })
    }
}

/// One claim stream of a [`DirectWorker`].
struct ClaimStream {
    tx: mpsc::Sender<pb::ClaimRequest>,
    inbound: tonic::Streaming<pb::ClaimResponse>,
    /// Messages passed over while waiting for another kind.
    skipped: Vec<Down>,
}

impl ClaimStream {
    async fn send(&self, body: Up) -> anyhow::Result<()> {
        self.tx
            .send(pb::ClaimRequest { body: Some(body) })
            .await
            .context("the claim stream is closed")
    }

    async fn credits(&self, slots: u32) -> anyhow::Result<()> {
        self.send(Up::Credits(pb::ClaimCredits { slots })).await
    }

    async fn heartbeat(&self, leases: &[(&str, u32, u64)]) -> anyhow::Result<()> {
        self.send(Up::Heartbeat(pb::ClaimHeartbeat {
            leases: leases
                .iter()
                .map(|(task_id, attempt, lease_epoch)| pb::HeldLease {
                    task_id: (*task_id).to_owned(),
                    attempt: *attempt,
                    lease_epoch: *lease_epoch,
                })
                .collect(),
        }))
        .await
    }

    async fn report(
        &self,
        task_id: &str,
        attempt: u32,
        lease_epoch: u64,
        outcome: pb::RunOutcome,
    ) -> anyhow::Result<()> {
        self.send(Up::Report(pb::ClaimReport {
            task_id: task_id.into(),
            attempt,
            lease_epoch,
            outcome: outcome as i32,
            exit_code: 0,
            output_summary: "done by the test".into(),
        }))
        .await
    }

    /// The next message within `within`; `None` if none came.
    async fn next(&mut self, within: Duration) -> anyhow::Result<Option<Down>> {
        match tokio::time::timeout(within, self.inbound.message()).await {
            Err(_) => Ok(None),
            Ok(Ok(Some(m))) => Ok(Some(m.body.context("a claim message without a body")?)),
            Ok(Ok(None)) => anyhow::bail!("the dispatcher closed the claim stream"),
            Ok(Err(s)) => anyhow::bail!("the claim stream failed: {s:?}"),
        }
    }

    /// Waits for a message `pick` accepts, passing over others.
    async fn expect<T>(
        &mut self,
        what: &str,
        pick: impl Fn(&Down) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(msg) = self.next(left).await? else {
                anyhow::bail!(
                    "no {what} on the claim stream; passed over {:?}",
                    self.skipped
                );
            };
            if let Some(v) = pick(&msg) {
                return Ok(v);
            }
            self.skipped.push(msg);
        }
    }

    async fn assignment(&mut self) -> anyhow::Result<pb::ClaimAssignment> {
        self.expect("assignment", |m| match m {
            Down::Assignment(a) => Some(a.clone()),
            _ => None,
        })
        .await
    }

    async fn run_svid(&mut self) -> anyhow::Result<pb::ClaimRunSvid> {
        self.expect("run svid", |m| match m {
            Down::RunSvid(s) => Some(s.clone()),
            _ => None,
        })
        .await
    }

    async fn ack(&mut self, task_id: &str) -> anyhow::Result<pb::ClaimReportAck> {
        self.expect("report ack", |m| match m {
            Down::ReportAck(a) if a.task_id == task_id => Some(a.clone()),
            _ => None,
        })
        .await
    }

    /// Accepts an assignment with a fresh CSR and waits for the run's SVID.
    async fn accept(&mut self, a: &pb::ClaimAssignment) -> anyhow::Result<pb::ClaimRunSvid> {
        let task_id = a
            .task
            .as_ref()
            .context("assignment without a task")?
            .task_id
            .clone();
        self.send(Up::Accept(pb::ClaimAccept {
            task_id,
            attempt: a.attempt,
            lease_epoch: a.lease_epoch,
            run_csr_der: run_csr()?.into(),
        }))
        .await?;
        self.run_svid().await
    }
}

/// Sends heartbeats for `leases` every `HEARTBEAT_MS` on `tx` until dropped.
struct KeepAlive(tokio::task::JoinHandle<()>);

impl KeepAlive {
    fn start(tx: mpsc::Sender<pb::ClaimRequest>, leases: Vec<(String, u32, u64)>) -> Self {
        Self(tokio::spawn(async move {
            // Bounded: at most ten minutes of heartbeats, though every test
            // drops it long before.
            for _ in 0..1500 {
                let hb = pb::ClaimHeartbeat {
                    leases: leases
                        .iter()
                        .map(|(task_id, attempt, lease_epoch)| pb::HeldLease {
                            task_id: task_id.clone(),
                            attempt: *attempt,
                            lease_epoch: *lease_epoch,
                        })
                        .collect(),
                };
                if tx
                    .send(pb::ClaimRequest {
                        body: Some(Up::Heartbeat(hb)),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(HEARTBEAT_MS as u64)).await;
            }
        }))
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn task_of(a: &pb::ClaimAssignment) -> anyhow::Result<&pb::Task> {
    a.task.as_ref().context("assignment without a task")
}

// ---------------------------------------------------------------------------
// 1. The walkthrough

/// One task of the walkthrough.
struct Planned {
    tenant: &'static str,
    pool: &'static str,
    payload: &'static str,
    labels: &'static [(&'static str, &'static str)],
    /// The worker that must run it, where only one may.
    only: Option<&'static str>,
}

impl Planned {
    fn tenant(
        tenant: &'static str,
        payload: &'static str,
        labels: &'static [(&'static str, &'static str)],
        only: Option<&'static str>,
    ) -> Self {
        Self {
            tenant,
            pool: "",
            payload,
            labels,
            only,
        }
    }
}

/// Three tenants, five workers (two of acme with different labels, one each
/// of globex and initech, one of the org-global pool `shared`), six tasks:
/// every task succeeds on a worker of its own tenant (or pool) whose labels
/// it needs, with its payload on the agent's stdin and one run identity per
/// attempt. A globex worker claiming an acme task, and a globex backend
/// naming acme, are refused with PERMISSION_DENIED and audited as
/// `fleet.cross_tenant_refused`, and the refused claim took nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_runs_on_a_worker_of_its_own_tenant_with_the_labels_it_needs()
-> anyhow::Result<()> {
    let mut fleet = Fleet::start().await?;
    let agent = fleet.echo_agent().await?;

    let mut ids = BTreeMap::new();
    for (name, tenant, pool, worker_labels) in [
        ("acme-gpu", "acme", "", "gpu=a100,zone=eu-1"),
        ("acme-cpu", "acme", "", "arch=x86,zone=eu-1"),
        ("globex-1", "globex", "", "region=eu"),
        ("initech-1", "initech", "", ""),
        ("shared-1", "", "shared", "kind=batch"),
    ] {
        let id = fleet
            .start_worker(tenant, pool, name, worker_labels)
            .await?;
        ids.insert(name, id);
    }

    let plan = [
        Planned::tenant(
            "acme",
            "acme needs a gpu",
            &[("gpu", "a100")],
            Some("acme-gpu"),
        ),
        Planned::tenant(
            "acme",
            "acme needs x86",
            &[("arch", "x86")],
            Some("acme-cpu"),
        ),
        Planned::tenant(
            "acme",
            "acme runs anywhere of its own",
            &[("zone", "eu-1")],
            None,
        ),
        Planned::tenant(
            "globex",
            "globex in the eu",
            &[("region", "eu")],
            Some("globex-1"),
        ),
        Planned::tenant("initech", "initech plain", &[], Some("initech-1")),
        Planned {
            tenant: "",
            pool: "shared",
            payload: "an org-global batch job",
            labels: &[("kind", "batch")],
            only: Some("shared-1"),
        },
    ];
    let mut op = fleet.operator()?;
    let mut tasks = Vec::new();
    for Planned {
        tenant,
        pool,
        payload,
        labels: task_labels,
        only,
    } in plan
    {
        let mut req = enqueue_req(tenant, agent, payload, task_labels);
        req.pool = pool.into();
        // Tenants enqueue with their own backend's certificate; pool tasks
        // only an operator may enqueue.
        let task_id = if pool.is_empty() {
            enqueue(&mut fleet.client(tenant)?, req).await?
        } else {
            enqueue(&mut op, req).await?
        };
        tasks.push((tenant, pool, payload, task_labels, only, task_id));
    }

    // The pool task is watched to its end; the others polled.
    let (_, _, _, _, _, pool_task) = &tasks[5];
    let mut watch = op
        .watch_task(pb::WatchTaskRequest {
            tenant: String::new(),
            task_id: pool_task.clone(),
        })
        .await?
        .into_inner();
    let mut seen = Vec::new();
    let watched = tokio::time::timeout(WAIT, async {
        while let Some(m) = watch.message().await? {
            seen.push(m.task.context("watch message without a task")?);
        }
        anyhow::Ok(())
    })
    .await;
    ensure!(
        matches!(watched, Ok(Ok(()))),
        "the watch of the pool task did not end: {watched:?} after {seen:?}\n{}",
        fleet.logs()
    );
    let last = seen.last().context("the watch sent nothing")?;
    ensure!(
        last.status() == pb::TaskStatus::Succeeded,
        "the watch ended on {last:?}"
    );
    ensure!(
        seen.iter()
            .all(|t| t.task_id == *pool_task && t.pool == "shared"),
        "{seen:?}"
    );

    let mut audit = fleet.audit()?;
    let minted = audit.events("identity.run_minted").await?;
    for (tenant, pool, payload, task_labels, only, task_id) in &tasks {
        let mut reader = if pool.is_empty() {
            fleet.client(tenant)?
        } else {
            fleet.operator()?
        };
        let t = fleet.wait_succeeded(&mut reader, tenant, task_id).await?;
        ensure!(t.attempt == 1, "{t:?}");
        ensure!(
            t.output_summary == format!("{payload}done\n"),
            "the agent did not get its payload on stdin: {t:?}"
        );
        // The worker is one of the task's own tenant (or pool), as its
        // tenant's backend (or the operator, for a pool) sees the fleet.
        let own = if pool.is_empty() {
            let own = list_workers(&mut reader, tenant, "").await?;
            ensure!(
                own.iter().all(|w| w.tenant == *tenant && w.pool.is_empty()),
                "{tenant} lists another's workers: {own:?}"
            );
            own
        } else {
            list_workers(&mut op, "", pool).await?
        };
        let w = own
            .iter()
            .find(|w| w.worker_id == t.worker_id)
            .with_context(|| {
                format!(
                    "task {task_id} of {tenant}{pool} ran on {}, not one of {own:?}",
                    t.worker_id
                )
            })?;
        ensure!(w.tenant == *tenant && w.pool == *pool, "{w:?} ran {t:?}");
        for (k, v) in task_labels.iter() {
            ensure!(
                w.labels.get(*k).map(String::as_str) == Some(*v),
                "task {task_id} needs {k}={v}; it ran on {w:?}"
            );
        }
        if let Some(name) = only {
            ensure!(
                t.worker_id == ids[name],
                "{task_id} must run on {name}: {t:?}"
            );
        }
        // Its audit trail: enqueued, claimed with the run's id, minted,
        // completed — each under the task's tenant.
        let enqueued = audit.of_task("task.enqueued", task_id).await?;
        ensure!(
            enqueued.len() == 1 && enqueued[0].tenant == *tenant,
            "{enqueued:?}"
        );
        let claimed = audit.of_task("task.claimed", task_id).await?;
        ensure!(claimed.len() == 1, "one claim of {task_id}: {claimed:?}");
        ensure!(
            claimed[0].run_id == t.run_id
                && attr(&claimed[0], "worker_id") == t.worker_id
                && claimed[0].tenant == *tenant,
            "{claimed:?} vs {t:?}"
        );
        let run_spiffe = if pool.is_empty() {
            format!("{TD}/tenant/{tenant}/run/{}", t.run_id)
        } else {
            format!("{TD}/pool/{pool}/run/{}", t.run_id)
        };
        ensure!(
            minted
                .iter()
                .any(|e| e.run_id == t.run_id && attr(e, "spiffe_id") == run_spiffe),
            "no identity.run_minted for {run_spiffe}"
        );
        let completed = audit.of_task("task.completed", task_id).await?;
        ensure!(
            completed.len() == 1 && attr(&completed[0], "outcome") == "succeeded",
            "{completed:?}"
        );
    }
    let registered = audit.events("worker.registered").await?;
    for id in ids.values() {
        ensure!(
            registered.iter().any(|e| attr(e, "worker_id") == *id),
            "no worker.registered for {id}"
        );
    }

    // A globex worker (the test acting as one) claims an acme task by id.
    // The acme task needs a label no acme worker has, so it stays queued
    // whatever happens elsewhere.
    let mut acme = fleet.client("acme")?;
    let bait = enqueue(
        &mut acme,
        enqueue_req("acme", agent, "not for globex", &[("zone", "mars")]),
    )
    .await?;
    let mut intruder = DirectWorker::new(&fleet, "globex", "gx-direct")?;
    intruder.register(&[("zone", "mars")]).await?;
    let _stream = intruder.open().await?;
    for tenant in ["globex", "acme"] {
        let r = intruder
            .client
            .claim_task(pb::ClaimTaskRequest {
                tenant: tenant.into(),
                task_id: bait.clone(),
                run_csr_der: run_csr()?.into(),
            })
            .await;
        refused(
            r,
            Code::PermissionDenied,
            &format!("globex worker claims an acme task as {tenant:?}"),
        )?;
    }
    audit
        .wait_for("fleet.cross_tenant_refused", |e| {
            attr(e, "task_id") == bait && attr(e, "worker_id") == "gx-direct"
        })
        .await?;
    let still = get_task(&mut acme, "acme", &bait).await?;
    ensure!(
        still.status() == pb::TaskStatus::Queued
            && still.attempt == 0
            && still.worker_id.is_empty(),
        "the refused claim changed the task: {still:?}"
    );
    ensure!(
        audit.of_task("task.claimed", &bait).await?.is_empty(),
        "the refused claim minted a run"
    );

    // The same task is claimable by id by a worker of its own tenant with
    // the label it needs — once that worker holds a claim stream open.
    let mut own = DirectWorker::new(&fleet, "acme", "acme-direct")?;
    own.register(&[("zone", "mars")]).await?;
    let claim_bait = || -> anyhow::Result<pb::ClaimTaskRequest> {
        Ok(pb::ClaimTaskRequest {
            tenant: "acme".into(),
            task_id: bait.clone(),
            run_csr_der: run_csr()?.into(),
        })
    };
    let r = own.client.claim_task(claim_bait()?).await;
    refused(
        r,
        Code::FailedPrecondition,
        "ClaimTask without a claim stream",
    )?;
    let mut own_stream = own.open().await?;
    let claimed = own
        .client
        .claim_task(claim_bait()?)
        .await
        .context("acme claims its own task by id")?
        .into_inner();
    let assignment = claimed.assignment.clone().context("no assignment")?;
    ensure!(
        assignment.attempt == 1
            && claimed
                .run_svid
                .as_ref()
                .is_some_and(|s| s.spiffe_id == format!("{TD}/tenant/acme/run/{}", claimed.run_id)),
        "{claimed:?}"
    );
    own_stream
        .report(
            &bait,
            assignment.attempt,
            assignment.lease_epoch,
            pb::RunOutcome::Succeeded,
        )
        .await?;
    let ack = own_stream.ack(&bait).await?;
    ensure!(ack.accepted, "{ack:?}");
    let t = get_task(&mut acme, "acme", &bait).await?;
    ensure!(
        t.status() == pb::TaskStatus::Succeeded
            && t.worker_id == "acme-direct"
            && t.run_id == claimed.run_id,
        "{t:?}"
    );

    // A globex backend naming acme: refused at the boundary, audited.
    let mut globex = fleet.client("globex")?;
    let acme_task = &tasks[0].5;
    let r = globex
        .get_task(pb::GetTaskRequest {
            tenant: "acme".into(),
            task_id: acme_task.clone(),
        })
        .await;
    refused(r, Code::PermissionDenied, "globex reads an acme task")?;
    let r = globex
        .enqueue(enqueue_req("acme", agent, "from globex", &[]))
        .await;
    refused(r, Code::PermissionDenied, "globex enqueues for acme")?;
    let r = globex
        .cancel_task(pb::CancelTaskRequest {
            tenant: "acme".into(),
            task_id: bait.clone(),
            reason: "not mine".into(),
        })
        .await;
    refused(r, Code::PermissionDenied, "globex cancels an acme task")?;
    let r = globex
        .watch_task(pb::WatchTaskRequest {
            tenant: "acme".into(),
            task_id: acme_task.clone(),
        })
        .await;
    refused(
        r.map(|_| ()),
        Code::PermissionDenied,
        "globex watches an acme task",
    )?;
    let r = globex
        .list_workers(pb::ListWorkersRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await;
    refused(r, Code::PermissionDenied, "globex lists acme's workers")?;
    for method in [
        "GetTask",
        "Enqueue",
        "CancelTask",
        "WatchTask",
        "ListWorkers",
    ] {
        audit
            .wait_for("fleet.cross_tenant_refused", |e| {
                attr(e, "caller") == format!("{TD}/tenant/globex/client/backend")
                    && attr(e, "method").ends_with(method)
            })
            .await
            .with_context(|| format!("the refused {method}"))?;
    }
    // Naming its own tenant, globex does not even learn the task exists.
    let r = globex
        .get_task(pb::GetTaskRequest {
            tenant: "globex".into(),
            task_id: acme_task.clone(),
        })
        .await;
    refused(r, Code::NotFound, "globex reads an acme task as its own")?;
    let acme_tasks = list_tasks(&mut acme, "acme").await?;
    ensure!(
        acme_tasks.len() == 4 && acme_tasks.iter().all(|t| t.tenant == "acme"),
        "the refused enqueue left a task: {acme_tasks:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Labels

/// An acme worker labelled project=p2 gets none of the project=p1 tasks
/// (while it takes a p2 task enqueued after them); it cannot take one by id
/// either (PERMISSION_DENIED, audited), and it cannot pass for another
/// tenant or pool with the reserved labels. Once a p1 worker appears it
/// takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_gets_no_task_whose_labels_it_lacks() -> anyhow::Result<()> {
    let mut fleet = Fleet::start().await?;
    let agent = fleet.echo_agent().await?;
    let p2 = fleet
        .start_worker("acme", "", "acme-p2", "project=p2")
        .await?;
    let mut acme = fleet.client("acme")?;
    let mut p1_tasks = Vec::new();
    for n in 0..2 {
        p1_tasks.push(
            enqueue(
                &mut acme,
                enqueue_req(
                    "acme",
                    agent,
                    &format!("p1 job {n}\n"),
                    &[("project", "p1")],
                ),
            )
            .await?,
        );
    }
    // Enqueued after them, at the same priority: a worker that ignored
    // labels would take the older p1 tasks first.
    let control = enqueue(
        &mut acme,
        enqueue_req("acme", agent, "p2 job\n", &[("project", "p2")]),
    )
    .await?;
    let done = fleet.wait_succeeded(&mut acme, "acme", &control).await?;
    ensure!(done.worker_id == p2, "{done:?}");
    // The p2 worker asks for work again after each run; for a while (many
    // poll rounds of the dispatcher) the p1 tasks stay where they are.
    let watch_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < watch_until {
        for id in &p1_tasks {
            let t = get_task(&mut acme, "acme", id).await?;
            ensure!(
                t.status() == pb::TaskStatus::Queued && t.attempt == 0 && t.worker_id.is_empty(),
                "a p1 task went to a worker without project=p1: {t:?}\n{}",
                fleet.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The test as an acme worker: the reserved labels must name its own
    // tenant or pool.
    let mut liar = DirectWorker::new(&fleet, "acme", "acme-liar")?;
    for (k, v) in [("tenant", "globex"), ("pool", "shared")] {
        let r = liar.register(&[(k, v), ("project", "p1")]).await;
        refused(
            r,
            Code::PermissionDenied,
            &format!("an acme worker registers {k}={v}"),
        )?;
    }
    let mut op = fleet.operator()?;
    ensure!(
        !list_workers(&mut op, "", "")
            .await?
            .iter()
            .any(|w| w.worker_id == "acme-liar"),
        "a refused registration was kept"
    );
    // Registered with p2 (and tenant=acme, which is its own), it cannot
    // claim a p1 task by id.
    liar.register(&[("project", "p2"), ("tenant", "acme")])
        .await?;
    let _stream = liar.open().await?;
    let r = liar
        .client
        .claim_task(pb::ClaimTaskRequest {
            tenant: "acme".into(),
            task_id: p1_tasks[0].clone(),
            run_csr_der: run_csr()?.into(),
        })
        .await;
    refused(r, Code::PermissionDenied, "a p2 worker claims a p1 task")?;
    let mut audit = fleet.audit()?;
    audit
        .wait_for("fleet.claim_refused", |e| {
            attr(e, "task_id") == p1_tasks[0] && attr(e, "worker_id") == "acme-liar"
        })
        .await?;

    // The real worker refuses to start with a reserved label of another
    // tenant, and is never registered.
    fleet
        .spawn_worker("acme", "", "acme-globex", "tenant=globex")
        .await?;
    let exited = tokio::time::timeout(WAIT, fleet.worker("acme-globex")?.child.wait()).await;
    match exited {
        Ok(Ok(status)) => ensure!(!status.success(), "it exited 0"),
        other => anyhow::bail!(
            "a worker labelled tenant=globex with an acme identity kept running: {other:?}\n{}",
            fleet.logs()
        ),
    }
    ensure!(
        !list_workers(&mut op, "", "")
            .await?
            .iter()
            .any(|w| worker_named(&w.worker_id, "acme-globex")),
        "the worker labelled tenant=globex was registered"
    );

    // A worker with the label appears and takes both.
    let p1 = fleet
        .start_worker("acme", "", "acme-p1", "project=p1")
        .await?;
    for id in &p1_tasks {
        let t = fleet.wait_succeeded(&mut acme, "acme", id).await?;
        ensure!(t.worker_id == p1 && t.attempt == 1, "{t:?}");
        let claimed = audit.of_task("task.claimed", id).await?;
        ensure!(
            claimed.len() == 1 && attr(&claimed[0], "worker_id") == p1,
            "{claimed:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Agents and their approval

/// Tasks name only approved agents: a pending or rejected version is refused
/// at enqueue with FAILED_PRECONDITION, an unknown one with NOT_FOUND. The
/// submitter cannot approve (or reject) its own submission; another
/// operator can, and audit says who decided.
/// A worker waiting with free slots is handed new tasks in the Enqueue
/// itself (its answer shows the task assigned), but never more than its free
/// slots, never one its labels lack, and the rest stay queued until it grants
/// more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_worker_is_handed_no_more_than_its_free_slots() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let agent = fleet.echo_agent().await?;
    let mut acme = fleet.client("acme")?;
    let mut w = DirectWorker::new(&fleet, "acme", "acme-burst")?;
    w.register(&[("project", "p1")]).await?;
    let mut s = w.open().await?;
    s.credits(2).await?;
    // One task first, so that the worker has claimed, found the queue empty
    // and waits: the state in which new tasks are handed to it directly.
    let first = enqueue(&mut acme, enqueue_req("acme", agent, "first", &[])).await?;
    let a = s.assignment().await?;
    ensure!(task_of(&a)?.task_id == first, "{a:?}");
    s.report(&first, a.attempt, a.lease_epoch, pb::RunOutcome::Succeeded)
        .await?;
    ensure!(
        s.ack(&first).await?.accepted,
        "the first report was refused"
    );
    // Tasks it may not take stay queued.
    for n in 0..2 {
        let t = acme
            .enqueue(enqueue_req(
                "acme",
                agent,
                &format!("p2 {n}"),
                &[("project", "p2")],
            ))
            .await?
            .into_inner();
        ensure!(
            t.task
                .as_ref()
                .is_some_and(|t| t.status() == pb::TaskStatus::Queued),
            "{t:?}"
        );
    }
    s.credits(1).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // One at a time, four it may take: the first two are handed over in the
    // Enqueue, the other two wait.
    let mut answers = Vec::new();
    for n in 0..4 {
        let t = acme
            .enqueue(enqueue_req(
                "acme",
                agent,
                &format!("p1 {n}"),
                &[("project", "p1")],
            ))
            .await?
            .into_inner()
            .task
            .context("enqueue answered without the task")?;
        answers.push((t.task_id.clone(), t.status(), t.worker_id.clone()));
    }
    let handed: Vec<&String> = answers
        .iter()
        .filter(|(_, status, worker)| {
            *status == pb::TaskStatus::Assigned && worker.starts_with("acme-burst")
        })
        .map(|(id, ..)| id)
        .collect();
    ensure!(
        handed.len() == 2
            && answers[2..]
                .iter()
                .all(|(_, status, _)| *status == pb::TaskStatus::Queued),
        "a worker with 2 free slots: {answers:?}"
    );
    let mut got = Vec::new();
    while let Some(m) = s.next(Duration::from_millis(1_000)).await? {
        if let Down::Assignment(a) = m {
            got.push(task_of(&a)?.task_id.clone());
        }
    }
    ensure!(
        got.iter().collect::<Vec<_>>() == handed,
        "received {got:?}, handed over {handed:?}"
    );

    // A concurrent burst while it has no slot: nothing more arrives.
    let burst = (0..8).map(|n| {
        let mut c = acme.clone();
        async move {
            enqueue(
                &mut c,
                enqueue_req("acme", agent, &format!("burst {n}"), &[("project", "p1")]),
            )
            .await
        }
    });
    futures::future::try_join_all(burst).await?;
    ensure!(
        s.next(Duration::from_millis(1_000))
            .await?
            .is_none_or(|m| !matches!(m, Down::Assignment(_))),
        "a worker without a free slot was handed a task"
    );
    // One more slot: exactly one more task, a p1 one.
    s.credits(1).await?;
    let more = s.assignment().await?;
    ensure!(
        task_of(&more)?.task_id == answers[2].0,
        "the oldest waiting task should come next: {more:?}"
    );
    ensure!(
        s.next(Duration::from_millis(1_000))
            .await?
            .is_none_or(|m| !matches!(m, Down::Assignment(_))),
        "one slot, two tasks"
    );
    let tasks = list_tasks(&mut acme, "acme").await?;
    let queued = tasks
        .iter()
        .filter(|t| t.status() == pb::TaskStatus::Queued)
        .count();
    ensure!(
        queued == 2 + 1 + 8,
        "{queued} tasks queued, expected 11: {tasks:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_agents_approved_by_another_operator_can_be_enqueued() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let mut alice = fleet.operator()?;
    let mut bob = fleet.dispatcher(REVIEWER)?;
    let mut acme = fleet.client("acme")?;
    let submit = |name: &str, version: &str| pb::SubmitAgentRequest {
        name: name.into(),
        version: version.into(),
        image: IMAGE.into(),
        command: vec!["/bin/true".into()],
        description: "reviewer, please look".into(),
        ..Default::default()
    };
    let pending = alice
        .submit_agent(submit("triage", "1.0.0"))
        .await?
        .into_inner()
        .agent
        .context("no agent")?;
    ensure!(
        pending.status() == pb::AgentStatus::Pending
            && pending.submitted_by == format!("{TD}/{OPERATOR}")
            && pending.decided_by.is_empty(),
        "{pending:?}"
    );
    let r = alice.submit_agent(submit("triage", "1.0.0")).await;
    refused(r, Code::AlreadyExists, "the same version again")?;
    let r = acme.submit_agent(submit("sneaky", "1.0.0")).await;
    refused(r, Code::PermissionDenied, "a tenant submits an agent")?;

    // Pending: refused by version and by name.
    let mut by_version = enqueue_req("acme", "triage", "x", &[]);
    by_version.agent_version = "1.0.0".into();
    let r = acme.enqueue(by_version.clone()).await;
    let s = refused(r, Code::FailedPrecondition, "a pending agent")?;
    ensure!(s.message().contains("triage"), "{s:?}");
    let r = acme.enqueue(enqueue_req("acme", "triage", "x", &[])).await;
    refused(r, Code::FailedPrecondition, "a pending agent by name")?;
    // Unknown: not found.
    let r = acme
        .enqueue(enqueue_req("acme", "no-such-agent", "x", &[]))
        .await;
    refused(r, Code::NotFound, "an unknown agent")?;
    let mut unknown_version = enqueue_req("acme", "triage", "x", &[]);
    unknown_version.agent_version = "9.9.9".into();
    let r = acme.enqueue(unknown_version).await;
    refused(r, Code::NotFound, "an unknown version")?;

    // The submitter may not decide.
    let approve = |version: &str| pb::ApproveAgentRequest {
        name: "triage".into(),
        version: version.into(),
        comment: "looks fine".into(),
    };
    let r = alice.approve_agent(approve("1.0.0")).await;
    refused(r, Code::PermissionDenied, "the submitter approves")?;
    let r = alice
        .reject_agent(pb::RejectAgentRequest {
            name: "triage".into(),
            version: "1.0.0".into(),
            reason: "changed my mind".into(),
        })
        .await;
    refused(r, Code::PermissionDenied, "the submitter rejects")?;
    let still = alice
        .list_agents(pb::ListAgentsRequest {
            name: "triage".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .agents;
    ensure!(
        still.len() == 1 && still[0].status() == pb::AgentStatus::Pending,
        "{still:?}"
    );
    let r = acme.enqueue(by_version.clone()).await;
    refused(r, Code::FailedPrecondition, "still pending")?;

    // Another operator rejects 1.0.0: still refused, and it cannot be
    // approved afterwards.
    let rejected = bob
        .reject_agent(pb::RejectAgentRequest {
            name: "triage".into(),
            version: "1.0.0".into(),
            reason: "pulls an unpinned base image".into(),
        })
        .await?
        .into_inner()
        .agent
        .context("no agent")?;
    ensure!(
        rejected.status() == pb::AgentStatus::Rejected
            && rejected.decided_by == format!("{TD}/{REVIEWER}"),
        "{rejected:?}"
    );
    let r = acme.enqueue(by_version.clone()).await;
    refused(r, Code::FailedPrecondition, "a rejected agent")?;
    let r = bob.approve_agent(approve("1.0.0")).await;
    refused(r, Code::FailedPrecondition, "approving a rejected agent")?;

    // 1.0.1, approved by bob: taken, by version and by name.
    alice.submit_agent(submit("triage", "1.0.1")).await?;
    let approved = bob
        .approve_agent(approve("1.0.1"))
        .await?
        .into_inner()
        .agent
        .context("no agent")?;
    ensure!(
        approved.status() == pb::AgentStatus::Approved
            && approved.decided_by == format!("{TD}/{REVIEWER}")
            && approved.submitted_by == format!("{TD}/{OPERATOR}"),
        "{approved:?}"
    );
    let mut ok = by_version.clone();
    ok.agent_version = "1.0.1".into();
    let first = enqueue(&mut acme, ok).await?;
    let resp = acme
        .enqueue(enqueue_req("acme", "triage", "y", &[]))
        .await?
        .into_inner();
    let latest = resp.task.context("no task")?;
    ensure!(latest.agent_version == "1.0.1", "{latest:?}");
    let r = acme.enqueue(by_version).await;
    refused(r, Code::FailedPrecondition, "1.0.0 stays rejected")?;

    // Audit: who submitted, who was refused, who decided.
    let mut audit = fleet.audit()?;
    let submitted = audit.events("agent.submitted").await?;
    for version in ["1.0.0", "1.0.1"] {
        ensure!(
            submitted.iter().any(|e| attr(e, "agent") == "triage"
                && attr(e, "version") == version
                && attr(e, "submitted_by") == format!("{TD}/{OPERATOR}")),
            "no agent.submitted for {version}: {submitted:?}"
        );
    }
    let approvals = audit.events("agent.approved").await?;
    ensure!(
        approvals.iter().any(|e| attr(e, "version") == "1.0.0"
            && e.outcome() == audit_pb::Outcome::Denied
            && attr(e, "decided_by") == format!("{TD}/{OPERATOR}")),
        "the submitter's refused approval is not in audit: {approvals:?}"
    );
    let granted: Vec<_> = approvals
        .iter()
        .filter(|e| e.outcome() == audit_pb::Outcome::Success)
        .collect();
    ensure!(
        granted.len() == 1
            && attr(granted[0], "version") == "1.0.1"
            && attr(granted[0], "decided_by") == format!("{TD}/{REVIEWER}")
            && attr(granted[0], "submitted_by") == format!("{TD}/{OPERATOR}"),
        "{granted:?}"
    );
    let rejections = audit.events("agent.rejected").await?;
    ensure!(
        rejections.iter().any(|e| attr(e, "version") == "1.0.0"
            && e.outcome() == audit_pb::Outcome::Success
            && attr(e, "decided_by") == format!("{TD}/{REVIEWER}")),
        "{rejections:?}"
    );
    // Only the two accepted enqueues happened.
    let enqueued = audit.events("task.enqueued").await?;
    ensure!(
        enqueued.len() == 2 && enqueued.iter().any(|e| attr(e, "task_id") == first),
        "{enqueued:?}"
    );
    ensure!(list_tasks(&mut acme, "acme").await?.len() == 2);
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. A worker killed mid-task

/// Two acme workers; the one running the task is SIGKILLed. After its lease
/// lapses the task goes to the other as attempt 2 under a new lease epoch,
/// and completes exactly once; the first run's identity is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_of_a_killed_worker_is_run_again_by_another_and_completes_once() -> anyhow::Result<()>
{
    let mut fleet = Fleet::start_short_lease().await?;
    let agent = fleet.first_hangs_agent().await?;
    let a = fleet.start_worker("acme", "", "acme-a", "").await?;
    let b = fleet.start_worker("acme", "", "acme-b", "").await?;
    let mut acme = fleet.client("acme")?;
    let task_id = enqueue(&mut acme, enqueue_req("acme", agent, "crash\n", &[])).await?;
    let running = fleet
        .wait_task(&mut acme, "acme", &task_id, "running", |t| {
            t.status() == pb::TaskStatus::Running
        })
        .await?;
    ensure!(running.attempt == 1, "{running:?}");
    let (victim, survivor) = if running.worker_id == a {
        ("acme-a", b)
    } else {
        ensure!(running.worker_id == b, "{running:?}");
        ("acme-b", a)
    };
    // The agent is running (it wrote its PID); the host dies.
    fleet.agent_pid("crash").await?;
    let killed_at = now_ms();
    fleet.worker(victim)?.kill_hard()?;

    let done = fleet.wait_succeeded(&mut acme, "acme", &task_id).await?;
    ensure!(
        done.attempt == 2 && done.worker_id == survivor,
        "attempt 2 must run on the surviving worker: {done:?}"
    );
    ensure!(done.output_summary == "finished crash\n", "{done:?}");
    ensure!(done.run_id != running.run_id, "{done:?}");

    let mut audit = fleet.audit()?;
    let claimed = audit.of_task("task.claimed", &task_id).await?;
    ensure!(claimed.len() == 2, "two runs: {claimed:?}");
    let epoch = |e: &audit_pb::Event| attr(e, "lease_epoch").parse::<u64>().unwrap_or(0);
    ensure!(
        attr(&claimed[0], "attempt") == "1"
            && attr(&claimed[0], "worker_id") == running.worker_id
            && claimed[0].run_id == running.run_id,
        "{claimed:?}"
    );
    ensure!(
        attr(&claimed[1], "attempt") == "2"
            && attr(&claimed[1], "worker_id") == survivor
            && claimed[1].run_id == done.run_id
            && epoch(&claimed[1]) > epoch(&claimed[0]),
        "attempt 2 needs a new lease epoch: {claimed:?}"
    );
    // Not before the lease could have lapsed (the worker's stream closed
    // with the kill, but its lease runs on): the last heartbeat came about
    // one heartbeat interval before the kill; one more is slack.
    let earliest = killed_at + LEASE_MS - 2 * HEARTBEAT_MS;
    ensure!(
        event_ms(&claimed[1]) >= earliest,
        "re-offered {} ms after the kill, before the lease lapsed",
        event_ms(&claimed[1]) - killed_at
    );
    let completed = audit.of_task("task.completed", &task_id).await?;
    ensure!(
        completed.len() == 1
            && attr(&completed[0], "attempt") == "2"
            && attr(&completed[0], "worker_id") == survivor
            && attr(&completed[0], "outcome") == "succeeded",
        "completed exactly once, by attempt 2: {completed:?}"
    );
    let released = audit.of_task("task.lease_released", &task_id).await?;
    ensure!(
        released.iter().any(|e| attr(e, "attempt") == "1"),
        "{released:?}"
    );
    // The first run's identity is revoked.
    audit
        .wait_for("identity.revoked", |e| e.run_id == running.run_id)
        .await?;
    let revoked = revocations(&mut fleet.identity_operator()?, "acme").await?;
    ensure!(
        revoked
            .iter()
            .any(|r| revoked_run(r) == Some(running.run_id.as_str()) && r.hard),
        "run {} not on the revocation list: {revoked:?}",
        running.run_id
    );
    ensure!(
        !revoked
            .iter()
            .any(|r| revoked_run(r) == Some(done.run_id.as_str())),
        "the successful run was revoked before it was released"
    );
    Ok(())
}

/// A worker that was away (stopped, its stream gone with a dispatcher
/// restart) while its lease lapsed comes back still running the lost
/// attempt, which meanwhile ran again elsewhere as attempt 2. Its first
/// heartbeat lists the lost lease; the dispatcher answers with a cancel of
/// that attempt and the real worker stops it: the attempt does not go on
/// running beside its successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_lease_lapsed_while_its_worker_was_away_is_stopped_when_it_returns()
-> anyhow::Result<()> {
    let mut fleet = Fleet::start_short_lease().await?;
    let agent = fleet.first_hangs_agent().await?;
    let w1 = fleet.start_worker("acme", "", "acme-away", "").await?;
    let mut acme = fleet.client("acme")?;
    let task_id = enqueue(&mut acme, enqueue_req("acme", agent, "away\n", &[])).await?;
    let running = fleet
        .wait_task(&mut acme, "acme", &task_id, "running", |t| {
            t.status() == pb::TaskStatus::Running
        })
        .await?;
    ensure!(running.worker_id == w1, "{running:?}");
    let pid = fleet.agent_pid("away").await?;
    let w2 = fleet.start_worker("acme", "", "acme-here", "").await?;

    // The worker host freezes, and the dispatcher restarts meanwhile: the
    // worker's stream is gone and its lease lapses.
    let holder = fleet
        .worker("acme-away")?
        .child
        .id()
        .context("the worker exited")?;
    let holder = Pid::from_raw(i32::try_from(holder)?);
    kill(holder, Signal::SIGSTOP)?;
    let resumed = async {
        let dispatcher = fleet
            .mesh
            .mesh
            .process_mut("dispatcher")
            .context("no dispatcher")?;
        dispatcher.kill().await;
        fleet.mesh.mesh.restart("dispatcher").await?;
        let mut acme = fleet.client("acme")?;
        let t = fleet.wait_succeeded(&mut acme, "acme", &task_id).await?;
        ensure!(t.attempt == 2 && t.worker_id == w2, "{t:?}");
        anyhow::Ok(())
    }
    .await;
    // Thawed whatever happened, so that it can be stopped.
    kill(holder, Signal::SIGCONT)?;
    resumed?;

    // Back, the worker heartbeats the lost lease; the lost attempt must stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !process_gone(pid) {
        ensure!(
            Instant::now() < deadline,
            "attempt 1 (agent pid {pid}) still runs on {w1} after its lease lapsed and \
             attempt 2 finished on {w2}\n{}",
            fleet.logs()
        );
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. A stale report

/// The test as worker A takes an attempt and lets its lease lapse; the task
/// goes to worker B as attempt 2. A's report with its old epoch is refused
/// (STALE_LEASE, audited as task.report_refused) and changes nothing; so is
/// A reporting B's epoch. B's report completes the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_with_a_lapsed_lease_epoch_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let fleet = Fleet::start_short_lease().await?;
    let agent = fleet.echo_agent().await?;
    let mut acme = fleet.client("acme")?;

    let mut a = DirectWorker::new(&fleet, "acme", "acme-late")?;
    let reg = a.register(&[]).await?;
    ensure!(
        reg.lease_duration
            .is_some_and(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000 == LEASE_MS),
        "{reg:?}"
    );
    let mut sa = a.open().await?;
    sa.credits(1).await?;
    let task_id = enqueue(&mut acme, enqueue_req("acme", agent, "stale", &[])).await?;
    let first = sa.assignment().await?;
    ensure!(
        task_of(&first)?.task_id == task_id && first.attempt == 1,
        "{first:?}"
    );
    let svid1 = sa.accept(&first).await?;
    ensure!(
        svid1
            .svid
            .as_ref()
            .is_some_and(|s| s.spiffe_id == format!("{TD}/tenant/acme/run/{}", svid1.run_id)),
        "{svid1:?}"
    );
    // No heartbeat: the lease lapses and the dispatcher says so.
    let cancel = sa
        .expect("lease-expired cancel", |m| match m {
            Down::Cancel(c) if c.task_id == task_id => Some(c.clone()),
            _ => None,
        })
        .await?;
    ensure!(
        cancel.reason() == pb::CancelReason::LeaseExpired
            && cancel.attempt == first.attempt
            && cancel.lease_epoch == first.lease_epoch,
        "{cancel:?}"
    );

    let mut b = DirectWorker::new(&fleet, "acme", "acme-next")?;
    b.register(&[]).await?;
    let mut sb = b.open().await?;
    sb.credits(1).await?;
    let second = sb.assignment().await?;
    ensure!(
        task_of(&second)?.task_id == task_id
            && second.attempt == 2
            && second.lease_epoch > first.lease_epoch,
        "re-offered as attempt 2 under a newer epoch: {first:?} then {second:?}"
    );
    let svid2 = sb.accept(&second).await?;
    let _alive = KeepAlive::start(
        sb.tx.clone(),
        vec![(task_id.clone(), second.attempt, second.lease_epoch)],
    );

    // A's report of the lapsed attempt.
    sa.report(
        &task_id,
        first.attempt,
        first.lease_epoch,
        pb::RunOutcome::Succeeded,
    )
    .await?;
    let ack = sa.ack(&task_id).await?;
    ensure!(
        !ack.accepted
            && ack.rejection() == pb::ReportRejection::StaleLease
            && ack.lease_epoch == first.lease_epoch,
        "{ack:?}"
    );
    // A naming B's current epoch is no better: it does not hold that lease.
    sa.report(
        &task_id,
        second.attempt,
        second.lease_epoch,
        pb::RunOutcome::Failed,
    )
    .await?;
    let ack = sa.ack(&task_id).await?;
    ensure!(
        !ack.accepted && ack.rejection() == pb::ReportRejection::StaleLease,
        "a worker reported another worker's lease: {ack:?}"
    );
    let t = get_task(&mut acme, "acme", &task_id).await?;
    ensure!(
        t.status() == pb::TaskStatus::Running
            && t.attempt == 2
            && t.worker_id == "acme-next"
            && t.run_id == svid2.run_id,
        "a refused report changed the task: {t:?}"
    );
    // A heartbeat still listing the lapsed lease renews nothing; the
    // dispatcher tells A to stop that attempt, naming it.
    sa.heartbeat(&[(task_id.as_str(), first.attempt, first.lease_epoch)])
        .await?;
    let stop = sa
        .expect("a cancel of the lapsed lease", |m| match m {
            Down::Cancel(c) if c.task_id == task_id => Some(c.clone()),
            _ => None,
        })
        .await?;
    ensure!(
        stop.lease_epoch == first.lease_epoch && stop.attempt == first.attempt,
        "the cancel must name the attempt it stops (the worker keys its runs by task \
         and attempt): {stop:?}"
    );
    let t = get_task(&mut acme, "acme", &task_id).await?;
    ensure!(
        t.status() == pb::TaskStatus::Running && t.attempt == 2 && t.worker_id == "acme-next",
        "A's heartbeat of a lapsed lease changed the task: {t:?}"
    );
    let mut audit = fleet.audit()?;
    let refusals = audit.of_task("task.report_refused", &task_id).await?;
    ensure!(
        refusals.iter().any(|e| attr(e, "worker_id") == "acme-late"
            && attr(e, "reported_epoch") == first.lease_epoch.to_string()
            && attr(e, "current_epoch") == second.lease_epoch.to_string()),
        "{refusals:?}"
    );
    ensure!(audit.of_task("task.completed", &task_id).await?.is_empty());

    // B's report is the one that counts.
    sb.report(
        &task_id,
        second.attempt,
        second.lease_epoch,
        pb::RunOutcome::Succeeded,
    )
    .await?;
    let ack = sb.ack(&task_id).await?;
    ensure!(
        ack.accepted && ack.rejection() == pb::ReportRejection::Unspecified,
        "{ack:?}"
    );
    let t = get_task(&mut acme, "acme", &task_id).await?;
    ensure!(
        t.status() == pb::TaskStatus::Succeeded && t.attempt == 2 && t.worker_id == "acme-next",
        "{t:?}"
    );
    let completed = audit.of_task("task.completed", &task_id).await?;
    ensure!(
        completed.len() == 1 && attr(&completed[0], "worker_id") == "acme-next",
        "{completed:?}"
    );
    // The lapsed run's identity was revoked when its lease was released.
    audit
        .wait_for("identity.revoked", |e| e.run_id == svid1.run_id)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. A dropped claim stream

/// The test as worker A runs a task, drops its claim stream, opens a new one
/// and keeps heartbeating the lease: for three lease durations the task is
/// offered to no one (worker B of the same tenant, with credits, gets
/// nothing) and stays A's; A's report on the new stream is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_claim_stream_with_heartbeats_going_on_does_not_run_a_task_twice()
-> anyhow::Result<()> {
    let fleet = Fleet::start_short_lease().await?;
    let agent = fleet.echo_agent().await?;
    let mut acme = fleet.client("acme")?;

    let mut a = DirectWorker::new(&fleet, "acme", "acme-flaky")?;
    a.register(&[]).await?;
    let mut s1 = a.open().await?;
    s1.credits(1).await?;
    let task_id = enqueue(&mut acme, enqueue_req("acme", agent, "once", &[])).await?;
    let assignment = s1.assignment().await?;
    let svid = s1.accept(&assignment).await?;
    let lease = (task_id.as_str(), assignment.attempt, assignment.lease_epoch);
    s1.heartbeat(&[lease]).await?;

    // B, of the same tenant, waits with a credit.
    let mut b = DirectWorker::new(&fleet, "acme", "acme-idle")?;
    b.register(&[]).await?;
    let mut sb = b.open().await?;
    sb.credits(1).await?;
    let _b_alive = KeepAlive::start(sb.tx.clone(), Vec::new());

    // A's stream drops; A comes back on a new one at once and heartbeats.
    drop(s1);
    let s2 = a.open().await?;
    let _a_alive = KeepAlive::start(
        s2.tx.clone(),
        vec![(task_id.clone(), assignment.attempt, assignment.lease_epoch)],
    );
    let mut s2 = s2;
    let until = Instant::now() + Duration::from_millis(3 * LEASE_MS as u64);
    while Instant::now() < until {
        if let Some(m) = sb.next(Duration::from_millis(200)).await? {
            anyhow::bail!(
                "worker B was sent {m:?} while A's lease was heartbeated\n{}",
                fleet.logs()
            );
        }
        let t = get_task(&mut acme, "acme", &task_id).await?;
        ensure!(
            t.status() == pb::TaskStatus::Running
                && t.attempt == 1
                && t.worker_id == "acme-flaky"
                && t.run_id == svid.run_id,
            "the task left A while A heartbeated its lease: {t:?}\n{}",
            fleet.logs()
        );
    }
    // Nothing on A's new stream either (no cancel of its lease).
    if let Some(m) = s2.next(Duration::from_millis(100)).await? {
        ensure!(
            !matches!(m, Down::Cancel(_)),
            "A's lease was cancelled: {m:?}"
        );
    }

    s2.report(
        &task_id,
        assignment.attempt,
        assignment.lease_epoch,
        pb::RunOutcome::Succeeded,
    )
    .await?;
    let ack = s2.ack(&task_id).await?;
    ensure!(ack.accepted, "{ack:?}");
    let t = get_task(&mut acme, "acme", &task_id).await?;
    ensure!(
        t.status() == pb::TaskStatus::Succeeded && t.attempt == 1 && t.worker_id == "acme-flaky",
        "{t:?}"
    );
    if let Some(m) = sb.next(Duration::from_millis(300)).await? {
        anyhow::bail!("worker B was sent {m:?} after the task succeeded");
    }
    let mut audit = fleet.audit()?;
    let claimed = audit.of_task("task.claimed", &task_id).await?;
    ensure!(
        claimed.len() == 1,
        "the task ran more than once: {claimed:?}"
    );
    let completed = audit.of_task("task.completed", &task_id).await?;
    ensure!(completed.len() == 1, "{completed:?}");
    ensure!(
        audit
            .of_task("task.lease_released", &task_id)
            .await?
            .is_empty(),
        "the lease was released while heartbeated"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. Cancelling a running task

/// CancelTask of a task a real worker is running: the task is CANCELLED at
/// once (the watch ends on it), the worker kills its child, the run's
/// identity is revoked, audit has task.cancelled, and the worker's later
/// report changes nothing; the worker then takes the next task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_task_stops_its_process_on_the_worker() -> anyhow::Result<()> {
    let mut fleet = Fleet::start().await?;
    let sleeper = fleet.sleeper_agent().await?;
    let echo = fleet.echo_agent().await?;
    let w = fleet.start_worker("acme", "", "acme-1", "").await?;
    let mut acme = fleet.client("acme")?;
    let task_id = enqueue(&mut acme, enqueue_req("acme", sleeper, "victim\n", &[])).await?;
    let running = fleet
        .wait_task(&mut acme, "acme", &task_id, "running", |t| {
            t.status() == pb::TaskStatus::Running
        })
        .await?;
    ensure!(running.worker_id == w, "{running:?}");
    let pid = fleet.agent_pid("victim").await?;
    ensure!(!process_gone(pid), "the agent is not running");

    let mut watch = acme
        .watch_task(pb::WatchTaskRequest {
            tenant: "acme".into(),
            task_id: task_id.clone(),
        })
        .await?
        .into_inner();
    let first = watch
        .message()
        .await?
        .and_then(|m| m.task)
        .context("no first watch message")?;
    ensure!(first.status() == pb::TaskStatus::Running, "{first:?}");

    let cancelled = acme
        .cancel_task(pb::CancelTaskRequest {
            tenant: "acme".into(),
            task_id: task_id.clone(),
            reason: "no longer needed".into(),
        })
        .await?
        .into_inner()
        .task
        .context("no task")?;
    ensure!(
        cancelled.status() == pb::TaskStatus::Cancelled,
        "{cancelled:?}"
    );

    // The watch ends, on CANCELLED.
    let mut last = first;
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(m) = watch.message().await? {
            last = m.task.context("watch message without a task")?;
        }
        anyhow::Ok(())
    })
    .await;
    ensure!(
        matches!(ended, Ok(Ok(()))),
        "the watch did not end: {ended:?}"
    );
    ensure!(last.status() == pb::TaskStatus::Cancelled, "{last:?}");

    // The worker got the cancel and killed the agent.
    let deadline = Instant::now() + WAIT;
    while !process_gone(pid) {
        ensure!(
            Instant::now() < deadline,
            "the agent (pid {pid}) still runs after CancelTask\n{}",
            fleet.logs()
        );
        tokio::time::sleep(POLL).await;
    }

    // The worker is free again: it takes and finishes the next task (so it
    // has also reported the cancelled run).
    let next = enqueue(&mut acme, enqueue_req("acme", echo, "after", &[])).await?;
    let t = fleet.wait_succeeded(&mut acme, "acme", &next).await?;
    ensure!(t.worker_id == w, "{t:?}");

    let t = get_task(&mut acme, "acme", &task_id).await?;
    ensure!(
        t.status() == pb::TaskStatus::Cancelled && t.status_reason == "no longer needed",
        "the worker's report changed a cancelled task: {t:?}"
    );
    let r = acme
        .cancel_task(pb::CancelTaskRequest {
            tenant: "acme".into(),
            task_id: task_id.clone(),
            reason: String::new(),
        })
        .await;
    refused(r, Code::FailedPrecondition, "cancelling a cancelled task")?;

    let mut audit = fleet.audit()?;
    let ev = audit.of_task("task.cancelled", &task_id).await?;
    ensure!(
        ev.len() == 1
            && attr(&ev[0], "cancelled_by") == format!("{TD}/tenant/acme/client/backend")
            && attr(&ev[0], "reason") == "no longer needed"
            && ev[0].run_id == running.run_id,
        "{ev:?}"
    );
    ensure!(
        audit.of_task("task.completed", &task_id).await?.is_empty(),
        "a cancelled task was recorded as completed"
    );
    audit
        .wait_for("identity.revoked", |e| e.run_id == running.run_id)
        .await?;
    // A queued task is cancelled at once and never offered.
    let queued = enqueue(
        &mut acme,
        enqueue_req("acme", echo, "never", &[("zone", "nowhere")]),
    )
    .await?;
    let c = acme
        .cancel_task(pb::CancelTaskRequest {
            tenant: "acme".into(),
            task_id: queued.clone(),
            reason: "changed plans".into(),
        })
        .await?
        .into_inner()
        .task
        .context("no task")?;
    ensure!(
        c.status() == pb::TaskStatus::Cancelled && c.attempt == 0,
        "{c:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 8. Resetting a tenant's pool

/// ResetPool(acme, revoke_workers): both acme workers are evicted and stop,
/// ListWorkers no longer shows them, the in-flight run's identity is
/// revoked and its agent killed, its task requeued (and later finished by a
/// newly enrolled worker as attempt 2); globex's worker is untouched; audit
/// has fleet.pool_reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resetting_a_tenants_pool_evicts_its_workers_revokes_runs_and_requeues_tasks()
-> anyhow::Result<()> {
    let mut fleet = Fleet::start().await?;
    let agent = fleet.first_hangs_agent().await?;
    let echo = fleet.echo_agent().await?;
    let w1 = fleet.start_worker("acme", "", "acme-1", "").await?;
    let w2 = fleet.start_worker("acme", "", "acme-2", "").await?;
    let g = fleet.start_worker("globex", "", "globex-1", "").await?;
    let mut acme = fleet.client("acme")?;
    let task_id = enqueue(&mut acme, enqueue_req("acme", agent, "inflight\n", &[])).await?;
    let running = fleet
        .wait_task(&mut acme, "acme", &task_id, "running", |t| {
            t.status() == pb::TaskStatus::Running
        })
        .await?;
    let pid = fleet.agent_pid("inflight").await?;

    let mut op = fleet.operator()?;
    let r = op
        .reset_pool(pb::ResetPoolRequest {
            tenant: "acme".into(),
            pool: "shared".into(),
            reason: "both".into(),
            revoke_workers: false,
        })
        .await;
    refused(
        r,
        Code::InvalidArgument,
        "a reset naming a tenant and a pool",
    )?;
    let r = fleet
        .client("acme")?
        .reset_pool(pb::ResetPoolRequest {
            tenant: "acme".into(),
            reason: "a tenant tries".into(),
            ..Default::default()
        })
        .await;
    refused(r, Code::PermissionDenied, "a tenant resets its pool")?;

    let reset = op
        .reset_pool(pb::ResetPoolRequest {
            tenant: "acme".into(),
            pool: String::new(),
            reason: "host compromised".into(),
            revoke_workers: true,
        })
        .await?
        .into_inner();
    let mut evicted = reset.evicted_worker_ids.clone();
    evicted.sort();
    let mut want = vec![w1.clone(), w2.clone()];
    want.sort();
    ensure!(evicted == want, "{reset:?}");
    ensure!(
        reset.revoked_run_ids == vec![running.run_id.clone()],
        "{reset:?}"
    );
    ensure!(
        reset.requeued_task_ids == vec![task_id.clone()],
        "{reset:?}"
    );

    let t = get_task(&mut acme, "acme", &task_id).await?;
    ensure!(
        t.status() == pb::TaskStatus::Queued && t.attempt == 1,
        "the in-flight task is queued again: {t:?}"
    );
    // The evicted workers cannot come back: their SVIDs are revoked. They
    // stop, and the dispatcher no longer lists them.
    for name in ["acme-1", "acme-2"] {
        let exited = tokio::time::timeout(WAIT, fleet.worker(name)?.child.wait()).await;
        ensure!(
            matches!(exited, Ok(Ok(_))),
            "evicted worker {name} still runs: {exited:?}\n{}",
            fleet.logs()
        );
    }
    let listed = list_workers(&mut op, "acme", "").await?;
    ensure!(
        listed.is_empty(),
        "evicted workers are listed: {listed:?}\n{}",
        fleet.logs()
    );
    let deadline = Instant::now() + WAIT;
    while !process_gone(pid) {
        ensure!(
            Instant::now() < deadline,
            "the in-flight agent (pid {pid}) survived the reset\n{}",
            fleet.logs()
        );
        tokio::time::sleep(POLL).await;
    }

    // Revoked at identity: the run and both workers.
    let revoked = revocations(&mut fleet.identity_operator()?, "acme").await?;
    ensure!(
        revoked
            .iter()
            .any(|r| revoked_run(r) == Some(running.run_id.as_str()) && r.hard),
        "{revoked:?}"
    );
    for id in [&w1, &w2] {
        ensure!(
            revoked
                .iter()
                .any(|r| revoked_worker(r) == Some(id.as_str())),
            "worker {id} not revoked: {revoked:?}"
        );
    }
    let mut audit = fleet.audit()?;
    let resets = audit.events("fleet.pool_reset").await?;
    ensure!(resets.len() == 1, "{resets:?}");
    let ev = &resets[0];
    let mut listed_ids: Vec<&str> = attr(ev, "worker_ids").split(',').collect();
    listed_ids.sort_unstable();
    ensure!(
        ev.tenant == "acme"
            && listed_ids == want.iter().map(String::as_str).collect::<Vec<_>>()
            && attr(ev, "reset_by") == format!("{TD}/{OPERATOR}")
            && attr(ev, "reason") == "host compromised",
        "{ev:?}"
    );

    // globex is untouched.
    let globex_workers = list_workers(&mut op, "globex", "").await?;
    ensure!(
        globex_workers.len() == 1
            && globex_workers[0].worker_id == g
            && globex_workers[0].state() == pb::WorkerState::Connected,
        "{globex_workers:?}"
    );
    let mut globex = fleet.client("globex")?;
    let gt = enqueue(&mut globex, enqueue_req("globex", echo, "still here", &[])).await?;
    let gt = fleet.wait_succeeded(&mut globex, "globex", &gt).await?;
    ensure!(gt.worker_id == g, "{gt:?}");

    // A newly enrolled acme worker finishes the requeued task.
    let w3 = fleet.start_worker("acme", "", "acme-3", "").await?;
    let done = fleet.wait_succeeded(&mut acme, "acme", &task_id).await?;
    ensure!(done.attempt == 2 && done.worker_id == w3, "{done:?}");
    // The reset took attempt 1 back: the only completion on record is
    // attempt 2's (a report of the evicted attempt is not a completion).
    let completed = audit.of_task("task.completed", &task_id).await?;
    ensure!(
        completed.len() == 1
            && attr(&completed[0], "attempt") == "2"
            && attr(&completed[0], "worker_id") == w3,
        "the task was requeued by the reset and completed by attempt 2 only, yet audit \
         records these completions: {completed:?}\n{}",
        fleet.logs()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 9. Enqueue bounds and idempotency

/// Bounds named by field (payload over 1 MiB, label keys, priority, timeout,
/// attempts), reserved labels, and idempotency keys: a retry returns the
/// same task, the same key with another request is ALREADY_EXISTS. Refused
/// requests leave no task and no audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_bounds_are_named_and_idempotency_keys_deduplicate() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let agent = fleet.echo_agent().await?;
    let mut acme = fleet.client("acme")?;

    // The payload: 1 MiB is taken, one byte more is not.
    let mut at_limit = enqueue_req("acme", agent, "", &[("zone", "nowhere")]);
    at_limit.payload = vec![b'a'; 1 << 20].into();
    let big = enqueue(&mut acme, at_limit.clone()).await?;
    let mut over = at_limit;
    over.payload = vec![b'a'; (1 << 20) + 1].into();
    let s = refused(
        acme.enqueue(over).await,
        Code::InvalidArgument,
        "payload over 1 MiB",
    )?;
    ensure!(s.message().contains("payload"), "{s:?}");

    let bad_labels: [(&str, HashMap<String, String>); 4] = [
        ("a key with a space", labels(&[("bad key", "v")])),
        ("an empty key", labels(&[("", "v")])),
        ("a 129-byte key", labels(&[(&"k".repeat(129), "v")])),
        (
            "65 labels",
            (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect(),
        ),
    ];
    for (what, l) in bad_labels {
        let mut req = enqueue_req("acme", agent, "x", &[]);
        req.labels = l;
        let s = refused(acme.enqueue(req).await, Code::InvalidArgument, what)?;
        ensure!(s.message().contains("labels"), "{what}: {s:?}");
    }
    let mut long_value = enqueue_req("acme", agent, "x", &[]);
    long_value.labels = labels(&[("k", &"v".repeat(129))]);
    refused(
        acme.enqueue(long_value).await,
        Code::InvalidArgument,
        "a 129-byte value",
    )?;
    let r = acme
        .enqueue(enqueue_req("acme", agent, "x", &[("tenant", "globex")]))
        .await;
    refused(
        r,
        Code::PermissionDenied,
        "a reserved label naming another tenant",
    )?;
    let r = acme
        .enqueue(enqueue_req("acme", agent, "x", &[("pool", "shared")]))
        .await;
    refused(
        r,
        Code::PermissionDenied,
        "a reserved pool label on a tenant task",
    )?;

    let mut bad = enqueue_req("acme", agent, "x", &[]);
    bad.priority = 101;
    let s = refused(
        acme.enqueue(bad).await,
        Code::InvalidArgument,
        "priority 101",
    )?;
    ensure!(s.message().contains("priority"), "{s:?}");
    let mut bad = enqueue_req("acme", agent, "x", &[]);
    bad.max_attempts = 11;
    let s = refused(
        acme.enqueue(bad).await,
        Code::InvalidArgument,
        "11 attempts",
    )?;
    ensure!(s.message().contains("max_attempts"), "{s:?}");
    let mut bad = enqueue_req("acme", agent, "x", &[]);
    bad.timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: 500_000_000,
    });
    let s = refused(
        acme.enqueue(bad).await,
        Code::InvalidArgument,
        "a half-second timeout",
    )?;
    ensure!(s.message().contains("timeout"), "{s:?}");
    let mut bad = enqueue_req("acme", agent, "x", &[]);
    bad.idempotency_key = "k".repeat(129);
    let s = refused(
        acme.enqueue(bad).await,
        Code::InvalidArgument,
        "a 129-byte key",
    )?;
    ensure!(s.message().contains("idempotency_key"), "{s:?}");
    let mut bad = enqueue_req("acme", agent, "x", &[]);
    bad.pool = "shared".into();
    refused(
        acme.enqueue(bad).await,
        Code::InvalidArgument,
        "tenant and pool both set",
    )?;
    // A tenant backend cannot enqueue a pool task: naming no tenant, its
    // request is refused at the boundary (a tenant-scoped caller must name
    // its own tenant in field 1).
    let mut pool_task = enqueue_req("", agent, "x", &[]);
    pool_task.pool = "shared".into();
    let s = refused(
        acme.enqueue(pool_task).await,
        Code::InvalidArgument,
        "a tenant enqueues a pool task",
    )?;
    ensure!(s.message().contains("tenant"), "{s:?}");

    // Idempotency: a retry of the same request is the same task — with one
    // label, and with several (a retry is the same request whatever order
    // a client's map encodes its labels in).
    let mut simple = enqueue_req("acme", agent, "refund customer 7", &[("zone", "nowhere")]);
    simple.idempotency_key = "refund-7".into();
    let simple_first = acme.enqueue(simple.clone()).await?.into_inner();
    let simple_again = acme.enqueue(simple).await?.into_inner();
    ensure!(
        !simple_first.deduplicated
            && simple_again.deduplicated
            && simple_again.task_id == simple_first.task_id,
        "{simple_first:?} then {simple_again:?}"
    );
    let mut req = enqueue_req(
        "acme",
        agent,
        "charge customer 42",
        &[
            ("zone", "nowhere"),
            ("region", "eu"),
            ("gpu", "none"),
            ("team", "billing"),
            ("tier", "gold"),
            ("os", "linux"),
        ],
    );
    req.idempotency_key = "order-42".into();
    req.priority = 7;
    let first = acme.enqueue(req.clone()).await?.into_inner();
    ensure!(!first.deduplicated, "{first:?}");
    for attempt in 0..3 {
        let again = acme.enqueue(req.clone()).await;
        let again = match again {
            Ok(r) => r.into_inner(),
            Err(s) => anyhow::bail!(
                "retry {attempt} of the same enqueue (same key, same request, {} labels) \
                 was refused: {s:?}",
                req.labels.len()
            ),
        };
        ensure!(
            again.deduplicated && again.task_id == first.task_id,
            "retry {attempt}: {again:?} vs {first:?}"
        );
    }
    let mut changed = req.clone();
    changed.payload = b"charge customer 43".to_vec().into();
    let s = refused(
        acme.enqueue(changed).await,
        Code::AlreadyExists,
        "same key, other payload",
    )?;
    ensure!(s.message().contains("idempotency"), "{s:?}");
    let mut changed = req.clone();
    changed.labels.insert("zone".into(), "elsewhere".into());
    refused(
        acme.enqueue(changed).await,
        Code::AlreadyExists,
        "same key, other labels",
    )?;
    // Keys are per tenant: globex may use the same one.
    let mut theirs = req.clone();
    theirs.tenant = "globex".into();
    let theirs = fleet.client("globex")?.enqueue(theirs).await?.into_inner();
    ensure!(
        !theirs.deduplicated && theirs.task_id != first.task_id,
        "{theirs:?}"
    );

    // What was refused left nothing behind.
    let tasks = list_tasks(&mut acme, "acme").await?;
    let mut ids: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![
        big.as_str(),
        first.task_id.as_str(),
        simple_first.task_id.as_str(),
    ];
    want.sort_unstable();
    ensure!(ids == want, "{tasks:?}");
    let big_task = tasks
        .iter()
        .find(|t| t.task_id == big)
        .context("the 1 MiB task")?;
    ensure!(
        big_task.payload_size == 1 << 20 && big_task.payload.is_empty(),
        "ListTasks carries sizes, not payloads: {}",
        big_task.payload_size
    );
    let mut audit = fleet.audit()?;
    let enqueued = audit.events("task.enqueued").await?;
    ensure!(enqueued.len() == 4, "one record per task: {enqueued:?}");
    Ok(())
}

// ---------------------------------------------------------------------------
// 10. A Python backend

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether python3 with grpcio-tools is here; missing is loud, or fatal under
/// BULKHEAD_REQUIRE_EXTERNAL=1.
fn python_grpc() -> anyhow::Result<bool> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        ensure!(
            !bulkhead_testkit::external::require_external(),
            "python3 with grpcio-tools is required (pip install grpcio-tools)"
        );
        eprintln!(
            "SKIP: fleet python client: python3 with grpcio-tools not found (pip install grpcio-tools) — skipping"
        );
    }
    Ok(ok)
}

/// A tenant backend in Python (grpcio, stubs generated from `proto/` during
/// the test, a tenant client certificate) enqueues a task, reads it until a
/// real worker has run it, and is refused enqueueing for another tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_backend_enqueues_and_follows_its_task_with_a_tenant_certificate()
-> anyhow::Result<()> {
    if !python_grpc()? {
        return Ok(());
    }
    let mut fleet = Fleet::start().await?;
    let agent = fleet.echo_agent().await?;
    let w = fleet.start_worker("acme", "", "acme-1", "").await?;

    let dir = tempfile::tempdir()?;
    let root = workspace();
    let protos: Vec<PathBuf> = ["audit", "dispatcher", "identity", "sandbox", "sealed"]
        .iter()
        .map(|s| root.join(format!("proto/bulkhead/{s}/v1/{s}.proto")))
        .collect();
    let status = std::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", root.join("proto").display()))
        .arg(format!("--python_out={}", dir.path().display()))
        .arg(format!("--grpc_python_out={}", dir.path().display()))
        .args(&protos)
        .status()?;
    ensure!(status.success(), "protoc for python failed");
    std::fs::write(dir.path().join("bulkhead").join("__init__.py"), "")?;
    for s in ["audit", "dispatcher", "identity", "sandbox", "sealed"] {
        for pkg in [format!("bulkhead/{s}"), format!("bulkhead/{s}/v1")] {
            std::fs::write(dir.path().join(pkg).join("__init__.py"), "")?;
        }
    }

    let (cert, key) = fleet.mesh.identity_pem("tenant/acme/client/backend")?;
    let (cert_path, key_path) = (dir.path().join("client.pem"), dir.path().join("client.key"));
    std::fs::write(&cert_path, cert)?;
    bulkhead_mesh::pki::write_private(&key_path, &key)?;
    let port = fleet
        .mesh
        .addr("dispatcher")?
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(root.join("tests/python/fleet_client.py"))
        .arg(format!("localhost:{port}"))
        .arg(&fleet.mesh.mesh.endpoints.ca)
        .arg(&cert_path)
        .arg(&key_path)
        .arg(agent)
        .env("PYTHONPATH", dir.path())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .context("the python client did not finish")??;
    ensure!(
        out.status.success(),
        "python client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        fleet.logs()
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(seen["final"]["status"] == "TASK_STATUS_SUCCEEDED", "{seen}");
    ensure!(seen["final"]["tenant"] == "acme", "{seen}");
    ensure!(seen["final"]["worker_id"] == w.as_str(), "{seen}");
    ensure!(
        seen["final"]["output_summary"] == "hello from python\ndone\n",
        "{seen}"
    );
    ensure!(seen["other_tenant"] == "PERMISSION_DENIED", "{seen}");
    ensure!(seen["other_tenant_read"] == "PERMISSION_DENIED", "{seen}");

    // The dispatcher's view agrees with what the Python client saw.
    let task_id = seen["task_id"].as_str().context("no task id")?;
    let t = get_task(&mut fleet.client("acme")?, "acme", task_id).await?;
    ensure!(
        t.status() == pb::TaskStatus::Succeeded && t.worker_id == w,
        "{t:?}"
    );
    let mut audit = fleet.audit()?;
    let enqueued = audit.of_task("task.enqueued", task_id).await?;
    ensure!(
        enqueued.len() == 1
            && attr(&enqueued[0], "enqueued_by") == format!("{TD}/tenant/acme/client/backend"),
        "{enqueued:?}"
    );
    audit
        .wait_for("fleet.cross_tenant_refused", |e| {
            attr(e, "caller") == format!("{TD}/tenant/acme/client/backend")
                && attr(e, "method").ends_with("Enqueue")
        })
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 11. A task exists once audit holds its enqueue

/// How long a settling dispatcher may take to settle what a crash left held.
const SETTLE: Duration = Duration::from_secs(15);

fn new_task_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Fleet {
    /// The dispatcher's default store: `<data_dir>/dispatcher.db`.
    fn dispatcher_db(&self) -> PathBuf {
        self.mesh
            .dir()
            .join("data")
            .join("dispatcher")
            .join("dispatcher.db")
    }

    /// Runs `sql` on the dispatcher's store (read-only unless `write`, which
    /// may hold several statements); the rows, one a line, columns separated
    /// by `|`.
    async fn store_sql(&self, sql: &str, write: bool) -> anyhow::Result<Vec<String>> {
        use rusqlite::{Connection, OpenFlags, types::ValueRef};
        let path = self.dispatcher_db();
        let sql = sql.to_owned();
        tokio::task::spawn_blocking(move || {
            let flags = if write {
                OpenFlags::SQLITE_OPEN_READ_WRITE
            } else {
                OpenFlags::SQLITE_OPEN_READ_ONLY
            };
            let conn = Connection::open_with_flags(&path, flags)?;
            conn.busy_timeout(Duration::from_secs(5))?;
            if write {
                conn.execute_batch(&sql)
                    .with_context(|| format!("{sql:?}"))?;
                return Ok(Vec::new());
            }
            let mut stmt = conn.prepare(&sql).with_context(|| format!("{sql:?}"))?;
            let columns = stmt.column_count();
            let mut rows = stmt.query([])?;
            let mut lines = Vec::new();
            while let Some(row) = rows.next()? {
                let cells = (0..columns)
                    .map(|i| {
                        Ok(match row.get_ref(i)? {
                            ValueRef::Null => String::new(),
                            ValueRef::Integer(n) => n.to_string(),
                            ValueRef::Real(x) => x.to_string(),
                            ValueRef::Text(t) | ValueRef::Blob(t) => {
                                String::from_utf8_lossy(t).into_owned()
                            }
                        })
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                lines.push(cells.join("|"));
            }
            Ok(lines)
        })
        .await?
    }

    /// The `task_id|status` of every row the dispatcher's store holds as held.
    async fn held_rows(&self) -> anyhow::Result<Vec<String>> {
        self.store_sql(
            "SELECT task_id, status FROM tasks WHERE status = 'held'",
            false,
        )
        .await
    }

    /// Waits until `sql` (one number) answers `want`.
    async fn wait_store_count(
        &self,
        sql: &str,
        want: u64,
        within: Duration,
        what: &str,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let rows = self.store_sql(sql, false).await?;
            if rows.len() == 1 && rows[0].trim().parse::<u64>().ok() == Some(want) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{what}: {sql:?} answered {rows:?}, not {want}; held rows: {:?}\n{}",
                self.held_rows().await,
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

/// With audit down, Enqueue is refused UNAVAILABLE although a worker of the
/// tenant waits for work (the hand-off path): no task appears to the tenant
/// or the operator, no row is left in the dispatcher's store, the waiting
/// worker is handed nothing. With audit back, the next Enqueue is a task
/// like any other and runs: nothing was left wedged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_audit_cannot_record_is_refused_and_leaves_no_task() -> anyhow::Result<()> {
    let mut fleet = Fleet::start().await?;
    let agent = fleet.echo_agent().await?;
    let w = fleet.start_worker("acme", "", "acme-1", "").await?;
    let mut acme = fleet.client("acme")?;
    let mut op = fleet.operator()?;

    fleet
        .mesh
        .mesh
        .process_mut("audit")
        .context("no audit process")?
        .kill()
        .await;
    let r = acme
        .enqueue(enqueue_req("acme", agent, "never\n", &[]))
        .await;
    let refusal = refused(r, Code::Unavailable, "enqueue with audit down");
    if let Err(e) = refusal {
        anyhow::bail!("{e}\n{}", fleet.logs());
    }
    fleet.mesh.mesh.restart("audit").await?;

    for (who, client) in [("the operator", &mut op), ("acme", &mut acme)] {
        let tasks = list_tasks(client, "acme").await?;
        ensure!(
            tasks.is_empty(),
            "{who} lists a task audit never recorded: {tasks:?}\n{}",
            fleet.logs()
        );
    }
    {
        // The refused enqueue's row may be deleted just after the refusal.
        fleet
            .wait_store_count(
                "SELECT COUNT(*) FROM tasks",
                0,
                Duration::from_secs(5),
                "the refused enqueue left a row",
            )
            .await?;
        let held = fleet.held_rows().await?;
        ensure!(held.is_empty(), "held rows remain: {held:?}");
    }

    // Audit is back: the next enqueue is a task, and it runs. The dispatcher's
    // channel to audit may take a moment to reconnect; only UNAVAILABLE is
    // retried, and every refusal must leave nothing either.
    let deadline = Instant::now() + Duration::from_secs(10);
    let task_id = loop {
        match acme
            .enqueue(enqueue_req("acme", agent, "after\n", &[]))
            .await
        {
            Ok(r) => break r.into_inner().task_id,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => anyhow::bail!(
                "enqueue with audit back up was refused: {s:?}\n{}",
                fleet.logs()
            ),
        }
    };
    let done = fleet.wait_succeeded(&mut acme, "acme", &task_id).await?;
    ensure!(
        done.worker_id == w && done.output_summary == "after\ndone\n",
        "{done:?}\n{}",
        fleet.logs()
    );
    let tasks = list_tasks(&mut op, "acme").await?;
    ensure!(
        tasks.len() == 1 && tasks[0].task_id == task_id,
        "only the recorded task exists: {tasks:?}\n{}",
        fleet.logs()
    );

    let mut audit = fleet.audit()?;
    let enqueued = audit.events("task.enqueued").await?;
    ensure!(
        enqueued.len() == 1 && attr(&enqueued[0], "task_id") == task_id,
        "one record, of the task that exists: {enqueued:?}"
    );
    let claimed = audit.events("task.claimed").await?;
    ensure!(
        claimed
            .iter()
            .all(|e| attr(e, "task_id") == task_id && attr(e, "worker_id") == w),
        "the waiting worker was handed only the recorded task: {claimed:?}"
    );
    let held = fleet.held_rows().await?;
    ensure!(held.is_empty(), "held rows remain: {held:?}");
    Ok(())
}

/// Audit records an enqueue while its task is inserted; when the insert
/// fails (here a trigger planted in the dispatcher's store refuses one
/// payload), the Enqueue is refused, no task exists, and the log says so:
/// the task's `task.enqueued` is followed by a `task.enqueue_abandoned` of the
/// same task, so that the log never claims a task that never was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_whose_task_cannot_be_stored_is_refused_and_recorded_as_abandoned()
-> anyhow::Result<()> {
    let mut fleet = Fleet::start().await?;
    let agent = fleet.echo_agent().await?;
    let w = fleet.start_worker("acme", "", "acme-1", "").await?;
    let mut acme = fleet.client("acme")?;
    fleet
        .store_sql(
            "CREATE TRIGGER refuse_one_payload BEFORE INSERT ON tasks \
             WHEN instr(CAST(NEW.payload AS TEXT), 'REFUSED-BY-THE-STORE') > 0 \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
            true,
        )
        .await?;

    let r = acme
        .enqueue(enqueue_req("acme", agent, "REFUSED-BY-THE-STORE\n", &[]))
        .await;
    ensure!(r.is_err(), "an enqueue the store refused answered {r:?}");
    let tasks = list_tasks(&mut fleet.operator()?, "acme").await?;
    ensure!(tasks.is_empty(), "a refused enqueue left a task: {tasks:?}");

    let mut audit = fleet.audit()?;
    let enqueued = audit.events("task.enqueued").await?;
    ensure!(
        enqueued.len() == 1,
        "audit recorded the enqueue while the insert ran: {enqueued:?}\n{}",
        fleet.logs()
    );
    let task_id = attr(&enqueued[0], "task_id").to_owned();
    let abandoned = audit.events("task.enqueue_abandoned").await?;
    ensure!(
        abandoned.len() == 1
            && attr(&abandoned[0], "task_id") == task_id
            && abandoned[0].tenant == "acme"
            && abandoned[0].sequence > enqueued[0].sequence,
        "the record of a task that does not exist is followed by its abandonment: \
         {enqueued:?} {abandoned:?}\n{}",
        fleet.logs()
    );

    // Any other payload is stored, and runs on the waiting worker.
    let task_id = enqueue(&mut acme, enqueue_req("acme", agent, "stored\n", &[])).await?;
    let done = fleet.wait_succeeded(&mut acme, "acme", &task_id).await?;
    ensure!(done.worker_id == w, "{done:?}\n{}", fleet.logs());
    Ok(())
}

/// A dispatcher killed between inserting held tasks and learning their fate
/// (two held rows, written into its store while it is down): R, whose
/// `task.enqueued` the dispatcher had recorded in audit, and U, whose record
/// never made it. Restarted with `held_grace_ms = 1000`, its settling pass
/// asks audit: R becomes a queued task that a worker of its tenant runs;
/// U is deleted and was never visible. Nothing is recorded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_tasks_left_by_a_crash_are_settled_against_audit() -> anyhow::Result<()> {
    let mut grace = toml::Table::new();
    grace.insert("held_grace_ms".into(), toml::Value::Integer(1000));
    let mut fleet = Fleet::start_with_fleet(grace).await?;
    let agent = fleet.echo_agent().await?;
    let w = fleet.start_worker("acme", "", "acme-1", "").await?;
    let mut acme = fleet.client("acme")?;
    let first = enqueue(&mut acme, enqueue_req("acme", agent, "settle\n", &[])).await?;
    fleet.wait_succeeded(&mut acme, "acme", &first).await?;
    let mut audit = fleet.audit()?;
    let model = audit.of_task("task.enqueued", &first).await?;
    ensure!(model.len() == 1, "{model:?}");
    let model = model.into_iter().next().context("no record")?;
    let dispatcher_id = format!("{TD}/service/dispatcher");
    ensure!(model.actor == dispatcher_id, "{model:?}");

    fleet
        .mesh
        .mesh
        .process_mut("dispatcher")
        .context("no dispatcher")?
        .kill()
        .await;
    let (recorded, unrecorded) = (new_task_id(), new_task_id());
    let now = now_ms();
    let copy = |id: &str| {
        format!(
            "INSERT INTO tasks (task_id, tenant, pool, agent, agent_version, labels, cascade, \
             secret_keys, payload, priority, idempotency_key, request_hash, status, \
             status_reason, attempt, max_attempts, lease_epoch, worker_id, run_id, \
             lease_expires_at_ms, deadline_at_ms, timeout_ms, outcome, exit_code, \
             output_summary, created_at_ms, updated_at_ms, finished_at_ms) \
             SELECT '{id}', tenant, pool, agent, agent_version, labels, cascade, secret_keys, \
             payload, priority, '', request_hash, 'held', '', 0, max_attempts, 0, '', '', \
             NULL, NULL, timeout_ms, 0, 0, '', {now}, {now}, NULL \
             FROM tasks WHERE task_id = '{first}';"
        )
    };
    fleet
        .store_sql(&format!("{}{}", copy(&recorded), copy(&unrecorded)), true)
        .await?;
    let mut held = fleet.held_rows().await?;
    held.sort_unstable();
    let mut want = vec![format!("{recorded}|held"), format!("{unrecorded}|held")];
    want.sort_unstable();
    ensure!(held == want, "the crash's held rows: {held:?}");

    // The dispatcher had recorded R before it died (as itself: the settling
    // pass trusts only its own records).
    let mut as_dispatcher = AuditServiceClient::new(
        fleet
            .mesh
            .channel("audit", &fleet.mesh.identity("service/dispatcher")?)?,
    );
    let mut attributes = model.attributes.clone();
    attributes.insert("task_id".into(), recorded.clone());
    as_dispatcher
        .append(audit_pb::AppendRequest {
            events: vec![audit_pb::NewEvent {
                r#type: model.r#type.clone(),
                tenant: model.tenant.clone(),
                run_id: String::new(),
                outcome: model.outcome,
                attributes,
            }],
        })
        .await
        .context("append R's record as the dispatcher")?;

    fleet.mesh.mesh.restart("dispatcher").await?;
    let mut acme = fleet.client("acme")?;
    let mut op = fleet.operator()?;

    // R: held (NOT_FOUND) until settled, then a task that runs.
    let deadline = Instant::now() + SETTLE;
    let done = loop {
        match acme
            .get_task(pb::GetTaskRequest {
                tenant: "acme".into(),
                task_id: recorded.clone(),
            })
            .await
        {
            Ok(r) => {
                let t = r.into_inner().task.context("no task")?;
                if is_final(t.status()) {
                    break t;
                }
            }
            // Held until settled: not a task yet, and said so.
            Err(s) if s.code() == Code::Unavailable => {}
            Err(s) => anyhow::bail!("get task R: {s:?}\n{}", fleet.logs()),
        }
        ensure!(
            Instant::now() < deadline,
            "R, recorded in audit, never ran; held rows: {:?}\n{}",
            fleet.held_rows().await,
            fleet.logs()
        );
        tokio::time::sleep(POLL).await;
    };
    ensure!(
        done.status() == pb::TaskStatus::Succeeded
            && done.tenant == "acme"
            && done.worker_id == w
            && done.attempt == 1
            && done.output_summary == "settle\ndone\n",
        "R must run once on acme's worker: {done:?}\n{}",
        fleet.logs()
    );

    // U: deleted, and never seen.
    fleet
        .wait_store_count(
            &format!("SELECT COUNT(*) FROM tasks WHERE task_id = '{unrecorded}'"),
            0,
            SETTLE,
            "U, never recorded, is still in the store",
        )
        .await?;
    let r = acme
        .get_task(pb::GetTaskRequest {
            tenant: "acme".into(),
            task_id: unrecorded.clone(),
        })
        .await;
    refused(r, Code::NotFound, "get task U")?;
    let r = acme
        .cancel_task(pb::CancelTaskRequest {
            tenant: "acme".into(),
            task_id: unrecorded.clone(),
            reason: "never was".into(),
        })
        .await;
    refused(r, Code::NotFound, "cancel task U")?;
    for (who, client) in [("the operator", &mut op), ("acme", &mut acme)] {
        let mut ids: Vec<String> = list_tasks(client, "acme")
            .await?
            .into_iter()
            .map(|t| t.task_id)
            .collect();
        ids.sort_unstable();
        let mut want = vec![first.clone(), recorded.clone()];
        want.sort_unstable();
        ensure!(ids == want, "{who} lists {ids:?}\n{}", fleet.logs());
    }
    let held = fleet.held_rows().await?;
    ensure!(
        held.is_empty(),
        "held rows remain: {held:?}\n{}",
        fleet.logs()
    );
    let row = fleet
        .store_sql(
            &format!("SELECT status FROM tasks WHERE task_id = '{recorded}'"),
            false,
        )
        .await?;
    ensure!(row == ["succeeded"], "R's row: {row:?}");

    // Settling records nothing: R keeps its one record, U has none, and R
    // was claimed once, by acme's worker.
    let r_enqueued = audit.of_task("task.enqueued", &recorded).await?;
    ensure!(
        r_enqueued.len() == 1 && r_enqueued[0].actor == dispatcher_id,
        "{r_enqueued:?}"
    );
    let u_enqueued = audit.of_task("task.enqueued", &unrecorded).await?;
    ensure!(u_enqueued.is_empty(), "{u_enqueued:?}");
    let claimed = audit.of_task("task.claimed", &recorded).await?;
    ensure!(
        claimed.len() == 1 && attr(&claimed[0], "worker_id") == w,
        "{claimed:?}"
    );
    let u_claimed = audit.of_task("task.claimed", &unrecorded).await?;
    ensure!(u_claimed.is_empty(), "{u_claimed:?}");
    Ok(())
}
