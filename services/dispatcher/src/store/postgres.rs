//! The production store: PostgreSQL, shared by every dispatcher replica
//! (synchronous_commit as the server sets it; on by default, so an
//! acknowledged enqueue is durable). The one exception is the release of a
//! held task, committed without waiting for its WAL flush: the task and
//! audit's record of it are durable already, and the settling pass redoes a
//! release a crash lost (see `DispatchStore::release_held`).
//!
//! Replicas race for the same rows: a claim locks its candidates `FOR UPDATE
//! SKIP LOCKED` and assigns them in the same statement, and every other change
//! is a conditional UPDATE (or a transaction that locks the rows it read), so
//! no two replicas ever assign one attempt or apply one report twice. The hot
//! paths (enqueue without a key, claim, start, heartbeat, report) are one
//! statement each; enqueues without a key, reports and reads of one task are
//! batched besides: the calls that queued up while the previous batch ran
//! share one statement (see `run_batcher`). Identifiers that are sorted or
//! paged by use the "C" collation: byte order, as in SQLite.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::sqlite::{
    ClaimArgs, EncodedTask, FinishArgs, FinishPlan, RawAgent, RawTask, RawWorker, decode_all,
    epoch_param, in_claim_order, not_claimed, not_finished, not_renewed, pair_released,
    queued_scopes, seqs, to_json,
};
use super::{
    Cancelled, ClaimBatch, ClaimOne, Committed, Decision, DispatchStore, Finish, Finished,
    Inserted, Released, StoreError, TaskFilter, WorkerFilter,
};
use crate::model::{
    AgentRow, AgentStatus, Outcome, Scope, TaskRow, TaskStatus, WorkerRow, WorkerState,
};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS agents (
        name TEXT COLLATE \"C\" NOT NULL,
        version TEXT COLLATE \"C\" NOT NULL,
        image TEXT NOT NULL,
        command TEXT NOT NULL,
        requested_secret_keys TEXT NOT NULL,
        tool TEXT NOT NULL,
        description TEXT NOT NULL,
        status TEXT NOT NULL,
        submitted_by TEXT NOT NULL,
        submitted_at_ms BIGINT NOT NULL,
        decided_by TEXT NOT NULL,
        decided_at_ms BIGINT,
        decision_reason TEXT NOT NULL,
        PRIMARY KEY (name, version)
    )",
    "CREATE INDEX IF NOT EXISTS agents_listing
        ON agents (name, submitted_at_ms DESC, version DESC)",
    "CREATE INDEX IF NOT EXISTS agents_approved ON agents (name, decided_at_ms)
        WHERE status = 'approved'",
    "CREATE TABLE IF NOT EXISTS workers (
        worker_id TEXT COLLATE \"C\" PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        pool TEXT NOT NULL,
        labels TEXT NOT NULL,
        max_concurrent_runs BIGINT NOT NULL,
        sandbox_backends TEXT NOT NULL,
        version TEXT NOT NULL,
        state TEXT NOT NULL,
        registered_at_ms BIGINT NOT NULL,
        last_heartbeat_at_ms BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS workers_scope ON workers (tenant, pool, worker_id)",
    "CREATE TABLE IF NOT EXISTS tasks (
        seq BIGSERIAL PRIMARY KEY,
        task_id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        pool TEXT NOT NULL,
        agent TEXT NOT NULL,
        agent_version TEXT NOT NULL,
        labels JSONB NOT NULL,
        cascade BYTEA NOT NULL,
        secret_keys TEXT NOT NULL,
        payload BYTEA NOT NULL,
        priority BIGINT NOT NULL,
        idempotency_key TEXT NOT NULL,
        request_hash BYTEA NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT NOT NULL,
        attempt BIGINT NOT NULL,
        max_attempts BIGINT NOT NULL,
        lease_epoch BIGINT NOT NULL,
        worker_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        lease_expires_at_ms BIGINT,
        deadline_at_ms BIGINT,
        timeout_ms BIGINT NOT NULL,
        outcome BIGINT NOT NULL,
        exit_code BIGINT NOT NULL,
        output_summary TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        updated_at_ms BIGINT NOT NULL,
        finished_at_ms BIGINT
    )",
    // The claim walks this in order and stops after `max` matches.
    "CREATE INDEX IF NOT EXISTS tasks_queued ON tasks (tenant, pool, priority DESC, seq)
        WHERE status = 'queued'",
    // A lease ends at the earlier of its expiry and its deadline (a leased
    // task has both), so one range of this index is what `expire` releases.
    "CREATE INDEX IF NOT EXISTS tasks_expiry
        ON tasks (LEAST(lease_expires_at_ms, deadline_at_ms))
        WHERE status IN ('assigned', 'running')",
    "CREATE INDEX IF NOT EXISTS tasks_worker ON tasks (worker_id)
        WHERE status IN ('assigned', 'running')",
    "CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks (tenant, pool, idempotency_key)
        WHERE idempotency_key <> ''",
    // The settling pass's walk; held rows live for one audit Append.
    "CREATE INDEX IF NOT EXISTS tasks_held ON tasks (created_at_ms, seq) WHERE status = 'held'",
    "CREATE INDEX IF NOT EXISTS tasks_scope_newest ON tasks (tenant, pool, seq)",
    "CREATE INDEX IF NOT EXISTS tasks_run ON tasks (run_id) WHERE run_id <> ''",
];

/// The columns an insert of a task names, in the order both inserts bind them.
macro_rules! task_insert_columns {
    () => {
        "task_id, tenant, pool, agent, agent_version, labels, cascade, secret_keys, payload, \
         priority, idempotency_key, request_hash, status, status_reason, attempt, max_attempts, \
         lease_epoch, worker_id, run_id, lease_expires_at_ms, deadline_at_ms, timeout_ms, \
         outcome, exit_code, output_summary, created_at_ms, updated_at_ms, finished_at_ms"
    };
}

/// Every column of the task row `t`, as `RawTask` reads it.
macro_rules! task_columns {
    () => {
        "t.seq, t.task_id, t.tenant, t.pool, t.agent, t.agent_version, \
         t.labels::text AS labels, t.cascade, t.secret_keys, t.payload, \
         octet_length(t.payload)::bigint AS payload_size, t.priority, \
         t.idempotency_key, t.request_hash, t.status, t.status_reason, t.attempt, \
         t.max_attempts, t.lease_epoch, t.worker_id, t.run_id, t.lease_expires_at_ms, \
         t.deadline_at_ms, t.timeout_ms, t.outcome, t.exit_code, t.output_summary, \
         t.created_at_ms, t.updated_at_ms, t.finished_at_ms"
    };
}

