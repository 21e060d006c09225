//! The sandbox-runner benchmark: a program (harness = false), not a timed
//! test. It needs the Docker engine; it builds the tests' image
//! (`bulkhead-test-agent:latest`, `docker import` of this host's `sh`,
//! coreutils and their libraries) if it is missing.
//!
//! Audit, identity, sealed-vault, the dispatcher and the sandbox-runner run
//! in-process, each the mesh server with its real handlers and authorization
//! table, over mTLS on loopback; all but the runner keep SQLite stores in
//! temp dirs on disk (WAL, synchronous=FULL). The runner is put together as
//! its `main.rs` does it (the init shim installed in a temp dir, clients of
//! its four peers, the revocation follower), with the Docker backend only.
//! Before any clock: an operator creates profile `acme/bench-app` with 3
//! built-in secrets; an operator submits two versions of agent `bench-agent`
//! (`/bin/true` and `sleep 300` in the test image) and a second operator
//! approves them; worker `w1` registers and opens a Claim stream. Every run
//! is made as in production, before its clock: a task is enqueued with the
//! profile's cascade, the worker claims and accepts it (the dispatcher has
//! identity sign the run's SVID), and the run mints its JWT-SVID.
//!
//! 1. Start, side by side, in pairs A B then B A (so that drift hits both):
//!    - *bare*: the bench's own bollard client creates and starts a container
//!      of the same image with the runner's hardening (all capabilities
//!      dropped, no-new-privileges, read-only root, pids/memory/CPU limits,
//!      tmpfs /tmp, no network, private IPC, log driver `none`, user
//!      65534) running `/bin/true`; timed to `start` returning (the process
//!      has started), then to the container having exited, then `rm -f`.
//!    - *injected*: the worker (`tenant/acme/worker/w1`, mTLS connection
//!      made beforehand) calls StartSandbox for its run as a worker does (the
//!      assignment's image, command, cascade, agent and payload, the run's
//!      JWT-SVID): the runner checks the token, asks the dispatcher for the
//!      run's assignment (GetRunAssignment), pings the engine, inspects the
//!      image, creates, attaches, starts, resolves the 3 secrets at
//!      sealed-vault (audited there), records `sandbox.credential.injected`
//!      in audit and writes the frame to the shim's stdin; timed to
//!      StartSandbox returning, then to the container having exited (the
//!      same `wait` as bare), then ReleaseSandbox (kill, remove, zeroize,
//!      revoke the run, audit); the worker then reports the run.
//!
//!    Where the time goes: the engine's own event times (create, attach,
//!    start) against the call's start; inside the services a tower wrapper
//!    times the runner's StartSandbox handler, the dispatcher's
//!    GetRunAssignment handler, sealed-vault's Resolve handler and audit's
//!    Append handler.
//! 2. Revocation: a `sleep 300` sandbox (with injection) is started; a
//!    `wait` on its container is posted; an operator Revokes the run hard at
//!    identity; timed until the container is no longer running (the wait
//!    returns), with the engine's `kill` event, until it is removed, and until
//!    the runner reports it released.
//!
//! `cargo bench -p bulkhead-sandbox-runner --bench sandbox`. Sizes come from
//! the environment: SANDBOX_BENCH_N (60 starts of each kind),
//! SANDBOX_BENCH_WARMUP (4 of each, not counted), SANDBOX_BENCH_REVOKE_N (40),
//! SANDBOX_BENCH_PHASE_SECS (300: every phase stops there, and says so).
//! Every loop is bounded by its count and by the phase deadline; every engine
//! and RPC call by a timeout. Every container made is removed by id, even on
//! failure (a guard, at the end, also removes any container with the run's
//! labels). No network is used but loopback.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, RemoveContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use bulkhead_audit::checkpoint::Signer;
use bulkhead_audit::log::{Log, LogConfig};
use bulkhead_dispatcher::engine::Engine;
use bulkhead_dispatcher::wake::Wake;
use bulkhead_identity::keys::JwtKeys;
use bulkhead_identity::service::{AuditDenials, IdentityApi, Limits};
use bulkhead_mesh::audit::AuditClient;
use bulkhead_mesh::client::MeshChannel;
use bulkhead_mesh::pki::{Ca, SvidOptions};
use bulkhead_mesh::revocation::RevocationList;
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::spiffe::TrustDomain;
use bulkhead_mesh::tls::{ClientAuth, ExpectServer, Identity, TrustBundle};
use bulkhead_proto::dispatcher::v1 as dpb;
use bulkhead_proto::dispatcher::v1::claim_request::Body as Up;
use bulkhead_proto::dispatcher::v1::claim_response::Body as Down;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_proto::identity::v1 as idpb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sandbox::v1 as pb;
use bulkhead_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use bulkhead_proto::sealed::v1 as spb;
use bulkhead_proto::sealed::v1::sealed_vault_service_client::SealedVaultServiceClient;
use bulkhead_sandbox_runner::config::{Config, DefaultBackend};
use bulkhead_sandbox_runner::model::BackendKind;
use bulkhead_sandbox_runner::runner::{Parts, Peers, Runner};
use bulkhead_sandbox_runner::service::SandboxRunnerApi;
use bulkhead_sandbox_runner::{revocation, service, shim};
use bulkhead_sealed_vault::backend::Backends;
use bulkhead_sealed_vault::crypto::MasterKey;
use bulkhead_sealed_vault::secret::SecretValue;
use bulkhead_sealed_vault::service::SealedVaultApi;
use futures::StreamExt as _;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;

const TRUST_DOMAIN: &str = "bulkhead.bench";
const TENANT: &str = "acme";
const PROFILE: &str = "bench-app";
const SECRET_KEYS: [&str; 3] = ["API_TOKEN", "DB_PASSWORD", "WEBHOOK_SECRET"];
const AGENT: &str = "bench-agent";
const WORKER: &str = "tenant/acme/worker/w1";
/// How long a claim-stream message may take.
const CLAIM_WAIT: Duration = Duration::from_secs(30);
/// The worker's lease heartbeats (leases last 30 s by default).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// The label of the bench's own (bare) containers; its value is this run's nonce.
const BENCH_LABEL: &str = "bulkhead.bench";
/// The runner's label naming its instance (its containers carry it).
const INSTANCE_LABEL: &str = "bulkhead.runner.instance";
/// The limits both kinds of container get (the runner's from the request).
const MEMORY: u64 = 128 << 20;
const CPU_MILLIS: u32 = 500;
const PIDS: u32 = 64;
/// The runner's defaults, which the bare containers copy.
const TMPFS_SIZE: &str = "64m";
const USER: &str = "65534:65534";
/// The trivial command both kinds run.
const TRUE: &str = "/bin/true";
/// Any one engine call or RPC.
const CALL: Duration = Duration::from_secs(30);
/// How long a revoked sandbox may take to stop, be removed or be released
/// before the iteration counts as failed.
const REVOKE_WAIT: Duration = Duration::from_secs(10);
/// Between posting the `wait` and revoking: the wait is surely at the engine.
const WAIT_SETTLE: Duration = Duration::from_millis(50);
/// Before every timed start, of both kinds: the engine finishes what the
/// last removal left (unmounts, cgroups) on its own time, not the next start's.
const SETTLE: Duration = Duration::from_millis(100);
/// Polling interval for "removed" and "released".
const POLL: Duration = Duration::from_millis(10);

