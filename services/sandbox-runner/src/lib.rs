//! bulkhead-sandbox-runner: sandboxes on one worker host, credential injection and scrub.
//!
//! - [`service`]: the gRPC handlers and their authorization table.
//! - [`runner`]: start (token check, launch, resolve, audited injection,
//!   delivery), release and scrub, kills on hard revocations.
//! - [`assignment`]: what the dispatcher assigned a run, which is what runs.
//! - [`sandbox`]: the registry of sandboxes and each one's supervisor.
//! - [`backend`]: Docker (bollard) and the process backend.
//! - [`shim`]: the init shim that takes credentials on stdin and execs the agent.
//! - [`redact`]: output redaction of values and their encodings.
//! - [`output`], [`model`], [`config`], [`revocation`]: the rest.

#![forbid(unsafe_code)]

pub mod assignment;
pub mod backend;
pub mod config;
pub mod model;
pub mod output;
pub mod redact;
pub mod revocation;
pub mod runner;
pub mod sandbox;
pub mod service;
pub mod shim;