/// As `task_columns!`, without reading the payloads (lists leave them empty).
macro_rules! task_list_columns {
    () => {
        "t.seq, t.task_id, t.tenant, t.pool, t.agent, t.agent_version, \
         t.labels::text AS labels, t.cascade, t.secret_keys, ''::bytea AS payload, \
         octet_length(t.payload)::bigint AS payload_size, t.priority, \
         t.idempotency_key, t.request_hash, t.status, t.status_reason, t.attempt, \
         t.max_attempts, t.lease_epoch, t.worker_id, t.run_id, t.lease_expires_at_ms, \
         t.deadline_at_ms, t.timeout_ms, t.outcome, t.exit_code, t.output_summary, \
         t.created_at_ms, t.updated_at_ms, t.finished_at_ms"
    };
}

/// The assignment of a claim. $1 worker, $2 lease expiry, $3 now.
macro_rules! assign {
    () => {
        "UPDATE tasks AS t SET status = 'assigned', attempt = t.attempt + 1, \
         lease_epoch = t.lease_epoch + 1, worker_id = $1, run_id = '', \
         lease_expires_at_ms = $2, deadline_at_ms = $3 + t.timeout_ms, status_reason = '', \
         updated_at_ms = $3 "
    };
}

const AGENT_COLUMNS: &str = "name, version, image, command, requested_secret_keys, tool, \
     description, status, submitted_by, submitted_at_ms, decided_by, decided_at_ms, \
     decision_reason";

const WORKER_COLUMNS: &str = "worker_id, spiffe_id, tenant, pool, labels, max_concurrent_runs, \
     sandbox_backends, version, state, registered_at_ms, last_heartbeat_at_ms";

/// The gives-up of `release`: $1 reason, $2 now, $3 the rows' seqs.
const RELEASE: &str = concat!(
    "UPDATE tasks AS t SET \
      status = CASE WHEN t.attempt < t.max_attempts THEN 'queued' ELSE 'failed' END, \
      status_reason = $1, \
      finished_at_ms = CASE WHEN t.attempt < t.max_attempts THEN NULL ELSE $2 END, \
      lease_expires_at_ms = NULL, deadline_at_ms = NULL, updated_at_ms = $2 \
     WHERE t.seq = ANY($3) AND t.status IN ('assigned', 'running') RETURNING ",
    task_columns!()
);

/// Connections for the scheduler's claims: one per scheduler loop by default.
const CLAIM_CONNECTIONS: u32 = 4;

/// Connections for releases of held tasks, one per batcher.
const RELEASE_CONNECTIONS: u32 = 4;

/// The advisory lock replicas take to create the schema ("dspt").
const SCHEMA_LOCK: i64 = 0x6473_7074;

/// How many calls one batch takes at most (a statement's arrays stay small).
const MAX_BATCH: usize = 256;

/// Batches run at once. More than one, so that the next batch's statements
/// run while one waits for its commit's WAL flush (which PostgreSQL then
/// shares between them); few, as each batch holds up to three connections of
/// the pool's 16 (an insert, a report and a read statement, run together).
const BATCHERS: usize = 4;

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The scheduler's claims have connections of their own, so that they
    /// never queue behind the Enqueue and report traffic for one.
    claims: PgPool,
    /// The releases of held tasks: their sessions commit without waiting for
    /// the WAL flush (see `release_batch`).
    releases: PgPool,
    /// The calls the batchers serve. The batchers end when every clone of
    /// the store is dropped (the channel closes) or when the pool is closed.
    batched: mpsc::Sender<Batched>,
}

impl PgStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(url)
            .await?;
        // Replicas starting together race to create the schema; creating it
        // under a lock makes the IF NOT EXISTS checks see each other.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEMA_LOCK)
            .execute(&mut *tx)
            .await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        let claims = PgPoolOptions::new()
            .max_connections(CLAIM_CONNECTIONS)
            .connect(url)
            .await?;
        let releases = PgPoolOptions::new()
            .max_connections(RELEASE_CONNECTIONS)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("SET synchronous_commit TO OFF")
                        .execute(conn)
                        .await
                        .map(drop)
                })
            })
            .connect(url)
            .await?;
        let (batched, waiting) = mpsc::channel(BATCHERS * MAX_BATCH);
        let waiting = Arc::new(Mutex::new(waiting));
        for _ in 0..BATCHERS {
            tokio::spawn(run_batcher(
                pool.clone(),
                releases.clone(),
                Arc::clone(&waiting),
            ));
        }
        Ok(Self {
            pool,
            claims,
            releases,
            batched,
        })
    }

    /// Closes the pools' connections (the batchers then end).
    pub async fn close(&self) {
        self.claims.close().await;
        self.releases.close().await;
        self.pool.close().await;
    }

    /// Hands a call to the batchers and waits for its answer.
    async fn batched<T>(&self, call: impl FnOnce(Reply<T>) -> Batched) -> Result<T, StoreError> {
        let (reply, replied) = oneshot::channel();
        let gone = || {
            StoreError::Db(if self.pool.is_closed() {
                sqlx::Error::PoolClosed
            } else {
                sqlx::Error::WorkerCrashed
            })
        };
        self.batched.send(call(reply)).await.map_err(|_| gone())?;
        replied.await.map_err(|_| gone())?
    }
}

#[async_trait::async_trait]
impl DispatchStore for PgStore {
    async fn submit_agent(&self, a: &AgentRow) -> Result<bool, StoreError> {
        let done = sqlx::query(&format!(
            "INSERT INTO agents ({AGENT_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (name, version) DO NOTHING"
        ))
        .bind(&a.name)
        .bind(&a.version)
        .bind(&a.image)
        .bind(to_json(&a.command)?)
        .bind(to_json(&a.requested_secret_keys)?)
        .bind(&a.tool)
        .bind(&a.description)
        .bind(a.status.as_str())
        .bind(&a.submitted_by)
        .bind(a.submitted_at_ms)
        .bind(&a.decided_by)
        .bind(a.decided_at_ms)
        .bind(&a.decision_reason)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn get_agent(&self, name: &str, version: &str) -> Result<Option<AgentRow>, StoreError> {
        sqlx::query_as::<_, RawAgent>(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE name = $1 AND version = $2"
        ))
        .bind(name)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?
        .map(RawAgent::decode)
        .transpose()
    }

