//! bulkhead-identity: the trust domain's CA, worker enrollment, per-run identities and revocation.

#![forbid(unsafe_code)]

pub mod config;
pub mod service;
