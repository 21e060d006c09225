//! The sandbox-runner service's gRPC handlers and their authorization table.
//!
//! Until the sandbox-runner issue lands, every RPC answers UNIMPLEMENTED (tonic's
//! default stubs); the table below is already enforced by the mesh layer.

use bulkhead_mesh::authz::{Policy, Rule, who};
use bulkhead_proto::sandbox::v1::sandbox_service_server::{SandboxService, SandboxServiceServer};

/// Who may call each RPC of `bulkhead.sandbox.v1.SandboxService`. A method missing
/// here is denied to everyone.
pub static RULES: &[Rule] = &[
    Rule::new("StartSandbox", &[who::TENANT_WORKER, who::POOL_WORKER]).tenant_scoped(),
    Rule::new("StreamOutput", &[who::TENANT_WORKER, who::POOL_WORKER]).tenant_scoped(),
    Rule::new("ReleaseSandbox", &[who::TENANT_WORKER, who::POOL_WORKER]).tenant_scoped(),
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
#[derive(Debug, Default, Clone)]
pub struct SandboxRunnerApi;

impl SandboxService for SandboxRunnerApi {}

/// The gRPC server for [`SandboxRunnerApi`].
pub fn server(api: SandboxRunnerApi) -> SandboxServiceServer<SandboxRunnerApi> {
    SandboxServiceServer::new(api)
}
