"""Patchify from a source checkout: ``python main.py ...`` is the ``patchify`` command (src/patchify/cli.py).

    python main.py                                   # mini-ILIAS, packaged DINOv2-S, L3, exact
    python main.py pyramid.level=0 index=ivfpq       # Hydra overrides
    python main.py --model_name dinov2 --pq ivfpq    # the paper's reference flags
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works before `pip install -e .` too

from patchify.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
