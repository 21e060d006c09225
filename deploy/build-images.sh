#!/usr/bin/env bash
# Builds the Bulkhead images from binaries already built in this workspace,
# without a registry: every image starts FROM scratch (or from one made here)
# and holds the binary, the shared libraries `ldd` names, the loader and a few
# files of /etc. Nothing is downloaded, so this works on an air-gapped host.
#
#   bulkhead/runtime:<tag>   glibc and /etc: what every image stands on
#   bulkhead/tools:<tag>     runtime + sh and a few coreutils
#   bulkhead/<service>:<tag> audit, identity, sealed-vault, dispatcher, sandbox-runner
#   bulkhead/worker:<tag>    the worker agent (tools: bare-mode agents need a shell)
#   bulkhead/cli:<tag>       the bulkhead CLI (tools: the compose bootstrap is a script)
#   bulkhead/agent:<tag>     a minimal agent image for sandboxes (tools only)
#
# Usage: deploy/build-images.sh [--profile debug|release | --bin-dir DIR] [--tag TAG]
# (run `cargo build --workspace --bins` first). Idempotent: an unchanged
# binary hits Docker's build cache and the tag keeps pointing at the same image.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
profile="debug"
bin_dir=""
tag="dev"
while [ $# -gt 0 ]; do
    case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
bin_dir="${bin_dir:-${CARGO_TARGET_DIR:-$root/target}/$profile}"
services=(audit identity sealed-vault dispatcher sandbox-runner)
tools=(sh cat env echo sleep true false ls id grep sed mkdir)

binaries=("${services[@]/#/bulkhead-}" bulkhead-worker bulkhead)
for b in "${binaries[@]}"; do
    if [ ! -x "$bin_dir/$b" ]; then
        echo "missing $bin_dir/$b: run 'cargo build --workspace --bins' first" >&2
        exit 1
    fi
done
command -v docker >/dev/null || { echo "docker is not installed" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/bulkhead-images.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# The legacy builder never contacts a registry for FROM scratch or for an
# image that is present locally (and needs no buildx plugin).
export DOCKER_BUILDKIT=0

# Copies each shared library `ldd` names for the given programs (and the
# loader) into the root filesystem $1, at the path ldd names.
copy_libs() {
    local dest="$1"
    shift
    ldd "$@" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\/.*[^:]$/ { print $1 }' |
        sort -u | while read -r lib; do
        mkdir -p "$dest$(dirname "$lib")"
        cp -L "$lib" "$dest$lib"
    done
}

# build NAME DIR: docker build of DIR (holding a Dockerfile) as NAME:tag.
build() {
    echo "building $1:$tag"
    if ! docker build --tag "$1:$tag" "$2" >"$work/build.log" 2>&1; then
        cat "$work/build.log" >&2
        return 1
    fi
}

# The runtime: glibc, the loader, and enough of /etc for name resolution
# (Docker supplies resolv.conf and hosts) and for a root user to exist.
ctx="$work/runtime"
mkdir -p "$ctx/rootfs/etc" "$ctx/rootfs/tmp" "$ctx/rootfs/usr/local/bin"
chmod 1777 "$ctx/rootfs/tmp"
copy_libs "$ctx/rootfs" "${binaries[@]/#/$bin_dir/}"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$ctx/rootfs/etc/group"
printf 'hosts: files dns\n' >"$ctx/rootfs/etc/nsswitch.conf"
cat >"$ctx/Dockerfile" <<EOF
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin
LABEL org.opencontainers.image.title="bulkhead runtime"
EOF
build bulkhead/runtime "$ctx"

# Tools: a shell and a few coreutils, for the images that run scripts.
ctx="$work/tools"
mkdir -p "$ctx/rootfs/bin"
paths=()
for t in "${tools[@]}"; do
    p="$(command -v "$t" || true)"
    case "$p" in /*) ;; *) p="/bin/$t" ;; esac
    cp -L "$p" "$ctx/rootfs/bin/$t"
    paths+=("$p")
done
copy_libs "$ctx/rootfs" "${paths[@]}"
cat >"$ctx/Dockerfile" <<EOF
FROM bulkhead/runtime:$tag
COPY rootfs/ /
EOF
build bulkhead/tools "$ctx"

# image NAME BASE BINARY [CMD...]: BASE plus one binary as the entrypoint.
image() {
    local name="$1" base="$2" binary="$3"
    shift 3
    local ctx="$work/$name"
    mkdir -p "$ctx"
    cp -L "$bin_dir/$binary" "$ctx/$binary"
    local cmd=""
    if [ $# -gt 0 ]; then
        cmd="CMD [$(printf '"%s", ' "$@" | sed 's/, $//')]"
    fi
    cat >"$ctx/Dockerfile" <<EOF
FROM bulkhead/$base:$tag
COPY $binary /usr/local/bin/$binary
ENTRYPOINT ["/usr/local/bin/$binary"]
$cmd
LABEL org.opencontainers.image.title="$binary"
EOF
    build "bulkhead/$name" "$ctx"
}

for s in "${services[@]}"; do
    image "$s" runtime "bulkhead-$s" --config "/etc/bulkhead/$s.toml"
done
image worker tools bulkhead-worker --help
image cli tools bulkhead --help

# The agent image sandboxes run (the sandbox-runner never pulls).
ctx="$work/agent"
mkdir -p "$ctx"
printf 'FROM bulkhead/tools:%s\nUSER 65534:65534\nCMD ["/bin/sh"]\n' "$tag" >"$ctx/Dockerfile"
build bulkhead/agent "$ctx"

echo "done: runtime tools ${services[*]} worker cli agent, tagged $tag"