type IdClient = IdentityServiceClient<MeshChannel>;
type VaultClient = SealedVaultServiceClient<MeshChannel>;
type RunnerClient = SandboxServiceClient<MeshChannel>;
type DispClient = DispatcherServiceClient<MeshChannel>;

#[derive(Debug, Clone)]
struct Params {
    n: usize,
    warmup: usize,
    revoke_n: usize,
    phase: Duration,
}

fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

impl Params {
    fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            n: env_usize("SANDBOX_BENCH_N", 60)?,
            warmup: env_usize("SANDBOX_BENCH_WARMUP", 4)?,
            revoke_n: env_usize("SANDBOX_BENCH_REVOKE_N", 40)?,
            phase: Duration::from_secs(env_usize("SANDBOX_BENCH_PHASE_SECS", 300)? as u64),
        })
    }
}

// ---------------------------------------------------------------------------
// Figures.

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Percentiles of a set of durations.
#[derive(Debug, Default, Clone, Copy)]
struct Dist {
    n: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

impl Dist {
    fn of(mut all: Vec<Duration>) -> Self {
        all.sort();
        Self {
            n: all.len(),
            p50: percentile(&all, 0.50),
            p90: percentile(&all, 0.90),
            p99: percentile(&all, 0.99),
            max: all.last().copied().unwrap_or_default(),
        }
    }

    fn row(&self, what: &str) -> String {
        format!(
            "| {what} | {} | {} | {} | {} | {} |",
            self.n,
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max)
        )
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

// ---------------------------------------------------------------------------
// Timing from the inside.

/// One call a timed service saw: `<service>.<Method>`, when it reached the
/// service, how long to its response.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    start: Instant,
    took: Duration,
}

#[derive(Debug, Default)]
struct Times {
    calls: Mutex<Vec<Call>>,
}

impl Times {
    fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A gRPC service with every unary call timed, from the request reaching the
/// service (after TLS, HTTP/2 and the authorization layer) to its response.
#[derive(Debug, Clone)]
struct TimedService<S> {
    inner: S,
    label: &'static str,
    times: Arc<Times>,
}

impl<S: NamedService> NamedService for TimedService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<Body>> for TimedService<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let method = format!(
            "{}.{}",
            self.label,
            req.uri().path().rsplit('/').next().unwrap_or_default()
        );
        let start = Instant::now();
        let fut = self.inner.call(req);
        let times = self.times.clone();
        Box::pin(async move {
            let r = fut.await;
            times
                .calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Call {
                    method,
                    start,
                    took: start.elapsed(),
                });
            r
        })
    }
}

// ---------------------------------------------------------------------------
// The containers made, removed by id whatever happens.

/// Every container this run made and has not seen removed, and the labels of
/// its containers: on drop, each is removed (`docker rm -f -v <id>`).
#[derive(Debug, Default)]
struct Containers {
    ids: Mutex<BTreeSet<String>>,
    labels: Mutex<Vec<String>>,
}

impl Containers {
    fn add(&self, id: &str) {
        if !id.is_empty() {
            self.lock().insert(id.to_owned());
        }
    }

    fn gone(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn label(&self, l: String) {
        self.labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(l);
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        let mut ids: BTreeSet<String> = std::mem::take(&mut *self.lock());
        for l in self.labels.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let filter = format!("label={l}");
            if let Ok(out) = support::docker(&["ps", "-aq", "--no-trunc", "--filter", &filter]) {
                ids.extend(out.split_whitespace().map(str::to_owned));
            }
        }
        let mut left = 0;
        for id in &ids {
            if support::docker(&["rm", "-f", "-v", id]).is_ok() {
                left += 1;
            } else {
                eprintln!("could not remove container {id}");
            }
        }
        println!("cleanup: {left} container(s) left over and removed");
    }
}

// ---------------------------------------------------------------------------
// The trust domain and the stack under test.

struct Pki {
    td: TrustDomain,
    ca_cert: String,
    ca_key: String,
    bundle: TrustBundle,
    audit: Identity,
    identity: Identity,
    vault: Identity,
    runner: Identity,
    dispatcher: Identity,
    operator: Identity,
    reviewer: Identity,
    worker: Identity,
}

fn pki() -> anyhow::Result<Pki> {
    let td = TrustDomain::parse(TRUST_DOMAIN)?;
    let (ca, ca_key) = Ca::generate(&td)?;
    let issue = |path: &str, opts: SvidOptions| -> anyhow::Result<Identity> {
        let svid = ca.issue(&td.join(path.split('/'))?, &opts)?;
        let chain = format!("{}{}", svid.cert_pem, ca.cert_pem());
        Ok(Identity::from_pem(
            chain.as_bytes(),
            svid.key_pem.as_bytes(),
            path,
        )?)
    };
    Ok(Pki {
        bundle: TrustBundle::from_pem(ca.cert_pem().as_bytes(), "bench ca")?,
        audit: issue("service/audit", SvidOptions::for_local_service("audit"))?,
        identity: issue(
            "service/identity",
            SvidOptions::for_local_service("identity"),
        )?,
        vault: issue(
            "service/sealed-vault",
            SvidOptions::for_local_service("sealed-vault"),
        )?,
        runner: issue(
            "service/sandbox-runner/local",
            SvidOptions::for_local_service("sandbox-runner"),
        )?,
        dispatcher: issue(
            "service/dispatcher",
            SvidOptions::for_local_service("dispatcher"),
        )?,
        operator: issue("admin/bench", SvidOptions::default())?,
        reviewer: issue("admin/reviewer", SvidOptions::default())?,
        worker: issue(WORKER, SvidOptions::default())?,
        ca_cert: ca.cert_pem().to_owned(),
        ca_key,
        td,
    })
}

fn temp(what: &str) -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix(&format!("bulkhead-sandbox-bench-{what}-"))
        .tempdir()?)
}

