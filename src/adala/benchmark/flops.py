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

from ..attention.linear import LinearAttention
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


def _heads(attn: nn.Module) -> tuple[int, int]:
    h = int(attn.num_heads)
    d = int(getattr(attn, "head_dim", 0) or attn.qkv.out_features // (3 * h))
    return h, d


def softmax_attention_flops(n: int, heads: int, head_dim: int) -> dict[str, int]:
    """QKᵀ and AV: 2·N²·D each per head (2·2·N²·D per head-layer)."""
    return {"scores": 2 * n * n * head_dim * heads, "weighted_sum": 2 * n * n * head_dim * heads}


def linear_attention_flops(n: int, heads: int, head_dim: int, feature_ops: int = 2) -> dict[str, int]:
    """φ on q and k (``feature_ops`` per element: ELU+1 = 2, ReLU = 1), KᵀV, Q(KᵀV), and the
    normaliser (Σφk, φq·Σφk, the division)."""
    d = head_dim
    return {
        "feature_map": feature_ops * 2 * n * d * heads,
        "kv": 2 * n * d * d * heads,
        "q_kv": 2 * n * d * d * heads,
        "normaliser": (n * d + 2 * n * d + n * d) * heads,
    }


def attention_flops(attn: nn.Module, n: int) -> dict[str, int] | None:
    """Mixing FLOPs of one attention module at ``n`` tokens; None for a kind we cannot count.

    A kind can describe itself with a ``flops(n) -> dict[str, int]`` method.
    """
    if hasattr(attn, "flops") and callable(attn.flops):
        return dict(attn.flops(n))
    heads, d = _heads(attn)
    if getattr(attn, "kind", "softmax") == "softmax":
        return softmax_attention_flops(n, heads, d)
    if isinstance(attn, LinearAttention):
        return linear_attention_flops(n, heads, d, feature_ops=2 if attn.feature_map_name == "elu" else 1)
    return None


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
    if isinstance(gate, nn.Linear):
        out["gate"] = _linear(gate, n)
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
