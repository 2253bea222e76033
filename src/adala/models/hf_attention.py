"""adala's linear attention inside Hugging Face ``transformers`` models, through transformers' own registry.

Every supported vision attention (DINOv2, DINOv2-with-registers, ViT, CLIP and SigLIP vision towers, DINOv3 ViT)
computes q/k/v itself and then calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``. Registering a
function there under a name (``adala-linear-elu``, ``adala-linear-relu``) therefore switches a model to linear
attention while it keeps its class, its weights, its ``pixel_values`` API and everything built on it (a Depth
Anything / DPT head, a Mask2Former or EoMT segmenter): nothing is converted or copied into timm.

Decisions:

* Only the parameter-free kinds are registered: ``linear-elu`` and ``linear-relu`` are exactly the timm
  student's math (φ(q)(φ(k)ᵀv) / (φ(q)·Σφ(k) + eps), fp32 sums, no softmax scale). Kinds with per-module
  parameters (hedgehog, focused, window-hybrid) or buffers (performer) would need modules grafted onto HF
  layers that ``from_pretrained`` cannot rebuild, so they are refused in one line; convert such models to timm
  (``adala.models.hf.to_timm``). ``nystrom`` is parameter-free but not wired in yet.
* The chosen name is written to the config both where transformers reads it (``_attn_implementation``) and as a
  plain ``attn_implementation`` attribute, which ``save_pretrained`` serialises and ``from_pretrained`` reads
  back: a saved linear model reloads linear with adala imported, and fails loudly (unknown implementation)
  without it, never silently as softmax. A composite model (Depth Anything, CLIPModel) records it on its top
  config in transformers' nested form. Only vision attentions are touched: a CLIP/SigLIP text tower stays softmax.
* ``keep_softmax`` blocks are marked on their module (``adala_softmax``) and run transformers' SDPA. The mark is
  not part of the config, so ``save_hf`` refuses hybrids (save them in timm layout).

``import adala`` registers the names the moment ``transformers.modeling_utils`` is imported (see
``adala/__init__.py``), without importing transformers itself: it is an optional dependency that takes seconds
to import. ``register()`` does it explicitly and is idempotent.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..attention.ops import DEFAULT_EPS, FEATURE_MAPS, linear_attention
from ..errors import ConfigError, UnsupportedModelError

PREFIX = "adala-"
KINDS = {"linear-elu": "elu", "linear-relu": "relu"}  # adala kind -> feature map
NAMES = {PREFIX + kind: kind for kind in KINDS}  # registered attn_implementation -> adala kind
# configs whose attention modules call the registry and are non-causal over image tokens (checked in the
# installed transformers 5 source; text configs are deliberately absent)
VISION_CONFIGS = ("Dinov2Config", "Dinov2WithRegistersConfig", "ViTConfig", "CLIPVisionConfig",
                  "SiglipVisionConfig", "DINOv3ViTConfig")
OPTION_DEFAULTS = {"eps": DEFAULT_EPS}  # ``kernel`` is accepted and ignored: there is one path here


def implementation_name(kind: str) -> str:
    """The ``attn_implementation`` string for an adala kind, e.g. ``adala-linear-elu``."""
    return PREFIX + kind


def _attention_fn(kind: str) -> Callable[..., tuple[torch.Tensor, None]]:
    phi = FEATURE_MAPS[KINDS[kind]]

    def adala_linear_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, scaling: float | None = None,
                               dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """transformers' attention signature: q/k/v (B, H, N, D) -> ((B, N, H, D), no weights).

        ``scaling`` and ``dropout`` belong to softmax probabilities and do not exist here (as in the timm
        student); a mask would mean a causal or padded sequence, which non-causal linear attention cannot honour.
        """
        if getattr(module, "adala_softmax", False):
            # lazy: optional dependency: transformers (seconds to import)
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        if attention_mask is not None or getattr(module, "is_causal", False):
            raise UnsupportedModelError(f"{implementation_name(kind)} is non-causal attention over image tokens "
                                        f"and takes no attention mask ({type(module).__name__})")
        out = linear_attention(phi(query), phi(key), value, DEFAULT_EPS)
        return out.transpose(1, 2), None  # no-grad: already (B, N, H, D) memory, so this view is free

    adala_linear_attention.__qualname__ = adala_linear_attention.__name__ = f"adala_{kind.replace('-', '_')}"
    return adala_linear_attention


def register(modeling_utils: Any = None) -> list[str]:
    """Register adala's kinds with transformers' ``AttentionInterface``; returns the names. Idempotent."""
    if modeling_utils is None:
        import transformers.modeling_utils as modeling_utils  # lazy: transformers is an optional dependency
    for name, kind in NAMES.items():
        modeling_utils.AttentionInterface.register(name, _attention_fn(kind))
    return list(NAMES)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The vision self-attentions of a HF model, in order (every block of every supported vision tower)."""
    return [m for m in model.modules()
            if type(getattr(m, "config", None)).__name__ in VISION_CONFIGS and hasattr(m, "q_proj")
            and getattr(m, "is_causal", None) is False and type(m).__name__.endswith("Attention")]


