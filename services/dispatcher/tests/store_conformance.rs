//! One conformance suite for every dispatch store, run against SQLite and a
//! real PostgreSQL started by the test kit (two stores on one database there:
//! two replicas).
//!
//! Each case is an async fn taking a [`Harness`]; `conformance!` runs every
//! case on a fresh SQLite file (one test each) and on a fresh PostgreSQL
//! database of one shared server (one test, cases concurrently).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bulkhead_dispatcher::model::{
    AgentRow, AgentStatus, Labels, Outcome, Scope, TaskRow, TaskStatus, WorkerRow, WorkerState,
};
use bulkhead_dispatcher::store::{
    self, Cancelled, ClaimBatch, ClaimOne, Decision, DispatchStore, Finish, Finished, Inserted,
    Released, StoreError, TaskFilter, WorkerFilter,
};
use bulkhead_testkit::external::Postgres;
use rand::{Rng as _, SeedableRng as _};
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

const NOW: i64 = 1_700_000_000_000;
const SECOND: i64 = 1_000;
const MINUTE: i64 = 60 * SECOND;
const LEASE: i64 = 30 * SECOND;
const TIMEOUT: i64 = 10 * MINUTE;

/// A store under test, another replica on the same database (SQLite has one
/// replica: the same store), and raw SQL on that database.
struct Harness {
    store: Arc<dyn DispatchStore>,
    replica: Arc<dyn DispatchStore>,
    raw: Raw,
    _dir: Option<tempfile::TempDir>,
}

enum Raw {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

impl Raw {
    async fn exec(&self, sql: &str) {
        match self {
            Raw::Sqlite(p) => sqlx::query(sql).execute(p).await.map(drop),
            Raw::Pg(p) => sqlx::query(sql).execute(p).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    async fn text(&self, sql: &str) -> String {
        match self {
            Raw::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await,
            Raw::Pg(p) => sqlx::query_scalar(sql).fetch_one(p).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

async fn sqlite_harness() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dispatch.db");
    let store = store::open(&format!("sqlite://{}", path.display()))
        .await
        .expect("open");
    let raw = SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(std::time::Duration::from_secs(10)),
    )
    .await
    .expect("raw connection");
    Harness {
        replica: Arc::clone(&store),
        store,
        raw: Raw::Sqlite(raw),
        _dir: Some(dir),
    }
}

async fn pg_harness(pg: &Postgres, case: &str) -> anyhow::Result<Harness> {
    let url = pg.create_database(&format!("dispatch_{case}")).await?;
    Ok(Harness {
        store: store::open(&url).await?,
        replica: store::open(&url).await?,
        raw: Raw::Pg(PgPool::connect(&url).await?),
        _dir: None,
    })
}

macro_rules! conformance {
    ($($case:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::sqlite_harness().await).await;
                }
            )+
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn postgres() -> anyhow::Result<()> {
            let Some(pg) = Postgres::start().await? else {
                return Ok(());
            };
            let mut cases = Vec::new();
            $(
                let h = pg_harness(&pg, stringify!($case)).await?;
                cases.push((stringify!($case), tokio::spawn($case(h))));
            )+
            let mut failed = Vec::new();
            for (name, case) in cases {
                if case.await.is_err() {
                    failed.push(name);
                }
            }
            assert!(failed.is_empty(), "failed on postgres: {failed:?}");
            Ok(())
        }
    };
}

conformance!(
    agents,
    agent_listing,
    workers,
    tasks,
    idempotency,
    claim_isolation,
    claim_labels,
    claim_order,
    claim_one,
    start_and_renew,
    finish_outcomes,
    finish_errors,
    finish_refusals,
    expiry,
    cancel,
    release_workers,
    release_one,
    queued_counts,
    claim_race,
    corrupt_rows,
    concurrent_inserts,
    concurrent_finishes,
    held_rows,
    held_invisible,
    held_release,
    held_release_fields,
    held_release_refusals,
    held_release_ordering,
    held_release_race,
    held_settling,
    held_release_replica,
    held_release_twice,
);

// ---- fixtures ---------------------------------------------------------------

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn tenant(name: &str) -> Scope {
    Scope::Tenant(name.into())
}

fn pool(name: &str) -> Scope {
    Scope::Pool(name.into())
}

fn agent(name: &str, version: &str, submitted_at_ms: i64) -> AgentRow {
    AgentRow {
        name: name.into(),
        version: version.into(),
        image: format!("registry.test/{name}:{version}"),
        command: vec!["run".into(), "--fast".into()],
        requested_secret_keys: vec!["OPENAI_KEY".into()],
        tool: name.into(),
        description: format!("{name} {version}"),
        status: AgentStatus::Pending,
        submitted_by: "spiffe://bulkhead.test/operator/ada".into(),
        submitted_at_ms,
        decided_by: String::new(),
        decided_at_ms: None,
        decision_reason: String::new(),
    }
}

fn worker(id: &str, scope: &Scope) -> WorkerRow {
    WorkerRow {
        worker_id: id.into(),
        spiffe_id: format!("spiffe://bulkhead.test/worker/{id}"),
        scope: scope.clone(),
        labels: labels(&[("gpu", "a100")]),
        max_concurrent_runs: 4,
        sandbox_backends: vec![1, 2],
        version: "0.1.0".into(),
        state: WorkerState::Connected,
        registered_at_ms: NOW,
        last_heartbeat_at_ms: NOW,
    }
}

fn task(id: &str, scope: &Scope) -> TaskRow {
    TaskRow {
        seq: 0,
        task_id: id.into(),
        scope: scope.clone(),
        agent: "summarize".into(),
        agent_version: "1.0.0".into(),
        labels: Labels::new(),
        cascade: vec![0x0a, 0x03, b'a', b'b', b'c'],
        secret_keys: vec!["OPENAI_KEY".into(), "GITHUB_TOKEN".into()],
        payload: format!("payload of {id}").into_bytes(),
        payload_size: format!("payload of {id}").len() as u32,
        priority: 0,
        idempotency_key: String::new(),
        request_hash: vec![7; 32],
        status: TaskStatus::Queued,
        status_reason: String::new(),
        attempt: 0,
        max_attempts: 3,
        lease_epoch: 0,
        worker_id: String::new(),
        run_id: String::new(),
        lease_expires_at_ms: None,
        deadline_at_ms: None,
        timeout_ms: TIMEOUT,
        outcome: Outcome::None,
        exit_code: 0,
        output_summary: String::new(),
        created_at_ms: NOW,
        updated_at_ms: NOW,
        finished_at_ms: None,
    }
}

/// Inserts a task that must be new.
async fn put(s: &dyn DispatchStore, t: TaskRow) -> TaskRow {
    match s.insert_task(&t, 0).await.expect("insert") {
        Inserted::New(row) => row,
        other => panic!("{} was not inserted: {other:?}", t.task_id),
    }
}

async fn get(s: &dyn DispatchStore, task_id: &str) -> TaskRow {
    s.get_task(task_id)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("{task_id} exists"))
}

fn batch<'a>(scope: &'a Scope, worker: &'a str, labels: &'a Labels, max: u32) -> ClaimBatch<'a> {
    ClaimBatch {
        scope,
        worker_id: worker,
        worker_labels: labels,
        max,
        now_ms: NOW,
        lease_ms: LEASE,
    }
}

/// Claims for a worker without labels at `now_ms`.
async fn claim_at(
    s: &dyn DispatchStore,
    scope: &Scope,
    worker: &str,
    max: u32,
    now_ms: i64,
) -> Vec<TaskRow> {
    let none = Labels::new();
    s.claim(&ClaimBatch {
        now_ms,
        ..batch(scope, worker, &none, max)
    })
    .await
    .expect("claim")
}

async fn claim(s: &dyn DispatchStore, scope: &Scope, worker: &str, max: u32) -> Vec<TaskRow> {
    claim_at(s, scope, worker, max, NOW).await
}

/// Claims the one queued task of a scope.
async fn claim1(s: &dyn DispatchStore, scope: &Scope, worker: &str, now_ms: i64) -> TaskRow {
    let mut got = claim_at(s, scope, worker, 10, now_ms).await;
    assert_eq!(got.len(), 1, "one task to claim in {scope}");
    got.remove(0)
}

fn ids(tasks: &[TaskRow]) -> Vec<&str> {
    tasks.iter().map(|t| t.task_id.as_str()).collect()
}

/// The report of the attempt `t` was claimed for.
fn report(t: &TaskRow, outcome: Outcome, now_ms: i64) -> Finish<'_> {
    Finish {
        task_id: &t.task_id,
        worker_id: &t.worker_id,
        lease_epoch: t.lease_epoch,
        outcome,
        exit_code: 3,
        output_summary: "done: 12 files",
        now_ms,
    }
}

/// A claimed row after a renewal at `at`.
fn renewed(claimed: &TaskRow, at: i64) -> TaskRow {
    TaskRow {
        lease_expires_at_ms: Some(at + LEASE),
        updated_at_ms: at,
        ..claimed.clone()
    }
}

fn without_payload(mut t: TaskRow) -> TaskRow {
    t.payload.clear();
    t
}

// ---- agents -----------------------------------------------------------------

async fn agents(h: Harness) {
    let s = h.store.as_ref();
    let v1 = agent("coder", "1.0.0", NOW);
    assert!(s.submit_agent(&v1).await.expect("submit"));
    let changed = AgentRow {
        image: "registry.test/evil:1".into(),
        ..v1.clone()
    };
    assert!(
        !s.submit_agent(&changed).await.expect("submit"),
        "a version is submitted once"
    );
    assert_eq!(
        s.get_agent("coder", "1.0.0").await.expect("get"),
        Some(v1.clone()),
        "a duplicate submission changes nothing"
    );
    assert_eq!(s.get_agent("coder", "9.9.9").await.expect("get"), None);
    assert_eq!(s.get_agent("nobody", "1.0.0").await.expect("get"), None);

    let approved = AgentRow {
        status: AgentStatus::Approved,
        decided_by: "spiffe://bulkhead.test/operator/bob".into(),
        decided_at_ms: Some(NOW + MINUTE),
        decision_reason: "reviewed".into(),
        ..v1.clone()
    };
    let decide = |version: &'static str, status, at| async move {
        s.decide_agent(
            "coder",
            version,
            status,
            "spiffe://bulkhead.test/operator/bob",
            at,
            "reviewed",
        )
        .await
        .expect("decide")
    };
    assert_eq!(
        decide("1.0.0", AgentStatus::Approved, NOW + MINUTE).await,
        Decision::Decided(approved.clone())
    );
    assert_eq!(
        decide("1.0.0", AgentStatus::Rejected, NOW + 2 * MINUTE).await,
        Decision::NotPending(approved.clone()),
        "only a pending version is decided"
    );
    assert_eq!(
        decide("7.0.0", AgentStatus::Approved, NOW).await,
        Decision::NotFound
    );

    // Approved later wins, whatever the submission order.
    for (version, submitted) in [("1.1.0", NOW + 1), ("2.0.0", NOW + 2), ("3.0.0", NOW + 3)] {
        assert!(
            s.submit_agent(&agent("coder", version, submitted))
                .await
                .expect("submit")
        );
    }
    assert!(matches!(
        decide("2.0.0", AgentStatus::Rejected, NOW + 9 * MINUTE).await,
        Decision::Decided(AgentRow {
            status: AgentStatus::Rejected,
            ..
        })
    ));
    decide("1.1.0", AgentStatus::Approved, NOW + 5 * MINUTE).await;
    decide("3.0.0", AgentStatus::Approved, NOW + 3 * MINUTE).await;
    let latest = s
        .latest_approved_agent("coder")
        .await
        .expect("latest")
        .expect("one is approved");
    assert_eq!(
        (latest.version.as_str(), latest.decided_at_ms),
        ("1.1.0", Some(NOW + 5 * MINUTE))
    );
    assert!(
        s.submit_agent(&agent("other", "1", NOW))
            .await
            .expect("submit")
    );
    assert_eq!(
        s.latest_approved_agent("other").await.expect("latest"),
        None
    );
    assert_eq!(
        s.latest_approved_agent("nobody").await.expect("latest"),
        None
    );
}

