"""A whole timm ViT block with linear attention, streamed over token chunks for CPU inference.

Why a block and not just the attention: at high resolution every activation of a block is tens of
MB (at 1344², batch 1, the MLP's hidden layer alone is 57 MB), and glibc serves each allocation above
its mmap threshold (at most 32 MiB) from a fresh ``mmap`` that it unmaps again on ``free``: every
forward then pays page faults and zeroing for every large temporary. ``adala.runtime.keep_freed_memory``
hides that by changing process-wide allocator settings, which a library must not do behind its user's
back. Linear attention needs only a (H, D, D) state per image, so the block can run in two passes
over chunks of tokens instead, and no temporary is ever larger than one chunk:

1. per chunk: norm1 -> qkv -> φ(k), v accumulated into the state φkᵀv (H, D, D) and Σφk (H, D);
   φ(q) is kept (a reusable per-thread workspace, one image's (N, H·D) at most);
2. per chunk: φq·state / normaliser -> proj -> residual (layer scale) -> norm2 -> MLP -> residual,
   written straight into the block's output.

Temporaries of a few MB are reused by the heap on every call without any allocator setting. The linear kinds'
options stream too, so choosing one costs no more than its own FLOPs: ``temperature`` scales q|k in pass 1,
``dwc`` keeps V beside φ(q) and convolves, per chunk, only the patch-grid rows the chunk touches plus the
kernel's halo, and ``out_gate``'s down projection joins the qkv GEMM of pass 1 and is kept beside φ(q), the
rest of the gate done per chunk (the output projection then stays unfolded, as in
``LinearAttention.forward``). Only the plain inference case streams: CPU, fp32/fp64, no autocast, no autograd,
no tracer, no hooks on any module inside the block, no stochastic layers active, and an attention whose own
fused path would run (``LinearAttention.can_fuse``; no q/k norm, no norm before ``proj``, no teacher gate).
Everything else runs timm's own ``Block.forward``. The input is never modified in place
(``get_intermediate_layers`` keeps every block's output).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, GluMlp, LayerScale, Mlp, SwiGLU
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn.modules import module as _module

from ..attention.gate import OutputGate
from ..attention.grid import conv_dilation, patch_grid
from ..attention.linear import LinearAttention
from ..attention.ops import apply_feature_map_, workspace
from ..errors import ConfigError, UnsupportedModelError
from ..runtime import freed_memory_kept

# Rows (tokens, summed over the images of a group) per chunk. Measured on ViT-S/14, fp32, 2 threads, in
# plain processes (benchmarks/plain_process.py --chunk-sweep 512,1024,2048,2730 at 896² and 1344², load
# average ~5 on 2 cores; README "Benchmarks"): minor faults per forward 147k/406k unstreamed against
# 6-20k/10-12k at 1024-2048 rows, and on a busy machine fewer, larger chunks lose less to waiting for a
# descheduled OpenMP thread (one wait per torch call): 2048 rows was the quickest (7.7 s / 15.3 s against
# 9.3 s / 20.6 s at 1024). Its largest temporary, the MLP hidden layer (rows x 4·C), is 12 MB at C=384.
CHUNK_TOKENS = 2048
_PER_TOKEN_MLPS = (Mlp, GluMlp, SwiGLU)  # timm.layers.SwiGLUPacked is a GluMlp
_STATE = {"chunk_tokens": CHUNK_TOKENS}


def set_chunk_tokens(rows: int) -> int:
    """Set the rows per chunk of the streamed forward (benchmarks sweep it); returns the old value."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"chunk tokens must be a positive integer, got {rows!r}")
    old = _STATE["chunk_tokens"]
    _STATE["chunk_tokens"] = rows
    return old


def _inactive(m: nn.Module) -> bool:
    """A per-token module that does nothing at this call (identity, or dropout that is off)."""
    if isinstance(m, nn.Identity):
        return True
    if isinstance(m, nn.Dropout):
        return not m.training or m.p == 0
    if isinstance(m, DropPath):
        return not m.training or m.drop_prob == 0
    return False


def _no_hooks(block: nn.Module) -> bool:
    """No forward hooks anywhere inside the block (the streamed path calls no submodule's ``__call__``
    for norm1/attn/proj/ls, so a hook there would silently not fire) and none registered globally."""
    if getattr(_module, "_global_forward_hooks", None) or getattr(_module, "_global_forward_pre_hooks", None):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in block.modules() if m is not block)


