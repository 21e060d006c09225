//! The trust domain's CA and X.509-SVID issuance (rcgen), behind `bulkhead pki`
//! and, later, the identity service.
//!
//! Every SVID follows the SPIFFE X.509-SVID spec: exactly one URI SAN, key usage
//! critical with digitalSignature only, extended key usage serverAuth and
//! clientAuth, basicConstraints cA=false. The CA has cA=true, keyCertSign and
//! cRLSign, and the path-less ID `spiffe://<td>`. Keys are ECDSA P-256.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use crate::spiffe::{SpiffeId, TrustDomain};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{id} is not in trust domain {td}")]
    ForeignId { id: String, td: String },
    #[error("ca certificate is not a SPIFFE trust domain CA")]
    NotCa,
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// How long the CA made by `pki init` lives.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// Default lifetime of a service or operator SVID made by `pki`.
pub const DEFAULT_SVID_TTL: Duration = Duration::days(365);
/// Backdating tolerates clock skew between hosts.
const BACKDATE: Duration = Duration::minutes(5);

/// Options for one SVID.
#[derive(Debug, Clone)]
pub struct SvidOptions {
    pub ttl: Duration,
    /// Extra DNS names (allowed beside the one URI SAN by the spec): they let
    /// tools that check host names, such as grpcurl, talk to services.
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Explicit validity, overriding `ttl` (tests make expired SVIDs with it).
    pub validity: Option<(OffsetDateTime, OffsetDateTime)>,
}

impl Default for SvidOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_SVID_TTL,
            dns_names: Vec::new(),
            ips: Vec::new(),
            validity: None,
        }
    }
}

impl SvidOptions {
    /// Options for a service SVID reachable on loopback as `localhost`.
    pub fn for_local_service(name: &str) -> Self {
        Self {
            dns_names: vec!["localhost".into(), name.to_owned()],
            ips: vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
            ],
            ..Self::default()
        }
    }
}

/// Ways to break the X.509-SVID rules, for tests proving that verifiers refuse
/// such certificates. Never used to issue real SVIDs.
#[derive(Debug, Clone, Default)]
pub struct Deviation {
    pub extra_uri_san: Option<String>,
    pub is_ca: bool,
    pub key_cert_sign: bool,
    pub no_uri_san: bool,
}

/// A freshly issued SVID: its certificate and the key made for it.
pub struct IssuedSvid {
    pub id: SpiffeId,
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedSvid")
            .field("id", &self.id)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

/// A trust domain's certificate authority.
pub struct Ca {
    trust_domain: TrustDomain,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// Certificates after the signing one in its PEM (intermediates, a root).
    tail: Vec<CertificateDer<'static>>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive INTEGER: clear the top bit.
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// Makes a new self-signed CA for `td`.
    pub fn generate(td: &TrustDomain) -> Result<(Self, String), PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let key_pem = key.serialize_pem();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Bulkhead");
        dn.push(DnType::CommonName, format!("bulkhead {td} ca"));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(td.id().as_str().try_into()?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let ca = Self {
            trust_domain: td.clone(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            tail: Vec::new(),
            issuer: Issuer::new(params, key),
        };
        Ok((ca, key_pem))
    }

    /// Loads a CA from its PEM certificate and key (as `pki init` writes
    /// them). The PEM may continue with the chain up to an outside root (an
    /// intermediate CA); the signing certificate, first, carries the trust
    /// domain's ID `spiffe://<td>`.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let mut certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| PkiError::Io {
                path: "ca certificate".into(),
                source,
            })?;
        if certs.is_empty() {
            return Err(PkiError::NotCa);
        }
        let der = certs.remove(0);
        let id = crate::svid::spiffe_id_of(&der).map_err(|_| PkiError::NotCa)?;
        if !id.path().is_empty() {
            return Err(PkiError::NotCa);
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)?;
        Ok(Self {
            trust_domain: id.trust_domain(),
            cert_pem: cert_pem.to_owned(),
            cert_der: der,
            tail: certs,
            issuer,
        })
    }

    /// What a leaf's chain carries after the leaf: the signing certificate and
    /// any intermediates, but no self-signed root (verifiers hold those).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        std::iter::once(&self.cert_der)
            .chain(self.tail.iter())
            .filter(|c| !is_self_signed(c))
            .cloned()
            .collect()
    }

    pub fn load_dir(dir: &Path) -> Result<Self, PkiError> {
        let cert = dir.join("ca.pem");
        let key = dir.join("ca.key");
        let cert_pem = fs::read_to_string(&cert).map_err(io_err(&cert))?;
        let key_pem = fs::read_to_string(&key).map_err(io_err(&key))?;
        Self::load(&cert_pem, &key_pem)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues an SVID for `id` with a new key pair.
    pub fn issue(&self, id: &SpiffeId, opts: &SvidOptions) -> Result<IssuedSvid, PkiError> {
        self.issue_with(id, opts, &Deviation::default())
    }

    /// Issues a certificate that breaks the SVID rules as `deviation` says.
    #[doc(hidden)]
    pub fn issue_with(
        &self,
        id: &SpiffeId,
        opts: &SvidOptions,
        deviation: &Deviation,
    ) -> Result<IssuedSvid, PkiError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(PkiError::ForeignId {
                id: id.to_string(),
                td: self.trust_domain.to_string(),
            });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = leaf_params(id, opts, deviation)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedSvid {
            id: id.clone(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn is_self_signed(der: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der).is_ok_and(|(_, c)| c.subject() == c.issuer())
}

/// A certificate signed over a public key the holder keeps (a CSR's).
#[derive(Debug, Clone)]
pub struct SignedCert {
    pub der: CertificateDer<'static>,
    /// Lowercase hex of the serial's bytes.
    pub serial_hex: String,
    /// Expiry, seconds since the epoch.
    pub not_after: i64,
}

impl Ca {
    /// Signs an X.509-SVID for `id` over the DER SubjectPublicKeyInfo `spki`
    /// (taken from a CSR the caller has already checked): the holder's private
    /// key never reaches the CA.
    pub fn sign_spki(
        &self,
        id: &SpiffeId,
        spki: &[u8],
        opts: &SvidOptions,
    ) -> Result<SignedCert, PkiError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(PkiError::ForeignId {
                id: id.to_string(),
                td: self.trust_domain.to_string(),
            });
        }
        let public = rcgen::SubjectPublicKeyInfo::from_der(spki)?;
        let params = leaf_params(id, opts, &Deviation::default())?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.to_bytes()))
            .unwrap_or_default();
        let not_after = params.not_after.unix_timestamp();
        let cert = params.signed_by(&public, &self.issuer)?;
        Ok(SignedCert {
            der: cert.der().clone(),
            serial_hex: serial,
            not_after,
        })
    }
}

