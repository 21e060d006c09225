//! The fleet scenarios: worker registration and heartbeats (companion
//! example 20), capability-scoped dispatch (26), and the multi-tenant fleet
//! with the Sealed boundary (33).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::claim_request::Body as Up;
use bulkhead_proto::sandbox::v1::SandboxBackend;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::leak::{self, Canary};
use super::stage::{
    self, AgentSpec, BARE_IMAGE, Dispatcher, OPERATOR, Stage, WorkerSpec, attr, labels,
};
use super::story::Story;
use super::trail;

/// The three tenants of the walkthrough, after the product page's
/// customers: a clinic (PHI), a fintech (PCI scope), an enterprise bringing
/// its own model key.
pub const CLINIC: &str = "mercy-clinic";
pub const FINTECH: &str = "ledgerly";
pub const ENTERPRISE: &str = "initech";
/// The org-global worker pool.
pub const POOL: &str = "batch";

/// The bare agent of the fleet scenarios: it echoes its job.
const TRIAGE: &str = "triage";

fn triage() -> AgentSpec<'static> {
    AgentSpec {
        name: TRIAGE,
        version: "1.0.0",
        image: BARE_IMAGE,
        command: stage::shell("read job; echo \"handled: $job\""),
        requested_keys: Vec::new(),
        description: "reads its job from stdin and says it handled it",
    }
}

fn client(tenant: &str) -> String {
    format!("tenant/{tenant}/client/backend")
}

fn code(s: &tonic::Status) -> &'static str {
    crate::fleet::code_name(s.code())
}

