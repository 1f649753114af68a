"""Extraction throughput of crop and pool modes (prints figures, not a test).

Runs the real extraction path (``FeatureSource.features``: DataLoader decoding, crop
packing or one pooled pass per image, chunked cache writes) into a fresh temporary
feature cache for each setting, and prints images/s and patches/s at the chosen level.
All settings run in one process on the same images, so their ratios compare.

    python benchmarks/extraction_throughput.py [Hydra overrides ...] --images 48 --batch-sizes 16 \
        --precisions fp32 bf16 --loader --settings crop crop:112 pool:448:split:2 pool:336:masked:0

(Hydra overrides go first: ``--settings`` takes every word after it.) A setting is ``crop``
(crops at the model's input size), ``crop:SIZE`` (model.image_size) or
``pool:SIZE:METHOD:SPLIT_BLOCK`` (pyramid.pool_image_size, pyramid.pool_method,
pyramid.pool_split_block), optionally ``@PRECISION`` (extract.precision: ``crop@bf16``);
a setting without one runs at each of ``--precisions`` (default: extract.precision as
configured, ``auto``). Ratios are against the setting ``crop`` at fp32 (else ``crop`` at
the first precision it ran at). The gallery is the first ``--images`` images of the
configured dataset (default: the mini-ILIAS; ``dataset=folder dataset.root=DIR`` for any
folder). One warm-up image per setting is not timed; the encoder's floating-point
operations are counted on it (``torch.utils.flop_counter``: every matmul, convolution and
attention the encoder ran for that one image, padding and masked-out attention included),
a cost that does not depend on the machine nor on the precision.

Roofline: each setting's achieved GFLOP/s (GFLOP/image x images/s) against the peak of its
precision on this machine, measured in the same process by the best of a few square
``torch.mm`` of ``--peak-size`` (4096) at that precision with the same threads (the most a
dense matmul gets here). ``--loader`` runs every setting a second time with the encoder
replaced by zeros: what is left (decoding, cropping, resizing, normalising in the
DataLoader, cache writes) bounds the setting's images/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402

from patchify import extraction  # noqa: E402
from patchify.console import setup_logging  # noqa: E402
from patchify.model import DTYPES, Encoder  # noqa: E402
from patchify.data import load_dataset  # noqa: E402
from patchify.features import make_feature_source  # noqa: E402
from patchify.pyramid import levels_for, patches_per_image  # noqa: E402


if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    # The flop counter knows the CUDA attention kernels but not the CPU one that
    # scaled_dot_product_attention dispatches to here (masked or not): same formula.
    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)


def setting_overrides(setting: str) -> list[str]:
    setting, _, precision = setting.partition("@")
    kind, *rest = setting.split(":")
    if precision:
        return setting_overrides(setting) + [f"extract.precision={precision}"]
    if kind == "crop" and len(rest) <= 1:
        return ["pyramid.mode=crop"] + [f"model.image_size={size}" for size in rest]
    if kind != "pool" or len(rest) != 3:
        raise SystemExit(f"unknown setting {setting!r}: crop, crop:SIZE or pool:SIZE:METHOD:SPLIT")
    size, method, split = rest
    return ["pyramid.mode=pool", f"pyramid.pool_image_size={size}", f"pyramid.pool_method={method}",
            f"pyramid.pool_split_block={split}"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} torch threads{gpu}; torch {torch.__version__}"


def matmul_peak(precision: str, size: int, device: torch.device, repeats: int = 3) -> float:
    """GFLOP/s of the best of ``repeats`` ``size``-square matmuls at ``precision`` on ``device``."""
    dtype = DTYPES[precision]
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


@contextlib.contextmanager
def encoder_stubbed():
    """Encoder passes replaced by zero descriptors of the right shape: the rest of the extraction
    path (the loader's decoding and cropping, batching, cache writes) runs as usual."""
    forward, describe = Encoder.forward, extraction.describe_cells

    def zeros_forward(self, images, layers=None):
        return [torch.zeros(len(images), self.backbone.num_features) for _ in ([self.layer] if layers is None else layers)]

    def zeros_cells(encoder, images, cells, *args, **kwargs):
        return [torch.zeros(len(images), len(cells), encoder.backbone.num_features)]

    Encoder.forward, extraction.describe_cells = zeros_forward, zeros_cells
    try:
        yield
    finally:
        Encoder.forward, extraction.describe_cells = forward, describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--settings", nargs="+", default=["crop", "pool:448:split:2", "pool:448:masked:0"])
    parser.add_argument("--batch-sizes", default="16", help="comma-separated extract.batch_size values")
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="extract.precision values for settings without @PRECISION (default: as configured)")
    parser.add_argument("--loader", action="store_true", help="also time each setting with the encoder stubbed out")
    parser.add_argument("--peak-size", type=int, default=4096, help="matmul size of the peak measurement")
    parser.add_argument("--json", type=Path, default=None, help="also save the rows (and the machine) as this JSON file")
    args, overrides = parser.parse_known_args()
    setup_logging(None)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        base = compose(config_name="config", overrides=overrides)
        dataset = load_dataset(base.dataset)
        records = dataset.gallery[:args.images]
        levels = levels_for(int(base.pyramid.level), base.pyramid.multi_scale)
        per_image = patches_per_image(levels)
        settings = [s if "@" in s or not args.precisions else f"{s}@{p}"
                    for s in args.settings for p in ([None] if "@" in s else args.precisions or [None])]
        load_before = os.getloadavg()
        rows = []
        for setting in settings:
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                row = {"setting": setting.partition("@")[0], "batch": batch_size, "count": len(records) - 1}
                for stubbed in (False, True) if args.loader else (False,):
                    with tempfile.TemporaryDirectory(prefix="patchify-bench-") as cache, \
                            encoder_stubbed() if stubbed else contextlib.nullcontext():
                        cfg = compose(config_name="config", overrides=[
                            *overrides, *setting_overrides(setting), f"extract.batch_size={batch_size}",
                            f"paths.features={cache}"])
                        source = make_feature_source(cfg)
                        with FlopCounterMode(display=False) as flops:
                            source.features(records[:1], levels, desc="warm-up")
                        started = time.perf_counter()
                        source.features(records[1:], levels, desc=f"{setting}{' (loader only)' if stubbed else ''}")
                        seconds = time.perf_counter() - started
                    if stubbed:
                        row["loader_seconds"] = seconds
                    else:
                        row.update(precision=source.model.precision, size=source.model.input_size, seconds=seconds,
                                   gflop=flops.get_total_flops() / 1e9)
                rows.append(row)
        load_after = os.getloadavg()
        peaks = {precision: matmul_peak(precision, args.peak_size, source.model.device)
                 for precision in dict.fromkeys(r["precision"] for r in rows)}
    print(f"\n{machine()}\nmodel {base.model.name} ({base.model.timm_name}, layer {base.model.layer}), "
          f"device {source.model.device}, levels {levels} ({per_image} patches per image), {len(records) - 1} timed "
          f"images; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min)\n")
    print("matmul peak (" + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items()) +
          f"; {args.peak_size}x{args.peak_size}, best of 3)\n")
    baseline = {}
    for row in sorted(rows, key=lambda r: r["precision"] != "fp32"):
        if row["setting"] == "crop":
            baseline.setdefault(row["batch"], row)
    print("| setting | precision | input px | batch | seconds | images/s | patches/s | vs crop fp32 | GFLOP/image "
          "| GFLOP/s | of peak | loader only: images/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        rate = row["count"] / row["seconds"]
        base_row = baseline.get(row["batch"])
        ratio = f"{rate / (base_row['count'] / base_row['seconds']):.2f}x" if base_row else "-"
        achieved = row["gflop"] * rate
        loader = f"{row['count'] / row['loader_seconds']:.2f}" if "loader_seconds" in row else "-"
        print(f"| {row['setting']} | {row['precision']} | {row['size']} | {row['batch']} | {row['seconds']:.1f} "
              f"| {rate:.2f} | {rate * per_image:.1f} | {ratio} | {row['gflop']:.1f} | {achieved:.0f} "
              f"| {achieved / peaks[row['precision']]:.0%} | {loader} |")
    if args.json:
        saved = [{**row, "images_per_s": row["count"] / row["seconds"]} for row in rows]
        args.json.write_text(json.dumps({"machine": machine(), "model": base.model.name, "levels": list(levels),
                                         "peak_gflop_per_s": peaks, "rows": saved}, indent=1) + "\n")


if __name__ == "__main__":
    main()
