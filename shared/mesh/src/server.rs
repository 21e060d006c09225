//! The one way to serve a mesh service: mTLS (rustls) with the peer's SPIFFE ID
//! handed to handlers, the authorization table enforced before any handler,
//! a span per request, gRPC health and server reflection always added, and
//! graceful shutdown with a drain deadline.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;

use crate::authz::{AuthzLayer, DenialSink, OPEN_SERVICES, PeerInfo, Policy, Table};
use crate::shutdown::DRAIN_DEADLINE;
use crate::svid;
use crate::telemetry::TraceLayer;
use crate::tls::{
    self, ClientAuth, Identity, NoRevocations, RevocationCheck, TlsError, TrustBundle,
};

/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Builds one mesh server. Add services with their authorization policy, then
/// [`MeshServer::bind`] and serve.
pub struct MeshServer {
    name: &'static str,
    identity: Identity,
    bundle: TrustBundle,
    client_auth: ClientAuth,
    revocations: Arc<dyn RevocationCheck>,
    routes: RoutesBuilder,
    policies: Vec<Policy>,
    services: Vec<&'static str>,
    draining: CancellationToken,
    denials: Option<Arc<dyn DenialSink>>,
    ready: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for MeshServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshServer")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("services", &self.services)
            .finish()
    }
}

impl MeshServer {
    pub fn new(name: &'static str, identity: Identity, bundle: TrustBundle) -> Self {
        Self {
            name,
            identity,
            bundle,
            client_auth: ClientAuth::Required,
            revocations: Arc::new(NoRevocations),
            routes: RoutesBuilder::default(),
            policies: Vec::new(),
            services: Vec::new(),
            draining: CancellationToken::new(),
            denials: None,
            ready: None,
        }
    }

    /// Reports NOT_SERVING on gRPC health until `ready` resolves (for a
    /// dependency the service cannot answer without, such as identity's
    /// revocation list), so that orchestrators wait for it.
    pub fn ready_when(mut self, ready: impl Future<Output = ()> + Send + 'static) -> Self {
        self.ready = Some(Box::pin(ready));
        self
    }

    /// Tells `sink` of every request the authorization layer refuses.
    pub fn denials(mut self, sink: Arc<dyn DenialSink>) -> Self {
        self.denials = Some(sink);
        self
    }

    /// Cancelled when shutdown begins: long-lived streams (tails, watches)
    /// select on it and end, so that the drain does not wait on them.
    pub fn draining(&self) -> CancellationToken {
        self.draining.clone()
    }

    /// Lets callers without a certificate reach the methods the table opens to
    /// them (identity's enrollment). Everything else still needs an SVID.
    pub fn client_auth(mut self, client_auth: ClientAuth) -> Self {
        self.client_auth = client_auth;
        self
    }

    /// Consults `check` at every handshake.
    pub fn revocations(mut self, check: Arc<dyn RevocationCheck>) -> Self {
        self.revocations = check;
        self
    }

    /// Serves `svc` under `policy`, whose `service` must be the service's name.
    pub fn add_service<S>(mut self, svc: S, policy: Policy) -> Self
    where
        S: tower_service::Service<
                http::Request<Body>,
                Response = http::Response<Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        assert_eq!(
            policy.service,
            S::NAME,
            "authorization policy names another service"
        );
        self.routes.add_service(svc);
        self.policies.push(policy);
        self.services.push(S::NAME);
        self
    }

    /// Binds the listener (port 0 picks a free port).
    pub async fn bind(self, addr: SocketAddr) -> Result<BoundServer, ServeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ServeError::Bind { addr, source })?;
        Ok(BoundServer {
            server: self,
            listener,
            local,
        })
    }
}

/// A server whose port is known, ready to serve.
#[derive(Debug)]
pub struct BoundServer {
    server: MeshServer,
    listener: TcpListener,
    local: SocketAddr,
}

