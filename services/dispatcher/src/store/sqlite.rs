//! The embedded store: SQLite in WAL mode with synchronous=FULL, so an
//! acknowledged enqueue survives a power cut. One replica owns the file.
//!
//! Every write goes to one writer connection, which commits the writes
//! waiting at that moment as one transaction (group commit): one fsync
//! acknowledges them all. An fsync costs as much as dozens of small writes
//! here, so without this the disk, not SQLite, would bound the dispatcher
//! whenever many calls are in flight. A write that fails changes nothing
//! (see `commit_group`). Writes are serialized, which makes every
//! read-then-update below atomic. Reads use a small pool of read-only
//! connections.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection as _, QueryBuilder, Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::{
    Cancelled, ClaimBatch, ClaimOne, Committed, Decision, DispatchStore, Finish, Finished,
    Inserted, Released, StoreError, TaskFilter, WorkerFilter,
};
use crate::model::{
    AgentRow, AgentStatus, Labels, Outcome, Scope, TaskRow, TaskStatus, WorkerRow, WorkerState,
};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS agents (
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        image TEXT NOT NULL,
        command TEXT NOT NULL,
        requested_secret_keys TEXT NOT NULL,
        tool TEXT NOT NULL,
        description TEXT NOT NULL,
        status TEXT NOT NULL,
        submitted_by TEXT NOT NULL,
        submitted_at_ms INTEGER NOT NULL,
        decided_by TEXT NOT NULL,
        decided_at_ms INTEGER,
        decision_reason TEXT NOT NULL,
        PRIMARY KEY (name, version)
    )",
    "CREATE INDEX IF NOT EXISTS agents_listing
        ON agents (name, submitted_at_ms DESC, version DESC)",
    "CREATE INDEX IF NOT EXISTS agents_approved ON agents (name, decided_at_ms)
        WHERE status = 'approved'",
    "CREATE TABLE IF NOT EXISTS workers (
        worker_id TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        pool TEXT NOT NULL,
        labels TEXT NOT NULL,
        max_concurrent_runs INTEGER NOT NULL,
        sandbox_backends TEXT NOT NULL,
        version TEXT NOT NULL,
        state TEXT NOT NULL,
        registered_at_ms INTEGER NOT NULL,
        last_heartbeat_at_ms INTEGER NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS workers_scope ON workers (tenant, pool, worker_id)",
    // AUTOINCREMENT: a seq is never reused, even after the newest row is gone.
    "CREATE TABLE IF NOT EXISTS tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        pool TEXT NOT NULL,
        agent TEXT NOT NULL,
        agent_version TEXT NOT NULL,
        labels TEXT NOT NULL,
        cascade BLOB NOT NULL,
        secret_keys TEXT NOT NULL,
        payload BLOB NOT NULL,
        priority INTEGER NOT NULL,
        idempotency_key TEXT NOT NULL,
        request_hash BLOB NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL,
        lease_epoch INTEGER NOT NULL,
        worker_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        lease_expires_at_ms INTEGER,
        deadline_at_ms INTEGER,
        timeout_ms INTEGER NOT NULL,
        outcome INTEGER NOT NULL,
        exit_code INTEGER NOT NULL,
        output_summary TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        finished_at_ms INTEGER
    )",
    // The claim walks this in order and stops after `max` matches.
    "CREATE INDEX IF NOT EXISTS tasks_queued ON tasks (tenant, pool, priority DESC, seq)
        WHERE status = 'queued'",
    // A lease ends at the earlier of its expiry and its deadline (a leased
    // task has both), so one range of this index is what `expire` releases.
    "CREATE INDEX IF NOT EXISTS tasks_expiry
        ON tasks (MIN(lease_expires_at_ms, deadline_at_ms))
        WHERE status IN ('assigned', 'running')",
    "CREATE INDEX IF NOT EXISTS tasks_worker ON tasks (worker_id)
        WHERE status IN ('assigned', 'running')",
    "CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks (tenant, pool, idempotency_key)
        WHERE idempotency_key <> ''",
    "CREATE INDEX IF NOT EXISTS tasks_scope_newest ON tasks (tenant, pool, seq)",
    "CREATE INDEX IF NOT EXISTS tasks_run ON tasks (run_id) WHERE run_id <> ''",
    // The settling pass's walk; held rows live for one audit Append.
    "CREATE INDEX IF NOT EXISTS tasks_held ON tasks (created_at_ms, seq) WHERE status = 'held'",
];

/// Every column of a task, as `RawTask` reads it.
macro_rules! task_columns {
    () => {
        "seq, task_id, tenant, pool, agent, agent_version, labels, cascade, secret_keys, \
         payload, length(payload) AS payload_size, priority, idempotency_key, request_hash, status, status_reason, attempt, \
         max_attempts, lease_epoch, worker_id, run_id, lease_expires_at_ms, deadline_at_ms, \
         timeout_ms, outcome, exit_code, output_summary, created_at_ms, updated_at_ms, \
         finished_at_ms"
    };
}

/// As `task_columns!`, without reading the payloads (lists leave them empty).
macro_rules! task_list_columns {
    () => {
        "seq, task_id, tenant, pool, agent, agent_version, labels, cascade, secret_keys, \
         X'' AS payload, length(payload) AS payload_size, priority, idempotency_key, request_hash, status, status_reason, \
         attempt, max_attempts, lease_epoch, worker_id, run_id, lease_expires_at_ms, \
         deadline_at_ms, timeout_ms, outcome, exit_code, output_summary, created_at_ms, \
         updated_at_ms, finished_at_ms"
    };
}

/// Whether the labels of the task row `$t` are a subset of the worker labels
/// bound as JSON at parameter `$p`. Label keys are `[A-Za-z0-9._/-]`, so
/// quoting them in the JSON path is safe.
macro_rules! labels_match {
    ($t:literal, $p:literal) => {
        concat!(
            "NOT EXISTS (SELECT 1 FROM json_each(",
            $t,
            ".labels) AS l WHERE json_extract(",
            $p,
            ", '$.\"' || l.key || '\"') IS NOT l.value)"
        )
    };
}

/// The assignment of a claim. ?1 worker, ?2 lease expiry, ?3 now.
macro_rules! assign {
    () => {
        "UPDATE tasks SET status = 'assigned', attempt = attempt + 1, \
         lease_epoch = lease_epoch + 1, worker_id = ?1, run_id = '', \
         lease_expires_at_ms = ?2, deadline_at_ms = ?3 + timeout_ms, status_reason = '', \
         updated_at_ms = ?3 "
    };
}

const AGENT_COLUMNS: &str = "name, version, image, command, requested_secret_keys, tool, \
     description, status, submitted_by, submitted_at_ms, decided_by, decided_at_ms, \
     decision_reason";

const WORKER_COLUMNS: &str = "worker_id, spiffe_id, tenant, pool, labels, max_concurrent_runs, \
     sandbox_backends, version, state, registered_at_ms, last_heartbeat_at_ms";

/// How many waiting writes one transaction takes at most.
const MAX_GROUP: usize = 256;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A write waiting for the writer. It may run twice (see `commit_group`), so
/// it keeps its arguments and holds its result until the group commits.
trait QueuedWrite: Send {
    /// Runs inside the group's transaction; whether it succeeded.
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool>;
    /// Hands the result over; `failed`: the group did not commit.
    fn reply(self: Box<Self>, failed: Option<&sqlx::Error>);
    /// A new task without an idempotency key: the group inserts all of
    /// these in one multi-row statement (see `insert_batch`).
    fn plain_insert(&self) -> Option<(&TaskRow, &EncodedTask)> {
        None
    }
    /// The `seq` the batch gave this insert.
    fn inserted(&mut self, _seq: i64) {}
    /// A report: the group applies all of these in one statement (see
    /// `finish_batch`).
    fn plain_finish(&self) -> Option<&FinishArgs> {
        None
    }
    /// What the batch made of this report.
    fn finished(&mut self, _result: Result<Finished, StoreError>) {}
    /// The release of a held task: the group runs these before anything
    /// else, all in one statement (see `release_batch`).
    fn release_row(&self) -> Option<&TaskRow> {
        None
    }
    /// Whether the batch released this one.
    fn released(&mut self, _applied: bool) {}
}

/// The release of a held task (`release_held`). Its caller goes on once it
/// is queued: every write queued after it must see it, and a group runs its
/// batched inserts and reports ahead of its other writes, so releases go
/// first of all. Nothing queued in the same group depends on a release not
/// having happened: a held task is invisible to every other write.
struct PendingRelease {
    after: TaskRow,
    result: Option<Result<bool, StoreError>>,
    reply: oneshot::Sender<Result<bool, StoreError>>,
}

