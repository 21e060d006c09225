//! Where generated types stop: requests become domain types here, naming the
//! bad field, and rows become responses.

use bulkhead_mesh::error::Error;
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::sealed::v1 as sealed;
use prost::Message;

use crate::model::{AgentRow, Labels, Scope, TaskRow, TaskStatus, WorkerRow};

pub const MAX_LABELS: usize = 64;
const MAX_LABEL_KEY: usize = 128;
const MAX_LABEL_VALUE: usize = 128;
const MAX_IDEMPOTENCY_KEY: usize = 128;
const MAX_COMMAND_ARGS: usize = 256;
const MAX_COMMAND_BYTES: usize = 64 * 1024;
const MAX_SECRET_KEYS: usize = 256;
const MAX_REASON: usize = 512;
const MAX_SUMMARY: usize = 4096;

/// Labels off the wire: bounded, keys of `[A-Za-z0-9._/-]`.
pub fn labels(
    field: &'static str,
    map: std::collections::HashMap<String, String>,
) -> Result<Labels, Error> {
    if map.len() > MAX_LABELS {
        return Err(Error::invalid(
            field,
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    for (k, v) in &map {
        if k.is_empty() || k.len() > MAX_LABEL_KEY {
            return Err(Error::invalid(field, "a key must be 1 to 128 bytes"));
        }
        if !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
        {
            return Err(Error::invalid(field, "a key may hold only [A-Za-z0-9._/-]"));
        }
        if v.len() > MAX_LABEL_VALUE {
            return Err(Error::invalid(field, "a value must be at most 128 bytes"));
        }
    }
    Ok(map.into_iter().collect())
}

/// The reserved keys `tenant` and `pool` must agree with the scope.
pub fn check_reserved_labels(labels: &Labels, scope: &Scope) -> Result<(), Error> {
    for (key, own) in [("tenant", scope.tenant()), ("pool", scope.pool())] {
        if let Some(v) = labels.get(key)
            && v != own
        {
            return Err(Error::denied(format!(
                "label {key:?} does not match the caller's identity"
            )));
        }
    }
    Ok(())
}

fn name(field: &'static str, s: &str, extra: &[u8]) -> Result<(), Error> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "must be 1 to 64 bytes of [a-z0-9._-], starting with a letter or digit",
        ))
    }
}

pub fn agent_name(field: &'static str, s: &str) -> Result<(), Error> {
    name(field, s, b"._-")
}

pub fn agent_version(field: &'static str, s: &str) -> Result<(), Error> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "must be 1 to 64 bytes of [A-Za-z0-9._+-]",
        ))
    }
}

pub fn text(field: &'static str, s: &str, max: usize) -> Result<(), Error> {
    if s.len() > max {
        Err(Error::invalid(field, format!("at most {max} bytes")))
    } else {
        Ok(())
    }
}

pub fn reason(field: &'static str, s: &str, required: bool) -> Result<(), Error> {
    if required && s.trim().is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    text(field, s, MAX_REASON)
}

/// A secret key name as sealed-vault knows them.
fn secret_key(field: &'static str, s: &str) -> Result<(), Error> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "a key must be 1 to 128 bytes of [A-Za-z0-9_], not starting with a digit",
        ))
    }
}

