//! Where the log lives: one trait, two backends (SQLite for the embedded
//! default, PostgreSQL for production), one conformance suite for both.
//!
//! The store is written by one writer (the log's group-commit task) with the
//! sequence numbers it assigns; the primary key on the sequence turns a second
//! writer into an error instead of a fork.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::checkpoint::TreeHead;
use crate::event::{Event, Outcome};
use crate::merkle::Hash;

pub mod postgres;
pub mod sqlite;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored row {0} is malformed")]
    Corrupt(u64),
    #[error("unsupported store url (use sqlite://PATH or postgres://...)")]
    Url,
}

/// An event with the leaf hash stored beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub event: Event,
    pub leaf_hash: Hash,
}

/// Query filters; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant: Option<String>,
    pub type_prefix: Option<String>,
    pub run_id: Option<String>,
    pub actor: Option<String>,
    /// Microseconds since the epoch, inclusive.
    pub start_us: Option<i64>,
    /// Microseconds since the epoch, exclusive.
    pub end_us: Option<i64>,
}

/// Which page of a query.
#[derive(Debug, Clone, Copy)]
pub enum Page {
    /// Oldest first, sequences greater than this.
    After(u64),
    /// Newest first, sequences smaller than this (`u64::MAX` for the newest).
    Before(u64),
}

#[async_trait::async_trait]
pub trait AuditStore: Send + Sync + std::fmt::Debug {
    /// Inserts the events (with consecutive sequences following the last) in one
    /// transaction, committed durably before it returns.
    async fn append(&self, events: &[StoredEvent]) -> Result<(), StoreError>;
    /// The highest sequence stored (0 for an empty log).
    async fn last_sequence(&self) -> Result<u64, StoreError>;
    /// Up to `limit` events with sequences greater than `after`, in order.
    async fn range(&self, after: u64, limit: u32) -> Result<Vec<StoredEvent>, StoreError>;
    /// Up to `limit` stored leaf hashes with sequences greater than `after`.
    async fn leaf_hashes(&self, after: u64, limit: u32) -> Result<Vec<(u64, Hash)>, StoreError>;
    async fn query(
        &self,
        filter: &Filter,
        page: Page,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError>;
    async fn get(&self, sequence: u64) -> Result<Option<StoredEvent>, StoreError>;
    async fn put_head(&self, head: &TreeHead) -> Result<(), StoreError>;
    /// Every signed head, smallest tree first.
    async fn heads(&self) -> Result<Vec<TreeHead>, StoreError>;
    async fn latest_head(&self) -> Result<Option<TreeHead>, StoreError>;
    async fn head_at(&self, tree_size: u64) -> Result<Option<TreeHead>, StoreError>;

    /// For Verify: up to `limit` rows after `after`, each with the leaf hash
    /// recomputed from its stored fields beside the stored one. Backends may
    /// override it with a faster read path.
    async fn verify_scan(&self, after: u64, limit: u32) -> Result<Vec<LeafCheck>, StoreError> {
        Ok(self
            .range(after, limit)
            .await?
            .into_iter()
            .map(|r| LeafCheck {
                sequence: r.event.sequence,
                recomputed: r.event.leaf_hash(),
                stored: r.leaf_hash,
            })
            .collect())
    }
}

/// One row as Verify sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafCheck {
    pub sequence: u64,
    pub recomputed: Hash,
    pub stored: Hash,
}

/// Opens `sqlite://PATH` (created if missing) or `postgres://...`.
pub async fn open(url: &str) -> Result<Arc<dyn AuditStore>, StoreError> {
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

/// Fields read from a row, before they are checked.
pub(crate) struct RawRow {
    pub seq: i64,
    pub time_us: i64,
    pub kind: String,
    pub actor: String,
    pub tenant: String,
    pub run_id: String,
    pub outcome: String,
    pub attributes: String,
    pub leaf_hash: Vec<u8>,
}

impl RawRow {
    pub(crate) fn decode(self) -> Result<StoredEvent, StoreError> {
        let seq = u64::try_from(self.seq).map_err(|_| StoreError::Corrupt(0))?;
        let attributes: BTreeMap<String, String> =
            serde_json::from_str(&self.attributes).map_err(|_| StoreError::Corrupt(seq))?;
        Ok(StoredEvent {
            event: Event {
                sequence: seq,
                time_us: self.time_us,
                kind: self.kind,
                actor: self.actor,
                tenant: self.tenant,
                run_id: self.run_id,
                outcome: Outcome::parse(&self.outcome).ok_or(StoreError::Corrupt(seq))?,
                attributes,
            },
            leaf_hash: self
                .leaf_hash
                .try_into()
                .map_err(|_| StoreError::Corrupt(seq))?,
        })
    }
}

pub(crate) fn attributes_json(a: &BTreeMap<String, String>) -> String {
    crate::event::attributes_json(a)
}

pub(crate) fn head_from_parts(
    tree_size: i64,
    root: Vec<u8>,
    timestamp_ms: i64,
    signature: Vec<u8>,
    key_id: String,
) -> Result<TreeHead, StoreError> {
    let size = u64::try_from(tree_size).map_err(|_| StoreError::Corrupt(0))?;
    Ok(TreeHead {
        tree_size: size,
        root: root.try_into().map_err(|_| StoreError::Corrupt(size))?,
        timestamp_ms: u64::try_from(timestamp_ms).map_err(|_| StoreError::Corrupt(size))?,
        signature: signature
            .try_into()
            .map_err(|_| StoreError::Corrupt(size))?,
        key_id,
    })
}

/// How many rows one multi-row INSERT carries (under SQLite's and
/// PostgreSQL's bound-parameter limits at 9 columns).
pub(crate) const INSERT_CHUNK: usize = 3000;
