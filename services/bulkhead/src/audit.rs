//! `bulkhead audit`: the operator's view of the audit log.
//!
//! - `query`, `tail` and `export` read the log over gRPC as the operator.
//! - `verify --file F` checks a JSONL export offline, with the audit public key
//!   alone: every line's leaf hash is recomputed from its fields (RFC 8785
//!   canonical JSON), the tree head on the last line must carry a valid
//!   signature, and then either the whole tree is rebuilt and its root compared
//!   with the signed root (an unfiltered export: sequences 1 to the tree size)
//!   or each line's inclusion proof is checked against it (a filtered export).
//! - `verify --dir DIR` asks the service to verify its store and, independently,
//!   verifies a fresh unfiltered export the same way `--file` does.
//!
//! The offline checks ([`ExportVerifier`], [`verify_export`]) use no network
//! and no service code beyond the audit library's hashing and signature rules.

use std::fmt;
use std::io::{BufRead, Read as _, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bulkhead_audit::checkpoint::{self, TreeHead};
use bulkhead_audit::event::{self, Event, Outcome};
use bulkhead_audit::merkle::{self, Accumulator, Hash, ProofError};
use bulkhead_audit::store::StoredEvent;
use bulkhead_cluster::Endpoints;
use bulkhead_mesh::client::MeshChannel;
use bulkhead_mesh::tls::ExpectServer;
use bulkhead_proto::audit::v1 as pb;
use bulkhead_proto::audit::v1::audit_service_client::AuditServiceClient;
use clap::{Args, Subcommand};
use ed25519_dalek::VerifyingKey;

/// Largest gRPC message the CLI accepts: a full Query page of events with
/// maximal attributes.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// The largest page the Query API serves.
const MAX_PAGE: u32 = 1000;
/// Longest export line accepted: an event with 32 attributes of 1 KiB, every
/// character escaped, and its proof fit many times over.
const MAX_LINE: u64 = 4 * 1024 * 1024;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Prints events in sequence order, one per line (seq, time, type, actor,
    /// tenant, run, outcome, attributes).
    Query {
        #[command(flatten)]
        mesh: MeshDir,
        #[command(flatten)]
        filters: Filters,
        #[command(flatten)]
        range: TimeRange,
        /// Only events with a sequence greater than this.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
        /// At most this many events in all (fetched in pages of up to 1000).
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: u64,
        /// One JSON object per line: the event's leaf object and leaf_hash.
        #[arg(long)]
        json: bool,
    },
    /// Prints matching events as they are committed, until Ctrl-C.
    Tail {
        #[command(flatten)]
        mesh: MeshDir,
        #[command(flatten)]
        filters: Filters,
        /// Replay stored events from this sequence (inclusive) first; 0: only
        /// events committed from now on.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        from: u64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Writes the log as JSON Lines, cut at a signed tree head: the file
    /// `audit verify --file` checks offline.
    Export {
        #[command(flatten)]
        mesh: MeshDir,
        #[command(flatten)]
        filters: Filters,
        #[command(flatten)]
        range: TimeRange,
        /// Only events with a sequence greater than this (an incremental
        /// export; its lines carry inclusion proofs).
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
        /// Where to write it (default: stdout). Written to FILE.partial first,
        /// renamed when complete.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Verifies an export offline (--file), or the running log and a fresh
    /// export of it (--dir).
    Verify {
        /// The JSONL export to check offline ("-" for stdin).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// The audit public key (hex, as the service writes it beside its
        /// signing key); default: endpoints.json's audit_public_key.
        #[arg(long, value_name = "PATH")]
        public_key: Option<PathBuf>,
        /// The mesh: without --file, verify its log; with --file, only where to
        /// find the public key.
        #[arg(long, env = "BULKHEAD_DIR", value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Require the export to hold every event of its tree (refuse a
        /// filtered or empty export).
        #[arg(long)]
        complete: bool,
    },
}

/// Where the mesh is.
#[derive(Debug, Clone, Args)]
pub struct MeshDir {
    /// The mesh directory: DIR/endpoints.json and the operator certificate it
    /// names.
    #[arg(long, env = "BULKHEAD_DIR", value_name = "DIR")]
    pub dir: PathBuf,
}

/// Filters shared by query, tail and export.
#[derive(Debug, Clone, Default, Args)]
pub struct Filters {
    /// Only this tenant's events.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only event types starting with this prefix, e.g. "sealed.".
    #[arg(long = "type", value_name = "PREFIX")]
    pub type_prefix: Option<String>,
    /// Only events of this run.
    #[arg(long = "run", value_name = "RUN")]
    pub run_id: Option<String>,
    /// Only events appended by this SPIFFE ID.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub actor: Option<String>,
}

/// A time range (RFC 3339, e.g. 2025-11-27T10:00:00Z).
#[derive(Debug, Clone, Default, Args)]
pub struct TimeRange {
    /// Only events recorded at or after this time.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only events recorded before this time.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
}

pub async fn run(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Query {
            mesh,
            filters,
            range,
            after,
            limit,
            json,
        } => query(&mesh.dir, filters, range, after, limit, json).await,
        AuditCommand::Tail {
            mesh,
            filters,
            from,
            json,
        } => tail(&mesh.dir, filters, from, json).await,
        AuditCommand::Export {
            mesh,
            filters,
            range,
            after,
            out,
        } => export(&mesh.dir, filters, range, after, out.as_deref()).await,
        AuditCommand::Verify {
            file,
            public_key,
            dir,
            complete,
        } => match (file, dir) {
            (Some(file), dir) => {
                verify_file(&file, public_key.as_deref(), dir.as_deref(), complete)
            }
            (None, Some(dir)) => verify_mesh(&dir, public_key.as_deref()).await,
            (None, None) => {
                bail!("nothing to verify: pass --file FILE (offline) or --dir DIR (a running mesh)")
            }
        },
    }
}

// ---------------------------------------------------------------------------
// Talking to the mesh.

/// Reads `DIR/endpoints.json`, saying plainly when there is no mesh there.
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

/// The audit service of a mesh directory, or its store when the mesh is
/// stopped (as `bulkhead demo --dir` leaves it).
enum Live {
    Up(AuditServiceClient<MeshChannel>),
    Stopped(std::sync::Arc<dyn bulkhead_audit::store::AuditStore>),
}

/// Dials the audit service; if nothing answers at its address and the
/// directory holds the audit service's config, opens its store instead.
async fn connect_live(dir: &Path) -> anyhow::Result<Live> {
    let endpoints = load_endpoints(dir)?;
    let addr = endpoints
        .address("audit")
        .context("endpoints.json names no audit service")?;
    let answering = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .is_ok_and(|c| c.is_ok());
    if answering {
        return Ok(Live::Up(connect(dir).await?));
    }
    let config = dir.join("config").join("audit.toml");
    let Ok(text) = std::fs::read_to_string(&config) else {
        bail!(
            "cannot reach the audit service at {addr}, and {} holds no audit config to read its \
             store from (is the mesh running?)",
            dir.display()
        );
    };
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("failed to parse {}", config.display()))?;
    let url = match table.get("store").and_then(|v| v.as_str()) {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => {
            let data_dir = table
                .get("data_dir")
                .and_then(|v| v.as_str())
                .with_context(|| format!("{} names no data_dir", config.display()))?;
            format!(
                "sqlite://{}",
                Path::new(data_dir).join("audit.db").display()
            )
        }
    };
    if let Some(path) = url.strip_prefix("sqlite://")
        && !Path::new(path).is_file()
    {
        bail!("cannot reach the audit service at {addr}, and its store {path} does not exist");
    }
    eprintln!(
        "the mesh at {} is not running: reading its audit store directly",
        dir.display()
    );
    let store = bulkhead_audit::store::open(&url)
        .await
        .with_context(|| format!("failed to open the audit store of {}", dir.display()))?;
    Ok(Live::Stopped(store))
}

/// The whole log of a stopped mesh, cut at its newest signed tree head, in
/// the format of the service's Export.
async fn stopped_export_lines(
    store: &dyn bulkhead_audit::store::AuditStore,
    mut line: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<(u64, TreeHead)> {
    let head = store
        .latest_head()
        .await
        .context("failed to read the signed tree heads")?
        .context("the log has no signed tree head yet")?;
    let mut after = 0u64;
    let mut events = 0u64;
    'read: while after < head.tree_size {
        let rows = store
            .range(after, 10_000)
            .await
            .context("failed to read the audit store")?;
        if rows.is_empty() {
            break;
        }
        for e in rows {
            if e.event.sequence > head.tree_size {
                break 'read;
            }
            after = e.event.sequence;
            line(&bulkhead_audit::service::export_line(&e, None))?;
            events += 1;
        }
    }
    line(&format!(
        "{}\n",
        serde_json::json!({ "tree_head": head.to_json() })
    ))?;
    Ok((events, head))
}

async fn export_stopped(
    dir: &Path,
    store: &dyn bulkhead_audit::store::AuditStore,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let (events, head) = stopped_export_lines(store, |l| {
        buf.extend_from_slice(l.as_bytes());
        Ok(())
    })
    .await?;
    match out {
        None => {
            std::io::stdout().write_all(&buf)?;
            eprintln!(
                "exported {events} events of the stopped mesh at {}, cut at the signed tree head of size {}",
                dir.display(),
                head.tree_size
            );
        }
        Some(path) => {
            let mut partial = path.as_os_str().to_owned();
            partial.push(".partial");
            let partial = PathBuf::from(partial);
            std::fs::write(&partial, &buf)
                .with_context(|| format!("failed to write {}", partial.display()))?;
            std::fs::rename(&partial, path)
                .with_context(|| format!("failed to rename {}", partial.display()))?;
            println!(
                "exported {events} events, cut at the signed tree head of size {}, to {}",
                head.tree_size,
                path.display()
            );
        }
    }
    Ok(())
}

/// Verify of a stopped mesh: the store recomputed here (as the service would),
/// and its export checked with the public key alone.
async fn verify_stopped(
    dir: &Path,
    store: &dyn bulkhead_audit::store::AuditStore,
    key: &VerifyingKey,
) -> anyhow::Result<()> {
    let report = bulkhead_audit::verify::verify(store, key, 0, 0)
        .await
        .context("failed to read the audit store")?;
    let size = report.head.as_ref().map_or(0, |h| h.tree_size);
    if report.ok() {
        println!(
            "store verify: ok: {} events checked against the signed tree head of size {size}",
            report.checked
        );
    } else {
        println!(
            "store verify: FAILED at sequence {}: {:?} ({} events checked)",
            report.first_bad.unwrap_or(0),
            report.problem,
            report.checked
        );
    }
    let mut verifier = ExportVerifier::new(key, VerifyOptions { complete: true });
    stopped_export_lines(store, |l| {
        verifier.push_line(l);
        Ok(())
    })
    .await?;
    let offline = verifier.finish();
    match &offline {
        Ok(summary) => println!("export verify: ok: {summary}"),
        Err(e) => println!("export verify: FAILED: {e}"),
    }
    if report.ok() && offline.is_ok() {
        Ok(())
    } else {
        bail!("the audit log of {} does not verify", dir.display())
    }
}

/// Dials the audit service as the operator named in `endpoints.json`.
async fn connect(dir: &Path) -> anyhow::Result<AuditServiceClient<MeshChannel>> {
    let endpoints = load_endpoints(dir)?;
    let addr = endpoints
        .address("audit")
        .with_context(|| format!("{} names no audit service", Endpoints::path(dir).display()))?;
    let (identity, bundle) = endpoints
        .operator()
        .context("failed to load the operator certificate named in endpoints.json")?;
    let channel = bulkhead_mesh::client::connect(
        addr,
        Some(&identity),
        &bundle,
        ExpectServer::Service("audit".into()),
    )
    .await
    .with_context(|| format!("cannot reach the audit service at {addr} (is the mesh running?)"))?;
    Ok(AuditServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE))
}

