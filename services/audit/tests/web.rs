//! The web Audit view, read by a real browser: headless Chromium loads the
//! page over HTTPS and the test reads the DOM it rendered. Certificates are
//! checked with a real TLS client presenting operator and tenant SVIDs.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bulkhead_audit::checkpoint::Signer;
use bulkhead_audit::event::{NewEvent, Outcome};
use bulkhead_audit::log::{Log, LogConfig};
use bulkhead_audit::store::{self, sqlite::SqliteStore};
use bulkhead_audit::web;
use bulkhead_mesh::pki::{Ca, IssuedSvid, SvidOptions};
use bulkhead_mesh::spiffe::{SpiffeId, TrustDomain};
use bulkhead_mesh::tls::{self, Identity, NoRevocations, RevocationCheck, TrustBundle};
use bulkhead_testkit::external::program_or_skip;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TD: &str = "bulkhead.test";
const TOKEN: &str = "op-token-4f1c9a7e2b";
const XSS: &str = "<script>alert(1)</script><img src=x onerror=alert(2)>";
const ODD_TENANT: &str = "<b>&\"'";
/// Events appended before the interesting ones, so that the view pages.
const FILLER: u64 = 120;
const CHROMIUM_DEADLINE: Duration = Duration::from_secs(90);

fn id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}/{path}")).expect("id")
}

fn event(
    kind: &str,
    tenant: &str,
    run: &str,
    outcome: Outcome,
    attrs: &[(&str, &str)],
) -> NewEvent {
    NewEvent {
        kind: kind.into(),
        tenant: tenant.into(),
        run_id: run.into(),
        outcome,
        attributes: attrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

/// Sequences of the events the assertions name.
#[derive(Debug)]
struct Seqs {
    odd_tenant: u64,
    acme: Vec<u64>,
    last: u64,
}

/// A log with events in it, and the view serving it on loopback.
struct Fixture {
    dir: tempfile::TempDir,
    ca: Ca,
    log: Log,
    log_stop: CancellationToken,
    addr: SocketAddr,
    web_stop: CancellationToken,
    web: JoinHandle<std::io::Result<()>>,
}

fn svid_identity(svid: &IssuedSvid, ca: &Ca) -> Identity {
    let chain = format!("{}{}", svid.cert_pem, ca.cert_pem());
    Identity::from_pem(chain.as_bytes(), svid.key_pem.as_bytes(), "test").expect("identity")
}

impl Fixture {
    /// A temp dir and a fresh CA for the trust domain.
    fn pki() -> (tempfile::TempDir, Ca) {
        tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, _) = Ca::generate(&TrustDomain::parse(TD).expect("td")).expect("ca");
        (dir, ca)
    }

    /// A log over `dir`'s store, signing with the key kept in `dir`, so that
    /// a second log over the same store signs with the same key.
    async fn open_log(dir: &Path) -> (Log, CancellationToken) {
        let store = store::open(&format!("sqlite://{}", dir.join("audit.db").display()))
            .await
            .expect("store");
        let signer = Signer::load_or_create(&dir.join("audit-signing.key")).expect("signer");
        let stop = CancellationToken::new();
        let log = Log::open(store, signer, LogConfig::default(), stop.clone())
            .await
            .expect("log");
        (log, stop)
    }

    async fn serve(
        dir: tempfile::TempDir,
        ca: Ca,
        log: Log,
        log_stop: CancellationToken,
        revocations: Arc<dyn RevocationCheck>,
    ) -> Self {
        let svid = ca
            .issue(
                &id("service/audit"),
                &SvidOptions::for_local_service("audit"),
            )
            .expect("audit svid");
        let bundle = TrustBundle::from_pem(ca.cert_pem().as_bytes(), "ca").expect("bundle");
        let config = web::tls_config(&svid_identity(&svid, &ca), &bundle, revocations.clone())
            .expect("tls config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let web_stop = CancellationToken::new();
        let web = tokio::spawn(web::serve(
            log.clone(),
            listener,
            config,
            revocations,
            Some(TOKEN.to_owned()),
            web_stop.clone().cancelled_owned(),
        ));
        Self {
            dir,
            ca,
            log,
            log_stop,
            addr,
            web_stop,
            web,
        }
    }

    async fn start() -> (Self, Seqs) {
        Self::start_with(Arc::new(NoRevocations)).await
    }

    async fn start_with(revocations: Arc<dyn RevocationCheck>) -> (Self, Seqs) {
        let (dir, ca) = Self::pki();
        let (log, log_stop) = Self::open_log(dir.path()).await;
        let seqs = populate(&log).await;
        // The checkpointer may have signed this size already.
        log.checkpoint().await.expect("checkpoint");
        assert_eq!(log.latest_head().map(|h| h.tree_size), Some(seqs.last));
        (Self::serve(dir, ca, log, log_stop, revocations).await, seqs)
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("https://{}{path_and_query}", self.addr)
    }

    fn client(&self, who: Option<&str>) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.ca.cert_pem().as_bytes()).expect("ca cert"),
            )
            .timeout(Duration::from_secs(20));
        if let Some(path) = who {
            let svid = self
                .ca
                .issue(&id(path), &SvidOptions::default())
                .expect("client svid");
            let pem = format!("{}{}", svid.cert_pem, svid.key_pem);
            b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).expect("identity"));
        }
        b.build().expect("client")
    }

    async fn stop(self) {
        self.web_stop.cancel();
        let served = tokio::time::timeout(Duration::from_secs(15), self.web)
            .await
            .expect("view drains in time")
            .expect("view task");
        served.expect("view served");
        self.log_stop.cancel();
    }
}