async fn agent_listing(h: Harness) {
    let s = h.store.as_ref();
    // (name, version, submitted): two versions of "b" share a submission time.
    let rows = [
        ("b", "1", NOW),
        ("a", "1", NOW + 5),
        ("c", "1", NOW),
        ("b", "3", NOW + 2),
        ("b", "2", NOW + 2),
        ("a", "2", NOW + 6),
        ("b", "0", NOW - 1),
    ];
    for (name, version, at) in rows {
        assert!(
            s.submit_agent(&agent(name, version, at))
                .await
                .expect("submit")
        );
    }
    s.decide_agent("b", "2", AgentStatus::Approved, "op", NOW, "")
        .await
        .expect("decide");
    let expected = ["a@2", "a@1", "b@3", "b@2", "b@1", "b@0", "c@1"];
    let key = |rows: Vec<AgentRow>| -> Vec<String> {
        rows.into_iter()
            .map(|a| format!("{}@{}", a.name, a.version))
            .collect()
    };
    assert_eq!(
        key(s.list_agents("", None, 0, 100).await.expect("list")),
        expected
    );
    let mut paged = Vec::new();
    for offset in (0..8).step_by(3) {
        paged.extend(key(s.list_agents("", None, offset, 3).await.expect("list")));
    }
    assert_eq!(paged, expected, "offset pages cover the list exactly");
    assert_eq!(
        key(s.list_agents("b", None, 1, 2).await.expect("list")),
        ["b@2", "b@1"]
    );
    assert_eq!(
        key(s
            .list_agents("", Some(AgentStatus::Approved), 0, 100)
            .await
            .expect("list")),
        ["b@2"]
    );
    assert_eq!(
        key(s
            .list_agents("b", Some(AgentStatus::Pending), 0, 100)
            .await
            .expect("list")),
        ["b@3", "b@1", "b@0"]
    );
    assert!(
        s.list_agents("zzz", None, 0, 10)
            .await
            .expect("list")
            .is_empty()
    );
}

// ---- workers ----------------------------------------------------------------

