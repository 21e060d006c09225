//! Sealed-vault's state: tenant profiles, secret versions (sealed bytes or
//! backend references), secret revocations and run holdings (which runs
//! resolved which keys, for a revocation's affected runs). One trait, SQLite
//! (the embedded default) and PostgreSQL, one conformance suite for both.
//!
//! Tenant isolation lives here as much as in the handlers: every
//! tenant-scoped method takes the tenant and puts it in the WHERE clause of
//! every statement it runs, so no query can read or change another tenant's
//! rows. The only whole-store operations are master-key rotation, export and
//! import, listings given [`Tenants::All`] (operators only), and the two
//! holdings chores of the service itself: recording a batch of holdings
//! (each row carries its own tenant) and pruning expired ones; each says so
//! in its name or arguments.
//!
//! The store never sees plaintext: values arrive sealed ([`SealedSecret`])
//! and leave sealed. A version's number is chosen by the caller (it is bound
//! into the ciphertext's associated data before the store sees it) and must
//! be the current one plus one, so concurrent writers of one key cannot both
//! win ([`StoreError::VersionConflict`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::crypto::{self, Aad, CryptoError, MasterKey, NONCE_LEN, SealedSecret};

pub mod postgres;
pub mod sqlite;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored row is malformed: {0}")]
    Corrupt(String),
    #[error("unsupported store url (use sqlite://PATH or postgres://...)")]
    Url,
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("profile {tenant}/{profile} not found")]
    ProfileNotFound { tenant: String, profile: String },
    #[error("secret {key} not found in profile {tenant}/{profile}")]
    SecretNotFound {
        tenant: String,
        profile: String,
        key: String,
    },
    #[error("revocation {id} not found")]
    RevocationNotFound { id: String },
    #[error("profile {tenant}/{profile} already exists")]
    ProfileExists { tenant: String, profile: String },
    #[error("profile {tenant}/{profile} is at revision {actual}, not the expected {expected}")]
    StaleRevision {
        tenant: String,
        profile: String,
        expected: u64,
        actual: u64,
    },
    #[error("secret {key} is at version {current}: version {attempted} cannot follow it")]
    VersionConflict {
        key: String,
        current: u64,
        attempted: u64,
    },
    #[error("{key} would be both a secret and a non-secret env name of profile {tenant}/{profile}")]
    KeyCollision {
        tenant: String,
        profile: String,
        key: String,
    },
    #[error("revocation {id} was already lifted")]
    AlreadyLifted { id: String },
    #[error("the store is not empty: import with overwrite to replace what it holds")]
    NotEmpty,
}

/// Which tenants a listing covers. Tenant-scoped callers pass
/// [`Tenants::One`]; [`Tenants::All`] is for operators only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tenants<'a> {
    One(&'a str),
    All,
}

/// A profile's non-secret settings (the proto's `ProfileSpec`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileSpec {
    pub description: String,
    pub owner: String,
    pub tags: Vec<String>,
    /// Empty allows every (approved) agent.
    pub allowed_agents: Vec<String>,
    /// Non-secret environment settings; never a secret key's name.
    pub env: BTreeMap<String, String>,
    /// Tool name to the secret keys it may receive; empty: no restriction.
    pub tool_acl: BTreeMap<String, Vec<String>>,
}

/// A profile with its secrets' metadata, never their material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub tenant: String,
    pub name: String,
    pub spec: ProfileSpec,
    /// The current version of each secret, ordered by key.
    pub secrets: Vec<SecretMeta>,
    /// 1 at creation, plus one at every change of the profile or its secrets.
    pub revision: u64,
    /// Milliseconds since the epoch.
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl Profile {
    /// The latest rotation among its secrets; `None` without secrets.
    pub fn last_rotated_at_ms(&self) -> Option<i64> {
        self.secrets.iter().map(|s| s.last_rotated_at_ms).max()
    }
}

/// A secret key's metadata: its current version, never its material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMeta {
    pub key: String,
    /// The current (latest) version.
    pub version: u64,
    /// The backend reference; `None` for a value sealed in the built-in store.
    pub reference: Option<String>,
    /// The value's fingerprint as the service computed it (empty for references).
    pub fingerprint: String,
    /// When the key was first written.
    pub created_at_ms: i64,
    /// When the current version was written.
    pub last_rotated_at_ms: i64,
}

/// Which version of which secret: also what its ciphertext is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VersionId {
    pub tenant: String,
    pub profile: String,
    pub key: String,
    pub version: u64,
}

