//! `bulkhead identity`: the operator's verbs on the identity service.
//!
//! - `join-token create|list|revoke`: the tokens workers enroll with. A token's
//!   secret is printed once, when it is made; identity keeps only its hash.
//! - `revoke`: a run, a worker, a whole tenant or one certificate serial.
//! - `revocations`: the current revocation list.
//! - `bundle`: the trust bundle (X.509 authorities and JWT keys), printed or
//!   written as `bundle.pem` and `jwks.json`.
//!
//! Every verb finds the mesh through `--dir DIR` (or `BULKHEAD_DIR`) and calls
//! identity over mTLS as the operator named in `DIR/endpoints.json`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use bulkhead_cluster::Endpoints;
use bulkhead_mesh::client::MeshChannel;
use bulkhead_mesh::tls::ExpectServer;
use bulkhead_proto::identity::v1 as pb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use clap::{ArgGroup, Subcommand};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::audit::MeshDir;

/// The largest page the list RPCs serve.
const MAX_PAGE: u32 = 1000;
/// How many pages a listing follows before it gives up (a service handing out
/// page tokens forever must not keep the CLI running forever).
const MAX_PAGES: usize = 10_000;

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Join tokens: what workers enroll with.
    #[command(subcommand)]
    JoinToken(JoinTokenCommand),
    /// Revokes a run, a worker, a whole tenant or one certificate serial; the
    /// shared verifier of every service refuses it from then on.
    #[command(group(
        ArgGroup::new("target")
            .required(true)
            .args(["run", "worker", "whole_tenant", "serial"])
    ))]
    Revoke {
        #[command(flatten)]
        mesh: MeshDir,
        /// The tenant the target belongs to: required with --whole-tenant, left
        /// out for a pool's runs and workers, optional with --serial (when
        /// given, the certificate must be the tenant's).
        #[arg(long)]
        tenant: Option<String>,
        /// A run, by id: its X.509-SVID and every JWT-SVID minted for it.
        #[arg(long, value_name = "RUN_ID")]
        run: Option<String>,
        /// A worker, by id, and every run identity it holds.
        #[arg(long, value_name = "WORKER_ID")]
        worker: Option<String>,
        /// Every identity of the tenant: clients, workers and runs, new ones
        /// included.
        #[arg(long, requires = "tenant")]
        whole_tenant: bool,
        /// One certificate, by serial (hex), issued by identity or not.
        #[arg(long, value_name = "HEX")]
        serial: Option<String>,
        /// Why; recorded in audit and shown in the revocation list.
        #[arg(long)]
        reason: String,
        /// Also kill the sandboxes running under the revoked identities now
        /// (default: refuse them from now on, let running sandboxes finish).
        #[arg(long)]
        hard: bool,
    },
    /// Prints the trust bundle; with --out, writes bundle.pem and jwks.json.
    Bundle {
        #[command(flatten)]
        mesh: MeshDir,
        /// Directory to write bundle.pem (the X.509 authorities) and jwks.json
        /// (the JWT keys) into; made if missing.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Prints the current revocation list, oldest first.
    Revocations {
        #[command(flatten)]
        mesh: MeshDir,
        /// Only this tenant's entries.
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum JoinTokenCommand {
    /// Makes a join token for one tenant or one pool and prints it, once.
    #[command(group(ArgGroup::new("scope").required(true).args(["tenant", "pool"])))]
    Create {
        #[command(flatten)]
        mesh: MeshDir,
        /// Workers enrolled with it belong to this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Workers enrolled with it belong to this org-global pool.
        #[arg(long)]
        pool: Option<String>,
        /// How long it works: a number and a unit (s, m, h, d), e.g. 30m, 1h, 7d.
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many workers may enroll with it.
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u32).range(1..))]
        max_uses: u32,
        /// Free text for operators (at most 256 bytes).
        #[arg(long)]
        description: Option<String>,
    },
    /// Lists join tokens (never their secrets): by default the usable ones.
    List {
        #[command(flatten)]
        mesh: MeshDir,
        /// Only this tenant's tokens.
        #[arg(long, conflicts_with = "pool")]
        tenant: Option<String>,
        /// Only this pool's tokens.
        #[arg(long)]
        pool: Option<String>,
        /// Include expired, used-up and revoked tokens.
        #[arg(long)]
        all: bool,
    },
    /// Revokes a join token: no further worker enrolls with it (workers already
    /// enrolled keep their identities; revoke them with `identity revoke`).
    Revoke {
        #[command(flatten)]
        mesh: MeshDir,
        /// The token's id (as `join-token list` shows it).
        #[arg(value_name = "TOKEN_ID")]
        token_id: String,
        /// Why; recorded in audit.
        #[arg(long)]
        reason: String,
    },
}

