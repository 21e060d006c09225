//! `bulkhead demo`: the production-multitenancy walkthrough against a real
//! local mesh. It makes a PKI, starts the five services and real workers on
//! embedded defaults, runs the scenarios of the walkthrough's companion
//! examples, prints the story with a ✓ or ✗ per guarantee, prints the audit
//! trail with its verified tree head, and fails if any guarantee did not
//! hold. The companion examples (`cargo run --example ...`) run one scenario
//! each through [`example_main`].

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, ValueEnum};

pub mod docker;
pub mod fleet;
pub mod governance;
pub mod leak;
pub mod sandbox;
pub mod stage;
pub mod story;
pub mod trail;

use stage::Stage;
use story::Story;

/// Which scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Every scenario below, then the audit trail.
    All,
    /// Worker registration and heartbeats (companion example 20).
    FleetWorkers,
    /// Capability-based, project-scoped dispatch (companion example 26).
    ScopedDispatch,
    /// Three tenants, five workers, six tasks, the refused cross-tenant
    /// claim, the leak scan (companion example 33).
    FleetSealed,
    /// Credentials injected into two tenants' sandboxes, a third-party API
    /// called with each tenant's own key, the leak smoke test (companion
    /// example 39).
    SandboxCredentials,
    /// The agent approval flow and its audit trail (companion example 16).
    Governance,
}

/// Where sandboxes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Docker when the engine answers, else the process backend.
    Auto,
    Docker,
    Process,
}

/// `bulkhead demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the mesh's PKI, data, logs and endpoints.json here afterwards (so
    /// that `bulkhead audit export|verify --dir DIR` can be run on them).
    /// Without it the demo runs in a temp dir and removes it.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The scenario to run.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    pub scenario: Scenario,
    /// Where the sandbox scenario's sandboxes run.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
}

/// The flags of a companion example: the scenario is the example's own.
#[derive(Debug, Parser)]
struct ExampleArgs {
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    backend: Backend,
}

/// The `main` of a companion example: runs one scenario and its audit trail.
pub fn example_main(scenario: Scenario) -> anyhow::Result<()> {
    bulkhead_mesh::tls::install_crypto_provider();
    let args = ExampleArgs::parse();
    let rt = tokio::runtime::Runtime::new().context("failed to start the runtime")?;
    let held = rt.block_on(run(DemoArgs {
        dir: args.dir,
        scenario,
        backend: args.backend,
    }))?;
    drop(rt);
    if !held {
        std::process::exit(1);
    }
    Ok(())
}

/// Runs the demo: `Ok(true)` when every guarantee held, `Ok(false)` when
/// one failed (the caller exits non-zero), an error when it could not run.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    println!("Bulkhead demo: a multi-tenant credential boundary for fleets of AI agents");
    let mut story = Story::new();
    let backend = sandbox::choose_backend(args.backend)?;
    let options = stage::Options {
        dir: args.dir.clone(),
        runner: sandbox::runner_config(&backend),
    };
    story.step("Starting the mesh: a fresh PKI, the five services on loopback, embedded SQLite");
    let mut stage = Stage::start(options).await?;
    for (name, addr) in &stage.endpoints().services {
        story.say(format!("{name:<15} {addr}"));
    }
    story.say(format!(
        "{} {}",
        if stage.kept() {
            "directory:"
        } else {
            "directory (removed at the end):"
        },
        stage.dir.display()
    ));

    let outcome = tokio::select! {
        r = scenarios(&mut stage, &mut story, args.scenario, &backend) => r,
        () = bulkhead_mesh::shutdown::signal() => Err(anyhow::anyhow!("interrupted")),
    };
    let logs = if outcome.is_err() {
        stage.logs()
    } else {
        String::new()
    };
    let instance = stage.runner_instance();
    let kept = stage.kept().then(|| stage.dir.clone());
    stage.shutdown().await;
    // After the mesh: what an unfinished sandbox scenario left in Docker.
    for removed in backend.cleanup(instance.as_deref()) {
        story.say(format!("cleanup: removed {removed}"));
    }
    if let Err(e) = outcome {
        return Err(e.context(format!("the demo could not finish\n{logs}")));
    }

    println!();
    let failed = story.failed();
    if failed.is_empty() {
        println!("✓ all {} guarantee checks held", story.passed());
    } else {
        println!(
            "✗ {} of {} guarantee checks FAILED:",
            failed.len(),
            failed.len() + story.passed()
        );
        for f in failed {
            println!("  ✗ {f}");
        }
    }
    if let Some(dir) = kept {
        let d = dir.display();
        println!("the mesh's PKI, data, logs and endpoints.json are in {d}. To look again:");
        println!(
            "  bulkhead audit verify --file {d}/{} --dir {d}   # offline, with the public key alone",
            trail::EXPORT_FILE
        );
        println!(
            "  bulkhead dev up --dir {d}                          # the same mesh on its data; then"
        );
        println!(
            "  bulkhead audit export --dir {d} --out audit.jsonl && bulkhead audit verify --dir {d}"
        );
    }
    Ok(failed.is_empty())
}

async fn scenarios(
    stage: &mut Stage,
    story: &mut Story,
    scenario: Scenario,
    backend: &sandbox::Chosen,
) -> anyhow::Result<()> {
    use Scenario as S;
    let all = scenario == S::All;
    if all || scenario == S::FleetWorkers {
        fleet::fleet_workers(stage, story).await?;
    }
    if all || scenario == S::ScopedDispatch {
        fleet::scoped_dispatch(stage, story).await?;
    }
    if all || scenario == S::Governance {
        governance::governance(stage, story).await?;
    }
    if all || scenario == S::FleetSealed {
        fleet::fleet_sealed(stage, story).await?;
    }
    if all || scenario == S::SandboxCredentials {
        sandbox::sandbox_credentials(stage, story, backend).await?;
    }
    trail::print_and_verify(stage, story).await
}
