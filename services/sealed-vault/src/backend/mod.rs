//! External secret backends: values named by a reference and fetched at the
//! moment of need (DESIGN.md, guarantee 4).
//!
//! - `vault://<mount>/<path>#<field>` with an optional `?version=<n>`:
//!   HashiCorp Vault / OpenBao KV v2 ([`vault`]).
//! - `aws-sm://<secret-id>#<json-key>` (the key optional) with an optional
//!   `?version-stage=<label>`: AWS Secrets Manager ([`aws_sm`]).
//! - `agentcore://<provider-name>`: an API key credential provider of AWS
//!   Bedrock AgentCore Identity ([`agentcore`]).
//!
//! A query may come before or after the fragment; [`Reference`]'s `Display`
//! is the canonical URL order (`?query#fragment`). Percent-encoding is not
//! accepted: every part has a restricted alphabet, so a reference can never
//! smuggle `..` or an encoded `/` into a backend's URL.
//!
//! Sealed-vault holds the backends' credentials, so a reference is usable only
//! by the tenants the configuration allows it for ([`TenantScopes`]).
//!
//! Values, tokens and keys live in zeroizing buffers ([`SecretValue`],
//! [`Credential`]) and never reach a log line or an error message. A
//! [`BackendError`] carries the canonical reference (never a value), and a
//! backend's own error text is reduced to its status or error code.

pub mod agentcore;
pub mod aws_sm;
pub mod vault;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

use crate::secret::SecretValue;

use agentcore::{AgentCoreClient, AgentCoreConfig};
use aws_sm::{AwsSmClient, AwsSmConfig};
use vault::{VaultClient, VaultConfig};

/// The longest reference accepted (the proto's bound).
pub const MAX_REFERENCE_LEN: usize = 1024;
/// The largest value a backend may return (the proto's bound on secret values).
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// The largest response body read from a backend: a batch of 20 AWS secrets
/// of 64 KiB each, base64-encoded, fits.
const MAX_RESPONSE_LEN: usize = 4 * 1024 * 1024;
const MAX_FIELD_LEN: usize = 256;

pub const VAULT: &str = "vault";
pub const AWS_SM: &str = "aws-sm";
pub const AGENTCORE: &str = "agentcore";

// ---------------------------------------------------------------------------
// References

/// Where an external secret lives. Parsed strictly from its string form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Vault(VaultRef),
    AwsSm(AwsSmRef),
    AgentCore(AgentCoreRef),
}

/// `vault://<mount>/<path>#<field>`, optionally `?version=<n>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VaultRef {
    mount: String,
    path: String,
    field: String,
    version: Option<u64>,
}

/// `aws-sm://<secret-id>#<json-key>`, the key optional, optionally
/// `?version-stage=<label>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AwsSmRef {
    secret_id: String,
    json_key: Option<String>,
    version_stage: Option<String>,
}

/// `agentcore://<provider-name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentCoreRef {
    provider: String,
}

/// Why a string is not a reference. It never repeats the input: a value
/// pasted where a reference belongs must not travel on in an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {part}: {problem}")]
pub struct ReferenceError {
    /// The part that is wrong: `reference`, `scheme`, `vault mount`, `vault path`,
    /// `vault field`, `version`, `secret id`, `json key`, `version stage`,
    /// `provider name`, `query`.
    pub part: &'static str,
    pub problem: Cow<'static, str>,
}

impl ReferenceError {
    fn new(part: &'static str, problem: impl Into<Cow<'static, str>>) -> Self {
        Self {
            part,
            problem: problem.into(),
        }
    }
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::new("reference", "empty"));
        }
        if s.len() > MAX_REFERENCE_LEN {
            return Err(ReferenceError::new(
                "reference",
                format!("longer than {MAX_REFERENCE_LEN} bytes"),
            ));
        }
        if let Some(rest) = s.strip_prefix("vault://") {
            VaultRef::parse(rest).map(Reference::Vault)
        } else if let Some(rest) = s.strip_prefix("aws-sm://") {
            AwsSmRef::parse(rest).map(Reference::AwsSm)
        } else if let Some(rest) = s.strip_prefix("agentcore://") {
            AgentCoreRef::parse(rest).map(Reference::AgentCore)
        } else {
            Err(ReferenceError::new(
                "scheme",
                "expected vault://, aws-sm:// or agentcore://",
            ))
        }
    }

    /// The backend's name: `vault`, `aws-sm` or `agentcore`.
    pub fn backend(&self) -> &'static str {
        match self {
            Reference::Vault(_) => VAULT,
            Reference::AwsSm(_) => AWS_SM,
            Reference::AgentCore(_) => AGENTCORE,
        }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for Reference {
    type Error = ReferenceError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Vault(r) => r.fmt(f),
            Reference::AwsSm(r) => r.fmt(f),
            Reference::AgentCore(r) => r.fmt(f),
        }
    }
}

/// A reference's body split into its path, optional query and optional
/// fragment, in either order (`p?q#f` or `p#f?q`).
struct Parts<'a> {
    path: &'a str,
    query: Option<&'a str>,
    fragment: Option<&'a str>,
}

