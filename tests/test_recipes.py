"""YAML recipes: strict validation naming the key, end-to-end runs, reuse of finished stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import adala
from adala.cli import main
from adala.errors import ConfigError
from adala.recipes import apply_overrides, load_recipe, parse_recipe, run_recipe

CONFIGS = Path(adala.__file__).resolve().parent / "configs"  # the packaged recipes


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "teacher"
    t = adala.load_teacher("timm:vit_small_patch14_dinov2", pretrained=False, img_size=56, depth=2,
                           embed_dim=64, num_heads=2)
    adala.save_model(t, d)
    return str(d)


def _recipe(teacher: str) -> dict:
    fast = {"progress": False, "log_every": 1}
    return {
        "teacher": teacher,
        "img_size": 56,
        "seed": 0,
        "threads": 1,
        "defaults": fast,
        "stages": {
            "student": {"kind": "linearize", "attention": "linear-elu"},
            "stage1": {"kind": "align-attention", "from": "student", "data": ["photos", "fashion-mnist"], "steps": 2,
                       "batch_size": 2, "lr": 1.0e-3},
            "stage2": {"kind": "align-features", "from": "stage1", "data": "photos", "steps": 2, "batch_size": 2},
            "probe": {"kind": "finetune", "from": "stage2", "task": "linear-probe", "data": "fashion-mnist",
                      "length": 16, "epochs": 2, "batch_size": 8, "eval_data": "fashion-mnist:test",
                      "eval_length": 8},
            "eval": {"kind": "evaluate", "from": "stage2", "task": "features", "data": "photos:heldout",
                     "length": 4, "teacher": True},
        },
    }


@pytest.mark.parametrize("edit,key", [
    (lambda r: r.update(teachr="x"), "teachr"),
    (lambda r: r["stages"]["stage1"].update(steps=-3), "stages.stage1.steps"),
    (lambda r: r["stages"]["stage1"].update(stepz=3), "stages.stage1.stepz"),
    (lambda r: r["stages"]["stage2"].update(lr="fast"), "stages.stage2.lr"),
    (lambda r: r["stages"]["stage2"].update(loss="l1"), "stages.stage2.loss"),
    (lambda r: r["stages"]["probe"].update(task="detection"), "stages.probe.task"),
    (lambda r: r["stages"]["probe"].update({"from": "nowhere"}), "stages.probe.from"),
    (lambda r: r["stages"]["probe"].update({"from": "eval"}), "stages.probe.from"),
    (lambda r: r["stages"]["stage1"].update(kind="distill"), "stages.stage1.kind"),
    (lambda r: r["stages"]["stage1"].update(img_size=50), "stages.stage1.img_size"),
    (lambda r: r.update(img_size=100), "img_size"),
    (lambda r: r.update(defaults={"amp": "fp8"}), "defaults.amp"),
    (lambda r: r["stages"]["eval"].pop("data"), "stages.eval.data"),
    (lambda r: r.update(stages={}), "stages"),
    (lambda r: r.update(threads=0), "threads"),
    (lambda r: r["stages"]["stage1"].update(data=[]), "stages.stage1.data"),
])
def test_validation_errors_name_the_key(edit, key):
    raw = _recipe("dinov2-s14")
    edit(raw)
    with pytest.raises(ConfigError) as e:
        parse_recipe(raw)
    assert str(e.value).startswith(key + ":") or f" {key}" in str(e.value), str(e.value)


def test_defaults_and_img_size_are_resolved():
    r = parse_recipe(_recipe("dinov2-s14"))
    s1 = next(s for s in r.stages if s.name == "stage1")
    assert s1.options["img_size"] == 56 and s1.options["seed"] == 0 and s1.options["progress"] is False
    assert "progress" not in next(s for s in r.stages if s.name == "student").options


def test_overrides():
    raw = apply_overrides(_recipe("dinov2-s14"), ["stages.stage1.steps=7", "teacher=timm:vit_x", "img_size=28"])
    assert raw["stages"]["stage1"]["steps"] == 7 and raw["teacher"] == "timm:vit_x" and raw["img_size"] == 28
    with pytest.raises(ConfigError, match="stages.nope"):
        apply_overrides(_recipe("x"), ["stages.nope.steps=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(_recipe("x"), ["steps"])


def test_tiny_recipe_runs_end_to_end_and_reuses_finished_stages(tmp_path, tiny_dir):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(_recipe(tiny_dir), sort_keys=False))
    out = tmp_path / "run"
    summary = run_recipe(cfg, out, log=None)
    names = [s["name"] for s in summary["stages"]]
    assert names == ["student", "stage1", "stage2", "probe", "eval"]
    assert [s["kind"] for s in summary["stages"]] == [
        "linearize", "align-attention", "align-features", "finetune", "evaluate"]
    saved = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in saved["stages"]] == ["ran"] * 5
    assert saved["stages"][3]["metrics"]["top1"] >= 0.0
    assert 0.0 < saved["stages"][4]["metrics"]["fidelity"]["final_cosine"] <= 1.0
    for name in ("student", "stage1", "stage2", "probe"):
        assert (out / name / "adala.json").is_file() and (out / name / "metrics.json").is_file()
    assert adala.load_model(out / "probe").adala_config["task"]["type"] == "classification"
    stamp = (out / "stage2" / "model.safetensors").stat().st_mtime_ns

    again = run_recipe(cfg, out, log=None)
    assert [s["status"] for s in again["stages"]] == ["skipped"] * 5
    assert (out / "stage2" / "model.safetensors").stat().st_mtime_ns == stamp

    changed = run_recipe(load_recipe(cfg, ["stages.stage2.steps=3"]), out, log=None)
    assert [s["status"] for s in changed["stages"]] == ["skipped", "skipped", "ran", "ran", "ran"]
    assert changed["stages"][2]["metrics"]["steps"] == 3

    fresh = run_recipe(cfg, out, log=None, fresh=True)
    assert [s["status"] for s in fresh["stages"]] == ["ran"] * 5


def test_cli_run_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": "dinov2-s14", "stages": {"s": {"kind": "linearize", "oops": 1}}}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stages.s.oops" in err
    assert not (tmp_path / "o").exists()
    assert main(["run", str(CONFIGS / "demo.yaml"), "--check"]) == 0


EVAL = {"kind": "evaluate", "from": "stage2", "task": "features", "data": "photos:heldout", "length": 4}


@pytest.mark.parametrize("change, message", [
    ({"student": {"kind": "linearize", "attention": "agnt"}}, "stages.student: unknown attention kind 'agnt'"),
    ({"student": {"kind": "linearize", "attention": "agent", "options": {"kmeans_point": 0}}},
     "stages.student: unknown option kmeans_point for attention agent"),
    ({"student": {"kind": "linearize", "attention": "agent", "options": {"dwc": 2}}},
     "stages.student: dwc must be 0 (off) or a positive odd kernel size"),
    ({"stage2": {"kind": "align-features", "from": "stage1", "data": "photoz"}},
     "stages.stage2.data: unknown data spec 'photoz'"),
    ({"stage2": {"kind": "align-features", "from": "stage1", "data": ["photos", "photos:heldout"]}},
     "stages.stage2.data: 'photos:heldout' is the held-out evaluation set"),
    ({"eval": {**EVAL, "options": {"dwc": 3}}}, "stages.eval.options: ['dwc'] change the weights of stage2's"),
    ({"eval": {**EVAL, "options": {"kernel": "fast"}}}, "stages.eval.options: kernel must be one of"),
    ({"eval": {**EVAL, "from": "teacher", "options": {"eps": 1e-5}}}, "teacher has no linear attention"),
    ({"stage2": {"kind": "align-features", "from": "stage1", "data": "photos", "train_options": {"dwc": 3}}},
     "stages.stage2.train_options: ['dwc'] change the weights of stage1's"),
    ({"stage2": {"kind": "align-features", "from": "stage1", "data": "photos", "train_options": {"epz": 1}}},
     "stages.stage2.train_options: "),
    ({"stage1": {"kind": "align-attention", "from": "student", "data": "photos", "train_options": [1]}},
     "stages.stage1.train_options: must be a mapping"),
])
def test_check_builds_what_the_run_would_and_names_the_stage(tiny_dir, tmp_path, capsys, change, message):
    """--check fails, in one line and before any training, on what the schema alone lets through (each of these
    passed --check before it built the students and parsed the data specs)."""
    r = _recipe(tiny_dir)
    r["stages"].update(change)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(r, sort_keys=False))
    assert main(["run", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_check_says_what_it_checked(tiny_dir, tmp_path, capsys):
    r = _recipe(tiny_dir)
    r["stages"]["eval"]["options"] = {"eps": 1e-5}  # carries no weights: an evaluation may set it
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(r, sort_keys=False))
    assert main(["run", str(cfg), "--check"]) == 0
    out = capsys.readouterr().out
    assert "6 data specs parse" in out and "1 students linearized on it, 1 rebuilt with a stage's" in out


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_recipe_validates(name):
    assert main(["run", str(CONFIGS / name), "--check"]) == 0


def test_paper_config_validates():
    r = load_recipe(CONFIGS / "paper-dinov2-l.yaml")
    assert r.teacher == "timm:vit_large_patch14_dinov2.lvd142m"
    assert r.img_size % 14 == 0
    kinds = [s.kind for s in r.stages]
    assert kinds[:3] == ["linearize", "align-attention", "align-features"] and "finetune" in kinds
    s1 = next(s for s in r.stages if s.kind == "align-attention")
    assert s1.options["amp"] == "bf16" and s1.options["data"].startswith("folder:")


def test_paper_config_starts_on_stand_ins(tmp_path, tiny_dir):
    r = load_recipe(CONFIGS / "paper-dinov2-l.yaml")
    sets = [f"teacher={tiny_dir}", "img_size=56", "defaults.amp=fp32", "defaults.progress=false",
            "defaults.batch_size=2", "defaults.num_workers=0"]
    for s in r.stages:
        opts = s.options
        if "steps" in opts:
            sets.append(f"stages.{s.name}.steps=1")
        if "epochs" in opts:
            sets.append(f"stages.{s.name}.epochs=1")
        if "data" in opts:
            task = opts.get("task", "unlabeled")
            stand_in = {"segmentation": "fashion-mnist-seg", "classification": "fashion-mnist",
                        "linear-probe": "fashion-mnist"}.get(task, "photos")
            sets.append(f"stages.{s.name}.data={stand_in}")
            if s.kind in ("finetune", "evaluate"):
                sets.append(f"stages.{s.name}.length=8")
        if "eval_data" in opts:
            sets += [f"stages.{s.name}.eval_data={stand_in}:test", f"stages.{s.name}.eval_length=4"]
    assert main(["run", str(CONFIGS / "paper-dinov2-l.yaml"), "--out", str(tmp_path / "p"), *sum(
        (["--set", s] for s in sets), [])]) == 0
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == [s.name for s in r.stages]


def test_shared_settings_through_x_keys_and_yaml_anchors(tmp_path):
    cfg = tmp_path / "anchors.yaml"
    cfg.write_text("""
