//! The sandbox-runner with the Docker backend, against the real mesh and the
//! real Docker engine (DESIGN.md guarantee 1 and "One run, end to end",
//! steps 6 to 8): a canary secret reaches the agent's environment and nowhere
//! else — not `docker inspect`, the daemon's on-disk config, `docker commit`,
//! the output the worker reads, a log or an audit record — and release and
//! revocation destroy and scrub.

mod support;

use std::time::{Duration, Instant};

use bulkhead_proto::identity::v1 as id_pb;
use bulkhead_proto::sandbox::v1 as pb;
use support::*;
use tonic::Code;

const ACME_WORKER: &str = "tenant/acme/worker/w1";

async fn setup(networks: &[&str]) -> anyhow::Result<Option<Mesh>> {
    if !docker_or_skip()? {
        return Ok(None);
    }
    ensure_image()?;
    Ok(Some(start_mesh(networks).await?))
}

#[tokio::test]
async fn a_canary_reaches_the_agent_and_nothing_else() -> anyhow::Result<()> {
    let Some(mesh) = setup(&[]).await? else {
        return Ok(());
    };
    let canary = canary();
    mesh.profile("acme", &[("CANARY_KEY", &canary)]).await?;
    let mut w1 = mesh.worker(ACME_WORKER).await?;
    let script = "echo $CANARY_KEY | base64; echo plain:$CANARY_KEY; env; \
                  grep Cap /proc/self/status; id; \
                  (echo x > /written) 2>&1 || echo root-is-read-only; \
                  (echo x > /tmp/ok) && echo tmp-is-writable; \
                  ls /sys/class/net; echo payload:$(cat)";
    let run = w1
        .run(&mesh, "acme", "", IMAGE, &["sh", "-c", script])
        .await?;
    let mut worker = mesh.runner_as(ACME_WORKER)?;
    let started = worker
        .start_sandbox(start_request("acme", &run, pb::SandboxBackend::Docker))
        .await?
        .into_inner()
        .sandbox
        .expect("a sandbox");
    assert_eq!(started.injected_keys, vec!["CANARY_KEY".to_owned()]);
    assert_eq!(started.run_id, run.id);
    assert_eq!(started.task_id, run.task_id);
    assert_eq!(started.worker_id, "w1");
    let container = started.container_id.clone();
    assert!(!container.is_empty());

    // The agent saw the value; the worker sees it redacted, and so its base64.
    let (out, err, exit) = collect(&mut worker, "acme", &started.sandbox_id).await?;
    assert_eq!(exit.reason(), pb::ExitReason::Exited, "{out}\n{err}");
    assert_eq!(exit.exit_code, 0, "{out}\n{err}");
    assert!(!leaks(&out, &canary) && !leaks(&err, &canary), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    // `echo | base64` encodes a newline too: what is left is its last characters.
    assert!(
        lines[0].starts_with("<redacted:CANARY_KEY>")
            && lines[0].len() <= "<redacted:CANARY_KEY>".len() + 4,
        "base64 of the value: {out}"
    );
    assert!(lines.contains(&"plain:<redacted:CANARY_KEY>"), "{out}");
    assert!(lines.contains(&"CANARY_KEY=<redacted:CANARY_KEY>"), "{out}");
    assert!(
        lines.contains(&"DEBUG=1"),
        "non-secret settings arrive: {out}"
    );
    assert!(
        lines.contains(&format!("BULKHEAD_RUN_ID={}", run.id).as_str()),
        "{out}"
    );
    assert!(lines.contains(&"BULKHEAD_TENANT=acme"), "{out}");
    assert!(
        lines.contains(&"BULKHEAD_JWT_SVID=<redacted:BULKHEAD_JWT_SVID>"),
        "the run's token is given to the agent, and redacted: {out}"
    );
    // Hardening, as seen from inside.
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            lines.contains(&format!("{cap}:\t0000000000000000").as_str()),
            "{cap} is empty: {out}"
        );
    }
    assert!(lines.iter().any(|l| l.starts_with("uid=65534")), "{out}");
    assert!(out.contains("root-is-read-only"), "{out}");
    assert!(out.contains("tmp-is-writable"), "{out}");
    let nets: Vec<&&str> = lines
        .iter()
        .filter(|l| ["lo", "eth0", "eth1"].contains(l))
        .collect();
    assert_eq!(nets, vec![&"lo"], "no network but loopback: {out}");
    assert!(out.contains("payload:the task payload"), "{out}");

    // The engine's view: inspect, the on-disk config, a commit.
    let inspect = docker(&["inspect", &container])?;
    assert!(!leaks(&inspect, &canary), "docker inspect holds the canary");
    assert!(
        !inspect.contains(&run.token),
        "docker inspect holds the token"
    );
    let v: serde_json::Value = serde_json::from_str(&inspect)?;
    let host = &v[0]["HostConfig"];
    assert_eq!(host["ReadonlyRootfs"], true);
    assert_eq!(host["CapDrop"], serde_json::json!(["ALL"]));
    assert_eq!(host["NetworkMode"], "none");
    assert_eq!(host["LogConfig"]["Type"], "none");
    assert_eq!(host["PidsLimit"], 64);
    assert_eq!(host["Memory"], 128 << 20);
    assert_eq!(host["NanoCpus"], 500_000_000);
    assert_eq!(
        host["Ulimits"],
        serde_json::json!([{"Name": "core", "Soft": 0, "Hard": 0}]),
        "no core dumps"
    );
    assert!(
        host["SecurityOpt"]
            .to_string()
            .contains("no-new-privileges")
    );
    assert_eq!(v[0]["Config"]["User"], "65534:65534");
    let on_disk = std::path::Path::new("/var/lib/docker/containers").join(&container);
    if on_disk.is_dir() {
        assert!(
            files_holding(&on_disk, &canary).is_empty(),
            "the daemon's files hold the canary"
        );
        let config = std::fs::read_to_string(on_disk.join("config.v2.json"))?;
        assert!(!leaks(&config, &canary) && !config.contains(&run.token));
        let hostconfig = std::fs::read_to_string(on_disk.join("hostconfig.json"))?;
        assert!(!leaks(&hostconfig, &canary));
    } else {
        eprintln!("note: {} is not readable here", on_disk.display());
    }
    let committed = format!("{PREFIX}commit-{}", &started.sandbox_id);
    let image_id = docker(&["commit", &container, &committed])?
        .trim()
        .to_owned();
    let image = docker(&["image", "inspect", &image_id])?;
    let history = docker(&["history", "--no-trunc", &image_id])?;
    let _ = docker(&["rmi", "-f", &image_id]);
    assert!(
        !leaks(&image, &canary) && !leaks(&history, &canary),
        "docker commit holds the canary"
    );

    // Another worker of the same tenant does not see the sandbox at all.
    let mut other = mesh.runner_as("tenant/acme/worker/w2")?;
    let get = other
        .get_sandbox(pb::GetSandboxRequest {
            tenant: "acme".into(),
            sandbox_id: started.sandbox_id.clone(),
        })
        .await;
    assert_eq!(get.expect_err("another worker").code(), Code::NotFound);
    let release = other
        .release_sandbox(pb::ReleaseSandboxRequest {
            tenant: "acme".into(),
            sandbox_id: started.sandbox_id.clone(),
        })
        .await;
    assert_eq!(release.expect_err("another worker").code(), Code::NotFound);
    let listed = other
        .list_sandboxes(pb::ListSandboxesRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(listed.sandboxes.is_empty());
    let mine = worker
        .get_sandbox(pb::GetSandboxRequest {
            tenant: "acme".into(),
            sandbox_id: started.sandbox_id.clone(),
        })
        .await?
        .into_inner()
        .sandbox
        .expect("sandbox");
    assert_eq!(mine.state(), pb::SandboxState::Exited);

    // Release: the container is gone, the copies zeroized, the run revoked.
    let report = worker
        .release_sandbox(pb::ReleaseSandboxRequest {
            tenant: "acme".into(),
            sandbox_id: started.sandbox_id.clone(),
        })
        .await?
        .into_inner()
        .report
        .expect("report");
    assert!(report.sandbox_destroyed && report.files_removed);
    assert!(report.credentials_zeroized);
    assert_eq!(report.zeroized_values, 1);
    assert_eq!(report.scrubbed_keys, vec!["CANARY_KEY".to_owned()]);
    assert!(report.run_identity_revoked);
    assert!(report.audit_sequence > 0);
    let filter = format!("label=bulkhead.sandbox={}", started.sandbox_id);
    assert_eq!(docker(&["ps", "-aq", "--filter", &filter])?.trim(), "");
    let again = worker
        .release_sandbox(pb::ReleaseSandboxRequest {
            tenant: "acme".into(),
            sandbox_id: started.sandbox_id.clone(),
        })
        .await?
        .into_inner()
        .report
        .expect("report");
    assert_eq!(again, report, "releasing again returns the report");

    // The record: injection with names and fingerprints, the scrub, the
    // revocation — and never the value.
    let injected = mesh.audited("sandbox.credential.injected", &run.id).await?;
    assert!(
        injected.attributes["keys"].starts_with("CANARY_KEY@1:"),
        "{injected:?}"
    );
    let scrubbed = mesh.audited("sandbox.scrubbed", &run.id).await?;
    assert_eq!(scrubbed.sequence, report.audit_sequence);
    assert_eq!(scrubbed.attributes["zeroized_values"], "1");
    mesh.audited("identity.revoked", &run.id).await?;
    let all = format!("{:?}", mesh.audit().await?);
    assert!(!leaks(&all, &canary), "an audit record holds the canary");
    // The run's token is refused from now on.
    let refused = worker
        .start_sandbox(start_request("acme", &run, pb::SandboxBackend::Docker))
        .await;
    assert_eq!(
        refused.expect_err("revoked run").code(),
        Code::Unauthenticated
    );

    // No log holds the value; the positive control proves the search works.
    let logs = mesh.all_logs();
    assert!(
        logs.contains("sandbox released"),
        "the runner logged its work"
    );
    assert!(!leaks(&logs, &canary), "a service log holds the canary");
    assert!(!leaks(&mesh.runner_log(), &canary));
    assert!(mesh.containers()?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_hard_revocation_kills_the_sandbox_within_a_second() -> anyhow::Result<()> {
    let Some(mesh) = setup(&[]).await? else {
        return Ok(());
    };
    mesh.profile("acme", &[("API_KEY", &canary())]).await?;
    let mut w1 = mesh.worker(ACME_WORKER).await?;
    let run = w1.run(&mesh, "acme", "", IMAGE, &["sleep", "300"]).await?;
    let mut worker = mesh.runner_as(ACME_WORKER)?;
    let sb = worker
        .start_sandbox(start_request("acme", &run, pb::SandboxBackend::Docker))
        .await?
        .into_inner()
        .sandbox
        .expect("sandbox");
    assert_eq!(sb.state(), pb::SandboxState::Running);
    let mut stream = worker
        .stream_output(pb::StreamOutputRequest {
            tenant: "acme".into(),
            sandbox_id: sb.sandbox_id.clone(),
            from_offset: 0,
        })
        .await?
        .into_inner();
    let mut operator = mesh.identity_as(OPERATOR)?;
    operator
        .revoke(id_pb::RevokeRequest {
            tenant: "acme".into(),
            target: Some(id_pb::revoke_request::Target::RunId(run.id.clone())),
            reason: "test: the run went rogue".into(),
            hard: true,
        })
        .await?;
    let revoked_at = Instant::now();
    let exit = loop {
        match stream.message().await? {
            Some(pb::StreamOutputResponse {
                event: Some(pb::stream_output_response::Event::Exit(e)),
            }) => break e,
            Some(_) => {}
            None => anyhow::bail!("the stream ended without an exit"),
        }
    };
    let took = revoked_at.elapsed();
    assert_eq!(exit.reason(), pb::ExitReason::Revoked);
    assert!(took < Duration::from_secs(1), "killed after {took:?}");
    // Stopped, or already removed by the scrub that follows.
    if let Ok(running) = docker(&[
        "inspect",
        "--format",
        "{{.State.Running}}",
        &sb.container_id,
    ]) {
        assert_eq!(running.trim(), "false", "the container is not running");
    }
    let aborted = mesh.audited("run.aborted_by_revocation", &run.id).await?;
    assert_eq!(aborted.attributes["sandbox_id"], sb.sandbox_id);
    assert_eq!(aborted.attributes["revoked"], format!("run:{}", run.id));
    mesh.audited("sandbox.scrubbed", &run.id).await?;
    // Scrubbed as a release: the container is gone and the report is kept.
    let mut gone = false;
    for _ in 0..50 {
        if mesh.containers()?.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the revoked sandbox's container was removed");
    let got = worker
        .get_sandbox(pb::GetSandboxRequest {
            tenant: "acme".into(),
            sandbox_id: sb.sandbox_id.clone(),
        })
        .await?
        .into_inner()
        .sandbox
        .expect("sandbox");
    assert_eq!(got.state(), pb::SandboxState::Released);
    assert_eq!(got.exit.expect("exit").reason(), pb::ExitReason::Revoked);
    assert!(got.scrub.expect("scrub").credentials_zeroized);
    Ok(())
}

#[tokio::test]
async fn refusals_leave_nothing_running() -> anyhow::Result<()> {
    let Some(mesh) = setup(&["bulkhead-test-net-allowed"]).await? else {
        return Ok(());
    };
    mesh.profile("acme", &[("API_KEY", &canary())]).await?;
    mesh.profile("globex", &[("API_KEY", &canary())]).await?;
    let mut globex_worker = mesh.worker("tenant/globex/worker/g1").await?;
    let globex_run = globex_worker
        .run(&mesh, "globex", "", IMAGE, &["true"])
        .await?;
    let mut w1 = mesh.worker(ACME_WORKER).await?;
    let acme_run = w1.run(&mesh, "acme", "", IMAGE, &["true"]).await?;
    let mut worker = mesh.runner_as(ACME_WORKER)?;
    let req = |run: &Run| start_request("acme", run, pb::SandboxBackend::Docker);

    // A run token of tenant B presented by a worker of tenant A.
    let r = worker.start_sandbox(req(&globex_run)).await;
    assert_eq!(r.expect_err("cross-tenant").code(), Code::PermissionDenied);
    let refused = mesh.audited("sandbox.refused", &globex_run.id).await?;
    assert_eq!(
        refused.outcome(),
        bulkhead_proto::audit::v1::Outcome::Denied
    );
    // A worker naming another tenant is refused by the mesh itself.
    let r = worker
        .start_sandbox(start_request(
            "globex",
            &globex_run,
            pb::SandboxBackend::Docker,
        ))
        .await;
    assert_eq!(
        r.expect_err("foreign tenant").code(),
        Code::PermissionDenied
    );
    // A forged token.
    let mut forged = req(&acme_run);
    forged.run_jwt_svid = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.".into();
    let r = worker.start_sandbox(forged).await;
    assert_eq!(r.expect_err("forged token").code(), Code::Unauthenticated);
    // Another image than the run's agent's: the worker does not choose.
    let mut r = req(&acme_run);
    r.image = "bulkhead-test-agent:other".into();
    let e = worker.start_sandbox(r).await.expect_err("another image");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("image differs"), "{e:?}");
    // An agent whose image the runner does not allow, and an allowed one
    // that is absent.
    let run = w1
        .run(&mesh, "acme", "", "alpine:latest", &["true"])
        .await?;
    let e = worker
        .start_sandbox(req(&run))
        .await
        .expect_err("image not allowed");
    assert_eq!(e.code(), Code::PermissionDenied);
    let run = w1
        .run(&mesh, "acme", "", "bulkhead-test-agent:absent", &["true"])
        .await?;
    let e = worker
        .start_sandbox(req(&run))
        .await
        .expect_err("image absent");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // A network not allowed for the tenant.
    let mut r = req(&acme_run);
    r.network = Some(pb::NetworkPolicy {
        mode: pb::NetworkMode::AllowList as i32,
        allowed_networks: vec!["bridge".into()],
    });
    let e = worker
        .start_sandbox(r)
        .await
        .expect_err("network not allowed");
    assert_eq!(e.code(), Code::PermissionDenied);
    // An allowed network that the engine does not have.
    let mut r = req(&acme_run);
    r.network = Some(pb::NetworkPolicy {
        mode: pb::NetworkMode::AllowList as i32,
        allowed_networks: vec!["bulkhead-test-net-allowed".into()],
    });
    let e = worker.start_sandbox(r).await.expect_err("network absent");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // A bad field is named.
    let mut r = req(&acme_run);
    r.limits = Some(pb::Limits {
        memory_bytes: 1,
        ..Default::default()
    });
    let e = worker.start_sandbox(r).await.expect_err("bad limits");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("limits.memory_bytes"), "{e:?}");
    // More CPU than the host has.
    let mut r = req(&acme_run);
    r.limits = Some(pb::Limits {
        cpu_millis: 1000 * 1024,
        ..Default::default()
    });
    let e = worker.start_sandbox(r).await.expect_err("too many cpus");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("limits.cpu_millis"), "{e:?}");
    // Keys the agent did not request (a key the cascade lacks is refused
    // at enqueue).
    let mut r = req(&acme_run);
    r.secret_keys = vec!["NOT_THERE".into()];
    let e = worker.start_sandbox(r).await.expect_err("unknown key");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("secret_keys differs"), "{e:?}");

    assert!(
        mesh.containers()?.is_empty(),
        "no refused start left a container"
    );
    // The same run can still start once the request is right.
    let ok = worker.start_sandbox(req(&acme_run)).await?.into_inner();
    let sb = ok.sandbox.expect("sandbox");
    // A run has one sandbox at a time.
    let twice = worker.start_sandbox(req(&acme_run)).await;
    assert_eq!(
        twice.expect_err("second sandbox").code(),
        Code::FailedPrecondition
    );
    worker
        .release_sandbox(pb::ReleaseSandboxRequest {
            tenant: "acme".into(),
            sandbox_id: sb.sandbox_id,
        })
        .await?;
    assert!(mesh.containers()?.is_empty());
    Ok(())
}