fn split_parts(rest: &str) -> Result<Parts<'_>, ReferenceError> {
    if rest.matches('?').count() > 1 {
        return Err(ReferenceError::new("query", "more than one '?'"));
    }
    if rest.matches('#').count() > 1 {
        return Err(ReferenceError::new("reference", "more than one '#'"));
    }
    let (path, query, fragment) = match (rest.find('?'), rest.find('#')) {
        (None, None) => (rest, None, None),
        (Some(q), None) => (&rest[..q], Some(&rest[q + 1..]), None),
        (None, Some(h)) => (&rest[..h], None, Some(&rest[h + 1..])),
        (Some(q), Some(h)) if q < h => (&rest[..q], Some(&rest[q + 1..h]), Some(&rest[h + 1..])),
        (Some(q), Some(h)) => (&rest[..h], Some(&rest[q + 1..]), Some(&rest[h + 1..q])),
    };
    Ok(Parts {
        path,
        query,
        fragment,
    })
}

/// Parses a query of exactly one `name=value` pair, `name` being `allowed`.
fn single_param<'a>(
    query: Option<&'a str>,
    allowed: &'static str,
    hint: &'static str,
) -> Result<Option<&'a str>, ReferenceError> {
    let Some(query) = query else { return Ok(None) };
    if query.is_empty() {
        return Err(ReferenceError::new("query", "empty after '?'"));
    }
    if query.contains('&') {
        return Err(ReferenceError::new("query", hint));
    }
    match query.split_once('=') {
        Some((name, value)) if name == allowed => Ok(Some(value)),
        _ => Err(ReferenceError::new("query", hint)),
    }
}

/// Vault mount and path segments: no encoding, no `.`/`..`, a URL-safe alphabet.
fn check_segment(part: &'static str, segment: &str) -> Result<(), ReferenceError> {
    if segment.is_empty() {
        return Err(ReferenceError::new(part, "empty segment"));
    }
    if segment == "." || segment == ".." {
        return Err(ReferenceError::new(
            part,
            "'.' and '..' segments are not allowed",
        ));
    }
    if let Some(at) = segment
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || b"._-@+=".contains(&b)))
    {
        return Err(ReferenceError::new(
            part,
            format!(
                "character {} of a segment is not one of A-Z a-z 0-9 . _ - @ + =",
                at + 1
            ),
        ));
    }
    Ok(())
}

/// A Vault field or a JSON key: printable, no whitespace, no `#` or `?`.
fn check_key(part: &'static str, key: &str) -> Result<(), ReferenceError> {
    if key.is_empty() {
        return Err(ReferenceError::new(part, "empty after '#'"));
    }
    if key.len() > MAX_FIELD_LEN {
        return Err(ReferenceError::new(
            part,
            format!("longer than {MAX_FIELD_LEN} bytes"),
        ));
    }
    if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ReferenceError::new(
            part,
            "contains whitespace or a control character",
        ));
    }
    Ok(())
}

impl VaultRef {
    fn parse(rest: &str) -> Result<Self, ReferenceError> {
        let parts = split_parts(rest)?;
        let (mount, path) = parts.path.split_once('/').ok_or_else(|| {
            ReferenceError::new(
                "vault path",
                "missing: expected vault://<mount>/<path>#<field>",
            )
        })?;
        check_segment("vault mount", mount)?;
        if path.is_empty() {
            return Err(ReferenceError::new(
                "vault path",
                "missing: expected vault://<mount>/<path>#<field>",
            ));
        }
        for segment in path.split('/') {
            check_segment("vault path", segment)?;
        }
        let field = parts.fragment.ok_or_else(|| {
            ReferenceError::new("vault field", "missing: vault references end in #<field>")
        })?;
        check_key("vault field", field)?;
        let version = single_param(
            parts.query,
            "version",
            "vault references allow only ?version=<n>",
        )?
        .map(|v| match v.parse::<u64>() {
            Ok(n) if n >= 1 && !v.starts_with('0') => Ok(n),
            _ => Err(ReferenceError::new("version", "not a positive integer")),
        })
        .transpose()?;
        Ok(Self {
            mount: mount.to_owned(),
            path: path.to_owned(),
            field: field.to_owned(),
            version,
        })
    }

    pub fn mount(&self) -> &str {
        &self.mount
    }

    /// The secret's path inside the mount.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn field(&self) -> &str {
        &self.field
    }

    /// The pinned version; `None` reads the latest.
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// `<mount>/<path>`: what [`TenantScopes`] match against.
    fn scope_target(&self) -> String {
        format!("{}/{}", self.mount, self.path)
    }
}

impl fmt::Display for VaultRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vault://{}/{}", self.mount, self.path)?;
        if let Some(version) = self.version {
            write!(f, "?version={version}")?;
        }
        write!(f, "#{}", self.field)
    }
}

