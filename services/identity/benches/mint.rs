//! The identity benchmark: a program (harness = false), not a timed test.
//!
//! Identity and audit run in-process, each the mesh server with its real
//! handlers, authorization table and SQLite store in a temp dir on disk
//! (WAL, synchronous=FULL); identity records every mint in audit through the
//! shared AuditClient over mTLS, as it does in production.
//!
//! 1. MintRunSvid: K concurrent dispatcher clients (one mTLS connection each,
//!    `spiffe://…/service/dispatcher`) mint N run X.509-SVIDs over
//!    pre-generated P-256 CSRs; mints/s and latency p50/p99, for each (K, N).
//! 2. MintJwtSvid: K run identities (SVIDs minted in 1, with their keys) ask
//!    for JWT-SVIDs for one audience; tokens/s, p50/p99.
//! 3. Where a mint's time goes: the store calls timed inside the service
//!    (a wrapper around the real SQLite store), the disk's fsync, the CPU
//!    steps alone (CSR check, signing), the audit Append round trip alone, an
//!    mTLS unary RPC alone, and the mint again with audit's and then
//!    identity's database on tmpfs (/dev/shm), where fsync costs nothing.
//!
//! `cargo bench -p bulkhead-identity --bench mint`. Sizes come from the
//! environment: MINT_BENCH_PHASES ("8:5000,32:20000": clients:mints per
//! phase), MINT_BENCH_JWTS (20000), MINT_BENCH_JWT_CLIENTS (32),
//! MINT_BENCH_PROBE (10000: mints per "where the time goes" phase; 0 skips
//! them), MINT_BENCH_PHASE_SECS (120: every phase stops there, and says so).
//! Every loop is bounded by its count and by the phase deadline.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bulkhead_audit::checkpoint::Signer;
use bulkhead_audit::log::{Log, LogConfig};
use bulkhead_identity::csr;
use bulkhead_identity::keys::JwtKeys;
use bulkhead_identity::service::{self, AuditDenials, IdentityApi, Limits, Parts};
use bulkhead_identity::store::{
    self, IdentityStore, IssuedRow, JoinTokenRow, ListChange, RevocationRow, StoreError,
    TokenRefusal,
};
use bulkhead_mesh::audit::{self, AuditClient, Outcome};
use bulkhead_mesh::jwt::{Audience, Claims};
use bulkhead_mesh::pki::{Ca, SvidOptions};
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::spiffe::TrustDomain;
use bulkhead_mesh::tls::{ClientAuth, ExpectServer, Identity, TrustBundle};
use bulkhead_proto::identity::v1 as pb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bytes::Bytes;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const TRUST_DOMAIN: &str = "bulkhead.bench";
const TENANTS: u64 = 16;
const WORKERS: u64 = 64;
/// Where fsync costs nothing: the "no durable commit" probes put databases here.
const TMPFS: &str = "/dev/shm";
/// Iterations of the single-step CPU and fsync probes.
const MICRO: u32 = 1000;
const FSYNCS: u32 = 200;

type Client = IdentityServiceClient<bulkhead_mesh::client::MeshChannel>;

