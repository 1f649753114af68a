"""Readers of the retrieval literature's benchmark files: revisited Oxford / Paris and INSTRE.

Both list their queries, their database and each query's ground truth in one file; the reader turns it into
a :class:`~patchify.data.Dataset` with ``protocol`` set and per-query :class:`~patchify.data.QueryTruth`.
Image ids are paths relative to the image folder, as for ILIAS.

**Revisited Oxford / Paris** (``dataset.kind=revisited``; Radenovic et al., CVPR 2018; the layout of
revisitop's ``python/dataset.py``): ``<root>/gnd_roxford5k.pkl`` (``gnd_rparis6k.pkl``) holds ``imlist`` and
``qimlist`` (image names without ``.jpg``) and ``gnd``, one dict per query: ``bbx`` = ``[x1, y1, x2, y2]``
(the query's box, in pixels), ``easy``, ``hard``, ``junk`` = 0-based indices into ``imlist``. Images are
``<root>/jpg/<name>.jpg``; queries are not in the database. The database has no boxes (``no_boxes``).
An optional ``distractors`` folder (R1M, revisitop1m) is added to the gallery unlabelled.

**INSTRE** (``dataset.kind=instre``; Wang and Jiang 2015, with the query/database split and ground truth of
Iscen et al., CVPR 2017, ``gnd_instre.mat`` of their diffusion code, github.com/ahmetius/diffusion-retrieval):
a MATLAB file with ``qimlist`` (1,250 paths relative to ``<root>``), ``imlist`` (27,293 paths) and ``gnd``, one
struct per query: field ``ok`` = 1-based indices into ``imlist`` of its positives, ``bbx`` = the query's box
``[x1, y1, x2, y2]`` (as OS2D's reader notes, github.com/aosokin/os2d, and unlike INSTRE's own ``.txt`` files),
an optional ``junk``. The INSTRE release has a box file beside each image (``<name>.txt``, one ``x y w h`` line
per object; INSTRE-M images show two objects, the first line for class ``a``, the second for ``b``): when
present they are the positives' boxes and LocScore is computed; without them it is reported as unavailable.
Reading a ``.mat`` needs scipy (``pip install "patchify[benchmarks]"``).

The gnd pickle is read with an unpickler that accepts only Python containers and NumPy arrays: a dataset
file cannot run code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from ..data import (DataError, Dataset, ImageRecord, QueryTruth, _record, image_files, image_size,
                    load_data_pickle, read_box_file)
from ..settings import ConfigError

INSTRE_M = "instre-m"
INSTRE_S1 = "instre-s1"


# ----------------------------------------------------------------------------- shared

def _query_record(path: Path, image_id: str, bbx: Any, gnd_file: Path, number: int) -> ImageRecord:
    """A query cropped to ``bbx`` = [x1, y1, x2, y2] (clipped to the image); a box outside it is an error."""
    width, height = image_size(path)
    try:
        x1, y1, x2, y2 = (float(v) for v in np.asarray(bbx, dtype=np.float64).ravel())
    except (TypeError, ValueError):
        raise DataError(f"{gnd_file}: query {number} ({image_id}): bbx must be [x1, y1, x2, y2], got {bbx!r}") from None
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    if not (np.isfinite([x1, y1, x2, y2]).all() and x2 > x1 and y2 > y1):
        raise DataError(f"{gnd_file}: query {number} ({image_id}): bbx {list(np.ravel(bbx))} is empty or outside "
                        f"the {width}x{height} image (expected [x1, y1, x2, y2])")
    return ImageRecord(id=image_id, path=path, boxes=((x1, y1, x2 - x1, y2 - y1),), width=width, height=height)


def _gallery_record(path: Path, image_id: str) -> ImageRecord:
    width, height = image_size(path)
    return ImageRecord(id=image_id, path=path, width=width, height=height)


def _ids_of(indices: Any, gallery: list[ImageRecord], gnd_file: Path, number: int, what: str,
            base: int = 0) -> frozenset[str]:
    """Gallery ids of a list of ``base``-based indices into the database list; an index out of range is an error."""
    values = np.asarray(indices if indices is not None else [], dtype=np.float64).ravel()
    if values.size and (not np.all(values == np.round(values)) or values.min() < base or
                        values.max() >= len(gallery) + base):
        raise DataError(f"{gnd_file}: query {number}: '{what}' holds indices outside {base}..{len(gallery) - 1 + base} "
                        f"(the database list has {len(gallery)} images)")
    return frozenset(gallery[int(i) - base].id for i in values)


def _check_unique(ids: list[str], gnd_file: Path, what: str) -> None:
    seen: set[str] = set()
    for number, image_id in enumerate(ids):
        if image_id in seen:
            raise DataError(f"{gnd_file}: {what} lists {image_id} twice (again at position {number})")
        seen.add(image_id)


def _add_distractors(dataset: Dataset, folder: Path) -> None:
    """Every image under ``folder`` joins the gallery unlabelled (id ``<folder name>/...``); unreadable ones are
    skipped and listed, as ILIAS's distractors are."""
    if not folder.is_dir():
        raise DataError(f"{folder}: distractor folder not found")
    for path in image_files(folder):
        try:
            dataset.gallery.append(_record(path, folder.parent, None, with_boxes=False))
        except DataError as err:
            dataset.skipped.append(str(err))


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    return path


