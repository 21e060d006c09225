//! The audit service as the mesh uses it, against the real binaries: who may
//! write which events, who may read whose, live tail, proofs, restart, and the
//! canary search in the audit store and every log.

use std::time::Duration;

use bulkhead_proto::audit::v1 as pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use bulkhead_testkit::mesh::TestMesh;
use tonic::Code;

type Client = AuditServiceClient<bulkhead_mesh::client::MeshChannel>;

fn client(mesh: &TestMesh, who: &str) -> anyhow::Result<Client> {
    Ok(AuditServiceClient::new(
        mesh.channel("audit", &mesh.identity(who)?)?,
    ))
}

fn event(kind: &str, tenant: &str, run: &str, attrs: &[(&str, &str)]) -> pb::NewEvent {
    pb::NewEvent {
        r#type: kind.into(),
        tenant: tenant.into(),
        run_id: run.into(),
        outcome: pb::Outcome::Success as i32,
        attributes: attrs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
    }
}

async fn append(c: &mut Client, events: Vec<pb::NewEvent>) -> Result<Vec<u64>, tonic::Status> {
    Ok(c.append(pb::AppendRequest { events })
        .await?
        .into_inner()
        .sequences)
}

async fn query(c: &mut Client, tenant: &str) -> Result<Vec<pb::Event>, tonic::Status> {
    Ok(c.query(pb::QueryRequest {
        tenant: tenant.into(),
        limit: 1000,
        ..Default::default()
    })
    .await?
    .into_inner()
    .events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_write_only_their_own_events_and_tenants_read_only_their_own() -> anyhow::Result<()>
{
    let mesh = TestMesh::start().await?;
    let mut sealed = client(&mesh, "service/sealed-vault")?;
    let mut dispatcher = client(&mesh, "service/dispatcher")?;

    let seqs = append(
        &mut sealed,
        vec![
            event(
                "sealed.credential.resolved",
                "acme",
                "r1",
                &[("keys", "ANTHROPIC_API_KEY")],
            ),
            event(
                "sealed.credential.resolved",
                "globex",
                "r2",
                &[("keys", "STRIPE_KEY")],
            ),
        ],
    )
    .await?;
    assert_eq!(seqs, vec![1, 2]);
    append(
        &mut dispatcher,
        vec![event("fleet.pool_reset", "", "", &[("pool", "gpu")])],
    )
    .await?;

    // Another service's event type: refused, nothing appended.
    let err = append(
        &mut dispatcher,
        vec![event("sealed.credential.resolved", "acme", "r9", &[])],
    )
    .await
    .expect_err("dispatcher may not write sealed.*");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = append(&mut sealed, vec![event("task.completed", "acme", "", &[])])
        .await
        .expect_err("sealed-vault may not write task.*");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // The actor is the caller, whatever it claims: there is no field to claim it.
    // Non-services cannot append at all.
    let mut op = client(&mesh, "admin/operator")?;
    let err = append(&mut op, vec![event("sealed.x.y", "acme", "", &[])])
        .await
        .expect_err("operator");
    assert_eq!(err.code(), Code::PermissionDenied);
    // Bad input is named.
    let err = append(&mut sealed, vec![event("Sealed.Bad", "acme", "", &[])])
        .await
        .expect_err("bad type");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("[0].type"), "{}", err.message());

    // Operators read everything, stamped with the real actor.
    let all = query(&mut op, "").await?;
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(
        all[0].actor,
        format!("spiffe://bulkhead.test/service/sealed-vault")
    );
    assert_eq!(
        all[2].actor,
        format!("spiffe://bulkhead.test/service/dispatcher")
    );

    // A tenant client reads its own tenant only.
    let mut acme = client(&mesh, "tenant/acme/client/api")?;
    let own = query(&mut acme, "acme").await?;
    assert_eq!(own.iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![1]);
    let err = query(&mut acme, "globex")
        .await
        .expect_err("cross-tenant read");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = query(&mut acme, "").await.expect_err("all tenants");
    assert_ne!(err.code(), Code::Ok);
    // Another tenant's event does not exist for it, even by sequence.
    let err = acme
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            tenant: "acme".into(),
            leaf: Some(pb::get_inclusion_proof_request::Leaf::Sequence(2)),
            tree_size: 0,
        })
        .await
        .expect_err("globex's event");
    assert_eq!(err.code(), Code::NotFound);
    let err = acme
        .export(pb::ExportRequest {
            tenant: "globex".into(),
            ..Default::default()
        })
        .await
        .expect_err("cross-tenant export");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Sealed-vault reads back what it appended, of every tenant (its start
    // replays run holdings from it), and nothing else.
    let sealed_id = "spiffe://bulkhead.test/service/sealed-vault";
    let own = sealed
        .query(pb::QueryRequest {
            actor: sealed_id.into(),
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    assert_eq!(own.iter().map(|e| e.sequence).collect::<Vec<_>>(), [1, 2]);
    for actor in ["", "spiffe://bulkhead.test/service/dispatcher"] {
        let err = sealed
            .query(pb::QueryRequest {
                actor: actor.into(),
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect_err("another actor's events");
        assert_eq!(err.code(), Code::PermissionDenied, "{actor:?}: {err}");
    }
    let err = query(&mut dispatcher, "")
        .await
        .expect_err("the dispatcher reads nothing");
    assert_eq!(err.code(), Code::PermissionDenied);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_proofs_and_restart() -> anyhow::Result<()> {
    use tokio_stream::StreamExt;
    let mut mesh = TestMesh::start().await?;
    let mut sealed = client(&mesh, "service/sealed-vault")?;
    let mut op = client(&mesh, "admin/operator")?;
    append(
        &mut sealed,
        vec![event("sealed.secret.written", "acme", "", &[("key", "A")])],
    )
    .await?;

    let mut tail = op
        .tail(pb::TailRequest {
            tenant: "acme".into(),
            from_sequence: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), tail.next())
        .await?
        .expect("item")?;
    assert_eq!(
        first.event.expect("event").sequence,
        1,
        "replayed from the store"
    );
    append(
        &mut sealed,
        vec![
            event("sealed.secret.written", "globex", "", &[("key", "B")]),
            event("sealed.secret.written", "acme", "", &[("key", "C")]),
        ],
    )
    .await?;
    let live = tokio::time::timeout(Duration::from_secs(10), tail.next())
        .await?
        .expect("item")?;
    let live = live.event.expect("event");
    assert_eq!(
        (live.sequence, live.tenant.as_str()),
        (3, "acme"),
        "live, filtered to acme"
    );

    // Inclusion proof against a signed head (published at least every second),
    // checked here with the audit library.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let head = op
            .get_checkpoint(pb::GetCheckpointRequest::default())
            .await?
            .into_inner();
        if head.tree_head.is_some_and(|h| h.tree_size >= 3) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no signed head covers sequence 3"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resp = op
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            tenant: String::new(),
            leaf: Some(pb::get_inclusion_proof_request::Leaf::Sequence(3)),
            tree_size: 0,
        })
        .await?
        .into_inner();
    let head = resp.tree_head.expect("head");
    let leaf: [u8; 32] = resp
        .event
        .expect("event")
        .leaf_hash
        .to_vec()
        .try_into()
        .expect("32");
    let path: Vec<[u8; 32]> = resp
        .audit_path
        .iter()
        .map(|h| h.to_vec().try_into().expect("32"))
        .collect();
    let root: [u8; 32] = head.root_hash.to_vec().try_into().expect("32");
    bulkhead_audit::merkle::verify_inclusion(&leaf, 2, head.tree_size, &path, &root)?;

    // Restart the audit binary: events and signed heads survive, sequences go on.
    let before = op
        .get_checkpoint(pb::GetCheckpointRequest::default())
        .await?
        .into_inner();
    mesh.mesh.restart("audit").await?;
    let mut op = client(&mesh, "admin/operator")?;
    let mut sealed = client(&mesh, "service/sealed-vault")?;
    assert_eq!(query(&mut op, "").await?.len(), 3);
    let after = op
        .get_checkpoint(pb::GetCheckpointRequest::default())
        .await?
        .into_inner();
    assert!(after.tree_head.expect("head").tree_size >= before.tree_head.expect("head").tree_size);
    assert_eq!(
        append(
            &mut sealed,
            vec![event("sealed.secret.deleted", "acme", "", &[])]
        )
        .await?,
        vec![4]
    );
    let v = op.verify(pb::VerifyRequest::default()).await?.into_inner();
    assert!(v.ok, "{v:?}");
    Ok(())
}

/// A planted canary secret must never be produced by a service into the audit
/// log, and a refused append must not echo it into any log or error message.
/// (The scan grows as services that handle secrets land.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_values_do_not_leak_through_refusals() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let canary = format!("CANARY-{:032x}", rand_u128());
    let mut dispatcher = client(&mesh, "service/dispatcher")?;
    // Refused for the type, and refused for the value's size: neither echoes it.
    let err = append(
        &mut dispatcher,
        vec![event(
            "sealed.secret.written",
            "acme",
            "",
            &[("v", &canary)],
        )],
    )
    .await
    .expect_err("wrong owner");
    assert!(!err.message().contains(&canary));
    let big = format!("{canary}{}", "x".repeat(2000));
    let err = append(
        &mut dispatcher,
        vec![event("task.enqueued", "acme", "", &[("v", &big)])],
    )
    .await
    .expect_err("too large");
    assert!(!err.message().contains(&canary), "{}", err.message());

    // Positive control: an accepted event holding the canary is found by the
    // same scan, so an empty scan means something.
    let control = format!("CONTROL-{:032x}", rand_u128());
    append(
        &mut dispatcher,
        vec![event("task.enqueued", "acme", "", &[("note", &control)])],
    )
    .await?;

    let found = |needle: &str| -> anyhow::Result<Vec<String>> {
        let mut hits = Vec::new();
        for entry in walk(mesh.dir())? {
            let bytes = std::fs::read(&entry)?;
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                hits.push(entry.display().to_string());
            }
        }
        Ok(hits)
    };
    // Give SQLite's WAL a moment to hit the file the scan reads.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !found(&control)?.is_empty(),
        "the scan finds an accepted value"
    );
    assert_eq!(found(&canary)?, Vec::<String>::new(), "canary leaked");
    Ok(())
}

