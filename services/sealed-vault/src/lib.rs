//! bulkhead-sealed-vault: tenant credentials encrypted at rest, resolved only
//! for a live run of the same tenant, from the built-in store, Vault/OpenBao
//! KV v2, AWS Secrets Manager or AWS Bedrock AgentCore Identity.

#![forbid(unsafe_code)]

pub mod backend;
pub mod cascade;
pub mod config;
pub mod crypto;
pub mod holdings;
pub mod secret;
pub mod service;
pub mod store;
