//! The sandbox-runner service's gRPC handlers (thin: convert, call the
//! runner, convert back) and their authorization table.

use std::pin::Pin;

use bulkhead_mesh::authz::{PeerInfo, Policy, Rule, who};
use bulkhead_mesh::{Caller, Error};
use bulkhead_proto::sandbox::v1 as pb;
use bulkhead_proto::sandbox::v1::sandbox_service_server::{SandboxService, SandboxServiceServer};
use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::model::{self, ExitReason, StartRequest, State};
use crate::output::{Item, Stream as OutStream};
use crate::runner::{Runner, Who};
use crate::sandbox::Sandbox;

/// Who may call each RPC of `bulkhead.sandbox.v1.SandboxService`. A method missing
/// here is denied to everyone. Which sandbox a caller may touch (its own, as
/// a worker; any, as an operator) is decided by the runner, which answers
/// NOT_FOUND for another worker's sandbox.
pub static RULES: &[Rule] = &[
    Rule::new("StartSandbox", &[who::TENANT_WORKER, who::POOL_WORKER]).tenant_scoped(),
    Rule::new(
        "StreamOutput",
        &[who::TENANT_WORKER, who::POOL_WORKER, who::OPERATOR],
    )
    .tenant_scoped(),
    Rule::new(
        "ReleaseSandbox",
        &[who::TENANT_WORKER, who::POOL_WORKER, who::OPERATOR],
    )
    .tenant_scoped(),
    Rule::new(
        "ListSandboxes",
        &[who::TENANT_WORKER, who::POOL_WORKER, who::OPERATOR],
    )
    .tenant_scoped(),
    Rule::new(
        "GetSandbox",
        &[who::TENANT_WORKER, who::POOL_WORKER, who::OPERATOR],
    )
    .tenant_scoped(),
];

pub const POLICY: Policy = Policy {
    service: "bulkhead.sandbox.v1.SandboxService",
    rules: RULES,
};

/// The service's handlers.
#[derive(Debug, Clone)]
pub struct SandboxRunnerApi {
    runner: Runner,
    /// Cancelled when shutdown begins: open output streams end then, so
    /// that the drain does not wait for sandboxes to exit.
    draining: CancellationToken,
}

impl SandboxRunnerApi {
    pub fn new(runner: Runner, draining: CancellationToken) -> Self {
        Self { runner, draining }
    }
}

/// The gRPC server for [`SandboxRunnerApi`].
pub fn server(api: SandboxRunnerApi) -> SandboxServiceServer<SandboxRunnerApi> {
    SandboxServiceServer::new(api)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn who<T>(req: &Request<T>) -> Result<Who, Status> {
    let caller = Caller::of(req)?;
    let serial = req
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.serial.as_ref())
        .map(|s| {
            let hex = hex::encode(s);
            let trimmed = hex.trim_start_matches('0');
            trimmed.to_owned()
        });
    Ok(Who {
        id: caller.id,
        serial,
    })
}

fn sandbox_pb(sb: &Sandbox) -> pb::Sandbox {
    let status = sb.status();
    pb::Sandbox {
        tenant: sb.tenant.clone(),
        sandbox_id: sb.id.clone(),
        run_id: sb.run_id.clone(),
        task_id: sb.task_id.clone(),
        worker_id: match sb.worker.principal() {
            bulkhead_mesh::Principal::TenantWorker { worker, .. }
            | bulkhead_mesh::Principal::PoolWorker { worker, .. } => worker.to_owned(),
            _ => sb.worker.to_string(),
        },
        backend: sb.backend.to_pb() as i32,
        image: sb.image.clone(),
        state: status.state.to_pb() as i32,
        injected_keys: status.injected_keys,
        container_id: status.container_id,
        limits: Some(sb.limits.to_pb()),
        network: Some(sb.network.to_pb()),
        created_at: Some(model::timestamp(sb.created_at)),
        exit: sb.output.exit().map(|e| e.to_pb()),
        scrub: status.scrub.map(|r| r.to_pb()),
    }
}

