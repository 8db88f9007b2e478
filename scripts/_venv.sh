# Sourced by demo.sh and test.sh: create (once) and activate the project's virtual environment.
# The CPU build of torch is pinned here, for tests and the demo only; the package itself accepts any torch 2.x.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AUTOSEG_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[autoseg] creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.autoseg-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "[autoseg] installing dependencies (torch CPU build pinned for tests/demo)" >&2
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet "torch==2.13.0"
    python -m pip install --quiet -e "$ROOT[dev]"
    touch "$stamp"
fi
