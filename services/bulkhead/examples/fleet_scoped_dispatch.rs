//! Companion example 26, fleet_scoped_dispatch: Capability-based dispatch with
//! project-scoped routing.
//!
//! Runs against a fresh local mesh of the real binaries (build them first:
//! `cargo build --workspace --bins`), prints the story with a ✓ or ✗ per
//! guarantee and the verified audit trail, and exits non-zero if a guarantee
//! failed. `--dir DIR` keeps the mesh's data; `--backend docker|process`
//! picks where sandboxes run.
//!
//! ```sh
//! cargo run -p bulkhead-cli --example fleet_scoped_dispatch -- --dir .bulkhead-fleet_scoped_dispatch
//! ```

fn main() -> anyhow::Result<()> {
    bulkhead_cli::demo::example_main(bulkhead_cli::demo::Scenario::ScopedDispatch)
}