fn leaf_params(
    id: &SpiffeId,
    opts: &SvidOptions,
    deviation: &Deviation,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Bulkhead");
    params.distinguished_name = dn;
    let mut sans = Vec::new();
    if !deviation.no_uri_san {
        sans.push(SanType::URI(id.as_str().try_into()?));
    }
    if let Some(extra) = &deviation.extra_uri_san {
        sans.push(SanType::URI(extra.as_str().try_into()?));
    }
    for d in &opts.dns_names {
        sans.push(SanType::DnsName(d.as_str().try_into()?));
    }
    for ip in &opts.ips {
        sans.push(SanType::IpAddress(*ip));
    }
    params.subject_alt_names = sans;
    params.is_ca = if deviation.is_ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if deviation.key_cert_sign {
        params.key_usages.push(KeyUsagePurpose::KeyCertSign);
    }
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let (nb, na) = opts.validity.unwrap_or_else(|| {
        let now = OffsetDateTime::now_utc();
        (now - BACKDATE, now + opts.ttl)
    });
    params.not_before = nb;
    params.not_after = na;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Writes a private key with mode 0600 (created so, never widened).
pub fn write_private(path: &Path, pem: &str) -> Result<(), PkiError> {
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).map_err(io_err(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
    }
    f.write_all(pem.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Writes `<dir>/<name>.pem` (leaf, then CA) and `<dir>/<name>.key` (0600).
pub fn write_svid(dir: &Path, name: &str, svid: &IssuedSvid, ca: &Ca) -> Result<(), PkiError> {
    let cert = dir.join(format!("{name}.pem"));
    fs::write(&cert, format!("{}{}", svid.cert_pem, ca.cert_pem())).map_err(io_err(&cert))?;
    write_private(&dir.join(format!("{name}.key")), &svid.key_pem)
}

/// The services of the mesh: file name and SPIFFE ID path.
pub const SERVICES: &[(&str, &str)] = &[
    ("identity", "service/identity"),
    ("sealed-vault", "service/sealed-vault"),
    ("dispatcher", "service/dispatcher"),
    ("sandbox-runner", "service/sandbox-runner/local"),
    ("audit", "service/audit"),
];

/// What `pki init` made.
#[derive(Debug)]
pub struct InitReport {
    pub trust_domain: TrustDomain,
    pub written: Vec<(String, SpiffeId)>,
}

/// Creates a CA in `dir` and SVIDs for every service and for operator `operator`.
/// Refuses to overwrite an existing CA.
pub fn init_dir(dir: &Path, td: &TrustDomain, operator: &str) -> Result<InitReport, PkiError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let ca_cert = dir.join("ca.pem");
    if ca_cert.exists() {
        return Err(PkiError::Io {
            path: ca_cert.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "ca already exists"),
        });
    }
    let (ca, ca_key) = Ca::generate(td)?;
    write_private(&dir.join("ca.key"), &ca_key)?;
    fs::write(&ca_cert, ca.cert_pem()).map_err(io_err(&ca_cert))?;
    let mut written = Vec::new();
    for (name, path) in SERVICES {
        let id = td.join(path.split('/')).map_err(|_| PkiError::NotCa)?;
        let svid = ca.issue(&id, &SvidOptions::for_local_service(name))?;
        write_svid(dir, name, &svid, &ca)?;
        written.push(((*name).to_owned(), id));
    }
    let op = td
        .join(["admin", operator])
        .map_err(|_| PkiError::ForeignId {
            id: operator.to_owned(),
            td: td.to_string(),
        })?;
    let svid = ca.issue(&op, &SvidOptions::default())?;
    write_svid(dir, "operator", &svid, &ca)?;
    written.push(("operator".into(), op));
    Ok(InitReport {
        trust_domain: td.clone(),
        written,
    })
}

/// A lifetime of `n` days.
pub fn days(n: i64) -> Duration {
    Duration::days(n)
}
