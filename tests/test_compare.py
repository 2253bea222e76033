"""``adala compare`` on a tiny recipe: one row per kind, every column filled, a real scatter plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

import adala
from adala.cli import main
from adala.compare import compare
from adala.errors import ConfigError
from adala.recipes import load_recipe

KINDS = ["linear-elu", "hedgehog"]


def _recipe(tmp_path):
    teacher = adala.load_teacher("timm:vit_small_patch14_dinov2", pretrained=False, img_size=56, depth=2,
                                 embed_dim=64, num_heads=2)
    tdir = adala.save_model(teacher, tmp_path / "teacher")
    path = tmp_path / "tiny.yaml"
    path.write_text("""
teacher: softmax-placeholder
img_size: 28
defaults: {progress: false, log_every: 1}
stages:
  student: {kind: linearize, attention: linear-elu}
  stage1: {kind: align-attention, from: student, data: photos, steps: 2, batch_size: 2, lr: 1.0e-3}
  stage2: {kind: align-features, from: stage1, data: photos, steps: 2, batch_size: 2, lr: 1.0e-4}
  fidelity: {kind: evaluate, from: stage2, task: features, data: photos:heldout, teacher: true, length: 4,
             batch_size: 2}
  probe_teacher: {kind: finetune, from: teacher, task: linear-probe, data: fashion-mnist:train, length: 16,
                  eval_data: fashion-mnist:test, eval_length: 8, batch_size: 8, epochs: 1}
  probe: {kind: finetune, from: stage2, task: linear-probe, data: fashion-mnist:train, length: 16,
          eval_data: fashion-mnist:test, eval_length: 8, batch_size: 8, epochs: 1}
  segmentation: {kind: finetune, from: stage2, task: segmentation, head: linear, freeze_backbone: true,
                 data: fashion-mnist-seg:train, length: 8, epochs: 1, batch_size: 4,
                 eval_data: fashion-mnist-seg:test, eval_length: 4}
""")
    return str(tdir), path


@pytest.mark.slow
def test_compare_tiny_recipe_table_and_plot(tmp_path):
    from PIL import Image

    teacher, recipe = _recipe(tmp_path)
    out = tmp_path / "cmp"
    result = compare(teacher, KINDS, recipe, out, resolutions=(28, 56), repeats=1, log=None)
    assert [r["kind"] for r in result["rows"]] == KINDS
    cols = result["columns"]
    assert {"probe_top1", "miou", "final_cosine", "speedup@28", "speedup@56", "images_per_s@56",
            "params_extra", "params_total"} <= set(cols)
    for row in result["rows"]:
        assert all(row[c] is not None for c in cols), row
        assert 0.0 <= row["probe_top1"] <= 1.0 and -1.0 <= row["final_cosine"] <= 1.0
        assert row["speedup@56"] > 0 and row["params_total"] > 0
    by_kind = {r["kind"]: r for r in result["rows"]}
    assert by_kind["linear-elu"]["params_extra"] == 0 < by_kind["hedgehog"]["params_extra"]  # feature maps
    assert result["teacher_row"]["probe_top1"] is not None  # the recipe's probe of the teacher itself
    assert (out / "linear-elu" / "stage2" / "adala.json").is_file()
    # the teacher's own probe does not depend on the kind: it runs once, for the first kind
    assert (out / "linear-elu" / "probe_teacher" / "metrics.json").is_file()
    assert not (out / "hedgehog" / "probe_teacher").exists()
    assert json.loads((out / "hedgehog" / "stage2" / "adala.json").read_text())["attention"]["kind"] == "hedgehog"
    # one bench run with every student interleaved next to the teacher
    assert [m["name"] for m in result["bench"]["models"]] == ["teacher", *KINDS]
    saved = json.loads((out / "compare.json").read_text())
    assert saved["rows"] == result["rows"]
    md = (out / "compare.md").read_text()
    assert all(f"| {k} |" in md for k in KINDS) and "speedup@56" in md
    img = np.asarray(Image.open(out / "compare.png").convert("L"), dtype=float)
    assert img.shape[0] > 100 and img.std() > 1.0  # a drawn figure, not a blank canvas

    # re-running reuses every finished stage; the CLI prints the same table
    assert main(["compare", "--teacher", teacher, "--attention", ",".join(KINDS), "--recipe", str(recipe),
                 "--out", str(out), "--resolutions", "28", "--repeats", "1", "--quiet"]) == 0
    again = json.loads((out / "compare.json").read_text())
    assert again["resolutions"] == [28]
    assert [r["probe_top1"] for r in again["rows"]] == [r["probe_top1"] for r in result["rows"]]


def test_compare_rejects_unknown_kinds_and_recipes_without_a_linearize_stage(tmp_path):
    with pytest.raises(ConfigError, match="unknown attention kind 'nope'"):
        compare(None, ["linear-elu", "nope"], tmp_path / "x.yaml", tmp_path / "out", log=None)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: dinov2-s14\nimg_size: 28\nstages:\n"
                      "  probe: {kind: finetune, from: teacher, task: linear-probe, data: fashion-mnist}\n")
    with pytest.raises(ConfigError, match="no linearize stage"):
        compare(None, ["linear-elu"], recipe, tmp_path / "out", log=None)


def test_compare_runs_only_what_the_table_needs_of_the_demo_recipe():
    from adala.compare import _final_student, _needed_stages

    recipe = load_recipe("demo")  # the packaged recipe, by name
    final = _final_student(recipe)
    assert final == "stage2"  # stage 1 -> stage 2, not the ablation's stage 2 straight from linearize
    names = [st.name for st in _needed_stages(recipe.stages, final)]
    assert {"student", "stage1", "stage2", "fidelity", "probe", "segmentation",
            "probe_teacher", "seg_teacher"} <= set(names)
    assert not {"stage2_only", "probe_none", "probe_stage1", "seg_stage2_only"} & set(names)
