//! `bulkhead audit`: offline verification of JSONL exports built here with the
//! audit library (good ones pass; every kind of tampering is refused at the
//! right line and sequence), and the real binary against a real mesh.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use bulkhead_audit::checkpoint::{Signer, TreeHead};
use bulkhead_audit::event::{Event, Outcome};
use bulkhead_audit::merkle::{ProofError, Tree};
use bulkhead_audit::service::export_line;
use bulkhead_audit::store::StoredEvent;
use bulkhead_cli::audit::{
    Coverage, Problem, Summary, VerifyError, VerifyOptions, format_event, verify_export,
    verify_export_with,
};

const ACTOR: &str = "spiffe://bulkhead.test/service/sealed-vault";

fn event(sequence: u64) -> Event {
    let tenant = ["acme", "globex", ""][(sequence % 3) as usize];
    let mut attributes = BTreeMap::new();
    attributes.insert("keys".to_owned(), "ANTHROPIC_API_KEY".to_owned());
    attributes.insert(
        "fingerprint".to_owned(),
        format!("hmac-sha256:{sequence:064x}"),
    );
    // Characters the canonical JSON must escape.
    attributes.insert(
        "note".to_owned(),
        "quote \" backslash \\ newline \n é".to_owned(),
    );
    Event {
        sequence,
        time_us: 1_764_201_600_000_000 + sequence as i64 * 1_000,
        kind: "sealed.credential.resolved".into(),
        actor: ACTOR.into(),
        tenant: tenant.into(),
        run_id: format!("run-{}", sequence % 4),
        outcome: if sequence.is_multiple_of(5) {
            Outcome::Denied
        } else {
            Outcome::Success
        },
        attributes,
    }
}

/// A log of `n` events, its tree, and a head over all of it.
struct Log {
    events: Vec<StoredEvent>,
    tree: Tree,
    head: TreeHead,
}

fn log(n: u64, signer: &Signer) -> Log {
    let mut tree = Tree::new();
    let events: Vec<StoredEvent> = (1..=n)
        .map(|s| {
            let event = event(s);
            let leaf_hash = event.leaf_hash();
            tree.push(leaf_hash);
            StoredEvent { event, leaf_hash }
        })
        .collect();
    let head = signer.sign(n, tree.root(), 1_764_201_700_123);
    Log { events, tree, head }
}

fn head_line(head: &TreeHead) -> String {
    format!("{}\n", serde_json::json!({ "tree_head": head.to_json() }))
}

/// The lines the Export RPC writes: every event, or (filtered) the matching
/// ones with inclusion proofs, then the head.
fn export(log: &Log, filter: Option<&dyn Fn(&Event) -> bool>) -> Vec<String> {
    let mut lines: Vec<String> = log
        .events
        .iter()
        .filter(|e| filter.is_none_or(|f| f(&e.event)))
        .map(|e| {
            let proof = filter.map(|_| {
                log.tree
                    .inclusion_proof(e.event.sequence - 1, log.head.tree_size)
                    .expect("proof")
            });
            export_line(e, proof.as_deref())
        })
        .collect();
    lines.push(head_line(&log.head));
    lines
}

fn check(lines: &[String], signer: &Signer) -> Result<Summary, VerifyError> {
    verify_export(lines.concat().as_bytes(), &signer.public())
}

fn refused(lines: &[String], signer: &Signer) -> VerifyError {
    match check(lines, signer) {
        Ok(s) => panic!("a tampered export verified: {s}"),
        Err(e) => e,
    }
}

/// Edits the JSON object of line `i` (0-based).
fn edit(
    lines: &mut [String],
    i: usize,
    f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) {
    let mut v: serde_json::Value = serde_json::from_str(&lines[i]).expect("json");
    f(v.as_object_mut().expect("object"));
    lines[i] = format!("{v}\n");
}

fn is_acme(e: &Event) -> bool {
    e.tenant == "acme"
}

