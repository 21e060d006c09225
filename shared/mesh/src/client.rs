//! The one way to dial a mesh service: mTLS with this process's SVID, the
//! server's SPIFFE ID pinned, W3C trace context injected into every call.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::telemetry::TracePropagation;
use crate::tls::{self, ExpectServer, Identity, TlsError, TrustBundle};

/// A channel to a mesh service; generated clients take it as their transport.
pub type MeshChannel = TracePropagation<Channel>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid address {0}")]
    Address(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
}

/// Dials `addr` (`host:port`) lazily: the connection is made on first use and
/// re-made after failures, so services may start in any order.
pub fn channel(
    addr: &str,
    identity: Option<&Identity>,
    bundle: &TrustBundle,
    expect: ExpectServer,
) -> Result<MeshChannel, ConnectError> {
    let (endpoint, connector) = prepare(addr, identity, bundle, expect)?;
    Ok(TracePropagation::new(
        endpoint.connect_with_connector_lazy(connector),
    ))
}

/// Dials `addr` now, failing if the handshake fails.
pub async fn connect(
    addr: &str,
    identity: Option<&Identity>,
    bundle: &TrustBundle,
    expect: ExpectServer,
) -> Result<MeshChannel, ConnectError> {
    let (endpoint, connector) = prepare(addr, identity, bundle, expect)?;
    let ch = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|source| ConnectError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    Ok(TracePropagation::new(ch))
}

type Connector = tower::util::BoxCloneSyncService<
    http::Uri,
    TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    std::io::Error,
>;

fn prepare(
    addr: &str,
    identity: Option<&Identity>,
    bundle: &TrustBundle,
    expect: ExpectServer,
) -> Result<(Endpoint, Connector), ConnectError> {
    let config = tls::client_config(identity, bundle, expect)?;
    // The scheme is http because TLS is done by the connector below, not by tonic.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ConnectError::Address(addr.to_owned()))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        // Pings find a server that vanished without closing TCP, so long
        // streams (claims, revocation watches) reconnect instead of hanging.
        .http2_keep_alive_interval(std::time::Duration::from_secs(15))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let connector = TlsConnector::from(Arc::clone(&config));
    let svc = tower::service_fn(move |uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let host = uri.host().unwrap_or("localhost").to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let host_for_connect = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let tcp = TcpStream::connect((host_for_connect.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // The name is only sent as SNI; the verifier checks the SPIFFE ID.
            let name = ServerName::try_from(host_for_connect)
                .unwrap_or_else(|_| ServerName::try_from("bulkhead.invalid").expect("static name"));
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok((endpoint, tower::util::BoxCloneSyncService::new(svc)))
}
