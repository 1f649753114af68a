#!/usr/bin/env bash
# Re-ranking of the top N (src/patchify/rerank.py) on the mini-ILIAS with the packaged DINOv2, L3 exact:
# rerank = none | refine | verify | both, N = 10 and 100, one run per row. The first run fills the
# patch-feature cache; refine's window descriptors and verify's XFeat features are cached too, so
# a row's "ms/query" is the cost on a cold rerank cache only for the first row that needs them
# (the script runs N=10 before N=100 and refine before both; see docs/RESULTS.md).
#   bash scripts/table_rerank.sh [INSTANCES POSITIVES DISTRACTORS] [extra overrides...]   (default 30 4 60)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
N=${1:-30}; P=${2:-4}; D=${3:-60}; shift $(( $# < 3 ? $# : 3 ))
DATA="dataset.root=ilias/mini_${N}x${P}_${D} dataset.generate.instances=$N dataset.generate.positives_per_instance=$P dataset.generate.distractors=$D"
OUT=logs/table_rerank_${N}x${P}_${D}
for top in 10 100; do
  for stage in none verify refine both; do
    .venv/bin/python main.py model=dinov2_s_packaged $DATA pyramid.level=3 rerank=$stage rerank.top_n=$top "$@" \
      hydra.run.dir=$OUT/${stage}_N$top
  done
done
.venv/bin/python scripts/summarize.py --rerank $OUT/{none,refine,verify,both}_N10 $OUT/{none,refine,verify,both}_N100
