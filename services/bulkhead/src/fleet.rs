//! `bulkhead agent`, `task`, `worker` and `pool`: the operator's verbs on the
//! dispatcher.
//!
//! - `agent submit|approve|reject|list`: the agent registry. A version an
//!   operator submits runs only once a different operator has approved it.
//! - `task enqueue|get|list|cancel|watch`: the task queue. A payload comes from
//!   a file or stdin, never from the command line (a command line is visible to
//!   every user of the host and kept in shell history). `watch` follows a task
//!   until it finishes and exits 0 only if it succeeded.
//! - `worker list`: registered workers and their connection state.
//! - `pool reset`: evicts a tenant's (or pool's) workers and revokes their
//!   runs' identities.
//!
//! Labels and the bounds the dispatcher documents (priority, timeout,
//! attempts, payload size) are checked here before anything is sent, so a typo
//! never reaches the mesh. Every verb prints a table or a block for people, or
//! with `--json` one JSON object per line (lists: one per item).
//!
//! Every verb finds the mesh through `--dir DIR` (or `BULKHEAD_DIR`) and calls
//! the dispatcher over mTLS as the operator named in `DIR/endpoints.json`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{IsTerminal as _, Read, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use bulkhead_cluster::Endpoints;
use bulkhead_mesh::client::MeshChannel;
use bulkhead_mesh::tls::ExpectServer;
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_proto::sealed::v1 as sealed_pb;
use clap::{ArgGroup, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::audit::MeshDir;
use crate::identity::{format_duration, parse_duration};

/// The largest payload the dispatcher takes.
pub const MAX_PAYLOAD_LEN: usize = 1024 * 1024;
/// The most labels a task carries.
pub const MAX_LABELS: usize = 64;
/// The longest label key, and the longest label value, in bytes.
pub const MAX_LABEL_LEN: usize = 128;
/// The longest an attempt may run.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Largest gRPC message the CLI accepts: a full ListTasks page of tasks with
/// maximal labels and output summaries.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// The largest page the list RPCs serve.
const MAX_PAGE: u32 = 1000;
/// How many pages a listing follows before it gives up (a service handing out
/// page tokens forever must not keep the CLI running forever).
const MAX_PAGES: usize = 10_000;

// ---------------------------------------------------------------------------
// Commands.

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Submits an agent version for approval. Tasks may name it once an
    /// operator other than you has approved it (`agent approve`).
    Submit {
        #[command(flatten)]
        mesh: MeshDir,
        /// The agent's name: 1 to 64 bytes of [a-z0-9._-].
        #[arg(long)]
        name: String,
        /// The version: 1 to 64 bytes of [A-Za-z0-9._+-]. A name and version,
        /// once submitted, never change.
        #[arg(long)]
        version: String,
        /// The container image; a digest reference (IMAGE@sha256:...) pins
        /// exactly what is approved, a tag does not.
        #[arg(long)]
        image: String,
        /// One argument of the argv the sandbox runs; repeat in order (none:
        /// the image's entrypoint). Tasks cannot change it.
        #[arg(long = "command", value_name = "ARG", allow_hyphen_values = true)]
        command: Vec<String>,
        /// A secret key the agent needs; repeat for more. Only these are
        /// delivered into its sandboxes.
        #[arg(long = "secret-key", value_name = "KEY")]
        secret_keys: Vec<String>,
        /// The name profiles' tool ACLs know the agent by (default: its name).
        #[arg(long)]
        tool: Option<String>,
        /// Free text for the reviewer (at most 4 KiB).
        #[arg(long)]
        description: Option<String>,
        /// Print the agent as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Approves a pending agent version: tasks may name it from now on. Only
    /// an operator other than its submitter may.
    Approve {
        #[command(flatten)]
        mesh: MeshDir,
        /// The agent's name.
        #[arg(value_name = "NAME")]
        name: String,
        /// The version to approve.
        #[arg(value_name = "VERSION")]
        version: String,
        /// A comment recorded in audit (at most 1024 bytes).
        #[arg(long)]
        comment: Option<String>,
        /// Print the agent as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Rejects a pending agent version: tasks naming it are refused. Only an
    /// operator other than its submitter may.
    Reject {
        #[command(flatten)]
        mesh: MeshDir,
        /// The agent's name.
        #[arg(value_name = "NAME")]
        name: String,
        /// The version to reject.
        #[arg(value_name = "VERSION")]
        version: String,
        /// Why; recorded in audit (1 to 1024 bytes).
        #[arg(long)]
        reason: String,
        /// Print the agent as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Lists agent versions, by name then newest version first.
    List {
        #[command(flatten)]
        mesh: MeshDir,
        /// Only versions of this agent.
        #[arg(long)]
        name: Option<String>,
        /// Only versions in this status.
        #[arg(long, value_enum)]
        status: Option<AgentStatusArg>,
        /// One JSON object per line, one line per version.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Enqueues a task for a tenant (or an org-global pool) and prints its id.
    /// The agent must be approved; with --profile the run gets that profile's
    /// credentials, checked against revocations now (fail closed).
    ///
    /// Examples:
    ///   bulkhead task enqueue --tenant acme --agent support-bot --profile default --payload-file job.json
    ///   echo '{"ticket": 42}' | bulkhead task enqueue --tenant acme --agent support-bot --payload -
    #[command(verbatim_doc_comment)]
    #[command(group(ArgGroup::new("scope").required(true).args(["tenant", "pool"])))]
    #[command(group(ArgGroup::new("payload_source").args(["payload_file", "payload"])))]
    Enqueue {
        #[command(flatten)]
        mesh: MeshDir,
        /// The task's tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// The org-global pool, for a pool task (no --profile).
        #[arg(long, conflicts_with = "profile")]
        pool: Option<String>,
        /// The agent's name.
        #[arg(long)]
        agent: String,
        /// The agent's version (default: its most recently approved one).
        #[arg(long, value_name = "VERSION")]
        agent_version: Option<String>,
        /// A label a worker must carry; repeat for more (at most 64). Keys are
        /// 1 to 128 bytes of [A-Za-z0-9._/-], values at most 128 bytes.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// The tenant's profile whose credentials and settings the run gets
        /// (the cascade's run level).
        #[arg(long, value_name = "NAME", requires = "tenant")]
        profile: Option<String>,
        /// Read the payload (the agent's stdin, at most 1 MiB) from this file.
        #[arg(long, value_name = "PATH")]
        payload_file: Option<PathBuf>,
        /// `-`: read the payload from stdin until end of file. A payload is
        /// never taken from the command line.
        #[arg(long, value_name = "-", value_parser = parse_stdin_marker)]
        payload: Option<StdinMarker>,
        /// Priority within the tenant, -100 to 100, higher first.
        #[arg(long, value_name = "N", default_value_t = 0, allow_negative_numbers = true,
              value_parser = clap::value_parser!(i32).range(-100..=100))]
        priority: i32,
        /// Enqueueing again with the same key within 24 hours returns the
        /// first task instead of a new one (1 to 128 bytes).
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// How long one attempt may run, 1s to 24h (default: 1h), e.g. 30s,
        /// 10m, 2h.
        #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
        timeout: Option<Duration>,
        /// How many attempts the task may take, 1 to 10 (default: 3).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10))]
        max_attempts: Option<u32>,
        /// Print the response as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Prints one task: where it stands, its attempts and its last report.
    Get {
        #[command(flatten)]
        mesh: MeshDir,
        /// The task's tenant; leave it out for a pool task.
        #[arg(long)]
        tenant: Option<String>,
        /// The task's id.
        #[arg(value_name = "TASK_ID")]
        task_id: String,
        /// Print the task as one JSON object, with its payload in base64.
        #[arg(long)]
        json: bool,
    },
    /// Lists tasks, newest first.
    List {
        #[command(flatten)]
        mesh: MeshDir,
        /// Only this tenant's tasks (default: every tenant's and pool's).
        #[arg(long)]
        tenant: Option<String>,
        /// Only this pool's tasks.
        #[arg(long)]
        pool: Option<String>,
        /// Only tasks in this status.
        #[arg(long, value_enum)]
        status: Option<TaskStatusArg>,
        /// Only tasks of this agent.
        #[arg(long)]
        agent: Option<String>,
        /// At most this many tasks.
        #[arg(long, value_name = "N", default_value_t = 100,
              value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
        /// One JSON object per line, one line per task.
        #[arg(long)]
        json: bool,
    },
    /// Cancels a task. A running task's worker is told to kill its sandbox.
    Cancel {
        #[command(flatten)]
        mesh: MeshDir,
        /// The task's tenant; leave it out for a pool task.
        #[arg(long)]
        tenant: Option<String>,
        /// The task's id.
        #[arg(value_name = "TASK_ID")]
        task_id: String,
        /// Why; recorded in audit (at most 512 bytes).
        #[arg(long)]
        reason: Option<String>,
        /// Print the task as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Prints a task's state, then each change, until it finishes. Exits 0
    /// when it succeeded, 1 when it failed or was cancelled (or the watch
    /// broke off).
    Watch {
        #[command(flatten)]
        mesh: MeshDir,
        /// The task's tenant; leave it out for a pool task.
        #[arg(long)]
        tenant: Option<String>,
        /// The task's id.
        #[arg(value_name = "TASK_ID")]
        task_id: String,
        /// One JSON object per change.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Lists registered workers, by id.
    List {
        #[command(flatten)]
        mesh: MeshDir,
        /// Only this tenant's workers (default: every tenant's and pool's).
        #[arg(long)]
        tenant: Option<String>,
        /// Only this pool's workers.
        #[arg(long)]
        pool: Option<String>,
        /// Only workers in this state.
        #[arg(long, value_enum)]
        state: Option<WorkerStateArg>,
        /// One JSON object per line, one line per worker.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Resets a tenant's workers or an org-global pool: the workers are
    /// drained and evicted, their in-flight runs' identities revoked hard
    /// (their sandboxes are killed), and their tasks queued again as the next
    /// attempt.
    #[command(group(ArgGroup::new("scope").required(true).args(["tenant", "pool"])))]
    Reset {
        #[command(flatten)]
        mesh: MeshDir,
        /// Reset every worker of this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Reset every worker of this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Why; recorded in audit (1 to 512 bytes).
        #[arg(long)]
        reason: String,
        /// Also revoke the workers' own identities, so that they must enroll
        /// again with a new join token (default: they may register again at
        /// once).
        #[arg(long)]
        revoke_workers: bool,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// An agent status, as a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AgentStatusArg {
    Pending,
    Approved,
    Rejected,
}

/// A task status, as a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskStatusArg {
    Queued,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// A worker state, as a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkerStateArg {
    Connected,
    Disconnected,
    Draining,
}

impl From<AgentStatusArg> for pb::AgentStatus {
    fn from(s: AgentStatusArg) -> Self {
        match s {
            AgentStatusArg::Pending => Self::Pending,
            AgentStatusArg::Approved => Self::Approved,
            AgentStatusArg::Rejected => Self::Rejected,
        }
    }
}

impl From<TaskStatusArg> for pb::TaskStatus {
    fn from(s: TaskStatusArg) -> Self {
        match s {
            TaskStatusArg::Queued => Self::Queued,
            TaskStatusArg::Assigned => Self::Assigned,
            TaskStatusArg::Running => Self::Running,
            TaskStatusArg::Succeeded => Self::Succeeded,
            TaskStatusArg::Failed => Self::Failed,
            TaskStatusArg::Cancelled => Self::Cancelled,
        }
    }
}

impl From<WorkerStateArg> for pb::WorkerState {
    fn from(s: WorkerStateArg) -> Self {
        match s {
            WorkerStateArg::Connected => Self::Connected,
            WorkerStateArg::Disconnected => Self::Disconnected,
            WorkerStateArg::Draining => Self::Draining,
        }
    }
}

/// `--payload -`: the one value that flag takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StdinMarker;

pub async fn run_agent(cmd: AgentCommand) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Submit {
            mesh,
            name,
            version,
            image,
            command,
            secret_keys,
            tool,
            description,
            json,
        } => {
            submit_agent(
                &mesh.dir,
                pb::SubmitAgentRequest {
                    name,
                    version,
                    image,
                    command,
                    requested_secret_keys: secret_keys,
                    tool: tool.unwrap_or_default(),
                    description: description.unwrap_or_default(),
                },
                json,
            )
            .await
        }
        AgentCommand::Approve {
            mesh,
            name,
            version,
            comment,
            json,
        } => {
            decide_agent(
                &mesh.dir,
                Decision::Approve(pb::ApproveAgentRequest {
                    name,
                    version,
                    comment: comment.unwrap_or_default(),
                }),
                json,
            )
            .await
        }
        AgentCommand::Reject {
            mesh,
            name,
            version,
            reason,
            json,
        } => {
            if reason.trim().is_empty() {
                bail!("--reason is empty: say why the version is rejected");
            }
            decide_agent(
                &mesh.dir,
                Decision::Reject(pb::RejectAgentRequest {
                    name,
                    version,
                    reason,
                }),
                json,
            )
            .await
        }
        AgentCommand::List {
            mesh,
            name,
            status,
            json,
        } => {
            list_agents(
                &mesh.dir,
                name.unwrap_or_default(),
                status.map_or(pb::AgentStatus::Unspecified, Into::into),
                json,
            )
            .await
        }
    }
}

pub async fn run_task(cmd: TaskCommand) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Enqueue {
            mesh,
            tenant,
            pool,
            agent,
            agent_version,
            labels,
            profile,
            payload_file,
            payload,
            priority,
            idempotency_key,
            timeout,
            max_attempts,
            json,
        } => {
            let tenant = tenant.unwrap_or_default();
            let pool = pool.unwrap_or_default();
            let labels = label_map(&labels, &tenant, &pool)?;
            let payload = match (payload_file, payload) {
                (Some(path), _) => read_payload_file(&path)?,
                (None, Some(StdinMarker)) => read_payload_stdin()?,
                (None, None) => Vec::new(),
            };
            let cascade = profile.map(|name| run_level_cascade(&tenant, name));
            enqueue(
                &mesh.dir,
                pb::EnqueueRequest {
                    tenant,
                    pool,
                    agent,
                    agent_version: agent_version.unwrap_or_default(),
                    labels,
                    cascade,
                    payload: payload.into(),
                    priority,
                    idempotency_key: idempotency_key.unwrap_or_default(),
                    timeout: timeout.map(proto_duration),
                    max_attempts: max_attempts.unwrap_or(0),
                },
                json,
            )
            .await
        }
        TaskCommand::Get {
            mesh,
            tenant,
            task_id,
            json,
        } => get_task(&mesh.dir, tenant.unwrap_or_default(), task_id, json).await,
        TaskCommand::List {
            mesh,
            tenant,
            pool,
            status,
            agent,
            limit,
            json,
        } => {
            list_tasks(
                &mesh.dir,
                pb::ListTasksRequest {
                    tenant: tenant.unwrap_or_default(),
                    pool: pool.unwrap_or_default(),
                    status: status.map_or(pb::TaskStatus::Unspecified, Into::into) as i32,
                    agent: agent.unwrap_or_default(),
                    page_size: 0,
                    page_token: String::new(),
                },
                limit,
                json,
            )
            .await
        }
        TaskCommand::Cancel {
            mesh,
            tenant,
            task_id,
            reason,
            json,
        } => {
            cancel_task(
                &mesh.dir,
                pb::CancelTaskRequest {
                    tenant: tenant.unwrap_or_default(),
                    task_id,
                    reason: reason.unwrap_or_default(),
                },
                json,
            )
            .await
        }
        TaskCommand::Watch {
            mesh,
            tenant,
            task_id,
            json,
        } => watch_task(&mesh.dir, tenant.unwrap_or_default(), task_id, json).await,
    }
}

pub async fn run_worker(cmd: WorkerCommand) -> anyhow::Result<()> {
    match cmd {
        WorkerCommand::List {
            mesh,
            tenant,
            pool,
            state,
            json,
        } => {
            list_workers(
                &mesh.dir,
                tenant.unwrap_or_default(),
                pool.unwrap_or_default(),
                state.map_or(pb::WorkerState::Unspecified, Into::into),
                json,
            )
            .await
        }
    }
}

pub async fn run_pool(cmd: PoolCommand) -> anyhow::Result<()> {
    match cmd {
        PoolCommand::Reset {
            mesh,
            tenant,
            pool,
            reason,
            revoke_workers,
            json,
        } => {
            if reason.trim().is_empty() {
                bail!("--reason is empty: say why the workers are reset");
            }
            reset_pool(
                &mesh.dir,
                pb::ResetPoolRequest {
                    tenant: tenant.unwrap_or_default(),
                    pool: pool.unwrap_or_default(),
                    reason,
                    revoke_workers,
                },
                json,
            )
            .await
        }
    }
}

// ---------------------------------------------------------------------------
// Flags.

fn label_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')
}

/// `KEY=VALUE`, by the dispatcher's rules: a key of 1 to 128 bytes of
/// [A-Za-z0-9._/-], a value of at most 128 bytes without control characters.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let Some((key, value)) = s.split_once('=') else {
        return Err(format!("{s:?} is not KEY=VALUE"));
    };
    if key.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    if key.len() > MAX_LABEL_LEN {
        return Err(format!(
            "the key of {s:?} is {} bytes, more than {MAX_LABEL_LEN}",
            key.len()
        ));
    }
    if let Some(c) = key.chars().find(|c| !label_key_char(*c)) {
        return Err(format!(
            "the key {key:?} holds {c:?}: keys are made of A-Z a-z 0-9 . _ / -"
        ));
    }
    if value.len() > MAX_LABEL_LEN {
        return Err(format!(
            "the value of {key:?} is {} bytes, more than {MAX_LABEL_LEN}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("the value of {key:?} holds a control character"));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// The labels as a map: each key once, at most [`MAX_LABELS`], and the
/// reserved keys `tenant` and `pool` only with the task's own tenant or pool.
pub fn label_map(
    labels: &[(String, String)],
    tenant: &str,
    pool: &str,
) -> anyhow::Result<HashMap<String, String>> {
    if labels.len() > MAX_LABELS {
        bail!(
            "{} labels given: a task carries at most {MAX_LABELS}",
            labels.len()
        );
    }
    let mut map = HashMap::new();
    for (k, v) in labels {
        let own = match k.as_str() {
            "tenant" => Some(("tenant", tenant)),
            "pool" => Some(("pool", pool)),
            _ => None,
        };
        if let Some((what, own)) = own
            && v != own
        {
            bail!(
                "--label {k}={v}: the key {k:?} is reserved and must equal the task's {what} ({})",
                if own.is_empty() {
                    format!("none: this is not a {what} task")
                } else {
                    format!("{own:?}")
                }
            );
        }
        if map.insert(k.clone(), v.clone()).is_some() {
            bail!("--label {k} is given twice");
        }
    }
    Ok(map)
}

/// Only `-` (stdin): a payload never comes from the command line.
pub fn parse_stdin_marker(s: &str) -> Result<StdinMarker, String> {
    if s == "-" {
        Ok(StdinMarker)
    } else {
        Err(
            "a payload is never taken from the command line: pass --payload - to read it from \
             stdin, or --payload-file PATH"
                .into(),
        )
    }
}

/// A duration as `parse_duration` reads it, at most 24 hours.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > MAX_TIMEOUT {
        return Err(format!(
            "{s:?} is longer than 24h, the longest an attempt may run"
        ));
    }
    Ok(d)
}

/// A cascade with one level, the run's, naming the tenant's profile.
fn run_level_cascade(tenant: &str, profile: String) -> sealed_pb::Cascade {
    sealed_pb::Cascade {
        system: None,
        agent: None,
        run: Some(sealed_pb::CascadeLevel {
            profile: Some(sealed_pb::ProfileRef {
                tenant: tenant.to_owned(),
                profile,
            }),
            overrides: HashMap::new(),
        }),
    }
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

// ---------------------------------------------------------------------------
// Payloads.

/// Everything `r` holds, refused when larger than [`MAX_PAYLOAD_LEN`].
pub fn read_payload(r: impl Read, from: &str) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.take(MAX_PAYLOAD_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("failed to read {from}"))?;
    if buf.len() > MAX_PAYLOAD_LEN {
        bail!("the payload in {from} is larger than 1 MiB, the most a task carries");
    }
    Ok(buf)
}

fn read_payload_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let file = File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    if file
        .metadata()
        .with_context(|| format!("failed to read {}", path.display()))?
        .is_dir()
    {
        bail!("{} is a directory", path.display());
    }
    read_payload(file, &path.display().to_string())
}

