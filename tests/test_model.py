"""Tests for src/patchify/model.py with timm's tiny random test models (no downloads, CPU only)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import compose_config
from omegaconf import OmegaConf
from PIL import Image

from patchify.data import read_folder
from patchify.extraction import FeatureStore, extract_missing
from patchify.model import Encoder, ModelConfigError, encode, load_model, resolve_device, with_layer

FINGERPRINT_KEYS = {"timm_name", "tag", "weights", "layer", "pool", "norm_intermediate", "preprocess", "precision"}


def _cfg(**overrides):
    """A model config like configs/model/test_vit.yaml."""
    base = dict(name="test_vit", timm_name="test_vit", tag=None, pretrained=False, checkpoint=None, packaged=None,
                image_size=0, layer=-1, pool="cls", norm_intermediate=True)
    return OmegaConf.create({**base, **overrides})


def _images(n: int = 3, size: int = 160, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _backbone(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=0, **kwargs).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest (and disturb other work least) on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vit():
    return load_model(compose_config(["model=test_vit"]).model, device="cpu")


@pytest.fixture(scope="module")
def images():
    return _images()


# ----------------------------------------------------------------------------- descriptors


def test_output_is_l2_normalised_with_model_dim(vit, images):
    out = encode(vit, images)
    assert isinstance(out, list) and len(out) == 1
    assert out[0].shape == (3, 64) and out[0].dtype == torch.float32
    assert vit.dim == 64 and vit.input_size == 160 and vit.precision == "fp32" and vit.device.type == "cpu"
    assert torch.allclose(out[0].norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(out[0][0], out[0][1])  # different images, different descriptors


def test_transform_squashes_whole_patch_to_input_size(vit):
    assert vit.data_config["crop_pct"] == 1.0 and vit.data_config["crop_mode"] == "squash"
    wide = Image.new("RGB", (300, 60), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 60))  # a thin blue strip at the left border must survive (no centre crop)
    tensor = vit.transform(wide)
    assert tensor.shape == (3, 160, 160)
    assert tensor[2, 80, 0] > tensor[0, 80, 0]  # left column is blue: blue channel > red channel


def test_load_model_is_deterministic_across_loads(vit, images):
    again = load_model(_cfg(), device="cpu")
    assert again.fingerprint == vit.fingerprint
    assert torch.equal(encode(again, images)[0], encode(vit, images)[0])


def test_pools_match_their_definitions_and_differ():
    backbone = _backbone()
    x = _images()
    with torch.no_grad():
        features = backbone.forward_features(x)
    patches = features[:, backbone.num_prefix_tokens:]
    out = {pool: Encoder(backbone, -1, pool)(x)[0] for pool in ("cls", "mean", "gem", "head")}
    assert torch.allclose(out["cls"], F.normalize(features[:, 0], dim=-1), atol=1e-6)
    assert torch.allclose(out["mean"], F.normalize(patches.mean(1), dim=-1), atol=1e-6)
    gem = patches.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)
    assert torch.allclose(out["gem"], F.normalize(gem, dim=-1), atol=1e-5)
    for a, b in [("cls", "mean"), ("cls", "gem"), ("mean", "gem")]:
        assert not torch.allclose(out[a], out[b], atol=1e-3), (a, b)
    # test_vit's own head pools the class token: pool=head must then equal pool=cls.
    assert backbone.global_pool == "token"
    assert torch.allclose(out["head"], out["cls"], atol=1e-6)


def test_head_pool_uses_the_models_attention_pool():
    backbone = _backbone(global_pool="map")  # SigLIP-style attention-pool head
    x = _images()
    out = {pool: Encoder(backbone, -1, pool)(x)[0] for pool in ("cls", "mean", "gem", "head")}
    for other in ("cls", "mean", "gem"):
        assert not torch.allclose(out["head"], out[other], atol=1e-3), other
    assert torch.allclose(out["head"].norm(dim=1), torch.ones(3), atol=1e-5)


def test_load_model_pool_setting_changes_descriptors_and_fingerprint(vit, images):
    mean = load_model(_cfg(pool="mean"), device="cpu")
    assert mean.fingerprint["pool"] == "mean" and vit.fingerprint["pool"] == "cls"
    assert not torch.allclose(encode(mean, images)[0], encode(vit, images)[0], atol=1e-3)


def test_inner_block_differs_from_final_layer():
    backbone = _backbone()
    x = _images()
    final = Encoder(backbone, -1, "cls")(x)[0]
    inner = Encoder(backbone, 2, "cls")(x)[0]
    last_block = Encoder(backbone, len(backbone.blocks) - 1, "cls")(x)[0]
    unnormed = Encoder(backbone, 2, "cls", norm_intermediate=False)(x)[0]
    assert inner.shape == final.shape == (3, 64)
    assert not torch.allclose(inner, final, atol=1e-3)
    assert not torch.allclose(inner, unnormed, atol=1e-3)
    # the last block plus the final norm is exactly forward_features
    assert torch.allclose(last_block, final, atol=1e-5)


@pytest.mark.parametrize("name,layer", [("test_vit", 1), ("test_efficientnet", 1)])
def test_inner_layer_runs_no_later_block_and_matches_a_hand_run(name, layer):
    torch.manual_seed(0)
    backbone = timm.create_model(name, pretrained=False, num_classes=0).eval()
    blocks = backbone.blocks
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x = _images(2)
    out = Encoder(backbone, layer, "mean")(x)[0]
    assert calls[:layer + 1] == [1] * (layer + 1) and calls[layer + 1:] == [0] * (len(blocks) - layer - 1)
    with torch.no_grad():  # the same block run by hand, every later block left out
        if name == "test_vit":
            h = backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(x)))
            for block in blocks[:layer + 1]:
                h = block(h)
            expected = backbone.norm(h)[:, backbone.num_prefix_tokens:].mean(1)
        else:
            h = backbone.bn1(backbone.conv_stem(x))
            for block in blocks[:layer + 1]:
                h = block(h)
            expected = h.mean((2, 3))
    assert torch.allclose(out, F.normalize(expected, dim=-1), atol=1e-5)


def test_inner_layer_via_config(vit, images):
    inner = load_model(_cfg(layer=1), device="cpu")
    assert inner.fingerprint["layer"] == 1 and inner.dim == 64
    assert not torch.allclose(encode(inner, images)[0], encode(vit, images)[0], atol=1e-3)


def test_several_layers_in_one_pass_equal_single_passes(vit, images):
    both = vit.encoder(images, layers=[0, 1])
    assert len(both) == 2
    for layer, out in zip([0, 1], both):
        single = vit.encoder(images, layers=[layer])
        assert len(single) == 1
        assert torch.allclose(out, single[0], atol=1e-6), layer
    assert not torch.allclose(both[0], both[1], atol=1e-3)
    via_encode = encode(vit, images, [0, 1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(via_encode, both))


def test_layers_out_of_order_keep_the_requested_order(vit, images):
    single = {layer: vit.encoder(images, layers=[layer])[0] for layer in (0, 1)}
    out = vit.encoder(images, layers=[1, 0])
    assert len(out) == 2
    assert torch.allclose(out[0], single[1], atol=1e-6) and torch.allclose(out[1], single[0], atol=1e-6)


def test_final_layer_mixed_with_blocks_is_an_error(vit, images):
    with pytest.raises(ModelConfigError, match="block indices"):
        vit.encoder(images, layers=[-1, 0])


# ----------------------------------------------------------------------------- with_layer


def test_with_layer_changes_only_the_fingerprints_layer(vit):
    before = json.loads(json.dumps(vit.fingerprint))
    other = with_layer(vit, 2)
    assert other.fingerprint == {**vit.fingerprint, "layer": 2}
    assert other.fingerprint != vit.fingerprint
    assert vit.fingerprint == before  # the original is untouched
    assert other.dim == vit.dim and other.encoder is vit.encoder
    assert other.data_config == vit.data_config and other.device == vit.device


def test_single_with_layer_model_extracts_its_own_block(vit, tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(2):
        image = Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8))
        image.save(tmp_path / "images" / f"{i}.png")
    records = read_folder(tmp_path / "images").gallery
    vectors = {}
    # ascending block order in the pair, so that only the single-model path is under test
    for name, models in (("single", [with_layer(vit, 2)]), ("pair", [with_layer(vit, 0), with_layer(vit, 2)])):
        stores = [FeatureStore(tmp_path / name, "test_vit", m.fingerprint, 0, "crop", "full") for m in models]
        for store in stores:
            store.open()
        extract_missing(stores, records, models, batch_size=4, num_workers=0, chunk_size=4, desc=name)
        vectors[name] = stores[-1].gather(records, expected_dim=64)[0].vectors
    assert vectors["single"].shape == vectors["pair"].shape == (2, 64)
    # both stores carry the fingerprint of block 2, so they must hold the same vectors
    assert np.allclose(vectors["single"], vectors["pair"], atol=1e-5)


def test_with_layer_on_head_pool_is_an_error():
    head = load_model(_cfg(pool="head"), device="cpu")
    with pytest.raises(ModelConfigError):
        with_layer(head, 1)


def test_head_pool_refuses_inner_layers(images):
    encoder = Encoder(_backbone(), -1, "head")
    assert len(encoder(images, layers=[-1])) == 1
    with pytest.raises(ModelConfigError, match="own head"):
        encoder(images, layers=[0, 1])  # the head only describes the final block


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("pool,layer", [("head", 0), ("head", 3), ("projection", 1)])
def test_own_head_pools_need_final_layer(pool, layer):
    with pytest.raises(ModelConfigError, match="model.layer=-1"):
        load_model(_cfg(pool=pool, layer=layer), device="cpu")


@pytest.mark.parametrize("pool", ["max", "CLS", ""])
def test_unknown_pool(pool):
    with pytest.raises(ModelConfigError, match="model.pool must be one of"):
        load_model(_cfg(pool=pool), device="cpu")


def test_cls_pool_on_a_cnn_is_an_error():
    with pytest.raises(ModelConfigError, match="class token"):
        load_model(_cfg(name="cnn", timm_name="test_efficientnet", pool="cls", norm_intermediate=False), device="cpu")


@pytest.mark.parametrize("pool", ["mean", "gem"])
def test_cnn_mean_and_gem_pools(pool, images):
    cnn = load_model(_cfg(name="cnn", timm_name="test_efficientnet", pool=pool, norm_intermediate=False), device="cpu")
    out = encode(cnn, images)[0]
    assert out.shape == (3, cnn.dim) and cnn.dim > 0
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    if pool == "gem":
        mean = Encoder(cnn.encoder.backbone, -1, "mean")(images)[0]
        assert not torch.allclose(out, mean, atol=1e-3)


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "absent" / "weights.pth"
    with pytest.raises(ModelConfigError, match="checkpoint file not found") as err:
        load_model(_cfg(checkpoint=str(path)), device="cpu")
    assert str(path) in str(err.value)


def test_unknown_timm_architecture():
    with pytest.raises(ModelConfigError, match="no_such_architecture"):
        load_model(_cfg(timm_name="no_such_architecture"), device="cpu")


def test_unknown_packaged_weights():
    with pytest.raises(ModelConfigError, match="model.packaged"):
        load_model(_cfg(packaged="no_such_package"), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda():
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ModelConfigError, match="no CUDA device"):
        resolve_device("cuda:0")


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture
def saved_vit(tmp_path):
    """A test_vit with weights other than seed 0's, saved as a plain state_dict."""
    model = _backbone(seed=123)
    path = tmp_path / "test_vit_weights.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_local_checkpoint_reproduces_saved_model(saved_vit, vit, images):
    model, path = saved_vit
    loaded = load_model(_cfg(checkpoint=str(path)), device="cpu")
    expected = Encoder(model, -1, "cls")(images)[0]
    assert torch.equal(encode(loaded, images)[0], expected)
    assert not torch.allclose(expected, encode(vit, images)[0], atol=1e-3)  # not the random init
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.encoder.backbone.state_dict()[name], tensor), name
    assert loaded.fingerprint["weights"] == "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert vit.fingerprint["weights"] == "random-init:seed0"