    async fn latest_approved_agent(&self, name: &str) -> Result<Option<AgentRow>, StoreError> {
        sqlx::query_as::<_, RawAgent>(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE name = $1 AND status = 'approved' \
             ORDER BY decided_at_ms DESC, submitted_at_ms DESC, version DESC LIMIT 1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
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
        let decided = sqlx::query_as::<_, RawAgent>(&format!(
            "UPDATE agents SET status = $1, decided_by = $2, decided_at_ms = $3, \
             decision_reason = $4 \
             WHERE name = $5 AND version = $6 AND status = 'pending' \
             RETURNING {AGENT_COLUMNS}"
        ))
        .bind(status.as_str())
        .bind(decided_by)
        .bind(decided_at_ms)
        .bind(reason)
        .bind(name)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = decided {
            return Ok(Decision::Decided(row.decode()?));
        }
        // A decided version never becomes pending again: what we read now is
        // why the update did nothing.
        Ok(match self.get_agent(name, version).await? {
            Some(row) => Decision::NotPending(row),
            None => Decision::NotFound,
        })
    }

    async fn list_agents(
        &self,
        name: &str,
        status: Option<AgentStatus>,
        offset: u64,
        limit: u32,
    ) -> Result<Vec<AgentRow>, StoreError> {
        let mut qb =
            QueryBuilder::<Postgres>::new(format!("SELECT {AGENT_COLUMNS} FROM agents WHERE TRUE"));
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
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(RawAgent::decode)
            .collect()
    }

    async fn upsert_worker(&self, w: &WorkerRow) -> Result<(), StoreError> {
        let (tenant, pool) = w.scope.columns();
        sqlx::query(&format!(
            "INSERT INTO workers ({WORKER_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
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
        .bind(to_json(&w.labels)?)
        .bind(i64::from(w.max_concurrent_runs))
        .bind(to_json(&w.sandbox_backends)?)
        .bind(&w.version)
        .bind(w.state.as_str())
        .bind(w.registered_at_ms)
        .bind(w.last_heartbeat_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_worker(&self, worker_id: &str) -> Result<Option<WorkerRow>, StoreError> {
        sqlx::query_as::<_, RawWorker>(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE worker_id = $1"
        ))
        .bind(worker_id)
        .fetch_optional(&self.pool)
        .await?
        .map(RawWorker::decode)
        .transpose()
    }

    async fn set_worker_state(
        &self,
        worker_id: &str,
        state: WorkerState,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE workers SET state = $1 WHERE worker_id = $2")
            .bind(state.as_str())
            .bind(worker_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn list_workers(
        &self,
        filter: &WorkerFilter,
        after_worker_id: &str,
        limit: u32,
    ) -> Result<Vec<WorkerRow>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE TRUE"
        ));
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
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(RawWorker::decode)
            .collect()
    }

    async fn workers_of_scope(&self, scope: &Scope) -> Result<Vec<WorkerRow>, StoreError> {
        let (tenant, pool) = scope.columns();
        sqlx::query_as::<_, RawWorker>(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE tenant = $1 AND pool = $2 \
             ORDER BY worker_id"
        ))
        .bind(tenant)
        .bind(pool)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(RawWorker::decode)
        .collect()
    }

    async fn remove_workers(&self, worker_ids: &[String]) -> Result<(), StoreError> {
        if worker_ids.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM workers WHERE worker_id = ANY($1)")
            .bind(worker_ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn insert_task(
        &self,
        task: &TaskRow,
        dedup_since_ms: i64,
    ) -> Result<Inserted, StoreError> {
        let e = EncodedTask::of(task)?;
        if task.idempotency_key.is_empty() {
            // Without a key there is nothing to conflict with.
            return self
                .batched(|reply| {
                    Batched::Insert(Box::new(PendingInsert {
                        task: task.clone(),
                        encoded: e,
                        reply,
                    }))
                })
                .await;
        }
        let (tenant, pool) = task.scope.columns();
        let holder_query = concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks AS t WHERE t.tenant = $1 AND t.pool = $2 AND t.idempotency_key = $3"
        );
        let mut tx = self.pool.begin().await?;
        let holder = sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks AS t WHERE t.tenant = $1 AND t.pool = $2 AND t.idempotency_key = $3 \
              FOR UPDATE"
        ))
        .bind(tenant)
        .bind(pool)
        .bind(&task.idempotency_key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(holder) = holder.map(RawTask::decode).transpose()? {
            if holder.created_at_ms >= dedup_since_ms {
                tx.commit().await?;
                return Ok(Inserted::Existing(holder));
            }
            // Older than the window: the key is free again.
            sqlx::query("UPDATE tasks SET idempotency_key = '' WHERE seq = $1")
                .bind(holder.seq)
                .execute(&mut *tx)
                .await?;
        }
        let inserted = insert(&mut tx, task, &e).await?;
        let result = match inserted {
            Some(seq) => Inserted::New(TaskRow {
                seq,
                ..task.clone()
            }),
            // Another replica inserted the key meanwhile (its row is committed
            // now, so this statement sees it).
            None => {
                let winner = sqlx::query_as::<_, RawTask>(holder_query)
                    .bind(tenant)
                    .bind(pool)
                    .bind(&task.idempotency_key)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(RawTask::decode)
                    .transpose()?
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "task {}: its idempotency key is taken by a task not found",
                            task.task_id
                        ))
                    })?;
                Inserted::Existing(winner)
            }
        };
        tx.commit().await?;
        Ok(result)
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
            " FROM tasks AS t WHERE t.tenant = $1 AND t.pool = $2 AND t.idempotency_key = $3 \
              AND t.created_at_ms >= $4"
        ))
        .bind(tenant)
        .bind(pool)
        .bind(idempotency_key)
        .bind(since_ms)
        .fetch_optional(&self.pool)
        .await?
        .map(RawTask::decode)
        .transpose()
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
            " FROM tasks AS t WHERE t.run_id = $1 AND t.run_id <> '' AND t.tenant = $2 \
              AND t.pool = $3 AND t.status = 'running'"
        ))
        .bind(run_id)
        .bind(tenant)
        .bind(pool)
        .fetch_optional(&self.pool)
        .await?
        .map(RawTask::decode)
        .transpose()
    }

    async fn get_task(&self, task_id: &str) -> Result<Option<TaskRow>, StoreError> {
        self.batched(|reply| {
            Batched::Read(PendingRead {
                task_id: task_id.to_owned(),
                reply,
            })
        })
        .await
    }

    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new(concat!(
            "SELECT ",
            task_list_columns!(),
            // Held rows are not tasks yet.
            " FROM tasks AS t WHERE t.status <> 'held'"
        ));
        // A row has exactly one of tenant and pool: naming the other as empty
        // lets the (tenant, pool, seq) index serve the order.
        if !filter.tenant.is_empty() || !filter.pool.is_empty() {
            qb.push(" AND t.tenant = ")
                .push_bind(&filter.tenant)
                .push(" AND t.pool = ")
                .push_bind(&filter.pool);
        }
        if let Some(status) = filter.status {
            qb.push(" AND t.status = ").push_bind(status.as_str());
        }
        if !filter.agent.is_empty() {
            qb.push(" AND t.agent = ").push_bind(&filter.agent);
        }
        if let Some(before) = before_seq {
            qb.push(" AND t.seq < ").push_bind(before);
        }
        qb.push(" ORDER BY t.seq DESC LIMIT ")
            .push_bind(i64::from(limit));
        qb.build_query_as::<RawTask>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(RawTask::decode)
            .collect()
    }

    async fn claim(&self, batch: &ClaimBatch<'_>) -> Result<Vec<TaskRow>, StoreError> {
        if batch.max == 0 {
            return Ok(Vec::new());
        }
        let a = ClaimArgs::of(batch)?;
        // The candidates another replica is assigning right now are skipped,
        // not waited for; a locked row re-checked after its locker committed
        // is no longer queued, and the UPDATE says so again. (One statement,
        // committed before its rows are decoded: a corrupt row is reported
        // but stays assigned, and lapses like any claim never delivered.)
        let rows = sqlx::query_as::<_, RawTask>(concat!(
            "WITH picked AS (SELECT q.seq FROM tasks AS q \
              WHERE q.status = 'queued' AND q.tenant = $4 AND q.pool = $5 \
               AND q.labels <@ $6::jsonb \
              ORDER BY q.priority DESC, q.seq LIMIT $7 FOR UPDATE SKIP LOCKED) ",
            assign!(),
            "FROM picked WHERE t.seq = picked.seq AND t.status = 'queued' RETURNING ",
            task_columns!()
        ))
        .bind(&a.worker_id)
        .bind(a.lease_expires_at_ms)
        .bind(a.now_ms)
        .bind(&a.tenant)
        .bind(&a.pool)
        .bind(&a.worker_labels)
        .bind(a.max)
        .fetch_all(&self.claims)
        .await?;
        in_claim_order(rows)
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
        let a = ClaimArgs::of(batch)?;
        let claimed = sqlx::query_as::<_, RawTask>(concat!(
            assign!(),
            "WHERE t.task_id = $4 AND t.tenant = $5 AND t.pool = $6 AND t.status = 'queued' \
              AND t.labels <@ $7::jsonb RETURNING ",
            task_columns!()
        ))
        .bind(&a.worker_id)
        .bind(a.lease_expires_at_ms)
        .bind(a.now_ms)
        .bind(task_id)
        .bind(&a.tenant)
        .bind(&a.pool)
        .bind(&a.worker_labels)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = claimed {
            return Ok(ClaimOne::Claimed(row.decode()?));
        }
        let current = sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks AS t WHERE t.task_id = $1 AND t.tenant = $2 AND t.pool = $3"
        ))
        .bind(task_id)
        .bind(&a.tenant)
        .bind(&a.pool)
        .fetch_optional(&self.pool)
        .await?;
        not_claimed(current)
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
        sqlx::query_as::<_, RawTask>(concat!(
            "UPDATE tasks AS t SET status = 'running', run_id = $1, \
              lease_expires_at_ms = $2, updated_at_ms = $3 \
             WHERE t.task_id = $4 AND t.worker_id = $5 AND t.lease_epoch = $6 \
              AND t.status = 'assigned' RETURNING ",
            task_columns!()
        ))
        .bind(run_id)
        .bind(now_ms.saturating_add(lease_ms))
        .bind(now_ms)
        .bind(task_id)
        .bind(worker_id)
        .bind(epoch_param(lease_epoch))
        .fetch_optional(&self.pool)
        .await?
        .map(RawTask::decode)
        .transpose()
    }

    async fn release_attempt(
        &self,
        task_id: &str,
        lease_epoch: u64,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<Released>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let before = sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks AS t WHERE t.task_id = $1 AND t.lease_epoch = $2 \
              AND t.status IN ('assigned', 'running') FOR UPDATE"
        ))
        .bind(task_id)
        .bind(epoch_param(lease_epoch))
        .fetch_all(&mut *tx)
        .await?;
        let released = release(&mut tx, before, reason, now_ms).await?;
        tx.commit().await?;
        Ok(released.into_iter().next())
    }

    async fn renew_leases(
        &self,
        worker_id: &str,
        leases: &[(String, u64)],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let ids: Vec<&str> = leases.iter().map(|(id, _)| id.as_str()).collect();
        let epochs: Vec<i64> = leases.iter().map(|(_, e)| epoch_param(*e)).collect();
        // One statement: the heartbeat and the renewals. The rows are locked
        // in seq order, as `release_workers_tasks` locks them, so the two
        // never wait on each other in a cycle.
        let renewed: Vec<(String, i64)> = sqlx::query_as(
            "WITH heartbeat AS (UPDATE workers SET last_heartbeat_at_ms = $2 \
               WHERE worker_id = $3), \
             current AS (SELECT t.seq FROM tasks AS t \
               JOIN unnest($4::text[], $5::bigint[]) AS l(task_id, lease_epoch) \
                ON t.task_id = l.task_id AND t.lease_epoch = l.lease_epoch \
               WHERE t.worker_id = $3 AND t.status IN ('assigned', 'running') \
               ORDER BY t.seq FOR UPDATE OF t) \
             UPDATE tasks AS t SET lease_expires_at_ms = $1, updated_at_ms = $2 \
             FROM current WHERE t.seq = current.seq \
             RETURNING t.task_id, t.lease_epoch",
        )
        .bind(now_ms.saturating_add(lease_ms))
        .bind(now_ms)
        .bind(worker_id)
        .bind(&ids)
        .bind(&epochs)
        .fetch_all(&self.pool)
        .await?;
        Ok(not_renewed(leases.to_vec(), &renewed))
    }

    async fn finish(&self, report: &Finish<'_>) -> Result<Finished, StoreError> {
        self.batched(|reply| {
            Batched::Finish(PendingFinish {
                args: FinishArgs::of(report),
                reply,
            })
        })
        .await
    }

    async fn expire(&self, now_ms: i64, limit: u32) -> Result<Vec<Released>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        // Rows another replica is expiring (or a worker is reporting on) are
        // skipped; they are dealt with there.
        let before = sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks AS t WHERE t.status IN ('assigned', 'running') \
              AND LEAST(t.lease_expires_at_ms, t.deadline_at_ms) < $1 \
             ORDER BY LEAST(t.lease_expires_at_ms, t.deadline_at_ms), t.seq LIMIT $2 \
             FOR UPDATE SKIP LOCKED"
        ))
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let before = decode_all(before)?;
        if before.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let after = sqlx::query_as::<_, RawTask>(concat!(
            "UPDATE tasks AS t SET \
              status = CASE WHEN t.deadline_at_ms < $1 THEN 'failed' \
               WHEN t.attempt < t.max_attempts THEN 'queued' ELSE 'failed' END, \
              status_reason = CASE WHEN t.deadline_at_ms < $1 THEN 'deadline exceeded' \
               WHEN t.attempt < t.max_attempts THEN 'lease expired' \
               ELSE 'attempts exhausted' END, \
              outcome = CASE WHEN t.deadline_at_ms < $1 THEN $2 ELSE t.outcome END, \
              finished_at_ms = CASE WHEN t.deadline_at_ms < $1 THEN $1 \
               WHEN t.attempt < t.max_attempts THEN NULL ELSE $1 END, \
              lease_expires_at_ms = NULL, deadline_at_ms = NULL, updated_at_ms = $1 \
             WHERE t.seq = ANY($3) AND t.status IN ('assigned', 'running') RETURNING ",
            task_columns!()
        ))
        .bind(now_ms)
        .bind(Outcome::TimedOut as i64)
        .bind(seqs(&before))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        pair_released(before, after)
    }

    async fn cancel_task(
        &self,
        task_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Cancelled, StoreError> {
        let mut tx = self.pool.begin().await?;
        let before = sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks AS t WHERE t.task_id = $1 FOR UPDATE"
        ))
        .bind(task_id)
        .fetch_optional(&mut *tx)
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
            "UPDATE tasks AS t SET status = 'cancelled', status_reason = $1, \
              finished_at_ms = $2, lease_expires_at_ms = NULL, deadline_at_ms = NULL, \
              updated_at_ms = $2 \
             WHERE t.seq = $3 RETURNING ",
            task_columns!()
        ))
        .bind(reason)
        .bind(now_ms)
        .bind(before.seq)
        .fetch_one(&mut *tx)
        .await?
        .decode()?;
        tx.commit().await?;
        Ok(Cancelled::Cancelled { before, after })
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
        let mut tx = self.pool.begin().await?;
        let before = sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks AS t WHERE t.status IN ('assigned', 'running') \
              AND t.worker_id = ANY($1) ORDER BY t.seq FOR UPDATE"
        ))
        .bind(worker_ids)
        .fetch_all(&mut *tx)
        .await?;
        let released = release(&mut tx, before, reason, now_ms).await?;
        tx.commit().await?;
        Ok(released)
    }

    async fn queued_scopes(&self) -> Result<Vec<(Scope, u64)>, StoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT tenant, pool, COUNT(*) FROM tasks WHERE status = 'queued' \
             GROUP BY tenant, pool ORDER BY tenant, pool",
        )
        .fetch_all(&self.pool)
        .await?;
        queued_scopes(rows)
    }

    async fn release_held(&self, after: &TaskRow) -> Result<Committed, StoreError> {
        let released = self
            .batched(|reply| {
                Batched::Release(Box::new(PendingRelease {
                    after: after.clone(),
                    reply,
                }))
            })
            .await?;
        Ok(Committed::done(released))
    }

    async fn held_before(&self, before_ms: i64, limit: u32) -> Result<Vec<TaskRow>, StoreError> {
        let rows = sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks AS t WHERE t.status = 'held' AND t.created_at_ms < $1 \
              ORDER BY t.created_at_ms, t.seq LIMIT $2"
        ))
        .bind(before_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        decode_all(rows)
    }

    async fn delete_held(&self, task_id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM tasks WHERE task_id = $1 AND status = 'held'")
            .bind(task_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// Inserts a task; `None` when its idempotency key is taken.
async fn insert(
    c: &mut sqlx::PgConnection,
    t: &TaskRow,
    e: &EncodedTask,
) -> Result<Option<i64>, StoreError> {
    let (tenant, pool) = t.scope.columns();
    let seq = sqlx::query_scalar(concat!(
        "INSERT INTO tasks (",
        task_insert_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
          $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28) \
         ON CONFLICT (tenant, pool, idempotency_key) WHERE idempotency_key <> '' DO NOTHING \
         RETURNING seq"
    ))
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
    .fetch_optional(&mut *c)
    .await?;
    Ok(seq)
}

/// Gives locked leased tasks up: queued again when attempts remain, else
/// failed; `reason` becomes the status_reason.
async fn release(
    c: &mut sqlx::PgConnection,
    before: Vec<RawTask>,
    reason: &str,
    now_ms: i64,
) -> Result<Vec<Released>, StoreError> {
    let before = decode_all(before)?;
    if before.is_empty() {
        return Ok(Vec::new());
    }
    let after = sqlx::query_as::<_, RawTask>(RELEASE)
        .bind(reason)
        .bind(now_ms)
        .bind(seqs(&before))
        .fetch_all(&mut *c)
        .await?;
    pair_released(before, after)
}

// ---- batching -----------------------------------------------------------------

/// Where a batched call's answer goes.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A call the batchers serve.
enum Batched {
    /// Boxed: a task row is several times the size of the other calls.
    Insert(Box<PendingInsert>),
    Finish(PendingFinish),
    Read(PendingRead),
    /// Boxed, as an insert.
    Release(Box<PendingRelease>),
}

/// A release of a held task (`release_held`).
struct PendingRelease {
    after: TaskRow,
    reply: Reply<bool>,
}

/// An insert of a task without an idempotency key.
struct PendingInsert {
    task: TaskRow,
    encoded: EncodedTask,
    reply: Reply<Inserted>,
}

/// A worker's report.
struct PendingFinish {
    args: FinishArgs,
    reply: Reply<Finished>,
}

/// A read of one task by id.
struct PendingRead {
    task_id: String,
    reply: Reply<Option<TaskRow>>,
}

/// A task row with the key its batch matches it by.
#[derive(sqlx::FromRow)]
struct Keyed {
    key: String,
    #[sqlx(flatten)]
    task: RawTask,
}

/// One of the batchers: takes the calls waiting (all of them, up to
/// `MAX_BATCH`), runs one statement per kind of call, answers, and takes the
/// calls that queued up meanwhile. Nothing waits for a timer: a lone call is
/// run at once, and batches grow only as the database slows. Ends when the
/// channel closes (every store clone dropped) or the pool is closed; calls
/// still queued then are dropped, and their callers get an error.
async fn run_batcher(
    pool: PgPool,
    releases_pool: PgPool,
    waiting: Arc<Mutex<mpsc::Receiver<Batched>>>,
) {
    let mut closed = pool.close_event();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let received = tokio::select! {
            n = async { waiting.lock().await.recv_many(&mut batch, MAX_BATCH).await } => n,
            () = &mut closed => 0,
        };
        if received == 0 {
            break;
        }
        let (mut inserts, mut finishes, mut reads, mut releases) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for call in batch.drain(..) {
            match call {
                Batched::Insert(p) => inserts.push(*p),
                Batched::Finish(p) => finishes.push(p),
                Batched::Read(p) => reads.push(p),
                Batched::Release(p) => releases.push(*p),
            }
        }
        // The calls of a batch are concurrent: no order among them to keep.
        tokio::join!(
            insert_batch(&pool, inserts),
            finish_batch(&pool, finishes),
            read_batch(&pool, reads),
            release_batch(&releases_pool, releases),
        );
    }
}