/// An agent version as submitted, before the store and the submitter's stamp.
pub fn submitted_agent(
    req: pb::SubmitAgentRequest,
    by: &str,
    now_ms: i64,
) -> Result<AgentRow, Error> {
    agent_name("name", &req.name)?;
    agent_version("version", &req.version)?;
    if req.image.is_empty() || req.image.len() > 512 {
        return Err(Error::invalid("image", "must be 1 to 512 bytes"));
    }
    if req.command.len() > MAX_COMMAND_ARGS
        || req.command.iter().map(String::len).sum::<usize>() > MAX_COMMAND_BYTES
    {
        return Err(Error::invalid(
            "command",
            "at most 256 arguments and 64 KiB",
        ));
    }
    if req.requested_secret_keys.len() > MAX_SECRET_KEYS {
        return Err(Error::invalid("requested_secret_keys", "at most 256 keys"));
    }
    for k in &req.requested_secret_keys {
        secret_key("requested_secret_keys", k)?;
    }
    let tool = if req.tool.is_empty() {
        req.name.clone()
    } else {
        req.tool
    };
    name("tool", &tool, b"._-")?;
    text("description", &req.description, 4096)?;
    let mut keys = req.requested_secret_keys;
    keys.sort();
    keys.dedup();
    Ok(AgentRow {
        name: req.name,
        version: req.version,
        image: req.image,
        command: req.command,
        requested_secret_keys: keys,
        tool,
        description: req.description,
        status: crate::model::AgentStatus::Pending,
        submitted_by: by.to_owned(),
        submitted_at_ms: now_ms,
        decided_by: String::new(),
        decided_at_ms: None,
        decision_reason: String::new(),
    })
}

/// An enqueue request, checked.
#[derive(Debug, Clone)]
pub struct EnqueueSpec {
    pub scope: Scope,
    pub agent: String,
    pub agent_version: String,
    pub labels: Labels,
    pub cascade: Option<sealed::Cascade>,
    pub payload: Vec<u8>,
    pub priority: i32,
    pub idempotency_key: String,
    pub timeout_ms: i64,
    pub max_attempts: u32,
    /// SHA-256 over the request as given, to tell a retry from a reused key.
    pub request_hash: Vec<u8>,
}

pub fn enqueue_spec(req: pb::EnqueueRequest, max_payload: usize) -> Result<EnqueueSpec, Error> {
    let request_hash = request_hash(&req);
    let scope = Scope::from_columns(&req.tenant, &req.pool)
        .ok_or_else(|| Error::invalid("tenant", "exactly one of tenant and pool must be set"))?;
    agent_name("agent", &req.agent)?;
    if !req.agent_version.is_empty() {
        agent_version("agent_version", &req.agent_version)?;
    }
    let labels = labels("labels", req.labels)?;
    check_reserved_labels(&labels, &scope)?;
    if matches!(scope, Scope::Pool(_)) && req.cascade.is_some() {
        return Err(Error::invalid(
            "cascade",
            "pool tasks carry no tenant credentials",
        ));
    }
    if req.payload.len() > max_payload {
        return Err(Error::invalid(
            "payload",
            format!("at most {max_payload} bytes"),
        ));
    }
    if !(-100..=100).contains(&req.priority) {
        return Err(Error::invalid("priority", "must be -100 to 100"));
    }
    if req.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(Error::invalid("idempotency_key", "at most 128 bytes"));
    }
    let timeout_ms = match req.timeout {
        None => 3_600_000,
        Some(d) => {
            let ms = d
                .seconds
                .saturating_mul(1000)
                .saturating_add(i64::from(d.nanos) / 1_000_000);
            if d.nanos < 0 || !(1_000..=86_400_000).contains(&ms) {
                return Err(Error::invalid("timeout", "must be 1 second to 24 hours"));
            }
            ms
        }
    };
    let max_attempts = match req.max_attempts {
        0 => 3,
        n @ 1..=10 => n,
        _ => return Err(Error::invalid("max_attempts", "at most 10")),
    };
    Ok(EnqueueSpec {
        scope,
        agent: req.agent,
        agent_version: req.agent_version,
        labels,
        cascade: req.cascade,
        payload: req.payload.to_vec(),
        priority: req.priority,
        idempotency_key: req.idempotency_key,
        timeout_ms,
        max_attempts,
        request_hash,
    })
}

