#!/usr/bin/env bash
# README command 1: install, generate the mini-ILIAS, run Patchify L3 and the global L0
# baseline with the packaged DINOv2 ViT-S/14, and print mAP@1k / LocScore / R@1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
$PY main.py pyramid.level=3 hydra.run.dir=logs/quickstart/patchify_L3 "$@"
$PY main.py pyramid.level=0 hydra.run.dir=logs/quickstart/global_L0 "$@"
echo
$PY scripts/summarize.py logs/quickstart/patchify_L3 logs/quickstart/global_L0
