//! Authorization, declared once per service and enforced in one place.
//!
//! Each service declares a table: for every RPC, which SPIFFE IDs may call it
//! and whether the request names a tenant that must be the caller's own. The
//! [`AuthzLayer`] enforces the table for every request before any handler runs:
//! a method missing from the table is denied, a caller matching none of the
//! method's patterns is denied, and a tenant-scoped caller (tenant client,
//! worker, run) whose request names another tenant is denied.
//!
//! Tenant-scoped requests carry the tenant as field 1 (`string tenant = 1`, the
//! API's convention); the layer reads it off the wire, so a handler cannot
//! forget the check. Operators and services have no tenant and may name any.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use tonic::body::Body;

use crate::error::Error;
use crate::spiffe::{Principal, SpiffeId, TrustDomain};
use crate::tls::RevocationCheck;

/// Identity patterns, as path globs under the trust domain: `*` is one segment,
/// a trailing `**` is one or more segments.
pub mod who {
    pub const OPERATOR: &str = "admin/*";
    pub const TENANT_CLIENT: &str = "tenant/*/client/*";
    pub const TENANT_WORKER: &str = "tenant/*/worker/*";
    pub const POOL_WORKER: &str = "pool/*/worker/*";
    pub const RUN: &str = "tenant/*/run/*";
    /// A run of an org-global pool's task.
    pub const POOL_RUN: &str = "pool/*/run/*";
    pub const IDENTITY: &str = "service/identity";
    pub const SEALED_VAULT: &str = "service/sealed-vault";
    pub const DISPATCHER: &str = "service/dispatcher";
    pub const AUDIT: &str = "service/audit";
    /// Every sandbox-runner, whatever its host.
    pub const SANDBOX_RUNNER: &str = "service/sandbox-runner/**";
    /// Any identity of the trust domain (health and reflection only).
    pub const ANYONE: &str = "**";
    /// A caller without a client certificate. Only a server built with
    /// `ClientAuth::Optional` lets such callers in at all, and only methods
    /// that authenticate by other means (a join token) may name them.
    pub const UNAUTHENTICATED: &str = "<unauthenticated>";
}

/// One method's rule.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// The RPC's name as in the proto, e.g. `Enqueue`.
    pub method: &'static str,
    /// Patterns from [`who`]; a caller matching any may call.
    pub allow: &'static [&'static str],
    /// Whether field 1 of the request is a tenant that a tenant-scoped caller
    /// must own. Only for unary and server-streaming RPCs (one request message).
    pub tenant_scoped: bool,
}

impl Rule {
    pub const fn new(method: &'static str, allow: &'static [&'static str]) -> Self {
        Self {
            method,
            allow,
            tenant_scoped: false,
        }
    }

    pub const fn tenant_scoped(mut self) -> Self {
        self.tenant_scoped = true;
        self
    }
}

/// A service's table: its fully-qualified gRPC service name and its rules.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub service: &'static str,
    pub rules: &'static [Rule],
}

/// The caller of a request, as authenticated by mTLS and authorized by the table.
/// Handlers read it with [`Caller::of`].
#[derive(Debug, Clone)]
pub struct Caller {
    pub id: SpiffeId,
    /// When the caller's certificate expires (seconds since the epoch), so
    /// that nothing issued to it outlives it.
    pub not_after: Option<i64>,
}

impl Caller {
    /// The authorized caller of `req`. Absent only if a service was served
    /// without the mesh layers, which the server builder does not allow.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| tonic::Status::unauthenticated("no authenticated caller"))
    }

    pub fn principal(&self) -> Principal<'_> {
        self.id.principal()
    }

    pub fn tenant(&self) -> Option<&str> {
        self.principal().tenant()
    }

    pub fn is_operator(&self) -> bool {
        matches!(self.principal(), Principal::Operator { .. })
    }
}

