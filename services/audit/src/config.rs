//! The audit service's configuration: the mesh's common part (listen
//! address, TLS files, data directory, telemetry, peers). Defaults < file <
//! `BULKHEAD_AUDIT__*` env < flags.

use bulkhead_mesh::config::MeshConfig;
use serde::{Deserialize, Serialize};

/// The service's default port on loopback.
pub const DEFAULT_PORT: u16 = 7405;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub mesh: MeshConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mesh: MeshConfig::with_port(DEFAULT_PORT),
        }
    }
}