/// A refused or failed RPC as an error that names the RPC, the code and the
/// service's message.
fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> anyhow::Error {
    move |s| {
        anyhow::anyhow!(
            "audit {what} failed: {:?}: {}",
            s.code(),
            if s.message().is_empty() {
                "(no message)"
            } else {
                s.message()
            }
        )
    }
}

fn timestamp(flag: &str, value: Option<&str>) -> anyhow::Result<Option<prost_types::Timestamp>> {
    let Some(v) = value else {
        return Ok(None);
    };
    let us = event::parse_time_us(v).with_context(|| {
        format!("{flag} {v:?} is not an RFC 3339 time (e.g. 2025-11-27T10:00:00Z)")
    })?;
    Ok(Some(prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }))
}

/// An event as the service sent it, with the leaf hash it claims.
fn from_pb(e: pb::Event) -> anyhow::Result<StoredEvent> {
    let time = e.time.unwrap_or_default();
    let outcome = match pb::Outcome::try_from(e.outcome) {
        Ok(pb::Outcome::Success) => Outcome::Success,
        Ok(pb::Outcome::Denied) => Outcome::Denied,
        Ok(pb::Outcome::Failure) => Outcome::Failure,
        _ => bail!("event {} has no valid outcome", e.sequence),
    };
    let leaf_hash: Hash = e.leaf_hash[..].try_into().map_err(|_| {
        anyhow::anyhow!("event {} has a leaf hash that is not 32 bytes", e.sequence)
    })?;
    Ok(StoredEvent {
        event: Event {
            sequence: e.sequence,
            time_us: time.seconds.saturating_mul(1_000_000) + i64::from(time.nanos / 1000),
            kind: e.r#type,
            actor: e.actor,
            tenant: e.tenant,
            run_id: e.run_id,
            outcome,
            attributes: e.attributes.into_iter().collect(),
        },
        leaf_hash,
    })
}

