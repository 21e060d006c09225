//! HashiCorp Vault / OpenBao KV v2 over HTTP(S).
//!
//! Reads `GET /v1/<mount>/data/<path>[?version=<n>]` with an `X-Vault-Token`
//! (and `X-Vault-Namespace` when configured). The token is either configured
//! or obtained by AppRole login (`POST /v1/auth/<approle-mount>/login`), cached
//! until 90 % of its lease has passed, and replaced by a fresh login when
//! Vault answers 403 (the token was revoked or expired early).

use std::borrow::Cow;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{
    BackendError, ConfigError, Credential, ErrorKind, HttpOptions, Picked, Resolved, ScrubJson,
    TenantScopes, VAULT, VaultRef, ZString, base_url, read_body, secret_json_body,
    transport_detail,
};

/// How to reach and authenticate to one Vault or OpenBao server.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// The server's address, such as `https://vault.internal:8200`.
    pub address: String,
    /// The Vault Enterprise / OpenBao namespace, sent as `X-Vault-Namespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    pub auth: VaultAuth,
    /// Which tenants may read which `<mount>/<path>` prefixes.
    #[serde(default)]
    pub tenants: TenantScopes,
    #[serde(default)]
    pub http: HttpOptions,
}

/// How sealed-vault authenticates to Vault.
#[derive(Debug, Deserialize)]
#[serde(tag = "method", deny_unknown_fields)]
pub enum VaultAuth {
    /// A fixed token.
    #[serde(rename = "token")]
    Token { token: Credential },
    /// AppRole login; `mount` is the auth mount's path (default `approle`).
    #[serde(rename = "approle")]
    AppRole {
        role_id: Credential,
        secret_id: Credential,
        #[serde(default = "default_approle_mount")]
        mount: String,
    },
}

fn default_approle_mount() -> String {
    "approle".to_owned()
}

/// A client of one Vault server's KV v2 engines.
#[derive(Debug)]
pub struct VaultClient {
    http: reqwest::Client,
    /// The address without a trailing `/`.
    base: String,
    namespace: Option<HeaderValue>,
    auth: Auth,
}

#[derive(Debug)]
enum Auth {
    Token(Credential),
    AppRole(AppRole),
}

#[derive(Debug)]
struct AppRole {
    login_url: String,
    role_id: Credential,
    secret_id: Credential,
    /// The current login; the lock also makes concurrent re-logins one login.
    lease: Mutex<Option<Lease>>,
}

#[derive(Debug)]
struct Lease {
    token: Credential,
    /// When to log in again; `None` for a token without expiry.
    renew_at: Option<Instant>,
}

#[derive(Serialize)]
struct LoginRequest<'a> {
    role_id: &'a str,
    secret_id: &'a str,
}

#[derive(Deserialize)]
struct LoginResponse {
    auth: Option<LoginAuth>,
}

#[derive(Deserialize)]
struct LoginAuth {
    client_token: ZString,
    #[serde(default)]
    lease_duration: u64,
}

#[derive(Deserialize)]
struct KvResponse {
    #[serde(default)]
    request_id: String,
    data: Option<KvData>,
}

#[derive(Deserialize)]
struct KvData {
    #[serde(default)]
    data: Option<ScrubJson>,
    metadata: Option<KvMetadata>,
}

#[derive(Deserialize)]
struct KvMetadata {
    version: u64,
    #[serde(default)]
    deletion_time: String,
    #[serde(default)]
    destroyed: bool,
}

