//! The dispatcher's domain types: no tonic types here. Requests are converted
//! into these at the handler (`convert.rs`), and rows of the store are these.

use std::collections::BTreeMap;
use std::fmt;

/// Who a worker or task belongs to: one tenant, or one org-global pool. A task
/// is offered only to workers of the same scope; the store puts the scope in
/// every claim query.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Tenant(String),
    Pool(String),
}

impl Scope {
    /// The (tenant, pool) column pair: exactly one is non-empty.
    pub fn columns(&self) -> (&str, &str) {
        match self {
            Scope::Tenant(t) => (t, ""),
            Scope::Pool(p) => ("", p),
        }
    }

    /// From the (tenant, pool) columns; `None` unless exactly one is set.
    pub fn from_columns(tenant: &str, pool: &str) -> Option<Scope> {
        match (tenant.is_empty(), pool.is_empty()) {
            (false, true) => Some(Scope::Tenant(tenant.to_owned())),
            (true, false) => Some(Scope::Pool(pool.to_owned())),
            _ => None,
        }
    }

    pub fn tenant(&self) -> &str {
        self.columns().0
    }

    pub fn pool(&self) -> &str {
        self.columns().1
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Tenant(t) => write!(f, "tenant/{t}"),
            Scope::Pool(p) => write!(f, "pool/{p}"),
        }
    }
}

/// Labels of a worker or a task (bounded at the edge: 64 entries, keys 1..=128
/// bytes of `[A-Za-z0-9._/-]`, values at most 128 bytes).
pub type Labels = BTreeMap<String, String>;

/// Whether a worker carrying `worker` may be offered a task requiring `task`.
pub fn labels_match(task: &Labels, worker: &Labels) -> bool {
    task.iter().all(|(k, v)| worker.get(k) == Some(v))
}

/// Where a task stands. The numbers are the proto's `TaskStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskStatus {
    Queued = 1,
    Assigned = 2,
    Running = 3,
    Succeeded = 4,
    Failed = 5,
    Cancelled = 6,
    /// Inserted while its enqueue is being recorded in audit: not yet a task.
    /// Not claimable, not reaped, not listed, not cancellable; it becomes
    /// queued (or assigned, when handed off at enqueue) once audit holds the
    /// record, or is deleted if audit never does. Shown to nobody (the proto
    /// has no such status).
    Held = 7,
}

impl TaskStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    /// Held by a worker under a lease.
    pub fn is_leased(self) -> bool {
        matches!(self, TaskStatus::Assigned | TaskStatus::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Assigned => "assigned",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::Held => "held",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => TaskStatus::Queued,
            "assigned" => TaskStatus::Assigned,
            "running" => TaskStatus::Running,
            "succeeded" => TaskStatus::Succeeded,
            "failed" => TaskStatus::Failed,
            "cancelled" => TaskStatus::Cancelled,
            "held" => TaskStatus::Held,
            _ => return None,
        })
    }
}

/// How an attempt ended. The numbers are the proto's `RunOutcome`; 0 is "none yet".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    None = 0,
    Succeeded = 1,
    Failed = 2,
    Error = 3,
    Cancelled = 4,
    Revoked = 5,
    TimedOut = 6,
}

impl Outcome {
    pub fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            0 => Outcome::None,
            1 => Outcome::Succeeded,
            2 => Outcome::Failed,
            3 => Outcome::Error,
            4 => Outcome::Cancelled,
            5 => Outcome::Revoked,
            6 => Outcome::TimedOut,
            _ => return None,
        })
    }
}

/// An agent version's place in the approval flow. The numbers are the proto's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentStatus {
    Pending = 1,
    Approved = 2,
    Rejected = 3,
}

impl AgentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Pending => "pending",
            AgentStatus::Approved => "approved",
            AgentStatus::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => AgentStatus::Pending,
            "approved" => AgentStatus::Approved,
            "rejected" => AgentStatus::Rejected,
            _ => return None,
        })
    }
}

