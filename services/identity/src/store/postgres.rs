//! The production store: PostgreSQL (synchronous_commit as the server sets
//! it; on by default, so an acknowledged write is durable).
//!
//! Writers of the revocation list lock its log first (plain reads go on), so
//! sequences are assigned and committed in order. Identifiers that are sorted
//! or range-scanned use the "C" collation: byte order, as in SQLite.

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder, Transaction};

use super::sqlite::{
    ISSUED_COLUMNS, RETAINED_CHANGES, REVOCATION_COLUMNS, RawIssued, RawRevocation, RawToken,
    TOKEN_COLUMNS, hashes_equal, history_covers, merge_changes, prefix_end, refusal, retained,
    sequence_of, target_parts,
};
use super::{
    IdentityStore, IssuedRow, JoinTokenRow, ListChange, RevocationRow, StoreError, TokenRefusal,
};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS join_tokens (
        token_id TEXT COLLATE \"C\" PRIMARY KEY,
        secret_hash BYTEA NOT NULL,
        tenant TEXT NOT NULL,
        pool TEXT NOT NULL,
        description TEXT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        max_uses BIGINT NOT NULL,
        uses BIGINT NOT NULL CHECK (uses >= 0),
        created_by TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        revoked_at_ms BIGINT
    )",
    "CREATE INDEX IF NOT EXISTS join_tokens_newest ON join_tokens (created_at_ms, token_id)",
    "CREATE TABLE IF NOT EXISTS issued (
        serial TEXT PRIMARY KEY,
        spiffe_id TEXT COLLATE \"C\" NOT NULL,
        kind TEXT NOT NULL,
        tenant TEXT NOT NULL,
        pool TEXT NOT NULL,
        worker_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        not_after_ms BIGINT NOT NULL,
        issued_at_ms BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS issued_worker ON issued (worker_id, not_after_ms)",
    "CREATE INDEX IF NOT EXISTS issued_run ON issued (run_id)",
    "CREATE INDEX IF NOT EXISTS issued_spiffe_id ON issued (spiffe_id)",
    // Every entry ever added and still referenced by the retained history;
    // `removed_sequence` is NULL while it is on the list.
    "CREATE TABLE IF NOT EXISTS revocations (
        sequence BIGINT PRIMARY KEY,
        tenant TEXT NOT NULL,
        target_kind TEXT NOT NULL CHECK (target_kind IN ('run', 'worker', 'tenant', 'serial')),
        target_value TEXT NOT NULL,
        spiffe_id TEXT NOT NULL,
        hard BOOLEAN NOT NULL,
        reason TEXT NOT NULL,
        revoked_by TEXT NOT NULL,
        revoked_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT,
        removed_sequence BIGINT
    )",
    "CREATE INDEX IF NOT EXISTS revocations_expiry ON revocations (expires_at_ms)
        WHERE removed_sequence IS NULL",
    "CREATE INDEX IF NOT EXISTS revocations_removed ON revocations (removed_sequence)
        WHERE removed_sequence IS NOT NULL",
    // The list's history, one row per change; its key is the list's sequence counter.
    "CREATE TABLE IF NOT EXISTS revocation_log (
        sequence BIGINT PRIMARY KEY,
        entry_sequence BIGINT NOT NULL,
        removed BOOLEAN NOT NULL
    )",
];

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    retained_changes: i64,
}

