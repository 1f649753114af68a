"""Re-ranking stage (src/patchify/rerank.py): tighter boxes, geometric verification, ordering and caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures import skimage_photos
from conftest import compose_config
from fixtures import _background
from omegaconf import OmegaConf
from PIL import Image

import patchify.rerank as rr
from patchify.assets import AssetError
from patchify.data import ImageRecord
from patchify.metrics import box_iou
from patchify.model import load_model
from patchify.pipeline import run
from patchify.pyramid import level_boxes
from patchify.search import ImageHits

RERANK = compose_config(["rerank=both"]).rerank




def _record(path, image: Image.Image, **kwargs) -> ImageRecord:
    image.save(path, quality=95)
    return ImageRecord(id=path.name, path=path, width=image.width, height=image.height, **kwargs)


def _pyramid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    boxes = [level_boxes(width, height, level) for level in range(4)]
    return (np.concatenate(boxes).astype(np.float32),
            np.concatenate([np.full(len(b), level, np.int8) for level, b in enumerate(boxes)]))


# ----------------------------------------------------------------------------- refine

def test_refine_finds_the_object_where_no_grid_cell_can(tmp_path):
    cat, = skimage_photos("chelsea.png")
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

def _warped_scene(tmp_path) -> tuple[list[ImageRecord], np.ndarray]:
    """[query, scene, unrelated] and the true box: the astronaut shrunk and seen in perspective
    inside a larger scene of another photo; the unrelated image is the cat."""
    astronaut, coffee, cat = skimage_photos("astronaut.png", "coffee.png", "chelsea.png")
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
    records = [_record(tmp_path / "q.jpg", astronaut), _record(tmp_path / "s.jpg", scene),
               _record(tmp_path / "o.jpg", cat)]
    return records, truth


@pytest.mark.parametrize("matcher", rr.MATCHERS)
def test_verification_accepts_a_warped_copy_and_rejects_an_unrelated_photo(tmp_path, matcher):
    records, truth = _warped_scene(tmp_path)
    cfg = OmegaConf.merge(RERANK.verify, {"matcher": matcher})
    try:
        local = rr.LocalFeatures(tmp_path / "cache", top_k=1024, max_side=640, extractor=rr.EXTRACTOR_OF[matcher])
    except AssetError as err:  # pragma: no cover - depends on the registry
        pytest.skip(f"no weights for {matcher}: {err}")
    query, same, other = local.get(records)
    assert local.store.folder.name.startswith(rr.EXTRACTOR_OF[matcher] + "-")
    qbox = np.array([0, 0, 512, 512], np.float64)
    accepted = rr.verify_pair(query, qbox, same, (700, 560), cfg)
    rejected = rr.verify_pair(query, qbox, other, (451, 300), cfg)
    assert accepted.inliers >= 3 * cfg.min_inliers, accepted.inliers
    assert accepted.box is not None and box_iou(accepted.box, truth).max() >= 0.8
    assert rejected.inliers < cfg.min_inliers and rejected.box is None


def test_each_extractor_caches_in_a_folder_of_its_own(tmp_path):
    xfeat = rr.LocalFeatures(tmp_path, top_k=1024, max_side=640, extractor="xfeat")
    assert xfeat.store.folder.name.startswith("xfeat-")
    assert rr.LocalFeatures(tmp_path, top_k=512, max_side=640).store.folder != xfeat.store.folder
    assert set(rr.EXTRACTOR_OF) == set(rr.MATCHERS) and rr.EXTRACTOR_OF["lighterglue"] == "xfeat"
    with pytest.raises(ValueError, match="extractor"):
        rr.LocalFeatures(tmp_path, top_k=1024, max_side=640, extractor="sift")


# ----------------------------------------------------------------------------- RANSAC

def ransac_oracle(src: np.ndarray, dst: np.ndarray, threshold: float, iterations: int,
                  seed: int = 0) -> tuple[np.ndarray | None, np.ndarray]:
    """The former numpy RANSAC (a fixed number of 4-point samples scored at once, refit on the best
    inlier set twice), kept as the oracle that poselib's fit is checked against. Returns (H, mask)."""
    n = len(src)
    if n < 4:
        return None, np.zeros(n, bool)
    rng = np.random.default_rng(seed)
    samples = np.argsort(rng.random((iterations, n)), axis=1)[:, :4]
    t_src, t_dst = rr._normaliser(src), rr._normaliser(dst)
    nsrc, ndst = rr.project(t_src, src), rr.project(t_dst, dst)
    back = np.linalg.inv(t_dst)

    def fit(idx: np.ndarray) -> np.ndarray:  # (B, m) sample indices -> (B, 3, 3) in pixels
        return back @ rr._homographies(nsrc[idx], ndst[idx]) @ t_src

    with np.errstate(all="ignore"):
        hs = fit(samples)
        p = np.einsum("bij,nj->bni", hs, np.concatenate([src, np.ones((n, 1))], 1))
        err = np.linalg.norm(p[..., :2] / p[..., 2:] - dst[None], axis=-1)
    inliers = np.nan_to_num(err, nan=np.inf) < threshold
    best = inliers[np.argmax(inliers.sum(1))]
    h = None
    for _ in range(2):
        if best.sum() < 4:
            break
        with np.errstate(all="ignore"):
            h = fit(np.flatnonzero(best)[None])[0]
            refit = np.nan_to_num(np.linalg.norm(rr.project(h, src) - dst, axis=1), nan=np.inf) < threshold
        if refit.sum() < best.sum():
            break
        best = refit
    return h, best


