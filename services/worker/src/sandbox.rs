//! Runs attempts in the host's sandbox-runner (DESIGN.md, "One run, end to
//! end", steps 6 to 8). For each run the worker
//!
//! 1. mints a JWT-SVID of the run for sealed-vault, at identity, over mTLS as
//!    the run (its X.509-SVID, whose key is wiped right after);
//! 2. asks the runner, as itself (the worker's SVID), to start the sandbox
//!    with the run's cascade and the agent's requested keys — the runner
//!    resolves the values at sealed-vault and delivers them into the sandbox,
//!    so that the worker never sees one;
//! 3. follows the redacted output (resuming after a dropped stream) until
//!    the exit message, a cancel or the deadline;
//! 4. always releases the sandbox (kill, remove, zeroize, revoke the run's
//!    identity), with retries, whatever happened before.

use std::time::Duration;

use bulkhead_mesh::client::{self, MeshChannel};
use bulkhead_mesh::tls::{ExpectServer, Identity, TrustBundle};
use bulkhead_proto::identity::v1 as id_pb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sandbox::v1 as pb;
use bulkhead_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use zeroize::Zeroizing;

use crate::config::SandboxConfig;
use crate::run::{AgentSpec, Backend, Outcome, RunCredentials, RunResult, RunSpec, Runner};
use crate::run::{SUMMARY_LIMIT, Tail};

/// How long minting the run's token may take.
const MINT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long StartSandbox may take (it returns once the agent runs).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Each ReleaseSandbox call, and how many are tried.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(15);
const RELEASE_ATTEMPTS: u32 = 6;
/// Output streams opened again in a row before the run counts as lost.
const STREAM_ATTEMPTS: u32 = 8;
/// The first pause between retries; it doubles up to [`MAX_RETRY_WAIT`].
const RETRY_WAIT: Duration = Duration::from_millis(200);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);
/// The runner's bounds on a sandbox's timeout.
const MIN_SANDBOX_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_SANDBOX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

type RunnerClient = SandboxServiceClient<MeshChannel>;

/// Runs attempts in sandboxes of the host's sandbox-runner, reached over
/// mTLS as the worker. Build it from [`SandboxConfig`] with
/// [`SandboxRunner::new`] and give it to [`crate::Worker::with_runner`], or
/// set [`crate::WorkerConfig::sandbox`].
#[derive(Debug, Clone)]
pub struct SandboxRunner {
    runner: String,
    identity: String,
    bundle: TrustBundle,
    backend: Backend,
    networks: Vec<String>,
}

impl SandboxRunner {
    /// A runner for `sandbox`, minting run tokens at `identity` (`host:port`).
    pub fn new(sandbox: &SandboxConfig, identity: impl Into<String>, bundle: TrustBundle) -> Self {
        Self {
            runner: sandbox.runner.clone(),
            identity: identity.into(),
            bundle,
            backend: sandbox.backend,
            networks: sandbox.networks.clone(),
        }
    }

    fn runner_client(&self, worker: &Identity) -> Result<RunnerClient, RunResult> {
        client::channel(
            &self.runner,
            Some(worker),
            &self.bundle,
            ExpectServer::Service("sandbox-runner".into()),
        )
        .map(SandboxServiceClient::new)
        .map_err(|e| {
            tracing::warn!(runner = %self.runner, error = %e, "cannot dial the sandbox-runner");
            RunResult::error("cannot reach the sandbox-runner")
        })
    }

    /// A JWT-SVID of the run for sealed-vault, asked for as the run. The
    /// run's key is not needed after this.
    async fn mint_token(&self, run: RunCredentials) -> Result<Zeroizing<String>, RunResult> {
        let audience = run
            .spiffe_id
            .trust_domain()
            .join(["service", "sealed-vault"])
            .map_err(|e| RunResult::error(format!("no sealed-vault id: {e}")))?;
        let identity = run.identity().map_err(|e| {
            tracing::warn!(error = %e, "the run's identity is unusable");
            RunResult::error("the run's identity is unusable")
        })?;
        drop(run);
        let ch = client::channel(
            &self.identity,
            Some(&identity),
            &self.bundle,
            ExpectServer::Service("identity".into()),
        )
        .map_err(|e| {
            tracing::warn!(identity = %self.identity, error = %e, "cannot dial identity");
            RunResult::error("cannot reach identity")
        })?;
        let mut identity_client = IdentityServiceClient::new(ch);
        let call = identity_client.mint_jwt_svid(id_pb::MintJwtSvidRequest {
            audience: audience.to_string(),
            ..Default::default()
        });
        match tokio::time::timeout(MINT_TIMEOUT, call).await {
            Ok(Ok(resp)) => Ok(Zeroizing::new(resp.into_inner().token)),
            Ok(Err(status)) => {
                tracing::warn!(error = %crate::failure::describe(&status), "cannot mint the run's jwt-svid");
                Err(RunResult::error(format!(
                    "identity refused the run's token: {}",
                    status.code()
                )))
            }
            Err(_) => Err(RunResult::error(
                "identity did not mint the run's token in time",
            )),
        }
    }

