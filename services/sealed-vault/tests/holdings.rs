//! Which runs hold a secret, as a hard RevokeSecret finds them: audit,
//! identity and sealed-vault in-process (each the mesh server with its real
//! handlers and store), over mTLS on loopback.
//!
//! - A run that resolved a secret before sealed-vault restarted, or through
//!   another replica on the same PostgreSQL, is listed by a later hard
//!   revocation and revoked at identity.
//! - A Resolve racing a RevokeSecret either is refused or is listed: paused
//!   at each side of its holding's commit, and raced freely round after round.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use bulkhead_audit::checkpoint::Signer;
use bulkhead_audit::log::{Log, LogConfig};
use bulkhead_identity::keys::JwtKeys;
use bulkhead_identity::service::{AuditDenials, IdentityApi, Limits};
use bulkhead_mesh::audit::AuditClient;
use bulkhead_mesh::client::MeshChannel;
use bulkhead_mesh::pki::{Ca, SvidOptions};
use bulkhead_mesh::revocation::RevocationList;
use bulkhead_mesh::server::{MeshServer, ServeError};
use bulkhead_mesh::spiffe::TrustDomain;
use bulkhead_mesh::tls::{ClientAuth, ExpectServer, Identity, TrustBundle};
use bulkhead_proto::audit::v1 as audit_pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use bulkhead_proto::identity::v1 as idpb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sealed::v1 as pb;
use bulkhead_proto::sealed::v1::sealed_vault_service_client::SealedVaultServiceClient;
use bulkhead_sealed_vault::backend::Backends;
use bulkhead_sealed_vault::crypto::MasterKey;
use bulkhead_sealed_vault::holdings;
use bulkhead_sealed_vault::secret::SecretValue;
use bulkhead_sealed_vault::service::{self, Parts, SealedVaultApi};
use bulkhead_sealed_vault::store::{
    self, Holding, ImportCounts, Lift, NewRevocation, Profile, ProfileBundle, ProfileQuery,
    ProfileSpec, RevocationQuery, Rewrapped, SealedStore, SealedVersion, SecretMeta,
    SecretRevocation, SecretVersion, StoreError, StoreExport, Tenants, VersionId,
};
use bulkhead_testkit::external::Postgres;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

type Vault = SealedVaultServiceClient<MeshChannel>;
type IdClient = IdentityServiceClient<MeshChannel>;

const TRUST_DOMAIN: &str = "bulkhead.test";
const TENANT: &str = "acme";
const PROFILE: &str = "app";

// ---------------------------------------------------------------------------
// The trust domain

struct Pki {
    td: TrustDomain,
    ca_cert: String,
    ca_key: String,
    bundle: TrustBundle,
    audit: Identity,
    identity: Identity,
    vault: Identity,
    dispatcher: Identity,
    operator: Identity,
    runner: Identity,
}

fn pki() -> anyhow::Result<Pki> {
    bulkhead_mesh::tls::install_crypto_provider();
    let td = TrustDomain::parse(TRUST_DOMAIN)?;
    let (ca, ca_key) = Ca::generate(&td)?;
    let issue = |path: &str, opts: SvidOptions| -> anyhow::Result<Identity> {
        let svid = ca.issue(&td.join(path.split('/'))?, &opts)?;
        let chain = format!("{}{}", svid.cert_pem, ca.cert_pem());
        Ok(Identity::from_pem(
            chain.as_bytes(),
            svid.key_pem.as_bytes(),
            path,
        )?)
    };
    Ok(Pki {
        bundle: TrustBundle::from_pem(ca.cert_pem().as_bytes(), "test ca")?,
        audit: issue("service/audit", SvidOptions::for_local_service("audit"))?,
        identity: issue(
            "service/identity",
            SvidOptions::for_local_service("identity"),
        )?,
        vault: issue(
            "service/sealed-vault",
            SvidOptions::for_local_service("sealed-vault"),
        )?,
        dispatcher: issue("service/dispatcher", SvidOptions::default())?,
        operator: issue("admin/ops", SvidOptions::default())?,
        runner: issue("service/sandbox-runner/host-a", SvidOptions::default())?,
        ca_cert: ca.cert_pem().to_owned(),
        ca_key,
        td,
    })
}