# ----------------------------------------------------------------------------- revisited Oxford / Paris

def read_gnd_pickle(path: Path) -> dict:
    """``gnd_<dataset>.pkl`` as a dict with ``imlist``, ``qimlist`` and ``gnd``; DataError naming the file."""
    path = _existing(Path(path), "ground-truth file (gnd_<dataset>.pkl of revisitop)")
    try:
        content = load_data_pickle(io.BytesIO(path.read_bytes()), encoding="latin1")
    except Exception as err:  # pickle raises many types for foreign or broken content
        raise DataError(f"{path}: not a revisited ground-truth pickle ({type(err).__name__}: {err})") from None
    missing = [k for k in ("imlist", "qimlist", "gnd") if not isinstance(content, dict) or k not in content]
    if missing:
        raise DataError(f"{path}: not a revisited ground-truth pickle (no '{missing[0]}')")
    if len(content["gnd"]) != len(content["qimlist"]):
        raise DataError(f"{path}: {len(content['gnd'])} gnd entries for {len(content['qimlist'])} queries")
    return content


def read_revisited(root: Path, gnd_file: str, image_dir: str = "jpg", distractors: str | None = None,
                   name: str | None = None) -> Dataset:
    """Revisited Oxford / Paris from ``<root>/<gnd_file>`` and ``<root>/<image_dir>/<name>.jpg``."""
    root = Path(root)
    gnd_path = root / gnd_file
    content = read_gnd_pickle(gnd_path)
    images = root / image_dir

    def path_of(image_name: Any) -> Path:
        return _existing(images / f"{image_name}.jpg", f"image listed in {gnd_path.name}")

    dataset = Dataset(name=name or root.name, root=root, protocol="revisited",
                      no_boxes="the revisited Oxford/Paris ground truth has no boxes in database images")
    _check_unique([f"{n}" for n in content["imlist"]], gnd_path, "imlist")
    _check_unique([f"{n}" for n in content["qimlist"]], gnd_path, "qimlist")
    dataset.gallery = [_gallery_record(path_of(n), f"{n}.jpg") for n in content["imlist"]]
    for number, (query_name, gnd) in enumerate(zip(content["qimlist"], content["gnd"])):
        if not isinstance(gnd, dict) or "bbx" not in gnd:
            raise DataError(f"{gnd_path}: query {number} ({query_name}): gnd entry has no 'bbx'")
        query = _query_record(path_of(query_name), f"{query_name}.jpg", gnd["bbx"], gnd_path, number)
        dataset.queries.append(query)
        lists = {what: _ids_of(gnd.get(what), dataset.gallery, gnd_path, number, what)
                 for what in ("easy", "hard", "junk")}
        dataset.truth[query.id] = QueryTruth(**lists)
    if distractors:
        _add_distractors(dataset, Path(distractors) if Path(distractors).is_absolute() else root / distractors)
    if not dataset.queries:
        raise DataError(f"{gnd_path}: no queries (qimlist is empty)")
    return dataset


# ----------------------------------------------------------------------------- INSTRE

def _mat_strings(value: Any) -> list[str]:
    """A MATLAB cell array of strings, as scipy.io.loadmat returns it, as a list of str."""
    cells = np.asarray(value, dtype=object).ravel()
    return [str(np.asarray(v).ravel()[0]) if np.asarray(v).size else "" for v in cells]


def _gnd_field(entry: Any, name: str, position: int) -> Any:
    """A field of one ``gnd`` struct by name, else by position (ok, bbx): readers in the literature index both."""
    names = entry.dtype.names or ()
    if name in names:
        return entry[name]
    return entry[position] if position < len(names) else None