async fn populate(log: &Log) -> Seqs {
    let vault = id("service/sealed-vault");
    let filler: Vec<NewEvent> = (0..FILLER)
        .map(|i| {
            event(
                "task.completed",
                "filler",
                &format!("f-{i}"),
                Outcome::Success,
                &[("lease_epoch", "1")],
            )
        })
        .collect();
    log.append(&id("service/dispatcher"), filler)
        .await
        .expect("filler");
    let odd = log
        .append(
            &vault,
            vec![event(
                "sealed.secret.written",
                ODD_TENANT,
                "",
                Outcome::Success,
                &[("key", "ANTHROPIC_API_KEY"), ("note", XSS)],
            )],
        )
        .await
        .expect("append")[0];
    let mut acme = Vec::new();
    acme.push(
        log.append(
            &vault,
            vec![event(
                "sealed.credential.resolved",
                "acme",
                "r-1",
                Outcome::Success,
                &[
                    ("keys", "ANTHROPIC_API_KEY"),
                    (
                        "fingerprint",
                        "hmac-sha256:9f86d081884c7d659a2feaa0c55ad015",
                    ),
                ],
            )],
        )
        .await
        .expect("append")[0],
    );
    acme.push(
        log.append(
            &id("service/identity"),
            vec![event(
                "identity.run_minted",
                "acme",
                "r-2",
                Outcome::Success,
                &[],
            )],
        )
        .await
        .expect("append")[0],
    );
    log.append(
        &id("service/dispatcher"),
        vec![event(
            "task.claimed",
            "globex",
            "r-9",
            Outcome::Denied,
            &[("reason", "cross-tenant claim refused")],
        )],
    )
    .await
    .expect("append");
    let last = log
        .append(
            &id("service/sandbox-runner/host-1"),
            vec![event(
                "sandbox.scrubbed",
                "acme",
                "r-1",
                Outcome::Success,
                &[],
            )],
        )
        .await
        .expect("append")[0];
    acme.push(last);
    acme.reverse();
    Seqs {
        odd_tenant: odd,
        acme,
        last,
    }
}

/// `data-seq` of every event row, in document order.
fn row_seqs(dom: &str) -> Vec<u64> {
    const MARK: &str = "<tr class=\"event\" data-seq=\"";
    dom.match_indices(MARK)
        .filter_map(|(i, _)| {
            let rest = &dom[i + MARK.len()..];
            rest[..rest.find('"')?].parse().ok()
        })
        .collect()
}

/// The opening tag of the tree-head block.
fn head_tag(dom: &str) -> Option<&str> {
    let start = dom.find("id=\"tree-head\"")?;
    let open = dom[..start].rfind('<')?;
    let end = start + dom[start..].find('>')?;
    Some(&dom[open..=end])
}

