//! What the sandbox-runner's tests share: a real mesh of the five binaries
//! with the runner configured for tests, the parties (operators, workers
//! holding runs the real dispatcher assigned them), the test image built
//! locally (no registry is reachable), and cleanup of every container a
//! test's runner made.
//!
//! A run is made as in production: an operator submits an agent version and
//! a second operator approves it, a task is enqueued, a test worker claims it
//! over a Claim stream and accepts it (the task is RUNNING with a run id),
//! and the run mints its JWT-SVID. The runner asks the dispatcher what the
//! run was assigned, and runs that.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bulkhead_mesh::client::MeshChannel;
use bulkhead_mesh::tls::Identity;
use bulkhead_proto::audit::v1 as audit_pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use bulkhead_proto::dispatcher::v1 as disp_pb;
use bulkhead_proto::dispatcher::v1::claim_request::Body as Up;
use bulkhead_proto::dispatcher::v1::claim_response::Body as Down;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_proto::identity::v1 as id_pb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sandbox::v1 as pb;
use bulkhead_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use bulkhead_proto::sealed::v1 as sealed_pb;
use bulkhead_proto::sealed::v1::sealed_vault_service_client::SealedVaultServiceClient;
use bulkhead_testkit::mesh::TestMesh;
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub const TD: &str = "spiffe://bulkhead.test";
pub const SEALED_VAULT: &str = "spiffe://bulkhead.test/service/sealed-vault";
pub const OPERATOR: &str = "admin/operator";
/// The second operator, who approves agent versions.
pub const REVIEWER: &str = "admin/reviewer";
pub const AGENT: &str = "support-bot";
/// The image of the agents the process backend runs (the dispatcher wants
/// one; the process backend runs the command's program).
pub const PROCESS_IMAGE: &str = "bulkhead-test-agent:process";
/// The payload of every task.
pub const PAYLOAD: &[u8] = b"the task payload";
/// How long a claim-stream message may take.
const CLAIM_WAIT: Duration = Duration::from_secs(30);
/// Heartbeats of the test workers (leases last 30 s by default).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// The image the tests run, built from this host's binaries.
pub const IMAGE: &str = bulkhead_testkit::docker::TEST_IMAGE;
/// The prefix of every container and image a test makes.
pub const PREFIX: &str = "bulkhead-test-";

pub type Runner = SandboxServiceClient<MeshChannel>;
pub type Dispatcher = DispatcherServiceClient<MeshChannel>;

#[allow(unused_imports)]
pub use bulkhead_testkit::docker::{docker, docker_or_skip};

/// Builds [`IMAGE`] once (shared with the cross-service tests, serialized
/// across test processes).
pub fn ensure_image() -> anyhow::Result<()> {
    bulkhead_testkit::docker::ensure_test_image()
}

/// A test mesh and its runner's cleanup: at the end every container of the
/// runner instance is removed, whatever the test did.
pub struct Mesh {
    pub mesh: TestMesh,
    instance: String,
    /// The secret keys of each tenant's `default` profile (see [`Mesh::profile`]).
    keys: Mutex<std::collections::BTreeMap<String, Vec<String>>>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if self.instance.is_empty() {
            return;
        }
        let filter = format!("label=bulkhead.runner.instance={}", self.instance);
        if let Ok(ids) = docker(&["ps", "-aq", "--filter", &filter]) {
            for id in ids.split_whitespace() {
                let _ = docker(&["rm", "-f", "-v", id]);
            }
        }
    }
}

