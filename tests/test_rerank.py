"""Re-ranking stage (src/patchify/rerank.py): tighter boxes, geometric verification, ordering and caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import compose_config
from fixtures import _background
from omegaconf import OmegaConf
from PIL import Image

import patchify.rerank as rr
from patchify.assets import AssetError, pip_package
from patchify.data import ImageRecord
from patchify.metrics import box_iou
from patchify.datasets.mini_ilias import SKIMAGE_REQUIREMENT
from patchify.model import load_model
from patchify.pipeline import run
from patchify.pyramid import level_boxes
from patchify.search import ImageHits

RERANK = compose_config(["rerank=both"]).rerank


def _photos(*names: str) -> list[Image.Image]:
    """Real photos from scikit-image's wheel (a registry package), or skip the test."""
    try:
        root = pip_package(SKIMAGE_REQUIREMENT) / "skimage" / "data"
    except AssetError as err:  # pragma: no cover - depends on the registry
        pytest.skip(f"no photos: {err}")
    return [Image.open(root / name).convert("RGB") for name in names]


def _record(path, image: Image.Image, **kwargs) -> ImageRecord:
    image.save(path, quality=95)
    return ImageRecord(id=path.name, path=path, width=image.width, height=image.height, **kwargs)


def _pyramid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    boxes = [level_boxes(width, height, level) for level in range(4)]
    return (np.concatenate(boxes).astype(np.float32),
            np.concatenate([np.full(len(b), level, np.int8) for level, b in enumerate(boxes)]))


# ----------------------------------------------------------------------------- refine

def test_refine_finds_the_object_where_no_grid_cell_can(tmp_path):
    cat, = _photos("chelsea.png")
    scene = _background(np.random.default_rng(0), 448, 448)
    scene.paste(cat.resize((84, 84)), (100, 100))  # inside L3 cell (112..224)^2, off its centre
    truth = np.array([100, 100, 84, 84], np.float64)
    query = Image.new("RGB", (200, 200), (240, 240, 240))
    query.paste(cat.resize((150, 150)), (25, 25))
    gallery = [_record(tmp_path / "scene.jpg", scene)]
    queries = [_record(tmp_path / "query.jpg", query, boxes=((25.0, 25.0, 150.0, 150.0),))]
    boxes, levels = _pyramid(448, 448)
    assert box_iou(boxes, truth).max() < 0.7  # the grid cannot reach 0.7 anywhere
    winner = 1 + 4 + 9 + 5  # L3 cell (1, 1): the cell holding the object
    hits = ImageHits(np.array([[0]]), np.array([[0.5]], np.float32), np.array([[winner]]))
    cfg = OmegaConf.merge(RERANK, {"stage": "refine", "top_n": 1})
    model = load_model(OmegaConf.merge(compose_config([]).model, {"image_size": cfg.refine.image_size}), device="cpu")
    out = rr.rerank(cfg, queries=queries, gallery=gallery, hits=hits, patch_boxes=boxes,
                    patch_vectors=np.zeros((len(boxes), 4), np.float32), patch_image=np.zeros(len(boxes), np.int64),
                    patch_level=levels, query_vectors=np.zeros((1, 4), np.float32), refine_model=lambda: model,
                    features_root=tmp_path / "cache", batch_size=32)
    iou = box_iou(out.hits.boxes[0, 0], truth).max()
    assert iou >= 0.7, f"refined box {out.hits.boxes[0, 0]} has IoU {iou:.2f}"
    assert box_iou(boxes[winner], truth).max() < 0.6
    assert out.hits.images.tolist() == [[0]] and out.hits.scores[0, 0] == pytest.approx(0.5)  # refine never re-ranks


def test_cell_map_box_covers_the_cells_that_score_high():
    boxes, levels = _pyramid(400, 400)
    truth = np.array([100, 100, 100, 100], np.float64)  # exactly L3 cell (1, 1)
    scores = box_iou(boxes, truth).ravel()  # cells score by their overlap with the object
    box = rr.cell_map_box(scores, boxes, levels, 400, 400)
    assert box_iou(box, truth).max() >= 0.5
    assert rr.cell_map_box(scores[:1], boxes[:1], levels[:1], 400, 400) is None  # L0 alone: no map


