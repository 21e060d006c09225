//! The web Audit view: a read-only HTML page of the log, newest first, with
//! the current signed tree head and whether it verifies.
//!
//! It is served over HTTPS with the service's own SVID on a port of its own.
//! Operators only: a client certificate whose SPIFFE ID is an operator, or the
//! operator token set at start (a bearer header, a `?token=` query that also
//! sets a cookie, or that cookie). Any other certificate is refused with 403,
//! anyone else gets 401; neither response carries data. Every value from the
//! log is HTML-escaped, and the page runs no script (its CSP forbids it).

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bulkhead_mesh::shutdown::DRAIN_DEADLINE;
use bulkhead_mesh::spiffe::{Principal, SpiffeId};
use bulkhead_mesh::svid;
use bulkhead_mesh::tls::{self, ClientAuth, Identity, RevocationCheck, TlsError, TrustBundle};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::checkpoint::TreeHead;
use crate::event::{self, Event, format_time_us};
use crate::log::Log;
use crate::store::{Filter, Page};

/// Events per page.
pub const PAGE_SIZE: u32 = 100;
/// The session cookie set after a `?token=` visit. `__Host-` makes browsers
/// insist on Secure, Path=/ and no Domain, so no other host can plant it.
pub const COOKIE: &str = "__Host-bulkhead-audit";
/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client gets to send a request's headers (slow clients would
/// otherwise hold connections open forever).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
                   base-uri 'none'; frame-ancestors 'none'";

/// The rustls config of the view: the gRPC server's (same SVID, same trust
/// bundle, same revocation list) with client certificates optional, since
/// browsers usually come with the token instead, and ALPN for browsers and curl.
pub fn tls_config(
    identity: &Identity,
    bundle: &TrustBundle,
    revocations: Arc<dyn RevocationCheck>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let base = tls::server_config(identity, bundle, ClientAuth::Optional, revocations)?;
    let mut config = (*base).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What the TLS layer learned about a connection; put into every request.
#[derive(Debug, Clone)]
struct Peer {
    /// The SPIFFE ID of a verified client certificate, if one was presented.
    id: Option<SpiffeId>,
    /// That certificate's serial, for the per-request revocation check.
    serial: Option<Vec<u8>>,
    remote: SocketAddr,
}

/// How an admitted request was admitted; shown on the page.
#[derive(Debug, Clone)]
enum Operator {
    Certificate(SpiffeId),
    Token,
}

struct WebState {
    log: Log,
    revocations: Arc<dyn RevocationCheck>,
    /// SHA-256 of the operator token: the token itself is not kept.
    token_digest: Option<[u8; 32]>,
    /// The cookie value that stands for the token (derived, so the browser's
    /// cookie jar does not hold the token itself).
    session: Option<String>,
}

impl std::fmt::Debug for WebState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebState")
            .field("log", &self.log)
            .field("token", &self.token_digest.map(|_| "[redacted]"))
            .finish()
    }
}

impl WebState {
    fn new(log: Log, revocations: Arc<dyn RevocationCheck>, token: Option<String>) -> Self {
        // An empty token would admit anyone who sends an empty one.
        let token = token.filter(|t| !t.is_empty());
        Self {
            log,
            revocations,
            token_digest: token
                .as_deref()
                .map(|t| Sha256::digest(t.as_bytes()).into()),
            session: token.as_deref().map(session_value),
        }
    }

    fn token_matches(&self, candidate: &str) -> bool {
        self.token_digest
            .is_some_and(|want| ct_eq(&Sha256::digest(candidate.as_bytes()), &want))
    }

    fn session_matches(&self, candidate: &str) -> bool {
        self.session.as_deref().is_some_and(|want| {
            ct_eq(
                &Sha256::digest(candidate.as_bytes()),
                &Sha256::digest(want.as_bytes()),
            )
        })
    }
}

fn session_value(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"bulkhead-audit-web-session-v1\0");
    h.update(token.as_bytes());
    hex::encode(h.finalize())
}

/// Compares two equal-length digests without an early exit, so the time
/// taken says nothing about where they differ. Callers hash first, which also
/// hides the length of the secret.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    diff == 0
}

