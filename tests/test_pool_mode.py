"""Pool mode: every pyramid cell of an image from one shared encoder pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_config

from patchify.extraction import token_cells
from patchify.pool_cells import describe_cells
from patchify.model import ModelConfigError, load_model
from patchify.pipeline import run


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model(compose_config(["model=test_vit", "model.layer=-1"]).model, device="cpu")


def test_token_cells_tile_the_grid():
    cells = token_cells(10, 10, [0, 1, 2, 3])
    for level, level_cells in cells.items():
        cover = np.zeros((10, 10), int)
        for r0, r1, c0, c1 in level_cells:
            cover[r0:r1, c0:c1] += 1
        assert len(level_cells) == (level + 1) ** 2 and (cover == 1).all()


@pytest.mark.parametrize("method", ["split", "masked"])
@pytest.mark.parametrize("split", [0, 1, 2])
def test_whole_grid_cell_is_a_normal_forward(model, method, split):
    images = torch.randn(2, 3, 160, 160)
    rows, cols = model.encoder.backbone.patch_embed.grid_size
    pooled = describe_cells(model.encoder, images, [(0, rows, 0, cols)], split, method)[0]
    assert torch.allclose(pooled[:, 0], model.encoder(images)[0], atol=1e-5)


@pytest.mark.parametrize("method", ["split", "masked"])
def test_cells_see_only_their_tokens_after_the_split(model, method):
    """With every block shared (split = depth), all cells get the same class token; with
    fewer shared blocks, cells differ: the blocks with cell tokens are what localises."""
    images = torch.randn(1, 3, 160, 160)
    cells = token_cells(10, 10, [1])[1]
    depth = len(model.encoder.backbone.blocks)
    shared = describe_cells(model.encoder, images, cells, depth, method)[0]
    assert torch.allclose(shared[0, 0], shared[0, 3], atol=1e-6)
    local = describe_cells(model.encoder, images, cells, 1, method)[0]
    assert not torch.allclose(local[0, 0], local[0, 3], atol=1e-3)


def test_split_cells_ignore_the_rest_of_the_image(model):
    """split from block 0 is a crop of the token grid: pixels outside a cell cannot reach it."""
    images = torch.randn(1, 3, 160, 160)
    changed = images.clone()
    changed[:, :, 80:, :] = torch.randn(1, 3, 80, 160)  # bottom half only
    cells = token_cells(10, 10, [1])[1]  # top-left, top-right, bottom-left, bottom-right
    before = describe_cells(model.encoder, images, cells, 0, "split")[0]
    after = describe_cells(model.encoder, changed, cells, 0, "split")[0]
    assert torch.allclose(before[0, :2], after[0, :2], atol=1e-5)
    assert not torch.allclose(before[0, 2:], after[0, 2:], atol=1e-3)


def test_masked_cell_tokens_leave_the_image_tokens_untouched():
    """In masked mode the image's tokens are exactly a normal forward: mean-pooling a cell
    equals the mean of the normal forward's tokens in that cell."""
    torch.set_num_threads(1)
    mean_model = load_model(compose_config(["model=test_vit", "model.layer=-1", "model.pool=mean"]).model, device="cpu")
    encoder = mean_model.encoder
    images = torch.randn(2, 3, 160, 160)
    cells = token_cells(10, 10, [0, 2])
    cells = cells[0] + cells[2]
    pooled = describe_cells(encoder, images, cells, 1, "masked")[0]
    tokens = encoder.block_outputs(images, [-1])[0][1].reshape(2, 10, 10, -1)
    for i, (r0, r1, c0, c1) in enumerate(cells):
        expected = torch.nn.functional.normalize(tokens[:, r0:r1, c0:c1].mean(dim=(1, 2)), dim=-1)
        assert torch.allclose(pooled[:, i], expected, atol=1e-5)


