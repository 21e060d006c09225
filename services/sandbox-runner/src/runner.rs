//! The runner: starts sandboxes for runs (token check, credential
//! resolution, launch, audited injection, delivery), releases and scrubs
//! them, and kills them on hard revocations. No tonic types past the peers'
//! clients; the handlers in `service.rs` convert.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bulkhead_mesh::Error;
use bulkhead_mesh::audit::{self, AuditClient, Outcome};
use bulkhead_mesh::client::{ConnectError, MeshChannel};
use bulkhead_mesh::jwt::{self, JwtBundle};
use bulkhead_mesh::revocation::RevocationList;
use bulkhead_mesh::spiffe::{Principal, SpiffeId, TrustDomain};
use bulkhead_mesh::tls::RevocationCheck as _;
use bulkhead_proto::dispatcher::v1 as disp_pb;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_proto::identity::v1 as id_pb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sealed::v1 as sealed_pb;
use bulkhead_proto::sealed::v1::sealed_vault_service_client::SealedVaultServiceClient;
use tokio::sync::mpsc;
use zeroize::{Zeroize as _, Zeroizing};

use crate::assignment::Assigned;
use crate::backend::docker::DockerBackend;
use crate::backend::process::ProcessBackend;
use crate::backend::{Backend, BackendError, LaunchSpec};
use crate::config::{self, Config, DefaultBackend, LimitsConfig};
use crate::model::{
    BackendKind, Exit, ExitReason, Limits, Network, NetworkMode, RequestedLimits, ScrubReport,
    StartRequest, State,
};
use crate::redact::Redactor;
use crate::sandbox::{NewSandbox, RegisterError, Registry, Sandbox, Secrets, supervise};
use crate::shim;

/// How often the JWT bundle is refreshed from identity.
const BUNDLE_REFRESH: Duration = Duration::from_secs(30);
/// How long a release waits for a killed sandbox's supervisor.
const SUPERVISOR_GRACE: Duration = Duration::from_secs(10);
/// How long revoking the run identity may take at release.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the dispatcher may take to say what a run was assigned.
const ASSIGNMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Env names the runner sets for the agent, after the cascade's.
pub const ENV_JWT: &str = "BULKHEAD_JWT_SVID";
pub const ENV_RUN: &str = "BULKHEAD_RUN_ID";
pub const ENV_TENANT: &str = "BULKHEAD_TENANT";
pub const ENV_TASK: &str = "BULKHEAD_TASK_ID";
pub const ENV_SANDBOX: &str = "BULKHEAD_SANDBOX_ID";

/// The runner's clients of the other services.
#[derive(Debug, Clone)]
pub struct Peers {
    pub sealed: SealedVaultServiceClient<MeshChannel>,
    pub identity: IdentityServiceClient<MeshChannel>,
    /// Says what each run was assigned (GetRunAssignment): what runs.
    pub dispatcher: DispatcherServiceClient<MeshChannel>,
    pub audit: AuditClient,
}

/// Makes a new channel to sealed-vault (see [`Runner::dial_sealed_per_start`]).
type DialSealed = Box<dyn Fn() -> Result<MeshChannel, ConnectError> + Send + Sync>;

/// Who is calling, as the mesh authenticated it.
#[derive(Debug, Clone)]
pub struct Who {
    pub id: SpiffeId,
    /// The client certificate's serial, lowercase hex without leading zeros.
    pub serial: Option<String>,
}

impl Who {
    pub fn is_operator(&self) -> bool {
        matches!(self.id.principal(), Principal::Operator { .. })
    }

    /// Whether this caller may see `sb`: its worker, or an operator.
    fn sees(&self, sb: &Sandbox) -> bool {
        self.is_operator() || sb.worker == self.id
    }
}

/// What the runner allows, from its configuration.
#[derive(Debug, Clone)]
struct Policy {
    default_backend: DefaultBackend,
    backends: Vec<BackendKind>,
    max_sandboxes: usize,
    images: Vec<String>,
    programs: Vec<String>,
    /// Where a bare program name of an agent's command is looked up.
    process_path: String,
    networks: std::collections::BTreeMap<String, Vec<String>>,
    limits: LimitsConfig,
}

/// What the runner is built from.
#[derive(Debug)]
pub struct Parts {
    pub config: Config,
    pub trust_domain: TrustDomain,
    /// This runner's SPIFFE ID (for the record).
    pub self_id: String,
    pub peers: Peers,
    pub revocations: Arc<RevocationList>,
    /// Set while the revocation watch is current (see `revocation.rs`).
    pub synced: Arc<AtomicBool>,
    /// The init shim, installed.
    pub shim: std::path::PathBuf,
    /// This runner instance's id (a label on its containers).
    pub instance: String,
}

