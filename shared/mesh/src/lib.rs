//! What every Bulkhead service shares.
//!
//! - [`spiffe`]: SPIFFE IDs and the principals Bulkhead gives them to.
//! - [`svid`] and [`tls`]: X.509-SVID checks and the rustls mTLS configs built on them.
//! - [`authz`]: the per-service authorization table and the layer that enforces it.
//! - [`server`] and [`client`]: the one way to serve and to dial a mesh service.
//! - [`config`], [`error`], [`telemetry`], [`shutdown`]: the rest of a service's plumbing.
//! - [`metrics`]: the per-tenant counters exported over OTLP.
//! - [`pki`]: the dev CA and SVID issuance behind `bulkhead pki`.

#![forbid(unsafe_code)]

pub mod audit;
pub mod authz;
pub mod client;
pub mod config;
pub mod error;
pub mod jwt;
pub mod metrics;
pub mod pki;
pub mod revocation;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod spiffe;
pub mod svid;
pub mod telemetry;
pub mod tls;

pub use authz::{Caller, Policy, Rule};
pub use error::Error;
pub use spiffe::{Principal, SpiffeId, TrustDomain};
