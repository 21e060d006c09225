//! CSRs from workers: what identity agrees to sign. It takes only the public
//! key from a CSR — never a name, an extension or a CA flag — and refuses CSRs
//! that ask for more, so nothing a holder asks for ends up in its SVID.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::{FromDer, ParsedExtension};

/// Largest CSR accepted, in bytes.
pub const MAX_CSR_LEN: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("empty")]
    Empty,
    #[error("larger than 8 KiB")]
    TooLarge,
    #[error("not a DER PKCS#10 certificate request")]
    Malformed,
    #[error("signature does not verify")]
    BadSignature,
    #[error("only ECDSA P-256 keys are signed")]
    KeyType,
    #[error("subject alternative names are assigned by identity, not requested")]
    RequestsNames,
    #[error("a CA certificate cannot be requested")]
    RequestsCa,
}

/// Checks a CSR and returns its SubjectPublicKeyInfo (DER).
pub fn accept(der: &[u8]) -> Result<Vec<u8>, CsrError> {
    if der.is_empty() {
        return Err(CsrError::Empty);
    }
    if der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge);
    }
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|_| CsrError::Malformed)?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed);
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let curve_ok = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .is_some_and(|oid| oid == OID_EC_P256);
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || !curve_ok {
        return Err(CsrError::KeyType);
    }
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(_) => return Err(CsrError::RequestsNames),
                ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::RequestsCa),
                _ => {}
            }
        }
    }
    Ok(spki.raw.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PublicKeyData};

    fn csr(params: CertificateParams, key: &KeyPair) -> Vec<u8> {
        params.serialize_request(key).expect("csr").der().to_vec()
    }

    #[test]
    fn accepts_a_plain_p256_csr_and_refuses_the_rest() {
        let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let good = csr(CertificateParams::default(), &p256);
        let spki = accept(&good).expect("accepted");
        assert_eq!(spki, p256.subject_public_key_info());

        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        assert_eq!(
            accept(&csr(CertificateParams::default(), &p384)),
            Err(CsrError::KeyType)
        );
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        assert_eq!(
            accept(&csr(CertificateParams::default(), &ed)),
            Err(CsrError::KeyType)
        );

        let named = CertificateParams::new(vec!["evil.example".to_owned()]).expect("params");
        assert_eq!(accept(&csr(named, &p256)), Err(CsrError::RequestsNames));
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        assert_eq!(accept(&csr(ca, &p256)), Err(CsrError::RequestsCa));

        assert_eq!(accept(b"garbage"), Err(CsrError::Malformed));
        assert_eq!(accept(&[]), Err(CsrError::Empty));
        let mut flipped = good.clone();
        let n = flipped.len();
        flipped[n - 5] ^= 0x01;
        assert!(accept(&flipped).is_err(), "a tampered CSR is refused");
    }
}
