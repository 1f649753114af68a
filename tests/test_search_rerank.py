"""Re-ranking and query expansion in task=search (and alpha-QE in task=eval): real photos, XFeat, smoke model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fixtures import skimage_photos
from conftest import compose_config
from PIL import Image

import patchify.rerank as rr
from patchify.expansion import alpha_query_expansion, feeding
from patchify.metrics import box_iou
from patchify.pipeline import run
from patchify.search import ImageHits




@pytest.fixture
def hanging_picture(tmp_path):
    """A folder of real photos; in one of them (the coffee cup) the astronaut portrait hangs as a small
    picture seen in perspective. The query is the clean portrait (not in the folder). Returns
    (folder, query path, scene path, the warped picture's true box, its true corners TL, TR, BR, BL)."""
    astronaut, coffee, cat, rocket, motorcycle = skimage_photos("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg",
                                                         "motorcycle_left.png")
    scene = coffee.resize((800, 533))
    corners = np.array([[470, 60], [700, 85], [690, 330], [455, 300]], np.float64)  # tilted, seen from the left
    h = rr.fit_homography(corners, np.array([[0, 0], [512, 0], [512, 512], [0, 512]], np.float64))
    coefficients = tuple((h / h[2, 2]).ravel()[:8])  # PIL maps output pixels back to input pixels
    warped = astronaut.transform(scene.size, Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BILINEAR)
    mask = Image.new("L", astronaut.size, 255).transform(scene.size, Image.Transform.PERSPECTIVE, coefficients)
    scene.paste(warped, (0, 0), mask)
    lo, hi = corners.min(0), corners.max(0)
    truth = np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]])
    folder = tmp_path / "photos"
    folder.mkdir()
    scene.save(folder / "kitchen.jpg", quality=92)
    for name, image in (("cat.jpg", cat), ("rocket.jpg", rocket), ("motorcycle.jpg", motorcycle),
                        ("coffee.jpg", coffee)):  # the same room without the picture: a hard negative
        image.save(folder / name, quality=92)
    query = tmp_path / "portrait.jpg"
    astronaut.save(query, quality=95)
    return folder, query, folder / "kitchen.jpg", truth, corners


def _overrides(tmp_path, folder, *extra):
    return ["experiment=smoke", "dataset=folder", f"dataset.root={folder}", f"paths.features={tmp_path / 'f'}",
            f"paths.indices={tmp_path / 'i'}", "pyramid.level=1", *extra]


def _search(tmp_path, folder, query, name, *extra) -> dict:
    run(compose_config(_overrides(tmp_path, folder, "task=search", f"query.path={query}", *extra)), tmp_path / name)
    return json.loads((tmp_path / name / "search.json").read_text())


def test_verified_search_finds_the_hanging_picture_and_reuses_gallery_features(tmp_path, hanging_picture, monkeypatch):
    folder, query, scene, truth, corners = hanging_picture
    run(compose_config(_overrides(tmp_path, folder, "task=index")), tmp_path / "index")
    plain = _search(tmp_path, folder, query, "plain")
    assert "inliers" not in plain["queries"][0]["results"][0]  # no re-ranking: nothing verified

    first = _search(tmp_path, folder, query, "first", "rerank=verify", "query.top_k=3")
    results = first["queries"][0]["results"]
    best = results[0]
    assert best["path"] == str(scene) and best["verified"] and best["inliers"] >= 15
    iou = box_iou(np.array(best["box"], np.float64), truth).max()
    assert iou >= 0.7, f"verified box {best['box']} has IoU {iou:.2f} with {truth.tolist()}"
    # the outline is the query's frame through the homography: the picture's four tilted corners, in order
    error = np.linalg.norm(np.array(best["outline"]) - corners, axis=1).max()
    assert error <= 20, f"verified outline {best['outline']} is {error:.0f} px from the true corners"
    assert all("outline" not in hit for hit in results[1:])
    assert len(results) == 3 and all(not hit["verified"] for hit in results[1:])  # no other photo holds the portrait
    assert first["rerank"]["verify_images_described"] == 5 + 1  # the folder's 5 photos and the query
    assert list((tmp_path / "first").glob("search_*.jpg"))

    detected = []  # a second search with another query photo: only that query is described
    real_detect = rr.LocalFeatures._detect
    monkeypatch.setattr(rr.LocalFeatures, "_detect", lambda self, record: detected.append(record.path) or
                        real_detect(self, record))
    other = tmp_path / "portrait_small.jpg"
    Image.open(query).resize((384, 384)).save(other, quality=90)
    second = _search(tmp_path, folder, other, "second", "rerank=verify", "rerank.qe.top=2")
    assert detected == [other] and second["rerank"]["verify_images_described"] == 1
    entry = second["queries"][0]
    assert entry["expanded"] and second["rerank"]["qe_queries_expanded"] == 1  # the verified picture fed it
    assert entry["results"][0]["path"] == str(scene) and entry["results"][0]["verified"]
    assert box_iou(np.array(entry["results"][0]["box"], np.float64), truth).max() >= 0.7


def test_both_stages_in_search_read_vectors_and_skip_images_gone_from_disk(tmp_path, hanging_picture):
    folder, query, scene, truth, _ = hanging_picture
    run(compose_config(_overrides(tmp_path, folder, "task=index")), tmp_path / "index")
    gone = folder / "rocket.jpg"
    shutil.move(gone, tmp_path / "rocket.jpg")
    written = _search(tmp_path, folder, query, "both", "rerank=both", "rerank.refine.image_size=0",
                      "rerank.refine.search_top=2")
    results = written["queries"][0]["results"]
    assert results[0]["path"] == str(scene) and results[0]["verified"]
    assert written["rerank"]["refine_windows_encoded"] > 0
    missing = [hit for hit in results if hit["path"] == str(gone)]
    assert missing and missing[0]["missing"] and "inliers" not in missing[0]  # kept, unverified, said so
    assert "outline" in results[0] and all(hit.get("verified") for hit in results if "outline" in hit)
    assert len(results) == 5


