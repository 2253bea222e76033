"""Process-wide CPU settings that ``adala`` commands and ``adala.bench`` apply for speed.

ViT activations at high resolution are tens of MB each. By default glibc serves every allocation that
large from a fresh ``mmap`` and unmaps it on ``free``, so each forward pass pays page faults and
zeroing again for every big tensor: at 1344² that was ~16 % of the linear student's latency on a 2-core
CPU (half the CPU time of a 112² training step was kernel time). Keeping freed memory in the heap is
the same fix as PyTorch's CPU tuning guide gives with jemalloc/tcmalloc, without a preload.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import warnings

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_STATE = {"applied": None}


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed large blocks instead of returning them to the OS.

    Idempotent; returns whether the setting is in effect. Off (False) where malloc is not glibc's and
    when the environment sets ``ADALA_MALLOC=system``. Costs resident memory: peak usage is not
    returned to the OS until the process ends, which suits a command or a benchmark, not a server
    sharing its host, so the library itself never calls this behind a user's back.
    """
    if _STATE["applied"] is not None:
        return _STATE["applied"]
    ok = False
    if os.environ.get("ADALA_MALLOC", "").lower() != "system":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            ok = bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    _STATE["applied"] = ok
    return ok


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` is in effect in this process."""
    return bool(_STATE["applied"])


def keeps_freed_memory() -> bool:
    """Deprecated name of :func:`freed_memory_kept` (one letter from the setter's name)."""
    warnings.warn("adala.runtime.keeps_freed_memory is deprecated; use freed_memory_kept",
                  DeprecationWarning, stacklevel=2)
    return freed_memory_kept()


def allocator() -> str:
    """How large CPU allocations are served in this process (recorded in benchmark JSON)."""
    return "glibc, freed memory kept (adala.runtime.keep_freed_memory)" if _STATE["applied"] else "system default"
