//! The dispatcher service's gRPC handlers and their authorization table. The
//! handlers are thin: they convert requests, check what the table cannot
//! (the task's tenant against the caller's), and call the engine and the
//! store.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::time::Duration;

use bulkhead_mesh::audit::event;
use bulkhead_mesh::authz::{Caller, Policy, Rule, who};
use bulkhead_mesh::client::MeshChannel;
use bulkhead_mesh::error::Error;
use bulkhead_mesh::spiffe::Principal;
use bulkhead_proto::audit::v1::Outcome as AuditOutcome;
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::dispatcher_service_server::{
    DispatcherService, DispatcherServiceServer,
};
use bulkhead_proto::sealed::v1 as sealed;
use bulkhead_proto::sealed::v1::sealed_vault_service_client::SealedVaultServiceClient;
use futures::Stream;
use prost::Message as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert;
use crate::engine::{ENQUEUED, Engine, EnqueueError, WorkerIdent, new_id};
use crate::model::{AgentStatus, Scope, TaskRow, TaskStatus, WorkerRow, WorkerState, now_ms};
use crate::store::{Cancelled, ClaimBatch, ClaimOne, Decision, Inserted, TaskFilter, WorkerFilter};

// ClaimTask is not tenant-scoped here on purpose: a worker naming another
// tenant's task must reach the handler, which refuses it and records
// `fleet.cross_tenant_refused` in audit.