#[derive(Debug, Clone)]
struct Params {
    phases: Vec<(u64, u64)>,
    jwts: u64,
    jwt_clients: u64,
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
        let spec = std::env::var("MINT_BENCH_PHASES").unwrap_or_else(|_| "8:5000,32:20000".into());
        let mut phases = Vec::new();
        for p in spec.split(',').filter(|p| !p.is_empty()) {
            let (k, n) = p
                .split_once(':')
                .with_context(|| format!("MINT_BENCH_PHASES: {p:?} is not clients:mints"))?;
            phases.push((k.trim().parse::<u64>()?.max(1), n.trim().parse::<u64>()?));
        }
        ensure!(!phases.is_empty(), "MINT_BENCH_PHASES names no phase");
        Ok(Self {
            phases,
            jwts: env_u64("MINT_BENCH_JWTS", 20_000)?,
            jwt_clients: env_u64("MINT_BENCH_JWT_CLIENTS", 32)?.max(1),
            probe: env_u64("MINT_BENCH_PROBE", 10_000)?,
            phase: Duration::from_secs(env_u64("MINT_BENCH_PHASE_SECS", 120)?),
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
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
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

/// Throughput and latency of one phase of calls.
#[derive(Debug, Default, Clone)]
struct Run {
    calls: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    timed_out: bool,
}

impl Run {
    fn from_latencies(mut all: Vec<Duration>, elapsed: Duration) -> Self {
        all.sort();
        Self {
            calls: all.len() as u64,
            elapsed,
            p50: percentile(&all, 0.50),
            p99: percentile(&all, 0.99),
            max: all.last().copied().unwrap_or_default(),
            ..Self::default()
        }
    }

    fn rate(&self) -> f64 {
        rate(self.calls, self.elapsed)
    }

    fn line(&self, what: &str) -> String {
        let mut s = format!(
            "{what}: {} in {:.2} s = {}/s; p50 {} p99 {} max {}",
            self.calls,
            self.elapsed.as_secs_f64(),
            per_sec(self.rate()),
            ms(self.p50),
            ms(self.p99),
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
}

/// Runs `n` calls of `call(client, i)` from one task per client, each taking
/// the next index until `n` or the deadline; latencies of the successful calls.
async fn drive<C, F, Fut>(clients: Vec<C>, n: u64, phase: Duration, call: F) -> Run
where
    C: Send + 'static,
    F: Fn(C, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = (C, Result<(), String>)> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + phase;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for client in clients {
        let (next, call) = (next.clone(), call.clone());
        tasks.spawn(async move {
            let mut client = client;
            let mut lat = Vec::new();
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
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (lat, errors, first_error, timed_out)
        });
    }
    let mut all = Vec::new();
    let (mut errors, mut first_error, mut timed_out) = (0, None, false);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((lat, e, fe, to)) => {
                all.extend(lat);
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
        ..Run::from_latencies(all, elapsed)
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
    dispatcher: Identity,
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
        dispatcher: issue("service/dispatcher", SvidOptions::default())?,
        ca_cert: ca.cert_pem().to_owned(),
        ca_key,
        td,
    })
}

/// Latencies of the store calls a mint makes, taken inside the service.
#[derive(Debug, Default)]
struct StoreTimes {
    put_issued: Mutex<Vec<Duration>>,
    run_worker: Mutex<Vec<Duration>>,
}

impl StoreTimes {
    fn take(m: &Mutex<Vec<Duration>>) -> Vec<Duration> {
        std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn push(m: &Mutex<Vec<Duration>>, d: Duration) {
        m.lock().unwrap_or_else(|p| p.into_inner()).push(d);
    }
}

/// The real store, with the calls on a mint's path timed.
#[derive(Debug)]
struct Timed {
    inner: Arc<dyn IdentityStore>,
    times: Arc<StoreTimes>,
}

#[async_trait::async_trait]
impl IdentityStore for Timed {
    async fn put_join_token(&self, t: &JoinTokenRow) -> Result<(), StoreError> {
        self.inner.put_join_token(t).await
    }
    async fn get_join_token(&self, token_id: &str) -> Result<Option<JoinTokenRow>, StoreError> {
        self.inner.get_join_token(token_id).await
    }
    async fn list_join_tokens(
        &self,
        tenant: &str,
        pool: &str,
        include_inactive: bool,
        now_ms: i64,
        after_token_id: &str,
        limit: u32,
    ) -> Result<Vec<JoinTokenRow>, StoreError> {
        self.inner
            .list_join_tokens(
                tenant,
                pool,
                include_inactive,
                now_ms,
                after_token_id,
                limit,
            )
            .await
    }
    async fn revoke_join_token(
        &self,
        token_id: &str,
        now_ms: i64,
    ) -> Result<Option<JoinTokenRow>, StoreError> {
        self.inner.revoke_join_token(token_id, now_ms).await
    }
    async fn use_join_token(
        &self,
        token_id: &str,
        secret_hash: &[u8; 32],
        now_ms: i64,
    ) -> Result<Result<JoinTokenRow, TokenRefusal>, StoreError> {
        self.inner
            .use_join_token(token_id, secret_hash, now_ms)
            .await
    }
    async fn release_join_token_use(&self, token_id: &str) -> Result<(), StoreError> {
        self.inner.release_join_token_use(token_id).await
    }
    async fn put_issued(&self, row: &IssuedRow) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.put_issued(row).await;
        StoreTimes::push(&self.times.put_issued, t.elapsed());
        r
    }
    async fn put_issued_many(&self, rows: &[IssuedRow]) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = self.inner.put_issued_many(rows).await;
        StoreTimes::push(&self.times.put_issued, t.elapsed());
        r
    }
    async fn runs_of_worker(
        &self,
        worker_id: &str,
        now_ms: i64,
    ) -> Result<Vec<IssuedRow>, StoreError> {
        self.inner.runs_of_worker(worker_id, now_ms).await
    }
    async fn max_not_after(&self, spiffe_id_prefix: &str) -> Result<Option<i64>, StoreError> {
        self.inner.max_not_after(spiffe_id_prefix).await
    }
    async fn run_worker(&self, run_id: &str) -> Result<Option<String>, StoreError> {
        let t = Instant::now();
        let r = self.inner.run_worker(run_id).await;
        StoreTimes::push(&self.times.run_worker, t.elapsed());
        r
    }
    async fn find_issued(&self, kind: &str, id: &str) -> Result<Option<IssuedRow>, StoreError> {
        self.inner.find_issued(kind, id).await
    }
    async fn add_revocation(&self, row: &RevocationRow) -> Result<u64, StoreError> {
        self.inner.add_revocation(row).await
    }
    async fn expire_revocations(&self, now_ms: i64) -> Result<Vec<ListChange>, StoreError> {
        self.inner.expire_revocations(now_ms).await
    }
    async fn revocations(&self) -> Result<(Vec<RevocationRow>, u64), StoreError> {
        self.inner.revocations().await
    }
    async fn changes_since(&self, after: u64) -> Result<Option<Vec<ListChange>>, StoreError> {
        self.inner.changes_since(after).await
    }
}

/// Audit and identity, in-process, serving on loopback.
struct Stack {
    identity_addr: String,
    audit_addr: String,
    times: Arc<StoreTimes>,
    stop: CancellationToken,
    servers: Vec<tokio::task::JoinHandle<Result<(), bulkhead_mesh::server::ServeError>>>,
    _dirs: Vec<tempfile::TempDir>,
}

fn temp_in(parent: Option<&str>) -> anyhow::Result<tempfile::TempDir> {
    let b = tempfile::Builder::new()
        .prefix("bulkhead-identity-bench-")
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

/// Starts audit with its database under `audit_dir` and identity with its
/// database under `identity_dir` (None: the system temp dir, on disk).
async fn start_stack(
    pki: &Pki,
    audit_dir: Option<&str>,
    identity_dir: Option<&str>,
) -> anyhow::Result<Stack> {
    let stop = CancellationToken::new();
    let adir = temp_in(audit_dir)?;
    let idir = temp_in(identity_dir)?;

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
            bulkhead_audit::service::server(api),
            bulkhead_audit::service::POLICY,
        )
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let audit_addr = bound.local_addr().to_string();
    let audit_serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));

    // Identity, put together as its main.rs does.
    let audit_client = AuditClient::new(bulkhead_mesh::client::channel(
        &audit_addr,
        Some(&pki.identity),
        &pki.bundle,
        ExpectServer::Service("audit".into()),
    )?);
    let times = Arc::new(StoreTimes::default());
    let real = store::open(&format!(
        "sqlite://{}",
        idir.path().join("identity.db").display()
    ))
    .await
    .context("failed to open the identity store")?;
    let store: Arc<dyn IdentityStore> = Arc::new(Timed {
        inner: real,
        times: times.clone(),
    });
    let keys = JwtKeys::load_or_create(&idir.path().join("jwt-keys.json"), 86_400, 900, now_ms())?;
    let server = MeshServer::new("identity", pki.identity.clone(), pki.bundle.clone())
        .client_auth(ClientAuth::Optional);
    let api = IdentityApi::start(
        Parts {
            ca: Ca::load(&pki.ca_cert, &pki.ca_key)?,
            authorities: pki.bundle.authorities().to_vec(),
            store,
            keys: Arc::new(keys),
            audit: audit_client.clone(),
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
        .denials(Arc::new(AuditDenials::new(audit_client)))
        .add_service(service::server(api), service::POLICY)
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let identity_addr = bound.local_addr().to_string();
    let identity_serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));
    Ok(Stack {
        identity_addr,
        audit_addr,
        times,
        stop,
        servers: vec![audit_serving, identity_serving],
        _dirs: vec![adir, idir],
    })
}

impl Stack {
    async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        for s in self.servers {
            s.await??;
        }
        Ok(())
    }

