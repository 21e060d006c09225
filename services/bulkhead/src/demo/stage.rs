//! The demo's stage: a local mesh of the five real services (LocalMesh), the
//! real `bulkhead-worker` processes it enrolled, the parties' certificates
//! (operators, tenant backends) issued in memory from the mesh's CA, and the
//! calls the scenarios share. Everything it starts it stops, by PID.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail, ensure};
use bulkhead_cluster::{Endpoints, LocalMesh, MeshSpec};
use bulkhead_mesh::client::{self, MeshChannel};
use bulkhead_mesh::pki::{Ca, SvidOptions};
use bulkhead_mesh::spiffe::TrustDomain;
use bulkhead_mesh::tls::{ExpectServer, Identity, TrustBundle};
use bulkhead_proto::audit::v1 as audit_pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_proto::identity::v1 as id_pb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sealed::v1 as sealed_pb;
use bulkhead_proto::sealed::v1::sealed_vault_service_client::SealedVaultServiceClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Child;
use zeroize::Zeroizing;

pub type Dispatcher = DispatcherServiceClient<MeshChannel>;

/// The trust domain of the demo's mesh.
pub const TRUST_DOMAIN: &str = "bulkhead.demo";
/// The operator who submits agents (the mesh's own operator certificate).
pub const OPERATOR: &str = "admin/operator";
/// The second operator, who reviews and approves agents.
pub const REVIEWER: &str = "admin/reviewer";
/// How long the demo waits for something it expects to happen.
pub const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// One `bulkhead-worker` process the demo started.
#[derive(Debug)]
pub struct WorkerProc {
    pub name: String,
    pub tenant: String,
    pub pool: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    child: Child,
}

impl WorkerProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM by its PID; SIGKILL if it has not gone after a few seconds.
    async fn stop(&mut self) {
        if let Some(pid) = self.child.id()
            && let Ok(pid) = i32::try_from(pid)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(8), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// How to start one worker.
#[derive(Debug, Clone)]
pub struct WorkerSpec<'a> {
    pub name: &'a str,
    /// Its tenant, or empty for an org-global pool worker.
    pub tenant: &'a str,
    /// Its pool, when `tenant` is empty.
    pub pool: &'a str,
    /// `k=v,...`
    pub labels: &'a str,
    /// The host's sandbox-runner, when runs go to sandboxes.
    pub sandbox: Option<&'a str>,
    /// The backend asked of it (`docker` or `process`).
    pub sandbox_backend: Option<&'a str>,
    /// Docker networks its sandboxes ask to join (`--sandbox-network`).
    pub sandbox_networks: &'a [String],
}

impl<'a> WorkerSpec<'a> {
    pub fn tenant(name: &'a str, tenant: &'a str, labels: &'a str) -> Self {
        Self {
            name,
            tenant,
            pool: "",
            labels,
            sandbox: None,
            sandbox_backend: None,
            sandbox_networks: &[],
        }
    }

    pub fn pool(name: &'a str, pool: &'a str, labels: &'a str) -> Self {
        Self {
            name,
            tenant: "",
            pool,
            labels,
            sandbox: None,
            sandbox_backend: None,
            sandbox_networks: &[],
        }
    }
}

/// How to start the stage.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to keep the mesh; a temp dir (removed at the end) when unset.
    pub dir: Option<PathBuf>,
    /// The sandbox-runner's extra settings.
    pub runner: toml::Table,
}

