//! The X.509-SVID rules of the SPIFFE specification, checked on a certificate
//! that has already been chain-verified by rustls/webpki.
//!
//! A leaf SVID carries exactly one URI SAN (its SPIFFE ID, with a path), is not a
//! CA, and has a critical key usage with digitalSignature and without
//! keyCertSign or cRLSign.

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Why a certificate is not a leaf X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate does not parse")]
    Malformed,
    #[error("certificate has no URI SAN")]
    NoUriSan,
    #[error("certificate has more than one URI SAN")]
    MultipleUriSans,
    #[error("URI SAN is not a SPIFFE ID: {0}")]
    BadSpiffeId(SpiffeIdError),
    #[error("leaf SPIFFE ID has no path")]
    RootIdOnLeaf,
    #[error("leaf certificate is a CA (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("leaf certificate has no key usage extension")]
    NoKeyUsage,
    #[error("key usage extension is not critical")]
    KeyUsageNotCritical,
    #[error("leaf key usage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("leaf key usage has keyCertSign or cRLSign")]
    LeafCanSign,
    #[error("SPIFFE ID {id} is not in trust domain {expected}")]
    ForeignTrustDomain { id: String, expected: String },
}

/// What a verified leaf SVID says.
#[derive(Debug, Clone)]
pub struct LeafSvid {
    pub id: SpiffeId,
    /// The certificate's serial number, big-endian, as revocation lists name it.
    pub serial: Vec<u8>,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
}

/// The SPIFFE ID of any certificate with exactly one URI SAN (leaf or CA).
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| SvidError::Malformed)?;
    uri_san(&cert)
}

fn uri_san(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| SvidError::Malformed)?
        .ok_or(SvidError::NoUriSan)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or(SvidError::NoUriSan)?;
    if uris.next().is_some() {
        return Err(SvidError::MultipleUriSans);
    }
    SpiffeId::parse(uri).map_err(SvidError::BadSpiffeId)
}

/// Checks the leaf rules of the X.509-SVID spec and returns what the leaf says.
pub fn validate_leaf(der: &[u8]) -> Result<LeafSvid, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| SvidError::Malformed)?;
    let id = uri_san(&cert)?;
    if id.path().is_empty() {
        return Err(SvidError::RootIdOnLeaf);
    }
    if let Some(bc) = cert.basic_constraints().map_err(|_| SvidError::Malformed)?
        && bc.value.ca
    {
        return Err(SvidError::LeafIsCa);
    }
    let ku = cert
        .key_usage()
        .map_err(|_| SvidError::Malformed)?
        .ok_or(SvidError::NoKeyUsage)?;
    if !ku.critical {
        return Err(SvidError::KeyUsageNotCritical);
    }
    if !ku.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(SvidError::LeafCanSign);
    }
    Ok(LeafSvid {
        id,
        serial: cert.raw_serial().to_vec(),
        not_after: cert.validity().not_after.timestamp(),
    })
}
