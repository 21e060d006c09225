//! Scrub, as DESIGN.md guarantee 1 states it: on release the sandbox is
//! destroyed and every in-memory copy of its credentials zeroized. The
//! runner's whole memory (`/proc/<pid>/maps` and `/proc/<pid>/mem` of the
//! real binary) is read after ReleaseSandbox and must hold no form of the
//! value; read while the sandbox runs, it holds the copy the runner keeps for
//! redaction (the scanner's positive control). And an agent receives only the
//! secret keys it requested: none when it requested none.

mod support;

use std::os::unix::fs::FileExt as _;

use anyhow::Context as _;
use base64::Engine as _;
use bulkhead_proto::sandbox::v1 as pb;
use support::*;

const ACME_WORKER: &str = "tenant/acme/worker/w1";

/// The forms of a value a copy could take: as is, and its base64 at each of
/// the three byte alignments, in both alphabets (only the characters that
/// depend on the value alone).
fn forms(value: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![("plain".to_owned(), value.as_bytes().to_vec())];
    for shift in 0..3usize {
        let mut bytes = vec![0u8; shift];
        bytes.extend_from_slice(value.as_bytes());
        let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let skip = [0, 2, 3][shift];
        let core = &encoded[skip..encoded.len() - 3];
        let url = core.replace('+', "-").replace('/', "_");
        out.push((format!("base64, offset {shift}"), core.as_bytes().to_vec()));
        if url != core {
            out.push((format!("base64url, offset {shift}"), url.into_bytes()));
        }
    }
    out
}

/// What a scan of a process's memory read, and where it found which form
/// (`form @ address in mapping`).
#[derive(Debug, Default)]
struct Scan {
    bytes: u64,
    hits: Vec<String>,
    /// Chunks that could not be read (`address in mapping`).
    unreadable: Vec<String>,
}

/// Every readable mapping of process `pid`, in overlapping chunks.
fn scan_memory(pid: u32, value: &str) -> anyhow::Result<Scan> {
    const CHUNK: u64 = 8 << 20;
    let forms = forms(value);
    let finders: Vec<(&str, memchr::memmem::Finder<'_>)> = forms
        .iter()
        .map(|(label, f)| (label.as_str(), memchr::memmem::Finder::new(f)))
        .collect();
    let overlap = forms.iter().map(|(_, f)| f.len()).max().unwrap_or(0) as u64;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).context("maps")?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).context("mem")?;
    let mut scan = Scan::default();
    let mut buf = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let name = fields.nth(3).unwrap_or("[anonymous]");
        if !perms.starts_with('r') || name == "[vvar]" || name == "[vsyscall]" {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (start, end) = (
            u64::from_str_radix(start, 16)?,
            u64::from_str_radix(end, 16)?,
        );
        let mut at = start;
        while at < end {
            let len = (CHUNK + overlap).min(end - at);
            buf.resize(usize::try_from(len)?, 0);
            if mem.read_exact_at(&mut buf, at).is_err() {
                scan.unreadable.push(format!("{at:#x} in {name} ({perms})"));
            } else {
                scan.bytes += len;
                for (label, f) in &finders {
                    for i in f.find_iter(&buf) {
                        // A hit inside the overlap is the next chunk's.
                        if (i as u64) < CHUNK || at + len == end {
                            scan.hits
                                .push(format!("{label} @ {:#x} in {name}", at + i as u64));
                        }
                    }
                }
            }
            at += CHUNK;
        }
    }
    Ok(scan)
}

fn runner_pid(mesh: &Mesh) -> anyhow::Result<u32> {
    mesh.mesh
        .mesh
        .process("sandbox-runner")
        .and_then(|p| p.pid())
        .context("the sandbox-runner's pid")
}

/// An agent that shows the value and its base64 (so that the raw output
/// passes through the runner's buffers before redaction), then waits.
const SHOWS_AND_WAITS: &str = "echo \"k=$KEY\"; echo \"$KEY\" | base64; echo shown; sleep 300";

