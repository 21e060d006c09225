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
//!
//! # Durability
//!
//! The argument above needs a holding to be *visible* before the last read,
//! not to be on disk: on SQLite, holdings commit on a connection with
//! synchronous=NORMAL, which survives a crash of the process but not a power
//! cut, and so costs no fsync of its own beside audit's. What a power cut can
//! take is a suffix of the holdings commits. Every holding is also in audit,
//! durably, before its values leave: `sealed.credential.resolved` carries the
//! run, its tenant and the `holdings` attribute ([`attribute`]). A starting
//! sealed-vault therefore replays the resolutions it recorded since a minute
//! before its newest surviving holding ([`recover`]); RevokeSecret waits for
//! that (at most 5 s, then UNAVAILABLE), so that no revocation is computed
//! from holdings a power cut shortened.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_mesh::client::MeshChannel;
use bulkhead_proto::audit::v1 as audit_pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use tokio::sync::{mpsc, oneshot, watch};

use crate::store::{Holding, SealedStore, StoreError};

/// How long a resolved run counts as holding its keys: a run SVID lives at
/// most 15 minutes.
pub const HOLD_FOR: Duration = Duration::from_secs(20 * 60);
/// How often expired holdings are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// Resolves whose holdings one transaction writes, at most.
const MAX_BATCH: usize = 256;
/// Resolves waiting for the writer, at most; more wait to be queued.
const QUEUE: usize = 4096;
/// How far before the newest surviving holding [`recover`] starts: a
/// holding carries the time its Resolve made it, which may precede its
/// commit (and so the start of a lost suffix) by its time in the queue.
const REPLAY_MARGIN: Duration = Duration::from_secs(60);
/// The audit event whose `holdings` attribute [`recover`] replays.
pub const RESOLVED: &str = "sealed.credential.resolved";
/// Attribute values audit takes, at most (bytes).
const ATTRIBUTE_MAX: usize = 1024;

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

// ---------------------------------------------------------------------------
// The holdings in audit, and their replay

/// The `holdings` attribute(s) of a resolution: `profile:KEY+KEY,profile:KEY`
/// (profile names are `[A-Za-z0-9._-]`, keys `[A-Za-z0-9_]`), cut at whole
/// profiles or keys into values of at most 1,024 bytes named `holdings`,
/// `holdings.1`, `holdings.2`, ….
pub fn attribute<'a>(held: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<(String, String)> {
    let mut by_profile: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (profile, key) in held {
        by_profile.entry(profile).or_default().push(key);
    }
    let mut values: Vec<String> = Vec::new();
    let mut current = String::new();
    for (profile, keys) in by_profile {
        let mut started = false;
        for key in keys {
            // `,profile:KEY` when a new group starts here, else `+KEY`.
            let piece_len = if started {
                1 + key.len()
            } else {
                usize::from(!current.is_empty()) + profile.len() + 1 + key.len()
            };
            if !current.is_empty() && current.len() + piece_len > ATTRIBUTE_MAX {
                values.push(std::mem::take(&mut current));
                started = false;
            }
            if started {
                current.push('+');
            } else {
                if !current.is_empty() {
                    current.push(',');
                }
                current.push_str(profile);
                current.push(':');
                started = true;
            }
            current.push_str(key);
        }
    }
    if !current.is_empty() {
        values.push(current);
    }
    numbered("holdings", values)
}

/// The values of one long attribute, named `name`, `name.1`, `name.2`, ….
pub fn numbered(name: &str, values: Vec<String>) -> Vec<(String, String)> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let key = if i == 0 {
                name.to_owned()
            } else {
                format!("{name}.{i}")
            };
            (key, v)
        })
        .collect()
}

/// The (profile, key) pairs of an event's `holdings` attribute(s).
pub fn parse_attribute(
    attributes: &std::collections::HashMap<String, String>,
) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for (name, value) in attributes {
        if name != "holdings" && !name.starts_with("holdings.") {
            continue;
        }
        for group in value.split(',') {
            let Some((profile, keys)) = group.split_once(':') else {
                continue;
            };
            for key in keys.split('+').filter(|k| !k.is_empty()) {
                pairs.push((profile.to_owned(), key.to_owned()));
            }
        }
    }
    pairs
}

/// Whether RevokeSecret may read holdings yet (see the module's
/// *Durability*). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Recovered(watch::Receiver<bool>);

impl Recovered {
    /// Holdings need no replay (a test that owns the store from empty).
    pub fn already() -> Self {
        Self(watch::channel(true).1)
    }

    /// Waits at most `patience` for the replay; whether it is done.
    pub async fn wait(&self, patience: Duration) -> bool {
        let mut rx = self.0.clone();
        matches!(
            tokio::time::timeout(patience, rx.wait_for(|done| *done)).await,
            Ok(Ok(_))
        )
    }
}

