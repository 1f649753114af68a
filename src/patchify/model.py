"""Model: a frozen timm encoder that maps an image batch to L2-normalised descriptors.

One door to every backbone: ``timm.create_model("name.tag", ...)``. Weights
come from the hub (``pretrained=true``), a local ``checkpoint`` file, or a
registry-packaged file converted by ``src.weights`` -- the last two are
loaded through timm's own pretrained path (``pretrained_cfg_overlay=
dict(file=...)``), so position embeddings are resampled by timm exactly as
for hub weights. Preprocessing comes from timm's data config of the model.

Descriptor = ``pool(block_output(layer))``, L2-normalised:

- ``layer``: ``-1`` the model's final features (``forward_features``, final
  norm included); ``b >= 0`` the output of block ``b`` (0-based, timm's
  ``forward_intermediates`` indices; stage index for CNNs), with the model's
  final norm applied when ``norm_intermediate`` (as DINOv2 does for its
  intermediate layers).
- ``pool``: ``cls`` (class token), ``mean`` (mean of patch tokens / spatial
  mean), ``gem`` (generalised mean, p=3, of ReLU'd activations), ``head``
  (the model's own pooling head, pre-logits: e.g. SigLIP's attention pool),
  ``projection`` (the model's full head, e.g. CLIP's image projection).

Precision (``extract.precision``, resolved by ``resolve_precision``): ``fp32``;
``fp16`` (CUDA) and ``bf16`` (CPU or CUDA) cast the whole encoder to that type
(bf16 on CPU also computes attention unfused: ``_unfuse_attention``);
the encoder casts its input to its own type, so queries and gallery, crops and
pool cells always run at the precision the model was loaded at. ``auto`` is fp16
on CUDA, bf16 on a CPU that runs bf16 natively (AVX512-BF16 or AMX), fp32
otherwise. Descriptors always leave as float32. Measured on the mini-ILIAS
(docs/BENCHMARKS.md, "Reduced precision"): bf16 keeps fp32's retrieval (crop L3 mAP
37.05 vs 37.29, LocScore@0.4 13.63 vs 13.69; every patch within cosine 0.9995 of
fp32's) at 2.75-2.9x crop mode's speed on a 2-core AVX512-BF16 CPU. A cast model, not
``torch.autocast``: as accurate (cosine to fp32 min 0.9998 vs 0.9999 on 240 crops) and
faster (3.25x vs 2.55x the encoder's fp32 speed). Dynamic int8 quantisation of the Linear
layers was measured and is not offered: mAP 32.79, cosine down to 0.94.

Resize (``model.resize``, every crop, query and gallery cell on its own): ``squash`` (default) resizes
it to the square input size, as the paper's patches are encoded; ``long_side`` is ILIAS's own
preprocessing (ilias-vrg/ilias ``feature_extraction``: ``LargeSideResize`` then
``MultiplierPadding``): the long side to the input size, aspect kept, then zero padding (the mean
colour, after normalisation) to a multiple of the patch size, split evenly with the odd pixel at the
bottom/right, and a ViT built with timm's ``dynamic_img_size`` at its native size (its position
embedding resampled to each input's token grid, as ILIAS's models are). docs/METRICS.md, "Preprocessing".
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from torch import nn

from .assets import sha256_of
from .weights import PACKAGED, checkpoint_sha256, packaged_checkpoint

POOLS = ("cls", "mean", "gem", "head", "projection")
RESIZES = ("squash", "long_side")  # model.resize
PRECISIONS = ("fp32", "fp16", "bf16")  # what extract.precision resolves to (and "auto")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelConfigError(ValueError):
    """A model setting that cannot work (one line)."""


def block_count(backbone: nn.Module) -> int | None:
    """How many outputs ``model.layer`` may pick: a ViT's blocks, a CNN's stages (timm's
    ``forward_intermediates`` indices); None when the backbone does not say."""
    if hasattr(backbone, "blocks") and hasattr(backbone, "num_prefix_tokens"):
        return len(backbone.blocks)
    if getattr(backbone, "stage_ends", None) is not None:
        return len(backbone.stage_ends)
    feature_info = getattr(backbone, "feature_info", None)
    return len(feature_info) if feature_info is not None else None


def check_layer(backbone: nn.Module, layer: int) -> None:
    """ModelConfigError unless ``layer`` is -1 (the final features) or one of the backbone's blocks."""
    count = block_count(backbone)
    if layer == -1 or (layer >= 0 and (count is None or layer < count)):
        return
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture") or type(backbone).__name__
    unit = "blocks" if hasattr(backbone, "blocks") and hasattr(backbone, "num_prefix_tokens") else "stages"
    allowed = f"in 0..{count - 1} ({name} has {count} {unit})" if count else ">= 0"
    raise ModelConfigError(f"model.layer={layer}: must be -1 (the final features) or a block index {allowed}")


