//! Helpers shared by the audit tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use bulkhead_audit::event::{Event, NewEvent, Outcome};
use bulkhead_audit::store::StoredEvent;
use bulkhead_mesh::spiffe::SpiffeId;

pub fn service(name: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://bulkhead.test/service/{name}")).expect("id")
}

pub fn new_event(kind: &str, tenant: &str, run: &str, attrs: &[(&str, &str)]) -> NewEvent {
    NewEvent {
        kind: kind.into(),
        tenant: tenant.into(),
        run_id: run.into(),
        outcome: Outcome::Success,
        attributes: attrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

/// A stored event with sequence `seq`, as the log's writer would make it.
pub fn stored(
    seq: u64,
    kind: &str,
    tenant: &str,
    run: &str,
    actor: &str,
    time_us: i64,
) -> StoredEvent {
    let event = Event {
        sequence: seq,
        time_us,
        kind: kind.into(),
        actor: actor.into(),
        tenant: tenant.into(),
        run_id: run.into(),
        outcome: Outcome::Success,
        attributes: BTreeMap::from([("key".to_owned(), format!("K{seq}"))]),
    };
    let leaf_hash = event.leaf_hash();
    StoredEvent { event, leaf_hash }
}