/// SHA-256 over a canonical form of the request. Protobuf maps encode in no
/// fixed order (labels, cascade overrides), so the wire bytes of one request
/// sent twice may differ; this hashes every field with the maps sorted.
pub fn request_hash(req: &pb::EnqueueRequest) -> Vec<u8> {
    use sha2::Digest as _;
    fn put(h: &mut sha2::Sha256, bytes: &[u8]) {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    }
    let mut h = sha2::Sha256::new();
    put(&mut h, b"bulkhead.dispatcher.v1.EnqueueRequest/1");
    put(&mut h, req.tenant.as_bytes());
    put(&mut h, req.pool.as_bytes());
    put(&mut h, req.agent.as_bytes());
    put(&mut h, req.agent_version.as_bytes());
    let labels: std::collections::BTreeMap<&String, &String> = req.labels.iter().collect();
    put(&mut h, &(labels.len() as u64).to_be_bytes());
    for (k, v) in labels {
        put(&mut h, k.as_bytes());
        put(&mut h, v.as_bytes());
    }
    match &req.cascade {
        None => put(&mut h, b"-"),
        Some(c) => {
            for level in [&c.system, &c.agent, &c.run] {
                match level {
                    None => put(&mut h, b"-"),
                    Some(l) => {
                        put(&mut h, b"+");
                        put(
                            &mut h,
                            &l.profile
                                .as_ref()
                                .map(Message::encode_to_vec)
                                .unwrap_or_default(),
                        );
                        let overrides: std::collections::BTreeMap<_, _> =
                            l.overrides.iter().collect();
                        put(&mut h, &(overrides.len() as u64).to_be_bytes());
                        for (k, v) in overrides {
                            put(&mut h, k.as_bytes());
                            put(&mut h, &v.encode_to_vec());
                        }
                    }
                }
            }
        }
    }
    put(&mut h, &req.payload);
    put(&mut h, &req.priority.to_be_bytes());
    put(&mut h, req.idempotency_key.as_bytes());
    put(
        &mut h,
        &req.timeout
            .map(|d| Message::encode_to_vec(&d))
            .unwrap_or_default(),
    );
    put(&mut h, &req.max_attempts.to_be_bytes());
    h.finalize().to_vec()
}

