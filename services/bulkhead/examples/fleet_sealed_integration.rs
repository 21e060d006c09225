//! Companion example 33, fleet_sealed_integration: The multi-tenant fleet with
//! the Sealed boundary: three tenants, five workers, six tasks, the refused
//! cross-tenant claim, zero leaks.
//!
//! Runs against a fresh local mesh of the real binaries (build them first:
//! `cargo build --workspace --bins`), prints the story with a ✓ or ✗ per
//! guarantee and the verified audit trail, and exits non-zero if a guarantee
//! failed. `--dir DIR` keeps the mesh's data; `--backend docker|process`
//! picks where sandboxes run.
//!
//! ```sh
//! cargo run -p bulkhead-cli --example fleet_sealed_integration -- --dir .bulkhead-fleet_sealed_integration
//! ```

fn main() -> anyhow::Result<()> {
    bulkhead_cli::demo::example_main(bulkhead_cli::demo::Scenario::FleetSealed)
}
