"""Extraction throughput of crop and pool modes (prints figures, not a test).

Runs the real extraction path (``FeatureSource.features``: DataLoader decoding, crop
packing or one pooled pass per image, chunked cache writes) into a fresh temporary
feature cache for each setting, and prints images/s and patches/s at the chosen level.
All settings run in one process on the same images, so their ratios compare.

    python benchmarks/extraction_throughput.py [Hydra overrides ...] --images 48 --batch-sizes 16 \
        --settings crop crop:112 pool:448:split:2 pool:336:masked:0

(Hydra overrides go first: ``--settings`` takes every word after it.) A setting is ``crop``
(crops at the model's input size), ``crop:SIZE`` (model.image_size) or
``pool:SIZE:METHOD:SPLIT_BLOCK`` (pyramid.pool_image_size, pyramid.pool_method,
pyramid.pool_split_block); ratios are against the setting ``crop``. The gallery is the first
``--images`` images of the configured dataset (default: the mini-ILIAS; ``dataset=folder
dataset.root=DIR`` for any folder). One warm-up image per setting is not timed; the
encoder's floating-point operations are counted on it (``torch.utils.flop_counter``: every
matmul, convolution and attention the encoder ran for that one image, padding and masked-out
attention included), a cost that does not depend on the machine.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from src.console import setup_logging  # noqa: E402
from src.pipeline import load_dataset, make_feature_source  # noqa: E402
from src.pyramid import levels_for, patches_per_image  # noqa: E402


if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    # The flop counter knows the CUDA attention kernels but not the CPU one that
    # scaled_dot_product_attention dispatches to here (masked or not): same formula.
    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)


def setting_overrides(setting: str) -> list[str]:
    kind, *rest = setting.split(":")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--settings", nargs="+", default=["crop", "pool:448:split:2", "pool:448:masked:0"])
    parser.add_argument("--batch-sizes", default="16", help="comma-separated extract.batch_size values")
    args, overrides = parser.parse_known_args()
    setup_logging(None)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        base = compose(config_name="config", overrides=overrides)
        dataset = load_dataset(base.dataset)
        records = dataset.gallery[:args.images]
        levels = levels_for(int(base.pyramid.level), base.pyramid.multi_scale)
        per_image = patches_per_image(levels)
        rows = []
        for setting in args.settings:
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                with tempfile.TemporaryDirectory(prefix="patchify-bench-") as cache:
                    cfg = compose(config_name="config", overrides=[
                        *overrides, *setting_overrides(setting), f"extract.batch_size={batch_size}",
                        f"paths.features={cache}"])
                    source = make_feature_source(cfg)
                    with FlopCounterMode(display=False) as flops:
                        source.features(records[:1], levels, desc="warm-up")
                    started = time.perf_counter()
                    source.features(records[1:], levels, desc=setting)
                    seconds = time.perf_counter() - started
                rows.append((setting, source.model.input_size, batch_size, seconds, len(records) - 1,
                             flops.get_total_flops() / 1e9))
    print(f"\n{machine()}\nmodel {base.model.name} ({base.model.timm_name}, layer {base.model.layer}), "
          f"device {source.model.device}{' fp16' if source.model.half else ''}, levels {levels} "
          f"({per_image} patches per image), {len(records) - 1} timed images\n")
    crop_rate = {b: n / s for name, _, b, s, n, _ in rows if name == "crop"}
    crop_gflop = next((g for name, *_, g in rows if name == "crop"), None)
    print("| setting | input px | batch | seconds | images/s | patches/s | vs crop | GFLOP/image | crop's FLOPs / these |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, size, batch_size, seconds, count, gflop in rows:
        rate = count / seconds
        ratio = f"{rate / crop_rate[batch_size]:.1f}x" if batch_size in crop_rate else "-"
        flop_ratio = f"{crop_gflop / gflop:.1f}x" if crop_gflop and gflop else "-"
        print(f"| {name} | {size} | {batch_size} | {seconds:.1f} | {rate:.2f} | {rate * per_image:.1f} | {ratio} "
              f"| {gflop:.1f} | {flop_ratio} |")


if __name__ == "__main__":
    main()
