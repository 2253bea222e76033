"""Hugging Face ``transformers`` vision backbones, converted into the equivalent timm ViT and back.

``adala.linearize(hf_model)`` keeps the HF model and switches its attention (``hf_attention``); this module is
the explicit timm bridge: ``to_timm`` for the stages (``load_teacher("hf:...")`` uses it) and ``save_hf`` to write
a trained timm student back as a ``save_pretrained`` directory. A weight-name map (timm's
``checkpoint_filter_fn`` shape) turns a ``PreTrainedModel`` into a plain timm ``VisionTransformer`` with
``adala_config``, so linearize, every stage, save/load and bench need no second code path. Supported:
``Dinov2Model``, ``Dinov2WithRegistersModel``, ``ViTModel``, ``CLIPVisionModel`` and ``SiglipVisionModel`` (the
vision tower of ``CLIPModel``, ``CLIPVisionModelWithProjection`` and ``SiglipModel``).

Decisions, each checked against the installed transformers source:

* ``forward_features`` keeps timm's meaning: tokens after the final norm. That is HF's ``last_hidden_state``
  for DINOv2, ViT and SigLIP, and ``post_layernorm(last_hidden_state)`` for CLIP (HF normalises only the
  pooled token); ``forward_head`` gives HF's ``pooler_output`` for CLIP (class token) and SigLIP (the MAP head).
* Dropped: ``embeddings.mask_token`` (masked pre-training only) and ViT's ``pooler.dense`` (tanh pooler,
  not part of the features). DINOv2-with-registers' class-token position is folded into ``cls_token``
  (timm's ``no_embed_class`` layout), one ``hidden_size`` vector fewer, same outputs.
* Position resampling: HF interpolates bicubic without antialias for DINOv2, ViT, CLIP and SigLIP
  (``pos_embed_antialias`` False), with antialias for DINOv2-with-registers.
* LayerNorm eps: HF's ``layer_norm_eps`` (ViT uses 1e-12, timm 1e-6) is recorded as ``layer_norm_eps`` in
  the model config and applied to every LayerNorm by ``build_backbone``, so adala.json stays plain JSON.
* Both transformers 5 names (``layers.N``, ``q_proj/k_proj/v_proj/o_proj``) and older ones
  (``encoder.layer.N``, ``attention.attention.query``, ``intermediate.dense``, ``vision_model.`` prefix) map.

``transformers`` is imported only when a model is actually loaded, so importing adala stays fast.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, OfflineError, UnknownTeacherError, UnsupportedModelError
from . import hf_attention
from .config import build_backbone, get_config, set_config, teacher_config

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

# HF tensors with no timm counterpart (see the module docstring); position_ids is a buffer in old checkpoints.
DROPPED = re.compile(r"embeddings\.mask_token|pooler\.dense\.(weight|bias)|embeddings\.position_ids")


# --- architecture: HF config -> timm kwargs -------------------------------------------------------------------

_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "relu": "relu", "silu": "silu", "swish": "silu"}


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def _mlp_ratio(dim: int, hidden: int) -> float:
    """A ratio for which timm's ``int(dim * ratio)`` gives exactly ``hidden`` (float rounding can miss by 1)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def _common_kwargs(c: Any, arch_eps: float, hidden: int | None = None) -> dict[str, Any]:
    name = type(c).__name__
    img, patch = _pair(c.image_size), _pair(c.patch_size)
    if patch[0] != patch[1]:
        raise UnsupportedModelError(f"{name}: non-square patches {patch} are not supported")
    head_dim = getattr(c, "head_dim", None)
    if head_dim and head_dim * c.num_attention_heads != c.hidden_size:
        raise UnsupportedModelError(f"{name}: head_dim {head_dim} x {c.num_attention_heads} heads != hidden_size")
    act = _ACT.get(c.hidden_act) if isinstance(c.hidden_act, str) else None
    if act is None:
        raise UnsupportedModelError(f"{name}: activation {c.hidden_act!r} has no timm equivalent ({sorted(_ACT)})")
    kw: dict[str, Any] = {
        "img_size": img[0] if img[0] == img[1] else list(img), "patch_size": patch[0],
        "in_chans": int(c.num_channels), "embed_dim": int(c.hidden_size), "depth": int(c.num_hidden_layers),
        "num_heads": int(c.num_attention_heads),
        "mlp_ratio": _mlp_ratio(c.hidden_size, hidden if hidden is not None else c.intermediate_size),
        "qkv_bias": bool(getattr(c, "qkv_bias", True)), "act_layer": act,
        "dynamic_img_size": True, "num_classes": 0,
    }
    return kw