/// What the TLS layer learned about a connection's peer; tonic puts it in every
/// request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub id: Option<SpiffeId>,
    /// The client certificate's serial (big-endian), for revocation checks.
    pub serial: Option<Vec<u8>>,
    /// The client certificate's expiry, seconds since the epoch.
    pub not_after: Option<i64>,
    pub remote: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone)]
struct Pattern(Vec<String>);

impl Pattern {
    fn parse(p: &str) -> Self {
        Self(p.split('/').map(str::to_owned).collect())
    }

    fn is_unauthenticated(&self) -> bool {
        self.0.len() == 1 && self.0[0] == who::UNAUTHENTICATED
    }

    fn matches(&self, id: &SpiffeId) -> bool {
        if self.is_unauthenticated() {
            return false;
        }
        let segs: Vec<&str> = id.segments().collect();
        let pat = &self.0;
        if pat.last().is_some_and(|s| s == "**") {
            let fixed = &pat[..pat.len() - 1];
            return segs.len() > fixed.len() && seg_match(fixed, &segs[..fixed.len()]);
        }
        segs.len() == pat.len() && seg_match(pat, &segs)
    }
}

fn seg_match(pat: &[String], segs: &[&str]) -> bool {
    pat.iter().zip(segs).all(|(p, s)| p == "*" || p == s)
}

#[derive(Debug)]
struct CompiledRule {
    allow: Vec<Pattern>,
    tenant_scoped: bool,
}

/// The tables of everything one server serves, keyed by gRPC path.
#[derive(Debug, Clone)]
pub struct Table {
    trust_domain: TrustDomain,
    rules: Arc<HashMap<String, CompiledRule>>,
}

/// The services every server adds, open to any identity of the trust domain.
pub const OPEN_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

impl Table {
    pub fn new(trust_domain: TrustDomain, policies: &[Policy]) -> Self {
        let mut rules = HashMap::new();
        for p in policies {
            for r in p.rules {
                rules.insert(
                    format!("/{}/{}", p.service, r.method),
                    CompiledRule {
                        allow: r.allow.iter().map(|a| Pattern::parse(a)).collect(),
                        tenant_scoped: r.tenant_scoped,
                    },
                );
            }
        }
        for s in OPEN_SERVICES {
            rules.insert(
                format!("/{s}/*"),
                CompiledRule {
                    allow: vec![Pattern::parse(who::ANYONE)],
                    tenant_scoped: false,
                },
            );
        }
        Self {
            trust_domain,
            rules: Arc::new(rules),
        }
    }

    fn lookup(&self, path: &str) -> Option<&CompiledRule> {
        self.rules.get(path).or_else(|| {
            let (svc, _) = path.rsplit_once('/')?;
            self.rules.get(&format!("{svc}/*"))
        })
    }

    /// Decides a request by its path and caller (`None`: no client
    /// certificate), before its body is read. Returns whether the tenant field
    /// must then be checked.
    pub fn check(&self, path: &str, caller: Option<&SpiffeId>) -> Result<bool, Error> {
        let Some(caller) = caller else {
            return match self.lookup(path) {
                Some(rule) if rule.allow.iter().any(Pattern::is_unauthenticated) => Ok(false),
                _ => Err(Error::Unauthenticated(
                    "a client certificate is required".into(),
                )),
            };
        };
        if !caller.is_member_of(&self.trust_domain) {
            return Err(Error::denied("caller is not in this trust domain"));
        }
        let Some(rule) = self.lookup(path) else {
            return Err(Error::denied("method is not in the authorization table"));
        };
        if !rule.allow.iter().any(|p| p.matches(caller)) {
            return Err(Error::denied("caller may not call this method"));
        }
        Ok(rule.tenant_scoped && caller.principal().tenant().is_some())
    }
}

/// Largest request the layer buffers to read a tenant field.
pub const MAX_TENANT_SCOPED_REQUEST: usize = 4 * 1024 * 1024;

/// Told of every request the layer refuses, so a service can record refusals
/// in audit (best effort: the refusal itself never waits on it).
pub trait DenialSink: Send + Sync + std::fmt::Debug {
    fn denied(&self, caller: Option<&SpiffeId>, method: &str, reason: &str);
}

