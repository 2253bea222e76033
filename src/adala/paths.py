"""Where adala keeps converted teachers: ``$ADALA_CACHE`` or the platform's user cache directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import CacheError


def cache_dir() -> Path:
    """The cache directory, created if needed; a clear error if it cannot be written."""
    env = os.environ.get("ADALA_CACHE")
    if env:
        root = Path(env).expanduser()
    elif sys.platform == "darwin":
        root = Path.home() / "Library" / "Caches" / "adala"
    elif os.name == "nt":
        root = Path(os.environ.get("LOCALAPPDATA", Path.home())) / "adala" / "Cache"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adala"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cannot create cache directory {root}: {e.strerror}; set ADALA_CACHE") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise CacheError(f"cache directory {root} is not writable; set ADALA_CACHE to a writable directory")
    return root
