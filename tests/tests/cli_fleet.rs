//! `bulkhead agent|task|worker|pool`: the real binary against a real mesh
//! (DESIGN.md, "One run, end to end", steps 2 and 4). Operator A submits an
//! agent; A's own approval is refused with PERMISSION_DENIED, operator B's is
//! taken; a task for the approved agent is enqueued (payload from a file and
//! from stdin), shown queued, cancelled, and `task watch` on it exits
//! non-zero; a task naming an agent still pending is refused with
//! FAILED_PRECONDITION. Malformed input (labels, bounds, a payload on the
//! command line, a reset naming no scope) is refused before anything is
//! dialed.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use base64::Engine as _;
use bulkhead_cluster::Endpoints;
use bulkhead_testkit::mesh::TestMesh;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

const DEADLINE: Duration = Duration::from_secs(60);
const AGENT: &str = "support-bot";
const PENDING_AGENT: &str = "unreviewed-bot";
const IMAGE: &str = "registry.example/support-bot@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

macro_rules! args {
    ($($a:expr),* $(,)?) => { [$(OsString::from($a)),*] };
}

fn command(args: &[OsString]) -> anyhow::Result<tokio::process::Command> {
    let exe = bulkhead_cluster::find_executable("bulkhead", None)?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(args)
        .env_remove("BULKHEAD_DIR")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

async fn bulkhead(args: &[OsString]) -> anyhow::Result<Output> {
    Ok(tokio::time::timeout(DEADLINE, command(args)?.output()).await??)
}

/// Runs `bulkhead ARGS` with `input` on its stdin.
async fn piped(args: &[OsString], input: &[u8]) -> anyhow::Result<Output> {
    let mut child = command(args)?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    stdin.write_all(input).await?;
    drop(stdin);
    Ok(tokio::time::timeout(DEADLINE, child.wait_with_output()).await??)
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

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Requires success; the stdout.
async fn ok(mesh: &TestMesh, args: &[OsString]) -> anyhow::Result<String> {
    let out = bulkhead(args).await?;
    ensure!(
        out.status.success(),
        "bulkhead {args:?} failed\n{}\n{}",
        text(&out),
        mesh.logs()
    );
    Ok(stdout(&out))
}

/// Requires failure; the whole output.
async fn fails(args: &[OsString]) -> anyhow::Result<Output> {
    let out = bulkhead(args).await?;
    ensure!(
        !out.status.success(),
        "bulkhead {args:?} succeeded\n{}",
        text(&out)
    );
    Ok(out)
}

/// One JSON value per line.
fn json_lines(out: &str) -> anyhow::Result<Vec<Value>> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}

fn json_one(out: &str) -> anyhow::Result<Value> {
    let mut values = json_lines(out)?;
    ensure!(values.len() == 1, "expected one JSON line, got\n{out}");
    Ok(values.remove(0))
}

/// The row of a table whose first column is `id`.
fn row<'a>(table: &'a str, id: &str) -> Option<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
}

