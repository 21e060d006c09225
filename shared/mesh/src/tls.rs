//! rustls mTLS for the mesh: one crypto provider, server configs that demand a
//! client X.509-SVID of the trust domain, client configs that pin the server's
//! SPIFFE ID. SPIFFE certificates carry URI SANs, not host names, so the server's
//! identity is checked against the SPIFFE ID the caller expects, never a DNS name.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::{self, SvidError};

/// Failures loading or assembling TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("no certificate in {0}")]
    NoCertificate(String),
    #[error("no private key in {0}")]
    NoKey(String),
    #[error("{0} is not an X.509-SVID: {1}")]
    NotSvid(String, SvidError),
    #[error("trust bundle is invalid: {0}")]
    Bundle(String),
    #[error("tls configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The one crypto provider of every Bulkhead process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs [`provider`] as the process default; call once at the top of `main`.
/// A second call is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read {
            path: what.to_owned(),
            source: e,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.to_owned()));
    }
    Ok(certs)
}

/// The trust domain's X.509 authorities.
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    authorities: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("authorities", &self.authorities.len())
            .finish()
    }
}

impl TrustBundle {
    /// Reads the CA certificate(s) from a PEM file. The trust domain is the one
    /// named by the first authority's URI SAN (`spiffe://<td>`).
    pub fn from_pem_file(path: &Path) -> Result<Self, TlsError> {
        let pem = read(path)?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    pub fn from_pem(pem: &[u8], what: &str) -> Result<Self, TlsError> {
        Self::from_der(certs_from_pem(pem, what)?)
    }

    pub fn from_der(authorities: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        let first = authorities
            .first()
            .ok_or_else(|| TlsError::Bundle("no authorities".into()))?;
        let ca_id = svid::spiffe_id_of(first)
            .map_err(|e| TlsError::Bundle(format!("authority has no SPIFFE ID: {e}")))?;
        if !ca_id.path().is_empty() {
            return Err(TlsError::Bundle(
                "authority SPIFFE ID must be the trust domain itself".into(),
            ));
        }
        Self::with_trust_domain(authorities, ca_id.trust_domain())
    }

    /// A bundle whose authorities need not carry a SPIFFE ID (an outside root
    /// above an intermediate CA of the trust domain).
    pub fn with_trust_domain(
        authorities: Vec<CertificateDer<'static>>,
        trust_domain: TrustDomain,
    ) -> Result<Self, TlsError> {
        let mut store = RootCertStore::empty();
        for a in &authorities {
            store
                .add(a.clone())
                .map_err(|e| TlsError::Bundle(e.to_string()))?;
        }
        Ok(Self {
            trust_domain,
            authorities,
            store: Arc::new(store),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    pub fn root_store(&self) -> Arc<RootCertStore> {
        self.store.clone()
    }
}

/// A process's own X.509-SVID: its chain (leaf first) and private key.
pub struct Identity {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        Self::from_pem(&cert_pem, &key_pem, &cert.display().to_string())
    }

    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], what: &str) -> Result<Self, TlsError> {
        let chain = certs_from_pem(cert_pem, what)?;
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|e| TlsError::Read {
                path: what.to_owned(),
                source: e,
            })?
            .ok_or_else(|| TlsError::NoKey(what.to_owned()))?;
        Self::from_der(chain, key, what)
    }

    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        what: &str,
    ) -> Result<Self, TlsError> {
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::NoCertificate(what.to_owned()))?;
        let id = svid::validate_leaf(leaf)
            .map_err(|e| TlsError::NotSvid(what.to_owned(), e))?
            .id;
        Ok(Self { id, chain, key })
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
}

/// Answers whether an identity, or one certificate of it (by serial,
/// big-endian bytes), has been revoked. Identity's revocation list
/// ([`crate::revocation::RevocationList`]) is the production implementation;
/// it is consulted at every handshake, every request and every JWT validation.
pub trait RevocationCheck: Send + Sync + fmt::Debug {
    fn revoked(&self, id: &SpiffeId, serial: Option<&[u8]>) -> bool;
}

