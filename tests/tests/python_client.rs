//! The API as a polyglot backend sees it: a Python grpcio client, with stubs
//! generated from `proto/` during the test, reads the audit log over mTLS with
//! a tenant client certificate — its own tenant's events, and PERMISSION_DENIED
//! for another tenant's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bulkhead_proto::audit::v1 as pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use bulkhead_testkit::external::require_external;
use bulkhead_testkit::mesh::TestMesh;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether python3 with grpcio-tools is here; missing is loud, or fatal under
/// BULKHEAD_REQUIRE_EXTERNAL=1.
fn python_grpc() -> anyhow::Result<bool> {
    let ok = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        anyhow::ensure!(
            !require_external(),
            "python3 with grpcio-tools is required (pip install grpcio-tools)"
        );
        eprintln!(
            "SKIP: python_client: python3 with grpcio-tools not found (pip install grpcio-tools) — skipping"
        );
    }
    Ok(ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_reads_its_own_tenants_audit_events() -> anyhow::Result<()> {
    if !python_grpc()? {
        return Ok(());
    }
    let mesh = TestMesh::start().await?;
    let mut sealed =
        AuditServiceClient::new(mesh.channel("audit", &mesh.identity("service/sealed-vault")?)?);
    let event = |tenant: &str| pb::NewEvent {
        r#type: "sealed.secret.written".into(),
        tenant: tenant.into(),
        run_id: String::new(),
        outcome: pb::Outcome::Success as i32,
        attributes: [("key".to_owned(), "API_KEY".to_owned())]
            .into_iter()
            .collect(),
    };
    sealed
        .append(pb::AppendRequest {
            events: vec![event("acme"), event("globex"), event("acme")],
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(1200)).await; // a signed head covers them

    // Stubs generated from the protos, as a user of another language would.
    let dir = tempfile::tempdir()?;
    let root = workspace();
    let protos: Vec<PathBuf> = ["audit", "dispatcher", "identity", "sandbox", "sealed"]
        .iter()
        .map(|s| root.join(format!("proto/bulkhead/{s}/v1/{s}.proto")))
        .collect();
    let status = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", root.join("proto").display()))
        .arg(format!("--python_out={}", dir.path().display()))
        .arg(format!("--grpc_python_out={}", dir.path().display()))
        .args(&protos)
        .status()?;
    anyhow::ensure!(status.success(), "protoc for python failed");
    for pkg in ["bulkhead", "bulkhead/audit", "bulkhead/audit/v1"] {
        std::fs::write(dir.path().join(pkg).join("__init__.py"), "")?;
    }

    let (cert, key) = mesh.identity_pem("tenant/acme/client/backend")?;
    let (cert_path, key_path) = (dir.path().join("client.pem"), dir.path().join("client.key"));
    std::fs::write(&cert_path, cert)?;
    bulkhead_mesh::pki::write_private(&key_path, &key)?;
    let port = mesh
        .addr("audit")?
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let out = Command::new("python3")
        .arg(root.join("tests/python/audit_client.py"))
        .arg(format!("localhost:{port}"))
        .arg(&mesh.mesh.endpoints.ca)
        .arg(&cert_path)
        .arg(&key_path)
        .env("PYTHONPATH", dir.path())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let own = seen["own"].as_array().cloned().unwrap_or_default();
    assert_eq!(own.len(), 2, "acme sees its two events: {seen}");
    assert!(own.iter().all(|e| e["tenant"] == "acme"));
    assert_eq!(
        own[0]["actor"],
        "spiffe://bulkhead.test/service/sealed-vault"
    );
    assert_eq!(seen["other"], "PERMISSION_DENIED", "{seen}");
    assert!(seen["tree_size"].as_u64().unwrap_or(0) >= 3, "{seen}");
    Ok(())
}
