//! The sealed-vault service's gRPC handlers and their authorization table.
//!
//! Values go in and never come out, except through Resolve (a sandbox-runner
//! holding the JWT-SVID of a live run of the same tenant) and RevealSecret
//! (operators, audited, rate-limited). Every action is recorded in audit
//! before it takes effect; when audit cannot record it, nothing happens.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_mesh::audit::{self, AuditClient, Outcome};
use bulkhead_mesh::authz::{Policy, Rule, who};
use bulkhead_mesh::jwt::{self, JwtBundle};
use bulkhead_mesh::revocation::RevocationList;
use bulkhead_mesh::spiffe::{Principal, SpiffeId, TrustDomain};
use bulkhead_mesh::{Caller, Error};
use bulkhead_proto::identity::v1 as idpb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_proto::sealed::v1 as pb;
use bulkhead_proto::sealed::v1::sealed_vault_service_server::{
    SealedVaultService, SealedVaultServiceServer,
};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::backend::{Backends, ErrorKind, Reference, ResolveContext};
use crate::cascade::{self, Entry, Level, Origin, Override, Revoked, Source};
use crate::crypto::{self, MasterKey};
use crate::holdings::{self, HoldingsWriter};
use crate::secret::SecretValue;
use crate::store::{
    Lift, NewRevocation, ProfileQuery, ProfileSpec, RevocationQuery, SealedStore, SecretMaterial,
    SecretRevocation, SecretVersion, StoreError, Tenants, VersionId,
};

