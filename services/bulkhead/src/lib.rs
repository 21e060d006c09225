//! The `bulkhead` command's verbs that tests drive directly: the audit verbs
//! and their offline export verification, identity, sealed-vault and the
//! dispatcher (agents, tasks, workers, pools).

#![forbid(unsafe_code)]

pub mod audit;
pub mod fleet;
pub mod identity;
pub mod sealed;
