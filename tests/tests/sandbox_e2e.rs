//! Sandboxed runs end to end (DESIGN.md guarantee 1 and "One run, end to
//! end", steps 5 to 9): the real audit, identity, sealed-vault, dispatcher
//! and sandbox-runner binaries, real `bulkhead-worker` processes started with
//! `--sandbox-runner`, and the real Docker engine.
//!
//! Each tenant's run gets its own key and prints it; the task's summary
//! holds `<redacted:API_KEY>`. Then the credential-leak smoke test: canary
//! keys, planted from this process's memory through the API (never a file or
//! an argv), are searched for in the worker's and the dispatcher's memory
//! and environment, every file of the mesh (service logs, the audit store,
//! configs, every service's data), an audit export, the spans every service
//! exported, `docker inspect` of each running sandbox, the daemon's
//! container directory and the host's temp dirs — and found nowhere, while
//! the same scanner does find them in the sandbox's own process (the
//! positive control). After the runs no container of the runner is left.
//! Finally a hard revocation of a key kills its running sandbox within a
//! second and fails the task as REVOKED.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use bulkhead_mesh::client::MeshChannel;
use bulkhead_proto::audit::v1 as audit_pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_proto::identity::v1 as idpb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sealed::v1 as sealed_pb;
use bulkhead_proto::sealed::v1::sealed_vault_service_client::SealedVaultServiceClient;
use bulkhead_testkit::docker::{TEST_IMAGE, docker, docker_or_skip, ensure_test_image};
use bulkhead_testkit::mesh::TestMesh;
use memchr::memmem::Finder;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as OtlpValue;
use prost::Message as _;
use tokio::time::Instant;

type Dispatcher = DispatcherServiceClient<MeshChannel>;

const OPERATOR: &str = "admin/operator";
/// Agents are approved by an operator other than the submitter.
const REVIEWER: &str = "admin/bob";
/// The key every test agent asks for.
const KEY: &str = "API_KEY";
/// The runner's label on its containers naming its instance.
const LABEL_INSTANCE: &str = "bulkhead.runner.instance";
/// How long a run may take to reach a state a test waits for.
const WAIT: Duration = Duration::from_secs(40);
const POLL: Duration = Duration::from_millis(50);
/// Files larger than this are not read by the temp-dir scan.
const MAX_SCANNED_FILE: u64 = 64 << 20;

/// The tests of this file run one at a time: each starts a mesh and Docker
/// sandboxes, and the revocation test measures a latency.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// The leak scanner

/// The forms of the canaries a leak could take: each value as is (it is
/// plain ASCII, so URL-encoding and JSON-escaping leave it unchanged), and
/// its base64 at each of the three byte alignments, in both alphabets —
/// only the characters that depend on the value alone, so that a base64 of
/// the value inside other bytes (`echo "$KEY" | base64`, `key=$KEY`) is
/// found too.
struct Needles {
    finders: Vec<(String, Finder<'static>)>,
    longest: usize,
}

impl Needles {
    fn new(secrets: &[(&str, &str)]) -> Self {
        let mut finders = Vec::new();
        for (name, value) in secrets {
            finders.push((
                format!("{name} (plain)"),
                Finder::new(value.as_bytes()).into_owned(),
            ));
            for shift in 0..3usize {
                let mut bytes = vec![0u8; shift];
                bytes.extend_from_slice(value.as_bytes());
                let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
                // Characters mixing filler bits in front, and the last ones
                // (which depend on what follows the value), are left out.
                let skip = [0, 2, 3][shift];
                let core = &encoded[skip..encoded.len() - 3];
                let url = core.replace('+', "-").replace('/', "_");
                for (alphabet, form) in [("base64", core.to_owned()), ("base64url", url)] {
                    if alphabet == "base64url" && form == core {
                        continue;
                    }
                    finders.push((
                        format!("{name} ({alphabet}, offset {shift})"),
                        Finder::new(form.as_bytes()).into_owned(),
                    ));
                }
            }
        }
        let longest = finders
            .iter()
            .map(|(_, f)| f.needle().len())
            .max()
            .unwrap_or(0);
        Self { finders, longest }
    }

    /// The forms found in `haystack`.
    fn find(&self, haystack: &[u8]) -> Vec<String> {
        self.finders
            .iter()
            .filter(|(_, f)| f.find(haystack).is_some())
            .map(|(label, _)| label.clone())
            .collect()
    }
}

/// What a scan read and what it found (labels only, never values).
#[derive(Debug, Default)]
struct Scan {
    what: String,
    bytes: u64,
    items: usize,
    skipped: usize,
    hits: Vec<String>,
}

impl Scan {
    fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            ..Default::default()
        }
    }

    fn look(&mut self, place: &str, haystack: &[u8], needles: &Needles) {
        self.items += 1;
        self.bytes += haystack.len() as u64;
        for form in needles.find(haystack) {
            self.hits.push(format!("{form} in {place}"));
        }
    }

    /// Fails if anything was found, or if the scan read nothing at all.
    fn clean(&self) -> anyhow::Result<()> {
        ensure!(
            self.bytes > 0,
            "the scan of {} read nothing: it proves nothing",
            self.what
        );
        ensure!(
            self.hits.is_empty(),
            "LEAK in {}: {:#?}",
            self.what,
            self.hits
        );
        eprintln!(
            "leak scan: {}: {} items, {} bytes read, {} skipped: clean",
            self.what, self.items, self.bytes, self.skipped
        );
        Ok(())
    }
}

