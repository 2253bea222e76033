"""Child process for CPU peak memory: build one model, run one forward, print peak RSS growth as JSON.

A fresh process per case, so each peak starts from a clean allocator and nothing another case
allocated is counted; a warm-up forward at a tiny size keeps library start-up out of the number.
Reads the recipe (``{"source": {"teacher", "teacher_kwargs"} | {"model_dir"}, "attention",
"options", "keep_softmax", "resolution", "batch_size", "dtype", "threads"}``) as JSON on stdin. With
``"train_stage"`` (and ``"teacher_source"``, built the same way) the measured call is one training step of that
stage (``train_steps.TrainStep``) instead of a forward; the warm-up is then a step at the tiny size, so the
optimizer state exists before the measurement and only the step's own memory is counted.
"""

from __future__ import annotations

import gc
import json
import resource
import sys

import torch

from ..attention.ops import set_compiled_feature_maps
from ..models import linearize, load_model, load_teacher
from ..models.surgery import backbone_of
from ..runtime import keep_freed_memory
from .measure import precision, proc_status_kb, reset_peak_rss
from .train_steps import TrainStep


def build(recipe: dict) -> torch.nn.Module:
    src = recipe["source"]
    if "model_dir" in src:
        model = load_model(src["model_dir"])
    else:
        model = load_teacher(src["teacher"], **src.get("teacher_kwargs", {}))
    if recipe.get("attention"):
        model = linearize(model, recipe["attention"], keep_softmax=recipe.get("keep_softmax"),
                          **recipe.get("options", {}))
    return model.eval()


def main() -> int:
    recipe = json.loads(sys.stdin.read())
    if recipe.get("keep_freed_memory"):  # the allocator setting the timed run used

        keep_freed_memory()
    if recipe.get("threads"):
        torch.set_num_threads(int(recipe["threads"]))
    if recipe.get("compile_feature_maps"):
        set_compiled_feature_maps(True)
    model = build(recipe)
    vit = backbone_of(model)
    s = int(recipe["resolution"])
    x = torch.randn(int(recipe["batch_size"]), 3, s, s, generator=torch.Generator().manual_seed(0))
    device = torch.device("cpu")
    dtype = recipe.get("dtype", "fp32")
    p = vit.patch_embed.patch_size[0]
    tiny = torch.zeros(1, 3, 2 * p, 2 * p)
    if recipe.get("train_stage"):
        step = TrainStep(recipe["train_stage"], build({"source": recipe["teacher_source"]}), model.train(), device,
                         dtype)

        def call(inp: torch.Tensor) -> None:
            step(inp)
            step.opt.zero_grad(set_to_none=True)  # gradients go with the step that made them
    else:
        def call(inp: torch.Tensor) -> None:
            with torch.inference_mode(), precision(device, dtype):
                vit.forward_features(inp)

    # one call at a tiny size first: library initialisation (thread pools, BLAS/oneDNN code pages, the
    # optimizer's state) would otherwise be counted as this model's memory; it retains little of its own
    call(tiny)
    gc.collect()
    before = proc_status_kb("VmRSS")
    if before is not None and reset_peak_rss():
        call(x)
        peak = proc_status_kb("VmHWM")
        out = {"peak_bytes": max(0, peak - before) * 1024, "method": "VmHWM-VmRSS"}
    else:  # no /proc: a lower bound, since ru_maxrss also holds the loading peak
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call(x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {"peak_bytes": max(0, after - before) * 1024, "method": "ru_maxrss growth (lower bound)"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