def _dinov2_kwargs(c: Any) -> dict[str, Any]:
    if getattr(c, "use_swiglu_ffn", False):  # packed [gate; up] fc1 of twice the SwiGLU width, SiLU
        swiglu = (int(int(c.hidden_size * c.mlp_ratio) * 2 / 3) + 7) // 8 * 8
        kw = _common_kwargs(c, 1e-6, hidden=2 * swiglu)
        kw["act_layer"] = "silu"
    else:
        kw = _common_kwargs(c, 1e-6, hidden=int(c.hidden_size * c.mlp_ratio))
    kw["init_values"] = float(c.layerscale_value)
    if getattr(c, "num_register_tokens", 0):
        kw.update(reg_tokens=int(c.num_register_tokens), no_embed_class=True)
    return kw


def _vit_kwargs(c: Any) -> dict[str, Any]:
    return _common_kwargs(c, 1e-6)


def _clip_kwargs(c: Any) -> dict[str, Any]:
    return {**_common_kwargs(c, 1e-5), "qkv_bias": True, "pre_norm": True}


def _siglip_kwargs(c: Any) -> dict[str, Any]:
    kw = {**_common_kwargs(c, 1e-6), "qkv_bias": True, "class_token": False}
    if getattr(c, "vision_use_head", True):
        kw["global_pool"] = "map"
    else:  # no head: average the normalised tokens (fc_norm False keeps the final norm in forward_features)
        kw.update(global_pool="avg", fc_norm=False)
    return kw


@dataclass(frozen=True)
class Family:
    arch: str  # a timm architecture whose fixed model_args (norm layer, MLP type) match the family
    kwargs: Callable[[Any], dict[str, Any]]
    antialias: bool  # how HF resamples position embeddings
    mean_std: tuple[tuple[float, ...], tuple[float, ...]]  # the HF image processor's defaults


FAMILIES: dict[str, Family] = {
    "Dinov2Model": Family("vit_small_patch14_dinov2", _dinov2_kwargs, False, IMAGENET),
    "Dinov2WithRegistersModel": Family("vit_small_patch14_reg4_dinov2", _dinov2_kwargs, True, IMAGENET),
    "ViTModel": Family("vit_base_patch16_224", _vit_kwargs, False, HALF),
    "CLIPVisionModel": Family("vit_base_patch16_clip_224", _clip_kwargs, False, OPENAI_CLIP),
    "SiglipVisionModel": Family("vit_base_patch16_siglip_224", _siglip_kwargs, False, HALF),
}
# Multi-modal / projection wrappers whose ``vision_model`` is one of the above (the rest is dropped).
TOWERS = ("CLIPModel", "CLIPVisionModelWithProjection", "SiglipModel")


def supported_classes() -> list[str]:
    return [*FAMILIES, *TOWERS]


def _family_arch(family: Family, c: Any) -> str:
    # SwiGLU (DINOv2-g) needs the giant arch: its model_args carry the packed SwiGLU MLP class.
    return "vit_giant_patch14_dinov2" if getattr(c, "use_swiglu_ffn", False) else family.arch


# --- weights: HF state dict -> timm state dict ---------------------------------------------------------------