async fn workers(h: Harness) {
    let s = h.store.as_ref();
    let (x, px, y) = (tenant("x"), pool("x"), tenant("y"));
    for (id, scope) in [("w3", &x), ("w1", &x), ("w2", &px), ("w4", &y), ("w5", &x)] {
        s.upsert_worker(&worker(id, scope)).await.expect("upsert");
    }
    assert_eq!(
        s.get_worker("w1").await.expect("get"),
        Some(worker("w1", &x))
    );
    assert_eq!(s.get_worker("w9").await.expect("get"), None);

    // A registration replaces every field.
    let again = WorkerRow {
        spiffe_id: "spiffe://bulkhead.test/worker/w1-new".into(),
        scope: y.clone(),
        labels: labels(&[("k8s.io/zone", "eu-west-1")]),
        max_concurrent_runs: 16,
        sandbox_backends: vec![3],
        version: "0.2.0".into(),
        state: WorkerState::Draining,
        registered_at_ms: NOW + MINUTE,
        last_heartbeat_at_ms: NOW + MINUTE,
        ..worker("w1", &x)
    };
    s.upsert_worker(&again).await.expect("upsert");
    assert_eq!(s.get_worker("w1").await.expect("get"), Some(again.clone()));
    s.upsert_worker(&worker("w1", &x)).await.expect("upsert");

    assert!(
        s.set_worker_state("w3", WorkerState::Disconnected)
            .await
            .expect("state")
    );
    assert!(
        !s.set_worker_state("w9", WorkerState::Draining)
            .await
            .expect("state")
    );
    assert_eq!(
        s.get_worker("w3").await.expect("get").map(|w| w.state),
        Some(WorkerState::Disconnected)
    );

    let list = |filter: WorkerFilter, after: &'static str, limit| async move {
        s.list_workers(&filter, after, limit)
            .await
            .expect("list")
            .into_iter()
            .map(|w| w.worker_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        list(WorkerFilter::default(), "", 100).await,
        ["w1", "w2", "w3", "w4", "w5"]
    );
    assert_eq!(list(WorkerFilter::default(), "w2", 2).await, ["w3", "w4"]);
    assert_eq!(
        list(WorkerFilter::default(), "w5", 2).await,
        Vec::<String>::new()
    );
    let of_x = WorkerFilter {
        tenant: "x".into(),
        ..Default::default()
    };
    assert_eq!(list(of_x.clone(), "", 100).await, ["w1", "w3", "w5"]);
    assert_eq!(list(of_x, "w1", 1).await, ["w3"]);
    let pool_x = WorkerFilter {
        pool: "x".into(),
        ..Default::default()
    };
    assert_eq!(list(pool_x, "", 100).await, ["w2"]);
    let disconnected = WorkerFilter {
        state: Some(WorkerState::Disconnected),
        ..Default::default()
    };
    assert_eq!(list(disconnected, "", 100).await, ["w3"]);

    let of_scope = |scope: Scope| async move {
        s.workers_of_scope(&scope)
            .await
            .expect("of scope")
            .into_iter()
            .map(|w| w.worker_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(of_scope(tenant("x")).await, ["w1", "w3", "w5"]);
    assert_eq!(of_scope(pool("x")).await, ["w2"]);
    assert_eq!(of_scope(tenant("z")).await, Vec::<String>::new());

    s.remove_workers(&["w1".into(), "w2".into(), "w9".into()])
        .await
        .expect("remove");
    s.remove_workers(&[]).await.expect("remove nothing");
    assert_eq!(s.get_worker("w1").await.expect("get"), None);
    assert_eq!(
        list(WorkerFilter::default(), "", 100).await,
        ["w3", "w4", "w5"]
    );
}

// ---- tasks ------------------------------------------------------------------

/// Many reports at once (which SQLite applies as one statement per group
/// commit): each gets the answer it would get alone. Good reports apply
/// (succeeded, or queued again after an error); a report repeated at once
/// applies once and is a repeat the other time; a stale epoch, another
/// worker's report and an unknown task change nothing.
async fn concurrent_finishes(h: Harness) {
    let s = &h.store;
    let scope = tenant("acme");
    for i in 0..60 {
        put(s.as_ref(), task(&format!("rep-{i:02}"), &scope)).await;
    }
    let mut claimed = claim(s.as_ref(), &scope, "w1", 60).await;
    claimed.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    assert_eq!(claimed.len(), 60);
    let finish = |task_id: String, worker: String, epoch: u64, outcome: Outcome| {
        let s = Arc::clone(s);
        tokio::spawn(async move {
            let r = s
                .finish(&Finish {
                    task_id: &task_id,
                    worker_id: &worker,
                    lease_epoch: epoch,
                    outcome,
                    exit_code: 0,
                    output_summary: "ok",
                    now_ms: NOW + 10,
                })
                .await
                .expect("finish");
            (task_id, r)
        })
    };
    let mut calls = Vec::new();
    for (i, t) in claimed.iter().enumerate() {
        let (worker, epoch, outcome) = match i {
            0..40 => (t.worker_id.clone(), t.lease_epoch, Outcome::Succeeded),
            40..50 => (t.worker_id.clone(), t.lease_epoch, Outcome::Error),
            50..55 => (t.worker_id.clone(), t.lease_epoch + 1, Outcome::Succeeded),
            _ => ("w2".to_owned(), t.lease_epoch, Outcome::Succeeded),
        };
        calls.push(finish(t.task_id.clone(), worker, epoch, outcome));
    }
    for t in &claimed[..5] {
        calls.push(finish(
            t.task_id.clone(),
            t.worker_id.clone(),
            t.lease_epoch,
            Outcome::Succeeded,
        ));
    }
    for i in 0..3 {
        calls.push(finish(
            format!("no-such-{i}"),
            "w1".into(),
            1,
            Outcome::Succeeded,
        ));
    }
    let mut applied = BTreeMap::new();
    let mut repeats = Vec::new();
    let mut stale = Vec::new();
    let mut unknown = 0;
    for c in calls {
        let (id, r) = c.await.expect("join");
        match r {
            Finished::Applied(t) => {
                assert!(applied.insert(id, t).is_none(), "a task applied twice");
            }
            Finished::Repeat(t) => repeats.push(t.task_id),
            Finished::Stale(t) => stale.push(t.task_id),
            Finished::Unknown => unknown += 1,
        }
    }
    assert_eq!(applied.len(), 50);
    repeats.sort();
    assert_eq!(repeats, ids(&claimed[..5]));
    stale.sort();
    assert_eq!(stale, ids(&claimed[50..]));
    assert_eq!(unknown, 3);
    for (i, t) in claimed.iter().enumerate() {
        let now = get(s.as_ref(), &t.task_id).await;
        let want = match i {
            0..40 => TaskStatus::Succeeded,
            40..50 => TaskStatus::Queued,
            _ => TaskStatus::Assigned,
        };
        assert_eq!(now.status, want, "{}", t.task_id);
        if i < 50 {
            assert_eq!(
                applied[&t.task_id], now,
                "the applied row is the stored one"
            );
        }
    }
}

/// Many Enqueues at once (which SQLite inserts as one multi-row statement
/// per group commit): each task is inserted whole with a seq of its own. In
/// a second burst, duplicate task ids (of the burst and of the first) fail
/// alone, and the others still land.
async fn concurrent_inserts(h: Harness) {
    let s = &h.store;
    let scope = tenant("acme");
    let spawn = |t: TaskRow| {
        let s = Arc::clone(s);
        tokio::spawn(async move {
            let r = s.insert_task(&t, 0).await;
            (t, r)
        })
    };
    let burst = |range: std::ops::Range<i32>| {
        range
            .map(|i| {
                spawn(TaskRow {
                    priority: i % 5,
                    payload: format!("payload {i}").into_bytes(),
                    payload_size: format!("payload {i}").len() as u32,
                    ..task(&format!("burst-{i}"), &scope)
                })
            })
            .collect::<Vec<_>>()
    };
    let mut seqs = std::collections::HashSet::new();
    for t in burst(0..100) {
        let (t, r) = t.await.expect("join");
        let Ok(Inserted::New(row)) = r else {
            panic!("{} not inserted: {r:?}", t.task_id);
        };
        assert_eq!(
            row,
            TaskRow {
                seq: row.seq,
                ..t.clone()
            }
        );
        assert!(seqs.insert(row.seq), "seq {} given twice", row.seq);
        assert_eq!(get(s.as_ref(), &t.task_id).await, row);
    }

    // The second burst, and duplicates: one of the first burst, two of this.
    let mut second = burst(100..200);
    let dup_ids = ["burst-0", "burst-120", "burst-180"];
    second.extend(dup_ids.iter().map(|id| spawn(task(id, &scope))));
    let mut refused = Vec::new();
    for t in second {
        let (t, r) = t.await.expect("join");
        match r {
            Ok(Inserted::New(row)) => {
                assert!(seqs.insert(row.seq), "seq {} given twice", row.seq);
                assert_eq!(get(s.as_ref(), &t.task_id).await.seq, row.seq);
            }
            Ok(other) => panic!("{} not inserted: {other:?}", t.task_id),
            Err(_) => refused.push(t.task_id),
        }
    }
    refused.sort();
    assert_eq!(
        refused,
        ["burst-0", "burst-120", "burst-180"],
        "each duplicate id refused once"
    );
    assert_eq!(seqs.len(), 200, "every id is in the store once");
    let listed = s
        .list_tasks(
            &TaskFilter {
                tenant: "acme".into(),
                ..Default::default()
            },
            None,
            1000,
        )
        .await
        .expect("list");
    assert_eq!(listed.len(), 200);
}

async fn tasks(h: Harness) {
    let s = h.store.as_ref();
    let (acme, shared) = (tenant("acme"), pool("shared"));
    let needs = labels(&[("k8s.io/zone", "eu-west-1"), ("team.x/y-z", "a b")]);
    let mut inserted = Vec::new();
    for i in 0..6 {
        let scope = if i % 3 == 2 { &shared } else { &acme };
        let t = TaskRow {
            agent: if i % 2 == 0 { "summarize" } else { "review" }.into(),
            labels: needs.clone(),
            priority: i - 2,
            created_at_ms: NOW + i64::from(i),
            ..task(&format!("t{i}"), scope)
        };
        let row = put(s, t.clone()).await;
        assert!(row.seq > 0);
        assert_eq!(row, TaskRow { seq: row.seq, ..t });
        inserted.push(row);
    }
    assert!(
        inserted.windows(2).all(|w| w[0].seq < w[1].seq),
        "seq grows with each insert"
    );
    for t in &inserted {
        assert_eq!(&get(s, &t.task_id).await, t, "read back with its payload");
    }
    assert_eq!(s.get_task("t99").await.expect("get"), None);

    let list = |filter: TaskFilter, before: Option<i64>, limit| async move {
        s.list_tasks(&filter, before, limit)
            .await
            .expect("list")
            .into_iter()
            .map(without_payload)
            .collect::<Vec<_>>()
    };
    let newest_first: Vec<TaskRow> = inserted
        .iter()
        .rev()
        .cloned()
        .map(without_payload)
        .collect();
    assert_eq!(list(TaskFilter::default(), None, 100).await, newest_first);
    assert_eq!(
        list(TaskFilter::default(), Some(inserted[4].seq), 2).await,
        newest_first[2..4],
        "a page after a cursor"
    );
    let names = |rows: Vec<TaskRow>| rows.into_iter().map(|t| t.task_id).collect::<Vec<_>>();
    let acme_only = TaskFilter {
        tenant: "acme".into(),
        ..Default::default()
    };
    assert_eq!(
        names(list(acme_only, None, 100).await),
        ["t4", "t3", "t1", "t0"]
    );
    let shared_only = TaskFilter {
        pool: "shared".into(),
        ..Default::default()
    };
    assert_eq!(names(list(shared_only, None, 100).await), ["t5", "t2"]);
    let acme_named_as_pool = TaskFilter {
        pool: "acme".into(),
        ..Default::default()
    };
    assert!(list(acme_named_as_pool, None, 100).await.is_empty());
    let reviews = TaskFilter {
        tenant: "acme".into(),
        agent: "review".into(),
        ..Default::default()
    };
    assert_eq!(names(list(reviews, None, 100).await), ["t3", "t1"]);

    s.claim(&batch(&acme, "w1", &needs, 1))
        .await
        .expect("claim");
    let assigned = TaskFilter {
        status: Some(TaskStatus::Assigned),
        ..Default::default()
    };
    // Priority i - 2: t4 is acme's highest.
    assert_eq!(names(list(assigned, None, 100).await), ["t4"]);
    let queued = TaskFilter {
        tenant: "acme".into(),
        status: Some(TaskStatus::Queued),
        ..Default::default()
    };
    assert_eq!(
        names(list(queued, Some(inserted[3].seq), 100).await),
        ["t1", "t0"]
    );

    assert!(
        s.insert_task(&task("t0", &acme), 0).await.is_err(),
        "a task id is inserted once"
    );
}

async fn idempotency(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    let keyed = |id: &str, scope: &Scope, created_at_ms| TaskRow {
        idempotency_key: "nightly-42".into(),
        created_at_ms,
        ..task(id, scope)
    };
    let window = NOW - MINUTE;
    let first = match s
        .insert_task(&keyed("k1", &acme, NOW), window)
        .await
        .expect("insert")
    {
        Inserted::New(row) => row,
        other => panic!("first use of a key: {other:?}"),
    };
    assert_eq!(
        s.insert_task(&keyed("k2", &acme, NOW + SECOND), window)
            .await
            .expect("insert"),
        Inserted::Existing(first.clone()),
        "the same key within the window returns the task"
    );
    assert_eq!(
        s.get_task("k2").await.expect("get"),
        None,
        "nothing inserted"
    );
    assert_eq!(
        s.find_idempotent(&acme, "nightly-42", window)
            .await
            .expect("find"),
        Some(first.clone())
    );
    assert_eq!(
        s.find_idempotent(&acme, "nightly-42", NOW + 1)
            .await
            .expect("find"),
        None,
        "created before the window"
    );
    assert_eq!(s.find_idempotent(&acme, "", 0).await.expect("find"), None);
    assert_eq!(
        s.find_idempotent(&pool("acme"), "nightly-42", 0)
            .await
            .expect("find"),
        None
    );

    // Other scopes have keys of their own.
    for (id, scope) in [("k3", tenant("other")), ("k4", pool("acme"))] {
        assert!(matches!(
            s.insert_task(&keyed(id, &scope, NOW), window)
                .await
                .expect("insert"),
            Inserted::New(_)
        ));
    }

    // Outside the window the key is free again: the older task loses it.
    let later = NOW + 10 * MINUTE;
    let newer = match s
        .insert_task(&keyed("k5", &acme, later), later - MINUTE)
        .await
        .expect("insert")
    {
        Inserted::New(row) => row,
        other => panic!("a key used before the window: {other:?}"),
    };
    assert_eq!(get(s, "k1").await.idempotency_key, "");
    assert_eq!(
        s.find_idempotent(&acme, "nightly-42", 0)
            .await
            .expect("find"),
        Some(newer.clone())
    );
    assert_eq!(
        s.insert_task(&keyed("k6", &acme, later), later - MINUTE)
            .await
            .expect("insert"),
        Inserted::Existing(newer)
    );

    // Tasks without a key never collide.
    put(s, task("n1", &acme)).await;
    put(s, task("n2", &acme)).await;
}

// ---- claims -----------------------------------------------------------------

async fn claim_isolation(h: Harness) {
    let s = h.store.as_ref();
    let (tx, px, ty) = (tenant("x"), pool("x"), tenant("y"));
    for (id, scope) in [
        ("tx1", &tx),
        ("px1", &px),
        ("ty1", &ty),
        ("tx2", &tx),
        ("px2", &px),
    ] {
        put(s, task(id, scope)).await;
    }
    assert!(
        claim(s, &tenant("a"), "wa", 10).await.is_empty(),
        "a tenant without tasks gets none of another's"
    );
    assert!(claim(s, &pool("y"), "wpy", 10).await.is_empty());
    let none = Labels::new();
    assert_eq!(
        s.claim_task(&tenant("a"), "tx1", &batch(&tenant("a"), "wa", &none, 1))
            .await
            .expect("claim one"),
        ClaimOne::NotFound,
        "another scope's task is not found"
    );
    assert_eq!(
        s.claim_task(&pool("x"), "tx1", &batch(&pool("x"), "wpx", &none, 1))
            .await
            .expect("claim one"),
        ClaimOne::NotFound,
        "a pool is not the tenant of the same name"
    );
    assert_eq!(
        s.claim_task(&tx, "tx1", &batch(&ty, "wy", &none, 1))
            .await
            .expect("claim one"),
        ClaimOne::NotFound,
        "the claiming worker's scope must be the task's"
    );
    assert_eq!(get(s, "tx1").await.status, TaskStatus::Queued);

    let got = claim(s, &px, "wpx", 10).await;
    assert_eq!(ids(&got), ["px1", "px2"]);
    assert!(got.iter().all(|t| t.scope == px));
    assert_eq!(ids(&claim(s, &tx, "wx", 10).await), ["tx1", "tx2"]);
    assert_eq!(ids(&claim(s, &ty, "wy", 10).await), ["ty1"]);
}

async fn claim_labels(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    let needs = [
        ("none", labels(&[])),
        ("gpu", labels(&[("gpu", "a100")])),
        ("zone", labels(&[("k8s.io/zone", "eu-west-1")])),
        (
            "both",
            labels(&[("gpu", "a100"), ("k8s.io/zone", "eu-west-1")]),
        ),
        ("other-gpu", labels(&[("gpu", "h100")])),
        ("case", labels(&[("gpu", "A100")])),
        ("missing", labels(&[("team.x/y-z", "a")])),
        ("lookalike", labels(&[("k8s_io/zone", "eu-west-1")])),
        ("extra", labels(&[("gpu", "a100"), ("ssd", "yes")])),
    ];
    for (id, l) in &needs {
        put(
            s,
            TaskRow {
                labels: l.clone(),
                ..task(id, &acme)
            },
        )
        .await;
    }
    let worker_labels = labels(&[
        ("gpu", "a100"),
        ("k8s.io/zone", "eu-west-1"),
        ("arch", "x86_64"),
    ]);
    let got = s
        .claim(&batch(&acme, "w1", &worker_labels, 100))
        .await
        .expect("claim");
    assert_eq!(ids(&got), ["none", "gpu", "zone", "both"]);
    let none = Labels::new();
    assert!(
        s.claim(&batch(&acme, "w2", &none, 100))
            .await
            .expect("claim")
            .is_empty(),
        "a worker without labels gets only tasks without"
    );

    // A long backlog of tasks no worker matches does not hide the one it does.
    for i in 0..300 {
        put(
            s,
            TaskRow {
                labels: labels(&[("gpu", "tpu")]),
                priority: 5,
                ..task(&format!("backlog{i}"), &acme)
            },
        )
        .await;
    }
    put(
        s,
        TaskRow {
            labels: labels(&[("team.x/y-z", "a")]),
            ..task("last", &acme)
        },
    )
    .await;
    let wide = labels(&[("team.x/y-z", "a"), ("gpu", "a100"), ("ssd", "yes")]);
    assert_eq!(
        ids(&s.claim(&batch(&acme, "w3", &wide, 2)).await.expect("claim")),
        ["missing", "extra"]
    );
    assert_eq!(
        ids(&s.claim(&batch(&acme, "w3", &wide, 2)).await.expect("claim")),
        ["last"]
    );
}

async fn claim_order(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    for (id, priority) in [
        ("a", 0),
        ("b", 5),
        ("c", 0),
        ("d", 5),
        ("e", 9),
        ("f", -1),
        ("g", 0),
    ] {
        put(
            s,
            TaskRow {
                priority,
                timeout_ms: TIMEOUT + i64::from(priority),
                ..task(id, &acme)
            },
        )
        .await;
    }
    assert!(
        claim(s, &acme, "w1", 0).await.is_empty(),
        "max 0 claims none"
    );
    let first = claim_at(s, &acme, "w1", 4, NOW + SECOND).await;
    assert_eq!(ids(&first), ["e", "b", "d", "a"], "priority, then FIFO");
    for t in &first {
        let before = get(s, &t.task_id).await;
        assert_eq!(t, &before, "the claim returns the stored row, payload too");
        assert_eq!(t.payload, format!("payload of {}", t.task_id).into_bytes());
        assert_eq!(
            (t.status, t.attempt, t.lease_epoch),
            (TaskStatus::Assigned, 1, 1)
        );
        assert_eq!((t.worker_id.as_str(), t.run_id.as_str()), ("w1", ""));
        assert_eq!(t.lease_expires_at_ms, Some(NOW + SECOND + LEASE));
        assert_eq!(t.deadline_at_ms, Some(NOW + SECOND + t.timeout_ms));
        assert_eq!(t.updated_at_ms, NOW + SECOND);
        assert_eq!(t.status_reason, "");
    }
    assert_eq!(ids(&claim(s, &acme, "w2", 10).await), ["c", "g", "f"]);
    assert!(claim(s, &acme, "w2", 10).await.is_empty());

    // Given back, a task is claimed again at the next attempt and epoch.
    let e = &first[0];
    s.release_attempt(&e.task_id, e.lease_epoch, "refused", NOW + 2 * SECOND)
        .await
        .expect("release")
        .expect("released");
    let again = claim1(s, &acme, "w3", NOW + 3 * SECOND).await;
    assert_eq!(
        (again.task_id.as_str(), again.attempt, again.lease_epoch),
        ("e", 2, 2)
    );
    assert_eq!(again.worker_id, "w3");
}

async fn claim_one(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    put(
        s,
        TaskRow {
            labels: labels(&[("k8s.io/zone", "eu")]),
            ..task("t1", &acme)
        },
    )
    .await;
    put(s, task("t2", &acme)).await;
    let worker_labels = labels(&[("k8s.io/zone", "eu")]);
    let none = Labels::new();
    assert_eq!(
        s.claim_task(&acme, "t1", &batch(&acme, "w0", &none, 1))
            .await
            .expect("claim one"),
        ClaimOne::LabelsMismatch
    );
    let claimed = match s
        .claim_task(&acme, "t1", &batch(&acme, "w1", &worker_labels, 1))
        .await
        .expect("claim one")
    {
        ClaimOne::Claimed(t) => t,
        other => panic!("t1 is claimable: {other:?}"),
    };
    assert_eq!(
        (claimed.status, claimed.attempt, claimed.lease_epoch),
        (TaskStatus::Assigned, 1, 1)
    );
    assert_eq!(claimed.worker_id, "w1");
    assert_eq!(claimed.lease_expires_at_ms, Some(NOW + LEASE));
    assert_eq!(claimed.deadline_at_ms, Some(NOW + TIMEOUT));
    assert_eq!(claimed, get(s, "t1").await);
    assert_eq!(
        s.claim_task(&acme, "t1", &batch(&acme, "w2", &worker_labels, 1))
            .await
            .expect("claim one"),
        ClaimOne::NotQueued(claimed)
    );
    assert_eq!(
        s.claim_task(&acme, "nope", &batch(&acme, "w2", &worker_labels, 1))
            .await
            .expect("claim one"),
        ClaimOne::NotFound
    );
    assert_eq!(
        ids(&claim(s, &acme, "w2", 10).await),
        ["t2"],
        "claim_task took only its task"
    );
}

// ---- leases -----------------------------------------------------------------

async fn start_and_renew(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    s.upsert_worker(&worker("w1", &acme)).await.expect("upsert");
    for id in ["t1", "t2", "t3"] {
        put(s, task(id, &acme)).await;
    }
    let mine = claim(s, &acme, "w1", 2).await;
    let theirs = claim1(s, &acme, "w2", NOW).await;
    let t1 = &mine[0];
    let start = |worker: &'static str, epoch, at| async move {
        s.start_run(&t1.task_id, worker, epoch, "run-1", at, LEASE)
            .await
            .expect("start")
    };
    assert_eq!(start("w1", 2, NOW + SECOND).await, None, "another epoch");
    assert_eq!(start("w2", 1, NOW + SECOND).await, None, "another worker");
    let running = start("w1", 1, NOW + SECOND).await.expect("started");
    assert_eq!(
        (running.status, running.run_id.as_str()),
        (TaskStatus::Running, "run-1")
    );
    assert_eq!(running.lease_expires_at_ms, Some(NOW + SECOND + LEASE));
    assert_eq!(
        running.deadline_at_ms, t1.deadline_at_ms,
        "the deadline stays"
    );
    assert_eq!(running, get(s, "t1").await);
    assert_eq!(start("w1", 1, NOW + 2 * SECOND).await, None, "started once");
    let of_run = |scope: Scope, run: &'static str| async move {
        s.running_task_of_run(&scope, run).await.expect("by run")
    };
    assert_eq!(of_run(acme.clone(), "run-1").await, Some(running.clone()));
    assert_eq!(
        of_run(tenant("globex"), "run-1").await,
        None,
        "another tenant"
    );
    assert_eq!(
        of_run(Scope::Pool("acme".into()), "run-1").await,
        None,
        "a pool"
    );
    assert_eq!(of_run(acme.clone(), "run-2").await, None, "another run");
    assert_eq!(of_run(acme.clone(), "").await, None, "no run");

    let at = NOW + 10 * SECOND;
    let listed = vec![
        ("t1".to_owned(), 1),
        ("t2".to_owned(), 1),
        ("t2".to_owned(), 7),
        (theirs.task_id.clone(), 1),
        ("nope".to_owned(), 1),
    ];
    let stale = s
        .renew_leases("w1", &listed, at, LEASE)
        .await
        .expect("renew");
    assert_eq!(
        stale,
        vec![
            ("t2".to_owned(), 7),
            (theirs.task_id.clone(), 1),
            ("nope".to_owned(), 1)
        ]
    );
    for id in ["t1", "t2"] {
        assert_eq!(get(s, id).await.lease_expires_at_ms, Some(at + LEASE));
    }
    assert_eq!(
        get(s, &theirs.task_id).await.lease_expires_at_ms,
        Some(NOW + LEASE),
        "another worker's lease is not renewed"
    );
    assert_eq!(
        s.get_worker("w1")
            .await
            .expect("get")
            .map(|w| w.last_heartbeat_at_ms),
        Some(at)
    );
    assert_eq!(
        s.renew_leases("w1", &[], at + SECOND, LEASE)
            .await
            .expect("heartbeat"),
        vec![]
    );
    assert_eq!(
        s.get_worker("w1")
            .await
            .expect("get")
            .map(|w| w.last_heartbeat_at_ms),
        Some(at + SECOND),
        "a heartbeat without leases still counts"
    );

    // A finished task's lease is no longer current.
    s.finish(&report(&get(s, "t2").await, Outcome::Succeeded, at))
        .await
        .expect("finish");
    assert_eq!(
        s.renew_leases("w1", &[("t1".into(), 1), ("t2".into(), 1)], at, LEASE)
            .await
            .expect("renew"),
        vec![("t2".to_owned(), 1)]
    );
}

