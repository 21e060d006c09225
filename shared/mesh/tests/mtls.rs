//! The mesh's mTLS and authorization, over real connections to a real tonic
//! server: who is refused at the TLS layer, who is refused by the table, and
//! that a tenant-scoped caller cannot name another tenant.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_mesh::authz::{Policy, Rule, who};
use bulkhead_mesh::pki::{Ca, IssuedSvid, SvidOptions};
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::spiffe::{SpiffeId, TrustDomain};
use bulkhead_mesh::tls::{self, ExpectServer, Identity, TrustBundle};
use bulkhead_mesh::{Caller, client};
use bulkhead_proto::identity::v1 as pb;
use pb::identity_service_client::IdentityServiceClient;
use pb::identity_service_server::{IdentityService, IdentityServiceServer};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request, Response, Status};

const TD: &str = "bulkhead.test";

static RULES: &[Rule] = &[
    Rule::new("MintRunSvid", &[who::TENANT_CLIENT, who::OPERATOR]).tenant_scoped(),
    Rule::new("GetTrustBundle", &[who::ANYONE]),
];
const POLICY: Policy = Policy {
    service: "bulkhead.identity.v1.IdentityService",
    rules: RULES,
};

/// Records who reached a handler; answers MintRunSvid with an empty response.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(String, String)>>>);

#[tonic::async_trait]
impl IdentityService for Recorder {
    async fn mint_run_svid(
        &self,
        req: Request<pb::MintRunSvidRequest>,
    ) -> Result<Response<pb::MintRunSvidResponse>, Status> {
        let caller = Caller::of(&req)?;
        self.0
            .lock()
            .expect("lock")
            .push((caller.id.to_string(), req.get_ref().tenant.clone()));
        Ok(Response::new(pb::MintRunSvidResponse::default()))
    }
}

struct Fixture {
    ca: Ca,
    bundle: TrustBundle,
    addr: String,
    calls: Recorder,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn identity(svid: &IssuedSvid, ca_pem: &str) -> Identity {
    let chain = format!("{}{}", svid.cert_pem, ca_pem);
    Identity::from_pem(chain.as_bytes(), svid.key_pem.as_bytes(), "test").expect("identity")
}

fn id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}/{path}")).expect("id")
}

impl Fixture {
    async fn start() -> Self {
        tls::install_crypto_provider();
        let td = TrustDomain::parse(TD).expect("td");
        let (ca, _) = Ca::generate(&td).expect("ca");
        let bundle = TrustBundle::from_pem(ca.cert_pem().as_bytes(), "ca").expect("bundle");
        let server_svid = ca
            .issue(
                &id("service/identity"),
                &SvidOptions::for_local_service("identity"),
            )
            .expect("svid");
        let calls = Recorder::default();
        let bound = MeshServer::new(
            "identity",
            identity(&server_svid, ca.cert_pem()),
            bundle.clone(),
        )
        .add_service(IdentityServiceServer::new(calls.clone()), POLICY)
        .bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
        let addr = bound.local_addr().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(bound.serve(async {
            let _ = stopped.await;
        }));
        Self {
            ca,
            bundle,
            addr,
            calls,
            _stop: stop,
        }
    }

    fn client_identity(&self, path: &str) -> Identity {
        let svid = self
            .ca
            .issue(&id(path), &SvidOptions::default())
            .expect("svid");
        identity(&svid, self.ca.cert_pem())
    }

    async fn client(&self, who: Option<&Identity>) -> IdentityServiceClient<client::MeshChannel> {
        let ch = client::channel(
            &self.addr,
            who,
            &self.bundle,
            ExpectServer::Exact(id("service/identity")),
        )
        .expect("channel");
        IdentityServiceClient::new(ch)
    }

    async fn mint(&self, who: Option<&Identity>, tenant: &str) -> Result<(), Status> {
        let mut c = self.client(who).await;
        let req = pb::MintRunSvidRequest {
            tenant: tenant.into(),
            run_id: "r1".into(),
            ..Default::default()
        };
        tokio::time::timeout(Duration::from_secs(10), c.mint_run_svid(req))
            .await
            .map_err(|_| Status::deadline_exceeded("test timeout"))?
            .map(|_| ())
    }

    fn handled(&self) -> Vec<(String, String)> {
        self.calls.0.lock().expect("lock").clone()
    }
}