fn read_payload_stdin() -> anyhow::Result<Vec<u8>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("reading the payload from stdin until end of file (Ctrl-D)");
    }
    read_payload(stdin.lock(), "stdin")
}

// ---------------------------------------------------------------------------
// Printing.

/// RFC 3339 in UTC to the second; `-` when unset.
fn when(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        None => "-".into(),
        Some(t) => {
            let full = bulkhead_audit::event::format_time_us(t.seconds.saturating_mul(1_000_000));
            match full.split_once('.') {
                Some((secs, _)) => format!("{secs}Z"),
                None => full,
            }
        }
    }
}

/// RFC 3339 in UTC to the microsecond, for JSON; null when unset.
fn json_time(t: Option<&prost_types::Timestamp>) -> Value {
    match t {
        None => Value::Null,
        Some(t) => Value::String(bulkhead_audit::event::format_time_us(
            t.seconds
                .saturating_mul(1_000_000)
                .saturating_add(i64::from(t.nanos / 1000)),
        )),
    }
}

/// Free text as printed: control characters escaped, the rest as is.
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.is_empty() {
        "-".into()
    } else if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

/// A value as printed in a table: as is when it is one plain word, else quoted
/// with control characters escaped (values come from the service, workers and
/// other operators, and must not drive the terminal).
fn plain(s: &str) -> std::borrow::Cow<'_, str> {
    if s.is_empty() {
        "-".into()
    } else if s
        .chars()
        .all(|c| !c.is_control() && !c.is_whitespace() && c != '"' && c != '\\')
    {
        s.into()
    } else {
        format!("{s:?}").into()
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items
            .iter()
            .map(|i| plain(i).into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn labels_text(labels: &HashMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .map(|(k, v)| format!("{}={}", plain(k), plain(v)))
        .collect::<Vec<_>>()
        .join(",")
}

fn sorted(labels: &HashMap<String, String>) -> BTreeMap<&String, &String> {
    labels.iter().collect()
}

fn scope(tenant: &str, pool: &str) -> String {
    if tenant.is_empty() && !pool.is_empty() {
        format!("pool/{}", plain(pool))
    } else {
        format!("tenant/{}", plain(tenant))
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub fn agent_status(s: i32) -> &'static str {
    match pb::AgentStatus::try_from(s) {
        Ok(pb::AgentStatus::Pending) => "pending",
        Ok(pb::AgentStatus::Approved) => "approved",
        Ok(pb::AgentStatus::Rejected) => "rejected",
        Ok(pb::AgentStatus::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

pub fn task_status(s: i32) -> &'static str {
    match pb::TaskStatus::try_from(s) {
        Ok(pb::TaskStatus::Queued) => "queued",
        Ok(pb::TaskStatus::Assigned) => "assigned",
        Ok(pb::TaskStatus::Running) => "running",
        Ok(pb::TaskStatus::Succeeded) => "succeeded",
        Ok(pb::TaskStatus::Failed) => "failed",
        Ok(pb::TaskStatus::Cancelled) => "cancelled",
        Ok(pb::TaskStatus::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

fn is_final(s: i32) -> bool {
    matches!(
        pb::TaskStatus::try_from(s),
        Ok(pb::TaskStatus::Succeeded | pb::TaskStatus::Failed | pb::TaskStatus::Cancelled)
    )
}

pub fn run_outcome(o: i32) -> &'static str {
    match pb::RunOutcome::try_from(o) {
        Ok(pb::RunOutcome::Succeeded) => "succeeded",
        Ok(pb::RunOutcome::Failed) => "failed",
        Ok(pb::RunOutcome::Error) => "error",
        Ok(pb::RunOutcome::Cancelled) => "cancelled",
        Ok(pb::RunOutcome::Revoked) => "revoked",
        Ok(pb::RunOutcome::TimedOut) => "timed-out",
        Ok(pb::RunOutcome::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

pub fn worker_state(s: i32) -> &'static str {
    match pb::WorkerState::try_from(s) {
        Ok(pb::WorkerState::Connected) => "connected",
        Ok(pb::WorkerState::Disconnected) => "disconnected",
        Ok(pb::WorkerState::Draining) => "draining",
        Ok(pb::WorkerState::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

fn sandbox_backend(b: i32) -> &'static str {
    use bulkhead_proto::sandbox::v1::SandboxBackend;
    match SandboxBackend::try_from(b) {
        Ok(SandboxBackend::Docker) => "docker",
        Ok(SandboxBackend::Process) => "process",
        Ok(SandboxBackend::Unspecified) => "default",
        Err(_) => "unknown",
    }
}

fn duration_text(d: Option<&prost_types::Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) => format_duration(Duration::from_secs(u64::try_from(d.seconds).unwrap_or(0))),
    }
}

/// The cascade's levels, `system acme/base, run acme/default (+2 overrides)`.
fn cascade_text(c: Option<&sealed_pb::Cascade>) -> String {
    let Some(c) = c else {
        return "none".into();
    };
    let levels: Vec<String> = [
        ("system", c.system.as_ref()),
        ("agent", c.agent.as_ref()),
        ("run", c.run.as_ref()),
    ]
    .into_iter()
    .filter_map(|(name, level)| {
        let level = level?;
        let profile = level.profile.as_ref().map_or_else(
            || "(overrides only)".to_owned(),
            |p| format!("{}/{}", plain(&p.tenant), plain(&p.profile)),
        );
        let overrides = match level.overrides.len() {
            0 => String::new(),
            n => format!(" (+{})", plural(n, "override", "overrides")),
        };
        Some(format!("{name} {profile}{overrides}"))
    })
    .collect();
    if levels.is_empty() {
        "none".into()
    } else {
        levels.join(", ")
    }
}

fn cascade_json(c: Option<&sealed_pb::Cascade>) -> Value {
    let Some(c) = c else {
        return Value::Null;
    };
    let level = |l: Option<&sealed_pb::CascadeLevel>| -> Value {
        let Some(l) = l else {
            return Value::Null;
        };
        let overrides: serde_json::Map<String, Value> = l
            .overrides
            .iter()
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .map(|(k, o)| {
                use sealed_pb::cascade_override::Value as V;
                let v = match &o.value {
                    Some(V::Plain(p)) => json!({ "plain": p }),
                    Some(V::Reference(r)) => json!({ "reference": r }),
                    None => json!({}),
                };
                (k.clone(), v)
            })
            .collect();
        json!({
            "profile": l.profile.as_ref().map(|p| json!({ "tenant": p.tenant, "profile": p.profile })),
            "overrides": overrides,
        })
    };
    json!({
        "system": level(c.system.as_ref()),
        "agent": level(c.agent.as_ref()),
        "run": level(c.run.as_ref()),
    })
}

pub fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "name": a.name,
        "version": a.version,
        "image": a.image,
        "command": a.command,
        "requested_secret_keys": a.requested_secret_keys,
        "tool": a.tool,
        "description": a.description,
        "status": agent_status(a.status),
        "submitted_by": a.submitted_by,
        "submitted_at": json_time(a.submitted_at.as_ref()),
        "decided_by": a.decided_by,
        "decided_at": json_time(a.decided_at.as_ref()),
        "decision_reason": a.decision_reason,
    })
}

/// A task as JSON; the payload (base64) only when `with_payload`.
pub fn task_json(t: &pb::Task, with_payload: bool) -> Value {
    let mut v = json!({
        "task_id": t.task_id,
        "tenant": t.tenant,
        "pool": t.pool,
        "agent": t.agent,
        "agent_version": t.agent_version,
        "labels": sorted(&t.labels),
        "cascade": cascade_json(t.cascade.as_ref()),
        "payload_size": t.payload_size,
        "priority": t.priority,
        "idempotency_key": t.idempotency_key,
        "status": task_status(t.status),
        "status_reason": t.status_reason,
        "attempt": t.attempt,
        "max_attempts": t.max_attempts,
        "worker_id": t.worker_id,
        "run_id": t.run_id,
        "secret_keys": t.secret_keys,
        "outcome": if t.outcome == 0 { Value::Null } else { run_outcome(t.outcome).into() },
        "exit_code": t.exit_code,
        "output_summary": t.output_summary,
        "timeout_seconds": t.timeout.as_ref().map(|d| d.seconds),
        "created_at": json_time(t.created_at.as_ref()),
        "updated_at": json_time(t.updated_at.as_ref()),
        "finished_at": json_time(t.finished_at.as_ref()),
    });
    if with_payload && let Value::Object(m) = &mut v {
        m.insert(
            "payload_base64".into(),
            base64::engine::general_purpose::STANDARD
                .encode(&t.payload)
                .into(),
        );
    }
    v
}

pub fn worker_json(w: &pb::Worker) -> Value {
    json!({
        "worker_id": w.worker_id,
        "spiffe_id": w.spiffe_id,
        "tenant": w.tenant,
        "pool": w.pool,
        "labels": sorted(&w.labels),
        "max_concurrent_runs": w.max_concurrent_runs,
        "sandbox_backends": w.sandbox_backends.iter().map(|b| sandbox_backend(*b)).collect::<Vec<_>>(),
        "state": worker_state(w.state),
        "running": w.running,
        "version": w.version,
        "registered_at": json_time(w.registered_at.as_ref()),
        "last_heartbeat_at": json_time(w.last_heartbeat_at.as_ref()),
    })
}

fn print_json(out: &mut impl std::io::Write, v: &Value) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

/// An agent version as `agent submit|approve|reject` print it.
pub fn format_agent(a: &pb::Agent) -> String {
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!(
        "agent {} {}  ({})",
        plain(&a.name),
        plain(&a.version),
        agent_status(a.status)
    ));
    line(format!("  image:        {}", plain(&a.image)));
    line(format!(
        "  command:      {}",
        if a.command.is_empty() {
            "(the image's entrypoint)".into()
        } else {
            a.command
                .iter()
                .map(|c| format!("{c:?}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
    ));
    line(format!(
        "  secret keys:  {}",
        list(&a.requested_secret_keys)
    ));
    line(format!(
        "  tool:         {}",
        if a.tool.is_empty() {
            format!("{} (its name)", plain(&a.name))
        } else {
            plain(&a.tool).into_owned()
        }
    ));
    line(format!("  description:  {}", printable(&a.description)));
    line(format!(
        "  submitted:    {} by {}",
        when(a.submitted_at.as_ref()),
        plain(&a.submitted_by)
    ));
    if !a.decided_by.is_empty() || a.decided_at.is_some() {
        line(format!(
            "  {:<13} {} by {}",
            format!("{}:", agent_status(a.status)),
            when(a.decided_at.as_ref()),
            plain(&a.decided_by)
        ));
        line(format!("  reason:       {}", printable(&a.decision_reason)));
    }
    s
}

/// A task as `task get|enqueue|cancel` print it.
pub fn format_task(t: &pb::Task) -> String {
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!(
        "task {}  ({})",
        plain(&t.task_id),
        task_status(t.status)
    ));
    line(format!("  scope:         {}", scope(&t.tenant, &t.pool)));
    line(format!(
        "  agent:         {} {}",
        plain(&t.agent),
        plain(&t.agent_version)
    ));
    line(format!("  labels:        {}", labels_text(&t.labels)));
    line(format!(
        "  cascade:       {}",
        cascade_text(t.cascade.as_ref())
    ));
    line(format!("  secret keys:   {}", list(&t.secret_keys)));
    line(format!(
        "  payload:       {}",
        plural(t.payload_size as usize, "byte", "bytes")
    ));
    line(format!("  priority:      {}", t.priority));
    line(format!(
        "  attempt:       {} of {}",
        t.attempt, t.max_attempts
    ));
    line(format!(
        "  timeout:       {}",
        duration_text(t.timeout.as_ref())
    ));
    line(format!("  idempotency:   {}", plain(&t.idempotency_key)));
    line(format!("  worker:        {}", plain(&t.worker_id)));
    line(format!("  run:           {}", plain(&t.run_id)));
    if t.outcome != 0 {
        line(format!(
            "  outcome:       {} (exit code {})",
            run_outcome(t.outcome),
            t.exit_code
        ));
        line(format!("  output:        {}", printable(&t.output_summary)));
    }
    line(format!("  status reason: {}", printable(&t.status_reason)));
    line(format!("  created:       {}", when(t.created_at.as_ref())));
    line(format!("  updated:       {}", when(t.updated_at.as_ref())));
    line(format!("  finished:      {}", when(t.finished_at.as_ref())));
    s
}

// ---------------------------------------------------------------------------
// Talking to the dispatcher.

fn load_endpoints(dir: &Path) -> anyhow::Result<Endpoints> {
    let path = Endpoints::path(dir);
    if !path.is_file() {
        bail!(
            "no mesh at {}: {} does not exist (start one with `bulkhead dev up --dir {}`, or pass \
             --dir / BULKHEAD_DIR)",
            dir.display(),
            path.display(),
            dir.display()
        );
    }
    Endpoints::load(dir).with_context(|| format!("failed to read {}", path.display()))
}

/// Dials the dispatcher as the operator named in `endpoints.json`.
async fn connect(dir: &Path) -> anyhow::Result<DispatcherServiceClient<MeshChannel>> {
    let endpoints = load_endpoints(dir)?;
    let addr = endpoints.address("dispatcher").with_context(|| {
        format!(
            "{} names no dispatcher service",
            Endpoints::path(dir).display()
        )
    })?;
    let (identity, bundle) = endpoints
        .operator()
        .context("failed to load the operator certificate named in endpoints.json")?;
    let channel = bulkhead_mesh::client::connect(
        addr,
        Some(&identity),
        &bundle,
        ExpectServer::Service("dispatcher".into()),
    )
    .await
    .with_context(|| format!("cannot reach the dispatcher at {addr} (is the mesh running?)"))?;
    Ok(DispatcherServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE))
}

/// The canonical name of a gRPC code, as the protos and grpcurl spell it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// What a refusal of `what` with `code` means for the operator.
fn hint(what: &str, code: tonic::Code) -> &'static str {
    use tonic::Code;
    match (code, what) {
        (Code::PermissionDenied, "ApproveAgent" | "RejectAgent") => {
            " (an agent version is approved or rejected by an operator other than the one who \
             submitted it; or the certificate in endpoints.json is not an operator's)"
        }
        (Code::PermissionDenied, "Enqueue") => {
            " (a reserved label disagrees with the task's tenant or pool, the profile is another \
             tenant's, or the profile does not allow this agent)"
        }
        (Code::PermissionDenied, _) => {
            " (the certificate in endpoints.json is not allowed to do this; operators are \
             spiffe://<td>/admin/*)"
        }
        (Code::FailedPrecondition, "Enqueue") => {
            " (nothing was enqueued: the agent version is not approved, a key or profile of the \
             cascade is revoked, or the cascade lacks a key the agent needs)"
        }
        (Code::FailedPrecondition, "ApproveAgent" | "RejectAgent") => {
            " (only a pending version can be approved or rejected)"
        }
        (Code::FailedPrecondition, "CancelTask") => " (the task has finished already)",
        (Code::AlreadyExists, "Enqueue") => {
            " (the idempotency key was used for a different request)"
        }
        (Code::NotFound, "GetTask" | "CancelTask" | "WatchTask") => {
            " (no such task in this scope: a tenant's task needs its --tenant, a pool task none)"
        }
        (Code::Unavailable, _) => {
            " (nothing was done: the dispatcher, or the sealed-vault, identity, audit log or \
             store it needs, cannot be reached)"
        }
        (Code::Unimplemented, _) => " (this dispatcher does not serve it yet)",
        _ => "",
    }
}

/// A refused or failed RPC as an error that names the RPC, the code and the
/// service's message, with what the code means for the operator.
fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> anyhow::Error {
    move |s| {
        anyhow::anyhow!(
            "dispatcher {what} failed: {}: {}{}",
            code_name(s.code()),
            if s.message().is_empty() {
                "(no message)"
            } else {
                s.message()
            },
            hint(what, s.code())
        )
    }
}

// ---------------------------------------------------------------------------
// Agents.

async fn submit_agent(dir: &Path, req: pb::SubmitAgentRequest, json: bool) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let a = client
        .submit_agent(req)
        .await
        .map_err(rpc("SubmitAgent"))?
        .into_inner()
        .agent
        .context("the dispatcher answered SubmitAgent without the agent")?;
    let mut out = std::io::stdout().lock();
    if json {
        return print_json(&mut out, &agent_json(&a));
    }
    writeln!(
        out,
        "submitted agent {} {}: pending until an operator other than you approves it (`bulkhead \
         agent approve {} {}`)",
        plain(&a.name),
        plain(&a.version),
        plain(&a.name),
        plain(&a.version)
    )?;
    write!(out, "{}", format_agent(&a))?;
    Ok(())
}

enum Decision {
    Approve(pb::ApproveAgentRequest),
    Reject(pb::RejectAgentRequest),
}

async fn decide_agent(dir: &Path, decision: Decision, json: bool) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let (verb, agent) = match decision {
        Decision::Approve(req) => (
            "approved",
            client
                .approve_agent(req)
                .await
                .map_err(rpc("ApproveAgent"))?
                .into_inner()
                .agent,
        ),
        Decision::Reject(req) => (
            "rejected",
            client
                .reject_agent(req)
                .await
                .map_err(rpc("RejectAgent"))?
                .into_inner()
                .agent,
        ),
    };
    let a = agent.context("the dispatcher answered without the agent")?;
    let mut out = std::io::stdout().lock();
    if json {
        return print_json(&mut out, &agent_json(&a));
    }
    writeln!(
        out,
        "{verb} agent {} {}{}",
        plain(&a.name),
        plain(&a.version),
        if verb == "approved" {
            ": tasks may name it"
        } else {
            ": tasks naming it are refused"
        }
    )?;
    write!(out, "{}", format_agent(&a))?;
    Ok(())
}

async fn list_agents(
    dir: &Path,
    name: String,
    status: pb::AgentStatus,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let mut agents = Vec::new();
    let mut page_token = String::new();
    let mut complete = false;
    for _ in 0..MAX_PAGES {
        let resp = client
            .list_agents(pb::ListAgentsRequest {
                name: name.clone(),
                status: status as i32,
                page_size: MAX_PAGE,
                page_token: page_token.clone(),
            })
            .await
            .map_err(rpc("ListAgents"))?
            .into_inner();
        agents.extend(resp.agents);
        if resp.next_page_token.is_empty() {
            complete = true;
            break;
        }
        if resp.next_page_token == page_token {
            bail!("the dispatcher returned the same page token twice");
        }
        page_token = resp.next_page_token;
    }
    if !complete {
        bail!("more than {MAX_PAGES} pages of agents; narrow the listing with --name or --status");
    }
    let mut out = std::io::stdout().lock();
    if json {
        for a in &agents {
            print_json(&mut out, &agent_json(a))?;
        }
        return Ok(());
    }
    if agents.is_empty() {
        writeln!(out, "no agents")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24}  {:<16}  {:<8}  {:<20}  {:<40}  {:<40}  IMAGE",
        "NAME", "VERSION", "STATUS", "SUBMITTED", "SUBMITTED BY", "DECIDED BY"
    )?;
    for a in &agents {
        writeln!(
            out,
            "{:<24}  {:<16}  {:<8}  {:<20}  {:<40}  {:<40}  {}",
            plain(&a.name),
            plain(&a.version),
            agent_status(a.status),
            when(a.submitted_at.as_ref()),
            plain(&a.submitted_by),
            plain(&a.decided_by),
            plain(&a.image),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Tasks.

async fn enqueue(dir: &Path, req: pb::EnqueueRequest, json: bool) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let resp = client
        .enqueue(req)
        .await
        .map_err(rpc("Enqueue"))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if json {
        return print_json(
            &mut out,
            &json!({
                "task_id": resp.task_id,
                "deduplicated": resp.deduplicated,
                "task": resp.task.as_ref().map(|t| task_json(t, false)),
            }),
        );
    }
    if resp.deduplicated {
        writeln!(
            out,
            "task {} was enqueued earlier with this idempotency key; nothing new was enqueued",
            plain(&resp.task_id)
        )?;
    } else {
        writeln!(out, "enqueued task {}", plain(&resp.task_id))?;
    }
    if let Some(t) = &resp.task {
        write!(out, "{}", format_task(t))?;
    }
    Ok(())
}

async fn get_task(dir: &Path, tenant: String, task_id: String, json: bool) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let t = client
        .get_task(pb::GetTaskRequest { tenant, task_id })
        .await
        .map_err(rpc("GetTask"))?
        .into_inner()
        .task
        .context("the dispatcher answered GetTask without the task")?;
    let mut out = std::io::stdout().lock();
    if json {
        return print_json(&mut out, &task_json(&t, true));
    }
    write!(out, "{}", format_task(&t))?;
    Ok(())
}

async fn list_tasks(
    dir: &Path,
    req: pb::ListTasksRequest,
    limit: u64,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let mut tasks = Vec::new();
    let mut page_token = String::new();
    let mut more = false;
    for _ in 0..MAX_PAGES {
        let left = limit.saturating_sub(tasks.len() as u64);
        let resp = client
            .list_tasks(pb::ListTasksRequest {
                page_size: u32::try_from(left.min(u64::from(MAX_PAGE))).unwrap_or(MAX_PAGE),
                page_token: page_token.clone(),
                ..req.clone()
            })
            .await
            .map_err(rpc("ListTasks"))?
            .into_inner();
        tasks.extend(resp.tasks);
        if resp.next_page_token.is_empty() {
            break;
        }
        if tasks.len() as u64 >= limit {
            more = true;
            break;
        }
        if resp.next_page_token == page_token {
            bail!("the dispatcher returned the same page token twice");
        }
        page_token = resp.next_page_token;
    }
    if tasks.len() as u64 > limit {
        tasks.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        more = true;
    }
    let mut out = std::io::stdout().lock();
    if json {
        for t in &tasks {
            print_json(&mut out, &task_json(t, false))?;
        }
    } else if tasks.is_empty() {
        writeln!(out, "no tasks")?;
    } else {
        writeln!(
            out,
            "{:<36}  {:<24}  {:<32}  {:<9}  {:>7}  {:>4}  {:<24}  {:<20}  REASON",
            "ID", "SCOPE", "AGENT", "STATUS", "ATTEMPT", "PRIO", "WORKER", "CREATED"
        )?;
        for t in &tasks {
            writeln!(
                out,
                "{:<36}  {:<24}  {:<32}  {:<9}  {:>7}  {:>4}  {:<24}  {:<20}  {}",
                plain(&t.task_id),
                scope(&t.tenant, &t.pool),
                format!("{} {}", plain(&t.agent), plain(&t.agent_version)),
                task_status(t.status),
                format!("{}/{}", t.attempt, t.max_attempts),
                t.priority,
                plain(&t.worker_id),
                when(t.created_at.as_ref()),
                printable(&t.status_reason),
            )?;
        }
    }
    drop(out);
    if more {
        eprintln!("showing the newest {limit} tasks; there are more (raise --limit)");
    }
    Ok(())
}

async fn cancel_task(dir: &Path, req: pb::CancelTaskRequest, json: bool) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let t = client
        .cancel_task(req)
        .await
        .map_err(rpc("CancelTask"))?
        .into_inner()
        .task
        .context("the dispatcher answered CancelTask without the task")?;
    let mut out = std::io::stdout().lock();
    if json {
        return print_json(&mut out, &task_json(&t, false));
    }
    writeln!(
        out,
        "cancelled task {}{}",
        plain(&t.task_id),
        if t.worker_id.is_empty() {
            String::new()
        } else {
            format!(" (worker {} is told to stop the run)", plain(&t.worker_id))
        }
    )?;
    write!(out, "{}", format_task(&t))?;
    Ok(())
}

/// One line per change: time, status, attempt, worker, run, outcome, reason.
fn watch_line(t: &pb::Task) -> String {
    let mut line = format!(
        "{}  {:<9}  attempt {}/{}  worker {}  run {}",
        when(t.updated_at.as_ref().or(t.created_at.as_ref())),
        task_status(t.status),
        t.attempt,
        t.max_attempts,
        plain(&t.worker_id),
        plain(&t.run_id),
    );
    if t.outcome != 0 {
        line.push_str(&format!(
            "  outcome {} (exit code {})",
            run_outcome(t.outcome),
            t.exit_code
        ));
    }
    if !t.status_reason.is_empty() {
        line.push_str(&format!("  reason: {}", printable(&t.status_reason)));
    }
    line
}

async fn watch_task(dir: &Path, tenant: String, task_id: String, json: bool) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let mut stream = client
        .watch_task(pb::WatchTaskRequest {
            tenant,
            task_id: task_id.clone(),
        })
        .await
        .map_err(rpc("WatchTask"))?
        .into_inner();
    let stop = bulkhead_mesh::shutdown::signal();
    tokio::pin!(stop);
    let mut out = std::io::stdout();
    let mut last: Option<pb::Task> = None;
    loop {
        let msg = tokio::select! {
            () = &mut stop => bail!("interrupted before task {} finished", plain(&task_id)),
            m = stream.message() => m.map_err(rpc("WatchTask"))?,
        };
        let Some(msg) = msg else { break };
        let Some(t) = msg.task else { continue };
        if json {
            print_json(&mut out, &task_json(&t, false))?;
        } else {
            if last.is_none() {
                writeln!(
                    out,
                    "task {} ({} {} in {})",
                    plain(&t.task_id),
                    plain(&t.agent),
                    plain(&t.agent_version),
                    scope(&t.tenant, &t.pool)
                )?;
            }
            writeln!(out, "{}", watch_line(&t))?;
        }
        out.flush()?;
        let done = is_final(t.status);
        last = Some(t);
        if done {
            break;
        }
    }
    let Some(t) = last else {
        bail!(
            "the dispatcher ended the watch of task {} without sending its state",
            plain(&task_id)
        );
    };
    match pb::TaskStatus::try_from(t.status) {
        Ok(pb::TaskStatus::Succeeded) => Ok(()),
        _ if is_final(t.status) => bail!(
            "task {} {}{}",
            plain(&t.task_id),
            task_status(t.status),
            if t.status_reason.is_empty() {
                String::new()
            } else {
                format!(": {}", printable(&t.status_reason))
            }
        ),
        _ => bail!(
            "the dispatcher ended the watch of task {} while it was {}",
            plain(&t.task_id),
            task_status(t.status)
        ),
    }
}

// ---------------------------------------------------------------------------
// Workers and pools.

async fn list_workers(
    dir: &Path,
    tenant: String,
    pool: String,
    state: pb::WorkerState,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let mut workers = Vec::new();
    let mut page_token = String::new();
    let mut complete = false;
    for _ in 0..MAX_PAGES {
        let resp = client
            .list_workers(pb::ListWorkersRequest {
                tenant: tenant.clone(),
                pool: pool.clone(),
                state: state as i32,
                page_size: MAX_PAGE,
                page_token: page_token.clone(),
            })
            .await
            .map_err(rpc("ListWorkers"))?
            .into_inner();
        workers.extend(resp.workers);
        if resp.next_page_token.is_empty() {
            complete = true;
            break;
        }
        if resp.next_page_token == page_token {
            bail!("the dispatcher returned the same page token twice");
        }
        page_token = resp.next_page_token;
    }
    if !complete {
        bail!(
            "more than {MAX_PAGES} pages of workers; narrow the listing with --tenant, --pool or \
             --state"
        );
    }
    let mut out = std::io::stdout().lock();
    if json {
        for w in &workers {
            print_json(&mut out, &worker_json(w))?;
        }
        return Ok(());
    }
    if workers.is_empty() {
        writeln!(out, "no workers")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24}  {:<24}  {:<12}  {:>7}  {:<15}  {:<12}  {:<20}  LABELS",
        "ID", "SCOPE", "STATE", "RUNNING", "BACKENDS", "VERSION", "LAST HEARTBEAT"
    )?;
    for w in &workers {
        writeln!(
            out,
            "{:<24}  {:<24}  {:<12}  {:>7}  {:<15}  {:<12}  {:<20}  {}",
            plain(&w.worker_id),
            scope(&w.tenant, &w.pool),
            worker_state(w.state),
            format!("{}/{}", w.running, w.max_concurrent_runs),
            w.sandbox_backends
                .iter()
                .map(|b| sandbox_backend(*b))
                .collect::<Vec<_>>()
                .join(","),
            plain(&w.version),
            when(w.last_heartbeat_at.as_ref()),
            labels_text(&w.labels),
        )?;
    }
    Ok(())
}

