//! The sealed-vault service's configuration. Defaults < file <
//! `BULKHEAD_SEALED_VAULT__*` env < flags. The master key itself is never
//! configuration: it comes from `BULKHEAD_SEALED_VAULT_MASTER_KEY` or a file
//! of mode 0600.

use std::path::PathBuf;

use bulkhead_mesh::config::MeshConfig;
use serde::{Deserialize, Serialize};

use crate::backend::BackendsConfig;

/// The service's default port on loopback.
pub const DEFAULT_PORT: u16 = 7402;

#[derive(Debug, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub mesh: MeshConfig,
    /// `sqlite://PATH` or `postgres://...`; empty: `sqlite://<data_dir>/sealed.db`.
    pub store: String,
    /// The master key file (mode 0600). Empty: `<data_dir>/master.key`.
    pub master_key_file: PathBuf,
    /// Earlier master keys still needed to open versions not yet rewrapped.
    pub previous_master_key_files: Vec<PathBuf>,
    /// The deployment's HMAC key for fingerprints in audit records (mode
    /// 0600). Empty: `<data_dir>/fingerprint.key`.
    pub fingerprint_key_file: PathBuf,
    /// Make the master and fingerprint keys when missing: for `dev up` and
    /// demos only; production keys are provisioned, never conjured.
    pub create_missing_keys: bool,
    /// RevealSecret calls allowed per operator per minute.
    pub reveals_per_minute: u32,
    /// Secret backends (credentials included: never dumped).
    #[serde(default, skip_serializing)]
    pub backends: BackendsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mesh: MeshConfig::with_port(DEFAULT_PORT),
            store: String::new(),
            master_key_file: PathBuf::new(),
            previous_master_key_files: Vec::new(),
            fingerprint_key_file: PathBuf::new(),
            create_missing_keys: false,
            reveals_per_minute: 5,
            backends: BackendsConfig::default(),
        }
    }
}

impl Config {
    fn in_data(&self, p: &std::path::Path, name: &str) -> PathBuf {
        if p.as_os_str().is_empty() {
            self.mesh.data_dir.join(name)
        } else {
            p.to_owned()
        }
    }

    pub fn store_url(&self) -> String {
        if self.store.is_empty() {
            format!(
                "sqlite://{}",
                self.mesh.data_dir.join("sealed.db").display()
            )
        } else {
            self.store.clone()
        }
    }

    pub fn master_key_path(&self) -> PathBuf {
        self.in_data(&self.master_key_file, "master.key")
    }

    pub fn fingerprint_key_path(&self) -> PathBuf {
        self.in_data(&self.fingerprint_key_file, "fingerprint.key")
    }
}
