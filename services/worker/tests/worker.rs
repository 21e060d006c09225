//! The worker as the dispatcher and identity meet it: real mTLS, a real mesh
//! server with test doubles behind it, real child processes for the runs.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::claim_response::Body as Down;
use bulkhead_proto::sandbox::v1::SandboxBackend;
use bulkhead_worker::backoff::BackoffConfig;
use bulkhead_worker::{EnrollError, JoinToken, WorkerConfig, WorkerError};
use bytes::Bytes;
use support::{Body, ClaimStream, Dispatcher, IdentitySvc, JOIN_TOKEN, Pki, WAIT};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

const HEARTBEAT: Duration = Duration::from_millis(100);
const WORKER: &str = "tenant/acme/worker/w1";

fn config(pki: &Pki, d: &Dispatcher) -> WorkerConfig {
    let mut c = WorkerConfig::new(d.addr.to_string(), pki.bundle.clone());
    c.max_concurrent_runs = 2;
    c.labels = "gpu=none,zone=a".parse().unwrap();
    c.reconnect = BackoffConfig {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(400),
        jitter: 0.5,
    };
    c.shutdown_grace = Duration::from_millis(300);
    c.report_ack_wait = Duration::from_secs(3);
    c.auth_failure_limit = 3;
    c.name = "test-host".into();
    c
}

struct Running {
    handle: JoinHandle<Result<(), WorkerError>>,
    shutdown: CancellationToken,
}

impl Running {
    fn spawn(config: WorkerConfig, identity: Option<bulkhead_mesh::tls::Identity>) -> Self {
        // The worker's log, shown for failing tests.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("bulkhead_worker=debug")
            .try_init();
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        let handle = tokio::spawn(async move {
            match identity {
                Some(id) => bulkhead_worker::run_with_identity(config, id, s).await,
                None => bulkhead_worker::run(config, s).await,
            }
        });
        Self { handle, shutdown }
    }

    async fn ended(self) -> Result<(), WorkerError> {
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("the worker did not stop in time")
            .expect("the worker panicked")
    }

    async fn stop(self) -> Result<(), WorkerError> {
        self.shutdown.cancel();
        self.ended().await
    }
}

