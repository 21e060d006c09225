//! Companion example 20, fleet_workers: Distributed worker registration:
//! enrollment with join tokens, registration, heartbeats.
//!
//! Runs against a fresh local mesh of the real binaries (build them first:
//! `cargo build --workspace --bins`), prints the story with a ✓ or ✗ per
//! guarantee and the verified audit trail, and exits non-zero if a guarantee
//! failed. `--dir DIR` keeps the mesh's data; `--backend docker|process`
//! picks where sandboxes run.
//!
//! ```sh
//! cargo run -p bulkhead-cli --example fleet_workers -- --dir .bulkhead-fleet_workers
//! ```

fn main() -> anyhow::Result<()> {
    bulkhead_cli::demo::example_main(bulkhead_cli::demo::Scenario::FleetWorkers)
}
