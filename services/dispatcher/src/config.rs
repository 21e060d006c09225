//! The dispatcher service's configuration. Defaults < file <
//! `BULKHEAD_DISPATCHER__*` env < flags.

use std::collections::BTreeMap;
use std::time::Duration;

use bulkhead_mesh::config::MeshConfig;
use serde::{Deserialize, Serialize};

/// The service's default port on loopback.
pub const DEFAULT_PORT: u16 = 7403;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub mesh: MeshConfig,
    /// `sqlite://PATH` or `postgres://...`; empty: `sqlite://<data_dir>/dispatcher.db`.
    /// Several replicas may share one PostgreSQL database, never one SQLite file.
    pub store: String,
    /// `redis://host:port` for wake-ups across replicas; empty: none (one
    /// replica, or polling only). Losing Redis degrades to polling.
    pub redis: String,
    pub fleet: FleetConfig,
}

/// Leases, bounds, fairness and polling.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetConfig {
    /// How long a lease lasts without a heartbeat, milliseconds; an
    /// assignment must be accepted within it too.
    pub lease_ms: u64,
    /// How often workers are told to heartbeat, milliseconds (about a third
    /// of the lease).
    pub heartbeat_ms: u64,
    /// How often leases are checked for lapses, milliseconds.
    pub reaper_ms: u64,
    /// How often the queue is polled while Redis carries wake-ups.
    pub poll_ms: u64,
    /// How often the queue is polled without Redis (none configured, or down).
    pub fallback_poll_ms: u64,
    /// Largest task payload, bytes.
    pub max_payload_bytes: usize,
    /// Tenants' (and pools', as `pool/<name>`) shares of dispatch capacity;
    /// those not listed get `default_weight`.
    pub weights: BTreeMap<String, u32>,
    pub default_weight: u32,
    /// Assignments one scope may be handed per round per unit of weight.
    pub quantum: u32,
    /// Scheduler loops: how many scopes are served at once (each scope by
    /// one loop at a time). More overlap the claims' store round trips.
    #[serde(default = "default_schedulers")]
    pub schedulers: u32,
    /// Hand a new task straight to a waiting worker of its scope in the
    /// enqueue's own insert, saving the scheduler's claim (see
    /// `Engine::enqueue`). Off: every task is queued and claimed.
    #[serde(default = "default_hand_off")]
    pub hand_off: bool,
    /// How long a task may stay held (inserted while its enqueue is being
    /// recorded in audit) before the settling pass takes it for the leftover
    /// of a crash and settles it against audit, milliseconds. Far above an
    /// Append's timeout (5 s); the pass runs every half of it (at most 30 s).
    #[serde(default = "default_held_grace_ms")]
    pub held_grace_ms: u64,
}

fn default_held_grace_ms() -> u64 {
    60_000
}

fn default_hand_off() -> bool {
    true
}

fn default_schedulers() -> u32 {
    4
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            lease_ms: 30_000,
            heartbeat_ms: 10_000,
            reaper_ms: 1_000,
            poll_ms: 2_000,
            fallback_poll_ms: 200,
            max_payload_bytes: 1 << 20,
            weights: BTreeMap::new(),
            default_weight: 1,
            quantum: 64,
            schedulers: default_schedulers(),
            hand_off: default_hand_off(),
            held_grace_ms: default_held_grace_ms(),
        }
    }
}

impl FleetConfig {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mesh: MeshConfig::with_port(DEFAULT_PORT),
            store: String::new(),
            redis: String::new(),
            fleet: FleetConfig::default(),
        }
    }
}

impl Config {
    pub fn store_url(&self) -> String {
        if self.store.is_empty() {
            format!(
                "sqlite://{}",
                self.mesh.data_dir.join("dispatcher.db").display()
            )
        } else {
            self.store.clone()
        }
    }
}