/// Whether a batched statement's failure may be one row's fault (a duplicate
/// id, a value the server refuses: SQLSTATE classes 22 and 23), so that its
/// calls are worth running alone; otherwise (the pool, the connection, a
/// timeout, a read-only failover) each call gets the failure rather than up
/// to a batch's worth of statements failing the same way one by one.
fn row_may_be_at_fault(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Encode(_) => true,
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
        _ => false,
    }
}

/// The error each call of a failed batched statement gets.
fn batch_failed(e: &sqlx::Error) -> StoreError {
    StoreError::Db(match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        e => sqlx::Error::Io(std::io::Error::other(format!(
            "the batched statement failed: {e}"
        ))),
    })
}

impl PendingInsert {
    /// Runs the insert alone and answers.
    async fn run_alone(self, pool: &PgPool) {
        let seq = async {
            insert(&mut *pool.acquire().await?, &self.task, &self.encoded)
                .await?
                .ok_or_else(|| self.without_seq())
        }
        .await;
        self.answer(seq);
    }

    /// The insert's row did not come back.
    fn without_seq(&self) -> StoreError {
        StoreError::Corrupt(format!(
            "task {}: inserted without a seq",
            self.task.task_id
        ))
    }

    /// Answers with the `seq` the task was given, or why it was not inserted.
    fn answer(self, seq: Result<i64, StoreError>) {
        let Self { task, reply, .. } = self;
        let _ = reply.send(seq.map(|seq| Inserted::New(TaskRow { seq, ..task })));
    }
}

