#!/usr/bin/env bash
# Revisited Oxford and Paris (Radenovic et al., CVPR 2018): global L0 vs Patchify L3 for SigLIP, DINOv2 and CLIP,
# one run per row, scored with the revisited protocol (Easy / Medium / Hard mAP over the full ranking, queries
# cropped to their box; docs/METRICS.md). Needs revisitop's layout (gnd_<dataset>.pkl and jpg/) under
# data/roxford5k and data/rparis6k (or ROXFORD=DIR, RPARIS=DIR; README "Benchmarks") and hub weights.
# Extra args go to main.py (e.g. dataset.distractors=DIR for +R1M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rows=(siglip_l0 siglip_l3 dinov2_l0 dinov2_l3 clip_l0 clip_l3)
for dataset in roxford5k rparis6k; do
  if [ "$dataset" = roxford5k ]; then root=${ROXFORD:-data/roxford5k}; else root=${RPARIS:-data/rparis6k}; fi
  for row in "${rows[@]}"; do
    .venv/bin/python main.py experiment=$row dataset=$dataset dataset.root="$root" \
      hydra.run.dir=logs/table_revisited/$dataset.$row "$@"
  done
done
# one markdown line per run: mAP and mP@10 of each setup, from its metrics.json
.venv/bin/python - logs/table_revisited/* <<'PY'
import json, sys
from pathlib import Path
print("| run | E mAP | M mAP | H mAP | E mP@10 | M mP@10 | H mP@10 |")
print("|---|---:|---:|---:|---:|---:|---:|")
for run in map(Path, sys.argv[1:]):
    setups = json.loads((run / "metrics.json").read_text())["revisited"]
    cells = [setups[s][key] for key in ("mAP", "mP@10") for s in ("easy", "medium", "hard")]
    print(f"| {run.name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |")
PY