async fn finish_outcomes(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    let cases = [
        (Outcome::Succeeded, TaskStatus::Succeeded),
        (Outcome::Failed, TaskStatus::Failed),
        (Outcome::Revoked, TaskStatus::Failed),
        (Outcome::TimedOut, TaskStatus::Failed),
        (Outcome::Cancelled, TaskStatus::Failed),
    ];
    for (i, (outcome, status)) in cases.into_iter().enumerate() {
        let id = format!("t{i}");
        put(s, task(&id, &acme)).await;
        let claimed = claim1(s, &acme, "w1", NOW).await;
        s.start_run(&id, "w1", 1, "run", NOW + 1, LEASE)
            .await
            .expect("start")
            .expect("started");
        let at = NOW + MINUTE;
        let applied = match s
            .finish(&report(&claimed, outcome, at))
            .await
            .expect("finish")
        {
            Finished::Applied(t) => t,
            other => panic!("{outcome:?} applies: {other:?}"),
        };
        assert_eq!(applied.status, status, "{outcome:?}");
        assert_eq!(applied.outcome, outcome);
        assert_eq!(
            (applied.exit_code, applied.output_summary.as_str()),
            (3, "done: 12 files")
        );
        assert_eq!(applied.finished_at_ms, Some(at));
        assert_eq!(applied.updated_at_ms, at);
        assert_eq!(
            (applied.lease_expires_at_ms, applied.deadline_at_ms),
            (None, None)
        );
        assert_eq!(
            (applied.worker_id.as_str(), applied.run_id.as_str()),
            ("w1", "run"),
            "who ran it stays"
        );
        assert_eq!((applied.attempt, applied.lease_epoch), (1, 1));
        assert_eq!(applied.status_reason, "");
        assert_eq!(applied, get(s, &id).await);
    }
    assert!(
        claim(s, &acme, "w1", 10).await.is_empty(),
        "final tasks stay"
    );
}

async fn finish_errors(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    put(
        s,
        TaskRow {
            max_attempts: 2,
            ..task("t1", &acme)
        },
    )
    .await;
    let first = claim1(s, &acme, "w1", NOW).await;
    let requeued = match s
        .finish(&report(&first, Outcome::Error, NOW + SECOND))
        .await
        .expect("finish")
    {
        Finished::Applied(t) => t,
        other => panic!("an error applies: {other:?}"),
    };
    assert_eq!(requeued.status, TaskStatus::Queued, "attempts remain");
    assert_eq!(
        (requeued.attempt, requeued.lease_epoch),
        (1, 1),
        "the epoch stays until the next assignment"
    );
    assert_eq!(requeued.outcome, Outcome::Error);
    assert_eq!((requeued.exit_code, requeued.finished_at_ms), (3, None));
    assert_eq!(
        (requeued.lease_expires_at_ms, requeued.deadline_at_ms),
        (None, None)
    );

    let second = claim1(s, &acme, "w2", NOW + 2 * SECOND).await;
    assert_eq!((second.attempt, second.lease_epoch), (2, 2));
    let exhausted = match s
        .finish(&report(&second, Outcome::Error, NOW + 3 * SECOND))
        .await
        .expect("finish")
    {
        Finished::Applied(t) => t,
        other => panic!("an error applies: {other:?}"),
    };
    assert_eq!(exhausted.status, TaskStatus::Failed);
    assert_eq!(exhausted.status_reason, "attempts exhausted");
    assert_eq!(exhausted.outcome, Outcome::Error);
    assert_eq!(exhausted.finished_at_ms, Some(NOW + 3 * SECOND));
    assert!(claim(s, &acme, "w1", 10).await.is_empty());
}

