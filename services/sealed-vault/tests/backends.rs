//! The secret backends against real servers: an OpenBao dev server and a moto
//! server started by the testkit, and an AgentCore Identity stub served here
//! that checks every request's shape. Planted `CANARY-` values must come back
//! as values and nowhere else: not in an error, not in a `Debug`, not in a log.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, ensure};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_sealed_vault::backend::agentcore::AgentCoreConfig;
use bulkhead_sealed_vault::backend::aws_sm::{AwsCredentials, AwsSmConfig};
use bulkhead_sealed_vault::backend::vault::{VaultAuth, VaultConfig};
use bulkhead_sealed_vault::backend::{
    BackendError, Backends, BackendsConfig, Credential, ErrorKind, HttpOptions, Reference,
    ResolveContext, Resolved, TenantScopes,
};
use bulkhead_sealed_vault::secret::SecretValue;
use bulkhead_testkit::external::{Moto, OpenBao, loopback_http_client};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Helpers

fn reference(s: &str) -> Reference {
    Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn ctx(tenant: &str) -> ResolveContext {
    ResolveContext {
        tenant: tenant.to_owned(),
        run_id: "run-0001".to_owned(),
        workload_access_token: None,
    }
}

fn text(resolved: &Resolved) -> &str {
    std::str::from_utf8(resolved.value.expose()).expect("utf-8 value")
}

/// Everything the caller could print about an outcome must be free of
/// `forbidden` (canaries, tokens); the value itself is checked by the caller.
fn assert_clean(outcome: &Result<Resolved, BackendError>, forbidden: &[&str]) {
    let printed = match outcome {
        Ok(resolved) => format!("{resolved:?}"),
        Err(error) => format!("{error} {error:?}"),
    };
    assert!(!printed.contains("CANARY"), "a canary leaked: {printed}");
    for secret in forbidden {
        assert!(!printed.contains(secret), "a secret leaked: {printed}");
    }
}

fn expect_error(
    outcome: Result<Resolved, BackendError>,
    kind: ErrorKind,
    forbidden: &[&str],
) -> BackendError {
    assert_clean(&outcome, forbidden);
    match outcome {
        Ok(resolved) => panic!("expected {kind:?}, resolved {resolved:?}"),
        Err(error) => {
            assert_eq!(error.kind, kind, "{error}");
            error
        }
    }
}

/// A log sink for the tracing events of one current-thread test.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned()
    }

    fn assert_clean(&self, forbidden: &[&str]) {
        let logs = self.text();
        assert!(
            logs.contains("backend reference"),
            "nothing was logged: {logs}"
        );
        assert!(!logs.contains("CANARY"), "a canary reached the log: {logs}");
        for secret in forbidden {
            assert!(!logs.contains(secret), "a secret reached the log: {logs}");
        }
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Vault / OpenBao

/// One call to OpenBao's HTTP API as an administrator.
async fn bao(
    http: &reqwest::Client,
    server: &OpenBao,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let mut request = http
        .request(method.clone(), format!("{}/v1/{path}", server.addr()))
        .header("X-Vault-Token", token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("{method} {path}"))?;
    let status = response.status();
    let text = response.text().await?;
    ensure!(status.is_success(), "{method} {path}: {status}: {text}");
    Ok(if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)?
    })
}

/// How many live tokens AppRole logins have issued.
async fn approle_logins(http: &reqwest::Client, server: &OpenBao) -> anyhow::Result<usize> {
    let root = server.root_token();
    let listed = bao(
        http,
        server,
        root,
        reqwest::Method::GET,
        "auth/token/accessors?list=true",
        None,
    )
    .await?;
    let mut logins = 0;
    for accessor in listed["data"]["keys"].as_array().context("accessors")? {
        let token = bao(
            http,
            server,
            root,
            reqwest::Method::POST,
            "auth/token/lookup-accessor",
            Some(json!({ "accessor": accessor })),
        )
        .await?;
        if token["data"]["path"].as_str() == Some("auth/approle/login") {
            logins += 1;
        }
    }
    Ok(logins)
}