fn now_ms() -> i64 {
    let d = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn epoch_ns(t: SystemTime) -> i64 {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// The four services in-process, serving on loopback.
struct Stack {
    runner_addr: String,
    identity_addr: String,
    vault_addr: String,
    dispatcher_addr: String,
    runner: Runner,
    instance: String,
    times: Arc<Times>,
    stop: CancellationToken,
    servers: Vec<tokio::task::JoinHandle<Result<(), bulkhead_mesh::server::ServeError>>>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn start_stack(pki: &Pki) -> anyhow::Result<Stack> {
    let stop = CancellationToken::new();
    let times = Arc::new(Times::default());
    let (adir, idir, vdir, ddir, rdir) = (
        temp("audit")?,
        temp("identity")?,
        temp("vault")?,
        temp("dispatcher")?,
        temp("runner")?,
    );

    // Audit.
    let audit_store = bulkhead_audit::store::open(&format!(
        "sqlite://{}",
        adir.path().join("audit.db").display()
    ))
    .await
    .context("failed to open the audit store")?;
    let log = Log::open(
        audit_store,
        Signer::generate(),
        LogConfig::default(),
        stop.clone(),
    )
    .await?;
    let server = MeshServer::new("audit", pki.audit.clone(), pki.bundle.clone());
    let api = bulkhead_audit::service::AuditApi::new(log, server.draining());
    let bound = server
        .add_service(
            TimedService {
                inner: bulkhead_audit::service::server(api),
                label: "audit",
                times: times.clone(),
            },
            bulkhead_audit::service::POLICY,
        )
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let audit_addr = bound.local_addr().to_string();
    let audit_serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));

    // Identity, put together as its main.rs does.
    let identity_audit = AuditClient::new(bulkhead_mesh::client::channel(
        &audit_addr,
        Some(&pki.identity),
        &pki.bundle,
        ExpectServer::Service("audit".into()),
    )?);
    let identity_store = bulkhead_identity::store::open(&format!(
        "sqlite://{}",
        idir.path().join("identity.db").display()
    ))
    .await
    .context("failed to open the identity store")?;
    let keys = JwtKeys::load_or_create(&idir.path().join("jwt-keys.json"), 86_400, 900, now_ms())?;
    let server = MeshServer::new("identity", pki.identity.clone(), pki.bundle.clone())
        .client_auth(ClientAuth::Optional);
    let api = IdentityApi::start(
        bulkhead_identity::service::Parts {
            ca: Ca::load(&pki.ca_cert, &pki.ca_key)?,
            authorities: pki.bundle.authorities().to_vec(),
            store: identity_store,
            keys: Arc::new(keys),
            audit: identity_audit.clone(),
            limits: Limits {
                run_svid_max_ttl: Duration::from_secs(15 * 60),
                worker_svid_ttl: Duration::from_secs(24 * 3600),
                jwt_max_ttl: Duration::from_secs(5 * 60),
            },
            draining: server.draining(),
        },
        stop.clone(),
    )
    .await?;
    let bound = server
        .revocations(api.revocations())
        .denials(Arc::new(AuditDenials::new(identity_audit)))
        .add_service(
            bulkhead_identity::service::server(api),
            bulkhead_identity::service::POLICY,
        )
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let identity_addr = bound.local_addr().to_string();
    let identity_serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));

    // Sealed-vault, put together as its main.rs does.
    let sealed_store = bulkhead_sealed_vault::store::open(&format!(
        "sqlite://{}",
        vdir.path().join("sealed.db").display()
    ))
    .await
    .context("failed to open the sealed store")?;
    let vault_channel = |addr: &str, name: &str| {
        bulkhead_mesh::client::channel(
            addr,
            Some(&pki.vault),
            &pki.bundle,
            ExpectServer::Service(name.into()),
        )
    };
    let vault_revocations = Arc::new(RevocationList::new());
    tokio::spawn(bulkhead_mesh::revocation::follow(
        vault_revocations.clone(),
        vault_channel(&identity_addr, "identity")?,
        stop.clone(),
    ));
    let fingerprint_key: [u8; 32] = rand::random();
    let api = SealedVaultApi::new(bulkhead_sealed_vault::service::Parts {
        trust_domain: pki.td.clone(),
        audience: pki.vault.spiffe_id().to_string(),
        store: sealed_store,
        master: MasterKey::generate(),
        previous: Vec::new(),
        fingerprint_key: SecretValue::new(fingerprint_key.to_vec()),
        backends: Backends::default(),
        audit: AuditClient::new(vault_channel(&audit_addr, "audit")?),
        identity: IdClient::new(vault_channel(&identity_addr, "identity")?),
        revocations: vault_revocations.clone(),
        reveals_per_minute: 10,
        // A fresh store: nothing for a start to replay.
        recover_holdings: None,
    });
    let bound = MeshServer::new("sealed-vault", pki.vault.clone(), pki.bundle.clone())
        .revocations(vault_revocations.clone())
        .add_service(
            TimedService {
                inner: bulkhead_sealed_vault::service::server(api),
                label: "vault",
                times: times.clone(),
            },
            bulkhead_sealed_vault::service::POLICY,
        )
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let vault_addr = bound.local_addr().to_string();
    let vault_serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));

    // The dispatcher, put together as its main.rs does (no Redis).
    let dispatcher_channel = |addr: &str, name: &str| {
        bulkhead_mesh::client::channel(
            addr,
            Some(&pki.dispatcher),
            &pki.bundle,
            ExpectServer::Service(name.into()),
        )
    };
    let dispatcher_audit = AuditClient::new(dispatcher_channel(&audit_addr, "audit")?);
    let dispatch_store = bulkhead_dispatcher::store::open(&format!(
        "sqlite://{}",
        ddir.path().join("dispatcher.db").display()
    ))
    .await
    .context("failed to open the dispatcher store")?;
    let dispatcher_revocations = Arc::new(RevocationList::new());
    tokio::spawn(bulkhead_mesh::revocation::follow(
        dispatcher_revocations.clone(),
        dispatcher_channel(&identity_addr, "identity")?,
        stop.clone(),
    ));
    let server = MeshServer::new("dispatcher", pki.dispatcher.clone(), pki.bundle.clone());
    let engine = Engine::start(
        bulkhead_dispatcher::engine::Parts {
            store: dispatch_store,
            audit: dispatcher_audit.clone(),
            actor: pki.dispatcher.spiffe_id().to_string(),
            identity: IdClient::new(dispatcher_channel(&identity_addr, "identity")?),
            fleet: bulkhead_dispatcher::config::Config::default().fleet,
            wake: Wake::none(),
            draining: server.draining(),
        },
        stop.clone(),
    );
    let bound = server
        .revocations(dispatcher_revocations.clone())
        .denials(Arc::new(bulkhead_dispatcher::service::AuditDenials::new(
            dispatcher_audit,
        )))
        .add_service(
            TimedService {
                inner: bulkhead_dispatcher::service::server(
                    bulkhead_dispatcher::service::DispatcherApi::new(
                        engine,
                        Some(VaultClient::new(dispatcher_channel(
                            &vault_addr,
                            "sealed-vault",
                        )?)),
                    ),
                ),
                label: "dispatcher",
                times: times.clone(),
            },
            bulkhead_dispatcher::service::POLICY,
        )
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let dispatcher_addr = bound.local_addr().to_string();
    let dispatcher_serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));

    // The sandbox-runner, put together as its main.rs does (Docker only).
    let mut config = Config::default();
    config.mesh.data_dir = rdir.path().to_path_buf();
    config.backends = vec![BackendKind::Docker];
    config.default_backend = DefaultBackend::Docker;
    config.images = vec![support::IMAGE.to_owned()];
    config.container_prefix = "bulkhead-bench-sbx-".into();
    config.user = USER.into();
    config.tmpfs_size = TMPFS_SIZE.into();
    let runner_channel = |addr: &str, name: &str| {
        bulkhead_mesh::client::channel(
            addr,
            Some(&pki.runner),
            &pki.bundle,
            ExpectServer::Service(name.into()),
        )
    };
    let peers = Peers {
        sealed: VaultClient::new(runner_channel(&vault_addr, "sealed-vault")?),
        identity: IdClient::new(runner_channel(&identity_addr, "identity")?),
        dispatcher: DispClient::new(runner_channel(&dispatcher_addr, "dispatcher")?),
        audit: AuditClient::new(runner_channel(&audit_addr, "audit")?),
    };
    let shim = shim::install(&config.shim_dir()).context("failed to install the init shim")?;
    let instance = hex::encode(rand::random::<[u8; 12]>());
    let revocations = Arc::new(RevocationList::new());
    let synced = Arc::new(AtomicBool::new(false));
    let runner = Runner::new(Parts {
        config,
        trust_domain: pki.td.clone(),
        self_id: pki.runner.spiffe_id().to_string(),
        peers,
        revocations: revocations.clone(),
        synced: synced.clone(),
        shim,
        instance: instance.clone(),
    });
    tokio::spawn(revocation::follow(
        revocations.clone(),
        synced.clone(),
        runner_channel(&identity_addr, "identity")?,
        runner.clone(),
        stop.clone(),
    ));
    let server = MeshServer::new("sandbox-runner", pki.runner.clone(), pki.bundle.clone());
    let draining = server.draining();
    let bound = server
        .revocations(revocations)
        .add_service(
            TimedService {
                inner: service::server(SandboxRunnerApi::new(runner.clone(), draining)),
                label: "runner",
                times: times.clone(),
            },
            service::POLICY,
        )
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let runner_addr = bound.local_addr().to_string();
    let runner_serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));

    let waited = Instant::now();
    while !(vault_revocations.synced()
        && dispatcher_revocations.synced()
        && synced.load(std::sync::atomic::Ordering::Acquire))
    {
        ensure!(
            waited.elapsed() < Duration::from_secs(30),
            "the revocation lists did not sync with identity in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(Stack {
        runner_addr,
        identity_addr,
        vault_addr,
        dispatcher_addr,
        runner,
        instance,
        times,
        stop,
        servers: vec![
            audit_serving,
            identity_serving,
            vault_serving,
            dispatcher_serving,
            runner_serving,
        ],
        _dirs: vec![adir, idir, vdir, ddir, rdir],
    })
}