@pytest.mark.parametrize("cell", [(0, 5, 5, 10), (3, 9, 2, 6)])
def test_split_from_block_0_with_local_positions_is_a_crop(model, cell):
    """cell_pos=local: a cell is encoded exactly as its pixels cropped and fed to the same ViT at the
    cell's size (position embeddings resampled as timm does for another input size)."""
    import timm

    images = torch.randn(2, 3, 160, 160)
    r0, r1, c0, c1 = cell
    pooled = describe_cells(model.encoder, images, [cell], 0, "split", cell_pos="local")[0][:, 0]
    crop_vit = timm.create_model("test_vit", pretrained=False, img_size=(16 * (r1 - r0), 16 * (c1 - c0)))
    weights = {k: v for k, v in model.encoder.backbone.state_dict().items() if k != "pos_embed"}
    crop_vit.load_state_dict(weights, strict=False)  # pos_embed: resampled below
    crop_vit.pos_embed.data = timm.layers.resample_abs_pos_embed(
        model.encoder.backbone.pos_embed, new_size=[r1 - r0, c1 - c0], old_size=[10, 10],
        num_prefix_tokens=model.encoder.backbone.num_prefix_tokens)
    crop_encoder = type(model.encoder)(crop_vit.eval(), layer=-1, pool="cls")
    crop = crop_encoder(images[:, :, 16 * r0:16 * r1, 16 * c0:16 * c1])[0]
    assert torch.allclose(pooled, crop, atol=1e-5)
    placed = describe_cells(model.encoder, images, [cell], 0, "split", cell_pos="global")[0][:, 0]
    assert not torch.allclose(placed, crop, atol=1e-3)  # the image's own positions are another encoding


def test_local_positions_need_the_split_method(model):
    with pytest.raises(ModelConfigError, match="pool_cell_pos=local needs pool_method=split"):
        describe_cells(model.encoder, torch.randn(1, 3, 160, 160), [(0, 5, 0, 5)], 0, "masked", cell_pos="local")
    with pytest.raises(ModelConfigError, match="pool_cell_pos must be one of"):
        describe_cells(model.encoder, torch.randn(1, 3, 160, 160), [(0, 5, 0, 5)], 0, "split", cell_pos="relative")


@pytest.mark.parametrize("method", ["split", "masked"])
def test_several_layers_from_one_pass(method):
    torch.set_num_threads(1)
    vit = load_model(compose_config(["model=test_vit", "model.layer=1"]).model, device="cpu")
    images = torch.randn(1, 3, 160, 160)
    cells = token_cells(10, 10, [1])[1]
    both = describe_cells(vit.encoder, images, cells, 1, method, layers=[2, 1])
    assert torch.allclose(both[1], describe_cells(vit.encoder, images, cells, 1, method)[0], atol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-3)


def test_split_block_out_of_range_is_an_error(model):
    with pytest.raises(ModelConfigError, match="pool_split_block"):
        describe_cells(model.encoder, torch.randn(1, 3, 160, 160), [(0, 10, 0, 10)], split_block=99)


def test_unknown_pool_method_is_an_error(model):
    with pytest.raises(ModelConfigError, match="pool_method"):
        describe_cells(model.encoder, torch.randn(1, 3, 160, 160), [(0, 10, 0, 10)], 0, "avg")


def test_pool_mode_end_to_end(smoke_overrides, tmp_path):
    overrides = smoke_overrides + ["pyramid.mode=pool", "pyramid.pool_image_size=160", "pyramid.pool_split_block=1"]
    metrics = run(compose_config(overrides), tmp_path / "run")
    assert metrics["counts"]["gallery_patches"] == 16 * 30
    assert 0 <= metrics["LocScore@0.4"] <= metrics["mAP"] <= 100
    again = run(compose_config(overrides), tmp_path / "again")
    assert again["counts"]["extracted_images"] == 0 and again["mAP"] == pytest.approx(metrics["mAP"])
    crop = run(compose_config(smoke_overrides), tmp_path / "crop")
    assert crop["counts"]["extracted_images"] > 0  # pool and crop never share a cache
    masked = run(compose_config(overrides + ["pyramid.pool_method=masked"]), tmp_path / "masked")
    assert masked["counts"]["extracted_images"] > 0  # nor do the two pooling methods
    placed = run(compose_config(overrides + ["pyramid.pool_cell_pos=global"]), tmp_path / "global")
    assert placed["counts"]["extracted_images"] > 0  # nor local and global cell positions