/// Starts `run` on `backend`, waits for the agent's output, then checks the
/// runner's memory: the value is there while the sandbox runs, and in no
/// form after release.
async fn nothing_left_after_release(
    mesh: &Mesh,
    run: &Run,
    value: &str,
    backend: pb::SandboxBackend,
) -> anyhow::Result<()> {
    let mut worker = mesh.runner_as(ACME_WORKER)?;
    let sb = worker
        .start_sandbox(start_request("acme", run, backend))
        .await?
        .into_inner()
        .sandbox
        .context("a sandbox")?;
    assert_eq!(sb.injected_keys, vec!["KEY".to_owned()]);
    let mut stream = worker
        .stream_output(pb::StreamOutputRequest {
            tenant: "acme".into(),
            sandbox_id: sb.sandbox_id.clone(),
            from_offset: 0,
        })
        .await?
        .into_inner();
    let mut out = String::new();
    let shown = async {
        while let Some(m) = stream.message().await? {
            if let Some(pb::stream_output_response::Event::Chunk(c)) = m.event {
                out.push_str(&String::from_utf8_lossy(&c.data));
                if out.contains("shown\n") {
                    return Ok(());
                }
            }
        }
        anyhow::bail!("the output ended early: {out}")
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), shown)
        .await
        .context("the agent did not show its key")??;
    drop(stream);
    assert!(out.contains("k=<redacted:KEY>"), "{out}");
    assert!(!leaks(&out, value), "{out}");

    let pid = runner_pid(mesh)?;
    // Positive control: the runner holds the value while the sandbox runs
    // (its zeroizing copy, for redaction).
    let during = scan_memory(pid, value)?;
    eprintln!(
        "while running: {} bytes of the runner's memory read, {} forms found: {:?}",
        during.bytes,
        during.hits.len(),
        during.hits
    );
    assert!(
        during.hits.iter().any(|h| h.starts_with("plain")),
        "positive control: the scan finds the runner's own copy while the sandbox runs"
    );

    let report = worker
        .release_sandbox(pb::ReleaseSandboxRequest {
            tenant: "acme".into(),
            sandbox_id: sb.sandbox_id.clone(),
        })
        .await?
        .into_inner()
        .report
        .context("a report")?;
    assert!(report.sandbox_destroyed && report.credentials_zeroized);
    assert_eq!(report.scrubbed_keys, vec!["KEY".to_owned()]);

    let after = scan_memory(pid, value)?;
    eprintln!(
        "after release: {} bytes of the runner's memory read, {} forms found: {:?}; unreadable: {:?}",
        after.bytes,
        after.hits.len(),
        after.hits,
        after.unreadable
    );
    assert!(after.bytes > 0, "the scan read nothing");
    assert!(
        after.unreadable.iter().all(|u| u.contains("[vvar")),
        "only the kernel's clock pages may be unreadable: {:?}",
        after.unreadable
    );
    assert!(
        after.hits.is_empty(),
        "the runner still holds the value after release: {:?}",
        after.hits
    );
    Ok(())
}

#[tokio::test]
async fn after_release_the_runner_holds_no_copy_process_backend() -> anyhow::Result<()> {
    let mesh = start_mesh(&[]).await?;
    let value = canary();
    mesh.profile("acme", &[("KEY", &value)]).await?;
    let mut w1 = mesh.worker(ACME_WORKER).await?;
    let run = w1
        .run(
            &mesh,
            "acme",
            "",
            PROCESS_IMAGE,
            &["/bin/sh", "-c", SHOWS_AND_WAITS],
        )
        .await?;
    nothing_left_after_release(&mesh, &run, &value, pb::SandboxBackend::Process).await
}

#[tokio::test]
async fn after_release_the_runner_holds_no_copy_docker_backend() -> anyhow::Result<()> {
    if !docker_or_skip()? {
        return Ok(());
    }
    ensure_image()?;
    let mesh = start_mesh(&[]).await?;
    let value = canary();
    mesh.profile("acme", &[("KEY", &value)]).await?;
    let mut w1 = mesh.worker(ACME_WORKER).await?;
    let run = w1
        .run(&mesh, "acme", "", IMAGE, &["sh", "-c", SHOWS_AND_WAITS])
        .await?;
    nothing_left_after_release(&mesh, &run, &value, pb::SandboxBackend::Docker).await?;
    assert!(mesh.containers()?.is_empty(), "the container is gone");
    Ok(())
}

/// Agent.requested_secret_keys: "Only these are delivered into its
/// sandboxes". An agent that requested none gets no secret of its cascade,
/// and still the cascade's settings.
#[tokio::test]
async fn an_agent_that_requested_no_key_gets_no_secret() -> anyhow::Result<()> {
    let mesh = start_mesh(&[]).await?;
    let value = canary();
    mesh.profile("acme", &[("KEY", &value)]).await?;
    let mut w1 = mesh.worker(ACME_WORKER).await?;
    let run = w1
        .run_requesting(
            &mesh,
            "acme",
            "",
            PROCESS_IMAGE,
            &["/usr/bin/env"],
            Vec::new(),
        )
        .await?;
    assert!(run.agent().requested_secret_keys.is_empty());
    let mut worker = w1.runner(&mesh)?;
    let sb = worker
        .start_sandbox(start_request("acme", &run, pb::SandboxBackend::Process))
        .await?
        .into_inner()
        .sandbox
        .context("a sandbox")?;
    assert!(sb.injected_keys.is_empty(), "{:?}", sb.injected_keys);
    let (out, err, exit) = collect(&mut worker, "acme", &sb.sandbox_id).await?;
    assert_eq!(exit.exit_code, 0, "{out}\n{err}");
    assert!(!leaks(&out, &value), "{out}");
    assert!(
        !out.lines().any(|l| l.starts_with("KEY=")),
        "no secret in the environment: {out}"
    );
    assert!(
        out.lines().any(|l| l == "DEBUG=1"),
        "the cascade's settings still apply: {out}"
    );
    let report = worker
        .release_sandbox(pb::ReleaseSandboxRequest {
            tenant: "acme".into(),
            sandbox_id: sb.sandbox_id.clone(),
        })
        .await?
        .into_inner()
        .report
        .context("a report")?;
    assert!(report.scrubbed_keys.is_empty(), "{report:?}");
    assert_eq!(report.zeroized_values, 0);
    let injected = mesh.audited("sandbox.credential.injected", &run.id).await?;
    assert_eq!(
        injected.attributes.get("keys").map(String::as_str),
        Some(""),
        "{injected:?}"
    );
    assert_eq!(
        injected.attributes.get("env_keys").map(String::as_str),
        Some("DEBUG"),
        "{injected:?}"
    );
    Ok(())
}