async fn reset_pool(dir: &Path, req: pb::ResetPoolRequest, json: bool) -> anyhow::Result<()> {
    let what = scope(&req.tenant, &req.pool);
    let revoke_workers = req.revoke_workers;
    let mut client = connect(dir).await?;
    let resp = client
        .reset_pool(req)
        .await
        .map_err(rpc("ResetPool"))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if json {
        return print_json(
            &mut out,
            &json!({
                "evicted_worker_ids": resp.evicted_worker_ids,
                "revoked_run_ids": resp.revoked_run_ids,
                "requeued_task_ids": resp.requeued_task_ids,
            }),
        );
    }
    writeln!(
        out,
        "reset {what}: {} evicted{}, {} revoked, {} queued again",
        plural(resp.evicted_worker_ids.len(), "worker", "workers"),
        if revoke_workers {
            " and their identities revoked"
        } else {
            ""
        },
        plural(resp.revoked_run_ids.len(), "run identity", "run identities"),
        plural(resp.requeued_task_ids.len(), "task", "tasks"),
    )?;
    for (label, ids) in [
        ("evicted workers", &resp.evicted_worker_ids),
        ("revoked runs", &resp.revoked_run_ids),
        ("requeued tasks", &resp.requeued_task_ids),
    ] {
        if !ids.is_empty() {
            writeln!(out, "  {label}:")?;
            for id in ids {
                writeln!(out, "    {}", plain(id))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_strictly() {
        assert_eq!(parse_label("gpu=a100"), Ok(("gpu".into(), "a100".into())));
        assert_eq!(
            parse_label("example.com/zone=eu-west=1"),
            Ok(("example.com/zone".into(), "eu-west=1".into()))
        );
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        for bad in ["gpu", "=a100", "g pu=x", "gpu:x=1", "ключ=1", "k=a\nb"] {
            assert!(parse_label(bad).is_err(), "{bad:?} was accepted");
        }
        let long_key = format!("{}=v", "k".repeat(MAX_LABEL_LEN + 1));
        assert!(parse_label(&long_key).is_err());
        assert!(parse_label(&format!("{}=v", "k".repeat(MAX_LABEL_LEN))).is_ok());
        let long_value = format!("k={}", "v".repeat(MAX_LABEL_LEN + 1));
        assert!(parse_label(&long_value).is_err());
    }

    #[test]
    fn label_sets_are_checked_as_a_whole() -> anyhow::Result<()> {
        let l = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let map = label_map(&[l("gpu", "a100"), l("tenant", "acme")], "acme", "")?;
        assert_eq!(map.len(), 2);
        assert!(label_map(&[l("gpu", "a"), l("gpu", "b")], "acme", "").is_err());
        let err = label_map(&[l("tenant", "globex")], "acme", "")
            .expect_err("another tenant")
            .to_string();
        assert!(err.contains("reserved"), "{err}");
        assert!(label_map(&[l("pool", "gpu")], "acme", "").is_err());
        assert!(label_map(&[l("pool", "gpu")], "", "gpu").is_ok());
        let many: Vec<_> = (0..=MAX_LABELS).map(|i| l(&format!("k{i}"), "v")).collect();
        assert!(label_map(&many, "acme", "").is_err());
        assert!(label_map(&many[..MAX_LABELS], "acme", "").is_ok());
        Ok(())
    }

    #[test]
    fn payloads_come_from_stdin_or_a_file_only() {
        assert_eq!(parse_stdin_marker("-"), Ok(StdinMarker));
        let err = parse_stdin_marker("{\"a\":1}").expect_err("argv payload");
        assert!(err.contains("never taken from the command line"), "{err}");
    }

    #[test]
    fn payloads_are_bounded() -> anyhow::Result<()> {
        assert_eq!(read_payload(&b"{}"[..], "stdin")?, b"{}");
        assert_eq!(read_payload(&b""[..], "stdin")?, b"");
        let max = vec![b'x'; MAX_PAYLOAD_LEN];
        assert_eq!(read_payload(&max[..], "stdin")?.len(), MAX_PAYLOAD_LEN);
        let over = vec![b'x'; MAX_PAYLOAD_LEN + 1];
        let err = read_payload(&over[..], "stdin")
            .expect_err("too large")
            .to_string();
        assert!(err.contains("larger than 1 MiB"), "{err}");
        Ok(())
    }

    #[test]
    fn timeouts_are_bounded() {
        assert_eq!(parse_timeout("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_timeout("24h"), Ok(MAX_TIMEOUT));
        assert!(parse_timeout("25h").is_err());
        assert!(parse_timeout("2d").is_err());
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn a_profile_is_the_run_level_of_the_tenant() {
        let c = run_level_cascade("acme", "default".into());
        assert!(c.system.is_none() && c.agent.is_none());
        let p = c
            .run
            .as_ref()
            .and_then(|l| l.profile.as_ref())
            .expect("a run-level profile");
        assert_eq!((p.tenant.as_str(), p.profile.as_str()), ("acme", "default"));
        assert_eq!(cascade_text(Some(&c)), "run acme/default");
        assert_eq!(cascade_text(None), "none");
    }

    #[test]
    fn codes_print_as_the_protos_name_them() {
        assert_eq!(
            code_name(tonic::Code::PermissionDenied),
            "PERMISSION_DENIED"
        );
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
        let err =
            rpc("ApproveAgent")(tonic::Status::permission_denied("you submitted it")).to_string();
        assert!(
            err.starts_with("dispatcher ApproveAgent failed: PERMISSION_DENIED: you submitted it"),
            "{err}"
        );
        assert!(err.contains("other than the one who submitted it"), "{err}");
    }

    #[test]
    fn task_json_carries_the_payload_only_when_asked() {
        let t = pb::Task {
            task_id: "t1".into(),
            tenant: "acme".into(),
            status: pb::TaskStatus::Queued as i32,
            payload: b"hi".to_vec().into(),
            payload_size: 2,
            ..Default::default()
        };
        let v = task_json(&t, true);
        assert_eq!(v["status"], "queued");
        assert_eq!(v["payload_base64"], "aGk=");
        assert_eq!(v["outcome"], Value::Null);
        assert!(task_json(&t, false).get("payload_base64").is_none());
        assert!(format_task(&t).starts_with("task t1  (queued)\n"));
    }

    #[test]
    fn table_values_cannot_drive_the_terminal() {
        assert_eq!(plain("support-bot"), "support-bot");
        assert_eq!(plain(""), "-");
        assert_eq!(plain("a\u{1b}[2Jb"), "\"a\\u{1b}[2Jb\"");
        let mut labels = HashMap::new();
        labels.insert("zone".to_owned(), "eu west".to_owned());
        labels.insert("gpu".to_owned(), "a100".to_owned());
        assert_eq!(labels_text(&labels), "gpu=a100,zone=\"eu west\"");
    }
}