pub async fn run(cmd: IdentityCommand) -> anyhow::Result<()> {
    match cmd {
        IdentityCommand::JoinToken(JoinTokenCommand::Create {
            mesh,
            tenant,
            pool,
            ttl,
            max_uses,
            description,
        }) => {
            create_token(
                &mesh.dir,
                pb::CreateJoinTokenRequest {
                    tenant: tenant.unwrap_or_default(),
                    pool: pool.unwrap_or_default(),
                    ttl: Some(proto_duration(ttl)),
                    max_uses,
                    description: description.unwrap_or_default(),
                },
            )
            .await
        }
        IdentityCommand::JoinToken(JoinTokenCommand::List {
            mesh,
            tenant,
            pool,
            all,
        }) => {
            list_tokens(
                &mesh.dir,
                tenant.unwrap_or_default(),
                pool.unwrap_or_default(),
                all,
            )
            .await
        }
        IdentityCommand::JoinToken(JoinTokenCommand::Revoke {
            mesh,
            token_id,
            reason,
        }) => revoke_token(&mesh.dir, token_id, reason).await,
        IdentityCommand::Revoke {
            mesh,
            tenant,
            run,
            worker,
            whole_tenant,
            serial,
            reason,
            hard,
        } => {
            use pb::revoke_request::Target;
            let target = match (run, worker, serial) {
                (Some(r), _, _) => Target::RunId(r),
                (_, Some(w), _) => Target::WorkerId(w),
                (_, _, Some(s)) => Target::Serial(s),
                _ if whole_tenant => Target::WholeTenant(true),
                _ => bail!("name what to revoke: --run, --worker, --whole-tenant or --serial"),
            };
            revoke(
                &mesh.dir,
                pb::RevokeRequest {
                    tenant: tenant.unwrap_or_default(),
                    target: Some(target),
                    reason,
                    hard,
                },
            )
            .await
        }
        IdentityCommand::Bundle { mesh, out } => bundle(&mesh.dir, out.as_deref()).await,
        IdentityCommand::Revocations { mesh, tenant } => {
            revocations(&mesh.dir, tenant.unwrap_or_default()).await
        }
    }
}

// ---------------------------------------------------------------------------
// Durations and times.

/// Parses `30s`, `10m`, `1h`, `7d`: a positive whole number and one unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const HINT: &str = "a number and a unit (s, m, h or d), e.g. 30s, 10m, 1h, 7d";
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    if number.is_empty() || unit.is_empty() {
        return Err(format!("{s:?} is not a duration: expected {HINT}"));
    }
    let unit_secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        _ => {
            return Err(format!(
                "{s:?} has an unknown unit {unit:?}: expected {HINT}"
            ));
        }
    };
    let secs = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_secs))
        .filter(|secs| i64::try_from(*secs).is_ok())
        .ok_or_else(|| format!("{s:?} is too long"))?;
    if secs == 0 {
        return Err(format!("{s:?} is not a positive duration: expected {HINT}"));
    }
    Ok(Duration::from_secs(secs))
}

/// A whole number of seconds in the largest unit that divides it: 90s, 10m, 7d.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => "0s".into(),
        s if s.is_multiple_of(24 * 3600) => format!("{}d", s / (24 * 3600)),
        s if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        s if s.is_multiple_of(60) => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// RFC 3339 in UTC to the second; `-` when unset.
