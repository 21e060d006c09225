//! Logs, traces and metrics: `tracing` to stderr (pretty or JSON), and
//! OpenTelemetry OTLP/gRPC export of spans and of the [`crate::metrics`]
//! counters when an endpoint is configured (without one the meter is a no-op). W3C trace context travels in
//! gRPC metadata (`traceparent`), injected by [`TracePropagation`] on every
//! client and extracted by [`TraceLayer`] on every server. Every request span
//! carries `bulkhead.tenant` and `bulkhead.run_id` (empty when not tenant work).
//!
//! Spans and logs record names, IDs and fingerprints only: request bodies are
//! never recorded, so no secret value can reach an exporter from here.

use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tonic::body::Body;
use tracing::field::Empty;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::authz::PeerInfo;

/// Span field naming the tenant whose work a span is.
pub const TENANT_FIELD: &str = "bulkhead.tenant";
/// Span field naming the run whose work a span is.
pub const RUN_ID_FIELD: &str = "bulkhead.run_id";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info,bulkhead_mesh=debug`; `RUST_LOG` wins.
    pub log_filter: String,
    /// OTLP/gRPC collector for spans and metrics, e.g. `http://127.0.0.1:4317`;
    /// empty disables export. Metrics go every `OTEL_METRIC_EXPORT_INTERVAL`
    /// milliseconds (60 s by default) and once more at shutdown.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Pretty,
            log_filter: "info".into(),
            otlp_endpoint: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("otlp exporter: {0}")]
    Exporter(String),
    #[error("a global subscriber is already installed")]
    AlreadyInstalled,
}

/// Flushes and stops span and metric export when dropped (or on
/// [`TelemetryGuard::shutdown`]).
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
}

impl TelemetryGuard {
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.force_flush() {
                eprintln!("span flush failed: {e}");
            }
            if let Err(e) = p.shutdown() {
                eprintln!("span exporter shutdown failed: {e}");
            }
        }
        // Shutting the meter provider down exports what was counted since
        // the last interval.
        if let Some(m) = self.meters.take()
            && let Err(e) = m.shutdown()
        {
            eprintln!("metric exporter shutdown failed: {e}");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs the process's subscriber. Call once from `main`, inside a tokio runtime.
pub fn init(service: &str, cfg: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cfg.log_filter.clone()));
    let fmt = match cfg.log_format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(true)
            .boxed(),
    };
    let (otel, provider, meters) = match cfg.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(format!("bulkhead-{service}"))
                .build();
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.clone())
                .build();
            let tracer = provider.tracer(format!("bulkhead-{service}"));
            let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            let meters = SdkMeterProvider::builder()
                .with_periodic_exporter(metric_exporter)
                .with_resource(resource)
                .build();
            opentelemetry::global::set_meter_provider(meters.clone());
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                Some(provider),
                Some(meters),
            )
        }
        None => (None, None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider, meters })
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Records the tenant and run of the current span, for handlers whose tenant
/// comes from the request rather than the caller.
pub fn record_tenant_and_run(tenant: &str, run_id: Option<&str>) {
    let span = Span::current();
    span.record(TENANT_FIELD, tenant);
    if let Some(r) = run_id {
        span.record(RUN_ID_FIELD, r);
    }
}

/// Server side: one span per request, child of the caller's trace context.
#[derive(Debug, Clone, Default)]
pub struct TraceLayer;

impl<S> tower_layer::Layer<S> for TraceLayer {
    type Service = Traced<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Traced { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower_service::Service<http::Request<Body>> for Traced<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_owned();
        let span = tracing::info_span!(
            "grpc.request",
            otel.name = %path,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %path,
            bulkhead.caller = Empty,
            bulkhead.tenant = Empty,
            bulkhead.run_id = Empty,
        );
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(req.headers()))
        });
        let _ = span.set_parent(parent);
        if let Some(id) = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.id.as_ref())
        {
            span.record("bulkhead.caller", id.as_str());
            let principal = id.principal();
            if let Some(t) = principal.tenant() {
                span.record(TENANT_FIELD, t);
            }
            if let Some(r) = principal.run() {
                span.record(RUN_ID_FIELD, r);
            }
        }
        Box::pin(async move { inner.call(req).await }.instrument(span))
    }
}

/// Client side: injects the current span's W3C trace context into each request.
#[derive(Debug, Clone)]
pub struct TracePropagation<S> {
    inner: S,
}

impl<S> TracePropagation<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> tower_service::Service<http::Request<B>> for TracePropagation<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let cx = Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut HeaderInjector(req.headers_mut()))
        });
        self.inner.call(req)
    }
}
