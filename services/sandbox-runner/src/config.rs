//! The sandbox-runner service's configuration: the mesh's common part (listen
//! address, TLS files, data directory, telemetry, peers) and what this host
//! allows its sandboxes. Defaults < file < `BULKHEAD_SANDBOX_RUNNER__*` env <
//! flags.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bulkhead_mesh::config::MeshConfig;
use serde::{Deserialize, Serialize};

use crate::model::BackendKind;

/// The service's default port on loopback.
pub const DEFAULT_PORT: u16 = 7404;

/// Which backend a StartSandbox that names none gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultBackend {
    /// Docker when the engine answers, else the process backend.
    Auto,
    Docker,
    Process,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub mesh: MeshConfig,
    /// The backend of a StartSandbox that names none.
    pub default_backend: DefaultBackend,
    /// The backends this host offers; a request for another is PERMISSION_DENIED.
    pub backends: Vec<BackendKind>,
    /// The Docker engine's socket (`unix:///path` or a path); empty: `DOCKER_HOST`,
    /// else the local default socket.
    pub docker_host: String,
    /// Sandboxes (starting, running or exited, not yet released) at once.
    pub max_sandboxes: u32,
    /// Images the Docker backend may run: exact names, or prefixes ending in
    /// `*`. Empty: any image present on the host (none is ever pulled).
    pub images: Vec<String>,
    /// Programs the process backend may run (absolute paths, or prefixes
    /// ending in `*`). Empty: none, so that the weaker backend runs only what
    /// an operator named.
    pub programs: Vec<String>,
    /// Docker networks sandboxes may join (NETWORK_MODE_ALLOW_LIST): network
    /// name → the tenants allowed to use it (`*` for every tenant).
    pub networks: BTreeMap<String, Vec<String>>,
    pub limits: LimitsConfig,
    /// Name prefix of the runner's containers.
    pub container_prefix: String,
    /// The user sandboxes run as (Docker `User`), never root.
    pub user: String,
    /// Size of each sandbox's tmpfs `/tmp` (Docker size syntax).
    pub tmpfs_size: String,
    /// `PATH` given to process-backend sandboxes.
    pub process_path: String,
}

/// Defaults and maximums of sandbox limits; a zero field of a request takes
/// the default, a value above the maximum is refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LimitsConfig {
    pub default_memory_bytes: u64,
    pub max_memory_bytes: u64,
    pub default_cpu_millis: u32,
    pub max_cpu_millis: u32,
    pub default_pids: u32,
    pub max_pids: u32,
    pub default_timeout_secs: u64,
    pub max_timeout_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            default_memory_bytes: 512 << 20,
            max_memory_bytes: 8 << 30,
            default_cpu_millis: 1000,
            max_cpu_millis: 4000,
            default_pids: 256,
            max_pids: 4096,
            default_timeout_secs: 3600,
            max_timeout_secs: 24 * 3600,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mesh: MeshConfig::with_port(DEFAULT_PORT),
            default_backend: DefaultBackend::Auto,
            backends: vec![BackendKind::Docker, BackendKind::Process],
            docker_host: String::new(),
            max_sandboxes: 32,
            images: Vec::new(),
            programs: Vec::new(),
            networks: BTreeMap::new(),
            limits: LimitsConfig::default(),
            container_prefix: "bulkhead-sbx-".into(),
            user: "65534:65534".into(),
            tmpfs_size: "64m".into(),
            process_path: "/usr/local/bin:/usr/bin:/bin".into(),
        }
    }
}

impl Config {
    /// Where the init shim is installed.
    pub fn shim_dir(&self) -> PathBuf {
        self.mesh.data_dir.join("shim")
    }

    /// Where process-backend sandboxes get their fresh directories.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.mesh.data_dir.join("sandboxes")
    }
}

/// Whether `name` matches one of `patterns` (exact, or a prefix ending in `*`).
pub fn allowed(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_exact_or_prefixes() {
        let p = vec!["registry.local/agents/*".to_owned(), "busybox:1".to_owned()];
        assert!(allowed(&p, "registry.local/agents/bot:2"));
        assert!(allowed(&p, "busybox:1"));
        assert!(!allowed(&p, "busybox:12"));
        assert!(!allowed(&p, "registry.local/other"));
        assert!(!allowed(&[], "anything"));
    }

    #[test]
    fn the_defaults_render_and_parse_back() {
        let text = toml::to_string(&Config::default()).expect("render");
        let back: Config = toml::from_str(&text).expect("parse");
        assert_eq!(
            back.backends,
            vec![BackendKind::Docker, BackendKind::Process]
        );
        assert_eq!(back.default_backend, DefaultBackend::Auto);
    }
}
