//! The identity service as its users meet it, against the real binaries over
//! real mTLS: workers enrolling with join tokens, the dispatcher minting run
//! X.509-SVIDs, runs minting JWT-SVIDs, services validating them, operators
//! revoking — with every SVID and token checked by an implementation that is
//! not ours (the `spiffe` crate), every refusal checked for its code and its
//! audit record, and every failed action checked for having issued nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bulkhead_mesh::client::{self, MeshChannel};
use bulkhead_mesh::tls::{ExpectServer, Identity};
use bulkhead_proto::audit::v1 as audit_pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use bulkhead_proto::identity::v1 as pb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_testkit::mesh::TestMesh;
use prost::Message as _;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::time::Instant;
use tonic::{Code, Status};

type IdClient = IdentityServiceClient<MeshChannel>;

const TD: &str = "spiffe://bulkhead.test";
const SEALED_VAULT: &str = "spiffe://bulkhead.test/service/sealed-vault";

// ---------------------------------------------------------------------------
// Parties

/// Identity's API as `path` (e.g. `admin/operator`), over mTLS.
fn identity_as(mesh: &TestMesh, path: &str) -> anyhow::Result<IdClient> {
    identity_with(mesh, &mesh.identity(path)?)
}

/// Identity's API as the holder of `who`, over mTLS.
fn identity_with(mesh: &TestMesh, who: &Identity) -> anyhow::Result<IdClient> {
    Ok(IdentityServiceClient::new(mesh.channel("identity", who)?))
}

/// Identity's API over TLS that authenticates the server only: a caller
/// without a certificate (a worker before it enrolls).
fn identity_anonymous(mesh: &TestMesh) -> anyhow::Result<IdClient> {
    let (_, bundle) = mesh.mesh.operator();
    let ch = client::channel(
        mesh.addr("identity")?,
        None,
        bundle,
        ExpectServer::Service("identity".into()),
    )?;
    Ok(IdentityServiceClient::new(ch))
}

fn audit_with(mesh: &TestMesh, who: &Identity) -> anyhow::Result<AuditServiceClient<MeshChannel>> {
    Ok(AuditServiceClient::new(mesh.channel("audit", who)?))
}

/// A key made by its holder, as a worker makes one.
fn p256() -> anyhow::Result<KeyPair> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// A plain PKCS#10 request for `key`: no names, no extensions.
fn csr(key: &KeyPair) -> anyhow::Result<Vec<u8>> {
    csr_with(CertificateParams::default(), key)
}

fn csr_with(params: CertificateParams, key: &KeyPair) -> anyhow::Result<Vec<u8>> {
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// The holder's view of an issued SVID: the returned chain and its own key.
fn holder_identity(svid: &pb::X509Svid, key: &KeyPair) -> anyhow::Result<Identity> {
    let chain = svid
        .cert_chain_der
        .iter()
        .map(|c| CertificateDer::from(c.to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(Identity::from_der(chain, key, &svid.spiffe_id)?)
}

/// The chain as the SPIFFE Workload API hands it out: DER certificates back to back.
fn chain_concat(svid: &pb::X509Svid) -> Vec<u8> {
    svid.cert_chain_der
        .iter()
        .flat_map(|c| c.to_vec())
        .collect()
}

/// Checks an X.509-SVID with the `spiffe` crate (not our code) and returns the
/// SPIFFE ID it read from the leaf.
fn spiffe_crate_accepts(svid: &pb::X509Svid, key: &KeyPair) -> anyhow::Result<String> {
    let parsed = spiffe::X509Svid::parse_from_der(&chain_concat(svid), &key.serialize_der())
        .with_context(|| format!("the spiffe crate refuses the svid of {}", svid.spiffe_id))?;
    Ok(parsed.spiffe_id().to_string())
}

fn leaf_not_after(svid: &pb::X509Svid) -> anyhow::Result<i64> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let leaf = svid.cert_chain_der.first().context("empty chain")?;
    let (_, cert) = X509Certificate::from_der(leaf)?;
    Ok(cert.validity().not_after.timestamp())
}

fn secs(n: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: n,
        nanos: 0,
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// The error of `r`, which must be a refusal with `code`.
fn refused<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, what: &str) -> Status {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, but it succeeded: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            s
        }
    }
}

async fn create_token(
    op: &mut IdClient,
    tenant: &str,
    pool: &str,
    ttl_secs: i64,
    max_uses: u32,
) -> anyhow::Result<(String, pb::JoinToken)> {
    let resp = op
        .create_join_token(pb::CreateJoinTokenRequest {
            tenant: tenant.into(),
            pool: pool.into(),
            ttl: Some(secs(ttl_secs)),
            max_uses,
            description: "cross-service test".into(),
        })
        .await?
        .into_inner();
    Ok((resp.token, resp.join_token.context("no token metadata")?))
}

/// A worker without a certificate enrolls with `token`, using a key it made.
async fn enroll(
    mesh: &TestMesh,
    token: &str,
    name: &str,
) -> anyhow::Result<Result<(pb::EnrollWorkerResponse, KeyPair), Status>> {
    let key = p256()?;
    let csr = csr(&key)?;
    Ok(identity_anonymous(mesh)?
        .enroll_worker(pb::EnrollWorkerRequest {
            join_token: token.into(),
            csr_der: csr.into(),
            worker_name: name.into(),
        })
        .await
        .map(|r| (r.into_inner(), key)))
}

async fn mint_run_csr(
    dispatcher: &mut IdClient,
    tenant: &str,
    run: &str,
    worker: &str,
    csr: Vec<u8>,
    ttl: Option<prost_types::Duration>,
) -> Result<pb::X509Svid, Status> {
    let resp = dispatcher
        .mint_run_svid(pb::MintRunSvidRequest {
            tenant: tenant.into(),
            run_id: run.into(),
            csr_der: csr.into(),
            ttl,
            worker_id: worker.into(),
            pool: String::new(),
        })
        .await?
        .into_inner();
    resp.svid
        .ok_or_else(|| Status::internal("MintRunSvid answered without an svid"))
}

/// The dispatcher has identity sign a run key made by the worker; returns the
/// run's SVID and key.
async fn mint_run(
    dispatcher: &mut IdClient,
    tenant: &str,
    run: &str,
    worker: &str,
) -> anyhow::Result<(pb::X509Svid, KeyPair)> {
    let key = p256()?;
    let svid = mint_run_csr(dispatcher, tenant, run, worker, csr(&key)?, None).await?;
    Ok((svid, key))
}