/// A second mesh directory for another operator, `spiffe://TD/admin/<name>`:
/// its certificate issued by `bulkhead pki issue` from the mesh's CA, and an
/// endpoints.json naming it.
async fn second_operator(mesh: &TestMesh, into: &Path, name: &str) -> anyhow::Result<()> {
    let pki = into.join("pki");
    ok(
        mesh,
        &args![
            "pki",
            "issue",
            "--spiffe-id",
            format!("spiffe://bulkhead.test/admin/{name}"),
            "--out",
            &pki,
            "--ca-dir",
            mesh.dir().join("pki"),
            "--name",
            name,
        ],
    )
    .await?;
    let mut endpoints = Endpoints::load(mesh.dir())?;
    endpoints.operator_cert = pki.join(format!("{name}.pem"));
    endpoints.operator_key = pki.join(format!("{name}.key"));
    std::fs::write(
        Endpoints::path(into),
        serde_json::to_string_pretty(&endpoints)?,
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_approve_agents_and_manage_tasks() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let dir = mesh.dir().as_os_str().to_owned();
    let reviewer = tempfile::tempdir()?;
    second_operator(&mesh, reviewer.path(), "reviewer").await?;
    let dir_b = reviewer.path().as_os_str().to_owned();

    // `health` covers the dispatcher with the other services.
    let health = ok(&mesh, &args!["health", "--dir", &dir]).await?;
    let line = health
        .lines()
        .find(|l| l.starts_with("dispatcher "))
        .with_context(|| format!("no dispatcher in `health`:\n{health}"))?;
    ensure!(line.ends_with("SERVING"), "{line}");

    // Operator A submits; the version is pending and names its submitter.
    let submitted = json_one(
        &ok(
            &mesh,
            &args![
                "agent",
                "submit",
                "--dir",
                &dir,
                "--name",
                AGENT,
                "--version",
                "1.0.0",
                "--image",
                IMAGE,
                "--command",
                "python",
                "--command",
                "-m",
                "--command",
                "bot",
                "--description",
                "answers support tickets",
                "--json",
            ],
        )
        .await?,
    )?;
    assert_eq!(submitted["status"], "pending", "{submitted}");
    assert_eq!(
        submitted["submitted_by"], "spiffe://bulkhead.test/admin/operator",
        "{submitted}"
    );
    assert_eq!(
        submitted["command"],
        serde_json::json!(["python", "-m", "bot"]),
        "{submitted}"
    );
    let other = ok(
        &mesh,
        &args![
            "agent",
            "submit",
            "--dir",
            &dir,
            "--name",
            PENDING_AGENT,
            "--version",
            "0.1.0",
            "--image",
            "registry.example/unreviewed:0.1.0",
        ],
    )
    .await?;
    ensure!(
        other.contains(&format!("submitted agent {PENDING_AGENT} 0.1.0")),
        "{other}"
    );

    // The submitter cannot approve their own version.
    let refused = fails(&args!["agent", "approve", "--dir", &dir, AGENT, "1.0.0"]).await?;
    let err = stderr(&refused);
    ensure!(
        err.contains("ApproveAgent") && err.contains("PERMISSION_DENIED"),
        "{}",
        text(&refused)
    );
    let pending = ok(
        &mesh,
        &args!["agent", "list", "--dir", &dir, "--name", AGENT],
    )
    .await?;
    let r = row(&pending, AGENT).with_context(|| format!("no {AGENT} in\n{pending}"))?;
    ensure!(
        r.contains(" pending "),
        "the refused approval changed it: {r}"
    );

    // Operator B approves it.
    let approved = ok(
        &mesh,
        &args![
            "agent",
            "approve",
            "--dir",
            &dir_b,
            AGENT,
            "1.0.0",
            "--comment",
            "reviewed the image digest",
        ],
    )
    .await?;
    ensure!(
        approved.contains(&format!("approved agent {AGENT} 1.0.0")),
        "{approved}"
    );
    let listed = ok(
        &mesh,
        &args!["agent", "list", "--dir", &dir, "--status", "approved"],
    )
    .await?;
    let r = row(&listed, AGENT).with_context(|| format!("no {AGENT} in\n{listed}"))?;
    ensure!(
        r.contains(" 1.0.0 ") && r.contains(" approved "),
        "{listed}"
    );
    ensure!(
        row(&listed, PENDING_AGENT).is_none(),
        "a pending agent is listed as approved:\n{listed}"
    );
    let agents = json_lines(
        &ok(
            &mesh,
            &args!["agent", "list", "--dir", &dir, "--name", AGENT, "--json"],
        )
        .await?,
    )?;
    ensure!(agents.len() == 1, "{agents:?}");
    assert_eq!(agents[0]["status"], "approved");
    assert_eq!(
        agents[0]["decided_by"],
        "spiffe://bulkhead.test/admin/reviewer"
    );
    assert_eq!(agents[0]["decision_reason"], "reviewed the image digest");

    // A task for the approved agent, without a cascade, its payload from a
    // file.
    let work = tempfile::tempdir()?;
    let payload_file = work.path().join("job.json");
    std::fs::write(&payload_file, br#"{"ticket": 42}"#)?;
    let enqueued = ok(
        &mesh,
        &args![
            "task",
            "enqueue",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "--agent",
            AGENT,
            "--label",
            "gpu=a100",
            "--label",
            "region=eu-west",
            "--payload-file",
            &payload_file,
            "--priority",
            "-5",
            "--timeout",
            "30s",
            "--max-attempts",
            "2",
        ],
    )
    .await?;
    let task_id = enqueued
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("enqueued task "))
        .map(str::trim)
        .with_context(|| format!("no task id in\n{enqueued}"))?
        .to_owned();
    ensure!(!task_id.is_empty() && task_id != "-", "{enqueued}");

    let shown = ok(
        &mesh,
        &args!["task", "get", "--dir", &dir, "--tenant", "acme", &task_id],
    )
    .await?;
    ensure!(
        shown.starts_with(&format!("task {task_id}  (queued)")),
        "{shown}"
    );
    let t = json_one(
        &ok(
            &mesh,
            &args![
                "task", "get", "--dir", &dir, "--tenant", "acme", &task_id, "--json"
            ],
        )
        .await?,
    )?;
    assert_eq!(t["status"], "queued", "{t}");
    assert_eq!(t["tenant"], "acme", "{t}");
    assert_eq!(t["agent"], AGENT, "{t}");
    assert_eq!(t["agent_version"], "1.0.0", "the version is resolved: {t}");
    assert_eq!(
        t["labels"],
        serde_json::json!({"gpu": "a100", "region": "eu-west"}),
        "{t}"
    );
    assert_eq!(t["priority"], -5, "{t}");
    assert_eq!(t["max_attempts"], 2, "{t}");
    assert_eq!(t["timeout_seconds"], 30, "{t}");
    assert_eq!(t["cascade"], Value::Null, "{t}");
    assert_eq!(t["payload_size"], 14, "{t}");
    let payload = base64::engine::general_purpose::STANDARD
        .decode(t["payload_base64"].as_str().context("no payload")?)?;
    assert_eq!(payload, br#"{"ticket": 42}"#);

    let queued = ok(
        &mesh,
        &args!["task", "list", "--dir", &dir, "--tenant", "acme"],
    )
    .await?;
    let r = row(&queued, &task_id).with_context(|| format!("no {task_id} in\n{queued}"))?;
    ensure!(r.contains(" queued "), "{r}");
    let only_queued = json_lines(
        &ok(
            &mesh,
            &args![
                "task", "list", "--dir", &dir, "--tenant", "acme", "--status", "queued", "--agent",
                AGENT, "--json"
            ],
        )
        .await?,
    )?;
    let listed = only_queued
        .iter()
        .find(|t| t["task_id"] == task_id.as_str())
        .with_context(|| format!("no {task_id} in {only_queued:?}"))?;
    // ListTasks leaves payloads out but still gives their size.
    assert_eq!(listed["payload_size"], 14, "{listed}");

    // A payload from stdin.
    let from_stdin = piped(
        &args![
            "task",
            "enqueue",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "--agent",
            AGENT,
            "--payload",
            "-",
            "--json"
        ],
        b"from stdin\n",
    )
    .await?;
    ensure!(
        from_stdin.status.success(),
        "{}\n{}",
        text(&from_stdin),
        mesh.logs()
    );
    let second = json_one(&stdout(&from_stdin))?;
    let second_id = second["task_id"].as_str().context("no task_id")?.to_owned();
    let t = json_one(
        &ok(
            &mesh,
            &args![
                "task", "get", "--dir", &dir, "--tenant", "acme", &second_id, "--json"
            ],
        )
        .await?,
    )?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(t["payload_base64"].as_str().context("no payload")?)?;
    assert_eq!(payload, b"from stdin\n");

    // Cancel: the task is cancelled at once, and a watch of it ends non-zero.
    let cancelled = ok(
        &mesh,
        &args![
            "task",
            "cancel",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            &task_id,
            "--reason",
            "no longer needed",
        ],
    )
    .await?;
    ensure!(
        cancelled.starts_with(&format!("cancelled task {task_id}")),
        "{cancelled}"
    );
    ensure!(
        cancelled.contains(&format!("task {task_id}  (cancelled)")),
        "{cancelled}"
    );
    let t = json_one(
        &ok(
            &mesh,
            &args![
                "task", "get", "--dir", &dir, "--tenant", "acme", &task_id, "--json"
            ],
        )
        .await?,
    )?;
    assert_eq!(t["status"], "cancelled", "{t}");
    let listed = ok(
        &mesh,
        &args![
            "task",
            "list",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "--status",
            "cancelled"
        ],
    )
    .await?;
    ensure!(row(&listed, &task_id).is_some(), "{listed}");
    ensure!(
        row(&listed, &second_id).is_none(),
        "a queued task is listed as cancelled:\n{listed}"
    );

    let watched = fails(&args![
        "task", "watch", "--dir", &dir, "--tenant", "acme", &task_id
    ])
    .await?;
    ensure!(
        watched.status.code() == Some(1),
        "watch of a cancelled task: {}",
        text(&watched)
    );
    ensure!(
        stdout(&watched).contains("cancelled") && stderr(&watched).contains("cancelled"),
        "{}",
        text(&watched)
    );
    let cancelled_again = fails(&args![
        "task", "cancel", "--dir", &dir, "--tenant", "acme", &task_id
    ])
    .await?;
    ensure!(
        stderr(&cancelled_again).contains("FAILED_PRECONDITION"),
        "{}",
        text(&cancelled_again)
    );

    // Another tenant does not see acme's task.
    let elsewhere = fails(&args![
        "task", "get", "--dir", &dir, "--tenant", "globex", &task_id
    ])
    .await?;
    ensure!(
        stderr(&elsewhere).contains("NOT_FOUND"),
        "{}",
        text(&elsewhere)
    );

    // A pending agent is refused at enqueue, and so is a bad label, before
    // any call: nothing new is queued.
    let unapproved = fails(&args![
        "task",
        "enqueue",
        "--dir",
        &dir,
        "--tenant",
        "acme",
        "--agent",
        PENDING_AGENT,
    ])
    .await?;
    ensure!(
        stderr(&unapproved).contains("Enqueue")
            && stderr(&unapproved).contains("FAILED_PRECONDITION"),
        "{}",
        text(&unapproved)
    );
    let bad_label = fails(&args![
        "task", "enqueue", "--dir", &dir, "--tenant", "acme", "--agent", AGENT, "--label",
        "gpu a100",
    ])
    .await?;
    ensure!(
        bad_label.status.code() == Some(2) && stderr(&bad_label).contains("KEY=VALUE"),
        "{}",
        text(&bad_label)
    );
    let all = json_lines(
        &ok(
            &mesh,
            &args!["task", "list", "--dir", &dir, "--tenant", "acme", "--json"],
        )
        .await?,
    )?;
    ensure!(
        all.len() == 2,
        "acme should hold exactly the two tasks enqueued: {all:?}"
    );

    // Workers: none registered yet; the listing works.
    let workers = ok(&mesh, &args!["worker", "list", "--dir", &dir]).await?;
    ensure!(workers.trim() == "no workers", "{workers}");
    let workers = ok(
        &mesh,
        &args![
            "worker",
            "list",
            "--dir",
            &dir,
            "--tenant",
            "acme",
            "--state",
            "connected",
            "--json"
        ],
    )
    .await?;
    ensure!(json_lines(&workers)?.is_empty(), "{workers}");

    // A reset must name its scope; one that does, with no workers, evicts
    // nothing.
    let no_scope = fails(&args!["pool", "reset", "--dir", &dir, "--reason", "drill"]).await?;
    ensure!(
        no_scope.status.code() == Some(2) && stderr(&no_scope).contains("--tenant"),
        "{}",
        text(&no_scope)
    );
    let reset = json_one(
        &ok(
            &mesh,
            &args![
                "pool", "reset", "--dir", &dir, "--tenant", "acme", "--reason", "drill", "--json"
            ],
        )
        .await?,
    )?;
    assert_eq!(
        reset["evicted_worker_ids"],
        serde_json::json!([]),
        "{reset}"
    );

    // Each of these actions is in the audit log.
    let events = ok(
        &mesh,
        &args!["audit", "query", "--dir", &dir, "--limit", "1000"],
    )
    .await?;
    for kind in [
        "agent.submitted",
        "agent.approved",
        "task.enqueued",
        "task.cancelled",
        "fleet.pool_reset",
    ] {
        ensure!(
            events
                .lines()
                .any(|l| l.split_whitespace().nth(2) == Some(kind)),
            "no {kind} in the audit log:\n{events}"
        );
    }
    Ok(())
}

/// Input the CLI can judge alone is refused before it looks for a mesh: the
/// directory here has none, and no refusal mentions it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_errors_are_refused_before_dialing() -> anyhow::Result<()> {
    let empty = tempfile::tempdir()?;
    let dir = empty.path().as_os_str().to_owned();
    let big = empty.path().join("big.json");
    std::fs::write(&big, vec![b'x'; 1024 * 1024 + 1])?;
    let enqueue = |extra: &[&str]| -> Vec<OsString> {
        let mut a: Vec<OsString> = args![
            "task", "enqueue", "--dir", &dir, "--tenant", "acme", "--agent", AGENT
        ]
        .to_vec();
        a.extend(extra.iter().map(OsString::from));
        a
    };
    let big_arg = big.to_string_lossy().into_owned();
    let cases: Vec<(Vec<OsString>, &str)> = vec![
        (enqueue(&["--label", "gpu"]), "is not KEY=VALUE"),
        (enqueue(&["--label", "=a100"]), "empty key"),
        (enqueue(&["--label", "g pu=a100"]), "keys are made of"),
        (
            enqueue(&["--label", &format!("k={}", "v".repeat(129))]),
            "more than 128",
        ),
        (
            enqueue(&["--label", "gpu=a", "--label", "gpu=b"]),
            "given twice",
        ),
        (enqueue(&["--label", "tenant=globex"]), "reserved"),
        (
            enqueue(&["--payload", r#"{"ticket": 42}"#]),
            "never taken from the command line",
        ),
        (enqueue(&["--payload-file", &big_arg]), "larger than 1 MiB"),
        (enqueue(&["--priority", "101"]), "--priority"),
        (enqueue(&["--timeout", "25h"]), "longer than 24h"),
        (enqueue(&["--max-attempts", "11"]), "--max-attempts"),
        (
            args![
                "task",
                "enqueue",
                "--dir",
                &dir,
                "--pool",
                "gpu",
                "--agent",
                AGENT,
                "--profile",
                "default"
            ]
            .to_vec(),
            "cannot be used with",
        ),
        (
            args!["task", "enqueue", "--dir", &dir, "--agent", AGENT].to_vec(),
            "--tenant",
        ),
        (
            args!["pool", "reset", "--dir", &dir, "--reason", "drill"].to_vec(),
            "--tenant",
        ),
        (
            args![
                "pool", "reset", "--dir", &dir, "--tenant", "acme", "--pool", "gpu", "--reason",
                "drill"
            ]
            .to_vec(),
            "cannot be used with",
        ),
        (
            args!["pool", "reset", "--dir", &dir, "--tenant", "acme"].to_vec(),
            "--reason",
        ),
        (
            args![
                "agent", "reject", "--dir", &dir, AGENT, "1.0.0", "--reason", " "
            ]
            .to_vec(),
            "--reason is empty",
        ),
        (
            args!["task", "list", "--dir", &dir, "--status", "lost"].to_vec(),
            "invalid value",
        ),
        (
            args!["worker", "list", "--dir", &dir, "--state", "asleep"].to_vec(),
            "invalid value",
        ),
    ];
    for (args, expect) in &cases {
        let out = fails(args).await?;
        let err = stderr(&out);
        ensure!(
            err.contains(expect),
            "bulkhead {args:?}: expected {expect:?}\n{}",
            text(&out)
        );
        ensure!(
            !err.contains("no mesh at"),
            "bulkhead {args:?} looked for a mesh before refusing\n{}",
            text(&out)
        );
    }

    // The control: well-formed input gets as far as looking for the mesh.
    let out = fails(&enqueue(&["--label", "gpu=a100", "--priority", "-100"])).await?;
    ensure!(stderr(&out).contains("no mesh at"), "{}", text(&out));
    let out = fails(&args![
        "agent", "list", "--dir", &dir, "--status", "pending"
    ])
    .await?;
    ensure!(stderr(&out).contains("no mesh at"), "{}", text(&out));
    Ok(())
}
