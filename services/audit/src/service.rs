//! The audit service's gRPC handlers (thin: convert, authorize by data, call
//! the log) and their authorization table.

use std::pin::Pin;
use std::sync::Arc;

use bulkhead_mesh::authz::{Policy, Rule, who};
use bulkhead_mesh::{Caller, Error};
use bulkhead_proto::audit::v1 as pb;
use bulkhead_proto::audit::v1::audit_service_server::{AuditService, AuditServiceServer};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::event::{self, Event, NewEvent};
use crate::log::Log;
use crate::merkle::ProofError;
use crate::ownership;
use crate::store::{Filter, Page, StoredEvent};
use crate::verify::{self, Problem};

/// Who may call each RPC of `bulkhead.audit.v1.AuditService`. A method missing
/// here is denied to everyone. Which event types each service may append is
/// the second table, in [`ownership`].
pub static RULES: &[Rule] = &[
    Rule::new(
        "Append",
        &[
            who::IDENTITY,
            who::SEALED_VAULT,
            who::DISPATCHER,
            who::SANDBOX_RUNNER,
        ],
    ),
    // Sealed-vault reads back its own resolutions at start, to replay the
    // run holdings a power cut may have taken from its store; the dispatcher
    // reads back its own enqueues, to settle tasks a crash left held.
    Rule::new(
        "Query",
        &[
            who::OPERATOR,
            who::TENANT_CLIENT,
            who::SEALED_VAULT,
            who::DISPATCHER,
        ],
    )
    .tenant_scoped(),
    Rule::new("Tail", &[who::OPERATOR, who::TENANT_CLIENT]).tenant_scoped(),
    Rule::new("Verify", &[who::OPERATOR]),
    Rule::new("Export", &[who::OPERATOR, who::TENANT_CLIENT]).tenant_scoped(),
    Rule::new("GetCheckpoint", &[who::ANYONE]),
    Rule::new("GetInclusionProof", &[who::OPERATOR, who::TENANT_CLIENT]).tenant_scoped(),
    Rule::new("GetConsistencyProof", &[who::ANYONE]),
];

pub const POLICY: Policy = Policy {
    service: "bulkhead.audit.v1.AuditService",
    rules: RULES,
};

/// Default and largest page of Query.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;
/// Rows read per store query while streaming.
const STREAM_CHUNK: u32 = 1000;

/// The service's handlers.
#[derive(Debug, Clone)]
pub struct AuditApi {
    log: Log,
    /// Ends live tails when the server shuts down.
    draining: CancellationToken,
}

impl AuditApi {
    pub fn new(log: Log, draining: CancellationToken) -> Self {
        Self { log, draining }
    }
}