/// Every readable mapping of process `pid`, read through `/proc/<pid>/mem`
/// in overlapping chunks.
fn scan_memory(pid: u32, what: &str, needles: &Needles) -> anyhow::Result<Scan> {
    const CHUNK: u64 = 8 << 20;
    let mut scan = Scan::new(format!("memory of {what} (pid {pid})"));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("maps of {what}"))?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("memory of {what}"))?;
    let overlap = needles.longest as u64;
    let mut buf = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let name = fields.nth(3).unwrap_or("[anonymous]");
        if !perms.starts_with('r') || name == "[vvar]" || name == "[vsyscall]" {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (start, end) = (
            u64::from_str_radix(start, 16)?,
            u64::from_str_radix(end, 16)?,
        );
        let mut at = start;
        while at < end {
            let len = (CHUNK + overlap).min(end - at);
            buf.resize(usize::try_from(len)?, 0);
            match mem.read_exact_at(&mut buf, at) {
                Ok(()) => scan.look(name, &buf, needles),
                Err(_) => scan.skipped += 1,
            }
            at += CHUNK;
        }
    }
    Ok(scan)
}

/// The environment process `pid` was started with.
fn scan_environ(pid: u32, what: &str, needles: &Needles) -> anyhow::Result<Scan> {
    let mut scan = Scan::new(format!("environment of {what} (pid {pid})"));
    let environ = std::fs::read(format!("/proc/{pid}/environ"))
        .with_context(|| format!("environment of {what}"))?;
    scan.look("environ", &environ, needles);
    Ok(scan)
}

/// Every regular file under `root` (symlinks not followed, files over
/// [`MAX_SCANNED_FILE`] skipped).
fn scan_files(root: &Path, scan: &mut Scan, needles: &Needles) {
    scan_files_since(root, scan, needles, None);
}

/// As [`scan_files`], only files modified at or after `since` (when set): a
/// file that holds a canary was written after the canary was made.
fn scan_files_since(
    root: &Path,
    scan: &mut Scan,
    needles: &Needles,
    since: Option<std::time::SystemTime>,
) {
    let Ok(entries) = std::fs::read_dir(root) else {
        scan.skipped += 1;
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            scan.skipped += 1;
            continue;
        };
        if meta.is_dir() {
            scan_files_since(&path, scan, needles, since);
        } else if !meta.is_file() || meta.len() > MAX_SCANNED_FILE {
            scan.skipped += 1;
        } else if since.is_some_and(|t| meta.modified().is_ok_and(|m| m < t)) {
            // Older than the canaries: cannot hold them (and a build tree
            // under /tmp would otherwise take minutes to read).
        } else {
            match std::fs::read(&path) {
                Ok(bytes) => scan.look(&path.display().to_string(), &bytes, needles),
                Err(_) => scan.skipped += 1,
            }
        }
    }
}

fn scan_tree(what: &str, roots: &[&Path], needles: &Needles) -> Scan {
    let mut scan = Scan::new(what);
    for root in roots {
        scan_files(root, &mut scan, needles);
    }
    scan
}

/// The host's temp dirs: `$TMPDIR` (or its default) and `/tmp`, every file
/// written since the canaries were made.
fn scan_temp_dirs(needles: &Needles, since: std::time::SystemTime) -> Scan {
    let mut roots: BTreeSet<PathBuf> = BTreeSet::new();
    roots.insert(std::env::temp_dir());
    roots.insert(PathBuf::from("/tmp"));
    let mut scan = Scan::new("the host's temp dirs");
    for root in &roots {
        scan_files_since(root, &mut scan, needles, Some(since));
    }
    scan
}

/// A random canary: ASCII letters, digits and dashes.
fn canary(tenant: &str) -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("CANARY-{tenant}-{hex}")
}

// ---------------------------------------------------------------------------
// An OTLP collector every process exports its spans to

#[derive(Debug, Default)]
struct Spans {
    /// Every export request as it came over the wire.
    requests: Mutex<Vec<Vec<u8>>>,
    /// The `service.name` of every exporter seen.
    services: Mutex<BTreeSet<String>>,
    spans: Mutex<usize>,
}

