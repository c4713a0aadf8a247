# shellcheck shell=bash
# Sourced by scripts/demo.sh and scripts/test.sh (from the workspace root): runs
# scripts/install-deps.sh and exports the NUBABEL_*=path lines it prints. When an install
# step fails, the calling script stops at once with install-deps' exit status; install-deps'
# last line on stderr names the step.

export_deps_env() {
  local output status=0
  output=$(scripts/install-deps.sh) || status=$?
  if [ "$status" -ne 0 ]; then
    printf '==> %s: stopping, scripts/install-deps.sh failed (exit status %d, the failing step is named above)\n' \
      "$(basename "$0")" "$status" >&2
    exit "$status"
  fi
  local line
  while IFS= read -r line; do
    case "$line" in
      NUBABEL_*=*) export "${line?}" ;;
    esac
  done <<<"$output"
  # The language servers the sidecar image has on PATH, for the pods the node shim runs.
  if [ -n "${NUBABEL_LSP_BIN:-}" ]; then
    export PATH="$NUBABEL_LSP_BIN:$PATH"
  fi
}
