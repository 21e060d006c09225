//! The claim stream's state machine.
//!
//! One task owns every piece of state — the leases the worker holds, the
//! connection, the mode — and reacts to one event at a time: a message from
//! the dispatcher, a run that ended, a heartbeat tick, a timer, a signal. Runs
//! live outside it (spawned tasks) and outlive streams: when the stream breaks
//! the worker reconnects with jittered backoff, lists every lease it holds in
//! the first heartbeat of the new stream, and re-sends every report the
//! dispatcher has not acknowledged.
//!
//! Lease life cycle, keyed by (task, attempt):
//! `Assigned` (accepted with a CSR, waiting for the run SVID) → `Running` →
//! `Reported` (waiting for the acknowledgement) → gone.

use std::collections::BTreeMap;
use std::future::{Future, pending};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bulkhead_mesh::client::{self, MeshChannel};
use bulkhead_mesh::svid;
use bulkhead_mesh::tls::{ExpectServer, Identity};
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_proto::sandbox::v1::SandboxBackend;
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::WorkerError;
use crate::backoff::Backoff;
use crate::config::WorkerConfig;
use crate::failure::{Failure, classify, classify_error};
use crate::keys::{self, KeyAndCsr};
use crate::run::{AgentSpec, Backend, Outcome, RunCredentials, RunResult, RunSpec, Runner};

/// Messages queued for the dispatcher before the worker counts the stream as
/// stuck and opens a new one.
const OUTBOUND_CAPACITY: usize = 1024;
/// A stream that lived this long resets the reconnect backoff.
const HEALTHY_STREAM: Duration = Duration::from_secs(5);
/// Used until the dispatcher says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// An assignment without a deadline or timeout gets the API's default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest deadline honoured (the API's maximum timeout plus slack).
const MAX_TIMEOUT: Duration = Duration::from_secs(25 * 3600);
/// Connecting, registering and opening the stream must not take longer.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// When the worker gives up, how long its runs get to be killed and reaped.
const ABORT_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct TaskKey {
    task_id: String,
    attempt: u32,
}

impl TaskKey {
    fn new(task_id: &str, attempt: u32) -> Self {
        Self {
            task_id: task_id.to_owned(),
            attempt,
        }
    }
}

/// Why the worker stopped a run itself.
#[derive(Debug, Clone, Copy)]
enum StopReason {
    Dispatcher(pb::CancelReason),
    Shutdown,
    DrainDeadline,
    Fatal,
}

#[derive(Debug)]
struct Assigned {
    epoch: u64,
    assignment: pb::ClaimAssignment,
    key: KeyAndCsr,
    deadline: Instant,
}

#[derive(Debug)]
struct Running {
    epoch: u64,
    run_id: String,
    cancel: CancellationToken,
    stopped: Option<StopReason>,
}

#[derive(Debug)]
enum Entry {
    Assigned(Box<Assigned>),
    Running(Running),
    Reported(pb::ClaimReport),
}

impl Entry {
    fn epoch(&self) -> u64 {
        match self {
            Entry::Assigned(a) => a.epoch,
            Entry::Running(r) => r.epoch,
            Entry::Reported(r) => r.lease_epoch,
        }
    }