struct Inner {
    policy: Policy,
    trust_domain: TrustDomain,
    /// The audience of run JWT-SVIDs: sealed-vault's SPIFFE ID.
    audience: String,
    self_id: String,
    peers: Peers,
    /// When set, each start's Resolve dials sealed-vault anew.
    dial_sealed: std::sync::OnceLock<DialSealed>,
    revocations: Arc<RevocationList>,
    synced: Arc<AtomicBool>,
    shim: std::path::PathBuf,
    docker: Option<Arc<DockerBackend>>,
    process: Option<Arc<ProcessBackend>>,
    registry: Registry,
    bundle: tokio::sync::RwLock<Option<(JwtBundle, Instant)>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("self_id", &self.self_id)
            .field("peers", &self.peers)
            .field("dial_sealed", &self.dial_sealed.get().is_some())
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// The runner (cheap to clone).
#[derive(Debug, Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

/// The values resolved for a run.
struct Resolved {
    /// (key, value, version, fingerprint)
    secrets: Vec<(String, Zeroizing<Vec<u8>>, u64, String)>,
    env: Vec<(String, String)>,
    audit_sequence: u64,
}

fn wipe(b: bytes::Bytes) {
    // Zeroized in place when this is the only handle on the buffer. Tonic's
    // decode buffer usually shares it (prost slices `bytes` fields out of
    // it), which is why the values are copied into zeroizing memory at once
    // and the response dropped: the binary's allocator zeroes the buffer
    // when its last handle goes.
    if let Ok(mut m) = b.try_into_mut() {
        m.as_mut().zeroize();
    }
}

fn backend_error(e: BackendError) -> Error {
    match e {
        BackendError::Unavailable(why) => {
            Error::unavailable("sandbox backend", std::io::Error::other(why))
        }
        BackendError::Missing(what) => {
            Error::FailedPrecondition(format!("{what} is not present on this host"))
        }
        BackendError::Refused(why) => Error::FailedPrecondition(why),
    }
}

fn sealed_error(s: tonic::Status) -> Error {
    let msg = s.message().to_owned();
    match s.code() {
        tonic::Code::InvalidArgument => Error::invalid("cascade", msg),
        tonic::Code::Unauthenticated => Error::Unauthenticated(msg),
        tonic::Code::PermissionDenied => Error::PermissionDenied(msg),
        tonic::Code::NotFound => {
            Error::NotFound(msg.strip_suffix(" not found").unwrap_or(&msg).to_owned())
        }
        tonic::Code::FailedPrecondition => Error::FailedPrecondition(msg),
        tonic::Code::ResourceExhausted => Error::ResourceExhausted(msg),
        code => Error::unavailable(
            "sealed-vault",
            std::io::Error::other(format!("{code:?}: {msg}")),
        ),
    }
}

impl Runner {
    pub fn new(parts: Parts) -> Self {
        let c = &parts.config;
        let docker = c.backends.contains(&BackendKind::Docker).then(|| {
            Arc::new(DockerBackend::new(crate::backend::docker::DockerSettings {
                host: c.docker_host.clone(),
                container_prefix: c.container_prefix.clone(),
                user: c.user.clone(),
                tmpfs_size: c.tmpfs_size.clone(),
                instance: parts.instance.clone(),
            }))
        });
        let process = c.backends.contains(&BackendKind::Process).then(|| {
            Arc::new(ProcessBackend::new(
                c.sandboxes_dir(),
                c.process_path.clone(),
            ))
        });
        // Docker refuses more CPUs than the host has: the maximum is the host's.
        let mut limits = c.limits.clone();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let host_millis = u32::try_from(cores * 1000).unwrap_or(u32::MAX);
        limits.max_cpu_millis = limits.max_cpu_millis.min(host_millis);
        limits.default_cpu_millis = limits.default_cpu_millis.min(limits.max_cpu_millis);
        let audience = parts
            .trust_domain
            .join(["service", "sealed-vault"])
            .map(|id| id.to_string())
            .unwrap_or_default();
        Self {
            inner: Arc::new(Inner {
                policy: Policy {
                    default_backend: c.default_backend,
                    backends: c.backends.clone(),
                    max_sandboxes: c.max_sandboxes as usize,
                    images: c.images.clone(),
                    programs: c.programs.clone(),
                    process_path: c.process_path.clone(),
                    networks: c.networks.clone(),
                    limits,
                },
                trust_domain: parts.trust_domain,
                audience,
                self_id: parts.self_id,
                peers: parts.peers,
                dial_sealed: std::sync::OnceLock::new(),
                revocations: parts.revocations,
                synced: parts.synced,
                shim: parts.shim,
                docker,
                process,
                registry: Registry::default(),
                bundle: tokio::sync::RwLock::new(None),
            }),
        }
    }

    /// Makes each start's Resolve go over a new connection to sealed-vault,
    /// made by `dial` and dropped as soon as the values are taken, instead of
    /// `Peers::sealed`'s pooled one. The response's plaintext passes through
    /// that connection's rustls and HTTP/2 buffers, which a pooled connection
    /// keeps (and reuses) for as long as it lives; a dropped one frees them,
    /// and the binary's allocator zeroes what is freed. The cost is one mTLS
    /// handshake per sandbox start, small next to starting a container. Set
    /// once (later calls are ignored).
    pub fn dial_sealed_per_start(
        &self,
        dial: impl Fn() -> Result<MeshChannel, ConnectError> + Send + Sync + 'static,
    ) {
        let _ = self.inner.dial_sealed.set(Box::new(dial));
    }

    /// Removes containers an earlier life of this runner left behind (a
    /// crash), and finishes their scrub: their runs' identities are revoked
    /// and `sandbox.scrubbed` is recorded. The credentials died with that
    /// process.
    pub async fn remove_orphans(&self) {
        let Some(d) = &self.inner.docker else { return };
        let orphans = match d.remove_orphans().await {
            Ok(o) => o,
            Err(e) => {
                tracing::info!(error = %e, "docker engine not reachable at startup");
                return;
            }
        };
        if orphans.is_empty() {
            return;
        }
        tracing::warn!(
            removed = orphans.len(),
            "removed sandboxes left by an earlier run of this runner"
        );
        for o in orphans.into_iter().filter(|o| !o.run_id.is_empty()) {
            let mut identity = self.inner.peers.identity.clone();
            let revoked = identity
                .revoke(id_pb::RevokeRequest {
                    tenant: o.tenant.clone(),
                    target: Some(id_pb::revoke_request::Target::RunId(o.run_id.clone())),
                    reason: format!("sandbox {} orphaned by a runner restart", o.sandbox_id),
                    hard: false,
                })
                .await
                .is_ok();
            let event = audit::event(
                "sandbox.scrubbed",
                &o.tenant,
                &o.run_id,
                Outcome::Success,
                [
                    ("sandbox_id", o.sandbox_id.clone()),
                    ("cause", "orphaned".to_owned()),
                    ("sandbox_destroyed", "true".to_owned()),
                    ("run_identity_revoked", revoked.to_string()),
                    ("runner", self.inner.self_id.clone()),
                ],
            );
            if let Err(e) = self.record(event).await {
                tracing::error!(sandbox = %o.sandbox_id, error = %e, "could not record the scrub of an orphaned sandbox");
            }
        }
    }

