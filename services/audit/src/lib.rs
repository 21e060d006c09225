//! bulkhead-audit: the tamper-evident audit log.
//!
//! Events are appended by the mesh's services (each only its own types), kept
//! in SQLite or PostgreSQL, hashed into an RFC 9162 Merkle tree whose heads the
//! service signs with Ed25519, and read back with proofs over gRPC, as JSONL,
//! and in a web view.

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod config;
pub mod event;
pub mod log;
pub mod merkle;
pub mod ownership;
pub mod service;
pub mod store;
pub mod verify;
pub mod web;
