//! The dispatcher's state: agent versions, workers, and the task queue with its
//! leases. One trait; SQLite (the embedded default, one replica) and
//! PostgreSQL (several replicas on one database, claims with
//! `FOR UPDATE SKIP LOCKED`).
//!
//! Every method that hands out or changes a lease names the scope or the
//! worker in its WHERE clause, so that a bug in the matcher above still cannot
//! give one tenant's task to another tenant's worker. Every state change of a
//! task is one conditional UPDATE (or one transaction), so two replicas racing
//! for the same task cannot both win.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::model::{
    AgentRow, AgentStatus, Labels, Outcome, Scope, TaskRow, TaskStatus, WorkerRow, WorkerState,
};

pub mod postgres;
pub mod sqlite;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored row is malformed: {0}")]
    Corrupt(String),
    #[error("unsupported store url (use sqlite://PATH or postgres://...)")]
    Url,
}

/// The outcome of [`DispatchStore::decide_agent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The pending version now has the new status.
    Decided(AgentRow),
    /// The version exists but is not pending (it is returned as it is).
    NotPending(AgentRow),
    NotFound,
}

/// The outcome of [`DispatchStore::insert_task`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// The new task, with its `seq`.
    New(TaskRow),
    /// A task of the same scope with the same idempotency key, created at or
    /// after the dedup window's start, already exists; it is returned and
    /// nothing is inserted. (A matching task older than the window loses its
    /// key and the new task is inserted.)
    Existing(TaskRow),
}

/// A batch claim by one worker: up to `max` queued tasks of exactly `scope`
/// whose labels are a subset of `worker_labels`, highest priority first, then
/// oldest (`seq`) first.
#[derive(Debug, Clone)]
pub struct ClaimBatch<'a> {
    pub scope: &'a Scope,
    pub worker_id: &'a str,
    pub worker_labels: &'a Labels,
    pub max: u32,
    pub now_ms: i64,
    /// The lease: `lease_expires_at_ms = now_ms + lease_ms`.
    pub lease_ms: i64,
}

/// The outcome of [`DispatchStore::claim_task`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOne {
    /// Assigned to the worker (attempt and epoch advanced, as in `claim`).
    Claimed(TaskRow),
    /// The task of that scope exists but is not queued.
    NotQueued(TaskRow),
    /// The task of that scope is queued, but needs labels the worker lacks.
    LabelsMismatch,
    /// No task with that id in that scope.
    NotFound,
}

/// A worker's report of how an attempt ended.
#[derive(Debug, Clone)]
pub struct Finish<'a> {
    pub task_id: &'a str,
    pub worker_id: &'a str,
    pub lease_epoch: u64,
    pub outcome: Outcome,
    pub exit_code: i32,
    pub output_summary: &'a str,
    pub now_ms: i64,
}

/// The outcome of [`DispatchStore::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// The report was applied. `Succeeded` → succeeded; `Failed`, `Revoked`,
    /// `TimedOut`, `Cancelled` → failed; `Error` → queued again when attempts
    /// remain (the epoch stays; the next assignment advances it), else failed
    /// with status_reason "attempts exhausted". Outcome, exit code and summary
    /// are stored in every case.
    Applied(TaskRow),
    /// The task's current epoch and worker match but the task is no longer
    /// leased (a repeated report, or the task was cancelled meanwhile):
    /// acknowledged as accepted, nothing changes.
    Repeat(TaskRow),
    /// The epoch is not the task's current one, or the worker is not the one
    /// holding it: refused, nothing changes.
    Stale(TaskRow),
    /// No such task.
    Unknown,
}

/// A leased task that lost its lease (lapsed, deadline passed, worker reset):
/// the row before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub before: TaskRow,
    /// Queued again (attempts left; status_reason says why), or failed
    /// ("attempts exhausted", or outcome `TimedOut` with "deadline exceeded").
    pub after: TaskRow,
}

/// The outcome of [`DispatchStore::cancel_task`].
// Rare and short-lived: boxing the rows would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// Cancelled now; `before` tells whether a worker held it.
    Cancelled {
        before: TaskRow,
        after: TaskRow,
    },
    /// Already final; returned as it is.
    AlreadyFinal(TaskRow),
    NotFound,
}

/// Filter of [`DispatchStore::list_tasks`]; empty strings and `None` match all.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub tenant: String,
    pub pool: String,
    pub status: Option<TaskStatus>,
    pub agent: String,
}

/// Filter of [`DispatchStore::list_workers`]; empty strings and `None` match all.
#[derive(Debug, Clone, Default)]
pub struct WorkerFilter {
    pub tenant: String,
    pub pool: String,
    pub state: Option<WorkerState>,
}

#[async_trait::async_trait]
pub trait DispatchStore: Send + Sync + std::fmt::Debug {
    // ---- agents -------------------------------------------------------------

