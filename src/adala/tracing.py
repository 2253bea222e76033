"""One answer to "is this forward being recorded into a graph?" for every fast path that must step aside.

The speed paths (``attention.ops``' no-grad products, the fused CPU/Triton kernels, the cached
position embedding) write results through ``out=`` into views of ``new_empty`` buffers, reuse a
per-thread workspace or return tensors computed outside the forward. A tracer records data flow
through tensor *values*: the legacy ONNX exporter drops ``out=`` writes into a view of a fresh
buffer, so the buffer becomes a graph constant and the exported attention ignored its input (a
linear student exported to onnxruntime was off by ~10 while running without complaint). Under any
tracer, exporter or compiler those paths take the plain functional formulation instead.
"""

from __future__ import annotations

import torch


def is_tracing() -> bool:
    """True under ``torch.jit.trace``/``script``, ``torch.onnx.export`` and ``torch.compile``/``torch.export``."""
    return bool(
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or _is_exporting()
    )


def _is_exporting() -> bool:
    fn = getattr(torch.compiler, "is_exporting", None)
    return bool(fn()) if fn is not None else False
