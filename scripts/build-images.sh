#!/usr/bin/env bash
# Builds the project's images from docker/*.Dockerfile with buildah on a Debian 12 machine that
# reaches Debian's archive, crates.io and npm but no image registry, then runs each one once
# (`--help` or `--version`) with podman to show that it starts.
#
#   scripts/build-images.sh [--debug] [operator|callback-api|bridge|opencode ...]
#
# With no names it builds all four. The Dockerfiles are the same ones a registry-backed
# `docker build` uses; only their base images and the Rust build stage are replaced:
#   - debootstrap makes a Debian 12 minbase root, slimmed like debian:bookworm-slim, imported as
#     localhost/nubabel-base/debian:bookworm-slim (in place of debian:bookworm-slim);
#   - docker/debian-bases/node.Dockerfile adds Debian's node and npm to it (node:22-bookworm-slim);
#   - docker/debian-bases/cc.Dockerfile unpacks distroless' Debian packages into an image of
#     their own (gcr.io/distroless/cc-debian12:nonroot);
#   - the Rust binaries are built on the host with cargo (release, each as its Dockerfile's
#     build stage builds it; `--debug` takes the workspace's debug binaries instead, quick once
#     the workspace is built, for checking the images' shape) and handed to the Dockerfile in
#     place of its `build` stage (`--build-context build=DIR`).
# The images are tagged as docker/*.Dockerfile name them (ghcr.io/nubabel/<name>:<version>) in
# the image store under $NUBABEL_IMAGES_DIR (default /var/tmp/nubabel-images), which also keeps
# the base images, so later runs skip them; `podman save` exports an image from there (the
# CONTAINERS_* lines printed at the end select that store).
#
# Needs root (debootstrap, and containers run without user namespaces); installs buildah,
# podman, runc and debootstrap from Debian when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${NUBABEL_IMAGES_DIR:-/var/tmp/nubabel-images}
DEBIAN_MIRROR=${NUBABEL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_BASE=localhost/nubabel-base/debian:bookworm-slim
NODE_BASE=localhost/nubabel-base/node:bookworm
CC_BASE=localhost/nubabel-base/cc:bookworm
REGISTRY=ghcr.io/nubabel
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
OPENCODE_VERSION=$(sed -n 's/^ARG OPENCODE_VERSION=//p' docker/opencode-sidecar.Dockerfile)

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf '==> build-images: %s\n' "$*" >&2
  exit 1
}

profile=release
images=()
for arg in "$@"; do
  case "$arg" in
    --debug) profile=debug ;;
    operator | callback-api | bridge | opencode) images+=("$arg") ;;
    *) die "unknown argument $arg (expected --debug, operator, callback-api, bridge or opencode)" ;;
  esac
done
[ "${#images[@]}" -gt 0 ] || images=(operator callback-api bridge opencode)

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, and containers without user namespaces)"

install_tools() {
  local missing=()
  for tool in buildah podman runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing from Debian: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# A private image store and container settings, so nothing lands in the system's own store:
# runc rather than crun (crun refuses hybrid cgroup hierarchies), cgroupfs (no systemd needed),
# and the caller's own resource limits (raising them needs CAP_SYS_RESOURCE, which a container
# host may not grant). Builds run on the host's network, as the npm and apt steps need it.
configure_store() {
  mkdir -p "$WORK"
  cat >"$WORK/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
CONF
  cat >"$WORK/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=$(max_processes):$(max_processes)"]
netns = "host"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
  export CONTAINERS_STORAGE_CONF=$WORK/storage.conf CONTAINERS_CONF=$WORK/containers.conf
}

# Podman starts its monitor with at most 32768 processes, so a container cannot have more.
max_processes() {
  local hard
  hard=$(ulimit -Hu)
  if [ "$hard" = unlimited ] || [ "$hard" -gt 32768 ]; then echo 32768; else echo "$hard"; fi
}

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

build() {
  buildah build --quiet --isolation oci --network host --layers "$@" >/dev/null
}

