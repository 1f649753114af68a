"""Measure which block's output retrieves best: one encoder pass fills the feature caches
of every candidate block, then the ordinary pipeline scores each (block, level) from cache.

    python scripts/sweep_layers.py --layers 3,5,7,9,11 --levels 0,3 model=dinov2_s_packaged
    (trailing arguments are Hydra overrides, as for main.py)

Prints a markdown table (mAP@1k, LocScore@0.4, LocScore average, R@1 per block and level);
each scored run leaves its folder under logs/sweep_layers/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402
from loguru import logger  # noqa: E402

from patchify.console import setup_logging  # noqa: E402
from patchify.extraction import FeatureStore, extract_missing  # noqa: E402
from patchify.model import load_model, with_layer  # noqa: E402
from patchify.data import load_dataset  # noqa: E402
from patchify.pipeline import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", required=True, help="comma-separated block indices (0-based)")
    parser.add_argument("--levels", default="0,3", help="pyramid levels to score (multi-scale pyramid)")
    parser.add_argument("--out", type=Path, default=Path("logs/sweep_layers"))
    args, overrides = parser.parse_known_args()
    layers = [int(v) for v in args.layers.split(",")]
    levels = [int(v) for v in args.levels.split(",")]
    setup_logging(None)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
        dataset = load_dataset(cfg.dataset)
        base = load_model(cfg.model, device=cfg.extract.device, precision=cfg.extract.precision)
        models = [with_layer(base, layer) for layer in layers]
        started = time.perf_counter()
        jobs = [(dataset.queries, [0], "bbox" if cfg.query.crop_to_bbox else "full", "queries")]
        jobs += [(dataset.gallery, list(range(max(levels) + 1)), "full", "gallery")]
        for records, job_levels, region, name in jobs:
            pairs = [(FeatureStore(Path(cfg.paths.features), cfg.model.name, m.fingerprint, level,
                                   cfg.pyramid.mode, region), m) for level in job_levels for m in models]
            for store, _ in pairs:
                store.open()
            extract_missing([s for s, _ in pairs], records, [m for _, m in pairs], batch_size=cfg.extract.batch_size,
                            num_workers=cfg.extract.num_workers, chunk_size=cfg.extract.chunk_size,
                            desc=f"{name} L{'-'.join(map(str, job_levels))}")
        extract_s = time.perf_counter() - started
        logger.info(f"one pass for {len(layers)} blocks took {extract_s:.1f} s")
        rows = []
        for layer in layers:
            for level in levels:
                run_cfg = compose(config_name="config", overrides=[*overrides, f"model.layer={layer}",
                                                                     f"pyramid.level={level}", "pyramid.multi_scale=pyramid"])
                metrics = run(run_cfg, args.out / f"layer{layer}_L{level}")
                rows.append((layer, level, metrics))
    print(f"\n{len(dataset.queries)} queries, {len(dataset.gallery)} gallery images; one extraction pass "
          f"for all blocks: {extract_s:.0f} s\n")
    print("| block | level | mAP@1k | LocScore@0.4 | LocScore avg | R@1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for layer, level, m in rows:
        print(f"| {layer} | L{level} | {m['mAP']:.2f} | {m['LocScore@0.4']:.2f} | {m['LocScore']:.2f} | {m['R@1']:.2f} |")


if __name__ == "__main__":
    main()
