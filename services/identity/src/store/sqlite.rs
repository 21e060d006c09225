//! The embedded store: SQLite in WAL mode with synchronous=FULL, so an
//! acknowledged write survives a power cut.
//!
//! Writers of the revocation list take the write lock up front (`BEGIN
//! IMMEDIATE`), so sequences are assigned and committed in order.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool, Transaction};

use super::{
    IdentityStore, IssuedRow, JoinTokenRow, ListChange, RevocationRow, StoreError, Target,
    TokenRefusal,
};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS join_tokens (
        token_id TEXT PRIMARY KEY,
        secret_hash BLOB NOT NULL,
        tenant TEXT NOT NULL,
        pool TEXT NOT NULL,
        description TEXT NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        max_uses INTEGER NOT NULL,
        uses INTEGER NOT NULL CHECK (uses >= 0),
        created_by TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        revoked_at_ms INTEGER
    )",
    "CREATE INDEX IF NOT EXISTS join_tokens_newest ON join_tokens (created_at_ms, token_id)",
    "CREATE TABLE IF NOT EXISTS issued (
        serial TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        tenant TEXT NOT NULL,
        pool TEXT NOT NULL,
        worker_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        not_after_ms INTEGER NOT NULL,
        issued_at_ms INTEGER NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS issued_worker ON issued (worker_id, not_after_ms)",
    "CREATE INDEX IF NOT EXISTS issued_run ON issued (run_id)",
    "CREATE INDEX IF NOT EXISTS issued_spiffe_id ON issued (spiffe_id)",
    // Every entry ever added and still referenced by the retained history;
    // `removed_sequence` is NULL while it is on the list.
    "CREATE TABLE IF NOT EXISTS revocations (
        sequence INTEGER PRIMARY KEY,
        tenant TEXT NOT NULL,
        target_kind TEXT NOT NULL CHECK (target_kind IN ('run', 'worker', 'tenant', 'serial')),
        target_value TEXT NOT NULL,
        spiffe_id TEXT NOT NULL,
        hard INTEGER NOT NULL,
        reason TEXT NOT NULL,
        revoked_by TEXT NOT NULL,
        revoked_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER,
        removed_sequence INTEGER
    )",
    "CREATE INDEX IF NOT EXISTS revocations_expiry ON revocations (expires_at_ms)
        WHERE removed_sequence IS NULL",
    "CREATE INDEX IF NOT EXISTS revocations_removed ON revocations (removed_sequence)
        WHERE removed_sequence IS NOT NULL",
    // The list's history, one row per change; its key is the list's sequence counter.
    "CREATE TABLE IF NOT EXISTS revocation_log (
        sequence INTEGER PRIMARY KEY,
        entry_sequence INTEGER NOT NULL,
        removed INTEGER NOT NULL
    )",
];

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    retained_changes: i64,
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
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&pool).await?;
        }
        Ok(Self {
            pool,
            retained_changes: retained(RETAINED_CHANGES),
        })
    }

    /// How many of the latest revocation-list changes `changes_since` can
    /// replay (default [`RETAINED_CHANGES`], at least 1).
    pub fn with_retained_changes(mut self, n: u64) -> Self {
        self.retained_changes = retained(n);
        self
    }

    /// A transaction holding the write lock from its start, so the sequence
    /// it reads stays the latest until it commits.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// A transaction whose reads all see one snapshot.
    async fn begin_read(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin().await
    }

    async fn token(&self, token_id: &str) -> Result<Option<JoinTokenRow>, StoreError> {
        sqlx::query_as::<_, RawToken>(&format!(
            "SELECT {TOKEN_COLUMNS} FROM join_tokens WHERE token_id = ?"
        ))
        .bind(token_id)
        .fetch_optional(&self.pool)
        .await?
        .map(RawToken::decode)
        .transpose()
    }
}

