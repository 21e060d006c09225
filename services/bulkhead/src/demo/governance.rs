//! Agent governance (companion example 16): an agent version is submitted by
//! one operator and must be approved by another before any task may name
//! it; every decision is in the audit log.

use anyhow::Context as _;
use bulkhead_proto::audit::v1 as audit_pb;
use bulkhead_proto::dispatcher::v1 as pb;
use tonic::Code;

use super::fleet::CLINIC;
use super::stage::{self, AgentSpec, BARE_IMAGE, OPERATOR, REVIEWER, Stage, WorkerSpec, attr};
use super::story::Story;

const AGENT: &str = "claims-summarizer";

fn agent(version: &'static str) -> AgentSpec<'static> {
    AgentSpec {
        name: AGENT,
        version,
        image: BARE_IMAGE,
        command: stage::shell("read claim; echo \"summary of $claim: 3 lines\""),
        requested_keys: Vec::new(),
        description: "summarizes insurance claims for clinics",
    }
}

fn code(s: &tonic::Status) -> &'static str {
    crate::fleet::code_name(s.code())
}

fn enqueue_req(version: &str, payload: &str) -> pb::EnqueueRequest {
    pb::EnqueueRequest {
        tenant: CLINIC.into(),
        agent: AGENT.into(),
        agent_version: version.into(),
        payload: payload.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

pub async fn governance(stage: &mut Stage, story: &mut Story) -> anyhow::Result<()> {
    story.chapter(
        "Agent governance (companion example 16)",
        "An agent version is submitted by one operator and approved by another before any\n\
         tenant can run it; the approval flow is in the audit log.",
    );
    let submitter = stage.spiffe(OPERATOR);
    let reviewer = stage.spiffe(REVIEWER);
    let mut op = stage.dispatcher(OPERATOR)?;
    let mut rev = stage.dispatcher(REVIEWER)?;
    let mut backend = stage.dispatcher(&format!("tenant/{CLINIC}/client/backend"))?;

    story.step(format!("{submitter} submits {AGENT} 1.0.0"));
    let a = op
        .submit_agent(agent("1.0.0").submit())
        .await
        .context("SubmitAgent")?
        .into_inner()
        .agent
        .context("no agent")?;
    story.say(format!(
        "{} {}: {}",
        a.name,
        a.version,
        crate::fleet::agent_status(a.status)
    ));
    story.check(
        "a submitted agent waits for review",
        a.status() == pb::AgentStatus::Pending,
        format!("{a:?}"),
    );

    story.step(format!(
        "{CLINIC}'s backend enqueues a task for it before review"
    ));
    let r = backend.enqueue(enqueue_req("1.0.0", "claim 88-A")).await;
    match &r {
        Err(s) => story.say(format!("refused: {} ({})", code(s), s.message())),
        Ok(_) => story.say("accepted!"),
    }
    story.check(
        "tasks naming an unapproved agent are refused",
        matches!(&r, Err(s) if s.code() == Code::FailedPrecondition),
        format!("{r:?}"),
    );

    story.step("The submitter tries to approve its own submission");
    let r = op
        .approve_agent(pb::ApproveAgentRequest {
            name: AGENT.into(),
            version: "1.0.0".into(),
            comment: "looks fine to me".into(),
        })
        .await;
    match &r {
        Err(s) => story.say(format!("refused: {} ({})", code(s), s.message())),
        Ok(_) => story.say("approved!"),
    }
    story.check(
        "the submitter may not decide",
        matches!(&r, Err(s) if s.code() == Code::PermissionDenied),
        format!("{r:?}"),
    );

    story.step(format!(
        "A second operator, {reviewer}, reviews and approves"
    ));
    let a = rev
        .approve_agent(pb::ApproveAgentRequest {
            name: AGENT.into(),
            version: "1.0.0".into(),
            comment: "reviewed: reads only its stdin".into(),
        })
        .await
        .context("ApproveAgent")?
        .into_inner()
        .agent
        .context("no agent")?;
    story.say(format!(
        "{} {}: {}",
        a.name,
        a.version,
        crate::fleet::agent_status(a.status)
    ));
    story.check(
        "approved by an operator other than the submitter",
        a.status() == pb::AgentStatus::Approved,
        format!("{a:?}"),
    );

    story.step(format!("Now {CLINIC}'s task runs, on a {CLINIC} worker"));
    stage
        .start_worker(WorkerSpec::tenant("claims-1", CLINIC, ""))
        .await?;
    let id = backend
        .enqueue(enqueue_req("1.0.0", "claim 88-A"))
        .await
        .context("Enqueue")?
        .into_inner()
        .task_id;
    let t = stage.wait_final(&mut backend, CLINIC, &id).await?;
    story.say(format!(
        "{id}: {}  output {:?}",
        crate::fleet::task_status(t.status),
        t.output_summary.trim_end()
    ));
    story.check(
        "the approved agent runs",
        t.status() == pb::TaskStatus::Succeeded,
        format!("{t:?}"),
    );

    story.step("Version 1.1.0 is submitted and rejected");
    op.submit_agent(agent("1.1.0").submit())
        .await
        .context("SubmitAgent 1.1.0")?;
    rev.reject_agent(pb::RejectAgentRequest {
        name: AGENT.into(),
        version: "1.1.0".into(),
        reason: "asks for network access it does not need".into(),
    })
    .await
    .context("RejectAgent")?;
    let r = backend.enqueue(enqueue_req("1.1.0", "claim 91-C")).await;
    match &r {
        Err(s) => story.say(format!(
            "a task naming 1.1.0: {} ({})",
            code(s),
            s.message()
        )),
        Ok(_) => story.say("a task naming 1.1.0: accepted!"),
    }
    story.check(
        "tasks naming a rejected version are refused",
        matches!(&r, Err(s) if s.code() == Code::FailedPrecondition),
        format!("{r:?}"),
    );

    story.step(format!("The audit trail of {AGENT}"));
    let mut audit = stage.audit()?;
    let events: Vec<audit_pb::Event> = stage::audit_events(&mut audit, "agent.")
        .await?
        .into_iter()
        .filter(|e| attr(e, "agent") == AGENT)
        .collect();
    for e in &events {
        let outcome = audit_pb::Outcome::try_from(e.outcome)
            .map_or("?", |o| o.as_str_name().trim_start_matches("OUTCOME_"));
        let by = stage::party(e);
        let why = [attr(e, "comment"), attr(e, "reason")]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or("");
        story.say(format!(
            "#{:<4} {:<16} {} {:<7} by {}{}",
            e.sequence,
            e.r#type,
            attr(e, "version"),
            outcome,
            stage::short_id(by, stage.trust_domain()),
            if why.is_empty() {
                String::new()
            } else {
                format!("  \"{why}\"")
            }
        ));
    }
    let has = |kind: &str, version: &str, outcome: audit_pb::Outcome, who: &str| {
        events.iter().any(|e| {
            e.r#type == kind
                && attr(e, "version") == version
                && e.outcome == outcome as i32
                && stage::party(e) == who
        })
    };
    story.check(
        "submission, the refused self-approval, the approval and the rejection are audited",
        has(
            "agent.submitted",
            "1.0.0",
            audit_pb::Outcome::Success,
            &submitter,
        ) && has(
            "agent.approved",
            "1.0.0",
            audit_pb::Outcome::Denied,
            &submitter,
        ) && has(
            "agent.approved",
            "1.0.0",
            audit_pb::Outcome::Success,
            &reviewer,
        ) && has(
            "agent.rejected",
            "1.1.0",
            audit_pb::Outcome::Success,
            &reviewer,
        ),
        "an event is missing from the trail above",
    );
    stage.stop_workers().await;
    Ok(())
}
