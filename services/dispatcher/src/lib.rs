//! bulkhead-dispatcher: tenant-scoped fleet dispatch over streaming claims.

#![forbid(unsafe_code)]

pub mod config;
pub mod convert;
pub mod engine;
pub mod model;
pub mod service;
pub mod store;
pub mod wake;