/// The gRPC server for [`AuditApi`].
pub fn server(api: AuditApi) -> AuditServiceServer<AuditApi> {
    AuditServiceServer::new(api).max_decoding_message_size(5 * 1024 * 1024)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn time_us(ts: Option<prost_types::Timestamp>) -> Option<i64> {
    ts.map(|t| t.seconds.saturating_mul(1_000_000) + i64::from(t.nanos / 1000))
}

/// A read filter; a tenant client's tenant was checked against its
/// certificate by the mesh layer, and an empty tenant is for operators only.
fn filter(
    caller: &Caller,
    tenant: String,
    type_prefix: String,
    run_id: String,
    actor: String,
    start: Option<prost_types::Timestamp>,
    end: Option<prost_types::Timestamp>,
) -> Result<Filter, Error> {
    // A service (neither operator nor of a tenant) reads only what it
    // appended itself, of every tenant.
    let service = !caller.is_operator() && caller.tenant().is_none();
    if service && actor != caller.id.to_string() {
        return Err(Error::denied(
            "a service may read only the events it appended: set actor to its own id",
        ));
    }
    if tenant.is_empty() && !caller.is_operator() && !service {
        return Err(Error::denied(
            "only operators may read every tenant's events",
        ));
    }
    if type_prefix.len() > event::MAX_TYPE_LEN {
        return Err(Error::invalid("type_prefix", "longer than 128 bytes"));
    }
    let (start_us, end_us) = (time_us(start), time_us(end));
    if let (Some(s), Some(e)) = (start_us, end_us)
        && e < s
    {
        return Err(Error::invalid("end_time", "before start_time"));
    }
    let some = |s: String| (!s.is_empty()).then_some(s);
    Ok(Filter {
        tenant: some(tenant),
        type_prefix: some(type_prefix),
        run_id: some(run_id),
        actor: some(actor),
        start_us,
        end_us,
    })
}

fn matches(f: &Filter, e: &Event) -> bool {
    f.tenant.as_ref().is_none_or(|t| *t == e.tenant)
        && f.type_prefix
            .as_ref()
            .is_none_or(|p| e.kind.starts_with(p.as_str()))
        && f.run_id.as_ref().is_none_or(|r| *r == e.run_id)
        && f.actor.as_ref().is_none_or(|a| *a == e.actor)
        && f.start_us.is_none_or(|s| e.time_us >= s)
        && f.end_us.is_none_or(|x| e.time_us < x)
}

fn proof_err(e: ProofError) -> Error {
    match e {
        ProofError::IndexOutOfRange { .. } => Error::invalid("leaf", e.to_string()),
        ProofError::FirstAfterSecond { .. } => Error::invalid("first_tree_size", e.to_string()),
        _ => Error::invalid("tree_size", e.to_string()),
    }
}

fn store_err(e: crate::store::StoreError) -> Error {
    Error::unavailable("audit store", e)
}

/// One export line: the leaf object plus its leaf hash (and a proof).
pub fn export_line(e: &StoredEvent, proof: Option<&[crate::merkle::Hash]>) -> String {
    let leaf = e.event.leaf();
    let mut line = String::with_capacity(leaf.len() + 128);
    line.push_str(&leaf[..leaf.len() - 1]);
    line.push_str(",\"leaf_hash\":\"");
    line.push_str(&hex::encode(e.leaf_hash));
    line.push('"');
    if let Some(p) = proof {
        line.push_str(",\"inclusion_proof\":[");
        for (i, h) in p.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push('"');
            line.push_str(&hex::encode(h));
            line.push('"');
        }
        line.push(']');
    }
    line.push_str("}\n");
    line
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn append(
        &self,
        req: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let caller = Caller::of(&req)?;
        let events = req.into_inner().events;
        if events.is_empty() || events.len() > event::MAX_BATCH {
            return Err(Error::invalid("events", "a batch holds 1 to 1000 events").into());
        }
        let mut batch = Vec::with_capacity(events.len());
        for (i, e) in events.into_iter().enumerate() {
            let e = NewEvent::try_from(e).map_err(|err| match err {
                Error::InvalidArgument { field, reason } => Error::invalid(
                    "events",
                    format!("[{i}].{}: {reason}", field.trim_start_matches("events.")),
                ),
                other => other,
            })?;
            if !ownership::may_write(&caller.id, &e.kind) {
                return Err(Error::denied(format!(
                    "{} may not write events of type {}",
                    caller.id, e.kind
                ))
                .into());
            }
            batch.push(e);
        }
        let sequences = self.log.append(&caller.id, batch).await?;
        Ok(Response::new(pb::AppendResponse { sequences }))
    }

    async fn query(
        &self,
        req: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let limit = match r.limit {
            0 => DEFAULT_LIMIT,
            n if n <= MAX_LIMIT => n,
            _ => return Err(Error::invalid("limit", "at most 1000").into()),
        };
        let f = filter(
            &caller,
            r.tenant,
            r.type_prefix,
            r.run_id,
            r.actor,
            r.start_time,
            r.end_time,
        )?;
        // One more than asked tells whether another page exists.
        let mut rows = self
            .log
            .store()
            .query(&f, Page::After(r.after_sequence), limit + 1)
            .await
            .map_err(store_err)?;
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next = if more {
            rows.last().map_or(0, |e| e.event.sequence)
        } else {
            0
        };
        Ok(Response::new(pb::QueryResponse {
            events: rows.iter().map(|e| e.event.to_pb()).collect(),
            next_after_sequence: next,
        }))
    }

    async fn tail(
        &self,
        req: Request<pb::TailRequest>,
    ) -> Result<Response<BoxStream<pb::TailResponse>>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let f = filter(
            &caller,
            r.tenant,
            r.type_prefix,
            r.run_id,
            r.actor,
            None,
            None,
        )?;
        // Subscribe before reading the store so nothing falls between the two.
        let mut live = self.log.subscribe();
        let store = Arc::clone(self.log.store());
        let start = if r.from_sequence == 0 {
            self.log.size()
        } else {
            r.from_sequence - 1
        };
        let draining = self.draining.clone();
        let stream = async_stream(move |tx| async move {
            let mut sent = start;
            // Replays stored events after `sent`, then follows live ones.
            let replay = |sent: u64| {
                let store = Arc::clone(&store);
                let f = f.clone();
                async move { store.query(&f, Page::After(sent), STREAM_CHUNK).await }
            };
            loop {
                let rows = match replay(sent).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(store_err(e)))).await;
                        return;
                    }
                };
                if rows.is_empty() {
                    break;
                }
                for e in rows {
                    sent = e.event.sequence;
                    if tx
                        .send(Ok(pb::TailResponse {
                            event: Some(e.event.to_pb()),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            loop {
                let next = tokio::select! {
                    () = draining.cancelled() => return,
                    n = live.recv() => n,
                };
                match next {
                    Ok(e) => {
                        if e.sequence <= sent {
                            continue;
                        }
                        if matches(&f, &e) {
                            let msg = pb::TailResponse {
                                event: Some(e.to_pb()),
                            };
                            if tx.send(Ok(msg)).await.is_err() {
                                return;
                            }
                        }
                        sent = e.sequence;
                    }
                    Err(RecvError::Lagged(_)) => {
                        // Fell behind the live feed: catch up from the store.
                        loop {
                            let rows = match replay(sent).await {
                                Ok(r) => r,
                                Err(e) => {
                                    let _ = tx.send(Err(Status::from(store_err(e)))).await;
                                    return;
                                }
                            };
                            if rows.is_empty() {
                                break;
                            }
                            for e in rows {
                                sent = e.event.sequence;
                                if tx
                                    .send(Ok(pb::TailResponse {
                                        event: Some(e.event.to_pb()),
                                    }))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let r = req.into_inner();
        if r.to_sequence != 0 && r.from_sequence > r.to_sequence {
            return Err(Error::invalid("from_sequence", "after to_sequence").into());
        }
        // Sign a head over everything committed so far, so that Verify checks
        // the newest events against a signature too, not only their leaves.
        self.log.checkpoint().await.map_err(store_err)?;
        let report = verify::verify(
            self.log.store().as_ref(),
            &self.log.signer().public(),
            r.from_sequence,
            r.to_sequence,
        )
        .await
        .map_err(store_err)?;
        let problem = match report.problem {
            None => pb::VerifyProblem::Unspecified,
            Some(Problem::LeafMismatch) => pb::VerifyProblem::LeafMismatch,
            Some(Problem::SequenceGap) => pb::VerifyProblem::SequenceGap,
            Some(Problem::RootMismatch) => pb::VerifyProblem::RootMismatch,
            Some(Problem::BadSignature) => pb::VerifyProblem::BadSignature,
        };
        if let Some(bad) = report.first_bad {
            tracing::error!(first_bad = bad, problem = ?report.problem, "audit log verification failed");
        }
        Ok(Response::new(pb::VerifyResponse {
            ok: report.ok(),
            first_bad_sequence: report.first_bad.unwrap_or(0),
            problem: problem as i32,
            checked: report.checked,
            tree_head: report.head.map(|h| h.to_pb()),
        }))
    }

    async fn export(
        &self,
        req: Request<pb::ExportRequest>,
    ) -> Result<Response<BoxStream<pb::ExportResponse>>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let f = filter(
            &caller,
            r.tenant,
            r.type_prefix,
            r.run_id,
            r.actor,
            r.start_time,
            r.end_time,
        )?;
        let filtered = f.tenant.is_some()
            || f.type_prefix.is_some()
            || f.run_id.is_some()
            || f.actor.is_some()
            || f.start_us.is_some()
            || f.end_us.is_some()
            || r.after_sequence > 0;
        // Cut at a head that covers everything committed so far.
        self.log.checkpoint().await.map_err(store_err)?;
        let head = self
            .log
            .latest_head()
            .ok_or_else(|| Error::unavailable("audit checkpoint", std::io::Error::other("none")))?;
        let log = self.log.clone();
        let stream = async_stream(move |tx| async move {
            let mut after = r.after_sequence;
            loop {
                let rows = match log
                    .store()
                    .query(&f, Page::After(after), STREAM_CHUNK)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(store_err(e)))).await;
                        return;
                    }
                };
                if rows.is_empty() {
                    break;
                }
                for e in rows {
                    if e.event.sequence > head.tree_size {
                        break;
                    }
                    after = e.event.sequence;
                    let proof = if filtered {
                        match log.inclusion_proof(e.event.sequence - 1, head.tree_size) {
                            Ok(p) => Some(p),
                            Err(err) => {
                                let _ = tx.send(Err(Status::from(proof_err(err)))).await;
                                return;
                            }
                        }
                    } else {
                        None
                    };
                    let line = export_line(&e, proof.as_deref());
                    if tx.send(Ok(pb::ExportResponse { line })).await.is_err() {
                        return;
                    }
                }
                if after >= head.tree_size {
                    break;
                }
            }
            let last = format!("{}\n", serde_json::json!({ "tree_head": head.to_json() }));
            let _ = tx.send(Ok(pb::ExportResponse { line: last })).await;
        });
        Ok(Response::new(stream))
    }

    async fn get_checkpoint(
        &self,
        req: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let size = req.into_inner().tree_size;
        let head = if size == 0 {
            self.log.latest_head()
        } else {
            self.log.store().head_at(size).await.map_err(store_err)?
        };
        let head =
            head.ok_or_else(|| Error::NotFound(format!("signed tree head of size {size}")))?;
        Ok(Response::new(pb::GetCheckpointResponse {
            tree_head: Some(head.to_pb()),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        req: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::GetInclusionProofResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let sequence = match r.leaf {
            Some(pb::get_inclusion_proof_request::Leaf::Sequence(s)) if s > 0 => s,
            Some(pb::get_inclusion_proof_request::Leaf::LeafIndex(i)) => i + 1,
            _ => {
                return Err(Error::invalid(
                    "leaf",
                    "a sequence (from 1) or leaf index is required",
                )
                .into());
            }
        };
        let head = if r.tree_size == 0 {
            self.log.latest_head()
        } else {
            self.log
                .store()
                .head_at(r.tree_size)
                .await
                .map_err(store_err)?
        };
        let size = if r.tree_size == 0 {
            head.as_ref().map_or(0, |h| h.tree_size)
        } else {
            r.tree_size
        };
        let not_found = || Error::NotFound(format!("event {sequence}"));
        let stored = self
            .log
            .store()
            .get(sequence)
            .await
            .map_err(store_err)?
            .ok_or_else(not_found)?;
        // Another tenant's event does not exist for a tenant client.
        if !caller.is_operator() && Some(stored.event.tenant.as_str()) != caller.tenant() {
            return Err(not_found().into());
        }
        let audit_path = self
            .log
            .inclusion_proof(sequence - 1, size)
            .map_err(proof_err)?;
        Ok(Response::new(pb::GetInclusionProofResponse {
            event: Some(stored.event.to_pb()),
            leaf_index: sequence - 1,
            tree_size: size,
            audit_path: audit_path.iter().map(|h| h.to_vec().into()).collect(),
            tree_head: head.map(|h| h.to_pb()),
        }))
    }

    async fn get_consistency_proof(
        &self,
        req: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::GetConsistencyProofResponse>, Status> {
        let r = req.into_inner();
        if r.first_tree_size == 0 {
            return Err(Error::invalid("first_tree_size", "at least 1").into());
        }
        let second = if r.second_tree_size == 0 {
            self.log.latest_head().map_or(0, |h| h.tree_size)
        } else {
            r.second_tree_size
        };
        let proof = self
            .log
            .consistency_proof(r.first_tree_size, second)
            .map_err(proof_err)?;
        let store = self.log.store();
        let first_head = store.head_at(r.first_tree_size).await.map_err(store_err)?;
        let second_head = store.head_at(second).await.map_err(store_err)?;
        Ok(Response::new(pb::GetConsistencyProofResponse {
            first_tree_size: r.first_tree_size,
            second_tree_size: second,
            proof: proof.iter().map(|h| h.to_vec().into()).collect(),
            first_tree_head: first_head.map(|h| h.to_pb()),
            second_tree_head: second_head.map(|h| h.to_pb()),
        }))
    }
}

/// A response stream fed by a task; the task ends when the client goes away.
fn async_stream<T, F, Fut>(f: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