fn vault_backends(server: &OpenBao, auth: VaultAuth) -> anyhow::Result<Backends> {
    Ok(Backends::new(BackendsConfig {
        vault: Some(VaultConfig {
            address: server.addr(),
            namespace: None,
            auth,
            tenants: TenantScopes::new().allow("acme", "secret/acme/"),
            http: HttpOptions::default(),
        }),
        ..BackendsConfig::default()
    })?)
}

/// Writes `secret/acme/app` twice (versions 1 and 2) and `secret/globex/app` once.
async fn seed_vault(http: &reqwest::Client, server: &OpenBao) -> anyhow::Result<()> {
    let root = server.root_token();
    for (path, password) in [
        ("acme/app", "CANARY-vault-v1"),
        ("acme/app", "CANARY-vault-v2"),
        ("globex/app", "CANARY-vault-globex"),
    ] {
        bao(
            http,
            server,
            root,
            reqwest::Method::POST,
            &format!("secret/data/{path}"),
            Some(json!({ "data": { "password": password, "user": "app", "port": 5432 } })),
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn vault_token_auth_reads_versions_and_refuses_cleanly() -> anyhow::Result<()> {
    let Some(server) = OpenBao::start().await? else {
        return Ok(());
    };
    let logs = Logs::default();
    let _guard = logs.install();
    let http = loopback_http_client()?;
    seed_vault(&http, &server).await?;
    let root = server.root_token().to_owned();
    let backends = vault_backends(
        &server,
        VaultAuth::Token {
            token: Credential::new(root.clone()),
        },
    )?;
    let acme = ctx("acme");
    let forbidden = [root.as_str()];

    let latest = backends
        .resolve(&reference("vault://secret/acme/app#password"), &acme)
        .await;
    assert_clean(&latest, &forbidden);
    let latest = latest?;
    assert_eq!(text(&latest), "CANARY-vault-v2");
    assert_eq!(latest.version, "2");
    assert_eq!(latest.backend, "vault");
    assert_eq!(latest.request_id.len(), 36, "a uuid: {}", latest.request_id);

    let first = backends
        .resolve(
            &reference("vault://secret/acme/app?version=1#password"),
            &acme,
        )
        .await?;
    assert_eq!(
        (text(&first), first.version.as_str()),
        ("CANARY-vault-v1", "1")
    );
    assert_ne!(
        first.request_id, latest.request_id,
        "each read has its own request id"
    );

    let port = backends
        .resolve(&reference("vault://secret/acme/app#port"), &acme)
        .await?;
    assert_eq!(text(&port), "5432");

    let missing = backends
        .resolve(
            &reference("vault://secret/acme/nothing-here#password"),
            &acme,
        )
        .await;
    expect_error(missing, ErrorKind::NotFound, &forbidden);
    let no_field = backends
        .resolve(&reference("vault://secret/acme/app#nope"), &acme)
        .await;
    expect_error(no_field, ErrorKind::NotFound, &forbidden);
    let no_version = backends
        .resolve(
            &reference("vault://secret/acme/app?version=9#password"),
            &acme,
        )
        .await;
    expect_error(no_version, ErrorKind::NotFound, &forbidden);

    // Sealed-vault's scopes: acme may not name globex's path, even with a root token.
    let other = backends
        .resolve(&reference("vault://secret/globex/app#password"), &acme)
        .await;
    let refused = expect_error(other, ErrorKind::Denied, &forbidden);
    assert!(refused.to_string().contains("not allowed"), "{refused}");
    let stranger = backends
        .resolve(
            &reference("vault://secret/acme/app#password"),
            &ctx("globex"),
        )
        .await;
    expect_error(stranger, ErrorKind::Denied, &forbidden);
    // A backend that is not configured.
    let aws = backends
        .resolve(&reference("aws-sm://acme/db"), &acme)
        .await;
    expect_error(aws, ErrorKind::NotConfigured, &forbidden);

    // A token without a policy for the path: Vault's 403.
    let weak = bao(
        &http,
        &server,
        &root,
        reqwest::Method::POST,
        "auth/token/create",
        Some(json!({ "policies": ["default"], "ttl": "10m" })),
    )
    .await?;
    let weak_token = weak["auth"]["client_token"]
        .as_str()
        .context("client_token")?
        .to_owned();
    let weak_backends = vault_backends(
        &server,
        VaultAuth::Token {
            token: Credential::new(weak_token.clone()),
        },
    )?;
    let denied = weak_backends
        .resolve(&reference("vault://secret/acme/app#password"), &acme)
        .await;
    let denied = expect_error(
        denied,
        ErrorKind::Denied,
        &[root.as_str(), weak_token.as_str()],
    );
    assert!(denied.to_string().contains("403"), "{denied}");

    // Nothing listens: unavailable, and it says so.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.port()
    };
    let down = Backends::new(BackendsConfig {
        vault: Some(VaultConfig {
            address: format!("http://127.0.0.1:{closed}"),
            namespace: None,
            auth: VaultAuth::Token {
                token: Credential::new(root.clone()),
            },
            tenants: TenantScopes::new().allow("acme", "*"),
            http: HttpOptions::default(),
        }),
        ..BackendsConfig::default()
    })?;
    let unavailable = down
        .resolve(&reference("vault://secret/acme/app#password"), &acme)
        .await;
    expect_error(unavailable, ErrorKind::Unavailable, &forbidden);

    logs.assert_clean(&[root.as_str(), weak_token.as_str()]);
    Ok(())
}

#[tokio::test]
async fn vault_approle_logs_in_caches_and_logs_in_again_after_403() -> anyhow::Result<()> {
    let Some(server) = OpenBao::start().await? else {
        return Ok(());
    };
    let logs = Logs::default();
    let _guard = logs.install();
    let http = loopback_http_client()?;
    seed_vault(&http, &server).await?;
    let root = server.root_token().to_owned();
    let post = reqwest::Method::POST;

    bao(
        &http,
        &server,
        &root,
        post.clone(),
        "sys/auth/approle",
        Some(json!({ "type": "approle" })),
    )
    .await?;
    bao(
        &http,
        &server,
        &root,
        reqwest::Method::PUT,
        "sys/policies/acl/acme-read",
        Some(json!({ "policy": "path \"secret/data/acme/*\" { capabilities = [\"read\"] }" })),
    )
    .await?;
    bao(
        &http,
        &server,
        &root,
        post.clone(),
        "auth/approle/role/acme",
        Some(json!({ "token_policies": ["acme-read"], "token_ttl": "1h" })),
    )
    .await?;
    let role = bao(
        &http,
        &server,
        &root,
        reqwest::Method::GET,
        "auth/approle/role/acme/role-id",
        None,
    )
    .await?;
    let role_id = role["data"]["role_id"]
        .as_str()
        .context("role_id")?
        .to_owned();
    let issued = bao(
        &http,
        &server,
        &root,
        post.clone(),
        "auth/approle/role/acme/secret-id",
        None,
    )
    .await?;
    let secret_id = issued["data"]["secret_id"]
        .as_str()
        .context("secret_id")?
        .to_owned();
    let forbidden = [root.as_str(), role_id.as_str(), secret_id.as_str()];

    let backends = Backends::new(BackendsConfig {
        vault: Some(VaultConfig {
            address: server.addr(),
            namespace: None,
            auth: VaultAuth::AppRole {
                role_id: Credential::new(role_id.clone()),
                secret_id: Credential::new(secret_id.clone()),
                mount: "approle".to_owned(),
            },
            // acme may name globex's path here; Vault's policy still refuses it.
            tenants: TenantScopes::new().allow("acme", "*"),
            http: HttpOptions::default(),
        }),
        ..BackendsConfig::default()
    })?;
    let acme = ctx("acme");
    let app = reference("vault://secret/acme/app#password");

    let first = backends.resolve(&app, &acme).await;
    assert_clean(&first, &forbidden);
    let first = first?;
    assert_eq!(
        (text(&first), first.version.as_str()),
        ("CANARY-vault-v2", "2")
    );
    let pinned = backends
        .resolve(
            &reference("vault://secret/acme/app?version=1#password"),
            &acme,
        )
        .await?;
    assert_eq!(text(&pinned), "CANARY-vault-v1");
    assert_eq!(
        approle_logins(&http, &server).await?,
        1,
        "two reads, one cached login"
    );

    // Revoke every token AppRole has issued: the cached one now gets 403, and
    // the client logs in again once and succeeds.
    bao(
        &http,
        &server,
        &root,
        reqwest::Method::PUT,
        "sys/leases/revoke-prefix/auth/approle/login",
        None,
    )
    .await?;
    assert_eq!(approle_logins(&http, &server).await?, 0);
    let again = backends.resolve(&app, &acme).await;
    assert_clean(&again, &forbidden);
    assert_eq!(text(&again?), "CANARY-vault-v2");
    assert_eq!(
        approle_logins(&http, &server).await?,
        1,
        "one fresh login after the 403"
    );

    // Outside the role's policy: 403 even after a fresh login.
    let outside = backends
        .resolve(&reference("vault://secret/globex/app#password"), &acme)
        .await;
    expect_error(outside, ErrorKind::Denied, &forbidden);
    let missing = backends
        .resolve(&reference("vault://secret/acme/nothing#password"), &acme)
        .await;
    expect_error(missing, ErrorKind::NotFound, &forbidden);

    // A wrong secret id: the login is refused, and the message holds neither id.
    let wrong = Backends::new(BackendsConfig {
        vault: Some(VaultConfig {
            address: server.addr(),
            namespace: None,
            auth: VaultAuth::AppRole {
                role_id: Credential::new(role_id.clone()),
                secret_id: Credential::new("CANARY-not-the-secret-id"),
                mount: "approle".to_owned(),
            },
            tenants: TenantScopes::new().allow("acme", "*"),
            http: HttpOptions::default(),
        }),
        ..BackendsConfig::default()
    })?;
    let refused = expect_error(
        wrong.resolve(&app, &acme).await,
        ErrorKind::Denied,
        &forbidden,
    );
    assert!(
        refused.to_string().contains("approle login refused"),
        "{refused}"
    );

    logs.assert_clean(&forbidden);
    Ok(())
}

// ---------------------------------------------------------------------------
// AWS Secrets Manager (moto)

/// One call to moto's Secrets Manager. moto does not check signatures, but it
/// routes by the Authorization header's scope, so the setup calls carry a dummy one.
async fn moto(
    http: &reqwest::Client,
    server: &Moto,
    operation: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let response = http
        .post(server.endpoint())
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/secretsmanager/aws4_request, \
             SignedHeaders=host, Signature=0000",
        )
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", format!("secretsmanager.{operation}"))
        .body(body.to_string())
        .send()
        .await
        .with_context(|| operation.to_owned())?;
    let status = response.status();
    let text = response.text().await?;
    ensure!(status.is_success(), "{operation}: {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

fn aws_credentials() -> AwsCredentials {
    AwsCredentials {
        access_key_id: "AKIDEXAMPLE".to_owned(),
        secret_access_key: Credential::new("CANARY-aws-secret-access-key"),
        session_token: Some(Credential::new("CANARY-aws-session-token")),
    }
}

#[tokio::test]
async fn aws_secrets_manager_reads_keys_versions_and_batches() -> anyhow::Result<()> {
    let Some(server) = Moto::start().await? else {
        return Ok(());
    };
    let logs = Logs::default();
    let _guard = logs.install();
    let http = loopback_http_client()?;
    let db_v1 =
        json!({ "username": "app", "password": "CANARY-aws-db-1", "port": 5432 }).to_string();
    let db_v2 =
        json!({ "username": "app", "password": "CANARY-aws-db-2", "port": 5432 }).to_string();
    let created = moto(
        &http,
        &server,
        "CreateSecret",
        json!({ "Name": "acme/db", "SecretString": db_v1 }),
    )
    .await?;
    let db_version_1 = created["VersionId"]
        .as_str()
        .context("VersionId")?
        .to_owned();
    let put = moto(
        &http,
        &server,
        "PutSecretValue",
        json!({ "SecretId": "acme/db", "SecretString": db_v2 }),
    )
    .await?;
    let db_version_2 = put["VersionId"].as_str().context("VersionId")?.to_owned();
    assert_ne!(db_version_1, db_version_2);
    let token = moto(
        &http,
        &server,
        "CreateSecret",
        json!({ "Name": "acme/api-token", "SecretString": "CANARY-aws-plain-token" }),
    )
    .await?;
    let token_arn = token["ARN"].as_str().context("ARN")?.to_owned();
    let token_version = token["VersionId"].as_str().context("VersionId")?.to_owned();
    let binary = moto(
        &http,
        &server,
        "CreateSecret",
        json!({ "Name": "acme/cert", "SecretBinary": "Q0FOQVJZLWF3cy1iaW5hcnkA/w==" }),
    )
    .await?;
    let binary_version = binary["VersionId"]
        .as_str()
        .context("VersionId")?
        .to_owned();

    let backends = Backends::new(BackendsConfig {
        aws_sm: Some(AwsSmConfig {
            region: "us-east-1".to_owned(),
            endpoint: Some(server.endpoint()),
            credentials: aws_credentials(),
            tenants: TenantScopes::new()
                .allow("acme", "acme/")
                .allow("acme", &token_arn),
            http: HttpOptions::default(),
        }),
        ..BackendsConfig::default()
    })?;
    let acme = ctx("acme");

    // One at a time: GetSecretValue.
    let password = backends
        .resolve(&reference("aws-sm://acme/db#password"), &acme)
        .await;
    assert_clean(&password, &[]);
    let password = password?;
    assert_eq!(text(&password), "CANARY-aws-db-2");
    assert_eq!(password.version, db_version_2);
    assert_eq!(password.backend, "aws-sm");
    assert!(
        !password.request_id.is_empty(),
        "moto sends x-amzn-RequestId"
    );

    let previous = backends
        .resolve(
            &reference("aws-sm://acme/db?version-stage=AWSPREVIOUS#password"),
            &acme,
        )
        .await?;
    assert_eq!(
        (text(&previous), previous.version.as_str()),
        ("CANARY-aws-db-1", db_version_1.as_str())
    );
    let whole = backends
        .resolve(&reference("aws-sm://acme/db"), &acme)
        .await?;
    assert_eq!(text(&whole), db_v2);
    let port = backends
        .resolve(&reference("aws-sm://acme/db#port"), &acme)
        .await?;
    assert_eq!(text(&port), "5432");
    let plain = backends
        .resolve(&reference("aws-sm://acme/api-token"), &acme)
        .await?;
    assert_eq!(
        (text(&plain), plain.version.as_str()),
        ("CANARY-aws-plain-token", token_version.as_str())
    );
    let by_arn = backends
        .resolve(&reference(&format!("aws-sm://{token_arn}")), &acme)
        .await?;
    assert_eq!(text(&by_arn), "CANARY-aws-plain-token");
    let bytes = backends
        .resolve(&reference("aws-sm://acme/cert"), &acme)
        .await?;
    assert_eq!(bytes.value.expose(), b"CANARY-aws-binary\x00\xff");
    assert_eq!(bytes.version, binary_version);

    let missing = backends
        .resolve(&reference("aws-sm://acme/nope"), &acme)
        .await;
    expect_error(missing, ErrorKind::NotFound, &[]);
    let no_key = backends
        .resolve(&reference("aws-sm://acme/db#nope"), &acme)
        .await;
    expect_error(no_key, ErrorKind::NotFound, &[]);
    let not_json = backends
        .resolve(&reference("aws-sm://acme/api-token#key"), &acme)
        .await;
    expect_error(not_json, ErrorKind::Malformed, &[]);
    let binary_key = backends
        .resolve(&reference("aws-sm://acme/cert#key"), &acme)
        .await;
    expect_error(binary_key, ErrorKind::Malformed, &[]);
    let outside = backends
        .resolve(&reference("aws-sm://globex/db#password"), &acme)
        .await;
    expect_error(outside, ErrorKind::Denied, &[]);

    // Many at once: one BatchGetSecretValue for the AWSCURRENT ones (they share
    // its request id), GetSecretValue for the pinned stage, per-reference errors.
    let batch = [
        reference("aws-sm://acme/db#password"),
        reference("aws-sm://acme/db#username"),
        reference("aws-sm://acme/api-token"),
        reference(&format!("aws-sm://{token_arn}")),
        reference("aws-sm://acme/cert"),
        reference("aws-sm://acme/nope"),
        reference("aws-sm://acme/db?version-stage=AWSPREVIOUS#password"),
        reference("aws-sm://globex/db"),
        reference("vault://secret/acme/app#password"),
    ];
    let results = backends.resolve_many(&batch, &acme).await;
    assert_eq!(results.len(), batch.len());
    for result in &results {
        assert_clean(result, &[]);
    }
    let ok = |i: usize| {
        results[i]
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", batch[i]))
    };
    assert_eq!(
        (text(ok(0)), ok(0).version.as_str()),
        ("CANARY-aws-db-2", db_version_2.as_str())
    );
    assert_eq!(text(ok(1)), "app");
    assert_eq!(text(ok(2)), "CANARY-aws-plain-token");
    assert_eq!(text(ok(3)), "CANARY-aws-plain-token");
    assert_eq!(ok(4).value.expose(), b"CANARY-aws-binary\x00\xff");
    let batch_id = &ok(0).request_id;
    assert!(!batch_id.is_empty());
    for (i, reference) in batch.iter().enumerate().take(5).skip(1) {
        assert_eq!(
            &ok(i).request_id,
            batch_id,
            "{reference} came from the same batch call"
        );
    }
    let error_kind = |i: usize| results[i].as_ref().map(|_| ()).map_err(|e| e.kind);
    assert_eq!(error_kind(5), Err(ErrorKind::NotFound));
    assert_eq!(
        (text(ok(6)), ok(6).version.as_str()),
        ("CANARY-aws-db-1", db_version_1.as_str())
    );
    assert_ne!(
        &ok(6).request_id,
        batch_id,
        "a pinned stage is fetched on its own"
    );
    assert_eq!(error_kind(7), Err(ErrorKind::Denied));
    assert_eq!(error_kind(8), Err(ErrorKind::NotConfigured));

    // More than 20 secrets: several batch calls, every result in place.
    for i in 0..23 {
        moto(
            &http,
            &server,
            "CreateSecret",
            json!({ "Name": format!("acme/many/{i:02}"), "SecretString": format!("CANARY-many-{i:02}") }),
        )
        .await?;
    }
    let many: Vec<Reference> = (0..23)
        .map(|i| reference(&format!("aws-sm://acme/many/{i:02}")))
        .collect();
    let results = backends.resolve_many(&many, &acme).await;
    let mut request_ids = std::collections::BTreeSet::new();
    for (i, result) in results.iter().enumerate() {
        let resolved = result.as_ref().unwrap_or_else(|e| panic!("{i}: {e}"));
        assert_eq!(text(resolved), format!("CANARY-many-{i:02}"));
        request_ids.insert(resolved.request_id.clone());
    }
    assert_eq!(request_ids.len(), 2, "23 secrets take two batch calls");

    logs.assert_clean(&["CANARY-aws-secret-access-key", "CANARY-aws-session-token"]);
    Ok(())
}

// ---------------------------------------------------------------------------
// AWS Bedrock AgentCore Identity (a stub serving the documented route)

const AGENTCORE_REGION: &str = "us-west-2";
const GOOD_TOKEN: &str = "CANARY-workload-token-good";
const REVOKED_TOKEN: &str = "CANARY-workload-token-revoked";

#[derive(Clone, Default)]
struct Stub {
    /// Every shape violation seen; the test requires none.
    violations: Arc<Mutex<Vec<String>>>,
    requests: Arc<Mutex<u32>>,
    host: Arc<Mutex<String>>,
}

impl Stub {
    fn violation(&self, what: String) -> Response {
        self.violations
            .lock()
            .expect("violations")
            .push(what.clone());
        aws_error(StatusCode::BAD_REQUEST, "ValidationException", &what)
    }
}

fn aws_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        [
            ("x-amzn-errortype", kind.to_owned()),
            ("x-amzn-requestid", "stub-error-request".to_owned()),
            ("content-type", "application/json".to_owned()),
        ],
        json!({ "message": message }).to_string(),
    )
        .into_response()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// `POST /identities/api-key`, checked like the service would: content type,
/// a SigV4 Authorization scoped to the region and `bedrock-agentcore`, signed
/// host, date and session token, and a body of exactly the two documented fields.
async fn get_resource_api_key(
    State(stub): State<Stub>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    *stub.requests.lock().expect("requests") += 1;
    if header(&headers, "content-type") != "application/json" {
        return stub.violation(format!(
            "content-type {:?}",
            header(&headers, "content-type")
        ));
    }
    let amz_date = header(&headers, "x-amz-date");
    if amz_date.len() != 16 || !amz_date.ends_with('Z') || amz_date.as_bytes()[8] != b'T' {
        return stub.violation(format!("x-amz-date {amz_date:?}"));
    }
    if header(&headers, "x-amz-security-token") != "CANARY-aws-session-token" {
        return stub.violation("x-amz-security-token missing".to_owned());
    }
    let expected_host = stub.host.lock().expect("host").clone();
    if header(&headers, "host") != expected_host {
        return stub.violation(format!("host {:?}", header(&headers, "host")));
    }
    let authorization = header(&headers, "authorization");
    let scope = format!(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/{}/{AGENTCORE_REGION}/bedrock-agentcore/aws4_request, ",
        &amz_date[..8]
    );
    let Some(rest) = authorization.strip_prefix(&scope) else {
        return stub.violation("authorization scope".to_owned());
    };
    let Some((signed, signature)) = rest
        .strip_prefix("SignedHeaders=")
        .and_then(|r| r.split_once(", Signature="))
    else {
        return stub.violation("authorization layout".to_owned());
    };
    let signed: Vec<&str> = signed.split(';').collect();
    for required in ["content-type", "host", "x-amz-date", "x-amz-security-token"] {
        if !signed.contains(&required) {
            return stub.violation(format!("{required} is not signed"));
        }
    }
    if signature.len() != 64
        || !signature
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return stub.violation("signature is not 64 lowercase hex digits".to_owned());
    }
    let Ok(request) = serde_json::from_slice::<BTreeMap<String, Value>>(&body) else {
        return stub.violation("body is not a json object".to_owned());
    };
    let fields: Vec<&str> = request.keys().map(String::as_str).collect();
    if fields != ["resourceCredentialProviderName", "workloadIdentityToken"] {
        return stub.violation(format!("body fields {fields:?}"));
    }
    let provider = request["resourceCredentialProviderName"]
        .as_str()
        .unwrap_or("");
    let token = request["workloadIdentityToken"].as_str().unwrap_or("");
    // A chatty service: its error messages repeat what it was sent.
    match (provider, token) {
        (_, REVOKED_TOKEN) => aws_error(
            StatusCode::UNAUTHORIZED,
            "UnauthorizedException",
            &format!("workload token {token} is not valid"),
        ),
        ("throttled", _) => aws_error(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            "slow down",
        ),
        ("forbidden", _) => aws_error(
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            &format!("{token} may not use provider forbidden"),
        ),
        ("github", GOOD_TOKEN) => (
            StatusCode::OK,
            [
                (
                    "x-amzn-requestid",
                    "4f0d9a1e-agentcore-request-1".to_owned(),
                ),
                ("content-type", "application/json".to_owned()),
            ],
            json!({ "apiKey": "CANARY-github-api-key" }).to_string(),
        )
            .into_response(),
        (_, GOOD_TOKEN) => aws_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            &format!("no provider {provider} for {token}"),
        ),
        _ => aws_error(
            StatusCode::UNAUTHORIZED,
            "UnauthorizedException",
            "unknown workload token",
        ),
    }
}