def test_checkpoint_with_classifier_head_loads(tmp_path, images):
    torch.manual_seed(7)
    full = timm.create_model("test_vit", pretrained=False).eval()  # 1000-class head included
    path = tmp_path / "full.pth"
    torch.save(full.state_dict(), path)
    loaded = load_model(_cfg(checkpoint=str(path)), device="cpu")
    expected = F.normalize(full.forward_features(images)[:, 0], dim=-1)
    assert torch.allclose(encode(loaded, images)[0], expected, atol=1e-6)


def test_changed_checkpoint_changes_fingerprint(saved_vit, tmp_path):
    _, path = saved_vit
    first = load_model(_cfg(checkpoint=str(path)), device="cpu").fingerprint
    torch.save(_backbone(seed=5).state_dict(), path)
    second = load_model(_cfg(checkpoint=str(path)), device="cpu").fingerprint
    assert first["weights"] != second["weights"]
    assert {k: v for k, v in first.items() if k != "weights"} == {k: v for k, v in second.items() if k != "weights"}


def test_user_checkpoint_weights_id_ignores_stale_sidecar(saved_vit):
    _, path = saved_vit
    path.with_name(path.name + ".sha256").write_text("0" * 64 + "\n")  # stale / foreign sidecar
    fingerprint = load_model(_cfg(checkpoint=str(path)), device="cpu").fingerprint
    assert fingerprint["weights"] == "file:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_with_foreign_keys_is_an_error(saved_vit, tmp_path):
    model, _ = saved_vit
    path = tmp_path / "foreign.pth"
    torch.save({"visual." + k: v for k, v in model.state_dict().items()}, path)
    with pytest.raises(ModelConfigError):
        load_model(_cfg(checkpoint=str(path)), device="cpu")


