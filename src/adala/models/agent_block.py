"""A whole timm ViT block with ``agent`` attention, streamed over token chunks for CPU inference.

The same reasons as ``linear_block`` (no temporary larger than a chunk, no allocator settings), with the agent
kind's own order of work per image:

1. per chunk: norm1 -> qkv, written into one (N, 3·A) projection kept for the image (a reusable per-thread
   workspace; the agents need every query before any key can be scored);
2. agents: the patch queries pooled onto the agents grid, then ``kmeans`` Lloyd iterations (one batched GEMM,
   an argmax and an ``index_add`` each), the prefix queries in front;
3. each agent's exact softmax over all N keys times V, in groups of agents so the (H, agents, N) scores stay
   chunk-sized; the prefix queries ride along as extra rows at the teacher's scale (their exact output);
4. per chunk: the queries' softmax over the agents, times the agent states folded with the output projection
   (one GEMM over the H·m agent columns, as ``linear_block`` folds φq·KV), or, with ``dwc``, the states, the
   conv and then the projection; residual, norm2, MLP, residual into the block's output.

:func:`can_stream_agent` says when this equals ``Block.forward``: CPU, fp32/fp64, no autocast, no autograd, no
tracer, a known patch grid and the block-level conditions of ``linear_block.plain_block``.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..attention.agent import AgentAttention, kmeans_stride, pool_patch_grid, subgrid
from ..attention.grid import conv_dilation, patch_grid
from ..attention.ops import workspace
from ..errors import UnsupportedModelError
from ..runtime import freed_memory_kept
from ..tracing import is_tracing
from .linear_block import (
    _STATE,
    StreamedBlock,
    _addmm,
    _inactive,
    _mlp_residual,
    _residual,
    _spans,
    local_conv_rows,
    plain_block,
    streamable_conv,
)


def can_stream_agent(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``agent_streamed_forward(block, x)`` computes what ``Block.forward(block, x)`` would."""
    attn = getattr(block, "attn", None)
    if type(attn) is not AgentAttention or x.device.type != "cpu" or x.dim() != 3:
        return False
    if x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cpu") or is_tracing():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters())):
        return False
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
            and isinstance(attn.norm, nn.Identity) and attn.gate is None and attn.out_gate is None
            and type(attn.qkv) is nn.Linear and type(attn.proj) is nn.Linear and _inactive(attn.proj_drop)):
        return False
    try:
        patch_grid(attn, x.shape[1])
    except UnsupportedModelError:
        return False
    return streamable_conv(attn, x.shape[1]) and plain_block(block)