#[tokio::test]
async fn agentcore_get_resource_api_key_against_a_checking_stub() -> anyhow::Result<()> {
    let logs = Logs::default();
    let _guard = logs.install();
    let stub = Stub::default();
    let app = axum::Router::new()
        .route(
            "/identities/api-key",
            axum::routing::post(get_resource_api_key),
        )
        .with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    *stub.host.lock().expect("host") = addr.to_string();
    let serving = tokio::spawn(async move { axum::serve(listener, app).await });

    let backends = Backends::new(BackendsConfig {
        agentcore: Some(AgentCoreConfig {
            region: AGENTCORE_REGION.to_owned(),
            endpoint: Some(format!("http://{addr}")),
            credentials: aws_credentials(),
            tenants: TenantScopes::new().allow("acme", "*"),
            http: HttpOptions::default(),
        }),
        ..BackendsConfig::default()
    })?;
    let with_token = |token: &str| ResolveContext {
        workload_access_token: Some(SecretValue::from_slice(token.as_bytes())),
        ..ctx("acme")
    };
    let forbidden = [
        GOOD_TOKEN,
        REVOKED_TOKEN,
        "CANARY-aws-secret-access-key",
        "CANARY-aws-session-token",
    ];

    let key = backends
        .resolve(&reference("agentcore://github"), &with_token(GOOD_TOKEN))
        .await;
    assert_clean(&key, &forbidden);
    let key = key?;
    assert_eq!(text(&key), "CANARY-github-api-key");
    assert_eq!(
        (key.version.as_str(), key.request_id.as_str()),
        ("", "4f0d9a1e-agentcore-request-1")
    );
    assert_eq!(key.backend, "agentcore");

    let cases = [
        ("agentcore://gitlab", GOOD_TOKEN, ErrorKind::NotFound),
        ("agentcore://github", REVOKED_TOKEN, ErrorKind::Denied),
        ("agentcore://forbidden", GOOD_TOKEN, ErrorKind::Denied),
        ("agentcore://throttled", GOOD_TOKEN, ErrorKind::Unavailable),
    ];
    for (target, token, kind) in cases {
        let error = expect_error(
            backends
                .resolve(&reference(target), &with_token(token))
                .await,
            kind,
            &forbidden,
        );
        assert!(
            error.to_string().contains("Exception"),
            "names the aws error code: {error}"
        );
    }

    // Without a workload access token nothing is sent.
    let before = *stub.requests.lock().expect("requests");
    let no_token = backends
        .resolve(&reference("agentcore://github"), &ctx("acme"))
        .await;
    expect_error(no_token, ErrorKind::Denied, &forbidden);
    let globex = ResolveContext {
        tenant: "globex".to_owned(),
        ..with_token(GOOD_TOKEN)
    };
    let other_tenant = backends
        .resolve(&reference("agentcore://github"), &globex)
        .await;
    expect_error(other_tenant, ErrorKind::Denied, &forbidden);
    assert_eq!(*stub.requests.lock().expect("requests"), before);

    let violations = stub.violations.lock().expect("violations").clone();
    assert!(
        violations.is_empty(),
        "requests of the wrong shape: {violations:?}"
    );
    logs.assert_clean(&forbidden);
    serving.abort();
    Ok(())
}
