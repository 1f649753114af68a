#!/usr/bin/env bash
# Pool mode vs crop mode at L3 (exact search) with the packaged DINOv2 on the mini-ILIAS:
# each pool setting (input size, split block) extracts into a fresh cache and is timed.
# Crop mode's row comes from scripts/table_mini.sh (same data, same model).
#   bash scripts/table_pool.sh [INSTANCES POSITIVES DISTRACTORS] [-- "SIZE SPLIT" ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
N=${1:-60}; P=${2:-4}; D=${3:-120}
SETTINGS=("448 2" "336 2" "224 2")
DATA="dataset.root=ilias/mini_${N}x${P}_${D} dataset.generate.instances=$N dataset.generate.positives_per_instance=$P dataset.generate.distractors=$D"
OUT=logs/table_pool_${N}x${P}_${D}
for setting in "${SETTINGS[@]}"; do
  read -r size split <<<"$setting"
  rm -rf "features/table_pool/${size}_b${split}"
  .venv/bin/python main.py model=dinov2_s_packaged $DATA pyramid.level=3 pyramid.mode=pool \
    pyramid.pool_image_size=$size pyramid.pool_split_block=$split extract.batch_size=4 \
    paths.features=features/table_pool/${size}_b${split} hydra.run.dir=$OUT/pool_${size}_b${split}
done
.venv/bin/python scripts/summarize.py --markdown $OUT/pool_*
