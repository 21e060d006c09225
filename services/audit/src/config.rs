//! The audit service's configuration. Defaults < file < `BULKHEAD_AUDIT__*`
//! env < flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use bulkhead_mesh::config::MeshConfig;
use serde::{Deserialize, Serialize};

/// The service's default port on loopback.
pub const DEFAULT_PORT: u16 = 7405;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub mesh: MeshConfig,
    /// `sqlite://PATH` or `postgres://...`; empty: `sqlite://<data_dir>/audit.db`.
    pub store: String,
    /// The Ed25519 tree-head signing key (hex seed, mode 0600), created if
    /// missing with its public key beside it as `<path>.pub` (that file is
    /// what offline verifiers need). Empty: `<data_dir>/audit-signing.key`.
    pub signing_key: PathBuf,
    /// How often a new signed tree head is published while events arrive.
    pub checkpoint_interval_ms: u64,
    pub web: WebConfig,
}

/// The read-only web Audit view.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WebConfig {
    /// Where to serve it (HTTPS with the service's SVID); unset: not served.
    pub listen: Option<SocketAddr>,
    /// A bearer token that admits an operator without a client certificate;
    /// unset: only operator client certificates are admitted. Env
    /// `BULKHEAD_AUDIT__WEB__OPERATOR_TOKEN` keeps it out of files.
    pub operator_token: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mesh: MeshConfig::with_port(DEFAULT_PORT),
            store: String::new(),
            signing_key: PathBuf::new(),
            checkpoint_interval_ms: 1000,
            web: WebConfig::default(),
        }
    }
}

impl Config {
    pub fn store_url(&self) -> String {
        if self.store.is_empty() {
            format!("sqlite://{}", self.mesh.data_dir.join("audit.db").display())
        } else {
            self.store.clone()
        }
    }

    pub fn signing_key_path(&self) -> PathBuf {
        if self.signing_key.as_os_str().is_empty() {
            self.mesh.data_dir.join("audit-signing.key")
        } else {
            self.signing_key.clone()
        }
    }
}
