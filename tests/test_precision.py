"""Reduced precision (extract.precision, src/patchify/model.py resolve_precision): bf16 descriptors of the
packaged DINOv2 against fp32 on real photos, auto's choice, and caches that never mix precisions.

Measured (benchmarks/precision_quality.py, docs/BENCHMARKS.md "Reduced precision"): bf16 against
fp32 over the 5,430 crop-mode patches of the mini-ILIAS, cosine min 0.9995 (mean 0.99993); pool
mode's cells min 0.9990. The threshold 0.99 leaves room for other CPUs' kernels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config

from patchify import model as model_module
from patchify.assets import AssetError, debian_package
from patchify.model import ModelConfigError, encode, load_model, resolve_precision
from patchify.pool_cells import describe_cells
from patchify.pyramid import level_boxes

PHOTOS = ("squirrel_cls.jpg", "fruits.jpg", "baboon.jpg", "messi5.jpg", "building.jpg")


@pytest.fixture(scope="module")
def photos():
    """A few real photos from Debian's opencv-doc (the mini-ILIAS's backgrounds)."""
    from PIL import Image

    try:
        folder = debian_package("opencv-doc") / "usr/share/doc/opencv-doc/examples/data"
    except AssetError as err:  # pragma: no cover - depends on the registry
        pytest.skip(f"opencv-doc unavailable: {err}")
    return [Image.open(folder / name).convert("RGB") for name in PHOTOS]


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_bf16_descriptors_of_the_packaged_dinov2_match_fp32_on_real_photos(photos):
    cfg = compose_config([]).model  # the default: packaged DINOv2 ViT-S/14, 224 px, block 10
    fp32 = load_model(cfg, device="cpu", precision="fp32")
    bf16 = load_model(cfg, device="cpu", precision="bf16")
    assert bf16.encoder.dtype == torch.bfloat16 and fp32.encoder.dtype == torch.float32
    assert bf16.fingerprint == {**fp32.fingerprint, "precision": "bf16"}
    # whole photos and their L1 quarters, as crop mode describes them
    crops = torch.stack([fp32.transform(photo.crop((x, y, x + w, y + h))) for photo in photos
                         for level in (0, 1) for x, y, w, h in level_boxes(*photo.size, level).tolist()])
    reference, reduced = encode(fp32, crops)[0], encode(bf16, crops)[0]
    assert reduced.dtype == torch.float32
    cosine = _cosines(reference, reduced)
    assert cosine.min() >= 0.99, cosine.min()
    assert not torch.equal(reference, reduced)  # it did run in bf16
    # pool mode: every L1..L3 cell of one shared pass, fp32 input cast by the encoder itself
    images = torch.stack([fp32.transform(photo) for photo in photos[:2]])
    from patchify.extraction import token_cells

    rows, cols = fp32.encoder.backbone.patch_embed.grid_size
    cells = [cell for level, found in token_cells(rows, cols, [1, 2, 3]).items() for cell in found]
    for method in ("split", "masked"):
        with torch.inference_mode():
            want = describe_cells(fp32.encoder, images, cells, 2, method)[0]
            got = describe_cells(bf16.encoder, images, cells, 2, method)[0]
        assert got.dtype == torch.float32 and _cosines(want, got).min() >= 0.99, (method, _cosines(want, got).min())


def test_auto_is_fp16_on_cuda_bf16_on_a_native_bf16_cpu_fp32_otherwise(monkeypatch):
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("auto", "cuda") == resolve_precision("auto", torch.device("cuda", 1)) == "fp16"
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda:0") == "fp16"  # CUDA's path does not ask the CPU
    assert resolve_precision("auto", "mps") == "fp32"
    for precision in ("fp32", "bf16"):  # explicit choices are kept on either device
        assert resolve_precision(precision, "cpu") == resolve_precision(precision, "cuda") == precision
    assert resolve_precision("fp16", "cuda") == "fp16"  # CUDA's fp16 path, as before bf16 existed


@pytest.mark.parametrize("precision, device, message", [
    ("fp16", "cpu", "extract.precision=fp16 runs on CUDA only"),
    ("int8", "cpu", "extract.precision=int8: must be auto or one of fp32, fp16, bf16"),  # measured, refused
])
def test_a_precision_the_device_cannot_run_is_one_line(precision, device, message):
    with pytest.raises(ModelConfigError, match=message) as caught:
        resolve_precision(precision, device)
    assert "\n" not in str(caught.value)


def test_native_bf16_is_read_from_cpuinfo_when_torch_cannot_say(monkeypatch, tmp_path):
    detect = model_module.cpu_has_native_bf16.__wrapped__  # without the process-wide cache
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    for flags, native in (("fpu sse avx512f avx512_bf16 avx512_vnni", True), ("fpu amx_bf16 amx_tile", True),
                          ("fpu sse avx2 avx512f avx512_vnni", False)):
        cpuinfo = tmp_path / f"cpuinfo-{native}-{len(flags)}"
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
        assert detect(str(cpuinfo)) is native, flags
    assert detect(str(tmp_path / "missing")) is False  # neither source: fp32


def test_load_model_at_each_precision_keys_its_own_fingerprint():
    cfg = compose_config(["model=test_vit"]).model
    loaded = {p: load_model(cfg, device="cpu", precision=p) for p in ("fp32", "bf16")}
    assert {p: m.fingerprint["precision"] for p, m in loaded.items()} == {p: p for p in loaded}
    assert {p: m.precision for p, m in loaded.items()} == {p: p for p in loaded}
    assert len({json.dumps(m.fingerprint, sort_keys=True) for m in loaded.values()}) == 2
    assert load_model(cfg, device="cpu").precision == "fp32"  # the library default is exact, on any machine
    with pytest.raises(ModelConfigError, match="fp16 runs on CUDA only"):
        load_model(cfg, device="cpu", precision="fp16")


def test_a_cache_written_at_one_precision_is_never_read_at_another(smoke_overrides, tmp_path, monkeypatch):
    from patchify.extraction import FeatureStore
    from patchify.pipeline import run

    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    runs = {}
    for precision in ("fp32", "auto", "bf16"):
        runs[precision] = run(compose_config(smoke_overrides + ["task=extract", "pyramid.level=1",
                                                                f"extract.precision={precision}"]), tmp_path / precision)
    assert runs["fp32"]["extracted"] > 0 and runs["auto"]["extracted"] == runs["fp32"]["extracted"]  # bf16: all again
    assert runs["bf16"]["extracted"] == 0 and runs["bf16"]["reused"] == runs["auto"]["extracted"]  # auto was bf16
    environment = {p: json.loads((tmp_path / p / "environment.json").read_text())["precision"] for p in runs}
    assert environment == {"fp32": "fp32", "auto": "bf16", "bf16": "bf16"}
    features = tmp_path / "features"
    stores = {json.loads((folder / "meta.json").read_text())["model"]["precision"]: folder
              for folder in features.glob("test_vit.crop.L1-*")}
    assert set(stores) == {"fp32", "bf16"}  # two folders per level, one per precision
    cfg = compose_config(smoke_overrides)
    from patchify.data import load_dataset

    records = load_dataset(cfg.dataset).gallery
    vectors = {}
    for precision in stores:
        fingerprint = load_model(cfg.model, device="cpu", precision=precision).fingerprint
        store = FeatureStore(features, "test_vit", fingerprint, 1, "crop", "full")
        assert store.folder == stores[precision]
        vectors[precision] = store.gather(records)[0].vectors
    assert vectors["fp32"].shape == vectors["bf16"].shape and not np.array_equal(vectors["fp32"], vectors["bf16"])


def test_pool_modes_gallery_queries_and_l0_share_the_precision(smoke_overrides, monkeypatch):
    from patchify.features import make_feature_source

    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    source = make_feature_source(compose_config(smoke_overrides + ["pyramid.mode=pool", "pyramid.pool_image_size=320",
                                                                 "extract.precision=auto"]))
    models = (source.model, source.query_model, source.l0_model)
    assert [m.precision for m in models] == ["bf16"] * 3
    assert [m.encoder.dtype for m in models] == [torch.bfloat16] * 3


def test_run_report_and_log_name_the_resolved_precision(smoke_overrides, tmp_path, monkeypatch):
    from loguru import logger

    from patchify.features import make_feature_source
    from patchify.report import RunReport, resolved_precision

    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: False)
    cfg = compose_config(smoke_overrides + ["extract.device=cpu", "extract.precision=auto"])  # smoke pins fp32
    assert resolved_precision(cfg) == "fp32"
    RunReport(tmp_path / "run", cfg)
    assert json.loads((tmp_path / "run" / "environment.json").read_text())["precision"] == "fp32"
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    assert resolved_precision(cfg) == "bf16"
    messages = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="INFO")
    try:
        make_feature_source(cfg)
    finally:
        logger.remove(sink)
    assert any(m.startswith("model ") and m.endswith("cpu, precision bf16 (extract.precision=auto)") for m in messages)
    assert resolved_precision(compose_config(smoke_overrides + ["extract.precision=fp16"])) is None  # no CUDA here
