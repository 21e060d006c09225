//! Every RPC of every running binary enforces its row of the authorization
//! table, for every kind of caller, over real mTLS connections; and the tables
//! agree with the API (every RPC has a row, every tenant-scoped row has a
//! `string tenant = 1` to check).

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use bulkhead_mesh::authz::{Policy, Table};
use bulkhead_mesh::spiffe::TrustDomain;
use bulkhead_testkit::mesh::TestMesh;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use tonic::Code;

/// Each binary, the service it serves, and its table.
fn services() -> Vec<(&'static str, Policy)> {
    vec![
        ("identity", bulkhead_identity::service::POLICY),
        ("sealed-vault", bulkhead_sealed_vault::service::POLICY),
        ("dispatcher", bulkhead_dispatcher::service::POLICY),
        ("sandbox-runner", bulkhead_sandbox_runner::service::POLICY),
        ("audit", bulkhead_audit::service::POLICY),
    ]
}

/// The kinds of caller of a Bulkhead trust domain.
const CALLERS: &[&str] = &[
    "admin/operator",
    "tenant/acme/client/api",
    "tenant/acme/worker/w1",
    "pool/gpu/worker/w2",
    "tenant/acme/run/r1",
    "pool/gpu/run/r2",
    "service/identity",
    "service/sealed-vault",
    "service/dispatcher",
    "service/audit",
    "service/sandbox-runner/host-a",
];

#[derive(Clone, PartialEq, prost::Message)]
struct TenantOnly {
    #[prost(string, tag = "1")]
    tenant: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Ignored {}

async fn call(
    ch: bulkhead_mesh::client::MeshChannel,
    path: &str,
    tenant: Option<&str>,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(ch);
    if let Err(e) = grpc.ready().await {
        return tonic::Status::unavailable(e.to_string());
    }
    let codec = tonic_prost::ProstCodec::<TenantOnly, Ignored>::default();
    let msg = TenantOnly {
        tenant: tenant.unwrap_or_default().to_owned(),
    };
    let path = http::uri::PathAndQuery::from_str(path).expect("path");
    // Allowed calls now reach real handlers, some of which stream forever
    // (watches, tails): the deadline ends them; the layer's verdict comes first.
    let mut req = tonic::Request::new(msg);
    req.set_timeout(std::time::Duration::from_millis(1500));
    match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        grpc.unary(req, path, codec),
    )
    .await
    {
        Ok(Ok(_)) => tonic::Status::ok(""),
        Ok(Err(s)) => s,
        Err(_) => tonic::Status::deadline_exceeded("client-side deadline"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_enforces_its_row_for_every_caller() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let td = TrustDomain::parse("bulkhead.test")?;
    let mut checked = 0;
    let mut failures = Vec::new();
    // Every (service, caller, method) at once: streaming handlers end at their
    // deadline, so the checks run in parallel.
    let mut all = Vec::new();
    for (binary, policy) in services() {
        let table = Table::new(td.clone(), &[policy]);
        for caller in CALLERS {
            let who = mesh.identity(caller)?;
            let id = mesh.id(caller)?;
            let ch = mesh.channel(binary, &who)?;
            all.extend(policy.rules.iter().map(|rule| {
                let (ch, id, table) = (ch.clone(), id.clone(), table.clone());
                async move {
                    let mut failures = Vec::new();
                    let mut checked = 0;
                    let path = format!("/{}/{}", policy.service, rule.method);
                    let own_tenant = id.principal().tenant().map(str::to_owned);
                    let tenant = own_tenant.as_deref().unwrap_or("acme");
                    let status = call(ch.clone(), &path, Some(tenant)).await;
                    checked += 1;
                    let denied_by_table = status.code() == Code::PermissionDenied
                        && status.message() == "caller may not call this method";
                    match table.check(&path, Some(&id)) {
                        Ok(_) if denied_by_table => failures
                            .push(format!("{caller} {path}: allowed by the table but refused")),
                        Err(_) if !denied_by_table => failures.push(format!(
                            "{caller} {path}: refused by the table but answered {:?} {}",
                            status.code(),
                            status.message()
                        )),
                        Ok(true) => {
                            // Tenant-scoped and the caller has a tenant: another tenant is refused.
                            let status = call(ch.clone(), &path, Some("globex")).await;
                            checked += 1;
                            if status.code() != Code::PermissionDenied
                                || status.message() != "request tenant is not the caller's tenant"
                            {
                                failures.push(format!(
                                    "{caller} {path}: naming another tenant answered {:?} {}",
                                    status.code(),
                                    status.message()
                                ));
                            }
                        }
                        _ => {}
                    }
                    (checked, failures)
                }
            }));
        }
    }
    for (n, f) in futures::future::join_all(all).await {
        checked += n;
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} checks failed:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        mesh.logs()
    );
    assert!(checked > 500, "only {checked} checks ran");
    Ok(())
}

#[test]
fn tables_cover_the_api_and_tenant_rows_have_a_tenant_field() {
    let fds = prost_types::FileDescriptorSet::decode(bulkhead_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptors");
    let mut messages = BTreeMap::new();
    let mut methods: BTreeMap<String, Vec<(String, String, bool)>> = BTreeMap::new();
    for file in &fds.file {
        let pkg = file.package();
        for m in &file.message_type {
            messages.insert(format!(".{pkg}.{}", m.name()), m.clone());
        }
        for s in &file.service {
            let full = format!("{pkg}.{}", s.name());
            for m in &s.method {
                methods.entry(full.clone()).or_default().push((
                    m.name().to_owned(),
                    m.input_type().to_owned(),
                    m.client_streaming(),
                ));
            }
        }
    }
    for (_, policy) in services() {
        let api = methods
            .get(policy.service)
            .unwrap_or_else(|| panic!("{} is not in the API", policy.service));
        let in_api: BTreeSet<&str> = api.iter().map(|(m, _, _)| m.as_str()).collect();
        let in_table: BTreeSet<&str> = policy.rules.iter().map(|r| r.method).collect();
        assert_eq!(
            in_api, in_table,
            "{}: every RPC has exactly one row",
            policy.service
        );
        for rule in policy.rules {
            let (_, input, client_streaming) = api
                .iter()
                .find(|(m, _, _)| m == rule.method)
                .expect("method");
            let msg = &messages[input];
            let field1 = msg.field.iter().find(|f| f.number() == 1);
            let has_tenant = field1.is_some_and(|f| {
                f.name() == "tenant"
                    && f.r#type() == Type::String
                    && f.label() != Label::Repeated
                    && f.oneof_index.is_none()
            });
            if rule.tenant_scoped {
                assert!(
                    has_tenant,
                    "{}/{}: tenant-scoped but field 1 is not `string tenant`",
                    policy.service, rule.method
                );
                assert!(
                    !client_streaming,
                    "{}/{}: a client stream cannot be tenant-checked by the layer",
                    policy.service, rule.method
                );
            }
            if let Some(f) = field1 {
                assert!(
                    f.name() == "tenant",
                    "{}: field 1 is {} — the API reserves field 1 for the tenant",
                    input,
                    f.name()
                );
            }
        }
    }
}
