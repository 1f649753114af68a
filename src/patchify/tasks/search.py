"""task=search: search a bundle made by task=index with one query image or a folder of them.

Each query is described and searched; then, as in task=eval, ``rerank=`` re-ranks each query's first
``rerank.top_n`` images (``verify``: local features + matching + homography, the verified box is the query
projected into the result; ``refine``: a tighter box from encoder windows) and ``rerank.qe.top`` > 0 adds
alpha query expansion (src/patchify/expansion.py). The search depth is then the largest of ``query.top_k``,
``rerank.top_n`` and ``rerank.qe.top``; ``query.top_k`` results are listed.

The bundle holds no patch vectors. Refine and query expansion need those of the candidates: they are read
from the feature cache that task=index filled (the exact vectors eval uses; an image missing from it is
encoded again), for the candidates only. Verification alone reads none. Local features of gallery images
are cached by content (src/patchify/rerank.py), so a second search computes only the new query's.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from loguru import logger
from omegaconf import DictConfig

from .. import index as faiss_index
from ..bundle import Bundle, read_bundle
from ..data import DataError, ImageRecord, image_files
from ..expansion import expand_and_search
from ..extraction import describe_images
from ..features import FeatureSource, make_feature_source
from ..index import IndexConfigError, index_spec
from ..indexing import bundle_folder
from ..pyramid import levels_for
from ..report import RunReport
from ..rerank import RerankResult, rerank
from ..search import ImageHits, PatchOwners, rows_of_ids, search_images
from ..settings import ConfigError
from ..tar_images import image_exists
from .evaluate import refine_model_of


def _query_paths(path: str | None) -> list[Path]:
    """The query image, or the image files of a query folder (:func:`patchify.data.image_files`)."""
    if not path:
        raise ConfigError("task=search needs a query image: query=PATH (a file or a folder of images)")
    path = Path(path)
    if path.is_dir():
        found = image_files(path)
        if not found:
            raise DataError(f"{path}: no query images in this folder")
        return found
    if not path.exists():
        raise DataError(f"{path}: query image not found")
    return [path]


class BundleSearch:
    """Image search over a bundle, patches returned as gallery rows, holding nothing per patch in RAM when it can.

    Ids ``image * P + slot`` (sharded and on-disk builds: the manifest's ``patches_per_image``) name their image
    themselves (:meth:`PatchOwners.by_id`), and a result's row is found by binary search in the bundle's mapped,
    increasing ``patch_ids``: per query O(results x log patches), no table. An index numbered by row reads the
    table of each row's image (4 B per patch).
    """

    def __init__(self, bundle: Bundle):
        gallery, counts = bundle.gallery, bundle.manifest["counts"]
        self.index, self.patch_ids, self.row_of_id = bundle.index, gallery.get("patch_ids"), None
        if self.patch_ids is not None and counts.get("patches_per_image"):
            self.owners = PatchOwners.by_id(int(counts["patches_per_image"]), int(counts["indexed_images"]))
        else:
            self.owners = PatchOwners.of(gallery["patch_image"])
            self.row_of_id = None if self.patch_ids is None else rows_of_ids(self.patch_ids)

    def __call__(self, vectors: np.ndarray, k: int, metric: str) -> ImageHits:
        hits = search_images(self.index, vectors, self.owners, k, metric=metric, row_of_id=self.row_of_id)
        if self.owners.image is None:  # patches are ids: their rows
            found = hits.patches >= 0
            rows = np.searchsorted(self.patch_ids, hits.patches[found])
            if len(rows) and (rows.max() >= len(self.patch_ids) or
                              np.any(self.patch_ids[np.minimum(rows, len(self.patch_ids) - 1)] != hits.patches[found])):
                raise IndexConfigError("search: the index returned ids no gallery patch has; index and gallery "
                                       "table differ; re-run task=index")
            hits.patches[found] = rows
        return hits


class BundleCandidates:
    """The rerank stage over a bundle: the hits' images as a small gallery of their own.

    Boxes of their patches come from the bundle; their vectors and levels (refine, query expansion) from
    the feature cache, matched to the bundle's rows image by image (same count, same boxes). Images gone
    from disk, or whose cached patches no longer match the bundle's, are not re-ranked: they keep their
    score and their grid box, and feed no expansion.
    """

    def __init__(self, cfg: DictConfig, source: FeatureSource, levels: list[int], bundle: Bundle):
        self.cfg, self.source, self.levels = cfg, source, levels
        gallery = bundle.gallery  # memory-mapped: only the candidates' rows are read
        self.boxes, self.patch_image, self.ids, self.paths = (gallery[name] for name in ("boxes", "patch_image",
                                                                                        "ids", "paths"))
        self.order = None if bundle.manifest["counts"].get("rows_by_image") else \
            np.argsort(self.patch_image, kind="stable")  # rows not grouped by image (not task=index's): sort once
        self.by_image = self.patch_image if self.order is None else self.patch_image[self.order]
        self.refines = str(cfg.rerank.stage) in ("refine", "both")  # refine reads the candidates' vectors
        self._exists: dict[int, bool] = {}
        self._patches: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}  # image -> (vectors, levels) or None

    def record(self, image: int) -> ImageRecord:
        return ImageRecord(id=str(self.ids[image]), path=Path(str(self.paths[image])))

    def rows_of(self, image: int) -> np.ndarray:
        """The bundle rows of ``image``, in index order (levels, then cells): a binary search."""
        first, end = np.searchsorted(self.by_image, [image, image + 1])
        return np.arange(first, end) if self.order is None else self.order[first:end]

    def boxes_of(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.boxes[rows], np.float64)

    def exists(self, image: int) -> bool:
        if image not in self._exists:
            self._exists[image] = image_exists(self.record(image).path)  # a file or a tar member
        return self._exists[image]

    def load_vectors(self, images) -> None:
        """Read the cached patch vectors of ``images`` (those not read yet) in one pass."""
        todo = sorted({int(i) for i in images if i >= 0 and int(i) not in self._patches and self.exists(int(i))})
        if not todo:
            return
        feats = self.source.features([self.record(i) for i in todo], self.levels, desc="candidates")
        for local, image in enumerate(todo):
            mine = np.flatnonzero(feats.image == local)
            rows = self.rows_of(image)
            if len(mine) != len(rows) or not np.allclose(feats.boxes[mine], self.boxes_of(rows), atol=0.5):
                logger.warning(f"{self.record(image).path}: changed since task=index (its patches differ from the "
                               "index's); not re-ranked; re-run task=index to update the index")
                self._patches[image] = None
                continue
            self._patches[image] = (feats.vectors[mine], feats.level[mine])

    def usable(self, image: int) -> bool:
        """Can ``image`` be re-ranked: on disk and, for refine, with vectors matching the bundle."""
        if image < 0 or not self.exists(image):
            return False
        return not self.refines or self._patches.get(image) is not None

    def winner_vectors(self, hits: ImageHits) -> np.ndarray:
        """Vectors (nq, m, d) of the winning patches of ``hits`` (zeros where none)."""
        self.load_vectors(hits.images.ravel())
        out = np.zeros((*hits.images.shape, self.source.model.dim), np.float32)
        for (row, col), image in np.ndenumerate(hits.images):
            if image >= 0 and self._patches.get(int(image)) is not None:
                slot = int(np.flatnonzero(self.rows_of(int(image)) == hits.patches[row, col])[0])
                out[row, col] = self._patches[int(image)][0][slot]
        return out

    def rerank(self, queries: list[ImageRecord], hits: ImageHits, query_vectors: np.ndarray) -> RerankResult:
        """``rerank(...)`` of src/patchify/rerank.py on the first ``rerank.top_n`` columns of ``hits`` (bundle rows),
        results mapped back to bundle images and rows; later columns keep their place, score and grid box."""
        nq, k = hits.images.shape
        stage, n = str(self.cfg.rerank.stage), min(int(self.cfg.rerank.top_n), k)
        boxes = self.boxes_of(np.maximum(hits.patches, 0))
        boxes[hits.patches < 0] = np.nan
        if stage == "none" or nq == 0:
            return RerankResult(ImageHits(hits.images.copy(), hits.scores.copy(), hits.patches.copy(), boxes), {})
        if self.refines:
            self.load_vectors(hits.images[:, :n].ravel())
        head = hits.images[:, :n]
        images = sorted({int(i) for i in head.ravel() if self.usable(int(i))})
        if not images:  # nothing on disk to re-rank
            return RerankResult(ImageHits(hits.images.copy(), hits.scores.copy(), hits.patches.copy(), boxes), {})
        local_of = {image: j for j, image in enumerate(images)}
        rows = [self.rows_of(i) for i in images]
        sub_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        local_row = {int(r): j for j, r in enumerate(sub_rows)}
        if self.refines:
            vectors = np.concatenate([self._patches[i][0] for i in images])
            levels = np.concatenate([self._patches[i][1] for i in images])
        else:  # verification reads neither
            vectors, levels = np.zeros((len(sub_rows), 1), np.float32), np.zeros(len(sub_rows), np.int8)
        patch_image = np.repeat(np.arange(len(images)), [len(r) for r in rows]).astype(np.int64)
        # usable candidates packed left per query; the others are merged back by score afterwards
        local = ImageHits(np.full((nq, n), -1, np.int64), np.full((nq, n), -np.inf, np.float32),
                          np.full((nq, n), -1, np.int64))
        aside: list[list[int]] = []
        for q in range(nq):
            keep = [c for c in range(n) if head[q, c] >= 0 and int(head[q, c]) in local_of]
            aside.append([c for c in range(n) if head[q, c] >= 0 and int(head[q, c]) not in local_of])
            local.images[q, :len(keep)] = [local_of[int(head[q, c])] for c in keep]
            local.scores[q, :len(keep)] = hits.scores[q, keep]
            local.patches[q, :len(keep)] = [local_row[int(hits.patches[q, c])] for c in keep]
        out = rerank(self.cfg.rerank, queries=queries, gallery=[self.record(i) for i in images], hits=local,
                     patch_boxes=self.boxes_of(sub_rows), patch_vectors=vectors, patch_image=patch_image,
                     patch_level=levels, query_vectors=query_vectors, refine_model=refine_model_of(self.cfg, self.source),
                     features_root=Path(self.cfg.paths.features) / "rerank",
                     batch_size=int(self.cfg.extract.batch_size))
        result = ImageHits(hits.images.copy(), hits.scores.copy(), hits.patches.copy(), boxes)
        inliers = np.full((nq, k), -1, np.int64)
        outlines = np.full((nq, k, 4, 2), np.nan)
        no_outline = np.full((4, 2), np.nan)  # its own array: a view into outlines would take the first written
        images_array = np.asarray(images, np.int64)
        for q in range(nq):
            done = np.flatnonzero(out.hits.images[q] >= 0)
            entries = [(float(out.hits.scores[q, c]), int(images_array[out.hits.images[q, c]]),
                        int(sub_rows[out.hits.patches[q, c]]), out.hits.boxes[q, c],
                        -1 if out.inliers is None else int(out.inliers[q, c]),
                        no_outline if out.outlines is None else out.outlines[q, c]) for c in done]
            entries += [(float(hits.scores[q, c]), int(head[q, c]), int(hits.patches[q, c]), boxes[q, c], -1,
                         no_outline) for c in aside[q]]
            entries.sort(key=lambda e: -e[0])  # stable: re-ranked first among equal scores
            for c, (score, image, patch, box, count, outline) in enumerate(entries):
                result.images[q, c], result.scores[q, c], result.patches[q, c] = image, score, patch
                result.boxes[q, c], inliers[q, c], outlines[q, c] = box, count, outline
        verified = out.inliers is not None
        return RerankResult(result, out.timing, inliers if verified else None, outlines if verified else None)


def run_search(cfg: DictConfig, report: RunReport) -> dict:
    """Search an index made by task=index with one or more query images (re-ranked and expanded as ``rerank``
    says); print, save search.json and one picture per query."""
    from ..visualize import result_strip

    levels = levels_for(int(cfg.pyramid.level), cfg.pyramid.multi_scale)
    source = make_feature_source(cfg)
    folder = bundle_folder(cfg, source.model.fingerprint, levels)
    bundle = read_bundle(folder, dim=source.model.dim)  # every part checked against its manifest
    if bundle is None:
        raise DataError(f"{folder}: no index for {cfg.dataset.root} with these settings; run task=index first")
    index, gallery = bundle.index, bundle.gallery
    image_search = BundleSearch(bundle)  # once per bundle: each query then costs what FAISS costs
    faiss_index.set_search_params(index, index_spec(cfg.index))
    stage, qe_top = str(cfg.rerank.stage), int(cfg.rerank.qe.top)
    shown = int(cfg.query.top_k)
    depth = max(shown, int(cfg.rerank.top_n) if stage != "none" else 0, qe_top)

    def search(vectors: np.ndarray) -> ImageHits:
        return image_search(vectors, depth, metric=str(cfg.index.metric))

    queries, vectors, seconds, skipped, rows = [], [], [], [], []
    for record in [ImageRecord(id=str(p), path=p) for p in _query_paths(cfg.query.path)]:
        started = time.perf_counter()
        described, errors = describe_images([record], source.query_model)
        if errors:  # an unreadable query is skipped and listed, as gallery images are
            logger.warning(f"skipped query {errors[0]}")
            skipped.append(errors[0])
            continue
        rows.append(search(described))
        queries.append(record)
        vectors.append(described[0])
        seconds.append(time.perf_counter() - started)
    output: list[dict] = []
    if queries:
        vectors = np.stack(vectors)
        hits = ImageHits(*(np.concatenate([getattr(h, name) for h in rows])
                           for name in ("images", "scores", "patches")))
        candidates = BundleCandidates(cfg, source, levels, bundle)
        started = time.perf_counter()
        first = candidates.rerank(queries, hits, vectors)

        def search_and_rerank(which: np.ndarray, expanded: np.ndarray) -> RerankResult:
            return candidates.rerank([queries[q] for q in which], search(expanded), vectors[which])

        final, expanded = expand_and_search(cfg.rerank, vectors, first, candidates.winner_vectors, search_and_rerank)
        rerank_seconds = (time.perf_counter() - started) / len(queries)
        for q, record in enumerate(queries):
            output.append(_query_output(record, final, q, shown, seconds[q] + rerank_seconds, gallery,
                                        min_inliers=int(cfg.rerank.verify.min_inliers)))
            if qe_top:
                output[-1]["expanded"] = bool(expanded[q])
            _print_query(output[-1], stage)
            strip = result_strip(record, [{"record": ImageRecord(id=h["id"], path=Path(h["path"])), "score": h["score"],
                                           "box": tuple(h["box"]), "relevant": None, "gt_boxes": None,
                                           **({"inliers": h["inliers"], "verified": h["verified"]}
                                              if "verified" in h else {}),
                                           **({"outline": h["outline"]} if "outline" in h else {})}
                                          for h in output[-1]["results"]])
            picture = report.dir / f"search_{len(output):03d}_{record.path.stem}.jpg"
            strip.save(picture, quality=90)
            logger.info(f"picture: {picture}")
        timing = {"rerank": {"stage": stage, "top_n": min(int(cfg.rerank.top_n), depth) if stage != "none" else 0,
                             "qe_top": qe_top, **final.timing}}
    else:
        timing = {}
    results = report.write_json("search.json", {"queries": output, "skipped": skipped, **timing})
    if not output:
        raise DataError(skipped[0] if len(skipped) == 1 else
                        f"{cfg.query.path}: none of the {len(skipped)} query images is readable; first: {skipped[0]}")
    return {"queries": len(output), "skipped": len(skipped), "results": str(results), **timing}


def _query_output(record: ImageRecord, final: RerankResult, q: int, shown: int, seconds: float,
                  gallery: dict[str, np.ndarray], min_inliers: int) -> dict:
    """One query's entry of search.json: its first ``shown`` results, each with its box and, where
    verification looked at it, its inlier count and whether it was verified."""
    hits, top = final.hits, []
    for col in np.flatnonzero(hits.images[q] >= 0)[:shown]:
        i = int(hits.images[q, col])
        box = hits.boxes[q, col]
        if not np.isfinite(box).all():  # no box from the rerank stage: the winning cell's
            box = gallery["boxes"][hits.patches[q, col]]
        hit = {"rank": len(top) + 1, "id": str(gallery["ids"][i]), "path": str(gallery["paths"][i]),
               "score": round(float(hits.scores[q, col]), 4), "box": [round(float(v), 1) for v in box]}
        if final.inliers is not None and final.inliers[q, col] >= 0:
            hit.update(inliers=int(final.inliers[q, col]), verified=bool(final.inliers[q, col] >= min_inliers))
        if final.outlines is not None and np.isfinite(final.outlines[q, col]).all():  # where the object lies
            hit["outline"] = [[round(float(x), 1), round(float(y), 1)] for x, y in final.outlines[q, col]]
        top.append(hit)
    gone = [hit for hit in top if not image_exists(hit["path"])]  # a file or a tar member
    for hit in gone:  # indexed, then deleted or moved: still a result, said so
        hit["missing"] = True
    if gone:
        logger.warning(f"{len(gone)} result(s) of {record.path} no longer exist on disk (deleted or moved since "
                       f"task=index), first: {gone[0]['path']}; re-run task=index to update the index")
    return {"query": str(record.path), "seconds": round(seconds, 4), "results": top}


def _print_query(entry: dict, stage: str) -> None:
    how = (f", re-ranked: {stage}" if stage != "none" else "") + (", expanded" if entry.get("expanded") else "")
    print(f"\nquery {entry['query']} ({entry['seconds'] * 1000:.0f} ms{how})")
    for hit in entry["results"]:
        verified = f"  verified, {hit['inliers']} inliers" if hit.get("verified") else \
            f"  not verified ({hit['inliers']} inliers)" if "inliers" in hit else ""
        print(f"  {hit['rank']:>3}  {hit['score']:.4f}  box {hit['box']}{verified}  {hit['path']}"
              f"{'  (missing on disk)' if hit.get('missing') else ''}")