    /// `k` connections as `who`, handshakes done.
    async fn clients(&self, pki: &Pki, who: &Identity, k: u64) -> anyhow::Result<Vec<Client>> {
        let mut out = Vec::new();
        for _ in 0..k {
            let ch = bulkhead_mesh::client::connect(
                &self.identity_addr,
                Some(who),
                &pki.bundle,
                ExpectServer::Service("identity".into()),
            )
            .await?;
            out.push(IdentityServiceClient::new(ch));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// Workloads.

/// A run's key and the CSR a worker would send for it.
struct RunKey {
    csr: Bytes,
    key_der: Vec<u8>,
}

/// `n` P-256 keys and CSRs, made on every core before any clock starts.
async fn run_keys(n: u64) -> anyhow::Result<Arc<Vec<RunKey>>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let mut tasks = JoinSet::new();
    for t in 0..threads {
        let count = n / threads + u64::from(t < n % threads);
        tasks.spawn_blocking(move || -> anyhow::Result<Vec<RunKey>> {
            (0..count)
                .map(|_| {
                    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
                    Ok(RunKey {
                        csr: Bytes::copy_from_slice(csr.der()),
                        key_der: key.serialize_der(),
                    })
                })
                .collect()
        });
    }
    let mut keys = Vec::new();
    while let Some(r) = tasks.join_next().await {
        keys.extend(r??);
    }
    Ok(Arc::new(keys))
}

fn mint_request(phase: &str, i: u64, csr: Bytes) -> pb::MintRunSvidRequest {
    pb::MintRunSvidRequest {
        tenant: format!("tenant-{}", i % TENANTS),
        run_id: format!("run-{phase}-{i:08}"),
        csr_der: csr,
        ttl: None,
        worker_id: format!("worker-{}", i % WORKERS),
        pool: String::new(),
    }
}

/// `n` MintRunSvid calls from `k` dispatcher connections.
async fn mint_phase(
    stack: &Stack,
    pki: &Pki,
    keys: &Arc<Vec<RunKey>>,
    label: &str,
    k: u64,
    n: u64,
    phase: Duration,
) -> anyhow::Result<Run> {
    let clients = stack.clients(pki, &pki.dispatcher, k).await?;
    let (keys, label) = (keys.clone(), label.to_owned());
    Ok(drive(clients, n, phase, move |mut c: Client, i| {
        let req = mint_request(&label, i, keys[(i as usize) % keys.len()].csr.clone());
        async move {
            let r = c
                .mint_run_svid(req)
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()));
            (c, r)
        }
    })
    .await)
}

