#!/usr/bin/env bash
# Property-based tests of the callback API's HTTP contract: schemathesis (from PyPI) generates
# requests from docs/openapi.json, valid and invalid, and checks every answer against the
# document: never a 5xx, and every response (status, content type, body) as documented.
#
# It starts the local stack (Postgres, Redis, the Kubernetes control plane) and one callback
# API on it, then runs schemathesis three times: the API's port (everything but the admin API),
# POST /api/delegate with a tenant API token (tasks are created in the stack's `default`
# namespace; no operator runs, so waits end after 2 s), and the admin listener with the admin
# token. Nothing is mocked. Signed callbacks and MCP requests cannot be generated with valid
# signatures, so for them it exercises authentication, headers and the refusals only.
#
#   scripts/schemathesis.sh                 # 100 examples per operation
#   SCHEMATHESIS_MAX_EXAMPLES=500 scripts/schemathesis.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/deps-env.sh

SCHEMATHESIS_VERSION=4.32.5
venv="${XDG_CACHE_HOME:-$HOME/.cache}/nubabel/schemathesis-$SCHEMATHESIS_VERSION"

if [ "${1:-}" != "--inside-stack" ]; then
  export_deps_env
  if [ ! -x "$venv/bin/schemathesis" ]; then
    printf '==> installing schemathesis %s into %s\n' "$SCHEMATHESIS_VERSION" "$venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
  fi
  cargo build -q -p nubabel-callback-api -p nubabel-e2e --bins
  exec target/debug/nubabel-local run -- "$0" --inside-stack
fi

# Inside the stack: NUBABEL_TEST_DATABASE_URL, NUBABEL_TEST_REDIS_URL and KUBECONFIG are set.
random_key() { head -c 32 /dev/urandom | base64 | tr -d '\n/+='; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
admin_port=$(free_port)
admin_token=$(random_key)
log="${NUBABEL_LOCAL_DIR:-/tmp}/schemathesis-callback-api.log"

NUBABEL_CALLBACK_API_HTTP_ADDR="127.0.0.1:$port" \
NUBABEL_ADMIN_HTTP_ADDR="127.0.0.1:$admin_port" \
NUBABEL_DATABASE_URL="$NUBABEL_TEST_DATABASE_URL" \
NUBABEL_REDIS_URL="$NUBABEL_TEST_REDIS_URL" \
NUBABEL_SIGNING_MASTER_KEY="$(random_key)" \
NUBABEL_STREAM_TOKEN_KEY="$(random_key)" \
NUBABEL_VAULT_KEYS="k1=$(head -c 32 /dev/urandom | base64 | tr -d '\n')" \
NUBABEL_ADMIN_TOKEN="$admin_token" \
NUBABEL_SLACK_BOT_TOKEN="xoxb-schemathesis" \
NUBABEL_SLACK_SIGNING_SECRET="$(random_key)" \
NUBABEL_SLACK_TEAMS="T0SCHEMA=org-schemathesis/default" \
NUBABEL_SLACK_API_URL="http://127.0.0.1:9/api" \
NUBABEL_DELEGATE_MAX_WAIT_SECONDS=2 \
NUBABEL_LOG_FORMAT=text \
  target/debug/nubabel-callback-api >"$log" 2>&1 &
api=$!
trap 'kill "$api" 2>/dev/null; wait "$api" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$api" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.2
done

examples="${SCHEMATHESIS_MAX_EXAMPLES:-100}"
common=(
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
  --max-examples "$examples"
  --phases examples,coverage,fuzzing
  --workers 2
  --suppress-health-check all
)
status=0
printf '==> schemathesis: the API port (%s examples per operation)\n' "$examples" >&2
"$venv/bin/schemathesis" run docs/openapi.json --url "http://127.0.0.1:$port" \
  --exclude-tag admin "${common[@]}" || status=$?
printf '==> schemathesis: POST /api/delegate with a tenant API token\n' >&2
tenant_token=$(NUBABEL_DATABASE_URL="$NUBABEL_TEST_DATABASE_URL" target/debug/nubabel-callback-api \
  token create --organization org-schemathesis --namespace default --name schemathesis |
  grep -o 'nbt_[A-Za-z0-9_-]*' | head -1)
"$venv/bin/schemathesis" run docs/openapi.json --url "http://127.0.0.1:$port" \
  --include-tag delegate -H "Authorization: Bearer $tenant_token" "${common[@]}" || status=$?
printf '==> schemathesis: the admin listener\n' >&2
"$venv/bin/schemathesis" run docs/openapi.json --url "http://127.0.0.1:$admin_port" \
  --include-tag admin -H "Authorization: Bearer $admin_token" "${common[@]}" || status=$?
if grep -q 'request failed' "$log"; then
  printf '==> the callback API logged failed requests (%s):\n' "$log" >&2
  grep 'request failed' "$log" | head -20 >&2
  status=1
fi
exit "$status"
