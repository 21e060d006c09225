//! Starts a local Bulkhead mesh from the real binaries: makes the PKI if it is
//! missing, writes one config per service, starts the five services on free
//! loopback ports with their logs under the mesh directory, waits until each
//! answers gRPC health over mTLS, and writes `endpoints.json`.
//!
//! `bulkhead dev up`, `bulkhead demo` and the test kit all start meshes here.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bulkhead_mesh::config::{MeshConfig, Peers, TlsFiles};
use bulkhead_mesh::spiffe::TrustDomain;
use bulkhead_mesh::telemetry::{LogFormat, TelemetryConfig};
use bulkhead_mesh::tls::{ExpectServer, Identity, TrustBundle};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

/// The five services: name as in configs, file names and endpoints.json.
pub const SERVICES: &[&str] = &[
    "audit",
    "identity",
    "sealed-vault",
    "dispatcher",
    "sandbox-runner",
];

/// Programs a local mesh's sandbox-runner lets its process backend run (the
/// runner allows none by default): the shells and interpreters agents of a
/// dev mesh or a demo start with. Docker images are not restricted: a local
/// engine runs only images already on the host (none is ever pulled).
pub const DEV_SANDBOX_PROGRAMS: &[&str] = &[
    "/bin/sh",
    "/usr/bin/sh",
    "/bin/bash",
    "/usr/bin/bash",
    "/usr/bin/env",
    "/usr/bin/python3",
];

/// The name prefix of a local mesh's sandbox containers (each also carries
/// its runner instance's label, which keeps meshes on one engine apart).
pub const DEV_CONTAINER_PREFIX: &str = "bulkhead-local-sbx-";

/// How long a service gets to become healthy.
const HEALTH_DEADLINE: Duration = Duration::from_secs(30);
/// How long a service gets to exit after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(12);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Setup(String),
    #[error("i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("binary {0} not found (build the workspace: cargo build --workspace --bins)")]
    MissingBinary(String),
    #[error("{service} did not become healthy: {reason}\n--- last lines of {log} ---\n{tail}")]
    Unhealthy {
        service: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where a mesh's services are, as written to `<dir>/endpoints.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    /// Service name → `127.0.0.1:PORT`.
    pub services: BTreeMap<String, String>,
    pub ca: PathBuf,
    pub operator_cert: PathBuf,
    pub operator_key: PathBuf,
    /// The audit service's tree-head public key (hex), for offline verification.
    #[serde(default)]
    pub audit_public_key: Option<PathBuf>,
    /// The web Audit view, `https://127.0.0.1:PORT/`, when served.
    #[serde(default)]
    pub audit_view: Option<String>,
    /// The file holding the Audit view's operator token (mode 0600).
    #[serde(default)]
    pub audit_view_token: Option<PathBuf>,
}

impl Endpoints {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("endpoints.json")
    }

    pub fn load(dir: &Path) -> Result<Self, ClusterError> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        serde_json::from_str(&text)
            .map_err(|e| ClusterError::Setup(format!("{}: {e}", path.display())))
    }

    pub fn address(&self, service: &str) -> Result<&str, ClusterError> {
        self.services
            .get(service)
            .map(String::as_str)
            .ok_or_else(|| ClusterError::Setup(format!("no endpoint for {service}")))
    }

    /// The operator's identity and the trust bundle, to dial the mesh.
    pub fn operator(&self) -> Result<(Identity, TrustBundle), ClusterError> {
        let bundle =
            TrustBundle::from_pem_file(&self.ca).map_err(|e| ClusterError::Setup(e.to_string()))?;
        let id = Identity::from_pem_files(&self.operator_cert, &self.operator_key)
            .map_err(|e| ClusterError::Setup(e.to_string()))?;
        Ok((id, bundle))
    }
}

/// How to start a mesh.
#[derive(Debug, Clone)]
pub struct MeshSpec {
    pub dir: PathBuf,
    pub trust_domain: String,
    pub operator: String,
    /// Where the service binaries are; by default beside the current executable.
    pub bin_dir: Option<PathBuf>,
    pub otlp_endpoint: Option<String>,
    pub log_format: LogFormat,
    /// Extra top-level settings per service, merged into its config file.
    pub extra: BTreeMap<String, toml::Table>,
    /// Serve the web Audit view on a free port, with an operator token.
    pub audit_view: bool,
}