    async fn record(&self, event: bulkhead_proto::audit::v1::NewEvent) -> Result<u64, Error> {
        self.inner.peers.audit.record_one(event).await
    }

    /// Records a refused start as `sandbox.refused` (best effort: the start
    /// is refused whether or not audit records it).
    async fn refused<const N: usize>(
        &self,
        tenant: &str,
        run_id: &str,
        who: &Who,
        reason: &str,
        extra: [(&'static str, String); N],
    ) {
        let refusal = audit::event(
            "sandbox.refused",
            tenant,
            run_id,
            Outcome::Denied,
            [
                ("reason", reason.to_owned()),
                ("worker", who.id.to_string()),
                ("runner", self.inner.self_id.clone()),
            ]
            .into_iter()
            .chain(extra),
        );
        if let Err(e) = self.record(refusal).await {
            tracing::warn!(error = %e, "could not record a refused sandbox start");
        }
        tracing::info!(run = %run_id, worker = %who.id, reason, "sandbox start refused");
    }

    /// What the dispatcher assigned the run `run_id` (of `tenant`, or of
    /// `pool`). Fails closed: an unreachable dispatcher is UNAVAILABLE, a run
    /// that is not running (never accepted, cancelled, finished, or handed to
    /// another attempt) is FAILED_PRECONDITION, and recorded.
    async fn assignment(
        &self,
        who: &Who,
        tenant: &str,
        pool: &str,
        run_id: &str,
    ) -> Result<Assigned, Error> {
        let mut dispatcher = self.inner.peers.dispatcher.clone();
        let call = dispatcher.get_run_assignment(disp_pb::GetRunAssignmentRequest {
            tenant: tenant.to_owned(),
            pool: pool.to_owned(),
            run_id: run_id.to_owned(),
        });
        let resp = match tokio::time::timeout(ASSIGNMENT_TIMEOUT, call).await {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => {
                self.refused(tenant, run_id, who, "run not running", [])
                    .await;
                return Err(Error::FailedPrecondition(format!(
                    "run {run_id} is not running at the dispatcher (not accepted, cancelled or finished)"
                )));
            }
            Ok(Err(s)) => {
                return Err(Error::unavailable(
                    "dispatcher",
                    std::io::Error::other(format!("{:?}: {}", s.code(), s.message())),
                ));
            }
            Err(_) => {
                return Err(Error::unavailable(
                    "dispatcher",
                    std::io::Error::other("no answer in time"),
                ));
            }
        };
        Assigned::from_response(resp, tenant, pool, run_id)
    }

    /// The trust domain's JWT keys, refreshed from identity; `force` after an
    /// unknown kid (a rotation).
    async fn jwt_bundle(&self, force: bool) -> Result<JwtBundle, Error> {
        if !force
            && let Some((b, at)) = self.inner.bundle.read().await.as_ref()
            && at.elapsed() < BUNDLE_REFRESH
        {
            return Ok(b.clone());
        }
        let mut client = self.inner.peers.identity.clone();
        let resp = client
            .get_trust_bundle(id_pb::GetTrustBundleRequest::default())
            .await
            .map_err(|s| {
                Error::unavailable("identity", std::io::Error::other(s.message().to_owned()))
            })?
            .into_inner();
        let bundle = JwtBundle::from_jwks(&resp.jwt_authorities_jwks)
            .map_err(|e| Error::unavailable("identity", e))?;
        *self.inner.bundle.write().await = Some((bundle.clone(), Instant::now()));
        Ok(bundle)
    }

    /// Checks the run's JWT-SVID here first: signature, audience, expiry and
    /// revocation, against identity's keys and list.
    async fn validate_token(&self, token: &str) -> Result<jwt::Validated, Error> {
        if !self.inner.synced.load(Ordering::Acquire) {
            return Err(Error::unavailable(
                "identity revocation list",
                std::io::Error::other("not synced"),
            ));
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let i = &self.inner;
        let check = |b: &JwtBundle| {
            jwt::validate(
                token,
                b,
                &i.trust_domain,
                &i.audience,
                now,
                i.revocations.as_ref(),
            )
        };
        let mut validated = check(&self.jwt_bundle(false).await?);
        if matches!(validated, Err(jwt::JwtError::UnknownKey)) {
            validated = check(&self.jwt_bundle(true).await?);
        }
        validated.map_err(|e| Error::Unauthenticated(format!("run token refused: {e}")))
    }

    async fn choose_backend(&self, wanted: Option<BackendKind>) -> Result<Arc<dyn Backend>, Error> {
        let p = &self.inner.policy;
        let docker = || self.inner.docker.clone().map(|d| d as Arc<dyn Backend>);
        let process = || self.inner.process.clone().map(|d| d as Arc<dyn Backend>);
        let kind = match wanted {
            Some(k) => k,
            None => match p.default_backend {
                DefaultBackend::Docker => BackendKind::Docker,
                DefaultBackend::Process => BackendKind::Process,
                DefaultBackend::Auto => match self.inner.docker.as_ref() {
                    Some(d) if d.available().await => BackendKind::Docker,
                    _ => BackendKind::Process,
                },
            },
        };
        if !p.backends.contains(&kind) {
            return Err(Error::denied(format!(
                "the {} backend is not allowed on this runner",
                kind.as_str()
            )));
        }
        let backend = match kind {
            BackendKind::Docker => docker(),
            BackendKind::Process => process(),
        }
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "the {} backend is not available on this host",
                kind.as_str()
            ))
        })?;
        if !backend.available().await {
            return Err(Error::FailedPrecondition(format!(
                "the {} backend is not available on this host",
                kind.as_str()
            )));
        }
        Ok(backend)
    }

    fn check_image(&self, kind: BackendKind, image: &str) -> Result<(), Error> {
        let p = &self.inner.policy;
        let ok = match kind {
            BackendKind::Docker => p.images.is_empty() || config::allowed(&p.images, image),
            BackendKind::Process => config::allowed(&p.programs, image),
        };
        if ok {
            Ok(())
        } else {
            Err(Error::denied(match kind {
                BackendKind::Docker => "the image is not allowed on this runner",
                BackendKind::Process => "the program is not allowed on this runner",
            }))
        }
    }