impl AwsSmRef {
    fn parse(rest: &str) -> Result<Self, ReferenceError> {
        let parts = split_parts(rest)?;
        let secret_id = parts.path;
        if secret_id.is_empty() {
            return Err(ReferenceError::new(
                "secret id",
                "missing: expected aws-sm://<secret-id>#<json-key>",
            ));
        }
        if let Some(at) = secret_id
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b"/_+=.@-:".contains(&b)))
        {
            return Err(ReferenceError::new(
                "secret id",
                format!(
                    "character {} is not one of A-Z a-z 0-9 / _ + = . @ - : (a secret name or an arn)",
                    at + 1
                ),
            ));
        }
        let json_key = parts
            .fragment
            .map(|key| check_key("json key", key).map(|()| key.to_owned()))
            .transpose()?;
        let version_stage = single_param(
            parts.query,
            "version-stage",
            "aws-sm references allow only ?version-stage=<label>",
        )?
        .map(|stage| {
            let ok = !stage.is_empty()
                && stage.len() <= 256
                && stage
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if ok {
                Ok(stage.to_owned())
            } else {
                Err(ReferenceError::new(
                    "version stage",
                    "expected 1 to 256 of A-Z a-z 0-9 _ . - (such as AWSCURRENT)",
                ))
            }
        })
        .transpose()?;
        Ok(Self {
            secret_id: secret_id.to_owned(),
            json_key,
            version_stage,
        })
    }

    /// The secret's name or ARN.
    pub fn secret_id(&self) -> &str {
        &self.secret_id
    }

    /// The key to pick out of a JSON `SecretString`; `None` takes the whole value.
    pub fn json_key(&self) -> Option<&str> {
        self.json_key.as_deref()
    }

    /// The staging label to read; `None` reads `AWSCURRENT`.
    pub fn version_stage(&self) -> Option<&str> {
        self.version_stage.as_deref()
    }
}

impl fmt::Display for AwsSmRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "aws-sm://{}", self.secret_id)?;
        if let Some(stage) = &self.version_stage {
            write!(f, "?version-stage={stage}")?;
        }
        if let Some(key) = &self.json_key {
            write!(f, "#{key}")?;
        }
        Ok(())
    }
}

impl AgentCoreRef {
    fn parse(rest: &str) -> Result<Self, ReferenceError> {
        if rest.contains(['?', '#', '/']) {
            return Err(ReferenceError::new(
                "provider name",
                "agentcore references are agentcore://<provider-name>, without a path, query or fragment",
            ));
        }
        let ok = !rest.is_empty()
            && rest.len() <= 128
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(ReferenceError::new(
                "provider name",
                "expected 1 to 128 of A-Z a-z 0-9 - _",
            ));
        }
        Ok(Self {
            provider: rest.to_owned(),
        })
    }

    /// The API key credential provider's name.
    pub fn provider(&self) -> &str {
        &self.provider
    }
}

impl fmt::Display for AgentCoreRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "agentcore://{}", self.provider)
    }
}

// ---------------------------------------------------------------------------
// Results and errors

/// A value fetched from a backend, with what audit records about it.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub value: SecretValue,
    /// The backend's version: Vault's `metadata.version`, AWS's `VersionId`;
    /// empty for AgentCore, whose API keys have no versions.
    pub version: String,
    /// The backend's id for the request: Vault's `request_id`, AWS's
    /// `x-amzn-RequestId`; empty when the backend sent none.
    pub request_id: String,
    /// `vault`, `aws-sm` or `agentcore`.
    pub backend: &'static str,
}

/// Who is asking, for scoping and for the log.
#[derive(Debug, Clone)]
pub struct ResolveContext {
    pub tenant: String,
    pub run_id: String,
    /// The run's AgentCore workload access token; needed by `agentcore://`
    /// references only.
    pub workload_access_token: Option<SecretValue>,
}

/// What went wrong, as the service maps it to a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such secret, field, key, version or provider.
    NotFound,
    /// The backend, or the tenant scopes, refused.
    Denied,
    /// The backend could not be reached or failed; retrying may work.
    Unavailable,
    /// The reference, or the backend's answer, is not usable.
    Malformed,
    /// The reference names a backend sealed-vault has no configuration for.
    NotConfigured,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::Denied => "denied",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Malformed => "malformed",
            ErrorKind::NotConfigured => "not configured",
        })
    }
}

/// A failed resolution. Its message names the backend, the reference and what
/// happened; it never holds a value, a token or a backend's free-form error text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{backend} reference {reference}: {kind}: {detail}")]
pub struct BackendError {
    pub kind: ErrorKind,
    pub backend: &'static str,
    /// The canonical reference (or what is known of it).
    pub reference: String,
    pub detail: Cow<'static, str>,
}