fn when(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        None => "-".into(),
        Some(t) => {
            let full = bulkhead_audit::event::format_time_us(t.seconds.saturating_mul(1_000_000));
            // format_time_us writes six fractional digits; whole seconds suffice here.
            match full.split_once('.') {
                Some((secs, _)) => format!("{secs}Z"),
                None => full,
            }
        }
    }
}

/// Free text as printed: control characters escaped, the rest as is.
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.is_empty() {
        "-".into()
    } else if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A value as printed in a table: as is when it is one plain word, else quoted
/// with control characters escaped (values come from the service and from
/// other operators, and must not drive the terminal).
fn plain(s: &str) -> std::borrow::Cow<'_, str> {
    if s.is_empty() {
        "-".into()
    } else if s
        .chars()
        .all(|c| !c.is_control() && !c.is_whitespace() && c != '"' && c != '\\')
    {
        s.into()
    } else {
        format!("{s:?}").into()
    }
}

// ---------------------------------------------------------------------------
// Talking to identity.

fn load_endpoints(dir: &Path) -> anyhow::Result<Endpoints> {
    let path = Endpoints::path(dir);
    if !path.is_file() {
        bail!(
            "no mesh at {}: {} does not exist (start one with `bulkhead dev up --dir {}`, or pass \
             --dir / BULKHEAD_DIR)",
            dir.display(),
            path.display(),
            dir.display()
        );
    }
    Endpoints::load(dir).with_context(|| format!("failed to read {}", path.display()))
}

/// Dials the identity service as the operator named in `endpoints.json`.
async fn connect(dir: &Path) -> anyhow::Result<IdentityServiceClient<MeshChannel>> {
    let endpoints = load_endpoints(dir)?;
    let addr = endpoints.address("identity").with_context(|| {
        format!(
            "{} names no identity service",
            Endpoints::path(dir).display()
        )
    })?;
    let (identity, bundle) = endpoints
        .operator()
        .context("failed to load the operator certificate named in endpoints.json")?;
    let channel = bulkhead_mesh::client::connect(
        addr,
        Some(&identity),
        &bundle,
        ExpectServer::Service("identity".into()),
    )
    .await
    .with_context(|| {
        format!("cannot reach the identity service at {addr} (is the mesh running?)")
    })?;
    Ok(IdentityServiceClient::new(channel))
}

/// A refused or failed RPC as an error that names the RPC, the code and the
/// service's message, with what the code means for the operator.
fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> anyhow::Error {
    move |s| {
        let hint = match s.code() {
            tonic::Code::PermissionDenied => {
                " (the certificate in endpoints.json is not allowed to do this; operators are \
                 spiffe://<td>/admin/*)"
            }
            tonic::Code::Unavailable => {
                " (nothing was done: identity, or the audit log or store it needs, cannot be \
                 reached)"
            }
            _ => "",
        };
        anyhow::anyhow!(
            "identity {what} failed: {:?}: {}{hint}",
            s.code(),
            if s.message().is_empty() {
                "(no message)"
            } else {
                s.message()
            }
        )
    }
}

// ---------------------------------------------------------------------------
// Join tokens.

fn scope(tenant: &str, pool: &str) -> String {
    if tenant.is_empty() {
        format!("pool/{pool}")
    } else {
        format!("tenant/{tenant}")
    }
}

fn token_status(t: &pb::JoinToken, now: i64) -> &'static str {
    if t.revoked_at.is_some() {
        "revoked"
    } else if t.expires_at.as_ref().is_none_or(|e| e.seconds <= now) {
        "expired"
    } else if t.uses >= t.max_uses {
        "used-up"
    } else {
        "active"
    }
}

