//! The identity service's gRPC handlers and their authorization table.
//!
//! Until the identity issue lands, every RPC answers UNIMPLEMENTED (tonic's
//! default stubs); the table below is already enforced by the mesh layer.

use bulkhead_mesh::authz::{Policy, Rule, who};
use bulkhead_proto::identity::v1::identity_service_server::{
    IdentityService, IdentityServiceServer,
};

/// Who may call each RPC of `bulkhead.identity.v1.IdentityService`. A method missing
/// here is denied to everyone.
pub static RULES: &[Rule] = &[
    Rule::new("GetTrustBundle", &[who::ANYONE]),
    Rule::new("CreateJoinToken", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("ListJoinTokens", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("RevokeJoinToken", &[who::OPERATOR]),
    Rule::new("EnrollWorker", &[who::UNAUTHENTICATED]),
    Rule::new("RenewWorkerSvid", &[who::TENANT_WORKER, who::POOL_WORKER]),
    Rule::new("MintRunSvid", &[who::DISPATCHER]).tenant_scoped(),
    Rule::new("MintJwtSvid", &[who::RUN, who::POOL_RUN]),
    Rule::new(
        "ValidateJwtSvid",
        &[
            who::SEALED_VAULT,
            who::SANDBOX_RUNNER,
            who::DISPATCHER,
            who::AUDIT,
        ],
    ),
    Rule::new(
        "Revoke",
        &[
            who::OPERATOR,
            who::DISPATCHER,
            who::SANDBOX_RUNNER,
            who::SEALED_VAULT,
        ],
    )
    .tenant_scoped(),
    Rule::new(
        "WatchRevocations",
        &[
            who::SEALED_VAULT,
            who::SANDBOX_RUNNER,
            who::DISPATCHER,
            who::AUDIT,
            who::OPERATOR,
        ],
    ),
    Rule::new("ListRevocations", &[who::OPERATOR]).tenant_scoped(),
];

pub const POLICY: Policy = Policy {
    service: "bulkhead.identity.v1.IdentityService",
    rules: RULES,
};

/// The service's handlers.
#[derive(Debug, Default, Clone)]
pub struct IdentityApi;

impl IdentityService for IdentityApi {}

/// The gRPC server for [`IdentityApi`].
pub fn server(api: IdentityApi) -> IdentityServiceServer<IdentityApi> {
    IdentityServiceServer::new(api)
}
