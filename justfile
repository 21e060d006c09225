# Bulkhead's recipes. CI runs `just lint` and then the README's test command.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Format the Rust sources.
fmt:
    cargo fmt --all

# fmt check, clippy with warnings denied, buf lint.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings
    buf lint

# Build every binary (the cross-service tests start them), then run every test.
test:
    cargo build --workspace --bins --locked
    cargo nextest run --workspace --locked --no-fail-fast

# Start the five services on loopback with embedded defaults under DIR.
dev dir=".bulkhead":
    cargo build --workspace --bins --locked
    ./target/debug/bulkhead dev up --dir {{dir}}
