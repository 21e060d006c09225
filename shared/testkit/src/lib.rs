//! Test kit: real servers for real tests.
//!
//! - [`external`]: PostgreSQL, Redis, OpenBao and moto, started on random
//!   loopback ports in temp dirs; a missing program skips loudly, or fails
//!   under `BULKHEAD_REQUIRE_EXTERNAL=1`.
//! - [`mesh`]: the five Bulkhead binaries with a fresh PKI.
//! - [`docker`]: the Docker engine and the locally built test agent image.

#![forbid(unsafe_code)]

pub mod docker;
pub mod external;
pub mod mesh;
