//! Audit events: what a service asks to record ([`NewEvent`]), what the log
//! holds ([`Event`]), and the leaf bytes hashed into the tree — the RFC 8785
//! canonical JSON of the event, as the API documents it, so that any language
//! can recompute a leaf hash from an export.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bulkhead_mesh::Error;
use bulkhead_proto::audit::v1 as pb;

use crate::merkle::{self, Hash};

/// Longest event type, in bytes.
pub const MAX_TYPE_LEN: usize = 128;
/// Most attributes on one event.
pub const MAX_ATTRIBUTES: usize = 32;
pub const MAX_ATTRIBUTE_KEY_LEN: usize = 64;
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 1024;
/// Longest tenant or run id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Most events in one Append.
pub const MAX_BATCH: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    Denied,
    Failure,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
            Outcome::Failure => "failure",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "success" => Some(Outcome::Success),
            "denied" => Some(Outcome::Denied),
            "failure" => Some(Outcome::Failure),
            _ => None,
        }
    }

    pub fn to_pb(self) -> pb::Outcome {
        match self {
            Outcome::Success => pb::Outcome::Success,
            Outcome::Denied => pb::Outcome::Denied,
            Outcome::Failure => pb::Outcome::Failure,
        }
    }
}

/// An event as a service submits it; audit adds sequence, time and actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub kind: String,
    pub tenant: String,
    pub run_id: String,
    pub outcome: Outcome,
    pub attributes: BTreeMap<String, String>,
}

/// An event as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub sequence: u64,
    /// Microseconds since the Unix epoch.
    pub time_us: i64,
    pub kind: String,
    pub actor: String,
    pub tenant: String,
    pub run_id: String,
    pub outcome: Outcome,
    pub attributes: BTreeMap<String, String>,
}

/// Checks an event type: 2 to 8 dot-separated segments of [a-z0-9_].
pub fn validate_type(t: &str) -> Result<(), String> {
    if t.len() > MAX_TYPE_LEN {
        return Err(format!("longer than {MAX_TYPE_LEN} bytes"));
    }
    let segs: Vec<&str> = t.split('.').collect();
    if !(2..=8).contains(&segs.len()) {
        return Err("must have 2 to 8 dot-separated segments".into());
    }
    if segs.iter().any(|s| {
        s.is_empty()
            || !s
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }) {
        return Err("segments may hold only [a-z0-9_] and must not be empty".into());
    }
    Ok(())
}

fn validate_id(field: &'static str, v: &str) -> Result<(), Error> {
    if v.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!("longer than {MAX_ID_LEN} bytes"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(Error::invalid(field, "control characters are not allowed"));
    }
    Ok(())
}

impl TryFrom<pb::NewEvent> for NewEvent {
    type Error = Error;

    fn try_from(pb: pb::NewEvent) -> Result<Self, Error> {
        validate_type(&pb.r#type).map_err(|e| Error::invalid("events.type", e))?;
        validate_id("events.tenant", &pb.tenant)?;
        validate_id("events.run_id", &pb.run_id)?;
        let outcome = match pb::Outcome::try_from(pb.outcome) {
            Ok(pb::Outcome::Success) => Outcome::Success,
            Ok(pb::Outcome::Denied) => Outcome::Denied,
            Ok(pb::Outcome::Failure) => Outcome::Failure,
            _ => return Err(Error::invalid("events.outcome", "must be set")),
        };
        if pb.attributes.len() > MAX_ATTRIBUTES {
            return Err(Error::invalid(
                "events.attributes",
                format!("more than {MAX_ATTRIBUTES}"),
            ));
        }
        for (k, v) in &pb.attributes {
            let key_ok = !k.is_empty()
                && k.len() <= MAX_ATTRIBUTE_KEY_LEN
                && k.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.'
                });
            if !key_ok {
                return Err(Error::invalid(
                    "events.attributes",
                    "keys are 1 to 64 bytes of [a-z0-9_.]",
                ));
            }
            if v.len() > MAX_ATTRIBUTE_VALUE_LEN {
                return Err(Error::invalid(
                    "events.attributes",
                    format!("values are at most {MAX_ATTRIBUTE_VALUE_LEN} bytes"),
                ));
            }
        }
        Ok(NewEvent {
            kind: pb.r#type,
            tenant: pb.tenant,
            run_id: pb.run_id,
            outcome,
            attributes: pb.attributes.into_iter().collect(),
        })
    }
}

/// RFC 3339 in UTC with exactly six fractional digits and `Z`.
pub fn format_time_us(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let t =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        micros
    )
}

/// Parses what [`format_time_us`] writes.
pub fn parse_time_us(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).ok()
}

/// Appends `s` as a JSON string the way RFC 8785 (ECMAScript) serializes it.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    // Most strings need no escaping: copy them whole (Verify's hot path).
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The canonical JSON of an attributes map (keys sorted, RFC 8785 strings);
/// also the form the stores keep, so Verify can splice it into the leaf
/// without parsing it.
pub fn attributes_json(attributes: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(64);
    out.push('{');
    for (i, (k, v)) in attributes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(&mut out, k);
        out.push(':');
        json_string(&mut out, v);
    }
    out.push('}');
    out
}

/// The fields of a leaf as stored, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct LeafParts<'a> {
    pub actor: &'a str,
    /// Already canonical (as [`attributes_json`] writes it).
    pub attributes_json: &'a str,
    pub outcome: &'a str,
    pub run_id: &'a str,
    pub sequence: u64,
    pub tenant: &'a str,
    /// The time as [`format_time_us`] writes it.
    pub time: &'a str,
    pub kind: &'a str,
}

