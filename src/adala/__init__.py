"""adala: turn pretrained softmax ViTs into linear-attention ViTs (ViT-AdaLA, arXiv 2603.16063)."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import AdalaError  # noqa: E402
from .models import linearize, load_model, load_teacher, save_model  # noqa: E402

__all__ = ["AdalaError", "__version__", "linearize", "load_model", "load_teacher", "save_model"]