    fn is_active(&self) -> bool {
        !matches!(self, Entry::Reported(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Taking work.
    Serving,
    /// Told to drain: finishing what runs, taking nothing new.
    Draining { deadline: Option<Instant> },
    /// Asked to stop (a signal): finishing what runs, up to the grace period.
    Stopping { grace_until: Instant },
}

#[derive(Debug)]
struct RunDone {
    key: TaskKey,
    epoch: u64,
    result: RunResult,
}

/// What RegisterWorker answered.
#[derive(Debug, Clone, Copy)]
struct Registration {
    lease_duration: Duration,
    heartbeat_interval: Duration,
}

#[derive(Debug)]
struct Opened {
    inbound: tonic::Streaming<pb::ClaimResponse>,
    registration: Option<Registration>,
    // Held so the connection lives as long as the stream.
    _client: DispatcherServiceClient<MeshChannel>,
}

#[derive(Debug)]
enum OpenError {
    Connect(client::ConnectError),
    Register(tonic::Status),
    Claim(tonic::Status),
    TimedOut,
}

type Opening = Pin<Box<dyn Future<Output = Result<Opened, OpenError>> + Send>>;

// One event lives on the stack per turn of the loop; boxing would only add
// an allocation per message.
#[allow(clippy::large_enum_variant)]
enum Event {
    Shutdown,
    Fatal(WorkerError),
    RunDone(RunDone),
    Inbound(Result<Option<pb::ClaimResponse>, tonic::Status>),
    Opened(Result<Opened, OpenError>),
    Heartbeat,
    Wake,
}

/// The worker's claim loop. Build with [`ClaimLoop::new`], drive with
/// [`ClaimLoop::run`].
pub(crate) struct ClaimLoop {
    config: Arc<WorkerConfig>,
    runner: Arc<dyn Runner>,
    identity: watch::Receiver<Identity>,
    fatal: mpsc::Receiver<WorkerError>,

    tasks: BTreeMap<TaskKey, Entry>,
    done_tx: mpsc::UnboundedSender<RunDone>,
    done_rx: mpsc::UnboundedReceiver<RunDone>,
    mode: Mode,

    registration: Option<Registration>,
    need_register: bool,
    /// Where messages to the dispatcher go: set while connecting (the first
    /// messages wait in it) and while connected.
    out: Option<mpsc::Sender<pb::ClaimRequest>>,
    opening: Option<Opening>,
    inbound: Option<tonic::Streaming<pb::ClaimResponse>>,
    heartbeat: Option<Interval>,
    connected_at: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Backoff,
    auth_failures: u32,
    /// Credits granted on this stream and not yet used by an assignment.
    outstanding_credits: u32,
    /// When stopping or draining with nothing running: the last moment to
    /// wait for report acknowledgements.
    finish_by: Option<Instant>,
}

impl std::fmt::Debug for ClaimLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimLoop")
            .field("mode", &self.mode)
            .field("tasks", &self.tasks.len())
            .field("connected", &self.inbound.is_some())
            .finish()
    }
}

impl ClaimLoop {
    pub(crate) fn new(
        config: Arc<WorkerConfig>,
        runner: Arc<dyn Runner>,
        identity: watch::Receiver<Identity>,
        fatal: mpsc::Receiver<WorkerError>,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let backoff = Backoff::new(config.reconnect);
        Self {
            config,
            runner,
            identity,
            fatal,
            tasks: BTreeMap::new(),
            done_tx,
            done_rx,
            mode: Mode::Serving,
            registration: None,
            need_register: true,
            out: None,
            opening: None,
            inbound: None,
            heartbeat: None,
            connected_at: None,
            retry_at: Some(Instant::now()),
            backoff,
            auth_failures: 0,
            outstanding_credits: 0,
            finish_by: None,
        }
    }

    /// Runs until drained or stopped (`Ok`), or until the worker's identity is
    /// refused for good (`Err`).
    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        loop {
            if self.finished() {
                let unacked = self.tasks.len();
                if unacked > 0 {
                    tracing::warn!(
                        reports = unacked,
                        "stopping with reports the dispatcher has not acknowledged"
                    );
                }
                tracing::info!("worker stopped");
                return Ok(());
            }
            let wake = self.next_wake();
            let stopping = matches!(self.mode, Mode::Stopping { .. });
            let event = tokio::select! {
                () = shutdown.cancelled(), if !stopping => Event::Shutdown,
                Some(e) = self.fatal.recv() => Event::Fatal(e),
                Some(done) = self.done_rx.recv() => Event::RunDone(done),
                m = next_message(&mut self.inbound) => Event::Inbound(m),
                r = poll_opening(&mut self.opening) => Event::Opened(r),
                () = tick(&mut self.heartbeat) => Event::Heartbeat,
                () = sleep_until(wake) => Event::Wake,
            };
            match event {
                Event::Shutdown => self.begin_shutdown(),
                Event::Fatal(e) => return Err(self.abort(e).await),
                Event::RunDone(done) => self.on_run_done(done),
                Event::Inbound(Ok(Some(msg))) => self.on_message(msg),
                Event::Inbound(Ok(None)) => {
                    tracing::info!("the dispatcher closed the claim stream");
                    if let Err(e) = self.disconnected(Failure::Transient, "closed") {
                        return Err(self.abort(e).await);
                    }
                }
                Event::Inbound(Err(status)) => {
                    let failure = classify(&status);
                    tracing::warn!(error = %crate::failure::describe(&status), "claim stream broke");
                    let detail = crate::failure::describe(&status);
                    let failure = if failure == Failure::Invalid {
                        // A message of ours was refused; reconnecting is the
                        // best the worker can do.
                        Failure::Transient
                    } else {
                        failure
                    };
                    if let Err(e) = self.disconnected(failure, &detail) {
                        return Err(self.abort(e).await);
                    }
                }
                Event::Opened(Ok(opened)) => self.on_opened(opened),
                Event::Opened(Err(e)) => {
                    if let Err(e) = self.open_failed(e) {
                        return Err(self.abort(e).await);
                    }
                }
                Event::Heartbeat => self.send_heartbeat(),
                Event::Wake => self.on_wake(),
            }
        }
    }

