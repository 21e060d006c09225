//! The dispatch engine: connected workers and their credits, the scheduler that
//! hands queued tasks to them (fair across tenants by weight), leases, and the
//! wake-ups that tell it where work appeared.
//!
//! The scheduler is a few loops per replica (`[fleet] schedulers`). Scopes
//! (tenants and pools) with work and credited workers wait in a round-robin
//! list; a loop takes the first, hands it at most `weight × quantum` tasks,
//! and puts it at the back of the list if it could take more. A scope is
//! served by one loop at a time, so the loops overlap the store round trips
//! of different scopes' claims. A claim takes its worker's free slots before
//! it runs and gives back what it did not fill, so that a hand-off at
//! enqueue (`Engine::enqueue`), which takes a slot too, never fills the same
//! one. Since turns overlap, each scope also keeps a virtual time
//! (tasks handed per unit of weight), and one more than a quantum ahead of
//! the slowest scope with work waits for it: shares follow the weights
//! however long each scope's claims take. A scope that had no work starts
//! level with the others, so idling earns no burst. A tenant with a backlog
//! of 100,000 tasks therefore waits its turn like everyone else: another
//! tenant's first task is handed out within one round. Correctness does not rest on this loop: every claim
//! is a conditional update in the store with the scope in its WHERE clause.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_mesh::audit::{AuditClient, event};
use bulkhead_mesh::client::MeshChannel;
use bulkhead_mesh::error::Error;
use bulkhead_proto::audit::v1::{NewEvent, Outcome as AuditOutcome, QueryRequest};
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::identity::v1 as idpb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::config::FleetConfig;
use crate::convert;
use crate::model::{AgentRow, Labels, Outcome, Scope, TaskRow, TaskStatus, now_ms};
use crate::store::{ClaimBatch, DispatchStore, Inserted, Released, StoreError};
use crate::wake::Wake;

/// What the engine sends down a claim stream.
pub type ClaimTx = mpsc::Sender<Result<pb::ClaimResponse, Status>>;

/// Messages buffered per claim stream before the scheduler skips a worker.
pub const STREAM_BUFFER: usize = 256;

/// One worker's open claim stream on this replica.
#[derive(Debug)]
struct Conn {
    /// Tells a replaced stream from its successor.
    generation: u64,
    scope: Scope,
    labels: Labels,
    max_runs: u32,
    credits: u32,
    /// Its last claim found nothing that matches it as of this wake-up of
    /// its scope (see `Conns::wakes`); skipped until the next one. Credits
    /// coming back do not change that: only a wake-up puts tasks in a queue.
    starved: Option<u64>,
    draining: bool,
    /// Leases listed in its last heartbeat.
    held: u32,
    tx: ClaimTx,
}

#[derive(Debug, Default)]
struct Conns {
    by_worker: HashMap<String, Conn>,
    by_scope: HashMap<Scope, HashSet<String>>,
    /// Wake-ups of each scope so far. A claim that comes back short marks
    /// its worker starved as of the count read before the claim, so a task
    /// enqueued while the claim ran (its wake-up counted) is not lost.
    wakes: HashMap<Scope, u64>,
    next_generation: u64,
}

impl Conns {
    fn wakes_of(&self, scope: &Scope) -> u64 {
        self.wakes.get(scope).copied().unwrap_or(0)
    }

    /// Whether a worker's last claim found nothing since its scope's last
    /// wake-up.
    fn is_starved(&self, c: &Conn) -> bool {
        c.starved == Some(self.wakes_of(&c.scope))
    }
}

/// Virtual time of one task handed to a scope of weight 1.
const VTASK: u64 = 1 << 16;

#[derive(Debug, Default)]
struct Rounds {
    active: VecDeque<Scope>,
    queued: HashSet<Scope>,
    /// Scopes a loop is serving now: not handed to another loop.
    serving: HashSet<Scope>,
    /// Serving scopes woken meanwhile: queued again when their turn ends.
    again: HashSet<Scope>,
    /// Each scope's virtual time: the tasks it was handed, in `VTASK`s per
    /// unit of its weight. Several loops serve different scopes at once, so
    /// taking turns alone would share dispatch by how fast each scope's
    /// claims return, not by weight. A scope more than one quantum ahead of
    /// the slowest scope with work therefore waits (start-time fair queueing).
    vtime: HashMap<Scope, u64>,
    /// The lowest virtual time of the scopes with work, as last seen: where a
    /// scope that had none starts again, so that idling earns no credit.
    floor: u64,
}

impl Rounds {
    fn vtime_of(&self, scope: &Scope) -> u64 {
        self.vtime.get(scope).copied().unwrap_or(self.floor)
    }

    /// The lowest virtual time of the scopes queued or being served.
    fn min_vtime(&mut self) -> u64 {
        let min = self
            .active
            .iter()
            .chain(self.serving.iter())
            .map(|s| self.vtime_of(s))
            .min();
        if let Some(min) = min {
            self.floor = self.floor.max(min);
        }
        self.floor
    }

    /// Queues a scope that had no work: it starts level with the others.
    fn enter(&mut self, scope: &Scope) {
        let start = self.min_vtime().max(self.vtime_of(scope));
        self.vtime.insert(scope.clone(), start);
        self.queued.insert(scope.clone());
        self.active.push_back(scope.clone());
    }

    /// Takes the first queued scope not more than `lead` ahead of the
    /// slowest, and marks it served.
    fn take(&mut self, lead: u64) -> Option<Scope> {
        let limit = self.min_vtime().saturating_add(lead);
        let i = self.active.iter().position(|s| self.vtime_of(s) <= limit)?;
        let scope = self.active.remove(i)?;
        self.queued.remove(&scope);
        self.serving.insert(scope.clone());
        Some(scope)
    }

    /// Charges a scope for tasks handed over at enqueue: only one in the
    /// round, competing with others, has a share to keep; one outside it
    /// would pile up a debt it pays back when it next has a backlog.
    fn charge_hand_off(&mut self, scope: &Scope, weight: u32) {
        if self.queued.contains(scope) || self.serving.contains(scope) {
            self.charge(scope, 1, weight);
        }
    }

    /// Charges a scope for `handed` tasks at `weight`.
    fn charge(&mut self, scope: &Scope, handed: u32, weight: u32) {
        let charge = u64::from(handed).saturating_mul(VTASK) / u64::from(weight.max(1));
        let v = self.vtime_of(scope).saturating_add(charge);
        self.vtime.insert(scope.clone(), v);
    }

    /// Ends a scope's turn, charging it for `handed` tasks at `weight`.
    /// Returns whether it was woken meanwhile.
    fn end_turn(&mut self, scope: &Scope, handed: u32, weight: u32) -> bool {
        self.charge(scope, handed, weight);
        self.serving.remove(scope);
        if handed == 0 {
            // It could use nothing (no task its workers match, say): it must
            // not hold the others back while it stays in the round.
            let others = self
                .active
                .iter()
                .chain(self.serving.iter())
                .filter(|s| *s != scope)
                .map(|s| self.vtime_of(s))
                .min();
            if let Some(others) = others {
                let v = self.vtime_of(scope).max(others);
                self.vtime.insert(scope.clone(), v);
            }
        }
        self.again.remove(scope)
    }

    /// Queues a scope whose turn just ended with work left: it keeps its
    /// virtual time.
    fn requeue(&mut self, scope: &Scope) {
        if self.queued.insert(scope.clone()) {
            self.active.push_back(scope.clone());
        }
    }
}

/// What one scope's turn did.
#[derive(Debug, Default)]
struct Turn {
    /// Its workers could take more.
    more: bool,
    /// Tasks handed out.
    handed: u32,
}

/// The caller of a worker RPC, from its SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdent {
    pub worker_id: String,
    pub spiffe_id: String,
    pub scope: Scope,
}

/// The audit event of an enqueue.
pub const ENQUEUED: &str = "task.enqueued";
/// The audit event of an enqueue audit recorded but whose task will not
/// exist (its insert failed).
pub const ABANDONED: &str = "task.enqueue_abandoned";

/// How long an Enqueue waits for audit's record at most.
const RECORD_TIMEOUT: Duration = Duration::from_secs(20);

/// How far around a held task's creation its `task.enqueued` record is
/// looked for: the record is asked for as the row is inserted and lands
/// within `RECORD_TIMEOUT` (or a keyed insert's time before it), give or
/// take the skew between the dispatcher's and audit's clocks.
const SETTLE_MARGIN_MS: i64 = 60 * 1000;

/// Why an enqueue failed.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// Audit could not record it: nothing was enqueued.
    #[error(transparent)]
    Audit(Error),
    #[error(transparent)]
    Store(StoreError),
    #[error("{0}")]
    Internal(String),
}

