//! Companion example 39, sandbox_scoped_credentials: Sandboxes with scoped
//! credentials calling a third-party API, and the credential-leak smoke test.
//!
//! Runs against a fresh local mesh of the real binaries (build them first:
//! `cargo build --workspace --bins`), prints the story with a ✓ or ✗ per
//! guarantee and the verified audit trail, and exits non-zero if a guarantee
//! failed. `--dir DIR` keeps the mesh's data; `--backend docker|process`
//! picks where sandboxes run.
//!
//! ```sh
//! cargo run -p bulkhead-cli --example sandbox_scoped_credentials -- --dir .bulkhead-sandbox_scoped_credentials
//! ```

fn main() -> anyhow::Result<()> {
    bulkhead_cli::demo::example_main(bulkhead_cli::demo::Scenario::SandboxCredentials)
}
