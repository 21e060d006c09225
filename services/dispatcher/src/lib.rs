//! bulkhead-dispatcher: tenant-scoped fleet dispatch over streaming claims.

#![forbid(unsafe_code)]

pub mod config;
pub mod model;
pub mod service;
pub mod store;