/// A task as the settling pass will queue it.
fn queued(task: TaskRow) -> TaskRow {
    TaskRow {
        status: TaskStatus::Queued,
        worker_id: String::new(),
        attempt: 0,
        lease_expires_at_ms: None,
        deadline_at_ms: None,
        ..task
    }
}

/// What a settling pass did (see `Engine::settle_held`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub queued: usize,
    pub deleted: usize,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn DispatchStore>,
    audit: AuditClient,
    /// This dispatcher's SPIFFE ID: the actor of what it records in audit.
    actor: String,
    identity: IdentityServiceClient<MeshChannel>,
    fleet: FleetConfig,
    conns: Mutex<Conns>,
    rounds: Mutex<Rounds>,
    work: Notify,
    agents: Mutex<HashMap<(String, String), AgentRow>>,
    latest: Mutex<HashMap<String, (std::time::Instant, AgentRow)>>,
    changes: broadcast::Sender<String>,
    wake: Wake,
    draining: CancellationToken,
}

/// The engine, cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub struct Parts {
    pub store: Arc<dyn DispatchStore>,
    pub audit: AuditClient,
    /// This dispatcher's own SPIFFE ID (it reads back its own audit events).
    pub actor: String,
    pub identity: IdentityServiceClient<MeshChannel>,
    pub fleet: FleetConfig,
    pub wake: Wake,
    /// Cancelled when the server starts draining: every stream gets a drain.
    pub draining: CancellationToken,
}

impl Engine {
    /// Builds the engine and starts its loops (scheduler, reaper, poller,
    /// wake-up listener), which end with `stop`.
    pub fn start(parts: Parts, stop: CancellationToken) -> Engine {
        let (changes, _) = broadcast::channel(4096);
        let engine = Engine {
            inner: Arc::new(Inner {
                store: parts.store,
                audit: parts.audit,
                actor: parts.actor,
                identity: parts.identity,
                fleet: parts.fleet,
                conns: Mutex::new(Conns::default()),
                rounds: Mutex::new(Rounds::default()),
                work: Notify::new(),
                agents: Mutex::new(HashMap::new()),
                latest: Mutex::new(HashMap::new()),
                changes,
                wake: parts.wake,
                draining: parts.draining,
            }),
        };
        for _ in 0..engine.inner.fleet.schedulers.max(1) {
            tokio::spawn(engine.clone().schedule(stop.clone()));
        }
        tokio::spawn(engine.clone().reap(stop.clone()));
        tokio::spawn(engine.clone().settle(stop.clone()));
        tokio::spawn(engine.clone().poll(stop.clone()));
        tokio::spawn(engine.clone().listen(stop.clone()));
        tokio::spawn(engine.clone().drain_on_shutdown(stop));
        engine
    }

    pub fn store(&self) -> &Arc<dyn DispatchStore> {
        &self.inner.store
    }

    pub fn audit(&self) -> &AuditClient {
        &self.inner.audit
    }

    pub fn fleet(&self) -> &FleetConfig {
        &self.inner.fleet
    }

    /// Task ids whose state changed on this replica (WatchTask also polls,
    /// for changes made on other replicas).
    pub fn subscribe_changes(&self) -> broadcast::Receiver<String> {
        self.inner.changes.subscribe()
    }

    fn changed(&self, task_id: &str) {
        let _ = self.inner.changes.send(task_id.to_owned());
    }

    /// Tells local watchers that a task changed.
    pub fn notify_changed(&self, task_id: &str) {
        self.changed(task_id);
    }

    /// How many leases the worker listed in its last heartbeat here.
    pub fn held(&self, worker_id: &str) -> u32 {
        lock(&self.inner.conns)
            .by_worker
            .get(worker_id)
            .map_or(0, |c| c.held)
    }

    /// Ends a stream of this generation with an error status.
    pub fn fail_stream(&self, worker_id: &str, generation: u64, status: Status) {
        let tx = lock(&self.inner.conns)
            .by_worker
            .get(worker_id)
            .filter(|c| c.generation == generation)
            .map(|c| c.tx.clone());
        if let Some(tx) = tx {
            let _ = tx.try_send(Err(status));
        }
    }

    /// Tells the worker holding a lease to stop it, here or on the replica
    /// that holds its stream.
    pub fn cancel_lease(&self, task: &TaskRow, reason: pb::CancelReason, why: &str) {
        let cancel = cancel_msg(&task.task_id, task.attempt, task.lease_epoch, reason, why);
        if !self.send_to(&task.worker_id, cancel) {
            self.inner.wake.publish_cancel(
                &task.worker_id,
                &task.task_id,
                task.attempt,
                task.lease_epoch,
            );
        }
    }

    /// Evicts a worker here and on every other replica.
    pub fn evict_everywhere(&self, worker_id: &str, why: &str) {
        self.evict_local(worker_id, why);
        self.inner.wake.publish_evict(worker_id);
    }

    // ---- wake-ups -----------------------------------------------------------

    /// Work may have appeared in `scope`: here, and on every replica.
    pub fn announce(&self, scope: &Scope) {
        self.wake_local(scope);
        self.inner.wake.publish_scope(scope);
    }

    /// Work may have appeared in `scope`: try its workers again.
    pub fn wake_local(&self, scope: &Scope) {
        let ready = {
            let mut conns = lock(&self.inner.conns);
            *conns.wakes.entry(scope.clone()).or_insert(0) += 1;
            conns
                .by_scope
                .get(scope)
                .into_iter()
                .flatten()
                .filter_map(|id| conns.by_worker.get(id))
                .any(|c| c.credits > 0 && !c.draining)
        };
        // A scope being served counts too, whatever its free slots: its turn
        // may hold them (taken for a claim), and gives back what it did not
        // fill when it ends.
        self.activate_if(scope, ready);
    }

    fn activate(&self, scope: &Scope) {
        self.activate_if(scope, true);
    }

    /// Queues a scope for a turn if `ready`; one being served is queued again
    /// when its turn ends, ready or not.
    fn activate_if(&self, scope: &Scope, ready: bool) {
        let mut rounds = lock(&self.inner.rounds);
        if rounds.serving.contains(scope) {
            rounds.again.insert(scope.clone());
            return;
        }
        if ready && !rounds.queued.contains(scope) {
            rounds.enter(scope);
            drop(rounds);
            self.inner.work.notify_one();
        }
    }

    /// Handles a message another replica published.
    pub fn on_remote(&self, msg: crate::wake::Message) {
        use crate::wake::Message;
        match msg {
            Message::Scope(scope) => self.wake_local(&scope),
            Message::Cancel {
                worker_id,
                task_id,
                attempt,
                lease_epoch,
            } => {
                let cancel = cancel_msg(
                    &task_id,
                    attempt,
                    lease_epoch,
                    pb::CancelReason::Requested,
                    "the task was cancelled",
                );
                self.send_to(&worker_id, cancel);
            }
            Message::Evict { worker_id } => self.evict_local(&worker_id, "the worker was evicted"),
        }
    }

    // ---- claim streams ------------------------------------------------------

    /// Opens a claim stream for a registered worker, replacing its previous
    /// one on this replica. Returns the generation and the receiver the
    /// response stream reads.
    pub fn open_stream(
        &self,
        who: &WorkerIdent,
        labels: Labels,
        max_runs: u32,
    ) -> (u64, mpsc::Receiver<Result<pb::ClaimResponse, Status>>) {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut conns = lock(&self.inner.conns);
        conns.next_generation += 1;
        let generation = conns.next_generation;
        if let Some(old) = conns.by_worker.remove(&who.worker_id) {
            let _ = old.tx.try_send(Err(Status::aborted(
                "replaced by a newer claim stream of the same worker",
            )));
            if old.scope != who.scope
                && let Some(ids) = conns.by_scope.get_mut(&old.scope)
            {
                ids.remove(&who.worker_id);
            }
        }
        conns.by_worker.insert(
            who.worker_id.clone(),
            Conn {
                generation,
                scope: who.scope.clone(),
                labels,
                max_runs,
                credits: 0,
                starved: None,
                draining: self.inner.draining.is_cancelled(),
                held: 0,
                tx,
            },
        );
        conns
            .by_scope
            .entry(who.scope.clone())
            .or_default()
            .insert(who.worker_id.clone());
        (generation, rx)
    }

    /// The stream of this generation ended.
    pub fn close_stream(&self, worker_id: &str, generation: u64) -> bool {
        let mut conns = lock(&self.inner.conns);
        let current = conns
            .by_worker
            .get(worker_id)
            .is_some_and(|c| c.generation == generation);
        if current
            && let Some(c) = conns.by_worker.remove(worker_id)
            && let Some(set) = conns.by_scope.get_mut(&c.scope)
        {
            set.remove(worker_id);
            if set.is_empty() {
                conns.by_scope.remove(&c.scope);
            }
        }
        current
    }