impl QueuedWrite for PendingRelease {
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            self.result = Some(release_held(conn, &self.after).await);
            self.result.as_ref().is_some_and(Result::is_ok)
        })
    }

    fn reply(self: Box<Self>, failed: Option<&sqlx::Error>) {
        answer(self.reply, self.result, failed);
    }

    fn release_row(&self) -> Option<&TaskRow> {
        Some(&self.after)
    }

    fn released(&mut self, applied: bool) {
        self.result = Some(Ok(applied));
    }
}

async fn release_held(c: &mut SqliteConnection, t: &TaskRow) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE tasks SET status = ?1, lease_expires_at_ms = ?2, deadline_at_ms = ?3, \
          updated_at_ms = ?4, worker_id = ?6, attempt = ?7 \
         WHERE task_id = ?5 AND status = 'held'",
    )
    .bind(t.status.as_str())
    .bind(t.lease_expires_at_ms)
    .bind(t.deadline_at_ms)
    .bind(t.updated_at_ms)
    .bind(&t.task_id)
    .bind(&t.worker_id)
    .bind(i64::from(t.attempt))
    .execute(c)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A worker's report.
struct PendingFinish {
    args: FinishArgs,
    result: Option<Result<Finished, StoreError>>,
    reply: oneshot::Sender<Result<Finished, StoreError>>,
}

impl QueuedWrite for PendingFinish {
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            self.result = Some(finish_one(conn, &self.args).await);
            self.result.as_ref().is_some_and(Result::is_ok)
        })
    }

    fn reply(self: Box<Self>, failed: Option<&sqlx::Error>) {
        answer(self.reply, self.result, failed);
    }

    fn plain_finish(&self) -> Option<&FinishArgs> {
        Some(&self.args)
    }

    fn finished(&mut self, result: Result<Finished, StoreError>) {
        self.result = Some(result);
    }
}

/// Sends a queued write its result: its own if its group committed, else
/// the group's failure.
fn answer<T>(
    reply: oneshot::Sender<Result<T, StoreError>>,
    result: Option<Result<T, StoreError>>,
    failed: Option<&sqlx::Error>,
) {
    let result = match (failed, result) {
        (None, Some(result)) => result,
        (Some(e), _) => Err(group_failed(e)),
        (None, None) => Err(StoreError::Db(sqlx::Error::WorkerCrashed)),
    };
    let _ = reply.send(result);
}

/// An Enqueue's insert of a task without an idempotency key.
struct PendingInsert {
    task: TaskRow,
    encoded: EncodedTask,
    result: Option<Result<Inserted, StoreError>>,
    reply: oneshot::Sender<Result<Inserted, StoreError>>,
}

impl QueuedWrite for PendingInsert {
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            self.result = Some(insert_task(conn, &self.task, &self.encoded, 0).await);
            self.result.as_ref().is_some_and(Result::is_ok)
        })
    }

    fn reply(self: Box<Self>, failed: Option<&sqlx::Error>) {
        answer(self.reply, self.result, failed);
    }

    fn plain_insert(&self) -> Option<(&TaskRow, &EncodedTask)> {
        Some((&self.task, &self.encoded))
    }

    fn inserted(&mut self, seq: i64) {
        self.result = Some(Ok(Inserted::New(TaskRow {
            seq,
            ..self.task.clone()
        })));
    }
}

struct Pending<A, T, F> {
    args: A,
    op: F,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<A, T, F> QueuedWrite for Pending<A, T, F>
where
    A: Send + Sync,
    T: Send,
    F: for<'c> Fn(&'c mut SqliteConnection, &'c A) -> BoxFuture<'c, Result<T, StoreError>> + Send,
{
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            let result = (self.op)(conn, &self.args).await;
            let ok = result.is_ok();
            self.result = Some(result);
            ok
        })
    }

    fn reply(self: Box<Self>, failed: Option<&sqlx::Error>) {
        answer(self.reply, self.result, failed);
    }
}

#[derive(Debug)]
pub struct SqliteStore {
    reader: SqlitePool,
    writes: mpsc::Sender<Box<dyn QueuedWrite>>,
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .busy_timeout(std::time::Duration::from_secs(10));
        let mut writer = SqliteConnection::connect_with(
            &opts
                .clone()
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                // Checkpoints run in the background (below), not in a commit.
                .pragma("wal_autocheckpoint", "0"),
        )
        .await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&mut writer).await?;
        }
        let checkpointer = SqliteConnection::connect_with(&opts).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.read_only(true))
            .await?;
        let (writes, waiting) = mpsc::channel(4 * MAX_GROUP);
        let (writer_done, stopped) = oneshot::channel();
        tokio::spawn(async move {
            run_writer(writer, waiting).await;
            drop(writer_done);
        });
        tokio::spawn(checkpoint_in_background(checkpointer, stopped));
        Ok(Self { reader, writes })
    }

    /// Runs `op(args)` in the next group transaction and returns its result
    /// once that transaction committed.
    async fn write<A, T, F>(&self, args: A, op: F) -> Result<T, StoreError>
    where
        A: Send + Sync + 'static,
        T: Send + 'static,
        F: for<'c> Fn(&'c mut SqliteConnection, &'c A) -> BoxFuture<'c, Result<T, StoreError>>
            + Send
            + 'static,
    {
        let (reply, replied) = oneshot::channel();
        let pending = Pending {
            args,
            op,
            result: None,
            reply,
        };
        self.queue(Box::new(pending), replied).await
    }

    /// Hands a write to the writer and waits for its group's commit.
    async fn queue<T>(
        &self,
        write: Box<dyn QueuedWrite>,
        replied: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.writes
            .send(write)
            .await
            .map_err(|_| StoreError::Db(sqlx::Error::WorkerCrashed))?;
        replied
            .await
            .map_err(|_| StoreError::Db(sqlx::Error::WorkerCrashed))?
    }

    async fn task(&self, task_id: &str) -> Result<Option<TaskRow>, StoreError> {
        sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE task_id = ?1"
        ))
        .bind(task_id)
        .fetch_optional(&self.reader)
        .await?
        .map(RawTask::decode)
        .transpose()
    }
}

/// Copies the WAL into the database every half second, off the commit path,
/// until the writer stops. With SQLite's automatic checkpoint, the group
/// commit that takes the WAL past 1,000 pages does it, fsync of the
/// database included: a stall of 100 ms and more for every write of that
/// group on this disk. A PASSIVE checkpoint takes no lock the writer waits
/// for.
async fn checkpoint_in_background(mut conn: SqliteConnection, mut stopped: oneshot::Receiver<()>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stopped => break,
        }
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::debug!(%error, "wal checkpoint failed; the next one retries");
        }
    }
    let _ = conn.close().await;
}

/// The writer: takes the writes waiting, commits them as one transaction,
/// then answers them all.
async fn run_writer(mut conn: SqliteConnection, mut waiting: mpsc::Receiver<Box<dyn QueuedWrite>>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while waiting.recv_many(&mut group, MAX_GROUP).await > 0 {
        let failed = commit_group(&mut conn, &mut group).await.err();
        if let Some(e) = &failed {
            tracing::warn!(error = %e, writes = group.len(), "sqlite group commit failed");
        }
        for write in group.drain(..) {
            write.reply(failed.as_ref());
        }
    }
    let _ = conn.close().await;
}

/// Runs a group in one transaction: all writes in a row, as they nearly
/// always succeed. When one fails, the transaction is rolled back and the
/// group runs again with each write in a savepoint of its own, so that only
/// the failing write's changes are undone. (A savepoint for every write
/// would cost two more round trips to SQLite's thread per write.)
async fn commit_group(
    conn: &mut SqliteConnection,
    group: &mut [Box<dyn QueuedWrite>],
) -> Result<(), sqlx::Error> {
    if run_in_transaction(conn, group, false).await? {
        return Ok(());
    }
    run_in_transaction(conn, group, true).await.map(drop)
}