_PREFIX = re.compile(r"^(?:vision_model|dinov2|vit)\.")
_LAYER = re.compile(r"^(?:encoder\.)?layers?\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_BLOCK = [(re.compile(rf"^(?:{pat})$"), timm) for pat, timm in [
    (r"norm1|layernorm_before|layer_norm1", "norm1"),
    (r"norm2|layernorm_after|layer_norm2", "norm2"),
    (r"attention\.q_proj|attention\.attention\.query|self_attn\.q_proj", "q"),
    (r"attention\.k_proj|attention\.attention\.key|self_attn\.k_proj", "k"),
    (r"attention\.v_proj|attention\.attention\.value|self_attn\.v_proj", "v"),
    (r"attention\.o_proj|attention\.output\.dense|self_attn\.out_proj", "attn.proj"),
    (r"mlp\.fc1|intermediate\.dense|mlp\.weights_in", "mlp.fc1"),
    (r"mlp\.fc2|output\.dense|mlp\.weights_out|mlp\.down_proj", "mlp.fc2"),
    (r"mlp\.gate_proj", "gate"),
    (r"mlp\.up_proj", "up"),
    (r"layer_scale1", "ls1"),
    (r"layer_scale2", "ls2"),
]]
_TOP = [(re.compile(rf"^(?:{pat})$"), timm) for pat, timm in [
    (r"embeddings\.(?:cls_token|class_embedding)", "cls_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.(?:position_embeddings|position_embedding\.weight)", "pos_embed"),
    (r"embeddings\.(?:patch_embeddings\.projection|patch_embedding)\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"pre_layrnorm\.(weight|bias)", r"norm_pre.\1"),
    (r"(?:layernorm|post_layernorm)\.(weight|bias)", r"norm.\1"),
    (r"head\.probe", "attn_pool.latent"),
    (r"head\.attention\.in_proj_(weight|bias)", r"attn_pool.in_proj.\1"),
    (r"head\.attention\.out_proj\.(weight|bias)", r"attn_pool.proj.\1"),
    (r"head\.layernorm\.(weight|bias)", r"attn_pool.norm.\1"),
    (r"head\.mlp\.(fc1|fc2)\.(weight|bias)", r"attn_pool.mlp.\1.\2"),
]]


def _rename(key: str) -> str | None:
    m = _LAYER.match(key)
    if m:
        i, name, kind = m.groups()
        for pat, timm in _BLOCK:
            if pat.match(name):
                return f"blocks.{i}.{timm}.{'gamma' if kind == 'lambda1' else kind}"
        return None
    for pat, timm in _TOP:
        if pat.match(key):
            return pat.sub(timm, key)
    return None


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a HF DINOv2 / ViT / CLIP / SigLIP vision state dict onto ``model`` (the timm ViT from its config).

    Like timm's own filters it reads the target's shapes: the layout differences between families (CLIP's
    flat class embedding, ``nn.Embedding`` positions, fused q|k|v, SigLIP's packed MAP in-projection,
    registers' class position) are resolved here, the names by the tables above.
    """
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        key = _PREFIX.sub("", key)
        if DROPPED.fullmatch(key):
            continue
        new = _rename(key)
        if new is None:
            unknown.append(key)
            continue
        head, _, leaf = new.rpartition(".")
        head, _, part = head.rpartition(".")
        if part in ("q", "k", "v", "gate", "up"):  # fused below: blocks.i.attn.qkv / blocks.i.mlp.fc1
            fused = "attn.qkv" if part in ("q", "k", "v") else "mlp.fc1"
            parts.setdefault(f"{head}.{fused}.{leaf}", {})[part] = value
        else:
            out[new] = value
    if unknown:
        raise UnsupportedModelError(f"unexpected Hugging Face weights {unknown[:4]}; supported: {supported_classes()}")
    for new, p in parts.items():
        order = ("q", "k", "v") if new.split(".")[-2] == "qkv" else ("gate", "up")
        out[new] = torch.cat([p[k] for k in order])
    own = model.state_dict()
    dim = own["pos_embed"].shape[-1]
    for name in ("attn_pool.in_proj.weight", "attn_pool.in_proj.bias"):  # MultiheadAttention [q; k; v]
        if name in out:
            w = out.pop(name)
            leaf = name.rsplit(".", 1)[1]
            out[f"attn_pool.q.{leaf}"], out[f"attn_pool.kv.{leaf}"] = w[:dim], w[dim:]
    pos = out["pos_embed"].reshape(1, -1, dim)
    cls = out.get("cls_token")
    if cls is not None:
        cls = cls.reshape(1, 1, dim)
        if pos.shape[1] == own["pos_embed"].shape[1] + 1:  # no_embed_class: class position joins the token
            cls, pos = cls + pos[:, :1], pos[:, 1:]
        out["cls_token"] = cls
    out["pos_embed"] = pos
    return out


# --- public entry points ----------------------------------------------------------------------------------------

def is_hf_model(model: Any) -> bool:
    """True for a ``transformers.PreTrainedModel``, without importing transformers (if its modeling code is not
    loaded, no such model can exist)."""
    mu = sys.modules.get("transformers.modeling_utils")
    return mu is not None and isinstance(model, mu.PreTrainedModel)


def _tower(model: nn.Module) -> tuple[nn.Module, Family]:
    name = type(model).__name__
    if name in TOWERS:
        model = model.vision_model
        name = type(model).__name__
    if name not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported Hugging Face model {type(model).__name__}; supported: {', '.join(supported_classes())}"
        )
    return model, FAMILIES[name]


def to_timm(model: nn.Module, spec: str | None = None,
            mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> nn.Module:
    """The timm ``VisionTransformer`` equal to a HF vision backbone, with ``adala_config`` set.

    ``spec`` is recorded as the teacher (default ``hf:<name_or_path>``, or ``hf:<ClassName>`` for a model built
    in memory); ``mean_std`` overrides the family's image-processor defaults. A HF model running adala's linear
    attention gives the timm student with the same kinds (same outputs), not a softmax model.
    """
    outer = model
    tower, family = _tower(model)
    c = tower.config
    kwargs = family.kwargs(c)
    arch = _family_arch(family, c)
    eps = float(c.layer_norm_eps)
    vit = build_backbone({"arch": arch, "timm_kwargs": kwargs, "pos_embed_antialias": family.antialias,
                          "layer_norm_eps": eps})
    sd = checkpoint_filter_fn(tower.state_dict(), vit)
    try:
        vit.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:])[:300]
        raise UnsupportedModelError(f"{type(tower).__name__} does not map onto timm {arch}: {detail}") from None
    ref = next(tower.parameters())
    vit.to(device=ref.device, dtype=ref.dtype).train(outer.training)
    name = getattr(outer, "name_or_path", "") or type(outer).__name__
    cfg = teacher_config(arch, kwargs, spec or f"hf:{name}", vit, family.antialias)
    mean, std = mean_std or family.mean_std
    cfg.update(mean=[float(v) for v in mean], std=[float(v) for v in std], layer_norm_eps=eps)
    if cfg["img_size"] % cfg["patch_size"]:
        cfg["img_size"] = _pair(c.image_size)[0]
    set_config(vit, cfg)
    kinds = hf_attention.kinds_of(tower)
    if any(k != "softmax" for k in kinds):
        # lazy: cycle: surgery imports this module
        from .surgery import linearize_blocks

        vit = linearize_blocks(vit, kinds, inplace=True)
    return vit


from_hf = to_timm  # the name this conversion had before HF models kept their class under linearize


def _processor_mean_std(name: str, local: bool) -> tuple[Any, Any] | None:
    """image_mean/image_std from the repo's preprocessor_config.json, when it has one."""
    try:
        if local:
            path = Path(name) / "preprocessor_config.json"
        else:
            # lazy: optional dependency: transformers (seconds to import)
            from transformers.utils import cached_file

            path = cached_file(name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        if path is None or not Path(path).is_file():
            return None
        pp = json.loads(Path(path).read_text())
        mean, std = pp.get("image_mean"), pp.get("image_std")
        return (mean, std) if isinstance(mean, list) and isinstance(std, list) else None
    except Exception:  # optional metadata: fall back to the family's defaults
        return None


def load_hf(name: str, pretrained: bool = True, **options: Any) -> nn.Module:
    """``hf:NAME`` teachers: a hub id or a ``save_pretrained`` directory, through ``AutoModel``, then ``to_timm``."""
    if options:
        raise ConfigError(f"hf:{name} takes no timm options (got {sorted(options)})")
    path = Path(name).expanduser()
    local = path.is_dir()
    if local and not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json (expected a directory written by save_pretrained)")
    if not local and (name.startswith((".", "/", "~")) or path.exists()):
        raise CheckpointError(f"hf:{name}: no such directory")
    # lazy: optional dependency: transformers (seconds to import)
    import transformers

    from .teachers import _offline_unless_reachable

    source = str(path) if local else name
    offline = False
    try:
        with _offline_unless_reachable(not local):
            # lazy: optional dependency: transformers (seconds to import)
            import huggingface_hub.constants as hf_constants

            offline = bool(hf_constants.HF_HUB_OFFLINE)
            if pretrained:
                model = transformers.AutoModel.from_pretrained(source, dtype=torch.float32)
            else:
                model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(source))
            stats = _processor_mean_std(source, local)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if local:
            raise CheckpointError(f"hf:{name}: transformers cannot load it ({first})") from None
        if not offline and "not a valid model identifier" in str(e):
            raise UnknownTeacherError(f"hf:{name}: no such model on the Hugging Face hub") from None
        raise OfflineError(f"could not fetch hf:{name} ({first}); check the network or pass a local "
                           "save_pretrained directory as hf:/path") from None
    except (ValueError, KeyError) as e:  # unknown model_type / config class
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"hf:{name}: transformers cannot build it ({first})") from None
    return to_timm(model.eval(), spec=f"hf:{name}", mean_std=stats)


# --- timm student -> HF layout ------------------------------------------------------------------------------------

def to_hf_state_dict(vit: nn.Module, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``checkpoint_filter_fn``: ``vit``'s tensors under the names and shapes of the HF state dict
    ``like``. Tensors timm has no counterpart for (``DROPPED``) keep ``like``'s values; a folded class position
    (registers) is set to zero, since timm's ``cls_token`` already holds the sum."""
    own = vit.state_dict()
    dim = own["pos_embed"].shape[-1]
    out: dict[str, torch.Tensor] = {}
    for key, ref in like.items():
        short = _PREFIX.sub("", key)
        if DROPPED.fullmatch(short):
            out[key] = ref
            continue
        new = _rename(short)
        if new is None:
            raise UnsupportedModelError(f"Hugging Face weight {key!r} has no timm counterpart")
        head, _, leaf = new.rpartition(".")
        block, _, part = head.rpartition(".")
        if part in ("q", "k", "v"):
            t = own[f"{block}.attn.qkv.{leaf}"].chunk(3)["qkv".index(part)]
        elif part in ("gate", "up"):
            t = own[f"{block}.mlp.fc1.{leaf}"].chunk(2)[part == "up"]
        elif head == "attn_pool.in_proj":
            t = torch.cat([own[f"attn_pool.q.{leaf}"], own[f"attn_pool.kv.{leaf}"]])
        elif new == "pos_embed" and ref.numel() == own[new].numel() + dim:
            t = torch.cat([own[new].new_zeros(1, 1, dim), own[new]], dim=1)
        else:
            t = own[new]
        if t.numel() != ref.numel():
            raise UnsupportedModelError(f"{key}: the student has {tuple(t.shape)}, the Hugging Face model "
                                        f"{tuple(ref.shape)}; pass like= with the teacher's architecture")
        out[key] = t.detach().reshape(ref.shape).to(ref.dtype).clone()
    return out


def hf_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """A HF vision model's tokens in timm's ``forward_features`` meaning (after the final norm; CLIP normalises
    only its pooled token, so its post-layernorm is applied here)."""
    tower, _ = _tower(model)
    out = tower(pixel_values=pixel_values, interpolate_pos_encoding=True) if type(tower).__name__ in (
        "ViTModel", "CLIPVisionModel", "SiglipVisionModel") else tower(pixel_values=pixel_values)
    tokens = out.last_hidden_state
    return tower.post_layernorm(tokens) if type(tower).__name__ == "CLIPVisionModel" else tokens


def _like_config(like: Any, teacher: str | None) -> Any:
    """The HF vision config to save into: from a model, a config, ``hf:NAME``/a directory, or the teacher."""
    if like is None:
        if not (teacher or "").startswith("hf:"):
            raise ConfigError(f"save_hf needs like= (a Hugging Face model, config or name of the teacher's "
                              f"architecture): the teacher {teacher!r} is not a Hugging Face model")
        like = teacher
    if isinstance(like, (str, Path)):
        import transformers  # lazy: optional dependency

        name = str(like).removeprefix("hf:")
        try:
            like = transformers.AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"save_hf: cannot read the Hugging Face config of {name} ({first})") from None
    config = getattr(like, "config", like)
    config = copy.deepcopy(getattr(config, "vision_config", None) or config)  # CLIP / SigLIP: the vision tower
    if hasattr(config, "attn_implementation"):  # a linearized like= model: the student's kind decides
        del config.attn_implementation
    config._attn_implementation = None
    return config


def save_hf(student: nn.Module, out_dir: str | os.PathLike, like: Any = None,
            tolerance: float = 1e-4) -> Path:
    """Write a timm student (or teacher) as a ``save_pretrained`` directory of the equivalent HF vision model.

    ``AutoModel.from_pretrained(out_dir)`` then rebuilds the HF class (DINOv2, ViT, CLIP/SigLIP vision) running
    the student's attention (``adala-linear-elu``...; adala must be imported), so a transformers pipeline or a
    DPT/Mask2Former head can use the trained student. ``like`` gives the HF architecture (default: the
    ``hf:`` teacher recorded in the student's config). Before writing, one random image runs through both models;
    a max abs difference above ``tolerance`` (relative to the token scale) raises instead of saving a wrong model.
    Task heads are not saved (only the backbone); hybrids (some blocks softmax) go in timm layout (``save_model``).
    """
    import transformers  # lazy: optional dependency

    # lazy: cycle: surgery imports this module
    from .surgery import backbone_of, block_kinds

    cfg = get_config(student)
    vit = backbone_of(student)
    kinds = sorted(set(block_kinds(student)))
    if len(kinds) != 1 or (kinds[0] != "softmax" and kinds[0] not in hf_attention.KINDS):
        raise UnsupportedModelError(
            f"Hugging Face layout holds one attention for every block, one of softmax, "
            f"{', '.join(hf_attention.KINDS)}; this student has {kinds}: save it with adala.save_model")
    options = (cfg.get("attention") or {}).get("options", {})
    if kinds[0] != "softmax":
        hf_attention._check(kinds[0], options)
    config = _like_config(like, cfg.get("teacher"))
    if type(config).__name__ not in [n.replace("Model", "Config") for n in FAMILIES]:
        raise UnsupportedModelError(f"save_hf writes {', '.join(FAMILIES)}; like= gives {type(config).__name__}")
    model = transformers.AutoModel.from_config(config).eval()
    model.load_state_dict(to_hf_state_dict(vit, model.state_dict()), strict=True)
    if kinds[0] != "softmax":
        hf_attention.set_attention(model, kinds[0])
    size = _pair(config.image_size)
    x = torch.randn(1, int(config.num_channels), *size, generator=torch.Generator().manual_seed(0))
    was_training = vit.training
    vit.eval()
    with torch.no_grad():
        ref = vit.forward_features(x.to(next(vit.parameters())))
        err = (hf_tokens(model, x).to(ref) - ref).abs().max().item()
    vit.train(was_training)
    if not err <= tolerance * max(1.0, ref.abs().max().item()):
        raise CheckpointError(f"save_hf: the Hugging Face model differs from the student by {err:.3g} "
                              f"(tolerance {tolerance}); is like= the teacher's architecture?")
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
