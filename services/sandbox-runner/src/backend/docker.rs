//! The Docker backend (bollard): one container per run, never reused.
//!
//! Each container has every capability dropped, no-new-privileges, a
//! read-only root filesystem, pids/memory/CPU limits, a tmpfs `/tmp`, no
//! network unless the policy names allowed networks, a non-root user, and
//! the `none` log driver (the daemon keeps no copy of the agent's output on
//! disk). Its configuration holds the shim's path and the agent's argv only:
//! no environment at all. The credentials travel over the attach connection
//! to the shim's stdin, which the daemon passes through and never stores.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, NetworkConnectRequest, ResourcesUlimits,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt as _;
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use super::{Backend, BackendError, Destroyed, Event, Instance, LaunchSpec, ProcessEnd};
use crate::model::{BackendKind, NetworkMode};
use crate::shim;

/// How long one engine call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to the engine may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Labels every container of the runner carries (ids, never secrets).
pub const LABEL_SANDBOX: &str = "bulkhead.sandbox";
pub const LABEL_RUN: &str = "bulkhead.run";
pub const LABEL_TENANT: &str = "bulkhead.tenant";
/// This runner's instance (from its data directory): orphans of a crash are
/// found and removed by it at the next start.
pub const LABEL_INSTANCE: &str = "bulkhead.runner.instance";

#[derive(Debug, Clone)]
pub struct DockerSettings {
    /// `unix:///path`, a path, or empty for `DOCKER_HOST` / the local default.
    pub host: String,
    pub container_prefix: String,
    pub user: String,
    pub tmpfs_size: String,
    /// This runner's instance id (label [`LABEL_INSTANCE`]).
    pub instance: String,
}

/// A container an earlier life of the runner left, as its labels say.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub sandbox_id: String,
    pub run_id: String,
    pub tenant: String,
}

/// Runs sandboxes as Docker containers.
#[derive(Debug)]
pub struct DockerBackend {
    settings: DockerSettings,
    client: tokio::sync::Mutex<Option<Docker>>,
}

fn unavailable(e: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(format!("docker engine: {e}"))
}

fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

async fn call<T>(
    f: impl std::future::Future<Output = Result<T, DockerError>>,
) -> Result<T, DockerError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(DockerError::RequestTimeoutError),
    }
}