/// Starts the five services; the runner allows the test image, two host
/// programs for the process backend, and one network per name in `networks`.
pub async fn start_mesh(networks: &[&str]) -> anyhow::Result<Mesh> {
    let mut runner = toml::Table::new();
    runner.insert("container_prefix".into(), "bulkhead-test-sbx-".into());
    runner.insert(
        "images".into(),
        toml::Value::Array(vec!["bulkhead-test-agent:*".into()]),
    );
    runner.insert(
        "programs".into(),
        toml::Value::Array(vec!["/bin/sh".into(), "/usr/bin/env".into()]),
    );
    let mut nets = toml::Table::new();
    for n in networks {
        nets.insert((*n).into(), toml::Value::Array(vec!["acme".into()]));
    }
    runner.insert("networks".into(), toml::Value::Table(nets));
    let mesh = TestMesh::start_with(|spec| {
        spec.extra.insert("sandbox-runner".into(), runner);
    })
    .await?;
    let instance = std::fs::read_to_string(mesh.dir().join("data/sandbox-runner/runner-instance"))
        .context("the runner's instance id")?
        .trim()
        .to_owned();
    Ok(Mesh {
        mesh,
        instance,
        keys: Mutex::default(),
    })
}

impl Mesh {
    pub fn runner_as(&self, who: &str) -> anyhow::Result<Runner> {
        Ok(SandboxServiceClient::new(
            self.mesh
                .channel("sandbox-runner", &self.mesh.identity(who)?)?,
        ))
    }

    pub fn sealed_as(&self, who: &str) -> anyhow::Result<SealedVaultServiceClient<MeshChannel>> {
        Ok(SealedVaultServiceClient::new(
            self.mesh
                .channel("sealed-vault", &self.mesh.identity(who)?)?,
        ))
    }

    pub fn identity_as(&self, who: &str) -> anyhow::Result<IdentityServiceClient<MeshChannel>> {
        Ok(IdentityServiceClient::new(
            self.mesh.channel("identity", &self.mesh.identity(who)?)?,
        ))
    }

    /// The containers this mesh's runner made, by id.
    pub fn containers(&self) -> anyhow::Result<Vec<String>> {
        let filter = format!("label=bulkhead.runner.instance={}", self.instance);
        Ok(docker(&["ps", "-aq", "--no-trunc", "--filter", &filter])?
            .split_whitespace()
            .map(str::to_owned)
            .collect())
    }

    /// Every service's log, concatenated.
    pub fn all_logs(&self) -> String {
        let mut s = String::new();
        for name in bulkhead_cluster::SERVICES {
            if let Some(p) = self.mesh.mesh.process(name) {
                s.push_str(&std::fs::read_to_string(&p.log).unwrap_or_default());
            }
        }
        s
    }

    pub fn runner_log(&self) -> String {
        self.mesh
            .mesh
            .process("sandbox-runner")
            .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
            .unwrap_or_default()
    }

    /// A profile `tenant/default` with `DEBUG=1` and the given secrets, whose
    /// keys the agents of [`TestWorker::run`] request.
    pub async fn profile(&self, tenant: &str, secrets: &[(&str, &str)]) -> anyhow::Result<()> {
        self.keys.lock().unwrap().insert(
            tenant.to_owned(),
            secrets.iter().map(|(k, _)| (*k).to_owned()).collect(),
        );
        let mut op = self.sealed_as(OPERATOR)?;
        op.create_profile(sealed_pb::CreateProfileRequest {
            tenant: tenant.into(),
            name: "default".into(),
            spec: Some(sealed_pb::ProfileSpec {
                env: [("DEBUG".to_owned(), "1".to_owned())].into_iter().collect(),
                ..Default::default()
            }),
        })
        .await
        .context("CreateProfile")?;
        for (k, v) in secrets {
            op.put_secret(sealed_pb::PutSecretRequest {
                tenant: tenant.into(),
                profile: "default".into(),
                key: (*k).into(),
                source: Some(sealed_pb::put_secret_request::Source::Value(
                    v.as_bytes().to_vec().into(),
                )),
            })
            .await
            .context("PutSecret")?;
        }
        Ok(())
    }

