"""The small JSON record that rebuilds a model with no network and no pickle.

It travels as ``model.adala_config`` on the module, as ``adala.json`` in a saved directory, and in
the safetensors header, so any of the three is enough to rebuild the architecture.
"""

from __future__ import annotations

import copy
from typing import Any

import timm
from torch import nn

from ..errors import CheckpointError, UnsupportedModelError
from .families import family_of

FORMAT = "adala-model/1"

def get_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "adala_config", None)
    if cfg is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} carries no adala_config; build it with adala.load_teacher/linearize"
        )
    return cfg


def set_config(model: nn.Module, cfg: dict[str, Any]) -> nn.Module:
    model.adala_config = copy.deepcopy(cfg)
    return model


def teacher_config(arch: str, timm_kwargs: dict, spec: str, model: nn.Module, antialias: bool) -> dict:
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    return {
        "format": FORMAT,
        "arch": arch,
        "timm_kwargs": dict(timm_kwargs),
        "teacher": spec,
        "pos_embed_antialias": antialias,
        "patch_size": int(model.patch_embed.patch_size[0]),
        "mean": list(pcfg.get("mean", (0.485, 0.456, 0.406))),
        "std": list(pcfg.get("std", (0.229, 0.224, 0.225))),
        "img_size": 224,
        "attention": None,
        "task": None,
    }


def build_backbone(cfg: dict[str, Any]) -> nn.Module:
    """The timm model a config describes, with random weights (the caller loads the real ones)."""
    try:
        model = timm.create_model(cfg["arch"], pretrained=False, **cfg.get("timm_kwargs", {}))
    except (KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"cannot build architecture {cfg.get('arch')!r}: {e}") from None
    family_of(model).install(model, cfg.get("pos_embed_antialias", True))
    if cfg.get("layer_norm_eps") is not None:  # e.g. HF ViT's 1e-12; kept out of timm kwargs to stay JSON
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = float(cfg["layer_norm_eps"])
    return model


_TYPES: dict[str, tuple[type, ...]] = {
    "arch": (str,), "timm_kwargs": (dict,), "teacher": (str,), "pos_embed_antialias": (bool,),
    "patch_size": (int, type(None)), "img_size": (int, type(None)), "mean": (list,), "std": (list,),
    "attention": (dict, type(None)), "task": (dict, type(None)), "layer_norm_eps": (int, float, type(None)),
}
_NAMES = {dict: "a mapping", list: "a list", str: "a string", bool: "true/false", int: "an integer",
          float: "a number", type(None): "null"}


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def validate_config(cfg: Any, where: str) -> dict[str, Any]:
    """Check the fields a config is rebuilt from, so a hand-edited or foreign ``adala.json`` fails in one
    line naming the field (``attention: must be a mapping or null, got a string``) instead of a TypeError
    deep inside the rebuild."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: the config must be a mapping, got {_kind(cfg)}")

    def bad(key: str, want: str, value: Any) -> CheckpointError:
        return CheckpointError(f"{where}: {key} must be {want}, got {_kind(value)} ({value!r:.60})")

    for key, types in _TYPES.items():
        if key in cfg and (not isinstance(cfg[key], types) or (isinstance(cfg[key], bool) and bool not in types)):
            raise bad(key, " or ".join(_NAMES[t] for t in types), cfg[key])
    if not cfg.get("arch"):
        raise CheckpointError(f"{where}: arch is missing")
    for key in ("mean", "std"):
        v = cfg.get(key)
        if v is not None and (len(v) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                      for x in v)):
            raise bad(key, "a list of 3 numbers", v)
    att = cfg.get("attention")
    if att is not None:
        blocks = att.get("blocks")
        if not isinstance(blocks, list) or not blocks or not all(isinstance(b, str) for b in blocks):
            raise bad("attention.blocks", "a non-empty list of attention kind names", blocks)
        if not isinstance(att.get("options", {}), dict):
            raise bad("attention.options", "a mapping", att.get("options"))
        if "kind" in att and not isinstance(att["kind"], str):
            raise bad("attention.kind", "a string", att["kind"])
    task = cfg.get("task")
    if task is not None and not isinstance(task.get("type"), str):
        raise bad("task.type", "a string", task.get("type"))
    return cfg
