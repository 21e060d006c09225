//! SPIFFE IDs as the SPIFFE ID specification defines them, and the principals
//! Bulkhead names with them.
//!
//! `spiffe://<trust-domain>/<path>`: the trust domain is lowercase letters, digits,
//! `.`, `-` and `_`; each path segment is letters, digits, `.`, `-` and `_`, and is
//! neither empty, `.` nor `..`; no query, fragment, port, user info or
//! percent-encoding; at most 2048 bytes in all.

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID accepted, in bytes (the spec's limit for URIs).
pub const MAX_ID_LEN: usize = 2048;
/// The longest trust domain name accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("empty")]
    Empty,
    #[error("longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("scheme must be spiffe://")]
    Scheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("trust domain may hold only lowercase letters, digits, '.', '-' and '_'")]
    TrustDomainChar,
    #[error("path segments may hold only letters, digits, '.', '-' and '_'")]
    PathChar,
    #[error("path has an empty segment")]
    EmptySegment,
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    #[error("path must not end with '/'")]
    TrailingSlash,
}

/// A trust domain: the authority part of a SPIFFE ID.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        // Accept a bare name or its spiffe:// form without a path.
        let name = s.strip_prefix(SCHEME).unwrap_or(s);
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<td>`, carried by its CA.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            uri: format!("{SCHEME}{}", self.0),
            td_end: SCHEME.len() + self.0.len(),
        }
    }

    /// `spiffe://<td>/<segments...>`; each segment is validated.
    pub fn join<I, S>(&self, segments: I) -> Result<SpiffeId, SpiffeIdError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut uri = format!("{SCHEME}{}", self.0);
        for s in segments {
            uri.push('/');
            uri.push_str(s.as_ref());
        }
        SpiffeId::parse(&uri)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A validated SPIFFE ID.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset where the trust domain ends and the path begins.
    td_end: usize,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            uri: s.to_owned(),
            td_end: SCHEME.len() + td.len(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn trust_domain_name(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }

    /// The path, `""` for a trust domain's own ID, else starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[self.td_end..]
    }

    /// The path's segments (none for a trust domain's own ID).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path().split('/').skip(1)
    }

    /// What Bulkhead takes this identity to be.
    pub fn principal(&self) -> Principal<'_> {
        Principal::of(self)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(SpiffeIdError::TrustDomainChar);
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    for seg in path.split('/').skip(1) {
        validate_segment(seg)?;
    }
    Ok(())
}

/// Checks one path segment (the spec's rules, shared with [`TrustDomain::join`]).
pub fn validate_segment(seg: &str) -> Result<(), SpiffeIdError> {
    if seg.is_empty() {
        return Err(SpiffeIdError::EmptySegment);
    }
    if seg == "." || seg == ".." {
        return Err(SpiffeIdError::DotSegment);
    }
    if !seg
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(SpiffeIdError::PathChar);
    }
    Ok(())
}

