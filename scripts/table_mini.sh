#!/usr/bin/env bash
# Mini-ILIAS tables with the packaged backbones (runs on CPU, no hub): for each backbone,
# L3 exact first (it extracts every level into a fresh cache and times each), then L0..L2
# exact (from cache), then L3 IVF-PQ trained on L1 patches vs on the indexed patches.
#   bash scripts/table_mini.sh [INSTANCES POSITIVES DISTRACTORS]   (default 60 4 120)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
N=${1:-60}; P=${2:-4}; D=${3:-120}
DATA="dataset.root=ilias/mini_${N}x${P}_${D} dataset.generate.instances=$N dataset.generate.positives_per_instance=$P dataset.generate.distractors=$D"
OUT=logs/table_mini_${N}x${P}_${D}
for model in dinov2_s_packaged efficientnet_lite0; do
  rm -rf "features/table_mini/$model"
  COMMON="model=$model $DATA paths.features=features/table_mini/$model paths.indices=faiss_indices/table_mini"
  for level in 3 0 1 2; do
    .venv/bin/python main.py $COMMON pyramid.level=$level hydra.run.dir=$OUT/$model/L$level
  done
  # IVF-PQ: 64 one-byte codes per patch (m=64 divides 384 and 1280); nlist sized for the L1 sample.
  for train in 1 -1; do
    .venv/bin/python main.py $COMMON pyramid.level=3 index=ivfpq index.m=64 index.nbits=8 index.nlist=32 \
      index.nprobe=32 index.train_level=$train hydra.run.dir=$OUT/$model/L3_ivfpq_train$train
  done
  .venv/bin/python scripts/summarize.py --markdown --stage-times $OUT/$model/L3 \
    $OUT/$model/L0 $OUT/$model/L1 $OUT/$model/L2 $OUT/$model/L3 $OUT/$model/L3_ivfpq_train1 $OUT/$model/L3_ivfpq_train-1
done