impl VersionId {
    pub fn new(tenant: &str, profile: &str, key: &str, version: u64) -> Self {
        Self {
            tenant: tenant.into(),
            profile: profile.into(),
            key: key.into(),
            version,
        }
    }

    /// The associated data its sealed material is bound to.
    pub fn aad(&self) -> Aad<'_> {
        Aad::new(&self.tenant, &self.profile, &self.key, self.version)
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{} version {}",
            self.tenant, self.profile, self.key, self.version
        )
    }
}

/// Where a version's value is: sealed here, or named in a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretMaterial {
    Sealed(SealedSecret),
    /// `vault://...`, `aws-sm://...` or `agentcore://...`; the store does not
    /// parse it.
    Reference(String),
}

/// One version of one secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretVersion {
    pub id: VersionId,
    pub material: SecretMaterial,
    /// The value's fingerprint (empty for references).
    pub fingerprint: String,
    /// Milliseconds since the epoch.
    pub written_at_ms: i64,
}

/// A sealed version, as master-key rotation reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedVersion {
    pub id: VersionId,
    pub sealed: SealedSecret,
}

/// A sealed version's data key re-wrapped under another master key. Applied
/// only if the row still holds the same ciphertext wrapped by
/// `previous_master_key_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrapped {
    pub id: VersionId,
    pub previous_master_key_id: String,
    pub sealed: SealedSecret,
}

/// Everything Resolve and Snapshot need of one profile, read at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileBundle {
    pub profile: Profile,
    /// The current version of each secret, ordered by key.
    pub secrets: Vec<SecretVersion>,
    /// The revocations in force on the profile or its keys, newest first.
    pub revocations: Vec<SecretRevocation>,
}

/// A page of profiles, ordered by tenant then name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileQuery {
    /// Only profiles carrying this tag.
    pub tag: Option<String>,
    /// Only profiles after this (tenant, name): the last of the previous page.
    pub after: Option<(String, String)>,
    pub limit: u32,
}

/// A revocation to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRevocation {
    pub tenant: String,
    pub profile: String,
    /// `None` revokes the whole profile.
    pub key: Option<String>,
    pub hard: bool,
    pub reason: String,
    /// The SPIFFE ID of the operator.
    pub revoked_by: String,
    pub revoked_at_ms: i64,
}

/// A recorded revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRevocation {
    /// Assigned by the store, unique in it.
    pub id: String,
    pub tenant: String,
    pub profile: String,
    /// `None`: the whole profile is revoked.
    pub key: Option<String>,
    pub hard: bool,
    pub reason: String,
    pub revoked_by: String,
    pub revoked_at_ms: i64,
    /// The runs holding what it revoked when it was recorded, sorted.
    pub affected_run_ids: Vec<String>,
    /// `None` while in force.
    pub lifted: Option<Lift>,
}

/// How a revocation was lifted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lift {
    /// The SPIFFE ID of the operator.
    pub by: String,
    pub at_ms: i64,
    pub reason: String,
}

/// A run's hold on one secret key: the run resolved it at `resolved_at_ms`
/// and counts as holding it until `expires_at_ms`. Holdings are not history
/// (export and import leave them out): they live as long as a run may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    pub tenant: String,
    pub profile: String,
    pub key: String,
    pub run_id: String,
    pub resolved_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A page of revocations, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationQuery {
    /// Only this profile's revocations.
    pub profile: Option<String>,
    pub include_lifted: bool,
    /// Only revocations older than this (revoked_at_ms, id): the last of the
    /// previous page.
    pub before: Option<(i64, String)>,
    pub limit: u32,
}

/// The format name of [`StoreExport`] documents.
pub const EXPORT_FORMAT: &str = "bulkhead.sealed.store.v1";

/// The whole store, for backup. Secret material stays sealed (binary fields
/// in base64); restoring it is useful only with the master keys it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreExport {
    /// [`EXPORT_FORMAT`].
    pub format: String,
    pub exported_at_ms: i64,
    /// The ids of the master keys that wrap its data keys, sorted.
    pub master_key_ids: Vec<String>,
    /// Ordered by tenant then name.
    pub profiles: Vec<ExportedProfile>,
    /// Ordered by id.
    pub revocations: Vec<SecretRevocation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedProfile {
    pub tenant: String,
    pub name: String,
    pub spec: ProfileSpec,
    pub revision: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Ordered by key.
    pub secrets: Vec<ExportedSecret>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedSecret {
    pub key: String,
    pub created_at_ms: i64,
    /// Every stored version, oldest first; the last is current.
    pub versions: Vec<ExportedVersion>,
}

/// One version: exactly one of `reference` and `sealed` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedVersion {
    pub version: u64,
    pub fingerprint: String,
    pub written_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<SealedSecret>,
}

