//! The embedded store: SQLite in WAL mode with synchronous=FULL, so an
//! acknowledged write survives a power cut.
//!
//! Writers take the write lock up front (`BEGIN IMMEDIATE`), so the checks a
//! write makes (the profile exists, the version follows the current one, the
//! revision is the expected one) still hold when it commits. `secure_delete`
//! overwrites deleted rows with zeros, so a deleted secret's wrapped data key
//! does not linger in free pages of the file.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{
    ConnectOptions as _, Connection as _, QueryBuilder, Sqlite, SqliteConnection, SqlitePool,
    Transaction,
};

use super::{
    CURRENT_SELECT, HOLDINGS_PER_STATEMENT, Holding, ImportCounts, Lift, META_SELECT,
    MaterialColumns, NewRevocation, PROFILE_COLUMNS, Profile, ProfileBundle, ProfileQuery,
    ProfileSpec, REVOCATION_COLUMNS, RawCurrent, RawMeta, RawProfile, RawRevocation, RawVersion,
    RevocationQuery, Rewrapped, SealedStore, SealedVersion, SecretMaterial, SecretMeta,
    SecretRevocation, SecretVersion, SpecColumns, StoreError, StoreExport, Tenants,
    VERSION_COLUMNS, VersionId, assemble_export, assemble_profiles, check_export, check_version,
    current_of, holding_rows, is_unique_violation, new_revocation_id, revocation_of, to_i64,
    to_u64, version_of,
};

const SCHEMA: &[&str] = &[
    // Lists and maps of the spec are JSON text.
    "CREATE TABLE IF NOT EXISTS profiles (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        owner TEXT NOT NULL,
        tags TEXT NOT NULL,
        allowed_agents TEXT NOT NULL,
        env TEXT NOT NULL,
        tool_acl TEXT NOT NULL,
        revision INTEGER NOT NULL CHECK (revision > 0),
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        PRIMARY KEY (tenant, name)
    )",
    // One row per secret key: which version is current, and when the key was
    // first written.
    "CREATE TABLE IF NOT EXISTS secrets (
        tenant TEXT NOT NULL,
        profile TEXT NOT NULL,
        key_name TEXT NOT NULL,
        version INTEGER NOT NULL CHECK (version > 0),
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (tenant, profile, key_name),
        FOREIGN KEY (tenant, profile) REFERENCES profiles (tenant, name) ON DELETE CASCADE
    )",
    "CREATE TABLE IF NOT EXISTS secret_versions (
        tenant TEXT NOT NULL,
        profile TEXT NOT NULL,
        key_name TEXT NOT NULL,
        version INTEGER NOT NULL CHECK (version > 0),
        reference TEXT,
        wrapped_key BLOB,
        key_nonce BLOB,
        ciphertext BLOB,
        nonce BLOB,
        master_key_id TEXT,
        fingerprint TEXT NOT NULL,
        written_at_ms INTEGER NOT NULL,
        PRIMARY KEY (tenant, profile, key_name, version),
        FOREIGN KEY (tenant, profile, key_name)
            REFERENCES secrets (tenant, profile, key_name) ON DELETE CASCADE,
        CHECK ((reference IS NOT NULL AND wrapped_key IS NULL AND key_nonce IS NULL
                AND ciphertext IS NULL AND nonce IS NULL AND master_key_id IS NULL)
            OR (reference IS NULL AND wrapped_key IS NOT NULL AND key_nonce IS NOT NULL
                AND ciphertext IS NOT NULL AND nonce IS NOT NULL AND master_key_id IS NOT NULL))
    )",
    // key_name NULL: the whole profile is revoked.
    "CREATE TABLE IF NOT EXISTS revocations (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        profile TEXT NOT NULL,
        key_name TEXT,
        hard INTEGER NOT NULL,
        reason TEXT NOT NULL,
        revoked_by TEXT NOT NULL,
        revoked_at_ms INTEGER NOT NULL,
        affected_run_ids TEXT NOT NULL,
        lifted_by TEXT,
        lifted_at_ms INTEGER,
        lift_reason TEXT,
        CHECK ((lifted_by IS NULL) = (lifted_at_ms IS NULL)
            AND (lifted_by IS NULL) = (lift_reason IS NULL))
    )",
    "CREATE INDEX IF NOT EXISTS revocations_newest ON revocations (revoked_at_ms, id)",
    "CREATE INDEX IF NOT EXISTS revocations_tenant_newest
        ON revocations (tenant, revoked_at_ms, id)",
    "CREATE INDEX IF NOT EXISTS revocations_in_force ON revocations (tenant, profile)
        WHERE lifted_at_ms IS NULL",
    // Which runs resolved which keys. The primary key answers "the runs
    // holding (tenant, profile[, key])"; without a rowid the table is that
    // index, so the expiry it filters on is read from the same b-tree.
    "CREATE TABLE IF NOT EXISTS run_holdings (
        tenant TEXT NOT NULL,
        profile TEXT NOT NULL,
        key_name TEXT NOT NULL,
        run_id TEXT NOT NULL,
        resolved_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        PRIMARY KEY (tenant, profile, key_name, run_id)
    ) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS run_holdings_expiry ON run_holdings (expires_at_ms)",
];

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Holdings' own connection, with synchronous=NORMAL: their commit is
    /// visible to every reader at once (all the race argument of
    /// `crate::holdings` needs) and survives a crash of the process, without
    /// an fsync of its own beside audit's on every Resolve. A power cut may
    /// take the newest ones; audit has them durably, and a starting
    /// sealed-vault replays them (`crate::holdings::recover`).
    holdings: Arc<tokio::sync::Mutex<Option<SqliteConnection>>>,
    /// Profiles as `load_profile` last read them (ciphertexts, never
    /// values). One process owns the file, so its own writes are all the
    /// changes there are: each ends by emptying the cache (see
    /// [`BundleCache`]). Saves Resolve five round trips to SQLite's thread.
    bundles: Arc<BundleCache>,
}