impl Stack {
    async fn shutdown(self) -> anyhow::Result<()> {
        // As the runner's main does: no sandbox outlives it.
        self.runner.shutdown().await;
        self.stop.cancel();
        for s in self.servers {
            tokio::time::timeout(CALL, s)
                .await
                .context("a server did not stop")???;
        }
        Ok(())
    }
}

async fn connect(
    pki: &Pki,
    addr: &str,
    service: &str,
    who: &Identity,
) -> anyhow::Result<MeshChannel> {
    Ok(bulkhead_mesh::client::connect(
        addr,
        Some(who),
        &pki.bundle,
        ExpectServer::Service(service.into()),
    )
    .await?)
}

/// Bounds any call.
async fn within<T, E: Into<anyhow::Error>>(
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL, f).await {
        Ok(r) => r.map_err(Into::into).with_context(|| what.to_owned()),
        Err(_) => bail!("{what}: no answer in {CALL:?}"),
    }
}

/// The profile and its 3 built-in secrets, written by an operator.
async fn seed(stack: &Stack, pki: &Pki) -> anyhow::Result<()> {
    let mut op =
        VaultClient::new(connect(pki, &stack.vault_addr, "sealed-vault", &pki.operator).await?);
    within(
        "CreateProfile",
        op.create_profile(spb::CreateProfileRequest {
            tenant: TENANT.into(),
            name: PROFILE.into(),
            spec: Some(spb::ProfileSpec {
                description: "sandbox benchmark".into(),
                ..spb::ProfileSpec::default()
            }),
        }),
    )
    .await?;
    for key in SECRET_KEYS {
        let value = hex::encode(rand::random::<[u8; 24]>()).into_bytes();
        within(
            "PutSecret",
            op.put_secret(spb::PutSecretRequest {
                tenant: TENANT.into(),
                profile: PROFILE.into(),
                key: key.into(),
                source: Some(spb::put_secret_request::Source::Value(value.into())),
            }),
        )
        .await?;
    }
    Ok(())
}

/// The versions of [`AGENT`] the bench runs, and their commands.
const V_TRUE: &str = "1.0.0";
const V_SLEEP: &str = "1.0.1";

/// Both versions of the agent, submitted by an operator and approved by a
/// second one.
async fn approve_agents(stack: &Stack, pki: &Pki) -> anyhow::Result<()> {
    let mut op =
        DispClient::new(connect(pki, &stack.dispatcher_addr, "dispatcher", &pki.operator).await?);
    let mut reviewer =
        DispClient::new(connect(pki, &stack.dispatcher_addr, "dispatcher", &pki.reviewer).await?);
    for (version, command) in [(V_TRUE, vec![TRUE]), (V_SLEEP, vec!["sleep", "300"])] {
        within(
            "SubmitAgent",
            op.submit_agent(dpb::SubmitAgentRequest {
                name: AGENT.into(),
                version: version.into(),
                image: support::IMAGE.into(),
                command: command.iter().map(|c| (*c).to_owned()).collect(),
                requested_secret_keys: SECRET_KEYS.iter().map(|k| (*k).to_owned()).collect(),
                description: "sandbox benchmark".into(),
                ..Default::default()
            }),
        )
        .await?;
        within(
            "ApproveAgent",
            reviewer.approve_agent(dpb::ApproveAgentRequest {
                name: AGENT.into(),
                version: version.into(),
                comment: "benchmark".into(),
            }),
        )
        .await?;
    }
    Ok(())
}

/// A run as its worker holds it.
struct Run {
    id: String,
    token: String,
    task_id: String,
    assignment: dpb::ClaimAssignment,
}

/// Worker w1 at the dispatcher: registered, its Claim stream open, its
/// leases heartbeated.
struct Claims {
    tx: mpsc::Sender<dpb::ClaimRequest>,
    inbound: tonic::Streaming<dpb::ClaimResponse>,
    leases: Arc<Mutex<Vec<dpb::HeldLease>>>,
    heartbeats: tokio::task::JoinHandle<()>,
}