#[tokio::test]
async fn without_audit_nothing_starts() -> anyhow::Result<()> {
    let Some(mut mesh) = setup(&[]).await? else {
        return Ok(());
    };
    mesh.profile("acme", &[("API_KEY", &canary())]).await?;
    // Minted while audit runs: identity records every mint.
    let mut w1 = mesh.worker(ACME_WORKER).await?;
    let tenant_run = w1.run(&mesh, "acme", "", IMAGE, &["sleep", "300"]).await?;
    let mut p1 = mesh.worker("pool/shared/worker/p1").await?;
    let pool_run = p1
        .run(&mesh, "", "shared", IMAGE, &["sleep", "300"])
        .await?;
    mesh.mesh
        .mesh
        .process_mut("audit")
        .expect("audit")
        .stop()
        .await;

    // A tenant run: sealed-vault cannot record the resolution, so nothing is
    // resolved, and the container launched for it is destroyed.
    let mut worker = mesh.runner_as(ACME_WORKER)?;
    let r = worker
        .start_sandbox(start_request(
            "acme",
            &tenant_run,
            pb::SandboxBackend::Docker,
        ))
        .await;
    assert_eq!(r.expect_err("audit down").code(), Code::Unavailable);
    assert!(mesh.containers()?.is_empty(), "no container remains");

    // A pool run has no cascade: the runner's own record of the injection
    // (of the run's token) is what fails, and the sandbox never gets it.
    let mut pool_worker = mesh.runner_as("pool/shared/worker/p1")?;
    let r = pool_worker
        .start_sandbox(start_request("", &pool_run, pb::SandboxBackend::Docker))
        .await;
    assert_eq!(r.expect_err("audit down").code(), Code::Unavailable);
    assert!(mesh.containers()?.is_empty(), "no container remains");
    let listed = pool_worker
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await?
        .into_inner();
    assert!(listed.sandboxes.is_empty(), "a failed start is not kept");
    Ok(())
}

