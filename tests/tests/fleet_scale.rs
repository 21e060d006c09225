//! The dispatcher at fleet scale, against the real binaries over real mTLS
//! (DESIGN.md, "Storage and scale-out" and guarantee 2), with real PostgreSQL
//! and Redis from the test kit. The tests act as the workers themselves: each
//! worker has its own SVID (`spiffe://TD/tenant/<t>/worker/<id>`), registers,
//! holds a claim stream with credits, and reports every assignment it
//! receives; every receipt and every acknowledgement goes into a ledger that
//! the assertions read.
//!
//! - Two replicas on one PostgreSQL never hand one attempt to two workers:
//!   thousands of randomised tasks (tenants, priorities, labels) enqueued
//!   through both replicas, workers on both, some of them dropping and
//!   reopening their streams; every task succeeds exactly once, on a worker
//!   of its tenant whose labels cover the task's, and ListTasks agrees.
//! - Losing Redis degrades dispatch to polling and loses nothing: tasks
//!   enqueued on one replica reach workers on the other through Redis, then,
//!   once Redis is stopped, through the fallback poll.
//! - A tenant's backlog of 20,000 tasks does not hold up another tenant's
//!   first task, and `[fleet.weights]` shares dispatch by weight (backlogs
//!   written straight into the dispatcher's store while it is stopped: see
//!   `preload`).
//!
//! The first test prints its random seed; `FLEET_SCALE_SEED=<seed>` replays
//! its tasks (the timing of workers and streams is not replayed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use bulkhead_mesh::client::{self, MeshChannel};
use bulkhead_mesh::tls::{ExpectServer, Identity};
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_testkit::external::{Postgres, Redis};
use bulkhead_testkit::mesh::TestMesh;
use pb::claim_request::Body as Up;
use pb::claim_response::Body as Down;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

type Dispatcher = DispatcherServiceClient<MeshChannel>;

const AGENT: &str = "fleet-bot";
const AGENT_VERSION: &str = "1.0.0";
const IMAGE: &str = "registry.example/fleet-bot@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// The process backend: these workers run nothing.
const PROCESS_BACKEND: i32 = 2;

// ---------------------------------------------------------------------------
// The mesh, its second dispatcher replica, and the parties

/// The dispatcher's `[fleet]` settings for these tests: short leases, so that
/// an assignment lost in a dropped stream comes back within seconds.
fn fleet_table(poll_ms: i64, fallback_poll_ms: i64, weights: &[(&str, i64)]) -> toml::Table {
    let mut fleet = toml::Table::new();
    for (k, v) in [
        ("lease_ms", 3_000),
        ("heartbeat_ms", 500),
        ("reaper_ms", 200),
        ("poll_ms", poll_ms),
        ("fallback_poll_ms", fallback_poll_ms),
    ] {
        fleet.insert(k.into(), toml::Value::Integer(v));
    }
    if !weights.is_empty() {
        let w: toml::Table = weights
            .iter()
            .map(|(k, v)| ((*k).to_owned(), toml::Value::Integer(*v)))
            .collect();
        fleet.insert("weights".into(), toml::Value::Table(w));
    }
    fleet
}

/// Starts a mesh whose dispatcher uses `store` (empty: its SQLite default),
/// `redis` (empty: none) and `fleet`.
async fn start_mesh(store: &str, redis: &str, fleet: toml::Table) -> anyhow::Result<TestMesh> {
    let mut extra = toml::Table::new();
    if !store.is_empty() {
        extra.insert("store".into(), toml::Value::String(store.into()));
    }
    if !redis.is_empty() {
        extra.insert("redis".into(), toml::Value::String(redis.into()));
    }
    extra.insert("fleet".into(), toml::Value::Table(fleet));
    TestMesh::start_with(|spec| {
        spec.extra.insert("dispatcher".into(), extra);
    })
    .await
}

/// Another `bulkhead-dispatcher` process on the mesh's configuration (same
/// store, Redis, peers and SVID), on its own port and data directory. Stopped
/// by its PID; killed if dropped.
struct Replica {
    addr: String,
    log: PathBuf,
    child: tokio::process::Child,
}

