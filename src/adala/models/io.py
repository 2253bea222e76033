"""save_model / load_model: a directory with ``model.safetensors`` + ``adala.json`` (HF-style)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import CheckpointError, ConfigError
from ..files import atomic_write_text
from .config import FORMAT, build_backbone, get_config, set_config, validate_config
from .heads import TASK_BUILDERS
from .surgery import linearize_blocks
from .weights import load_tensors, save_tensors, sha256_file

WEIGHTS = "model.safetensors"
CONFIG = "adala.json"



def build_model(cfg: dict[str, Any]) -> nn.Module:
    """Architecture (teacher → attention swap → task head) from a config, weights not loaded."""
    validate_config(cfg, "model config")
    model = build_backbone(cfg)
    set_config(model, {**cfg, "attention": None, "task": None})
    att = cfg.get("attention")
    if att:
        model = linearize_blocks(model, att["blocks"], att.get("options", {}), inplace=True)
    task = cfg.get("task")
    if task:
        if task["type"] not in TASK_BUILDERS:
            raise CheckpointError(f"unknown task head {task['type']!r} in config")
        model = TASK_BUILDERS[task["type"]](model, task)
    return set_config(model, cfg)

def _version() -> str:
    return __version__


def save_model(model: nn.Module, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write weights and the config that rebuilds them. Weights first, config last: a directory
    with an ``adala.json`` is always complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**get_config(model), "adala_version": _version(), **(extra or {})}
    sd = {k: v for k, v in model.state_dict().items()}
    digest = save_tensors(sd, out / WEIGHTS, metadata={"adala_config": cfg})
    cfg["sha256"] = digest
    atomic_write_text(out / CONFIG, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model directory not found: {p}")
    if not (p / CONFIG).is_file():
        raise CheckpointError(f"{p} has no {CONFIG}: not a model saved by adala")
    try:
        cfg = json.loads((p / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p / CONFIG} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or "arch" not in cfg:
        raise CheckpointError(f"{p / CONFIG} is not an adala model config (format {FORMAT})")
    return validate_config(cfg, str(p / CONFIG))


def state_mismatch(model: nn.Module, sd: dict[str, torch.Tensor]) -> str | None:
    """One line summarising how ``sd`` does not fit ``model`` (counts of missing/unexpected/mis-shaped tensors
    and the first names), or None when it fits exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)):
        if names:
            first = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            parts.append(f"{len(names)} {label} ({first})")
    if shapes:
        k = shapes[0]
        parts.append(f"e.g. {k} is {list(sd[k].shape)} in the file, {list(own[k].shape)} in the model")
    return "; ".join(parts)


def load_state_exact(model: nn.Module, sd: dict[str, torch.Tensor], source: str | os.PathLike,
                     arch: str | None = None) -> None:
    """``load_state_dict(strict=True)``, but weights of another architecture are summarised in one line
    (:func:`state_mismatch`) instead of torch's multi-line RuntimeError, which for a whole ViT runs to hundreds
    of lines."""
    mismatch = state_mismatch(model, sd)
    if mismatch:
        target = f"{arch!r}" if arch else f"a {type(model).__name__}"
        raise CheckpointError(f"{source} holds weights of another architecture, not {target}: {mismatch}")
    model.load_state_dict(sd, strict=True)


def with_options(cfg: dict[str, Any], options: dict[str, Any], source: str | os.PathLike) -> dict[str, Any]:
    """``cfg`` with its attention options updated by ``options``. Why: the options that carry no weights (for
    ``agent``: ``agents``, ``kmeans``, ``kmeans_points``) shape the computation only, so a trained student can be
    scored with other values (more agents, k-means on more patches) without training it again."""
    att = cfg.get("attention")
    if not att:
        raise ConfigError(f"{source} has no linear attention: attention options do not apply to it")
    return {**cfg, "attention": {**att, "options": {**att.get("options", {}), **options}}}


def _rebuilt(cfg: dict[str, Any], options: dict[str, Any], sd: dict[str, torch.Tensor], what: str,
             when: str) -> nn.Module:
    """A fresh model from ``cfg`` with attention ``options`` changed, refused in one line if they would change
    the weights ``sd`` fits (only options that carry no weights may differ)."""
    model = build_model(with_options(cfg, options, what))
    mismatch = state_mismatch(model, sd)
    if mismatch:
        raise ConfigError(f"attention options {sorted(options)} change the weights of {what}, so they cannot be set "
                          f"{when} ({mismatch})")
    return model


def with_attention_options(model: nn.Module, options: dict[str, Any] | None, what: str = "the student") -> nn.Module:
    """``model`` computing with other weight-free attention ``options``: a module rebuilt from its config with the
    options changed, holding the very same parameter and buffer objects (not copies), so training it trains
    ``model``, which keeps its own options and config for saving. ``model`` itself when there are none.

    Why: a stage can train under the conditions the student meets where it is used. ``agent`` with 64 agents
    puts 4 patches on each agent at 224² and 144 at 1344²; training at 224² with ``agents=4`` (16 agents, 16
    patches each) makes the conv and projections carry what coarse agents miss, as they must at 448² and up
    (README, reference measurement)."""
    if not options:
        return model
    if not isinstance(options, dict):
        raise ConfigError(f"train options must be a mapping of attention options, got {options!r}")
    sd = model.state_dict(keep_vars=True)
    view = _rebuilt(get_config(model), options, sd, what, "while training")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    view.load_state_dict(sd, strict=True, assign=True)  # assign: the same Parameter objects, not copies
    for name, p in view.named_parameters():  # assign copies the view's fresh requires_grad onto them
        p.requires_grad_(flags[name])
    return view.train(model.training)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               options: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild exactly the saved model (eval mode) from a directory, with no network and no pickle.

    ``options``: attention options to change on the way in (see :func:`with_options`); an option that changes
    the weights (a ``dwc`` kernel, ``temperature``) is refused in one line. The model's config records them."""
    p = Path(path)
    cfg = read_config(p)
    sd = load_tensors(p / WEIGHTS)
    if cfg.get("sha256") and (p / (WEIGHTS + ".sha256")).is_file() is False:
        if sha256_file(p / WEIGHTS) != cfg["sha256"]:
            raise CheckpointError(f"{p / WEIGHTS} is corrupt (checksum mismatch)")
    if options:  # the saved weights fit the saved options, so a mismatch is the new options' doing
        model = _rebuilt(cfg, options, sd, str(p), "when loading it")
        model.load_state_dict(sd, strict=True)  # checked by _rebuilt: no second state_mismatch pass
    else:
        model = build_model(cfg)
        load_state_exact(model, sd, p / WEIGHTS, cfg.get("arch"))
    return model.to(device).eval()