def _synthetic_matches(trial: int, inlier_rate: float, n: int = 300, noise: float = 1.0, size=(640, 480)):
    """``n`` matches between two 640x480 images: a share ``inlier_rate`` follows a random perspective
    homography (corners moved by up to 15 % of the side) with Gaussian noise of ``noise`` px, the rest
    are uniform at random. Returns src, dst, the true homography and the inliers' index."""
    rng = np.random.default_rng(trial)
    w, h = size
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    truth = rr.fit_homography(corners, corners + rng.uniform(-0.15, 0.15, (4, 2)) * [w, h])
    src = rng.random((n, 2)) * [w, h]
    inliers = rng.permutation(n)[:round(inlier_rate * n)]
    dst = rng.random((n, 2)) * [w, h]
    dst[inliers] = rr.project(truth, src[inliers]) + rng.normal(0, noise, (len(inliers), 2))
    return src, dst, truth, inliers


def _verified(src, dst, truth, inliers, cfg) -> tuple[bool, bool]:
    """(verified at cfg's threshold and min_inliers, the fit maps the true inliers within ransac_px)."""
    hom, count = rr.ransac(src, dst, float(cfg.ransac_px), int(cfg.ransac_max_iterations), int(cfg.min_inliers))
    verified = hom is not None and count >= int(cfg.min_inliers)
    right = verified and len(inliers) > 0 and bool(
        np.linalg.norm(rr.project(hom, src[inliers]) - rr.project(truth, src[inliers]), axis=1).max() < cfg.ransac_px)
    return verified, right


def test_ransac_finds_the_homography_at_ten_percent_inliers():
    cfg = RERANK.verify  # the configured threshold, iterations and min_inliers
    found = [_verified(*_synthetic_matches(trial, 0.10), cfg) for trial in range(40)]
    assert sum(right for _, right in found) >= 38, found


def test_ransac_budget_still_finds_the_least_inlier_set_that_verifies():
    cfg = RERANK.verify  # 60 matches, exactly min_inliers of them inliers: the budget's own worst case
    rate = int(cfg.min_inliers) / 60
    assert rr.ransac_budget(60, int(cfg.min_inliers), int(cfg.ransac_max_iterations)) < int(cfg.ransac_max_iterations)
    found = [_verified(*_synthetic_matches(trial, rate, n=60), cfg) for trial in range(40)]
    assert sum(right for _, right in found) >= 39, found
    assert rr.ransac_budget(300, 15, 100_000) == 100_000 and rr.ransac_budget(20, 15, 100_000) == 1000
    assert rr.ransac(*_synthetic_matches(0, 1.0, n=14)[:2], 6.0, 100_000, min_inliers=15) == (None, 0)


def test_ransac_verifies_nothing_among_random_matches():
    cfg = RERANK.verify
    assert sum(_verified(*_synthetic_matches(trial, 0.0), cfg)[0] for trial in range(40)) == 0