    fn start_request(&self, spec: StartSpec<'_>, token: &str) -> pb::StartSandboxRequest {
        // The runner runs what the dispatcher assigned the run (it asks the
        // dispatcher, and refuses a request that differs): these are the
        // assignment's, sent as they are. For the process backend the runner
        // finds the program from the command's argv[0].
        pb::StartSandboxRequest {
            tenant: spec.tenant.to_owned(),
            run_jwt_svid: token.to_owned(),
            task_id: spec.task_id.to_owned(),
            image: spec.agent.image.clone(),
            command: spec.agent.command.clone(),
            cascade: spec.cascade,
            agent: spec.agent.name.clone(),
            tool: spec.agent.tool.clone(),
            secret_keys: spec.agent.requested_secret_keys.clone(),
            payload: spec.payload,
            limits: Some(pb::Limits {
                timeout: Some(sandbox_timeout(
                    spec.deadline.saturating_duration_since(Instant::now()),
                )),
                ..Default::default()
            }),
            network: Some(network_policy(&self.networks)),
            backend: match self.backend {
                Backend::Docker => pb::SandboxBackend::Docker,
                Backend::Process => pb::SandboxBackend::Process,
            } as i32,
        }
    }

    /// Starts the sandbox. A cancel or the deadline while it starts does not
    /// abandon it (its id is needed to release it): it is noted in `stop`.
    async fn start(
        &self,
        runner: &mut RunnerClient,
        req: pb::StartSandboxRequest,
        run_id: &str,
        deadline: Instant,
        cancel: &CancellationToken,
        stop: &mut Option<Outcome>,
    ) -> Result<pb::Sandbox, RunResult> {
        let tenant = req.tenant.clone();
        let mut starter = runner.clone();
        let call = tokio::time::timeout(START_TIMEOUT, starter.start_sandbox(req));
        tokio::pin!(call);
        let answer = loop {
            tokio::select! {
                r = &mut call => break r,
                () = cancel.cancelled(), if stop.is_none() => *stop = Some(Outcome::Cancelled),
                () = tokio::time::sleep_until(deadline), if stop.is_none() => *stop = Some(Outcome::TimedOut),
            }
        };
        let status = match answer {
            Ok(Ok(resp)) => {
                return resp
                    .into_inner()
                    .sandbox
                    .ok_or_else(|| RunResult::error("the sandbox-runner answered no sandbox"));
            }
            Ok(Err(status)) => status,
            Err(_) => tonic::Status::deadline_exceeded("no answer in time"),
        };
        tracing::warn!(error = %crate::failure::describe(&status), "the sandbox did not start");
        if !refusal_is_final(status.code()) {
            // The sandbox may have started with the answer lost: find it by
            // the run, which has at most one, and release it.
            self.release_run(runner, &tenant, run_id).await;
        }
        let what = format!(
            "the sandbox-runner did not start the sandbox: {}: {}",
            status.code(),
            status.message()
        );
        Err(match start_failure_outcome(status.code()) {
            Outcome::Error => RunResult::error(what),
            outcome => RunResult {
                outcome,
                exit_code: -1,
                output_summary: truncate(what),
            },
        })
    }

    /// Releases every sandbox of `run_id` this worker holds on the runner.
    async fn release_run(&self, runner: &mut RunnerClient, tenant: &str, run_id: &str) {
        let list = runner.list_sandboxes(pb::ListSandboxesRequest {
            tenant: tenant.to_owned(),
            ..Default::default()
        });
        match tokio::time::timeout(RELEASE_TIMEOUT, list).await {
            Ok(Ok(resp)) => {
                for sb in resp.into_inner().sandboxes {
                    if sb.run_id == run_id && sb.state() != pb::SandboxState::Released {
                        release(runner, tenant, &sb.sandbox_id).await;
                    }
                }
            }
            Ok(Err(status)) => {
                tracing::warn!(error = %crate::failure::describe(&status), "cannot list the runner's sandboxes to release the run's")
            }
            Err(_) => tracing::warn!("the runner did not list its sandboxes in time"),
        }
    }
}