/// Serves the view on `listener` until `shutdown` resolves, then drains open
/// connections for up to [`DRAIN_DEADLINE`]. `revocations` should be the
/// list `tls` was built with: the handshake checks it once, every request
/// checks it again, so a kept-alive connection cannot outlive a revocation.
pub async fn serve(
    log: Log,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    revocations: Arc<dyn RevocationCheck>,
    operator_token: Option<String>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let state = Arc::new(WebState::new(log, revocations, operator_token));
    let token_set = state.token_digest.is_some();
    let app = router(state);
    let acceptor = TlsAcceptor::from(tls);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    tracing::info!(addr = %local, operator_token = token_set, "serving the audit view");

    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "audit view accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%remote, error = %e, "audit view tls handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "audit view tls handshake timed out");
                    return;
                }
            };
            // The verifier has already checked chain, trust domain and SVID
            // rules; this only reads the ID back out.
            let leaf = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| svid::validate_leaf(leaf).ok());
            let peer = Peer {
                id: leaf.as_ref().map(|l| l.id.clone()),
                serial: leaf.map(|l| l.serial),
                remote,
            };
            let svc = app.map_request(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%remote, error = %e, "audit view connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(addr = %local, "audit view shutting down: draining");
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(addr = %local, "audit view drain deadline passed; closing");
    }
    Ok(())
}

fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/", get(index))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        // Added after the auth layer, so not behind it: probes carry no credentials.
        .route("/healthz", get(healthz))
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn not_found() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        "<p>There is no such page.</p>",
    )
}

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

#[derive(Debug, Default, Deserialize)]
struct TokenParam {
    token: Option<String>,
}

enum Access {
    Admitted {
        who: Operator,
        set_cookie: bool,
    },
    /// A certificate of the trust domain that is not an operator's.
    Forbidden(SpiffeId),
    /// A certificate revoked since its connection's handshake.
    Revoked(SpiffeId),
    /// No credential, or a wrong token.
    Unauthenticated {
        wrong_token: bool,
    },
}

