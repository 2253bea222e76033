"""The value checks every layer shares (API arguments, recipe keys, CLI flags): one wording per mistake.

A leaf: it imports nothing from adala but the error types, so the attention kinds, the stages, the recipes
and the CLI all ask the same function "is this a positive integer / a multiple of the patch size?".
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from .errors import ConfigError


def check_positive(value: Any, key: str, kind: type = int, allow_none: bool = False) -> Any:
    """``value`` when it is a positive integer (``kind=int``) or a positive finite number (``kind=float``);
    booleans are refused (``True`` is not a batch size). ``allow_none`` lets ``None`` through unchanged."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is int else (
        isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok or not value > 0 or (kind is float and not math.isfinite(value)):
        raise ConfigError(f"{key} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return value


def check_multiple(value: Any, multiple: int, key: str = "img_size", what: str = "the patch size") -> int:
    """``value`` when it is a positive integer multiple of ``multiple``; the error names the nearest ones."""
    check_positive(value, key)
    if value % multiple:
        lo, hi = (value // multiple) * multiple, (value // multiple + 1) * multiple
        near = f"{lo} or {hi}" if lo else str(hi)
        raise ConfigError(f"{key}={value} is not a multiple of {what} {multiple} (try {near})")
    return value


def renamed(old: str, old_value: Any, new: str, new_value: Any) -> Any:
    """``new_value``, or ``old_value`` with a DeprecationWarning when a caller still passes the keyword ``old``
    (kept for one release after a rename to ``new``)."""
    if old_value is None:
        return new_value
    warnings.warn(f"{old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=3)
    return old_value