def kinds_of(model: nn.Module) -> list[str]:
    """Per attention module: the adala kind it runs, or ``"softmax"`` (eager/sdpa/flash... or a kept block)."""
    out = []
    for m in attention_modules(model):
        kind = NAMES.get(m.config._attn_implementation)
        out.append("softmax" if kind is None or getattr(m, "adala_softmax", False) else kind)
    return out


def _check(kind: str, options: dict[str, Any]) -> None:
    if kind == "softmax":
        raise UnsupportedModelError("a Hugging Face model runs softmax by itself: load it with "
                                    "attn_implementation='sdpa' (or model.set_attn_implementation('sdpa'))")
    if kind not in KINDS:
        # lazy: cycle: attention kinds are built by models that import this module
        from .. import attention

        attention.get(kind)  # unknown names: UnknownAttentionError with the list
        raise UnsupportedModelError(
            f"attention {kind!r} needs adala modules inside the layers; Hugging Face models run "
            f"{', '.join(KINDS)} natively. Convert first: adala.linearize(adala.models.hf.to_timm(model), {kind!r})")
    bad = {k: v for k, v in options.items() if k != "kernel" and OPTION_DEFAULTS.get(k, object()) != v}
    if bad:
        raise ConfigError(f"Hugging Face {kind} takes no options other than the defaults {OPTION_DEFAULTS} "
                          f"(got {bad}); use adala.models.hf.to_timm for other settings")


def set_attention(model: nn.Module, kind: str, keep_softmax: list[int] | None = None) -> nn.Module:
    """Switch ``model``'s vision attentions to ``kind`` in place (blocks in ``keep_softmax`` stay softmax)."""
    _check(kind, {})
    mods = attention_modules(model)
    if not mods:
        # lazy: optional dependency: transformers (seconds to import)
        from .hf import supported_classes

        raise UnsupportedModelError(
            f"unsupported Hugging Face model {type(model).__name__}: no DINOv2/ViT/CLIP/SigLIP/DINOv3 vision "
            f"attention found; supported: {', '.join([*supported_classes(), 'DINOv3ViTModel'])} and models "
            "built on them (Dinov2Backbone, DepthAnythingForDepthEstimation, ...)")
    keep = set(keep_softmax or [])
    bad = sorted(i for i in keep if not 0 <= i < len(mods))
    if bad:
        raise UnsupportedModelError(f"keep_softmax blocks {bad} out of range 0..{len(mods) - 1}")
    register()
    name = implementation_name(kind)
    targets = {}
    for i, m in enumerate(mods):
        m.config._attn_implementation = name
        m.config.attn_implementation = name  # serialised by save_pretrained, read back by from_pretrained
        m.adala_softmax = i in keep
        targets[id(m.config)] = m.config
    top = getattr(model, "config", None)
    if top is not None and id(top) not in targets:
        tree = _implementation_tree(top, set(targets), name)
        if tree is not None:
            top.attn_implementation = tree
    return model


def _implementation_tree(config: Any, targets: set[int], name: str) -> dict[str, Any] | None:
    """``attn_implementation`` for a config whose sub-configs hold the vision attention, in transformers' nested
    form (``{"backbone_config": "adala-linear-elu"}``). Needed because loading a composite config sets its
    own implementation (None) on every sub-config after reading them, which would drop theirs."""
    tree = {}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is None:
            continue
        value = name if id(sub) in targets else _implementation_tree(sub, targets, name)
        if value is not None:
            tree[key] = value
    return tree or None


def linearize_hf(model: nn.Module, attention: str = "linear-elu", keep_softmax: list[int] | None = None,
                 **options: Any) -> nn.Module:
    """A copy of the HF ``model`` (same class and tensors) whose vision attentions run ``attention``.

    A copy, like timm ``linearize``, so the softmax teacher stays usable next to its student.
    """
    _check(attention, options)
    return set_attention(copy.deepcopy(model), attention, keep_softmax)
