"""``patchify.load_encoder``: a frozen timm encoder that describes images and their pyramid patches.

The encoder is the command line's own feature path: its config is composed from the package's
configs (``configs/model/<name>.yaml`` plus the other groups' defaults), the model is loaded by
:func:`patchify.features.make_feature_source`, and images are described by its
:class:`~patchify.features.FeatureSource` (extraction.py's crops, batching and content-keyed caches).
For the same settings the vectors are the CLI's, to the bit; only where they are cached differs
(``cache=None``: a temporary folder that lives as long as the encoder).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from loguru import logger
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ..data import DataError, ImageRecord
from ..extraction import PatchFeatures
from ..features import FeatureSource, make_feature_source, patch_mode
from ..pyramid import levels_for
from ..settings import ConfigError, expand_paths, validate

ImageLike = Union[str, Path, Image.Image]


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The package's ``config.yaml`` composed with Hydra ``overrides``, as the ``patchify`` command composes it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app (e.g. patchify's own): its config search path
            return compose(config_name="config", overrides=list(overrides))
        with initialize_config_module(config_module="patchify.configs", version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except HydraException as err:
        raise ConfigError(f"config overrides {list(overrides)}: {str(err).splitlines()[0]}") from None


def _model_overrides(name_or_cfg: Any) -> tuple[list[str], DictConfig | None]:
    """(Hydra overrides, a model or whole config to merge) for ``load_encoder``'s first argument."""
    if isinstance(name_or_cfg, (DictConfig, Mapping)):
        return [], OmegaConf.create(dict(name_or_cfg) if not isinstance(name_or_cfg, DictConfig) else name_or_cfg)
    text = str(name_or_cfg)
    if text.endswith((".yaml", ".yml")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: model config file not found")
        return [], OmegaConf.load(path)
    known = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs" / "model").glob("*.yaml"))
    if text not in known:
        raise ConfigError(f"model={text}: no such model config (choose from {', '.join(known)}, or give a .yaml file)")
    return [f"model={text}"], None


class Encoder:
    """Describes images (paths or PIL images) as global descriptors and as pyramid patches.

    Made by :func:`load_encoder`. ``config`` is the whole composed config (``config.model``,
    ``config.pyramid``, ``config.extract``); ``dim`` the descriptor width. Descriptors are
    float32, L2-normalised; boxes ``(x, y, w, h)`` in the original image's pixels.
    """

    def __init__(self, config: DictConfig, source: FeatureSource, workdir: tempfile.TemporaryDirectory | None):
        self.config, self.source, self._workdir = config, source, workdir

    @property
    def dim(self) -> int:
        return self.source.model.dim

    @property
    def name(self) -> str:
        return str(self.config.model.name)

    @property
    def fingerprint(self) -> dict:
        """What the gallery patches' vectors depend on: model fingerprint and patch mode."""
        return {"model": self.source.model.fingerprint, "mode": patch_mode(self.config.pyramid)}

    @property
    def levels(self) -> list[int]:
        """The pyramid levels indexed by default (``pyramid.level`` and ``pyramid.multi_scale``)."""
        return levels_for(int(self.config.pyramid.level), str(self.config.pyramid.multi_scale))

    def __repr__(self) -> str:
        model = self.config.model
        return (f"Encoder({self.name}: {model.timm_name}, layer {model.layer}, pool {model.pool}, dim {self.dim}, "
                f"mode {self.config.pyramid.mode}, {self.source.model.precision} on {self.source.model.device})")

    def records(self, images: Sequence[ImageLike], folder: Path) -> list[ImageRecord]:
        """Image records of ``images``; PIL images are written losslessly (PNG) into ``folder`` first."""
        records = []
        for number, image in enumerate(images):
            if isinstance(image, Image.Image):
                path = folder / f"image{number:06d}.png"
                image.save(path)
                records.append(ImageRecord(id=f"<PIL image {number}>", path=path))
            elif isinstance(image, (str, Path)):
                path = Path(image).expanduser()
                if not path.is_file():
                    raise DataError(f"{path}: image file not found")
                records.append(ImageRecord(id=str(image), path=path))
            else:
                raise TypeError(f"expected image paths or PIL images, got {type(image).__name__}")
        return records

    def describe(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Global descriptors (n, dim) of whole images (as queries are described); one image gives (1, dim).

        An unreadable image is a DataError naming it."""
        single = isinstance(images, (str, Path, Image.Image))
        with tempfile.TemporaryDirectory(prefix="patchify-images-") as folder:
            records = self.records([images] if single else list(images), Path(folder))
            if not records:
                return np.zeros((0, self.dim), np.float32)
            features = self.source.queries(records)
            self._save_memo()
        if len(np.unique(features.image)) != len(records):
            readable = set(features.image.tolist())
            failed = [r for i, r in enumerate(records) if i not in readable]
            raise DataError(self._failure(failed[0]))
        return features.vectors[np.argsort(features.image, kind="stable")]

    def patches(self, images: ImageLike | Sequence[ImageLike], level: int | None = None,
                multi_scale: str | None = None) -> PatchFeatures:
        """Pyramid patches of ``images``: ``vectors`` (n, dim), ``image`` (n,) index into ``images``,
        ``boxes`` (n, 4) and ``level`` (n,), levels in order and cells row-major per image.

        ``level`` / ``multi_scale`` default to the encoder's ``pyramid.level`` / ``pyramid.multi_scale``
        (``pyramid``: levels 0..level; ``single``: that level only). An unreadable image has no rows
        (a warning names it)."""
        single = isinstance(images, (str, Path, Image.Image))
        levels = levels_for(int(self.config.pyramid.level if level is None else level),
                            str(multi_scale or self.config.pyramid.multi_scale))
        with tempfile.TemporaryDirectory(prefix="patchify-images-") as folder:
            records = self.records([images] if single else list(images), Path(folder))
            if not records:
                return PatchFeatures(np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64),
                                     np.zeros((0, 4), np.float32), np.zeros(0, np.int8))
            patches = self.source.features(records, levels, desc="images")
            self._save_memo()
        readable = set(patches.image.tolist())
        for i, record in enumerate(records):
            if i not in readable:
                logger.warning(f"skipped {self._failure(record)}")
        return patches

    def _failure(self, record: ImageRecord) -> str:
        """The read error of ``record`` as the extraction recorded it (one line naming the file)."""
        errors = [*self.source.cached_failures, *(e for s in self.source.stats for e in s.failed)]
        found = next((e for e in errors if e.startswith(f"{record.path}:")), None)
        return found or f"{record.path}: unreadable image"

    def _save_memo(self) -> None:
        self.source.keys.memo.save()


def load_encoder(name_or_cfg: str | Mapping | DictConfig = "dinov2_s_packaged", layer: int | None = None,
                 precision: str = "fp32", device: str = "cpu", *, mode: str = "crop", level: int = 3,
                 multi_scale: str = "pyramid", cache: str | Path | None = None, batch_size: int | None = None,
                 num_workers: int = 0, config: Sequence[str] = (), **overrides: Any) -> Encoder:
    """An :class:`Encoder` for a model config of the package (``configs/model/<name>.yaml``), a model
    config file (``.yaml``) or mapping, or a whole composed config (what :meth:`PatchIndex.save` keeps).

    - ``layer``: block whose output describes an image (``model.layer``; -1 the final features);
      None keeps the config's.
    - ``precision`` (``fp32`` | ``bf16`` | ``fp16`` on CUDA | ``auto``) and ``device`` (``cpu`` |
      ``cuda`` | ``auto``): ``extract.precision`` / ``extract.device``.
    - ``mode`` (``crop`` | ``pool``), ``level``, ``multi_scale``: the ``pyramid`` group.
    - ``cache``: folder of the content-keyed feature caches (``paths.features``; the CLI's
      ``features/`` shares them); None: a temporary folder removed with the encoder.
    - ``batch_size``, ``num_workers``: ``extract.batch_size`` (None: the config's),
      ``extract.num_workers`` (0: decode in this process).
    - ``config``: more Hydra overrides, as on the command line (``["pyramid.pool_split_block=4"]``).
    - ``**overrides``: keys of the model group (``image_size=448``, ``pool="gem"``, ``checkpoint=...``).

    Every setting is checked as the command line checks it (one-line ConfigError / ModelConfigError).
    """
    hydra_overrides, given = _model_overrides(name_or_cfg)
    whole = given is not None and "model" in given and "pyramid" in given
    cfg = OmegaConf.create(given) if whole else compose_config(
        [*hydra_overrides, f"pyramid.mode={mode}", f"pyramid.level={level}", f"pyramid.multi_scale={multi_scale}",
         *config])
    if given is not None and not whole:
        cfg.model = given
    settings: dict[str, Any] = dict(overrides)
    if layer is not None:
        settings["layer"] = int(layer)
    unknown = [key for key in settings if key not in cfg.model]
    if unknown:
        raise ConfigError(f"model.{unknown[0]}={settings[unknown[0]]}: unknown model setting "
                          f"(known: {', '.join(sorted(cfg.model))})")
    cfg.model = OmegaConf.merge(cfg.model, settings)
    workdir = tempfile.TemporaryDirectory(prefix="patchify-features-") if cache is None else None
    cfg.extract.precision, cfg.extract.device, cfg.extract.num_workers = precision, device, int(num_workers)
    if batch_size is not None:
        cfg.extract.batch_size = int(batch_size)
    cfg.paths.features = str(Path(workdir.name) if workdir else Path(cache).expanduser())
    validate(cfg)
    expand_paths(cfg)
    return Encoder(cfg, make_feature_source(cfg), workdir)