impl Drop for Claims {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

impl Claims {
    async fn open(stack: &Stack, pki: &Pki) -> anyhow::Result<Self> {
        let mut client =
            DispClient::new(connect(pki, &stack.dispatcher_addr, "dispatcher", &pki.worker).await?);
        within(
            "RegisterWorker",
            client.register_worker(dpb::RegisterWorkerRequest {
                labels: Default::default(),
                max_concurrent_runs: 16,
                sandbox_backends: vec![pb::SandboxBackend::Docker as i32],
                version: "sandbox-bench".into(),
            }),
        )
        .await?;
        let (tx, rx) = mpsc::channel(64);
        let inbound = within("Claim", client.claim(ReceiverStream::new(rx)))
            .await?
            .into_inner();
        let leases: Arc<Mutex<Vec<dpb::HeldLease>>> = Arc::default();
        let heartbeats = tokio::spawn({
            let (tx, leases) = (tx.clone(), leases.clone());
            async move {
                loop {
                    tokio::time::sleep(HEARTBEAT).await;
                    let held = leases.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let beat = dpb::ClaimRequest {
                        body: Some(Up::Heartbeat(dpb::ClaimHeartbeat { leases: held })),
                    };
                    if tx.send(beat).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Self {
            tx,
            inbound,
            leases,
            heartbeats,
        })
    }

    async fn send(&self, body: Up) -> anyhow::Result<()> {
        self.tx
            .send(dpb::ClaimRequest { body: Some(body) })
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

    /// A running run of a task of acme for `version` of the agent, with the
    /// profile's cascade: enqueued by `operator`, claimed and accepted here,
    /// its JWT-SVID minted.
    async fn run(
        &mut self,
        stack: &Stack,
        pki: &Pki,
        operator: &mut DispClient,
        version: &str,
    ) -> anyhow::Result<Run> {
        self.send(Up::Credits(dpb::ClaimCredits { slots: 1 }))
            .await?;
        let task_id = within(
            "Enqueue",
            operator.enqueue(dpb::EnqueueRequest {
                tenant: TENANT.into(),
                agent: AGENT.into(),
                agent_version: version.into(),
                cascade: Some(cascade()),
                payload: b"the task payload".to_vec().into(),
                ..Default::default()
            }),
        )
        .await?
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
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
        self.send(Up::Accept(dpb::ClaimAccept {
            task_id: task_id.clone(),
            attempt: assignment.attempt,
            lease_epoch: assignment.lease_epoch,
            run_csr_der: bytes::Bytes::copy_from_slice(csr.der()),
        }))
        .await?;
        let accepted = self
            .expect("run svid", |m| match m {
                Down::RunSvid(s) if s.task_id == task_id => Some(s.clone()),
                _ => None,
            })
            .await?;
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dpb::HeldLease {
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
        let run = Identity::from_der(
            chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            &svid.spiffe_id,
        )?;
        let mut as_run = IdClient::new(connect(pki, &stack.identity_addr, "identity", &run).await?);
        let token = within(
            "MintJwtSvid",
            as_run.mint_jwt_svid(idpb::MintJwtSvidRequest {
                audience: pki.vault.spiffe_id().to_string(),
                ttl: None,
                spiffe_id: String::new(),
            }),
        )
        .await?
        .into_inner()
        .token;
        Ok(Run {
            id: accepted.run_id,
            token,
            task_id,
            assignment,
        })
    }

    /// Reports `run` finished with `outcome`, and waits for the acknowledgement.
    async fn report(&mut self, run: &Run, outcome: dpb::RunOutcome) -> anyhow::Result<()> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|l| l.task_id != run.task_id);
        self.send(Up::Report(dpb::ClaimReport {
            task_id: run.task_id.clone(),
            attempt: run.assignment.attempt,
            lease_epoch: run.assignment.lease_epoch,
            outcome: outcome as i32,
            exit_code: 0,
            output_summary: "sandbox benchmark".into(),
        }))
        .await?;
        let task_id = run.task_id.clone();
        self.expect("report ack", |m| match m {
            Down::ReportAck(a) if a.task_id == task_id => Some(()),
            _ => None,
        })
        .await
    }
}

fn cascade() -> spb::Cascade {
    spb::Cascade {
        system: Some(spb::CascadeLevel {
            profile: Some(spb::ProfileRef {
                tenant: TENANT.into(),
                profile: PROFILE.into(),
            }),
            overrides: Default::default(),
        }),
        ..Default::default()
    }
}

/// StartSandbox for `run`, as a worker sends it: the assignment's image,
/// command, cascade, agent, tool, keys and payload.
fn start_request(run: &Run) -> anyhow::Result<pb::StartSandboxRequest> {
    let agent = run.assignment.agent.as_ref().context("no agent")?;
    let task = run.assignment.task.as_ref().context("no task")?;
    Ok(pb::StartSandboxRequest {
        tenant: TENANT.into(),
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
            memory_bytes: MEMORY,
            cpu_millis: CPU_MILLIS,
            pids: PIDS,
            timeout: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
        }),
        backend: pb::SandboxBackend::Docker as i32,
        ..Default::default()
    })
}

// ---------------------------------------------------------------------------
// The engine, as the bench sees it.

/// The engine's container events, by container id: (action, time in ns
/// since the epoch).
type Events = Arc<Mutex<HashMap<String, Vec<(String, i64)>>>>;

async fn follow_events(docker: Docker, events: Events, stop: CancellationToken) {
    let filters = HashMap::from([("type", vec!["container"])]);
    let mut stream = docker.events(Some(
        EventsOptionsBuilder::default().filters(&filters).build(),
    ));
    loop {
        let m = tokio::select! {
            () = stop.cancelled() => return,
            m = stream.next() => m,
        };
        match m {
            Some(Ok(ev)) => {
                let (Some(id), Some(action), Some(t)) =
                    (ev.actor.and_then(|a| a.id), ev.action, ev.time_nano)
                else {
                    continue;
                };
                events
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(id)
                    .or_default()
                    .push((action, t));
            }
            Some(Err(e)) => {
                eprintln!("docker events ended: {e}");
                return;
            }
            None => return,
        }
    }
}

/// When the engine logged `action` for container `id`, as an offset from
/// `from` (ns since the epoch); None if it did not (or before `from`).
fn event_at(events: &Events, id: &str, action: &str, from: i64) -> Option<Duration> {
    let all = events.lock().unwrap_or_else(|p| p.into_inner());
    let t = all.get(id)?.iter().find(|(a, _)| a == action)?.1;
    u64::try_from(t - from).ok().map(Duration::from_nanos)
}

/// The container the runner would make, without the shim (no bind mount, no
/// stdin): same image, user, limits and hardening.
fn bare_body(nonce: &str) -> ContainerCreateBody {
    let memory = i64::try_from(MEMORY).unwrap_or(i64::MAX);
    ContainerCreateBody {
        image: Some(support::IMAGE.into()),
        cmd: Some(vec![TRUE.into()]),
        user: Some(USER.into()),
        labels: Some(HashMap::from([(BENCH_LABEL.to_owned(), nonce.to_owned())])),
        tty: Some(false),
        host_config: Some(HostConfig {
            cap_drop: Some(vec!["ALL".into()]),
            privileged: Some(false),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            readonly_rootfs: Some(true),
            pids_limit: Some(i64::from(PIDS)),
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some(i64::from(CPU_MILLIS) * 1_000_000),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_owned(),
                format!("rw,noexec,nosuid,nodev,size={TMPFS_SIZE},mode=1777"),
            )])),
            network_mode: Some("none".into()),
            ipc_mode: Some("private".into()),
            init: Some(false),
            auto_remove: Some(false),
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Waits until the container is not running; its exit code.
async fn wait_exit(docker: &Docker, id: &str) -> anyhow::Result<i64> {
    let opts = WaitContainerOptionsBuilder::default()
        .condition("not-running")
        .build();
    let mut wait = Box::pin(docker.wait_container(id, Some(opts)));
    match tokio::time::timeout(CALL, wait.next()).await {
        Err(_) => bail!("container {id} still running after {CALL:?}"),
        Ok(Some(Ok(r))) => Ok(r.status_code),
        Ok(Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. }))) => Ok(code),
        Ok(Some(Err(e))) => Err(e).context("wait"),
        Ok(None) => bail!("the wait on {id} ended without an answer"),
    }
}

async fn remove(docker: &Docker, id: &str) -> anyhow::Result<()> {
    let opts = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    within("remove", docker.remove_container(id, Some(opts))).await
}

// ---------------------------------------------------------------------------
// Phase 1: starts side by side.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bare,
    Injected,
}

/// One start, as the client saw it.
#[derive(Debug, Clone)]
struct Sample {
    kind: Kind,
    id: String,
    /// When the call began (ns since the epoch), for the engine's events.
    wall0: i64,
    started: Duration,
    exited: Duration,
    release: Duration,
    inside: Option<Inside>,
}

/// What the services measured during one injected start.
#[derive(Debug, Clone, Copy, Default)]
struct Inside {
    handler: Duration,
    /// The dispatcher's GetRunAssignment handler.
    assignment: Duration,
    resolve: Duration,
    /// The audit Append(s) sealed-vault made inside its Resolve.
    vault_append: Duration,
    /// The audit Append(s) the runner made after the Resolve.
    runner_append: Duration,
}