#[test]
fn a_complete_export_verifies() {
    let signer = Signer::generate();
    let log = log(37, &signer);
    let summary = check(&export(&log, None), &signer).expect("verifies");
    assert_eq!(summary.events, 37);
    assert_eq!(summary.coverage, Coverage::Complete);
    assert_eq!(summary.head, log.head);
    let text = summary.to_string();
    assert!(text.contains("37 events checked"), "{text}");
    assert!(text.contains(&hex::encode(log.head.root)), "{text}");
    assert!(text.contains(signer.key_id()), "{text}");
    // Also when asked to insist on completeness, and without a final newline.
    let mut joined = export(&log, None).concat();
    joined.pop();
    verify_export_with(
        joined.as_bytes(),
        &signer.public(),
        VerifyOptions { complete: true },
    )
    .expect("complete");
}

#[test]
fn a_filtered_export_verifies_by_its_proofs() {
    let signer = Signer::generate();
    let log = log(50, &signer);
    let lines = export(&log, Some(&is_acme));
    let summary = check(&lines, &signer).expect("verifies");
    assert_eq!(summary.events, 16);
    assert_eq!(summary.coverage, Coverage::Proofs);
    assert_eq!(summary.head.tree_size, 50);
    // It is not the whole log, and says so when asked.
    let err = verify_export_with(
        lines.concat().as_bytes(),
        &signer.public(),
        VerifyOptions { complete: true },
    )
    .expect_err("not complete");
    assert_eq!(err.problem, Problem::NotComplete);
    // A filter matching nothing leaves the head alone to check.
    let none = export(&log, Some(&|_: &Event| false));
    assert_eq!(
        check(&none, &signer).expect("head").coverage,
        Coverage::HeadOnly
    );
}

#[test]
fn an_empty_log_exports_and_verifies() {
    let signer = Signer::generate();
    let log = log(0, &signer);
    let summary = check(&export(&log, None), &signer).expect("verifies");
    assert_eq!((summary.events, summary.head.tree_size), (0, 0));
}

#[test]
fn a_changed_field_is_found_at_its_line() {
    let signer = Signer::generate();
    let log = log(20, &signer);
    for (field, value) in [
        ("tenant", serde_json::json!("evil")),
        (
            "actor",
            serde_json::json!("spiffe://bulkhead.test/service/identity"),
        ),
        ("outcome", serde_json::json!("failure")),
        ("time", serde_json::json!("2020-01-01T00:00:00.000000Z")),
        ("attributes", serde_json::json!({"keys": "OTHER_KEY"})),
        ("leaf_hash", serde_json::json!("00".repeat(32))),
    ] {
        let mut lines = export(&log, None);
        edit(&mut lines, 6, |o| {
            o.insert(field.into(), value);
        });
        let err = refused(&lines, &signer);
        assert_eq!(
            (err.line, err.sequence),
            (Some(7), Some(7)),
            "{field}: {err}"
        );
        assert_eq!(err.problem, Problem::LeafMismatch, "{field}");
    }
    // The sequence itself: the line's place says it must be 7.
    let mut lines = export(&log, None);
    edit(&mut lines, 6, |o| {
        o.insert("sequence".into(), serde_json::json!(70));
    });
    let err = refused(&lines, &signer);
    assert_eq!((err.line, err.sequence), (Some(7), Some(7)), "{err}");
    assert_eq!(
        err.problem,
        Problem::SequenceGap {
            expected: 7,
            found: 70
        }
    );
}

#[test]
fn a_rewritten_event_with_a_matching_leaf_hash_breaks_the_root() {
    let signer = Signer::generate();
    let log = log(20, &signer);
    let mut lines = export(&log, None);
    let mut forged = log.events[9].clone();
    forged.event.tenant = "evil".into();
    forged.leaf_hash = forged.event.leaf_hash();
    lines[9] = export_line(&forged, None);
    let err = refused(&lines, &signer);
    assert_eq!(err.line, Some(21), "{err}");
    assert!(matches!(err.problem, Problem::RootMismatch { .. }), "{err}");
}

#[test]
fn a_deleted_line_is_found_at_its_sequence() {
    let signer = Signer::generate();
    let log = log(20, &signer);
    let mut lines = export(&log, None);
    lines.remove(3);
    let err = refused(&lines, &signer);
    assert_eq!((err.line, err.sequence), (Some(4), Some(4)), "{err}");
    assert_eq!(
        err.problem,
        Problem::SequenceGap {
            expected: 4,
            found: 5
        }
    );
}