/// A value as printed in the one-line form: as is when it is one plain word,
/// else quoted with control characters escaped (audit values come from
/// services, and must not drive the operator's terminal).
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

/// The one-line form: seq, time, type, actor, tenant, run, outcome, attributes.
pub fn format_event(e: &Event) -> String {
    let mut line = format!(
        "{}  {}  {}  {}  tenant={}  run={}  {}",
        e.sequence,
        event::format_time_us(e.time_us),
        plain(&e.kind),
        plain(&e.actor),
        plain(&e.tenant),
        plain(&e.run_id),
        e.outcome.as_str(),
    );
    for (i, (k, v)) in e.attributes.iter().enumerate() {
        line.push_str(if i == 0 { "  " } else { " " });
        line.push_str(&plain(k));
        line.push('=');
        line.push_str(&plain(v));
    }
    line
}

fn print_event(out: &mut impl Write, e: pb::Event, json: bool) -> anyhow::Result<()> {
    let e = from_pb(e)?;
    if json {
        // The export's line format, without a proof.
        out.write_all(bulkhead_audit::service::export_line(&e, None).as_bytes())?;
    } else {
        writeln!(out, "{}", format_event(&e.event))?;
    }
    Ok(())
}

fn some(s: Option<String>) -> String {
    s.unwrap_or_default()
}

