//! bulkhead-identity: the trust domain's CA, worker enrollment, per-run
//! identities (X.509-SVIDs and JWT-SVIDs) and the revocation list that every
//! service follows.

#![forbid(unsafe_code)]

pub mod config;
pub mod csr;
pub mod keys;
pub mod service;
pub mod store;