    // ------------------------------------------------------------------
    // Bookkeeping

    fn active(&self) -> u32 {
        let n = self.tasks.values().filter(|e| e.is_active()).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn free_slots(&self) -> u32 {
        self.config
            .max_concurrent_runs
            .saturating_sub(self.active())
            .saturating_sub(self.outstanding_credits)
    }

    fn finished(&self) -> bool {
        if self.mode == Mode::Serving {
            return false;
        }
        if self.tasks.values().any(Entry::is_active) {
            return false;
        }
        self.tasks.is_empty() || self.finish_by.is_some_and(|t| Instant::now() >= t)
    }

    fn next_wake(&mut self) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let mut at = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        if self.out.is_none()
            && let Some(t) = self.retry_at
        {
            at(t);
        }
        for e in self.tasks.values() {
            if let Entry::Assigned(a) = e {
                at(a.deadline);
            }
        }
        // A deadline to stop runs matters only while some run is not stopped
        // yet (past it, waking for it again would spin).
        let unstopped = self
            .tasks
            .values()
            .any(|e| matches!(e, Entry::Running(r) if r.stopped.is_none()));
        match self.mode {
            Mode::Serving => {}
            Mode::Draining { deadline: Some(d) } if unstopped => at(d),
            Mode::Draining { .. } => {}
            Mode::Stopping { grace_until } if unstopped => at(grace_until),
            Mode::Stopping { .. } => {}
        }
        if self.mode != Mode::Serving && !self.tasks.values().any(Entry::is_active) {
            let t = *self
                .finish_by
                .get_or_insert_with(|| Instant::now() + self.config.report_ack_wait);
            at(t);
        }
        wake
    }

