"""adala: turn pretrained softmax ViTs into linear-attention ViTs (ViT-AdaLA, arXiv 2603.16063).

Public API only; submodules load lazily so ``import adala`` (and the CLI's --help) stays fast.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
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
    "evaluate": "evaluation",
    "bench": "benchmark",
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


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Registers adala's attention names (``adala-linear-elu``...) with transformers as soon as
    ``transformers.modeling_utils`` has been imported, so ``import adala`` is enough for
    ``AutoModel.from_pretrained(..., attn_implementation="adala-linear-elu")``. transformers is optional and takes
    seconds to import, so adala never imports it here; this finder only watches for it."""

    NAME = "transformers.modeling_utils"

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.NAME:
            return None
        sys.meta_path.remove(self)  # once; the real finders locate the module
        spec = next((s for f in sys.meta_path if (s := f.find_spec(fullname, path, target)) is not None), None)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                run(module)
                _register(module)

            spec.loader.exec_module = exec_module
        return spec


def _register(modeling_utils: Any) -> None:
    try:
        # lazy: keeps import adala fast
        from .models.hf_attention import register

        register(modeling_utils)
    except Exception as e:  # noqa: BLE001 - never break the user's transformers import
        # lazy: keeps import adala fast
        import warnings

        warnings.warn(f"adala could not register its attention with transformers: {e}", stacklevel=2)


if _RegisterWithTransformers.NAME in sys.modules:
    _register(sys.modules[_RegisterWithTransformers.NAME])
elif not any(isinstance(f, _RegisterWithTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
