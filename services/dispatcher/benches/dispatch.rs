//! The dispatcher benchmark: a program (harness = false), not a timed test.
//!
//! Audit, identity and the dispatcher run in-process, each the mesh server
//! with its real handlers and authorization table, over mTLS on loopback
//! (PKI from `Ca::generate`). Audit's and identity's stores are SQLite in temp
//! dirs on disk; the dispatcher's is SQLite (WAL, synchronous=FULL) or the
//! test kit's PostgreSQL. The dispatcher is put together as its `main.rs`
//! does it (an `AuditClient` and an identity client over mTLS, a revocation
//! list following identity, `Engine::start`, no Redis, no sealed-vault: the
//! tasks name no cascade). Its store is wrapped to time every call, and
//! audit's Append handler is timed from the inside.
//!
//! Before any clock: operator `admin/bench` submits the agent and
//! `admin/reviewer` approves it; 3 tenants × 4 workers
//! (`tenant/<t>/worker/<t>-w<k>`, one mTLS connection each) register and open
//! their claim streams with C credits each. Workers report every assignment
//! as soon as they receive it and grant a credit back for each acknowledged
//! report. Tenant clients (`tenant/<t>/client/bench`, 4 connections each)
//! enqueue. Then, per backend:
//!
//! 1. Closed loop: K enqueuers enqueue N tasks (tenants in turn) as fast as
//!    Enqueue answers; tasks/s = N / (first Enqueue → last report
//!    acknowledged). R repetitions, each on a fresh stack and database.
//! 2. Open loop: Enqueue offered at a fixed rate for S seconds (one task per
//!    tick, each call on its own task); latency of Enqueue called → the
//!    assignment received on the worker's claim stream, and of Enqueue
//!    answered → received.
//! 3. With accept: as 1, but workers accept each assignment with a CSR, wait
//!    for the run's SVID (audit `task.claimed`, identity signs, audited
//!    again), then report.
//!
//! Then, once: audit Append alone (one event per call, K callers), the floor
//! of anything that records one event per call; and the dispatcher *binary*
//! as its own process (SQLite) with 2,000 registered workers each holding an
//! idle claim stream on its own mTLS connection: its VmRSS from /proc.
//!
//! `cargo bench -p bulkhead-dispatcher --bench dispatch`. Sizes come from the
//! environment: DISPATCH_BENCH_BACKENDS ("sqlite,postgres"),
//! DISPATCH_BENCH_TASKS (20000), DISPATCH_BENCH_ENQUEUERS (64),
//! DISPATCH_BENCH_CREDITS (64), DISPATCH_BENCH_REPS (3), DISPATCH_BENCH_RATE
//! (500), DISPATCH_BENCH_OPEN_SECS (10), DISPATCH_BENCH_MINT_TASKS (5000; 0
//! skips), DISPATCH_BENCH_STREAMS (2000; 0 skips), DISPATCH_BENCH_PHASE_SECS
//! (120: every phase stops there, and says so), DISPATCH_BENCH_HAND_OFF (1; 0
//! turns `[fleet] hand_off` off). Every loop is bounded by its
//! count and by the phase deadline.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bulkhead_audit::checkpoint::Signer;
use bulkhead_audit::log::{Log, LogConfig};
use bulkhead_dispatcher::config::FleetConfig;
use bulkhead_dispatcher::engine::{Engine, Parts};
use bulkhead_dispatcher::model::{AgentRow, AgentStatus, Scope, TaskRow, WorkerRow, WorkerState};
use bulkhead_dispatcher::store::{
    self, Cancelled, ClaimBatch, ClaimOne, Committed, Decision, DispatchStore, Finish, Finished,
    Inserted, Released, StoreError, TaskFilter, WorkerFilter,
};
use bulkhead_dispatcher::wake::Wake;
use bulkhead_identity::keys::JwtKeys;
use bulkhead_identity::service::{IdentityApi, Limits};
use bulkhead_mesh::audit::{AuditClient, Outcome};
use bulkhead_mesh::client::MeshChannel;
use bulkhead_mesh::config::{MeshConfig, Peers, TlsFiles};
use bulkhead_mesh::pki::{Ca, SvidOptions};
use bulkhead_mesh::revocation::RevocationList;
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::spiffe::TrustDomain;
use bulkhead_mesh::telemetry::{LogFormat, TelemetryConfig};
use bulkhead_mesh::tls::{ClientAuth, ExpectServer, Identity, TrustBundle};
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use futures::StreamExt as _;
use pb::claim_request::Body as Up;
use pb::claim_response::Body as Down;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;

const TRUST_DOMAIN: &str = "bulkhead.bench";
const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
const WORKERS_PER_TENANT: usize = 4;
const CLIENT_CONNECTIONS: usize = 4;
const AGENT: &str = "bench-agent";
const AGENT_VERSION: &str = "1.0.0";
const PROCESS_BACKEND: i32 = 2;
/// Goals from DESIGN.md, "Performance goals".
const GOAL_SQLITE: f64 = 5_000.0;
const GOAL_PG: f64 = 3_000.0;
const GOAL_P99: Duration = Duration::from_millis(5);
const GOAL_RSS_MIB: f64 = 256.0;

type Dispatcher = DispatcherServiceClient<MeshChannel>;