async fn finish_refusals(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    for id in ["t1", "t2", "t3"] {
        put(s, task(id, &acme)).await;
    }
    let claimed = claim(s, &acme, "w1", 3).await;
    let (t1, t2, t3) = (&claimed[0], &claimed[1], &claimed[2]);

    assert_eq!(
        s.finish(&Finish {
            lease_epoch: 2,
            ..report(t1, Outcome::Succeeded, NOW)
        })
        .await
        .expect("finish"),
        Finished::Stale(t1.clone()),
        "another epoch"
    );
    assert_eq!(
        s.finish(&Finish {
            worker_id: "w2",
            ..report(t1, Outcome::Succeeded, NOW)
        })
        .await
        .expect("finish"),
        Finished::Stale(t1.clone()),
        "another worker"
    );
    assert_eq!(
        s.finish(&Finish {
            task_id: "nope",
            ..report(t1, Outcome::Succeeded, NOW)
        })
        .await
        .expect("finish"),
        Finished::Unknown
    );
    assert_eq!(get(s, "t1").await, *t1, "refusals change nothing");

    let done = match s
        .finish(&report(t1, Outcome::Succeeded, NOW + SECOND))
        .await
        .expect("finish")
    {
        Finished::Applied(t) => t,
        other => panic!("applies: {other:?}"),
    };
    assert_eq!(
        s.finish(&report(t1, Outcome::Failed, NOW + 2 * SECOND))
            .await
            .expect("finish"),
        Finished::Repeat(done.clone()),
        "a repeated report is accepted and changes nothing"
    );
    assert_eq!(get(s, "t1").await, done);

    // Cancelled while the worker held it: its report is a repeat.
    let Cancelled::Cancelled { after, .. } = s
        .cancel_task("t2", "operator", NOW + SECOND)
        .await
        .expect("cancel")
    else {
        panic!("t2 is cancellable");
    };
    assert_eq!(
        s.finish(&report(t2, Outcome::Succeeded, NOW + 2 * SECOND))
            .await
            .expect("finish"),
        Finished::Repeat(after)
    );

    // Lapsed and claimed by another worker: the old holder is stale.
    s.release_attempt("t3", 1, "refused", NOW + SECOND)
        .await
        .expect("release")
        .expect("released");
    let again = claim1(s, &acme, "w2", NOW + 2 * SECOND).await;
    assert_eq!(
        s.finish(&report(t3, Outcome::Succeeded, NOW + 3 * SECOND))
            .await
            .expect("finish"),
        Finished::Stale(again.clone())
    );
    assert!(matches!(
        s.finish(&report(&again, Outcome::Succeeded, NOW + 3 * SECOND))
            .await
            .expect("finish"),
        Finished::Applied(_)
    ));
}

async fn expiry(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    put(
        s,
        TaskRow {
            max_attempts: 2,
            ..task("lapse", &acme)
        },
    )
    .await;
    let claimed = claim1(s, &acme, "w1", NOW).await;
    let lapse_at = NOW + LEASE;
    assert!(
        s.expire(lapse_at, 100).await.expect("expire").is_empty(),
        "a lease lapses after its expiry"
    );
    let released = s.expire(lapse_at + 1, 100).await.expect("expire");
    assert_eq!(released.len(), 1);
    let Released { before, after } = &released[0];
    assert_eq!(before, &claimed);
    assert_eq!(
        (after.status, after.status_reason.as_str()),
        (TaskStatus::Queued, "lease expired")
    );
    assert_eq!(
        (after.lease_expires_at_ms, after.deadline_at_ms),
        (None, None)
    );
    assert_eq!(
        (after.worker_id.as_str(), after.attempt, after.lease_epoch),
        ("w1", 1, 1),
        "the last holder stays"
    );
    assert_eq!(
        (after.finished_at_ms, after.updated_at_ms),
        (None, lapse_at + 1)
    );
    assert_eq!(after, &get(s, "lapse").await);

    // The last attempt lapses: failed.
    let second = claim1(s, &acme, "w2", NOW + MINUTE).await;
    assert_eq!((second.attempt, second.lease_epoch), (2, 2));
    s.start_run("lapse", "w2", 2, "run-2", NOW + MINUTE, LEASE)
        .await
        .expect("start")
        .expect("started");
    let end = NOW + MINUTE + LEASE + 1;
    let released = s.expire(end, 100).await.expect("expire");
    assert_eq!(released.len(), 1);
    let after = &released[0].after;
    assert_eq!(released[0].before.status, TaskStatus::Running);
    assert_eq!(
        (after.status, after.status_reason.as_str()),
        (TaskStatus::Failed, "attempts exhausted")
    );
    assert_eq!(after.finished_at_ms, Some(end));
    assert_eq!(after.outcome, Outcome::None);

    // A deadline passes while the lease is renewed.
    put(
        s,
        TaskRow {
            timeout_ms: 5 * SECOND,
            ..task("slow", &acme)
        },
    )
    .await;
    let slow = claim1(s, &acme, "w1", NOW).await;
    assert_eq!(
        s.renew_leases("w1", &[("slow".into(), 1)], NOW + 4 * SECOND, LEASE)
            .await
            .expect("renew"),
        vec![]
    );
    assert!(
        s.expire(NOW + 5 * SECOND, 100)
            .await
            .expect("expire")
            .is_empty()
    );
    let released = s.expire(NOW + 5 * SECOND + 1, 100).await.expect("expire");
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].before, renewed(&slow, NOW + 4 * SECOND));
    let after = &released[0].after;
    assert_eq!(
        (after.status, after.outcome, after.status_reason.as_str()),
        (TaskStatus::Failed, Outcome::TimedOut, "deadline exceeded")
    );
    assert_eq!(after.finished_at_ms, Some(NOW + 5 * SECOND + 1));
    assert_eq!(
        after.attempt, slow.attempt,
        "no attempt is left to retry it"
    );

    // A limit per call.
    for i in 0..3 {
        put(s, task(&format!("many{i}"), &acme)).await;
    }
    claim(s, &acme, "w3", 10).await;
    let later = NOW + LEASE + 1;
    assert_eq!(s.expire(later, 2).await.expect("expire").len(), 2);
    assert_eq!(s.expire(later, 2).await.expect("expire").len(), 1);
    assert!(s.expire(later, 2).await.expect("expire").is_empty());
    assert!(s.expire(later, 0).await.expect("expire").is_empty());
}

async fn cancel(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    put(s, task("held", &acme)).await;
    let held = claim1(s, &acme, "w1", NOW).await;
    let queued = put(s, task("queued", &acme)).await;

    let at = NOW + SECOND;
    let Cancelled::Cancelled { before, after } = s
        .cancel_task("queued", "operator asked", at)
        .await
        .expect("cancel")
    else {
        panic!("a queued task is cancellable");
    };
    assert_eq!(before, queued);
    assert_eq!(
        (after.status, after.status_reason.as_str()),
        (TaskStatus::Cancelled, "operator asked")
    );
    assert_eq!((after.finished_at_ms, after.updated_at_ms), (Some(at), at));
    assert_eq!(after, get(s, "queued").await);

    let Cancelled::Cancelled { before, after } = s
        .cancel_task("held", "operator asked", at)
        .await
        .expect("cancel")
    else {
        panic!("a leased task is cancellable");
    };
    assert_eq!(before, held, "the row before tells who held it");
    assert_eq!(after.status, TaskStatus::Cancelled);
    assert_eq!(
        (after.lease_expires_at_ms, after.deadline_at_ms),
        (None, None)
    );
    assert_eq!(after.worker_id, "w1");

    assert_eq!(
        s.cancel_task("held", "again", at + 1)
            .await
            .expect("cancel"),
        Cancelled::AlreadyFinal(after)
    );
    assert_eq!(
        s.cancel_task("nope", "x", at).await.expect("cancel"),
        Cancelled::NotFound
    );
    assert!(claim(s, &acme, "w1", 10).await.is_empty());
    assert!(
        s.expire(at + TIMEOUT * 2, 10)
            .await
            .expect("expire")
            .is_empty()
    );
}

async fn release_workers(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    put(s, task("t1", &acme)).await;
    claim1(s, &acme, "w1", NOW).await;
    put(
        s,
        TaskRow {
            max_attempts: 1,
            ..task("t2", &acme)
        },
    )
    .await;
    claim1(s, &acme, "w1", NOW).await;
    s.start_run("t2", "w1", 1, "run", NOW, LEASE)
        .await
        .expect("start")
        .expect("started");
    put(s, task("t3", &acme)).await;
    claim1(s, &acme, "w2", NOW).await;
    put(s, task("t4", &acme)).await;
    let kept = claim1(s, &acme, "w3", NOW).await;
    put(s, task("t5", &acme)).await;

    let at = NOW + SECOND;
    let released = s
        .release_workers_tasks(&["w1".into(), "w2".into(), "w9".into()], "pool reset", at)
        .await
        .expect("release");
    let mut got: Vec<(&str, &str, TaskStatus, TaskStatus, &str)> = released
        .iter()
        .map(|r| {
            (
                r.after.task_id.as_str(),
                r.before.worker_id.as_str(),
                r.before.status,
                r.after.status,
                r.after.status_reason.as_str(),
            )
        })
        .collect();
    got.sort_by_key(|g| g.0);
    assert_eq!(
        got,
        [
            (
                "t1",
                "w1",
                TaskStatus::Assigned,
                TaskStatus::Queued,
                "pool reset"
            ),
            (
                "t2",
                "w1",
                TaskStatus::Running,
                TaskStatus::Failed,
                "pool reset"
            ),
            (
                "t3",
                "w2",
                TaskStatus::Assigned,
                TaskStatus::Queued,
                "pool reset"
            ),
        ]
    );
    for r in &released {
        assert_eq!(r.after, get(s, &r.after.task_id).await);
        assert_eq!(
            (r.after.lease_expires_at_ms, r.after.deadline_at_ms),
            (None, None)
        );
        let finished = (r.after.status == TaskStatus::Failed).then_some(at);
        assert_eq!(r.after.finished_at_ms, finished);
    }
    assert_eq!(get(s, "t4").await, kept, "other workers keep theirs");
    assert_eq!(get(s, "t5").await.status, TaskStatus::Queued);
    assert!(
        s.release_workers_tasks(&["w1".into()], "again", at)
            .await
            .expect("release")
            .is_empty()
    );
    assert!(
        s.release_workers_tasks(&[], "none", at)
            .await
            .expect("release")
            .is_empty()
    );
}

