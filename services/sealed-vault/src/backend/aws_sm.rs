//! AWS Secrets Manager over its JSON protocol (`POST /`, `X-Amz-Target:
//! secretsmanager.<Operation>`, `application/x-amz-json-1.1`), signed with
//! SigV4 by [`sigv4`] (shared with the AgentCore client).
//!
//! References reading `AWSCURRENT` are fetched together with
//! BatchGetSecretValue (20 secrets a call, the API's limit); a secret the batch
//! answer does not account for is fetched again with GetSecretValue.

use std::borrow::Cow;
use std::collections::HashMap;

use base64::Engine as _;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};

use super::{
    AWS_SM, AwsSmRef, BackendError, ConfigError, Credential, ErrorKind, HttpOptions, Picked,
    Resolved, ScrubJson, TenantScopes, ZString, read_body, request_id, transport_detail,
};
use crate::secret::SecretValue;

/// BatchGetSecretValue's limit on `SecretIdList`.
const BATCH_LIMIT: usize = 20;
const SERVICE: &str = "secretsmanager";

/// AWS credentials: an access key and, for temporary credentials, a session token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Credential,
    #[serde(default)]
    pub session_token: Option<Credential>,
}

/// How to reach AWS Secrets Manager.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSmConfig {
    /// The region, such as `eu-west-1`; part of the signature's scope.
    pub region: String,
    /// The endpoint; default `https://secretsmanager.<region>.amazonaws.com`.
    #[serde(default)]
    pub endpoint: Option<String>,
    pub credentials: AwsCredentials,
    /// Which tenants may read which secret-id prefixes.
    #[serde(default)]
    pub tenants: TenantScopes,
    #[serde(default)]
    pub http: HttpOptions,
}

/// A client of one region's Secrets Manager.
#[derive(Debug)]
pub struct AwsSmClient {
    http: reqwest::Client,
    signer: sigv4::Endpoint,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct GetSecretValueRequest<'a> {
    secret_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version_stage: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct BatchGetSecretValueRequest<'a> {
    secret_id_list: &'a [&'a str],
}

/// One secret's value as GetSecretValue and BatchGetSecretValue return it.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SecretValueEntry {
    #[serde(rename = "ARN", default)]
    arn: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    version_id: String,
    #[serde(default)]
    secret_string: Option<ZString>,
    /// Base64 on the wire.
    #[serde(default)]
    secret_binary: Option<ZString>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BatchGetSecretValueResponse {
    #[serde(default)]
    secret_values: Vec<SecretValueEntry>,
    #[serde(default)]
    errors: Vec<BatchError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BatchError {
    #[serde(default)]
    secret_id: String,
    #[serde(default)]
    error_code: String,
}

/// The JSON protocol's error body; `message` is ignored (free text).
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "__type", default)]
    kind: String,
}

/// A fetched secret, before a JSON key is picked out of it.
struct Fetched {
    entry: SecretValueEntry,
    request_id: String,
}

impl AwsSmClient {
    pub fn new(config: AwsSmConfig) -> Result<Self, ConfigError> {
        let endpoint = config
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://secretsmanager.{}.amazonaws.com", config.region));
        Ok(Self {
            http: config.http.client(AWS_SM)?,
            signer: sigv4::Endpoint::new(
                AWS_SM,
                &endpoint,
                &config.region,
                SERVICE,
                config.credentials,
            )?,
        })
    }

    /// GetSecretValue, then the JSON key if the reference names one.
    pub async fn get(&self, reference: &AwsSmRef) -> Result<Resolved, BackendError> {
        let body = serde_json::to_vec(&GetSecretValueRequest {
            secret_id: reference.secret_id(),
            version_stage: reference.version_stage(),
        })
        .map_err(|_| {
            error(
                ErrorKind::Malformed,
                reference,
                "the request could not be encoded",
            )
        })?;
        let (headers, body) = self
            .call("GetSecretValue", body)
            .await
            .map_err(|(kind, detail)| error(kind, reference, detail))?;
        let entry: SecretValueEntry = serde_json::from_slice(body.as_slice()).map_err(|_| {
            error(
                ErrorKind::Malformed,
                reference,
                "the GetSecretValue response does not parse",
            )
        })?;
        extract(
            reference,
            &Fetched {
                entry,
                request_id: request_id(&headers, "x-amzn-requestid"),
            },
        )
    }

