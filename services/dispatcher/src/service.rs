//! The dispatcher service's gRPC handlers and their authorization table.
//!
//! Until the dispatcher issue lands, every RPC answers UNIMPLEMENTED (tonic's
//! default stubs); the table below is already enforced by the mesh layer.

use bulkhead_mesh::authz::{Policy, Rule, who};
use bulkhead_proto::dispatcher::v1::dispatcher_service_server::{
    DispatcherService, DispatcherServiceServer,
};

// ClaimTask is not tenant-scoped here on purpose: a worker naming another
// tenant's task must reach the handler, which refuses it and records
// `fleet.cross_tenant_refused` in audit.

/// Who may call each RPC of `bulkhead.dispatcher.v1.DispatcherService`. A method missing
/// here is denied to everyone.
pub static RULES: &[Rule] = &[
    Rule::new("RegisterWorker", &[who::TENANT_WORKER, who::POOL_WORKER]),
    Rule::new("Claim", &[who::TENANT_WORKER, who::POOL_WORKER]),
    Rule::new("ClaimTask", &[who::TENANT_WORKER, who::POOL_WORKER]),
    Rule::new("Enqueue", &[who::TENANT_CLIENT, who::OPERATOR]).tenant_scoped(),
    Rule::new("GetTask", &[who::TENANT_CLIENT, who::OPERATOR]).tenant_scoped(),
    Rule::new("ListTasks", &[who::TENANT_CLIENT, who::OPERATOR]).tenant_scoped(),
    Rule::new("CancelTask", &[who::TENANT_CLIENT, who::OPERATOR]).tenant_scoped(),
    Rule::new("WatchTask", &[who::TENANT_CLIENT, who::OPERATOR]).tenant_scoped(),
    Rule::new("SubmitAgent", &[who::OPERATOR]),
    Rule::new("ApproveAgent", &[who::OPERATOR]),
    Rule::new("RejectAgent", &[who::OPERATOR]),
    Rule::new("ListAgents", &[who::OPERATOR]),
    Rule::new("ResetPool", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("ListWorkers", &[who::OPERATOR]).tenant_scoped(),
];

pub const POLICY: Policy = Policy {
    service: "bulkhead.dispatcher.v1.DispatcherService",
    rules: RULES,
};

/// The service's handlers.
#[derive(Debug, Default, Clone)]
pub struct DispatcherApi;

impl DispatcherService for DispatcherApi {}

/// The gRPC server for [`DispatcherApi`].
pub fn server(api: DispatcherApi) -> DispatcherServiceServer<DispatcherApi> {
    DispatcherServiceServer::new(api)
}