/// One attempt at a group. `Ok(false)`: a write failed without savepoints,
/// and the transaction was rolled back.
async fn run_in_transaction(
    conn: &mut SqliteConnection,
    group: &mut [Box<dyn QueuedWrite>],
    savepoints: bool,
) -> Result<bool, sqlx::Error> {
    let ran = async {
        exec(conn, "BEGIN IMMEDIATE").await?;
        // Without savepoints, releases go first (see `PendingRelease`); with
        // savepoints every write runs in the order it was queued, which is
        // all a release needs.
        if !savepoints && !release_batch(conn, group).await? {
            return Ok(false);
        }
        // Then the group's plain inserts, together.
        let batched =
            !savepoints && group.iter().filter(|w| w.plain_insert().is_some()).count() > 1;
        if batched && !insert_batch(conn, group).await? {
            return Ok(false);
        }
        let finishes =
            !savepoints && group.iter().filter(|w| w.plain_finish().is_some()).count() > 1;
        if finishes && !finish_batch(conn, group).await? {
            return Ok(false);
        }
        for write in group.iter_mut() {
            if (batched && write.plain_insert().is_some())
                || (finishes && write.plain_finish().is_some())
                || (!savepoints && write.release_row().is_some())
            {
                continue;
            }
            if savepoints {
                exec(conn, "SAVEPOINT write").await?;
            }
            let ok = write.run(conn).await;
            if savepoints {
                if !ok {
                    exec(conn, "ROLLBACK TO write").await?;
                }
                exec(conn, "RELEASE write").await?;
            } else if !ok {
                return Ok(false);
            }
        }
        exec(conn, "COMMIT").await?;
        Ok(true)
    }
    .await;
    if !matches!(ran, Ok(true)) {
        // Ends the transaction, if the failure left one open.
        let _ = exec(conn, "ROLLBACK").await;
    }
    ran
}

/// Releases every held task the group releases, in one statement, and tells
/// each whether it applied. `Ok(false)`: the statement failed (the group then
/// runs again, each write on its own in a savepoint, in queue order).
async fn release_batch(
    conn: &mut SqliteConnection,
    group: &mut [Box<dyn QueuedWrite>],
) -> Result<bool, sqlx::Error> {
    // A task released twice in one group (its enqueue and a settling pass):
    // the first in queue order goes in the statement; the later one finds
    // it released, as it would have one after the other.
    let mut seen = std::collections::HashSet::new();
    for write in group.iter_mut() {
        let Some(id) = write.release_row().map(|t| t.task_id.clone()) else {
            continue;
        };
        if !seen.insert(id) {
            write.released(false);
        }
    }
    if seen.is_empty() {
        return Ok(true);
    }
    let mut first = std::collections::HashSet::new();
    let mut qb = QueryBuilder::<Sqlite>::new(
        "UPDATE tasks SET status = u.column2, worker_id = u.column3, attempt = u.column4, \
          lease_expires_at_ms = u.column5, deadline_at_ms = u.column6, \
          updated_at_ms = u.column7 FROM (",
    );
    qb.push_values(
        group
            .iter()
            .filter_map(|w| w.release_row())
            .filter(|t| first.insert(t.task_id.clone())),
        |mut row, t| {
            row.push_bind(t.task_id.clone())
                .push_bind(t.status.as_str())
                .push_bind(t.worker_id.clone())
                .push_bind(i64::from(t.attempt))
                .push_bind(t.lease_expires_at_ms)
                .push_bind(t.deadline_at_ms)
                .push_bind(t.updated_at_ms);
        },
    );
    qb.push(
        ") AS u WHERE tasks.task_id = u.column1 AND tasks.status = 'held' \
         RETURNING tasks.task_id",
    );
    let released: std::collections::HashSet<String> = match qb
        .build_query_scalar()
        .fetch_all(&mut *conn)
        .await
    {
        Ok(ids) => ids.into_iter().collect(),
        Err(e) => {
            tracing::debug!(error = %e, "a batched release failed; the group runs again write by write");
            return Ok(false);
        }
    };
    let mut answered = std::collections::HashSet::new();
    for write in group.iter_mut() {
        let Some(id) = write.release_row().map(|t| t.task_id.clone()) else {
            continue;
        };
        if answered.insert(id.clone()) {
            write.released(released.contains(&id));
        }
    }
    Ok(true)
}

/// Inserts every plain insert of the group in one statement and hands each
/// its `seq`. `Ok(false)`: the statement failed (the group then runs again,
/// each write on its own in a savepoint). The writes of a group are
/// concurrent, so inserting them first orders nothing any caller relied on.
async fn insert_batch(
    conn: &mut SqliteConnection,
    group: &mut [Box<dyn QueuedWrite>],
) -> Result<bool, sqlx::Error> {
    let mut qb = QueryBuilder::<Sqlite>::new(
        "INSERT INTO tasks (task_id, tenant, pool, agent, agent_version, labels, cascade, \
          secret_keys, payload, priority, idempotency_key, request_hash, status, status_reason, \
          attempt, max_attempts, lease_epoch, worker_id, run_id, lease_expires_at_ms, \
          deadline_at_ms, timeout_ms, outcome, exit_code, output_summary, created_at_ms, \
          updated_at_ms, finished_at_ms) ",
    );
    qb.push_values(
        group.iter().filter_map(|w| w.plain_insert()),
        |mut row, (t, e)| {
            let (tenant, pool) = t.scope.columns();
            row.push_bind(t.task_id.clone())
                .push_bind(tenant.to_owned())
                .push_bind(pool.to_owned())
                .push_bind(t.agent.clone())
                .push_bind(t.agent_version.clone())
                .push_bind(e.labels.clone())
                .push_bind(t.cascade.clone())
                .push_bind(e.secret_keys.clone())
                .push_bind(t.payload.clone())
                .push_bind(i64::from(t.priority))
                .push_bind(t.idempotency_key.clone())
                .push_bind(t.request_hash.clone())
                .push_bind(t.status.as_str())
                .push_bind(t.status_reason.clone())
                .push_bind(i64::from(t.attempt))
                .push_bind(i64::from(t.max_attempts))
                .push_bind(e.lease_epoch)
                .push_bind(t.worker_id.clone())
                .push_bind(t.run_id.clone())
                .push_bind(t.lease_expires_at_ms)
                .push_bind(t.deadline_at_ms)
                .push_bind(t.timeout_ms)
                .push_bind(t.outcome as i64)
                .push_bind(i64::from(t.exit_code))
                .push_bind(t.output_summary.clone())
                .push_bind(t.created_at_ms)
                .push_bind(t.updated_at_ms)
                .push_bind(t.finished_at_ms);
        },
    );
    qb.push(" RETURNING task_id, seq");
    let rows: Vec<(String, i64)> = match qb.build_query_as().fetch_all(&mut *conn).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::debug!(error = %e, "a batched insert failed; the group runs again write by write");
            return Ok(false);
        }
    };
    let seqs: HashMap<String, i64> = rows.into_iter().collect();
    let expected = group.iter().filter(|w| w.plain_insert().is_some()).count();
    if seqs.len() != expected {
        tracing::warn!(
            inserted = seqs.len(),
            expected,
            "a batched insert returned the wrong rows; the group runs again write by write"
        );
        return Ok(false);
    }
    for write in group.iter_mut() {
        let Some(seq) = write
            .plain_insert()
            .and_then(|(t, _)| seqs.get(&t.task_id).copied())
        else {
            continue;
        };
        write.inserted(seq);
    }
    Ok(true)
}

/// One report, applied alone: the conditional update, else why not.
async fn finish_one(c: &mut SqliteConnection, r: &FinishArgs) -> Result<Finished, StoreError> {
    let plan = FinishPlan::of(r.outcome);
    let applied = sqlx::query_as::<_, RawTask>(concat!(
        "UPDATE tasks SET \
              status = CASE WHEN ?1 AND attempt < max_attempts THEN 'queued' ELSE ?2 END, \
              status_reason = CASE WHEN ?1 AND attempt >= max_attempts \
               THEN 'attempts exhausted' ELSE '' END, \
              finished_at_ms = CASE WHEN ?1 AND attempt < max_attempts \
               THEN NULL ELSE ?3 END, \
              outcome = ?4, exit_code = ?5, output_summary = ?6, \
              lease_expires_at_ms = NULL, deadline_at_ms = NULL, updated_at_ms = ?3 \
             WHERE task_id = ?7 AND lease_epoch = ?8 AND worker_id = ?9 \
              AND status IN ('assigned', 'running') RETURNING ",
        task_columns!()
    ))
    .bind(plan.retry)
    .bind(plan.status)
    .bind(r.now_ms)
    .bind(r.outcome as i64)
    .bind(i64::from(r.exit_code))
    .bind(&r.output_summary)
    .bind(&r.task_id)
    .bind(epoch_param(r.lease_epoch))
    .bind(&r.worker_id)
    .fetch_optional(&mut *c)
    .await?;
    if let Some(row) = applied {
        return Ok(Finished::Applied(row.decode()?));
    }
    let current = sqlx::query_as::<_, RawTask>(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE task_id = ?1"
    ))
    .bind(&r.task_id)
    .fetch_optional(c)
    .await?;
    not_finished(current, r)
}

/// Why a report the batched update did not apply was not applied.
async fn not_applied(c: &mut SqliteConnection, r: &FinishArgs) -> Result<Finished, StoreError> {
    let current = sqlx::query_as::<_, RawTask>(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE task_id = ?1"
    ))
    .bind(&r.task_id)
    .fetch_optional(c)
    .await?;
    not_finished(current, r)
}