async fn release_one(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    put(
        s,
        TaskRow {
            max_attempts: 2,
            ..task("t1", &acme)
        },
    )
    .await;
    let first = claim1(s, &acme, "w1", NOW).await;
    let at = NOW + SECOND;
    assert_eq!(
        s.release_attempt("t1", 2, "refused", at)
            .await
            .expect("release"),
        None,
        "another epoch"
    );
    assert_eq!(
        s.release_attempt("nope", 1, "refused", at)
            .await
            .expect("release"),
        None
    );
    let released = s
        .release_attempt("t1", 1, "acceptance refused", at)
        .await
        .expect("release")
        .expect("released");
    assert_eq!(released.before, first);
    assert_eq!(
        (released.after.status, released.after.status_reason.as_str()),
        (TaskStatus::Queued, "acceptance refused")
    );
    assert_eq!(
        (
            released.after.lease_expires_at_ms,
            released.after.finished_at_ms
        ),
        (None, None)
    );
    assert_eq!(
        s.release_attempt("t1", 1, "again", at)
            .await
            .expect("release"),
        None,
        "no longer leased"
    );

    let second = claim1(s, &acme, "w2", at).await;
    s.start_run("t1", "w2", second.lease_epoch, "run", at, LEASE)
        .await
        .expect("start")
        .expect("started");
    let released = s
        .release_attempt("t1", second.lease_epoch, "acceptance refused", at + 1)
        .await
        .expect("release")
        .expect("released");
    assert_eq!(released.before.status, TaskStatus::Running);
    assert_eq!(released.after.status, TaskStatus::Failed, "no attempt left");
    assert_eq!(released.after.finished_at_ms, Some(at + 1));
    assert_eq!(released.after, get(s, "t1").await);
}

async fn queued_counts(h: Harness) {
    let s = h.store.as_ref();
    assert!(s.queued_scopes().await.expect("scopes").is_empty());
    let (tx, px, ty) = (tenant("x"), pool("x"), tenant("y"));
    for (i, scope) in [&tx, &px, &tx, &ty, &tx, &px].into_iter().enumerate() {
        put(s, task(&format!("t{i}"), scope)).await;
    }
    claim(s, &ty, "w1", 10).await;
    claim(s, &tx, "w2", 1).await;
    let mut counts = s.queued_scopes().await.expect("scopes");
    counts.sort();
    let mut expected = vec![(tx, 2), (px, 2)];
    expected.sort();
    assert_eq!(counts, expected);
}

// ---- held tasks -------------------------------------------------------------

/// A task held while its enqueue is being audited.
fn held(id: &str, scope: &Scope) -> TaskRow {
    TaskRow {
        status: TaskStatus::Held,
        ..task(id, scope)
    }
}

/// A held task handed off to `worker` at enqueue: its first attempt is
/// already leased.
fn handed_off(id: &str, scope: &Scope, worker: &str) -> TaskRow {
    TaskRow {
        worker_id: worker.into(),
        attempt: 1,
        lease_epoch: 1,
        lease_expires_at_ms: Some(NOW + LEASE),
        deadline_at_ms: Some(NOW + TIMEOUT),
        ..held(id, scope)
    }
}

/// What the release of a held row at `at` asks: `status`, with the lease and
/// deadline of an assignment at `at` (none when queued).
fn releasing(held: &TaskRow, status: TaskStatus, at: i64) -> TaskRow {
    let leased = status == TaskStatus::Assigned;
    TaskRow {
        status,
        lease_expires_at_ms: leased.then_some(at + LEASE),
        deadline_at_ms: leased.then_some(at + held.timeout_ms),
        updated_at_ms: at,
        ..held.clone()
    }
}

/// Releases a held row and waits until the release is committed (readers see
/// it); whether the row was still held.
async fn release(s: &dyn DispatchStore, after: &TaskRow) -> bool {
    let committed = s.release_held(after).await.expect("release held");
    committed.await.expect("committed")
}

const EVERY_STATUS: [TaskStatus; 7] = [
    TaskStatus::Queued,
    TaskStatus::Assigned,
    TaskStatus::Running,
    TaskStatus::Succeeded,
    TaskStatus::Failed,
    TaskStatus::Cancelled,
    TaskStatus::Held,
];

/// A held row is stored whole, a hand-off with its lease; its idempotency key
/// already counts.
async fn held_rows(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    for t in [held("h1", &acme), handed_off("h2", &acme, "w1")] {
        let row = put(s, t.clone()).await;
        assert_eq!(
            row,
            TaskRow { seq: row.seq, ..t },
            "a held row is inserted as given"
        );
        assert_eq!(row.status, TaskStatus::Held);
        assert_eq!(get(s, &row.task_id).await, row, "read back held");
    }
    let h2 = get(s, "h2").await;
    assert_eq!(
        (h2.worker_id.as_str(), h2.attempt, h2.lease_epoch),
        ("w1", 1, 1),
        "a hand-off is held with its first attempt"
    );
    assert_eq!(
        (h2.lease_expires_at_ms, h2.deadline_at_ms),
        (Some(NOW + LEASE), Some(NOW + TIMEOUT))
    );

    let keyed = |t: TaskRow| TaskRow {
        idempotency_key: "nightly-42".into(),
        ..t
    };
    let window = NOW - MINUTE;
    let first = match s
        .insert_task(&keyed(held("k1", &acme)), window)
        .await
        .expect("insert")
    {
        Inserted::New(row) => row,
        other => panic!("first use of a key: {other:?}"),
    };
    assert_eq!(
        s.insert_task(
            &TaskRow {
                created_at_ms: NOW + SECOND,
                ..keyed(task("k2", &acme))
            },
            window
        )
        .await
        .expect("insert"),
        Inserted::Existing(first.clone()),
        "a held task's key counts within the window"
    );
    assert_eq!(
        s.get_task("k2").await.expect("get"),
        None,
        "nothing inserted"
    );
    assert_eq!(get(s, "k1").await, first, "the held row is unchanged");
}

/// Nothing but its release or deletion touches a held row: no claim, no
/// expiry (however long past its lease and deadline), no listing, no count,
/// no cancel, no pool reset. Tasks around it are handled as usual.
async fn held_invisible(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    let gpu = labels(&[("gpu", "a100")]);
    let h_queued = put(
        s,
        TaskRow {
            labels: gpu.clone(),
            ..held("h-queued", &acme)
        },
    )
    .await;
    let h_handoff = put(s, handed_off("h-handoff", &acme, "w1")).await;
    let held_ids = ["h-queued", "h-handoff"];
    put(s, task("q1", &acme)).await;

    for id in held_ids {
        assert_eq!(
            s.claim_task(&acme, id, &batch(&acme, "w2", &gpu, 1))
                .await
                .expect("claim one"),
            ClaimOne::NotFound,
            "{id}: a held task is not found by claim_task"
        );
    }
    assert_eq!(
        ids(&s.claim(&batch(&acme, "w2", &gpu, 10)).await.expect("claim")),
        ["q1"],
        "a claim takes the queued task and skips the held ones"
    );
    assert!(
        s.claim(&batch(&acme, "w3", &gpu, 10))
            .await
            .expect("claim")
            .is_empty(),
        "nothing else to claim"
    );

    put(s, task("q2", &tenant("other"))).await;
    assert_eq!(
        s.queued_scopes().await.expect("scopes"),
        vec![(tenant("other"), 1)],
        "held tasks are not counted as queued"
    );

    assert_eq!(
        ids(&s
            .list_tasks(&TaskFilter::default(), None, 100)
            .await
            .expect("list")),
        ["q2", "q1"],
        "held tasks are not listed"
    );
    for status in EVERY_STATUS {
        let listed = s
            .list_tasks(
                &TaskFilter {
                    status: Some(status),
                    ..Default::default()
                },
                None,
                100,
            )
            .await
            .expect("list");
        assert!(
            listed
                .iter()
                .all(|t| !held_ids.contains(&t.task_id.as_str())),
            "listed with status {status:?}: {:?}",
            ids(&listed)
        );
    }
    assert_eq!(
        ids(&s
            .list_tasks(
                &TaskFilter {
                    status: Some(TaskStatus::Assigned),
                    ..Default::default()
                },
                None,
                100
            )
            .await
            .expect("list")),
        ["q1"],
        "the status filter itself works"
    );

    for id in held_ids {
        assert_eq!(
            s.cancel_task(id, "operator asked", NOW + SECOND)
                .await
                .expect("cancel"),
            Cancelled::NotFound,
            "{id}: a held task cannot be cancelled"
        );
    }

    let reset = s
        .release_workers_tasks(&["w1".into(), "w2".into()], "pool reset", NOW + SECOND)
        .await
        .expect("release workers");
    assert_eq!(
        reset
            .iter()
            .map(|r| r.after.task_id.as_str())
            .collect::<Vec<_>>(),
        ["q1"],
        "a pool reset releases w2's task, not w1's held hand-off"
    );

    // q1 is leased again; long after every lease and deadline, only it expires.
    claim1(s, &acme, "w2", NOW + 2 * SECOND).await;
    let released = s.expire(NOW + 10 * TIMEOUT, 100).await.expect("expire");
    assert_eq!(
        released
            .iter()
            .map(|r| r.after.task_id.as_str())
            .collect::<Vec<_>>(),
        ["q1"],
        "expiry skips held tasks"
    );
    assert!(
        s.expire(NOW + 10 * TIMEOUT, 100)
            .await
            .expect("expire")
            .is_empty()
    );

    assert_eq!(get(s, "h-queued").await, h_queued, "untouched");
    assert_eq!(get(s, "h-handoff").await, h_handoff, "untouched");
}

/// A release changes status, lease, deadline and updated_at, nothing else,
/// and the task then lives as any other: queued is claimed, assigned lapses
/// or is finished by its worker.
async fn held_release(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    let at = NOW + SECOND;

    let h_queued = put(s, held("h-queued", &acme)).await;
    let after = releasing(&h_queued, TaskStatus::Queued, at);
    assert!(release(s, &after).await, "a held task is released");
    assert_eq!(
        get(s, "h-queued").await,
        TaskRow {
            status: TaskStatus::Queued,
            updated_at_ms: at,
            ..h_queued.clone()
        },
        "released to queued, the rest as inserted"
    );
    let claimed = claim1(s, &acme, "w2", at).await;
    assert_eq!(
        (
            claimed.task_id.as_str(),
            claimed.attempt,
            claimed.lease_epoch
        ),
        ("h-queued", 1, 1),
        "a released queued task is claimed at its first attempt"
    );
    assert!(matches!(
        s.finish(&report(&claimed, Outcome::Succeeded, at + 1))
            .await
            .expect("finish"),
        Finished::Applied(_)
    ));

    let h_lapse = put(s, handed_off("h-lapse", &acme, "w1")).await;
    let after = releasing(&h_lapse, TaskStatus::Assigned, at);
    assert!(release(s, &after).await, "a held hand-off is released");
    let assigned = get(s, "h-lapse").await;
    assert_eq!(
        assigned,
        TaskRow {
            status: TaskStatus::Assigned,
            lease_expires_at_ms: Some(at + LEASE),
            deadline_at_ms: Some(at + TIMEOUT),
            updated_at_ms: at,
            ..h_lapse.clone()
        },
        "released to assigned with the new lease, the rest as inserted"
    );
    assert!(
        claim(s, &acme, "w2", 10).await.is_empty(),
        "an assigned task is not claimed"
    );
    assert!(
        s.expire(at + LEASE, 100).await.expect("expire").is_empty(),
        "the new lease counts, not the held one"
    );
    let lapsed = s.expire(at + LEASE + 1, 100).await.expect("expire");
    assert_eq!(lapsed.len(), 1, "the released hand-off lapses");
    let Released { before, after } = &lapsed[0];
    assert_eq!(before, &assigned);
    assert_eq!(
        (
            after.status,
            after.status_reason.as_str(),
            after.attempt,
            after.lease_epoch
        ),
        (TaskStatus::Queued, "lease expired", 1, 1),
        "queued again, its attempt kept"
    );

    let h_done = put(s, handed_off("h-done", &acme, "w1")).await;
    let after = releasing(&h_done, TaskStatus::Assigned, at);
    assert!(release(s, &after).await);
    let done = match s
        .finish(&report(&after, Outcome::Succeeded, at + SECOND))
        .await
        .expect("finish")
    {
        Finished::Applied(t) => t,
        other => panic!("the worker's report of a released hand-off applies: {other:?}"),
    };
    assert_eq!(
        (done.status, done.worker_id.as_str(), done.lease_epoch),
        (TaskStatus::Succeeded, "w1", 1)
    );
    assert_eq!(get(s, "h-done").await, done);
}

