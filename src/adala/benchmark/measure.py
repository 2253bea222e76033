"""Timing and peak-memory measurement for bench.

Timing: every case is warmed up, then repeats are *interleaved* across models (teacher, student,
teacher, ... with the order rotated each round), so a burst of load from other processes hits all
models alike; medians are reported. Memory: on CUDA ``torch.cuda.max_memory_allocated`` in-process;
on CPU the growth of peak RSS over one forward in a fresh subprocess (``memchild``), because an
in-process allocator keeps freed pages and a peak can only be reset once per process reliably.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated growth over one forward (in-process)",
    "cpu": "peak RSS growth (VmHWM - VmRSS before) over one forward in a fresh subprocess per case",
}


def check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"bench supports cpu and cuda devices, got {device!r}")
    return dev


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@contextlib.contextmanager
def precision(device: torch.device, dtype: str) -> Iterator[None]:
    """fp32 runs as is; bf16/fp16 under autocast (fp32 weights), how these models are served."""
    if dtype == "fp32":
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=DTYPES[dtype]):
            yield


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def check_sdpa_backend(name: str | None) -> str | None:
    if name is not None and name not in SDPA_BACKENDS:
        raise ConfigError(f"sdpa backend must be one of {', '.join(SDPA_BACKENDS)}, got {name!r}")
    return name


def sdpa_backend(name: str | None) -> contextlib.AbstractContextManager:
    """Pin torch SDPA to one backend (the softmax teacher's kernel); None leaves torch's choice."""
    if check_sdpa_backend(name) is None:
        return contextlib.nullcontext()

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


def cuda_graphed(fn: Callable[[], Any], device: torch.device, warmup: int = 2) -> Callable[[], None]:
    """``fn`` captured once as a CUDA graph; the returned call replays it. At batch 1 a ViT forward
    is hundreds of small launches, so eager timings measure the CPU's launch rate as much as the
    kernels; a graph (how latency-bound serving runs) leaves the GPU time."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    synchronize(device)
    t0 = clock()
    fn()
    synchronize(device)
    return clock() - t0


def interleaved(
    fns: Sequence[Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter, min_seconds: float = 0.0,
) -> list[list[float]]:
    """Seconds per call for each fn, ``repeats`` rounds, order rotated every round. ``clock`` is
    wall time; ``time.process_time`` (with one thread) ignores time other processes took the core.

    ``min_seconds`` raises the number of rounds until every fn, the quickest included, is timed for
    about that long in all (estimated from its last warm-up call): a 0.1 s forward gets as many
    samples as the machine's drift needs, while a 20 s one keeps ``repeats`` (like ``timeit``'s autorange)."""
    last = [0.0 for _ in fns]
    for i, fn in enumerate(fns):
        for _ in range(warmup):
            last[i] = timed(fn, device, clock)
    if min_seconds > 0:
        if not warmup:  # one untimed-for-the-record call each, to size the run
            last = [timed(fn, device, clock) for fn in fns]
        repeats = max(repeats, math.ceil(min_seconds / max(min(last), 1e-9)))
    times: list[list[float]] = [[] for _ in fns]
    k = len(fns)
    for r in range(repeats):
        for j in range(k):
            i = (j + r) % k
            times[i].append(timed(fns[i], device, clock))
    return times


def summary(seconds: Sequence[float], batch_size: int) -> dict[str, Any]:
    med = statistics.median(seconds)
    q = statistics.quantiles(seconds, n=4) if len(seconds) >= 2 else [med, med, med]
    return {
        "latency_ms": med * 1e3,
        "latency_ms_min": min(seconds) * 1e3,
        "latency_ms_iqr": (q[2] - q[0]) * 1e3,
        "latency_ms_all": [s * 1e3 for s in seconds],
        "repeats": len(seconds),
        "images_per_s": batch_size / med,
    }


def cuda_peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes allocated above the starting point during one call."""
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def subprocess_peak_rss(recipe: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``adala.benchmark.memchild`` on ``recipe``; returns its JSON ({"peak_bytes", "method"} or
    {"error"}). A failure is reported, not raised: memory is one column of the table, not the run."""
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "adala.benchmark.memchild"], input=json.dumps(recipe), capture_output=True,
            text=True, timeout=timeout, env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"memory subprocess timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory subprocess failed (exit {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


def busy_jiffies() -> int | None:
    """Busy jiffies of all CPUs since boot (everything but idle and iowait) from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)


def process_jiffies(pid: int | str = "self", children: bool = False) -> int | None:
    """CPU jiffies (user + system) of process ``pid``, with its waited-for children's when ``children``;
    None when /proc has no such process (gone, or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11: 15 if children else 13])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_jiffies() -> tuple[int, int] | None:
    """(all CPUs' busy jiffies, this process's jiffies incl. children); None off Linux."""
    busy, mine = busy_jiffies(), process_jiffies(children=True)
    return None if busy is None or mine is None else (busy, mine)


class ExternalLoad:
    """Cores used by other processes between ``start()`` and ``stop()`` (None off Linux)."""

    def start(self) -> ExternalLoad:
        self.t0, self.j0 = time.monotonic(), _cpu_jiffies()
        return self

    def stop(self) -> float | None:
        j1, dt = _cpu_jiffies(), time.monotonic() - self.t0
        if self.j0 is None or j1 is None or dt <= 0:
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        return max(0.0, ((j1[0] - self.j0[0]) - (j1[1] - self.j0[1])) / hz / dt)


def external_load(window: float = 2.0) -> float | None:
    """CPU cores kept busy by *other* processes over ``window`` seconds (Linux), else None.

    Unlike the load average this excludes our own recent work and reacts within seconds."""
    probe = ExternalLoad().start()
    time.sleep(window)
    return probe.stop()


def wait_for_quiet(max_load: float, max_wait: float = 600.0, say: Callable[[str], None] | None = None
                   ) -> float | None:
    """Block until other processes use less than ``max_load`` cores (or ``max_wait`` s passed);
    returns the last reading. Timings on a shared machine are only comparable when it is quiet."""
    deadline = time.monotonic() + max_wait
    load = external_load()
    while load is not None and load >= max_load and time.monotonic() < deadline:
        if say:
            say(f"waiting for a quiet machine: other processes use {load:.2f} cores (want < {max_load})")
        time.sleep(8.0)
        load = external_load()
    return load


def proc_status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
