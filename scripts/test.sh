#!/usr/bin/env bash
# Run autoseg's test suite. On a fresh clone this creates .venv (CPU build of torch pinned), installs
# autoseg with its dev extras, then runs pytest. Extra arguments go to pytest (e.g. -m slow, -k plan).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
python -m pytest -q "$@"