/// Open loop: MintRunSvid offered at `rate` per second for `secs` seconds
/// (bounded: rate × secs calls), spread over `k` connections. Unlike the
/// closed-loop phases, latency here is not inflated by callers queueing
/// behind each other: it is what a caller sees at that load.
async fn paced_phase(
    stack: &Stack,
    pki: &Pki,
    keys: &Arc<Vec<RunKey>>,
    rate: u64,
    secs: u64,
    k: u64,
) -> anyhow::Result<Run> {
    let clients = stack.clients(pki, &pki.dispatcher, k).await?;
    let n = rate * secs;
    let lat = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n as usize)));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..n {
        tick.tick().await;
        let mut c = clients[(i % k) as usize].clone();
        let req = mint_request("paced", i, keys[(i as usize) % keys.len()].csr.clone());
        let (lat, errors) = (lat.clone(), errors.clone());
        tasks.spawn(async move {
            let t = Instant::now();
            match c.mint_run_svid(req).await {
                Ok(_) => lat.lock().expect("lock").push(t.elapsed()),
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    let all = std::mem::take(&mut *lat.lock().expect("lock"));
    Ok(Run {
        errors: errors.load(Ordering::Relaxed),
        ..Run::from_latencies(all, elapsed)
    })
}

/// Mints one run SVID per client and dials identity as that run.
async fn run_clients(
    stack: &Stack,
    pki: &Pki,
    keys: &[RunKey],
    k: u64,
) -> anyhow::Result<Vec<Client>> {
    let mut dispatcher = stack
        .clients(pki, &pki.dispatcher, 1)
        .await?
        .pop()
        .context("no client")?;
    let mut out = Vec::new();
    for i in 0..k {
        let key = &keys[i as usize % keys.len()];
        let svid = dispatcher
            .mint_run_svid(mint_request("jwt", i, key.csr.clone()))
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
            PrivatePkcs8KeyDer::from(key.key_der.clone()).into(),
            "run",
        )?;
        out.extend(stack.clients(pki, &run, 1).await?);
    }
    Ok(out)
}

async fn jwt_phase(clients: Vec<Client>, n: u64, phase: Duration) -> Run {
    let audience = format!("spiffe://{TRUST_DOMAIN}/service/sealed-vault");
    drive(clients, n, phase, move |mut c: Client, _| {
        let audience = audience.clone();
        async move {
            let r = c
                .mint_jwt_svid(pb::MintJwtSvidRequest {
                    audience,
                    ttl: None,
                    spiffe_id: String::new(),
                })
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()));
            (c, r)
        }
    })
    .await
}