async fn query(
    dir: &Path,
    filters: Filters,
    range: TimeRange,
    after: u64,
    limit: u64,
    json: bool,
) -> anyhow::Result<()> {
    let start_time = timestamp("--since", range.since.as_deref())?;
    let end_time = timestamp("--until", range.until.as_deref())?;
    let mut client = connect(dir).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let mut after = after;
    let mut printed = 0u64;
    // Bounded by --limit: every page but the last is full.
    while printed < limit {
        let page = u32::try_from((limit - printed).min(u64::from(MAX_PAGE))).unwrap_or(MAX_PAGE);
        let resp = client
            .query(pb::QueryRequest {
                tenant: some(filters.tenant.clone()),
                type_prefix: some(filters.type_prefix.clone()),
                run_id: some(filters.run_id.clone()),
                actor: some(filters.actor.clone()),
                start_time,
                end_time,
                after_sequence: after,
                limit: page,
            })
            .await
            .map_err(rpc("Query"))?
            .into_inner();
        for e in resp.events {
            print_event(&mut out, e, json)?;
            printed += 1;
        }
        out.flush()?;
        if resp.next_after_sequence == 0 || resp.next_after_sequence <= after {
            break;
        }
        after = resp.next_after_sequence;
    }
    Ok(())
}

async fn tail(dir: &Path, filters: Filters, from: u64, json: bool) -> anyhow::Result<()> {
    let mut client = connect(dir).await?;
    let mut stream = client
        .tail(pb::TailRequest {
            tenant: some(filters.tenant),
            type_prefix: some(filters.type_prefix),
            run_id: some(filters.run_id),
            actor: some(filters.actor),
            from_sequence: from,
        })
        .await
        .map_err(rpc("Tail"))?
        .into_inner();
    let stop = bulkhead_mesh::shutdown::signal();
    tokio::pin!(stop);
    let mut out = std::io::stdout();
    loop {
        let msg = tokio::select! {
            () = &mut stop => return Ok(()),
            m = stream.message() => m.map_err(rpc("Tail"))?,
        };
        let Some(msg) = msg else {
            bail!("the audit service ended the tail stream");
        };
        if let Some(e) = msg.event {
            print_event(&mut out, e, json)?;
            out.flush()?;
        }
    }
}