    /// Fetches `references` (all reading `AWSCURRENT`) with as few
    /// BatchGetSecretValue calls as possible; one result per reference, in order.
    pub async fn batch_get(&self, references: &[&AwsSmRef]) -> Vec<Result<Resolved, BackendError>> {
        let mut ids: Vec<&str> = Vec::new();
        for reference in references {
            if !ids.contains(&reference.secret_id()) {
                ids.push(reference.secret_id());
            }
        }
        let chunks =
            futures::future::join_all(ids.chunks(BATCH_LIMIT).map(|chunk| self.batch_call(chunk)))
                .await;
        let mut fetched: HashMap<&str, Result<Fetched, (ErrorKind, Cow<'static, str>)>> =
            HashMap::new();
        for (chunk, answer) in ids.chunks(BATCH_LIMIT).zip(chunks) {
            match answer {
                Ok((request_id, response)) => {
                    let mut values = response.secret_values;
                    for id in chunk {
                        if let Some(at) = values.iter().position(|v| v.name == *id || v.arn == *id)
                        {
                            let entry = values.swap_remove(at);
                            fetched.insert(
                                id,
                                Ok(Fetched {
                                    entry,
                                    request_id: request_id.clone(),
                                }),
                            );
                        } else if let Some(failed) =
                            response.errors.iter().find(|e| e.secret_id == *id)
                        {
                            fetched.insert(id, Err(classify(&failed.error_code)));
                        }
                        // Unaccounted for (a partial ARN, say): fetched alone below.
                    }
                }
                Err(failure) => {
                    for id in chunk {
                        fetched.insert(id, Err(failure.clone()));
                    }
                }
            }
        }
        let mut results = Vec::with_capacity(references.len());
        for reference in references {
            let result = match fetched.get(reference.secret_id()) {
                Some(Ok(secret)) => extract(reference, secret),
                Some(Err((kind, detail))) => Err(error(*kind, reference, detail.clone())),
                None => self.get(reference).await,
            };
            results.push(result);
        }
        results
    }

    async fn batch_call(
        &self,
        ids: &[&str],
    ) -> Result<(String, BatchGetSecretValueResponse), (ErrorKind, Cow<'static, str>)> {
        let body = serde_json::to_vec(&BatchGetSecretValueRequest {
            secret_id_list: ids,
        })
        .map_err(|_| {
            (
                ErrorKind::Malformed,
                Cow::Borrowed("the request could not be encoded"),
            )
        })?;
        let (headers, body) = self.call("BatchGetSecretValue", body).await?;
        let response = serde_json::from_slice(body.as_slice()).map_err(|_| {
            (
                ErrorKind::Malformed,
                Cow::Borrowed("the BatchGetSecretValue response does not parse"),
            )
        })?;
        Ok((request_id(&headers, "x-amzn-requestid"), response))
    }

    /// One signed JSON-protocol call; a non-200 answer becomes its error kind.
    async fn call(
        &self,
        operation: &str,
        body: Vec<u8>,
    ) -> Result<(HeaderMap, super::ZBuf), (ErrorKind, Cow<'static, str>)> {
        let target = format!("secretsmanager.{operation}");
        let headers = [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", target.as_str()),
        ];
        let response = self
            .signer
            .post(&self.http, "/", &headers, body)
            .send()
            .await
            .map_err(|e| (ErrorKind::Unavailable, transport_detail(&e)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = read_body(response)
            .await
            .map_err(|d| (ErrorKind::Unavailable, d))?;
        if status.is_success() {
            return Ok((headers, body));
        }
        let code = serde_json::from_slice::<ErrorBody>(body.as_slice())
            .map(|b| b.kind)
            .unwrap_or_default();
        let code = if code.is_empty() {
            super::request_id(&headers, "x-amzn-errortype")
        } else {
            code
        };
        let (kind, detail) = classify(&code);
        let detail = if status.is_server_error() && kind != ErrorKind::Unavailable {
            Cow::Owned(format!("aws answered {}: {detail}", status.as_u16()))
        } else {
            detail
        };
        Err((kind, detail))
    }
}

/// Maps an AWS error code (`ResourceNotFoundException`, or
/// `com.amazonaws...#ResourceNotFoundException`, or with a `:` suffix) to a kind.
/// The detail holds the code only, never AWS's free-text message.
pub(crate) fn classify(code: &str) -> (ErrorKind, Cow<'static, str>) {
    let code = code.rsplit('#').next().unwrap_or(code);
    let code = code.split(':').next().unwrap_or(code);
    let printable = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    let kind = match code {
        "ResourceNotFoundException" => ErrorKind::NotFound,
        "AccessDeniedException"
        | "UnauthorizedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "ExpiredTokenException"
        | "InvalidClientTokenId"
        | "DecryptionFailure" => ErrorKind::Denied,
        "ValidationException"
        | "InvalidParameterException"
        | "InvalidRequestException"
        | "SerializationException" => ErrorKind::Malformed,
        _ => ErrorKind::Unavailable,
    };
    let detail = if printable {
        Cow::Owned(format!("aws answered {code}"))
    } else {
        Cow::Borrowed("aws answered an error without a recognizable code")
    };
    (kind, detail)
}

/// The value a reference asks for: the whole `SecretString`, one key of it
/// parsed as JSON, or the `SecretBinary`.
fn extract(reference: &AwsSmRef, fetched: &Fetched) -> Result<Resolved, BackendError> {
    let entry = &fetched.entry;
    let value = match (
        &entry.secret_string,
        &entry.secret_binary,
        reference.json_key(),
    ) {
        (Some(string), _, None) => SecretValue::from_slice(string.0.as_bytes()),
        (Some(string), _, Some(key)) => {
            let mut json: ScrubJson = serde_json::from_str(&string.0).map_err(|_| {
                error(
                    ErrorKind::Malformed,
                    reference,
                    "the SecretString is not JSON, so it has no keys",
                )
            })?;
            match json.take(key) {
                Picked::Value(value) => value,
                Picked::NoSuchKey => {
                    return Err(error(
                        ErrorKind::NotFound,
                        reference,
                        "the SecretString has no such key",
                    ));
                }
                Picked::NotAnObject => {
                    return Err(error(
                        ErrorKind::Malformed,
                        reference,
                        "the SecretString is not a JSON object",
                    ));
                }
                Picked::NotAScalar => {
                    return Err(error(
                        ErrorKind::Malformed,
                        reference,
                        "the key's value is not a string, number or boolean",
                    ));
                }
            }
        }
        (None, Some(binary), None) => base64::engine::general_purpose::STANDARD
            .decode(binary.0.as_bytes())
            .map(SecretValue::new)
            .map_err(|_| {
                error(
                    ErrorKind::Malformed,
                    reference,
                    "the SecretBinary is not base64",
                )
            })?,
        (None, Some(_), Some(_)) => {
            return Err(error(
                ErrorKind::Malformed,
                reference,
                "the secret is binary: a json key needs a SecretString",
            ));
        }
        (None, None, _) => {
            return Err(error(
                ErrorKind::Malformed,
                reference,
                "the answer has neither SecretString nor SecretBinary",
            ));
        }
    };
    Ok(Resolved {
        value,
        version: entry.version_id.clone(),
        request_id: fetched.request_id.clone(),
        backend: AWS_SM,
    })
}

fn error(
    kind: ErrorKind,
    reference: &AwsSmRef,
    detail: impl Into<Cow<'static, str>>,
) -> BackendError {
    BackendError::new(kind, AWS_SM, reference, detail)
}

/// AWS Signature Version 4, by hand (hmac + sha2), for the JSON and REST-JSON
/// protocols this crate speaks: see "Create a signed AWS API request" in the
/// IAM user guide. Checked against AWS's documented example and, when Python's
/// botocore is installed, against botocore's signer.
pub(crate) mod sigv4 {
    use std::fmt::Write as _;

    use hmac::{Hmac, Mac};
    use reqwest::header::HeaderValue;
    use sha2::{Digest, Sha256};
    use time::OffsetDateTime;
    use zeroize::Zeroizing;

    use super::AwsCredentials;
    use crate::backend::{ConfigError, base_url};

    type HmacSha256 = Hmac<Sha256>;

    /// One service endpoint and the credentials that sign for it.
    #[derive(Debug)]
    pub(crate) struct Endpoint {
        /// `scheme://host[:port]` without a trailing `/`.
        base: String,
        /// The `Host` header: the host, and the port when it is not the scheme's default.
        host: String,
        region: String,
        service: &'static str,
        credentials: AwsCredentials,
    }

    /// What signing adds to a request.
    #[derive(Debug)]
    pub(crate) struct Signed {
        pub amz_date: String,
        pub authorization: String,
    }

    impl Endpoint {
        pub(crate) fn new(
            backend: &'static str,
            endpoint: &str,
            region: &str,
            service: &'static str,
            credentials: AwsCredentials,
        ) -> Result<Self, ConfigError> {
            let url = base_url(backend, "endpoint", endpoint)?;
            if url.path() != "/" && !url.path().is_empty() {
                return Err(ConfigError::new(
                    backend,
                    "endpoint",
                    "expected scheme://host[:port] without a path",
                ));
            }
            let host = match (url.host_str(), url.port()) {
                (Some(host), Some(port)) => format!("{host}:{port}"),
                (Some(host), None) => host.to_owned(),
                (None, _) => return Err(ConfigError::new(backend, "endpoint", "no host")),
            };
            let region_ok = !region.is_empty()
                && region
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !region_ok {
                return Err(ConfigError::new(
                    backend,
                    "region",
                    "expected a region name such as eu-west-1",
                ));
            }
            let key_ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
            if !key_ok(&credentials.access_key_id)
                || !key_ok(credentials.secret_access_key.expose())
            {
                return Err(ConfigError::new(
                    backend,
                    "credentials",
                    "access_key_id and secret_access_key must be non-empty printable ascii",
                ));
            }
            if credentials
                .session_token
                .as_ref()
                .is_some_and(|t| t.header_value().is_none())
            {
                return Err(ConfigError::new(
                    backend,
                    "credentials.session_token",
                    "not a valid header value",
                ));
            }
            Ok(Self {
                base: url.as_str().trim_end_matches('/').to_owned(),
                host,
                region: region.to_owned(),
                service,
                credentials,
            })
        }

        /// A signed POST of `body` to `path`, carrying exactly the headers
        /// that were signed: `headers` (lowercase names) plus `host`,
        /// `x-amz-date` and, with temporary credentials, `x-amz-security-token`.
        pub(crate) fn post(
            &self,
            http: &reqwest::Client,
            path: &str,
            headers: &[(&str, &str)],
            body: impl AsRef<[u8]> + Into<reqwest::Body>,
        ) -> reqwest::RequestBuilder {
            let signed = self.sign(path, headers, body.as_ref(), OffsetDateTime::now_utc());
            let mut request = http.post(format!("{}{path}", self.base));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request = request
                .header("host", &self.host)
                .header("x-amz-date", signed.amz_date);
            if let Some(token) = self
                .credentials
                .session_token
                .as_ref()
                .and_then(|t| t.header_value())
            {
                request = request.header("x-amz-security-token", token);
            }
            // The value is ASCII by construction.
            if let Ok(mut authorization) = HeaderValue::from_str(&signed.authorization) {
                authorization.set_sensitive(true);
                request = request.header("authorization", authorization);
            }
            request.body(body)
        }

        /// The SigV4 signature of a POST without a query string.
        pub(crate) fn sign(
            &self,
            path: &str,
            headers: &[(&str, &str)],
            payload: &[u8],
            now: OffsetDateTime,
        ) -> Signed {
            let amz_date = amz_date(now);
            let mut all: Vec<(&str, &str)> = headers.to_vec();
            all.push(("host", &self.host));
            all.push(("x-amz-date", &amz_date));
            if let Some(token) = &self.credentials.session_token {
                all.push(("x-amz-security-token", token.expose()));
            }
            let authorization = authorization(
                &Request {
                    method: "POST",
                    path,
                    query: &[],
                    headers: &all,
                    payload,
                },
                &Scope {
                    access_key_id: &self.credentials.access_key_id,
                    secret_access_key: self.credentials.secret_access_key.expose(),
                    region: &self.region,
                    service: self.service,
                },
                &amz_date,
            );
            Signed {
                amz_date,
                authorization,
            }
        }
    }

    /// What is signed.
    pub(crate) struct Request<'a> {
        pub method: &'a str,
        /// The path as sent (already percent-encoded where needed).
        pub path: &'a str,
        /// Query parameters, decoded.
        pub query: &'a [(&'a str, &'a str)],
        /// Every header to sign (name, value); names in any case.
        pub headers: &'a [(&'a str, &'a str)],
        pub payload: &'a [u8],
    }

    /// Who signs, and for which region and service.
    pub(crate) struct Scope<'a> {
        pub access_key_id: &'a str,
        pub secret_access_key: &'a str,
        pub region: &'a str,
        pub service: &'a str,
    }

    /// `YYYYMMDD'T'HHMMSS'Z'` in UTC.
    pub(crate) fn amz_date(now: OffsetDateTime) -> String {
        let now = now.to_offset(time::UtcOffset::UTC);
        format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        )
    }

