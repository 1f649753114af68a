#!/usr/bin/env bash
# Paper table (global L0 -> Patchify L3 per backbone on ILIAS core): DINOv2 and CLIP rows
# (SigLIP's are in table_siglip_ilias.sh). Needs ILIAS under ilias/ and hub weights.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for row in dinov2_l0 dinov2_l3 clip_l0 clip_l3; do
  .venv/bin/python main.py experiment=$row hydra.run.dir=logs/table_backbones/$row "$@"
done
.venv/bin/python scripts/summarize.py logs/table_backbones/*