    fn on_wake(&mut self) {
        let now = Instant::now();
        if self.out.is_none() && self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            self.start_connect();
        }
        let expired: Vec<TaskKey> = self
            .tasks
            .iter()
            .filter_map(|(k, e)| match e {
                Entry::Assigned(a) if now >= a.deadline => Some(k.clone()),
                _ => None,
            })
            .collect();
        for k in expired {
            tracing::warn!(task_id = %k.task_id, attempt = k.attempt, "no run svid before the deadline; dropping the assignment");
            self.tasks.remove(&k);
        }
        match self.mode {
            Mode::Draining { deadline: Some(d) } if now >= d => {
                self.stop_runs(StopReason::DrainDeadline);
            }
            Mode::Stopping { grace_until } if now >= grace_until => {
                self.stop_runs(StopReason::Shutdown);
            }
            _ => {}
        }
        self.top_up();
    }

    fn stop_runs(&mut self, why: StopReason) {
        for (k, e) in &mut self.tasks {
            if let Entry::Running(r) = e
                && r.stopped.is_none()
            {
                tracing::info!(task_id = %k.task_id, attempt = k.attempt, reason = ?why, "stopping the run");
                r.stopped = Some(why);
                r.cancel.cancel();
            }
        }
    }

    fn begin_shutdown(&mut self) {
        let grace_until = Instant::now() + self.config.shutdown_grace;
        tracing::info!(grace = ?self.config.shutdown_grace, running = self.active(), "shutting down: taking no more work");
        self.mode = Mode::Stopping { grace_until };
        // Accepted assignments that have not started go back to the queue now
        // rather than when their lease lapses.
        let pending: Vec<TaskKey> = self
            .tasks
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Assigned(_)))
            .map(|(k, _)| k.clone())
            .collect();
        for k in pending {
            if let Some(Entry::Assigned(a)) = self.tasks.remove(&k) {
                self.finish(
                    k,
                    a.epoch,
                    RunResult::error("the worker shut down before the run started"),
                );
            }
        }
    }

    /// Stops everything at once (the worker's identity is refused): runs are
    /// killed and reaped, nothing more is reported.
    async fn abort(&mut self, e: WorkerError) -> WorkerError {
        tracing::error!(error = %e, "giving up");
        self.stop_runs(StopReason::Fatal);
        let until = Instant::now() + ABORT_WAIT;
        while self.tasks.values().any(|e| matches!(e, Entry::Running(_))) {
            match tokio::time::timeout_at(until, self.done_rx.recv()).await {
                Ok(Some(done)) => {
                    self.tasks.remove(&done.key);
                }
                Ok(None) | Err(_) => break,
            }
        }
        e
    }

    // ------------------------------------------------------------------
    // Connection

    fn send(&mut self, body: pb::claim_request::Body) {
        let Some(out) = &self.out else {
            return;
        };
        if let Err(e) = out.try_send(pb::ClaimRequest { body: Some(body) }) {
            tracing::warn!(error = %e, "the claim stream is not taking messages; reconnecting");
            // Everything unsent is derived again from the leases on the next stream.
            let _ = self.disconnected(Failure::Transient, "outbound queue full");
        }
    }

    fn leases(&self) -> Vec<pb::HeldLease> {
        let cap = usize::try_from(self.config.max_concurrent_runs).unwrap_or(usize::MAX);
        let lease = |k: &TaskKey, e: &Entry| pb::HeldLease {
            task_id: k.task_id.clone(),
            attempt: k.attempt,
            lease_epoch: e.epoch(),
        };
        // Active leases first; then those whose report awaits its
        // acknowledgement, so that they do not lapse while it is re-sent.
        let active = self.tasks.iter().filter(|(_, e)| e.is_active());
        let reported = self.tasks.iter().filter(|(_, e)| !e.is_active());
        active
            .chain(reported)
            .take(cap)
            .map(|(k, e)| lease(k, e))
            .collect()
    }

    fn send_heartbeat(&mut self) {
        let leases = self.leases();
        tracing::trace!(leases = leases.len(), "heartbeat");
        self.send(pb::claim_request::Body::Heartbeat(pb::ClaimHeartbeat {
            leases,
        }));
    }

    /// Grants every free slot as credits, while taking work.
    fn top_up(&mut self) {
        if self.mode != Mode::Serving || self.out.is_none() {
            return;
        }
        let free = self.free_slots();
        if free > 0 {
            self.outstanding_credits += free;
            self.send(pb::claim_request::Body::Credits(pb::ClaimCredits {
                slots: free,
            }));
        }
    }

    fn start_connect(&mut self) {
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        self.out = Some(tx);
        self.outstanding_credits = 0;
        // The stream opens with: credits (the free slots), a heartbeat listing
        // every lease held (they carry over streams), then every report not
        // yet acknowledged.
        self.top_up();
        self.send_heartbeat();
        let reports: Vec<pb::ClaimReport> = self
            .tasks
            .values()
            .filter_map(|e| match e {
                Entry::Reported(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        for r in reports {
            self.send(pb::claim_request::Body::Report(r));
        }
        if self.out.is_none() {
            // The queue overflowed already; `send` scheduled a retry.
            return;
        }
        let register = self.need_register.then(|| self.register_request());
        let identity = self.identity.borrow().clone();
        tracing::debug!(dispatcher = %self.config.dispatcher, register = register.is_some(), "opening the claim stream");
        let opening = open(self.config.clone(), identity, register, rx);
        self.opening = Some(Box::pin(async move {
            tokio::time::timeout(OPEN_TIMEOUT, opening)
                .await
                .unwrap_or(Err(OpenError::TimedOut))
        }));
    }

    fn register_request(&self) -> pb::RegisterWorkerRequest {
        let backends = self
            .runner
            .backends()
            .into_iter()
            .map(|b| match b {
                Backend::Docker => SandboxBackend::Docker as i32,
                Backend::Process => SandboxBackend::Process as i32,
            })
            .collect();
        pb::RegisterWorkerRequest {
            labels: self
                .config
                .labels
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            max_concurrent_runs: self.config.max_concurrent_runs,
            sandbox_backends: backends,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    fn on_opened(&mut self, opened: Opened) {
        self.opening = None;
        if let Some(reg) = opened.registration {
            tracing::info!(
                lease_duration = ?reg.lease_duration,
                heartbeat_interval = ?reg.heartbeat_interval,
                "registered with the dispatcher"
            );
            self.registration = Some(reg);
            self.need_register = false;
        }
        let period = self
            .registration
            .map_or(DEFAULT_HEARTBEAT, |r| r.heartbeat_interval);
        let mut hb = tokio::time::interval_at(Instant::now() + period, period);
        hb.set_missed_tick_behavior(MissedTickBehavior::Delay);
        self.heartbeat = Some(hb);
        self.inbound = Some(opened.inbound);
        self.connected_at = Some(Instant::now());
        self.auth_failures = 0;
        tracing::info!(
            leases = self.tasks.len(),
            credits = self.outstanding_credits,
            "claim stream open"
        );
    }

    fn open_failed(&mut self, e: OpenError) -> Result<(), WorkerError> {
        self.opening = None;
        match e {
            OpenError::Connect(e) => {
                let failure = classify_error(&e);
                tracing::warn!(error = %e, "cannot reach the dispatcher");
                self.disconnected(failure, &e.to_string())
            }
            OpenError::Register(status) => {
                tracing::warn!(error = %crate::failure::describe(&status), "registration failed");
                let detail = crate::failure::describe(&status);
                match classify(&status) {
                    // Labels or limits the dispatcher refuses: a configuration
                    // error that retrying does not fix.
                    Failure::Invalid => Err(WorkerError::Refused {
                        what: "the dispatcher refuses the registration",
                        detail,
                    }),
                    // Not registered while registering: transient.
                    Failure::NotRegistered => self.disconnected(Failure::Transient, &detail),
                    f => self.disconnected(f, &detail),
                }
            }
            OpenError::TimedOut => {
                tracing::warn!(timeout = ?OPEN_TIMEOUT, "the dispatcher did not answer in time");
                self.disconnected(Failure::Transient, "timed out")
            }
            OpenError::Claim(status) => {
                tracing::warn!(error = %crate::failure::describe(&status), "cannot open the claim stream");
                tracing::debug!(error = %crate::failure::chain(&status), "claim stream error chain");
                let detail = crate::failure::describe(&status);
                self.disconnected(classify(&status), &detail)
            }
        }
    }

    /// The stream is gone (or never opened): schedule the next attempt.
    fn disconnected(&mut self, failure: Failure, detail: &str) -> Result<(), WorkerError> {
        self.out = None;
        self.opening = None;
        self.inbound = None;
        self.heartbeat = None;
        self.outstanding_credits = 0;
        if self
            .connected_at
            .take()
            .is_some_and(|t| t.elapsed() >= HEALTHY_STREAM)
        {
            self.backoff.reset();
        }
        match failure {
            Failure::Auth => {
                self.auth_failures += 1;
                if self.auth_failures >= self.config.auth_failure_limit.max(1) {
                    return Err(WorkerError::Refused {
                        what: "the worker's identity is refused",
                        detail: format!(
                            "{} times in a row (revoked or expired?); last: {detail}",
                            self.auth_failures
                        ),
                    });
                }
            }
            Failure::NotRegistered => {
                tracing::info!("the dispatcher does not know this worker; registering again");
                self.need_register = true;
            }
            Failure::Invalid | Failure::Transient => {}
        }
        let delay = self.backoff.next_delay();
        tracing::debug!(?delay, "reconnecting after backoff");
        self.retry_at = Some(Instant::now() + delay);
        Ok(())
    }

    // ------------------------------------------------------------------
    // Messages from the dispatcher

    fn on_message(&mut self, msg: pb::ClaimResponse) {
        use pb::claim_response::Body;
        match msg.body {
            Some(Body::Assignment(a)) => self.on_assignment(a),
            Some(Body::RunSvid(s)) => self.on_run_svid(s),
            Some(Body::Cancel(c)) => self.on_cancel(&c),
            Some(Body::Drain(d)) => self.on_drain(&d),
            Some(Body::ReportAck(a)) => self.on_ack(&a),
            None => tracing::warn!("empty message on the claim stream"),
        }
    }

    fn on_assignment(&mut self, a: pb::ClaimAssignment) {
        self.outstanding_credits = self.outstanding_credits.saturating_sub(1);
        let Some(task) = a.task.as_ref().filter(|t| !t.task_id.is_empty()) else {
            tracing::warn!("assignment without a task; ignored");
            self.top_up();
            return;
        };
        let key = TaskKey::new(&task.task_id, a.attempt);
        let epoch = a.lease_epoch;
        let span = tracing::info_span!("assignment", task_id = %key.task_id, attempt = key.attempt, lease_epoch = epoch);
        let _g = span.enter();
        if let Some(held) = self.tasks.get(&key) {
            tracing::warn!(
                held_epoch = held.epoch(),
                "assignment for a lease already held; ignored"
            );
            return;
        }
        if self.mode != Mode::Serving {
            // There is no refusal message: the lease lapses and the task is
            // offered again elsewhere.
            tracing::info!("assignment while not taking work; ignored");
            return;
        }
        if self.active() >= self.config.max_concurrent_runs {
            tracing::warn!(
                running = self.active(),
                "assignment beyond the credits granted; ignored"
            );
            return;
        }
        let key_pair = match KeyAndCsr::generate() {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "cannot make a run key; assignment ignored");
                self.top_up();
                return;
            }
        };
        let deadline = deadline_of(&a);
        tracing::info!(agent = %task.agent, tenant = %task.tenant, pool = %task.pool, "accepting assignment");
        self.send(pb::claim_request::Body::Accept(pb::ClaimAccept {
            task_id: key.task_id.clone(),
            attempt: key.attempt,
            lease_epoch: epoch,
            run_csr_der: key_pair.csr_der.clone().into(),
        }));
        drop(_g);
        self.tasks.insert(
            key,
            Entry::Assigned(Box::new(Assigned {
                epoch,
                assignment: a,
                key: key_pair,
                deadline,
            })),
        );
    }

    fn on_run_svid(&mut self, s: pb::ClaimRunSvid) {
        let key = TaskKey::new(&s.task_id, s.attempt);
        let matches =
            matches!(self.tasks.get(&key), Some(Entry::Assigned(a)) if a.epoch == s.lease_epoch);
        if !matches {
            tracing::warn!(task_id = %s.task_id, attempt = s.attempt, lease_epoch = s.lease_epoch, "run svid for no held assignment; ignored");
            return;
        }
        let Some(Entry::Assigned(assigned)) = self.tasks.remove(&key) else {
            return;
        };
        let Assigned {
            epoch,
            assignment,
            key: key_pair,
            deadline,
        } = *assigned;
        let credentials = match run_credentials(&s, key_pair) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(task_id = %key.task_id, error = %e, "unusable run svid");
                self.finish(key, epoch, RunResult::error("the run svid is unusable"));
                return;
            }
        };
        let worker_identity = self.identity.borrow().clone();
        let spec = run_spec(assignment, credentials, worker_identity, deadline);
        let cancel = CancellationToken::new();
        let span = tracing::info_span!(
            "run",
            task_id = %key.task_id,
            attempt = key.attempt,
            lease_epoch = epoch,
            bulkhead.run_id = %s.run_id,
            bulkhead.tenant = %spec.tenant,
        );
        tracing::info!(parent: &span, "run started");
        self.tasks.insert(
            key.clone(),
            Entry::Running(Running {
                epoch,
                run_id: s.run_id,
                cancel: cancel.clone(),
                stopped: None,
            }),
        );
        let runner = self.runner.clone();
        let done = self.done_tx.clone();
        tokio::spawn(
            async move {
                // A runner that panics still ends its run.
                let result = match tokio::spawn(
                    async move { runner.run(spec, cancel).await }.in_current_span(),
                )
                .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "the runner failed");
                        RunResult::error("the worker's runner failed")
                    }
                };
                let _ = done.send(RunDone { key, epoch, result });
            }
            .instrument(span),
        );
    }

    fn on_cancel(&mut self, c: &pb::ClaimCancel) {
        let key = TaskKey::new(&c.task_id, c.attempt);
        let reason = pb::CancelReason::try_from(c.reason).unwrap_or(pb::CancelReason::Unspecified);
        let held = self.tasks.get(&key).map(Entry::epoch);
        if held != Some(c.lease_epoch) {
            tracing::info!(task_id = %c.task_id, attempt = c.attempt, lease_epoch = c.lease_epoch, ?held, "cancel for no held lease; ignored");
            return;
        }
        match self.tasks.get_mut(&key) {
            Some(Entry::Assigned(_)) => {
                tracing::info!(task_id = %c.task_id, attempt = c.attempt, ?reason, "assignment cancelled before it started");
                self.tasks.remove(&key);
                self.top_up();
            }
            Some(Entry::Running(r)) => {
                tracing::info!(task_id = %c.task_id, attempt = c.attempt, run_id = %r.run_id, ?reason, message = %c.message, "run cancelled");
                r.stopped.get_or_insert(StopReason::Dispatcher(reason));
                r.cancel.cancel();
            }
            Some(Entry::Reported(_)) | None => {}
        }
    }

    fn on_drain(&mut self, d: &pb::ClaimDrain) {
        if matches!(self.mode, Mode::Stopping { .. }) {
            return;
        }
        let deadline = d.deadline.map(|t| instant_of(&t));
        tracing::info!(reason = %d.reason, running = self.active(), "draining: finishing runs, taking nothing new");
        self.mode = Mode::Draining { deadline };
    }

    fn on_ack(&mut self, a: &pb::ClaimReportAck) {
        let key = TaskKey::new(&a.task_id, a.attempt);
        match self.tasks.get(&key) {
            Some(Entry::Reported(r)) if r.lease_epoch == a.lease_epoch => {
                if a.accepted {
                    tracing::info!(task_id = %a.task_id, attempt = a.attempt, "report acknowledged");
                } else {
                    let rejection = pb::ReportRejection::try_from(a.rejection)
                        .unwrap_or(pb::ReportRejection::Unspecified);
                    tracing::warn!(task_id = %a.task_id, attempt = a.attempt, ?rejection, "report refused");
                }
                self.tasks.remove(&key);
            }
            _ => {
                tracing::debug!(task_id = %a.task_id, attempt = a.attempt, "acknowledgement for no pending report")
            }
        }
    }

    // ------------------------------------------------------------------
    // Runs

    fn on_run_done(&mut self, done: RunDone) {
        let stopped = match self.tasks.get(&done.key) {
            Some(Entry::Running(r)) if r.epoch == done.epoch => r.stopped,
            _ => {
                tracing::warn!(task_id = %done.key.task_id, "a run ended that the worker no longer holds");
                return;
            }
        };
        let mut result = done.result;
        if result.outcome == Outcome::Cancelled
            && matches!(
                stopped,
                Some(StopReason::Dispatcher(pb::CancelReason::DeadlineExceeded))
            )
        {
            result.outcome = Outcome::TimedOut;
        }
        tracing::info!(
            task_id = %done.key.task_id,
            attempt = done.key.attempt,
            outcome = ?result.outcome,
            exit_code = result.exit_code,
            "run ended"
        );
        self.finish(done.key, done.epoch, result);
    }

    /// Records the attempt's report, sends it, and grants the freed slot.
    fn finish(&mut self, key: TaskKey, epoch: u64, result: RunResult) {
        let report = pb::ClaimReport {
            task_id: key.task_id.clone(),
            attempt: key.attempt,
            lease_epoch: epoch,
            outcome: outcome_pb(result.outcome) as i32,
            exit_code: result.exit_code,
            output_summary: result.output_summary,
        };
        self.tasks.insert(key, Entry::Reported(report.clone()));
        self.send(pb::claim_request::Body::Report(report));
        self.top_up();
    }
}