class Encoder(nn.Module):
    """timm backbone + layer choice + pooling + L2 normalisation."""

    def __init__(self, backbone: nn.Module, layer: int, pool: str, norm_intermediate: bool = True,
                 gem_p: float = 3.0) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ModelConfigError(f"model.pool must be one of {POOLS}, got {pool!r}")
        if pool in ("head", "projection") and layer != -1:
            raise ModelConfigError(f"model.pool={pool} uses the model's own head and needs model.layer=-1, got {layer}")
        check_layer(backbone, layer)
        self.backbone = backbone.eval().requires_grad_(False)
        self.layer, self.pool, self.norm_intermediate, self.gem_p = layer, pool, norm_intermediate, gem_p
        self.is_vit = hasattr(backbone, "blocks") and hasattr(backbone, "num_prefix_tokens")
        if pool == "cls" and not (self.is_vit and backbone.num_prefix_tokens > 0):
            raise ModelConfigError("model.pool=cls needs a ViT with a class token; use mean, gem or head")

    @property
    def dtype(self) -> torch.dtype:
        """The type the encoder computes in (its weights'); inputs are cast to it."""
        return next(p.dtype for p in self.backbone.parameters() if p.is_floating_point())

    def block_outputs(self, images: torch.Tensor, layers: Sequence[int]) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """Per requested layer, in the order asked: (prefix tokens (B, P, C) or None,
        patch tokens (B, N, C) or feature map (B, C, H, W))."""
        net = self.backbone
        if list(layers) == [-1]:
            features = net.forward_features(images)
            if self.is_vit:
                prefix = net.num_prefix_tokens
                return [(features[:, :prefix], features[:, prefix:])]
            return [(None, features)]
        if any(layer < 0 for layer in layers):
            raise ModelConfigError(f"several layers in one pass must be block indices >= 0, got {list(layers)}")
        unique = sorted(set(layers))  # timm returns the blocks in ascending order
        # stop_early: blocks past the deepest one asked for are not run (timm runs them all
        # by default, e.g. a twelfth of a ViT-S's work wasted for layer 10).
        if self.is_vit:
            outputs = net.forward_intermediates(
                images, indices=unique, norm=self.norm_intermediate, output_fmt="NLC",
                intermediates_only=True, return_prefix_tokens=True, stop_early=True)
            by_layer = {layer: (prefix, patches) for layer, (patches, prefix) in zip(unique, outputs)}
        else:
            outputs = net.forward_intermediates(images, indices=unique, norm=self.norm_intermediate,
                                                intermediates_only=True, stop_early=True)
            by_layer = {layer: (None, feature_map) for layer, feature_map in zip(unique, outputs)}
        return [by_layer[layer] for layer in layers]

    def pool_tokens(self, prefix: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """The configured pooling of a block's output (prefix tokens, patch tokens), L2-normalised."""
        if self.pool == "cls":
            return F.normalize(prefix[:, 0].float(), dim=-1)
        tokens = tokens.float()
        dims = (1,) if tokens.ndim == 3 else (2, 3)
        if self.pool == "mean":
            pooled = tokens.mean(dim=dims)
        else:  # gem
            pooled = tokens.clamp(min=1e-6).pow(self.gem_p).mean(dim=dims).pow(1.0 / self.gem_p)
        return F.normalize(pooled, dim=-1)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, layers: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Descriptors (B, D) of each of ``layers`` (default: the configured layer), from one pass."""
        net = self.backbone
        layers = [self.layer] if layers is None else list(layers)
        images = images.to(self.dtype)
        if self.pool in ("head", "projection"):
            if layers != [-1]:
                raise ModelConfigError(f"model.pool={self.pool} uses the model's own head: layers must be [-1], got {layers}")
            if self.pool == "projection":
                return [F.normalize(net(images).float(), dim=-1)]
            return [F.normalize(net.forward_head(net.forward_features(images), pre_logits=True).float(), dim=-1)]
        return [self.pool_tokens(prefix, tokens) for prefix, tokens in self.block_outputs(images, layers)]


@dataclass
class LoadedModel:
    """An encoder with its preprocessing and the fingerprint that keys its caches."""

    encoder: Encoder
    transform: Callable[[Any], torch.Tensor]
    data_config: dict
    fingerprint: dict
    device: torch.device
    precision: str  # resolved: fp32, fp16 or bf16 (resolve_precision)
    dim: int

    @property
    def input_size(self) -> int:
        return int(self.data_config["input_size"][-1])

    @property
    def resize(self) -> str:
        """``squash`` or ``long_side`` (``model.resize``)."""
        return "long_side" if self.data_config.get("crop_mode") == "long_side" else "squash"

    def probe(self) -> torch.Tensor:
        """A blank (1, 3, S, S) input of the input size (padded to the patch size under long_side)."""
        size = padded_length(self.input_size, int(self.data_config.get("pad_multiple", 1)))
        return torch.zeros(1, 3, size, size, device=self.device)


def long_side_size(width: int, height: int, target: int) -> tuple[int, int]:
    """(width, height) with the long side ``target`` and the aspect kept, the short side truncated to
    whole pixels (at least 1), as ILIAS's ``LargeSideResize`` computes it."""
    aspect = height / width
    new_height = max(1, int(target * aspect) if aspect <= 1 else target)
    new_width = max(1, int(target / aspect) if aspect > 1 else target)
    return new_width, new_height


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """(..., H, W) zero-padded to multiples of ``multiple``, each side's padding split in two with the
    odd pixel at the bottom/right (ILIAS's ``MultiplierPadding``)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = padded_length(height, multiple) - height, padded_length(width, multiple) - width
    if not (pad_h or pad_w):
        return images
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class LongSideTransform:
    """``model.resize=long_side`` of one PIL image: long side to the input size (aspect kept, the
    model's interpolation), to tensor, normalised, padded to the patch size: (3, H', W') float32."""

    def __init__(self, data_config: dict) -> None:
        self.target = int(data_config["input_size"][-1])
        self.multiple = int(data_config.get("pad_multiple", 1))
        self.resample = Image.Resampling[str(data_config.get("interpolation", "bicubic")).upper()]
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(3, 1, 1)

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The resized (width, height) of a ``width`` x ``height`` image, before padding."""
        return long_side_size(width, height, self.target)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image.resize(self.size(*image.size), self.resample)).copy())
        tensor = pixels.permute(2, 0, 1).float().div_(255).sub_(self.mean).div_(self.std)
        return pad_to_multiple(tensor, self.multiple)


@lru_cache(maxsize=None)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): torch's own check, else the
    ``cpuinfo`` file's flags; False when neither says."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        with open(cpuinfo) as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision ``extract.precision`` means on ``device`` (a resolved device, not ``auto``):
    ``auto`` is fp16 on CUDA, bf16 on a CPU with native bf16, fp32 otherwise. ModelConfigError for
    a precision the device cannot run."""
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda":
            return "fp16"
        return "bf16" if kind == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ModelConfigError(f"extract.precision={precision}: must be auto or one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and kind != "cuda":
        raise ModelConfigError(f"extract.precision=fp16 runs on CUDA only (the device is {kind}); "
                               f"use bf16 or fp32")
    return precision


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelConfigError(f"extract.device={device} requested but no CUDA device is available")
    return torch.device(device)


def _weights_source(cfg: DictConfig) -> tuple[str | None, str]:
    """(local checkpoint path or None, readable weights identity for the cache key)."""
    if cfg.get("checkpoint"):
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise ModelConfigError(f"{path}: model.checkpoint file not found")
        return str(path), f"file:{sha256_of(path)}"
    if cfg.get("packaged"):
        if cfg.packaged not in PACKAGED:
            raise ModelConfigError(f"model.packaged={cfg.packaged!r} unknown; known: {sorted(PACKAGED)}")
        path = packaged_checkpoint(cfg.packaged)
        return str(path), f"file:{checkpoint_sha256(path)}"
    if cfg.get("pretrained", True):
        return None, f"hub:{cfg.timm_name}{'.' + cfg.tag if cfg.get('tag') else ''}"
    return None, "random-init:seed0"


def _create_backbone(cfg: DictConfig, checkpoint: str | None, dynamic: bool = False) -> nn.Module:
    """The timm backbone; ``dynamic`` (long_side): built at its native size with ``dynamic_img_size``."""
    name = f"{cfg.timm_name}.{cfg.tag}" if cfg.get("tag") else cfg.timm_name
    kwargs: dict[str, Any] = {}
    if cfg.pool != "projection":
        kwargs["num_classes"] = 0
    if checkpoint:
        kwargs["pretrained_cfg_overlay"] = dict(file=checkpoint)
    pretrained = bool(checkpoint) or bool(cfg.get("pretrained", True))
    if dynamic:
        kwargs["dynamic_img_size"] = True
    elif cfg.image_size and cfg.image_size > 0:
        kwargs["img_size"] = int(cfg.image_size)
    try:
        return _timm_create(name, pretrained, kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        kwargs.pop("img_size", None)  # CNNs take any input size; the data config sets it
        kwargs.pop("dynamic_img_size", None)
        return _timm_create(name, pretrained, kwargs)


def _timm_create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with hub and architecture failures turned into one-line errors."""
    if not pretrained:
        torch.manual_seed(0)  # random weights (tests) must be the same in every process: they key caches
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as err:  # hub unreachable and not in the local Hugging Face cache
        raise ModelConfigError(
            f"cannot fetch pretrained weights of timm model {name!r} ({type(err).__name__}); without network, "
            f"set model.checkpoint=FILE or fill the Hugging Face cache and set HF_HUB_OFFLINE=1") from None
    except RuntimeError as err:
        raise ModelConfigError(f"cannot create timm model {name!r} (pretrained={pretrained}): {str(err).splitlines()[0]}") from None


def check_checkpoint_covers(model: nn.Module, checkpoint: str) -> None:
    """ModelConfigError unless the file holds every backbone weight (timm loads leniently
    when the classifier is dropped, so foreign keys would silently leave random weights)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    missing = [k for k in model.state_dict() if k not in state and not (heads and k.startswith(heads))]
    if missing:
        raise ModelConfigError(f"{checkpoint}: checkpoint lacks {len(missing)} weights of {type(model).__name__} "
                               f"(e.g. {missing[0]!r}); is it for another architecture?")


def _unfuse_attention(encoder: nn.Module) -> None:
    """bf16 on CPU: timm's attention as two batched matmuls and a softmax (oneDNN bf16 matmuls) instead
    of PyTorch's fused CPU attention kernel, which gains nothing from bf16. Measured on 240 real crops:
    1.24x the whole encoder's speed, cosine to fp32 min 0.99983 (fused: 0.99987)."""
    for module in encoder.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False


def load_model(cfg: DictConfig, device: str = "auto", precision: str = "fp32") -> LoadedModel:
    """Build the encoder, its eval transform and its cache fingerprint from ``cfg.model``."""
    resize = str(cfg.get("resize", "squash"))
    if resize not in RESIZES:
        raise ModelConfigError(f"model.resize={resize}: must be one of {', '.join(RESIZES)}")
    checkpoint, weights_id = _weights_source(cfg)
    backbone = _create_backbone(cfg, checkpoint, dynamic=resize == "long_side")
    if checkpoint:
        check_checkpoint_covers(backbone, checkpoint)
    data_config = timm.data.resolve_model_data_config(backbone)
    if cfg.image_size and cfg.image_size > 0:
        data_config["input_size"] = (3, int(cfg.image_size), int(cfg.image_size))
    # Patches are resized whole to the input size: a centre crop would cut the
    # patch's borders, where the object may sit.
    data_config.update(crop_pct=1.0, crop_mode="squash")
    transform = timm.data.create_transform(**data_config, is_training=False)
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if resize == "long_side":  # enters the fingerprint's preprocessing below (squash's stays as it was)
        data_config.update(crop_mode="long_side", pad_multiple=int(patch[0]) if patch is not None else 1)
        transform = LongSideTransform(data_config)
    encoder = Encoder(backbone, layer=int(cfg.layer), pool=cfg.pool,
                      norm_intermediate=bool(cfg.get("norm_intermediate", True)))
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    encoder = encoder.to(torch_device, dtype=DTYPES[precision])
    if precision == "bf16" and torch_device.type == "cpu":
        _unfuse_attention(encoder)
    fingerprint = {
        "timm_name": cfg.timm_name, "tag": cfg.get("tag"), "weights": weights_id,
        "layer": int(cfg.layer), "pool": cfg.pool, "norm_intermediate": bool(cfg.get("norm_intermediate", True)),
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(data_config.items())},
        "precision": precision,
    }
    size = int(data_config["input_size"][-1])
    # A size chosen here must fill whole patches (pool mode maps tokens to pixels); a model's native size
    # need not: SigLIP SO400M/14 runs at 384 px as trained, its 27x27 patches leaving 6 px unread.
    if patch is not None and size % int(patch[0]) and resize == "squash" and cfg.image_size and cfg.image_size > 0:
        raise ModelConfigError(f"model.image_size={cfg.image_size}: input size {size} is not a multiple of the patch "
                               f"size {int(patch[0])} of {cfg.timm_name}")
    loaded = LoadedModel(encoder, transform, data_config, fingerprint, torch_device, precision, 0)
    return replace(loaded, dim=int(encoder(loaded.probe())[0].shape[-1]))


def encode(model: LoadedModel, batch: torch.Tensor, layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Descriptors (B, D) float32 on CPU for a preprocessed batch, one tensor per layer (computed at
    the model's precision: the encoder casts the batch)."""
    batch = batch.to(model.device, non_blocking=True)
    return [out.float().cpu() for out in model.encoder(batch, layers)]


def with_layer(model: LoadedModel, layer: int) -> LoadedModel:
    """The same loaded encoder described at another block (fingerprint and width changed accordingly)."""
    if model.encoder.pool in ("head", "projection") and layer != -1:
        raise ModelConfigError(f"model.pool={model.encoder.pool} uses the model's own head and needs layer -1, got {layer}")
    check_layer(model.encoder.backbone, layer)
    dim = int(model.encoder(model.probe(), [layer])[0].shape[-1])
    return replace(model, fingerprint={**model.fingerprint, "layer": int(layer)}, dim=dim)


__all__ = ["Encoder", "LoadedModel", "LongSideTransform", "ModelConfigError", "block_count", "check_layer",
           "cpu_has_native_bf16", "encode", "load_model", "long_side_size", "pad_to_multiple", "resolve_device",
           "resolve_precision", "with_layer", "POOLS", "PRECISIONS", "RESIZES"]
