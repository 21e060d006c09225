//! Sealed-vault as the mesh uses it, against the real binaries over real mTLS
//! (DESIGN.md, guarantees 1 and 4, "One run, end to end"): an operator stores
//! a tenant's secrets, the dispatcher has identity mint a run SVID, the run
//! mints a JWT-SVID for sealed-vault, and a sandbox-runner resolves the run's
//! cascade with it. Every refusal is checked for its code, its audit record
//! and for having returned no value; planted `CANARY-` values are searched
//! for everywhere they must not be, next to a positive control that proves
//! the search finds what is there.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use base64::Engine as _;
use bulkhead_mesh::client::MeshChannel;
use bulkhead_mesh::tls::Identity;
use bulkhead_proto::audit::v1 as audit_pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use bulkhead_proto::identity::v1 as id_pb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sealed::v1 as pb;
use bulkhead_proto::sealed::v1::sealed_vault_service_client::SealedVaultServiceClient;
use bulkhead_testkit::external::{Moto, OpenBao};
use bulkhead_testkit::mesh::TestMesh;
use prost::Message as _;
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tokio::time::Instant;
use tonic::{Code, Status};

type Sealed = SealedVaultServiceClient<MeshChannel>;
type IdClient = IdentityServiceClient<MeshChannel>;
type AuditClient = AuditServiceClient<MeshChannel>;

const TD: &str = "spiffe://bulkhead.test";
/// The audience of a run's JWT-SVID for sealed-vault: sealed-vault's SPIFFE ID.
const SEALED_VAULT: &str = "spiffe://bulkhead.test/service/sealed-vault";
const OPERATOR: &str = "admin/operator";
const DISPATCHER: &str = "service/dispatcher";
const RUNNER: &str = "service/sandbox-runner/host-a";
const ACME_CLIENT: &str = "tenant/acme/client/api";
const AGENT: &str = "support-bot";

// ---------------------------------------------------------------------------
// Parties

fn sealed_as(mesh: &TestMesh, who: &str) -> anyhow::Result<Sealed> {
    Ok(SealedVaultServiceClient::new(
        mesh.channel("sealed-vault", &mesh.identity(who)?)?,
    ))
}

fn identity_as(mesh: &TestMesh, who: &str) -> anyhow::Result<IdClient> {
    Ok(IdentityServiceClient::new(
        mesh.channel("identity", &mesh.identity(who)?)?,
    ))
}

fn audit_with(mesh: &TestMesh, who: &Identity) -> anyhow::Result<AuditClient> {
    Ok(AuditServiceClient::new(mesh.channel("audit", who)?))
}

/// A run of a tenant, as its worker holds it: the X.509-SVID identity minted
/// through the dispatcher, and a JWT-SVID for sealed-vault minted by the run.
struct Run {
    id: String,
    identity: Identity,
    token: String,
}

/// The dispatcher has identity sign a CSR for `tenant/<tenant>/run/<run>` (the
/// key made here, by its holder); the run then dials identity with that SVID
/// and mints a JWT-SVID whose audience is sealed-vault.
async fn start_run(mesh: &TestMesh, tenant: &str, run: &str) -> anyhow::Result<Run> {
    let mut dispatcher = identity_as(mesh, DISPATCHER)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)?
        .der()
        .to_vec();
    let svid = dispatcher
        .mint_run_svid(id_pb::MintRunSvidRequest {
            tenant: tenant.into(),
            run_id: run.into(),
            csr_der: csr.into(),
            ttl: None,
            worker_id: "w1".into(),
            pool: String::new(),
        })
        .await
        .with_context(|| format!("MintRunSvid for {tenant}/{run}"))?
        .into_inner()
        .svid
        .context("MintRunSvid answered without an svid")?;
    assert_eq!(svid.spiffe_id, format!("{TD}/tenant/{tenant}/run/{run}"));
    let chain = svid
        .cert_chain_der
        .iter()
        .map(|c| CertificateDer::from(c.to_vec()))
        .collect();
    let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let identity = Identity::from_der(chain, pkcs8, &svid.spiffe_id)?;
    let token = IdentityServiceClient::new(mesh.channel("identity", &identity)?)
        .mint_jwt_svid(id_pb::MintJwtSvidRequest {
            audience: SEALED_VAULT.into(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("MintJwtSvid as {tenant}/{run}"))?
        .into_inner()
        .token;
    Ok(Run {
        id: run.into(),
        identity,
        token,
    })
}

// ---------------------------------------------------------------------------
// Profiles, secrets and cascades

fn spec(env: &[(&str, &str)]) -> pb::ProfileSpec {
    pb::ProfileSpec {
        description: "cross-service test".into(),
        owner: "platform".into(),
        env: env
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        ..Default::default()
    }
}

async fn create_profile(
    op: &mut Sealed,
    tenant: &str,
    name: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<pb::Profile> {
    op.create_profile(pb::CreateProfileRequest {
        tenant: tenant.into(),
        name: name.into(),
        spec: Some(spec(env)),
    })
    .await
    .with_context(|| format!("CreateProfile {tenant}/{name}"))?
    .into_inner()
    .profile
    .context("CreateProfile answered without a profile")
}

fn put_request(
    tenant: &str,
    profile: &str,
    key: &str,
    source: pb::put_secret_request::Source,
) -> pb::PutSecretRequest {
    pb::PutSecretRequest {
        tenant: tenant.into(),
        profile: profile.into(),
        key: key.into(),
        source: Some(source),
    }
}

async fn put_value(
    op: &mut Sealed,
    tenant: &str,
    profile: &str,
    key: &str,
    value: &str,
) -> Result<pb::SecretKey, Status> {
    let source = pb::put_secret_request::Source::Value(value.as_bytes().to_vec().into());
    let resp = op
        .put_secret(put_request(tenant, profile, key, source))
        .await?;
    resp.into_inner()
        .secret
        .ok_or_else(|| Status::internal("PutSecret answered without a secret"))
}

async fn put_reference(
    op: &mut Sealed,
    tenant: &str,
    profile: &str,
    key: &str,
    reference: &str,
) -> Result<pb::SecretKey, Status> {
    let source = pb::put_secret_request::Source::Reference(reference.into());
    let resp = op
        .put_secret(put_request(tenant, profile, key, source))
        .await?;
    resp.into_inner()
        .secret
        .ok_or_else(|| Status::internal("PutSecret answered without a secret"))
}

async fn get_profile(op: &mut Sealed, tenant: &str, name: &str) -> anyhow::Result<pb::Profile> {
    op.get_profile(pb::GetProfileRequest {
        tenant: tenant.into(),
        name: name.into(),
    })
    .await?
    .into_inner()
    .profile
    .context("GetProfile answered without a profile")
}

fn plain(v: &str) -> pb::CascadeOverride {
    pb::CascadeOverride {
        value: Some(pb::cascade_override::Value::Plain(v.into())),
    }
}

fn reference(r: &str) -> pb::CascadeOverride {
    pb::CascadeOverride {
        value: Some(pb::cascade_override::Value::Reference(r.into())),
    }
}

/// An override with neither field set: removes the key.
fn remove() -> pb::CascadeOverride {
    pb::CascadeOverride { value: None }
}

fn level(
    profile: Option<(&str, &str)>,
    overrides: Vec<(&str, pb::CascadeOverride)>,
) -> pb::CascadeLevel {
    pb::CascadeLevel {
        profile: profile.map(|(tenant, profile)| pb::ProfileRef {
            tenant: tenant.into(),
            profile: profile.into(),
        }),
        overrides: overrides
            .into_iter()
            .map(|(k, o)| (k.to_owned(), o))
            .collect::<HashMap<_, _>>(),
    }
}

/// A cascade of one system-level profile.
fn system(tenant: &str, profile: &str) -> pb::Cascade {
    pb::Cascade {
        system: Some(level(Some((tenant, profile)), vec![])),
        ..Default::default()
    }
}

fn resolve_request(run: &Run, tenant: &str, cascade: pb::Cascade) -> pb::ResolveRequest {
    pb::ResolveRequest {
        tenant: tenant.into(),
        run_jwt_svid: run.token.clone(),
        cascade: Some(cascade),
        agent: AGENT.into(),
        tool: String::new(),
        keys: Vec::new(),
    }
}

async fn resolve(
    runner: &mut Sealed,
    req: pb::ResolveRequest,
) -> Result<pb::ResolveResponse, Status> {
    // A hung Resolve is a failure, not a wait: bound every call.
    match tokio::time::timeout(Duration::from_secs(20), runner.resolve(req)).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(
            "Resolve did not answer within 20 s",
        )),
    }
}

async fn snapshot(
    dispatcher: &mut Sealed,
    tenant: &str,
    cascade: pb::Cascade,
) -> Result<pb::SnapshotResponse, Status> {
    Ok(dispatcher
        .snapshot(pb::SnapshotRequest {
            tenant: tenant.into(),
            cascade: Some(cascade),
            agent: AGENT.into(),
        })
        .await?
        .into_inner())
}

/// The resolved secrets by key: value (as text), version, origin, profile, backend.
fn by_key(resp: &pb::ResolveResponse) -> BTreeMap<String, &pb::ResolvedSecret> {
    resp.secrets.iter().map(|s| (s.key.clone(), s)).collect()
}

fn text(s: &pb::ResolvedSecret) -> String {
    String::from_utf8_lossy(&s.value).into_owned()
}

