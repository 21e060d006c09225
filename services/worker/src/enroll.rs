//! The worker's own identity: enrolled with a join token (EnrollWorker over
//! TLS that authenticates the server only), kept in the state dir across
//! restarts, and renewed with RenewWorkerSvid at two thirds of its life.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bulkhead_mesh::client::{self, ConnectError};
use bulkhead_mesh::spiffe::Principal;
use bulkhead_mesh::tls::{ExpectServer, Identity, TrustBundle};
use bulkhead_proto::identity::v1 as pb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, BackoffConfig};
use crate::config::WorkerConfig;
use crate::failure::{Failure, classify};
use crate::keys::{self, ChainError, KeyAndCsr};

/// The file in the state dir holding the worker's key and SVID chain (0600).
pub const STATE_FILE: &str = "worker-svid.pem";
/// One renewal attempt may take this long.
const RENEW_TIMEOUT: Duration = Duration::from_secs(30);
/// An SVID with less life than this left is not reused from the state dir.
const MIN_REMAINING: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no valid svid in the state dir and no join token to enroll with")]
    NoCredentials,
    #[error("no identity service address to enroll with")]
    NoIdentityAddress,
    #[error("identity refused the enrollment: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("identity refused to renew the worker's svid (revoked?): {code:?}: {message}")]
    RenewalRefused { code: tonic::Code, message: String },
    #[error("cannot make a key: {0}")]
    Key(#[from] rcgen::Error),
    #[error("identity returned an unusable svid: {0}")]
    Chain(#[from] ChainError),
    #[error("{id} is not a worker identity of trust domain {td}")]
    NotWorker { id: String, td: String },
    #[error("the renewed svid is {got}, not {want}")]
    IdentityChanged { got: String, want: String },
    #[error("cannot use the state dir {path}: {source}")]
    State {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("stopped before enrolling")]
    Stopped,
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> EnrollError + '_ {
    move |source| EnrollError::State {
        path: path.display().to_string(),
        source,
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// The leaf's (notBefore, notAfter), seconds since the epoch.
pub fn validity(identity: &Identity) -> Result<(i64, i64), ChainError> {
    keys::leaf_validity(identity.chain().first().ok_or(ChainError::Empty)?)
}

/// When to renew: at two thirds of the SVID's life.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before).max(0) * 2 / 3
}

/// Checks that `identity` is a worker (tenant or pool) of `bundle`'s trust domain.
pub fn check_worker(identity: &Identity, bundle: &TrustBundle) -> Result<(), EnrollError> {
    let id = identity.spiffe_id();
    let is_worker = matches!(
        id.principal(),
        Principal::TenantWorker { .. } | Principal::PoolWorker { .. }
    );
    if !is_worker || !id.is_member_of(bundle.trust_domain()) {
        return Err(EnrollError::NotWorker {
            id: id.to_string(),
            td: bundle.trust_domain().to_string(),
        });
    }
    Ok(())
}

/// The worker's identity: the one in the state dir while it is valid, else a
/// new one enrolled with the join token (kept in the state dir). Transient
/// failures to reach identity are retried until `shutdown`.
pub async fn obtain(
    config: &WorkerConfig,
    shutdown: &CancellationToken,
) -> Result<Identity, EnrollError> {
    if let Some(dir) = &config.state_dir {
        match load_state(dir, &config.bundle) {
            Ok(Some(identity)) => {
                tracing::info!(id = %identity.spiffe_id(), "reusing the svid in the state dir");
                return Ok(identity);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "the state dir holds no usable svid"),
        }
    }
    let token = config
        .join_token
        .as_ref()
        .ok_or(EnrollError::NoCredentials)?;
    let addr = config
        .identity
        .as_deref()
        .ok_or(EnrollError::NoIdentityAddress)?;
    // The caller has no certificate yet: TLS authenticates the server only.
    let ch = client::channel(
        addr,
        None,
        &config.bundle,
        ExpectServer::Service("identity".into()),
    )?;
    let mut client = IdentityServiceClient::new(ch);
    let mut backoff = Backoff::new(BackoffConfig {
        max: Duration::from_secs(30),
        ..config.reconnect
    });
    loop {
        let key = KeyAndCsr::generate()?;
        let call = client.enroll_worker(pb::EnrollWorkerRequest {
            join_token: token.expose().to_owned(),
            csr_der: key.csr_der.clone().into(),
            worker_name: config.name.clone(),
        });
        let resp = tokio::select! {
            r = call => r,
            () = shutdown.cancelled() => return Err(EnrollError::Stopped),
        };
        match resp {
            Ok(resp) => {
                let resp = resp.into_inner();
                let svid = resp.svid.unwrap_or_default();
                let identity = identity_of(&svid, &key)?;
                check_worker(&identity, &config.bundle)?;
                tracing::info!(
                    id = %identity.spiffe_id(),
                    worker_id = %resp.worker_id,
                    expires_at = svid.expires_at.map(|t| t.seconds).unwrap_or_default(),
                    "enrolled"
                );
                if let Some(dir) = &config.state_dir {
                    save_state(dir, &identity, &key)?;
                }
                return Ok(identity);
            }
            Err(status) => match classify(&status) {
                Failure::Transient => {
                    let delay = backoff.next_delay();
                    tracing::warn!(code = ?status.code(), error = %status.message(), ?delay, "cannot enroll yet; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => return Err(EnrollError::Stopped),
                    }
                }
                _ => {
                    return Err(EnrollError::Refused {
                        code: status.code(),
                        message: status.message().to_owned(),
                    });
                }
            },
        }
    }
}

fn identity_of(svid: &pb::X509Svid, key: &KeyAndCsr) -> Result<Identity, EnrollError> {
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain_der
        .iter()
        .map(|c| CertificateDer::from(c.to_vec()))
        .collect();
    Ok(keys::identity_from(chain, key, &svid.spiffe_id)?)
}

/// The SVID in `dir`, if there is one that is a worker of the trust domain,
/// chains to the bundle's authorities and has a minute of life left.
pub fn load_state(dir: &Path, bundle: &TrustBundle) -> Result<Option<Identity>, EnrollError> {
    let path = dir.join(STATE_FILE);
    let pem = match std::fs::read(&path) {
        Ok(p) => zeroize::Zeroizing::new(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_err(&path)(e)),
    };
    let identity = Identity::from_pem(&pem, &pem, &path.display().to_string())
        .map_err(|e| state_err(&path)(std::io::Error::other(e.to_string())))?;
    check_worker(&identity, bundle)?;
    let (_, not_after) = validity(&identity)?;
    let left = not_after - now_secs();
    if left < i64::try_from(MIN_REMAINING.as_secs()).unwrap_or(60) {
        tracing::info!(id = %identity.spiffe_id(), "the svid in the state dir has expired");
        return Ok(None);
    }
    if !chains_to(&identity, bundle) {
        tracing::warn!(id = %identity.spiffe_id(), "the svid in the state dir is not signed by the ca");
        return Ok(None);
    }
    Ok(Some(identity))
}

fn chains_to(identity: &Identity, bundle: &TrustBundle) -> bool {
    use rustls::pki_types::UnixTime;
    let Some(leaf) = identity.chain().first() else {
        return false;
    };
    let Ok(cert) = webpki_leaf(leaf) else {
        return false;
    };
    let provider = bulkhead_mesh::tls::provider();
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &cert,
        &bundle.root_store(),
        &identity.chain()[1..],
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .is_ok()
}

fn webpki_leaf<'a>(
    leaf: &'a CertificateDer<'a>,
) -> Result<rustls::server::ParsedCertificate<'a>, rustls::Error> {
    rustls::server::ParsedCertificate::try_from(leaf)
}