    /// RFC 3986 encoding of everything but the unreserved characters (and `/`
    /// when `keep_slash`), as SigV4 requires.
    pub(crate) fn uri_encode(s: &str, keep_slash: bool) -> String {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'_' | b'.' | b'~')
                || (keep_slash && b == b'/')
            {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
        out
    }

    pub(crate) fn canonical_request(request: &Request<'_>) -> (String, String) {
        // Services other than S3 sign the path as sent, encoded once more.
        let path = if request.path.is_empty() {
            "/".to_owned()
        } else {
            uri_encode(request.path, true)
        };
        let mut query: Vec<(String, String)> = request
            .query
            .iter()
            .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
            .collect();
        query.sort();
        let query = query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let mut headers: Vec<(String, String)> = request
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.trim().to_ascii_lowercase(),
                    value.split_whitespace().collect::<Vec<_>>().join(" "),
                )
            })
            .collect();
        headers.sort();
        let mut canonical_headers = String::new();
        for (name, value) in &headers {
            let _ = writeln!(canonical_headers, "{name}:{value}");
        }
        let signed_headers = headers
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(";");
        let canonical = format!(
            "{}\n{path}\n{query}\n{canonical_headers}\n{signed_headers}\n{}",
            request.method,
            hex::encode(Sha256::digest(request.payload))
        );
        (canonical, signed_headers)
    }

    fn hmac(key: &[u8], data: &[u8]) -> Zeroizing<[u8; 32]> {
        // HMAC takes keys of any length.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        mac.update(data);
        Zeroizing::new(mac.finalize().into_bytes().into())
    }

    pub(crate) fn signing_key(
        secret_access_key: &str,
        date: &str,
        region: &str,
        service: &str,
    ) -> Zeroizing<[u8; 32]> {
        let secret = Zeroizing::new(format!("AWS4{secret_access_key}"));
        let k_date = hmac(secret.as_bytes(), date.as_bytes());
        let k_region = hmac(&*k_date, region.as_bytes());
        let k_service = hmac(&*k_region, service.as_bytes());
        hmac(&*k_service, b"aws4_request")
    }

    /// The `Authorization` header's value.
    pub(crate) fn authorization(
        request: &Request<'_>,
        scope: &Scope<'_>,
        amz_date: &str,
    ) -> String {
        let date = &amz_date[..8.min(amz_date.len())];
        let credential_scope = format!("{date}/{}/{}/aws4_request", scope.region, scope.service);
        let (canonical, signed_headers) = canonical_request(request);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{credential_scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let key = signing_key(scope.secret_access_key, date, scope.region, scope.service);
        let signature = hex::encode(*hmac(&*key, string_to_sign.as_bytes()));
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{credential_scope}, SignedHeaders={signed_headers}, Signature={signature}",
            scope.access_key_id
        )
    }

    #[cfg(test)]
    mod tests {
        use std::process::{Command, Stdio};

        use super::*;

        const AKID: &str = "AKIDEXAMPLE";
        const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

        /// The worked example of the SigV4 documentation: IAM ListUsers, GET,
        /// 2015-08-30T12:36:00Z, us-east-1.
        #[test]
        fn matches_the_documented_iam_list_users_example() {
            let request = Request {
                method: "GET",
                path: "/",
                query: &[("Version", "2010-05-08"), ("Action", "ListUsers")],
                headers: &[
                    (
                        "Content-Type",
                        "application/x-www-form-urlencoded; charset=utf-8",
                    ),
                    ("Host", "iam.amazonaws.com"),
                    ("X-Amz-Date", "20150830T123600Z"),
                ],
                payload: b"",
            };
            let (canonical, _) = canonical_request(&request);
            assert_eq!(
                hex::encode(Sha256::digest(canonical.as_bytes())),
                "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
            );
            assert_eq!(
                hex::encode(*signing_key(SECRET, "20150830", "us-east-1", "iam")),
                "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
            );
            let scope = Scope {
                access_key_id: AKID,
                secret_access_key: SECRET,
                region: "us-east-1",
                service: "iam",
            };
            assert_eq!(
                authorization(&request, &scope, "20150830T123600Z"),
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date, \
                 Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
            );
        }

        #[test]
        fn formats_the_amz_date() {
            let t = OffsetDateTime::from_unix_timestamp(1_440_938_160).expect("time");
            assert_eq!(amz_date(t), "20150830T123600Z");
        }

        #[test]
        fn encodes_paths_and_queries() {
            assert_eq!(uri_encode("/a b/c~d", true), "/a%20b/c~d");
            assert_eq!(uri_encode("a/b=c", false), "a%2Fb%3Dc");
        }

        /// botocore's signer, for the same request, credentials and time.
        const BOTOCORE: &str = r#"
import datetime, json, sys
from unittest import mock
import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
case = json.load(sys.stdin)
request = AWSRequest(method=case["method"], url=case["url"], data=case["body"].encode(), headers=case["headers"])
when = datetime.datetime.strptime(case["amz_date"], "%Y%m%dT%H%M%SZ")
with mock.patch("botocore.auth.get_current_datetime", return_value=when):
    credentials = Credentials(case["akid"], case["secret"], case.get("token"))
    botocore.auth.SigV4Auth(credentials, case["service"], case["region"]).add_auth(request)
print(request.headers["Authorization"])
"#;

        fn botocore_authorization(case: &serde_json::Value) -> Option<String> {
            let python_has_botocore = Command::new("python3")
                .args(["-c", "import botocore"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !python_has_botocore {
                eprintln!(
                    "SKIP: the botocore comparison needs python3 with botocore (pip install botocore); \
                     the documented example still ran"
                );
                return None;
            }
            let mut child = Command::new("python3")
                .args(["-c", BOTOCORE])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn python3");
            {
                use std::io::Write as _;
                let mut stdin = child.stdin.take().expect("stdin");
                stdin
                    .write_all(case.to_string().as_bytes())
                    .expect("write case");
            }
            let output = child.wait_with_output().expect("python3 output");
            assert!(
                output.status.success(),
                "botocore failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            Some(
                String::from_utf8(output.stdout)
                    .expect("utf-8")
                    .trim()
                    .to_owned(),
            )
        }

        fn compare_with_botocore(
            endpoint: &str,
            region: &str,
            service: &'static str,
            session_token: Option<&str>,
            path: &str,
            headers: &[(&str, &str)],
            body: &str,
        ) {
            let credentials = AwsCredentials {
                access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
                secret_access_key: crate::backend::Credential::new(
                    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                ),
                session_token: session_token.map(crate::backend::Credential::new),
            };
            let ours =
                Endpoint::new("test", endpoint, region, service, credentials).expect("endpoint");
            let now = OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("time");
            let signed = ours.sign(path, headers, body.as_bytes(), now);
            let case = serde_json::json!({
                "method": "POST",
                "url": format!("{endpoint}{path}"),
                "body": body,
                "headers": headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
                "amz_date": signed.amz_date,
                "akid": "AKIAIOSFODNN7EXAMPLE",
                "secret": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "token": session_token,
                "service": service,
                "region": region,
            });
            if let Some(theirs) = botocore_authorization(&case) {
                assert_eq!(signed.authorization, theirs);
            }
        }

        #[test]
        fn matches_botocore_for_secrets_manager_json() {
            compare_with_botocore(
                "https://secretsmanager.eu-west-1.amazonaws.com",
                "eu-west-1",
                "secretsmanager",
                Some("FwoGZXIvYXdzEXAMPLE//session+token=="),
                "/",
                &[
                    ("content-type", "application/x-amz-json-1.1"),
                    ("x-amz-target", "secretsmanager.GetSecretValue"),
                ],
                r#"{"SecretId":"prod/db","VersionStage":"AWSCURRENT"}"#,
            );
        }

        #[test]
        fn matches_botocore_for_agentcore_rest_json_on_a_port() {
            compare_with_botocore(
                "http://127.0.0.1:4566",
                "us-west-2",
                "bedrock-agentcore",
                None,
                "/identities/api-key",
                &[("content-type", "application/json")],
                r#"{"resourceCredentialProviderName":"github","workloadIdentityToken":"tok"}"#,
            );
        }
    }
}