#[test]
fn swapped_lines_are_found_at_the_first() {
    let signer = Signer::generate();
    let log = log(20, &signer);
    let mut lines = export(&log, None);
    lines.swap(4, 11);
    let err = refused(&lines, &signer);
    assert_eq!((err.line, err.sequence), (Some(5), Some(5)), "{err}");
    assert_eq!(
        err.problem,
        Problem::SequenceGap {
            expected: 5,
            found: 12
        }
    );

    // In a filtered export, by their order.
    let mut lines = export(&log, Some(&is_acme));
    lines.swap(1, 2);
    let err = refused(&lines, &signer);
    assert_eq!(err.line, Some(3), "{err}");
    assert!(matches!(err.problem, Problem::OutOfOrder { .. }), "{err}");
}

#[test]
fn a_truncated_export_is_refused() {
    let signer = Signer::generate();
    let log = log(20, &signer);

    // The tail of events cut, the head kept: the first missing sequence.
    let mut lines = export(&log, None);
    lines.drain(17..20);
    let err = refused(&lines, &signer);
    assert_eq!((err.line, err.sequence), (Some(18), Some(18)), "{err}");
    assert_eq!(
        err.problem,
        Problem::Incomplete {
            tree_size: 20,
            events: 17
        }
    );

    // Cut at a line boundary: no tree head.
    let mut lines = export(&log, None);
    lines.truncate(15);
    let err = refused(&lines, &signer);
    assert_eq!(err.problem, Problem::MissingHead, "{err}");
    assert_eq!(err.line, Some(16));

    // Cut in the middle of a line.
    let text = export(&log, None).concat();
    let cut = &text[..text.len() - 40];
    let err = verify_export(cut.as_bytes(), &signer.public()).expect_err("refused");
    assert_eq!(err.line, Some(21), "{err}");
    assert!(matches!(err.problem, Problem::Malformed(_)), "{err}");

    // Every event line deleted from a complete export, when completeness is required.
    let lines = [head_line(&log.head)];
    let err = verify_export_with(
        lines.concat().as_bytes(),
        &signer.public(),
        VerifyOptions { complete: true },
    )
    .expect_err("refused");
    assert_eq!(err.sequence, Some(1), "{err}");
}

#[test]
fn the_wrong_key_or_a_changed_head_is_refused() {
    let signer = Signer::generate();
    let log = log(10, &signer);
    let lines = export(&log, None);

    let other = Signer::generate();
    let err = refused(&lines, &other);
    assert_eq!(err.line, Some(11), "{err}");
    assert!(matches!(err.problem, Problem::WrongKey { .. }), "{err}");

    // The head re-signed by another key that claims the real key's id.
    let mut forged = other.sign(10, log.head.root, log.head.timestamp_ms);
    forged.key_id = signer.key_id().to_owned();
    let mut tampered = lines.clone();
    tampered[10] = head_line(&forged);
    let err = refused(&tampered, &signer);
    assert_eq!(
        (err.line, err.problem.clone()),
        (Some(11), Problem::BadSignature),
        "{err}"
    );

    // A head whose size was changed (hiding the last events) no longer verifies.
    let mut tampered = lines.clone();
    tampered[10] = head_line(&TreeHead {
        tree_size: 8,
        ..log.head.clone()
    });
    let err = refused(&tampered, &signer);
    assert_eq!(err.problem, Problem::BadSignature, "{err}");

    // A line after the head.
    let mut tampered = lines;
    tampered.push(export_line(&log.events[0], None));
    let err = refused(&tampered, &signer);
    assert_eq!(err.line, Some(12), "{err}");
}