/// One entry of a computed cascade, in comparable form.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    key: String,
    kind: pb::EntryKind,
    origin: pb::Origin,
    profile: String,
    backend: pb::SecretBackend,
    version: u64,
    revocation: pb::RevocationState,
}

fn rows(entries: &[pb::CascadeEntry]) -> Vec<Row> {
    entries
        .iter()
        .map(|e| Row {
            key: e.key.clone(),
            kind: e.kind(),
            origin: e.origin(),
            profile: e.profile.clone(),
            backend: e.backend(),
            version: e.version,
            revocation: e.revocation(),
        })
        .collect()
}

fn row(
    key: &str,
    kind: pb::EntryKind,
    origin: pb::Origin,
    profile: &str,
    backend: pb::SecretBackend,
    version: u64,
) -> Row {
    Row {
        key: key.into(),
        kind,
        origin,
        profile: profile.into(),
        backend,
        version,
        revocation: pb::RevocationState::NotRevoked,
    }
}

fn entry<'a>(resp: &'a pb::SnapshotResponse, key: &str) -> &'a pb::CascadeEntry {
    resp.entries
        .iter()
        .find(|e| e.key == key)
        .unwrap_or_else(|| panic!("no entry {key} in {resp:?}"))
}

// ---------------------------------------------------------------------------
// The audit log, read as an operator

struct AuditLog {
    client: AuditClient,
}