/// The kinds of identity in a Bulkhead trust domain, read off the ID's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal<'a> {
    /// `/service/<name>[/<host>]`: one of the five services.
    Service { name: &'a str },
    /// `/admin/<name>`: an operator.
    Operator { name: &'a str },
    /// `/tenant/<t>/client/<name>`: a tenant's backend.
    TenantClient { tenant: &'a str, name: &'a str },
    /// `/tenant/<t>/worker/<id>`: a worker host enrolled for one tenant.
    TenantWorker { tenant: &'a str, worker: &'a str },
    /// `/pool/<p>/worker/<id>`: an org-global worker in a pool.
    PoolWorker { pool: &'a str, worker: &'a str },
    /// `/tenant/<t>/run/<run>`: one run's workload identity.
    Run { tenant: &'a str, run: &'a str },
    /// `/pool/<p>/run/<run>`: a run of an org-global pool's task.
    PoolRun { pool: &'a str, run: &'a str },
    /// `spiffe://<td>` itself: the trust domain's CA.
    TrustDomain,
    /// Anything else: valid SPIFFE, but no role in Bulkhead.
    Other,
}

impl<'a> Principal<'a> {
    pub fn of(id: &'a SpiffeId) -> Self {
        let segs: Vec<&'a str> = id.segments().collect();
        match segs.as_slice() {
            [] => Principal::TrustDomain,
            ["service", name] | ["service", name, _] => Principal::Service { name },
            ["admin", name] => Principal::Operator { name },
            ["tenant", tenant, "client", name] => Principal::TenantClient { tenant, name },
            ["tenant", tenant, "worker", worker] => Principal::TenantWorker { tenant, worker },
            ["tenant", tenant, "run", run] => Principal::Run { tenant, run },
            ["pool", pool, "worker", worker] => Principal::PoolWorker { pool, worker },
            ["pool", pool, "run", run] => Principal::PoolRun { pool, run },
            _ => Principal::Other,
        }
    }

    /// The tenant this principal acts for, if it is tenant-scoped.
    pub fn tenant(&self) -> Option<&'a str> {
        match *self {
            Principal::TenantClient { tenant, .. }
            | Principal::TenantWorker { tenant, .. }
            | Principal::Run { tenant, .. } => Some(tenant),
            _ => None,
        }
    }

    /// The run this principal is, if it is a run identity.
    pub fn run(&self) -> Option<&'a str> {
        match *self {
            Principal::Run { run, .. } | Principal::PoolRun { run, .. } => Some(run),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/service/identity",
            "spiffe://td_1-x.y/tenant/Acme/run/r-1.2_3",
            "spiffe://a/b",
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.as_str(), s);
        }
        let id = SpiffeId::parse("spiffe://bulkhead.test/tenant/acme/run/r1").expect("valid");
        assert_eq!(id.trust_domain_name(), "bulkhead.test");
        assert_eq!(id.path(), "/tenant/acme/run/r1");
        assert_eq!(
            id.principal(),
            Principal::Run {
                tenant: "acme",
                run: "r1"
            }
        );
    }

    #[test]
    fn rejects_invalid_ids() {
        let cases = [
            ("", SpiffeIdError::Empty),
            ("http://example.org/a", SpiffeIdError::Scheme),
            ("SPIFFE://example.org/a", SpiffeIdError::Scheme),
            ("spiffe://", SpiffeIdError::MissingTrustDomain),
            ("spiffe:///a", SpiffeIdError::MissingTrustDomain),
            ("spiffe://Example.org/a", SpiffeIdError::TrustDomainChar),
            (
                "spiffe://example.org:8080/a",
                SpiffeIdError::TrustDomainChar,
            ),
            (
                "spiffe://user@example.org/a",
                SpiffeIdError::TrustDomainChar,
            ),
            ("spiffe://example.org/", SpiffeIdError::TrailingSlash),
            ("spiffe://example.org/a/", SpiffeIdError::TrailingSlash),
            ("spiffe://example.org//a", SpiffeIdError::EmptySegment),
            ("spiffe://example.org/./a", SpiffeIdError::DotSegment),
            ("spiffe://example.org/a/..", SpiffeIdError::DotSegment),
            ("spiffe://example.org/a?x=1", SpiffeIdError::PathChar),
            ("spiffe://example.org/a#f", SpiffeIdError::PathChar),
            ("spiffe://example.org/a%20b", SpiffeIdError::PathChar),
        ];
        for (s, want) in cases {
            assert_eq!(SpiffeId::parse(s), Err(want), "{s:?}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_ID_LEN));
        assert_eq!(SpiffeId::parse(&long), Err(SpiffeIdError::TooLong));
    }

    #[test]
    fn principals() {
        let p = |s: &str| {
            let id = SpiffeId::parse(s).expect("valid");
            format!("{:?}", id.principal())
        };
        assert!(p("spiffe://t/service/identity").starts_with("Service"));
        assert!(p("spiffe://t/service/sandbox-runner/host1").starts_with("Service"));
        assert!(p("spiffe://t/admin/alice").starts_with("Operator"));
        assert!(p("spiffe://t/tenant/a/client/api").starts_with("TenantClient"));
        assert!(p("spiffe://t/tenant/a/worker/w1").starts_with("TenantWorker"));
        assert!(p("spiffe://t/pool/p/worker/w1").starts_with("PoolWorker"));
        assert!(p("spiffe://t/pool/p/run/r1").starts_with("PoolRun"));
        assert!(p("spiffe://t/tenant/a/other/x").starts_with("Other"));
        assert!(p("spiffe://t").starts_with("TrustDomain"));
    }

    fn td_strategy() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,40}"
    }
    fn seg_strategy() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,20}".prop_filter("no dot segments", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn roundtrips_every_valid_id(td in td_strategy(), segs in prop::collection::vec(seg_strategy(), 0..8)) {
            let mut s = format!("spiffe://{td}");
            for seg in &segs { s.push('/'); s.push_str(seg); }
            let id = SpiffeId::parse(&s).expect("generated ids are valid");
            prop_assert_eq!(id.as_str(), s.as_str());
            prop_assert_eq!(id.trust_domain_name(), td.as_str());
            prop_assert_eq!(id.segments().collect::<Vec<_>>(), segs.iter().map(String::as_str).collect::<Vec<_>>());
            let reparsed: SpiffeId = id.to_string().parse().expect("display parses");
            prop_assert_eq!(reparsed, id);
        }

        #[test]
        fn never_panics_and_accepts_only_the_grammar(s in "\\PC{0,64}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert!(s.starts_with("spiffe://"));
                prop_assert!(validate_trust_domain(id.trust_domain_name()).is_ok());
                prop_assert!(id.segments().all(|seg| validate_segment(seg).is_ok()));
            }
        }

        #[test]
        fn a_bad_byte_in_a_segment_is_refused(td in td_strategy(), seg in seg_strategy(), bad in "[^A-Za-z0-9._/-]") {
            let s = format!("spiffe://{td}/{seg}{bad}");
            prop_assert!(SpiffeId::parse(&s).is_err());
        }

        #[test]
        fn an_uppercase_trust_domain_is_refused(td in "[a-z]{0,10}[A-Z][a-z]{0,10}") {
            let s = format!("spiffe://{td}/x");
            prop_assert_eq!(SpiffeId::parse(&s), Err(SpiffeIdError::TrustDomainChar));
        }
    }
}
