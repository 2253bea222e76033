"""``adala bench`` on a tiny random ViT: record shape, FLOP counter vs a hand count, CLI (no timing asserts)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import adala
from adala.benchmark import bench, crossover, model_flops
from adala.benchmark.flops import block_flops
from adala.benchmark.measure import interleaved
from adala.cli import main
from adala.errors import ConfigError

TINY = {"pretrained": False, "img_size": 56, "depth": 2, "embed_dim": 64, "num_heads": 2}
TINY_ARGS = [f"--teacher-option={k}={str(v).lower()}" for k, v in TINY.items()]
SPEC = "timm:vit_small_patch14_dinov2"


def _tiny():
    return adala.load_teacher(SPEC, **TINY)


def test_flops_match_a_hand_count_for_one_block():
    teacher = _tiny()
    student = adala.linearize(teacher, "linear-elu")
    n, c, h, d, hidden = 17, 64, 2, 32, 256  # 56px / 14 = 4x4 patches + cls
    linears = {"qkv": 2 * n * c * 3 * c, "proj": 2 * n * c * c, "mlp": 2 * n * c * hidden * 2}
    soft = block_flops(teacher.blocks[0], n)
    assert soft == {**linears, "attention": 2 * 2 * n * n * d * h}
    lin = block_flops(student.blocks[0], n)
    # φ (ELU, +1) on q and k; KᵀV; Q(KᵀV); normaliser Σφk (N·D), φq·Σφk (2·N·D), division (N·D)
    assert lin == {**linears, "attention": (2 * 2 * n * d + 2 * n * d * d * 2 + 4 * n * d) * h}
    embed = 2 * 16 * (3 * 14 * 14) * c
    f = model_flops(teacher, 56, batch_size=3)
    assert f["tokens"] == n and f["patch_embed"] == 3 * embed
    assert f["total"] == 3 * (embed + 2 * sum(soft.values()))
    assert model_flops(student, 112)["tokens"] == 65


def test_crossover_interpolates_and_reports_edges():
    comps = [{"resolution": 224, "speedup": 0.8}, {"resolution": 448, "speedup": 1.2}]
    assert crossover(comps)["resolution"] == pytest.approx(336)
    assert crossover([{"resolution": 224, "speedup": 1.1}])["resolution"] is None
    assert "teacher faster" in crossover([{"resolution": 224, "speedup": 0.9}])["note"]


def test_interleaved_rotates_order_and_min_seconds_adds_rounds():
    """A fake clock: fn 0 takes 0.1 s, fn 1 takes 0.3 s; 2 s for each fn needs 20 rounds of the quicker."""
    now = [0.0]
    calls: list[int] = []

    def fn(i: int, cost: float):
        def call():
            calls.append(i)
            now[0] += cost
        return call

    fns = [fn(0, 0.1), fn(1, 0.3)]
    times = interleaved(fns, torch.device("cpu"), repeats=3, warmup=1, clock=lambda: now[0])
    assert [len(t) for t in times] == [3, 3] and times[0][0] == pytest.approx(0.1)
    assert calls[2:] == [0, 1, 1, 0, 0, 1]  # after one warm-up each, the order rotates every round
    times = interleaved(fns, torch.device("cpu"), repeats=3, warmup=1, clock=lambda: now[0], min_seconds=2.0)
    assert [len(t) for t in times] == [20, 20] and sum(times[0]) == pytest.approx(2.0)
    times = interleaved(fns, torch.device("cpu"), repeats=9, warmup=0, clock=lambda: now[0], min_seconds=0.5)
    assert [len(t) for t in times] == [9, 9]  # repeats stays the floor (sized by one call each without warm-up)


def test_bench_api_record_has_every_field():
    record = bench(SPEC, ["linear-elu"], resolutions=[112, 56], repeats=2, warmup=1, teacher_kwargs=TINY,
                   memory=False, train_steps=True, train_repeats=1)
    assert record["format"] == "adala-bench/1"
    s = record["settings"]
    assert s["resolutions"] == [56, 112] and "multiply-add = 2 FLOPs" in s["flop_convention"]
    if platform.libc_ver()[0] == "glibc":  # Linux CI: big freed blocks are kept for reuse while timing
        assert s["allocator"].startswith("glibc, freed memory kept")
    assert [m["name"] for m in record["models"]] == ["teacher", "linear-elu"]
    assert s["min_seconds"] == 0 and all(r["repeats"] == 2 for r in record["results"])
    assert record["models"][1]["block_kinds"] == ["linear-elu", "linear-elu"]
    assert len(record["results"]) == 4
    for row in record["results"]:
        for key in ("images_per_s", "latency_ms", "latency_ms_all", "flops", "gflops", "achieved_gflops_per_s",
                    "flops_breakdown", "tokens"):
            assert row[key] is not None, key
        assert len(row["latency_ms_all"]) == 2
        assert row["peak_memory_mb"] is None and row["memory_method"] is None
    assert len(record["comparisons"]) == 2
    for c in record["comparisons"]:
        assert c["speedup"] > 0 and c["flop_bound"] > 0
        assert c["fraction_of_bound"] == pytest.approx(c["speedup"] / c["flop_bound"])
    assert "linear-elu" in record["crossover"]
    ts = record["train_steps"]
    assert ts["resolutions"] == [56] and ts["batch_size"] == 2 and ts["stages"] == ["stage1", "stage2", "finetune"]
    rows = {(r["stage"], r["model"]): r for r in ts["results"]}
    assert set(rows) == {(s_, m) for s_ in ts["stages"] for m in ("teacher", "linear-elu")}
    for row in rows.values():
        assert row["steps_per_s"] > 0 and row["trainable_params"] > 0 and row["train_flops"] > 0
    # the stages' own objectives ran (there is no fallback to a private copy)
    assert rows[("stage1", "linear-elu")]["objective"] == "adala.stages.align_attention.AttentionAlignment"
    assert rows[("stage2", "linear-elu")]["objective"] == "adala.stages.align_features.FeatureAlignment"
    # stage 1 trains attention only (the same set in both architectures), stage 2 everything
    assert rows[("stage1", "linear-elu")]["trainable_params"] < rows[("stage2", "linear-elu")]["trainable_params"]
    assert rows[("stage1", "teacher")]["trainable_params"] == rows[("stage1", "linear-elu")]["trainable_params"]
    for c in ts["comparisons"]:
        assert c["fraction_of_bound"] == pytest.approx(c["speedup"] / c["flop_bound"])
    json.dumps(record)  # JSON-serialisable as is


@pytest.mark.slow
def test_bench_cpu_memory_in_fresh_subprocesses():
    """One subprocess per case (imports torch + timm: ~5-20 s each on a busy 2-core machine)."""
    teacher = _tiny()
    record = bench(SPEC, {"saved": adala.linearize(teacher, "linear-elu")}, resolutions=[112], repeats=1,
                   warmup=0, teacher_kwargs=TINY, memory=True, threads=1)
    assert "subprocess" in record["settings"]["memory_method"]
    for row in record["results"]:  # the teacher goes by its spec, the module via a temporary save
        assert row["memory_error"] is None and row["peak_memory_mb"] > 0
        assert "subprocess" in row["memory_method"]
    assert record["comparisons"][0]["memory_ratio"] > 0


def test_bench_leaves_given_modules_alone():
    teacher = _tiny()
    student = adala.linearize(teacher, "linear-relu")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    flags = [p.requires_grad for p in student.parameters()]  # linearize returns a trainable model
    record = bench(teacher, {"mine": student}, resolutions=[56], repeats=1, warmup=0, memory=False,
                   train_steps=True, train_repeats=1)
    assert record["comparisons"][0]["student"] == "mine"
    assert [p.requires_grad for p in student.parameters()] == flags and all(flags)
    assert all((before[k] == v).all() for k, v in student.state_dict().items())
    assert not any(a._forward_hooks for a in adala.models.surgery.attention_modules(teacher))


def test_bench_rejects_bad_resolution():
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        bench(SPEC, ["linear-elu"], resolutions=[50], teacher_kwargs=TINY, memory=False)


def test_cli_bench_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--teacher", SPEC, *TINY_ARGS, "--attention", "linear-elu", "linear-relu",
               "--resolutions", "56", "--repeats", "1", "--no-memory", "--quiet", "--out", str(out),
               "--plot", str(png)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert {c["student"] for c in record["comparisons"]} == {"linear-elu", "linear-relu"}
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "speed-up" in capsys.readouterr().out


def test_cli_bench_model_dir_and_errors(tmp_path, capsys):
    model_dir = tmp_path / "student"
    adala.save_model(adala.linearize(_tiny(), "linear-elu"), model_dir)
    out = tmp_path / "m.json"
    rc = main(["bench", "--model", str(model_dir), "--teacher", SPEC, *TINY_ARGS, "--resolutions", "56",
               "--repeats", "1", "--no-memory", "--quiet", "--out", str(out)])
    assert rc == 0
    assert json.loads(out.read_text())["comparisons"][0]["student"] == "student"
    rc = main(["bench", "--model", str(model_dir), "--attention", "linear-elu", "--out", str(out)])
    assert rc == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_keep_freed_memory_can_be_turned_off_from_the_environment():
    code = "from adala.runtime import keep_freed_memory as k, allocator as a; print(k(), k(), a())"
    env = {**os.environ, "ADALA_MALLOC": "system"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert off.stdout.split()[:2] == ["False", "False"] and "system default" in off.stdout
    if platform.libc_ver()[0] == "glibc":
        env.pop("ADALA_MALLOC")
        on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert on.stdout.split()[:2] == ["True", "True"] and "glibc" in on.stdout


def test_sdpa_backend_pins_torch_and_cli_records_it(tmp_path, capsys):
    from adala.benchmark.measure import sdpa_backend

    with sdpa_backend("math"):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored afterwards
    with pytest.raises(ConfigError, match="sdpa backend must be one of"):
        bench(SPEC, ["linear-elu"], resolutions=[56], teacher_kwargs=TINY, memory=False, sdpa="fast")
    out = tmp_path / "s.json"
    rc = main(["bench", "--teacher", SPEC, *TINY_ARGS, "--resolutions", "56", "--repeats", "1", "--no-memory",
               "--quiet", "--sdpa-backend", "math", "--out", str(out)])
    assert rc == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["sdpa_backend"] == "math" and settings["cuda_graphs"] is False
    rc = main(["bench", "--teacher", SPEC, *TINY_ARGS, "--cuda-graphs", "--out", str(out)])
    assert rc == 2
    assert "cuda_graphs needs --device cuda" in capsys.readouterr().err