struct Collector(Arc<Spans>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let req = req.into_inner();
        let mut services = self.0.services.lock().unwrap_or_else(|p| p.into_inner());
        let mut count = 0;
        for rs in &req.resource_spans {
            for kv in rs.resource.iter().flat_map(|r| &r.attributes) {
                if kv.key == "service.name"
                    && let Some(OtlpValue::StringValue(s)) =
                        kv.value.as_ref().and_then(|v| v.value.as_ref())
                {
                    services.insert(s.clone());
                }
            }
            count += rs.scope_spans.iter().map(|s| s.spans.len()).sum::<usize>();
        }
        drop(services);
        *self.0.spans.lock().unwrap_or_else(|p| p.into_inner()) += count;
        self.0
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(req.encode_to_vec());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn start_collector() -> anyhow::Result<(String, Arc<Spans>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let spans = Arc::new(Spans::default());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(spans.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok((format!("http://{addr}"), spans))
}

// ---------------------------------------------------------------------------
// The mesh, its workers and the runner's containers

/// One `bulkhead-worker` process.
struct WorkerProc {
    name: String,
    child: tokio::process::Child,
    log: PathBuf,
}

struct E2e {
    mesh: TestMesh,
    scratch: tempfile::TempDir,
    workers: Vec<WorkerProc>,
    /// The runner's instance id: the label on every container it makes.
    instance: String,
    otlp: String,
    spans: Arc<Spans>,
}

impl Drop for E2e {
    /// Whatever the test did, no container of this mesh's runner is left.
    fn drop(&mut self) {
        if self.instance.is_empty() {
            return;
        }
        for (id, ..) in containers(&self.instance).unwrap_or_default() {
            let _ = docker(&["rm", "-f", "-v", &id]);
        }
    }
}

/// The runner's containers: (id, tenant label, state).
fn containers(instance: &str) -> anyhow::Result<Vec<(String, String, String)>> {
    let filter = format!("label={LABEL_INSTANCE}={instance}");
    let out = docker(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &filter,
        "--format",
        "{{.ID}} {{.Label \"bulkhead.tenant\"}} {{.State}}",
    ])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.to_owned(),
                f.next()?.to_owned(),
                f.next()?.to_owned(),
            ))
        })
        .collect())
}

impl E2e {
    async fn start() -> anyhow::Result<Self> {
        let (otlp, spans) = start_collector().await?;
        let endpoint = otlp.clone();
        let mesh = TestMesh::start_with(|spec| {
            spec.otlp_endpoint = Some(endpoint);
        })
        .await?;
        let instance =
            std::fs::read_to_string(mesh.dir().join("data/sandbox-runner/runner-instance"))
                .context("the runner's instance id")?
                .trim()
                .to_owned();
        let scratch = tempfile::Builder::new()
            .prefix("bulkhead-sandbox-e2e-")
            .tempdir()?;
        Ok(Self {
            mesh,
            scratch,
            workers: Vec::new(),
            instance,
            otlp,
            spans,
        })
    }

    fn dispatcher(&self, who: &str) -> anyhow::Result<Dispatcher> {
        Ok(DispatcherServiceClient::new(
            self.mesh.channel("dispatcher", &self.mesh.identity(who)?)?,
        ))
    }

    fn sealed(&self) -> anyhow::Result<SealedVaultServiceClient<MeshChannel>> {
        Ok(SealedVaultServiceClient::new(
            self.mesh
                .channel("sealed-vault", &self.mesh.identity(OPERATOR)?)?,
        ))
    }

    fn audit(&self) -> anyhow::Result<AuditServiceClient<MeshChannel>> {
        Ok(AuditServiceClient::new(
            self.mesh.channel("audit", &self.mesh.identity(OPERATOR)?)?,
        ))
    }