/// Writes the key and chain to `dir` atomically (a reader sees the old pair or
/// the new one), the file created 0600 and the dir 0700.
pub fn save_state(dir: &Path, identity: &Identity, key: &KeyAndCsr) -> Result<(), EnrollError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(state_err(dir))?;
    let mut pem = keys::pem("PRIVATE KEY", &key.key);
    for cert in identity.chain() {
        pem.push_str(&keys::pem("CERTIFICATE", cert));
    }
    let path = dir.join(STATE_FILE);
    let tmp: PathBuf = dir.join(format!("{STATE_FILE}.tmp"));
    bulkhead_mesh::pki::write_private(&tmp, &pem)
        .map_err(|e| state_err(&tmp)(std::io::Error::other(e.to_string())))?;
    std::fs::rename(&tmp, &path).map_err(state_err(&path))?;
    Ok(())
}

/// Renews the worker's SVID at two thirds of its life, forever: publishes each
/// new identity on `current` (new connections use it) and keeps it in the
/// state dir. Returns an error only when identity refuses the worker
/// repeatedly (revoked), or the SVID expired without a renewal.
pub(crate) async fn renew_forever(
    config: &WorkerConfig,
    current: watch::Sender<Identity>,
    shutdown: CancellationToken,
) -> Result<(), EnrollError> {
    let Some(addr) = config.identity.clone() else {
        let expiry = validity(&current.borrow()).map(|v| v.1).unwrap_or_default();
        tracing::warn!(
            expires_at = expiry,
            "no identity address: the worker svid is not renewed"
        );
        return Ok(());
    };
    let mut backoff = Backoff::new(BackoffConfig {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(60),
        ..config.reconnect
    });
    let mut refusals = 0u32;
    loop {
        let (not_before, not_after) = validity(&current.borrow())?;
        let wait = u64::try_from(renew_at(not_before, not_after) - now_secs()).unwrap_or(0);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(wait)) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        let identity = current.borrow().clone();
        let attempt = tokio::time::timeout(RENEW_TIMEOUT, renew_once(&addr, config, &identity));
        let result = tokio::select! {
            r = attempt => r.unwrap_or_else(|_| Err(RenewError::Other("timed out".into()))),
            () = shutdown.cancelled() => return Ok(()),
        };
        match result {
            Ok((renewed, key)) => {
                if renewed.spiffe_id() != identity.spiffe_id() {
                    return Err(EnrollError::IdentityChanged {
                        got: renewed.spiffe_id().to_string(),
                        want: identity.spiffe_id().to_string(),
                    });
                }
                if let Some(dir) = &config.state_dir {
                    save_state(dir, &renewed, &key)?;
                }
                let expires = validity(&renewed).map(|v| v.1).unwrap_or_default();
                tracing::info!(id = %renewed.spiffe_id(), expires_at = expires, "worker svid renewed");
                current.send_replace(renewed);
                backoff.reset();
                refusals = 0;
            }
            Err(RenewError::Refused(status)) => {
                refusals += 1;
                tracing::warn!(code = ?status.code(), error = %status.message(), refusals, "svid renewal refused");
                let expired = now_secs() >= not_after;
                if refusals >= config.auth_failure_limit.max(1) || expired {
                    return Err(EnrollError::RenewalRefused {
                        code: status.code(),
                        message: status.message().to_owned(),
                    });
                }
                sleep_or_stop(backoff.next_delay(), &shutdown).await;
            }
            Err(RenewError::Other(e)) => {
                if now_secs() >= not_after {
                    tracing::error!(error = %e, "the worker svid expired before it could be renewed");
                }
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "svid renewal failed; retrying");
                sleep_or_stop(delay, &shutdown).await;
            }
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
    }
}