#[test]
fn a_tampered_proof_is_found_at_its_line() {
    let signer = Signer::generate();
    let log = log(50, &signer);
    let lines = export(&log, Some(&is_acme));
    let seq_of = |line: &str| -> u64 {
        serde_json::from_str::<serde_json::Value>(line).expect("json")["sequence"]
            .as_u64()
            .expect("seq")
    };

    // One hash of the proof flipped.
    let mut tampered = lines.clone();
    edit(&mut tampered, 4, |o| {
        let p = o["inclusion_proof"].as_array_mut().expect("proof");
        let h = p[1].as_str().expect("hash");
        let flipped = format!("{}{}", if h.starts_with('0') { "1" } else { "0" }, &h[1..]);
        p[1] = serde_json::json!(flipped);
    });
    let err = refused(&tampered, &signer);
    assert_eq!(
        (err.line, err.sequence),
        (Some(5), Some(seq_of(&lines[4]))),
        "{err}"
    );
    assert_eq!(err.problem, Problem::BadProof(ProofError::RootMismatch));

    // One hash dropped.
    let mut tampered = lines.clone();
    edit(&mut tampered, 2, |o| {
        o["inclusion_proof"].as_array_mut().expect("proof").pop();
    });
    let err = refused(&tampered, &signer);
    assert_eq!(
        (err.line, err.sequence),
        (Some(3), Some(seq_of(&lines[2]))),
        "{err}"
    );
    assert_eq!(err.problem, Problem::BadProof(ProofError::WrongLength));

    // Another event's proof on a line (the sequence claims a place it is not at).
    let mut tampered = lines.clone();
    let other = seq_of(&lines[7]);
    edit(&mut tampered, 6, |o| {
        let p = serde_json::from_str::<serde_json::Value>(&lines[7]).expect("json");
        o.insert("inclusion_proof".into(), p["inclusion_proof"].clone());
    });
    let err = refused(&tampered, &signer);
    assert_eq!(
        (err.line, err.sequence),
        (Some(7), Some(seq_of(&lines[6]))),
        "{err}"
    );
    assert_ne!(seq_of(&lines[6]), other);
    assert!(matches!(err.problem, Problem::BadProof(_)), "{err}");

    // A proof removed from one line of a filtered export.
    let mut tampered = lines;
    edit(&mut tampered, 3, |o| {
        o.remove("inclusion_proof");
    });
    let err = refused(&tampered, &signer);
    assert_eq!(err.line, Some(4), "{err}");
}

#[test]
fn malformed_lines_are_named() {
    let signer = Signer::generate();
    let log = log(5, &signer);
    for (i, bad) in [
        (2, "not json\n".to_owned()),
        (2, "[1,2]\n".to_owned()),
        (2, "{\"sequence\":3}\n".to_owned()),
    ] {
        let mut lines = export(&log, None);
        lines[i] = bad.clone();
        let err = refused(&lines, &signer);
        assert_eq!(err.line, Some(3), "{bad}: {err}");
        assert!(matches!(err.problem, Problem::Malformed(_)), "{bad}: {err}");
    }
    // A member outside the format is refused, not silently ignored.
    let mut lines = export(&log, None);
    edit(&mut lines, 1, |o| {
        o.insert("approved_by".into(), serde_json::json!("alice"));
    });
    let err = refused(&lines, &signer);
    assert_eq!((err.line, err.sequence), (Some(2), Some(2)), "{err}");
    // Invalid UTF-8.
    let mut bytes = export(&log, None).concat().into_bytes();
    bytes[10] = 0xff;
    let err = verify_export(&bytes[..], &signer.public()).expect_err("refused");
    assert_eq!(err.line, Some(1), "{err}");
}

#[test]
fn the_one_line_form_escapes_what_a_terminal_would_obey() {
    let mut e = event(2);
    e.attributes.insert("x".into(), "\u{1b}[31mred".into());
    let line = format_event(&e);
    assert!(!line.contains('\u{1b}'), "{line}");
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.starts_with("2  2025-11-27T00:00:00.002000Z  sealed.credential.resolved  "),
        "{line}"
    );
    assert!(line.contains("tenant=-  run=run-2  success"), "{line}");
}

// ---------------------------------------------------------------------------
// The real binary against a real mesh.

mod e2e {
    use super::*;
    use bulkhead_proto::audit::v1 as pb;
    use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
    use bulkhead_testkit::mesh::TestMesh;

    const DEADLINE: Duration = Duration::from_secs(60);