/// Profiles cached at most; a full cache starts again empty.
const BUNDLES_CACHED: usize = 4096;

/// The generation, and the bundles by (tenant, profile).
type Bundles = (u64, HashMap<(String, String), ProfileBundle>);

/// The `load_profile` cache. A write empties it when it ends (committed or
/// not) and moves its generation on; a read caches what it read only if no
/// write ended meanwhile, so nothing read before a commit outlives it.
#[derive(Debug, Default)]
struct BundleCache {
    inner: std::sync::Mutex<Bundles>,
}

impl BundleCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Bundles> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The generation now, and the cached bundle if there is one.
    fn get(&self, tenant: &str, name: &str) -> (u64, Option<ProfileBundle>) {
        let c = self.lock();
        (c.0, c.1.get(&(tenant.to_owned(), name.to_owned())).cloned())
    }

    fn put(&self, generation: u64, bundle: &ProfileBundle) {
        let mut c = self.lock();
        if c.0 != generation {
            return;
        }
        if c.1.len() >= BUNDLES_CACHED {
            c.1.clear();
        }
        let key = (bundle.profile.tenant.clone(), bundle.profile.name.clone());
        c.1.insert(key, bundle.clone());
    }

    /// Held by every write; its drop empties the cache.
    fn writing(&self) -> Writing<'_> {
        Writing(self)
    }
}

struct Writing<'a>(&'a BundleCache);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut c = self.0.lock();
        c.0 += 1;
        c.1.clear();
    }
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .pragma("secure_delete", "ON")
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.clone())
            .await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&pool).await?;
        }
        let holdings = opts
            .synchronous(SqliteSynchronous::Normal)
            .connect()
            .await?;
        Ok(Self {
            pool,
            holdings: Arc::new(tokio::sync::Mutex::new(Some(holdings))),
            bundles: Arc::default(),
        })
    }

    /// The pool, for tests that inspect or tamper with rows the way an
    /// attacker with the file would.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A transaction holding the write lock from its start.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// A transaction whose reads all see one snapshot (WAL).
    async fn begin_read(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin().await
    }
}

async fn profile_row(
    conn: &mut SqliteConnection,
    tenant: &str,
    name: &str,
) -> Result<Option<RawProfile>, sqlx::Error> {
    sqlx::query_as::<_, RawProfile>(&format!(
        "SELECT {PROFILE_COLUMNS} FROM profiles WHERE tenant = ? AND name = ?"
    ))
    .bind(tenant)
    .bind(name)
    .fetch_optional(conn)
    .await
}

async fn meta_of(
    conn: &mut SqliteConnection,
    tenant: &str,
    profile: &str,
) -> Result<Vec<RawMeta>, sqlx::Error> {
    sqlx::query_as::<_, RawMeta>(&format!(
        "{META_SELECT} WHERE s.tenant = ? AND s.profile = ? ORDER BY s.key_name"
    ))
    .bind(tenant)
    .bind(profile)
    .fetch_all(conn)
    .await
}

async fn read_profile(
    conn: &mut SqliteConnection,
    tenant: &str,
    name: &str,
) -> Result<Option<Profile>, StoreError> {
    let Some(row) = profile_row(conn, tenant, name).await? else {
        return Ok(None);
    };
    let meta = meta_of(conn, tenant, name).await?;
    Ok(assemble_profiles(vec![row], meta)?.pop())
}

