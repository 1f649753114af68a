"""Patchify's Python API (docs/API.md): the command line's stages behind three doors.

- :func:`load_encoder`: a frozen timm encoder that describes images and their pyramid patches;
- :class:`PatchIndex`: patches in a FAISS index, searched by image or vector, saved and loaded;
- :func:`evaluate`: mAP@k and LocScore of any method's ranked results (also ``patchify evaluate``).

Names are imported on first use, so ``patchify evaluate`` does not load torch or FAISS.
"""

from __future__ import annotations

import importlib

EXPORTS = {"Encoder": "encoder", "load_encoder": "encoder", "Hits": "patch_index", "PatchIndex": "patch_index",
           "evaluate": "evaluation", "read_ground_truth": "evaluation", "read_results": "evaluation"}
__all__ = sorted(EXPORTS)


def __getattr__(name: str):
    if name in EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *EXPORTS])