fn revoke_run(tenant: &str, run: &str, hard: bool) -> pb::RevokeRequest {
    pb::RevokeRequest {
        tenant: tenant.into(),
        target: Some(pb::revoke_request::Target::RunId(run.into())),
        reason: "cross-service test".into(),
        hard,
    }
}

// ---------------------------------------------------------------------------
// The audit log, read as an operator

struct AuditLog {
    client: AuditServiceClient<MeshChannel>,
}

impl AuditLog {
    fn new(mesh: &TestMesh) -> anyhow::Result<Self> {
        Ok(Self {
            client: audit_with(mesh, &mesh.identity("admin/operator")?)?,
        })
    }

    /// Every event, every tenant.
    async fn events(&mut self) -> anyhow::Result<Vec<audit_pb::Event>> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .client
                .query(audit_pb::QueryRequest {
                    after_sequence: after,
                    limit: 1000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            out.extend(page.events);
            if page.next_after_sequence == 0 {
                return Ok(out);
            }
            after = page.next_after_sequence;
        }
    }

    async fn of_type(&mut self, kind: &str) -> anyhow::Result<Vec<audit_pb::Event>> {
        Ok(self
            .events()
            .await?
            .into_iter()
            .filter(|e| e.r#type == kind)
            .collect())
    }

    /// Waits (up to 5 s) for an event matching `pred`: refusals at the
    /// authorization layer are recorded in the background, after the reply.
    async fn wait_for(
        &mut self,
        what: &str,
        pred: impl Fn(&audit_pb::Event) -> bool,
    ) -> anyhow::Result<audit_pb::Event> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(e) = self.events().await?.into_iter().find(|e| pred(e)) {
                return Ok(e);
            }
            anyhow::ensure!(Instant::now() < deadline, "no audit record of {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn attr<'a>(e: &'a audit_pb::Event, key: &str) -> &'a str {
    e.attributes.get(key).map_or("", String::as_str)
}

// ---------------------------------------------------------------------------
// JWT helpers

fn jwt_json(token: &str, part: usize) -> anyhow::Result<serde_json::Value> {
    let seg = token
        .split('.')
        .nth(part)
        .context("token has too few parts")?;
    Ok(serde_json::from_slice(&B64.decode(seg)?)?)
}

fn spiffe_jwt_bundle(jwks: &str) -> anyhow::Result<spiffe::JwtBundleSet> {
    let td = spiffe::TrustDomain::new("bulkhead.test")?;
    let bundle = spiffe::JwtBundle::from_jwt_authorities(td, jwks.as_bytes())?;
    let mut set = spiffe::JwtBundleSet::new();
    set.add_bundle(bundle);
    Ok(set)
}

async fn validate_as_sealed_vault(
    sealed: &mut IdClient,
    token: &str,
    audience: &str,
) -> Result<pb::ValidateJwtSvidResponse, Status> {
    Ok(sealed
        .validate_jwt_svid(pb::ValidateJwtSvidRequest {
            token: token.into(),
            audience: audience.into(),
        })
        .await?
        .into_inner())
}

// ---------------------------------------------------------------------------
// 1. Enrollment

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_enroll_workers_and_refused_tokens_issue_nothing() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = identity_as(&mesh, "admin/operator")?;
    let mut audit = AuditLog::new(&mesh)?;

    // A token that will have expired by the time it is tried.
    let (expired, _) = create_token(&mut op, "acme", "", 1, 1).await?;
    let expired_at = Instant::now() + Duration::from_millis(1500);

    let (token, meta) = create_token(&mut op, "acme", "", 3600, 1).await?;
    assert_eq!(
        (meta.tenant.as_str(), meta.pool.as_str()),
        ("acme", ""),
        "{meta:?}"
    );
    assert_eq!((meta.max_uses, meta.uses), (1, 0));
    assert_eq!(meta.created_by, format!("{TD}/admin/operator"));
    let exp = meta.expires_at.as_ref().context("expires_at")?.seconds;
    assert!(
        (exp - now_secs() - 3600).abs() <= 10,
        "ttl 1h, expires at {exp}"
    );
    assert!(
        token.len() <= 256 && token.bytes().all(|b| b.is_ascii_graphic()),
        "printable ascii"
    );

    // Shown once: listing gives the metadata, never the secret.
    let listed = op
        .list_join_tokens(pb::ListJoinTokensRequest {
            include_inactive: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(
        listed
            .join_tokens
            .iter()
            .any(|t| t.token_id == meta.token_id),
        "the token is listed"
    );
    let secret_tail = &token[token.len() - 32..];
    let wire = listed.encode_to_vec();
    assert!(
        !wire
            .windows(secret_tail.len())
            .any(|w| w == secret_tail.as_bytes()),
        "ListJoinTokens reveals the token secret"
    );

    // A worker with no certificate enrolls with it.
    let (enrolled, key) = enroll(&mesh, &token, "host-a").await??;
    let worker_id = enrolled.worker_id.clone();
    assert!(
        (1..=64).contains(&worker_id.len())
            && worker_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "worker id {worker_id:?}"
    );
    assert_eq!(
        (enrolled.tenant.as_str(), enrolled.pool.as_str()),
        ("acme", "")
    );
    let svid = enrolled.svid.context("no svid")?;
    let want = format!("{TD}/tenant/acme/worker/{worker_id}");
    assert_eq!(svid.spiffe_id, want);
    assert_eq!(spiffe_crate_accepts(&svid, &key)?, want);
    assert_eq!(
        Some(leaf_not_after(&svid)?),
        svid.expires_at.as_ref().map(|t| t.seconds),
        "expires_at is the leaf's notAfter"
    );

    // Its chain verifies against the trust bundle: the worker renews over mTLS
    // with it, for a new key, and keeps its ID.
    let mut as_worker = identity_with(&mesh, &holder_identity(&svid, &key)?)?;
    let key2 = p256()?;
    let renewed = as_worker
        .renew_worker_svid(pb::RenewWorkerSvidRequest {
            csr_der: csr(&key2)?.into(),
        })
        .await?
        .into_inner()
        .svid
        .context("no renewed svid")?;
    assert_eq!(renewed.spiffe_id, want);
    assert_ne!(renewed.serial, svid.serial);
    assert_eq!(spiffe_crate_accepts(&renewed, &key2)?, want);
    // The renewed certificate is for the new key: a handshake proves possession.
    identity_with(&mesh, &holder_identity(&renewed, &key2)?)?
        .get_trust_bundle(pb::GetTrustBundleRequest::default())
        .await
        .context("calling with the renewed svid")?;

    let enrolled_events = audit.of_type("worker.enrolled").await?;
    assert_eq!(enrolled_events.len(), 1, "{enrolled_events:?}");
    assert_eq!(attr(&enrolled_events[0], "worker_id"), worker_id);
    assert_eq!(attr(&enrolled_events[0], "spiffe_id"), want);
    assert_eq!(enrolled_events[0].tenant, "acme");

    // Refused tokens: UNAUTHENTICATED, all alike, and nothing issued.
    let (revoked, revoked_meta) = create_token(&mut op, "acme", "", 3600, 5).await?;
    let r = op
        .revoke_join_token(pb::RevokeJoinTokenRequest {
            token_id: revoked_meta.token_id.clone(),
            reason: "host decommissioned".into(),
        })
        .await?
        .into_inner();
    assert!(r.join_token.context("revoked token")?.revoked_at.is_some());
    tokio::time::sleep_until(expired_at).await;
    let forged = format!("bhjt_{}.{}", meta.token_id, "0".repeat(64));
    let mut messages = BTreeSet::new();
    for (what, tok) in [
        ("the token's second use", token.as_str()),
        ("an expired token", expired.as_str()),
        ("a revoked token", revoked.as_str()),
        ("a garbage token", "garbage"),
        ("a well-formed unknown token", "bhjt_0011223344556677.00"),
        ("a known id with a wrong secret", forged.as_str()),
    ] {
        let err = refused(
            enroll(&mesh, tok, "host-b").await?,
            Code::Unauthenticated,
            what,
        );
        messages.insert(err.message().to_owned());
    }
    assert_eq!(
        messages.len(),
        1,
        "the refusal does not say which check failed: {messages:?}"
    );
    assert_eq!(
        audit.of_type("worker.enrolled").await?.len(),
        1,
        "a refused enrollment was recorded as an enrollment"
    );
    let all = op
        .list_join_tokens(pb::ListJoinTokensRequest {
            include_inactive: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .join_tokens;
    let uses = |id: &str| all.iter().find(|t| t.token_id == id).map(|t| t.uses);
    assert_eq!(uses(&meta.token_id), Some(1), "used once");
    assert_eq!(uses(&revoked_meta.token_id), Some(0), "revoked: never used");
    let active = op
        .list_join_tokens(pb::ListJoinTokensRequest::default())
        .await?
        .into_inner()
        .join_tokens;
    assert!(
        active
            .iter()
            .all(|t| t.token_id != meta.token_id && t.token_id != revoked_meta.token_id),
        "used-up and revoked tokens are not active: {active:?}"
    );

    // A pool token enrolls an org-global worker.
    let (pool_token, pool_meta) = create_token(&mut op, "", "gpu", 3600, 1).await?;
    assert_eq!(
        (pool_meta.tenant.as_str(), pool_meta.pool.as_str()),
        ("", "gpu")
    );
    let (pw, pkey) = enroll(&mesh, &pool_token, "gpu-host").await??;
    assert_eq!((pw.tenant.as_str(), pw.pool.as_str()), ("", "gpu"));
    let psvid = pw.svid.context("no svid")?;
    let pwant = format!("{TD}/pool/gpu/worker/{}", pw.worker_id);
    assert_eq!(psvid.spiffe_id, pwant);
    assert_eq!(spiffe_crate_accepts(&psvid, &pkey)?, pwant);
    let enrolled_events = audit.of_type("worker.enrolled").await?;
    assert_eq!(enrolled_events.len(), 2, "{enrolled_events:?}");
    assert_eq!(attr(&enrolled_events[1], "spiffe_id"), pwant);
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Run identities

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_svids_are_short_lived_conformant_and_bad_csrs_issue_nothing() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut dispatcher = identity_as(&mesh, "service/dispatcher")?;
    let mut op = identity_as(&mesh, "admin/operator")?;
    let mut audit = AuditLog::new(&mesh)?;

    let key = p256()?;
    let asked_at = now_secs();
    let svid = mint_run_csr(
        &mut dispatcher,
        "acme",
        "run-1",
        "w1",
        csr(&key)?,
        Some(secs(2 * 3600)),
    )
    .await?;
    let want = format!("{TD}/tenant/acme/run/run-1");
    assert_eq!(svid.spiffe_id, want);
    let exp = svid.expires_at.as_ref().context("expires_at")?.seconds;
    assert!(
        exp <= asked_at + 15 * 60 + 5,
        "2h asked, capped at 15 min: expires {}s after the request",
        exp - asked_at
    );
    assert!(exp >= asked_at + 14 * 60, "capped, not cut further");
    assert_eq!(leaf_not_after(&svid)?, exp, "expires_at is the leaf's");
    assert!(
        (1..=4).contains(&svid.cert_chain_der.len()),
        "{}",
        svid.cert_chain_der.len()
    );
    assert_eq!(spiffe_crate_accepts(&svid, &key)?, want);
    // The certificate is for the key the holder kept: the run completes an
    // mTLS handshake with it.
    identity_with(&mesh, &holder_identity(&svid, &key)?)?
        .get_trust_bundle(pb::GetTrustBundleRequest::default())
        .await
        .context("calling as the run")?;

    // CSRs identity must not sign.
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?;
    let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let p = p256()?;
    let dns = CertificateParams::new(vec!["evil.example".to_owned()])?;
    let mut uri = CertificateParams::default();
    uri.subject_alt_names = vec![SanType::URI(
        "spiffe://bulkhead.test/service/identity".try_into()?,
    )];
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("a P-384 key", csr(&p384)?),
        ("an Ed25519 key", csr(&ed25519)?),
        ("a DNS SAN", csr_with(dns, &p)?),
        ("another identity's URI SAN", csr_with(uri, &p)?),
        ("a CA certificate", csr_with(ca, &p)?),
        ("garbage bytes", b"garbage".to_vec()),
        ("no CSR", Vec::new()),
    ];
    let mut bad_runs = Vec::new();
    for (i, (what, der)) in bad.into_iter().enumerate() {
        let run = format!("bad-{i}");
        let err = refused(
            mint_run_csr(&mut dispatcher, "acme", &run, "w1", der, Some(secs(600))).await,
            Code::InvalidArgument,
            what,
        );
        assert!(
            err.message().contains("csr_der"),
            "{what}: names the field: {}",
            err.message()
        );
        bad_runs.push(run);
    }
    // Nothing issued: no mint in audit, and identity knows no SVID of those runs.
    let minted: Vec<String> = audit
        .of_type("identity.run_minted")
        .await?
        .into_iter()
        .map(|e| e.run_id)
        .collect();
    assert_eq!(minted, vec!["run-1".to_owned()]);
    for run in &bad_runs {
        refused(
            op.revoke(revoke_run("acme", run, false)).await,
            Code::NotFound,
            &format!("{run} has no svid to revoke"),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Refusals

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_permission_denied_audited_and_issue_nothing() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = identity_as(&mesh, "admin/operator")?;
    let mut dispatcher = identity_as(&mesh, "service/dispatcher")?;
    let mut audit = AuditLog::new(&mesh)?;

    // A worker (a real enrolled one) asks for a run SVID.
    let (token, _) = create_token(&mut op, "acme", "", 3600, 1).await?;
    let (enrolled, wkey) = enroll(&mesh, &token, "host-a").await??;
    let wsvid = enrolled.svid.context("svid")?;
    let mut worker = identity_with(&mesh, &holder_identity(&wsvid, &wkey)?)?;
    let err = refused(
        mint_run_csr(
            &mut worker,
            "acme",
            "by-worker",
            &enrolled.worker_id,
            csr(&p256()?)?,
            None,
        )
        .await,
        Code::PermissionDenied,
        "a worker minting a run svid",
    );
    assert!(!err.message().is_empty());

    // A tenant client of acme asks for a run of globex.
    let client_id = format!("{TD}/tenant/acme/client/api");
    let mut acme_client = identity_as(&mesh, "tenant/acme/client/api")?;
    refused(
        mint_run_csr(
            &mut acme_client,
            "globex",
            "by-client",
            "w1",
            csr(&p256()?)?,
            None,
        )
        .await,
        Code::PermissionDenied,
        "a tenant client minting another tenant's run",
    );

    // A run asks for a JWT-SVID in another run's name.
    let (a, akey) = mint_run(&mut dispatcher, "acme", "run-a", "w1").await?;
    let (b, _) = mint_run(&mut dispatcher, "acme", "run-b", "w2").await?;
    let mut run_a = identity_with(&mesh, &holder_identity(&a, &akey)?)?;
    refused(
        run_a
            .mint_jwt_svid(pb::MintJwtSvidRequest {
                audience: SEALED_VAULT.into(),
                ttl: None,
                spiffe_id: b.spiffe_id.clone(),
            })
            .await,
        Code::PermissionDenied,
        "a run minting a jwt in another run's name",
    );

    // Each refusal is in audit: who, which method, why.
    for (caller, method) in [
        (wsvid.spiffe_id.as_str(), "MintRunSvid"),
        (client_id.as_str(), "MintRunSvid"),
        (a.spiffe_id.as_str(), "MintJwtSvid"),
    ] {
        let e = audit
            .wait_for(&format!("{caller} refused {method}"), |e| {
                e.r#type == "identity.access_denied"
                    && attr(e, "caller") == caller
                    && attr(e, "method").ends_with(method)
            })
            .await?;
        assert_eq!(e.outcome, audit_pb::Outcome::Denied as i32, "{e:?}");
        assert!(!attr(&e, "reason").is_empty(), "{e:?}");
        assert_eq!(e.actor, format!("{TD}/service/identity"));
    }
    // Nothing issued.
    let events = audit.events().await?;
    let minted: BTreeSet<&str> = events
        .iter()
        .filter(|e| e.r#type == "identity.run_minted")
        .map(|e| e.run_id.as_str())
        .collect();
    assert_eq!(minted, BTreeSet::from(["run-a", "run-b"]));
    assert!(
        !events.iter().any(|e| e.r#type == "identity.jwt_minted"),
        "a refused jwt was recorded as minted"
    );
    refused(
        op.revoke(revoke_run("acme", "by-worker", false)).await,
        Code::NotFound,
        "the worker's run has no svid",
    );

    // Positive control: the same run in its own name gets a token.
    let own = run_a
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            audience: SEALED_VAULT.into(),
            ttl: None,
            spiffe_id: a.spiffe_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(own.spiffe_id, a.spiffe_id);
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. JWT-SVIDs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_validate_with_identity_and_the_spiffe_crate() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut dispatcher = identity_as(&mesh, "service/dispatcher")?;
    let mut sealed = identity_as(&mesh, "service/sealed-vault")?;
    let mut op = identity_as(&mesh, "admin/operator")?;
    let mut audit = AuditLog::new(&mesh)?;

    let (svid, key) = mint_run(&mut dispatcher, "acme", "run-1", "w1").await?;
    let mut run = identity_with(&mesh, &holder_identity(&svid, &key)?)?;
    let asked_at = now_secs();
    let minted = run
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            audience: SEALED_VAULT.into(),
            ttl: Some(secs(3600)),
            spiffe_id: String::new(),
        })
        .await?
        .into_inner();
    let token = minted.token.clone();
    assert_eq!(minted.spiffe_id, svid.spiffe_id);

    // The token's shape, read raw.
    let header = jwt_json(&token, 0)?;
    assert_eq!(header["alg"], "ES256", "{header}");
    let kid = header["kid"].as_str().context("header has no kid")?;
    assert!(!kid.is_empty());
    let claims = jwt_json(&token, 1)?;
    assert_eq!(claims["sub"], svid.spiffe_id.as_str(), "{claims}");
    let aud: Vec<&str> = match &claims["aud"] {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(v) => v.iter().filter_map(|a| a.as_str()).collect(),
        other => panic!("aud is {other}"),
    };
    assert_eq!(aud, vec![SEALED_VAULT], "exactly one audience");
    let exp = claims["exp"].as_i64().context("exp")?;
    assert!(
        exp <= asked_at + 5 * 60 + 5,
        "1h asked, at most 5 min: exp is {}s away",
        exp - asked_at
    );
    assert!(exp > now_secs());
    assert_eq!(
        minted.expires_at.as_ref().map(|t| t.seconds),
        Some(exp),
        "expires_at is the token's exp"
    );

    // Identity validates it for sealed-vault.
    let v = validate_as_sealed_vault(&mut sealed, &token, SEALED_VAULT).await?;
    assert_eq!(v.spiffe_id, svid.spiffe_id);
    assert_eq!(v.expires_at.as_ref().map(|t| t.seconds), Some(exp));
    let vclaims: serde_json::Value = serde_json::from_str(&v.claims_json)?;
    assert_eq!(vclaims["sub"], svid.spiffe_id.as_str());

    // So does the spiffe crate, offline, with the JWKS of the trust bundle.
    let bundle = run
        .get_trust_bundle(pb::GetTrustBundleRequest::default())
        .await?
        .into_inner();
    let jwks = spiffe_jwt_bundle(&bundle.jwt_authorities_jwks)?;
    let checked = spiffe::JwtSvid::parse_and_validate(&token, &jwks, &[SEALED_VAULT])
        .context("the spiffe crate refuses the jwt-svid")?;
    assert_eq!(checked.spiffe_id().to_string(), svid.spiffe_id);
    assert_eq!(checked.audience(), [SEALED_VAULT.to_owned()]);
    assert_eq!(checked.key_id(), kid);
    // The crate does check: a foreign audience fails there too.
    let dispatcher_aud = format!("{TD}/service/dispatcher");
    assert!(
        spiffe::JwtSvid::parse_and_validate(&token, &jwks, &[dispatcher_aud.as_str()]).is_err()
    );

    // Refusals: a foreign audience, a tampered token, alg none.
    refused(
        validate_as_sealed_vault(&mut sealed, &token, &dispatcher_aud).await,
        Code::Unauthenticated,
        "a foreign audience",
    );
    let parts: Vec<&str> = token.split('.').collect();
    let mut forged_claims = claims.clone();
    forged_claims["sub"] = serde_json::Value::from(format!("{TD}/tenant/acme/run/run-other"));
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        B64.encode(serde_json::to_vec(&forged_claims)?),
        parts[2]
    );
    refused(
        validate_as_sealed_vault(&mut sealed, &tampered, SEALED_VAULT).await,
        Code::Unauthenticated,
        "a tampered token",
    );
    assert!(spiffe::JwtSvid::parse_and_validate(&tampered, &jwks, &[SEALED_VAULT]).is_err());
    let none = format!(
        "{}.{}.",
        B64.encode(format!(r#"{{"alg":"none","kid":"{kid}"}}"#)),
        parts[1]
    );
    refused(
        validate_as_sealed_vault(&mut sealed, &none, SEALED_VAULT).await,
        Code::Unauthenticated,
        "alg none",
    );

    let jwt_events = audit.of_type("identity.jwt_minted").await?;
    assert_eq!(jwt_events.len(), 1, "{jwt_events:?}");
    assert_eq!(attr(&jwt_events[0], "spiffe_id"), svid.spiffe_id);
    assert_eq!(attr(&jwt_events[0], "audience"), SEALED_VAULT);
    assert_eq!(jwt_events[0].run_id, "run-1");

    // Once the run is revoked, its token no longer validates and it gets no more.
    op.revoke(revoke_run("acme", "run-1", false)).await?;
    refused(
        validate_as_sealed_vault(&mut sealed, &token, SEALED_VAULT).await,
        Code::Unauthenticated,
        "the token of a revoked run",
    );
    refused(
        run.mint_jwt_svid(pb::MintJwtSvidRequest {
            audience: SEALED_VAULT.into(),
            ..Default::default()
        })
        .await,
        Code::Unauthenticated,
        "a revoked run minting a jwt",
    );
    assert_eq!(audit.of_type("identity.jwt_minted").await?.len(), 1);
    Ok(())
}

/// The proto promises that a JWT-SVID never outlives the run's X.509-SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_svid_never_outlives_its_run_svid() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut dispatcher = identity_as(&mesh, "service/dispatcher")?;
    let key = p256()?;
    // The shortest run SVID there is: one minute.
    let svid = mint_run_csr(
        &mut dispatcher,
        "acme",
        "run-short",
        "w1",
        csr(&key)?,
        Some(secs(60)),
    )
    .await?;
    let svid_exp = svid.expires_at.as_ref().context("expires_at")?.seconds;
    let minted = identity_with(&mesh, &holder_identity(&svid, &key)?)?
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            audience: SEALED_VAULT.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let exp = jwt_json(&minted.token, 1)?["exp"].as_i64().context("exp")?;
    assert!(
        exp <= svid_exp,
        "the jwt-svid expires {}s after the run's x509-svid (jwt exp {exp}, svid notAfter {svid_exp})",
        exp - svid_exp
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. Revocation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_run_is_refused_by_the_audit_service_within_a_second() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut dispatcher = identity_as(&mesh, "service/dispatcher")?;
    let mut op = identity_as(&mesh, "admin/operator")?;
    let mut audit = AuditLog::new(&mesh)?;
    let checkpoint = audit_pb::GetCheckpointRequest::default;

    // The audit service must be following the list before the clock starts:
    // right after the mesh starts, its watch may still be in its reconnect
    // backoff. A first revocation, seen to take effect, proves it follows.
    let (warm, warm_key) = mint_run(&mut dispatcher, "acme", "run-warm", "w0").await?;
    let mut warm_audit = audit_with(&mesh, &holder_identity(&warm, &warm_key)?)?;
    warm_audit.get_checkpoint(checkpoint()).await?;
    op.revoke(revoke_run("acme", "run-warm", true)).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while warm_audit.get_checkpoint(checkpoint()).await.is_ok() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the audit service never saw a revocation\n{}",
            mesh.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (svid, key) = mint_run(&mut dispatcher, "acme", "run-1", "w1").await?;
    let (other, other_key) = mint_run(&mut dispatcher, "acme", "run-2", "w1").await?;
    let run_identity = holder_identity(&svid, &key)?;
    let mut as_run = audit_with(&mesh, &run_identity)?;
    as_run
        .get_checkpoint(checkpoint())
        .await
        .context("the run calls audit before it is revoked")?;

    let resp = op
        .revoke(revoke_run("acme", "run-1", true))
        .await?
        .into_inner();
    let revoked_at = Instant::now();
    let entry = resp.revocation.context("no entry")?;
    assert_eq!(entry.spiffe_id, svid.spiffe_id);
    assert!(entry.hard);
    assert_eq!(entry.revoked_by, format!("{TD}/admin/operator"));
    assert_eq!(entry.sequence, resp.sequence);
    assert_eq!(
        entry.expires_at.as_ref().map(|t| t.seconds),
        svid.expires_at.as_ref().map(|t| t.seconds),
        "the entry leaves the list when the run svid expires"
    );

    // Same channel, same connection: refused within 1 s.
    let refusal = loop {
        match as_run.get_checkpoint(checkpoint()).await {
            Err(s) => break s,
            Ok(_) => {
                anyhow::ensure!(
                    revoked_at.elapsed() <= Duration::from_secs(1),
                    "the audit service still served the revoked run after {:?}\n{}",
                    revoked_at.elapsed(),
                    mesh.logs()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let took = revoked_at.elapsed();
    assert_eq!(refusal.code(), Code::Unauthenticated, "{refusal:?}");
    assert!(took <= Duration::from_secs(1), "refused after {took:?}");
    eprintln!("revocation took effect at the audit service after {took:?}");

    // A fresh connection with the revoked SVID is refused at the handshake;
    // one with another run's SVID is not.
    let fresh = audit_with(&mesh, &run_identity)?
        .get_checkpoint(checkpoint())
        .await;
    assert!(
        fresh.is_err(),
        "a new connection of a revoked run was served"
    );
    audit_with(&mesh, &holder_identity(&other, &other_key)?)?
        .get_checkpoint(checkpoint())
        .await
        .context("another run of the same tenant is unaffected")?;
    let log = mesh
        .mesh
        .process("audit")
        .context("audit process")?
        .log_tail(200);
    assert!(
        log.lines()
            .any(|l| l.contains("peer certificate is revoked")
                && l.contains(svid.spiffe_id.as_str())),
        "the audit service refused the handshake for revocation:\n{log}"
    );

    let e = audit
        .wait_for("identity.revoked of run-1", |e| {
            e.r#type == "identity.revoked" && e.run_id == "run-1"
        })
        .await?;
    assert_eq!(attr(&e, "hard"), "true");
    assert_eq!(attr(&e, "spiffe_id"), svid.spiffe_id);
    assert_eq!(attr(&e, "by"), format!("{TD}/admin/operator"));
    Ok(())
}

async fn next_watch(
    stream: &mut tonic::Streaming<pb::WatchRevocationsResponse>,
) -> anyhow::Result<pb::WatchRevocationsResponse> {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .context("no watch message within 5 s")??
        .context("the watch stream ended")
}

fn run_ids(entries: &[pb::Revocation]) -> Vec<&str> {
    entries
        .iter()
        .filter_map(|r| match &r.target {
            Some(pb::revocation::Target::RunId(id)) => Some(id.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_revocations_starts_with_a_snapshot_and_resumes_from_a_sequence() -> anyhow::Result<()>
{
    use pb::watch_revocations_response::Update;
    let mesh = TestMesh::start().await?;
    let mut dispatcher = identity_as(&mesh, "service/dispatcher")?;
    let mut op = identity_as(&mesh, "admin/operator")?;
    for run in ["run-a", "run-b", "run-c"] {
        mint_run(&mut dispatcher, "acme", run, "w1").await?;
    }
    let seq_a = op
        .revoke(revoke_run("acme", "run-a", false))
        .await?
        .into_inner()
        .sequence;

    let mut watch = op
        .watch_revocations(pb::WatchRevocationsRequest { from_sequence: 0 })
        .await?
        .into_inner();
    let first = next_watch(&mut watch).await?;
    let Some(Update::Snapshot(snapshot)) = &first.update else {
        anyhow::bail!("the first message is not a snapshot: {first:?}");
    };
    assert_eq!(run_ids(&snapshot.revocations), vec!["run-a"]);
    assert_eq!(first.sequence, seq_a);

    let seq_b = op
        .revoke(revoke_run("acme", "run-b", true))
        .await?
        .into_inner()
        .sequence;
    assert!(seq_b > seq_a);
    let delta = next_watch(&mut watch).await?;
    let Some(Update::Delta(d)) = &delta.update else {
        anyhow::bail!("expected a delta: {delta:?}");
    };
    assert_eq!(run_ids(&d.added), vec!["run-b"]);
    assert!(d.added[0].hard);
    assert_eq!(d.added[0].spiffe_id, format!("{TD}/tenant/acme/run/run-b"));
    assert_eq!(delta.sequence, seq_b);
    drop(watch);

    // A change while disconnected, then a resume from the last sequence seen:
    // only the newer change arrives.
    let seq_c = op
        .revoke(revoke_run("acme", "run-c", false))
        .await?
        .into_inner()
        .sequence;
    let mut resumed = op
        .watch_revocations(pb::WatchRevocationsRequest {
            from_sequence: delta.sequence,
        })
        .await?
        .into_inner();
    let m = next_watch(&mut resumed).await?;
    let Some(Update::Delta(d)) = &m.update else {
        anyhow::bail!("a resumed watch restarted from a snapshot: {m:?}");
    };
    assert_eq!(run_ids(&d.added), vec!["run-c"], "{m:?}");
    assert!(d.removed.is_empty());
    assert_eq!(m.sequence, seq_c);

    // From scratch again: the whole list.
    let mut again = op
        .watch_revocations(pb::WatchRevocationsRequest { from_sequence: 0 })
        .await?
        .into_inner();
    let m = next_watch(&mut again).await?;
    let Some(Update::Snapshot(s)) = &m.update else {
        anyhow::bail!("expected a snapshot: {m:?}");
    };
    assert_eq!(run_ids(&s.revocations), vec!["run-a", "run-b", "run-c"]);
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. Audit stopped

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_fails_closed_while_audit_is_down_and_resumes_after() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    let mut dispatcher = identity_as(&mesh, "service/dispatcher")?;
    let mut op = identity_as(&mesh, "admin/operator")?;
    let (run, run_key) = mint_run(&mut dispatcher, "acme", "run-before", "w1").await?;
    let mut as_run = identity_with(&mesh, &holder_identity(&run, &run_key)?)?;
    let (token, meta) = create_token(&mut op, "acme", "", 3600, 1).await?;
    let tokens_before = op
        .list_join_tokens(pb::ListJoinTokensRequest {
            include_inactive: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .join_tokens
        .len();

    mesh.mesh
        .process_mut("audit")
        .context("audit process")?
        .stop()
        .await;

    refused(
        mint_run_csr(
            &mut dispatcher,
            "acme",
            "run-down",
            "w1",
            csr(&p256()?)?,
            None,
        )
        .await,
        Code::Unavailable,
        "MintRunSvid without audit",
    );
    refused(
        op.create_join_token(pb::CreateJoinTokenRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await,
        Code::Unavailable,
        "CreateJoinToken without audit",
    );
    refused(
        enroll(&mesh, &token, "host-down").await?,
        Code::Unavailable,
        "EnrollWorker without audit",
    );
    refused(
        as_run
            .mint_jwt_svid(pb::MintJwtSvidRequest {
                audience: SEALED_VAULT.into(),
                ..Default::default()
            })
            .await,
        Code::Unavailable,
        "MintJwtSvid without audit",
    );

    // Nothing was issued: identity holds no SVID of the run, no new token, and
    // the token's use was given back.
    refused(
        op.revoke(revoke_run("acme", "run-down", false)).await,
        Code::NotFound,
        "run-down has no svid",
    );
    let tokens = op
        .list_join_tokens(pb::ListJoinTokensRequest {
            include_inactive: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .join_tokens;
    assert_eq!(
        tokens.len(),
        tokens_before,
        "a token was stored: {tokens:?}"
    );
    let t = tokens
        .iter()
        .find(|t| t.token_id == meta.token_id)
        .context("token")?;
    assert_eq!(t.uses, 0, "a failed enrollment used the token");

    mesh.mesh.restart("audit").await?;

    // Identity reconnects to audit and issues again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (svid, _) = loop {
        match mint_run(&mut dispatcher, "acme", "run-after", "w1").await {
            Ok(v) => break v,
            Err(e) => {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "minting did not resume within 10 s of audit's return: {e:#}\n{}",
                    mesh.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(svid.spiffe_id, format!("{TD}/tenant/acme/run/run-after"));
    let (enrolled, _) = enroll(&mesh, &token, "host-after").await??;
    assert!(enrolled.svid.is_some());
    create_token(&mut op, "acme", "", 3600, 1).await?;
    as_run
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            audience: SEALED_VAULT.into(),
            ..Default::default()
        })
        .await?;

    let mut audit = AuditLog::new(&mesh)?;
    let minted: Vec<String> = audit
        .of_type("identity.run_minted")
        .await?
        .into_iter()
        .map(|e| e.run_id)
        .collect();
    assert_eq!(minted, vec!["run-before", "run-after"]);
    assert_eq!(audit.of_type("worker.enrolled").await?.len(), 1);
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. The trust bundle

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_bundle_is_public_and_is_the_mesh_ca() -> anyhow::Result<()> {
    use rustls_pki_types::pem::PemObject as _;
    let mesh = TestMesh::start().await?;
    let mut anon = identity_anonymous(&mesh)?;
    let bundle = anon
        .get_trust_bundle(pb::GetTrustBundleRequest::default())
        .await
        .context("GetTrustBundle without a client certificate")?
        .into_inner();
    assert_eq!(bundle.trust_domain, "bulkhead.test");

    let ca: Vec<Vec<u8>> = CertificateDer::pem_file_iter(mesh.dir().join("pki/ca.pem"))?
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()?;
    let authorities: Vec<Vec<u8>> = bundle
        .x509_authorities_der
        .iter()
        .map(|c| c.to_vec())
        .collect();
    assert_eq!(authorities, ca, "the x509 authorities are ca.pem");

    let jwks: serde_json::Value = serde_json::from_str(&bundle.jwt_authorities_jwks)?;
    let keys = jwks["keys"].as_array().context("jwks has no keys array")?;
    assert!(!keys.is_empty(), "{jwks}");
    for k in keys {
        assert_eq!(
            (k["kty"].as_str(), k["crv"].as_str()),
            (Some("EC"), Some("P-256")),
            "{k}"
        );
        assert_eq!(k["use"], "jwt-svid", "{k}");
        assert!(k["kid"].as_str().is_some_and(|s| !s.is_empty()), "{k}");
        for c in ["x", "y"] {
            let bytes = B64.decode(k[c].as_str().context("coordinate")?)?;
            assert_eq!(bytes.len(), 32, "{c} of {k}");
        }
    }
    // The spiffe crate reads the same set.
    let td = spiffe::TrustDomain::new("bulkhead.test")?;
    let parsed =
        spiffe::JwtBundle::from_jwt_authorities(td, bundle.jwt_authorities_jwks.as_bytes())?;
    assert_eq!(parsed.jwt_authorities().count(), keys.len());
    assert!(bundle.sequence >= 1);
    assert!(bundle.refresh_hint.is_some_and(|d| d.seconds > 0));

    // Everyone sees the same bundle.
    let mtls = identity_as(&mesh, "tenant/acme/client/api")?
        .get_trust_bundle(pb::GetTrustBundleRequest::default())
        .await?
        .into_inner();
    assert_eq!(mtls, bundle);

    // The certificate-less channel really has no certificate: nothing else is open to it.
    refused(
        anon.create_join_token(pb::CreateJoinTokenRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await,
        Code::Unauthenticated,
        "CreateJoinToken without a certificate",
    );
    refused(
        mint_run_csr(&mut anon, "acme", "anon", "w1", csr(&p256()?)?, None).await,
        Code::Unauthenticated,
        "MintRunSvid without a certificate",
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// JWT key rotation

/// Both keys verify during a rotation's overlap, then the old one leaves the
/// JWK set; the bundle sequence only grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_keys_rotate_with_an_overlap_in_which_both_verify() -> anyhow::Result<()> {
    let mesh = TestMesh::start_with(|spec| {
        let mut t = toml::Table::new();
        t.insert("jwt_key_rotation_secs".into(), toml::Value::Integer(3));
        t.insert("jwt_key_overlap_secs".into(), toml::Value::Integer(10));
        t.insert("jwt_max_ttl_secs".into(), toml::Value::Integer(10));
        spec.extra.insert("identity".into(), t);
    })
    .await?;
    let mut dispatcher = identity_as(&mesh, "service/dispatcher")?;
    let mut sealed = identity_as(&mesh, "service/sealed-vault")?;
    let (svid, key) = mint_run(&mut dispatcher, "acme", "run-1", "w1").await?;
    let mut run = identity_with(&mesh, &holder_identity(&svid, &key)?)?;
    let mint = |run: &mut IdClient| {
        let mut run = run.clone();
        async move {
            anyhow::Ok(
                run.mint_jwt_svid(pb::MintJwtSvidRequest {
                    audience: SEALED_VAULT.into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .token,
            )
        }
    };
    let bundle = |run: &mut IdClient| {
        let mut run = run.clone();
        async move {
            anyhow::Ok(
                run.get_trust_bundle(pb::GetTrustBundleRequest::default())
                    .await?
                    .into_inner(),
            )
        }
    };
    let kid_of = |t: &str| -> anyhow::Result<String> {
        Ok(jwt_json(t, 0)?["kid"].as_str().context("kid")?.to_owned())
    };
    let kids = |jwks: &str| -> anyhow::Result<BTreeSet<String>> {
        Ok(spiffe::JwtBundle::from_jwt_authorities(
            spiffe::TrustDomain::new("bulkhead.test")?,
            jwks.as_bytes(),
        )?
        .jwt_authorities()
        .map(|a| a.key_id().to_owned())
        .collect())
    };

    let first = bundle(&mut run).await?;
    let old = mint(&mut run).await?;
    let old_kid = kid_of(&old)?;

    // Wait for the next key to sign.
    let deadline = Instant::now() + Duration::from_secs(10);
    let new = loop {
        let t = mint(&mut run).await?;
        if kid_of(&t)? != old_kid {
            break t;
        }
        anyhow::ensure!(Instant::now() < deadline, "the jwt key never rotated");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let during = bundle(&mut run).await?;
    assert!(
        during.sequence > first.sequence,
        "a rotation bumps the sequence"
    );
    let set = kids(&during.jwt_authorities_jwks)?;
    assert!(
        set.contains(&old_kid) && set.contains(&kid_of(&new)?),
        "both keys are published during the overlap: {set:?}"
    );
    let jwks = spiffe_jwt_bundle(&during.jwt_authorities_jwks)?;
    for (what, t) in [("the old key's token", &old), ("the new key's token", &new)] {
        validate_as_sealed_vault(&mut sealed, t, SEALED_VAULT)
            .await
            .with_context(|| format!("{what} during the overlap"))?;
        spiffe::JwtSvid::parse_and_validate(t, &jwks, &[SEALED_VAULT])
            .with_context(|| format!("the spiffe crate on {what}"))?;
    }

    // After the overlap the old key is retired; the sequence kept growing.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = during.sequence;
    loop {
        let b = bundle(&mut run).await?;
        assert!(b.sequence >= last, "the bundle sequence went back");
        last = b.sequence;
        if !kids(&b.jwt_authorities_jwks)?.contains(&old_kid) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the old key was never retired");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    refused(
        validate_as_sealed_vault(&mut sealed, &old, SEALED_VAULT).await,
        Code::Unauthenticated,
        "a token of a retired key",
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Revoking workers, and revocations that must name a real identity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_worker_covers_its_runs_for_tenant_and_pool_workers() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = identity_as(&mesh, "admin/operator")?;
    let mut dispatcher = identity_as(&mesh, "service/dispatcher")?;
    let mut sealed = identity_as(&mesh, "service/sealed-vault")?;
    let jwt_of = |svid: &pb::X509Svid, key: &KeyPair| -> anyhow::Result<IdClient> {
        identity_with(&mesh, &holder_identity(svid, key)?)
    };
    let mint_jwt = |mut c: IdClient| async move {
        anyhow::Ok(
            c.mint_jwt_svid(pb::MintJwtSvidRequest {
                audience: SEALED_VAULT.into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .token,
        )
    };

    // A tenant worker and a run it holds.
    let (token, _) = create_token(&mut op, "acme", "", 3600, 1).await?;
    let (w, _) = enroll(&mesh, &token, "host-a").await??;
    let (run, rkey) = mint_run(&mut dispatcher, "acme", "run-t", &w.worker_id).await?;
    let jwt = mint_jwt(jwt_of(&run, &rkey)?).await?;
    validate_as_sealed_vault(&mut sealed, &jwt, SEALED_VAULT).await?;
    op.revoke(pb::RevokeRequest {
        tenant: "acme".into(),
        target: Some(pb::revoke_request::Target::WorkerId(w.worker_id.clone())),
        reason: "host compromised".into(),
        hard: true,
    })
    .await
    .context("revoking a tenant worker")?;
    refused(
        validate_as_sealed_vault(&mut sealed, &jwt, SEALED_VAULT).await,
        Code::Unauthenticated,
        "a jwt of a run of a revoked worker",
    );
    refused(
        mint_run_csr(
            &mut dispatcher,
            "acme",
            "run-t2",
            &w.worker_id,
            csr(&p256()?)?,
            None,
        )
        .await,
        Code::FailedPrecondition,
        "a new run for a revoked worker",
    );

    // The same for a worker of an org-global pool and its run.
    let (token, _) = create_token(&mut op, "", "gpu", 3600, 1).await?;
    let (pw, _) = enroll(&mesh, &token, "gpu-host").await??;
    let pkey = p256()?;
    let prun = dispatcher
        .mint_run_svid(pb::MintRunSvidRequest {
            tenant: String::new(),
            pool: "gpu".into(),
            run_id: "run-p".into(),
            csr_der: csr(&pkey)?.into(),
            ttl: None,
            worker_id: pw.worker_id.clone(),
        })
        .await?
        .into_inner()
        .svid
        .context("svid")?;
    assert_eq!(prun.spiffe_id, format!("{TD}/pool/gpu/run/run-p"));
    let pjwt = mint_jwt(jwt_of(&prun, &pkey)?).await?;
    validate_as_sealed_vault(&mut sealed, &pjwt, SEALED_VAULT).await?;
    // The API: "tenant ... empty for runs and workers of a pool".
    op.revoke(pb::RevokeRequest {
        tenant: String::new(),
        target: Some(pb::revoke_request::Target::WorkerId(pw.worker_id.clone())),
        reason: "host compromised".into(),
        hard: true,
    })
    .await
    .context("revoking a pool worker (tenant empty, as the API says)")?;
    refused(
        validate_as_sealed_vault(&mut sealed, &pjwt, SEALED_VAULT).await,
        Code::Unauthenticated,
        "a jwt of a run of a revoked pool worker",
    );
    Ok(())
}

/// A worker name the API allows (1 to 63 bytes of [a-z0-9-]) must give a
/// worker that can be given runs and revoked: ids minted by Bulkhead are at
/// most 64 bytes, which is what MintRunSvid and Revoke accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_long_legal_name_can_be_given_runs_and_revoked() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = identity_as(&mesh, "admin/operator")?;
    let mut dispatcher = identity_as(&mesh, "service/dispatcher")?;
    let name = format!("host-{}", "a".repeat(58));
    assert_eq!(name.len(), 63);
    let (token, _) = create_token(&mut op, "acme", "", 3600, 1).await?;
    let (w, _) = enroll(&mesh, &token, &name).await??;
    mint_run(&mut dispatcher, "acme", "run-1", &w.worker_id)
        .await
        .with_context(|| {
            format!(
                "a run for worker {:?} ({} bytes), enrolled under a legal name",
                w.worker_id,
                w.worker_id.len()
            )
        })?;
    op.revoke(pb::RevokeRequest {
        tenant: "acme".into(),
        target: Some(pb::revoke_request::Target::WorkerId(w.worker_id.clone())),
        reason: "decommissioned".into(),
        hard: false,
    })
    .await
    .with_context(|| format!("revoking worker {:?}", w.worker_id))?;
    Ok(())
}

/// Revoke names a run by tenant and id; a run that the named tenant does not
/// have is NOT_FOUND, not an entry for an identity that was never issued
/// while the real run stays valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_run_under_the_wrong_tenant_is_not_found() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = identity_as(&mesh, "admin/operator")?;
    let mut dispatcher = identity_as(&mesh, "service/dispatcher")?;
    mint_run(&mut dispatcher, "acme", "run-1", "w1").await?;
    let r = op.revoke(revoke_run("globex", "run-1", true)).await;
    let listed = op
        .list_revocations(pb::ListRevocationsRequest::default())
        .await?
        .into_inner()
        .revocations;
    assert!(
        matches!(&r, Err(s) if s.code() == Code::NotFound),
        "Revoke(tenant globex, run of acme) answered {:?}; the list now holds {:?}",
        r.map(|r| r.into_inner().revocation),
        listed
    );
    Ok(())
}
