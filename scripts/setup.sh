#!/usr/bin/env bash
# Create .venv (once) and install the project into it (editable, so the checkout is the code that runs),
# at the exact versions of constraints.txt.
#   bash scripts/setup.sh          # the patchify package and command
#   bash scripts/setup.sh test     # + what the tests need (extras are named in pyproject.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt -e ".${extras:+[$extras]}"