impl BackendError {
    pub fn new(
        kind: ErrorKind,
        backend: &'static str,
        reference: impl fmt::Display,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            kind,
            backend,
            reference: reference.to_string(),
            detail: detail.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// A backend configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid {backend} configuration: {field}: {problem}")]
pub struct ConfigError {
    pub backend: &'static str,
    pub field: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(backend: &'static str, field: &'static str, problem: impl fmt::Display) -> Self {
        Self {
            backend,
            field,
            problem: problem.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------
// Configuration

/// A backend credential (token, secret id, secret access key): zeroized on
/// drop, `Debug` prints `[redacted]`, never serialized.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential(Zeroizing<String>);

impl Credential {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A header value marked sensitive (hyper keeps it out of HPACK tables and
    /// `Debug`). The header map's copy is not zeroized: reqwest owns it.
    fn header_value(&self) -> Option<reqwest::header::HeaderValue> {
        let mut value = reqwest::header::HeaderValue::from_str(self.expose()).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Credential {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Credential::new)
    }
}

/// Which tenants may use which references of one backend: tenant → target
/// prefixes. The target is `<mount>/<path>` for Vault, the secret id for AWS
/// Secrets Manager and the provider name for AgentCore. A prefix `*` allows
/// everything; one ending in `/` allows everything under it; any other must
/// equal the target or be followed in it by `/`. A tenant not listed gets
/// nothing (fail closed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct TenantScopes(BTreeMap<String, Vec<String>>);

impl TenantScopes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one prefix for a tenant.
    pub fn allow(mut self, tenant: impl Into<String>, prefix: impl Into<String>) -> Self {
        self.0.entry(tenant.into()).or_default().push(prefix.into());
        self
    }

    pub fn allows(&self, tenant: &str, target: &str) -> bool {
        self.0.get(tenant).is_some_and(|prefixes| {
            prefixes.iter().any(|prefix| {
                prefix == "*"
                    || (prefix.ends_with('/') && target.starts_with(prefix.as_str()))
                    || target
                        .strip_prefix(prefix.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
        })
    }
}

/// How a backend client talks HTTP. It never uses the environment's proxy
/// variables: a proxy is named here or not used.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpOptions {
    /// Whole-request timeout, in milliseconds.
    pub timeout_ms: u64,
    /// Connection timeout, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Extra PEM CA certificates to trust (for a private Vault).
    pub ca_file: Option<PathBuf>,
    /// An HTTP(S) proxy URL for every request.
    pub proxy: Option<String>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            connect_timeout_ms: 3_000,
            ca_file: None,
            proxy: None,
        }
    }
}

impl HttpOptions {
    fn client(&self, backend: &'static str) -> Result<reqwest::Client, ConfigError> {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(self.timeout_ms))
            .connect_timeout(Duration::from_millis(self.connect_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("bulkhead-sealed-vault/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                ConfigError::new(backend, "ca_file", format!("{}: {e}", path.display()))
            })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ConfigError::new(backend, "ca_file", e))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(proxy) = &self.proxy {
            builder =
                builder
                    .proxy(reqwest::Proxy::all(proxy).map_err(|_| {
                        ConfigError::new(backend, "proxy", "not a valid proxy url")
                    })?);
        }
        builder
            .build()
            .map_err(|e| ConfigError::new(backend, "http", e))
    }
}

/// Parses a base URL: http or https, no query or fragment, trailing `/` dropped.
fn base_url(
    backend: &'static str,
    field: &'static str,
    s: &str,
) -> Result<reqwest::Url, ConfigError> {
    let url = reqwest::Url::parse(s.trim_end_matches('/'))
        .map_err(|e| ConfigError::new(backend, field, e))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::new(
            backend,
            field,
            "expected an http:// or https:// url",
        ));
    }
    if url.host_str().is_none() || url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::new(
            backend,
            field,
            "expected scheme://host[:port][/prefix]",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            backend,
            field,
            "credentials do not belong in the url",
        ));
    }
    Ok(url)
}

/// Every backend sealed-vault may use; an absent one refuses its references.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendsConfig {
    pub vault: Option<VaultConfig>,
    pub aws_sm: Option<AwsSmConfig>,
    pub agentcore: Option<AgentCoreConfig>,
}

// ---------------------------------------------------------------------------
// The backends

/// The configured backend clients. Cheap to share (`&self` everywhere).
#[derive(Debug, Default)]
pub struct Backends {
    vault: Option<Scoped<VaultClient>>,
    aws_sm: Option<Scoped<AwsSmClient>>,
    agentcore: Option<Scoped<AgentCoreClient>>,
}

#[derive(Debug)]
struct Scoped<C> {
    client: C,
    tenants: TenantScopes,
}