async fn create_token(dir: &Path, req: pb::CreateJoinTokenRequest) -> anyhow::Result<()> {
    let ttl = req.ttl.as_ref().map_or(0, |d| d.seconds);
    let mut client = connect(dir).await?;
    let resp = client
        .create_join_token(req)
        .await
        .map_err(rpc("CreateJoinToken"))?
        .into_inner();
    let t = resp
        .join_token
        .context("identity answered CreateJoinToken without the token's metadata")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "join token {} for {}",
        t.token_id,
        scope(&t.tenant, &t.pool)
    )?;
    writeln!(
        out,
        "  expires:  {} (in {})",
        when(t.expires_at.as_ref()),
        format_duration(Duration::from_secs(u64::try_from(ttl).unwrap_or(0)))
    )?;
    writeln!(out, "  max uses: {}", t.max_uses)?;
    if !t.description.is_empty() {
        writeln!(out, "  description: {}", printable(&t.description))?;
    }
    writeln!(out, "token: {}", resp.token)?;
    writeln!(
        out,
        "this is the only time the token is shown: identity keeps only its hash. Hand it to the \
         worker (bulkhead-worker --join-token, or BULKHEAD_JOIN_TOKEN) as a secret."
    )?;
    Ok(())
}

async fn list_tokens(dir: &Path, tenant: String, pool: String, all: bool) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let mut tokens = Vec::new();
    let mut page_token = String::new();
    for _ in 0..MAX_PAGES {
        let resp = client
            .list_join_tokens(pb::ListJoinTokensRequest {
                tenant: tenant.clone(),
                pool: pool.clone(),
                include_inactive: all,
                page_size: MAX_PAGE,
                page_token: page_token.clone(),
            })
            .await
            .map_err(rpc("ListJoinTokens"))?
            .into_inner();
        tokens.extend(resp.join_tokens);
        if resp.next_page_token.is_empty() {
            return print_tokens(&tokens, all);
        }
        if resp.next_page_token == page_token {
            bail!("identity returned the same page token twice");
        }
        page_token = resp.next_page_token;
    }
    bail!("more than {MAX_PAGES} pages of join tokens; narrow the listing with --tenant or --pool")
}

fn print_tokens(tokens: &[pb::JoinToken], all: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if tokens.is_empty() {
        writeln!(out, "no {}join tokens", if all { "" } else { "usable " })?;
        return Ok(());
    }
    let now = now_secs();
    writeln!(
        out,
        "{:<16}  {:<24}  {:>9}  {:<20}  {:<7}  {:<40}  DESCRIPTION",
        "ID", "SCOPE", "USES", "EXPIRES", "STATUS", "CREATED BY"
    )?;
    for t in tokens {
        writeln!(
            out,
            "{:<16}  {:<24}  {:>9}  {:<20}  {:<7}  {:<40}  {}",
            plain(&t.token_id),
            plain(&scope(&t.tenant, &t.pool)),
            format!("{}/{}", t.uses, t.max_uses),
            when(t.expires_at.as_ref()),
            token_status(t, now),
            plain(&t.created_by),
            printable(&t.description),
        )?;
    }
    Ok(())
}

async fn revoke_token(dir: &Path, token_id: String, reason: String) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let t = client
        .revoke_join_token(pb::RevokeJoinTokenRequest { token_id, reason })
        .await
        .map_err(rpc("RevokeJoinToken"))?
        .into_inner()
        .join_token
        .context("identity answered RevokeJoinToken without the token")?;
    println!(
        "revoked join token {} for {} at {} ({}/{} uses taken; workers enrolled with it keep \
         their identities)",
        t.token_id,
        scope(&t.tenant, &t.pool),
        when(t.revoked_at.as_ref()),
        t.uses,
        t.max_uses
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Revocation.

fn target(r: &pb::Revocation) -> String {
    use pb::revocation::Target;
    match &r.target {
        Some(Target::RunId(id)) => format!("run {}", plain(id)),
        Some(Target::WorkerId(id)) => format!("worker {}", plain(id)),
        Some(Target::WholeTenant(_)) => "every identity".into(),
        Some(Target::Serial(s)) => format!("serial {}", plain(s)),
        None => "?".into(),
    }
}

fn mode(hard: bool) -> &'static str {
    if hard { "hard" } else { "soft" }
}