/// Records a change at the next sequence and forgets what is older than the
/// retained history; returns the sequence. `removes`: the entry the change
/// removes; `None` for an addition (the entry takes the change's sequence).
async fn log_change(
    tx: &mut Transaction<'static, Sqlite>,
    removes: Option<i64>,
    retained: i64,
) -> Result<i64, sqlx::Error> {
    let sequence: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(sequence), 0) + 1 FROM revocation_log")
            .fetch_one(&mut **tx)
            .await?;
    sqlx::query("INSERT INTO revocation_log (sequence, entry_sequence, removed) VALUES (?, ?, ?)")
        .bind(sequence)
        .bind(removes.unwrap_or(sequence))
        .bind(removes.is_some())
        .execute(&mut **tx)
        .await?;
    let cutoff = sequence - retained;
    if cutoff > 0 {
        sqlx::query("DELETE FROM revocation_log WHERE sequence <= ?")
            .bind(cutoff)
            .execute(&mut **tx)
            .await?;
        // An entry removed within the forgotten history was added there too:
        // no kept change refers to it.
        sqlx::query("DELETE FROM revocations WHERE removed_sequence <= ?")
            .bind(cutoff)
            .execute(&mut **tx)
            .await?;
    }
    Ok(sequence)
}

#[async_trait::async_trait]
impl IdentityStore for SqliteStore {
    async fn put_join_token(&self, t: &JoinTokenRow) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO join_tokens ({TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&t.token_id)
        .bind(t.secret_hash.as_slice())
        .bind(&t.tenant)
        .bind(&t.pool)
        .bind(&t.description)
        .bind(t.expires_at_ms)
        .bind(i64::from(t.max_uses))
        .bind(i64::from(t.uses))
        .bind(&t.created_by)
        .bind(t.created_at_ms)
        .bind(t.revoked_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_join_token(&self, token_id: &str) -> Result<Option<JoinTokenRow>, StoreError> {
        self.token(token_id).await
    }

    async fn list_join_tokens(
        &self,
        tenant: &str,
        pool: &str,
        include_inactive: bool,
        now_ms: i64,
        after_token_id: &str,
        limit: u32,
    ) -> Result<Vec<JoinTokenRow>, StoreError> {
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {TOKEN_COLUMNS} FROM join_tokens WHERE 1=1"
        ));
        if !tenant.is_empty() {
            qb.push(" AND tenant = ").push_bind(tenant);
        }
        if !pool.is_empty() {
            qb.push(" AND pool = ").push_bind(pool);
        }
        if !include_inactive {
            qb.push(" AND revoked_at_ms IS NULL AND uses < max_uses AND expires_at_ms > ")
                .push_bind(now_ms);
        }
        if !after_token_id.is_empty() {
            qb.push(
                " AND (created_at_ms, token_id) < \
                 (SELECT created_at_ms, token_id FROM join_tokens WHERE token_id = ",
            )
            .push_bind(after_token_id)
            .push(")");
        }
        qb.push(" ORDER BY created_at_ms DESC, token_id DESC LIMIT ")
            .push_bind(i64::from(limit));
        qb.build_query_as::<RawToken>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(RawToken::decode)
            .collect()
    }

    async fn revoke_join_token(
        &self,
        token_id: &str,
        now_ms: i64,
    ) -> Result<Option<JoinTokenRow>, StoreError> {
        sqlx::query_as::<_, RawToken>(&format!(
            "UPDATE join_tokens SET revoked_at_ms = COALESCE(revoked_at_ms, ?)
             WHERE token_id = ? RETURNING {TOKEN_COLUMNS}"
        ))
        .bind(now_ms)
        .bind(token_id)
        .fetch_optional(&self.pool)
        .await?
        .map(RawToken::decode)
        .transpose()
    }

    async fn use_join_token(
        &self,
        token_id: &str,
        secret_hash: &[u8; 32],
        now_ms: i64,
    ) -> Result<Result<JoinTokenRow, TokenRefusal>, StoreError> {
        match self.token(token_id).await? {
            Some(t) if hashes_equal(&t.secret_hash, secret_hash) => {}
            _ => return Ok(Err(TokenRefusal::Unknown)),
        }
        // The one statement that counts a use: its conditions and the increment
        // are applied atomically, so concurrent callers cannot overrun max_uses.
        let used = sqlx::query_as::<_, RawToken>(&format!(
            "UPDATE join_tokens SET uses = uses + 1
             WHERE token_id = ? AND secret_hash = ? AND revoked_at_ms IS NULL
               AND expires_at_ms > ? AND uses < max_uses
             RETURNING {TOKEN_COLUMNS}"
        ))
        .bind(token_id)
        .bind(secret_hash.as_slice())
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(t) = used {
            return Ok(Ok(t.decode()?));
        }
        Ok(Err(match self.token(token_id).await? {
            Some(t) => refusal(&t, now_ms),
            None => TokenRefusal::Unknown,
        }))
    }

