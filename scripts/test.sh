#!/usr/bin/env bash
# Run autoseg's test suite. On a fresh clone this creates .venv (CPU build of torch pinned), installs
# autoseg with its dev extras, then runs pytest. Extra arguments go to pytest (e.g. -m slow, -k plan).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
# One process per core (at most 4), one thread each: the tests' networks are small, so a second intra-op thread
# per process costs more in synchronisation than it gains (on the 2-core development machine the suite took
# 22.5 min in one process of 2 threads). Subprocesses that the tests start (the CLI, torchrun) inherit it.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
python -m pytest -q --numprocesses=auto --maxprocesses=4 --dist worksteal "$@"