/// Audit Append of one mint-sized event, as identity sends it, alone.
async fn audit_phase(
    stack: &Stack,
    pki: &Pki,
    k: u64,
    n: u64,
    phase: Duration,
) -> anyhow::Result<Run> {
    let mut clients = Vec::new();
    for _ in 0..k {
        let ch = bulkhead_mesh::client::connect(
            &stack.audit_addr,
            Some(&pki.identity),
            &pki.bundle,
            ExpectServer::Service("audit".into()),
        )
        .await?;
        clients.push(AuditClient::new(ch));
    }
    Ok(drive(clients, n, phase, |c: AuditClient, i| async move {
        let event = audit::event(
            "identity.run_minted",
            &format!("tenant-{}", i % TENANTS),
            &format!("run-audit-{i:08}"),
            Outcome::Success,
            [
                (
                    "spiffe_id",
                    format!(
                        "spiffe://{TRUST_DOMAIN}/tenant/tenant-{}/run/run-audit-{i:08}",
                        i % TENANTS
                    ),
                ),
                ("worker_id", format!("worker-{}", i % WORKERS)),
                ("ttl_secs", "900".to_owned()),
            ],
        );
        let r = c
            .record_one(event)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        (c, r)
    })
    .await)
}

/// An mTLS unary RPC that touches neither store nor audit: the floor.
async fn rpc_phase(
    stack: &Stack,
    pki: &Pki,
    k: u64,
    n: u64,
    phase: Duration,
) -> anyhow::Result<Run> {
    let clients = stack.clients(pki, &pki.dispatcher, k).await?;
    Ok(drive(clients, n, phase, |mut c: Client, _| async move {
        let r = c
            .get_trust_bundle(pb::GetTrustBundleRequest {})
            .await
            .map(|_| ())
            .map_err(|s| s.to_string());
        (c, r)
    })
    .await)
}

/// `put_issued` of run rows from `k` tasks, straight on the store.
async fn put_phase(db: &Arc<dyn IdentityStore>, k: u64, n: u64, phase: Duration) -> Run {
    let clients = (0..k).map(|_| db.clone()).collect();
    drive(
        clients,
        n,
        phase,
        move |db: Arc<dyn IdentityStore>, i| async move {
            let row = IssuedRow {
                serial: format!("{k:04x}{i:028x}"),
                spiffe_id: format!(
                    "spiffe://{TRUST_DOMAIN}/tenant/tenant-{}/run/run-put-{k}-{i:08}",
                    i % TENANTS
                ),
                kind: "run".into(),
                tenant: format!("tenant-{}", i % TENANTS),
                pool: String::new(),
                worker_id: format!("worker-{}", i % WORKERS),
                run_id: format!("run-put-{k}-{i:08}"),
                not_after_ms: now_ms() + 900_000,
                issued_at_ms: now_ms(),
            };
            let r = db.put_issued(&row).await.map_err(|e| e.to_string());
            (db, r)
        },
    )
    .await
}

