"""Redraw the docs figures from their saved data, or check that the committed ones are current.

    python scripts/figures.py                 # redraw every docs/figures/*.json into its .svg
    python scripts/figures.py --check         # redraw into a temporary folder; exit 1 if any differs
    python scripts/figures.py docs/figures/scale_ap.json   # only these

Each JSON holds the rows a script measured and the commands that measured them
(``patchify.figures``); the SVG beside it is drawn from it, never edited by hand.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from patchify.figures import redraw  # noqa: E402


def stale(json_paths: list[Path]) -> list[str]:
    """One line per figure whose committed SVG is missing or differs from a redraw of its JSON."""
    problems = []
    with tempfile.TemporaryDirectory(prefix="patchify-figures-") as scratch:
        for path in json_paths:
            committed = path.with_suffix(".svg")
            fresh = redraw(path, Path(scratch))
            if not committed.is_file():
                problems.append(f"{committed}: missing; run python scripts/figures.py {path}")
            elif committed.read_bytes() != fresh.read_bytes():
                problems.append(f"{committed}: differs from a redraw of {path.name}; run python scripts/figures.py {path}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figures", nargs="*", type=Path, help="figure data files (default: docs/figures/*.json)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a committed figure is stale")
    args = parser.parse_args()
    paths = args.figures or sorted((ROOT / "docs" / "figures").glob("*.json"))
    if args.check:
        problems = stale(paths)
        print("\n".join(problems) or f"{len(paths)} figures up to date")
        sys.exit(1 if problems else 0)
    for path in paths:
        print(redraw(path))


if __name__ == "__main__":
    main()