/// Inserts a batch's tasks in one statement; if it fails, each alone, so
/// that a duplicate id fails its own call only.
async fn insert_batch(pool: &PgPool, mut inserts: Vec<PendingInsert>) {
    if inserts.len() <= 1 {
        for p in inserts {
            p.run_alone(pool).await;
        }
        return;
    }
    // Two batches inserting the same id (a duplicate) each wait for the
    // other's uniqueness check; in one order they cannot deadlock.
    inserts.sort_unstable_by(|a, b| a.task.task_id.cmp(&b.task.task_id));
    let seqs = match insert_many(pool, &inserts).await {
        Ok(seqs) => seqs,
        Err(e) if row_may_be_at_fault(&e) => {
            tracing::debug!(error = %e, inserts = inserts.len(), "a batched insert failed; its inserts run alone");
            for p in inserts {
                p.run_alone(pool).await;
            }
            return;
        }
        Err(e) => {
            for p in inserts {
                p.answer(Err(batch_failed(&e)));
            }
            return;
        }
    };
    for p in inserts {
        let seq = seqs
            .get(&p.task.task_id)
            .copied()
            .ok_or_else(|| p.without_seq());
        p.answer(seq);
    }
}

/// One multi-row insert (no ON CONFLICT: without a key there is nothing to
/// conflict with but a duplicate id, which fails the statement). The seqs by
/// task id.
async fn insert_many(
    pool: &PgPool,
    inserts: &[PendingInsert],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let n = inserts.len();
    let (mut task_id, mut tenant, mut pool_, mut agent, mut agent_version) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut labels, mut cascade, mut secret_keys, mut payload, mut priority) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut idempotency_key, mut request_hash, mut status, mut status_reason, mut attempt) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut max_attempts, mut lease_epoch, mut worker_id, mut run_id, mut lease_expires_at_ms) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut deadline_at_ms, mut timeout_ms, mut outcome, mut exit_code, mut output_summary) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut created_at_ms, mut updated_at_ms, mut finished_at_ms) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for p in inserts {
        let (t, e) = (&p.task, &p.encoded);
        let (tenant_column, pool_column) = t.scope.columns();
        task_id.push(t.task_id.as_str());
        tenant.push(tenant_column);
        pool_.push(pool_column);
        agent.push(t.agent.as_str());
        agent_version.push(t.agent_version.as_str());
        labels.push(e.labels.as_str());
        cascade.push(t.cascade.as_slice());
        secret_keys.push(e.secret_keys.as_str());
        payload.push(t.payload.as_slice());
        priority.push(i64::from(t.priority));
        idempotency_key.push(t.idempotency_key.as_str());
        request_hash.push(t.request_hash.as_slice());
        status.push(t.status.as_str());
        status_reason.push(t.status_reason.as_str());
        attempt.push(i64::from(t.attempt));
        max_attempts.push(i64::from(t.max_attempts));
        lease_epoch.push(e.lease_epoch);
        worker_id.push(t.worker_id.as_str());
        run_id.push(t.run_id.as_str());
        lease_expires_at_ms.push(t.lease_expires_at_ms);
        deadline_at_ms.push(t.deadline_at_ms);
        timeout_ms.push(t.timeout_ms);
        outcome.push(t.outcome as i64);
        exit_code.push(i64::from(t.exit_code));
        output_summary.push(t.output_summary.as_str());
        created_at_ms.push(t.created_at_ms);
        updated_at_ms.push(t.updated_at_ms);
        finished_at_ms.push(t.finished_at_ms);
    }
    let rows: Vec<(String, i64)> = sqlx::query_as(concat!(
        "INSERT INTO tasks (",
        task_insert_columns!(),
        ") SELECT n.task_id, n.tenant, n.pool, n.agent, n.agent_version, n.labels::jsonb, \
          n.cascade, n.secret_keys, n.payload, n.priority, n.idempotency_key, n.request_hash, \
          n.status, n.status_reason, n.attempt, n.max_attempts, n.lease_epoch, n.worker_id, \
          n.run_id, n.lease_expires_at_ms, n.deadline_at_ms, n.timeout_ms, n.outcome, \
          n.exit_code, n.output_summary, n.created_at_ms, n.updated_at_ms, n.finished_at_ms \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
          $7::bytea[], $8::text[], $9::bytea[], $10::bigint[], $11::text[], $12::bytea[], \
          $13::text[], $14::text[], $15::bigint[], $16::bigint[], $17::bigint[], $18::text[], \
          $19::text[], $20::bigint[], $21::bigint[], $22::bigint[], $23::bigint[], \
          $24::bigint[], $25::text[], $26::bigint[], $27::bigint[], $28::bigint[]) \
          AS n(",
        task_insert_columns!(),
        ") RETURNING task_id, seq"
    ))
    .bind(task_id)
    .bind(tenant)
    .bind(pool_)
    .bind(agent)
    .bind(agent_version)
    .bind(labels)
    .bind(cascade)
    .bind(secret_keys)
    .bind(payload)
    .bind(priority)
    .bind(idempotency_key)
    .bind(request_hash)
    .bind(status)
    .bind(status_reason)
    .bind(attempt)
    .bind(max_attempts)
    .bind(lease_epoch)
    .bind(worker_id)
    .bind(run_id)
    .bind(lease_expires_at_ms)
    .bind(deadline_at_ms)
    .bind(timeout_ms)
    .bind(outcome)
    .bind(exit_code)
    .bind(output_summary)
    .bind(created_at_ms)
    .bind(updated_at_ms)
    .bind(finished_at_ms)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Applies a report alone: the conditional update, else why it did nothing.