# ----------------------------------------------------------------------------- verify

def test_verification_accepts_a_warped_copy_and_rejects_an_unrelated_photo(tmp_path):
    astronaut, coffee = _photos("astronaut.png", "coffee.png")
    # The astronaut shrunk and seen in perspective inside a larger scene of another photo.
    scene = coffee.resize((700, 560))
    src = np.array([[0, 0], [512, 0], [512, 512], [0, 512]], np.float64)
    dst = np.array([[250, 160], [560, 190], [540, 470], [230, 430]], np.float64)
    h = rr.fit_homography(dst, src)  # PIL maps output pixels back to input pixels
    warped = astronaut.transform(scene.size, Image.Transform.PERSPECTIVE, tuple((h / h[2, 2]).ravel()[:8]),
                                 Image.Resampling.BILINEAR)
    mask = Image.new("L", (512, 512), 255).transform(scene.size, Image.Transform.PERSPECTIVE,
                                                     tuple((h / h[2, 2]).ravel()[:8]))
    scene.paste(warped, (0, 0), mask)
    truth = np.array([230, 160, 330, 310], np.float64)  # the warped quadrilateral's bounding box
    local = rr.LocalFeatures(tmp_path / "cache", top_k=1024, max_side=640)
    query, same, other = local.get([_record(tmp_path / "q.jpg", astronaut), _record(tmp_path / "s.jpg", scene),
                                    _record(tmp_path / "o.jpg", _photos("chelsea.png")[0])])
    qbox = np.array([0, 0, 512, 512], np.float64)
    accepted = rr.verify_pair(query, qbox, same, scene.size, RERANK.verify)
    rejected = rr.verify_pair(query, qbox, other, (451, 300), RERANK.verify)
    assert accepted.inliers >= 3 * RERANK.verify.min_inliers, accepted.inliers
    assert accepted.box is not None and box_iou(accepted.box, truth).max() >= 0.8
    assert rejected.inliers < RERANK.verify.min_inliers and rejected.box is None


def test_projected_box_is_clipped_and_degenerate_fits_are_refused():
    shift = np.array([[1, 0, 300], [0, 1, -50], [0, 0, 1]], np.float64)
    assert rr.projected_box(shift, np.array([0, 0, 200, 100.0]), 400, 300).tolist() == [300, 0, 100, 50]
    assert rr.projected_box(shift, np.array([0, 0, 50, 40.0]), 200, 200) is None  # wholly outside
    beyond_horizon = np.array([[1, 0, 0], [0, 1, 0], [-0.02, 0.0, 1]], np.float64)  # x = 50 maps to infinity
    assert rr.projected_box(beyond_horizon, np.array([0, 0, 100, 100.0]), 400, 400) is None
    assert rr.clip_box(np.array([-10, 5, 30, 500.0]), 100, 100).tolist() == [0, 5, 20, 95]