fn assignment(
    task_id: &str,
    epoch: u64,
    command: &[&str],
    payload: &str,
    within: Duration,
) -> Down {
    let deadline = std::time::SystemTime::now() + within;
    let since = deadline.duration_since(std::time::UNIX_EPOCH).unwrap();
    Down::Assignment(pb::ClaimAssignment {
        task: Some(pb::Task {
            tenant: "acme".into(),
            task_id: task_id.into(),
            agent: "echo".into(),
            agent_version: "1".into(),
            payload: Bytes::from(payload.to_owned()),
            attempt: 1,
            ..Default::default()
        }),
        agent: Some(pb::Agent {
            name: "echo".into(),
            version: "1".into(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }),
        attempt: 1,
        lease_epoch: epoch,
        deadline: Some(prost_types::Timestamp {
            seconds: i64::try_from(since.as_secs()).unwrap(),
            nanos: i32::try_from(since.subsec_nanos()).unwrap(),
        }),
    })
}

async fn expect_accept(s: &mut ClaimStream) -> pb::ClaimAccept {
    match s.next_not_heartbeat().await {
        Body::Accept(a) => a,
        other => panic!("expected an accept, got {other:?}"),
    }
}

async fn expect_report(s: &mut ClaimStream) -> pb::ClaimReport {
    match s.next_not_heartbeat().await {
        Body::Report(r) => r,
        other => panic!("expected a report, got {other:?}"),
    }
}

async fn expect_credits(s: &mut ClaimStream) -> u32 {
    match s.next_not_heartbeat().await {
        Body::Credits(c) => c.slots,
        other => panic!("expected credits, got {other:?}"),
    }
}

/// Answers an accept with the run's SVID, as the dispatcher does once
/// identity signed the CSR.
async fn grant_svid(pki: &Pki, s: &ClaimStream, a: &pb::ClaimAccept, run_id: &str) {
    let svid = pki.sign_csr(&format!("tenant/acme/run/{run_id}"), &a.run_csr_der, None);
    s.send(Down::RunSvid(pb::ClaimRunSvid {
        task_id: a.task_id.clone(),
        attempt: a.attempt,
        lease_epoch: a.lease_epoch,
        run_id: run_id.into(),
        svid: Some(svid),
    }))
    .await;
}

/// Assigns a task, takes the accept and starts the run.
async fn start_task(
    pki: &Pki,
    s: &mut ClaimStream,
    task_id: &str,
    epoch: u64,
    command: &[&str],
    payload: &str,
) -> pb::ClaimAccept {
    s.send(assignment(
        task_id,
        epoch,
        command,
        payload,
        Duration::from_secs(60),
    ))
    .await;
    let a = expect_accept(s).await;
    grant_svid(pki, s, &a, &format!("run-{task_id}")).await;
    a
}

async fn ack(s: &ClaimStream, r: &pb::ClaimReport) {
    s.send(Down::ReportAck(pb::ClaimReportAck {
        task_id: r.task_id.clone(),
        attempt: r.attempt,
        lease_epoch: r.lease_epoch,
        accepted: true,
        rejection: 0,
    }))
    .await;
}

fn cancel(task_id: &str, epoch: u64, reason: pb::CancelReason) -> Down {
    Down::Cancel(pb::ClaimCancel {
        task_id: task_id.into(),
        attempt: 1,
        lease_epoch: epoch,
        reason: reason as i32,
        message: "test".into(),
    })
}

fn outcome(r: &pb::ClaimReport) -> pb::RunOutcome {
    pb::RunOutcome::try_from(r.outcome).unwrap()
}

#[tokio::test]
async fn registers_claims_runs_and_reports() {
    let pki = Pki::new();
    let mut d = Dispatcher::start(&pki, HEARTBEAT).await;
    let w = Running::spawn(config(&pki, &d), Some(pki.identity(WORKER)));
    let mut s = d.stream().await;

    let regs = d.registrations();
    assert_eq!(regs.len(), 1);
    let reg = &regs[0].request;
    assert_eq!(regs[0].caller, pki.id(WORKER), "registered as its SVID");
    assert_eq!(reg.labels.get("gpu").map(String::as_str), Some("none"));
    assert_eq!(reg.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(reg.max_concurrent_runs, 2);
    assert_eq!(reg.sandbox_backends, [SandboxBackend::Process as i32]);
    assert!(!reg.version.is_empty());

    // Credits come first, one per free slot.
    match s.next().await {
        Body::Credits(c) => assert_eq!(c.slots, 2),
        other => panic!("the first message must be credits, got {other:?}"),
    }

    s.send(assignment(
        "t1",
        7,
        &["sh", "-c", "read x; sleep 0.5; echo got $x"],
        "hello\n",
        Duration::from_secs(60),
    ))
    .await;
    let a = expect_accept(&mut s).await;
    assert_eq!((a.task_id.as_str(), a.attempt, a.lease_epoch), ("t1", 1, 7));
    {
        // A CSR that parses and verifies, for a fresh P-256 key.
        use x509_parser::certification_request::X509CertificationRequest;
        use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
        use x509_parser::prelude::FromDer;
        let (_, csr) = X509CertificationRequest::from_der(&a.run_csr_der).expect("csr parses");
        csr.verify_signature().expect("csr verifies");
        let spki = &csr.certification_request_info.subject_pki;
        assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        assert_eq!(curve, Some(OID_EC_P256));
    }
    grant_svid(&pki, &s, &a, "run-1").await;

    // While it runs, heartbeats list its lease.
    let deadline = Instant::now() + WAIT;
    loop {
        let leases = s.heartbeat().await;
        if leases == [("t1".to_owned(), 1, 7)] {
            break;
        }
        assert!(Instant::now() < deadline, "no heartbeat listed the lease");
    }

    let r = expect_report(&mut s).await;
    assert_eq!((r.task_id.as_str(), r.attempt, r.lease_epoch), ("t1", 1, 7));
    assert_eq!(outcome(&r), pb::RunOutcome::Succeeded);
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.output_summary, "got hello\n");
    // The slot is granted back.
    assert_eq!(expect_credits(&mut s).await, 1);
    ack(&s, &r).await;

    // A second task whose agent has no command fails as an error.
    let a = start_task(&pki, &mut s, "t2", 1, &[], "").await;
    let r = expect_report(&mut s).await;
    assert_eq!(r.task_id, a.task_id);
    assert_eq!(outcome(&r), pb::RunOutcome::Error);
    assert_eq!(r.output_summary, "no command");
    ack(&s, &r).await;
    assert_eq!(expect_credits(&mut s).await, 1);

    // A non-zero exit fails with its code.
    start_task(
        &pki,
        &mut s,
        "t3",
        1,
        &["sh", "-c", "echo bad >&2; exit 4"],
        "",
    )
    .await;
    let r = expect_report(&mut s).await;
    assert_eq!((outcome(&r), r.exit_code), (pb::RunOutcome::Failed, 4));
    assert_eq!(r.output_summary, "bad\n");
    ack(&s, &r).await;

    w.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn reconnects_relists_leases_and_resends_unacknowledged_reports() {
    let pki = Pki::new();
    let mut d = Dispatcher::start(&pki, HEARTBEAT).await;
    let w = Running::spawn(config(&pki, &d), Some(pki.identity(WORKER)));

    let mut s1 = d.stream().await;
    assert_eq!(expect_credits(&mut s1).await, 2);
    start_task(
        &pki,
        &mut s1,
        "t1",
        3,
        &["sh", "-c", "sleep 1; echo done"],
        "",
    )
    .await;
    // The dispatcher drops the stream while the run goes on.
    s1.fail(Status::unavailable("dispatcher restarting")).await;

    let mut s2 = d.stream().await;
    // On the new stream: credits for the one free slot, then a heartbeat that
    // lists the lease carried over.
    match s2.next().await {
        Body::Credits(c) => assert_eq!(c.slots, 1),
        other => panic!("expected credits first, got {other:?}"),
    }
    assert_eq!(s2.heartbeat().await, [("t1".to_owned(), 1, 3)]);
    let r = expect_report(&mut s2).await;
    assert_eq!((r.task_id.as_str(), r.lease_epoch), ("t1", 3));
    assert_eq!(outcome(&r), pb::RunOutcome::Succeeded);
    assert_eq!(r.output_summary, "done\n");
    // Not acknowledged: the stream breaks again.
    s2.fail(Status::unavailable("again")).await;

    let mut s3 = d.stream().await;
    assert_eq!(expect_credits(&mut s3).await, 2);
    // The lease is still listed until the report is acknowledged, and the
    // report is sent again.
    assert_eq!(s3.heartbeat().await, [("t1".to_owned(), 1, 3)]);
    let again = expect_report(&mut s3).await;
    assert_eq!(again, r);
    ack(&s3, &again).await;
    // Once acknowledged it is neither listed nor sent again.
    let deadline = Instant::now() + WAIT;
    while !s3.heartbeat().await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the acknowledged lease stays listed"
        );
    }
    s3.fail(Status::unavailable("once more")).await;
    let mut s4 = d.stream().await;
    let msgs = s4.collect_for(Duration::from_millis(500)).await;
    assert!(
        !msgs.iter().any(|m| matches!(m, Body::Report(_))),
        "an acknowledged report is not sent again: {msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| matches!(m, Body::Heartbeat(h) if h.leases.is_empty()))
    );
    assert_eq!(
        d.registrations().len(),
        1,
        "a broken stream needs no new registration"
    );

    w.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn cancels_runs_and_unstarted_assignments() {
    let pki = Pki::new();
    let mut d = Dispatcher::start(&pki, HEARTBEAT).await;
    let w = Running::spawn(config(&pki, &d), Some(pki.identity(WORKER)));
    let mut s = d.stream().await;
    assert_eq!(expect_credits(&mut s).await, 2);

    start_task(&pki, &mut s, "run", 1, &["sleep", "30"], "").await;
    s.send(assignment(
        "wait",
        1,
        &["true"],
        "",
        Duration::from_secs(60),
    ))
    .await;
    expect_accept(&mut s).await;
    // Not yet started (no SVID): dropped, its slot granted again, no report.
    s.send(cancel("wait", 1, pb::CancelReason::AcceptRefused))
        .await;
    assert_eq!(expect_credits(&mut s).await, 1);

    // A cancel for another epoch is not for this lease.
    s.send(cancel("run", 9, pb::CancelReason::Requested)).await;
    let quiet = s.collect_for(Duration::from_millis(300)).await;
    assert!(
        quiet.iter().all(|m| matches!(m, Body::Heartbeat(_))),
        "{quiet:?}"
    );

    let started = Instant::now();
    s.send(cancel("run", 1, pb::CancelReason::Requested)).await;
    let r = expect_report(&mut s).await;
    assert!(started.elapsed() < Duration::from_secs(2), "cancelled late");
    assert_eq!(
        (r.task_id.as_str(), outcome(&r)),
        ("run", pb::RunOutcome::Cancelled)
    );
    ack(&s, &r).await;
    assert_eq!(expect_credits(&mut s).await, 1);

    // Cancelled at the task's deadline: reported as timed out.
    start_task(&pki, &mut s, "late", 1, &["sleep", "30"], "").await;
    s.send(cancel("late", 1, pb::CancelReason::DeadlineExceeded))
        .await;
    let r = expect_report(&mut s).await;
    assert_eq!(outcome(&r), pb::RunOutcome::TimedOut);
    ack(&s, &r).await;
    assert_eq!(expect_credits(&mut s).await, 1);

    // The assignment's own deadline kills the run.
    s.send(assignment(
        "short",
        1,
        &["sleep", "30"],
        "",
        Duration::from_millis(800),
    ))
    .await;
    let a = expect_accept(&mut s).await;
    grant_svid(&pki, &s, &a, "run-short").await;
    let started = Instant::now();
    let r = expect_report(&mut s).await;
    assert_eq!(outcome(&r), pb::RunOutcome::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(2));
    ack(&s, &r).await;

    w.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn registers_again_when_the_dispatcher_forgets_it() {
    let pki = Pki::new();
    let mut d = Dispatcher::start(&pki, HEARTBEAT).await;
    let w = Running::spawn(config(&pki, &d), Some(pki.identity(WORKER)));
    let s1 = d.stream().await;
    assert_eq!(d.registrations().len(), 1);
    s1.fail(Status::failed_precondition("worker not registered"))
        .await;
    let mut s2 = d.stream().await;
    assert_eq!(
        d.registrations().len(),
        2,
        "registered again before the new stream"
    );
    assert_eq!(expect_credits(&mut s2).await, 2);
    w.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn gives_up_when_the_dispatcher_keeps_refusing_it() {
    let pki = Pki::new();
    let d = Dispatcher::start(&pki, HEARTBEAT).await;
    d.refuse_claims(Some(Status::permission_denied("worker revoked")));
    let w = Running::spawn(config(&pki, &d), Some(pki.identity(WORKER)));
    match w.ended().await {
        Err(WorkerError::Refused { detail, .. }) => {
            assert!(detail.contains("worker revoked"), "{detail}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn gives_up_when_its_certificate_is_revoked_and_kills_its_runs() {
    let pki = Pki::new();
    let mut d = Dispatcher::start(&pki, HEARTBEAT).await;
    let w = Running::spawn(config(&pki, &d), Some(pki.identity(WORKER)));
    let mut s = d.stream().await;
    assert_eq!(expect_credits(&mut s).await, 2);
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 30", pid_file.display());
    start_task(&pki, &mut s, "t1", 1, &["sh", "-c", &script], "").await;
    let deadline = Instant::now() + WAIT;
    let pid: i32 = loop {
        if let Ok(p) = std::fs::read_to_string(&pid_file)
            && let Ok(pid) = p.trim().parse()
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the run did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(alive(pid));
    // Revoked: the stream ends, and every handshake after is refused.
    d.revoked
        .0
        .lock()
        .unwrap()
        .insert(pki.id(WORKER).to_string());
    let started = Instant::now();
    let r = w.ended().await;
    assert!(
        matches!(r, Err(WorkerError::Refused { .. })),
        "expected a refusal, got {r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(!alive(pid), "a worker that gives up kills its runs");
}

fn alive(pid: i32) -> bool {
    // A zombie not yet reaped by whoever inherited it is dead too.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s.rsplit(')').next().unwrap_or("").trim_start();
        !state.starts_with('Z') && !state.starts_with('X')
    })
}

#[tokio::test]
async fn drains_finishes_its_runs_and_exits() {
    let pki = Pki::new();
    let mut d = Dispatcher::start(&pki, HEARTBEAT).await;
    let w = Running::spawn(config(&pki, &d), Some(pki.identity(WORKER)));
    let mut s = d.stream().await;
    assert_eq!(expect_credits(&mut s).await, 2);
    start_task(
        &pki,
        &mut s,
        "t1",
        1,
        &["sh", "-c", "sleep 0.5; echo ok"],
        "",
    )
    .await;
    s.send(Down::Drain(pb::ClaimDrain {
        reason: "maintenance".into(),
        deadline: None,
    }))
    .await;
    // Taking nothing new: an assignment now is not accepted.
    s.send(assignment("t2", 1, &["true"], "", Duration::from_secs(60)))
        .await;
    let r = expect_report(&mut s).await;
    assert_eq!(
        (r.task_id.as_str(), outcome(&r)),
        ("t1", pb::RunOutcome::Succeeded)
    );
    ack(&s, &r).await;
    w.ended().await.expect("a drained worker exits cleanly");
    let rest = s.collect_for(Duration::from_millis(200)).await;
    assert!(
        !rest
            .iter()
            .any(|m| matches!(m, Body::Credits(_) | Body::Accept(_))),
        "no credits or accepts after the drain: {rest:?}"
    );
}

#[tokio::test]
async fn shutdown_stops_taking_work_and_reports_what_it_killed() {
    let pki = Pki::new();
    let mut d = Dispatcher::start(&pki, HEARTBEAT).await;
    let w = Running::spawn(config(&pki, &d), Some(pki.identity(WORKER)));
    let mut s = d.stream().await;
    assert_eq!(expect_credits(&mut s).await, 2);
    start_task(&pki, &mut s, "slow", 1, &["sleep", "30"], "").await;
    start_task(
        &pki,
        &mut s,
        "quick",
        1,
        &["sh", "-c", "sleep 0.1; echo fine"],
        "",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    w.shutdown.cancel();
    let mut reports = Vec::new();
    while reports.len() < 2 {
        match s.next().await {
            Body::Report(r) => reports.push(r),
            Body::Heartbeat(_) => {}
            other => panic!("after the signal only reports and heartbeats: {other:?}"),
        }
    }
    reports.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    assert_eq!(
        outcome(&reports[0]),
        pb::RunOutcome::Succeeded,
        "{reports:?}"
    );
    assert_eq!(
        outcome(&reports[1]),
        pb::RunOutcome::Cancelled,
        "killed after the grace period"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // Waiting for the acknowledgements, the worker idles (it does not spin).
    let cpu = cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks() - cpu;
    assert!(used < 30, "{used} clock ticks of cpu in 1 s of waiting");
    for r in &reports {
        ack(&s, r).await;
    }
    w.ended().await.expect("a clean stop");
}

/// User and system cpu time of this process, in clock ticks (1/100 s).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based).
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn enrolls_once_and_reuses_its_state_dir() {
    let pki = Arc::new(Pki::new());
    let mut d = Dispatcher::start(&pki, HEARTBEAT).await;
    let idsvc = IdentitySvc::start(pki.clone(), Duration::from_secs(3600)).await;
    let state = tempfile::tempdir().unwrap();
    let mut c = config(&pki, &d);
    c.identity = Some(idsvc.addr.to_string());
    c.state_dir = Some(state.path().join("worker"));

    // Without a token and without state there is nothing to start with.
    let r = bulkhead_worker::run(c.clone(), CancellationToken::new()).await;
    assert!(
        matches!(r, Err(WorkerError::Enroll(EnrollError::NoCredentials))),
        "{r:?}"
    );
    // A wrong token is refused.
    let mut bad = c.clone();
    bad.join_token = Some(JoinToken::new("bh_jt_wrong"));
    let r = bulkhead_worker::run(bad, CancellationToken::new()).await;
    assert!(
        matches!(
            r,
            Err(WorkerError::Enroll(EnrollError::Refused {
                code: tonic::Code::Unauthenticated,
                ..
            }))
        ),
        "{r:?}"
    );

    let mut first = c.clone();
    first.join_token = Some(JoinToken::new(JOIN_TOKEN));
    let w = Running::spawn(first, None);
    let mut s = d.stream().await;
    assert_eq!(expect_credits(&mut s).await, 2);
    let enrolled_as = s.caller.clone();
    assert_eq!(
        enrolled_as.to_string(),
        "spiffe://bulkhead.test/tenant/acme/worker/w-1"
    );
    assert_eq!(
        idsvc.log.lock().unwrap().enrollments,
        [("test-host".to_owned(), enrolled_as.to_string())]
    );
    let file = state
        .path()
        .join("worker")
        .join(bulkhead_worker::enroll::STATE_FILE);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key file is private");
        let dir_mode = std::fs::metadata(file.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
    }
    w.stop().await.expect("a clean stop");

    // Restarted without a token: the SVID in the state dir is reused.
    let w = Running::spawn(c, None);
    let mut s = d.stream().await;
    assert_eq!(s.caller, enrolled_as);
    assert_eq!(expect_credits(&mut s).await, 2);
    assert_eq!(
        idsvc.log.lock().unwrap().enrollments.len(),
        1,
        "no second enrollment"
    );
    w.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn renews_its_svid_and_uses_the_new_one_for_new_connections() {
    let pki = Arc::new(Pki::new());
    let mut d = Dispatcher::start(&pki, HEARTBEAT).await;
    // SVIDs of 4 s (backdated 1 s): renewed about 1.7 s after issue.
    let idsvc = IdentitySvc::start(pki.clone(), Duration::from_secs(3)).await;
    let state = tempfile::tempdir().unwrap();
    let mut c = config(&pki, &d);
    c.identity = Some(idsvc.addr.to_string());
    c.join_token = Some(JoinToken::new(JOIN_TOKEN));
    c.state_dir = Some(state.path().to_owned());
    let w = Running::spawn(c, None);
    let s1 = d.stream().await;
    let first_serial = s1.serial.clone();
    let first_caller = s1.caller.clone();

    let deadline = Instant::now() + WAIT;
    while idsvc.log.lock().unwrap().renewals.is_empty() {
        assert!(Instant::now() < deadline, "no renewal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renewed = idsvc.log.lock().unwrap().renewals[0].clone();
    // The state dir holds the renewed SVID.
    let pem = std::fs::read(state.path().join(bulkhead_worker::enroll::STATE_FILE)).unwrap();
    let on_disk = bulkhead_mesh::tls::Identity::from_pem(&pem, &pem, "state").unwrap();
    let leaf = bulkhead_mesh::svid::validate_leaf(&on_disk.chain()[0]).unwrap();
    let latest = idsvc.log.lock().unwrap().renewals.clone();
    assert!(latest.contains(&hex(&leaf.serial)), "{latest:?}");

    // A new stream is made with the renewed SVID.
    s1.fail(Status::unavailable("reconnect")).await;
    let s2 = d.stream().await;
    let serial = hex(&s2.serial.clone().unwrap());
    assert_ne!(s2.serial, first_serial);
    assert!(
        idsvc.log.lock().unwrap().renewals.contains(&serial),
        "new connection uses a renewed svid ({serial}, first renewal {renewed})"
    );
    assert_eq!(s2.caller, first_caller, "same identity");
    w.stop().await.expect("a clean stop");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