async fn open(
    config: Arc<WorkerConfig>,
    identity: Identity,
    register: Option<pb::RegisterWorkerRequest>,
    rx: mpsc::Receiver<pb::ClaimRequest>,
) -> Result<Opened, OpenError> {
    let ch = client::connect(
        &config.dispatcher,
        Some(&identity),
        &config.bundle,
        ExpectServer::Service("dispatcher".into()),
    )
    .await
    .map_err(OpenError::Connect)?;
    let mut client = DispatcherServiceClient::new(ch);
    let registration = match register {
        Some(req) => {
            let resp = client
                .register_worker(req)
                .await
                .map_err(OpenError::Register)?
                .into_inner();
            Some(Registration {
                lease_duration: duration_of(resp.lease_duration).unwrap_or(DEFAULT_HEARTBEAT * 3),
                heartbeat_interval: duration_of(resp.heartbeat_interval)
                    .unwrap_or(DEFAULT_HEARTBEAT)
                    .max(Duration::from_millis(10)),
            })
        }
        None => None,
    };
    let inbound = client
        .claim(ReceiverStream::new(rx))
        .await
        .map_err(OpenError::Claim)?
        .into_inner();
    Ok(Opened {
        inbound,
        registration,
        _client: client,
    })
}

async fn next_message(
    inbound: &mut Option<tonic::Streaming<pb::ClaimResponse>>,
) -> Result<Option<pb::ClaimResponse>, tonic::Status> {
    match inbound {
        Some(s) => s.message().await,
        None => pending().await,
    }
}