/// Applies every plain report of the group in one statement; those it did not
/// apply (stale, repeated, unknown) are then told why one by one. `Ok(false)`:
/// a statement failed (the group then runs again write by write).
async fn finish_batch(
    conn: &mut SqliteConnection,
    group: &mut [Box<dyn QueuedWrite>],
) -> Result<bool, sqlx::Error> {
    let mut qb = QueryBuilder::<Sqlite>::new(
        "WITH f (f_task, f_epoch, f_worker, f_retry, f_status, f_now, f_outcome, f_exit, \
          f_summary) AS (",
    );
    qb.push_values(
        group.iter().filter_map(|w| w.plain_finish()),
        |mut row, r| {
            let plan = FinishPlan::of(r.outcome);
            row.push_bind(r.task_id.clone())
                .push_bind(epoch_param(r.lease_epoch))
                .push_bind(r.worker_id.clone())
                .push_bind(plan.retry)
                .push_bind(plan.status)
                .push_bind(r.now_ms)
                .push_bind(r.outcome as i64)
                .push_bind(i64::from(r.exit_code))
                .push_bind(r.output_summary.clone());
        },
    );
    qb.push(concat!(
        ") UPDATE tasks SET \
          status = CASE WHEN f_retry AND attempt < max_attempts THEN 'queued' ELSE f_status END, \
          status_reason = CASE WHEN f_retry AND attempt >= max_attempts \
           THEN 'attempts exhausted' ELSE '' END, \
          finished_at_ms = CASE WHEN f_retry AND attempt < max_attempts THEN NULL ELSE f_now END, \
          outcome = f_outcome, exit_code = f_exit, output_summary = f_summary, \
          lease_expires_at_ms = NULL, deadline_at_ms = NULL, updated_at_ms = f_now \
         FROM f WHERE task_id = f_task AND lease_epoch = f_epoch AND worker_id = f_worker \
          AND status IN ('assigned', 'running') RETURNING ",
        task_columns!()
    ));
    // The VALUES list is the CTE's body: push_values wrote "VALUES (...), ...".
    let rows: Vec<RawTask> = match qb.build_query_as().fetch_all(&mut *conn).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::debug!(error = %e, "a batched report update failed; the group runs again write by write");
            return Ok(false);
        }
    };
    let mut applied: HashMap<String, TaskRow> = HashMap::new();
    for row in rows {
        match row.decode() {
            Ok(task) => {
                applied.insert(task.task_id.clone(), task);
            }
            Err(_) => return Ok(false),
        }
    }
    for write in group.iter_mut() {
        let Some(r) = write.plain_finish() else {
            continue;
        };
        // A task reported twice in one group is applied once: the other
        // report is told why not, as it would be one after the other.
        let result = match applied.remove(&r.task_id) {
            Some(task) => Ok(Finished::Applied(task)),
            // A database error here: the group runs again write by write.
            None => match not_applied(conn, r).await {
                Err(StoreError::Db(_)) => return Ok(false),
                other => other,
            },
        };
        write.finished(result);
    }
    Ok(true)
}

async fn exec(conn: &mut SqliteConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::query(sql).execute(conn).await.map(drop)
}

/// The error every write of a group that failed to commit gets.
fn group_failed(e: &sqlx::Error) -> StoreError {
    StoreError::Db(sqlx::Error::Io(std::io::Error::other(format!(
        "the write's transaction failed: {e}"
    ))))
}

#[async_trait::async_trait]
impl DispatchStore for SqliteStore {
    async fn submit_agent(&self, agent: &AgentRow) -> Result<bool, StoreError> {
        let args = (
            agent.clone(),
            to_json(&agent.command)?,
            to_json(&agent.requested_secret_keys)?,
        );
        self.write(args, |c, (a, command, keys)| {
            Box::pin(async move {
                let done = sqlx::query(&format!(
                    "INSERT INTO agents ({AGENT_COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
                     ON CONFLICT (name, version) DO NOTHING"
                ))
                .bind(&a.name)
                .bind(&a.version)
                .bind(&a.image)
                .bind(command)
                .bind(keys)
                .bind(&a.tool)
                .bind(&a.description)
                .bind(a.status.as_str())
                .bind(&a.submitted_by)
                .bind(a.submitted_at_ms)
                .bind(&a.decided_by)
                .bind(a.decided_at_ms)
                .bind(&a.decision_reason)
                .execute(c)
                .await?;
                Ok(done.rows_affected() == 1)
            })
        })
        .await
    }