/// Who may call each RPC of `bulkhead.sealed.v1.SealedVaultService`. A method missing
/// here is denied to everyone.
pub static RULES: &[Rule] = &[
    Rule::new("CreateProfile", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("UpdateProfile", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("GetProfile", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("ListProfiles", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("DeleteProfile", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("PutSecret", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("DeleteSecret", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("RevealSecret", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("Resolve", &[who::SANDBOX_RUNNER]).tenant_scoped(),
    Rule::new("Snapshot", &[who::DISPATCHER]).tenant_scoped(),
    Rule::new("PreviewCascade", &[who::OPERATOR, who::TENANT_CLIENT]).tenant_scoped(),
    Rule::new("RevokeSecret", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("LiftRevocation", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("ListRevocations", &[who::OPERATOR]).tenant_scoped(),
    Rule::new("RotateMasterKey", &[who::OPERATOR]),
    Rule::new("ExportStore", &[who::OPERATOR]),
    Rule::new("ImportStore", &[who::OPERATOR]),
];

pub const POLICY: Policy = Policy {
    service: "bulkhead.sealed.v1.SealedVaultService",
    rules: RULES,
};

/// Largest secret value, in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Attributes audit takes on one event, and bytes in one value.
const AUDIT_MAX_ATTRIBUTES: usize = 32;
const AUDIT_MAX_VALUE: usize = 1024;

/// A comma-separated list as audit attributes of at most 1,024 bytes each:
/// `name`, then `name.1`, `name.2`, … when it is longer (an item is never
/// cut). Nothing when the list is empty but `name` itself, empty.
fn split_attribute(name: &str, items: &[String]) -> Vec<(String, String)> {
    let mut values = vec![String::new()];
    for item in items {
        let current = values.last_mut().expect("never empty");
        if !current.is_empty() && current.len() + 1 + item.len() > AUDIT_MAX_VALUE {
            values.push(item.clone());
        } else {
            if !current.is_empty() {
                current.push(',');
            }
            current.push_str(item);
        }
    }
    holdings::numbered(name, values)
}

/// How often the JWT bundle is refreshed from identity.
const BUNDLE_REFRESH: Duration = Duration::from_secs(30);

/// What the service is built from.
#[derive(Debug)]
pub struct Parts {
    pub trust_domain: TrustDomain,
    /// The audience run JWT-SVIDs must name: sealed-vault's own SPIFFE ID.
    pub audience: String,
    pub store: Arc<dyn SealedStore>,
    pub master: MasterKey,
    pub previous: Vec<MasterKey>,
    pub fingerprint_key: SecretValue,
    pub backends: Backends,
    pub audit: AuditClient,
    pub identity: IdentityServiceClient<bulkhead_mesh::client::MeshChannel>,
    pub revocations: Arc<RevocationList>,
    pub reveals_per_minute: u32,
    /// Where the run holdings a power cut may have taken are replayed from
    /// at start (see `crate::holdings`); RevokeSecret waits for it. `None`
    /// only where the store is known whole (tests and benchmarks that made
    /// it).
    pub recover_holdings: Option<holdings::AuditReader>,
}

#[derive(Debug)]
struct Inner {
    parts: Parts,
    bundle: tokio::sync::RwLock<Option<(JwtBundle, Instant)>>,
    /// Which runs resolved which keys, for RevokeSecret's affected runs.
    holdings: HoldingsWriter,
    /// Whether the holdings are whole again after a start.
    recovered: holdings::Recovered,
    reveals: Mutex<HashMap<String, (Instant, u32)>>,
}

/// The service's handlers (cheap to clone).
#[derive(Debug, Clone)]
pub struct SealedVaultApi {
    inner: Arc<Inner>,
}

/// The gRPC server for [`SealedVaultApi`].
pub fn server(api: SealedVaultApi) -> SealedVaultServiceServer<SealedVaultApi> {
    SealedVaultServiceServer::new(api)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

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

fn store_err(e: StoreError) -> Error {
    match e {
        StoreError::ProfileNotFound { tenant, profile } => {
            Error::NotFound(format!("profile {tenant}/{profile}"))
        }
        StoreError::SecretNotFound {
            tenant,
            profile,
            key,
        } => Error::NotFound(format!("secret {key} of profile {tenant}/{profile}")),
        StoreError::RevocationNotFound { id } => Error::NotFound(format!("revocation {id}")),
        StoreError::ProfileExists { tenant, profile } => {
            Error::AlreadyExists(format!("profile {tenant}/{profile}"))
        }
        e @ (StoreError::StaleRevision { .. }
        | StoreError::KeyCollision { .. }
        | StoreError::AlreadyLifted { .. }
        | StoreError::NotEmpty
        | StoreError::VersionConflict { .. }) => Error::FailedPrecondition(e.to_string()),
        StoreError::Invalid(why) => Error::invalid("request", why),
        other => Error::unavailable("sealed store", other),
    }
}

/// Tenant and profile names: 1 to 63 bytes of [a-z0-9-].
fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// Profile names: 1 to 64 bytes of [A-Za-z0-9._-], not "." or "..".
fn valid_profile(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && s != "."
        && s != ".."
}

fn check_profile(field: &'static str, s: &str) -> Result<(), Error> {
    if valid_profile(s) {
        Ok(())
    } else {
        Err(Error::invalid(field, "1 to 64 bytes of [A-Za-z0-9._-]"))
    }
}

/// Secret and env keys: 1 to 128 bytes of [A-Za-z0-9_], not starting with a digit.
fn valid_key(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

fn check_name(field: &'static str, s: &str) -> Result<(), Error> {
    if valid_name(s) {
        Ok(())
    } else {
        Err(Error::invalid(field, "1 to 63 bytes of [a-z0-9-]"))
    }
}

fn check_key(field: &'static str, s: &str) -> Result<(), Error> {
    if valid_key(s) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "1 to 128 bytes of [A-Za-z0-9_], not starting with a digit",
        ))
    }
}

fn spec_from_pb(spec: Option<pb::ProfileSpec>) -> Result<ProfileSpec, Error> {
    let spec = spec.unwrap_or_default();
    if spec.description.len() > 1024 {
        return Err(Error::invalid("spec.description", "at most 1024 bytes"));
    }
    if spec.tags.len() > 32 || spec.tags.iter().any(|t| t.len() > 64) {
        return Err(Error::invalid("spec.tags", "at most 32 tags of 64 bytes"));
    }
    if spec.env.len() > 256 {
        return Err(Error::invalid("spec.env", "at most 256 entries"));
    }
    for (k, v) in &spec.env {
        check_key("spec.env", k)?;
        if v.len() > 4096 {
            return Err(Error::invalid("spec.env", "values are at most 4096 bytes"));
        }
    }
    for (tool, keys) in &spec.tool_acl {
        if tool.is_empty() || tool.len() > 128 {
            return Err(Error::invalid(
                "spec.tool_acl",
                "tool names are 1 to 128 bytes",
            ));
        }
        for k in &keys.keys {
            check_key("spec.tool_acl", k)?;
        }
    }
    Ok(ProfileSpec {
        description: spec.description,
        owner: spec.owner,
        tags: spec.tags,
        allowed_agents: spec.allowed_agents,
        env: spec.env.into_iter().collect(),
        tool_acl: spec
            .tool_acl
            .into_iter()
            .map(|(t, k)| (t, k.keys))
            .collect(),
    })
}

fn backend_of(material: &SecretMaterial) -> pb::SecretBackend {
    match material {
        SecretMaterial::Sealed(_) => pb::SecretBackend::Builtin,
        SecretMaterial::Reference(r) => reference_backend(r),
    }
}

fn reference_backend(r: &str) -> pb::SecretBackend {
    if r.starts_with("vault://") {
        pb::SecretBackend::Vault
    } else if r.starts_with("aws-sm://") {
        pb::SecretBackend::AwsSecretsManager
    } else if r.starts_with("agentcore://") {
        pb::SecretBackend::Agentcore
    } else {
        pb::SecretBackend::Unspecified
    }
}

fn profile_pb(p: &crate::store::Profile, revocations: &[SecretRevocation]) -> pb::Profile {
    let state = |key: Option<&str>| {
        let mut st = Revoked::No;
        for r in revocations.iter().filter(|r| r.lifted.is_none()) {
            let applies = match (key, r.key.as_deref()) {
                (_, None) => true,
                (Some(k), Some(rk)) => k == rk,
                (None, Some(_)) => false,
            };
            if applies {
                st = if r.hard || st == Revoked::Hard {
                    Revoked::Hard
                } else {
                    Revoked::Soft
                };
            }
        }
        st.to_pb() as i32
    };
    pb::Profile {
        tenant: p.tenant.clone(),
        name: p.name.clone(),
        spec: Some(pb::ProfileSpec {
            description: p.spec.description.clone(),
            owner: p.spec.owner.clone(),
            tags: p.spec.tags.clone(),
            allowed_agents: p.spec.allowed_agents.clone(),
            env: p.spec.env.clone().into_iter().collect(),
            tool_acl: p
                .spec
                .tool_acl
                .iter()
                .map(|(t, k)| (t.clone(), pb::ToolKeys { keys: k.clone() }))
                .collect(),
        }),
        secrets: p
            .secrets
            .iter()
            .map(|m| pb::SecretKey {
                name: m.key.clone(),
                backend: m
                    .reference
                    .as_deref()
                    .map_or(pb::SecretBackend::Builtin, reference_backend)
                    as i32,
                reference: m.reference.clone().unwrap_or_default(),
                version: m.version,
                created_at: Some(ts(m.created_at_ms)),
                last_rotated_at: Some(ts(m.last_rotated_at_ms)),
                fingerprint: m.fingerprint.clone(),
                revocation: state(Some(&m.key)),
            })
            .collect(),
        revision: p.revision,
        created_at: Some(ts(p.created_at_ms)),
        updated_at: Some(ts(p.updated_at_ms)),
        last_rotated_at: p.last_rotated_at_ms().map(ts),
        revocation: state(None),
    }
}

fn revocation_pb(r: &SecretRevocation) -> pb::SecretRevocation {
    pb::SecretRevocation {
        revocation_id: r.id.clone(),
        tenant: r.tenant.clone(),
        profile: r.profile.clone(),
        key: r.key.clone().unwrap_or_default(),
        hard: r.hard,
        reason: r.reason.clone(),
        revoked_by: r.revoked_by.clone(),
        revoked_at: Some(ts(r.revoked_at_ms)),
        affected_run_ids: r.affected_run_ids.clone(),
        lifted_by: r.lifted.as_ref().map(|l| l.by.clone()).unwrap_or_default(),
        lifted_at: r.lifted.as_ref().map(|l| ts(l.at_ms)),
        lift_reason: r
            .lifted
            .as_ref()
            .map(|l| l.reason.clone())
            .unwrap_or_default(),
    }
}

fn entry_pb(e: &Entry) -> pb::CascadeEntry {
    let (kind, backend, version) = match &e.source {
        // A reference's version is its backend's, known only at Resolve.
        Source::Stored {
            material: SecretMaterial::Reference(r),
            ..
        } => (pb::EntryKind::Secret, reference_backend(r), 0),
        Source::Stored {
            material, version, ..
        } => (pb::EntryKind::Secret, backend_of(material), *version),
        Source::Reference(r) => (pb::EntryKind::Secret, reference_backend(r), 0),
        Source::Plain(_) => (pb::EntryKind::Env, pb::SecretBackend::Unspecified, 0),
    };
    pb::CascadeEntry {
        key: e.key.clone(),
        kind: kind as i32,
        origin: e.origin.to_pb() as i32,
        profile: e.profile.clone(),
        backend: backend as i32,
        version,
        revocation: e.revoked.to_pb() as i32,
    }
}

impl SealedVaultApi {
    /// Builds the handlers and starts their holdings writer (so within a
    /// Tokio runtime).
    pub fn new(parts: Parts) -> Self {
        Self {
            inner: Arc::new(Inner {
                holdings: HoldingsWriter::start(parts.store.clone()),
                recovered: match parts.recover_holdings.clone() {
                    Some(reader) => holdings::recover(parts.store.clone(), reader),
                    None => holdings::Recovered::already(),
                },
                parts,
                bundle: tokio::sync::RwLock::new(None),
                reveals: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn p(&self) -> &Parts {
        &self.inner.parts
    }

    async fn audit(&self, e: bulkhead_proto::audit::v1::NewEvent) -> Result<u64, Error> {
        self.p().audit.record_one(e).await
    }

    fn fingerprint(&self, value: &[u8]) -> String {
        audit::fingerprint(self.p().fingerprint_key.expose(), value)
    }

    fn master_for(&self, id: &str) -> Option<&MasterKey> {
        std::iter::once(&self.p().master)
            .chain(self.p().previous.iter())
            .find(|k| k.id() == id)
    }

    /// The trust domain's JWT keys, refreshed from identity; `force` after an
    /// unknown kid (a rotation). Unavailable means Resolve fails closed.
    async fn jwt_bundle(&self, force: bool) -> Result<JwtBundle, Error> {
        if !force
            && let Some((b, at)) = self.inner.bundle.read().await.as_ref()
            && at.elapsed() < BUNDLE_REFRESH
        {
            return Ok(b.clone());
        }
        let mut client = self.p().identity.clone();
        let resp = client
            .get_trust_bundle(idpb::GetTrustBundleRequest::default())
            .await
            .map_err(|s| {
                Error::unavailable("identity", std::io::Error::other(s.message().to_owned()))
            })?
            .into_inner();
        let bundle = JwtBundle::from_jwks(&resp.jwt_authorities_jwks)
            .map_err(|e| Error::unavailable("identity", e))?;
        *self.inner.bundle.write().await = Some((bundle.clone(), Instant::now()));
        Ok(bundle)
    }

    /// Loads the cascade's levels; every profile must be the tenant's own.
    async fn levels(
        &self,
        tenant: &str,
        cascade: Option<pb::Cascade>,
    ) -> Result<Vec<Level>, Error> {
        let c = cascade.ok_or_else(|| Error::invalid("cascade", "required"))?;
        let mut levels = Vec::new();
        for (origin, level) in [
            (Origin::System, c.system),
            (Origin::Agent, c.agent),
            (Origin::Run, c.run),
        ] {
            let Some(level) = level else { continue };
            let profile = match level.profile {
                Some(p) if !p.profile.is_empty() => {
                    if p.tenant != tenant {
                        return Err(Error::denied("cascade levels never cross tenants"));
                    }
                    check_profile("cascade.profile", &p.profile)?;
                    let bundle = self
                        .p()
                        .store
                        .load_profile(tenant, &p.profile)
                        .await
                        .map_err(store_err)?
                        .ok_or_else(|| {
                            Error::NotFound(format!("profile {tenant}/{}", p.profile))
                        })?;
                    Some(bundle)
                }
                _ => None,
            };
            let mut overrides = BTreeMap::new();
            for (k, o) in level.overrides {
                check_key("cascade.overrides", &k)?;
                let o = match o.value {
                    None => Override::Remove,
                    Some(pb::cascade_override::Value::Plain(v)) => Override::Plain(v),
                    Some(pb::cascade_override::Value::Reference(r)) => {
                        let parsed = Reference::parse(&r)
                            .map_err(|e| Error::invalid("cascade.overrides", e))?;
                        self.p()
                            .backends
                            .check_allowed(tenant, &parsed)
                            .map_err(|_| Error::denied("the tenant may not use that reference"))?;
                        Override::Reference(r)
                    }
                };
                overrides.insert(k, o);
            }
            levels.push(Level {
                origin,
                profile,
                overrides,
            });
        }
        Ok(levels)
    }

    async fn resolve_inner(
        &self,
        caller: &Caller,
        mut r: pb::ResolveRequest,
    ) -> Result<pb::ResolveResponse, Error> {
        if r.run_jwt_svid.len() > 8 * 1024 {
            return Err(Error::invalid("run_jwt_svid", "at most 8 KiB"));
        }
        if r.agent.len() > 64 {
            return Err(Error::invalid("agent", "at most 64 bytes"));
        }
        if r.keys.len() > 256 {
            return Err(Error::invalid("keys", "at most 256"));
        }
        let p = self.p();
        // 1. The run's token: signature, audience, expiry and revocation, checked
        //    against identity's keys and list. Without them there is no answer.
        if !p.revocations.synced() {
            return Err(Error::unavailable(
                "identity revocation list",
                std::io::Error::other("not synced"),
            ));
        }
        let now = now_ms() / 1000;
        let mut bundle = self.jwt_bundle(false).await?;
        let mut validated = jwt::validate(
            &r.run_jwt_svid,
            &bundle,
            &p.trust_domain,
            &p.audience,
            now,
            p.revocations.as_ref(),
        );
        if matches!(validated, Err(jwt::JwtError::UnknownKey)) {
            bundle = self.jwt_bundle(true).await?;
            validated = jwt::validate(
                &r.run_jwt_svid,
                &bundle,
                &p.trust_domain,
                &p.audience,
                now,
                p.revocations.as_ref(),
            );
        }
        let token =
            validated.map_err(|e| Error::Unauthenticated(format!("run token refused: {e}")))?;
        let (token_tenant, run_id) = match token.subject.principal() {
            Principal::Run { tenant, run } => (tenant.to_owned(), run.to_owned()),
            _ => return Err(Error::denied("the token is not a run's")),
        };
        // 2. The token's tenant must own the request and every profile in it.
        if token_tenant != r.tenant {
            self.deny_audit(caller, &r.tenant, &run_id, "run token of another tenant")
                .await;
            return Err(Error::denied("the run's tenant does not own this cascade"));
        }
        let levels = match self.levels(&r.tenant, r.cascade.take()).await {
            Ok(l) => l,
            Err(Error::PermissionDenied(why)) => {
                self.deny_audit(caller, &r.tenant, &run_id, &why).await;
                return Err(Error::PermissionDenied(why));
            }
            Err(e) => return Err(e),
        };
        // 3. What the run may have: the requested keys, the tool's ACL, the agent.
        let entries = cascade::apply(&levels);
        let mut chosen: Vec<&Entry> = entries.values().collect();
        if !r.keys.is_empty() {
            if let Some(missing) = r
                .keys
                .iter()
                .find(|k| !entries.get(*k).is_some_and(Entry::is_secret))
            {
                return Err(Error::NotFound(format!("key {missing} in the cascade")));
            }
            chosen.retain(|e| !e.is_secret() || r.keys.contains(&e.key));
        }
        for level in &levels {
            if let Some(b) = &level.profile {
                let agents = &b.profile.spec.allowed_agents;
                if !agents.is_empty() && !agents.contains(&r.agent) {
                    return Err(Error::denied(format!(
                        "agent not allowed by profile {}",
                        b.profile.name
                    )));
                }
                // A profile with a tool ACL gives a tool only its keys, a tool
                // not listed nothing, and a run naming no tool nothing.
                if !b.profile.spec.tool_acl.is_empty() {
                    let allowed = b
                        .profile
                        .spec
                        .tool_acl
                        .get(&r.tool)
                        .cloned()
                        .unwrap_or_default();
                    chosen.retain(|e| {
                        !e.is_secret() || e.profile != b.profile.name || allowed.contains(&e.key)
                    });
                }
            }
        }
        // Override references obey the cascade's tool ACLs too, and may not
        // name the backend path of a revoked secret (a revocation cannot be
        // sidestepped by pointing an override at the same value).
        let acls: Vec<&BTreeMap<String, Vec<String>>> = levels
            .iter()
            .filter_map(|l| l.profile.as_ref())
            .map(|b| &b.profile.spec.tool_acl)
            .filter(|acl| !acl.is_empty())
            .collect();
        if !acls.is_empty() {
            let allowed: HashSet<&String> = acls
                .iter()
                .filter_map(|acl| acl.get(&r.tool))
                .flatten()
                .collect();
            chosen
                .retain(|e| !matches!(e.source, Source::Reference(_)) || allowed.contains(&e.key));
        }
        let override_refs: Vec<String> = chosen
            .iter()
            .filter_map(|e| match &e.source {
                Source::Reference(rf) => Some(rf.clone()),
                _ => None,
            })
            .collect();
        self.check_override_refs(&r.tenant, &override_refs).await?;
        // 4. Revoked keys are refused, soft or hard.
        if let Some(e) = chosen
            .iter()
            .find(|e| e.is_secret() && e.revoked != Revoked::No)
        {
            return Err(Error::FailedPrecondition(format!(
                "secret {} is revoked",
                e.key
            )));
        }
        // 5. The run's holdings are recorded and the revocations read again
        //    (see `crate::holdings`), while the values are fetched and the
        //    resolution audited; no value leaves before all of it is done.
        let held: Vec<(&str, &str)> = chosen
            .iter()
            .filter(|e| e.is_secret() && !e.profile.is_empty())
            .map(|e| (e.profile.as_str(), e.key.as_str()))
            .collect();
        let last_check = self.hold_and_recheck(&r.tenant, &run_id, &held, &override_refs);
        let deliver = self.deliver(caller, &r, &run_id, &chosen);
        match tokio::try_join!(last_check, deliver) {
            Ok(((), response)) => Ok(response),
            Err(Stopped::Revoked(key)) => {
                // Its resolution may be in audit already: record that it was
                // refused after all.
                let why = format!("secret {key} was revoked while resolving");
                self.deny_audit(caller, &r.tenant, &run_id, &why).await;
                Err(Error::FailedPrecondition(format!(
                    "secret {key} is revoked"
                )))
            }
            Err(Stopped::Failed(e)) => Err(e),
        }
    }

    /// Refuses override references that name the backend path of a revoked
    /// secret (a revocation cannot be sidestepped by pointing an override at
    /// the same value).
    async fn check_override_refs(
        &self,
        tenant: &str,
        override_refs: &[String],
    ) -> Result<(), Error> {
        if override_refs.is_empty() {
            return Ok(());
        }
        let revoked = self.revoked_references(tenant).await?;
        for rf in override_refs {
            let canonical = Reference::parse(rf)
                .map_err(|e| Error::invalid("reference", e))?
                .to_string();
            if revoked.contains(&canonical) {
                return Err(Error::FailedPrecondition(
                    "an override names a revoked secret".into(),
                ));
            }
        }
        Ok(())
    }

    /// Records that `run_id` holds `held` ((profile, key) pairs), waits for
    /// the commit, and then reads the revocations in force on those profiles
    /// and behind the override references: a revocation written before the
    /// commit is seen here, and one written after it lists the run.
    async fn hold_and_recheck(
        &self,
        tenant: &str,
        run_id: &str,
        held: &[(&str, &str)],
        override_refs: &[String],
    ) -> Result<(), Stopped> {
        self.inner
            .holdings
            .record(holdings::of_run(
                tenant,
                run_id,
                held.iter().copied(),
                now_ms(),
            ))
            .await
            .map_err(|e| Error::unavailable("sealed store", e))?;
        let profiles: BTreeSet<&str> = held.iter().map(|(profile, _)| *profile).collect();
        for profile in profiles {
            let in_force = self
                .p()
                .store
                .list_revocations(
                    Tenants::One(tenant),
                    &RevocationQuery {
                        profile: Some(profile.to_owned()),
                        include_lifted: false,
                        before: None,
                        limit: 10_000,
                    },
                )
                .await
                .map_err(store_err)?;
            let revoked = |key: &str| {
                in_force
                    .iter()
                    .any(|rv| rv.key.as_deref().is_none_or(|k| k == key))
            };
            if let Some((_, key)) = held.iter().find(|(p, k)| *p == profile && revoked(k)) {
                return Err(Stopped::Revoked((*key).to_owned()));
            }
        }
        self.check_override_refs(tenant, override_refs).await?;
        Ok(())
    }

    /// Opens or fetches the chosen values and records the resolution; the
    /// response is returned only if audit recorded it.
    async fn deliver(
        &self,
        caller: &Caller,
        r: &pb::ResolveRequest,
        run_id: &str,
        chosen: &[&Entry],
    ) -> Result<pb::ResolveResponse, Stopped> {
        // Values: opened here, or fetched from their backend.
        let ctx = ResolveContext {
            tenant: r.tenant.clone(),
            run_id: run_id.to_owned(),
            workload_access_token: None,
        };
        let mut refs = Vec::new();
        for e in chosen {
            let reference = match &e.source {
                Source::Stored {
                    material: SecretMaterial::Reference(r),
                    ..
                }
                | Source::Reference(r) => Some(r),
                _ => None,
            };
            if let Some(r) = reference {
                refs.push(Reference::parse(r).map_err(|e| Error::invalid("reference", e))?);
            }
        }
        let mut fetched = self
            .p()
            .backends
            .resolve_many(&refs, &ctx)
            .await
            .into_iter();
        let mut secrets = Vec::new();
        let mut env = BTreeMap::new();
        let mut attrs_keys = Vec::new();
        let mut attrs_request_ids = Vec::new();
        for e in chosen {
            let (value, version, backend, request_id) = match &e.source {
                Source::Plain(v) => {
                    env.insert(e.key.clone(), v.clone());
                    continue;
                }
                Source::Stored {
                    material: SecretMaterial::Sealed(sealed),
                    version,
                    ..
                } => {
                    let key = self.master_for(&sealed.master_key_id).ok_or_else(|| {
                        Error::internal(std::io::Error::other("sealed by an unknown master key"))
                    })?;
                    let id = VersionId::new(&r.tenant, &e.profile, &e.key, *version);
                    let value = crypto::open(key, &id.aad(), sealed).map_err(Error::internal)?;
                    (value, *version, pb::SecretBackend::Builtin, String::new())
                }
                Source::Stored {
                    material: SecretMaterial::Reference(rf),
                    ..
                }
                | Source::Reference(rf) => {
                    let got = fetched.next().ok_or_else(|| {
                        Error::internal(std::io::Error::other("backend result missing"))
                    })?;
                    let got = got.map_err(|be| backend_err(&be.kind))?;
                    // A reference's version is its backend's (Vault KV v2), else 0.
                    let version = got.version.parse().unwrap_or(0);
                    (got.value, version, reference_backend(rf), got.request_id)
                }
            };
            let fingerprint = self.fingerprint(value.expose());
            attrs_keys.push(format!("{}@{}:{}", e.key, version, &fingerprint[..16]));
            if !request_id.is_empty() {
                attrs_request_ids.push(request_id);
            }
            secrets.push(pb::ResolvedSecret {
                key: e.key.clone(),
                value: bytes::Bytes::copy_from_slice(value.expose()),
                version,
                origin: e.origin.to_pb() as i32,
                profile: e.profile.clone(),
                backend: backend as i32,
                fingerprint,
            });
        }
        // Recorded before it is returned; if audit cannot record it, no value
        // leaves. The holdings in it are what a start replays after a power
        // cut (see `crate::holdings`).
        let mut resolved = audit::event(
            holdings::RESOLVED,
            &r.tenant,
            run_id,
            Outcome::Success,
            [
                ("caller", caller.id.to_string()),
                ("agent", r.agent.clone()),
            ],
        );
        resolved
            .attributes
            .extend(split_attribute("keys", &attrs_keys));
        resolved
            .attributes
            .extend(split_attribute("backend_request_ids", &attrs_request_ids));
        resolved.attributes.extend(holdings::attribute(
            chosen
                .iter()
                .filter(|e| e.is_secret() && !e.profile.is_empty())
                .map(|e| (e.profile.as_str(), e.key.as_str())),
        ));
        // Audit takes at most 32 attributes per event: a resolution too big
        // to be recorded in one is refused by name, not left to fail there.
        if resolved.attributes.len() > AUDIT_MAX_ATTRIBUTES {
            return Err(Error::FailedPrecondition(format!(
                "the resolution names more keys than one audit record holds ({} keys): ask for fewer keys",
                attrs_keys.len()
            ))
            .into());
        }
        let seq = self.audit(resolved).await?;
        Ok(pb::ResolveResponse {
            secrets,
            env: env.into_iter().collect(),
            run_id: run_id.to_owned(),
            audit_sequence: seq,
        })
    }

    /// The backend references of every secret of `tenant` under a
    /// revocation in force.
    async fn revoked_references(&self, tenant: &str) -> Result<HashSet<String>, Error> {
        let store = &self.p().store;
        let revocations = store
            .list_revocations(
                Tenants::One(tenant),
                &RevocationQuery {
                    profile: None,
                    include_lifted: false,
                    before: None,
                    limit: 10_000,
                },
            )
            .await
            .map_err(store_err)?;
        let mut out = HashSet::new();
        for rev in revocations.iter().filter(|r| r.lifted.is_none()) {
            let materials: Vec<SecretMaterial> = match &rev.key {
                Some(k) => store
                    .get_secret(tenant, &rev.profile, k, None)
                    .await
                    .map_err(store_err)?
                    .map(|v| v.material)
                    .into_iter()
                    .collect(),
                None => store
                    .load_profile(tenant, &rev.profile)
                    .await
                    .map_err(store_err)?
                    .map(|b| b.secrets.into_iter().map(|v| v.material).collect())
                    .unwrap_or_default(),
            };
            for m in materials {
                if let SecretMaterial::Reference(r) = m {
                    out.insert(r);
                }
            }
        }
        Ok(out)
    }

    async fn deny_audit(&self, caller: &Caller, tenant: &str, run: &str, why: &str) {
        let e = audit::event(
            "sealed.credential.refused",
            tenant,
            run,
            Outcome::Denied,
            [
                ("caller", caller.id.to_string()),
                ("reason", why.to_owned()),
            ],
        );
        if let Err(err) = self.audit(e).await {
            tracing::warn!(error = %err, "could not audit a refused resolve");
        }
    }

    fn check_reveal_rate(&self, who: &SpiffeId) -> Result<(), Error> {
        let limit = self.p().reveals_per_minute;
        let mut m = self.inner.reveals.lock().unwrap_or_else(|p| p.into_inner());
        let slot = m.entry(who.to_string()).or_insert((Instant::now(), 0));
        if slot.0.elapsed() >= Duration::from_secs(60) {
            *slot = (Instant::now(), 0);
        }
        if slot.1 >= limit {
            return Err(Error::ResourceExhausted("reveal rate limit reached".into()));
        }
        slot.1 += 1;
        Ok(())
    }

    async fn snapshot_entries(
        &self,
        tenant: &str,
        cascade: Option<pb::Cascade>,
    ) -> Result<Vec<Entry>, Error> {
        let levels = self.levels(tenant, cascade).await?;
        Ok(cascade::apply(&levels).into_values().collect())
    }
}

/// Why a Resolve stopped once its values were on their way.
#[derive(Debug)]
enum Stopped {
    /// A revocation of this key came in while it resolved.
    Revoked(String),
    Failed(Error),
}

impl From<Error> for Stopped {
    fn from(e: Error) -> Self {
        Stopped::Failed(e)
    }
}

fn backend_err(kind: &ErrorKind) -> Error {
    match kind {
        ErrorKind::NotFound => Error::NotFound("a referenced secret".into()),
        ErrorKind::Denied | ErrorKind::NotConfigured => {
            Error::denied("a backend refused a reference")
        }
        ErrorKind::Unavailable => {
            Error::unavailable("secret backend", std::io::Error::other("unreachable"))
        }
        ErrorKind::Malformed => {
            Error::FailedPrecondition("a backend's answer is not usable".into())
        }
    }
}

#[tonic::async_trait]
impl SealedVaultService for SealedVaultApi {
    async fn create_profile(
        &self,
        req: Request<pb::CreateProfileRequest>,
    ) -> Result<Response<pb::CreateProfileResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        check_name("tenant", &r.tenant)?;
        check_profile("name", &r.name)?;
        let spec = spec_from_pb(r.spec)?;
        self.audit(audit::event(
            "sealed.profile.created",
            &r.tenant,
            "",
            Outcome::Success,
            [("profile", r.name.clone()), ("by", caller.id.to_string())],
        ))
        .await?;
        let p = self
            .p()
            .store
            .create_profile(&r.tenant, &r.name, &spec, now_ms())
            .await
            .map_err(store_err)?;
        Ok(Response::new(pb::CreateProfileResponse {
            profile: Some(profile_pb(&p, &[])),
        }))
    }

    async fn update_profile(
        &self,
        req: Request<pb::UpdateProfileRequest>,
    ) -> Result<Response<pb::UpdateProfileResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        check_name("tenant", &r.tenant)?;
        check_profile("name", &r.name)?;
        let spec = spec_from_pb(r.spec)?;
        self.audit(audit::event(
            "sealed.profile.updated",
            &r.tenant,
            "",
            Outcome::Success,
            [("profile", r.name.clone()), ("by", caller.id.to_string())],
        ))
        .await?;
        let expected = (r.expected_revision > 0).then_some(r.expected_revision);
        let p = self
            .p()
            .store
            .update_profile(&r.tenant, &r.name, &spec, expected, now_ms())
            .await
            .map_err(store_err)?;
        Ok(Response::new(pb::UpdateProfileResponse {
            profile: Some(profile_pb(&p, &[])),
        }))
    }

    async fn get_profile(
        &self,
        req: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        let r = req.into_inner();
        check_name("tenant", &r.tenant)?;
        check_profile("name", &r.name)?;
        let b = self
            .p()
            .store
            .load_profile(&r.tenant, &r.name)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Error::NotFound(format!("profile {}/{}", r.tenant, r.name)))?;
        Ok(Response::new(pb::GetProfileResponse {
            profile: Some(profile_pb(&b.profile, &b.revocations)),
        }))
    }

    async fn list_profiles(
        &self,
        req: Request<pb::ListProfilesRequest>,
    ) -> Result<Response<pb::ListProfilesResponse>, Status> {
        let r = req.into_inner();
        let limit = match r.page_size {
            0 => 100,
            n => n.min(1000),
        };
        let after = if r.page_token.is_empty() {
            None
        } else {
            let (t, n) = r
                .page_token
                .split_once('/')
                .ok_or_else(|| Error::invalid("page_token", "unknown token"))?;
            Some((t.to_owned(), n.to_owned()))
        };
        let tenants = if r.tenant.is_empty() {
            Tenants::All
        } else {
            Tenants::One(&r.tenant)
        };
        let mut rows = self
            .p()
            .store
            .list_profiles(
                tenants,
                &ProfileQuery {
                    tag: (!r.tag.is_empty()).then_some(r.tag),
                    after,
                    limit: limit + 1,
                },
            )
            .await
            .map_err(store_err)?;
        let next = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last()
                .map(|p| format!("{}/{}", p.tenant, p.name))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListProfilesResponse {
            profiles: rows.iter().map(|p| profile_pb(p, &[])).collect(),
            next_page_token: next,
        }))
    }

    async fn delete_profile(
        &self,
        req: Request<pb::DeleteProfileRequest>,
    ) -> Result<Response<pb::DeleteProfileResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        check_name("tenant", &r.tenant)?;
        check_profile("name", &r.name)?;
        self.p()
            .store
            .get_profile(&r.tenant, &r.name)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Error::NotFound(format!("profile {}/{}", r.tenant, r.name)))?;
        self.audit(audit::event(
            "sealed.profile.deleted",
            &r.tenant,
            "",
            Outcome::Success,
            [("profile", r.name.clone()), ("by", caller.id.to_string())],
        ))
        .await?;
        let n = self
            .p()
            .store
            .delete_profile(&r.tenant, &r.name)
            .await
            .map_err(store_err)?;
        Ok(Response::new(pb::DeleteProfileResponse {
            secrets_deleted: u32::try_from(n).unwrap_or(u32::MAX),
        }))
    }

    async fn put_secret(
        &self,
        req: Request<pb::PutSecretRequest>,
    ) -> Result<Response<pb::PutSecretResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        check_name("tenant", &r.tenant)?;
        check_profile("profile", &r.profile)?;
        check_key("key", &r.key)?;
        let store = &self.p().store;
        // Audit records what happens: refuse a missing profile before recording.
        let profile = store
            .get_profile(&r.tenant, &r.profile)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Error::NotFound(format!("profile {}/{}", r.tenant, r.profile)))?;
        if profile.spec.env.contains_key(&r.key) {
            return Err(Error::FailedPrecondition(format!(
                "{} is a non-secret env name of profile {}/{}",
                r.key, r.tenant, r.profile
            ))
            .into());
        }
        // A version is bound into its ciphertext, so seal for the next one and
        // retry if another writer got there first.
        for _ in 0..5 {
            let next = store
                .current_version(&r.tenant, &r.profile, &r.key)
                .await
                .map_err(store_err)?
                .unwrap_or(0)
                + 1;
            let id = VersionId::new(&r.tenant, &r.profile, &r.key, next);
            let (material, fingerprint, backend) = match &r.source {
                Some(pb::put_secret_request::Source::Value(v)) => {
                    if v.is_empty() || v.len() > MAX_VALUE_LEN {
                        return Err(Error::invalid("value", "1 byte to 64 KiB").into());
                    }
                    let value = SecretValue::from_slice(v);
                    let sealed = crypto::seal(&self.p().master, &id.aad(), &value)
                        .map_err(Error::internal)?;
                    (
                        SecretMaterial::Sealed(sealed),
                        self.fingerprint(value.expose()),
                        "builtin",
                    )
                }
                Some(pb::put_secret_request::Source::Reference(rf)) => {
                    let parsed =
                        Reference::parse(rf).map_err(|e| Error::invalid("reference", e))?;
                    self.p()
                        .backends
                        .check_allowed(&r.tenant, &parsed)
                        .map_err(|_| Error::denied("the tenant may not use that reference"))?;
                    (
                        SecretMaterial::Reference(parsed.to_string()),
                        String::new(),
                        parsed.backend(),
                    )
                }
                None => {
                    return Err(
                        Error::invalid("source", "a value or a reference is required").into(),
                    );
                }
            };
            self.audit(audit::event(
                "sealed.secret.written",
                &r.tenant,
                "",
                Outcome::Success,
                [
                    ("profile", r.profile.clone()),
                    ("key", r.key.clone()),
                    ("version", next.to_string()),
                    ("backend", backend.to_owned()),
                    ("fingerprint", fingerprint.clone()),
                    ("by", caller.id.to_string()),
                ],
            ))
            .await?;
            let version = SecretVersion {
                id,
                material,
                fingerprint,
                written_at_ms: now_ms(),
            };
            match store.put_secret(&version).await {
                Ok(meta) => {
                    let secret = pb::SecretKey {
                        name: meta.key.clone(),
                        backend: backend_of(&version.material) as i32,
                        reference: meta.reference.clone().unwrap_or_default(),
                        version: meta.version,
                        created_at: Some(ts(meta.created_at_ms)),
                        last_rotated_at: Some(ts(meta.last_rotated_at_ms)),
                        fingerprint: meta.fingerprint.clone(),
                        revocation: pb::RevocationState::NotRevoked as i32,
                    };
                    return Ok(Response::new(pb::PutSecretResponse {
                        secret: Some(secret),
                    }));
                }
                Err(StoreError::VersionConflict { .. }) => continue,
                Err(e) => return Err(store_err(e).into()),
            }
        }
        Err(Error::FailedPrecondition("too many concurrent writers of this key".into()).into())
    }

    async fn delete_secret(
        &self,
        req: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        check_name("tenant", &r.tenant)?;
        check_profile("profile", &r.profile)?;
        check_key("key", &r.key)?;
        self.p()
            .store
            .current_version(&r.tenant, &r.profile, &r.key)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Error::NotFound(format!("secret {}", r.key)))?;
        self.audit(audit::event(
            "sealed.secret.deleted",
            &r.tenant,
            "",
            Outcome::Success,
            [
                ("profile", r.profile.clone()),
                ("key", r.key.clone()),
                ("by", caller.id.to_string()),
            ],
        ))
        .await?;
        let v = self
            .p()
            .store
            .delete_secret(&r.tenant, &r.profile, &r.key, now_ms())
            .await
            .map_err(store_err)?;
        Ok(Response::new(pb::DeleteSecretResponse { version: v }))
    }

    async fn reveal_secret(
        &self,
        req: Request<pb::RevealSecretRequest>,
    ) -> Result<Response<pb::RevealSecretResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        check_name("tenant", &r.tenant)?;
        check_profile("profile", &r.profile)?;
        check_key("key", &r.key)?;
        if r.reason.trim().is_empty() || r.reason.len() > 512 {
            return Err(Error::invalid("reason", "1 to 512 bytes").into());
        }
        self.check_reveal_rate(&caller.id)?;
        let v = self
            .p()
            .store
            .get_secret(&r.tenant, &r.profile, &r.key, None)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Error::NotFound(format!("secret {}", r.key)))?;
        let SecretMaterial::Sealed(sealed) = &v.material else {
            return Err(Error::FailedPrecondition(
                "a reference's value lives in its backend".into(),
            )
            .into());
        };
        let key = self.master_for(&sealed.master_key_id).ok_or_else(|| {
            Error::internal(std::io::Error::other("sealed by an unknown master key"))
        })?;
        let value = crypto::open(key, &v.id.aad(), sealed).map_err(Error::internal)?;
        self.audit(audit::event(
            "sealed.secret.revealed",
            &r.tenant,
            "",
            Outcome::Success,
            [
                ("profile", r.profile.clone()),
                ("key", r.key.clone()),
                ("version", v.id.version.to_string()),
                ("reason", r.reason.clone()),
                ("by", caller.id.to_string()),
            ],
        ))
        .await?;
        Ok(Response::new(pb::RevealSecretResponse {
            value: bytes::Bytes::copy_from_slice(value.expose()),
            secret: Some(pb::SecretKey {
                name: r.key,
                backend: pb::SecretBackend::Builtin as i32,
                reference: String::new(),
                version: v.id.version,
                created_at: None,
                last_rotated_at: Some(ts(v.written_at_ms)),
                fingerprint: v.fingerprint.clone(),
                revocation: pb::RevocationState::Unspecified as i32,
            }),
        }))
    }

    async fn resolve(
        &self,
        req: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        check_name("tenant", &r.tenant)?;
        let tenant = r.tenant.clone();
        let answer = self.resolve_inner(&caller, r).await;
        bulkhead_mesh::metrics::resolution(&tenant, bulkhead_mesh::metrics::outcome_of(&answer));
        Ok(Response::new(answer?))
    }

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let r = req.into_inner();
        check_name("tenant", &r.tenant)?;
        let entries = self.snapshot_entries(&r.tenant, r.cascade).await?;
        let revoked = entries
            .iter()
            .any(|e| e.is_secret() && e.revoked != Revoked::No);
        Ok(Response::new(pb::SnapshotResponse {
            entries: entries.iter().map(entry_pb).collect(),
            revoked,
        }))
    }

    async fn preview_cascade(
        &self,
        req: Request<pb::PreviewCascadeRequest>,
    ) -> Result<Response<pb::PreviewCascadeResponse>, Status> {
        let r = req.into_inner();
        check_name("tenant", &r.tenant)?;
        let entries = self.snapshot_entries(&r.tenant, r.cascade).await?;
        Ok(Response::new(pb::PreviewCascadeResponse {
            entries: entries.iter().map(entry_pb).collect(),
        }))
    }

    async fn revoke_secret(
        &self,
        req: Request<pb::RevokeSecretRequest>,
    ) -> Result<Response<pb::RevokeSecretResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        check_name("tenant", &r.tenant)?;
        check_profile("profile", &r.profile)?;
        if !r.key.is_empty() {
            check_key("key", &r.key)?;
        }
        if r.reason.trim().is_empty() || r.reason.len() > 512 {
            return Err(Error::invalid("reason", "1 to 512 bytes").into());
        }
        // The runs it affects are read from the holdings, which may still
        // lack what a power cut took (see `crate::holdings`).
        if !self.inner.recovered.wait(Duration::from_secs(5)).await {
            return Err(Error::unavailable(
                "run holdings",
                std::io::Error::other("still being recovered from audit"),
            )
            .into());
        }
        let key = (!r.key.is_empty()).then_some(r.key.clone());
        // Recorded before it takes effect: without the record, no revocation.
        self.audit(audit::event(
            "sealed.secret.revoked",
            &r.tenant,
            "",
            Outcome::Success,
            [
                ("profile", r.profile.clone()),
                ("key", r.key.clone()),
                ("hard", r.hard.to_string()),
                ("reason", r.reason.clone()),
                ("by", caller.id.to_string()),
            ],
        ))
        .await?;
        // The store lists the runs holding the secret in the transaction
        // that writes the revocation; read any earlier, a run resolving
        // meanwhile could be missed (see `crate::holdings`).
        let rev = self
            .p()
            .store
            .revoke(&NewRevocation {
                tenant: r.tenant.clone(),
                profile: r.profile.clone(),
                key,
                hard: r.hard,
                reason: r.reason.clone(),
                revoked_by: caller.id.to_string(),
                revoked_at_ms: now_ms(),
            })
            .await
            .map_err(store_err)?;
        let affected = rev.affected_run_ids.clone();
        // The runs are known only now, so they have an event of their own,
        // recorded before any of them is revoked. Without it the revocation
        // stands (Resolve refuses the secret) but no run is revoked; the
        // operator retries.
        self.audit(audit::event(
            "sealed.secret.revocation_applied",
            &r.tenant,
            "",
            Outcome::Success,
            [
                ("revocation_id", rev.id.clone()),
                ("profile", r.profile.clone()),
                ("key", r.key.clone()),
                ("hard", r.hard.to_string()),
                ("affected_runs", affected.join(",")),
                ("by", caller.id.to_string()),
            ],
        ))
        .await
        .inspect_err(|error| {
            tracing::error!(revocation = %rev.id, %error, "a revocation is in force but its affected runs could not be recorded");
        })?;
        // A hard revocation reaches the sandbox-runners through identity's
        // revocation stream: each run holding the secret is revoked there.
        if r.hard {
            // Every affected run is attempted, even after one fails: stopping
            // at the first failure would leave the later runs alive.
            let mut identity = self.p().identity.clone();
            let mut failed = Vec::new();
            for run in &affected {
                let result = identity
                    .revoke(idpb::RevokeRequest {
                        tenant: r.tenant.clone(),
                        target: Some(idpb::revoke_request::Target::RunId(run.clone())),
                        reason: format!("secret revoked: {}", r.reason),
                        hard: true,
                    })
                    .await;
                if let Err(status) = result {
                    tracing::error!(run = %run, code = ?status.code(), "could not revoke a run holding a hard-revoked secret");
                    failed.push(run.clone());
                }
            }
            if !failed.is_empty() {
                // The revocation itself is recorded; retrying revokes the rest.
                return Err(Error::unavailable(
                    "identity",
                    std::io::Error::other(format!("could not revoke runs {}", failed.join(","))),
                )
                .into());
            }
        }
        Ok(Response::new(pb::RevokeSecretResponse {
            revocation: Some(revocation_pb(&rev)),
            affected_run_ids: affected,
        }))
    }

    async fn lift_revocation(
        &self,
        req: Request<pb::LiftRevocationRequest>,
    ) -> Result<Response<pb::LiftRevocationResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        check_name("tenant", &r.tenant)?;
        if r.reason.trim().is_empty() || r.reason.len() > 512 {
            return Err(Error::invalid("reason", "1 to 512 bytes").into());
        }
        let existing = self
            .p()
            .store
            .get_revocation(&r.tenant, &r.revocation_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Error::NotFound(format!("revocation {}", r.revocation_id)))?;
        if existing.lifted.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "revocation {} was already lifted",
                r.revocation_id
            ))
            .into());
        }
        self.audit(audit::event(
            "sealed.secret.revocation_lifted",
            &r.tenant,
            "",
            Outcome::Success,
            [
                ("revocation_id", r.revocation_id.clone()),
                ("reason", r.reason.clone()),
                ("by", caller.id.to_string()),
            ],
        ))
        .await?;
        let rev = self
            .p()
            .store
            .lift_revocation(
                &r.tenant,
                &r.revocation_id,
                &Lift {
                    by: caller.id.to_string(),
                    at_ms: now_ms(),
                    reason: r.reason,
                },
            )
            .await
            .map_err(store_err)?;
        Ok(Response::new(pb::LiftRevocationResponse {
            revocation: Some(revocation_pb(&rev)),
        }))
    }

    async fn list_revocations(
        &self,
        req: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        let r = req.into_inner();
        let limit = match r.page_size {
            0 => 100,
            n => n.min(1000),
        };
        let before = if r.page_token.is_empty() {
            None
        } else {
            let (at, id) = r
                .page_token
                .split_once(':')
                .and_then(|(a, i)| Some((a.parse::<i64>().ok()?, i.to_owned())))
                .ok_or_else(|| Error::invalid("page_token", "unknown token"))?;
            Some((at, id))
        };
        let tenants = if r.tenant.is_empty() {
            Tenants::All
        } else {
            Tenants::One(&r.tenant)
        };
        let mut rows = self
            .p()
            .store
            .list_revocations(
                tenants,
                &RevocationQuery {
                    profile: (!r.profile.is_empty()).then_some(r.profile),
                    include_lifted: r.include_lifted,
                    before,
                    limit: limit + 1,
                },
            )
            .await
            .map_err(store_err)?;
        let next = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last()
                .map(|x| format!("{}:{}", x.revoked_at_ms, x.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListRevocationsResponse {
            revocations: rows.iter().map(revocation_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn rotate_master_key(
        &self,
        req: Request<pb::RotateMasterKeyRequest>,
    ) -> Result<Response<pb::RotateMasterKeyResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let active = self.p().master.id().to_owned();
        if !r.new_key_id.is_empty() && r.new_key_id != active {
            return Err(Error::FailedPrecondition(
                "new_key_id is not the active master key: restart with the new key first".into(),
            )
            .into());
        }
        self.audit(audit::event(
            "sealed.master_key.rotated",
            "",
            "",
            Outcome::Success,
            [
                ("active_key_id", active.clone()),
                ("by", caller.id.to_string()),
            ],
        ))
        .await?;
        let mut rewrapped = 0;
        let mut previous = String::new();
        for old in &self.p().previous {
            let done = crate::store::rotate_master_key(
                self.p().store.as_ref(),
                old,
                &self.p().master,
                500,
            )
            .await
            .map_err(|e| {
                Error::unavailable("sealed store", std::io::Error::other(e.to_string()))
            })?;
            rewrapped += done.rewrapped;
            previous = old.id().to_owned();
        }
        Ok(Response::new(pb::RotateMasterKeyResponse {
            rewrapped,
            previous_key_id: previous,
            active_key_id: active,
        }))
    }

    async fn export_store(
        &self,
        req: Request<pb::ExportStoreRequest>,
    ) -> Result<Response<BoxStream<pb::ExportStoreResponse>>, Status> {
        let caller = Caller::of(&req)?;
        self.audit(audit::event(
            "sealed.store.exported",
            "",
            "",
            Outcome::Success,
            [("by", caller.id.to_string())],
        ))
        .await?;
        let export = self.p().store.export(now_ms()).await.map_err(store_err)?;
        let json = serde_json::to_vec(&export).map_err(Error::internal)?;
        let chunks: Vec<Result<pb::ExportStoreResponse, Status>> = json
            .chunks(1 << 20)
            .map(|c| {
                Ok(pb::ExportStoreResponse {
                    chunk: bytes::Bytes::copy_from_slice(c),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn import_store(
        &self,
        req: Request<Streaming<pb::ImportStoreRequest>>,
    ) -> Result<Response<pb::ImportStoreResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut stream = req.into_inner();
        let mut buf = Vec::new();
        let mut overwrite = false;
        while let Some(msg) = stream.message().await? {
            overwrite |= msg.overwrite;
            if buf.len() + msg.chunk.len() > 256 << 20 {
                return Err(Error::invalid("chunk", "an import is at most 256 MiB").into());
            }
            buf.extend_from_slice(&msg.chunk);
        }
        let export: crate::store::StoreExport = serde_json::from_slice(&buf)
            .map_err(|_| Error::invalid("chunk", "not a sealed-vault export"))?;
        // Refuse before recording: without overwrite the store must be empty.
        if !overwrite {
            let store = &self.p().store;
            let profiles = store
                .list_profiles(
                    Tenants::All,
                    &ProfileQuery {
                        tag: None,
                        after: None,
                        limit: 1,
                    },
                )
                .await
                .map_err(store_err)?;
            let revocations = store
                .list_revocations(
                    Tenants::All,
                    &RevocationQuery {
                        profile: None,
                        include_lifted: true,
                        before: None,
                        limit: 1,
                    },
                )
                .await
                .map_err(store_err)?;
            if !profiles.is_empty() || !revocations.is_empty() {
                return Err(store_err(StoreError::NotEmpty).into());
            }
        }
        self.audit(audit::event(
            "sealed.store.imported",
            "",
            "",
            Outcome::Success,
            [
                ("overwrite", overwrite.to_string()),
                ("by", caller.id.to_string()),
            ],
        ))
        .await?;
        let counts = self
            .p()
            .store
            .import(&export, overwrite)
            .await
            .map_err(store_err)?;
        Ok(Response::new(pb::ImportStoreResponse {
            profiles: counts.profiles,
            secrets: counts.secrets,
            revocations: counts.revocations,
        }))
    }
}
