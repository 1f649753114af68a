"""Patchify: training-free instance-level image retrieval with a spatial pyramid of patches.

    import patchify
    encoder = patchify.load_encoder("dinov2_s_packaged")           # a frozen timm encoder
    index = patchify.PatchIndex.from_images("photos/", encoder)    # L3 pyramid patches, exact search
    hits = index.search("mug.jpg", k=5)                            # ids, scores, boxes (best patch)
    patchify.evaluate("results.jsonl", "ilias/mini")               # mAP@k and LocScore of any method

docs/API.md documents the API; the ``patchify`` command runs the pipeline (README.md). Names are
imported on first use, so ``import patchify`` stays light.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("patchify")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_API = ("Encoder", "Hits", "PatchIndex", "evaluate", "load_encoder", "read_ground_truth", "read_results")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