    async fn get_agent(&self, name: &str, version: &str) -> Result<Option<AgentRow>, StoreError> {
        sqlx::query_as::<_, RawAgent>(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE name = ?1 AND version = ?2"
        ))
        .bind(name)
        .bind(version)
        .fetch_optional(&self.reader)
        .await?
        .map(RawAgent::decode)
        .transpose()
    }

    async fn latest_approved_agent(&self, name: &str) -> Result<Option<AgentRow>, StoreError> {
        sqlx::query_as::<_, RawAgent>(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE name = ?1 AND status = 'approved' \
             ORDER BY decided_at_ms DESC, submitted_at_ms DESC, version DESC LIMIT 1"
        ))
        .bind(name)
        .fetch_optional(&self.reader)
        .await?
        .map(RawAgent::decode)
        .transpose()
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
        let args = (
            name.to_owned(),
            version.to_owned(),
            status,
            decided_by.to_owned(),
            decided_at_ms,
            reason.to_owned(),
        );
        self.write(
            args,
            |c, (name, version, status, decided_by, decided_at_ms, reason)| {
                Box::pin(async move {
                    let decided = sqlx::query_as::<_, RawAgent>(&format!(
                        "UPDATE agents SET status = ?1, decided_by = ?2, decided_at_ms = ?3, \
                         decision_reason = ?4 \
                         WHERE name = ?5 AND version = ?6 AND status = 'pending' \
                         RETURNING {AGENT_COLUMNS}"
                    ))
                    .bind(status.as_str())
                    .bind(decided_by)
                    .bind(decided_at_ms)
                    .bind(reason)
                    .bind(name)
                    .bind(version)
                    .fetch_optional(&mut *c)
                    .await?;
                    if let Some(row) = decided {
                        return Ok(Decision::Decided(row.decode()?));
                    }
                    let current = sqlx::query_as::<_, RawAgent>(&format!(
                        "SELECT {AGENT_COLUMNS} FROM agents WHERE name = ?1 AND version = ?2"
                    ))
                    .bind(name)
                    .bind(version)
                    .fetch_optional(c)
                    .await?;
                    Ok(match current {
                        Some(row) => Decision::NotPending(row.decode()?),
                        None => Decision::NotFound,
                    })
                })
            },
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
        let mut qb =
            QueryBuilder::<Sqlite>::new(format!("SELECT {AGENT_COLUMNS} FROM agents WHERE 1=1"));
        if !name.is_empty() {
            qb.push(" AND name = ").push_bind(name);
        }
        if let Some(status) = status {
            qb.push(" AND status = ").push_bind(status.as_str());
        }
        qb.push(" ORDER BY name, submitted_at_ms DESC, version DESC LIMIT ")
            .push_bind(i64::from(limit))
            .push(" OFFSET ")
            .push_bind(i64::try_from(offset).unwrap_or(i64::MAX));
        qb.build_query_as::<RawAgent>()
            .fetch_all(&self.reader)
            .await?
            .into_iter()
            .map(RawAgent::decode)
            .collect()
    }

    async fn upsert_worker(&self, worker: &WorkerRow) -> Result<(), StoreError> {
        let args = (
            worker.clone(),
            to_json(&worker.labels)?,
            to_json(&worker.sandbox_backends)?,
        );
        self.write(args, |c, (w, labels, backends)| {
            Box::pin(async move {
                let (tenant, pool) = w.scope.columns();
                sqlx::query(&format!(
                    "INSERT INTO workers ({WORKER_COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
                     ON CONFLICT (worker_id) DO UPDATE SET spiffe_id = excluded.spiffe_id, \
                     tenant = excluded.tenant, pool = excluded.pool, labels = excluded.labels, \
                     max_concurrent_runs = excluded.max_concurrent_runs, \
                     sandbox_backends = excluded.sandbox_backends, version = excluded.version, \
                     state = excluded.state, registered_at_ms = excluded.registered_at_ms, \
                     last_heartbeat_at_ms = excluded.last_heartbeat_at_ms"
                ))
                .bind(&w.worker_id)
                .bind(&w.spiffe_id)
                .bind(tenant)
                .bind(pool)
                .bind(labels)
                .bind(i64::from(w.max_concurrent_runs))
                .bind(backends)
                .bind(&w.version)
                .bind(w.state.as_str())
                .bind(w.registered_at_ms)
                .bind(w.last_heartbeat_at_ms)
                .execute(c)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn get_worker(&self, worker_id: &str) -> Result<Option<WorkerRow>, StoreError> {
        sqlx::query_as::<_, RawWorker>(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE worker_id = ?1"
        ))
        .bind(worker_id)
        .fetch_optional(&self.reader)
        .await?
        .map(RawWorker::decode)
        .transpose()
    }

    async fn set_worker_state(
        &self,
        worker_id: &str,
        state: WorkerState,
    ) -> Result<bool, StoreError> {
        self.write((worker_id.to_owned(), state), |c, (worker_id, state)| {
            Box::pin(async move {
                let done = sqlx::query("UPDATE workers SET state = ?1 WHERE worker_id = ?2")
                    .bind(state.as_str())
                    .bind(worker_id)
                    .execute(c)
                    .await?;
                Ok(done.rows_affected() == 1)
            })
        })
        .await
    }

    async fn list_workers(
        &self,
        filter: &WorkerFilter,
        after_worker_id: &str,
        limit: u32,
    ) -> Result<Vec<WorkerRow>, StoreError> {
        let mut qb =
            QueryBuilder::<Sqlite>::new(format!("SELECT {WORKER_COLUMNS} FROM workers WHERE 1=1"));
        if !filter.tenant.is_empty() {
            qb.push(" AND tenant = ").push_bind(&filter.tenant);
        }
        if !filter.pool.is_empty() {
            qb.push(" AND pool = ").push_bind(&filter.pool);
        }
        if let Some(state) = filter.state {
            qb.push(" AND state = ").push_bind(state.as_str());
        }
        if !after_worker_id.is_empty() {
            qb.push(" AND worker_id > ").push_bind(after_worker_id);
        }
        qb.push(" ORDER BY worker_id LIMIT ")
            .push_bind(i64::from(limit));
        qb.build_query_as::<RawWorker>()
            .fetch_all(&self.reader)
            .await?
            .into_iter()
            .map(RawWorker::decode)
            .collect()
    }

    async fn workers_of_scope(&self, scope: &Scope) -> Result<Vec<WorkerRow>, StoreError> {
        let (tenant, pool) = scope.columns();
        sqlx::query_as::<_, RawWorker>(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE tenant = ?1 AND pool = ?2 \
             ORDER BY worker_id"
        ))
        .bind(tenant)
        .bind(pool)
        .fetch_all(&self.reader)
        .await?
        .into_iter()
        .map(RawWorker::decode)
        .collect()
    }

    async fn remove_workers(&self, worker_ids: &[String]) -> Result<(), StoreError> {
        if worker_ids.is_empty() {
            return Ok(());
        }
        self.write(to_json(worker_ids)?, |c, ids| {
            Box::pin(async move {
                sqlx::query(
                    "DELETE FROM workers WHERE worker_id IN (SELECT value FROM json_each(?1))",
                )
                .bind(ids)
                .execute(c)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn insert_task(
        &self,
        task: &TaskRow,
        dedup_since_ms: i64,
    ) -> Result<Inserted, StoreError> {
        if task.idempotency_key.is_empty() {
            let (reply, replied) = oneshot::channel();
            let pending = PendingInsert {
                task: task.clone(),
                encoded: EncodedTask::of(task)?,
                result: None,
                reply,
            };
            return self.queue(Box::new(pending), replied).await;
        }
        let args = (task.clone(), EncodedTask::of(task)?, dedup_since_ms);
        self.write(args, |c, (t, e, since)| {
            Box::pin(insert_task(c, t, e, *since))
        })
        .await
    }

    async fn find_idempotent(
        &self,
        scope: &Scope,
        idempotency_key: &str,
        since_ms: i64,
    ) -> Result<Option<TaskRow>, StoreError> {
        if idempotency_key.is_empty() {
            return Ok(None);
        }
        let (tenant, pool) = scope.columns();
        sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE tenant = ?1 AND pool = ?2 AND idempotency_key = ?3 \
              AND created_at_ms >= ?4"
        ))
        .bind(tenant)
        .bind(pool)
        .bind(idempotency_key)
        .bind(since_ms)
        .fetch_optional(&self.reader)
        .await?
        .map(RawTask::decode)
        .transpose()
    }

    async fn get_task(&self, task_id: &str) -> Result<Option<TaskRow>, StoreError> {
        self.task(task_id).await
    }

    async fn running_task_of_run(
        &self,
        scope: &Scope,
        run_id: &str,
    ) -> Result<Option<TaskRow>, StoreError> {
        let (tenant, pool) = scope.columns();
        sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE run_id = ?1 AND run_id <> '' AND tenant = ?2 AND pool = ?3 \
              AND status = 'running'"
        ))
        .bind(run_id)
        .bind(tenant)
        .bind(pool)
        .fetch_optional(&self.reader)
        .await?
        .map(RawTask::decode)
        .transpose()
    }

    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let mut qb = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            task_list_columns!(),
            // Held rows are not tasks yet.
            " FROM tasks WHERE status <> 'held'"
        ));
        // A row has exactly one of tenant and pool: naming the other as empty
        // lets the (tenant, pool, seq) index serve the order.
        if !filter.tenant.is_empty() || !filter.pool.is_empty() {
            qb.push(" AND tenant = ")
                .push_bind(&filter.tenant)
                .push(" AND pool = ")
                .push_bind(&filter.pool);
        }
        if let Some(status) = filter.status {
            qb.push(" AND status = ").push_bind(status.as_str());
        }
        if !filter.agent.is_empty() {
            qb.push(" AND agent = ").push_bind(&filter.agent);
        }
        if let Some(before) = before_seq {
            qb.push(" AND seq < ").push_bind(before);
        }
        qb.push(" ORDER BY seq DESC LIMIT ")
            .push_bind(i64::from(limit));
        qb.build_query_as::<RawTask>()
            .fetch_all(&self.reader)
            .await?
            .into_iter()
            .map(RawTask::decode)
            .collect()
    }

    async fn claim(&self, batch: &ClaimBatch<'_>) -> Result<Vec<TaskRow>, StoreError> {
        if batch.max == 0 {
            return Ok(Vec::new());
        }
        self.write(ClaimArgs::of(batch)?, |c, a| {
            Box::pin(async move {
                let rows = sqlx::query_as::<_, RawTask>(concat!(
                    assign!(),
                    "WHERE seq IN (SELECT q.seq FROM tasks AS q \
                      WHERE q.status = 'queued' AND q.tenant = ?4 AND q.pool = ?5 AND ",
                    labels_match!("q", "?6"),
                    " ORDER BY q.priority DESC, q.seq LIMIT ?7) RETURNING ",
                    task_columns!()
                ))
                .bind(&a.worker_id)
                .bind(a.lease_expires_at_ms)
                .bind(a.now_ms)
                .bind(&a.tenant)
                .bind(&a.pool)
                .bind(&a.worker_labels)
                .bind(a.max)
                .fetch_all(c)
                .await?;
                in_claim_order(rows)
            })
        })
        .await
    }

    async fn claim_task(
        &self,
        scope: &Scope,
        task_id: &str,
        batch: &ClaimBatch<'_>,
    ) -> Result<ClaimOne, StoreError> {
        // The task must be of the scope asked for and of the claiming worker's.
        if scope != batch.scope {
            return Ok(ClaimOne::NotFound);
        }
        let args = (ClaimArgs::of(batch)?, task_id.to_owned());
        self.write(args, |c, (a, task_id)| {
            Box::pin(async move {
                let claimed = sqlx::query_as::<_, RawTask>(concat!(
                    assign!(),
                    "WHERE task_id = ?4 AND tenant = ?5 AND pool = ?6 AND status = 'queued' AND ",
                    labels_match!("tasks", "?7"),
                    " RETURNING ",
                    task_columns!()
                ))
                .bind(&a.worker_id)
                .bind(a.lease_expires_at_ms)
                .bind(a.now_ms)
                .bind(task_id)
                .bind(&a.tenant)
                .bind(&a.pool)
                .bind(&a.worker_labels)
                .fetch_optional(&mut *c)
                .await?;
                if let Some(row) = claimed {
                    return Ok(ClaimOne::Claimed(row.decode()?));
                }
                let current = sqlx::query_as::<_, RawTask>(concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM tasks WHERE task_id = ?1 AND tenant = ?2 AND pool = ?3"
                ))
                .bind(task_id)
                .bind(&a.tenant)
                .bind(&a.pool)
                .fetch_optional(c)
                .await?;
                not_claimed(current)
            })
        })
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
        let args = (
            task_id.to_owned(),
            worker_id.to_owned(),
            epoch_param(lease_epoch),
            run_id.to_owned(),
            now_ms,
            now_ms.saturating_add(lease_ms),
        );
        self.write(
            args,
            |c, (task_id, worker_id, epoch, run_id, now_ms, lease_expires_at_ms)| {
                Box::pin(async move {
                    sqlx::query_as::<_, RawTask>(concat!(
                        "UPDATE tasks SET status = 'running', run_id = ?1, \
                          lease_expires_at_ms = ?2, updated_at_ms = ?3 \
                         WHERE task_id = ?4 AND worker_id = ?5 AND lease_epoch = ?6 \
                          AND status = 'assigned' RETURNING ",
                        task_columns!()
                    ))
                    .bind(run_id)
                    .bind(lease_expires_at_ms)
                    .bind(now_ms)
                    .bind(task_id)
                    .bind(worker_id)
                    .bind(epoch)
                    .fetch_optional(c)
                    .await?
                    .map(RawTask::decode)
                    .transpose()
                })
            },
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
        let args = (
            task_id.to_owned(),
            epoch_param(lease_epoch),
            reason.to_owned(),
            now_ms,
        );
        self.write(args, |c, (task_id, epoch, reason, now_ms)| {
            Box::pin(async move {
                let before = sqlx::query_as::<_, RawTask>(concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM tasks WHERE task_id = ?1 AND lease_epoch = ?2 \
                      AND status IN ('assigned', 'running')"
                ))
                .bind(task_id)
                .bind(epoch)
                .fetch_all(&mut *c)
                .await?;
                let released = release(c, before, reason, *now_ms).await?;
                Ok(released.into_iter().next())
            })
        })
        .await
    }

    async fn renew_leases(
        &self,
        worker_id: &str,
        leases: &[(String, u64)],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let listed = to_json(
            &leases
                .iter()
                .map(|(id, epoch)| (id, epoch_param(*epoch)))
                .collect::<Vec<_>>(),
        )?;
        let args = (
            worker_id.to_owned(),
            listed,
            leases.is_empty(),
            now_ms,
            now_ms.saturating_add(lease_ms),
        );
        let renewed = self
            .write(
                args,
                |c, (worker_id, listed, none, now_ms, lease_expires_at_ms)| {
                    Box::pin(async move {
                        let renewed: Vec<(String, i64)> = if *none {
                            Vec::new()
                        } else {
                            sqlx::query_as(
                                "UPDATE tasks SET lease_expires_at_ms = ?1, updated_at_ms = ?2 \
                                 WHERE worker_id = ?3 AND status IN ('assigned', 'running') \
                                  AND EXISTS (SELECT 1 FROM json_each(?4) AS l \
                                   WHERE json_extract(l.value, '$[0]') = tasks.task_id \
                                    AND json_extract(l.value, '$[1]') = tasks.lease_epoch) \
                                 RETURNING task_id, lease_epoch",
                            )
                            .bind(lease_expires_at_ms)
                            .bind(now_ms)
                            .bind(worker_id)
                            .bind(listed)
                            .fetch_all(&mut *c)
                            .await?
                        };
                        sqlx::query(
                            "UPDATE workers SET last_heartbeat_at_ms = ?1 WHERE worker_id = ?2",
                        )
                        .bind(now_ms)
                        .bind(worker_id)
                        .execute(c)
                        .await?;
                        Ok(renewed)
                    })
                },
            )
            .await?;
        Ok(not_renewed(leases.to_vec(), &renewed))
    }

    async fn finish(&self, report: &Finish<'_>) -> Result<Finished, StoreError> {
        let (reply, replied) = oneshot::channel();
        let pending = PendingFinish {
            args: FinishArgs::of(report),
            result: None,
            reply,
        };
        self.queue(Box::new(pending), replied).await
    }

    async fn expire(&self, now_ms: i64, limit: u32) -> Result<Vec<Released>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.write((now_ms, i64::from(limit)), |c, (now_ms, limit)| {
            Box::pin(async move {
                let before = sqlx::query_as::<_, RawTask>(concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM tasks WHERE status IN ('assigned', 'running') \
                      AND MIN(lease_expires_at_ms, deadline_at_ms) < ?1 \
                     ORDER BY MIN(lease_expires_at_ms, deadline_at_ms), seq LIMIT ?2"
                ))
                .bind(now_ms)
                .bind(limit)
                .fetch_all(&mut *c)
                .await?;
                let before = decode_all(before)?;
                if before.is_empty() {
                    return Ok(Vec::new());
                }
                let after = sqlx::query_as::<_, RawTask>(concat!(
                    "UPDATE tasks SET \
                      status = CASE WHEN deadline_at_ms < ?1 THEN 'failed' \
                       WHEN attempt < max_attempts THEN 'queued' ELSE 'failed' END, \
                      status_reason = CASE WHEN deadline_at_ms < ?1 THEN 'deadline exceeded' \
                       WHEN attempt < max_attempts THEN 'lease expired' \
                       ELSE 'attempts exhausted' END, \
                      outcome = CASE WHEN deadline_at_ms < ?1 THEN ?2 ELSE outcome END, \
                      finished_at_ms = CASE WHEN deadline_at_ms < ?1 THEN ?1 \
                       WHEN attempt < max_attempts THEN NULL ELSE ?1 END, \
                      lease_expires_at_ms = NULL, deadline_at_ms = NULL, updated_at_ms = ?1 \
                     WHERE seq IN (SELECT value FROM json_each(?3)) \
                      AND status IN ('assigned', 'running') RETURNING ",
                    task_columns!()
                ))
                .bind(now_ms)
                .bind(Outcome::TimedOut as i64)
                .bind(to_json(&seqs(&before))?)
                .fetch_all(c)
                .await?;
                pair_released(before, after)
            })
        })
        .await
    }

    async fn cancel_task(
        &self,
        task_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Cancelled, StoreError> {
        let args = (task_id.to_owned(), reason.to_owned(), now_ms);
        self.write(args, |c, (task_id, reason, now_ms)| {
            Box::pin(async move {
                let before = sqlx::query_as::<_, RawTask>(concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM tasks WHERE task_id = ?1"
                ))
                .bind(task_id)
                .fetch_optional(&mut *c)
                .await?;
                let Some(before) = before.map(RawTask::decode).transpose()? else {
                    return Ok(Cancelled::NotFound);
                };
                if before.status == TaskStatus::Held {
                    return Ok(Cancelled::NotFound);
                }
                if before.status.is_final() {
                    return Ok(Cancelled::AlreadyFinal(before));
                }
                let after = sqlx::query_as::<_, RawTask>(concat!(
                    "UPDATE tasks SET status = 'cancelled', status_reason = ?1, \
                      finished_at_ms = ?2, lease_expires_at_ms = NULL, deadline_at_ms = NULL, \
                      updated_at_ms = ?2 \
                     WHERE seq = ?3 RETURNING ",
                    task_columns!()
                ))
                .bind(reason)
                .bind(now_ms)
                .bind(before.seq)
                .fetch_one(c)
                .await?
                .decode()?;
                Ok(Cancelled::Cancelled { before, after })
            })
        })
        .await
    }

    async fn release_workers_tasks(
        &self,
        worker_ids: &[String],
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<Released>, StoreError> {
        if worker_ids.is_empty() {
            return Ok(Vec::new());
        }
        let args = (to_json(worker_ids)?, reason.to_owned(), now_ms);
        self.write(args, |c, (ids, reason, now_ms)| {
            Box::pin(async move {
                let before = sqlx::query_as::<_, RawTask>(concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM tasks WHERE status IN ('assigned', 'running') \
                      AND worker_id IN (SELECT value FROM json_each(?1)) ORDER BY seq"
                ))
                .bind(ids)
                .fetch_all(&mut *c)
                .await?;
                release(c, before, reason, *now_ms).await
            })
        })
        .await
    }

    async fn queued_scopes(&self) -> Result<Vec<(Scope, u64)>, StoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT tenant, pool, COUNT(*) FROM tasks WHERE status = 'queued' \
             GROUP BY tenant, pool ORDER BY tenant, pool",
        )
        .fetch_all(&self.reader)
        .await?;
        queued_scopes(rows)
    }

    async fn release_held(&self, after: &TaskRow) -> Result<Committed, StoreError> {
        let (reply, replied) = oneshot::channel();
        let pending = PendingRelease {
            after: after.clone(),
            result: None,
            reply,
        };
        self.writes
            .send(Box::new(pending))
            .await
            .map_err(|_| StoreError::Db(sqlx::Error::WorkerCrashed))?;
        Ok(Committed::pending(async move {
            replied
                .await
                .map_err(|_| StoreError::Db(sqlx::Error::WorkerCrashed))?
        }))
    }

    async fn held_before(&self, before_ms: i64, limit: u32) -> Result<Vec<TaskRow>, StoreError> {
        let rows = sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE status = 'held' AND created_at_ms < ?1 \
              ORDER BY created_at_ms, seq LIMIT ?2"
        ))
        .bind(before_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        decode_all(rows)
    }

    async fn delete_held(&self, task_id: &str) -> Result<bool, StoreError> {
        self.write(task_id.to_owned(), |c, task_id| {
            Box::pin(async move {
                let done = sqlx::query("DELETE FROM tasks WHERE task_id = ?1 AND status = 'held'")
                    .bind(task_id)
                    .execute(c)
                    .await?;
                Ok(done.rows_affected() == 1)
            })
        })
        .await
    }
}

