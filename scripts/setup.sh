#!/usr/bin/env bash
# Prepares a fresh machine for Kiln: a Python virtual environment in .venv/ holding the pinned
# torch (libtorch for the tch crate) and the packages the tests use, then a build of the
# `kiln` binary. Safe to run again: each step is skipped when it is already done.
#
#   scripts/setup.sh            set up and build the release binary
#   scripts/setup.sh --no-build set up only
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KILN_ROOT"

build=1
[ "${1:-}" = "--no-build" ] && build=0

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null; then
  echo "error: $python not found; Kiln's setup needs Python 3.10 or newer with venv" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "error: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi

stamp=.venv/.kiln-requirements
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$python" -m venv .venv
fi
if ! cmp -s requirements.txt "$stamp"; then
  echo "==> installing Python packages (torch is ~5 GB; about a minute on a fast link)"
  .venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
  .venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
  cp requirements.txt "$stamp"
fi

if [ "$build" = 1 ]; then
  echo "==> building kiln (release)"
  cargo build --release --locked --bin kiln
fi
