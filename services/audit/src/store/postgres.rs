//! The production store: PostgreSQL (synchronous_commit as the server sets
//! it; on by default, so an acknowledged append is durable).

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder, Row};

use super::{
    AuditStore, Filter, INSERT_CHUNK, Page, RawRow, StoreError, StoredEvent, attributes_json,
    head_from_parts,
};
use crate::checkpoint::TreeHead;
use crate::merkle::Hash;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS events (
        seq BIGINT PRIMARY KEY,
        time_us BIGINT NOT NULL,
        type TEXT NOT NULL,
        actor TEXT NOT NULL,
        tenant TEXT NOT NULL,
        run_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        attributes TEXT NOT NULL,
        leaf_hash BYTEA NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS events_tenant ON events (tenant, seq)",
    "CREATE INDEX IF NOT EXISTS events_run ON events (run_id, seq)",
    // A service reading back its own events of a time range (the
    // dispatcher's settling pass, sealed-vault's holdings replay).
    "CREATE INDEX IF NOT EXISTS events_actor_time ON events (actor, time_us)",
    "CREATE TABLE IF NOT EXISTS tree_heads (
        tree_size BIGINT PRIMARY KEY,
        root BYTEA NOT NULL,
        timestamp_ms BIGINT NOT NULL,
        signature BYTEA NOT NULL,
        key_id TEXT NOT NULL
    )",
];

const COLUMNS: &str = "seq, time_us, type, actor, tenant, run_id, outcome, attributes, leaf_hash";

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

fn raw(r: &sqlx::postgres::PgRow) -> Result<RawRow, sqlx::Error> {
    Ok(RawRow {
        seq: r.try_get(0)?,
        time_us: r.try_get(1)?,
        kind: r.try_get(2)?,
        actor: r.try_get(3)?,
        tenant: r.try_get(4)?,
        run_id: r.try_get(5)?,
        outcome: r.try_get(6)?,
        attributes: r.try_get(7)?,
        leaf_hash: r.try_get(8)?,
    })
}

fn decode_all(rows: Vec<sqlx::postgres::PgRow>) -> Result<Vec<StoredEvent>, StoreError> {
    rows.iter().map(|r| raw(r)?.decode()).collect()
}

impl PgStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new().max_connections(8).connect(url).await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&pool).await?;
        }
        Ok(Self { pool })
    }

    /// The pool, for tests that tamper with rows the way an attacker would.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn push_filter(qb: &mut QueryBuilder<'_, Postgres>, f: &Filter) {
    if let Some(t) = &f.tenant {
        qb.push(" AND tenant = ").push_bind(t.clone());
    }
    if let Some(p) = &f.type_prefix {
        qb.push(" AND left(type, ")
            .push_bind(i32::try_from(p.len()).unwrap_or(i32::MAX))
            .push(") = ")
            .push_bind(p.clone());
    }
    if let Some(r) = &f.run_id {
        qb.push(" AND run_id = ").push_bind(r.clone());
    }
    if let Some(a) = &f.actor {
        qb.push(" AND actor = ").push_bind(a.clone());
    }
    if let Some(s) = f.start_us {
        qb.push(" AND time_us >= ").push_bind(s);
    }
    if let Some(e) = f.end_us {
        qb.push(" AND time_us < ").push_bind(e);
    }
}

fn seq_bind(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl AuditStore for PgStore {
    async fn append(&self, events: &[StoredEvent]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for chunk in events.chunks(INSERT_CHUNK) {
            let mut qb = QueryBuilder::<Postgres>::new(format!("INSERT INTO events ({COLUMNS}) "));
            qb.push_values(chunk, |mut b, e| {
                let ev = &e.event;
                b.push_bind(seq_bind(ev.sequence))
                    .push_bind(ev.time_us)
                    .push_bind(ev.kind.clone())
                    .push_bind(ev.actor.clone())
                    .push_bind(ev.tenant.clone())
                    .push_bind(ev.run_id.clone())
                    .push_bind(ev.outcome.as_str())
                    .push_bind(attributes_json(&ev.attributes))
                    .push_bind(e.leaf_hash.to_vec());
            });
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn last_sequence(&self) -> Result<u64, StoreError> {
        let max: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(max.and_then(|m| u64::try_from(m).ok()).unwrap_or(0))
    }

    async fn range(&self, after: u64, limit: u32) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(seq_bind(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        decode_all(rows)
    }

    async fn leaf_hashes(&self, after: u64, limit: u32) -> Result<Vec<(u64, Hash)>, StoreError> {
        let rows =
            sqlx::query("SELECT seq, leaf_hash FROM events WHERE seq > $1 ORDER BY seq LIMIT $2")
                .bind(seq_bind(after))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.try_get(0)?;
                let seq = u64::try_from(seq).map_err(|_| StoreError::Corrupt(0))?;
                let h: Vec<u8> = r.try_get(1)?;
                Ok((seq, h.try_into().map_err(|_| StoreError::Corrupt(seq))?))
            })
            .collect()
    }

    async fn query(
        &self,
        filter: &Filter,
        page: Page,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut qb =
            QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM events WHERE 1=1"));
        push_filter(&mut qb, filter);
        match page {
            Page::After(a) => qb
                .push(" AND seq > ")
                .push_bind(seq_bind(a))
                .push(" ORDER BY seq ASC"),
            Page::Before(b) => qb
                .push(" AND seq < ")
                .push_bind(seq_bind(b))
                .push(" ORDER BY seq DESC"),
        };
        qb.push(" LIMIT ").push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&self.pool).await?;
        decode_all(rows)
    }

    async fn get(&self, sequence: u64) -> Result<Option<StoredEvent>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM events WHERE seq = $1"))
            .bind(seq_bind(sequence))
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| raw(&r)?.decode()).transpose()
    }

    async fn put_head(&self, h: &TreeHead) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tree_heads (tree_size, root, timestamp_ms, signature, key_id)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tree_size) DO NOTHING",
        )
        .bind(seq_bind(h.tree_size))
        .bind(h.root.to_vec())
        .bind(seq_bind(h.timestamp_ms))
        .bind(h.signature.to_vec())
        .bind(h.key_id.clone())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn heads(&self) -> Result<Vec<TreeHead>, StoreError> {
        let rows = sqlx::query(
            "SELECT tree_size, root, timestamp_ms, signature, key_id FROM tree_heads ORDER BY tree_size",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                head_from_parts(
                    r.try_get(0)?,
                    r.try_get(1)?,
                    r.try_get(2)?,
                    r.try_get(3)?,
                    r.try_get(4)?,
                )
            })
            .collect()
    }

    async fn latest_head(&self) -> Result<Option<TreeHead>, StoreError> {
        let row = sqlx::query(
            "SELECT tree_size, root, timestamp_ms, signature, key_id FROM tree_heads ORDER BY tree_size DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            head_from_parts(
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                r.try_get(3)?,
                r.try_get(4)?,
            )
        })
        .transpose()
    }

    async fn head_at(&self, tree_size: u64) -> Result<Option<TreeHead>, StoreError> {
        let row = sqlx::query(
            "SELECT tree_size, root, timestamp_ms, signature, key_id FROM tree_heads WHERE tree_size = $1",
        )
        .bind(seq_bind(tree_size))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            head_from_parts(
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                r.try_get(3)?,
                r.try_get(4)?,
            )
        })
        .transpose()
    }
}