fn decide(
    state: &WebState,
    peer: Option<&Peer>,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Access {
    // A certificate says who is calling; a non-operator one is refused even
    // with a token, so a tenant's credentials never open the whole log.
    if let Some(p) = peer
        && let Some(id) = &p.id
    {
        if state.revocations.revoked(id, p.serial.as_deref()) {
            return Access::Revoked(id.clone());
        }
        return match id.principal() {
            Principal::Operator { .. } => Access::Admitted {
                who: Operator::Certificate(id.clone()),
                set_cookie: false,
            },
            _ => Access::Forbidden(id.clone()),
        };
    }
    let mut wrong_token = false;
    if let Some(t) = bearer(headers) {
        if state.token_matches(t) {
            return Access::Admitted {
                who: Operator::Token,
                set_cookie: false,
            };
        }
        wrong_token = true;
    }
    if let Some(t) = query_token {
        if state.token_matches(t) {
            return Access::Admitted {
                who: Operator::Token,
                set_cookie: true,
            };
        }
        wrong_token = true;
    }
    if let Some(c) = cookie(headers, COOKIE) {
        if state.session_matches(c) {
            return Access::Admitted {
                who: Operator::Token,
                set_cookie: false,
            };
        }
        wrong_token = true;
    }
    Access::Unauthenticated { wrong_token }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

async fn authorize(State(state): State<Arc<WebState>>, mut req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>().cloned();
    let query_token = Query::<TokenParam>::try_from_uri(req.uri())
        .ok()
        .and_then(|q| q.0.token);
    let remote = peer.as_ref().map(|p| p.remote);
    match decide(&state, peer.as_ref(), req.headers(), query_token.as_deref()) {
        Access::Admitted { who, set_cookie } => {
            tracing::debug!(?remote, operator = ?who, path = req.uri().path(), "audit view request admitted");
            req.extensions_mut().insert(who);
            let mut res = next.run(req).await;
            if set_cookie && let Some(session) = &state.session {
                let value =
                    format!("{COOKIE}={session}; Path=/; Secure; HttpOnly; SameSite=Strict");
                if let Ok(v) = HeaderValue::from_str(&value) {
                    res.headers_mut().append(header::SET_COOKIE, v);
                }
            }
            res
        }
        Access::Forbidden(id) => {
            tracing::info!(?remote, peer = %id, "audit view refused a non-operator identity");
            page(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "<p>This identity may not read the audit log. The Audit view is for operators only.</p>",
            )
        }
        Access::Revoked(id) => {
            tracing::info!(?remote, peer = %id, "audit view refused a revoked certificate");
            page(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "<p>This certificate has been revoked.</p>",
            )
        }
        Access::Unauthenticated { wrong_token } => {
            tracing::info!(
                ?remote,
                wrong_token,
                "audit view refused an unauthenticated request"
            );
            let mut res = page(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "<p>The Audit view is for operators only. Present an operator client certificate, \
                 or the operator token as <code>Authorization: Bearer &lt;token&gt;</code> \
                 or <code>?token=&lt;token&gt;</code>.</p>",
            );
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"bulkhead-audit\""),
            );
            res
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct ViewParams {
    #[serde(default)]
    tenant: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    run: String,
    #[serde(default)]
    before: String,
}

async fn index(
    State(state): State<Arc<WebState>>,
    who: Option<axum::Extension<Operator>>,
    params: Result<Query<ViewParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "<p>The query string does not parse.</p>",
        );
    };
    if params.tenant.len() > event::MAX_ID_LEN
        || params.run.len() > event::MAX_ID_LEN
        || params.kind.len() > event::MAX_TYPE_LEN
    {
        return page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "<p>Filters are at most 128 bytes long.</p>",
        );
    }
    let before = match params.before.as_str() {
        "" => u64::MAX,
        s => match s.parse::<u64>() {
            Ok(n) => n,
            Err(_) => {
                return page(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    "<p><code>before</code> must be a sequence number.</p>",
                );
            }
        },
    };
    let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let filter = Filter {
        tenant: some(&params.tenant),
        type_prefix: some(&params.kind),
        run_id: some(&params.run),
        ..Filter::default()
    };
    // One more than a page tells whether an older page exists.
    let mut rows = match state
        .log
        .store()
        .query(&filter, Page::Before(before), PAGE_SIZE + 1)
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "audit view query failed");
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "<p>The audit store could not be read. Try again shortly.</p>",
            );
        }
    };
    let more = rows.len() > PAGE_SIZE as usize;
    rows.truncate(PAGE_SIZE as usize);
    let events: Vec<Event> = rows.into_iter().map(|r| r.event).collect();
    let head = head_status(&state.log);
    let who = who.map(|w| w.0);
    let body = render(
        &params,
        before,
        &events,
        more,
        &head,
        state.log.size(),
        who.as_ref(),
    );
    html(StatusCode::OK, body)
}

/// The latest signed tree head and what checking it found.
#[derive(Debug)]
struct HeadStatus {
    head: Option<TreeHead>,
    signature_ok: bool,
    root_ok: bool,
}

impl HeadStatus {
    fn verified(&self) -> bool {
        self.head.is_some() && self.signature_ok && self.root_ok
    }
}

