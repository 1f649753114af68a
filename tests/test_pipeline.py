"""End-to-end runs on a small ILIAS-layout fixture with timm's tiny test ViT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from sklearn.metrics import average_precision_score

import patchify.extraction as extraction
import patchify.index as faiss_index
from patchify.cache import CacheError
from patchify.data import DataError
from patchify.pipeline import run


def _run(overrides, run_dir):
    return run(compose_config(overrides), run_dir)


def test_end_to_end_writes_run_folder_and_ilias_similarity_file(smoke_overrides, tmp_path, ilias_fixture):
    metrics = _run(smoke_overrides, tmp_path / "run")
    for name in ("config.yaml", "environment.json", "metrics.json", "results.jsonl", "similarity.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert 0.0 <= metrics["LocScore@0.4"] <= metrics["mAP"] <= 100.0
    assert metrics["counts"]["gallery_patches"] == 16 * 30  # 16 images x (1 + 4 + 9 + 16)
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert "timm" in env["packages"] and "commit" in env["git"]

    # Recompute mAP from the exported file with ILIAS's formula (sklearn AP x hits / min(k, |G|)).
    similarity = json.loads((tmp_path / "run" / "similarity.json").read_text())
    positives = {}
    for path in (ilias_fixture / "ilias_core").glob("*/pos/*.jpg"):
        positives.setdefault(path.parts[-3], set()).add(path.relative_to(ilias_fixture / "ilias_core").as_posix())
    aps = []
    for query_id, ranked in similarity.items():
        gt = positives[query_id.split("/")[0]]
        y_true = np.isin(list(ranked), list(gt))[:100]
        y_score = np.array(list(ranked.values()))[:100]
        aps.append(0.0 if not y_true.any() else average_precision_score(y_true, y_score) * y_true.sum() / min(100, len(gt)))
    assert np.mean(aps) * 100 == pytest.approx(metrics["mAP"], abs=1e-9)


def test_second_identical_run_extracts_nothing(smoke_overrides, tmp_path):
    first = _run(smoke_overrides, tmp_path / "a")
    second = _run(smoke_overrides + ["extract.batch_size=7"], tmp_path / "b")  # batch size is not in any key
    assert first["counts"]["extracted_images"] == 4 + 16  # queries; gallery images, all levels in one pass
    assert second["counts"]["extracted_images"] == 0
    assert second["mAP"] == pytest.approx(first["mAP"])


@pytest.mark.parametrize("change", ["model.layer=0", "model.image_size=128", "model.tag=r160_in1k",
                                    "model.pool=mean"])
def test_changed_model_setting_recomputes(smoke_overrides, tmp_path, change):
    base = smoke_overrides + ["pyramid.level=0"]
    _run(base, tmp_path / "a")
    changed = _run(base + [change], tmp_path / "b")
    assert changed["counts"]["extracted_images"] == 4 + 16


def test_changed_pyramid_extracts_only_new_levels(smoke_overrides, tmp_path):
    _run(smoke_overrides + ["pyramid.level=1"], tmp_path / "a")
    more = _run(smoke_overrides + ["pyramid.level=2", "pyramid.multi_scale=single"], tmp_path / "b")
    assert more["counts"]["extracted_images"] == 16  # level 2 is new; queries (L0) are reused
    assert more["counts"]["gallery_patches"] == 16 * 9


def test_killed_extraction_resumes_from_last_chunk(smoke_overrides, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_encode = extraction.encode

    def dying_encode(model, batch, layers=None):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("killed")
        return real_encode(model, batch, layers)

    overrides = smoke_overrides + ["pyramid.level=0", "extract.chunk_size=4"]
    monkeypatch.setattr(extraction, "encode", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        _run(overrides, tmp_path / "a")  # dies during the gallery, after 2 gallery chunks of 4 images
    monkeypatch.setattr(extraction, "encode", real_encode)
    resumed = _run(overrides, tmp_path / "b")
    assert resumed["counts"]["extracted_images"] == 16 - 8
    assert resumed["counts"]["reused_images"] == 4 + 8
    fresh = _run(overrides + [f"paths.features={tmp_path / 'fresh'}"], tmp_path / "c")
    assert resumed["mAP"] == pytest.approx(fresh["mAP"])


def test_truncated_chunk_is_never_read(smoke_overrides, tmp_path):
    overrides = smoke_overrides + ["pyramid.level=0"]
    first = _run(overrides, tmp_path / "a")
    chunk = sorted((tmp_path / "features").glob("*L0*/chunk-*.npz"))[-1]
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    second = _run(overrides, tmp_path / "b")
    assert second["counts"]["extracted_images"] == 4  # the lost chunk's images, extracted again
    assert second["mAP"] == pytest.approx(first["mAP"])
    assert list((tmp_path / "features").glob("*L0*/*.corrupt"))


def test_stale_store_metadata_is_refused(smoke_overrides, tmp_path):
    overrides = smoke_overrides + ["pyramid.level=0"]
    _run(overrides, tmp_path / "a")
    meta = next((tmp_path / "features").glob("*L0*/meta.json"))
    meta.write_text(meta.read_text().replace('"level": 0', '"level": 5'))
    with pytest.raises(CacheError, match="stale cache"):
        _run(overrides, tmp_path / "b")


@pytest.mark.parametrize("train_level,expected_levels", [(-1, [2]), (1, [1]), (-2, [0, 1, 2, 3])])
def test_train_level_selects_training_vectors(smoke_overrides, tmp_path, monkeypatch, train_level, expected_levels):
    seen = {}
    real_train = faiss_index.train_index

    def spy(index, vectors, spec, **kwargs):
        seen["n"] = len(vectors)
        return real_train(index, vectors, spec, **kwargs)

    monkeypatch.setattr(faiss_index, "train_index", spy)
    metrics = _run(smoke_overrides + ["pyramid.level=2", "pyramid.multi_scale=single", "index=ivfpq",
                                      "index.m=8", "index.nbits=4", "index.nlist=4", "index.nprobe=4",
                                      f"index.train_level={train_level}"], tmp_path / "run")
    assert seen["n"] == 16 * sum((level + 1) ** 2 for level in expected_levels)
    assert 0 <= metrics["mAP"] <= 100


def test_refine_stage_with_the_whole_shortlist_gives_flat_results(smoke_overrides, tmp_path):
    """index.refine=Flat re-scores PQ's shortlist with the float vectors: a shortlist of every patch is exact."""
    exact = _run(smoke_overrides + ["pyramid.level=1"], tmp_path / "flat")
    pq = smoke_overrides + ["pyramid.level=1", "index=pq", "index.m=8", "index.nbits=4"]
    refined = _run(pq + ["index.refine=Flat", "index.k_factor=1000"], tmp_path / "refined")
    for key in ("mAP", "LocScore", "R@1"):
        assert refined[key] == pytest.approx(exact[key]), key
    assert [p.name for p in (tmp_path / "indices").glob("*RefineFlat*.populated.faiss")]
    plain = _run(pq, tmp_path / "plain")  # another index file; the refined one is not reused for it
    assert len(list((tmp_path / "indices").glob("*.populated.faiss"))) == 2 and 0 <= plain["mAP"] <= 100


def test_missing_dataset_is_one_line_error(smoke_overrides, tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        _run(smoke_overrides + [f"dataset.root={tmp_path / 'nowhere'}"], tmp_path / "run")


def test_visualize_writes_pictures_and_self_contained_report(smoke_overrides, tmp_path):
    metrics = _run(smoke_overrides + ["pyramid.level=1", "eval.visualize=true", "eval.visualize_max_queries=2"],
                   tmp_path / "run")
    assert len(list((tmp_path / "run" / "pictures").glob("*.jpg"))) == 2
    html = (tmp_path / "run" / "report.html").read_text()
    assert "data:image/jpeg;base64," in html and "http://" not in html and "https://" not in html
    assert any(v is not None for v in metrics["mAP_scale"].values())
    assert html.count('<img class="chart" src="data:image/svg+xml;base64,') == 1  # the run's AP per object scale