async fn profile_exists(
    conn: &mut SqliteConnection,
    tenant: &str,
    name: &str,
) -> Result<bool, sqlx::Error> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM profiles WHERE tenant = ? AND name = ?")
            .bind(tenant)
            .bind(name)
            .fetch_optional(conn)
            .await?;
    Ok(found.is_some())
}

/// Bumps a profile's revision after a change to it or its secrets.
async fn touch_profile(
    conn: &mut SqliteConnection,
    tenant: &str,
    name: &str,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE profiles SET revision = revision + 1, updated_at_ms = ?
         WHERE tenant = ? AND name = ?",
    )
    .bind(now_ms)
    .bind(tenant)
    .bind(name)
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_profile(
    conn: &mut SqliteConnection,
    tenant: &str,
    name: &str,
    spec: &ProfileSpec,
    revision: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
) -> Result<(), StoreError> {
    let cols = SpecColumns::of(spec)?;
    sqlx::query(&format!(
        "INSERT INTO profiles ({PROFILE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ))
    .bind(tenant)
    .bind(name)
    .bind(&spec.description)
    .bind(&spec.owner)
    .bind(&cols.tags)
    .bind(&cols.allowed_agents)
    .bind(&cols.env)
    .bind(&cols.tool_acl)
    .bind(revision)
    .bind(created_at_ms)
    .bind(updated_at_ms)
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_version(
    conn: &mut SqliteConnection,
    v: &SecretVersion,
    version: i64,
) -> Result<(), sqlx::Error> {
    let m = MaterialColumns::of(&v.material);
    sqlx::query(&format!(
        "INSERT INTO secret_versions ({VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ))
    .bind(&v.id.tenant)
    .bind(&v.id.profile)
    .bind(&v.id.key)
    .bind(version)
    .bind(m.reference)
    .bind(m.wrapped_key)
    .bind(m.key_nonce)
    .bind(m.ciphertext)
    .bind(m.nonce)
    .bind(m.master_key_id)
    .bind(&v.fingerprint)
    .bind(v.written_at_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes a profile's secrets and versions (children first, whatever the
/// foreign-key setting); returns how many keys there were.
async fn delete_secrets_of(
    conn: &mut SqliteConnection,
    tenant: &str,
    profile: &str,
) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM secret_versions WHERE tenant = ? AND profile = ?")
        .bind(tenant)
        .bind(profile)
        .execute(&mut *conn)
        .await?;
    Ok(
        sqlx::query("DELETE FROM secrets WHERE tenant = ? AND profile = ?")
            .bind(tenant)
            .bind(profile)
            .execute(conn)
            .await?
            .rows_affected(),
    )
}

async fn insert_revocation(
    conn: &mut SqliteConnection,
    r: &SecretRevocation,
    overwrite: bool,
) -> Result<(), StoreError> {
    let affected = super::json(&r.affected_run_ids)?;
    let lifted = r.lifted.as_ref();
    let upsert = if overwrite {
        " ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, profile = excluded.profile,
          key_name = excluded.key_name, hard = excluded.hard, reason = excluded.reason,
          revoked_by = excluded.revoked_by, revoked_at_ms = excluded.revoked_at_ms,
          affected_run_ids = excluded.affected_run_ids, lifted_by = excluded.lifted_by,
          lifted_at_ms = excluded.lifted_at_ms, lift_reason = excluded.lift_reason"
    } else {
        ""
    };
    sqlx::query(&format!(
        "INSERT INTO revocations ({REVOCATION_COLUMNS})
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?){upsert}"
    ))
    .bind(&r.id)
    .bind(&r.tenant)
    .bind(&r.profile)
    .bind(r.key.as_deref())
    .bind(r.hard)
    .bind(&r.reason)
    .bind(&r.revoked_by)
    .bind(r.revoked_at_ms)
    .bind(affected)
    .bind(lifted.map(|l| l.by.as_str()))
    .bind(lifted.map(|l| l.at_ms))
    .bind(lifted.map(|l| l.reason.as_str()))
    .execute(conn)
    .await?;
    Ok(())
}

/// The runs holding `key` of a profile (`None`: any key), unexpired at `now_ms`.
async fn holders(
    conn: &mut SqliteConnection,
    tenant: &str,
    profile: &str,
    key: Option<&str>,
    now_ms: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let mut qb =
        QueryBuilder::<Sqlite>::new("SELECT DISTINCT run_id FROM run_holdings WHERE tenant = ");
    qb.push_bind(tenant)
        .push(" AND profile = ")
        .push_bind(profile);
    if let Some(key) = key {
        qb.push(" AND key_name = ").push_bind(key);
    }
    qb.push(" AND expires_at_ms > ")
        .push_bind(now_ms)
        .push(" ORDER BY run_id");
    qb.build_query_scalar().fetch_all(conn).await
}

#[async_trait::async_trait]
impl SealedStore for SqliteStore {
    async fn create_profile(
        &self,
        tenant: &str,
        name: &str,
        spec: &ProfileSpec,
        now_ms: i64,
    ) -> Result<Profile, StoreError> {
        let _writing = self.bundles.writing();
        let mut conn = self.pool.acquire().await?;
        match insert_profile(&mut conn, tenant, name, spec, 1, now_ms, now_ms).await {
            Err(StoreError::Db(e)) if is_unique_violation(&e) => Err(StoreError::ProfileExists {
                tenant: tenant.into(),
                profile: name.into(),
            }),
            Err(e) => Err(e),
            Ok(()) => Ok(Profile {
                tenant: tenant.into(),
                name: name.into(),
                spec: spec.clone(),
                secrets: Vec::new(),
                revision: 1,
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
            }),
        }
    }

    async fn update_profile(
        &self,
        tenant: &str,
        name: &str,
        spec: &ProfileSpec,
        expected_revision: Option<u64>,
        now_ms: i64,
    ) -> Result<Profile, StoreError> {
        let _writing = self.bundles.writing();
        let cols = SpecColumns::of(spec)?;
        let mut tx = self.begin_write().await?;
        let revision: Option<i64> =
            sqlx::query_scalar("SELECT revision FROM profiles WHERE tenant = ? AND name = ?")
                .bind(tenant)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(revision) = revision else {
            return Err(StoreError::ProfileNotFound {
                tenant: tenant.into(),
                profile: name.into(),
            });
        };
        let actual = to_u64(revision, "profile revision")?;
        if let Some(expected) = expected_revision.filter(|e| *e != actual) {
            return Err(StoreError::StaleRevision {
                tenant: tenant.into(),
                profile: name.into(),
                expected,
                actual,
            });
        }
        let keys: Vec<String> =
            sqlx::query_scalar("SELECT key_name FROM secrets WHERE tenant = ? AND profile = ?")
                .bind(tenant)
                .bind(name)
                .fetch_all(&mut *tx)
                .await?;
        if let Some(key) = keys.into_iter().find(|k| spec.env.contains_key(k)) {
            return Err(StoreError::KeyCollision {
                tenant: tenant.into(),
                profile: name.into(),
                key,
            });
        }
        sqlx::query(
            "UPDATE profiles SET description = ?, owner = ?, tags = ?, allowed_agents = ?,
                 env = ?, tool_acl = ?, revision = revision + 1, updated_at_ms = ?
             WHERE tenant = ? AND name = ?",
        )
        .bind(&spec.description)
        .bind(&spec.owner)
        .bind(&cols.tags)
        .bind(&cols.allowed_agents)
        .bind(&cols.env)
        .bind(&cols.tool_acl)
        .bind(now_ms)
        .bind(tenant)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        let profile = read_profile(&mut tx, tenant, name).await?;
        tx.commit().await?;
        profile.ok_or_else(|| StoreError::ProfileNotFound {
            tenant: tenant.into(),
            profile: name.into(),
        })
    }

    async fn get_profile(&self, tenant: &str, name: &str) -> Result<Option<Profile>, StoreError> {
        let mut tx = self.begin_read().await?;
        let profile = read_profile(&mut tx, tenant, name).await?;
        tx.commit().await?;
        Ok(profile)
    }

    async fn list_profiles(
        &self,
        tenants: Tenants<'_>,
        query: &ProfileQuery,
    ) -> Result<Vec<Profile>, StoreError> {
        let mut tx = self.begin_read().await?;
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {PROFILE_COLUMNS} FROM profiles WHERE 1=1"
        ));
        if let Tenants::One(tenant) = tenants {
            qb.push(" AND tenant = ").push_bind(tenant);
        }
        if let Some(tag) = &query.tag {
            qb.push(" AND EXISTS (SELECT 1 FROM json_each(profiles.tags) WHERE value = ")
                .push_bind(tag)
                .push(")");
        }
        if let Some((tenant, name)) = &query.after {
            qb.push(" AND (tenant, name) > (")
                .push_bind(tenant)
                .push(", ")
                .push_bind(name)
                .push(")");
        }
        qb.push(" ORDER BY tenant, name LIMIT ")
            .push_bind(i64::from(query.limit));
        let rows = qb
            .build_query_as::<RawProfile>()
            .fetch_all(&mut *tx)
            .await?;
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            tx.commit().await?;
            return Ok(Vec::new());
        };
        // The page's secrets in one read: the page is a contiguous range of
        // (tenant, profile).
        let mut qb = QueryBuilder::<Sqlite>::new(META_SELECT);
        qb.push(" WHERE (s.tenant, s.profile) >= (")
            .push_bind(&first.tenant)
            .push(", ")
            .push_bind(&first.name)
            .push(") AND (s.tenant, s.profile) <= (")
            .push_bind(&last.tenant)
            .push(", ")
            .push_bind(&last.name)
            .push(")");
        if let Tenants::One(tenant) = tenants {
            qb.push(" AND s.tenant = ").push_bind(tenant);
        }
        qb.push(" ORDER BY s.tenant, s.profile, s.key_name");
        let meta = qb.build_query_as::<RawMeta>().fetch_all(&mut *tx).await?;
        tx.commit().await?;
        assemble_profiles(rows, meta)
    }

    async fn delete_profile(&self, tenant: &str, name: &str) -> Result<u64, StoreError> {
        let _writing = self.bundles.writing();
        let mut tx = self.begin_write().await?;
        let secrets = delete_secrets_of(&mut tx, tenant, name).await?;
        let deleted = sqlx::query("DELETE FROM profiles WHERE tenant = ? AND name = ?")
            .bind(tenant)
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::ProfileNotFound {
                tenant: tenant.into(),
                profile: name.into(),
            });
        }
        tx.commit().await?;
        Ok(secrets)
    }

    async fn current_version(
        &self,
        tenant: &str,
        profile: &str,
        key: &str,
    ) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM secrets WHERE tenant = ? AND profile = ? AND key_name = ?",
        )
        .bind(tenant)
        .bind(profile)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        v.map(|v| to_u64(v, "secret version")).transpose()
    }

    async fn put_secret(&self, v: &SecretVersion) -> Result<SecretMeta, StoreError> {
        let _writing = self.bundles.writing();
        let version = check_version(v)?;
        let id = &v.id;
        let mut tx = self.begin_write().await?;
        let env: Option<String> =
            sqlx::query_scalar("SELECT env FROM profiles WHERE tenant = ? AND name = ?")
                .bind(&id.tenant)
                .bind(&id.profile)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(env) = env else {
            return Err(StoreError::ProfileNotFound {
                tenant: id.tenant.clone(),
                profile: id.profile.clone(),
            });
        };
        let env: std::collections::BTreeMap<String, String> =
            super::from_json(&env, "profile env")?;
        if env.contains_key(&id.key) {
            return Err(StoreError::KeyCollision {
                tenant: id.tenant.clone(),
                profile: id.profile.clone(),
                key: id.key.clone(),
            });
        }
        let current: Option<(i64, i64)> = sqlx::query_as(
            "SELECT version, created_at_ms FROM secrets
             WHERE tenant = ? AND profile = ? AND key_name = ?",
        )
        .bind(&id.tenant)
        .bind(&id.profile)
        .bind(&id.key)
        .fetch_optional(&mut *tx)
        .await?;
        let (current_version, created_at_ms) = current.unwrap_or((0, v.written_at_ms));
        if version != current_version + 1 {
            return Err(StoreError::VersionConflict {
                key: id.key.clone(),
                current: to_u64(current_version, "secret version")?,
                attempted: id.version,
            });
        }
        sqlx::query(
            "INSERT INTO secrets (tenant, profile, key_name, version, created_at_ms)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (tenant, profile, key_name) DO UPDATE SET version = excluded.version",
        )
        .bind(&id.tenant)
        .bind(&id.profile)
        .bind(&id.key)
        .bind(version)
        .bind(created_at_ms)
        .execute(&mut *tx)
        .await?;
        insert_version(&mut tx, v, version).await?;
        touch_profile(&mut tx, &id.tenant, &id.profile, v.written_at_ms).await?;
        tx.commit().await?;
        Ok(SecretMeta {
            key: id.key.clone(),
            version: id.version,
            reference: match &v.material {
                SecretMaterial::Reference(r) => Some(r.clone()),
                SecretMaterial::Sealed(_) => None,
            },
            fingerprint: v.fingerprint.clone(),
            created_at_ms,
            last_rotated_at_ms: v.written_at_ms,
        })
    }

    async fn get_secret(
        &self,
        tenant: &str,
        profile: &str,
        key: &str,
        version: Option<u64>,
    ) -> Result<Option<SecretVersion>, StoreError> {
        let row = match version {
            None => sqlx::query_as::<_, RawCurrent>(&format!(
                "{CURRENT_SELECT} WHERE s.tenant = ? AND s.profile = ? AND s.key_name = ?"
            ))
            .bind(tenant)
            .bind(profile)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.version),
            Some(version) => {
                sqlx::query_as::<_, RawVersion>(&format!(
                    "SELECT {VERSION_COLUMNS} FROM secret_versions
                     WHERE tenant = ? AND profile = ? AND key_name = ? AND version = ?"
                ))
                .bind(tenant)
                .bind(profile)
                .bind(key)
                .bind(to_i64(version, "secret version")?)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        row.map(RawVersion::decode).transpose()
    }

    async fn delete_secret(
        &self,
        tenant: &str,
        profile: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let _writing = self.bundles.writing();
        let mut tx = self.begin_write().await?;
        let current: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM secrets WHERE tenant = ? AND profile = ? AND key_name = ?",
        )
        .bind(tenant)
        .bind(profile)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(current) = current else {
            return Err(if profile_exists(&mut tx, tenant, profile).await? {
                StoreError::SecretNotFound {
                    tenant: tenant.into(),
                    profile: profile.into(),
                    key: key.into(),
                }
            } else {
                StoreError::ProfileNotFound {
                    tenant: tenant.into(),
                    profile: profile.into(),
                }
            });
        };
        sqlx::query(
            "DELETE FROM secret_versions WHERE tenant = ? AND profile = ? AND key_name = ?",
        )
        .bind(tenant)
        .bind(profile)
        .bind(key)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM secrets WHERE tenant = ? AND profile = ? AND key_name = ?")
            .bind(tenant)
            .bind(profile)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        touch_profile(&mut tx, tenant, profile, now_ms).await?;
        tx.commit().await?;
        to_u64(current, "secret version")
    }

    async fn load_profile(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<ProfileBundle>, StoreError> {
        let (generation, cached) = self.bundles.get(tenant, name);
        if cached.is_some() {
            return Ok(cached);
        }
        let mut tx = self.begin_read().await?;
        let Some(row) = profile_row(&mut tx, tenant, name).await? else {
            tx.commit().await?;
            return Ok(None);
        };
        let current = sqlx::query_as::<_, RawCurrent>(&format!(
            "{CURRENT_SELECT} WHERE s.tenant = ? AND s.profile = ? ORDER BY s.key_name"
        ))
        .bind(tenant)
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        let revocations = sqlx::query_as::<_, RawRevocation>(&format!(
            "SELECT {REVOCATION_COLUMNS} FROM revocations
             WHERE tenant = ? AND profile = ? AND lifted_at_ms IS NULL
             ORDER BY revoked_at_ms DESC, id DESC"
        ))
        .bind(tenant)
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let (meta, secrets): (Vec<_>, Vec<_>) = current
            .into_iter()
            .map(RawCurrent::decode)
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let bundle = ProfileBundle {
            profile: row.decode(meta)?,
            secrets,
            revocations: revocations
                .into_iter()
                .map(RawRevocation::decode)
                .collect::<Result<_, _>>()?,
        };
        self.bundles.put(generation, &bundle);
        Ok(Some(bundle))
    }

    async fn revoke(&self, r: &NewRevocation) -> Result<SecretRevocation, StoreError> {
        let _writing = self.bundles.writing();
        let mut tx = self.begin_write().await?;
        if !profile_exists(&mut tx, &r.tenant, &r.profile).await? {
            return Err(StoreError::ProfileNotFound {
                tenant: r.tenant.clone(),
                profile: r.profile.clone(),
            });
        }
        if let Some(key) = &r.key {
            let found: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM secrets WHERE tenant = ? AND profile = ? AND key_name = ?",
            )
            .bind(&r.tenant)
            .bind(&r.profile)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if found.is_none() {
                return Err(StoreError::SecretNotFound {
                    tenant: r.tenant.clone(),
                    profile: r.profile.clone(),
                    key: key.clone(),
                });
            }
        }
        // The write lock, held since BEGIN IMMEDIATE, keeps every holding
        // from committing until this transaction ends.
        let affected = holders(
            &mut tx,
            &r.tenant,
            &r.profile,
            r.key.as_deref(),
            r.revoked_at_ms,
        )
        .await?;
        let revocation = revocation_of(new_revocation_id(), r, affected);
        insert_revocation(&mut tx, &revocation, false).await?;
        tx.commit().await?;
        Ok(revocation)
    }

    async fn lift_revocation(
        &self,
        tenant: &str,
        id: &str,
        lift: &Lift,
    ) -> Result<SecretRevocation, StoreError> {
        let _writing = self.bundles.writing();
        let lifted = sqlx::query_as::<_, RawRevocation>(&format!(
            "UPDATE revocations SET lifted_by = ?, lifted_at_ms = ?, lift_reason = ?
             WHERE tenant = ? AND id = ? AND lifted_at_ms IS NULL
             RETURNING {REVOCATION_COLUMNS}"
        ))
        .bind(&lift.by)
        .bind(lift.at_ms)
        .bind(&lift.reason)
        .bind(tenant)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match lifted {
            Some(row) => row.decode(),
            None => Err(match self.get_revocation(tenant, id).await? {
                Some(_) => StoreError::AlreadyLifted { id: id.into() },
                None => StoreError::RevocationNotFound { id: id.into() },
            }),
        }
    }

    async fn get_revocation(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<SecretRevocation>, StoreError> {
        sqlx::query_as::<_, RawRevocation>(&format!(
            "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE tenant = ? AND id = ?"
        ))
        .bind(tenant)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .map(RawRevocation::decode)
        .transpose()
    }

    async fn list_revocations(
        &self,
        tenants: Tenants<'_>,
        query: &RevocationQuery,
    ) -> Result<Vec<SecretRevocation>, StoreError> {
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE 1=1"
        ));
        if let Tenants::One(tenant) = tenants {
            qb.push(" AND tenant = ").push_bind(tenant);
        }
        if let Some(profile) = &query.profile {
            qb.push(" AND profile = ").push_bind(profile);
        }
        if !query.include_lifted {
            qb.push(" AND lifted_at_ms IS NULL");
        }
        if let Some((at_ms, id)) = &query.before {
            qb.push(" AND (revoked_at_ms, id) < (")
                .push_bind(*at_ms)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        qb.push(" ORDER BY revoked_at_ms DESC, id DESC LIMIT ")
            .push_bind(i64::from(query.limit));
        qb.build_query_as::<RawRevocation>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(RawRevocation::decode)
            .collect()
    }

    async fn record_holdings(&self, holdings: &[Holding]) -> Result<(), StoreError> {
        let rows = holding_rows(holdings)?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut conn = self.holdings.lock().await;
        let conn = conn.as_mut().ok_or(sqlx::Error::PoolClosed)?;
        // One statement commits on its own: one round trip to SQLite's
        // thread instead of three.
        if rows.len() <= HOLDINGS_PER_STATEMENT {
            insert_holdings(&rows).build().execute(&mut *conn).await?;
            return Ok(());
        }
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        for chunk in rows.chunks(HOLDINGS_PER_STATEMENT) {
            insert_holdings(chunk).build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn runs_holding(
        &self,
        tenant: &str,
        profile: &str,
        key: Option<&str>,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Ok(holders(&mut conn, tenant, profile, key, now_ms).await?)
    }

    async fn latest_holding_ms(&self) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT MAX(resolved_at_ms) FROM run_holdings")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn prune_holdings(&self, now_ms: i64) -> Result<u64, StoreError> {
        Ok(
            sqlx::query("DELETE FROM run_holdings WHERE expires_at_ms <= ?")
                .bind(now_ms)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    async fn sealed_versions(
        &self,
        after: Option<&VersionId>,
        limit: u32,
    ) -> Result<Vec<SealedVersion>, StoreError> {
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {VERSION_COLUMNS} FROM secret_versions WHERE wrapped_key IS NOT NULL"
        ));
        if let Some(after) = after {
            qb.push(" AND (tenant, profile, key_name, version) > (")
                .push_bind(&after.tenant)
                .push(", ")
                .push_bind(&after.profile)
                .push(", ")
                .push_bind(&after.key)
                .push(", ")
                .push_bind(to_i64(after.version, "secret version")?)
                .push(")");
        }
        qb.push(" ORDER BY tenant, profile, key_name, version LIMIT ")
            .push_bind(i64::from(limit));
        qb.build_query_as::<RawVersion>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|row| {
                let v = row.decode()?;
                match v.material {
                    SecretMaterial::Sealed(sealed) => Ok(SealedVersion { id: v.id, sealed }),
                    SecretMaterial::Reference(_) => Err(StoreError::Corrupt(format!(
                        "{}: sealed row without material",
                        v.id
                    ))),
                }
            })
            .collect()
    }

    async fn write_rewrapped(&self, batch: &[Rewrapped]) -> Result<u64, StoreError> {
        let _writing = self.bundles.writing();
        let mut tx = self.begin_write().await?;
        let mut written = 0;
        for r in batch {
            written += sqlx::query(
                "UPDATE secret_versions SET wrapped_key = ?, key_nonce = ?, master_key_id = ?
                 WHERE tenant = ? AND profile = ? AND key_name = ? AND version = ?
                   AND master_key_id = ? AND ciphertext = ? AND nonce = ?",
            )
            .bind(&r.sealed.wrapped_key)
            .bind(r.sealed.key_nonce.as_slice())
            .bind(&r.sealed.master_key_id)
            .bind(&r.id.tenant)
            .bind(&r.id.profile)
            .bind(&r.id.key)
            .bind(to_i64(r.id.version, "secret version")?)
            .bind(&r.previous_master_key_id)
            .bind(&r.sealed.ciphertext)
            .bind(r.sealed.nonce.as_slice())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(written)
    }

    async fn export(&self, now_ms: i64) -> Result<StoreExport, StoreError> {
        let mut tx = self.begin_read().await?;
        let profiles = sqlx::query_as::<_, RawProfile>(&format!(
            "SELECT {PROFILE_COLUMNS} FROM profiles ORDER BY tenant, name"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let secrets: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT tenant, profile, key_name, created_at_ms FROM secrets
             ORDER BY tenant, profile, key_name",
        )
        .fetch_all(&mut *tx)
        .await?;
        let versions = sqlx::query_as::<_, RawVersion>(&format!(
            "SELECT {VERSION_COLUMNS} FROM secret_versions
             ORDER BY tenant, profile, key_name, version"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let revocations = sqlx::query_as::<_, RawRevocation>(&format!(
            "SELECT {REVOCATION_COLUMNS} FROM revocations ORDER BY id"
        ))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        assemble_export(now_ms, profiles, secrets, versions, revocations)
    }

    async fn import(
        &self,
        export: &StoreExport,
        overwrite: bool,
    ) -> Result<ImportCounts, StoreError> {
        let _writing = self.bundles.writing();
        let counts = check_export(export)?;
        let mut tx = self.begin_write().await?;
        if !overwrite {
            let occupied: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM profiles) OR EXISTS (SELECT 1 FROM revocations)",
            )
            .fetch_one(&mut *tx)
            .await?;
            if occupied {
                return Err(StoreError::NotEmpty);
            }
        }
        for p in &export.profiles {
            if overwrite {
                delete_secrets_of(&mut tx, &p.tenant, &p.name).await?;
                sqlx::query("DELETE FROM profiles WHERE tenant = ? AND name = ?")
                    .bind(&p.tenant)
                    .bind(&p.name)
                    .execute(&mut *tx)
                    .await?;
            }
            insert_profile(
                &mut tx,
                &p.tenant,
                &p.name,
                &p.spec,
                to_i64(p.revision, "profile revision")?,
                p.created_at_ms,
                p.updated_at_ms,
            )
            .await?;
            for s in &p.secrets {
                sqlx::query(
                    "INSERT INTO secrets (tenant, profile, key_name, version, created_at_ms)
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(&p.tenant)
                .bind(&p.name)
                .bind(&s.key)
                .bind(to_i64(current_of(s), "secret version")?)
                .bind(s.created_at_ms)
                .execute(&mut *tx)
                .await?;
                for v in &s.versions {
                    let row = version_of(p, s, v);
                    insert_version(&mut tx, &row, to_i64(v.version, "secret version")?).await?;
                }
            }
        }
        for r in &export.revocations {
            insert_revocation(&mut tx, r, overwrite).await?;
        }
        tx.commit().await?;
        Ok(counts)
    }

    async fn close(&self) {
        if let Some(conn) = self.holdings.lock().await.take() {
            let _ = conn.close().await;
        }
        self.pool.close().await;
    }
}

/// The upsert of a batch of holdings (at most `HOLDINGS_PER_STATEMENT`).
fn insert_holdings(chunk: &[Holding]) -> QueryBuilder<'_, Sqlite> {
    let mut qb = QueryBuilder::<Sqlite>::new(
        "INSERT INTO run_holdings
                 (tenant, profile, key_name, run_id, resolved_at_ms, expires_at_ms) ",
    );
    qb.push_values(chunk, |mut row, h| {
        row.push_bind(&h.tenant)
            .push_bind(&h.profile)
            .push_bind(&h.key)
            .push_bind(&h.run_id)
            .push_bind(h.resolved_at_ms)
            .push_bind(h.expires_at_ms);
    });
    qb.push(
        " ON CONFLICT (tenant, profile, key_name, run_id) DO UPDATE SET
                 resolved_at_ms = MAX(resolved_at_ms, excluded.resolved_at_ms),
                 expires_at_ms = MAX(expires_at_ms, excluded.expires_at_ms)",
    );
    qb
}
