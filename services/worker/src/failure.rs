//! What a failed call means for the worker: retry, register again, or give up
//! because its identity is refused.

use std::error::Error as StdError;

use rustls::AlertDescription;
use tonic::{Code, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The worker's identity is refused: revoked, expired, unknown, or not
    /// allowed (PERMISSION_DENIED, UNAUTHENTICATED, a TLS alert about its
    /// certificate, or a server it cannot trust).
    Auth,
    /// FAILED_PRECONDITION: not registered (or evicted); register again.
    NotRegistered,
    /// INVALID_ARGUMENT: what the worker sent is refused; retrying the same
    /// thing will not help.
    Invalid,
    /// Anything else: the network, a restart, UNAVAILABLE. Retry with backoff.
    Transient,
}

pub(crate) fn classify(status: &Status) -> Failure {
    match status.code() {
        Code::PermissionDenied | Code::Unauthenticated => Failure::Auth,
        Code::FailedPrecondition => Failure::NotRegistered,
        Code::InvalidArgument => Failure::Invalid,
        _ if tls_refusal(status) => Failure::Auth,
        _ => Failure::Transient,
    }
}

pub(crate) fn classify_error(e: &(dyn StdError + 'static)) -> Failure {
    if let Some(status) = e.downcast_ref::<Status>() {
        return classify(status);
    }
    if tls_refusal(e) {
        Failure::Auth
    } else {
        Failure::Transient
    }
}

/// Whether a TLS handshake in `e`'s chain failed over a certificate: the
/// server refused ours (an alert) or we refused the server's.
pub(crate) fn tls_refusal(e: &(dyn StdError + 'static)) -> bool {
    let mut next: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(r) = err.downcast_ref::<rustls::Error>()
            && is_cert_refusal(r)
        {
            return true;
        }
        // io::Error's source() skips the error it wraps; look inside.
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                if is_cert_refusal(r) {
                    return true;
                }
            } else if is_cert_refusal_text(&inner.to_string()) {
                // On the way through the TLS stream the rustls error may be
                // kept as its message only.
                return true;
            }
        }
        next = err.source();
    }
    false
}

/// A status for a log or an error message: its code and message, and the
/// innermost cause when there is one (a TLS alert hides behind "transport
/// error").
pub(crate) fn describe(status: &Status) -> String {
    let mut innermost = None;
    let mut next = status.source();
    while let Some(err) = next {
        innermost = Some(
            match err
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                Some(inner) => inner.to_string(),
                None => err.to_string(),
            },
        );
        next = err.source();
    }
    match innermost {
        Some(cause) if !status.message().contains(&cause) => {
            format!("{:?}: {} ({cause})", status.code(), status.message())
        }
        _ => format!("{:?}: {}", status.code(), status.message()),
    }
}

/// `e` and its sources, for logs.
pub(crate) fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        out.push(format!("{err:?}"));
        next = err.source();
    }
    out.join(" <- ")
}

const CERT_ALERTS: &[AlertDescription] = &[
    AlertDescription::BadCertificate,
    AlertDescription::CertificateRevoked,
    AlertDescription::CertificateExpired,
    AlertDescription::CertificateUnknown,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::UnknownCA,
    AlertDescription::AccessDenied,
    AlertDescription::CertificateRequired,
];

/// rustls's message for a certificate alert or a refused peer certificate.
fn is_cert_refusal_text(msg: &str) -> bool {
    if let Some(alert) = msg.strip_prefix("received fatal alert: ") {
        return CERT_ALERTS.iter().any(|a| format!("{a:?}") == alert);
    }
    msg.starts_with("invalid peer certificate")
}

fn is_cert_refusal(e: &rustls::Error) -> bool {
    match e {
        rustls::Error::AlertReceived(a) => CERT_ALERTS.contains(a),
        rustls::Error::InvalidCertificate(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(
            classify(&Status::permission_denied("revoked")),
            Failure::Auth
        );
        assert_eq!(classify(&Status::unauthenticated("x")), Failure::Auth);
        assert_eq!(
            classify(&Status::failed_precondition("not registered")),
            Failure::NotRegistered
        );
        assert_eq!(
            classify(&Status::invalid_argument("labels")),
            Failure::Invalid
        );
        assert_eq!(classify(&Status::unavailable("down")), Failure::Transient);
        assert_eq!(classify(&Status::internal("")), Failure::Transient);
    }

    #[test]
    fn describes_the_innermost_cause() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: CertificateRevoked",
        );
        let mut status = Status::unknown("transport error");
        status.set_source(std::sync::Arc::new(io));
        assert_eq!(
            describe(&status),
            "Unknown: transport error (received fatal alert: CertificateRevoked)"
        );
        assert_eq!(describe(&Status::unavailable("down")), "Unavailable: down");
    }

    #[test]
    fn tls_alerts_inside_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateRevoked),
        );
        assert_eq!(classify_error(&io), Failure::Auth);
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::HandshakeFailure),
        );
        assert_eq!(classify_error(&io), Failure::Transient);
        // As it arrives through hyper: the rustls error kept as text.
        let text = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateRevoked).to_string(),
        );
        assert_eq!(classify_error(&text), Failure::Auth);
        let text = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::DecodeError).to_string(),
        );
        assert_eq!(classify_error(&text), Failure::Transient);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(classify_error(&refused), Failure::Transient);
    }
}
