"""adala: turn pretrained softmax ViTs into linear-attention ViTs (ViT-AdaLA, arXiv 2603.16063).

Public API only; submodules load lazily so ``import adala`` (and the CLI's --help) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "AdalaError": "errors",
    "load_teacher": "models",
    "linearize": "models",
    "save_model": "models",
    "load_model": "models",
    "align_attention": "stages",
    "align_features": "stages",
    "finetune": "stages",
    "evaluate": "stages",
    "bench": "bench",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adala' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