/// Tower layer enforcing a [`Table`]; the server builder always installs it.
/// It also re-checks revocation on every request, so a connection opened
/// before a revocation cannot outlive it.
#[derive(Debug, Clone)]
pub struct AuthzLayer {
    table: Table,
    revocations: Arc<dyn RevocationCheck>,
    denials: Option<Arc<dyn DenialSink>>,
}

impl AuthzLayer {
    pub fn new(
        table: Table,
        revocations: Arc<dyn RevocationCheck>,
        denials: Option<Arc<dyn DenialSink>>,
    ) -> Self {
        Self {
            table,
            revocations,
            denials,
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            table: self.table.clone(),
            revocations: self.revocations.clone(),
            denials: self.denials.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Authz<S> {
    inner: S,
    table: Table,
    revocations: Arc<dyn RevocationCheck>,
    denials: Option<Arc<dyn DenialSink>>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower_service::Service<http::Request<Body>> for Authz<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let table = self.table.clone();
        let revocations = self.revocations.clone();
        let denials = self.denials.clone();
        Box::pin(async move {
            let deny_and_tell = |caller: Option<&SpiffeId>, path: &str, err: Error| {
                if let (Some(sink), Error::PermissionDenied(reason)) = (&denials, &err) {
                    sink.denied(caller, path, reason);
                }
                deny(err)
            };
            let path = req.uri().path().to_owned();
            let (peer, serial, not_after) = req
                .extensions()
                .get::<PeerInfo>()
                .map(|p| (p.id.clone(), p.serial.clone(), p.not_after))
                .unwrap_or_default();
            if let Some(id) = &peer
                && revocations.revoked(id, serial.as_deref())
            {
                tracing::info!(caller = %id, method = %path, "revoked caller refused");
                return Ok(deny(Error::Unauthenticated("certificate revoked".into())));
            }
            let check_tenant = match table.check(&path, peer.as_ref()) {
                Ok(t) => t,
                Err(e) => {
                    let caller = peer.as_ref().map_or("<unauthenticated>", SpiffeId::as_str);
                    tracing::info!(caller, method = %path, reason = %e, "request refused");
                    return Ok(deny_and_tell(peer.as_ref(), &path, e));
                }
            };
            let Some(caller) = peer else {
                // Allowed without a certificate: the handler authenticates by other means.
                return inner.call(req).await;
            };
            if check_tenant {
                let want = caller.principal().tenant().unwrap_or_default().to_owned();
                let (parts, body) = req.into_parts();
                let bytes = match Limited::new(body, MAX_TENANT_SCOPED_REQUEST)
                    .collect()
                    .await
                {
                    Ok(c) => c.to_bytes(),
                    Err(_) => {
                        return Ok(deny(Error::invalid("request", "too large or unreadable")));
                    }
                };
                match request_tenant(&bytes) {
                    Ok(t) if t == want => {}
                    Ok(t) => {
                        tracing::info!(caller = %caller, method = %path, request_tenant = %t, "cross-tenant request refused");
                        return Ok(deny_and_tell(
                            Some(&caller),
                            &path,
                            Error::denied("request tenant is not the caller's tenant"),
                        ));
                    }
                    Err(e) => return Ok(deny(e)),
                }
                req = http::Request::from_parts(parts, Body::new(Full::new(bytes)));
            }
            req.extensions_mut().insert(Caller {
                id: caller.clone(),
                not_after,
            });
            // A response stream outlives the request's check: it ends when
            // its caller is revoked (tails, watches, claim streams).
            let resp = inner.call(req).await?;
            Ok(resp.map(|body| Body::new(RevocableBody::new(body, caller, serial, revocations))))
        })
    }
}

/// How often an open response stream re-checks its caller's revocation.
const STREAM_RECHECK: std::time::Duration = std::time::Duration::from_millis(200);

pin_project_lite::pin_project! {
    /// A response body that ends with UNAUTHENTICATED once its caller is revoked.
    struct RevocableBody {
        #[pin]
        inner: Body,
        id: SpiffeId,
        serial: Option<Vec<u8>>,
        check: Arc<dyn RevocationCheck>,
        tick: Pin<Box<tokio::time::Sleep>>,
        done: bool,
    }
}

impl RevocableBody {
    fn new(
        inner: Body,
        id: SpiffeId,
        serial: Option<Vec<u8>>,
        check: Arc<dyn RevocationCheck>,
    ) -> Self {
        Self {
            inner,
            id,
            serial,
            check,
            tick: Box::pin(tokio::time::sleep(STREAM_RECHECK)),
            done: false,
        }
    }
}

impl http_body::Body for RevocableBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if this.tick.as_mut().poll(cx).is_ready() {
            if this.check.revoked(this.id, this.serial.as_deref()) {
                *this.done = true;
                tracing::info!(caller = %this.id, "revoked caller's stream ended");
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("16"));
                trailers.insert(
                    "grpc-message",
                    http::HeaderValue::from_static("certificate%20revoked"),
                );
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
            }
            this.tick
                .as_mut()
                .reset(tokio::time::Instant::now() + STREAM_RECHECK);
            // Registers the waker for the next check.
            let _ = this.tick.as_mut().poll(cx);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(None) => {
                *this.done = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn deny(err: Error) -> http::Response<Body> {
    tonic::Status::from(err).into_http()
}

/// Reads field 1 (the tenant) of the single gRPC message in `body`.
fn request_tenant(body: &Bytes) -> Result<String, Error> {
    let bad = |why: &str| Error::invalid("request", why);
    if body.len() < 5 {
        return Err(bad("empty request"));
    }
    if body[0] != 0 {
        return Err(bad("compressed requests are not accepted"));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() != 5 + len {
        return Err(bad("expected exactly one message"));
    }
    let tenant = proto_field1_string(&body[5..]).map_err(|_| bad("malformed message"))?;
    let tenant = tenant.unwrap_or_default();
    if tenant.is_empty() {
        return Err(Error::invalid("tenant", "required"));
    }
    Ok(tenant)
}

/// The last occurrence of field 1 as a length-delimited UTF-8 string, scanning
/// the protobuf wire format without a schema.
fn proto_field1_string(mut msg: &[u8]) -> Result<Option<String>, ()> {
    let mut found = None;
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut msg)?;
            }
            1 => msg = msg.get(8..).ok_or(())?,
            5 => msg = msg.get(4..).ok_or(())?,
            2 => {
                let len = usize::try_from(varint(&mut msg)?).map_err(|_| ())?;
                let value = msg.get(..len).ok_or(())?;
                if field == 1 {
                    found = Some(std::str::from_utf8(value).map_err(|_| ())?.to_owned());
                }
                msg = &msg[len..];
            }
            _ => return Err(()),
        }
        if field == 1 && wire != 2 {
            return Err(());
        }
    }
    Ok(found)
}