/// Revokes nothing (identity itself before its list loads, and tests).
#[derive(Debug, Default)]
pub struct NoRevocations;

impl RevocationCheck for NoRevocations {
    fn revoked(&self, _id: &SpiffeId, _serial: Option<&[u8]>) -> bool {
        false
    }
}

/// Whether a server demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every caller presents an X.509-SVID of the trust domain (the mesh default).
    Required,
    /// A caller may come without a certificate (enrollment, which authenticates
    /// by join token); one that presents a certificate must present a valid SVID.
    Optional,
}

/// Verifies client X.509-SVIDs: webpki's chain, expiry and clientAuth checks,
/// then the SPIFFE leaf rules, the trust domain, and revocation.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
    revocations: Arc<dyn RevocationCheck>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_leaf(end_entity, &self.trust_domain, self.revocations.as_ref())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn check_leaf(
    end_entity: &CertificateDer<'_>,
    td: &TrustDomain,
    revocations: &dyn RevocationCheck,
) -> Result<svid::LeafSvid, rustls::Error> {
    let leaf = svid::validate_leaf(end_entity).map_err(|e| {
        tracing::debug!(error = %e, "peer certificate is not an x509-svid");
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
    })?;
    if !leaf.id.is_member_of(td) {
        tracing::debug!(peer = %leaf.id, "peer is in a foreign trust domain");
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ));
    }
    if revocations.revoked(&leaf.id, Some(&leaf.serial)) {
        tracing::info!(peer = %leaf.id, "peer certificate is revoked");
        return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
    }
    Ok(leaf)
}

/// A server config: presents `identity`, verifies clients against `bundle`.
pub fn server_config(
    identity: &Identity,
    bundle: &TrustBundle,
    client_auth: ClientAuth,
    revocations: Arc<dyn RevocationCheck>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let builder =
        WebPkiClientVerifier::builder_with_provider(bundle.root_store(), provider.clone());
    let builder = match client_auth {
        ClientAuth::Required => builder,
        ClientAuth::Optional => builder.allow_unauthenticated(),
    };
    let inner = builder
        .build()
        .map_err(|e| TlsError::Bundle(e.to_string()))?;
    let verifier = Arc::new(SpiffeClientVerifier {
        inner,
        trust_domain: bundle.trust_domain().clone(),
        revocations,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Which server identity a client accepts.
#[derive(Debug, Clone)]
pub enum ExpectServer {
    /// Exactly this SPIFFE ID (the normal case: a client knows whom it dials).
    Exact(SpiffeId),
    /// Any `spiffe://<td>/service/<name>[/<host>]` with this name (sandbox-runners
    /// carry their host in the ID).
    Service(String),
    /// Any member of the trust domain.
    AnyInTrustDomain,
}

impl ExpectServer {
    fn accepts(&self, id: &SpiffeId) -> bool {
        match self {
            ExpectServer::Exact(want) => id == want,
            ExpectServer::Service(name) => {
                matches!(id.principal(), crate::spiffe::Principal::Service { name: n } if n == name)
            }
            ExpectServer::AnyInTrustDomain => true,
        }
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: TrustDomain,
    expect: ExpectServer,
    algs: WebPkiSupportedAlgorithms,
    revocations: Arc<dyn RevocationCheck>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let leaf = check_leaf(end_entity, &self.trust_domain, self.revocations.as_ref())?;
        if !self.expect.accepts(&leaf.id) {
            tracing::warn!(server = %leaf.id, expected = ?self.expect, "server presented an unexpected spiffe id");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A client config: verifies the server against `bundle` and `expect`, and
/// presents `identity` when there is one.
pub fn client_config(
    identity: Option<&Identity>,
    bundle: &TrustBundle,
    expect: ExpectServer,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: bundle.root_store(),
        trust_domain: bundle.trust_domain().clone(),
        expect,
        algs: provider.signature_verification_algorithms,
        revocations: Arc::new(NoRevocations),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
