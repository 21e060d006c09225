//! The log: one writer task that group-commits appends, the in-memory Merkle
//! tree over every committed leaf, the live tail, and the checkpointer that
//! signs tree heads while events arrive.
//!
//! An Append is answered only after its events are committed by the store; if
//! the store fails, every append of that group fails and nothing is added.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bulkhead_mesh::Error;
use bulkhead_mesh::spiffe::SpiffeId;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Signer, TreeHead};
use crate::event::{Event, NewEvent};
use crate::merkle::{Hash, ProofError, Tree};
use crate::store::{AuditStore, StoreError, StoredEvent};

/// Most events committed in one transaction.
const MAX_GROUP_EVENTS: usize = 8192;
/// Leaf hashes read per query when the tree is rebuilt at start.
const REBUILD_CHUNK: u32 = 50_000;

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// How often a new tree head is signed while events arrive.
    pub checkpoint_interval: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval: Duration::from_secs(1),
        }
    }
}

struct Pending {
    actor: String,
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Vec<u64>, Error>>,
}

#[derive(Debug, Default)]
struct State {
    tree: Tree,
    head: Option<TreeHead>,
}

/// A handle on the running log; cheap to clone.
#[derive(Clone)]
pub struct Log {
    store: Arc<dyn AuditStore>,
    state: Arc<RwLock<State>>,
    writer: mpsc::Sender<Pending>,
    tail: broadcast::Sender<Arc<Event>>,
    signer: Arc<Signer>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("size", &self.size()).finish()
    }
}

