# Sourced by Kiln's scripts: puts the repository's virtual environment first on PATH so the
# tch build finds libtorch inside the pinned torch wheel.
KILN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KILN_ROOT
export PATH="$KILN_ROOT/.venv/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