fn rand_u128() -> u128 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() ^ (u128::from(std::process::id()) << 64)
}

fn walk(dir: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

fn serial_hex(who: &bulkhead_mesh::tls::Identity) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(&who.chain()[0]).expect("cert");
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn revoke_serial(mesh: &TestMesh, serial: &str) -> anyhow::Result<()> {
    use bulkhead_proto::identity::v1 as idpb;
    let mut identity = idpb::identity_service_client::IdentityServiceClient::new(
        mesh.channel("identity", &mesh.identity("admin/operator")?)?,
    );
    identity
        .revoke(idpb::RevokeRequest {
            tenant: String::new(),
            target: Some(idpb::revoke_request::Target::Serial(serial.to_owned())),
            reason: "test".into(),
            hard: true,
        })
        .await?;
    Ok(())
}

/// A stream opened before its caller was revoked does not outlive the
/// revocation: a revoked tenant client's live Tail ends with UNAUTHENTICATED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_callers_open_tail_ends() -> anyhow::Result<()> {
    use tokio_stream::StreamExt;
    let mesh = TestMesh::start().await?;
    // Warm-up: audit follows identity's revocation list (a revoked
    // certificate is refused there) before the clock matters.
    let dummy = mesh.identity("tenant/acme/client/dummy")?;
    revoke_serial(&mesh, &serial_hex(&dummy)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = AuditServiceClient::new(mesh.channel("audit", &dummy)?);
        if c.get_checkpoint(pb::GetCheckpointRequest::default())
            .await
            .is_err()
        {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "audit never applied a revocation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let who = mesh.identity("tenant/acme/client/tail")?;
    let mut tailer = AuditServiceClient::new(mesh.channel("audit", &who)?);
    let mut tail = tailer
        .tail(pb::TailRequest {
            tenant: "acme".into(),
            from_sequence: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut sealed = client(&mesh, "service/sealed-vault")?;
    append(
        &mut sealed,
        vec![event("sealed.secret.written", "acme", "", &[])],
    )
    .await?;
    let first = tokio::time::timeout(Duration::from_secs(10), tail.next())
        .await?
        .expect("item")?;
    assert_eq!(
        first.event.expect("event").tenant,
        "acme",
        "the stream is live"
    );

    revoke_serial(&mesh, &serial_hex(&who)).await?;
    let revoked_at = tokio::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tail.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status),
                None => return None,
            }
        }
    })
    .await?;
    let status = end.expect("the stream ends with a status, not silently");
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    assert!(
        revoked_at.elapsed() < Duration::from_secs(2),
        "the stream ended {:?} after the revocation",
        revoked_at.elapsed()
    );
    Ok(())
}