/// What an import wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportCounts {
    pub profiles: u64,
    /// Secret keys.
    pub secrets: u64,
    /// Secret versions (every key has at least one).
    pub versions: u64,
    pub revocations: u64,
}

#[async_trait::async_trait]
pub trait SealedStore: Send + Sync + fmt::Debug {
    // Profiles.

    /// Creates an empty profile at revision 1.
    async fn create_profile(
        &self,
        tenant: &str,
        name: &str,
        spec: &ProfileSpec,
        now_ms: i64,
    ) -> Result<Profile, StoreError>;
    /// Replaces a profile's spec (its secrets are untouched) and bumps its
    /// revision; with `expected_revision`, only if the revision is still that
    /// ([`StoreError::StaleRevision`] otherwise).
    async fn update_profile(
        &self,
        tenant: &str,
        name: &str,
        spec: &ProfileSpec,
        expected_revision: Option<u64>,
        now_ms: i64,
    ) -> Result<Profile, StoreError>;
    async fn get_profile(&self, tenant: &str, name: &str) -> Result<Option<Profile>, StoreError>;
    async fn list_profiles(
        &self,
        tenants: Tenants<'_>,
        query: &ProfileQuery,
    ) -> Result<Vec<Profile>, StoreError>;
    /// Deletes a profile with every version of every secret in it; returns
    /// how many secret keys went with it. Its revocations are kept: they are
    /// history, and they still hold if the name is used again.
    async fn delete_profile(&self, tenant: &str, name: &str) -> Result<u64, StoreError>;

    // Secrets.

    /// The current version of a key, `None` if it has none.
    async fn current_version(
        &self,
        tenant: &str,
        profile: &str,
        key: &str,
    ) -> Result<Option<u64>, StoreError>;
    /// Stores a new version, which becomes current. Its version must be the
    /// current one plus one (1 for a new key); the profile's revision goes up
    /// by one.
    async fn put_secret(&self, version: &SecretVersion) -> Result<SecretMeta, StoreError>;
    /// One version of a key; `None` for the current one.
    async fn get_secret(
        &self,
        tenant: &str,
        profile: &str,
        key: &str,
        version: Option<u64>,
    ) -> Result<Option<SecretVersion>, StoreError>;
    /// Deletes every version of a key; returns the version that was current.
    async fn delete_secret(
        &self,
        tenant: &str,
        profile: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError>;
    /// A profile, the material of its current secret versions and the
    /// revocations in force on it, from one consistent read.
    async fn load_profile(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<ProfileBundle>, StoreError>;

    // Revocations.

    /// Records a revocation of a key (which must exist) or a whole profile.
    /// The store assigns its id and fills its `affected_run_ids`: the runs
    /// holding what it revokes, unexpired at `revoked_at_ms`. Both happen in
    /// one transaction inside which no holding can commit, so every holding
    /// recorded before it is listed, and every one recorded after it is
    /// followed by a revocation read that sees it (see [`crate::holdings`]).
    async fn revoke(&self, revocation: &NewRevocation) -> Result<SecretRevocation, StoreError>;
    async fn lift_revocation(
        &self,
        tenant: &str,
        id: &str,
        lift: &Lift,
    ) -> Result<SecretRevocation, StoreError>;
    async fn get_revocation(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<SecretRevocation>, StoreError>;
    async fn list_revocations(
        &self,
        tenants: Tenants<'_>,
        query: &RevocationQuery,
    ) -> Result<Vec<SecretRevocation>, StoreError>;

    // Holdings.

    /// Records holdings of any tenants in one transaction (each row keeps
    /// its own tenant); a holding already there for the same tenant, profile,
    /// key and run keeps the later times. Returns once they are committed:
    /// from then on every [`SealedStore::revoke`] of their keys lists their
    /// runs. The commit survives a crash of the process; SQLite may lose the
    /// newest commits to a power cut (they are not fsynced one by one), which
    /// is why a starting sealed-vault replays recent resolutions from audit
    /// (`crate::holdings::recover`).
    async fn record_holdings(&self, holdings: &[Holding]) -> Result<(), StoreError>;
    /// The newest `resolved_at_ms` of any holding, if there is one.
    async fn latest_holding_ms(&self) -> Result<Option<i64>, StoreError>;
    /// The runs holding `key` of a profile (`None`: any of its keys),
    /// unexpired at `now_ms`, sorted, each once.
    async fn runs_holding(
        &self,
        tenant: &str,
        profile: &str,
        key: Option<&str>,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// Deletes every holding expired at `now_ms` (whole store); returns how
    /// many.
    async fn prune_holdings(&self, now_ms: i64) -> Result<u64, StoreError>;

    // Master-key rotation (whole store).

    /// Up to `limit` sealed versions of every tenant after `after`, ordered
    /// by (tenant, profile, key, version).
    async fn sealed_versions(
        &self,
        after: Option<&VersionId>,
        limit: u32,
    ) -> Result<Vec<SealedVersion>, StoreError>;
    /// Writes re-wrapped data keys in one transaction; returns how many rows
    /// took them (a row deleted or changed meanwhile is left alone).
    async fn write_rewrapped(&self, batch: &[Rewrapped]) -> Result<u64, StoreError>;

    // Backup (whole store).

    /// Everything, from one consistent read.
    async fn export(&self, now_ms: i64) -> Result<StoreExport, StoreError>;
    /// Writes an export in one transaction. Without `overwrite` the store
    /// must be empty ([`StoreError::NotEmpty`]); with it, profiles of the
    /// same tenant and name are replaced whole and revocations of the same id
    /// updated.
    async fn import(
        &self,
        export: &StoreExport,
        overwrite: bool,
    ) -> Result<ImportCounts, StoreError>;

    /// Closes the connections, waiting for them to finish.
    async fn close(&self);
}

/// Opens `sqlite://PATH` (created if missing) or `postgres://...`.
pub async fn open(url: &str) -> Result<Arc<dyn SealedStore>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Arc::new(
            sqlite::SqliteStore::open(std::path::Path::new(path)).await?,
        ))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PgStore::open(url).await?))
    } else {
        Err(StoreError::Url)
    }
}