async fn finish_alone(pool: &PgPool, r: &FinishArgs) -> Result<Finished, StoreError> {
    let plan = FinishPlan::of(r.outcome);
    let applied = sqlx::query_as::<_, RawTask>(concat!(
        "UPDATE tasks AS t SET \
          status = CASE WHEN $1 AND t.attempt < t.max_attempts THEN 'queued' ELSE $2 END, \
          status_reason = CASE WHEN $1 AND t.attempt >= t.max_attempts \
           THEN 'attempts exhausted' ELSE '' END, \
          finished_at_ms = CASE WHEN $1 AND t.attempt < t.max_attempts \
           THEN NULL ELSE $3 END, \
          outcome = $4, exit_code = $5, output_summary = $6, \
          lease_expires_at_ms = NULL, deadline_at_ms = NULL, updated_at_ms = $3 \
         WHERE t.task_id = $7 AND t.lease_epoch = $8 AND t.worker_id = $9 \
          AND t.status IN ('assigned', 'running') RETURNING ",
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
    .fetch_optional(pool)
    .await?;
    if let Some(row) = applied {
        return Ok(Finished::Applied(row.decode()?));
    }
    // Nothing changed; a leased task at this epoch and worker cannot come
    // back (the epoch grows at each assignment), so what we read now tells a
    // repeat from a stale report.
    let current = sqlx::query_as::<_, RawTask>(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks AS t WHERE t.task_id = $1"
    ))
    .bind(&r.task_id)
    .fetch_optional(pool)
    .await?;
    not_finished(current, r)
}

/// Applies a batch's reports. A task reported twice is not in one statement
/// twice: its reports go in rounds, one per round, as if one after the other.
async fn finish_batch(pool: &PgPool, mut finishes: Vec<PendingFinish>) {
    // Stable: a task's reports keep their order.
    finishes.sort_by(|a, b| a.args.task_id.cmp(&b.args.task_id));
    while !finishes.is_empty() {
        let mut round: Vec<PendingFinish> = Vec::with_capacity(finishes.len());
        let mut later = Vec::new();
        for p in finishes {
            if round
                .last()
                .is_some_and(|l| l.args.task_id == p.args.task_id)
            {
                later.push(p);
            } else {
                round.push(p);
            }
        }
        finish_round(pool, round).await;
        finishes = later;
    }
}

/// Applies reports of distinct tasks in one statement; those it did not
/// apply (repeated, stale, unknown) are then told why, from one read.
async fn finish_round(pool: &PgPool, round: Vec<PendingFinish>) {
    if round.len() <= 1 {
        for p in round {
            let _ = p.reply.send(finish_alone(pool, &p.args).await);
        }
        return;
    }
    let mut applied = match finish_many(pool, &round).await {
        Ok(applied) => applied,
        Err(e) if row_may_be_at_fault(&e) => {
            tracing::debug!(error = %e, reports = round.len(), "a batched report update failed; its reports run alone");
            for p in round {
                let _ = p.reply.send(finish_alone(pool, &p.args).await);
            }
            return;
        }
        Err(e) => {
            for p in round {
                let _ = p.reply.send(Err(batch_failed(&e)));
            }
            return;
        }
    };
    let mut not_applied = Vec::new();
    for p in round {
        match applied.remove(&p.args.task_id) {
            Some(row) => {
                let _ = p.reply.send(row.decode().map(Finished::Applied));
            }
            None => not_applied.push(p),
        }
    }
    if not_applied.is_empty() {
        return;
    }
    // A leased task at a report's epoch and worker cannot come back (the
    // epoch grows at each assignment), so what we read now tells a repeat
    // from a stale report.
    let ids: Vec<&str> = not_applied
        .iter()
        .map(|p| p.args.task_id.as_str())
        .collect();
    match read_many(pool, &ids).await {
        Ok(mut current) => {
            for p in not_applied {
                let result = not_finished(current.remove(&p.args.task_id), &p.args);
                let _ = p.reply.send(result);
            }
        }
        Err(e) => {
            for p in not_applied {
                let _ = p.reply.send(Err(batch_failed(&e)));
            }
        }
    }
}

/// One conditional update of reports of distinct tasks, with the scope of
/// each report as strict as `finish_alone`'s. The rows are locked in seq
/// order first, as `renew_leases` and `release_workers_tasks` lock them, so
/// that statements holding several of them never wait on each other in a
/// cycle. The applied rows by task id.
async fn finish_many(
    pool: &PgPool,
    round: &[PendingFinish],
) -> Result<HashMap<String, RawTask>, sqlx::Error> {
    let n = round.len();
    let (mut task_id, mut lease_epoch, mut worker_id, mut retry, mut status) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut now_ms, mut outcome, mut exit_code, mut output_summary) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for PendingFinish { args: r, .. } in round {
        let plan = FinishPlan::of(r.outcome);
        task_id.push(r.task_id.as_str());
        lease_epoch.push(epoch_param(r.lease_epoch));
        worker_id.push(r.worker_id.as_str());
        retry.push(plan.retry);
        status.push(plan.status);
        now_ms.push(r.now_ms);
        outcome.push(r.outcome as i64);
        exit_code.push(i64::from(r.exit_code));
        output_summary.push(r.output_summary.as_str());
    }
    let rows = sqlx::query_as::<_, Keyed>(concat!(
        "WITH f AS (SELECT t.seq, r.task_id, r.lease_epoch, r.worker_id, r.retry, r.status, \
           r.now_ms, r.outcome, r.exit_code, r.output_summary \
          FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bool[], $5::text[], \
           $6::bigint[], $7::bigint[], $8::bigint[], $9::text[]) \
           AS r(task_id, lease_epoch, worker_id, retry, status, now_ms, outcome, exit_code, \
           output_summary) \
          JOIN tasks AS t ON t.task_id = r.task_id AND t.lease_epoch = r.lease_epoch \
           AND t.worker_id = r.worker_id \
          WHERE t.status IN ('assigned', 'running') \
          ORDER BY t.seq FOR UPDATE OF t) \
         UPDATE tasks AS t SET \
          status = CASE WHEN f.retry AND t.attempt < t.max_attempts THEN 'queued' \
           ELSE f.status END, \
          status_reason = CASE WHEN f.retry AND t.attempt >= t.max_attempts \
           THEN 'attempts exhausted' ELSE '' END, \
          finished_at_ms = CASE WHEN f.retry AND t.attempt < t.max_attempts \
           THEN NULL ELSE f.now_ms END, \
          outcome = f.outcome, exit_code = f.exit_code, output_summary = f.output_summary, \
          lease_expires_at_ms = NULL, deadline_at_ms = NULL, updated_at_ms = f.now_ms \
         FROM f WHERE t.seq = f.seq AND t.task_id = f.task_id \
          AND t.lease_epoch = f.lease_epoch AND t.worker_id = f.worker_id \
          AND t.status IN ('assigned', 'running') \
         RETURNING f.task_id AS key, ",
        task_columns!()
    ))
    .bind(task_id)
    .bind(lease_epoch)
    .bind(worker_id)
    .bind(retry)
    .bind(status)
    .bind(now_ms)
    .bind(outcome)
    .bind(exit_code)
    .bind(output_summary)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|k| (k.key, k.task)).collect())
}