async fn sleep_or_stop(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = shutdown.cancelled() => {}
    }
}

#[derive(Debug)]
enum RenewError {
    Refused(tonic::Status),
    Other(String),
}

async fn renew_once(
    addr: &str,
    config: &WorkerConfig,
    identity: &Identity,
) -> Result<(Identity, KeyAndCsr), RenewError> {
    let ch = client::connect(
        addr,
        Some(identity),
        &config.bundle,
        ExpectServer::Service("identity".into()),
    )
    .await
    .map_err(|e| match crate::failure::classify_error(&e) {
        Failure::Auth => RenewError::Refused(tonic::Status::unauthenticated(e.to_string())),
        _ => RenewError::Other(e.to_string()),
    })?;
    let key = KeyAndCsr::generate().map_err(|e| RenewError::Other(e.to_string()))?;
    let resp = IdentityServiceClient::new(ch)
        .renew_worker_svid(pb::RenewWorkerSvidRequest {
            csr_der: key.csr_der.clone().into(),
        })
        .await
        .map_err(|status| match classify(&status) {
            Failure::Auth => RenewError::Refused(status),
            _ => RenewError::Other(format!("{:?}: {}", status.code(), status.message())),
        })?;
    let svid = resp.into_inner().svid.unwrap_or_default();
    let renewed = identity_of(&svid, &key).map_err(|e| RenewError::Other(e.to_string()))?;
    Ok((renewed, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds() {
        assert_eq!(renew_at(0, 300), 200);
        assert_eq!(renew_at(1000, 1000 + 86_400), 1000 + 57_600);
        assert_eq!(renew_at(10, 5), 10);
    }
}