/// What [`rotate_master_key`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Data keys re-wrapped under the new key.
    pub rewrapped: u64,
    /// Data keys already wrapped by the new key (an earlier, interrupted run).
    pub already_current: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot re-wrap {id}")]
    Crypto {
        id: VersionId,
        #[source]
        source: CryptoError,
    },
}

/// Re-wraps every sealed version's data key from `old` to `new`, `batch`
/// versions per transaction. Versions already under `new` are counted and
/// skipped, so an interrupted rotation is finished by running it again. A
/// version under any other key stops it (nothing of that batch is written).
///
/// Seal new versions with `new` before calling, and keep `old` for opening
/// until it returns: then every secret stays readable throughout.
pub async fn rotate_master_key(
    store: &dyn SealedStore,
    old: &MasterKey,
    new: &MasterKey,
    batch: u32,
) -> Result<Rotation, RotateError> {
    let batch = batch.max(1);
    let mut done = Rotation::default();
    let mut after: Option<VersionId> = None;
    loop {
        let rows = store.sealed_versions(after.as_ref(), batch).await?;
        let Some(last) = rows.last() else {
            return Ok(done);
        };
        after = Some(last.id.clone());
        let mut rewrapped = Vec::with_capacity(rows.len());
        for row in rows {
            if row.sealed.master_key_id == new.id() {
                done.already_current += 1;
                continue;
            }
            let sealed =
                crypto::rewrap(old, new, &row.id.aad(), &row.sealed).map_err(|source| {
                    RotateError::Crypto {
                        id: row.id.clone(),
                        source,
                    }
                })?;
            rewrapped.push(Rewrapped {
                previous_master_key_id: row.sealed.master_key_id,
                id: row.id,
                sealed,
            });
        }
        if !rewrapped.is_empty() {
            done.rewrapped += store.write_rewrapped(&rewrapped).await?;
        }
    }
}

// Shared by both backends: column lists, rows as read, and their checks.

const PROFILE_COLUMNS: &str = "tenant, name, description, owner, tags, allowed_agents, env, \
     tool_acl, revision, created_at_ms, updated_at_ms";

const VERSION_COLUMNS: &str = "tenant, profile, key_name, version, reference, wrapped_key, \
     key_nonce, ciphertext, nonce, master_key_id, fingerprint, written_at_ms";