/// Who may call each RPC of `bulkhead.dispatcher.v1.DispatcherService`. A method missing
/// here is denied to everyone.
pub static RULES: &[Rule] = &[
    Rule::new("RegisterWorker", &[who::TENANT_WORKER, who::POOL_WORKER]),
    Rule::new("Claim", &[who::TENANT_WORKER, who::POOL_WORKER]),
    Rule::new("ClaimTask", &[who::TENANT_WORKER, who::POOL_WORKER]),
    Rule::new("GetRunAssignment", &[who::SANDBOX_RUNNER]),
    Rule::new("Enqueue", &[who::TENANT_CLIENT, who::OPERATOR]).tenant_scoped(),
    Rule::new("GetTask", &[who::TENANT_CLIENT, who::OPERATOR]).tenant_scoped(),
    Rule::new("ListTasks", &[who::TENANT_CLIENT, who::OPERATOR]).tenant_scoped(),
    Rule::new("CancelTask", &[who::TENANT_CLIENT, who::OPERATOR]).tenant_scoped(),
    Rule::new("WatchTask", &[who::TENANT_CLIENT, who::OPERATOR]).tenant_scoped(),
    Rule::new("SubmitAgent", &[who::OPERATOR]),
    Rule::new("ApproveAgent", &[who::OPERATOR]),
    Rule::new("RejectAgent", &[who::OPERATOR]),
    Rule::new("ListAgents", &[who::OPERATOR, who::TENANT_CLIENT]),
    Rule::new("ResetPool", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("ListWorkers", &[who::OPERATOR, who::TENANT_CLIENT]).tenant_scoped(),
];

pub const POLICY: Policy = Policy {
    service: "bulkhead.dispatcher.v1.DispatcherService",
    rules: RULES,
};

/// How long an idempotency key keeps pointing at its task.
const DEDUP_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// The service's handlers.
#[derive(Debug, Clone)]
pub struct DispatcherApi {
    engine: Engine,
    sealed: Option<SealedVaultServiceClient<MeshChannel>>,
}

impl DispatcherApi {
    /// `sealed`: sealed-vault, asked for a snapshot of every task's cascade at
    /// enqueue; without it, tasks that carry a cascade are refused.
    pub fn new(engine: Engine, sealed: Option<SealedVaultServiceClient<MeshChannel>>) -> Self {
        Self { engine, sealed }
    }
}

/// The gRPC server for [`DispatcherApi`].
pub fn server(api: DispatcherApi) -> DispatcherServiceServer<DispatcherApi> {
    DispatcherServiceServer::new(api).max_decoding_message_size(4 << 20)
}

fn storage(e: crate::store::StoreError) -> Status {
    Error::unavailable("storage", e).into()
}

fn worker_of<T>(req: &Request<T>) -> Result<WorkerIdent, Status> {
    let caller = Caller::of(req)?;
    let (scope, worker) = match caller.id.principal() {
        Principal::TenantWorker { tenant, worker } => {
            (Scope::Tenant(tenant.to_owned()), worker.to_owned())
        }
        Principal::PoolWorker { pool, worker } => (Scope::Pool(pool.to_owned()), worker.to_owned()),
        _ => return Err(Error::denied("only workers may call this").into()),
    };
    Ok(WorkerIdent {
        worker_id: worker,
        spiffe_id: caller.id.as_str().to_owned(),
        scope,
    })
}

fn is_operator(caller: &Caller) -> bool {
    matches!(caller.id.principal(), Principal::Operator { .. })
}

/// Whether the request's tenant (and the caller's kind) may see this task.
/// Another tenant's task is simply not found.
fn visible(task: &TaskRow, req_tenant: &str, caller: &Caller) -> bool {
    match &task.scope {
        Scope::Tenant(t) => !req_tenant.is_empty() && t == req_tenant,
        Scope::Pool(_) => req_tenant.is_empty() && is_operator(caller),
    }
}

fn page_size(n: u32) -> u32 {
    match n {
        0 => 100,
        n => n.min(1000),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl DispatcherService for DispatcherApi {
    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let who = worker_of(&req)?;
        let r = req.into_inner();
        let labels = convert::labels("labels", r.labels)?;
        convert::check_reserved_labels(&labels, &who.scope)?;
        if !(1..=1024).contains(&r.max_concurrent_runs) {
            return Err(Error::invalid("max_concurrent_runs", "must be 1 to 1024").into());
        }
        if r.sandbox_backends.is_empty()
            || r.sandbox_backends.len() > 8
            || r.sandbox_backends.iter().any(|b| !(1..=2).contains(b))
        {
            return Err(Error::invalid(
                "sandbox_backends",
                "at least one of SANDBOX_BACKEND_DOCKER and SANDBOX_BACKEND_PROCESS",
            )
            .into());
        }
        convert::text("version", &r.version, 64)?;
        let store = self.engine.store();
        if let Some(existing) = store.get_worker(&who.worker_id).await.map_err(storage)?
            && existing.spiffe_id != who.spiffe_id
        {
            return Err(Error::denied("this worker id is registered to another identity").into());
        }
        let (tenant, pool) = who.scope.columns();
        self.engine
            .audit()
            .record_one(event(
                "worker.registered",
                tenant,
                "",
                AuditOutcome::Success,
                [
                    ("worker_id", who.worker_id.clone()),
                    ("pool", pool.to_owned()),
                    ("labels", serde_json::to_string(&labels).unwrap_or_default()),
                    ("max_concurrent_runs", r.max_concurrent_runs.to_string()),
                ],
            ))
            .await?;
        let now = now_ms();
        let row = WorkerRow {
            worker_id: who.worker_id.clone(),
            spiffe_id: who.spiffe_id.clone(),
            scope: who.scope.clone(),
            labels,
            max_concurrent_runs: r.max_concurrent_runs,
            sandbox_backends: r.sandbox_backends,
            version: r.version,
            state: if self.engine.is_connected(&who.worker_id) {
                WorkerState::Connected
            } else {
                WorkerState::Disconnected
            },
            registered_at_ms: now,
            last_heartbeat_at_ms: now,
        };
        store.upsert_worker(&row).await.map_err(storage)?;
        self.engine
            .update_worker(&row.worker_id, &row.labels, row.max_concurrent_runs);
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker: Some(convert::worker(&row, 0)),
            lease_duration: Some(convert::duration(self.engine.fleet().lease_ms)),
            heartbeat_interval: Some(convert::duration(self.engine.fleet().heartbeat_ms)),
        }))
    }

    async fn claim(
        &self,
        req: Request<Streaming<pb::ClaimRequest>>,
    ) -> Result<Response<BoxStream<pb::ClaimResponse>>, Status> {
        let who = worker_of(&req)?;
        let store = self.engine.store().clone();
        let row = store
            .get_worker(&who.worker_id)
            .await
            .map_err(storage)?
            .filter(|w| w.spiffe_id == who.spiffe_id)
            .ok_or_else(|| {
                Status::failed_precondition("not registered: call RegisterWorker first")
            })?;
        let (generation, rx) = self
            .engine
            .open_stream(&who, row.labels, row.max_concurrent_runs);
        store
            .set_worker_state(&who.worker_id, WorkerState::Connected)
            .await
            .map_err(storage)?;
        let mut inbound = req.into_inner();
        let engine = self.engine.clone();
        tokio::spawn(async move {
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => break,
                };
                use pb::claim_request::Body;
                match msg.body {
                    Some(Body::Credits(c)) => engine.add_credits(&who.worker_id, c.slots),
                    Some(Body::Accept(a)) => {
                        let (engine, who) = (engine.clone(), who.clone());
                        tokio::spawn(async move { engine.accept(&who, a).await });
                    }
                    Some(Body::Heartbeat(h)) => match engine.heartbeat(&who, h).await {
                        Ok(true) => {}
                        Ok(false) => {
                            engine
                                .evict_local(&who.worker_id, "the worker is no longer registered");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(worker = %who.worker_id, error = %e, "heartbeat failed");
                        }
                    },
                    Some(Body::Report(r)) => {
                        let (engine, who) = (engine.clone(), who.clone());
                        tokio::spawn(async move {
                            let msg = match engine.report(&who, r).await {
                                Ok(ack) => Ok(pb::ClaimResponse {
                                    body: Some(pb::claim_response::Body::ReportAck(ack)),
                                }),
                                // Unacknowledged: the worker sends it again on its next stream.
                                Err(e) => Err(Status::from(e)),
                            };
                            match msg {
                                Ok(m) => {
                                    engine.send_to(&who.worker_id, m);
                                }
                                Err(status) => {
                                    engine.fail_stream(&who.worker_id, generation, status)
                                }
                            }
                        });
                    }
                    None => {
                        engine.fail_stream(
                            &who.worker_id,
                            generation,
                            Error::invalid("body", "required").into(),
                        );
                        break;
                    }
                }
            }
            if engine.close_stream(&who.worker_id, generation)
                && let Err(e) = store
                    .set_worker_state(&who.worker_id, WorkerState::Disconnected)
                    .await
            {
                tracing::warn!(worker = %who.worker_id, error = %e, "could not mark a worker disconnected");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn claim_task(
        &self,
        req: Request<pb::ClaimTaskRequest>,
    ) -> Result<Response<pb::ClaimTaskResponse>, Status> {
        let who = worker_of(&req)?;
        let r = req.into_inner();
        if r.task_id.is_empty() || r.task_id.len() > 64 {
            return Err(Error::invalid("task_id", "must be 1 to 64 bytes").into());
        }
        let store = self.engine.store();
        let task = store.get_task(&r.task_id).await.map_err(storage)?;
        let own_tenant = who.scope.tenant();
        let foreign = r.tenant != own_tenant || task.as_ref().is_some_and(|t| t.scope != who.scope);
        if foreign {
            self.engine
                .audit()
                .record_one(event(
                    "fleet.cross_tenant_refused",
                    own_tenant,
                    "",
                    AuditOutcome::Denied,
                    [
                        ("task_id", r.task_id.clone()),
                        ("worker_id", who.worker_id.clone()),
                        ("pool", who.scope.pool().to_owned()),
                        ("requested_tenant", r.tenant.clone()),
                        ("method", "ClaimTask".to_owned()),
                    ],
                ))
                .await?;
            return Err(Error::denied("the task belongs to another tenant").into());
        }
        let Some(_) = task else {
            return Err(Error::NotFound(format!("task {}", r.task_id)).into());
        };
        let worker = store
            .get_worker(&who.worker_id)
            .await
            .map_err(storage)?
            .filter(|w| w.spiffe_id == who.spiffe_id)
            .ok_or_else(|| {
                Status::failed_precondition("not registered: call RegisterWorker first")
            })?;
        if !self.engine.is_connected(&who.worker_id) {
            return Err(Status::failed_precondition(
                "open a claim stream first: heartbeats and reports travel on it",
            ));
        }
        let claimed = store
            .claim_task(
                &who.scope,
                &r.task_id,
                &ClaimBatch {
                    scope: &who.scope,
                    worker_id: &who.worker_id,
                    worker_labels: &worker.labels,
                    max: 1,
                    now_ms: now_ms(),
                    lease_ms: self.engine.lease_ms(),
                },
            )
            .await
            .map_err(storage)?;
        let task = match claimed {
            ClaimOne::Claimed(t) => t,
            ClaimOne::NotQueued(t) => {
                return Err(Status::failed_precondition(format!(
                    "the task is {}, not queued",
                    t.status.as_str()
                )));
            }
            ClaimOne::LabelsMismatch => {
                let (tenant, pool) = who.scope.columns();
                self.engine
                    .audit()
                    .record_one(event(
                        "fleet.claim_refused",
                        tenant,
                        "",
                        AuditOutcome::Denied,
                        [
                            ("task_id", r.task_id.clone()),
                            ("worker_id", who.worker_id.clone()),
                            ("pool", pool.to_owned()),
                            ("reason", "labels the worker lacks".to_owned()),
                        ],
                    ))
                    .await?;
                return Err(Error::denied("the task needs labels this worker lacks").into());
            }
            ClaimOne::NotFound => return Err(Error::NotFound(format!("task {}", r.task_id)).into()),
        };
        let assignment = self.engine.assignment(&task).await?;
        let (running, run_id, svid) = self
            .engine
            .start_attempt(
                &who,
                &task.task_id,
                task.attempt,
                task.lease_epoch,
                r.run_csr_der.to_vec(),
            )
            .await?;
        let mut assignment = assignment;
        assignment.task = Some(convert::task(&running, true));
        Ok(Response::new(pb::ClaimTaskResponse {
            assignment: Some(assignment),
            run_id,
            run_svid: Some(svid),
        }))
    }

    async fn get_run_assignment(
        &self,
        req: Request<pb::GetRunAssignmentRequest>,
    ) -> Result<Response<pb::GetRunAssignmentResponse>, Status> {
        let r = req.into_inner();
        let scope = Scope::from_columns(&r.tenant, &r.pool).ok_or_else(|| {
            Error::invalid("tenant", "exactly one of tenant and pool must be set")
        })?;
        if r.run_id.is_empty() || r.run_id.len() > 64 {
            return Err(Error::invalid("run_id", "must be 1 to 64 bytes").into());
        }
        let task = self
            .engine
            .store()
            .running_task_of_run(&scope, &r.run_id)
            .await
            .map_err(storage)?
            .ok_or_else(|| Error::NotFound(format!("running run {}", r.run_id)))?;
        let assignment = self.engine.assignment(&task).await?;
        Ok(Response::new(pb::GetRunAssignmentResponse {
            assignment: Some(assignment),
            worker_id: task.worker_id,
        }))
    }

    async fn enqueue(
        &self,
        req: Request<pb::EnqueueRequest>,
    ) -> Result<Response<pb::EnqueueResponse>, Status> {
        let caller = Caller::of(&req)?;
        let spec = convert::enqueue_spec(req.into_inner(), self.engine.fleet().max_payload_bytes)?;
        if matches!(spec.scope, Scope::Pool(_)) && !is_operator(&caller) {
            return Err(Error::denied("only operators enqueue pool tasks").into());
        }
        let store = self.engine.store();
        let agent = if spec.agent_version.is_empty() {
            match self.engine.latest_approved_agent(&spec.agent).await? {
                Some(a) => a,
                None => {
                    let any = store
                        .list_agents(&spec.agent, None, 0, 1)
                        .await
                        .map_err(storage)?;
                    return Err(if any.is_empty() {
                        Error::NotFound(format!("agent {}", spec.agent))
                    } else {
                        Error::FailedPrecondition(format!(
                            "agent {} has no approved version",
                            spec.agent
                        ))
                    }
                    .into());
                }
            }
        } else {
            let a = self.engine.agent(&spec.agent, &spec.agent_version).await?;
            if a.status != AgentStatus::Approved {
                return Err(Error::FailedPrecondition(format!(
                    "agent {} {} is {}, not approved",
                    a.name,
                    a.version,
                    a.status.as_str()
                ))
                .into());
            }
            a
        };
        let now = now_ms();
        if !spec.idempotency_key.is_empty()
            && let Some(t) = store
                .find_idempotent(&spec.scope, &spec.idempotency_key, now - DEDUP_WINDOW_MS)
                .await
                .map_err(storage)?
        {
            return dedup(t, &spec.request_hash);
        }
        let secret_keys = self.snapshot(&spec, &agent).await?;
        let task_id = new_id();
        let (tenant, pool) = spec.scope.columns();
        let record = event(
            ENQUEUED,
            tenant,
            "",
            AuditOutcome::Success,
            [
                ("task_id", task_id.clone()),
                ("pool", pool.to_owned()),
                ("agent", format!("{}@{}", agent.name, agent.version)),
                ("secret_keys", secret_keys.join(",")),
                ("priority", spec.priority.to_string()),
                ("payload_size", spec.payload.len().to_string()),
                ("enqueued_by", caller.id.as_str().to_owned()),
            ],
        );
        let row = TaskRow {
            seq: 0,
            task_id,
            scope: spec.scope.clone(),
            agent: agent.name.clone(),
            agent_version: agent.version.clone(),
            labels: spec.labels,
            cascade: spec.cascade.map(|c| c.encode_to_vec()).unwrap_or_default(),
            secret_keys,
            payload_size: u32::try_from(spec.payload.len()).unwrap_or(u32::MAX),
            payload: spec.payload,
            priority: spec.priority,
            idempotency_key: spec.idempotency_key,
            request_hash: spec.request_hash.clone(),
            status: TaskStatus::Queued,
            status_reason: String::new(),
            attempt: 0,
            max_attempts: spec.max_attempts,
            lease_epoch: 0,
            worker_id: String::new(),
            run_id: String::new(),
            lease_expires_at_ms: None,
            deadline_at_ms: None,
            timeout_ms: spec.timeout_ms,
            outcome: crate::model::Outcome::None,
            exit_code: 0,
            output_summary: String::new(),
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
        };
        match self
            .engine
            .enqueue(row, now - DEDUP_WINDOW_MS, record)
            .await
            .map_err(|e| match e {
                EnqueueError::Audit(e) => Status::from(e),
                EnqueueError::Store(e) => storage(e),
                EnqueueError::Internal(why) => {
                    tracing::error!(%why, "an enqueue failed");
                    Status::internal(
                        "the enqueue's outcome is unknown; retry with the same idempotency key",
                    )
                }
            })? {
            Inserted::New(t) => Ok(Response::new(pb::EnqueueResponse {
                task_id: t.task_id.clone(),
                task: Some(convert::task(&t, false)),
                deduplicated: false,
            })),
            Inserted::Existing(t) => dedup(t, &spec.request_hash),
        }
    }

    async fn get_task(
        &self,
        req: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let task = self.visible_task(&caller, &r.tenant, &r.task_id).await?;
        Ok(Response::new(pb::GetTaskResponse {
            task: Some(convert::task(&task, true)),
        }))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let r = req.into_inner();
        let status = match r.status {
            0 => None,
            n => Some(task_status(n).ok_or_else(|| Error::invalid("status", "unknown status"))?),
        };
        let before = if r.page_token.is_empty() {
            None
        } else {
            Some(
                r.page_token
                    .parse::<i64>()
                    .map_err(|_| Error::invalid("page_token", "not a token of this list"))?,
            )
        };
        let limit = page_size(r.page_size);
        let rows = self
            .engine
            .store()
            .list_tasks(
                &TaskFilter {
                    tenant: r.tenant,
                    pool: r.pool,
                    status,
                    agent: r.agent,
                },
                before,
                limit + 1,
            )
            .await
            .map_err(storage)?;
        let more = rows.len() > limit as usize;
        let rows = &rows[..rows.len().min(limit as usize)];
        Ok(Response::new(pb::ListTasksResponse {
            tasks: rows.iter().map(|t| convert::task(t, false)).collect(),
            next_page_token: if more {
                rows.last().map(|t| t.seq.to_string()).unwrap_or_default()
            } else {
                String::new()
            },
        }))
    }

    async fn cancel_task(
        &self,
        req: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        convert::reason("reason", &r.reason, false)?;
        let task = self.visible_task(&caller, &r.tenant, &r.task_id).await?;
        if task.status.is_final() {
            return Err(Status::failed_precondition(format!(
                "the task already {}",
                task.status.as_str()
            )));
        }
        let (tenant, pool) = task.scope.columns();
        self.engine
            .audit()
            .record_one(event(
                "task.cancelled",
                tenant,
                &task.run_id,
                AuditOutcome::Success,
                [
                    ("task_id", task.task_id.clone()),
                    ("pool", pool.to_owned()),
                    ("reason", r.reason.clone()),
                    ("cancelled_by", caller.id.as_str().to_owned()),
                ],
            ))
            .await?;
        let reason = if r.reason.is_empty() {
            "cancelled".to_owned()
        } else {
            r.reason.clone()
        };
        match self
            .engine
            .store()
            .cancel_task(&task.task_id, &reason, now_ms())
            .await
            .map_err(storage)?
        {
            Cancelled::Cancelled { before, after } => {
                crate::engine::count_final(&after);
                if before.status.is_leased() {
                    self.engine
                        .cancel_lease(&before, pb::CancelReason::Requested, &reason);
                }
                if before.status == TaskStatus::Running && !before.run_id.is_empty() {
                    self.engine
                        .revoke_run(&before.scope, &before.run_id, "the task was cancelled")
                        .await;
                }
                self.engine.notify_changed(&after.task_id);
                Ok(Response::new(pb::CancelTaskResponse {
                    task: Some(convert::task(&after, false)),
                }))
            }
            Cancelled::AlreadyFinal(t) => Err(Status::failed_precondition(format!(
                "the task already {}",
                t.status.as_str()
            ))),
            Cancelled::NotFound => Err(Error::NotFound(format!("task {}", r.task_id)).into()),
        }
    }

    async fn watch_task(
        &self,
        req: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<BoxStream<pb::WatchTaskResponse>>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let first = self.visible_task(&caller, &r.tenant, &r.task_id).await?;
        let engine = self.engine.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut changes = engine.subscribe_changes();
        tokio::spawn(async move {
            let key = |t: &TaskRow| {
                (
                    t.status,
                    t.attempt,
                    t.worker_id.clone(),
                    t.run_id.clone(),
                    t.lease_epoch,
                )
            };
            let mut last = key(&first);
            if tx
                .send(Ok(pb::WatchTaskResponse {
                    task: Some(convert::task(&first, false)),
                }))
                .await
                .is_err()
                || first.status.is_final()
            {
                return;
            }
            loop {
                // Local changes arrive at once; other replicas' within the tick.
                tokio::select! {
                    _ = wait_for(&mut changes, &first.task_id) => {}
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = tx.closed() => return,
                }
                let now = match engine.store().get_task(&first.task_id).await {
                    Ok(Some(t)) => t,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(storage(e))).await;
                        return;
                    }
                };
                if key(&now) != last {
                    last = key(&now);
                    if tx
                        .send(Ok(pb::WatchTaskResponse {
                            task: Some(convert::task(&now, false)),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if now.status.is_final() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn submit_agent(
        &self,
        req: Request<pb::SubmitAgentRequest>,
    ) -> Result<Response<pb::SubmitAgentResponse>, Status> {
        let caller = Caller::of(&req)?;
        let row = convert::submitted_agent(req.into_inner(), caller.id.as_str(), now_ms())?;
        let store = self.engine.store();
        if store
            .get_agent(&row.name, &row.version)
            .await
            .map_err(storage)?
            .is_some()
        {
            return Err(Error::AlreadyExists(format!("agent {} {}", row.name, row.version)).into());
        }
        self.engine
            .audit()
            .record_one(event(
                "agent.submitted",
                "",
                "",
                AuditOutcome::Success,
                [
                    ("agent", row.name.clone()),
                    ("version", row.version.clone()),
                    ("image", row.image.clone()),
                    ("requested_secret_keys", row.requested_secret_keys.join(",")),
                    ("submitted_by", row.submitted_by.clone()),
                ],
            ))
            .await?;
        if !store.submit_agent(&row).await.map_err(storage)? {
            return Err(Error::AlreadyExists(format!("agent {} {}", row.name, row.version)).into());
        }
        Ok(Response::new(pb::SubmitAgentResponse {
            agent: Some(convert::agent(&row)),
        }))
    }

    async fn approve_agent(
        &self,
        req: Request<pb::ApproveAgentRequest>,
    ) -> Result<Response<pb::ApproveAgentResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        convert::text("comment", &r.comment, 1024)?;
        let agent = self
            .decide(
                &caller,
                &r.name,
                &r.version,
                AgentStatus::Approved,
                &r.comment,
            )
            .await?;
        Ok(Response::new(pb::ApproveAgentResponse {
            agent: Some(agent),
        }))
    }

    async fn reject_agent(
        &self,
        req: Request<pb::RejectAgentRequest>,
    ) -> Result<Response<pb::RejectAgentResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        if r.reason.trim().is_empty() || r.reason.len() > 1024 {
            return Err(Error::invalid("reason", "must be 1 to 1024 bytes").into());
        }
        let agent = self
            .decide(
                &caller,
                &r.name,
                &r.version,
                AgentStatus::Rejected,
                &r.reason,
            )
            .await?;
        Ok(Response::new(pb::RejectAgentResponse {
            agent: Some(agent),
        }))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let r = req.into_inner();
        if !r.name.is_empty() {
            convert::agent_name("name", &r.name)?;
        }
        let status = match r.status {
            0 => None,
            1 => Some(AgentStatus::Pending),
            2 => Some(AgentStatus::Approved),
            3 => Some(AgentStatus::Rejected),
            _ => return Err(Error::invalid("status", "unknown status").into()),
        };
        let offset = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse::<u64>()
                .map_err(|_| Error::invalid("page_token", "not a token of this list"))?
        };
        let limit = page_size(r.page_size);
        let rows = self
            .engine
            .store()
            .list_agents(&r.name, status, offset, limit + 1)
            .await
            .map_err(storage)?;
        let more = rows.len() > limit as usize;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: rows
                .iter()
                .take(limit as usize)
                .map(convert::agent)
                .collect(),
            next_page_token: if more {
                (offset + u64::from(limit)).to_string()
            } else {
                String::new()
            },
        }))
    }

    async fn reset_pool(
        &self,
        req: Request<pb::ResetPoolRequest>,
    ) -> Result<Response<pb::ResetPoolResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let scope = Scope::from_columns(&r.tenant, &r.pool).ok_or_else(|| {
            Error::invalid("tenant", "exactly one of tenant and pool must be set")
        })?;
        convert::reason("reason", &r.reason, true)?;
        let store = self.engine.store();
        let workers = store.workers_of_scope(&scope).await.map_err(storage)?;
        let ids: Vec<String> = workers.iter().map(|w| w.worker_id.clone()).collect();
        let (tenant, pool) = scope.columns();
        self.engine
            .audit()
            .record_one(event(
                "fleet.pool_reset",
                tenant,
                "",
                AuditOutcome::Success,
                [
                    ("pool", pool.to_owned()),
                    ("worker_ids", ids.join(",")),
                    ("reason", r.reason.clone()),
                    ("revoke_workers", r.revoke_workers.to_string()),
                    ("reset_by", caller.id.as_str().to_owned()),
                ],
            ))
            .await?;
        // Their work is taken back first, then they are told to drain: a run
        // the drain stops reports after its lease is gone, so the report is
        // acknowledged and changes nothing (the task stays queued for its
        // next attempt instead of failing as cancelled).
        let released = store
            .release_workers_tasks(&ids, "pool reset", now_ms())
            .await
            .map_err(storage)?;
        self.engine.drain_local(&ids, &r.reason);
        let mut revoked = BTreeSet::new();
        let mut requeued = Vec::new();
        for rel in &released {
            if let Some(run) = self
                .engine
                .after_release(rel, pb::CancelReason::PoolReset)
                .await
            {
                revoked.insert(run);
            }
            if rel.after.status == TaskStatus::Queued {
                requeued.push(rel.after.task_id.clone());
            }
        }
        if r.revoke_workers {
            for w in &workers {
                self.engine
                    .revoke_worker(&scope, &w.worker_id, &r.reason)
                    .await
                    .map_err(|status| {
                        tracing::warn!(worker = %w.worker_id, code = ?status.code(), "could not revoke a worker");
                        Status::unavailable("identity unavailable: workers were evicted but not all revoked")
                    })?;
            }
        }
        store.remove_workers(&ids).await.map_err(storage)?;
        for id in &ids {
            self.engine.evict_everywhere(id, "pool reset");
        }
        Ok(Response::new(pb::ResetPoolResponse {
            evicted_worker_ids: ids,
            revoked_run_ids: revoked.into_iter().collect(),
            requeued_task_ids: requeued,
        }))
    }

    async fn list_workers(
        &self,
        req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        if !is_operator(&caller) && (r.tenant.is_empty() || !r.pool.is_empty()) {
            return Err(
                Error::denied("tenant clients list only their own tenant's workers").into(),
            );
        }
        let state = match r.state {
            0 => None,
            1 => Some(WorkerState::Connected),
            2 => Some(WorkerState::Disconnected),
            3 => Some(WorkerState::Draining),
            _ => return Err(Error::invalid("state", "unknown state").into()),
        };
        let limit = page_size(r.page_size);
        let rows = self
            .engine
            .store()
            .list_workers(
                &WorkerFilter {
                    tenant: r.tenant,
                    pool: r.pool,
                    state,
                },
                &r.page_token,
                limit + 1,
            )
            .await
            .map_err(storage)?;
        let more = rows.len() > limit as usize;
        let rows = &rows[..rows.len().min(limit as usize)];
        Ok(Response::new(pb::ListWorkersResponse {
            workers: rows
                .iter()
                .map(|w| convert::worker(w, self.engine.held(&w.worker_id)))
                .collect(),
            next_page_token: if more {
                rows.last().map(|w| w.worker_id.clone()).unwrap_or_default()
            } else {
                String::new()
            },
        }))
    }
}