def plain_block(block: nn.Module) -> bool:
    """The block-level half of the streaming conditions, shared by every streamed attention kind: LayerNorms,
    plain LayerScales, no active drop-path or dropout, a per-token MLP and no forward hooks anywhere inside."""
    for name in ("norm1", "norm2"):
        if not isinstance(getattr(block, name), (nn.LayerNorm, nn.Identity)):
            return False
    for name in ("ls1", "ls2"):
        ls = getattr(block, name)
        if not (isinstance(ls, nn.Identity) or (isinstance(ls, LayerScale) and not ls.inplace)):
            return False
    if not (_inactive(block.drop_path1) and _inactive(block.drop_path2)):
        return False
    if not isinstance(block.mlp, _PER_TOKEN_MLPS) or not all(
        _inactive(m) for m in block.mlp.modules() if isinstance(m, (nn.Dropout, DropPath))
    ):
        return False
    return _no_hooks(block)


def can_stream(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``streamed_forward(block, x)`` computes exactly what ``Block.forward(block, x)`` would."""
    attn = getattr(block, "attn", None)
    if not isinstance(attn, LinearAttention) or x.device.type != "cpu" or x.dim() != 3:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters())):
        return False
    if not (attn.can_fuse(x) and not attn._takes_triton(x)):
        return False
    if not (isinstance(attn.norm, nn.Identity) and attn.gate is None and isinstance(attn.proj, nn.Linear)
            and _inactive(attn.proj_drop) and _streamable_options(attn, x.shape[1])):
        return False
    return plain_block(block)


def _streamable_options(attn: LinearAttention, n: int) -> bool:
    """``out_gate`` is adala's own gate; ``dwc`` is adala's zero-padded depthwise conv and needs a patch grid for
    ``n`` tokens (without one timm's path raises the one-line error)."""
    if attn.out_gate is not None and type(attn.out_gate) is not OutputGate:
        return False
    return streamable_conv(attn, n)


def streamable_conv(attn: nn.Module, n: int) -> bool:
    """No ``dwc``, or adala's own zero-padded, same-size depthwise conv with a patch grid known for ``n`` tokens
    (what :func:`local_conv_rows` computes)."""
    conv = getattr(attn, "dwc", None)
    if conv is None:
        return True
    if not (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and conv.groups == attn.attn_dim
            and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.padding == (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)):
        return False
    try:
        patch_grid(attn, n)
    except UnsupportedModelError:
        return False
    return True


def local_conv_rows(conv: nn.Conv2d, grid: tuple[int, int, int], v_rows: torch.Tensor, s: int, e: int,
                    dilation: tuple[int, int] = (1, 1)) -> tuple[int, torch.Tensor] | None:
    """A ``dwc`` conv's addition to tokens [s, e) of one image, from the V rows (N, A) of all its tokens on the
    patch grid ``(prefix, h, w)``: the chunk row where its patch tokens start and their (rows, A) conv output;
    None for a chunk of prefix tokens.

    Only the grid rows the chunk touches, plus the kernel's halo, are convolved: zero rows stand in for the
    halo beyond the image edge, so every output equals the whole-grid conv with its zero padding. The padded
    grid is built channels-last, the layout V rows already have: one strided copy in, and oneDNN's depthwise
    conv writes (rows, A) token rows straight out (an NCHW pad and conv took 14× longer at 1344²).
    ``dilation`` (``attention.grid.conv_dilation``) spreads the taps; the halo grows with it."""
    prefix, gh, gw = grid
    a = v_rows.shape[1]
    p0, p1 = max(s - prefix, 0), e - prefix
    if p1 <= 0:
        return None
    r0, r1 = p0 // gw, (p1 - 1) // gw + 1  # grid rows holding patches p0..p1-1
    ph, pw = dilation[0] * (conv.kernel_size[0] // 2), dilation[1] * (conv.kernel_size[1] // 2)
    a0, a1 = max(r0 - ph, 0), min(r1 + ph, gh)  # rows of V the conv reads
    padded = torch.empty((1, a, r1 - r0 + 2 * ph, gw + 2 * pw), dtype=v_rows.dtype, device=v_rows.device,
                         memory_format=torch.channels_last).zero_()
    top = ph - (r0 - a0)
    padded[0, :, top: top + a1 - a0, pw: pw + gw].copy_(
        v_rows[prefix + a0 * gw: prefix + a1 * gw].view(a1 - a0, gw, a).permute(2, 0, 1))
    y = F.conv2d(padded, conv.weight, conv.bias, dilation=dilation, groups=a)[0]  # (A, r1 - r0, gw), channels-last
    first = p0 - r0 * gw
    return max(prefix - s, 0), y.flatten(1).t()[first: first + p1 - p0]


def _spans(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` near-equal [start, end) spans of range(n): no tiny last chunk."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _residual(x: torch.Tensor, y: torch.Tensor, ls: nn.Module, out: torch.Tensor) -> None:
    """out = x + ls(y) in one pass (``out`` may be ``x`` itself)."""
    if isinstance(ls, LayerScale):
        torch.addcmul(x, y, ls.gamma, out=out)
    else:
        torch.add(x, y, out=out)


class _Attention:
    """The linear attention's weights, prepared once per block call, and its per-chunk steps.

    Each step is one or two whole-chunk torch calls: on a shared 2-core machine every extra small call
    is another chance to wait for a descheduled OpenMP thread, so per-head loops are avoided (the
    normaliser of all heads is one GEMM against a block-diagonal (H·D, H) matrix of Σφk)."""

    def __init__(self, attn: LinearAttention, n: int) -> None:
        self.attn, self.h, self.d, self.a = attn, attn.num_heads, attn.head_dim, attn.attn_dim
        w, bias = attn.qkv.weight, attn.qkv.bias
        self.rank = 0 if attn.out_gate is None else attn.out_gate.down.out_features
        if self.rank:  # the gate's down projection rides on the qkv GEMM: rows [q | k | v | down(h)]
            w = torch.cat([w, attn.out_gate.down.weight])
            bias = None if bias is None else torch.cat([bias, bias.new_zeros(self.rank)])
        self.wt, self.bias = w.t(), bias  # (C, 3A + R)
        tau = None if attn.log_tau is None else attn.log_tau.detach().exp()  # (2, H, 1)
        self.tau = None if tau is None else tau.to(w.dtype)
        self.dwc, self.out_gate = attn.dwc, attn.out_gate
        self.grid = None if attn.dwc is None else patch_grid(attn, n)  # (prefix, h, w)
        self.dilation = None if self.grid is None else conv_dilation(*self.grid[1:], attn.dwc_grid)
        # fold proj into the state from N >= C on, as LinearAttention.forward does (not past a conv or gate)
        self.fold = n >= attn.proj.out_features and attn.dwc is None and attn.out_gate is None
        self.wpt = attn.proj.weight.t().reshape(self.h, self.d, -1)  # (H, D, C) rows of Wpᵀ per head
        self.eps = torch.full((self.h,), attn.eps, dtype=w.dtype, device=w.device)
        # (2·Wp)ᵀ for the gate: scaling by 2 is exact, so (m·σ)·(2·Wp)ᵀ is bit for bit (m·2σ)·Wpᵀ
        self.wpt2 = None if attn.out_gate is None else attn.proj.weight.t().mul(2.0)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """[φ(q) | φ(k) | v | gate down(h)] of normed tokens h (rows, C) -> (rows, 3A + R)."""
        qkv = _addmm(self.bias, h, self.wt)
        qk = qkv[:, : 2 * self.a]
        if self.tau is not None:
            qk.view(-1, 2, self.h, self.d).mul_(self.tau)
        apply_feature_map_(self.attn.feature_map_name, qk)
        return qkv

    def heads(self, t: torch.Tensor, col: int = 0) -> torch.Tensor:
        """(rows, ·) packed rows -> the (H, rows, D) strided view of the A columns from ``col``."""
        return t[:, col: col + self.a].view(t.shape[0], self.h, self.d).transpose(0, 1)

    def start_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero φkᵀv (H, D, D) and Σφk (A,) accumulators."""
        w = self.wt
        return w.new_zeros(self.h, self.d, self.d), w.new_zeros(self.a)

    def add_to_state(self, qkv: torch.Tensor, state: torch.Tensor, ksum: torch.Tensor) -> None:
        """Add one chunk's φkᵀv and Σφk (one batched GEMM and one GEMV)."""
        k = self.heads(qkv, self.a)
        state.baddbmm_(k.transpose(1, 2), self.heads(qkv, 2 * self.a))
        ksum.addmv_(qkv[:, self.a: 2 * self.a].t(), qkv.new_ones(qkv.shape[0]))

    def image_state(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """φkᵀv and Σφk of one whole image's rows."""
        state = torch.bmm(self.heads(qkv, self.a).transpose(1, 2), self.heads(qkv, 2 * self.a))
        return state, torch.mv(qkv[:, self.a: 2 * self.a].t(), qkv.new_ones(qkv.shape[0]))

    def finish_state(self, state: torch.Tensor, ksum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The matrices pass 2 multiplies by: KV_h Wp_hᵀ stacked (A, C) when folding (else KV itself), and
        Σφk as a block-diagonal (A, H) matrix, so q·Σφk of every head is one GEMM."""
        mat = torch.bmm(state, self.wpt).view(self.a, -1) if self.fold else state
        diag = ksum.new_zeros(self.h, self.d, self.h)
        torch.diagonal(diag, dim1=0, dim2=2).copy_(ksum.view(self.h, self.d).t())
        return mat, diag.view(self.a, self.h)

    def local_conv(self, v_rows: torch.Tensor, s: int, e: int) -> tuple[int, torch.Tensor] | None:
        """``dwc``'s addition to tokens [s, e) of one image (see :func:`local_conv_rows`)."""
        return local_conv_rows(self.dwc, self.grid, v_rows, s, e, self.dilation)

    def attend(self, q_rows: torch.Tensor, mat: torch.Tensor, ksum_diag: torch.Tensor, out: torch.Tensor,
               conv: tuple[int, torch.Tensor] | None = None, gate_down: torch.Tensor | None = None) -> None:
        """One image's chunk: φq rows (n, A) (overwritten when folding) -> proj(attention) into ``out`` (n, C);
        ``conv`` (from :meth:`local_conv`) is added and the out_gate of the rows' ``gate_down`` (n, R) applied
        before the projection."""
        n = q_rows.shape[0]
        den = torch.addmm(self.eps, q_rows, ksum_diag).unsqueeze(-1)  # (n, H, 1): φq·Σφk + eps
        q = q_rows.view(n, self.h, self.d)
        proj = self.attn.proj
        if self.fold:  # (φq/den)·(KV Wpᵀ) + b: the output projection's GEMM does the rest
            q.div_(den)
            _addmm(proj.bias, q_rows, mat, out)
            return
        num = torch.bmm(q.transpose(0, 1), mat)  # (H, n, D)
        mixed = q_rows.new_empty(n, self.h, self.d)
        torch.div(num.transpose(0, 1), den, out=mixed)
        mixed = mixed.view(n, self.a)
        if conv is not None:
            mixed[conv[0]:].add_(conv[1])
        if gate_down is None:
            _addmm(proj.bias, mixed, proj.weight.t(), out)
            return
        # out_gate: 2·σ(up(down(x))) with σ in place and the exact factor 2 moved onto Wpᵀ (see __init__)
        gate = self.out_gate
        g = _addmm(gate.up.bias, gate_down, gate.up.weight.t()).sigmoid_()
        _addmm(proj.bias, mixed.mul_(g), self.wpt2, out)


def _addmm(bias: torch.Tensor | None, x: torch.Tensor, wt: torch.Tensor, out: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x @ wt (+ bias) for 2-D x, into ``out`` when given."""
    if out is None:
        return torch.mm(x, wt) if bias is None else torch.addmm(bias, x, wt)
    if bias is None:
        return torch.mm(x, wt, out=out)
    return torch.addmm(bias, x, wt, out=out)


def _plain_mlp(mlp: nn.Module) -> bool:
    """timm's ``Mlp`` as ViTs build it: Linear -> GELU -> Linear (dropouts already known to be off)."""
    return (type(mlp) is Mlp and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
            and type(mlp.act) is nn.GELU and isinstance(mlp.norm, nn.Identity))


def _mlp_residual(block: nn.Module, rows: torch.Tensor) -> None:
    """rows (n, C) of the output, holding x + ls1(attn): add ls2(mlp(norm2(rows))) in place.

    timm's ``Mlp`` runs inline with GELU in place: its module forward keeps the hidden layer before and
    after GELU alive together (2 x rows x 4·C), and glibc returns a freed heap top larger than twice its
    largest recent mmap to the OS (``M_TRIM_THRESHOLD``'s dynamic default), so the next chunk would
    page-fault it in again; one hidden buffer stays under that."""
    mlp = block.mlp
    if _plain_mlp(mlp):
        hidden = _addmm(mlp.fc1.bias, block.norm2(rows), mlp.fc1.weight.t())
        torch.ops.aten.gelu_(hidden, approximate=mlp.act.approximate)
        y = _addmm(mlp.fc2.bias, hidden, mlp.fc2.weight.t())
        del hidden
    else:
        y = mlp(block.norm2(rows))
    _residual(rows, y, block.ls2, rows)


def streamed_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Block.forward(block, x)`` for (B, N, C) ``x`` in two passes over token chunks (module docstring).

    Only valid where :func:`can_stream` holds. Images of a batch whose whole sequence fits in one chunk
    run together (``chunk_tokens // N`` images per group); longer sequences run one image at a time, with
    φ(q) of that image kept in this thread's workspace (``adala.attention.ops.clear_workspace`` frees it;
    a plain buffer instead where ``adala.runtime.keep_freed_memory`` is in effect).
    """
    b, n, c = x.shape
    chunk = _STATE["chunk_tokens"]
    att = _Attention(block.attn, n)
    out = torch.empty((b, n, c), dtype=x.dtype, device=x.device)
    whole = chunk // 2  # whole-image groups only while their temporaries stay small (see below)
    if n <= whole:  # groups of whole images: one pass over each group's rows
        group = max(1, min(b, whole // n))
        for g0, g1 in _spans(b, math.ceil(b / group)):
            _whole_images(block, att, x[g0:g1].reshape(-1, c), out[g0:g1].view(-1, c), n)
        return out
    # At least two chunks: one chunk of 1025 rows (448²) made glibc trim and re-fault its heap top on every
    # block (45k faults per forward, against 2k with two chunks of 513 rows; measured in a plain process).
    spans = _spans(n, max(2, math.ceil(n / chunk)))
    a, dwc = att.a, att.dwc is not None
    width = (2 if dwc else 1) * a + att.rank  # φq, V for the conv, the gate's down projection
    if freed_memory_kept():  # the heap reuses a fresh buffer already, and it is gone after the block
        store = x.new_empty(n, width)
    else:
        store = workspace(n * width, x.dtype, x.device).view(n, width)
    q_store, v_store, g_store = store[:, :a], store[:, a: 2 * a] if dwc else None, store[:, width - att.rank:]
    for i in range(b):
        state, ksum = att.start_state()
        for s, e in spans:  # pass 1: the state over all tokens; φq (and V) kept
            qkv = att.project(block.norm1(x[i, s:e]))
            att.add_to_state(qkv, state, ksum)
            q_store[s:e].copy_(qkv[:, :a])
            if dwc:
                v_store[s:e].copy_(qkv[:, 2 * a: 3 * a])
            if att.rank:
                g_store[s:e].copy_(qkv[:, 3 * a:])
            del qkv
        mat, ksum_diag = att.finish_state(state, ksum)
        for s, e in spans:  # pass 2: attention output, residuals and MLP, written into out
            rows = out[i, s:e]
            mixed = x.new_empty(e - s, c)
            conv = att.local_conv(v_store, s, e) if dwc else None
            att.attend(q_store[s:e], mat, ksum_diag, mixed, conv, g_store[s:e] if att.rank else None)
            del conv
            _residual(x[i, s:e], mixed, block.ls1, rows)
            del mixed
            _mlp_residual(block, rows)
    return out


def _whole_images(block: nn.Module, att: _Attention, x_rows: torch.Tensor, out_rows: torch.Tensor, n: int) -> None:
    """A group of whole images as (G·N, C) rows: one GEMM per projection over the group, the attention
    state per image from strided views of the packed projections (no copies)."""
    qkv = att.project(block.norm1(x_rows))
    a = att.a
    mixed = x_rows.new_empty(x_rows.shape)
    for s in range(0, x_rows.shape[0], n):
        image = qkv[s: s + n]
        mat, ksum_diag = att.finish_state(*att.image_state(image))
        conv = None if att.dwc is None else att.local_conv(image[:, 2 * a: 3 * a], 0, n)
        att.attend(image[:, :a], mat, ksum_diag, mixed[s: s + n], conv, image[:, 3 * a:] if att.rank else None)
    del qkv
    _residual(x_rows, mixed, block.ls1, out_rows)
    del mixed
    _mlp_residual(block, out_rows)


class StreamedBlock(Block):
    """timm's ``Block`` whose plain forward (no mask, not causal) takes a subclass's streamed path when that
    path says it applies (``_stream`` returns the output), and timm's own forward otherwise."""

    def _stream(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and kwargs.get("attn_mask") is None and not kwargs.get("is_causal", False):
            out = self._stream(x)
            if out is not None:
                return out
        return super().forward(x, *args, **kwargs)


class LinearBlock(StreamedBlock):
    """Streams when :func:`can_stream` holds (installed by surgery on blocks that get a linear attention; the
    class swap keeps every parameter, buffer and state-dict key)."""

    def _stream(self, x: torch.Tensor) -> torch.Tensor | None:
        return streamed_forward(self, x) if can_stream(self, x) else None


def install_streamed_blocks(blocks: list[nn.Module]) -> int:
    """Make every plain timm ``Block`` among ``blocks`` whose attention is a LinearAttention a
    :class:`LinearBlock` (in place; subclasses of ``Block`` with their own forward are left alone).
    Returns how many blocks were switched."""
    switched = 0
    for block in blocks:
        if type(block) is Block and isinstance(getattr(block, "attn", None), LinearAttention):
            block.__class__ = LinearBlock
            switched += 1
    return switched

