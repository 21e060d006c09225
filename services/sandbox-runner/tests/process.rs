//! The sandbox-runner's process backend (hosts without Docker), against the
//! real mesh: the agent's environment holds exactly the delivered keys and the
//! runner's settings, its output is redacted, release removes its directory,
//! and a hard revocation kills its process group. The runner runs only what
//! the dispatcher assigned a run, for the worker holding it. Docker is not
//! needed.

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
    let mut w1 = mesh.worker("tenant/acme/worker/w1").await?;
    let run = w1
        .run(&mesh, "acme", "", PROCESS_IMAGE, &["/usr/bin/env"])
        .await?;
    let mut worker = w1.runner(&mesh)?;
    let sb = worker
        .start_sandbox(start_request("acme", &run, pb::SandboxBackend::Process))
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
    let mut w1 = mesh.worker("tenant/acme/worker/w1").await?;
    // A child in the background and the shell waiting: both must die.
    let run = w1
        .run(
            &mesh,
            "acme",
            "",
            PROCESS_IMAGE,
            &["/bin/sh", "-c", "sleep 300 & echo started $!; wait"],
        )
        .await?;
    let mut worker = w1.runner(&mesh)?;
    let sb = worker
        .start_sandbox(start_request("acme", &run, pb::SandboxBackend::Process))
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
    // Only programs the runner names may run, by path or by name.
    for program in ["/usr/bin/python3", "cat"] {
        let run = w1.run(&mesh, "acme", "", PROCESS_IMAGE, &[program]).await?;
        let e = worker
            .start_sandbox(start_request("acme", &run, pb::SandboxBackend::Process))
            .await
            .expect_err("program not allowed");
        assert_eq!(e.code(), Code::PermissionDenied, "{program}: {e:?}");
        assert!(e.message().contains("program"), "{e:?}");
    }
    Ok(())
}

/// A change a compromised worker makes to its StartSandbox request.
type Tamper = Box<dyn Fn(&mut pb::StartSandboxRequest)>;

