//! The `bulkhead` command's verbs that tests drive directly: the audit verbs
//! and their offline export verification.

#![forbid(unsafe_code)]

pub mod audit;
pub mod identity;
pub mod sealed;