#[derive(Debug, Clone)]
struct Params {
    backends: Vec<String>,
    tasks: u64,
    enqueuers: u64,
    credits: u32,
    reps: u64,
    rate: u64,
    open_secs: u64,
    mint_tasks: u64,
    streams: u64,
    phase: Duration,
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

impl Params {
    fn from_env() -> anyhow::Result<Self> {
        let backends: Vec<String> = std::env::var("DISPATCH_BENCH_BACKENDS")
            .unwrap_or_else(|_| "sqlite,postgres".into())
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        for b in &backends {
            ensure!(
                b == "sqlite" || b == "postgres",
                "DISPATCH_BENCH_BACKENDS: unknown backend {b:?}"
            );
        }
        Ok(Self {
            backends,
            tasks: env_u64("DISPATCH_BENCH_TASKS", 20_000)?.max(1),
            enqueuers: env_u64("DISPATCH_BENCH_ENQUEUERS", 64)?.max(1),
            credits: u32::try_from(env_u64("DISPATCH_BENCH_CREDITS", 64)?.clamp(1, 1024))?,
            reps: env_u64("DISPATCH_BENCH_REPS", 3)?.max(1),
            rate: env_u64("DISPATCH_BENCH_RATE", 500)?.max(1),
            open_secs: env_u64("DISPATCH_BENCH_OPEN_SECS", 10)?.max(1),
            mint_tasks: env_u64("DISPATCH_BENCH_MINT_TASKS", 5_000)?,
            streams: env_u64("DISPATCH_BENCH_STREAMS", 2_000)?,
            phase: Duration::from_secs(env_u64("DISPATCH_BENCH_PHASE_SECS", 120)?),
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

fn per_sec(r: f64) -> String {
    let s = (r.round() as u64).to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Debug, Default, Clone, Copy)]
struct Dist {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Dist {
    fn of(mut all: Vec<Duration>) -> Self {
        all.sort();
        Self {
            n: all.len(),
            p50: percentile(&all, 0.50),
            p99: percentile(&all, 0.99),
            max: all.last().copied().unwrap_or_default(),
        }
    }

    fn line(&self) -> String {
        format!(
            "n {} p50 {} p99 {} max {}",
            self.n,
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )
    }
}

/// CPU time of this process (user + system), from /proc/self/stat, assuming
/// the usual USER_HZ of 100.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name may hold spaces: count fields after its ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // After ')': state is field 0, utime field 11, stime field 12.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------
// Timing from the inside.

#[derive(Debug, Default, Clone, Copy)]
struct Acc {
    calls: u64,
    rows: u64,
    total: Duration,
}

/// Durations taken inside the services while a phase runs.
#[derive(Debug, Default)]
struct Times {
    /// Audit's Append handler: request decode and handler (group commit included).
    audit_append: Mutex<Vec<Duration>>,
    /// The dispatcher's store, by method.
    store: Mutex<BTreeMap<&'static str, Acc>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Times {
    fn clear(&self) {
        lock(&self.audit_append).clear();
        lock(&self.store).clear();
    }

    fn store_call(&self, method: &'static str, d: Duration, rows: u64) {
        let mut s = lock(&self.store);
        let a = s.entry(method).or_default();
        a.calls += 1;
        a.rows += rows;
        a.total += d;
    }

    fn snapshot(&self) -> Inside {
        Inside {
            audit: Dist::of(lock(&self.audit_append).clone()),
            store: lock(&self.store).clone(),
        }
    }
}

/// What the services did during one phase.
#[derive(Debug, Default, Clone)]
struct Inside {
    audit: Dist,
    store: BTreeMap<&'static str, Acc>,
}

impl Inside {
    fn lines(&self, tasks: u64, wall: Duration) -> Vec<String> {
        let tasks = tasks.max(1) as f64;
        let mut out = vec![format!(
            "audit Append calls {} ({:.2} per task), handler {}",
            self.audit.n,
            self.audit.n as f64 / tasks,
            self.audit.line()
        )];
        for (m, a) in &self.store {
            let mean = a.total.checked_div(a.calls as u32).unwrap_or_default();
            // Little's law: the summed call time over the wall time is how
            // many were in flight on average (for the scheduler's claims,
            // which run one at a time, the share of time it spent claiming).
            let mut s = format!(
                "store {m}: {} calls ({:.2} per task), mean {}, {:.2} in flight on average",
                a.calls,
                a.calls as f64 / tasks,
                ms(mean),
                a.total.as_secs_f64() / wall.as_secs_f64().max(1e-9)
            );
            if a.rows > 0 {
                s.push_str(&format!(
                    ", {:.1} rows per call",
                    a.rows as f64 / a.calls.max(1) as f64
                ));
            }
            out.push(s);
        }
        out
    }
}

/// A gRPC service with the calls of one method timed, from the request
/// reaching the service (after TLS, HTTP/2 and the authorization layer) to
/// its response.
#[derive(Debug, Clone)]
struct TimedService<S> {
    inner: S,
    method: &'static str,
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
        let timed = req.uri().path().ends_with(self.method);
        let start = Instant::now();
        let fut = self.inner.call(req);
        let times = self.times.clone();
        Box::pin(async move {
            let r = fut.await;
            if timed {
                lock(&times.audit_append).push(start.elapsed());
            }
            r
        })
    }
}

/// The real dispatcher store, every call timed.
#[derive(Debug)]
struct TimedStore {
    inner: Arc<dyn DispatchStore>,
    times: Arc<Times>,
}

impl TimedStore {
    async fn t<T>(
        &self,
        method: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
        rows: impl FnOnce(&T) -> u64,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let r = fut.await;
        let n = r.as_ref().map_or(0, rows);
        self.times.store_call(method, start.elapsed(), n);
        r
    }
}

fn none<T>(_: &T) -> u64 {
    0
}

#[async_trait::async_trait]
impl DispatchStore for TimedStore {
    async fn submit_agent(&self, agent: &AgentRow) -> Result<bool, StoreError> {
        self.t("submit_agent", self.inner.submit_agent(agent), none)
            .await
    }
    async fn get_agent(&self, name: &str, version: &str) -> Result<Option<AgentRow>, StoreError> {
        self.t("get_agent", self.inner.get_agent(name, version), none)
            .await
    }
    async fn latest_approved_agent(&self, name: &str) -> Result<Option<AgentRow>, StoreError> {
        self.t(
            "latest_approved_agent",
            self.inner.latest_approved_agent(name),
            none,
        )
        .await
    }
    async fn decide_agent(
        &self,
        name: &str,
        version: &str,
        status: AgentStatus,
        decided_by: &str,
        decided_at_ms: i64,
        reason: &str,
    ) -> Result<Decision, StoreError> {
        self.t(
            "decide_agent",
            self.inner
                .decide_agent(name, version, status, decided_by, decided_at_ms, reason),
            none,
        )
        .await
    }
    async fn list_agents(
        &self,
        name: &str,
        status: Option<AgentStatus>,
        offset: u64,
        limit: u32,
    ) -> Result<Vec<AgentRow>, StoreError> {
        self.t(
            "list_agents",
            self.inner.list_agents(name, status, offset, limit),
            none,
        )
        .await
    }
    async fn upsert_worker(&self, worker: &WorkerRow) -> Result<(), StoreError> {
        self.t("upsert_worker", self.inner.upsert_worker(worker), none)
            .await
    }
    async fn get_worker(&self, worker_id: &str) -> Result<Option<WorkerRow>, StoreError> {
        self.t("get_worker", self.inner.get_worker(worker_id), none)
            .await
    }
    async fn set_worker_state(
        &self,
        worker_id: &str,
        state: WorkerState,
    ) -> Result<bool, StoreError> {
        self.t(
            "set_worker_state",
            self.inner.set_worker_state(worker_id, state),
            none,
        )
        .await
    }
    async fn list_workers(
        &self,
        filter: &WorkerFilter,
        after_worker_id: &str,
        limit: u32,
    ) -> Result<Vec<WorkerRow>, StoreError> {
        self.t(
            "list_workers",
            self.inner.list_workers(filter, after_worker_id, limit),
            none,
        )
        .await
    }
    async fn workers_of_scope(&self, scope: &Scope) -> Result<Vec<WorkerRow>, StoreError> {
        self.t("workers_of_scope", self.inner.workers_of_scope(scope), none)
            .await
    }
    async fn remove_workers(&self, worker_ids: &[String]) -> Result<(), StoreError> {
        self.t(
            "remove_workers",
            self.inner.remove_workers(worker_ids),
            none,
        )
        .await
    }
    async fn insert_task(
        &self,
        task: &TaskRow,
        dedup_since_ms: i64,
    ) -> Result<Inserted, StoreError> {
        self.t(
            "insert_task",
            self.inner.insert_task(task, dedup_since_ms),
            none,
        )
        .await
    }
    async fn find_idempotent(
        &self,
        scope: &Scope,
        idempotency_key: &str,
        since_ms: i64,
    ) -> Result<Option<TaskRow>, StoreError> {
        self.t(
            "find_idempotent",
            self.inner.find_idempotent(scope, idempotency_key, since_ms),
            none,
        )
        .await
    }
    async fn running_task_of_run(
        &self,
        scope: &Scope,
        run_id: &str,
    ) -> Result<Option<TaskRow>, StoreError> {
        self.t(
            "running_task_of_run",
            self.inner.running_task_of_run(scope, run_id),
            none,
        )
        .await
    }
    async fn get_task(&self, task_id: &str) -> Result<Option<TaskRow>, StoreError> {
        self.t("get_task", self.inner.get_task(task_id), none).await
    }
    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TaskRow>, StoreError> {
        self.t(
            "list_tasks",
            self.inner.list_tasks(filter, before_seq, limit),
            none,
        )
        .await
    }
    async fn claim(&self, batch: &ClaimBatch<'_>) -> Result<Vec<TaskRow>, StoreError> {
        self.t("claim", self.inner.claim(batch), |v| v.len() as u64)
            .await
    }
    async fn claim_task(
        &self,
        scope: &Scope,
        task_id: &str,
        batch: &ClaimBatch<'_>,
    ) -> Result<ClaimOne, StoreError> {
        self.t(
            "claim_task",
            self.inner.claim_task(scope, task_id, batch),
            none,
        )
        .await
    }
    async fn start_run(
        &self,
        task_id: &str,
        worker_id: &str,
        lease_epoch: u64,
        run_id: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<TaskRow>, StoreError> {
        self.t(
            "start_run",
            self.inner
                .start_run(task_id, worker_id, lease_epoch, run_id, now_ms, lease_ms),
            none,
        )
        .await
    }
    async fn release_attempt(
        &self,
        task_id: &str,
        lease_epoch: u64,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<Released>, StoreError> {
        self.t(
            "release_attempt",
            self.inner
                .release_attempt(task_id, lease_epoch, reason, now_ms),
            none,
        )
        .await
    }
    async fn renew_leases(
        &self,
        worker_id: &str,
        leases: &[(String, u64)],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        self.t(
            "renew_leases",
            self.inner.renew_leases(worker_id, leases, now_ms, lease_ms),
            none,
        )
        .await
    }
    async fn finish(&self, report: &Finish<'_>) -> Result<Finished, StoreError> {
        self.t("finish", self.inner.finish(report), none).await
    }
    async fn expire(&self, now_ms: i64, limit: u32) -> Result<Vec<Released>, StoreError> {
        self.t("expire", self.inner.expire(now_ms, limit), |v| {
            v.len() as u64
        })
        .await
    }
    async fn cancel_task(
        &self,
        task_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Cancelled, StoreError> {
        self.t(
            "cancel_task",
            self.inner.cancel_task(task_id, reason, now_ms),
            none,
        )
        .await
    }
    async fn release_workers_tasks(
        &self,
        worker_ids: &[String],
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<Released>, StoreError> {
        self.t(
            "release_workers_tasks",
            self.inner.release_workers_tasks(worker_ids, reason, now_ms),
            none,
        )
        .await
    }
    async fn queued_scopes(&self) -> Result<Vec<(Scope, u64)>, StoreError> {
        self.t("queued_scopes", self.inner.queued_scopes(), none)
            .await
    }
    /// Timed until the release is ordered (what the enqueue waits for before
    /// it pushes or wakes), not until it commits.
    async fn release_held(&self, after: &TaskRow) -> Result<Committed, StoreError> {
        self.t("release_held", self.inner.release_held(after), none)
            .await
    }
    async fn held_before(&self, before_ms: i64, limit: u32) -> Result<Vec<TaskRow>, StoreError> {
        self.t(
            "held_before",
            self.inner.held_before(before_ms, limit),
            |v: &Vec<TaskRow>| v.len() as u64,
        )
        .await
    }
    async fn delete_held(&self, task_id: &str) -> Result<bool, StoreError> {
        self.t("delete_held", self.inner.delete_held(task_id), none)
            .await
    }
}

// ---------------------------------------------------------------------------
// The trust domain and the stack under test.

struct Pki {
    td: TrustDomain,
    ca: Ca,
    ca_key: String,
    bundle: TrustBundle,
    audit: Identity,
    identity: Identity,
    dispatcher: Identity,
    dispatcher_pem: (String, String),
    operator: Identity,
    reviewer: Identity,
}

impl Pki {
    fn generate() -> anyhow::Result<Self> {
        let td = TrustDomain::parse(TRUST_DOMAIN)?;
        let (ca, ca_key) = Ca::generate(&td)?;
        let mut pki = Self {
            bundle: TrustBundle::from_pem(ca.cert_pem().as_bytes(), "bench ca")?,
            audit: issue(
                &ca,
                &td,
                "service/audit",
                SvidOptions::for_local_service("audit"),
            )?,
            identity: issue(
                &ca,
                &td,
                "service/identity",
                SvidOptions::for_local_service("identity"),
            )?,
            dispatcher: issue(
                &ca,
                &td,
                "service/dispatcher",
                SvidOptions::for_local_service("dispatcher"),
            )?,
            dispatcher_pem: (String::new(), String::new()),
            operator: issue(&ca, &td, "admin/bench", SvidOptions::default())?,
            reviewer: issue(&ca, &td, "admin/reviewer", SvidOptions::default())?,
            ca,
            ca_key,
            td,
        };
        // The same SVID as PEM files, for the dispatcher binary.
        let svid = pki.ca.issue(
            &pki.td.join(["service", "dispatcher"])?,
            &SvidOptions::for_local_service("dispatcher"),
        )?;
        pki.dispatcher_pem = (
            format!("{}{}", svid.cert_pem, pki.ca.cert_pem()),
            svid.key_pem.clone(),
        );
        Ok(pki)
    }

    fn issue(&self, path: &str) -> anyhow::Result<Identity> {
        issue(&self.ca, &self.td, path, SvidOptions::default())
    }
}

fn issue(ca: &Ca, td: &TrustDomain, path: &str, opts: SvidOptions) -> anyhow::Result<Identity> {
    let svid = ca.issue(&td.join(path.split('/'))?, &opts)?;
    let chain = format!("{}{}", svid.cert_pem, ca.cert_pem());
    Ok(Identity::from_pem(
        chain.as_bytes(),
        svid.key_pem.as_bytes(),
        path,
    )?)
}

fn temp() -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("bulkhead-dispatch-bench-")
        .tempdir()?)
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

type Serving = tokio::task::JoinHandle<Result<(), bulkhead_mesh::server::ServeError>>;

/// Audit and identity, in-process, serving on loopback.
struct Backing {
    audit_addr: String,
    identity_addr: String,
    times: Arc<Times>,
    stop: CancellationToken,
    servers: Vec<Serving>,
    dirs: Vec<tempfile::TempDir>,
}

async fn start_peers(pki: &Pki) -> anyhow::Result<Backing> {
    let stop = CancellationToken::new();
    let times = Arc::new(Times::default());
    let adir = temp()?;
    let idir = temp()?;

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
                method: "/Append",
                times: times.clone(),
            },
            bulkhead_audit::service::POLICY,
        )
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let audit_addr = bound.local_addr().to_string();
    let audit_serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));

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
            ca: Ca::load(pki.ca.cert_pem(), &pki.ca_key)?,
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
        .denials(Arc::new(bulkhead_identity::service::AuditDenials::new(
            identity_audit,
        )))
        .add_service(
            bulkhead_identity::service::server(api),
            bulkhead_identity::service::POLICY,
        )
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let identity_addr = bound.local_addr().to_string();
    let identity_serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));
    Ok(Backing {
        audit_addr,
        identity_addr,
        times,
        stop,
        servers: vec![audit_serving, identity_serving],
        dirs: vec![adir, idir],
    })
}

/// Audit, identity and the dispatcher, in-process.
struct Stack {
    addr: String,
    peers: Backing,
}

async fn start_stack(pki: &Pki, store_url: Option<String>) -> anyhow::Result<Stack> {
    let mut peers = start_peers(pki).await?;
    let stop = peers.stop.clone();
    let ddir = temp()?;
    let url = store_url
        .unwrap_or_else(|| format!("sqlite://{}", ddir.path().join("dispatcher.db").display()));
    peers.dirs.push(ddir);
    let real = store::open(&url)
        .await
        .context("failed to open the dispatcher store")?;
    let store: Arc<dyn DispatchStore> = Arc::new(TimedStore {
        inner: real,
        times: peers.times.clone(),
    });
    let channel = |addr: &str, name: &str| {
        bulkhead_mesh::client::channel(
            addr,
            Some(&pki.dispatcher),
            &pki.bundle,
            ExpectServer::Service(name.into()),
        )
    };
    let audit = AuditClient::new(channel(&peers.audit_addr, "audit")?);
    let revoked = Arc::new(RevocationList::new());
    tokio::spawn(bulkhead_mesh::revocation::follow(
        revoked.clone(),
        channel(&peers.identity_addr, "identity")?,
        stop.clone(),
    ));
    let server = MeshServer::new("dispatcher", pki.dispatcher.clone(), pki.bundle.clone());
    let denials = Arc::new(bulkhead_dispatcher::service::AuditDenials::new(
        audit.clone(),
    ));
    let engine = Engine::start(
        Parts {
            store,
            audit,
            actor: pki.dispatcher.spiffe_id().to_string(),
            identity: IdentityServiceClient::new(channel(&peers.identity_addr, "identity")?),
            fleet: FleetConfig {
                hand_off: env_u64("DISPATCH_BENCH_HAND_OFF", 1)? != 0,
                ..FleetConfig::default()
            },
            wake: Wake::none(),
            draining: server.draining(),
        },
        stop.clone(),
    );
    let bound = server
        .revocations(revoked.clone())
        .denials(denials)
        .add_service(
            bulkhead_dispatcher::service::server(bulkhead_dispatcher::service::DispatcherApi::new(
                engine, None,
            )),
            bulkhead_dispatcher::service::POLICY,
        )
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let addr = bound.local_addr().to_string();
    peers
        .servers
        .push(tokio::spawn(bound.serve(stop.clone().cancelled_owned())));
    let waited = Instant::now();
    while !revoked.synced() {
        ensure!(
            waited.elapsed() < Duration::from_secs(30),
            "the dispatcher's revocation list did not sync with identity in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(Stack { addr, peers })
}

impl Backing {
    async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        for s in self.servers {
            s.await??;
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

/// The agent, submitted by one operator and approved by another.
async fn approve_agent(pki: &Pki, addr: &str) -> anyhow::Result<()> {
    let mut op = Dispatcher::new(connect(pki, addr, "dispatcher", &pki.operator).await?);
    let mut rv = Dispatcher::new(connect(pki, addr, "dispatcher", &pki.reviewer).await?);
    op.submit_agent(pb::SubmitAgentRequest {
        name: AGENT.into(),
        version: AGENT_VERSION.into(),
        image: "registry.example/bench@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
        ..Default::default()
    })
    .await?;
    rv.approve_agent(pb::ApproveAgentRequest {
        name: AGENT.into(),
        version: AGENT_VERSION.into(),
        comment: "bench".into(),
    })
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Workers and enqueuers.

/// What the workers saw in one phase, by task index (the payload).
struct Board {
    base: Instant,
    /// Nanoseconds after `base` + 1 at which the assignment was received; 0: not yet.
    received: Vec<AtomicU64>,
    /// Enqueue called / answered, the same way.
    called: Vec<AtomicU64>,
    answered: Vec<AtomicU64>,
    acked: AtomicU64,
    refused: AtomicU64,
    cancels: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Board {
    fn new(n: u64) -> Arc<Self> {
        let v = || (0..n).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Self {
            base: Instant::now(),
            received: v(),
            called: v(),
            answered: v(),
            acked: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            cancels: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        })
    }

    fn stamp(&self, list: &[AtomicU64], i: u64) {
        if let Some(slot) = list.get(i as usize) {
            let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let _ = slot.compare_exchange(0, ns + 1, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    fn at(list: &[AtomicU64], i: usize) -> Option<Duration> {
        match list[i].load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns - 1)),
        }
    }

    fn error(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        lock(&self.first_error).get_or_insert(e);
    }

    /// (Enqueue called → received, Enqueue answered → received) per task.
    fn latencies(&self, n: usize) -> (Vec<Duration>, Vec<Duration>) {
        let mut from_call = Vec::new();
        let mut from_answer = Vec::new();
        for i in 0..n.min(self.received.len()) {
            let Some(got) = Self::at(&self.received, i) else {
                continue;
            };
            if let Some(c) = Self::at(&self.called, i) {
                from_call.push(got.saturating_sub(c));
            }
            if let Some(a) = Self::at(&self.answered, i) {
                from_answer.push(got.saturating_sub(a));
            }
        }
        (from_call, from_answer)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Report each assignment as soon as it arrives.
    Report,
    /// Accept it with a CSR, wait for the run's SVID, then report.
    Accept,
}

fn credit(slots: u32) -> pb::ClaimRequest {
    pb::ClaimRequest {
        body: Some(Up::Credits(pb::ClaimCredits { slots })),
    }
}

fn report(task_id: String, attempt: u32, lease_epoch: u64) -> pb::ClaimRequest {
    pb::ClaimRequest {
        body: Some(Up::Report(pb::ClaimReport {
            task_id,
            attempt,
            lease_epoch,
            outcome: pb::RunOutcome::Succeeded as i32,
            exit_code: 0,
            output_summary: String::new(),
        })),
    }
}

fn index_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?))
}

/// One worker's claim stream until `stop`.
async fn work(
    channel: MeshChannel,
    credits: u32,
    mode: Mode,
    csr: Arc<Vec<u8>>,
    board: Arc<Board>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut client = Dispatcher::new(channel);
    let (tx, rx) = mpsc::channel(8192);
    tx.send(credit(credits)).await?;
    let mut inbound = client.claim(ReceiverStream::new(rx)).await?.into_inner();
    loop {
        let msg = tokio::select! {
            m = inbound.message() => match m? {
                Some(m) => m,
                None => return Ok(()),
            },
            () = stop.cancelled() => return Ok(()),
        };
        let up = match msg.body {
            Some(Down::Assignment(a)) => {
                let task = a.task.unwrap_or_default();
                if let Some(i) = index_of(&task.payload) {
                    board.stamp(&board.received, i);
                }
                match mode {
                    Mode::Report => report(task.task_id, a.attempt, a.lease_epoch),
                    Mode::Accept => pb::ClaimRequest {
                        body: Some(Up::Accept(pb::ClaimAccept {
                            task_id: task.task_id,
                            attempt: a.attempt,
                            lease_epoch: a.lease_epoch,
                            run_csr_der: csr.to_vec().into(),
                        })),
                    },
                }
            }
            Some(Down::RunSvid(s)) => report(s.task_id, s.attempt, s.lease_epoch),
            Some(Down::ReportAck(ack)) => {
                if ack.accepted {
                    board.acked.fetch_add(1, Ordering::Relaxed);
                } else {
                    board.refused.fetch_add(1, Ordering::Relaxed);
                }
                credit(1)
            }
            Some(Down::Cancel(c)) => {
                board.cancels.fetch_add(1, Ordering::Relaxed);
                board.error(format!("cancel: {}", c.message));
                credit(1)
            }
            Some(Down::Drain(_)) | None => continue,
        };
        if tx.send(up).await.is_err() {
            return Ok(());
        }
    }
}

/// The 12 workers (3 tenants × 4), registered, with their claim streams open.
struct Fleet {
    stop: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
}

async fn start_fleet(
    pki: &Pki,
    addr: &str,
    credits: u32,
    mode: Mode,
    board: &Arc<Board>,
) -> anyhow::Result<Fleet> {
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for t in TENANTS {
        for k in 0..WORKERS_PER_TENANT {
            let who = pki.issue(&format!("tenant/{t}/worker/{t}-w{k}"))?;
            let ch = connect(pki, addr, "dispatcher", &who).await?;
            Dispatcher::new(ch.clone())
                .register_worker(pb::RegisterWorkerRequest {
                    labels: Default::default(),
                    max_concurrent_runs: credits,
                    sandbox_backends: vec![PROCESS_BACKEND],
                    version: "bench".into(),
                })
                .await?;
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)?
                .der()
                .to_vec();
            let (board, stop) = (board.clone(), stop.clone());
            tasks.spawn(work(ch, credits, mode, Arc::new(csr), board, stop));
        }
    }
    Ok(Fleet { stop, tasks })
}

impl Fleet {
    async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        while let Some(r) = self.tasks.join_next().await {
            r??;
        }
        Ok(())
    }
}

/// Tenant clients: CLIENT_CONNECTIONS connections per tenant.
async fn clients(pki: &Pki, addr: &str) -> anyhow::Result<Vec<Vec<Dispatcher>>> {
    let mut out = Vec::new();
    for t in TENANTS {
        let who = pki.issue(&format!("tenant/{t}/client/bench"))?;
        let mut per = Vec::new();
        for _ in 0..CLIENT_CONNECTIONS {
            per.push(Dispatcher::new(
                connect(pki, addr, "dispatcher", &who).await?,
            ));
        }
        out.push(per);
    }
    Ok(out)
}

async fn enqueue_one(
    clients: &[Vec<Dispatcher>],
    board: &Board,
    i: u64,
) -> Result<(), tonic::Status> {
    let t = (i % TENANTS.len() as u64) as usize;
    let per = &clients[t];
    let mut c = per[(i / TENANTS.len() as u64) as usize % per.len()].clone();
    board.stamp(&board.called, i);
    c.enqueue(pb::EnqueueRequest {
        tenant: TENANTS[t].into(),
        agent: AGENT.into(),
        payload: i.to_le_bytes().to_vec().into(),
        ..Default::default()
    })
    .await?;
    board.stamp(&board.answered, i);
    Ok(())
}

/// Waits until `n` reports were acknowledged or the deadline passed.
async fn wait_acked(board: &Board, n: u64, deadline: Instant) -> bool {
    while board.acked.load(Ordering::Relaxed) < n {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// One measured phase.
#[derive(Debug, Default, Clone)]
struct Phase {
    tasks: u64,
    done: u64,
    elapsed: Duration,
    enqueue_elapsed: Duration,
    cpu: Duration,
    from_call: Dist,
    from_answer: Dist,
    errors: u64,
    refused: u64,
    first_error: Option<String>,
    timed_out: bool,
    inside: Inside,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn print(&self, what: &str) {
        println!(
            "{what}: {} of {} tasks in {:.2} s = {}/s (enqueues done after {:.2} s); process CPU \
             {:.0}% of one core",
            self.done,
            self.tasks,
            self.elapsed.as_secs_f64(),
            per_sec(self.rate()),
            self.enqueue_elapsed.as_secs_f64(),
            100.0 * self.cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9)
        );
        println!("  enqueue called → received: {}", self.from_call.line());
        println!("  enqueue answered → received: {}", self.from_answer.line());
        for l in self.inside.lines(self.done, self.elapsed) {
            println!("  {l}");
        }
        if self.errors > 0 || self.refused > 0 {
            println!(
                "  {} errors, {} reports refused; first error: {}",
                self.errors,
                self.refused,
                self.first_error.as_deref().unwrap_or("-")
            );
        }
        if self.timed_out {
            println!("  stopped at the phase deadline");
        }
    }
}

fn finish_phase(
    board: &Board,
    n: u64,
    start: Instant,
    enqueue_done: Instant,
    cpu0: Duration,
    timed_out: bool,
    times: &Times,
) -> Phase {
    let elapsed = start.elapsed();
    let (c, a) = board.latencies(n as usize);
    Phase {
        tasks: n,
        done: board.acked.load(Ordering::Relaxed),
        elapsed,
        enqueue_elapsed: enqueue_done.saturating_duration_since(start),
        cpu: cpu_time().saturating_sub(cpu0),
        from_call: Dist::of(c),
        from_answer: Dist::of(a),
        errors: board.errors.load(Ordering::Relaxed),
        refused: board.refused.load(Ordering::Relaxed),
        first_error: lock(&board.first_error).clone(),
        timed_out,
        inside: times.snapshot(),
    }
}

/// Closed loop: `k` enqueuers, `n` tasks, workers reporting (or accepting).
async fn closed_loop(
    pki: &Pki,
    p: &Params,
    store_url: Option<String>,
    n: u64,
    mode: Mode,
) -> anyhow::Result<Phase> {
    let stack = start_stack(pki, store_url).await?;
    approve_agent(pki, &stack.addr).await?;
    let board = Board::new(n);
    let fleet = start_fleet(pki, &stack.addr, p.credits, mode, &board).await?;
    let clients = Arc::new(clients(pki, &stack.addr).await?);
    stack.peers.times.clear();
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + p.phase;
    let cpu0 = cpu_time();
    let mut set = JoinSet::new();
    for _ in 0..p.enqueuers {
        let (clients, board, next) = (clients.clone(), board.clone(), next.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || Instant::now() >= deadline {
                    return;
                }
                if let Err(s) = enqueue_one(&clients, &board, i).await {
                    board.error(format!("enqueue: {s:?}"));
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    let enqueue_done = Instant::now();
    let ok = wait_acked(&board, n, deadline).await;
    let phase = finish_phase(
        &board,
        n,
        start,
        enqueue_done,
        cpu0,
        !ok,
        &stack.peers.times,
    );
    fleet.stop().await?;
    stack.peers.shutdown().await?;
    Ok(phase)
}

/// Open loop: Enqueue offered at `rate` per second for `secs`.
async fn open_loop(pki: &Pki, p: &Params, store_url: Option<String>) -> anyhow::Result<Phase> {
    let stack = start_stack(pki, store_url).await?;
    approve_agent(pki, &stack.addr).await?;
    let n = p.rate * p.open_secs;
    let board = Board::new(n);
    let fleet = start_fleet(pki, &stack.addr, p.credits, Mode::Report, &board).await?;
    let clients = Arc::new(clients(pki, &stack.addr).await?);
    // Warm up: a few tasks through every path before the clock.
    let warm = Board::new(0);
    for i in 0..30 {
        enqueue_one(&clients, &warm, u64::MAX - i).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    board.acked.store(0, Ordering::Relaxed);
    stack.peers.times.clear();
    let start = Instant::now();
    let cpu0 = cpu_time();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / p.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut set = JoinSet::new();
    for i in 0..n {
        tick.tick().await;
        let (clients, board) = (clients.clone(), board.clone());
        set.spawn(async move {
            if let Err(s) = enqueue_one(&clients, &board, i).await {
                board.error(format!("enqueue: {s:?}"));
            }
        });
    }
    while set.join_next().await.is_some() {}
    let enqueue_done = Instant::now();
    let ok = wait_acked(&board, n, Instant::now() + Duration::from_secs(30)).await;
    let phase = finish_phase(
        &board,
        n,
        start,
        enqueue_done,
        cpu0,
        !ok,
        &stack.peers.times,
    );
    fleet.stop().await?;
    stack.peers.shutdown().await?;
    Ok(phase)
}

/// Audit Append alone: one event per call from `k` callers, `n` calls.
async fn audit_alone(pki: &Pki, k: u64, n: u64) -> anyhow::Result<(f64, Dist)> {
    let peers = start_peers(pki).await?;
    let mut clients = Vec::new();
    for _ in 0..k.min(16) {
        clients.push(AuditClient::new(
            connect(pki, &peers.audit_addr, "audit", &pki.dispatcher).await?,
        ));
    }
    let clients = Arc::new(clients);
    let next = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for j in 0..k {
        let (clients, next, lat) = (clients.clone(), next.clone(), lat.clone());
        set.spawn(async move {
            let c = &clients[j as usize % clients.len()];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || start.elapsed() > Duration::from_secs(120) {
                    return anyhow::Ok(());
                }
                let t = Instant::now();
                c.record_one(bulkhead_mesh::audit::event(
                    "task.enqueued",
                    TENANTS[i as usize % 3],
                    "",
                    Outcome::Success,
                    [
                        ("task_id", format!("{i:032x}")),
                        ("pool", String::new()),
                        ("agent", format!("{AGENT}@{AGENT_VERSION}")),
                        ("secret_keys", String::new()),
                        ("priority", "0".into()),
                        ("payload_size", "8".into()),
                        (
                            "enqueued_by",
                            "spiffe://bulkhead.bench/tenant/acme/client/bench".into(),
                        ),
                    ],
                ))
                .await?;
                lock(&lat).push(t.elapsed());
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let elapsed = start.elapsed();
    let all = std::mem::take(&mut *lock(&lat));
    let rate = all.len() as f64 / elapsed.as_secs_f64();
    peers.shutdown().await?;
    Ok((rate, Dist::of(all)))
}

// ---------------------------------------------------------------------------
// Idle claim streams against the dispatcher binary.

#[derive(Debug, Default, Clone)]
struct Rss {
    streams: u64,
    connected: u64,
    base_kib: u64,
    with_streams_kib: u64,
    hwm_kib: u64,
    open_time: Duration,
    live_check: String,
}

async fn idle_streams(pki: &Pki, n: u64) -> anyhow::Result<Rss> {
    let peers = start_peers(pki).await?;
    let dir = temp()?;
    let pkidir = dir.path().join("pki");
    std::fs::create_dir_all(&pkidir)?;
    std::fs::write(pkidir.join("ca.pem"), pki.ca.cert_pem())?;
    std::fs::write(pkidir.join("dispatcher.pem"), &pki.dispatcher_pem.0)?;
    bulkhead_mesh::pki::write_private(&pkidir.join("dispatcher.key"), &pki.dispatcher_pem.1)?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let cfg = MeshConfig {
        listen: "127.0.0.1:0".parse()?,
        tls: TlsFiles::in_dir(&pkidir, "dispatcher"),
        data_dir: data.clone(),
        telemetry: TelemetryConfig {
            log_format: LogFormat::Json,
            log_filter: "warn".into(),
            otlp_endpoint: None,
        },
        peers: Peers {
            identity: Some(peers.identity_addr.clone()),
            audit: Some(peers.audit_addr.clone()),
            sealed_vault: None,
            dispatcher: None,
        },
    };
    let mut table = toml::Table::try_from(&cfg)?;
    table.insert(
        "store".into(),
        toml::Value::String(format!("sqlite://{}", data.join("dispatcher.db").display())),
    );
    let config = dir.path().join("dispatcher.toml");
    std::fs::write(&config, toml::to_string_pretty(&table)?)?;
    let addr_file = dir.path().join("addr");
    let log = std::fs::File::create(dir.path().join("dispatcher.log"))?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-dispatcher"))
        .arg("--config")
        .arg(&config)
        .arg("--addr-file")
        .arg(&addr_file)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("failed to start the dispatcher binary")?;
    let pid = child.id().context("no pid")?;
    let result = idle_streams_on(pki, n, pid, &addr_file, &dir.path().join("dispatcher.log")).await;
    let _ = child.kill().await;
    peers.shutdown().await?;
    result
}

async fn idle_streams_on(
    pki: &Pki,
    n: u64,
    pid: u32,
    addr_file: &Path,
    log: &Path,
) -> anyhow::Result<Rss> {
    let waited = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(addr_file) {
            break a.trim().to_owned();
        }
        if waited.elapsed() > Duration::from_secs(30) {
            bail!(
                "the dispatcher binary did not start: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Ready once an operator can list workers.
    let op = loop {
        if let Ok(ch) = connect(pki, &addr, "dispatcher", &pki.operator).await {
            let mut c = Dispatcher::new(ch);
            if c.list_workers(pb::ListWorkersRequest::default())
                .await
                .is_ok()
            {
                break c;
            }
        }
        ensure!(
            waited.elapsed() < Duration::from_secs(30),
            "dispatcher not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    approve_agent(pki, &addr).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base_kib = status_kib(pid, "VmRSS:").context("no VmRSS")?;

    // n workers, each its own SVID and mTLS connection (a claim stream's
    // worker is the connection's identity), 32 being set up at a time.
    let received = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let start = Instant::now();
    let opened: Vec<anyhow::Result<(mpsc::Sender<pb::ClaimRequest>, tokio::task::JoinHandle<()>)>> =
        futures::stream::iter(0..n)
            .map(|i| {
                let (addr, received, stop) = (addr.clone(), received.clone(), stop.clone());
                async move {
                    let t = TENANTS[i as usize % TENANTS.len()];
                    let who = pki.issue(&format!("tenant/{t}/worker/idle-{i}"))?;
                    let ch = connect(pki, &addr, "dispatcher", &who).await?;
                    let mut c = Dispatcher::new(ch);
                    c.register_worker(pb::RegisterWorkerRequest {
                        labels: Default::default(),
                        max_concurrent_runs: 1,
                        sandbox_backends: vec![PROCESS_BACKEND],
                        version: "bench".into(),
                    })
                    .await?;
                    let (tx, rx) = mpsc::channel(4);
                    tx.send(credit(1)).await?;
                    let mut inbound = c.claim(ReceiverStream::new(rx)).await?.into_inner();
                    let reader = tokio::spawn(async move {
                        loop {
                            tokio::select! {
                                m = inbound.message() => match m {
                                    Ok(Some(m)) => {
                                        if matches!(m.body, Some(Down::Assignment(_))) {
                                            received.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                    _ => return,
                                },
                                () = stop.cancelled() => return,
                            }
                        }
                    });
                    anyhow::Ok((tx, reader))
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
    let open_time = start.elapsed();
    let mut streams = Vec::new();
    for o in opened {
        streams.push(o?);
    }
    // Every stream is connected, as the dispatcher sees it.
    let mut op = op;
    let mut connected = 0u64;
    let mut token = String::new();
    loop {
        let page = op
            .list_workers(pb::ListWorkersRequest {
                state: pb::WorkerState::Connected as i32,
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        connected += page.workers.len() as u64;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with_streams_kib = status_kib(pid, "VmRSS:").context("no VmRSS")?;
    let hwm_kib = status_kib(pid, "VmHWM:").unwrap_or(0);

    // The streams are live: one task per tenant reaches one of them.
    let mut live = Vec::new();
    for t in TENANTS {
        let who = pki.issue(&format!("tenant/{t}/client/bench"))?;
        let mut c = Dispatcher::new(connect(pki, &addr, "dispatcher", &who).await?);
        let sent = Instant::now();
        let before = received.load(Ordering::Relaxed);
        c.enqueue(pb::EnqueueRequest {
            tenant: t.into(),
            agent: AGENT.into(),
            payload: vec![0u8; 8].into(),
            ..Default::default()
        })
        .await?;
        while received.load(Ordering::Relaxed) == before && sent.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        live.push(if received.load(Ordering::Relaxed) > before {
            format!("{t} {}", ms(sent.elapsed()))
        } else {
            format!("{t} not received in 5 s")
        });
    }
    stop.cancel();
    for (tx, reader) in streams {
        drop(tx);
        let _ = reader.await;
    }
    Ok(Rss {
        streams: n,
        connected,
        base_kib,
        with_streams_kib,
        hwm_kib,
        open_time,
        live_check: live.join(", "),
    })
}

// ---------------------------------------------------------------------------
// The run.

#[derive(Default)]
struct Figures {
    closed: Vec<(String, Vec<Phase>)>,
    open: Vec<(String, Phase)>,
    accept: Vec<(String, Phase)>,
    audit: Option<(u64, f64, Dist)>,
    rss: Option<Rss>,
}

fn goal(backend: &str) -> f64 {
    if backend == "postgres" {
        GOAL_PG
    } else {
        GOAL_SQLITE
    }
}

fn mark(ok: bool) -> &'static str {
    if ok { "✅" } else { "❌" }
}

fn report_table(p: &Params, fig: &Figures) {
    println!("\n== Summary ==");
    println!(
        "\n| backend | closed loop, {} enqueuers × {} tasks: tasks/s per run | median | vs goal |",
        p.enqueuers, p.tasks
    );
    println!("|---|---|---:|---:|");
    for (b, runs) in &fig.closed {
        let rates: Vec<f64> = runs.iter().map(Phase::rate).collect();
        let m = median(rates.clone());
        println!(
            "| {b} | {} | {} | {:.2}× {} |",
            rates
                .iter()
                .map(|r| per_sec(*r))
                .collect::<Vec<_>>()
                .join(" / "),
            per_sec(m),
            m / goal(b),
            mark(m >= goal(b))
        );
    }
    println!(
        "\n| backend | open loop {}/s × {} s | p50 called→received | p99 | vs goal p99 ≤ 5 ms | p50 answered→received | p99 |",
        p.rate, p.open_secs
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (b, ph) in &fig.open {
        println!(
            "| {b} | {} done, {}/s | {} | {} | {:.2}× {} | {} | {} |",
            ph.done,
            per_sec(ph.rate()),
            ms(ph.from_call.p50),
            ms(ph.from_call.p99),
            ph.from_call.p99.as_secs_f64() / GOAL_P99.as_secs_f64(),
            mark(ph.from_call.p99 <= GOAL_P99),
            ms(ph.from_answer.p50),
            ms(ph.from_answer.p99)
        );
    }
    if !fig.accept.is_empty() {
        println!(
            "\n| backend | with accept + run-SVID mint: tasks/s | p50 called→received | p99 |"
        );
        println!("|---|---:|---:|---:|");
        for (b, ph) in &fig.accept {
            println!(
                "| {b} | {} | {} | {} |",
                per_sec(ph.rate()),
                ms(ph.from_call.p50),
                ms(ph.from_call.p99)
            );
        }
    }
    if let Some((k, rate, d)) = &fig.audit {
        println!(
            "\naudit Append alone, 1 event per call, {k} callers: {}/s, p50 {} p99 {}",
            per_sec(*rate),
            ms(d.p50),
            ms(d.p99)
        );
    }
    if let Some(r) = &fig.rss {
        let delta = r.with_streams_kib.saturating_sub(r.base_kib);
        println!(
            "\ndispatcher binary, {} idle claim streams ({} listed connected, opened in {:.1} s): \
             VmRSS {:.1} MiB before, {:.1} MiB with them ({:.2} {} vs goal 256 MiB), VmHWM \
             {:.1} MiB; {:.1} KiB per stream; live check: {}",
            r.streams,
            r.connected,
            r.open_time.as_secs_f64(),
            mib(r.base_kib),
            mib(r.with_streams_kib),
            mib(r.with_streams_kib) / GOAL_RSS_MIB,
            mark(mib(r.with_streams_kib) <= GOAL_RSS_MIB),
            mib(r.hwm_kib),
            delta as f64 / r.streams.max(1) as f64,
            r.live_check
        );
    }
}

/// A fresh database for one phase: None (SQLite in a temp dir) or a new
/// PostgreSQL database.
async fn fresh_store(
    backend: &str,
    pg: Option<&bulkhead_testkit::external::Postgres>,
    db: &mut u32,
) -> anyhow::Result<Option<String>> {
    if backend != "postgres" {
        return Ok(None);
    }
    *db += 1;
    let server = pg.context("no postgresql server")?;
    Ok(Some(server.create_database(&format!("bench_{db}")).await?))
}

async fn run() -> anyhow::Result<()> {
    bulkhead_mesh::tls::install_crypto_provider();
    let p = Params::from_env()?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "dispatcher bench: {} cores, load {}, {:?}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        p
    );
    let pki = Pki::generate()?;
    let mut fig = Figures::default();
    let mut pg = None;
    let mut db = 0u32;
    for backend in &p.backends {
        if backend == "postgres" && pg.is_none() {
            match bulkhead_testkit::external::Postgres::start().await? {
                Some(server) => pg = Some(server),
                None => {
                    println!("\nPostgreSQL is not installed: its phases are skipped");
                    continue;
                }
            }
        }
        let mut runs = Vec::new();
        for rep in 0..p.reps {
            let store = fresh_store(backend, pg.as_ref(), &mut db).await?;
            let ph = closed_loop(&pki, &p, store, p.tasks, Mode::Report).await?;
            ph.print(&format!(
                "\n[{backend}] closed loop {}/{}, {} enqueuers",
                rep + 1,
                p.reps,
                p.enqueuers
            ));
            runs.push(ph);
        }
        fig.closed.push((backend.clone(), runs));
        let store = fresh_store(backend, pg.as_ref(), &mut db).await?;
        let ph = open_loop(&pki, &p, store).await?;
        ph.print(&format!(
            "\n[{backend}] open loop {}/s for {} s",
            p.rate, p.open_secs
        ));
        fig.open.push((backend.clone(), ph));
        if p.mint_tasks > 0 {
            let store = fresh_store(backend, pg.as_ref(), &mut db).await?;
            let ph = closed_loop(&pki, &p, store, p.mint_tasks, Mode::Accept).await?;
            ph.print(&format!(
                "\n[{backend}] closed loop with accept + mint, {} enqueuers",
                p.enqueuers
            ));
            fig.accept.push((backend.clone(), ph));
        }
    }
    let (rate, d) = audit_alone(&pki, p.enqueuers, 20_000).await?;
    println!(
        "\naudit Append alone, {} callers, 1 event per call: {}/s, {}",
        p.enqueuers,
        per_sec(rate),
        d.line()
    );
    fig.audit = Some((p.enqueuers, rate, d));
    if p.streams > 0 {
        let r = idle_streams(&pki, p.streams).await?;
        println!("\nidle streams: {r:?}");
        fig.rss = Some(r);
    }
    report_table(&p, &fig);
    if fig
        .closed
        .iter()
        .any(|(_, runs)| runs.iter().any(|r| r.done == 0))
    {
        bail!("a phase dispatched nothing");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the runtime")?;
    rt.block_on(run())
}