    async fn release_join_token_use(&self, token_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE join_tokens SET uses = uses - 1 WHERE token_id = ? AND uses > 0")
            .bind(token_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn put_issued(&self, row: &IssuedRow) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO issued ({ISSUED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&row.serial)
        .bind(&row.spiffe_id)
        .bind(&row.kind)
        .bind(&row.tenant)
        .bind(&row.pool)
        .bind(&row.worker_id)
        .bind(&row.run_id)
        .bind(row.not_after_ms)
        .bind(row.issued_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn put_issued_many(&self, rows: &[IssuedRow]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for row in rows {
            sqlx::query(&format!(
                "INSERT INTO issued ({ISSUED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .bind(&row.serial)
            .bind(&row.spiffe_id)
            .bind(&row.kind)
            .bind(&row.tenant)
            .bind(&row.pool)
            .bind(&row.worker_id)
            .bind(&row.run_id)
            .bind(row.not_after_ms)
            .bind(row.issued_at_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn runs_of_worker(
        &self,
        worker_id: &str,
        now_ms: i64,
    ) -> Result<Vec<IssuedRow>, StoreError> {
        let rows = sqlx::query_as::<_, RawIssued>(&format!(
            "SELECT {ISSUED_COLUMNS} FROM issued
             WHERE worker_id = ? AND kind = 'run' AND not_after_ms > ?
             ORDER BY issued_at_ms, serial"
        ))
        .bind(worker_id)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(IssuedRow::from).collect())
    }

    async fn find_issued(&self, kind: &str, id: &str) -> Result<Option<IssuedRow>, StoreError> {
        let column = if kind == "run" { "run_id" } else { "worker_id" };
        let row = sqlx::query_as::<_, RawIssued>(&format!(
            "SELECT {ISSUED_COLUMNS} FROM issued WHERE kind = ? AND {column} = ?
             ORDER BY issued_at_ms DESC, serial DESC LIMIT 1"
        ))
        .bind(kind)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(IssuedRow::from))
    }

    async fn max_not_after(&self, spiffe_id_prefix: &str) -> Result<Option<i64>, StoreError> {
        let max =
            match prefix_end(spiffe_id_prefix) {
                Some(end) => sqlx::query_scalar(
                    "SELECT MAX(not_after_ms) FROM issued WHERE spiffe_id >= ? AND spiffe_id < ?",
                )
                .bind(spiffe_id_prefix)
                .bind(end)
                .fetch_one(&self.pool)
                .await?,
                None => {
                    sqlx::query_scalar("SELECT MAX(not_after_ms) FROM issued WHERE spiffe_id >= ?")
                        .bind(spiffe_id_prefix)
                        .fetch_one(&self.pool)
                        .await?
                }
            };
        Ok(max)
    }

    async fn run_worker(&self, run_id: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT worker_id FROM issued WHERE run_id = ? AND kind = 'run'
             ORDER BY issued_at_ms, serial LIMIT 1",
        )
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn add_revocation(&self, row: &RevocationRow) -> Result<u64, StoreError> {
        let (kind, value) = target_parts(&row.target);
        let mut tx = self.begin_write().await?;
        let sequence = log_change(&mut tx, None, self.retained_changes).await?;
        sqlx::query(&format!(
            "INSERT INTO revocations ({REVOCATION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(sequence)
        .bind(&row.tenant)
        .bind(kind)
        .bind(value)
        .bind(&row.spiffe_id)
        .bind(row.hard)
        .bind(&row.reason)
        .bind(&row.revoked_by)
        .bind(row.revoked_at_ms)
        .bind(row.expires_at_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        sequence_of(sequence)
    }

    async fn expire_revocations(&self, now_ms: i64) -> Result<Vec<ListChange>, StoreError> {
        let mut tx = self.begin_write().await?;
        let expired: Vec<i64> = sqlx::query_scalar(
            "SELECT sequence FROM revocations
             WHERE removed_sequence IS NULL AND expires_at_ms <= ? ORDER BY sequence",
        )
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        let mut changes = Vec::with_capacity(expired.len());
        for entry in expired {
            let sequence = log_change(&mut tx, Some(entry), self.retained_changes).await?;
            sqlx::query("UPDATE revocations SET removed_sequence = ? WHERE sequence = ?")
                .bind(sequence)
                .bind(entry)
                .execute(&mut *tx)
                .await?;
            changes.push(ListChange::Removed {
                sequence: sequence_of(sequence)?,
                entry_sequence: sequence_of(entry)?,
            });
        }
        tx.commit().await?;
        Ok(changes)
    }

    async fn revocations(&self) -> Result<(Vec<RevocationRow>, u64), StoreError> {
        let mut tx = self.begin_read().await?;
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(sequence), 0) FROM revocation_log")
            .fetch_one(&mut *tx)
            .await?;
        let rows = sqlx::query_as::<_, RawRevocation>(&format!(
            "SELECT {REVOCATION_COLUMNS} FROM revocations
             WHERE removed_sequence IS NULL ORDER BY sequence"
        ))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let rows = rows
            .into_iter()
            .map(RawRevocation::decode)
            .collect::<Result<_, _>>()?;
        Ok((rows, sequence_of(last)?))
    }

    async fn changes_since(&self, after: u64) -> Result<Option<Vec<ListChange>>, StoreError> {
        let Ok(after) = i64::try_from(after) else {
            return Ok(None);
        };
        let mut tx = self.begin_read().await?;
        let (first, last): (Option<i64>, Option<i64>) =
            sqlx::query_as("SELECT MIN(sequence), MAX(sequence) FROM revocation_log")
                .fetch_one(&mut *tx)
                .await?;
        if !history_covers(first, last, after) {
            return Ok(None);
        }
        let log: Vec<(i64, i64, bool)> = sqlx::query_as(
            "SELECT sequence, entry_sequence, removed FROM revocation_log
             WHERE sequence > ? ORDER BY sequence",
        )
        .bind(after)
        .fetch_all(&mut *tx)
        .await?;
        // The entries added after `after` (their sequence is that of their addition).
        let added = sqlx::query_as::<_, RawRevocation>(&format!(
            "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE sequence > ? ORDER BY sequence"
        ))
        .bind(after)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        merge_changes(log, added).map(Some)
    }
}

// Backend-neutral helpers, shared with postgres.rs (their natural home is
// mod.rs, which holds the fixed trait).

/// How many of the latest revocation-list changes are kept for resuming
/// watchers by default.
pub const RETAINED_CHANGES: u64 = 100_000;

/// A retention as the SQL arithmetic uses it (at least 1: the latest change
/// holds the counter).
pub(super) fn retained(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX).max(1)
}

pub(super) const TOKEN_COLUMNS: &str = "token_id, secret_hash, tenant, pool, description, \
     expires_at_ms, max_uses, uses, created_by, created_at_ms, revoked_at_ms";

pub(super) const ISSUED_COLUMNS: &str =
    "serial, spiffe_id, kind, tenant, pool, worker_id, run_id, not_after_ms, issued_at_ms";

pub(super) const REVOCATION_COLUMNS: &str = "sequence, tenant, target_kind, target_value, \
     spiffe_id, hard, reason, revoked_by, revoked_at_ms, expires_at_ms";

/// A join token as read, before it is checked.
#[derive(sqlx::FromRow)]
pub(super) struct RawToken {
    token_id: String,
    secret_hash: Vec<u8>,
    tenant: String,
    pool: String,
    description: String,
    expires_at_ms: i64,
    max_uses: i64,
    uses: i64,
    created_by: String,
    created_at_ms: i64,
    revoked_at_ms: Option<i64>,
}

impl RawToken {
    pub(super) fn decode(self) -> Result<JoinTokenRow, StoreError> {
        let corrupt =
            |what: &str| StoreError::Corrupt(format!("join token {}: {what}", self.token_id));
        let secret_hash = self
            .secret_hash
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("secret_hash is not 32 bytes"))?;
        let max_uses =
            u32::try_from(self.max_uses).map_err(|_| corrupt("max_uses out of range"))?;
        let uses = u32::try_from(self.uses).map_err(|_| corrupt("uses out of range"))?;
        Ok(JoinTokenRow {
            token_id: self.token_id,
            secret_hash,
            tenant: self.tenant,
            pool: self.pool,
            description: self.description,
            expires_at_ms: self.expires_at_ms,
            max_uses,
            uses,
            created_by: self.created_by,
            created_at_ms: self.created_at_ms,
            revoked_at_ms: self.revoked_at_ms,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct RawIssued {
    serial: String,
    spiffe_id: String,
    kind: String,
    tenant: String,
    pool: String,
    worker_id: String,
    run_id: String,
    not_after_ms: i64,
    issued_at_ms: i64,
}

impl From<RawIssued> for IssuedRow {
    fn from(r: RawIssued) -> Self {
        IssuedRow {
            serial: r.serial,
            spiffe_id: r.spiffe_id,
            kind: r.kind,
            tenant: r.tenant,
            pool: r.pool,
            worker_id: r.worker_id,
            run_id: r.run_id,
            not_after_ms: r.not_after_ms,
            issued_at_ms: r.issued_at_ms,
        }
    }
}

/// A revocation list entry as read, before it is checked.
#[derive(sqlx::FromRow)]
pub(super) struct RawRevocation {
    sequence: i64,
    tenant: String,
    target_kind: String,
    target_value: String,
    spiffe_id: String,
    hard: bool,
    reason: String,
    revoked_by: String,
    revoked_at_ms: i64,
    expires_at_ms: Option<i64>,
}

impl RawRevocation {
    pub(super) fn decode(self) -> Result<RevocationRow, StoreError> {
        let target = match self.target_kind.as_str() {
            "run" => Target::Run(self.target_value),
            "worker" => Target::Worker(self.target_value),
            "tenant" => Target::WholeTenant,
            "serial" => Target::Serial(self.target_value),
            other => {
                return Err(StoreError::Corrupt(format!(
                    "revocation {}: unknown target kind {other:?}",
                    self.sequence
                )));
            }
        };
        Ok(RevocationRow {
            sequence: sequence_of(self.sequence)?,
            tenant: self.tenant,
            target,
            spiffe_id: self.spiffe_id,
            hard: self.hard,
            reason: self.reason,
            revoked_by: self.revoked_by,
            revoked_at_ms: self.revoked_at_ms,
            expires_at_ms: self.expires_at_ms,
        })
    }
}

/// The `target_kind` and `target_value` columns of a target.
pub(super) fn target_parts(t: &Target) -> (&'static str, &str) {
    match t {
        Target::Run(run) => ("run", run),
        Target::Worker(worker) => ("worker", worker),
        Target::WholeTenant => ("tenant", ""),
        Target::Serial(serial) => ("serial", serial),
    }
}

pub(super) fn sequence_of(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative sequence {v}")))
}

/// Compares secret hashes in time independent of where they differ.
pub(super) fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Why the conditional UPDATE refused a token whose hash matched, in priority
/// order. A use released after the UPDATE may leave nothing to blame: the
/// token was used up when it was tried.
pub(super) fn refusal(t: &JoinTokenRow, now_ms: i64) -> TokenRefusal {
    if t.revoked_at_ms.is_some() {
        TokenRefusal::Revoked
    } else if t.expires_at_ms <= now_ms {
        TokenRefusal::Expired
    } else {
        TokenRefusal::UsedUp
    }
}

/// The end of the range of strings starting with `prefix`: they are exactly
/// those in `[prefix, end)` in byte order (SQLite's BINARY collation,
/// PostgreSQL's "C"), which an index serves. `None`: no end (an empty prefix).
pub(super) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'),
            c => char::from_u32(u32::from(c) + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Whether the kept history (`first..=last`, `None` when there has been no
/// change) holds every change after `after`. An `after` beyond the last
/// sequence comes from another store (or one restored from a backup): the
/// watcher must start again from a snapshot too.
pub(super) fn history_covers(first: Option<i64>, last: Option<i64>, after: i64) -> bool {
    match (first, last) {
        (Some(first), Some(last)) => after >= first - 1 && after <= last,
        _ => after == 0,
    }
}

/// Joins the log rows (sequence, entry sequence, removed) with the entries
/// they added.
pub(super) fn merge_changes(
    log: Vec<(i64, i64, bool)>,
    added: Vec<RawRevocation>,
) -> Result<Vec<ListChange>, StoreError> {
    let mut added = added.into_iter().peekable();
    log.into_iter()
        .map(|(sequence, entry, removed)| {
            if removed {
                return Ok(ListChange::Removed {
                    sequence: sequence_of(sequence)?,
                    entry_sequence: sequence_of(entry)?,
                });
            }
            // Both are in sequence order, and every addition has its entry.
            match added.next_if(|r| r.sequence == sequence) {
                Some(r) => Ok(ListChange::Added(r.decode()?)),
                None => Err(StoreError::Corrupt(format!(
                    "revocation {sequence}: logged as added but missing"
                ))),
            }
        })
        .collect()
}