async fn insert_task(
    c: &mut SqliteConnection,
    t: &TaskRow,
    e: &EncodedTask,
    dedup_since_ms: i64,
) -> Result<Inserted, StoreError> {
    let (tenant, pool) = t.scope.columns();
    if !t.idempotency_key.is_empty() {
        let holder = sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE tenant = ?1 AND pool = ?2 AND idempotency_key = ?3"
        ))
        .bind(tenant)
        .bind(pool)
        .bind(&t.idempotency_key)
        .fetch_optional(&mut *c)
        .await?;
        if let Some(holder) = holder.map(RawTask::decode).transpose()? {
            if holder.created_at_ms >= dedup_since_ms {
                return Ok(Inserted::Existing(holder));
            }
            // Older than the window: the key is free again.
            sqlx::query("UPDATE tasks SET idempotency_key = '' WHERE seq = ?1")
                .bind(holder.seq)
                .execute(&mut *c)
                .await?;
        }
    }
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO tasks (task_id, tenant, pool, agent, agent_version, labels, cascade, \
          secret_keys, payload, priority, idempotency_key, request_hash, status, status_reason, \
          attempt, max_attempts, lease_epoch, worker_id, run_id, lease_expires_at_ms, \
          deadline_at_ms, timeout_ms, outcome, exit_code, output_summary, created_at_ms, \
          updated_at_ms, finished_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
          ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28) RETURNING seq",
    )
    .bind(&t.task_id)
    .bind(tenant)
    .bind(pool)
    .bind(&t.agent)
    .bind(&t.agent_version)
    .bind(&e.labels)
    .bind(t.cascade.as_slice())
    .bind(&e.secret_keys)
    .bind(t.payload.as_slice())
    .bind(i64::from(t.priority))
    .bind(&t.idempotency_key)
    .bind(t.request_hash.as_slice())
    .bind(t.status.as_str())
    .bind(&t.status_reason)
    .bind(i64::from(t.attempt))
    .bind(i64::from(t.max_attempts))
    .bind(e.lease_epoch)
    .bind(&t.worker_id)
    .bind(&t.run_id)
    .bind(t.lease_expires_at_ms)
    .bind(t.deadline_at_ms)
    .bind(t.timeout_ms)
    .bind(t.outcome as i64)
    .bind(i64::from(t.exit_code))
    .bind(&t.output_summary)
    .bind(t.created_at_ms)
    .bind(t.updated_at_ms)
    .bind(t.finished_at_ms)
    .fetch_one(&mut *c)
    .await?;
    Ok(Inserted::New(TaskRow { seq, ..t.clone() }))
}