async fn connect(
    pki: &Pki,
    addr: &str,
    service: &str,
    who: &Identity,
) -> anyhow::Result<MeshChannel> {
    Ok(bulkhead_mesh::client::connect(
        addr,
        Some(who),
        &pki.bundle,
        ExpectServer::Service(service.into()),
    )
    .await?)
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------
// Audit and identity, which outlive sealed-vault's restarts

struct Peers {
    audit_addr: String,
    identity_addr: String,
    stop: CancellationToken,
    serving: Vec<JoinHandle<Result<(), ServeError>>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Peers {
    async fn start(pki: &Pki) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let adir = tempfile::tempdir()?;
        let idir = tempfile::tempdir()?;

        let audit_store = bulkhead_audit::store::open(&format!(
            "sqlite://{}",
            adir.path().join("audit.db").display()
        ))
        .await
        .context("failed to open the audit store")?;
        let log = Log::open(
            audit_store,
            Signer::generate(),
            LogConfig::default(),
            stop.clone(),
        )
        .await?;
        let server = MeshServer::new("audit", pki.audit.clone(), pki.bundle.clone());
        let api = bulkhead_audit::service::AuditApi::new(log, server.draining());
        let bound = server
            .add_service(
                bulkhead_audit::service::server(api),
                bulkhead_audit::service::POLICY,
            )
            .bind("127.0.0.1:0".parse()?)
            .await?;
        let audit_addr = bound.local_addr().to_string();
        let audit_serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));

        let identity_audit = AuditClient::new(bulkhead_mesh::client::channel(
            &audit_addr,
            Some(&pki.identity),
            &pki.bundle,
            ExpectServer::Service("audit".into()),
        )?);
        let identity_store = bulkhead_identity::store::open(&format!(
            "sqlite://{}",
            idir.path().join("identity.db").display()
        ))
        .await
        .context("failed to open the identity store")?;
        let keys =
            JwtKeys::load_or_create(&idir.path().join("jwt-keys.json"), 86_400, 900, now_ms())?;
        let server = MeshServer::new("identity", pki.identity.clone(), pki.bundle.clone())
            .client_auth(ClientAuth::Optional);
        let api = IdentityApi::start(
            bulkhead_identity::service::Parts {
                ca: Ca::load(&pki.ca_cert, &pki.ca_key)?,
                authorities: pki.bundle.authorities().to_vec(),
                store: identity_store,
                keys: Arc::new(keys),
                audit: identity_audit.clone(),
                limits: Limits {
                    run_svid_max_ttl: Duration::from_secs(15 * 60),
                    worker_svid_ttl: Duration::from_secs(24 * 3600),
                    jwt_max_ttl: Duration::from_secs(5 * 60),
                },
                draining: server.draining(),
            },
            stop.clone(),
        )
        .await?;
        let bound = server
            .revocations(api.revocations())
            .denials(Arc::new(AuditDenials::new(identity_audit)))
            .add_service(
                bulkhead_identity::service::server(api),
                bulkhead_identity::service::POLICY,
            )
            .bind("127.0.0.1:0".parse()?)
            .await?;
        let identity_addr = bound.local_addr().to_string();
        let identity_serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));
        Ok(Self {
            audit_addr,
            identity_addr,
            stop,
            serving: vec![audit_serving, identity_serving],
            _dirs: vec![adir, idir],
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        for s in self.serving {
            s.await??;
        }
        Ok(())
    }

    /// The run ids identity has revoked for the tenant, sorted.
    async fn revoked_runs(&self, pki: &Pki) -> anyhow::Result<Vec<String>> {
        let mut op =
            IdClient::new(connect(pki, &self.identity_addr, "identity", &pki.operator).await?);
        let mut runs: Vec<String> = op
            .list_revocations(idpb::ListRevocationsRequest {
                tenant: TENANT.into(),
                page_size: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .revocations
            .into_iter()
            .filter_map(|r| match r.target {
                Some(idpb::revocation::Target::RunId(id)) => Some(id),
                _ => None,
            })
            .collect();
        runs.sort();
        Ok(runs)
    }

    /// The audit events of `kind`, in order, as an operator reads them.
    async fn audited(&self, pki: &Pki, kind: &str) -> anyhow::Result<Vec<audit_pb::Event>> {
        let mut op =
            AuditServiceClient::new(connect(pki, &self.audit_addr, "audit", &pki.operator).await?);
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = op
                .query(audit_pb::QueryRequest {
                    after_sequence: after,
                    limit: 1000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            out.extend(page.events.into_iter().filter(|e| e.r#type == kind));
            if page.next_after_sequence == 0 {
                return Ok(out);
            }
            after = page.next_after_sequence;
        }
    }

    /// A run of the tenant, minted through the dispatcher, and the JWT-SVID
    /// it mints for sealed-vault.
    async fn run_token(&self, pki: &Pki, run_id: &str) -> anyhow::Result<String> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
        let mut dispatcher =
            IdClient::new(connect(pki, &self.identity_addr, "identity", &pki.dispatcher).await?);
        let svid = dispatcher
            .mint_run_svid(idpb::MintRunSvidRequest {
                tenant: TENANT.into(),
                run_id: run_id.into(),
                csr_der: bytes::Bytes::copy_from_slice(csr.der()),
                ttl: None,
                worker_id: "worker-a".into(),
                pool: String::new(),
            })
            .await?
            .into_inner()
            .svid
            .context("no svid")?;
        let chain = svid
            .cert_chain_der
            .iter()
            .map(|c| CertificateDer::from(c.to_vec()))
            .collect();
        let run = Identity::from_der(
            chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            "run",
        )?;
        let mut as_run = IdClient::new(connect(pki, &self.identity_addr, "identity", &run).await?);
        Ok(as_run
            .mint_jwt_svid(idpb::MintJwtSvidRequest {
                audience: pki.vault.spiffe_id().to_string(),
                ttl: None,
                spiffe_id: String::new(),
            })
            .await?
            .into_inner()
            .token)
    }
}

// ---------------------------------------------------------------------------
// Sealed-vault, started and stopped like a process over one store

/// What a sealed-vault process is started from; the same across restarts.
#[derive(Clone)]
struct VaultKeys {
    master: MasterKey,
    fingerprint: Vec<u8>,
}

impl VaultKeys {
    fn generate() -> Self {
        Self {
            master: MasterKey::generate(),
            fingerprint: rand::random::<[u8; 32]>().to_vec(),
        }
    }
}

/// One running sealed-vault.
struct VaultProcess {
    addr: String,
    store: Arc<dyn SealedStore>,
    stop: CancellationToken,
    serving: JoinHandle<Result<(), ServeError>>,
}

impl VaultProcess {
    /// Starts sealed-vault as its main.rs does, over `store`; returns once
    /// its revocation list has synced with identity.
    async fn start(
        pki: &Pki,
        peers: &Peers,
        keys: &VaultKeys,
        store: Arc<dyn SealedStore>,
    ) -> anyhow::Result<Self> {
        Self::start_replaying_from(pki, peers, keys, store, &peers.audit_addr).await
    }

    /// As `start`, with the holdings replay reading audit at `replay_from`.
    async fn start_replaying_from(
        pki: &Pki,
        peers: &Peers,
        keys: &VaultKeys,
        store: Arc<dyn SealedStore>,
        replay_from: &str,
    ) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let channel = |addr: &str, name: &str| {
            bulkhead_mesh::client::channel(
                addr,
                Some(&pki.vault),
                &pki.bundle,
                ExpectServer::Service(name.into()),
            )
        };
        let revocations = Arc::new(RevocationList::new());
        tokio::spawn(bulkhead_mesh::revocation::follow(
            revocations.clone(),
            channel(&peers.identity_addr, "identity")?,
            stop.clone(),
        ));
        let api = SealedVaultApi::new(Parts {
            trust_domain: pki.td.clone(),
            audience: pki.vault.spiffe_id().to_string(),
            store: store.clone(),
            master: keys.master.clone(),
            previous: Vec::new(),
            fingerprint_key: SecretValue::new(keys.fingerprint.clone()),
            backends: Backends::default(),
            audit: AuditClient::new(channel(&peers.audit_addr, "audit")?),
            identity: IdentityServiceClient::new(channel(&peers.identity_addr, "identity")?),
            revocations: revocations.clone(),
            reveals_per_minute: 10,
            recover_holdings: Some(holdings::AuditReader {
                client: AuditServiceClient::new(channel(replay_from, "audit")?),
                actor: pki.vault.spiffe_id().to_string(),
            }),
        });
        let bound = MeshServer::new("sealed-vault", pki.vault.clone(), pki.bundle.clone())
            .revocations(revocations.clone())
            .add_service(service::server(api), service::POLICY)
            .bind("127.0.0.1:0".parse()?)
            .await?;
        let addr = bound.local_addr().to_string();
        let serving = tokio::spawn(bound.serve(stop.clone().cancelled_owned()));
        let waited = std::time::Instant::now();
        while !revocations.synced() {
            ensure!(
                waited.elapsed() < Duration::from_secs(30),
                "sealed-vault's revocation list did not sync with identity in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self {
            addr,
            store,
            stop,
            serving,
        })
    }

    /// Stops serving, drops the handlers (and with them everything the
    /// process held in memory) and closes the store.
    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.serving.await??;
        self.store.close().await;
        Ok(())
    }

    async fn as_operator(&self, pki: &Pki) -> anyhow::Result<Vault> {
        Ok(Vault::new(
            connect(pki, &self.addr, "sealed-vault", &pki.operator).await?,
        ))
    }

    async fn as_runner(&self, pki: &Pki) -> anyhow::Result<Vault> {
        Ok(Vault::new(
            connect(pki, &self.addr, "sealed-vault", &pki.runner).await?,
        ))
    }
}

async fn create_profile(op: &mut Vault) -> anyhow::Result<()> {
    op.create_profile(pb::CreateProfileRequest {
        tenant: TENANT.into(),
        name: PROFILE.into(),
        spec: Some(pb::ProfileSpec::default()),
    })
    .await?;
    Ok(())
}

async fn put(op: &mut Vault, key: &str) -> anyhow::Result<()> {
    op.put_secret(pb::PutSecretRequest {
        tenant: TENANT.into(),
        profile: PROFILE.into(),
        key: key.into(),
        source: Some(pb::put_secret_request::Source::Value(
            hex::encode(rand::random::<[u8; 16]>()).into_bytes().into(),
        )),
    })
    .await?;
    Ok(())
}

/// Resolve of `keys` of the profile, with a run's token.
fn resolve_request(token: &str, keys: &[&str]) -> pb::ResolveRequest {
    pb::ResolveRequest {
        tenant: TENANT.into(),
        run_jwt_svid: token.into(),
        cascade: Some(pb::Cascade {
            system: Some(pb::CascadeLevel {
                profile: Some(pb::ProfileRef {
                    tenant: TENANT.into(),
                    profile: PROFILE.into(),
                }),
                overrides: Default::default(),
            }),
            agent: None,
            run: None,
        }),
        agent: "coder".into(),
        tool: String::new(),
        keys: keys.iter().map(|k| (*k).to_owned()).collect(),
    }
}

fn attr<'a>(e: &'a audit_pb::Event, key: &str) -> &'a str {
    e.attributes.get(key).map_or("", String::as_str)
}