    async fn bulkhead(args: &[&std::ffi::OsStr]) -> anyhow::Result<Output> {
        let exe = bulkhead_cluster::find_executable("bulkhead", None)?;
        let out = tokio::time::timeout(
            DEADLINE,
            tokio::process::Command::new(exe)
                .args(args)
                .env_remove("BULKHEAD_DIR")
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

    macro_rules! args {
        ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new($a)),*] };
    }

    fn new_event(tenant: &str, i: usize) -> pb::NewEvent {
        pb::NewEvent {
            r#type: "sealed.credential.resolved".into(),
            tenant: tenant.into(),
            run_id: format!("run-{i}"),
            outcome: pb::Outcome::Success as i32,
            attributes: [
                ("keys".to_owned(), "ANTHROPIC_API_KEY".to_owned()),
                ("fingerprint".to_owned(), format!("hmac-sha256:{i:064x}")),
            ]
            .into_iter()
            .collect(),
        }
    }

    fn event_lines(path: &Path) -> anyhow::Result<Vec<String>> {
        let text = std::fs::read_to_string(path)?;
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let head = lines.pop().unwrap_or_default();
        anyhow::ensure!(head.starts_with("{\"tree_head\""), "no head line: {head}");
        Ok(lines)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cli_exports_queries_and_verifies_a_running_log() -> anyhow::Result<()> {
        let mesh = TestMesh::start().await?;
        let dir = mesh.dir().to_owned();
        let work = tempfile::tempdir()?;

        let vault = mesh.identity("service/sealed-vault")?;
        let mut client = AuditServiceClient::new(mesh.channel("audit", &vault)?);
        let mut appended = 0;
        for (tenant, n) in [("acme", 12), ("globex", 7), ("acme", 3)] {
            let events = (0..n).map(|i| new_event(tenant, i)).collect();
            let resp = client
                .append(pb::AppendRequest { events })
                .await
                .map_err(|s| anyhow::anyhow!("append: {s}\n{}", mesh.logs()))?;
            appended += resp.into_inner().sequences.len();
        }
        assert_eq!(appended, 22);

        // A complete export, verified offline with the public key alone.
        let full = work.path().join("audit.jsonl");
        let out = bulkhead(args!["audit", "export", "--dir", &dir, "--out", &full]).await?;
        assert!(out.status.success(), "{}", text(&out));
        let lines = event_lines(&full)?;
        // Services may record events of their own; ours are among them.
        let n = lines.len();
        assert!(n >= 22, "{n} events exported");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("exported {n} events")),
            "{}",
            text(&out)
        );

        let key = dir.join("pki").join("audit-signing.key.pub");
        let out = bulkhead(args![
            "audit",
            "verify",
            "--file",
            &full,
            "--public-key",
            &key
        ])
        .await?;
        assert!(out.status.success(), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!(
                "ok: {n} events checked (the whole tree rebuilt), tree size {n}"
            )),
            "{}",
            text(&out)
        );

        // The running log: the service's own Verify and a fresh export checked here.
        let out = bulkhead(args!["audit", "verify", "--dir", &dir]).await?;
        assert!(out.status.success(), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("server verify: ok: "), "{}", text(&out));
        assert!(stdout.contains("export verify: ok: "), "{}", text(&out));

        // A filtered export carries proofs and verifies by them.
        let acme = work.path().join("acme.jsonl");
        let out = bulkhead(args![
            "audit", "export", "--dir", &dir, "--tenant", "acme", "--out", &acme
        ])
        .await?;
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(event_lines(&acme)?.len(), 15);
        let out = bulkhead(args![
            "audit",
            "verify",
            "--file",
            &acme,
            "--public-key",
            &key
        ])
        .await?;
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout)
                .contains("ok: 15 events checked (each by its inclusion proof)"),
            "{}",
            text(&out)
        );

        // A tampered copy fails, naming the line.
        let mut tampered_lines = lines.clone();
        let at = tampered_lines
            .iter()
            .position(|l| l.contains("\"tenant\":\"globex\""))
            .expect("a globex line");
        tampered_lines[at] =
            tampered_lines[at].replace("\"tenant\":\"globex\"", "\"tenant\":\"acme\"");
        let head = std::fs::read_to_string(&full)?
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned();
        tampered_lines.push(head);
        let tampered = work.path().join("tampered.jsonl");
        std::fs::write(&tampered, tampered_lines.join("\n") + "\n")?;
        let out = bulkhead(args![
            "audit",
            "verify",
            "--file",
            &tampered,
            "--public-key",
            &key
        ])
        .await?;
        assert!(!out.status.success(), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "line {} (sequence {}): the event's fields do not hash",
                at + 1,
                at + 1
            )),
            "{}",
            text(&out)
        );

        // Query: filtered, limited, and as JSON lines.
        let out = bulkhead(args!["audit", "query", "--dir", &dir, "--tenant", "globex"]).await?;
        assert!(out.status.success(), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(stdout.lines().count(), 7, "{stdout}");
        assert!(
            stdout.lines().all(|l| l.contains("tenant=globex")),
            "{stdout}"
        );
        assert!(
            stdout.contains(
                "sealed.credential.resolved  spiffe://bulkhead.test/service/sealed-vault"
            )
        );
        let out = bulkhead(args![
            "audit", "query", "--dir", &dir, "--type", "sealed.", "--tenant", "acme", "--limit",
            "4", "--json"
        ])
        .await?;
        assert!(out.status.success(), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(stdout.lines().count(), 4, "{stdout}");
        for l in stdout.lines() {
            let v: serde_json::Value = serde_json::from_str(l)?;
            assert_eq!(v["tenant"], "acme");
            assert_eq!(v["leaf_hash"].as_str().map(str::len), Some(64));
        }

        // Tail replays from a sequence, then runs until Ctrl-C.
        let exe = bulkhead_cluster::find_executable("bulkhead", None)?;
        let mut child = tokio::process::Command::new(exe)
            .args(args![
                "audit", "tail", "--dir", &dir, "--tenant", "globex", "--from", "1"
            ])
            .env_remove("BULKHEAD_DIR")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        let mut seen = 0;
        while seen < 7 {
            let line = tokio::time::timeout(DEADLINE, reader.next_line()).await??;
            assert!(line.is_some_and(|l| l.contains("tenant=globex")));
            seen += 1;
        }
        // A live event arrives too.
        client
            .append(pb::AppendRequest {
                events: vec![new_event("globex", 99)],
            })
            .await?;
        let line = tokio::time::timeout(DEADLINE, reader.next_line()).await??;
        assert!(line.is_some_and(|l| l.contains("run=run-99")));
        let pid = child.id().expect("pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        let status = tokio::time::timeout(DEADLINE, child.wait()).await??;
        assert!(status.success(), "tail exited with {status}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_or_unreachable_mesh_is_named() -> anyhow::Result<()> {
        let work = tempfile::tempdir()?;
        let out = bulkhead(args!["audit", "query", "--dir", work.path()]).await?;
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no mesh at"), "{}", text(&out));
        assert!(
            stderr.contains("endpoints.json does not exist"),
            "{}",
            text(&out)
        );

        // A mesh whose audit service is not listening.
        let pki = work.path().join("pki");
        bulkhead_mesh::pki::init_dir(
            &pki,
            &bulkhead_mesh::spiffe::TrustDomain::parse("bulkhead.test")?,
            "operator",
        )?;
        let port = bulkhead_cluster::free_port()?;
        let endpoints = bulkhead_cluster::Endpoints {
            services: [("audit".to_owned(), format!("127.0.0.1:{port}"))]
                .into_iter()
                .collect(),
            ca: pki.join("ca.pem"),
            operator_cert: pki.join("operator.pem"),
            operator_key: pki.join("operator.key"),
            audit_public_key: None,
            audit_view: None,
            audit_view_token: None,
        };
        std::fs::write(
            bulkhead_cluster::Endpoints::path(work.path()),
            serde_json::to_string(&endpoints)?,
        )?;
        let out = bulkhead(args!["audit", "export", "--dir", work.path()]).await?;
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("cannot reach the audit service at 127.0.0.1:"),
            "{}",
            text(&out)
        );

        // A file that is not an export.
        let junk = work.path().join("junk.jsonl");
        std::fs::write(&junk, "hello\n")?;
        let key = work.path().join("key.pub");
        bulkhead_audit::checkpoint::write_public(&key, &Signer::generate().public())?;
        let out = bulkhead(args![
            "audit",
            "verify",
            "--file",
            &junk,
            "--public-key",
            &key
        ])
        .await?;
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("line 1: malformed: not JSON"),
            "{}",
            text(&out)
        );
        // No key given and no mesh to find one in.
        let out = bulkhead(args!["audit", "verify", "--file", &junk]).await?;
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--public-key"),
            "{}",
            text(&out)
        );
        Ok(())
    }
}