/// Per-call time of a CPU step on one core (mean of `MICRO` calls).
fn cpu_step(mut f: impl FnMut(u32) -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let t = Instant::now();
    for i in 0..MICRO {
        f(i)?;
    }
    Ok(t.elapsed() / MICRO)
}

/// Latency of a small write made durable with fdatasync, in `dir`.
fn fsync_latency(dir: &Path) -> anyhow::Result<Run> {
    use std::io::Write as _;
    let path = dir.join("fsync.probe");
    let mut f = std::fs::File::create(&path)?;
    let block = [0x5a_u8; 4096];
    let mut lat = Vec::new();
    let start = Instant::now();
    for _ in 0..FSYNCS {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        lat.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    std::fs::remove_file(&path)?;
    Ok(Run::from_latencies(lat, elapsed))
}

// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Figures {
    mints: Vec<(u64, Run)>,
    jwt: Option<(u64, Run)>,
    probe: Option<Probe>,
    notes: Vec<String>,
}

#[derive(Debug, Default)]
struct Probe {
    k: u64,
    baseline: Run,
    put_issued: Run,
    /// `put_issued` straight on a fresh store: from one task, then from `k`.
    put_alone_serial: Run,
    put_alone_concurrent: Run,
    run_worker: Run,
    fsync: Run,
    csr_accept: Duration,
    sign_spki: Duration,
    jwt_sign: Duration,
    audit_alone: Run,
    rpc_alone: Run,
    audit_tmpfs: Option<Run>,
    identity_tmpfs: Option<Run>,
    both_tmpfs: Option<Run>,
}

