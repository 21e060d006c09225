//! `bulkhead identity`: the real binary against a real mesh. A token made by
//! the CLI enrolls exactly one worker; listing shows it used; a revoked token
//! enrolls nobody; a run the dispatcher minted is revoked by the CLI, appears
//! in the revocation list and can no longer be minted; the bundle written by
//! the CLI holds the mesh's CA.

use std::ffi::OsStr;
use std::process::Output;
use std::time::Duration;

use anyhow::Context;
use bulkhead_mesh::tls::{ExpectServer, TrustBundle};
use bulkhead_proto::identity::v1 as pb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_testkit::mesh::TestMesh;

const DEADLINE: Duration = Duration::from_secs(60);

async fn bulkhead(args: &[&OsStr]) -> anyhow::Result<Output> {
    let exe = bulkhead_cluster::find_executable("bulkhead", None)?;
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(exe)
            .args(args)
            .env_remove("BULKHEAD_DIR")
            .env_remove("RUST_BACKTRACE")
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    Ok(out)
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(OsStr::new($a)),*] };
}

/// Runs `bulkhead ARGS`, requiring success; its stdout.
async fn ok(mesh: &TestMesh, args: &[&OsStr]) -> anyhow::Result<String> {
    let out = bulkhead(args).await?;
    anyhow::ensure!(
        out.status.success(),
        "bulkhead {args:?} failed\n{}\n{}",
        text(&out),
        mesh.logs()
    );
    Ok(stdout(&out))
}

/// Runs `bulkhead ARGS`, requiring failure; its stderr.
async fn fails(args: &[&OsStr]) -> anyhow::Result<String> {
    let out = bulkhead(args).await?;
    anyhow::ensure!(
        !out.status.success(),
        "bulkhead {args:?} succeeded\n{}",
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A CSR for a fresh P-256 key, as a worker makes one; the key too.
fn csr() -> anyhow::Result<(Vec<u8>, rcgen::KeyPair)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let der = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .der()
        .to_vec();
    Ok((der, key))
}

/// The token id and secret out of `join-token create`'s output.
fn created(out: &str) -> anyhow::Result<(String, String)> {
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("join token "))
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("no token id in\n{out}"))?;
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .with_context(|| format!("no token in\n{out}"))?;
    Ok((id.to_owned(), secret.trim().to_owned()))
}

