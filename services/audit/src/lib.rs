//! bulkhead-audit: the tamper-evident audit log.

#![forbid(unsafe_code)]

pub mod config;
pub mod service;