/// No network, or the worker's `--sandbox-network`s (which the runner
/// checks against its own allow-list for the tenant).
fn network_policy(networks: &[String]) -> pb::NetworkPolicy {
    pb::NetworkPolicy {
        mode: if networks.is_empty() {
            pb::NetworkMode::None
        } else {
            pb::NetworkMode::AllowList
        } as i32,
        allowed_networks: networks.to_vec(),
    }
}

/// What StartSandbox is built from.
struct StartSpec<'a> {
    tenant: &'a str,
    task_id: &'a str,
    agent: &'a AgentSpec,
    cascade: Option<bulkhead_proto::sealed::v1::Cascade>,
    payload: bytes::Bytes,
    deadline: Instant,
}

#[async_trait::async_trait]
impl Runner for SandboxRunner {
    fn backends(&self) -> Vec<Backend> {
        vec![self.backend]
    }

    async fn run(&self, spec: RunSpec, cancel: CancellationToken) -> RunResult {
        let RunSpec {
            task_id,
            tenant,
            agent,
            payload,
            cascade,
            deadline,
            credentials,
            worker_identity,
            ..
        } = spec;
        let run_id = credentials.run_id.clone();
        if Instant::now() >= deadline {
            return killed(Outcome::TimedOut, String::new());
        }

        // 1. The run's token; nothing has started if this is interrupted.
        let token = tokio::select! {
            t = self.mint_token(credentials) => t,
            () = cancel.cancelled() => return killed(Outcome::Cancelled, String::new()),
            () = tokio::time::sleep_until(deadline) => return killed(Outcome::TimedOut, String::new()),
        };
        let token = match token {
            Ok(t) => t,
            Err(r) => return r,
        };

        // 2. The sandbox.
        let mut runner = match self.runner_client(&worker_identity) {
            Ok(r) => r,
            Err(r) => return r,
        };
        let req = self.start_request(
            StartSpec {
                tenant: &tenant,
                task_id: &task_id,
                agent: &agent,
                cascade,
                payload,
                deadline,
            },
            &token,
        );
        drop(token);
        let mut stop = None;
        let sandbox = match self
            .start(&mut runner, req, &run_id, deadline, &cancel, &mut stop)
            .await
        {
            Ok(sb) => sb,
            Err(r) => return r,
        };
        let id = sandbox.sandbox_id;
        tracing::info!(sandbox = %id, backend = ?self.backend, keys = ?sandbox.injected_keys, "sandbox started");

        // 3. Its output, until it ends or the run is stopped.
        let mut output = Output::default();
        let ended = match stop {
            Some(outcome) => Ended::Stopped(outcome),
            None => follow(&mut runner, &tenant, &id, &mut output, deadline, &cancel).await,
        };

        // 4. Always released: this kills it if it still runs.
        let released = release(&mut runner, &tenant, &id).await;
        let summary = output.tail.to_summary();
        let result = match ended {
            Ended::Exited(exit) => result_of(&exit, summary),
            Ended::Stopped(outcome) => killed(outcome, summary),
            Ended::Lost(why) => RunResult {
                outcome: Outcome::Error,
                exit_code: -1,
                output_summary: with_note(summary, &why),
            },
        };
        tracing::info!(sandbox = %id, released, outcome = ?result.outcome, exit_code = result.exit_code, "sandbox run ended");
        result
    }
}

/// How following a sandbox ended.
#[derive(Debug)]
enum Ended {
    /// Its exit message.
    Exited(pb::ExitStatus),
    /// A cancel or the deadline came first.
    Stopped(Outcome),
    /// Its output could not be followed to the end.
    Lost(String),
}

/// What the worker kept of a sandbox's output: the tail, and how far each
/// stream was read (to resume without repeating or losing bytes).
#[derive(Debug)]
struct Output {
    tail: Tail,
    next: [u64; 2],
}