fn varint(buf: &mut &[u8]) -> Result<u64, ()> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first().ok_or(())?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Req {
        #[prost(string, tag = "1")]
        tenant: String,
        #[prost(uint64, tag = "2")]
        n: u64,
        #[prost(bytes = "vec", tag = "3")]
        payload: Vec<u8>,
        #[prost(fixed64, tag = "4")]
        f: u64,
    }

    fn frame(msg: &[u8]) -> Bytes {
        let mut out = vec![0u8];
        out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        out.extend_from_slice(msg);
        Bytes::from(out)
    }

    #[test]
    fn reads_the_tenant_field_whatever_its_position() {
        let r = Req {
            tenant: "acme".into(),
            n: 300,
            payload: vec![1; 200],
            f: 7,
        };
        let got = request_tenant(&frame(&r.encode_to_vec())).expect("tenant");
        assert_eq!(got, "acme");
        // Fields in another order, and field 1 twice: the last one wins, as in proto3.
        let mut raw = Req {
            tenant: String::new(),
            n: 5,
            payload: vec![],
            f: 0,
        }
        .encode_to_vec();
        raw.extend(
            Req {
                tenant: "first".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        raw.extend(
            Req {
                tenant: "last".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        assert_eq!(request_tenant(&frame(&raw)).expect("tenant"), "last");
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert!(request_tenant(&Bytes::new()).is_err());
        let r = Req {
            tenant: "acme".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut two = frame(&r).to_vec();
        two.extend_from_slice(&frame(&r));
        assert!(request_tenant(&Bytes::from(two)).is_err(), "two messages");
        let mut compressed = frame(&r).to_vec();
        compressed[0] = 1;
        assert!(request_tenant(&Bytes::from(compressed)).is_err());
        assert!(
            request_tenant(&frame(&[0x0a, 0x10, b'a'])).is_err(),
            "truncated"
        );
        let empty = Req::default().encode_to_vec();
        assert!(request_tenant(&frame(&empty)).is_err(), "tenant required");
        assert!(
            request_tenant(&frame(&[0x08, 0x01])).is_err(),
            "field 1 as varint"
        );
    }

    #[test]
    fn patterns() {
        let id = |s: &str| SpiffeId::parse(s).expect("valid");
        let p = Pattern::parse(who::SANDBOX_RUNNER);
        assert!(p.matches(&id("spiffe://t/service/sandbox-runner/host-1")));
        assert!(!p.matches(&id("spiffe://t/service/sandbox-runner")));
        let p = Pattern::parse(who::TENANT_CLIENT);
        assert!(p.matches(&id("spiffe://t/tenant/acme/client/api")));
        assert!(!p.matches(&id("spiffe://t/tenant/acme/worker/api")));
        assert!(!p.matches(&id("spiffe://t/tenant/acme/client/api/x")));
        assert!(Pattern::parse(who::ANYONE).matches(&id("spiffe://t/admin/a")));
    }

    #[test]
    fn table_denies_missing_methods_and_foreign_callers() {
        static RULES: &[Rule] = &[
            Rule::new("Enqueue", &[who::TENANT_CLIENT, who::OPERATOR]).tenant_scoped(),
            Rule::new("Approve", &[who::OPERATOR]),
            Rule::new("Enroll", &[who::UNAUTHENTICATED]),
        ];
        let td = TrustDomain::parse("bulkhead.test").expect("td");
        let t = Table::new(
            td,
            &[Policy {
                service: "x.v1.S",
                rules: RULES,
            }],
        );
        let id = |s: &str| SpiffeId::parse(s).expect("valid");
        let client = id("spiffe://bulkhead.test/tenant/acme/client/api");
        let op = id("spiffe://bulkhead.test/admin/alice");
        assert_eq!(t.check("/x.v1.S/Enqueue", Some(&client)).ok(), Some(true));
        assert_eq!(t.check("/x.v1.S/Enqueue", Some(&op)).ok(), Some(false));
        assert!(t.check("/x.v1.S/Approve", Some(&client)).is_err());
        assert!(t.check("/x.v1.S/Missing", Some(&op)).is_err());
        assert!(
            t.check(
                "/x.v1.S/Approve",
                Some(&id("spiffe://other.test/admin/alice"))
            )
            .is_err()
        );
        assert!(
            t.check("/grpc.health.v1.Health/Check", Some(&client))
                .is_ok()
        );
        // Without a certificate: only methods that name UNAUTHENTICATED.
        assert_eq!(t.check("/x.v1.S/Enroll", None).ok(), Some(false));
        assert!(t.check("/x.v1.S/Approve", None).is_err());
        assert!(t.check("/grpc.health.v1.Health/Check", None).is_err());
        // A certified caller is not "unauthenticated".
        assert!(t.check("/x.v1.S/Enroll", Some(&client)).is_err());
    }
}
