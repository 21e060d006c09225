//! The per-tenant counters Bulkhead exports over OTLP (see [`crate::telemetry`]):
//! what operators roll up by tenant on the Grafana dashboard in `deploy/`.
//!
//! | instrument | kind | attributes |
//! |---|---|---|
//! | `bulkhead.tasks` | counter | `bulkhead.tenant` (or `bulkhead.pool`), `bulkhead.status` (final) |
//! | `bulkhead.resolutions` | counter | `bulkhead.tenant`, `bulkhead.outcome` |
//! | `bulkhead.sandbox.seconds` | histogram (s) | `bulkhead.tenant` |
//!
//! Attributes are tenant names, statuses and outcomes only: never an ID with
//! unbounded cardinality (task, run) and never anything secret.
//!
//! The instruments bind to the global meter provider the first time one is
//! used, so [`crate::telemetry::init`] must run first (every `main` does);
//! without an OTLP endpoint the provider is the no-op one.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

use crate::telemetry::TENANT_FIELD;

/// The pool of a pool task (which has no tenant).
pub const POOL_FIELD: &str = "bulkhead.pool";
/// A task's final status: `succeeded`, `failed`, `cancelled`, ...
pub const STATUS_FIELD: &str = "bulkhead.status";
/// What a resolution came to: `resolved`, or the refusal's code.
pub const OUTCOME_FIELD: &str = "bulkhead.outcome";

struct Instruments {
    tasks: Counter<u64>,
    resolutions: Counter<u64>,
    sandbox_seconds: Histogram<f64>,
}

fn instruments() -> &'static Instruments {
    static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
    INSTRUMENTS.get_or_init(|| {
        let meter = opentelemetry::global::meter("bulkhead");
        Instruments {
            tasks: meter
                .u64_counter("bulkhead.tasks")
                .with_description("tasks that reached a final status")
                .build(),
            resolutions: meter
                .u64_counter("bulkhead.resolutions")
                .with_description("credential resolutions asked of sealed-vault, by outcome")
                .build(),
            sandbox_seconds: meter
                .f64_histogram("bulkhead.sandbox.seconds")
                .with_unit("s")
                .with_description("sandbox lifetime, from start to release")
                .with_boundaries(vec![
                    0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
                ])
                .build(),
        }
    })
}

/// A task of `tenant` (or of org-global `pool`, with an empty tenant) reached
/// the final `status`.
pub fn task_finished(tenant: &str, pool: &str, status: &str) {
    let mut attrs = vec![
        KeyValue::new(TENANT_FIELD, tenant.to_owned()),
        KeyValue::new(STATUS_FIELD, status.to_owned()),
    ];
    if !pool.is_empty() {
        attrs.push(KeyValue::new(POOL_FIELD, pool.to_owned()));
    }
    instruments().tasks.add(1, &attrs);
}

/// sealed-vault answered a Resolve for `tenant` with `outcome`.
pub fn resolution(tenant: &str, outcome: &str) {
    instruments().resolutions.add(
        1,
        &[
            KeyValue::new(TENANT_FIELD, tenant.to_owned()),
            KeyValue::new(OUTCOME_FIELD, outcome.to_owned()),
        ],
    );
}

/// The outcome attribute of an answer: `resolved`, or the refusal's gRPC code
/// in snake case (`permission_denied`, `unavailable`, ...).
pub fn outcome_of<T>(r: &Result<T, crate::Error>) -> &'static str {
    use tonic::Code;
    match r {
        Ok(_) => "resolved",
        Err(e) => match e.code() {
            Code::InvalidArgument => "invalid_argument",
            Code::PermissionDenied => "permission_denied",
            Code::Unauthenticated => "unauthenticated",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::FailedPrecondition => "failed_precondition",
            Code::ResourceExhausted => "resource_exhausted",
            Code::Unavailable => "unavailable",
            _ => "internal",
        },
    }
}

/// A sandbox of `tenant` was released after living `lifetime`.
pub fn sandbox_released(tenant: &str, lifetime: Duration) {
    instruments().sandbox_seconds.record(
        lifetime.as_secs_f64(),
        &[KeyValue::new(TENANT_FIELD, tenant.to_owned())],
    );
}