const REVOCATION_COLUMNS: &str = "id, tenant, profile, key_name, hard, reason, revoked_by, \
     revoked_at_ms, affected_run_ids, lifted_by, lifted_at_ms, lift_reason";

/// The metadata of current versions (no material): a secret joined with its
/// current version. Callers add the WHERE clause (always naming the tenant
/// for tenant-scoped reads) and the ordering.
const META_SELECT: &str = "SELECT s.tenant, s.profile, s.key_name, s.version, s.created_at_ms, \
     v.reference, v.fingerprint, v.written_at_ms \
     FROM secrets s JOIN secret_versions v ON v.tenant = s.tenant AND v.profile = s.profile \
     AND v.key_name = s.key_name AND v.version = s.version";

/// The current versions with their material, like [`META_SELECT`].
const CURRENT_SELECT: &str = "SELECT v.tenant, v.profile, v.key_name, v.version, v.reference, \
     v.wrapped_key, v.key_nonce, v.ciphertext, v.nonce, v.master_key_id, v.fingerprint, \
     v.written_at_ms, s.created_at_ms \
     FROM secrets s JOIN secret_versions v ON v.tenant = s.tenant AND v.profile = s.profile \
     AND v.key_name = s.key_name AND v.version = s.version";

fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("{what} {v} is out of range")))
}

fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} is negative")))
}

fn json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn from_json<T: for<'de> Deserialize<'de>>(text: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|_| StoreError::Corrupt(format!("{what} is not valid json")))
}

/// A profile's spec as its row stores it (lists and maps as JSON text).
struct SpecColumns {
    tags: String,
    allowed_agents: String,
    env: String,
    tool_acl: String,
}

impl SpecColumns {
    fn of(spec: &ProfileSpec) -> Result<Self, StoreError> {
        Ok(Self {
            tags: json(&spec.tags)?,
            allowed_agents: json(&spec.allowed_agents)?,
            env: json(&spec.env)?,
            tool_acl: json(&spec.tool_acl)?,
        })
    }
}

/// A version's material as its row stores it: either the reference or all
/// five sealed columns (a CHECK constraint holds the table to that).
struct MaterialColumns<'a> {
    reference: Option<&'a str>,
    wrapped_key: Option<&'a [u8]>,
    key_nonce: Option<&'a [u8]>,
    ciphertext: Option<&'a [u8]>,
    nonce: Option<&'a [u8]>,
    master_key_id: Option<&'a str>,
}

impl<'a> MaterialColumns<'a> {
    fn of(material: &'a SecretMaterial) -> Self {
        match material {
            SecretMaterial::Sealed(s) => Self {
                reference: None,
                wrapped_key: Some(&s.wrapped_key),
                key_nonce: Some(&s.key_nonce),
                ciphertext: Some(&s.ciphertext),
                nonce: Some(&s.nonce),
                master_key_id: Some(&s.master_key_id),
            },
            SecretMaterial::Reference(r) => Self {
                reference: Some(r),
                wrapped_key: None,
                key_nonce: None,
                ciphertext: None,
                nonce: None,
                master_key_id: None,
            },
        }
    }
}

