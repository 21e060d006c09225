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

/// A client of the audit service.
#[derive(Debug, Clone)]
pub struct AuditClient {
    client: AuditServiceClient<MeshChannel>,
}

impl AuditClient {
    pub fn new(channel: MeshChannel) -> Self {
        Self {
            client: AuditServiceClient::new(channel),
        }
    }

    /// Records `events` durably; their sequences on success.
    pub async fn record(&self, events: Vec<pb::NewEvent>) -> Result<Vec<u64>, Error> {
        let mut client = self.client.clone();
        let call = client.append(pb::AppendRequest { events });
        match tokio::time::timeout(APPEND_TIMEOUT, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner().sequences),
            Ok(Err(status)) => Err(Error::unavailable(
                "audit",
                std::io::Error::other(format!("{:?}: {}", status.code(), status.message())),
            )),
            Err(_) => Err(Error::unavailable(
                "audit",
                std::io::Error::other("append timed out"),
            )),
        }
    }

    /// Records one event.
    pub async fn record_one(&self, event: pb::NewEvent) -> Result<u64, Error> {
        let seqs = self.record(vec![event]).await?;
        seqs.first()
            .copied()
            .ok_or_else(|| Error::unavailable("audit", std::io::Error::other("no sequence")))
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