impl Default for Output {
    fn default() -> Self {
        Self {
            tail: Tail::new(SUMMARY_LIMIT),
            next: [0, 0],
        }
    }
}

impl Output {
    /// Where a resumed stream starts: no stream is behind it.
    fn resume_from(&self) -> u64 {
        self.next[0].min(self.next[1])
    }

    /// Keeps the part of `chunk` not seen yet.
    fn take(&mut self, chunk: &pb::OutputChunk) {
        let i = usize::from(chunk.stream == pb::OutputStream::Stderr as i32);
        let end = chunk.offset + chunk.data.len() as u64;
        if end <= self.next[i] {
            return;
        }
        let skip = usize::try_from(self.next[i].saturating_sub(chunk.offset)).unwrap_or(0);
        self.tail.push(&chunk.data[skip.min(chunk.data.len())..]);
        self.next[i] = end;
    }
}

/// Follows the sandbox's output to its exit message, opening the stream
/// again (from where it was) when it drops.
async fn follow(
    runner: &mut RunnerClient,
    tenant: &str,
    id: &str,
    output: &mut Output,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Ended {
    let mut failures = 0;
    let mut wait = RETRY_WAIT;
    loop {
        let opened = runner.stream_output(pb::StreamOutputRequest {
            tenant: tenant.to_owned(),
            sandbox_id: id.to_owned(),
            from_offset: output.resume_from(),
        });
        let read = async {
            let mut stream = opened.await?.into_inner();
            loop {
                match stream.message().await? {
                    Some(pb::StreamOutputResponse {
                        event: Some(pb::stream_output_response::Event::Chunk(c)),
                    }) => {
                        output.take(&c);
                        // Progress: a later drop starts the retries afresh.
                        failures = 0;
                    }
                    Some(pb::StreamOutputResponse {
                        event: Some(pb::stream_output_response::Event::Exit(e)),
                    }) => return Ok(Some(e)),
                    Some(_) => {}
                    None => return Ok(None),
                }
            }
        };
        let status = tokio::select! {
            r = read => match r {
                Ok(Some(exit)) => return Ended::Exited(exit),
                Ok(None) => tonic::Status::unavailable("the output stream ended without an exit"),
                Err(status) => status,
            },
            () = cancel.cancelled() => return Ended::Stopped(Outcome::Cancelled),
            () = tokio::time::sleep_until(deadline) => return Ended::Stopped(Outcome::TimedOut),
        };
        if matches!(
            status.code(),
            Code::NotFound | Code::InvalidArgument | Code::PermissionDenied
        ) {
            tracing::warn!(sandbox = %id, error = %crate::failure::describe(&status), "the sandbox's output is gone");
            return Ended::Lost(format!("the sandbox's output is gone: {}", status.code()));
        }
        failures += 1;
        if failures >= STREAM_ATTEMPTS {
            tracing::warn!(sandbox = %id, error = %crate::failure::describe(&status), "giving up on the sandbox's output");
            return Ended::Lost(format!(
                "the sandbox's output stream kept failing: {}",
                status.code()
            ));
        }
        tracing::info!(sandbox = %id, error = %crate::failure::describe(&status), from = output.resume_from(), "output stream dropped; resuming");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return Ended::Stopped(Outcome::Cancelled),
            () = tokio::time::sleep_until(deadline) => return Ended::Stopped(Outcome::TimedOut),
        }
        wait = (wait * 2).min(MAX_RETRY_WAIT);
    }
}

/// ReleaseSandbox, retried until it answers; whether the sandbox is known to
/// be released (an unknown sandbox is: it is gone).
async fn release(runner: &mut RunnerClient, tenant: &str, id: &str) -> bool {
    let mut wait = RETRY_WAIT;
    for attempt in 1..=RELEASE_ATTEMPTS {
        let call = runner.release_sandbox(pb::ReleaseSandboxRequest {
            tenant: tenant.to_owned(),
            sandbox_id: id.to_owned(),
        });
        let status = match tokio::time::timeout(RELEASE_TIMEOUT, call).await {
            Ok(Ok(resp)) => {
                let report = resp.into_inner().report.unwrap_or_default();
                tracing::info!(
                    sandbox = %id,
                    destroyed = report.sandbox_destroyed,
                    files_removed = report.files_removed,
                    zeroized = report.credentials_zeroized,
                    run_identity_revoked = report.run_identity_revoked,
                    "sandbox released"
                );
                return true;
            }
            Ok(Err(status)) => status,
            Err(_) => tonic::Status::deadline_exceeded("no answer in time"),
        };
        match status.code() {
            Code::NotFound => return true,
            Code::InvalidArgument | Code::PermissionDenied => {
                tracing::error!(sandbox = %id, error = %crate::failure::describe(&status), "the runner refuses to release the sandbox");
                return false;
            }
            _ => {
                tracing::warn!(sandbox = %id, attempt, error = %crate::failure::describe(&status), "releasing the sandbox failed; retrying")
            }
        }
        if attempt < RELEASE_ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_RETRY_WAIT);
        }
    }
    tracing::error!(sandbox = %id, "could not release the sandbox; the runner kills it at its timeout");
    false
}

