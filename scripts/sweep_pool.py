"""Score pool-mode variants: one pooled pass per gallery image describes every pyramid cell
at several output blocks at once; queries are described whole at one or more input sizes.

    python scripts/sweep_pool.py --size 448 --method masked --split 0 --layers 8,9,10 --query-sizes 224
    (trailing arguments are Hydra overrides, as for main.py: model=..., dataset.root=...)

Uncached on purpose (each variant is a few minutes on the mini-ILIAS); exact search, L0..L3.
``--l0-whole``: L0 is not a cell of the pooled pass but the whole image at the model's own input
size (as crop mode and the queries describe it); the pooled pass describes L1..L3 only.
Prints the gallery time and one markdown row per (block, query size); ``--json PATH`` also saves the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402

from patchify.console import setup_logging  # noqa: E402
from patchify.extraction import PatchFeatures, _WholeImageDataset, token_cells  # noqa: E402
from patchify.pool_cells import describe_cells  # noqa: E402
from patchify.metrics import evaluate, resolve_iou_thresholds  # noqa: E402
from patchify.model import load_model  # noqa: E402
from patchify.features import at_input_size  # noqa: E402
from patchify.data import load_dataset  # noqa: E402
from patchify.tasks.evaluate import query_results  # noqa: E402
from patchify.search import search_images  # noqa: E402

LEVELS = [0, 1, 2, 3]


def pooled_gallery(model, records, cells, split: int, method: str, layers: list[int], batch_size: int,
                   cell_pos: str | None = None):
    """Per layer (n_images * n_cells, d) vectors; the (image, box) of every row."""
    rows, cols = model.encoder.backbone.patch_embed.grid_size
    data = _WholeImageDataset(records, model.transform)
    vectors: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    image, boxes, batch = [], [], []

    def flush() -> None:
        if batch:
            for layer, out in zip(layers, describe_cells(model.encoder, torch.stack(batch), cells, split, method, layers,
                                                                                   cell_pos)):
                vectors[layer].append(out.reshape(-1, out.shape[-1]).numpy())
            batch.clear()

    for i in range(len(data)):
        tensor, (w, h), error = data[i]
        if error:
            raise SystemExit(error)
        batch.append(tensor)
        for r0, r1, c0, c1 in cells:
            boxes.append((c0 * w / cols, r0 * h / rows, (c1 - c0) * w / cols, (r1 - r0) * h / rows))
            image.append(i)
        if len(batch) == batch_size:
            flush()
    flush()
    return ({layer: np.concatenate(v) for layer, v in vectors.items()},
            np.asarray(image, np.int64), np.asarray(boxes, np.float32))


def whole_images(model, records, layers: list[int], batch_size: int):
    """Per layer (n_images, d) descriptors of each whole image at ``model``'s input size (queries,
    and L0 as crop mode describes it with ``--l0-whole``); the image index and box of every row."""
    data = _WholeImageDataset(records, model.transform)
    vectors: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    sizes = []
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        if errors := [error for _, _, error in items if error]:
            raise SystemExit(errors[0])
        sizes += [size for _, size, _ in items]
        batch = torch.stack([tensor for tensor, _, _ in items]).to(model.device)
        for layer, out in zip(layers, model.encoder(batch, layers)):
            vectors[layer].append(out.float().cpu().numpy())
    boxes = np.asarray([(0, 0, w, h) for w, h in sizes], np.float32)
    return {layer: np.concatenate(v) for layer, v in vectors.items()}, np.arange(len(records)), boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=448, help="gallery input size (pyramid.pool_image_size)")
    parser.add_argument("--method", default="split", choices=["split", "masked"])
    parser.add_argument("--split", type=int, default=2, help="pyramid.pool_split_block")
    parser.add_argument("--cell-pos", default=None, choices=["local", "global"],
                        help="pyramid.pool_cell_pos (default: local for split, global for masked)")
    parser.add_argument("--layers", default="8,9,10")
    parser.add_argument("--query-sizes", default="224")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--l0-whole", action="store_true",
                        help="L0 from a whole-image pass at the model's own size, not from the pooled pass")
    parser.add_argument("--json", type=Path, default=None, help="also save the rows as this JSON file")
    args, overrides = parser.parse_known_args()
    layers = [int(v) for v in args.layers.split(",")]
    setup_logging(None)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    dataset = load_dataset(cfg.dataset)
    model = load_model(at_input_size(cfg.model, args.size), device=cfg.extract.device, precision=cfg.extract.precision)
    rows, cols = model.encoder.backbone.patch_embed.grid_size
    by_level = token_cells(rows, cols, LEVELS)
    pooled_levels = LEVELS[1:] if args.l0_whole else LEVELS
    cells = [cell for level in pooled_levels for cell in by_level[level]]
    started = time.perf_counter()
    gallery, image, boxes = pooled_gallery(model, dataset.gallery, cells, args.split, args.method, layers,
                                           args.batch_size, args.cell_pos)
    if args.l0_whole:
        whole, whole_image, whole_boxes = whole_images(load_model(cfg.model, device=cfg.extract.device,
                                                                  precision=cfg.extract.precision),
                                                       dataset.gallery, layers, args.batch_size)
        gallery = {layer: np.concatenate([whole[layer], gallery[layer]]) for layer in layers}
        image, boxes = np.concatenate([whole_image, image]), np.concatenate([whole_boxes, boxes])
    seconds = time.perf_counter() - started
    print(f"\n{len(dataset.gallery)} gallery images at {args.size} px, {args.method} from block {args.split}, "
          f"cell positions {args.cell_pos or 'default'}{', L0 whole at the model size' if args.l0_whole else ''}: "
          f"{seconds:.1f} s\n")
    print("| method | size | split | block | query px | mAP@1k | LocScore@0.4 | LocScore avg | R@1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for query_size in (int(v) for v in args.query_sizes.split(",")):
        query_model = load_model(at_input_size(cfg.model, query_size), device=cfg.extract.device, precision=cfg.extract.precision)
        queries = whole_images(query_model, dataset.queries, layers, args.batch_size)[0]
        for layer in layers:
            index = faiss.IndexFlatIP(gallery[layer].shape[1])
            index.add(gallery[layer])
            hits = search_images(index, queries[layer], image, int(cfg.eval.k), metric="IP")
            patches = PatchFeatures(gallery[layer], image, boxes, np.zeros(len(image), np.int8))
            m = evaluate(query_results(dataset, hits, patches), k=int(cfg.eval.k),
                         iou_thresholds=resolve_iou_thresholds(cfg.eval.iou_threshold))
            print(f"| {args.method} | {args.size} | {args.split} | {layer} | {query_size} | {m['mAP']:.2f} | "
                  f"{m['LocScore@0.4']:.2f} | {m['LocScore']:.2f} | {m['R@1']:.2f} |")
            rows.append({"setting": f"pool:{args.size}:{args.method}:{args.split}", "l0": "whole" if args.l0_whole else "pooled",
                         "cell_pos": args.cell_pos, "block": layer, "query_px": query_size, "gallery_s": seconds,
                         **{key: m[key] for key in ("mAP", "LocScore@0.4", "LocScore", "R@1", "mAP_scale") if key in m}})
    if args.json:
        args.json.write_text(json.dumps({"precision": model.precision, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
