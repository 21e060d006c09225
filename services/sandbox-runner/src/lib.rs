//! bulkhead-sandbox-runner: sandboxes on one worker host, credential injection and scrub.

#![forbid(unsafe_code)]

pub mod config;
pub mod service;