impl Backends {
    pub fn new(config: BackendsConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            vault: config
                .vault
                .map(|c| {
                    Ok::<_, ConfigError>(Scoped {
                        tenants: c.tenants.clone(),
                        client: VaultClient::new(c)?,
                    })
                })
                .transpose()?,
            aws_sm: config
                .aws_sm
                .map(|c| {
                    Ok::<_, ConfigError>(Scoped {
                        tenants: c.tenants.clone(),
                        client: AwsSmClient::new(c)?,
                    })
                })
                .transpose()?,
            agentcore: config
                .agentcore
                .map(|c| {
                    Ok::<_, ConfigError>(Scoped {
                        tenants: c.tenants.clone(),
                        client: AgentCoreClient::new(c)?,
                    })
                })
                .transpose()?,
        })
    }

    /// Whether `tenant` may use `reference`: its backend is configured and its
    /// tenant scopes allow it. PutSecret checks this before storing a reference;
    /// every resolution checks it again.
    pub fn check_allowed(&self, tenant: &str, reference: &Reference) -> Result<(), BackendError> {
        match reference {
            Reference::Vault(r) => {
                scoped(&self.vault, tenant, reference, &r.scope_target()).map(|_| ())
            }
            Reference::AwsSm(r) => {
                scoped(&self.aws_sm, tenant, reference, r.secret_id()).map(|_| ())
            }
            Reference::AgentCore(r) => {
                scoped(&self.agentcore, tenant, reference, r.provider()).map(|_| ())
            }
        }
    }

    /// Fetches one value.
    pub async fn resolve(
        &self,
        reference: &Reference,
        ctx: &ResolveContext,
    ) -> Result<Resolved, BackendError> {
        let result = self
            .fetch(reference, ctx)
            .await
            .and_then(|r| bounded(reference, r));
        log_outcome(reference, ctx, &result);
        result
    }

    /// Fetches many values, each result at its reference's index. AWS Secrets
    /// Manager references that read `AWSCURRENT` go in BatchGetSecretValue
    /// calls of up to 20 secrets; the rest are fetched concurrently.
    pub async fn resolve_many(
        &self,
        references: &[Reference],
        ctx: &ResolveContext,
    ) -> Vec<Result<Resolved, BackendError>> {
        let mut batched: Vec<(usize, &AwsSmRef)> = Vec::new();
        let mut single: Vec<usize> = Vec::new();
        for (i, reference) in references.iter().enumerate() {
            match reference {
                Reference::AwsSm(r)
                    if r.version_stage().is_none_or(|s| s == "AWSCURRENT")
                        && self.check_allowed(&ctx.tenant, reference).is_ok() =>
                {
                    batched.push((i, r));
                }
                _ => single.push(i),
            }
        }
        let batch = async {
            match (&self.aws_sm, batched.is_empty()) {
                (Some(aws), false) => {
                    let refs: Vec<&AwsSmRef> = batched.iter().map(|(_, r)| *r).collect();
                    aws.client.batch_get(&refs).await
                }
                _ => Vec::new(),
            }
        };
        let singles =
            futures::future::join_all(single.iter().map(|&i| self.fetch(&references[i], ctx)));
        let (batch_results, single_results) = futures::future::join(batch, singles).await;

        let mut results: Vec<Option<Result<Resolved, BackendError>>> =
            references.iter().map(|_| None).collect();
        for ((i, _), result) in batched.iter().zip(batch_results) {
            results[*i] = Some(result);
        }
        for (i, result) in single.iter().zip(single_results) {
            results[*i] = Some(result);
        }
        references
            .iter()
            .zip(results)
            .map(|(reference, result)| {
                let result = result
                    .unwrap_or_else(|| {
                        Err(BackendError::new(
                            ErrorKind::Unavailable,
                            reference.backend(),
                            reference,
                            "no result from the batch",
                        ))
                    })
                    .and_then(|r| bounded(reference, r));
                log_outcome(reference, ctx, &result);
                result
            })
            .collect()
    }

    async fn fetch(
        &self,
        reference: &Reference,
        ctx: &ResolveContext,
    ) -> Result<Resolved, BackendError> {
        let tenant = ctx.tenant.as_str();
        match reference {
            Reference::Vault(r) => {
                let vault = scoped(&self.vault, tenant, reference, &r.scope_target())?;
                vault.read(r).await
            }
            Reference::AwsSm(r) => {
                let aws = scoped(&self.aws_sm, tenant, reference, r.secret_id())?;
                aws.get(r).await
            }
            Reference::AgentCore(r) => {
                let agentcore = scoped(&self.agentcore, tenant, reference, r.provider())?;
                let token = ctx.workload_access_token.as_ref().ok_or_else(|| {
                    BackendError::new(
                        ErrorKind::Denied,
                        AGENTCORE,
                        reference,
                        "the run has no workload access token",
                    )
                })?;
                agentcore.api_key(r, token).await
            }
        }
    }
}

/// A backend's client, if it is configured and its scopes allow `target` for `tenant`.
fn scoped<'a, C>(
    backend: &'a Option<Scoped<C>>,
    tenant: &str,
    reference: &Reference,
    target: &str,
) -> Result<&'a C, BackendError> {
    let Some(scoped) = backend else {
        return Err(BackendError::new(
            ErrorKind::NotConfigured,
            reference.backend(),
            reference,
            "sealed-vault has no configuration for this backend",
        ));
    };
    if scoped.tenants.allows(tenant, target) {
        Ok(&scoped.client)
    } else {
        Err(BackendError::new(
            ErrorKind::Denied,
            reference.backend(),
            reference,
            "the tenant is not allowed this reference",
        ))
    }
}

fn bounded(reference: &Reference, resolved: Resolved) -> Result<Resolved, BackendError> {
    if resolved.value.is_empty() {
        return Err(BackendError::new(
            ErrorKind::Malformed,
            reference.backend(),
            reference,
            "the value is empty",
        ));
    }
    if resolved.value.len() > MAX_VALUE_LEN {
        return Err(BackendError::new(
            ErrorKind::Malformed,
            reference.backend(),
            reference,
            "the value is larger than 64 KiB",
        ));
    }
    Ok(resolved)
}

