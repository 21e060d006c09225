//! Identity's state: join tokens (hashed), issued certificates, and the
//! revocation list. One trait, SQLite (embedded default) and PostgreSQL.

use std::sync::Arc;

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
}

/// A join token as stored: the secret itself is never stored, only its
/// SHA-256 (`secret_hash`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRow {
    /// Unique id; a prefix of the secret so the secret finds its row.
    pub token_id: String,
    pub secret_hash: [u8; 32],
    /// Exactly one of tenant and pool is non-empty.
    pub tenant: String,
    pub pool: String,
    pub description: String,
    /// Milliseconds since the epoch.
    pub expires_at_ms: i64,
    pub max_uses: u32,
    pub uses: u32,
    /// SPIFFE ID of the operator who made it.
    pub created_by: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

/// Why a token cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    Expired,
    UsedUp,
    Revoked,
}

/// A certificate identity issued (for revocation by worker and for audit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedRow {
    /// Lowercase hex, no separators.
    pub serial: String,
    pub spiffe_id: String,
    /// "worker" or "run".
    pub kind: String,
    pub tenant: String,
    pub pool: String,
    /// The worker id (for a worker SVID, its own id; for a run, the worker holding it).
    pub worker_id: String,
    /// Empty for a worker SVID.
    pub run_id: String,
    pub not_after_ms: i64,
    pub issued_at_ms: i64,
}

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Run(String),
    Worker(String),
    WholeTenant,
    Serial(String),
}

/// A revocation list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRow {
    /// The list sequence at which it was added (assigned by the store, from 1,
    /// strictly increasing, shared with removals).
    pub sequence: u64,
    pub tenant: String,
    pub target: Target,
    /// The SPIFFE ID (or `spiffe://TD/tenant/<t>/` prefix) covered; empty for a serial.
    pub spiffe_id: String,
    pub hard: bool,
    pub reason: String,
    pub revoked_by: String,
    pub revoked_at_ms: i64,
    /// When everything it covers has expired; `None`: never (whole tenant).
    pub expires_at_ms: Option<i64>,
}

/// A change to the revocation list, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListChange {
    Added(RevocationRow),
    /// The entry added at this sequence left the list (everything it covered expired).
    Removed {
        sequence: u64,
        entry_sequence: u64,
    },
}

#[async_trait::async_trait]
pub trait IdentityStore: Send + Sync + std::fmt::Debug {
    async fn put_join_token(&self, t: &JoinTokenRow) -> Result<(), StoreError>;
    async fn get_join_token(&self, token_id: &str) -> Result<Option<JoinTokenRow>, StoreError>;
    /// Tokens of a tenant or pool (both empty: all), newest first, after the
    /// cursor `after_token_id` (empty: from the start); inactive (expired,
    /// used up, revoked at `now_ms`) only when asked.
    async fn list_join_tokens(
        &self,
        tenant: &str,
        pool: &str,
        include_inactive: bool,
        now_ms: i64,
        after_token_id: &str,
        limit: u32,
    ) -> Result<Vec<JoinTokenRow>, StoreError>;
    /// Marks a token revoked (idempotent: keeps the first time); `None` if unknown.
    async fn revoke_join_token(
        &self,
        token_id: &str,
        now_ms: i64,
    ) -> Result<Option<JoinTokenRow>, StoreError>;
    /// Atomically checks the token (hash, expiry, uses, revocation) and counts
    /// one use. Concurrent callers can never use a token more than max_uses times.
    async fn use_join_token(
        &self,
        token_id: &str,
        secret_hash: &[u8; 32],
        now_ms: i64,
    ) -> Result<Result<JoinTokenRow, TokenRefusal>, StoreError>;
    /// Gives back a use taken by `use_join_token` when the enrollment then failed
    /// (e.g. audit was down), so a failed enrollment does not consume the token.
    async fn release_join_token_use(&self, token_id: &str) -> Result<(), StoreError>;

    async fn put_issued(&self, row: &IssuedRow) -> Result<(), StoreError>;
    /// Records several certificates in one transaction (one commit), for the
    /// issuance writer that groups concurrent mints.
    async fn put_issued_many(&self, rows: &[IssuedRow]) -> Result<(), StoreError>;
    /// Unexpired run certificates held by a worker.
    async fn runs_of_worker(
        &self,
        worker_id: &str,
        now_ms: i64,
    ) -> Result<Vec<IssuedRow>, StoreError>;
    /// The latest expiry among certificates matching a SPIFFE ID prefix (for
    /// computing when a revocation can leave the list).
    async fn max_not_after(&self, spiffe_id_prefix: &str) -> Result<Option<i64>, StoreError>;
    /// Whether a run id was already minted (and for which worker).
    async fn run_worker(&self, run_id: &str) -> Result<Option<String>, StoreError>;
    /// The most recently issued certificate of a worker (`kind` "worker",
    /// by worker id) or a run (`kind` "run", by run id): who it is, for
    /// revocation by id.
    async fn find_issued(&self, kind: &str, id: &str) -> Result<Option<IssuedRow>, StoreError>;

    /// Adds an entry; the store assigns and returns its sequence.
    async fn add_revocation(&self, row: &RevocationRow) -> Result<u64, StoreError>;
    /// Removes entries whose expires_at_ms <= now_ms; returns the removals
    /// (each with its own new sequence).
    async fn expire_revocations(&self, now_ms: i64) -> Result<Vec<ListChange>, StoreError>;
    /// The current list and its sequence (the highest sequence assigned).
    async fn revocations(&self) -> Result<(Vec<RevocationRow>, u64), StoreError>;
    /// Changes with sequence > `after`, in order (for resuming a watch).
    /// `None` when `after` is older than the retained history (the watcher
    /// must start again from a snapshot).
    async fn changes_since(&self, after: u64) -> Result<Option<Vec<ListChange>>, StoreError>;
}

/// Opens `sqlite://PATH` (created if missing) or `postgres://...`.
pub async fn open(url: &str) -> Result<Arc<dyn IdentityStore>, StoreError> {
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
