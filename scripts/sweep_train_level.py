"""Which patches should train IVF-PQ's quantisers: the paper's L1 cells, or the indexed levels themselves?

The paper trains on L1 features and reports that this beats training on the indexed levels; on the
mini-ILIAS the project found the opposite, with the L1 sample 4x smaller. This script compares the two at
*equal* training-sample sizes: for each size N and seed, one index is trained on N vectors drawn from L1
and one on N drawn from the indexed levels (L0..L3), both index the same L0..L3 patches and are searched
exhaustively (nprobe = nlist), so the training data is the only difference. Sizes default to the L1 set's
own size and half of it; ``nlist`` and ``2**nbits`` are chosen so that every k-means has at least 39
vectors per centroid (FAISS's own advice) at the smallest size.

    python scripts/sweep_train_level.py --seeds 0,1,2,3,4 [--json out.json] [Hydra overrides ...]
    python scripts/sweep_train_level.py dataset.root=ilias/mini_photo_60x4_120 dataset.generate.objects=photo \\
        dataset.generate.instances=60 dataset.generate.positives_per_instance=4 dataset.generate.distractors=120

Features come from the run's cache (extracted first if missing, as ``task=eval`` does). Prints one markdown
row per (size, training levels): mAP@1k and LocScore@0.4, mean and standard deviation over the seeds, and
the flat (exact) index's figures for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402

from patchify import index as faiss_index  # noqa: E402
from patchify.console import setup_logging  # noqa: E402
from patchify.data import load_dataset  # noqa: E402
from patchify.features import make_feature_source  # noqa: E402
from patchify.index import IndexSpec  # noqa: E402
from patchify.indexing import training_sample  # noqa: E402
from patchify.metrics import evaluate  # noqa: E402
from patchify.search import search_images  # noqa: E402
from patchify.tasks.evaluate import query_region, query_results  # noqa: E402

INDEXED = [0, 1, 2, 3]
MIN_PER_CENTROID = 39


def score(index, queries, gallery_feats, dataset, k: int) -> tuple[float, float]:
    """(mAP@k, LocScore@0.4) of image-level search over ``index``."""
    hits = search_images(index, queries.vectors, gallery_feats.image, k, metric="IP")
    metrics = evaluate(query_results(dataset, hits, gallery_feats), k=k, iou_thresholds=(0.4,),
                       metrics=("map", "locscore"))
    return metrics["mAP"], metrics["LocScore@0.4"]  # percent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--sizes", default=None, help="training-sample sizes (default: |L1| and |L1|/2)")
    parser.add_argument("--m", type=int, default=32, help="PQ sub-quantisers (d / m dims each)")
    parser.add_argument("--json", type=Path, default=None)
    args, overrides = parser.parse_known_args()
    setup_logging(None)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    dataset = load_dataset(cfg.dataset)
    source = make_feature_source(cfg)
    queries = source.queries(dataset.queries, region=query_region(cfg))
    gallery = source.features(dataset.gallery, INDEXED, desc="gallery")
    level_one = gallery.vectors[gallery.level == 1]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [len(level_one), len(level_one) // 2]
    smallest = min(sizes)
    # the largest power-of-two codebooks that keep >= 39 vectors per centroid at the smallest size
    nlist = 2 ** int(np.log2(smallest / MIN_PER_CENTROID))
    nbits = min(8, int(np.log2(smallest / MIN_PER_CENTROID)))
    spec = IndexSpec(kind="ivfpq", m=args.m, nlist=nlist, nbits=nbits, nprobe=nlist, metric="IP")
    k = int(cfg.eval.k)
    exact = faiss_index.create_index(IndexSpec(kind="flat", metric="IP"), gallery.dim)
    exact.add(gallery.vectors)
    flat_map, flat_loc = score(exact, queries, gallery, dataset, k)
    print(f"\n{dataset.name}: {len(dataset.gallery)} images, {len(gallery.vectors):,} indexed patches (L0-L3), "
          f"{len(level_one):,} L1 patches; {spec.factory_string(gallery.dim)}, nprobe {nlist}; "
          f"flat: mAP {flat_map:.2f}, LocScore@0.4 {flat_loc:.2f}")
    rows = []
    cases = [(size, name, pool) for size in sizes
             for name, pool in (("L1", level_one), ("L0-L3 (indexed)", gallery.vectors))]
    cases.append((len(gallery.vectors), "L0-L3 (indexed), all", gallery.vectors))  # the unequal comparison
    for size, name, pool in cases:
        runs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            train = training_sample(pool, size, seed)
            index = faiss_index.create_index(spec, gallery.dim)
            faiss_index.train_index(index, train, spec, seed=seed)
            faiss_index.add_vectors(index, gallery.vectors, 0)
            faiss_index.set_search_params(index, spec)
            runs.append(score(index, queries, gallery, dataset, k))
        maps, locs = [r[0] for r in runs], [r[1] for r in runs]
        rows.append({"dataset": dataset.name, "size": size, "train": name, "factory": spec.factory_string(gallery.dim),
                     "mAP": maps, "LocScore@0.4": locs, "flat_mAP": flat_map, "flat_LocScore@0.4": flat_loc})
    print("\n| training sample | trained on | mAP@1k (mean ± sd) | LocScore@0.4 (mean ± sd) | runs |")
    print("|---:|---|---:|---:|---:|")
    for row in rows:
        m, loc = row["mAP"], row["LocScore@0.4"]
        sd = statistics.stdev if len(m) > 1 else (lambda _: 0.0)
        print(f"| {row['size']:,} | {row['train']} | {statistics.mean(m):.2f} ± {sd(m):.2f} | "
              f"{statistics.mean(loc):.2f} ± {sd(loc):.2f} | {len(m)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