    /// Whether the worker has a claim stream open on this replica.
    pub fn is_connected(&self, worker_id: &str) -> bool {
        lock(&self.inner.conns).by_worker.contains_key(worker_id)
    }

    /// A re-registration changed the worker's labels or capacity.
    pub fn update_worker(&self, worker_id: &str, labels: &Labels, max_runs: u32) {
        let mut conns = lock(&self.inner.conns);
        if let Some(c) = conns.by_worker.get_mut(worker_id) {
            c.labels = labels.clone();
            c.max_runs = max_runs;
            c.credits = c.credits.min(max_runs);
            c.starved = None;
        }
    }

    /// More free slots; the total is capped at the worker's maximum.
    pub fn add_credits(&self, worker_id: &str, slots: u32) {
        let scope = {
            let mut conns = lock(&self.inner.conns);
            let Some(c) = conns.by_worker.get_mut(worker_id) else {
                return;
            };
            c.credits = c.credits.saturating_add(slots).min(c.max_runs);
            let c = &conns.by_worker[worker_id];
            (c.credits > 0 && !c.draining && !conns.is_starved(c)).then(|| c.scope.clone())
        };
        if let Some(scope) = scope {
            self.activate(&scope);
        }
    }

    /// Sends a message down a worker's stream, if it is open here.
    pub fn send_to(&self, worker_id: &str, msg: pb::ClaimResponse) -> bool {
        let tx = lock(&self.inner.conns)
            .by_worker
            .get(worker_id)
            .map(|c| c.tx.clone());
        tx.is_some_and(|tx| tx.try_send(Ok(msg)).is_ok())
    }

    /// Drains and closes a worker's stream here (a pool reset), ending it with
    /// FAILED_PRECONDITION.
    pub fn evict_local(&self, worker_id: &str, why: &str) {
        let conn = {
            let mut conns = lock(&self.inner.conns);
            let c = conns.by_worker.remove(worker_id);
            if let Some(c) = &c
                && let Some(set) = conns.by_scope.get_mut(&c.scope)
            {
                set.remove(worker_id);
            }
            c
        };
        if let Some(c) = conns_drop(conn) {
            let _ = c.try_send(Ok(pb::ClaimResponse {
                body: Some(pb::claim_response::Body::Drain(pb::ClaimDrain {
                    reason: why.to_owned(),
                    deadline: Some(convert::ts(now_ms())),
                })),
            }));
            let _ = c.try_send(Err(Status::failed_precondition(format!(
                "evicted: {why}; register again"
            ))));
        }
    }

    /// Stops offering work to these workers here (a pool reset in progress).
    pub fn drain_local(&self, worker_ids: &[String], why: &str) {
        let txs: Vec<ClaimTx> = {
            let mut conns = lock(&self.inner.conns);
            let mut txs = Vec::new();
            for id in worker_ids {
                if let Some(c) = conns.by_worker.get_mut(id) {
                    c.draining = true;
                    txs.push(c.tx.clone());
                }
            }
            txs
        };
        for tx in txs {
            let _ = tx.try_send(Ok(pb::ClaimResponse {
                body: Some(pb::claim_response::Body::Drain(pb::ClaimDrain {
                    reason: why.to_owned(),
                    deadline: Some(convert::ts(now_ms())),
                })),
            }));
        }
    }

    async fn drain_on_shutdown(self, stop: CancellationToken) {
        tokio::select! {
            () = self.inner.draining.cancelled() => {}
            () = stop.cancelled() => return,
        }
        let ids: Vec<String> = lock(&self.inner.conns).by_worker.keys().cloned().collect();
        self.drain_local(&ids, "the dispatcher is shutting down");
    }

    // ---- the scheduler ------------------------------------------------------