def read_gnd_mat(path: Path) -> dict:
    """``gnd_instre.mat`` as ``{"imlist": [...], "qimlist": [...], "gnd": [(ok, bbx, junk), ...]}`` (1-based ok)."""
    path = _existing(Path(path), "ground-truth file (gnd_instre.mat of Iscen et al.)")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ConfigError(f'{path}: reading a .mat ground-truth file needs scipy: pip install "patchify[benchmarks]"') \
            from None
    try:
        content = loadmat(str(path))
        imlist, qimlist = _mat_strings(content["imlist"]), _mat_strings(content["qimlist"])
        entries = np.asarray(content["gnd"]).ravel()
        gnd = [(_gnd_field(e, "ok", 0), _gnd_field(e, "bbx", 1), _gnd_field(e, "junk", 99)) for e in entries]
    except Exception as err:  # scipy raises many types for foreign or broken content
        raise DataError(f"{path}: not an INSTRE ground-truth .mat ({type(err).__name__}: {err})") from None
    if len(gnd) != len(qimlist):
        raise DataError(f"{path}: {len(gnd)} gnd entries for {len(qimlist)} queries")
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _subset(image_id: str) -> str:
    return image_id.split("/", 1)[0].lower()


def instre_positive_boxes(query_id: str, image_id: str, boxes: tuple) -> tuple:
    """The boxes of the query's object in a positive: an INSTRE-M image holds two objects (line 1: class ``a``,
    line 2: class ``b``, by INSTRE's README); an INSTRE-S1 query's object is the line of its class letter
    (``01a_...``), an INSTRE-M query (its box holds both objects) the box enclosing both."""
    if _subset(image_id) != INSTRE_M or len(boxes) != 2:
        return boxes
    if _subset(query_id) == INSTRE_M:
        b = np.asarray(boxes, dtype=np.float64)
        x0, y0 = b[:, 0].min(), b[:, 1].min()
        return ((x0, y0, (b[:, 0] + b[:, 2]).max() - x0, (b[:, 1] + b[:, 3]).max() - y0),)
    parts = query_id.split("/")
    letter = parts[1][2:3].lower() if _subset(query_id) == INSTRE_S1 and len(parts) > 1 else ""
    return (boxes[0],) if letter == "a" else (boxes[1],) if letter == "b" else boxes


def read_instre(root: Path, gnd_file: str = "gnd_instre.mat", name: str | None = None) -> Dataset:
    """INSTRE from ``<root>/<gnd_file>`` (paths in it are relative to ``root``), with the database's box files
    (``<image>.txt``) where the release has them."""
    root = Path(root)
    gnd_path = root / gnd_file
    content = read_gnd_mat(gnd_path)

    def path_of(image_id: str) -> Path:
        return _existing(root / image_id, f"image listed in {gnd_path.name}")

    _check_unique(content["imlist"], gnd_path, "imlist")
    _check_unique(content["qimlist"], gnd_path, "qimlist")
    dataset = Dataset(name=name or root.name, root=root, protocol="instre")
    for image_id in content["imlist"]:
        path = path_of(image_id)
        record = _gallery_record(path, image_id)
        box_file = path.with_suffix(".txt")
        if box_file.is_file():
            record = ImageRecord(id=record.id, path=path, boxes=read_box_file(box_file, record.width, record.height),
                                 width=record.width, height=record.height)
        dataset.gallery.append(record)
    boxes_of = {r.id: r.boxes for r in dataset.gallery if r.boxes}
    if not boxes_of:
        dataset.no_boxes = "no INSTRE box file (<image>.txt) beside the database images"
    for number, (query_id, (ok, bbx, junk)) in enumerate(zip(content["qimlist"], content["gnd"])):
        query = _query_record(path_of(query_id), query_id, bbx, gnd_path, number)
        dataset.queries.append(query)
        positives = _ids_of(ok, dataset.gallery, gnd_path, number, "ok", base=1)
        dataset.truth[query.id] = QueryTruth(
            easy=positives, junk=_ids_of(junk, dataset.gallery, gnd_path, number, "junk", base=1),
            boxes={i: instre_positive_boxes(query_id, i, boxes_of[i]) for i in positives if i in boxes_of})
    if not dataset.queries:
        raise DataError(f"{gnd_path}: no queries (qimlist is empty)")
    return dataset


# ----------------------------------------------------------------------------- a run's benchmark

def read_benchmark(cfg: DictConfig) -> Dataset:
    """The benchmark that ``cfg`` (the ``dataset`` group) names by its ``kind``."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (dataset={cfg.name} expects {cfg.gnd_file} in it)")
    if cfg.kind == "revisited":
        return read_revisited(root, str(cfg.gnd_file), str(cfg.get("image_dir") or "jpg"), cfg.get("distractors"),
                              name=str(cfg.name))
    return read_instre(root, str(cfg.gnd_file), name=str(cfg.name))
