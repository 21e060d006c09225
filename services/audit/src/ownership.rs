//! Which service may write which event types: the one table. The actor of an
//! event is the caller's SPIFFE ID; a service writing another's type is refused.

use bulkhead_mesh::spiffe::{Principal, SpiffeId};

/// Exact types owned by a service other than their prefix's owner.
const EXACT: &[(&str, &str)] = &[
    // Identity enrolls workers; the dispatcher owns the rest of worker.*.
    ("worker.enrolled", "identity"),
];

/// Type prefixes and the service that owns them.
const PREFIXES: &[(&str, &str)] = &[
    ("identity.", "identity"),
    ("sealed.", "sealed-vault"),
    ("fleet.", "dispatcher"),
    ("task.", "dispatcher"),
    ("agent.", "dispatcher"),
    ("worker.", "dispatcher"),
    ("sandbox.", "sandbox-runner"),
    ("run.", "sandbox-runner"),
];

/// The service that owns event type `t`, if any.
pub fn owner(t: &str) -> Option<&'static str> {
    EXACT
        .iter()
        .find(|(e, _)| *e == t)
        .or_else(|| PREFIXES.iter().find(|(p, _)| t.starts_with(p)))
        .map(|(_, s)| *s)
}

/// Whether `caller` may append events of type `t`.
pub fn may_write(caller: &SpiffeId, t: &str) -> bool {
    match (caller.principal(), owner(t)) {
        (Principal::Service { name }, Some(owner)) => name == owner,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://t/{s}")).expect("id")
    }

    #[test]
    fn each_type_has_one_owner() {
        assert!(may_write(
            &id("service/sealed-vault"),
            "sealed.credential.resolved"
        ));
        assert!(!may_write(
            &id("service/dispatcher"),
            "sealed.credential.resolved"
        ));
        assert!(may_write(&id("service/identity"), "worker.enrolled"));
        assert!(!may_write(&id("service/dispatcher"), "worker.enrolled"));
        assert!(may_write(&id("service/dispatcher"), "worker.registered"));
        assert!(may_write(
            &id("service/sandbox-runner/host-1"),
            "run.aborted_by_revocation"
        ));
        assert!(!may_write(&id("admin/alice"), "identity.revoked"));
        assert!(!may_write(&id("service/identity"), "audit.anything"));
    }
}