impl BoundServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves until `shutdown` resolves, then: health NOT_SERVING, stop
    /// accepting, drain in-flight requests for up to [`DRAIN_DEADLINE`].
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let BoundServer {
            server,
            listener,
            local,
        } = self;
        let tls = tls::server_config(
            &server.identity,
            &server.bundle,
            server.client_auth,
            server.revocations.clone(),
        )?;

        let (reporter, health) = tonic_health::server::health_reporter();
        let mut server = server;
        match server.ready.take() {
            None => {
                for name in &server.services {
                    reporter
                        .set_service_status(*name, ServingStatus::Serving)
                        .await;
                }
            }
            Some(ready) => {
                reporter
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
                let (reporter, names, draining) = (
                    reporter.clone(),
                    server.services.clone(),
                    server.draining.clone(),
                );
                tokio::spawn(async move {
                    tokio::select! {
                        () = ready => {}
                        () = draining.cancelled() => return,
                    }
                    reporter
                        .set_service_status("", ServingStatus::Serving)
                        .await;
                    for name in names {
                        reporter
                            .set_service_status(name, ServingStatus::Serving)
                            .await;
                    }
                    tracing::info!("ready");
                });
            }
        }
        // Reflection lists exactly what this binary serves.
        let names: Vec<&str> = server
            .services
            .iter()
            .copied()
            .chain(OPEN_SERVICES.iter().copied())
            .collect();
        let reflection = || {
            names.iter().fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(bulkhead_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |b, n| b.with_service_name(*n),
            )
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;

        let mut routes = server.routes;
        routes
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let table = Table::new(server.bundle.trust_domain().clone(), &server.policies);

        let stop_accepting = CancellationToken::new();
        let incoming = accept_loop(listener, TlsAcceptor::from(tls), stop_accepting.clone());
        let drain = CancellationToken::new();
        // HTTP/2 pings find peers that vanished without closing TCP (a worker
        // host that lost power): their streams end instead of lingering.
        let serve = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(15)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            .layer(TraceLayer)
            .layer(AuthzLayer::new(
                table,
                server.revocations.clone(),
                server.denials.clone(),
            ))
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, drain.clone().cancelled_owned());
        tracing::info!(service = server.name, id = %server.identity.spiffe_id(), addr = %local, "serving");

        tokio::pin!(serve);
        tokio::select! {
            r = &mut serve => return r.map_err(ServeError::from),
            () = shutdown => {}
        }
        tracing::info!(service = server.name, "shutting down: draining");
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        for name in &server.services {
            reporter
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        stop_accepting.cancel();
        server.draining.cancel();
        drain.cancel();
        match tokio::time::timeout(DRAIN_DEADLINE, serve).await {
            Ok(r) => r?,
            Err(_) => tracing::warn!(service = server.name, "drain deadline passed; closing"),
        }
        tracing::info!(service = server.name, "stopped");
        Ok(())
    }
}

/// Accepts TCP connections and completes TLS handshakes off the accept path,
/// yielding only authenticated streams.
fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    stop: CancellationToken,
) -> ReceiverStream<Result<MeshStream, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                () = stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let leaf = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|leaf| svid::validate_leaf(leaf).ok());
                        let peer = PeerInfo {
                            id: leaf.as_ref().map(|l| l.id.clone()),
                            serial: leaf.as_ref().map(|l| l.serial.clone()),
                            not_after: leaf.map(|l| l.not_after),
                            remote: Some(remote),
                        };
                        let _ = tx.send(Ok(MeshStream { inner: tls, peer })).await;
                    }
                    Ok(Err(e)) => tracing::info!(%remote, error = %e, "tls handshake refused"),
                    Err(_) => tracing::info!(%remote, "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// An authenticated connection: TLS plus what it proved about the peer.
#[derive(Debug)]
pub struct MeshStream {
    inner: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl tonic::transport::server::Connected for MeshStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
