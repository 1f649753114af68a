"""Print a metrics table for run folders (each holding metrics.json).

    python scripts/summarize.py logs/quickstart/L3 logs/quickstart/L0
    python scripts/summarize.py --latest 6 --markdown
    python scripts/summarize.py --rerank logs/table_rerank/*    # with the rerank stage's ms per query
    python scripts/summarize.py --scales --figure docs/figures/scale_ap.json logs/quickstart/patchify_L3 \
        logs/quickstart/global_L0   # AP per object-scale group; its rows saved as JSON and drawn beside it
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from patchify.console import metrics_table  # noqa: E402

COLUMNS = ("mAP", "LocScore@0.4", "LocScore", "R@1")


def run_command(run: Path) -> list[str]:
    """The command line that made ``run`` (its environment.json's argv), when recorded."""
    path = run / "environment.json"
    argv = json.loads(path.read_text()).get("argv") if path.is_file() else None
    return [shlex.join(["python", *argv])] if argv else []


def scale_table(runs: list[Path], rows: list[tuple[str, dict]], figure: Path | None) -> None:
    """Markdown table of each run's AP per ILIAS object-scale group (metrics.json's ``mAP_scale``);
    with ``figure``, the same rows saved as that JSON and drawn beside it (``patchify.figures``)."""
    from patchify.figures import SCALE_KEYS, scale_group_label, write_figure_data

    print("| run | mAP | " + " | ".join(f"AP, objects {scale_group_label(key)}" for key in SCALE_KEYS) + " |")
    print("|---|" + "---:|" * (len(SCALE_KEYS) + 1))
    for name, m in rows:
        scales = m.get("mAP_scale") or {}
        cells = " | ".join("-" if scales.get(key) is None else f"{scales[key]:.2f}" for key in SCALE_KEYS)
        print(f"| {name} | {m['mAP']:.2f} | {cells} |")
    if figure:
        commands = [command for run in runs for command in run_command(run)] + [shlex.join(["python", *sys.argv])]
        rows = [{"label": name, "mAP": m["mAP"], "mAP_scale": m.get("mAP_scale")} for name, m in rows]
        print(f"\nfigure: {write_figure_data(figure, 'scale_ap', rows, commands, title='AP per object scale')}")


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
    parser.add_argument("--scales", action="store_true",
                        help="markdown table of AP per ILIAS object-scale group (object area / image area)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="with --scales: also save the rows as this JSON and draw its SVG beside it")
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
    if args.scales:
        scale_table(runs, rows, args.figure)
        return
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