/// Completes a raw TLS handshake as `who` and reports whether the server then
/// lets bytes through (in TLS 1.3 the server refuses a client certificate
/// after the client's side of the handshake is done, with an alert).
async fn raw_tls_accepted(
    addr: &str,
    who: Option<&Identity>,
    bundle: &TrustBundle,
) -> Result<(), String> {
    let cfg = tls::client_config(who, bundle, ExpectServer::AnyInTrustDomain)
        .map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut s = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // An HTTP/2 preface: a server that accepted us answers with a SETTINGS frame.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 9];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

#[tokio::test]
async fn tls_layer_refuses_no_certificate_foreign_trust_domain_and_expired() {
    let f = Fixture::start().await;
    let good = f.client_identity("tenant/acme/client/api");
    raw_tls_accepted(&f.addr, Some(&good), &f.bundle)
        .await
        .expect("a valid svid is accepted");

    // No certificate at all.
    let err = raw_tls_accepted(&f.addr, None, &f.bundle)
        .await
        .expect_err("no cert refused");
    assert!(
        err.contains("CertificateRequired") || err.contains("alert"),
        "{err}"
    );
    assert!(f.mint(None, "acme").await.is_err());

    // A certificate from another trust domain's CA.
    let other_td = TrustDomain::parse("other.test").expect("td");
    let (other_ca, _) = Ca::generate(&other_td).expect("ca");
    let other_id = SpiffeId::parse("spiffe://other.test/tenant/acme/client/api").expect("id");
    let foreign = identity(
        &other_ca
            .issue(&other_id, &SvidOptions::default())
            .expect("svid"),
        other_ca.cert_pem(),
    );
    let err = raw_tls_accepted(&f.addr, Some(&foreign), &f.bundle)
        .await
        .expect_err("foreign trust domain refused");
    assert!(
        err.contains("alert") || err.contains("UnknownCA") || err.contains("BadCertificate"),
        "{err}"
    );
    assert!(f.mint(Some(&foreign), "acme").await.is_err());

    // An expired certificate of the right trust domain.
    let now = OffsetDateTime::now_utc();
    let expired_svid =
        f.ca.issue(
            &id("tenant/acme/client/api"),
            &SvidOptions {
                validity: Some((now - time::Duration::days(2), now - time::Duration::days(1))),
                ..SvidOptions::default()
            },
        )
        .expect("svid");
    let expired = identity(&expired_svid, f.ca.cert_pem());
    let err = raw_tls_accepted(&f.addr, Some(&expired), &f.bundle)
        .await
        .expect_err("expired refused");
    assert!(err.contains("alert") || err.contains("Expired"), "{err}");
    assert!(f.mint(Some(&expired), "acme").await.is_err());

    assert!(
        f.handled().is_empty(),
        "no refused caller reached a handler: {:?}",
        f.handled()
    );
}

#[tokio::test]
async fn client_pins_the_server_spiffe_id() {
    let f = Fixture::start().await;
    let who = f.client_identity("admin/alice");
    let ch = client::channel(
        &f.addr,
        Some(&who),
        &f.bundle,
        ExpectServer::Exact(id("service/audit")),
    )
    .expect("channel");
    let err = IdentityServiceClient::new(ch)
        .get_trust_bundle(pb::GetTrustBundleRequest::default())
        .await
        .expect_err("an identity server is not the audit service");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
}

#[tokio::test]
async fn table_refuses_callers_and_methods_not_declared() {
    let f = Fixture::start().await;
    // A worker is not in MintRunSvid's row.
    let worker = f.client_identity("tenant/acme/worker/w1");
    let err = f
        .mint(Some(&worker), "acme")
        .await
        .expect_err("worker refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // CreateJoinToken is not in the table at all: denied even to an operator.
    let op = f.client_identity("admin/alice");
    let mut c = f.client(Some(&op)).await;
    let err = c
        .create_join_token(pb::CreateJoinTokenRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .expect_err("missing method refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // A method open to anyone reaches its handler (here the default stub).
    let err = c
        .get_trust_bundle(pb::GetTrustBundleRequest::default())
        .await
        .expect_err("stub");
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(f.handled().is_empty());
}

#[tokio::test]
async fn a_tenant_client_cannot_name_another_tenant() {
    let f = Fixture::start().await;
    let acme = f.client_identity("tenant/acme/client/api");
    let err = f
        .mint(Some(&acme), "globex")
        .await
        .expect_err("cross-tenant refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = f
        .mint(Some(&acme), "")
        .await
        .expect_err("empty tenant refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(f.handled().is_empty());

    f.mint(Some(&acme), "acme")
        .await
        .expect("own tenant allowed");
    // Operators are not tenant-scoped: they may name any tenant.
    let op = f.client_identity("admin/alice");
    f.mint(Some(&op), "globex").await.expect("operator allowed");
    assert_eq!(
        f.handled(),
        vec![
            (
                format!("spiffe://{TD}/tenant/acme/client/api"),
                "acme".to_owned()
            ),
            (format!("spiffe://{TD}/admin/alice"), "globex".to_owned()),
        ],
        "the handler saw the authenticated caller"
    );
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let f = Fixture::start().await;
    let who = f.client_identity("tenant/acme/worker/w1");
    let ch = client::channel(
        &f.addr,
        Some(&who),
        &f.bundle,
        ExpectServer::AnyInTrustDomain,
    )
    .expect("channel");
    let resp = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: "bulkhead.identity.v1.IdentityService".into(),
        })
        .await
        .expect("health");
    assert_eq!(resp.into_inner().status, 1, "SERVING");
}
