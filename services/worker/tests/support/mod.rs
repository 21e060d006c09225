//! Test doubles of the dispatcher and of identity, served over the real mesh
//! server (mTLS, authorization table) with a fresh in-process CA, and driven
//! step by step by the tests.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_mesh::authz::{PeerInfo, who};
use bulkhead_mesh::pki::{Ca, SvidOptions};
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::spiffe::{SpiffeId, TrustDomain};
use bulkhead_mesh::tls::{ClientAuth, Identity, RevocationCheck, TrustBundle};
use bulkhead_mesh::{Caller, Policy, Rule};
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::dispatcher_service_server::{
    DispatcherService, DispatcherServiceServer,
};
use bulkhead_proto::identity::v1 as idpb;
use bulkhead_proto::identity::v1::identity_service_server::{
    IdentityService, IdentityServiceServer,
};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub const WAIT: Duration = Duration::from_secs(10);

/// A fresh trust domain.
pub struct Pki {
    pub ca: Ca,
    pub bundle: TrustBundle,
}

impl Pki {
    pub fn new() -> Self {
        bulkhead_mesh::tls::install_crypto_provider();
        let td = TrustDomain::parse("bulkhead.test").unwrap();
        let (ca, _key) = Ca::generate(&td).unwrap();
        let bundle = TrustBundle::from_der(vec![ca.cert_der().clone()]).unwrap();
        Self { ca, bundle }
    }

    pub fn id(&self, path: &str) -> SpiffeId {
        self.ca.trust_domain().join(path.split('/')).unwrap()
    }

    pub fn identity(&self, path: &str) -> Identity {
        let svid = self
            .ca
            .issue(&self.id(path), &SvidOptions::default())
            .unwrap();
        let chain = format!("{}{}", svid.cert_pem, self.ca.cert_pem());
        Identity::from_pem(chain.as_bytes(), svid.key_pem.as_bytes(), path).unwrap()
    }

    /// Signs an SVID for `path` over the key of `csr_der`, as identity does.
    pub fn sign_csr(
        &self,
        path: &str,
        csr_der: &[u8],
        validity: Option<Duration>,
    ) -> idpb::X509Svid {
        use x509_parser::certification_request::X509CertificationRequest;
        use x509_parser::prelude::FromDer;
        let (_, csr) = X509CertificationRequest::from_der(csr_der).unwrap();
        csr.verify_signature().unwrap();
        let spki = csr.certification_request_info.subject_pki.raw;
        let mut opts = SvidOptions::default();
        if let Some(v) = validity {
            let now = time::OffsetDateTime::now_utc();
            opts.validity = Some((
                now - time::Duration::seconds(1),
                now + time::Duration::try_from(v).unwrap(),
            ));
        }
        let signed = self.ca.sign_spki(&self.id(path), spki, &opts).unwrap();
        idpb::X509Svid {
            cert_chain_der: vec![Bytes::from(signed.der.to_vec())],
            spiffe_id: self.id(path).to_string(),
            expires_at: Some(prost_types::Timestamp {
                seconds: signed.not_after,
                nanos: 0,
            }),
            serial: signed.serial_hex,
        }
    }
}

/// Revokes the identities named in it, at every handshake and request.
#[derive(Debug, Default)]
pub struct Revoked(pub Mutex<HashSet<String>>);

impl RevocationCheck for Revoked {
    fn revoked(&self, id: &SpiffeId, _serial: Option<&[u8]>) -> bool {
        self.0.lock().unwrap().contains(id.as_str())
    }
}

async fn serve(server: MeshServer) -> (SocketAddr, CancellationToken) {
    let bound = server.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = bound.local_addr();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move { bound.serve(s.cancelled_owned()).await });
    (addr, stop)
}

// ---------------------------------------------------------------------------
// Dispatcher

const DISPATCHER_POLICY: Policy = Policy {
    service: "bulkhead.dispatcher.v1.DispatcherService",
    rules: &[
        Rule::new("RegisterWorker", &[who::TENANT_WORKER, who::POOL_WORKER]),
        Rule::new("Claim", &[who::TENANT_WORKER, who::POOL_WORKER]),
    ],
};

/// One registration as the dispatcher saw it.
#[derive(Debug, Clone)]
pub struct Registered {
    pub caller: SpiffeId,
    pub serial: Option<Vec<u8>>,
    pub request: pb::RegisterWorkerRequest,
}