# ----------------------------------------------------------------------------- image size and fingerprint


def test_image_size_override(vit):
    small = load_model(_cfg(image_size=64), device="cpu")
    assert small.data_config["input_size"] == (3, 64, 64) and small.input_size == 64
    assert small.fingerprint["preprocess"]["input_size"] == [3, 64, 64]
    assert vit.fingerprint["preprocess"]["input_size"] == [3, 160, 160]
    assert small.fingerprint != vit.fingerprint
    assert small.transform(Image.new("RGB", (200, 100))).shape == (3, 64, 64)
    out = encode(small, _images(2, 64))[0]
    assert out.shape == (2, 64)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_fingerprint_has_only_content_settings(vit):
    fingerprint = vit.fingerprint
    assert set(fingerprint) == FINGERPRINT_KEYS
    json.dumps(fingerprint)  # plain JSON: no tensors, dtypes or devices hiding behind default=str
    assert fingerprint["precision"] == "fp32"
    assert fingerprint["timm_name"] == "test_vit" and fingerprint["layer"] == -1
    assert set(fingerprint["preprocess"]) >= {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"}
    text = json.dumps(fingerprint).lower()
    for word in ("cpu", "cuda", "batch", "worker", "device", "chunk"):
        assert word not in text, word


def test_fingerprint_independent_of_extract_settings(vit):
    for overrides in (["model=test_vit", "extract.batch_size=1", "extract.num_workers=7", "extract.chunk_size=3",
                       "extract.precision=fp32"],  # precision does change it (tests/test_precision.py)
                      ["model=test_vit", "extract.batch_size=512", "extract.device=cpu", "extract.precision=fp32"]):
        cfg = compose_config(overrides)
        loaded = load_model(cfg.model, device="cpu", precision=cfg.extract.precision)  # device=auto on a GPU box
        assert loaded.fingerprint == vit.fingerprint