    /// Inserts a pending agent version; `false` when name and version exist
    /// (nothing changes).
    async fn submit_agent(&self, agent: &AgentRow) -> Result<bool, StoreError>;
    async fn get_agent(&self, name: &str, version: &str) -> Result<Option<AgentRow>, StoreError>;
    /// The approved version of `name` with the latest `decided_at_ms`.
    async fn latest_approved_agent(&self, name: &str) -> Result<Option<AgentRow>, StoreError>;
    /// Moves a pending version to `status` (approved or rejected), atomically
    /// (only a pending row changes).
    async fn decide_agent(
        &self,
        name: &str,
        version: &str,
        status: AgentStatus,
        decided_by: &str,
        decided_at_ms: i64,
        reason: &str,
    ) -> Result<Decision, StoreError>;
    /// Agent versions by name ascending, then newest submission first;
    /// `name` empty: all names. Paged by offset.
    async fn list_agents(
        &self,
        name: &str,
        status: Option<AgentStatus>,
        offset: u64,
        limit: u32,
    ) -> Result<Vec<AgentRow>, StoreError>;

    // ---- workers ------------------------------------------------------------

    /// Inserts or replaces a worker's registration (every field).
    async fn upsert_worker(&self, worker: &WorkerRow) -> Result<(), StoreError>;
    async fn get_worker(&self, worker_id: &str) -> Result<Option<WorkerRow>, StoreError>;
    /// Sets a worker's state; `false` when it is not registered.
    async fn set_worker_state(
        &self,
        worker_id: &str,
        state: WorkerState,
    ) -> Result<bool, StoreError>;
    /// Workers by id ascending, after `after_worker_id` (empty: from the start).
    async fn list_workers(
        &self,
        filter: &WorkerFilter,
        after_worker_id: &str,
        limit: u32,
    ) -> Result<Vec<WorkerRow>, StoreError>;
    /// Every worker of one scope.
    async fn workers_of_scope(&self, scope: &Scope) -> Result<Vec<WorkerRow>, StoreError>;
    /// Removes registrations (a worker holding leases keeps them until they
    /// are released or lapse).
    async fn remove_workers(&self, worker_ids: &[String]) -> Result<(), StoreError>;

    // ---- tasks --------------------------------------------------------------