fn head_status(log: &Log) -> HeadStatus {
    let Some(head) = log.latest_head() else {
        return HeadStatus {
            head: None,
            signature_ok: false,
            root_ok: false,
        };
    };
    let signature_ok = head.verify(&log.signer().public());
    // The signature alone would also pass a head over rows since rewritten:
    // the root must match the tree the service holds now.
    let root_ok = log.root_at(head.tree_size).is_ok_and(|r| r == head.root);
    if !(signature_ok && root_ok) {
        tracing::warn!(
            tree_size = head.tree_size,
            signature_ok,
            root_ok,
            "latest signed tree head does not verify"
        );
    }
    HeadStatus {
        head: Some(head),
        signature_ok,
        root_ok,
    }
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    push_escaped(&mut out, s);
    out
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// Escapes like [`push_escaped`], and lets the browser wrap a long SPIFFE ID
/// after a `/` rather than in the middle of a name.
fn push_escaped_breaking_at_slashes(out: &mut String, s: &str) {
    let mut parts = s.split('/').peekable();
    while let Some(part) = parts.next() {
        push_escaped(out, part);
        if parts.peek().is_some() {
            out.push_str("/<wbr>");
        }
    }
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved bytes).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A link to the view with these filters (and a page cursor), HTML-escaped
/// for an href.
fn view_href(p: &ViewParams, before: Option<u64>) -> String {
    let mut q = Vec::new();
    for (k, v) in [("tenant", &p.tenant), ("type", &p.kind), ("run", &p.run)] {
        if !v.is_empty() {
            q.push(format!("{k}={}", url_encode(v)));
        }
    }
    if let Some(b) = before {
        q.push(format!("before={b}"));
    }
    if q.is_empty() {
        "/".to_owned()
    } else {
        escape(&format!("/?{}", q.join("&")))
    }
}

const STYLE: &str = r#"
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1f2328; background: #fff; }
header { display: flex; align-items: baseline; justify-content: space-between; border-bottom: 1px solid #d0d7de; padding-bottom: 8px; margin-bottom: 16px; }
h1 { font-size: 20px; margin: 0; font-weight: 600; }
h2 { font-size: 15px; margin: 0 0 8px; font-weight: 600; }
.who { color: #59636e; font-size: 13px; }
.mono, .hash, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size: 12.5px; }
.hash { word-break: break-all; }
section.head { border: 1px solid #d0d7de; border-left-width: 6px; border-radius: 6px; padding: 12px 16px; margin-bottom: 16px; }
section.head.ok { border-left-color: #1a7f37; background: #f6fff8; }
section.head.bad { border-left-color: #cf222e; background: #fff5f5; }
section.head dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
section.head dt { color: #59636e; }
section.head dd { margin: 0; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; margin-left: 8px; vertical-align: 1px; }
.status.ok { background: #1a7f37; color: #fff; }
.status.bad { background: #cf222e; color: #fff; }
.note { color: #59636e; font-size: 12.5px; margin: 8px 0 0; }
form.filters { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-end; margin: 0 0 12px; }
form.filters label { display: flex; flex-direction: column; font-size: 12px; color: #59636e; gap: 2px; }
form.filters input { font: inherit; padding: 4px 8px; border: 1px solid #d0d7de; border-radius: 6px; min-width: 200px; }
form.filters button { font: inherit; padding: 4px 14px; border: 1px solid #1f2328; border-radius: 6px; background: #1f2328; color: #fff; cursor: pointer; }
.summary { color: #59636e; margin: 8px 0; display: flex; gap: 16px; }
a { color: #0969da; }
table.events { border-collapse: collapse; width: 100%; table-layout: auto; }
table.events th { text-align: left; font-weight: 600; font-size: 12px; color: #59636e; border-bottom: 2px solid #d0d7de; padding: 6px 8px; white-space: nowrap; }
table.events td { padding: 6px 8px; border-bottom: 1px solid #eaeef2; vertical-align: top; }
table.events tbody tr:nth-child(even) { background: #f6f8fa; }
td.seq { text-align: right; font-variant-numeric: tabular-nums; }
td.time { white-space: nowrap; }
td.actor { overflow-wrap: anywhere; min-width: 16em; }
td.run { white-space: nowrap; }
.outcome { font-weight: 600; }
.outcome.success { color: #1a7f37; }
.outcome.denied { color: #cf222e; }
.outcome.failure { color: #9a6700; }
ul.attrs { list-style: none; margin: 0; padding: 0; }
ul.attrs li { overflow-wrap: anywhere; }
ul.attrs .k { color: #59636e; }
.empty { color: #59636e; text-align: center; padding: 24px; }
nav.pager { margin: 12px 0; display: flex; gap: 16px; }
"#;

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn document(title: &str, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + STYLE.len() + 512);
    out.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    out.push_str("<title>");
    push_escaped(&mut out, title);
    out.push_str(" · Bulkhead audit</title><style>");
    out.push_str(STYLE);
    out.push_str("</style></head><body>");
    out.push_str(body);
    out.push_str("</body></html>\n");
    out
}

/// A short page without data, for refusals and errors. `message` is trusted
/// markup written in this file.
fn page(status: StatusCode, title: &str, message: &str) -> Response {
    let mut body = String::new();
    body.push_str("<header><h1>Bulkhead audit log</h1></header><main id=\"message\"><h2>");
    let _ = write!(body, "{} ", status.as_u16());
    push_escaped(&mut body, title);
    body.push_str("</h2>");
    body.push_str(message);
    body.push_str("</main>");
    html(status, document(title, &body))
}

fn render(
    params: &ViewParams,
    before: u64,
    events: &[Event],
    more: bool,
    head: &HeadStatus,
    log_size: u64,
    who: Option<&Operator>,
) -> String {
    let mut b = String::with_capacity(4096 + events.len() * 512);
    b.push_str("<header><h1>Bulkhead audit log</h1><div class=\"who\">");
    match who {
        Some(Operator::Certificate(id)) => {
            b.push_str("operator <span class=\"mono\">");
            push_escaped(&mut b, &id.to_string());
            b.push_str("</span>");
        }
        Some(Operator::Token) => b.push_str("operator (token)"),
        None => {}
    }
    b.push_str(" · read-only</div></header>");

    render_head(&mut b, head, log_size);

    b.push_str("<form class=\"filters\" method=\"get\" action=\"/\">");
    for (name, label, value, hint) in [
        ("tenant", "tenant", &params.tenant, "exact"),
        ("type", "type", &params.kind, "prefix, e.g. sealed."),
        ("run", "run", &params.run, "exact run id"),
    ] {
        let _ = write!(b, "<label>{label}<input name=\"{name}\" value=\"");
        push_escaped(&mut b, value);
        let _ = write!(b, "\" placeholder=\"{hint}\" maxlength=\"128\"></label>");
    }
    b.push_str("<button type=\"submit\">Filter</button><a href=\"/\">clear</a></form>");

    b.push_str("<div class=\"summary\">");
    match (events.first(), events.last()) {
        (Some(first), Some(last)) => {
            let _ = write!(
                b,
                "<span>{} events, sequences {} to {}, newest first</span>",
                events.len(),
                first.sequence,
                last.sequence
            );
        }
        _ => b.push_str("<span>no events</span>"),
    }
    b.push_str("</div>");

    b.push_str(
        "<table class=\"events\"><thead><tr><th>seq</th><th>time (UTC)</th><th>type</th>\
         <th>actor</th><th>tenant</th><th>run</th><th>outcome</th><th>attributes</th></tr></thead><tbody>",
    );
    if events.is_empty() {
        b.push_str(
            "<tr class=\"none\"><td class=\"empty\" colspan=\"8\">No events match.</td></tr>",
        );
    }
    for e in events {
        let _ = write!(
            b,
            "<tr class=\"event\" data-seq=\"{seq}\"><td class=\"seq mono\">{seq}</td><td class=\"time mono\">{time}</td><td class=\"type mono\">",
            seq = e.sequence,
            time = format_time_us(e.time_us),
        );
        push_escaped(&mut b, &e.kind);
        b.push_str("</td><td class=\"actor mono\">");
        push_escaped_breaking_at_slashes(&mut b, &e.actor);
        b.push_str("</td><td class=\"tenant\">");
        push_escaped(&mut b, &e.tenant);
        b.push_str("</td><td class=\"run mono\">");
        push_escaped(&mut b, &e.run_id);
        let outcome = e.outcome.as_str();
        let _ = write!(
            b,
            "</td><td class=\"outcome {outcome}\">{outcome}</td><td><ul class=\"attrs\">"
        );
        for (k, v) in &e.attributes {
            b.push_str("<li><span class=\"k mono\">");
            push_escaped(&mut b, k);
            b.push_str("</span>=<span class=\"v mono\">");
            push_escaped(&mut b, v);
            b.push_str("</span></li>");
        }
        b.push_str("</ul></td></tr>");
    }
    b.push_str("</tbody></table>");

    b.push_str("<nav class=\"pager\">");
    if before != u64::MAX {
        let _ = write!(
            b,
            "<a class=\"newest\" href=\"{}\">newest</a>",
            view_href(params, None)
        );
    }
    if more && let Some(last) = events.last() {
        let _ = write!(
            b,
            "<a class=\"older\" rel=\"next\" href=\"{}\">older →</a>",
            view_href(params, Some(last.sequence))
        );
    }
    b.push_str("</nav>");
    document("Events", &b)
}

fn render_head(b: &mut String, status: &HeadStatus, log_size: u64) {
    let verified = status.verified();
    let _ = write!(
        b,
        "<section id=\"tree-head\" class=\"head {}\" data-verified=\"{verified}\">",
        if verified { "ok" } else { "bad" }
    );
    let Some(head) = &status.head else {
        b.push_str(
            "<h2>Signed tree head<span class=\"status bad\">NOT VERIFIED</span></h2>\
             <p class=\"note\">No signed tree head yet: the service signs one within seconds of the first event.</p></section>",
        );
        return;
    };
    let _ = write!(
        b,
        "<h2>Signed tree head<span class=\"status {}\">{}</span></h2><dl>\
         <dt>tree size</dt><dd class=\"mono\" id=\"tree-size\">{}</dd>\
         <dt>root hash</dt><dd class=\"hash\" id=\"root-hash\">{}</dd>\
         <dt>timestamp</dt><dd class=\"mono\">{}</dd><dt>key id</dt><dd class=\"hash\">",
        if verified { "ok" } else { "bad" },
        if verified { "verified" } else { "NOT VERIFIED" },
        head.tree_size,
        hex::encode(head.root),
        format_time_us(
            i64::try_from(head.timestamp_ms)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000)
        ),
    );
    // The key id comes from the store, which an attacker may have edited.
    push_escaped(b, &head.key_id);
    b.push_str("</dd></dl><p class=\"note\">");
    let sig = if status.signature_ok {
        "signature valid under this service's public key"
    } else {
        "signature does NOT verify under this service's public key"
    };
    let root = if status.root_ok {
        "root equals the root recomputed from the log's leaves"
    } else {
        "root does NOT equal the root recomputed from the log's leaves"
    };
    let _ = write!(b, "{sig}; {root}.");
    if log_size > head.tree_size {
        let _ = write!(
            b,
            " The log holds {log_size} events; the {} newest are not yet covered by a signed head.",
            log_size - head.tree_size
        );
    }
    b.push_str("</p></section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_the_five_characters() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(escape("plain é ✓"), "plain é ✓");
        assert_eq!(escape(""), "");
        // Already-escaped text is escaped again, never passed through.
        assert_eq!(escape("&lt;"), "&amp;lt;");
    }

    #[test]
    fn spiffe_ids_wrap_at_slashes_and_stay_escaped() {
        let mut out = String::new();
        push_escaped_breaking_at_slashes(&mut out, "spiffe://td/a<b>/c");
        assert_eq!(out, "spiffe:/<wbr>/<wbr>td/<wbr>a&lt;b&gt;/<wbr>c");
    }

    #[test]
    fn url_encoding_leaves_only_unreserved_bytes() {
        assert_eq!(url_encode("acme"), "acme");
        assert_eq!(url_encode("<b>&\"' x"), "%3Cb%3E%26%22%27%20x");
        assert_eq!(url_encode("é"), "%C3%A9");
    }

    #[test]
    fn hrefs_keep_filters_and_are_escaped() {
        let p = ViewParams {
            tenant: "a&b".into(),
            kind: "sealed.".into(),
            ..ViewParams::default()
        };
        assert_eq!(
            view_href(&p, Some(7)),
            "/?tenant=a%26b&amp;type=sealed.&amp;before=7"
        );
        assert_eq!(view_href(&ViewParams::default(), None), "/");
    }

    #[test]
    fn constant_time_comparison_is_still_a_comparison() {
        assert!(ct_eq(&[1, 2, 3], &[1, 2, 3]));
        assert!(!ct_eq(&[1, 2, 3], &[1, 2, 4]));
        assert!(!ct_eq(&[9, 2, 3], &[1, 2, 3]));
        assert!(!ct_eq(&[1, 2], &[1, 2, 3]));
    }

    #[test]
    fn bearer_and_cookie_are_read_from_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  s3cret "),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-bulkhead-audit=abc"),
        );
        assert_eq!(bearer(&h), Some("s3cret"));
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        assert_eq!(bearer(&h), None);
    }
}
