//! Follows identity's WatchRevocations stream (first the whole list, then
//! deltas): into the revocation list that the mesh server and JWT checks
//! consult, and into the runner, which kills the sandboxes a hard revocation
//! covers. One stream serves both, so a kill never lags the list.
//!
//! This is `bulkhead_mesh::revocation::follow` with one more consumer; the
//! mesh's follower has no hook for the entries it applies.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bulkhead_mesh::client::MeshChannel;
use bulkhead_mesh::revocation::RevocationList;
use bulkhead_proto::identity::v1 as pb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tokio_util::sync::CancellationToken;

use crate::runner::Runner;

/// Follows until `stop`, reconnecting with jittered backoff and resuming from
/// the last applied sequence. `synced` is set while the stream is current.
pub async fn follow(
    list: Arc<RevocationList>,
    synced: Arc<AtomicBool>,
    identity: MeshChannel,
    runner: Runner,
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
                                    runner.on_revocations(&s.revocations);
                                }
                                Some(pb::watch_revocations_response::Update::Delta(d)) => {
                                    list.apply_delta(m.sequence, &d);
                                    runner.on_revocations(&d.added);
                                }
                                None => {}
                            }
                            synced.store(true, Ordering::Release);
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
        synced.store(false, Ordering::Release);
        let jitter = Duration::from_millis(u64::from(rand::random::<u16>() % 100));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