#[tokio::test]
async fn a_tenant_revocation_kills_every_sandbox_of_the_tenant_and_no_other() -> anyhow::Result<()>
{
    let Some(mesh) = setup(&[]).await? else {
        return Ok(());
    };
    mesh.profile("acme", &[("API_KEY", &canary())]).await?;
    mesh.profile("globex", &[("API_KEY", &canary())]).await?;
    let mut started = Vec::new();
    let mut acme = mesh.worker("tenant/acme/worker/w1").await?;
    // Worker ids are unique in the deployment.
    let mut globex = mesh.worker("tenant/globex/worker/g1").await?;
    let mut runs = Vec::new();
    for tenant in ["acme", "acme", "globex"] {
        let w = if tenant == "acme" {
            &mut acme
        } else {
            &mut globex
        };
        let r = w.run(&mesh, tenant, "", IMAGE, &["sleep", "300"]).await?;
        let mut worker = w.runner(&mesh)?;
        let sb = worker
            .start_sandbox(start_request(tenant, &r, pb::SandboxBackend::Docker))
            .await?
            .into_inner()
            .sandbox
            .expect("sandbox");
        started.push((tenant, sb));
        runs.push(r);
    }
    // The tenant's workers are revoked too: an operator watches.
    let mut operator = mesh.runner_as(OPERATOR)?;
    let mut streams = Vec::new();
    for (tenant, sb) in &started {
        let s = operator
            .stream_output(pb::StreamOutputRequest {
                tenant: (*tenant).into(),
                sandbox_id: sb.sandbox_id.clone(),
                from_offset: 0,
            })
            .await?
            .into_inner();
        streams.push(s);
    }
    mesh.identity_as(OPERATOR)?
        .revoke(id_pb::RevokeRequest {
            tenant: "acme".into(),
            target: Some(id_pb::revoke_request::Target::WholeTenant(true)),
            reason: "test: tenant offboarded".into(),
            hard: true,
        })
        .await?;
    let at = Instant::now();
    for s in streams.iter_mut().take(2) {
        let exit = loop {
            match s.message().await? {
                Some(pb::StreamOutputResponse {
                    event: Some(pb::stream_output_response::Event::Exit(e)),
                }) => break e,
                Some(_) => {}
                None => anyhow::bail!("no exit"),
            }
        };
        assert_eq!(exit.reason(), pb::ExitReason::Revoked);
    }
    assert!(at.elapsed() < Duration::from_secs(1), "{:?}", at.elapsed());
    for run in &runs[..2] {
        let e = mesh.audited("run.aborted_by_revocation", &run.id).await?;
        assert_eq!(e.attributes["revoked"], "tenant:acme");
    }
    // The other tenant's sandbox runs on.
    let (_, globex) = &started[2];
    let got = operator
        .get_sandbox(pb::GetSandboxRequest {
            tenant: "globex".into(),
            sandbox_id: globex.sandbox_id.clone(),
        })
        .await?
        .into_inner()
        .sandbox
        .expect("sandbox");
    assert_eq!(got.state(), pb::SandboxState::Running);
    let listed = operator
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await?
        .into_inner();
    assert_eq!(
        listed.sandboxes.len(),
        3,
        "operators see every tenant's sandboxes"
    );
    let report = operator
        .release_sandbox(pb::ReleaseSandboxRequest {
            tenant: "globex".into(),
            sandbox_id: globex.sandbox_id.clone(),
        })
        .await?
        .into_inner()
        .report
        .expect("report");
    assert!(report.sandbox_destroyed);
    let mut gone = false;
    for _ in 0..50 {
        if mesh.containers()?.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "every container was removed");
    Ok(())
}

