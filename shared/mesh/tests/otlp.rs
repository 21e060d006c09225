//! Spans reach an OTLP collector with `bulkhead.tenant` and `bulkhead.run_id`,
//! and the caller's W3C trace context crosses the gRPC hop. The collector is a
//! real OTLP/gRPC TraceService inside this test.

use std::time::Duration;

use bulkhead_mesh::authz::{Policy, Rule, who};
use bulkhead_mesh::pki::{Ca, IssuedSvid, SvidOptions};
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::spiffe::{SpiffeId, TrustDomain};
use bulkhead_mesh::telemetry::{self, LogFormat, TelemetryConfig};
use bulkhead_mesh::tls::{self, ExpectServer, Identity, TrustBundle};
use bulkhead_proto::identity::v1::identity_service_server::{
    IdentityService, IdentityServiceServer,
};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span as OtlpSpan;
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Collector(mpsc::UnboundedSender<OtlpSpan>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let _ = self.0.send(span);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

struct Stub;
impl IdentityService for Stub {}

fn attr(span: &OtlpSpan, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            other => Some(format!("{other:?}")),
        })
}

fn identity(svid: &IssuedSvid, ca: &Ca) -> Identity {
    let chain = format!("{}{}", svid.cert_pem, ca.cert_pem());
    Identity::from_pem(chain.as_bytes(), svid.key_pem.as_bytes(), "test").expect("identity")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_tenant_and_run_and_the_callers_trace() {
    tls::install_crypto_provider();
    // The collector.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector_addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let guard = telemetry::init(
        "otlp-test",
        &TelemetryConfig {
            log_format: LogFormat::Pretty,
            log_filter: "info".into(),
            otlp_endpoint: Some(format!("http://{collector_addr}")),
        },
    )
    .expect("telemetry");

    // A mesh server and a run identity calling it.
    let td = TrustDomain::parse("bulkhead.test").expect("td");
    let (ca, _) = Ca::generate(&td).expect("ca");
    let bundle = TrustBundle::from_pem(ca.cert_pem().as_bytes(), "ca").expect("bundle");
    let server_id = SpiffeId::parse("spiffe://bulkhead.test/service/identity").expect("id");
    let server = identity(
        &ca.issue(&server_id, &SvidOptions::default()).expect("svid"),
        &ca,
    );
    static RULES: &[Rule] = &[Rule::new("GetTrustBundle", &[who::RUN])];
    let bound = MeshServer::new("identity", server, bundle.clone())
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

    let run_id = SpiffeId::parse("spiffe://bulkhead.test/tenant/acme/run/r-42").expect("id");
    let run = identity(
        &ca.issue(&run_id, &SvidOptions::default()).expect("svid"),
        &ca,
    );
    let ch =
        bulkhead_mesh::client::channel(&addr, Some(&run), &bundle, ExpectServer::Exact(server_id))
            .expect("channel");
    let mut client =
        bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient::new(ch);

    let root = tracing::info_span!("test.client_call");
    let client_trace = root
        .context()
        .span()
        .span_context()
        .trace_id()
        .to_bytes()
        .to_vec();
    let status = client
        .get_trust_bundle(bulkhead_proto::identity::v1::GetTrustBundleRequest::default())
        .instrument(root)
        .await
        .expect_err("stub answers unimplemented");
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    guard.shutdown();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let server_span = loop {
        let span = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("the collector received the server span in time")
            .expect("channel open");
        seen.push(span.name.clone());
        if span.name == "/bulkhead.identity.v1.IdentityService/GetTrustBundle" {
            break span;
        }
    };
    assert_eq!(
        attr(&server_span, "bulkhead.tenant").as_deref(),
        Some("acme"),
        "seen: {seen:?}"
    );
    assert_eq!(
        attr(&server_span, "bulkhead.run_id").as_deref(),
        Some("r-42")
    );
    assert_eq!(
        attr(&server_span, "bulkhead.caller").as_deref(),
        Some("spiffe://bulkhead.test/tenant/acme/run/r-42")
    );
    assert_eq!(
        server_span.trace_id, client_trace,
        "trace context crossed the hop"
    );
    assert!(
        !server_span.parent_span_id.is_empty(),
        "server span has the client's span as parent"
    );
}
