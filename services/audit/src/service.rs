//! The audit service's gRPC handlers and their authorization table.
//!
//! Until the audit issue lands, every RPC answers UNIMPLEMENTED (tonic's
//! default stubs); the table below is already enforced by the mesh layer.

use bulkhead_mesh::authz::{Policy, Rule, who};
use bulkhead_proto::audit::v1::audit_service_server::{AuditService, AuditServiceServer};

/// Who may call each RPC of `bulkhead.audit.v1.AuditService`. A method missing
/// here is denied to everyone.
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
    Rule::new("Query", &[who::OPERATOR, who::TENANT_CLIENT]).tenant_scoped(),
    Rule::new("Tail", &[who::OPERATOR, who::TENANT_CLIENT]).tenant_scoped(),
    Rule::new("Verify", &[who::OPERATOR]),
    Rule::new("Export", &[who::OPERATOR, who::TENANT_CLIENT]).tenant_scoped(),
    Rule::new(
        "GetCheckpoint",
        &[
            who::OPERATOR,
            who::TENANT_CLIENT,
            who::IDENTITY,
            who::SEALED_VAULT,
            who::DISPATCHER,
            who::SANDBOX_RUNNER,
        ],
    ),
    Rule::new("GetInclusionProof", &[who::OPERATOR, who::TENANT_CLIENT]).tenant_scoped(),
    Rule::new(
        "GetConsistencyProof",
        &[
            who::OPERATOR,
            who::TENANT_CLIENT,
            who::IDENTITY,
            who::SEALED_VAULT,
            who::DISPATCHER,
            who::SANDBOX_RUNNER,
        ],
    ),
];

pub const POLICY: Policy = Policy {
    service: "bulkhead.audit.v1.AuditService",
    rules: RULES,
};

/// The service's handlers.
#[derive(Debug, Default, Clone)]
pub struct AuditApi;

impl AuditService for AuditApi {}

/// The gRPC server for [`AuditApi`].
pub fn server(api: AuditApi) -> AuditServiceServer<AuditApi> {
    AuditServiceServer::new(api)
}
