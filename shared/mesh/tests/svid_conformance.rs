//! The PKI's certificates, checked by an implementation that is not ours (the
//! `spiffe` crate's X.509-SVID validation) and by our own verifier, including
//! that non-conformant leaves are refused by both.

use std::os::unix::fs::PermissionsExt;

use bulkhead_mesh::pki::{self, Ca, Deviation, SvidOptions};
use bulkhead_mesh::spiffe::{SpiffeId, TrustDomain};
use bulkhead_mesh::svid::{self, SvidError};
use x509_parser::prelude::{FromDer, X509Certificate};

fn pem_to_der(pem: &str) -> Vec<Vec<u8>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .map(|c| c.expect("pem").to_vec())
        .collect()
}

fn key_der(pem: &str) -> Vec<u8> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .expect("pem")
        .expect("a key")
        .secret_der()
        .to_vec()
}

/// The spiffe crate's verdict on a chain (leaf first) and key.
fn spiffe_crate_parse(chain: &[Vec<u8>], key: &[u8]) -> Result<String, String> {
    let concatenated: Vec<u8> = chain.concat();
    spiffe::X509Svid::parse_from_der(&concatenated, key)
        .map(|s| s.spiffe_id().to_string())
        .map_err(|e| e.to_string())
}

#[test]
fn pki_init_output_is_spec_conformant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let td = TrustDomain::parse("bulkhead.test").expect("td");
    let report = pki::init_dir(dir.path(), &td, "alice").expect("init");
    assert_eq!(report.written.len(), 6, "five services and one operator");

    // The CA: cA=true, keyCertSign, the path-less trust domain ID.
    let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca");
    let ca_der = pem_to_der(&ca_pem).remove(0);
    let (_, ca) = X509Certificate::from_der(&ca_der).expect("ca parses");
    let bc = ca.basic_constraints().expect("bc").expect("present");
    assert!(bc.value.ca && bc.critical);
    let ku = ca.key_usage().expect("ku").expect("present");
    assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
    assert_eq!(
        svid::spiffe_id_of(&ca_der).expect("id").as_str(),
        "spiffe://bulkhead.test"
    );
    let bundle = spiffe::X509Bundle::parse_from_der(
        spiffe::TrustDomain::new("bulkhead.test").expect("td"),
        &ca_der,
    )
    .expect("the spiffe crate accepts the CA as a bundle");
    assert_eq!(bundle.authorities().len(), 1);

    for (name, id) in &report.written {
        let chain = pem_to_der(
            &std::fs::read_to_string(dir.path().join(format!("{name}.pem"))).expect("cert"),
        );
        let key_path = dir.path().join(format!("{name}.key"));
        let mode = std::fs::metadata(&key_path)
            .expect("key")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name}.key must be 0600");
        let key = key_der(&std::fs::read_to_string(&key_path).expect("key"));

        let theirs = spiffe_crate_parse(&chain, &key)
            .unwrap_or_else(|e| panic!("{name}: spiffe crate refused: {e}"));
        assert_eq!(&theirs, id.as_str());
        let ours = svid::validate_leaf(&chain[0]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&ours.id, id);

        let (_, leaf) = X509Certificate::from_der(&chain[0]).expect("leaf");
        let eku = leaf.extended_key_usage().expect("eku").expect("present");
        assert!(
            eku.value.server_auth && eku.value.client_auth,
            "{name}: eku"
        );
        let ku = leaf.key_usage().expect("ku").expect("present");
        assert!(ku.critical && ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        assert!(
            !leaf
                .basic_constraints()
                .expect("bc")
                .is_some_and(|b| b.value.ca)
        );
    }

    // Refuses to overwrite a CA.
    assert!(pki::init_dir(dir.path(), &td, "alice").is_err());
}

#[test]
fn non_conformant_leaves_are_refused_by_both_implementations() {
    let td = TrustDomain::parse("bulkhead.test").expect("td");
    let (ca, _) = Ca::generate(&td).expect("ca");
    let id = SpiffeId::parse("spiffe://bulkhead.test/tenant/acme/client/api").expect("id");
    let issue = |d: Deviation| {
        let s = ca
            .issue_with(&id, &SvidOptions::default(), &d)
            .expect("issue");
        (pem_to_der(&s.cert_pem).remove(0), key_der(&s.key_pem))
    };

    let (good, key) = issue(Deviation::default());
    spiffe_crate_parse(std::slice::from_ref(&good), &key).expect("the conformant leaf is accepted");
    svid::validate_leaf(&good).expect("ours accepts it too");

    let (two_uris, key) = issue(Deviation {
        extra_uri_san: Some("spiffe://bulkhead.test/tenant/globex/client/api".into()),
        ..Deviation::default()
    });
    assert_eq!(
        svid::validate_leaf(&two_uris).err(),
        Some(SvidError::MultipleUriSans)
    );
    let theirs = spiffe_crate_parse(&[two_uris], &key);
    assert!(
        theirs.is_err(),
        "spiffe crate accepted two URI SANs: {theirs:?}"
    );

    let (ca_leaf, key) = issue(Deviation {
        is_ca: true,
        ..Deviation::default()
    });
    assert_eq!(
        svid::validate_leaf(&ca_leaf).err(),
        Some(SvidError::LeafIsCa)
    );
    assert!(
        spiffe_crate_parse(&[ca_leaf], &key).is_err(),
        "cA=true leaf accepted"
    );

    let (signer, key) = issue(Deviation {
        key_cert_sign: true,
        ..Deviation::default()
    });
    assert_eq!(
        svid::validate_leaf(&signer).err(),
        Some(SvidError::LeafCanSign)
    );
    assert!(
        spiffe_crate_parse(&[signer], &key).is_err(),
        "keyCertSign leaf accepted"
    );

    let (no_uri, _) = issue(Deviation {
        no_uri_san: true,
        ..Deviation::default()
    });
    assert_eq!(
        svid::validate_leaf(&no_uri).err(),
        Some(SvidError::NoUriSan)
    );
}