    fn check_network(&self, tenant: &str, n: &Network) -> Result<(), Error> {
        if n.mode == NetworkMode::None {
            return Ok(());
        }
        for name in &n.allowed {
            let ok = self.inner.policy.networks.get(name).is_some_and(|tenants| {
                tenants
                    .iter()
                    .any(|t| t == "*" || (!tenant.is_empty() && t == tenant))
            });
            if !ok {
                return Err(Error::denied(format!(
                    "network {name} is not allowed for the tenant on this runner"
                )));
            }
        }
        Ok(())
    }

    fn limits(&self, r: RequestedLimits) -> Result<Limits, Error> {
        let l = &self.inner.policy.limits;
        let pick = |v: u64, default: u64, max: u64, field: &'static str| {
            let v = if v == 0 { default } else { v };
            if v > max {
                Err(Error::invalid(
                    field,
                    format!("at most {max} on this runner"),
                ))
            } else {
                Ok(v)
            }
        };
        let timeout = pick(
            r.timeout.map_or(0, |d| d.as_secs().max(1)),
            l.default_timeout_secs,
            l.max_timeout_secs,
            "limits.timeout",
        )?;
        Ok(Limits {
            memory_bytes: pick(
                r.memory_bytes,
                l.default_memory_bytes,
                l.max_memory_bytes,
                "limits.memory_bytes",
            )?,
            cpu_millis: u32::try_from(pick(
                u64::from(r.cpu_millis),
                u64::from(l.default_cpu_millis),
                u64::from(l.max_cpu_millis),
                "limits.cpu_millis",
            )?)
            .unwrap_or(u32::MAX),
            pids: u32::try_from(pick(
                u64::from(r.pids),
                u64::from(l.default_pids),
                u64::from(l.max_pids),
                "limits.pids",
            )?)
            .unwrap_or(u32::MAX),
            timeout: r.timeout.unwrap_or(Duration::from_secs(timeout)),
        })
    }

    /// Starts a sandbox for `who`. Runs to its end in its own task even if the
    /// caller goes away, so that a half-started sandbox is always cleaned up.
    pub async fn start(&self, who: Who, req: StartRequest) -> Result<Arc<Sandbox>, Error> {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "start_sandbox",
            bulkhead.tenant = %req.tenant,
            bulkhead.run_id = tracing::field::Empty,
        );
        let this = self.clone();
        tokio::spawn(async move { this.start_checked(who, req).await }.instrument(span))
            .await
            .map_err(Error::internal)?
    }

    async fn start_checked(&self, who: Who, mut req: StartRequest) -> Result<Arc<Sandbox>, Error> {
        let token = self.validate_token(&req.run_jwt_svid).await?;
        let (run_tenant, run_pool, run_id) = match token.subject.principal() {
            Principal::Run { tenant, run } => (tenant.to_owned(), String::new(), run.to_owned()),
            Principal::PoolRun { pool, run } => (String::new(), pool.to_owned(), run.to_owned()),
            _ => return Err(Error::denied("the token is not a run's")),
        };
        // The worker's tenant is the request's (the mesh checked it against
        // the worker's certificate); the run must be of that tenant.
        if run_tenant != req.tenant {
            self.refused(
                &req.tenant,
                &run_id,
                &who,
                "run of another tenant",
                [("run_tenant", run_tenant.clone())],
            )
            .await;
            return Err(Error::denied("the run is not of the tenant"));
        }
        let worker_id = match who.id.principal() {
            Principal::TenantWorker { worker, .. } => worker.to_owned(),
            Principal::PoolWorker { pool, worker } if pool == run_pool => worker.to_owned(),
            Principal::PoolWorker { .. } => {
                self.refused(
                    &req.tenant,
                    &run_id,
                    &who,
                    "run of another pool",
                    [("run_pool", run_pool.clone())],
                )
                .await;
                return Err(Error::denied("the run is not of the worker's pool"));
            }
            _ => return Err(Error::denied("only workers start sandboxes")),
        };
        // What runs is what the dispatcher assigned the run, not what the
        // worker asks for: the run must be running, held by this worker.
        let assigned = self
            .assignment(&who, &run_tenant, &run_pool, &run_id)
            .await?;
        if assigned.worker_id != worker_id {
            self.refused(
                &req.tenant,
                &run_id,
                &who,
                "run of another worker",
                [
                    ("task_id", assigned.task_id.clone()),
                    ("run_worker", assigned.worker_id.clone()),
                ],
            )
            .await;
            return Err(Error::denied(
                "the run is held by another worker: a worker starts sandboxes only for its own runs",
            ));
        }
        let backend = self.choose_backend(req.backend).await?;
        let program = match backend.kind() {
            BackendKind::Process => Some(assigned.program(&self.inner.policy.process_path)?),
            BackendKind::Docker => None,
        };
        if let Err(field) = assigned.settle(&mut req, program.as_deref()) {
            self.refused(
                &req.tenant,
                &run_id,
                &who,
                "request differs from the run's assignment",
                [
                    ("field", field.to_owned()),
                    ("task_id", assigned.task_id.clone()),
                    ("agent", assigned.agent.clone()),
                ],
            )
            .await;
            return Err(Error::denied(format!(
                "the request's {field} differs from the run's assignment: the runner runs only what the dispatcher assigned (leave {field} empty or send the assignment's)"
            )));
        }
        self.check_image(backend.kind(), &req.image)?;
        self.check_network(&req.tenant, &req.network)?;
        let mut limits = self.limits(req.limits)?;
        // The sandbox ends by the attempt's deadline at the latest.
        if let Some(left) = assigned.time_left(SystemTime::now()) {
            if left.is_zero() {
                return Err(Error::FailedPrecondition(
                    "the run's deadline has passed".into(),
                ));
            }
            limits.timeout = limits.timeout.min(left);
        }
        let sb = self
            .inner
            .registry
            .register(
                NewSandbox {
                    tenant: req.tenant.clone(),
                    run_id: run_id.clone(),
                    run_spiffe: token.subject.to_string(),
                    task_id: req.task_id.clone(),
                    worker: who.id.clone(),
                    worker_serial: who.serial.clone(),
                    backend: backend.kind(),
                    image: req.image.clone(),
                    limits,
                    network: req.network.clone(),
                },
                self.inner.policy.max_sandboxes,
            )
            .map_err(|e| match e {
                RegisterError::Full => Error::ResourceExhausted(e.to_string()),
                RegisterError::RunHasSandbox => Error::FailedPrecondition(e.to_string()),
            })?;
        tracing::Span::current().record("bulkhead.run_id", sb.run_id.as_str());
        let mut life = sb.life.lock().await;
        match self.launch(&sb, &mut life, backend.as_ref(), req).await {
            Ok(()) => {
                drop(life);
                tracing::info!(sandbox = %sb.id, tenant = %sb.tenant, run = %sb.run_id, backend = sb.backend.as_str(), "sandbox started");
                Ok(sb)
            }
            Err(e) => {
                // Nothing keeps running and no credential is kept.
                sb.request_stop(ExitReason::Failed);
                if let Some(h) = life.supervisor.take() {
                    wait_supervisor(h).await;
                }
                if let Some(i) = life.instance.take()
                    && let Err(de) = i.destroy().await
                {
                    tracing::error!(sandbox = %sb.id, error = %de, "could not destroy a sandbox that failed to start");
                    self.retry_destroy(i, sb.id.clone());
                }
                let z = sb.zeroize();
                life.removed = true;
                self.inner.registry.remove(&sb.id);
                if !z.keys.is_empty() {
                    // Values were resolved (and audited) but never delivered.
                    let event = audit::event(
                        "sandbox.scrubbed",
                        &sb.tenant,
                        &sb.run_id,
                        Outcome::Failure,
                        [
                            ("sandbox_id", sb.id.clone()),
                            ("start_failed", "true".to_owned()),
                            ("scrubbed_keys", z.keys.join(",")),
                            ("credentials_zeroized", z.complete.to_string()),
                        ],
                    );
                    if let Err(ae) = self.record(event).await {
                        tracing::warn!(error = %ae, "could not record the scrub of a failed start");
                    }
                }
                tracing::info!(sandbox = %sb.id, code = ?e.code(), "sandbox start failed");
                Err(e)
            }
        }
    }

    fn revoked_meanwhile(sb: &Sandbox) -> Result<(), Error> {
        match sb.stop_requested() {
            Some(ExitReason::Revoked) => Err(Error::Unauthenticated(
                "the run's identity was revoked".into(),
            )),
            Some(_) => Err(Error::unavailable(
                "sandbox",
                std::io::Error::other("stopped while starting"),
            )),
            None => Ok(()),
        }
    }

    /// Launch, resolve, record, deliver: the order that lets the agent see
    /// credentials only once the injection is in audit.
    async fn launch(
        &self,
        sb: &Arc<Sandbox>,
        life: &mut crate::sandbox::Life,
        backend: &dyn Backend,
        req: StartRequest,
    ) -> Result<(), Error> {
        // A revocation may have landed between the token check and the
        // registration; from here on the revocation follower finds it.
        if revoked_now(&self.inner.revocations, sb)? {
            return Err(Error::Unauthenticated(
                "the run's identity was revoked".into(),
            ));
        }
        // 1. The sandbox, with the shim waiting on stdin: no credential yet.
        let spec = LaunchSpec {
            sandbox_id: sb.id.clone(),
            tenant: sb.tenant.clone(),
            run_id: sb.run_id.clone(),
            image: req.image.clone(),
            command: req.command.clone(),
            limits: sb.limits,
            network: sb.network.clone(),
            shim: self.inner.shim.clone(),
        };
        let (tx, rx) = mpsc::channel(64);
        let instance: Arc<dyn crate::backend::Instance> =
            Arc::from(backend.launch(&spec, tx).await.map_err(backend_error)?);
        life.instance = Some(instance.clone());
        sb.update(|s| s.container_id = instance.container_id());
        Self::revoked_meanwhile(sb)?;

        // 2. The values, resolved at the moment of need.
        let resolved = match &req.cascade {
            Some(c) => self.resolve(&req, c.clone()).await?,
            None => Resolved {
                secrets: Vec::new(),
                env: Vec::new(),
                audit_sequence: 0,
            },
        };
        if let Some((k, ..)) = resolved.secrets.iter().find(|(_, v, ..)| v.contains(&0)) {
            return Err(Error::FailedPrecondition(format!(
                "secret {k} holds a NUL byte and cannot be an environment value"
            )));
        }
        let mut settings: Vec<(&str, String)> =
            vec![(ENV_RUN, sb.run_id.clone()), (ENV_SANDBOX, sb.id.clone())];
        if !sb.tenant.is_empty() {
            settings.push((ENV_TENANT, sb.tenant.clone()));
        }
        if !sb.task_id.is_empty() {
            settings.push((ENV_TASK, sb.task_id.clone()));
        }
        // Later entries win in the shim: settings, then secrets, then ours.
        let mut entries: Vec<(&str, &[u8])> = Vec::new();
        for (k, v) in &resolved.env {
            entries.push((k, v.as_bytes()));
        }
        for (k, v, ..) in &resolved.secrets {
            entries.push((k, v));
        }
        for (k, v) in &settings {
            entries.push((k, v.as_bytes()));
        }
        entries.push((ENV_JWT, req.run_jwt_svid.as_bytes()));
        let input = shim::frame(entries, &req.payload);
        let redactor = Arc::new(Redactor::new(
            resolved
                .secrets
                .iter()
                .map(|(k, v, ..)| (k.as_str(), v.as_slice()))
                .chain(std::iter::once((ENV_JWT, req.run_jwt_svid.as_bytes()))),
        ));
        let keys: Vec<String> = resolved.secrets.iter().map(|(k, ..)| k.clone()).collect();
        let fingerprints: Vec<String> = resolved
            .secrets
            .iter()
            .map(|(k, _, version, fp)| format!("{k}@{version}:{}", fp.get(..16).unwrap_or(fp)))
            .collect();
        let env_keys: Vec<String> = resolved.env.iter().map(|(k, _)| k.clone()).collect();
        let Resolved {
            secrets,
            audit_sequence,
            ..
        } = resolved;
        sb.hold_secrets(Secrets {
            values: secrets.into_iter().map(|(k, v, ..)| (k, v)).collect(),
            redactor: redactor.clone(),
        });
        let deadline = tokio::time::Instant::now() + sb.limits.timeout;
        life.supervisor = Some(tokio::spawn(supervise(
            sb.clone(),
            instance.clone(),
            rx,
            redactor,
            deadline,
        )));
        Self::revoked_meanwhile(sb)?;

        // 3. Recorded before delivery: if audit cannot record the injection,
        //    the sandbox never sees a credential.
        let event = audit::event(
            "sandbox.credential.injected",
            &sb.tenant,
            &sb.run_id,
            Outcome::Success,
            [
                ("sandbox_id", sb.id.clone()),
                ("task_id", sb.task_id.clone()),
                ("worker", sb.worker.to_string()),
                ("runner", self.inner.self_id.clone()),
                ("backend", sb.backend.as_str().to_owned()),
                ("image", sb.image.clone()),
                ("container_id", instance.container_id()),
                ("keys", fingerprints.join(",")),
                ("env_keys", env_keys.join(",")),
                ("jwt_svid", "delivered".to_owned()),
                ("resolve_audit_sequence", audit_sequence.to_string()),
            ],
        );
        self.record(event).await?;
        sb.update(|s| s.injected_keys = keys);

        // 4. Delivery: the frame, then the payload, then end of input.
        instance.deliver(input).await.map_err(backend_error)?;
        sb.update(|s| {
            if s.state == State::Starting {
                s.state = State::Running;
            }
        });
        Ok(())
    }

    async fn resolve(
        &self,
        req: &StartRequest,
        cascade: sealed_pb::Cascade,
    ) -> Result<Resolved, Error> {
        let mut sealed = match self.inner.dial_sealed.get() {
            Some(dial) => SealedVaultServiceClient::new(
                dial().map_err(|e| Error::unavailable("sealed-vault", e))?,
            ),
            None => self.inner.peers.sealed.clone(),
        };
        // Resolve has no way to ask for no secret: its empty key list means
        // every key of the cascade. An agent that requested none is still
        // asked Resolve (for the cascade's settings), and whatever secrets
        // come back are wiped below, never delivered.
        let wanted = &req.secret_keys;
        let resp = sealed
            .resolve(sealed_pb::ResolveRequest {
                tenant: req.tenant.clone(),
                run_jwt_svid: req.run_jwt_svid.to_string(),
                cascade: Some(cascade),
                agent: req.agent.clone(),
                tool: req.tool.clone(),
                keys: wanted.clone(),
            })
            .await
            .map_err(sealed_error)?
            .into_inner();
        // A fresh connection goes with its buffers (see dial_sealed_per_start).
        drop(sealed);
        let mut secrets = Vec::with_capacity(resp.secrets.len());
        let mut unrequested = Vec::new();
        for s in resp.secrets {
            if wanted.contains(&s.key) {
                let value = Zeroizing::new(s.value.to_vec());
                secrets.push((s.key, value, s.version, s.fingerprint));
            } else {
                unrequested.push(s.key);
            }
            wipe(s.value);
        }
        if !unrequested.is_empty() {
            tracing::info!(
                keys = %unrequested.join(","),
                "sealed-vault resolved secrets the agent did not request: not delivered"
            );
        }
        let mut env: Vec<(String, String)> = resp.env.into_iter().collect();
        env.sort();
        Ok(Resolved {
            secrets,
            env,
            audit_sequence: resp.audit_sequence,
        })
    }

    fn retry_destroy(&self, instance: Arc<dyn crate::backend::Instance>, id: String) {
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(1);
            for _ in 0..20 {
                tokio::time::sleep(wait).await;
                match instance.destroy().await {
                    Ok(d) if d.sandbox => {
                        tracing::info!(sandbox = %id, "destroyed a sandbox on retry");
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(sandbox = %id, error = %e, "retrying to destroy a sandbox")
                    }
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            tracing::error!(sandbox = %id, "gave up destroying a sandbox");
        });
    }

    /// The sandbox `id` of `tenant`, if `who` may see it; NOT_FOUND otherwise,
    /// whatever the reason (another worker's sandboxes are not confirmed).
    pub fn find(&self, who: &Who, tenant: &str, id: &str) -> Result<Arc<Sandbox>, Error> {
        self.inner
            .registry
            .get(id)
            .filter(|sb| sb.tenant == tenant && who.sees(sb))
            .ok_or_else(|| Error::NotFound(format!("sandbox {id}")))
    }

    /// The sandboxes `who` may see, newest first, after `before` (a seq).
    pub fn list(
        &self,
        who: &Who,
        tenant: &str,
        state: Option<State>,
        before: Option<u64>,
    ) -> Vec<Arc<Sandbox>> {
        self.inner
            .registry
            .all()
            .into_iter()
            .filter(|sb| who.sees(sb))
            .filter(|sb| tenant.is_empty() || sb.tenant == tenant)
            .filter(|sb| state.is_none_or(|st| sb.status().state == st))
            .filter(|sb| before.is_none_or(|b| sb.seq() < b))
            .collect()
    }

    /// Releases a sandbox: kill, remove, zeroize, revoke the run identity,
    /// record `sandbox.scrubbed`. A released sandbox returns its report again.
    pub async fn release(
        &self,
        sb: &Arc<Sandbox>,
        cause: ExitReason,
    ) -> Result<ScrubReport, Error> {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "release_sandbox",
            bulkhead.tenant = %sb.tenant,
            bulkhead.run_id = %sb.run_id,
            sandbox = %sb.id,
        );
        let this = self.clone();
        let sb = sb.clone();
        tokio::spawn(async move { this.release_now(&sb, cause).await }.instrument(span))
            .await
            .map_err(Error::internal)?
    }

    async fn release_now(
        &self,
        sb: &Arc<Sandbox>,
        cause: ExitReason,
    ) -> Result<ScrubReport, Error> {
        let mut life = sb.life.lock().await;
        if life.removed {
            return Err(Error::NotFound(format!("sandbox {}", sb.id)));
        }
        if let Some(report) = sb.status().scrub {
            return Ok(report);
        }
        sb.request_stop(cause);
        if let Some(h) = life.supervisor.take() {
            wait_supervisor(h).await;
        }
        if sb.output.exit().is_none() {
            sb.output.finish(Exit {
                reason: cause,
                code: -1,
                signal: 0,
                message: "the sandbox was released before it ran".into(),
                at: SystemTime::now(),
            });
        }
        let destroyed = match life.instance.as_ref() {
            Some(i) => i.destroy().await,
            None => Ok(crate::backend::Destroyed {
                sandbox: true,
                files: true,
            }),
        };
        // The copies go whatever else happens.
        let z = sb.zeroize();
        let destroyed = match destroyed {
            Ok(d) if d.sandbox => d,
            Ok(_) => {
                return Err(Error::unavailable(
                    "sandbox backend",
                    std::io::Error::other("the sandbox is still there"),
                ));
            }
            Err(e) => return Err(backend_error(e)),
        };
        let run_identity_revoked = self.revoke_run(sb).await;
        let mut report = ScrubReport {
            sandbox_destroyed: destroyed.sandbox,
            files_removed: destroyed.files,
            credentials_zeroized: z.complete,
            zeroized_values: z.values,
            scrubbed_keys: z.keys.clone(),
            run_identity_revoked,
            audit_sequence: 0,
            released_at: SystemTime::now(),
        };
        let event = scrubbed_event(sb, &report, cause);
        match self.record(event.clone()).await {
            Ok(seq) => report.audit_sequence = seq,
            Err(e) => {
                tracing::error!(sandbox = %sb.id, error = %e, "could not record sandbox.scrubbed; retrying in the background");
                self.retry_scrub_record(sb.clone(), event);
            }
        }
        sb.update(|s| {
            s.state = State::Released;
            s.scrub = Some(report.clone());
            s.released_at = Some(Instant::now());
        });
        drop(life);
        bulkhead_mesh::metrics::sandbox_released(
            &sb.tenant,
            sb.created_at.elapsed().unwrap_or_default(),
        );
        tracing::info!(sandbox = %sb.id, tenant = %sb.tenant, run = %sb.run_id, "sandbox released");
        Ok(report)
    }

    /// Revokes the run's identity at identity: it served its one sandbox.
    async fn revoke_run(&self, sb: &Sandbox) -> bool {
        let mut identity = self.inner.peers.identity.clone();
        let call = identity.revoke(id_pb::RevokeRequest {
            tenant: sb.tenant.clone(),
            target: Some(id_pb::revoke_request::Target::RunId(sb.run_id.clone())),
            reason: format!("sandbox {} released", sb.id),
            hard: false,
        });
        match tokio::time::timeout(REVOKE_TIMEOUT, call).await {
            Ok(Ok(_)) => true,
            Ok(Err(status)) => {
                // Already revoked (a hard revocation got here first) counts.
                let already = SpiffeId::parse(&sb.run_spiffe)
                    .is_ok_and(|id| self.inner.revocations.revoked(&id, None));
                if !already {
                    tracing::error!(sandbox = %sb.id, code = ?status.code(), "could not revoke the run identity");
                }
                already
            }
            Err(_) => {
                tracing::error!(sandbox = %sb.id, "revoking the run identity timed out");
                false
            }
        }
    }

    fn retry_scrub_record(&self, sb: Arc<Sandbox>, event: bulkhead_proto::audit::v1::NewEvent) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(1);
            for _ in 0..30 {
                tokio::time::sleep(wait).await;
                match this.record(event.clone()).await {
                    Ok(seq) => {
                        sb.update(|s| {
                            if let Some(r) = s.scrub.as_mut() {
                                r.audit_sequence = seq;
                            }
                        });
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %sb.id, error = %e, "still cannot record sandbox.scrubbed")
                    }
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            tracing::error!(sandbox = %sb.id, "gave up recording sandbox.scrubbed");
        });
    }

    /// Applies hard revocations: each covered sandbox is killed at once,
    /// then `run.aborted_by_revocation` is recorded and it is scrubbed.
    pub fn on_revocations(&self, entries: &[id_pb::Revocation]) {
        for r in entries.iter().filter(|r| r.hard) {
            for sb in self.inner.registry.covered_by(r) {
                // The kill does not wait for audit or for the lifecycle lock.
                sb.request_stop(ExitReason::Revoked);
                if !sb.claim_abort() {
                    continue;
                }
                tracing::warn!(sandbox = %sb.id, tenant = %sb.tenant, run = %sb.run_id, revocation = r.sequence, "killing a sandbox on a hard revocation");
                let this = self.clone();
                let r = r.clone();
                tokio::spawn(async move { this.abort(sb, r).await });
            }
        }
    }

    async fn abort(&self, sb: Arc<Sandbox>, r: id_pb::Revocation) {
        {
            let life = sb.life.lock().await;
            if life.removed || sb.status().scrub.is_some() {
                return;
            }
        }
        let target = match &r.target {
            Some(id_pb::revocation::Target::RunId(x)) => format!("run:{x}"),
            Some(id_pb::revocation::Target::WorkerId(x)) => format!("worker:{x}"),
            Some(id_pb::revocation::Target::WholeTenant(_)) => format!("tenant:{}", r.tenant),
            Some(id_pb::revocation::Target::Serial(x)) => format!("serial:{x}"),
            None => String::new(),
        };
        let event = audit::event(
            "run.aborted_by_revocation",
            &sb.tenant,
            &sb.run_id,
            Outcome::Success,
            [
                ("sandbox_id", sb.id.clone()),
                ("revocation_sequence", r.sequence.to_string()),
                ("revoked", target),
                ("revocation_reason", r.reason.clone()),
                ("worker", sb.worker.to_string()),
                ("runner", self.inner.self_id.clone()),
            ],
        );
        let mut wait = Duration::from_millis(200);
        for attempt in 0..10 {
            match self.record(event.clone()).await {
                Ok(_) => break,
                Err(e) if attempt == 9 => {
                    tracing::error!(sandbox = %sb.id, error = %e, "could not record run.aborted_by_revocation");
                }
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
            }
        }
        if let Err(e) = self.release(&sb, ExitReason::Revoked).await {
            tracing::error!(sandbox = %sb.id, code = ?e.code(), "could not scrub a revoked sandbox");
        }
    }

    /// At shutdown: every sandbox is released (killed, removed, zeroized).
    pub async fn shutdown(&self) {
        let live: Vec<_> = self
            .inner
            .registry
            .all()
            .into_iter()
            .filter(|s| !s.is_released())
            .collect();
        let releases = live.iter().map(|sb| self.release(sb, ExitReason::Released));
        let _ = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(releases))
            .await;
    }
}