async fn poll_opening(opening: &mut Option<Opening>) -> Result<Opened, OpenError> {
    match opening {
        Some(f) => f.as_mut().await,
        None => pending().await,
    }
}

async fn tick(hb: &mut Option<Interval>) {
    match hb {
        Some(i) => {
            i.tick().await;
        }
        None => pending().await,
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => pending().await,
    }
}

fn duration_of(d: Option<prost_types::Duration>) -> Option<Duration> {
    let d = d?;
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    let d = Duration::new(secs, nanos);
    (!d.is_zero()).then_some(d)
}

/// The tokio instant of a wall-clock timestamp (now if it has passed).
fn instant_of(t: &prost_types::Timestamp) -> Instant {
    let now = Instant::now();
    let Ok(secs) = u64::try_from(t.seconds) else {
        return now;
    };
    let at = UNIX_EPOCH + Duration::new(secs, u32::try_from(t.nanos).unwrap_or(0));
    match at.duration_since(SystemTime::now()) {
        Ok(left) => now + left.min(MAX_TIMEOUT),
        Err(_) => now,
    }
}

fn deadline_of(a: &pb::ClaimAssignment) -> Instant {
    if let Some(t) = &a.deadline {
        return instant_of(t);
    }
    let timeout = a
        .task
        .as_ref()
        .and_then(|t| duration_of(t.timeout))
        .unwrap_or(DEFAULT_TIMEOUT)
        .min(MAX_TIMEOUT);
    Instant::now() + timeout
}