async fn probe(
    pki: &Pki,
    keys: &Arc<Vec<RunKey>>,
    p: &Params,
    fig: &mut Figures,
) -> anyhow::Result<Probe> {
    let k = p.phases.iter().map(|(k, _)| *k).max().unwrap_or(32);
    let n = p.probe;
    let mut pr = Probe {
        k,
        ..Probe::default()
    };
    println!("\n== where a mint's time goes ({k} clients, {n} mints per run) ==");

    // The mint with the store's calls timed inside the service.
    let stack = start_stack(pki, None, None).await?;
    pr.baseline = mint_phase(&stack, pki, keys, "probe", k, n, p.phase).await?;
    println!("{}", pr.baseline.line("mint (disk)"));
    let el = pr.baseline.elapsed;
    pr.put_issued = Run::from_latencies(StoreTimes::take(&stack.times.put_issued), el);
    pr.run_worker = Run::from_latencies(StoreTimes::take(&stack.times.run_worker), el);
    println!(
        "  inside: put_issued (INSERT + commit, synchronous=FULL) p50 {} p99 {}; run_worker \
         (SELECT) p50 {} p99 {}",
        ms(pr.put_issued.p50),
        ms(pr.put_issued.p99),
        ms(pr.run_worker.p50),
        ms(pr.run_worker.p99)
    );
    pr.audit_alone = audit_phase(&stack, pki, k, n, p.phase).await?;
    println!(
        "{}",
        pr.audit_alone.line("audit Append alone (1 event/call)")
    );
    pr.rpc_alone = rpc_phase(&stack, pki, k, n.saturating_mul(2), p.phase).await?;
    println!(
        "{}",
        pr.rpc_alone.line("GetTrustBundle alone (mTLS RPC floor)")
    );
    stack.shutdown().await?;

    // The commit alone, straight on the store: one writer at a time, then k
    // at once (the pool's 4 connections contending for SQLite's write lock).
    let disk = temp_in(None)?;
    let db = store::open(&format!(
        "sqlite://{}",
        disk.path().join("identity.db").display()
    ))
    .await?;
    for conc in [1, k] {
        let r = put_phase(&db, conc, n / 2, p.phase).await;
        println!(
            "{}",
            r.line(&format!("put_issued alone, {conc} concurrent, on disk"))
        );
        if conc == 1 {
            pr.put_alone_serial = r;
        } else {
            pr.put_alone_concurrent = r;
        }
    }
    pr.fsync = fsync_latency(disk.path())?;
    println!(
        "fsync (4 KiB write + fdatasync, {} in a row, on the temp dir's disk): p50 {} p99 {} = {}/s",
        FSYNCS,
        ms(pr.fsync.p50),
        ms(pr.fsync.p99),
        per_sec(pr.fsync.rate())
    );

    // CPU steps, one core.
    let ca = Ca::load(&pki.ca_cert, &pki.ca_key)?;
    let spkis: Vec<Vec<u8>> = keys
        .iter()
        .take(MICRO as usize)
        .map(|k| csr::accept(&k.csr))
        .collect::<Result<_, _>>()?;
    pr.csr_accept = cpu_step(|i| {
        csr::accept(&keys[i as usize % keys.len()].csr)?;
        Ok(())
    })?;
    let opts = SvidOptions {
        ttl: time::Duration::minutes(15),
        ..SvidOptions::default()
    };
    pr.sign_spki = cpu_step(|i| {
        let id = pki
            .td
            .join(["tenant", "tenant-0", "run", &format!("run-cpu-{i}")])?;
        ca.sign_spki(&id, &spkis[i as usize % spkis.len()], &opts)?;
        Ok(())
    })?;
    let jwt_dir = temp_in(None)?;
    let jwt_keys = JwtKeys::load_or_create(&jwt_dir.path().join("k.json"), 86_400, 900, now_ms())?;
    pr.jwt_sign = cpu_step(|i| {
        jwt_keys.sign(&Claims {
            sub: format!("spiffe://{TRUST_DOMAIN}/tenant/t/run/r{i}"),
            aud: Some(Audience::One(
                "spiffe://bulkhead.bench/service/sealed-vault".into(),
            )),
            exp: Some(now_ms() / 1000 + 300),
            iat: Some(now_ms() / 1000),
            jti: Some(format!("{i:024x}")),
        })?;
        Ok(())
    })?;
    println!(
        "cpu, one core: csr::accept {} · Ca::sign_spki {} · JwtKeys::sign {}",
        us(pr.csr_accept),
        us(pr.sign_spki),
        us(pr.jwt_sign)
    );

    // The same mint with fsync taken away, one database at a time.
    if Path::new(TMPFS).is_dir() {
        for (label, a, i) in [
            ("audit db on tmpfs", Some(TMPFS), None),
            ("identity db on tmpfs", None, Some(TMPFS)),
            ("both dbs on tmpfs", Some(TMPFS), Some(TMPFS)),
        ] {
            let stack = start_stack(pki, a, i).await?;
            let r = mint_phase(&stack, pki, keys, "tmpfs", k, n, p.phase).await?;
            println!("{}", r.line(&format!("mint ({label})")));
            stack.shutdown().await?;
            match (a.is_some(), i.is_some()) {
                (true, false) => pr.audit_tmpfs = Some(r),
                (false, true) => pr.identity_tmpfs = Some(r),
                _ => pr.both_tmpfs = Some(r),
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
    const GOAL_P99: Duration = Duration::from_millis(10);
    println!("\n== summary (markdown) ==\n");
    println!(
        "| phase | clients | calls | calls/s | vs goal 2,000/s | p50 | p99 | vs goal p99 10 ms | max | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let row = |what: &str, k: u64, r: &Run, goal: bool| {
        let (vs_rate, vs_p99) = if goal {
            (
                format!(
                    "{:.2}× {}",
                    r.rate() / GOAL_RATE,
                    if r.rate() >= GOAL_RATE { "✅" } else { "❌" }
                ),
                if r.p99 <= GOAL_P99 {
                    "✅".to_owned()
                } else {
                    "❌".to_owned()
                },
            )
        } else {
            ("—".into(), "—".into())
        };
        println!(
            "| {what} | {k} | {} | {} | {vs_rate} | {} | {} | {vs_p99} | {} | {} |",
            r.calls,
            per_sec(r.rate()),
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            r.errors
        );
    };
    for (k, r) in &fig.mints {
        row("MintRunSvid", *k, r, true);
    }
    if let Some((k, r)) = &fig.jwt {
        row("MintJwtSvid", *k, r, false);
    }
    if let Some(pr) = &fig.probe {
        println!(
            "\n| where a mint's time goes ({} clients) | p50 | p99 | rate |",
            pr.k
        );
        println!("|---|---:|---:|---:|");
        let line = |what: &str, r: &Run| {
            println!(
                "| {what} | {} | {} | {}/s |",
                ms(r.p50),
                ms(r.p99),
                per_sec(r.rate())
            );
        };
        line("MintRunSvid, both dbs on disk", &pr.baseline);
        println!(
            "| — inside: `put_issued` (one INSERT, its own commit) | {} | {} | |",
            ms(pr.put_issued.p50),
            ms(pr.put_issued.p99)
        );
        println!(
            "| — inside: `run_worker` (one SELECT) | {} | {} | |",
            ms(pr.run_worker.p50),
            ms(pr.run_worker.p99)
        );
        line("audit Append alone, 1 event per call", &pr.audit_alone);
        line("GetTrustBundle alone (mTLS unary RPC)", &pr.rpc_alone);
        line(
            "`put_issued` alone on a fresh store, 1 task",
            &pr.put_alone_serial,
        );
        line(
            &format!("`put_issued` alone on a fresh store, {} tasks", pr.k),
            &pr.put_alone_concurrent,
        );
        line("fsync alone (4 KiB + fdatasync, serial)", &pr.fsync);
        println!(
            "| CPU, one core: `csr::accept` / `Ca::sign_spki` / `JwtKeys::sign` | {} / {} / {} | | |",
            us(pr.csr_accept),
            us(pr.sign_spki),
            us(pr.jwt_sign)
        );
        for (what, r) in [
            ("MintRunSvid, audit db on tmpfs", &pr.audit_tmpfs),
            ("MintRunSvid, identity db on tmpfs", &pr.identity_tmpfs),
            ("MintRunSvid, both dbs on tmpfs", &pr.both_tmpfs),
        ] {
            if let Some(r) = r {
                line(what, r);
            }
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
        "identity mint bench: {} cores, load {}, phases {:?} (clients, mints), jwts {} × {} \
         clients, probe {}, phase deadline {:?}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        p.phases,
        p.jwts,
        p.jwt_clients,
        p.probe,
        p.phase
    );
    let pki = pki()?;
    let most = p
        .phases
        .iter()
        .map(|(_, n)| *n)
        .chain([p.probe, p.jwt_clients])
        .max()
        .unwrap_or(1)
        .max(1);
    let t = Instant::now();
    let keys = run_keys(most).await?;
    println!(
        "made {} P-256 keys and CSRs in {:.2} s (before any clock)",
        keys.len(),
        t.elapsed().as_secs_f64()
    );
    let mut fig = Figures::default();

    for (i, (k, n)) in p.phases.iter().copied().enumerate() {
        let stack = start_stack(&pki, None, None).await?;
        println!("\n== MintRunSvid: {k} dispatcher clients, {n} mints ==");
        let r = mint_phase(&stack, &pki, &keys, &format!("p{i}"), k, n, p.phase).await?;
        println!("{}", r.line("mint"));
        if r.timed_out {
            fig.notes.push(format!(
                "{k} clients: stopped at the phase deadline after {} mints",
                r.calls
            ));
        }
        fig.mints.push((k, r));
        if i + 1 == p.phases.len() && p.jwts > 0 {
            let clients = run_clients(&stack, &pki, &keys, p.jwt_clients).await?;
            println!(
                "\n== MintJwtSvid: {} run clients, {} tokens ==",
                p.jwt_clients, p.jwts
            );
            let r = jwt_phase(clients, p.jwts, p.phase).await;
            println!("{}", r.line("jwt"));
            fig.jwt = Some((p.jwt_clients, r));
        }
        stack.shutdown().await?;
    }
    let rate = env_u64("MINT_BENCH_RATE", 2000)?;
    if rate > 0 {
        let secs = env_u64("MINT_BENCH_RATE_SECS", 5)?.clamp(1, 60);
        let stack = start_stack(&pki, None, None).await?;
        println!(
            "\n== MintRunSvid open loop: {rate}/s offered for {secs} s over 16 connections =="
        );
        let r = paced_phase(&stack, &pki, &keys, rate, secs, 16).await?;
        println!("{}", r.line("paced mint"));
        stack.shutdown().await?;
    }
    if p.probe > 0 {
        let pr = probe(&pki, &keys, &p, &mut fig).await?;
        fig.probe = Some(pr);
    }
    report(&fig);
    if fig.mints.iter().any(|(_, r)| r.calls == 0) {
        bail!("a phase minted nothing");
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