/// Whether the list now covers the sandbox's run, or its worker by SPIFFE
/// ID, tenant or certificate serial: the checks of `on_revocations`, for a
/// revocation that landed after the mesh checked the worker's certificate
/// but before the sandbox was registered (which that follower missed).
fn revoked_now(list: &RevocationList, sb: &Sandbox) -> Result<bool, Error> {
    let run = SpiffeId::parse(&sb.run_spiffe).map_err(Error::internal)?;
    // The serial is kept as hex without leading zeros; the list wants bytes.
    let serial = sb.worker_serial.as_deref().and_then(|h| {
        let even = if h.len() % 2 == 1 {
            format!("0{h}")
        } else {
            h.to_owned()
        };
        hex::decode(even).ok()
    });
    Ok(list.revoked(&run, None) || list.revoked(&sb.worker, serial.as_deref()))
}

async fn wait_supervisor(mut h: tokio::task::JoinHandle<()>) {
    if tokio::time::timeout(SUPERVISOR_GRACE, &mut h)
        .await
        .is_err()
    {
        h.abort();
        let _ = h.await;
    }
}

fn scrubbed_event(
    sb: &Sandbox,
    r: &ScrubReport,
    cause: ExitReason,
) -> bulkhead_proto::audit::v1::NewEvent {
    audit::event(
        "sandbox.scrubbed",
        &sb.tenant,
        &sb.run_id,
        Outcome::Success,
        [
            ("sandbox_id", sb.id.clone()),
            ("worker", sb.worker.to_string()),
            ("backend", sb.backend.as_str().to_owned()),
            ("cause", format!("{cause:?}").to_ascii_lowercase()),
            ("sandbox_destroyed", r.sandbox_destroyed.to_string()),
            ("files_removed", r.files_removed.to_string()),
            ("credentials_zeroized", r.credentials_zeroized.to_string()),
            ("zeroized_values", r.zeroized_values.to_string()),
            ("scrubbed_keys", r.scrubbed_keys.join(",")),
            ("run_identity_revoked", r.run_identity_revoked.to_string()),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(reg: &Registry, serial: &str) -> Arc<Sandbox> {
        reg.register(
            NewSandbox {
                tenant: "acme".into(),
                run_id: "r1".into(),
                run_spiffe: "spiffe://td/tenant/acme/run/r1".into(),
                task_id: String::new(),
                worker: SpiffeId::parse("spiffe://td/tenant/acme/worker/w1").expect("id"),
                worker_serial: Some(serial.into()),
                backend: BackendKind::Process,
                image: "/bin/true".into(),
                limits: Limits {
                    memory_bytes: 0,
                    cpu_millis: 0,
                    pids: 0,
                    timeout: Duration::from_secs(1),
                },
                network: Network {
                    mode: NetworkMode::None,
                    allowed: Vec::new(),
                },
            },
            8,
        )
        .expect("room")
    }

    /// A hard revocation of the worker's certificate (by serial) that lands
    /// while a start is between the mesh's check and the registration is
    /// seen by the check at launch, as revocations of the run, the worker
    /// and the tenant are.
    #[test]
    fn a_revocation_before_registration_stops_the_start() {
        use id_pb::revocation::Target;
        let reg = Registry::default();
        let entry = |target: Target, spiffe_id: &str| id_pb::Revocation {
            sequence: 1,
            tenant: "acme".into(),
            target: Some(target),
            spiffe_id: spiffe_id.into(),
            hard: true,
            ..Default::default()
        };
        for (serial, r, revoked) in [
            ("a1b2", entry(Target::Serial("0a1b2".into()), ""), true),
            ("a1b", entry(Target::Serial("0a1b".into()), ""), true),
            ("a1b", entry(Target::Serial("a1c".into()), ""), false),
            (
                "a1b",
                entry(Target::RunId("r1".into()), "spiffe://td/tenant/acme/run/r1"),
                true,
            ),
            (
                "a1b",
                entry(
                    Target::WorkerId("w1".into()),
                    "spiffe://td/tenant/acme/worker/w1",
                ),
                true,
            ),
            (
                "a1b",
                entry(Target::WholeTenant(true), "spiffe://td/tenant/acme/"),
                true,
            ),
            (
                "a1b",
                entry(Target::WholeTenant(true), "spiffe://td/tenant/other/"),
                false,
            ),
        ] {
            let list = RevocationList::new();
            list.apply_snapshot(1, std::slice::from_ref(&r));
            let sb = sandbox(&reg, serial);
            assert_eq!(
                revoked_now(&list, &sb).expect("ids"),
                revoked,
                "{serial} {r:?}"
            );
            // The follower agrees.
            assert_eq!(sb.covered_by(&r), revoked, "{serial} {r:?}");
            reg.remove(&sb.id);
        }
    }
}