/// Runs Chromium headless on `url` with `extra` flags and returns its stdout.
/// Each run gets its own profile, so no cookie carries over between runs.
async fn chromium(bin: &Path, url: &str, extra: &[String]) -> anyhow::Result<String> {
    let profile = tempfile::tempdir().context("failed to make a chromium profile dir")?;
    let mut args: Vec<String> = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--ignore-certificate-errors",
        "--no-proxy-server",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-sync",
        "--metrics-recording-only",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.push(format!("--user-data-dir={}", profile.path().display()));
    args.extend(extra.iter().cloned());
    args.push(url.to_owned());
    let bin = bin.to_owned();
    let out =
        tokio::task::spawn_blocking(move || run_with_deadline(&bin, &args, CHROMIUM_DEADLINE))
            .await
            .context("chromium runner panicked")??;
    drop(profile);
    Ok(out)
}

fn run_with_deadline(bin: &PathBuf, args: &[String], deadline: Duration) -> anyhow::Result<String> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("failed to start chromium")?;
    let mut stdout = child.stdout.take().context("chromium stdout")?;
    let mut stderr = child.stderr.take().context("chromium stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().context("failed to wait for chromium")? {
            break status;
        }
        if started.elapsed() > deadline {
            // Only the child this test started.
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            bail!("chromium did not finish within {deadline:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    ensure!(
        status.success(),
        "chromium failed ({status}); stderr:\n{stderr}"
    );
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_the_log_newest_first_escaped_and_verified() -> anyhow::Result<()> {
    let Some(browser) = program_or_skip("chromium", "apt-get install chromium")? else {
        return Ok(());
    };
    let (fx, seqs) = Fixture::start().await;

    // The first page: the 100 newest events, newest first, with an older link.
    let dom = chromium(
        &browser,
        &fx.url(&format!("/?token={TOKEN}")),
        &["--dump-dom".into()],
    )
    .await?;
    let rows = row_seqs(&dom);
    let want: Vec<u64> = (seqs.last - 99..=seqs.last).rev().collect();
    assert_eq!(rows, want, "first page rows");
    assert!(dom.contains("class=\"older\""), "an older link");
    assert!(
        dom.contains(&format!("before={}", seqs.last - 99)),
        "older link cursor"
    );

    // Injected markup is text, never elements: the serialized DOM holds the
    // escaped text and no script or img element anywhere.
    assert!(
        dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"),
        "the attribute value is shown as text"
    );
    assert!(
        dom.contains("&lt;b&gt;&amp;\"'"),
        "the odd tenant is shown as text"
    );
    let lower = dom.to_ascii_lowercase();
    for element in ["<script", "<img", "<b>"] {
        assert!(!lower.contains(element), "{element} element in the dom");
    }
    assert!(rows.contains(&seqs.odd_tenant));

    // The current signed tree head, checked by the server.
    let head = head_tag(&dom).context("tree head block")?;
    assert!(head.contains("data-verified=\"true\""), "{head}");
    assert!(dom.contains(">verified<"), "verified label");
    assert!(!dom.contains("NOT VERIFIED"));
    assert!(
        dom.contains(&format!("id=\"tree-size\">{}<", seqs.last)),
        "head covers the log"
    );
    let root = hex::encode(fx.log.root_at(seqs.last)?);
    assert!(dom.contains(&root), "root hash shown");

    // A filter URL shows only that tenant's rows.
    let dom = chromium(
        &browser,
        &fx.url(&format!("/?token={TOKEN}&tenant=acme")),
        &["--dump-dom".into()],
    )
    .await?;
    assert_eq!(row_seqs(&dom), seqs.acme, "acme rows only");
    assert!(!dom.contains("class=\"older\""), "one page");

    // No token and no certificate: 401, no rows.
    let dom = chromium(&browser, &fx.url("/"), &["--dump-dom".into()]).await?;
    assert!(row_seqs(&dom).is_empty(), "no rows without credentials");
    assert!(dom.contains("401 Unauthorized"), "{dom}");
    assert!(
        !dom.contains("sealed.") && !dom.contains("tree-head"),
        "no data on the 401 page"
    );

    // A wrong token is no better.
    let dom = chromium(&browser, &fx.url("/?token=wrong"), &["--dump-dom".into()]).await?;
    assert!(row_seqs(&dom).is_empty(), "no rows with a wrong token");

    // One screenshot, for a person to look at.
    let shot = std::env::temp_dir().join("audit-view.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &browser,
        &fx.url(&format!("/?token={TOKEN}")),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1400,900".into(),
            "--hide-scrollbars".into(),
        ],
    )
    .await?;
    let png = std::fs::read(&shot).context("screenshot written")?;
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );

    fx.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_are_admitted_and_everyone_else_refused() -> anyhow::Result<()> {
    let (fx, seqs) = Fixture::start().await;
    let anonymous = fx.client(None);

    // Health needs no credentials.
    let r = anonymous.get(fx.url("/healthz")).send().await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await?, "ok");

    // An operator certificate is admitted and sees every tenant.
    let r = fx
        .client(Some("admin/alice"))
        .get(fx.url("/"))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let body = r.text().await?;
    assert_eq!(row_seqs(&body).first(), Some(&seqs.last));
    assert!(
        body.contains("spiffe://bulkhead.test/admin/alice"),
        "names the operator"
    );

    // A tenant's certificate is refused, even with the token beside it, and a
    // service's too.
    for who in ["tenant/acme/client/backend", "service/sealed-vault"] {
        let r = fx
            .client(Some(who))
            .get(fx.url(&format!("/?token={TOKEN}")))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        assert_eq!(r.status(), 403, "{who}");
        let body = r.text().await?;
        assert!(
            row_seqs(&body).is_empty() && !body.contains("acme"),
            "{who}: no data"
        );
    }

    // No credentials, or wrong ones: 401 without data, with the security headers.
    for (what, req) in [
        ("none", anonymous.get(fx.url("/"))),
        (
            "wrong bearer",
            anonymous.get(fx.url("/")).bearer_auth("nope"),
        ),
        ("wrong query", anonymous.get(fx.url("/?token=nope"))),
        ("empty query", anonymous.get(fx.url("/?token="))),
        (
            "forged cookie",
            anonymous
                .get(fx.url("/"))
                .header("cookie", format!("{}={TOKEN}", web::COOKIE)),
        ),
        ("unknown path", anonymous.get(fx.url("/export.jsonl"))),
    ] {
        let r = req.send().await?;
        assert_eq!(r.status(), 401, "{what}");
        let h = r.headers().clone();
        assert_eq!(
            h["www-authenticate"], "Bearer realm=\"bulkhead-audit\"",
            "{what}"
        );
        assert!(
            h["content-security-policy"]
                .to_str()?
                .starts_with("default-src 'none'")
        );
        let body = r.text().await?;
        assert!(
            row_seqs(&body).is_empty() && !body.contains("acme"),
            "{what}: no data"
        );
    }

    // The bearer token is admitted; so is the query token, which also sets a
    // strict cookie that then admits alone.
    let r = anonymous.get(fx.url("/")).bearer_auth(TOKEN).send().await?;
    assert_eq!(r.status(), 200);
    let r = anonymous
        .get(fx.url(&format!("/?token={TOKEN}&type=sealed.")))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    for (name, want) in [
        (
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'",
        ),
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
    ] {
        assert!(h[name].to_str()?.starts_with(want), "{name}: {:?}", h[name]);
    }
    let set_cookie = h["set-cookie"].to_str()?.to_owned();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attr), "{set_cookie}");
    }
    assert!(
        !set_cookie.contains(TOKEN),
        "the cookie is not the token itself"
    );
    let body = r.text().await?;
    let sealed: Vec<u64> = row_seqs(&body);
    assert_eq!(
        sealed,
        vec![seqs.acme[2], seqs.odd_tenant],
        "type prefix filter"
    );
    let cookie = set_cookie
        .split(';')
        .next()
        .context("cookie pair")?
        .to_owned();
    let r = anonymous
        .get(fx.url("/?run=r-1"))
        .header("cookie", cookie)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(
        row_seqs(&r.text().await?),
        vec![seqs.acme[0], seqs.acme[2]],
        "run filter via cookie"
    );

    // Filters round-trip characters that need escaping.
    let r = anonymous
        .get(fx.url("/"))
        .query(&[("tenant", ODD_TENANT)])
        .bearer_auth(TOKEN)
        .send()
        .await?;
    let body = r.text().await?;
    assert_eq!(row_seqs(&body), vec![seqs.odd_tenant]);
    assert!(
        body.contains("value=\"&lt;b&gt;&amp;&quot;&#39;\""),
        "filter field escaped"
    );

    // Paging: the older link leads to the rest, and nothing is shown twice.
    let op = fx.client(Some("admin/alice"));
    let first = row_seqs(&op.get(fx.url("/")).send().await?.text().await?);
    let page2 = op
        .get(fx.url(&format!("/?before={}", first[first.len() - 1])))
        .send()
        .await?
        .text()
        .await?;
    let second = row_seqs(&page2);
    assert_eq!(first.len() + second.len(), usize::try_from(seqs.last)?);
    assert_eq!(
        second,
        (1..first[first.len() - 1]).rev().collect::<Vec<_>>()
    );
    assert!(!page2.contains("class=\"older\"") && page2.contains("class=\"newest\""));

    // Bad input is refused without data.
    for q in ["/?before=abc", &format!("/?tenant={}", "x".repeat(200))] {
        let r = op.get(fx.url(q)).send().await?;
        assert_eq!(r.status(), 400, "{q}");
    }

    fx.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_log_is_not_served_again() -> anyhow::Result<()> {
    let (fx, seqs) = Fixture::start().await;
    let Fixture {
        dir,
        ca,
        log,
        log_stop,
        web_stop,
        web,
        ..
    } = fx;
    web_stop.cancel();
    web.await??;
    log_stop.cancel();
    drop(log);

    // Rewrite one stored row the way an attacker with the database would.
    let raw = SqliteStore::open(&dir.path().join("audit.db")).await?;
    let changed = sqlx::query("UPDATE events SET tenant = 'initech', leaf_hash = ? WHERE seq = ?")
        .bind(vec![7u8; 32])
        .bind(i64::try_from(seqs.acme[1])?)
        .execute(raw.pool())
        .await?;
    assert_eq!(changed.rows_affected(), 1);

    // The same signing key: the signature still checks, the root does not —
    // so the audit service refuses to serve the rewritten log at all (and
    // never signs over it), rather than show it with a warning.
    let store = store::open(&format!(
        "sqlite://{}",
        dir.path().join("audit.db").display()
    ))
    .await?;
    let signer = Signer::load_or_create(&dir.path().join("audit-signing.key"))?;
    let reopened = Log::open(
        store,
        signer,
        LogConfig::default(),
        CancellationToken::new(),
    )
    .await;
    assert!(reopened.is_err(), "a rewritten log is not served");
    drop(ca);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_log_renders_an_empty_table() -> anyhow::Result<()> {
    let (dir, ca) = Fixture::pki();
    let (log, log_stop) = Fixture::open_log(dir.path()).await;
    let fx = Fixture::serve(dir, ca, log, log_stop, Arc::new(NoRevocations)).await;
    let r = fx
        .client(None)
        .get(fx.url("/"))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let body = r.text().await?;
    assert!(head_tag(&body).is_some(), "the head block is there");
    assert!(body.contains("No events match."));
    assert!(row_seqs(&body).is_empty());
    fx.stop().await;
    Ok(())
}

/// Revokes one SPIFFE ID once told to, as identity's revocation list would.
#[derive(Debug, Default)]
struct RevokeOne(Mutex<Option<String>>);

impl RevocationCheck for RevokeOne {
    fn revoked(&self, id: &SpiffeId, _serial: Option<&[u8]>) -> bool {
        self.0.lock().expect("lock").as_deref() == Some(id.as_str())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_operator_is_refused_on_an_open_connection() -> anyhow::Result<()> {
    let revocations = Arc::new(RevokeOne::default());
    let (fx, seqs) = Fixture::start_with(revocations.clone()).await;
    let mallory = fx.client(Some("admin/mallory"));
    let r = mallory.get(fx.url("/")).send().await?;
    assert_eq!(r.status(), 200);
    assert_eq!(row_seqs(&r.text().await?).first(), Some(&seqs.last));

    // Revoked after the handshake: the kept-alive connection's next request
    // is refused, without data.
    *revocations.0.lock().expect("lock") = Some(id("admin/mallory").to_string());
    let r = mallory.get(fx.url("/")).send().await?;
    assert_eq!(r.status(), 401);
    let body = r.text().await?;
    assert!(row_seqs(&body).is_empty() && body.contains("revoked"));

    // A new connection does not get past the handshake.
    assert!(
        fx.client(Some("admin/mallory"))
            .get(fx.url("/"))
            .send()
            .await
            .is_err()
    );
    // Other operators are unaffected.
    let r = fx
        .client(Some("admin/alice"))
        .get(fx.url("/"))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    fx.stop().await;
    Ok(())
}