def test_pool_queries_default_to_the_models_own_size(smoke_overrides):
    """pool_query_size=0 describes queries as crop mode does (the model's own input size), whatever the pooled size."""
    from patchify.features import make_feature_source

    source = make_feature_source(compose_config(smoke_overrides + ["pyramid.mode=pool", "pyramid.pool_image_size=320"]))
    assert source.model.input_size == 320 and source.query_model.input_size == 160
    same = make_feature_source(compose_config(smoke_overrides + ["pyramid.mode=pool", "pyramid.pool_image_size=320",
                                                                 "pyramid.pool_query_size=320"]))
    assert same.query_model is same.model


def test_pool_l0_whole_is_crop_modes_l0_and_leaves_the_pooled_levels_alone(smoke_overrides, tmp_path):
    """pool_l0=whole (default): L0 is crop mode's L0 (same vectors, same cache); L1..L3 are the pooled cells."""
    from patchify.pipeline import ConfigError
    from patchify.data import load_dataset
    from patchify.features import make_feature_source

    pool = smoke_overrides + ["pyramid.mode=pool", "pyramid.pool_image_size=320", "pyramid.pool_split_block=1",
                              f"paths.features={tmp_path}"]
    whole = make_feature_source(compose_config(pool))
    records = load_dataset(compose_config(pool).dataset).gallery[:3]
    got = whole.features(records, [0, 1, 2, 3])
    assert whole.l0_model is whole.query_model and whole.l0_model.input_size != whole.model.input_size
    crop = make_feature_source(compose_config(smoke_overrides + [f"paths.features={tmp_path}"]))
    crop_l0 = crop.features(records, [0])
    assert crop.totals()["extracted"] == 0  # crop mode found its L0 in the cache pool mode filled
    assert np.array_equal(got.vectors[:3], crop_l0.vectors) and np.array_equal(got.boxes[:3], crop_l0.boxes)
    pooled = make_feature_source(compose_config(pool + ["pyramid.pool_l0=pooled"]))
    assert pooled.l0_model is None
    old = pooled.features(records, [0, 1, 2, 3])
    assert pooled.totals()["extracted"] == 3  # the pooled cells at L1..L3 were cached, L0 was not
    assert np.array_equal(got.vectors[3:], old.vectors[3:]) and not np.allclose(got.vectors[:3], old.vectors[:3])
    with pytest.raises(ConfigError, match="pool_l0 must be whole or pooled"):
        make_feature_source(compose_config(pool + ["pyramid.pool_l0=crop"]))


def test_index_and_bundle_keys_follow_how_patches_are_described(smoke_overrides):
    """A cached index is never reused for patches described another way (pool method, split, positions, L0)."""
    from patchify.indexing import bundle_folder, index_files
    from patchify.data import load_dataset

    base = smoke_overrides + ["index=ivfpq", "index.m=8", "index.nlist=4"]
    variants = [[], ["pyramid.mode=pool"], ["pyramid.mode=pool", "pyramid.pool_method=masked", "pyramid.pool_split_block=0"],
                ["pyramid.mode=pool", "pyramid.pool_split_block=1"], ["pyramid.mode=pool", "pyramid.pool_cell_pos=global"],
                ["pyramid.mode=pool", "pyramid.pool_l0=pooled"]]
    gallery = load_dataset(compose_config(base).dataset).gallery
    fingerprint = {"same": "model"}  # the model's own fingerprint is keyed already; only the patch mode varies here
    keys = [(index_files(cfg, fingerprint, gallery, [0, 1], 64).populated, bundle_folder(cfg, fingerprint, [0, 1]))
            for cfg in (compose_config(base + v) for v in variants)]
    assert len({populated for populated, _ in keys}) == len({bundle for _, bundle in keys}) == len(variants)