fn labels_text(l: &HashMap<String, String>) -> String {
    if l.is_empty() {
        return "(none)".into();
    }
    let sorted: BTreeMap<_, _> = l.iter().collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn time_of(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn clock(ms: i64) -> String {
    let s = ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3_600_000,
        s / 60_000 % 60,
        s / 1000 % 60,
        s % 1000
    )
}

fn scope(tenant: &str, pool: &str) -> String {
    if tenant.is_empty() {
        format!("pool {pool}")
    } else {
        tenant.to_owned()
    }
}

// ---------------------------------------------------------------------------
// 20: fleet workers

/// Workers enroll with join tokens, get their SPIFFE IDs from identity,
/// register and heartbeat; a tenant sees only its own workers; a worker
/// that stops is listed disconnected.
pub async fn fleet_workers(stage: &mut Stage, story: &mut Story) -> anyhow::Result<()> {
    story.chapter(
        "Fleet workers (companion example 20)",
        "Distributed worker registration: each worker host enrolls with a single-use join\n\
         token, gets its identity from its certificate, registers and heartbeats.",
    );
    story.step("An operator makes a join token per worker; three workers enroll");
    let specs = [
        WorkerSpec::tenant("ward-a", CLINIC, "zone=eu"),
        WorkerSpec::tenant("ward-b", CLINIC, "zone=us"),
        WorkerSpec::pool("nightly-1", POOL, "kind=batch"),
    ];
    let mut registered = Vec::new();
    for spec in specs.iter().cloned() {
        let w = stage.start_worker(spec.clone()).await?;
        story.say(format!(
            "{:<10} → {}  labels {}  {}",
            spec.name,
            stage::short_id(&w.spiffe_id, stage.trust_domain()),
            labels_text(&w.labels),
            crate::fleet::worker_state(w.state),
        ));
        let want = if spec.tenant.is_empty() {
            stage.spiffe(&format!("pool/{}/worker/{}", spec.pool, w.worker_id))
        } else {
            stage.spiffe(&format!("tenant/{}/worker/{}", spec.tenant, w.worker_id))
        };
        story.check(
            format!(
                "{} is a worker of {} by its certificate",
                spec.name,
                scope(spec.tenant, spec.pool)
            ),
            w.spiffe_id == want && w.tenant == spec.tenant && w.pool == spec.pool,
            format!("listed as {w:?}"),
        );
        registered.push((spec.name, w));
    }

    story.step("Enrollment and registration are in the audit log");
    for (name, w) in &registered {
        let enrolled = stage
            .audit_event("worker.enrolled", |e| {
                e.attributes.values().any(|v| v.contains(&w.worker_id))
            })
            .await?;
        let reg = stage
            .audit_event("worker.registered", |e| attr(e, "worker_id") == w.worker_id)
            .await?;
        story.check(
            format!("{name}: worker.enrolled and worker.registered recorded"),
            enrolled.is_some() && reg.is_some(),
            format!(
                "enrolled {:?}, registered {:?}",
                enrolled.is_some(),
                reg.is_some()
            ),
        );
    }

    story.step("Heartbeats (every second in this mesh) keep the workers' leases alive");
    let mut op = stage.dispatcher(OPERATOR)?;
    let before: HashMap<String, i64> = stage::list_workers(&mut op, "", "")
        .await?
        .into_iter()
        .map(|w| (w.worker_id.clone(), time_of(w.last_heartbeat_at.as_ref())))
        .collect();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = stage::list_workers(&mut op, "", "").await?;
    for (name, w) in &registered {
        let then = before.get(&w.worker_id).copied().unwrap_or(0);
        let now = after
            .iter()
            .find(|x| x.worker_id == w.worker_id)
            .map_or(0, |x| time_of(x.last_heartbeat_at.as_ref()));
        story.say(format!(
            "{name:<10} last heartbeat {} → {}",
            clock(then),
            clock(now)
        ));
        story.check(
            format!("{name} heartbeats"),
            now > then,
            "its last heartbeat did not move in 2.5 s",
        );
    }

    story.step("Each tenant's backend sees only its own workers");
    let mut clinic = stage.dispatcher(&client(CLINIC))?;
    let seen = stage::list_workers(&mut clinic, CLINIC, "").await?;
    let names: Vec<&str> = seen.iter().map(|w| w.worker_id.as_str()).collect();
    story.say(format!("{CLINIC} lists {names:?}"));
    story.check(
        format!("{CLINIC} sees its two wards and not the pool worker"),
        seen.len() == 2 && seen.iter().all(|w| w.tenant == CLINIC),
        format!("{seen:?}"),
    );
    let mut fintech = stage.dispatcher(&client(FINTECH))?;
    let r = fintech
        .list_workers(pb::ListWorkersRequest {
            tenant: CLINIC.into(),
            ..Default::default()
        })
        .await;
    match &r {
        Err(s) => story.say(format!(
            "{FINTECH} asks for {CLINIC}'s workers: {}",
            code(s)
        )),
        Ok(_) => story.say(format!("{FINTECH} asks for {CLINIC}'s workers: answered!")),
    }
    story.check(
        format!("{FINTECH} may not list {CLINIC}'s workers"),
        matches!(&r, Err(s) if s.code() == Code::PermissionDenied),
        format!("{r:?}"),
    );

    story.step("ward-b's host shuts down (SIGTERM)");
    stage.stop_worker("ward-b").await;
    let ward_b = &registered[1].1.worker_id;
    let mut state = String::new();
    for _ in 0..50 {
        let all = stage::list_workers(&mut op, CLINIC, "").await?;
        state = all
            .iter()
            .find(|w| &w.worker_id == ward_b)
            .map_or("gone".into(), |w| {
                crate::fleet::worker_state(w.state).to_owned()
            });
        if state != "connected" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    story.say(format!("ward-b is now {state}"));
    story.check(
        "a stopped worker is no longer offered work",
        state != "connected",
        "still listed connected",
    );
    stage.stop_workers().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// 26: scoped dispatch

/// A task of the scoped-dispatch scenario: its job, its labels, the workers
/// that may run it.
type Routed = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [&'static str],
);

/// Capability-based dispatch with project-scoped routing: a task goes only
/// to a worker of its own tenant whose labels are a superset of its own.
pub async fn scoped_dispatch(stage: &mut Stage, story: &mut Story) -> anyhow::Result<()> {
    story.chapter(
        "Fleet scoped dispatch (companion example 26)",
        "Capability labels route a tenant's tasks to the right workers of that tenant;\n\
         the tenant itself comes from the worker's certificate, never from a label.",
    );
    stage.approved_agent(&triage()).await?;
    story.step(format!(
        "{FINTECH} runs three workers; {CLINIC} one with the same labels"
    ));
    let specs = [
        WorkerSpec::tenant("pay-eu", FINTECH, "project=payments,region=eu"),
        WorkerSpec::tenant("pay-us", FINTECH, "project=payments,region=us"),
        WorkerSpec::tenant("reports", FINTECH, "project=reporting"),
        WorkerSpec::tenant("clinic-pay", CLINIC, "project=payments,region=eu"),
    ];
    let mut ids = HashMap::new();
    for spec in specs {
        let w = stage.start_worker(spec.clone()).await?;
        story.say(format!(
            "{:<10} {:<13} labels {}",
            spec.name,
            spec.tenant,
            labels_text(&w.labels)
        ));
        ids.insert(w.worker_id.clone(), spec.name);
    }

    story.step(format!("{FINTECH}'s backend enqueues five tasks"));
    let plan: [Routed; 5] = [
        (
            "settle EU payouts",
            &[("project", "payments"), ("region", "eu")],
            &["pay-eu"],
        ),
        (
            "settle US payouts",
            &[("project", "payments"), ("region", "us")],
            &["pay-us"],
        ),
        ("monthly report", &[("project", "reporting")], &["reports"]),
        (
            "refund batch (any payments worker)",
            &[("project", "payments")],
            &["pay-eu", "pay-us"],
        ),
        (
            "fraud model scoring",
            &[("project", "fraud-ml")],
            &["fraud-1"],
        ),
    ];
    let mut backend = stage.dispatcher(&client(FINTECH))?;
    let mut tasks = Vec::new();
    for (job, task_labels, allowed) in plan {
        let id = backend
            .enqueue(pb::EnqueueRequest {
                tenant: FINTECH.into(),
                agent: TRIAGE.into(),
                labels: labels(task_labels),
                payload: job.as_bytes().to_vec().into(),
                ..Default::default()
            })
            .await
            .context("Enqueue")?
            .into_inner()
            .task_id;
        story.say(format!(
            "{id}  {job:<36} needs {}",
            labels_text(&labels(task_labels))
        ));
        tasks.push((id, job, allowed));
    }

    story.step("Where each task ran");
    let mut ran = Vec::new();
    for (id, job, allowed) in &tasks[..4] {
        let t = stage.wait_final(&mut backend, FINTECH, id).await?;
        ran.push(t.worker_id.clone());
        let ran_on = ids.get(&t.worker_id).copied().unwrap_or("another worker");
        story.say(format!(
            "{job:<36} → {ran_on:<10} {}",
            crate::fleet::task_status(t.status)
        ));
        story.check(
            format!("\"{job}\" ran on {}", allowed.join(" or ")),
            t.status() == pb::TaskStatus::Succeeded && allowed.contains(&ran_on),
            format!("ran on {} ({:?})", t.worker_id, t.status()),
        );
    }
    let fraud = &tasks[4].0;
    let t = stage::get_task(&mut backend, FINTECH, fraud).await?;
    story.say(format!(
        "fraud model scoring                  → nobody has project=fraud-ml: {}",
        crate::fleet::task_status(t.status)
    ));
    story.check(
        "a task whose labels no worker has stays queued",
        t.status() == pb::TaskStatus::Queued && t.worker_id.is_empty(),
        format!("{t:?}"),
    );
    let clinic_pay = ids
        .iter()
        .find(|(_, n)| **n == "clinic-pay")
        .map(|(id, _)| id.clone())
        .unwrap_or_default();
    story.check(
        format!("{CLINIC}'s payments-labelled worker got none of {FINTECH}'s tasks"),
        !ran.contains(&clinic_pay),
        "it ran one",
    );

    story.step("A fraud-ml worker joins and takes the waiting task");
    let w = stage
        .start_worker(WorkerSpec::tenant("fraud-1", FINTECH, "project=fraud-ml"))
        .await?;
    ids.insert(w.worker_id.clone(), "fraud-1");
    let t = stage.wait_final(&mut backend, FINTECH, fraud).await?;
    story.check(
        "fraud model scoring ran on fraud-1",
        t.status() == pb::TaskStatus::Succeeded && t.worker_id == w.worker_id,
        format!("{t:?}"),
    );

    story.step(format!(
        "A {CLINIC} worker certificate registers with the label tenant={FINTECH}"
    ));
    let mut forger = stage.dispatcher(&format!("tenant/{CLINIC}/worker/label-forger"))?;
    let r = forger
        .register_worker(pb::RegisterWorkerRequest {
            labels: labels(&[("tenant", FINTECH), ("project", "payments")]),
            max_concurrent_runs: 1,
            sandbox_backends: vec![SandboxBackend::Process as i32],
            version: "demo".into(),
        })
        .await;
    match &r {
        Err(s) => story.say(format!("refused: {} ({})", code(s), s.message())),
        Ok(_) => story.say("registered!"),
    }
    story.check(
        "a label cannot change a worker's tenant",
        matches!(&r, Err(s) if s.code() == Code::PermissionDenied),
        format!("{r:?}"),
    );
    stage.stop_workers().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// 33: fleet + sealed

/// One task of the fleet + sealed walkthrough.
struct Planned {
    tenant: &'static str,
    pool: &'static str,
    job: &'static str,
    labels: &'static [(&'static str, &'static str)],
    /// The profile its cascade names (tenant tasks).
    profile: &'static str,
    /// The worker that must run it.
    only: &'static str,
}

/// A tenant's sealed profile: its name, the key, what the key is.
#[derive(Debug)]
pub struct TenantProfile {
    pub tenant: &'static str,
    pub profile: &'static str,
    pub key: &'static str,
    pub what: &'static str,
}

pub const PROFILES: [TenantProfile; 3] = [
    TenantProfile {
        tenant: CLINIC,
        profile: "ehr",
        key: "EHR_API_TOKEN",
        what: "the clinic's EHR token (PHI access)",
    },
    TenantProfile {
        tenant: FINTECH,
        profile: "payments",
        key: "STRIPE_API_KEY",
        what: "the fintech's Stripe key (PCI scope)",
    },
    TenantProfile {
        tenant: ENTERPRISE,
        profile: "llm",
        key: "ANTHROPIC_API_KEY",
        what: "the enterprise's own Anthropic key",
    },
];

/// Three tenants, five workers, six tasks: every task runs on a worker of
/// its own tenant with the labels it needs, a cross-tenant claim is refused
/// and audited, and no tenant credential is anywhere it must not be.
pub async fn fleet_sealed(stage: &mut Stage, story: &mut Story) -> anyhow::Result<()> {
    story.chapter(
        "Fleet + Sealed integration (companion example 33)",
        "Three tenants with sealed credentials, five workers, six tasks: each task runs on a\n\
         worker of its own tenant, a cross-tenant claim is refused at the dispatch boundary\n\
         and audited, and no tenant's credential reaches a worker, the dispatcher, a log or\n\
         the audit log.",
    );

    story.step("Each tenant's credential is sealed (random canary values, made in memory)");
    let mut canaries = Vec::new();
    for p in &PROFILES {
        let canary = Canary::new(format!("{}/{} {}", p.tenant, p.profile, p.key));
        let keys = stage
            .profile(p.tenant, p.profile, p.what, &[(p.key, &canary.value)])
            .await?;
        let k = keys.first().context("no key written")?;
        story.say(format!(
            "{:<21} {:<17} v{}  fingerprint {}…  ({})",
            format!("{}/{}", p.tenant, p.profile),
            k.name,
            k.version,
            k.fingerprint.get(..16).unwrap_or(&k.fingerprint),
            p.what
        ));
        canaries.push(canary);
    }
    for p in &PROFILES {
        let e = stage
            .audit_event("sealed.secret.written", |e| {
                e.tenant == p.tenant && e.attributes.values().any(|v| v == p.key)
            })
            .await?;
        story.check(
            format!(
                "{}: sealed.secret.written recorded (name and fingerprint only)",
                p.tenant
            ),
            e.is_some(),
            "no audit record",
        );
    }
    stage.approved_agent(&triage()).await?;

    story.step("Five workers enroll with join tokens scoped to a tenant or the org-global pool");
    let specs = [
        WorkerSpec::tenant("clinic-phi", CLINIC, "project=ehr,phi=yes"),
        WorkerSpec::tenant("clinic-gpu", CLINIC, "project=ehr,gpu=a100"),
        WorkerSpec::tenant("ledgerly-pci", FINTECH, "project=payments,pci=yes"),
        WorkerSpec::tenant("initech-llm", ENTERPRISE, "project=copilot"),
        WorkerSpec::pool("pool-batch", POOL, "kind=batch"),
    ];
    let mut ids: HashMap<String, &str> = HashMap::new();
    let mut listed: HashMap<String, pb::Worker> = HashMap::new();
    for spec in specs {
        let w = stage.start_worker(spec.clone()).await?;
        story.say(format!(
            "{:<13} {}  labels {}",
            spec.name,
            stage::short_id(&w.spiffe_id, stage.trust_domain()),
            labels_text(&w.labels)
        ));
        ids.insert(w.worker_id.clone(), spec.name);
        listed.insert(w.worker_id.clone(), w);
    }

    story.step("Tenant backends enqueue six tasks; each cascade names the tenant's profile");
    let plan = [
        Planned {
            tenant: CLINIC,
            pool: "",
            job: "summarize chart #1042",
            labels: &[("phi", "yes")],
            profile: "ehr",
            only: "clinic-phi",
        },
        Planned {
            tenant: CLINIC,
            pool: "",
            job: "transcribe radiology dictation",
            labels: &[("gpu", "a100")],
            profile: "ehr",
            only: "clinic-gpu",
        },
        Planned {
            tenant: FINTECH,
            pool: "",
            job: "reconcile Stripe payouts",
            labels: &[("pci", "yes")],
            profile: "payments",
            only: "ledgerly-pci",
        },
        Planned {
            tenant: ENTERPRISE,
            pool: "",
            job: "draft release notes",
            labels: &[("project", "copilot")],
            profile: "llm",
            only: "initech-llm",
        },
        Planned {
            tenant: ENTERPRISE,
            pool: "",
            job: "review pull request 77",
            labels: &[],
            profile: "llm",
            only: "initech-llm",
        },
        Planned {
            tenant: "",
            pool: POOL,
            job: "rotate nightly logs",
            labels: &[("kind", "batch")],
            profile: "",
            only: "pool-batch",
        },
    ];
    let mut tasks = Vec::new();
    for p in &plan {
        let mut req = pb::EnqueueRequest {
            tenant: p.tenant.into(),
            pool: p.pool.into(),
            agent: TRIAGE.into(),
            labels: labels(p.labels),
            payload: p.job.as_bytes().to_vec().into(),
            ..Default::default()
        };
        // Tenants enqueue with their own backend's certificate; a pool task
        // only an operator may enqueue.
        let who = if p.pool.is_empty() {
            req.cascade = Some(stage::cascade(p.tenant, p.profile));
            client(p.tenant)
        } else {
            OPERATOR.to_owned()
        };
        let id = stage
            .dispatcher(&who)?
            .enqueue(req)
            .await
            .with_context(|| format!("Enqueue for {}", scope(p.tenant, p.pool)))?
            .into_inner()
            .task_id;
        story.say(format!(
            "{id}  {:<13} {:<31} labels {:<16} profile {}",
            scope(p.tenant, p.pool),
            p.job,
            labels_text(&labels(p.labels)),
            if p.profile.is_empty() { "-" } else { p.profile }
        ));
        tasks.push(id);
    }

    story.step("Every task ran on a worker of its own tenant with the labels it needs");
    let mut op = stage.dispatcher(OPERATOR)?;
    let mut audit = stage.audit()?;
    for (p, id) in plan.iter().zip(&tasks) {
        let t = stage.wait_final(&mut op, p.tenant, id).await?;
        let ran_on = ids
            .get(&t.worker_id)
            .copied()
            .unwrap_or("an unknown worker");
        let w = listed.get(&t.worker_id).cloned().unwrap_or_default();
        story.say(format!(
            "{:<31} → {:<13} {} run {}  output {:?}",
            p.job,
            ran_on,
            crate::fleet::task_status(t.status),
            t.run_id,
            t.output_summary.trim_end()
        ));
        // The worker is of the task's own tenant (or pool), by its certificate.
        let right_scope = w.tenant == p.tenant && w.pool == p.pool;
        let has_labels = p
            .labels
            .iter()
            .all(|(k, v)| w.labels.get(*k).map(String::as_str) == Some(*v));
        story.check(
            format!(
                "\"{}\" ran on {} ({})",
                p.job,
                p.only,
                scope(p.tenant, p.pool)
            ),
            t.status() == pb::TaskStatus::Succeeded
                && right_scope
                && has_labels
                && ran_on == p.only,
            format!("{:?} on {ran_on}", t.status()),
        );
    }

    story.step(format!(
        "A {CLINIC} worker host tries to claim one of {FINTECH}'s tasks"
    ));
    // The bait needs a label no worker has, so it stays queued whatever
    // else happens.
    let mut fintech = stage.dispatcher(&client(FINTECH))?;
    let bait = fintech
        .enqueue(pb::EnqueueRequest {
            tenant: FINTECH.into(),
            agent: TRIAGE.into(),
            labels: labels(&[("project", "quarter-close")]),
            cascade: Some(stage::cascade(FINTECH, "payments")),
            payload: b"close the quarter".to_vec().into(),
            ..Default::default()
        })
        .await
        .context("Enqueue the bait")?
        .into_inner()
        .task_id;
    story.say(format!("{FINTECH} enqueues {bait} (project=quarter-close)"));
    let rogue_id = "clinic-rogue";
    let mut rogue = DirectWorker::new(stage, CLINIC, rogue_id).await?;
    story.say(format!(
        "the rogue presents {} and asks for {bait}",
        stage.spiffe(&format!("tenant/{CLINIC}/worker/{rogue_id}"))
    ));
    let mut refusals = Vec::new();
    for named in [FINTECH, CLINIC] {
        let r = rogue.claim(named, &bait).await;
        match &r {
            Err(s) => story.say(format!(
                "  ClaimTask(tenant={named}, {bait}) → {}: {}",
                code(s),
                s.message()
            )),
            Ok(_) => story.say(format!("  ClaimTask(tenant={named}, {bait}) → GRANTED")),
        }
        refusals.push(matches!(&r, Err(s) if s.code() == Code::PermissionDenied));
    }
    story.check(
        "the cross-tenant claim is refused with PERMISSION_DENIED",
        refusals.iter().all(|r| *r),
        format!("{refusals:?}"),
    );
    let refused = stage
        .audit_event("fleet.cross_tenant_refused", |e| {
            attr(e, "task_id") == bait && attr(e, "worker_id") == rogue_id
        })
        .await?;
    if let Some(e) = &refused {
        story.say(format!(
            "audit #{}: {} tenant={} worker_id={} task_id={}",
            e.sequence,
            e.r#type,
            e.tenant,
            attr(e, "worker_id"),
            attr(e, "task_id")
        ));
    }
    story.check(
        "the refusal is in the audit log (fleet.cross_tenant_refused)",
        refused.is_some(),
        "no audit record",
    );
    let still = stage::get_task(&mut fintech, FINTECH, &bait).await?;
    let claims = stage::audit_events(&mut audit, "task.claimed").await?;
    story.check(
        "the refused claim took nothing: the task is still queued, no run was minted",
        still.status() == pb::TaskStatus::Queued
            && still.worker_id.is_empty()
            && !claims.iter().any(|e| attr(e, "task_id") == bait),
        format!("{still:?}"),
    );
    drop(rogue);
    let r = fintech
        .get_task(pb::GetTaskRequest {
            tenant: CLINIC.into(),
            task_id: tasks[0].clone(),
        })
        .await;
    story.say(format!(
        "{FINTECH}'s backend asks for {CLINIC}'s task {}: {}",
        tasks[0],
        match &r {
            Err(s) => code(s),
            Ok(_) => "answered!",
        }
    ));
    story.check(
        format!("{FINTECH}'s backend cannot read {CLINIC}'s tasks"),
        matches!(&r, Err(s) if s.code() == Code::PermissionDenied),
        format!("{r:?}"),
    );
    fintech
        .cancel_task(pb::CancelTaskRequest {
            tenant: FINTECH.into(),
            task_id: bait,
            reason: "the demo's bait".into(),
        })
        .await
        .context("CancelTask")?;

    story.step("Leak scan: the three credentials, raw and base64, wherever they must not be");
    let mut targets = Vec::new();
    for w in stage.workers() {
        if let Some(pid) = w.pid() {
            targets.push(leak::Target::Memory {
                name: format!("worker {} memory", w.name),
                pid,
            });
            targets.push(leak::Target::Environ {
                name: format!("worker {} environ", w.name),
                pid,
            });
        }
    }
    targets.extend(service_targets(stage, &["dispatcher"]));
    targets.extend(common_targets(stage).await?);
    let ok = scan_with_control(story, &canaries, &targets)?;
    story.check(
        "zero leaks of the sealed credentials",
        ok,
        "see the findings above",
    );
    stage.stop_workers().await;
    Ok(())
}

/// Memory and environment of mesh services.
pub fn service_targets(stage: &Stage, services: &[&str]) -> Vec<leak::Target> {
    let mut out = Vec::new();
    for s in services {
        if let Some(pid) = stage.service_pid(s) {
            out.push(leak::Target::Memory {
                name: format!("{s} memory"),
                pid,
            });
            out.push(leak::Target::Environ {
                name: format!("{s} environ"),
                pid,
            });
        }
    }
    out
}

/// The mesh directory (data, logs, configs, worker state and work dirs),
/// temp files made since the demo started, and the audit export.
pub async fn common_targets(stage: &Stage) -> anyhow::Result<Vec<leak::Target>> {
    Ok(vec![
        leak::Target::Files {
            name: "mesh directory (data, logs, worker dirs)".into(),
            path: stage.dir.clone(),
        },
        leak::Target::FilesSince {
            name: "temp files made during the demo".into(),
            path: std::env::temp_dir(),
            since: stage.started,
        },
        leak::Target::Text {
            name: "audit export".into(),
            text: trail::export(stage).await?,
        },
    ])
}

/// Scans `targets` for `canaries` after proving the scanner finds a planted
/// control canary; prints the findings. True when the control was found
/// everywhere it was planted and no canary anywhere.
pub fn scan_with_control(
    story: &mut Story,
    canaries: &[Canary],
    targets: &[leak::Target],
) -> anyhow::Result<bool> {
    let control = leak::Control::plant()?;
    let control_targets = control.targets();
    let needles = leak::Needles::new(std::iter::once(&control.canary));
    let found = leak::scan(&needles, &control_targets);
    control.remove();
    let hit: Vec<&str> = control_targets
        .iter()
        .filter(|t| {
            let n = match t {
                leak::Target::Memory { name, .. }
                | leak::Target::Environ { name, .. }
                | leak::Target::Files { name, .. } => name,
                _ => return false,
            };
            found.findings.iter().any(|f| &f.target == n)
        })
        .map(|t| match t {
            leak::Target::Memory { .. } => "memory",
            leak::Target::Environ { .. } => "environ",
            _ => "file (base64)",
        })
        .collect();
    story.say(format!(
        "positive control: a planted control canary is found in {} of 3 places ({})",
        hit.len(),
        hit.join(", ")
    ));
    let control_ok = story.check(
        "the scanner finds a planted canary (positive control)",
        hit.len() == 3,
        "the scan would miss a leak",
    );

    let needles = leak::Needles::new(canaries);
    let report = leak::scan(&needles, targets);
    for (name, bytes) in &report.scanned {
        story.say(format!("scanned {name:<48} {:>10} bytes", bytes));
    }
    for u in &report.unreadable {
        story.say(format!("(could not read {u})"));
    }
    for f in &report.findings {
        story.say(format!(
            "LEAK: {} ({}) in {} {}",
            f.canary, f.form, f.target, f.place
        ));
    }
    story.say(format!(
        "{} canaries × {} places, {} MiB read: {} found",
        canaries.len(),
        report.scanned.len(),
        report.bytes() >> 20,
        report.findings.len()
    ));
    Ok(control_ok && report.findings.is_empty())
}

/// A worker the demo drives itself with a certificate it issued: the
/// "rogue" host of the cross-tenant claim.
pub struct DirectWorker {
    client: Dispatcher,
    /// The open claim stream (a claim by id needs one).
    _tx: mpsc::Sender<pb::ClaimRequest>,
    _inbound: tonic::Streaming<pb::ClaimResponse>,
}

impl DirectWorker {
    pub async fn new(stage: &Stage, tenant: &str, id: &str) -> anyhow::Result<Self> {
        let mut client = stage.dispatcher(&format!("tenant/{tenant}/worker/{id}"))?;
        client
            .register_worker(pb::RegisterWorkerRequest {
                labels: labels(&[("project", "quarter-close")]),
                max_concurrent_runs: 1,
                sandbox_backends: vec![SandboxBackend::Process as i32],
                version: "demo-rogue".into(),
            })
            .await
            .context("RegisterWorker of the rogue")?;
        let (tx, rx) = mpsc::channel(8);
        let inbound = client
            .claim(ReceiverStream::new(rx))
            .await
            .context("the rogue's claim stream")?
            .into_inner();
        tx.send(pb::ClaimRequest {
            body: Some(Up::Credits(pb::ClaimCredits { slots: 0 })),
        })
        .await
        .ok();
        Ok(Self {
            client,
            _tx: tx,
            _inbound: inbound,
        })
    }

    pub async fn claim(
        &mut self,
        tenant: &str,
        task_id: &str,
    ) -> Result<pb::ClaimTaskResponse, tonic::Status> {
        let csr = run_csr().map_err(|e| tonic::Status::internal(e.to_string()))?;
        self.client
            .claim_task(pb::ClaimTaskRequest {
                tenant: tenant.into(),
                task_id: task_id.into(),
                run_csr_der: csr.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

impl std::fmt::Debug for DirectWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWorker").finish_non_exhaustive()
    }
}

/// A P-256 key and a CSR for it, as a worker makes for a run.
fn run_csr() -> anyhow::Result<Vec<u8>> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    Ok(rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .der()
        .to_vec())
}