    /// Every audit event.
    pub async fn audit(&self) -> anyhow::Result<Vec<audit_pb::Event>> {
        let mut client =
            AuditServiceClient::new(self.mesh.channel("audit", &self.mesh.identity(OPERATOR)?)?);
        let mut out = Vec::new();
        let mut after = 0;
        loop {
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
    }

    /// Waits until audit holds an event of `kind` for `run`.
    pub async fn audited(&self, kind: &str, run: &str) -> anyhow::Result<audit_pb::Event> {
        for _ in 0..100 {
            if let Some(e) = self
                .audit()
                .await?
                .into_iter()
                .find(|e| e.r#type == kind && e.run_id == run)
            {
                return Ok(e);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("no {kind} event for run {run} in audit")
    }
}

/// A run as its worker holds it: its id, its X.509 identity, a JWT-SVID for
/// sealed-vault, and what the dispatcher assigned it.
pub struct Run {
    pub id: String,
    pub identity: Identity,
    pub token: String,
    pub task_id: String,
    /// The task's tenant (empty for a pool task).
    pub tenant: String,
    pub assignment: disp_pb::ClaimAssignment,
}

impl Run {
    pub fn agent(&self) -> &disp_pb::Agent {
        self.assignment.agent.as_ref().expect("an agent")
    }

    pub fn task(&self) -> &disp_pb::Task {
        self.assignment.task.as_ref().expect("a task")
    }
}

/// Agent versions, one per run, so that each run has its own command.
static VERSIONS: AtomicU64 = AtomicU64::new(1);

/// A worker driven by the test over a real Claim stream: registered at the
/// dispatcher, heartbeating the leases it holds.
pub struct TestWorker {
    /// The worker's id (from its SVID).
    pub id: String,
    /// The worker's SPIFFE path or enrolled identity, for its runner client.
    pub identity: Identity,
    tx: mpsc::Sender<disp_pb::ClaimRequest>,
    inbound: tonic::Streaming<disp_pb::ClaimResponse>,
    leases: Arc<Mutex<Vec<disp_pb::HeldLease>>>,
    heartbeats: tokio::task::JoinHandle<()>,
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

impl Mesh {
    pub fn dispatcher_as(&self, who: &str) -> anyhow::Result<Dispatcher> {
        Ok(DispatcherServiceClient::new(
            self.mesh.channel("dispatcher", &self.mesh.identity(who)?)?,
        ))
    }

    /// A test worker with the certificate the test CA issues for `path`
    /// (`tenant/<t>/worker/<id>` or `pool/<p>/worker/<id>`).
    pub async fn worker(&self, path: &str) -> anyhow::Result<TestWorker> {
        self.worker_with(self.mesh.identity(path)?).await
    }

    /// A test worker with `identity` (e.g. one enrolled at identity).
    pub async fn worker_with(&self, identity: Identity) -> anyhow::Result<TestWorker> {
        let id = identity
            .spiffe_id()
            .to_string()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let mut client = DispatcherServiceClient::new(self.mesh.channel("dispatcher", &identity)?);
        client
            .register_worker(disp_pb::RegisterWorkerRequest {
                labels: Default::default(),
                max_concurrent_runs: 16,
                sandbox_backends: vec![
                    pb::SandboxBackend::Docker as i32,
                    pb::SandboxBackend::Process as i32,
                ],
                version: "sandbox-runner-test".into(),
            })
            .await
            .context("RegisterWorker")?;
        let (tx, rx) = mpsc::channel(64);
        let inbound = client
            .claim(ReceiverStream::new(rx))
            .await
            .context("open a claim stream")?
            .into_inner();
        let leases: Arc<Mutex<Vec<disp_pb::HeldLease>>> = Arc::default();
        let heartbeats = tokio::spawn({
            let tx = tx.clone();
            let leases = leases.clone();
            async move {
                loop {
                    tokio::time::sleep(HEARTBEAT).await;
                    let held = leases.lock().unwrap().clone();
                    let beat = disp_pb::ClaimRequest {
                        body: Some(Up::Heartbeat(disp_pb::ClaimHeartbeat { leases: held })),
                    };
                    if tx.send(beat).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(TestWorker {
            id,
            identity,
            tx,
            inbound,
            leases,
            heartbeats,
        })
    }

    /// Submits a version of [`AGENT`] running `command` in `image` and
    /// requesting `keys` as the operator, approved by the reviewer; returns
    /// the version.
    pub async fn approved_agent(
        &self,
        image: &str,
        command: &[&str],
        keys: Vec<String>,
    ) -> anyhow::Result<String> {
        let version = format!("1.0.{}", VERSIONS.fetch_add(1, Ordering::Relaxed));
        self.dispatcher_as(OPERATOR)?
            .submit_agent(disp_pb::SubmitAgentRequest {
                name: AGENT.into(),
                version: version.clone(),
                image: image.into(),
                command: command.iter().map(|s| (*s).to_owned()).collect(),
                requested_secret_keys: keys,
                description: "sandbox-runner test agent".into(),
                ..Default::default()
            })
            .await
            .context("SubmitAgent")?;
        self.dispatcher_as(REVIEWER)?
            .approve_agent(disp_pb::ApproveAgentRequest {
                name: AGENT.into(),
                version: version.clone(),
                comment: "reviewed".into(),
            })
            .await
            .context("ApproveAgent")?;
        Ok(version)
    }

    /// Cancels the task of `run` as the operator.
    pub async fn cancel(&self, run: &Run) -> anyhow::Result<()> {
        self.dispatcher_as(OPERATOR)?
            .cancel_task(disp_pb::CancelTaskRequest {
                tenant: run.tenant.clone(),
                task_id: run.task_id.clone(),
                reason: "test".into(),
            })
            .await
            .context("CancelTask")?;
        Ok(())
    }
}

impl TestWorker {
    async fn send(&self, body: Up) -> anyhow::Result<()> {
        self.tx
            .send(disp_pb::ClaimRequest { body: Some(body) })
            .await
            .context("the claim stream is closed")
    }

    /// Waits for a message `pick` accepts, passing over others.
    async fn expect<T>(
        &mut self,
        what: &str,
        pick: impl Fn(&Down) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.inbound.message())
                .await
                .with_context(|| format!("no {what} on the claim stream"))?
                .context("the claim stream failed")?
                .context("the dispatcher closed the claim stream")?;
            if let Some(v) = m.body.as_ref().and_then(&pick) {
                return Ok(v);
            }
        }
    }

    /// A running run of a task of `tenant` (or of `pool`), for a newly
    /// approved version of [`AGENT`] running `command` in `image` and
    /// requesting every secret key of the tenant's `default` profile, with
    /// that profile: enqueued at the dispatcher, claimed and accepted by this
    /// worker, its JWT-SVID minted.
    pub async fn run(
        &mut self,
        mesh: &Mesh,
        tenant: &str,
        pool: &str,
        image: &str,
        command: &[&str],
    ) -> anyhow::Result<Run> {
        let keys = mesh
            .keys
            .lock()
            .unwrap()
            .get(tenant)
            .cloned()
            .unwrap_or_default();
        self.run_requesting(mesh, tenant, pool, image, command, keys)
            .await
    }

    /// [`TestWorker::run`] of an agent requesting `keys`.
    pub async fn run_requesting(
        &mut self,
        mesh: &Mesh,
        tenant: &str,
        pool: &str,
        image: &str,
        command: &[&str],
        keys: Vec<String>,
    ) -> anyhow::Result<Run> {
        let version = mesh.approved_agent(image, command, keys).await?;
        self.send(Up::Credits(disp_pb::ClaimCredits { slots: 1 }))
            .await?;
        let task_id = mesh
            .dispatcher_as(OPERATOR)?
            .enqueue(disp_pb::EnqueueRequest {
                tenant: tenant.into(),
                pool: pool.into(),
                agent: AGENT.into(),
                agent_version: version,
                cascade: (!tenant.is_empty()).then(|| cascade(tenant)),
                payload: PAYLOAD.to_vec().into(),
                ..Default::default()
            })
            .await
            .context("Enqueue")?
            .into_inner()
            .task_id;
        let assignment = self
            .expect("assignment", |m| match m {
                Down::Assignment(a) if a.task.as_ref().is_some_and(|t| t.task_id == task_id) => {
                    Some(a.clone())
                }
                _ => None,
            })
            .await?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = CertificateParams::default()
            .serialize_request(&key)?
            .der()
            .to_vec();
        self.send(Up::Accept(disp_pb::ClaimAccept {
            task_id: task_id.clone(),
            attempt: assignment.attempt,
            lease_epoch: assignment.lease_epoch,
            run_csr_der: csr.into(),
        }))
        .await?;
        let accepted = self
            .expect("run svid", |m| match m {
                Down::RunSvid(s) if s.task_id == task_id => Some(s.clone()),
                _ => None,
            })
            .await?;
        self.leases.lock().unwrap().push(disp_pb::HeldLease {
            task_id: task_id.clone(),
            attempt: accepted.attempt,
            lease_epoch: accepted.lease_epoch,
        });
        let svid = accepted.svid.context("no svid")?;
        let chain = svid
            .cert_chain_der
            .iter()
            .map(|c| CertificateDer::from(c.to_vec()))
            .collect();
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let identity = Identity::from_der(chain, pkcs8, &svid.spiffe_id)?;
        let token = IdentityServiceClient::new(mesh.mesh.channel("identity", &identity)?)
            .mint_jwt_svid(id_pb::MintJwtSvidRequest {
                audience: SEALED_VAULT.into(),
                ..Default::default()
            })
            .await
            .context("MintJwtSvid")?
            .into_inner()
            .token;
        Ok(Run {
            id: accepted.run_id,
            identity,
            token,
            task_id,
            tenant: tenant.into(),
            assignment,
        })
    }

    /// Reports `run` finished with `outcome` and waits for the acknowledgement.
    pub async fn report(&mut self, run: &Run, outcome: disp_pb::RunOutcome) -> anyhow::Result<()> {
        self.send(Up::Report(disp_pb::ClaimReport {
            task_id: run.task_id.clone(),
            attempt: run.assignment.attempt,
            lease_epoch: run.assignment.lease_epoch,
            outcome: outcome as i32,
            exit_code: 0,
            output_summary: "reported by the test".into(),
        }))
        .await?;
        let task_id = run.task_id.clone();
        self.expect("report ack", |m| match m {
            Down::ReportAck(a) if a.task_id == task_id => Some(()),
            _ => None,
        })
        .await?;
        self.leases
            .lock()
            .unwrap()
            .retain(|l| l.task_id != run.task_id);
        Ok(())
    }

    /// This worker's client of the sandbox-runner.
    pub fn runner(&self, mesh: &Mesh) -> anyhow::Result<Runner> {
        Ok(SandboxServiceClient::new(
            mesh.mesh.channel("sandbox-runner", &self.identity)?,
        ))
    }
}

/// The cascade of a run: the tenant's `default` profile at the system level.
pub fn cascade(tenant: &str) -> sealed_pb::Cascade {
    sealed_pb::Cascade {
        system: Some(sealed_pb::CascadeLevel {
            profile: Some(sealed_pb::ProfileRef {
                tenant: tenant.into(),
                profile: "default".into(),
            }),
            overrides: Default::default(),
        }),
        ..Default::default()
    }
}

/// A StartSandbox request for `run` of `tenant`, as a worker sends it: the
/// assignment's image, command, cascade, agent, tool, keys and payload.
pub fn start_request(
    tenant: &str,
    run: &Run,
    backend: pb::SandboxBackend,
) -> pb::StartSandboxRequest {
    let agent = run.agent();
    let task = run.task();
    pb::StartSandboxRequest {
        tenant: tenant.into(),
        run_jwt_svid: run.token.clone(),
        task_id: run.task_id.clone(),
        image: agent.image.clone(),
        command: agent.command.clone(),
        cascade: task.cascade.clone(),
        agent: agent.name.clone(),
        tool: agent.tool.clone(),
        secret_keys: agent.requested_secret_keys.clone(),
        payload: task.payload.clone(),
        limits: Some(pb::Limits {
            memory_bytes: 128 << 20,
            cpu_millis: 500,
            pids: 64,
            timeout: Some(prost_types::Duration {
                seconds: 120,
                nanos: 0,
            }),
        }),
        backend: backend as i32,
        ..Default::default()
    }
}

/// [`start_request`] with every field the runner takes from the assignment
/// left empty: the tenant, the token, limits and the backend only.
pub fn bare_start_request(
    tenant: &str,
    run: &Run,
    backend: pb::SandboxBackend,
) -> pb::StartSandboxRequest {
    pb::StartSandboxRequest {
        task_id: String::new(),
        image: String::new(),
        command: Vec::new(),
        cascade: None,
        agent: String::new(),
        tool: String::new(),
        secret_keys: Vec::new(),
        payload: Default::default(),
        ..start_request(tenant, run, backend)
    }
}

/// Everything a sandbox wrote (stdout, stderr) and how it ended.
pub async fn collect(
    runner: &mut Runner,
    tenant: &str,
    sandbox: &str,
) -> anyhow::Result<(String, String, pb::ExitStatus)> {
    let mut stream = runner
        .stream_output(pb::StreamOutputRequest {
            tenant: tenant.into(),
            sandbox_id: sandbox.into(),
            from_offset: 0,
        })
        .await?
        .into_inner();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let read = async {
        while let Some(m) = stream.message().await? {
            match m.event {
                Some(pb::stream_output_response::Event::Chunk(c)) => {
                    if c.stream == pb::OutputStream::Stderr as i32 {
                        err.extend_from_slice(&c.data);
                    } else {
                        out.extend_from_slice(&c.data);
                    }
                }
                Some(pb::stream_output_response::Event::Exit(e)) => return Ok(e),
                None => {}
            }
        }
        bail!("the output stream ended without an exit")
    };
    let exit = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .context("the sandbox did not end")??;
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        exit,
    ))
}

/// A canary value no one would write by chance.
pub fn canary() -> String {
    format!("CANARY-{}", hex_of(&rand::random::<[u8; 12]>()))
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether `haystack` holds `canary` or its base64 (either alphabet).
pub fn leaks(haystack: &str, canary: &str) -> bool {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(canary);
    // The first characters of its base64, which do not depend on what follows.
    let core = &b64[..b64.len() - 2];
    haystack.contains(canary) || haystack.contains(core)
}

/// Files under `dir`, recursively, that hold `needle`.
pub fn files_holding(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(files_holding(&p, needle));
        } else if std::fs::read(&p)
            .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
        {
            found.push(p);
        }
    }
    found
}

/// A worker enrolled at identity with a join token of `tenant`: its id and
/// its identity (the key made here, as a worker makes it).
pub async fn enroll_worker(mesh: &Mesh, tenant: &str) -> anyhow::Result<(String, Identity)> {
    let token = mesh
        .identity_as(OPERATOR)?
        .create_join_token(id_pb::CreateJoinTokenRequest {
            tenant: tenant.into(),
            description: "sandbox-runner test".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .token;
    let (_, bundle) = mesh.mesh.mesh.operator();
    let anonymous = bulkhead_mesh::client::channel(
        mesh.mesh.addr("identity")?,
        None,
        bundle,
        bulkhead_mesh::tls::ExpectServer::Service("identity".into()),
    )?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)?
        .der()
        .to_vec();
    let enrolled = IdentityServiceClient::new(anonymous)
        .enroll_worker(id_pb::EnrollWorkerRequest {
            join_token: token,
            csr_der: csr.into(),
            worker_name: "sandbox-test".into(),
        })
        .await?
        .into_inner();
    let svid = enrolled.svid.context("no svid")?;
    let chain = svid
        .cert_chain_der
        .iter()
        .map(|c| CertificateDer::from(c.to_vec()))
        .collect();
    let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((
        enrolled.worker_id,
        Identity::from_der(chain, pkcs8, &svid.spiffe_id)?,
    ))
}

/// Waits for the exit message of an output stream.
pub async fn exit_of(
    stream: &mut tonic::Streaming<pb::StreamOutputResponse>,
) -> anyhow::Result<pb::ExitStatus> {
    loop {
        match stream.message().await? {
            Some(pb::StreamOutputResponse {
                event: Some(pb::stream_output_response::Event::Exit(e)),
            }) => return Ok(e),
            Some(_) => {}
            None => bail!("the stream ended without an exit"),
        }
    }
}
