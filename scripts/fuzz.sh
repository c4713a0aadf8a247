#!/usr/bin/env bash
# Runs the cargo-fuzz targets (fuzz/, docs/fuzzing.md) for SECONDS each, one after another.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     # default: 300 s, every target
#
# Needs a nightly toolchain (`rustup toolchain install nightly`); installs cargo-fuzz from
# crates.io when it is missing. Each target starts from its seeds (fuzz/seeds/<target>) and
# the corpus earlier runs grew (fuzz/corpus/<target>, not committed); a crash stops the script
# with the input in fuzz/artifacts/<target>/. Logs with libFuzzer's final figures go to
# fuzz/logs/<target>.log. Fuzzing takes a whole core per target: on a shared machine, run it
# under the build lock (`flock /tmp/nubabel-cargo.lock scripts/fuzz.sh`).
set -euo pipefail

seconds="${1:-300}"
shift || true
cd "$(dirname "$0")/../fuzz"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(signature_headers last_event_id slack_request mcp_message bridge_mapping)
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz.sh: needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

# Debug assertions on, so integer overflow is a crash, as in a debug build of the service.
flags=(--debug-assertions)
cargo +nightly fuzz build "${flags[@]}"
mkdir -p logs
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  echo "== $target: ${seconds}s"
  status=0
  cargo +nightly fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 -max_len=8192 >"logs/$target.log" 2>&1 ||
    status=$?
  grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)|panicked' \
    "logs/$target.log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "logs/$target.log" >&2
    echo "fuzz.sh: $target failed; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