impl PgStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new().max_connections(8).connect(url).await?;
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

    /// A transaction holding the revocation log's lock from its start, so the
    /// sequence it reads stays the latest until it commits. The lock lets
    /// plain reads through.
    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("LOCK TABLE revocation_log IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// A transaction whose reads all see one snapshot.
    async fn begin_read(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
    }

    async fn token(&self, token_id: &str) -> Result<Option<JoinTokenRow>, StoreError> {
        sqlx::query_as::<_, RawToken>(&format!(
            "SELECT {TOKEN_COLUMNS} FROM join_tokens WHERE token_id = $1"
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
    tx: &mut Transaction<'static, Postgres>,
    removes: Option<i64>,
    retained: i64,
) -> Result<i64, sqlx::Error> {
    let sequence: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(sequence), 0) + 1 FROM revocation_log")
            .fetch_one(&mut **tx)
            .await?;
    sqlx::query(
        "INSERT INTO revocation_log (sequence, entry_sequence, removed) VALUES ($1, $2, $3)",
    )
    .bind(sequence)
    .bind(removes.unwrap_or(sequence))
    .bind(removes.is_some())
    .execute(&mut **tx)
    .await?;
    let cutoff = sequence - retained;
    if cutoff > 0 {
        sqlx::query("DELETE FROM revocation_log WHERE sequence <= $1")
            .bind(cutoff)
            .execute(&mut **tx)
            .await?;
        // An entry removed within the forgotten history was added there too:
        // no kept change refers to it.
        sqlx::query("DELETE FROM revocations WHERE removed_sequence <= $1")
            .bind(cutoff)
            .execute(&mut **tx)
            .await?;
    }
    Ok(sequence)
}

#[async_trait::async_trait]
impl IdentityStore for PgStore {
    async fn put_join_token(&self, t: &JoinTokenRow) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO join_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
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
        let mut qb = QueryBuilder::<Postgres>::new(format!(
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
            "UPDATE join_tokens SET revoked_at_ms = COALESCE(revoked_at_ms, $1)
             WHERE token_id = $2 RETURNING {TOKEN_COLUMNS}"
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
             WHERE token_id = $1 AND secret_hash = $2 AND revoked_at_ms IS NULL
               AND expires_at_ms > $3 AND uses < max_uses
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
        sqlx::query("UPDATE join_tokens SET uses = uses - 1 WHERE token_id = $1 AND uses > 0")
            .bind(token_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn put_issued(&self, row: &IssuedRow) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO issued ({ISSUED_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
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
        let mut tx = self.pool.begin().await?;
        for row in rows {
            sqlx::query(&format!(
                "INSERT INTO issued ({ISSUED_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
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
             WHERE worker_id = $1 AND kind = 'run' AND not_after_ms > $2
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
            "SELECT {ISSUED_COLUMNS} FROM issued WHERE kind = $1 AND {column} = $2
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
                    "SELECT MAX(not_after_ms) FROM issued WHERE spiffe_id >= $1 AND spiffe_id < $2",
                )
                .bind(spiffe_id_prefix)
                .bind(end)
                .fetch_one(&self.pool)
                .await?,
                None => {
                    sqlx::query_scalar("SELECT MAX(not_after_ms) FROM issued WHERE spiffe_id >= $1")
                        .bind(spiffe_id_prefix)
                        .fetch_one(&self.pool)
                        .await?
                }
            };
        Ok(max)
    }

    async fn run_worker(&self, run_id: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT worker_id FROM issued WHERE run_id = $1 AND kind = 'run'
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
            "INSERT INTO revocations ({REVOCATION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
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
             WHERE removed_sequence IS NULL AND expires_at_ms <= $1 ORDER BY sequence",
        )
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        let mut changes = Vec::with_capacity(expired.len());
        for entry in expired {
            let sequence = log_change(&mut tx, Some(entry), self.retained_changes).await?;
            sqlx::query("UPDATE revocations SET removed_sequence = $1 WHERE sequence = $2")
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
             WHERE sequence > $1 ORDER BY sequence",
        )
        .bind(after)
        .fetch_all(&mut *tx)
        .await?;
        // The entries added after `after` (their sequence is that of their addition).
        let added = sqlx::query_as::<_, RawRevocation>(&format!(
            "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE sequence > $1 ORDER BY sequence"
        ))
        .bind(after)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        merge_changes(log, added).map(Some)
    }
}