def test_ransac_agrees_with_the_numpy_oracle_where_the_oracle_works():
    src, dst, truth, inliers = _synthetic_matches(7, 0.5)
    hom, count = rr.ransac(src, dst, 6.0, 100_000)
    oracle, mask = ransac_oracle(src, dst, 6.0, 1000)
    assert abs(count - int(mask.sum())) <= 3 and count >= len(inliers) - 3
    grid = np.stack(np.meshgrid(np.linspace(0, 640, 5), np.linspace(0, 480, 5)), -1).reshape(-1, 2)
    assert np.linalg.norm(rr.project(hom, grid) - rr.project(oracle, grid), axis=1).max() < 2.0
    assert rr.ransac(src[:3], dst[:3], 6.0, 1000) == (None, 0)


def test_missing_rerank_extra_is_one_line_before_any_work(monkeypatch, tmp_path):
    import importlib.util

    from patchify.settings import ConfigError, validate

    real = importlib.util.find_spec
    for missing, overrides in (("poselib", ["rerank=verify"]), ("poselib", ["rerank=both"]),
                               ("kornia", ["rerank=verify", "rerank.verify.matcher=lighterglue"])):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
        with pytest.raises(ConfigError) as err:
            run(compose_config(overrides + [f"paths.logs={tmp_path}"]), tmp_path / "run")
        assert "\n" not in str(err.value) and 'pip install "patchify[rerank]"' in str(err.value)
        assert str(err.value).startswith(("rerank.stage=", "rerank.verify.matcher=")) and missing in str(err.value)
        assert not (tmp_path / "run").exists()  # refused before any work
        with pytest.raises(ConfigError):
            rr.check_requirements(compose_config(overrides).rerank)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kornia" else real(name, *a))
    validate(compose_config(["rerank=verify"]))  # mnn needs no kornia
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    validate(compose_config(["rerank=refine"]))  # nor does refine need poselib


def test_settings_list_the_matchers_this_module_has():
    from patchify import settings

    assert settings.VERIFY_MATCHERS == rr.MATCHERS


def test_projected_box_is_clipped_and_degenerate_fits_are_refused():
    shift = np.array([[1, 0, 300], [0, 1, -50], [0, 0, 1]], np.float64)
    assert rr.projected_box(shift, np.array([0, 0, 200, 100.0]), 400, 300).tolist() == [300, 0, 100, 50]
    assert rr.projected_box(shift, np.array([0, 0, 50, 40.0]), 200, 200) is None  # wholly outside
    beyond_horizon = np.array([[1, 0, 0], [0, 1, 0], [-0.02, 0.0, 1]], np.float64)  # x = 50 maps to infinity
    assert rr.projected_box(beyond_horizon, np.array([0, 0, 100, 100.0]), 400, 400) is None
    assert rr.clip_box(np.array([-10, 5, 30, 500.0]), 100, 100).tolist() == [0, 5, 20, 95]


def test_projected_outline_keeps_the_corners_the_box_loses():
    shift = np.array([[1, 0, 300], [0, 1, -50], [0, 0, 1]], np.float64)
    outline = rr.projected_outline(shift, np.array([0, 0, 200, 100.0]))  # unclipped, clockwise from top-left
    assert outline.tolist() == [[300, -50], [500, -50], [500, 50], [300, 50]]
    keystone = np.array([[1, 0, 0], [0, 1, 0], [0.001, 0, 1]], np.float64)  # far side shrinks
    corners = rr.projected_outline(keystone, np.array([0, 0, 100, 100.0]))
    far = 100 / 1.1  # x' = x / (1 + 0.001 x), y' = y / (1 + 0.001 x): the right edge is shorter, not a box
    assert np.allclose(corners, [[0, 0], [far, 0], [far, far], [0, 100]])
    assert rr.projected_outline(np.array([[1, 0, 0], [0, 1, 0], [-0.02, 0.0, 1]]), np.array([0, 0, 100, 100.0])) is None


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



def test_connected_region_equals_scipy_labelling_on_random_maps():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for trial in range(200):
        mask = rng.random((int(rng.integers(1, 13)), int(rng.integers(1, 13)))) < rng.uniform(0.2, 0.8)
        seed = (int(rng.integers(mask.shape[0])), int(rng.integers(mask.shape[1])))
        labels, _ = ndimage.label(mask)  # 4-connectivity, the default
        expected = (labels == labels[seed]) & mask[seed]
        assert np.array_equal(rr.connected_region(mask, seed), expected), trial
