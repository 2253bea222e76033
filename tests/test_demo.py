"""A shortened demo end to end: recipe -> bench -> report, and every reported number traced to its JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from adala.demo import run_demo

RECIPE = """
teacher: dinov2-s14
img_size: 28
seed: 0
stages:
  student: {kind: linearize, attention: linear-elu}
  stage1: {kind: align-attention, from: student, data: photos, steps: 2, batch_size: 2, lr: 1.0e-3}
  stage2: {kind: align-features, from: stage1, data: photos, steps: 3, batch_size: 2, lr: 1.0e-4}
  stage2_only: {kind: align-features, from: student, data: photos, steps: 3, batch_size: 2, lr: 1.0e-4}
  fidelity: {kind: evaluate, from: stage2, task: features, data: "photos:heldout", teacher: true, img_size: [28, 56],
             length: 2}
  fidelity_none: {kind: evaluate, from: student, task: features, data: "photos:heldout", teacher: true,
                  img_size: [28, 56], length: 2}
  probe_teacher: {kind: finetune, from: teacher, task: linear-probe, data: "fashion-mnist:train", length: 60,
                  eval_data: "fashion-mnist:test", eval_length: 40}
  probe: {kind: finetune, from: stage2, task: linear-probe, data: "fashion-mnist:train", length: 60,
          eval_data: "fashion-mnist:test", eval_length: 40}
  probe_none: {kind: finetune, from: student, task: linear-probe, data: "fashion-mnist:train", length: 60,
               eval_data: "fashion-mnist:test", eval_length: 40}
  finetune_teacher: {kind: finetune, from: teacher, task: classification, data: "fashion-mnist:train", length: 8,
                     steps: 2, batch_size: 4, eval_data: "fashion-mnist:test", eval_length: 8}
  finetune: {kind: finetune, from: stage2, task: classification, data: "fashion-mnist:train", length: 8,
             steps: 2, batch_size: 4, eval_data: "fashion-mnist:test", eval_length: 8}
  agent_student: {kind: linearize, attention: agent, options: {agents: 2}}
  agent_stage1: {kind: align-attention, from: agent_student, data: photos, steps: 2, batch_size: 2, lr: 3.0e-4}
  fidelity_agent: {kind: evaluate, from: agent_stage1, task: features, data: "photos:heldout", teacher: true,
                   img_size: [28, 56], length: 2}
  segmentation: {kind: finetune, from: stage2, task: segmentation, head: linear, freeze_backbone: true,
                 data: "fashion-mnist-seg:train", length: 16, epochs: 1, eval_data: "fashion-mnist-seg:test",
                 eval_length: 8}
"""


@pytest.mark.slow
def test_short_demo_writes_a_traceable_report(tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(RECIPE)
    out = tmp_path / "run"
    report = run_demo(cfg, out, resolutions=[28, 56], repeats=1, memory=False, pca_size=56)
    text = report.read_text()
    for name in ["summary.json", "bench.json", "report_sources.json", "loss_curves.png", "layer_fidelity.png",
                 "feature_pca.png", "throughput.png", "fidelity_resolution.png"]:
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            pixels = np.asarray(Image.open(out / name).convert("L"), dtype=np.float32)
            assert pixels.std() > 5, f"{name} looks blank"
            assert f"({name})" in text
    sources = json.loads((out / "report_sources.json").read_text())
    assert len(sources) >= 10
    for src in sources:  # each printed number is the one in the JSON it came from
        value = json.loads((out / src["file"]).read_text())
        for key in src["path"]:
            value = value[key]
        assert format(float(value) * src["scale"], src["spec"]) == src["text"]
        assert src["text"] in text
    assert "| none |" in text and "| stage 1 + 2 |" in text and "22.92" in text
    assert "| 28² | 56² |" in text  # the fidelity-vs-resolution table, one column per evaluated size
    assert "| agent attention, stage 1 (224²) |" in text  # the agent arm's curve beside the paper's kernel
    bench = json.loads((out / "bench.json").read_text())
    assert "--model " + str(out / "agent_stage1") in bench["command"]
    assert "full fine-tune top-1 (%), 2 steps |" in text  # the step count is read from the run, too
    # the reported numbers are the run's: top-1 of the student probe, from summary.json
    summary = json.loads((out / "summary.json").read_text())
    probe = next(s for s in summary["stages"] if s["name"] == "probe")
    assert f"{probe['metrics']['top1'] * 100:.2f}" in text
