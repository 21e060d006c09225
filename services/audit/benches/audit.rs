//! The audit benchmark: a program (harness = false), not a timed test.
//!
//! For each backend (SQLite in a temp dir; PostgreSQL from the test kit when it
//! is installed):
//! 1. batched Append over real mTLS gRPC: the audit service in-process (the
//!    mesh server with the real handlers, authorization table and group-commit
//!    log), K concurrent clients appending batches as `service/sealed-vault`;
//!    events/s and Append latency (p50, p99);
//! 2. Verify over the resulting log (`verify::verify`): events/s;
//! 3. the log filled to a large size through the Log in big batches, and
//!    Verify again;
//! 4. where Verify's time goes: each step of its loop timed on its own.
//!
//! `cargo bench -p bulkhead-audit --bench audit`. Sizes come from the
//! environment: AUDIT_BENCH_EVENTS (200000), AUDIT_BENCH_CLIENTS (8),
//! AUDIT_BENCH_BATCH (100), AUDIT_BENCH_BIG (1000000), AUDIT_BENCH_PHASE_SECS
//! (300: every phase stops there, and says so), AUDIT_BENCH_POSTGRES (1; 0
//! skips it). Every loop is bounded by its count and by the phase deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bulkhead_audit::checkpoint::Signer;
use bulkhead_audit::event::{self, NewEvent, Outcome};
use bulkhead_audit::log::{Log, LogConfig};
use bulkhead_audit::merkle::{self, Accumulator};
use bulkhead_audit::store::AuditStore;
use bulkhead_audit::{service, store, verify};
use bulkhead_mesh::pki::{Ca, SvidOptions};
use bulkhead_mesh::server::MeshServer;
use bulkhead_mesh::spiffe::TrustDomain;
use bulkhead_mesh::tls::{ExpectServer, Identity, TrustBundle};
use bulkhead_proto::audit::v1 as pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Events per Log append while filling the store.
const FILL_BATCH: usize = 10_000;
/// Fill appends in flight at once (the writer groups them).
const FILL_IN_FLIGHT: usize = 4;
/// Rows per read in the Verify breakdown (what `verify` reads per query).
const READ_CHUNK: u32 = 20_000;

