//! Each backing server starts for real and answers a real client.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;

use anyhow::{Context as _, ensure};
use bulkhead_testkit::external::{
    self, Moto, OpenBao, Postgres, REQUIRE_EXTERNAL_ENV, Redis, RespReply, loopback_http_client,
    resp_command,
};
use serde_json::{Value, json};

/// Whether something accepts TCP connections on `port` of loopback.
async fn port_accepts(port: u16) -> bool {
    tokio::net::TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .is_ok()
}

#[tokio::test]
async fn postgres_serves_a_fresh_database_and_stops_on_drop() -> anyhow::Result<()> {
    let Some(pg) = Postgres::start().await? else {
        return Ok(());
    };
    let port = pg.port();
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    );

    let url = pg.create_database("backing_check").await?;
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{port}/backing_check")
    );
    assert_eq!(pg.psql("backing_check", "SELECT 1").await?, "1");
    assert_eq!(
        pg.psql("backing_check", "SELECT current_database()")
            .await?,
        "backing_check"
    );
    // The database is really there, and really empty.
    pg.psql(
        "backing_check",
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('x')",
    )
    .await?;
    assert_eq!(pg.psql("backing_check", "SELECT v FROM t").await?, "x");
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'backing_check'"
        )
        .await?,
        "1"
    );
    // Loopback only, and fast-and-loose durability as configured.
    assert_eq!(
        pg.psql("postgres", "SHOW listen_addresses").await?,
        "127.0.0.1"
    );
    assert_eq!(pg.psql("postgres", "SHOW fsync").await?, "off");
    assert!(pg.create_database("Bad-Name").await.is_err());

    let log = pg.log_path();
    drop(pg);
    assert!(
        !port_accepts(port).await,
        "postgres still listens after drop"
    );
    assert!(!log.exists(), "temp dir survives the server");
    Ok(())
}

#[tokio::test]
async fn redis_sets_and_gets_and_survives_stop_and_restart() -> anyhow::Result<()> {
    let Some(mut redis) = Redis::start().await? else {
        return Ok(());
    };
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));

    assert_eq!(
        redis.command(&["SET", "k", "v"]).await?,
        RespReply::Simple("OK".into())
    );
    assert_eq!(
        redis.command(&["GET", "k"]).await?,
        RespReply::Bulk(b"v".to_vec())
    );
    assert_eq!(redis.command(&["GET", "absent"]).await?, RespReply::Nil);
    assert_eq!(redis.command(&["INCR", "n"]).await?, RespReply::Integer(1));

    redis.stop().await?;
    assert!(!redis.is_running());
    assert!(!port_accepts(port).await, "redis still listens after stop");
    assert!(resp_command(redis.addr(), &["PING"]).await.is_err());

    redis.restart().await?;
    assert!(redis.is_running());
    assert_eq!(redis.port(), port, "restart must keep the port");
    assert_eq!(
        redis.command(&["PING"]).await?,
        RespReply::Simple("PONG".into())
    );
    // No persistence: a restart comes back empty.
    assert_eq!(redis.command(&["GET", "k"]).await?, RespReply::Nil);

    drop(redis);
    assert!(!port_accepts(port).await, "redis still listens after drop");
    Ok(())
}

#[tokio::test]
async fn openbao_stores_and_returns_a_kv2_secret() -> anyhow::Result<()> {
    let Some(bao) = OpenBao::start().await? else {
        return Ok(());
    };
    let port = bao.port();
    assert_eq!(bao.addr(), format!("http://127.0.0.1:{port}"));
    let client = loopback_http_client()?;

    let written = client
        .post(format!("{}/v1/secret/data/x", bao.addr()))
        .header("X-Vault-Token", bao.root_token())
        .json(&json!({"data": {"k": "v"}}))
        .send()
        .await?;
    ensure!(
        written.status().is_success(),
        "kv write answered {}",
        written.status()
    );

    let read: Value = client
        .get(format!("{}/v1/secret/data/x", bao.addr()))
        .header("X-Vault-Token", bao.root_token())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(read["data"]["data"]["k"], "v", "read back: {read}");
    assert_eq!(read["data"]["metadata"]["version"], 1);

    let refused = client
        .get(format!("{}/v1/secret/data/x", bao.addr()))
        .header("X-Vault-Token", "not-the-root-token")
        .send()
        .await?;
    assert_eq!(refused.status(), reqwest::StatusCode::FORBIDDEN);

    drop(bao);
    assert!(
        !port_accepts(port).await,
        "openbao still listens after drop"
    );
    Ok(())
}