/// Writes the leaf of an event from its stored parts.
pub fn leaf_from_parts(p: &LeafParts<'_>) -> String {
    let mut out = String::with_capacity(160 + p.attributes_json.len());
    write_leaf(&mut out, p);
    out
}

/// Appends the leaf of an event to `out` (Verify reuses one buffer).
pub fn write_leaf(out: &mut String, p: &LeafParts<'_>) {
    out.push_str("{\"actor\":");
    json_string(out, p.actor);
    out.push_str(",\"attributes\":");
    out.push_str(p.attributes_json);
    out.push_str(",\"outcome\":");
    json_string(out, p.outcome);
    out.push_str(",\"run_id\":");
    json_string(out, p.run_id);
    let _ = write!(out, ",\"sequence\":{}", p.sequence);
    out.push_str(",\"tenant\":");
    json_string(out, p.tenant);
    out.push_str(",\"time\":");
    json_string(out, p.time);
    out.push_str(",\"type\":");
    json_string(out, p.kind);
    out.push('}');
}

impl Event {
    /// The leaf: RFC 8785 canonical JSON of {actor, attributes, outcome,
    /// run_id, sequence, tenant, time, type}. Member names are ASCII, so
    /// sorting by bytes is sorting by UTF-16 code units as RFC 8785 asks.
    pub fn leaf(&self) -> String {
        leaf_from_parts(&LeafParts {
            actor: &self.actor,
            attributes_json: &attributes_json(&self.attributes),
            outcome: self.outcome.as_str(),
            run_id: &self.run_id,
            sequence: self.sequence,
            tenant: &self.tenant,
            time: &format_time_us(self.time_us),
            kind: &self.kind,
        })
    }

    pub fn leaf_hash(&self) -> Hash {
        merkle::leaf_hash(self.leaf().as_bytes())
    }

    /// The event from its leaf object (as exported), checking every member.
    pub fn from_leaf_json(v: &serde_json::Value) -> Option<Self> {
        let o = v.as_object()?;
        let s = |k: &str| o.get(k)?.as_str().map(str::to_owned);
        let attributes = o
            .get("attributes")?
            .as_object()?
            .iter()
            .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect::<Option<BTreeMap<_, _>>>()?;
        Some(Event {
            sequence: o.get("sequence")?.as_u64()?,
            time_us: parse_time_us(&s("time")?)?,
            kind: s("type")?,
            actor: s("actor")?,
            tenant: s("tenant")?,
            run_id: s("run_id")?,
            outcome: Outcome::parse(&s("outcome")?)?,
            attributes,
        })
    }

    pub fn to_pb(&self) -> pb::Event {
        let secs = self.time_us.div_euclid(1_000_000);
        let nanos = (self.time_us.rem_euclid(1_000_000) * 1000) as i32;
        pb::Event {
            sequence: self.sequence,
            time: Some(prost_types::Timestamp {
                seconds: secs,
                nanos,
            }),
            r#type: self.kind.clone(),
            actor: self.actor.clone(),
            tenant: self.tenant.clone(),
            run_id: self.run_id.clone(),
            outcome: self.outcome.to_pb() as i32,
            attributes: self.attributes.clone().into_iter().collect(),
            leaf_hash: self.leaf_hash().to_vec().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        Event {
            sequence: 42,
            time_us: 1_764_201_600_123_456,
            kind: "sealed.credential.resolved".into(),
            actor: "spiffe://bulkhead.test/service/sealed-vault".into(),
            tenant: "acme".into(),
            run_id: "r-1".into(),
            outcome: Outcome::Success,
            attributes: [
                ("keys".to_owned(), "ANTHROPIC_API_KEY".to_owned()),
                ("fp".to_owned(), "ab\"c\\\n\u{1}é".to_owned()),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn the_leaf_is_canonical_json() {
        let leaf = sample().leaf();
        assert_eq!(
            leaf,
            r#"{"actor":"spiffe://bulkhead.test/service/sealed-vault","attributes":{"fp":"ab\"c\\\n\u0001é","keys":"ANTHROPIC_API_KEY"},"outcome":"success","run_id":"r-1","sequence":42,"tenant":"acme","time":"2025-11-27T00:00:00.123456Z","type":"sealed.credential.resolved"}"#
        );
        // Any JSON parser reads it back to the same event, and re-encoding is stable.
        let v: serde_json::Value = serde_json::from_str(&leaf).expect("json");
        let back = Event::from_leaf_json(&v).expect("event");
        assert_eq!(back, sample());
        assert_eq!(back.leaf(), leaf);
    }

    #[test]
    fn types_are_checked() {
        assert!(validate_type("sealed.credential.resolved").is_ok());
        assert!(validate_type("a.b").is_ok());
        for bad in [
            "sealed",
            "Sealed.x",
            "a..b",
            ".a",
            "a.b.",
            "a.b-c",
            "a.b.c.d.e.f.g.h.i",
        ] {
            assert!(validate_type(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn time_formatting_round_trips() {
        for us in [
            0,
            1,
            999_999,
            1_764_201_600_000_001,
            253_402_300_799_999_999,
        ] {
            assert_eq!(parse_time_us(&format_time_us(us)), Some(us), "{us}");
        }
        assert_eq!(format_time_us(0), "1970-01-01T00:00:00.000000Z");
    }
}