async fn export(
    dir: &Path,
    filters: Filters,
    range: TimeRange,
    after: u64,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let start_time = timestamp("--since", range.since.as_deref())?;
    let end_time = timestamp("--until", range.until.as_deref())?;
    let mut client = match connect_live(dir).await? {
        Live::Up(client) => client,
        Live::Stopped(store) => {
            let unfiltered = filters.tenant.is_none()
                && filters.type_prefix.is_none()
                && filters.run_id.is_none()
                && filters.actor.is_none()
                && start_time.is_none()
                && end_time.is_none()
                && after == 0;
            if !unfiltered {
                bail!(
                    "the mesh at {} is not running: a stopped mesh's log is exported whole \
                     (filters need the audit service's proofs; start it with `bulkhead dev up --dir {}`)",
                    dir.display(),
                    dir.display()
                );
            }
            return export_stopped(dir, store.as_ref(), out).await;
        }
    };
    let mut stream = client
        .export(pb::ExportRequest {
            tenant: some(filters.tenant),
            type_prefix: some(filters.type_prefix),
            run_id: some(filters.run_id),
            actor: some(filters.actor),
            start_time,
            end_time,
            after_sequence: after,
        })
        .await
        .map_err(rpc("Export"))?
        .into_inner();

    match out {
        None => {
            let mut sink = std::io::BufWriter::new(std::io::stdout());
            let (events, head) = copy_export(&mut stream, &mut sink).await?;
            sink.flush()?;
            eprintln!(
                "exported {events} events, cut at the signed tree head of size {}",
                head.tree_size
            );
        }
        Some(path) => {
            // A failed export must not leave a truncated file that looks like one.
            let mut partial = path.as_os_str().to_owned();
            partial.push(".partial");
            let partial = PathBuf::from(partial);
            let file = std::fs::File::create(&partial)
                .with_context(|| format!("failed to create {}", partial.display()))?;
            let mut sink = std::io::BufWriter::new(file);
            let copied = copy_export(&mut stream, &mut sink).await;
            let finished = copied.and_then(|(events, head)| {
                let file = sink.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                std::fs::rename(&partial, path).with_context(|| {
                    format!(
                        "failed to rename {} to {}",
                        partial.display(),
                        path.display()
                    )
                })?;
                Ok((events, head))
            });
            match finished {
                Ok((events, head)) => println!(
                    "exported {events} events, cut at the signed tree head of size {}, to {}",
                    head.tree_size,
                    path.display()
                ),
                Err(e) => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Copies export lines to `sink`; returns the number of event lines and the
/// tree head of the last line (an export without one is incomplete).
async fn copy_export(
    stream: &mut tonic::Streaming<pb::ExportResponse>,
    sink: &mut impl Write,
) -> anyhow::Result<(u64, TreeHead)> {
    let mut lines = 0u64;
    let mut last = String::new();
    while let Some(msg) = stream.message().await.map_err(rpc("Export"))? {
        sink.write_all(msg.line.as_bytes())
            .context("failed to write the export")?;
        lines += 1;
        last = msg.line;
    }
    let head = serde_json::from_str::<serde_json::Value>(&last)
        .ok()
        .and_then(|v| TreeHead::from_json(v.get("tree_head")?))
        .context("the export stream ended without its tree head line")?;
    Ok((lines - 1, head))
}

// ---------------------------------------------------------------------------
// Verification.

fn public_key(explicit: Option<&Path>, dir: Option<&Path>) -> anyhow::Result<VerifyingKey> {
    let path = match (explicit, dir) {
        (Some(p), _) => p.to_owned(),
        (None, Some(dir)) => load_endpoints(dir)?.audit_public_key.with_context(|| {
            format!(
                "{} names no audit_public_key; pass --public-key PATH",
                Endpoints::path(dir).display()
            )
        })?,
        (None, None) => {
            bail!("pass --public-key PATH (or --dir DIR, whose endpoints.json names it)")
        }
    };
    checkpoint::read_public(&path)
        .with_context(|| format!("failed to read the audit public key {}", path.display()))
}

fn verify_file(
    file: &Path,
    key: Option<&Path>,
    dir: Option<&Path>,
    complete: bool,
) -> anyhow::Result<()> {
    let key = public_key(key, dir)?;
    let options = VerifyOptions { complete };
    let result = if file == Path::new("-") {
        verify_export_with(std::io::stdin().lock(), &key, options)
    } else {
        let f = std::fs::File::open(file)
            .with_context(|| format!("failed to open {}", file.display()))?;
        verify_export_with(std::io::BufReader::with_capacity(1 << 20, f), &key, options)
    };
    match result {
        Ok(summary) => {
            println!("ok: {summary}");
            Ok(())
        }
        Err(e) => bail!("{} does not verify: {e}", file.display()),
    }
}

async fn verify_mesh(dir: &Path, key: Option<&Path>) -> anyhow::Result<()> {
    let key = public_key(key, Some(dir))?;
    let mut client = match connect_live(dir).await? {
        Live::Up(client) => client,
        Live::Stopped(store) => return verify_stopped(dir, store.as_ref(), &key).await,
    };

    // The service recomputes its own store.
    let server = client
        .verify(pb::VerifyRequest {
            from_sequence: 0,
            to_sequence: 0,
        })
        .await
        .map_err(rpc("Verify"))?
        .into_inner();
    let server_ok = server.ok;
    let size = server.tree_head.as_ref().map_or(0, |h| h.tree_size);
    if server.ok {
        println!(
            "server verify: ok: {} events checked against the signed tree head of size {size}",
            server.checked
        );
    } else {
        let problem =
            pb::VerifyProblem::try_from(server.problem).map_or("an unknown problem", |p| match p {
                pb::VerifyProblem::Unspecified => "an unspecified problem",
                pb::VerifyProblem::LeafMismatch => "a stored event no longer matches its leaf hash",
                pb::VerifyProblem::SequenceGap => "a sequence is missing or out of order",
                pb::VerifyProblem::RootMismatch => "the rebuilt tree does not match a signed root",
                pb::VerifyProblem::BadSignature => "a signed tree head's signature does not verify",
            });
        println!(
            "server verify: FAILED at sequence {}: {problem} ({} events checked)",
            server.first_bad_sequence, server.checked
        );
    }

    // And independently: a full export, checked here with the public key alone.
    let mut stream = client
        .export(pb::ExportRequest::default())
        .await
        .map_err(rpc("Export"))?
        .into_inner();
    let mut verifier = ExportVerifier::new(&key, VerifyOptions { complete: true });
    while let Some(msg) = stream.message().await.map_err(rpc("Export"))? {
        verifier.push_line(&msg.line);
    }
    let offline = verifier.finish();
    match &offline {
        Ok(summary) => println!("export verify: ok: {summary}"),
        Err(e) => println!("export verify: FAILED: {e}"),
    }
    match (server_ok, offline) {
        (true, Ok(_)) => Ok(()),
        (false, _) => bail!(
            "the audit log does not verify (first bad sequence {})",
            server.first_bad_sequence
        ),
        (true, Err(e)) => bail!("the export of the audit log does not verify: {e}"),
    }
}

/// What offline verification demands beyond the signature and the proofs.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    /// Refuse an export that does not hold every event of its tree.
    pub complete: bool,
}

/// How much of the tree an export proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Every event 1 to the tree size, and the tree rebuilt from them has the
    /// signed root.
    Complete,
    /// Each event's inclusion proof leads to the signed root (a filtered
    /// export; what it left out is not proven absent).
    Proofs,
    /// No events: only the tree head was checked.
    HeadOnly,
}

/// A verified export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Event lines checked.
    pub events: u64,
    pub coverage: Coverage,
    /// The signed tree head they were checked against.
    pub head: TreeHead,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.coverage {
            Coverage::Complete => "the whole tree rebuilt",
            Coverage::Proofs => "each by its inclusion proof",
            Coverage::HeadOnly => "tree head only",
        };
        write!(
            f,
            "{} events checked ({how}), tree size {}, root {}, key {}, signed {}",
            self.events,
            self.head.tree_size,
            hex::encode(self.head.root),
            self.head.key_id,
            event::format_time_us(
                i64::try_from(self.head.timestamp_ms)
                    .unwrap_or(0)
                    .saturating_mul(1000)
            ),
        )
    }
}