/// Finding A: a compromised worker must not choose what runs with its
/// tenant's credentials — another command that prints a key in a form no
/// redactor knows, another run's token, or a run that is no longer running.
#[tokio::test]
async fn a_worker_runs_only_what_the_dispatcher_assigned() -> anyhow::Result<()> {
    let mesh = start_mesh(&[]).await?;
    let canary = canary();
    mesh.profile("acme", &[("KEY", &canary)]).await?;
    let mut w1 = mesh.worker("tenant/acme/worker/w1").await?;
    let run = w1
        .run(
            &mesh,
            "acme",
            "",
            PROCESS_IMAGE,
            &["/bin/sh", "-c", "cat; echo; echo done"],
        )
        .await?;
    let mut worker = w1.runner(&mesh)?;
    let reversed: String = canary.chars().rev().collect();

    // Each field the runner takes from the assignment, sent otherwise.
    const EXFILTRATE: [&str; 3] = ["sh", "-c", "printf %s \"$KEY\" | rev"];
    let tamper: Vec<(&str, Tamper)> = vec![
        (
            "command",
            Box::new(|r| r.command = EXFILTRATE.iter().map(|s| (*s).to_owned()).collect()),
        ),
        (
            "command",
            Box::new(|r| {
                r.image = "/bin/sh".into();
                r.command = EXFILTRATE.iter().map(|s| (*s).to_owned()).collect();
            }),
        ),
        ("image", Box::new(|r| r.image = "/usr/bin/env".into())),
        ("tool", Box::new(|r| r.tool = "shell".into())),
        ("agent", Box::new(|r| r.agent = "other-agent".into())),
        (
            "secret_keys",
            Box::new(|r| r.secret_keys = vec!["OTHER_KEY".into()]),
        ),
        (
            "payload",
            Box::new(|r| r.payload = b"rm -rf".to_vec().into()),
        ),
        ("task_id", Box::new(|r| r.task_id = "another-task".into())),
        (
            "cascade",
            Box::new(|r| {
                let mut c = cascade("acme");
                if let Some(p) = c.system.as_mut().and_then(|l| l.profile.as_mut()) {
                    p.profile = "admin".into();
                }
                r.cascade = Some(c);
            }),
        ),
    ];
    for (field, change) in &tamper {
        let mut r = start_request("acme", &run, pb::SandboxBackend::Process);
        change(&mut r);
        let e = worker
            .start_sandbox(r)
            .await
            .expect_err("a request that differs from the assignment");
        assert_eq!(e.code(), Code::PermissionDenied, "{field}: {e:?}");
        assert!(
            e.message().contains(&format!("{field} differs")),
            "{field}: {e:?}"
        );
    }
    // Nothing started, nothing resolved, every refusal recorded.
    let listed = worker
        .list_sandboxes(pb::ListSandboxesRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(listed.sandboxes.is_empty(), "{listed:?}");
    let sandboxes = mesh.mesh.dir().join("data/sandbox-runner/sandboxes");
    assert!(
        std::fs::read_dir(&sandboxes).map_or(true, |mut d| d.next().is_none()),
        "no process sandbox was made"
    );
    let events = mesh.audit().await?;
    let refused: Vec<&str> = events
        .iter()
        .filter(|e| e.r#type == "sandbox.refused" && e.run_id == run.id)
        .map(|e| e.attributes.get("field").map_or("", String::as_str))
        .collect();
    let fields: Vec<&str> = tamper.iter().map(|(f, _)| *f).collect();
    assert_eq!(refused, fields, "each refusal is audited with its field");
    assert!(
        !events.iter().any(|e| e.run_id == run.id
            && (e.r#type == "sealed.credential.resolved"
                || e.r#type == "sandbox.credential.injected")),
        "no credential was resolved for a refused start"
    );

    // Another worker of the same tenant, with w1's run token: refused.
    let mut w2 = mesh.runner_as("tenant/acme/worker/w2")?;
    let e = w2
        .start_sandbox(start_request("acme", &run, pb::SandboxBackend::Process))
        .await
        .expect_err("another worker's run");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("another worker"), "{e:?}");
    let refusal = mesh
        .audit()
        .await?
        .into_iter()
        .find(|e| {
            e.r#type == "sandbox.refused"
                && e.run_id == run.id
                && e.attributes.get("reason").map(String::as_str) == Some("run of another worker")
        })
        .expect("the refusal is audited");
    assert!(refusal.attributes["worker"].ends_with("/worker/w2"));

    // The worker that holds the run, sending nothing but its token: the
    // assignment's command runs, with the assignment's payload.
    let sb = worker
        .start_sandbox(bare_start_request(
            "acme",
            &run,
            pb::SandboxBackend::Process,
        ))
        .await?
        .into_inner()
        .sandbox
        .expect("sandbox");
    assert_eq!(sb.task_id, run.task_id);
    assert_eq!(sb.image, "/bin/sh", "the command's program");
    assert_eq!(sb.injected_keys, vec!["KEY".to_owned()]);
    let (out, _err, exit) = collect(&mut worker, "acme", &sb.sandbox_id).await?;
    assert_eq!(exit.exit_code, 0, "{out}");
    assert_eq!(out, "the task payload\ndone\n");
    worker
        .release_sandbox(pb::ReleaseSandboxRequest {
            tenant: "acme".into(),
            sandbox_id: sb.sandbox_id,
        })
        .await?;

    // A run whose task was cancelled, and one whose task finished.
    let cancelled = w1
        .run(&mesh, "acme", "", PROCESS_IMAGE, &["/bin/sh", "-c", "cat"])
        .await?;
    mesh.cancel(&cancelled).await?;
    let finished = w1
        .run(&mesh, "acme", "", PROCESS_IMAGE, &["/bin/sh", "-c", "cat"])
        .await?;
    w1.report(
        &finished,
        bulkhead_proto::dispatcher::v1::RunOutcome::Succeeded,
    )
    .await?;
    // A finished run still has a valid token: the dispatcher's answer is
    // what refuses it.
    let e = worker
        .start_sandbox(start_request(
            "acme",
            &finished,
            pb::SandboxBackend::Process,
        ))
        .await
        .expect_err("the run is not running");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not running"), "{e:?}");
    let refused = mesh.audited("sandbox.refused", &finished.id).await?;
    assert_eq!(refused.attributes["reason"], "run not running");
    // Cancelling a running task also revokes its run's identity: refused by
    // the token check or, before the revocation reaches the runner, by the
    // dispatcher's answer.
    let e = worker
        .start_sandbox(start_request(
            "acme",
            &cancelled,
            pb::SandboxBackend::Process,
        ))
        .await
        .expect_err("the run was cancelled");
    assert!(
        matches!(e.code(), Code::FailedPrecondition | Code::Unauthenticated),
        "{e:?}"
    );
    let listed = worker
        .list_sandboxes(pb::ListSandboxesRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(
        listed
            .sandboxes
            .iter()
            .all(|s| s.run_id != cancelled.id && s.run_id != finished.id),
        "{listed:?}"
    );
    let logs = mesh.all_logs();
    assert!(!logs.contains(&reversed) && !leaks(&logs, &canary));
    assert!(!leaks(&format!("{:?}", mesh.audit().await?), &canary));
    Ok(())
}