fn hard_revocation(key: &str) -> pb::RevokeSecretRequest {
    pb::RevokeSecretRequest {
        tenant: TENANT.into(),
        profile: PROFILE.into(),
        key: key.into(),
        hard: true,
        reason: "leaked in a paste".into(),
    }
}

// ---------------------------------------------------------------------------
// A restart, and replicas on one PostgreSQL

/// run-1 resolves KEY_A and KEY_B, run-2 only KEY_B, through the first
/// sealed-vault; it restarts over the same store (and, with `replica`, a
/// second sealed-vault serves the same store all along). A hard revocation
/// of KEY_A, through the restarted process or the replica, lists run-1 alone
/// and identity revokes it.
async fn holders_outlive_a_restart(url: &str, replica: bool) -> anyhow::Result<()> {
    let pki = pki()?;
    let peers = Peers::start(&pki).await?;
    let keys = VaultKeys::generate();
    let first = VaultProcess::start(&pki, &peers, &keys, store::open(url).await?).await?;
    let second = if replica {
        Some(VaultProcess::start(&pki, &peers, &keys, store::open(url).await?).await?)
    } else {
        None
    };
    let mut op = first.as_operator(&pki).await?;
    create_profile(&mut op).await?;
    put(&mut op, "KEY_A").await?;
    put(&mut op, "KEY_B").await?;
    let mut runner = first.as_runner(&pki).await?;
    let run1 = peers.run_token(&pki, "run-1").await?;
    let run2 = peers.run_token(&pki, "run-2").await?;
    let got = runner
        .resolve(resolve_request(&run1, &[]))
        .await?
        .into_inner();
    assert_eq!(got.secrets.len(), 2);
    runner.resolve(resolve_request(&run2, &["KEY_B"])).await?;

    first.stop().await?;
    let restarted = VaultProcess::start(&pki, &peers, &keys, store::open(url).await?).await?;
    let revoking = second.as_ref().unwrap_or(&restarted);
    let revoked = revoking
        .as_operator(&pki)
        .await?
        .revoke_secret(hard_revocation("KEY_A"))
        .await?
        .into_inner();
    assert_eq!(
        revoked.affected_run_ids,
        ["run-1"],
        "the run that resolved KEY_A before the restart"
    );
    let revocation = revoked.revocation.context("revocation")?;
    assert_eq!(revocation.affected_run_ids, ["run-1"]);
    assert_eq!(peers.revoked_runs(&pki).await?, ["run-1"]);
    // Audit has the revocation, recorded before it was written, and then its
    // affected runs, recorded before identity was asked to revoke them.
    let intent = peers.audited(&pki, "sealed.secret.revoked").await?;
    let applied = peers
        .audited(&pki, "sealed.secret.revocation_applied")
        .await?;
    let [intent] = intent.as_slice() else {
        panic!("one revocation: {intent:?}");
    };
    let [applied] = applied.as_slice() else {
        panic!("one revocation applied: {applied:?}");
    };
    assert_eq!(
        (attr(intent, "key"), attr(intent, "hard")),
        ("KEY_A", "true")
    );
    assert_eq!(
        (
            attr(applied, "revocation_id"),
            attr(applied, "affected_runs")
        ),
        (revocation.revocation_id.as_str(), "run-1")
    );
    assert!(intent.sequence < applied.sequence);
    // The revocation holds in the restarted process too.
    let refused = restarted
        .as_runner(&pki)
        .await?
        .resolve(resolve_request(&run2, &["KEY_A"]))
        .await
        .expect_err("KEY_A is revoked");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    restarted.stop().await?;
    if let Some(second) = second {
        second.stop().await?;
    }
    peers.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_revocation_finds_runs_that_resolved_before_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("sealed.db").display());
    holders_outlive_a_restart(&url, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_postgres_share_holders_across_a_restart() -> anyhow::Result<()> {
    let Some(pg) = Postgres::start().await? else {
        return Ok(());
    };
    let url = pg.create_database("sealed_holdings").await?;
    holders_outlive_a_restart(&url, true).await
}

// ---------------------------------------------------------------------------
// A power cut: holdings replayed from audit

/// Revokes with retries while the holdings replay is still running.
async fn revoke_when_recovered(
    op: &mut Vault,
    req: pb::RevokeSecretRequest,
) -> anyhow::Result<pb::RevokeSecretResponse> {
    let waited = std::time::Instant::now();
    loop {
        match op.revoke_secret(req.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s)
                if s.code() == Code::Unavailable && waited.elapsed() < Duration::from_secs(20) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => return Err(s.into()),
        }
    }
}