impl Replica {
    async fn start(mesh: &TestMesh, name: &str) -> anyhow::Result<Self> {
        let dir = mesh.dir();
        let base = dir.join("config").join("dispatcher.toml");
        let mut table: toml::Table = toml::from_str(
            &std::fs::read_to_string(&base).with_context(|| format!("read {}", base.display()))?,
        )?;
        let addr = format!("127.0.0.1:{}", bulkhead_cluster::free_port()?);
        let data = dir.join("data").join(format!("dispatcher-{name}"));
        std::fs::create_dir_all(&data)?;
        table.insert("listen".into(), toml::Value::String(addr.clone()));
        table.insert(
            "data_dir".into(),
            toml::Value::String(data.display().to_string()),
        );
        let config = dir.join("config").join(format!("dispatcher-{name}.toml"));
        std::fs::write(&config, toml::to_string_pretty(&table)?)?;
        let log = dir.join("logs").join(format!("dispatcher-{name}.log"));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child =
            tokio::process::Command::new(bulkhead_cluster::find_binary("dispatcher", None)?)
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .kill_on_drop(true)
                .spawn()
                .context("failed to start the second dispatcher")?;
        let replica = Self { addr, log, child };
        let (op, bundle) = mesh.mesh.operator();
        let start = Instant::now();
        loop {
            match bulkhead_cluster::health(&replica.addr, op, bundle).await {
                Ok(true) => return Ok(replica),
                _ if start.elapsed() > Duration::from_secs(30) => bail!(
                    "dispatcher {name} did not become healthy\n{}",
                    replica.log_tail(40)
                ),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM to the process this test started, then SIGKILL after 15 s.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The dispatcher at `addr` as the holder of `who`.
fn dispatcher_at(mesh: &TestMesh, addr: &str, who: &Identity) -> anyhow::Result<Dispatcher> {
    let (_, bundle) = mesh.mesh.operator();
    Ok(DispatcherServiceClient::new(client::channel(
        addr,
        Some(who),
        bundle,
        ExpectServer::Service("dispatcher".into()),
    )?))
}

/// Operator `admin/operator` submits the agent; `admin/bob` approves it (the
/// submitter may not).
async fn approved_agent(mesh: &TestMesh) -> anyhow::Result<()> {
    let addr = mesh.addr("dispatcher")?.to_owned();
    let mut alice = dispatcher_at(mesh, &addr, &mesh.identity("admin/operator")?)?;
    let mut bob = dispatcher_at(mesh, &addr, &mesh.identity("admin/bob")?)?;
    alice
        .submit_agent(pb::SubmitAgentRequest {
            name: AGENT.into(),
            version: AGENT_VERSION.into(),
            image: IMAGE.into(),
            description: "fleet-scale test agent".into(),
            ..Default::default()
        })
        .await
        .context("SubmitAgent")?;
    let approved = bob
        .approve_agent(pb::ApproveAgentRequest {
            name: AGENT.into(),
            version: AGENT_VERSION.into(),
            comment: "reviewed".into(),
        })
        .await
        .context("ApproveAgent by a second operator")?
        .into_inner()
        .agent
        .context("no agent")?;
    ensure!(approved.status == pb::AgentStatus::Approved as i32);
    Ok(())
}

/// A task as its tenant enqueued it.
#[derive(Debug, Clone)]
struct Spec {
    tenant: String,
    labels: BTreeMap<String, String>,
    priority: i32,
}

fn enqueue_request(spec: &Spec, i: usize) -> pb::EnqueueRequest {
    pb::EnqueueRequest {
        tenant: spec.tenant.clone(),
        agent: AGENT.into(),
        labels: spec.labels.clone().into_iter().collect(),
        payload: format!("task {i}").into_bytes().into(),
        priority: spec.priority,
        max_attempts: 10,
        ..Default::default()
    }
}

/// Enqueues every spec with `concurrency` callers, each tenant through its own
/// client identity (`tenant/<t>/client/api`), spread over `addrs` in turn.
/// Returns (task id, spec, when Enqueue answered) in no particular order.
async fn enqueue_all(
    mesh: &TestMesh,
    addrs: &[String],
    specs: Vec<Spec>,
    concurrency: usize,
) -> anyhow::Result<Vec<(String, Spec, Instant)>> {
    let tenants: HashSet<String> = specs.iter().map(|s| s.tenant.clone()).collect();
    let mut clients: HashMap<String, Vec<Dispatcher>> = HashMap::new();
    for t in tenants {
        let who = mesh.identity(&format!("tenant/{t}/client/api"))?;
        let per_addr = addrs
            .iter()
            .map(|a| dispatcher_at(mesh, a, &who))
            .collect::<anyhow::Result<Vec<_>>>()?;
        clients.insert(t, per_addr);
    }
    let clients = Arc::new(clients);
    let specs = Arc::new(specs);
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let (clients, specs, next) = (clients.clone(), specs.clone(), next.clone());
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(spec) = specs.get(i) else { break };
                let per_addr = &clients[&spec.tenant];
                let mut c = per_addr[i % per_addr.len()].clone();
                let resp = c
                    .enqueue(enqueue_request(spec, i))
                    .await
                    .with_context(|| format!("Enqueue of task {i}"))?
                    .into_inner();
                out.push((resp.task_id, spec.clone(), Instant::now()));
            }
            anyhow::Ok(out)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    Ok(all)
}

/// Every task of `tenant` in the store, through ListTasks as an operator.
async fn list_all(mesh: &TestMesh, tenant: &str, status: i32) -> anyhow::Result<Vec<pb::Task>> {
    let addr = mesh.addr("dispatcher")?.to_owned();
    let mut op = dispatcher_at(mesh, &addr, &mesh.identity("admin/operator")?)?;
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = op
            .list_tasks(pb::ListTasksRequest {
                tenant: tenant.into(),
                status,
                page_size: 1000,
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
}

/// How many tasks of these tenants the store holds in each status.
async fn store_summary(mesh: &TestMesh, tenants: &[&str]) -> anyhow::Result<String> {
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for t in tenants {
        for task in list_all(mesh, t, 0).await? {
            let status = pb::TaskStatus::try_from(task.status)
                .map_or_else(|_| task.status.to_string(), |s| s.as_str_name().to_owned());
            *by_status.entry(status).or_default() += 1;
        }
    }
    Ok(format!("{by_status:?}"))
}

// ---------------------------------------------------------------------------
// Workers, played by the test

/// One assignment as a worker received it.
#[derive(Debug, Clone)]
struct Receipt {
    worker: String,
    tenant: String,
    labels: BTreeMap<String, String>,
    task_id: String,
    attempt: u32,
    epoch: u64,
    /// The task's tenant as the assignment states it.
    task_tenant: String,
    at: Instant,
}

/// One report acknowledgement as a worker received it.
#[derive(Debug, Clone)]
struct Ack {
    worker: String,
    task_id: String,
    attempt: u32,
    epoch: u64,
    accepted: bool,
    rejection: i32,
}

/// What every worker saw, for the assertions.
#[derive(Debug, Default)]
struct Ledger {
    receipts: Mutex<Vec<Receipt>>,
    acks: Mutex<Vec<Ack>>,
    cancels: AtomicUsize,
    /// Claim streams dropped on purpose and reopened.
    reopened: AtomicUsize,
    /// Claim streams the dispatcher ended with an error.
    stream_errors: Mutex<Vec<String>>,
}

impl Ledger {
    fn receipts(&self) -> Vec<Receipt> {
        lock(&self.receipts).clone()
    }

    fn acks(&self) -> Vec<Ack> {
        lock(&self.acks).clone()
    }

    /// Distinct (task, attempt, epoch) whose report was accepted.
    fn accepted(&self) -> HashSet<(String, u32, u64)> {
        lock(&self.acks)
            .iter()
            .filter(|a| a.accepted)
            .map(|a| (a.task_id.clone(), a.attempt, a.epoch))
            .collect()
    }

    fn received_by_tenant(&self, tenant: &str) -> usize {
        lock(&self.receipts)
            .iter()
            .filter(|r| r.tenant == tenant)
            .count()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How a test worker behaves.
#[derive(Debug, Clone)]
struct WorkerSpec {
    tenant: String,
    id: String,
    labels: BTreeMap<String, String>,
    max_runs: u32,
    /// Reports each assignment after a delay drawn from this range (ms);
    /// `None`: holds every assignment and never reports.
    report_after_ms: Option<(u64, u64)>,
    /// Drops its claim stream after a time drawn from this range (ms), then
    /// reopens it; `None`: keeps one stream.
    drop_after_ms: Option<(u64, u64)>,
}

/// A lease the worker holds: task, attempt, epoch.
type Lease = (String, u32, u64);

fn report(lease: &Lease) -> pb::ClaimRequest {
    pb::ClaimRequest {
        body: Some(Up::Report(pb::ClaimReport {
            task_id: lease.0.clone(),
            attempt: lease.1,
            lease_epoch: lease.2,
            outcome: pb::RunOutcome::Succeeded as i32,
            exit_code: 0,
            output_summary: "done".into(),
        })),
    }
}

fn credits(slots: u32) -> pb::ClaimRequest {
    pb::ClaimRequest {
        body: Some(Up::Credits(pb::ClaimCredits { slots })),
    }
}

/// Registers the worker at `addr`, then holds claim streams until `stop`:
/// grants credits, records every assignment, reports it after its delay (on
/// whichever stream is open then; an unacknowledged report is sent again on
/// the next stream), heartbeats its leases, and grants a credit back for each
/// acknowledged report or cancelled lease.
async fn run_worker(
    mesh: &TestMesh,
    addr: &str,
    spec: WorkerSpec,
    ledger: Arc<Ledger>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let who = mesh.identity(&format!("tenant/{}/worker/{}", spec.tenant, spec.id))?;
    let mut client = dispatcher_at(mesh, addr, &who)?;
    let registered = client
        .register_worker(pb::RegisterWorkerRequest {
            labels: spec.labels.clone().into_iter().collect(),
            max_concurrent_runs: spec.max_runs,
            sandbox_backends: vec![PROCESS_BACKEND],
            version: "fleet-scale-test".into(),
        })
        .await
        .with_context(|| format!("RegisterWorker {}", spec.id))?
        .into_inner();
    ensure!(
        registered.worker.as_ref().map(|w| w.tenant.as_str()) == Some(spec.tenant.as_str()),
        "the worker's tenant comes from its svid"
    );
    let (due_tx, mut due_rx) = mpsc::unbounded_channel::<Lease>();
    // Leases received and not yet acknowledged; true once reported.
    let mut held: HashMap<(String, u64), (u32, bool)> = HashMap::new();
    'sessions: while !*stop.borrow() {
        let (tx, rx) = mpsc::channel::<pb::ClaimRequest>(4096);
        let free = spec
            .max_runs
            .saturating_sub(u32::try_from(held.len()).unwrap_or(u32::MAX));
        if free > 0 {
            tx.send(credits(free)).await?;
        }
        for ((task, epoch), (attempt, reported)) in &held {
            if *reported {
                tx.send(report(&(task.clone(), *attempt, *epoch))).await?;
            }
        }
        let mut inbound = client
            .claim(ReceiverStream::new(rx))
            .await
            .with_context(|| format!("Claim by {}", spec.id))?
            .into_inner();
        let session_end = spec.drop_after_ms.map(|(lo, hi)| {
            Instant::now() + Duration::from_millis(rand::rng().random_range(lo..=hi))
        });
        let mut heartbeat = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                m = inbound.message() => {
                    let msg = match m {
                        Ok(Some(msg)) => msg,
                        Ok(None) => break,
                        Err(status) => {
                            lock(&ledger.stream_errors).push(format!("{}: {status:?}", spec.id));
                            break;
                        }
                    };
                    match msg.body {
                        Some(Down::Assignment(a)) => {
                            let task = a.task.unwrap_or_default();
                            let lease = (task.task_id.clone(), a.attempt, a.lease_epoch);
                            lock(&ledger.receipts).push(Receipt {
                                worker: spec.id.clone(),
                                tenant: spec.tenant.clone(),
                                labels: spec.labels.clone(),
                                task_id: task.task_id.clone(),
                                attempt: a.attempt,
                                epoch: a.lease_epoch,
                                task_tenant: task.tenant.clone(),
                                at: Instant::now(),
                            });
                            held.insert((lease.0.clone(), lease.2), (lease.1, false));
                            if let Some((lo, hi)) = spec.report_after_ms {
                                let due = due_tx.clone();
                                let wait = rand::rng().random_range(lo..=hi);
                                tokio::spawn(async move {
                                    tokio::time::sleep(Duration::from_millis(wait)).await;
                                    let _ = due.send(lease);
                                });
                            }
                        }
                        Some(Down::ReportAck(ack)) => {
                            lock(&ledger.acks).push(Ack {
                                worker: spec.id.clone(),
                                task_id: ack.task_id.clone(),
                                attempt: ack.attempt,
                                epoch: ack.lease_epoch,
                                accepted: ack.accepted,
                                rejection: ack.rejection,
                            });
                            if held.remove(&(ack.task_id, ack.lease_epoch)).is_some() {
                                let _ = tx.send(credits(1)).await;
                            }
                        }
                        Some(Down::Cancel(c)) => {
                            ledger.cancels.fetch_add(1, Ordering::Relaxed);
                            let key = (c.task_id, c.lease_epoch);
                            match held.get(&key).copied() {
                                // Reported, and the lease is gone: most often
                                // the report was applied and its ack went to
                                // a stream this worker had dropped. Asking
                                // again gets the answer (a repeat is
                                // acknowledged).
                                Some((attempt, true)) => {
                                    let _ = tx.send(report(&(key.0, attempt, key.1))).await;
                                }
                                Some((_, false)) => {
                                    held.remove(&key);
                                    let _ = tx.send(credits(1)).await;
                                }
                                None => {}
                            }
                        }
                        Some(Down::Drain(_)) | Some(Down::RunSvid(_)) | None => {}
                    }
                }
                Some(lease) = due_rx.recv() => {
                    if let Some(h) = held.get_mut(&(lease.0.clone(), lease.2)) {
                        h.1 = true;
                        let _ = tx.send(report(&lease)).await;
                    }
                }
                _ = heartbeat.tick() => {
                    let leases = held
                        .iter()
                        .map(|((task, epoch), (attempt, _))| pb::HeldLease {
                            task_id: task.clone(),
                            attempt: *attempt,
                            lease_epoch: *epoch,
                        })
                        .collect();
                    let _ = tx
                        .send(pb::ClaimRequest {
                            body: Some(Up::Heartbeat(pb::ClaimHeartbeat { leases })),
                        })
                        .await;
                }
                () = sleep_until(session_end) => {
                    ledger.reopened.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                _ = stop.changed() => break 'sessions,
            }
        }
        drop(inbound);
        drop(tx);
        let pause = rand::rng().random_range(0..30);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    Ok(())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Workers running in the background until [`Workers::stop`].
struct Workers {
    stop: watch::Sender<bool>,
    set: JoinSet<anyhow::Result<()>>,
}

impl Workers {
    fn spawn(
        mesh: &Arc<TestMesh>,
        ledger: &Arc<Ledger>,
        workers: Vec<(String, WorkerSpec)>,
    ) -> Self {
        let (stop, rx) = watch::channel(false);
        let mut set = JoinSet::new();
        for (addr, spec) in workers {
            let (mesh, ledger, rx) = (mesh.clone(), ledger.clone(), rx.clone());
            set.spawn(async move { run_worker(&mesh, &addr, spec, ledger, rx).await });
        }
        Self { stop, set }
    }

    /// Fails early if a worker failed.
    fn check(&mut self) -> anyhow::Result<()> {
        while let Some(r) = self.set.try_join_next() {
            r??;
        }
        Ok(())
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        while let Some(r) = self.set.join_next().await {
            r??;
        }
        Ok(())
    }
}

/// Waits until `done` holds, checking the workers every 50 ms, for at most
/// `limit`.
async fn wait_until(
    workers: &mut Workers,
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut said = Instant::now();
    while !done() {
        workers.check()?;
        if said.elapsed() > Duration::from_secs(5) {
            println!("still waiting for {what} after {:?}", start.elapsed());
            said = Instant::now();
        }
        ensure!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `scenario`; on failure, adds the services' logs to the error.
async fn with_logs<F>(mesh: &TestMesh, replicas: &[&Replica], scenario: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    scenario.await.map_err(|e| {
        let mut logs = mesh.logs();
        for r in replicas {
            logs.push_str(&format!("\n--- second dispatcher ---\n{}", r.log_tail(30)));
        }
        e.context(logs)
    })
}

fn seed() -> u64 {
    let seed = std::env::var("FLEET_SCALE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("FLEET_SCALE_SEED={seed}");
    seed
}

// ---------------------------------------------------------------------------
// Two replicas, one PostgreSQL: no attempt goes to two workers

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
const TASKS: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_never_hand_one_attempt_to_two_workers() -> anyhow::Result<()> {
    let Some(pg) = Postgres::start().await? else {
        return Ok(());
    };
    let store = pg.create_database("fleet_scale").await?;
    let mut rng = StdRng::seed_from_u64(seed());
    let mesh = Arc::new(start_mesh(&store, "", fleet_table(500, 200, &[])).await?);
    let replica = Replica::start(&mesh, "b").await?;
    let addrs = [mesh.addr("dispatcher")?.to_owned(), replica.addr.clone()];
    with_logs(&mesh, &[&replica], async {
        approved_agent(&mesh).await?;

        // Two workers per tenant on each replica, each with its own labels;
        // one per replica drops and reopens its stream every few hundred ms.
        let mut workers = Vec::new();
        for (r, addr) in addrs.iter().enumerate() {
            for (t, tenant) in TENANTS.iter().enumerate() {
                for k in 0..2 {
                    let labels: BTreeMap<String, String> = [
                        ("tenant", (*tenant).to_owned()),
                        ("gpu", ["a100", "h100"][k].to_owned()),
                        ("region", ["eu", "us"][(r + t + k) % 2].to_owned()),
                        ("zone", format!("z{r}")),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                    workers.push((
                        addr.clone(),
                        WorkerSpec {
                            tenant: (*tenant).to_owned(),
                            id: format!("r{r}-{tenant}-{k}"),
                            labels,
                            max_runs: 8,
                            report_after_ms: Some((0, 5)),
                            drop_after_ms: (t == r && k == 1).then_some((150, 900)),
                        },
                    ));
                }
            }
        }

        // Random tasks: each one's labels a random subset of a random worker's
        // of its tenant, so that some worker can always take it.
        let specs: Vec<Spec> = (0..TASKS)
            .map(|_| {
                let tenant = TENANTS[rng.random_range(0..TENANTS.len())];
                let pick: Vec<&WorkerSpec> = workers
                    .iter()
                    .map(|(_, w)| w)
                    .filter(|w| w.tenant == tenant)
                    .collect();
                let w = pick[rng.random_range(0..pick.len())];
                let labels = w
                    .labels
                    .iter()
                    .filter(|_| rng.random_bool(0.4))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                Spec {
                    tenant: tenant.to_owned(),
                    labels,
                    priority: rng.random_range(-100..=100),
                }
            })
            .collect();

        let ledger = Arc::new(Ledger::default());
        let mut running = Workers::spawn(&mesh, &ledger, workers.clone());
        let started = Instant::now();
        let enqueued = enqueue_all(&mesh, &addrs, specs, 24).await?;
        let enqueue_time = started.elapsed();
        let truth: HashMap<String, Spec> = enqueued
            .iter()
            .map(|(id, spec, _)| (id.clone(), spec.clone()))
            .collect();
        ensure!(
            truth.len() == TASKS,
            "{} distinct task ids for {TASKS} tasks",
            truth.len()
        );
        let waited = wait_until(
            &mut running,
            // About 30 s alone on a 2-core machine in a debug build.
            Duration::from_secs(90),
            "every task reported",
            || ledger.accepted().len() >= TASKS,
        )
        .await;
        if let Err(e) = waited {
            bail!(
                "{e:#}: {} accepted reports, {} assignments received; in the store: {}",
                ledger.accepted().len(),
                ledger.receipts().len(),
                store_summary(&mesh, &TENANTS).await?
            );
        }
        let dispatch_time = started.elapsed();
        running.stop().await?;
        println!(
            "{TASKS} tasks: enqueued through 2 replicas in {enqueue_time:?}, all reported after \
             {dispatch_time:?}; {} assignments received, {} acks, {} cancels, {} streams \
             reopened, stream errors: {:?}",
            ledger.receipts().len(),
            ledger.acks().len(),
            ledger.cancels.load(Ordering::Relaxed),
            ledger.reopened.load(Ordering::Relaxed),
            lock(&ledger.stream_errors)
        );

        let receipts = ledger.receipts();
        let mut by_attempt: HashMap<(&str, u32), Vec<&str>> = HashMap::new();
        let mut by_epoch: HashMap<(&str, u64), Vec<&str>> = HashMap::new();
        let mut violations = Vec::new();
        for r in &receipts {
            by_attempt
                .entry((&r.task_id, r.attempt))
                .or_default()
                .push(&r.worker);
            by_epoch
                .entry((&r.task_id, r.epoch))
                .or_default()
                .push(&r.worker);
            let Some(spec) = truth.get(&r.task_id) else {
                violations.push(format!("{} received unknown task {}", r.worker, r.task_id));
                continue;
            };
            if spec.tenant != r.tenant || r.task_tenant != r.tenant {
                violations.push(format!(
                    "task {} of {} (assignment says {}) went to {} of {}",
                    r.task_id, spec.tenant, r.task_tenant, r.worker, r.tenant
                ));
            }
            if !spec.labels.iter().all(|(k, v)| r.labels.get(k) == Some(v)) {
                violations.push(format!(
                    "task {} needs {:?}; {} has {:?}",
                    r.task_id, spec.labels, r.worker, r.labels
                ));
            }
        }
        for ((task, attempt), ws) in &by_attempt {
            if ws.len() > 1 {
                violations.push(format!("task {task} attempt {attempt} received by {ws:?}"));
            }
        }
        for ((task, epoch), ws) in &by_epoch {
            if ws.len() > 1 {
                violations.push(format!(
                    "task {task} lease epoch {epoch} received by {ws:?}"
                ));
            }
        }

        // Exactly one attempt of each task was accepted as its result.
        let mut accepted: HashMap<String, Vec<(u32, u64)>> = HashMap::new();
        for (task, attempt, epoch) in ledger.accepted() {
            accepted.entry(task).or_default().push((attempt, epoch));
        }
        let worker_of: HashMap<(&str, u64), &str> = receipts
            .iter()
            .map(|r| ((r.task_id.as_str(), r.epoch), r.worker.as_str()))
            .collect();
        for id in truth.keys() {
            match accepted.get(id).map(Vec::as_slice) {
                Some([_]) => {}
                other => violations.push(format!("task {id}: accepted reports {other:?}")),
            }
        }

        // The store agrees.
        let mut listed = 0;
        for tenant in TENANTS {
            for t in list_all(&mesh, tenant, 0).await? {
                listed += 1;
                let Some(&[(attempt, epoch)]) = accepted.get(&t.task_id).map(Vec::as_slice) else {
                    violations.push(format!("listed task {} was never accepted", t.task_id));
                    continue;
                };
                if t.status != pb::TaskStatus::Succeeded as i32
                    || t.attempt != attempt
                    || Some(t.worker_id.as_str())
                        != worker_of.get(&(t.task_id.as_str(), epoch)).copied()
                {
                    violations.push(format!(
                        "task {} in the store: status {} attempt {} worker {}; reported: attempt \
                         {attempt} by {:?}",
                        t.task_id,
                        t.status,
                        t.attempt,
                        t.worker_id,
                        worker_of.get(&(t.task_id.as_str(), epoch))
                    ));
                }
            }
        }
        if listed != TASKS {
            violations.push(format!(
                "ListTasks shows {listed} tasks, {TASKS} were enqueued"
            ));
        }
        let retried = by_attempt.keys().filter(|(_, a)| *a > 1).count();
        let refused: Vec<String> = ledger
            .acks()
            .iter()
            .filter(|a| !a.accepted)
            .map(|a| {
                format!(
                    "{} {}#{} rejection {}",
                    a.worker, a.task_id, a.attempt, a.rejection
                )
            })
            .collect();
        println!(
            "{retried} assignments were second or later attempts; {} reports refused: {:?}",
            refused.len(),
            refused.iter().take(10).collect::<Vec<_>>()
        );
        ensure!(
            violations.is_empty(),
            "{} violations, first 20:\n{}",
            violations.len(),
            violations
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        Ok(())
    })
    .await?;
    replica.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Redis stopped mid-run: dispatch goes on by polling

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_redis_degrades_dispatch_to_polling() -> anyhow::Result<()> {
    let Some(pg) = Postgres::start().await? else {
        return Ok(());
    };
    let Some(mut redis) = Redis::start().await? else {
        return Ok(());
    };
    let store = pg.create_database("fleet_redis").await?;
    // A slow regular poll, so that only Redis explains a fast dispatch while
    // it is up; the fallback poll once it is down.
    const POLL_MS: u64 = 5_000;
    const FALLBACK_MS: u64 = 200;
    let fleet = fleet_table(POLL_MS as i64, FALLBACK_MS as i64, &[]);
    let mesh = Arc::new(start_mesh(&store, &redis.url(), fleet).await?);
    let replica = Replica::start(&mesh, "b").await?;
    with_logs(&mesh, &[&replica], async {
        approved_agent(&mesh).await?;
        // Workers on replica B; tasks enqueued on replica A.
        let ledger = Arc::new(Ledger::default());
        let workers = (0..3)
            .map(|k| {
                (
                    replica.addr.clone(),
                    WorkerSpec {
                        tenant: "acme".into(),
                        id: format!("b-{k}"),
                        labels: BTreeMap::new(),
                        max_runs: 8,
                        report_after_ms: Some((0, 5)),
                        drop_after_ms: None,
                    },
                )
            })
            .collect();
        let mut running = Workers::spawn(&mesh, &ledger, workers);
        // Both replicas subscribe to Redis lazily; give them a moment.
        tokio::time::sleep(Duration::from_secs(1)).await;

        let a = mesh.addr("dispatcher")?.to_owned();
        let mut client = dispatcher_at(&mesh, &a, &mesh.identity("tenant/acme/client/api")?)?;
        let spec = Spec {
            tenant: "acme".into(),
            labels: BTreeMap::new(),
            priority: 0,
        };
        // (task id, enqueued at, after the stop by how long)
        let mut sent: Vec<(String, Instant, Option<Duration>)> = Vec::new();
        let start = Instant::now();
        let mut stopped_at: Option<Instant> = None;
        let mut i = 0;
        // Redis goes away mid-way through a regular poll interval (not at
        // its end, where the replica would switch to the fallback at once):
        // the replica keeps sleeping out that interval, so the first tasks
        // after the stop may wait up to POLL_MS.
        while start.elapsed() < Duration::from_millis(15_500) {
            if stopped_at.is_none() && start.elapsed() >= Duration::from_millis(6_500) {
                redis.stop().await?;
                stopped_at = Some(Instant::now());
                println!("redis stopped after {} tasks", sent.len());
            }
            let resp = client
                .enqueue(enqueue_request(&spec, i))
                .await?
                .into_inner();
            let now = Instant::now();
            sent.push((resp.task_id, now, stopped_at.map(|s| now - s)));
            i += 1;
            tokio::time::sleep(Duration::from_millis(40)).await;
            running.check()?;
        }
        let n = sent.len();
        wait_until(
            &mut running,
            Duration::from_secs(15),
            "every task reported",
            || ledger.accepted().len() >= n,
        )
        .await?;
        running.stop().await?;

        let received: HashMap<String, Instant> = ledger
            .receipts()
            .into_iter()
            .map(|r| (r.task_id, r.at))
            .collect();
        let mut before = Vec::new();
        let mut just_after = Vec::new();
        let mut settled = Vec::new();
        for (task, at, since_stop) in &sent {
            let got = received
                .get(task)
                .with_context(|| format!("task {task} was never received"))?;
            let latency = got.saturating_duration_since(*at);
            match since_stop {
                None => before.push(latency),
                // The poller may be in a regular (slow) sleep begun while
                // Redis was up.
                Some(d) if *d < Duration::from_millis(POLL_MS + 1_000) => just_after.push(latency),
                Some(_) => settled.push(latency),
            }
        }
        for v in [&mut before, &mut just_after, &mut settled] {
            v.sort();
        }
        let show = |v: &[Duration]| {
            format!(
                "{} tasks p50 {:?} max {:?}",
                v.len(),
                percentile(v, 0.5),
                v.last().copied().unwrap_or_default()
            )
        };
        println!(
            "enqueue on A → receive on B: with redis {}; first {} s without {}; later {}",
            show(&before),
            (POLL_MS + 1_000) / 1_000,
            show(&just_after),
            show(&settled)
        );
        let accepted = ledger.accepted();
        ensure!(
            accepted.len() == n,
            "{} accepted reports for {n} tasks",
            accepted.len()
        );
        for t in list_all(&mesh, "acme", 0).await? {
            ensure!(
                t.status == pb::TaskStatus::Succeeded as i32,
                "task {} is {} in the store",
                t.task_id,
                t.status
            );
        }
        ensure!(!before.is_empty() && !settled.is_empty(), "both phases ran");
        // Loose bounds: Redis carries wake-ups (far under the regular poll),
        // and without it the fallback poll does (far under the regular poll).
        ensure!(
            percentile(&before, 0.5) < Duration::from_millis(1_000),
            "with redis up, dispatch took {} (the regular poll is {POLL_MS} ms)",
            show(&before)
        );
        ensure!(
            just_after
                .iter()
                .all(|l| *l < Duration::from_millis(POLL_MS + 2_000)),
            "right after redis stopped: {}",
            show(&just_after)
        );
        ensure!(
            settled.iter().all(|l| *l < Duration::from_millis(2_000)),
            "with redis down, dispatch took {} (fallback poll {FALLBACK_MS} ms)",
            show(&settled)
        );
        Ok(())
    })
    .await?;
    replica.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Fairness

const BACKLOG: usize = 20_000;

/// Queues `n` tasks for each `(tenant, n)` fast: one through Enqueue, then,
/// with the dispatcher stopped, `n - 1` copies of it (new ids) written
/// straight into its SQLite store, which it reads again when restarted.
/// Enqueue's own cost (an audit append and a commit each, in a debug build)
/// would make a real backlog take minutes; the dispatcher cannot tell these
/// rows from enqueued ones.
async fn preload(mesh: &mut TestMesh, backlogs: &[(&str, usize)]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let addr = mesh.addr("dispatcher")?.to_owned();
    let mut templates = Vec::new();
    for (i, (tenant, n)) in backlogs.iter().enumerate() {
        let who = mesh.identity(&format!("tenant/{tenant}/client/api"))?;
        let spec = Spec {
            tenant: (*tenant).to_owned(),
            labels: BTreeMap::new(),
            priority: 0,
        };
        let resp = dispatcher_at(mesh, &addr, &who)?
            .enqueue(enqueue_request(&spec, i))
            .await?
            .into_inner();
        templates.push((resp.task_id, *n));
    }
    let dispatcher = mesh
        .mesh
        .process_mut("dispatcher")
        .context("no dispatcher")?;
    dispatcher.stop().await;
    let db = mesh
        .dir()
        .join("data")
        .join("dispatcher")
        .join("dispatcher.db");
    let store = bulkhead_dispatcher::store::open(&format!("sqlite://{}", db.display())).await?;
    for (template, n) in templates {
        let row = store
            .get_task(&template)
            .await?
            .context("the template task is not stored")?;
        let next = Arc::new(AtomicUsize::new(1));
        let mut set = JoinSet::new();
        for _ in 0..32 {
            let (store, row, next) = (store.clone(), row.clone(), next.clone());
            set.spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let mut copy = row.clone();
                    copy.task_id = bulkhead_dispatcher::engine::new_id();
                    store.insert_task(&copy, 0).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
    }
    drop(store);
    mesh.mesh.restart("dispatcher").await?;
    Ok(start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_does_not_delay_another_tenants_task() -> anyhow::Result<()> {
    let mut mesh = start_mesh("", "", fleet_table(2_000, 200, &[])).await?;
    approved_agent(&mesh).await?;
    let took = preload(&mut mesh, &[("big", BACKLOG)]).await?;
    println!("{BACKLOG} tasks of tenant big queued in {took:?}");
    let mesh = Arc::new(mesh);
    with_logs(&mesh, &[], async {
        let addr = mesh.addr("dispatcher")?.to_owned();
        let ledger = Arc::new(Ledger::default());
        let worker = |tenant: &str, id: &str, max_runs| {
            (
                addr.clone(),
                WorkerSpec {
                    tenant: tenant.into(),
                    id: id.into(),
                    labels: BTreeMap::new(),
                    max_runs,
                    report_after_ms: Some((0, 2)),
                    drop_after_ms: None,
                },
            )
        };
        let mut running = Workers::spawn(
            &mesh,
            &ledger,
            vec![
                worker("big", "big-0", 32),
                worker("big", "big-1", 32),
                worker("small", "small-0", 4),
            ],
        );
        wait_until(
            &mut running,
            Duration::from_secs(30),
            "big's workers busy",
            || ledger.received_by_tenant("big") >= 500,
        )
        .await?;

        let mut small = dispatcher_at(&mesh, &addr, &mesh.identity("tenant/small/client/api")?)?;
        let spec = Spec {
            tenant: "small".into(),
            labels: BTreeMap::new(),
            priority: 0,
        };
        let mut latencies = Vec::new();
        for i in 0..5 {
            let before = ledger.received_by_tenant("small");
            let t0 = Instant::now();
            let task = small
                .enqueue(enqueue_request(&spec, i))
                .await?
                .into_inner()
                .task_id;
            wait_until(
                &mut running,
                Duration::from_secs(10),
                "small's task",
                || ledger.received_by_tenant("small") > before,
            )
            .await?;
            let got = ledger
                .receipts()
                .into_iter()
                .find(|r| r.task_id == task)
                .context("small's worker received another task")?;
            latencies.push(got.at - t0);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let drained = ledger.received_by_tenant("big");
        running.stop().await?;
        println!(
            "small's tasks received {latencies:?} after Enqueue was called, while big's \
             workers had received {drained} of {BACKLOG}"
        );
        ensure!(
            latencies.iter().all(|l| *l < Duration::from_secs(1)),
            "small's task waited behind big's backlog: {latencies:?}"
        );
        let queued = list_all(&mesh, "big", pb::TaskStatus::Queued as i32)
            .await?
            .len();
        ensure!(
            queued >= 2_000,
            "big still had {queued} tasks queued: the backlog was not a backlog"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weights_share_dispatch_by_weight() -> anyhow::Result<()> {
    // Turns of 16 tasks per unit of weight: the window below spans about
    // twenty of heavy's, so that the one turn by which the scheduler lets a
    // scope run ahead is a small part of it.
    let mut fleet = fleet_table(2_000, 200, &[("heavy", 3)]);
    fleet.insert("quantum".into(), toml::Value::Integer(16));
    let mut mesh = start_mesh("", "", fleet).await?;
    approved_agent(&mesh).await?;
    preload(&mut mesh, &[("heavy", 2_400), ("light", 1_200)]).await?;
    let mesh = Arc::new(mesh);
    with_logs(&mesh, &[], async {
        let addr = mesh.addr("dispatcher")?.to_owned();
        let ledger = Arc::new(Ledger::default());
        // Workers that never report: the scheduler's shares alone decide who
        // gets what while everyone has credits.
        let workers = ["heavy", "light"]
            .iter()
            .flat_map(|t| (0..2).map(move |k| (*t, k)))
            .map(|(t, k)| {
                (
                    addr.clone(),
                    WorkerSpec {
                        tenant: t.into(),
                        id: format!("{t}-{k}"),
                        labels: BTreeMap::new(),
                        max_runs: 1024,
                        report_after_ms: None,
                        drop_after_ms: None,
                    },
                )
            })
            .collect();
        let mut running = Workers::spawn(&mesh, &ledger, workers);
        const WINDOW: usize = 1_200;
        wait_until(
            &mut running,
            Duration::from_secs(30),
            "both tenants dispatched",
            || {
                let r = lock(&ledger.receipts);
                r.iter()
                    .position(|x| x.tenant == "light")
                    .is_some_and(|first| r.len() >= first + WINDOW)
            },
        )
        .await?;
        running.stop().await?;
        let mut r = ledger.receipts();
        r.sort_by_key(|x| x.at);
        let first = r
            .iter()
            .position(|x| x.tenant == "light")
            .context("light never dispatched")?;
        let window = &r[first..first + WINDOW];
        let heavy = window.iter().filter(|x| x.tenant == "heavy").count();
        let share = heavy as f64 / WINDOW as f64;
        println!(
            "of {WINDOW} assignments after light's first: heavy (weight 3) {heavy}, light \
             (weight 1) {} — heavy's share {share:.2} (expected 0.75); {first} went to heavy \
             before light's first",
            WINDOW - heavy
        );
        ensure!(
            (0.68..=0.82).contains(&share),
            "heavy's share of dispatch was {share:.2}, expected about 0.75 for weights 3:1"
        );
        Ok(())
    })
    .await
}
