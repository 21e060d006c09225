//! The identity service's gRPC handlers and their authorization table.
//!
//! Every enrollment, renewal, mint and revocation is recorded in audit before
//! it takes effect; when audit cannot record it, the RPC fails with
//! UNAVAILABLE and nothing is issued.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_mesh::audit::{self, AuditClient, Outcome};
use bulkhead_mesh::authz::{DenialSink, Policy, Rule, who};
use bulkhead_mesh::jwt::{self, Audience, Claims};
use bulkhead_mesh::pki::{Ca, SvidOptions};
use bulkhead_mesh::revocation::RevocationList;
use bulkhead_mesh::spiffe::{Principal, SpiffeId, TrustDomain};
use bulkhead_mesh::tls::RevocationCheck;
use bulkhead_mesh::{Caller, Error};
use bulkhead_proto::identity::v1 as pb;
use bulkhead_proto::identity::v1::identity_service_server::{
    IdentityService, IdentityServiceServer,
};
use futures::Stream;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::csr;
use crate::keys::JwtKeys;
use crate::store::{
    IdentityStore, IssuedRow, JoinTokenRow, ListChange, RevocationRow, StoreError, Target,
};

/// Who may call each RPC of `bulkhead.identity.v1.IdentityService`. A method
/// missing here is denied to everyone.
pub static RULES: &[Rule] = &[
    Rule::new("GetTrustBundle", &[who::ANYONE, who::UNAUTHENTICATED]),
    Rule::new("CreateJoinToken", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("ListJoinTokens", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("RevokeJoinToken", &[who::OPERATOR]),
    Rule::new("EnrollWorker", &[who::UNAUTHENTICATED]),
    Rule::new("RenewWorkerSvid", &[who::TENANT_WORKER, who::POOL_WORKER]),
    Rule::new("MintRunSvid", &[who::DISPATCHER]).tenant_scoped(),
    Rule::new("MintJwtSvid", &[who::RUN, who::POOL_RUN]),
    Rule::new(
        "ValidateJwtSvid",
        &[
            who::SEALED_VAULT,
            who::SANDBOX_RUNNER,
            who::DISPATCHER,
            who::AUDIT,
        ],
    ),
    Rule::new(
        "Revoke",
        &[
            who::OPERATOR,
            who::DISPATCHER,
            who::SANDBOX_RUNNER,
            who::SEALED_VAULT,
        ],
    )
    .tenant_scoped(),
    Rule::new(
        "WatchRevocations",
        &[
            who::SEALED_VAULT,
            who::SANDBOX_RUNNER,
            who::DISPATCHER,
            who::AUDIT,
            who::OPERATOR,
        ],
    ),
    Rule::new("ListRevocations", &[who::OPERATOR]).tenant_scoped(),
];

pub const POLICY: Policy = Policy {
    service: "bulkhead.identity.v1.IdentityService",
    rules: RULES,
};

/// Prefix of every join token secret.
const TOKEN_PREFIX: &str = "bhjt_";
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
const MAX_TOKEN_USES: u32 = 10_000;
/// How often expired revocation entries are swept.
const EXPIRY_SWEEP: Duration = Duration::from_secs(30);

/// Lifetimes, from the configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub run_svid_max_ttl: Duration,
    pub worker_svid_ttl: Duration,
    pub jwt_max_ttl: Duration,
}

/// Groups the records of concurrent issuances into one transaction: one
/// commit (one fsync) for many mints, and no writers racing for SQLite's lock.
#[derive(Debug, Clone)]
struct IssuedWriter {
    tx: tokio::sync::mpsc::Sender<(IssuedRow, tokio::sync::oneshot::Sender<Result<(), String>>)>,
}

/// Most rows committed together.
const ISSUED_GROUP: usize = 256;

impl IssuedWriter {
    fn start(store: Arc<dyn IdentityStore>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(
            IssuedRow,
            tokio::sync::oneshot::Sender<Result<(), String>>,
        )>(4096);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut group = vec![first];
                while group.len() < ISSUED_GROUP {
                    match rx.try_recv() {
                        Ok(item) => group.push(item),
                        Err(_) => break,
                    }
                }
                let rows: Vec<IssuedRow> = group.iter().map(|(r, _)| r.clone()).collect();
                let result = store
                    .put_issued_many(&rows)
                    .await
                    .map_err(|e| e.to_string());
                for (_, reply) in group {
                    let _ = reply.send(result.clone());
                }
            }
        });
        Self { tx }
    }

    async fn put(&self, row: IssuedRow) -> Result<(), Error> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let gone = || {
            Error::unavailable(
                "identity store",
                std::io::Error::other("issuance writer stopped"),
            )
        };
        self.tx.send((row, reply)).await.map_err(|_| gone())?;
        rx.await
            .map_err(|_| gone())?
            .map_err(|e| Error::unavailable("identity store", std::io::Error::other(e)))
    }
}

