#!/usr/bin/env bash
# The project's single test command: installs what the tests need, builds everything, then
# runs the whole workspace's tests inside the local stack (a real Kubernetes v1.20.2 control
# plane, a private Postgres and a private Redis; see e2e/ and nubabel-local).
#
# Arguments are passed on to `cargo test`, e.g. `scripts/test.sh -- --nocapture`.
set -euo pipefail

cd "$(dirname "$0")/.."
. scripts/lib/deps-env.sh

# Wall time from bash's own microsecond clock.
now_us() { echo "${EPOCHREALTIME/./}"; }
script_started=$(now_us)
phase_started=0
phase() {
  printf '==> %s\n' "$*" >&2
  phase_started=$(now_us)
}
phase_done() {
  local took_ms=$((($(now_us) - phase_started) / 1000))
  printf '==> %s took %d.%d s\n' "$1" $((took_ms / 1000)) $((took_ms % 1000 / 100)) >&2
}

phase "installing dependencies (scripts/install-deps.sh)"
export_deps_env
phase_done "installing dependencies"

phase "building the workspace"
cargo build --workspace --all-targets
phase_done "building the workspace"

phase "testing the workspace inside the local stack"
status=0
cargo run --quiet -p nubabel-e2e --bin nubabel-local -- run -- cargo test --workspace --no-fail-fast "$@" || status=$?
phase_done "testing the workspace inside the local stack"
phase_started=$script_started
phase_done "scripts/test.sh (exit status $status)"
exit "$status"