fn log_outcome(
    reference: &Reference,
    ctx: &ResolveContext,
    result: &Result<Resolved, BackendError>,
) {
    match result {
        Ok(resolved) => tracing::debug!(
            bulkhead.tenant = %ctx.tenant,
            bulkhead.run_id = %ctx.run_id,
            backend = resolved.backend,
            reference = %reference,
            version = %resolved.version,
            request_id = %resolved.request_id,
            "resolved a backend reference"
        ),
        Err(error) => tracing::info!(
            bulkhead.tenant = %ctx.tenant,
            bulkhead.run_id = %ctx.run_id,
            backend = error.backend,
            reference = %reference,
            kind = %error.kind,
            detail = %error.detail,
            "backend reference not resolved"
        ),
    }
}

// ---------------------------------------------------------------------------
// Shared plumbing for the clients

/// A growable zeroizing buffer: when it grows, the old allocation is zeroized
/// too (a plain `Vec` would free it as it is).
#[derive(Default)]
struct ZBuf(Zeroizing<Vec<u8>>);

impl ZBuf {
    fn with_capacity(capacity: usize) -> Self {
        Self(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    fn push(&mut self, bytes: &[u8]) {
        let needed = self.0.len() + bytes.len();
        if needed > self.0.capacity() {
            let mut grown = Zeroizing::new(Vec::with_capacity(needed.max(self.0.capacity() * 2)));
            grown.extend_from_slice(&self.0);
            self.0 = grown;
        }
        self.0.extend_from_slice(bytes);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn as_slice(&self) -> &[u8] {
        &self.0
    }

    /// A request body whose buffer is zeroized once hyper has sent it and
    /// dropped its last reference.
    fn into_body(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self.0)
    }
}

impl std::io::Write for ZBuf {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.push(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serializes a request body that holds a secret into a zeroizing buffer.
fn secret_json_body(body: &impl serde::Serialize) -> bytes::Bytes {
    let mut buf = ZBuf::with_capacity(1024);
    // Serializing plain structs of strings into memory cannot fail.
    let _ = serde_json::to_writer(&mut buf, body);
    buf.into_body()
}

/// Reads a response body into a zeroizing buffer, at most [`MAX_RESPONSE_LEN`]
/// bytes. hyper's own chunk buffers are dropped without zeroizing: reqwest
/// owns them.
async fn read_body(mut response: reqwest::Response) -> Result<ZBuf, Cow<'static, str>> {
    let capacity = response
        .content_length()
        .map_or(8 * 1024, |n| usize::try_from(n).unwrap_or(MAX_RESPONSE_LEN))
        .min(MAX_RESPONSE_LEN);
    let mut body = ZBuf::with_capacity(capacity);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Cow::Owned(format!("reading the response failed: {}", e.without_url())))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_LEN {
            return Err(Cow::Borrowed("the response is larger than 4 MiB"));
        }
        body.push(&chunk);
    }
    Ok(body)
}

/// A transport failure and its causes (no body, no headers: nothing secret).
fn transport_detail(error: &reqwest::Error) -> Cow<'static, str> {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut detail = format!("{what}: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    Cow::Owned(detail)
}

/// A backend request id from a header: short, printable ASCII, or nothing.
fn request_id(headers: &reqwest::header::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_default()
        .to_owned()
}

/// A string received from a backend that holds a secret: zeroized on drop.
#[derive(Default)]
struct ZString(Zeroizing<String>);

impl ZString {
    fn into_secret(mut self) -> SecretValue {
        SecretValue::new(std::mem::take(&mut *self.0).into_bytes())
    }
}

impl<'de> Deserialize<'de> for ZString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| ZString(Zeroizing::new(s)))
    }
}

/// A JSON document that holds secrets: every string in it is zeroized on drop.
#[derive(Default, Deserialize)]
#[serde(transparent)]
struct ScrubJson(serde_json::Value);

impl Drop for ScrubJson {
    fn drop(&mut self) {
        fn scrub(value: &mut serde_json::Value) {
            match value {
                serde_json::Value::String(s) => s.zeroize(),
                serde_json::Value::Array(items) => items.iter_mut().for_each(scrub),
                serde_json::Value::Object(map) => map.values_mut().for_each(scrub),
                _ => {}
            }
        }
        scrub(&mut self.0);
    }
}

/// What picking a key out of a JSON object found.
enum Picked {
    Value(SecretValue),
    NoSuchKey,
    NotAnObject,
    NotAScalar,
}

