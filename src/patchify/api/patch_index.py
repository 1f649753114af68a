"""``patchify.PatchIndex``: a searchable index of image patches, built from images or from arrays.

One row per patch (a vector, the image it belongs to, its box); a search scores an image by its
best patch and returns that patch's box: :func:`patchify.search.search_images`, the command line's
own max-per-image aggregation. The FAISS index is made by :mod:`patchify.index` (``flat``, ``pq``,
``ivfpq`` as ``configs/index/*.yaml`` describe them; any other FAISS factory string); quantisers
are trained as ``task=eval`` trains them (a seeded sample of at most ``max_train_vectors`` of the
indexed patches, k-means seeded with ``seed``). :meth:`PatchIndex.save` writes a search bundle
(:mod:`patchify.bundle`: one atomic commit, every part checked when read).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from loguru import logger
from omegaconf import OmegaConf
from PIL import Image

from .. import index as faiss_index
from ..bundle import POINTER, read_bundle, write_bundle
from ..data import DataError, read_folder
from ..extraction import PatchFeatures
from ..index import IndexConfigError, IndexSpec
from ..indexing import training_levels, training_sample
from ..pyramid import levels_for
from ..search import PatchOwners, search_images
from .encoder import Encoder, ImageLike, load_encoder

SAVED_FORMAT = 1
SETTINGS_ARRAY = "patchify_index"  # the index's settings (JSON), stored with the gallery arrays of the bundle
TRAIN_DEFAULTS = {"max_train_vectors": 500_000, "seed": 0}  # configs/index/{pq,ivfpq}.yaml, configs/config.yaml


@dataclass
class Hits:
    """One query's images, best first: ``ids``, ``scores`` (float32, higher is better) and ``boxes``
    (float32 (n, 4) x, y, w, h: the image's best patch); ``paths`` when the index was built from files."""

    ids: list[str]
    scores: np.ndarray
    boxes: np.ndarray
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        shown = ", ".join(f"{i} {s:.4f}" for i, s in zip(self.ids[:3], self.scores[:3]))
        return f"Hits({len(self)} images: {shown}{', ...' if len(self) > 3 else ''})"


def _spec_and_factory(index: str, settings: dict) -> tuple[IndexSpec | None, str | None]:
    """(IndexSpec, None) for ``flat``/``pq``/``ivfpq``; (None, factory string) for anything else."""
    spec_keys = {"m", "nlist", "nbits", "nprobe", "metric", "refine", "k_factor"}
    if str(index).lower() in faiss_index.KINDS:
        unknown = sorted(set(settings) - spec_keys)
        if unknown:
            raise IndexConfigError(f"index: unknown setting {unknown[0]}={settings[unknown[0]]} for index={index} "
                                   f"(known: {', '.join(sorted(spec_keys | set(TRAIN_DEFAULTS)))})")
        if str(index).lower() == "ivfpq" and "nlist" in settings and "nprobe" not in settings:
            settings = {**settings, "nprobe": min(int(settings["nlist"]), IndexSpec.nprobe)}  # as nlist=256 nprobe=256
        return IndexSpec(kind=str(index), **settings), None
    unknown = sorted(set(settings) - {"metric", "nprobe"})
    if unknown:
        raise IndexConfigError(f"index: unknown setting {unknown[0]}={settings[unknown[0]]} for factory string "
                               f"{index!r} (known: metric, nprobe, max_train_vectors, seed)")
    return None, str(index)


def build_faiss_index(vectors: np.ndarray, index: str = "flat", *, train: np.ndarray | None = None,
                      max_train_vectors: int = TRAIN_DEFAULTS["max_train_vectors"], seed: int = TRAIN_DEFAULTS["seed"],
                      **settings: Any) -> tuple[faiss.Index, dict]:
    """A populated CPU FAISS index of ``vectors`` (rows = ids) and its settings (JSON-able).

    ``index``: ``flat`` | ``pq`` | ``ivfpq`` (settings ``m``, ``nbits``, ``nlist``, ``nprobe``, ``refine``,
    ``k_factor``, ``metric``: configs/index/*.yaml) or a FAISS factory string (``metric``, ``nprobe``).
    Quantisers train on ``train`` (default: ``vectors``), a seeded sample of at most ``max_train_vectors``.
    """
    x = np.asarray(vectors)
    if x.ndim != 2 or not len(x):
        raise IndexConfigError(f"index: vectors must be a non-empty 2-D (n, d) array, got shape {x.shape}")
    spec, factory = _spec_and_factory(index, settings)
    metric = spec.metric if spec else str(settings.get("metric", "IP")).upper()
    if metric not in faiss_index.METRICS:
        raise IndexConfigError(f"index: unknown metric {metric!r} (choose IP or L2)")
    d = int(x.shape[1])
    if spec is not None:
        built = faiss_index.create_index(spec, d)
    else:
        try:
            built = faiss.index_factory(d, factory, faiss_index.METRICS[metric])
        except RuntimeError as err:
            raise IndexConfigError(f"index={factory!r}: FAISS cannot build this factory string for d={d} "
                                   f"({str(err).strip().splitlines()[-1]})") from None
    if not built.is_trained:
        sample = training_sample(np.asarray(x if train is None else train), int(max_train_vectors), int(seed))
        if spec is not None:
            faiss_index.train_index(built, sample, spec, seed=int(seed))
        else:
            ivf = faiss.try_extract_index_ivf(built)
            if ivf is not None:
                ivf.cp.seed = int(seed)
            try:
                built.train(np.ascontiguousarray(sample, dtype=np.float32))
            except RuntimeError as err:
                raise IndexConfigError(f"index={factory!r}: training on {len(sample):,} vectors failed "
                                       f"({str(err).strip().splitlines()[-1]})") from None
    faiss_index.add_vectors(built, x, 0)
    if spec is not None:
        faiss_index.set_search_params(built, spec)
    elif "nprobe" in settings:
        faiss_index.set_nprobe(built, int(settings["nprobe"]))
    described = dict(spec.__dict__) if spec else {"factory": factory, "metric": metric,
                                                  **({"nprobe": int(settings["nprobe"])} if "nprobe" in settings else {})}
    return built, {**described, "max_train_vectors": int(max_train_vectors), "seed": int(seed)}


def _image_table(image_ids: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(distinct image ids in first-seen order, per patch the position of its image among them)."""
    ids = np.asarray([str(i) for i in image_ids])
    distinct, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return distinct[order], rank[inverse].astype(np.int64)


class PatchIndex:
    """Patches of a gallery in a FAISS index; :meth:`search` returns images scored by their best patch.

    Build with :meth:`from_images` (an :class:`~patchify.api.encoder.Encoder` describes them) or
    :meth:`from_vectors` (any descriptors); :meth:`save` / :meth:`load` keep it in a folder.
    """

    def __init__(self, index: faiss.Index, ids: np.ndarray, patch_image: np.ndarray, boxes: np.ndarray, *,
                 settings: dict, paths: np.ndarray | None = None, levels: np.ndarray | None = None,
                 encoder: Encoder | None = None, encoder_config: dict | None = None):
        self.index, self.ids, self.patch_image = index, np.asarray(ids, dtype=str), np.asarray(patch_image, np.int64)
        self.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        self.settings, self.paths, self.levels = settings, paths, levels
        self.encoder, self.encoder_config = encoder, encoder_config
        if not (len(self.patch_image) == len(self.boxes) == index.ntotal):
            raise IndexConfigError(f"index: {index.ntotal} vectors, {len(self.patch_image)} image ids and "
                                   f"{len(self.boxes)} boxes; give one image id and one box per vector")
        self.owners = PatchOwners.of(self.patch_image)  # once: a search then costs no O(gallery) work

    # ------------------------------------------------------------------ building

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, image_ids: Sequence, boxes: np.ndarray | None = None,
                     index: str = "flat", *, encoder: Encoder | None = None, **settings: Any) -> "PatchIndex":
        """An index of patch ``vectors`` (n, d): ``image_ids[i]`` is the image vector i belongs to,
        ``boxes[i]`` its (x, y, w, h) box (None: no boxes, NaN). ``index`` and ``settings``:
        :func:`build_faiss_index`. ``encoder`` (optional) describes image queries for :meth:`search`.

        Vectors are used as given: L2-normalise them for cosine similarity (``metric="IP"``)."""
        x = np.asarray(vectors)
        if len(image_ids) != len(x):
            raise IndexConfigError(f"index: {len(x)} vectors but {len(image_ids)} image ids; give one per vector")
        boxes = np.full((len(x), 4), np.nan, np.float32) if boxes is None else np.asarray(boxes, np.float32)
        if boxes.shape != (len(x), 4):
            raise IndexConfigError(f"index: boxes must be (n, 4) x, y, w, h, one per vector; got shape {boxes.shape}")
        ids, patch_image = _image_table(image_ids)
        built, described = build_faiss_index(x, index, **settings)
        return cls(built, ids, patch_image, boxes, settings=described, encoder=encoder)

    @classmethod
    def from_images(cls, images: str | Path | Sequence[ImageLike], encoder: Encoder, level: int | None = None,
                    index: str = "flat", *, ids: Sequence[str] | None = None, multi_scale: str | None = None,
                    train_level: int = -1, **settings: Any) -> "PatchIndex":
        """An index of the pyramid patches of ``images`` (a folder, searched recursively as ``task=index``
        does, or a list of paths / PIL images), described by ``encoder``.

        ``level`` / ``multi_scale``: the pyramid (default: the encoder's, L3 = levels 0..3, 30 patches an
        image). Image ids: paths relative to the folder, the paths as given, or ``ids``. ``train_level``
        (quantised indices): -1 train on the indexed levels, -2 on all levels, k on level k
        (``index.train_level``). Unreadable images are skipped with a warning."""
        folder, paths = None, None
        if isinstance(images, (str, Path)) and not Path(images).expanduser().exists():
            raise DataError(f"{images}: no such folder or image")
        if isinstance(images, (str, Path)) and Path(images).expanduser().is_dir():
            folder = Path(images).expanduser()
            dataset = read_folder(folder)
            for line in dataset.skipped:
                logger.warning(f"skipped {line}")
            items: list[ImageLike] = [r.path for r in dataset.gallery]
            names = [r.id for r in dataset.gallery]
        elif isinstance(images, (str, Path, Image.Image)):
            items, names = [images], [str(images)]
        else:
            items = list(images)
            names = [str(i) if not isinstance(i, Image.Image) else f"image{n}" for n, i in enumerate(items)]
        if ids is not None:
            if len(ids) != len(items):
                raise DataError(f"ids: {len(ids)} ids for {len(items)} images; give one id per image")
            names = [str(i) for i in ids]
        if len(set(names)) != len(names):
            raise DataError("ids: image ids must be distinct")
        if not items:
            raise DataError(f"{folder or 'images'}: no images to index")
        level = int(encoder.config.pyramid.level if level is None else level)
        multi_scale = str(multi_scale or encoder.config.pyramid.multi_scale)
        levels = levels_for(level, multi_scale)
        patches = encoder.patches(items, level=level, multi_scale=multi_scale)
        if not len(patches.vectors):
            raise DataError(f"{folder or 'images'}: none of the {len(items)} images is readable")
        train = None
        train_levels = training_levels(int(train_level), levels)
        if str(index).lower() != "flat" and train_levels != levels:
            train = PatchFeatures.concat([encoder.patches(items, level=t, multi_scale="single")
                                          for t in train_levels]).vectors
        built, described = build_faiss_index(patches.vectors, index, train=train, **settings)
        described["train_level"] = int(train_level)
        if not all(isinstance(i, (str, Path)) for i in items):
            paths = None
        else:
            paths = np.asarray([str(Path(p).expanduser()) for p in items], dtype=str)
        return cls(built, np.asarray(names, dtype=str), patches.image, patches.boxes, settings=described,
                   paths=paths, levels=np.asarray(levels), encoder=encoder,
                   encoder_config=OmegaConf.to_container(encoder.config, resolve=True))

    # ------------------------------------------------------------------ searching

    def __len__(self) -> int:
        """Number of images (some may have no patch: unreadable when indexed)."""
        return len(self.ids)

    @property
    def ntotal(self) -> int:
        """Number of patches (index rows)."""
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __repr__(self) -> str:
        kind = self.settings.get("factory") or self.settings.get("kind")
        return f"PatchIndex({len(self)} images, {self.ntotal} patches, d={self.dim}, {kind}, {self.settings.get('metric')})"

    def _query_encoder(self) -> Encoder:
        if self.encoder is None and self.encoder_config is not None:
            fingerprint = self.encoder_config.get("_fingerprint", {})
            precision = fingerprint.get("model", {}).get("precision", "fp32")
            config = {k: v for k, v in self.encoder_config.items() if k != "_fingerprint"}
            self.encoder = load_encoder(config, precision=precision, device="auto")
        if self.encoder is None:
            raise IndexConfigError("PatchIndex.search: an image query needs an encoder; give encoder= when building "
                                   "or loading the index, or search with vectors")
        return self.encoder

    def search(self, query: ImageLike | np.ndarray | Sequence[ImageLike], k: int = 10) -> Hits | list[Hits]:
        """The ``k`` best images for ``query``: an image (path or PIL) or a vector (d,) gives one
        :class:`Hits`; a list of images or a matrix (n, d) gives a list of them. Query images are
        described by the index's encoder (whole image, as the command line describes queries)."""
        single = isinstance(query, (str, Path, Image.Image)) or (isinstance(query, np.ndarray) and query.ndim == 1)
        if isinstance(query, np.ndarray) or (not single and len(query) and not isinstance(query[0], (str, Path, Image.Image))):
            vectors = np.atleast_2d(np.asarray(query, dtype=np.float32))
        else:
            vectors = self._query_encoder().describe(query)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise IndexConfigError(f"PatchIndex.search: query vectors of shape {np.shape(query)} do not match the "
                                   f"index dimension {self.dim}")
        if int(k) < 1:
            raise IndexConfigError(f"PatchIndex.search: k={k} must be >= 1")
        hits = search_images(self.index, vectors, self.owners, int(k), row_of_id=None)
        found = []
        for row in range(len(vectors)):
            valid = hits.images[row] >= 0
            images, patches = hits.images[row][valid], hits.patches[row][valid]
            found.append(Hits(ids=[str(self.ids[i]) for i in images], scores=hits.scores[row][valid],
                              boxes=self.boxes[patches],
                              paths=[str(self.paths[i]) for i in images] if self.paths is not None else None))
        return found[0] if single else found

    # ------------------------------------------------------------------ saving

    def save(self, folder: str | Path) -> Path:
        """Write the index into ``folder`` (a search bundle, committed atomically; an older save there
        is replaced). Returns ``folder``."""
        folder = Path(folder).expanduser()
        settings = {"format": SAVED_FORMAT, "index": self.settings,
                    "encoder": None if self.encoder_config is None else
                    {**self.encoder_config, "_fingerprint": self.encoder.fingerprint if self.encoder else
                     self.encoder_config.get("_fingerprint")}}
        gallery = {"ids": self.ids, "paths": self.paths if self.paths is not None else np.full(len(self.ids), "", str),
                   "patch_image": self.patch_image, "boxes": self.boxes,
                   SETTINGS_ARRAY: np.asarray(json.dumps(settings))}
        if self.levels is not None:
            gallery["levels"] = np.asarray(self.levels)
        write_bundle(folder, faiss_index.to_cpu(self.index), gallery)
        return folder

    @classmethod
    def load(cls, folder: str | Path, encoder: Encoder | None = None) -> "PatchIndex":
        """An index saved by :meth:`save`; every part is checked against the bundle's manifest. Image
        queries use ``encoder``, else the saved encoder settings (the model is loaded on first use)."""
        folder = Path(folder).expanduser()
        try:
            pointer = json.loads((folder / POINTER).read_text())
            manifest = json.loads((folder / str(pointer["build"]) / "manifest.json").read_text())
            dim = int(manifest["counts"]["dim"])
        except FileNotFoundError:
            raise DataError(f"{folder}: no saved PatchIndex here (no {POINTER})") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{folder}: not a saved PatchIndex ({type(err).__name__}: {err})") from None
        bundle = read_bundle(folder, dim=dim)
        if bundle is None or SETTINGS_ARRAY not in bundle.gallery:
            raise DataError(f"{folder}: a search bundle, but not one saved by PatchIndex.save")
        saved = json.loads(str(bundle.gallery[SETTINGS_ARRAY]))
        if saved.get("format") != SAVED_FORMAT:
            raise DataError(f"{folder}: PatchIndex format {saved.get('format')} (expected {SAVED_FORMAT})")
        encoder_config = saved.get("encoder")
        if encoder is not None and encoder_config and encoder_config.get("_fingerprint") not in (None, encoder.fingerprint):
            logger.warning(f"{folder}: the index was built with other encoder settings than {encoder!r}; its "
                           "scores will not compare")
        gallery = bundle.gallery
        paths = gallery["paths"] if len(gallery["paths"]) and all(gallery["paths"]) else None
        return cls(bundle.index, gallery["ids"], gallery["patch_image"], gallery["boxes"], settings=saved["index"],
                   paths=paths, levels=gallery.get("levels"), encoder=encoder, encoder_config=encoder_config)
