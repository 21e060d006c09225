//! Sandbox and scoped credentials (companion example 39): two tenants'
//! sandboxes each call a third-party API stub with their own key, delivered
//! by the sandbox-runner at sandbox start; then the credential-leak smoke
//! test.

use std::process::Command;

use super::Backend;
use super::stage::Stage;
use super::story::Story;

/// The sandbox backend the demo uses, and why.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub backend: Backend,
    pub why: String,
}

impl Chosen {
    /// Removes what the sandbox scenario made outside the mesh directory.
    pub fn cleanup(&self) {}
}

fn docker_answers() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Docker when the engine answers (or when asked for), else the process
/// backend.
pub fn choose_backend(asked: Backend) -> anyhow::Result<Chosen> {
    Ok(match asked {
        Backend::Docker => {
            anyhow::ensure!(
                docker_answers(),
                "--backend docker: the Docker engine does not answer"
            );
            Chosen {
                backend: Backend::Docker,
                why: "asked for with --backend docker".into(),
            }
        }
        Backend::Process => Chosen {
            backend: Backend::Process,
            why: "asked for with --backend process".into(),
        },
        Backend::Auto if docker_answers() => Chosen {
            backend: Backend::Docker,
            why: "the Docker engine answers".into(),
        },
        Backend::Auto => Chosen {
            backend: Backend::Process,
            why: "the Docker engine does not answer".into(),
        },
    })
}

/// The sandbox-runner's settings for the demo.
pub fn runner_config(_chosen: &Chosen) -> toml::Table {
    toml::Table::new()
}

/// Whether this build's worker can hand runs to a sandbox-runner.
fn worker_has_sandbox_mode() -> bool {
    bulkhead_cluster::find_binary("worker", None)
        .ok()
        .and_then(|exe| Command::new(exe).arg("--help").output().ok())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains("--sandbox-runner"))
}

pub async fn sandbox_credentials(
    _stage: &mut Stage,
    story: &mut Story,
    chosen: &Chosen,
) -> anyhow::Result<()> {
    story.chapter(
        "Sandbox and scoped credentials (companion example 39)",
        "Each tenant's agent runs in a sandbox that alone receives that tenant's key.",
    );
    story.say(format!("backend: {:?} ({})", chosen.backend, chosen.why));
    if !worker_has_sandbox_mode() {
        story.say(
            "SKIPPED: this build's bulkhead-worker has no sandbox mode (--sandbox-runner) yet, \
             so runs cannot reach a sandbox; the scenario runs once it has",
        );
        return Ok(());
    }
    story.say("SKIPPED: not yet wired to the worker's sandbox mode");
    Ok(())
}
