#!/usr/bin/env bash
# The quick start's main job on the local default: installs what it needs, starts the local
# stack (Kubernetes v1.20.2 control plane, Postgres, Redis), then runs the callback API, the
# operator and a tenant's OpenCode sidecar pod (the real OpenCode server, with a scripted fake
# LLM) and prints a DelegatedTask's progress and answer. Everything is torn down at the end;
# with --keep-up the stack stays up (printing the web view's URL and a tenant token) until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/deps-env.sh

export_deps_env

cargo build -q --workspace --bins
exec target/debug/nubabel-local run -- target/debug/nubabel-demo "$@"