teacher: dinov2-s14
x-probe: &probe {kind: finetune, task: linear-probe, data: fashion-mnist:train, length: 64}
stages:
  student: {kind: linearize}
  probe_teacher: {<<: *probe, from: teacher}
  probe: {<<: *probe, from: student, length: 32}
""")
    r = load_recipe(cfg)
    opts = {s.name: s.options for s in r.stages}
    assert opts["probe_teacher"]["length"] == 64 and opts["probe"]["length"] == 32
    assert opts["probe"]["task"] == "linear-probe" and r.stages[2].source == "student"
    cfg.write_text("teacher: dinov2-s14\ny-probe: 1\nstages: {student: {kind: linearize}}\n")
    with pytest.raises(ConfigError, match="y-probe: unknown recipe key"):
        load_recipe(cfg)


def test_evaluate_stage_scores_the_student_with_other_attention_options(tmp_path, tiny_dir):
    """An evaluate stage's ``options`` rebuild the saved student with other weight-free attention options (as
    ``adala evaluate --option``); one that changes the weights stops the recipe with a one-line error."""
    raw = {"teacher": tiny_dir, "img_size": 56, "seed": 0, "threads": 1, "defaults": {"progress": False},
           "stages": {"student": {"kind": "linearize", "attention": "agent", "options": {"agents": 2}},
                      "plain": {"kind": "evaluate", "from": "student", "task": "features", "data": "photos:heldout",
                                "length": 2, "teacher": True},
                      "more": {"kind": "evaluate", "from": "student", "task": "features", "data": "photos:heldout",
                               "length": 2, "teacher": True, "options": {"agents": 3}}}}
    run_recipe(parse_recipe(raw), tmp_path / "run")
    more = json.loads((tmp_path / "run" / "more" / "metrics.json").read_text())
    plain = json.loads((tmp_path / "run" / "plain" / "metrics.json").read_text())
    assert more["options"] == {"agents": 3} and "options" not in plain
    raw["stages"]["more"]["options"] = {"dwc": 3}
    with pytest.raises(ConfigError, match=r"stage more \(evaluate\).*change the weights"):
        run_recipe(parse_recipe(raw), tmp_path / "run")