async fn revoke(dir: &Path, req: pb::RevokeRequest) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let resp = client
        .revoke(req)
        .await
        .map_err(rpc("Revoke"))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    match &resp.revocation {
        Some(r) => {
            let of = if r.tenant.is_empty() {
                String::new()
            } else {
                format!(" of tenant {}", r.tenant)
            };
            writeln!(out, "revoked {}{of} ({})", target(r), mode(r.hard))?;
            writeln!(out, "  sequence: {}", resp.sequence)?;
            if !r.spiffe_id.is_empty() {
                writeln!(out, "  covers:   {}", plain(&r.spiffe_id))?;
            }
            match &r.expires_at {
                Some(t) => writeln!(
                    out,
                    "  listed until {} (when all it covers has expired)",
                    when(Some(t))
                )?,
                None => writeln!(
                    out,
                    "  listed for good (new identities it covers are refused too)"
                )?,
            }
        }
        None => writeln!(out, "revoked; sequence: {}", resp.sequence)?,
    }
    Ok(())
}

async fn revocations(dir: &Path, tenant: String) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let mut entries = Vec::new();
    let mut sequence = 0;
    let mut page_token = String::new();
    let mut complete = false;
    for _ in 0..MAX_PAGES {
        let resp = client
            .list_revocations(pb::ListRevocationsRequest {
                tenant: tenant.clone(),
                page_size: MAX_PAGE,
                page_token: page_token.clone(),
            })
            .await
            .map_err(rpc("ListRevocations"))?
            .into_inner();
        entries.extend(resp.revocations);
        sequence = sequence.max(resp.sequence);
        if resp.next_page_token.is_empty() {
            complete = true;
            break;
        }
        if resp.next_page_token == page_token {
            bail!("identity returned the same page token twice");
        }
        page_token = resp.next_page_token;
    }
    if !complete {
        bail!("more than {MAX_PAGES} pages of revocations; narrow the listing with --tenant");
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "revocation list at sequence {sequence}: {}",
        plural(entries.len(), "entry", "entries")
    )?;
    if entries.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "{:>6}  {:<16}  {:<36}  {:<4}  {:<20}  {:<20}  {:<40}  REASON",
        "SEQ", "TENANT", "TARGET", "MODE", "REVOKED AT", "LISTED UNTIL", "BY"
    )?;
    for r in &entries {
        writeln!(
            out,
            "{:>6}  {:<16}  {:<36}  {:<4}  {:<20}  {:<20}  {:<40}  {}",
            r.sequence,
            plain(&r.tenant),
            target(r),
            mode(r.hard),
            when(r.revoked_at.as_ref()),
            if r.expires_at.is_some() {
                when(r.expires_at.as_ref())
            } else {
                "always".into()
            },
            plain(&r.revoked_by),
            printable(&r.reason),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The trust bundle.

/// PEM of DER certificates, 64 base64 characters a line (RFC 7468).
pub fn certificates_pem<'a>(ders: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut pem = String::new();
    for der in ders {
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        for line in b64.as_bytes().chunks(64) {
            // Base64 is ASCII, so every chunk is a whole str.
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem
}

/// One authority as printed: subject, URI SAN and expiry.
fn describe_authority(der: &[u8]) -> String {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return "(not a parsable X.509 certificate)".into();
    };
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let expires = prost_types::Timestamp {
        seconds: cert.validity().not_after.timestamp(),
        nanos: 0,
    };
    format!(
        "{}  ({}expires {})",
        printable(&cert.subject().to_string()),
        if uris.is_empty() {
            String::new()
        } else {
            format!("{}, ", uris.join(" "))
        },
        when(Some(&expires))
    )
}

/// Writes `text` to `path` through a temporary file, so a reader never sees
/// half of it.
fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).with_context(|| format!("failed to write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("failed to write {}", path.display()))
}

async fn bundle(dir: &Path, out_dir: Option<&Path>) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let b = client
        .get_trust_bundle(pb::GetTrustBundleRequest {})
        .await
        .map_err(rpc("GetTrustBundle"))?
        .into_inner();
    let jwks: serde_json::Value = serde_json::from_str(&b.jwt_authorities_jwks)
        .context("identity sent JWT keys that are not a JSON JWK set")?;
    let keys = jwks
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .context("identity sent a JWK set without a \"keys\" array")?;

    let mut out = std::io::stdout().lock();
    writeln!(out, "trust domain: {}", plain(&b.trust_domain))?;
    writeln!(out, "sequence:     {}", b.sequence)?;
    if let Some(h) = &b.refresh_hint {
        writeln!(
            out,
            "refresh hint: {}",
            format_duration(Duration::from_secs(u64::try_from(h.seconds).unwrap_or(0)))
        )?;
    }
    writeln!(out, "x509 authorities ({}):", b.x509_authorities_der.len())?;
    for der in &b.x509_authorities_der {
        writeln!(out, "  {}", describe_authority(der))?;
    }
    writeln!(out, "jwt keys ({}):", keys.len())?;
    for k in keys {
        let field = |name: &str| {
            k.get(name)
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
        };
        writeln!(
            out,
            "  kid {}  ({} {}, use {})",
            plain(field("kid")),
            plain(field("kty")),
            plain(field("crv")),
            plain(field("use"))
        )?;
    }

    if let Some(out_dir) = out_dir {
        std::fs::create_dir_all(out_dir)
            .with_context(|| format!("failed to create {}", out_dir.display()))?;
        let pem_path = out_dir.join("bundle.pem");
        let jwks_path = out_dir.join("jwks.json");
        write_file(
            &pem_path,
            &certificates_pem(b.x509_authorities_der.iter().map(|d| &d[..])),
        )?;
        write_file(&jwks_path, &(serde_json::to_string_pretty(&jwks)? + "\n"))?;
        writeln!(
            out,
            "wrote {} ({}) and {} ({})",
            pem_path.display(),
            plural(b.x509_authorities_der.len(), "certificate", "certificates"),
            jwks_path.display(),
            plural(keys.len(), "key", "keys")
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_one_unit() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for bad in [
            "", "h", "10", "1.5h", "-1h", "1 h", "1H", "1w", "1h30m", "0s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
        let err = parse_duration("99999999999999999999d").expect_err("overflow");
        assert!(err.contains("too long"), "{err}");
        assert!(
            parse_duration("5x").expect_err("unit").contains("e.g. 30s"),
            "the error shows the form"
        );
    }

    #[test]
    fn durations_print_in_their_largest_unit() {
        for (secs, text) in [
            (30, "30s"),
            (90, "90s"),
            (600, "10m"),
            (3600, "1h"),
            (604_800, "7d"),
        ] {
            assert_eq!(format_duration(Duration::from_secs(secs)), text);
            assert_eq!(parse_duration(text), Ok(Duration::from_secs(secs)));
        }
    }

    #[test]
    fn times_print_to_the_second() {
        let t = prost_types::Timestamp {
            seconds: 1_764_201_600,
            nanos: 5,
        };
        assert_eq!(when(Some(&t)), "2025-11-27T00:00:00Z");
        assert_eq!(when(None), "-");
    }

    #[test]
    fn pem_wraps_at_64_columns() {
        let der: Vec<u8> = (0..=255).collect();
        let pem = certificates_pem([&der[..], &der[..3]]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert!(lines.iter().all(|l| l.len() <= 64));
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("-----END")).count(),
            2
        );
        let end = lines
            .iter()
            .position(|l| l.starts_with("-----END"))
            .expect("end");
        let body: String = lines[1..end].concat();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .expect("base64"),
            der
        );
    }

    #[test]
    fn table_values_cannot_drive_the_terminal() {
        assert_eq!(plain("ci-runners"), "ci-runners");
        assert_eq!(plain(""), "-");
        assert_eq!(plain("a\u{1b}[2Jb"), "\"a\\u{1b}[2Jb\"");
        assert_eq!(printable("ci runners"), "ci runners");
        assert_eq!(printable("a\u{1b}[2J\nb"), "a\\u{1b}[2J\\nb");
    }
}
