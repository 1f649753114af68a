"""extract.crops=tensor (src/patchify/crops.py): the decode equals load_image pixel for pixel, every cell of
every level is within one 8-bit level of the PIL crop, descriptors agree, and the setting keys its
own caches.

Tolerance. Both paths resize with PIL's filter one axis at a time, rounding to 8 bits after each
pass; they differ only in PIL's fixed-point (22-bit) coefficients against torch's float32 ones, which
moves a value that sits on a rounding edge by one level after the first pass (two after an upscaling
second pass). Measured on the images below, all 30 cells: bicubic (both model configs) at most 2
levels, at <= 2e-4 of the values, mean difference ~2e-6 in normalised units; bilinear at most 1
level at <= 3e-3 of the values; on 30 mini-ILIAS photos (bicubic) at most 1 level. The tests allow
2.5 levels (max, in normalised units: level / 255 / std), a mean of 1e-4 and 5e-3 of the values
differing. Pillow < 13 runs the passes in another order for tall crops (always horizontal first),
which moves up to ~12 levels at sharp edges: the allowance is widened there.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from conftest import compose_config
from PIL import Image

from patchify import settings
from patchify.crops import CROP_METHODS, TensorCrops, _decode_fast, composite_on_white, crop_method, decode_rgb, with_crops
from patchify.data import DataError, ImageRecord, load_image
from patchify.extraction import FeatureStore, _CropDataset, _WholeImageDataset, describe_images, extract_missing
from patchify.model import ModelConfigError, load_model
from patchify.features import make_feature_source
from patchify.pipeline import run
from patchify.pyramid import level_boxes

PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13
LEVELS, MEAN, SHARE = (2.5, 1e-4, 5e-3) if PILLOW_13 else (12.5, 2e-3, 1.0)  # max (8-bit levels), mean, share differing
IMAGENET_224 = dict(input_size=(3, 224, 224), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225), crop_pct=1.0, crop_mode="squash")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model(compose_config(["model=test_vit"]).model, device="cpu", precision="fp32")


# ----------------------------------------------------------------------------- image files

def _png(path: Path, array: np.ndarray, after_pixels: bytes = b"") -> Path:
    """A PNG of a (h, w, c) uint8/uint16 array (c: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA), written by
    hand (PIL cannot write 16-bit colour); ``after_pixels``: raw chunks placed after IDAT."""
    height, width, channels = array.shape
    depth = 16 if array.dtype == np.uint16 else 8
    rows = b"".join(b"\x00" + row.astype(">u2" if depth == 16 else np.uint8).tobytes() for row in array)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, depth, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + after_pixels + chunk(b"IEND", b""))
    return path


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth shapes and sharp edges (where resampling differences show), plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                      ((x // 7 + y // 5) % 2) * 255], axis=-1).astype(np.int32)
    return np.clip(image + rng.integers(-40, 40, image.shape), 0, 255).astype(np.uint8)


def _files(folder: Path) -> dict[str, tuple[Path, bool]]:
    """name -> (image file, whether torchvision decodes it (False: PIL's fallback))."""
    rgb = _photo(333, 217)
    rng = np.random.default_rng(1)
    alpha = rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    used = int(np.asarray(palette)[0, 0])
    files: dict[str, tuple[Path, bool]] = {}

    def add(name: str, fast: bool, save) -> None:
        path = folder / name
        save(path)
        files[name] = (path, fast)

    add("rgb_333x217.jpg", True, lambda p: Image.fromarray(rgb).save(p, quality=90))
    add("tiny_17x19.jpg", True, lambda p: Image.fromarray(_photo(17, 19)).save(p, quality=90))
    for orientation in range(2, 9):
        add(f"exif{orientation}.jpg", True, lambda p, o=orientation: Image.fromarray(rgb).save(p, exif=_exif(o)))
    add("exif6.png", True, lambda p: Image.fromarray(rgb).save(p, exif=_exif(6)))
    late = struct.pack(">I", len(_exif(8))) + b"eXIf" + _exif(8) + struct.pack(">I", zlib.crc32(b"eXIf" + _exif(8)))
    add("exif8_after_pixels.png", False, lambda p: _png(p, rgb, after_pixels=late))
    add("gray.jpg", True, lambda p: Image.fromarray(rgb[..., 0]).save(p))
    add("gray.png", True, lambda p: Image.fromarray(rgb[..., 1]).save(p))
    add("bilevel.png", True, lambda p: Image.fromarray(rgb[..., 0] > 128).save(p))
    add("palette.png", True, lambda p: palette.save(p))
    add("palette_transparent_index.png", True, lambda p: palette.save(p, transparency=used))
    add("palette_alpha_table.png", True,
        lambda p: palette.save(p, transparency=bytes(rng.integers(0, 256, 32, dtype=np.uint8))))
    add("rgba.png", True, lambda p: Image.fromarray(np.dstack([rgb, alpha])).save(p))
    add("gray_alpha.png", True, lambda p: Image.fromarray(np.dstack([rgb[..., :1].repeat(3, -1), alpha])).convert("LA").save(p))
    add("cmyk.jpg", True, lambda p: Image.fromarray(rgb).convert("CMYK").save(p, quality=95))
    wide = rgb.astype(np.uint16) * 257 + rng.integers(0, 257, rgb.shape).astype(np.uint16)
    add("gray16.png", True, lambda p: _png(p, (wide[..., :1] // 3)))  # max below 65535: PIL rescales it
    add("rgb16.png", True, lambda p: _png(p, wide))
    add("rgba16.png", True, lambda p: _png(p, np.dstack([wide, alpha.astype(np.uint16) * 257])))
    add("rgb.webp", False, lambda p: Image.fromarray(rgb).save(p, quality=90))
    add("rgb.bmp", False, lambda p: Image.fromarray(rgb).save(p))
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, bool]]:
    return _files(tmp_path_factory.mktemp("crops"))


def test_decode_equals_load_image_and_uses_torchvision_where_it_says(files):
    for name, (path, fast) in files.items():
        expected = np.asarray(load_image(path)).transpose(2, 0, 1)
        got = decode_rgb(path)
        assert got.dtype == torch.uint8 and got.is_contiguous(), name
        assert got.shape == expected.shape and np.array_equal(got.numpy(), expected), name
        assert (_decode_fast(path) is not None) == fast, name


def test_decode_fails_as_load_image_does(tmp_path, files):
    data = files["rgb_333x217.jpg"][0].read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name in ("truncated.jpg", "empty.jpg", "text.png", "missing.jpg"):
        with pytest.raises(DataError) as expected:
            load_image(tmp_path / name)
        with pytest.raises(DataError) as got:
            decode_rgb(tmp_path / name)
        assert str(got.value) == str(expected.value)


def test_composite_on_white_is_pils_paste():
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    rgba[0, :4, 3] = (0, 255, 1, 254)
    image = Image.fromarray(rgba)
    canvas = Image.new("RGB", image.size, (255, 255, 255))
    canvas.paste(image, mask=image.getchannel("A"))
    got = composite_on_white(torch.from_numpy(rgba).permute(2, 0, 1))
    assert np.array_equal(got.permute(1, 2, 0).numpy(), np.asarray(canvas))


# ----------------------------------------------------------------------------- cells

def _both(path: Path, data_config: dict, levels=(0, 1, 2, 3), region="full", boxes=()):
    """(PIL crops, tensor crops, boxes, levels) of one image through _CropDataset, both ways."""
    record = ImageRecord(id=path.name, path=path, boxes=boxes)
    pil_crops, (pil_boxes, pil_levels), pil_error = _CropDataset([record], levels, region, data_config)[0]
    payload, (boxes_t, levels_t), error = _CropDataset([record], levels, region, data_config, "tensor")[0]
    assert error == pil_error
    if error:
        return None, None, pil_boxes, pil_levels
    assert np.array_equal(boxes_t, pil_boxes) and np.array_equal(levels_t, pil_levels)
    return pil_crops, TensorCrops(data_config)(*payload, device="cpu"), pil_boxes, pil_levels


def _assert_close(pil: torch.Tensor, tensor: torch.Tensor, data_config: dict, label: str) -> None:
    assert tensor.shape == pil.shape and tensor.dtype == torch.float32, label
    step = 1.0 / 255 / min(data_config["std"])  # one 8-bit level in normalised units
    difference = (tensor - pil).abs()
    assert difference.mean() < MEAN, f"{label}: mean {difference.mean():.6f}"
    assert (difference > 1e-6).float().mean() < SHARE, f"{label}: {(difference > 1e-6).float().mean():.5f} of the values differ"
    worst = difference.flatten(1).max(dim=1).values
    assert worst.max() <= LEVELS * step, f"{label}: cell {int(worst.argmax())} differs by {worst.max() / step:.2f} levels"


@pytest.mark.parametrize("config", ["test_vit", "imagenet_224", "bilinear_224"])
def test_every_cell_of_every_level_is_within_two_levels_of_pil(files, model, config):
    data_config = {"test_vit": model.data_config, "imagenet_224": IMAGENET_224,
                   "bilinear_224": {**IMAGENET_224, "interpolation": "bilinear"}}[config]
    for name, (path, _) in files.items():
        pil, tensor, boxes, levels = _both(path, data_config)
        assert len(boxes) == 30 and np.array_equal(np.bincount(levels), [1, 4, 9, 16]), name
        _assert_close(pil, tensor, data_config, name)


def test_bbox_region_cells_match_pil(files, model):
    path = files["exif6.jpg"][0]
    for boxes in (((10.4, 20.6, 150.0, 90.0),), ((0.0, 0.0, 216.6, 332.5), (30.0, 40.0, 10.0, 10.0))):
        pil, tensor, cell_boxes, _ = _both(path, model.data_config, region="bbox", boxes=boxes)
        assert cell_boxes[0][0] == round(boxes[0][0])
        _assert_close(pil, tensor, model.data_config, str(boxes))


def test_too_small_images_are_refused_as_today(tmp_path, model):
    path = tmp_path / "sliver.png"
    Image.fromarray(_photo(4000, 3)).save(path)
    _, _, boxes, _ = _both(path, model.data_config)
    assert len(boxes) == 0
    record = ImageRecord(id="sliver", path=path)
    assert "too small for pyramid level 3" in _CropDataset([record], [0, 3], "full", model.data_config, "tensor")[0][2]


def test_whole_image_in_pool_mode_matches_the_timm_transform(files, model):
    records = [ImageRecord(id=name, path=path) for name, (path, _) in files.items()]
    for index, record in enumerate(records):
        pil_image, pil_size, _ = _WholeImageDataset(records, model.transform)[index]
        image, size, _ = _WholeImageDataset(records, None)[index]
        assert size == pil_size
        tensor = TensorCrops(model.data_config)(image, [(0, 0, *size)])
        _assert_close(pil_image[None], tensor, model.data_config, record.id)


def test_layout_and_dtype_of_the_decoded_image_do_not_change_the_crops(files):
    image = decode_rgb(files["rgb_333x217.jpg"][0])
    boxes = np.array([(0, 0, 333, 217), (111, 72, 111, 73), (250, 163, 83, 54), (5, 7, 4, 3)])
    crops = TensorCrops(IMAGENET_224)
    reference = crops(image, boxes)
    channels_last = image[None].contiguous(memory_format=torch.channels_last)[0]
    from_hwc_view = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # strided like a numpy HWC array
    for variant in (channels_last, from_hwc_view, image.float(), image.double()):
        assert torch.equal(crops(variant, boxes, device=torch.device("cpu")), reference)
    assert torch.equal(crops(image, torch.as_tensor(boxes)), reference)  # boxes as a tensor (from a worker)
    reordered = crops(image, boxes[::-1].copy())
    assert torch.equal(reordered, reference.flip(0))  # the order of the boxes, whatever the grouping


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_crops_equal_cpu_crops(files):
    """Run on a GPU machine: the same code on CUDA (float32 kernels of their own) lands on the same
    8-bit levels as on the CPU, bar values on a rounding edge (one level)."""
    crops = TensorCrops(IMAGENET_224)
    for name in ("rgb_333x217.jpg", "tiny_17x19.jpg", "exif6.jpg", "rgba16.png"):
        image = decode_rgb(files[name][0])
        boxes = np.concatenate([level_boxes(image.shape[2], image.shape[1], level) for level in range(4)])
        on_cpu, on_cuda = crops(image, boxes), crops(image.cuda(), boxes, device="cuda")
        assert on_cuda.device.type == "cuda"
        _assert_close(on_cpu, on_cuda.cpu(), IMAGENET_224, name)


def test_tensor_crops_refuse_other_resizes_in_one_line(model):
    with pytest.raises(ModelConfigError, match="extract.crops=tensor: .* 'lanczos'; set extract.crops=pil"):
        with_crops(replace(model, data_config={**model.data_config, "interpolation": "lanczos"}), "tensor")


# ----------------------------------------------------------------------------- descriptors, keys, runs

def test_descriptors_agree_and_the_cache_key_differs(model, ilias_fixture, tmp_path, files):
    tensor_model = with_crops(model, "tensor")
    assert with_crops(model, "pil").fingerprint == model.fingerprint  # pil caches keep their keys
    assert crop_method(model) == "pil" and crop_method(tensor_model) == "tensor"
    assert tensor_model.fingerprint["preprocess"]["crops"] == "tensor"
    records = [ImageRecord(id=p.name, path=p) for p in sorted(ilias_fixture.glob("ilias_core/*/pos/*.jpg"))[:3]]
    records += [ImageRecord(id=name, path=files[name][0]) for name in ("exif8.jpg", "rgba.png", "cmyk.jpg")]
    gathered = []
    for m in (model, tensor_model):
        stores = [FeatureStore(tmp_path, "m", m.fingerprint, level, "crop", "full") for level in range(4)]
        for store in stores:
            store.open()
        extract_missing(stores, records, [m] * 4, batch_size=16, num_workers=0, chunk_size=4)
        gathered.append(([store.folder for store in stores], [store.gather(records)[0] for store in stores]))
    (pil_folders, pil), (tensor_folders, tensor) = gathered
    assert not set(pil_folders) & set(tensor_folders)
    for a, b in zip(pil, tensor):
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.image, b.image)
        cosine = (a.vectors * b.vectors).sum(axis=1)
        assert cosine.min() > 0.99, cosine.min()
    queries_pil, _ = describe_images(records[:2], model)
    queries_tensor, _ = describe_images(records[:2], tensor_model)
    assert (queries_pil * queries_tensor).sum(axis=1).min() > 0.99


def test_settings_declare_the_crop_methods():
    assert settings.CROP_METHODS == CROP_METHODS
    with pytest.raises(settings.ConfigError, match="extract.crops=gpu"):
        settings.validate(compose_config(["extract.crops=gpu"]))


@pytest.mark.parametrize("mode", ["crop", "pool"])
def test_feature_source_keys_every_model_by_its_crops(smoke_overrides, mode):
    base = smoke_overrides + [f"pyramid.mode={mode}"] + (["pyramid.pool_image_size=64"] if mode == "pool" else [])
    pil = make_feature_source(compose_config(base))
    tensor = make_feature_source(compose_config(base + ["extract.crops=tensor"]))
    for a, b in ((pil.model, tensor.model), (pil.query_model, tensor.query_model)):
        assert crop_method(a) == "pil" and crop_method(b) == "tensor"
        assert {**b.fingerprint, "preprocess": a.fingerprint["preprocess"]} == a.fingerprint


def test_smoke_run_with_tensor_crops_uses_its_own_feature_folders(smoke_overrides, tmp_path):
    first = run(compose_config(smoke_overrides), tmp_path / "pil")
    folders = {p.name for p in (tmp_path / "features").iterdir() if p.is_dir()}
    second = run(compose_config(smoke_overrides + ["extract.crops=tensor", "extract.num_workers=1"]), tmp_path / "tensor")
    new = {p.name for p in (tmp_path / "features").iterdir() if p.is_dir()} - folders
    assert second["counts"]["extracted_images"] == first["counts"]["extracted_images"] == 4 + 16  # nothing reused
    assert len(new) == 4 and all(".crop.L" in name for name in new)  # levels 0..3 (queries share L0)
    assert second["counts"]["gallery_patches"] == first["counts"]["gallery_patches"]
    assert second["mAP"] == pytest.approx(first["mAP"], abs=5.0)


def test_pool_mode_with_tensor_crops_describes_as_with_pil(smoke_overrides, ilias_fixture):
    pool = smoke_overrides + ["pyramid.mode=pool", "pyramid.pool_image_size=160", "pyramid.pool_split_block=1"]
    records = [ImageRecord(id=p.name, path=p) for p in sorted(ilias_fixture.glob("ilias_core/*/pos/*.jpg"))[:3]]
    pil = make_feature_source(compose_config(pool)).features(records, [0, 1, 2, 3])
    source = make_feature_source(compose_config(pool + ["extract.crops=tensor"]))
    tensor = source.features(records, [0, 1, 2, 3])
    assert source.stats[-1].extracted == 3  # the pooled levels too: nothing read from pil's caches
    assert np.array_equal(pil.boxes, tensor.boxes) and np.array_equal(pil.level, tensor.level)
    assert (pil.vectors * tensor.vectors).sum(axis=1).min() > 0.99
