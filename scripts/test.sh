#!/usr/bin/env bash
# README command 2 (and CI): set up, then check formatting and lints and run every test.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KILN_ROOT"

scripts/setup.sh --no-build
KILN_SHAKESPEARE=$(scripts/fetch-shakespeare.sh)
export KILN_SHAKESPEARE

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "==> cargo test"
# Two tests at a time within each test binary: each libtorch process uses both cores.
cargo test --locked --workspace -- --test-threads 2
