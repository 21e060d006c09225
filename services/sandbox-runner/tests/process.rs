//! The sandbox-runner's process backend (hosts without Docker), against the
//! real mesh: the agent's environment holds exactly the delivered keys and the
//! runner's settings, its output is redacted, release removes its directory,
//! and a hard revocation kills its process group. Docker is not needed.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bulkhead_proto::identity::v1 as id_pb;
use bulkhead_proto::sandbox::v1 as pb;
use support::*;
use tonic::Code;

#[tokio::test]
async fn the_environment_holds_only_what_was_delivered() -> anyhow::Result<()> {
    let mesh = start_mesh(&[]).await?;
    let canary = canary();
    mesh.profile("acme", &[("CANARY_KEY", &canary)]).await?;
    let run = start_run(&mesh, "acme", "", "run-process").await?;
    let mut worker = mesh.runner_as("tenant/acme/worker/w1")?;
    let sb = worker
        .start_sandbox(start_request(
            "acme",
            &run,
            "/usr/bin/env",
            &[],
            pb::SandboxBackend::Process,
        ))
        .await?
        .into_inner()
        .sandbox
        .expect("sandbox");
    assert_eq!(sb.backend(), pb::SandboxBackend::Process);
    assert!(sb.container_id.is_empty());
    let (out, _err, exit) = collect(&mut worker, "acme", &sb.sandbox_id).await?;
    assert_eq!(exit.reason(), pb::ExitReason::Exited);
    assert_eq!(exit.exit_code, 0);
    assert!(!leaks(&out, &canary), "{out}");
    let keys: BTreeSet<&str> = out
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    let want: BTreeSet<&str> = [
        "PATH",
        "HOME",
        "TMPDIR",
        "DEBUG",
        "CANARY_KEY",
        "BULKHEAD_JWT_SVID",
        "BULKHEAD_RUN_ID",
        "BULKHEAD_SANDBOX_ID",
        "BULKHEAD_TENANT",
        "BULKHEAD_TASK_ID",
    ]
    .into_iter()
    .collect();
    assert_eq!(
        keys, want,
        "nothing of the runner's environment leaks in: {out}"
    );
    assert!(out.lines().any(|l| l == "CANARY_KEY=<redacted:CANARY_KEY>"));
    let home = out
        .lines()
        .find_map(|l| l.strip_prefix("HOME="))
        .expect("HOME")
        .to_owned();
    assert!(std::path::Path::new(&home).is_dir(), "a fresh directory");

    let report = worker
        .release_sandbox(pb::ReleaseSandboxRequest {
            tenant: "acme".into(),
            sandbox_id: sb.sandbox_id.clone(),
        })
        .await?
        .into_inner()
        .report
        .expect("report");
    assert!(report.sandbox_destroyed && report.files_removed && report.credentials_zeroized);
    assert_eq!(report.scrubbed_keys, vec!["CANARY_KEY".to_owned()]);
    assert!(report.run_identity_revoked);
    assert!(
        !std::path::Path::new(&home).exists(),
        "its directory is gone"
    );
    mesh.audited("sandbox.scrubbed", &run.id).await?;
    assert!(!leaks(&mesh.all_logs(), &canary));
    assert!(!leaks(&format!("{:?}", mesh.audit().await?), &canary));
    Ok(())
}

#[tokio::test]
async fn a_revoked_process_sandbox_is_killed_with_its_children() -> anyhow::Result<()> {
    let mesh = start_mesh(&[]).await?;
    mesh.profile("acme", &[("API_KEY", &canary())]).await?;
    let run = start_run(&mesh, "acme", "", "run-process-revoked").await?;
    let mut worker = mesh.runner_as("tenant/acme/worker/w1")?;
    // A child in the background and the shell waiting: both must die.
    let sb = worker
        .start_sandbox(start_request(
            "acme",
            &run,
            "/bin/sh",
            &["sh", "-c", "sleep 300 & echo started $!; wait"],
            pb::SandboxBackend::Process,
        ))
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
    // Wait until the agent runs; it names its background child.
    let child: i32 = loop {
        match stream.message().await? {
            Some(pb::StreamOutputResponse {
                event: Some(pb::stream_output_response::Event::Chunk(c)),
            }) => {
                let text = String::from_utf8_lossy(&c.data).into_owned();
                if let Some(pid) = text.trim().strip_prefix("started ") {
                    break pid.parse()?;
                }
            }
            Some(_) => {}
            None => anyhow::bail!("ended early"),
        }
    };
    mesh.identity_as(OPERATOR)?
        .revoke(id_pb::RevokeRequest {
            tenant: "acme".into(),
            target: Some(id_pb::revoke_request::Target::RunId(run.id.clone())),
            reason: "test".into(),
            hard: true,
        })
        .await?;
    let at = Instant::now();
    let exit = loop {
        match stream.message().await? {
            Some(pb::StreamOutputResponse {
                event: Some(pb::stream_output_response::Event::Exit(e)),
            }) => break e,
            Some(_) => {}
            None => anyhow::bail!("no exit"),
        }
    };
    assert!(at.elapsed() < Duration::from_secs(1), "{:?}", at.elapsed());
    assert_eq!(exit.reason(), pb::ExitReason::Revoked);
    assert_eq!(exit.signal, 9);
    mesh.audited("run.aborted_by_revocation", &run.id).await?;
    // The backgrounded sleep went with the group (gone, or a zombie
    // waiting for a reaper).
    let mut dead = false;
    for _ in 0..50 {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().to_owned());
        if state.is_none_or(|s| s.starts_with('Z') || s.starts_with('X')) {
            dead = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(dead, "the sandbox's child still runs");
    // Only programs the runner names may run.
    let e = worker
        .start_sandbox(start_request(
            "acme",
            &start_run(&mesh, "acme", "", "run-process-2").await?,
            "/usr/bin/python3",
            &[],
            pb::SandboxBackend::Process,
        ))
        .await
        .expect_err("program not allowed");
    assert_eq!(e.code(), Code::PermissionDenied);
    Ok(())
}
