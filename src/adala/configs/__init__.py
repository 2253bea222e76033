"""Recipes shipped inside the package, addressable by name: ``adala run demo`` = this folder's ``demo.yaml``.

They live in the package (not in a ``configs/`` folder of the checkout) so that a plain, non-editable
``pip install`` can run them from any directory. A recipe argument is a path when such a file exists,
else a packaged name (with or without ``.yaml``); ``adala recipes`` lists the names.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent


def packaged() -> dict[str, Path]:
    """name -> file of every recipe shipped with adala, sorted by name."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def describe(path: Path) -> str:
    """A recipe's first comment line: what it is for, as its author wrote it."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") and text.lstrip("#").strip():
            return text.lstrip("#").strip()
    return ""


def resolve(spec: str | os.PathLike) -> Path:
    """The recipe file for ``spec``: an existing path first, then a packaged name; a one-line error otherwise."""
    p = Path(spec)
    if p.is_file():
        return p
    name = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    if str(p) in (name, p.name) and name in packaged():  # a bare name, not a missing path
        return packaged()[name]
    if p.parent.name == "configs" and p.parent.parent == Path() and name in packaged():
        return packaged()[name]  # the checkout layout of earlier releases: configs/NAME.yaml
    raise ConfigError(f"recipe {spec} not found: no such file and no packaged recipe of that name "
                      f"(packaged: {', '.join(packaged())})")