impl MeshSpec {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            trust_domain: "bulkhead.local".into(),
            operator: "operator".into(),
            bin_dir: None,
            otlp_endpoint: None,
            log_format: LogFormat::Json,
            extra: BTreeMap::new(),
            audit_view: false,
        }
    }
}

/// Finds `bulkhead-<name>`: `$BULKHEAD_BIN_DIR`, then beside the current
/// executable, then its parent (test binaries live in `target/<profile>/deps`).
pub fn find_binary(name: &str, bin_dir: Option<&Path>) -> Result<PathBuf, ClusterError> {
    find_executable(&format!("bulkhead-{name}"), bin_dir)
}

/// Finds an executable of the workspace by file name, where [`find_binary`] looks.
pub fn find_executable(file: &str, bin_dir: Option<&Path>) -> Result<PathBuf, ClusterError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = bin_dir {
        dirs.push(d.to_owned());
    }
    if let Ok(d) = std::env::var("BULKHEAD_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(parent) = exe.parent()
    {
        dirs.push(parent.to_owned());
        if let Some(gp) = parent.parent() {
            dirs.push(gp.to_owned());
        }
    }
    dirs.into_iter()
        .map(|d| d.join(file))
        .find(|p| p.is_file())
        .ok_or_else(|| ClusterError::MissingBinary(file.to_owned()))
}

/// A free loopback port (bound then released; the window for a race is tiny
/// and a lost race shows as a failed start with the log's reason).
pub fn free_port() -> Result<u16, ClusterError> {
    Ok(free_ports(1)?[0])
}

/// `n` distinct free loopback ports. Each is held until all are chosen: a
/// port released at once may be handed out again by the next bind, and two
/// services of one mesh given the same port made one of them fail to start
/// while the other answered in its name.
pub fn free_ports(n: usize) -> Result<Vec<u16>, ClusterError> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(io(Path::new("127.0.0.1:0"))))
        .collect::<Result<Vec<_>, _>>()?;
    held.iter()
        .map(|l| Ok(l.local_addr().map_err(io(Path::new("127.0.0.1:0")))?.port()))
        .collect()
}

/// Makes the PKI in `<dir>/pki` if it is missing.
pub fn ensure_pki(dir: &Path, trust_domain: &str, operator: &str) -> Result<PathBuf, ClusterError> {
    let pki = dir.join("pki");
    if !pki.join("ca.pem").exists() {
        let td = TrustDomain::parse(trust_domain)
            .map_err(|e| ClusterError::Setup(format!("trust domain: {e}")))?;
        bulkhead_mesh::pki::init_dir(&pki, &td, operator)
            .map_err(|e| ClusterError::Setup(e.to_string()))?;
    }
    Ok(pki)
}

/// One running service process.
#[derive(Debug)]
pub struct ServiceProcess {
    pub name: String,
    pub addr: String,
    pub log: PathBuf,
    pub config: PathBuf,
    binary: PathBuf,
    /// Secrets handed over in the environment, never in files or argv.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl ServiceProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The last `n` lines of the service's log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }

    async fn spawn(&mut self) -> Result<(), ClusterError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io(&self.log))?;
        let err = log.try_clone().map_err(io(&self.log))?;
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(&self.binary))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM, then SIGKILL after the stop deadline.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(STOP_DEADLINE, child.wait())
            .await
            .is_err()
        {
            tracing::warn!(service = %self.name, "did not stop after sigterm; killing");
            let _ = child.kill().await;
        }
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running local mesh. Dropping it kills the processes; [`LocalMesh::stop`]
/// stops them gracefully.
#[derive(Debug)]
pub struct LocalMesh {
    pub dir: PathBuf,
    pub endpoints: Endpoints,
    processes: Vec<ServiceProcess>,
    operator: Identity,
    bundle: TrustBundle,
}

