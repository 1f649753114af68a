#!/usr/bin/env bash
# Pool mode vs crop mode at L3 (exact search) with the packaged DINOv2 on the mini-ILIAS:
# each pool setting (input size, method, split block; cell positions at their default)
# extracts into a fresh cache. Crop mode's row comes from scripts/table_mini.sh (same data,
# same model). Speed ratios measured in one process: benchmarks/extraction_throughput.py.
#   bash scripts/table_pool.sh [INSTANCES POSITIVES DISTRACTORS] [-- "SIZE METHOD SPLIT" ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
N=${1:-60}; P=${2:-4}; D=${3:-120}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
SETTINGS=("$@")
[ ${#SETTINGS[@]} -gt 0 ] || SETTINGS=("448 split 2" "448 split 1" "448 split 4" "336 split 2"
                                      "448 masked 0" "336 masked 0" "224 masked 0")
DATA="dataset.root=ilias/mini_${N}x${P}_${D} dataset.generate.instances=$N dataset.generate.positives_per_instance=$P dataset.generate.distractors=$D"
OUT=logs/table_pool_${N}x${P}_${D}
for setting in "${SETTINGS[@]}"; do
  read -r size method split <<<"$setting"
  name=${size}_${method}_b${split}
  rm -rf "features/table_pool/$name"
  .venv/bin/python main.py model=dinov2_s_packaged $DATA pyramid.level=3 pyramid.mode=pool \
    pyramid.pool_image_size=$size pyramid.pool_method=$method pyramid.pool_split_block=$split \
    paths.features=features/table_pool/$name hydra.run.dir=$OUT/pool_$name
done
.venv/bin/python scripts/summarize.py --markdown $OUT/pool_*
