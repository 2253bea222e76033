"""What the API's ``teacher=`` / ``model=`` arguments resolve to, and whether a student fits its teacher.

Every stage, ``evaluate`` and the benchmarks accept a module or a spec/directory; these turn either into a
module, and check the pair (same depth, width, heads, patch size) before any work.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from torch import nn

from ..checks import check_multiple
from ..errors import ConfigError, UnsupportedModelError
from .config import get_config
from .families import family_of
from .io import load_model
from .surgery import attention_modules, backbone_of
from .teachers import load_teacher


def as_teacher(teacher: nn.Module | str | os.PathLike) -> nn.Module:
    """A frozen eval teacher from a module or a teacher spec (``adala.load_teacher`` forms)."""
    if isinstance(teacher, nn.Module):
        model = teacher
    elif isinstance(teacher, (str, os.PathLike)):
        model = load_teacher(str(teacher))
    else:
        raise ConfigError(f"teacher must be a module or a teacher spec, got {type(teacher).__name__}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def as_model(model: nn.Module | str | os.PathLike, what: str = "model", options: dict | None = None) -> nn.Module:
    """A module as given, or one loaded from a directory saved by adala (with ``options``: attention options
    changed on loading, see ``load_model``)."""
    if isinstance(model, nn.Module):
        if options:
            raise ConfigError(f"attention options apply when loading a {what} from its directory, not to a module "
                              "(set them with linearize)")
        get_config(model)
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, options=options)
    raise ConfigError(f"{what} must be a module or a model directory, got {type(model).__name__}")


def trainable_copy(model: nn.Module | str | os.PathLike, what: str = "model") -> nn.Module:
    """A module to train: stages never modify a module they were given, so that is deep-copied (with its
    adala_config); a directory is simply loaded."""
    out = copy.deepcopy(model) if isinstance(model, nn.Module) else None
    out = as_model(model if out is None else out, what)
    for p in out.parameters():
        p.requires_grad_(True)
    return out.train()


def patch_size(model: nn.Module) -> int:
    cfg = getattr(model, "adala_config", None) or {}
    if cfg.get("patch_size"):
        return int(cfg["patch_size"])
    vit = backbone_of(model)
    return family_of(vit).patch_size(vit)


def check_img_size(model: nn.Module, img_size: Any, key: str = "img_size") -> int:
    """``img_size`` when it is a positive multiple of ``model``'s patch size (one-line error otherwise)."""
    return check_multiple(img_size, patch_size(model), key)


def check_pair(teacher: nn.Module, student: nn.Module) -> None:
    """Same depth, width, heads and patch size: the student must be a re-attentioned copy of the teacher."""
    t, s = backbone_of(teacher), backbone_of(student)
    tf, sf = family_of(t), family_of(s)
    ta, sa = attention_modules(t), attention_modules(s)
    checks = [
        ("family", tf.name, sf.name),
        ("blocks", len(ta), len(sa)),
        ("embed dim", tf.embed_dim(t), sf.embed_dim(s)),
        ("heads", ta[0].num_heads, sa[0].num_heads),
        ("patch size", patch_size(t), patch_size(s)),
        ("prefix tokens", tf.num_prefix_tokens(t), sf.num_prefix_tokens(s)),
    ]
    for name, tv, sv in checks:
        if tv != sv:
            raise UnsupportedModelError(
                f"student does not match the teacher: {name} {sv} vs teacher {tv} (linearize this teacher)"
            )