impl DispatcherApi {
    async fn visible_task(
        &self,
        caller: &Caller,
        tenant: &str,
        task_id: &str,
    ) -> Result<TaskRow, Status> {
        if task_id.is_empty() || task_id.len() > 64 {
            return Err(Error::invalid("task_id", "must be 1 to 64 bytes").into());
        }
        let task = self
            .engine
            .store()
            .get_task(task_id)
            .await
            .map_err(storage)?
            .filter(|t| visible(t, tenant, caller))
            .ok_or_else(|| Status::from(Error::NotFound(format!("task {task_id}"))))?;
        if task.status == TaskStatus::Held {
            // Not a task yet: its enqueue is still being recorded (or its
            // release is being retried), and may yet fail.
            return Err(Status::unavailable(
                "the task is still being enqueued; retry shortly",
            ));
        }
        Ok(task)
    }

    /// Sealed-vault's snapshot of the task's cascade: the secret key names,
    /// refused when anything is revoked or a key the agent needs is missing,
    /// and when sealed-vault cannot answer (fail closed).
    async fn snapshot(
        &self,
        spec: &convert::EnqueueSpec,
        agent: &crate::model::AgentRow,
    ) -> Result<Vec<String>, Status> {
        let Some(cascade) = &spec.cascade else {
            if !agent.requested_secret_keys.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "agent {} requests secret keys ({}) and the task names no cascade",
                    agent.name,
                    agent.requested_secret_keys.join(", ")
                )));
            }
            return Ok(Vec::new());
        };
        let Some(sealed) = &self.sealed else {
            return Err(Status::unavailable(
                "sealed-vault unavailable: this dispatcher has no sealed-vault peer",
            ));
        };
        let snap = sealed
            .clone()
            .snapshot(sealed::SnapshotRequest {
                tenant: spec.scope.tenant().to_owned(),
                cascade: Some(cascade.clone()),
                agent: agent.name.clone(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::PermissionDenied
                | tonic::Code::NotFound
                | tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition => Status::new(s.code(), s.message().to_owned()),
                code => {
                    tracing::warn!(code = ?code, message = s.message(), "sealed-vault snapshot failed");
                    Status::unavailable("sealed-vault unavailable")
                }
            })?
            .into_inner();
        let revoked: Vec<&str> = snap
            .entries
            .iter()
            .filter(|e| {
                e.revocation == sealed::RevocationState::SoftRevoked as i32
                    || e.revocation == sealed::RevocationState::HardRevoked as i32
            })
            .map(|e| e.key.as_str())
            .collect();
        if snap.revoked || !revoked.is_empty() {
            return Err(Status::failed_precondition(format!(
                "revoked in the cascade: {}",
                if revoked.is_empty() {
                    "a profile".to_owned()
                } else {
                    revoked.join(", ")
                }
            )));
        }
        let keys: Vec<String> = snap
            .entries
            .iter()
            .filter(|e| e.kind == sealed::EntryKind::Secret as i32)
            .map(|e| e.key.clone())
            .collect();
        let missing: Vec<&str> = agent
            .requested_secret_keys
            .iter()
            .filter(|k| !keys.contains(k))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(Status::failed_precondition(format!(
                "the cascade lacks keys agent {} requests: {}",
                agent.name,
                missing.join(", ")
            )));
        }
        Ok(keys)
    }

    async fn decide(
        &self,
        caller: &Caller,
        name: &str,
        version: &str,
        status: AgentStatus,
        reason: &str,
    ) -> Result<pb::Agent, Status> {
        convert::agent_name("name", name)?;
        convert::agent_version("version", version)?;
        let store = self.engine.store();
        let agent = store
            .get_agent(name, version)
            .await
            .map_err(storage)?
            .ok_or_else(|| Error::NotFound(format!("agent {name} {version}")))?;
        let kind = match status {
            AgentStatus::Approved => "agent.approved",
            _ => "agent.rejected",
        };
        if agent.submitted_by == caller.id.as_str() {
            self.engine
                .audit()
                .record_one(event(
                    kind,
                    "",
                    "",
                    AuditOutcome::Denied,
                    [
                        ("agent", name.to_owned()),
                        ("version", version.to_owned()),
                        ("decided_by", caller.id.as_str().to_owned()),
                        ("reason", "the submitter may not decide".to_owned()),
                    ],
                ))
                .await?;
            return Err(Error::denied("an operator other than the submitter must decide").into());
        }
        if agent.status != AgentStatus::Pending {
            return Err(Status::failed_precondition(format!(
                "agent {name} {version} is {}, not pending",
                agent.status.as_str()
            )));
        }
        self.engine
            .audit()
            .record_one(event(
                kind,
                "",
                "",
                AuditOutcome::Success,
                [
                    ("agent", name.to_owned()),
                    ("version", version.to_owned()),
                    ("decided_by", caller.id.as_str().to_owned()),
                    ("submitted_by", agent.submitted_by.clone()),
                    ("reason", reason.to_owned()),
                ],
            ))
            .await?;
        match store
            .decide_agent(name, version, status, caller.id.as_str(), now_ms(), reason)
            .await
            .map_err(storage)?
        {
            Decision::Decided(a) => {
                self.engine.forget_latest(&a.name);
                Ok(convert::agent(&a))
            }
            Decision::NotPending(a) => Err(Status::failed_precondition(format!(
                "agent {name} {version} is {}, not pending",
                a.status.as_str()
            ))),
            Decision::NotFound => Err(Error::NotFound(format!("agent {name} {version}")).into()),
        }
    }
}

