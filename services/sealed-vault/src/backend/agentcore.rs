//! AWS Bedrock AgentCore Identity: `GetResourceApiKey` fetches the API key an
//! API key credential provider holds, for a workload identified by its
//! workload access token.
//!
//! The data plane's REST-JSON route (botocore `bedrock-agentcore` 2024-02-28):
//! `POST /identities/api-key` with `{"resourceCredentialProviderName",
//! "workloadIdentityToken"}`, answering `200 {"apiKey"}`; errors carry their
//! type in `x-amzn-ErrorType` (ValidationException 400, UnauthorizedException
//! 401, AccessDeniedException 403, ResourceNotFoundException 404,
//! ThrottlingException 429, InternalServerException 500). Requests are SigV4
//! signed for the service `bedrock-agentcore`.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::aws_sm::{AwsCredentials, classify, sigv4};
use super::{
    AGENTCORE, AgentCoreRef, BackendError, ConfigError, ErrorKind, HttpOptions, Resolved,
    TenantScopes, ZString, read_body, request_id, secret_json_body, transport_detail,
};
use crate::secret::SecretValue;

const SERVICE: &str = "bedrock-agentcore";
const API_KEY_PATH: &str = "/identities/api-key";
/// The API's bound on `workloadIdentityToken`.
const MAX_TOKEN_LEN: usize = 131_072;

/// How to reach AgentCore Identity.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentCoreConfig {
    /// The region, such as `us-east-1`; part of the signature's scope.
    pub region: String,
    /// The endpoint; default `https://bedrock-agentcore.<region>.amazonaws.com`.
    #[serde(default)]
    pub endpoint: Option<String>,
    pub credentials: AwsCredentials,
    /// Which tenants may use which credential providers.
    #[serde(default)]
    pub tenants: TenantScopes,
    #[serde(default)]
    pub http: HttpOptions,
}

/// A client of one region's AgentCore Identity data plane.
#[derive(Debug)]
pub struct AgentCoreClient {
    http: reqwest::Client,
    signer: sigv4::Endpoint,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GetResourceApiKeyRequest<'a> {
    resource_credential_provider_name: &'a str,
    workload_identity_token: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GetResourceApiKeyResponse {
    api_key: Option<ZString>,
}

/// The REST-JSON error body; its free-text message is ignored.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "__type", default)]
    kind: String,
}

impl AgentCoreClient {
    pub fn new(config: AgentCoreConfig) -> Result<Self, ConfigError> {
        let endpoint = config.endpoint.clone().unwrap_or_else(|| {
            format!("https://bedrock-agentcore.{}.amazonaws.com", config.region)
        });
        Ok(Self {
            http: config.http.client(AGENTCORE)?,
            signer: sigv4::Endpoint::new(
                AGENTCORE,
                &endpoint,
                &config.region,
                SERVICE,
                config.credentials,
            )?,
        })
    }

    /// GetResourceApiKey for the provider the reference names.
    pub async fn api_key(
        &self,
        reference: &AgentCoreRef,
        workload_access_token: &SecretValue,
    ) -> Result<Resolved, BackendError> {
        let token = std::str::from_utf8(workload_access_token.expose())
            .ok()
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN)
            .ok_or_else(|| {
                error(
                    ErrorKind::Malformed,
                    reference,
                    "the workload access token is not 1 to 131072 bytes of utf-8",
                )
            })?;
        let body = secret_json_body(&GetResourceApiKeyRequest {
            resource_credential_provider_name: reference.provider(),
            workload_identity_token: token,
        });
        let headers = [("content-type", "application/json")];
        let response = self
            .signer
            .post(&self.http, API_KEY_PATH, &headers, body)
            .send()
            .await
            .map_err(|e| error(ErrorKind::Unavailable, reference, transport_detail(&e)))?;
        let status = response.status();
        let request_id = request_id(response.headers(), "x-amzn-requestid");
        let error_type = super::request_id(response.headers(), "x-amzn-errortype");
        let body = read_body(response)
            .await
            .map_err(|detail| error(ErrorKind::Unavailable, reference, detail))?;
        if !status.is_success() {
            let code = if error_type.is_empty() {
                serde_json::from_slice::<ErrorBody>(body.as_slice())
                    .map(|b| b.kind)
                    .unwrap_or_default()
            } else {
                error_type
            };
            let (kind, detail) = match classify(&code) {
                (ErrorKind::Unavailable, _) if code.is_empty() => by_status(status),
                classified => classified,
            };
            return Err(error(kind, reference, detail));
        }
        let api_key = serde_json::from_slice::<GetResourceApiKeyResponse>(body.as_slice())
            .ok()
            .and_then(|r| r.api_key)
            .ok_or_else(|| {
                error(
                    ErrorKind::Malformed,
                    reference,
                    "the GetResourceApiKey response has no apiKey",
                )
            })?;
        Ok(Resolved {
            value: api_key.into_secret(),
            version: String::new(),
            request_id,
            backend: AGENTCORE,
        })
    }
}

/// An error answer without a type: the status decides.
fn by_status(status: reqwest::StatusCode) -> (ErrorKind, Cow<'static, str>) {
    let kind = match status.as_u16() {
        400 => ErrorKind::Malformed,
        401 | 403 => ErrorKind::Denied,
        404 => ErrorKind::NotFound,
        _ => ErrorKind::Unavailable,
    };
    (
        kind,
        Cow::Owned(format!("agentcore answered {}", status.as_u16())),
    )
}

fn error(
    kind: ErrorKind,
    reference: &AgentCoreRef,
    detail: impl Into<Cow<'static, str>>,
) -> BackendError {
    BackendError::new(kind, AGENTCORE, reference, detail)
}