/// Reads tasks by id (with their payloads), by task id.
async fn read_many(pool: &PgPool, ids: &[&str]) -> Result<HashMap<String, RawTask>, sqlx::Error> {
    let rows = sqlx::query_as::<_, Keyed>(concat!(
        "SELECT t.task_id AS key, ",
        task_columns!(),
        " FROM tasks AS t WHERE t.task_id = ANY($1::text[])"
    ))
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|k| (k.key, k.task)).collect())
}

/// Reads a batch's tasks in one statement.
async fn read_batch(pool: &PgPool, mut reads: Vec<PendingRead>) {
    if reads.is_empty() {
        return;
    }
    // Sorted, a task read twice is read by neighbours (see below).
    reads.sort_unstable_by(|a, b| a.task_id.cmp(&b.task_id));
    let mut ids: Vec<&str> = reads.iter().map(|p| p.task_id.as_str()).collect();
    ids.dedup();
    let rows = match read_many(pool, &ids).await {
        Ok(rows) => rows,
        Err(e) => {
            for p in reads {
                let _ = p.reply.send(Err(batch_failed(&e)));
            }
            return;
        }
    };
    let mut rows: HashMap<String, Result<TaskRow, StoreError>> = rows
        .into_iter()
        .map(|(id, raw)| (id, raw.decode()))
        .collect();
    let mut reads = reads.into_iter().peekable();
    while let Some(p) = reads.next() {
        // The next call reads the same task: this one gets a copy.
        let again = reads.peek().is_some_and(|next| next.task_id == p.task_id);
        let result = if again {
            match rows.get(&p.task_id) {
                None => Ok(None),
                Some(Ok(task)) => Ok(Some(task.clone())),
                Some(Err(StoreError::Corrupt(why))) => Err(StoreError::Corrupt(why.clone())),
                Some(Err(e)) => Err(StoreError::Corrupt(e.to_string())),
            }
        } else {
            rows.remove(&p.task_id).transpose()
        };
        let _ = p.reply.send(result);
    }
}