fn dedup(t: TaskRow, request_hash: &[u8]) -> Result<Response<pb::EnqueueResponse>, Status> {
    if t.status == TaskStatus::Held {
        // Its enqueue may yet fail, and then the task is gone.
        Err(Status::aborted(
            "an enqueue with this idempotency key is still under way; retry",
        ))
    } else if t.request_hash == request_hash {
        Ok(Response::new(pb::EnqueueResponse {
            task_id: t.task_id.clone(),
            task: Some(convert::task(&t, false)),
            deduplicated: true,
        }))
    } else {
        Err(Error::AlreadyExists("a different task with this idempotency key".to_owned()).into())
    }
}

fn task_status(n: i32) -> Option<TaskStatus> {
    Some(match n {
        1 => TaskStatus::Queued,
        2 => TaskStatus::Assigned,
        3 => TaskStatus::Running,
        4 => TaskStatus::Succeeded,
        5 => TaskStatus::Failed,
        6 => TaskStatus::Cancelled,
        _ => return None,
    })
}

async fn wait_for(changes: &mut tokio::sync::broadcast::Receiver<String>, task_id: &str) {
    loop {
        match changes.recv().await {
            Ok(id) if id == task_id => return,
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Records requests the authorization layer refuses: a tenant-scoped request
/// naming another tenant is `fleet.cross_tenant_refused`, anything else
/// `fleet.access_denied`.
#[derive(Debug, Clone)]
pub struct AuditDenials {
    audit: bulkhead_mesh::audit::AuditClient,
}

impl AuditDenials {
    pub fn new(audit: bulkhead_mesh::audit::AuditClient) -> Self {
        Self { audit }
    }
}

impl bulkhead_mesh::authz::DenialSink for AuditDenials {
    fn denied(&self, caller: Option<&bulkhead_mesh::spiffe::SpiffeId>, method: &str, reason: &str) {
        let tenant = caller.and_then(|c| c.principal().tenant().map(str::to_owned));
        let kind = if reason.contains("tenant") {
            "fleet.cross_tenant_refused"
        } else {
            "fleet.access_denied"
        };
        let ev = event(
            kind,
            tenant.as_deref().unwrap_or(""),
            "",
            AuditOutcome::Denied,
            [
                (
                    "caller",
                    caller.map_or_else(|| "<unauthenticated>".into(), ToString::to_string),
                ),
                ("method", method.to_owned()),
                ("reason", reason.to_owned()),
            ],
        );
        let audit = self.audit.clone();
        tokio::spawn(async move {
            if let Err(e) = audit.record_one(ev).await {
                tracing::warn!(error = %e, "could not audit a refused request");
            }
        });
    }
}