fn run_credentials(s: &pb::ClaimRunSvid, key: KeyAndCsr) -> Result<RunCredentials, String> {
    let svid_pb = s.svid.as_ref().ok_or("no svid")?;
    let chain: Vec<CertificateDer<'static>> = svid_pb
        .cert_chain_der
        .iter()
        .map(|c| CertificateDer::from(c.to_vec()))
        .collect();
    keys::check_chain_for(&chain, &key.spki).map_err(|e| e.to_string())?;
    let leaf =
        svid::validate_leaf(chain.first().ok_or("empty chain")?).map_err(|e| e.to_string())?;
    if leaf.id.principal().run() != Some(s.run_id.as_str()) {
        return Err(format!(
            "{} is not the identity of run {}",
            leaf.id, s.run_id
        ));
    }
    Ok(RunCredentials {
        run_id: s.run_id.clone(),
        spiffe_id: leaf.id,
        chain,
        key: key.key,
    })
}

fn run_spec(
    a: pb::ClaimAssignment,
    credentials: RunCredentials,
    worker_identity: Identity,
    deadline: Instant,
) -> RunSpec {
    let task = a.task.unwrap_or_default();
    let agent = a.agent.unwrap_or_default();
    RunSpec {
        task_id: task.task_id,
        attempt: a.attempt,
        lease_epoch: a.lease_epoch,
        tenant: task.tenant,
        pool: task.pool,
        agent: AgentSpec {
            name: agent.name,
            version: agent.version,
            image: agent.image,
            command: agent.command,
            requested_secret_keys: agent.requested_secret_keys,
            tool: agent.tool,
        },
        payload: task.payload,
        cascade: task.cascade,
        deadline,
        credentials,
        worker_identity,
    }
}

fn outcome_pb(o: Outcome) -> pb::RunOutcome {
    match o {
        Outcome::Succeeded => pb::RunOutcome::Succeeded,
        Outcome::Failed => pb::RunOutcome::Failed,
        Outcome::Error => pb::RunOutcome::Error,
        Outcome::Cancelled => pb::RunOutcome::Cancelled,
        Outcome::Revoked => pb::RunOutcome::Revoked,
        Outcome::TimedOut => pb::RunOutcome::TimedOut,
    }
}
