//! Which runs hold which secrets: what a hard revocation's affected runs (the
//! runs revoked at identity, and so killed) are computed from. Kept in the
//! sealed store, so that a restart forgets none and replicas on one
//! PostgreSQL share them.
//!
//! # Why a run that gets values is always found
//!
//! Resolve records a run's holdings and waits for their commit, and only then
//! reads the revocations in force a last time, refusing if one covers a key
//! it is about to return. RevokeSecret writes its revocation and reads the
//! holdings in one store transaction inside which no holding can commit
//! ([`SealedStore::revoke`]: SQLite's write lock; PostgreSQL's SHARE lock on
//! the holdings table).
//!
//! Let H be the commit of a Resolve's holding, R the start of its last
//! revocation read (R > H), and [L, C] the revocation's transaction, from its
//! lock to its commit. H is not inside [L, C]. If H < L, the transaction's
//! holdings read, made after L, sees the holding: the run is listed. If
//! H > C, then R > H > C, and the last read sees the revocation: the Resolve
//! is refused. So every run that gets values of a revoked key is listed.
//! (Checking first and remembering the run after the values were sent, against
//! reading the runs first and writing the revocation after, let both miss.)
//!
//! A holding may outlive a Resolve that then failed: the run is listed
//! although it got nothing. That errs the safe way: at worst a run that
//! asked for a revoked key is killed.
//!
//! Holdings go through one group writer: Resolves that arrive while a batch
//! commits go together in the next, so a burst costs a commit per batch,
//! not one per Resolve; a Resolve waits for the commit in flight, if any, and
//! then its own.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::store::{Holding, SealedStore};

/// How long a resolved run counts as holding its keys: a run SVID lives at
/// most 15 minutes.
pub const HOLD_FOR: Duration = Duration::from_secs(20 * 60);
/// How often expired holdings are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// Resolves whose holdings one transaction writes, at most.
const MAX_BATCH: usize = 256;
/// Resolves waiting for the writer, at most; more wait to be queued.
const QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// The store refused the batch; the writer logged why.
    #[error("the run's holdings could not be recorded")]
    Store,
    #[error("the holdings writer has stopped")]
    Stopped,
}

#[derive(Debug)]
struct Pending {
    holdings: Vec<Holding>,
    done: oneshot::Sender<Result<(), ()>>,
}

/// The group writer's handle (cheap to clone). Its task ends when the last
/// handle is dropped.
#[derive(Debug, Clone)]
pub struct HoldingsWriter {
    queue: mpsc::Sender<Pending>,
}

impl HoldingsWriter {
    /// Starts the writer, which also prunes expired holdings every 30 s.
    /// Needs a Tokio runtime.
    pub fn start(store: Arc<dyn SealedStore>) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(store, rx));
        Self { queue }
    }

    /// Records holdings; returns once they are committed.
    pub async fn record(&self, holdings: Vec<Holding>) -> Result<(), HoldError> {
        if holdings.is_empty() {
            return Ok(());
        }
        let (done, committed) = oneshot::channel();
        self.queue
            .send(Pending { holdings, done })
            .await
            .map_err(|_| HoldError::Stopped)?;
        match committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(())) => Err(HoldError::Store),
            Err(_) => Err(HoldError::Stopped),
        }
    }
}

/// The holdings of one run, each key of each profile it is about to receive.
pub fn of_run<'a>(
    tenant: &str,
    run_id: &str,
    keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    now_ms: i64,
) -> Vec<Holding> {
    let hold_ms = i64::try_from(HOLD_FOR.as_millis()).unwrap_or(i64::MAX);
    keys.into_iter()
        .map(|(profile, key)| Holding {
            tenant: tenant.to_owned(),
            profile: profile.to_owned(),
            key: key.to_owned(),
            run_id: run_id.to_owned(),
            resolved_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(hold_ms),
        })
        .collect()
}

async fn write_batches(store: Arc<dyn SealedStore>, mut rx: mpsc::Receiver<Pending>) {
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            next = rx.recv() => {
                let Some(first) = next else { return };
                let mut rows = first.holdings;
                let mut waiting = vec![first.done];
                while waiting.len() < MAX_BATCH {
                    let Ok(more) = rx.try_recv() else { break };
                    rows.extend(more.holdings);
                    waiting.push(more.done);
                }
                let result = store.record_holdings(&rows).await;
                if let Err(error) = &result {
                    tracing::error!(%error, rows = rows.len(), "could not record run holdings");
                }
                for done in waiting {
                    // A Resolve that gave up meanwhile no longer listens.
                    let _ = done.send(result.as_ref().map(|_| ()).map_err(|_| ()));
                }
            }
            _ = prune.tick() => {
                match store.prune_holdings(now_ms()).await {
                    Ok(0) => {}
                    Ok(pruned) => tracing::debug!(pruned, "pruned expired run holdings"),
                    Err(error) => tracing::warn!(%error, "could not prune expired run holdings"),
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