def test_alpha_query_expansion_matches_a_hand_computation():
    query = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    neighbours = np.array([[[0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [-0.6, 0.8, 0.0]],
                           [[0.0, 0.6, 0.8], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    use = np.array([[True, True, True], [True, False, False]])
    out = alpha_query_expansion(query, neighbours, use, alpha=3.0)
    # query 0: weights 0.8^3 = 0.512, 0^3 = 0, and 0 for the negative similarity -0.6
    first = np.array([1 + 0.512 * 0.8, 0.512 * 0.6, 0.0])
    # query 1: only the first neighbour is used: weight 0.8^3
    second = np.array([0.0, 0.512 * 0.6, 1 + 0.512 * 0.8])
    expected = np.stack([first / np.linalg.norm(first), second / np.linalg.norm(second)])
    np.testing.assert_allclose(out, expected, atol=1e-6)
    average = alpha_query_expansion(query[:1], neighbours[:1, :2], use[:1, :2], alpha=0.0)  # alpha 0: plain average
    np.testing.assert_allclose(average[0], np.array([1.8, 1.6, 0]) / np.linalg.norm([1.8, 1.6, 0]), atol=1e-6)
    unchanged = alpha_query_expansion(query, neighbours, np.zeros((2, 3), bool), alpha=3.0)
    np.testing.assert_array_equal(unchanged, query.astype(np.float32))


def test_only_verified_results_feed_the_expansion_when_verification_ran():
    hits = ImageHits(np.array([[4, 2, -1]]), np.array([[1.5, 0.4, -np.inf]], np.float32), np.array([[7, 3, -1]]))
    inliers = np.array([[40, 3, -1]])
    assert feeding(hits, inliers, 3, min_inliers=15).tolist() == [[True, False, False]]
    assert feeding(hits, inliers, 3, min_inliers=None).tolist() == [[True, True, False]]  # every result that exists
    assert feeding(hits, None, 2, min_inliers=15).tolist() == [[False, False]]


def test_expansion_in_eval_changes_scores_and_off_changes_nothing(smoke_overrides, tmp_path):
    plain = run(compose_config(smoke_overrides), tmp_path / "plain")
    off = run(compose_config(smoke_overrides + ["rerank.qe.top=0", "rerank.qe.alpha=0", "rerank.qe.verified_only=false"]),
              tmp_path / "off")  # off: the other qe keys change nothing
    on = run(compose_config(smoke_overrides + ["rerank.qe.top=2"]), tmp_path / "on")
    unverified = run(compose_config(smoke_overrides + ["rerank=verify", "rerank.top_n=3", "rerank.qe.top=2",
                                                       "rerank.verify.min_inliers=100000"]), tmp_path / "unverified")
    read = lambda name: [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
    assert read("off") == read("plain") and off["mAP"] == plain["mAP"] and "qe_queries_expanded" not in off["timing"]
    assert on["timing"]["qe_queries_expanded"] == on["counts"]["queries"]  # rerank=none: the top results feed it
    assert [r["scores"] for r in read("on")] != [r["scores"] for r in read("plain")]
    assert unverified["timing"]["qe_queries_expanded"] == 0  # nothing verified: nothing to expand with


def test_qe_settings_are_checked():
    from patchify.settings import ConfigError, validate

    for bad in ("rerank.qe.top=-1", "rerank.qe.alpha=-2"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            validate(compose_config(["task=eval", bad]))


def test_expand_and_search_replaces_only_the_expanded_queries():
    from omegaconf import OmegaConf

    from patchify.expansion import expand_and_search
    from patchify.rerank import RerankResult

    cfg = OmegaConf.merge(compose_config(["rerank=verify"]).rerank, {"qe": {"top": 2, "alpha": 1.0}})
    first = RerankResult(ImageHits(np.array([[0, 1], [2, 3]]), np.array([[2.0, 1.0], [0.9, 0.8]], np.float32),
                                   np.array([[0, 1], [2, 3]]), np.zeros((2, 2, 4))),
                         {"verify_images_described": 4}, np.array([[40, 2], [3, 1]]))  # query 1: nothing verified
    queries = np.eye(4, dtype=np.float32)[[0, 2]]
    patch_vectors = np.array([[0.6, 0.8, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    calls = []

    def again(rows, expanded):
        calls.append((rows.tolist(), expanded))
        return RerankResult(ImageHits(np.array([[1, 0]]), np.array([[3.0, 2.5]], np.float32), np.array([[1, 0]]),
                                      np.ones((1, 2, 4))), {"verify_images_described": 1}, np.array([[50, 45]]))

    out, expanded = expand_and_search(cfg, queries, first, lambda hits: patch_vectors[hits.patches], again)
    assert expanded.tolist() == [True, False] and [rows for rows, _ in calls] == [[0]]
    expected = np.array([1 + 0.6 * 0.6, 0.6 * 0.8, 0, 0])  # query 0 + 0.6^1 x its verified result's patch
    np.testing.assert_allclose(calls[0][1][0], expected / np.linalg.norm(expected), atol=1e-6)
    assert out.hits.images.tolist() == [[1, 0], [2, 3]] and out.inliers.tolist() == [[50, 45], [3, 1]]
    assert out.timing["verify_images_described"] == 5 and out.timing["qe_queries_expanded"] == 1
