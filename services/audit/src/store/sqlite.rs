//! The embedded store: SQLite in WAL mode with synchronous=FULL, so an
//! acknowledged append survives a power cut.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

use super::{
    AuditStore, Filter, INSERT_CHUNK, LeafCheck, Page, RawRow, StoreError, StoredEvent,
    attributes_json, head_from_parts,
};
use crate::checkpoint::TreeHead;
use crate::merkle::Hash;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY,
        time_us INTEGER NOT NULL,
        type TEXT NOT NULL,
        actor TEXT NOT NULL,
        tenant TEXT NOT NULL,
        run_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        attributes TEXT NOT NULL,
        leaf_hash BLOB NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS events_tenant ON events (tenant, seq)",
    "CREATE INDEX IF NOT EXISTS events_run ON events (run_id, seq)",
    // A service reading back its own events of a time range (the
    // dispatcher's settling pass, sealed-vault's holdings replay).
    "CREATE INDEX IF NOT EXISTS events_actor_time ON events (actor, time_us)",
    "CREATE TABLE IF NOT EXISTS tree_heads (
        tree_size INTEGER PRIMARY KEY,
        root BLOB NOT NULL,
        timestamp_ms INTEGER NOT NULL,
        signature BLOB NOT NULL,
        key_id TEXT NOT NULL
    )",
];

const COLUMNS: &str = "seq, time_us, type, actor, tenant, run_id, outcome, attributes, leaf_hash";

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    path: std::path::PathBuf,
}

fn raw(r: &sqlx::sqlite::SqliteRow) -> Result<RawRow, sqlx::Error> {
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

fn decode_all(rows: Vec<sqlx::sqlite::SqliteRow>) -> Result<Vec<StoredEvent>, StoreError> {
    rows.iter().map(|r| raw(r)?.decode()).collect()
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
            // Checkpoints run in the background (below), not in a commit.
            .pragma("wal_autocheckpoint", "0")
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&pool).await?;
        }
        checkpoint_in_background(pool.clone());
        Ok(Self {
            pool,
            path: path.to_owned(),
        })
    }

    /// The pool, for tests that tamper with rows the way an attacker would.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Copies the WAL into the database every half second, off the commit path.
/// With SQLite's automatic checkpoint, the commit that takes the WAL past
/// 1,000 pages does it, fsync of the database included: an Append that
/// waited 100–220 ms now and then (seen in the dispatcher benchmark). A
/// PASSIVE checkpoint takes no lock a writer waits for. Ends when the pool
/// is closed.
fn checkpoint_in_background(pool: SqlitePool) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                return;
            }
            if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                tracing::debug!(%error, "wal checkpoint failed; the next one retries");
            }
        }
    });
}

fn push_filter(qb: &mut QueryBuilder<'_, Sqlite>, f: &Filter) {
    if let Some(t) = &f.tenant {
        qb.push(" AND tenant = ").push_bind(t.clone());
    }
    if let Some(p) = &f.type_prefix {
        qb.push(" AND substr(type, 1, ")
            .push_bind(p.len() as i64)
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
impl AuditStore for SqliteStore {
    async fn append(&self, events: &[StoredEvent]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for chunk in events.chunks(INSERT_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(format!("INSERT INTO events ({COLUMNS}) "));
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
            "SELECT {COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
        ))
        .bind(seq_bind(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        decode_all(rows)
    }

    async fn leaf_hashes(&self, after: u64, limit: u32) -> Result<Vec<(u64, Hash)>, StoreError> {
        let rows =
            sqlx::query("SELECT seq, leaf_hash FROM events WHERE seq > ? ORDER BY seq LIMIT ?")
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
        let mut qb = QueryBuilder::<Sqlite>::new(format!("SELECT {COLUMNS} FROM events WHERE 1=1"));
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
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM events WHERE seq = ?"))
            .bind(seq_bind(sequence))
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| raw(&r)?.decode()).transpose()
    }

    async fn put_head(&self, h: &TreeHead) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tree_heads (tree_size, root, timestamp_ms, signature, key_id)
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (tree_size) DO NOTHING",
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

    /// Verify's bulk read: plain SQLite (rusqlite, read-only, WAL snapshot)
    /// on two threads, each recomputing leaf hashes for half the window,
    /// since sqlx's per-row hand-off costs more than the hashing itself.
    async fn verify_scan(&self, after: u64, limit: u32) -> Result<Vec<LeafCheck>, StoreError> {
        let path = self.path.clone();
        let mid = after.saturating_add(u64::from(limit / 2));
        let end = after.saturating_add(u64::from(limit));
        tokio::task::spawn_blocking(move || {
            std::thread::scope(|scope| {
                let second = scope.spawn(|| scan_window(&path, mid, end));
                let mut rows = scan_window(&path, after, mid)?;
                let tail = second.join().map_err(|_| StoreError::Corrupt(mid))??;
                rows.extend(tail);
                Ok(rows)
            })
        })
        .await
        .map_err(|_| StoreError::Corrupt(after))?
    }

    async fn head_at(&self, tree_size: u64) -> Result<Option<TreeHead>, StoreError> {
        let row = sqlx::query(
            "SELECT tree_size, root, timestamp_ms, signature, key_id FROM tree_heads WHERE tree_size = ?",
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

/// Rows with after < seq <= end, leaf hashes recomputed from their fields.
fn scan_window(path: &Path, after: u64, end: u64) -> Result<Vec<LeafCheck>, StoreError> {
    use rusqlite::{Connection, OpenFlags};
    let corrupt = |seq: u64| move |_| StoreError::Corrupt(seq);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(corrupt(after))?;
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM events WHERE seq > ?1 AND seq <= ?2 ORDER BY seq"
        ))
        .map_err(corrupt(after))?;
    let mut rows = stmt
        .query(rusqlite::params![seq_bind(after), seq_bind(end)])
        .map_err(corrupt(after))?;
    let mut out = Vec::with_capacity(usize::try_from(end - after).unwrap_or(0));
    let mut leaf = String::with_capacity(512);
    // Events of one commit group share their time: format it once.
    let mut time_cache: (i64, String) = (i64::MIN, String::new());
    while let Some(r) = rows.next().map_err(corrupt(after))? {
        let seq: i64 = r.get(0).map_err(corrupt(after))?;
        let sequence = u64::try_from(seq).map_err(|_| StoreError::Corrupt(after))?;
        let text = |i: usize| r.get_ref(i).ok().and_then(|v| v.as_str().ok());
        let (
            Some(kind),
            Some(actor),
            Some(tenant),
            Some(run_id),
            Some(outcome),
            Some(attributes_json),
        ) = (text(2), text(3), text(4), text(5), text(6), text(7))
        else {
            return Err(StoreError::Corrupt(sequence));
        };
        let time_us: i64 = r.get(1).map_err(corrupt(sequence))?;
        if time_cache.0 != time_us {
            time_cache = (time_us, crate::event::format_time_us(time_us));
        }
        let stored: Hash = r
            .get_ref(8)
            .ok()
            .and_then(|v| v.as_blob().ok())
            .and_then(|b| b.try_into().ok())
            .ok_or(StoreError::Corrupt(sequence))?;
        leaf.clear();
        crate::event::write_leaf(
            &mut leaf,
            &crate::event::LeafParts {
                actor,
                attributes_json,
                outcome,
                run_id,
                sequence,
                tenant,
                time: &time_cache.1,
                kind,
            },
        );
        out.push(LeafCheck {
            sequence,
            recomputed: crate::merkle::leaf_hash(leaf.as_bytes()),
            stored,
        });
    }
    Ok(out)
}