    /// Every service's log tail and every worker's, for a failure message.
    fn logs(&self) -> String {
        let mut out = self.mesh.logs();
        for w in &self.workers {
            let text = std::fs::read_to_string(&w.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "\n--- worker {} ---\n{}",
                w.name,
                lines[lines.len().saturating_sub(30)..].join("\n")
            ));
        }
        out
    }

    /// A profile `<tenant>/<profile>` holding `KEY` = `value`, written
    /// through the API from memory (as `bulkhead secret put` reads stdin).
    async fn profile_with_key(
        &self,
        tenant: &str,
        profile: &str,
        value: &str,
    ) -> anyhow::Result<()> {
        let mut sealed = self.sealed()?;
        sealed
            .create_profile(sealed_pb::CreateProfileRequest {
                tenant: tenant.into(),
                name: profile.into(),
                spec: Some(sealed_pb::ProfileSpec {
                    description: "sandbox e2e".into(),
                    ..Default::default()
                }),
            })
            .await
            .context("CreateProfile")?;
        sealed
            .put_secret(sealed_pb::PutSecretRequest {
                tenant: tenant.into(),
                profile: profile.into(),
                key: KEY.into(),
                source: Some(sealed_pb::put_secret_request::Source::Value(
                    value.as_bytes().to_vec().into(),
                )),
            })
            .await
            .context("PutSecret")?;
        Ok(())
    }

    /// Submits an agent asking for `KEY` and has the second operator approve it.
    async fn approved_agent(
        &self,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> anyhow::Result<()> {
        self.dispatcher(OPERATOR)?
            .submit_agent(pb::SubmitAgentRequest {
                name: name.into(),
                version: "1.0.0".into(),
                image: image.into(),
                command: command.iter().map(|s| (*s).to_owned()).collect(),
                requested_secret_keys: vec![KEY.into()],
                description: "sandbox e2e agent".into(),
                ..Default::default()
            })
            .await
            .context("SubmitAgent")?;
        let approved = self
            .dispatcher(REVIEWER)?
            .approve_agent(pb::ApproveAgentRequest {
                name: name.into(),
                version: "1.0.0".into(),
                comment: "reviewed".into(),
            })
            .await
            .context("ApproveAgent")?
            .into_inner()
            .agent
            .context("no agent")?;
        ensure!(
            approved.status() == pb::AgentStatus::Approved,
            "{approved:?}"
        );
        Ok(())
    }

    /// Starts a real `bulkhead-worker` of `tenant` with `--sandbox-runner`,
    /// and waits until the dispatcher lists it connected.
    async fn start_worker(&mut self, tenant: &str, backend: &str) -> anyhow::Result<()> {
        let token = IdentityServiceClient::new(
            self.mesh
                .channel("identity", &self.mesh.identity(OPERATOR)?)?,
        )
        .create_join_token(idpb::CreateJoinTokenRequest {
            tenant: tenant.into(),
            ttl: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            max_uses: 1,
            description: "sandbox e2e".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .token;
        let name = format!("{tenant}-host");
        let dir = self.scratch.path().join(&name);
        std::fs::create_dir_all(dir.join("state"))?;
        std::fs::create_dir_all(dir.join("runs"))?;
        let log = dir.join("worker.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = tokio::process::Command::new(bulkhead_cluster::find_binary("worker", None)?)
            .arg("--dispatcher")
            .arg(self.mesh.addr("dispatcher")?)
            .arg("--identity")
            .arg(self.mesh.addr("identity")?)
            .arg("--ca")
            .arg(&self.mesh.mesh.endpoints.ca)
            .arg("--name")
            .arg(&name)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--work-dir")
            .arg(dir.join("runs"))
            .arg("--sandbox-runner")
            .arg(self.mesh.addr("sandbox-runner")?)
            .arg("--sandbox-backend")
            .arg(backend)
            .arg("--otlp-endpoint")
            .arg(&self.otlp)
            .arg("--shutdown-grace-secs")
            .arg("2")
            .arg("--log-format")
            .arg("json")
            // A credential: in the environment, not on the command line.
            .env("BULKHEAD_JOIN_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .context("start bulkhead-worker")?;
        self.workers.push(WorkerProc {
            name: name.clone(),
            child,
            log,
        });
        let mut op = self.dispatcher(OPERATOR)?;
        let deadline = Instant::now() + WAIT;
        loop {
            let workers = op
                .list_workers(pb::ListWorkersRequest {
                    tenant: tenant.into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .workers;
            if let Some(w) = workers
                .iter()
                .find(|w| w.worker_id.starts_with(&name) && w.state() == pb::WorkerState::Connected)
            {
                let want = match backend {
                    "process" => bulkhead_proto::sandbox::v1::SandboxBackend::Process,
                    _ => bulkhead_proto::sandbox::v1::SandboxBackend::Docker,
                };
                ensure!(
                    w.sandbox_backends == vec![want as i32],
                    "the worker registers with the backend it asks the runner for: {w:?}"
                );
                return Ok(());
            }
            if let Some(w) = self.workers.last_mut()
                && let Some(status) = w.child.try_wait()?
            {
                bail!("worker {name} exited ({status})\n{}", self.logs());
            }
            ensure!(
                Instant::now() < deadline,
                "worker {name} never connected\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    fn worker_pids(&self) -> Vec<(String, u32)> {
        self.workers
            .iter()
            .filter_map(|w| Some((format!("worker {}", w.name), w.child.id()?)))
            .collect()
    }

    async fn enqueue(
        &self,
        tenant: &str,
        agent: &str,
        profile: &str,
        payload: &str,
    ) -> anyhow::Result<String> {
        let resp = self
            .dispatcher(&format!("tenant/{tenant}/client/backend"))?
            .enqueue(pb::EnqueueRequest {
                tenant: tenant.into(),
                agent: agent.into(),
                cascade: Some(sealed_pb::Cascade {
                    run: Some(sealed_pb::CascadeLevel {
                        profile: Some(sealed_pb::ProfileRef {
                            tenant: tenant.into(),
                            profile: profile.into(),
                        }),
                        overrides: Default::default(),
                    }),
                    ..Default::default()
                }),
                payload: payload.as_bytes().to_vec().into(),
                timeout: Some(prost_types::Duration {
                    seconds: 120,
                    nanos: 0,
                }),
                max_attempts: 1,
                ..Default::default()
            })
            .await
            .context("Enqueue")?
            .into_inner();
        Ok(resp.task_id)
    }

    /// Waits until the task reaches a final status.
    async fn finished(&self, tenant: &str, task_id: &str) -> anyhow::Result<pb::Task> {
        let mut client = self.dispatcher(&format!("tenant/{tenant}/client/backend"))?;
        let deadline = Instant::now() + WAIT;
        loop {
            let task = client
                .get_task(pb::GetTaskRequest {
                    tenant: tenant.into(),
                    task_id: task_id.into(),
                })
                .await?
                .into_inner()
                .task
                .context("no task")?;
            if matches!(
                task.status(),
                pb::TaskStatus::Succeeded | pb::TaskStatus::Failed | pb::TaskStatus::Cancelled
            ) {
                return Ok(task);
            }
            ensure!(
                Instant::now() < deadline,
                "task {task_id} never finished; last: {:?} {}\n{}",
                task.status(),
                task.status_reason,
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `n` containers of the runner run; (id, tenant).
    async fn running_containers(&self, n: usize) -> anyhow::Result<Vec<(String, String)>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let running: Vec<(String, String)> = containers(&self.instance)?
                .into_iter()
                .filter(|(_, _, state)| state == "running")
                .map(|(id, tenant, _)| (id, tenant))
                .collect();
            if running.len() >= n {
                return Ok(running);
            }
            ensure!(
                Instant::now() < deadline,
                "{n} sandboxes never ran; running: {running:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Every audit event.
    async fn audit_events(&self) -> anyhow::Result<Vec<audit_pb::Event>> {
        let mut client = self.audit()?;
        let mut out = Vec::new();
        let mut after = 0;
        for _ in 0..1000 {
            let page = client
                .query(audit_pb::QueryRequest {
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
        bail!("the audit log paged for ever")
    }

    /// Waits until audit holds an event of `kind` for `run`.
    async fn audited(&self, kind: &str, run: &str) -> anyhow::Result<audit_pb::Event> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self
                .audit_events()
                .await?
                .into_iter()
                .find(|e| e.r#type == kind && e.run_id == run)
            {
                return Ok(e);
            }
            ensure!(
                Instant::now() < deadline,
                "no {kind} event for run {run} in audit"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The audit log as compliance exports it (JSON Lines).
    async fn audit_export(&self) -> anyhow::Result<String> {
        let mut stream = self
            .audit()?
            .export(audit_pb::ExportRequest::default())
            .await?
            .into_inner();
        let mut out = String::new();
        while let Some(line) = stream.message().await? {
            out.push_str(&line.line);
        }
        Ok(out)
    }

    /// Stops every worker and every service gracefully (their spans are
    /// flushed on the way out).
    async fn stop_all(&mut self) {
        for w in &mut self.workers {
            if let Some(pid) = w.child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await;
        }
        for name in bulkhead_cluster::SERVICES.iter().rev() {
            if let Some(p) = self.mesh.mesh.process_mut(name) {
                p.stop().await;
            }
        }
    }
}

/// Waits until the agent of `container` runs with its keys, and returns its
/// host pid. The container runs the shim first, which waits for the keys on
/// its stdin and then execs the agent with them in its environment.
async fn agent_started(container: &str) -> anyhow::Result<u32> {
    let pid: u32 = docker(&["inspect", "--format", "{{.State.Pid}}", container])?
        .trim()
        .parse()
        .context("the sandbox's pid")?;
    let name = Finder::new(b"\0API_KEY=");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if name.find(&environ).is_some() || environ.starts_with(b"API_KEY=") {
            return Ok(pid);
        }
        ensure!(
            Instant::now() < deadline,
            "the agent in {container} never started with its keys"
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn setup() -> anyhow::Result<Option<E2e>> {
    if !docker_or_skip()? {
        return Ok(None);
    }
    ensure_test_image()?;
    Ok(Some(E2e::start().await?))
}

/// The agent of the first test: prints its key, plain and in base64, its
/// tenant and payload, then stays a few seconds so that its sandbox can be
/// inspected while it runs.
const KEYED_AGENT: &str = "echo \"key=$API_KEY\"; echo \"$API_KEY\" | base64; \
     echo \"tenant=$BULKHEAD_TENANT\"; read -r line; echo \"payload=$line\"; sleep 6; echo done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenants_run_gets_its_own_key_and_the_key_leaks_nowhere() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(mut e2e) = setup().await? else {
        return Ok(());
    };
    let started = Instant::now();
    // Filesystem times have coarse granularity: a second of slack.
    let canaries_made = std::time::SystemTime::now() - Duration::from_secs(1);
    let tenants = ["acme", "globex"];
    let canaries: BTreeMap<&str, String> = tenants.iter().map(|t| (*t, canary(t))).collect();
    for t in tenants {
        e2e.profile_with_key(t, &format!("{t}-prod"), &canaries[t])
            .await?;
    }
    let named: Vec<(String, &str)> = canaries
        .iter()
        .map(|(t, v)| (format!("{t}'s canary"), v.as_str()))
        .collect();
    let pairs: Vec<(&str, &str)> = named.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    let needles = Needles::new(&pairs);
    e2e.approved_agent("keyed", TEST_IMAGE, &["sh", "-c", KEYED_AGENT])
        .await?;
    for t in tenants {
        e2e.start_worker(t, "docker").await?;
    }
    let mut tasks = BTreeMap::new();
    for t in tenants {
        let id = e2e
            .enqueue(
                t,
                "keyed",
                &format!("{t}-prod"),
                &format!("hello from {t}\n"),
            )
            .await?;
        tasks.insert(t, id);
    }

    // While both sandboxes run: the engine's view of them, and the positive
    // control — the scanner finds each canary in its own sandbox's process,
    // and only there.
    let running = e2e.running_containers(2).await?;
    let dispatcher_pid = e2e
        .mesh
        .mesh
        .process("dispatcher")
        .and_then(|p| p.pid())
        .context("the dispatcher's pid")?;
    for (id, tenant) in &running {
        let own = Needles::new(&[("own canary", canaries[tenant.as_str()].as_str())]);
        let pid = agent_started(id).await?;
        let environ = scan_environ(pid, &format!("the {tenant} sandbox"), &own)?;
        ensure!(
            environ.hits.iter().any(|h| h.contains("plain")),
            "positive control: the {tenant} agent's environment holds its key: {environ:?}"
        );
        let memory = scan_memory(pid, &format!("the {tenant} sandbox"), &own)?;
        ensure!(
            memory.hits.iter().any(|h| h.contains("plain")),
            "positive control: the {tenant} agent's memory holds its key: {:?}",
            memory.hits
        );
        eprintln!(
            "positive control: the {tenant} sandbox's process (pid {pid}) holds its key ({} bytes of memory read)",
            memory.bytes
        );
        let other = tenants.iter().find(|t| **t != tenant).context("other")?;
        let theirs = Needles::new(&[("other tenant's canary", canaries[*other].as_str())]);
        scan_environ(pid, &format!("the {tenant} sandbox"), &theirs)?.clean()?;
        scan_memory(pid, &format!("the {tenant} sandbox"), &theirs)?.clean()?;

        let inspect = docker(&["inspect", id])?;
        ensure!(
            inspect.contains(&format!("\"bulkhead.tenant\": \"{tenant}\"")),
            "inspected the right container"
        );
        let mut scan = Scan::new(format!("docker inspect of the {tenant} sandbox"));
        scan.look("docker inspect", inspect.as_bytes(), &needles);
        scan.clean()?;
        let root = docker(&["info", "--format", "{{.DockerRootDir}}"])?;
        let on_disk = Path::new(root.trim()).join("containers").join(id);
        ensure!(
            on_disk.is_dir(),
            "the daemon's container directory {} is readable here",
            on_disk.display()
        );
        let scan = scan_tree(
            &format!("the daemon's directory of the {tenant} sandbox"),
            &[&on_disk],
            &needles,
        );
        ensure!(
            scan.items >= 2,
            "config.v2.json and hostconfig.json read: {scan:?}"
        );
        scan.clean()?;
    }
    for (what, pid) in e2e
        .worker_pids()
        .into_iter()
        .chain([("the dispatcher".to_owned(), dispatcher_pid)])
    {
        scan_memory(pid, &what, &needles)?.clean()?;
        scan_environ(pid, &what, &needles)?.clean()?;
    }

    // Each run succeeds with its own key, redacted in what the worker reports.
    let mut runs = BTreeMap::new();
    for t in tenants {
        let task = e2e.finished(t, &tasks[t]).await?;
        ensure!(
            task.status() == pb::TaskStatus::Succeeded
                && task.outcome() == pb::RunOutcome::Succeeded,
            "the {t} task: {:?} {:?} {}\n{}",
            task.status(),
            task.outcome(),
            task.output_summary,
            e2e.logs()
        );
        let lines: Vec<&str> = task.output_summary.lines().collect();
        ensure!(
            lines.first() == Some(&"key=<redacted:API_KEY>"),
            "{t}: {lines:?}"
        );
        // `echo | base64` encodes a newline too: what is left is its last characters.
        ensure!(
            lines
                .get(1)
                .is_some_and(|l| l.starts_with("<redacted:API_KEY>")),
            "{t}: the base64 is redacted: {lines:?}"
        );
        ensure!(lines.contains(&format!("tenant={t}").as_str()), "{lines:?}");
        ensure!(
            lines.contains(&format!("payload=hello from {t}").as_str()),
            "{lines:?}"
        );
        ensure!(lines.last() == Some(&"done"), "{lines:?}");
        let mut scan = Scan::new(format!("the {t} task's report"));
        scan.look("output_summary", task.output_summary.as_bytes(), &needles);
        scan.clean()?;
        runs.insert(t, task.run_id.clone());
    }

    // Released at the end of each run: no container of the runner is left.
    let left = containers(&e2e.instance)?;
    ensure!(left.is_empty(), "containers left after the runs: {left:?}");
    for t in tenants {
        let run = &runs[t];
        let injected = e2e.audited("sandbox.credential.injected", run).await?;
        ensure!(
            injected
                .attributes
                .get("keys")
                .is_some_and(|k| k.starts_with("API_KEY@")),
            "{injected:?}"
        );
        ensure!(injected.tenant == t, "{injected:?}");
        let scrubbed = e2e.audited("sandbox.scrubbed", run).await?;
        ensure!(
            scrubbed
                .attributes
                .get("zeroized_values")
                .map(String::as_str)
                == Some("1"),
            "{scrubbed:?}"
        );
        e2e.audited("sealed.credential.resolved", run).await?;
        e2e.audited("identity.revoked", run).await?;
    }

    // After the runs: the processes that must never hold a key, again.
    for (what, pid) in e2e
        .worker_pids()
        .into_iter()
        .chain([("the dispatcher".to_owned(), dispatcher_pid)])
    {
        scan_memory(pid, &what, &needles)?.clean()?;
    }
    // The runner zeroized its copies on release (guarantee 1): its whole
    // memory holds no form of either key any more (its allocator zeroes what
    // is freed, and Resolve's connection did not outlive the start).
    let runner_pid = e2e
        .mesh
        .mesh
        .process("sandbox-runner")
        .and_then(|p| p.pid())
        .context("the sandbox-runner's pid")?;
    scan_memory(runner_pid, "the sandbox-runner after release", &needles)?.clean()?;

    // The audit log as compliance reads it.
    let export = e2e.audit_export().await?;
    ensure!(
        runs.values().all(|r| export.contains(r.as_str())),
        "the export holds the runs' events"
    );
    let mut scan = Scan::new("the audit export and query");
    scan.look("export", export.as_bytes(), &needles);
    let events = format!("{:?}", e2e.audit_events().await?);
    scan.look("query", events.as_bytes(), &needles);
    scan.clean()?;

    // Everything the processes wrote, once they have stopped and flushed.
    e2e.stop_all().await;
    let spans = e2e
        .spans
        .requests
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let services = e2e
        .spans
        .services
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let all_spans: Vec<u8> = spans.concat();
    ensure!(
        runs.values()
            .all(|r| Finder::new(r.as_bytes()).find(&all_spans).is_some()),
        "the exported spans name the runs ({} spans from {services:?})",
        e2e.spans.spans.lock().map(|n| *n).unwrap_or(0)
    );
    for s in ["worker", "sandbox-runner", "sealed-vault", "dispatcher"] {
        let s = format!("bulkhead-{s}");
        ensure!(services.contains(&s), "no spans from {s}: {services:?}");
    }
    let mut scan = Scan::new(format!("the spans exported by {services:?}"));
    for (i, req) in spans.iter().enumerate() {
        scan.look(&format!("export request {i}"), req, &needles);
    }
    scan.clean()?;

    let logs: String = bulkhead_cluster::SERVICES
        .iter()
        .filter_map(|s| e2e.mesh.mesh.process(s))
        .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
        .collect();
    ensure!(
        logs.contains("sandbox released") && runs.values().all(|r| logs.contains(r.as_str())),
        "the service logs record the runs"
    );
    // The mesh's files: every service's log, config and data (the audit
    // store, sealed-vault's encrypted store, the runner's sandboxes dir),
    // and the workers' state, run dirs and logs.
    let audit_db = std::fs::read_dir(e2e.mesh.dir().join("data/audit"))?
        .flatten()
        .filter(|e| e.path().is_file())
        .count();
    ensure!(audit_db > 0, "the audit store's files are on disk");
    scan_tree(
        "the mesh's and the workers' files (logs, audit store, data)",
        &[e2e.mesh.dir(), e2e.scratch.path()],
        &needles,
    )
    .clean()?;

    // The file scanner's own positive control: a planted control value, in
    // base64 at an odd offset, is found where it was put.
    let control = canary("control");
    let control_needles = Needles::new(&[("control", control.as_str())]);
    let planted = e2e.scratch.path().join("planted");
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("x={control}\n"));
    std::fs::write(&planted, format!("some log line {encoded}\n"))?;
    let found = scan_tree(
        "the planted control",
        &[e2e.scratch.path()],
        &control_needles,
    );
    ensure!(
        found.hits.iter().any(|h| h.contains("base64")),
        "positive control: the file scanner finds a planted base64 form: {found:?}"
    );
    std::fs::remove_file(&planted)?;

    scan_temp_dirs(&needles, canaries_made).clean()?;
    eprintln!("the leak test took {:?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_revocation_of_the_key_kills_the_run_and_fails_the_task() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(mut e2e) = setup().await? else {
        return Ok(());
    };
    let key = canary("acme");
    e2e.profile_with_key("acme", "acme-prod", &key).await?;
    e2e.approved_agent(
        "long-runner",
        TEST_IMAGE,
        &["sh", "-c", "echo \"started with $API_KEY\"; sleep 60"],
    )
    .await?;
    e2e.start_worker("acme", "docker").await?;
    let task_id = e2e.enqueue("acme", "long-runner", "acme-prod", "").await?;
    let running = e2e.running_containers(1).await?;
    let (container, _) = running.first().context("a sandbox")?.clone();
    agent_started(&container).await?;

    let revoked = e2e
        .sealed()?
        .revoke_secret(sealed_pb::RevokeSecretRequest {
            tenant: "acme".into(),
            profile: "acme-prod".into(),
            key: KEY.into(),
            hard: true,
            reason: "sandbox e2e: key leaked".into(),
        })
        .await?
        .into_inner();
    let at = Instant::now();
    // The sandbox is killed: its container stops (then goes).
    loop {
        let state = docker(&["inspect", "--format", "{{.State.Running}}", &container]);
        if !state.is_ok_and(|s| s.trim() == "true") {
            break;
        }
        ensure!(
            at.elapsed() < Duration::from_secs(10),
            "the sandbox still runs 10 s after the revocation\n{}",
            e2e.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = at.elapsed();
    eprintln!("revocation → sandbox stopped: {took:?} (docker CLI polling included)");
    ensure!(
        took < Duration::from_millis(1500),
        "the sandbox was killed {took:?} after the revocation (goal: 1 s)"
    );

    let task = e2e.finished("acme", &task_id).await?;
    ensure!(
        revoked.affected_run_ids.contains(&task.run_id),
        "{revoked:?} {task:?}"
    );
    ensure!(
        task.status() == pb::TaskStatus::Failed && task.outcome() == pb::RunOutcome::Revoked,
        "the task: {:?} {:?} {}\n{}",
        task.status(),
        task.outcome(),
        task.output_summary,
        e2e.logs()
    );
    ensure!(
        task.output_summary
            .contains("started with <redacted:API_KEY>")
            && task.output_summary.contains("[sandbox ended: REVOKED"),
        "{}",
        task.output_summary
    );
    let aborted = e2e
        .audited("run.aborted_by_revocation", &task.run_id)
        .await?;
    ensure!(aborted.tenant == "acme", "{aborted:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !containers(&e2e.instance)?.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "the revoked sandbox's container was never removed"
        );
        tokio::time::sleep(POLL).await;
    }
    // A new task needing the key fails closed: refused at enqueue, or
    // failed when its sandbox is refused the key.
    match e2e.enqueue("acme", "long-runner", "acme-prod", "").await {
        Ok(id) => {
            let task = e2e.finished("acme", &id).await?;
            ensure!(task.status() == pb::TaskStatus::Failed, "{task:?}");
        }
        Err(e) => {
            let code = e.downcast_ref::<tonic::Status>().map(tonic::Status::code);
            ensure!(code == Some(tonic::Code::FailedPrecondition), "{e:?}");
        }
    }
    e2e.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_backend_runs_the_agent_with_its_key() -> anyhow::Result<()> {
    // Needs no Docker: the runner's process backend, allowed the dev
    // programs by the local mesh.
    let _serial = SERIAL.lock().await;
    let mut e2e = E2e::start().await?;
    let key = canary("acme");
    e2e.profile_with_key("acme", "acme-prod", &key).await?;
    e2e.approved_agent(
        "keyed-process",
        // A process-backend agent names its program as its image.
        "/bin/sh",
        &[
            "/bin/sh",
            "-c",
            "echo \"key=$API_KEY\"; echo \"$API_KEY\" | base64; env | grep -c PATH",
        ],
    )
    .await?;
    e2e.start_worker("acme", "process").await?;
    let task_id = e2e
        .enqueue("acme", "keyed-process", "acme-prod", "")
        .await?;
    let task = e2e.finished("acme", &task_id).await?;
    ensure!(
        task.status() == pb::TaskStatus::Succeeded,
        "{:?} {:?} {}\n{}",
        task.status(),
        task.outcome(),
        task.output_summary,
        e2e.logs()
    );
    let lines: Vec<&str> = task.output_summary.lines().collect();
    ensure!(
        lines.first() == Some(&"key=<redacted:API_KEY>"),
        "{lines:?}"
    );
    ensure!(
        lines
            .get(1)
            .is_some_and(|l| l.starts_with("<redacted:API_KEY>")),
        "{lines:?}"
    );
    let needles = Needles::new(&[("canary", key.as_str())]);
    let mut scan = Scan::new("the task's report");
    scan.look("output_summary", task.output_summary.as_bytes(), &needles);
    scan.clean()?;
    for (what, pid) in e2e.worker_pids() {
        scan_memory(pid, &what, &needles)?.clean()?;
    }
    e2e.audited("sandbox.scrubbed", &task.run_id).await?;
    e2e.stop_all().await;
    Ok(())
}
