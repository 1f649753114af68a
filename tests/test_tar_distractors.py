"""ILIAS's distractors as WebDataset tar shards (src/patchify/tar_images.py) and the pickle similarity file."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from fixtures import make_ilias_fixture
from PIL import Image

import patchify
from patchify.crops import decode_rgb
from patchify.data import DataError, load_image, read_ilias_layout, read_manifest, write_manifest
from patchify.digests import DigestMemo
from patchify.pipeline import run
from patchify.report import read_similarity, similarity_arrays
from patchify.tar_images import image_exists, read_image_bytes

SHARD_IMAGES = 20


def jpeg(seed: int, width: int = 96, height: int = 72) -> bytes:
    """A small noise photo as JPEG bytes."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).resize((width, height), Image.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict[str, bytes | str]]) -> Path:
    """A shard as webdataset's TarWriter writes one: per sample, a member ``<__key__>.<field>`` per field, in
    order, regular files (mode 0444, owner bigdata), uncompressed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for field, data in sample.items():
                if field == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o444, 1_700_000_000, "bigdata", "bigdata"
                tar.addfile(info, io.BytesIO(data))
    return path


def yfcc_samples(count: int = SHARD_IMAGES, start: int = 0) -> list[dict]:
    """Samples as ILIAS's YFCC shards hold them: a numeric key, a jpg and a json of metadata."""
    return [{"__key__": f"{start + i:09d}", "jpg": jpeg(start + i, 96 + 8 * (i % 3), 72 + 8 * (i % 2)),
             "json": json.dumps({"id": start + i}).encode()} for i in range(count)]


@pytest.fixture
def ilias_with_shards(tmp_path) -> Path:
    """A small ILIAS layout whose ``distractors/`` holds 4 loose images and a 20-image shard ``00000.tar``."""
    root = make_ilias_fixture(tmp_path / "ilias")
    write_shard(root / "distractors" / "00000.tar", yfcc_samples())
    return root


def test_shard_of_20_images_is_read_as_distractors_with_ilias_ids(ilias_with_shards):
    dataset = read_ilias_layout(ilias_with_shards, distractors="distractors")
    shard = ilias_with_shards / "distractors" / "00000.tar"
    members = [r for r in dataset.gallery if str(r.path).startswith(str(shard))]
    assert [r.id for r in members] == [f"00000.tar/{i:09d}" for i in range(SHARD_IMAGES)]  # ILIAS: shard name/key
    assert len(dataset.gallery) == 12 + 4 + SHARD_IMAGES and not dataset.skipped
    assert all(r.instance is None and r.boxes == () for r in members)
    with tarfile.open(shard) as tar:
        for record in members[:5]:
            stored = tar.extractfile(record.path.relative_to(shard).as_posix()).read()
            assert read_image_bytes(record.path) == stored
            expected = Image.open(io.BytesIO(stored)).convert("RGB")
            assert (record.width, record.height) == expected.size
            assert np.array_equal(np.asarray(load_image(record.path)), np.asarray(expected))
            assert np.array_equal(decode_rgb(record.path).permute(1, 2, 0).numpy(), np.asarray(expected))
    assert not any(r.path.suffix == ".json" for r in dataset.gallery)
    assert not (shard.parent / "000000000.jpg").exists()  # nothing unpacked


def test_a_shard_can_be_the_distractor_setting_itself(ilias_with_shards):
    dataset = read_ilias_layout(ilias_with_shards, distractors="distractors/00000.tar")
    assert sum(r.instance is None for r in dataset.gallery) == SHARD_IMAGES


def test_keys_follow_webdataset(tmp_path):
    root = make_ilias_fixture(tmp_path / "ilias", distractors=0)
    write_shard(root / "yfcc" / "part" / "shard-7.tar", [
        {"__key__": "a/b/0001", "jpg": jpeg(1), "cls": b"3"},   # a key with folders keeps them
        {"__key__": "0002", "png": jpeg(2), "jpg": jpeg(3)},    # jpg is the image ILIAS reads, even when second
        {"__key__": "0003", "seg.png": jpeg(4)},                # extension 'seg.png': not the sample's image
        {"__key__": "0004", "webp": jpeg(5)},                   # any image extension when there is no jpg
        {"__key__": "__meta__/0005", "jpg": jpeg(6)},           # webdataset skips __*__/ metadata
    ])
    dataset = read_ilias_layout(root, distractors="yfcc")
    by_id = {r.id: r for r in dataset.gallery if r.instance is None}
    assert sorted(by_id) == ["shard-7.tar/0002", "shard-7.tar/0004", "shard-7.tar/a/b/0001"]
    assert by_id["shard-7.tar/0002"].path.name == "0002.jpg"


