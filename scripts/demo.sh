#!/usr/bin/env bash
# The main job, end to end: plan -> train -> predict -> evaluate.
#   scripts/demo.sh                 on a synthetic phantom dataset that autoseg generates itself
#   scripts/demo.sh DATASET_DIR     on a dataset in the nnU-Net v2 raw layout
# Creates .venv on first use (CPU build of torch pinned). Work goes to demo_work/ (or $2 if given).
# Training length: DEMO_EPOCHS / DEMO_ITERS are read by this script only (autoseg itself never reads env vars).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
DATASET="${1:-}"
WORK="${2:-$ROOT/demo_work}"
EPOCHS="${DEMO_EPOCHS:-3}"
ITERS="${DEMO_ITERS:-12}"
CONFIG="${DEMO_CONFIG:-3d_fullres}"
if [ -z "$DATASET" ]; then
    DATASET="$WORK/phantom_dataset"
    if [ ! -f "$DATASET/dataset.json" ]; then
        rm -rf "$DATASET"
        autoseg phantom "$DATASET" --cases 10 --seed 0
    fi
fi
start=$(date +%s)
echo "== plan $DATASET"
autoseg plan "$DATASET" --workdir "$WORK/work" --workers 2
echo "== train $CONFIG fold 0 ($EPOCHS epochs x $ITERS iterations)"
fold_dir="$WORK/work/results/$CONFIG/fold_0"
resume=""
[ -f "$fold_dir/checkpoint_latest.pt" ] && resume="--resume"
autoseg train "$WORK/work" "$CONFIG" 0 --epochs "$EPOCHS" --iters-per-epoch "$ITERS" --val-iters 4 $resume
echo "== predict fold 0's validation cases from the raw images"
rm -rf "$WORK/val_images" "$WORK/predictions"
mkdir -p "$WORK/val_images"
python - "$WORK/work/splits.json" "$DATASET" "$WORK/val_images" <<'PY'
import json, os, sys
from pathlib import Path
splits, dataset, dest = json.load(open(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
for case in splits[0]["val"]:
    for f in sorted((dataset / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]*")):
        os.symlink(f.resolve(), dest / f.name)
PY
autoseg predict "$WORK/work" "$WORK/val_images" "$WORK/predictions" --config "$CONFIG" --folds 0
echo "== evaluate"
autoseg evaluate "$DATASET/labelsTr" "$WORK/predictions" --dataset-json "$DATASET/dataset.json" \
    --output "$WORK/evaluation/summary.json"
echo "demo finished in $(( $(date +%s) - start )) s (after set-up); results in $WORK"