/// Where the replay reads: audit, as this sealed-vault (`actor`, its own
/// SPIFFE ID; audit lets a service read only what it appended).
#[derive(Debug, Clone)]
pub struct AuditReader {
    pub client: AuditServiceClient<MeshChannel>,
    pub actor: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("the sealed store: {0}")]
    Store(#[from] StoreError),
    #[error("audit: {0}")]
    Audit(String),
}

/// Starts the replay in the background, retrying every few seconds until it
/// is done (audit may start after sealed-vault). Needs a Tokio runtime.
pub fn recover(store: Arc<dyn SealedStore>, reader: AuditReader) -> Recovered {
    let (done, recovered) = watch::channel(false);
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(200);
        loop {
            match replay(store.as_ref(), &reader).await {
                Ok(replayed) => {
                    tracing::info!(replayed, "run holdings recovered from audit");
                    let _ = done.send(true);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot recover run holdings from audit yet; revocations wait");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    Recovered(recovered)
}

/// Re-records the holdings of every resolution this sealed-vault recorded in
/// audit since [`REPLAY_MARGIN`] before the newest surviving holding (at most
/// [`HOLD_FOR`] back); returns how many holdings it wrote.
pub async fn replay(store: &dyn SealedStore, reader: &AuditReader) -> Result<usize, RecoverError> {
    let now = now_ms();
    let hold_ms = i64::try_from(HOLD_FOR.as_millis()).unwrap_or(i64::MAX);
    let margin_ms = i64::try_from(REPLAY_MARGIN.as_millis()).unwrap_or(i64::MAX);
    let floor = now.saturating_sub(hold_ms);
    let from = store
        .latest_holding_ms()
        .await?
        .map_or(floor, |latest| latest.saturating_sub(margin_ms).max(floor));
    let mut client = reader.client.clone();
    let mut after = 0;
    let mut written = 0;
    loop {
        let page = client
            .query(audit_pb::QueryRequest {
                tenant: String::new(),
                type_prefix: RESOLVED.to_owned(),
                run_id: String::new(),
                actor: reader.actor.clone(),
                start_time: Some(prost_types::Timestamp {
                    seconds: from.div_euclid(1000),
                    nanos: i32::try_from(from.rem_euclid(1000) * 1_000_000).unwrap_or(0),
                }),
                end_time: None,
                after_sequence: after,
                limit: 1000,
            })
            .await
            .map_err(|s| RecoverError::Audit(format!("{:?}: {}", s.code(), s.message())))?
            .into_inner();
        let mut rows = Vec::new();
        for e in &page.events {
            // Only exact matches of the type: the filter is a prefix.
            if e.r#type != RESOLVED || e.run_id.is_empty() {
                continue;
            }
            let at_ms = e.time.as_ref().map_or(now, |t| {
                t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000)
            });
            let pairs = parse_attribute(&e.attributes);
            rows.extend(of_run(
                &e.tenant,
                &e.run_id,
                pairs.iter().map(|(p, k)| (p.as_str(), k.as_str())),
                at_ms,
            ));
        }
        if !rows.is_empty() {
            store.record_holdings(&rows).await?;
            written += rows.len();
        }
        if page.next_after_sequence == 0 {
            return Ok(written);
        }
        after = page.next_after_sequence;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attribute_round_trips_and_is_cut_at_audit_size() {
        let held = [("app", "KEY_A"), ("app", "KEY_B"), ("base.v2", "TOKEN")];
        let attrs = attribute(held);
        assert_eq!(
            attrs,
            [(
                "holdings".to_owned(),
                "app:KEY_A+KEY_B,base.v2:TOKEN".to_owned()
            )]
        );
        let map = attrs.into_iter().collect();
        let mut back = parse_attribute(&map);
        back.sort();
        assert_eq!(
            back,
            [("app", "KEY_A"), ("app", "KEY_B"), ("base.v2", "TOKEN")]
                .map(|(p, k)| (p.to_owned(), k.to_owned()))
        );

        let keys: Vec<String> = (0..200)
            .map(|i| format!("A_RATHER_LONG_KEY_NAME_{i:03}"))
            .collect();
        let held: Vec<(&str, &str)> = keys.iter().map(|k| ("app", k.as_str())).collect();
        let attrs = attribute(held.iter().copied());
        assert!(attrs.len() > 1, "{} values", attrs.len());
        assert!(attrs.iter().all(|(_, v)| v.len() <= ATTRIBUTE_MAX));
        let map = attrs.into_iter().collect();
        let mut back = parse_attribute(&map);
        back.sort();
        let mut want: Vec<(String, String)> = held
            .iter()
            .map(|(p, k)| ((*p).to_owned(), (*k).to_owned()))
            .collect();
        want.sort();
        assert_eq!(back, want);
    }
}