/// Holdings commit without an fsync of their own on SQLite, so a power cut
/// can take the newest. Here they are taken by hand from the file of a
/// stopped sealed-vault (run-1's, the newest: run-2's stays, so the replay
/// starts a margin before it); the restarted process replays them from audit
/// and a hard revocation lists run-1 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holdings_a_power_cut_took_are_replayed_from_audit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("sealed.db");
    let url = format!("sqlite://{}", path.display());
    let pki = pki()?;
    let peers = Peers::start(&pki).await?;
    let keys = VaultKeys::generate();
    let first = VaultProcess::start(&pki, &peers, &keys, store::open(&url).await?).await?;
    let mut op = first.as_operator(&pki).await?;
    create_profile(&mut op).await?;
    put(&mut op, "KEY_A").await?;
    put(&mut op, "KEY_B").await?;
    let mut runner = first.as_runner(&pki).await?;
    let run1 = peers.run_token(&pki, "run-1").await?;
    let run2 = peers.run_token(&pki, "run-2").await?;
    runner.resolve(resolve_request(&run2, &["KEY_B"])).await?;
    runner.resolve(resolve_request(&run1, &[])).await?;
    first.stop().await?;

    let file = sqlx::SqlitePool::connect(&url).await?;
    let gone = sqlx::query("DELETE FROM run_holdings WHERE run_id = 'run-1'")
        .execute(&file)
        .await?
        .rows_affected();
    assert_eq!(gone, 2, "run-1 held KEY_A and KEY_B");
    file.close().await;

    let restarted = VaultProcess::start(&pki, &peers, &keys, store::open(&url).await?).await?;
    let mut op = restarted.as_operator(&pki).await?;
    let revoked = revoke_when_recovered(&mut op, hard_revocation("KEY_A")).await?;
    assert_eq!(revoked.affected_run_ids, ["run-1"]);
    assert_eq!(peers.revoked_runs(&pki).await?, ["run-1"]);
    let revoked = revoke_when_recovered(&mut op, hard_revocation("KEY_B")).await?;
    assert_eq!(revoked.affected_run_ids, ["run-1", "run-2"]);
    restarted.stop().await?;
    peers.stop().await
}