impl ScrubJson {
    /// Takes `key` out of an object: a string as its bytes, a number or a
    /// boolean as its JSON text.
    fn take(&mut self, key: &str) -> Picked {
        let serde_json::Value::Object(map) = &mut self.0 else {
            return Picked::NotAnObject;
        };
        match map.get_mut(key) {
            None => Picked::NoSuchKey,
            Some(serde_json::Value::String(s)) => {
                Picked::Value(SecretValue::new(std::mem::take(s).into_bytes()))
            }
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                let text = Zeroizing::new(v.to_string());
                Picked::Value(SecretValue::from_slice(text.as_bytes()))
            }
            Some(_) => Picked::NotAScalar,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Reference, ReferenceError> {
        Reference::parse(s)
    }

    #[test]
    fn vault_references_parse_in_either_order_and_print_canonically() {
        let r = parse("vault://secret/team/app#password").expect("plain");
        let Reference::Vault(v) = &r else {
            panic!("not vault: {r:?}")
        };
        assert_eq!(
            (v.mount(), v.path(), v.field(), v.version()),
            ("secret", "team/app", "password", None)
        );
        assert_eq!(r.to_string(), "vault://secret/team/app#password");

        let a = parse("vault://secret/app?version=3#password").expect("query first");
        let b = parse("vault://secret/app#password?version=3").expect("fragment first");
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "vault://secret/app?version=3#password");
        assert_eq!(parse(&a.to_string()), Ok(a));
    }

    #[test]
    fn vault_references_are_strict() {
        let cases = [
            ("vault://secret/app", "vault field"),
            ("vault://secret#f", "vault path"),
            ("vault://secret/#f", "vault path"),
            ("vault:///app#f", "vault mount"),
            ("vault://secret/a//b#f", "vault path"),
            ("vault://secret/../sys/raw#f", "vault path"),
            ("vault://secret/a/./b#f", "vault path"),
            ("vault://secret/a%2Fb#f", "vault path"),
            ("vault://secret/a b#f", "vault path"),
            ("vault://secret/app#", "vault field"),
            ("vault://secret/app#pass word", "vault field"),
            ("vault://secret/app?version=0#f", "version"),
            ("vault://secret/app?version=01#f", "version"),
            ("vault://secret/app?version=-1#f", "version"),
            ("vault://secret/app?version=x#f", "version"),
            ("vault://secret/app?v=1#f", "query"),
            ("vault://secret/app?version=1&version=2#f", "query"),
            ("vault://secret/app?#f", "query"),
            ("vault://secret/app#f#g", "reference"),
            ("vault://secret/app?version=1?x#f", "query"),
        ];
        for (input, part) in cases {
            let error = parse(input).expect_err(input);
            assert_eq!(error.part, part, "{input}: {error}");
        }
    }

    #[test]
    fn aws_references_parse() {
        let r = parse("aws-sm://prod/db#password").expect("with key");
        let Reference::AwsSm(a) = &r else {
            panic!("not aws: {r:?}")
        };
        assert_eq!(
            (a.secret_id(), a.json_key(), a.version_stage()),
            ("prod/db", Some("password"), None)
        );

        let r = parse("aws-sm://prod/api-token").expect("whole string");
        let Reference::AwsSm(a) = &r else {
            panic!("not aws: {r:?}")
        };
        assert_eq!(a.json_key(), None);
        assert_eq!(r.to_string(), "aws-sm://prod/api-token");

        let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-AbCdEf";
        let r = parse(&format!("aws-sm://{arn}#user?version-stage=AWSPREVIOUS")).expect("arn");
        let Reference::AwsSm(a) = &r else {
            panic!("not aws: {r:?}")
        };
        assert_eq!(
            (a.secret_id(), a.json_key(), a.version_stage()),
            (arn, Some("user"), Some("AWSPREVIOUS"))
        );
        assert_eq!(
            r.to_string(),
            format!("aws-sm://{arn}?version-stage=AWSPREVIOUS#user")
        );

        for (input, part) in [
            ("aws-sm://", "secret id"),
            ("aws-sm://#k", "secret id"),
            ("aws-sm://a b", "secret id"),
            ("aws-sm://a%20b", "secret id"),
            ("aws-sm://db#", "json key"),
            ("aws-sm://db?version=1", "query"),
            ("aws-sm://db?version-stage=", "version stage"),
            ("aws-sm://db?version-stage=a b", "version stage"),
        ] {
            let error = parse(input).expect_err(input);
            assert_eq!(error.part, part, "{input}: {error}");
        }
    }

    #[test]
    fn agentcore_references_parse() {
        let r = parse("agentcore://github-api_key").expect("provider");
        assert_eq!(
            r,
            Reference::AgentCore(AgentCoreRef {
                provider: "github-api_key".into()
            })
        );
        assert_eq!(r.to_string(), "agentcore://github-api_key");
        for input in [
            "agentcore://",
            "agentcore://a/b",
            "agentcore://a#b",
            "agentcore://a?x=1",
            "agentcore://a.b",
        ] {
            assert_eq!(
                parse(input).expect_err(input).part,
                "provider name",
                "{input}"
            );
        }
        let long = format!("agentcore://{}", "a".repeat(129));
        assert!(parse(&long).is_err());
    }

    #[test]
    fn other_strings_are_refused_without_being_repeated() {
        for input in [
            "",
            "sk-ant-CANARY-1234",
            "https://vault/x#y",
            "VAULT://secret/a#b",
        ] {
            let message = parse(input).expect_err(input).to_string();
            if !input.is_empty() {
                assert!(!message.contains(input), "{message}");
            }
        }
        let long = format!("vault://secret/{}#f", "a".repeat(MAX_REFERENCE_LEN));
        assert_eq!(parse(&long).expect_err("long").part, "reference");
        let error = parse("vault://secret/app#f?token=CANARY-x").expect_err("query");
        assert!(!error.to_string().contains("CANARY"), "{error}");
    }

