//! The identity service's configuration. Defaults < file <
//! `BULKHEAD_IDENTITY__*` env < flags.

use std::path::PathBuf;

use bulkhead_mesh::config::MeshConfig;
use serde::{Deserialize, Serialize};

/// The service's default port on loopback.
pub const DEFAULT_PORT: u16 = 7401;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub mesh: MeshConfig,
    /// `sqlite://PATH` or `postgres://...`; empty: `sqlite://<data_dir>/identity.db`.
    pub store: String,
    pub ca: CaFiles,
    /// Longest run X.509-SVID, seconds (15 minutes).
    pub run_svid_max_ttl_secs: u64,
    /// Lifetime of a worker X.509-SVID, seconds (1 day; workers renew before).
    pub worker_svid_ttl_secs: u64,
    /// Longest JWT-SVID, seconds (5 minutes).
    pub jwt_max_ttl_secs: u64,
    /// How long a JWT signing key signs before a new one takes over, seconds.
    pub jwt_key_rotation_secs: u64,
    /// How long a retired key still verifies after the next one took over,
    /// seconds; at least the longest JWT-SVID's lifetime.
    pub jwt_key_overlap_secs: u64,
}

/// The CA: the trust domain's own (from `bulkhead pki init`), or an
/// intermediate signed by an outside root.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CaFiles {
    /// PEM: the signing certificate first, then any intermediates up to the
    /// root. Empty: the mesh's `tls.ca` file.
    pub cert: PathBuf,
    /// PEM of the signing key (mode 0600). Empty: `ca.key` beside `cert`.
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mesh: MeshConfig::with_port(DEFAULT_PORT),
            store: String::new(),
            ca: CaFiles::default(),
            run_svid_max_ttl_secs: 15 * 60,
            worker_svid_ttl_secs: 24 * 3600,
            jwt_max_ttl_secs: 5 * 60,
            jwt_key_rotation_secs: 24 * 3600,
            jwt_key_overlap_secs: 15 * 60,
        }
    }
}

impl Config {
    pub fn store_url(&self) -> String {
        if self.store.is_empty() {
            format!(
                "sqlite://{}",
                self.mesh.data_dir.join("identity.db").display()
            )
        } else {
            self.store.clone()
        }
    }

    pub fn ca_cert(&self) -> PathBuf {
        if self.ca.cert.as_os_str().is_empty() {
            self.mesh.tls.ca.clone()
        } else {
            self.ca.cert.clone()
        }
    }

    pub fn ca_key(&self) -> PathBuf {
        if self.ca.key.as_os_str().is_empty() {
            self.ca_cert().with_file_name("ca.key")
        } else {
            self.ca.key.clone()
        }
    }

    pub fn jwt_keys_path(&self) -> PathBuf {
        self.mesh.data_dir.join("jwt-keys.json")
    }
}
