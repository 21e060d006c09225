//! An intermediate CA of the trust domain, signed by an outside root that
//! carries no SPIFFE ID: SVIDs it signs carry the intermediate in their chain
//! and verify, over a real mTLS connection, against a bundle holding only the
//! outside root.

use bulkhead_mesh::authz::{Policy, Rule, who};
use bulkhead_mesh::pki::{Ca, SvidOptions};
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::spiffe::{SpiffeId, TrustDomain};
use bulkhead_mesh::tls::{self, ExpectServer, Identity, TrustBundle};
use bulkhead_proto::identity::v1::identity_service_server::{
    IdentityService, IdentityServiceServer,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

struct Stub;
impl IdentityService for Stub {}

/// A corporate root (no SPIFFE ID) and, under it, the trust domain's
/// intermediate (`spiffe://bulkhead.test`), as PEM chain + key.
fn outside_root_and_intermediate() -> (String, String, String) {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut root = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Example Corp Root");
    root.distinguished_name = dn;
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = root.self_signed(&root_key).expect("root");
    let root_issuer = Issuer::new(root, root_key);

    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut int = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "bulkhead.test intermediate");
    int.distinguished_name = dn;
    int.subject_alt_names = vec![SanType::URI(
        "spiffe://bulkhead.test".try_into().expect("uri"),
    )];
    int.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    int.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let int_cert = int.signed_by(&int_key, &root_issuer).expect("intermediate");
    (
        root_cert.pem(),
        format!("{}{}", int_cert.pem(), root_cert.pem()),
        int_key.serialize_pem(),
    )
}

#[tokio::test]
async fn svids_of_an_intermediate_verify_against_the_outside_root() {
    tls::install_crypto_provider();
    let (root_pem, chain_pem, int_key) = outside_root_and_intermediate();
    let ca = Ca::load(&chain_pem, &int_key).expect("the intermediate loads as the ca");
    assert_eq!(ca.trust_domain().as_str(), "bulkhead.test");
    assert_eq!(
        ca.chain().len(),
        1,
        "the chain carries the intermediate, not the root"
    );

    let td = TrustDomain::parse("bulkhead.test").expect("td");
    let roots: Vec<_> = rustls_pemfile::certs(&mut root_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("pem");
    assert!(
        TrustBundle::from_der(roots.clone()).is_err(),
        "the root has no SPIFFE ID"
    );
    let bundle = TrustBundle::with_trust_domain(roots, td).expect("bundle");

    let identity = |path: &str| {
        let id = SpiffeId::parse(&format!("spiffe://bulkhead.test/{path}")).expect("id");
        let svid = ca.issue(&id, &SvidOptions::default()).expect("svid");
        let mut chain = svid.cert_pem.clone();
        for c in ca.chain() {
            chain.push_str(&pem_of(&c));
        }
        Identity::from_pem(chain.as_bytes(), svid.key_pem.as_bytes(), path).expect("identity")
    };
    static RULES: &[Rule] = &[Rule::new("GetTrustBundle", &[who::OPERATOR])];
    let bound = MeshServer::new("identity", identity("service/identity"), bundle.clone())
        .add_service(
            IdentityServiceServer::new(Stub),
            Policy {
                service: "bulkhead.identity.v1.IdentityService",
                rules: RULES,
            },
        )
        .bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = bound.local_addr().to_string();
    tokio::spawn(bound.serve(std::future::pending()));

    let op = identity("admin/alice");
    let ch = bulkhead_mesh::client::channel(
        &addr,
        Some(&op),
        &bundle,
        ExpectServer::Service("identity".into()),
    )
    .expect("channel");
    let status =
        bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient::new(ch)
            .get_trust_bundle(bulkhead_proto::identity::v1::GetTrustBundleRequest::default())
            .await
            .expect_err("stub");
    assert_eq!(
        status.code(),
        tonic::Code::Unimplemented,
        "mTLS both ways succeeded: {status}"
    );
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("ascii"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
