#!/usr/bin/env bash
# Paper table (SigLIP on ILIAS core): L0..L3 exact, then L3 IVF-PQ (m=64, nlist=8192, nbits=8,
# nprobe=8192) trained on L1 patches vs on the indexed patches themselves.
# Needs the real ILIAS core under ilias/ (see ilias/README.md) and SigLIP weights from the hub
# (or HF_HUB_OFFLINE=1 with a filled cache, or model.checkpoint=FILE). Extra args go to main.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for row in siglip_l0 siglip_l1 siglip_l2 siglip_l3 siglip_l3_ivfpq_train1 siglip_l3_ivfpq_self; do
  .venv/bin/python main.py experiment=$row hydra.run.dir=logs/table_siglip/$row "$@"
done
.venv/bin/python scripts/summarize.py logs/table_siglip/*
