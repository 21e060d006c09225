//! How services record security events: through the audit service, before the
//! action takes effect. If audit cannot durably record an event, `record`
//! fails with UNAVAILABLE and the caller must not perform the action.

use std::collections::BTreeMap;
use std::time::Duration;

use bulkhead_proto::audit::v1 as pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::client::MeshChannel;
use crate::error::Error;

/// How long an append may take before the action is refused.
const APPEND_TIMEOUT: Duration = Duration::from_secs(5);

pub use pb::Outcome;

/// Most events one Append carries when concurrent `record_one` calls are
/// coalesced.
const MAX_BATCH: usize = 512;
/// Appends in flight at once from one client; further events queue and are
/// sent together when one returns.
const MAX_IN_FLIGHT: usize = 4;

type Waiter = tokio::sync::oneshot::Sender<Result<u64, Error>>;

/// A client of the audit service. Clones share one connection and one
/// batcher: concurrent `record_one` calls are coalesced into one Append (up to
/// `MAX_BATCH` events, at most `MAX_IN_FLIGHT` Appends in flight), and each
/// caller learns its own sequence once the whole Append is durable. An idle
/// client sends an event at once; a busy one sends what queued meanwhile.
#[derive(Debug, Clone)]
pub struct AuditClient {
    client: AuditServiceClient<MeshChannel>,
    batcher: std::sync::Arc<std::sync::OnceLock<tokio::sync::mpsc::Sender<(pb::NewEvent, Waiter)>>>,
}

impl AuditClient {
    pub fn new(channel: MeshChannel) -> Self {
        Self {
            client: AuditServiceClient::new(channel),
            batcher: std::sync::Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// Records `events` durably, in one Append; their sequences on success.
    pub async fn record(&self, events: Vec<pb::NewEvent>) -> Result<Vec<u64>, Error> {
        append(self.client.clone(), events)
            .await
            .map_err(unavailable)
    }

    /// Records one event, durably, possibly in one Append with other callers'
    /// events; its sequence on success.
    pub async fn record_one(&self, event: pb::NewEvent) -> Result<u64, Error> {
        let batcher = self.batcher.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(4 * MAX_BATCH);
            tokio::spawn(batch_loop(self.client.clone(), rx));
            tx
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        batcher
            .send((event, tx))
            .await
            .map_err(|_| unavailable(tonic::Status::unavailable("the audit batcher stopped")))?;
        rx.await.map_err(|_| {
            unavailable(tonic::Status::unavailable(
                "the audit batcher dropped an event",
            ))
        })?
    }
}

impl AuditClient {
    /// One page of audit's Query. A service may read only the events it
    /// appended itself: `actor` must be its own SPIFFE ID.
    pub async fn query(&self, request: pb::QueryRequest) -> Result<pb::QueryResponse, Error> {
        let mut client = self.client.clone();
        let call = client.query(request);
        match tokio::time::timeout(APPEND_TIMEOUT, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(unavailable(status)),
            Err(_) => Err(unavailable(tonic::Status::deadline_exceeded(
                "query timed out",
            ))),
        }
    }
}

async fn append(
    mut client: AuditServiceClient<MeshChannel>,
    events: Vec<pb::NewEvent>,
) -> Result<Vec<u64>, tonic::Status> {
    let call = client.append(pb::AppendRequest { events });
    match tokio::time::timeout(APPEND_TIMEOUT, call).await {
        Ok(Ok(resp)) => Ok(resp.into_inner().sequences),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(tonic::Status::deadline_exceeded("append timed out")),
    }
}

fn unavailable(status: tonic::Status) -> Error {
    Error::unavailable(
        "audit",
        std::io::Error::other(format!("{:?}: {}", status.code(), status.message())),
    )
}

/// Takes what queued, sends it as one Append, and answers each waiter.
async fn batch_loop(
    client: AuditServiceClient<MeshChannel>,
    mut rx: tokio::sync::mpsc::Receiver<(pb::NewEvent, Waiter)>,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        // Whatever queued while we waited for a slot goes in the same Append.
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let client = client.clone();
        tokio::spawn(async move {
            let (events, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let n = events.len();
            match append(client.clone(), events.clone()).await {
                Ok(seqs) if seqs.len() == n => {
                    for (w, seq) in waiters.into_iter().zip(seqs) {
                        let _ = w.send(Ok(seq));
                    }
                }
                // One bad event (say, a type this service may not write) must
                // not fail the others: each is tried alone.
                Err(status)
                    if n > 1
                        && matches!(
                            status.code(),
                            tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
                        ) =>
                {
                    for (event, w) in events.into_iter().zip(waiters) {
                        let one = append(client.clone(), vec![event]).await;
                        let _ = w.send(match one {
                            Ok(seqs) => seqs
                                .first()
                                .copied()
                                .ok_or_else(|| unavailable(tonic::Status::internal("no sequence"))),
                            Err(status) => Err(unavailable(status)),
                        });
                    }
                }
                Ok(_) => {
                    for w in waiters {
                        let _ = w.send(Err(unavailable(tonic::Status::internal(
                            "the append answered the wrong number of sequences",
                        ))));
                    }
                }
                Err(status) => {
                    for w in waiters {
                        let _ = w.send(Err(unavailable(status.clone())));
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Builds an event. Attributes hold names, ids and fingerprints — never values.
pub fn event(
    kind: &str,
    tenant: &str,
    run_id: &str,
    outcome: Outcome,
    attributes: impl IntoIterator<Item = (&'static str, String)>,
) -> pb::NewEvent {
    pb::NewEvent {
        r#type: kind.to_owned(),
        tenant: tenant.to_owned(),
        run_id: run_id.to_owned(),
        outcome: outcome as i32,
        attributes: attributes
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect(),
    }
}

/// The HMAC-SHA256 fingerprint of a secret value under the deployment's
/// fingerprint key, hex: lets audit records correlate values without holding
/// them.
pub fn fingerprint(key: &[u8], value: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("hmac takes any key length");
    mac.update(value);
    hex::encode(mac.finalize().into_bytes())
}