/// Until the replay has read audit, RevokeSecret waits and then refuses
/// (UNAVAILABLE, naming the holdings) rather than compute its runs from
/// holdings that may be short; Resolve goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_wait_for_the_holdings_replay() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("sealed.db").display());
    let pki = pki()?;
    let peers = Peers::start(&pki).await?;
    let keys = VaultKeys::generate();
    // Nothing listens here: the replay cannot read audit.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let vault =
        VaultProcess::start_replaying_from(&pki, &peers, &keys, store::open(&url).await?, &nowhere)
            .await?;
    let mut op = vault.as_operator(&pki).await?;
    create_profile(&mut op).await?;
    put(&mut op, "KEY_A").await?;
    let run1 = peers.run_token(&pki, "run-1").await?;
    let got = vault
        .as_runner(&pki)
        .await?
        .resolve(resolve_request(&run1, &[]))
        .await?
        .into_inner();
    assert_eq!(got.secrets.len(), 1);
    let refused = op
        .revoke_secret(hard_revocation("KEY_A"))
        .await
        .expect_err("the holdings are not recovered");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("holdings"), "{refused:?}");
    // Nothing was revoked: audit has no revocation, and the key still resolves.
    assert!(
        peers
            .audited(&pki, "sealed.secret.revoked")
            .await?
            .is_empty()
    );
    vault
        .as_runner(&pki)
        .await?
        .resolve(resolve_request(&run1, &[]))
        .await?;
    vault.stop().await?;
    peers.stop().await
}