impl VaultClient {
    pub fn new(config: VaultConfig) -> Result<Self, ConfigError> {
        let base = base_url(VAULT, "address", &config.address)?
            .as_str()
            .trim_end_matches('/')
            .to_owned();
        let namespace = config
            .namespace
            .as_deref()
            .map(|ns| {
                HeaderValue::from_str(ns)
                    .map_err(|_| ConfigError::new(VAULT, "namespace", "not a valid header value"))
            })
            .transpose()?;
        let auth = match config.auth {
            VaultAuth::Token { token } => {
                if token.header_value().is_none() {
                    return Err(ConfigError::new(
                        VAULT,
                        "auth.token",
                        "not a valid header value",
                    ));
                }
                Auth::Token(token)
            }
            VaultAuth::AppRole {
                role_id,
                secret_id,
                mount,
            } => {
                let valid_mount = !mount.is_empty()
                    && mount.split('/').all(|s| {
                        !s.is_empty()
                            && s != ".."
                            && s != "."
                            && s.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                    });
                if !valid_mount {
                    return Err(ConfigError::new(
                        VAULT,
                        "auth.mount",
                        "expected an auth mount path such as approle",
                    ));
                }
                Auth::AppRole(AppRole {
                    login_url: format!("{base}/v1/auth/{mount}/login"),
                    role_id,
                    secret_id,
                    lease: Mutex::new(None),
                })
            }
        };
        Ok(Self {
            http: config.http.client(VAULT)?,
            base,
            namespace,
            auth,
        })
    }