#[derive(sqlx::FromRow)]
struct RawProfile {
    tenant: String,
    name: String,
    description: String,
    owner: String,
    tags: String,
    allowed_agents: String,
    env: String,
    tool_acl: String,
    revision: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl RawProfile {
    fn decode(self, secrets: Vec<SecretMeta>) -> Result<Profile, StoreError> {
        let what = |field: &str| format!("profile {}/{} {field}", self.tenant, self.name);
        let spec = ProfileSpec {
            description: self.description,
            owner: self.owner,
            tags: from_json(&self.tags, &what("tags"))?,
            allowed_agents: from_json(&self.allowed_agents, &what("allowed_agents"))?,
            env: from_json(&self.env, &what("env"))?,
            tool_acl: from_json(&self.tool_acl, &what("tool_acl"))?,
        };
        Ok(Profile {
            revision: to_u64(self.revision, &what("revision"))?,
            tenant: self.tenant,
            name: self.name,
            spec,
            secrets,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        })
    }
}

/// A current version's metadata as [`META_SELECT`] reads it.
#[derive(sqlx::FromRow)]
struct RawMeta {
    tenant: String,
    profile: String,
    key_name: String,
    version: i64,
    created_at_ms: i64,
    reference: Option<String>,
    fingerprint: String,
    written_at_ms: i64,
}

impl RawMeta {
    /// The (tenant, profile) it belongs to, and the metadata.
    fn decode(self) -> Result<((String, String), SecretMeta), StoreError> {
        let meta = SecretMeta {
            version: to_u64(self.version, &format!("secret {} version", self.key_name))?,
            key: self.key_name,
            reference: self.reference,
            fingerprint: self.fingerprint,
            created_at_ms: self.created_at_ms,
            last_rotated_at_ms: self.written_at_ms,
        };
        Ok(((self.tenant, self.profile), meta))
    }
}

/// Groups metadata rows (ordered by tenant, profile, key) by profile.
fn group_meta(
    rows: Vec<RawMeta>,
) -> Result<BTreeMap<(String, String), Vec<SecretMeta>>, StoreError> {
    let mut out: BTreeMap<(String, String), Vec<SecretMeta>> = BTreeMap::new();
    for row in rows {
        let (profile, meta) = row.decode()?;
        out.entry(profile).or_default().push(meta);
    }
    Ok(out)
}

/// Joins a page of profile rows with their secrets' metadata.
fn assemble_profiles(
    rows: Vec<RawProfile>,
    meta: Vec<RawMeta>,
) -> Result<Vec<Profile>, StoreError> {
    let mut meta = group_meta(meta)?;
    rows.into_iter()
        .map(|row| {
            let secrets = meta
                .remove(&(row.tenant.clone(), row.name.clone()))
                .unwrap_or_default();
            row.decode(secrets)
        })
        .collect()
}

#[derive(sqlx::FromRow)]
struct RawVersion {
    tenant: String,
    profile: String,
    key_name: String,
    version: i64,
    reference: Option<String>,
    wrapped_key: Option<Vec<u8>>,
    key_nonce: Option<Vec<u8>>,
    ciphertext: Option<Vec<u8>>,
    nonce: Option<Vec<u8>>,
    master_key_id: Option<String>,
    fingerprint: String,
    written_at_ms: i64,
}

impl RawVersion {
    fn decode(self) -> Result<SecretVersion, StoreError> {
        let version = to_u64(self.version, "secret version")?;
        let id = VersionId {
            tenant: self.tenant,
            profile: self.profile,
            key: self.key_name,
            version,
        };
        let corrupt = |what: &str| StoreError::Corrupt(format!("{id}: {what}"));
        let material = match (
            self.reference,
            self.wrapped_key,
            self.key_nonce,
            self.ciphertext,
            self.nonce,
            self.master_key_id,
        ) {
            (Some(reference), None, None, None, None, None) => SecretMaterial::Reference(reference),
            (None, Some(wrapped_key), Some(key_nonce), Some(ciphertext), Some(nonce), Some(mk)) => {
                SecretMaterial::Sealed(SealedSecret {
                    wrapped_key,
                    key_nonce: nonce_of(key_nonce).ok_or_else(|| corrupt("key nonce length"))?,
                    ciphertext,
                    nonce: nonce_of(nonce).ok_or_else(|| corrupt("nonce length"))?,
                    master_key_id: mk,
                })
            }
            _ => return Err(corrupt("neither a reference nor sealed material")),
        };
        Ok(SecretVersion {
            id,
            material,
            fingerprint: self.fingerprint,
            written_at_ms: self.written_at_ms,
        })
    }
}

fn nonce_of(bytes: Vec<u8>) -> Option<[u8; NONCE_LEN]> {
    bytes.try_into().ok()
}

/// A current version with its key's creation time, as [`CURRENT_SELECT`]
/// reads it.
#[derive(sqlx::FromRow)]
struct RawCurrent {
    #[sqlx(flatten)]
    version: RawVersion,
    created_at_ms: i64,
}

impl RawCurrent {
    fn decode(self) -> Result<(SecretMeta, SecretVersion), StoreError> {
        let created_at_ms = self.created_at_ms;
        let v = self.version.decode()?;
        let meta = SecretMeta {
            key: v.id.key.clone(),
            version: v.id.version,
            reference: match &v.material {
                SecretMaterial::Reference(r) => Some(r.clone()),
                SecretMaterial::Sealed(_) => None,
            },
            fingerprint: v.fingerprint.clone(),
            created_at_ms,
            last_rotated_at_ms: v.written_at_ms,
        };
        Ok((meta, v))
    }
}

#[derive(sqlx::FromRow)]
struct RawRevocation {
    id: String,
    tenant: String,
    profile: String,
    key_name: Option<String>,
    hard: bool,
    reason: String,
    revoked_by: String,
    revoked_at_ms: i64,
    affected_run_ids: String,
    lifted_by: Option<String>,
    lifted_at_ms: Option<i64>,
    lift_reason: Option<String>,
}

impl RawRevocation {
    fn decode(self) -> Result<SecretRevocation, StoreError> {
        let lifted = match (self.lifted_by, self.lifted_at_ms, self.lift_reason) {
            (Some(by), Some(at_ms), Some(reason)) => Some(Lift { by, at_ms, reason }),
            (None, None, None) => None,
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "revocation {}: partly lifted",
                    self.id
                )));
            }
        };
        Ok(SecretRevocation {
            affected_run_ids: from_json(
                &self.affected_run_ids,
                &format!("revocation {} affected_run_ids", self.id),
            )?,
            id: self.id,
            tenant: self.tenant,
            profile: self.profile,
            key: self.key_name,
            hard: self.hard,
            reason: self.reason,
            revoked_by: self.revoked_by,
            revoked_at_ms: self.revoked_at_ms,
            lifted,
        })
    }
}

