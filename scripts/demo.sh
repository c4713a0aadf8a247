#!/usr/bin/env bash
# The quick start's main job on the local default: installs what it needs, starts the local
# stack (Kubernetes v1.20.2 control plane, Postgres, Redis), installs the CRDs, applies the
# example tenant and tasks, and shows them. The stack is torn down when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

while IFS='=' read -r key value; do
  case "$key" in NUBABEL_*) export "$key=$value" ;; esac
done < <(scripts/install-deps.sh)

cargo build -q -p nubabel-e2e --bin nubabel-local
exec target/debug/nubabel-local run -- scripts/demo-steps.sh