/// A release takes status, lease, deadline and updated_at from `after` and
/// nothing else, whatever else `after` says.
async fn held_release_fields(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    let at = NOW + SECOND;
    for (inserted, status) in [
        (handed_off("handoff", &acme, "w1"), TaskStatus::Assigned),
        (held("queued", &acme), TaskStatus::Queued),
    ] {
        let inserted = put(s, inserted).await;
        let asked = releasing(&inserted, status, at);
        // The worker and attempt are taken too: the settling pass queues a
        // hand-off whose worker may be gone (worker "", attempt 0).
        let asked = TaskRow {
            worker_id: "w-other".into(),
            attempt: 4,
            ..asked
        };
        let after = TaskRow {
            lease_epoch: 7,
            run_id: "run-other".into(),
            priority: 9,
            labels: labels(&[("gpu", "h100")]),
            payload: b"another payload".to_vec(),
            payload_size: 15,
            status_reason: "another reason".into(),
            outcome: Outcome::Failed,
            exit_code: 9,
            output_summary: "another summary".into(),
            created_at_ms: NOW - MINUTE,
            finished_at_ms: Some(at),
            ..asked.clone()
        };
        assert!(release(s, &after).await, "{}: released", inserted.task_id);
        assert_eq!(
            get(s, &inserted.task_id).await,
            asked,
            "{}: only status, worker, attempt, lease, deadline and updated_at are taken",
            inserted.task_id
        );
    }
}

/// A release of a task that is not held changes nothing and says so.
async fn held_release_refusals(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    let at = NOW + SECOND;

    let h1 = put(s, handed_off("h1", &acme, "w1")).await;
    assert!(release(s, &releasing(&h1, TaskStatus::Assigned, at)).await);
    let released = get(s, "h1").await;
    assert!(
        !release(s, &releasing(&h1, TaskStatus::Queued, at + SECOND)).await,
        "released once"
    );
    assert_eq!(
        get(s, "h1").await,
        released,
        "a second release changes nothing"
    );

    let plain = put(s, task("plain", &acme)).await;
    let as_handoff = TaskRow {
        worker_id: "w9".into(),
        attempt: 1,
        lease_epoch: 1,
        ..releasing(&plain, TaskStatus::Assigned, at)
    };
    assert!(
        !release(s, &as_handoff).await,
        "a queued task was never held"
    );
    assert_eq!(get(s, "plain").await, plain, "a queued task is unchanged");

    put(s, task("gone", &acme)).await;
    let Cancelled::Cancelled { after: gone, .. } = s
        .cancel_task("gone", "operator asked", at)
        .await
        .expect("cancel")
    else {
        panic!("a queued task is cancellable");
    };
    assert!(
        !release(s, &releasing(&gone, TaskStatus::Queued, at + SECOND)).await,
        "a cancelled task is not released"
    );
    assert_eq!(
        get(s, "gone").await,
        gone,
        "a cancelled task stays cancelled"
    );

    assert!(
        !release(s, &releasing(&held("nope", &acme), TaskStatus::Queued, at)).await,
        "an unknown task is not released"
    );
    assert_eq!(s.get_task("nope").await.expect("get"), None, "nor created");
    assert_eq!(
        ids(&claim(s, &acme, "w2", 10).await),
        ["plain"],
        "only the plain task is claimable"
    );
}

/// Once `release_held` returns, before its `Committed` resolves, the next write
/// of the store already sees the release.
async fn held_release_ordering(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    let at = NOW + SECOND;

    let q = put(s, held("q", &acme)).await;
    let committed = s
        .release_held(&releasing(&q, TaskStatus::Queued, at))
        .await
        .expect("release held");
    assert_eq!(
        ids(&claim_at(s, &acme, "w2", 10, at).await),
        ["q"],
        "a claim right after the release gets the task"
    );
    assert!(
        committed.await.expect("committed"),
        "the release was applied"
    );

    let handoff = put(s, handed_off("handoff", &acme, "w1")).await;
    let after = releasing(&handoff, TaskStatus::Assigned, at);
    let committed = s.release_held(&after).await.expect("release held");
    let finished = s
        .finish(&report(&after, Outcome::Succeeded, at + 1))
        .await
        .expect("finish");
    assert!(
        matches!(finished, Finished::Applied(_)),
        "a report right after the release applies: {finished:?}"
    );
    assert!(
        committed.await.expect("committed"),
        "the release was applied"
    );

    let c = put(s, held("c", &acme)).await;
    let committed = s
        .release_held(&releasing(&c, TaskStatus::Queued, at))
        .await
        .expect("release held");
    let cancelled = s
        .cancel_task("c", "operator asked", at + 1)
        .await
        .expect("cancel");
    assert!(
        matches!(cancelled, Cancelled::Cancelled { .. }),
        "a cancel right after the release cancels: {cancelled:?}"
    );
    assert!(
        committed.await.expect("committed"),
        "the release was applied"
    );
    assert_eq!(get(s, "c").await.status, TaskStatus::Cancelled);
}

/// Many hand-offs released at once, each followed at once by its worker's
/// report (SQLite commits them in groups and batches reports): no report is
/// applied ahead of its own release.
async fn held_release_race(h: Harness) {
    const TASKS: usize = 64;
    let acme = tenant("acme");
    let at = NOW + SECOND;
    let mut afters = Vec::new();
    for i in 0..TASKS {
        let row = put(
            h.store.as_ref(),
            handed_off(&format!("h{i:02}"), &acme, &format!("w{}", i % 4)),
        )
        .await;
        afters.push(releasing(&row, TaskStatus::Assigned, at));
    }
    let calls: Vec<_> = afters
        .into_iter()
        .map(|after| {
            let s = Arc::clone(&h.store);
            tokio::spawn(async move {
                let committed = s.release_held(&after).await.expect("release held");
                let finished = s
                    .finish(&report(&after, Outcome::Succeeded, at + 1))
                    .await
                    .expect("finish");
                let released = committed.await.expect("committed");
                (after.task_id, finished, released)
            })
        })
        .collect();
    for c in calls {
        let (id, finished, released) = c.await.expect("join");
        assert!(released, "{id}: the release was applied");
        let Finished::Applied(done) = finished else {
            panic!("{id}: the report right after the release applies: {finished:?}");
        };
        assert_eq!(done.status, TaskStatus::Succeeded, "{id}");
        assert_eq!(get(h.store.as_ref(), &id).await, done, "{id}");
    }
}

/// The settling pass finds held tasks older than a moment, oldest first, and
/// deletes those whose enqueue audit never recorded.
async fn held_settling(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    // Inserted out of creation order: the order is by creation, not seq.
    let mut rows = BTreeMap::new();
    for (id, created) in [
        ("h3", 3),
        ("h1", 1),
        ("h5", 5),
        ("h0", 0),
        ("h2", 2),
        ("h4", 4),
    ] {
        let t = if id == "h5" {
            handed_off(id, &acme, "w1")
        } else {
            held(id, &acme)
        };
        let row = put(
            s,
            TaskRow {
                created_at_ms: NOW + created,
                ..t
            },
        )
        .await;
        rows.insert(id, row);
    }
    let queued = put(
        s,
        TaskRow {
            created_at_ms: NOW - MINUTE,
            ..task("queued", &acme)
        },
    )
    .await;
    let before = |before_ms: i64, limit: u32| async move {
        s.held_before(before_ms, limit).await.expect("held before")
    };
    let all = before(NOW + MINUTE, 100).await;
    assert_eq!(
        ids(&all),
        ["h0", "h1", "h2", "h3", "h4", "h5"],
        "held tasks only, oldest first"
    );
    for t in &all {
        assert_eq!(
            without_payload(t.clone()),
            without_payload(rows[t.task_id.as_str()].clone()),
            "{} as stored",
            t.task_id
        );
    }
    assert_eq!(
        ids(&before(NOW + 3, 100).await),
        ["h0", "h1", "h2"],
        "created strictly before"
    );
    assert_eq!(ids(&before(NOW + MINUTE, 2).await), ["h0", "h1"], "a limit");
    assert!(before(NOW + MINUTE, 0).await.is_empty(), "limit 0");
    assert!(before(NOW, 100).await.is_empty(), "none created before NOW");

    assert!(release(s, &releasing(&rows["h1"], TaskStatus::Queued, NOW + SECOND)).await);
    assert!(s.delete_held("h2").await.expect("delete"), "h2 was held");
    assert_eq!(s.get_task("h2").await.expect("get"), None, "h2 is gone");
    assert!(
        s.delete_held("h5").await.expect("delete"),
        "a held hand-off"
    );
    assert_eq!(s.get_task("h5").await.expect("get"), None, "h5 is gone");
    assert_eq!(
        ids(&before(NOW + MINUTE, 100).await),
        ["h0", "h3", "h4"],
        "released and deleted tasks are not held"
    );

    assert!(!s.delete_held("h2").await.expect("delete"), "deleted once");
    assert!(!s.delete_held("nope").await.expect("delete"), "unknown");
    assert!(
        !release(s, &releasing(&rows["h2"], TaskStatus::Queued, NOW + SECOND)).await,
        "a deleted task is not released"
    );
    assert_eq!(s.get_task("h2").await.expect("get"), None, "nor revived");

    assert!(!s.delete_held("queued").await.expect("delete"), "queued");
    assert_eq!(get(s, "queued").await, queued, "a queued task stays");
    let released = get(s, "h1").await;
    assert!(!s.delete_held("h1").await.expect("delete"), "released");
    assert_eq!(get(s, "h1").await, released, "a released task stays");

    let ClaimOne::Claimed(assigned) = s
        .claim_task(&acme, "queued", &batch(&acme, "w2", &Labels::new(), 1))
        .await
        .expect("claim one")
    else {
        panic!("the queued task is claimable");
    };
    assert!(!s.delete_held("queued").await.expect("delete"), "assigned");
    assert_eq!(get(s, "queued").await, assigned, "an assigned task stays");
    let Finished::Applied(done) = s
        .finish(&report(&assigned, Outcome::Succeeded, NOW + SECOND))
        .await
        .expect("finish")
    else {
        panic!("the report applies");
    };
    assert!(!s.delete_held("queued").await.expect("delete"), "final");
    assert_eq!(get(s, "queued").await, done, "a final task stays");
}

