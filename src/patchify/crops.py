"""Crops as tensor operations: decode an image once, cut and resize all its pyramid cells on a device.

``extract.crops=tensor`` (default ``pil``, src/patchify/extraction.py ``PatchTransform``): a DataLoader worker
decodes each image to one uint8 tensor (:func:`decode_rgb`), and the main process cuts every cell of
every level and resizes them on the model's device, a few batched ``interpolate`` calls per image
(:class:`TensorCrops`), so on a GPU the loader no longer does per-crop work.

Decoding equals ``src.data.load_image`` pixel for pixel: JPEG (RGB, grayscale, Adobe CMYK) and PNG
(RGB, grayscale, 1-bit, palette, alpha, 16-bit) go through ``torchvision.io``'s libjpeg-turbo / libpng
decoders, with PIL's own reading of the header for the mode and the EXIF orientation (so the rotation
is the one ``ImageOps.exif_transpose`` applies) and PIL's arithmetic for alpha on white and 16-bit
gray; anything else (other formats and modes, a PNG whose orientation PIL could only find by decoding
it, a file torchvision refuses) is decoded by ``load_image`` itself, so every image that decodes today
decodes, and one that fails fails with today's message.

Resizing reproduces PIL's resize (timm's squash ``Resize``, crop_pct 1): torch's antialiased
bicubic and bilinear are PIL's filters (bicubic a = -0.5; support scaled when reducing), run as PIL
runs them, one axis at a time with the intermediate rounded to 8 bits, vertical first when the
height shrinks more than twice as much as the width (Pillow >= 13's order). What is left is PIL's
fixed-point rounding: crops differ from PIL's by at most 2 levels of 8 bits at ~1e-4 of the values
(tests/test_crops.py), so ``tensor`` is a preprocessing of its own in the cache key
(``preprocess.crops``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io as tvio
from PIL import Image

from .data import load_image
from .model import LoadedModel, ModelConfigError
from .tar_images import read_image_bytes

CROP_METHODS = ("pil", "tensor")

# PIL's Image.transpose method of each EXIF orientation (ImageOps.exif_transpose), as tensor ops on (C, H, W).
_ORIENT = {
    2: lambda t: t.flip(-1),                                # FLIP_LEFT_RIGHT
    3: lambda t: t.flip(-1, -2),                            # ROTATE_180
    4: lambda t: t.flip(-2),                                # FLIP_TOP_BOTTOM
    5: lambda t: t.transpose(-1, -2),                       # TRANSPOSE
    6: lambda t: t.transpose(-1, -2).flip(-1),              # ROTATE_270 (clockwise quarter turn)
    7: lambda t: t.transpose(-1, -2).flip(-1, -2),          # TRANSVERSE
    8: lambda t: t.transpose(-1, -2).flip(-2),              # ROTATE_90 (counter-clockwise quarter turn)
}
# PNG markers of an orientation PIL only finds after decoding (eXIf after the pixels, raw-profile or XMP).
_LATE_ORIENTATION = (b"eXIf", b"Raw profile type exif", b"tiff:Orientation")


# ----------------------------------------------------------------------------- models

def crop_method(model: LoadedModel) -> str:
    """How crops of ``model`` are made: ``pil`` unless its fingerprint says ``tensor``."""
    return str(model.fingerprint.get("preprocess", {}).get("crops", "pil"))


def with_crops(model: LoadedModel, crops: str) -> LoadedModel:
    """``model`` whose crops are made by ``crops`` (pil | tensor); ``tensor`` enters the fingerprint's
    preprocessing (so its caches, indices and bundles are its own) and ``pil`` leaves it as it was."""
    if crops not in CROP_METHODS:
        raise ValueError(f"extract.crops must be one of {CROP_METHODS}, got {crops!r}")
    preprocess = {k: v for k, v in model.fingerprint["preprocess"].items() if k != "crops"}
    if crops != "pil":
        TensorCrops(model.data_config)  # ModelConfigError now, before any work, for a resize it cannot do
        preprocess["crops"] = crops
    return replace(model, fingerprint={**model.fingerprint, "preprocess": preprocess})


# ----------------------------------------------------------------------------- decoding

def decode_rgb(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB of an image file or tar member (src/patchify/tar_images.py), EXIF orientation
    applied: ``np.asarray(load_image(path))`` transposed, from torchvision's decoders (given the bytes)
    where they give exactly that; DataError as load_image."""
    try:
        image = _decode_fast(Path(path))
    except Exception:  # anything torchvision or the header reader refuses: PIL decides, and words the error
        image = None
    if image is None:
        return torch.from_numpy(np.array(load_image(path), dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return image


def _decode_fast(path: Path) -> torch.Tensor | None:
    """The torchvision decode of a JPEG or PNG whose mode and orientation are known to match
    load_image; None when PIL must decode it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        data = read_image_bytes(path)  # a file's or a tar member's bytes
        with Image.open(io.BytesIO(data)) as header:  # parses the header only
            fmt, mode, info = header.format, header.mode, header.info
            if fmt in ("JPEG", "MPO"):
                if mode not in ("RGB", "L") and not (mode == "CMYK" and "adobe" in info):
                    return None
                orientation = header.getexif().get(0x0112, 1)  # EXIF or XMP, as exif_transpose reads it
            elif fmt == "PNG":
                if "exif" in info:
                    orientation = header.getexif().get(0x0112, 1)
                elif any(marker in data for marker in _LATE_ORIENTATION):
                    return None
                else:
                    orientation = 1
            else:
                return None
    alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in info)
    gray16 = mode in ("I;16", "I;16B", "I;16L", "I")
    if mode not in ("RGB", "L", "1", "P", "CMYK", "RGBA", "LA") and not gray16:
        return None
    readmode = tvio.ImageReadMode
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they are still
        # libjpeg-turbo and libpng, and PIL takes over the day they are gone.
        warnings.simplefilter("ignore", DeprecationWarning)
        if fmt in ("JPEG", "MPO"):
            image = tvio.decode_jpeg(buffer, mode=readmode.RGB)
        else:
            image = tvio.decode_png(buffer, mode=readmode.UNCHANGED if gray16 else
                                    readmode.RGB_ALPHA if alpha else readmode.RGB)
    if gray16:
        if image.shape[0] != 1:
            return None
        values = image.to(torch.float64)  # load_image: scaled by the image's maximum, truncated to 8 bits
        top = float(values.max()) or 1.0
        image = (values * (255.0 / top)).to(torch.uint8).expand(3, -1, -1)
    elif image.dtype != torch.uint8:  # 16-bit colour: PIL keeps the high byte
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if alpha:
        image = composite_on_white(image)
    if orientation in _ORIENT:
        image = _ORIENT[orientation](image)
    return image.contiguous()


def composite_on_white(rgba: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 of a (4, H, W) uint8 image pasted on white with its alpha as mask, in PIL's
    integer arithmetic (Paste.c BLEND: (255 * (255 - a) + c * a + 128) / 255, rounded by shifts)."""
    colour, alpha = rgba[:3].to(torch.int32), rgba[3:].to(torch.int32)
    blend = 255 * (255 - alpha) + colour * alpha + 128
    return (((blend >> 8) + blend) >> 8).to(torch.uint8)


def crop_region(image: torch.Tensor, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    """``image[:, y0:y1, x0:x1]`` as PIL's ``crop`` cuts it: parts outside the image are black."""
    height, width = image.shape[-2:]
    if 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height:
        return image[:, y0:y1, x0:x1].clone()
    out = image.new_zeros(image.shape[0], y1 - y0, x1 - x0)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if sx0 < sx1 and sy0 < sy1:
        out[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[:, sy0:sy1, sx0:sx1]
    return out


# ----------------------------------------------------------------------------- cutting and resizing

class TensorCrops:
    """timm's eval transform of a model (squash resize to the input size, to tensor, normalise) for
    all the cells of one decoded image at once, on a device: the tensor twin of ``PatchTransform``."""

    def __init__(self, data_config: dict) -> None:
        if data_config.get("crop_mode") != "squash" or float(data_config.get("crop_pct", 1.0)) != 1.0:
            raise ValueError("TensorCrops reproduces the squash resize (crop_pct 1) only")
        self.mode = data_config.get("interpolation", "bicubic")
        if self.mode not in ("bicubic", "bilinear"):  # torch's antialiased filters are PIL's for these two
            raise ModelConfigError(f"extract.crops=tensor: resizes bicubic or bilinear, but this model's "
                                   f"preprocessing resizes {self.mode!r}; set extract.crops=pil")
        self.width, self.height = int(data_config["input_size"][-1]), int(data_config["input_size"][-2])
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, image: torch.Tensor, boxes: np.ndarray | Sequence,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        """(n, 3, H, W) float32 on ``device`` of the ``boxes`` (x, y, w, h, whole pixels inside the
        image) of ``image`` ((3, H, W) uint8, any device and layout), in the order of ``boxes``."""
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        if not len(boxes):
            return torch.zeros(0, 3, self.height, self.width, device=device)
        pixels = image.to(device).to(torch.float32)  # 8-bit over the bus, converted there
        groups: dict[tuple[int, int], list[int]] = {}
        for position, (_, _, w, h) in enumerate(boxes.tolist()):
            groups.setdefault((w, h), []).append(position)
        resized, order = [], []
        for (w, h), positions in groups.items():  # cells of one level differ by at most a pixel: <= 4 groups
            cells = torch.stack([pixels[:, y:y + h, x:x + w] for x, y, _, _ in boxes[positions].tolist()])
            resized.append(self.resize(cells))
            order += positions
        out = torch.cat(resized) if len(resized) > 1 else resized[0]
        if order != sorted(order):  # back to the order of the boxes
            out = out[torch.as_tensor(np.argsort(order), device=out.device)]
        mean, std = self._constants(out.device)
        return out.div_(255).sub_(mean).div_(std)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std on ``device`` (copied there once)."""
        if self.mean.device != device:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self.mean, self.std

    def resize(self, cells: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) float 0..255 -> (n, 3, H, W) float 0..255 in whole levels, as PIL resizes 8-bit
        images: antialiased filter one axis at a time, each pass rounded half up and clipped to 0..255."""
        h, w = cells.shape[-2:]
        vertical_first = h - self.height > 0 and h - self.height > 2 * (w - self.width)
        sizes = [(self.height, w), (self.height, self.width)] if vertical_first else \
            [(h, self.width), (self.height, self.width)]
        for size in sizes:
            if tuple(cells.shape[-2:]) != size:
                cells = F.interpolate(cells, size=size, mode=self.mode, antialias=True, align_corners=False)
                cells = cells.add_(0.5).floor_().clamp_(0, 255)
        return cells