impl LocalMesh {
    pub async fn start(spec: &MeshSpec) -> Result<Self, ClusterError> {
        let dir = &spec.dir;
        for sub in ["config", "logs", "data"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        let pki = ensure_pki(dir, &spec.trust_domain, &spec.operator)?;

        // One port per service and one for the Audit view, all distinct.
        let mut ports = free_ports(SERVICES.len() + 1)?;
        let view_port = ports.pop().unwrap_or_default();
        let mut addrs = BTreeMap::new();
        for (s, port) in SERVICES.iter().zip(ports) {
            addrs.insert((*s).to_owned(), format!("127.0.0.1:{port}"));
        }
        let peers = Peers {
            identity: addrs.get("identity").cloned(),
            audit: addrs.get("audit").cloned(),
            sealed_vault: addrs.get("sealed-vault").cloned(),
            dispatcher: addrs.get("dispatcher").cloned(),
        };

        // The Audit view: a free port and a fresh operator token kept in a
        // 0600 file (never in the config or on a command line).
        let (view_url, view_token_file, view) = if spec.audit_view {
            let port = view_port;
            let token: String = (0..32)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect();
            let file = dir.join("audit-view-token");
            bulkhead_mesh::pki::write_private(&file, &token)
                .map_err(|e| ClusterError::Setup(e.to_string()))?;
            (
                Some(format!("https://127.0.0.1:{port}/")),
                Some(file),
                Some((port, token)),
            )
        } else {
            (None, None, None)
        };

        let mut processes = Vec::new();
        for s in SERVICES {
            let addr = addrs[*s].clone();
            let listen: SocketAddr = addr
                .parse()
                .map_err(|e| ClusterError::Setup(format!("address {addr}: {e}")))?;
            let data_dir = dir.join("data").join(s);
            std::fs::create_dir_all(&data_dir).map_err(io(&data_dir))?;
            let cfg = MeshConfig {
                listen,
                tls: TlsFiles::in_dir(&pki, s),
                data_dir,
                telemetry: TelemetryConfig {
                    log_format: spec.log_format,
                    log_filter: "info".into(),
                    otlp_endpoint: spec.otlp_endpoint.clone(),
                },
                peers: peers.clone(),
            };
            let config = dir.join("config").join(format!("{s}.toml"));
            let mut table = toml::Table::try_from(&cfg)
                .map_err(|e| ClusterError::Setup(format!("config for {s}: {e}")))?;
            if *s == "audit" {
                // The tree-head key lives with the trust material, so that
                // verifiers find its public half beside ca.pem.
                table.insert(
                    "signing_key".into(),
                    toml::Value::String(pki.join("audit-signing.key").display().to_string()),
                );
            }
            if *s == "sealed-vault" {
                // A local mesh makes its own master and fingerprint keys
                // (0600, under the data directory); production provisions them.
                table.insert("create_missing_keys".into(), toml::Value::Boolean(true));
            }
            if *s == "sandbox-runner" {
                // Runs out of the box: Docker when the engine answers, else
                // the process backend with the dev programs.
                table.insert(
                    "programs".into(),
                    toml::Value::Array(
                        DEV_SANDBOX_PROGRAMS
                            .iter()
                            .map(|p| toml::Value::String((*p).to_owned()))
                            .collect(),
                    ),
                );
                table.insert(
                    "container_prefix".into(),
                    toml::Value::String(DEV_CONTAINER_PREFIX.to_owned()),
                );
            }
            if let (true, Some((port, _))) = (*s == "audit", &view) {
                let mut web = toml::Table::new();
                web.insert(
                    "listen".into(),
                    toml::Value::String(format!("127.0.0.1:{port}")),
                );
                table.insert("web".into(), toml::Value::Table(web));
            }
            if let Some(extra) = spec.extra.get(*s) {
                table.extend(extra.clone());
            }
            let text = toml::to_string_pretty(&table)
                .map_err(|e| ClusterError::Setup(format!("config for {s}: {e}")))?;
            std::fs::write(&config, text).map_err(io(&config))?;
            processes.push(ServiceProcess {
                name: (*s).to_owned(),
                addr,
                log: dir.join("logs").join(format!("{s}.log")),
                config,
                binary: find_binary(s, spec.bin_dir.as_deref())?,
                env: match (&view, *s == "audit") {
                    (Some((_, token)), true) => vec![(
                        "BULKHEAD_AUDIT__WEB__OPERATOR_TOKEN".to_owned(),
                        token.clone(),
                    )],
                    _ => Vec::new(),
                },
                child: None,
            });
        }

        let endpoints = Endpoints {
            services: addrs,
            ca: pki.join("ca.pem"),
            operator_cert: pki.join("operator.pem"),
            operator_key: pki.join("operator.key"),
            audit_public_key: Some(pki.join("audit-signing.key.pub")),
            audit_view: view_url,
            audit_view_token: view_token_file,
        };
        let (operator, bundle) = endpoints.operator()?;
        let mut mesh = Self {
            dir: dir.clone(),
            endpoints,
            processes,
            operator,
            bundle,
        };
        for p in &mut mesh.processes {
            p.spawn().await?;
        }
        for i in 0..mesh.processes.len() {
            let name = mesh.processes[i].name.clone();
            mesh.wait_healthy(&name).await?;
        }
        let path = Endpoints::path(dir);
        let json = serde_json::to_string_pretty(&mesh.endpoints)
            .map_err(|e| ClusterError::Setup(e.to_string()))?;
        std::fs::write(&path, json).map_err(io(&path))?;
        Ok(mesh)
    }

    pub fn process(&self, name: &str) -> Option<&ServiceProcess> {
        self.processes.iter().find(|p| p.name == name)
    }

    pub fn process_mut(&mut self, name: &str) -> Option<&mut ServiceProcess> {
        self.processes.iter_mut().find(|p| p.name == name)
    }

    pub fn operator(&self) -> (&Identity, &TrustBundle) {
        (&self.operator, &self.bundle)
    }

    /// Restarts a stopped or killed service on the same port and waits for health.
    pub async fn restart(&mut self, name: &str) -> Result<(), ClusterError> {
        let p = self
            .process_mut(name)
            .ok_or_else(|| ClusterError::Setup(format!("no service {name}")))?;
        p.stop().await;
        p.spawn().await?;
        self.wait_healthy(name).await
    }

    /// Polls gRPC health over mTLS, as the operator, until SERVING.
    pub async fn wait_healthy(&self, name: &str) -> Result<(), ClusterError> {
        let p = self
            .process(name)
            .ok_or_else(|| ClusterError::Setup(format!("no service {name}")))?;
        let start = Instant::now();
        let mut last = String::from("no answer");
        while start.elapsed() < HEALTH_DEADLINE {
            let expect = ExpectServer::Service(p.name.clone());
            match health_expecting(&p.addr, &self.operator, &self.bundle, expect).await {
                Ok(true) => return Ok(()),
                Ok(false) => last = "not serving".into(),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(ClusterError::Unhealthy {
            service: name.to_owned(),
            reason: last,
            log: p.log.clone(),
            tail: p.log_tail(40),
        })
    }

    /// Stops every service gracefully (SIGTERM, then SIGKILL after a deadline).
    pub async fn stop(mut self) {
        for p in self.processes.iter_mut().rev() {
            p.stop().await;
        }
    }
}

/// Asks a service's gRPC health as `identity`; `Ok(true)` when SERVING.
pub async fn health(addr: &str, identity: &Identity, bundle: &TrustBundle) -> Result<bool, String> {
    health_expecting(addr, identity, bundle, ExpectServer::AnyInTrustDomain).await
}

/// As [`health`], answered only by `expect`: another service on the same
/// address (a port taken twice) is an error, not its health.
pub async fn health_expecting(
    addr: &str,
    identity: &Identity,
    bundle: &TrustBundle,
    expect: ExpectServer,
) -> Result<bool, String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let ch = bulkhead_mesh::client::connect(addr, Some(identity), bundle, expect)
        .await
        .map_err(|e| e.to_string())?;
    let resp = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
    Ok(resp.into_inner().status == ServingStatus::Serving as i32)
}