fn now_us() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Log {
    /// Rebuilds the tree from the store, then starts the writer and the
    /// checkpointer; both stop when `stop` is cancelled.
    pub async fn open(
        store: Arc<dyn AuditStore>,
        signer: Signer,
        config: LogConfig,
        stop: CancellationToken,
    ) -> Result<Self, StoreError> {
        let mut tree = Tree::new();
        loop {
            let chunk = store.leaf_hashes(tree.size(), REBUILD_CHUNK).await?;
            if chunk.is_empty() {
                break;
            }
            for (seq, h) in chunk {
                if seq != tree.size() + 1 {
                    // A gap: rows were deleted. Appending on top would reuse
                    // sequences; refuse to serve a log that is not whole.
                    tracing::error!(
                        expected = tree.size() + 1,
                        found = seq,
                        "audit log has a sequence gap; refusing to open it"
                    );
                    return Err(StoreError::Corrupt(tree.size() + 1));
                }
                tree.push(h);
            }
        }
        // The stored log must still produce its latest signed head; a log
        // rewritten (or cut short) while the service was down is not served,
        // and so never signed over.
        let head = store.latest_head().await?;
        if let Some(h) = &head {
            if h.tree_size > tree.size() {
                tracing::error!(
                    signed = h.tree_size,
                    stored = tree.size(),
                    "audit log is shorter than its signed head; refusing to open it"
                );
                return Err(StoreError::Corrupt(tree.size() + 1));
            }
            let root_ok = tree.root_at(h.tree_size).is_ok_and(|r| r == h.root);
            let signed_by_us = h.key_id == signer.key_id();
            if !root_ok || (signed_by_us && !h.verify(&signer.public())) {
                tracing::error!(
                    tree_size = h.tree_size,
                    "audit log no longer produces its signed head; refusing to open it"
                );
                return Err(StoreError::Corrupt(h.tree_size));
            }
            if !signed_by_us {
                tracing::warn!(key_id = %h.key_id, "the latest head was signed by another key");
            }
        }
        tracing::info!(size = tree.size(), "audit log opened");
        let state = Arc::new(RwLock::new(State { tree, head }));
        let (tx, rx) = mpsc::channel(4096);
        let (tail, _) = broadcast::channel(4096);
        let log = Self {
            store,
            state,
            writer: tx,
            tail,
            signer: Arc::new(signer),
        };
        tokio::spawn(log.clone().write_loop(rx, stop.clone()));
        tokio::spawn(
            log.clone()
                .checkpoint_loop(config.checkpoint_interval, stop),
        );
        Ok(log)
    }

    pub fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    pub fn size(&self) -> u64 {
        self.read().tree.size()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `events` as `actor`; returns their sequences once committed.
    pub async fn append(&self, actor: &SpiffeId, events: Vec<NewEvent>) -> Result<Vec<u64>, Error> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Pending {
                actor: actor.to_string(),
                events,
                reply,
            })
            .await
            .map_err(|_| Error::unavailable("audit writer", std::io::Error::other("stopped")))?;
        rx.await
            .map_err(|_| Error::unavailable("audit writer", std::io::Error::other("dropped")))?
    }

    /// Live events, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tail.subscribe()
    }

    pub fn latest_head(&self) -> Option<TreeHead> {
        self.read().head.clone()
    }

    pub fn root_at(&self, size: u64) -> Result<Hash, ProofError> {
        self.read().tree.root_at(size)
    }

    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        self.read().tree.inclusion_proof(index, size)
    }

    pub fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, ProofError> {
        self.read().tree.consistency_proof(first, second)
    }

    /// Signs a head for the current tree if it grew since the last one.
    pub async fn checkpoint(&self) -> Result<Option<TreeHead>, StoreError> {
        let (size, root, last) = {
            let s = self.read();
            (s.tree.size(), s.tree.root(), s.head.clone())
        };
        if last.as_ref().is_some_and(|h| h.tree_size >= size) {
            return Ok(None);
        }
        let now_ms = u64::try_from(now_us() / 1000).unwrap_or(0);
        let ts = last.map_or(now_ms, |h| now_ms.max(h.timestamp_ms));
        let head = self.signer.sign(size, root, ts);
        self.store.put_head(&head).await?;
        let mut s = self.write();
        if s.head.as_ref().is_none_or(|h| h.tree_size < head.tree_size) {
            s.head = Some(head.clone());
        }
        Ok(Some(head))
    }

    async fn checkpoint_loop(self, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.checkpoint().await {
                tracing::warn!(error = %e, "failed to publish a signed tree head");
            }
        }
        // A last head covering everything committed before shutdown.
        if let Err(e) = self.checkpoint().await {
            tracing::warn!(error = %e, "failed to publish the final signed tree head");
        }
    }

    async fn write_loop(self, mut rx: mpsc::Receiver<Pending>, stop: CancellationToken) {
        let mut next = self.size() + 1;
        let mut last_time = 0i64;
        loop {
            let first = tokio::select! {
                () = stop.cancelled() => break,
                p = rx.recv() => match p { Some(p) => p, None => break },
            };
            let mut n = first.events.len();
            let mut group = vec![first];
            while n < MAX_GROUP_EVENTS {
                match rx.try_recv() {
                    Ok(p) => {
                        n += p.events.len();
                        group.push(p);
                    }
                    Err(_) => break,
                }
            }
            let time_us = now_us().max(last_time);
            let mut stored = Vec::with_capacity(n);
            let mut seqs = Vec::with_capacity(group.len());
            let mut seq = next;
            for p in &group {
                let mut mine = Vec::with_capacity(p.events.len());
                for e in &p.events {
                    let event = Event {
                        sequence: seq,
                        time_us,
                        kind: e.kind.clone(),
                        actor: p.actor.clone(),
                        tenant: e.tenant.clone(),
                        run_id: e.run_id.clone(),
                        outcome: e.outcome,
                        attributes: e.attributes.clone(),
                    };
                    let leaf_hash = event.leaf_hash();
                    stored.push(StoredEvent { event, leaf_hash });
                    mine.push(seq);
                    seq += 1;
                }
                seqs.push(mine);
            }
            match self.store.append(&stored).await {
                Ok(()) => {
                    {
                        let mut s = self.write();
                        for e in &stored {
                            s.tree.push(e.leaf_hash);
                        }
                    }
                    next = seq;
                    last_time = time_us;
                    for e in stored {
                        let _ = self.tail.send(Arc::new(e.event));
                    }
                    for (p, mine) in group.into_iter().zip(seqs) {
                        let _ = p.reply.send(Ok(mine));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, events = n, "audit commit failed; refusing the group");
                    for p in group {
                        let _ = p.reply.send(Err(Error::unavailable(
                            "audit store",
                            std::io::Error::other("commit failed"),
                        )));
                    }
                    // A commit whose acknowledgement was lost may still have landed.
                    match self.store.last_sequence().await {
                        Ok(last) if last + 1 != next => {
                            tracing::error!(
                                last,
                                expected = next - 1,
                                "store moved during a failed commit; stopping the writer"
                            );
                            break;
                        }
                        _ => {}
                    }
                }
            }
        }
        tracing::info!("audit writer stopped");
    }
}
