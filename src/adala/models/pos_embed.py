"""Position-embedding resampling for any input size: DINOv2's interpolation, computed once per size.

timm's dynamic-size path resamples with ``antialias=True``; DINOv2 (and the embedded ONNX graph)
interpolates bicubic without it, which moves 224² features by up to ~2, so the flag is kept per model.
timm also resamples on every forward, and torch's CUDA bicubic kernel is slow on a small grid with
many channels (9.3 ms of a 14 ms DINOv2-L forward at 504² on an H200, 5.4 ms at 1022²): without
autograd the result is cached per grid size, keyed on the parameter's storage and version, so an
in-place update, a load or a device move recomputes it. The per-instance override keeps the model a
plain timm ``VisionTransformer`` (isinstance, forward_features, state dict) and survives
``copy.deepcopy`` (bound methods are rebound to the copy).
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Iterator

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from ..tracing import is_tracing

MAX_CACHED_SIZES = 8
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BAKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def baked_pos_embed(model: VisionTransformer, h: int, w: int) -> Iterator[None]:
    """While active, a tracer sees the h×w grid's embedding as a constant instead of resampling ops.

    For fixed-size exports: the graph needs no ``Resize`` at all, and models resampled with
    antialiasing (which the TorchScript ONNX exporter cannot express) export at any size.
    """
    with torch.no_grad():
        pe = resample_abs_pos_embed(model.pos_embed, new_size=(h, w), old_size=model.patch_embed.grid_size,
                                    num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
                                    antialias=getattr(model, "pos_embed_antialias", True))
    _BAKED.setdefault(model, {})[(h, w)] = pe
    try:
        yield
    finally:
        _BAKED.get(model, {}).pop((h, w), None)


def resampled_pos_embed(model: VisionTransformer, h: int, w: int, antialias: bool) -> torch.Tensor:
    """``model.pos_embed`` resampled to an h×w patch grid; cached while no gradient needs it."""
    pe = model.pos_embed

    def compute() -> torch.Tensor:
        return resample_abs_pos_embed(pe, new_size=(h, w), old_size=model.patch_embed.grid_size,
                                      num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
                                      antialias=antialias)

    if is_tracing():
        baked = _BAKED.get(model, {}).get((int(h), int(w)))  # sizes are traced 0-d tensors here
        return baked if baked is not None else _resample_in_graph(model, h, w, antialias)
    if torch.is_grad_enabled() and pe.requires_grad:
        return compute()
    dev = pe.device.type
    key = (h, w, antialias, pe.device, pe.dtype, pe.data_ptr(), pe._version, torch.is_inference_mode_enabled(),
           torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev))
    cache = _CACHE.setdefault(model, {})
    got = cache.get(key)
    if got is None:
        if len(cache) >= MAX_CACHED_SIZES:
            cache.clear()
        got = cache[key] = compute()
    return got


def _resample_in_graph(model: VisionTransformer, h: int, w: int, antialias: bool) -> torch.Tensor:
    """The same resampling as a graph of ops on the traced sizes, never cached nor skipped.

    timm returns the embedding unchanged when the grid already matches; a tracer then records no
    resize at all and an exported "dynamic" graph only runs at the traced size. Bicubic at scale 1
    reproduces the grid exactly (half-pixel centres fall on the samples), so always resizing costs
    nothing in accuracy. Same math as ``resample_abs_pos_embed``: prefix rows kept, grid resized in fp32.
    """
    pe = model.pos_embed
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    gh, gw = model.patch_embed.grid_size
    grid = pe[:, prefix:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias,
                                           align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pe.shape[-1]).to(pe.dtype)
    return torch.cat([pe[:, :prefix], grid], dim=1) if prefix else grid


def _pos_embed(self: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    if not (self.dynamic_img_size and self.pos_embed is not None and x.ndim == 4):
        return VisionTransformer._pos_embed(self, x)
    b, h, w, c = x.shape
    pos_embed = resampled_pos_embed(self, h, w, self.pos_embed_antialias)
    x = x.view(b, -1, c)
    prefix = []
    if self.cls_token is not None:
        prefix.append(self.cls_token.expand(b, -1, -1))
    if self.reg_token is not None:
        prefix.append(self.reg_token.expand(b, -1, -1))
    if self.no_embed_class:
        x = torch.cat(prefix + [x + pos_embed], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + pos_embed
    return self.pos_drop(x)


def use_cached_pos_embed(model: VisionTransformer, antialias: bool = True) -> VisionTransformer:
    """Install the cached resampling on ``model``; ``antialias=False`` is DINOv2's interpolation.
    Subclasses with their own token layout (DeiT's distillation token) keep timm's method as is."""
    if antialias and type(model)._pos_embed is not VisionTransformer._pos_embed:
        return model
    model.pos_embed_antialias = antialias
    model._pos_embed = types.MethodType(_pos_embed, model)
    return model
