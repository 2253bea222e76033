"""Data sources behind one spec string: ``build_dataset("photos" | "fashion-mnist[:split]" | ...)``.

Everything works offline: bundled photos, Debian's Fashion-MNIST, local folders and WebDataset shards.
"""

from .base import TASKS, SeededDataset
from .build import SPEC_FORMS, build_dataset, describe, parse_spec
from .images import MAX_PIXELS
from .photos import load_photo, photo_names

__all__ = [
    "MAX_PIXELS",
    "SPEC_FORMS",
    "TASKS",
    "SeededDataset",
    "build_dataset",
    "describe",
    "load_photo",
    "parse_spec",
    "photo_names",
]
