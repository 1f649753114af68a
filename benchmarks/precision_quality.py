"""Reduced-precision descriptors against fp32 (prints figures, not a test).

Two measurements, both on real images with the configured model (default: the packaged
DINOv2 ViT-S/14, 224 px, block 10):

``variants``: the pyramid crops (levels 0..L, PIL crop + timm transform) of the first
``--images`` gallery images of the configured dataset (default: the mini-ILIAS), encoded by
every way of running the encoder at reduced precision that ``extract.precision`` could use,
in one process on the same crops: fp32; ``extract.precision=bf16`` as ``load_model`` builds it
(the model cast to bf16, attention unfused on CPU); the cast model with PyTorch's fused
attention kernel; bf16 by ``torch.autocast`` (matmuls, convolutions and attention in bf16,
norms, softmax and the residual stream in fp32); int8 by dynamic quantisation of the Linear
layers (``torch.ao.quantization.quantize_dynamic``, activations quantised per batch) alone
and with the rest under bf16 autocast. Prints crops/s, speed-up over fp32 and the minimum /
mean cosine of each variant's descriptors to fp32's::

    python benchmarks/precision_quality.py variants [Hydra overrides ...] --images 8 --batch-size 16

``caches``: the minimum / mean / quantiles of the cosine between two feature caches'
descriptors of the same images, patch by patch (e.g. the caches of a full fp32 and a full
bf16 run of ``python main.py extract.precision=...``), for every store of the same mode,
level and region present in both roots::

    python benchmarks/precision_quality.py caches FEATURES_FP32 FEATURES_BF16 [Hydra overrides ...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402

from patchify.console import setup_logging  # noqa: E402
from patchify.data import load_image  # noqa: E402
from patchify.data import load_dataset  # noqa: E402
from patchify.pyramid import level_boxes, levels_for  # noqa: E402


def _config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _crops(records, levels, transform) -> torch.Tensor:
    """Every pyramid crop of ``records``, preprocessed by the model's own transform."""
    crops = []
    for record in records:
        image = load_image(record.path)
        for level in levels:
            for x, y, w, h in level_boxes(*image.size, level).tolist():
                crops.append(transform(image.crop((x, y, x + w, y + h))))
    return torch.stack(crops)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def variants(args, overrides: list[str]) -> None:
    from patchify.model import load_model

    cfg = _config(["extract.precision=fp32", *overrides])
    model = load_model(cfg.model, device="cpu", precision="fp32")
    records = load_dataset(cfg.dataset).gallery[:args.images]
    levels = levels_for(int(cfg.pyramid.level), cfg.pyramid.multi_scale)
    crops = _crops(records, levels, model.transform)
    encoder = model.encoder
    setting = load_model(cfg.model, device="cpu", precision="bf16").encoder
    cast = copy.deepcopy(encoder).to(torch.bfloat16)  # attention left fused
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder), {torch.nn.Linear}, dtype=torch.qint8)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    runs = {  # name -> (encoder, input dtype, context)
        "fp32": (encoder, torch.float32, contextlib.nullcontext),
        "bf16 (extract.precision=bf16)": (setting, torch.float32, contextlib.nullcontext),
        "bf16 cast model, fused attention": (cast, torch.bfloat16, contextlib.nullcontext),
        "bf16 autocast": (encoder, torch.float32, autocast),
        "int8 dynamic (Linear)": (quantized, torch.float32, contextlib.nullcontext),
        "int8 dynamic + bf16 autocast": (quantized, torch.float32, autocast),
    }
    results = {}
    failed = {}
    for name, (net, dtype, context) in runs.items():
        try:
            with context():
                net(crops[:args.batch_size].to(dtype))  # warm-up (oneDNN primitive creation)
                started = time.perf_counter()
                out = [net(crops[i:i + args.batch_size].to(dtype))[0].float()
                       for i in range(0, len(crops), args.batch_size)]
                seconds = time.perf_counter() - started
        except RuntimeError as err:  # e.g. the quantised Linear refuses autocast's bf16 inputs
            failed[name] = str(err).splitlines()[0]
            continue
        results[name] = (torch.cat(out).numpy(), seconds)
    reference, base_seconds = results["fp32"]
    print(f"\n{model.fingerprint['weights']} layer {cfg.model.layer} pool {cfg.model.pool}, {model.input_size}px; "
          f"{len(crops)} crops (levels {levels}) of {len(records)} gallery images of {cfg.dataset.name}; "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| variant | crops/s | vs fp32 | cosine to fp32 min | mean | p01 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (vectors, seconds) in results.items():
        cos = _cosines(reference, vectors)
        print(f"| {name} | {len(crops) / seconds:.1f} | {base_seconds / seconds:.2f}x | {cos.min():.5f} | "
              f"{cos.mean():.5f} | {np.quantile(cos, 0.01):.5f} |")
    for name, error in failed.items():
        print(f"| {name} | fails: {error} | | | | |")


def _stores(root: Path) -> dict[tuple, Path]:
    """(model name, mode, level, region) -> store folder, for every store under ``root``."""
    found = {}
    for meta in sorted(root.glob("*/meta.json")):
        fingerprint = json.loads(meta.read_text())
        if not isinstance(fingerprint, dict) or "model" not in fingerprint:
            continue
        name = meta.parent.name.split(".", 1)[0]
        found[(name, fingerprint["mode"], fingerprint["level"], fingerprint["region"])] = (meta.parent, fingerprint)
    return found


def caches(args, overrides: list[str]) -> None:
    from patchify.extraction import FeatureStore

    cfg = _config(overrides)
    dataset = load_dataset(cfg.dataset)
    first, second = _stores(Path(args.first)), _stores(Path(args.second))
    print(f"\n{args.first} vs {args.second}, dataset {cfg.dataset.name}\n")
    print("| store (mode, level, region) | precisions | images | patches | cosine min | mean | p0.1 | p1 "
          "| images with a patch < 0.99 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    everything = []
    for key in sorted(set(first) & set(second), key=str):
        name, mode, level, region = key
        stores = [FeatureStore(folder.parent, name, fingerprint["model"], level, mode, region)
                  for folder, fingerprint in (first[key], second[key])]
        records = dataset.gallery + dataset.queries  # each store holds the ones it was given
        keys = stores[0].keys.keys(records, region)
        both = [r for r, k in zip(records, keys) if k is not None and all(k in s.entries() for s in stores)]
        a, _ = stores[0].gather(both)
        b, _ = stores[1].gather(both)
        if not np.array_equal(a.image, b.image):
            print(f"| {mode} L{level} {region} | patch counts differ, skipped |")
            continue
        cos = _cosines(a.vectors, b.vectors)
        everything.append(cos)
        image_min = np.full(len(both), np.inf)
        np.minimum.at(image_min, a.image, cos)
        precisions = f"{first[key][1]['model']['precision']} vs {second[key][1]['model']['precision']}"
        print(f"| {mode} L{level} {region} | {precisions} | {len(both)} | {len(cos):,} | {cos.min():.5f} | "
              f"{cos.mean():.5f} | {np.quantile(cos, 0.001):.5f} | {np.quantile(cos, 0.01):.5f} | "
              f"{int((image_min < 0.99).sum())} |")
    if everything:
        cos = np.concatenate(everything)
        print(f"\nall stores: {len(cos):,} patches, cosine min {cos.min():.5f}, mean {cos.mean():.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_variants = commands.add_parser("variants")
    run_variants.add_argument("--images", type=int, default=8)
    run_variants.add_argument("--batch-size", type=int, default=16)
    run_caches = commands.add_parser("caches")
    run_caches.add_argument("first")
    run_caches.add_argument("second")
    args, overrides = parser.parse_known_args()
    setup_logging(None)
    {"variants": variants, "caches": caches}[args.command](args, overrides)


if __name__ == "__main__":
    main()