/// A fresh revocation id: 128 random bits, so ids from different stores (an
/// import) do not collide.
fn new_revocation_id() -> String {
    format!("rv_{}", hex::encode(rand::random::<[u8; 16]>()))
}

fn revocation_of(id: String, r: &NewRevocation, affected_run_ids: Vec<String>) -> SecretRevocation {
    SecretRevocation {
        id,
        tenant: r.tenant.clone(),
        profile: r.profile.clone(),
        key: r.key.clone(),
        hard: r.hard,
        reason: r.reason.clone(),
        revoked_by: r.revoked_by.clone(),
        revoked_at_ms: r.revoked_at_ms,
        affected_run_ids,
        lifted: None,
    }
}

/// Checks a version to be written: a number that fits the column, and
/// material a row can hold.
fn check_version(v: &SecretVersion) -> Result<i64, StoreError> {
    if v.id.version == 0 {
        return Err(StoreError::Invalid("secret versions start at 1".into()));
    }
    if let SecretMaterial::Sealed(s) = &v.material
        && s.master_key_id.is_empty()
    {
        return Err(StoreError::Invalid(format!("{}: no master key id", v.id)));
    }
    to_i64(v.id.version, "secret version")
}

/// Builds an export from every row, each list ordered as [`StoreExport`]
/// documents: profiles and versions by their keys, revocations by id.
fn assemble_export(
    now_ms: i64,
    profiles: Vec<RawProfile>,
    secrets: Vec<(String, String, String, i64)>,
    versions: Vec<RawVersion>,
    revocations: Vec<RawRevocation>,
) -> Result<StoreExport, StoreError> {
    let mut master_key_ids = BTreeSet::new();
    let mut by_key: BTreeMap<(String, String, String), Vec<ExportedVersion>> = BTreeMap::new();
    for row in versions {
        let v = row.decode()?;
        let (reference, sealed) = match v.material {
            SecretMaterial::Reference(r) => (Some(r), None),
            SecretMaterial::Sealed(s) => {
                master_key_ids.insert(s.master_key_id.clone());
                (None, Some(s))
            }
        };
        by_key
            .entry((v.id.tenant, v.id.profile, v.id.key))
            .or_default()
            .push(ExportedVersion {
                version: v.id.version,
                fingerprint: v.fingerprint,
                written_at_ms: v.written_at_ms,
                reference,
                sealed,
            });
    }
    let mut by_profile: BTreeMap<(String, String), Vec<ExportedSecret>> = BTreeMap::new();
    for (tenant, profile, key, created_at_ms) in secrets {
        let versions = by_key
            .remove(&(tenant.clone(), profile.clone(), key.clone()))
            .unwrap_or_default();
        by_profile
            .entry((tenant, profile))
            .or_default()
            .push(ExportedSecret {
                key,
                created_at_ms,
                versions,
            });
    }
    let profiles = profiles
        .into_iter()
        .map(|row| {
            let secrets = by_profile
                .remove(&(row.tenant.clone(), row.name.clone()))
                .unwrap_or_default();
            let p = row.decode(Vec::new())?;
            Ok(ExportedProfile {
                tenant: p.tenant,
                name: p.name,
                spec: p.spec,
                revision: p.revision,
                created_at_ms: p.created_at_ms,
                updated_at_ms: p.updated_at_ms,
                secrets,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(StoreExport {
        format: EXPORT_FORMAT.into(),
        exported_at_ms: now_ms,
        master_key_ids: master_key_ids.into_iter().collect(),
        profiles,
        revocations: revocations
            .into_iter()
            .map(RawRevocation::decode)
            .collect::<Result<_, _>>()?,
    })
}

/// Checks an export before any of it is written: its format, one entry per
/// profile, key and version, versions in order, each with exactly one kind of
/// material, and numbers that fit the columns.
fn check_export(export: &StoreExport) -> Result<ImportCounts, StoreError> {
    let invalid = |what: String| Err(StoreError::Invalid(what));
    if export.format != EXPORT_FORMAT {
        return invalid(format!(
            "export format {:?} is not {EXPORT_FORMAT}",
            export.format
        ));
    }
    let mut counts = ImportCounts::default();
    let mut profiles = BTreeSet::new();
    for p in &export.profiles {
        if !profiles.insert((&p.tenant, &p.name)) {
            return invalid(format!("profile {}/{} appears twice", p.tenant, p.name));
        }
        if p.revision == 0 {
            return invalid(format!("profile {}/{} has revision 0", p.tenant, p.name));
        }
        to_i64(p.revision, "profile revision")?;
        let mut keys = BTreeSet::new();
        for s in &p.secrets {
            if !keys.insert(&s.key) {
                return invalid(format!("secret {} appears twice in {}", s.key, p.name));
            }
            let mut last = 0;
            for v in &s.versions {
                if v.version <= last {
                    return invalid(format!(
                        "secret {} of {}/{}: versions are not increasing",
                        s.key, p.tenant, p.name
                    ));
                }
                last = v.version;
                to_i64(v.version, "secret version")?;
                if v.reference.is_some() == v.sealed.is_some() {
                    return invalid(format!(
                        "secret {} version {} of {}/{}: needs exactly one of reference and sealed",
                        s.key, v.version, p.tenant, p.name
                    ));
                }
                counts.versions += 1;
            }
            if last == 0 {
                return invalid(format!("secret {} of {} has no versions", s.key, p.name));
            }
            counts.secrets += 1;
        }
        counts.profiles += 1;
    }
    let mut ids = BTreeSet::new();
    for r in &export.revocations {
        if !ids.insert(&r.id) {
            return invalid(format!("revocation {} appears twice", r.id));
        }
        counts.revocations += 1;
    }
    Ok(counts)
}

/// The version an exported secret's current row points at.
fn current_of(s: &ExportedSecret) -> u64 {
    s.versions.last().map_or(0, |v| v.version)
}

/// An exported version as a version row.
fn version_of(p: &ExportedProfile, s: &ExportedSecret, v: &ExportedVersion) -> SecretVersion {
    SecretVersion {
        id: VersionId::new(&p.tenant, &p.name, &s.key, v.version),
        material: match (&v.reference, &v.sealed) {
            (_, Some(sealed)) => SecretMaterial::Sealed(sealed.clone()),
            (reference, None) => SecretMaterial::Reference(reference.clone().unwrap_or_default()),
        },
        fingerprint: v.fingerprint.clone(),
        written_at_ms: v.written_at_ms,
    }
}

/// Rows per holdings INSERT: 6 parameters each, well under both databases'
/// limits on parameters per statement.
const HOLDINGS_PER_STATEMENT: usize = 1000;

/// Holdings as rows to write: one per (tenant, profile, key, run), keeping the
/// later times, in primary-key order (so concurrent writers of PostgreSQL lock
/// shared rows in one order and cannot deadlock).
fn holding_rows(holdings: &[Holding]) -> Result<Vec<Holding>, StoreError> {
    let mut rows: BTreeMap<(&str, &str, &str, &str), Holding> = BTreeMap::new();
    for h in holdings {
        if [&h.tenant, &h.profile, &h.key, &h.run_id]
            .iter()
            .any(|f| f.is_empty())
        {
            return Err(StoreError::Invalid(
                "a holding names a tenant, profile, key and run".into(),
            ));
        }
        rows.entry((&h.tenant, &h.profile, &h.key, &h.run_id))
            .and_modify(|row| {
                row.resolved_at_ms = row.resolved_at_ms.max(h.resolved_at_ms);
                row.expires_at_ms = row.expires_at_ms.max(h.expires_at_ms);
            })
            .or_insert_with(|| h.clone());
    }
    Ok(rows.into_values().collect())
}

/// Whether a database error is a unique-key violation (a concurrent writer
/// got there first).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}