/// Gives leased tasks up: queued again when attempts remain, else failed;
/// `reason` becomes the status_reason.
async fn release(
    c: &mut SqliteConnection,
    before: Vec<RawTask>,
    reason: &str,
    now_ms: i64,
) -> Result<Vec<Released>, StoreError> {
    let before = decode_all(before)?;
    if before.is_empty() {
        return Ok(Vec::new());
    }
    let after = sqlx::query_as::<_, RawTask>(concat!(
        "UPDATE tasks SET \
          status = CASE WHEN attempt < max_attempts THEN 'queued' ELSE 'failed' END, \
          status_reason = ?1, \
          finished_at_ms = CASE WHEN attempt < max_attempts THEN NULL ELSE ?2 END, \
          lease_expires_at_ms = NULL, deadline_at_ms = NULL, updated_at_ms = ?2 \
         WHERE seq IN (SELECT value FROM json_each(?3)) \
          AND status IN ('assigned', 'running') RETURNING ",
        task_columns!()
    ))
    .bind(reason)
    .bind(now_ms)
    .bind(to_json(&seqs(&before))?)
    .fetch_all(&mut *c)
    .await?;
    pair_released(before, after)
}

// Backend-neutral helpers, shared with postgres.rs (their natural home is
// mod.rs, which holds the fixed trait).

/// A claim's arguments, owned and as the SQL binds them.
pub(super) struct ClaimArgs {
    pub(super) tenant: String,
    pub(super) pool: String,
    pub(super) worker_id: String,
    pub(super) worker_labels: String,
    pub(super) max: i64,
    pub(super) now_ms: i64,
    pub(super) lease_expires_at_ms: i64,
}

impl ClaimArgs {
    pub(super) fn of(b: &ClaimBatch<'_>) -> Result<Self, StoreError> {
        let (tenant, pool) = b.scope.columns();
        Ok(Self {
            tenant: tenant.to_owned(),
            pool: pool.to_owned(),
            worker_id: b.worker_id.to_owned(),
            worker_labels: to_json(b.worker_labels)?,
            max: i64::from(b.max),
            now_ms: b.now_ms,
            lease_expires_at_ms: b.now_ms.saturating_add(b.lease_ms),
        })
    }
}

/// A report's arguments, owned.
pub(super) struct FinishArgs {
    pub(super) task_id: String,
    pub(super) worker_id: String,
    pub(super) lease_epoch: u64,
    pub(super) outcome: Outcome,
    pub(super) exit_code: i32,
    pub(super) output_summary: String,
    pub(super) now_ms: i64,
}

impl FinishArgs {
    pub(super) fn of(r: &Finish<'_>) -> Self {
        Self {
            task_id: r.task_id.to_owned(),
            worker_id: r.worker_id.to_owned(),
            lease_epoch: r.lease_epoch,
            outcome: r.outcome,
            exit_code: r.exit_code,
            output_summary: r.output_summary.to_owned(),
            now_ms: r.now_ms,
        }
    }
}

/// Where an applied report takes a task: `retry` queues it again while
/// attempts remain (else failed, "attempts exhausted"); otherwise `status`.
pub(super) struct FinishPlan {
    pub(super) retry: bool,
    pub(super) status: &'static str,
}

impl FinishPlan {
    pub(super) fn of(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Succeeded => Self {
                retry: false,
                status: TaskStatus::Succeeded.as_str(),
            },
            Outcome::Failed | Outcome::Revoked | Outcome::TimedOut | Outcome::Cancelled => Self {
                retry: false,
                status: TaskStatus::Failed.as_str(),
            },
            // A report without an outcome says nothing about the work: as an
            // error, it is retried while attempts remain.
            Outcome::Error | Outcome::None => Self {
                retry: true,
                status: TaskStatus::Failed.as_str(),
            },
        }
    }
}

/// A report that changed nothing: the task's current epoch and worker tell a
/// repeat from a stale one.
pub(super) fn not_finished(
    current: Option<RawTask>,
    r: &FinishArgs,
) -> Result<Finished, StoreError> {
    let Some(task) = current.map(RawTask::decode).transpose()? else {
        return Ok(Finished::Unknown);
    };
    Ok(
        if task.lease_epoch == r.lease_epoch && task.worker_id == r.worker_id {
            Finished::Repeat(task)
        } else {
            Finished::Stale(task)
        },
    )
}

/// Why a task of the scope was not claimed.
pub(super) fn not_claimed(current: Option<RawTask>) -> Result<ClaimOne, StoreError> {
    Ok(match current.map(RawTask::decode).transpose()? {
        // A held task is not a task yet.
        None => ClaimOne::NotFound,
        Some(task) if task.status == TaskStatus::Held => ClaimOne::NotFound,
        Some(task) if task.status == TaskStatus::Queued => ClaimOne::LabelsMismatch,
        Some(task) => ClaimOne::NotQueued(task),
    })
}

/// Claimed rows, highest priority first, then oldest (RETURNING has no order).
pub(super) fn in_claim_order(rows: Vec<RawTask>) -> Result<Vec<TaskRow>, StoreError> {
    let mut tasks = decode_all(rows)?;
    tasks.sort_by_key(|t| (std::cmp::Reverse(t.priority), t.seq));
    Ok(tasks)
}