/// The running mesh, its workers and the parties' identities.
pub struct Stage {
    pub dir: PathBuf,
    /// Set when the demo runs in a temp dir of its own (removed at the end).
    temp: Option<tempfile::TempDir>,
    mesh: Option<LocalMesh>,
    ca: Ca,
    bundle: TrustBundle,
    workers: Vec<WorkerProc>,
    /// When the demo started: temp files newer than this are leak-scanned.
    pub started: SystemTime,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("dir", &self.dir)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl Stage {
    /// Makes the PKI (if missing) and starts the five services on free
    /// loopback ports, with embedded defaults, under `dir` (or a temp dir).
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        let started = SystemTime::now();
        let (dir, temp) = match options.dir {
            Some(d) => {
                std::fs::create_dir_all(&d)
                    .with_context(|| format!("failed to create {}", d.display()))?;
                (std::path::absolute(&d)?, None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("bulkhead-demo-")
                    .tempdir()?;
                (t.path().to_owned(), Some(t))
            }
        };
        if temp.is_none() {
            fresh_state(&dir).await?;
        }
        let mut spec = MeshSpec::new(&dir);
        spec.trust_domain = TRUST_DOMAIN.into();
        spec.audit_view = true;
        // Heartbeats every second, so that the story shows them arriving.
        let mut fleet = toml::Table::new();
        fleet.insert("heartbeat_ms".into(), toml::Value::Integer(1000));
        let mut dispatcher = toml::Table::new();
        dispatcher.insert("fleet".into(), toml::Value::Table(fleet));
        spec.extra.insert("dispatcher".into(), dispatcher);
        spec.extra.insert("sandbox-runner".into(), options.runner);
        let mesh = LocalMesh::start(&spec)
            .await
            .context("failed to start the mesh")?;
        let ca = Ca::load_dir(&dir.join("pki")).context("failed to load the mesh's CA")?;
        let (_, bundle) = mesh.operator();
        let bundle = bundle.clone();
        Ok(Self {
            dir,
            temp,
            mesh: Some(mesh),
            ca,
            bundle,
            workers: Vec::new(),
            started,
        })
    }

    pub fn mesh(&self) -> &LocalMesh {
        self.mesh
            .as_ref()
            .unwrap_or_else(|| unreachable!("the mesh runs until shutdown"))
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.mesh().endpoints
    }

    pub fn kept(&self) -> bool {
        self.temp.is_none()
    }

    pub fn addr(&self, service: &str) -> anyhow::Result<String> {
        Ok(self.endpoints().address(service)?.to_owned())
    }

    /// The PID of one of the five services.
    pub fn service_pid(&self, name: &str) -> Option<u32> {
        self.mesh().process(name).and_then(|p| p.pid())
    }

    /// The sandbox-runner's instance id: the label on each of its containers.
    pub fn runner_instance(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("data/sandbox-runner/runner-instance"))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    /// `spiffe://<td>/<path>`.
    pub fn spiffe(&self, path: &str) -> String {
        format!("spiffe://{}/{path}", self.trust_domain())
    }

    /// A fresh X.509-SVID for `path` (e.g. `tenant/acme/client/backend`),
    /// signed by the mesh's CA, held in memory only.
    pub fn identity(&self, path: &str) -> anyhow::Result<Identity> {
        let id = self.trust_domain().join(path.split('/'))?;
        let svid = self.ca.issue(&id, &SvidOptions::default())?;
        let chain = format!("{}{}", svid.cert_pem, self.ca.cert_pem());
        let key = Zeroizing::new(svid.key_pem.clone());
        Ok(Identity::from_pem(chain.as_bytes(), key.as_bytes(), path)?)
    }

    pub fn channel(&self, service: &str, who: &Identity) -> anyhow::Result<MeshChannel> {
        Ok(client::channel(
            &self.addr(service)?,
            Some(who),
            &self.bundle,
            ExpectServer::Service(service.to_owned()),
        )?)
    }

    pub fn dispatcher(&self, who: &str) -> anyhow::Result<Dispatcher> {
        Ok(DispatcherServiceClient::new(
            self.channel("dispatcher", &self.identity(who)?)?,
        ))
    }

    pub fn sealed(&self, who: &str) -> anyhow::Result<SealedVaultServiceClient<MeshChannel>> {
        Ok(SealedVaultServiceClient::new(
            self.channel("sealed-vault", &self.identity(who)?)?,
        ))
    }

    pub fn audit(&self) -> anyhow::Result<AuditServiceClient<MeshChannel>> {
        Ok(AuditServiceClient::new(
            self.channel("audit", &self.identity(OPERATOR)?)?,
        ))
    }

    fn identity_service(&self) -> anyhow::Result<IdentityServiceClient<MeshChannel>> {
        Ok(IdentityServiceClient::new(
            self.channel("identity", &self.identity(OPERATOR)?)?,
        ))
    }

    /// A single-use join token for a tenant (or, with `tenant` empty, a pool).
    async fn join_token(&self, tenant: &str, pool: &str) -> anyhow::Result<String> {
        Ok(self
            .identity_service()?
            .create_join_token(id_pb::CreateJoinTokenRequest {
                tenant: tenant.into(),
                pool: pool.into(),
                ttl: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                max_uses: 1,
                description: "bulkhead demo".into(),
            })
            .await
            .context("CreateJoinToken")?
            .into_inner()
            .token)
    }

    /// Starts a real `bulkhead-worker` enrolled with a fresh join token and
    /// waits until the dispatcher lists it connected; returns its worker record.
    pub async fn start_worker(&mut self, spec: WorkerSpec<'_>) -> anyhow::Result<pb::Worker> {
        let token = Zeroizing::new(self.join_token(spec.tenant, spec.pool).await?);
        let exe = bulkhead_cluster::find_binary("worker", None)?;
        let dir = self.dir.join("workers").join(spec.name);
        std::fs::create_dir_all(dir.join("state"))?;
        std::fs::create_dir_all(dir.join("runs"))?;
        let log = dir.join("worker.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("--dispatcher")
            .arg(self.addr("dispatcher")?)
            .arg("--identity")
            .arg(self.addr("identity")?)
            .arg("--ca")
            .arg(&self.endpoints().ca)
            .arg("--name")
            .arg(spec.name)
            .arg("--labels")
            .arg(spec.labels)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--work-dir")
            .arg(dir.join("runs"))
            .arg("--shutdown-grace-secs")
            .arg("2")
            .arg("--log-format")
            .arg("json");
        if let Some(runner) = spec.sandbox {
            cmd.arg("--sandbox-runner").arg(runner);
        }
        if let Some(backend) = spec.sandbox_backend {
            cmd.arg("--sandbox-backend").arg(backend);
        }
        for net in spec.sandbox_networks {
            cmd.arg("--sandbox-network").arg(net);
        }
        let child = cmd
            // A credential: in the environment, never on the command line.
            .env("BULKHEAD_JOIN_TOKEN", token.as_str())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .context("failed to start bulkhead-worker")?;
        self.workers.push(WorkerProc {
            name: spec.name.to_owned(),
            tenant: spec.tenant.to_owned(),
            pool: spec.pool.to_owned(),
            dir,
            log,
            child,
        });
        self.wait_connected(spec.name).await
    }

    /// Waits until the worker named `name` (id `<name>-<hex>`) is connected.
    async fn wait_connected(&mut self, name: &str) -> anyhow::Result<pb::Worker> {
        let deadline = Instant::now() + WAIT;
        let mut op = self.dispatcher(OPERATOR)?;
        loop {
            let workers = list_workers(&mut op, "", "").await?;
            if let Some(w) = workers.into_iter().find(|w| {
                worker_named(&w.worker_id, name) && w.state() == pb::WorkerState::Connected
            }) {
                return Ok(w);
            }
            let w = self
                .workers
                .iter_mut()
                .find(|w| w.name == name)
                .context("no such worker")?;
            if let Some(status) = w.child.try_wait()? {
                bail!(
                    "worker {name} exited ({status}) before connecting\n{}",
                    w.tail(20)
                );
            }
            ensure!(
                Instant::now() < deadline,
                "worker {name} never connected\n{}",
                w.tail(20)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn worker(&self, name: &str) -> Option<&WorkerProc> {
        self.workers.iter().find(|w| w.name == name)
    }

    pub fn workers(&self) -> &[WorkerProc] {
        &self.workers
    }

    /// Stops one worker (SIGTERM by PID) and forgets it.
    pub async fn stop_worker(&mut self, name: &str) {
        if let Some(i) = self.workers.iter().position(|w| w.name == name) {
            let mut w = self.workers.remove(i);
            w.stop().await;
        }
    }

    /// Stops every worker the demo started.
    pub async fn stop_workers(&mut self) {
        for mut w in std::mem::take(&mut self.workers) {
            w.stop().await;
        }
    }

    /// The last lines of every service and worker log, for an error message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for s in bulkhead_cluster::SERVICES {
            if let Some(p) = self.mesh().process(s) {
                out.push_str(&format!("--- {s} ---\n{}\n", p.log_tail(15)));
            }
        }
        for w in &self.workers {
            out.push_str(&format!("--- worker {} ---\n{}\n", w.name, w.tail(15)));
        }
        out
    }

    /// Stops every worker and service; removes the temp dir unless the
    /// caller asked to keep the directory.
    pub async fn shutdown(mut self) {
        self.stop_workers().await;
        if let Some(mesh) = self.mesh.take() {
            mesh.stop().await;
        }
        if let Some(t) = self.temp.take() {
            let _ = t.close();
        }
    }

    // -----------------------------------------------------------------------
    // Calls the scenarios share.

    /// Submits an agent version as the operator and has the reviewer approve
    /// it (a version approved before is taken as it is).
    pub async fn approved_agent(&self, agent: &AgentSpec<'_>) -> anyhow::Result<()> {
        let mut op = self.dispatcher(OPERATOR)?;
        match op.submit_agent(agent.submit()).await {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
            Err(s) => return Err(s).context("SubmitAgent"),
        }
        self.dispatcher(REVIEWER)?
            .approve_agent(pb::ApproveAgentRequest {
                name: agent.name.into(),
                version: agent.version.into(),
                comment: "reviewed for the demo".into(),
            })
            .await
            .context("ApproveAgent")?;
        Ok(())
    }

    /// Creates a tenant's profile and puts secrets into it. The values come
    /// from memory and go to sealed-vault in zeroizing buffers.
    pub async fn profile(
        &self,
        tenant: &str,
        profile: &str,
        description: &str,
        secrets: &[(&str, &Zeroizing<String>)],
    ) -> anyhow::Result<Vec<sealed_pb::SecretKey>> {
        let mut vault = self.sealed(OPERATOR)?;
        match vault
            .create_profile(sealed_pb::CreateProfileRequest {
                tenant: tenant.into(),
                name: profile.into(),
                spec: Some(sealed_pb::ProfileSpec {
                    description: description.into(),
                    owner: format!("{tenant}-security"),
                    ..Default::default()
                }),
            })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            Err(s) => return Err(s).context("CreateProfile"),
        }
        let mut keys = Vec::new();
        for (key, value) in secrets {
            let bytes = Zeroizing::new(value.as_bytes().to_vec());
            let k = vault
                .put_secret(sealed_pb::PutSecretRequest {
                    tenant: tenant.into(),
                    profile: profile.into(),
                    key: (*key).into(),
                    source: Some(sealed_pb::put_secret_request::Source::Value(
                        bytes::Bytes::from_owner(bytes),
                    )),
                })
                .await
                .context("PutSecret")?
                .into_inner()
                .secret
                .context("PutSecret answered without the secret's metadata")?;
            keys.push(k);
        }
        Ok(keys)
    }

    /// Polls a task until it is final.
    pub async fn wait_final(
        &self,
        who: &mut Dispatcher,
        tenant: &str,
        task_id: &str,
    ) -> anyhow::Result<pb::Task> {
        let deadline = Instant::now() + WAIT;
        loop {
            let t = get_task(who, tenant, task_id).await?;
            if is_final(t.status()) {
                return Ok(t);
            }
            ensure!(
                Instant::now() < deadline,
                "task {task_id} did not finish: {:?}\n{}",
                t.status(),
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for an audit event of `kind` that `pred` accepts (refusals are
    /// recorded in the background, after the reply).
    pub async fn audit_event(
        &self,
        kind: &str,
        pred: impl Fn(&audit_pb::Event) -> bool,
    ) -> anyhow::Result<Option<audit_pb::Event>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut audit = self.audit()?;
        loop {
            let events = audit_events(&mut audit, kind).await?;
            if let Some(e) = events.into_iter().find(|e| e.r#type == kind && pred(e)) {
                return Ok(Some(e));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// What a mesh directory holds besides its PKI.
const MESH_STATE: &[&str] = &[
    "data",
    "logs",
    "config",
    "workers",
    "endpoints.json",
    "audit-view-token",
    super::trail::EXPORT_FILE,
];

/// The demo tells its story from a fresh state: an earlier demo's or dev
/// mesh's state in `dir` is removed (its PKI is kept); a mesh still running
/// there, or a directory that is not a mesh's, is refused.
async fn fresh_state(dir: &Path) -> anyhow::Result<()> {
    let is_mesh = dir.join("pki/ca.pem").exists() || Endpoints::path(dir).exists();
    let empty = std::fs::read_dir(dir)?.next().is_none();
    if empty {
        return Ok(());
    }
    ensure!(
        is_mesh,
        "{} is neither empty nor a Bulkhead mesh directory; pass an empty or new one",
        dir.display()
    );
    if let Ok(endpoints) = Endpoints::load(dir)
        && let Ok((id, bundle)) = endpoints.operator()
        && let Ok(addr) = endpoints.address("audit")
        && bulkhead_cluster::health(addr, &id, &bundle).await.is_ok()
    {
        bail!(
            "a mesh is running in {} (bulkhead dev up?); stop it before the demo",
            dir.display()
        );
    }
    println!(
        "the demo starts afresh: removing the earlier mesh state in {} (its PKI is kept)",
        dir.display()
    );
    for name in MESH_STATE {
        let p = dir.join(name);
        if p.is_dir() {
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("failed to remove {}", p.display()))?;
        } else if p.exists() {
            std::fs::remove_file(&p)
                .with_context(|| format!("failed to remove {}", p.display()))?;
        }
    }
    Ok(())
}

/// An agent version to submit.
#[derive(Debug, Clone)]
pub struct AgentSpec<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub image: &'a str,
    pub command: Vec<String>,
    pub requested_keys: Vec<String>,
    pub description: &'a str,
}

impl AgentSpec<'_> {
    pub fn submit(&self) -> pb::SubmitAgentRequest {
        pb::SubmitAgentRequest {
            name: self.name.into(),
            version: self.version.into(),
            image: self.image.into(),
            command: self.command.clone(),
            requested_secret_keys: self.requested_keys.clone(),
            tool: String::new(),
            description: self.description.into(),
        }
    }
}

/// The image named by bare-mode agents (the worker runs their command as a
/// child process; the image is what a sandbox would run).
pub const BARE_IMAGE: &str = "bulkhead-demo-agent:latest";

/// A shell agent for bare workers: `/bin/sh -c SCRIPT`.
pub fn shell(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

pub fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A cascade whose run level names the tenant's profile.
pub fn cascade(tenant: &str, profile: &str) -> sealed_pb::Cascade {
    sealed_pb::Cascade {
        system: None,
        agent: None,
        run: Some(sealed_pb::CascadeLevel {
            profile: Some(sealed_pb::ProfileRef {
                tenant: tenant.into(),
                profile: profile.into(),
            }),
            overrides: HashMap::new(),
        }),
    }
}

pub fn is_final(s: pb::TaskStatus) -> bool {
    matches!(
        s,
        pb::TaskStatus::Succeeded | pb::TaskStatus::Failed | pb::TaskStatus::Cancelled
    )
}

/// Whether `worker_id` is `<name>-<hex suffix>` (the worker's id).
pub fn worker_named(worker_id: &str, name: &str) -> bool {
    worker_id
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|suffix| suffix.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub async fn get_task(
    who: &mut Dispatcher,
    tenant: &str,
    task_id: &str,
) -> anyhow::Result<pb::Task> {
    who.get_task(pb::GetTaskRequest {
        tenant: tenant.into(),
        task_id: task_id.into(),
    })
    .await
    .with_context(|| format!("GetTask {task_id}"))?
    .into_inner()
    .task
    .context("GetTask answered without a task")
}

pub async fn list_workers(
    who: &mut Dispatcher,
    tenant: &str,
    pool: &str,
) -> anyhow::Result<Vec<pb::Worker>> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..100 {
        let page = who
            .list_workers(pb::ListWorkersRequest {
                tenant: tenant.into(),
                pool: pool.into(),
                page_token: token,
                ..Default::default()
            })
            .await
            .context("ListWorkers")?
            .into_inner();
        out.extend(page.workers);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
    bail!("ListWorkers paged for ever")
}

/// Every audit event whose type starts with `prefix` (all tenants).
pub async fn audit_events(
    audit: &mut AuditServiceClient<MeshChannel>,
    prefix: &str,
) -> anyhow::Result<Vec<audit_pb::Event>> {
    let mut out = Vec::new();
    let mut after = 0;
    for _ in 0..1000 {
        let page = audit
            .query(audit_pb::QueryRequest {
                type_prefix: prefix.into(),
                after_sequence: after,
                limit: 1000,
                ..Default::default()
            })
            .await
            .context("audit Query")?
            .into_inner();
        out.extend(page.events);
        if page.next_after_sequence == 0 {
            return Ok(out);
        }
        after = page.next_after_sequence;
    }
    bail!("the audit log paged for ever")
}

pub fn attr<'a>(e: &'a audit_pb::Event, key: &str) -> &'a str {
    e.attributes.get(key).map_or("", String::as_str)
}

/// Who an event is about: the operator who decided or submitted, else the
/// service that recorded it.
pub fn party(e: &audit_pb::Event) -> &str {
    ["decided_by", "submitted_by"]
        .into_iter()
        .map(|k| attr(e, k))
        .find(|v| !v.is_empty())
        .unwrap_or(&e.actor)
}

/// The tail of a SPIFFE ID after the trust domain, for compact printing.
pub fn short_id<'a>(id: &'a str, td: &TrustDomain) -> &'a str {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.strip_prefix(td.as_str()))
        .unwrap_or(id)
}

/// Whether the path is inside `dir`.
pub fn under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}