#[derive(Debug, Clone)]
struct Params {
    events: u64,
    clients: u64,
    batch: u64,
    big: u64,
    phase: Duration,
    postgres: bool,
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

impl Params {
    fn from_env() -> anyhow::Result<Self> {
        let p = Self {
            events: env_u64("AUDIT_BENCH_EVENTS", 200_000)?,
            clients: env_u64("AUDIT_BENCH_CLIENTS", 8)?.max(1),
            batch: env_u64("AUDIT_BENCH_BATCH", 100)?.clamp(1, event::MAX_BATCH as u64),
            big: env_u64("AUDIT_BENCH_BIG", 1_000_000)?,
            phase: Duration::from_secs(env_u64("AUDIT_BENCH_PHASE_SECS", 300)?),
            postgres: env_u64("AUDIT_BENCH_POSTGRES", 1)? != 0,
        };
        Ok(p)
    }
}

/// The bench's trust domain: a CA, the audit server's SVID, and the writer's.
struct Pki {
    bundle: TrustBundle,
    server: Identity,
    writer: Identity,
}

fn pki() -> anyhow::Result<Pki> {
    let td = TrustDomain::parse("bulkhead.bench")?;
    let (ca, _key) = Ca::generate(&td)?;
    let issue = |path: &str, opts: SvidOptions| -> anyhow::Result<Identity> {
        let svid = ca.issue(&td.join(path.split('/'))?, &opts)?;
        let chain = format!("{}{}", svid.cert_pem, ca.cert_pem());
        Ok(Identity::from_pem(
            chain.as_bytes(),
            svid.key_pem.as_bytes(),
            path,
        )?)
    };
    Ok(Pki {
        bundle: TrustBundle::from_pem(ca.cert_pem().as_bytes(), "bench ca")?,
        server: issue("service/audit", SvidOptions::for_local_service("audit"))?,
        writer: issue("service/sealed-vault", SvidOptions::default())?,
    })
}

/// A realistic event: a credential resolution with key names and an HMAC
/// fingerprint, spread over tenants and runs.
fn attributes(i: u64) -> BTreeMap<String, String> {
    [
        (
            "keys".to_owned(),
            "ANTHROPIC_API_KEY,OPENAI_API_KEY".to_owned(),
        ),
        (
            "fingerprint".to_owned(),
            format!("hmac-sha256:{:064x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15),
        ),
        ("profile".to_owned(), "default".to_owned()),
        ("backend".to_owned(), "builtin".to_owned()),
    ]
    .into_iter()
    .collect()
}

fn pb_event(i: u64) -> pb::NewEvent {
    pb::NewEvent {
        r#type: "sealed.credential.resolved".into(),
        tenant: format!("tenant-{}", i % 16),
        run_id: format!("run-{:012}", i / 4),
        outcome: pb::Outcome::Success as i32,
        attributes: attributes(i).into_iter().collect(),
    }
}

fn new_event(i: u64) -> NewEvent {
    NewEvent {
        kind: "sealed.credential.resolved".into(),
        tenant: format!("tenant-{}", i % 16),
        run_id: format!("run-{:012}", i / 4),
        outcome: Outcome::Success,
        attributes: attributes(i),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn per_sec(r: f64) -> String {
    let r = r.round() as u64;
    let s = r.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[derive(Debug, Default)]
struct AppendFigures {
    events: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    timed_out: bool,
}

#[derive(Debug, Default)]
struct VerifyFigures {
    events: u64,
    elapsed: Duration,
}

/// Verify's loop, step by step, per event (nanoseconds).
#[derive(Debug, Default)]
struct Breakdown {
    events: u64,
    /// `store.range`: the query, row iteration and decoding into events.
    read_ns: f64,
    /// Of which (estimated): parsing the attributes column's JSON.
    attributes_json_ns: f64,
    /// `store.leaf_hashes`: the same rows, only sequence and hash (the floor of
    /// reading rows at all).
    read_hashes_only_ns: f64,
    /// `Event::leaf`: the canonical JSON, with its RFC 3339 time.
    leaf_json_ns: f64,
    /// Of which: the RFC 3339 time.
    time_format_ns: f64,
    /// SHA-256 of 0x00 ‖ leaf.
    leaf_sha_ns: f64,
    /// Accumulator pushes (node hashes).
    tree_ns: f64,
    leaf_bytes: f64,
}

#[derive(Debug, Default)]
struct Figures {
    backend: String,
    append: AppendFigures,
    verify_small: VerifyFigures,
    fill: VerifyFigures,
    verify_big: VerifyFigures,
    breakdown: Breakdown,
    notes: Vec<String>,
}

async fn append_phase(addr: &str, pki: &Pki, p: &Params) -> anyhow::Result<AppendFigures> {
    let per_client = p.events / p.clients;
    let mut clients = Vec::new();
    // Handshakes before the clock starts.
    for _ in 0..p.clients {
        let ch = bulkhead_mesh::client::connect(
            addr,
            Some(&pki.writer),
            &pki.bundle,
            ExpectServer::Service("audit".into()),
        )
        .await?;
        clients.push(AuditServiceClient::new(ch));
    }
    let deadline = Instant::now() + p.phase;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for (c, mut client) in clients.into_iter().enumerate() {
        let batch = p.batch;
        let first = c as u64 * per_client;
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity((per_client / batch + 1) as usize);
            let mut sent = 0u64;
            let mut timed_out = false;
            while sent < per_client {
                if Instant::now() >= deadline {
                    timed_out = true;
                    break;
                }
                let n = batch.min(per_client - sent);
                let events = (first + sent..first + sent + n).map(pb_event).collect();
                let t = Instant::now();
                let resp = client.append(pb::AppendRequest { events }).await?;
                latencies.push(t.elapsed());
                ensure!(
                    resp.into_inner().sequences.len() as u64 == n,
                    "short append"
                );
                sent += n;
            }
            Ok::<_, anyhow::Error>((sent, latencies, timed_out))
        });
    }
    let mut f = AppendFigures::default();
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (sent, lat, timed_out) = r??;
        f.events += sent;
        f.timed_out |= timed_out;
        all.extend(lat);
    }
    f.elapsed = start.elapsed();
    all.sort();
    f.p50 = percentile(&all, 0.50);
    f.p99 = percentile(&all, 0.99);
    f.max = all.last().copied().unwrap_or_default();
    Ok(f)
}

async fn verify_phase(
    store: &dyn AuditStore,
    signer_public: &ed25519_dalek::VerifyingKey,
    expect: u64,
    phase: Duration,
) -> anyhow::Result<VerifyFigures> {
    let t = Instant::now();
    let report = tokio::time::timeout(phase, verify::verify(store, signer_public, 0, 0))
        .await
        .context("verify did not finish within the phase deadline")??;
    let elapsed = t.elapsed();
    ensure!(report.ok(), "the log does not verify: {report:?}");
    ensure!(
        report.checked == expect,
        "verified {} of {expect} events",
        report.checked
    );
    Ok(VerifyFigures {
        events: report.checked,
        elapsed,
    })
}

/// Appends through the Log until it holds `target` events.
async fn fill(
    log: &Log,
    pki: &Pki,
    target: u64,
    phase: Duration,
) -> anyhow::Result<(VerifyFigures, bool)> {
    let actor = pki.writer.spiffe_id().clone();
    let start_size = log.size();
    let deadline = Instant::now() + phase;
    let start = Instant::now();
    let mut next = start_size;
    let mut in_flight = JoinSet::new();
    let mut timed_out = false;
    loop {
        while in_flight.len() < FILL_IN_FLIGHT && next < target {
            if Instant::now() >= deadline {
                timed_out = true;
                break;
            }
            let n = (target - next).min(FILL_BATCH as u64);
            let events: Vec<NewEvent> = (next..next + n).map(new_event).collect();
            let (log, actor) = (log.clone(), actor.clone());
            in_flight.spawn(async move { log.append(&actor, events).await });
            next += n;
        }
        match in_flight.join_next().await {
            Some(r) => {
                r?.map_err(|e| anyhow::anyhow!("fill append: {e}"))?;
            }
            None => break,
        }
    }
    Ok((
        VerifyFigures {
            events: log.size() - start_size,
            elapsed: start.elapsed(),
        },
        timed_out,
    ))
}

/// Times each step of Verify's loop on its own, over the whole store.
async fn breakdown(store: &dyn AuditStore, phase: Duration) -> anyhow::Result<Breakdown> {
    let deadline = Instant::now() + phase;
    let mut b = Breakdown::default();
    let (mut read, mut attrs, mut hashes_only, mut leaf_json, mut time_fmt, mut sha, mut tree) = (
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
    );
    let mut acc = Accumulator::default();
    let mut after = 0u64;
    let mut leaf_bytes = 0u64;
    while Instant::now() < deadline {
        let t = Instant::now();
        let rows = store.range(after, READ_CHUNK).await?;
        read += t.elapsed();
        let Some(last) = rows.last() else { break };
        let from = after;
        after = last.event.sequence;

        let t = Instant::now();
        let hashes = store.leaf_hashes(from, READ_CHUNK).await?;
        hashes_only += t.elapsed();
        ensure!(hashes.len() == rows.len(), "leaf_hashes and range disagree");

        // The attributes column as stored, parsed again the way decoding does.
        let columns: Vec<String> = rows
            .iter()
            .map(|r| serde_json::to_string(&r.event.attributes))
            .collect::<Result<_, _>>()?;
        let t = Instant::now();
        for c in &columns {
            let m: BTreeMap<String, String> = serde_json::from_str(c)?;
            std::hint::black_box(m);
        }
        attrs += t.elapsed();

        let t = Instant::now();
        let leaves: Vec<String> = rows.iter().map(|r| r.event.leaf()).collect();
        leaf_json += t.elapsed();

        let t = Instant::now();
        for r in &rows {
            std::hint::black_box(event::format_time_us(r.event.time_us));
        }
        time_fmt += t.elapsed();

        let t = Instant::now();
        let leaf_hashes: Vec<merkle::Hash> = leaves
            .iter()
            .map(|l| merkle::leaf_hash(l.as_bytes()))
            .collect();
        sha += t.elapsed();
        leaf_bytes += leaves.iter().map(|l| l.len() as u64).sum::<u64>();

        let t = Instant::now();
        for h in leaf_hashes {
            acc.push(h);
        }
        tree += t.elapsed();
        b.events += rows.len() as u64;
    }
    let per = |d: Duration| d.as_nanos() as f64 / b.events.max(1) as f64;
    b.read_ns = per(read);
    b.attributes_json_ns = per(attrs);
    b.read_hashes_only_ns = per(hashes_only);
    b.leaf_json_ns = per(leaf_json);
    b.time_format_ns = per(time_fmt);
    b.leaf_sha_ns = per(sha);
    b.tree_ns = per(tree);
    b.leaf_bytes = leaf_bytes as f64 / b.events.max(1) as f64;
    std::hint::black_box(acc.root());
    Ok(b)
}

async fn bench_backend(name: &str, url: &str, pki: &Pki, p: &Params) -> anyhow::Result<Figures> {
    let mut fig = Figures {
        backend: name.to_owned(),
        ..Figures::default()
    };
    println!("\n== {name} ==");
    let store = store::open(url).await.context("failed to open the store")?;
    let stop = CancellationToken::new();
    let log = Log::open(
        Arc::clone(&store),
        Signer::generate(),
        LogConfig::default(),
        stop.clone(),
    )
    .await?;
    let public = log.signer().public();

    let server = MeshServer::new("audit", pki.server.clone(), pki.bundle.clone());
    let api = service::AuditApi::new(log.clone(), server.draining());
    let bound = server
        .add_service(service::server(api), service::POLICY)
        .bind("127.0.0.1:0".parse()?)
        .await?;
    let addr = bound.local_addr().to_string();
    let server_stop = CancellationToken::new();
    let serving = tokio::spawn(bound.serve(server_stop.clone().cancelled_owned()));

    println!(
        "append: {} events, {} clients, batches of {}, over mTLS gRPC",
        p.events, p.clients, p.batch
    );
    fig.append = append_phase(&addr, pki, p).await?;
    let a = &fig.append;
    println!(
        "append: {} events in {:.2} s = {} events/s; Append latency p50 {} p99 {} max {}",
        a.events,
        a.elapsed.as_secs_f64(),
        per_sec(rate(a.events, a.elapsed)),
        ms(a.p50),
        ms(a.p99),
        ms(a.max)
    );
    if a.timed_out {
        fig.notes.push(format!(
            "{name}: append stopped at the phase deadline after {} events",
            a.events
        ));
    }
    server_stop.cancel();
    serving.await??;

    log.checkpoint().await?;
    let size = log.size();
    fig.verify_small = verify_phase(store.as_ref(), &public, size, p.phase).await?;
    println!(
        "verify: {} events in {:.2} s = {} events/s",
        fig.verify_small.events,
        fig.verify_small.elapsed.as_secs_f64(),
        per_sec(rate(fig.verify_small.events, fig.verify_small.elapsed))
    );

    if p.big > size {
        let (f, timed_out) = fill(&log, pki, p.big, p.phase).await?;
        println!(
            "fill: {} events through the Log in batches of {FILL_BATCH} in {:.2} s = {} events/s",
            f.events,
            f.elapsed.as_secs_f64(),
            per_sec(rate(f.events, f.elapsed))
        );
        if timed_out {
            fig.notes.push(format!(
                "{name}: fill stopped at the phase deadline at {} events",
                log.size()
            ));
        }
        fig.fill = f;
        log.checkpoint().await?;
        let size = log.size();
        fig.verify_big = verify_phase(store.as_ref(), &public, size, p.phase).await?;
        println!(
            "verify: {} events in {:.2} s = {} events/s",
            fig.verify_big.events,
            fig.verify_big.elapsed.as_secs_f64(),
            per_sec(rate(fig.verify_big.events, fig.verify_big.elapsed))
        );
    }

    fig.breakdown = breakdown(store.as_ref(), p.phase).await?;
    let b = &fig.breakdown;
    println!(
        "verify breakdown over {} events (ns/event): read+decode {:.0} (attributes JSON ~{:.0}; \
         seq+hash only {:.0}), leaf JSON {:.0} (time {:.0}), leaf SHA-256 {:.0} ({:.0} B), tree {:.0}",
        b.events,
        b.read_ns,
        b.attributes_json_ns,
        b.read_hashes_only_ns,
        b.leaf_json_ns,
        b.time_format_ns,
        b.leaf_sha_ns,
        b.leaf_bytes,
        b.tree_ns
    );
    stop.cancel();
    Ok(fig)
}

fn report(figs: &[Figures], p: &Params) {
    println!("\n== summary (markdown) ==\n");
    println!(
        "| backend | Append events/s ({} clients × {}/batch, mTLS) | Append p50 | Append p99 | Verify events/s @ {} | Verify events/s @ {} | bulk fill events/s |",
        p.clients, p.batch, p.events, p.big
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for f in figs {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            f.backend,
            per_sec(rate(f.append.events, f.append.elapsed)),
            ms(f.append.p50),
            ms(f.append.p99),
            per_sec(rate(f.verify_small.events, f.verify_small.elapsed)),
            per_sec(rate(f.verify_big.events, f.verify_big.elapsed)),
            per_sec(rate(f.fill.events, f.fill.elapsed)),
        );
    }
    println!(
        "\n| backend | read+decode | of which attributes JSON | seq+hash only | leaf JSON | of which time | leaf SHA-256 | tree | sum | implied events/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for f in figs {
        let b = &f.breakdown;
        let sum = b.read_ns + b.leaf_json_ns + b.leaf_sha_ns + b.tree_ns;
        println!(
            "| {} | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {:.0} ns | {} |",
            f.backend,
            b.read_ns,
            b.attributes_json_ns,
            b.read_hashes_only_ns,
            b.leaf_json_ns,
            b.time_format_ns,
            b.leaf_sha_ns,
            b.tree_ns,
            sum,
            per_sec(1e9 / sum.max(1.0))
        );
    }
    for f in figs {
        for n in &f.notes {
            println!("note: {n}");
        }
    }
}

async fn run() -> anyhow::Result<()> {
    bulkhead_mesh::tls::install_crypto_provider();
    let p = Params::from_env()?;
    println!(
        "audit bench: {} cores, events {}, clients {}, batch {}, big {}, phase deadline {:?}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        p.events,
        p.clients,
        p.batch,
        p.big,
        p.phase
    );
    let pki = pki()?;
    let mut figs = Vec::new();

    let dir = tempfile::Builder::new()
        .prefix("bulkhead-audit-bench-")
        .tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("audit.db").display());
    figs.push(bench_backend("sqlite", &url, &pki, &p).await?);

    if p.postgres {
        match bulkhead_testkit::external::Postgres::start().await? {
            Some(pg) => {
                let url = pg.create_database("audit_bench").await?;
                figs.push(bench_backend("postgres", &url, &pki, &p).await?);
            }
            None => println!("\npostgres: skipped (PostgreSQL is not installed)"),
        }
    } else {
        println!("\npostgres: skipped (AUDIT_BENCH_POSTGRES=0)");
    }
    report(&figs, &p);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the runtime")?;
    rt.block_on(run())
}
