//! The audit trail the demo left: its events, the server's verification of
//! the log, and an independent check of a full export against the signed
//! tree head with the audit public key alone.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bulkhead_proto::audit::v1 as pb;

use super::stage::{self, Stage, attr};
use super::story::Story;
use crate::audit::{ExportVerifier, VerifyOptions};

/// The event types printed in full; the others are counted.
const SHOWN: &[&str] = &[
    "agent.",
    "fleet.",
    "sealed.",
    "sandbox.",
    "run.",
    "identity.revoked",
    "identity.jwt_minted",
];
/// Attributes that say the most about an event, printed in this order.
const KEYS: &[&str] = &[
    "method",
    "agent",
    "version",
    "worker_id",
    "task_id",
    "profile",
    "key",
    "keys",
    "fingerprint",
    "fingerprints",
    "sandbox_id",
    "backend",
    "reason",
];

/// Where a kept demo directory gets the final export of its audit log.
pub const EXPORT_FILE: &str = "audit-export.jsonl";

/// A complete export of the log, as JSON lines.
pub async fn export(stage: &Stage) -> anyhow::Result<String> {
    let mut client = stage.audit()?;
    let mut stream = client
        .export(pb::ExportRequest::default())
        .await
        .context("audit Export")?
        .into_inner();
    let mut text = String::new();
    while let Some(msg) = stream.message().await.context("audit Export")? {
        text.push_str(&msg.line);
    }
    Ok(text)
}

/// Prints the trail and checks it two ways.
pub async fn print_and_verify(stage: &Stage, story: &mut Story) -> anyhow::Result<()> {
    story.chapter(
        "The audit trail",
        "Every event above is in a hash-chained Merkle log with Ed25519-signed tree heads.",
    );
    let mut client = stage.audit()?;
    let events = stage::audit_events(&mut client, "").await?;
    let last = events.last().map_or(0, |e| e.sequence);

    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &events {
        *counts.entry(e.r#type.as_str()).or_default() += 1;
    }
    story.step(format!("{} events by type", events.len()));
    for (kind, n) in &counts {
        story.say(format!("{n:>5}  {kind}"));
    }

    story.step("The credential, boundary and governance events");
    let td = stage.trust_domain();
    for e in events
        .iter()
        .filter(|e| SHOWN.iter().any(|p| e.r#type.starts_with(p)))
    {
        let outcome = pb::Outcome::try_from(e.outcome)
            .map_or("?", |o| o.as_str_name().trim_start_matches("OUTCOME_"));
        let mut line = format!(
            "#{:<4} {:<28} {:<7} {:<13} by {}",
            e.sequence,
            e.r#type,
            outcome,
            if e.tenant.is_empty() { "-" } else { &e.tenant },
            stage::short_id(stage::party(e), td)
        );
        if !e.run_id.is_empty() {
            line.push_str(&format!(" run={}", e.run_id));
        }
        for k in KEYS {
            let v = attr(e, k);
            if !v.is_empty() {
                line.push_str(&format!(" {k}={v}"));
            }
        }
        story.say(line);
    }
    if stage.kept() {
        story.say(format!(
            "(every event: bulkhead audit query --dir {})",
            stage.dir.display()
        ));
    }

    story.step("Verification");
    // Tree heads are signed every second while events arrive: wait for one
    // that covers everything above.
    let deadline = Instant::now() + Duration::from_secs(10);
    let server = loop {
        let v = client
            .verify(pb::VerifyRequest::default())
            .await
            .context("audit Verify")?
            .into_inner();
        let size = v.tree_head.as_ref().map_or(0, |h| h.tree_size);
        if !v.ok || size >= last || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    story.check(
        format!(
            "the audit service verifies its log: {} events against the signed tree head of size {}",
            server.checked,
            server.tree_head.as_ref().map_or(0, |h| h.tree_size)
        ),
        server.ok,
        format!(
            "first bad sequence {} ({:?})",
            server.first_bad_sequence,
            pb::VerifyProblem::try_from(server.problem)
        ),
    );

    let key_path = stage
        .endpoints()
        .audit_public_key
        .clone()
        .context("endpoints.json names no audit public key")?;
    let key = bulkhead_audit::checkpoint::read_public(&key_path)
        .context("failed to read the audit public key")?;
    let text = export(stage).await?;
    let mut verifier = ExportVerifier::new(&key, VerifyOptions { complete: true });
    for line in text.split_inclusive('\n') {
        verifier.push_line(line);
    }
    if stage.kept() {
        // For `bulkhead audit verify --file` after the mesh has stopped.
        let path = stage.dir.join(EXPORT_FILE);
        std::fs::write(&path, &text)
            .with_context(|| format!("failed to write {}", path.display()))?;
        story.say(format!("export written to {}", path.display()));
    }
    match verifier.finish() {
        Ok(summary) => {
            story.check(
                "a full export verifies offline with the public key alone",
                true,
                "",
            );
            story.say(format!("tree head: {summary}"));
        }
        Err(e) => {
            story.check(
                "a full export verifies offline with the public key alone",
                false,
                e,
            );
        }
    }
    Ok(())
}