/// Why an export does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The input could not be read.
    Io(String),
    /// A line is not what the export format says.
    Malformed(String),
    /// The event's fields do not hash to the line's leaf_hash.
    LeafMismatch,
    /// In a complete export, the line holds another sequence than the next one.
    SequenceGap { expected: u64, found: u64 },
    /// In a filtered export, a sequence not after the previous line's.
    OutOfOrder { previous: u64 },
    /// An event beyond the tree the head signs.
    BeyondHead { tree_size: u64 },
    /// An inclusion proof that does not lead to the signed root.
    BadProof(ProofError),
    /// The export ends without its tree head line (truncated).
    MissingHead,
    /// The head names another key than the one given.
    WrongKey { head_key_id: String, key_id: String },
    /// The head's signature does not verify with the key.
    BadSignature,
    /// A complete export stops before the head's tree size.
    Incomplete { tree_size: u64, events: u64 },
    /// The tree rebuilt from the events does not have the signed root.
    RootMismatch { rebuilt: Hash, signed: Hash },
    /// A filtered export where a complete one was required.
    NotComplete,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Io(e) => write!(f, "cannot read the export: {e}"),
            Problem::Malformed(why) => write!(f, "malformed: {why}"),
            Problem::LeafMismatch => {
                write!(
                    f,
                    "the event's fields do not hash to its leaf_hash (the line was changed)"
                )
            }
            Problem::SequenceGap { expected, found } => write!(
                f,
                "expected sequence {expected}, found {found} (a line was deleted, inserted or moved)"
            ),
            Problem::OutOfOrder { previous } => write!(
                f,
                "not after the previous line's sequence {previous} (lines were moved or repeated)"
            ),
            Problem::BeyondHead { tree_size } => {
                write!(f, "the event is beyond the signed tree of size {tree_size}")
            }
            Problem::BadProof(e) => write!(f, "the inclusion proof does not verify: {e}"),
            Problem::MissingHead => write!(
                f,
                "the export ends without its tree head line (it was truncated)"
            ),
            Problem::WrongKey {
                head_key_id,
                key_id,
            } => write!(
                f,
                "the tree head is signed by key {head_key_id}, not by the given key {key_id}"
            ),
            Problem::BadSignature => write!(f, "the tree head's signature does not verify"),
            Problem::Incomplete { tree_size, events } => write!(
                f,
                "the export holds {events} events but the signed tree holds {tree_size} (events \
                 were deleted or the tail truncated)"
            ),
            Problem::RootMismatch { rebuilt, signed } => write!(
                f,
                "the tree rebuilt from the events has root {}, the signed root is {}",
                hex::encode(rebuilt),
                hex::encode(signed)
            ),
            Problem::NotComplete => write!(
                f,
                "not a complete export: it does not hold every event of its tree"
            ),
        }
    }
}

/// Where an export failed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    /// The 1-based line, when one line is to blame.
    pub line: Option<u64>,
    /// The first bad sequence, when known.
    pub sequence: Option<u64>,
    pub problem: Problem,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.sequence) {
            (Some(l), Some(s)) => write!(f, "line {l} (sequence {s}): {}", self.problem),
            (Some(l), None) => write!(f, "line {l}: {}", self.problem),
            (None, Some(s)) => write!(f, "sequence {s}: {}", self.problem),
            (None, None) => write!(f, "{}", self.problem),
        }
    }
}

impl std::error::Error for VerifyError {}

/// Members an event line may have: the leaf object's, its hash and its proof.
const EVENT_MEMBERS: &[&str] = &[
    "actor",
    "attributes",
    "outcome",
    "run_id",
    "sequence",
    "tenant",
    "time",
    "type",
    "leaf_hash",
    "inclusion_proof",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No inclusion proofs: an unfiltered export, sequences 1 to n.
    Complete,
    /// Inclusion proofs on every line: a filtered export.
    Proofs,
}