def test_corrupt_and_truncated_members_are_skipped_and_listed(tmp_path):
    root = make_ilias_fixture(tmp_path / "ilias", distractors=0)
    samples = yfcc_samples(6)
    samples[2]["jpg"] = b"not a jpeg at all" * 10
    shard = write_shard(root / "yfcc" / "00001.tar", samples)
    whole = write_shard(root / "yfcc" / "00002.tar", yfcc_samples(3, start=100))
    data = whole.read_bytes()
    with tarfile.open(whole) as tar:
        last = tar.getmember("000000102.jpg")
    whole.write_bytes(data[:last.offset_data + last.size // 2])  # a download cut inside its last image
    (root / "yfcc" / "00003.tar").write_bytes(b"\x1f\x8b" + bytes(2000))  # gzip: not readable by offset
    dataset = read_ilias_layout(root, distractors="yfcc")
    ids = {r.id for r in dataset.gallery if r.instance is None}
    assert ids == {f"00001.tar/{i:09d}" for i in (0, 1, 3, 4, 5)} | {"00002.tar/000000100", "00002.tar/000000101"}
    skipped = "\n".join(dataset.skipped)
    assert f"{shard}/000000002.jpg: unreadable image" in skipped
    assert f"{whole}/000000102.jpg: unreadable image (TarMemberError: member truncated" in skipped
    assert f"{root / 'yfcc' / '00003.tar'}: unreadable shard" in skipped
    with pytest.raises(DataError, match="000000002.jpg: unreadable image"):
        load_image(shard / "000000002.jpg")
    with pytest.raises(DataError, match="image file not found"):
        load_image(shard / "999.jpg")


def test_two_shards_of_one_name_are_refused(tmp_path):
    root = make_ilias_fixture(tmp_path / "ilias", distractors=0)
    write_shard(root / "yfcc" / "a" / "00000.tar", yfcc_samples(2))
    write_shard(root / "yfcc" / "b" / "00000.tar", yfcc_samples(2, start=10))
    with pytest.raises(DataError, match="a shard of the same name"):
        read_ilias_layout(root, distractors="yfcc")


def test_a_rewritten_shard_is_hashed_again(tmp_path):
    """The feature caches key an image by its digest, memoised per path and identity: a member's identity is
    its shard's (size, mtime, ctime, inode) plus offset and size, so new bytes in an old shard are re-hashed."""
    shard = write_shard(tmp_path / "s.tar", [{"__key__": "0", "jpg": b"A" * 300}, {"__key__": "1", "jpg": b"C" * 300}])
    member = shard / "0.jpg"
    memo = DigestMemo(tmp_path / "memo", collection="test")
    before = memo.digest(member)
    memo.save()
    stat = shard.stat()
    write_shard(shard, [{"__key__": "0", "jpg": b"B" * 300}, {"__key__": "1", "jpg": b"C" * 300}])
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same name, size and mtime
    after = DigestMemo(tmp_path / "memo", collection="test").digest(member)
    assert after != before and after == DigestMemo().digest(write_shard(tmp_path / "t.tar", [
        {"__key__": "x", "jpg": b"B" * 300}]) / "x.jpg")  # the same bytes elsewhere: the same key


def test_manifests_list_members_and_read_back(ilias_with_shards, tmp_path):
    dataset = read_ilias_layout(ilias_with_shards, distractors="distractors")
    write_manifest(tmp_path / "gallery.json", dataset.gallery, ilias_with_shards)
    back = read_manifest(tmp_path / "gallery.json", ilias_with_shards)
    assert [(r.id, r.path) for r in back] == [(r.id, r.path) for r in dataset.gallery]
    assert image_exists(back[-1].path) and not image_exists(back[-1].path.with_name("missing.jpg"))


# ----------------------------------------------------------------------------- similarity files

def ilias_map(similarity: dict[str, dict[str, float]], positives: dict[str, set[str]], k: int) -> float:
    """mAP@k by ILIAS's formula (sklearn AP over the top k by score, x hits / min(k, |G|)), from one
    ``{query: {id: score}}`` as :func:`patchify.report.read_similarity` returns for either file."""
    from sklearn.metrics import average_precision_score

    aps = []
    for query, ranked in similarity.items():
        truth = positives[query.split("/")[0]]
        ids, scores = np.asarray(list(ranked)), np.asarray(list(ranked.values()))
        order = np.argsort(-scores)
        relevant = np.isin(ids[order][:k], list(truth))
        aps.append(0.0 if not relevant.any() else
                   average_precision_score(relevant, scores[order][:k]) * relevant.sum() / min(k, len(truth)))
    return float(np.mean(aps)) * 100


def test_similarity_arrays_are_ilias_pickle_form():
    similarity = {"q1": {"b": 0.9, "a": 0.5, "c": 0.25}, "q2": {"c": 0.75, "d": 0.5, "a": 0.125}}
    arrays = similarity_arrays(similarity)
    assert arrays["query_ids"] == ["q1", "q2"] and arrays["db_ids"].tolist() == ["a", "b", "c", "d"]
    assert arrays["sims"].dtype == np.float64 and arrays["sims"].shape == (2, 3)
    assert arrays["ranks"].dtype == np.int64 and arrays["ranks"].tolist() == [[1, 0, 2], [2, 3, 0]]
    ragged = similarity_arrays({"q1": {"a": 1.0, "b": 0.5}, "q2": {"b": 0.25}})  # rows of unequal length
    assert [r.tolist() for r in ragged["ranks"]] == [[0, 1], [1]]


def test_pickle_reader_loads_data_only(tmp_path):
    path = tmp_path / "similarity.pkl"
    path.write_bytes(pickle.dumps({"query_ids": ["q"], "db_ids": np.asarray(["a"]), "sims": np.ones((1, 1)),
                                   "ranks": np.zeros((1, 1), np.int64)}, protocol=5))
    assert read_similarity(path) == {"q": {"a": 1.0}}
    path.write_bytes(pickle.dumps({"query_ids": ["q"], "db_ids": os.getcwd}))  # refers to a function
    with pytest.raises(DataError, match="not an ILIAS similarity file.*posix.getcwd"):
        read_similarity(path)


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory) -> Path:
    """A smoke eval (tiny random ViT) whose distractors are 4 images and a 20-image shard with a corrupt member."""
    base = tmp_path_factory.mktemp("shard_run")
    root = make_ilias_fixture(base / "ilias")
    samples = yfcc_samples(SHARD_IMAGES + 1)
    samples[7]["jpg"] = b"\xff\xd8 truncated jpeg"
    write_shard(root / "distractors" / "00000.tar", samples)
    overrides = ["experiment=smoke", f"dataset.root={root}", "dataset.generate=null", "dataset.name=fixture",
                 "dataset.distractors=distractors", f"paths.features={base / 'features'}",
                 f"paths.indices={base / 'indices'}", f"paths.logs={base / 'logs'}", "pyramid.level=1"]
    run(compose_config(overrides), base / "run")
    second = run(compose_config(overrides), base / "again")
    assert second["counts"]["extracted_images"] == 0  # members are cached by content like files
    return base / "run"


def test_smoke_eval_with_shard_distractors(shard_run):
    metrics = json.loads((shard_run / "metrics.json").read_text())
    assert metrics["counts"]["gallery_images"] == 12 + 4 + SHARD_IMAGES
    assert any("00000.tar/000000007.jpg: unreadable image" in line for line in metrics["counts"]["skipped_images"])
    similarity = json.loads((shard_run / "similarity.json").read_text())
    ranked = {i for row in similarity.values() for i in row}
    assert {f"00000.tar/{i:09d}" for i in range(SHARD_IMAGES + 1) if i != 7} <= ranked
    gallery = json.loads((shard_run / "gallery.json").read_text())["images"]
    assert gallery[-1]["path"] == f"distractors/00000.tar/{SHARD_IMAGES:09d}.jpg"


def test_pickle_and_json_similarity_files_give_the_same_map(shard_run):
    from_json, from_pickle = read_similarity(shard_run / "similarity.json"), read_similarity(shard_run / "similarity.pkl")
    assert from_pickle == from_json
    gallery = json.loads((shard_run / "gallery.json").read_text())["images"]
    positives: dict[str, set[str]] = {}
    for image in gallery:
        if image["instance"]:
            positives.setdefault(image["instance"], set()).add(image["id"])
    metrics = json.loads((shard_run / "metrics.json").read_text())
    assert ilias_map(from_pickle, positives, 100) == ilias_map(from_json, positives, 100)
    assert ilias_map(from_pickle, positives, 100) == pytest.approx(metrics["mAP"], abs=1e-9)
    # patchify.evaluate reads either file, with the run's own ground truth
    ground_truth = {q: {p: [] for p in positives[q.split("/")[0]]} for q in from_json}
    scored = [patchify.evaluate(shard_run / name, ground_truth, k=100, metrics=["map"])["mAP"]
              for name in ("similarity.json", "similarity.pkl")]
    assert scored[0] == scored[1] == pytest.approx(metrics["mAP"], abs=1e-9)


@pytest.mark.skipif(not os.environ.get("ILIAS_REPO"), reason="set ILIAS_REPO to a checkout of ilias-vrg/ilias")
def test_ilias_official_evaluation_accepts_the_files(shard_run):
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "check_ilias_official.py"
    done = subprocess.run([sys.executable, str(script), str(shard_run), os.environ["ILIAS_REPO"]],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("True") == 2  # both files also pass --check_ids
