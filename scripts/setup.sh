#!/usr/bin/env bash
# Create .venv (once) and install the project's requirements into it.
#   bash scripts/setup.sh                     # runtime
#   bash scripts/setup.sh requirements-dev.txt  # runtime + tests
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${1:-requirements.txt}
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --disable-pip-version-check -q -r "$requirements"
