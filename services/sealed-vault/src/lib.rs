//! bulkhead-sealed-vault: tenant profiles and secrets, encrypted at rest, resolved only for a live run.

#![forbid(unsafe_code)]

pub mod config;
pub mod service;