    /// Inserts a queued task (`seq` is assigned), honouring its idempotency
    /// key within the window (see [`Inserted`]).
    async fn insert_task(
        &self,
        task: &TaskRow,
        dedup_since_ms: i64,
    ) -> Result<Inserted, StoreError>;
    /// The task of that scope with that idempotency key created at or after
    /// `since_ms`, if any.
    async fn find_idempotent(
        &self,
        scope: &Scope,
        idempotency_key: &str,
        since_ms: i64,
    ) -> Result<Option<TaskRow>, StoreError>;
    /// The task of `scope` whose current attempt is the running run `run_id`,
    /// with its payload; `None` for any other state (not yet accepted,
    /// finished, released, another scope).
    async fn running_task_of_run(
        &self,
        scope: &Scope,
        run_id: &str,
    ) -> Result<Option<TaskRow>, StoreError>;
    /// One task by id, with its payload, whatever its scope (callers check it).
    async fn get_task(&self, task_id: &str) -> Result<Option<TaskRow>, StoreError>;
    /// Tasks newest first (`seq` descending) with `seq < before_seq` (`None`:
    /// from the newest). Payloads may be left empty.
    async fn list_tasks(
        &self,
        filter: &TaskFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TaskRow>, StoreError>;
    /// Assigns up to `max` queued tasks to a worker (see [`ClaimBatch`]): each
    /// gets status assigned, attempt + 1, lease_epoch + 1, the worker id, an
    /// empty run id, `lease_expires_at_ms = now + lease`, `deadline_at_ms = now
    /// + timeout_ms`, status_reason "". Returns them with payloads, in claim
    /// order. On PostgreSQL the candidates are locked `FOR UPDATE SKIP LOCKED`
    /// so that replicas never assign the same attempt twice.
    async fn claim(&self, batch: &ClaimBatch<'_>) -> Result<Vec<TaskRow>, StoreError>;
    /// Assigns one queued task by id, as `claim` would, if it is of `scope`
    /// and its labels are a subset of the worker's.
    async fn claim_task(
        &self,
        scope: &Scope,
        task_id: &str,
        batch: &ClaimBatch<'_>,
    ) -> Result<ClaimOne, StoreError>;
    /// assigned → running with `run_id`, renewing the lease to `now + lease`,
    /// if the task is assigned to `worker_id` at `lease_epoch`; `None`
    /// otherwise (nothing changes).
    async fn start_run(
        &self,
        task_id: &str,
        worker_id: &str,
        lease_epoch: u64,
        run_id: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<TaskRow>, StoreError>;
    /// Gives an assigned or running attempt up (its acceptance was refused):
    /// queued again when attempts remain, else failed; `reason` becomes the
    /// status_reason. `None` if the task is not leased at that epoch.
    async fn release_attempt(
        &self,
        task_id: &str,
        lease_epoch: u64,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<Released>, StoreError>;
    /// A heartbeat: renews each listed lease that is current (task leased to
    /// `worker_id` at that epoch) to `now + lease`, stamps the worker's
    /// `last_heartbeat_at_ms`, and returns the listed leases that are NOT
    /// current (the worker should stop them).
    async fn renew_leases(
        &self,
        worker_id: &str,
        leases: &[(String, u64)],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<(String, u64)>, StoreError>;
    /// Applies a report (see [`Finished`]).
    async fn finish(&self, report: &Finish<'_>) -> Result<Finished, StoreError>;
    /// Releases up to `limit` leased tasks whose lease lapsed
    /// (`lease_expires_at_ms < now`: queued again, or failed when attempts are
    /// exhausted) or whose deadline passed (`deadline_at_ms < now`: failed,
    /// outcome `TimedOut`, "deadline exceeded"). Safe to run on every replica at
    /// once (SKIP LOCKED on PostgreSQL).
    async fn expire(&self, now_ms: i64, limit: u32) -> Result<Vec<Released>, StoreError>;
    /// Cancels a task that is not final (see [`Cancelled`]).
    async fn cancel_task(
        &self,
        task_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Cancelled, StoreError>;
    /// Releases every leased task held by these workers (a pool reset): queued
    /// again when attempts remain, else failed; `reason` is the status_reason.
    async fn release_workers_tasks(
        &self,
        worker_ids: &[String],
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<Released>, StoreError>;
    /// The scopes that have queued tasks, with how many (for the poller).
    async fn queued_scopes(&self) -> Result<Vec<(Scope, u64)>, StoreError>;

    // ---- held tasks (see `TaskStatus::Held`) ----------------------------------

    /// Makes a held task what `after` says: its status (queued, or assigned
    /// for a hand-off), `worker_id`, `attempt`, `lease_expires_at_ms`,
    /// `deadline_at_ms` and `updated_at_ms`; nothing else changes, and
    /// nothing at all unless the task with `after.task_id` is still held.
    ///
    /// Returns once every later write of this store sees the change (SQLite:
    /// once it is queued to the writer, which runs it ahead of every write
    /// queued after it; PostgreSQL: once committed). The [`Committed`] it
    /// returns resolves once readers see it too.
    ///
    /// The change need not be durable when either resolves (PostgreSQL
    /// commits it without waiting for its WAL flush, which the server's next
    /// durable commit makes): the task itself is, and so is audit's record
    /// of it, so a crash that loses the change leaves the task held, and the
    /// settling pass (`held_before`) makes the same change again.
    async fn release_held(&self, after: &TaskRow) -> Result<Committed, StoreError>;
    /// Held tasks created before `before_ms`, oldest first, at most `limit`.
    async fn held_before(&self, before_ms: i64, limit: u32) -> Result<Vec<TaskRow>, StoreError>;
    /// Deletes the task if it is still held; whether it was.
    async fn delete_held(&self, task_id: &str) -> Result<bool, StoreError>;
}

/// Resolves once a [`DispatchStore::release_held`] is committed, so that
/// every reader sees it: `true` if the task was held and now is what the call
/// asked, `false` if it was no longer held (nothing changed).
pub struct Committed {
    known: Option<bool>,
    pending: Option<PendingCommit>,
}

type PendingCommit = Pin<Box<dyn Future<Output = Result<bool, StoreError>> + Send>>;

impl Committed {
    /// Committed already, with this outcome.
    pub fn done(released: bool) -> Self {
        Self {
            known: Some(released),
            pending: None,
        }
    }

    /// Committed once `commit` resolves.
    pub fn pending(
        commit: impl Future<Output = Result<bool, StoreError>> + Send + 'static,
    ) -> Self {
        Self {
            known: None,
            pending: Some(Box::pin(commit)),
        }
    }

    /// The outcome, if the store knew it when `release_held` returned.
    pub fn known(&self) -> Option<bool> {
        self.known
    }
}

impl std::fmt::Debug for Committed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committed")
            .field("known", &self.known)
            .finish_non_exhaustive()
    }
}

impl Future for Committed {
    type Output = Result<bool, StoreError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if let Some(known) = self.known {
            return std::task::Poll::Ready(Ok(known));
        }
        match self.pending.as_mut() {
            Some(commit) => commit.as_mut().poll(cx),
            None => std::task::Poll::Ready(Ok(false)),
        }
    }
}

/// Opens the store a URL names: `sqlite://PATH` or `postgres://...`.
pub async fn open(url: &str) -> Result<Arc<dyn DispatchStore>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Arc::new(
            sqlite::SqliteStore::open(std::path::Path::new(path)).await?,
        ))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PgStore::open(url).await?))
    } else {
        Err(StoreError::Url)
    }
}