/// A worker's connection state. The numbers are the proto's `WorkerState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerState {
    Connected = 1,
    Disconnected = 2,
    Draining = 3,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Connected => "connected",
            WorkerState::Disconnected => "disconnected",
            WorkerState::Draining => "draining",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "connected" => WorkerState::Connected,
            "disconnected" => WorkerState::Disconnected,
            "draining" => WorkerState::Draining,
            _ => return None,
        })
    }
}

/// An agent version. Name and version identify it; only the decision fields
/// ever change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRow {
    pub name: String,
    pub version: String,
    pub image: String,
    pub command: Vec<String>,
    pub requested_secret_keys: Vec<String>,
    /// The tool name for profiles' tool ACLs; never empty in a row (defaults to
    /// the name at submit).
    pub tool: String,
    pub description: String,
    pub status: AgentStatus,
    pub submitted_by: String,
    /// Milliseconds since the epoch, as every `*_ms` field.
    pub submitted_at_ms: i64,
    /// Empty while pending.
    pub decided_by: String,
    pub decided_at_ms: Option<i64>,
    pub decision_reason: String,
}

/// A registered worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRow {
    pub worker_id: String,
    pub spiffe_id: String,
    pub scope: Scope,
    pub labels: Labels,
    pub max_concurrent_runs: u32,
    /// Proto `SandboxBackend` numbers.
    pub sandbox_backends: Vec<i32>,
    pub version: String,
    pub state: WorkerState,
    pub registered_at_ms: i64,
    pub last_heartbeat_at_ms: i64,
}

/// A task and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    /// Assigned by the store at insert, strictly increasing: the FIFO order
    /// within a priority, and the paging cursor. 0 in a row not yet inserted.
    pub seq: i64,
    pub task_id: String,
    pub scope: Scope,
    pub agent: String,
    pub agent_version: String,
    pub labels: Labels,
    /// The proto-encoded `bulkhead.sealed.v1.Cascade`; empty when the task has
    /// none (pool tasks, tasks that need no credentials).
    pub cascade: Vec<u8>,
    /// The secret key names the sealed-vault snapshot reported at enqueue.
    pub secret_keys: Vec<String>,
    pub payload: Vec<u8>,
    /// The payload's size in bytes, also when a list leaves `payload` empty.
    pub payload_size: u32,
    pub priority: i32,
    /// Empty when none.
    pub idempotency_key: String,
    /// SHA-256 of the enqueue request as given, to tell a retry from a reuse of
    /// the key with another request.
    pub request_hash: Vec<u8>,
    pub status: TaskStatus,
    pub status_reason: String,
    /// 0 before the first assignment; each assignment adds one.
    pub attempt: u32,
    pub max_attempts: u32,
    /// Grows by one at each assignment; reports and accepts must carry the
    /// current one.
    pub lease_epoch: u64,
    /// The worker holding (or that last held) it; empty if none.
    pub worker_id: String,
    /// The run id of the current (or last) accepted attempt; empty if none.
    pub run_id: String,
    /// While assigned or running: when the lease lapses unless renewed.
    pub lease_expires_at_ms: Option<i64>,
    /// While assigned or running: when the attempt must have reported.
    pub deadline_at_ms: Option<i64>,
    pub timeout_ms: i64,
    pub outcome: Outcome,
    pub exit_code: i32,
    pub output_summary: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_worker_matches_when_its_labels_are_a_superset() {
        let worker = l(&[("gpu", "a100"), ("project", "p1")]);
        assert!(labels_match(&l(&[]), &worker));
        assert!(labels_match(&l(&[("project", "p1")]), &worker));
        assert!(!labels_match(&l(&[("project", "p2")]), &worker));
        assert!(!labels_match(&l(&[("zone", "eu")]), &worker));
    }

    #[test]
    fn scope_columns_round_trip() {
        for s in [Scope::Tenant("acme".into()), Scope::Pool("shared".into())] {
            let (t, p) = s.columns();
            assert_eq!(Scope::from_columns(t, p), Some(s.clone()));
        }
        assert_eq!(Scope::from_columns("", ""), None);
        assert_eq!(Scope::from_columns("a", "b"), None);
    }
}
