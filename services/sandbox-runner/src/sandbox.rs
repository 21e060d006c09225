//! The sandboxes of this host: each one's identity (run, tenant, owner
//! worker), state, output, launched instance and the runner's copies of its
//! credentials, and the supervisor that redacts its output, enforces its
//! timeout and kills it on request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bulkhead_mesh::spiffe::SpiffeId;
use bulkhead_proto::identity::v1 as id_pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::backend::{Event, Instance};
use crate::model::{BackendKind, Exit, ExitReason, Limits, Network, ScrubReport, State};
use crate::output::{Output, Stream};
use crate::redact::{Redactor, StreamRedactor};

/// How long released sandboxes stay listed.
pub const KEEP_RELEASED: Duration = Duration::from_secs(3600);
/// Longest exit message.
const MAX_MESSAGE: usize = 512;

/// The runner's copies of one sandbox's credentials, all zeroizing.
pub struct Secrets {
    pub values: Vec<(String, Zeroizing<Vec<u8>>)>,
    /// Holds the values' forms and the run's token, for redaction.
    pub redactor: Arc<Redactor>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field(
                "keys",
                &self.values.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// What zeroizing a sandbox's credentials did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Zeroized {
    /// Every copy is gone (no redactor was still shared).
    pub complete: bool,
    pub values: u32,
    pub keys: Vec<String>,
}

/// What a sandbox's status says now.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    pub injected_keys: Vec<String>,
    pub container_id: String,
    pub scrub: Option<ScrubReport>,
    pub released_at: Option<Instant>,
    pub zeroized: Option<Zeroized>,
}

/// What only one operation at a time may touch: start, release, abort.
#[derive(Debug, Default)]
pub struct Life {
    pub instance: Option<Arc<dyn Instance>>,
    pub supervisor: Option<tokio::task::JoinHandle<()>>,
    /// Removed from the registry (a start that failed).
    pub removed: bool,
}

/// One sandbox.
#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    seq: u64,
    pub tenant: String,
    pub run_id: String,
    /// The run's SPIFFE ID (the JWT-SVID's subject).
    pub run_spiffe: String,
    pub task_id: String,
    /// The worker that started it: the only caller besides operators that sees it.
    pub worker: SpiffeId,
    /// The worker's certificate serial, lowercase hex without leading zeros.
    pub worker_serial: Option<String>,
    pub backend: BackendKind,
    pub image: String,
    pub limits: Limits,
    pub network: Network,
    pub created_at: SystemTime,
    pub output: Arc<Output>,
    status: Mutex<Status>,
    secrets: Mutex<Option<Secrets>>,
    pub life: tokio::sync::Mutex<Life>,
    stop: CancellationToken,
    stop_reason: Mutex<Option<ExitReason>>,
    /// Set by the first revocation that covers it: one abort per sandbox.
    aborting: std::sync::atomic::AtomicBool,
}