#[derive(Debug)]
struct DispatcherState {
    registrations: Mutex<Vec<Registered>>,
    streams: mpsc::UnboundedSender<ClaimStream>,
    heartbeat: Duration,
    refuse_claims: Mutex<Option<Status>>,
}

#[derive(Debug, Clone)]
struct FakeDispatcher(Arc<DispatcherState>);

/// A claim stream as the dispatcher holds it.
#[derive(Debug)]
pub struct ClaimStream {
    pub caller: SpiffeId,
    pub serial: Option<Vec<u8>>,
    rx: mpsc::UnboundedReceiver<pb::ClaimRequest>,
    tx: mpsc::Sender<Result<pb::ClaimResponse, Status>>,
}

pub type Body = pb::claim_request::Body;

type ClaimResponses = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::ClaimResponse, Status>> + Send + 'static>,
>;

impl ClaimStream {
    /// The next message from the worker.
    pub async fn next(&mut self) -> Body {
        let msg = tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("the worker sent nothing in time")
            .expect("the stream ended");
        msg.body.expect("a message with a body")
    }

    /// The next message that is not a heartbeat.
    pub async fn next_not_heartbeat(&mut self) -> Body {
        loop {
            match self.next().await {
                Body::Heartbeat(_) => {}
                other => return other,
            }
        }
    }

    /// Waits for a heartbeat; returns its leases as (task, attempt, epoch).
    pub async fn heartbeat(&mut self) -> Vec<(String, u32, u64)> {
        loop {
            if let Body::Heartbeat(h) = self.next().await {
                return h
                    .leases
                    .into_iter()
                    .map(|l| (l.task_id, l.attempt, l.lease_epoch))
                    .collect();
            }
        }
    }

    /// Everything the worker sends within `d`.
    pub async fn collect_for(&mut self, d: Duration) -> Vec<Body> {
        let until = tokio::time::Instant::now() + d;
        let mut out = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout_at(until, self.rx.recv()).await {
            out.extend(m.body);
        }
        out
    }

    pub async fn send(&self, body: pb::claim_response::Body) {
        self.tx
            .send(Ok(pb::ClaimResponse { body: Some(body) }))
            .await
            .expect("the worker's stream is gone");
    }

    /// Ends the stream with `status`, as a dispatcher that fails or evicts.
    pub async fn fail(self, status: Status) {
        let _ = self.tx.send(Err(status)).await;
    }
}

#[tonic::async_trait]
impl DispatcherService for FakeDispatcher {
    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let caller = Caller::of(&req)?;
        let serial = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.serial.clone());
        self.0.registrations.lock().unwrap().push(Registered {
            caller: caller.id,
            serial,
            request: req.into_inner(),
        });
        let hb = self.0.heartbeat;
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker: None,
            lease_duration: Some(proto_duration(hb * 10)),
            heartbeat_interval: Some(proto_duration(hb)),
        }))
    }

    async fn claim(
        &self,
        req: Request<Streaming<pb::ClaimRequest>>,
    ) -> Result<Response<ClaimResponses>, Status> {
        if let Some(s) = self.0.refuse_claims.lock().unwrap().clone() {
            return Err(s);
        }
        let caller = Caller::of(&req)?.id;
        let serial = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.serial.clone());
        let mut inbound = req.into_inner();
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if in_tx.send(m).is_err() {
                    break;
                }
            }
        });
        let (out_tx, out_rx) = mpsc::channel(64);
        let _ = self.0.streams.send(ClaimStream {
            caller,
            serial,
            rx: in_rx,
            tx: out_tx,
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap(),
        nanos: i32::try_from(d.subsec_nanos()).unwrap(),
    }
}

/// A running test dispatcher.
pub struct Dispatcher {
    pub addr: SocketAddr,
    state: Arc<DispatcherState>,
    streams: mpsc::UnboundedReceiver<ClaimStream>,
    pub revoked: Arc<Revoked>,
    _stop: tokio_util::sync::DropGuard,
}

