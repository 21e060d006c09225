//! Keys the worker makes for itself and for its runs: ECDSA P-256, with a
//! plain PKCS#10 request (no names, no extensions) that identity signs. The
//! private key stays in this process, in memory that is wiped when dropped.

use std::fmt;

use base64::Engine as _;
use bulkhead_mesh::tls::{Identity, TlsError};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

/// A fresh P-256 key pair, its CSR and its public key.
pub struct KeyAndCsr {
    /// The private key, PKCS#8 DER.
    pub key: Zeroizing<Vec<u8>>,
    /// The CSR, DER.
    pub csr_der: Vec<u8>,
    /// The SubjectPublicKeyInfo, DER, to check the certificate signed for it.
    pub spki: Vec<u8>,
}

impl fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("key", &"[redacted]")
            .field("csr_len", &self.csr_der.len())
            .finish()
    }
}

impl KeyAndCsr {
    pub fn generate() -> Result<Self, rcgen::Error> {
        // rcgen's key pair (and ring's inside it) is not wiped on drop; it is
        // dropped at the end of this function, and the copy kept is ours.
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let csr_der = params.serialize_request(&pair)?.der().to_vec();
        Ok(Self {
            key: Zeroizing::new(pair.serialize_der()),
            csr_der,
            spki: pair.subject_public_key_info(),
        })
    }
}

/// Why a certificate chain returned for a key is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("the chain is empty")]
    Empty,
    #[error("the leaf does not parse")]
    Malformed,
    #[error("the leaf is not for the key that was requested")]
    WrongKey,
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The leaf's SubjectPublicKeyInfo, DER.
pub fn leaf_spki(leaf: &[u8]) -> Result<Vec<u8>, ChainError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|_| ChainError::Malformed)?;
    Ok(cert.public_key().raw.to_vec())
}

/// The leaf's validity, seconds since the epoch: (notBefore, notAfter).
pub fn leaf_validity(leaf: &[u8]) -> Result<(i64, i64), ChainError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|_| ChainError::Malformed)?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// Checks that `chain` (leaf first) was signed for `spki`.
pub fn check_chain_for(chain: &[CertificateDer<'static>], spki: &[u8]) -> Result<(), ChainError> {
    let leaf = chain.first().ok_or(ChainError::Empty)?;
    if leaf_spki(leaf)? != spki {
        return Err(ChainError::WrongKey);
    }
    Ok(())
}

/// An [`Identity`] from a returned chain and the key it was requested for.
pub fn identity_from(
    chain: Vec<CertificateDer<'static>>,
    key: &KeyAndCsr,
    what: &str,
) -> Result<Identity, ChainError> {
    check_chain_for(&chain, &key.spki)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key.to_vec()));
    Ok(Identity::from_der(chain, key, what)?)
}

/// PEM of one DER object.
pub fn pem(label: &str, der: &[u8]) -> Zeroizing<String> {
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    let mut out = Zeroizing::new(String::with_capacity(b64.len() + b64.len() / 64 + 64));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    use x509_parser::prelude::FromDer;

    #[test]
    fn makes_a_plain_p256_csr_for_its_key() {
        let k = KeyAndCsr::generate().expect("key");
        let (rest, csr) = X509CertificationRequest::from_der(&k.csr_der).expect("csr parses");
        assert!(rest.is_empty());
        csr.verify_signature().expect("csr signature verifies");
        let spki = &csr.certification_request_info.subject_pki;
        assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        assert_eq!(curve, Some(OID_EC_P256));
        assert_eq!(spki.raw, &k.spki[..]);
        assert!(
            csr.requested_extensions()
                .is_none_or(|mut e| e.next().is_none())
        );
        // The key is PKCS#8 that rcgen reads back as the same public key.
        let again = KeyPair::try_from(&k.key[..]).expect("pkcs8");
        assert_eq!(again.subject_public_key_info(), k.spki);
        assert!(format!("{k:?}").contains("[redacted]"));
        let k2 = KeyAndCsr::generate().expect("key");
        assert_ne!(k.spki, k2.spki, "each call makes a new key");
    }

    #[test]
    fn pem_round_trips() {
        let k = KeyAndCsr::generate().expect("key");
        let p = pem("PRIVATE KEY", &k.key);
        let parsed = decode_pem(&p);
        assert_eq!(parsed, k.key.to_vec());
    }

    fn decode_pem(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("base64")
    }
}