debian_base() {
  have_image "$DEBIAN_BASE" && return 0
  local root=$WORK/rootfs/debian
  log "making a Debian 12 minbase root with debootstrap ($DEBIAN_MIRROR)"
  rm -rf "$root"
  mkdir -p "$root"
  debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    die "debootstrap failed, see $WORK/debootstrap.log"
  # The sources and the slimming of debian:bookworm-slim: updates and security updates, no
  # documentation or translations now or from later installs.
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: ${DEBIAN_MIRROR}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${DEBIAN_MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
DPKG
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
  log "applying Debian 12's updates and security updates to it"
  chroot "$root" apt-get update -qq
  chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq >/dev/null
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
  # The host's copies, which debootstrap leaves; the container runtime provides its own.
  rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
  log "importing it as $DEBIAN_BASE"
  tar -C "$root" --numeric-owner -c . |
    podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["bash"]' - "$DEBIAN_BASE" >/dev/null
  rm -rf "$root"
}

# The two bases built from Dockerfiles are rebuilt every time; the layer cache makes that
# instant unless their Dockerfile changed.
node_base() {
  log "building $NODE_BASE (Debian's node and npm)"
  # With the host's own extra CAs, so npm in the build stage reaches the registry the way the
  # host's npm does (e.g. through a TLS-inspecting proxy); no image that ships gets them.
  local extra_cas=()
  [ -d /usr/local/share/ca-certificates ] &&
    extra_cas=(--volume /usr/local/share/ca-certificates:/usr/local/share/ca-certificates:ro)
  build -f docker/debian-bases/node.Dockerfile --build-arg "DEBIAN_IMAGE=$DEBIAN_BASE" "${extra_cas[@]}" \
    -t "$NODE_BASE" docker/debian-bases
}

cc_base() {
  log "building $CC_BASE (distroless cc's Debian packages)"
  build -f docker/debian-bases/cc.Dockerfile --build-arg "DEBIAN_IMAGE=$DEBIAN_BASE" -t "$CC_BASE" docker/debian-bases
}

# Release: each binary on its own, as the Dockerfile's build stage builds it (cargo unifies the
# features of the packages one invocation builds, so building them together would give other
# binaries). Debug: the workspace's binaries, as scripts/demo.sh builds them, for checking the
# images' shape without another build.
build_binaries() {
  [ "$#" -gt 0 ] || return 0
  if [ "$profile" = debug ]; then
    log "building the workspace's debug binaries on the host"
    cargo build --locked --workspace --bins
    return 0
  fi
  for image in "$@"; do
    log "building nubabel-$image on the host: cargo build --release --locked -p nubabel-$image --bin nubabel-$image"
    cargo build --release --locked -p "nubabel-$image" --bin "nubabel-$image"
  done
}

# The Dockerfile's build stage, replaced by a directory holding what it would produce.
rust_image() {
  local name=$1 binary=nubabel-$1 tag=$REGISTRY/$1:$VERSION
  local stage=$WORK/stages/$name
  rm -rf "$stage"
  install -D -m 0755 "target/$profile/$binary" "$stage/out/$binary"
  mkdir -p "$WORK/empty-context"
  log "building $tag from docker/$name.Dockerfile ($profile binary)"
  build -f "docker/$name.Dockerfile" --build-arg "RUNTIME_IMAGE=$CC_BASE" \
    --build-arg "DEBIAN_IMAGE=$DEBIAN_BASE" \
    --build-context "build=$stage" -t "$tag" "$WORK/empty-context"
  rm -rf "$stage"
  smoke_run "$tag" --help
  # The bridge clones conversations' repositories.
  if [ "$name" = bridge ]; then
    podman run --rm --entrypoint /usr/bin/git "$tag" --version >/dev/null ||
      die "$tag lacks git"
  fi
}

opencode_image() {
  local tag=$REGISTRY/opencode:$OPENCODE_VERSION
  log "building $tag from docker/opencode-sidecar.Dockerfile"
  build -f docker/opencode-sidecar.Dockerfile --build-arg "NODE_IMAGE=$NODE_BASE" \
    --build-arg "DEBIAN_IMAGE=$DEBIAN_BASE" --build-arg "TARGETARCH=$(dpkg --print-architecture)" \
    -t "$tag" docker
  smoke_run "$tag" --version
  # The plugin the operator references, where it references it.
  podman run --rm --entrypoint /bin/bash "$tag" -c \
    'test -f /opt/opencode/plugins/node_modules/oh-my-opencode/package.json && git --version >/dev/null && rg --version >/dev/null && pyright --version >/dev/null' ||
    die "$tag lacks the oh-my-opencode plugin, git, ripgrep or the Pyright language server"
}

smoke_run() {
  local tag=$1
  shift
  podman run --rm "$tag" "$@" >/dev/null || die "$tag does not start: podman run --rm $tag $*"
  log "$tag starts ($*)"
}

main() {
  install_tools
  configure_store
  debian_base
  local rust_images=()
  for image in "${images[@]}"; do
    [ "$image" = opencode ] || rust_images+=("$image")
  done
  build_binaries "${rust_images[@]}"
  if [ "${#rust_images[@]}" -gt 0 ]; then
    cc_base
    for image in "${rust_images[@]}"; do rust_image "$image"; done
  fi
  if [ "${#rust_images[@]}" -lt "${#images[@]}" ]; then
    node_base
    opencode_image
  fi
  log "built ${images[*]} in $((SECONDS / 60)) min $((SECONDS % 60)) s"
  printf 'CONTAINERS_STORAGE_CONF=%s\nCONTAINERS_CONF=%s\n' "$CONTAINERS_STORAGE_CONF" "$CONTAINERS_CONF"
}

main