#[derive(Debug)]
struct PendingProof {
    line: u64,
    sequence: u64,
    leaf: Hash,
    proof: Vec<Hash>,
}

/// Checks an export line by line, in O(log n) memory for an unfiltered export
/// (the tree is folded as lines arrive). A filtered export's proofs can only be
/// checked once the head, on the last line, is known, so they are kept until
/// then.
#[derive(Debug)]
pub struct ExportVerifier<'k> {
    key: &'k VerifyingKey,
    options: VerifyOptions,
    lines: u64,
    mode: Option<Mode>,
    events: u64,
    last_sequence: u64,
    acc: Accumulator,
    pending: Vec<PendingProof>,
    /// The tree head line: its number and its parsed value.
    head: Option<(u64, serde_json::Value)>,
    /// The first line that failed; lines after it are only scanned for the head.
    failure: Option<VerifyError>,
}

fn hash_hex(v: &serde_json::Value) -> Option<Hash> {
    let s = v.as_str()?;
    // The format says lowercase; accept nothing else, so that one hash has one spelling.
    if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode(s).ok()?.try_into().ok()
}

impl<'k> ExportVerifier<'k> {
    pub fn new(key: &'k VerifyingKey, options: VerifyOptions) -> Self {
        Self {
            key,
            options,
            lines: 0,
            mode: None,
            events: 0,
            last_sequence: 0,
            acc: Accumulator::default(),
            pending: Vec::new(),
            head: None,
            failure: None,
        }
    }

    fn fail(&mut self, line: u64, sequence: Option<u64>, problem: Problem) {
        if self.failure.is_none() {
            self.failure = Some(VerifyError {
                line: Some(line),
                sequence,
                problem,
            });
        }
    }

