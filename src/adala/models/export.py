"""ONNX export of ``forward_features`` that is checked against PyTorch before anyone deploys it.

A graph that runs but computes something else is the worst outcome for a deployed backbone, so
``export_onnx`` never trusts the exporter: after writing the file it runs it in onnxruntime on the
same random input as the PyTorch model, at every size in ``check_sizes``, and raises ``ExportError``
(the file is deleted) when the largest absolute difference exceeds ``atol``. fp32 rounding over a
ViT-S/14 stays around 1e-5; a graph that lost data flow is off by O(1).

Sizes. With ``dynamic=True`` height, width (and batch) are graph inputs: the position embedding is
resampled inside the graph (an ONNX bicubic ``Resize``) from the pretrained grid, so one file serves
every multiple of the patch size. Without it the graph is fixed to ``img_size`` (batch stays
dynamic) and that size's position embedding is baked in as a constant. Refused for ``dynamic``:
kinds whose forward branches on sizes as Python numbers (``focused``, ``nystrom``, ``agent``: export them
per size) and models resampled with antialiasing (timm's default outside DINOv2), which the exporter
cannot express. ``window-hybrid`` cannot be exported at all.

Uses the TorchScript-based exporter (``dynamo=False``), which needs no extra packages; the
attention kernels and the position-embedding cache step aside under it (``adala.tracing``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ExportCheckError, ExportError
from .pos_embed import baked_pos_embed
from .surgery import backbone_of, block_kinds

INPUT, OUTPUT = "pixel_values", "features"
DEFAULT_ATOL = 1e-3
CHECK_BATCH = 2  # checks run at batch 2, so the dynamic batch axis is exercised too

# Kinds the exporter cannot turn into an ONNX graph, and why (one line each).
NOT_EXPORTABLE = {
    "window-hybrid": "the TorchScript exporter cannot convert its halo gathering (Tensor.unfold of a padded grid)",
}
# Kinds whose forward branches on sizes as Python numbers: the graph is only right at the traced size.
STATIC_ONLY = {
    "focused": "its depthwise convolution reshapes by the patch grid, known only as Python integers",
    "nystrom": "its landmark segments and its exact-softmax fallback for short sequences follow the token count",
    "agent": "its agent pooling and prefix split follow the patch grid, known only as Python integers",
}


@dataclass
class ExportReport:
    """What was written and how far onnxruntime is from PyTorch at each checked size."""

    path: Path
    opset: int
    dynamic: bool
    img_size: int
    errors: dict[int, float] = field(default_factory=dict)
    atol: float = DEFAULT_ATOL

    @property
    def max_abs_error(self) -> float:
        return max(self.errors.values()) if self.errors else float("nan")

    def summary(self) -> str:
        sizes = ", ".join(f"{s}px {e:.2e}" for s, e in self.errors.items())
        mode = "dynamic H/W" if self.dynamic else f"fixed {self.img_size}px"
        return f"wrote {self.path} (opset {self.opset}, {mode}); max |onnxruntime - torch|: {sizes} (atol {self.atol})"


class _Features(nn.Module):
    """``forward_features`` as ``forward``: what the exporter traces."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixel_values)


def check_exportable(model: nn.Module, dynamic: bool) -> None:
    """One-line refusal for kinds (or models) that cannot give a correct graph in this mode."""
    vit = backbone_of(model)
    kinds = set(block_kinds(model))
    for kind in sorted(kinds):
        if kind in NOT_EXPORTABLE:
            raise ExportError(f"{kind} attention cannot be exported to ONNX: {NOT_EXPORTABLE[kind]}")
        if dynamic and kind in STATIC_ONLY:
            raise ExportError(f"{kind} attention cannot be exported with dynamic sizes ({STATIC_ONLY[kind]}); "
                              "export without --dynamic, once per image size")
    if dynamic and any(getattr(m, "dwc_grid", 0) for m in model.modules()):
        raise ExportError("dwc_grid spreads the dwc conv by a dilation that follows the patch grid, known only as "
                          "Python integers; export without --dynamic, once per image size")
    if dynamic and not getattr(vit, "dynamic_img_size", False):
        raise ExportError("this model was built for one image size (dynamic_img_size=False); export without --dynamic")
    if dynamic and getattr(vit, "pos_embed_antialias", True):
        raise ExportError("this model resamples its position embeddings with antialiasing, which the ONNX exporter "
                          "cannot express; export without --dynamic (one file per image size)")


def _resamples(vit: nn.Module) -> bool:
    """adala's position-embedding resampling is installed (``models.pos_embed``), so it can be baked in."""
    return bool(getattr(vit, "dynamic_img_size", False) and hasattr(vit, "pos_embed_antialias"))


def _patch(vit: nn.Module) -> int:
    return int(vit.patch_embed.patch_size[0])


def default_img_size(model: nn.Module) -> int:
    """The model's native size (the pretrained position-embedding grid times the patch size)."""
    vit = backbone_of(model)
    return int(vit.patch_embed.img_size[0])


