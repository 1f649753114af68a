"""Print a metrics table for run folders (each holding metrics.json).

    python scripts/summarize.py logs/quickstart/L3 logs/quickstart/L0
    python scripts/summarize.py --latest 6 --markdown
    python scripts/summarize.py --rerank logs/table_rerank/*    # with the rerank stage's ms per query
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from patchify.console import metrics_table  # noqa: E402

COLUMNS = ("mAP", "LocScore@0.4", "LocScore", "R@1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run folders")
    parser.add_argument("--latest", type=int, default=0, help="the N most recent run folders under --logs")
    parser.add_argument("--logs", type=Path, default=Path("logs"))
    parser.add_argument("--markdown", action="store_true", help="markdown table with extraction time")
    parser.add_argument("--stage-times", type=Path, default=None,
                        help="run folder whose per-stage extraction times (a run that extracted every level "
                             "from an empty cache) give each row's extraction time: queries + its levels")
    parser.add_argument("--rerank", action="store_true",
                        help="markdown table with the rerank stage's milliseconds per query instead of extraction time")
    args = parser.parse_args()
    runs = list(args.runs)
    if args.latest:
        found = sorted((p.parent for p in args.logs.rglob("metrics.json")), key=lambda p: p.stat().st_mtime)
        runs += found[-args.latest:]
    rows = []
    for run in runs:
        path = run / "metrics.json"
        if not path.is_file():
            sys.exit(f"error: {path}: no metrics.json (did the run finish?)")
        rows.append((run.name, json.loads(path.read_text())))
    if args.rerank:
        print("| run | " + " | ".join(COLUMNS) + " | refine ms/query | verify ms/query |")
        print("|---|" + "---:|" * (len(COLUMNS) + 2))
        for name, m in rows:
            timing = m.get("timing", {})
            times = " | ".join(str(timing.get(f"{stage}_ms_per_query", "-")) for stage in ("refine", "verify"))
            print(f"| {name} | " + " | ".join(f"{m[c]:.2f}" for c in COLUMNS) + f" | {times} |")
        return
    if not args.markdown:
        print(metrics_table(rows))
        return
    stages = None
    if args.stage_times:
        stages = json.loads((args.stage_times / "metrics.json").read_text())["timing"]["extract_s_by_stage"]
    print("| run | " + " | ".join(COLUMNS) + " | extraction s |")
    print("|---|" + "---:|" * (len(COLUMNS) + 1))
    for name, m in rows:
        cells = " | ".join(f"{m[c]:.2f}" if c in m else "-" for c in COLUMNS)
        seconds = m.get("timing", {}).get("extract_s", "-")
        if stages is not None:
            wanted = ["queries L0", *(f"gallery L{level}" for level in m["counts"]["levels"])]
            seconds = round(sum(stages[w] for w in wanted), 1)
        print(f"| {name} | {cells} | {seconds} |")


if __name__ == "__main__":
    main()