/// On PostgreSQL a release through one replica is seen by the other as soon
/// as `release_held` returns (SQLite: one replica, the same store).
async fn held_release_replica(h: Harness) {
    let (one, other) = (h.store.as_ref(), h.replica.as_ref());
    let acme = tenant("acme");
    let at = NOW + SECOND;

    let q = put(one, held("q", &acme)).await;
    let committed = one
        .release_held(&releasing(&q, TaskStatus::Queued, at))
        .await
        .expect("release held");
    assert_eq!(
        ids(&claim_at(other, &acme, "w2", 10, at).await),
        ["q"],
        "the other replica claims the released task at once"
    );
    assert!(committed.await.expect("committed"));

    let handoff = put(other, handed_off("handoff", &acme, "w1")).await;
    let after = releasing(&handoff, TaskStatus::Assigned, at);
    let committed = other.release_held(&after).await.expect("release held");
    let finished = one
        .finish(&report(&after, Outcome::Succeeded, at + 1))
        .await
        .expect("finish");
    assert!(
        matches!(finished, Finished::Applied(_)),
        "a report through the other replica applies at once: {finished:?}"
    );
    assert!(committed.await.expect("committed"));
}

// ---- two replicas -----------------------------------------------------------

/// Producers enqueue through both replicas while claimers of three tenants
/// (several per replica) claim random batches: every task is assigned once,
/// at attempt 1, to a claimer of its own tenant. Then both replicas expire
/// the lapsed leases at once: each is released once.
async fn claim_race(h: Harness) {
    const PER_TENANT: usize = 700;
    const CLAIMERS_PER_TENANT_AND_REPLICA: usize = 2;
    let scopes = [tenant("t0"), tenant("t1"), tenant("t2")];
    let replicas = [Arc::clone(&h.store), Arc::clone(&h.replica)];
    let produced = Arc::new(AtomicBool::new(false));

    let producers: Vec<_> = scopes
        .iter()
        .enumerate()
        .map(|(n, scope)| {
            let replicas = replicas.clone();
            let scope = scope.clone();
            tokio::spawn(async move {
                for i in 0..PER_TENANT {
                    let t = TaskRow {
                        priority: i32::try_from(i % 3).expect("small"),
                        ..task(&format!("{scope}/{i}"), &scope)
                    };
                    put(replicas[(i + n) % 2].as_ref(), t).await;
                }
            })
        })
        .collect();

    let seed: u64 = rand::random();
    let mut claimers = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        for scope in &scopes {
            for c in 0..CLAIMERS_PER_TENANT_AND_REPLICA {
                let (s, scope, produced) =
                    (Arc::clone(replica), scope.clone(), Arc::clone(&produced));
                let worker = format!("{scope}/w{r}{c}");
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ claimers.len() as u64);
                claimers.push(tokio::spawn(async move {
                    let mut got = Vec::new();
                    loop {
                        // Everything was enqueued before this claim began: an
                        // empty claim means the scope is drained.
                        let done = produced.load(Ordering::SeqCst);
                        let n = rng.random_range(1..=24);
                        let batch = claim(s.as_ref(), &scope, &worker, n).await;
                        assert!(batch.len() <= n as usize, "max respected");
                        if batch.is_empty() {
                            if done {
                                break;
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        }
                        got.extend(
                            batch
                                .into_iter()
                                .map(|t| (worker.clone(), scope.clone(), t)),
                        );
                    }
                    got
                }));
            }
        }
    }
    for p in producers {
        p.await.expect("producer");
    }
    produced.store(true, Ordering::SeqCst);

    let mut claimed: HashMap<String, usize> = HashMap::new();
    let mut holder: BTreeMap<String, String> = BTreeMap::new();
    for c in claimers {
        for (worker, scope, t) in c.await.expect("claimer") {
            assert_eq!(
                t.scope, scope,
                "seed {seed}: {} went to {worker}",
                t.task_id
            );
            assert_eq!(
                (t.attempt, t.lease_epoch, t.worker_id.as_str()),
                (1, 1, worker.as_str()),
                "seed {seed}: {}",
                t.task_id
            );
            *claimed.entry(t.task_id.clone()).or_default() += 1;
            holder.insert(t.task_id, worker);
        }
    }
    let twice: Vec<_> = claimed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "seed {seed}: claimed more than once: {twice:?}"
    );
    assert_eq!(
        claimed.len(),
        3 * PER_TENANT,
        "seed {seed}: every task is claimed"
    );
    assert!(h.store.queued_scopes().await.expect("scopes").is_empty());

    // The store agrees on who holds each task.
    let mut before = None;
    loop {
        let page = h
            .store
            .list_tasks(&TaskFilter::default(), before, 500)
            .await
            .expect("list");
        let Some(last) = page.last() else { break };
        before = Some(last.seq);
        for t in &page {
            assert_eq!(Some(&t.worker_id), holder.get(&t.task_id));
            assert_eq!((t.status, t.lease_epoch), (TaskStatus::Assigned, 1));
        }
    }

    // Both replicas expire every lapsed lease at once.
    let lapsed = NOW + LEASE + 1;
    let expirers: Vec<_> = replicas
        .iter()
        .flat_map(|r| [Arc::clone(r), Arc::clone(r)])
        .map(|s| {
            tokio::spawn(async move {
                let mut released = Vec::new();
                loop {
                    let got = s.expire(lapsed, 50).await.expect("expire");
                    if got.is_empty() {
                        break released;
                    }
                    released.extend(got.into_iter().map(|r| r.after.task_id));
                }
            })
        })
        .collect();
    let mut released: HashMap<String, usize> = HashMap::new();
    for e in expirers {
        for id in e.await.expect("expirer") {
            *released.entry(id).or_default() += 1;
        }
    }
    assert!(released.values().all(|n| *n == 1), "released once each");
    assert_eq!(released.len(), 3 * PER_TENANT, "every lease lapsed");
    let mut counts = h.store.queued_scopes().await.expect("scopes");
    counts.sort();
    assert_eq!(
        counts,
        scopes
            .iter()
            .map(|s| (s.clone(), PER_TENANT as u64))
            .collect::<Vec<_>>()
    );
}

// ---- corrupt rows -----------------------------------------------------------

fn is_corrupt<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Corrupt(_)))
}

async fn corrupt_rows(h: Harness) {
    let s = h.store.as_ref();
    let (acme, bad) = (tenant("acme"), tenant("bad"));
    put(s, task("bad-status", &acme)).await;
    put(s, task("ok", &acme)).await;
    h.raw
        .exec("UPDATE tasks SET status = 'exploded' WHERE task_id = 'bad-status'")
        .await;
    assert!(is_corrupt(s.get_task("bad-status").await));
    assert!(is_corrupt(
        s.list_tasks(&TaskFilter::default(), None, 10).await
    ));
    assert!(
        is_corrupt(s.cancel_task("bad-status", "x", NOW).await),
        "a corrupt row is reported, not overwritten"
    );
    assert_eq!(get(s, "ok").await.status, TaskStatus::Queued);

    for (id, fault) in [
        ("bad-keys", "secret_keys = 'not json'"),
        ("bad-outcome", "outcome = 42"),
        ("bad-attempt", "attempt = -1"),
        ("bad-scope", "tenant = ''"),
    ] {
        put(s, task(id, &bad)).await;
        h.raw
            .exec(&format!("UPDATE tasks SET {fault} WHERE task_id = '{id}'"))
            .await;
        assert!(is_corrupt(s.get_task(id).await), "{fault}");
    }
    // A claim that meets a corrupt row fails and assigns nothing, while other
    // writes around it go through.
    let around: Vec<_> = (0..20)
        .map(|i| {
            let s = Arc::clone(&h.store);
            tokio::spawn(async move {
                put(s.as_ref(), task(&format!("around{i}"), &tenant("acme"))).await
            })
        })
        .collect();
    assert!(is_corrupt(
        s.claim(&batch(&bad, "w1", &Labels::new(), 10)).await
    ));
    for a in around {
        a.await.expect("insert around");
    }
    // SQLite rolls the failed claim back. On PostgreSQL the claim is one
    // statement, committed before its rows are decoded: the rows stay
    // assigned and lapse like any claim the worker never received.
    if let Raw::Sqlite(_) = h.raw {
        assert_eq!(
            h.raw
                .text("SELECT status || ' ' || lease_epoch FROM tasks WHERE task_id = 'bad-keys'")
                .await,
            "queued 0"
        );
    }
    assert_eq!(ids(&claim(s, &acme, "w1", 1).await), ["ok"]);

    s.upsert_worker(&worker("w1", &acme)).await.expect("upsert");
    h.raw
        .exec("UPDATE workers SET state = 'asleep' WHERE worker_id = 'w1'")
        .await;
    assert!(is_corrupt(s.get_worker("w1").await));
    assert!(is_corrupt(
        s.list_workers(&WorkerFilter::default(), "", 10).await
    ));

    assert!(s.submit_agent(&agent("a", "1", NOW)).await.expect("submit"));
    h.raw
        .exec("UPDATE agents SET command = '{' WHERE name = 'a'")
        .await;
    assert!(is_corrupt(s.get_agent("a", "1").await));
    assert!(is_corrupt(s.list_agents("", None, 0, 10).await));
}

/// The embedded store keeps its data across a reopen (the schema is created
/// idempotently), and refuses a URL it does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_reopens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!(
        "sqlite://{}",
        dir.path().join("nested/dispatch.db").display()
    );
    let s = store::open(&url).await.expect("open");
    let t = put(s.as_ref(), task("t1", &tenant("acme"))).await;
    drop(s);
    let s = store::open(&url).await.expect("reopen");
    assert_eq!(get(s.as_ref(), "t1").await, t);
    assert!(matches!(
        store::open("mysql://nope").await,
        Err(StoreError::Url)
    ));
}

/// A task released twice before either release commits (its enqueue and a
/// settling pass, in one SQLite group or one PostgreSQL batch): the first
/// release applies and says so; the second finds it released and says so.
async fn held_release_twice(h: Harness) {
    let s = h.store.as_ref();
    let acme = tenant("acme");
    let at = NOW + SECOND;
    for round in 0..8 {
        let id = format!("twice-{round}");
        let inserted = put(s, handed_off(&id, &acme, "w1")).await;
        let assigned = releasing(&inserted, TaskStatus::Assigned, at);
        let settled = TaskRow {
            worker_id: String::new(),
            attempt: 0,
            ..releasing(&inserted, TaskStatus::Queued, at + SECOND)
        };
        let first = s.release_held(&assigned).await.expect("first release");
        let second = s.release_held(&settled).await.expect("second release");
        let (first, second) = (
            first.await.expect("first committed"),
            second.await.expect("second committed"),
        );
        assert!(first, "{id}: the first release applies");
        assert!(!second, "{id}: the second finds the task released");
        assert_eq!(
            get(s, &id).await,
            assigned,
            "{id}: as the first release asked"
        );
    }
}
