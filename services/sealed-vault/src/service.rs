//! The sealed-vault service's gRPC handlers and their authorization table.
//!
//! Until the sealed-vault issue lands, every RPC answers UNIMPLEMENTED (tonic's
//! default stubs); the table below is already enforced by the mesh layer.

use bulkhead_mesh::authz::{Policy, Rule, who};
use bulkhead_proto::sealed::v1::sealed_vault_service_server::{
    SealedVaultService, SealedVaultServiceServer,
};

/// Who may call each RPC of `bulkhead.sealed.v1.SealedVaultService`. A method missing
/// here is denied to everyone.
pub static RULES: &[Rule] = &[
    Rule::new("CreateProfile", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("UpdateProfile", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("GetProfile", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("ListProfiles", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("DeleteProfile", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("PutSecret", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("DeleteSecret", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("RevealSecret", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("Resolve", &[who::SANDBOX_RUNNER]).tenant_scoped(),
    Rule::new("Snapshot", &[who::DISPATCHER]).tenant_scoped(),
    Rule::new("PreviewCascade", &[who::OPERATOR, who::TENANT_CLIENT]).tenant_scoped(),
    Rule::new("RevokeSecret", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("LiftRevocation", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("ListRevocations", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("RotateMasterKey", &[who::OPERATOR]),
    Rule::new("ExportStore", &[who::OPERATOR]),
    Rule::new("ImportStore", &[who::OPERATOR]),
];

pub const POLICY: Policy = Policy {
    service: "bulkhead.sealed.v1.SealedVaultService",
    rules: RULES,
};

/// The service's handlers.
#[derive(Debug, Default, Clone)]
pub struct SealedVaultApi;

impl SealedVaultService for SealedVaultApi {}

/// The gRPC server for [`SealedVaultApi`].
pub fn server(api: SealedVaultApi) -> SealedVaultServiceServer<SealedVaultApi> {
    SealedVaultServiceServer::new(api)
}
