//! The sealed-vault Resolve benchmark: a program (harness = false), not a
//! timed test.
//!
//! Audit, identity and sealed-vault run in-process, each the mesh server with
//! its real handlers, authorization table and SQLite store in a temp dir on
//! disk (WAL, synchronous=FULL), talking to one another over mTLS on
//! loopback. Sealed-vault is put together as its `main.rs` does it: a fresh
//! master key, a random fingerprint key, the built-in backend only, an
//! AuditClient to the in-process audit, an identity client (for the JWT
//! bundle) and a revocation list following identity's WatchRevocations.
//!
//! Per stack, before any clock: an operator (`admin/bench`) creates profile
//! `acme/bench-app` with 3 built-in secrets (PutSecret); the dispatcher mints
//! one run X.509-SVID for tenant acme; that run mints one JWT-SVID for
//! sealed-vault's SPIFFE ID. Then:
//!
//! 1. Resolve: K sandbox-runner clients (`service/sandbox-runner/host-a`, one
//!    mTLS connection each) call Resolve N times with that token and a cascade
//!    naming the profile (system level), audit included; resolves/s and p50/p99.
//!    Each phase on a fresh stack. Inside the services a tower wrapper times
//!    sealed-vault's Resolve handler and audit's Append handler, and a wrapper
//!    around the real sealed store times `load_profile`.
//! 2. Where a Resolve's time goes: one client alone (the latency of the parts
//!    with nothing queued), then K clients; each part alone (audit Append of
//!    a `sealed.credential.resolved` event, `load_profile` straight on the
//!    store, a Resolve refused before the handler's work as the mTLS RPC
//!    floor), the CPU steps on one core (JWT validation, decrypt, HMAC
//!    fingerprint, cascade), and Resolve again with audit's and then both
//!    databases on tmpfs (/dev/shm), where fsync costs nothing.
//!
//! `cargo bench -p bulkhead-sealed-vault --bench resolve`. Sizes come from the
//! environment: RESOLVE_BENCH_PHASES ("8:5000,32:20000": clients:resolves per
//! phase), RESOLVE_BENCH_PROBE (10000: resolves per "where the time goes"
//! phase; 0 skips them), RESOLVE_BENCH_PHASE_SECS (120: every phase stops
//! there, and says so), RESOLVE_BENCH_OPEN ("2000:20000": an open-loop
//! phase offering rate/s for that many resolves; empty skips it). Every loop
//! is bounded by its count and by the phase deadline.

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
use bulkhead_identity::keys::JwtKeys;
use bulkhead_identity::service::{AuditDenials, IdentityApi, Limits};
use bulkhead_mesh::audit::{self, AuditClient, Outcome};
use bulkhead_mesh::jwt::{self, JwtBundle};
use bulkhead_mesh::pki::{Ca, SvidOptions};
use bulkhead_mesh::revocation::RevocationList;
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::spiffe::TrustDomain;
use bulkhead_mesh::tls::{ClientAuth, ExpectServer, Identity, TrustBundle};
use bulkhead_proto::identity::v1 as idpb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sealed::v1 as pb;
use bulkhead_proto::sealed::v1::sealed_vault_service_client::SealedVaultServiceClient;
use bulkhead_sealed_vault::backend::Backends;
use bulkhead_sealed_vault::cascade::{self, Level, Origin};
use bulkhead_sealed_vault::crypto::{self, MasterKey};
use bulkhead_sealed_vault::secret::SecretValue;
use bulkhead_sealed_vault::service::{self, Parts, SealedVaultApi};
use bulkhead_sealed_vault::store::{
    self, Holding, ImportCounts, Lift, NewRevocation, Profile, ProfileBundle, ProfileQuery,
    ProfileSpec, RevocationQuery, Rewrapped, SealedStore, SealedVersion, SecretMaterial,
    SecretMeta, SecretRevocation, SecretVersion, StoreError, StoreExport, Tenants, VersionId,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;

const TRUST_DOMAIN: &str = "bulkhead.bench";
const TENANT: &str = "acme";
const PROFILE: &str = "bench-app";
const SECRET_KEYS: [&str; 3] = ["API_TOKEN", "DB_PASSWORD", "WEBHOOK_SECRET"];
const AGENT: &str = "bench-agent";
/// Where fsync costs nothing: the "no durable commit" probes put databases here.
const TMPFS: &str = "/dev/shm";
/// Iterations of the single-step CPU probes.
const MICRO: u32 = 2000;

type VaultClient = SealedVaultServiceClient<bulkhead_mesh::client::MeshChannel>;
type IdClient = IdentityServiceClient<bulkhead_mesh::client::MeshChannel>;

#[derive(Debug, Clone)]
struct Params {
    phases: Vec<(u64, u64)>,
    /// (offered rate per second, resolves) of the open-loop phase.
    open: Option<(u64, u64)>,
    probe: u64,
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
        let spec =
            std::env::var("RESOLVE_BENCH_PHASES").unwrap_or_else(|_| "8:5000,32:20000".into());
        let mut phases = Vec::new();
        for p in spec.split(',').filter(|p| !p.is_empty()) {
            let (k, n) = p
                .split_once(':')
                .with_context(|| format!("RESOLVE_BENCH_PHASES: {p:?} is not clients:resolves"))?;
            phases.push((k.trim().parse::<u64>()?.max(1), n.trim().parse::<u64>()?));
        }
        ensure!(!phases.is_empty(), "RESOLVE_BENCH_PHASES names no phase");
        let open = std::env::var("RESOLVE_BENCH_OPEN").unwrap_or_else(|_| "2000:20000".into());
        let open = match open.trim() {
            "" => None,
            o => {
                let (r, n) = o
                    .split_once(':')
                    .with_context(|| format!("RESOLVE_BENCH_OPEN: {o:?} is not rate:resolves"))?;
                Some((r.trim().parse::<u64>()?.max(1), n.trim().parse::<u64>()?))
            }
        };
        Ok(Self {
            phases,
            open,
            probe: env_u64("RESOLVE_BENCH_PROBE", 10_000)?,
            phase: Duration::from_secs(env_u64("RESOLVE_BENCH_PHASE_SECS", 120)?),
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

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
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

/// Latency percentiles of a set of durations (no rate).
#[derive(Debug, Default, Clone, Copy)]
struct Dist {
    n: usize,
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

impl Dist {
    fn of(mut all: Vec<Duration>) -> Self {
        all.sort();
        let n = all.len();
        let sum: Duration = all.iter().sum();
        Self {
            n,
            p50: percentile(&all, 0.50),
            p99: percentile(&all, 0.99),
            mean: if n == 0 { sum } else { sum / n as u32 },
        }
    }
}

/// Throughput and latency of one phase of calls.
#[derive(Debug, Default, Clone)]
struct Run {
    calls: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    mean: Duration,
    max: Duration,
    timed_out: bool,
    /// (start offset from the phase start, latency) of every successful call.
    samples: Vec<(Duration, Duration)>,
}

impl Run {
    fn from_samples(samples: Vec<(Duration, Duration)>, elapsed: Duration) -> Self {
        let d = Dist::of(samples.iter().map(|(_, l)| *l).collect());
        Self {
            calls: samples.len() as u64,
            elapsed,
            p50: d.p50,
            p99: d.p99,
            mean: d.mean,
            max: samples.iter().map(|(_, l)| *l).max().unwrap_or_default(),
            samples,
            ..Self::default()
        }
    }

    fn rate(&self) -> f64 {
        rate(self.calls, self.elapsed)
    }

    fn line(&self, what: &str) -> String {
        let mut s = format!(
            "{what}: {} in {:.2} s = {}/s; p50 {} p99 {} mean {} max {}",
            self.calls,
            self.elapsed.as_secs_f64(),
            per_sec(self.rate()),
            ms(self.p50),
            ms(self.p99),
            ms(self.mean),
            ms(self.max)
        );
        if self.errors > 0 {
            s.push_str(&format!(
                "; {} errors, first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            ));
        }
        if self.timed_out {
            s.push_str("; stopped at the phase deadline");
        }
        s
    }

    /// The phase cut in `parts` by start time: (rate, p50, p99) of each part.
    fn slices(&self, parts: usize) -> Vec<(f64, Duration, Duration)> {
        let mut s = self.samples.clone();
        s.sort_by_key(|(start, _)| *start);
        let size = s.len().div_ceil(parts.max(1)).max(1);
        s.chunks(size)
            .map(|c| {
                let first = c.first().map(|(t, _)| *t).unwrap_or_default();
                let end = c.iter().map(|(t, l)| *t + *l).max().unwrap_or_default();
                let d = Dist::of(c.iter().map(|(_, l)| *l).collect());
                (
                    rate(c.len() as u64, end.saturating_sub(first)),
                    d.p50,
                    d.p99,
                )
            })
            .collect()
    }
}

/// Runs `n` calls of `call(client, i)` from one task per client, each taking
/// the next index until `n` or the deadline; latencies of the successful calls.
async fn drive<C, F, Fut>(clients: Vec<C>, n: u64, phase: Duration, call: F) -> Run
where
    C: Send + 'static,
    F: Fn(C, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (C, Result<(), String>)> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + phase;
    let mut tasks = JoinSet::new();
    for client in clients {
        let (next, call) = (next.clone(), call.clone());
        tasks.spawn(async move {
            let mut client = client;
            let mut samples = Vec::new();
            let (mut errors, mut first_error, mut timed_out) = (0u64, None, false);
            loop {
                if Instant::now() >= deadline {
                    timed_out = true;
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                let (c, r) = call(client, i).await;
                client = c;
                match r {
                    Ok(()) => samples.push((t - start, t.elapsed())),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (samples, errors, first_error, timed_out)
        });
    }
    let mut all = Vec::new();
    let (mut errors, mut first_error, mut timed_out) = (0, None, false);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((s, e, fe, to)) => {
                all.extend(s);
                errors += e;
                if first_error.is_none() {
                    first_error = fe;
                }
                timed_out |= to;
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("task: {e}"));
            }
        }
    }
    let elapsed = start.elapsed();
    Run {
        errors,
        first_error,
        timed_out,
        ..Run::from_samples(all, elapsed)
    }
}

/// Open loop: starts call `i` at `i / rate` seconds whatever the earlier calls
/// are doing (spread over `clients` round robin; tonic multiplexes calls on a
/// connection), and measures each call from its scheduled start, so a stall
/// shows up in the latencies of every call it delayed.
async fn drive_open<C, F, Fut>(clients: Vec<C>, rate: u64, n: u64, phase: Duration, call: F) -> Run
where
    C: Clone + Send + 'static,
    F: Fn(C, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (C, Result<(), String>)> + Send + 'static,
{
    let start = Instant::now();
    let deadline = start + phase;
    let mut tasks = JoinSet::new();
    let mut timed_out = false;
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        if due >= deadline {
            timed_out = true;
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let (client, call) = (clients[(i as usize) % clients.len()].clone(), call.clone());
        tasks.spawn(async move {
            let (_, r) = call(client, i).await;
            (due - start, due.elapsed(), r)
        });
    }
    let mut samples = Vec::new();
    let (mut errors, mut first_error) = (0, None);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((at, latency, Ok(()))) => samples.push((at, latency)),
            Ok((_, _, Err(e))) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("task: {e}"));
            }
        }
    }
    let elapsed = start.elapsed();
    Run {
        errors,
        first_error,
        timed_out,
        ..Run::from_samples(samples, elapsed)
    }
}

// ---------------------------------------------------------------------------
// Timing from the inside.

/// Durations taken inside the services while a phase runs.
#[derive(Debug, Default)]
struct Times {
    /// Sealed-vault's Resolve: request decode and handler, to its response.
    resolve_handler: Mutex<Vec<Duration>>,
    /// `load_profile`, as Resolve calls it on the sealed store.
    load_profile: Mutex<Vec<Duration>>,
    /// Audit's Append: request decode and handler (group commit included).
    audit_append: Mutex<Vec<Duration>>,
    /// `record_holdings`: one batch of the holdings writer, committed.
    holdings_commit: Mutex<Vec<Duration>>,
    /// `list_revocations`, as Resolve's last check calls it.
    revocations_read: Mutex<Vec<Duration>>,
}

fn push(m: &Mutex<Vec<Duration>>, d: Duration) {
    m.lock().unwrap_or_else(|p| p.into_inner()).push(d);
}

fn take(m: &Mutex<Vec<Duration>>) -> Vec<Duration> {
    std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()))
}

impl Times {
    fn clear(&self) {
        take(&self.resolve_handler);
        take(&self.load_profile);
        take(&self.audit_append);
        take(&self.holdings_commit);
        take(&self.revocations_read);
    }
}

/// Which of [`Times`]' lists a timed service feeds.
#[derive(Debug, Clone, Copy)]
enum Sink {
    Resolve,
    Append,
}

/// A gRPC service with the calls of one method timed, from the request
/// reaching the service (after TLS, HTTP/2 and the authorization layer) to
/// its response.
#[derive(Debug, Clone)]
struct TimedService<S> {
    inner: S,
    method: &'static str,
    sink: Sink,
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
        let (times, sink) = (self.times.clone(), self.sink);
        Box::pin(async move {
            let r = fut.await;
            if timed {
                let list = match sink {
                    Sink::Resolve => &times.resolve_handler,
                    Sink::Append => &times.audit_append,
                };
                push(list, start.elapsed());
            }
            r
        })
    }
}

/// The real sealed store, with `load_profile` timed.
#[derive(Debug)]
struct TimedStore {
    inner: Arc<dyn SealedStore>,
    times: Arc<Times>,
}

#[async_trait::async_trait]
impl SealedStore for TimedStore {
    async fn create_profile(
        &self,
        tenant: &str,
        name: &str,
        spec: &ProfileSpec,
        now_ms: i64,
    ) -> Result<Profile, StoreError> {
        self.inner.create_profile(tenant, name, spec, now_ms).await
    }
    async fn update_profile(
        &self,
        tenant: &str,
        name: &str,
        spec: &ProfileSpec,
        expected_revision: Option<u64>,
        now_ms: i64,
    ) -> Result<Profile, StoreError> {
        self.inner
            .update_profile(tenant, name, spec, expected_revision, now_ms)
            .await
    }
    async fn get_profile(&self, tenant: &str, name: &str) -> Result<Option<Profile>, StoreError> {
        self.inner.get_profile(tenant, name).await
    }
    async fn list_profiles(
        &self,
        tenants: Tenants<'_>,
        query: &ProfileQuery,
    ) -> Result<Vec<Profile>, StoreError> {
        self.inner.list_profiles(tenants, query).await
    }
    async fn delete_profile(&self, tenant: &str, name: &str) -> Result<u64, StoreError> {
        self.inner.delete_profile(tenant, name).await
    }
    async fn current_version(
        &self,
        tenant: &str,
        profile: &str,
        key: &str,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.current_version(tenant, profile, key).await
    }
    async fn put_secret(&self, version: &SecretVersion) -> Result<SecretMeta, StoreError> {
        self.inner.put_secret(version).await
    }
    async fn get_secret(
        &self,
        tenant: &str,
        profile: &str,
        key: &str,
        version: Option<u64>,
    ) -> Result<Option<SecretVersion>, StoreError> {
        self.inner.get_secret(tenant, profile, key, version).await
    }
    async fn delete_secret(
        &self,
        tenant: &str,
        profile: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.inner.delete_secret(tenant, profile, key, now_ms).await
    }
    async fn load_profile(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<ProfileBundle>, StoreError> {
        let t = Instant::now();
        let r = self.inner.load_profile(tenant, name).await;
        push(&self.times.load_profile, t.elapsed());
        r
    }
    async fn revoke(&self, revocation: &NewRevocation) -> Result<SecretRevocation, StoreError> {
        self.inner.revoke(revocation).await
    }
    async fn lift_revocation(
        &self,
        tenant: &str,
        id: &str,
        lift: &Lift,
    ) -> Result<SecretRevocation, StoreError> {
        self.inner.lift_revocation(tenant, id, lift).await
    }
    async fn get_revocation(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<SecretRevocation>, StoreError> {
        self.inner.get_revocation(tenant, id).await
    }
    async fn list_revocations(
        &self,
        tenants: Tenants<'_>,
        query: &RevocationQuery,
    ) -> Result<Vec<SecretRevocation>, StoreError> {
        let t = Instant::now();
        let r = self.inner.list_revocations(tenants, query).await;
        push(&self.times.revocations_read, t.elapsed());
        r
    }
    async fn record_holdings(&self, holdings: &[Holding]) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.record_holdings(holdings).await;
        push(&self.times.holdings_commit, t.elapsed());
        r
    }
    async fn runs_holding(
        &self,
        tenant: &str,
        profile: &str,
        key: Option<&str>,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.runs_holding(tenant, profile, key, now_ms).await
    }
    async fn latest_holding_ms(&self) -> Result<Option<i64>, StoreError> {
        self.inner.latest_holding_ms().await
    }
    async fn prune_holdings(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.inner.prune_holdings(now_ms).await
    }
    async fn sealed_versions(
        &self,
        after: Option<&VersionId>,
        limit: u32,
    ) -> Result<Vec<SealedVersion>, StoreError> {
        self.inner.sealed_versions(after, limit).await
    }
    async fn write_rewrapped(&self, batch: &[Rewrapped]) -> Result<u64, StoreError> {
        self.inner.write_rewrapped(batch).await
    }
    async fn export(&self, now_ms: i64) -> Result<StoreExport, StoreError> {
        self.inner.export(now_ms).await
    }
    async fn import(
        &self,
        export: &StoreExport,
        overwrite: bool,
    ) -> Result<ImportCounts, StoreError> {
        self.inner.import(export, overwrite).await
    }
    async fn close(&self) {
        self.inner.close().await
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
    dispatcher: Identity,
    operator: Identity,
    runner: Identity,
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
        dispatcher: issue("service/dispatcher", SvidOptions::default())?,
        operator: issue("admin/bench", SvidOptions::default())?,
        runner: issue("service/sandbox-runner/host-a", SvidOptions::default())?,
        ca_cert: ca.cert_pem().to_owned(),
        ca_key,
        td,
    })
}

/// Audit, identity and sealed-vault, in-process, serving on loopback.
struct Stack {
    vault_addr: String,
    identity_addr: String,
    audit_addr: String,
    times: Arc<Times>,
    /// The real sealed store (not timed), for the probes that call it alone.
    store: Arc<dyn SealedStore>,
    revocations: Arc<RevocationList>,
    master: MasterKey,
    fingerprint_key: Vec<u8>,
    stop: CancellationToken,
    servers: Vec<tokio::task::JoinHandle<Result<(), bulkhead_mesh::server::ServeError>>>,
    _dirs: Vec<tempfile::TempDir>,
}

fn temp_in(parent: Option<&str>) -> anyhow::Result<tempfile::TempDir> {
    let b = tempfile::Builder::new()
        .prefix("bulkhead-resolve-bench-")
        .to_owned();
    Ok(match parent {
        Some(p) => b.tempdir_in(p)?,
        None => b.tempdir()?,
    })
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Starts the three services: audit's database under `audit_dir`,
/// sealed-vault's under `vault_dir` (None: the system temp dir, on disk);
/// identity's always on disk. Returns once sealed-vault's revocation list has
/// synced with identity.
async fn start_stack(
    pki: &Pki,
    audit_dir: Option<&str>,
    vault_dir: Option<&str>,
) -> anyhow::Result<Stack> {
    let stop = CancellationToken::new();
    let times = Arc::new(Times::default());
    let adir = temp_in(audit_dir)?;
    let idir = temp_in(None)?;
    let vdir = temp_in(vault_dir)?;

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
                method: "/Append",
                sink: Sink::Append,
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
    let real_store = store::open(&format!(
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
    let revocations = Arc::new(RevocationList::new());
    tokio::spawn(bulkhead_mesh::revocation::follow(
        revocations.clone(),
        vault_channel(&identity_addr, "identity")?,
        stop.clone(),
    ));
    let master = MasterKey::generate();
    let fingerprint_key: [u8; 32] = rand::random();
    let api = SealedVaultApi::new(Parts {
        trust_domain: pki.td.clone(),
        audience: pki.vault.spiffe_id().to_string(),
        store: Arc::new(TimedStore {
            inner: real_store.clone(),
            times: times.clone(),
        }),
        master: master.clone(),
        previous: Vec::new(),
        fingerprint_key: SecretValue::new(fingerprint_key.to_vec()),
        backends: Backends::default(),
        audit: AuditClient::new(vault_channel(&audit_addr, "audit")?),
        identity: IdentityServiceClient::new(vault_channel(&identity_addr, "identity")?),
        revocations: revocations.clone(),
        reveals_per_minute: 10,
        // A fresh store: nothing for a start to replay.
        recover_holdings: None,
    });
    let bound = MeshServer::new("sealed-vault", pki.vault.clone(), pki.bundle.clone())
        .revocations(revocations.clone())
        .add_service(
            TimedService {
                inner: service::server(api),
                method: "/Resolve",
                sink: Sink::Resolve,
                times: times.clone(),
            },
            service::POLICY,
        )
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let vault_addr = bound.local_addr().to_string();
    let vault_serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));

    let waited = Instant::now();
    while !revocations.synced() {
        ensure!(
            waited.elapsed() < Duration::from_secs(30),
            "sealed-vault's revocation list did not sync with identity in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(Stack {
        vault_addr,
        identity_addr,
        audit_addr,
        times,
        store: real_store,
        revocations,
        master,
        fingerprint_key: fingerprint_key.to_vec(),
        stop,
        servers: vec![audit_serving, identity_serving, vault_serving],
        _dirs: vec![adir, idir, vdir],
    })
}

impl Stack {
    async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        for s in self.servers {
            s.await??;
        }
        self.store.close().await;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Workloads.

type MeshChannel = bulkhead_mesh::client::MeshChannel;

/// `k` connections to `addr` (serving as `service`) as `who`, handshakes done.
async fn connect_many(
    pki: &Pki,
    addr: &str,
    service: &str,
    who: &Identity,
    k: u64,
) -> anyhow::Result<Vec<MeshChannel>> {
    let mut out = Vec::new();
    for _ in 0..k {
        out.push(
            bulkhead_mesh::client::connect(
                addr,
                Some(who),
                &pki.bundle,
                ExpectServer::Service(service.into()),
            )
            .await?,
        );
    }
    Ok(out)
}

async fn one(pki: &Pki, addr: &str, service: &str, who: &Identity) -> anyhow::Result<MeshChannel> {
    connect_many(pki, addr, service, who, 1)
        .await?
        .pop()
        .context("no channel")
}

/// The profile and its 3 built-in secrets, written by an operator through the
/// API; the values put, by key.
async fn seed(stack: &Stack, pki: &Pki) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut op =
        VaultClient::new(one(pki, &stack.vault_addr, "sealed-vault", &pki.operator).await?);
    op.create_profile(pb::CreateProfileRequest {
        tenant: TENANT.into(),
        name: PROFILE.into(),
        spec: Some(pb::ProfileSpec {
            description: "resolve benchmark".into(),
            ..pb::ProfileSpec::default()
        }),
    })
    .await?;
    let mut values = Vec::new();
    for key in SECRET_KEYS {
        let value = hex::encode(rand::random::<[u8; 24]>()).into_bytes();
        op.put_secret(pb::PutSecretRequest {
            tenant: TENANT.into(),
            profile: PROFILE.into(),
            key: key.into(),
            source: Some(pb::put_secret_request::Source::Value(value.clone().into())),
        })
        .await?;
        values.push((key.to_owned(), value));
    }
    Ok(values)
}

/// A run of tenant acme, minted by the dispatcher, and the JWT-SVID that run
/// mints for sealed-vault.
async fn run_token(stack: &Stack, pki: &Pki, label: &str) -> anyhow::Result<String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let mut dispatcher =
        IdClient::new(one(pki, &stack.identity_addr, "identity", &pki.dispatcher).await?);
    let svid = dispatcher
        .mint_run_svid(idpb::MintRunSvidRequest {
            tenant: TENANT.into(),
            run_id: format!("run-{label}"),
            csr_der: bytes::Bytes::copy_from_slice(csr.der()),
            ttl: None,
            worker_id: "worker-a".into(),
            pool: String::new(),
        })
        .await?
        .into_inner()
        .svid
        .context("no svid")?;
    let chain = svid
        .cert_chain_der
        .iter()
        .map(|c| CertificateDer::from(c.to_vec()))
        .collect();
    let run = Identity::from_der(
        chain,
        PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        "run",
    )?;
    let mut as_run = IdClient::new(one(pki, &stack.identity_addr, "identity", &run).await?);
    let token = as_run
        .mint_jwt_svid(idpb::MintJwtSvidRequest {
            audience: pki.vault.spiffe_id().to_string(),
            ttl: None,
            spiffe_id: String::new(),
        })
        .await?
        .into_inner()
        .token;
    Ok(token)
}

fn resolve_request(tenant: &str, token: &str) -> pb::ResolveRequest {
    pb::ResolveRequest {
        tenant: tenant.into(),
        run_jwt_svid: token.into(),
        cascade: Some(pb::Cascade {
            system: Some(pb::CascadeLevel {
                profile: Some(pb::ProfileRef {
                    tenant: TENANT.into(),
                    profile: PROFILE.into(),
                }),
                overrides: Default::default(),
            }),
            agent: None,
            run: None,
        }),
        agent: AGENT.into(),
        tool: String::new(),
        keys: Vec::new(),
    }
}

/// One Resolve, before any clock: the values put must come back.
async fn check_resolve(
    stack: &Stack,
    pki: &Pki,
    token: &str,
    values: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let mut c = VaultClient::new(one(pki, &stack.vault_addr, "sealed-vault", &pki.runner).await?);
    let resp = c
        .resolve(resolve_request(TENANT, token))
        .await
        .context("the check Resolve failed")?
        .into_inner();
    ensure!(
        resp.secrets.len() == values.len(),
        "resolved {} secrets, put {}",
        resp.secrets.len(),
        values.len()
    );
    for (s, (k, v)) in resp.secrets.iter().zip(values) {
        ensure!(
            s.key == *k && s.value.as_ref() == v.as_slice(),
            "secret {} did not come back as put",
            s.key
        );
    }
    ensure!(resp.audit_sequence > 0, "no audit sequence");
    Ok(())
}

/// What the services measured from the inside during a phase.
#[derive(Debug, Default, Clone, Copy)]
struct Inside {
    handler: Dist,
    load: Dist,
    append: Dist,
    holdings: Dist,
    revocations: Dist,
}

impl Inside {
    fn take(times: &Times) -> Self {
        Self {
            handler: Dist::of(take(&times.resolve_handler)),
            load: Dist::of(take(&times.load_profile)),
            append: Dist::of(take(&times.audit_append)),
            holdings: Dist::of(take(&times.holdings_commit)),
            revocations: Dist::of(take(&times.revocations_read)),
        }
    }

    fn line(&self) -> String {
        format!(
            "  inside: Resolve handler p50 {} p99 {} · load_profile p50 {} p99 {} · audit Append \
             handler p50 {} p99 {} ({} appends) · holdings commit p50 {} p99 {} ({} batches) · \
             list_revocations p50 {} p99 {}",
            ms(self.handler.p50),
            ms(self.handler.p99),
            ms(self.load.p50),
            ms(self.load.p99),
            ms(self.append.p50),
            ms(self.append.p99),
            self.append.n,
            ms(self.holdings.p50),
            ms(self.holdings.p99),
            self.holdings.n,
            ms(self.revocations.p50),
            ms(self.revocations.p99),
        )
    }
}

/// `n` Resolve calls from `k` sandbox-runner connections, with a fresh run
/// token; the service-side times of the phase with it.
async fn resolve_phase(
    stack: &Stack,
    pki: &Pki,
    label: &str,
    k: u64,
    n: u64,
    phase: Duration,
) -> anyhow::Result<(Run, Inside)> {
    let token = run_token(stack, pki, label).await?;
    let channels = connect_many(pki, &stack.vault_addr, "sealed-vault", &pki.runner, k).await?;
    let clients: Vec<VaultClient> = channels.into_iter().map(VaultClient::new).collect();
    let req = resolve_request(TENANT, &token);
    stack.times.clear();
    let run = drive(clients, n, phase, move |mut c: VaultClient, _| {
        let req = req.clone();
        async move {
            let r = match c.resolve(req).await {
                Ok(resp) if resp.get_ref().secrets.len() == SECRET_KEYS.len() => Ok(()),
                Ok(resp) => Err(format!("resolved {} secrets", resp.get_ref().secrets.len())),
                Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
            };
            (c, r)
        }
    })
    .await;
    Ok((run, Inside::take(&stack.times)))
}

/// Resolve offered at `rate` per second (open loop) over 16 connections.
async fn open_phase(
    stack: &Stack,
    pki: &Pki,
    rate: u64,
    n: u64,
    phase: Duration,
) -> anyhow::Result<(Run, Inside)> {
    let token = run_token(stack, pki, "open").await?;
    let channels = connect_many(pki, &stack.vault_addr, "sealed-vault", &pki.runner, 16).await?;
    let clients: Vec<VaultClient> = channels.into_iter().map(VaultClient::new).collect();
    let req = resolve_request(TENANT, &token);
    stack.times.clear();
    let run = drive_open(clients, rate, n, phase, move |mut c: VaultClient, _| {
        let req = req.clone();
        async move {
            let r = match c.resolve(req).await {
                Ok(resp) if resp.get_ref().secrets.len() == SECRET_KEYS.len() => Ok(()),
                Ok(resp) => Err(format!("resolved {} secrets", resp.get_ref().secrets.len())),
                Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
            };
            (c, r)
        }
    })
    .await;
    Ok((run, Inside::take(&stack.times)))
}

/// The mTLS RPC floor: the same Resolve request with an invalid tenant, which
/// the handler refuses (INVALID_ARGUMENT) before any of its work.
async fn floor_phase(
    stack: &Stack,
    pki: &Pki,
    token: &str,
    k: u64,
    n: u64,
    phase: Duration,
) -> anyhow::Result<Run> {
    let channels = connect_many(pki, &stack.vault_addr, "sealed-vault", &pki.runner, k).await?;
    let clients: Vec<VaultClient> = channels.into_iter().map(VaultClient::new).collect();
    let req = resolve_request("-", token);
    let run = drive(clients, n, phase, move |mut c: VaultClient, _| {
        let req = req.clone();
        async move {
            let r = match c.resolve(req).await {
                Err(s) if s.code() == tonic::Code::InvalidArgument => Ok(()),
                Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
                Ok(_) => Err("an invalid tenant resolved".to_owned()),
            };
            (c, r)
        }
    })
    .await;
    stack.times.clear();
    Ok(run)
}

/// The event Resolve appends for 3 built-in secrets, as the service builds it.
fn resolved_event(i: u64) -> bulkhead_proto::audit::v1::NewEvent {
    audit::event(
        "sealed.credential.resolved",
        TENANT,
        &format!("run-audit-{i:08}"),
        Outcome::Success,
        [
            (
                "keys",
                SECRET_KEYS
                    .iter()
                    .map(|k| format!("{k}@1:{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("backend_request_ids", String::new()),
            (
                "caller",
                format!("spiffe://{TRUST_DOMAIN}/service/sandbox-runner/host-a"),
            ),
            ("agent", AGENT.to_owned()),
        ],
    )
}

/// Audit Append of one Resolve's event, as sealed-vault sends it, alone.
async fn audit_phase(
    stack: &Stack,
    pki: &Pki,
    k: u64,
    n: u64,
    phase: Duration,
) -> anyhow::Result<(Run, Inside)> {
    let channels = connect_many(pki, &stack.audit_addr, "audit", &pki.vault, k).await?;
    let clients: Vec<AuditClient> = channels.into_iter().map(AuditClient::new).collect();
    stack.times.clear();
    let run = drive(clients, n, phase, |c: AuditClient, i| async move {
        let r = c
            .record_one(resolved_event(i))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        (c, r)
    })
    .await;
    Ok((run, Inside::take(&stack.times)))
}

/// `load_profile` of the benchmark's profile from `k` tasks, straight on the store.
async fn load_phase(store: &Arc<dyn SealedStore>, k: u64, n: u64, phase: Duration) -> Run {
    let clients = (0..k).map(|_| store.clone()).collect();
    drive(clients, n, phase, |s: Arc<dyn SealedStore>, _| async move {
        let r = match s.load_profile(TENANT, PROFILE).await {
            Ok(Some(b)) if b.secrets.len() == SECRET_KEYS.len() => Ok(()),
            Ok(_) => Err("profile missing or incomplete".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        (s, r)
    })
    .await
}

/// Mean time of one call of `f` on one core, over `MICRO` calls.
fn cpu_step(mut f: impl FnMut(u32) -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    for i in 0..MICRO / 10 {
        f(i)?;
    }
    let t = Instant::now();
    for i in 0..MICRO {
        f(i)?;
    }
    Ok(t.elapsed() / MICRO)
}

/// The CPU steps of one Resolve, each alone on one core.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    bundle_clone: Duration,
    jwt_validate: Duration,
    decrypt3: Duration,
    fingerprint3: Duration,
    cascade: Duration,
    /// A model of the service's `remember`: one scan of `held_n` entries, each
    /// checked with `Instant::elapsed`, as `held.retain` does on every Resolve.
    held_scan: Duration,
    held_n: usize,
}

async fn cpu_probe(stack: &Stack, pki: &Pki, held_n: usize) -> anyhow::Result<Cpu> {
    let token = run_token(stack, pki, "cpu").await?;
    let mut id = IdClient::new(one(pki, &stack.identity_addr, "identity", &pki.vault).await?);
    let jwks = id
        .get_trust_bundle(idpb::GetTrustBundleRequest::default())
        .await?
        .into_inner()
        .jwt_authorities_jwks;
    let bundle = JwtBundle::from_jwks(&jwks)?;
    let audience = pki.vault.spiffe_id().to_string();
    let revocations = stack.revocations.clone();
    let mut cpu = Cpu {
        held_n,
        ..Cpu::default()
    };
    cpu.bundle_clone = cpu_step(|_| {
        std::hint::black_box(bundle.clone());
        Ok(())
    })?;
    cpu.jwt_validate = cpu_step(|_| {
        jwt::validate(
            &token,
            &bundle,
            &pki.td,
            &audience,
            now_ms() / 1000,
            revocations.as_ref(),
        )?;
        Ok(())
    })?;
    let loaded = stack
        .store
        .load_profile(TENANT, PROFILE)
        .await?
        .context("the profile is missing")?;
    let mut values = Vec::new();
    cpu.decrypt3 = cpu_step(|_| {
        values.clear();
        for v in &loaded.secrets {
            let SecretMaterial::Sealed(sealed) = &v.material else {
                bail!("a secret is not built-in");
            };
            values.push(crypto::open(&stack.master, &v.id.aad(), sealed)?);
        }
        Ok(())
    })?;
    cpu.fingerprint3 = cpu_step(|_| {
        for v in &values {
            std::hint::black_box(audit::fingerprint(&stack.fingerprint_key, v.expose()));
        }
        Ok(())
    })?;
    let levels = vec![Level {
        origin: Origin::System,
        profile: Some(loaded.clone()),
        overrides: Default::default(),
    }];
    cpu.cascade = cpu_step(|_| {
        std::hint::black_box(cascade::apply(&levels));
        Ok(())
    })?;
    let mut held: Vec<Instant> = vec![Instant::now(); held_n];
    let memory = Duration::from_secs(20 * 60);
    let scans = 50;
    let t = Instant::now();
    for _ in 0..scans {
        held.retain(|at| at.elapsed() < memory);
        std::hint::black_box(&held);
    }
    cpu.held_scan = t.elapsed() / scans;
    Ok(cpu)
}

// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Figures {
    phases: Vec<(u64, Run, Inside)>,
    probe: Option<Probe>,
    notes: Vec<String>,
}

#[derive(Debug, Default)]
struct Probe {
    k: u64,
    serial: (Run, Inside),
    loaded: (Run, Inside),
    audit_serial: (Run, Inside),
    audit_loaded: (Run, Inside),
    load_serial: Run,
    load_loaded: Run,
    floor: Run,
    cpu: Cpu,
    audit_tmpfs: Option<(Run, Inside)>,
    both_tmpfs: Option<(Run, Inside)>,
}

/// A fresh stack with the profile written and checked by one Resolve.
async fn ready_stack(
    pki: &Pki,
    audit_dir: Option<&str>,
    vault_dir: Option<&str>,
) -> anyhow::Result<Stack> {
    let stack = start_stack(pki, audit_dir, vault_dir).await?;
    let values = seed(&stack, pki).await?;
    let token = run_token(&stack, pki, "check").await?;
    check_resolve(&stack, pki, &token, &values).await?;
    Ok(stack)
}

async fn probe(pki: &Pki, p: &Params, fig: &mut Figures) -> anyhow::Result<Probe> {
    let k = p.phases.iter().map(|(k, _)| *k).max().unwrap_or(32);
    let n = p.probe;
    let serial_n = (n / 10).max(1);
    let held_n = p.phases.iter().map(|(_, n)| *n).max().unwrap_or(n) as usize;
    println!(
        "\n== where a Resolve's time goes ({k} clients × {n} calls; 1 client × {serial_n}) =="
    );

    let stack = ready_stack(pki, None, None).await?;
    // One client first, while the service's memory of resolved runs is small.
    let serial = resolve_phase(&stack, pki, "probe-serial", 1, serial_n, p.phase).await?;
    println!("{}", serial.0.line("Resolve, 1 client (disk)"));
    println!("{}", serial.1.line());
    let loaded = resolve_phase(&stack, pki, "probe-loaded", k, n, p.phase).await?;
    println!("{}", loaded.0.line(&format!("Resolve, {k} clients (disk)")));
    println!("{}", loaded.1.line());
    let audit_serial = audit_phase(&stack, pki, 1, serial_n, p.phase).await?;
    println!("{}", audit_serial.0.line("audit Append alone, 1 client"));
    println!("{}", audit_serial.1.line());
    let audit_loaded = audit_phase(&stack, pki, k, n, p.phase).await?;
    println!(
        "{}",
        audit_loaded
            .0
            .line(&format!("audit Append alone, {k} clients"))
    );
    println!("{}", audit_loaded.1.line());
    let load_serial = load_phase(&stack.store, 1, serial_n, p.phase).await;
    println!("{}", load_serial.line("load_profile alone, 1 task"));
    let load_loaded = load_phase(&stack.store, k, n, p.phase).await;
    println!(
        "{}",
        load_loaded.line(&format!("load_profile alone, {k} tasks"))
    );
    let token = run_token(&stack, pki, "probe-floor").await?;
    let floor = floor_phase(&stack, pki, &token, k, n, p.phase).await?;
    println!(
        "{}",
        floor.line(&format!(
            "Resolve refused at once (mTLS RPC floor), {k} clients"
        ))
    );
    let cpu = cpu_probe(&stack, pki, held_n).await?;
    println!(
        "cpu, one core: JwtBundle clone {} · jwt::validate {} · 3 × crypto::open {} · 3 × \
         fingerprint {} · cascade::apply {} · held-list scan of {} entries (model) {}",
        us(cpu.bundle_clone),
        us(cpu.jwt_validate),
        us(cpu.decrypt3),
        us(cpu.fingerprint3),
        us(cpu.cascade),
        cpu.held_n,
        us(cpu.held_scan)
    );
    stack.shutdown().await?;

    let mut pr = Probe {
        k,
        serial,
        loaded,
        audit_serial,
        audit_loaded,
        load_serial,
        load_loaded,
        floor,
        cpu,
        ..Probe::default()
    };
    if Path::new(TMPFS).is_dir() {
        for (label, vault) in [
            ("audit db on tmpfs", None),
            ("both dbs on tmpfs", Some(TMPFS)),
        ] {
            let stack = ready_stack(pki, Some(TMPFS), vault).await?;
            let r = resolve_phase(&stack, pki, "probe-tmpfs", k, n, p.phase).await?;
            println!("{}", r.0.line(&format!("Resolve, {k} clients ({label})")));
            println!("{}", r.1.line());
            stack.shutdown().await?;
            if vault.is_none() {
                pr.audit_tmpfs = Some(r);
            } else {
                pr.both_tmpfs = Some(r);
            }
        }
    } else {
        fig.notes
            .push(format!("{TMPFS} is missing: the tmpfs runs were skipped"));
    }
    Ok(pr)
}

fn report(fig: &Figures) {
    const GOAL_RATE: f64 = 2000.0;
    const GOAL_P99: Duration = Duration::from_millis(5);
    println!("\n== summary (markdown) ==\n");
    println!(
        "| phase | clients | calls | resolves/s | vs goal 2,000/s | p50 | p99 | vs goal p99 ≤ 5 ms | max | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (k, r, _) in &fig.phases {
        println!(
            "| Resolve (audit included) | {k} | {} | {} | {:.2}× {} | {} | {} | {} | {} | {} |",
            r.calls,
            per_sec(r.rate()),
            r.rate() / GOAL_RATE,
            if r.rate() >= GOAL_RATE { "✅" } else { "❌" },
            ms(r.p50),
            ms(r.p99),
            if r.p99 <= GOAL_P99 { "✅" } else { "❌" },
            ms(r.max),
            r.errors
        );
    }
    println!(
        "\n| inside the services | clients | Resolve handler p50 / p99 | `load_profile` p50 / p99 | audit Append handler p50 / p99 |"
    );
    println!("|---|---:|---:|---:|---:|");
    let inside = |what: &str, k: u64, i: &Inside| {
        println!(
            "| {what} | {k} | {} / {} | {} / {} | {} / {} |",
            ms(i.handler.p50),
            ms(i.handler.p99),
            ms(i.load.p50),
            ms(i.load.p99),
            ms(i.append.p50),
            ms(i.append.p99)
        );
    };
    for (k, _, i) in &fig.phases {
        inside("Resolve phase", *k, i);
    }
    if let Some((k, r, _)) = fig.phases.iter().max_by_key(|(_, r, _)| r.calls) {
        println!(
            "\n| the {}-client phase in quarters (by start) | resolves/s | p50 | p99 |",
            k
        );
        println!("|---|---:|---:|---:|");
        for (i, (rt, p50, p99)) in r.slices(4).iter().enumerate() {
            println!(
                "| quarter {} | {} | {} | {} |",
                i + 1,
                per_sec(*rt),
                ms(*p50),
                ms(*p99)
            );
        }
    }
    if let Some(pr) = &fig.probe {
        println!("\n| where a Resolve's time goes | calls/s | p50 | p99 | mean |");
        println!("|---|---:|---:|---:|---:|");
        let line = |what: &str, r: &Run| {
            println!(
                "| {what} | {} | {} | {} | {} |",
                per_sec(r.rate()),
                ms(r.p50),
                ms(r.p99),
                ms(r.mean)
            );
        };
        let within = |what: &str, d: &Dist| {
            println!(
                "| — {what} | | {} | {} | {} |",
                ms(d.p50),
                ms(d.p99),
                ms(d.mean)
            );
        };
        for (k, (r, i)) in [(1, &pr.serial), (pr.k, &pr.loaded)] {
            line(&format!("Resolve, {k} client(s), dbs on disk"), r);
            within("inside: Resolve handler", &i.handler);
            within("inside: `load_profile`", &i.load);
            within("inside: audit Append handler", &i.append);
        }
        line("audit Append alone, 1 client", &pr.audit_serial.0);
        within("inside: audit Append handler", &pr.audit_serial.1.append);
        line(
            &format!("audit Append alone, {} clients", pr.k),
            &pr.audit_loaded.0,
        );
        within("inside: audit Append handler", &pr.audit_loaded.1.append);
        line("`load_profile` alone, 1 task", &pr.load_serial);
        line(
            &format!("`load_profile` alone, {} tasks", pr.k),
            &pr.load_loaded,
        );
        line(
            &format!("Resolve refused at once (mTLS RPC floor), {} clients", pr.k),
            &pr.floor,
        );
        for (what, r) in [
            ("Resolve, audit db on tmpfs", &pr.audit_tmpfs),
            ("Resolve, both dbs on tmpfs", &pr.both_tmpfs),
        ] {
            if let Some((r, i)) = r {
                line(&format!("{what}, {} clients", pr.k), r);
                within("inside: audit Append handler", &i.append);
            }
        }
        let c = &pr.cpu;
        println!("\n| CPU on one core, per Resolve | time |");
        println!("|---|---:|");
        for (what, d) in [
            (
                "`JwtBundle` clone (the service clones the cached bundle)",
                c.bundle_clone,
            ),
            (
                "`jwt::validate` (ES256 verify, claims, revocation list)",
                c.jwt_validate,
            ),
            ("3 × `crypto::open` (unwrap data key, decrypt)", c.decrypt3),
            ("3 × HMAC fingerprint", c.fingerprint3),
            ("`cascade::apply`, one level", c.cascade),
        ] {
            println!("| {what} | {} |", us(d));
        }
        println!(
            "| model of `remember`'s `held.retain`: one scan of {} entries | {} |",
            c.held_n,
            us(c.held_scan)
        );

        // Means add up where percentiles do not: one Resolve with nothing queued.
        let (r, i) = &pr.serial;
        let audit_rtt = pr.audit_serial.0.mean;
        let audit_handler = pr.audit_serial.1.append.mean;
        let cpu = c.bundle_clone + c.jwt_validate + c.decrypt3 + c.fingerprint3 + c.cascade;
        let rest = i
            .handler
            .mean
            .saturating_sub(i.load.mean + i.append.mean + audit_rtt.saturating_sub(audit_handler))
            .saturating_sub(cpu);
        println!("\n| one Resolve, 1 client, means | time | share |");
        println!("|---|---:|---:|");
        let share = |d: Duration| {
            format!(
                "{:.0} %",
                100.0 * d.as_secs_f64() / r.mean.as_secs_f64().max(1e-9)
            )
        };
        for (what, d) in [
            ("Resolve as the client sees it", r.mean),
            (
                "— outside the handler: mTLS, HTTP/2, authorization, scheduling",
                r.mean.saturating_sub(i.handler.mean),
            ),
            ("— `load_profile` (inside)", i.load.mean),
            (
                "— audit Append: the audit handler (group commit, fsync) (inside)",
                i.append.mean,
            ),
            (
                "— audit Append: its round trip beyond the handler (from the Append-alone run)",
                audit_rtt.saturating_sub(audit_handler),
            ),
            ("— CPU: JWT, decrypt, fingerprints, cascade (alone)", cpu),
            ("— the rest of the handler (by difference)", rest),
        ] {
            println!("| {what} | {} | {} |", ms(d), share(d));
        }
    }
    for n in &fig.notes {
        println!("note: {n}");
    }
}

async fn run() -> anyhow::Result<()> {
    bulkhead_mesh::tls::install_crypto_provider();
    let p = Params::from_env()?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "sealed-vault resolve bench: {} cores, load {}, phases {:?} (clients, resolves), probe {}, \
         phase deadline {:?}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        p.phases,
        p.probe,
        p.phase
    );
    let pki = pki()?;
    let mut fig = Figures::default();
    for (i, (k, n)) in p.phases.iter().copied().enumerate() {
        let stack = ready_stack(&pki, None, None).await?;
        println!("\n== Resolve: {k} sandbox-runner clients, {n} resolves ==");
        let (r, inside) = resolve_phase(&stack, &pki, &format!("p{i}"), k, n, p.phase).await?;
        println!("{}", r.line("resolve"));
        println!("{}", inside.line());
        for (q, (rt, p50, p99)) in r.slices(4).iter().enumerate() {
            println!(
                "  quarter {}: {}/s p50 {} p99 {}",
                q + 1,
                per_sec(*rt),
                ms(*p50),
                ms(*p99)
            );
        }
        if r.timed_out {
            fig.notes.push(format!(
                "{k} clients: stopped at the phase deadline after {} resolves",
                r.calls
            ));
        }
        fig.phases.push((k, r, inside));
        stack.shutdown().await?;
    }
    if let Some((rate, n)) = p.open {
        let stack = ready_stack(&pki, None, None).await?;
        println!("\n== Resolve, open loop: {rate}/s offered, {n} resolves ==");
        let (r, inside) = open_phase(&stack, &pki, rate, n, p.phase).await?;
        println!("{}", r.line(&format!("resolve at {rate}/s offered")));
        println!("{}", inside.line());
        for (q, (rt, p50, p99)) in r.slices(4).iter().enumerate() {
            println!(
                "  quarter {}: {}/s p50 {} p99 {}",
                q + 1,
                per_sec(*rt),
                ms(*p50),
                ms(*p99)
            );
        }
        if r.calls == 0 {
            bail!("the open-loop phase resolved nothing");
        }
        stack.shutdown().await?;
    }
    if p.probe > 0 {
        let pr = probe(&pki, &p, &mut fig).await?;
        fig.probe = Some(pr);
    }
    report(&fig);
    if fig.phases.iter().any(|(_, r, _)| r.calls == 0) {
        bail!("a phase resolved nothing");
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