fn item_pb(item: Item) -> pb::StreamOutputResponse {
    use pb::stream_output_response::Event;
    let event = match item {
        Item::Chunk(c) => Event::Chunk(pb::OutputChunk {
            stream: match c.stream {
                OutStream::Stdout => pb::OutputStream::Stdout,
                OutStream::Stderr => pb::OutputStream::Stderr,
            } as i32,
            data: c.data,
            offset: c.offset,
        }),
        Item::Exit(e) => Event::Exit(e.to_pb()),
    };
    pb::StreamOutputResponse { event: Some(event) }
}

impl SandboxRunnerApi {
    fn find(&self, who: &Who, tenant: &str, id: &str) -> Result<std::sync::Arc<Sandbox>, Error> {
        model::check_tenant_field(tenant)?;
        model::check_sandbox_id(id)?;
        self.runner.find(who, tenant, id)
    }
}

#[tonic::async_trait]
impl SandboxService for SandboxRunnerApi {
    async fn start_sandbox(
        &self,
        req: Request<pb::StartSandboxRequest>,
    ) -> Result<Response<pb::StartSandboxResponse>, Status> {
        let who = who(&req)?;
        let start = StartRequest::try_from(req.into_inner())?;
        let sb = self.runner.start(who, start).await?;
        Ok(Response::new(pb::StartSandboxResponse {
            sandbox: Some(sandbox_pb(&sb)),
        }))
    }

    async fn stream_output(
        &self,
        req: Request<pb::StreamOutputRequest>,
    ) -> Result<Response<BoxStream<pb::StreamOutputResponse>>, Status> {
        let who = who(&req)?;
        let r = req.into_inner();
        let sb = self.find(&who, &r.tenant, &r.sandbox_id)?;
        let reader = sb.output.reader(r.from_offset);
        let draining = self.draining.clone();
        // Ends with the exit; at shutdown with UNAVAILABLE (resume elsewhere
        // or later from the last offset).
        let stream = futures::stream::unfold(Some(reader), move |reader| {
            let draining = draining.clone();
            async move {
                let mut reader = reader?;
                tokio::select! {
                    () = draining.cancelled() => {
                        Some((Err(Status::unavailable("the runner is shutting down")), None))
                    }
                    item = reader.next() => {
                        let item = item?;
                        Some((Ok(item_pb(item)), Some(reader)))
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn release_sandbox(
        &self,
        req: Request<pb::ReleaseSandboxRequest>,
    ) -> Result<Response<pb::ReleaseSandboxResponse>, Status> {
        let who = who(&req)?;
        let r = req.into_inner();
        let sb = self.find(&who, &r.tenant, &r.sandbox_id)?;
        let report = self.runner.release(&sb, ExitReason::Released).await?;
        Ok(Response::new(pb::ReleaseSandboxResponse {
            report: Some(report.to_pb()),
        }))
    }

    async fn list_sandboxes(
        &self,
        req: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let who = who(&req)?;
        let r = req.into_inner();
        model::check_tenant_field(&r.tenant)?;
        let state = match pb::SandboxState::try_from(r.state) {
            Ok(s) => State::from_pb(s),
            Err(_) => return Err(Error::invalid("state", "unknown state").into()),
        };
        let before = if r.page_token.is_empty() {
            None
        } else {
            Some(
                r.page_token
                    .parse::<u64>()
                    .map_err(|_| Error::invalid("page_token", "unknown token"))?,
            )
        };
        let limit = match r.page_size {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let mut all = self.runner.list(&who, &r.tenant, state, before);
        let next = if all.len() > limit {
            all.truncate(limit);
            all.last().map(|s| s.seq().to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSandboxesResponse {
            sandboxes: all.iter().map(|s| sandbox_pb(s)).collect(),
            next_page_token: next,
        }))
    }

    async fn get_sandbox(
        &self,
        req: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::GetSandboxResponse>, Status> {
        let who = who(&req)?;
        let r = req.into_inner();
        let sb = self.find(&who, &r.tenant, &r.sandbox_id)?;
        Ok(Response::new(pb::GetSandboxResponse {
            sandbox: Some(sandbox_pb(&sb)),
        }))
    }
}