/// A report's summary, bounded (cut at a char boundary).
pub fn summary(s: &str) -> &str {
    if s.len() <= MAX_SUMMARY {
        return s;
    }
    let mut end = MAX_SUMMARY;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

pub fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

pub fn task(row: &TaskRow, with_payload: bool) -> pb::Task {
    let (tenant, pool) = row.scope.columns();
    pb::Task {
        tenant: tenant.to_owned(),
        pool: pool.to_owned(),
        task_id: row.task_id.clone(),
        agent: row.agent.clone(),
        agent_version: row.agent_version.clone(),
        labels: row
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cascade: if row.cascade.is_empty() {
            None
        } else {
            sealed::Cascade::decode(row.cascade.as_slice()).ok()
        },
        payload: if with_payload {
            row.payload.clone().into()
        } else {
            Default::default()
        },
        payload_size: row.payload_size,
        priority: row.priority,
        idempotency_key: row.idempotency_key.clone(),
        // Nobody is shown a held task; were one shown, it would be queued.
        status: match row.status {
            TaskStatus::Held => TaskStatus::Queued as i32,
            s => s as i32,
        },
        status_reason: row.status_reason.clone(),
        attempt: row.attempt,
        max_attempts: row.max_attempts,
        worker_id: row.worker_id.clone(),
        run_id: row.run_id.clone(),
        secret_keys: row.secret_keys.clone(),
        outcome: row.outcome as i32,
        exit_code: row.exit_code,
        output_summary: row.output_summary.clone(),
        timeout: Some(duration(u64::try_from(row.timeout_ms).unwrap_or(0))),
        created_at: Some(ts(row.created_at_ms)),
        updated_at: Some(ts(row.updated_at_ms)),
        finished_at: row.finished_at_ms.map(ts),
    }
}

pub fn agent(row: &AgentRow) -> pb::Agent {
    pb::Agent {
        name: row.name.clone(),
        version: row.version.clone(),
        image: row.image.clone(),
        command: row.command.clone(),
        requested_secret_keys: row.requested_secret_keys.clone(),
        tool: row.tool.clone(),
        description: row.description.clone(),
        status: row.status as i32,
        submitted_by: row.submitted_by.clone(),
        submitted_at: Some(ts(row.submitted_at_ms)),
        decided_by: row.decided_by.clone(),
        decided_at: row.decided_at_ms.map(ts),
        decision_reason: row.decision_reason.clone(),
    }
}

pub fn worker(row: &WorkerRow, running: u32) -> pb::Worker {
    let (tenant, pool) = row.scope.columns();
    pb::Worker {
        worker_id: row.worker_id.clone(),
        spiffe_id: row.spiffe_id.clone(),
        tenant: tenant.to_owned(),
        pool: pool.to_owned(),
        labels: row
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        max_concurrent_runs: row.max_concurrent_runs,
        sandbox_backends: row.sandbox_backends.clone(),
        state: row.state as i32,
        running,
        version: row.version.clone(),
        registered_at: Some(ts(row.registered_at_ms)),
        last_heartbeat_at: Some(ts(row.last_heartbeat_at_ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_named() {
        let ok: std::collections::HashMap<_, _> =
            [("project/x.y".to_owned(), "p1".to_owned())].into();
        assert!(labels("labels", ok).is_ok());
        let bad: std::collections::HashMap<_, _> = [("a b".to_owned(), String::new())].into();
        let err = labels("labels", bad).expect_err("refused");
        assert!(err.to_string().starts_with("invalid labels"), "{err}");
        let many = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(labels("labels", many).is_err());
    }

    #[test]
    fn reserved_labels_must_match_the_scope() {
        let scope = Scope::Tenant("acme".into());
        let mut l = Labels::new();
        l.insert("tenant".into(), "acme".into());
        assert!(check_reserved_labels(&l, &scope).is_ok());
        l.insert("tenant".into(), "globex".into());
        assert!(check_reserved_labels(&l, &scope).is_err());
        let mut p = Labels::new();
        p.insert("pool".into(), "shared".into());
        assert!(check_reserved_labels(&p, &scope).is_err());
    }

    #[test]
    fn enqueue_bounds_name_their_field() {
        let base = pb::EnqueueRequest {
            tenant: "acme".into(),
            agent: "coder".into(),
            ..Default::default()
        };
        assert!(enqueue_spec(base.clone(), 16).is_ok());
        let big = pb::EnqueueRequest {
            payload: vec![0; 17].into(),
            ..base.clone()
        };
        assert!(
            enqueue_spec(big, 16)
                .expect_err("refused")
                .to_string()
                .contains("payload")
        );
        let both = pb::EnqueueRequest {
            pool: "p".into(),
            ..base.clone()
        };
        assert!(enqueue_spec(both, 16).is_err());
        let prio = pb::EnqueueRequest {
            priority: 101,
            ..base.clone()
        };
        assert!(
            enqueue_spec(prio, 16)
                .expect_err("refused")
                .to_string()
                .contains("priority")
        );
        let att = pb::EnqueueRequest {
            max_attempts: 11,
            ..base
        };
        assert!(
            enqueue_spec(att, 16)
                .expect_err("refused")
                .to_string()
                .contains("max_attempts")
        );
    }

    #[test]
    fn the_request_hash_ignores_map_order_and_sees_every_field() {
        let labels: Vec<(String, String)> = (0..16)
            .map(|i| (format!("k{i}"), format!("v{i}")))
            .collect();
        let a = pb::EnqueueRequest {
            tenant: "acme".into(),
            agent: "coder".into(),
            labels: labels.iter().cloned().collect(),
            ..Default::default()
        };
        let b = pb::EnqueueRequest {
            labels: labels.iter().rev().cloned().collect(),
            ..a.clone()
        };
        assert_eq!(request_hash(&a), request_hash(&b));
        let c = pb::EnqueueRequest {
            payload: b"x".to_vec().into(),
            ..a.clone()
        };
        assert_ne!(request_hash(&a), request_hash(&c));
        let d = pb::EnqueueRequest {
            priority: 1,
            ..a.clone()
        };
        assert_ne!(request_hash(&a), request_hash(&d));
    }

    #[test]
    fn summaries_are_cut_on_a_char_boundary() {
        let s = "é".repeat(3000);
        let cut = summary(&s);
        assert!(cut.len() <= 4096);
        assert!(s.starts_with(cut));
    }
}