/// The listed leases that were not renewed.
pub(super) fn not_renewed(
    listed: Vec<(String, u64)>,
    renewed: &[(String, i64)],
) -> Vec<(String, u64)> {
    listed
        .into_iter()
        .filter(|(id, epoch)| {
            !renewed
                .iter()
                .any(|(r, e)| r == id && *e == epoch_param(*epoch))
        })
        .collect()
}

/// Each row before, with the same row after (matched by seq).
pub(super) fn pair_released(
    before: Vec<TaskRow>,
    after: Vec<RawTask>,
) -> Result<Vec<Released>, StoreError> {
    let mut after: BTreeMap<i64, TaskRow> =
        decode_all(after)?.into_iter().map(|t| (t.seq, t)).collect();
    Ok(before
        .into_iter()
        .filter_map(|before| {
            let after = after.remove(&before.seq)?;
            Some(Released { before, after })
        })
        .collect())
}

pub(super) fn queued_scopes(
    rows: Vec<(String, String, i64)>,
) -> Result<Vec<(Scope, u64)>, StoreError> {
    rows.into_iter()
        .map(|(tenant, pool, n)| {
            let scope = Scope::from_columns(&tenant, &pool).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "queued tasks of tenant {tenant:?} pool {pool:?}: not exactly one is set"
                ))
            })?;
            Ok((scope, u64::try_from(n).unwrap_or(0)))
        })
        .collect()
}

pub(super) fn seqs(tasks: &[TaskRow]) -> Vec<i64> {
    tasks.iter().map(|t| t.seq).collect()
}

pub(super) fn decode_all(rows: Vec<RawTask>) -> Result<Vec<TaskRow>, StoreError> {
    rows.into_iter().map(RawTask::decode).collect()
}

/// An epoch as the SQL compares it. Stored epochs are never negative, so one
/// beyond `i64` (which no task can have) becomes -1 and matches nothing.
pub(super) fn epoch_param(epoch: u64) -> i64 {
    i64::try_from(epoch).unwrap_or(-1)
}

pub(super) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("encoding json: {e}")))
}

/// The columns of a task to insert that need encoding.
pub(super) struct EncodedTask {
    pub(super) labels: String,
    pub(super) secret_keys: String,
    pub(super) lease_epoch: i64,
}

impl EncodedTask {
    pub(super) fn of(t: &TaskRow) -> Result<Self, StoreError> {
        Ok(Self {
            labels: to_json(&t.labels)?,
            secret_keys: to_json(&t.secret_keys)?,
            lease_epoch: i64::try_from(t.lease_epoch).map_err(|_| {
                StoreError::Corrupt(format!("task {}: lease_epoch out of range", t.task_id))
            })?,
        })
    }
}

fn corrupt(what: &str, id: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what} {id}: {why}"))
}

fn json<T: serde::de::DeserializeOwned>(
    what: &str,
    id: &str,
    column: &str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(what, id, format!("{column} is not valid: {e}")))
}

fn int<T: TryFrom<i64>>(what: &str, id: &str, column: &str, v: i64) -> Result<T, StoreError> {
    T::try_from(v).map_err(|_| corrupt(what, id, format!("{column} {v} is out of range")))
}

fn scope(what: &str, id: &str, tenant: &str, pool: &str) -> Result<Scope, StoreError> {
    Scope::from_columns(tenant, pool)
        .ok_or_else(|| corrupt(what, id, "not exactly one of tenant and pool is set"))
}

/// A task as read, before it is checked.
#[derive(sqlx::FromRow)]
pub(super) struct RawTask {
    seq: i64,
    task_id: String,
    tenant: String,
    pool: String,
    agent: String,
    agent_version: String,
    labels: String,
    cascade: Vec<u8>,
    secret_keys: String,
    payload: Vec<u8>,
    payload_size: i64,
    priority: i64,
    idempotency_key: String,
    request_hash: Vec<u8>,
    status: String,
    status_reason: String,
    attempt: i64,
    max_attempts: i64,
    lease_epoch: i64,
    worker_id: String,
    run_id: String,
    lease_expires_at_ms: Option<i64>,
    deadline_at_ms: Option<i64>,
    timeout_ms: i64,
    outcome: i64,
    exit_code: i64,
    output_summary: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    finished_at_ms: Option<i64>,
}

impl RawTask {
    pub(super) fn decode(self) -> Result<TaskRow, StoreError> {
        const WHAT: &str = "task";
        let id = self.task_id.as_str();
        let status = TaskStatus::parse(&self.status)
            .ok_or_else(|| corrupt(WHAT, id, format!("unknown status {:?}", self.status)))?;
        let outcome = i32::try_from(self.outcome)
            .ok()
            .and_then(Outcome::from_i32)
            .ok_or_else(|| corrupt(WHAT, id, format!("unknown outcome {}", self.outcome)))?;
        Ok(TaskRow {
            seq: self.seq,
            scope: scope(WHAT, id, &self.tenant, &self.pool)?,
            labels: json(WHAT, id, "labels", &self.labels)?,
            secret_keys: json(WHAT, id, "secret_keys", &self.secret_keys)?,
            priority: int(WHAT, id, "priority", self.priority)?,
            attempt: int(WHAT, id, "attempt", self.attempt)?,
            max_attempts: int(WHAT, id, "max_attempts", self.max_attempts)?,
            lease_epoch: int(WHAT, id, "lease_epoch", self.lease_epoch)?,
            exit_code: int(WHAT, id, "exit_code", self.exit_code)?,
            payload_size: int(WHAT, id, "payload_size", self.payload_size)?,
            status,
            outcome,
            task_id: self.task_id,
            agent: self.agent,
            agent_version: self.agent_version,
            cascade: self.cascade,
            payload: self.payload,
            idempotency_key: self.idempotency_key,
            request_hash: self.request_hash,
            status_reason: self.status_reason,
            worker_id: self.worker_id,
            run_id: self.run_id,
            lease_expires_at_ms: self.lease_expires_at_ms,
            deadline_at_ms: self.deadline_at_ms,
            timeout_ms: self.timeout_ms,
            output_summary: self.output_summary,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            finished_at_ms: self.finished_at_ms,
        })
    }
}

/// A worker as read, before it is checked.
#[derive(sqlx::FromRow)]
pub(super) struct RawWorker {
    worker_id: String,
    spiffe_id: String,
    tenant: String,
    pool: String,
    labels: String,
    max_concurrent_runs: i64,
    sandbox_backends: String,
    version: String,
    state: String,
    registered_at_ms: i64,
    last_heartbeat_at_ms: i64,
}

impl RawWorker {
    pub(super) fn decode(self) -> Result<WorkerRow, StoreError> {
        const WHAT: &str = "worker";
        let id = self.worker_id.as_str();
        let state = WorkerState::parse(&self.state)
            .ok_or_else(|| corrupt(WHAT, id, format!("unknown state {:?}", self.state)))?;
        let labels: Labels = json(WHAT, id, "labels", &self.labels)?;
        Ok(WorkerRow {
            scope: scope(WHAT, id, &self.tenant, &self.pool)?,
            sandbox_backends: json(WHAT, id, "sandbox_backends", &self.sandbox_backends)?,
            max_concurrent_runs: int(WHAT, id, "max_concurrent_runs", self.max_concurrent_runs)?,
            labels,
            state,
            worker_id: self.worker_id,
            spiffe_id: self.spiffe_id,
            version: self.version,
            registered_at_ms: self.registered_at_ms,
            last_heartbeat_at_ms: self.last_heartbeat_at_ms,
        })
    }
}

/// An agent version as read, before it is checked.
#[derive(sqlx::FromRow)]
pub(super) struct RawAgent {
    name: String,
    version: String,
    image: String,
    command: String,
    requested_secret_keys: String,
    tool: String,
    description: String,
    status: String,
    submitted_by: String,
    submitted_at_ms: i64,
    decided_by: String,
    decided_at_ms: Option<i64>,
    decision_reason: String,
}

impl RawAgent {
    pub(super) fn decode(self) -> Result<AgentRow, StoreError> {
        const WHAT: &str = "agent";
        let id = format!("{}@{}", self.name, self.version);
        let status = AgentStatus::parse(&self.status)
            .ok_or_else(|| corrupt(WHAT, &id, format!("unknown status {:?}", self.status)))?;
        Ok(AgentRow {
            command: json(WHAT, &id, "command", &self.command)?,
            requested_secret_keys: json(
                WHAT,
                &id,
                "requested_secret_keys",
                &self.requested_secret_keys,
            )?,
            status,
            name: self.name,
            version: self.version,
            image: self.image,
            tool: self.tool,
            description: self.description,
            submitted_by: self.submitted_by,
            submitted_at_ms: self.submitted_at_ms,
            decided_by: self.decided_by,
            decided_at_ms: self.decided_at_ms,
            decision_reason: self.decision_reason,
        })
    }
}