/// The row of `id` in a listing.
fn row<'a>(listing: &'a str, id: &str) -> Option<&'a str> {
    listing.lines().find(|l| l.starts_with(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_manage_tokens_revocations_and_the_bundle() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let dir = mesh.dir().to_owned();
    let (_, bundle) = mesh.mesh.operator();
    let addr = mesh.addr("identity")?.to_owned();
    // Enrollment is the one RPC over TLS that authenticates the server only.
    let anonymous = IdentityServiceClient::new(bulkhead_mesh::client::channel(
        &addr,
        None,
        bundle,
        ExpectServer::Service("identity".into()),
    )?);
    let enroll = |token: String| {
        let mut client = anonymous.clone();
        async move {
            let (csr_der, _key) = csr()?;
            let resp = client
                .enroll_worker(pb::EnrollWorkerRequest {
                    join_token: token,
                    csr_der: csr_der.into(),
                    worker_name: "builder".into(),
                })
                .await;
            anyhow::Ok(resp.map(tonic::Response::into_inner))
        }
    };

    // A tenant token, shown once with its id, expiry and the warning.
    let out = ok(
        &mesh,
        args![
            "identity",
            "join-token",
            "create",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "--ttl",
            "10m",
            "--description",
            "ci runners"
        ],
    )
    .await?;
    let (token_id, secret) = created(&out)?;
    assert!(out.contains("for tenant/acme"), "{out}");
    assert!(out.contains("(in 10m)"), "{out}");
    assert!(out.contains("max uses: 1"), "{out}");
    assert!(out.contains("only time the token is shown"), "{out}");
    assert!(
        secret.starts_with("bhjt_") && secret.contains(&token_id),
        "{out}"
    );

    // Listed while usable, without the secret.
    let list = ok(
        &mesh,
        args![
            "identity",
            "join-token",
            "list",
            "--dir",
            &dir,
            "--tenant",
            "acme"
        ],
    )
    .await?;
    let line = row(&list, &token_id).with_context(|| format!("token missing\n{list}"))?;
    assert!(line.contains("0/1") && line.contains("active"), "{list}");
    assert!(line.contains("  ci runners"), "{list}");
    assert!(
        !list.contains(&secret),
        "a listing shows the secret\n{list}"
    );

    // It enrolls a worker of acme, exactly once.
    let worker = enroll(secret.clone())
        .await?
        .map_err(|s| anyhow::anyhow!("enroll: {s}\n{}", mesh.logs()))?;
    assert_eq!(worker.tenant, "acme");
    let svid = worker.svid.context("no svid")?;
    assert_eq!(
        svid.spiffe_id,
        format!(
            "spiffe://bulkhead.test/tenant/acme/worker/{}",
            worker.worker_id
        )
    );
    let again = enroll(secret.clone())
        .await?
        .expect_err("a second enrollment");
    assert_eq!(again.code(), tonic::Code::Unauthenticated, "{again:?}");

    // Used up: gone from the usable list, shown as such with --all.
    let list = ok(
        &mesh,
        args![
            "identity",
            "join-token",
            "list",
            "--dir",
            &dir,
            "--tenant",
            "acme"
        ],
    )
    .await?;
    assert!(row(&list, &token_id).is_none(), "{list}");
    assert!(list.contains("no usable join tokens"), "{list}");
    let list = ok(
        &mesh,
        args!["identity", "join-token", "list", "--dir", &dir, "--all"],
    )
    .await?;
    let line = row(&list, &token_id).with_context(|| format!("token missing\n{list}"))?;
    assert!(line.contains("1/1") && line.contains("used-up"), "{list}");
    assert!(
        line.contains("spiffe://bulkhead.test/admin/operator"),
        "{list}"
    );

    // A pool token, revoked before use, enrolls nobody.
    let out = ok(
        &mesh,
        args![
            "identity",
            "join-token",
            "create",
            "--dir",
            &dir,
            "--pool",
            "gpu",
            "--max-uses",
            "3",
            "--ttl",
            "1h"
        ],
    )
    .await?;
    let (pool_id, pool_secret) = created(&out)?;
    assert!(
        out.contains("for pool/gpu") && out.contains("max uses: 3"),
        "{out}"
    );
    let out = ok(
        &mesh,
        args![
            "identity",
            "join-token",
            "revoke",
            &pool_id,
            "--dir",
            &dir,
            "--reason",
            "posted in a chat"
        ],
    )
    .await?;
    assert!(
        out.contains(&format!("revoked join token {pool_id} for pool/gpu")),
        "{out}"
    );
    let refused = enroll(pool_secret).await?.expect_err("a revoked token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let list = ok(
        &mesh,
        args![
            "identity",
            "join-token",
            "list",
            "--dir",
            &dir,
            "--pool",
            "gpu",
            "--all"
        ],
    )
    .await?;
    let line = row(&list, &pool_id).with_context(|| format!("token missing\n{list}"))?;
    assert!(line.contains("0/3") && line.contains("revoked"), "{list}");
    let err = fails(args![
        "identity",
        "join-token",
        "revoke",
        "0000000000000000",
        "--dir",
        &dir,
        "--reason",
        "typo"
    ])
    .await?;
    assert!(
        err.contains("identity RevokeJoinToken failed: NotFound"),
        "{err}"
    );

    // A pool's worker is revoked by its id alone: no tenant names it.
    let out = ok(
        &mesh,
        args![
            "identity",
            "join-token",
            "create",
            "--dir",
            &dir,
            "--pool",
            "cpu"
        ],
    )
    .await?;
    let (_, cpu_secret) = created(&out)?;
    let pool_worker = enroll(cpu_secret)
        .await?
        .map_err(|s| anyhow::anyhow!("enroll: {s}\n{}", mesh.logs()))?;
    assert_eq!(pool_worker.pool, "cpu");
    let out = ok(
        &mesh,
        args![
            "identity",
            "revoke",
            "--dir",
            &dir,
            "--worker",
            &pool_worker.worker_id,
            "--reason",
            "host decommissioned"
        ],
    )
    .await?;
    assert!(
        out.contains(&format!("revoked worker {} (soft)", pool_worker.worker_id)),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "spiffe://bulkhead.test/pool/cpu/worker/{}",
            pool_worker.worker_id
        )),
        "{out}"
    );

    // A run minted by the dispatcher for that worker, revoked by the operator.
    let dispatcher = mesh.identity("service/dispatcher")?;
    let as_dispatcher = IdentityServiceClient::new(mesh.channel("identity", &dispatcher)?);
    let mint = |run: &str| {
        let mut client = as_dispatcher.clone();
        let req = csr().map(|(csr_der, _)| pb::MintRunSvidRequest {
            tenant: "acme".into(),
            run_id: run.into(),
            csr_der: csr_der.into(),
            ttl: None,
            worker_id: worker.worker_id.clone(),
            pool: String::new(),
        });
        async move { anyhow::Ok(client.mint_run_svid(req?).await) }
    };
    let run = mint("run-cli-1")
        .await?
        .map_err(|s| anyhow::anyhow!("mint: {s}\n{}", mesh.logs()))?
        .into_inner()
        .svid
        .context("no svid")?;
    assert_eq!(
        run.spiffe_id,
        "spiffe://bulkhead.test/tenant/acme/run/run-cli-1"
    );

    let out = ok(
        &mesh,
        args![
            "identity",
            "revoke",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "--run",
            "run-cli-1",
            "--reason",
            "prompt injection suspected",
            "--hard"
        ],
    )
    .await?;
    assert!(
        out.contains("revoked run run-cli-1 of tenant acme (hard)"),
        "{out}"
    );
    let sequence: u64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("sequence: "))
        .with_context(|| format!("no sequence in\n{out}"))?
        .parse()?;
    assert!(sequence >= 1, "{out}");
    assert!(out.contains(&run.spiffe_id), "{out}");

    let list = ok(
        &mesh,
        args!["identity", "revocations", "--dir", &dir, "--tenant", "acme"],
    )
    .await?;
    assert!(
        list.contains(&format!("revocation list at sequence {sequence}: 1 entry")),
        "{list}"
    );
    let line = list
        .lines()
        .find(|l| l.contains("run run-cli-1"))
        .with_context(|| format!("the run is not listed\n{list}"))?;
    assert!(
        line.trim_start().starts_with(&sequence.to_string()),
        "{list}"
    );
    assert!(line.contains("hard") && line.contains("acme"), "{list}");
    assert!(line.contains("  prompt injection suspected"), "{list}");
    assert!(
        line.contains("spiffe://bulkhead.test/admin/operator"),
        "{list}"
    );
    let other = ok(
        &mesh,
        args![
            "identity",
            "revocations",
            "--dir",
            &dir,
            "--tenant",
            "globex"
        ],
    )
    .await?;
    assert!(other.contains(": 0 entries"), "{other}");

    // The revocation holds: the run cannot be minted again.
    let refused = mint("run-cli-1").await?.expect_err("a revoked run");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    // And it is in the audit log.
    let audit = ok(
        &mesh,
        args![
            "audit",
            "query",
            "--dir",
            &dir,
            "--type",
            "identity.revoked",
            "--run",
            "run-cli-1"
        ],
    )
    .await?;
    assert_eq!(audit.lines().count(), 1, "{audit}");
    assert!(audit.contains("hard=true"), "{audit}");

    // Unknown targets and bad input are named.
    let err = fails(args![
        "identity",
        "revoke",
        "--dir",
        &dir,
        "--tenant",
        "acme",
        "--run",
        "no-such-run",
        "--reason",
        "x"
    ])
    .await?;
    assert!(err.contains("identity Revoke failed: NotFound"), "{err}");
    let err = fails(args![
        "identity", "revoke", "--dir", &dir, "--tenant", "acme", "--run", "r", "--reason", ""
    ])
    .await?;
    assert!(
        err.contains("identity Revoke failed: InvalidArgument") && err.contains("reason"),
        "{err}"
    );

    // The bundle: printed, and written as files whose CA is the mesh's.
    let work = tempfile::tempdir()?;
    let out_dir = work.path().join("trust");
    let out = ok(
        &mesh,
        args!["identity", "bundle", "--dir", &dir, "--out", &out_dir],
    )
    .await?;
    assert!(out.contains("trust domain: bulkhead.test"), "{out}");
    assert!(out.contains("sequence:"), "{out}");
    assert!(out.contains("x509 authorities (1):"), "{out}");
    assert!(
        out.contains("CN=bulkhead bulkhead.test ca") && out.contains("spiffe://bulkhead.test,"),
        "{out}"
    );
    let written = TrustBundle::from_pem_file(&out_dir.join("bundle.pem"))?;
    let mesh_ca = TrustBundle::from_pem_file(&dir.join("pki").join("ca.pem"))?;
    assert_eq!(written.authorities(), mesh_ca.authorities());
    assert_eq!(written.trust_domain().to_string(), "bulkhead.test");
    let jwks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("jwks.json"))?)?;
    let keys = jwks["keys"].as_array().context("no keys array")?;
    assert!(!keys.is_empty(), "{jwks}");
    for k in keys {
        let kid = k["kid"].as_str().context("a key without kid")?;
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        assert!(
            out.contains(&format!("kid {kid}  (EC P-256, use jwt-svid)")),
            "{out}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn input_errors_are_named_before_dialing() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let dir = work.path();
    let err = fails(args![
        "identity",
        "join-token",
        "create",
        "--dir",
        dir,
        "--tenant",
        "a",
        "--pool",
        "b"
    ])
    .await?;
    assert!(err.contains("cannot be used with"), "{err}");
    let err = fails(args!["identity", "join-token", "create", "--dir", dir]).await?;
    assert!(err.contains("--tenant <TENANT>|--pool <POOL>"), "{err}");
    for (ttl, says) in [
        ("90", "is not a duration"),
        ("1w", "unknown unit"),
        ("0s", "not a positive duration"),
    ] {
        let err = fails(args![
            "identity",
            "join-token",
            "create",
            "--dir",
            dir,
            "--tenant",
            "a",
            "--ttl",
            ttl
        ])
        .await?;
        assert!(err.contains(says) && err.contains("e.g. 30s"), "{err}");
    }
    let err = fails(args![
        "identity",
        "join-token",
        "create",
        "--dir",
        dir,
        "--tenant",
        "a",
        "--max-uses",
        "0"
    ])
    .await?;
    assert!(err.contains("--max-uses"), "{err}");
    let err = fails(args![
        "identity",
        "revoke",
        "--dir",
        dir,
        "--whole-tenant",
        "--reason",
        "x"
    ])
    .await?;
    assert!(err.contains("--tenant <TENANT>"), "{err}");
    let err = fails(args![
        "identity", "revoke", "--dir", dir, "--tenant", "t", "--reason", "x"
    ])
    .await?;
    assert!(err.contains("--run <RUN_ID>|--worker"), "{err}");
    let err = fails(args![
        "identity", "revoke", "--dir", dir, "--tenant", "t", "--run", "r", "--worker", "w",
        "--reason", "x"
    ])
    .await?;
    assert!(err.contains("cannot be used with"), "{err}");
    // No mesh there.
    let err = fails(args!["identity", "bundle", "--dir", dir]).await?;
    assert!(
        err.contains("no mesh at") && err.contains("endpoints.json does not exist"),
        "{err}"
    );
    Ok(())
}