def test_reranking_keeps_every_image_and_the_order_of_unverified_ones(monkeypatch, tmp_path):
    rng = np.random.default_rng(1)
    nq, k, n = 5, 40, 25
    images = np.stack([rng.permutation(60)[:k] for _ in range(nq)])
    scores = -np.sort(-rng.random((nq, k)).astype(np.float32), axis=1)
    images[0, 30:] = -1  # a short list: padding stays at the end
    scores[0, 30:] = -np.inf
    hits = ImageHits(images, scores, np.arange(nq * k).reshape(nq, k) % 60)
    inliers = {(q, i): int(rng.choice([0, 5, 20, 80])) for q in range(nq) for i in range(60)}

    class Local:  # no XFeat: verdicts are drawn above
        described = 0

        def __init__(self, *args):
            pass

        def get(self, records):
            return list(records)

    def verdict(query, qbox, candidate, size, cfg):
        return rr.Verdict(inliers[(int(query.id), int(candidate.id))], np.array([1.0, 2, 3, 4]))

    monkeypatch.setattr(rr, "LocalFeatures", Local)
    monkeypatch.setattr(rr, "verify_pair", verdict)
    monkeypatch.setattr(rr, "_size", lambda record: (100, 100))
    records = [ImageRecord(id=str(i), path=tmp_path / f"{i}.jpg", width=100, height=100) for i in range(60)]
    cfg = OmegaConf.merge(RERANK, {"stage": "verify", "top_n": n})
    out = rr.rerank(cfg, queries=records[:nq], gallery=records, hits=hits, patch_boxes=np.zeros((60, 4), np.float32),
                    patch_vectors=np.zeros((60, 4), np.float32), patch_image=np.arange(60), patch_level=np.zeros(60, np.int8),
                    query_vectors=np.zeros((nq, 4), np.float32), refine_model=None, features_root=tmp_path, batch_size=8)
    new = out.hits
    for q in range(nq):
        assert sorted(new.images[q, :n].tolist()) == sorted(images[q, :n].tolist())  # nothing dropped or duplicated
        assert new.images[q, n:].tolist() == images[q, n:].tolist()  # past N: untouched
        valid = new.scores[q] > -np.inf
        assert (np.diff(new.scores[q][valid]) <= 0).all()
        unverified = [i for i in images[q, :n] if i >= 0 and inliers[(q, i)] < cfg.verify.min_inliers]
        assert [i for i in new.images[q, :n] if i in unverified] == unverified  # their relative order holds
        for col, i in enumerate(new.images[q, :n]):
            if i >= 0 and inliers[(q, i)] >= cfg.verify.min_inliers:
                assert new.boxes[q, col].tolist() == [1, 2, 3, 4]
                assert new.scores[q, col] > scores[q, list(images[q]).index(i)]
    assert out.hits.images is not images and (hits.images == images).all()  # the input is not modified


# ----------------------------------------------------------------------------- pipeline

@pytest.mark.parametrize("stage", rr.STAGES)
def test_rerank_configs_compose(stage):
    cfg = compose_config([f"rerank={stage}"])
    assert cfg.rerank.stage == stage and cfg.rerank.top_n >= 1
    assert set(cfg.rerank.refine) >= {"search_top", "image_size", "rounds"} and cfg.rerank.verify.min_inliers > 0


def test_both_stages_run_end_to_end_and_a_second_run_computes_nothing(smoke_overrides, tmp_path):
    overrides = smoke_overrides + ["rerank=both", "rerank.top_n=4", "rerank.refine.search_top=2",
                                   "rerank.refine.image_size=0"]
    plain = run(compose_config(smoke_overrides), tmp_path / "plain")
    first = run(compose_config(overrides), tmp_path / "a")
    second = run(compose_config(overrides), tmp_path / "b")
    assert first["timing"]["refine_windows_encoded"] > 0 and first["timing"]["verify_images_described"] > 0
    assert second["timing"]["refine_windows_encoded"] == 0 and second["timing"]["verify_images_described"] == 0
    assert second["mAP"] == pytest.approx(first["mAP"]) and second["LocScore"] == pytest.approx(first["LocScore"])
    assert {"refine_ms_per_query", "verify_ms_per_query"} <= set(first["timing"])
    assert first["counts"]["gallery_images"] == plain["counts"]["gallery_images"]
    lines = (tmp_path / "a" / "results.jsonl").read_text().splitlines()
    plain_lines = (tmp_path / "plain" / "results.jsonl").read_text().splitlines()
    for line, plain_line in zip(lines, plain_lines):
        ids, plain_ids = json.loads(line)["ids"], json.loads(plain_line)["ids"]
        assert sorted(ids[:4]) == sorted(plain_ids[:4]) and ids[4:] == plain_ids[4:]