impl AuditLog {
    fn new(mesh: &TestMesh) -> anyhow::Result<Self> {
        Ok(Self {
            client: audit_with(mesh, &mesh.identity(OPERATOR)?)?,
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

    async fn at(&mut self, sequence: u64) -> anyhow::Result<audit_pb::Event> {
        self.events()
            .await?
            .into_iter()
            .find(|e| e.sequence == sequence)
            .with_context(|| format!("no audit event at sequence {sequence}"))
    }
}

fn attr<'a>(e: &'a audit_pb::Event, key: &str) -> &'a str {
    e.attributes.get(key).map_or("", String::as_str)
}

// ---------------------------------------------------------------------------
// Small helpers

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

fn random_hex() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A planted secret value: `CANARY-<random hex>`.
fn canary() -> String {
    format!("CANARY-{}", random_hex())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The forms a leaked value could take: itself, hex and base64 of it.
fn forms(value: &str) -> Vec<Vec<u8>> {
    let b = value.as_bytes();
    vec![
        b.to_vec(),
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
            .into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(b)
            .into_bytes(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(b)
            .into_bytes(),
    ]
}

fn leaks(haystack: &[u8], value: &str) -> bool {
    forms(value).iter().any(|f| contains(haystack, f))
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

/// The files of `files` that hold `value` (in any of its forms).
fn files_holding(files: &[PathBuf], value: &str) -> anyhow::Result<Vec<String>> {
    let mut hits = Vec::new();
    for f in files {
        // A file may vanish between listing and reading (SQLite's -shm, a
        // rotated log): what is gone holds nothing.
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        if leaks(&bytes, value) {
            hits.push(f.display().to_string());
        }
    }
    Ok(hits)
}

/// Polls `f` every 100 ms until it returns `Ok(Some)`, for at most `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: not within {} s",
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// 1. Cascade resolution

/// System profile + agent profile + run overrides: the later level wins per
/// key, an empty override removes a key, plain overrides land in `env`, and
/// every key says where it came from. Snapshot (dispatcher) and
/// PreviewCascade (operator) compute the same cascade with no value in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_takes_each_key_from_the_latest_level_and_previews_hold_no_values()
-> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut runner = sealed_as(&mesh, RUNNER)?;
    let mut dispatcher = sealed_as(&mesh, DISPATCHER)?;
    let mut audit = AuditLog::new(&mesh)?;

    let v = |label: &str| format!("{label}-{}", random_hex());
    let (api_old, api) = (v("api-v1"), v("api-v2"));
    let (db_system, db_agent) = (v("db-system"), v("db-agent"));
    let (shared, agent_token) = (v("shared"), v("agent-token"));
    let globex_api = v("globex-api");

    // System level: acme's defaults. API_KEY is rotated once (version 2).
    create_profile(
        &mut op,
        "acme",
        "base",
        &[("DEBUG", "1"), ("LOG_LEVEL", "info")],
    )
    .await?;
    let api_v1 = put_value(&mut op, "acme", "base", "API_KEY", &api_old).await?;
    let api_v2 = put_value(&mut op, "acme", "base", "API_KEY", &api).await?;
    assert_eq!((api_v1.version, api_v2.version), (1, 2), "a rotation");
    assert_eq!(api_v2.backend(), pb::SecretBackend::Builtin);
    put_value(&mut op, "acme", "base", "DB_PASSWORD", &db_system).await?;
    put_value(&mut op, "acme", "base", "SHARED_TOKEN", &shared).await?;
    // Agent level: overrides DB_PASSWORD and LOG_LEVEL, adds AGENT_TOKEN.
    create_profile(&mut op, "acme", "support-bot", &[("LOG_LEVEL", "debug")]).await?;
    let db_put = put_value(&mut op, "acme", "support-bot", "DB_PASSWORD", &db_agent).await?;
    let agent_put = put_value(&mut op, "acme", "support-bot", "AGENT_TOKEN", &agent_token).await?;
    // Another tenant with the same profile and key names.
    create_profile(&mut op, "globex", "base", &[]).await?;
    put_value(&mut op, "globex", "base", "API_KEY", &globex_api).await?;

    // Run level: remove a secret and an env key of lower levels, add a knob.
    let cascade = pb::Cascade {
        system: Some(level(Some(("acme", "base")), vec![])),
        agent: Some(level(Some(("acme", "support-bot")), vec![])),
        run: Some(level(
            None,
            vec![
                ("SHARED_TOKEN", remove()),
                ("DEBUG", remove()),
                ("MODE", plain("fast")),
            ],
        )),
    };

    let run = start_run(&mesh, "acme", "run-1").await?;
    let resp = resolve(&mut runner, resolve_request(&run, "acme", cascade.clone())).await?;
    assert_eq!(resp.run_id, run.id);
    let got = by_key(&resp);
    assert_eq!(
        resp.secrets
            .iter()
            .map(|s| s.key.as_str())
            .collect::<Vec<_>>(),
        vec!["AGENT_TOKEN", "API_KEY", "DB_PASSWORD"],
        "ordered by key, SHARED_TOKEN removed by the run level"
    );
    let summary: BTreeMap<&str, (String, u64, pb::Origin, &str, pb::SecretBackend)> = got
        .iter()
        .map(|(k, s)| {
            (
                k.as_str(),
                (
                    text(s),
                    s.version,
                    s.origin(),
                    s.profile.as_str(),
                    s.backend(),
                ),
            )
        })
        .collect();
    let builtin = pb::SecretBackend::Builtin;
    assert_eq!(
        summary,
        BTreeMap::from([
            (
                "AGENT_TOKEN",
                (
                    agent_token.clone(),
                    1,
                    pb::Origin::Agent,
                    "support-bot",
                    builtin
                )
            ),
            (
                "API_KEY",
                (api.clone(), 2, pb::Origin::System, "base", builtin)
            ),
            (
                "DB_PASSWORD",
                (
                    db_agent.clone(),
                    1,
                    pb::Origin::Agent,
                    "support-bot",
                    builtin
                )
            ),
        ])
    );
    // The fingerprints are the ones PutSecret reported for the same values.
    assert_eq!(got["API_KEY"].fingerprint, api_v2.fingerprint);
    assert_eq!(got["DB_PASSWORD"].fingerprint, db_put.fingerprint);
    assert_eq!(got["AGENT_TOKEN"].fingerprint, agent_put.fingerprint);
    assert_ne!(api_v1.fingerprint, api_v2.fingerprint);
    assert_eq!(
        resp.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<BTreeMap<_, _>>(),
        BTreeMap::from([("LOG_LEVEL", "debug"), ("MODE", "fast")]),
        "env: the agent's LOG_LEVEL wins, DEBUG removed, the run's plain MODE added"
    );
    // Nothing of what lost, or of another tenant, travels with the answer.
    let wire = resp.encode_to_vec();
    for lost in [&api_old, &db_system, &shared, &globex_api] {
        assert!(
            !contains(&wire, lost.as_bytes()),
            "Resolve carries a value that lost the cascade"
        );
    }

    // The resolution is in audit, under the run, with names and no values.
    let event = audit.at(resp.audit_sequence).await?;
    assert_eq!(event.r#type, "sealed.credential.resolved");
    assert_eq!(
        (event.tenant.as_str(), event.run_id.as_str()),
        ("acme", "run-1")
    );
    assert_eq!(event.actor, format!("{TD}/service/sealed-vault"));
    assert_eq!(event.outcome(), audit_pb::Outcome::Success);
    for key in ["AGENT_TOKEN", "API_KEY", "DB_PASSWORD"] {
        assert!(attr(&event, "keys").contains(key), "{event:?}");
    }
    assert!(!attr(&event, "keys").contains("SHARED_TOKEN"), "{event:?}");
    let recorded = event.encode_to_vec();
    for value in [&api, &db_agent, &agent_token] {
        assert!(
            !leaks(&recorded, value),
            "the audit record holds a value: {event:?}"
        );
    }

    // The dispatcher's Snapshot: the same cascade, names and origins only.
    let snap = snapshot(&mut dispatcher, "acme", cascade.clone()).await?;
    let secret = pb::EntryKind::Secret;
    let env = pb::EntryKind::Env;
    let none = pb::SecretBackend::Unspecified;
    let want = vec![
        row(
            "AGENT_TOKEN",
            secret,
            pb::Origin::Agent,
            "support-bot",
            builtin,
            1,
        ),
        row("API_KEY", secret, pb::Origin::System, "base", builtin, 2),
        row(
            "DB_PASSWORD",
            secret,
            pb::Origin::Agent,
            "support-bot",
            builtin,
            1,
        ),
        row("LOG_LEVEL", env, pb::Origin::Agent, "support-bot", none, 0),
        row("MODE", env, pb::Origin::Run, "", none, 0),
    ];
    assert_eq!(rows(&snap.entries), want, "Snapshot");
    assert!(!snap.revoked, "nothing is revoked: {snap:?}");

    // The operator's (and the tenant's own client's) preview: the same.
    let preview = op
        .preview_cascade(pb::PreviewCascadeRequest {
            tenant: "acme".into(),
            cascade: Some(cascade.clone()),
            agent: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(rows(&preview.entries), want, "PreviewCascade");
    let client_preview = sealed_as(&mesh, ACME_CLIENT)?
        .preview_cascade(pb::PreviewCascadeRequest {
            tenant: "acme".into(),
            cascade: Some(cascade.clone()),
            agent: AGENT.into(),
        })
        .await?
        .into_inner();
    assert_eq!(client_preview, preview);

    // No value byte in either, in any form.
    let (snap_wire, preview_wire) = (snap.encode_to_vec(), preview.encode_to_vec());
    for value in [&api, &api_old, &db_system, &db_agent, &shared, &agent_token] {
        assert!(!leaks(&snap_wire, value), "Snapshot carries a value");
        assert!(
            !leaks(&preview_wire, value),
            "PreviewCascade carries a value"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Tenant isolation

/// Acme's run token cannot reach globex's profiles, neither by naming globex
/// as the tenant nor through one cascade level: PERMISSION_DENIED, recorded in
/// audit as `sealed.credential.refused`, no value returned. Globex's own run
/// resolves the same profile, so the refusal is the tenant's, not a missing
/// profile's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_one_tenant_cannot_resolve_another_tenants_profiles() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut runner = sealed_as(&mesh, RUNNER)?;
    let mut audit = AuditLog::new(&mesh)?;
    let acme_value = canary();
    let (globex_value, stripe) = (canary(), canary());

    create_profile(&mut op, "acme", "base", &[]).await?;
    put_value(&mut op, "acme", "base", "API_KEY", &acme_value).await?;
    create_profile(&mut op, "globex", "base", &[]).await?;
    put_value(&mut op, "globex", "base", "API_KEY", &globex_value).await?;
    create_profile(&mut op, "globex", "finance", &[]).await?;
    put_value(&mut op, "globex", "finance", "STRIPE_KEY", &stripe).await?;

    let acme_run = start_run(&mesh, "acme", "run-a").await?;
    let globex_run = start_run(&mesh, "globex", "run-g").await?;

    // Acme's token, tenant globex.
    let as_globex = refused(
        resolve(
            &mut runner,
            resolve_request(&acme_run, "globex", system("globex", "base")),
        )
        .await,
        Code::PermissionDenied,
        "acme's run token with tenant globex",
    );
    // Acme's token, tenant acme, an agent level naming globex's profile.
    let mixed = pb::Cascade {
        system: Some(level(Some(("acme", "base")), vec![])),
        agent: Some(level(Some(("globex", "finance")), vec![])),
        run: None,
    };
    let through_level = refused(
        resolve(&mut runner, resolve_request(&acme_run, "acme", mixed)).await,
        Code::PermissionDenied,
        "acme's run token, a cascade level of globex",
    );
    // Acme's token, tenant acme, the system level globex's.
    let system_level = refused(
        resolve(
            &mut runner,
            resolve_request(&acme_run, "acme", system("globex", "base")),
        )
        .await,
        Code::PermissionDenied,
        "acme's run token, the system level globex's",
    );
    for s in [&as_globex, &through_level, &system_level] {
        let printed = format!("{s:?}");
        for value in [&acme_value, &globex_value, &stripe] {
            assert!(
                !printed.contains(value.as_str()),
                "a refusal carries a value: {printed}"
            );
        }
    }

    // All three refusals are recorded, under acme's run, as denials.
    let denied = audit.of_type("sealed.credential.refused").await?;
    assert_eq!(denied.len(), 3, "{denied:?}");
    for e in &denied {
        assert_eq!(e.run_id, "run-a", "{e:?}");
        assert_eq!(e.outcome(), audit_pb::Outcome::Denied, "{e:?}");
        assert_eq!(e.actor, format!("{TD}/service/sealed-vault"), "{e:?}");
        assert_eq!(attr(e, "caller"), format!("{TD}/{RUNNER}"), "{e:?}");
        let wire = e.encode_to_vec();
        for value in [&acme_value, &globex_value, &stripe] {
            assert!(!leaks(&wire, value), "a denial record holds a value: {e:?}");
        }
    }
    assert_eq!(
        denied.iter().map(|e| e.tenant.as_str()).collect::<Vec<_>>(),
        vec!["globex", "acme", "acme"],
        "each denial names the tenant asked for"
    );
    assert!(
        audit
            .of_type("sealed.credential.resolved")
            .await?
            .is_empty(),
        "a refused Resolve was recorded as a resolution"
    );

    // Controls: each tenant's run resolves its own profile, and only that
    // records a resolution.
    let own = resolve(
        &mut runner,
        resolve_request(&globex_run, "globex", system("globex", "base")),
    )
    .await?;
    assert_eq!(
        by_key(&own)["API_KEY"].value.as_ref(),
        globex_value.as_bytes()
    );
    let own = resolve(
        &mut runner,
        resolve_request(&acme_run, "acme", system("acme", "base")),
    )
    .await?;
    assert_eq!(
        by_key(&own)["API_KEY"].value.as_ref(),
        acme_value.as_bytes()
    );
    let resolved = audit.of_type("sealed.credential.resolved").await?;
    assert_eq!(
        resolved
            .iter()
            .map(|e| (e.tenant.as_str(), e.run_id.as_str()))
            .collect::<Vec<_>>(),
        vec![("globex", "run-g"), ("acme", "run-a")]
    );
    // Globex's run is refused acme's profile the same way.
    refused(
        resolve(
            &mut runner,
            resolve_request(&globex_run, "acme", system("acme", "base")),
        )
        .await,
        Code::PermissionDenied,
        "globex's run token with tenant acme",
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. External backends

/// One call to OpenBao's HTTP API with the root token.
async fn bao(
    http: &reqwest::Client,
    server: &OpenBao,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let response = http
        .post(format!("{}/v1/{path}", server.addr()))
        .header("X-Vault-Token", server.root_token())
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = response.status();
    let text = response.text().await?;
    ensure!(status.is_success(), "POST {path}: {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

/// One call to moto's Secrets Manager (moto routes by the Authorization
/// header's scope and does not check the signature).
async fn moto(
    http: &reqwest::Client,
    server: &Moto,
    operation: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let response = http
        .post(server.endpoint())
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/secretsmanager/aws4_request, \
             SignedHeaders=host, Signature=0000",
        )
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", format!("secretsmanager.{operation}"))
        .body(body.to_string())
        .send()
        .await
        .with_context(|| operation.to_owned())?;
    let status = response.status();
    let text = response.text().await?;
    ensure!(status.is_success(), "{operation}: {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

/// A built-in secret, an OpenBao KV v2 secret and a moto Secrets Manager
/// secret come back from one Resolve, each with its backend and version, and
/// the resolution's audit record carries the backends' request ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_and_moto_secrets_resolve_in_the_same_call_as_a_builtin_one() -> anyhow::Result<()>
{
    let Some(bao_server) = OpenBao::start().await? else {
        return Ok(());
    };
    let Some(moto_server) = Moto::start().await? else {
        return Ok(());
    };
    let http = bulkhead_testkit::external::loopback_http_client()?;
    let (builtin_value, vault_v1, vault_v2, aws_value) = (canary(), canary(), canary(), canary());
    // Two versions in OpenBao: the reference reads the latest, version 2.
    for v in [&vault_v1, &vault_v2] {
        bao(
            &http,
            &bao_server,
            "secret/data/acme/api",
            json!({ "data": { "key": v, "user": "svc" } }),
        )
        .await?;
    }
    bao(
        &http,
        &bao_server,
        "secret/data/globex/api",
        json!({ "data": { "key": canary() } }),
    )
    .await?;
    moto(
        &http,
        &moto_server,
        "CreateSecret",
        json!({
            "Name": "acme-db",
            "SecretString": json!({ "username": "app", "password": aws_value }).to_string(),
        }),
    )
    .await?;

    let backends: toml::Table = toml::from_str(&format!(
        r#"
        [backends.vault]
        address = "{vault}"
        auth = {{ method = "token", token = "{token}" }}
        tenants = {{ acme = ["secret/acme/"] }}

        [backends.aws_sm]
        region = "us-east-1"
        endpoint = "{aws}"
        credentials = {{ access_key_id = "AKIDEXAMPLE", secret_access_key = "test-secret-access-key" }}
        tenants = {{ acme = ["acme-db"] }}
        "#,
        vault = bao_server.addr(),
        token = bao_server.root_token(),
        aws = moto_server.endpoint(),
    ))?;
    let mesh = TestMesh::start_with(|spec| {
        spec.extra.insert("sealed-vault".into(), backends);
    })
    .await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut runner = sealed_as(&mesh, RUNNER)?;
    let mut audit = AuditLog::new(&mesh)?;

    create_profile(&mut op, "acme", "base", &[]).await?;
    put_value(&mut op, "acme", "base", "BUILTIN_KEY", &builtin_value).await?;
    let vault_put = put_reference(
        &mut op,
        "acme",
        "base",
        "VAULT_KEY",
        "vault://secret/acme/api#key",
    )
    .await?;
    assert_eq!(
        (
            vault_put.backend(),
            vault_put.reference.as_str(),
            vault_put.fingerprint.as_str()
        ),
        (pb::SecretBackend::Vault, "vault://secret/acme/api#key", ""),
        "a reference's value is not held, so it has no fingerprint"
    );
    let aws_put = put_reference(
        &mut op,
        "acme",
        "base",
        "AWS_DB_PASSWORD",
        "aws-sm://acme-db#password",
    )
    .await?;
    assert_eq!(
        (aws_put.backend(), aws_put.reference.as_str()),
        (
            pb::SecretBackend::AwsSecretsManager,
            "aws-sm://acme-db#password"
        )
    );
    // A reference the configuration does not allow acme is refused at PutSecret.
    refused(
        put_reference(
            &mut op,
            "acme",
            "base",
            "OTHER",
            "vault://secret/globex/api#key",
        )
        .await,
        Code::PermissionDenied,
        "acme naming globex's Vault path",
    );

    let run = start_run(&mesh, "acme", "run-1").await?;
    let resp = resolve(
        &mut runner,
        resolve_request(&run, "acme", system("acme", "base")),
    )
    .await?;
    let got = by_key(&resp);
    assert_eq!(
        got.iter()
            .map(|(k, s)| (
                k.as_str(),
                text(s),
                s.backend(),
                s.origin(),
                s.profile.as_str()
            ))
            .collect::<Vec<_>>(),
        vec![
            (
                "AWS_DB_PASSWORD",
                aws_value.clone(),
                pb::SecretBackend::AwsSecretsManager,
                pb::Origin::System,
                "base"
            ),
            (
                "BUILTIN_KEY",
                builtin_value.clone(),
                pb::SecretBackend::Builtin,
                pb::Origin::System,
                "base"
            ),
            (
                "VAULT_KEY",
                vault_v2.clone(),
                pb::SecretBackend::Vault,
                pb::Origin::System,
                "base"
            ),
        ],
        "one Resolve, three backends"
    );
    for s in &resp.secrets {
        assert_eq!(s.fingerprint.len(), 64, "{}: hex HMAC-SHA256", s.key);
    }

    // The audit record names the three keys and carries the two backends'
    // request ids (Vault's request_id is a UUID; moto sends x-amzn-RequestId).
    let event = audit.at(resp.audit_sequence).await?;
    assert_eq!(event.r#type, "sealed.credential.resolved");
    for key in ["AWS_DB_PASSWORD", "BUILTIN_KEY", "VAULT_KEY"] {
        assert!(attr(&event, "keys").contains(key), "{event:?}");
    }
    let ids: Vec<&str> = attr(&event, "backend_request_ids")
        .split(',')
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(ids.len(), 2, "one request id per backend call: {event:?}");
    assert!(
        ids.iter()
            .any(|id| id.len() == 36 && id.matches('-').count() == 4),
        "Vault's request id (a UUID) is recorded: {ids:?}"
    );
    let wire = event.encode_to_vec();
    for value in [&builtin_value, &vault_v2, &aws_value] {
        assert!(
            !leaks(&wire, value),
            "the audit record holds a value: {event:?}"
        );
    }
    // The ids are the backends' per request, not constants.
    let again = resolve(
        &mut runner,
        resolve_request(&run, "acme", system("acme", "base")),
    )
    .await?;
    let again_event = audit.at(again.audit_sequence).await?;
    let again_ids: Vec<&str> = attr(&again_event, "backend_request_ids")
        .split(',')
        .collect();
    assert!(
        ids.iter().all(|id| !again_ids.contains(id)),
        "two resolutions, same request ids: {ids:?} {again_ids:?}"
    );

    // Versions, as sealed.proto defines them. ResolvedSecret.version: "the
    // secret's version (built-in), or the backend's version when it reports
    // one (Vault KV v2); 0 otherwise". CascadeEntry.version: "a built-in
    // secret's version; 0 for references".
    let versions: BTreeMap<&str, u64> = got.iter().map(|(k, s)| (k.as_str(), s.version)).collect();
    let preview = op
        .preview_cascade(pb::PreviewCascadeRequest {
            tenant: "acme".into(),
            cascade: Some(system("acme", "base")),
            agent: String::new(),
        })
        .await?
        .into_inner();
    let entry_versions: BTreeMap<&str, u64> = preview
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.version))
        .collect();
    assert_eq!(
        (versions, entry_versions),
        (
            BTreeMap::from([("AWS_DB_PASSWORD", 0), ("BUILTIN_KEY", 1), ("VAULT_KEY", 2)]),
            BTreeMap::from([("AWS_DB_PASSWORD", 0), ("BUILTIN_KEY", 1), ("VAULT_KEY", 0)]),
        ),
        "(ResolvedSecret versions, CascadeEntry versions): Vault holds version 2 of \
         secret/acme/api; sealed-vault holds version 1 of each reference"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Revocation

/// A revoked key is refused at Resolve and reported by Snapshot. A soft
/// revocation leaves a run that already resolved the key alive; a hard one
/// revokes that run at identity (and so everywhere in the mesh); lifting makes
/// the key resolvable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_keys_are_refused_soft_lets_runs_finish_hard_revokes_them() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut runner = sealed_as(&mesh, RUNNER)?;
    let mut dispatcher = sealed_as(&mesh, DISPATCHER)?;
    let id_op = identity_as(&mesh, OPERATOR)?;
    let mut audit = AuditLog::new(&mesh)?;
    let (a, b) = (canary(), canary());
    create_profile(&mut op, "acme", "base", &[]).await?;
    put_value(&mut op, "acme", "base", "KEY_A", &a).await?;
    put_value(&mut op, "acme", "base", "KEY_B", &b).await?;
    let cascade = || system("acme", "base");
    let only = |run: &Run, key: &str| pb::ResolveRequest {
        keys: vec![key.into()],
        ..resolve_request(run, "acme", cascade())
    };
    let run_ids_revoked_at_identity = |mut c: IdClient| async move {
        anyhow::Ok(
            c.list_revocations(id_pb::ListRevocationsRequest {
                tenant: "acme".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .revocations
            .into_iter()
            .filter_map(|r| match r.target {
                Some(id_pb::revocation::Target::RunId(id)) => Some(id),
                _ => None,
            })
            .collect::<Vec<_>>(),
        )
    };

    // run-1 resolves both keys; it is then live, holding them.
    let run1 = start_run(&mesh, "acme", "run-1").await?;
    let first = resolve(&mut runner, resolve_request(&run1, "acme", cascade())).await?;
    assert_eq!(first.secrets.len(), 2);
    let mut run1_audit = audit_with(&mesh, &run1.identity)?;
    run1_audit
        .get_checkpoint(audit_pb::GetCheckpointRequest::default())
        .await
        .context("a live run reads audit's checkpoint")?;

    // Soft revocation of KEY_A.
    let soft = op
        .revoke_secret(pb::RevokeSecretRequest {
            tenant: "acme".into(),
            profile: "base".into(),
            key: "KEY_A".into(),
            hard: false,
            reason: "rotating after a scare".into(),
        })
        .await?
        .into_inner();
    assert_eq!(soft.affected_run_ids, vec!["run-1"], "run-1 resolved KEY_A");
    let soft_rev = soft.revocation.context("revocation")?;
    assert_eq!(
        (
            soft_rev.key.as_str(),
            soft_rev.hard,
            soft_rev.revoked_by.as_str()
        ),
        ("KEY_A", false, format!("{TD}/{OPERATOR}").as_str())
    );
    // Refused at Resolve, to every run, naming the key; no value returned.
    let run2 = start_run(&mesh, "acme", "run-2").await?;
    for run in [&run1, &run2] {
        let s = refused(
            resolve(&mut runner, resolve_request(run, "acme", cascade())).await,
            Code::FailedPrecondition,
            "a soft-revoked key at Resolve",
        );
        assert!(
            s.message().contains("KEY_A"),
            "the refusal names the key: {s:?}"
        );
        assert!(!format!("{s:?}").contains(&a) && !format!("{s:?}").contains(&b));
    }
    // Reported by Snapshot.
    let snap = snapshot(&mut dispatcher, "acme", cascade()).await?;
    assert!(snap.revoked, "{snap:?}");
    assert_eq!(
        entry(&snap, "KEY_A").revocation(),
        pb::RevocationState::SoftRevoked
    );
    assert_eq!(
        entry(&snap, "KEY_B").revocation(),
        pb::RevocationState::NotRevoked
    );
    // run-1 finishes: its identity is not revoked anywhere, it still reads
    // audit, and a key that is not revoked still resolves for it.
    assert!(run_ids_revoked_at_identity(id_op.clone()).await?.is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    run1_audit
        .get_checkpoint(audit_pb::GetCheckpointRequest::default())
        .await
        .context("a soft revocation refused the run at audit")?;
    let still = resolve(&mut runner, only(&run1, "KEY_B")).await?;
    assert_eq!(
        still
            .secrets
            .iter()
            .map(|s| (s.key.as_str(), text(s)))
            .collect::<Vec<_>>(),
        vec![("KEY_B", b.clone())]
    );
    // Its earlier resolution stands in audit.
    let earlier = audit.at(first.audit_sequence).await?;
    assert_eq!(
        (earlier.r#type.as_str(), earlier.run_id.as_str()),
        ("sealed.credential.resolved", "run-1")
    );

    // Lifted: KEY_A resolves again.
    let lifted = op
        .lift_revocation(pb::LiftRevocationRequest {
            tenant: "acme".into(),
            revocation_id: soft_rev.revocation_id.clone(),
            reason: "false alarm".into(),
        })
        .await?
        .into_inner()
        .revocation
        .context("revocation")?;
    assert_eq!(lifted.lifted_by, format!("{TD}/{OPERATOR}"));
    assert!(lifted.lifted_at.is_some());
    let back = resolve(&mut runner, resolve_request(&run2, "acme", cascade())).await?;
    assert_eq!(back.secrets.len(), 2);
    assert!(!snapshot(&mut dispatcher, "acme", cascade()).await?.revoked);
    refused(
        op.lift_revocation(pb::LiftRevocationRequest {
            tenant: "acme".into(),
            revocation_id: soft_rev.revocation_id.clone(),
            reason: "again".into(),
        })
        .await,
        Code::FailedPrecondition,
        "lifting a lifted revocation",
    );

    // run-3 resolves only KEY_A: it does not hold KEY_B.
    let run3 = start_run(&mesh, "acme", "run-3").await?;
    resolve(&mut runner, only(&run3, "KEY_A")).await?;
    let mut run3_audit = audit_with(&mesh, &run3.identity)?;

    // Hard revocation of KEY_B: the runs that resolved it are revoked at identity.
    let hard = op
        .revoke_secret(pb::RevokeSecretRequest {
            tenant: "acme".into(),
            profile: "base".into(),
            key: "KEY_B".into(),
            hard: true,
            reason: "leaked in a paste".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        hard.affected_run_ids,
        vec!["run-1", "run-2"],
        "the runs that resolved KEY_B"
    );
    let hard_rev = hard.revocation.context("revocation")?;
    assert!(hard_rev.hard);
    let mut revoked_runs = run_ids_revoked_at_identity(id_op.clone()).await?;
    revoked_runs.sort();
    assert_eq!(
        revoked_runs,
        vec!["run-1", "run-2"],
        "identity revoked the affected runs"
    );
    let snap = snapshot(&mut dispatcher, "acme", cascade()).await?;
    assert!(snap.revoked);
    assert_eq!(
        entry(&snap, "KEY_B").revocation(),
        pb::RevocationState::HardRevoked
    );
    // The revoked run is refused by audit (through identity's revocation
    // stream) and by sealed-vault.
    eventually(
        "audit refuses the hard-revoked run-1",
        Duration::from_secs(5),
        || {
            let mut c = run1_audit.clone();
            async move {
                match c
                    .get_checkpoint(audit_pb::GetCheckpointRequest::default())
                    .await
                {
                    Ok(_) => Ok(None),
                    Err(s) => Ok(Some(s)),
                }
            }
        },
    )
    .await
    .map(|s| assert_eq!(s.code(), Code::Unauthenticated, "{s:?}"))?;
    eventually(
        "sealed-vault refuses run-1's token",
        Duration::from_secs(5),
        || {
            let mut r = runner.clone();
            let req = only(&run1, "KEY_A");
            async move {
                match resolve(&mut r, req).await {
                    Err(s) if s.code() == Code::Unauthenticated => Ok(Some(())),
                    _ => Ok(None),
                }
            }
        },
    )
    .await?;
    // run-3 never held KEY_B: it lives on, and KEY_A still resolves for it.
    run3_audit
        .get_checkpoint(audit_pb::GetCheckpointRequest::default())
        .await
        .context("a run that did not hold the key was refused at audit")?;
    resolve(&mut runner, only(&run3, "KEY_A")).await?;
    let s = refused(
        resolve(&mut runner, only(&run3, "KEY_B")).await,
        Code::FailedPrecondition,
        "a hard-revoked key at Resolve",
    );
    assert!(s.message().contains("KEY_B"), "{s:?}");

    // Both revocations are in audit.
    let revoked = audit.of_type("sealed.secret.revoked").await?;
    assert_eq!(
        revoked
            .iter()
            .map(|e| (attr(e, "key"), attr(e, "hard")))
            .collect::<Vec<_>>(),
        vec![("KEY_A", "false"), ("KEY_B", "true")]
    );

    // Lifting the hard revocation makes KEY_B resolvable for a new run; the
    // run identities it revoked stay revoked.
    op.lift_revocation(pb::LiftRevocationRequest {
        tenant: "acme".into(),
        revocation_id: hard_rev.revocation_id.clone(),
        reason: "rotated at the source".into(),
    })
    .await?;
    let run4 = start_run(&mesh, "acme", "run-4").await?;
    let resp = resolve(&mut runner, resolve_request(&run4, "acme", cascade())).await?;
    assert_eq!(
        resp.secrets
            .iter()
            .map(|s| (s.key.as_str(), text(s)))
            .collect::<Vec<_>>(),
        vec![("KEY_A", a.clone()), ("KEY_B", b.clone())]
    );
    assert!(!snapshot(&mut dispatcher, "acme", cascade()).await?.revoked);
    refused(
        resolve(&mut runner, resolve_request(&run1, "acme", cascade())).await,
        Code::Unauthenticated,
        "run-1 after the lift",
    );
    let listed = op
        .list_revocations(pb::ListRevocationsRequest {
            tenant: "acme".into(),
            include_lifted: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .revocations;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().all(|r| !r.lifted_by.is_empty()), "{listed:?}");
    assert!(
        op.list_revocations(pb::ListRevocationsRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .revocations
        .is_empty(),
        "nothing in force"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. Audit down: fail closed

/// With audit stopped, Resolve fails with UNAVAILABLE and returns no value,
/// and PutSecret fails and stores nothing; once audit is back, Resolve works
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_audit_stopped_nothing_resolves_and_nothing_is_written() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut runner = sealed_as(&mesh, RUNNER)?;
    let (v1, v2, new_value) = (canary(), canary(), canary());
    create_profile(&mut op, "acme", "base", &[]).await?;
    put_value(&mut op, "acme", "base", "API_KEY", &v1).await?;
    let run = start_run(&mesh, "acme", "run-1").await?;
    // Resolve works (and sealed-vault holds identity's keys) before audit stops.
    let before = resolve(
        &mut runner,
        resolve_request(&run, "acme", system("acme", "base")),
    )
    .await?;
    assert_eq!(by_key(&before)["API_KEY"].value.as_ref(), v1.as_bytes());
    let profile_before = get_profile(&mut op, "acme", "base").await?;

    mesh.mesh
        .process_mut("audit")
        .context("no audit process")?
        .stop()
        .await;

    let s = refused(
        resolve(
            &mut runner,
            resolve_request(&run, "acme", system("acme", "base")),
        )
        .await,
        Code::Unavailable,
        "Resolve with audit stopped",
    );
    assert!(
        !format!("{s:?}").contains(&v1),
        "the refusal carries the value"
    );
    let s = refused(
        put_value(&mut op, "acme", "base", "API_KEY", &v2).await,
        Code::Unavailable,
        "rotating a secret with audit stopped",
    );
    assert!(!format!("{s:?}").contains(&v2));
    refused(
        put_value(&mut op, "acme", "base", "NEW_KEY", &new_value).await,
        Code::Unavailable,
        "writing a new secret with audit stopped",
    );
    // Nothing was stored: the profile is as it was.
    let profile_after = get_profile(&mut op, "acme", "base").await?;
    assert_eq!(
        (
            profile_after.revision,
            profile_after
                .secrets
                .iter()
                .map(|s| (s.name.as_str(), s.version))
                .collect::<Vec<_>>()
        ),
        (profile_before.revision, vec![("API_KEY", 1)]),
        "a PutSecret that could not be audited changed the store"
    );

    mesh.mesh.restart("audit").await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        match resolve(
            &mut runner,
            resolve_request(&run, "acme", system("acme", "base")),
        )
        .await
        {
            Ok(r) => break r,
            Err(s) => {
                ensure!(
                    Instant::now() < deadline,
                    "Resolve did not resume within 10 s of audit's return: {s:?}\n{}",
                    mesh.logs()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // The value is the one stored before: the refused rotation left no trace.
    let got = by_key(&after);
    assert_eq!(
        got.iter()
            .map(|(k, s)| (k.as_str(), text(s), s.version))
            .collect::<Vec<_>>(),
        vec![("API_KEY", v1.clone(), 1)]
    );
    let mut audit = AuditLog::new(&mesh)?;
    let written = audit.of_type("sealed.secret.written").await?;
    assert_eq!(
        written
            .iter()
            .map(|e| (attr(e, "key"), attr(e, "version")))
            .collect::<Vec<_>>(),
        vec![("API_KEY", "1")]
    );
    assert_eq!(audit.of_type("sealed.credential.resolved").await?.len(), 2);
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. Canaries

/// Canary secrets, written, rotated, resolved, revealed and refused in every
/// way a caller can provoke, never reach a service log, an error message, the
/// audit store or the sealed database in plaintext. Positive controls prove
/// that each scan finds what is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_values_appear_nowhere_but_in_resolve_and_reveal() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut runner = sealed_as(&mesh, RUNNER)?;
    let mut audit = AuditLog::new(&mesh)?;
    let canaries: Vec<String> = (0..5).map(|_| canary()).collect();
    let [api, rotated, db, globex_value, deleted] =
        <[String; 5]>::try_from(canaries.clone()).map_err(|_| anyhow::anyhow!("five canaries"))?;
    // A non-secret env value, planted the same way: it must be found.
    let env_control = format!("CONTROL-{}", random_hex());
    let run_id = format!("run-{}", &random_hex()[..12]);
    // A tenant client with a fresh name: its refusals are logged with its
    // SPIFFE ID, which the log scan must then find.
    let log_control = format!("ctl-{}", &random_hex()[..16]);

    create_profile(
        &mut op,
        "acme",
        "base",
        &[("REGION_HINT", env_control.as_str())],
    )
    .await?;
    put_value(&mut op, "acme", "base", "API_KEY", &api).await?;
    put_value(&mut op, "acme", "base", "API_KEY", &rotated).await?;
    put_value(&mut op, "acme", "base", "DB_PASSWORD", &db).await?;
    put_value(&mut op, "acme", "base", "TEMP_KEY", &deleted).await?;
    op.delete_secret(pb::DeleteSecretRequest {
        tenant: "acme".into(),
        profile: "base".into(),
        key: "TEMP_KEY".into(),
    })
    .await?;
    create_profile(&mut op, "globex", "base", &[]).await?;
    put_value(&mut op, "globex", "base", "API_KEY", &globex_value).await?;

    // Positive controls: the values are there to be had, where they belong.
    let run = start_run(&mesh, "acme", &run_id).await?;
    let resp = resolve(
        &mut runner,
        resolve_request(&run, "acme", system("acme", "base")),
    )
    .await?;
    let got = by_key(&resp);
    assert_eq!(text(got["API_KEY"]), rotated);
    assert_eq!(text(got["DB_PASSWORD"]), db);
    assert_eq!(resp.env.get("REGION_HINT"), Some(&env_control));
    let revealed = op
        .reveal_secret(pb::RevealSecretRequest {
            tenant: "acme".into(),
            profile: "base".into(),
            key: "DB_PASSWORD".into(),
            reason: "canary test".into(),
        })
        .await?
        .into_inner();
    assert_eq!(revealed.value.as_ref(), db.as_bytes());

    // Refusals, each provoked with a canary in hand.
    let mut errors: Vec<(&str, Status)> = Vec::new();
    let mut expect = |what: &'static str, r: Result<pb::SecretKey, Status>, code: Code| {
        errors.push((what, refused(r, code, what)));
    };
    let big = api.repeat(64 * 1024 / api.len() + 1);
    expect(
        "an oversized value",
        put_value(&mut op, "acme", "base", "BIG", &big).await,
        Code::InvalidArgument,
    );
    expect(
        "a value pasted as a reference",
        put_reference(&mut op, "acme", "base", "PASTED", &api).await,
        Code::InvalidArgument,
    );
    expect(
        "a value inside a reference of an unconfigured backend",
        put_reference(
            &mut op,
            "acme",
            "base",
            "PASTED",
            &format!("aws-sm://{api}"),
        )
        .await,
        Code::PermissionDenied,
    );
    expect(
        "a value for a missing profile",
        put_value(&mut op, "acme", "nope", "API_KEY", &api).await,
        Code::NotFound,
    );
    expect(
        "a secret colliding with an env key",
        put_value(&mut op, "acme", "base", "REGION_HINT", &api).await,
        Code::FailedPrecondition,
    );
    let mut tenant_op = sealed_as(&mesh, &format!("tenant/acme/client/{log_control}"))?;
    expect(
        "PutSecret by a tenant client",
        put_value(&mut tenant_op, "acme", "base", "API_KEY", &api).await,
        Code::PermissionDenied,
    );
    let mut more: Vec<(&str, Status)> = Vec::new();
    more.push((
        "a value as the run token",
        refused(
            resolve(
                &mut runner,
                pb::ResolveRequest {
                    run_jwt_svid: api.clone(),
                    ..resolve_request(&run, "acme", system("acme", "base"))
                },
            )
            .await,
            Code::Unauthenticated,
            "a value as the run token",
        ),
    ));
    let pasted = pb::Cascade {
        system: Some(level(
            Some(("acme", "base")),
            vec![("PASTED", reference(&api))],
        )),
        ..Default::default()
    };
    more.push((
        "a value as a cascade reference",
        refused(
            resolve(&mut runner, resolve_request(&run, "acme", pasted)).await,
            Code::InvalidArgument,
            "a value as a cascade reference",
        ),
    ));
    let globex_run = start_run(&mesh, "globex", "run-g").await?;
    more.push((
        "globex's run on acme's profile",
        refused(
            resolve(
                &mut runner,
                resolve_request(&globex_run, "acme", system("acme", "base")),
            )
            .await,
            Code::PermissionDenied,
            "globex's run on acme's profile",
        ),
    ));
    more.push((
        "RevealSecret by a tenant client",
        refused(
            tenant_op
                .reveal_secret(pb::RevealSecretRequest {
                    tenant: "acme".into(),
                    profile: "base".into(),
                    key: "API_KEY".into(),
                    reason: "curious".into(),
                })
                .await,
            Code::PermissionDenied,
            "RevealSecret by a tenant client",
        ),
    ));
    op.revoke_secret(pb::RevokeSecretRequest {
        tenant: "acme".into(),
        profile: "base".into(),
        key: "API_KEY".into(),
        hard: false,
        reason: "canary test".into(),
    })
    .await?;
    more.push((
        "a revoked key",
        refused(
            resolve(
                &mut runner,
                resolve_request(&run, "acme", system("acme", "base")),
            )
            .await,
            Code::FailedPrecondition,
            "a revoked key",
        ),
    ));
    errors.extend(more);
    for (what, status) in &errors {
        let printed = format!("{status:?} {}", String::from_utf8_lossy(status.details()));
        for c in &canaries {
            assert!(
                !printed.contains(c.as_str()),
                "{what}: the error carries a canary: {printed}"
            );
            assert!(
                !printed.contains(&c["CANARY-".len()..]),
                "{what}: the error carries a canary's random part: {printed}"
            );
        }
    }

    // Let SQLite and the logs reach their files.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dir = mesh.dir();
    let logs: Vec<PathBuf> = walk(&dir.join("logs"))?;
    let audit_files = walk(&dir.join("data/audit"))?;
    let sealed_db: Vec<PathBuf> = walk(&dir.join("data/sealed-vault"))?
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".db"))
        })
        .collect();
    assert!(logs.len() >= 5, "every service logs: {logs:?}");
    assert!(!audit_files.is_empty() && !sealed_db.is_empty());
    let events = audit.events().await?;
    let queried: Vec<u8> = events
        .iter()
        .flat_map(|e| format!("{e:?}").into_bytes())
        .collect();

    // Positive controls: each scan finds what is legitimately there.
    assert!(
        !files_holding(&sealed_db, &env_control)?.is_empty(),
        "the non-secret env value is in the sealed database as plaintext"
    );
    assert!(
        !files_holding(&audit_files, &run_id)?.is_empty() && contains(&queried, run_id.as_bytes()),
        "the run id is in the audit store and in a Query"
    );
    assert!(
        !files_holding(&logs, &log_control)?.is_empty(),
        "the refused tenant client's name is in a service log"
    );
    let fingerprint = &got["DB_PASSWORD"].fingerprint;
    assert!(
        contains(&queried, fingerprint.as_bytes()),
        "audit records the canary's fingerprint"
    );

    // And no canary, in any form, in any of them — nor anywhere in the mesh dir.
    let everything = walk(dir)?;
    for c in &canaries {
        assert_eq!(
            files_holding(&logs, c)?,
            Vec::<String>::new(),
            "a canary in a log"
        );
        assert_eq!(
            files_holding(&audit_files, c)?,
            Vec::<String>::new(),
            "a canary in the audit store"
        );
        assert!(!leaks(&queried, c), "a canary in an audit Query");
        assert_eq!(
            files_holding(&sealed_db, c)?,
            Vec::<String>::new(),
            "a canary in the sealed database"
        );
        assert_eq!(
            files_holding(&everything, c)?,
            Vec::<String>::new(),
            "a canary on disk"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. RevealSecret

/// An operator gets a value back, once it is audited; a tenant client cannot
/// call it; more than five in a minute is RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reveal_is_for_operators_audited_and_rate_limited() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut audit = AuditLog::new(&mesh)?;
    let value = canary();
    create_profile(&mut op, "acme", "base", &[]).await?;
    let put = put_value(&mut op, "acme", "base", "API_KEY", &value).await?;
    let reveal = |reason: &str| pb::RevealSecretRequest {
        tenant: "acme".into(),
        profile: "base".into(),
        key: "API_KEY".into(),
        reason: reason.into(),
    };

    let resp = op
        .reveal_secret(reveal("INC-1234 vendor support"))
        .await?
        .into_inner();
    assert_eq!(resp.value.as_ref(), value.as_bytes());
    let meta = resp.secret.context("secret metadata")?;
    assert_eq!((meta.name.as_str(), meta.version), ("API_KEY", 1));
    assert_eq!(meta.fingerprint, put.fingerprint);
    let revealed = audit.of_type("sealed.secret.revealed").await?;
    assert_eq!(revealed.len(), 1, "{revealed:?}");
    let e = &revealed[0];
    assert_eq!(e.tenant, "acme");
    assert_eq!(
        (
            attr(e, "profile"),
            attr(e, "key"),
            attr(e, "reason"),
            attr(e, "by")
        ),
        (
            "base",
            "API_KEY",
            "INC-1234 vendor support",
            format!("{TD}/{OPERATOR}").as_str()
        )
    );
    assert!(
        !leaks(&e.encode_to_vec(), &value),
        "the reveal record holds the value"
    );

    // Not for tenants, sandbox-runners or runs' services.
    for who in [ACME_CLIENT, RUNNER, DISPATCHER] {
        let s = refused(
            sealed_as(&mesh, who)?.reveal_secret(reveal("mine")).await,
            Code::PermissionDenied,
            &format!("RevealSecret as {who}"),
        );
        assert!(!format!("{s:?}").contains(&value));
    }

    // Four more fit in the minute (five in all); the sixth is refused.
    for i in 2..=5 {
        let r = op
            .reveal_secret(reveal(&format!("INC-1234 look {i}")))
            .await?;
        assert_eq!(r.into_inner().value.as_ref(), value.as_bytes());
    }
    let s = refused(
        op.reveal_secret(reveal("INC-1234 one more")).await,
        Code::ResourceExhausted,
        "the sixth reveal in a minute",
    );
    assert!(!format!("{s:?}").contains(&value));
    assert_eq!(
        audit.of_type("sealed.secret.revealed").await?.len(),
        5,
        "a refused reveal was recorded as a reveal"
    );
    // The limit is per operator.
    let other = sealed_as(&mesh, "admin/oncall")?
        .reveal_secret(reveal("INC-1234 second pair of eyes"))
        .await?
        .into_inner();
    assert_eq!(other.value.as_ref(), value.as_bytes());
    Ok(())
}

// ---------------------------------------------------------------------------
// 8. Export and import

/// An export (operator, streamed JSON chunks) holds no canary plaintext; an
/// import into the same, non-empty store without overwrite is refused and
/// leaves the store as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_holds_no_plaintext_and_import_does_not_overwrite_by_default()
-> anyhow::Result<()> {
    use tokio_stream::StreamExt as _;
    let mesh = TestMesh::start().await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut runner = sealed_as(&mesh, RUNNER)?;
    let canaries: Vec<String> = (0..3).map(|_| canary()).collect();
    let env_control = format!("CONTROL-{}", random_hex());
    create_profile(
        &mut op,
        "acme",
        "base",
        &[("REGION_HINT", env_control.as_str())],
    )
    .await?;
    put_value(&mut op, "acme", "base", "API_KEY", &canaries[0]).await?;
    put_value(&mut op, "acme", "base", "API_KEY", &canaries[1]).await?;
    create_profile(&mut op, "globex", "base", &[]).await?;
    put_value(&mut op, "globex", "base", "STRIPE_KEY", &canaries[2]).await?;

    let mut stream = op
        .export_store(pb::ExportStoreRequest {})
        .await?
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(msg) = stream.next().await {
        chunks.push(msg?.chunk);
    }
    ensure!(!chunks.is_empty(), "an empty export");
    let document: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let parsed: serde_json::Value =
        serde_json::from_slice(&document).context("the export is one JSON document")?;
    // Positive control: what is not secret is in it, in plaintext.
    assert!(
        contains(&document, env_control.as_bytes()),
        "the env value is exported"
    );
    for name in ["API_KEY", "STRIPE_KEY", "globex"] {
        assert!(contains(&document, name.as_bytes()), "{name} is exported");
    }
    for c in &canaries {
        assert!(
            !leaks(&document, c),
            "the export holds a canary in plaintext"
        );
        assert!(!parsed.to_string().contains(c.as_str()));
    }
    let mut audit = AuditLog::new(&mesh)?;
    assert_eq!(audit.of_type("sealed.store.exported").await?.len(), 1);
    refused(
        sealed_as(&mesh, ACME_CLIENT)?
            .export_store(pb::ExportStoreRequest {})
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "ExportStore by a tenant client",
    );

    // Back into the same store, without overwrite: refused.
    let before = get_profile(&mut op, "acme", "base").await?;
    let messages: Vec<pb::ImportStoreRequest> = chunks
        .iter()
        .map(|c| pb::ImportStoreRequest {
            chunk: c.clone(),
            overwrite: false,
        })
        .collect();
    let s = refused(
        op.import_store(tokio_stream::iter(messages)).await,
        Code::FailedPrecondition,
        "ImportStore into a non-empty store without overwrite",
    );
    for c in &canaries {
        assert!(!format!("{s:?}").contains(c.as_str()));
    }
    // The store is as it was, and still resolves.
    let after = get_profile(&mut op, "acme", "base").await?;
    assert_eq!(after, before, "a refused import changed the store");
    let run = start_run(&mesh, "acme", "run-1").await?;
    let resp = resolve(
        &mut runner,
        resolve_request(&run, "acme", system("acme", "base")),
    )
    .await?;
    assert_eq!(
        resp.secrets
            .iter()
            .map(|s| (s.key.as_str(), text(s), s.version))
            .collect::<Vec<_>>(),
        vec![("API_KEY", canaries[1].clone(), 2)]
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Beyond issue 5's list: contracts of sealed.proto the flows above rely on

/// ResolveRequest.keys: "only these secret keys are resolved ... A named key
/// the cascade lacks is NOT_FOUND." A sandbox must not start believing it got
/// a credential it did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_refuses_a_named_key_the_cascade_lacks() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut runner = sealed_as(&mesh, RUNNER)?;
    let value = canary();
    create_profile(&mut op, "acme", "base", &[]).await?;
    put_value(&mut op, "acme", "base", "API_KEY", &value).await?;
    let run = start_run(&mesh, "acme", "run-1").await?;
    // Control: the key the cascade has resolves alone.
    let one = resolve(
        &mut runner,
        pb::ResolveRequest {
            keys: vec!["API_KEY".into()],
            ..resolve_request(&run, "acme", system("acme", "base"))
        },
    )
    .await?;
    assert_eq!(one.secrets.len(), 1);

    let r = resolve(
        &mut runner,
        pb::ResolveRequest {
            keys: vec!["API_KEY".into(), "MISSING_KEY".into()],
            ..resolve_request(&run, "acme", system("acme", "base"))
        },
    )
    .await;
    let s = refused(
        r.map(|r| r.secrets.iter().map(|s| s.key.clone()).collect::<Vec<_>>()),
        Code::NotFound,
        "Resolve naming MISSING_KEY, which the cascade lacks",
    );
    assert!(s.message().contains("MISSING_KEY"), "{s:?}");
    Ok(())
}

/// A resolution's audit record names every key it returned, however many:
/// 80 keys overflow one attribute value (1,024 bytes), so the names go on in
/// `keys.1`, `keys.2`, … and the holdings likewise; a resolution too big for
/// one record is refused by name rather than by audit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolution_of_many_keys_is_recorded_whole() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut runner = sealed_as(&mesh, RUNNER)?;
    create_profile(&mut op, "acme", "wide", &[]).await?;
    let keys: Vec<String> = (0..80)
        .map(|i| format!("SERVICE_TOKEN_NUMBER_{i:03}"))
        .collect();
    for k in &keys {
        put_value(&mut op, "acme", "wide", k, &random_hex()).await?;
    }
    let run = start_run(&mesh, "acme", "run-wide").await?;
    let got = resolve(
        &mut runner,
        resolve_request(&run, "acme", system("acme", "wide")),
    )
    .await?;
    assert_eq!(got.secrets.len(), 80);
    let event = AuditLog::new(&mesh)?.at(got.audit_sequence).await?;
    let joined = |name: &str| -> Vec<String> {
        let mut parts: Vec<(usize, &String)> = event
            .attributes
            .iter()
            .filter_map(|(k, v)| {
                if k == name {
                    Some((0, v))
                } else {
                    k.strip_prefix(&format!("{name}."))?
                        .parse()
                        .ok()
                        .map(|i| (i, v))
                }
            })
            .collect();
        parts.sort();
        parts
            .iter()
            .flat_map(|(_, v)| v.split(','))
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    assert!(
        event.attributes.contains_key("keys.1"),
        "{:?}",
        event.attributes.keys()
    );
    assert!(event.attributes.values().all(|v| v.len() <= 1024));
    let named: Vec<String> = joined("keys")
        .iter()
        .map(|k| k.split('@').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(named, keys, "every key returned is named, in order");
    let held: usize = joined("holdings")
        .iter()
        .map(|group| {
            group
                .split_once(':')
                .map_or(0, |(_, ks)| ks.split('+').count())
        })
        .sum();
    assert_eq!(held, 80);

    // 110 keys of 128 bytes cannot be named in one record (37 attributes
    // of the 32 audit takes): refused, by name.
    create_profile(&mut op, "acme", "too-wide", &[]).await?;
    for i in 0..110 {
        let key = format!("K{i:03}_{}", "X".repeat(123));
        put_value(&mut op, "acme", "too-wide", &key, &random_hex()).await?;
    }
    let r = resolve(
        &mut runner,
        resolve_request(&run, "acme", system("acme", "too-wide")),
    )
    .await;
    let s = refused(
        r.map(|r| r.secrets.len()),
        Code::FailedPrecondition,
        "a resolution too big for one audit record",
    );
    assert!(s.message().contains("fewer keys"), "{s:?}");
    Ok(())
}

/// Every secret event is recorded before it takes effect — and a refused
/// action must not stay in the log as one that happened. Each refusal below
/// is decided by the store after the service has already appended a SUCCESS
/// record of the action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_are_not_recorded_as_done() -> anyhow::Result<()> {
    use tokio_stream::StreamExt as _;
    let mesh = TestMesh::start().await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut audit = AuditLog::new(&mesh)?;
    create_profile(&mut op, "acme", "base", &[("REGION", "eu-west-1")]).await?;
    put_value(&mut op, "acme", "base", "API_KEY", &canary()).await?;

    refused(
        put_value(&mut op, "acme", "missing", "API_KEY", &canary()).await,
        Code::NotFound,
        "PutSecret into a missing profile",
    );
    refused(
        put_value(&mut op, "acme", "base", "REGION", &canary()).await,
        Code::FailedPrecondition,
        "PutSecret colliding with an env key",
    );
    refused(
        op.delete_secret(pb::DeleteSecretRequest {
            tenant: "acme".into(),
            profile: "base".into(),
            key: "NO_SUCH_KEY".into(),
        })
        .await,
        Code::NotFound,
        "DeleteSecret of a missing key",
    );
    let rev = op
        .revoke_secret(pb::RevokeSecretRequest {
            tenant: "acme".into(),
            profile: "base".into(),
            key: "API_KEY".into(),
            hard: false,
            reason: "drill".into(),
        })
        .await?
        .into_inner()
        .revocation
        .context("revocation")?;
    let lift = || pb::LiftRevocationRequest {
        tenant: "acme".into(),
        revocation_id: rev.revocation_id.clone(),
        reason: "drill over".into(),
    };
    op.lift_revocation(lift()).await?;
    refused(
        op.lift_revocation(lift()).await,
        Code::FailedPrecondition,
        "lifting a lifted revocation",
    );
    let mut stream = op
        .export_store(pb::ExportStoreRequest {})
        .await?
        .into_inner();
    let mut messages = Vec::new();
    while let Some(msg) = stream.next().await {
        messages.push(pb::ImportStoreRequest {
            chunk: msg?.chunk,
            overwrite: false,
        });
    }
    refused(
        op.import_store(tokio_stream::iter(messages)).await,
        Code::FailedPrecondition,
        "ImportStore into a non-empty store without overwrite",
    );

    let events = audit.events().await?;
    let done = |kind: &str| {
        events
            .iter()
            .filter(|e| e.r#type.as_str() == kind && e.outcome() == audit_pb::Outcome::Success)
            .map(|e| {
                format!(
                    "{}/{}/{}",
                    attr(e, "profile"),
                    attr(e, "key"),
                    attr(e, "revocation_id")
                )
            })
            .collect::<Vec<_>>()
    };
    let lifted = events
        .iter()
        .filter(|e| e.r#type.ends_with("lifted"))
        .count();
    assert_eq!(
        (
            done("sealed.secret.written"),
            done("sealed.secret.deleted"),
            lifted,
            done("sealed.store.imported").len(),
        ),
        (vec!["base/API_KEY/".to_owned()], vec![], 1, 0),
        "(writes, deletions, lifts, imports) recorded as done: one write and one lift happened"
    );
    Ok(())
}

/// A profile with a tool ACL gives a tool only its keys, a tool it does not
/// list nothing, and a run naming no tool nothing; other profiles of the
/// cascade are untouched by that ACL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_acl_limits_what_each_tool_receives() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut runner = sealed_as(&mesh, RUNNER)?;
    op.create_profile(pb::CreateProfileRequest {
        tenant: "acme".into(),
        name: "tools".into(),
        spec: Some(pb::ProfileSpec {
            tool_acl: [(
                "search".to_owned(),
                pb::ToolKeys {
                    keys: vec!["SEARCH_KEY".into()],
                },
            )]
            .into_iter()
            .collect(),
            ..spec(&[])
        }),
    })
    .await?;
    put_value(&mut op, "acme", "tools", "SEARCH_KEY", "s-1").await?;
    put_value(&mut op, "acme", "tools", "DB_PASSWORD", "d-1").await?;
    create_profile(&mut op, "acme", "open", &[]).await?;
    put_value(&mut op, "acme", "open", "OPEN_KEY", "o-1").await?;
    let run = start_run(&mesh, "acme", "run-tools").await?;
    let cascade = || pb::Cascade {
        system: Some(level(Some(("acme", "tools")), vec![])),
        agent: Some(level(Some(("acme", "open")), vec![])),
        ..Default::default()
    };
    let keys_for = |tool: &str| pb::ResolveRequest {
        tool: tool.into(),
        ..resolve_request(&run, "acme", cascade())
    };
    let got = |r: &pb::ResolveResponse| {
        let mut k: Vec<String> = r.secrets.iter().map(|s| s.key.clone()).collect();
        k.sort();
        k
    };
    let search = resolve(&mut runner, keys_for("search")).await?;
    assert_eq!(got(&search), vec!["OPEN_KEY", "SEARCH_KEY"]);
    let other = resolve(&mut runner, keys_for("shell")).await?;
    assert_eq!(
        got(&other),
        vec!["OPEN_KEY"],
        "an unlisted tool gets none of the ACL'd profile"
    );
    let none = resolve(&mut runner, keys_for("")).await?;
    assert_eq!(
        got(&none),
        vec!["OPEN_KEY"],
        "no tool gets none of the ACL'd profile"
    );
    Ok(())
}

/// A revocation cannot be sidestepped by pointing a cascade override at the
/// revoked secret's backend path, and a profile's tool ACL applies to
/// override references too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_cannot_sidestep_revocations_or_tool_acls() -> anyhow::Result<()> {
    let Some(bao_server) = OpenBao::start().await? else {
        return Ok(());
    };
    let http = bulkhead_testkit::external::loopback_http_client()?;
    let value = canary();
    bao(
        &http,
        &bao_server,
        "secret/data/acme/db",
        json!({ "data": { "pass": value } }),
    )
    .await?;
    let backends: toml::Table = toml::from_str(&format!(
        r#"
        [backends.vault]
        address = "{vault}"
        auth = {{ method = "token", token = "{token}" }}
        tenants = {{ acme = ["secret/acme/"] }}
        "#,
        vault = bao_server.addr(),
        token = bao_server.root_token(),
    ))?;
    let mesh = TestMesh::start_with(|spec| {
        spec.extra.insert("sealed-vault".into(), backends);
    })
    .await?;
    let mut op = sealed_as(&mesh, OPERATOR)?;
    let mut runner = sealed_as(&mesh, RUNNER)?;
    let reference = "vault://secret/acme/db#pass";
    create_profile(&mut op, "acme", "base", &[]).await?;
    put_reference(&mut op, "acme", "base", "DB_PASS", reference).await?;
    let run = start_run(&mesh, "acme", "run-ovr").await?;
    let via_override = || pb::Cascade {
        run: Some(level(None, vec![("DB_PASS", self::reference(reference))])),
        ..Default::default()
    };
    // Before the revocation, the override resolves (control).
    let ok = resolve(&mut runner, resolve_request(&run, "acme", via_override())).await?;
    assert_eq!(ok.secrets.len(), 1);
    op.revoke_secret(pb::RevokeSecretRequest {
        tenant: "acme".into(),
        profile: "base".into(),
        key: "DB_PASS".into(),
        hard: false,
        reason: "leaked".into(),
    })
    .await?;
    let s = refused(
        resolve(&mut runner, resolve_request(&run, "acme", via_override())).await,
        Code::FailedPrecondition,
        "an override naming a revoked secret's path",
    );
    assert!(!format!("{s:?}").contains(&value));

    // A profile with a tool ACL: an override reference for a key the tool
    // may not have is dropped like the profile's own keys.
    op.create_profile(pb::CreateProfileRequest {
        tenant: "acme".into(),
        name: "acl".into(),
        spec: Some(pb::ProfileSpec {
            tool_acl: [(
                "search".to_owned(),
                pb::ToolKeys {
                    keys: vec!["OTHER".into()],
                },
            )]
            .into_iter()
            .collect(),
            ..spec(&[])
        }),
    })
    .await?;
    let acl_cascade = pb::Cascade {
        system: Some(level(Some(("acme", "acl")), vec![])),
        run: Some(level(
            None,
            vec![("SNEAKY", self::reference("vault://secret/acme/db#pass"))],
        )),
        ..Default::default()
    };
    let got = resolve(
        &mut runner,
        pb::ResolveRequest {
            tool: "search".into(),
            ..resolve_request(&run, "acme", acl_cascade)
        },
    )
    .await?;
    assert!(
        got.secrets.iter().all(|s| s.key != "SNEAKY"),
        "the ACL does not give 'search' the override's key"
    );
    Ok(())
}