impl Inside {
    fn of(calls: &[Call]) -> anyhow::Result<Self> {
        let one = |m: &str| -> anyhow::Result<&Call> {
            let found: Vec<&Call> = calls.iter().filter(|c| c.method == m).collect();
            ensure!(
                found.len() == 1,
                "{} {m} calls in one start, expected 1",
                found.len()
            );
            Ok(found[0])
        };
        let handler = one("runner.StartSandbox")?;
        let assignment = one("dispatcher.GetRunAssignment")?;
        let resolve = one("vault.Resolve")?;
        let resolve_end = resolve.start + resolve.took;
        let appends = calls.iter().filter(|c| c.method == "audit.Append");
        let (mut vault_append, mut runner_append) = (Duration::ZERO, Duration::ZERO);
        for a in appends {
            if a.start >= resolve.start && a.start < resolve_end {
                vault_append += a.took;
            } else if a.start >= resolve_end {
                runner_append += a.took;
            }
        }
        Ok(Self {
            handler: handler.took,
            assignment: assignment.took,
            resolve: resolve.took,
            vault_append,
            runner_append,
        })
    }
}

struct Bench<'a> {
    pki: &'a Pki,
    stack: &'a Stack,
    docker: Docker,
    containers: Arc<Containers>,
    events: Events,
    nonce: String,
    worker: RunnerClient,
    claims: Claims,
    /// The operator at the dispatcher (Enqueue) and at identity (Revoke).
    enqueuer: DispClient,
    operator: IdClient,
}

