#!/usr/bin/env bash
# Issue 20's GPU checks in one command: training it/s and peak memory (3d_fullres of Dataset001), the planner's
# memory estimate against torch.cuda.max_memory_allocated per architecture, predict seconds per case, and
# `pytest -m cuda`; one figures table at the end. nnU-Net rows need --nnunet-python PATH (else "not run").
#   scripts/gpu_check.sh                       # on a machine with a CUDA GPU (under 8 minutes)
#   scripts/gpu_check.sh --dry-run             # CPU, tiny phantom sizes: checks that the script still works
# Every option is passed to scripts/gpu_check.py (see its --help).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi
cd "$repo"
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$python" "$here/gpu_check.py" "$@"