impl DockerBackend {
    pub fn new(settings: DockerSettings) -> Self {
        Self {
            settings,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The engine client, connected and version-negotiated once it answers.
    async fn client(&self) -> Result<Docker, BackendError> {
        let mut held = self.client.lock().await;
        if let Some(d) = held.as_ref() {
            return Ok(d.clone());
        }
        let host = self.settings.host.trim();
        let docker = if host.is_empty() {
            Docker::connect_with_local_defaults()
        } else {
            let path = host.strip_prefix("unix://").unwrap_or(host);
            Docker::connect_with_unix(path, CALL_TIMEOUT.as_secs(), bollard::API_DEFAULT_VERSION)
        }
        .map_err(unavailable)?;
        // The engine may be older than bollard's API version (20.10 speaks 1.41).
        let docker = tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| unavailable("no answer"))?
            .map_err(unavailable)?;
        *held = Some(docker.clone());
        Ok(docker)
    }

    /// Removes containers left by an earlier life of this runner instance (a
    /// crash): a sandbox is never reused. Returns those removed.
    pub async fn remove_orphans(&self) -> Result<Vec<Orphan>, BackendError> {
        let docker = self.client().await?;
        let filters = HashMap::from([(
            "label",
            vec![format!("{LABEL_INSTANCE}={}", self.settings.instance)],
        )]);
        let list = call(
            docker.list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            )),
        )
        .await
        .map_err(unavailable)?;
        let mut removed = Vec::new();
        for c in list {
            let Some(id) = c.id else { continue };
            let labels = c.labels.unwrap_or_default();
            let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
            match remove(&docker, &id).await {
                Ok(()) => removed.push(Orphan {
                    sandbox_id: label(LABEL_SANDBOX),
                    run_id: label(LABEL_RUN),
                    tenant: label(LABEL_TENANT),
                }),
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "could not remove an orphaned sandbox")
                }
            }
        }
        Ok(removed)
    }

    /// The agent's argv: the request's, or the image's entrypoint and cmd.
    async fn argv(&self, docker: &Docker, spec: &LaunchSpec) -> Result<Vec<String>, BackendError> {
        let image = match call(docker.inspect_image(&spec.image)).await {
            Ok(i) => i,
            Err(e) if status_of(&e) == Some(404) => {
                return Err(BackendError::Missing(format!("image {}", spec.image)));
            }
            Err(e) => return Err(unavailable(e)),
        };
        if !spec.command.is_empty() {
            return Ok(spec.command.clone());
        }
        let config = image.config.unwrap_or_default();
        let mut argv = config.entrypoint.unwrap_or_default();
        argv.extend(config.cmd.unwrap_or_default());
        if argv.is_empty() {
            return Err(BackendError::Refused(format!(
                "image {} has no entrypoint or cmd: name a command",
                spec.image
            )));
        }
        Ok(argv)
    }

    fn body(
        &self,
        spec: &LaunchSpec,
        argv: Vec<String>,
    ) -> Result<ContainerCreateBody, BackendError> {
        let shim = spec
            .shim
            .to_str()
            .filter(|s| !s.contains(':'))
            .ok_or_else(|| {
                BackendError::Refused("the shim's path cannot be bind-mounted".into())
            })?;
        let labels = HashMap::from([
            (LABEL_SANDBOX.to_owned(), spec.sandbox_id.clone()),
            (LABEL_RUN.to_owned(), spec.run_id.clone()),
            (LABEL_TENANT.to_owned(), spec.tenant.clone()),
            (LABEL_INSTANCE.to_owned(), self.settings.instance.clone()),
        ]);
        let network_mode = match spec.network.mode {
            NetworkMode::None => "none".to_owned(),
            NetworkMode::AllowList => spec
                .network
                .allowed
                .first()
                .cloned()
                .unwrap_or_else(|| "none".to_owned()),
        };
        let memory = i64::try_from(spec.limits.memory_bytes).unwrap_or(i64::MAX);
        let host = HostConfig {
            binds: Some(vec![format!("{shim}:{}:ro", shim::CONTAINER_PATH)]),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: None,
            privileged: Some(false),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            readonly_rootfs: Some(true),
            pids_limit: Some(i64::from(spec.limits.pids)),
            memory: Some(memory),
            // No swap: the memory limit is the limit.
            memory_swap: Some(memory),
            nano_cpus: Some(i64::from(spec.limits.cpu_millis) * 1_000_000),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_owned(),
                format!(
                    "rw,noexec,nosuid,nodev,size={},mode=1777",
                    self.settings.tmpfs_size
                ),
            )])),
            network_mode: Some(network_mode),
            // No core dumps: a core holds the agent's environment (its
            // credentials) and, through a core_pattern pipe, lands on the
            // host's disk. The shim sets the same limit; this holds for it too.
            ulimits: Some(vec![ResourcesUlimits {
                name: Some("core".into()),
                soft: Some(0),
                hard: Some(0),
            }]),
            ipc_mode: Some("private".into()),
            init: Some(false),
            auto_remove: Some(false),
            // The daemon keeps no copy of the output: it could hold a secret
            // the agent printed, and redaction happens in the runner.
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            ..Default::default()
        };
        Ok(ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: Some(vec![shim::CONTAINER_PATH.to_owned()]),
            cmd: Some(argv),
            user: Some(self.settings.user.clone()),
            labels: Some(labels),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(true),
            stdin_once: Some(true),
            tty: Some(false),
            host_config: Some(host),
            ..Default::default()
        })
    }
}