def _heads(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """(n, H·D) rows (any row stride) -> (H, n, D) view."""
    return rows.view(rows.shape[0], heads, -1).transpose(0, 1)


def _centres(attn: AgentAttention, q: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(H, m, D) agents from one image's (N, A) query rows: grid pooling, then Lloyd iterations on the strided
    subgrid as ``attention.agent.lloyd`` does them (argmax of q·c − |c|²/2, means by ``index_add``)."""
    prefix, gh, gw = grid
    h, d = attn.num_heads, attn.head_dim
    centres = pool_patch_grid(q, prefix, gh, gw, attn.agents).view(-1, h, d).transpose(0, 1).contiguous()
    if not attn.kmeans:
        return centres
    m = centres.shape[1]
    stride = kmeans_stride(gh * gw, attn.kmeans_points)
    points = _heads(subgrid(q, prefix, gh, gw, stride), h)  # (H, Nk, D): at most ~kmeans_points
    # The points with a constant 1 column (one copy, as a contiguous copy would be): the scores' −|c|²/2 bias then
    # rides in the GEMM (baddbmm first copies an (H, Nk, m) bias into its output: a third of each iteration at
    # 1344²), and index_add's last column counts the members (no bincount).
    aug = q.new_empty(h, points.shape[1], d + 1)
    aug[..., :d] = points
    aug[..., d] = 1
    flat = aug.view(-1, d + 1)
    offsets = (torch.arange(h, device=q.device) * m).view(h, 1)
    for _ in range(attn.kmeans):
        lifted = torch.cat([centres, centres.pow(2).sum(-1, keepdim=True).mul_(-0.5)], dim=-1)  # (H, m, D+1)
        nearest = (torch.bmm(aug, lifted.transpose(1, 2)).argmax(-1) + offsets).view(-1)  # (H·Nk,), head-major
        sums = centres.new_zeros(h * m, d + 1).index_add_(0, nearest, flat)
        count = sums[:, d:]
        centres = torch.where(count > 0, sums[:, :d] / count.clamp_min(1), centres.view(h * m, d)).view(h, m, d)
    return centres


def _agent_states(rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_elems: int) -> torch.Tensor:
    """(H, R, D) scaled agent rows against one image's (N, A) key and value rows -> (H, R, D): each row's
    exact softmax over all N keys times V, in groups of rows whose (H, rows, N) scores hold ≤ group_elems."""
    h, r, _ = rows.shape
    n = k.shape[0]
    kt, vh = _heads(k, h).transpose(1, 2), _heads(v, h)  # (H, D, N), (H, N, D)
    out = rows.new_empty(rows.shape)
    step = max(1, group_elems // (h * n))
    for g0 in range(0, r, step):
        g1 = min(r, g0 + step)
        scores = torch.bmm(rows[:, g0:g1], kt)
        scores.sub_(scores.amax(-1, keepdim=True)).exp_()
        scores.div_(scores.sum(-1, keepdim=True))
        out[:, g0:g1] = torch.bmm(scores, vh)
    return out


def agent_streamed_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Block.forward(block, x)`` for (B, N, C) ``x`` as the module docstring describes; only valid where
    :func:`can_stream_agent` holds. Images run one at a time."""
    b, n, c = x.shape
    attn: AgentAttention = block.attn
    grid = patch_grid(attn, n)
    prefix = grid[0]
    dilation = conv_dilation(grid[1], grid[2], attn.dwc_grid)
    h, d, a = attn.num_heads, attn.head_dim, attn.attn_dim
    chunk = _STATE["chunk_tokens"]
    spans = _spans(n, max(1, math.ceil(n / chunk)))
    wt, bias = attn.qkv.weight.t(), attn.qkv.bias
    wp = attn.proj.weight
    sq, sa = (t.detach().to(x.dtype) if torch.is_tensor(t) else t for t in attn.temperatures())
    s = float(attn.scale)
    if freed_memory_kept():
        store = x.new_empty(n, 3 * a)
    else:
        store = workspace(n * 3 * a, x.dtype, x.device).view(n, 3 * a)
    q, k, v = store[:, :a], store[:, a: 2 * a], store[:, 2 * a:]
    out = torch.empty((b, n, c), dtype=x.dtype, device=x.device)
    for i in range(b):
        for s0, e0 in spans:  # pass 1: the whole projection of this image
            _addmm(bias, block.norm1(x[i, s0:e0]), wt, out=store[s0:e0])
        q_pre = _heads(q[:prefix], h)  # (H, P, D)
        agents = torch.cat([q_pre, _centres(attn, q, grid)], dim=1)  # (H, M, D), M = P + m
        states = _agent_states(torch.cat([q_pre * s, agents * sa], dim=1), k, v, chunk * 4 * c)
        exact, states = states[:, :prefix], states[:, prefix:]  # prefix outputs; agent states (H, M, D)
        q_agents = (agents * sq).transpose(1, 2)  # (H, D, M)
        m_all = agents.shape[1]
        # (H·M, C): the agent states times Wpᵀ. Not with dwc: its conv sits before proj, and a second GEMM for
        # conv·Wpᵀ costs a whole projection, more than mixing the states first (measured 9 % vs 5 % of a block)
        folded = None if attn.dwc is not None else torch.bmm(states, wp.t().reshape(h, d, c)).view(h * m_all, c)
        scores = x.new_empty(max(e0 - s0 for s0, e0 in spans), h * m_all)
        for s0, e0 in spans:  # pass 2: queries over the agents, projection, residuals and MLP
            rows, c_rows = out[i, s0:e0], e0 - s0
            for j in range(h):  # per head, straight into the (rows, H·M) layout the folded GEMM reads
                torch.mm(q[s0:e0, j * d: (j + 1) * d], q_agents[j], out=scores[:c_rows, j * m_all: (j + 1) * m_all])
            weights = torch.softmax(scores[:c_rows].view(c_rows, h, m_all), dim=-1)  # (rows, H, M)
            mixed = x.new_empty(c_rows, c)
            if folded is not None:
                _addmm(attn.proj.bias, weights.view(c_rows, -1), folded, out=mixed)
            else:
                att = x.new_empty(c_rows, a)
                for j in range(h):  # each head's mixture of agent states, written in (rows, A) layout
                    torch.mm(weights[:, j], states[j], out=att[:, j * d: (j + 1) * d])
                conv = local_conv_rows(attn.dwc, grid, v, s0, e0, dilation)
                if conv is not None:
                    att[conv[0]:].add_(conv[1])
                _addmm(attn.proj.bias, att, wp.t(), out=mixed)
            if s0 < prefix:  # the prefix tokens' exact attention replaces their agent mixture
                pre = exact[:, s0: min(prefix, e0)].transpose(0, 1).reshape(-1, a)
                _addmm(attn.proj.bias, pre, wp.t(), out=mixed[: pre.shape[0]])
            _residual(x[i, s0:e0], mixed, block.ls1, rows)
            del mixed, weights
            _mlp_residual(block, rows)
    return out


class AgentBlock(StreamedBlock):
    """Streams when :func:`can_stream_agent` holds (installed on blocks with ``agent`` attention; the class swap
    keeps every parameter, buffer and state-dict key)."""

    def _stream(self, x: torch.Tensor) -> torch.Tensor | None:
        return agent_streamed_forward(self, x) if can_stream_agent(self, x) else None


def install_agent_blocks(blocks: list[nn.Module]) -> int:
    """Make every plain timm ``Block`` among ``blocks`` whose attention is ``agent`` an :class:`AgentBlock`
    (in place). Returns how many blocks were switched."""
    switched = 0
    for block in blocks:
        if type(block) is Block and type(getattr(block, "attn", None)) is AgentAttention:
            block.__class__ = AgentBlock
            switched += 1
    return switched
