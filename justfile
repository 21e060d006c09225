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

# `just compose` starts the container mesh, `just compose down -v` removes it;
# `BULKHEAD_OTLP_ENDPOINT=http://otel-collector:4317 just compose --profile observability up -d`
# adds the OTel collector, Prometheus and Grafana (their images need a registry).
# Build the images from the workspace and run docker-compose on deploy/docker-compose.yml.
compose +args="up -d":
    cargo build --workspace --bins --locked
    deploy/build-images.sh
    mkdir -p deploy/run/pki deploy/run/sandbox-runner
    BULKHEAD_UID=$(id -u) BULKHEAD_GID=$(id -g) BULKHEAD_RUNNER_DIR="$PWD/deploy/run/sandbox-runner" \
        docker-compose --file deploy/docker-compose.yml {{args}}

# The multi-tenant walkthrough on a local mesh, its data kept in DIR; exits
# non-zero if a guarantee failed.
demo dir=".bulkhead":
    cargo build --workspace --bins --locked
    ./target/debug/bulkhead demo --dir {{dir}}