/// What a new sandbox is made from.
#[derive(Debug)]
pub struct NewSandbox {
    pub tenant: String,
    pub run_id: String,
    pub run_spiffe: String,
    pub task_id: String,
    pub worker: SpiffeId,
    pub worker_serial: Option<String>,
    pub backend: BackendKind,
    pub image: String,
    pub limits: Limits,
    pub network: Network,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sandbox {
    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut lock(&self.status));
    }

    pub fn is_released(&self) -> bool {
        lock(&self.status).state == State::Released
    }

    /// Asks the supervisor to kill the sandbox now, for `reason` (the first
    /// reason given wins).
    pub fn request_stop(&self, reason: ExitReason) {
        lock(&self.stop_reason).get_or_insert(reason);
        self.stop.cancel();
    }

    pub fn stop_requested(&self) -> Option<ExitReason> {
        if self.stop.is_cancelled() {
            *lock(&self.stop_reason)
        } else {
            None
        }
    }

    /// True for the first caller only: several revocation entries (a worker
    /// and its runs) may cover one sandbox, which is aborted once.
    pub fn claim_abort(&self) -> bool {
        !self.aborting.swap(true, Ordering::AcqRel)
    }

    pub fn hold_secrets(&self, secrets: Secrets) {
        *lock(&self.secrets) = Some(secrets);
    }

    /// Zeroizes the runner's copies of the credentials (once; later calls
    /// return the first result).
    pub fn zeroize(&self) -> Zeroized {
        let taken = lock(&self.secrets).take();
        let Some(s) = taken else {
            return lock(&self.status).zeroized.clone().unwrap_or(Zeroized {
                complete: true,
                values: 0,
                keys: Vec::new(),
            });
        };
        let keys: Vec<String> = s.values.iter().map(|(k, _)| k.clone()).collect();
        let values = u32::try_from(s.values.len()).unwrap_or(u32::MAX);
        let Secrets {
            values: v,
            redactor,
        } = s;
        drop(v);
        // The redactor's patterns are copies too: gone only with the last holder.
        let complete = Arc::try_unwrap(redactor).map(drop).is_ok();
        let z = Zeroized {
            complete,
            values,
            keys,
        };
        lock(&self.status).zeroized = Some(z.clone());
        z
    }

    /// Whether a hard revocation entry covers this sandbox.
    pub fn covered_by(&self, r: &id_pb::Revocation) -> bool {
        use id_pb::revocation::Target;
        match &r.target {
            Some(Target::RunId(_) | Target::WorkerId(_)) => {
                !r.spiffe_id.is_empty()
                    && (r.spiffe_id == self.run_spiffe || r.spiffe_id == self.worker.as_str())
            }
            Some(Target::WholeTenant(true)) => {
                !r.spiffe_id.is_empty()
                    && (self.run_spiffe.starts_with(&r.spiffe_id)
                        || self.worker.as_str().starts_with(&r.spiffe_id))
            }
            Some(Target::Serial(s)) => self
                .worker_serial
                .as_deref()
                .is_some_and(|w| w == s.to_ascii_lowercase().trim_start_matches('0')),
            _ => false,
        }
    }
}

/// The sandboxes of this host.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<BTreeMap<String, Arc<Sandbox>>>,
    seq: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("the host's sandbox capacity is used up")]
    Full,
    #[error("the run already has a sandbox on this host")]
    RunHasSandbox,
}