/// One Secrets Manager call, signed with a fake SigV4 header (moto does not check signatures).
async fn secrets_manager(
    client: &reqwest::Client,
    moto: &Moto,
    action: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let response = client
        .post(format!("{}/", moto.endpoint()))
        .header("X-Amz-Target", format!("secretsmanager.{action}"))
        .header("Content-Type", "application/x-amz-json-1.1")
        .header("X-Amz-Date", "20250101T000000Z")
        .header(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250101/us-east-1/secretsmanager/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=00",
        )
        .body(body.to_string())
        .send()
        .await
        .with_context(|| format!("secretsmanager {action}"))?;
    let status = response.status();
    let text = response.text().await?;
    ensure!(status.is_success(), "{action} answered {status}: {text}");
    serde_json::from_str(&text).with_context(|| format!("{action} answered non-json: {text}"))
}

#[tokio::test]
async fn moto_serves_secrets_manager() -> anyhow::Result<()> {
    let Some(moto) = Moto::start().await? else {
        return Ok(());
    };
    let port = moto.port();
    assert_eq!(moto.endpoint(), format!("http://127.0.0.1:{port}"));
    let client = loopback_http_client()?;

    let created = secrets_manager(
        &client,
        &moto,
        "CreateSecret",
        json!({"Name": "n", "SecretString": "s"}),
    )
    .await?;
    assert_eq!(created["Name"], "n", "created: {created}");

    let got = secrets_manager(&client, &moto, "GetSecretValue", json!({"SecretId": "n"})).await?;
    assert_eq!(got["SecretString"], "s", "got: {got}");
    assert_eq!(got["ARN"], created["ARN"]);

    drop(moto);
    assert!(!port_accepts(port).await, "moto still listens after drop");
    Ok(())
}

#[test]
fn missing_program_follows_the_policy() {
    let result = external::program_or_skip("bulkhead-no-such-program", "install nothing");
    if external::require_external() {
        let error = result.expect_err("a missing program must fail when required");
        assert!(
            error
                .to_string()
                .contains("bulkhead-no-such-program not found")
        );
    } else {
        assert!(matches!(result, Ok(None)), "{result:?}");
    }
}

/// Set for the child test run by `redis_missing_from_path_skips_loudly_or_fails`.
const CHILD_ENV: &str = "BULKHEAD_TESTKIT_PATHLESS_CHILD";

#[tokio::test]
#[ignore = "run by redis_missing_from_path_skips_loudly_or_fails with an empty PATH"]
async fn pathless_child_starts_redis() -> anyhow::Result<()> {
    if std::env::var_os(CHILD_ENV).is_none() {
        return Ok(());
    }
    let redis = Redis::start().await?;
    assert!(
        redis.is_none(),
        "redis started without redis-server on PATH"
    );
    Ok(())
}

/// Runs `pathless_child_starts_redis` in a child process whose PATH lacks `redis-server`.
fn run_pathless_child(require: bool) -> anyhow::Result<std::process::Output> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    command
        .args(["--ignored", "--exact", "pathless_child_starts_redis"])
        .env("PATH", "/nonexistent-bulkhead-path")
        .env(CHILD_ENV, "1");
    if require {
        command.env(REQUIRE_EXTERNAL_ENV, "1");
    } else {
        command.env_remove(REQUIRE_EXTERNAL_ENV);
    }
    command.output().context("failed to run the test binary")
}

#[test]
fn redis_missing_from_path_skips_loudly_or_fails() -> anyhow::Result<()> {
    let skipped = run_pathless_child(false)?;
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(skipped.status.success(), "child failed: {stderr}");
    // Seen even though the harness captures the output of passing tests.
    assert!(
        stderr.contains(
            "SKIP: pathless_child_starts_redis: redis-server not found \
             (install Debian redis-server) — skipping"
        ),
        "no skip line in: {stderr}"
    );

    let failed = run_pathless_child(true)?;
    let stdout = String::from_utf8_lossy(&failed.stdout);
    assert!(
        !failed.status.success(),
        "child passed with {REQUIRE_EXTERNAL_ENV}=1"
    );
    assert!(
        stdout.contains("redis-server not found") && stdout.contains(REQUIRE_EXTERNAL_ENV),
        "no failure reason in: {stdout}"
    );
    Ok(())
}
