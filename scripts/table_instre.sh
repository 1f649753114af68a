#!/usr/bin/env bash
# Paper table (global L0 -> Patchify L3 per backbone on INSTRE): DINOv2 and CLIP rows, one run each, scored
# with INSTRE's protocol (revisited AP over the full ranking, queries cropped to their box; docs/METRICS.md).
# Needs INSTRE with Iscen et al.'s gnd_instre.mat under data/instre (or INSTRE=DIR; README "Benchmarks") and hub
# weights (or HF_HUB_OFFLINE=1 with a filled cache). Extra args go to main.py. Paper (secondary quotation,
# ../shared/SPEC.md section 6): DINOv2 57.70 -> 72.54, CLIP 73.84 -> 87.57.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh benchmarks    # scipy reads the .mat ground truth
for row in dinov2_l0 dinov2_l3 clip_l0 clip_l3; do
  .venv/bin/python main.py experiment=$row dataset=instre dataset.root="${INSTRE:-data/instre}" \
    hydra.run.dir=logs/table_instre/$row "$@"
done
.venv/bin/python scripts/summarize.py logs/table_instre/*