impl Dispatcher {
    pub async fn start(pki: &Pki, heartbeat: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(DispatcherState {
            registrations: Mutex::new(Vec::new()),
            streams: tx,
            heartbeat,
            refuse_claims: Mutex::new(None),
        });
        let revoked = Arc::new(Revoked::default());
        let server = MeshServer::new(
            "dispatcher",
            pki.identity("service/dispatcher"),
            pki.bundle.clone(),
        )
        .revocations(revoked.clone())
        .add_service(
            DispatcherServiceServer::new(FakeDispatcher(state.clone())),
            DISPATCHER_POLICY,
        );
        let (addr, stop) = serve(server).await;
        Self {
            addr,
            state,
            streams: rx,
            revoked,
            _stop: stop.drop_guard(),
        }
    }

    /// The next claim stream a worker opens.
    pub async fn stream(&mut self) -> ClaimStream {
        tokio::time::timeout(WAIT, self.streams.recv())
            .await
            .expect("no claim stream in time")
            .expect("dispatcher gone")
    }

    pub fn registrations(&self) -> Vec<Registered> {
        self.state.registrations.lock().unwrap().clone()
    }

    pub fn refuse_claims(&self, status: Option<Status>) {
        *self.state.refuse_claims.lock().unwrap() = status;
    }
}

// ---------------------------------------------------------------------------
// Identity

const IDENTITY_POLICY: Policy = Policy {
    service: "bulkhead.identity.v1.IdentityService",
    rules: &[
        Rule::new("EnrollWorker", &[who::UNAUTHENTICATED]),
        Rule::new("RenewWorkerSvid", &[who::TENANT_WORKER, who::POOL_WORKER]),
    ],
};

pub const JOIN_TOKEN: &str = "bh_jt_test-token-secret";

#[derive(Debug, Default)]
pub struct IdentityLog {
    pub enrollments: Vec<(String, String)>,
    /// Serials (hex) of every renewed SVID, in order.
    pub renewals: Vec<String>,
}

struct FakeIdentity {
    pki: Arc<Pki>,
    ttl: Duration,
    log: Arc<Mutex<IdentityLog>>,
}

#[tonic::async_trait]
impl IdentityService for FakeIdentity {
    async fn enroll_worker(
        &self,
        req: Request<idpb::EnrollWorkerRequest>,
    ) -> Result<Response<idpb::EnrollWorkerResponse>, Status> {
        let req = req.into_inner();
        if req.join_token != JOIN_TOKEN {
            return Err(Status::unauthenticated("invalid join token"));
        }
        let n = self.log.lock().unwrap().enrollments.len() + 1;
        let worker_id = format!("w-{n}");
        let svid = self.pki.sign_csr(
            &format!("tenant/acme/worker/{worker_id}"),
            &req.csr_der,
            Some(self.ttl),
        );
        self.log
            .lock()
            .unwrap()
            .enrollments
            .push((req.worker_name, svid.spiffe_id.clone()));
        Ok(Response::new(idpb::EnrollWorkerResponse {
            worker_id,
            tenant: "acme".into(),
            pool: String::new(),
            svid: Some(svid),
        }))
    }

    async fn renew_worker_svid(
        &self,
        req: Request<idpb::RenewWorkerSvidRequest>,
    ) -> Result<Response<idpb::RenewWorkerSvidResponse>, Status> {
        let caller = Caller::of(&req)?.id;
        let path = caller.path().trim_start_matches('/').to_owned();
        let svid = self
            .pki
            .sign_csr(&path, &req.into_inner().csr_der, Some(self.ttl));
        self.log.lock().unwrap().renewals.push(svid.serial.clone());
        Ok(Response::new(idpb::RenewWorkerSvidResponse {
            svid: Some(svid),
        }))
    }
}

/// A running test identity service that enrolls into tenant `acme`.
pub struct IdentitySvc {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<IdentityLog>>,
    _stop: tokio_util::sync::DropGuard,
}

impl IdentitySvc {
    pub async fn start(pki: Arc<Pki>, ttl: Duration) -> Self {
        let log = Arc::new(Mutex::new(IdentityLog::default()));
        let server = MeshServer::new(
            "identity",
            pki.identity("service/identity"),
            pki.bundle.clone(),
        )
        .client_auth(ClientAuth::Optional)
        .add_service(
            IdentityServiceServer::new(FakeIdentity {
                pki: pki.clone(),
                ttl,
                log: log.clone(),
            }),
            IDENTITY_POLICY,
        );
        let (addr, stop) = serve(server).await;
        Self {
            addr,
            log,
            _stop: stop.drop_guard(),
        }
    }
}