    #[test]
    fn tenant_scopes_match_whole_segments() {
        let scopes = TenantScopes::new()
            .allow("acme", "secret/acme")
            .allow("acme", "shared/")
            .allow("ops", "*");
        assert!(scopes.allows("acme", "secret/acme"));
        assert!(scopes.allows("acme", "secret/acme/db"));
        assert!(!scopes.allows("acme", "secret/acme-evil/db"));
        assert!(scopes.allows("acme", "shared/x"));
        assert!(!scopes.allows("acme", "shared"));
        assert!(!scopes.allows("globex", "secret/acme/db"));
        assert!(scopes.allows("ops", "anything/at/all"));
        assert!(!TenantScopes::new().allows("acme", "x"));
    }

    #[test]
    fn scrubbed_json_picks_scalars() {
        let mut doc: ScrubJson =
            serde_json::from_str(r#"{"s":"CANARY-v","n":5432,"b":true,"o":{},"z":null}"#)
                .expect("json");
        let Picked::Value(v) = doc.take("s") else {
            panic!("s")
        };
        assert_eq!(v.expose(), b"CANARY-v");
        let Picked::Value(v) = doc.take("n") else {
            panic!("n")
        };
        assert_eq!(v.expose(), b"5432");
        let Picked::Value(v) = doc.take("b") else {
            panic!("b")
        };
        assert_eq!(v.expose(), b"true");
        assert!(matches!(doc.take("o"), Picked::NotAScalar));
        assert!(matches!(doc.take("z"), Picked::NotAScalar));
        assert!(matches!(doc.take("missing"), Picked::NoSuchKey));
        let mut not_object: ScrubJson = serde_json::from_str(r#""CANARY-x""#).expect("json");
        assert!(matches!(not_object.take("s"), Picked::NotAnObject));
    }

    #[test]
    fn configuration_deserializes_and_never_prints_credentials() {
        let config: BackendsConfig = serde_json::from_value(serde_json::json!({
            "vault": {
                "address": "https://vault.internal:8200/",
                "namespace": "team-a",
                "auth": { "method": "approle", "role_id": "CANARY-role", "secret_id": "CANARY-sid" },
                "tenants": { "acme": ["secret/acme/"] },
                "http": { "timeout_ms": 2000 }
            },
            "aws_sm": {
                "region": "eu-west-1",
                "credentials": {
                    "access_key_id": "AKIDEXAMPLE",
                    "secret_access_key": "CANARY-sak",
                    "session_token": "CANARY-session"
                },
                "tenants": { "acme": ["acme/"] }
            },
            "agentcore": {
                "region": "us-east-1",
                "endpoint": "https://bedrock-agentcore.us-east-1.amazonaws.com",
                "credentials": { "access_key_id": "AKIDEXAMPLE", "secret_access_key": "CANARY-sak" }
            }
        }))
        .expect("config");
        assert!(!format!("{config:?}").contains("CANARY"));
        let backends = Backends::new(config).expect("backends");
        assert!(!format!("{backends:?}").contains("CANARY"));
        let vault = Reference::parse("vault://secret/acme/db#password").expect("reference");
        assert_eq!(backends.check_allowed("acme", &vault), Ok(()));
        let agentcore = Reference::parse("agentcore://github").expect("reference");
        let refused = backends
            .check_allowed("acme", &agentcore)
            .expect_err("no agentcore tenants");
        assert_eq!(refused.kind, ErrorKind::Denied);

        let token: BackendsConfig = serde_json::from_value(serde_json::json!({
            "vault": { "address": "http://127.0.0.1:8200", "auth": { "method": "token", "token": "CANARY-t" } }
        }))
        .expect("token config");
        Backends::new(token).expect("token backends");
        for bad in [
            serde_json::json!({ "vault": { "address": "ftp://x", "auth": { "method": "token", "token": "t" } } }),
            serde_json::json!({ "vault": { "address": "http://u:p@x", "auth": { "method": "token", "token": "t" } } }),
            serde_json::json!({ "aws_sm": { "region": "eu west", "credentials": { "access_key_id": "a", "secret_access_key": "s" } } }),
            serde_json::json!({ "aws_sm": { "region": "x", "endpoint": "http://h/path", "credentials": { "access_key_id": "a", "secret_access_key": "s" } } }),
        ] {
            let config: BackendsConfig = serde_json::from_value(bad.clone()).expect("shape");
            assert!(Backends::new(config).is_err(), "{bad}");
        }
        let unknown = serde_json::json!({ "vault": { "address": "http://x", "auth": { "method": "token", "token": "t", "extra": 1 } } });
        assert!(serde_json::from_value::<BackendsConfig>(unknown).is_err());
    }

    #[test]
    fn credentials_never_print() {
        let c = Credential::new("s.CANARY-token");
        assert_eq!(format!("{c:?}"), "[redacted]");
        let header = c.header_value().expect("header");
        assert!(header.is_sensitive());
        assert!(!format!("{header:?}").contains("CANARY"));
    }
}
