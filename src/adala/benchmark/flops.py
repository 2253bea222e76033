"""Analytical forward FLOPs of a supported timm model's ``forward_features``, per attention kind.

Token layout comes from the model's family adapter: prefix tokens, and for SAM the windowed blocks'
(windows × window tokens) groups and the neck's convolutions (counted as matmuls).

Convention (also written into every bench JSON): a multiply-add is 2 FLOPs; matmuls are counted
exactly (patch embedding, qkv, attention mixing, proj, MLP); element-wise work (LayerNorm, GELU,
softmax's exp, residual adds) is not, except in linear attention, where the feature map and the
normaliser are its only non-matmul work and are counted 1 FLOP per element operation. The ratio
softmax FLOPs / linear FLOPs is the speed-up a kernel could reach if both ran at the same FLOP rate.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..attention.flops import (  # noqa: F401  (the per-attention formulas, re-used here)
    attention_flops,
    linear_attention_flops,
    softmax_attention_flops,
)
from ..models.families import family_of
from ..models.surgery import attention_modules, backbone_of

CONVENTION = (
    "multiply-add = 2 FLOPs; matmuls counted exactly (patch embed, qkv, attention, proj, MLP); "
    "LayerNorm/GELU/softmax exp/residuals not counted; linear attention's feature map and normaliser "
    "counted 1 FLOP per element op"
)


EXECUTION_NOTE = (
    "linear-elu/linear-relu inference (fused path, N >= embed dim) evaluates proj((φq·KᵀV)/den) as "
    "(φq/den)·(KᵀV·Wpᵀ): the per-token Q(KᵀV) product (2·N·D² per head) is replaced by an N-independent "
    "2·D²·C per head, so it executes slightly fewer FLOPs than counted; counts use the standard formulation"
)


def tokens(model: nn.Module, img_size: int) -> int:
    """Sequence length at ``img_size``: prefix tokens (cls, registers) + patch grid."""
    vit = backbone_of(model)
    return family_of(vit).tokens(vit, img_size)


def _linear(m: nn.Linear, rows: int) -> int:
    return 2 * rows * m.in_features * m.out_features


def _qkv_linears(attn: nn.Module) -> list[nn.Linear]:
    """The q/k/v projections: one fused ``qkv`` or Eva's separate ``q_proj``/``k_proj``/``v_proj``."""
    if getattr(attn, "qkv", None) is not None:
        return [attn.qkv]
    return [getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")]


def block_flops(block: nn.Module, n: int, groups: int = 1, group_tokens: int | None = None) -> dict[str, int | None]:
    """One transformer block at ``n`` tokens: qkv, attention mixing, proj, MLP (every Linear in it).

    ``groups`` × ``group_tokens``: the attention runs on that many independent sequences (SAM's windows of
    the zero-padded grid; qkv and proj see the padded tokens too); default one sequence of ``n`` tokens.
    """
    attn = block.attn
    m = n if group_tokens is None else group_tokens
    rows = groups * m
    mix = attention_flops(attn, m)
    out: dict[str, Any] = {
        "qkv": sum(_linear(lin, rows) for lin in _qkv_linears(attn)),
        "attention": None if mix is None else groups * sum(mix.values()),
        "proj": _linear(attn.proj, rows),
        "mlp": sum(_linear(m_, n) for m_ in block.mlp.modules() if isinstance(m_, nn.Linear)),
    }
    gate = getattr(attn, "gate", None)
    gates = [gate] if isinstance(gate, nn.Linear) else []
    if getattr(attn, "out_gate", None) is not None:
        gates += [m_ for m_ in attn.out_gate.modules() if isinstance(m_, nn.Linear)]
    if gates:
        out["gate"] = sum(_linear(g, n) for g in gates)
    return out


def model_flops(model: nn.Module, img_size: int, batch_size: int = 1) -> dict[str, Any]:
    """Forward FLOPs of ``forward_features`` at ``img_size`` (square) for ``batch_size`` images.

    Returns ``{"total", "tokens", "patch_embed", "qkv", "attention", "proj", "mlp", "per_block",
    "countable"}``; ``total``/``attention`` are None when a block's kind cannot be counted.
    """
    vit = backbone_of(model)
    attention_modules(vit)  # a clear error for architectures we cannot count
    fam = family_of(vit)
    n = fam.tokens(vit, img_size)
    proj = vit.patch_embed.proj
    p = vit.patch_embed.patch_size
    patches = (img_size // p[0]) * (img_size // p[1])
    embed = 2 * patches * proj.in_channels * p[0] * p[1] * proj.out_channels
    blocks = []
    for i, b in enumerate(fam.blocks(vit)):
        groups, group_tokens = fam.attention_groups(vit, i, img_size)
        blocks.append(block_flops(b, n, groups, group_tokens))
    extra = fam.extra_flops(vit, img_size)
    sums: dict[str, int | None] = dict(extra)
    for key in ("qkv", "attention", "proj", "mlp", "gate"):
        vals = [b.get(key, 0) for b in blocks]
        sums[key] = None if any(v is None for v in vals) else sum(vals)
    countable = sums["attention"] is not None
    total = embed + sum(v for v in sums.values() if v is not None) if countable else None
    scale = batch_size

    def times(v: int | None) -> int | None:
        return None if v is None else v * scale

    return {
        "tokens": n,
        "batch_size": batch_size,
        "total": times(total),
        "patch_embed": times(embed),
        **{k: times(v) for k, v in sums.items() if not (k == "gate" and not v)},
        "per_block": [{k: times(v) for k, v in b.items()} for b in blocks],
        "countable": countable,
    }