/// Whether a refused StartSandbox certainly left nothing behind (the runner
/// answered, and destroys what it began on every error); otherwise the
/// answer may have been lost after the sandbox started.
fn refusal_is_final(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::ResourceExhausted
    )
}

/// How a refused start is reported: what no retry can fix fails the task
/// (an image, program or key the runner or sealed-vault refuses, a revoked
/// key); the rest lets the dispatcher offer the task again.
fn start_failure_outcome(code: Code) -> Outcome {
    match code {
        Code::InvalidArgument
        | Code::PermissionDenied
        | Code::NotFound
        | Code::FailedPrecondition => Outcome::Failed,
        _ => Outcome::Error,
    }
}

/// The sandbox's timeout for what is left until the run's deadline, in
/// whole seconds within the runner's bounds (rounded up: the worker's own
/// deadline ends the run first).
fn sandbox_timeout(left: Duration) -> prost_types::Duration {
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    let d = Duration::from_secs(secs).clamp(MIN_SANDBOX_TIMEOUT, MAX_SANDBOX_TIMEOUT);
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// The report of a sandbox that ended with `exit`.
fn result_of(exit: &pb::ExitStatus, summary: String) -> RunResult {
    use pb::ExitReason as R;
    let reason = exit.reason();
    let (outcome, exit_code) = match reason {
        R::Exited if exit.signal != 0 => (Outcome::Failed, 128 + exit.signal),
        R::Exited if exit.exit_code == 0 => (Outcome::Succeeded, 0),
        R::Exited => (Outcome::Failed, exit.exit_code),
        R::TimedOut => (Outcome::TimedOut, -1),
        R::OomKilled => (Outcome::Failed, -1),
        R::Revoked => (Outcome::Revoked, -1),
        // Released by someone else (an operator, the runner shutting down) or
        // lost by the runner: the attempt did not run to its end.
        R::Released | R::Failed | R::Unspecified => (Outcome::Error, -1),
    };
    let output_summary = if reason == R::Exited {
        summary
    } else {
        let name = reason.as_str_name().trim_start_matches("EXIT_REASON_");
        let note = if exit.message.is_empty() {
            format!("sandbox ended: {name}")
        } else {
            format!("sandbox ended: {name}: {}", exit.message)
        };
        with_note(summary, &note)
    };
    RunResult {
        outcome,
        exit_code,
        output_summary,
    }
}

fn killed(outcome: Outcome, output_summary: String) -> RunResult {
    RunResult {
        outcome,
        exit_code: -1,
        output_summary,
    }
}

/// The summary with a last line from the worker, within the size limit.
fn with_note(summary: String, note: &str) -> String {
    let mut s = summary;
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s.push('[');
    s.push_str(note);
    s.push(']');
    truncate(s)
}

fn truncate(s: String) -> String {
    let mut t = Tail::new(SUMMARY_LIMIT);
    t.push(s.as_bytes());
    t.to_summary()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stream: pb::OutputStream, offset: u64, data: &str) -> pb::OutputChunk {
        pb::OutputChunk {
            stream: stream as i32,
            data: data.as_bytes().to_vec().into(),
            offset,
        }
    }

    #[test]
    fn a_resumed_stream_neither_repeats_nor_loses_output() {
        use pb::OutputStream::{Stderr, Stdout};
        let mut o = Output::default();
        o.take(&chunk(Stdout, 0, "hello "));
        o.take(&chunk(Stderr, 0, "warn\n"));
        o.take(&chunk(Stdout, 6, "world\n"));
        assert_eq!(o.next, [12, 5]);
        // Resumed from the stream furthest behind: stdout is replayed from
        // 5, of which only the unseen part is kept.
        assert_eq!(o.resume_from(), 5);
        o.take(&chunk(Stdout, 5, " world\nmore\n"));
        o.take(&chunk(Stderr, 5, "again\n"));
        o.take(&chunk(Stderr, 0, "warn\n"));
        assert_eq!(o.tail.to_summary(), "hello warn\nworld\nmore\nagain\n");
        assert_eq!(o.next, [17, 11]);
        // Output no longer buffered by the runner: the gap is skipped.
        o.take(&chunk(Stdout, 100, "late\n"));
        assert_eq!(o.next[0], 105);
    }

    fn exit(reason: pb::ExitReason, code: i32, signal: i32, message: &str) -> pb::ExitStatus {
        pb::ExitStatus {
            reason: reason as i32,
            exit_code: code,
            signal,
            message: message.into(),
            exited_at: None,
        }
    }

    #[test]
    fn exit_messages_become_outcomes() {
        use pb::ExitReason as R;
        let r = result_of(&exit(R::Exited, 0, 0, ""), "out\n".into());
        assert_eq!((r.outcome, r.exit_code), (Outcome::Succeeded, 0));
        assert_eq!(r.output_summary, "out\n");
        let r = result_of(&exit(R::Exited, 3, 0, ""), String::new());
        assert_eq!((r.outcome, r.exit_code), (Outcome::Failed, 3));
        let r = result_of(&exit(R::Exited, 0, 9, ""), String::new());
        assert_eq!((r.outcome, r.exit_code), (Outcome::Failed, 137));
        let r = result_of(&exit(R::Revoked, -1, 9, "run revoked"), "partial".into());
        assert_eq!((r.outcome, r.exit_code), (Outcome::Revoked, -1));
        assert_eq!(
            r.output_summary,
            "partial\n[sandbox ended: REVOKED: run revoked]"
        );
        let r = result_of(&exit(R::TimedOut, -1, 9, ""), String::new());
        assert_eq!(r.outcome, Outcome::TimedOut);
        assert_eq!(r.output_summary, "[sandbox ended: TIMED_OUT]");
        assert_eq!(
            result_of(&exit(R::OomKilled, -1, 9, ""), String::new()).outcome,
            Outcome::Failed
        );
        for retried in [R::Released, R::Failed, R::Unspecified] {
            assert_eq!(
                result_of(&exit(retried, -1, 0, ""), String::new()).outcome,
                Outcome::Error
            );
        }
        // The note never pushes the summary past its limit.
        let long = "x".repeat(SUMMARY_LIMIT);
        let r = result_of(&exit(R::Revoked, -1, 9, "why"), long);
        assert_eq!(r.output_summary.len(), SUMMARY_LIMIT);
        assert!(r.output_summary.ends_with("[sandbox ended: REVOKED: why]"));
    }

    #[test]
    fn start_refusals_fail_the_task_or_offer_it_again() {
        for code in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::NotFound,
            Code::FailedPrecondition,
        ] {
            assert_eq!(start_failure_outcome(code), Outcome::Failed, "{code:?}");
            assert!(refusal_is_final(code));
        }
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Internal] {
            assert_eq!(start_failure_outcome(code), Outcome::Error, "{code:?}");
            assert!(
                !refusal_is_final(code),
                "{code:?} may hide a started sandbox"
            );
        }
        assert_eq!(
            start_failure_outcome(Code::ResourceExhausted),
            Outcome::Error
        );
    }

    #[test]
    fn sandboxes_get_no_network_unless_the_worker_names_some() {
        let none = network_policy(&[]);
        assert_eq!(none.mode(), pb::NetworkMode::None);
        assert!(none.allowed_networks.is_empty());
        let some = network_policy(&["vendor-net".to_owned()]);
        assert_eq!(some.mode(), pb::NetworkMode::AllowList);
        assert_eq!(some.allowed_networks, ["vendor-net"]);
    }

    #[test]
    fn the_sandbox_timeout_is_what_is_left_within_bounds() {
        let secs = |d: Duration| sandbox_timeout(d).seconds;
        assert_eq!(secs(Duration::from_millis(1500)), 2);
        assert_eq!(secs(Duration::from_secs(30)), 30);
        assert_eq!(secs(Duration::ZERO), 1);
        assert_eq!(secs(Duration::from_secs(30 * 3600)), 24 * 3600);
    }
}
