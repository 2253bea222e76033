"""Kernel linear attention with a fixed feature map: ``linear-elu`` (paper default), ``linear-relu``.

Inference (no autograd) straight from the packed qkv projection: on CUDA two Triton kernels
(``triton_kernels``, any dtype or autocast); on CPU (fp32/fp64, no autocast) a fused torch kernel
with the output projection folded into the attention state when nothing sits between them
(``fused_linear_attention_proj``). Everything else (training, CPU autocast, hooks on ``qkv``, q/k
norms, ``kernel="torch"``) goes through ``mix`` and the shared plumbing. Results agree to float rounding.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..tracing import is_tracing
from .base import KernelAttention
from .kernels import (
    DEFAULT_EPS,
    FEATURE_MAPS,
    fused_linear_attention,
    fused_linear_attention_proj,
    linear_attention,
    packed_projection,
)
from .registry import register

_FUSED_DTYPES = (torch.float32, torch.float64)
KERNELS = ("auto", "torch")
# CPU tests run the Triton kernels in triton's interpreter; otherwise CPU never imports triton
_TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


class LinearAttention(KernelAttention):
    feature_map_name = "elu"

    def __init__(self, attn: nn.Module, eps: float = DEFAULT_EPS, kernel: str = "auto", **options: Any) -> None:
        """``kernel``: "auto" takes the fastest exact path for the call (Triton on CUDA inference, the
        fused torch kernel on CPU); "torch" always takes the generic ``mix`` path (the reference for
        benchmarks and debugging)."""
        if kernel not in KERNELS:
            from ..errors import ConfigError

            raise ConfigError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        super().__init__(attn, eps=eps, kernel=kernel, **options)
        self.eps = float(eps)
        self.kernel = kernel
        self.feature_map = FEATURE_MAPS[self.feature_map_name]

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return linear_attention(self.feature_map(q), self.feature_map(k), v, self.eps)

    def _plain_inference(self, x: torch.Tensor) -> bool:
        """No autograd, no tracer, no hooks on ``qkv`` and the plain mix (no q/k norm, no subclass mix):
        what every fused path needs, since it reads (CPU: overwrites) the packed projection directly."""
        records_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.qkv.parameters())
        )
        return (
            self.kernel == "auto"
            and not records_grad
            and not is_tracing()  # tracers get the plain functional path (no out=, no workspace)
            and isinstance(self.q_norm, nn.Identity)
            and isinstance(self.k_norm, nn.Identity)
            and type(self).mix is LinearAttention.mix
            and isinstance(self.qkv, nn.Linear)
            and not (self.qkv._forward_hooks or self.qkv._forward_pre_hooks)
        )

    def can_fuse(self, x: torch.Tensor) -> bool:
        """The torch fused path (CPU, or CUDA without triton) overwrites the qkv projection in place:
        fp32/fp64 and no autocast."""
        return (
            x.dtype in _FUSED_DTYPES
            and not torch.is_autocast_enabled(x.device.type)
            and self._plain_inference(x)
        )

    def can_fold_proj(self) -> bool:
        """The output projection folds into the attention state only when nothing non-linear sits
        between them (no norm, no gate) and nobody watches ``proj``'s own input (hooks). It pays
        per image 2·H·D²·C FLOPs to save 2·N·H·D² and a pass, so ``forward`` folds from N ≥ C on."""
        return (
            isinstance(self.norm, nn.Identity)
            and self.gate is None
            and isinstance(self.proj, nn.Linear)
            and not (self.proj._forward_hooks or self.proj._forward_pre_hooks)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        if attn_mask is None and self._takes_triton(x):
            return self._triton_forward(x)
        if attn_mask is not None or not self.can_fuse(x):
            return super().forward(x, attn_mask=attn_mask, **kw)
        qkv = packed_projection(x, self.qkv)  # CPU: a reused workspace, consumed in place right here
        if self.can_fold_proj() and x.shape[1] >= self.proj.out_features:  # fewer FLOPs only from N ≥ C on
            out = fused_linear_attention_proj(qkv, self.num_heads, self.head_dim, self.proj.weight, self.proj.bias,
                                              self.feature_map_name, self.eps)
            return self.proj_drop(out)
        out = fused_linear_attention(qkv, self.num_heads, self.head_dim, self.feature_map_name, self.eps)
        out = self.norm(out)
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))

    def _takes_triton(self, x: torch.Tensor) -> bool:
        """CUDA inference, where triton is installed and knows the head size (else the torch path)."""
        if (x.device.type == "cpu" and not _TRITON_ON_CPU) or not self._plain_inference(x):
            return False
        from . import triton_kernels

        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        return triton_kernels.supports(x.device, dtype, self.head_dim, self.feature_map_name)

    def _triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference through the Triton kernels; autocast decides the projections' dtype."""
        from . import triton_kernels

        qkv = self.qkv(x)
        out = triton_kernels.linear_attention_triton(qkv, self.num_heads, self.head_dim, self.feature_map_name,
                                                     self.eps)
        out = self.norm(out)
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))


@register("linear-elu")
class LinearEluAttention(LinearAttention):
    kind = "linear-elu"
    feature_map_name = "elu"


@register("linear-relu")
class LinearReluAttention(LinearAttention):
    kind = "linear-relu"
    feature_map_name = "relu"