#[tokio::test]
async fn limits_end_a_sandbox() -> anyhow::Result<()> {
    let Some(mesh) = setup(&[]).await? else {
        return Ok(());
    };
    mesh.profile("acme", &[("API_KEY", &canary())]).await?;
    let mut worker = mesh.runner_as(ACME_WORKER)?;
    // Memory: a shell string that doubles until the limit.
    let mut w1 = mesh.worker(ACME_WORKER).await?;
    let run = w1
        .run(
            &mesh,
            "acme",
            "",
            IMAGE,
            &["sh", "-c", "a=aaaaaaaaaaaaaaaa; while :; do a=$a$a; done"],
        )
        .await?;
    let mut req = start_request("acme", &run, pb::SandboxBackend::Docker);
    req.limits = Some(pb::Limits {
        memory_bytes: 16 << 20,
        ..Default::default()
    });
    let sb = worker
        .start_sandbox(req)
        .await?
        .into_inner()
        .sandbox
        .expect("sandbox");
    let (_, _, exit) = collect(&mut worker, "acme", &sb.sandbox_id).await?;
    assert_eq!(exit.reason(), pb::ExitReason::OomKilled, "{exit:?}");
    // Wall clock: killed at the end of its timeout.
    let run = w1.run(&mesh, "acme", "", IMAGE, &["sleep", "300"]).await?;
    let mut req = start_request("acme", &run, pb::SandboxBackend::Docker);
    req.limits = Some(pb::Limits {
        timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    });
    let at = Instant::now();
    let timed = worker
        .start_sandbox(req)
        .await?
        .into_inner()
        .sandbox
        .expect("sandbox");
    let (_, _, exit) = collect(&mut worker, "acme", &timed.sandbox_id).await?;
    assert_eq!(exit.reason(), pb::ExitReason::TimedOut, "{exit:?}");
    assert!(at.elapsed() < Duration::from_secs(5), "{:?}", at.elapsed());
    assert_eq!(
        timed.limits.expect("limits").memory_bytes,
        512 << 20,
        "the default applies"
    );
    for id in [sb.sandbox_id, timed.sandbox_id] {
        worker
            .release_sandbox(pb::ReleaseSandboxRequest {
                tenant: "acme".into(),
                sandbox_id: id,
            })
            .await?;
    }
    assert!(mesh.containers()?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_crashed_runner_leaves_no_sandbox_behind() -> anyhow::Result<()> {
    let Some(mut mesh) = setup(&[]).await? else {
        return Ok(());
    };
    mesh.profile("acme", &[("API_KEY", &canary())]).await?;
    let mut w1 = mesh.worker(ACME_WORKER).await?;
    let run = w1.run(&mesh, "acme", "", IMAGE, &["sleep", "300"]).await?;
    let mut worker = mesh.runner_as(ACME_WORKER)?;
    worker
        .start_sandbox(start_request("acme", &run, pb::SandboxBackend::Docker))
        .await?;
    assert_eq!(mesh.containers()?.len(), 1);
    // SIGKILL: no shutdown path runs. The restarted runner removes what its
    // earlier life left (a sandbox is never reused).
    let runner = mesh
        .mesh
        .mesh
        .process_mut("sandbox-runner")
        .expect("runner");
    runner.kill().await;
    mesh.mesh.mesh.restart("sandbox-runner").await?;
    let mut gone = false;
    for _ in 0..100 {
        if mesh.containers()?.is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the orphaned sandbox was removed");
    assert!(
        mesh.runner_log()
            .contains("removed sandboxes left by an earlier run")
    );
    Ok(())
}

#[tokio::test]
async fn worker_and_secret_hard_revocations_kill_their_sandboxes() -> anyhow::Result<()> {
    let Some(mesh) = setup(&[]).await? else {
        return Ok(());
    };
    mesh.profile("acme", &[("API_KEY", &canary())]).await?;
    let mut operator = mesh.runner_as(OPERATOR)?;
    let sleep = |run: &Run| start_request("acme", run, pb::SandboxBackend::Docker);

    // A worker enrolled at identity, revoked hard: its sandbox dies with it.
    let (worker_id, worker_identity) = enroll_worker(&mesh, "acme").await?;
    let mut enrolled_worker = mesh.worker_with(worker_identity.clone()).await?;
    assert_eq!(enrolled_worker.id, worker_id);
    let run = enrolled_worker
        .run(&mesh, "acme", "", IMAGE, &["sleep", "300"])
        .await?;
    let mut enrolled =
        bulkhead_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient::new(
            mesh.mesh.channel("sandbox-runner", &worker_identity)?,
        );
    let sb = enrolled
        .start_sandbox(sleep(&run))
        .await?
        .into_inner()
        .sandbox
        .expect("sandbox");
    assert_eq!(sb.worker_id, worker_id);
    let mut watch = operator
        .stream_output(pb::StreamOutputRequest {
            tenant: "acme".into(),
            sandbox_id: sb.sandbox_id.clone(),
            from_offset: 0,
        })
        .await?
        .into_inner();
    mesh.identity_as(OPERATOR)?
        .revoke(id_pb::RevokeRequest {
            tenant: "acme".into(),
            target: Some(id_pb::revoke_request::Target::WorkerId(worker_id.clone())),
            reason: "test: host compromised".into(),
            hard: true,
        })
        .await?;
    let at = Instant::now();
    let exit = exit_of(&mut watch).await?;
    assert!(at.elapsed() < Duration::from_secs(1), "{:?}", at.elapsed());
    assert_eq!(exit.reason(), pb::ExitReason::Revoked);
    let e = mesh.audited("run.aborted_by_revocation", &run.id).await?;
    // Identity revokes the worker's runs with it; either entry may come first.
    let by = &e.attributes["revoked"];
    assert!(
        *by == format!("worker:{worker_id}") || *by == format!("run:{}", run.id),
        "{by}"
    );
    mesh.audited("sandbox.scrubbed", &run.id).await?;
    let aborts = mesh
        .audit()
        .await?
        .into_iter()
        .filter(|e| e.r#type == "run.aborted_by_revocation" && e.run_id == run.id)
        .count();
    assert_eq!(aborts, 1, "one abort per sandbox");

    // A secret revoked hard at sealed-vault: the runs holding it are revoked
    // at identity, and their sandboxes die.
    let mut w1 = mesh.worker(ACME_WORKER).await?;
    let run = w1.run(&mesh, "acme", "", IMAGE, &["sleep", "300"]).await?;
    // Enqueued and accepted before the revocation, started after it.
    let next = w1.run(&mesh, "acme", "", IMAGE, &["sleep", "300"]).await?;
    let mut worker = mesh.runner_as(ACME_WORKER)?;
    let sb = worker
        .start_sandbox(sleep(&run))
        .await?
        .into_inner()
        .sandbox
        .expect("sandbox");
    let mut watch = worker
        .stream_output(pb::StreamOutputRequest {
            tenant: "acme".into(),
            sandbox_id: sb.sandbox_id.clone(),
            from_offset: 0,
        })
        .await?
        .into_inner();
    let revoked = mesh
        .sealed_as(OPERATOR)?
        .revoke_secret(bulkhead_proto::sealed::v1::RevokeSecretRequest {
            tenant: "acme".into(),
            profile: "default".into(),
            key: "API_KEY".into(),
            hard: true,
            reason: "test: key leaked".into(),
        })
        .await?
        .into_inner();
    assert!(revoked.affected_run_ids.contains(&run.id), "{revoked:?}");
    let at = Instant::now();
    let exit = exit_of(&mut watch).await?;
    assert!(at.elapsed() < Duration::from_secs(1), "{:?}", at.elapsed());
    assert_eq!(exit.reason(), pb::ExitReason::Revoked);
    mesh.audited("run.aborted_by_revocation", &run.id).await?;
    // And the next start of a run needing the key fails closed.
    let e = worker
        .start_sandbox(sleep(&next))
        .await
        .expect_err("revoked key");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    for _ in 0..50 {
        if mesh.containers()?.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(mesh.containers()?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_stopped_runner_releases_every_sandbox() -> anyhow::Result<()> {
    let Some(mut mesh) = setup(&[]).await? else {
        return Ok(());
    };
    mesh.profile("acme", &[("API_KEY", &canary())]).await?;
    let mut w1 = mesh.worker(ACME_WORKER).await?;
    let run = w1.run(&mesh, "acme", "", IMAGE, &["sleep", "300"]).await?;
    let mut worker = mesh.runner_as(ACME_WORKER)?;
    let sb = worker
        .start_sandbox(start_request("acme", &run, pb::SandboxBackend::Docker))
        .await?
        .into_inner()
        .sandbox
        .expect("sandbox");
    let mut stream = worker
        .stream_output(pb::StreamOutputRequest {
            tenant: "acme".into(),
            sandbox_id: sb.sandbox_id.clone(),
            from_offset: 0,
        })
        .await?
        .into_inner();
    // SIGTERM: the open stream ends, the drain does not wait for the
    // sandbox, and the sandbox is released before the runner exits.
    let at = Instant::now();
    mesh.mesh
        .mesh
        .process_mut("sandbox-runner")
        .expect("runner")
        .stop()
        .await;
    assert!(
        at.elapsed() < Duration::from_secs(8),
        "stopped after {:?}",
        at.elapsed()
    );
    let ended = loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            other => break other,
        }
    };
    assert!(ended.is_err() || matches!(ended, Ok(None)), "{ended:?}");
    assert!(
        mesh.containers()?.is_empty(),
        "no sandbox outlives its runner"
    );
    let scrubbed = mesh.audited("sandbox.scrubbed", &run.id).await?;
    assert_eq!(scrubbed.attributes["cause"], "released");
    Ok(())
}