impl Registry {
    /// Registers a sandbox in state STARTING, if there is room and its run
    /// has no other live sandbox.
    pub fn register(&self, new: NewSandbox, max: usize) -> Result<Arc<Sandbox>, RegisterError> {
        let mut map = lock(&self.map);
        // Released sandboxes keep their output (up to 8 MiB each) for
        // replay; they are forgotten here too, not only when someone lists,
        // or a worker starting and releasing sandboxes in a loop grows the
        // runner's memory without bound.
        forget_released(&mut map, max);
        let live = map.values().filter(|s| !s.is_released());
        let mut count = 0;
        for s in live {
            if s.run_spiffe == new.run_spiffe {
                return Err(RegisterError::RunHasSandbox);
            }
            count += 1;
        }
        if count >= max {
            return Err(RegisterError::Full);
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let id = loop {
            let id = format!("sbx-{}", hex::encode(rand::random::<[u8; 8]>()));
            if !map.contains_key(&id) {
                break id;
            }
        };
        let sb = Arc::new(Sandbox {
            id: id.clone(),
            seq,
            tenant: new.tenant,
            run_id: new.run_id,
            run_spiffe: new.run_spiffe,
            task_id: new.task_id,
            worker: new.worker,
            worker_serial: new.worker_serial,
            backend: new.backend,
            image: new.image,
            limits: new.limits,
            network: new.network,
            created_at: SystemTime::now(),
            output: Arc::new(Output::default()),
            status: Mutex::new(Status {
                state: State::Starting,
                injected_keys: Vec::new(),
                container_id: String::new(),
                scrub: None,
                released_at: None,
                zeroized: None,
            }),
            secrets: Mutex::new(None),
            life: tokio::sync::Mutex::new(Life::default()),
            stop: CancellationToken::new(),
            stop_reason: Mutex::new(None),
            aborting: std::sync::atomic::AtomicBool::new(false),
        });
        map.insert(id, sb.clone());
        Ok(sb)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Sandbox>> {
        lock(&self.map).get(id).cloned()
    }

    pub fn remove(&self, id: &str) {
        lock(&self.map).remove(id);
    }

    /// How many sandboxes are held, released ones included.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every sandbox, newest first; released ones older than [`KEEP_RELEASED`]
    /// are forgotten first.
    pub fn all(&self) -> Vec<Arc<Sandbox>> {
        let mut map = lock(&self.map);
        map.retain(|_, s| {
            s.status()
                .released_at
                .is_none_or(|at| at.elapsed() < KEEP_RELEASED)
        });
        let mut all: Vec<Arc<Sandbox>> = map.values().cloned().collect();
        all.sort_by_key(|s| std::cmp::Reverse(s.seq));
        all
    }

    /// The live sandboxes a hard revocation covers.
    pub fn covered_by(&self, r: &id_pb::Revocation) -> Vec<Arc<Sandbox>> {
        lock(&self.map)
            .values()
            .filter(|s| !s.is_released() && s.covered_by(r))
            .cloned()
            .collect()
    }
}

/// Forgets released sandboxes older than [`KEEP_RELEASED`], and all but the
/// newest `keep` of the others.
fn forget_released(map: &mut BTreeMap<String, Arc<Sandbox>>, keep: usize) {
    map.retain(|_, s| {
        s.status()
            .released_at
            .is_none_or(|at| at.elapsed() < KEEP_RELEASED)
    });
    let mut released: Vec<(u64, String)> = map
        .values()
        .filter(|s| s.status().released_at.is_some())
        .map(|s| (s.seq, s.id.clone()))
        .collect();
    if released.len() > keep {
        released.sort_unstable();
        for (_, id) in &released[..released.len() - keep] {
            map.remove(id);
        }
    }
}

impl Sandbox {
    /// The sandbox's position in the list, for paging (newest is highest).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

fn message(reason: ExitReason, code: i32, signal: i32) -> String {
    let mut m = match reason {
        ExitReason::Exited if signal != 0 => format!("the agent was killed by signal {signal}"),
        ExitReason::Exited => format!("the agent exited with code {code}"),
        ExitReason::TimedOut => "killed at the end of limits.timeout".to_owned(),
        ExitReason::OomKilled => "killed for exceeding limits.memory_bytes".to_owned(),
        ExitReason::Revoked => "killed by a hard revocation".to_owned(),
        ExitReason::Released => "killed by ReleaseSandbox".to_owned(),
        ExitReason::Failed => "the runner lost the sandbox".to_owned(),
    };
    m.truncate(MAX_MESSAGE);
    m
}

/// Supervises one launched sandbox until its process ends: redacts its
/// output into the buffer, kills it at its timeout or when asked, records how
/// it ended, and then zeroizes the runner's copies of its credentials.
pub async fn supervise(
    sb: Arc<Sandbox>,
    instance: Arc<dyn Instance>,
    mut events: mpsc::Receiver<Event>,
    redactor: Arc<Redactor>,
    deadline: tokio::time::Instant,
) {
    let mut out = StreamRedactor::new(redactor.clone());
    let mut err = StreamRedactor::new(redactor.clone());
    let timeout = tokio::time::sleep_until(deadline);
    tokio::pin!(timeout);
    let mut killed: Option<ExitReason> = None;
    let ended = loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Stdout(b)) => sb.output.push(Stream::Stdout, &out.push(&b)),
                Some(Event::Stderr(b)) => sb.output.push(Stream::Stderr, &err.push(&b)),
                Some(Event::Ended(end)) => break Some(end),
                None => break None,
            },
            () = &mut timeout, if killed.is_none() => {
                killed = Some(ExitReason::TimedOut);
                if let Err(e) = instance.kill().await {
                    tracing::error!(sandbox = %sb.id, error = %e, "could not kill a sandbox at its timeout");
                }
            }
            () = sb.stop.cancelled(), if killed.is_none() => {
                killed = Some(sb.stop_requested().unwrap_or(ExitReason::Released));
                if let Err(e) = instance.kill().await {
                    tracing::error!(sandbox = %sb.id, error = %e, "could not kill a sandbox");
                }
            }
        }
    };
    sb.output.push(Stream::Stdout, &out.finish());
    sb.output.push(Stream::Stderr, &err.finish());
    let (reason, code, signal) = match &ended {
        Some(end) => {
            let reason = match killed {
                Some(r) => r,
                None if end.oom_killed => ExitReason::OomKilled,
                None => ExitReason::Exited,
            };
            (reason, end.code, end.signal)
        }
        None => (killed.unwrap_or(ExitReason::Failed), -1, 0),
    };
    let mut msg = message(reason, code, signal);
    if let Some(extra) = ended
        .as_ref()
        .map(|e| e.message.as_str())
        .filter(|m| !m.is_empty())
    {
        msg = format!("{msg}: {}", redactor.redact_str(extra));
        msg.truncate(MAX_MESSAGE);
    }
    sb.output.finish(Exit {
        reason,
        code,
        signal,
        message: msg,
        at: SystemTime::now(),
    });
    sb.update(|s| {
        if matches!(s.state, State::Starting | State::Running) {
            s.state = State::Exited;
        }
    });
    drop(out);
    drop(err);
    drop(redactor);
    // Nothing more to redact: the copies go now, not at release.
    sb.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NetworkMode;

    fn new(run: &str) -> NewSandbox {
        NewSandbox {
            tenant: "acme".into(),
            run_id: run.into(),
            run_spiffe: format!("spiffe://td/tenant/acme/run/{run}"),
            task_id: String::new(),
            worker: SpiffeId::parse("spiffe://td/tenant/acme/worker/w1").expect("id"),
            worker_serial: None,
            backend: BackendKind::Process,
            image: "/bin/true".into(),
            limits: Limits {
                memory_bytes: 0,
                cpu_millis: 0,
                pids: 0,
                timeout: Duration::from_secs(1),
            },
            network: Network {
                mode: NetworkMode::None,
                allowed: Vec::new(),
            },
        }
    }

    fn release(sb: &Sandbox) {
        sb.update(|s| {
            s.state = State::Released;
            s.released_at = Some(Instant::now());
        });
    }

    /// A worker that starts and releases sandboxes in a loop (each holding
    /// up to 8 MiB of output) does not grow the registry without bound,
    /// whether or not anyone lists.
    #[test]
    fn released_sandboxes_are_forgotten_without_a_list() {
        let reg = Registry::default();
        let mut newest = String::new();
        for i in 0..100 {
            let sb = reg.register(new(&format!("r{i}")), 4).expect("room");
            release(&sb);
            newest = sb.id.clone();
        }
        assert!(reg.len() <= 5, "{} sandboxes held", reg.len());
        assert!(reg.get(&newest).is_some(), "the newest stays listed");
        // Live ones are never forgotten.
        let live: Vec<_> = (0..4)
            .map(|i| reg.register(new(&format!("live{i}")), 4).expect("room"))
            .collect();
        for _ in 0..3 {
            let sb = reg.register(new("churn"), 8).expect("room");
            release(&sb);
        }
        assert!(live.iter().all(|s| reg.get(&s.id).is_some()));
    }
}