async fn remove(docker: &Docker, id: &str) -> Result<(), DockerError> {
    let opts = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match call(docker.remove_container(id, Some(opts))).await {
        Ok(()) => Ok(()),
        Err(e) if status_of(&e) == Some(404) => Ok(()),
        // 409: removal already in progress; the check below decides.
        Err(e) if status_of(&e) == Some(409) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether the container no longer exists.
async fn gone(docker: &Docker, id: &str) -> Result<bool, DockerError> {
    for _ in 0..50 {
        match call(docker.inspect_container(id, None)).await {
            Err(e) if status_of(&e) == Some(404) => return Ok(true),
            Err(e) => return Err(e),
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(false)
}

/// Waits for the container to stop and reads how it ended.
async fn wait_end(docker: &Docker, id: &str) -> ProcessEnd {
    let opts = WaitContainerOptionsBuilder::default()
        .condition("not-running")
        .build();
    let mut wait = Box::pin(docker.wait_container(id, Some(opts)));
    let waited = match wait.next().await {
        Some(Ok(r)) => Some(r.status_code),
        Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Some(code),
        Some(Err(_)) | None => None,
    };
    let mut end = ProcessEnd::default();
    match call(docker.inspect_container(id, None)).await {
        Ok(info) => {
            let state = info.state.unwrap_or_default();
            end.oom_killed = state.oom_killed.unwrap_or(false);
            let code = state.exit_code.or(waited).unwrap_or(-1);
            end.code = i32::try_from(code).unwrap_or(-1);
            if let Some(err) = state.error.filter(|e| !e.is_empty()) {
                end.message = err;
            }
        }
        Err(_) => end.code = waited.and_then(|c| i32::try_from(c).ok()).unwrap_or(-1),
    }
    // PID 1 killed by signal n exits 128 + n.
    if (129..=192).contains(&end.code) {
        end.signal = end.code - 128;
    }
    end
}

#[async_trait::async_trait]
impl Backend for DockerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Docker
    }

    async fn available(&self) -> bool {
        let Ok(docker) = self.client().await else {
            return false;
        };
        matches!(
            tokio::time::timeout(CONNECT_TIMEOUT, docker.ping()).await,
            Ok(Ok(_))
        )
    }

    async fn launch(
        &self,
        spec: &LaunchSpec,
        events: mpsc::Sender<Event>,
    ) -> Result<Box<dyn Instance>, BackendError> {
        let docker = self.client().await?;
        let argv = self.argv(&docker, spec).await?;
        let body = self.body(spec, argv)?;
        let name = format!("{}{}", self.settings.container_prefix, spec.sandbox_id);
        let created = call(docker.create_container(
            Some(CreateContainerOptionsBuilder::default().name(&name).build()),
            body,
        ))
        .await
        .map_err(|e| match (&e, status_of(&e)) {
            (DockerError::DockerResponseServerError { message, .. }, Some(404))
                if message.contains("network") =>
            {
                BackendError::Refused("a network of the policy does not exist on this host".into())
            }
            (_, Some(404)) => BackendError::Missing(format!("image {}", spec.image)),
            // The configuration holds no credential, so its refusal may be shown.
            (DockerError::DockerResponseServerError { message, .. }, Some(400)) => {
                BackendError::Refused(format!("the engine refused the sandbox: {message}"))
            }
            _ => unavailable(e),
        })?;
        let id = created.id;
        match self.attach_and_start(&docker, &id, spec, events).await {
            Ok(instance) => Ok(instance),
            Err(e) => {
                if let Err(re) = remove(&docker, &id).await {
                    tracing::error!(container = %id, error = %re, "could not remove a sandbox that failed to start");
                }
                Err(e)
            }
        }
    }
}

impl DockerBackend {
    async fn attach_and_start(
        &self,
        docker: &Docker,
        id: &str,
        spec: &LaunchSpec,
        events: mpsc::Sender<Event>,
    ) -> Result<Box<dyn Instance>, BackendError> {
        if spec.network.mode == NetworkMode::AllowList {
            for net in spec.network.allowed.iter().skip(1) {
                let req = NetworkConnectRequest {
                    container: id.to_owned(),
                    endpoint_config: None,
                };
                call(docker.connect_network(net, req))
                    .await
                    .map_err(|e| match status_of(&e) {
                        Some(404) => BackendError::Refused(format!("network {net} does not exist")),
                        _ => unavailable(e),
                    })?;
            }
        }
        let attach = call(
            docker.attach_container(
                id,
                Some(
                    AttachContainerOptionsBuilder::default()
                        .stdin(true)
                        .stdout(true)
                        .stderr(true)
                        .stream(true)
                        .logs(false)
                        .build(),
                ),
            ),
        )
        .await
        .map_err(unavailable)?;
        call(docker.start_container(id, None))
            .await
            .map_err(|e| match status_of(&e) {
                Some(404) => BackendError::Refused(format!("{e}")),
                _ => unavailable(e),
            })?;
        let mut output = attach.output;
        let pump_docker = docker.clone();
        let pump_id = id.to_owned();
        tokio::spawn(async move {
            while let Some(item) = output.next().await {
                let event = match item {
                    Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                        Event::Stdout(message)
                    }
                    Ok(LogOutput::StdErr { message }) => Event::Stderr(message),
                    Ok(LogOutput::StdIn { .. }) => continue,
                    Err(e) => {
                        tracing::debug!(container = %pump_id, error = %e, "attach stream ended");
                        break;
                    }
                };
                if events.send(event).await.is_err() {
                    break;
                }
            }
            let end = wait_end(&pump_docker, &pump_id).await;
            let _ = events.send(Event::Ended(end)).await;
        });
        Ok(Box::new(DockerInstance {
            docker: docker.clone(),
            id: id.to_owned(),
            input: tokio::sync::Mutex::new(Some(attach.input)),
        }))
    }
}

struct DockerInstance {
    docker: Docker,
    id: String,
    input: tokio::sync::Mutex<Option<Pin<Box<dyn AsyncWrite + Send>>>>,
}

impl std::fmt::Debug for DockerInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerInstance")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Instance for DockerInstance {
    fn container_id(&self) -> String {
        self.id.clone()
    }

    async fn deliver(&self, input: Zeroizing<Vec<u8>>) -> Result<(), BackendError> {
        let Some(mut w) = self.input.lock().await.take() else {
            return Err(BackendError::Unavailable("stdin already closed".into()));
        };
        let written = async {
            w.write_all(&input).await?;
            w.flush().await?;
            // Half-closes the attach connection: with StdinOnce the daemon
            // closes the container's stdin, and the agent sees the end.
            w.shutdown().await
        };
        tokio::time::timeout(CALL_TIMEOUT, written)
            .await
            .map_err(|_| unavailable("writing to the sandbox timed out"))?
            .map_err(unavailable)?;
        drop(input);
        Ok(())
    }

    async fn kill(&self) -> Result<(), BackendError> {
        let opts = KillContainerOptionsBuilder::default()
            .signal("SIGKILL")
            .build();
        match call(self.docker.kill_container(&self.id, Some(opts))).await {
            Ok(()) => Ok(()),
            // Not running, or already gone.
            Err(e) if matches!(status_of(&e), Some(404 | 409)) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn destroy(&self) -> Result<Destroyed, BackendError> {
        // Closing our end of stdin first, so that nothing waits on it.
        drop(self.input.lock().await.take());
        remove(&self.docker, &self.id).await.map_err(unavailable)?;
        let gone = gone(&self.docker, &self.id).await.map_err(unavailable)?;
        // The tmpfs lives and dies with the container; no host files.
        Ok(Destroyed {
            sandbox: gone,
            files: gone,
        })
    }
}
