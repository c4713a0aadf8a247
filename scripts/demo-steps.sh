#!/usr/bin/env bash
# Runs inside `nubabel-local run`, which provides KUBECONFIG and kubectl on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }

run kubectl apply -f crds/
run kubectl wait --for condition=established --timeout=60s crd/opencodesidecars.nubabel.io crd/delegatedtasks.nubabel.io
run kubectl create namespace demo
run kubectl apply -n demo -f examples/
run kubectl get ocs,dtask -n demo
run kubectl scale ocs acme -n demo --replicas=3
run kubectl get ocs acme -n demo
# The API server publishes CRD schemas to its OpenAPI document a moment after they are
# established; poll (bounded) until `kubectl explain` finds them.
say kubectl explain dtask.spec.sessionId
for _ in $(seq 1 60); do
  kubectl explain dtask.spec.sessionId 2>/dev/null && break
  sleep 0.5
done