def _validate_sizes(vit: nn.Module, sizes: list[int]) -> None:
    p = _patch(vit)
    bad = [s for s in sizes if s <= 0 or s % p]
    if bad:
        raise ConfigError(f"image sizes {sorted(set(bad))} are not positive multiples of the patch size {p}")


def _export_kwargs(dynamic: bool) -> dict:
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    kw = {"input_names": [INPUT], "output_names": [OUTPUT],
          "dynamic_axes": {INPUT: axes, OUTPUT: {0: "batch", 1: "tokens"} if dynamic else {0: "batch"}}}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kw["dynamo"] = False  # the TorchScript exporter: no onnxscript needed
    return kw


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _session(path: Path):
    try:
        # lazy: optional dependency: onnx/onnxruntime
        import onnxruntime as ort
    except ImportError:
        raise ExportError("checking the export needs onnxruntime: pip install onnxruntime (or adala[export])") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def max_abs_error(session, model: nn.Module, size: int, batch: int = CHECK_BATCH, seed: int = 0) -> float:
    """Largest |onnxruntime − PyTorch| of ``forward_features`` on one normalised-image-like random batch."""
    g = torch.Generator().manual_seed(seed + size)
    x = torch.randn(batch, 3, size, size, generator=g)
    with torch.no_grad():
        ref = model.forward_features(x).float()
    got = torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])
    if got.shape != ref.shape:
        raise ExportError(f"onnxruntime returned shape {tuple(got.shape)} at {size}px, PyTorch {tuple(ref.shape)}")
    return float((got - ref).abs().max())


@contextlib.contextmanager
def _eval(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = 17,
    dynamic: bool = False,
    img_size: int | None = None,
    check_sizes: list[int] | None = None,
    atol: float = DEFAULT_ATOL,
) -> ExportReport:
    """Export ``model.forward_features`` (input ``pixel_values`` (B, 3, H, W), output ``features``
    (B, tokens, C)) to ``path`` and verify it in onnxruntime; returns the per-size errors.

    ``img_size`` (default: the model's native size) is the size traced, and the only size the graph
    accepts unless ``dynamic``. ``check_sizes`` defaults to ``[img_size]``, plus half of it when
    ``dynamic`` (all sizes must be multiples of the patch size). Raises ``ExportError`` and removes
    the file if onnxruntime cannot run it, ``ExportCheckError`` (CLI exit 1) if it differs from PyTorch
    by more than ``atol`` at any checked size. Refused up front with ``ExportError``: ``window-hybrid``
    in any mode; with ``dynamic``, ``focused``, ``nystrom`` and antialiased position embeddings (their
    fixed-size export is fine). Exported in eval mode; the model's train/eval mode is restored after.
    """
    vit = backbone_of(model)
    check_exportable(model, dynamic)
    size = int(img_size or default_img_size(model))
    if check_sizes is None:
        half = size // 2 // _patch(vit) * _patch(vit)
        check_sizes = [size, half] if dynamic and half > 0 else [size]
    check_sizes = [int(s) for s in check_sizes]
    _validate_sizes(vit, [size, *check_sizes])
    if not dynamic and any(s != size for s in check_sizes):
        raise ConfigError(f"a fixed-size export only runs at {size}px; pass dynamic=True to check {check_sizes}")
    if opset < 14:
        raise ConfigError(f"opset {opset} is too old (scaled_dot_product_attention needs 14 or later)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = ExportReport(out, opset, dynamic, size, atol=atol)
    with _eval(model):
        example = torch.zeros(1, 3, size, size)
        grid = size // _patch(vit)
        bake = baked_pos_embed(vit, grid, grid) if not dynamic and _resamples(vit) else contextlib.nullcontext()
        with torch.no_grad(), warnings.catch_warnings(), bake:
            warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic: the check below is the judge
            try:
                torch.onnx.export(_Features(model), (example,), str(out), opset_version=opset,
                                  **_export_kwargs(dynamic))
            except Exception as e:  # exporter internals raise many types; the user needs the first line
                out.unlink(missing_ok=True)
                raise ExportError(f"torch.onnx.export failed for {'/'.join(sorted(set(block_kinds(model))))} "
                                  f"attention: {_first_line(e)}") from None
        session = _session(out)
        for s in check_sizes:
            try:
                report.errors[s] = max_abs_error(session, model, s)
            except ExportError:
                out.unlink(missing_ok=True)
                raise
            except Exception as e:  # onnxruntime refuses to run the graph at this size
                out.unlink(missing_ok=True)
                raise ExportError(f"onnxruntime cannot run the exported graph at {s}px: {_first_line(e)}; "
                                  "the file was removed") from None
    worst = report.max_abs_error
    if not worst <= atol:  # also catches NaN
        out.unlink(missing_ok=True)
        raise ExportCheckError(f"exported graph differs from PyTorch by {worst:.3g} (> atol {atol:g}) at "
                          f"{max(report.errors, key=report.errors.get)}px; the file was removed")
    return report