    /// Takes the next line (with or without its "\n").
    pub fn push_line(&mut self, text: &str) {
        self.lines += 1;
        let n = self.lines;
        let text = text.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            return;
        }
        if let Some((head_line, _)) = &self.head {
            let why = format!("a line after the tree head on line {head_line}");
            self.fail(n, None, Problem::Malformed(why));
            return;
        }
        let v: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.fail(n, None, Problem::Malformed(format!("not JSON: {e}")));
                return;
            }
        };
        if v.get("tree_head").is_some() {
            self.head = Some((n, v));
            return;
        }
        if self.failure.is_some() {
            return;
        }
        if let Err((sequence, problem)) = self.event(n, &v) {
            self.fail(n, sequence, problem);
        }
    }

    fn event(&mut self, n: u64, v: &serde_json::Value) -> Result<(), (Option<u64>, Problem)> {
        let malformed = |seq: Option<u64>, why: &str| (seq, Problem::Malformed(why.to_owned()));
        let obj = v
            .as_object()
            .ok_or_else(|| malformed(None, "not a JSON object"))?;
        let seq = obj
            .get("sequence")
            .and_then(serde_json::Value::as_u64)
            .filter(|s| *s > 0)
            .ok_or_else(|| malformed(None, "no sequence (a number from 1)"))?;
        if let Some(k) = obj.keys().find(|k| !EVENT_MEMBERS.contains(&k.as_str())) {
            return Err(malformed(Some(seq), &format!("unknown member {k:?}")));
        }
        let event = Event::from_leaf_json(v).ok_or_else(|| {
            malformed(
                Some(seq),
                "not an event: a member is missing or has the wrong type",
            )
        })?;
        let proof = match obj.get("inclusion_proof") {
            None => None,
            Some(p) => Some(
                p.as_array()
                    .and_then(|a| a.iter().map(hash_hex).collect::<Option<Vec<Hash>>>())
                    .ok_or_else(|| {
                        malformed(
                            Some(seq),
                            "inclusion_proof is not an array of 64-digit hex hashes",
                        )
                    })?,
            ),
        };
        let mode = if proof.is_some() {
            Mode::Proofs
        } else {
            Mode::Complete
        };
        if *self.mode.get_or_insert(mode) != mode {
            return Err(malformed(
                Some(seq),
                "lines with and without inclusion_proof are mixed",
            ));
        }
        // Order first: in a complete export the line's place says which
        // sequence it must hold, whatever its fields claim.
        let seq = match mode {
            Mode::Complete => {
                let expected = self.events + 1;
                if seq != expected {
                    return Err((
                        Some(expected),
                        Problem::SequenceGap {
                            expected,
                            found: seq,
                        },
                    ));
                }
                expected
            }
            Mode::Proofs => {
                if seq <= self.last_sequence {
                    return Err((
                        Some(seq),
                        Problem::OutOfOrder {
                            previous: self.last_sequence,
                        },
                    ));
                }
                seq
            }
        };
        let claimed = obj
            .get("leaf_hash")
            .and_then(hash_hex)
            .ok_or_else(|| malformed(Some(seq), "leaf_hash is not 64 lowercase hex digits"))?;
        let leaf = merkle::leaf_hash(event.leaf().as_bytes());
        if leaf != claimed {
            return Err((Some(seq), Problem::LeafMismatch));
        }
        match proof {
            None => self.acc.push(leaf),
            Some(proof) => self.pending.push(PendingProof {
                line: n,
                sequence: seq,
                leaf,
                proof,
            }),
        }
        self.last_sequence = seq;
        self.events += 1;
        Ok(())
    }

    /// Checks the head and everything that needed it; the first failure by line.
    pub fn finish(self) -> Result<Summary, VerifyError> {
        let Self {
            key,
            options,
            lines,
            mode,
            events,
            acc,
            pending,
            head,
            failure,
            ..
        } = self;
        // A failed line comes before the head; it is the first failure unless
        // a proof on an earlier line fails too, which needs a good head to tell.
        let head_err = |line: Option<u64>, problem: Problem| {
            Err(failure.clone().unwrap_or(VerifyError {
                line,
                sequence: None,
                problem,
            }))
        };
        let Some((head_line, head_value)) = head else {
            return head_err(Some(lines + 1), Problem::MissingHead);
        };
        let Some(head) = head_value.get("tree_head").and_then(TreeHead::from_json) else {
            return head_err(
                Some(head_line),
                Problem::Malformed("the tree head lacks a member or has a malformed one".into()),
            );
        };
        let key_id = checkpoint::key_id(key);
        if head.key_id != key_id {
            return head_err(
                Some(head_line),
                Problem::WrongKey {
                    head_key_id: head.key_id.clone(),
                    key_id,
                },
            );
        }
        if !head.verify(key) {
            return head_err(Some(head_line), Problem::BadSignature);
        }
        for p in &pending {
            let bad = |problem| VerifyError {
                line: Some(p.line),
                sequence: Some(p.sequence),
                problem,
            };
            if p.sequence > head.tree_size {
                return Err(bad(Problem::BeyondHead {
                    tree_size: head.tree_size,
                }));
            }
            merkle::verify_inclusion(
                &p.leaf,
                p.sequence - 1,
                head.tree_size,
                &p.proof,
                &head.root,
            )
            .map_err(|e| bad(Problem::BadProof(e)))?;
        }
        if let Some(f) = failure {
            return Err(f);
        }
        let at_head = |sequence: Option<u64>, problem| VerifyError {
            line: Some(head_line),
            sequence,
            problem,
        };
        let coverage = match mode {
            Some(Mode::Proofs) => {
                if options.complete {
                    return Err(at_head(None, Problem::NotComplete));
                }
                Coverage::Proofs
            }
            Some(Mode::Complete) | None => {
                if mode.is_none() && head.tree_size > 0 {
                    // No event lines: an empty filtered export, or every line
                    // deleted; the format cannot tell them apart.
                    if options.complete {
                        return Err(at_head(
                            Some(1),
                            Problem::Incomplete {
                                tree_size: head.tree_size,
                                events: 0,
                            },
                        ));
                    }
                    Coverage::HeadOnly
                } else {
                    if events > head.tree_size {
                        return Err(VerifyError {
                            line: None,
                            sequence: Some(head.tree_size + 1),
                            problem: Problem::BeyondHead {
                                tree_size: head.tree_size,
                            },
                        });
                    }
                    if events < head.tree_size {
                        return Err(at_head(
                            Some(events + 1),
                            Problem::Incomplete {
                                tree_size: head.tree_size,
                                events,
                            },
                        ));
                    }
                    let rebuilt = acc.root();
                    if rebuilt != head.root {
                        return Err(at_head(
                            None,
                            Problem::RootMismatch {
                                rebuilt,
                                signed: head.root,
                            },
                        ));
                    }
                    Coverage::Complete
                }
            }
        };
        Ok(Summary {
            events,
            coverage,
            head,
        })
    }
}

/// Verifies a JSONL export offline with the audit public key alone.
pub fn verify_export(reader: impl BufRead, key: &VerifyingKey) -> Result<Summary, VerifyError> {
    verify_export_with(reader, key, VerifyOptions::default())
}

/// [`verify_export`] with options.
pub fn verify_export_with(
    mut reader: impl BufRead,
    key: &VerifyingKey,
    options: VerifyOptions,
) -> Result<Summary, VerifyError> {
    let mut verifier = ExportVerifier::new(key, options);
    let mut line = String::new();
    loop {
        line.clear();
        let at = verifier.lines + 1;
        let fail = |problem| VerifyError {
            line: Some(at),
            sequence: None,
            problem,
        };
        // Bounded, so that a file without newlines cannot exhaust memory.
        match (&mut reader).take(MAX_LINE + 1).read_line(&mut line) {
            Ok(0) => break,
            Ok(n) if n as u64 > MAX_LINE => {
                return Err(fail(Problem::Malformed(format!(
                    "longer than {MAX_LINE} bytes"
                ))));
            }
            Ok(_) => verifier.push_line(&line),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(fail(Problem::Malformed("not UTF-8".into())));
            }
            Err(e) => return Err(fail(Problem::Io(e.to_string()))),
        }
    }
    verifier.finish()
}