#[derive(Debug)]
struct Inner {
    issued: IssuedWriter,
    td: TrustDomain,
    ca: Ca,
    chain: Vec<CertificateDer<'static>>,
    authorities: Vec<CertificateDer<'static>>,
    store: Arc<dyn IdentityStore>,
    keys: Arc<JwtKeys>,
    audit: AuditClient,
    revocations: Arc<RevocationList>,
    changed: tokio::sync::watch::Sender<u64>,
    limits: Limits,
    draining: CancellationToken,
}

/// The service's handlers (cheap to clone).
#[derive(Debug, Clone)]
pub struct IdentityApi {
    inner: Arc<Inner>,
}

pub fn server(api: IdentityApi) -> IdentityServiceServer<IdentityApi> {
    IdentityServiceServer::new(api)
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn duration(d: Option<prost_types::Duration>) -> Result<Option<Duration>, ()> {
    match d {
        None => Ok(None),
        Some(d) if d.seconds < 0 || d.nanos < 0 => Err(()),
        Some(d) => Ok(Some(
            Duration::from_secs(d.seconds as u64) + Duration::from_nanos(d.nanos as u64),
        )),
    }
}

fn store_err(e: StoreError) -> Error {
    Error::unavailable("identity store", e)
}

/// Tenant and pool names: 1 to 63 bytes of [a-z0-9-], starting with a letter or digit.
fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// Ids minted by Bulkhead: 1 to 64 bytes of [A-Za-z0-9_-].
fn valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn tenant_or_pool(tenant: &str, pool: &str) -> Result<(), Error> {
    match (tenant.is_empty(), pool.is_empty()) {
        (false, true) if valid_name(tenant) => Ok(()),
        (true, false) if valid_name(pool) => Ok(()),
        (false, true) => Err(Error::invalid("tenant", "1 to 63 bytes of [a-z0-9-]")),
        (true, false) => Err(Error::invalid("pool", "1 to 63 bytes of [a-z0-9-]")),
        _ => Err(Error::invalid(
            "tenant",
            "exactly one of tenant and pool is required",
        )),
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn token_row_pb(t: &JoinTokenRow) -> pb::JoinToken {
    pb::JoinToken {
        token_id: t.token_id.clone(),
        tenant: t.tenant.clone(),
        pool: t.pool.clone(),
        description: t.description.clone(),
        expires_at: Some(ts(t.expires_at_ms)),
        max_uses: t.max_uses,
        uses: t.uses,
        created_by: t.created_by.clone(),
        created_at: Some(ts(t.created_at_ms)),
        revoked_at: t.revoked_at_ms.map(ts),
    }
}

fn revocation_pb(r: &RevocationRow) -> pb::Revocation {
    use pb::revocation::Target as T;
    pb::Revocation {
        sequence: r.sequence,
        tenant: r.tenant.clone(),
        target: Some(match &r.target {
            Target::Run(id) => T::RunId(id.clone()),
            Target::Worker(id) => T::WorkerId(id.clone()),
            Target::WholeTenant => T::WholeTenant(true),
            Target::Serial(s) => T::Serial(s.clone()),
        }),
        spiffe_id: r.spiffe_id.clone(),
        hard: r.hard,
        reason: r.reason.clone(),
        revoked_by: r.revoked_by.clone(),
        revoked_at: Some(ts(r.revoked_at_ms)),
        expires_at: r.expires_at_ms.map(ts),
    }
}

fn list_delta(changes: &[ListChange]) -> pb::RevocationDelta {
    let mut d = pb::RevocationDelta::default();
    for c in changes {
        match c {
            ListChange::Added(r) => d.added.push(revocation_pb(r)),
            ListChange::Removed { entry_sequence, .. } => d.removed.push(*entry_sequence),
        }
    }
    d
}

fn change_sequence(c: &ListChange) -> u64 {
    match c {
        ListChange::Added(r) => r.sequence,
        ListChange::Removed { sequence, .. } => *sequence,
    }
}

/// The pieces identity is built from.
#[derive(Debug)]
pub struct Parts {
    pub ca: Ca,
    pub authorities: Vec<CertificateDer<'static>>,
    pub store: Arc<dyn IdentityStore>,
    pub keys: Arc<JwtKeys>,
    pub audit: AuditClient,
    pub limits: Limits,
    pub draining: CancellationToken,
}

impl IdentityApi {
    /// Loads the revocation list from the store and starts the sweeper of
    /// expired entries and the JWT key rotation (both stop with `stop`).
    pub async fn start(parts: Parts, stop: CancellationToken) -> Result<Self, StoreError> {
        let revocations = Arc::new(RevocationList::new());
        let (entries, seq) = parts.store.revocations().await?;
        revocations.apply_snapshot(seq, &entries.iter().map(revocation_pb).collect::<Vec<_>>());
        let (changed, _) = tokio::sync::watch::channel(seq);
        let chain = parts.ca.chain();
        let api = Self {
            inner: Arc::new(Inner {
                issued: IssuedWriter::start(parts.store.clone()),
                td: parts.ca.trust_domain().clone(),
                ca: parts.ca,
                chain,
                authorities: parts.authorities,
                store: parts.store,
                keys: parts.keys,
                audit: parts.audit,
                revocations,
                changed,
                limits: parts.limits,
                draining: parts.draining,
            }),
        };
        tokio::spawn(api.clone().housekeeping(stop));
        Ok(api)
    }

    /// The list this server enforces on its own callers.
    pub fn revocations(&self) -> Arc<RevocationList> {
        self.inner.revocations.clone()
    }

    async fn housekeeping(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_sweep = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.inner.keys.tick(now_ms()) {
                tracing::error!(error = %e, "jwt key rotation failed");
            }
            if last_sweep.elapsed() >= EXPIRY_SWEEP {
                last_sweep = tokio::time::Instant::now();
                if let Err(e) = self.sweep().await {
                    tracing::warn!(error = %e, "revocation expiry sweep failed");
                }
            }
        }
    }

    /// Drops revocation entries whose certificates have all expired.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let removed = self.inner.store.expire_revocations(now_ms()).await?;
        if let Some(last) = removed.last() {
            let seq = change_sequence(last);
            self.inner
                .revocations
                .apply_delta(seq, &list_delta(&removed));
            self.inner.changed.send_replace(seq);
        }
        Ok(removed.len())
    }

    fn chain_der(&self, leaf: CertificateDer<'static>) -> Vec<bytes::Bytes> {
        std::iter::once(leaf)
            .chain(self.inner.chain.iter().cloned())
            .map(|c| bytes::Bytes::from(c.to_vec()))
            .collect()
    }

    /// Signs `spki` for `id` and records it.
    async fn issue(
        &self,
        id: &SpiffeId,
        spki: &[u8],
        ttl: Duration,
        row: IssuedRow,
    ) -> Result<pb::X509Svid, Error> {
        let opts = SvidOptions {
            ttl: time::Duration::try_from(ttl).unwrap_or(time::Duration::minutes(15)),
            ..SvidOptions::default()
        };
        let cert = self
            .inner
            .ca
            .sign_spki(id, spki, &opts)
            .map_err(Error::internal)?;
        let row = IssuedRow {
            serial: cert.serial_hex.clone(),
            spiffe_id: id.to_string(),
            not_after_ms: cert.not_after * 1000,
            issued_at_ms: now_ms(),
            ..row
        };
        self.inner.issued.put(row).await?;
        Ok(pb::X509Svid {
            cert_chain_der: self.chain_der(cert.der),
            spiffe_id: id.to_string(),
            expires_at: Some(ts(cert.not_after * 1000)),
            serial: cert.serial_hex,
        })
    }

    async fn audit(&self, event: bulkhead_proto::audit::v1::NewEvent) -> Result<(), Error> {
        self.inner.audit.record_one(event).await.map(|_| ())
    }

    /// Adds a revocation entry (and, for a worker, one per run it holds).
    async fn add_revocation(&self, row: RevocationRow) -> Result<u64, Error> {
        let mut added = Vec::new();
        let worker = match &row.target {
            Target::Worker(w) => Some(w.clone()),
            _ => None,
        };
        let seq = self
            .inner
            .store
            .add_revocation(&row)
            .await
            .map_err(store_err)?;
        added.push(RevocationRow {
            sequence: seq,
            ..row.clone()
        });
        if let Some(w) = worker {
            let runs = self
                .inner
                .store
                .runs_of_worker(&w, now_ms())
                .await
                .map_err(store_err)?;
            for run in runs {
                let derived = RevocationRow {
                    sequence: 0,
                    tenant: run.tenant.clone(),
                    target: Target::Run(run.run_id.clone()),
                    spiffe_id: run.spiffe_id.clone(),
                    expires_at_ms: Some(run.not_after_ms),
                    reason: format!("worker {w} revoked: {}", row.reason),
                    ..row.clone()
                };
                let s = self
                    .inner
                    .store
                    .add_revocation(&derived)
                    .await
                    .map_err(store_err)?;
                added.push(RevocationRow {
                    sequence: s,
                    ..derived
                });
            }
        }
        let last = added.last().map_or(seq, |r| r.sequence);
        self.inner.revocations.apply_delta(
            last,
            &pb::RevocationDelta {
                added: added.iter().map(revocation_pb).collect(),
                removed: vec![],
            },
        );
        self.inner.changed.send_replace(last);
        Ok(seq)
    }
}

/// Records every refusal of the authorization layer as identity.access_denied.
#[derive(Debug, Clone)]
pub struct AuditDenials {
    audit: AuditClient,
}

impl AuditDenials {
    pub fn new(audit: AuditClient) -> Self {
        Self { audit }
    }
}

impl DenialSink for AuditDenials {
    fn denied(&self, caller: Option<&SpiffeId>, method: &str, reason: &str) {
        let tenant = caller.and_then(|c| c.principal().tenant().map(str::to_owned));
        let event = audit::event(
            "identity.access_denied",
            tenant.as_deref().unwrap_or(""),
            "",
            Outcome::Denied,
            [
                (
                    "caller",
                    caller.map_or_else(|| "<unauthenticated>".into(), ToString::to_string),
                ),
                ("method", method.to_owned()),
                ("reason", reason.to_owned()),
            ],
        );
        let audit = self.audit.clone();
        tokio::spawn(async move {
            if let Err(e) = audit.record_one(event).await {
                tracing::warn!(error = %e, "could not audit a refused request");
            }
        });
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl IdentityService for IdentityApi {
    async fn get_trust_bundle(
        &self,
        _req: Request<pb::GetTrustBundleRequest>,
    ) -> Result<Response<pb::GetTrustBundleResponse>, Status> {
        Ok(Response::new(pb::GetTrustBundleResponse {
            trust_domain: self.inner.td.to_string(),
            x509_authorities_der: self
                .inner
                .authorities
                .iter()
                .map(|c| bytes::Bytes::from(c.to_vec()))
                .collect(),
            jwt_authorities_jwks: self.inner.keys.jwks(),
            sequence: self.inner.keys.sequence(),
            refresh_hint: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        }))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        tenant_or_pool(&r.tenant, &r.pool)?;
        let ttl = duration(r.ttl)
            .map_err(|()| Error::invalid("ttl", "must not be negative"))?
            .unwrap_or(DEFAULT_TOKEN_TTL);
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(Error::invalid("ttl", "between 1 second and 30 days").into());
        }
        let max_uses = if r.max_uses == 0 { 1 } else { r.max_uses };
        if max_uses > MAX_TOKEN_USES {
            return Err(Error::invalid("max_uses", "at most 10000").into());
        }
        if r.description.len() > 256 {
            return Err(Error::invalid("description", "at most 256 bytes").into());
        }
        let token_id = random_hex(8);
        let secret = format!("{TOKEN_PREFIX}{token_id}.{}", random_hex(32));
        let now = now_ms();
        let row = JoinTokenRow {
            token_id: token_id.clone(),
            secret_hash: Sha256::digest(secret.as_bytes()).into(),
            tenant: r.tenant.clone(),
            pool: r.pool.clone(),
            description: r.description,
            expires_at_ms: now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
            max_uses,
            uses: 0,
            created_by: caller.id.to_string(),
            created_at_ms: now,
            revoked_at_ms: None,
        };
        self.audit(audit::event(
            "identity.join_token.created",
            &r.tenant,
            "",
            Outcome::Success,
            [
                ("token_id", token_id),
                ("pool", r.pool),
                ("max_uses", max_uses.to_string()),
                ("by", caller.id.to_string()),
            ],
        ))
        .await?;
        self.inner
            .store
            .put_join_token(&row)
            .await
            .map_err(store_err)?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            join_token: Some(token_row_pb(&row)),
            token: secret,
        }))
    }

    async fn list_join_tokens(
        &self,
        req: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        let r = req.into_inner();
        let limit = match r.page_size {
            0 => 100,
            n => n.min(1000),
        };
        let mut rows = self
            .inner
            .store
            .list_join_tokens(
                &r.tenant,
                &r.pool,
                r.include_inactive,
                now_ms(),
                &r.page_token,
                limit + 1,
            )
            .await
            .map_err(store_err)?;
        let next = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last().map(|t| t.token_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListJoinTokensResponse {
            join_tokens: rows.iter().map(token_row_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn revoke_join_token(
        &self,
        req: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::RevokeJoinTokenResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let existing = self
            .inner
            .store
            .get_join_token(&r.token_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Error::NotFound(format!("join token {}", r.token_id)))?;
        self.audit(audit::event(
            "identity.join_token.revoked",
            &existing.tenant,
            "",
            Outcome::Success,
            [
                ("token_id", r.token_id.clone()),
                ("reason", r.reason),
                ("by", caller.id.to_string()),
            ],
        ))
        .await?;
        let row = self
            .inner
            .store
            .revoke_join_token(&r.token_id, now_ms())
            .await
            .map_err(store_err)?
            .ok_or_else(|| Error::NotFound(format!("join token {}", r.token_id)))?;
        Ok(Response::new(pb::RevokeJoinTokenResponse {
            join_token: Some(token_row_pb(&row)),
        }))
    }

    async fn enroll_worker(
        &self,
        req: Request<pb::EnrollWorkerRequest>,
    ) -> Result<Response<pb::EnrollWorkerResponse>, Status> {
        let r = req.into_inner();
        let refused = || Status::unauthenticated("invalid join token");
        if !valid_name(&r.worker_name) {
            return Err(Error::invalid("worker_name", "1 to 63 bytes of [a-z0-9-]").into());
        }
        let token_id = r
            .join_token
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|t| t.split_once('.'))
            .map(|(id, _)| id.to_owned())
            .ok_or_else(refused)?;
        let hash: [u8; 32] = Sha256::digest(r.join_token.as_bytes()).into();
        let token = match self
            .inner
            .store
            .use_join_token(&token_id, &hash, now_ms())
            .await
            .map_err(store_err)?
        {
            Ok(t) => t,
            Err(why) => {
                tracing::info!(token_id, reason = ?why, "join token refused");
                let _ = self
                    .audit(audit::event(
                        "identity.enrollment_refused",
                        "",
                        "",
                        Outcome::Denied,
                        [
                            ("token_id", token_id.clone()),
                            ("reason", format!("{why:?}").to_lowercase()),
                        ],
                    ))
                    .await;
                return Err(refused());
            }
        };
        // From here on, a failure gives the use back: nothing was issued.
        let result: Result<pb::EnrollWorkerResponse, Error> = async {
            let spki = csr::accept(&r.csr_der).map_err(|e| Error::invalid("csr_der", e))?;
            // The id stays within the 64 bytes every id has: the name is cut
            // to 55 bytes (it is ASCII) before the random suffix.
            let stem = &r.worker_name[..r.worker_name.len().min(55)];
            let worker_id = format!("{stem}-{}", random_hex(4));
            let (path, tenant, pool) = if token.tenant.is_empty() {
                (
                    ["pool", token.pool.as_str(), "worker", worker_id.as_str()],
                    "",
                    token.pool.as_str(),
                )
            } else {
                (
                    [
                        "tenant",
                        token.tenant.as_str(),
                        "worker",
                        worker_id.as_str(),
                    ],
                    token.tenant.as_str(),
                    "",
                )
            };
            let id = self
                .inner
                .td
                .join(path)
                .map_err(|e| Error::invalid("worker_name", e))?;
            self.audit(audit::event(
                "worker.enrolled",
                tenant,
                "",
                Outcome::Success,
                [
                    ("worker_id", worker_id.clone()),
                    ("spiffe_id", id.to_string()),
                    ("pool", pool.to_owned()),
                    ("token_id", token.token_id.clone()),
                ],
            ))
            .await?;
            let svid = self
                .issue(
                    &id,
                    &spki,
                    self.inner.limits.worker_svid_ttl,
                    IssuedRow {
                        serial: String::new(),
                        spiffe_id: String::new(),
                        kind: "worker".into(),
                        tenant: tenant.to_owned(),
                        pool: pool.to_owned(),
                        worker_id: worker_id.clone(),
                        run_id: String::new(),
                        not_after_ms: 0,
                        issued_at_ms: 0,
                    },
                )
                .await?;
            Ok(pb::EnrollWorkerResponse {
                worker_id,
                tenant: tenant.to_owned(),
                pool: pool.to_owned(),
                svid: Some(svid),
            })
        }
        .await;
        match result {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                if let Err(re) = self
                    .inner
                    .store
                    .release_join_token_use(&token.token_id)
                    .await
                {
                    tracing::error!(error = %re, "could not give back a join token use");
                }
                Err(e.into())
            }
        }
    }

    async fn renew_worker_svid(
        &self,
        req: Request<pb::RenewWorkerSvidRequest>,
    ) -> Result<Response<pb::RenewWorkerSvidResponse>, Status> {
        let caller = Caller::of(&req)?;
        let (tenant, pool, worker) = match caller.principal() {
            Principal::TenantWorker { tenant, worker } => {
                (tenant.to_owned(), String::new(), worker.to_owned())
            }
            Principal::PoolWorker { pool, worker } => {
                (String::new(), pool.to_owned(), worker.to_owned())
            }
            _ => return Err(Error::denied("only workers renew worker svids").into()),
        };
        let spki = csr::accept(&req.get_ref().csr_der).map_err(|e| Error::invalid("csr_der", e))?;
        self.audit(audit::event(
            "identity.worker.renewed",
            &tenant,
            "",
            Outcome::Success,
            [
                ("worker_id", worker.clone()),
                ("spiffe_id", caller.id.to_string()),
            ],
        ))
        .await?;
        let svid = self
            .issue(
                &caller.id,
                &spki,
                self.inner.limits.worker_svid_ttl,
                IssuedRow {
                    serial: String::new(),
                    spiffe_id: String::new(),
                    kind: "worker".into(),
                    tenant,
                    pool,
                    worker_id: worker,
                    run_id: String::new(),
                    not_after_ms: 0,
                    issued_at_ms: 0,
                },
            )
            .await?;
        Ok(Response::new(pb::RenewWorkerSvidResponse {
            svid: Some(svid),
        }))
    }

    async fn mint_run_svid(
        &self,
        req: Request<pb::MintRunSvidRequest>,
    ) -> Result<Response<pb::MintRunSvidResponse>, Status> {
        let r = req.into_inner();
        tenant_or_pool(&r.tenant, &r.pool)?;
        if !valid_id(&r.run_id) {
            return Err(Error::invalid("run_id", "1 to 64 bytes of [A-Za-z0-9_-]").into());
        }
        if !valid_id(&r.worker_id) {
            return Err(
                Error::invalid("worker_id", "required: 1 to 64 bytes of [A-Za-z0-9_-]").into(),
            );
        }
        let max = self.inner.limits.run_svid_max_ttl;
        let ttl = duration(r.ttl)
            .map_err(|()| Error::invalid("ttl", "must not be negative"))?
            .unwrap_or(max)
            .min(max);
        if ttl < Duration::from_secs(60) {
            return Err(Error::invalid("ttl", "at least 1 minute").into());
        }
        let spki = csr::accept(&r.csr_der).map_err(|e| Error::invalid("csr_der", e))?;
        let (scope, name) = if r.tenant.is_empty() {
            ("pool", &r.pool)
        } else {
            ("tenant", &r.tenant)
        };
        let id = self
            .inner
            .td
            .join([scope, name.as_str(), "run", r.run_id.as_str()])
            .map_err(|e| Error::invalid("run_id", e))?;
        let worker_id = self
            .inner
            .td
            .join([scope, name.as_str(), "worker", r.worker_id.as_str()])
            .map_err(|e| Error::invalid("worker_id", e))?;
        if self.inner.revocations.revoked(&id, None)
            || self.inner.revocations.revoked(&worker_id, None)
        {
            return Err(Error::FailedPrecondition(
                "the run, its worker or its tenant is revoked".into(),
            )
            .into());
        }
        if let Some(holder) = self
            .inner
            .store
            .run_worker(&r.run_id)
            .await
            .map_err(store_err)?
            && holder != r.worker_id
        {
            return Err(Error::AlreadyExists(format!("an svid for run {}", r.run_id)).into());
        }
        self.audit(audit::event(
            "identity.run_minted",
            &r.tenant,
            &r.run_id,
            Outcome::Success,
            [
                ("spiffe_id", id.to_string()),
                ("worker_id", r.worker_id.clone()),
                ("ttl_secs", ttl.as_secs().to_string()),
            ],
        ))
        .await?;
        let svid = self
            .issue(
                &id,
                &spki,
                ttl,
                IssuedRow {
                    serial: String::new(),
                    spiffe_id: String::new(),
                    kind: "run".into(),
                    tenant: r.tenant.clone(),
                    pool: r.pool.clone(),
                    worker_id: r.worker_id.clone(),
                    run_id: r.run_id.clone(),
                    not_after_ms: 0,
                    issued_at_ms: 0,
                },
            )
            .await?;
        Ok(Response::new(pb::MintRunSvidResponse { svid: Some(svid) }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let tenant = caller.tenant().unwrap_or_default().to_owned();
        let run = caller.principal().run().unwrap_or_default().to_owned();
        if !r.spiffe_id.is_empty() && r.spiffe_id != caller.id.as_str() {
            let _ = self
                .audit(audit::event(
                    "identity.access_denied",
                    &tenant,
                    &run,
                    Outcome::Denied,
                    [
                        ("caller", caller.id.to_string()),
                        ("method", "MintJwtSvid".to_owned()),
                        ("reason", "a jwt-svid in another identity's name".to_owned()),
                        ("requested", r.spiffe_id.chars().take(256).collect()),
                    ],
                ))
                .await;
            return Err(Error::denied("a run gets tokens in its own name only").into());
        }
        if r.audience.is_empty()
            || r.audience.len() > 256
            || r.audience.chars().any(char::is_control)
        {
            return Err(Error::invalid("audience", "1 to 256 bytes").into());
        }
        let max = self.inner.limits.jwt_max_ttl;
        let ttl = duration(r.ttl)
            .map_err(|()| Error::invalid("ttl", "must not be negative"))?
            .unwrap_or(max)
            .min(max);
        if ttl.is_zero() {
            return Err(Error::invalid("ttl", "must be positive").into());
        }
        let now = now_ms() / 1000;
        let mut exp = now + i64::try_from(ttl.as_secs()).unwrap_or(300);
        // The token never outlives the run's X.509-SVID.
        if let Some(cert_exp) = caller.not_after {
            exp = exp.min(cert_exp);
        }
        if exp <= now {
            return Err(Error::FailedPrecondition("the run's svid has expired".into()).into());
        }
        let jti = random_hex(12);
        self.audit(audit::event(
            "identity.jwt_minted",
            &tenant,
            &run,
            Outcome::Success,
            [
                ("spiffe_id", caller.id.to_string()),
                ("audience", r.audience.clone()),
                ("jti", jti.clone()),
                ("exp", exp.to_string()),
            ],
        ))
        .await?;
        let token = self
            .inner
            .keys
            .sign(&Claims {
                sub: caller.id.to_string(),
                aud: Some(Audience::One(r.audience)),
                exp: Some(exp),
                iat: Some(now),
                jti: Some(jti),
            })
            .map_err(Error::internal)?;
        Ok(Response::new(pb::MintJwtSvidResponse {
            token,
            expires_at: Some(ts(exp * 1000)),
            spiffe_id: caller.id.to_string(),
        }))
    }

    async fn validate_jwt_svid(
        &self,
        req: Request<pb::ValidateJwtSvidRequest>,
    ) -> Result<Response<pb::ValidateJwtSvidResponse>, Status> {
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Error::invalid("audience", "required").into());
        }
        let v = jwt::validate(
            &r.token,
            &self.inner.keys.bundle(),
            &self.inner.td,
            &r.audience,
            now_ms() / 1000,
            self.inner.revocations.as_ref(),
        )
        .map_err(|e| match e {
            jwt::JwtError::Malformed => Status::invalid_argument("invalid token: not a jws"),
            other => Status::unauthenticated(format!("invalid token: {other}")),
        })?;
        Ok(Response::new(pb::ValidateJwtSvidResponse {
            spiffe_id: v.subject.to_string(),
            claims_json: serde_json::to_string(&v.claims).unwrap_or_default(),
            expires_at: Some(ts(v.expires_at * 1000)),
        }))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        use pb::revoke_request::Target as T;
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        if r.reason.is_empty() || r.reason.len() > 512 {
            return Err(Error::invalid("reason", "1 to 512 bytes").into());
        }
        if !r.tenant.is_empty() && !valid_name(&r.tenant) {
            return Err(Error::invalid("tenant", "1 to 63 bytes of [a-z0-9-]").into());
        }
        let td = &self.inner.td;
        let store = &self.inner.store;
        let (target, spiffe_id, expires_at_ms) = match r.target {
            Some(T::RunId(ref id)) | Some(T::WorkerId(ref id)) => {
                let (kind, field) = match r.target {
                    Some(T::RunId(_)) => ("run", "run_id"),
                    _ => ("worker", "worker_id"),
                };
                if !valid_id(id) {
                    return Err(Error::invalid(field, "1 to 64 bytes of [A-Za-z0-9_-]").into());
                }
                // What identity issued names the tenant or pool; a request
                // naming another tenant finds nothing.
                let issued = store
                    .find_issued(kind, id)
                    .await
                    .map_err(store_err)?
                    .filter(|row| r.tenant.is_empty() || row.tenant == r.tenant)
                    .filter(|row| !r.tenant.is_empty() || row.tenant.is_empty())
                    .ok_or_else(|| Error::NotFound(format!("{kind} {id}")))?;
                let spiffe_id = if kind == "run" {
                    issued.spiffe_id.clone()
                } else {
                    let (scope, name) = if issued.tenant.is_empty() {
                        ("pool", issued.pool.as_str())
                    } else {
                        ("tenant", issued.tenant.as_str())
                    };
                    td.join([scope, name, "worker", id.as_str()])
                        .map_err(|e| Error::invalid(field, e))?
                        .to_string()
                };
                let exp = store.max_not_after(&spiffe_id).await.map_err(store_err)?;
                let target = if kind == "run" {
                    Target::Run(id.clone())
                } else {
                    Target::Worker(id.clone())
                };
                (target, spiffe_id, exp)
            }
            Some(T::WholeTenant(true)) => {
                if r.tenant.is_empty() {
                    return Err(
                        Error::invalid("tenant", "required for a whole-tenant revocation").into(),
                    );
                }
                (
                    Target::WholeTenant,
                    format!("spiffe://{td}/tenant/{}/", r.tenant),
                    None,
                )
            }
            Some(T::Serial(s)) => {
                // Canonical: lowercase, no leading zeros (as the verifier compares).
                let s = s.to_ascii_lowercase().trim_start_matches('0').to_owned();
                if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Error::invalid("serial", "lowercase hex, at most 64 digits").into());
                }
                // A certificate identity did not issue may live a year (pki issue's default).
                let exp = now_ms() + 366 * 24 * 3600 * 1000;
                (Target::Serial(s), String::new(), Some(exp))
            }
            _ => {
                return Err(Error::invalid(
                    "target",
                    "one of run_id, worker_id, whole_tenant or serial",
                )
                .into());
            }
        };
        let row = RevocationRow {
            sequence: 0,
            tenant: r.tenant.clone(),
            target,
            spiffe_id,
            hard: r.hard,
            reason: r.reason.clone(),
            revoked_by: caller.id.to_string(),
            revoked_at_ms: now_ms(),
            expires_at_ms,
        };
        self.audit(audit::event(
            "identity.revoked",
            &r.tenant,
            match &row.target {
                Target::Run(run) => run.as_str(),
                _ => "",
            },
            Outcome::Success,
            [
                ("target", format!("{:?}", row.target)),
                ("spiffe_id", row.spiffe_id.clone()),
                ("hard", r.hard.to_string()),
                ("reason", r.reason),
                ("by", caller.id.to_string()),
            ],
        ))
        .await?;
        let seq = self.add_revocation(row.clone()).await?;
        Ok(Response::new(pb::RevokeResponse {
            sequence: seq,
            revocation: Some(revocation_pb(&RevocationRow {
                sequence: seq,
                ..row
            })),
        }))
    }

    async fn watch_revocations(
        &self,
        req: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<BoxStream<pb::WatchRevocationsResponse>>, Status> {
        let from = req.into_inner().from_sequence;
        let store = self.inner.store.clone();
        let mut changed = self.inner.changed.subscribe();
        let draining = self.inner.draining.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let send = |m: pb::WatchRevocationsResponse| {
                let tx = tx.clone();
                async move { tx.send(Ok(m)).await.is_ok() }
            };
            // Resume from `from` when the history reaches back that far,
            // otherwise start over from a snapshot.
            let resumed = if from > 0 {
                store.changes_since(from).await.ok().flatten()
            } else {
                None
            };
            let mut sent = match resumed {
                Some(changes) => {
                    let seq = changes.last().map_or(from, change_sequence);
                    // Sent even when empty: a resumed watcher learns it is
                    // current (and marks itself synced) without waiting for
                    // the next revocation.
                    if !send(pb::WatchRevocationsResponse {
                        sequence: seq,
                        update: Some(pb::watch_revocations_response::Update::Delta(list_delta(
                            &changes,
                        ))),
                    })
                    .await
                    {
                        return;
                    }
                    seq
                }
                None => match store.revocations().await {
                    Ok((entries, seq)) => {
                        let snapshot = pb::RevocationSnapshot {
                            revocations: entries.iter().map(revocation_pb).collect(),
                        };
                        if !send(pb::WatchRevocationsResponse {
                            sequence: seq,
                            update: Some(pb::watch_revocations_response::Update::Snapshot(
                                snapshot,
                            )),
                        })
                        .await
                        {
                            return;
                        }
                        seq
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(store_err(e)))).await;
                        return;
                    }
                },
            };
            loop {
                tokio::select! {
                    () = draining.cancelled() => return,
                    r = changed.changed() => if r.is_err() { return },
                }
                let changes = match store.changes_since(sent).await {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(Status::failed_precondition(
                                "history lost: resubscribe",
                            )))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(store_err(e)))).await;
                        return;
                    }
                };
                if let Some(last) = changes.last() {
                    let seq = change_sequence(last);
                    if !send(pb::WatchRevocationsResponse {
                        sequence: seq,
                        update: Some(pb::watch_revocations_response::Update::Delta(list_delta(
                            &changes,
                        ))),
                    })
                    .await
                    {
                        return;
                    }
                    sent = seq;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_revocations(
        &self,
        req: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        let r = req.into_inner();
        let (entries, seq) = self.inner.store.revocations().await.map_err(store_err)?;
        let after: u64 = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse()
                .map_err(|_| Error::invalid("page_token", "unknown token"))?
        };
        let limit = match r.page_size {
            0 => 100,
            n => n.min(1000),
        } as usize;
        let mut page: Vec<_> = entries
            .iter()
            .filter(|e| r.tenant.is_empty() || e.tenant == r.tenant)
            .filter(|e| e.sequence > after)
            .take(limit + 1)
            .collect();
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last()
                .map(|e| e.sequence.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListRevocationsResponse {
            revocations: page.into_iter().map(revocation_pb).collect(),
            sequence: seq,
            next_page_token: next,
        }))
    }
}
