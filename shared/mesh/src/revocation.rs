//! The revocation list every service follows: identity's WatchRevocations
//! stream (first the whole list, then deltas) applied to an in-memory list that
//! the TLS handshake, the authorization layer and JWT validation consult.
//!
//! While the stream is down the list keeps its last state and says it is not
//! synced, so that checks which must fail closed (sealed-vault's Resolve) can.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bulkhead_proto::identity::v1 as pb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tokio_util::sync::CancellationToken;

use crate::client::MeshChannel;
use crate::spiffe::SpiffeId;
use crate::tls::RevocationCheck;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Matcher {
    /// An exact SPIFFE ID (a run or a worker).
    Id(String),
    /// Every ID under a prefix (`spiffe://TD/tenant/<t>/`).
    Prefix(String),
    /// One certificate, by lowercase hex serial.
    Serial(String),
}

#[derive(Debug, Default)]
struct Entries {
    by_sequence: HashMap<u64, Matcher>,
    ids: HashMap<String, usize>,
    prefixes: Vec<String>,
    serials: HashMap<String, usize>,
    hard: HashSet<u64>,
}

impl Entries {
    fn add(&mut self, seq: u64, m: Matcher, hard: bool) {
        if self.by_sequence.contains_key(&seq) {
            return;
        }
        match &m {
            Matcher::Id(id) => *self.ids.entry(id.clone()).or_default() += 1,
            Matcher::Prefix(p) => self.prefixes.push(p.clone()),
            Matcher::Serial(s) => *self.serials.entry(s.clone()).or_default() += 1,
        }
        if hard {
            self.hard.insert(seq);
        }
        self.by_sequence.insert(seq, m);
    }

    fn remove(&mut self, seq: u64) {
        let Some(m) = self.by_sequence.remove(&seq) else {
            return;
        };
        self.hard.remove(&seq);
        let dec = |map: &mut HashMap<String, usize>, k: &str| {
            if let Some(n) = map.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    map.remove(k);
                }
            }
        };
        match m {
            Matcher::Id(id) => dec(&mut self.ids, &id),
            Matcher::Prefix(p) => {
                if let Some(i) = self.prefixes.iter().position(|x| *x == p) {
                    self.prefixes.swap_remove(i);
                }
            }
            Matcher::Serial(s) => dec(&mut self.serials, &s),
        }
    }
}

/// The revocation list as last received from identity.
#[derive(Debug, Default)]
pub struct RevocationList {
    entries: RwLock<Entries>,
    sequence: AtomicU64,
    synced: AtomicBool,
}

fn matcher(r: &pb::Revocation) -> Option<Matcher> {
    use pb::revocation::Target;
    match r.target.as_ref()? {
        Target::Serial(s) => Some(Matcher::Serial(
            s.to_ascii_lowercase().trim_start_matches('0').to_owned(),
        )),
        Target::WholeTenant(true) => Some(Matcher::Prefix(r.spiffe_id.clone())),
        Target::WholeTenant(false) => None,
        Target::RunId(_) | Target::WorkerId(_) => Some(Matcher::Id(r.spiffe_id.clone())),
    }
}

impl RevocationList {
    pub fn new() -> Self {
        Self::default()
    }

    /// The sequence of the last change applied.
    pub fn sequence(&self) -> u64 {
        self.sequence.load(Ordering::Acquire)
    }

    /// Whether the list is following identity right now.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Entries> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the list with a snapshot taken at `sequence`.
    pub fn apply_snapshot(&self, sequence: u64, entries: &[pb::Revocation]) {
        let mut e = Entries::default();
        for r in entries {
            if let Some(m) = matcher(r) {
                e.add(r.sequence, m, r.hard);
            }
        }
        *self.write() = e;
        self.sequence.store(sequence, Ordering::Release);
    }

    /// Applies a delta ending at `sequence`.
    pub fn apply_delta(&self, sequence: u64, delta: &pb::RevocationDelta) {
        let mut e = self.write();
        for r in &delta.added {
            if let Some(m) = matcher(r) {
                e.add(r.sequence, m, r.hard);
            }
        }
        for seq in &delta.removed {
            e.remove(*seq);
        }
        drop(e);
        self.sequence.store(sequence, Ordering::Release);
    }

