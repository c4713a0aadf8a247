#!/usr/bin/env bash
# Builds every binary of the workspace on its own, `cargo build -p <package> --bin <bin>`, the
# way each Dockerfile builds its image. A workspace build unifies the features of all members,
# so a binary that only builds next to the others (a dependency's feature turned on by some
# other member) passes there and fails here.
#
# Arguments are passed on to each `cargo build`, e.g. `scripts/build-each-binary.sh --release`.
set -euo pipefail

cd "$(dirname "$0")/.."

# "<package> <bin>" per line, from the workspace's own packages.
binaries=$(cargo metadata --format-version 1 --no-deps --locked | python3 -c '
import json, sys

metadata = json.load(sys.stdin)
members = set(metadata["workspace_members"])
for package in metadata["packages"]:
    if package["id"] not in members:
        continue
    for target in package["targets"]:
        if "bin" in target["kind"]:
            print(package["name"], target["name"])
')

if [[ -z "$binaries" ]]; then
  echo "build-each-binary: cargo metadata lists no binaries" >&2
  exit 1
fi

failed=()
while read -r package bin; do
  printf '==> cargo build -p %s --bin %s\n' "$package" "$bin" >&2
  if ! cargo build -p "$package" --bin "$bin" --locked "$@" </dev/null; then
    failed+=("$package/$bin")
  fi
done <<<"$binaries"

if ((${#failed[@]} > 0)); then
  printf 'build-each-binary: does not build on its own: %s\n' "${failed[@]}" >&2
  exit 1
fi
