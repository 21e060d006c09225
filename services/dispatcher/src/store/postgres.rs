//! The production store: PostgreSQL, shared by every dispatcher replica
//! (synchronous_commit as the server sets it; on by default, so an
//! acknowledged enqueue is durable).
//!
//! Replicas race for the same rows: a claim locks its candidates `FOR UPDATE
//! SKIP LOCKED` and assigns them in the same statement, and every other change
//! is a conditional UPDATE (or a transaction that locks the rows it read), so
//! no two replicas ever assign one attempt or apply one report twice. The hot
//! paths (enqueue without a key, claim, start, heartbeat, report) are one
//! statement each. Identifiers that are sorted or paged by use the "C"
//! collation: byte order, as in SQLite.

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder};

use super::sqlite::{
    ClaimArgs, EncodedTask, FinishArgs, FinishPlan, RawAgent, RawTask, RawWorker, decode_all,
    epoch_param, in_claim_order, not_claimed, not_finished, not_renewed, pair_released,
    queued_scopes, seqs, to_json,
};
use super::{
    Cancelled, ClaimBatch, ClaimOne, Decision, DispatchStore, Finish, Finished, Inserted, Released,
    StoreError, TaskFilter, WorkerFilter,
};
use crate::model::{AgentRow, AgentStatus, Outcome, Scope, TaskRow, WorkerRow, WorkerState};

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
    "CREATE INDEX IF NOT EXISTS tasks_scope_newest ON tasks (tenant, pool, seq)",
    "CREATE INDEX IF NOT EXISTS tasks_run ON tasks (run_id) WHERE run_id <> ''",
];

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

/// The advisory lock replicas take to create the schema ("dspt").
const SCHEMA_LOCK: i64 = 0x6473_7074;

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The scheduler's claims have connections of their own, so that they
    /// never queue behind the Enqueue and report traffic for one.
    claims: PgPool,
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
        Ok(Self { pool, claims })
    }

    /// Closes the pools' connections.
    pub async fn close(&self) {
        self.claims.close().await;
        self.pool.close().await;
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
            let seq = insert(&mut *self.pool.acquire().await?, task, &e)
                .await?
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("task {}: inserted without a seq", task.task_id))
                })?;
            return Ok(Inserted::New(TaskRow {
                seq,
                ..task.clone()
            }));
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
        sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks AS t WHERE t.task_id = $1"
        ))
        .bind(task_id)
        .fetch_optional(&self.pool)
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
        let mut qb = QueryBuilder::<Postgres>::new(concat!(
            "SELECT ",
            task_list_columns!(),
            " FROM tasks AS t WHERE TRUE"
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
        let plan = FinishPlan::of(report.outcome);
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
        .bind(report.now_ms)
        .bind(report.outcome as i64)
        .bind(i64::from(report.exit_code))
        .bind(report.output_summary)
        .bind(report.task_id)
        .bind(epoch_param(report.lease_epoch))
        .bind(report.worker_id)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = applied {
            return Ok(Finished::Applied(row.decode()?));
        }
        // Nothing changed; a leased task at this epoch and worker cannot come
        // back (the epoch grows at each assignment), so what we read now tells
        // a repeat from a stale report.
        let current = sqlx::query_as::<_, RawTask>(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks AS t WHERE t.task_id = $1"
        ))
        .bind(report.task_id)
        .fetch_optional(&self.pool)
        .await?;
        not_finished(current, &FinishArgs::of(report))
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
}

/// Inserts a task; `None` when its idempotency key is taken.
async fn insert(
    c: &mut sqlx::PgConnection,
    t: &TaskRow,
    e: &EncodedTask,
) -> Result<Option<i64>, StoreError> {
    let (tenant, pool) = t.scope.columns();
    let seq = sqlx::query_scalar(
        "INSERT INTO tasks (task_id, tenant, pool, agent, agent_version, labels, cascade, \
          secret_keys, payload, priority, idempotency_key, request_hash, status, status_reason, \
          attempt, max_attempts, lease_epoch, worker_id, run_id, lease_expires_at_ms, \
          deadline_at_ms, timeout_ms, outcome, exit_code, output_summary, created_at_ms, \
          updated_at_ms, finished_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
          $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28) \
         ON CONFLICT (tenant, pool, idempotency_key) WHERE idempotency_key <> '' DO NOTHING \
         RETURNING seq",
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
