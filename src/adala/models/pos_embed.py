"""Position-embedding resampling without antialiasing, as the original DINOv2 code does.

timm's dynamic-size path resamples with ``antialias=True``; DINOv2 (and the embedded ONNX graph)
interpolates bicubic without it, which moves 224² features by up to ~2. This per-instance override
keeps the model a plain timm ``VisionTransformer`` (isinstance, forward_features, state dict) and
survives ``copy.deepcopy`` (bound methods are rebound to the copy).
"""

from __future__ import annotations

import types

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer


def _pos_embed_no_antialias(self: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    if not (self.dynamic_img_size and self.pos_embed is not None and x.ndim == 4):
        return VisionTransformer._pos_embed(self, x)
    b, h, w, c = x.shape
    pos_embed = resample_abs_pos_embed(
        self.pos_embed, new_size=(h, w), old_size=self.patch_embed.grid_size,
        num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens, antialias=False,
    )
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


def disable_pos_embed_antialias(model: VisionTransformer) -> VisionTransformer:
    model._pos_embed = types.MethodType(_pos_embed_no_antialias, model)
    return model