// ---------------------------------------------------------------------------
// Resolve against RevokeSecret

/// A pause in one store call: the first call after it is armed tells the
/// test it got there and waits to be released.
#[derive(Default)]
struct Gate(Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>);

impl Gate {
    /// Arms the gate: (reached, release).
    fn arm(&self) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (reached_tx, reached) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        *self.0.lock().expect("gate") = Some((reached_tx, release_rx));
        (reached, release)
    }

    async fn pass(&self) {
        let armed = self.0.lock().expect("gate").take();
        if let Some((reached, release)) = armed {
            let _ = reached.send(());
            let _ = release.await;
        }
    }
}

/// The real store, with a gate before holdings are written and one after
/// the revocations in force are read (Resolve's last check).
#[derive(Debug)]
struct GatedStore {
    inner: Arc<dyn SealedStore>,
    gates: Arc<Gates>,
}

#[derive(Default)]
struct Gates {
    before_holding: Gate,
    after_last_check: Gate,
}

impl std::fmt::Debug for Gates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gates")
    }
}

#[async_trait::async_trait]
impl SealedStore for GatedStore {
    async fn create_profile(
        &self,
        tenant: &str,
        name: &str,
        spec: &ProfileSpec,
        now_ms: i64,
    ) -> Result<Profile, StoreError> {
        self.inner.create_profile(tenant, name, spec, now_ms).await
    }
    async fn update_profile(
        &self,
        tenant: &str,
        name: &str,
        spec: &ProfileSpec,
        expected_revision: Option<u64>,
        now_ms: i64,
    ) -> Result<Profile, StoreError> {
        self.inner
            .update_profile(tenant, name, spec, expected_revision, now_ms)
            .await
    }
    async fn get_profile(&self, tenant: &str, name: &str) -> Result<Option<Profile>, StoreError> {
        self.inner.get_profile(tenant, name).await
    }
    async fn list_profiles(
        &self,
        tenants: Tenants<'_>,
        query: &ProfileQuery,
    ) -> Result<Vec<Profile>, StoreError> {
        self.inner.list_profiles(tenants, query).await
    }
    async fn delete_profile(&self, tenant: &str, name: &str) -> Result<u64, StoreError> {
        self.inner.delete_profile(tenant, name).await
    }
    async fn current_version(
        &self,
        tenant: &str,
        profile: &str,
        key: &str,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.current_version(tenant, profile, key).await
    }
    async fn put_secret(&self, version: &SecretVersion) -> Result<SecretMeta, StoreError> {
        self.inner.put_secret(version).await
    }
    async fn get_secret(
        &self,
        tenant: &str,
        profile: &str,
        key: &str,
        version: Option<u64>,
    ) -> Result<Option<SecretVersion>, StoreError> {
        self.inner.get_secret(tenant, profile, key, version).await
    }
    async fn delete_secret(
        &self,
        tenant: &str,
        profile: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        self.inner.delete_secret(tenant, profile, key, now_ms).await
    }
    async fn load_profile(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<ProfileBundle>, StoreError> {
        self.inner.load_profile(tenant, name).await
    }
    async fn revoke(&self, revocation: &NewRevocation) -> Result<SecretRevocation, StoreError> {
        self.inner.revoke(revocation).await
    }
    async fn lift_revocation(
        &self,
        tenant: &str,
        id: &str,
        lift: &Lift,
    ) -> Result<SecretRevocation, StoreError> {
        self.inner.lift_revocation(tenant, id, lift).await
    }
    async fn get_revocation(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<SecretRevocation>, StoreError> {
        self.inner.get_revocation(tenant, id).await
    }
    async fn list_revocations(
        &self,
        tenants: Tenants<'_>,
        query: &RevocationQuery,
    ) -> Result<Vec<SecretRevocation>, StoreError> {
        // A plain Resolve lists revocations only for its last check.
        let read = self.inner.list_revocations(tenants, query).await;
        self.gates.after_last_check.pass().await;
        read
    }
    async fn record_holdings(&self, holdings: &[Holding]) -> Result<(), StoreError> {
        self.gates.before_holding.pass().await;
        self.inner.record_holdings(holdings).await
    }
    async fn runs_holding(
        &self,
        tenant: &str,
        profile: &str,
        key: Option<&str>,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.runs_holding(tenant, profile, key, now_ms).await
    }
    async fn latest_holding_ms(&self) -> Result<Option<i64>, StoreError> {
        self.inner.latest_holding_ms().await
    }
    async fn prune_holdings(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.inner.prune_holdings(now_ms).await
    }
    async fn sealed_versions(
        &self,
        after: Option<&VersionId>,
        limit: u32,
    ) -> Result<Vec<SealedVersion>, StoreError> {
        self.inner.sealed_versions(after, limit).await
    }
    async fn write_rewrapped(&self, batch: &[Rewrapped]) -> Result<u64, StoreError> {
        self.inner.write_rewrapped(batch).await
    }
    async fn export(&self, now_ms: i64) -> Result<StoreExport, StoreError> {
        self.inner.export(now_ms).await
    }
    async fn import(
        &self,
        export: &StoreExport,
        overwrite: bool,
    ) -> Result<ImportCounts, StoreError> {
        self.inner.import(export, overwrite).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

/// A stack over a gated SQLite store, with the profile created.
struct Raced {
    pki: Pki,
    peers: Peers,
    vault: VaultProcess,
    gates: Arc<Gates>,
    _dir: tempfile::TempDir,
}

impl Raced {
    async fn start(url: Option<String>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let url =
            url.unwrap_or_else(|| format!("sqlite://{}", dir.path().join("sealed.db").display()));
        let pki = pki()?;
        let peers = Peers::start(&pki).await?;
        let gates = Arc::new(Gates::default());
        let store = Arc::new(GatedStore {
            inner: store::open(&url).await?,
            gates: gates.clone(),
        });
        let vault = VaultProcess::start(&pki, &peers, &VaultKeys::generate(), store).await?;
        create_profile(&mut vault.as_operator(&pki).await?).await?;
        Ok(Self {
            pki,
            peers,
            vault,
            gates,
            _dir: dir,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.vault.stop().await?;
        self.peers.stop().await
    }
}

/// Paused after passing its first revocation check and before its holding
/// is written, a Resolve sees a hard revocation happen in full (which finds
/// no holder); let go, it records its holding, reads the revocation and is
/// refused. (Remembering the run only after the values were out, as before,
/// returned them to a run that no revocation listed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_paused_before_its_holding_is_refused_by_the_revocation() -> anyhow::Result<()> {
    let t = Raced::start(None).await?;
    let mut op = t.vault.as_operator(&t.pki).await?;
    put(&mut op, "KEY_A").await?;
    let token = t.peers.run_token(&t.pki, "run-1").await?;
    let mut runner = t.vault.as_runner(&t.pki).await?;

    let (reached, release) = t.gates.before_holding.arm();
    let resolving =
        tokio::spawn(async move { runner.resolve(resolve_request(&token, &["KEY_A"])).await });
    tokio::time::timeout(Duration::from_secs(10), reached)
        .await
        .context("the Resolve never reached its holding")??;
    let revoked = op
        .revoke_secret(hard_revocation("KEY_A"))
        .await?
        .into_inner();
    assert!(
        revoked.affected_run_ids.is_empty(),
        "{:?}",
        revoked.affected_run_ids
    );
    let _ = release.send(());
    let refused = resolving.await?.expect_err("the Resolve must be refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("KEY_A"), "{refused:?}");
    assert!(t.peers.revoked_runs(&t.pki).await?.is_empty());
    // Its resolution may have been recorded meanwhile; its refusal is.
    let refusals = t.peers.audited(&t.pki, "sealed.credential.refused").await?;
    assert!(
        refusals.iter().any(|e| e.run_id == "run-1"
            && attr(e, "reason").contains("KEY_A was revoked while resolving")),
        "{refusals:?}"
    );
    t.stop().await
}

/// Paused after its holding is recorded and its last revocation read
/// passed, a Resolve is listed by a hard revocation made meanwhile, and its
/// run revoked at identity; let go, it returns the values to a run already
/// being killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_paused_after_its_last_check_is_listed_by_the_revocation() -> anyhow::Result<()> {
    let t = Raced::start(None).await?;
    let mut op = t.vault.as_operator(&t.pki).await?;
    put(&mut op, "KEY_A").await?;
    let token = t.peers.run_token(&t.pki, "run-1").await?;
    let mut runner = t.vault.as_runner(&t.pki).await?;

    let (reached, release) = t.gates.after_last_check.arm();
    let resolving =
        tokio::spawn(async move { runner.resolve(resolve_request(&token, &["KEY_A"])).await });
    tokio::time::timeout(Duration::from_secs(10), reached)
        .await
        .context("the Resolve never reached its last check")??;
    let revoked = op
        .revoke_secret(hard_revocation("KEY_A"))
        .await?
        .into_inner();
    assert_eq!(revoked.affected_run_ids, ["run-1"]);
    assert_eq!(t.peers.revoked_runs(&t.pki).await?, ["run-1"]);
    let _ = release.send(());
    let got = resolving.await??.into_inner();
    assert_eq!(got.secrets.len(), 1);
    t.stop().await
}

/// Resolve and a hard RevokeSecret of the key it asks for, started together
/// for a fresh run and key, round after round: every run that got values is
/// among the revocation's affected runs and revoked at identity; every other
/// Resolve was refused as revoked.
async fn resolves_race_revocations(url: Option<String>) -> anyhow::Result<()> {
    const ROUNDS: usize = 24;
    let t = Raced::start(url).await?;
    let mut op = t.vault.as_operator(&t.pki).await?;
    let runner = t.vault.as_runner(&t.pki).await?;
    let (mut served, mut refused) = (Vec::new(), 0);
    let mut listed = Vec::new();
    for round in 0..ROUNDS {
        let key = format!("KEY_{round}");
        let run = format!("run-{round}");
        put(&mut op, &key).await?;
        let token = t.peers.run_token(&t.pki, &run).await?;
        let resolving = {
            let mut runner = runner.clone();
            let key = key.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis((round % 4) as u64)).await;
                runner.resolve(resolve_request(&token, &[&key])).await
            })
        };
        let revoking = {
            let mut op = op.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(((round / 4) % 3) as u64)).await;
                op.revoke_secret(hard_revocation(&key)).await
            })
        };
        let resolved = resolving.await?;
        let affected = revoking.await??.into_inner().affected_run_ids;
        match resolved {
            Ok(_) => {
                assert_eq!(
                    affected,
                    std::slice::from_ref(&run),
                    "round {round}: a run got values but the revocation did not list it"
                );
                served.push(run);
            }
            Err(s) => {
                assert_eq!(s.code(), Code::FailedPrecondition, "round {round}: {s:?}");
                refused += 1;
            }
        }
        listed.extend(affected);
    }
    // Every listed run was revoked at identity.
    listed.sort();
    assert_eq!(t.peers.revoked_runs(&t.pki).await?, listed);
    eprintln!(
        "resolves against revocations: {ROUNDS} rounds, {} served (all listed), {refused} refused, {} listed",
        served.len(),
        listed.len()
    );
    t.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_run_served_during_a_revocation_is_listed_sqlite() -> anyhow::Result<()> {
    resolves_race_revocations(None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_run_served_during_a_revocation_is_listed_postgres() -> anyhow::Result<()> {
    let Some(pg) = Postgres::start().await? else {
        return Ok(());
    };
    resolves_race_revocations(Some(pg.create_database("sealed_race").await?)).await
}