    /// Reads a KV v2 secret and returns one field of it.
    pub async fn read(&self, reference: &VaultRef) -> Result<Resolved, BackendError> {
        let mut url = format!(
            "{}/v1/{}/data/{}",
            self.base,
            reference.mount(),
            reference.path()
        );
        if let Some(version) = reference.version() {
            url.push_str(&format!("?version={version}"));
        }
        let token = self.token(reference, None).await?;
        let mut response = self.get(&url, &token, reference).await?;
        if response.status() == StatusCode::FORBIDDEN && matches!(self.auth, Auth::AppRole(_)) {
            // The login may have been revoked or expired early: log in again, once.
            let token = self.token(reference, Some(&token)).await?;
            response = self.get(&url, &token, reference).await?;
        }
        let status = response.status();
        let body = read_body(response)
            .await
            .map_err(|detail| error(ErrorKind::Unavailable, reference, detail))?;
        match status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(not_found(reference, body.as_slice())),
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                return Err(error(
                    ErrorKind::Denied,
                    reference,
                    "vault answered 403 permission denied",
                ));
            }
            StatusCode::BAD_REQUEST => {
                return Err(error(
                    ErrorKind::Malformed,
                    reference,
                    "vault answered 400 bad request",
                ));
            }
            other => {
                return Err(error(
                    ErrorKind::Unavailable,
                    reference,
                    format!("vault answered {}", other.as_u16()),
                ));
            }
        }
        let response: KvResponse = serde_json::from_slice(body.as_slice()).map_err(|_| {
            error(
                ErrorKind::Malformed,
                reference,
                "the response is not a kv v2 read (is the mount kv version 2?)",
            )
        })?;
        let Some(KvData {
            data: Some(mut data),
            metadata: Some(metadata),
        }) = response.data
        else {
            return Err(error(
                ErrorKind::NotFound,
                reference,
                "the version holds no data (deleted or destroyed)",
            ));
        };
        let value = match data.take(reference.field()) {
            Picked::Value(value) => value,
            Picked::NoSuchKey => {
                return Err(error(
                    ErrorKind::NotFound,
                    reference,
                    "the secret has no such field",
                ));
            }
            Picked::NotAnObject => {
                return Err(error(
                    ErrorKind::Malformed,
                    reference,
                    "the secret's data is not an object",
                ));
            }
            Picked::NotAScalar => {
                return Err(error(
                    ErrorKind::Malformed,
                    reference,
                    "the field is not a string, number or boolean",
                ));
            }
        };
        Ok(Resolved {
            value,
            version: metadata.version.to_string(),
            request_id: response.request_id,
            backend: VAULT,
        })
    }

    async fn get(
        &self,
        url: &str,
        token: &Credential,
        reference: &VaultRef,
    ) -> Result<reqwest::Response, BackendError> {
        let mut request = self.http.get(url);
        if let Some(token) = token.header_value() {
            request = request.header("X-Vault-Token", token);
        }
        if let Some(namespace) = &self.namespace {
            request = request.header("X-Vault-Namespace", namespace.clone());
        }
        request
            .send()
            .await
            .map_err(|e| error(ErrorKind::Unavailable, reference, transport_detail(&e)))
    }

    /// The token to use; `stale` is one Vault just refused, which a fresh
    /// AppRole login replaces unless another request already did.
    async fn token(
        &self,
        reference: &VaultRef,
        stale: Option<&Credential>,
    ) -> Result<Credential, BackendError> {
        let approle = match &self.auth {
            Auth::Token(token) => return Ok(token.clone()),
            Auth::AppRole(approle) => approle,
        };
        let mut lease = approle.lease.lock().await;
        if let Some(current) = lease.as_ref() {
            let fresh = current.renew_at.is_none_or(|at| Instant::now() < at);
            let refused = stale.is_some_and(|stale| *stale == current.token);
            if fresh && !refused {
                return Ok(current.token.clone());
            }
        }
        *lease = None;
        let login = self.login(approle, reference).await?;
        let token = login.token.clone();
        *lease = Some(login);
        Ok(token)
    }

    async fn login(&self, approle: &AppRole, reference: &VaultRef) -> Result<Lease, BackendError> {
        let body = secret_json_body(&LoginRequest {
            role_id: approle.role_id.expose(),
            secret_id: approle.secret_id.expose(),
        });
        let mut request = self
            .http
            .post(&approle.login_url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(namespace) = &self.namespace {
            request = request.header("X-Vault-Namespace", namespace.clone());
        }
        let response = request.send().await.map_err(|e| {
            error(
                ErrorKind::Unavailable,
                reference,
                login_detail(transport_detail(&e)),
            )
        })?;
        let status = response.status();
        let body = read_body(response)
            .await
            .map_err(|detail| error(ErrorKind::Unavailable, reference, login_detail(detail)))?;
        match status {
            StatusCode::OK => {}
            StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                return Err(error(
                    ErrorKind::Denied,
                    reference,
                    format!("approle login refused ({})", status.as_u16()),
                ));
            }
            other => {
                return Err(error(
                    ErrorKind::Unavailable,
                    reference,
                    format!("approle login answered {}", other.as_u16()),
                ));
            }
        }
        let auth = serde_json::from_slice::<LoginResponse>(body.as_slice())
            .ok()
            .and_then(|r| r.auth)
            .ok_or_else(|| {
                error(
                    ErrorKind::Malformed,
                    reference,
                    "the approle login response has no auth.client_token",
                )
            })?;
        let token = Credential(auth.client_token.0);
        if token.expose().is_empty() || token.header_value().is_none() {
            return Err(error(
                ErrorKind::Malformed,
                reference,
                "the approle login returned an unusable token",
            ));
        }
        let renew_at = (auth.lease_duration > 0)
            .then(|| Instant::now() + Duration::from_secs(auth.lease_duration) * 9 / 10);
        tracing::debug!(
            lease_seconds = auth.lease_duration,
            "logged in to vault with approle"
        );
        Ok(Lease { token, renew_at })
    }
}

fn error(
    kind: ErrorKind,
    reference: &VaultRef,
    detail: impl Into<Cow<'static, str>>,
) -> BackendError {
    BackendError::new(kind, VAULT, reference, detail)
}

fn login_detail(detail: Cow<'static, str>) -> String {
    format!("approle login: {detail}")
}

/// A 404: no secret, no such version, or a version deleted or destroyed.
fn not_found(reference: &VaultRef, body: &[u8]) -> BackendError {
    let metadata = serde_json::from_slice::<KvResponse>(body)
        .ok()
        .and_then(|r| r.data)
        .and_then(|d| d.metadata);
    let detail = match metadata {
        Some(m) if m.destroyed => "the version is destroyed",
        Some(m) if !m.deletion_time.is_empty() => "the version is deleted",
        _ if reference.version().is_some() => "no such secret or version",
        _ => "no secret at this path",
    };
    error(ErrorKind::NotFound, reference, detail)
}