impl Bench<'_> {
    async fn run(&mut self, version: &str) -> anyhow::Result<Run> {
        self.claims
            .run(self.stack, self.pki, &mut self.enqueuer, version)
            .await
    }

    async fn bare(&mut self, i: usize) -> anyhow::Result<Sample> {
        let name = format!("bulkhead-bench-bare-{}-{i}", self.nonce);
        let body = bare_body(&self.nonce);
        tokio::time::sleep(SETTLE).await;
        let wall0 = epoch_ns(SystemTime::now());
        let t0 = Instant::now();
        let created = within(
            "create",
            self.docker.create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body,
            ),
        )
        .await?;
        let id = created.id;
        self.containers.add(&id);
        within("start", self.docker.start_container(&id, None)).await?;
        let started = t0.elapsed();
        let code = wait_exit(&self.docker, &id).await?;
        let exited = t0.elapsed();
        ensure!(code == 0, "the bare container exited {code}");
        let t = Instant::now();
        remove(&self.docker, &id).await?;
        let release = t.elapsed();
        self.containers.gone(&id);
        Ok(Sample {
            kind: Kind::Bare,
            id,
            wall0,
            started,
            exited,
            release,
            inside: None,
        })
    }

    async fn injected(&mut self) -> anyhow::Result<Sample> {
        let run = self.run(V_TRUE).await?;
        let req = start_request(&run)?;
        tokio::time::sleep(SETTLE).await;
        self.stack.times.take();
        let wall0 = epoch_ns(SystemTime::now());
        let t0 = Instant::now();
        let sb = within("StartSandbox", self.worker.start_sandbox(req))
            .await?
            .into_inner()
            .sandbox
            .context("no sandbox")?;
        let started = t0.elapsed();
        let calls = self.stack.times.take();
        let id = sb.container_id.clone();
        self.containers.add(&id);
        ensure!(
            sb.injected_keys.len() == SECRET_KEYS.len(),
            "injected {:?}",
            sb.injected_keys
        );
        let code = wait_exit(&self.docker, &id).await?;
        let exited = t0.elapsed();
        ensure!(code == 0, "the injected sandbox exited {code}");
        let t = Instant::now();
        let report = within(
            "ReleaseSandbox",
            self.worker.release_sandbox(pb::ReleaseSandboxRequest {
                tenant: TENANT.into(),
                sandbox_id: sb.sandbox_id.clone(),
            }),
        )
        .await?
        .into_inner()
        .report
        .context("no report")?;
        let release = t.elapsed();
        ensure!(
            report.sandbox_destroyed && report.credentials_zeroized && report.run_identity_revoked,
            "release report: {report:?}"
        );
        self.containers.gone(&id);
        self.claims.report(&run, dpb::RunOutcome::Succeeded).await?;
        Ok(Sample {
            kind: Kind::Injected,
            id,
            wall0,
            started,
            exited,
            release,
            inside: Some(Inside::of(&calls)?),
        })
    }

    /// Starts of both kinds, in pairs A B, B A, …: `warmup` pairs not
    /// counted, then `n` pairs.
    async fn starts(&mut self, p: &Params) -> anyhow::Result<(Vec<Sample>, Vec<String>)> {
        let mut notes = Vec::new();
        let mut out = Vec::new();
        let deadline = Instant::now() + p.phase;
        let (mut failed, mut first) = (0, None);
        for i in 0..p.warmup + p.n {
            if Instant::now() >= deadline {
                notes.push(format!(
                    "the start phase stopped at its deadline after {} pairs",
                    out.len() / 2
                ));
                break;
            }
            let order = if i % 2 == 0 {
                [Kind::Bare, Kind::Injected]
            } else {
                [Kind::Injected, Kind::Bare]
            };
            for k in order {
                let r = match k {
                    Kind::Bare => self.bare(i).await,
                    Kind::Injected => self.injected().await,
                };
                match r {
                    Ok(s) if i >= p.warmup => out.push(s),
                    Ok(_) => {}
                    Err(e) => {
                        failed += 1;
                        first.get_or_insert(format!("{e:#}"));
                    }
                }
            }
            if failed > 5 {
                bail!(
                    "{failed} starts failed; first: {}",
                    first.unwrap_or_default()
                );
            }
        }
        if failed > 0 {
            notes.push(format!(
                "{failed} starts failed (not counted); first: {}",
                first.unwrap_or_default()
            ));
        }
        Ok((out, notes))
    }

    /// The runner's own extra engine calls, alone: ping + inspect image.
    async fn engine_probe(&self, n: usize) -> anyhow::Result<Dist> {
        let mut all = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            within("ping", self.docker.ping()).await?;
            within("inspect image", self.docker.inspect_image(support::IMAGE)).await?;
            all.push(t.elapsed());
        }
        Ok(Dist::of(all))
    }

    // -----------------------------------------------------------------------
    // Phase 2: revocation.

    async fn revoke_once(&mut self) -> anyhow::Result<Revoked> {
        let run = self.run(V_SLEEP).await?;
        let run_id = run.id.clone();
        let sb = within(
            "StartSandbox",
            self.worker.start_sandbox(start_request(&run)?),
        )
        .await?
        .into_inner()
        .sandbox
        .context("no sandbox")?;
        let id = sb.container_id.clone();
        self.containers.add(&id);
        let (docker, wid) = (self.docker.clone(), id.clone());
        let waiter = tokio::spawn(async move {
            let r = wait_exit(&docker, &wid).await;
            (r, Instant::now())
        });
        tokio::time::sleep(WAIT_SETTLE).await;
        ensure!(!waiter.is_finished(), "the sandbox ended before the revoke");
        let wall0 = epoch_ns(SystemTime::now());
        let t0 = Instant::now();
        within(
            "Revoke",
            self.operator.revoke(idpb::RevokeRequest {
                tenant: TENANT.into(),
                target: Some(idpb::revoke_request::Target::RunId(run_id.clone())),
                reason: "sandbox benchmark: hard revocation".into(),
                hard: true,
            }),
        )
        .await?;
        let rpc = t0.elapsed();
        let (code, dead_at) = match tokio::time::timeout(REVOKE_WAIT, waiter).await {
            Ok(Ok((r, at))) => (r?, at),
            Ok(Err(e)) => bail!("the wait task failed: {e}"),
            Err(_) => bail!("the revoked sandbox still runs after {REVOKE_WAIT:?}"),
        };
        let stopped = dead_at - t0;
        // Removed by the runner's scrub.
        let mut removed = None;
        while t0.elapsed() < REVOKE_WAIT {
            match self.docker.inspect_container(&id, None).await {
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {
                    removed = Some(t0.elapsed());
                    break;
                }
                Err(e) => return Err(e).context("inspect"),
                Ok(_) => tokio::time::sleep(POLL).await,
            }
        }
        let removed = removed.context("the revoked sandbox's container was not removed")?;
        self.containers.gone(&id);
        let mut released = None;
        while t0.elapsed() < REVOKE_WAIT {
            let got = within(
                "GetSandbox",
                self.worker.get_sandbox(pb::GetSandboxRequest {
                    tenant: TENANT.into(),
                    sandbox_id: sb.sandbox_id.clone(),
                }),
            )
            .await?
            .into_inner()
            .sandbox
            .context("no sandbox")?;
            if got.state() == pb::SandboxState::Released {
                let reason = got.exit.map(|e| e.reason());
                ensure!(
                    reason == Some(pb::ExitReason::Revoked),
                    "released with {reason:?}"
                );
                released = Some(t0.elapsed());
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        let released = released.context("the revoked sandbox was not released")?;
        self.claims.report(&run, dpb::RunOutcome::Revoked).await?;
        Ok(Revoked {
            id,
            wall0,
            code,
            rpc,
            stopped,
            removed,
            released,
        })
    }

    async fn revocations(&mut self, p: &Params) -> anyhow::Result<(Vec<Revoked>, Vec<String>)> {
        let mut out = Vec::new();
        let mut notes = Vec::new();
        let deadline = Instant::now() + p.phase;
        let (mut failed, mut first) = (0, None);
        for _ in 0..p.revoke_n {
            if Instant::now() >= deadline {
                notes.push(format!(
                    "the revocation phase stopped at its deadline after {}",
                    out.len()
                ));
                break;
            }
            match self.revoke_once().await {
                Ok(r) => out.push(r),
                Err(e) => {
                    failed += 1;
                    first.get_or_insert(format!("{e:#}"));
                    if failed > 5 {
                        bail!(
                            "{failed} revocations failed; first: {}",
                            first.unwrap_or_default()
                        );
                    }
                }
            }
        }
        if failed > 0 {
            notes.push(format!(
                "{failed} revocation runs failed (not counted); first: {}",
                first.unwrap_or_default()
            ));
        }
        Ok((out, notes))
    }
}

#[derive(Debug, Clone)]
struct Revoked {
    id: String,
    wall0: i64,
    code: i64,
    rpc: Duration,
    stopped: Duration,
    removed: Duration,
    released: Duration,
}

// ---------------------------------------------------------------------------
// Report.

fn report_starts(samples: &[Sample], events: &Events, engine: &Dist) {
    let of = |k: Kind| samples.iter().filter(move |s| s.kind == k);
    let dist = |k: Kind, f: &dyn Fn(&Sample) -> Duration| Dist::of(of(k).map(f).collect());
    let (bs, is) = (
        dist(Kind::Bare, &|s| s.started),
        dist(Kind::Injected, &|s| s.started),
    );
    let (be, ie) = (
        dist(Kind::Bare, &|s| s.exited),
        dist(Kind::Injected, &|s| s.exited),
    );
    let (br, ir) = (
        dist(Kind::Bare, &|s| s.release),
        dist(Kind::Injected, &|s| s.release),
    );
    println!("\n== starts, side by side ==");
    println!("\n| what | N | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("{}", bs.row("bare: create + start, to `start` returned"));
    println!(
        "{}",
        is.row("injected: StartSandbox (Resolve, audit, shim frame), to its return")
    );
    println!("{}", be.row("bare: to the container exited"));
    println!("{}", ie.row("injected: to the container exited"));
    println!("{}", br.row("bare: `rm -f`"));
    println!(
        "{}",
        ir.row("injected: ReleaseSandbox (kill, remove, zeroize, revoke, audit)")
    );
    let goal = |r: f64| if r <= 1.10 { "✅" } else { "❌" };
    let (r1, r2) = (ratio(is.p50, bs.p50), ratio(ie.p50, be.p50));
    println!(
        "\nratio of medians, to started: {r1:.3} ({:+.1} %, {:+.2} ms) vs goal ≤ 1.10 {}",
        (r1 - 1.0) * 100.0,
        (is.p50.as_secs_f64() - bs.p50.as_secs_f64()) * 1000.0,
        goal(r1)
    );
    println!(
        "ratio of medians, to exited:  {r2:.3} ({:+.1} %, {:+.2} ms) vs goal ≤ 1.10 {}",
        (r2 - 1.0) * 100.0,
        (ie.p50.as_secs_f64() - be.p50.as_secs_f64()) * 1000.0,
        goal(r2)
    );
    println!("ratio of medians, release: {:.3}", ratio(ir.p50, br.p50));
    // Per pair: injected / bare of the same pair.
    let pairs: Vec<f64> = samples
        .chunks(2)
        .filter_map(|c| match c {
            [a, b] if a.kind != b.kind => {
                let (bare, inj) = if a.kind == Kind::Bare { (a, b) } else { (b, a) };
                Some(ratio(inj.started, bare.started))
            }
            _ => None,
        })
        .collect();
    let mut sorted = pairs.clone();
    sorted.sort_by(f64::total_cmp);
    if !sorted.is_empty() {
        println!(
            "per-pair ratio injected/bare, to started: median {:.3} over {} pairs",
            sorted[sorted.len() / 2],
            sorted.len()
        );
    }
    // Drift: the first and second half.
    for (h, part) in [("first", 0), ("second", 1)] {
        let half: Vec<&Sample> = samples
            .iter()
            .enumerate()
            .filter(|(i, _)| (*i < samples.len() / 2) == (part == 0))
            .map(|(_, s)| s)
            .collect();
        let d = |k: Kind| {
            Dist::of(
                half.iter()
                    .filter(|s| s.kind == k)
                    .map(|s| s.started)
                    .collect(),
            )
        };
        println!(
            "  {h} half: bare p50 {} injected p50 {}",
            ms(d(Kind::Bare).p50),
            ms(d(Kind::Injected).p50)
        );
    }

    // Where the time goes: the engine's events against the call's start.
    let step = |k: Kind, from: Option<&str>, to: Option<&str>| -> Dist {
        Dist::of(
            of(k)
                .filter_map(|s| {
                    let at = |a: Option<&str>| match a {
                        None => Some(Duration::ZERO),
                        Some("returned") => Some(s.started),
                        Some(a) => event_at(events, &s.id, a, s.wall0),
                    };
                    Some(at(to)?.saturating_sub(at(from)?))
                })
                .collect(),
        )
    };
    println!("\n| where a start's time goes (engine event times) | N | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (k, name) in [(Kind::Bare, "bare"), (Kind::Injected, "injected")] {
        println!(
            "{}",
            step(k, None, Some("create")).row(&format!("{name}: call → `create` event"))
        );
        if k == Kind::Injected {
            println!(
                "{}",
                step(k, Some("create"), Some("attach"))
                    .row(&format!("{name}: `create` → `attach` event"))
            );
            println!(
                "{}",
                step(k, Some("attach"), Some("start"))
                    .row(&format!("{name}: `attach` → `start` event"))
            );
        } else {
            println!(
                "{}",
                step(k, Some("create"), Some("start"))
                    .row(&format!("{name}: `create` → `start` event"))
            );
        }
        println!(
            "{}",
            step(k, Some("start"), Some("returned"))
                .row(&format!("{name}: `start` event → call returned"))
        );
        println!(
            "{}",
            step(k, Some("start"), Some("die")).row(&format!("{name}: `start` → `die` event"))
        );
    }
    let inside: Vec<Inside> = of(Kind::Injected).filter_map(|s| s.inside).collect();
    let d = |f: &dyn Fn(&Inside) -> Duration| Dist::of(inside.iter().map(f).collect());
    println!(
        "{}",
        d(&|i| i.handler).row("inside: the runner's StartSandbox handler")
    );
    println!(
        "{}",
        d(&|i| i.assignment).row("inside: the dispatcher's GetRunAssignment handler")
    );
    println!(
        "{}",
        d(&|i| i.resolve).row("inside: sealed-vault's Resolve handler (its audit included)")
    );
    println!(
        "{}",
        d(&|i| i.vault_append).row("— of which audit's Append handler, for sealed-vault")
    );
    println!(
        "{}",
        d(&|i| i.runner_append)
            .row("inside: audit's Append handler, for the runner (`sandbox.credential.injected`)")
    );
    println!(
        "{}",
        engine.row("alone: engine ping + image inspect (the runner makes both per start)")
    );
    let after_start: Vec<Duration> = of(Kind::Injected)
        .filter_map(|s| {
            let start = event_at(events, &s.id, "start", s.wall0)?;
            let i = s.inside?;
            Some(
                s.started
                    .saturating_sub(start)
                    .saturating_sub(i.resolve + i.runner_append),
            )
        })
        .collect();
    println!(
        "{}",
        Dist::of(after_start).row(
            "injected: after `start`, minus Resolve and the runner's Append (RPC round trips, frame write, response)"
        )
    );
}

fn report_revocations(all: &[Revoked], events: &Events) {
    println!("\n== revocation → in-flight sandbox killed ==");
    println!("\n| from the Revoke call (hard, run) | N | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    let d = |f: &dyn Fn(&Revoked) -> Option<Duration>| Dist::of(all.iter().filter_map(f).collect());
    println!("{}", d(&|r| Some(r.rpc)).row("Revoke RPC returned"));
    println!(
        "{}",
        d(&|r| event_at(events, &r.id, "kill", r.wall0)).row("engine `kill` event")
    );
    println!(
        "{}",
        d(&|r| event_at(events, &r.id, "die", r.wall0)).row("engine `die` event")
    );
    let stopped = d(&|r| Some(r.stopped));
    println!(
        "{}",
        stopped.row("**container no longer running** (`wait` returned)")
    );
    println!(
        "{}",
        d(&|r| Some(r.removed)).row("container removed (inspect 404, polled every 10 ms)")
    );
    println!(
        "{}",
        d(&|r| Some(r.released)).row("runner reports it released (GetSandbox, polled every 10 ms)")
    );
    let codes: BTreeSet<i64> = all.iter().map(|r| r.code).collect();
    println!("exit codes seen: {codes:?}");
    println!(
        "p99 to not running: {} vs goal ≤ 1 s {}",
        ms(stopped.p99),
        if stopped.p99 <= Duration::from_secs(1) {
            "✅"
        } else {
            "❌"
        }
    );
}

async fn run(p: Params, containers: Arc<Containers>) -> anyhow::Result<()> {
    bulkhead_mesh::tls::install_crypto_provider();
    let docker = Docker::connect_with_local_defaults()
        .context("docker")?
        .negotiate_version()
        .await
        .context("the docker engine does not answer")?;
    let version = within("version", docker.version()).await?;
    let nonce = hex::encode(rand::random::<[u8; 4]>());
    containers.label(format!("{BENCH_LABEL}={nonce}"));
    let pki = pki()?;
    let stack = start_stack(&pki).await?;
    containers.label(format!("{INSTANCE_LABEL}={}", stack.instance));
    let stop_events = CancellationToken::new();
    let events: Events = Arc::default();
    let follower = tokio::spawn(follow_events(
        docker.clone(),
        events.clone(),
        stop_events.clone(),
    ));
    seed(&stack, &pki).await?;
    approve_agents(&stack, &pki).await?;
    println!(
        "engine {} (API {}), image {}; {} starts of each kind after {} pairs of warm-up; {} revocations",
        version.version.unwrap_or_default(),
        version.api_version.unwrap_or_default(),
        support::IMAGE,
        p.n,
        p.warmup,
        p.revoke_n
    );
    let mut bench = Bench {
        pki: &pki,
        stack: &stack,
        docker: docker.clone(),
        containers: containers.clone(),
        events: events.clone(),
        nonce,
        worker: RunnerClient::new(
            connect(&pki, &stack.runner_addr, "sandbox-runner", &pki.worker).await?,
        ),
        claims: Claims::open(&stack, &pki).await?,
        enqueuer: DispClient::new(
            connect(&pki, &stack.dispatcher_addr, "dispatcher", &pki.operator).await?,
        ),
        operator: IdClient::new(
            connect(&pki, &stack.identity_addr, "identity", &pki.operator).await?,
        ),
    };
    let phase_start = Instant::now();
    let (samples, mut notes) = bench.starts(&p).await?;
    println!(
        "start phase: {} samples in {:.1} s",
        samples.len(),
        phase_start.elapsed().as_secs_f64()
    );
    let engine = bench.engine_probe(p.n).await?;
    let phase_start = Instant::now();
    let (revoked, more) = bench.revocations(&p).await?;
    notes.extend(more);
    println!(
        "revocation phase: {} samples in {:.1} s",
        revoked.len(),
        phase_start.elapsed().as_secs_f64()
    );
    // The last events (a `destroy`) may trail the calls.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_events.cancel();
    let _ = follower.await;
    report_starts(&samples, &bench.events, &engine);
    report_revocations(&revoked, &bench.events);
    for n in &notes {
        println!("note: {n}");
    }
    drop(bench);
    stack.shutdown().await?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load at the end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    ensure!(
        samples.iter().any(|s| s.kind == Kind::Injected) && !revoked.is_empty(),
        "a phase measured nothing"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let p = Params::from_env()?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "sandbox-runner bench: {} cores, load {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    support::ensure_image().context("the test image")?;
    let containers = Arc::new(Containers::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the runtime")?;
    let r = rt.block_on(run(p, containers.clone()));
    // The runtime first (its tasks hold no container handle), then the
    // guard: every container of this run is removed by id.
    drop(rt);
    drop(containers);
    r
}
