"""Crop-mode loader throughput, PIL crops against tensor crops (prints figures, not a test).

Times what feeds the encoder in crop mode, without the encoder: the DataLoader over
``_CropDataset`` (decode, and with ``pil`` every crop resized by PIL, converted and normalised in
the workers) and, with ``tensor``, ``TensorCrops`` cutting and resizing all cells of each decoded
image in the main process on ``--device`` (src/patchify/crops.py; on CUDA, timed up to a synchronize).
Both methods run in one process on the same images, for each worker count.

    python benchmarks/crop_loader.py [--root ilias/mini] [--images 48] [--level 3] [--workers 0 2] \
        [--crops pil tensor] [--device cpu|cuda] [--size 224] [--threads N]

Also prints a single-process breakdown per image: decoding (``load_image`` vs ``decode_rgb``) and
cutting + resizing all cells (``PatchTransform`` vs ``TensorCrops``). The first image of every run
is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from patchify.crops import TensorCrops, decode_rgb  # noqa: E402
from patchify.data import ImageRecord, image_files, load_image  # noqa: E402
from patchify.extraction import PatchTransform, _collate_shared, _CropDataset  # noqa: E402
from patchify.pyramid import level_boxes, levels_for, patches_per_image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extraction_throughput import machine  # noqa: E402  (one description of the machine for every benchmark)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(records, levels, data_config, crops: str, workers: int, device: torch.device) -> tuple[float, int]:
    """Seconds for all images but the first, and the patches they gave."""
    cut = TensorCrops(data_config) if crops == "tensor" else None
    loader = DataLoader(_CropDataset(records, levels, "full", data_config, crops), batch_size=None, shuffle=False,
                        num_workers=workers, collate_fn=_collate_shared, prefetch_factor=4 if workers else None)
    patches, started = 0, None
    for payload, (boxes, _), error in loader:
        if error:
            raise SystemExit(error)
        batch = payload if cut is None else cut(*payload, device=device)
        if started is None:  # the first image (and the workers' start) is the warm-up
            sync(device)
            started = time.perf_counter()
            continue
        patches += len(batch)
    sync(device)
    return time.perf_counter() - started, patches


def breakdown(records, levels, data_config, device: torch.device) -> dict[str, float]:
    """Milliseconds per image of each step, one process (the first image untimed)."""
    steps = {"decode: PIL load_image": 0.0, "decode: decode_rgb": 0.0,
             "cut + resize: PatchTransform (PIL)": 0.0, f"cut + resize: TensorCrops ({device.type})": 0.0}
    pil, tensor = PatchTransform(data_config), TensorCrops(data_config)
    for index, record in enumerate(records):
        times = []
        started = time.perf_counter()
        image = load_image(record.path)
        times.append(time.perf_counter() - started)
        started = time.perf_counter()
        pixels = decode_rgb(record.path)
        times.append(time.perf_counter() - started)
        boxes = np.concatenate([level_boxes(*image.size, level) for level in levels])
        started = time.perf_counter()
        pil(image, boxes)
        times.append(time.perf_counter() - started)
        started = time.perf_counter()
        tensor(pixels, boxes, device=device)
        sync(device)
        times.append(time.perf_counter() - started)
        if index:
            for name, seconds in zip(steps, times):
                steps[name] += seconds * 1000 / (len(records) - 1)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT / "ilias" / "mini", help="a folder of images")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--level", type=int, default=3, help="pyramid levels 0..LEVEL")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--crops", nargs="+", default=["pil", "tensor"], choices=["pil", "tensor"])
    parser.add_argument("--device", default="cpu", help="where tensor crops are cut: cpu, cuda, cuda:N")
    parser.add_argument("--size", type=int, default=224, help="the model's input size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the main process (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    records = [ImageRecord(id=str(path), path=path) for path in image_files(args.root)[:args.images]]
    if len(records) < 2:
        raise SystemExit(f"{args.root}: fewer than 2 images")
    levels = levels_for(args.level, "pyramid")
    data_config = dict(input_size=(3, args.size, args.size), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225), crop_pct=1.0, crop_mode="squash")
    pixels = np.mean([np.prod(load_image(r.path).size) for r in records[:8]]) / 1e6
    load_before = os.getloadavg()
    rows = []
    for workers in args.workers:
        for crops in args.crops:
            seconds, patches = time_loader(records, levels, data_config, crops, workers, device)
            rows.append((crops, workers, seconds, patches))
    steps = breakdown(records, levels, data_config, device)
    load_after = os.getloadavg()
    print(f"\n{machine()}\n{args.root}: {len(records) - 1} timed images (~{pixels:.2f} Mpixel each), levels {levels} "
          f"({patches_per_image(levels)} crops of {args.size} px per image), tensor crops on {device}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min)\n")
    print("| crops | workers | seconds | images/s | crops/s | vs pil (same workers) |")
    print("|---|---:|---:|---:|---:|---:|")
    base = {workers: (len(records) - 1) / seconds for crops, workers, seconds, _ in rows if crops == "pil"}
    for crops, workers, seconds, patches in rows:
        rate = (len(records) - 1) / seconds
        ratio = f"{rate / base[workers]:.2f}x" if workers in base else "-"
        print(f"| {crops} | {workers} | {seconds:.2f} | {rate:.1f} | {patches / seconds:.0f} | {ratio} |")
    print("\n| step (one process) | ms / image |\n|---|---:|")
    for name, ms in steps.items():
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