/// Releases a batch's held tasks in one statement, on a session of `pool`
/// that commits without waiting for its WAL flush (see
/// `DispatchStore::release_held`): the release is on the enqueue's path,
/// and the claim or report that follows it flushes it anyway. One round
/// trip.
async fn release_batch(pool: &PgPool, releases: Vec<PendingRelease>) {
    if releases.is_empty() {
        return;
    }
    // A task released twice in one batch (its enqueue and a settling pass):
    // the first goes in the statement; the later one finds it released, as
    // it would have one after the other.
    let mut seen = std::collections::HashSet::new();
    let (firsts, again): (Vec<_>, Vec<_>) = releases
        .into_iter()
        .partition(|p| seen.insert(p.after.task_id.clone()));
    match release_many(pool, &firsts).await {
        Ok(released) => {
            for p in firsts {
                let _ = p.reply.send(Ok(released.contains(&p.after.task_id)));
            }
            for p in again {
                let _ = p.reply.send(Ok(false));
            }
        }
        Err(e) => {
            for p in firsts.into_iter().chain(again) {
                let _ = p.reply.send(Err(batch_failed(&e)));
            }
        }
    }
}

async fn release_many(
    pool: &PgPool,
    releases: &[PendingRelease],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let rows = || releases.iter().map(|p| &p.after);
    let ids: Vec<&str> = rows().map(|t| t.task_id.as_str()).collect();
    let statuses: Vec<&str> = rows().map(|t| t.status.as_str()).collect();
    let workers: Vec<&str> = rows().map(|t| t.worker_id.as_str()).collect();
    let attempts: Vec<i64> = rows().map(|t| i64::from(t.attempt)).collect();
    let leases: Vec<Option<i64>> = rows().map(|t| t.lease_expires_at_ms).collect();
    let deadlines: Vec<Option<i64>> = rows().map(|t| t.deadline_at_ms).collect();
    let updated: Vec<i64> = rows().map(|t| t.updated_at_ms).collect();
    let released: Vec<String> = sqlx::query_scalar(
        "UPDATE tasks AS t SET status = u.status, worker_id = u.worker_id, \
          attempt = u.attempt, lease_expires_at_ms = u.lease, deadline_at_ms = u.deadline, \
          updated_at_ms = u.updated \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], \
                     $6::bigint[], $7::bigint[]) \
              AS u(task_id, status, worker_id, attempt, lease, deadline, updated) \
         WHERE t.task_id = u.task_id AND t.status = 'held' \
         RETURNING t.task_id",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&workers)
    .bind(&attempts)
    .bind(&leases)
    .bind(&deadlines)
    .bind(&updated)
    .fetch_all(pool)
    .await?;
    Ok(released.into_iter().collect())
}