    async fn schedule(self, stop: CancellationToken) {
        let lead = u64::from(self.inner.fleet.quantum.max(1)).saturating_mul(VTASK);
        let mut rotation: u64 = 0;
        loop {
            // Registered before looking, so that a turn ending or a scope
            // arriving meanwhile is not missed.
            let notified = self.inner.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = lock(&self.inner.rounds).take(lead);
            let Some(scope) = next else {
                tokio::select! {
                    () = notified => continue,
                    () = stop.cancelled() => return,
                }
            };
            rotation = rotation.wrapping_add(1);
            let weight = self.weight(&scope);
            let served = self.serve_scope(&scope, weight, rotation).await;
            match served {
                Ok(turn) => self.end_turn(&scope, turn.handed, weight, turn.more),
                Err(e) => {
                    tracing::warn!(scope = %scope, error = %e, "claim failed; retrying the scope shortly");
                    lock(&self.inner.rounds).end_turn(&scope, 0, weight);
                    self.inner.work.notify_waiters();
                    let engine = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        engine.wake_local(&scope);
                    });
                }
            }
        }
    }

    /// Ends a scope's turn: charges it for what it was handed, queues it
    /// again if it has work left or was woken meanwhile, and lets loops
    /// waiting for the slowest scope to move on look again.
    fn end_turn(&self, scope: &Scope, handed: u32, weight: u32, more: bool) {
        {
            let mut rounds = lock(&self.inner.rounds);
            if rounds.end_turn(scope, handed, weight) || more {
                rounds.requeue(scope);
            }
        }
        self.inner.work.notify_waiters();
    }

    // ---- enqueue ----------------------------------------------------------------

    /// Puts a new task in the store, recording `record` (its `task.enqueued`
    /// event) in audit at the same time: the task is inserted *held* (see
    /// `TaskStatus::Held`) while audit writes, and released once both are
    /// durable, so that an Enqueue waits for the slower of the two commits
    /// instead of both in a row. A task audit could not record is deleted
    /// and the Enqueue fails; one a crash left held is settled against audit
    /// later (`settle_held`). With an idempotency key the insert goes first,
    /// so that audit records only a task that was inserted.
    ///
    /// When a worker of its scope on this replica has a free slot, matches
    /// its labels and found nothing to take at its last claim (so no queued
    /// task waits for it), the task is released already assigned to that
    /// worker and pushed to it at once: the scheduler's claim, a write and a
    /// wake-up, is saved. The slot is taken first, as the scheduler takes
    /// slots before it claims, so the two never fill one slot twice, and the
    /// scope's share is charged. Otherwise the task is queued and the
    /// scheduler is woken.
    pub async fn enqueue(
        &self,
        mut row: TaskRow,
        dedup_since_ms: i64,
        record: NewEvent,
    ) -> Result<Inserted, EnqueueError> {
        let slot = if self.inner.fleet.hand_off {
            self.slot_for(&row.scope, &row.labels)
        } else {
            None
        };
        row.status = TaskStatus::Held;
        // Stamped as the insert and the record start, so that the settling
        // pass finds the record near it (a snapshot may have taken a while).
        row.created_at_ms = now_ms();
        row.updated_at_ms = row.created_at_ms;
        if let Some((worker_id, _)) = &slot {
            // As a claim would set them; the lease is set at the release.
            row.attempt = 1;
            row.lease_epoch = 1;
            row.worker_id = worker_id.clone();
        }
        let engine = self.clone();
        let taken = slot.clone();
        // Spawned, so that once under way the enqueue ends the same whether
        // or not its caller waits: a slot comes back, a task audit did not
        // record is deleted.
        let spawned =
            tokio::spawn(
                async move { engine.enqueue_held(row, dedup_since_ms, record, slot).await },
            );
        match spawned.await {
            Ok(result) => result,
            Err(e) => {
                if let Some((worker_id, generation)) = &taken {
                    self.give_slots_back(worker_id, *generation, 1);
                }
                Err(EnqueueError::Internal(format!(
                    "the enqueue task failed: {e}"
                )))
            }
        }
    }

    /// `enqueue`, once spawned; `slot` is the hand-off's, if any, and every
    /// path either fills it or gives it back.
    async fn enqueue_held(
        &self,
        row: TaskRow,
        dedup_since_ms: i64,
        record: NewEvent,
        slot: Option<(String, u64)>,
    ) -> Result<Inserted, EnqueueError> {
        let give_back = |slot: &Option<(String, u64)>| {
            if let Some((worker_id, generation)) = slot {
                self.give_slots_back(worker_id, *generation, 1);
            }
        };
        // `None`: audit was not asked (a keyed insert found its task, or
        // failed).
        let (inserted, recorded) = if row.idempotency_key.is_empty() {
            let (inserted, recorded) = tokio::join!(
                self.insert_held(&row, dedup_since_ms),
                self.record_enqueue(record)
            );
            (inserted, Some(recorded))
        } else {
            match self.insert_held(&row, dedup_since_ms).await {
                Ok(Inserted::New(t)) => (
                    Ok(Inserted::New(t)),
                    Some(self.record_enqueue(record).await),
                ),
                other => (other, None),
            }
        };
        let held = match inserted {
            Ok(Inserted::New(t)) => t,
            Ok(Inserted::Existing(t)) => {
                give_back(&slot);
                return Ok(Inserted::Existing(t));
            }
            Err(e) => {
                give_back(&slot);
                if matches!(recorded, Some(Ok(()))) {
                    // The insert may have committed all the same (its answer
                    // and the read-back both lost): only a task known not to
                    // be there is recorded as abandoned; one that is stays
                    // held, and the settling pass queues it.
                    match self.inner.store.delete_held(&row.task_id).await {
                        Ok(_) => self.abandoned(&row, "the task could not be stored").await,
                        Err(error) => tracing::warn!(task = %row.task_id, %error,
                            "a recorded task's insert failed; if it committed, the settling pass queues it"),
                    }
                }
                return Err(EnqueueError::Store(e));
            }
        };
        if let Some(Err(e)) = recorded {
            // Not recorded, so not enqueued.
            give_back(&slot);
            if let Err(error) = self.inner.store.delete_held(&held.task_id).await {
                tracing::warn!(task = %held.task_id, %error,
                    "an unrecorded task stays held until the settling pass deletes it");
            }
            return Err(EnqueueError::Audit(e));
        }
        // From here on the task exists: it is durable and recorded, and if
        // its release fails, the settling pass makes it.
        //
        // The worker may have started draining (a pool reset, a shutdown) or
        // gone while audit wrote: then the task is queued instead.
        let slot = match slot {
            Some((worker_id, generation)) if self.takes_hand_off(&worker_id, generation) => {
                Some((worker_id, generation))
            }
            other => {
                give_back(&other);
                None
            }
        };
        let now = now_ms();
        let mut task = held;
        task.updated_at_ms = now;
        if slot.is_some() {
            // As a claim would set them, the lease counted from now.
            task.status = TaskStatus::Assigned;
            task.lease_expires_at_ms = Some(now.saturating_add(self.lease_ms()));
            task.deadline_at_ms = Some(now.saturating_add(task.timeout_ms));
        } else {
            task.status = TaskStatus::Queued;
            task.worker_id = String::new();
            task.attempt = 0;
            task.lease_expires_at_ms = None;
            task.deadline_at_ms = None;
        }
        let committed = match self.inner.store.release_held(&task).await {
            Ok(committed) => committed,
            Err(error) => {
                give_back(&slot);
                tracing::warn!(task = %task.task_id, %error, "a recorded task could not be released; retrying");
                let task = queued(task);
                if self.release_again(&task).await {
                    self.announce(&task.scope);
                }
                return Ok(Inserted::New(task));
            }
        };
        if committed.known() == Some(false) {
            give_back(&slot);
            return self.settled_meanwhile(task).await;
        }
        match &slot {
            Some((worker_id, generation)) => {
                let weight = self.weight(&task.scope);
                lock(&self.inner.rounds).charge_hand_off(&task.scope, weight);
                self.deliver(worker_id, *generation, task.clone()).await;
            }
            None => self.announce(&task.scope),
        }
        // Once delivered, the slot is the assignment's: an acceptance
        // refused for want of the release gives it back.
        match committed.await {
            Ok(true) => Ok(Inserted::New(task)),
            Ok(false) => self.settled_meanwhile(task).await,
            Err(error) => {
                // Delivered already: the worker's acceptance waits for the
                // release to be in the store.
                tracing::warn!(task = %task.task_id, %error, "a recorded task's release did not commit; retrying");
                self.release_again(&task).await;
                Ok(Inserted::New(task))
            }
        }
    }

    /// Releases a recorded task whose release failed, a few times over a
    /// second: it exists, and until released nobody can see or cancel it.
    /// Whether this call released it; if none did, the settling pass will.
    async fn release_again(&self, task: &TaskRow) -> bool {
        for wait_ms in [50, 250, 1000] {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            let released = match self.inner.store.release_held(task).await {
                Ok(committed) => committed.await,
                Err(e) => Err(e),
            };
            match released {
                Ok(released) => return released,
                Err(error) => {
                    tracing::warn!(task = %task.task_id, %error, "the release failed again")
                }
            }
        }
        tracing::error!(task = %task.task_id,
            "a recorded task stays held; the settling pass will queue it");
        false
    }

    /// Records `task.enqueue_abandoned`: audit holds the `task.enqueued` of a
    /// task that will not exist, and the log must not leave it at that.
    async fn abandoned(&self, task: &TaskRow, why: &str) {
        let (tenant, pool) = task.scope.columns();
        let ev = event(
            ABANDONED,
            tenant,
            "",
            AuditOutcome::Failure,
            [
                ("task_id", task.task_id.clone()),
                ("pool", pool.to_owned()),
                ("reason", why.to_owned()),
            ],
        );
        if let Err(error) = self.inner.audit.record_one(ev).await {
            tracing::error!(task = %task.task_id, %error,
                "audit holds the enqueue of a task that does not exist, and could not record so");
        }
    }

    /// Records an enqueue in audit, within `RECORD_TIMEOUT` in all (a wait
    /// for the audit client's batcher included), so that the record lands
    /// well within the settling pass's window of the task's creation.
    async fn record_enqueue(&self, record: NewEvent) -> Result<(), Error> {
        match tokio::time::timeout(RECORD_TIMEOUT, self.inner.audit.record_one(record)).await {
            Ok(recorded) => recorded.map(drop),
            Err(_) => Err(Error::unavailable(
                "audit",
                std::io::Error::other("recording the enqueue timed out"),
            )),
        }
    }

    /// Whether a hand-off may still go to this stream of the worker.
    fn takes_hand_off(&self, worker_id: &str, generation: u64) -> bool {
        lock(&self.inner.conns)
            .by_worker
            .get(worker_id)
            .is_some_and(|c| c.generation == generation && !c.draining)
    }

    /// A release found its task no longer held: a settling pass got to it
    /// first (the enqueue outlasted `held_grace_ms`). What it made of it.
    async fn settled_meanwhile(&self, task: TaskRow) -> Result<Inserted, EnqueueError> {
        match self.inner.store.get_task(&task.task_id).await {
            Ok(Some(t)) if t.status != TaskStatus::Held => Ok(Inserted::New(t)),
            Ok(_) => {
                self.abandoned(
                    &task,
                    "settled as unrecorded while its enqueue was under way",
                )
                .await;
                Err(EnqueueError::Internal(format!(
                    "task {} was settled as unrecorded while its enqueue was under way",
                    task.task_id
                )))
            }
            Err(e) => Err(EnqueueError::Store(e)),
        }
    }

    /// Inserts a held task. The insert may have committed even when its
    /// answer was lost: then the row is there, and it is this insert's (task
    /// ids are new).
    async fn insert_held(
        &self,
        row: &TaskRow,
        dedup_since_ms: i64,
    ) -> Result<Inserted, StoreError> {
        let store = &self.inner.store;
        match store.insert_task(row, dedup_since_ms).await {
            Err(e) => match store.get_task(&row.task_id).await {
                Ok(Some(t)) if t.status == TaskStatus::Held => Ok(Inserted::New(t)),
                _ => Err(e),
            },
            inserted => inserted,
        }
    }

    // ---- settling held tasks ------------------------------------------------

    async fn settle(self, stop: CancellationToken) {
        let grace = self.inner.fleet.held_grace_ms;
        let every = Duration::from_millis((grace / 2).clamp(100, 30_000));
        loop {
            match self.settle_held().await {
                Ok(settled) if settled.queued + settled.deleted > 0 => {
                    tracing::info!(
                        queued = settled.queued,
                        deleted = settled.deleted,
                        "settled tasks a crash left held against audit"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot settle held tasks yet"),
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Settles up to 500 tasks held for longer than `held_grace_ms` (their
    /// enqueue ended without releasing them: a crash, or a store that failed
    /// at the release) against this dispatcher's own `task.enqueued` records
    /// in audit: a recorded task is queued (one that was being handed off
    /// too: its worker may be gone), an unrecorded one deleted.
    ///
    /// A task's record was appended while its row was fresh, so it is
    /// looked for only within `SETTLE_MARGIN_MS` of the row's creation:
    /// held rows close in time (those one crash left) share one window.
    pub async fn settle_held(&self) -> Result<Settled, String> {
        let grace = i64::try_from(self.inner.fleet.held_grace_ms).unwrap_or(i64::MAX);
        let store = &self.inner.store;
        let held = store
            .held_before(now_ms().saturating_sub(grace), 500)
            .await
            .map_err(|e| e.to_string())?;
        let mut settled = Settled::default();
        // Oldest first, so each window takes the rows that follow closely.
        let mut rest = held.as_slice();
        while let Some(first) = rest.first() {
            let mut last = first.created_at_ms;
            let n = rest
                .iter()
                .take_while(|t| {
                    let near = t.created_at_ms <= last.saturating_add(2 * SETTLE_MARGIN_MS);
                    if near {
                        last = t.created_at_ms;
                    }
                    near
                })
                .count();
            let (window, after) = rest.split_at(n);
            rest = after;
            let ids: HashSet<&str> = window.iter().map(|t| t.task_id.as_str()).collect();
            let recorded = self
                .enqueues_recorded(
                    &ids,
                    first.created_at_ms.saturating_sub(SETTLE_MARGIN_MS),
                    last.saturating_add(SETTLE_MARGIN_MS),
                )
                .await?;
            for t in window {
                if recorded.contains(t.task_id.as_str()) {
                    let after = TaskRow {
                        updated_at_ms: now_ms(),
                        ..queued(t.clone())
                    };
                    let committed = store
                        .release_held(&after)
                        .await
                        .map_err(|e| e.to_string())?;
                    if committed.await.map_err(|e| e.to_string())? {
                        settled.queued += 1;
                        self.announce(&after.scope);
                        self.changed(&after.task_id);
                    }
                } else if store
                    .delete_held(&t.task_id)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    tracing::info!(task = %t.task_id, "deleted a held task audit has no record of");
                    settled.deleted += 1;
                }
            }
        }
        Ok(settled)
    }

    /// Which of `ids` this dispatcher recorded as `task.enqueued` from
    /// `from` to `to` (milliseconds). Audit finds the dispatcher's events of
    /// a time range by its (actor, time) index.
    async fn enqueues_recorded(
        &self,
        ids: &HashSet<&str>,
        from: i64,
        to: i64,
    ) -> Result<HashSet<String>, String> {
        let ts = |ms: i64| prost_types::Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
        };
        let mut found = HashSet::new();
        let mut after = 0;
        loop {
            let page = self
                .inner
                .audit
                .query(QueryRequest {
                    tenant: String::new(),
                    type_prefix: ENQUEUED.to_owned(),
                    run_id: String::new(),
                    actor: self.inner.actor.clone(),
                    start_time: Some(ts(from)),
                    end_time: Some(ts(to)),
                    after_sequence: after,
                    limit: 1000,
                })
                .await
                .map_err(|e| e.to_string())?;
            found.extend(
                page.events
                    .into_iter()
                    .filter(|e| e.r#type == ENQUEUED)
                    .filter_map(|mut e| e.attributes.remove("task_id"))
                    .filter(|id| ids.contains(id.as_str())),
            );
            if page.next_after_sequence == 0 || found.len() == ids.len() {
                return Ok(found);
            }
            after = page.next_after_sequence;
        }
    }

    /// Takes a slot of a worker that can take a task of `scope` with `labels`
    /// now and has nothing queued to take instead; its id and stream
    /// generation.
    fn slot_for(&self, scope: &Scope, labels: &Labels) -> Option<(String, u64)> {
        let mut conns = lock(&self.inner.conns);
        let wakes = conns.wakes_of(scope);
        let worker_id = conns
            .by_scope
            .get(scope)?
            .iter()
            .filter(|id| {
                conns.by_worker.get(*id).is_some_and(|c| {
                    c.scope == *scope
                        && c.credits > 0
                        && !c.draining
                        && c.starved == Some(wakes)
                        && crate::model::labels_match(labels, &c.labels)
                })
            })
            // The one with the most free slots, so that load spreads.
            .max_by_key(|id| conns.by_worker.get(*id).map_or(0, |c| c.credits))?
            .clone();
        let c = conns.by_worker.get_mut(&worker_id)?;
        c.credits -= 1;
        Some((worker_id, c.generation))
    }

    /// Takes up to `max` of a worker's free slots (of this stream
    /// generation); how many.
    fn take_slots(&self, worker_id: &str, generation: u64, max: u32) -> u32 {
        let mut conns = lock(&self.inner.conns);
        match conns.by_worker.get_mut(worker_id) {
            Some(c) if c.generation == generation => {
                let n = c.credits.min(max);
                c.credits -= n;
                n
            }
            _ => 0,
        }
    }

    /// Slots taken for tasks that were not handed out: the worker has them
    /// again (unless its stream was replaced meanwhile).
    fn give_slots_back(&self, worker_id: &str, generation: u64, n: u32) {
        let scope = {
            let mut conns = lock(&self.inner.conns);
            let Some(c) = conns.by_worker.get_mut(worker_id) else {
                return;
            };
            if c.generation != generation {
                return;
            }
            c.credits = c.credits.saturating_add(n).min(c.max_runs);
            // Work may have been queued while the slot was out (its wake-up
            // found no free slot): as when credits come back.
            let c = &conns.by_worker[worker_id];
            (!c.draining && !conns.is_starved(c)).then(|| c.scope.clone())
        };
        if let Some(scope) = scope {
            self.activate(&scope);
        }
    }

    /// One turn of a scope: hands out at most its quantum.
    async fn serve_scope(
        &self,
        scope: &Scope,
        weight: u32,
        rotation: u64,
    ) -> Result<Turn, crate::store::StoreError> {
        let mut budget = weight.saturating_mul(self.inner.fleet.quantum).max(1);
        let (wakes, mut candidates): (u64, Vec<(String, Labels, u64)>) = {
            let conns = lock(&self.inner.conns);
            let candidates = conns
                .by_scope
                .get(scope)
                .into_iter()
                .flatten()
                .filter_map(|id| {
                    let c = conns.by_worker.get(id)?;
                    (c.scope == *scope && c.credits > 0 && !conns.is_starved(c) && !c.draining)
                        .then(|| (id.clone(), c.labels.clone(), c.generation))
                })
                .collect();
            (conns.wakes_of(scope), candidates)
        };
        if candidates.is_empty() {
            return Ok(Turn::default());
        }
        // Start with a different worker each turn so that one worker's labels
        // do not always win the oldest tasks.
        candidates.sort_by(|a, b| a.0.cmp(&b.0));
        let len = candidates.len();
        candidates.rotate_left(usize::try_from(rotation % len as u64).unwrap_or(0));
        let mut more = false;
        let mut handed = 0;
        // Label sets whose claim came back short this turn: no queued task of
        // the scope matches them beyond what they got, so a worker whose labels
        // are a subset of one cannot match anything either (every task it
        // could take, the other could have taken). Skipping it saves a claim,
        // which is a write, per idle worker per wake-up.
        let mut exhausted: Vec<Labels> = Vec::new();
        for (worker_id, labels, generation) in candidates {
            if budget == 0 {
                more = true;
                break;
            }
            if exhausted
                .iter()
                .any(|e| crate::model::labels_match(&labels, e))
            {
                if let Some(c) = lock(&self.inner.conns).by_worker.get_mut(&worker_id) {
                    c.starved = Some(wakes);
                }
                continue;
            }
            // The slots are taken before the claim and what it did not use is
            // given back after: a hand-off at enqueue (which takes slots too)
            // never finds one this claim may fill.
            let want = self.take_slots(&worker_id, generation, budget);
            if want == 0 {
                continue;
            }
            let now = now_ms();
            let claimed = self
                .inner
                .store
                .claim(&ClaimBatch {
                    scope,
                    worker_id: &worker_id,
                    worker_labels: &labels,
                    max: want,
                    now_ms: now,
                    lease_ms: self.lease_ms(),
                })
                .await;
            let got = claimed
                .as_ref()
                .map_or(0, |t| u32::try_from(t.len()).unwrap_or(u32::MAX));
            {
                let mut conns = lock(&self.inner.conns);
                if let Some(c) = conns.by_worker.get_mut(&worker_id) {
                    // A newer stream of the same worker has slots of its
                    // own; what was claimed is given back, not sent down it.
                    if c.generation == generation {
                        c.credits = c.credits.saturating_add(want - got).min(c.max_runs);
                    }
                    if claimed.is_ok() && c.generation == generation {
                        if got < want {
                            c.starved = Some(wakes);
                        } else if c.credits > 0 {
                            more = true;
                        }
                    }
                }
            }
            let tasks = claimed?;
            budget = budget.saturating_sub(got);
            handed += got;
            if got < want {
                exhausted.push(labels);
            }
            for task in tasks {
                self.deliver(&worker_id, generation, task).await;
            }
        }
        Ok(Turn { more, handed })
    }

    fn weight(&self, scope: &Scope) -> u32 {
        let key = match scope {
            Scope::Tenant(t) => t.clone(),
            Scope::Pool(p) => format!("pool/{p}"),
        };
        self.inner
            .fleet
            .weights
            .get(&key)
            .copied()
            .unwrap_or(self.inner.fleet.default_weight)
            .max(1)
    }

    pub fn lease_ms(&self) -> i64 {
        i64::try_from(self.inner.fleet.lease_ms).unwrap_or(i64::MAX)
    }

    /// Pushes a claimed task to its worker. If the stream is gone or full, the
    /// attempt goes back to the queue at once rather than waiting out its
    /// lease.
    async fn deliver(&self, worker_id: &str, generation: u64, task: TaskRow) {
        let msg = match self.assignment(&task).await {
            Ok(a) => pb::ClaimResponse {
                body: Some(pb::claim_response::Body::Assignment(a)),
            },
            Err(e) => {
                tracing::error!(task = %task.task_id, error = %e, "cannot build an assignment");
                self.give_back(&task, "the agent version could not be loaded")
                    .await;
                return;
            }
        };
        // Only down the stream whose slot it took: a newer stream of the
        // same worker grants slots of its own.
        let tx = lock(&self.inner.conns)
            .by_worker
            .get(worker_id)
            .filter(|c| c.generation == generation)
            .map(|c| c.tx.clone());
        if tx.is_some_and(|tx| tx.try_send(Ok(msg)).is_ok()) {
            self.changed(&task.task_id);
        } else {
            self.give_back(&task, "the worker's claim stream closed")
                .await;
        }
    }

    async fn give_back(&self, task: &TaskRow, why: &str) {
        match self
            .inner
            .store
            .release_attempt(&task.task_id, task.lease_epoch, why, now_ms())
            .await
        {
            Ok(Some(r)) => {
                self.after_release(&r, pb::CancelReason::AcceptRefused)
                    .await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(task = %task.task_id, error = %e, "cannot give an attempt back; its lease will lapse")
            }
        }
    }

    /// An agent version. Decided versions never change, so they are cached;
    /// a pending one is read again each time.
    pub async fn agent(&self, name: &str, version: &str) -> Result<AgentRow, Error> {
        let key = (name.to_owned(), version.to_owned());
        if let Some(a) = lock(&self.inner.agents).get(&key) {
            return Ok(a.clone());
        }
        let a = self
            .inner
            .store
            .get_agent(name, version)
            .await
            .map_err(|e| Error::unavailable("storage", e))?
            .ok_or_else(|| Error::NotFound(format!("agent {name} {version}")))?;
        if a.status != crate::model::AgentStatus::Pending {
            lock(&self.inner.agents).insert(key, a.clone());
        }
        Ok(a)
    }

    /// A decision about `name` was made here: its latest approved version is
    /// read again on the next enqueue.
    pub fn forget_latest(&self, name: &str) {
        lock(&self.inner.latest).remove(name);
    }

    /// The most recently approved version of an agent, read at most once a
    /// second per name: a decision made on this replica shows at once, one
    /// made on another within a second.
    pub async fn latest_approved_agent(&self, name: &str) -> Result<Option<AgentRow>, Error> {
        const FRESH: Duration = Duration::from_secs(1);
        if let Some((at, a)) = lock(&self.inner.latest).get(name)
            && at.elapsed() < FRESH
        {
            return Ok(Some(a.clone()));
        }
        let a = self
            .inner
            .store
            .latest_approved_agent(name)
            .await
            .map_err(|e| Error::unavailable("storage", e))?;
        if let Some(a) = &a {
            lock(&self.inner.latest)
                .insert(name.to_owned(), (std::time::Instant::now(), a.clone()));
        }
        Ok(a)
    }

    pub async fn assignment(&self, task: &TaskRow) -> Result<pb::ClaimAssignment, Error> {
        let agent = self.agent(&task.agent, &task.agent_version).await?;
        Ok(pb::ClaimAssignment {
            task: Some(convert::task(task, true)),
            agent: Some(convert::agent(&agent)),
            attempt: task.attempt,
            lease_epoch: task.lease_epoch,
            deadline: task.deadline_at_ms.map(convert::ts),
        })
    }

    // ---- accept, heartbeat, report -----------------------------------------

    /// An acceptance: records `task.claimed`, has identity sign the run's CSR,
    /// and marks the task running. On any failure the attempt goes back to the
    /// queue and the worker gets a cancel.
    pub async fn accept(&self, who: &WorkerIdent, a: pb::ClaimAccept) {
        match self
            .start_attempt(
                who,
                &a.task_id,
                a.attempt,
                a.lease_epoch,
                a.run_csr_der.to_vec(),
            )
            .await
        {
            Ok((task, run_id, svid)) => {
                let msg = pb::ClaimResponse {
                    body: Some(pb::claim_response::Body::RunSvid(pb::ClaimRunSvid {
                        task_id: task.task_id.clone(),
                        attempt: task.attempt,
                        lease_epoch: task.lease_epoch,
                        run_id,
                        svid: Some(svid),
                    })),
                };
                self.send_to(&who.worker_id, msg);
            }
            Err(e) => {
                tracing::info!(task = %a.task_id, worker = %who.worker_id, error = %e, "acceptance refused");
                let cancel = cancel_msg(
                    &a.task_id,
                    a.attempt,
                    a.lease_epoch,
                    pb::CancelReason::AcceptRefused,
                    &e.to_string(),
                );
                self.send_to(&who.worker_id, cancel);
            }
        }
    }

    /// Turns an assigned attempt into a run: audit, mint, mark running.
    pub async fn start_attempt(
        &self,
        who: &WorkerIdent,
        task_id: &str,
        attempt: u32,
        lease_epoch: u64,
        csr: Vec<u8>,
    ) -> Result<(TaskRow, String, idpb::X509Svid), Error> {
        let store = &self.inner.store;
        let task = store
            .get_task(task_id)
            .await
            .map_err(|e| Error::unavailable("storage", e))?
            .ok_or_else(|| Error::NotFound(format!("task {task_id}")))?;
        if task.scope != who.scope
            || task.worker_id != who.worker_id
            || task.lease_epoch != lease_epoch
            || task.attempt != attempt
            // Held: a hand-off whose release is queued to the store but not
            // yet committed (SQLite pushes it that early); `start_run`, a
            // write, comes after the release and checks again.
            || !matches!(task.status, TaskStatus::Assigned | TaskStatus::Held)
        {
            return Err(Error::FailedPrecondition(
                "the attempt is not assigned to this worker at this lease epoch".into(),
            ));
        }
        if csr.is_empty() {
            self.give_back(&task, "the acceptance carried no csr").await;
            return Err(Error::invalid("run_csr_der", "required"));
        }
        let run_id = new_id();
        let (tenant, pool) = task.scope.columns();
        let claimed = event(
            "task.claimed",
            tenant,
            &run_id,
            AuditOutcome::Success,
            [
                ("task_id", task.task_id.clone()),
                ("attempt", task.attempt.to_string()),
                ("lease_epoch", task.lease_epoch.to_string()),
                ("worker_id", who.worker_id.clone()),
                ("pool", pool.to_owned()),
                ("agent", format!("{}@{}", task.agent, task.agent_version)),
            ],
        );
        if let Err(e) = self.inner.audit.record_one(claimed).await {
            self.give_back(&task, "audit was unavailable").await;
            return Err(e);
        }
        let minted = self
            .inner
            .identity
            .clone()
            .mint_run_svid(idpb::MintRunSvidRequest {
                tenant: tenant.to_owned(),
                pool: pool.to_owned(),
                run_id: run_id.clone(),
                csr_der: csr.into(),
                ttl: None,
                worker_id: who.worker_id.clone(),
            })
            .await;
        let svid = match minted {
            Ok(r) => r.into_inner().svid.unwrap_or_default(),
            Err(status) => {
                let why = if status.code() == tonic::Code::InvalidArgument {
                    "identity refused the run's csr"
                } else {
                    "identity could not sign the run's identity"
                };
                tracing::warn!(task = %task.task_id, code = ?status.code(), message = status.message(), "run identity not minted");
                self.give_back(&task, why).await;
                return Err(if status.code() == tonic::Code::InvalidArgument {
                    Error::invalid("run_csr_der", status.message())
                } else {
                    Error::Unavailable {
                        what: "identity",
                        source: None,
                    }
                });
            }
        };
        let running = store
            .start_run(
                &task.task_id,
                &who.worker_id,
                lease_epoch,
                &run_id,
                now_ms(),
                self.lease_ms(),
            )
            .await;
        let running = match running {
            Ok(running) => running,
            Err(e) => {
                // Not known to be running: the minted identity must not live.
                self.revoke_run(&task.scope, &run_id, "the run could not be started")
                    .await;
                return Err(Error::unavailable("storage", e));
            }
        };
        let Some(running) = running else {
            // The lease was lost while identity signed: the run must not live.
            self.revoke_run(
                &task.scope,
                &run_id,
                "the attempt lost its lease while starting",
            )
            .await;
            return Err(Error::FailedPrecondition(
                "the attempt lost its lease while starting".into(),
            ));
        };
        self.changed(&running.task_id);
        Ok((running, run_id, svid))
    }

    /// A heartbeat: renews current leases, cancels the rest. Returns false if
    /// the worker is no longer registered (its stream must close).
    pub async fn heartbeat(
        &self,
        who: &WorkerIdent,
        hb: pb::ClaimHeartbeat,
    ) -> Result<bool, Error> {
        let store = &self.inner.store;
        let registered = store
            .get_worker(&who.worker_id)
            .await
            .map_err(|e| Error::unavailable("storage", e))?
            .is_some_and(|w| w.spiffe_id == who.spiffe_id);
        if !registered {
            return Ok(false);
        }
        let listed: Vec<pb::HeldLease> = hb.leases.into_iter().take(1024).collect();
        let leases: Vec<(String, u64)> = listed
            .iter()
            .map(|l| (l.task_id.clone(), l.lease_epoch))
            .collect();
        if let Some(c) = lock(&self.inner.conns).by_worker.get_mut(&who.worker_id) {
            c.held = u32::try_from(leases.len()).unwrap_or(u32::MAX);
        }
        let lost = store
            .renew_leases(&who.worker_id, &leases, now_ms(), self.lease_ms())
            .await
            .map_err(|e| Error::unavailable("storage", e))?;
        for (task_id, epoch) in lost {
            // The worker matches a cancel on (task, attempt, epoch): name the
            // attempt it listed.
            let attempt = listed
                .iter()
                .find(|l| l.task_id == task_id && l.lease_epoch == epoch)
                .map_or(0, |l| l.attempt);
            self.send_to(
                &who.worker_id,
                cancel_msg(
                    &task_id,
                    attempt,
                    epoch,
                    pb::CancelReason::LeaseExpired,
                    "the lease is no longer held",
                ),
            );
        }
        Ok(true)
    }

    /// A report: refused when stale, else recorded in audit, then applied.
    pub async fn report(
        &self,
        who: &WorkerIdent,
        r: pb::ClaimReport,
    ) -> Result<pb::ClaimReportAck, Error> {
        let store = &self.inner.store;
        let mut ack = pb::ClaimReportAck {
            task_id: r.task_id.clone(),
            attempt: r.attempt,
            lease_epoch: r.lease_epoch,
            accepted: false,
            rejection: 0,
        };
        let outcome = match Outcome::from_i32(r.outcome) {
            Some(o) if o != Outcome::None => o,
            _ => return Err(Error::invalid("report.outcome", "must be set")),
        };
        let Some(task) = store
            .get_task(&r.task_id)
            .await
            .map_err(|e| Error::unavailable("storage", e))?
            .filter(|t| t.scope == who.scope)
        else {
            ack.rejection = pb::ReportRejection::UnknownTask as i32;
            return Ok(ack);
        };
        let (tenant, _) = task.scope.columns();
        if task.lease_epoch != r.lease_epoch || task.worker_id != who.worker_id {
            self.record_stale(who, &task, r.lease_epoch).await;
            ack.rejection = pb::ReportRejection::StaleLease as i32;
            return Ok(ack);
        }
        if !task.status.is_leased() {
            ack.accepted = true;
            return Ok(ack);
        }
        let summary = convert::summary(&r.output_summary);
        self.inner
            .audit
            .record_one(event(
                "task.completed",
                tenant,
                &task.run_id,
                if outcome == Outcome::Succeeded {
                    AuditOutcome::Success
                } else {
                    AuditOutcome::Failure
                },
                [
                    ("task_id", task.task_id.clone()),
                    ("attempt", task.attempt.to_string()),
                    ("lease_epoch", task.lease_epoch.to_string()),
                    ("worker_id", who.worker_id.clone()),
                    ("outcome", format!("{outcome:?}").to_lowercase()),
                    ("exit_code", r.exit_code.to_string()),
                ],
            ))
            .await?;
        let finished = store
            .finish(&crate::store::Finish {
                task_id: &r.task_id,
                worker_id: &who.worker_id,
                lease_epoch: r.lease_epoch,
                outcome,
                exit_code: r.exit_code,
                output_summary: summary,
                now_ms: now_ms(),
            })
            .await
            .map_err(|e| Error::unavailable("storage", e))?;
        use crate::store::Finished;
        match finished {
            Finished::Applied(after) => {
                ack.accepted = true;
                count_final(&after);
                if after.status == TaskStatus::Queued {
                    self.announce(&after.scope);
                }
                self.changed(&after.task_id);
            }
            // The lease was released (lapsed, reset, cancelled) between the
            // check above and the update: the completion recorded above did
            // not take effect, and the log says so.
            Finished::Repeat(t) => {
                self.record_superseded(who, &t, r.lease_epoch).await;
                ack.accepted = true;
            }
            Finished::Stale(t) => {
                self.record_superseded(who, &t, r.lease_epoch).await;
                ack.rejection = pb::ReportRejection::StaleLease as i32;
            }
            Finished::Unknown => ack.rejection = pb::ReportRejection::UnknownTask as i32,
        }
        Ok(ack)
    }

    async fn record_superseded(&self, who: &WorkerIdent, task: &TaskRow, epoch: u64) {
        let (tenant, _) = task.scope.columns();
        let ev = event(
            "task.report_superseded",
            tenant,
            &task.run_id,
            AuditOutcome::Failure,
            [
                ("task_id", task.task_id.clone()),
                ("worker_id", who.worker_id.clone()),
                ("reported_epoch", epoch.to_string()),
                ("status", task.status.as_str().to_owned()),
                (
                    "reason",
                    "the lease was released before the report was applied".to_owned(),
                ),
            ],
        );
        if let Err(e) = self.inner.audit.record_one(ev).await {
            tracing::warn!(error = %e, task = %task.task_id, "could not record a superseded report");
        }
    }

    async fn record_stale(&self, who: &WorkerIdent, task: &TaskRow, epoch: u64) {
        let (tenant, _) = task.scope.columns();
        let ev = event(
            "task.report_refused",
            tenant,
            &task.run_id,
            AuditOutcome::Denied,
            [
                ("task_id", task.task_id.clone()),
                ("worker_id", who.worker_id.clone()),
                ("reported_epoch", epoch.to_string()),
                ("current_epoch", task.lease_epoch.to_string()),
                ("reason", "stale lease epoch".to_owned()),
            ],
        );
        if let Err(e) = self.inner.audit.record_one(ev).await {
            tracing::warn!(error = %e, task = %task.task_id, "could not record a refused report");
        }
    }

    // ---- leases -------------------------------------------------------------

    async fn reap(self, stop: CancellationToken) {
        let every = Duration::from_millis(self.inner.fleet.reaper_ms.max(10));
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
            match self.inner.store.expire(now_ms(), 500).await {
                Ok(released) => {
                    for r in released {
                        let reason = if r.after.outcome == Outcome::TimedOut {
                            pb::CancelReason::DeadlineExceeded
                        } else {
                            pb::CancelReason::LeaseExpired
                        };
                        let _ = self.after_release(&r, reason).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "lease expiry failed"),
            }
        }
    }

    /// After a leased attempt was released: tell its worker, revoke the run's
    /// identity, record it, and wake the scope if the task is queued again.
    /// Returns the run whose identity was revoked, if any.
    pub async fn after_release(&self, r: &Released, reason: pb::CancelReason) -> Option<String> {
        let before = &r.before;
        let why = r.after.status_reason.clone();
        self.cancel_lease(before, reason, &why);
        let mut revoked = None;
        if !before.run_id.is_empty()
            && before.status == TaskStatus::Running
            && self.revoke_run(&before.scope, &before.run_id, &why).await
        {
            revoked = Some(before.run_id.clone());
        }
        let (tenant, pool) = before.scope.columns();
        let ev = event(
            "task.lease_released",
            tenant,
            &before.run_id,
            AuditOutcome::Failure,
            [
                ("task_id", before.task_id.clone()),
                ("attempt", before.attempt.to_string()),
                ("lease_epoch", before.lease_epoch.to_string()),
                ("worker_id", before.worker_id.clone()),
                ("pool", pool.to_owned()),
                ("reason", why.clone()),
                ("status", r.after.status.as_str().to_owned()),
            ],
        );
        if let Err(e) = self.inner.audit.record_one(ev).await {
            tracing::warn!(error = %e, task = %before.task_id, "could not record a released lease");
        }
        if r.after.status == TaskStatus::Queued {
            self.announce(&r.after.scope);
        }
        self.changed(&before.task_id);
        revoked
    }

    /// Revokes a run's identity, hard (its sandbox is killed).
    pub async fn revoke_run(&self, scope: &Scope, run_id: &str, why: &str) -> bool {
        let reason: String = why.chars().take(500).collect();
        let res = self
            .inner
            .identity
            .clone()
            .revoke(idpb::RevokeRequest {
                tenant: scope.tenant().to_owned(),
                target: Some(idpb::revoke_request::Target::RunId(run_id.to_owned())),
                reason: if reason.is_empty() {
                    "released".into()
                } else {
                    reason
                },
                hard: true,
            })
            .await;
        match res {
            Ok(_) => true,
            Err(status) => {
                tracing::warn!(run = %run_id, code = ?status.code(), message = status.message(), "could not revoke a run identity");
                false
            }
        }
    }

    pub async fn revoke_worker(
        &self,
        scope: &Scope,
        worker_id: &str,
        why: &str,
    ) -> Result<(), Status> {
        self.inner
            .identity
            .clone()
            .revoke(idpb::RevokeRequest {
                tenant: scope.tenant().to_owned(),
                target: Some(idpb::revoke_request::Target::WorkerId(worker_id.to_owned())),
                reason: why.to_owned(),
                hard: true,
            })
            .await
            .map(|_| ())
    }

    // ---- polling and remote wake-ups ---------------------------------------

    async fn poll(self, stop: CancellationToken) {
        // Ticks at the fallback interval and polls when the interval that
        // fits Redis's health *now* has passed, so losing Redis shortens a
        // long wait already under way.
        let tick = Duration::from_millis(self.inner.fleet.fallback_poll_ms.max(10));
        let mut last = std::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = stop.cancelled() => return,
            }
            let every = if self.inner.wake.healthy() {
                self.inner.fleet.poll_ms
            } else {
                self.inner.fleet.fallback_poll_ms
            };
            if last.elapsed() < Duration::from_millis(every) {
                continue;
            }
            last = std::time::Instant::now();
            let local: HashSet<Scope> = lock(&self.inner.conns).by_scope.keys().cloned().collect();
            if local.is_empty() {
                continue;
            }
            match self.inner.store.queued_scopes().await {
                Ok(scopes) => {
                    for (scope, n) in scopes {
                        if n > 0 && local.contains(&scope) {
                            self.wake_local(&scope);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "polling the queue failed"),
            }
        }
    }

    async fn listen(self, stop: CancellationToken) {
        let wake = self.inner.wake.clone();
        let engine = self.clone();
        wake.listen(stop, move |m| engine.on_remote(m)).await;
    }
}

fn conns_drop(conn: Option<Conn>) -> Option<ClaimTx> {
    conn.map(|c| c.tx)
}

pub fn cancel_msg(
    task_id: &str,
    attempt: u32,
    lease_epoch: u64,
    reason: pb::CancelReason,
    message: &str,
) -> pb::ClaimResponse {
    pb::ClaimResponse {
        body: Some(pb::claim_response::Body::Cancel(pb::ClaimCancel {
            task_id: task_id.to_owned(),
            attempt,
            lease_epoch,
            reason: reason as i32,
            message: message.chars().take(500).collect(),
        })),
    }
}

/// Counts a task that has reached a final status in `bulkhead.tasks`.
pub fn count_final(t: &TaskRow) {
    if t.status.is_final() {
        let (tenant, pool) = t.scope.columns();
        bulkhead_mesh::metrics::task_finished(tenant, pool, t.status.as_str());
    }
}

/// A random id for tasks and runs: 32 lowercase hex digits, valid as a SPIFFE
/// path segment.
pub fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(t: &str) -> Scope {
        Scope::Tenant(t.into())
    }

    /// Two loops serve two scopes at once and the heavy scope's claims take
    /// three times as long (three times as many tasks): the shares still
    /// follow the weights 3:1, not the claims' speed.
    #[test]
    fn overlapping_turns_share_by_weight() {
        let (heavy, light) = (tenant("heavy"), tenant("light"));
        let quantum = 64;
        let lead = quantum * VTASK;
        let mut r = Rounds::default();
        r.enter(&heavy);
        r.enter(&light);
        let mut handed: HashMap<Scope, u64> = HashMap::new();
        // Each loop's turn ends at a time; the earliest ends first.
        let mut clock: Vec<(u64, Scope)> = Vec::new();
        for _ in 0..2 {
            let s = r.take(lead).expect("both scopes are eligible at first");
            clock.push((0, s));
        }
        let mut waiting: Vec<u64> = Vec::new();
        for _ in 0..2_000 {
            clock.sort_by_key(|c| c.0);
            let (now, s) = clock.remove(0);
            let weight = if s == heavy { 3 } else { 1 };
            let n = weight * quantum as u32;
            *handed.entry(s.clone()).or_default() += u64::from(n);
            assert!(!r.end_turn(&s, n, weight));
            r.requeue(&s);
            waiting.push(now);
            // Free loops take what is eligible; a turn lasts as long as the
            // tasks it hands out.
            while let Some(at) = waiting.pop() {
                match r.take(lead) {
                    Some(s) => {
                        let w = if s == heavy { 3 } else { 1 };
                        clock.push((at.max(now) + w * quantum, s));
                    }
                    None => {
                        waiting.push(at);
                        break;
                    }
                }
            }
        }
        let (h, l) = (handed[&heavy] as f64, handed[&light] as f64);
        let share = h / (h + l);
        assert!((0.74..=0.76).contains(&share), "heavy's share {share:.3}");
    }

    /// A scope that had no work does not come back with a burst it saved up.
    #[test]
    fn idling_earns_no_credit() {
        let (busy, idle) = (tenant("busy"), tenant("idle"));
        let lead = 64 * VTASK;
        let mut r = Rounds::default();
        r.enter(&busy);
        for _ in 0..100 {
            let s = r.take(lead).expect("a scope is eligible");
            r.end_turn(&s, 64, 1);
            r.requeue(&s);
        }
        r.enter(&idle);
        assert_eq!(r.vtime_of(&idle), r.vtime_of(&busy));
        // It is served next, and then they alternate.
        let mut order = Vec::new();
        for _ in 0..6 {
            let s = r.take(lead).expect("a scope is eligible");
            r.end_turn(&s, 64, 1);
            r.requeue(&s);
            order.push(s);
        }
        assert_eq!(order.iter().filter(|s| **s == idle).count(), 3);
    }

    /// Tasks handed over at enqueue while a scope was out of the round leave
    /// no debt: when it next has a backlog it starts level with the others.
    #[test]
    fn hand_offs_outside_the_round_leave_no_debt() {
        let (a, b) = (tenant("a"), tenant("b"));
        let lead = 64 * VTASK;
        let mut r = Rounds::default();
        r.enter(&b);
        for _ in 0..10_000 {
            r.charge_hand_off(&a, 1);
        }
        r.enter(&a);
        assert_eq!(r.vtime_of(&a), r.vtime_of(&b));
        assert_eq!(r.take(lead), Some(b.clone()));
        assert_eq!(r.take(lead), Some(a.clone()), "a is not held back");
        // In the round, a hand-off is charged like a claim.
        let before = r.vtime_of(&a);
        r.charge_hand_off(&a, 2);
        assert_eq!(r.vtime_of(&a), before + VTASK / 2);
    }

    /// A scope whose turns hand out nothing (its workers match none of its
    /// tasks, say) does not hold the others back while it stays in the
    /// round.
    #[test]
    fn an_empty_turn_does_not_hold_others_back() {
        let (stuck, busy) = (tenant("stuck"), tenant("busy"));
        let lead = 64 * VTASK;
        let mut r = Rounds::default();
        r.enter(&stuck);
        r.enter(&busy);
        for _ in 0..50 {
            let s = r.take(lead).expect("a scope is eligible");
            let handed = if s == busy { 64 } else { 0 };
            r.end_turn(&s, handed, 1);
            r.requeue(&s);
        }
        assert!(
            r.vtime_of(&busy) >= 24 * 64 * VTASK,
            "busy was held back: {}",
            r.vtime_of(&busy) / VTASK
        );
    }

    /// A scope more than a quantum ahead waits while another is served,
    /// and is taken again once that one's turn ends.
    #[test]
    fn a_scope_ahead_waits_for_the_slowest() {
        let (a, b) = (tenant("a"), tenant("b"));
        let lead = 64 * VTASK;
        let mut r = Rounds::default();
        r.enter(&a);
        r.enter(&b);
        let first = r.take(lead).expect("a scope is eligible");
        let second = r.take(lead).expect("a scope is eligible");
        assert_eq!((&first, &second), (&a, &b));
        // `a` finishes two turns while `b`'s first is still running.
        r.end_turn(&a, 64, 1);
        r.requeue(&a);
        assert_eq!(r.take(lead), Some(a.clone()));
        r.end_turn(&a, 64, 1);
        r.requeue(&a);
        assert_eq!(r.take(lead), None, "a is two quanta ahead of b");
        r.end_turn(&b, 64, 1);
        r.requeue(&b);
        assert_eq!(r.take(lead), Some(a.clone()));
        assert_eq!(r.take(lead), Some(b));
    }
}