    pub fn len(&self) -> usize {
        self.entries
            .read()
            .map(|e| e.by_sequence.len())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RevocationCheck for RevocationList {
    fn revoked(&self, id: &SpiffeId, serial: Option<&[u8]>) -> bool {
        let e = self.entries.read().unwrap_or_else(|p| p.into_inner());
        if e.ids.contains_key(id.as_str()) {
            return true;
        }
        if e.prefixes
            .iter()
            .any(|p| id.as_str().starts_with(p.as_str()))
        {
            return true;
        }
        if let Some(serial) = serial
            && !e.serials.is_empty()
        {
            let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
            return e.serials.contains_key(hex.trim_start_matches('0'));
        }
        false
    }
}

/// Follows identity's WatchRevocations into `list` until `stop`, reconnecting
/// with jittered backoff and resuming from the last applied sequence.
pub async fn follow(
    list: std::sync::Arc<RevocationList>,
    identity: MeshChannel,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let mut client = IdentityServiceClient::new(identity.clone());
        let req = pb::WatchRevocationsRequest {
            from_sequence: list.sequence(),
        };
        match client.watch_revocations(req).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                backoff = Duration::from_millis(100);
                loop {
                    let msg = tokio::select! {
                        () = stop.cancelled() => return,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(m)) => {
                            match m.update {
                                Some(pb::watch_revocations_response::Update::Snapshot(s)) => {
                                    list.apply_snapshot(m.sequence, &s.revocations);
                                }
                                Some(pb::watch_revocations_response::Update::Delta(d)) => {
                                    list.apply_delta(m.sequence, &d);
                                }
                                None => {}
                            }
                            list.synced.store(true, Ordering::Release);
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::warn!(code = ?status.code(), "revocation watch ended");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), "cannot watch revocations");
            }
        }
        list.synced.store(false, Ordering::Release);
        let jitter = Duration::from_millis(u64::from(rand::random::<u16>() % 100));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Waits until `list` has applied the snapshot (or `timeout` passes).
pub async fn wait_synced(list: &RevocationList, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while !list.synced() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(seq: u64, target: pb::revocation::Target, id: &str) -> pb::Revocation {
        pb::Revocation {
            sequence: seq,
            target: Some(target),
            spiffe_id: id.into(),
            hard: true,
            ..Default::default()
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("id")
    }

    #[test]
    fn snapshot_then_deltas() {
        use pb::revocation::Target;
        let l = RevocationList::new();
        l.apply_snapshot(
            2,
            &[
                rev(
                    1,
                    Target::RunId("r1".into()),
                    "spiffe://t/tenant/acme/run/r1",
                ),
                rev(2, Target::WholeTenant(true), "spiffe://t/tenant/evil/"),
            ],
        );
        assert!(l.revoked(&id("spiffe://t/tenant/acme/run/r1"), None));
        assert!(!l.revoked(&id("spiffe://t/tenant/acme/run/r2"), None));
        assert!(l.revoked(&id("spiffe://t/tenant/evil/client/api"), None));
        assert!(
            !l.revoked(&id("spiffe://t/tenant/evildoer/client/api"), None),
            "prefix ends at '/'"
        );
        l.apply_delta(
            4,
            &pb::RevocationDelta {
                added: vec![rev(3, Target::Serial("000A1b".into()), "")],
                removed: vec![1],
            },
        );
        assert_eq!(l.sequence(), 4);
        assert!(
            !l.revoked(&id("spiffe://t/tenant/acme/run/r1"), None),
            "removed"
        );
        assert!(l.revoked(&id("spiffe://t/admin/x"), Some(&[0x0a, 0x1b])));
        assert!(!l.revoked(&id("spiffe://t/admin/x"), Some(&[0x0a, 0x1c])));
        assert_eq!(l.len(), 2);
    }
}
