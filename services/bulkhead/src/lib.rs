//! The `bulkhead` command's verbs that tests drive directly: the audit verbs
//! and their offline export verification, identity, sealed-vault and the
//! dispatcher (agents, tasks, workers, pools), and the demo (`bulkhead demo`
//! and the companion examples).

#![forbid(unsafe_code)]

pub mod audit;
pub mod demo;
pub mod fleet;
pub mod identity;
pub mod sealed;
