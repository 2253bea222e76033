"""Kernel linear attention with a fixed feature map: ``linear-elu`` (paper default), ``linear-relu``.

Inference (no autograd) straight from the packed qkv projection: on CUDA two Triton kernels
(``triton_kernels``, any dtype or autocast); on CPU (fp32/fp64, no autocast) a fused torch kernel
with the output projection folded into the attention state when nothing sits between them
(``fused_linear_attention_proj``). Training (autograd) of the plain kind runs from the packed projection
too, through ``recompute.packed_linear_attention_recompute``: autograd keeps only the projection and the
output the ``proj`` layer needs anyway, which keeps a student's training step within its softmax teacher's
memory. Everything else (CPU autocast inference, hooks on ``qkv`` at inference, q/k norms, ``temperature``,
``kernel="torch"``) goes through ``mix`` and the shared plumbing; ``mix`` with autograd uses
``recompute.linear_attention_recompute`` (same savings but for the reshape copies around it). Results agree
to float rounding.

Two options work against *attention dilution* — at thousands of tokens φ(q)·φ(k) is far flatter than softmax,
so every output drifts towards the mean value — and both start as exact identities of the plain kind:

* ``temperature=True``: a learnable per-head scale on q and on k *before* φ (``exp(log_tau)``, init 0). ELU+1 is
  not scale-invariant, so a larger scale makes φ(q)·φ(k) peakier, as softmax's 1/√d scale does. (For ReLU the
  scale cancels in the normaliser; the option is accepted but does nothing useful there.)
* ``dwc=K``: a depthwise K×K convolution over V on the patch grid, added to the patch tokens' output
  (FLatten's and EfficientViT's rank restoration: linear attention's output has rank ≤ d; a local conv restores
  the fine local detail softmax's peaked attention gives). Zero-initialised; prefix tokens get none.
  Costs K²·C FLOPs per token, under 1 % of a block at K=3. ``dwc_grid=G`` spreads its taps round(side / G)
  patches apart on grids wider than G (``grid.conv_dilation``; weight-free, the same cost).

A third, ``out_gate=R``, multiplies the output by a rank-R gate of the block input, exactly 1 at init
(``adala.attention.gate``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..tracing import is_tracing
from .base import KernelAttention
from .gate import OutputGate, check_rank
from .grid import conv_dilation, grid_conv, local_conv, patch_grid
from .ops import (
    DEFAULT_EPS,
    FEATURE_MAPS,
    fused_linear_attention,
    fused_linear_attention_proj,
    linear_attention,
    packed_projection,
)
from .recompute import linear_attention_recompute, packed_linear_attention_recompute
from .registry import register

_FUSED_DTYPES = (torch.float32, torch.float64)
KERNELS = ("auto", "torch")
# CPU tests run the Triton kernels in triton's interpreter; otherwise CPU never imports triton
_TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


class LinearAttention(KernelAttention):
    feature_map_name = "elu"

    def __init__(self, attn: nn.Module, eps: float = DEFAULT_EPS, kernel: str = "auto", temperature: bool = False,
                 dwc: int = 0, out_gate: int = 0, dwc_grid: int = 0, **options: Any) -> None:
        """``kernel``: "auto" takes the fastest exact path for the call (Triton on CUDA inference, the
        fused torch kernel on CPU); "torch" always takes the generic ``mix`` path (the reference for
        benchmarks and debugging). ``temperature`` / ``dwc`` / ``dwc_grid`` / ``out_gate``: see the module
        docstring."""

        if kernel not in KERNELS:
            raise ConfigError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if not isinstance(temperature, bool):
            raise ConfigError(f"temperature must be true or false, got {temperature!r}")
        check_rank(out_gate)
        extra = {k: v for k, v in (("temperature", temperature), ("dwc", dwc), ("dwc_grid", dwc_grid),
                                   ("out_gate", out_gate)) if v}
        super().__init__(attn, eps=eps, kernel=kernel, **extra, **options)
        self.eps = float(eps)
        self.kernel = kernel
        self.feature_map = FEATURE_MAPS[self.feature_map_name]
        # (2, H, 1): log-scales of q and k per head, broadcast over tokens and channels
        self.log_tau = nn.Parameter(torch.zeros(2, self.num_heads, 1)) if temperature else None
        self.dwc, self.dwc_grid = local_conv(self.attn_dim, dwc, dwc_grid), dwc_grid
        if self.dwc is not None:
            self.uses_grid = True  # surgery's patch-grid tracker keeps self.grid fresh
            self.grid: tuple[int, int] | None = None
        if out_gate:
            self.out_gate = OutputGate(self.qkv.in_features, self.attn_dim, out_gate)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.log_tau is not None:
            tau = self.log_tau.exp().to(q.dtype).view(2, 1, self.num_heads, 1, 1)  # against (B, H, N, D)
            q, k = q * tau[0], k * tau[1]
        if torch.is_grad_enabled() and not is_tracing() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out = linear_attention_recompute(q, k, v, self.feature_map_name, self.eps)  # saves q, k, v only
        else:
            out = linear_attention(self.feature_map(q), self.feature_map(k), v, self.eps)
        if self.dwc is not None:
            b, h, n, d = v.shape
            conv = self.local_conv(v.transpose(1, 2).reshape(b, n, h * d)).view(b, -1, h, d).transpose(1, 2)
            prefix = n - conv.shape[2]
            out = torch.cat([out[:, :, :prefix], out[:, :, prefix:] + conv.to(out.dtype)], dim=2)
        return out

    def local_conv(self, v_tokens: torch.Tensor) -> torch.Tensor:
        """``dwc`` over the patch tokens of V given as (B, N, H·D) -> (B, N − prefix, H·D)."""
        b, n, c = v_tokens.shape
        prefix, h, w = patch_grid(self, n)
        grid = v_tokens[:, prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2)
        return grid_conv(self.dwc, grid, conv_dilation(h, w, self.dwc_grid)).flatten(2).transpose(1, 2)

    def _records_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _packed_training(self, x: torch.Tensor) -> bool:
        """Autograd from the packed projection: the plain mix (no q/k norm, no subclass mix, no temperature,
        whose scale would have to be applied out of place first) and ``kernel="auto"``."""
        return (
            self.kernel == "auto"
            and self.log_tau is None
            and self._records_grad(x)
            and not is_tracing()
            and isinstance(self.q_norm, nn.Identity)
            and isinstance(self.k_norm, nn.Identity)
            and type(self).mix is LinearAttention.mix
        )

    def _plain_inference(self, x: torch.Tensor) -> bool:
        """No autograd, no tracer, no hooks on ``qkv`` and the plain mix (no q/k norm, no subclass mix):
        what every fused path needs, since it reads (CPU: overwrites) the packed projection directly."""
        return (
            self.kernel == "auto"
            and not self._records_grad(x)
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
            and self.out_gate is None
            and self.dwc is None
            and isinstance(self.proj, nn.Linear)
            and not (self.proj._forward_hooks or self.proj._forward_pre_hooks)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        if attn_mask is None and self._packed_training(x):
            qkv = self.qkv(x)
            if self.can_fold_proj():  # the attention output is recomputed for proj's backward, not kept
                out = packed_linear_attention_recompute(qkv, self.num_heads, self.head_dim, self.feature_map_name,
                                                        self.eps, self.proj.weight, self.proj.bias)
                return self.proj_drop(out)
            out = packed_linear_attention_recompute(qkv, self.num_heads, self.head_dim, self.feature_map_name,
                                                    self.eps)
            return self._finish(out, qkv, x)
        if attn_mask is None and self._takes_triton(x):
            return self._triton_forward(x)
        if attn_mask is not None or not self.can_fuse(x):
            return super().forward(x, attn_mask=attn_mask, **kw)
        qkv = packed_projection(x, self.qkv)  # CPU: a reused workspace, consumed in place right here
        self._scale_qk_(qkv)
        if self.can_fold_proj() and x.shape[1] >= self.proj.out_features:  # fewer FLOPs only from N ≥ C on
            out = fused_linear_attention_proj(qkv, self.num_heads, self.head_dim, self.proj.weight, self.proj.bias,
                                              self.feature_map_name, self.eps)
            return self.proj_drop(out)
        out = fused_linear_attention(qkv, self.num_heads, self.head_dim, self.feature_map_name, self.eps)
        return self._finish(out, qkv, x)

    def _scale_qk_(self, qkv: torch.Tensor) -> None:
        """Apply ``temperature`` in place on the q|k thirds of a packed (B, N, 3·H·D) projection."""
        if self.log_tau is not None:
            b, n, _ = qkv.shape
            qk = qkv[..., : 2 * self.attn_dim].view(b, n, 2, self.num_heads, self.head_dim)
            qk.mul_(self.log_tau.detach().exp().to(qkv.dtype))

    def _finish(self, out: torch.Tensor, qkv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H·D) attention output of a fused path -> the module output: dwc, norm, gate, proj."""
        if self.dwc is not None:
            conv = self.local_conv(qkv[..., 2 * self.attn_dim:])
            prefix = out.shape[1] - conv.shape[1]
            out[:, prefix:] += conv.to(out.dtype)
        return self.proj_drop(self.proj(self.gated(self.norm(out), x)))

    def _takes_triton(self, x: torch.Tensor) -> bool:
        """CUDA inference, where triton is installed and knows the head size (else the torch path)."""
        if (x.device.type == "cpu" and not _TRITON_ON_CPU) or not self._plain_inference(x):
            return False
        # lazy: optional dependency: triton (CUDA only)
        from . import triton_kernels

        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        return triton_kernels.supports(x.device, dtype, self.head_dim, self.feature_map_name)

    def _triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference through the Triton kernels; autocast decides the projections' dtype."""
        # lazy: optional dependency: triton (CUDA only)
        from . import triton_kernels

        qkv = self.qkv(x)
        self._scale_qk_(qkv)
        out = triton_kernels.linear_attention_triton(qkv, self.num_heads, self.head_dim, self.feature_map_name,
                                                     self.eps)
        return self._finish(out, qkv, x)


@register("linear-elu")
class LinearEluAttention(LinearAttention):
    kind = "linear-elu"
    feature_map_name = "elu"


@register("linear-relu")
class LinearReluAttention(LinearAttention):
    kind = "linear-relu"
    feature_map_name = "relu"
